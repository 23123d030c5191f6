//! The embedded store: the only code that knows redb.
//!
//! API boundary: [`Store::write`] runs a closure over a [`Txn`] and resolves
//! once that transaction is durable; [`Store::read`] gives a consistent
//! snapshot. There is no policy here: the store keeps the lease state
//! machine and its indexes consistent and nothing else.
//!
//! Group commit: one writer runs the write transactions, one at a time. It
//! takes whatever operations are queued, applies them all in one
//! transaction, appends their changes to the write-ahead log as one record
//! and syncs it ([`wal`]), commits the transaction, then answers each
//! caller (a lone write is answered before the commit, and a read begun
//! after its answer waits for it: `visibility`). Under load,
//! concurrent requests share one sync, and the batch stays open for the
//! configured delay, applying operations as they arrive (so the delay
//! overlaps the batch's work rather than adding to it); idle, a single
//! operation commits alone with no added delay, on its caller's thread
//! (redb: `engine`).
//!
//! Invariants kept here:
//! - a caller's `write` returns `Ok` only after its transaction is durable
//!   (in the log), and no reader sees it before that;
//! - a lease and all its index entries change in one transaction;
//! - start-up reads only the metadata, the intent table and the first entry
//!   of each ordered index: nothing scales with the number of leases.

mod blocks;
mod codec;
mod copy;
mod digest;
mod direct;
mod engine;
mod error;
mod footprint;
mod key;
mod kv;
mod lifecycle;
mod pg;
mod reader;
pub mod records;
mod schema;
pub mod seam;
mod txn;
mod visibility;
pub mod wal;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use redb::TableHandle as _;

use tokio::sync::{mpsc, oneshot};

pub use copy::{CopyReport, copy};
pub use error::{Conflict, StoreError};
pub use footprint::{Footprint, TableBytes, footprint};

/// A stored event block as its plain bytes, deflated or not (for tools
/// that read a store file directly; the format is in `store/blocks.rs`).
pub fn plain_event_block(stored: &[u8]) -> Result<Vec<u8>, StoreError> {
    blocks::unpack(stored).map(std::borrow::Cow::into_owned)
}
pub use key::{KeyError, OpenError, Sealer, StoreKey};
pub use lifecycle::{
    Activation, ChainHead, Chained, Completion, ExpiryPass, Local, Outcome, RevokeRequest,
    StoredEvent, Why, local_revocation, queued_revocation,
};
pub use pg::{ClusterView, Leadership, NodeView, PgOptions};
pub use reader::Snapshot;
pub use records::{
    ApprovalRecord, ApprovalState, CallRecord, CredentialSpec, FenceRecord, JOB_BUCKETS, JobRecord,
    JobState, LeaseQuery, LeaseRecord, LeaseState, ReviewRecord, Revocation, RevokeCause, Selector,
    TaskRecord, TaskState,
};
pub use schema::{MIGRATIONS, Migration, SCHEMA_VERSION};
pub use seam::{ReadTxn, Reader, Txn, WriteTxn};
pub use writer::GroupCommit;

/// Called by the writer after each successful commit, before anyone is
/// answered: the batch's latency in seconds, its operations, and how many
/// leases entered each (provider, state). The store knows no metrics; the
/// broker hands one in.
pub type CommitHook = Arc<dyn Fn(f64, usize, &BTreeMap<(String, LeaseState), u64>) + Send + Sync>;

/// How to open a store.
#[derive(Clone)]
pub struct StoreOptions {
    pub path: PathBuf,
    pub cache_bytes: usize,
    pub quick_repair: bool,
    pub group_commit: GroupCommit,
    /// Checkpoint once the write-ahead log holds this many bytes (a bigger
    /// log means rarer, longer checkpoints and a longer replay after a crash).
    pub checkpoint_bytes: u64,
    /// Checkpoint once the store has had no write for this long.
    pub checkpoint_idle: std::time::Duration,
    /// Refuse writes (nothing written, `NoSpace`) while the store's
    /// filesystem has less than this free, so the log, redb's own pages
    /// and a checkpoint always have room: a full disk is a refusal the
    /// store recovers from, never a failed commit.
    pub reserve_bytes: u64,
    pub on_commit: Option<CommitHook>,
    /// Keep the store in PostgreSQL instead of the redb file at `path`.
    pub postgres: Option<PgOptions>,
    /// Tests: how long the redb writer waits between answering a batch and
    /// committing it (the window a read must not fall into).
    #[cfg(test)]
    pub hold_before_commit: std::time::Duration,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("path", &self.path)
            .field("cache_bytes", &self.cache_bytes)
            .field("group_commit", &self.group_commit)
            .field("checkpoint_bytes", &self.checkpoint_bytes)
            .finish_non_exhaustive()
    }
}

impl StoreOptions {
    /// The default of `checkpoint_bytes` (and of `store.checkpoint_mib`).
    pub const DEFAULT_CHECKPOINT_BYTES: u64 = 16 << 20;
    /// The default of `reserve_bytes` (and of `store.reserve_mib`).
    pub const DEFAULT_RESERVE_BYTES: u64 = 64 << 20;

    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cache_bytes: 64 << 20,
            quick_repair: true,
            group_commit: GroupCommit::default(),
            checkpoint_bytes: Self::DEFAULT_CHECKPOINT_BYTES,
            checkpoint_idle: std::time::Duration::from_secs(1),
            reserve_bytes: Self::DEFAULT_RESERVE_BYTES,
            on_commit: None,
            postgres: None,
            #[cfg(test)]
            hold_before_commit: std::time::Duration::ZERO,
        }
    }
}

/// Why a batch did not commit, as each of its callers is told.
#[derive(Debug, Clone)]
struct Unwritten {
    message: String,
    /// Refused for lack of space (nothing written; retry later).
    no_space: bool,
}

impl Unwritten {
    fn failed(message: String) -> Self {
        Self {
            message,
            no_space: false,
        }
    }
}

type Reply = Box<dyn FnOnce(Result<(), Unwritten>) + Send>;
/// One operation for the writer: applied to the batch's transaction, it
/// returns how to answer its caller once the batch's fate is known.
struct Job {
    /// Rows it will read, which a backend paying a round trip per read
    /// (PostgreSQL) fetches with the rest of its batch's before applying.
    reads: Reads,
    run: Box<dyn for<'t> FnOnce(&mut Txn<'t>) -> Reply + Send>,
}

/// Rows an operation will read, named ahead ([`Store::write_reading`]).
/// Only a hint: a row not named is read when the operation asks for it,
/// and a named row it does not read costs that row's fetch. redb ignores
/// it (its reads are memory reads).
#[derive(Debug, Default, Clone)]
pub struct Reads {
    keys: Vec<(&'static str, Vec<u8>)>,
    /// Ranges `[lo, hi)` of a table, in its ordered key encoding.
    ranges: Vec<RangeWant>,
    /// Ranges `[lo, hi)` of `task_leases` whose leases' records are named
    /// too (a read snapshot's; the writer takes keys it knows instead).
    pointed: Vec<(Vec<u8>, Vec<u8>)>,
    /// A read snapshot reads nothing else (PostgreSQL ends it in the same
    /// round trip; a later read would see a newer snapshot).
    last: bool,
}

/// A table's range `[lo, hi)` named ahead.
type RangeWant = (&'static str, Vec<u8>, Vec<u8>);

impl Reads {
    fn key(mut self, table: &str, id: u128) -> Self {
        self.keys
            .push((kv::pg_name(table), kv::ord_of::<u128>(&id)));
        self
    }

    /// The bounds of the task `id`'s range in its lease index.
    fn task_leases_bounds(id: u128) -> (Vec<u8>, Vec<u8>) {
        let lo = kv::ord_of::<(u128, u128)>(&(id, 0));
        let mut hi = kv::ord_of::<(u128, u128)>(&(id, u128::MAX));
        // the inclusive end, as `kv::ord_bounds` makes it
        hi.push(0);
        (lo, hi)
    }

    /// The index of the task `id`'s leases (all of them).
    pub fn task_leases(mut self, id: u128) -> Self {
        let (lo, hi) = Self::task_leases_bounds(id);
        self.ranges
            .push((kv::pg_name(schema::TASK_LEASES.name()), lo, hi));
        self
    }

    /// The task `id`'s leases: its index range and the records it points
    /// to (fetched by a read snapshot in the same round trip).
    pub fn leases_of_task(mut self, id: u128) -> Self {
        self.pointed.push(Self::task_leases_bounds(id));
        self.task_leases(id)
    }

    /// For a read snapshot: these are all it reads, so it ends once they
    /// are fetched, in the same round trip (PostgreSQL; redb ignores it).
    /// A row read afterwards that was not fetched comes from a newer
    /// snapshot.
    pub fn and_nothing_else(mut self) -> Self {
        self.last = true;
        self
    }

    /// The ranges several lists name, each once.
    fn ranges_of<'a>(all: impl IntoIterator<Item = &'a Reads>) -> Vec<RangeWant> {
        let mut out: Vec<RangeWant> = Vec::new();
        for r in all.into_iter().flat_map(|r| r.ranges.iter()) {
            if !out.contains(r) {
                out.push(r.clone());
            }
        }
        out
    }

    /// The task `id`'s record.
    pub fn task(self, id: u128) -> Self {
        self.key(schema::TASKS.name(), id)
    }

    /// The lease `id`'s record.
    pub fn lease(self, id: u128) -> Self {
        self.key(schema::LEASES.name(), id)
    }

    /// The count of the task `id`'s active leases.
    pub fn task_active(self, id: u128) -> Self {
        self.key(schema::TASK_ACTIVE.name(), id)
    }

    /// The denylist's entry for the token lease `id`.
    pub fn denied(self, id: u128) -> Self {
        self.key(schema::DENYLIST.name(), id)
    }

    /// The count of the workload's active leases.
    pub fn workload_active(mut self, workload: &str) -> Self {
        self.keys.push((
            kv::pg_name(schema::WORKLOAD_ACTIVE.name()),
            kv::ord_of::<&str>(&workload),
        ));
        self
    }

    /// The provider's lease counters, every state's (a batch adds to
    /// them as it ends, whichever states its leases left and entered).
    pub fn counters(mut self, provider: &str) -> Self {
        // (named twice, a row is fetched once: `by_table`)
        let table = kv::pg_name(schema::COUNTERS.name());
        self.keys.extend(LeaseState::ALL.map(|state| {
            (
                table,
                kv::ord_of::<(&str, &str)>(&(provider, state.as_str())),
            )
        }));
        self
    }

    /// The rows several lists name, by table.
    fn by_table<'a>(
        all: impl IntoIterator<Item = &'a Reads>,
    ) -> BTreeMap<&'static str, Vec<Vec<u8>>> {
        let mut out: BTreeMap<&'static str, Vec<Vec<u8>>> = BTreeMap::new();
        for (t, k) in all.into_iter().flat_map(|r| r.keys.iter()) {
            let keys = out.entry(t).or_default();
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
        out
    }
}

/// Operations waiting for the writer before callers wait to enqueue.
const QUEUE_DEPTH: usize = 16 * 1024;

/// Most operations merged into one transaction (either backend).
const MAX_BATCH: usize = 2048;
/// How often a lingering batch looks for more operations.
const LINGER_POLL: std::time::Duration = std::time::Duration::from_micros(50);

/// The end of a batch in either backend: its times, its count and the
/// commit hook when it committed (`entered`: leases that entered each
/// state), counted before anyone is answered so a caller sees its own
/// commit; then every caller is told. Returns how many there were.
fn settle(
    stats: &CommitStats,
    hook: Option<&CommitHook>,
    (started, applied, idle): (std::time::Instant, std::time::Instant, std::time::Duration),
    entered: Option<&BTreeMap<(String, LeaseState), u64>>,
    replies: Vec<Reply>,
    told: &Result<(), Unwritten>,
) -> usize {
    use std::sync::atomic::Ordering;
    let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    stats.apply_micros.fetch_add(
        micros((applied - started).saturating_sub(idle)),
        Ordering::Relaxed,
    );
    stats
        .commit_micros
        .fetch_add(micros(applied.elapsed()), Ordering::Relaxed);
    let n = replies.len();
    if let Some(entered) = entered {
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.operations.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(hook) = hook {
            hook(started.elapsed().as_secs_f64(), n, entered);
        }
    }
    for reply in replies {
        reply(told.clone());
    }
    n
}

/// A writer's batch: apply `first` (one job, or those a backend took
/// ahead to fetch their reads), every job already queued in `rx` and, until
/// `deadline` (a linger), whatever arrives, each as it is taken (so the
/// linger overlaps the batch's own work instead of preceding it). Returns
/// how to answer each job and the time spent waiting, not working.
fn gather(
    t: &mut Txn<'_>,
    first: impl IntoIterator<Item = Job>,
    rx: Option<&mut mpsc::Receiver<Job>>,
    deadline: Option<std::time::Instant>,
) -> (Vec<Reply>, std::time::Duration) {
    let mut idle = std::time::Duration::ZERO;
    let mut replies: Vec<Reply> = Vec::with_capacity(64);
    replies.extend(first.into_iter().map(|j| (j.run)(t)));
    let Some(rx) = rx else {
        return (replies, idle);
    };
    loop {
        while replies.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => replies.push((j.run)(t)),
                Err(_) => break,
            }
        }
        let now = std::time::Instant::now();
        match deadline {
            Some(d) if replies.len() < MAX_BATCH && now < d => {
                std::thread::sleep(LINGER_POLL.min(d - now));
                idle += now.elapsed();
            }
            _ => break,
        }
    }
    (replies, idle)
}

/// Commit statistics, for metrics and the benchmark.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub commits: AtomicU64,
    pub operations: AtomicU64,
    /// Time spent applying operations, and committing (incl. fsync), in µs.
    pub apply_micros: AtomicU64,
    pub commit_micros: AtomicU64,
    /// Round trips a PostgreSQL node's batches made while holding the
    /// chain head's lock, besides the one that takes it and the one that
    /// commits: rows read that were not fetched ahead, writes sent before
    /// a range is read (every node waits meanwhile). Zero on redb.
    pub lock_round_trips: AtomicU64,
    /// Checkpoints (durable redb commits that empty the log), and their time.
    pub checkpoints: AtomicU64,
    pub checkpoint_micros: AtomicU64,
    /// Bytes appended to the write-ahead log, and the time appending and
    /// syncing them (part of `commit_micros`).
    pub wal_bytes: AtomicU64,
    pub wal_micros: AtomicU64,
    /// Set while writes are refused for lack of space on the store's
    /// filesystem (cleared by the next commit).
    pub disk_full: std::sync::atomic::AtomicBool,
    /// Operations refused for lack of space, and checkpoints put off.
    pub refused_no_space: AtomicU64,
    pub checkpoints_postponed: AtomicU64,
}

/// A storage engine behind the store's handle: it runs the jobs the
/// handle queues (in group commits, each durable before it is answered)
/// and hands out read snapshots. redb is the one backend (`writer.rs`).
trait Backend: Send + Sync {
    fn read(&self) -> Result<Reader, StoreError>;
    /// What `reads` names, from rows this node committed lately, if it
    /// has them all (see [`Store::read_recent`]; `None` here).
    fn read_recent(&self, _reads: &Reads) -> Option<Reader> {
        None
    }
    /// Run `job` alone on the calling thread and answer it before
    /// returning, if the backend can do that now (`queued`: jobs wait for
    /// its writer); else hand it back for the queue.
    fn inline(&self, job: Job, _queued: bool) -> Result<(), Job> {
        Err(job)
    }
    fn sealer(&self) -> &Sealer;
    fn stats(&self) -> &CommitStats;
    /// False once the writer has died or a commit failed.
    fn is_healthy(&self) -> bool;
    /// Where the store lives, for logs.
    fn location(&self) -> &Path;
    /// This node's leadership (a single broker always leads).
    fn leadership(&self) -> Leadership;
    /// The cluster as the database sees it (`None`: a single broker).
    fn cluster(&self) -> Result<Option<ClusterView>, StoreError> {
        Ok(None)
    }
    /// Database connections for reads: open, idle (`None`: no pool).
    fn pool(&self) -> Option<(usize, usize)> {
        None
    }
    /// What other nodes announce (`None`: a single broker).
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        None
    }
    /// Wait until every queued job is done and the store is closed (its
    /// queue is closed first).
    fn close(&mut self);
    /// The backend itself (its white-box tests; `copy`).
    fn as_any(&self) -> &dyn std::any::Any;
    /// Its tables, read directly (tests, `copy`).
    fn raw(&self) -> Result<kv::ReadSource, StoreError>;
}

struct Inner {
    sender: Option<mpsc::Sender<Job>>,
    backend: Box<dyn Backend>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // closing the queue lets the writer drain it and exit
        self.sender.take();
        self.backend.close();
    }
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.backend.location())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Open (or create) the store, check the key and the schema, migrate if
    /// needed, and start the writer.
    pub fn open(opts: &StoreOptions, key: &StoreKey) -> Result<Self, StoreError> {
        Self::open_with_migrations(opts, key, MIGRATIONS, SCHEMA_VERSION)
    }

    /// `open` with an explicit migration list (the hook, testable).
    pub fn open_with_migrations(
        opts: &StoreOptions,
        key: &StoreKey,
        migrations: &[(u32, Migration)],
        target: u32,
    ) -> Result<Self, StoreError> {
        let (backend, sender) = match &opts.postgres {
            Some(pg) => pg::open(opts, pg, key)?,
            None => writer::open(opts, key, migrations, target)?,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                sender: Some(sender),
                backend,
            }),
        })
    }

    /// What `config validate` can know about a store without writing: for
    /// PostgreSQL, reach it and check privileges, schema version and key;
    /// what was found, and whether the store exists already. `None`:
    /// nothing to check beyond the files (redb).
    pub fn check(
        opts: &StoreOptions,
        key: &StoreKey,
    ) -> Result<Option<(String, bool)>, StoreError> {
        match &opts.postgres {
            Some(pg) => pg::check(pg, key).map(Some),
            None => Ok(None),
        }
    }

    pub fn path(&self) -> &Path {
        self.inner.backend.location()
    }

    pub fn sealer(&self) -> &Sealer {
        self.inner.backend.sealer()
    }

    pub fn stats(&self) -> &CommitStats {
        self.inner.backend.stats()
    }

    /// False once the writer has died or a commit failed; readiness reports it.
    pub fn is_healthy(&self) -> bool {
        self.inner.backend.is_healthy()
    }

    /// This node's leadership of the work that must run once.
    pub fn leadership(&self) -> Leadership {
        self.inner.backend.leadership()
    }

    /// What the nodes sharing this store announce (`announce` in a write):
    /// `fences`, `policy <version>`, and `resync` whenever announcements
    /// may have been missed. `None` for a single broker.
    pub fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        self.inner.backend.changes()
    }

    /// A store-wide setting the nodes agreed on (`ClusterWrites::agree`).
    pub fn agreed(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = format!("agreed:{name}");
        let meta = self.inner.backend.raw()?.open(schema::META)?;
        let v = meta.get(key.as_str())?.map(|g| g.value().to_vec());
        Ok(v)
    }

    /// The database connections for reads: open, idle (PostgreSQL).
    pub fn pool(&self) -> Option<(usize, usize)> {
        self.inner.backend.pool()
    }

    /// The cluster (nodes, leader, epoch), or `None` for a single broker.
    pub fn cluster(&self) -> Result<Option<ClusterView>, StoreError> {
        self.inner.backend.cluster()
    }

    /// Run `op` in the next group commit; resolves once it is durable.
    ///
    /// `op` must follow the check-then-write rule of [`Txn`]: return a
    /// conflict only before its first mutation.
    pub async fn write<R, F>(&self, op: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: for<'t> FnOnce(&mut Txn<'t>) -> Result<R, StoreError> + Send + 'static,
    {
        self.write_reading(Reads::default(), op).await
    }

    /// [`Store::write`], naming rows `op` will read so that a backend
    /// that asks a server for each read fetches them ahead, with the rest
    /// of the batch's (one round trip instead of one each).
    pub async fn write_reading<R, F>(&self, reads: Reads, op: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: for<'t> FnOnce(&mut Txn<'t>) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<R, StoreError>>();
        let run = Box::new(move |txn: &mut Txn<'_>| -> Reply {
            let result = op(txn);
            Box::new(move |commit: Result<(), Unwritten>| {
                let out = match (commit, result) {
                    (Ok(()), r) => r,
                    // a refused operation wrote nothing: report its refusal
                    (Err(_), Err(StoreError::Conflict(c))) => Err(StoreError::Conflict(c)),
                    (Err(e), _) if e.no_space => Err(StoreError::NoSpace(e.message)),
                    (Err(e), _) => Err(StoreError::Commit(e.message)),
                };
                let _ = tx.send(out);
            })
        });
        let job = Job { reads, run };
        let sender = self.inner.sender.as_ref().ok_or(StoreError::Closed)?;
        let queued = sender.capacity() < sender.max_capacity();
        if let Err(job) = self.inner.backend.inline(job, queued) {
            sender.send(job).await.map_err(|_| StoreError::Closed)?;
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// A consistent snapshot for reads.
    pub fn read(&self) -> Result<Reader, StoreError> {
        self.inner.backend.read()
    }

    /// What `reads` names, as this node's writer last knew it (what its
    /// batches wrote, and read under the lock, as of their commits), with
    /// no round trip to the database; `None` unless it has all of it (on
    /// PostgreSQL; redb reads are memory reads anyway). A task's range of
    /// leases holds those it has, possibly not all. Stale where another
    /// node has changed a row since, so only for what a write then checks
    /// against what it stores (events rendered ahead, `audit::ahead_or`;
    /// a decision's facts, `domain/call/facts.rs`), and for facts that
    /// never change once written (whose task it is).
    pub fn read_recent(&self, reads: &Reads) -> Option<Reader> {
        self.inner.backend.read_recent(reads)
    }
}

#[cfg(test)]
mod tests;
