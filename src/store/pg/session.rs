//! The pool of readers' connections (`conn.rs` is one connection) and the
//! sessions that run a store transaction over one (the tables over a
//! session are `table.rs`).
//!
//! The store's operations are synchronous (a closure over a transaction),
//! so every query here is run to completion and waited for: the writer's
//! on its own runtime, on its thread; a reader's on the thread that waits
//! for it (a request handler inside the broker's runtime, a test's
//! runtime), which drives its connection meanwhile (`conn.rs`).
//!
//! A write session buffers its writes per table and sends them, all
//! tables in one statement (a delete and an upsert per table), before a
//! table written is next ranged or counted and at commit; point reads look
//! in the buffer first. So a batch of operations costs one round trip per
//! point read not fetched ahead, one per range chunk, and one at commit.
//! Rows named ahead are fetched by one statement too (`statements.rs`):
//! each statement costs the server and the node more than its rows do.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use super::super::StoreError;
use super::conn::{Conn, drive, open};
use super::memory::Rows;
use super::recent::{Recent, Write};
use super::statements::{Ahead, Ranges, Raw, Sql, pipelined};

/// An owned query parameter (queries run on another thread).
pub(in crate::store) type Param = Box<dyn ToSql + Send + Sync>;

/// A database error, with the server's message and SQLSTATE.
pub(in crate::store) fn pg_err(e: &tokio_postgres::Error) -> StoreError {
    StoreError::Io(format!(
        "PostgreSQL: {}",
        leasehold_provider_postgres::db_message(e)
    ))
}

/// The database: its runtime, how to connect, and a bounded set of
/// connections for readers (the writer and the leader keep their own).
pub(in crate::store) struct Db {
    rt: tokio::runtime::Handle,
    connector: Arc<leasehold_provider_postgres::Pool>,
    idle: Mutex<Vec<Arc<Conn>>>,
    open: Mutex<usize>,
    freed: Condvar,
    max: usize,
    wait: Duration,
    /// `host:port/database`, for messages.
    pub(in crate::store) name: String,
    /// What this node's writer last knew of a few tables, as of its
    /// commits (`recent.rs`).
    pub(in crate::store) recent: Arc<Recent>,
}

impl Db {
    pub(in crate::store) fn new(
        rt: tokio::runtime::Handle,
        connector: Arc<leasehold_provider_postgres::Pool>,
        readers: usize,
    ) -> Self {
        let cfg = connector.config();
        let name = format!("{}:{}/{}", cfg.host, cfg.port, cfg.database);
        let wait = Duration::from_secs(cfg.connect_timeout_seconds.max(1));
        Self {
            rt,
            connector,
            idle: Mutex::new(Vec::new()),
            open: Mutex::new(0),
            freed: Condvar::new(),
            max: readers.max(1),
            wait,
            name,
            recent: Arc::default(),
        }
    }

    /// Run `f` on the database's runtime and wait for it.
    pub(in crate::store) fn block<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.rt.block_on(f);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// A new connection of its own (the writer's, the leader's).
    pub(in crate::store) fn connect(&self) -> Result<Arc<Conn>, StoreError> {
        let connector = self.connector.clone();
        self.block(async move { open(&connector, false).await })
    }

    /// Readers' connections: open, and idle among them.
    pub(in crate::store) fn pool_stats(&self) -> (usize, usize) {
        let open = self.open.lock().map(|o| *o).unwrap_or(0);
        let idle = self.idle.lock().map(|i| i.len()).unwrap_or(0);
        (open, idle)
    }

    pub(in crate::store) fn rt(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    /// A new connection, from async code on the database's runtime.
    pub(in crate::store) async fn connect_async(&self) -> Result<Arc<Conn>, StoreError> {
        open(&self.connector, false).await
    }

    /// A connection listening on `channel`, and its notifications.
    pub(in crate::store) async fn listen(
        &self,
        channel: &str,
    ) -> Result<
        (
            Client,
            tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
        ),
        StoreError,
    > {
        let (c, rx) = self
            .connector
            .connect_listening()
            .await
            .map_err(|e| StoreError::Io(e.message))?;
        c.batch_execute(&format!("LISTEN {channel}"))
            .await
            .map_err(|e| pg_err(&e))?;
        Ok((c, rx))
    }

    /// Run `f` on a pooled connection and wait for it.
    pub(in crate::store) fn pooled<T, F, Fut>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Conn>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let conn = self.checkout()?;
        let (c, fut) = (conn.clone(), f(conn.clone()));
        let r = self.block(async move { drive(&c, fut).await });
        self.checkin(conn);
        r
    }

    /// A reader's connection: an idle one, a new one while fewer than the
    /// pool's size are open, or the next one freed within the wait.
    fn checkout(&self) -> Result<Arc<Conn>, StoreError> {
        let busy = || {
            StoreError::Io(format!(
                "all {} store connections to {} are busy",
                self.max, self.name
            ))
        };
        {
            let mut open = self.open.lock().map_err(|_| busy())?;
            let deadline = std::time::Instant::now() + self.wait;
            loop {
                if let Ok(mut idle) = self.idle.lock() {
                    while let Some(c) = idle.pop() {
                        if !c.is_closed() {
                            return Ok(c);
                        }
                        *open = open.saturating_sub(1);
                    }
                }
                if *open < self.max {
                    *open += 1;
                    break;
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(busy());
                }
                open = self.freed.wait_timeout(open, left).map_err(|_| busy())?.0;
            }
        }
        let connector = self.connector.clone();
        match self.block(async move { open(&connector, true).await }) {
            Ok(c) => Ok(c),
            Err(e) => {
                if let Ok(mut open) = self.open.lock() {
                    *open = open.saturating_sub(1);
                }
                self.freed.notify_one();
                Err(e)
            }
        }
    }

    fn checkin(&self, c: Arc<Conn>) {
        if c.is_closed() {
            if let Ok(mut open) = self.open.lock() {
                *open = open.saturating_sub(1);
            }
        } else if let Ok(mut idle) = self.idle.lock() {
            idle.push(c);
        }
        self.freed.notify_one();
    }
}

/// A table's buffered writes: key to (redb key, value), or `None` to delete.
type Writes = BTreeMap<Vec<u8>, Option<(Vec<u8>, Vec<u8>)>>;
type Pending = BTreeMap<&'static str, Writes>;
/// The (table, key) pairs a transaction wrote.
type Written = Vec<(&'static str, Vec<u8>)>;

/// One store transaction on one connection: the writer's batch, or a
/// reader's snapshot (REPEATABLE READ, begun at its first query, ended
/// when the reader is dropped).
pub(in crate::store) struct Session {
    db: Arc<Db>,
    /// `None`: a reader answered from the node's recent rows alone.
    conn: Option<Arc<Conn>>,
    reader: bool,
    began: AtomicBool,
    pending: Mutex<Pending>,
    /// What a writer's session has read and written (and, lent by the
    /// writer, what its node remembers from earlier batches: `memory.rs`).
    /// Every write transaction of the cluster holds the chain head's row
    /// lock from its start, so nothing but this transaction changes a row
    /// it read: the copy stays true.
    cache: Mutex<Rows>,
    /// The keys this transaction wrote, for the change log (the writer
    /// thread's sessions; `None`: not logged, as for `copy`'s).
    written: Mutex<Option<Written>>,
    /// What it wrote of the tables the node keeps recent (`recent.rs`;
    /// the writer thread's sessions).
    kept: Mutex<Vec<Write>>,
    /// Ranges fetched ahead under the lock, until this transaction writes
    /// into one (a writer's session; used once each).
    ranges: Mutex<Ranges>,
    /// The writer's own runtime, on its own thread, which also drives the
    /// writer's connection: a query is a round trip to the server and back
    /// with no hop between threads.
    local: Option<Arc<tokio::runtime::Runtime>>,
    /// The writer's node, for the leader check.
    node: String,
    /// Round trips made so far (each query run to completion).
    trips: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("reader", &self.reader)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A writer's session on its connection; the caller has begun the
    /// transaction. `local`: the runtime the connection was made on, when
    /// the caller owns one (the writer thread).
    pub(in crate::store) fn writer(
        db: Arc<Db>,
        conn: Arc<Conn>,
        local: Option<Arc<tokio::runtime::Runtime>>,
    ) -> Self {
        Self {
            db,
            conn: Some(conn),
            reader: false,
            began: AtomicBool::new(true),
            pending: Mutex::new(BTreeMap::new()),
            cache: Mutex::default(),
            written: Mutex::new(None),
            kept: Mutex::default(),
            ranges: Mutex::default(),
            local,
            node: String::new(),
            trips: Default::default(),
        }
    }

    /// Run a query's future to completion: on the writer's own runtime, or
    /// right here. A client's future only talks to its connection's task
    /// (which runs on the database's runtime) through channels, so polling
    /// it on the calling thread is sound from any thread, and saves a hop
    /// to the runtime and back for every query.
    fn exec<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.trips.fetch_add(1, Ordering::Relaxed);
        match &self.local {
            // the writer's connection runs its I/O on this runtime
            Some(rt) => rt.block_on(f),
            None => {
                let conn = self.conn()?;
                futures_executor::block_on(async move { drive(&conn, f).await })
            }
        }
    }

    /// Round trips this session has made.
    pub(super) fn trips(&self) -> u64 {
        self.trips.load(Ordering::Relaxed)
    }

    fn conn(&self) -> Result<Arc<Conn>, StoreError> {
        self.conn
            .clone()
            .ok_or_else(|| StoreError::Io("a read past what this node's recent rows answer".into()))
    }

    /// A reader answered from this node's recent rows (`recent.rs`):
    /// `rows` and `ranges` are all it knows, and it asks the database
    /// nothing.
    pub(super) fn recent(db: Arc<Db>, rows: Rows, ranges: Ranges) -> Self {
        Self::read_only(db, None, rows, ranges)
    }

    fn read_only(db: Arc<Db>, conn: Option<Arc<Conn>>, rows: Rows, ranges: Ranges) -> Self {
        Self {
            db,
            conn,
            reader: true,
            began: AtomicBool::new(false),
            pending: Mutex::new(BTreeMap::new()),
            cache: Mutex::new(rows),
            written: Mutex::new(None),
            kept: Mutex::default(),
            ranges: Mutex::new(ranges),
            local: None,
            node: String::new(),
            trips: Default::default(),
        }
    }

    pub(in crate::store) fn reader(db: Arc<Db>) -> Result<Self, StoreError> {
        let conn = db.checkout()?;
        Ok(Self::read_only(db, Some(conn), Rows::new(), Ranges::new()))
    }

    /// Begin, commit or roll back this session's transaction (a writer
    /// session outside the writer thread: `copy`).
    pub(in crate::store) fn begin(&self) -> Result<(), StoreError> {
        self.run("BEGIN")
    }

    pub(in crate::store) fn commit(&self) -> Result<(), StoreError> {
        self.run("COMMIT")
    }

    pub(in crate::store) fn rollback(&self) -> Result<(), StoreError> {
        self.run("ROLLBACK")
    }

    pub(in crate::store) fn run(&self, sql: &'static str) -> Result<(), StoreError> {
        let conn = self.conn()?;
        self.exec(async move { conn.batch(sql).await.map_err(|e| pg_err(&e)) })
    }

    /// Start from the rows the node remembers, and log what this
    /// transaction writes (`finish`).
    pub(super) fn logged(self, rows: Rows) -> Self {
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = rows;
        *self.written.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
        self
    }

    /// Ranges fetched ahead for this batch.
    pub(super) fn with_ranges(self, ranges: Ranges) -> Self {
        *self.ranges.lock().unwrap_or_else(|e| e.into_inner()) = ranges;
        self
    }

    /// A range fetched ahead, if nothing this transaction wrote fell in it
    /// since (taken: a second reading asks the database).
    pub(super) fn fetched_range(
        &self,
        table: &'static str,
        lo: &[u8],
        hi: &[u8],
    ) -> Option<Vec<Raw>> {
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        if ranges.is_empty() {
            return None;
        }
        ranges.remove(&(table, lo.to_vec(), hi.to_vec()))
    }

    /// What this session wrote of the tables the node keeps recent.
    pub(super) fn take_kept(&self) -> Vec<Write> {
        std::mem::take(&mut *self.kept.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// What this session knows of the rows (given back to the node's
    /// memory after a commit).
    pub(super) fn take_rows(&self) -> Rows {
        std::mem::take(&mut *self.cache.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(in crate::store) fn with_node(mut self, node: &str) -> Self {
        node.clone_into(&mut self.node);
        self
    }

    /// Tell every node, when this transaction commits (`NOTIFY`).
    pub(in crate::store) fn announce(&self, what: &str) -> Result<(), StoreError> {
        self.query(
            "SELECT pg_notify('leasehold', $1)".into(),
            vec![Box::new(what.to_owned())],
        )
        .map(|_| ())
    }

    /// Refuse (`NotLeader`) unless this node still holds the leadership
    /// with `epoch` by the database's clock. The row stays locked (shared)
    /// until this transaction ends, so no one takes the leadership over
    /// before what this transaction writes is committed.
    pub(in crate::store) fn require_leader(&self, epoch: u64) -> Result<(), StoreError> {
        let rows = self.query(
            "SELECT 1 FROM lh_leader WHERE id = 1 AND holder = $1 AND epoch = $2 \
             AND expires_at > clock_timestamp() FOR SHARE"
                .into(),
            vec![
                Box::new(self.node.clone()),
                Box::new(i64::try_from(epoch).unwrap_or(i64::MAX)),
            ],
        )?;
        if rows.is_empty() {
            return Err(StoreError::Conflict(super::super::Conflict::NotLeader(
                epoch,
            )));
        }
        Ok(())
    }

    pub(in crate::store) fn query(
        &self,
        sql: String,
        params: Vec<Param>,
    ) -> Result<Vec<Row>, StoreError> {
        let begin = self.reader && !self.began.swap(true, Ordering::Relaxed);
        let conn = self.conn()?;
        self.exec(async move {
            if begin {
                // sent together: one round trip for both
                let (b, q) = futures_util::join!(
                    conn.batch("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
                    conn.query(&sql, &params)
                );
                b.map_err(|e| pg_err(&e))?;
                return q.map_err(|e| pg_err(&e));
            }
            conn.query(&sql, &params).await.map_err(|e| pg_err(&e))
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // a poisoned lock only means a panic elsewhere; the map is intact
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What this transaction knows of a row without asking: its own
    /// write, or what it read before (a reader's snapshot does not move,
    /// and a writer holds the lock every write takes).
    pub(super) fn buffered(&self, table: &'static str, k: &[u8]) -> Option<Option<Vec<u8>>> {
        if let Some(e) = self
            .pending()
            .get(table)
            .and_then(|t| t.get(k))
            .map(|e| e.as_ref().map(|(_, v)| v.clone()))
        {
            return Some(e);
        }
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(table).and_then(|t| t.get(k)).cloned()
    }

    pub(super) fn remember(&self, table: &'static str, k: &[u8], v: Option<Vec<u8>>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.entry(table).or_default().insert(k.to_vec(), v);
    }

    /// Fetch what `wants` names into what this transaction knows, in one
    /// statement (a reader's first query begins its snapshot). With
    /// `last`, a reader's snapshot also ends in that round trip (one that
    /// had not begun is that one statement, with no transaction around
    /// it): what it reads afterwards and did not fetch comes from a newer
    /// one.
    pub(in crate::store) fn prefetch(&self, wants: &Ahead, last: bool) -> Result<(), StoreError> {
        if wants.is_empty() {
            return Ok(());
        }
        // one statement is a snapshot of its own: a reader that reads
        // nothing else needs no transaction around it
        let began = self.began.load(Ordering::Relaxed);
        let begin = self.reader && !began && !last;
        let end = (self.reader && began && last).then_some("COMMIT");
        if begin {
            self.began.store(true, Ordering::Relaxed);
        }
        let statements = [wants.statement()];
        let conn = self.conn()?;
        let answers = self.exec(async move {
            if begin {
                let (b, q) = futures_util::join!(
                    conn.batch("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
                    pipelined(&conn, &statements, end)
                );
                b.map_err(|e| pg_err(&e))?;
                return q;
            }
            pipelined(&conn, &statements, end).await
        })?;
        if end.is_some() {
            // ended: a later query begins anew
            self.began.store(false, Ordering::Relaxed);
        }
        let (rows, ranges) = wants.answers(answers.first().map_or(&[][..], Vec::as_slice));
        for (t, asked, found) in rows {
            for k in asked {
                self.remember(t, &k, None);
            }
            for (k, v) in found {
                self.remember(t, &k, Some(v));
            }
        }
        self.ranges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(ranges);
        Ok(())
    }

    pub(super) fn put(&self, table: &'static str, k: Vec<u8>, e: Option<(Vec<u8>, Vec<u8>)>) {
        {
            let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
            if !ranges.is_empty() {
                ranges.retain(|(t, lo, hi), _| {
                    *t != table || k.as_slice() < lo.as_slice() || k.as_slice() >= hi.as_slice()
                });
            }
        }
        self.pending().entry(table).or_default().insert(k, e);
    }

    /// Send one table's buffered writes.
    pub(super) fn flush(&self, table: &'static str) -> Result<(), StoreError> {
        let writes = self.pending().remove(table);
        match writes {
            Some(w) if !w.is_empty() => self.send(vec![(table, w)]),
            _ => Ok(()),
        }
    }

    /// Send every buffered write (before the commit).
    pub(in crate::store) fn flush_all(&self) -> Result<(), StoreError> {
        let all: Vec<_> = std::mem::take(&mut *self.pending()).into_iter().collect();
        if all.is_empty() {
            return Ok(());
        }
        self.send(all)
    }

    /// Send buffered writes: a delete and an upsert per table, all one
    /// statement (one round trip, and one statement's cost to the server).
    fn send(&self, tables: Vec<(&'static str, Writes)>) -> Result<(), StoreError> {
        let Some(statement) = self.writes(tables).writes(None) else {
            return Ok(());
        };
        let conn = self.conn()?;
        self.exec(async move { pipelined(&conn, &[statement], None).await.map(|_| ()) })
    }

    /// Commit a logged session in one round trip: its last buffered
    /// writes, its change row (numbered one past the newest), pruning the
    /// log below `prune_below` if given, and `COMMIT`. The change row's
    /// number, if it wrote anything.
    pub(super) fn finish(&self, prune_below: Option<i64>) -> Result<Option<i64>, StoreError> {
        let all: Vec<_> = std::mem::take(&mut *self.pending()).into_iter().collect();
        let mut sql = self.writes(all);
        let written = self
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        let logged = !written.is_empty();
        if let Some(below) = prune_below {
            sql.prune_changes(below);
        }
        let change = logged.then(|| {
            let (t, k) = written.into_iter().unzip();
            sql.change_row(t, k)
        });
        let statements: Vec<_> = sql.writes(change).into_iter().collect();
        let conn = self.conn()?;
        let rows = self.exec(async move { pipelined(&conn, &statements, Some("COMMIT")).await })?;
        if !logged {
            return Ok(None);
        }
        rows.last()
            .and_then(|r| r.first())
            .map(|r| Some(r.get::<_, i64>(0)))
            .ok_or_else(|| StoreError::Corrupt("the change log gave no number".into()))
    }

    /// Buffered writes as parts of one statement: a delete and an upsert
    /// per table (a key is in one or the other, once).
    fn writes(&self, tables: Vec<(&'static str, Writes)>) -> Sql {
        let mut sql = Sql::default();
        let mut log = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        for (table, writes) in tables {
            let keep = log.is_some() && Recent::keeps(table);
            let (mut ks, mut rks, mut vs, mut gone) = (vec![], vec![], vec![], vec![]);
            for (k, e) in writes {
                self.remember(table, &k, e.as_ref().map(|(_, v)| v.clone()));
                if let Some(log) = log.as_mut() {
                    log.push((table, k.clone()));
                }
                if keep {
                    kept.push((table, k.clone(), e.clone()));
                }
                match e {
                    Some((rk, v)) => {
                        ks.push(k);
                        rks.push(rk);
                        vs.push(v);
                    }
                    None => gone.push(k),
                }
            }
            sql.delete(table, gone);
            sql.upsert(table, ks, rks, vs);
        }
        sql
    }
}

impl Drop for Session {
    /// A reader's snapshot ends and its connection goes back to the pool,
    /// without making the dropping thread wait: one that never began a
    /// transaction has nothing to end, so it goes back at once.
    fn drop(&mut self) {
        if !self.reader {
            return;
        }
        let Some(conn) = self.conn.clone() else {
            return;
        };
        let db = self.db.clone();
        if !self.began.load(Ordering::Relaxed) {
            db.checkin(conn);
            return;
        }
        self.db.rt.spawn(async move {
            if drive(&conn, conn.batch("COMMIT")).await.is_err() {
                // a connection that cannot end its transaction is not reused
                return;
            }
            db.checkin(conn);
        });
    }
}
