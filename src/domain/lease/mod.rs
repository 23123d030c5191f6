//! Leases as their owners and operators see them: a direct credential
//! request (decided like a call's credential, then issued through
//! `issue`), one lease, the list, and manual revocation.

use crate::audit::{self, Ctx};
use crate::auth::{Caller, Workload};
use crate::domain::call::{CallOutcome, CallParams};
use crate::domain::issue::LeaseParams;
use crate::domain::{Broker, BrokerError};
use crate::ids::{ApprovalId, LeaseId, TaskId};
use crate::store::{LeaseQuery, LeaseRecord, LeaseState, RevokeCause};

impl Broker {
    /// A direct credential request: decided like a call's credential.
    pub async fn request_lease(
        &self,
        w: &Workload,
        task_id: TaskId,
        lease: LeaseParams,
        approval_id: Option<ApprovalId>,
        ctx: &Ctx,
    ) -> Result<CallOutcome, BrokerError> {
        let p = CallParams {
            credential: Some(lease),
            approval_id,
            ..CallParams::default()
        };
        let result = self.decide_and_act(w, task_id, &p, ctx, true).await;
        if let Err(e) = &result {
            let asked = crate::domain::call::asked_of(&p, true);
            self.refused_in_task(w, task_id, asked, e, ctx).await;
        }
        result
    }

    /// A lease the caller may see: its owner, admins and responders.
    pub fn get_lease(&self, caller: &Caller, id: LeaseId) -> Result<LeaseRecord, BrokerError> {
        let rec = self
            .store
            .read()?
            .lease(id.0)?
            .ok_or(BrokerError::NotFound {
                code: "lease_not_found",
            })?;
        match caller {
            Caller::Workload(w) if w.id == rec.workload => Ok(rec),
            Caller::Workload(_) => Err(BrokerError::NotFound {
                code: "lease_not_found",
            }),
            Caller::Operator(_) if Self::is_reader(caller) => Ok(rec),
            Caller::Operator(_) => Err(BrokerError::Forbidden {
                code: "forbidden",
                message: "reading leases needs the admin or responder role".into(),
            }),
        }
    }

    /// Revoke one lease now. Idempotent: an already dead lease is returned
    /// as it is.
    pub async fn revoke_lease(
        &self,
        caller: &Caller,
        id: LeaseId,
        ctx: &Ctx,
    ) -> Result<LeaseRecord, BrokerError> {
        let rec = self.get_lease(caller, id)?;
        if rec.state == LeaseState::Issuing {
            return Err(BrokerError::conflict(
                "lease_issuing",
                "the lease is still being issued; retry shortly",
            ));
        }
        if rec.state.is_terminal() || rec.state == LeaseState::Revoking {
            return Ok(rec);
        }
        let now = self.clock.now().unix_millis();
        let claim_until = now.saturating_add(self.claim_window_ms());
        let by = caller.principal();
        let (local, a, c) = (self.local.clone(), self.auditor.clone(), ctx.clone());
        let req = self
            .store
            .write(move |t| {
                let req = t.request_revoke(
                    id.0,
                    RevokeCause::Manual,
                    Some(&by),
                    now,
                    claim_until,
                    &local,
                )?;
                if req.changed {
                    audit::append(t, &a, a.lease(&req.rec, &c, now))?;
                }
                Ok(req)
            })
            .await?;
        if !req.queued {
            return Ok(req.rec);
        }
        let mut done = self.revoke_claimed(vec![req.rec.clone()], ctx).await;
        Ok(done.pop().unwrap_or(req.rec))
    }

    /// List leases (admin, responder).
    pub fn list_leases(
        &self,
        caller: &Caller,
        q: &LeaseQuery,
    ) -> Result<(Vec<LeaseRecord>, Option<u128>), BrokerError> {
        if !Self::is_reader(caller) {
            return Err(BrokerError::Forbidden {
                code: "forbidden",
                message: "listing leases needs the admin or responder role".into(),
            });
        }
        Ok(self.store.read()?.list_leases(q)?)
    }
}
