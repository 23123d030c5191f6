//! Fences as responders manage them: loaded at start, listed, lifted with
//! a reason (setting one is part of a job).

use crate::audit::{self, Ctx};
use crate::auth::Caller;
use crate::config::OperatorRole;
use crate::domain::{Broker, BrokerError};
use crate::store::FenceRecord;

use super::*;

impl Broker {
    /// Load the fences into memory (start-up).
    pub fn load_fences(&self) -> Result<usize, BrokerError> {
        let fences = self.store.read()?.fences()?;
        let n = fences.len();
        self.fences
            .set(fences.iter().map(|f| FenceRecord::key(&f.kind, &f.value)));
        Ok(n)
    }

    pub fn list_fences(&self, caller: &Caller) -> Result<Vec<FenceRecord>, BrokerError> {
        if !caller.has_any_role(&[OperatorRole::Responder, OperatorRole::Admin]) {
            return Err(BrokerError::Forbidden {
                code: "forbidden",
                message: "fences are for responders and admins".into(),
            });
        }
        Ok(self.store.read()?.fences()?)
    }

    /// Lift a fence, with a reason.
    pub async fn lift_fence(
        &self,
        caller: &Caller,
        kind: String,
        value: String,
        reason: String,
        ctx: &Ctx,
    ) -> Result<FenceRecord, BrokerError> {
        responder(caller)?;
        if !matches!(kind.as_str(), "workload" | "tenant" | "user") {
            return Err(BrokerError::invalid(
                "invalid_fence",
                "`kind` is workload, tenant or user",
            ));
        }
        crate::check::text("reason", &reason, 1024).map_err(|_| {
            BrokerError::invalid("reason_required", "lifting a fence needs a `reason`")
        })?;
        let now = self.clock.now().unix_millis();
        let by = caller.principal();
        let (a, c) = (self.auditor.clone(), ctx.clone());
        let (k, v) = (kind.clone(), value.clone());
        let lifted = self
            .store
            .write(move |t| {
                let f = t.lift_fence(&k, &v)?;
                audit::append(t, &a, a.fence(&f, Some((&by, &reason)), &c, now))?;
                Ok(f)
            })
            .await?;
        self.fences.remove(&FenceRecord::key(&kind, &value));
        tracing::warn!(kind = %kind, by = %caller.principal(), "fence lifted");
        Ok(lifted)
    }
}
