//! Fences, in one place: the keys that apply to a workload acting for a
//! user, an in-memory mirror of the stored fences (the store is the truth:
//! every transaction that creates something for a workload checks the
//! stored fences too), the check on the request path, and what responders
//! do with them (list, lift with a reason; setting one is part of a
//! revocation job).

use std::collections::HashSet;
use std::sync::RwLock;

use super::{Broker, BrokerError, require_responder};
use crate::audit::{self, Ctx};
use crate::auth::{Caller, Workload};
use crate::config::OperatorRole;
use crate::store::records::FenceRecord;

/// Fences in memory, for a check on every request without a read.
#[derive(Debug, Default)]
pub struct FenceCache {
    keys: RwLock<HashSet<String>>,
}

impl FenceCache {
    pub fn set(&self, keys: impl IntoIterator<Item = String>) {
        if let Ok(mut k) = self.keys.write() {
            *k = keys.into_iter().collect();
        }
    }

    pub(crate) fn insert(&self, key: String) {
        if let Ok(mut k) = self.keys.write() {
            k.insert(key);
        }
    }

    pub(crate) fn remove(&self, key: &str) {
        if let Ok(mut k) = self.keys.write() {
            k.remove(key);
        }
    }

    pub fn any(&self, keys: &[String]) -> bool {
        self.keys
            .read()
            .map(|k| keys.iter().any(|x| k.contains(x)))
            .unwrap_or(true)
    }
}

/// The fence keys that apply to a workload acting for a user.
pub fn fence_keys(w: &Workload, user: Option<&str>) -> Vec<String> {
    let mut keys = vec![FenceRecord::key("workload", &w.id)];
    if let Some(t) = &w.tenant {
        keys.push(FenceRecord::key("tenant", t));
    }
    if let Some(u) = user {
        keys.push(FenceRecord::key("user", u));
    }
    keys
}

impl Broker {
    /// Refuse fenced workloads, tenants and users.
    pub fn check_fence(&self, w: &Workload, user: Option<&str>) -> Result<(), BrokerError> {
        if self.fences.any(&fence_keys(w, user)) {
            return Err(BrokerError::from(crate::store::StoreError::Conflict(
                crate::store::Conflict::Fenced,
            )));
        }
        Ok(())
    }
}

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
        require_responder(caller)?;
        if !matches!(kind.as_str(), "workload" | "tenant" | "user") {
            return Err(BrokerError::invalid(
                "invalid_fence",
                "`kind` is workload, tenant or user",
            ));
        }
        crate::check::text("reason", &reason, 1024).map_err(|_| {
            BrokerError::invalid("reason_required", "lifting a fence needs a `reason`")
        })?;
        let value = if kind == "user" {
            crate::check::user("value", &value)?
        } else {
            crate::check::identifier("value", &value)?
        };
        let now = self.clock.now().unix_millis();
        let by = caller.principal();
        let (a, c) = (self.auditor.clone(), ctx.clone());
        let (k, v) = (kind.clone(), value.clone());
        let lifted = self
            .store
            .write(move |t| {
                let f = t.lift_fence(&k, &v)?;
                audit::append(t, &a, a.fence(&f, Some((&by, &reason)), &c, now))?;
                t.announce("fences")?;
                Ok(f)
            })
            .await?;
        self.fences.remove(&FenceRecord::key(&kind, &value));
        tracing::warn!(kind = %kind, by = %caller.principal(), "fence lifted");
        Ok(lifted)
    }
}
