//! What this node's writer last knew, as of its commits, of the tasks,
//! their lease index, the leases and the active counts ([`Recent`]),
//! shared with the node's request handlers.
//!
//! Two requests read rows only to act ahead of a transaction that checks
//! them. A task's completion renders its events ahead of the writer
//! (`audit::ahead_or`: its transaction uses an event only if the record it
//! was rendered from is the one stored). A lease's decision is made on
//! the task and its count of active leases, and the transaction that
//! writes its intent refuses (`Conflict::Stale`) unless both are still as
//! decided on (`domain/call`). So neither read needs a snapshot of the
//! database: on the node that opened the task and leased under it, as a
//! client's connection usually is, these rows answer it without a round
//! trip ([`Recent::answer`]).
//!
//! The copy is of what a committed batch wrote, and of what it read under
//! the chain head's lock (present or absent), so it is true as of this
//! node's last batch: a change another node makes is forgotten here when
//! this node's writer next reads the change log (`memory.rs`), so a row
//! may be stale, never ahead. A row not kept is not known: a read naming
//! it asks the database.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use super::memory::{Fetched, Rows};
use super::statements::{Ahead, Ranges, Raw};

/// The tables kept (their PostgreSQL names, `kv::pg_name`).
const KEPT: [&str; 5] = [
    "tasks",
    "task_leases",
    "leases",
    "task_active",
    "workload_active",
];

/// Rows kept past this many are all forgotten: a bound on memory, about
/// 8 MiB of typical rows.
const MAX_ROWS: usize = 16_384;

/// A committed write of a kept table: key, and (redb key, value) or
/// `None` for a delete.
pub(super) type Write = (&'static str, Vec<u8>, Option<(Vec<u8>, Vec<u8>)>);

/// A table's rows: ordered key to (redb key, value), or `None` for a row
/// known absent. A row read (not written) keeps no redb key: it is only
/// ever answered by key, never in a range.
type Table = BTreeMap<Vec<u8>, Option<(Vec<u8>, Vec<u8>)>>;

#[derive(Default)]
pub(in crate::store) struct Recent {
    tables: Mutex<(HashMap<&'static str, Table>, usize)>,
}

impl Recent {
    /// Whether `table`'s writes are kept.
    pub(super) fn keeps(table: &str) -> bool {
        KEPT.contains(&table)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<&'static str, Table>, usize)> {
        // a poisoned lock only means a panic elsewhere; the map is intact
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What of `fetched` is kept, as writes (read rows keep no redb key).
    pub(super) fn read_rows(fetched: &Fetched) -> Vec<Write> {
        let mut out = Vec::new();
        for (t, asked, found) in fetched.iter().filter(|f| Self::keeps(f.0)) {
            out.extend(asked.iter().map(|k| (*t, k.clone(), None)));
            out.extend(
                found
                    .iter()
                    .map(|(k, v)| (*t, k.clone(), Some((Vec::new(), v.clone())))),
            );
        }
        out
    }

    /// A batch of this node committed: what it read under the lock
    /// (`read`, from [`Recent::read_rows`]), then what it wrote.
    pub(super) fn committed(&self, read: Vec<Write>, writes: Vec<Write>) {
        if read.is_empty() && writes.is_empty() {
            return;
        }
        let mut g = self.lock();
        let (tables, n) = &mut *g;
        let all = read.into_iter().chain(writes);
        for (t, k, e) in all.filter(|w| Self::keeps(w.0)) {
            if tables.entry(t).or_default().insert(k, e).is_none() {
                *n += 1;
            }
        }
        if *n > MAX_ROWS {
            tables.clear();
            *n = 0;
        }
    }

    /// Other transactions of the cluster wrote these `(table, key)` rows:
    /// forgotten under one hold of the lock the request handlers share.
    pub(super) fn forget<'a>(&self, rows: impl IntoIterator<Item = (&'a str, &'a [u8])>) {
        let mut rows = rows.into_iter().filter(|(t, _)| Self::keeps(t)).peekable();
        if rows.peek().is_none() {
            return;
        }
        let mut g = self.lock();
        let (tables, n) = &mut *g;
        for (t, k) in rows {
            if tables.get_mut(t).and_then(|t| t.remove(k)).is_some() {
                *n -= 1;
            }
        }
    }

    /// Nothing kept is sure any more (a gap in the change log, a failed
    /// batch).
    pub(super) fn clear(&self) {
        let mut g = self.lock();
        g.0.clear();
        g.1 = 0;
    }

    /// The rows and ranges `wants` names, if every row it names (present
    /// or absent), and every lease its pointed ranges hold, is kept (ranges
    /// hold what is kept of them: possibly not all).
    pub(super) fn answer(&self, wants: &Ahead) -> Option<(Rows, Ranges)> {
        let g = self.lock();
        let tables = &g.0;
        let mut rows = Rows::new();
        for (t, keys) in &wants.keys {
            let table = tables.get(t)?;
            let found = rows.entry(t).or_default();
            for k in keys {
                let v = table.get(k)?.as_ref().map(|(_, v)| v.clone());
                found.insert(k.clone(), v);
            }
        }
        let in_range = |t: &str, lo: &[u8], hi: &[u8]| -> Option<Vec<Raw>> {
            let table = tables.get(t)?;
            let mut rows = Vec::new();
            for (k, e) in table.range(lo.to_vec()..hi.to_vec()) {
                match e {
                    // a row read, not written: no redb key to give
                    Some((rk, _)) if rk.is_empty() => return None,
                    Some((rk, v)) => rows.push((k.clone(), rk.clone(), v.clone())),
                    None => {}
                }
            }
            Some(rows)
        };
        let mut ranges = Ranges::new();
        for (t, lo, hi) in &wants.ranges {
            if !Self::keeps(t) {
                return None;
            }
            ranges.insert((t, lo.clone(), hi.clone()), in_range(t, lo, hi)?);
        }
        for (lo, hi) in &wants.pointed {
            let leases = tables.get("leases")?;
            let found = rows.entry("leases").or_default();
            // a `task_leases` key is the task's id then the lease's, 16
            // bytes each; a lease's key is its id (`kv::OrdKey`)
            for (k, _, _) in in_range("task_leases", lo, hi)? {
                let id = k.get(16..32)?;
                let (_, v) = leases.get(id)?.as_ref()?;
                found.insert(id.to_vec(), Some(v.clone()));
            }
        }
        Some((rows, ranges))
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(task: u8, lease: u8) -> Vec<u8> {
        let mut k = vec![0; 32];
        k[15] = task;
        k[31] = lease;
        k
    }

    fn id(n: u8) -> Vec<u8> {
        let mut k = vec![0; 16];
        k[15] = n;
        k
    }

    fn row(v: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        Some((b"rk".to_vec(), v.as_bytes().to_vec()))
    }

    /// Task 1 with leases 7 and 8.
    fn kept() -> Recent {
        let r = Recent::default();
        r.committed(
            vec![],
            vec![
                ("tasks", id(1), row("task 1")),
                ("task_leases", key(1, 7), row("")),
                ("task_leases", key(1, 8), row("")),
                ("leases", id(7), row("lease 7")),
                ("leases", id(8), row("lease 8")),
                ("task_leases", key(2, 9), row("")),
            ],
        );
        r
    }

    fn wants_task(task: u8) -> Ahead {
        let (lo, mut hi) = (key(task, 0), key(task, 0xFF));
        hi.extend_from_slice(&[0xFF; 8]);
        Ahead {
            keys: BTreeMap::from([("tasks", vec![id(task)])]),
            ranges: vec![("task_leases", lo.clone(), hi.clone())],
            pointed: vec![(lo, hi)],
        }
    }

    #[test]
    fn a_task_and_its_leases_are_answered_from_what_was_committed() {
        let r = kept();
        let (rows, ranges) = r.answer(&wants_task(1)).expect("all kept");
        assert_eq!(rows["tasks"][&id(1)], Some(b"task 1".to_vec()));
        assert_eq!(rows["leases"][&id(7)], Some(b"lease 7".to_vec()));
        assert_eq!(rows["leases"][&id(8)], Some(b"lease 8".to_vec()));
        let (_, range) = ranges.into_iter().next().expect("one range");
        let keys: Vec<_> = range.into_iter().map(|(k, _, _)| k).collect();
        // another task's index row is not in the range
        assert_eq!(keys, vec![key(1, 7), key(1, 8)]);
    }

    #[test]
    fn a_row_another_node_wrote_is_not_answered() {
        let r = kept();
        r.forget([("leases", id(8).as_slice())]);
        assert!(r.answer(&wants_task(1)).is_none(), "lease 8 is not known");
        r.forget([("tasks", id(1).as_slice())]);
        assert!(r.answer(&wants_task(1)).is_none());
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn rows_read_and_deleted_are_answered_as_read_or_absent() {
        let r = kept();
        let fetched: Fetched = vec![
            (
                "task_active",
                vec![id(1), id(2)],
                vec![(id(2), b"3".to_vec())],
            ),
            ("lh_meta_not_kept", vec![id(1)], vec![]),
        ];
        r.committed(Recent::read_rows(&fetched), vec![("tasks", id(3), None)]);
        let wants = Ahead {
            keys: BTreeMap::from([("task_active", vec![id(1), id(2)]), ("tasks", vec![id(3)])]),
            ..Ahead::default()
        };
        let (rows, _) = r.answer(&wants).expect("all known");
        assert_eq!(rows["task_active"][&id(1)], None);
        assert_eq!(rows["task_active"][&id(2)], Some(b"3".to_vec()));
        assert_eq!(rows["tasks"][&id(3)], None);
        // a row read keeps no redb key: a range over it is not answered
        let (lo, hi) = (id(0), id(9));
        let ranged = Ahead {
            ranges: vec![("task_active", lo, hi)],
            ..Ahead::default()
        };
        assert!(r.answer(&ranged).is_none());
    }

    #[test]
    fn a_table_not_kept_is_never_answered() {
        let r = kept();
        r.committed(vec![], vec![("lease_counters", id(1), row("1"))]);
        let mut wants = wants_task(1);
        wants.keys.insert("lease_counters", vec![id(1)]);
        assert!(r.answer(&wants).is_none());
        assert_eq!(r.len(), 6, "lease_counters' row is not kept");
    }

    #[test]
    fn clearing_and_growing_past_the_bound_forget_everything() {
        let r = kept();
        r.clear();
        assert!(r.answer(&wants_task(1)).is_none());
        let r = kept();
        r.committed(
            vec![],
            (0..=MAX_ROWS as u64)
                .map(|i| ("leases", i.to_be_bytes().to_vec(), row("")))
                .collect(),
        );
        assert_eq!(r.len(), 0);
        assert!(r.answer(&wants_task(1)).is_none());
    }
}
