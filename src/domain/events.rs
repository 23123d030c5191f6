//! The event chain as operators read it: filtered pages, verification
//! now, the chain's base, head and checkpoints, and pruning of archived
//! events. Admin and responder read; only admin prunes.

use crate::audit::query::{EventQuery, page, verify_store};
use crate::audit::verify::VerifyReport;
use crate::audit::{Ctx, EventKind};
use crate::auth::Caller;
use crate::clock::Timestamp;
use crate::config::OperatorRole;

use super::{Broker, BrokerError};

/// What a reader asks of the chain (decoded and checked by the caller).
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub task: Option<u128>,
    /// The lease as written (events name it), and its id.
    pub lease: Option<(String, u128)>,
    pub workload: Option<String>,
    pub user: Option<String>,
    pub kind: Option<EventKind>,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub after: u64,
    pub limit: usize,
}

/// Where the chain starts and ends, and what vouches for it.
#[derive(Debug, Clone)]
pub struct ChainInfo {
    pub base: crate::store::ChainHead,
    pub head: crate::store::ChainHead,
    /// The public key checkpoints verify with, as text.
    pub checkpoint_key: Option<String>,
    pub checkpoints: Vec<serde_json::Value>,
}

/// Events examined per page at most.
const SCAN_BUDGET: usize = 20_000;

fn chain_reader(caller: &Caller) -> Result<(), BrokerError> {
    if Broker::is_reader(caller) {
        Ok(())
    } else {
        Err(BrokerError::Forbidden {
            code: "forbidden",
            message: "the event chain is for the admin and responder roles".into(),
        })
    }
}

fn chain_pruner(caller: &Caller) -> Result<(), BrokerError> {
    if caller.has_any_role(&[OperatorRole::Admin]) {
        Ok(())
    } else {
        Err(BrokerError::Forbidden {
            code: "forbidden",
            message: "pruning the chain needs the admin role".into(),
        })
    }
}

/// Run a read that may walk many blocks off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BrokerError::Store(crate::store::StoreError::Io(format!("reader task: {e}"))))?
        .map_err(BrokerError::from)
}

impl Broker {
    /// Whether the caller may read the chain (asked before its request is
    /// decoded, so a caller without the role learns nothing of its shape).
    pub fn may_read_chain(&self, caller: &Caller) -> Result<(), BrokerError> {
        chain_reader(caller)
    }

    /// Whether the caller may prune the chain.
    pub fn may_prune_chain(&self, caller: &Caller) -> Result<(), BrokerError> {
        chain_pruner(caller)
    }

    /// One page of events in chain order, and the cursor of the next.
    /// Workload and user filters match the chain's (possibly keyed) form.
    pub async fn events(
        &self,
        caller: &Caller,
        f: EventFilter,
    ) -> Result<(Vec<serde_json::Value>, Option<u64>), BrokerError> {
        chain_reader(caller)?;
        let reader = self.store.read()?;
        let lease_task = match &f.lease {
            Some((_, id)) => Some(reader.lease(*id)?.map_or(0, |r| r.task_id)),
            None => None,
        };
        let a = &self.auditor;
        let q = EventQuery {
            task: f.task,
            lease: f.lease.map(|(text, _)| text),
            lease_task,
            workload: f.workload.as_deref().map(|w| a.workload(w)),
            user: f.user.as_deref().map(|u| a.user(u)),
            kind: f.kind,
            since: f.since,
            until: f.until,
            after: f.after,
            limit: f.limit,
            scan_budget: SCAN_BUDGET,
        };
        blocking(move || page(&*reader, &q)).await
    }

    /// Verify the whole chain and every checkpoint, now.
    pub async fn verify_chain(&self, caller: &Caller) -> Result<VerifyReport, BrokerError> {
        chain_reader(caller)?;
        let reader = self.store.read()?;
        let trusted = self
            .checkpoint_key
            .as_ref()
            .map(|k| k.public_key().to_vec());
        let report = blocking(move || verify_store(&*reader, trusted)).await?;
        if !report.ok {
            tracing::error!(first_break = ?report.first_break, "the event chain does not verify");
        }
        Ok(report)
    }

    /// The chain's base and head, its checkpoints and their key.
    pub fn chain_info(&self, caller: &Caller) -> Result<ChainInfo, BrokerError> {
        chain_reader(caller)?;
        let r = self.store.read()?;
        let checkpoints = r
            .checkpoints()?
            .into_iter()
            .map(|(_, bytes)| {
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .unwrap_or(serde_json::Value::Null)
            })
            .collect();
        Ok(ChainInfo {
            base: r.chain_base()?,
            head: r.chain_head()?,
            checkpoint_key: self.checkpoint_key.as_ref().map(|k| k.public_key_text()),
            checkpoints,
        })
    }

    /// Drop archived events up to `through` (admin). The caller proves it
    /// holds the archive by naming the hash of its last event; the prune
    /// is recorded on the chain in the same transaction.
    pub async fn prune_events(
        &self,
        caller: &Caller,
        ctx: &Ctx,
        through: u64,
        last_hash: [u8; 32],
    ) -> Result<u64, BrokerError> {
        chain_pruner(caller)?;
        // nothing younger than the minimum age, whatever the caller holds:
        // the chain cannot be emptied from the API
        let last = self
            .events(
                caller,
                EventFilter {
                    after: through.saturating_sub(1),
                    limit: 1,
                    ..EventFilter::default()
                },
            )
            .await?
            .0
            .into_iter()
            .next();
        let at = last
            .as_ref()
            .filter(|e| e.get("seq").and_then(serde_json::Value::as_u64) == Some(through))
            .and_then(|e| e.get("time").and_then(serde_json::Value::as_str))
            .and_then(crate::clock::parse_rfc3339);
        let newest_allowed = self.clock.now().unix_millis()
            - i64::try_from(self.prune_min_age.as_millis()).unwrap_or(i64::MAX);
        if let Some(at) = at
            && at.unix_millis() > newest_allowed
        {
            return Err(BrokerError::invalid(
                "prune_too_recent",
                format!(
                    "event {through} is younger than audit.prune_min_age_seconds ({} s): events are kept at least that long",
                    self.prune_min_age.as_secs()
                ),
            ));
        }
        let (a, now) = (self.auditor.clone(), self.clock.now().unix_millis());
        let (by, rid) = (caller.principal(), ctx.request_id.clone());
        let removed = self
            .store
            .write(move |t| {
                let removed = t.prune_events(through, &last_hash)?;
                let data = crate::event_data![
                    ("through_seq", through),
                    ("last_hash", crate::hex::encode(&last_hash)),
                    ("removed", removed),
                    ("by", by),
                ];
                crate::audit::append(t, &a, a.broker(EventKind::ChainPruned, now, rid, data))?;
                Ok(removed)
            })
            .await?;
        Ok(removed)
    }
}
