//! The redb backend's writer engine: one thread owns every write
//! transaction. It takes whatever operations are queued, applies them all
//! in one transaction, appends their changes to the write-ahead log as one
//! record and syncs it ([`wal`]), commits the transaction, then answers
//! each caller; a lone write is answered before the commit (its event
//! block deflated in between, [`repack`]), and [`Visibility`] makes a read
//! begun after its answer wait for the commit.
//! Under load, concurrent requests share one sync, and the
//! batch stays open for the configured delay, applying operations as they
//! arrive (so the delay overlaps the batch's work rather than adding to
//! it); idle, a single operation commits alone with no added delay. A
//! checkpoint (a durable redb commit stamped with the last record, then an
//! empty log) runs when the log passes its size, after a second without
//! writes, and at close.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use redb::{Database, Durability, ReadableDatabase as _};
use tokio::sync::mpsc;

use super::key::{Sealer, StoreKey};
use super::kv::{ReadSource, Source};
use super::lifecycle::ChainHead;
use super::reader::KvReader;
use super::schema::{self, META, Migration};
use super::seam::Reader;
use super::txn::KvTxn;
use super::{Backend, CommitHook, CommitStats, Job, QUEUE_DEPTH, StoreError, StoreOptions, wal};

/// The redb backend: the database, its writer thread and its health.
pub(super) struct RedbBackend {
    db: Arc<Database>,
    path: std::path::PathBuf,
    writer: Option<JoinHandle<()>>,
    healthy: Arc<AtomicBool>,
    stats: Arc<CommitStats>,
    sealer: Sealer,
    fence: Arc<Visibility>,
}

impl Backend for RedbBackend {
    fn read(&self) -> Result<Reader, StoreError> {
        self.fence.settle();
        Ok(Box::new(KvReader::new(ReadSource::Redb(
            self.db.begin_read()?,
        ))))
    }

    fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    fn stats(&self) -> &CommitStats {
        &self.stats
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.read().is_ok()
    }

    fn location(&self) -> &Path {
        &self.path
    }

    fn leadership(&self) -> super::Leadership {
        super::Leadership::single()
    }

    /// Joining the writer (its queue already closed) makes "the store is
    /// dropped" mean "every acknowledged write is on disk and the file is
    /// closed cleanly".
    fn close(&mut self) {
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn raw(&self) -> Result<ReadSource, StoreError> {
        self.fence.settle();
        Ok(ReadSource::Redb(self.db.begin_read()?))
    }
}

impl RedbBackend {
    /// The database (the store's tests read its tables directly; `copy`
    /// writes them).
    pub(super) fn db(&self) -> &Arc<Database> {
        &self.db
    }
}

/// Open (or create) the file, recover from its log, check the key and the
/// schema, migrate if needed, and start the writer, which takes its jobs
/// from the returned queue.
pub(super) fn open(
    opts: &StoreOptions,
    key: &StoreKey,
    migrations: &[(u32, Migration)],
    target: u32,
) -> Result<(Box<dyn Backend>, mpsc::Sender<Job>), StoreError> {
    if let Some(dir) = opts.path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // a directory the broker creates is its own alone
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt as _;
            b.mode(0o700);
        }
        b.create(dir)
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
            Some(b) => {
                ChainHead::from_bytes(&b).ok_or_else(|| StoreError::Corrupt("chain head".into()))?
            }
            None => ChainHead::default(),
        }
    };
    let db = Arc::new(db);
    let (sender, rx) = mpsc::channel::<Job>(QUEUE_DEPTH);
    let healthy = Arc::new(AtomicBool::new(true));
    let stats = Arc::new(CommitStats::default());
    let fence = Arc::new(Visibility::default());
    let writer = {
        let db = db.clone();
        let healthy = healthy.clone();
        let stats = stats.clone();
        let fence = fence.clone();
        let cfg = WriterConfig {
            group: opts.group_commit,
            quick_repair: opts.quick_repair,
            checkpoint_bytes: opts.checkpoint_bytes,
            checkpoint_idle: opts.checkpoint_idle,
            reserve: opts.reserve_bytes,
            on_commit: opts.on_commit.clone(),
            #[cfg(test)]
            hold_before_commit: opts.hold_before_commit,
        };
        std::thread::Builder::new()
            .name("leasehold-store-writer".into())
            .spawn(move || writer_loop(&db, rx, cfg, (&healthy, &stats, &fence), head, wal))
            .map_err(|e| StoreError::Io(format!("cannot start the writer thread: {e}")))?
    };
    let backend = RedbBackend {
        db,
        path: opts.path.clone(),
        writer: Some(writer),
        healthy,
        stats,
        sealer,
        fence,
    };
    Ok((Box::new(backend), sender))
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
    /// Refuse writes while the filesystem has less than this free.
    reserve: u64,
    #[cfg(test)]
    hold_before_commit: std::time::Duration,
}

fn writer_loop(
    db: &Database,
    mut rx: mpsc::Receiver<Job>,
    cfg: WriterConfig,
    (healthy, stats, fence): (&AtomicBool, &CommitStats, &Visibility),
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
        let (n, outcome) = run_batch(
            db,
            first,
            &mut rx,
            linger,
            (&cfg, stats, fence),
            &mut head,
            &mut wal,
        );
        last = n;
        match outcome {
            Ok(()) => {
                healthy.store(true, Ordering::Relaxed);
            }
            // counted and flagged in `run_batch`, before its callers heard
            Err(BatchError::NoSpace(_)) => {}
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
    // a checkpoint writes about what the log holds into the store file: put
    // it off (the log keeps everything) rather than fail it for lack of room
    if let Some(free) = wal.free_bytes()
        && free < bytes.saturating_mul(2).saturating_add(1 << 20)
    {
        stats.checkpoints_postponed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            free_bytes = free,
            log_bytes = bytes,
            "checkpoint put off: too little space on the store's filesystem"
        );
        return;
    }
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
    /// Nothing was written for lack of space: refused, retried later.
    NoSpace(String),
    /// The log or the store file may now hold more than callers were told.
    Fatal(String),
}

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
    (cfg, stats, fence): (&WriterConfig, &CommitStats, &Visibility),
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
    let (replies, idle, finished) = {
        let mut t = KvTxn::open(Source::Redb(&txn), *head);
        let (replies, idle) = super::gather(&mut t, first, rx, deadline);
        let entered = t.take_entered();
        // a lone write's last block is packed after its answer (`repack`)
        let finished = t
            .finish_packing(replies.len() > 1)
            .map(|(h, redo, plain)| (h, redo, entered, plain));
        (replies, idle, finished)
    };
    let applied = std::time::Instant::now();
    let mut entered = BTreeMap::new();
    let mut plain = None;
    // logged: the batch is durable and may be answered; redb's commit
    // (no I/O: it makes the batch visible to readers) comes below, before
    // or after the answers
    let mut logged_txn = None;
    let mut outcome: Result<(), BatchError> = match finished {
        Ok((new_head, redo, e, p)) => {
            entered = e;
            plain = p;
            let short = wal.free_bytes().filter(|free| *free < cfg.reserve);
            let logged = if redo.is_empty() {
                Ok(())
            } else if let Some(free) = short {
                Err(wal::AppendError::NoSpace(format!(
                    "{} bytes free on the store's filesystem, under the {} reserved (store.reserve_mib)",
                    free, cfg.reserve
                )))
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
                Err(wal::AppendError::NoSpace(e)) => {
                    let _ = txn.abort();
                    Err(BatchError::NoSpace(e))
                }
                Err(e) => {
                    let _ = txn.abort();
                    Err(BatchError::Fatal(format!("write-ahead log: {e}")))
                }
                Ok(()) => {
                    logged_txn = Some((txn, new_head));
                    Ok(())
                }
            }
        }
        Err(e) => {
            let _ = txn.abort();
            Err(BatchError::Refused(e.to_string()))
        }
    };
    // A lone write is answered once logged, before redb's commit (below),
    // which then costs its caller nothing. A batch of several commits
    // first: its callers' next reads would otherwise wait on that commit,
    // blocking the threads they run on, and under load the commit is
    // shared anyway.
    if replies.len() > 1
        && let Some((txn, new_head)) = logged_txn.take()
    {
        outcome = commit_logged(txn, new_head, head);
    }
    let told = match &outcome {
        Ok(()) => Ok(()),
        Err(BatchError::NoSpace(e)) => Err(super::Unwritten {
            message: e.clone(),
            no_space: true,
        }),
        Err(BatchError::Refused(e) | BatchError::Fatal(e)) => {
            Err(super::Unwritten::failed(e.clone()))
        }
    };
    // the store's room as callers will find it, before any is answered
    match &outcome {
        Ok(()) => {
            if stats.disk_full.swap(false, Ordering::Relaxed) {
                tracing::warn!("the store's filesystem has room again: writes resume");
            }
        }
        Err(BatchError::NoSpace(e)) => {
            stats
                .refused_no_space
                .fetch_add(replies.len() as u64, Ordering::Relaxed);
            if !stats.disk_full.swap(true, Ordering::Relaxed) {
                tracing::error!(error = %e, "the store's filesystem is full: writes are refused (503 store_full) until space is freed; reads go on");
            }
        }
        Err(_) => {}
    }
    // A lone write answered before its commit: a read begun after the
    // answer waits for that commit (`Visibility`), so nobody reads what was
    // not answered, nor misses what was.
    let told_guard = logged_txn.is_some().then(|| fence.told());
    let committed = outcome.is_ok().then_some(&entered);
    let n = super::settle(
        stats,
        cfg.on_commit.as_ref(),
        (started, applied, idle),
        committed,
        replies,
        &told,
    );
    let outcome = match logged_txn {
        None => outcome,
        Some((txn, new_head)) => {
            #[cfg(test)]
            std::thread::sleep(cfg.hold_before_commit);
            let t = std::time::Instant::now();
            if let Some((key, block)) = plain {
                repack(&txn, key, block);
            }
            // a failure: its caller was told, the log holds it, and the
            // restart that this failure calls for replays it
            let r = commit_logged(txn, new_head, head);
            // after its answers, so not in the time `settle` counted
            stats
                .commit_micros
                .fetch_add(micros(t.elapsed()), Ordering::Relaxed);
            // shown even when the commit failed (or anything here
            // panicked): readers then see the store as it was (it stops
            // writing until a restart) instead of waiting
            drop(told_guard);
            r
        }
    };
    (n, outcome)
}

/// Replace a lone write's plain event block (as logged) with its packed
/// form, after the answer and before the commit: deflate (tens of µs) is
/// then off the caller's wait, and the store holds the same bytes as when
/// the block was packed in the batch. The log keeps the plain block; a
/// replay after a crash stores that, which reads the same. Unlogged on
/// purpose, and harmless if it fails: the plain block stays.
fn repack(txn: &redb::WriteTransaction, key: u64, plain: Vec<u8>) {
    let packed = super::blocks::pack(plain);
    let r = txn
        .open_table(schema::EVENT_BLOCKS)
        .map_err(|e| e.to_string())
        .and_then(|mut t| {
            t.insert(key, packed.as_slice())
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
    if let Err(e) = r {
        tracing::warn!(error = %e, block = key, "an event block stays unpacked");
    }
}

/// redb's commit of a logged batch (no I/O: it makes the batch visible).
fn commit_logged(
    txn: redb::WriteTransaction,
    new_head: ChainHead,
    head: &mut ChainHead,
) -> Result<(), BatchError> {
    txn.commit()
        .map(|()| *head = new_head)
        .map_err(|e| BatchError::Fatal(format!("commit after logging: {e}")))
}

/// Says a told batch is committed when dropped, however the writer
/// leaves the batch.
struct Shown<'a>(&'a Visibility);

impl Drop for Shown<'_> {
    fn drop(&mut self) {
        let v = self.0;
        let _g = v
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        v.committed.fetch_add(1, Ordering::SeqCst);
        v.changed.notify_all();
    }
}

/// What readers may see: a lone write is answered once logged, then
/// committed in redb; a read that begins after such an answer first waits
/// until that batch is committed. The wait is at most one commit of one
/// write without I/O (tens of microseconds), and only for a read that
/// races one.
#[derive(Debug, Default)]
pub(super) struct Visibility {
    /// Batches answered, and batches committed (or given up on).
    answered: std::sync::atomic::AtomicU64,
    committed: std::sync::atomic::AtomicU64,
    lock: std::sync::Mutex<()>,
    changed: std::sync::Condvar,
}

impl Visibility {
    /// The writer: a batch is about to be answered. Dropping what this
    /// returns says it is committed (or never will be).
    fn told(&self) -> Shown<'_> {
        self.answered.fetch_add(1, Ordering::SeqCst);
        Shown(self)
    }

    /// A reader: wait until every batch answered so far is committed.
    pub(super) fn settle(&self) {
        let want = self.answered.load(Ordering::SeqCst);
        if self.committed.load(Ordering::SeqCst) >= want {
            return;
        }
        // the commit is short: spin a little before sleeping on it
        for _ in 0..64 {
            std::hint::spin_loop();
            if self.committed.load(Ordering::SeqCst) >= want {
                return;
            }
        }
        let mut g = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while self.committed.load(Ordering::SeqCst) < want {
            g = self
                .changed
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}
