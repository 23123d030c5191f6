//! One connection to PostgreSQL: its client, the statements it keeps
//! prepared, and (for a reader's) the I/O its user drives.
//!
//! The writer's and the leader's connections run their I/O in a task on
//! their own runtime. A reader's connection is used by a thread that
//! blocks on each answer, so its I/O runs on that thread, while it waits
//! ([`drive`]): a read then wakes no other thread of the broker to send
//! its request and hand the answer back (the database runtime's threads
//! still watch the socket and wake the reader when its answer comes). A
//! connection left idle in the pool reads nothing; [`Conn::is_closed`]
//! first takes in whatever it was sent meanwhile, so one the server closed
//! is seen as closed. Its I/O spends no cooperative budget of the task
//! that blocks on it (see `Pool::connect_driven`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt as _;
use leasehold_provider_postgres::Driver;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use super::super::StoreError;
use super::session::{Param, pg_err};

/// Statements a connection keeps prepared, at most.
const MAX_PREPARED: usize = 256;

/// One connection and its prepared statements.
pub(in crate::store) struct Conn {
    client: Client,
    statements: Mutex<HashMap<String, Statement>>,
    /// The I/O of a connection its user drives (`None` for one whose I/O
    /// runs in a task, or that has ended), held by whoever drives it.
    driver: futures_util::lock::Mutex<Option<Driver>>,
}

impl Conn {
    fn new(client: Client, driver: Option<Driver>) -> Self {
        Self {
            client,
            statements: Mutex::new(HashMap::new()),
            driver: futures_util::lock::Mutex::new(driver),
        }
    }

    /// Whether the connection is closed. One that is driven first takes in
    /// what it was sent while idle (a server's goodbye among it); one being
    /// driven now takes it in anyway.
    pub(in crate::store) fn is_closed(&self) -> bool {
        if let Some(mut slot) = self.driver.try_lock()
            && let Some(d) = slot.as_mut()
            && d.now_or_never().is_some()
        {
            *slot = None;
        }
        self.client.is_closed()
    }

    pub(super) async fn statement(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self
            .statements
            .lock()
            .ok()
            .and_then(|m| m.get(sql).cloned())
        {
            return Ok(s);
        }
        let s = self.client.prepare(sql).await?;
        if let Ok(mut m) = self.statements.lock() {
            // a batch's text depends on the tables it writes: past this
            // many, start over (a statement no one holds is closed)
            if m.len() >= MAX_PREPARED {
                m.clear();
            }
            m.insert(sql.to_owned(), s.clone());
        }
        Ok(s)
    }

    pub(in crate::store) async fn query(
        &self,
        sql: &str,
        params: &[Param],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let st = self.statement(sql).await?;
        self.query_prepared(&st, params).await
    }

    pub(super) async fn query_prepared(
        &self,
        st: &Statement,
        params: &[Param],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect();
        self.client.query(st, &refs).await
    }

    pub(in crate::store) async fn batch(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.client.batch_execute(sql).await
    }
}

/// Run `f` (which uses `conn`) to completion, driving `conn`'s I/O
/// meanwhile if its user drives it (see the module).
///
/// Two users of one connection take turns: the second's requests are sent
/// once the first is answered.
pub(in crate::store) async fn drive<T>(conn: &Conn, f: impl Future<Output = T>) -> T {
    let mut slot = conn.driver.lock().await;
    let Some(d) = slot.as_mut() else {
        return f.await;
    };
    let f = std::pin::pin!(f);
    match futures_util::future::select(f, d).await {
        futures_util::future::Either::Left((out, _)) => out,
        // the connection ended: what `f` waits for fails with it
        futures_util::future::Either::Right(((), f)) => {
            *slot = None;
            f.await
        }
    }
}

/// A new connection. Its I/O runs in a task on the runtime this is
/// awaited on or, if `driven`, wherever its user [`drive`]s it.
///
/// The store's statements look rows up by key and ranges by bounds,
/// whatever the parameters: each keeps one generic plan (left to choose,
/// the server plans a union of such lookups afresh at every call, which
/// costs more than running it), and that plan uses the primary key (one
/// made while a table was small would scan it whole for as long as the
/// plan lives, however large the table grows). Keys are looked up by
/// index scans, not bitmap scans: a bitmap scan costs more to set up
/// than a few keys cost to find (`perf` on a writer's backend put setting
/// up the fetch's bitmap scans at 5% of its time).
pub(super) async fn open(
    connector: &leasehold_provider_postgres::Pool,
    driven: bool,
) -> Result<Arc<Conn>, StoreError> {
    let (client, driver) = if driven {
        let (c, d) = connector
            .connect_driven()
            .await
            .map_err(|e| StoreError::Io(e.message))?;
        (c, Some(d))
    } else {
        let c = connector
            .connect()
            .await
            .map_err(|e| StoreError::Io(e.message))?;
        (c, None)
    };
    let conn = Conn::new(client, driver);
    drive(
        &conn,
        conn.batch(
            "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; \
             SET enable_bitmapscan = off",
        ),
    )
    .await
    .map_err(|e| pg_err(&e))?;
    Ok(Arc::new(conn))
}
