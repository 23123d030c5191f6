//! One table of a PostgreSQL session ([`Table`]), and its ranges
//! ([`Range`]), which `kv.rs` puts under the store's operations.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::Arc;

use redb::{Key, Value};

use super::super::StoreError;
use super::super::kv::Guard;
use super::session::{Param, Session};
use super::statements::Raw;

/// Rows per round trip of a range: a few first (most ranges stop early),
/// then more.
const FIRST_CHUNK: i64 = 16;
const CHUNK: i64 = 512;

/// One table of a session.
pub(in crate::store) struct Table<K, V> {
    s: Arc<Session>,
    name: &'static str,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K: Key + 'static, V: Value + 'static> Table<K, V> {
    pub(in crate::store) fn new(s: Arc<Session>, name: &'static str) -> Self {
        Self {
            s,
            name,
            _types: PhantomData,
        }
    }

    pub(in crate::store) fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(e) = self.s.buffered(self.name, k) {
            return Ok(e);
        }
        let rows = self.s.query(
            format!("SELECT v FROM lh_{} WHERE k = $1", self.name),
            vec![Box::new(k.to_vec())],
        )?;
        let v = rows.first().map(|r| r.get::<_, Vec<u8>>(0));
        self.s.remember(self.name, k, v.clone());
        Ok(v)
    }

    pub(in crate::store) fn insert(&mut self, k: Vec<u8>, rk: Vec<u8>, v: Vec<u8>) {
        self.s.put(self.name, k, Some((rk, v)));
    }

    pub(in crate::store) fn remove(&mut self, k: Vec<u8>) {
        self.s.put(self.name, k, None);
    }

    /// Keys in `[lo, hi)` (ordered encoding; no `hi`: to the end).
    pub(in crate::store) fn range(
        &self,
        lo: Vec<u8>,
        hi: Option<Vec<u8>>,
    ) -> Result<Range<K, V>, StoreError> {
        if let Some(rows) = hi
            .as_deref()
            .and_then(|h| self.s.fetched_range(self.name, &lo, h))
        {
            // fetched ahead under the lock, nothing written into it since
            return Ok(Range {
                s: self.s.clone(),
                name: self.name,
                lo,
                hi,
                front: rows.into(),
                back: VecDeque::new(),
                middle_empty: true,
                chunk: CHUNK,
                failed: false,
                _types: PhantomData,
            });
        }
        self.s.flush(self.name)?;
        Ok(Range {
            s: self.s.clone(),
            name: self.name,
            lo,
            hi,
            front: VecDeque::new(),
            back: VecDeque::new(),
            middle_empty: false,
            chunk: FIRST_CHUNK,
            failed: false,
            _types: PhantomData,
        })
    }

    pub(in crate::store) fn len(&self) -> Result<u64, StoreError> {
        self.s.flush(self.name)?;
        let rows = self
            .s
            .query(format!("SELECT count(*) FROM lh_{}", self.name), vec![])?;
        let n: i64 = rows.first().map(|r| r.get(0)).unwrap_or(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// A range, fetched in chunks from either end. Both ends fetch only from
/// the part neither has fetched yet (`[lo, hi)`); once that part is empty,
/// each end takes what the other end fetched but has not handed out.
pub(in crate::store) struct Range<K, V> {
    s: Arc<Session>,
    name: &'static str,
    lo: Vec<u8>,
    hi: Option<Vec<u8>>,
    /// Fetched from the front, ascending.
    front: VecDeque<Raw>,
    /// Fetched from the back, ascending (handed out from its end).
    back: VecDeque<Raw>,
    middle_empty: bool,
    chunk: i64,
    failed: bool,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K: Key + 'static, V: Value + 'static> Range<K, V> {
    fn fetch(&mut self, ascending: bool) -> Result<Vec<Raw>, StoreError> {
        let order = if ascending { "" } else { " DESC" };
        let mut params: Vec<Param> = vec![Box::new(self.lo.clone())];
        let upper = match &self.hi {
            Some(h) => {
                params.push(Box::new(h.clone()));
                " AND k < $2"
            }
            None => "",
        };
        let asked = self.chunk;
        params.push(Box::new(asked));
        let sql = format!(
            "SELECT k, rk, v FROM lh_{} WHERE k >= $1{upper} ORDER BY k{order} LIMIT ${}",
            self.name,
            params.len()
        );
        self.chunk = CHUNK;
        let rows = self.s.query(sql, params)?;
        let out: Vec<Raw> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        match out.last() {
            None => self.middle_empty = true,
            Some((k, _, _)) if ascending => {
                let mut next = k.clone();
                next.push(0);
                self.lo = next;
            }
            Some((k, _, _)) => self.hi = Some(k.clone()),
        }
        // fewer than asked: that was all of the middle (no round trip to
        // find it empty)
        if i64::try_from(out.len()).unwrap_or(i64::MAX) < asked {
            self.middle_empty = true;
        }
        Ok(out)
    }

    fn entry(raw: Raw) -> Result<(Guard<'static, K>, Guard<'static, V>), StoreError> {
        Ok((Guard::owned(raw.1), Guard::owned(raw.2)))
    }

    fn step(&mut self, ascending: bool) -> Option<Result<Raw, StoreError>> {
        if self.failed {
            return None;
        }
        let own = if ascending {
            self.front.pop_front()
        } else {
            self.back.pop_back()
        };
        if let Some(r) = own {
            return Some(Ok(r));
        }
        if !self.middle_empty {
            match self.fetch(ascending) {
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
                Ok(rows) if !rows.is_empty() => {
                    if ascending {
                        self.front.extend(rows);
                        return self.front.pop_front().map(Ok);
                    }
                    self.back.extend(rows.into_iter().rev());
                    return self.back.pop_back().map(Ok);
                }
                Ok(_) => {}
            }
        }
        if ascending {
            self.back.pop_front().map(Ok)
        } else {
            self.front.pop_back().map(Ok)
        }
    }
}

impl<K: Key + 'static, V: Value + 'static> Iterator for Range<K, V> {
    type Item = Result<(Guard<'static, K>, Guard<'static, V>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.step(true).map(|r| r.and_then(Self::entry))
    }
}

impl<K: Key + 'static, V: Value + 'static> DoubleEndedIterator for Range<K, V> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.step(false).map(|r| r.and_then(Self::entry))
    }
}
