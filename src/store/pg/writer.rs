//! The PostgreSQL backend's writer: one thread per broker takes whatever
//! operations are queued into one transaction (lingering as redb's writer
//! does when the last batch had company), locks the chain head's row,
//! applies them, sends the buffered writes, commits, then answers each
//! caller. A failed batch is rolled back and its callers refused; the
//! writer reconnects by itself, so the database coming back is the store
//! coming back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::super::kv::Source;
use super::super::lifecycle::ChainHead;
use super::super::txn::KvTxn;
use super::super::{CommitHook, CommitStats, GroupCommit, Job, StoreError};
use super::session::{Conn, Db, Session, pg_err};
use super::{bytes, meta_key};

pub(super) struct Config {
    pub group: GroupCommit,
    pub on_commit: Option<CommitHook>,
    pub node: String,
}

pub(super) fn run(
    db: &Arc<Db>,
    mut rx: mpsc::Receiver<Job>,
    cfg: &Config,
    healthy: &AtomicBool,
    stats: &CommitStats,
) {
    // the writer's own runtime: its connection's task runs here too
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Arc::new(rt),
        Err(e) => {
            healthy.store(false, Ordering::Relaxed);
            tracing::error!(error = %e, "the store writer cannot start; every write is refused");
            return;
        }
    };
    let mut conn: Option<Arc<Conn>> = None;
    let mut last = 0usize;
    while let Some(first) = rx.blocking_recv() {
        // Begin (locking the chain head) before taking the batch. An idle
        // connection may have died unnoticed (its task runs only while the
        // writer works): then connect again, once, before giving up.
        let mut begun = None;
        let mut error = None;
        for _ in 0..2 {
            let c = match conn.take().filter(|c| !c.is_closed()) {
                Some(c) => c,
                None => match rt.block_on(db.connect_async()) {
                    Ok(c) => c,
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                },
            };
            match begin(&rt, &c) {
                Ok(head) => {
                    begun = Some((c, head));
                    break;
                }
                Err(e) => {
                    let _ = end(&rt, &c, false);
                    error = Some(e);
                    // a live connection that refused is kept; a dead one is not
                    if !c.is_closed() {
                        conn = Some(c);
                        break;
                    }
                }
            }
        }
        let Some((c, head)) = begun else {
            healthy.store(false, Ordering::Relaxed);
            // refuse what is queued now rather than try once each
            drop(first);
            let mut refused = 1;
            while rx.try_recv().is_ok() {
                refused += 1;
            }
            let error = error.map(|e| e.to_string()).unwrap_or_default();
            tracing::error!(
                error,
                refused,
                "the store database is unreachable; writes are refused until it is back"
            );
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let linger =
            (!cfg.group.delay.is_zero() && last >= cfg.group.siblings).then_some(cfg.group.delay);
        let (n, outcome) = batch(db, &rt, &c, head, first, &mut rx, linger, cfg, stats);
        last = n;
        match outcome {
            Ok(()) => healthy.store(true, Ordering::Relaxed),
            Err(e) => {
                healthy.store(!c.is_closed(), Ordering::Relaxed);
                tracing::error!(error = %e, operations = n, "store batch failed; its requests were refused");
            }
        }
        conn = Some(c);
    }
}

/// Begin, lock the chain head and read it (one round trip).
fn begin(rt: &tokio::runtime::Runtime, conn: &Arc<Conn>) -> Result<ChainHead, StoreError> {
    rt.block_on(async move {
        let key = [bytes(meta_key("chain_head"))];
        let (b, rows) = futures_util::join!(
            conn.batch("BEGIN"),
            conn.query("SELECT v FROM lh_meta WHERE k = $1 FOR UPDATE", &key)
        );
        b.map_err(|e| pg_err(&e))?;
        let v: Vec<u8> = rows
            .map_err(|e| pg_err(&e))?
            .first()
            .map(|r| r.get(0))
            .ok_or_else(|| StoreError::Corrupt("the chain head row is missing".into()))?;
        ChainHead::from_bytes(&v).ok_or_else(|| StoreError::Corrupt("chain head".into()))
    })
}

fn end(rt: &tokio::runtime::Runtime, conn: &Arc<Conn>, commit: bool) -> Result<(), StoreError> {
    rt.block_on(async move {
        let sql = if commit { "COMMIT" } else { "ROLLBACK" };
        conn.batch(sql).await.map_err(|e| pg_err(&e))
    })
}

/// Gather and apply a batch in the transaction `begin` opened, commit it,
/// answer its callers. Returns how many operations it took.
#[allow(clippy::too_many_arguments)]
fn batch(
    db: &Arc<Db>,
    rt: &Arc<tokio::runtime::Runtime>,
    conn: &Arc<Conn>,
    head: ChainHead,
    first: Job,
    rx: &mut mpsc::Receiver<Job>,
    linger: Option<Duration>,
    cfg: &Config,
    stats: &CommitStats,
) -> (usize, Result<(), String>) {
    let started = Instant::now();
    let session =
        Arc::new(Session::writer(db.clone(), conn.clone(), Some(rt.clone())).with_node(&cfg.node));
    let deadline = linger.map(|d| started + d);
    let (replies, idle, finished) = {
        let mut t = KvTxn::open(Source::Pg(session.clone()), head);
        let (replies, idle) = super::super::gather(&mut t, first, Some(rx), deadline);
        let entered = t.take_entered();
        let finished = t.finish().map(|_| entered);
        (replies, idle, finished)
    };
    let applied = Instant::now();
    let outcome = finished
        .and_then(|entered| session.flush_all().map(|()| entered))
        .and_then(|entered| end(rt, conn, true).map(|()| entered));
    let (entered, told) = match outcome {
        Ok(entered) => (Some(entered), Ok(())),
        Err(e) => {
            let _ = end(rt, conn, false);
            (None, Err(super::super::Unwritten::failed(e.to_string())))
        }
    };
    let n = super::super::settle(
        stats,
        cfg.on_commit.as_ref(),
        (started, applied, idle),
        entered.as_ref(),
        replies,
        &told,
    );
    (n, told.map_err(|e| e.message))
}
