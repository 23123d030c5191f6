//! Tables, the schema version and the migration hook.
//!
//! Every index the broker needs is a table here, so nothing ever scans the
//! lease table to answer "what expires next", "what is half-issued" or "what
//! is due for a retry": each of those is the first entries of an ordered
//! table.

use redb::{ReadableTable, ReadableTableMetadata as _, TableDefinition, WriteTransaction};

use super::StoreError;
use super::blocks::BlockBuf;
use super::key::Sealer;

/// Store-wide metadata: schema version, key check, creation time.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// task id -> TaskRecord
pub const TASKS: TableDefinition<u128, &[u8]> = TableDefinition::new("tasks");
/// lease id -> LeaseRecord
pub const LEASES: TableDefinition<u128, &[u8]> = TableDefinition::new("leases");
/// (expires_at ms, lease id) for every active lease: the reaper's index.
pub const EXPIRY: TableDefinition<(i64, u128), ()> = TableDefinition::new("expiry_index");
/// (task id, lease id)
pub const TASK_LEASES: TableDefinition<(u128, u128), ()> = TableDefinition::new("task_leases");
/// (workload id, lease id)
pub const WORKLOAD_LEASES: TableDefinition<(&str, u128), ()> =
    TableDefinition::new("workload_leases");
/// Lease ids whose intent is written but not yet resolved: crash recovery
/// reads this table and nothing else.
pub const ISSUING: TableDefinition<u128, ()> = TableDefinition::new("issuing");
/// (provider, next attempt ms, lease id): the durable revocation queue,
/// one ordered range per provider so each provider drains on its own.
pub const REVOKE_QUEUE: TableDefinition<(&str, i64, u128), ()> =
    TableDefinition::new("revoke_queue");
/// (provider, state) -> number of leases, maintained in every transaction
/// so gauges need no scan.
pub const COUNTERS: TableDefinition<(&str, &str), u64> = TableDefinition::new("lease_counters");
/// Token ids (= lease ids) marked inactive by the token provider -> the
/// token's expiry ms. Keys are time-ordered, so the entries old enough to be
/// dead anyway form a prefix that pruning removes.
pub const DENYLIST: TableDefinition<u128, i64> = TableDefinition::new("token_denylist");

/// seq of a block's last event -> the block (see `blocks`): the event
/// chain (see `audit/`), appended in the transaction of the state change
/// each event describes, one block per batch.
pub const EVENT_BLOCKS: TableDefinition<u64, &[u8]> = TableDefinition::new("event_blocks");
/// Version 2's event table, one event per entry: seq -> hash (32) || task
/// id (16, zero if none) || canonical bytes. Read only to migrate it (and by
/// the replay of a version-2 log, which runs before the migration).
pub const LEGACY_EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// (task id, seq of the task's first event in a block): a task's story
/// without a scan (its events in a block are read from there).
pub const EVENT_TASKS: TableDefinition<(u128, u64), ()> = TableDefinition::new("event_tasks");
/// seq -> signed checkpoint (canonical JSON).
pub const CHECKPOINTS: TableDefinition<u64, &[u8]> = TableDefinition::new("checkpoints");

/// (task id, call id) -> CallRecord: calls are read by task, so the key
/// that orders them by task is the index too.
pub const TASK_CALLS: TableDefinition<(u128, u128), &[u8]> = TableDefinition::new("calls_by_task");
/// Version 2's calls (call id -> CallRecord) and their index (task id, call
/// id): read only to migrate them, and by the replay of a version-2 log.
pub const LEGACY_CALLS: TableDefinition<u128, &[u8]> = TableDefinition::new("calls");
pub const LEGACY_TASK_CALLS: TableDefinition<(u128, u128), ()> = TableDefinition::new("task_calls");
/// approval id -> ApprovalRecord
pub const APPROVALS: TableDefinition<u128, &[u8]> = TableDefinition::new("approvals");
/// (expires_at ms, approval id) for approvals still pending or approved-unused.
pub const APPROVAL_EXPIRY: TableDefinition<(i64, u128), ()> =
    TableDefinition::new("approval_expiry");
/// task id -> ReviewRecord (break-glass reviews)
pub const REVIEWS: TableDefinition<u128, &[u8]> = TableDefinition::new("reviews");
/// task ids whose review awaits a sign-off
pub const PENDING_REVIEWS: TableDefinition<u128, ()> = TableDefinition::new("pending_reviews");
/// workload id -> its active leases (for quotas, without a scan)
pub const WORKLOAD_ACTIVE: TableDefinition<&str, u64> = TableDefinition::new("workload_active");
/// task id -> its active leases (policy context, without a scan)
pub const TASK_ACTIVE: TableDefinition<u128, u64> = TableDefinition::new("task_active");

/// job id -> JobRecord (mass revocations)
pub const JOBS: TableDefinition<u128, &[u8]> = TableDefinition::new("jobs");
/// (job id, lease id): the leases a job claimed
pub const JOB_LEASES: TableDefinition<(u128, u128), ()> = TableDefinition::new("job_leases");
/// (job id, provider, state) -> leases, kept in every transaction
pub const JOB_COUNTS: TableDefinition<(u128, &str, &str), u64> = TableDefinition::new("job_counts");
/// "kind:value" -> FenceRecord: who gets nothing new
pub const FENCES: TableDefinition<&str, &[u8]> = TableDefinition::new("fences");
/// (workload id, task id): a workload's tasks, for the blast radius
pub const WORKLOAD_TASKS: TableDefinition<(&str, u128), ()> =
    TableDefinition::new("workload_tasks");

/// The name of every table of this schema version (what a PostgreSQL
/// store creates; `prepare` opens each in redb).
pub const TABLES: &[&str] = &[
    "meta",
    "tasks",
    "leases",
    "expiry_index",
    "task_leases",
    "workload_leases",
    "issuing",
    "revoke_queue",
    "lease_counters",
    "token_denylist",
    "event_blocks",
    "event_tasks",
    "checkpoints",
    "calls_by_task",
    "approvals",
    "approval_expiry",
    "reviews",
    "pending_reviews",
    "workload_active",
    "task_active",
    "jobs",
    "job_leases",
    "job_counts",
    "fences",
    "workload_tasks",
];

/// The schema this build writes. Version 2: the store file is only
/// complete together with its write-ahead log (`wal`), which a version-1
/// build would ignore, losing acknowledged writes; so it must refuse.
/// Version 3: events are stored in blocks (`event_blocks`) and calls by
/// task (`calls_by_task`), which a version-2 build would not read.
pub const SCHEMA_VERSION: u32 = 3;

const KEY_CHECK_PLAINTEXT: &[u8] = b"leasehold store key check v1";
const KEY_CHECK_RECORD: u128 = 0;

/// One step of the schema: rewrites a store at version `from` to `from + 1`
/// inside the opening transaction.
pub type Migration = fn(&WriteTransaction) -> Result<(), StoreError>;

/// The migrations of this build, in order; a schema change appends
/// `(n, migrate_n_to_n_plus_1)`.
pub const MIGRATIONS: &[(u32, Migration)] = &[(1, log_beside_the_file), (2, blocks_and_calls)];

/// 1 -> 2: no table changes; the version stamps that a log may hold writes
/// the file lacks.
fn log_beside_the_file(_: &WriteTransaction) -> Result<(), StoreError> {
    Ok(())
}

/// 2 -> 3: events into blocks, calls keyed by task.
fn blocks_and_calls(txn: &WriteTransaction) -> Result<(), StoreError> {
    events_in_blocks(txn)?;
    calls_by_task(txn)
}

/// The calls, keyed by id beside an index by task, are rewritten keyed by
/// (task, id), and the old tables are deleted.
fn calls_by_task(txn: &WriteTransaction) -> Result<(), StoreError> {
    {
        let old = txn.open_table(LEGACY_CALLS)?;
        let index = txn.open_table(LEGACY_TASK_CALLS)?;
        let mut new = txn.open_table(TASK_CALLS)?;
        for e in index.iter()? {
            let (task, id) = e?.0.value();
            let Some(rec) = old.get(id)? else {
                return Err(StoreError::Corrupt(format!(
                    "call {id:032x} is indexed under a task but not stored"
                )));
            };
            new.insert((task, id), rec.value())?;
        }
        if old.len()? != new.len()? {
            return Err(StoreError::Corrupt(
                "some calls are not indexed under a task".into(),
            ));
        }
    }
    txn.delete_table(LEGACY_CALLS)?;
    txn.delete_table(LEGACY_TASK_CALLS)?;
    Ok(())
}

/// The events, one per entry, are rewritten into blocks of consecutive
/// events, and the old table is deleted.
fn events_in_blocks(txn: &WriteTransaction) -> Result<(), StoreError> {
    {
        let old = txn.open_table(LEGACY_EVENTS)?;
        let mut new = txn.open_table(EVENT_BLOCKS)?;
        let mut index = txn.open_table(EVENT_TASKS)?;
        let mut block = BlockBuf::default();
        let mut last = None;
        for e in old.iter()? {
            let (k, v) = e?;
            let (seq, v) = (k.value(), v.value());
            if v.len() < 48 {
                return Err(StoreError::Corrupt(format!("event {seq} is too short")));
            }
            // a block holds consecutive events only (pruning removes a
            // prefix, so a gap should not occur; if one does, it is kept)
            if last.is_some_and(|l: u64| seq != l + 1) || block.would_outgrow(v.len() - 48) {
                store_block(&mut new, &mut block)?;
            }
            let task = u128::from_be_bytes(v[32..48].try_into().unwrap_or([0; 16]));
            let first = block.push(seq, task, |out| {
                out.extend_from_slice(&v[48..]);
                v[..32].try_into().unwrap_or([0; 32])
            });
            // the task index keeps only a task's first event in each block
            if task != 0 && !first {
                index.remove((task, seq))?;
            }
            last = Some(seq);
        }
        store_block(&mut new, &mut block)?;
    }
    txn.delete_table(LEGACY_EVENTS)?;
    Ok(())
}

fn store_block(
    t: &mut redb::Table<'_, u64, &[u8]>,
    block: &mut BlockBuf,
) -> Result<(), StoreError> {
    if let Some((key, b)) = block.take() {
        t.insert(key, super::blocks::pack(b).as_slice())?;
    }
    Ok(())
}

/// The schema version a store's metadata records, if any.
pub fn schema_version(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Option<u32>, StoreError> {
    match meta.get("schema_version")? {
        None => Ok(None),
        Some(g) => {
            let b: [u8; 4] = g
                .value()
                .try_into()
                .map_err(|_| StoreError::Corrupt("meta `schema_version` is not a u32".into()))?;
            Ok(Some(u32::from_be_bytes(b)))
        }
    }
}

/// Create every table, stamp a new store, or check and migrate an existing
/// one. Runs in the transaction that opens the store.
pub fn prepare(
    txn: &WriteTransaction,
    sealer: &Sealer,
    key_fingerprint: &str,
    migrations: &[(u32, Migration)],
    target: u32,
) -> Result<(), StoreError> {
    let existing: Vec<String> = {
        use redb::TableHandle as _;
        txn.list_tables()?.map(|t| t.name().to_owned()).collect()
    };
    let version = if existing.iter().any(|n| n == "meta") {
        schema_version(&txn.open_table(META)?)?
    } else {
        None
    };
    match version {
        None if existing.is_empty() => {
            let check = key_check(sealer)?;
            let mut meta = txn.open_table(META)?;
            meta.insert("schema_version", &target.to_be_bytes()[..])?;
            meta.insert("key_check", check.as_slice())?;
            meta.insert("key_fingerprint", key_fingerprint.as_bytes())?;
        }
        None => {
            return Err(StoreError::NotAStore(format!(
                "the file holds tables ({}) but no leasehold schema version",
                existing.join(", ")
            )));
        }
        Some(v) => {
            check_key(txn, sealer, key_fingerprint)?;
            if v > target {
                return Err(StoreError::NewerSchema {
                    found: v,
                    supported: target,
                });
            }
            let mut at = v;
            while at < target {
                let step = migrations.iter().find(|(from, _)| *from == at).ok_or(
                    StoreError::NoMigration {
                        from: at,
                        to: target,
                    },
                )?;
                (step.1)(txn)?;
                at += 1;
            }
            if at != v {
                let mut meta = txn.open_table(META)?;
                meta.insert("schema_version", &at.to_be_bytes()[..])?;
            }
        }
    }
    // Create any table missing (a new store, or one a migration added).
    txn.open_table(TASKS)?;
    txn.open_table(LEASES)?;
    txn.open_table(EXPIRY)?;
    txn.open_table(TASK_LEASES)?;
    txn.open_table(WORKLOAD_LEASES)?;
    txn.open_table(ISSUING)?;
    txn.open_table(REVOKE_QUEUE)?;
    txn.open_table(COUNTERS)?;
    txn.open_table(DENYLIST)?;
    txn.open_table(EVENT_BLOCKS)?;
    txn.open_table(EVENT_TASKS)?;
    txn.open_table(CHECKPOINTS)?;
    txn.open_table(TASK_CALLS)?;
    txn.open_table(APPROVALS)?;
    txn.open_table(APPROVAL_EXPIRY)?;
    txn.open_table(REVIEWS)?;
    txn.open_table(PENDING_REVIEWS)?;
    txn.open_table(WORKLOAD_ACTIVE)?;
    txn.open_table(TASK_ACTIVE)?;
    txn.open_table(JOBS)?;
    txn.open_table(JOB_LEASES)?;
    txn.open_table(JOB_COUNTS)?;
    txn.open_table(FENCES)?;
    txn.open_table(WORKLOAD_TASKS)?;
    Ok(())
}

/// What a new store keeps to recognise its key: a known text sealed with it.
pub(super) fn key_check(sealer: &Sealer) -> Result<Vec<u8>, StoreError> {
    sealer
        .seal(KEY_CHECK_RECORD, "key_check", KEY_CHECK_PLAINTEXT)
        .map_err(|_| StoreError::Corrupt("cannot seal the key check".into()))
}

/// Does the stored key check open with this key?
pub(super) fn key_matches(sealer: &Sealer, check: Option<&[u8]>) -> bool {
    check
        .and_then(|c| sealer.open(KEY_CHECK_RECORD, "key_check", c).ok())
        .is_some_and(|p| p.as_slice() == KEY_CHECK_PLAINTEXT)
}

fn check_key(txn: &WriteTransaction, sealer: &Sealer, fingerprint: &str) -> Result<(), StoreError> {
    let meta = txn.open_table(META)?;
    let check = meta.get("key_check")?.map(|g| g.value().to_vec());
    let expected = meta
        .get("key_fingerprint")?
        .map(|g| String::from_utf8_lossy(g.value()).into_owned())
        .unwrap_or_default();
    if key_matches(sealer, check.as_deref()) {
        Ok(())
    } else {
        Err(StoreError::WrongKey {
            given: fingerprint.to_owned(),
            expected,
        })
    }
}
