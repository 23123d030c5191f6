//! The seam between the domain and a storage backend: every operation the
//! domain needs from a store, named in one place. The domain sees only
//! these traits (through [`Txn`] in `Store::write` and [`Reader`] from
//! `Store::read`), so a second backend (PostgreSQL) implements them without
//! touching a domain module. redb implements them today (`txn/`,
//! `reader.rs`), and the store's tests run through them.
//!
//! The rule for every write operation: **check, then write**. An operation
//! reads and validates everything first and returns a
//! [`StoreError::Conflict`] before its first mutation, so a rejected
//! operation leaves nothing behind in the batch it shares with others. A
//! storage error after a mutation has begun poisons the whole transaction:
//! every operation of the batch fails and none is committed. A lease, its
//! index entries and its counters always change in the same operation.

use std::collections::BTreeMap;

use super::StoreError;
use super::lifecycle::*;
use super::records::*;

/// The event chain: every change appends its events in its own transaction.
pub trait ChainWrites {
    /// Append an event after the current head, in this transaction. It
    /// joins the transaction's open block, written at `finish` (or when the
    /// next event would not fit).
    fn append(&mut self, event: &dyn Chained) -> Result<u64, StoreError>;

    /// Fail this transaction on purpose (an append that must not happen,
    /// injected by tests): nothing in the batch commits.
    fn fail(&mut self, why: &str) -> StoreError;

    fn chain_head(&self) -> ChainHead;

    fn put_checkpoint(&mut self, seq: u64, bytes: &[u8]) -> Result<(), StoreError>;

    /// Remove events up to `through` (archived elsewhere), keeping the chain
    /// verifiable from there: the new base is that event's hash, which the
    /// caller must know (proof it holds the archive).
    fn prune_events(&mut self, through: u64, expected: &[u8; 32]) -> Result<u64, StoreError>;
}

/// Tasks: open and complete.
pub trait TaskWrites {
    fn task(&self, id: u128) -> Result<Option<TaskRecord>, StoreError>;

    fn create_task(&mut self, rec: &TaskRecord) -> Result<(), StoreError>;

    /// Close a task and claim its active leases for revocation. Claimed
    /// leases are queued at `claim_until`: the completing request revokes
    /// them itself, and if it dies the queue takes over after the claim.
    fn complete_task(
        &mut self,
        task_id: u128,
        now: i64,
        claim_until: i64,
        local: &Local,
    ) -> Result<Completion, StoreError>;
}

/// Leases: intent, activation, revocation, expiry and recovery. A lease, its
/// index entries and its counters change in one operation.
pub trait LeaseWrites {
    fn lease(&self, id: u128) -> Result<Option<LeaseRecord>, StoreError>;

    /// Active leases of a workload (committed, plus this transaction's).
    fn workload_active(&self, workload: &str) -> Result<u64, StoreError>;

    /// Active leases of a task (committed, plus this transaction's).
    fn task_active(&self, task: u128) -> Result<u64, StoreError>;

    /// Write the intent of a lease (`Issuing`), before the provider is
    /// called. The task must be open, unexpired and under its lease cap.
    fn lease_intent(
        &mut self,
        rec: &LeaseRecord,
        now: i64,
        max_per_task: u32,
    ) -> Result<(), StoreError>;

    /// The provider issued: the lease becomes `Active` and enters the expiry
    /// index. Refused if the task was completed or expired meanwhile; the
    /// caller then rolls the credential back.
    /// Store what `Provider::prepare` returned for a lease still `issuing`
    /// (sealed), so a rollback after a crash can find what `issue` hangs on
    /// it. Activation replaces it with the final handle.
    fn record_prepared(&mut self, lease: u128, sealed: &[u8]) -> Result<(), StoreError>;

    fn activate(&mut self, a: &Activation, now: i64) -> Result<LeaseRecord, StoreError>;

    /// The provider call failed (or activation was refused) after the intent
    /// was written: queue a rollback, since the provider may have created
    /// something before failing.
    fn issue_failed(
        &mut self,
        lease: u128,
        error: &str,
        now: i64,
        local: &Local,
    ) -> Result<LeaseRecord, StoreError>;

    /// Ask for one lease to be revoked. Active leases (and irrevocable ones,
    /// for a manual retry) of local providers are revoked at once; others are
    /// claimed at `claim_until` and returned with `true`. Leases in any other
    /// state are returned as they are with `false`.
    fn request_revoke(
        &mut self,
        lease: u128,
        cause: RevokeCause,
        by: Option<&str>,
        now: i64,
        claim_until: i64,
        local: &Local,
    ) -> Result<RevokeRequest, StoreError>;

    /// Record what the provider said for each lease.
    fn record_outcomes(
        &mut self,
        outcomes: &[Outcome],
        now: i64,
    ) -> Result<Vec<LeaseRecord>, StoreError>;

    /// Move up to `limit` leases whose deadline has passed out of the expiry
    /// index: local providers' leases are revoked here, the others go to the
    /// revocation queue. Returns the providers with newly queued work and how
    /// many leases were handled.
    fn expire_due(
        &mut self,
        now: i64,
        limit: usize,
        local: &Local,
    ) -> Result<ExpiryPass, StoreError>;

    /// Start-up recovery: every unresolved intent is rolled back (local
    /// providers) or queued for rollback. With `created_before` (ms), only
    /// the intents of leases created before then (lease ids carry their
    /// creation time): on a cluster, the leader recovers what a dead node
    /// left, never another live node's issue in flight.
    fn recover_intents(
        &mut self,
        now: i64,
        created_before: Option<i64>,
        local: &Local,
    ) -> Result<Vec<LeaseRecord>, StoreError>;
}

/// Calls: the record of each decided tool call.
pub trait CallWrites {
    fn put_call(&mut self, rec: &CallRecord) -> Result<(), StoreError>;
}

/// Approvals bound to a request hash, and break-glass reviews.
pub trait ApprovalWrites {
    fn approval(&self, id: u128) -> Result<Option<ApprovalRecord>, StoreError>;

    fn create_approval(&mut self, rec: &ApprovalRecord) -> Result<(), StoreError>;

    /// An approver's decision on a pending approval.
    fn decide_approval(
        &mut self,
        id: u128,
        approve: bool,
        by: &str,
        comment: Option<&str>,
        now: i64,
    ) -> Result<ApprovalRecord, StoreError>;

    /// Would `consume_approval` succeed? Writes nothing.
    fn check_approval(&self, id: u128, hash: &[u8; 32], now: i64) -> Result<(), StoreError>;

    /// Use an approval, once, for the request it was granted for.
    fn consume_approval(
        &mut self,
        id: u128,
        hash: &[u8; 32],
        call: u128,
        now: i64,
    ) -> Result<ApprovalRecord, StoreError>;

    /// Expire approvals past their deadline (pending or approved-unused).
    fn expire_approvals(
        &mut self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<ApprovalRecord>, StoreError>;

    fn review(&self, task: u128) -> Result<Option<ReviewRecord>, StoreError>;

    /// Flag a task for review after a break-glass call (again, if it was
    /// signed off before).
    fn flag_review(
        &mut self,
        task: &TaskRecord,
        call: (u128, String, String, i64),
    ) -> Result<ReviewRecord, StoreError>;

    fn sign_off_review(
        &mut self,
        task: u128,
        by: &str,
        comment: &str,
        now: i64,
    ) -> Result<ReviewRecord, StoreError>;
}

/// Incident response: revocation jobs, fences, abandoned leases.
pub trait IncidentWrites {
    fn job(&self, id: u128) -> Result<Option<JobRecord>, StoreError>;

    fn put_job(&mut self, job: &JobRecord) -> Result<(), StoreError>;

    /// Claim `leases` (already selected by the caller) for `job`: local
    /// providers' leases are revoked here, others queued now. Returns the
    /// records as they are now and the providers with queued work.
    fn claim_for_job(
        &mut self,
        job: &JobRecord,
        candidates: &[u128],
        now: i64,
        local: &Local,
    ) -> Result<(Vec<LeaseRecord>, Vec<String>), StoreError>;

    fn fence(&self, key: &str) -> Result<Option<FenceRecord>, StoreError>;

    /// Refuse (`Fenced`) if any of these keys is fenced: checked in every
    /// transaction that creates something for a workload, so a fence
    /// committed before it wins even if the in-memory copy lags.
    fn refuse_fenced(&self, keys: &[String]) -> Result<(), StoreError>;

    fn put_fence(&mut self, f: &FenceRecord) -> Result<(), StoreError>;

    fn lift_fence(&mut self, kind: &str, value: &str) -> Result<FenceRecord, StoreError>;

    /// Give up on an irrevocable lease, with a reason: it leaves the retry
    /// queue, recorded as `abandoned`.
    fn abandon(
        &mut self,
        lease: u128,
        by: &str,
        reason: &str,
        now: i64,
    ) -> Result<LeaseRecord, StoreError>;
}

/// The token provider's denylist, kept in the store so revoking a token
/// commits with the lease.
pub trait TokenWrites {
    /// Mark token ids (lease ids) inactive until their expiry (the later
    /// one wins).
    fn deny(&mut self, entries: &[(u128, i64)]) -> Result<(), StoreError>;

    /// Forget denylist entries of tokens that have expired anyway. Entries
    /// are in creation order; every entry created more than `horizon_ms`
    /// (the longest possible lease) ago is dead, so pruning removes a
    /// prefix and stops at the first young entry or after `limit`.
    fn prune_denylist(
        &mut self,
        now: i64,
        horizon_ms: i64,
        limit: usize,
    ) -> Result<usize, StoreError>;
}

/// What one retention batch removed ([`RetentionWrites`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    pub tasks: u64,
    pub leases: u64,
    pub calls: u64,
    pub approvals: u64,
    pub reviews: u64,
    /// Tasks examined that had ended before the cutoff but were kept:
    /// something of theirs is still live (a lease not yet ended, an
    /// approval undecided, a review unsigned).
    pub kept: u64,
    /// The first and last task removed.
    pub first: Option<u128>,
    pub last_removed: Option<u128>,
    /// The task the batch removed part of (its record goes with its last
    /// part, in a later batch).
    pub part_of: Option<u128>,
    /// The last task examined: the next batch resumes after it.
    pub cursor: Option<u128>,
    /// No task created before the cutoff remains after `cursor`.
    pub done: bool,
}

impl Removed {
    /// Records removed in all.
    pub fn records(&self) -> u64 {
        self.tasks + self.leases + self.calls + self.approvals + self.reviews
    }
}

/// Retention: what ended long enough ago leaves the store.
pub trait RetentionWrites {
    /// Remove tasks that ended before `cutoff` (ms: completed, or past
    /// their deadline), each with its calls, leases, approvals and review,
    /// and every index entry of theirs, only when nothing of it is live:
    /// every lease terminal (never an irrevocable one) and ended before
    /// `cutoff`, every approval decided, consumed or expired, its review
    /// signed off. Tasks are examined in id (creation) order after `after`,
    /// at most `max_tasks`, and the batch stops before it would remove more
    /// than `max_records`, so a batch stays short: a task larger than that
    /// goes over several batches (`part_of`), its leases and calls first and
    /// its record with the last part, the cursor staying before it until
    /// then. Once removable a task stays so (what ended stays ended), so
    /// what a part left behind is only ever an ended task's.
    fn remove_ended_tasks(
        &mut self,
        cutoff: i64,
        after: Option<u128>,
        max_tasks: usize,
        max_records: usize,
    ) -> Result<Removed, StoreError>;

    /// Remove revocation jobs finished before `cutoff` with their claims
    /// and counts, at most `max_records` entries; a job's record goes last,
    /// with its final claims. Returns (jobs removed, entries removed).
    fn remove_ended_jobs(
        &mut self,
        cutoff: i64,
        max_records: usize,
    ) -> Result<(u64, u64), StoreError>;
}

/// Leader-only work (expiry, the revocation queue, jobs, checkpoints):
/// checked in the transaction that does it.
pub trait ClusterWrites {
    /// Refuse ([`Conflict::NotLeader`](super::Conflict)) unless this node
    /// still leads with `epoch`. A single broker always leads.
    fn require_leader(&mut self, epoch: u64) -> Result<(), StoreError>;

    /// Tell the other nodes sharing this store that `what` changed (fences,
    /// the policy), once this transaction commits. A single broker has no
    /// one to tell.
    fn announce(&mut self, what: &str) -> Result<(), StoreError>;

    /// Agree on a store-wide setting (e.g. the token signing keys every
    /// node must share): stored when absent (or when `replace`); if another
    /// value is stored, it is returned and nothing is written.
    fn agree(
        &mut self,
        name: &str,
        value: &[u8],
        replace: bool,
    ) -> Result<Option<Vec<u8>>, StoreError>;
}

/// A write transaction: every aggregate's operations. `Store::write` runs
/// a closure over one, in the next group commit.
pub trait WriteTxn:
    ChainWrites
    + TaskWrites
    + LeaseWrites
    + CallWrites
    + ApprovalWrites
    + IncidentWrites
    + TokenWrites
    + RetentionWrites
    + ClusterWrites
{
}

impl<T> WriteTxn for T where
    T: ChainWrites
        + TaskWrites
        + LeaseWrites
        + CallWrites
        + ApprovalWrites
        + IncidentWrites
        + TokenWrites
        + RetentionWrites
        + ClusterWrites
{
}

/// What a `Store::write` closure is handed.
pub type Txn<'t> = dyn WriteTxn + 't;

/// A consistent snapshot for reads: every query the domain asks. Nothing
/// here scans all leases; each answer is a range of an ordered index.
pub trait ReadTxn: Send {
    fn task(&self, id: u128) -> Result<Option<TaskRecord>, StoreError>;

    fn lease(&self, id: u128) -> Result<Option<LeaseRecord>, StoreError>;

    fn task_leases(&self, task: u128) -> Result<Vec<LeaseRecord>, StoreError>;

    /// One page of leases; the cursor is `Some` when more may follow.
    fn list_leases(&self, q: &LeaseQuery) -> Result<(Vec<LeaseRecord>, Option<u128>), StoreError>;

    /// The earliest deadline in the expiry index.
    fn next_expiry(&self) -> Result<Option<i64>, StoreError>;

    /// Up to `limit` leases of `provider` whose revocation attempt is due.
    fn due_revocations(
        &self,
        provider: &str,
        now: i64,
        limit: usize,
    ) -> Result<Vec<LeaseRecord>, StoreError>;

    /// When the next revocation attempt of `provider` is due.
    fn next_revocation(&self, provider: &str) -> Result<Option<i64>, StoreError>;

    /// Number of unresolved intents (should be zero after recovery).
    fn issuing_count(&self) -> Result<u64, StoreError>;

    /// Lease counts by (provider, state), kept transactionally.
    fn counters(&self) -> Result<BTreeMap<(String, LeaseState), u64>, StoreError>;

    /// The last event of the chain.
    fn chain_head(&self) -> Result<ChainHead, StoreError>;

    /// Where the chain starts (the last pruned event), genesis if never pruned.
    fn chain_base(&self) -> Result<ChainHead, StoreError>;

    /// Events with seq > `after`, in order, at most `limit`.
    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;

    /// Visit every event in order (verification) without collecting them.
    fn for_each_event(&self, f: &mut EventVisitor<'_>) -> Result<(), StoreError>;

    /// A task's events with seq > `after`. The task index points at the
    /// task's first event in each block; the block is read from there.
    fn task_events(
        &self,
        task: u128,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Every signed checkpoint, as stored.
    fn checkpoints(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;

    fn last_checkpoint_seq(&self) -> Result<Option<u64>, StoreError>;

    fn job(&self, id: u128) -> Result<Option<JobRecord>, StoreError>;

    /// Every job (few: one per incident).
    fn jobs(&self) -> Result<Vec<JobRecord>, StoreError>;

    /// A job's lease counts by provider and bucket ([`records::job_bucket`]).
    fn job_counts(
        &self,
        job: u128,
    ) -> Result<BTreeMap<String, BTreeMap<&'static str, u64>>, StoreError>;

    /// A job's leases that are not (yet) revoked, up to `limit`.
    fn job_unfinished(&self, job: u128, limit: usize) -> Result<Vec<LeaseRecord>, StoreError>;

    /// Lease ids after `after` from the index a selector scans best.
    fn candidate_leases(
        &self,
        sel: &Selector,
        after: Option<u128>,
        limit: usize,
    ) -> Result<Vec<u128>, StoreError>;

    fn fences(&self) -> Result<Vec<FenceRecord>, StoreError>;

    /// A workload's tasks created at or after `since`.
    fn workload_tasks(
        &self,
        workload: &str,
        since: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError>;

    fn task_active(&self, task: u128) -> Result<u64, StoreError>;

    fn workload_active(&self, workload: &str) -> Result<u64, StoreError>;

    fn task_calls(&self, task: u128) -> Result<Vec<CallRecord>, StoreError>;

    fn approval(&self, id: u128) -> Result<Option<ApprovalRecord>, StoreError>;

    /// Approvals still awaiting a decision, soonest to expire first.
    fn pending_approvals(&self, limit: usize) -> Result<Vec<ApprovalRecord>, StoreError>;

    /// The last signed checkpoint, as stored.
    fn checkpoints_last(&self) -> Result<Option<Vec<u8>>, StoreError>;

    /// When the next approval expires.
    fn next_approval_expiry(&self) -> Result<Option<i64>, StoreError>;

    fn review(&self, task: u128) -> Result<Option<ReviewRecord>, StoreError>;

    fn pending_reviews(&self, limit: usize) -> Result<Vec<ReviewRecord>, StoreError>;

    fn is_denied(&self, jti: u128) -> Result<bool, StoreError>;

    /// Fetch the rows `reads` names now, at once, for the reads that follow
    /// (a hint: on PostgreSQL one round trip instead of one each; redb
    /// reads memory and does nothing).
    fn prefetch(&self, reads: &super::Reads) -> Result<(), StoreError> {
        let _ = reads;
        Ok(())
    }
}

/// What `ReadTxn::for_each_event` calls for each event: seq, hash, bytes.
pub type EventVisitor<'a> = dyn FnMut(u64, [u8; 32], &[u8]) + 'a;

/// A read snapshot, as `Store::read` hands it out.
pub type Reader = Box<dyn ReadTxn>;
