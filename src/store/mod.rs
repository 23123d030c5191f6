//! The embedded store: the only code that knows redb.
//!
//! API boundary: [`Store::write`] runs a closure over a [`Txn`] and resolves
//! once that transaction is durable; [`Store::read`] gives a consistent
//! snapshot. There is no policy here: the store keeps the lease state
//! machine and its indexes consistent and nothing else.
//!
//! Group commit: one writer thread owns every write transaction. It takes
//! whatever operations are queued, applies them all in one transaction,
//! appends their changes to the write-ahead log as one record and syncs it
//! ([`wal`]), commits the transaction, then answers each caller. Under load,
//! concurrent requests share one sync, and the batch stays open for the
//! configured delay, applying operations as they arrive (so the delay
//! overlaps the batch's work rather than adding to it); idle, a single
//! operation commits alone with no added delay.
//!
//! Invariants kept here:
//! - a caller's `write` returns `Ok` only after its transaction is durable
//!   (in the log), and no reader sees it before that;
//! - a lease and all its index entries change in one transaction;
//! - start-up reads only the metadata, the intent table and the first entry
//!   of each ordered index: nothing scales with the number of leases.

mod blocks;
mod codec;
mod key;
pub mod records;
mod schema;
mod txn;
pub mod wal;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase as _, ReadableTable as _,
    ReadableTableMetadata as _,
};
use tokio::sync::{mpsc, oneshot};

pub use key::{KeyError, OpenError, Sealer, StoreKey};
pub use records::{
    ApprovalRecord, ApprovalState, CallRecord, CredentialSpec, FenceRecord, JOB_BUCKETS, JobRecord,
    JobState, LeaseQuery, LeaseRecord, LeaseState, ReviewRecord, Revocation, RevokeCause, Selector,
    TaskRecord, TaskState,
};
pub use schema::{MIGRATIONS, Migration, SCHEMA_VERSION};
pub use txn::{
    Activation, ChainHead, Chained, Completion, ExpiryPass, Local, Outcome, RevokeRequest, Txn,
    Why, local_revocation, queued_revocation,
};

use schema::*;

/// A domain-level refusal: the operation was checked and not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("task not found")]
    TaskNotFound,
    #[error("task is completed")]
    TaskCompleted,
    #[error("task has expired")]
    TaskExpired,
    #[error("lease would outlive its task")]
    OutlivesTask,
    #[error("task already holds its maximum of {0} leases")]
    TaskLeaseCap(u32),
    #[error("lease not found")]
    LeaseNotFound,
    #[error("lease is {}", .0.as_str())]
    LeaseState(LeaseState),
    #[error("record already exists")]
    Duplicate,
    #[error("{0}")]
    Chain(String),
    #[error("approval not found")]
    ApprovalNotFound,
    #[error("{0}")]
    Approval(String),
    #[error("no review for this task")]
    ReviewNotFound,
    #[error("no such fence")]
    FenceNotFound,
    #[error("the workload, tenant or user is fenced")]
    Fenced,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Conflict(Conflict),
    #[error("the store file {path} is in use by another process (is another leasehold running?)")]
    Locked { path: PathBuf },
    #[error("store I/O error: {0}")]
    Io(String),
    #[error("store commit failed: {0}")]
    Commit(String),
    #[error("the transaction was aborted because another operation in its batch failed to write")]
    Aborted,
    #[error("the store is closed")]
    Closed,
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    #[error(
        "the store key (fingerprint {given}) does not match the key this store was created with \
         (fingerprint {expected}); refusing to start rather than re-key silently"
    )]
    WrongKey { given: String, expected: String },
    #[error("this is not a leasehold store: {0}")]
    NotAStore(String),
    #[error(
        "the store has schema version {found}, newer than this build supports ({supported}); upgrade leasehold"
    )]
    NewerSchema { found: u32, supported: u32 },
    #[error("no migration from schema version {from} towards {to}")]
    NoMigration { from: u32, to: u32 },
    #[error(
        "the store has schema version {found}, older than this build reads ({supported}) without \
         migrating it; start this build's broker on it once (it migrates the store as it opens), \
         or read it with the build that wrote it"
    )]
    OlderSchema { found: u32, supported: u32 },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Io(e.to_string())
            }
        }
    )*};
}
from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError
);

impl StoreError {
    /// The store could not do its job (as opposed to refusing a request).
    pub fn is_unavailable(&self) -> bool {
        !matches!(self, Self::Conflict(_))
    }
}

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
    pub on_commit: Option<CommitHook>,
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

    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cache_bytes: 64 << 20,
            quick_repair: true,
            group_commit: GroupCommit::default(),
            checkpoint_bytes: Self::DEFAULT_CHECKPOINT_BYTES,
            checkpoint_idle: std::time::Duration::from_secs(1),
            on_commit: None,
        }
    }
}

type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job = Box<dyn for<'t> FnOnce(&mut Txn<'t>) -> Reply + Send>;

/// Most operations merged into one transaction.
const MAX_BATCH: usize = 2048;
/// Operations waiting for the writer before callers wait to enqueue.
const QUEUE_DEPTH: usize = 16 * 1024;

/// Commit statistics, for metrics and the benchmark.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub commits: AtomicU64,
    pub operations: AtomicU64,
    /// Time spent applying operations, and committing (incl. fsync), in µs.
    pub apply_micros: AtomicU64,
    pub commit_micros: AtomicU64,
    /// Checkpoints (durable redb commits that empty the log), and their time.
    pub checkpoints: AtomicU64,
    pub checkpoint_micros: AtomicU64,
    /// Bytes appended to the write-ahead log, and the time appending and
    /// syncing them (part of `commit_micros`).
    pub wal_bytes: AtomicU64,
    pub wal_micros: AtomicU64,
}

struct Inner {
    db: Arc<Database>,
    path: PathBuf,
    sender: Option<mpsc::Sender<Job>>,
    writer: Option<JoinHandle<()>>,
    healthy: Arc<AtomicBool>,
    stats: Arc<CommitStats>,
    sealer: Sealer,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel lets the writer drain what is queued and exit;
        // joining it makes "the store is dropped" mean "every acknowledged
        // write is on disk and the file is closed cleanly".
        self.sender.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
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
            .field("path", &self.inner.path)
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
        if let Some(dir) = opts.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        }
        let db = redb::Builder::new()
            .set_cache_size(opts.cache_bytes)
            .create(&opts.path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                    path: opts.path.clone(),
                },
                other => StoreError::Io(format!("{}: {other}", opts.path.display())),
            })?;
        #[cfg(unix)]
        {
            // the file holds sealed handles and metadata: owner only
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&opts.path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| StoreError::Io(format!("{}: {e}", opts.path.display())))?;
        }
        let sealer = Sealer::new(key);
        // before anything else writes: the log's records belong to the
        // file's last checkpoint, whatever this build does next
        let (wal, recovery) = wal::Wal::recover(&db, &opts.path, opts.quick_repair)?;
        if recovery.replayed > 0 || recovery.discarded_tail {
            tracing::info!(
                replayed = recovery.replayed,
                discarded_tail = recovery.discarded_tail,
                "store recovered from its write-ahead log"
            );
        }
        {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)
                .map_err(|e| StoreError::Io(e.to_string()))?;
            txn.set_quick_repair(opts.quick_repair);
            schema::prepare(&txn, &sealer, &key.fingerprint(), migrations, target)?;
            txn.commit()?;
        }
        let head = {
            let r = db.begin_read()?;
            let meta = r.open_table(META)?;
            let head = meta.get("chain_head")?.map(|g| g.value().to_vec());
            match head {
                Some(b) => ChainHead::from_bytes(&b)
                    .ok_or_else(|| StoreError::Corrupt("chain head".into()))?,
                None => ChainHead::default(),
            }
        };
        let db = Arc::new(db);
        let (sender, rx) = mpsc::channel::<Job>(QUEUE_DEPTH);
        let healthy = Arc::new(AtomicBool::new(true));
        let stats = Arc::new(CommitStats::default());
        let writer = {
            let db = db.clone();
            let healthy = healthy.clone();
            let stats = stats.clone();
            let cfg = WriterConfig {
                group: opts.group_commit,
                quick_repair: opts.quick_repair,
                checkpoint_bytes: opts.checkpoint_bytes,
                checkpoint_idle: opts.checkpoint_idle,
                on_commit: opts.on_commit.clone(),
            };
            std::thread::Builder::new()
                .name("leasehold-store-writer".into())
                .spawn(move || writer_loop(&db, rx, cfg, &healthy, &stats, head, wal))
                .map_err(|e| StoreError::Io(format!("cannot start the writer thread: {e}")))?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path: opts.path.clone(),
                sender: Some(sender),
                writer: Some(writer),
                healthy,
                stats,
                sealer,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn sealer(&self) -> &Sealer {
        &self.inner.sealer
    }

    pub fn stats(&self) -> &CommitStats {
        &self.inner.stats
    }

    /// False once the writer has died or a commit failed; readiness reports it.
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed) && self.read().is_ok()
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
        let (tx, rx) = oneshot::channel::<Result<R, StoreError>>();
        let job: Job = Box::new(move |txn: &mut Txn<'_>| {
            let result = op(txn);
            Box::new(move |commit: Result<(), String>| {
                let out = match (commit, result) {
                    (Ok(()), r) => r,
                    // a refused operation wrote nothing: report its refusal
                    (Err(_), Err(StoreError::Conflict(c))) => Err(StoreError::Conflict(c)),
                    (Err(e), _) => Err(StoreError::Commit(e)),
                };
                let _ = tx.send(out);
            })
        });
        let sender = self.inner.sender.as_ref().ok_or(StoreError::Closed)?;
        sender.send(job).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// A consistent snapshot for reads.
    pub fn read(&self) -> Result<Reader, StoreError> {
        Ok(Reader {
            txn: self.inner.db.begin_read()?,
        })
    }
}

/// When the writer lingers to gather a bigger batch (PostgreSQL's
/// `commit_delay` and `commit_siblings`, for the same reason).
#[derive(Debug, Clone, Copy)]
pub struct GroupCommit {
    pub delay: std::time::Duration,
    pub siblings: usize,
}

impl Default for GroupCommit {
    fn default() -> Self {
        Self {
            delay: std::time::Duration::from_micros(500),
            siblings: 4,
        }
    }
}

struct WriterConfig {
    group: GroupCommit,
    on_commit: Option<CommitHook>,
    quick_repair: bool,
    checkpoint_bytes: u64,
    checkpoint_idle: std::time::Duration,
}

fn writer_loop(
    db: &Database,
    mut rx: mpsc::Receiver<Job>,
    cfg: WriterConfig,
    healthy: &AtomicBool,
    stats: &CommitStats,
    mut head: ChainHead,
    mut wal: wal::Wal,
) {
    // only to wait for the next job with a timeout (the idle checkpoint)
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            healthy.store(false, Ordering::Relaxed);
            tracing::error!(error = %e, "the store writer cannot start; every write is refused");
            return;
        }
    };
    // Set once the log or a commit failed: the store file and the log may
    // disagree with what callers were told, so nothing more is written until
    // a restart recovers from the log (PostgreSQL stops on a failed fsync
    // for the same reason). Queued callers see `Closed`.
    let mut failed = false;
    let mut last = 0usize;
    loop {
        let first = if wal.pending_bytes() > 0 && !failed {
            let idle = cfg.checkpoint_idle;
            // the timer is made inside the runtime, which it needs
            match rt.block_on(async { tokio::time::timeout(idle, rx.recv()).await }) {
                Ok(Some(j)) => j,
                Ok(None) => break,
                Err(_) => {
                    checkpoint(db, &mut wal, &cfg, stats, healthy, &mut failed);
                    continue;
                }
            }
        } else {
            match rx.blocking_recv() {
                Some(j) => j,
                None => break,
            }
        };
        if failed {
            // dropping a job answers its caller with `Closed`
            drop(first);
            while rx.try_recv().is_ok() {}
            continue;
        }
        // Under concurrent load (the last batch had company), keep the batch
        // open briefly so more operations share this commit's fsync; alone,
        // commit now.
        let linger =
            (!cfg.group.delay.is_zero() && last >= cfg.group.siblings).then_some(cfg.group.delay);
        let (n, outcome) = run_batch(db, first, &mut rx, linger, &cfg, stats, &mut head, &mut wal);
        last = n;
        match outcome {
            Ok(()) => {
                healthy.store(true, Ordering::Relaxed);
            }
            Err(BatchError::Refused(e)) => {
                healthy.store(false, Ordering::Relaxed);
                tracing::error!(error = %e, operations = n, "store batch failed; its requests were refused");
            }
            Err(BatchError::Fatal(e)) => stop_writing(healthy, &mut failed, &e),
        }
        if !failed && wal.pending_bytes() >= cfg.checkpoint_bytes {
            checkpoint(db, &mut wal, &cfg, stats, healthy, &mut failed);
        }
    }
    if !failed && wal.pending_bytes() > 0 {
        // a clean close leaves an empty log: the next start replays nothing
        checkpoint(db, &mut wal, &cfg, stats, healthy, &mut failed);
    }
}

fn checkpoint(
    db: &Database,
    wal: &mut wal::Wal,
    cfg: &WriterConfig,
    stats: &CommitStats,
    healthy: &AtomicBool,
    failed: &mut bool,
) {
    let started = std::time::Instant::now();
    let bytes = wal.pending_bytes();
    match wal.checkpoint(db, cfg.quick_repair) {
        Ok(()) => {
            stats.checkpoints.fetch_add(1, Ordering::Relaxed);
            stats
                .checkpoint_micros
                .fetch_add(micros(started.elapsed()), Ordering::Relaxed);
            tracing::debug!(
                log_bytes = bytes,
                seconds = started.elapsed().as_secs_f64(),
                "store checkpoint"
            );
        }
        Err(e) => stop_writing(healthy, failed, &format!("checkpoint: {e}")),
    }
}

/// The log or the store file may now disagree with what callers were told:
/// write nothing more until a restart recovers from the log.
fn stop_writing(healthy: &AtomicBool, failed: &mut bool, error: &str) {
    *failed = true;
    healthy.store(false, Ordering::Relaxed);
    tracing::error!(
        error,
        "the store cannot write durably; every write is refused until a restart recovers from the write-ahead log"
    );
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

enum BatchError {
    /// Nothing was written: the batch's callers are refused, the store goes on.
    Refused(String),
    /// The log or the store file may now hold more than callers were told.
    Fatal(String),
}

/// How often a lingering batch looks for more operations.
const LINGER_POLL: std::time::Duration = std::time::Duration::from_micros(50);

/// Gather and apply a batch, log it durably, then commit it (see [`wal`]).
/// The batch takes `first`, every job already queued and, with a `linger`,
/// whatever arrives until it has passed since the batch began: each job is
/// applied as it is taken, so the linger overlaps the batch's own work
/// instead of preceding it. Returns how many jobs the batch took. Jobs that
/// never ran (the transaction could not begin) are dropped, which their
/// callers see as `Closed`.
fn run_batch(
    db: &Database,
    first: Job,
    rx: &mut mpsc::Receiver<Job>,
    linger: Option<std::time::Duration>,
    cfg: &WriterConfig,
    stats: &CommitStats,
    head: &mut ChainHead,
    wal: &mut wal::Wal,
) -> (usize, Result<(), BatchError>) {
    let started = std::time::Instant::now();
    let deadline = linger.map(|d| started + d);
    let mut txn = match db.begin_write() {
        Ok(t) => t,
        Err(e) => return (1, Err(BatchError::Refused(e.to_string()))),
    };
    if let Err(e) = txn.set_durability(Durability::None) {
        return (1, Err(BatchError::Refused(e.to_string())));
    }
    let mut idle = std::time::Duration::ZERO;
    let (replies, finished) = {
        let mut t = Txn::open(&txn, *head);
        let mut replies: Vec<Reply> = Vec::with_capacity(64);
        replies.push(first(&mut t));
        loop {
            while replies.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => replies.push(j(&mut t)),
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
        let entered = t.take_entered();
        (replies, t.finish().map(|(h, redo)| (h, redo, entered)))
    };
    let applied = std::time::Instant::now();
    let mut entered = BTreeMap::new();
    let outcome: Result<(), BatchError> = match finished {
        Ok((new_head, redo, e)) => {
            entered = e;
            let logged = if redo.is_empty() {
                Ok(())
            } else {
                stats
                    .wal_bytes
                    .fetch_add(redo.len() as u64, Ordering::Relaxed);
                let t = std::time::Instant::now();
                let r = wal.append(&redo).map(|_| ());
                stats
                    .wal_micros
                    .fetch_add(micros(t.elapsed()), Ordering::Relaxed);
                r
            };
            match logged {
                Err(e) => {
                    let _ = txn.abort();
                    Err(BatchError::Fatal(format!("write-ahead log: {e}")))
                }
                Ok(()) => txn
                    .commit()
                    .map(|()| *head = new_head)
                    .map_err(|e| BatchError::Fatal(format!("commit after logging: {e}"))),
            }
        }
        Err(e) => {
            let _ = txn.abort();
            Err(BatchError::Refused(e.to_string()))
        }
    };
    stats.apply_micros.fetch_add(
        micros((applied - started).saturating_sub(idle)),
        Ordering::Relaxed,
    );
    stats
        .commit_micros
        .fetch_add(micros(applied.elapsed()), Ordering::Relaxed);
    if outcome.is_ok() {
        // counted before anyone is answered, so a caller sees its own commit
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats
            .operations
            .fetch_add(replies.len() as u64, Ordering::Relaxed);
        if let Some(hook) = &cfg.on_commit {
            hook(started.elapsed().as_secs_f64(), replies.len(), &entered);
        }
    }
    let told = match &outcome {
        Ok(()) => Ok(()),
        Err(BatchError::Refused(e) | BatchError::Fatal(e)) => Err(e.clone()),
    };
    let n = replies.len();
    for reply in replies {
        reply(told.clone());
    }
    (n, outcome)
}

/// One event as stored: its place, hash, task and canonical bytes.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub hash: [u8; 32],
    pub task: Option<u128>,
    pub bytes: Vec<u8>,
}

impl From<blocks::Entry<'_>> for StoredEvent {
    fn from(e: blocks::Entry<'_>) -> Self {
        Self {
            seq: e.seq,
            hash: e.hash,
            task: (e.task != 0).then_some(e.task),
            bytes: e.bytes.to_vec(),
        }
    }
}

/// A read-only view of a store file, for offline verification. It needs no
/// key (events are not encrypted) and refuses a file a broker has open. A
/// store whose broker did not stop cleanly has writes in its log that the
/// file lacks: those are replayed into the file first (what the next start
/// would do), so the view holds every acknowledged write.
pub struct Snapshot {
    db: redb::ReadOnlyDatabase,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Snapshot")
    }
}

impl Snapshot {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let locked = |e: redb::DatabaseError| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: path.to_owned(),
            },
            other => StoreError::Io(format!("{}: {other}", path.display())),
        };
        // a file whose broker was killed needs a repair, which a read-only
        // open cannot do; the read-write open below does it
        match redb::ReadOnlyDatabase::open(path) {
            Ok(db) => {
                if wal::pending(path, wal::checkpointed(&db)?)? == 0 {
                    return Self::checked(db);
                }
            }
            Err(redb::DatabaseError::RepairAborted) => {}
            Err(e) => return Err(locked(e)),
        }
        {
            let rw = redb::Database::open(path).map_err(locked)?;
            let (_, recovery) = wal::Wal::recover(&rw, path, true)?;
            tracing::info!(
                replayed = recovery.replayed,
                "replayed the store's write-ahead log into its file before reading it"
            );
        }
        let db = redb::ReadOnlyDatabase::open(path).map_err(locked)?;
        Self::checked(db)
    }

    /// A snapshot is read with this build's layout, so only a store at this
    /// build's schema version can be read (a read-only view cannot migrate).
    fn checked(db: redb::ReadOnlyDatabase) -> Result<Self, StoreError> {
        let version = {
            let r = db.begin_read()?;
            let meta = match r.open_table(META) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => {
                    return Err(StoreError::NotAStore(
                        "the file holds no leasehold metadata".into(),
                    ));
                }
                Err(e) => return Err(e.into()),
            };
            schema::schema_version(&meta)?
                .ok_or_else(|| StoreError::NotAStore("no schema version".into()))?
        };
        match version.cmp(&SCHEMA_VERSION) {
            std::cmp::Ordering::Equal => Ok(Self { db }),
            std::cmp::Ordering::Less => Err(StoreError::OlderSchema {
                found: version,
                supported: SCHEMA_VERSION,
            }),
            std::cmp::Ordering::Greater => Err(StoreError::NewerSchema {
                found: version,
                supported: SCHEMA_VERSION,
            }),
        }
    }

    pub fn read(&self) -> Result<Reader, StoreError> {
        Ok(Reader {
            txn: self.db.begin_read()?,
        })
    }
}

/// A read snapshot.
pub struct Reader {
    txn: ReadTransaction,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reader")
    }
}

impl Reader {
    pub fn task(&self, id: u128) -> Result<Option<TaskRecord>, StoreError> {
        let t = self.txn.open_table(TASKS)?;
        let g = t.get(id)?;
        g.map(|g| codec::decode(g.value())).transpose()
    }

    pub fn lease(&self, id: u128) -> Result<Option<LeaseRecord>, StoreError> {
        let t = self.txn.open_table(LEASES)?;
        let g = t.get(id)?;
        g.map(|g| codec::decode(g.value())).transpose()
    }

    pub fn task_leases(&self, task: u128) -> Result<Vec<LeaseRecord>, StoreError> {
        let idx = self.txn.open_table(TASK_LEASES)?;
        let leases = self.txn.open_table(LEASES)?;
        let mut out = Vec::new();
        for e in idx.range((task, 0u128)..=(task, u128::MAX))? {
            let id = e?.0.value().1;
            if let Some(g) = leases.get(id)? {
                out.push(codec::decode(g.value())?);
            }
        }
        Ok(out)
    }

    /// One page of leases; the cursor is `Some` when more may follow.
    pub fn list_leases(
        &self,
        q: &LeaseQuery,
    ) -> Result<(Vec<LeaseRecord>, Option<u128>), StoreError> {
        let leases = self.txn.open_table(LEASES)?;
        let start = q.after.map_or(0, |a| a.saturating_add(1));
        let limit = q.limit.max(1);
        let budget = q.scan_budget.max(limit);
        let mut out = Vec::new();
        let mut scanned = 0usize;
        let mut last = None;
        let keep = |r: &LeaseRecord| {
            q.provider.as_ref().is_none_or(|p| &r.provider == p)
                && q.role.as_ref().is_none_or(|p| &r.role == p)
                && q.state.is_none_or(|s| r.state == s)
                && q.workload.as_ref().is_none_or(|w| &r.workload == w)
                && q.task.is_none_or(|t| r.task_id == t)
        };
        let mut visit = |id: u128, bytes: &[u8]| -> Result<bool, StoreError> {
            scanned += 1;
            last = Some(id);
            let r: LeaseRecord = codec::decode(bytes)?;
            if keep(&r) {
                out.push(r);
            }
            Ok(out.len() < limit && scanned < budget)
        };
        let mut exhausted = true;
        if let Some(task) = q.task {
            let idx = self.txn.open_table(TASK_LEASES)?;
            for e in idx.range((task, start)..=(task, u128::MAX))? {
                let id = e?.0.value().1;
                if let Some(g) = leases.get(id)?
                    && !visit(id, g.value())?
                {
                    exhausted = false;
                    break;
                }
            }
        } else if let Some(w) = q.workload.as_deref() {
            let idx = self.txn.open_table(WORKLOAD_LEASES)?;
            for e in idx.range((w, start)..=(w, u128::MAX))? {
                let id = e?.0.value().1;
                if let Some(g) = leases.get(id)?
                    && !visit(id, g.value())?
                {
                    exhausted = false;
                    break;
                }
            }
        } else {
            for e in leases.range(start..)? {
                let (k, v) = e?;
                if !visit(k.value(), v.value())? {
                    exhausted = false;
                    break;
                }
            }
        }
        Ok((out, if exhausted { None } else { last }))
    }

    /// The earliest deadline in the expiry index.
    pub fn next_expiry(&self) -> Result<Option<i64>, StoreError> {
        let t = self.txn.open_table(EXPIRY)?;
        Ok(t.first()?.map(|(k, _)| k.value().0))
    }

    /// Up to `limit` leases of `provider` whose revocation attempt is due.
    pub fn due_revocations(
        &self,
        provider: &str,
        now: i64,
        limit: usize,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let q = self.txn.open_table(REVOKE_QUEUE)?;
        let leases = self.txn.open_table(LEASES)?;
        let mut out = Vec::new();
        for e in q.range((provider, i64::MIN, 0u128)..=(provider, now, u128::MAX))? {
            let id = e?.0.value().2;
            if let Some(g) = leases.get(id)? {
                out.push(codec::decode(g.value())?);
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// When the next revocation attempt of `provider` is due.
    pub fn next_revocation(&self, provider: &str) -> Result<Option<i64>, StoreError> {
        let q = self.txn.open_table(REVOKE_QUEUE)?;
        let first = q
            .range((provider, i64::MIN, 0u128)..=(provider, i64::MAX, u128::MAX))?
            .next();
        Ok(match first {
            Some(e) => Some(e?.0.value().1),
            None => None,
        })
    }

    /// Number of unresolved intents (should be zero after recovery).
    pub fn issuing_count(&self) -> Result<u64, StoreError> {
        Ok(self.txn.open_table(ISSUING)?.len()?)
    }

    /// Lease counts by (provider, state), kept transactionally.
    pub fn counters(&self) -> Result<BTreeMap<(String, LeaseState), u64>, StoreError> {
        let t = self.txn.open_table(COUNTERS)?;
        let mut out = BTreeMap::new();
        for e in t.iter()? {
            let (k, v) = e?;
            let (p, s) = k.value();
            if let Some(state) = LeaseState::parse(s) {
                out.insert((p.to_owned(), state), v.value());
            }
        }
        Ok(out)
    }

    /// The last event of the chain.
    pub fn chain_head(&self) -> Result<ChainHead, StoreError> {
        self.meta_head("chain_head")
    }

    /// Where the chain starts (the last pruned event), genesis if never pruned.
    pub fn chain_base(&self) -> Result<ChainHead, StoreError> {
        self.meta_head("chain_base")
    }

    fn meta_head(&self, key: &str) -> Result<ChainHead, StoreError> {
        let meta = self.txn.open_table(META)?;
        let v = meta.get(key)?.map(|g| g.value().to_vec());
        match v {
            Some(b) => {
                ChainHead::from_bytes(&b).ok_or_else(|| StoreError::Corrupt(format!("meta {key}")))
            }
            None => Ok(ChainHead::default()),
        }
    }

    /// Events with seq > `after`, in order, at most `limit`.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let t = self.txn.open_table(EVENT_BLOCKS)?;
        let mut out = Vec::new();
        // the first block whose key is past `after` holds `after + 1`
        'blocks: for e in t.range(after.saturating_add(1)..)? {
            let (k, v) = e?;
            for e in blocks::entries(k.value(), v.value()) {
                let e = e?;
                if e.seq <= after {
                    continue;
                }
                out.push(StoredEvent::from(e));
                if out.len() >= limit {
                    break 'blocks;
                }
            }
        }
        Ok(out)
    }

    /// Visit every event in order (verification) without collecting them.
    pub fn for_each_event(
        &self,
        mut f: impl FnMut(u64, [u8; 32], &[u8]),
    ) -> Result<(), StoreError> {
        let t = self.txn.open_table(EVENT_BLOCKS)?;
        for e in t.iter()? {
            let (k, v) = e?;
            for e in blocks::entries(k.value(), v.value()) {
                let e = e?;
                f(e.seq, e.hash, e.bytes);
            }
        }
        Ok(())
    }

    /// A task's events with seq > `after`. The task index points at the
    /// task's first event in each block; the block is read from there.
    pub fn task_events(
        &self,
        task: u128,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let idx = self.txn.open_table(EVENT_TASKS)?;
        let t = self.txn.open_table(EVENT_BLOCKS)?;
        let mut out = Vec::new();
        // the block of the last entry at or before `after` may hold later
        // events of the task
        let start = match idx.range((task, 0)..=(task, after))?.next_back() {
            Some(e) => e?.0.value().1,
            None => after.saturating_add(1),
        };
        let mut last = after;
        'index: for e in idx.range((task, start)..=(task, u64::MAX))? {
            let from = e?.0.value().1;
            let Some(b) = t.range(from..)?.next() else {
                continue;
            };
            let (k, v) = b?;
            for e in blocks::entries(k.value(), v.value()) {
                let e = e?;
                if e.seq < from || e.seq <= last || e.task != task {
                    continue;
                }
                last = e.seq;
                out.push(StoredEvent::from(e));
                if out.len() >= limit {
                    break 'index;
                }
            }
        }
        Ok(out)
    }

    /// Every signed checkpoint, as stored.
    pub fn checkpoints(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let t = self.txn.open_table(CHECKPOINTS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    pub fn last_checkpoint_seq(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .txn
            .open_table(CHECKPOINTS)?
            .last()?
            .map(|(k, _)| k.value()))
    }

    pub fn job(&self, id: u128) -> Result<Option<JobRecord>, StoreError> {
        let t = self.txn.open_table(JOBS)?;
        let g = t.get(id)?;
        g.map(|g| codec::decode(g.value())).transpose()
    }

    /// Every job (few: one per incident).
    pub fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let t = self.txn.open_table(JOBS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            out.push(codec::decode(e?.1.value())?);
        }
        Ok(out)
    }

    /// A job's lease counts by provider and bucket ([`records::job_bucket`]).
    pub fn job_counts(
        &self,
        job: u128,
    ) -> Result<BTreeMap<String, BTreeMap<&'static str, u64>>, StoreError> {
        let t = self.txn.open_table(JOB_COUNTS)?;
        let mut out: BTreeMap<String, BTreeMap<&'static str, u64>> = BTreeMap::new();
        for e in t.range((job, "", "")..=(job, "\u{10ffff}", "\u{10ffff}"))? {
            let (k, v) = e?;
            let (_, p, b) = k.value();
            if let Some(bucket) = records::JOB_BUCKETS.iter().find(|x| **x == b) {
                *out.entry(p.to_owned())
                    .or_default()
                    .entry(bucket)
                    .or_default() += v.value();
            }
        }
        Ok(out)
    }

    /// A job's leases that are not (yet) revoked, up to `limit`.
    pub fn job_unfinished(&self, job: u128, limit: usize) -> Result<Vec<LeaseRecord>, StoreError> {
        let idx = self.txn.open_table(JOB_LEASES)?;
        let leases = self.txn.open_table(LEASES)?;
        let mut out = Vec::new();
        for e in idx.range((job, 0u128)..=(job, u128::MAX))? {
            let id = e?.0.value().1;
            if let Some(g) = leases.get(id)? {
                let l: LeaseRecord = codec::decode(g.value())?;
                if matches!(l.state, LeaseState::Revoking | LeaseState::Irrevocable)
                    && l.revocation
                        .as_ref()
                        .is_some_and(|r| r.last_error.is_some())
                {
                    out.push(l);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Lease ids after `after` from the index a selector scans best.
    pub fn candidate_leases(
        &self,
        sel: &Selector,
        after: Option<u128>,
        limit: usize,
    ) -> Result<Vec<u128>, StoreError> {
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::with_capacity(limit);
        if let Some(task) = sel.task {
            let idx = self.txn.open_table(TASK_LEASES)?;
            for e in idx.range((task, start)..=(task, u128::MAX))? {
                out.push(e?.0.value().1);
                if out.len() >= limit {
                    break;
                }
            }
        } else if let Some(w) = sel.workload.as_deref() {
            let idx = self.txn.open_table(WORKLOAD_LEASES)?;
            for e in idx.range((w, start)..=(w, u128::MAX))? {
                out.push(e?.0.value().1);
                if out.len() >= limit {
                    break;
                }
            }
        } else {
            let t = self.txn.open_table(LEASES)?;
            for e in t.range(start..)? {
                out.push(e?.0.value());
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    pub fn fences(&self) -> Result<Vec<FenceRecord>, StoreError> {
        let t = self.txn.open_table(FENCES)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            out.push(codec::decode(e?.1.value())?);
        }
        Ok(out)
    }

    /// A workload's tasks created at or after `since`.
    pub fn workload_tasks(
        &self,
        workload: &str,
        since: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let idx = self.txn.open_table(WORKLOAD_TASKS)?;
        let tasks = self.txn.open_table(TASKS)?;
        let mut out = Vec::new();
        // task ids are time-ordered: start at the first id of `since`
        let first = u128::try_from(since.max(0)).unwrap_or(0) << 80;
        for e in idx.range((workload, first)..=(workload, u128::MAX))? {
            let id = e?.0.value().1;
            if let Some(g) = tasks.get(id)? {
                out.push(codec::decode(g.value())?);
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    pub fn task_active(&self, task: u128) -> Result<u64, StoreError> {
        Ok(self
            .txn
            .open_table(TASK_ACTIVE)?
            .get(task)?
            .map(|g| g.value())
            .unwrap_or(0))
    }

    pub fn workload_active(&self, workload: &str) -> Result<u64, StoreError> {
        Ok(self
            .txn
            .open_table(WORKLOAD_ACTIVE)?
            .get(workload)?
            .map(|g| g.value())
            .unwrap_or(0))
    }

    pub fn task_calls(&self, task: u128) -> Result<Vec<CallRecord>, StoreError> {
        let calls = self.txn.open_table(TASK_CALLS)?;
        let mut out = Vec::new();
        for e in calls.range((task, 0u128)..=(task, u128::MAX))? {
            out.push(codec::decode(e?.1.value())?);
        }
        Ok(out)
    }

    pub fn approval(&self, id: u128) -> Result<Option<ApprovalRecord>, StoreError> {
        let t = self.txn.open_table(APPROVALS)?;
        let g = t.get(id)?;
        g.map(|g| codec::decode(g.value())).transpose()
    }

    /// Approvals still awaiting a decision, soonest to expire first.
    pub fn pending_approvals(&self, limit: usize) -> Result<Vec<ApprovalRecord>, StoreError> {
        let idx = self.txn.open_table(APPROVAL_EXPIRY)?;
        let t = self.txn.open_table(APPROVALS)?;
        let mut out = Vec::new();
        for e in idx.iter()? {
            let id = e?.0.value().1;
            if let Some(g) = t.get(id)? {
                let a: ApprovalRecord = codec::decode(g.value())?;
                if a.state == ApprovalState::Pending {
                    out.push(a);
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The last signed checkpoint, as stored.
    pub fn checkpoints_last(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .txn
            .open_table(CHECKPOINTS)?
            .last()?
            .map(|(_, v)| v.value().to_vec()))
    }

    /// When the next approval expires.
    pub fn next_approval_expiry(&self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .txn
            .open_table(APPROVAL_EXPIRY)?
            .first()?
            .map(|(k, _)| k.value().0))
    }

    pub fn review(&self, task: u128) -> Result<Option<ReviewRecord>, StoreError> {
        let t = self.txn.open_table(REVIEWS)?;
        let g = t.get(task)?;
        g.map(|g| codec::decode(g.value())).transpose()
    }

    pub fn pending_reviews(&self, limit: usize) -> Result<Vec<ReviewRecord>, StoreError> {
        let idx = self.txn.open_table(PENDING_REVIEWS)?;
        let t = self.txn.open_table(REVIEWS)?;
        let mut out = Vec::new();
        for e in idx.iter()? {
            let id = e?.0.value();
            if let Some(g) = t.get(id)? {
                out.push(codec::decode(g.value())?);
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    pub fn is_denied(&self, jti: u128) -> Result<bool, StoreError> {
        Ok(self.txn.open_table(DENYLIST)?.get(jti)?.is_some())
    }
}

#[cfg(test)]
mod tests;
