//! Recovery of intents without activation: at a single broker's start,
//! every one (the process that wrote them is gone); on a cluster's leader,
//! only those no live node can still be issuing.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::audit::{self, Ctx};
use crate::domain::{Broker, BrokerError};
use crate::ids::LeaseId;

/// An intent older than three provider timeouts (and than this) has no live
/// node issuing it: a node's issue takes one timeout at most, then its
/// activation. One that arrives later still finds the intent rolled back,
/// is refused, and rolls its credential back: late is safe, never leaked.
const ORPHAN_MIN_AGE_MS: i64 = 10_000;
/// How often a cluster's leader looks for intents a dead node left.
const ORPHAN_EVERY: Duration = Duration::from_secs(5);

impl Broker {
    /// Start-up recovery: queue a rollback for every unresolved intent. On
    /// a cluster, other nodes may be issuing right now: their intents are
    /// left alone, and the leader recovers orphans instead
    /// ([`Self::recover_orphans`]).
    pub async fn recover(&self) -> Result<usize, BrokerError> {
        if self.leadership().clustered() {
            return Ok(0);
        }
        self.recover_intents(None, None).await
    }

    /// On a cluster's leader: roll back the intents of leases created so
    /// long ago that no node can still be issuing them (a node that died
    /// between intent and activation).
    pub(in crate::domain) async fn recover_orphans(
        &self,
        epoch: u64,
    ) -> Result<usize, BrokerError> {
        let age = i64::try_from(self.provider_timeout().as_millis())
            .unwrap_or(i64::MAX / 4)
            .saturating_mul(3)
            .max(ORPHAN_MIN_AGE_MS);
        let before = self.clock.now().unix_millis().saturating_sub(age);
        self.recover_intents(Some(before), Some(epoch)).await
    }

    async fn recover_intents(
        &self,
        created_before: Option<i64>,
        epoch: Option<u64>,
    ) -> Result<usize, BrokerError> {
        let now = self.clock.now().unix_millis();
        let (local, a) = (self.local.clone(), self.auditor.clone());
        let recovered = self
            .store
            .write(move |t| {
                if let Some(e) = epoch {
                    t.require_leader(e)?;
                }
                let recovered = t.recover_intents(now, created_before, &local)?;
                for l in &recovered {
                    audit::append(t, &a, a.lease(l, &Ctx::system(), now))?;
                }
                Ok(recovered)
            })
            .await?;
        for rec in &recovered {
            tracing::warn!(
                lease_id = %LeaseId(rec.id), provider = %rec.provider, state = rec.state.as_str(),
                "found a lease intent without activation (crash?); rolling it back at the provider"
            );
            self.wakers.revocations_queued(&rec.provider);
        }
        Ok(recovered.len())
    }
}

/// On a cluster's leader: roll back the intents a dead node left (a single
/// broker does this once, at start).
pub(super) async fn orphan_loop(b: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let Some(epoch) = b.leading(&mut shutdown).await else {
            return;
        };
        match b.recover_orphans(epoch).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(recovered = n, "rolled back intents a stopped broker left"),
            Err(e) => tracing::warn!(error = %e, "recovering orphaned intents failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(ORPHAN_EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}
