//! What readers of the redb store may see: a lone write is answered once
//! logged, then committed in redb; a read that begins after such an answer
//! first waits until that batch is committed. The wait is at most one
//! commit of one write without I/O (tens of microseconds), and only for a
//! read that races one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub(super) struct Visibility {
    /// Batches answered, and batches committed (or given up on).
    answered: AtomicU64,
    committed: AtomicU64,
    lock: std::sync::Mutex<()>,
    changed: std::sync::Condvar,
}

/// Says a told batch is committed when dropped, however the writer
/// leaves the batch.
pub(super) struct Shown(Arc<Visibility>);

impl Drop for Shown {
    fn drop(&mut self) {
        let v = &self.0;
        let _g = v
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        v.committed.fetch_add(1, Ordering::SeqCst);
        v.changed.notify_all();
    }
}

impl Visibility {
    /// The writer: a batch is about to be answered. Dropping what this
    /// returns says it is committed (or never will be).
    pub(super) fn told(self: &Arc<Self>) -> Shown {
        self.answered.fetch_add(1, Ordering::SeqCst);
        Shown(self.clone())
    }

    /// Whether every batch answered so far is committed.
    pub(super) fn settled(&self) -> bool {
        self.committed.load(Ordering::SeqCst) >= self.answered.load(Ordering::SeqCst)
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
