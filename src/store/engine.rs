//! The redb writer's state, and a lone write run on its caller's thread.
//!
//! Whoever runs a batch holds [`Engine`]: the writer thread, or (when the
//! store is idle) the caller of a lone write ([`Shared::inline`]). That
//! caller then skips two hand-offs between threads, to the writer and
//! back, each a wake of an idle core (~30 µs apiece measured on a VM, the
//! largest part of a lone decision's wait after the sync). Its redb
//! commit, after its answer as for any lone write, runs once the caller's
//! task yields; whoever takes the engine next finishes it first if not.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use redb::Database;

use super::lifecycle::ChainHead;
use super::visibility::{Shown, Visibility};
use super::writer::{
    BatchError, WriterConfig, commit_logged, micros, repack, run_batch, stop_writing,
};
use super::{CommitStats, Job, wal};

/// A write this soon after the last batch ended is not run on its caller's
/// thread: more may be coming, and the writer batches them.
const IDLE_GAP: std::time::Duration = std::time::Duration::from_micros(100);

/// What the writer thread and a write run on its caller's thread share.
pub(super) struct Shared {
    pub(super) db: Arc<Database>,
    pub(super) cfg: WriterConfig,
    pub(super) healthy: AtomicBool,
    pub(super) stats: Arc<CommitStats>,
    pub(super) fence: Arc<Visibility>,
    pub(super) engine: Mutex<Engine>,
    /// Wakes the writer thread: a lone write's commit to finish, a log to
    /// checkpoint.
    pub(super) nudge: tokio::sync::Notify,
    /// The writer thread waits with its idle checkpoint's timer set.
    pub(super) armed: AtomicBool,
    /// The store is closing: the writer thread finishes what is left.
    pub(super) closed: AtomicBool,
}

/// The writer's state, held by whoever runs a batch.
pub(super) struct Engine {
    pub(super) wal: wal::Wal,
    pub(super) head: ChainHead,
    /// Set once the log or a commit failed: the store file and the log may
    /// disagree with what callers were told, so nothing more is written
    /// until a restart recovers from the log (PostgreSQL stops on a failed
    /// fsync for the same reason). Queued callers see `Closed`.
    pub(super) failed: bool,
    /// Jobs in the last batch, and when it ended.
    pub(super) last: usize,
    pub(super) ended: Option<std::time::Instant>,
    /// A lone write answered and logged, not yet committed in redb.
    pub(super) tail: Option<Tail>,
}

pub(super) struct Tail {
    pub(super) txn: redb::WriteTransaction,
    pub(super) new_head: ChainHead,
    /// Its last event block, logged plain, to store packed (`repack`).
    pub(super) plain: Option<(u64, Vec<u8>)>,
    /// Readers wait for this commit until it is dropped.
    pub(super) shown: Shown,
}

impl Shared {
    pub(super) fn engine(&self) -> MutexGuard<'_, Engine> {
        // a job that panicked left its transaction unwound: the state is whole
        self.engine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Commit the lone write answered last, if any: redb's commit without
    /// I/O, after its event block is packed.
    pub(super) fn finish(&self, e: &mut Engine) {
        let Some(tail) = e.tail.take() else { return };
        #[cfg(test)]
        std::thread::sleep(self.cfg.hold_before_commit);
        let t = std::time::Instant::now();
        if let Some((key, block)) = tail.plain {
            repack(&tail.txn, key, block);
        }
        // a failure: its caller was told, the log holds it, and the restart
        // that this failure calls for replays it
        let r = commit_logged(tail.txn, tail.new_head, &mut e.head);
        // after its answer, so not in the time `settle` counted
        self.stats
            .commit_micros
            .fetch_add(micros(t.elapsed()), Ordering::Relaxed);
        // shown even when the commit failed: readers then see the store as
        // it was (it stops writing until a restart) instead of waiting
        drop(tail.shown);
        if let Err(m) = r {
            stop_writing(&self.healthy, &mut e.failed, &m);
        }
    }

    /// After a lone write run on its caller's thread: commit it unless
    /// someone else holds the writer's state (and will), and wake the
    /// writer thread if it waits without its idle checkpoint's timer (a
    /// full log woke it already: `inline`).
    fn finish_later(&self) {
        let wake = match self.engine.try_lock() {
            Ok(mut e) => {
                self.finish(&mut e);
                !self.armed.load(Ordering::SeqCst)
            }
            Err(_) => true,
        };
        if wake {
            self.nudge.notify_one();
        }
    }

    /// A batch's outcome, as the store's health shows it.
    pub(super) fn record(&self, e: &mut Engine, n: usize, outcome: Result<(), BatchError>) {
        e.last = n;
        e.ended = Some(std::time::Instant::now());
        match outcome {
            Ok(()) => self.healthy.store(true, Ordering::Relaxed),
            // counted and flagged in `run_batch`, before its callers heard
            Err(BatchError::NoSpace(_)) => {}
            Err(BatchError::Refused(m)) => {
                self.healthy.store(false, Ordering::Relaxed);
                tracing::error!(error = %m, operations = n, "store batch failed; its requests were refused");
            }
            Err(BatchError::Fatal(m)) => stop_writing(&self.healthy, &mut e.failed, &m),
        }
    }

    /// Run a lone write here, on its caller's thread, when the store is
    /// idle: no job queued, nobody writing, the last batch alone and over
    /// [`IDLE_GAP`] ago. It then skips two hand-offs between threads (to
    /// the writer and back, each a wake of an idle core: ~30 µs apiece on
    /// a VM); redb's commit after its answer runs once the caller's task
    /// yields. Under load every write goes to the writer, which batches
    /// them. `Err`: the job, for the writer's queue.
    pub(super) fn inline(this: &Arc<Self>, job: Job, queued: bool) -> Result<(), Job> {
        let sh = &**this;
        if queued {
            return Err(job);
        }
        let Ok(mut e) = sh.engine.try_lock() else {
            return Err(job);
        };
        // Alone and unhurried: what the writer would commit at once, alone.
        // A write close behind the last one goes to the writer, so a burst
        // on one thread is batched rather than synced a write at a time.
        let lingers = !sh.cfg.group.delay.is_zero() && e.last >= sh.cfg.group.siblings;
        let close = e.ended.is_some_and(|t| t.elapsed() < IDLE_GAP);
        if e.failed || e.last > 1 || lingers || close {
            return Err(job);
        }
        sh.finish(&mut e);
        if e.failed {
            return Err(job);
        }
        let (n, outcome) = run_batch(sh, &mut e, job, None, None);
        sh.record(&mut e, n, outcome);
        let full = e.wal.pending_bytes() >= sh.cfg.checkpoint_bytes;
        drop(e);
        if full {
            sh.nudge.notify_one();
        }
        // The commit runs once the caller's task yields (its answer sent);
        // waking the writer thread for it now could take this core from
        // the caller. A reader or writer that comes first finishes it.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                // weak: a store dropped before this runs is closed, finished
                let sh = Arc::downgrade(this);
                rt.spawn(async move {
                    if let Some(sh) = sh.upgrade()
                        && !sh.closed.load(Ordering::SeqCst)
                    {
                        sh.finish_later();
                    }
                });
            }
            Err(_) => sh.nudge.notify_one(),
        }
        Ok(())
    }
}
