//! Statements sent together on one connection: pipelined (one round trip
//! for many), and the selects that fetch named rows ahead.

use std::collections::BTreeMap;

use tokio_postgres::Row;

use super::super::StoreError;
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
