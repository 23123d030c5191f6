//! Operators' views of the broker as a whole: the Prometheus exposition
//! with its store-backed gauges refreshed.

use metrics::gauge;

use super::{Broker, BrokerError};
use crate::store::records::{JobState, LeaseState};

impl Broker {
    /// Refresh the store-backed gauges and render the exposition text.
    pub fn render_metrics(&self) -> Result<String, BrokerError> {
        let Some(handle) = crate::metrics::install() else {
            return Ok(String::new());
        };
        let now = self.clock.now().unix_millis();
        let r = self.store.read()?;
        let counters = r.counters()?;
        for name in self.providers.names() {
            for st in LeaseState::ALL {
                let n = counters.get(&(name.to_owned(), st)).copied().unwrap_or(0);
                gauge!("leasehold_leases", "provider" => name.to_owned(), "state" => st.as_str())
                    .set(n as f64);
            }
            let queued = [LeaseState::Revoking, LeaseState::Irrevocable]
                .iter()
                .map(|s| counters.get(&(name.to_owned(), *s)).copied().unwrap_or(0))
                .sum::<u64>();
            gauge!("leasehold_revocation_queue_depth", "provider" => name.to_owned())
                .set(queued as f64);
            let overdue = r.next_revocation(name)?.map_or(0, |due| (now - due).max(0));
            gauge!("leasehold_revocation_queue_oldest_overdue_seconds", "provider" => name.to_owned())
                .set(overdue as f64 / 1000.0);
        }
        gauge!("leasehold_event_chain_head_seq").set(r.chain_head()?.seq as f64);
        let checkpoint_age = r
            .checkpoints_last()?
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .and_then(|v| v["time"].as_str().and_then(crate::clock::parse_rfc3339))
            .map_or(-1.0, |t| (now - t.unix_millis()).max(0) as f64 / 1000.0);
        gauge!("leasehold_event_checkpoint_age_seconds").set(checkpoint_age);
        gauge!("leasehold_approvals_pending").set(r.pending_approvals(100_000)?.len() as f64);
        gauge!("leasehold_fences_active").set(r.fences()?.len() as f64);
        let running = r
            .jobs()?
            .iter()
            .filter(|j| j.state == JobState::Running)
            .count();
        gauge!("leasehold_revocation_jobs_running").set(running as f64);
        drop(r);
        handle.run_upkeep();
        Ok(handle.render())
    }
}
