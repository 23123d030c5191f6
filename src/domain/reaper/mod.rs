//! Expiry and the durable revocation queue (invariants 2 and 3).
//!
//! - The **expiry loop** sleeps until the first deadline of the on-disk
//!   expiry index (or until woken by a sooner lease), then moves every due
//!   lease into the revocation queue in batches. It never scans leases.
//! - One **revocation worker per provider** drains that provider's range of
//!   the queue: it calls the provider, then records each outcome. A failure
//!   is rescheduled with capped exponential backoff and jitter; when the
//!   retry budget is spent the lease becomes `irrevocable` (logged at error,
//!   counted, visible in the API) and is still retried on a slow schedule.
//!   Nothing is ever dropped from the queue except by success.
//! - **Recovery** (`recovery.rs`) queues a rollback for every unresolved
//!   intent at start, or, on a cluster's leader, for the intents a dead node
//!   left.
//!
//! Requests that revoke inline (task completion, manual revoke) use the same
//! execution path ([`Broker::revoke_claimed`]), so there is one place where
//! provider revocations happen and are recorded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use leasehold_provider::{LeaseSpec, Provider, RevocationHandle, RevokeSpec, Timestamp};
use ring::rand::SecureRandom as _;
use tokio::sync::watch;
use tokio::task::JoinSet;

mod recovery;

use crate::audit::{self, Ctx};
use crate::domain::Broker;
use crate::ids::{LeaseId, TaskId};
use crate::store::{LeaseRecord, LeaseState, Outcome};

/// Leases handed to one `revoke_many` call; chunks of a batch run
/// concurrently, a few at a time.
const CHUNK: usize = 512;
const CONCURRENT_CHUNKS: usize = 8;
/// Idle loops re-check at least this often (ms of the broker's clock).
const IDLE_RECHECK_MS: i64 = 60_000;
/// How often expired entries are pruned from the token denylist.
const PRUNE_EVERY_MS: i64 = 60_000;

impl Broker {
    /// Revoke leases this caller has claimed (or the worker found due),
    /// record every outcome, and return the updated records.
    pub async fn revoke_claimed(&self, leases: Vec<LeaseRecord>, ctx: &Ctx) -> Vec<LeaseRecord> {
        self.revoke_and_record(leases, ctx, None).await
    }

    /// [`Self::revoke_claimed`]; with an epoch, the outcomes are recorded
    /// only while this node still leads with it (the queue's workers).
    pub(in crate::domain) async fn revoke_and_record(
        &self,
        leases: Vec<LeaseRecord>,
        ctx: &Ctx,
        epoch: Option<u64>,
    ) -> Vec<LeaseRecord> {
        if leases.is_empty() {
            return leases;
        }
        let mut by_provider: BTreeMap<String, Vec<LeaseRecord>> = BTreeMap::new();
        for l in leases.iter().cloned() {
            by_provider.entry(l.provider.clone()).or_default().push(l);
        }
        let mut outcomes = Vec::with_capacity(leases.len());
        for (provider, group) in by_provider {
            outcomes.extend(self.attempt(&provider, group).await);
        }
        let now = self.clock.now().unix_millis();
        let n = outcomes.len();
        let (a, c) = (self.auditor.clone(), ctx.clone());
        let recorded = self.store.write(move |t| {
            if let Some(e) = epoch {
                t.require_leader(e)?;
            }
            let updated = t.record_outcomes(&outcomes, now)?;
            for l in &updated {
                audit::append(t, &a, a.lease(l, &c, now))?;
            }
            Ok(updated)
        });
        match recorded.await {
            Ok(updated) => {
                for rec in &updated {
                    report_outcome(rec);
                }
                // a retry may now be due sooner than the worker planned
                let mut retrying: Vec<&str> = updated
                    .iter()
                    .filter(|r| !r.state.is_terminal())
                    .map(|r| r.provider.as_str())
                    .collect();
                retrying.dedup();
                for p in retrying {
                    self.wakers.revocations_queued(p);
                }
                updated
            }
            Err(e) => {
                // The queue still holds them: the worker retries later.
                tracing::error!(error = %e, leases = n, "recording revocation outcomes failed; they stay queued");
                leases
            }
        }
    }

    /// Call the provider for each lease; never fails, only reports.
    async fn attempt(&self, provider: &str, leases: Vec<LeaseRecord>) -> Vec<Outcome> {
        let now = self.clock.now().unix_millis();
        let Some(entry) = self.providers.get(provider) else {
            return leases
                .iter()
                .map(|l| {
                    self.failure(
                        l,
                        format!("provider `{provider}` is no longer configured"),
                        now,
                    )
                })
                .collect();
        };
        let mut revokes: Vec<(LeaseRecord, RevokeSpec)> = Vec::new();
        let mut rollbacks: Vec<(LeaseRecord, Option<RevocationHandle>)> = Vec::new();
        for l in leases {
            let uses_rollback = l
                .revocation
                .as_ref()
                .is_none_or(|r| r.cause.uses_rollback());
            let handle = l
                .handle_sealed
                .as_ref()
                .and_then(|h| self.store.sealer().open(l.id, "handle", h).ok())
                .map(|h| RevocationHandle::new(h.to_vec()));
            match (uses_rollback, handle) {
                (false, Some(h)) => {
                    let spec = RevokeSpec {
                        lease_id: LeaseId(l.id).to_string(),
                        role: l.role.clone(),
                        expires_at: Timestamp::from_unix_millis(l.expires_at),
                        handle: h,
                    };
                    revokes.push((l, spec));
                }
                // no final handle: find the credential by lease id (and the
                // prepared handle, when the intent has one) instead
                (_, prepared) => rollbacks.push((l, prepared)),
            }
        }
        let timeout = self.provider_timeout();
        let mut set: JoinSet<Vec<Outcome>> = JoinSet::new();
        let mut out = Vec::new();
        let mut work: Vec<Work> = revokes
            .chunks(CHUNK)
            .map(|c| Work::Revoke(c.to_vec()))
            .chain(rollbacks.chunks(CHUNK).map(|c| Work::Rollback(c.to_vec())))
            .collect();
        work.reverse();
        loop {
            while set.len() < CONCURRENT_CHUNKS
                && let Some(w) = work.pop()
            {
                let p = entry.provider.clone();
                let sched = Schedule::from(self);
                let name = provider.to_owned();
                set.spawn(async move { w.run(p, &name, timeout, sched, now).await });
            }
            match set.join_next().await {
                Some(Ok(o)) => out.extend(o),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "a revocation chunk panicked; its leases stay queued")
                }
                None => break,
            }
        }
        out
    }

    fn failure(&self, l: &LeaseRecord, error: String, now: i64) -> Outcome {
        Schedule::from(self).failure(l, error, now)
    }
}

/// Log a revocation outcome, and count a failed attempt.
fn report_outcome(rec: &LeaseRecord) {
    if matches!(rec.state, LeaseState::Irrevocable | LeaseState::Revoking) {
        crate::metrics::revocation_retry(&rec.provider);
    }
    let id = LeaseId(rec.id);
    let rv = rec.revocation.as_ref();
    let cause = rv.map_or("", |r| r.cause.as_str());
    match rec.state {
        LeaseState::Irrevocable => tracing::error!(
            lease_id = %id, provider = %rec.provider, cause,
            attempts = rv.map_or(0, |r| r.attempts),
            error = rv.and_then(|r| r.last_error.as_deref()).unwrap_or(""),
            "lease IRREVOCABLE: retry budget spent; still retried on the slow schedule"
        ),
        LeaseState::Revoking => tracing::warn!(
            lease_id = %id, provider = %rec.provider, cause,
            attempts = rv.map_or(0, |r| r.attempts),
            error = rv.and_then(|r| r.last_error.as_deref()).unwrap_or(""),
            "revocation failed; retry scheduled"
        ),
        s => {
            tracing::debug!(lease_id = %id, provider = %rec.provider, cause, state = s.as_str(), "lease revoked")
        }
    }
}

/// The retry policy, detached from the broker so chunks can run on their own.
#[derive(Clone)]
struct Schedule(crate::config::ReaperConfig);

impl From<&Broker> for Schedule {
    fn from(b: &Broker) -> Self {
        Self(b.reaper.clone())
    }
}

impl Schedule {
    fn failure(&self, l: &LeaseRecord, error: String, now: i64) -> Outcome {
        let attempts = l.revocation.as_ref().map_or(0, |r| r.attempts) + 1;
        let (at, irrevocable) = retry_schedule(&self.0, attempts, now);
        Outcome::Retry {
            lease: l.id,
            at,
            error,
            irrevocable,
        }
    }
}

/// When to retry after `attempts` failed attempts (including this one),
/// and whether the budget is spent. Exponential from the base, capped, with
/// "equal jitter" (a uniform draw from the upper half of the delay) so a
/// wave of failures does not retry in lockstep.
fn retry_schedule(r: &crate::config::ReaperConfig, attempts: u32, now: i64) -> (i64, bool) {
    if attempts >= r.retry_budget {
        let at = now.saturating_add(
            i64::try_from(r.irrevocable_retry_seconds).unwrap_or(i64::MAX / 2000) * 1000,
        );
        return (at, true);
    }
    let exp = attempts.saturating_sub(1).min(32);
    let delay_s = r
        .retry_base_seconds
        .saturating_mul(1u64 << exp)
        .min(r.retry_cap_seconds);
    let delay_ms = i64::try_from(delay_s.saturating_mul(1000)).unwrap_or(i64::MAX / 2);
    let half = delay_ms / 2;
    let mut b = [0u8; 8];
    let jitter = if ring::rand::SystemRandom::new().fill(&mut b).is_ok() && half > 0 {
        i64::try_from(u64::from_be_bytes(b) % u64::try_from(half + 1).unwrap_or(1)).unwrap_or(0)
    } else {
        0
    };
    (now.saturating_add(delay_ms - half + jitter), false)
}

enum Work {
    Revoke(Vec<(LeaseRecord, RevokeSpec)>),
    Rollback(Vec<(LeaseRecord, Option<RevocationHandle>)>),
}

impl Work {
    /// `now` is when the attempt started; retries are scheduled from it.
    async fn run(
        self,
        p: Arc<dyn Provider>,
        name: &str,
        timeout: Duration,
        sched: Schedule,
        now: i64,
    ) -> Vec<Outcome> {
        match self {
            Work::Revoke(items) => {
                let specs: Vec<RevokeSpec> = items.iter().map(|(_, s)| s.clone()).collect();
                let started = std::time::Instant::now();
                let results = tokio::time::timeout(timeout, p.revoke_many_noted(&specs)).await;
                let class = match &results {
                    Err(_) => Some("timeout"),
                    Ok(rs) => rs.iter().find_map(|r| r.as_ref().err()).map(error_class),
                };
                crate::metrics::provider_call(
                    name,
                    "revoke",
                    started.elapsed().as_secs_f64(),
                    class,
                );
                items
                    .iter()
                    .enumerate()
                    .map(|(i, (l, _))| match &results {
                        Ok(rs) => match rs.get(i) {
                            Some(Ok(note)) => Outcome::Done {
                                lease: l.id,
                                note: note.clone(),
                            },
                            Some(Err(e)) => sched.failure(l, e.message.clone(), now),
                            None => sched.failure(
                                l,
                                "the provider returned too few results".into(),
                                now,
                            ),
                        },
                        Err(_) => {
                            sched.failure(l, "the provider did not answer in time".into(), now)
                        }
                    })
                    .collect()
            }
            Work::Rollback(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (l, prepared) in items {
                    let spec = LeaseSpec {
                        prepared,
                        ..spec_of(&l)
                    };
                    let started = std::time::Instant::now();
                    let result = tokio::time::timeout(timeout, p.rollback_noted(&spec)).await;
                    let class = match &result {
                        Err(_) => Some("timeout"),
                        Ok(r) => r.as_ref().err().map(error_class),
                    };
                    crate::metrics::provider_call(
                        name,
                        "rollback",
                        started.elapsed().as_secs_f64(),
                        class,
                    );
                    let o = match result {
                        Ok(Ok(note)) => Outcome::Done { lease: l.id, note },
                        Ok(Err(e)) => sched.failure(&l, e.message, now),
                        Err(_) => {
                            sched.failure(&l, "the provider did not answer in time".into(), now)
                        }
                    };
                    out.push(o);
                }
                out
            }
        }
    }
}

/// The provider-facing description of a stored lease.
pub(crate) fn spec_of(rec: &LeaseRecord) -> LeaseSpec {
    LeaseSpec {
        lease_id: LeaseId(rec.id).to_string(),
        task_id: TaskId(rec.task_id).to_string(),
        workload: rec.workload.clone(),
        tenant: rec.tenant.clone(),
        on_behalf_of: rec.on_behalf_of.clone(),
        role: rec.role.clone(),
        scope: rec.scope.clone(),
        issued_at: Timestamp::from_unix_millis(rec.issued_at.unwrap_or(rec.created_at)),
        expires_at: Timestamp::from_unix_millis(rec.expires_at),
        prepared: None,
        binding: None,
    }
}

/// The error class as a bounded metric label.
pub(crate) fn error_class(e: &leasehold_provider::ProviderError) -> &'static str {
    if e.is_retryable() {
        "retryable"
    } else {
        "permanent"
    }
}

/// Start the expiry loop, one revocation worker per provider, and the
/// maintenance loop. They stop when `shutdown` turns true.
pub fn spawn(
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut handles = vec![tokio::spawn(expiry_loop(broker.clone(), shutdown.clone()))];
    for name in broker.providers.names() {
        handles.push(tokio::spawn(worker_loop(
            broker.clone(),
            name.to_owned(),
            shutdown.clone(),
        )));
    }
    if broker.reaper.reconcile_interval_seconds > 0 {
        handles.push(tokio::spawn(reconcile_loop(
            broker.clone(),
            shutdown.clone(),
        )));
    }
    if broker.leadership().clustered() {
        handles.push(tokio::spawn(recovery::orphan_loop(
            broker.clone(),
            shutdown.clone(),
        )));
    }
    handles.extend(crate::domain::retention::spawn(
        broker.clone(),
        shutdown.clone(),
    ));
    handles.push(tokio::spawn(maintenance_loop(broker, shutdown)));
    handles
}

async fn pause_after_error(shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(1)) => false,
        _ = shutdown.changed() => true,
    }
}

async fn expiry_loop(b: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    let batch = b.reaper.batch_size;
    loop {
        let Some(epoch) = b.leading(&mut shutdown).await else {
            return;
        };
        // Any lease activated from here on wakes us: see Wakers::lease_activated.
        b.wakers.planned_expiry.store(i64::MIN, Ordering::Release);
        let mut failed = false;
        loop {
            let (local, clock, a) = (b.local.clone(), b.clock.clone(), b.auditor.clone());
            // the time is read when the batch is applied, so a lease's
            // `ended_at` is when it really died, and nothing due by then waits
            let pass = b.store.write(move |t| {
                t.require_leader(epoch)?;
                let now = clock.now().unix_millis();
                let pass = t.expire_due(now, batch, &local)?;
                for l in &pass.handled {
                    audit::append(t, &a, a.lease(l, &Ctx::system(), now))?;
                }
                Ok(pass)
            });
            match pass.await {
                Ok(pass) => {
                    for p in &pass.queued_providers {
                        b.wakers.revocations_queued(p);
                    }
                    if !pass.handled.is_empty() {
                        tracing::debug!(
                            expired = pass.handled.len(),
                            "expired leases revoked or queued"
                        );
                    }
                    if pass.scanned < batch {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "expiry pass failed");
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            if pause_after_error(&mut shutdown).await {
                return;
            }
            continue;
        }
        let next = match b.store.read().and_then(|r| r.next_expiry()) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "reading the expiry index failed");
                if pause_after_error(&mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        // approvals expire on the same loop
        let next_approval = match b.expire_approvals(epoch).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "expiring approvals failed");
                None
            }
        };
        let now = b.clock.now().unix_millis();
        let wake = next
            .unwrap_or(i64::MAX)
            .min(next_approval.unwrap_or(i64::MAX))
            .min(now.saturating_add(IDLE_RECHECK_MS));
        b.wakers
            .planned_expiry
            .store(next.unwrap_or(i64::MAX), Ordering::Release);
        tokio::select! {
            _ = b.clock.sleep_until(Timestamp::from_unix_millis(wake)) => {}
            _ = b.wakers.expiry.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn worker_loop(b: Arc<Broker>, provider: String, mut shutdown: watch::Receiver<bool>) {
    let batch = b.reaper.batch_size;
    loop {
        let Some(epoch) = b.leading(&mut shutdown).await else {
            return;
        };
        let now = b.clock.now().unix_millis();
        let due = match b
            .store
            .read()
            .and_then(|r| r.due_revocations(&provider, now, batch))
        {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(provider = %provider, error = %e, "reading the revocation queue failed");
                if pause_after_error(&mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        if !due.is_empty() {
            let ids: Vec<u128> = due.iter().map(|l| l.id).collect();
            let updated = b.revoke_and_record(due, &Ctx::system(), Some(epoch)).await;
            // nothing recorded (store trouble): back off instead of spinning
            let progressed = updated
                .iter()
                .any(|u| ids.contains(&u.id) && u.state != LeaseState::Revoking)
                || updated.iter().any(|u| {
                    u.revocation
                        .as_ref()
                        .is_some_and(|r| r.next_attempt_at > now)
                });
            if !progressed && pause_after_error(&mut shutdown).await {
                return;
            }
            continue;
        }
        let next = b
            .store
            .read()
            .and_then(|r| r.next_revocation(&provider))
            .ok()
            .flatten();
        let wake = next
            .unwrap_or(i64::MAX)
            .min(now.saturating_add(IDLE_RECHECK_MS));
        let Some(notify) = b.wakers.workers.get(&provider) else {
            return;
        };
        tokio::select! {
            _ = b.clock.sleep_until(Timestamp::from_unix_millis(wake)) => {}
            _ = notify.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Periodic reconciliation (report only).
async fn reconcile_loop(b: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    let every = i64::try_from(b.reaper.reconcile_interval_seconds)
        .unwrap_or(i64::MAX / 1000)
        .saturating_mul(1000);
    loop {
        let now = b.clock.now().unix_millis();
        tokio::select! {
            _ = b.clock.sleep_until(Timestamp::from_unix_millis(now.saturating_add(every))) => {}
            _ = shutdown.changed() => return,
        }
        if b.leader_epoch().is_some() {
            b.reconcile_all_periodic().await;
        }
    }
}

async fn maintenance_loop(b: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let Some(epoch) = b.leading(&mut shutdown).await else {
            return;
        };
        let now = b.clock.now().unix_millis();
        let horizon = i64::try_from(b.limits.max_lease_ttl_seconds)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000)
            + 2000;
        match b
            .store
            .write(move |t| {
                t.require_leader(epoch)?;
                t.prune_denylist(now, horizon, 10_000)
            })
            .await
        {
            Ok(n) if n > 0 => tracing::debug!(pruned = n, "pruned expired token denylist entries"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning the token denylist failed"),
        }
        tokio::select! {
            _ = b.clock.sleep_until(Timestamp::from_unix_millis(now + PRUNE_EVERY_MS)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReaperConfig;

    #[test]
    fn backoff_grows_caps_jitters_and_ends_irrevocable() {
        let r = ReaperConfig {
            retry_base_seconds: 1,
            retry_cap_seconds: 60,
            retry_budget: 10,
            ..Default::default()
        };
        let now = 1_000_000;
        for attempts in 1..10u32 {
            let full = (1000i64 << (attempts - 1)).min(60_000);
            for _ in 0..50 {
                let (at, irrevocable) = retry_schedule(&r, attempts, now);
                assert!(!irrevocable);
                let d = at - now;
                assert!(
                    d >= full / 2 && d <= full,
                    "attempt {attempts}: {d} not in [{}, {full}]",
                    full / 2
                );
            }
        }
        let (at, irrevocable) = retry_schedule(&r, 10, now);
        assert!(irrevocable);
        assert_eq!(at - now, 86_400_000);
        // jitter really varies
        let set: std::collections::HashSet<i64> =
            (0..50).map(|_| retry_schedule(&r, 6, now).0).collect();
        assert!(set.len() > 10);
    }
}
