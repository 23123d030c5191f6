//! The PostgreSQL backend's writer: one thread per broker takes whatever
//! operations are queued into one transaction, locks the chain head's row
//! (taking what arrives while it waits, the rows they name read with the
//! lock), catches its memory of rows up with the change log (`memory.rs`),
//! applies them, sends the buffered writes with the batch's change row and
//! the commit, then answers each caller. A failed batch is rolled back,
//! its callers refused and the memory dropped; the writer reconnects by
//! itself, so the database coming back is the store coming back.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::super::kv::Source;
use super::super::lifecycle::ChainHead;
use super::super::txn::KvTxn;
use super::super::{CommitHook, CommitStats, Job, MAX_BATCH, RangeWant, Reads, StoreError};
use super::conn::Conn;
use super::memory::{CATCH_UP_ROWS, Fetched, KEEP_CHANGES, Memory, Seen, tables_named};
use super::recent::{Recent, Write};
use super::session::{Db, Param, Session, pg_err};
use super::statements::{Ahead, Ranges, pipelined};
use super::{bytes, meta_key};

pub(super) struct Config {
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
    let mut memory = Memory::new(db.recent.clone());
    while let Some(first) = rx.blocking_recv() {
        // take what is queued now: the rows they name are fetched in the
        // round trip that begins the batch (those remembered are not,
        // unless the last catch-up found another node changing them)
        let mut jobs = vec![first];
        take_queued(&mut rx, &mut jobs);
        let mut ranges = Ranges::new();
        // what the batch reads under the lock, for the node's recent rows
        let mut read = Vec::new();
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
            match begin(&rt, &c, &memory, (&mut jobs, &mut rx)) {
                Ok((head, seen, fetched)) => {
                    memory.catch_up(seen);
                    for f in fetched {
                        take_in(f, &mut memory, &mut read, &mut ranges);
                    }
                    begun = Some((c, head));
                    break;
                }
                Err(e) => {
                    memory.forget();
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
            let mut refused = jobs.len();
            drop(jobs);
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
        // what came since the lock was granted: its rows in one more round
        // trip (if that fails, so does the batch, at its next statement)
        let before = jobs.len();
        take_queued(&mut rx, &mut jobs);
        let wants = ahead(&jobs[before..], |t, k| memory.knows(t, k));
        if !wants.is_empty() {
            stats.lock_round_trips.fetch_add(1, Ordering::Relaxed);
            if let Ok(f) = rt.block_on(fetch(&c, &wants)) {
                take_in(f, &mut memory, &mut read, &mut ranges);
            }
        }
        let (n, outcome) = batch(
            db,
            &rt,
            &c,
            (head, &mut memory, ranges, read),
            jobs,
            cfg,
            stats,
        );
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

/// What beginning a batch read under the lock: the chain head, the change
/// log, and each fetch's rows and ranges.
type Begun = (ChainHead, Seen, Vec<(Fetched, Ranges)>);

/// Begin, lock the chain head and read it, then read the change log past
/// what `memory` has seen (or its newest number) and the rows `jobs` name
/// that it may not hold: one round trip, the log and the rows read only
/// once the lock is held. Operations that arrive while the lock is awaited
/// join `jobs`, and the rows they name that were not asked for already
/// are asked for at once on the same connection: the server reads them
/// right after the others, under the lock, with no round trip of their
/// own once it is granted.
fn begin(
    rt: &tokio::runtime::Runtime,
    conn: &Arc<Conn>,
    memory: &Memory,
    (jobs, rx): (&mut Vec<Job>, &mut mpsc::Receiver<Job>),
) -> Result<Begun, StoreError> {
    use futures_util::StreamExt as _;
    let seen = memory.seen();
    // before the catch-up: a row the last one took may be taken again
    let mut asked = Asked::default();
    let wants = asked.wanted(jobs, memory);
    rt.block_on(async move {
        let lock = (
            "SELECT v FROM lh_meta WHERE k = $1 FOR UPDATE".to_owned(),
            vec![bytes(meta_key("chain_head"))],
        );
        let log: (String, Vec<Param>) = match seen {
            Some(v) => (
                format!("SELECT ver, t, k FROM lh_changes WHERE ver > $1 ORDER BY ver LIMIT {CATCH_UP_ROWS}"),
                vec![Box::new(v)],
            ),
            None => (
                "SELECT coalesce(max(ver), 0)::bigint FROM lh_changes".to_owned(),
                vec![],
            ),
        };
        let mut statements = vec![lock, log];
        if !wants.is_empty() {
            statements.push(wants.statement());
        }
        let first = async {
            futures_util::join!(conn.batch("BEGIN"), pipelined(conn, &statements, None))
        };
        tokio::pin!(first);
        let mut late = futures_util::stream::FuturesOrdered::new();
        let mut fetched_late = Vec::new();
        let (b, answers) = loop {
            tokio::select! {
                biased;
                done = &mut first => break done,
                Some(r) = late.next(), if !late.is_empty() => fetched_late.push(r),
                Some(j) = rx.recv(), if jobs.len() < MAX_BATCH => {
                    let from = jobs.len();
                    jobs.push(j);
                    take_queued(rx, jobs);
                    let more = asked.wanted(&jobs[from..], memory);
                    if !more.is_empty() {
                        let c = conn.clone();
                        late.push_back(async move { fetch(&c, &more).await });
                    }
                }
            }
        };
        while let Some(r) = late.next().await {
            fetched_late.push(r);
        }
        b.map_err(|e| pg_err(&e))?;
        let mut answers = answers?.into_iter();
        let (head, log) = (
            answers.next().unwrap_or_default(),
            answers.next().unwrap_or_default(),
        );
        let v: Vec<u8> = head
            .first()
            .map(|r| r.get(0))
            .ok_or_else(|| StoreError::Corrupt("the chain head row is missing".into()))?;
        let head =
            ChainHead::from_bytes(&v).ok_or_else(|| StoreError::Corrupt("chain head".into()))?;
        let seen = match seen {
            Some(_) => Seen::Since(
                log.iter()
                    .map(|r| (r.get(0), tables_named(r.get(1)), r.get(2)))
                    .collect(),
            ),
            None => Seen::Newest(log.first().map(|r| r.get(0)).unwrap_or(0)),
        };
        let mut fetched = vec![wants.answers(&answers.next().unwrap_or_default())];
        for r in fetched_late {
            fetched.push(r?);
        }
        Ok((head, seen, fetched))
    })
}

/// What a batch has asked the database for in the round trip that begins
/// it. Nearly every operation names the lease counters, which every node
/// changes: asked once, they come back with that first ask, under the
/// lock, so an operation that arrives later asks only for what is new
/// (each ask is a statement the server runs after the grant, inside the
/// lock's hold).
#[derive(Default)]
struct Asked {
    rows: HashMap<&'static str, HashSet<Vec<u8>>>,
    ranges: HashSet<RangeWant>,
}

impl Asked {
    /// What `jobs` name that is neither kept by `memory` nor asked for
    /// already; it now counts as asked.
    fn wanted(&mut self, jobs: &[Job], memory: &Memory) -> Ahead {
        let mut wants = ahead(jobs, |t, k| {
            memory.keeps(t, k) || self.rows.get(t).is_some_and(|keys| keys.contains(k))
        });
        wants.ranges.retain(|r| self.ranges.insert(r.clone()));
        for (t, keys) in &wants.keys {
            self.rows.entry(t).or_default().extend(keys.iter().cloned());
        }
        wants
    }
}

/// Jobs queued now, up to a batch's worth.
fn take_queued(rx: &mut mpsc::Receiver<Job>, jobs: &mut Vec<Job>) {
    while jobs.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(j) => jobs.push(j),
            Err(_) => break,
        }
    }
}

/// What `jobs` name: the rows not `held` (by the memory), and the ranges.
fn ahead(jobs: &[Job], held: impl Fn(&'static str, &[u8]) -> bool) -> Ahead {
    let reads = || jobs.iter().map(|j| &j.reads);
    let mut keys = Reads::by_table(reads());
    keys.retain(|t, keys| {
        keys.retain(|k| !held(t, k));
        !keys.is_empty()
    });
    Ahead {
        keys,
        ranges: Reads::ranges_of(reads()),
        pointed: Vec::new(),
    }
}

/// Rows and ranges fetched under the lock, into the memory, the batch's
/// ranges and what it read (for the node's recent rows).
fn take_in(
    (rows, more): (Fetched, Ranges),
    memory: &mut Memory,
    read: &mut Vec<Write>,
    ranges: &mut Ranges,
) {
    read.extend(Recent::read_rows(&rows));
    memory.absorb(rows);
    ranges.extend(more);
}

/// Fetch what `wants` names, in the transaction begun (one round trip).
async fn fetch(conn: &Conn, wants: &Ahead) -> Result<(Fetched, Ranges), StoreError> {
    let answers = pipelined(conn, &[wants.statement()], None).await?;
    Ok(wants.answers(answers.first().map_or(&[][..], Vec::as_slice)))
}

fn end(rt: &tokio::runtime::Runtime, conn: &Arc<Conn>, commit: bool) -> Result<(), StoreError> {
    rt.block_on(async move {
        let sql = if commit { "COMMIT" } else { "ROLLBACK" };
        conn.batch(sql).await.map_err(|e| pg_err(&e))
    })
}

/// Gather and apply a batch in the transaction `begin` opened, commit it,
/// answer its callers. Returns how many operations it took.
///
/// It applies what `run` took before it (queued, or arrived while the
/// lock was awaited or just after), and nothing that arrives while it
/// applies (that waits for the next batch,
/// whose first round trip fetches its rows): taken now, each row it reads
/// would be a round trip of its own under the lock, about ten per batch
/// on a lone node under load. Nor does it linger for more as redb's
/// writer does (`store.commit_delay_micros`): the transaction holds the
/// cluster's one chain head lock meanwhile, so every node would wait too.
/// Measured with `leasehold-bench ha`: lingering 500 µs cost three nodes
/// about a tenth of their rate and a lone node about a sixth; taking what
/// arrived during the apply cost a lone node about a fifth.
fn batch(
    db: &Arc<Db>,
    rt: &Arc<tokio::runtime::Runtime>,
    conn: &Arc<Conn>,
    (head, memory, ranges, read): (ChainHead, &mut Memory, Ranges, Vec<Write>),
    first: Vec<Job>,
    cfg: &Config,
    stats: &CommitStats,
) -> (usize, Result<(), String>) {
    let started = Instant::now();
    let session = Arc::new(
        Session::writer(db.clone(), conn.clone(), Some(rt.clone()))
            .with_node(&cfg.node)
            .logged(memory.lend())
            .with_ranges(ranges),
    );
    let (replies, idle, finished) = {
        let mut t = KvTxn::open(Source::Pg(session.clone()), head);
        let (replies, idle) = super::super::gather(&mut t, first, None, None);
        let entered = t.take_entered();
        let finished = t.finish().map(|_| entered);
        (replies, idle, finished)
    };
    let applied = Instant::now();
    stats
        .lock_round_trips
        .fetch_add(session.trips(), Ordering::Relaxed);
    let prune = memory
        .prune_due()
        .then(|| memory.seen().map(|v| v - KEEP_CHANGES))
        .flatten();
    let outcome = finished.and_then(|entered| session.finish(prune).map(|ver| (entered, ver)));
    let (entered, told) = match outcome {
        Ok((entered, ver)) => {
            memory.keep(session.take_rows(), ver);
            db.recent.committed(read, session.take_kept());
            (Some(entered), Ok(()))
        }
        Err(e) => {
            memory.forget();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(reads: Reads) -> Job {
        Job {
            reads,
            run: Box::new(|_| Box::new(|_| {})),
        }
    }

    #[test]
    fn a_row_or_range_a_batch_asked_for_is_not_asked_for_again() {
        let counters = crate::store::records::LeaseState::ALL.len();
        let memory = Memory::new(Arc::default());
        let mut asked = Asked::default();
        let first = [job(Reads::default().counters("token").task(1))];
        let wants = asked.wanted(&first, &memory);
        assert_eq!(
            wants.keys.values().map(Vec::len).sum::<usize>(),
            counters + 1
        );
        // a later arrival naming the same counters and a range, then one
        // naming the counters, that range and a new task
        let later = [job(Reads::default().counters("token").task_leases(1))];
        let wants = asked.wanted(&later, &memory);
        assert!(wants.keys.is_empty(), "asked again: {:?}", wants.keys);
        assert_eq!(wants.ranges.len(), 1);
        let last = [job(Reads::default()
            .counters("token")
            .task_leases(1)
            .task(2))];
        let wants = asked.wanted(&last, &memory);
        assert!(wants.ranges.is_empty(), "the range was asked again");
        let keys: Vec<_> = wants.keys.values().flatten().collect();
        assert_eq!(keys.len(), 1, "only the new task's row: {keys:?}");
        // a new batch asks afresh
        let wants = Asked::default().wanted(&last, &memory);
        assert_eq!(
            wants.keys.values().map(Vec::len).sum::<usize>(),
            counters + 1
        );
        assert_eq!(wants.ranges.len(), 1);
    }
}
