//! What a node's writer remembers of the rows between its batches, and
//! the cluster's change log that keeps that memory true.
//!
//! Every write transaction of the cluster holds the chain head's row lock
//! and, when it writes, appends one row to `lh_changes`: the next number
//! and every (table, key) it wrote. A writer beginning a batch reads, once
//! it holds the lock, the change rows numbered past the last it has seen
//! and forgets those keys; every row it still remembers is then what the
//! database holds, and nothing changes it before this batch commits (the
//! lock), so the batch reads it from memory instead of asking. A gap in
//! the numbers (rows pruned while this node was away) or a failed batch
//! forgets everything; so does growing past [`MAX_ROWS`].
//!
//! Without it a task's open, lease and completion, each in another batch,
//! read the same rows from the database again and again: about 20 round
//! trips per task cycle, each while the cluster's one lock is held.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::super::schema::TABLES;
use super::recent::Recent;

/// The change log. `t` and `k` are parallel: table names and keys.
pub(super) const DDL: &str = "
CREATE TABLE IF NOT EXISTS lh_changes (
    ver bigint PRIMARY KEY,
    t text[] NOT NULL,
    k bytea[] NOT NULL
);
";

/// Rows remembered past this many are all forgotten (then read again as
/// needed): a bound on memory, about 20 MiB of typical rows.
pub(super) const MAX_ROWS: usize = 65_536;

/// Change rows kept behind the newest (a node that falls further behind
/// forgets what it remembers); older ones are pruned every
/// [`PRUNE_EVERY`] batches of a node.
pub(super) const KEEP_CHANGES: i64 = 4_096;
pub(super) const PRUNE_EVERY: u64 = 256;

/// Change rows read at most when catching up; a node further behind
/// forgets what it remembers instead of reading them all.
pub(super) const CATCH_UP_ROWS: usize = 1_024;

/// Remembered rows by table: a value, or `None` for a row known absent.
pub(in crate::store) type Rows = HashMap<&'static str, HashMap<Vec<u8>, Option<Vec<u8>>>>;

/// Rows fetched ahead: per table, the keys asked for and the rows found.
pub(super) type Fetched = Vec<(&'static str, Vec<Vec<u8>>, Vec<(Vec<u8>, Vec<u8>)>)>;

/// One change row: its number, and the tables and keys it names.
pub(super) type Change = (i64, Vec<Option<&'static str>>, Vec<Vec<u8>>);

/// A change row's table names as this build's own: read from the row
/// without a `String` each (a busy batch's catch-up reads over a hundred).
pub(super) fn tables_named(names: Vec<&str>) -> Vec<Option<&'static str>> {
    names
        .into_iter()
        .map(|n| TABLES.iter().find(|t| **t == n).copied())
        .collect()
}

/// What the change log said at the start of a batch.
pub(super) enum Seen {
    /// The change rows past the last one seen: (number, tables, keys),
    /// each table by its name in [`TABLES`] (`None` for one this build
    /// does not have: nothing of it is remembered).
    Since(Vec<Change>),
    /// Nothing was remembered: the newest number (0 for none yet).
    Newest(i64),
}

#[derive(Default)]
pub(super) struct Memory {
    rows: Rows,
    /// The change the remembered rows are true at; `None`: nothing
    /// remembered.
    seen: Option<i64>,
    batches: u64,
    /// Rows remembered until the last catch-up found another node had
    /// changed them: named again, they are fetched with the batch's first
    /// round trip even if remembered by then, because the catch-up in
    /// that same round trip is likely to forget them again (a count every
    /// node changes), and a row forgotten there costs a round trip of its
    /// own under the lock.
    contended: HashMap<&'static str, HashSet<Vec<u8>>>,
    /// The node's committed rows of a few tables, which forget what this
    /// memory learns others changed (`recent.rs`).
    recent: Arc<Recent>,
}

impl Memory {
    pub(super) fn new(recent: Arc<Recent>) -> Self {
        Self {
            recent,
            ..Self::default()
        }
    }

    fn clear(&mut self) {
        self.rows.clear();
        self.contended.clear();
        self.recent.clear();
    }

    /// The last change seen (what to ask the log for next).
    pub(super) fn seen(&self) -> Option<i64> {
        self.seen
    }

    /// Bring the memory up to the log: forget what others changed since.
    pub(super) fn catch_up(&mut self, seen: Seen) {
        match seen {
            Seen::Newest(v) => {
                self.clear();
                self.seen = Some(v);
            }
            Seen::Since(changes) => {
                let Some(mut at) = self.seen else {
                    // asked only with a number; be safe all the same
                    self.forget();
                    return;
                };
                if changes.len() >= CATCH_UP_ROWS {
                    // there may be more: the next batch starts afresh
                    self.forget();
                    return;
                }
                self.contended.clear();
                self.recent
                    .forget(changes.iter().flat_map(|(_, tables, keys)| {
                        tables
                            .iter()
                            .zip(keys)
                            .filter_map(|(t, k)| Some(((*t)?, k.as_slice())))
                    }));
                for (ver, tables, keys) in changes {
                    if ver != at + 1 {
                        // pruned past us: whatever happened in between is unknown
                        self.clear();
                    }
                    for (t, k) in tables.into_iter().zip(keys) {
                        let Some(t) = t else { continue };
                        let rows = self.rows.get_mut(t);
                        if rows.is_some_and(|rows| rows.remove(k.as_slice()).is_some()) {
                            self.contended.entry(t).or_default().insert(k);
                        }
                    }
                    at = ver;
                }
                self.seen = Some(at);
            }
        }
    }

    /// Whether a row is remembered (present or absent).
    pub(super) fn knows(&self, table: &str, k: &[u8]) -> bool {
        self.rows.get(table).is_some_and(|t| t.contains_key(k))
    }

    /// Whether a row is remembered and sure to stay so through the next
    /// catch-up, as far as the last one tells: remembered, and not among
    /// the rows it found changed by another node ([`Memory::contended`]).
    pub(super) fn keeps(&self, table: &'static str, k: &[u8]) -> bool {
        self.knows(table, k) && self.contended.get(table).is_none_or(|c| !c.contains(k))
    }

    /// Rows fetched ahead under the lock, after [`Memory::catch_up`]: the
    /// keys asked for, and those found with their values (the rest are
    /// absent).
    pub(super) fn absorb(&mut self, fetched: Fetched) {
        for (t, asked, found) in fetched {
            let table = self.rows.entry(t).or_default();
            for k in asked {
                table.insert(k, None);
            }
            for (k, v) in found {
                table.insert(k, Some(v));
            }
        }
    }

    /// The rows, lent to a batch's session.
    pub(super) fn lend(&mut self) -> Rows {
        std::mem::take(&mut self.rows)
    }

    /// A batch committed: what its session knows is true at `ver` (its
    /// own change; `None`: it wrote nothing, so still at `seen`).
    pub(super) fn keep(&mut self, rows: Rows, ver: Option<i64>) {
        let n: usize = rows.values().map(HashMap::len).sum();
        self.rows = if n > MAX_ROWS { Rows::new() } else { rows };
        if ver.is_some() {
            self.seen = ver;
        }
        self.batches += 1;
    }

    /// Whether this batch should prune the log (one in [`PRUNE_EVERY`]).
    pub(super) fn prune_due(&self) -> bool {
        self.batches.is_multiple_of(PRUNE_EVERY)
    }

    /// A batch failed, or the connection went: nothing remembered is sure.
    pub(super) fn forget(&mut self) {
        self.clear();
        self.seen = None;
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.rows.values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remembering(keys: &[&[u8]]) -> Memory {
        let mut m = Memory::default();
        m.catch_up(Seen::Newest(7));
        let mut rows = Rows::new();
        for k in keys {
            rows.entry("tasks")
                .or_default()
                .insert(k.to_vec(), Some(b"v".to_vec()));
        }
        m.keep(rows, None);
        m
    }

    #[test]
    fn others_changes_are_forgotten_in_the_recent_rows_too() {
        let recent = Arc::new(Recent::default());
        let mut m = Memory::new(recent.clone());
        m.catch_up(Seen::Newest(7));
        let row = || Some((b"rk".to_vec(), b"v".to_vec()));
        recent.committed(
            vec![],
            vec![
                ("tasks", b"a".to_vec(), row()),
                ("tasks", b"b".to_vec(), row()),
            ],
        );
        m.catch_up(Seen::Since(vec![(
            8,
            vec!["tasks".into()],
            vec![b"a".to_vec()],
        )]));
        assert_eq!(recent.len(), 1, "b is still kept");
        m.catch_up(Seen::Since(vec![(10, vec![], vec![])]));
        assert_eq!(recent.len(), 0, "a gap forgets everything");
        recent.committed(vec![], vec![("tasks", b"a".to_vec(), row())]);
        m.forget();
        assert_eq!(recent.len(), 0, "a failed batch forgets everything");
    }

    #[test]
    fn others_changes_are_forgotten_and_the_rest_kept() {
        let mut m = remembering(&[b"a", b"b"]);
        m.catch_up(Seen::Since(vec![(
            8,
            vec!["tasks".into()],
            vec![b"a".to_vec()],
        )]));
        assert_eq!(m.seen(), Some(8));
        let rows = m.lend();
        assert!(!rows["tasks"].contains_key(b"a".as_slice()));
        assert!(rows["tasks"].contains_key(b"b".as_slice()));
    }

    #[test]
    fn a_row_another_node_changed_is_fetched_again_until_a_catch_up_leaves_it() {
        let mut m = remembering(&[b"a", b"b"]);
        assert!(m.keeps("tasks", b"a") && m.keeps("tasks", b"b"));
        // another node changed a: forgotten, and marked
        let changed_a = |ver| Seen::Since(vec![(ver, vec!["tasks".into()], vec![b"a".to_vec()])]);
        m.catch_up(changed_a(8));
        assert!(!m.knows("tasks", b"a"));
        // learnt again (fetched, or written by this node's batch), a is
        // remembered but not to be relied on before the next catch-up
        m.absorb(vec![("tasks", vec![b"a".to_vec()], vec![])]);
        assert!(m.knows("tasks", b"a"));
        assert!(!m.keeps("tasks", b"a"), "a would not be fetched ahead");
        assert!(m.keeps("tasks", b"b"));
        // a row never remembered is not marked when others change it
        m.catch_up(Seen::Since(vec![(
            9,
            vec!["tasks".into()],
            vec![b"c".to_vec()],
        )]));
        assert!(m.keeps("tasks", b"a"), "a catch-up that left a unmarks it");
        m.absorb(vec![("tasks", vec![b"c".to_vec()], vec![])]);
        assert!(m.keeps("tasks", b"c"));
        // forgetting everything forgets the marks too
        m.catch_up(changed_a(10));
        m.forget();
        m.catch_up(Seen::Newest(10));
        m.absorb(vec![("tasks", vec![b"a".to_vec()], vec![])]);
        assert!(m.keeps("tasks", b"a"));
    }

    #[test]
    fn a_table_this_build_does_not_have_is_passed_over_in_step() {
        assert_eq!(
            tables_named(vec!["tables_of_a_newer_build", "tasks"]),
            vec![None, Some("tasks")]
        );
        let mut m = remembering(&[b"a", b"b"]);
        m.catch_up(Seen::Since(vec![(
            8,
            tables_named(vec!["tables_of_a_newer_build", "tasks"]),
            vec![b"b".to_vec(), b"a".to_vec()],
        )]));
        assert!(!m.knows("tasks", b"a"), "the key named with tasks");
        assert!(m.knows("tasks", b"b"), "not the other table's key");
    }

    #[test]
    fn a_gap_in_the_log_forgets_everything() {
        let mut m = remembering(&[b"a", b"b"]);
        m.catch_up(Seen::Since(vec![(9, vec![], vec![])]));
        assert_eq!(m.len(), 0);
        assert_eq!(m.seen(), Some(9));
    }

    #[test]
    fn a_node_too_far_behind_forgets_everything_and_the_number() {
        let mut m = remembering(&[b"a"]);
        let changes = (8..8 + CATCH_UP_ROWS as i64)
            .map(|v| (v, vec![], vec![]))
            .collect();
        m.catch_up(Seen::Since(changes));
        assert_eq!(m.len(), 0);
        assert_eq!(m.seen(), None);
    }

    #[test]
    fn a_failed_batch_forgets_everything_and_the_number() {
        let mut m = remembering(&[b"a"]);
        m.forget();
        assert_eq!(m.len(), 0);
        assert_eq!(m.seen(), None);
    }

    #[test]
    fn too_many_rows_are_forgotten() {
        let mut m = remembering(&[]);
        let mut rows = Rows::new();
        let t = rows.entry("leases").or_default();
        for i in 0..=MAX_ROWS {
            t.insert(i.to_be_bytes().to_vec(), None);
        }
        m.keep(rows, Some(8));
        assert_eq!(m.len(), 0);
        assert_eq!(m.seen(), Some(8));
    }
}
