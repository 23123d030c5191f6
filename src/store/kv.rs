//! The table layer under the write transaction ([`super::txn::KvTxn`]) and
//! the reader ([`super::reader::KvReader`]): ordered tables of typed keys
//! and values, as redb defines them in `schema.rs`, kept either in redb or
//! in PostgreSQL ([`super::pg`]). Every rule of the store (check then
//! write, a lease and its indexes in one operation, the chain in the same
//! transaction) is written once, above this layer, so both backends keep
//! the same invariants by construction.
//!
//! A PostgreSQL table holds `(k, rk, v)`: `k` is the key in an encoding
//! whose byte order is the key's order ([`OrdKey`]), so ranges are index
//! scans; `rk` and `v` are redb's own encodings of the key and the value,
//! decoded with redb's types. Records are the same bytes in both backends
//! (sealed handles stay sealed; the database never sees a credential).

use std::borrow::Borrow;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};

use std::sync::Arc;

use redb::{
    Key, ReadableTable as _, ReadableTableMetadata as _, TableDefinition, TableHandle as _, Value,
};

use super::StoreError;
use super::pg;
use super::wal::{Logged, Redo};

/// A key type whose values have an encoding ordered as the values are
/// (memcmp order), so an ordered index in another engine ranges over them
/// as redb does.
pub(super) trait OrdKey: Key + 'static {
    fn ord(v: &Self::SelfType<'_>, out: &mut Vec<u8>);
}

/// The ordered encoding of a key.
pub(super) fn ord_of<K: OrdKey>(v: &K::SelfType<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    K::ord(v, &mut out);
    out
}

impl OrdKey for u64 {
    fn ord(v: &u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&v.to_be_bytes());
    }
}

impl OrdKey for u128 {
    fn ord(v: &u128, out: &mut Vec<u8>) {
        out.extend_from_slice(&v.to_be_bytes());
    }
}

impl OrdKey for i64 {
    fn ord(v: &i64, out: &mut Vec<u8>) {
        // flipping the sign bit orders negatives before positives
        out.extend_from_slice(&((*v as u64) ^ (1 << 63)).to_be_bytes());
    }
}

impl OrdKey for &'static str {
    /// Each 0 byte escaped as `00 FF`, then a `00 01` terminator: a string
    /// orders before every longer string it prefixes, and a tuple's next
    /// component never compares against a string's bytes.
    fn ord(v: &&str, out: &mut Vec<u8>) {
        for b in v.bytes() {
            out.push(b);
            if b == 0 {
                out.push(0xFF);
            }
        }
        out.extend_from_slice(&[0, 1]);
    }
}

impl<A: OrdKey, B: OrdKey> OrdKey for (A, B) {
    fn ord(v: &(A::SelfType<'_>, B::SelfType<'_>), out: &mut Vec<u8>) {
        A::ord(&v.0, out);
        B::ord(&v.1, out);
    }
}

impl<A: OrdKey, B: OrdKey, C: OrdKey> OrdKey for (A, B, C) {
    fn ord(v: &(A::SelfType<'_>, B::SelfType<'_>, C::SelfType<'_>), out: &mut Vec<u8>) {
        A::ord(&v.0, out);
        B::ord(&v.1, out);
        C::ord(&v.2, out);
    }
}

/// A range's bounds in the ordered encoding, as `[lo, hi)`: an inclusive
/// bound `b` ends before `b || 00`, the smallest encoding after `b`.
pub(super) fn ord_bounds<'k, K: OrdKey, KR>(r: &impl RangeBounds<KR>) -> (Vec<u8>, Option<Vec<u8>>)
where
    KR: Borrow<K::SelfType<'k>> + 'k,
{
    let after = |k: &KR| {
        let mut b = ord_of::<K>(k.borrow());
        b.push(0);
        b
    };
    let lo = match r.start_bound() {
        Bound::Included(k) => ord_of::<K>(k.borrow()),
        Bound::Excluded(k) => after(k),
        Bound::Unbounded => Vec::new(),
    };
    let hi = match r.end_bound() {
        Bound::Included(k) => Some(after(k)),
        Bound::Excluded(k) => Some(ord_of::<K>(k.borrow())),
        Bound::Unbounded => None,
    };
    (lo, hi)
}

/// A value read from a table: borrowed from redb's page, or owned bytes
/// from PostgreSQL; either way `value()` decodes it with redb's type.
pub(super) enum Guard<'a, V: Value + 'static> {
    Redb(redb::AccessGuard<'a, V>),
    Owned(Vec<u8>, PhantomData<V>),
}

impl<V: Value + 'static> Guard<'_, V> {
    pub(super) fn owned(bytes: Vec<u8>) -> Self {
        Guard::Owned(bytes, PhantomData)
    }

    pub(super) fn value(&self) -> V::SelfType<'_> {
        match self {
            Guard::Redb(g) => g.value(),
            Guard::Owned(b, _) => V::from_bytes(b),
        }
    }
}

type Pair<'a, K, V> = (Guard<'a, K>, Guard<'a, V>);
type Entry<'a, K, V> = Result<Pair<'a, K, V>, StoreError>;

/// An ordered range of a table, either end first.
pub(super) enum Range<'a, K: Key + 'static, V: Value + 'static> {
    Redb(redb::Range<'a, K, V>),
    Pg(pg::Range<K, V>),
}

fn redb_entry<'a, K: Key + 'static, V: Value + 'static>(
    e: Result<(redb::AccessGuard<'a, K>, redb::AccessGuard<'a, V>), redb::StorageError>,
) -> Entry<'a, K, V> {
    e.map(|(k, v)| (Guard::Redb(k), Guard::Redb(v)))
        .map_err(StoreError::from)
}

impl<'a, K: Key + 'static, V: Value + 'static> Iterator for Range<'a, K, V> {
    type Item = Entry<'a, K, V>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Range::Redb(r) => r.next().map(redb_entry),
            Range::Pg(r) => r.next(),
        }
    }
}

impl<K: Key + 'static, V: Value + 'static> DoubleEndedIterator for Range<'_, K, V> {
    fn next_back(&mut self) -> Option<Self::Item> {
        match self {
            Range::Redb(r) => r.next_back().map(redb_entry),
            Range::Pg(r) => r.next_back(),
        }
    }
}

/// One table as an operation sees it: logged redb (a write transaction),
/// read-only redb (a snapshot), or PostgreSQL (either).
pub(super) enum Table<'t, K: OrdKey, V: Value + 'static> {
    Logged(Logged<'t, K, V>),
    ReadOnly(redb::ReadOnlyTable<K, V>),
    Pg(pg::Table<K, V>),
}

impl<'t, K: OrdKey, V: Value + 'static> Table<'t, K, V> {
    pub(super) fn get<'k>(
        &self,
        key: impl Borrow<K::SelfType<'k>>,
    ) -> Result<Option<Guard<'_, V>>, StoreError> {
        Ok(match self {
            Table::Logged(t) => t.get(key)?.map(Guard::Redb),
            Table::ReadOnly(t) => t.get(key)?.map(Guard::Redb),
            Table::Pg(t) => t.get(&ord_of::<K>(key.borrow()))?.map(Guard::owned),
        })
    }

    pub(super) fn range<'k, KR>(
        &self,
        range: impl RangeBounds<KR> + 'k,
    ) -> Result<Range<'_, K, V>, StoreError>
    where
        KR: Borrow<K::SelfType<'k>> + 'k,
    {
        Ok(match self {
            Table::Logged(t) => Range::Redb(t.range(range)?),
            Table::ReadOnly(t) => Range::Redb(t.range(range)?),
            Table::Pg(t) => {
                let (lo, hi) = ord_bounds::<K, KR>(&range);
                Range::Pg(t.range(lo, hi)?)
            }
        })
    }

    pub(super) fn iter(&self) -> Result<Range<'_, K, V>, StoreError> {
        Ok(match self {
            Table::Logged(t) => Range::Redb(t.iter()?),
            Table::ReadOnly(t) => Range::Redb(t.iter()?),
            Table::Pg(t) => Range::Pg(t.range(Vec::new(), None)?),
        })
    }

    pub(super) fn first(&self) -> Result<Option<Pair<'_, K, V>>, StoreError> {
        self.iter()?.next().transpose()
    }

    pub(super) fn last(&self) -> Result<Option<Pair<'_, K, V>>, StoreError> {
        self.iter()?.next_back().transpose()
    }

    pub(super) fn len(&self) -> Result<u64, StoreError> {
        Ok(match self {
            Table::Logged(_) => {
                return Err(StoreError::Corrupt(
                    "counting a table inside a write transaction".into(),
                ));
            }
            Table::ReadOnly(t) => t.len()?,
            Table::Pg(t) => t.len()?,
        })
    }

    pub(super) fn insert<'k, 'v>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
        value: impl Borrow<V::SelfType<'v>>,
    ) -> Result<(), StoreError> {
        match self {
            Table::Logged(t) => t.insert(key, value).map(|_| ()).map_err(StoreError::from),
            Table::ReadOnly(_) => Err(read_only()),
            Table::Pg(t) => {
                let k = key.borrow();
                t.insert(
                    ord_of::<K>(k),
                    K::as_bytes(k).as_ref().to_vec(),
                    V::as_bytes(value.borrow()).as_ref().to_vec(),
                );
                Ok(())
            }
        }
    }

    pub(super) fn remove<'k>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
    ) -> Result<(), StoreError> {
        match self {
            Table::Logged(t) => t.remove(key).map(|_| ()).map_err(StoreError::from),
            Table::ReadOnly(_) => Err(read_only()),
            Table::Pg(t) => {
                t.remove(ord_of::<K>(key.borrow()));
                Ok(())
            }
        }
    }
}

/// A table's name as a `'static` (PostgreSQL tables are `lh_<name>`, one
/// per name in [`super::schema::TABLES`]).
pub(super) fn pg_name(name: &str) -> &'static str {
    super::schema::TABLES
        .iter()
        .find(|n| **n == name)
        .copied()
        // a table missing from the list fails its first query, by this name
        .unwrap_or("table_missing_from_schema_tables")
}

/// Where a transaction's tables live.
pub(super) enum Source<'t> {
    Redb(&'t redb::WriteTransaction),
    Pg(Arc<pg::Session>),
}

impl<'t> Source<'t> {
    /// A table of this transaction (redb's open at first use).
    pub(super) fn table<K: OrdKey, V: Value + 'static>(
        &self,
        def: TableDefinition<'static, K, V>,
        redo: &Redo,
    ) -> Table<'t, K, V> {
        match self {
            Source::Redb(txn) => Table::Logged(Logged::open(txn, def, redo)),
            Source::Pg(s) => Table::Pg(pg::Table::new(s.clone(), pg_name(def.name()))),
        }
    }
}

/// Where a snapshot's tables live.
pub(super) enum ReadSource {
    Redb(redb::ReadTransaction),
    Pg(Arc<pg::Session>),
}

impl ReadSource {
    pub(super) fn open<K: OrdKey, V: Value + 'static>(
        &self,
        def: TableDefinition<'static, K, V>,
    ) -> Result<Table<'static, K, V>, StoreError> {
        Ok(match self {
            ReadSource::Redb(txn) => Table::ReadOnly(txn.open_table(def)?),
            ReadSource::Pg(s) => Table::Pg(pg::Table::new(s.clone(), pg_name(def.name()))),
        })
    }
}

fn read_only() -> StoreError {
    StoreError::Corrupt("a write to a read-only snapshot".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted_by_ord<K: OrdKey>(mut keys: Vec<K::SelfType<'static>>) -> bool
    where
        K::SelfType<'static>: Clone,
    {
        let enc: Vec<Vec<u8>> = keys.iter().map(|k| ord_of::<K>(k)).collect();
        let mut by_bytes: Vec<usize> = (0..keys.len()).collect();
        by_bytes.sort_by(|a, b| enc[*a].cmp(&enc[*b]));
        let by_redb: Vec<usize> = {
            let bytes: Vec<Vec<u8>> = keys
                .iter()
                .map(|k| K::as_bytes(k).as_ref().to_vec())
                .collect();
            let mut idx: Vec<usize> = (0..keys.len()).collect();
            idx.sort_by(|a, b| K::compare(&bytes[*a], &bytes[*b]));
            idx
        };
        keys.clear();
        by_bytes == by_redb
    }

    #[test]
    fn the_ordered_encoding_orders_as_redb_compares() {
        assert!(sorted_by_ord::<i64>(vec![
            i64::MIN,
            -1_000,
            -1,
            0,
            1,
            255,
            256,
            i64::MAX
        ]));
        assert!(sorted_by_ord::<u128>(vec![
            0,
            1,
            255,
            256,
            1 << 64,
            u128::MAX
        ]));
        assert!(sorted_by_ord::<&str>(vec![
            "",
            "\0",
            "\0\0",
            "a",
            "a\0",
            "a\0b",
            "ab",
            "b",
            "\u{10ffff}"
        ]));
        assert!(sorted_by_ord::<(&str, u128)>(vec![
            ("", u128::MAX),
            ("a", 0),
            ("a", 7),
            ("a\0", 0),
            ("ab", 0),
        ]));
        assert!(sorted_by_ord::<(&str, i64, u128)>(vec![
            ("p", i64::MIN, 0),
            ("p", -5, 9),
            ("p", 0, 0),
            ("p", 0, 1),
            ("q", i64::MIN, 0),
        ]));
    }

    #[test]
    fn inclusive_bounds_cover_exactly_their_keys() {
        let (lo, hi) = ord_bounds::<u64, u64>(&(3u64..=5u64));
        let hi = hi.unwrap_or_default();
        for k in 0u64..10 {
            let e = ord_of::<u64>(&k);
            assert_eq!(e >= lo && e < hi, (3..=5).contains(&k), "{k}");
        }
        let (lo, hi) = ord_bounds::<(&str, u128), (&str, u128)>(&(("w", 0u128)..=("w", u128::MAX)));
        let hi = hi.unwrap_or_default();
        for (w, id) in [
            ("w", 0u128),
            ("w", u128::MAX),
            ("v", 1),
            ("wx", 0),
            ("w\0", 1),
        ] {
            let e = ord_of::<(&str, u128)>(&(w, id));
            assert_eq!(e >= lo && e < hi, w == "w", "{w:?} {id}");
        }
    }
}
