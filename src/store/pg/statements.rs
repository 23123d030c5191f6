//! Statements sent together on one connection: pipelined (one round trip
//! for many), and the selects that fetch named rows ahead.

use std::collections::{BTreeMap, HashMap};

use tokio_postgres::Row;

use super::super::{RangeWant, Reads, StoreError};
use super::memory::Fetched;
use super::session::{Conn, Param, pg_err};

/// Send `statements` (then `last`, a simple statement such as `COMMIT`)
/// pipelined: one round trip, in this order (each is prepared first, so
/// that none waits for its preparation while a later one is sent). Every
/// answer is awaited and any error returned: after a failed statement the
/// transaction is aborted, and a `COMMIT` sent with it rolls back without
/// an error of its own.
pub(super) async fn pipelined(
    conn: &Conn,
    statements: &[(String, Vec<Param>)],
    last: Option<&'static str>,
) -> Result<Vec<Vec<Row>>, StoreError> {
    let prepared =
        futures_util::future::try_join_all(statements.iter().map(|(sql, _)| conn.statement(sql)))
            .await
            .map_err(|e| pg_err(&e))?;
    let sent = futures_util::future::join_all(
        prepared
            .iter()
            .zip(statements)
            .map(|(st, (_, params))| conn.query_prepared(st, params)),
    );
    let end = async {
        match last {
            Some(sql) => conn.batch(sql).await,
            None => Ok(()),
        }
    };
    let (answers, ended) = futures_util::join!(sent, end);
    let rows = answers
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pg_err(&e))?;
    ended.map_err(|e| pg_err(&e))?;
    Ok(rows)
}

/// One statement per table fetching the rows `wants` names.
pub(super) fn selects(wants: &BTreeMap<&'static str, Vec<Vec<u8>>>) -> Vec<(String, Vec<Param>)> {
    wants
        .iter()
        .map(|(t, keys)| {
            let keys: Param = Box::new(keys.clone());
            (
                format!("SELECT k, v FROM lh_{t} WHERE k = ANY($1::bytea[])"),
                vec![keys],
            )
        })
        .collect()
}

pub(super) fn fetched(
    wants: &BTreeMap<&'static str, Vec<Vec<u8>>>,
    answers: impl Iterator<Item = Vec<tokio_postgres::Row>>,
) -> Fetched {
    wants
        .iter()
        .zip(answers)
        .map(|((t, keys), rows)| {
            let found = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            (*t, keys.clone(), found)
        })
        .collect()
}

/// Rows of ranges fetched ahead, by (table, lo, hi): (key, redb key, value).
pub(in crate::store) type Ranges = HashMap<(&'static str, Vec<u8>, Vec<u8>), Vec<Raw>>;
pub(in crate::store) type Raw = (Vec<u8>, Vec<u8>, Vec<u8>);

/// One statement per range named, fetching its every row (an index range
/// scan each; one statement joining many ranges' bounds cost more than
/// several of these, measured).
fn range_selects(wants: &[RangeWant]) -> Vec<(String, Vec<Param>)> {
    wants
        .iter()
        .map(|(t, lo, hi)| {
            let params: Vec<Param> = vec![Box::new(lo.clone()), Box::new(hi.clone())];
            (
                format!("SELECT k, rk, v FROM lh_{t} WHERE k >= $1 AND k < $2 ORDER BY k"),
                params,
            )
        })
        .collect()
}

/// The answers of [`range_selects`]: every range named, with its rows
/// (none for an empty one).
fn ranges_fetched(wants: &[RangeWant], answers: impl Iterator<Item = Vec<Row>>) -> Ranges {
    wants
        .iter()
        .zip(answers)
        .map(|((t, lo, hi), rows)| {
            let rows = rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            ((*t, lo.clone(), hi.clone()), rows)
        })
        .collect()
}

/// What is fetched ahead in one round trip: named rows by table, named
/// ranges, and the lease records `task_leases` ranges point to (a
/// writer's with its lock, a reader's as its snapshot begins).
#[derive(Default)]
pub(in crate::store) struct Ahead {
    pub(super) keys: BTreeMap<&'static str, Vec<Vec<u8>>>,
    pub(super) ranges: Vec<RangeWant>,
    pub(super) pointed: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Ahead {
    /// What a read snapshot's `reads` name.
    pub(in crate::store) fn of(reads: &Reads) -> Self {
        Self {
            keys: Reads::by_table([reads]),
            ranges: Reads::ranges_of([reads]),
            pointed: reads.pointed.clone(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.ranges.is_empty() && self.pointed.is_empty()
    }

    /// The statements fetching it, rows first.
    pub(super) fn statements(&self) -> Vec<(String, Vec<Param>)> {
        let mut out = selects(&self.keys);
        out.extend(range_selects(&self.ranges));
        // a `task_leases` key is the task's id then the lease's, 16 bytes
        // each (`kv::OrdKey`); a lease's key is its id. The keys are
        // gathered first, then looked up by the primary key (a join lets
        // the planner scan the whole table)
        out.extend(self.pointed.iter().map(|(lo, hi)| {
            let params: Vec<Param> = vec![Box::new(lo.clone()), Box::new(hi.clone())];
            (
                "SELECT k, v FROM lh_leases WHERE k = ANY(ARRAY(\
                 SELECT substring(k FROM 17 FOR 16) FROM lh_task_leases \
                 WHERE k >= $1 AND k < $2))"
                    .to_owned(),
                params,
            )
        }));
        out
    }

    /// What [`Ahead::statements`] answered.
    pub(super) fn answers(&self, answers: impl Iterator<Item = Vec<Row>>) -> (Fetched, Ranges) {
        let mut answers = answers;
        let mut rows = fetched(&self.keys, answers.by_ref());
        let ranges = ranges_fetched(&self.ranges, answers.by_ref());
        use redb::TableHandle as _;
        let leases = super::super::kv::pg_name(super::super::schema::LEASES.name());
        for found in answers.take(self.pointed.len()) {
            let found = found.iter().map(|r| (r.get(0), r.get(1))).collect();
            rows.push((leases, Vec::new(), found));
        }
        (rows, ranges)
    }
}
