//! Statements sent together on one connection: pipelined (one round trip
//! for many); statements made of parts (a transaction's writes, all
//! tables at once); and the one select that fetches named rows ahead.

use std::collections::{BTreeMap, HashMap};

use tokio_postgres::Row;

use super::super::{RangeWant, Reads, StoreError};
use super::conn::Conn;
use super::memory::Fetched;
use super::session::{Param, pg_err};

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

/// Rows of ranges fetched ahead, by (table, lo, hi): (key, redb key, value).
pub(in crate::store) type Ranges = HashMap<(&'static str, Vec<u8>, Vec<u8>), Vec<Raw>>;
pub(in crate::store) type Raw = (Vec<u8>, Vec<u8>, Vec<u8>);

/// One statement made of parts, numbering the parameters they bind.
#[derive(Default)]
pub(super) struct Sql {
    parts: Vec<String>,
    params: Vec<Param>,
}

impl Sql {
    /// `p` as the next parameter: its placeholder.
    fn bind(&mut self, p: Param) -> String {
        self.params.push(p);
        format!("${}", self.params.len())
    }

    fn part(&mut self, sql: String) {
        self.parts.push(sql);
    }

    /// Delete `keys` from `table`.
    pub(super) fn delete(&mut self, table: &str, keys: Vec<Vec<u8>>) {
        if keys.is_empty() {
            return;
        }
        let keys = self.bind(Box::new(keys));
        self.part(format!(
            "DELETE FROM lh_{table} WHERE k = ANY({keys}::bytea[])"
        ));
    }

    /// Insert or replace rows of `table` (marked as logged: schema 4).
    pub(super) fn upsert(
        &mut self,
        table: &str,
        ks: Vec<Vec<u8>>,
        rks: Vec<Vec<u8>>,
        vs: Vec<Vec<u8>>,
    ) {
        if ks.is_empty() {
            return;
        }
        let (ks, rks, vs) = (
            self.bind(Box::new(ks)),
            self.bind(Box::new(rks)),
            self.bind(Box::new(vs)),
        );
        self.part(format!(
            "INSERT INTO lh_{table} (k, rk, v, logged) \
             SELECT k, rk, v, true \
             FROM unnest({ks}::bytea[], {rks}::bytea[], {vs}::bytea[]) AS u(k, rk, v) \
             ON CONFLICT (k) DO UPDATE SET rk = EXCLUDED.rk, v = EXCLUDED.v"
        ));
    }

    /// Prune the change log below `ver`.
    pub(super) fn prune_changes(&mut self, ver: i64) {
        let ver = self.bind(Box::new(ver));
        self.part(format!("DELETE FROM lh_changes WHERE ver < {ver}"));
    }

    /// The statement appending a change row naming the (table, key) pairs
    /// written, returning its number: one past the newest in the
    /// statement's snapshot, which a prune in the same statement does not
    /// change (and the chain head's lock keeps every other writer out).
    pub(super) fn change_row(&mut self, tables: Vec<&'static str>, keys: Vec<Vec<u8>>) -> String {
        let (t, k) = (self.bind(Box::new(tables)), self.bind(Box::new(keys)));
        format!(
            "INSERT INTO lh_changes (ver, t, k) \
             SELECT coalesce(max(ver), 0) + 1, {t}::text[], {k}::bytea[] FROM lh_changes \
             RETURNING ver"
        )
    }

    /// The parts as one query: each a `SELECT` of the same columns.
    fn union(self) -> (String, Vec<Param>) {
        (self.parts.join(" UNION ALL "), self.params)
    }

    /// The parts (each an `INSERT`, `UPDATE` or `DELETE`) as one statement
    /// ending in `last` (which returns what the statement returns), or
    /// `None` for no parts and no `last`. Each part of a `WITH` runs once
    /// and to completion, all on the statement's one snapshot: no two
    /// parts may touch the same row.
    pub(super) fn writes(mut self, last: Option<String>) -> Option<(String, Vec<Param>)> {
        let last = match last {
            Some(l) => l,
            None if self.parts.len() == 1 => self.parts.pop()?,
            None if self.parts.is_empty() => return None,
            None => "SELECT 1".to_owned(),
        };
        if self.parts.is_empty() {
            return Some((last, self.params));
        }
        let with: Vec<String> = self
            .parts
            .iter()
            .enumerate()
            .map(|(i, p)| format!("w{i} AS ({p})"))
            .collect();
        Some((format!("WITH {} {last}", with.join(", ")), self.params))
    }
}

/// What one part of [`Ahead::statement`] fetches: the rows named in a
/// table, the ranges named in a table, or the leases ranges point to.
enum Part<'a> {
    Rows(&'static str, &'a [Vec<u8>]),
    Ranges(&'static str, Vec<&'a RangeWant>),
    Pointed,
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

    /// Its parts, in the order [`Ahead::statement`] numbers them.
    fn parts(&self) -> Vec<Part<'_>> {
        let mut ranges: BTreeMap<&'static str, Vec<&RangeWant>> = BTreeMap::new();
        for r in &self.ranges {
            ranges.entry(r.0).or_default().push(r);
        }
        self.keys
            .iter()
            .map(|(t, keys)| Part::Rows(t, keys))
            .chain(ranges.into_iter().map(|(t, want)| Part::Ranges(t, want)))
            .chain((!self.pointed.is_empty()).then_some(Part::Pointed))
            .collect()
    }

    /// The one statement fetching it all (a statement is a snapshot of
    /// its own, and each statement costs the server and the node more than
    /// the rows it returns): a union of a select per table of named rows,
    /// one per table of ranges (an index range scan per range, by a
    /// lateral join over their bounds) and one for the lease records that
    /// `task_leases` ranges point to. Each row is (part, range, key, redb
    /// key, value); the text depends only on which tables are named, so
    /// few statements are prepared.
    pub(super) fn statement(&self) -> (String, Vec<Param>) {
        let mut sql = Sql::default();
        for (i, part) in self.parts().into_iter().enumerate() {
            let select = match part {
                Part::Rows(t, keys) => {
                    let keys = sql.bind(Box::new(keys.to_vec()));
                    format!(
                        "SELECT {i}::int4, 0::int8, k, NULL::bytea, v FROM lh_{t} \
                         WHERE k = ANY({keys}::bytea[])"
                    )
                }
                Part::Ranges(t, want) => {
                    let (lo, hi) = bounds(want.iter().map(|(_, lo, hi)| (lo, hi)), &mut sql);
                    format!(
                        "SELECT {i}::int4, b.i, r.k, r.rk, r.v \
                         FROM unnest({lo}::bytea[], {hi}::bytea[]) WITH ORDINALITY AS b(lo, hi, i) \
                         CROSS JOIN LATERAL (SELECT k, rk, v FROM lh_{t} WHERE k >= b.lo AND k < b.hi) AS r"
                    )
                }
                // a `task_leases` key is the task's id then the lease's, 16
                // bytes each (`kv::OrdKey`); a lease's key is its id. The
                // keys are gathered first, then looked up by the primary
                // key (a join lets the planner scan the whole table)
                Part::Pointed => {
                    let (lo, hi) = bounds(self.pointed.iter().map(|(lo, hi)| (lo, hi)), &mut sql);
                    format!(
                        "SELECT {i}::int4, 0::int8, k, NULL::bytea, v FROM lh_leases WHERE k = ANY(ARRAY(\
                         SELECT substring(x.k FROM 17 FOR 16) \
                         FROM unnest({lo}::bytea[], {hi}::bytea[]) AS b(lo, hi) \
                         CROSS JOIN LATERAL (SELECT k FROM lh_task_leases WHERE k >= b.lo AND k < b.hi) AS x))"
                    )
                }
            };
            sql.part(select);
        }
        sql.union()
    }

    /// What [`Ahead::statement`] answered: the rows named (each asked key,
    /// and those found), and every range named with its rows in order.
    pub(super) fn answers(&self, rows: &[Row]) -> (Fetched, Ranges) {
        let parts = self.parts();
        let mut found: Vec<Vec<(Vec<u8>, Vec<u8>)>> = vec![Vec::new(); parts.len()];
        let mut in_range: HashMap<(usize, i64), Vec<Raw>> = HashMap::new();
        for r in rows {
            let part = usize::try_from(r.get::<_, i32>(0)).unwrap_or(usize::MAX);
            match parts.get(part) {
                Some(Part::Ranges(..)) => in_range.entry((part, r.get(1))).or_default().push((
                    r.get(2),
                    r.get(3),
                    r.get(4),
                )),
                Some(_) => found[part].push((r.get(2), r.get(4))),
                None => {}
            }
        }
        use redb::TableHandle as _;
        let leases = super::super::kv::pg_name(super::super::schema::LEASES.name());
        let mut fetched = Fetched::new();
        let mut fetched_ranges = Ranges::new();
        for (part, (p, rows)) in parts.into_iter().zip(found).enumerate() {
            match p {
                Part::Rows(t, keys) => fetched.push((t, keys.to_vec(), rows)),
                Part::Pointed => fetched.push((leases, Vec::new(), rows)),
                Part::Ranges(t, want) => {
                    for (i, (_, lo, hi)) in (1i64..).zip(want) {
                        let mut rows = in_range.remove(&(part, i)).unwrap_or_default();
                        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                        fetched_ranges.insert((t, lo.clone(), hi.clone()), rows);
                    }
                }
            }
        }
        (fetched, fetched_ranges)
    }
}

/// Ranges' bounds bound as two arrays: their placeholders.
fn bounds<'a>(
    ranges: impl Iterator<Item = (&'a Vec<u8>, &'a Vec<u8>)>,
    sql: &mut Sql,
) -> (String, String) {
    let (lo, hi): (Vec<Vec<u8>>, Vec<Vec<u8>>) =
        ranges.map(|(lo, hi)| (lo.clone(), hi.clone())).unzip();
    (sql.bind(Box::new(lo)), sql.bind(Box::new(hi)))
}
