//! Incident response: mass revocation by selector, fences, blast radius.
//!
//! A revocation job is durable: its selector and cursor are stored, it runs
//! in the background through the same revocation path as expiry (local
//! providers revoke in the transaction that claims, others go to the durable
//! per-provider queue, so one slow provider does not starve the others), and
//! a restarted broker resumes it after its cursor. A fence, written in the
//! same transaction as the job and before the call answers, stops anything
//! new (tasks, calls, leases, activations in flight) for a workload, a tenant
//! or a user until a responder lifts it.

mod blast;
mod jobs;
mod reconcile;

use crate::audit::{self, Ctx};
use crate::auth::Caller;
use crate::domain::{Broker, BrokerError, require_responder};
use crate::ids::LeaseId;
use crate::store::LeaseRecord;

pub use blast::{BlastRadius, RadiusCall, RadiusLease, RadiusTask, RadiusTotals};
pub use jobs::{DryRunView, FailedLeaseView, JobRequest, JobStart, JobView, SelectorView};
pub use reconcile::{OrphanView, ReconcileReport};

impl Broker {
    /// Give up on an irrevocable lease (recorded, never silent).
    pub async fn abandon_lease(
        &self,
        caller: &Caller,
        id: LeaseId,
        reason: String,
        ctx: &Ctx,
    ) -> Result<LeaseRecord, BrokerError> {
        require_responder(caller)?;
        crate::check::text("reason", &reason, 1024).map_err(|_| {
            BrokerError::invalid("reason_required", "abandoning a lease needs a `reason`")
        })?;
        let now = self.clock.now().unix_millis();
        let by = caller.principal();
        let (a, c) = (self.auditor.clone(), ctx.clone());
        let rec = self
            .store
            .write(move |t| {
                let rec = t.abandon(id.0, &by, &reason, now)?;
                audit::append(t, &a, a.lease(&rec, &c, now))?;
                Ok(rec)
            })
            .await?;
        tracing::error!(lease_id = %id, by = %caller.principal(), "irrevocable lease ABANDONED");
        Ok(rec)
    }
}
