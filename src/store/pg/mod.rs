//! The PostgreSQL backend: the same tables as redb (`schema.rs`), one
//! PostgreSQL table each (`lh_<name>`: ordered key, redb's key bytes,
//! value bytes), so the operations of `txn/` and the queries of
//! `reader.rs` run unchanged on it. Several brokers share one database.
//!
//! - **Group commit per node:** one writer thread per broker takes every
//!   queued operation into one transaction, as redb's writer does; the
//!   commit is PostgreSQL's (durable before anyone is answered).
//! - **One chain:** each write transaction first locks the chain head's
//!   row (`SELECT ... FOR UPDATE`), so the cluster's write transactions
//!   run one at a time: every check-then-write rule holds across nodes as
//!   it does inside one, and events are appended in one order. Readers
//!   (REPEATABLE READ snapshots on pooled connections) never wait for it.
//! - **Leadership** (`cluster.rs`): a lease row timed by the database's
//!   clock, with an epoch that leader-only writes check in their own
//!   transaction.

mod cluster;
mod conn;
mod memory;
mod recent;
mod session;
mod statements;
mod table;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc;

pub use cluster::{ClusterView, Leadership, NodeView};
pub(super) use session::Session;
pub(super) use statements::Ahead;
pub(super) use table::{Range, Table};

use super::kv::{ReadSource, ord_of};
use super::lifecycle::ChainHead;
use super::reader::KvReader;
use super::schema::{self, TABLES};
use super::seam::Reader;
use super::{Backend, CommitStats, Job, QUEUE_DEPTH, Sealer, StoreError, StoreKey, StoreOptions};
use conn::Conn;
use session::{Db, Param, pg_err};

/// A PostgreSQL store's schema version (its own sequence: redb's layout is
/// mirrored table for table, and this counts what PostgreSQL adds).
/// Version 3: redb's version 3, mirrored. Version 4: every write
/// transaction logs the keys it wrote (`lh_changes`, read by nodes that
/// remember rows: `memory.rs`), and every row of the mirrored tables
/// carries `logged`, NOT NULL without a default. A build that does not log
/// its writes leaves `logged` out of its inserts, so its write transactions
/// fail (each one that changes anything also writes its event), and no node
/// decides on a row such a build changed behind its back. A version-3 store
/// is migrated as it opens.
pub const PG_SCHEMA_VERSION: u32 = 4;

/// The column an older build's inserts leave out (see [`PG_SCHEMA_VERSION`]).
const FENCE_COLUMN: &str = "logged";

/// How a broker reaches its PostgreSQL store, and who it is in the cluster.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Host, port, database, user, password, TLS, pool size (the same
    /// fields and rules as the PostgreSQL provider's connection).
    pub connection: leasehold_provider_postgres::PostgresConfig,
    /// This node's name in the cluster (unique per running broker).
    pub node: String,
    /// The address other people reach this node at, shown in `/v1/cluster`.
    pub advertise: String,
    /// How long a leader's lease lasts without renewal.
    pub lease_period: Duration,
    /// Open without joining the cluster (no election, no node entry): for
    /// tools working on a stopped cluster's store (`store copy`).
    pub passive: bool,
}

/// The database's runtime, shut down without waiting when dropped (it may
/// be dropped inside another runtime, e.g. when opening fails in a test).
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The backend: the database, the writer thread, the leader election.
pub(super) struct PgBackend {
    db: Arc<Db>,
    rt: Runtime,
    writer: Option<JoinHandle<()>>,
    cluster: Option<cluster::Elector>,
    leadership: Leadership,
    changes: tokio::sync::broadcast::Sender<String>,
    node: String,
    healthy: Arc<AtomicBool>,
    stats: Arc<CommitStats>,
    sealer: Sealer,
    location: PathBuf,
}

impl Backend for PgBackend {
    fn read(&self) -> Result<Reader, StoreError> {
        let s = Session::reader(self.db.clone())?;
        Ok(Box::new(KvReader::new(ReadSource::Pg(Arc::new(s)))))
    }

    fn read_recent(&self, reads: &super::Reads) -> Option<Reader> {
        let (rows, ranges) = self.db.recent.answer(&statements::Ahead::of(reads))?;
        let s = Session::recent(self.db.clone(), rows, ranges);
        Some(Box::new(KvReader::new(ReadSource::Pg(Arc::new(s)))))
    }

    fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    fn stats(&self) -> &CommitStats {
        &self.stats
    }

    /// The last write (or the election's last round trip) reached the
    /// database.
    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn location(&self) -> &Path {
        &self.location
    }

    fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    fn pool(&self) -> Option<(usize, usize)> {
        Some(self.db.pool_stats())
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        Some(self.changes.subscribe())
    }

    fn cluster(&self) -> Result<Option<ClusterView>, StoreError> {
        let node = self.node.clone();
        self.db
            .pooled(|c| async move { cluster::view(&c, node).await })
            .map(Some)
    }

    fn close(&mut self) {
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        if let Some(c) = self.cluster.take() {
            c.stop();
        }
        if let Some(rt) = self.rt.0.take() {
            rt.shutdown_background();
        }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn raw(&self) -> Result<ReadSource, StoreError> {
        Ok(ReadSource::Pg(Arc::new(Session::reader(self.db.clone())?)))
    }
}

impl PgBackend {
    pub(super) fn db(&self) -> &Arc<Db> {
        &self.db
    }

    /// Run SQL on a fresh connection (tests look at the tables directly).
    #[cfg(test)]
    pub(super) fn sql(&self, sql: &str) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let conn = self.db.connect()?;
        let sql = sql.to_owned();
        self.db
            .block(async move { conn.query(&sql, &[]).await.map_err(|e| pg_err(&e)) })
    }
}

/// Connect, create or check the schema (version, key), start the writer and
/// the election.
pub(super) fn open(
    opts: &StoreOptions,
    pg: &PgOptions,
    key: &StoreKey,
) -> Result<(Box<dyn Backend>, mpsc::Sender<Job>), StoreError> {
    let readers = pg.connection.pool_size.saturating_sub(2).max(1);
    let (rt, db) = database(pg, 2, readers)?;
    let location = PathBuf::from(format!("postgres://{}", db.name));
    let sealer = Sealer::new(key);
    let conn = db.connect()?;
    prepare(&db, &conn, &sealer, &key.fingerprint(), PG_SCHEMA_VERSION)?;
    drop(conn);
    let healthy = Arc::new(AtomicBool::new(true));
    let stats = Arc::new(CommitStats::default());
    let leadership = Leadership::default();
    let (changes, _) = tokio::sync::broadcast::channel(64);
    let elector = if pg.passive {
        None
    } else {
        Some(cluster::Elector::start(
            db.clone(),
            pg.clone(),
            leadership.clone(),
            healthy.clone(),
            changes.clone(),
        )?)
    };
    let (sender, rx) = mpsc::channel::<Job>(QUEUE_DEPTH);
    let writer = {
        let db = db.clone();
        let cfg = writer::Config {
            on_commit: opts.on_commit.clone(),
            node: pg.node.clone(),
        };
        let (healthy, stats) = (healthy.clone(), stats.clone());
        std::thread::Builder::new()
            .name("leasehold-store-writer".into())
            .spawn(move || writer::run(&db, rx, &cfg, &healthy, &stats))
            .map_err(|e| StoreError::Io(format!("cannot start the writer thread: {e}")))?
    };
    Ok((
        Box::new(PgBackend {
            db,
            rt,
            writer: Some(writer),
            cluster: elector,
            leadership,
            changes,
            node: pg.node.clone(),
            healthy,
            stats,
            sealer,
            location,
        }),
        sender,
    ))
}

/// The database's runtime (`threads` workers) and its connections (up to
/// `readers` for reads).
fn database(
    pg: &PgOptions,
    threads: usize,
    readers: usize,
) -> Result<(Runtime, Arc<Db>), StoreError> {
    let rt = Runtime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("leasehold-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io(format!("cannot start the database runtime: {e}")))?,
    ));
    let handle =
        rt.0.as_ref()
            .map(|r| r.handle().clone())
            .ok_or(StoreError::Closed)?;
    let connector = leasehold_provider_postgres::Pool::new(pg.connection.clone())
        .map_err(|e| StoreError::Io(format!("store PostgreSQL connection: {e}")))?;
    Ok((rt, Arc::new(Db::new(handle, Arc::new(connector), readers))))
}

/// `config validate`: reach the database, and check (reading only) what a
/// start would refuse: credentials, TLS, the privileges the store needs, a
/// schema from a newer build, another store key. Returns what it found.
pub fn check(pg: &PgOptions, key: &StoreKey) -> Result<(String, bool), StoreError> {
    let (_rt, db) = database(pg, 1, 1)?;
    let conn = db.connect()?;
    let name = db.name.clone();
    let found = db.block(async move { inspect(&conn).await })?;
    match found {
        None => Ok((
            format!(
                "store postgres://{name}: reachable, no leasehold schema yet (the first broker creates it)"
            ),
            false,
        )),
        Some(stamp) => {
            if stamp.version > PG_SCHEMA_VERSION {
                return Err(StoreError::NewerSchema {
                    found: stamp.version,
                    supported: PG_SCHEMA_VERSION,
                });
            }
            if stamp.version < MIGRATES_FROM {
                return Err(StoreError::NoMigration {
                    from: stamp.version,
                    to: PG_SCHEMA_VERSION,
                });
            }
            if !schema::key_matches(&Sealer::new(key), stamp.check.as_deref()) {
                return Err(StoreError::WrongKey {
                    given: key.fingerprint(),
                    expected: stamp.fingerprint,
                });
            }
            let migrate = if stamp.version < PG_SCHEMA_VERSION {
                format!(
                    " (this build migrates it to {PG_SCHEMA_VERSION} as it starts; stop the \
                     cluster's older nodes first: their writes are refused from then on)"
                )
            } else {
                String::new()
            };
            Ok((
                format!(
                    "store postgres://{name}: reachable, schema {}{migrate}, the store key matches",
                    stamp.version
                ),
                true,
            ))
        }
    }
}

/// The stamp of an existing store (`None`: no schema yet), after checking
/// the privileges a broker needs; writes nothing.
async fn inspect(conn: &Conn) -> Result<Option<Stamp>, StoreError> {
    let e = |e: tokio_postgres::Error| pg_err(&e);
    let exists = conn
        .query(
            "SELECT to_regclass('lh_meta') IS NOT NULL, current_schema()::text, current_user::text",
            &[],
        )
        .await
        .map_err(e)?;
    let row = exists
        .first()
        .ok_or_else(|| StoreError::Corrupt("no answer".into()))?;
    let (exists, schema, user): (bool, Option<String>, String) =
        (row.get(0), row.get(1), row.get(2));
    if !exists {
        let schema = schema.ok_or_else(|| {
            StoreError::Io(format!(
                "role `{user}` has no schema to create tables in (search_path)"
            ))
        })?;
        let can = conn
            .query(
                "SELECT has_schema_privilege($1, 'CREATE')",
                &[Box::new(schema.clone())],
            )
            .await
            .map_err(e)?;
        if !can.first().is_some_and(|r| r.get::<_, bool>(0)) {
            return Err(StoreError::Io(format!(
                "role `{user}` may not create tables in schema `{schema}`: grant it CREATE there (or create the store as its owner)"
            )));
        }
        return Ok(None);
    }
    let mut tables: Vec<String> = TABLES.iter().map(|t| format!("lh_{t}")).collect();
    tables.extend(["lh_leader".into(), "lh_nodes".into(), "lh_changes".into()]);
    let missing = conn
        .query(
            "SELECT t FROM unnest($1::text[]) AS t \
             WHERE to_regclass(t) IS NULL OR NOT has_table_privilege(t, 'SELECT, INSERT, UPDATE, DELETE')",
            &[Box::new(tables)],
        )
        .await
        .map_err(e)?;
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(|r| r.get(0)).collect();
        return Err(StoreError::Io(format!(
            "role `{user}` may not read and write {} (missing, or without SELECT, INSERT, UPDATE, DELETE)",
            names.join(", ")
        )));
    }
    let sql = "SELECT v FROM lh_meta WHERE k = $1";
    let get = |rows: Vec<tokio_postgres::Row>| rows.first().map(|r| r.get::<_, Vec<u8>>(0));
    let version = get(conn
        .query(sql, &[bytes(meta_key("schema_version"))])
        .await
        .map_err(e)?)
    .ok_or_else(|| StoreError::NotAStore("lh_meta holds no schema version".into()))?;
    read_stamp(conn, &version).await.map(Some)
}

/// An existing store's stamp: its version (`version`, as stored), the key
/// check and the key's fingerprint.
async fn read_stamp(conn: &Conn, version: &[u8]) -> Result<Stamp, StoreError> {
    let e = |e: tokio_postgres::Error| pg_err(&e);
    let sql = "SELECT v FROM lh_meta WHERE k = $1";
    let get = |rows: Vec<tokio_postgres::Row>| rows.first().map(|r| r.get::<_, Vec<u8>>(0));
    let b: [u8; 4] = version
        .try_into()
        .map_err(|_| StoreError::Corrupt("meta `schema_version` is not a u32".into()))?;
    let check = get(conn
        .query(sql, &[bytes(meta_key("key_check"))])
        .await
        .map_err(e)?);
    let fp = get(conn
        .query(sql, &[bytes(meta_key("key_fingerprint"))])
        .await
        .map_err(e)?);
    Ok(Stamp {
        version: u32::from_be_bytes(b),
        check,
        fingerprint: fp
            .map(|f| String::from_utf8_lossy(&f).into_owned())
            .unwrap_or_default(),
    })
}

/// Serializes the first start of several nodes on an empty database.
const SCHEMA_LOCK: i64 = 0x6c65_6173_6568_6f6c; // "leasehol"

fn meta_key(name: &'static str) -> Vec<u8> {
    ord_of::<&'static str>(&name)
}

fn bytes(v: Vec<u8>) -> Param {
    Box::new(v)
}

/// In one transaction: create what is missing, then stamp a new store or
/// check an existing one (schema version, store key). A refusal rolls
/// everything back: nothing is written.
fn prepare(
    db: &Arc<Db>,
    conn: &Arc<Conn>,
    sealer: &Sealer,
    fingerprint: &str,
    target: u32,
) -> Result<(), StoreError> {
    let check = schema::key_check(sealer)?;
    let existing_check = {
        let conn = conn.clone();
        let fingerprint = fingerprint.to_owned();
        db.block(async move {
            let r = create_and_stamp(&conn, target, check, fingerprint).await;
            if r.is_err() {
                let _ = conn.batch("ROLLBACK").await;
            }
            r
        })?
    };
    let Stamp {
        version,
        check,
        fingerprint: expected,
    } = existing_check;
    if version > target {
        return Err(StoreError::NewerSchema {
            found: version,
            supported: target,
        });
    }
    if version < target {
        // the one older PostgreSQL layout (3) is migrated in
        // `create_and_stamp`; none before it ever existed there
        return Err(StoreError::NoMigration {
            from: version,
            to: target,
        });
    }
    if !schema::key_matches(sealer, check.as_deref()) {
        return Err(StoreError::WrongKey {
            given: fingerprint.to_owned(),
            expected,
        });
    }
    Ok(())
}

/// The oldest PostgreSQL layout this build migrates.
const MIGRATES_FROM: u32 = 3;

/// Version 3 to 4, in the opening transaction (which holds the schema
/// lock): every mirrored table gains the fence column, true for the rows
/// it holds (adding a column with a constant default rewrites nothing),
/// then loses the default, so an insert that leaves it out fails.
async fn migrate_to_4(conn: &Conn) -> Result<(), StoreError> {
    let mut ddl = String::new();
    for t in TABLES {
        ddl.push_str(&format!(
            "ALTER TABLE lh_{t} ADD COLUMN IF NOT EXISTS {FENCE_COLUMN} boolean NOT NULL DEFAULT true;\n\
             ALTER TABLE lh_{t} ALTER COLUMN {FENCE_COLUMN} DROP DEFAULT;\n"
        ));
    }
    conn.batch(&ddl).await.map_err(|e| pg_err(&e))?;
    // the stamp, as a new store's is written
    conn.query(
        "UPDATE lh_meta SET v = $1 WHERE k = $2",
        &[
            bytes(PG_SCHEMA_VERSION.to_be_bytes().to_vec()),
            bytes(meta_key("schema_version")),
        ],
    )
    .await
    .map(|_| ())
    .map_err(|e| pg_err(&e))
}

/// Columns that hold what is already packed, and the tables they are in:
/// event blocks (deflated, see `blocks.rs`) and the change log's arrays
/// of names and keys (read once by each other node, then pruned).
const PACKED: [(&str, &[&str]); 2] = [("lh_event_blocks", &["v"]), ("lh_changes", &["t", "k"])];

/// The largest row [`PACKED`] tables keep inline: about a page.
const INLINE_BYTES: u32 = 8160;

/// Keep rows of [`PACKED`] columns inline up to a page, and never
/// compress them. With the server's defaults, a value past 2 KB (a
/// block of a few dozen events; a busy batch's change row) is first
/// compressed (pglz, which finds nothing left in deflated bytes) then
/// moved to the table's TOAST table: one more row and index entry per
/// value. Both ran in every batch, under the chain head's lock; `perf`
/// on a writer's backend put them at 4% of its time. Storage settings
/// change no layout (an older build reads the rows as before), so they
/// are applied here, once per store, rather than by a migration; an owner
/// other than the store's role may apply them by hand with the same
/// statements.
async fn inline_packed(conn: &Conn) -> Result<(), StoreError> {
    let columns: Vec<String> = PACKED
        .iter()
        .flat_map(|(t, cs)| cs.iter().map(move |c| format!("{t}.{c}")))
        .collect();
    let wanted = columns.len() as i64;
    let set = conn
        .query(
            &format!(
                "SELECT count(*) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
                 WHERE c.relnamespace = current_schema()::regnamespace \
                 AND (c.relname || '.' || a.attname) = ANY($1::text[]) AND a.attstorage = 'e' \
                 AND 'toast_tuple_target={INLINE_BYTES}' = ANY(coalesce(c.reloptions, '{{}}'))"
            ),
            &[Box::new(columns)],
        )
        .await
        .map_err(|e| pg_err(&e))?;
    if set.first().map(|r| r.get::<_, i64>(0)) == Some(wanted) {
        return Ok(());
    }
    let mut ddl = String::new();
    for (t, columns) in PACKED {
        let mut parts: Vec<String> = columns
            .iter()
            .map(|c| format!("ALTER COLUMN {c} SET STORAGE EXTERNAL"))
            .collect();
        parts.push(format!("SET (toast_tuple_target = {INLINE_BYTES})"));
        ddl.push_str(&format!("ALTER TABLE {t} {};\n", parts.join(", ")));
    }
    // an optimisation only: a store whose tables another role owns opens
    // without it (the savepoint keeps the transaction usable)
    let e = |e: tokio_postgres::Error| pg_err(&e);
    conn.batch("SAVEPOINT packed").await.map_err(e)?;
    match conn.batch(&ddl).await {
        Ok(()) => conn.batch("RELEASE SAVEPOINT packed").await.map_err(e),
        Err(err) => {
            tracing::warn!(error = %err, "could not keep packed values inline (the store works, a little slower): {ddl}");
            conn.batch("ROLLBACK TO SAVEPOINT packed").await.map_err(e)
        }
    }
}

struct Stamp {
    version: u32,
    check: Option<Vec<u8>>,
    fingerprint: String,
}

async fn create_and_stamp(
    conn: &Conn,
    target: u32,
    check: Vec<u8>,
    fingerprint: String,
) -> Result<Stamp, StoreError> {
    let e = |e: tokio_postgres::Error| pg_err(&e);
    conn.batch("BEGIN").await.map_err(e)?;
    conn.query("SELECT pg_advisory_xact_lock($1)", &[Box::new(SCHEMA_LOCK)])
        .await
        .map_err(e)?;
    let mut ddl = String::new();
    for t in TABLES {
        ddl.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS lh_{t} (k bytea PRIMARY KEY, rk bytea NOT NULL, v bytea NOT NULL, \
             {FENCE_COLUMN} boolean NOT NULL);\n"
        ));
    }
    ddl.push_str(cluster::DDL);
    ddl.push_str(memory::DDL);
    conn.batch(&ddl).await.map_err(e)?;
    inline_packed(conn).await?;
    let get = |rows: Vec<tokio_postgres::Row>| rows.first().map(|r| r.get::<_, Vec<u8>>(0));
    let sql = "SELECT v FROM lh_meta WHERE k = $1";
    let version = get(conn
        .query(sql, &[bytes(meta_key("schema_version"))])
        .await
        .map_err(e)?);
    let stamp = match version {
        None => {
            let head = ChainHead::default().to_bytes().to_vec();
            let rows: [(&'static str, Vec<u8>); 4] = [
                ("schema_version", target.to_be_bytes().to_vec()),
                ("key_check", check.clone()),
                ("key_fingerprint", fingerprint.clone().into_bytes()),
                ("chain_head", head),
            ];
            for (k, v) in rows {
                conn.query(
                    "INSERT INTO lh_meta (k, rk, v, logged) VALUES ($1, $2, $3, true)",
                    &[bytes(meta_key(k)), bytes(k.as_bytes().to_vec()), bytes(v)],
                )
                .await
                .map_err(e)?;
            }
            Stamp {
                version: target,
                check: Some(check),
                fingerprint,
            }
        }
        Some(v) => {
            let stamp = read_stamp(conn, &v).await?;
            if (MIGRATES_FROM..target).contains(&stamp.version) {
                migrate_to_4(conn).await?;
                Stamp {
                    version: target,
                    ..stamp
                }
            } else {
                stamp
            }
        }
    };
    if stamp.version != target {
        // refused below: write nothing, not even the tables
        conn.batch("ROLLBACK").await.map_err(e)?;
    } else {
        conn.batch("COMMIT").await.map_err(e)?;
    }
    Ok(stamp)
}
