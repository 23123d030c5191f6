//! Write operations, each applied inside a shared (group-committed) write
//! transaction.
//!
//! Rule for every operation here: **check, then write**. An operation reads
//! and validates everything first and returns a [`StoreError::Conflict`]
//! before its first mutation, so a rejected operation leaves nothing behind
//! in the batch it shares with others. A storage error after a mutation has
//! begun poisons the whole transaction, which is then aborted: every
//! operation of the batch fails and none is committed.
//!
//! A lease, its index entries and its counters always change in the same
//! operation, hence in the same transaction (DESIGN.md: a lease record, its
//! expiry-index entry and its task-index entry commit together).

use std::collections::BTreeMap;

use redb::WriteTransaction;

use super::blocks::{self, BlockBuf};
use super::codec;
use super::records::{
    self, ApprovalRecord, ApprovalState, CallRecord, FenceRecord, JobRecord, LeaseRecord,
    LeaseState, ReviewRecord, Revocation, RevokeCause, TaskRecord, TaskState,
};
use super::schema::*;
use super::wal::{Logged, Redo};
use super::{Conflict, StoreError};

/// The outcome of one revocation attempt, as decided by the reaper.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The provider confirmed: the lease reaches its terminal state.
    /// `note`: how, when the provider can revoke more than one way; it is
    /// appended to the lease's description (and so to its event).
    Done { lease: u128, note: Option<String> },
    /// It failed: try again at `at`. `irrevocable` marks that the retry
    /// budget is spent (the lease keeps being retried, slowly).
    Retry {
        lease: u128,
        at: i64,
        error: String,
        irrevocable: bool,
    },
}

/// What activation writes.
#[derive(Debug, Clone)]
pub struct Activation {
    pub lease: u128,
    pub handle_sealed: Vec<u8>,
    pub issued_at: i64,
    pub expires_at: i64,
    pub description: String,
}

impl Activation {
    /// The record this activation makes of its `issuing` intent.
    pub fn apply(&self, rec: &mut LeaseRecord) {
        rec.state = LeaseState::Active;
        rec.handle_sealed = Some(self.handle_sealed.clone());
        rec.issued_at = Some(self.issued_at);
        rec.expires_at = self.expires_at;
        rec.description = Some(self.description.clone());
    }
}

/// The revocation `why` asks for at `now`, carrying over what the lease's
/// earlier revocation knew: its attempts, last error and job. The cause is
/// a job's, else the one it already has (a lease being revoked keeps its
/// first cause), else `why.cause`.
fn revocation(rec: &LeaseRecord, why: Why<'_>, now: i64) -> Revocation {
    let earlier = rec.revocation.as_ref();
    let cause = match (why.job, rec.state, earlier) {
        (Some(_), _, _) => RevokeCause::Job,
        (None, LeaseState::Irrevocable | LeaseState::Revoking, Some(r)) => r.cause,
        _ => why.cause,
    };
    Revocation {
        cause,
        requested_by: why.by.map(str::to_owned),
        requested_at: now,
        attempts: earlier.map_or(0, |r| r.attempts),
        next_attempt_at: now,
        last_error: earlier.and_then(|r| r.last_error.clone()),
        job: why.job.or_else(|| earlier.and_then(|r| r.job)),
    }
}

/// The record a lease becomes when it is queued for revocation at `at`.
/// The store writes it; task completion uses it to render events ahead
/// (as activation uses `Activation::apply`).
pub fn queued_revocation(mut rec: LeaseRecord, why: Why<'_>, now: i64, at: i64) -> LeaseRecord {
    rec.revocation = Some(Revocation {
        next_attempt_at: at,
        ..revocation(&rec, why, now)
    });
    rec.state = LeaseState::Revoking;
    rec
}

/// The record a lease of a local provider becomes when it is revoked in
/// the transaction.
pub fn local_revocation(mut rec: LeaseRecord, why: Why<'_>, now: i64) -> LeaseRecord {
    let r = revocation(&rec, why, now);
    rec.state = r.cause.terminal_state();
    rec.ended_at = Some(now);
    rec.handle_sealed = None;
    rec.revocation = Some(Revocation {
        attempts: r.attempts + 1,
        last_error: None,
        ..r
    });
    rec
}

/// Result of a task completion: the task, the leases this completion claimed
/// for immediate revocation, those it revoked in the transaction (local
/// providers), and every lease of the task.
#[derive(Debug)]
pub struct Completion {
    pub task: TaskRecord,
    pub claimed: Vec<LeaseRecord>,
    pub revoked: Vec<LeaseRecord>,
    pub all: Vec<LeaseRecord>,
}

/// What a revocation request did: the lease as it is now, whether it was
/// queued (for the caller to attempt) and whether anything changed.
#[derive(Debug)]
pub struct RevokeRequest {
    pub rec: LeaseRecord,
    pub queued: bool,
    pub changed: bool,
}

/// What one expiry pass did.
#[derive(Debug, Default)]
pub struct ExpiryPass {
    /// Index entries looked at (the pass is complete when fewer than asked).
    pub scanned: usize,
    /// Leases revoked (local providers) or queued, as they are now.
    pub handled: Vec<LeaseRecord>,
    /// Providers with newly queued revocations.
    pub queued_providers: Vec<String>,
}

/// Why a lease is being revoked, and by whom.
#[derive(Clone, Copy, Debug)]
pub struct Why<'a> {
    pub cause: RevokeCause,
    pub by: Option<&'a str>,
    pub job: Option<u128>,
}

impl Why<'_> {
    pub fn of(cause: RevokeCause) -> Self {
        Self {
            cause,
            by: None,
            job: None,
        }
    }
}

/// Providers whose revocation is local to this store (the token provider):
/// their leases are revoked inside the transaction that decides it.
pub type Local = std::collections::BTreeSet<String>;

/// Something that takes its place in the event chain (`audit::Pending`):
/// the store links and stores it without knowing its format.
pub trait Chained {
    /// Append the bytes of the event at `seq` after `prev` to `out`, and
    /// return their hash.
    fn seal_into(&self, seq: u64, prev: &[u8; 32], out: &mut Vec<u8>) -> [u8; 32];
    /// At most how many bytes `seal_into` appends (an event block is closed
    /// before an event would take it past its size).
    fn size_hint(&self) -> usize;
    /// The task the event belongs to, for the per-task index.
    fn task(&self) -> Option<u128>;
}

/// The last event of the chain (seq 0 and a zero hash before the first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl ChainHead {
    pub fn to_bytes(self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[..8].copy_from_slice(&self.seq.to_be_bytes());
        b[8..].copy_from_slice(&self.hash);
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let seq = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
        let hash = b.get(8..40)?.try_into().ok()?;
        Some(Self { seq, hash })
    }
}

pub struct Txn<'t> {
    meta: Logged<'t, &'static str, &'static [u8]>,
    /// Event blocks (see [`super::blocks`]).
    events: Logged<'t, u64, &'static [u8]>,
    /// The events appended since the last block was written.
    block: BlockBuf,
    event_tasks: Logged<'t, (u128, u64), ()>,
    checkpoints: Logged<'t, u64, &'static [u8]>,
    /// Calls, keyed by (task id, call id).
    calls: Logged<'t, (u128, u128), &'static [u8]>,
    approvals: Logged<'t, u128, &'static [u8]>,
    approval_expiry: Logged<'t, (i64, u128), ()>,
    reviews: Logged<'t, u128, &'static [u8]>,
    pending_reviews: Logged<'t, u128, ()>,
    workload_active: Logged<'t, &'static str, u64>,
    task_active: Logged<'t, u128, u64>,
    jobs: Logged<'t, u128, &'static [u8]>,
    job_leases: Logged<'t, (u128, u128), ()>,
    job_counts: Logged<'t, (u128, &'static str, &'static str), u64>,
    fences: Logged<'t, &'static str, &'static [u8]>,
    workload_tasks: Logged<'t, (&'static str, u128), ()>,
    active_deltas: BTreeMap<String, i64>,
    task_deltas: BTreeMap<u128, i64>,
    job_deltas: BTreeMap<(u128, String, &'static str), i64>,
    /// Leases that entered each state in this transaction (for metrics,
    /// reported once the commit succeeds).
    entered: BTreeMap<(String, LeaseState), u64>,
    head: ChainHead,
    head_dirty: bool,
    tasks: Logged<'t, u128, &'static [u8]>,
    leases: Logged<'t, u128, &'static [u8]>,
    expiry: Logged<'t, (i64, u128), ()>,
    task_leases: Logged<'t, (u128, u128), ()>,
    workload_leases: Logged<'t, (&'static str, u128), ()>,
    issuing: Logged<'t, u128, ()>,
    queue: Logged<'t, (&'static str, i64, u128), ()>,
    counters: Logged<'t, (&'static str, &'static str), u64>,
    denylist: Logged<'t, u128, i64>,
    deltas: BTreeMap<(String, LeaseState), i64>,
    poisoned: bool,
    /// What every table above recorded, for the write-ahead log.
    redo: Redo,
}

impl std::fmt::Debug for Txn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn")
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

/// Count the events of a block up to `through` (a prune), adding the index
/// entries they own (each task's first event in the block) to `unindexed`.
fn pruned_of(
    key: u64,
    block: &[u8],
    through: u64,
    unindexed: &mut Vec<(u128, u64)>,
) -> Result<u64, StoreError> {
    let mut count = 0;
    let mut tasks: Vec<u128> = Vec::new();
    for e in blocks::entries(key, block) {
        let e = e?;
        if e.seq > through {
            break;
        }
        count += 1;
        if e.task != 0 && !tasks.contains(&e.task) {
            tasks.push(e.task);
            unindexed.push((e.task, e.seq));
        }
    }
    Ok(count)
}

fn conflict<T>(c: Conflict) -> Result<T, StoreError> {
    Err(StoreError::Conflict(c))
}

impl<'t> Txn<'t> {
    /// The batch's view of the store; tables open as operations first use
    /// them.
    pub fn open(txn: &'t WriteTransaction, head: ChainHead) -> Self {
        let redo = Redo::default();
        Self {
            meta: Logged::open(txn, META, &redo),
            events: Logged::open(txn, EVENT_BLOCKS, &redo),
            block: BlockBuf::default(),
            event_tasks: Logged::open(txn, EVENT_TASKS, &redo),
            checkpoints: Logged::open(txn, CHECKPOINTS, &redo),
            calls: Logged::open(txn, TASK_CALLS, &redo),
            approvals: Logged::open(txn, APPROVALS, &redo),
            approval_expiry: Logged::open(txn, APPROVAL_EXPIRY, &redo),
            reviews: Logged::open(txn, REVIEWS, &redo),
            pending_reviews: Logged::open(txn, PENDING_REVIEWS, &redo),
            workload_active: Logged::open(txn, WORKLOAD_ACTIVE, &redo),
            task_active: Logged::open(txn, TASK_ACTIVE, &redo),
            jobs: Logged::open(txn, JOBS, &redo),
            job_leases: Logged::open(txn, JOB_LEASES, &redo),
            job_counts: Logged::open(txn, JOB_COUNTS, &redo),
            fences: Logged::open(txn, FENCES, &redo),
            workload_tasks: Logged::open(txn, WORKLOAD_TASKS, &redo),
            active_deltas: BTreeMap::new(),
            task_deltas: BTreeMap::new(),
            job_deltas: BTreeMap::new(),
            entered: BTreeMap::new(),
            head,
            head_dirty: false,
            tasks: Logged::open(txn, TASKS, &redo),
            leases: Logged::open(txn, LEASES, &redo),
            expiry: Logged::open(txn, EXPIRY, &redo),
            task_leases: Logged::open(txn, TASK_LEASES, &redo),
            workload_leases: Logged::open(txn, WORKLOAD_LEASES, &redo),
            issuing: Logged::open(txn, ISSUING, &redo),
            queue: Logged::open(txn, REVOKE_QUEUE, &redo),
            counters: Logged::open(txn, COUNTERS, &redo),
            denylist: Logged::open(txn, DENYLIST, &redo),
            deltas: BTreeMap::new(),
            poisoned: false,
            redo,
        }
    }

    /// Leases that entered each state so far (taken: call before `finish`).
    pub fn take_entered(&mut self) -> BTreeMap<(String, LeaseState), u64> {
        std::mem::take(&mut self.entered)
    }

    /// Flush counter deltas and the chain head; report whether the
    /// transaction must abort. Returns the head to adopt once committed and
    /// the batch's record for the write-ahead log (empty: nothing changed).
    pub fn finish(mut self) -> Result<(ChainHead, Vec<u8>), StoreError> {
        if self.poisoned {
            return Err(StoreError::Aborted);
        }
        self.write_block()?;
        if self.head_dirty {
            let bytes = self.head.to_bytes();
            self.meta.insert("chain_head", &bytes[..])?;
        }
        for (workload, delta) in std::mem::take(&mut self.active_deltas) {
            if delta == 0 {
                continue;
            }
            let cur = self
                .workload_active
                .get(workload.as_str())?
                .map(|g| g.value())
                .unwrap_or(0);
            let next = if delta >= 0 {
                cur.saturating_add(delta.unsigned_abs())
            } else {
                cur.saturating_sub(delta.unsigned_abs())
            };
            if next == 0 {
                self.workload_active.remove(workload.as_str())?;
            } else {
                self.workload_active.insert(workload.as_str(), next)?;
            }
        }
        for ((job, provider, bucket), delta) in std::mem::take(&mut self.job_deltas) {
            if delta == 0 {
                continue;
            }
            let key = (job, provider.as_str(), bucket);
            let cur = self.job_counts.get(key)?.map(|g| g.value()).unwrap_or(0);
            let next = if delta >= 0 {
                cur.saturating_add(delta.unsigned_abs())
            } else {
                cur.saturating_sub(delta.unsigned_abs())
            };
            self.job_counts.insert(key, next)?;
        }
        for (task, delta) in std::mem::take(&mut self.task_deltas) {
            if delta == 0 {
                continue;
            }
            let cur = self.task_active.get(task)?.map(|g| g.value()).unwrap_or(0);
            let next = if delta >= 0 {
                cur.saturating_add(delta.unsigned_abs())
            } else {
                cur.saturating_sub(delta.unsigned_abs())
            };
            if next == 0 {
                self.task_active.remove(task)?;
            } else {
                self.task_active.insert(task, next)?;
            }
        }
        let deltas = std::mem::take(&mut self.deltas);
        for ((provider, state), delta) in deltas {
            if delta == 0 {
                continue;
            }
            let key = (provider.as_str(), state.as_str());
            let cur = self.counters.get(key)?.map(|g| g.value()).unwrap_or(0);
            let next = if delta >= 0 {
                cur.saturating_add(delta.unsigned_abs())
            } else {
                cur.saturating_sub(delta.unsigned_abs())
            };
            self.counters.insert(key, next)?;
        }
        let redo = self.redo.borrow_mut().take();
        Ok((self.head, redo))
    }

    // === the event chain ===

    /// Append an event after the current head, in this transaction. It
    /// joins the transaction's open block, written at `finish` (or when the
    /// next event would not fit).
    pub fn append(&mut self, event: &dyn Chained) -> Result<u64, StoreError> {
        let seq = self.head.seq + 1;
        let task = event.task();
        if self.block.would_outgrow(event.size_hint()) {
            self.write_block()?;
        }
        let prev = self.head.hash;
        let mut hash = [0u8; 32];
        let first = self.block.push(seq, task.unwrap_or(0), |out| {
            out.reserve(event.size_hint());
            hash = event.seal_into(seq, &prev, out);
            hash
        });
        // the task index points at a task's first event in each block
        if let (true, Some(t)) = (first, task) {
            let r = self.event_tasks.insert((t, seq), ()).map(|_| ());
            self.w(r)?;
        }
        self.head = ChainHead { seq, hash };
        self.head_dirty = true;
        Ok(seq)
    }

    /// Store the open block, if any.
    fn write_block(&mut self) -> Result<(), StoreError> {
        if let Some((last, bytes)) = self.block.take() {
            let r = self.events.insert(last, bytes.as_slice()).map(|_| ());
            self.w(r)?;
        }
        Ok(())
    }

    /// Fail this transaction on purpose (an append that must not happen,
    /// injected by tests): nothing in the batch commits.
    pub fn fail(&mut self, why: &str) -> StoreError {
        self.poisoned = true;
        StoreError::Io(why.to_owned())
    }

    pub fn chain_head(&self) -> ChainHead {
        self.head
    }

    pub fn put_checkpoint(&mut self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let r = self.checkpoints.insert(seq, bytes).map(|_| ());
        self.w(r)
    }

    /// Remove events up to `through` (archived elsewhere), keeping the chain
    /// verifiable from there: the new base is that event's hash, which the
    /// caller must know (proof it holds the archive).
    pub fn prune_events(&mut self, through: u64, expected: &[u8; 32]) -> Result<u64, StoreError> {
        let base = match self.meta.get("chain_base")?.map(|g| g.value().to_vec()) {
            Some(b) => {
                ChainHead::from_bytes(&b).ok_or_else(|| StoreError::Corrupt("chain base".into()))?
            }
            None => ChainHead::default(),
        };
        if through <= base.seq || through > self.head.seq {
            return conflict(Conflict::Chain(format!(
                "can prune only events {}..={} (the chain holds {}..={})",
                base.seq + 1,
                self.head.seq,
                base.seq + 1,
                self.head.seq
            )));
        }
        self.write_block()?;
        // the block holding `through` is the first whose key is >= it
        let holding = self
            .events
            .range(through..)?
            .next()
            .transpose()?
            .map(|(k, v)| (k.value(), v.value().to_vec()));
        let found = match &holding {
            Some((key, block)) => blocks::find(*key, block, through)?.map(|e| e.hash),
            None => None,
        };
        let Some(hash) = found else {
            return conflict(Conflict::Chain(format!("event {through} is missing")));
        };
        if hash != *expected {
            return conflict(Conflict::Chain(format!(
                "the archive's last hash does not match event {through}"
            )));
        }
        // every block up to the one holding `through`: removed whole, or
        // (that last one) cut down to the events after `through`. All are
        // decoded before anything changes, so a malformed block refuses the
        // prune and leaves the chain as it was; only their keys and index
        // entries are kept meanwhile (a prune may cover millions of events).
        let mut doomed = Vec::new();
        let mut removed = 0;
        let mut unindexed = Vec::new();
        for e in self.events.range(..=through)? {
            let (k, v) = e?;
            removed += pruned_of(k.value(), v.value(), through, &mut unindexed)?;
            doomed.push(k.value());
        }
        let mut rest = None;
        if let Some((key, block)) = holding.filter(|(k, _)| *k > through) {
            removed += pruned_of(key, &block, through, &mut unindexed)?;
            rest = blocks::after(key, &block, through)?.map(|r| (key, r));
            doomed.push(key);
        }
        for key in doomed {
            let r = self.events.remove(key).map(|_| ());
            self.w(r)?;
        }
        for (task, seq) in unindexed {
            let r = self.event_tasks.remove((task, seq)).map(|_| ());
            self.w(r)?;
        }
        // what remains of the cut block, and its tasks' index entries (a
        // task whose first event there was pruned now starts later)
        if let Some((key, rest)) = rest {
            let r = self.events.insert(key, rest.block.as_slice()).map(|_| ());
            self.w(r)?;
            for (task, seq) in rest.firsts {
                let r = self.event_tasks.insert((task, seq), ()).map(|_| ());
                self.w(r)?;
            }
        }
        let base = ChainHead {
            seq: through,
            hash: *expected,
        };
        let r = self
            .meta
            .insert("chain_base", &base.to_bytes()[..])
            .map(|_| ());
        self.w(r)?;
        Ok(removed)
    }

    /// Mark the transaction poisoned when a write fails.
    fn w<T, E: Into<StoreError>>(&mut self, r: Result<T, E>) -> Result<T, StoreError> {
        r.map_err(|e| {
            self.poisoned = true;
            e.into()
        })
    }

    // === reads (no side effects) ===

    pub fn task(&self, id: u128) -> Result<Option<TaskRecord>, StoreError> {
        match self.tasks.get(id)? {
            Some(g) => Ok(Some(codec::decode(g.value())?)),
            None => Ok(None),
        }
    }

    pub fn lease(&self, id: u128) -> Result<Option<LeaseRecord>, StoreError> {
        match self.leases.get(id)? {
            Some(g) => Ok(Some(codec::decode(g.value())?)),
            None => Ok(None),
        }
    }

    fn lease_ids_of_task(&self, task: u128) -> Result<Vec<u128>, StoreError> {
        let mut ids = Vec::new();
        for e in self.task_leases.range((task, 0u128)..=(task, u128::MAX))? {
            ids.push(e?.0.value().1);
        }
        Ok(ids)
    }

    // === writes (after all checks) ===

    fn put_task(&mut self, rec: &TaskRecord) -> Result<(), StoreError> {
        let bytes = codec::encode(rec)?;
        let r = self.tasks.insert(rec.id, bytes.as_slice()).map(|_| ());
        self.w(r)
    }

    fn put_lease(&mut self, rec: &LeaseRecord, prev: Option<LeaseState>) -> Result<(), StoreError> {
        // per-job counts: only leases under revocation can belong to a job
        let new_job = rec.revocation.as_ref().and_then(|r| r.job);
        // a lease's job never changes once set, so only a lease that has
        // one now can have had one before
        let old = match (new_job, prev) {
            (Some(_), Some(_)) => self.lease(rec.id)?.and_then(|o| {
                o.revocation
                    .as_ref()
                    .and_then(|r| r.job)
                    .map(|j| (j, records::job_bucket(&o)))
            }),
            _ => None,
        };
        let new = new_job.map(|j| (j, records::job_bucket(rec)));
        if old != new {
            if let Some((j, b)) = old {
                *self
                    .job_deltas
                    .entry((j, rec.provider.clone(), b))
                    .or_default() -= 1;
            }
            if let Some((j, b)) = new {
                *self
                    .job_deltas
                    .entry((j, rec.provider.clone(), b))
                    .or_default() += 1;
            }
        }
        let bytes = codec::encode(rec)?;
        let r = self.leases.insert(rec.id, bytes.as_slice()).map(|_| ());
        self.w(r)?;
        if prev != Some(rec.state) {
            *self
                .entered
                .entry((rec.provider.clone(), rec.state))
                .or_default() += 1;
            if let Some(p) = prev {
                *self.deltas.entry((rec.provider.clone(), p)).or_default() -= 1;
            }
            *self
                .deltas
                .entry((rec.provider.clone(), rec.state))
                .or_default() += 1;
            let was = prev == Some(LeaseState::Active);
            let is = rec.state == LeaseState::Active;
            if was != is {
                let d = if is { 1 } else { -1 };
                *self.active_deltas.entry(rec.workload.clone()).or_default() += d;
                *self.task_deltas.entry(rec.task_id).or_default() += d;
            }
        }
        Ok(())
    }

    /// Active leases of a workload (committed, plus this transaction's).
    pub fn workload_active(&self, workload: &str) -> Result<u64, StoreError> {
        let stored = self
            .workload_active
            .get(workload)?
            .map(|g| g.value())
            .unwrap_or(0);
        let delta = self.active_deltas.get(workload).copied().unwrap_or(0);
        Ok(stored.saturating_add_signed(delta))
    }

    // === mass revocation, fences ===

    pub fn job(&self, id: u128) -> Result<Option<JobRecord>, StoreError> {
        match self.jobs.get(id)? {
            Some(g) => Ok(Some(codec::decode(g.value())?)),
            None => Ok(None),
        }
    }

    pub fn put_job(&mut self, job: &JobRecord) -> Result<(), StoreError> {
        let bytes = codec::encode(job)?;
        let r = self.jobs.insert(job.id, bytes.as_slice()).map(|_| ());
        self.w(r)
    }

    /// Claim `leases` (already selected by the caller) for `job`: local
    /// providers' leases are revoked here, others queued now. Returns the
    /// records as they are now and the providers with queued work.
    pub fn claim_for_job(
        &mut self,
        job: &JobRecord,
        candidates: &[u128],
        now: i64,
        local: &Local,
    ) -> Result<(Vec<LeaseRecord>, Vec<String>), StoreError> {
        let mut out = Vec::new();
        let mut queued_providers: Vec<String> = Vec::new();
        for id in candidates {
            let Some(rec) = self.lease(*id)? else {
                continue;
            };
            if !job.selector.matches(&rec)
                || !matches!(rec.state, LeaseState::Active | LeaseState::Irrevocable)
            {
                continue;
            }
            let why = Why {
                cause: RevokeCause::Job,
                by: Some(job.created_by.as_str()),
                job: Some(job.id),
            };
            let (rec, queued) = self.revoke_or_queue(rec, why, now, now, local)?;
            let r = self.job_leases.insert((job.id, rec.id), ()).map(|_| ());
            self.w(r)?;
            if queued && !queued_providers.contains(&rec.provider) {
                queued_providers.push(rec.provider.clone());
            }
            out.push(rec);
        }
        Ok((out, queued_providers))
    }

    pub fn fence(&self, key: &str) -> Result<Option<FenceRecord>, StoreError> {
        match self.fences.get(key)? {
            Some(g) => Ok(Some(codec::decode(g.value())?)),
            None => Ok(None),
        }
    }

    /// Refuse (`Fenced`) if any of these keys is fenced: checked in every
    /// transaction that creates something for a workload, so a fence
    /// committed before it wins even if the in-memory copy lags.
    pub fn refuse_fenced(&self, keys: &[String]) -> Result<(), StoreError> {
        for k in keys {
            if self.fences.get(k.as_str())?.is_some() {
                return conflict(Conflict::Fenced);
            }
        }
        Ok(())
    }

    pub fn put_fence(&mut self, f: &FenceRecord) -> Result<(), StoreError> {
        let bytes = codec::encode(f)?;
        let key = FenceRecord::key(&f.kind, &f.value);
        let r = self
            .fences
            .insert(key.as_str(), bytes.as_slice())
            .map(|_| ());
        self.w(r)
    }

    pub fn lift_fence(&mut self, kind: &str, value: &str) -> Result<FenceRecord, StoreError> {
        let key = FenceRecord::key(kind, value);
        let Some(f) = self.fence(&key)? else {
            return conflict(Conflict::FenceNotFound);
        };
        let r = self.fences.remove(key.as_str()).map(|_| ());
        self.w(r)?;
        Ok(f)
    }

    /// Give up on an irrevocable lease, with a reason: it leaves the retry
    /// queue, recorded as `abandoned`.
    pub fn abandon(
        &mut self,
        lease: u128,
        by: &str,
        reason: &str,
        now: i64,
    ) -> Result<LeaseRecord, StoreError> {
        let Some(mut rec) = self.lease(lease)? else {
            return conflict(Conflict::LeaseNotFound);
        };
        if rec.state != LeaseState::Irrevocable {
            return conflict(Conflict::LeaseState(rec.state));
        }
        self.dequeue(&rec)?;
        if let Some(r) = rec.revocation.as_mut() {
            r.last_error = Some(format!("abandoned by {by}: {reason}"));
            r.requested_by = Some(by.to_owned());
        }
        rec.state = LeaseState::Abandoned;
        rec.ended_at = Some(now);
        self.put_lease(&rec, Some(LeaseState::Irrevocable))?;
        Ok(rec)
    }

    // === calls, approvals, reviews ===

    pub fn put_call(&mut self, rec: &CallRecord) -> Result<(), StoreError> {
        let bytes = codec::encode(rec)?;
        let r = self
            .calls
            .insert((rec.task_id, rec.id), bytes.as_slice())
            .map(|_| ());
        self.w(r)
    }

    pub fn approval(&self, id: u128) -> Result<Option<ApprovalRecord>, StoreError> {
        match self.approvals.get(id)? {
            Some(g) => Ok(Some(codec::decode(g.value())?)),
            None => Ok(None),
        }
    }

    fn put_approval(&mut self, rec: &ApprovalRecord) -> Result<(), StoreError> {
        let bytes = codec::encode(rec)?;
        let r = self.approvals.insert(rec.id, bytes.as_slice()).map(|_| ());
        self.w(r)
    }

    pub fn create_approval(&mut self, rec: &ApprovalRecord) -> Result<(), StoreError> {
        if self.approvals.get(rec.id)?.is_some() {
            return conflict(Conflict::Duplicate);
        }
        self.put_approval(rec)?;
        let r = self
            .approval_expiry
            .insert((rec.expires_at, rec.id), ())
            .map(|_| ());
        self.w(r)
    }

    /// An approver's decision on a pending approval.
    pub fn decide_approval(
        &mut self,
        id: u128,
        approve: bool,
        by: &str,
        comment: Option<&str>,
        now: i64,
    ) -> Result<ApprovalRecord, StoreError> {
        let Some(mut a) = self.approval(id)? else {
            return conflict(Conflict::ApprovalNotFound);
        };
        if a.state != ApprovalState::Pending {
            return conflict(Conflict::Approval(format!(
                "the approval is {}",
                a.state.as_str()
            )));
        }
        if a.expires_at <= now {
            return conflict(Conflict::Approval("the approval has expired".into()));
        }
        a.state = if approve {
            ApprovalState::Approved
        } else {
            ApprovalState::Denied
        };
        a.decided_by = Some(by.to_owned());
        a.decided_at = Some(now);
        a.comment = comment.map(str::to_owned);
        if !approve {
            let r = self
                .approval_expiry
                .remove((a.expires_at, a.id))
                .map(|_| ());
            self.w(r)?;
        }
        self.put_approval(&a)?;
        Ok(a)
    }

    /// Would `consume_approval` succeed? Writes nothing.
    pub fn check_approval(&self, id: u128, hash: &[u8; 32], now: i64) -> Result<(), StoreError> {
        let Some(a) = self.approval(id)? else {
            return conflict(Conflict::ApprovalNotFound);
        };
        if &a.request_hash != hash {
            return conflict(Conflict::Approval(
                "the approval was granted for another request".into(),
            ));
        }
        match a.state {
            ApprovalState::Approved if a.expires_at > now => Ok(()),
            ApprovalState::Approved | ApprovalState::Expired => {
                conflict(Conflict::Approval("the approval has expired".into()))
            }
            s => conflict(Conflict::Approval(format!(
                "the approval is {}",
                s.as_str()
            ))),
        }
    }

    /// Use an approval, once, for the request it was granted for.
    pub fn consume_approval(
        &mut self,
        id: u128,
        hash: &[u8; 32],
        call: u128,
        now: i64,
    ) -> Result<ApprovalRecord, StoreError> {
        let Some(mut a) = self.approval(id)? else {
            return conflict(Conflict::ApprovalNotFound);
        };
        if &a.request_hash != hash {
            return conflict(Conflict::Approval(
                "the approval was granted for another request".into(),
            ));
        }
        match a.state {
            ApprovalState::Approved if a.expires_at > now => {}
            ApprovalState::Approved | ApprovalState::Expired => {
                return conflict(Conflict::Approval("the approval has expired".into()));
            }
            s => {
                return conflict(Conflict::Approval(format!(
                    "the approval is {}",
                    s.as_str()
                )));
            }
        }
        a.state = ApprovalState::Consumed;
        a.consumed_by_call = Some(call);
        let r = self
            .approval_expiry
            .remove((a.expires_at, a.id))
            .map(|_| ());
        self.w(r)?;
        self.put_approval(&a)?;
        Ok(a)
    }

    /// Expire approvals past their deadline (pending or approved-unused).
    pub fn expire_approvals(
        &mut self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<ApprovalRecord>, StoreError> {
        let mut due = Vec::new();
        for e in self
            .approval_expiry
            .range((i64::MIN, 0u128)..=(now, u128::MAX))?
        {
            due.push(e?.0.value());
            if due.len() >= limit {
                break;
            }
        }
        let mut out = Vec::new();
        for (exp, id) in due {
            let r = self.approval_expiry.remove((exp, id)).map(|_| ());
            self.w(r)?;
            if let Some(mut a) = self.approval(id)?
                && matches!(a.state, ApprovalState::Pending | ApprovalState::Approved)
            {
                a.state = ApprovalState::Expired;
                self.put_approval(&a)?;
                out.push(a);
            }
        }
        Ok(out)
    }

    pub fn review(&self, task: u128) -> Result<Option<ReviewRecord>, StoreError> {
        match self.reviews.get(task)? {
            Some(g) => Ok(Some(codec::decode(g.value())?)),
            None => Ok(None),
        }
    }

    /// Flag a task for review after a break-glass call (again, if it was
    /// signed off before).
    pub fn flag_review(
        &mut self,
        task: &TaskRecord,
        call: (u128, String, String, i64),
    ) -> Result<ReviewRecord, StoreError> {
        let mut r = self.review(task.id)?.unwrap_or(ReviewRecord {
            task_id: task.id,
            workload: task.workload.clone(),
            on_behalf_of: task.on_behalf_of.clone(),
            calls: Vec::new(),
            created_at: call.3,
            signed_off_by: None,
            signed_off_at: None,
            comment: None,
        });
        r.calls.push(call);
        r.signed_off_by = None;
        r.signed_off_at = None;
        r.comment = None;
        let bytes = codec::encode(&r)?;
        let w = self.reviews.insert(task.id, bytes.as_slice()).map(|_| ());
        self.w(w)?;
        let w = self.pending_reviews.insert(task.id, ()).map(|_| ());
        self.w(w)?;
        Ok(r)
    }

    pub fn sign_off_review(
        &mut self,
        task: u128,
        by: &str,
        comment: &str,
        now: i64,
    ) -> Result<ReviewRecord, StoreError> {
        let Some(mut r) = self.review(task)? else {
            return conflict(Conflict::ReviewNotFound);
        };
        if r.signed_off_by.is_some() {
            return conflict(Conflict::Approval(
                "the review is already signed off".into(),
            ));
        }
        r.signed_off_by = Some(by.to_owned());
        r.signed_off_at = Some(now);
        r.comment = Some(comment.to_owned());
        let bytes = codec::encode(&r)?;
        let w = self.reviews.insert(task, bytes.as_slice()).map(|_| ());
        self.w(w)?;
        let w = self.pending_reviews.remove(task).map(|_| ());
        self.w(w)?;
        Ok(r)
    }

    fn enqueue(&mut self, provider: &str, at: i64, lease: u128) -> Result<(), StoreError> {
        let r = self.queue.insert((provider, at, lease), ()).map(|_| ());
        self.w(r)
    }

    fn dequeue(&mut self, rec: &LeaseRecord) -> Result<(), StoreError> {
        if let Some(rv) = &rec.revocation {
            let r = self
                .queue
                .remove((rec.provider.as_str(), rv.next_attempt_at, rec.id))
                .map(|_| ());
            self.w(r)?;
        }
        Ok(())
    }

    fn unindex_expiry(&mut self, rec: &LeaseRecord) -> Result<(), StoreError> {
        let r = self.expiry.remove((rec.expires_at, rec.id)).map(|_| ());
        self.w(r)
    }

    /// Take a lease out of the index its current state keeps it in (expiry
    /// index, intents, revocation queue).
    fn leave_state(&mut self, rec: &LeaseRecord) -> Result<(), StoreError> {
        match rec.state {
            LeaseState::Active => self.unindex_expiry(rec)?,
            LeaseState::Issuing => {
                let r = self.issuing.remove(rec.id).map(|_| ());
                self.w(r)?;
            }
            LeaseState::Irrevocable | LeaseState::Revoking => self.dequeue(rec)?,
            _ => {}
        }
        Ok(())
    }

    /// Move an active (or irrevocable) lease into `Revoking`, queued at `at`.
    fn begin_revocation(
        &mut self,
        rec: LeaseRecord,
        why: Why<'_>,
        now: i64,
        at: i64,
    ) -> Result<LeaseRecord, StoreError> {
        let prev = rec.state;
        self.leave_state(&rec)?;
        let rec = queued_revocation(rec, why, now, at);
        self.enqueue(&rec.provider.clone(), at, rec.id)?;
        self.put_lease(&rec, Some(prev))?;
        Ok(rec)
    }

    /// Revoke a lease of a *local* provider in this very transaction. A local
    /// provider's revocation is an entry in this store (the token provider's
    /// denylist), so the revocation and its record commit atomically: there
    /// is no window in which one exists without the other.
    fn revoke_local(
        &mut self,
        rec: LeaseRecord,
        why: Why<'_>,
        now: i64,
    ) -> Result<LeaseRecord, StoreError> {
        let prev = rec.state;
        self.leave_state(&rec)?;
        // the token's `exp` is at most the lease's; a second of margin
        self.deny(&[(rec.id, rec.expires_at.saturating_add(1000))])?;
        let rec = local_revocation(rec, why, now);
        self.put_lease(&rec, Some(prev))?;
        Ok(rec)
    }

    /// Revoke now if the provider is local, else queue at `at`. Returns the
    /// record and whether it was queued.
    fn revoke_or_queue(
        &mut self,
        rec: LeaseRecord,
        why: Why<'_>,
        now: i64,
        at: i64,
        local: &Local,
    ) -> Result<(LeaseRecord, bool), StoreError> {
        if local.contains(&rec.provider) {
            Ok((self.revoke_local(rec, why, now)?, false))
        } else {
            Ok((self.begin_revocation(rec, why, now, at)?, true))
        }
    }

    // === operations ===

    pub fn create_task(&mut self, rec: &TaskRecord) -> Result<(), StoreError> {
        if self.tasks.get(rec.id)?.is_some() {
            return conflict(Conflict::Duplicate);
        }
        self.put_task(rec)?;
        let r = self
            .workload_tasks
            .insert((rec.workload.as_str(), rec.id), ())
            .map(|_| ());
        self.w(r)
    }

    /// Write the intent of a lease (`Issuing`), before the provider is
    /// called. The task must be open, unexpired and under its lease cap.
    pub fn lease_intent(
        &mut self,
        rec: &LeaseRecord,
        now: i64,
        max_per_task: u32,
    ) -> Result<(), StoreError> {
        let Some(mut task) = self.task(rec.task_id)? else {
            return conflict(Conflict::TaskNotFound);
        };
        if task.workload != rec.workload {
            return conflict(Conflict::TaskNotFound);
        }
        if task.state != TaskState::Open {
            return conflict(Conflict::TaskCompleted);
        }
        if task.expires_at <= now {
            return conflict(Conflict::TaskExpired);
        }
        if rec.expires_at > task.expires_at {
            return conflict(Conflict::OutlivesTask);
        }
        if task.lease_count >= max_per_task {
            return conflict(Conflict::TaskLeaseCap(max_per_task));
        }
        if rec.state != LeaseState::Issuing || self.leases.get(rec.id)?.is_some() {
            return conflict(Conflict::Duplicate);
        }
        task.lease_count += 1;
        self.put_task(&task)?;
        self.put_lease(rec, None)?;
        let r = self.issuing.insert(rec.id, ()).map(|_| ());
        self.w(r)?;
        let r = self
            .task_leases
            .insert((rec.task_id, rec.id), ())
            .map(|_| ());
        self.w(r)?;
        let r = self
            .workload_leases
            .insert((rec.workload.as_str(), rec.id), ())
            .map(|_| ());
        self.w(r)
    }

    /// The provider issued: the lease becomes `Active` and enters the expiry
    /// index. Refused if the task was completed or expired meanwhile; the
    /// caller then rolls the credential back.
    /// Store what `Provider::prepare` returned for a lease still `issuing`
    /// (sealed), so a rollback after a crash can find what `issue` hangs on
    /// it. Activation replaces it with the final handle.
    pub fn record_prepared(&mut self, lease: u128, sealed: &[u8]) -> Result<(), StoreError> {
        let Some(mut rec) = self.lease(lease)? else {
            return conflict(Conflict::LeaseNotFound);
        };
        if rec.state != LeaseState::Issuing {
            return conflict(Conflict::LeaseState(rec.state));
        }
        rec.handle_sealed = Some(sealed.to_vec());
        self.put_lease(&rec, Some(LeaseState::Issuing))
    }

    pub fn activate(&mut self, a: &Activation, now: i64) -> Result<LeaseRecord, StoreError> {
        let Some(mut rec) = self.lease(a.lease)? else {
            return conflict(Conflict::LeaseNotFound);
        };
        if rec.state != LeaseState::Issuing {
            return conflict(Conflict::LeaseState(rec.state));
        }
        let task = self
            .task(rec.task_id)?
            .ok_or(StoreError::Conflict(Conflict::TaskNotFound))?;
        if task.state != TaskState::Open {
            return conflict(Conflict::TaskCompleted);
        }
        if task.expires_at <= now {
            return conflict(Conflict::TaskExpired);
        }
        if a.expires_at > rec.expires_at || a.expires_at <= now {
            return conflict(Conflict::OutlivesTask);
        }
        a.apply(&mut rec);
        let r = self.issuing.remove(rec.id).map(|_| ());
        self.w(r)?;
        let r = self.expiry.insert((rec.expires_at, rec.id), ()).map(|_| ());
        self.w(r)?;
        self.put_lease(&rec, Some(LeaseState::Issuing))?;
        Ok(rec)
    }

    /// The provider call failed (or activation was refused) after the intent
    /// was written: queue a rollback, since the provider may have created
    /// something before failing.
    pub fn issue_failed(
        &mut self,
        lease: u128,
        error: &str,
        now: i64,
        local: &Local,
    ) -> Result<LeaseRecord, StoreError> {
        let Some(rec) = self.lease(lease)? else {
            return conflict(Conflict::LeaseNotFound);
        };
        if rec.state != LeaseState::Issuing {
            return conflict(Conflict::LeaseState(rec.state));
        }
        let (mut rec, _) =
            self.revoke_or_queue(rec, Why::of(RevokeCause::IssueFailed), now, now, local)?;
        if let Some(r) = rec.revocation.as_mut() {
            r.last_error = Some(error.to_owned());
        }
        let state = rec.state;
        self.put_lease(&rec, Some(state))?;
        Ok(rec)
    }

    /// Close a task and claim its active leases for revocation. Claimed
    /// leases are queued at `claim_until`: the completing request revokes
    /// them itself, and if it dies the queue takes over after the claim.
    pub fn complete_task(
        &mut self,
        task_id: u128,
        now: i64,
        claim_until: i64,
        local: &Local,
    ) -> Result<Completion, StoreError> {
        let Some(mut task) = self.task(task_id)? else {
            return conflict(Conflict::TaskNotFound);
        };
        if task.state == TaskState::Completed {
            return conflict(Conflict::TaskCompleted);
        }
        let ids = self.lease_ids_of_task(task_id)?;
        let mut all = Vec::with_capacity(ids.len());
        for id in ids {
            let rec = self.lease(id)?.ok_or_else(|| {
                StoreError::Corrupt(format!("task index names missing lease {id}"))
            })?;
            all.push(rec);
        }
        task.state = TaskState::Completed;
        task.completed_at = Some(now);
        self.put_task(&task)?;
        let mut claimed = Vec::new();
        let mut revoked = Vec::new();
        for rec in &mut all {
            if rec.state == LeaseState::Active {
                let (moved, queued) = self.revoke_or_queue(
                    rec.clone(),
                    Why::of(RevokeCause::TaskComplete),
                    now,
                    claim_until,
                    local,
                )?;
                *rec = moved.clone();
                if queued {
                    claimed.push(moved);
                } else {
                    revoked.push(moved);
                }
            }
        }
        Ok(Completion {
            task,
            claimed,
            revoked,
            all,
        })
    }

    /// Ask for one lease to be revoked. Active leases (and irrevocable ones,
    /// for a manual retry) of local providers are revoked at once; others are
    /// claimed at `claim_until` and returned with `true`. Leases in any other
    /// state are returned as they are with `false`.
    pub fn request_revoke(
        &mut self,
        lease: u128,
        cause: RevokeCause,
        by: Option<&str>,
        now: i64,
        claim_until: i64,
        local: &Local,
    ) -> Result<RevokeRequest, StoreError> {
        let Some(rec) = self.lease(lease)? else {
            return conflict(Conflict::LeaseNotFound);
        };
        match rec.state {
            LeaseState::Active | LeaseState::Irrevocable => {
                let (rec, queued) = self.revoke_or_queue(
                    rec,
                    Why {
                        cause,
                        by,
                        job: None,
                    },
                    now,
                    claim_until,
                    local,
                )?;
                Ok(RevokeRequest {
                    rec,
                    queued,
                    changed: true,
                })
            }
            _ => Ok(RevokeRequest {
                rec,
                queued: false,
                changed: false,
            }),
        }
    }

    /// Record what the provider said for each lease.
    pub fn record_outcomes(
        &mut self,
        outcomes: &[Outcome],
        now: i64,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let mut out = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            let id = match o {
                Outcome::Done { lease, .. } | Outcome::Retry { lease, .. } => *lease,
            };
            let Some(mut rec) = self.lease(id)? else {
                continue;
            };
            if !matches!(rec.state, LeaseState::Revoking | LeaseState::Irrevocable) {
                continue; // finished by another path meanwhile
            }
            let Some(mut rv) = rec.revocation.clone() else {
                return Err(StoreError::Corrupt(format!(
                    "lease {id} is revoking without a revocation record"
                )));
            };
            let prev = rec.state;
            self.dequeue(&rec)?;
            match o {
                Outcome::Done { note, .. } => {
                    if let Some(n) = note {
                        let d = rec.description.take().unwrap_or_default();
                        rec.description = Some(if d.is_empty() {
                            format!("revoked: {n}")
                        } else {
                            format!("{d}; revoked: {n}")
                        });
                    }
                    rec.state = rv.cause.terminal_state();
                    rec.ended_at = Some(now);
                    rec.handle_sealed = None; // nothing left to revoke with
                    rv.attempts += 1;
                    rv.last_error = None;
                }
                Outcome::Retry {
                    at,
                    error,
                    irrevocable,
                    ..
                } => {
                    rv.attempts += 1;
                    rv.next_attempt_at = *at;
                    rv.last_error = Some(error.clone());
                    if *irrevocable {
                        rec.state = LeaseState::Irrevocable;
                    }
                    self.enqueue(&rec.provider.clone(), *at, id)?;
                }
            }
            rec.revocation = Some(rv);
            self.put_lease(&rec, Some(prev))?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Move up to `limit` leases whose deadline has passed out of the expiry
    /// index: local providers' leases are revoked here, the others go to the
    /// revocation queue. Returns the providers with newly queued work and how
    /// many leases were handled.
    pub fn expire_due(
        &mut self,
        now: i64,
        limit: usize,
        local: &Local,
    ) -> Result<ExpiryPass, StoreError> {
        let mut due = Vec::new();
        for e in self.expiry.range((i64::MIN, 0u128)..=(now, u128::MAX))? {
            let (k, _) = e?;
            due.push(k.value());
            if due.len() >= limit {
                break;
            }
        }
        let mut pass = ExpiryPass {
            scanned: due.len(),
            ..ExpiryPass::default()
        };
        for (exp, id) in &due {
            match self.lease(*id)? {
                Some(rec) if rec.state == LeaseState::Active => {
                    let (rec, queued) =
                        self.revoke_or_queue(rec, Why::of(RevokeCause::Expiry), now, now, local)?;
                    if queued && !pass.queued_providers.contains(&rec.provider) {
                        pass.queued_providers.push(rec.provider.clone());
                    }
                    pass.handled.push(rec);
                }
                _ => {
                    // an index entry without an active lease: drop it
                    let r = self.expiry.remove((*exp, *id)).map(|_| ());
                    self.w(r)?;
                }
            }
        }
        Ok(pass)
    }

    /// Start-up recovery: every unresolved intent is rolled back (local
    /// providers) or queued for rollback.
    pub fn recover_intents(
        &mut self,
        now: i64,
        local: &Local,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let mut ids = Vec::new();
        for e in self.issuing.iter()? {
            ids.push(e?.0.value());
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.lease(id)? {
                Some(rec) if rec.state == LeaseState::Issuing => {
                    out.push(
                        self.revoke_or_queue(rec, Why::of(RevokeCause::Recovery), now, now, local)?
                            .0,
                    );
                }
                _ => {
                    let r = self.issuing.remove(id).map(|_| ());
                    self.w(r)?;
                }
            }
        }
        Ok(out)
    }

    /// Mark token ids (lease ids) inactive until their expiry (the later
    /// one wins).
    pub fn deny(&mut self, entries: &[(u128, i64)]) -> Result<(), StoreError> {
        for (jti, exp) in entries {
            let prev = self.denylist.get(*jti)?.map(|g| g.value());
            if prev.is_some_and(|p| p >= *exp) {
                continue;
            }
            let r = self.denylist.insert(*jti, *exp).map(|_| ());
            self.w(r)?;
        }
        Ok(())
    }

    /// Forget denylist entries of tokens that have expired anyway. Entries
    /// are in creation order; every entry created more than `horizon_ms`
    /// (the longest possible lease) ago is dead, so pruning removes a
    /// prefix and stops at the first young entry or after `limit`.
    pub fn prune_denylist(
        &mut self,
        now: i64,
        horizon_ms: i64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let cutoff = now.saturating_sub(horizon_ms);
        let mut dead = Vec::new();
        for e in self.denylist.iter()? {
            let (k, v) = e?;
            let (jti, exp) = (k.value(), v.value());
            if exp < now {
                dead.push(jti);
            } else if crate::ids::created_millis(jti) > cutoff {
                break;
            }
            if dead.len() >= limit {
                break;
            }
        }
        for jti in &dead {
            let r = self.denylist.remove(*jti).map(|_| ());
            self.w(r)?;
        }
        Ok(dead.len())
    }
}
