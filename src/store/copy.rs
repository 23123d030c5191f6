//! `leasehold store copy`: a stopped broker's store into an empty one, in
//! either direction between redb and PostgreSQL. Every table is copied as
//! it is stored (records stay sealed with the store key, which both sides
//! must share), in one transaction on the target; then the target's chain
//! is verified by the caller.

use std::collections::BTreeMap;
use std::sync::Arc;

use redb::{TableDefinition, Value};

use super::kv::{OrdKey, ReadSource, ord_of};
use super::pg::{self, PgBackend};
use super::schema::*;
use super::writer::RedbBackend;
use super::{Store, StoreError};

/// What was copied: rows per table.
#[derive(Debug, Default, serde::Serialize)]
pub struct CopyReport {
    pub rows: BTreeMap<&'static str, u64>,
}

impl CopyReport {
    pub fn total(&self) -> u64 {
        self.rows.values().sum()
    }
}

/// Where rows go: the target's open write transaction.
enum Sink<'a> {
    Redb(&'a redb::WriteTransaction),
    Pg(Arc<pg::Session>),
}

/// Rows sent to PostgreSQL per round trip.
const FLUSH_EVERY: u64 = 4096;

/// Meta entries that belong to one backend, not to the store: redb's log
/// position, and the schema version (each backend counts its own layout;
/// the target keeps the stamp it was created with).
const LOCAL_META: &[&str] = &["wal_lsn", "schema_version"];

fn table<K: OrdKey, V: Value + 'static>(
    from: &ReadSource,
    to: &Sink<'_>,
    def: TableDefinition<'static, K, V>,
    skip: &dyn Fn(&K::SelfType<'_>) -> bool,
) -> Result<u64, StoreError> {
    let src = from.open(def)?;
    let mut n = 0u64;
    match to {
        Sink::Redb(txn) => {
            let mut t = txn.open_table(def)?;
            for e in src.iter()? {
                let (k, v) = e?;
                if skip(&k.value()) {
                    continue;
                }
                t.insert(k.value(), v.value())?;
                n += 1;
            }
        }
        Sink::Pg(s) => {
            let name = super::kv::pg_name(redb::TableHandle::name(&def));
            let mut t = pg::Table::<K, V>::new(s.clone(), name);
            for e in src.iter()? {
                let (k, v) = e?;
                let key = k.value();
                if skip(&key) {
                    continue;
                }
                t.insert(
                    ord_of::<K>(&key),
                    K::as_bytes(&key).as_ref().to_vec(),
                    V::as_bytes(&v.value()).as_ref().to_vec(),
                );
                n += 1;
                if n.is_multiple_of(FLUSH_EVERY) {
                    s.flush_all()?;
                }
            }
        }
    }
    Ok(n)
}

fn all_tables(from: &ReadSource, to: &Sink<'_>) -> Result<CopyReport, StoreError> {
    let mut r = CopyReport::default();
    macro_rules! copy {
        ($($def:ident),* $(,)?) => {$(
            r.rows.insert(super::kv::pg_name(redb::TableHandle::name(&$def)), table(from, to, $def, &|_| false)?);
        )*};
    }
    copy!(
        TASKS,
        LEASES,
        EXPIRY,
        TASK_LEASES,
        WORKLOAD_LEASES,
        ISSUING,
        REVOKE_QUEUE,
        COUNTERS,
        DENYLIST,
        EVENT_BLOCKS,
        EVENT_TASKS,
        CHECKPOINTS,
        TASK_CALLS,
        APPROVALS,
        APPROVAL_EXPIRY,
        REVIEWS,
        PENDING_REVIEWS,
        WORKLOAD_ACTIVE,
        TASK_ACTIVE,
        JOBS,
        JOB_LEASES,
        JOB_COUNTS,
        FENCES,
        WORKLOAD_TASKS,
    );
    let local = |k: &&str| LOCAL_META.contains(k);
    r.rows.insert("meta", table(from, to, META, &local)?);
    Ok(r)
}

/// Is the store empty (a new store: no row but its metadata)?
fn is_empty(s: &Store) -> Result<bool, StoreError> {
    let r = s.inner.backend.raw()?;
    macro_rules! none {
        ($($def:ident),* $(,)?) => {$(
            if r.open($def)?.first()?.is_some() {
                return Ok(false);
            }
        )*};
    }
    none!(
        TASKS,
        LEASES,
        EVENT_BLOCKS,
        CHECKPOINTS,
        TASK_CALLS,
        APPROVALS,
        REVIEWS,
        JOBS,
        FENCES,
        DENYLIST,
    );
    Ok(s.read()?.chain_head()?.seq == 0)
}

/// Copy every row of `from` into `to`, which must be empty. Both are open
/// stores of this build, opened with the same key (the rows are sealed
/// with it); the caller makes sure no broker uses either.
pub fn copy(from: &Store, to: &Store) -> Result<CopyReport, StoreError> {
    if !is_empty(to)? {
        return Err(StoreError::NotEmpty(to.path().display().to_string()));
    }
    let src = from.inner.backend.raw()?;
    let target = to.inner.backend.as_any();
    if let Some(b) = target.downcast_ref::<RedbBackend>() {
        let txn = b.db().begin_write()?;
        let report = all_tables(&src, &Sink::Redb(&txn))?;
        txn.commit()?;
        return Ok(report);
    }
    if let Some(b) = target.downcast_ref::<PgBackend>() {
        let db = b.db().clone();
        let conn = db.connect()?;
        let session = Arc::new(pg::Session::writer(db.clone(), conn.clone(), None));
        session.begin()?;
        let report = all_tables(&src, &Sink::Pg(session.clone())).and_then(|r| {
            session.flush_all()?;
            session.commit()?;
            Ok(r)
        });
        if report.is_err() {
            let _ = session.rollback();
        }
        return report;
    }
    Err(StoreError::Corrupt("an unknown store backend".into()))
}
