//! The write transaction: [`KvTxn`] implements the seam's write traits
//! (one file per aggregate below) over the tables of `kv.rs`, in redb
//! (`wal::Logged`, so every mutation is recorded for the write-ahead log)
//! or in PostgreSQL (`pg`). The rules live here once, for both.
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

mod approvals;
mod calls;
mod chain;
mod incident;
mod leases;
mod retention;
mod tasks;
mod tokens;

use std::collections::BTreeMap;

use super::blocks::{self, BlockBuf};
use super::codec;
use super::kv::{Source, Table};
use super::lifecycle::*;
use super::records;
use super::records::{
    ApprovalRecord, ApprovalState, CallRecord, FenceRecord, JobRecord, LeaseRecord, LeaseState,
    ReviewRecord, RevokeCause, TaskRecord, TaskState,
};
use super::schema::*;
use super::seam::*;
use super::wal::Redo;
use super::{Conflict, StoreError};

/// What [`KvTxn::finish_packing`] returns: the head to adopt, the batch's
/// log record, and the last block when left plain (its key and bytes).
pub type Finished = (ChainHead, Vec<u8>, Option<(u64, Vec<u8>)>);

pub struct KvTxn<'t> {
    meta: Table<'t, &'static str, &'static [u8]>,
    /// Event blocks (see [`super::blocks`]).
    events: Table<'t, u64, &'static [u8]>,
    /// The events appended since the last block was written.
    block: BlockBuf,
    event_tasks: Table<'t, (u128, u64), ()>,
    checkpoints: Table<'t, u64, &'static [u8]>,
    /// Calls, keyed by (task id, call id).
    calls: Table<'t, (u128, u128), &'static [u8]>,
    approvals: Table<'t, u128, &'static [u8]>,
    approval_expiry: Table<'t, (i64, u128), ()>,
    reviews: Table<'t, u128, &'static [u8]>,
    pending_reviews: Table<'t, u128, ()>,
    workload_active: Table<'t, &'static str, u64>,
    task_active: Table<'t, u128, u64>,
    jobs: Table<'t, u128, &'static [u8]>,
    job_leases: Table<'t, (u128, u128), ()>,
    job_counts: Table<'t, (u128, &'static str, &'static str), u64>,
    fences: Table<'t, &'static str, &'static [u8]>,
    workload_tasks: Table<'t, (&'static str, u128), ()>,
    active_deltas: BTreeMap<String, i64>,
    task_deltas: BTreeMap<u128, i64>,
    job_deltas: BTreeMap<(u128, String, &'static str), i64>,
    /// Leases that entered each state in this transaction (for metrics,
    /// reported once the commit succeeds).
    entered: BTreeMap<(String, LeaseState), u64>,
    head: ChainHead,
    head_dirty: bool,
    tasks: Table<'t, u128, &'static [u8]>,
    leases: Table<'t, u128, &'static [u8]>,
    expiry: Table<'t, (i64, u128), ()>,
    task_leases: Table<'t, (u128, u128), ()>,
    workload_leases: Table<'t, (&'static str, u128), ()>,
    issuing: Table<'t, u128, ()>,
    queue: Table<'t, (&'static str, i64, u128), ()>,
    counters: Table<'t, (&'static str, &'static str), u64>,
    denylist: Table<'t, u128, i64>,
    deltas: BTreeMap<(String, LeaseState), i64>,
    poisoned: bool,
    /// What every table above recorded, for the write-ahead log.
    redo: Redo,
    /// The PostgreSQL session, when the tables are there.
    pg: Option<std::sync::Arc<super::pg::Session>>,
}

impl std::fmt::Debug for KvTxn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvTxn")
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
    let (count, firsts) = blocks::pruned(key, block, through)?;
    unindexed.extend(firsts);
    Ok(count)
}

fn conflict<T>(c: Conflict) -> Result<T, StoreError> {
    Err(StoreError::Conflict(c))
}

impl ClusterWrites for KvTxn<'_> {
    fn require_leader(&mut self, epoch: u64) -> Result<(), StoreError> {
        match &self.pg {
            Some(s) => s.require_leader(epoch),
            // one broker on its own file always leads
            None => Ok(()),
        }
    }

    fn announce(&mut self, what: &str) -> Result<(), StoreError> {
        match &self.pg {
            Some(s) => s.announce(what),
            None => Ok(()),
        }
    }

    fn agree(
        &mut self,
        name: &str,
        value: &[u8],
        replace: bool,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = format!("agreed:{name}");
        let stored = self.meta.get(key.as_str())?.map(|g| g.value().to_vec());
        match stored {
            Some(s) if s == value => Ok(None),
            Some(s) if !replace => Ok(Some(s)),
            _ => {
                let r = self.meta.insert(key.as_str(), value);
                self.w(r)?;
                Ok(None)
            }
        }
    }
}

impl<'t> KvTxn<'t> {
    /// The batch's view of the store; tables open as operations first use
    /// them.
    pub fn open(src: Source<'t>, head: ChainHead) -> Self {
        let redo = Redo::default();
        let pg = match &src {
            Source::Pg(s) => Some(s.clone()),
            Source::Redb(_) => None,
        };
        Self {
            pg,
            meta: src.table(META, &redo),
            events: src.table(EVENT_BLOCKS, &redo),
            block: BlockBuf::default(),
            event_tasks: src.table(EVENT_TASKS, &redo),
            checkpoints: src.table(CHECKPOINTS, &redo),
            calls: src.table(TASK_CALLS, &redo),
            approvals: src.table(APPROVALS, &redo),
            approval_expiry: src.table(APPROVAL_EXPIRY, &redo),
            reviews: src.table(REVIEWS, &redo),
            pending_reviews: src.table(PENDING_REVIEWS, &redo),
            workload_active: src.table(WORKLOAD_ACTIVE, &redo),
            task_active: src.table(TASK_ACTIVE, &redo),
            jobs: src.table(JOBS, &redo),
            job_leases: src.table(JOB_LEASES, &redo),
            job_counts: src.table(JOB_COUNTS, &redo),
            fences: src.table(FENCES, &redo),
            workload_tasks: src.table(WORKLOAD_TASKS, &redo),
            active_deltas: BTreeMap::new(),
            task_deltas: BTreeMap::new(),
            job_deltas: BTreeMap::new(),
            entered: BTreeMap::new(),
            head,
            head_dirty: false,
            tasks: src.table(TASKS, &redo),
            leases: src.table(LEASES, &redo),
            expiry: src.table(EXPIRY, &redo),
            task_leases: src.table(TASK_LEASES, &redo),
            workload_leases: src.table(WORKLOAD_LEASES, &redo),
            issuing: src.table(ISSUING, &redo),
            queue: src.table(REVOKE_QUEUE, &redo),
            counters: src.table(COUNTERS, &redo),
            denylist: src.table(DENYLIST, &redo),
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
    pub fn finish(self) -> Result<(ChainHead, Vec<u8>), StoreError> {
        self.finish_packing(true)
            .map(|(head, redo, _)| (head, redo))
    }

    /// [`Self::finish`]; with `pack_last` false, the batch's last block is
    /// stored (so logged) plain and returned, for the caller to replace
    /// with its packed form in the same transaction, off the record: the
    /// redb writer answers a lone write without waiting for deflate (see
    /// `writer::repack`). A plain block reads as the packed one does.
    pub fn finish_packing(mut self, pack_last: bool) -> Result<Finished, StoreError> {
        if self.poisoned {
            return Err(StoreError::Aborted);
        }
        let plain = self.store_block(pack_last)?;
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
        Ok((self.head, redo, plain))
    }

    /// Store the open block, if any.
    fn write_block(&mut self) -> Result<(), StoreError> {
        self.store_block(true).map(|_| ())
    }

    /// Store the open block, if any: packed, or plain and also returned.
    fn store_block(&mut self, pack: bool) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let Some((last, bytes)) = self.block.take() else {
            return Ok(None);
        };
        if pack {
            let r = self.events.insert(last, blocks::pack(bytes).as_slice());
            self.w(r)?;
            return Ok(None);
        }
        let r = self.events.insert(last, bytes.as_slice());
        self.w(r)?;
        Ok(Some((last, bytes)))
    }

    /// Mark the transaction poisoned when a write fails.
    fn w<T, E: Into<StoreError>>(&mut self, r: Result<T, E>) -> Result<T, StoreError> {
        r.map_err(|e| {
            self.poisoned = true;
            e.into()
        })
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

    fn put_approval(&mut self, rec: &ApprovalRecord) -> Result<(), StoreError> {
        let bytes = codec::encode(rec)?;
        let r = self.approvals.insert(rec.id, bytes.as_slice()).map(|_| ());
        self.w(r)
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
}
