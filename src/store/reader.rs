//! The read side: a consistent snapshot ([`KvReader`], the seam's
//! [`ReadTxn`]) over the live store's tables in either backend, and
//! [`Snapshot`], a read-only open of a stopped broker's redb file for
//! offline verification.

use std::collections::BTreeMap;
use std::path::Path;

use redb::ReadableDatabase as _;

use super::StoreError;
use super::blocks;
use super::codec;
use super::kv::ReadSource;
use super::lifecycle::{ChainHead, StoredEvent};
use super::records;
use super::records::*;
use super::schema::{self, *};
use super::seam::{ReadTxn, Reader};
use super::wal;

/// A read snapshot.
pub struct KvReader {
    src: ReadSource,
}

impl std::fmt::Debug for KvReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reader")
    }
}

impl KvReader {
    pub(super) fn new(src: ReadSource) -> Self {
        Self { src }
    }

    fn meta_head(&self, key: &str) -> Result<ChainHead, StoreError> {
        let meta = self.src.open(META)?;
        let v = meta.get(key)?.map(|g| g.value().to_vec());
        match v {
            Some(b) => {
                ChainHead::from_bytes(&b).ok_or_else(|| StoreError::Corrupt(format!("meta {key}")))
            }
            None => Ok(ChainHead::default()),
        }
    }
}

impl ReadTxn for KvReader {
    fn prefetch(&self, reads: &super::Reads) -> Result<(), StoreError> {
        match &self.src {
            ReadSource::Pg(s) => s.prefetch(&super::pg::Ahead::of(reads), reads.last),
            ReadSource::Redb(_) => Ok(()),
        }
    }

    fn task(&self, id: u128) -> Result<Option<TaskRecord>, StoreError> {
        let t = self.src.open(TASKS)?;
        let g = t.get(id)?;
        g.map(|g| codec::decode(g.value())).transpose()
    }

    fn lease(&self, id: u128) -> Result<Option<LeaseRecord>, StoreError> {
        let t = self.src.open(LEASES)?;
        let g = t.get(id)?;
        g.map(|g| codec::decode(g.value())).transpose()
    }

    fn task_leases(&self, task: u128) -> Result<Vec<LeaseRecord>, StoreError> {
        let idx = self.src.open(TASK_LEASES)?;
        let leases = self.src.open(LEASES)?;
        let mut out = Vec::new();
        for e in idx.range((task, 0u128)..=(task, u128::MAX))? {
            let id = e?.0.value().1;
            if let Some(g) = leases.get(id)? {
                out.push(codec::decode(g.value())?);
            }
        }
        Ok(out)
    }

    fn list_leases(&self, q: &LeaseQuery) -> Result<(Vec<LeaseRecord>, Option<u128>), StoreError> {
        let leases = self.src.open(LEASES)?;
        let start = q.after.map_or(0, |a| a.saturating_add(1));
        let limit = q.limit.max(1);
        let budget = q.scan_budget.max(limit);
        let mut out = Vec::new();
        let mut scanned = 0usize;
        let mut last = None;
        let keep = |r: &LeaseRecord| {
            q.provider.as_ref().is_none_or(|p| &r.provider == p)
                && q.role.as_ref().is_none_or(|p| &r.role == p)
                && q.state.is_none_or(|s| r.state == s)
                && q.workload.as_ref().is_none_or(|w| &r.workload == w)
                && q.task.is_none_or(|t| r.task_id == t)
        };
        let mut visit = |id: u128, bytes: &[u8]| -> Result<bool, StoreError> {
            scanned += 1;
            last = Some(id);
            let r: LeaseRecord = codec::decode(bytes)?;
            if keep(&r) {
                out.push(r);
            }
            Ok(out.len() < limit && scanned < budget)
        };
        let mut exhausted = true;
        if let Some(task) = q.task {
            let idx = self.src.open(TASK_LEASES)?;
            for e in idx.range((task, start)..=(task, u128::MAX))? {
                let id = e?.0.value().1;
                if let Some(g) = leases.get(id)?
                    && !visit(id, g.value())?
                {
                    exhausted = false;
                    break;
                }
            }
        } else if let Some(w) = q.workload.as_deref() {
            let idx = self.src.open(WORKLOAD_LEASES)?;
            for e in idx.range((w, start)..=(w, u128::MAX))? {
                let id = e?.0.value().1;
                if let Some(g) = leases.get(id)?
                    && !visit(id, g.value())?
                {
                    exhausted = false;
                    break;
                }
            }
        } else {
            for e in leases.range(start..)? {
                let (k, v) = e?;
                if !visit(k.value(), v.value())? {
                    exhausted = false;
                    break;
                }
            }
        }
        Ok((out, if exhausted { None } else { last }))
    }

    fn next_expiry(&self) -> Result<Option<i64>, StoreError> {
        let t = self.src.open(EXPIRY)?;
        Ok(t.first()?.map(|(k, _)| k.value().0))
    }

    fn due_revocations(
        &self,
        provider: &str,
        now: i64,
        limit: usize,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let q = self.src.open(REVOKE_QUEUE)?;
        let leases = self.src.open(LEASES)?;
        let mut out = Vec::new();
        for e in q.range((provider, i64::MIN, 0u128)..=(provider, now, u128::MAX))? {
            let id = e?.0.value().2;
            if let Some(g) = leases.get(id)? {
                out.push(codec::decode(g.value())?);
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn next_revocation(&self, provider: &str) -> Result<Option<i64>, StoreError> {
        let q = self.src.open(REVOKE_QUEUE)?;
        let first = q
            .range((provider, i64::MIN, 0u128)..=(provider, i64::MAX, u128::MAX))?
            .next();
        Ok(match first {
            Some(e) => Some(e?.0.value().1),
            None => None,
        })
    }

    fn issuing_count(&self) -> Result<u64, StoreError> {
        self.src.open(ISSUING)?.len()
    }

    fn counters(&self) -> Result<BTreeMap<(String, LeaseState), u64>, StoreError> {
        let t = self.src.open(COUNTERS)?;
        let mut out = BTreeMap::new();
        for e in t.iter()? {
            let (k, v) = e?;
            let (p, s) = k.value();
            if let Some(state) = LeaseState::parse(s) {
                out.insert((p.to_owned(), state), v.value());
            }
        }
        Ok(out)
    }

    fn chain_head(&self) -> Result<ChainHead, StoreError> {
        self.meta_head("chain_head")
    }

    fn chain_base(&self) -> Result<ChainHead, StoreError> {
        self.meta_head("chain_base")
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let t = self.src.open(EVENT_BLOCKS)?;
        let mut out = Vec::new();
        // the first block whose key is past `after` holds `after + 1`
        'blocks: for e in t.range(after.saturating_add(1)..)? {
            let (k, v) = e?;
            for e in blocks::entries(k.value(), &blocks::unpack(v.value())?) {
                let e = e?;
                if e.seq <= after {
                    continue;
                }
                out.push(StoredEvent::from(e));
                if out.len() >= limit {
                    break 'blocks;
                }
            }
        }
        Ok(out)
    }

    fn for_each_event(&self, f: &mut super::seam::EventVisitor<'_>) -> Result<(), StoreError> {
        let t = self.src.open(EVENT_BLOCKS)?;
        for e in t.iter()? {
            let (k, v) = e?;
            for e in blocks::entries(k.value(), &blocks::unpack(v.value())?) {
                let e = e?;
                f(e.seq, e.hash, e.bytes);
            }
        }
        Ok(())
    }

    fn task_events(
        &self,
        task: u128,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let idx = self.src.open(EVENT_TASKS)?;
        let t = self.src.open(EVENT_BLOCKS)?;
        let mut out = Vec::new();
        // the block of the last entry at or before `after` may hold later
        // events of the task
        let start = match idx.range((task, 0)..=(task, after))?.next_back() {
            Some(e) => e?.0.value().1,
            None => after.saturating_add(1),
        };
        let mut last = after;
        'index: for e in idx.range((task, start)..=(task, u64::MAX))? {
            let from = e?.0.value().1;
            let Some(b) = t.range(from..)?.next() else {
                continue;
            };
            let (k, v) = b?;
            for e in blocks::entries(k.value(), &blocks::unpack(v.value())?) {
                let e = e?;
                if e.seq < from || e.seq <= last || e.task != task {
                    continue;
                }
                last = e.seq;
                out.push(StoredEvent::from(e));
                if out.len() >= limit {
                    break 'index;
                }
            }
        }
        Ok(out)
    }

    fn checkpoints(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let t = self.src.open(CHECKPOINTS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, v) = e?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn last_checkpoint_seq(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.src.open(CHECKPOINTS)?.last()?.map(|(k, _)| k.value()))
    }

    fn job(&self, id: u128) -> Result<Option<JobRecord>, StoreError> {
        let t = self.src.open(JOBS)?;
        let g = t.get(id)?;
        g.map(|g| codec::decode(g.value())).transpose()
    }

    fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let t = self.src.open(JOBS)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            out.push(codec::decode(e?.1.value())?);
        }
        Ok(out)
    }

    fn job_counts(
        &self,
        job: u128,
    ) -> Result<BTreeMap<String, BTreeMap<&'static str, u64>>, StoreError> {
        let t = self.src.open(JOB_COUNTS)?;
        let mut out: BTreeMap<String, BTreeMap<&'static str, u64>> = BTreeMap::new();
        for e in t.range((job, "", "")..=(job, "\u{10ffff}", "\u{10ffff}"))? {
            let (k, v) = e?;
            let (_, p, b) = k.value();
            if let Some(bucket) = records::JOB_BUCKETS.iter().find(|x| **x == b) {
                *out.entry(p.to_owned())
                    .or_default()
                    .entry(bucket)
                    .or_default() += v.value();
            }
        }
        Ok(out)
    }

    fn job_unfinished(&self, job: u128, limit: usize) -> Result<Vec<LeaseRecord>, StoreError> {
        let idx = self.src.open(JOB_LEASES)?;
        let leases = self.src.open(LEASES)?;
        let mut out = Vec::new();
        for e in idx.range((job, 0u128)..=(job, u128::MAX))? {
            let id = e?.0.value().1;
            if let Some(g) = leases.get(id)? {
                let l: LeaseRecord = codec::decode(g.value())?;
                if matches!(l.state, LeaseState::Revoking | LeaseState::Irrevocable)
                    && l.revocation
                        .as_ref()
                        .is_some_and(|r| r.last_error.is_some())
                {
                    out.push(l);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    fn candidate_leases(
        &self,
        sel: &Selector,
        after: Option<u128>,
        limit: usize,
    ) -> Result<Vec<u128>, StoreError> {
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::with_capacity(limit);
        if let Some(task) = sel.task {
            let idx = self.src.open(TASK_LEASES)?;
            for e in idx.range((task, start)..=(task, u128::MAX))? {
                out.push(e?.0.value().1);
                if out.len() >= limit {
                    break;
                }
            }
        } else if let Some(w) = sel.workload.as_deref() {
            let idx = self.src.open(WORKLOAD_LEASES)?;
            for e in idx.range((w, start)..=(w, u128::MAX))? {
                out.push(e?.0.value().1);
                if out.len() >= limit {
                    break;
                }
            }
        } else {
            let t = self.src.open(LEASES)?;
            for e in t.range(start..)? {
                out.push(e?.0.value());
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn fences(&self) -> Result<Vec<FenceRecord>, StoreError> {
        let t = self.src.open(FENCES)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            out.push(codec::decode(e?.1.value())?);
        }
        Ok(out)
    }

    fn workload_tasks(
        &self,
        workload: &str,
        since: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let idx = self.src.open(WORKLOAD_TASKS)?;
        let tasks = self.src.open(TASKS)?;
        let mut out = Vec::new();
        // task ids are time-ordered: start at the first id of `since`
        let first = u128::try_from(since.max(0)).unwrap_or(0) << 80;
        for e in idx.range((workload, first)..=(workload, u128::MAX))? {
            let id = e?.0.value().1;
            if let Some(g) = tasks.get(id)? {
                out.push(codec::decode(g.value())?);
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn task_active(&self, task: u128) -> Result<u64, StoreError> {
        Ok(self
            .src
            .open(TASK_ACTIVE)?
            .get(task)?
            .map(|g| g.value())
            .unwrap_or(0))
    }

    fn workload_active(&self, workload: &str) -> Result<u64, StoreError> {
        Ok(self
            .src
            .open(WORKLOAD_ACTIVE)?
            .get(workload)?
            .map(|g| g.value())
            .unwrap_or(0))
    }

    fn task_calls(&self, task: u128) -> Result<Vec<CallRecord>, StoreError> {
        let calls = self.src.open(TASK_CALLS)?;
        let mut out = Vec::new();
        for e in calls.range((task, 0u128)..=(task, u128::MAX))? {
            out.push(codec::decode(e?.1.value())?);
        }
        Ok(out)
    }

    fn approval(&self, id: u128) -> Result<Option<ApprovalRecord>, StoreError> {
        let t = self.src.open(APPROVALS)?;
        let g = t.get(id)?;
        g.map(|g| codec::decode(g.value())).transpose()
    }

    fn pending_approvals(&self, limit: usize) -> Result<Vec<ApprovalRecord>, StoreError> {
        let idx = self.src.open(APPROVAL_EXPIRY)?;
        let t = self.src.open(APPROVALS)?;
        let mut out = Vec::new();
        for e in idx.iter()? {
            let id = e?.0.value().1;
            if let Some(g) = t.get(id)? {
                let a: ApprovalRecord = codec::decode(g.value())?;
                if a.state == ApprovalState::Pending {
                    out.push(a);
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn checkpoints_last(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .src
            .open(CHECKPOINTS)?
            .last()?
            .map(|(_, v)| v.value().to_vec()))
    }

    fn next_approval_expiry(&self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .src
            .open(APPROVAL_EXPIRY)?
            .first()?
            .map(|(k, _)| k.value().0))
    }

    fn review(&self, task: u128) -> Result<Option<ReviewRecord>, StoreError> {
        let t = self.src.open(REVIEWS)?;
        let g = t.get(task)?;
        g.map(|g| codec::decode(g.value())).transpose()
    }

    fn pending_reviews(&self, limit: usize) -> Result<Vec<ReviewRecord>, StoreError> {
        let idx = self.src.open(PENDING_REVIEWS)?;
        let t = self.src.open(REVIEWS)?;
        let mut out = Vec::new();
        for e in idx.iter()? {
            let id = e?.0.value();
            if let Some(g) = t.get(id)? {
                out.push(codec::decode(g.value())?);
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn is_denied(&self, jti: u128) -> Result<bool, StoreError> {
        Ok(self.src.open(DENYLIST)?.get(jti)?.is_some())
    }
}

impl From<blocks::Entry<'_>> for StoredEvent {
    fn from(e: blocks::Entry<'_>) -> Self {
        Self {
            seq: e.seq,
            hash: e.hash,
            task: (e.task != 0).then_some(e.task),
            bytes: e.bytes.to_vec(),
        }
    }
}

/// A read-only view of a store file, for offline verification. It needs no
/// key (events are not encrypted) and refuses a file a broker has open. A
/// store whose broker did not stop cleanly has writes in its log that the
/// file lacks: those are replayed into the file first (what the next start
/// would do), so the view holds every acknowledged write.
pub struct Snapshot {
    db: redb::ReadOnlyDatabase,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Snapshot")
    }
}

impl Snapshot {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let locked = |e: redb::DatabaseError| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: path.to_owned(),
            },
            other => StoreError::Io(format!("{}: {other}", path.display())),
        };
        // a file whose broker was killed needs a repair, which a read-only
        // open cannot do; the read-write open below does it
        match redb::ReadOnlyDatabase::open(path) {
            Ok(db) => {
                if wal::pending(path, wal::checkpointed(&db)?)? == 0 {
                    return Self::checked(db);
                }
            }
            Err(redb::DatabaseError::RepairAborted) => {}
            Err(e) => return Err(locked(e)),
        }
        {
            let rw = redb::Database::open(path).map_err(locked)?;
            let (_, recovery) = wal::Wal::recover(&rw, path, true)?;
            tracing::info!(
                replayed = recovery.replayed,
                "replayed the store's write-ahead log into its file before reading it"
            );
        }
        let db = redb::ReadOnlyDatabase::open(path).map_err(locked)?;
        Self::checked(db)
    }

    /// A snapshot is read with this build's layout, so only a store at this
    /// build's schema version can be read (a read-only view cannot migrate).
    fn checked(db: redb::ReadOnlyDatabase) -> Result<Self, StoreError> {
        let version = {
            let r = db.begin_read()?;
            let meta = match r.open_table(META) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => {
                    return Err(StoreError::NotAStore(
                        "the file holds no leasehold metadata".into(),
                    ));
                }
                Err(e) => return Err(e.into()),
            };
            schema::schema_version(&meta)?
                .ok_or_else(|| StoreError::NotAStore("no schema version".into()))?
        };
        match version.cmp(&SCHEMA_VERSION) {
            std::cmp::Ordering::Equal => Ok(Self { db }),
            std::cmp::Ordering::Less => Err(StoreError::OlderSchema {
                found: version,
                supported: SCHEMA_VERSION,
            }),
            std::cmp::Ordering::Greater => Err(StoreError::NewerSchema {
                found: version,
                supported: SCHEMA_VERSION,
            }),
        }
    }

    pub fn read(&self) -> Result<Reader, StoreError> {
        Ok(Box::new(KvReader::new(ReadSource::Redb(
            self.db.begin_read()?,
        ))))
    }
}
