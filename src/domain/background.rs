//! Background work at a lower CPU priority.
//!
//! Archiving events (reading them from a snapshot, writing the file,
//! verifying it) is the heaviest work retention does, and none of it is
//! urgent, while requests are. On a small host it competed with them for
//! the CPU: the soak's request p99 rose by a third from the minute
//! archiving began. So it runs on one thread of its own, `leasehold-bg`,
//! at nice 19 (the lowest): the scheduler gives requests the CPU first,
//! and the archive takes what is left. (Raising a thread's nice needs no
//! privilege; lowering it again would, so the thread keeps it for good.)
//! Jobs run one at a time, in order; a job that panics fails alone.

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

/// How much lower the background thread runs (nice).
const NICENESS: i32 = 19;

fn queue() -> &'static Mutex<mpsc::Sender<Job>> {
    static QUEUE: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("leasehold-bg".into())
            .spawn(move || {
                if let Err(e) = rustix::process::nice(NICENESS) {
                    tracing::warn!(error = %e, "the background thread keeps its priority");
                }
                for job in rx {
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no background thread: its jobs fail");
        }
        Mutex::new(tx)
    })
}

/// Run `f` on the background thread and wait for its result; `Err` if the
/// thread could not take it or `f` panicked.
pub async fn run<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Result<R, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    queue()
        .lock()
        .map_err(|_| "the background queue is poisoned".to_owned())?
        .send(job)
        .map_err(|_| "the background thread is gone".to_owned())?;
    rx.await
        .map_err(|_| "a background job failed (it panicked)".to_owned())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn jobs_run_in_order_at_a_lower_priority_and_a_panic_fails_alone() {
        let nice = super::run(|| rustix::process::getpriority_process(None))
            .await
            .unwrap()
            .unwrap();
        let ours = rustix::process::getpriority_process(None).unwrap();
        assert_eq!(
            nice,
            (ours + super::NICENESS).min(19),
            "the background thread runs niced"
        );
        let boom: Result<(), String> = super::run(|| panic!("boom")).await;
        assert!(boom.unwrap_err().contains("panicked"));
        let order: Vec<u32> = futures_util::future::join_all((0..5).map(|i| super::run(move || i)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(order, [0, 1, 2, 3, 4], "still running after the panic");
    }
}
