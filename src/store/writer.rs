//! The redb backend's writer: one thread runs the write transactions.
//! It takes whatever operations are queued, applies them all
//! in one transaction, appends their changes to the write-ahead log as one
//! record and syncs it ([`wal`]), commits the transaction, then answers
//! each caller; a lone write is answered before the commit (its event
//! block deflated in between, [`repack`]), and `Visibility` makes a read
//! begun after its answer wait for the commit. On an idle store a lone
//! write runs so on its caller's thread instead ([`super::engine`]).
//! Under load, concurrent requests share one sync, and the
//! batch stays open for the configured delay, applying operations as they
//! arrive (so the delay overlaps the batch's work rather than adding to
//! it); idle, a single operation commits alone with no added delay. A
//! checkpoint (a durable redb commit stamped with the last record, then an
//! empty log) runs when the log passes its size, after a second without
//! writes, and at close.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use redb::{Database, Durability, ReadableDatabase as _};
use tokio::sync::mpsc;

use super::engine::{Engine, Shared, Tail};
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
    path: std::path::PathBuf,
    writer: Option<JoinHandle<()>>,
    sealer: Sealer,
    shared: Arc<Shared>,
}

impl Backend for RedbBackend {
    fn read(&self) -> Result<Reader, StoreError> {
        self.settle();
        Ok(Box::new(KvReader::new(ReadSource::Redb(
            self.shared.db.begin_read()?,
        ))))
    }

    /// A lone write on its caller's thread when the store is idle
    /// ([`Shared::inline`]).
    fn inline(&self, job: Job, queued: bool) -> Result<(), Job> {
        Shared::inline(&self.shared, job, queued)
    }

    fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    fn stats(&self) -> &CommitStats {
        &self.shared.stats
    }

    fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed) && self.read().is_ok()
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
        self.shared.closed.store(true, Ordering::SeqCst);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        // a commit left to run after its answer holds the store for
        // microseconds; the file is closed when this returns
        while Arc::strong_count(&self.shared) > 1 {
            std::thread::yield_now();
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn raw(&self) -> Result<ReadSource, StoreError> {
        self.settle();
        Ok(ReadSource::Redb(self.shared.db.begin_read()?))
    }
}

impl RedbBackend {
    /// The database (the store's tests read its tables directly; `copy`
    /// writes them).
    pub(super) fn db(&self) -> &Arc<Database> {
        &self.shared.db
    }

    /// Before a read: wait until every write answered so far is committed,
    /// finishing the last lone one here if nobody else is writing.
    fn settle(&self) {
        let sh = &*self.shared;
        if !sh.fence.settled()
            && let Ok(mut e) = sh.engine.try_lock()
        {
            sh.finish(&mut e);
        }
        sh.fence.settle();
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
    let shared = Arc::new(Shared {
        db,
        cfg: WriterConfig {
            group: opts.group_commit,
            quick_repair: opts.quick_repair,
            checkpoint_bytes: opts.checkpoint_bytes,
            checkpoint_idle: opts.checkpoint_idle,
            reserve: opts.reserve_bytes,
            on_commit: opts.on_commit.clone(),
            #[cfg(test)]
            hold_before_commit: opts.hold_before_commit,
        },
        healthy: AtomicBool::new(true),
        stats: Arc::new(CommitStats::default()),
        fence: Arc::default(),
        engine: Mutex::new(Engine {
            wal,
            head,
            failed: false,
            last: 0,
            ended: None,
            tail: None,
        }),
        nudge: tokio::sync::Notify::new(),
        armed: AtomicBool::new(false),
        closed: AtomicBool::new(false),
    });
    let writer = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("leasehold-store-writer".into())
            .spawn(move || writer_loop(&shared, rx))
            .map_err(|e| StoreError::Io(format!("cannot start the writer thread: {e}")))?
    };
    let backend = RedbBackend {
        path: opts.path.clone(),
        writer: Some(writer),
        sealer,
        shared,
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

pub(super) struct WriterConfig {
    pub(super) group: GroupCommit,
    pub(super) on_commit: Option<CommitHook>,
    pub(super) quick_repair: bool,
    pub(super) checkpoint_bytes: u64,
    pub(super) checkpoint_idle: std::time::Duration,
    /// Refuse writes while the filesystem has less than this free.
    pub(super) reserve: u64,
    #[cfg(test)]
    pub(super) hold_before_commit: std::time::Duration,
}

/// What woke the writer thread.
enum Wake {
    Job(Option<Job>),
    Nudged,
    Idle,
}

fn writer_loop(sh: &Shared, mut rx: mpsc::Receiver<Job>) {
    // only to wait for the next job, a nudge or the idle checkpoint
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            sh.healthy.store(false, Ordering::Relaxed);
            tracing::error!(error = %e, "the store writer cannot start; every write is refused");
            return;
        }
    };
    loop {
        let logged = {
            let e = sh.engine();
            let logged = e.wal.pending_bytes() > 0 && !e.failed;
            sh.armed.store(logged, Ordering::SeqCst);
            logged
        };
        let idle = sh.cfg.checkpoint_idle;
        // the timer is made inside the runtime, which it needs
        let wake = rt.block_on(async {
            tokio::select! {
                biased;
                j = rx.recv() => Wake::Job(j),
                () = sh.nudge.notified() => Wake::Nudged,
                () = tokio::time::sleep(idle), if logged => Wake::Idle,
            }
        });
        let mut e = sh.engine();
        sh.finish(&mut e);
        let first = match wake {
            Wake::Job(Some(j)) => j,
            Wake::Job(None) => break,
            Wake::Idle => {
                // a write on its caller's thread may have failed meanwhile
                if !e.failed {
                    checkpoint(sh, &mut e);
                }
                continue;
            }
            Wake::Nudged => {
                if !e.failed && e.wal.pending_bytes() >= sh.cfg.checkpoint_bytes {
                    checkpoint(sh, &mut e);
                }
                continue;
            }
        };
        if e.failed {
            // dropping a job answers its caller with `Closed`
            drop(first);
            while rx.try_recv().is_ok() {}
            continue;
        }
        // Under concurrent load (the last batch had company), keep the batch
        // open briefly so more operations share this commit's fsync; alone,
        // commit now.
        let linger = (!sh.cfg.group.delay.is_zero() && e.last >= sh.cfg.group.siblings)
            .then_some(sh.cfg.group.delay);
        let (n, outcome) = run_batch(sh, &mut e, first, Some(&mut rx), linger);
        sh.finish(&mut e);
        sh.record(&mut e, n, outcome);
        if !e.failed && e.wal.pending_bytes() >= sh.cfg.checkpoint_bytes {
            checkpoint(sh, &mut e);
        }
    }
    let mut e = sh.engine();
    sh.finish(&mut e);
    if !e.failed && e.wal.pending_bytes() > 0 {
        // a clean close leaves an empty log: the next start replays nothing
        checkpoint(sh, &mut e);
    }
}

fn checkpoint(sh: &Shared, e: &mut Engine) {
    let stats = &sh.stats;
    let started = std::time::Instant::now();
    let bytes = e.wal.pending_bytes();
    // a checkpoint writes about what the log holds into the store file: put
    // it off (the log keeps everything) rather than fail it for lack of room
    if let Some(free) = e.wal.free_bytes()
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
    match e.wal.checkpoint(&sh.db, sh.cfg.quick_repair) {
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
        Err(m) => stop_writing(&sh.healthy, &mut e.failed, &format!("checkpoint: {m}")),
    }
}

/// The log or the store file may now disagree with what callers were told:
/// write nothing more until a restart recovers from the log.
pub(super) fn stop_writing(healthy: &AtomicBool, failed: &mut bool, error: &str) {
    *failed = true;
    healthy.store(false, Ordering::Relaxed);
    tracing::error!(
        error,
        "the store cannot write durably; every write is refused until a restart recovers from the write-ahead log"
    );
}

pub(super) fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

pub(super) enum BatchError {
    /// Nothing was written: the batch's callers are refused, the store goes on.
    Refused(String),
    /// Nothing was written for lack of space: refused, retried later.
    NoSpace(String),
    /// The log or the store file may now hold more than callers were told.
    Fatal(String),
}

/// Gather and apply a batch, log it durably, then commit it (see [`wal`]).
/// The batch takes `first`, every job already queued in `rx` and, with a
/// `linger`, whatever arrives until it has passed since the batch began:
/// each job is applied as it is taken, so the linger overlaps the batch's
/// own work instead of preceding it. A batch of one is answered before its
/// commit, which it leaves in `e.tail` ([`Shared::finish`]). Returns how
/// many jobs the batch took. Jobs that never ran (the transaction could
/// not begin) are dropped, which their callers see as `Closed`.
pub(super) fn run_batch(
    sh: &Shared,
    e: &mut Engine,
    first: Job,
    rx: Option<&mut mpsc::Receiver<Job>>,
    linger: Option<std::time::Duration>,
) -> (usize, Result<(), BatchError>) {
    let (cfg, stats) = (&sh.cfg, &*sh.stats);
    let started = std::time::Instant::now();
    let deadline = linger.map(|d| started + d);
    let mut txn = match sh.db.begin_write() {
        Ok(t) => t,
        Err(e) => return (1, Err(BatchError::Refused(e.to_string()))),
    };
    if let Err(e) = txn.set_durability(Durability::None) {
        return (1, Err(BatchError::Refused(e.to_string())));
    }
    let (replies, idle, finished) = {
        let mut t = KvTxn::open(Source::Redb(&txn), e.head);
        let (replies, idle) = super::gather(&mut t, [first], rx, deadline);
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
        Ok((new_head, redo, en, p)) => {
            entered = en;
            plain = p;
            let short = e.wal.free_bytes().filter(|free| *free < cfg.reserve);
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
                let r = e.wal.append(&redo).map(|_| ());
                stats
                    .wal_micros
                    .fetch_add(micros(t.elapsed()), Ordering::Relaxed);
                r
            };
            match logged {
                Err(wal::AppendError::NoSpace(m)) => {
                    let _ = txn.abort();
                    Err(BatchError::NoSpace(m))
                }
                Err(m) => {
                    let _ = txn.abort();
                    Err(BatchError::Fatal(format!("write-ahead log: {m}")))
                }
                Ok(()) => {
                    logged_txn = Some((txn, new_head));
                    Ok(())
                }
            }
        }
        Err(m) => {
            let _ = txn.abort();
            Err(BatchError::Refused(m.to_string()))
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
        outcome = commit_logged(txn, new_head, &mut e.head).map_err(BatchError::Fatal);
    }
    let told = match &outcome {
        Ok(()) => Ok(()),
        Err(BatchError::NoSpace(m)) => Err(super::Unwritten {
            message: m.clone(),
            no_space: true,
        }),
        Err(BatchError::Refused(m) | BatchError::Fatal(m)) => {
            Err(super::Unwritten::failed(m.clone()))
        }
    };
    // the store's room as callers will find it, before any is answered
    match &outcome {
        Ok(()) => {
            if stats.disk_full.swap(false, Ordering::Relaxed) {
                tracing::warn!("the store's filesystem has room again: writes resume");
            }
        }
        Err(BatchError::NoSpace(m)) => {
            stats
                .refused_no_space
                .fetch_add(replies.len() as u64, Ordering::Relaxed);
            if !stats.disk_full.swap(true, Ordering::Relaxed) {
                tracing::error!(error = %m, "the store's filesystem is full: writes are refused (503 store_full) until space is freed; reads go on");
            }
        }
        Err(_) => {}
    }
    // A lone write answered before its commit: a read begun after the
    // answer waits for that commit (`Visibility`), so nobody reads what was
    // not answered, nor misses what was.
    if let Some((txn, new_head)) = logged_txn {
        e.tail = Some(Tail {
            txn,
            new_head,
            plain,
            shown: sh.fence.told(),
        });
    }
    let committed = outcome.is_ok().then_some(&entered);
    let n = super::settle(
        stats,
        cfg.on_commit.as_ref(),
        (started, applied, idle),
        committed,
        replies,
        &told,
    );
    (n, outcome)
}

/// Replace a lone write's plain event block (as logged) with its packed
/// form, after the answer and before the commit: deflate (tens of µs) is
/// then off the caller's wait, and the store holds the same bytes as when
/// the block was packed in the batch. The log keeps the plain block; a
/// replay after a crash stores that, which reads the same. Unlogged on
/// purpose, and harmless if it fails: the plain block stays.
pub(super) fn repack(txn: &redb::WriteTransaction, key: u64, plain: Vec<u8>) {
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
pub(super) fn commit_logged(
    txn: redb::WriteTransaction,
    new_head: ChainHead,
    head: &mut ChainHead,
) -> Result<(), String> {
    txn.commit()
        .map(|()| *head = new_head)
        .map_err(|e| format!("commit after logging: {e}"))
}
