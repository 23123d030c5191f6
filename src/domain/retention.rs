//! Retention: what ended before the window (`[retention]`) leaves the
//! store, so a broker running for months stays the size of its window.
//!
//! The leader runs a pass every `retention.interval_seconds`:
//! 1. ended tasks, each with its calls, leases, approvals and review, in
//!    batches of at most `batch_records` records, one store transaction
//!    each, each recording `retention.removed` (what, how many, which
//!    tasks) in that transaction. Nothing live goes (`RetentionWrites`).
//! 2. finished revocation jobs with their claims, the same way.
//! 3. with archiving on, events older than the window (and than
//!    `audit.prune_min_age_seconds`) are written to an archive in
//!    `audit.archive_dir`, verified, and pruned in steps of
//!    `prune_step_events`, each step a `chain.pruned` naming the archive
//!    (`domain::events`).
//!
//! Each batch checks the leader's epoch in its transaction. Between
//! batches the pass pauses as long as the batch took, so it never takes
//! more than half the writer's time however large the backlog.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::audit::EventKind;
use crate::clock::Timestamp;
use crate::store::seam::Removed;
use crate::store::{ReadTxn, StoreError};

use super::{Broker, BrokerError};

/// What one pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    pub tasks: u64,
    pub leases: u64,
    pub calls: u64,
    pub approvals: u64,
    pub reviews: u64,
    /// Tasks ended before the cutoff but kept (something still live).
    pub kept: u64,
    pub jobs: u64,
    pub events: u64,
    /// Store transactions the pass took (prune steps included).
    pub batches: u64,
    /// The longest any of them held the writer.
    pub longest_batch: Duration,
    pub archives: Vec<std::path::PathBuf>,
}

impl Pass {
    fn add(&mut self, r: &Removed) {
        self.tasks += r.tasks;
        self.leases += r.leases;
        self.calls += r.calls;
        self.approvals += r.approvals;
        self.reviews += r.reviews;
        self.kept += r.kept;
    }
}

fn millis(seconds: u64) -> i64 {
    i64::try_from(seconds)
        .unwrap_or(i64::MAX / 1000)
        .saturating_mul(1000)
}

/// The time an event records, in ms.
fn event_time(r: &dyn ReadTxn, seq: u64) -> Result<Option<i64>, StoreError> {
    #[derive(serde::Deserialize)]
    struct Time {
        time: String,
    }
    let Some(e) = r
        .events_after(seq.saturating_sub(1), 1)?
        .into_iter()
        .find(|e| e.seq == seq)
    else {
        return Ok(None);
    };
    let t: Time = serde_json::from_slice(&e.bytes)
        .map_err(|err| StoreError::Corrupt(format!("event {seq}: {err}")))?;
    Ok(crate::clock::parse_rfc3339(&t.time).map(Timestamp::unix_millis))
}

/// The last event in `from..=to` older than `cutoff`, by bisection (the
/// chain is in time order, to the millisecond of requests rendered
/// concurrently), or `None` if `from` is not.
fn last_before(
    r: &dyn ReadTxn,
    from: u64,
    to: u64,
    cutoff: i64,
) -> Result<Option<u64>, StoreError> {
    let older = |seq| event_time(r, seq).map(|t| t.is_some_and(|t| t < cutoff));
    if from > to || !older(from)? {
        return Ok(None);
    }
    let (mut lo, mut hi) = (from, to);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if older(mid)? {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok(Some(lo))
}

/// Record what a batch removed (`retention.removed`), in its transaction,
/// with the cutoff it removed before.
fn record_removed(
    t: &mut crate::store::Txn<'_>,
    a: &crate::audit::Auditor,
    now: i64,
    cutoff: i64,
    mut data: crate::audit::EventData,
) -> Result<(), StoreError> {
    data.insert(
        "ended_before".into(),
        crate::clock::rfc3339(Timestamp::from_unix_millis(cutoff)).into(),
    );
    crate::audit::append(t, a, a.broker(EventKind::RetentionRemoved, now, None, data))
}

impl Broker {
    /// One retention pass as the leader with `epoch` (see the module).
    pub async fn retention_pass(&self, epoch: u64) -> Result<Pass, BrokerError> {
        let now = self.clock.now().unix_millis();
        let cutoff = now.saturating_sub(millis(self.retention.keep_ended_seconds));
        let max = self.retention.batch_records;
        let mut pass = Pass::default();
        let mut cursor = None;
        loop {
            let a = self.auditor.clone();
            let started = Instant::now();
            let (r, held) = self
                .store
                .write(move |t| {
                    let held = Instant::now();
                    t.require_leader(epoch)?;
                    let r = t.remove_ended_tasks(cutoff, cursor, max, max)?;
                    if r.records() > 0 {
                        let id = |v: Option<u128>| v.map(|v| crate::ids::TaskId(v).to_string());
                        let data = crate::event_data![
                            ("tasks", r.tasks),
                            ("leases", r.leases),
                            ("calls", r.calls),
                            ("approvals", r.approvals),
                            ("reviews", r.reviews),
                            ("first_task", id(r.first)),
                            ("last_task", id(r.last_removed)),
                            ("part_of_task", id(r.part_of)),
                        ];
                        record_removed(t, &a, now, cutoff, data)?;
                    }
                    Ok((r, held.elapsed()))
                })
                .await?;
            self.paced(started, held, &mut pass).await;
            pass.add(&r);
            for (kind, n) in [
                ("tasks", r.tasks),
                ("leases", r.leases),
                ("calls", r.calls),
                ("approvals", r.approvals),
                ("reviews", r.reviews),
            ] {
                crate::metrics::retention_removed(kind, n);
            }
            if r.done {
                break;
            }
            cursor = r.cursor;
        }
        loop {
            let a = self.auditor.clone();
            let started = Instant::now();
            let (jobs, entries, held) = self
                .store
                .write(move |t| {
                    let held = Instant::now();
                    t.require_leader(epoch)?;
                    let (jobs, entries) = t.remove_ended_jobs(cutoff, max)?;
                    if entries > 0 {
                        let data = crate::event_data![("jobs", jobs), ("job_entries", entries)];
                        record_removed(t, &a, now, cutoff, data)?;
                    }
                    Ok((jobs, entries, held.elapsed()))
                })
                .await?;
            self.paced(started, held, &mut pass).await;
            pass.jobs += jobs;
            crate::metrics::retention_removed("jobs", jobs);
            if entries < max as u64 {
                break;
            }
        }
        self.archive_old_events(epoch, now, &mut pass).await?;
        crate::metrics::retention_removed("events", pass.events);
        Ok(pass)
    }

    /// Count a batch that held the writer for `held`, and pause as long as
    /// it took from here (at least a millisecond), so a backlog never takes
    /// more than half the writer.
    async fn paced(&self, started: Instant, held: Duration, pass: &mut Pass) {
        pass.batches += 1;
        pass.longest_batch = pass.longest_batch.max(held);
        tokio::time::sleep(started.elapsed().max(Duration::from_millis(1))).await;
    }

    /// Archive and prune the events older than the window, in archives of
    /// at most `archive_max_events`.
    async fn archive_old_events(
        &self,
        epoch: u64,
        now: i64,
        pass: &mut Pass,
    ) -> Result<(), BrokerError> {
        let Some(dir) = self.archive_dir.clone() else {
            return Ok(());
        };
        if !self.retention.archives_events(Some(&dir)) {
            return Ok(());
        }
        let keep = millis(self.retention.keep_ended_seconds)
            .max(i64::try_from(self.prune_min_age.as_millis()).unwrap_or(i64::MAX));
        let cutoff = now.saturating_sub(keep);
        loop {
            let info = self.chain_state()?;
            let last = info.head.seq.min(
                info.base
                    .seq
                    .saturating_add(self.retention.archive_max_events),
            );
            let reader = self.store.read()?;
            let from = info.base.seq + 1;
            let through =
                tokio::task::spawn_blocking(move || last_before(&*reader, from, last, cutoff))
                    .await
                    .map_err(|e| {
                        BrokerError::Store(StoreError::Io(format!("reader task: {e}")))
                    })??;
            let Some(through) = through else {
                return Ok(());
            };
            let a = self
                .archive_through(&dir, &info, through, Some(epoch), "retention".into(), None)
                .await?;
            pass.events += a.pruned;
            pass.batches += a.steps;
            pass.longest_batch = pass.longest_batch.max(a.longest_step);
            pass.archives.push(a.archive);
            if through < last || last == info.head.seq {
                return Ok(());
            }
        }
    }
}

/// Start the retention loop (when retention is on).
pub fn spawn(
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    broker
        .retention
        .enabled
        .then(|| tokio::spawn(run(broker, shutdown)))
}

async fn run(b: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    let every = Duration::from_secs(b.retention.interval_seconds.max(1));
    loop {
        let Some(epoch) = b.leading(&mut shutdown).await else {
            return;
        };
        let started = Instant::now();
        match b.retention_pass(epoch).await {
            Ok(p) => {
                if p.tasks + p.jobs + p.events > 0 {
                    tracing::info!(
                        tasks = p.tasks,
                        leases = p.leases,
                        calls = p.calls,
                        approvals = p.approvals,
                        jobs = p.jobs,
                        events = p.events,
                        kept = p.kept,
                        batches = p.batches,
                        archives = ?p.archives,
                        longest_batch_ms = p.longest_batch.as_secs_f64() * 1000.0,
                        took_ms = started.elapsed().as_millis() as u64,
                        "retention removed what ended before the window"
                    );
                }
                let at = b.clock.now().unix_millis() as f64 / 1000.0;
                crate::metrics::retention_pass(true, at);
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention stopped on an error; retried at the next interval");
                crate::metrics::retention_pass(false, 0.0);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every.saturating_sub(started.elapsed())) => {}
            _ = shutdown.changed() => return,
        }
    }
}
