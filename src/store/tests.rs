use std::sync::atomic::Ordering;

use redb::ReadableTableMetadata as _;

use super::kv::Source;
use super::schema::*;
use super::seam::*;
use super::txn::KvTxn;
use super::writer::RedbBackend;
use super::*;

/// The redb database under a store (these tests look at its tables).
fn redb_of(s: &Store) -> std::sync::Arc<redb::Database> {
    // a lone write answered on its caller's thread is committed once that
    // task yields (`Shared::inline`); a test that goes on to open redb's
    // write transaction itself, without yielding, would wait for it
    // forever: a read first finishes it
    drop(s.read().unwrap());
    s.inner
        .backend
        .as_any()
        .downcast_ref::<RedbBackend>()
        .expect("a redb store")
        .db()
        .clone()
}

/// Where a store under test lives: a redb file in a temporary folder, or a
/// database of a throwaway PostgreSQL cluster. Tests that hold for both
/// take one and run once per backend (`both_backends!`).
enum Backing {
    Redb(tempfile::TempDir),
    Pg(Box<PgPeer>),
}

struct PgPeer {
    // dropped last: stops the server
    _cluster: leasehold_provider_postgres::testkit::Cluster,
    connection: leasehold_provider_postgres::PostgresConfig,
}

impl Backing {
    fn redb() -> Self {
        Backing::Redb(tempfile::tempdir().unwrap())
    }

    async fn postgres() -> Self {
        let cluster = leasehold_provider_postgres::testkit::Cluster::start();
        let connection = cluster.provision_store().await;
        Backing::Pg(Box::new(PgPeer {
            _cluster: cluster,
            connection,
        }))
    }

    fn options(&self) -> StoreOptions {
        self.options_as("test-node", 3)
    }

    /// Options for a node of this name, leading for `lease_seconds`.
    fn options_as(&self, node: &str, lease_seconds: u64) -> StoreOptions {
        match self {
            Backing::Redb(dir) => StoreOptions::new(dir.path().join("s.redb")),
            Backing::Pg(p) => StoreOptions {
                postgres: Some(PgOptions {
                    connection: p.connection.clone(),
                    node: node.into(),
                    advertise: format!("{node}.test:8443"),
                    lease_period: std::time::Duration::from_secs(lease_seconds),
                    passive: false,
                }),
                ..StoreOptions::new("unused")
            },
        }
    }

    fn open(&self) -> Store {
        Store::open(&self.options(), &key()).unwrap()
    }
}

/// Each test named here runs against redb (`on_redb::name`) and against
/// PostgreSQL (`on_postgres::name`).
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_redb {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backing::redb()).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backing::postgres().await).await;
                }
            )*
        }
    };
}

both_backends!(
    lifecycle_keeps_indexes_and_counters_consistent,
    refused_operations_leave_nothing,
    activation_after_completion_is_refused,
    expiry_moves_due_leases_in_deadline_order_and_batches,
    irrevocable_stays_queued_and_can_recover,
    recovery_reads_only_intents,
    concurrent_writes_share_commits,
    denylist_is_durable_and_pruned_after_expiry,
    listing_filters_and_pages,
    local_providers_are_revoked_inside_the_deciding_transaction,
    a_prepared_handle_rides_on_the_intent_until_activation_replaces_it,
    events_are_read_back_from_blocks_by_seq_and_by_task,
    pruning_inside_a_block_keeps_the_rest_of_it_and_only_its_index_entries,
    calls_are_read_by_task,
    retention_removes_ended_tasks_whole_and_nothing_live,
    retention_batches_are_bounded_and_resume,
    retention_removes_finished_jobs_with_their_claims
);

fn key() -> StoreKey {
    StoreKey::from_bytes([7; 32])
}

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(&StoreOptions::new(dir.path().join("s.redb")), &key()).unwrap()
}

/// Create a store in `dir` and close it, outside any runtime.
fn create_closed(dir: &tempfile::TempDir) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _guard = rt.enter();
    drop(open(dir));
}

fn task(id: u128, expires_at: i64) -> TaskRecord {
    TaskRecord {
        id,
        workload: "dev:a".into(),
        tenant: None,
        purpose: "p".into(),
        on_behalf_of: "alice".into(),
        prompt_sha256: [0; 32],
        prompt_sealed: None,
        tools: vec![],
        created_at: 0,
        expires_at,
        state: TaskState::Open,
        completed_at: None,
        lease_count: 0,
    }
}

fn lease(id: u128, task: u128, expires_at: i64) -> LeaseRecord {
    LeaseRecord {
        id,
        task_id: task,
        workload: "dev:a".into(),
        tenant: None,
        on_behalf_of: "alice".into(),
        provider: "token".into(),
        role: "demo".into(),
        scope: vec![],
        requested_ttl_seconds: 60,
        created_at: 0,
        issued_at: None,
        expires_at,
        state: LeaseState::Issuing,
        handle_sealed: None,
        description: None,
        revocation: None,
        ended_at: None,
    }
}

fn activation(id: u128, expires_at: i64) -> Activation {
    Activation {
        lease: id,
        handle_sealed: vec![1, 2, 3],
        issued_at: 0,
        expires_at,
        description: "d".into(),
    }
}

async fn active_lease(s: &Store, id: u128, task_id: u128, exp: i64) {
    let l = lease(id, task_id, exp);
    s.write(move |t| t.lease_intent(&l, 0, 100)).await.unwrap();
    s.write(move |t| t.activate(&activation(id, exp), 0))
        .await
        .unwrap();
}

fn count(s: &Store, state: LeaseState) -> u64 {
    s.read()
        .unwrap()
        .counters()
        .unwrap()
        .get(&("token".to_owned(), state))
        .copied()
        .unwrap_or(0)
}

#[tokio::test]
async fn wrong_key_is_refused_not_rekeyed() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&dir));
    let err = Store::open(
        &StoreOptions::new(dir.path().join("s.redb")),
        &StoreKey::from_bytes([8; 32]),
    )
    .unwrap_err();
    assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
    assert!(err.to_string().contains("does not match"));
    // the right key still opens it: nothing was rewritten
    drop(open(&dir));
}

#[tokio::test]
async fn second_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _s = open(&dir);
    let err = Store::open(&StoreOptions::new(dir.path().join("s.redb")), &key()).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
}

#[tokio::test]
async fn not_a_store_and_newer_schema_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let t = db.begin_write().unwrap();
        t.open_table(redb::TableDefinition::<u64, u64>::new("foreign"))
            .unwrap();
        t.commit().unwrap();
    }
    let err = Store::open(&StoreOptions::new(&path), &key()).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore(_)), "{err}");

    drop(open(&dir));
    let err = Store::open_with_migrations(
        &StoreOptions::new(dir.path().join("s.redb")),
        &key(),
        &[],
        0,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NewerSchema {
                found: SCHEMA_VERSION,
                supported: 0
            }
        ),
        "{err}"
    );
}

const MARKER: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("migration_marker");

fn to_v2(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut t = txn.open_table(MARKER)?;
    t.insert("ran", 1u64)?;
    Ok(())
}

#[tokio::test]
async fn migration_hook_runs_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions::new(dir.path().join("s.redb"));
    // a version-1 store (before the write-ahead log)
    drop(Store::open_with_migrations(&opts, &key(), &[], 1).unwrap());
    let err = Store::open_with_migrations(&opts, &key(), &[], 2).unwrap_err();
    assert!(
        matches!(err, StoreError::NoMigration { from: 1, to: 2 }),
        "{err}"
    );
    let s = Store::open_with_migrations(&opts, &key(), &[(1, to_v2)], 2).unwrap();
    {
        use redb::ReadableDatabase as _;
        let r = redb_of(&s).begin_read().unwrap();
        assert_eq!(
            r.open_table(MARKER)
                .unwrap()
                .get("ran")
                .unwrap()
                .unwrap()
                .value(),
            1
        );
    }
    drop(s);
    // now at version 2: reopening with the same target runs nothing
    let failing: Migration = |_| Err(StoreError::Corrupt("must not run".into()));
    drop(Store::open_with_migrations(&opts, &key(), &[(1, failing)], 2).unwrap());
    // a version-1 build refuses it: it would ignore the write-ahead log
    assert!(matches!(
        Store::open_with_migrations(&opts, &key(), &[], 1).unwrap_err(),
        StoreError::NewerSchema { found: 2, .. }
    ));
    // and this build's own migration takes a version-1 store to its version
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions::new(dir.path().join("s.redb"));
    drop(Store::open_with_migrations(&opts, &key(), &[], 1).unwrap());
    drop(Store::open(&opts, &key()).unwrap());
    assert!(matches!(
        Store::open_with_migrations(&opts, &key(), &[], 1).unwrap_err(),
        StoreError::NewerSchema {
            found: SCHEMA_VERSION,
            ..
        }
    ));
}

async fn lifecycle_keeps_indexes_and_counters_consistent(store: Backing) {
    let s = store.open();
    s.write(|t| t.create_task(&task(1, 10_000))).await.unwrap();
    let l = lease(10, 1, 5_000);
    s.write(move |t| t.lease_intent(&l, 0, 100)).await.unwrap();
    assert_eq!(s.read().unwrap().issuing_count().unwrap(), 1);
    assert_eq!(
        s.read().unwrap().next_expiry().unwrap(),
        None,
        "intents are not in the expiry index"
    );
    assert_eq!(count(&s, LeaseState::Issuing), 1);

    let rec = s
        .write(|t| t.activate(&activation(10, 4_000), 0))
        .await
        .unwrap();
    assert_eq!(rec.state, LeaseState::Active);
    let r = s.read().unwrap();
    assert_eq!(r.issuing_count().unwrap(), 0);
    assert_eq!(r.next_expiry().unwrap(), Some(4_000));
    assert_eq!(r.task_leases(1).unwrap().len(), 1);
    assert_eq!(r.task(1).unwrap().unwrap().lease_count, 1);
    drop(r);
    assert_eq!(
        (
            count(&s, LeaseState::Issuing),
            count(&s, LeaseState::Active)
        ),
        (0, 1)
    );

    // completion claims the active lease and takes it out of the expiry index
    let c = s
        .write(|t| t.complete_task(1, 100, 30_000, &Local::new()))
        .await
        .unwrap();
    assert_eq!(c.claimed.len(), 1);
    assert_eq!(c.task.state, TaskState::Completed);
    let r = s.read().unwrap();
    assert_eq!(r.next_expiry().unwrap(), None);
    assert_eq!(r.next_revocation("token").unwrap(), Some(30_000));
    assert!(
        r.due_revocations("token", 29_999, 10).unwrap().is_empty(),
        "claimed, not due yet"
    );
    drop(r);

    // a failed attempt is rescheduled, then success ends it
    let retry = Outcome::Retry {
        lease: 10,
        at: 31_000,
        error: "down".into(),
        irrevocable: false,
    };
    let out = s
        .write(move |t| t.record_outcomes(&[retry], 200))
        .await
        .unwrap();
    assert_eq!(out[0].revocation.as_ref().unwrap().attempts, 1);
    assert_eq!(
        s.read().unwrap().next_revocation("token").unwrap(),
        Some(31_000)
    );
    let out = s
        .write(|t| {
            t.record_outcomes(
                &[Outcome::Done {
                    lease: 10,
                    note: None,
                }],
                300,
            )
        })
        .await
        .unwrap();
    assert_eq!(out[0].state, LeaseState::Revoked);
    assert!(
        out[0].handle_sealed.is_none(),
        "the handle is dropped once revoked"
    );
    assert_eq!(s.read().unwrap().next_revocation("token").unwrap(), None);
    assert_eq!(
        (
            count(&s, LeaseState::Revoking),
            count(&s, LeaseState::Revoked)
        ),
        (0, 1)
    );
    // a second outcome for a finished lease is ignored
    let out = s
        .write(|t| {
            t.record_outcomes(
                &[Outcome::Done {
                    lease: 10,
                    note: None,
                }],
                400,
            )
        })
        .await
        .unwrap();
    assert!(out.is_empty());
}

async fn refused_operations_leave_nothing(store: Backing) {
    let s = store.open();
    s.write(|t| t.create_task(&task(1, 10_000))).await.unwrap();
    // outlives the task
    let l = lease(10, 1, 20_000);
    let e = s
        .write(move |t| t.lease_intent(&l, 0, 100))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(Conflict::OutlivesTask)));
    // task cap
    let l = lease(11, 1, 5_000);
    let e = s
        .write(move |t| t.lease_intent(&l, 0, 0))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(Conflict::TaskLeaseCap(0))));
    // another workload's task looks absent
    let mut l = lease(12, 1, 5_000);
    l.workload = "dev:b".into();
    let e = s
        .write(move |t| t.lease_intent(&l, 0, 100))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(Conflict::TaskNotFound)));
    let r = s.read().unwrap();
    assert!(
        r.lease(10).unwrap().is_none()
            && r.lease(11).unwrap().is_none()
            && r.lease(12).unwrap().is_none()
    );
    assert_eq!(r.task(1).unwrap().unwrap().lease_count, 0);
    assert_eq!(r.issuing_count().unwrap(), 0);
    assert!(r.counters().unwrap().is_empty());
}

#[tokio::test]
async fn a_refusal_in_a_shared_batch_does_not_undo_its_neighbours() {
    // Apply two operations in one transaction, as the group commit does.
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    // past the idle gap: the write runs on this thread, its commit left
    // until the task yields, which `redb_of` must not wait for
    std::thread::sleep(std::time::Duration::from_millis(5));
    s.write(|t| t.create_task(&task(1, 10_000))).await.unwrap();
    let db = redb_of(&s);
    let ok_lease = lease(20, 1, 5_000);
    let bad_lease = lease(21, 99, 5_000); // unknown task
    let txn = db.begin_write().unwrap();
    {
        let mut t = KvTxn::open(Source::Redb(&txn), ChainHead::default());
        t.lease_intent(&ok_lease, 0, 100).unwrap();
        assert!(t.lease_intent(&bad_lease, 0, 100).is_err());
        t.finish().unwrap();
    }
    txn.commit().unwrap();
    let r = s.read().unwrap();
    assert!(r.lease(20).unwrap().is_some());
    assert!(r.lease(21).unwrap().is_none());
    assert_eq!(r.issuing_count().unwrap(), 1);
}

async fn activation_after_completion_is_refused(store: Backing) {
    let s = store.open();
    s.write(|t| t.create_task(&task(1, 10_000))).await.unwrap();
    let l = lease(10, 1, 5_000);
    s.write(move |t| t.lease_intent(&l, 0, 100)).await.unwrap();
    let c = s
        .write(|t| t.complete_task(1, 1, 2, &Local::new()))
        .await
        .unwrap();
    assert!(
        c.claimed.is_empty(),
        "an issuing lease has no handle to revoke"
    );
    let e = s
        .write(|t| t.activate(&activation(10, 5_000), 2))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(Conflict::TaskCompleted)));
    let rec = s
        .write(|t| t.issue_failed(10, "task closed", 3, &Local::new()))
        .await
        .unwrap();
    assert_eq!(rec.state, LeaseState::Revoking);
    assert_eq!(rec.revocation.unwrap().cause, RevokeCause::IssueFailed);
    assert_eq!(
        s.read()
            .unwrap()
            .due_revocations("token", 3, 10)
            .unwrap()
            .len(),
        1
    );
}

async fn expiry_moves_due_leases_in_deadline_order_and_batches(store: Backing) {
    let s = store.open();
    s.write(|t| t.create_task(&task(1, 100_000))).await.unwrap();
    for i in 0..10u128 {
        active_lease(&s, 100 + i, 1, 1_000 + i64::try_from(i).unwrap() * 100).await;
    }
    assert_eq!(s.read().unwrap().next_expiry().unwrap(), Some(1_000));
    let pass = s
        .write(|t| t.expire_due(1_450, 3, &Local::new()))
        .await
        .unwrap();
    assert_eq!(
        (pass.queued_providers, pass.scanned, pass.handled.len()),
        (vec!["token".to_owned()], 3, 3)
    );
    let pass = s
        .write(|t| t.expire_due(1_450, 3, &Local::new()))
        .await
        .unwrap();
    assert_eq!(pass.scanned, 2, "only the five due at 1450");
    assert_eq!(s.read().unwrap().next_expiry().unwrap(), Some(1_500));
    let due = s
        .read()
        .unwrap()
        .due_revocations("token", 1_450, 100)
        .unwrap();
    assert_eq!(due.len(), 5);
    assert!(
        due.iter()
            .all(|l| l.revocation.as_ref().unwrap().cause == RevokeCause::Expiry)
    );
    let done: Vec<Outcome> = due
        .iter()
        .map(|l| Outcome::Done {
            lease: l.id,
            note: None,
        })
        .collect();
    let out = s
        .write(move |t| t.record_outcomes(&done, 1_460))
        .await
        .unwrap();
    assert!(out.iter().all(|l| l.state == LeaseState::Expired));
    assert_eq!(count(&s, LeaseState::Expired), 5);
    assert_eq!(count(&s, LeaseState::Active), 5);
}

async fn irrevocable_stays_queued_and_can_recover(store: Backing) {
    let s = store.open();
    s.write(|t| t.create_task(&task(1, 100_000))).await.unwrap();
    active_lease(&s, 7, 1, 1_000).await;
    s.write(|t| t.expire_due(1_000, 10, &Local::new()))
        .await
        .unwrap();
    let o = Outcome::Retry {
        lease: 7,
        at: 90_000,
        error: "gone".into(),
        irrevocable: true,
    };
    let out = s
        .write(move |t| t.record_outcomes(&[o], 1_001))
        .await
        .unwrap();
    assert_eq!(out[0].state, LeaseState::Irrevocable);
    assert_eq!(
        s.read().unwrap().next_revocation("token").unwrap(),
        Some(90_000)
    );
    let out = s
        .write(|t| {
            t.record_outcomes(
                &[Outcome::Done {
                    lease: 7,
                    note: None,
                }],
                90_001,
            )
        })
        .await
        .unwrap();
    assert_eq!(
        out[0].state,
        LeaseState::Expired,
        "keeps its original cause"
    );
    assert_eq!(count(&s, LeaseState::Irrevocable), 0);
}

async fn recovery_reads_only_intents(store: Backing) {
    let s = store.open();
    s.write(|t| t.create_task(&task(1, 100_000))).await.unwrap();
    active_lease(&s, 1, 1, 50_000).await;
    let l = lease(2, 1, 50_000);
    s.write(move |t| t.lease_intent(&l, 0, 100)).await.unwrap();
    drop(s);
    let s = store.open();
    let rec = s
        .write(|t| t.recover_intents(10, None, &Local::new()))
        .await
        .unwrap();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].id, 2);
    assert_eq!(
        rec[0].revocation.as_ref().unwrap().cause,
        RevokeCause::Recovery
    );
    assert_eq!(
        s.read().unwrap().lease(1).unwrap().unwrap().state,
        LeaseState::Active
    );
    assert!(
        s.write(|t| t.recover_intents(11, None, &Local::new()))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn concurrent_writes_share_commits(store: Backing) {
    let s = store.open();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..400u128 {
        let s = s.clone();
        set.spawn(async move { s.write(move |t| t.create_task(&task(i + 1, 10_000))).await });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    let commits = s.stats().commits.load(Ordering::Relaxed);
    let ops = s.stats().operations.load(Ordering::Relaxed);
    assert_eq!(ops, 400);
    assert!(
        commits < 400,
        "400 concurrent writes took {commits} commits: no group commit"
    );
    // and every one of them is durable across a reopen
    drop(s);
    let s = store.open();
    assert!(s.read().unwrap().task(400).unwrap().is_some());
}

#[tokio::test]
async fn a_lingering_batch_applies_operations_as_they_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = StoreOptions::new(dir.path().join("s.redb"));
    let linger = std::time::Duration::from_secs(1);
    opts.group_commit = GroupCommit {
        delay: linger,
        siblings: 0,
    };
    let s = Store::open(&opts, &key()).unwrap();
    let t0 = std::time::Instant::now();
    let ran = Arc::new(std::sync::Mutex::new(Vec::new()));
    let write = |id: u128| {
        let (s, ran) = (s.clone(), ran.clone());
        tokio::spawn(async move {
            s.write(move |t| {
                ran.lock().unwrap().push((id, t0.elapsed()));
                t.create_task(&task(id, 10_000))
            })
            .await
            .map(|()| t0.elapsed())
        })
    };
    let first = write(1);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let second = write(2);
    let (a, b) = (
        first.await.unwrap().unwrap(),
        second.await.unwrap().unwrap(),
    );
    let ran = ran.lock().unwrap().clone();
    // each operation ran as it arrived, not once the linger was over ...
    assert_eq!(ran.len(), 2);
    assert!(
        ran[0].1 < linger / 2,
        "the first operation waited for the linger: {ran:?}"
    );
    assert!(
        ran[1].1 < linger,
        "the second operation waited for the linger: {ran:?}"
    );
    // ... in one batch, answered only after its linger and its commit
    assert_eq!(s.stats().commits.load(Ordering::Relaxed), 1);
    assert!(
        a >= linger && b >= linger,
        "answered before the batch closed: {a:?} {b:?}"
    );
}

/// On PostgreSQL a batch holds the cluster's chain head lock while it is
/// open, so it never lingers for more operations, whatever the options say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_batch_does_not_linger_under_the_chain_heads_lock() {
    let store = Backing::postgres().await;
    let mut opts = store.options();
    let linger = std::time::Duration::from_secs(2);
    opts.group_commit = GroupCommit {
        delay: linger,
        siblings: 0,
    };
    let s = Store::open(&opts, &key()).unwrap();
    for id in 1..=3u128 {
        let t0 = std::time::Instant::now();
        s.write(move |t| t.create_task(&task(id, 10_000)))
            .await
            .unwrap();
        assert!(
            t0.elapsed() < linger / 2,
            "write {id} was answered after {:?}: its batch lingered",
            t0.elapsed()
        );
    }
    assert!(s.read().unwrap().task(3).unwrap().is_some());
}

/// A store's commits, and its batches' round trips under the chain head's
/// lock, so far.
fn commits_and_lock_trips(s: &Store) -> (u64, u64) {
    let stats = s.stats();
    (
        stats.commits.load(Ordering::Relaxed),
        stats.lock_round_trips.load(Ordering::Relaxed),
    )
}

/// Await `writes` (each must succeed), then check they took `batches`
/// commits since `before` and read no row on their own under the lock.
async fn assert_committed_in<T>(
    s: &Store,
    before: (u64, u64),
    writes: impl IntoIterator<Item = tokio::task::JoinHandle<Result<T, StoreError>>>,
    batches: u64,
    why: &str,
) {
    for w in writes {
        assert!(w.await.unwrap().is_ok(), "a write failed");
    }
    let (commits, trips) = commits_and_lock_trips(s);
    assert_eq!(commits - before.0, batches, "{why}");
    assert_eq!(
        trips - before.1,
        0,
        "a row was read on its own under the lock"
    );
}

/// Operations that reach a node while its batch applies wait for the next
/// batch, whose first round trip fetches the rows they name: taken into
/// the batch under way, each row would be read on its own under the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_operations_arriving_while_a_batch_applies_wait_for_the_next() {
    use std::time::Duration;
    let store = Backing::postgres().await;
    let a = store.open();
    a.write(|t| t.create_task(&task(1, 100_000))).await.unwrap();
    let before = commits_and_lock_trips(&a);
    let create = |id: u128, slow: bool| {
        let a = a.clone();
        tokio::spawn(async move {
            a.write_reading(super::Reads::default().task(id), move |t| {
                if slow {
                    std::thread::sleep(Duration::from_millis(400));
                }
                t.create_task(&task(id, 100_000))
            })
            .await
        })
    };
    let slow = create(2, true);
    // the writer is applying the slow one when the others arrive
    tokio::time::sleep(Duration::from_millis(150)).await;
    let rest: Vec<_> = (3..=5).map(|id| create(id, false)).collect();
    let writes = std::iter::once(slow).chain(rest);
    let why = "the later operations joined the batch under way";
    assert_committed_in(&a, before, writes, 2, why).await;
}

/// Operations that reach a node while its batch waits for the chain
/// head's lock join that batch, and the rows they name are read with the
/// lock in the round trip that takes it: none is read on its own once
/// every node waits for this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_named_while_the_lock_is_awaited_are_read_when_it_is_granted() {
    use std::time::Duration;
    let store = Backing::postgres().await;
    let a = Store::open(&store.options_as("a", 3), &key()).unwrap();
    let Backing::Pg(peer) = &store else {
        unreachable!()
    };
    // someone else holds the chain head's lock
    let holder = peer._cluster.superuser(&peer.connection.database).await;
    holder
        .batch_execute("BEGIN; SELECT 1 FROM lh_meta FOR UPDATE")
        .await
        .unwrap();
    let before = commits_and_lock_trips(&a);
    let create = |id: u128| {
        let a = a.clone();
        tokio::spawn(async move {
            a.write_reading(super::Reads::default().task(id), move |t| {
                t.create_task(&task(id, 100_000))
            })
            .await
        })
    };
    let first = create(1);
    // the first batch is waiting for the lock when the others arrive
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rest: Vec<_> = (2..=5).map(create).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!first.is_finished(), "the batch did not wait for the lock");
    holder.batch_execute("COMMIT").await.unwrap();
    let writes = std::iter::once(first).chain(rest);
    let why = "the operations that came while the lock was awaited joined its batch";
    assert_committed_in(&a, before, writes, 1, why).await;
    let r = a.read().unwrap();
    for id in 1..=5 {
        assert!(r.task(id).unwrap().is_some(), "task {id}");
    }
    drop(r);
    // and they are read once the lock is granted, not when asked for: b
    // queues for the lock first and creates task 7, which a's operation,
    // arriving while a waits behind b, must then find
    let b = Store::open(&store.options_as("b", 3), &key()).unwrap();
    holder
        .batch_execute("BEGIN; SELECT 1 FROM lh_meta FOR UPDATE")
        .await
        .unwrap();
    let by_b = {
        let b = b.clone();
        tokio::spawn(async move { b.write(|t| t.create_task(&task(7, 100_000))).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = create(6);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = create(7);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!again.is_finished() && !by_b.is_finished());
    holder.batch_execute("COMMIT").await.unwrap();
    by_b.await.unwrap().unwrap();
    first.await.unwrap().unwrap();
    assert!(
        matches!(
            again.await.unwrap(),
            Err(StoreError::Conflict(Conflict::Duplicate))
        ),
        "a created task 7 over b's: its row was read before the lock"
    );
}

async fn denylist_is_durable_and_pruned_after_expiry(store: Backing) {
    let s = store.open();
    // ids carry their creation time in the top bits
    let id = |created_ms: u128, n: u128| (created_ms << 80) | n;
    let (a, b, c) = (id(1_000, 1), id(1_500, 2), id(90_000, 3));
    s.write(move |t| t.deny(&[(a, 2_000), (b, 5_000), (c, 95_000)]))
        .await
        .unwrap();
    // a later expiry wins, an earlier one is ignored
    s.write(move |t| t.deny(&[(a, 3_000), (b, 10)]))
        .await
        .unwrap();
    drop(s);
    let s = store.open();
    assert!(s.read().unwrap().is_denied(a).unwrap());
    assert_eq!(
        s.write(|t| t.prune_denylist(2_500, 10_000, 10))
            .await
            .unwrap(),
        0,
        "nothing expired yet"
    );
    assert_eq!(
        s.write(|t| t.prune_denylist(5_001, 10_000, 10))
            .await
            .unwrap(),
        2
    );
    let r = s.read().unwrap();
    assert!(!r.is_denied(a).unwrap() && !r.is_denied(b).unwrap());
    assert!(r.is_denied(c).unwrap(), "young entries stay");
}

async fn listing_filters_and_pages(store: Backing) {
    let s = store.open();
    s.write(|t| t.create_task(&task(1, 100_000))).await.unwrap();
    for i in 0..25u128 {
        active_lease(&s, 1_000 + i, 1, 50_000).await;
    }
    let mut q = LeaseQuery {
        limit: 10,
        scan_budget: 1_000,
        ..Default::default()
    };
    let mut seen = Vec::new();
    loop {
        let (page, next) = s.read().unwrap().list_leases(&q).unwrap();
        seen.extend(page.iter().map(|l| l.id));
        match next {
            Some(c) => q.after = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, (1_000..1_025).collect::<Vec<_>>());
    let q = LeaseQuery {
        state: Some(LeaseState::Revoked),
        limit: 10,
        scan_budget: 1_000,
        ..Default::default()
    };
    assert!(s.read().unwrap().list_leases(&q).unwrap().0.is_empty());
    let q = LeaseQuery {
        workload: Some("dev:b".into()),
        limit: 10,
        scan_budget: 1_000,
        ..Default::default()
    };
    assert!(s.read().unwrap().list_leases(&q).unwrap().0.is_empty());
    let q = LeaseQuery {
        task: Some(1),
        limit: 100,
        scan_budget: 1_000,
        ..Default::default()
    };
    assert_eq!(s.read().unwrap().list_leases(&q).unwrap().0.len(), 25);
}

#[test]
fn store_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    create_closed(&dir);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("s.redb"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

fn local_token() -> Local {
    ["token".to_owned()].into_iter().collect()
}

async fn local_providers_are_revoked_inside_the_deciding_transaction(store: Backing) {
    let s = store.open();
    s.write(|t| t.create_task(&task(1, 100_000))).await.unwrap();
    active_lease(&s, 1, 1, 50_000).await;
    active_lease(&s, 2, 1, 1_000).await;
    let l = lease(3, 1, 50_000);
    s.write(move |t| t.lease_intent(&l, 0, 100)).await.unwrap();

    // expiry: straight to expired, denylisted, nothing queued
    let pass = s
        .write(|t| t.expire_due(1_000, 10, &local_token()))
        .await
        .unwrap();
    assert_eq!((pass.queued_providers.len(), pass.scanned), (0, 1));
    let r = s.read().unwrap();
    assert_eq!(r.lease(2).unwrap().unwrap().state, LeaseState::Expired);
    assert!(r.is_denied(2).unwrap());
    assert_eq!(r.next_revocation("token").unwrap(), None);
    drop(r);

    // recovery of an intent: rolled back and denylisted at once
    let rec = s
        .write(|t| t.recover_intents(2_000, None, &local_token()))
        .await
        .unwrap();
    assert_eq!(rec[0].state, LeaseState::RolledBack);
    assert!(s.read().unwrap().is_denied(3).unwrap());

    // completion: revoked in the same transaction, nothing claimed
    let c = s
        .write(|t| t.complete_task(1, 3_000, 60_000, &local_token()))
        .await
        .unwrap();
    assert!(c.claimed.is_empty());
    assert_eq!(c.revoked.len(), 1);
    assert_eq!(c.revoked[0].state, LeaseState::Revoked);
    let r = s.read().unwrap();
    assert!(r.is_denied(1).unwrap());
    assert_eq!(r.next_expiry().unwrap(), None);
    assert_eq!(r.next_revocation("token").unwrap(), None);
    assert_eq!(count(&s, LeaseState::Active), 0);
    assert_eq!(count(&s, LeaseState::Revoked), 1);
}

async fn a_prepared_handle_rides_on_the_intent_until_activation_replaces_it(store: Backing) {
    let s = store.open();
    s.write(|t| t.create_task(&task(1, 10_000))).await.unwrap();
    let l = lease(10, 1, 5_000);
    s.write(move |t| t.lease_intent(&l, 0, 100)).await.unwrap();
    s.write(|t| t.record_prepared(10, &[9, 9])).await.unwrap();
    let rec = s.read().unwrap().lease(10).unwrap().unwrap();
    assert_eq!(rec.state, LeaseState::Issuing);
    assert_eq!(rec.handle_sealed.as_deref(), Some(&[9u8, 9][..]));
    assert_eq!(count(&s, LeaseState::Issuing), 1, "no state change counted");
    // activation replaces it with the final handle
    s.write(|t| t.activate(&activation(10, 4_000), 0))
        .await
        .unwrap();
    let rec = s.read().unwrap().lease(10).unwrap().unwrap();
    assert_eq!(rec.handle_sealed.as_deref(), Some(&[1u8, 2, 3][..]));
    // and once active, nothing is recorded as prepared any more
    let err = s.write(|t| t.record_prepared(10, &[7])).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    let err = s.write(|t| t.record_prepared(99, &[7])).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
}

// === the write-ahead log ===

/// Options that never checkpoint while the test runs: every write since the
/// store opened is only in the file's log until the store closes.
fn log_only(dir: &tempfile::TempDir) -> StoreOptions {
    StoreOptions {
        checkpoint_bytes: u64::MAX,
        checkpoint_idle: std::time::Duration::from_secs(3600),
        ..StoreOptions::new(dir.path().join("s.redb"))
    }
}

/// Records of the log beside `file` that its store file lacks.
fn left_to_replay(db: &redb::Database, file: &std::path::Path) -> usize {
    wal::pending(file, wal::checkpointed(db).unwrap()).unwrap()
}

fn without_wal_lsn(d: Vec<(String, Vec<u8>, Vec<u8>)>) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    d.into_iter()
        .filter(|(t, k, _)| !(t == "meta" && k == wal::WAL_LSN.as_bytes()))
        .collect()
}

/// A mix of operations touching the lease tables, indexes, counters,
/// revocation queue, denylist, calls and event chain.
async fn workload(s: &Store) {
    for t in 1..=20u128 {
        s.write(move |x| x.create_task(&task(t, 100_000)))
            .await
            .unwrap();
        for l in 0..3u128 {
            active_lease(s, t * 10 + l, t, 50_000 + l as i64).await;
        }
    }
    let l = lease(999, 1, 60_000);
    s.write(move |t| t.lease_intent(&l, 0, 100)).await.unwrap();
    s.write(|t| t.record_prepared(999, &[9])).await.unwrap();
    for t in 1..=10u128 {
        s.write(move |x| x.complete_task(t, 3_000, 60_000, &local_token()))
            .await
            .unwrap();
    }
    s.write(|t| t.complete_task(11, 3_000, 60_000, &Local::new()))
        .await
        .unwrap();
    s.write(|t| t.expire_due(50_000, 100, &local_token()))
        .await
        .unwrap();
    s.write(|t| t.deny(&[(5, 70_000), (6, 80_000)]))
        .await
        .unwrap();
    s.write(|t| t.prune_denylist(75_000, 0, 10)).await.unwrap();
    s.write(|t| t.put_call(&call(1, 1))).await.unwrap();
    // event blocks: a small one, one over several blocks' worth, a prune
    let all = append_events(s, &[3, blocks::BLOCK_BYTES / 1000 * 2], 1000).await;
    let hash = all[1].hash;
    s.write(move |t| t.prune_events(2, &hash)).await.unwrap();
}

#[tokio::test]
async fn the_log_replayed_onto_the_last_checkpoint_gives_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let opts = log_only(&dir);
    let file = dir.path().join("s.redb");
    let s = Store::open(&opts, &key()).unwrap();
    // the file as of the checkpoint the store opened with
    let base = tempfile::tempdir().unwrap();
    std::fs::copy(&file, base.path().join("s.redb")).unwrap();
    workload(&s).await;
    assert_eq!(s.stats().checkpoints.load(Ordering::Relaxed), 0);
    // what a crash now would leave: that file and the log
    std::fs::copy(
        wal::path_for(&file),
        wal::path_for(&base.path().join("s.redb")),
    )
    .unwrap();
    drop(s); // a clean close: checkpoint, nothing left to replay
    let expected = {
        let db = redb::Database::open(&file).unwrap();
        assert_eq!(left_to_replay(&db, &file), 0, "a clean close checkpoints");
        without_wal_lsn(wal::dump(&db))
    };
    assert!(expected.iter().any(|(t, _, _)| t == "token_denylist"));

    let recovered = Store::open(&log_only(&base), &key()).unwrap();
    assert_eq!(
        recovered.read().unwrap().lease(999).unwrap().unwrap().state,
        LeaseState::Issuing
    );
    drop(recovered);
    let db = redb::Database::open(base.path().join("s.redb")).unwrap();
    let got = without_wal_lsn(wal::dump(&db));
    assert_eq!(got.len(), expected.len());
    // a lone write's event block is logged plain and packed after its
    // answer (`writer::repack`): the replay holds it plain, the same events
    let (got, expected) = (blocks_unpacked(got), blocks_unpacked(expected));
    assert!(
        got == expected,
        "the replayed store differs from the original"
    );
}

/// A store's dump with every event block in its plain form (what it reads
/// as), every other table byte for byte.
fn blocks_unpacked(d: Vec<(String, Vec<u8>, Vec<u8>)>) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    d.into_iter()
        .map(|(t, k, v)| {
            let v = if t == "event_blocks" {
                blocks::unpack(&v).unwrap().into_owned()
            } else {
                v
            };
            (t, k, v)
        })
        .collect()
}

#[tokio::test]
async fn a_lone_writes_event_block_is_logged_plain_and_stored_packed() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&log_only(&dir), &key()).unwrap();
    let events = append_events(&s, &[3], 400).await;
    assert_eq!(events.len(), 3);
    let r = s.inner.backend.raw().unwrap();
    let stored: Vec<(u64, Vec<u8>)> = r
        .open(EVENT_BLOCKS)
        .unwrap()
        .iter()
        .unwrap()
        .map(|b| {
            let (k, v) = b.unwrap();
            (k.value(), v.value().to_vec())
        })
        .collect();
    drop(r);
    let [(key, value)] = &stored[..] else {
        panic!("one block expected, got {}", stored.len());
    };
    assert_eq!(*key, 3);
    let plain = blocks::unpack(value).unwrap().into_owned();
    // stored packed, as a block packed inside its batch would be
    assert!(
        *value == blocks::pack(plain.clone()),
        "the block is stored as logged, not packed"
    );
    assert!(
        value.len() < plain.len() / 2,
        "{} of {}",
        value.len(),
        plain.len()
    );
    // the log holds the plain block, which its answer waited for
    let log = std::fs::read(wal::path_for(&dir.path().join("s.redb"))).unwrap();
    assert!(log.windows(plain.len()).any(|w| w == plain.as_slice()));
    assert!(!log.windows(value.len()).any(|w| w == value.as_slice()));
    // and the events read back whole
    let again = s.read().unwrap().events_after(0, usize::MAX).unwrap();
    assert_eq!(again.len(), 3);
    assert_eq!(again[2].hash, events[2].hash);
}

#[test]
fn every_table_of_a_store_has_a_replay_arm() {
    let dir = tempfile::tempdir().unwrap();
    create_closed(&dir);
    let db = redb::Database::open(dir.path().join("s.redb")).unwrap();
    let w = db.begin_write().unwrap();
    let names: Vec<String> = {
        use redb::TableHandle as _;
        w.list_tables()
            .unwrap()
            .map(|t| t.name().to_owned())
            .collect()
    };
    assert_eq!(names.len(), 25);
    for n in &names {
        wal::replay_for_test(&w, n).unwrap_or_else(|e| panic!("{n}: {e}"));
    }
    assert!(wal::replay_for_test(&w, "no_such_table").is_err());
    w.abort().unwrap();
}

#[tokio::test]
async fn acknowledged_writes_are_in_the_log_before_any_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&log_only(&dir), &key()).unwrap();
    let bytes = std::fs::read(wal::path_for(s.path())).unwrap();
    assert_eq!(wal::records_for_test(&bytes, 0), (vec![], false));
    s.write(|t| t.create_task(&task(1, 10_000))).await.unwrap();
    // answered, so in the log (the store file still holds only the
    // checkpoint it opened with: the replay test shows that)
    let bytes = std::fs::read(wal::path_for(s.path())).unwrap();
    assert_eq!(wal::records_for_test(&bytes, 0), (vec![1], false));
}

/// A store whose writer waits `hold` between answering a lone write and
/// committing it.
fn holding_commits(dir: &tempfile::TempDir, hold: std::time::Duration) -> Store {
    let opts = StoreOptions {
        hold_before_commit: hold,
        ..log_only(dir)
    };
    Store::open(&opts, &key()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_begun_after_an_answer_sees_it_though_the_commit_comes_after() {
    // a batch is answered once its log record is synced, then committed in
    // redb; held here for 300 ms between the two
    let dir = tempfile::tempdir().unwrap();
    let hold = std::time::Duration::from_millis(300);
    let s = holding_commits(&dir, hold);
    for id in 1..=3u128 {
        let answered = std::time::Instant::now();
        s.write(move |t| t.create_task(&task(id, 10_000)))
            .await
            .unwrap();
        let read = s.read().unwrap();
        assert!(
            read.task(id).unwrap().is_some(),
            "task {id}: a read after the answer sees the write"
        );
        // and it was the wait for the commit that made it so: the answer
        // came before the hold ended, the read only after
        assert!(
            answered.elapsed() >= hold,
            "task {id}: the read did not wait for the commit ({:?})",
            answered.elapsed()
        );
    }
    // a read that begins with nothing answered and uncommitted does not wait
    let t = std::time::Instant::now();
    assert!(s.read().unwrap().task(3).unwrap().is_some());
    assert!(t.elapsed() < hold / 2, "{:?}", t.elapsed());
}

/// The redb writer thread's name.
const WRITER: &str = "leasehold-store-writer";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stores_lone_write_runs_on_its_callers_thread_and_commits_after() {
    // held 300 ms between the answer and redb's commit, as above
    let dir = tempfile::tempdir().unwrap();
    let hold = std::time::Duration::from_millis(300);
    let s = holding_commits(&dir, hold);
    // the writer thread has started and waits
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let caller = std::thread::current().id();
    let t = std::time::Instant::now();
    let ran_on = s
        .write(|t| {
            t.create_task(&task(1, 10_000))
                .map(|()| std::thread::current().id())
        })
        .await
        .unwrap();
    let answered = t.elapsed();
    // no hand-off to the writer thread and back ...
    assert_eq!(ran_on, caller, "the lone write went to the writer thread");
    // ... nor a wait for the commit: it runs once this task yields
    assert!(
        answered < hold / 2,
        "the caller waited for the commit: {answered:?}"
    );
    // durable when answered: in the log
    let bytes = std::fs::read(wal::path_for(s.path())).unwrap();
    assert_eq!(wal::records_for_test(&bytes, 0), (vec![1], false));
    // and a read begun now sees it, once it is committed
    assert!(s.read().unwrap().task(1).unwrap().is_some());
    assert!(t.elapsed() >= hold, "the read did not wait for the commit");
    // writes that queue while another runs go to the writer thread, batched
    let writes: Vec<_> = (2..=9u128)
        .map(|id| {
            let s = s.clone();
            tokio::spawn(async move {
                s.write(move |t| {
                    t.create_task(&task(id, 10_000))
                        .map(|()| std::thread::current().name().map(str::to_owned))
                })
                .await
                .unwrap()
            })
        })
        .collect();
    let mut by_writer = 0;
    for w in writes {
        by_writer += usize::from(w.await.unwrap().as_deref() == Some(WRITER));
    }
    let commits = s.stats().commits.load(Ordering::Relaxed);
    assert!(
        by_writer > 0 && commits < 9,
        "a burst was not batched by the writer thread: {by_writer} of 8 there, {commits} commits"
    );
}

#[tokio::test]
async fn the_log_is_appended_past_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&log_only(&dir), &key()).unwrap();
    s.write(|t| t.create_task(&task(1, 10_000))).await.unwrap();
    let log = wal::path_for(s.path());
    let direct = rustix::fs::OFlags::DIRECT.bits();
    // this process's descriptors on the log, and their open flags
    let flags: Vec<u32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|p| p == log))
        .filter_map(|e| {
            let info =
                std::fs::read_to_string(format!("/proc/self/fdinfo/{}", e.file_name().to_str()?))
                    .ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            u32::from_str_radix(flags.trim(), 8).ok()
        })
        .collect();
    assert!(
        flags.iter().any(|f| f & direct != 0),
        "no descriptor on {} has O_DIRECT (flags {flags:?}); the test directory must be on a disk filesystem (ext4, xfs), not tmpfs",
        log.display()
    );
    // and what it wrote reads back through the page cache
    let bytes = std::fs::read(&log).unwrap();
    assert_eq!(wal::records_for_test(&bytes, 0), (vec![1], false));
}

#[tokio::test]
async fn a_full_log_is_checkpointed_and_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        checkpoint_bytes: 4096,
        ..log_only(&dir)
    };
    let s = Store::open(&opts, &key()).unwrap();
    for t in 1..=50u128 {
        s.write(move |x| x.create_task(&task(t, 10_000)))
            .await
            .unwrap();
    }
    assert!(s.stats().checkpoints.load(Ordering::Relaxed) >= 2);
    // records start over after each checkpoint: the file grew once, by
    // one step past its first record, to a whole block (direct writes)
    let len = std::fs::metadata(wal::path_for(s.path())).unwrap().len();
    assert!((2 << 20..=(2 << 20) + 4096).contains(&len), "{len}");
    assert_eq!(len % 4096, 0, "{len}");
    drop(s);
    let s = Store::open(&opts, &key()).unwrap();
    assert!(s.read().unwrap().task(50).unwrap().is_some());
}

#[tokio::test]
async fn a_full_log_is_checkpointed_while_lone_writes_run_on_their_callers_thread() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        checkpoint_bytes: 1024,
        ..log_only(&dir)
    };
    let s = Store::open(&opts, &key()).unwrap();
    // spaced writes that never yield this thread: each runs here, and no
    // commit left for later gets to run on it
    for t in 1..=20u128 {
        std::thread::sleep(std::time::Duration::from_micros(500));
        let on = s
            .write(move |x| {
                x.create_task(&task(t, 10_000))
                    .map(|()| std::thread::current().name().map(str::to_owned))
            })
            .await
            .unwrap();
        // until the log is full (then the writer may be checkpointing)
        if t <= 5 {
            assert_ne!(on.as_deref(), Some(WRITER), "write {t}");
        }
    }
    // the writer thread was woken to checkpoint all the same
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while s.stats().checkpoints.load(Ordering::Relaxed) == 0 && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(s.stats().checkpoints.load(Ordering::Relaxed) >= 1);
    assert!(s.read().unwrap().task(20).unwrap().is_some());
}

#[tokio::test]
async fn an_idle_store_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        checkpoint_idle: std::time::Duration::from_millis(50),
        ..log_only(&dir)
    };
    let s = Store::open(&opts, &key()).unwrap();
    // the writer thread waits with nothing logged, so without a timer
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let ran_on = s
        .write(|t| {
            t.create_task(&task(1, 10_000))
                .map(|()| std::thread::current().name().map(str::to_owned))
        })
        .await
        .unwrap();
    // run on this thread: the writer thread must still hear of it to
    // checkpoint once idle
    assert_ne!(ran_on.as_deref(), Some(WRITER));
    for _ in 0..200 {
        if s.stats().checkpoints.load(Ordering::Relaxed) == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(s.stats().checkpoints.load(Ordering::Relaxed), 1);
    let path = s.path().to_owned();
    drop(s);
    let db = redb::Database::open(&path).unwrap();
    assert_eq!(left_to_replay(&db, &path), 0);
}

/// A log as the writer leaves it, records `1..=n` (each a task), cut after
/// the last one (the rest of the file is preallocated zeros).
fn log_bytes(dir: &tempfile::TempDir, n: u64) -> Vec<u8> {
    let opts = log_only(dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = Store::open(&opts, &key()).unwrap();
    rt.block_on(async {
        for t in 1..=n {
            s.write(move |x| x.create_task(&task(u128::from(t), 10_000)))
                .await
                .unwrap();
        }
    });
    let mut bytes = std::fs::read(wal::path_for(s.path())).unwrap();
    std::mem::forget(s); // no checkpoint: the test reads the log as written
    let mut end = wal::FIRST_RECORD;
    for _ in 0..n {
        end = wal::record_end_for_test(&bytes, end);
    }
    assert!(bytes[end..].iter().all(|b| *b == 0));
    bytes.truncate(end);
    bytes
}

#[test]
fn a_torn_or_corrupt_record_ends_the_log_and_stale_ones_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = log_bytes(&dir, 5);
    assert_eq!(
        wal::records_for_test(&bytes, 0),
        (vec![1, 2, 3, 4, 5], false)
    );
    // already checkpointed up to 3: only 4 and 5 remain to replay
    assert_eq!(wal::records_for_test(&bytes, 3), (vec![4, 5], false));
    assert_eq!(wal::records_for_test(&bytes, 5), (vec![], false));
    // a torn last record (its write was never answered) ends the log
    let torn = &bytes[..bytes.len() - 3];
    assert_eq!(wal::records_for_test(torn, 0), (vec![1, 2, 3, 4], true));
    // a flipped byte fails the digest: the log ends before it
    let mut bad = bytes.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(wal::records_for_test(&bad, 0), (vec![1, 2, 3, 4], true));
    // records past a gap in the sequence are stale, not replayed
    assert_eq!(wal::records_for_test(&bytes, 0).0.len(), 5);
    let second = wal::record_end_for_test(&bytes, wal::FIRST_RECORD);
    let mut gap = bytes[..second].to_vec();
    let third = wal::record_end_for_test(&bytes, second);
    gap.extend_from_slice(&bytes[third..]); // 1, then 3, 4, 5
    assert_eq!(wal::records_for_test(&gap, 0), (vec![1], false));
    // zeros (the preallocated rest of the file) end it quietly
    let mut zeros = bytes.clone();
    zeros.extend_from_slice(&[0; 4096]);
    assert_eq!(
        wal::records_for_test(&zeros, 0),
        (vec![1, 2, 3, 4, 5], false)
    );
}

#[test]
fn a_foreign_or_newer_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    create_closed(&dir);
    let log = wal::path_for(&dir.path().join("s.redb"));
    std::fs::write(&log, b"LHWAL\x00\x00\x09").unwrap();
    let err = Store::open(&StoreOptions::new(dir.path().join("s.redb")), &key()).unwrap_err();
    assert!(err.to_string().contains("format 9"), "{err}");
    std::fs::write(&log, b"something else entirely").unwrap();
    let err = Store::open(&StoreOptions::new(dir.path().join("s.redb")), &key()).unwrap_err();
    assert!(
        err.to_string().contains("not a leasehold write-ahead log"),
        "{err}"
    );
}

#[tokio::test]
async fn an_offline_snapshot_replays_the_log_first() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.redb");
    let s = Store::open(&log_only(&dir), &key()).unwrap();
    let base = tempfile::tempdir().unwrap();
    std::fs::copy(&file, base.path().join("s.redb")).unwrap();
    s.write(|t| t.create_task(&task(7, 10_000))).await.unwrap();
    std::fs::copy(
        wal::path_for(&file),
        wal::path_for(&base.path().join("s.redb")),
    )
    .unwrap();
    drop(s);
    let snap = Snapshot::open(&base.path().join("s.redb")).unwrap();
    assert!(snap.read().unwrap().task(7).unwrap().is_some());
}

#[tokio::test]
async fn a_store_whose_log_was_removed_after_a_clean_close_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    s.write(|t| t.create_task(&task(3, 10_000))).await.unwrap();
    let path = s.path().to_owned();
    drop(s); // the close checkpoints: the file holds everything
    std::fs::remove_file(wal::path_for(&path)).unwrap();
    let s = open(&dir);
    assert!(s.read().unwrap().task(3).unwrap().is_some());
    // and the log is back, for the writes to come
    s.write(|t| t.create_task(&task(4, 10_000))).await.unwrap();
    let bytes = std::fs::read(wal::path_for(&path)).unwrap();
    assert_eq!(wal::records_for_test(&bytes, 1).0.len(), 1);
}

/// An event for the store's chain: its bytes name its seq, padded to `size`.
struct TestEvent {
    task: Option<u128>,
    size: usize,
}

impl Chained for TestEvent {
    fn seal_into(&self, seq: u64, prev: &[u8; 32], out: &mut Vec<u8>) -> [u8; 32] {
        let start = out.len();
        out.extend_from_slice(format!("event {seq} after {}", crate::hex::encode(prev)).as_bytes());
        out.resize(start + self.size.max(out.len() - start), b'.');
        crate::audit::sha256(&out[start..])
    }
    fn size_hint(&self) -> usize {
        self.size
    }
    fn task(&self) -> Option<u128> {
        self.task
    }
}

/// Append events in batches of the given sizes (events of `size` bytes,
/// alternately of tasks 1 and 2 and of none); returns every event as
/// appended: (seq, hash, task, bytes).
async fn append_events(s: &Store, batches: &[usize], size: usize) -> Vec<StoredEvent> {
    for (b, n) in batches.iter().copied().enumerate() {
        let task = move |i: usize| [Some(1u128), Some(2), None][(b + i) % 3];
        s.write(move |t| {
            for i in 0..n {
                t.append(&TestEvent {
                    task: task(i),
                    size,
                })?;
            }
            Ok(())
        })
        .await
        .unwrap();
    }
    s.read().unwrap().events_after(0, usize::MAX).unwrap()
}

/// (task, seq) entries of the task index.
type IndexEntries = Vec<(u128, u64)>;

/// The task index, and what it should be: each task's first event in each
/// block.
fn task_index(s: &Store) -> (IndexEntries, IndexEntries) {
    let r = s.inner.backend.raw().unwrap();
    let idx = r.open(EVENT_TASKS).unwrap();
    let got = idx.iter().unwrap().map(|e| e.unwrap().0.value()).collect();
    let mut want = Vec::new();
    for b in r.open(EVENT_BLOCKS).unwrap().iter().unwrap() {
        let (k, v) = b.unwrap();
        let mut seen = Vec::new();
        for e in blocks::entries(k.value(), &blocks::unpack(v.value()).unwrap()) {
            let e = e.unwrap();
            if e.task != 0 && !seen.contains(&e.task) {
                seen.push(e.task);
                want.push((e.task, e.seq));
            }
        }
    }
    want.sort_unstable();
    (got, want)
}

fn seqs(events: &[StoredEvent]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

async fn events_are_read_back_from_blocks_by_seq_and_by_task(store: Backing) {
    let s = store.open();
    // small batches, and one whose events fill several blocks
    let big = blocks::BLOCK_BYTES / 1000 * 3;
    let all = append_events(&s, &[1, 3, 2, big, 4], 1000).await;
    let n = all.len() as u64;
    assert_eq!(seqs(&all), (1..=n).collect::<Vec<_>>());
    let blocks = {
        let r = s.inner.backend.raw().unwrap();
        let t = r.open(EVENT_BLOCKS).unwrap();
        // none outgrows its allocation
        for e in t.iter().unwrap() {
            let (k, v) = e.unwrap();
            assert!(
                blocks::unpack(v.value()).unwrap().len() <= blocks::BLOCK_BYTES,
                "block {}",
                k.value()
            );
        }
        t.len().unwrap()
    };
    assert!(
        (8..n).contains(&blocks),
        "{blocks} blocks for {n} events in 5 batches, one of them over 3 blocks' worth"
    );
    // each event is what was sealed, chained to the one before
    let mut prev = [0u8; 32];
    for e in &all {
        let text = String::from_utf8_lossy(&e.bytes).into_owned();
        assert!(
            text.starts_with(&format!(
                "event {} after {}",
                e.seq,
                crate::hex::encode(&prev)
            )),
            "{text}"
        );
        assert_eq!(e.bytes.len(), 1000);
        assert_eq!(e.hash, crate::audit::sha256(&e.bytes));
        prev = e.hash;
    }
    // one index entry per task and block, however many events it has there
    let (index, want) = task_index(&s);
    assert_eq!(index, want);
    assert!(index.len() < all.iter().filter(|e| e.task.is_some()).count() / 4);
    let r = s.read().unwrap();
    assert_eq!(r.chain_head().unwrap(), ChainHead { seq: n, hash: prev });
    // from any point, any number
    for after in [0, 1, 3, 5, 6, 7, n / 2, n - 1, n] {
        for limit in [1, 2, 5, 1000] {
            let got = r.events_after(after, limit).unwrap();
            let want: Vec<u64> = (after + 1..=n).take(limit).collect();
            assert_eq!(seqs(&got), want, "after {after}, limit {limit}");
        }
    }
    let mut visited = Vec::new();
    r.for_each_event(&mut |seq, hash, bytes| visited.push((seq, hash, bytes.to_vec())))
        .unwrap();
    let expected: Vec<_> = all
        .iter()
        .map(|e| (e.seq, e.hash, e.bytes.clone()))
        .collect();
    assert_eq!(visited, expected);
    // a task's story: its events only, in order, from any point
    for task in [1u128, 2] {
        let mine: Vec<u64> = all
            .iter()
            .filter(|e| e.task == Some(task))
            .map(|e| e.seq)
            .collect();
        assert!(mine.len() > 10);
        assert_eq!(seqs(&r.task_events(task, 0, usize::MAX).unwrap()), mine);
        let from = mine[mine.len() / 2];
        let got = r.task_events(task, from, 3).unwrap();
        let want: Vec<u64> = mine.iter().copied().filter(|s| *s > from).take(3).collect();
        assert_eq!(seqs(&got), want);
        assert!(got.iter().all(|e| e.bytes == all[e.seq as usize - 1].bytes));
    }
}

async fn pruning_inside_a_block_keeps_the_rest_of_it_and_only_its_index_entries(store: Backing) {
    let s = store.open();
    let all = append_events(&s, &[3, 5, 4], 100).await;
    // seq 5 is in the middle of the second batch's block (4..=8)
    let through = 5;
    let wrong = [0u8; 32];
    let err = s
        .write(move |t| t.prune_events(through, &wrong))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(Conflict::Chain(_))),
        "{err}"
    );
    let hash = all[through as usize - 1].hash;
    let removed = s
        .write(move |t| t.prune_events(through, &hash))
        .await
        .unwrap();
    assert_eq!(removed, through);
    let r = s.read().unwrap();
    let left = r.events_after(0, usize::MAX).unwrap();
    assert_eq!(seqs(&left), (through + 1..=12).collect::<Vec<_>>());
    assert!(
        left.iter()
            .all(|e| e.bytes == all[e.seq as usize - 1].bytes)
    );
    assert_eq!(r.chain_base().unwrap(), ChainHead { seq: through, hash });
    // the pruned events' index entries are gone, and a task whose first
    // event in the cut block was pruned is found from its first that remains
    let (index, want) = task_index(&s);
    assert_eq!(index, want);
    assert!(index.contains(&(2, 7)), "{index:?}");
    assert!(index.iter().all(|(_, seq)| *seq > through));
    for task in [1u128, 2] {
        let mine: Vec<u64> = all
            .iter()
            .filter(|e| e.seq > through && e.task == Some(task))
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs(&r.task_events(task, 0, usize::MAX).unwrap()), mine);
    }
    // pruning again through the end of a block, then appending, still reads
    drop(r);
    let hash = all[7].hash;
    assert_eq!(s.write(move |t| t.prune_events(8, &hash)).await.unwrap(), 3);
    let more = append_events(&s, &[2], 100).await;
    assert_eq!(seqs(&more), (9..=14).collect::<Vec<_>>());
}

fn call(id: u128, task: u128) -> CallRecord {
    CallRecord {
        id,
        task_id: task,
        workload: "dev:a".into(),
        tool: "demo.read".into(),
        action: "read".into(),
        target: format!("t{id}"),
        arguments_sha256: String::new(),
        outcome: "allow".into(),
        policies: vec!["p".into()],
        reasons: vec![],
        max_ttl: None,
        break_glass: None,
        approval_id: None,
        lease_id: Some(id + 1000),
        policy_version: "v".into(),
        created_at: id as i64,
    }
}

async fn calls_are_read_by_task(store: Backing) {
    let s = store.open();
    for (id, task) in [(3u128, 2u128), (1, 1), (4, 2), (2, 1), (5, 3)] {
        s.write(move |t| t.put_call(&call(id, task))).await.unwrap();
    }
    let r = s.read().unwrap();
    let ids = |task| -> Vec<u128> { r.task_calls(task).unwrap().iter().map(|c| c.id).collect() };
    assert_eq!(ids(1), [1, 2]);
    assert_eq!(ids(2), [3, 4]);
    assert_eq!(ids(3), [5]);
    assert!(ids(4).is_empty());
    assert_eq!(r.task_calls(2).unwrap()[1], call(4, 2));
}

/// Version 2's calls: by id, beside an index by task.
const V2_CALLS: redb::TableDefinition<u128, &[u8]> = redb::TableDefinition::new("calls");
const V2_TASK_CALLS: redb::TableDefinition<(u128, u128), ()> =
    redb::TableDefinition::new("task_calls");

/// Version 2's layout: one event per entry, `hash || task || bytes`.
const V2_EVENTS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("events");

fn v2_value(e: &StoredEvent) -> Vec<u8> {
    let mut v = e.hash.to_vec();
    v.extend_from_slice(&e.task.unwrap_or(0).to_be_bytes());
    v.extend_from_slice(&e.bytes);
    v
}

#[tokio::test]
async fn a_version_2_store_has_its_events_in_blocks_and_its_calls_by_task() {
    // the events a chain holds, recorded by this build
    let source = tempfile::tempdir().unwrap();
    let all = {
        let s = open(&source);
        append_events(&s, &[2, 3, blocks::BLOCK_BYTES / 500 * 2, 1], 500).await
    };
    assert!(all.len() > 200);
    let split = all.len() - 5;
    // the same chain in a version-2 store, its first 3 events pruned
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions::new(dir.path().join("s.redb"));
    drop(Store::open_with_migrations(&opts, &key(), &[], 2).unwrap());
    {
        let db = redb::Database::open(dir.path().join("s.redb")).unwrap();
        let w = db.begin_write().unwrap();
        w.delete_table(EVENT_BLOCKS).unwrap();
        w.delete_table(TASK_CALLS).unwrap();
        {
            let mut calls = w.open_table(V2_CALLS).unwrap();
            let mut idx = w.open_table(V2_TASK_CALLS).unwrap();
            for id in 1..=6u128 {
                let bytes = codec::encode(&call(id, id % 2)).unwrap();
                calls.insert(id, bytes.as_slice()).unwrap();
                idx.insert((id % 2, id), ()).unwrap();
            }
        }
        {
            let mut t = w.open_table(V2_EVENTS).unwrap();
            for e in &all[3..split] {
                t.insert(e.seq, v2_value(e).as_slice()).unwrap();
            }
            let mut idx = w.open_table(EVENT_TASKS).unwrap();
            for e in &all[3..] {
                if let Some(task) = e.task {
                    idx.insert((task, e.seq), ()).unwrap();
                }
            }
            let mut meta = w.open_table(META).unwrap();
            let head = ChainHead {
                seq: all.last().unwrap().seq,
                hash: all.last().unwrap().hash,
            };
            meta.insert("chain_head", &head.to_bytes()[..]).unwrap();
            let base = ChainHead {
                seq: 3,
                hash: all[2].hash,
            };
            meta.insert("chain_base", &base.to_bytes()[..]).unwrap();
        }
        w.commit().unwrap();
        // the rest only in a version-2 log record (a crash before the
        // checkpoint), which the opening replays before it migrates
        let (mut log, _) = wal::Wal::recover(&db, &dir.path().join("s.redb"), true).unwrap();
        let w = db.begin_write().unwrap();
        let redo = wal::Redo::default();
        {
            let mut t = wal::Logged::open(&w, V2_EVENTS, &redo);
            for e in &all[split..] {
                t.insert(e.seq, v2_value(e).as_slice()).unwrap();
            }
            let mut calls = wal::Logged::open(&w, V2_CALLS, &redo);
            let bytes = codec::encode(&call(7, 1)).unwrap();
            calls.insert(7, bytes.as_slice()).unwrap();
            let mut idx = wal::Logged::open(&w, V2_TASK_CALLS, &redo);
            idx.insert((1, 7), ()).unwrap();
        }
        let record = redo.borrow_mut().take();
        log.append(&record).unwrap();
        w.abort().unwrap();
    }
    // a read-only view cannot migrate: it says what to do
    let err = Snapshot::open(&dir.path().join("s.redb")).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::OlderSchema {
                found: 2,
                supported: SCHEMA_VERSION
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("start this build's broker on it once")
    );

    let s = Store::open(&opts, &key()).unwrap();
    {
        use redb::{ReadableDatabase as _, TableHandle as _};
        let r = redb_of(&s).begin_read().unwrap();
        let names: Vec<String> = r
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_owned())
            .collect();
        for gone in ["events", "calls", "task_calls"] {
            assert!(!names.iter().any(|n| n == gone), "{gone} is still there");
        }
        let blocks = r.open_table(EVENT_BLOCKS).unwrap().len().unwrap();
        assert!((2..20).contains(&blocks), "{blocks} blocks");
    }
    let r = s.read().unwrap();
    let got = r.events_after(0, usize::MAX).unwrap();
    assert_eq!(seqs(&got), seqs(&all[3..]));
    for (g, w) in got.iter().zip(&all[3..]) {
        assert_eq!((g.hash, g.task, &g.bytes), (w.hash, w.task, &w.bytes));
    }
    let mine: Vec<u64> = all[3..]
        .iter()
        .filter(|e| e.task == Some(2))
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs(&r.task_events(2, 0, usize::MAX).unwrap()), mine);
    drop(r);
    // the calls, the logged one too, are read by task
    let calls = |task| -> Vec<CallRecord> { s.read().unwrap().task_calls(task).unwrap() };
    assert_eq!(calls(1), [call(1, 1), call(3, 1), call(5, 1), call(7, 1)]);
    assert_eq!(calls(0), [call(2, 0), call(4, 0), call(6, 0)]);
    // the index was cut down to each task's first event in each block
    let (index, want) = task_index(&s);
    assert_eq!(index, want);
    // the chain goes on from its head
    let more = append_events(&s, &[2], 500).await;
    assert_eq!(more.last().unwrap().seq, all.last().unwrap().seq + 2);
    drop(s);
    assert!(Snapshot::open(&dir.path().join("s.redb")).is_ok());
}

// === PostgreSQL: several nodes, one leader, one chain ===

fn pg_backend(s: &Store) -> &pg::PgBackend {
    s.inner
        .backend
        .as_any()
        .downcast_ref::<pg::PgBackend>()
        .expect("a PostgreSQL store")
}

/// Wait until `f` holds, up to `secs`.
async fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        assert!(
            std::time::Instant::now() < until,
            "{what}: not within {secs}s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_deposed_leaders_writes_are_refused_by_epoch() {
    let store = Backing::postgres().await;
    let a = Store::open(&store.options_as("a", 2), &key()).unwrap();
    eventually(5, "node a leads", || a.leadership().epoch().is_some()).await;
    let epoch = a.leadership().epoch().unwrap();
    a.write(move |t| t.require_leader(epoch)).await.unwrap();
    let stale = a
        .write(move |t| t.require_leader(epoch + 1))
        .await
        .unwrap_err();
    assert!(
        matches!(stale, StoreError::Conflict(Conflict::NotLeader(_))),
        "{stale}"
    );
    // another node takes the row over (as after a's lease lapsed while it
    // was cut off): a's leader-only writes are refused from then on, in the
    // same batch as anyone's ordinary writes, which still commit
    pg_backend(&a)
        .sql("UPDATE lh_leader SET holder = 'b', epoch = epoch + 1, expires_at = clock_timestamp() + interval '1 hour'")
        .unwrap();
    let late = a.write(move |t| t.require_leader(epoch)).await.unwrap_err();
    assert!(
        matches!(late, StoreError::Conflict(Conflict::NotLeader(e)) if e == epoch),
        "{late}"
    );
    a.write(|t| t.create_task(&task(1, 10_000))).await.unwrap();
    // and a stops counting itself leader before its lease would have ended
    eventually(2, "node a steps down", || a.leadership().epoch().is_none()).await;
    let view = a.cluster().unwrap().unwrap();
    assert_eq!(view.leader.as_deref(), Some("b"));
    assert_eq!(view.epoch, Some(i64::try_from(epoch).unwrap() + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_nodes_share_the_store_the_chain_and_one_leader() {
    let store = Backing::postgres().await;
    let a = Store::open(&store.options_as("a", 1), &key()).unwrap();
    let b = Store::open(&store.options_as("b", 1), &key()).unwrap();
    eventually(5, "one node leads", || {
        a.leadership().epoch().is_some() || b.leadership().epoch().is_some()
    })
    .await;
    assert!(
        !(a.leadership().epoch().is_some() && b.leadership().epoch().is_some()),
        "both nodes lead"
    );
    // what one node writes, the other reads and changes
    a.write(|t| t.create_task(&task(1, 100_000))).await.unwrap();
    active_lease(&b, 10, 1, 50_000).await;
    assert_eq!(
        a.read().unwrap().lease(10).unwrap().unwrap().state,
        LeaseState::Active
    );
    let c = a
        .write(|t| t.complete_task(1, 5, 6, &local_token()))
        .await
        .unwrap();
    assert_eq!(c.revoked.len(), 1, "{c:?}");
    assert_eq!(
        b.read().unwrap().lease(10).unwrap().unwrap().state,
        LeaseState::Revoked
    );
    // both append to one chain, concurrently: no gap, no fork
    let writers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .flat_map(|s| (0..20).map(move |i| (s.clone(), i)))
        .map(|(s, i)| {
            tokio::spawn(async move {
                s.write(move |t| {
                    t.append(&TestEvent {
                        task: Some(i % 3),
                        size: 100,
                    })
                })
                .await
                .unwrap()
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let all = b.read().unwrap().events_after(0, usize::MAX).unwrap();
    assert_eq!(seqs(&all), (1..=40).collect::<Vec<_>>());
    let mut prev = [0u8; 32];
    for e in &all {
        let text = String::from_utf8_lossy(&e.bytes).into_owned();
        assert!(
            text.starts_with(&format!(
                "event {} after {}",
                e.seq,
                crate::hex::encode(&prev)
            )),
            "{text}"
        );
        prev = e.hash;
    }
    assert_eq!(
        a.read().unwrap().chain_head().unwrap(),
        ChainHead {
            seq: 40,
            hash: prev
        }
    );
    // the cluster lists both; the leader that stops hands over at once
    let view = a.cluster().unwrap().unwrap();
    let names: Vec<&str> = view.nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    let (leader, other) = if a.leadership().epoch().is_some() {
        (a, b)
    } else {
        (b, a)
    };
    let before = other.cluster().unwrap().unwrap().epoch.unwrap();
    drop(leader);
    eventually(2, "the other node leads after a clean stop", || {
        other.leadership().epoch().is_some()
    })
    .await;
    let view = other.cluster().unwrap().unwrap();
    assert_eq!(view.epoch, Some(before + 1));
    assert_eq!(
        view.nodes.len(),
        1,
        "a stopped node leaves the list: {view:?}"
    );
}

/// The change log's number now.
fn newest_change(s: &Store) -> i64 {
    pg_backend(s)
        .sql("SELECT coalesce(max(ver), 0)::bigint FROM lh_changes")
        .unwrap()[0]
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_node_never_decides_on_a_row_it_remembers_that_another_changed() {
    let store = Backing::postgres().await;
    let a = Store::open(&store.options_as("a", 1), &key()).unwrap();
    let b = Store::open(&store.options_as("b", 1), &key()).unwrap();
    let complete = |s: &Store, id: u128| {
        let s = s.clone();
        async move {
            s.write_reading(super::Reads::default().task(id), move |t| {
                t.complete_task(id, 5, 6, &local_token())
            })
            .await
        }
    };
    let completed = |r: Result<Completion, StoreError>| {
        matches!(r, Err(StoreError::Conflict(Conflict::TaskCompleted)))
    };
    // a writes and so remembers task 1; b completes it: a must see that
    a.write(|t| t.create_task(&task(1, 100_000))).await.unwrap();
    complete(&b, 1).await.unwrap();
    assert!(completed(complete(&a, 1).await), "a completed task 1 again");
    // the same when the change a missed was pruned from the log: a finds a
    // gap in the numbers and forgets everything
    a.write(|t| t.create_task(&task(2, 100_000))).await.unwrap();
    complete(&b, 2).await.unwrap();
    let pruned = newest_change(&a);
    b.write(|t| t.create_task(&task(3, 100_000))).await.unwrap();
    pg_backend(&a)
        .sql(&format!("DELETE FROM lh_changes WHERE ver = {pruned}"))
        .unwrap();
    assert!(completed(complete(&a, 2).await), "a completed task 2 again");
    // a row named ahead is fetched fresh: b's task 3, unknown to a
    let c = complete(&a, 3).await.unwrap();
    assert_eq!(c.task.state, TaskState::Completed);
    // the batches that wrote task 3 (b's create, a's completion) each left
    // a change row naming it
    let rows = pg_backend(&a)
        .sql("SELECT t, k FROM lh_changes ORDER BY ver")
        .unwrap();
    let naming = rows
        .iter()
        .filter(|r| {
            let (t, k): (Vec<String>, Vec<Vec<u8>>) = (r.get(0), r.get(1));
            t.iter()
                .zip(&k)
                .any(|(t, k)| t == "tasks" && *k == 3u128.to_be_bytes())
        })
        .count();
    assert_eq!(naming, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_fetched_ahead_are_read_as_the_snapshot_has_them() {
    let store = Backing::postgres().await;
    let s = store.open();
    s.write(|t| t.create_task(&task(1, 100_000))).await.unwrap();
    let r = s.read().unwrap();
    r.prefetch(
        &super::Reads::default()
            .task(1)
            .task(2)
            .task_active(1)
            .workload_active("w"),
    )
    .unwrap();
    // fetching began the snapshot: what is written after is not in it,
    // a row fetched absent stays absent, one fetched present is the same
    s.write(|t| t.create_task(&task(2, 100_000))).await.unwrap();
    assert!(r.task(2).unwrap().is_none());
    assert_eq!(r.task(1).unwrap().unwrap(), task(1, 100_000));
    assert_eq!(r.task_active(1).unwrap(), 0);
    drop(r);
    assert_eq!(
        s.read().unwrap().task(2).unwrap().unwrap(),
        task(2, 100_000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_snapshot_with_nothing_else_to_read_has_its_leases_and_ends_at_once() {
    let store = Backing::postgres().await;
    let s = store.open();
    s.write(|t| t.create_task(&task(1, 100_000))).await.unwrap();
    active_lease(&s, 10, 1, 50_000).await;
    active_lease(&s, 11, 1, 60_000).await;
    let r = s.read().unwrap();
    r.prefetch(
        &super::Reads::default()
            .task(1)
            .leases_of_task(1)
            .and_nothing_else(),
    )
    .unwrap();
    // the task completes, its leases revoked, and another task opens
    s.write(|t| t.complete_task(1, 5, 6, &local_token()))
        .await
        .unwrap();
    s.write(|t| t.create_task(&task(2, 100_000))).await.unwrap();
    // what was fetched is as the snapshot had it: the task, its index and
    // the leases it points to (fetched with it, not read afterwards)
    assert_eq!(r.task(1).unwrap().unwrap().state, TaskState::Open);
    let leases = r.task_leases(1).unwrap();
    assert_eq!(leases.iter().map(|l| l.id).collect::<Vec<_>>(), [10, 11]);
    assert!(
        leases.iter().all(|l| l.state == LeaseState::Active),
        "{leases:?}"
    );
    // the snapshot ended with the fetch: a row not fetched is read anew
    assert!(r.task(2).unwrap().is_some());
    drop(r);
    let r = s.read().unwrap();
    assert_eq!(r.task(1).unwrap().unwrap().state, TaskState::Completed);
    assert!(
        r.task_leases(1)
            .unwrap()
            .iter()
            .all(|l| l.state != LeaseState::Active)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_recent_rows_answer_what_the_node_committed_until_another_changes_them() {
    let store = Backing::postgres().await;
    let a = Store::open(&store.options_as("a", 1), &key()).unwrap();
    let b = Store::open(&store.options_as("b", 1), &key()).unwrap();
    let reads = || {
        super::Reads::default()
            .task(1)
            .leases_of_task(1)
            .and_nothing_else()
    };
    a.write(|t| t.create_task(&task(1, 100_000))).await.unwrap();
    active_lease(&a, 10, 1, 50_000).await;
    active_lease(&a, 11, 1, 60_000).await;
    // a committed the task and its leases: its recent rows answer as a
    // snapshot does, with no connection of their own
    let pool = pg_backend(&a).db().pool_stats();
    let r = a.read_recent(&reads()).expect("a committed all of it");
    let (task1, leases) = (r.task(1).unwrap(), r.task_leases(1).unwrap());
    assert_eq!(
        pg_backend(&a).db().pool_stats(),
        pool,
        "it took a connection"
    );
    let snap = a.read().unwrap();
    assert_eq!(task1, snap.task(1).unwrap());
    assert_eq!(leases, snap.task_leases(1).unwrap());
    assert_eq!(leases.len(), 2);
    drop(snap);
    // what was not named is not read from the database
    assert!(r.task(2).is_err());
    // b committed none of it; a redb store never answers
    assert!(b.read_recent(&reads()).is_none());
    let redb = Backing::redb();
    let local = redb.open();
    local
        .write(|t| t.create_task(&task(1, 100_000)))
        .await
        .unwrap();
    assert!(local.read_recent(&reads()).is_none());
    // b completes the task: a's rows are stale (never ahead) until a's
    // writer next reads the change log, then forgotten
    b.write(|t| t.complete_task(1, 5, 6, &local_token()))
        .await
        .unwrap();
    let stale = a.read_recent(&reads()).expect("a has not read the log yet");
    assert_eq!(stale.task(1).unwrap().unwrap().state, TaskState::Open);
    a.write(|t| t.create_task(&task(2, 100_000))).await.unwrap();
    assert!(
        a.read_recent(&reads()).is_none(),
        "a still answers from rows b changed"
    );
    // and what a commits again is answered again
    a.write(|t| t.create_task(&task(3, 100_000))).await.unwrap();
    let three = super::Reads::default().task(3).and_nothing_else();
    let r = a.read_recent(&three).expect("a committed task 3");
    assert_eq!(r.task(3).unwrap().unwrap(), task(3, 100_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_connections_plan_by_the_primary_key_once() {
    let store = Backing::postgres().await;
    let s = store.open();
    // a plan made while a table is small must not scan it once it is
    // large, and a union of lookups must not be planned at every call
    let show =
        |name: &str| -> String { pg_backend(&s).sql(&format!("SHOW {name}")).unwrap()[0].get(0) };
    assert_eq!(show("plan_cache_mode"), "force_generic_plan");
    assert_eq!(show("enable_seqscan"), "off");
    assert_eq!(show("enable_bitmapscan"), "off");
    // a few keys are found by an index scan, not a bitmap built first
    let plan: Vec<String> = pg_backend(&s)
        .sql("EXPLAIN SELECT k, v FROM lh_tasks WHERE k = ANY('{\\x01,\\x02,\\x03}'::bytea[])")
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(plan.iter().any(|l| l.contains("Index Scan")), "{plan:?}");
    assert!(!plan.iter().any(|l| l.contains("Bitmap")), "{plan:?}");
}

/// Each packed column's storage and its table's options, as
/// `table.column=storage options`.
fn packed_storage(s: &Store) -> Vec<String> {
    pg_backend(s)
        .sql(
            "SELECT c.relname || '.' || a.attname || '=' || a.attstorage::text || ' ' \
             || coalesce(array_to_string(c.reloptions, ','), '') \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             WHERE (c.relname = 'lh_event_blocks' AND a.attname = 'v') \
             OR (c.relname = 'lh_changes' AND a.attname IN ('t', 'k')) ORDER BY 1",
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_packed_values_stay_inline_and_are_not_compressed_again() {
    let store = Backing::postgres().await;
    let s = store.open();
    let set = [
        "lh_changes.k=e toast_tuple_target=8160",
        "lh_changes.t=e toast_tuple_target=8160",
        "lh_event_blocks.v=e toast_tuple_target=8160",
    ];
    assert_eq!(packed_storage(&s), set);
    // a block past 2 KB (its hashes do not deflate) stays in its row: the
    // table's TOAST table is never written
    append_events(&s, &[60], 60).await;
    let one = |sql: &str| -> i64 { pg_backend(&s).sql(sql).unwrap()[0].get(0) };
    let largest = one("SELECT max(octet_length(v))::bigint FROM lh_event_blocks");
    assert!(
        (4096..8000).contains(&largest),
        "the largest block is {largest} bytes"
    );
    let toasted = one(
        "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'lh_event_blocks'",
    );
    assert_eq!(toasted, 0, "a block of {largest} bytes went to TOAST");

    // a store made before the settings gets them when next opened
    for sql in [
        "ALTER TABLE lh_event_blocks ALTER COLUMN v SET STORAGE EXTENDED, RESET (toast_tuple_target)",
        "ALTER TABLE lh_changes RESET (toast_tuple_target)",
    ] {
        pg_backend(&s).sql(sql).unwrap();
    }
    assert_ne!(packed_storage(&s), set);
    drop(s);
    let s = store.open();
    assert_eq!(packed_storage(&s), set);
    drop(s);

    // tables another role owns: the store opens and works without them
    let Backing::Pg(peer) = &store else {
        unreachable!()
    };
    let su = peer._cluster.superuser("leasehold").await;
    su.batch_execute(
        "ALTER TABLE lh_event_blocks OWNER TO postgres; \
         GRANT ALL ON lh_event_blocks TO leasehold_store; \
         ALTER TABLE lh_event_blocks RESET (toast_tuple_target)",
    )
    .await
    .unwrap();
    let s = store.open();
    assert_eq!(
        packed_storage(&s)[2],
        "lh_event_blocks.v=e ",
        "left as the owner set it"
    );
    let all = append_events(&s, &[3], 60).await;
    assert_eq!(all.len(), 63);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_one_fetch_gives_each_range_its_own_rows() {
    let store = Backing::postgres().await;
    let s = store.open();
    for id in 1..=3 {
        s.write(move |t| t.create_task(&task(id, 100_000)))
            .await
            .unwrap();
    }
    active_lease(&s, 10, 1, 50_000).await;
    active_lease(&s, 11, 1, 60_000).await;
    active_lease(&s, 30, 3, 50_000).await;
    // three ranges of one table, and the leases two of them point to, in
    // the one statement that is the snapshot
    let r = s.read().unwrap();
    r.prefetch(
        &super::Reads::default()
            .task(1)
            .task(3)
            .leases_of_task(1)
            .leases_of_task(2)
            .leases_of_task(3)
            .and_nothing_else(),
    )
    .unwrap();
    // afterwards every one of them changes
    for id in [1, 3] {
        s.write(move |t| t.complete_task(id, 5, 6, &local_token()))
            .await
            .unwrap();
    }
    active_lease(&s, 20, 2, 50_000).await;
    // each range has its own rows as the snapshot had them (the empty one
    // too), none of another's
    let leases = |id| {
        r.task_leases(id)
            .unwrap()
            .iter()
            .map(|l| (l.id, l.state))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        leases(1),
        [(10, LeaseState::Active), (11, LeaseState::Active)]
    );
    assert_eq!(leases(2), []);
    assert_eq!(leases(3), [(30, LeaseState::Active)]);
    assert_eq!(r.task(3).unwrap().unwrap().state, TaskState::Open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_range_fetched_ahead_gives_way_to_what_its_batch_writes_into_it() {
    let store = Backing::postgres().await;
    let s = store.open();
    let ids = |c: &Completion| {
        let mut ids: Vec<u128> = c.all.iter().map(|l| l.id).collect();
        ids.sort_unstable();
        ids
    };
    s.write(|t| t.create_task(&task(1, 100_000))).await.unwrap();
    active_lease(&s, 10, 1, 50_000).await;
    // fetched ahead, then a lease written into it in the same transaction:
    // completing sees both
    let l = lease(11, 1, 60_000);
    let c = s
        .write_reading(super::Reads::default().task_leases(1), move |t| {
            t.lease_intent(&l, 5, 100)?;
            t.complete_task(1, 5, 6, &local_token())
        })
        .await
        .unwrap();
    assert_eq!(ids(&c), [10, 11]);
    // untouched, it is what the database holds
    s.write(|t| t.create_task(&task(2, 100_000))).await.unwrap();
    active_lease(&s, 20, 2, 50_000).await;
    active_lease(&s, 21, 2, 50_000).await;
    let c = s
        .write_reading(super::Reads::default().task_leases(2), |t| {
            t.complete_task(2, 5, 6, &local_token())
        })
        .await
        .unwrap();
    assert_eq!(ids(&c), [20, 21]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_newer_schema_another_key_or_no_privilege_is_refused() {
    let store = Backing::postgres().await;
    drop(store.open());
    let s = store.open();
    pg_backend(&s)
        .sql(&format!(
            "UPDATE lh_meta SET v = '\\x{:08x}'::bytea WHERE rk = 'schema_version'::bytea",
            pg::PG_SCHEMA_VERSION + 1
        ))
        .unwrap();
    drop(s);
    let err = Store::open(&store.options(), &key()).unwrap_err();
    assert!(matches!(err, StoreError::NewerSchema { .. }), "{err}");
    let err = Store::open(&store.options(), &StoreKey::from_bytes([8; 32])).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NewerSchema { .. } | StoreError::WrongKey { .. }
        ),
        "{err}"
    );

    // a fresh database: another key than the cluster's is refused
    let fresh = Backing::postgres().await;
    drop(fresh.open());
    let err = Store::open(&fresh.options(), &StoreKey::from_bytes([8; 32])).unwrap_err();
    assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");

    // a role that may not create tables: refused, naming it, nothing created
    let Backing::Pg(peer) = &fresh else {
        unreachable!()
    };
    let mut no_create = peer.connection.clone();
    no_create.database = "postgres".into();
    let err = Store::open(
        &StoreOptions {
            postgres: Some(PgOptions {
                connection: no_create,
                node: "n".into(),
                advertise: "n".into(),
                lease_period: std::time::Duration::from_secs(3),
                passive: false,
            }),
            ..StoreOptions::new("unused")
        },
        &key(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
}

/// An insert as a build before the change log makes it (no `logged`).
fn older_builds_insert(s: &Store, id: u128) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let k: String = kv::ord_of::<u128>(&id)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    pg_backend(s).sql(&format!(
        "INSERT INTO lh_tasks (k, rk, v) VALUES ('\\x{k}'::bytea, '\\x{k}'::bytea, '\\x00'::bytea) \
         ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_build_that_does_not_log_its_writes_cannot_write_and_version_3_is_migrated() {
    let store = Backing::postgres().await;
    let s = store.open();
    s.write(|t| t.create_task(&task(1, 100_000))).await.unwrap();
    // an older build's insert (and so its whole transaction) is refused,
    // naming the column it left out
    let err = older_builds_insert(&s, 2).unwrap_err();
    assert!(err.to_string().contains("logged"), "{err}");
    assert!(s.read().unwrap().task(2).unwrap().is_none());

    // the same store as version 3 had it: no fence, older inserts pass
    for t in TABLES {
        pg_backend(&s)
            .sql(&format!("ALTER TABLE lh_{t} DROP COLUMN IF EXISTS logged"))
            .unwrap();
    }
    pg_backend(&s)
        .sql("UPDATE lh_meta SET v = '\\x00000003'::bytea WHERE rk = 'schema_version'::bytea")
        .unwrap();
    older_builds_insert(&s, 3).unwrap();
    drop(s);
    let found = Store::check(&store.options(), &key()).unwrap().unwrap().0;
    assert!(
        found.contains("schema 3 (this build migrates it to 4"),
        "{found}"
    );

    // this build migrates it as it opens: what was there stays, and older
    // builds' writes are refused from then on
    let s = store.open();
    let stamped = pg_backend(&s)
        .sql("SELECT v FROM lh_meta WHERE rk = 'schema_version'::bytea")
        .unwrap();
    assert_eq!(stamped[0].get::<_, Vec<u8>>(0), 4u32.to_be_bytes());
    let r = s.read().unwrap();
    assert_eq!(r.task(1).unwrap().map(|t| t.id), Some(1));
    drop(r);
    let err = older_builds_insert(&s, 4).unwrap_err();
    assert!(err.to_string().contains("logged"), "{err}");
    s.write(|t| t.create_task(&task(5, 100_000))).await.unwrap();
    assert!(s.read().unwrap().task(5).unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_between_backends_keeps_the_targets_own_schema_version() {
    let (redb, pg, back) = (Backing::redb(), Backing::postgres().await, Backing::redb());
    let (src, mid, dst) = (redb.open(), pg.open(), back.open());
    src.write(|t| t.create_task(&task(1, 100_000)))
        .await
        .unwrap();
    copy(&src, &mid).unwrap();
    let stamped = pg_backend(&mid)
        .sql("SELECT v FROM lh_meta WHERE rk = 'schema_version'::bytea")
        .unwrap();
    assert_eq!(
        stamped[0].get::<_, Vec<u8>>(0),
        pg::PG_SCHEMA_VERSION.to_be_bytes()
    );
    copy(&mid, &dst).unwrap();
    use redb::ReadableDatabase as _;
    let r = redb_of(&dst);
    let t = r.begin_read().unwrap();
    assert_eq!(
        schema_version(&t.open_table(META).unwrap()).unwrap(),
        Some(SCHEMA_VERSION)
    );
    assert!(dst.read().unwrap().task(1).unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_verified_tls_and_a_wrong_ca_is_refused_naming_the_certificate() {
    let tls = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/fixtures/tls");
    let cluster = leasehold_provider_postgres::testkit::Cluster::start_with(
        leasehold_provider_postgres::testkit::Options {
            fsync: false,
            tls: Some((tls.join("server.pem"), tls.join("server.key"))),
        },
    );
    let mut connection = cluster.provision_store().await;
    connection.tls = leasehold_provider_postgres::TlsMode::VerifyFull;
    connection.ca_file = Some(tls.join("ca.pem"));
    let store = Backing::Pg(Box::new(PgPeer {
        _cluster: cluster,
        connection: connection.clone(),
    }));
    let s = store.open();
    s.write(|t| t.create_task(&task(1, 10_000))).await.unwrap();
    let ssl: bool = pg_backend(&s)
        .sql("SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE usename = 'leasehold_store'")
        .unwrap()[0]
        .get(0);
    assert!(ssl, "the store's connections use TLS");
    drop(s);
    // a CA that did not sign the server's certificate: refused at open
    let Backing::Pg(peer) = &store else {
        unreachable!()
    };
    let other = tempfile::tempdir().unwrap();
    let wrong = other.path().join("other-ca.pem");
    std::fs::copy(tls.join("server.pem"), &wrong).unwrap();
    let mut opts = store.options();
    let pg = opts.postgres.as_mut().unwrap();
    pg.connection = peer.connection.clone();
    pg.connection.ca_file = Some(wrong);
    let err = Store::open(&opts, &key()).unwrap_err().to_string();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

fn approval(id: u128, task: u128) -> ApprovalRecord {
    ApprovalRecord {
        id,
        task_id: task,
        workload: "dev:a".into(),
        tenant: None,
        on_behalf_of: "alice".into(),
        request_hash: [1; 32],
        tool: "demo.read".into(),
        action: "read".into(),
        target: "t".into(),
        arguments_sha256: String::new(),
        credential: None,
        requested_by_call: id,
        policies: vec![],
        state: ApprovalState::Pending,
        created_at: 0,
        expires_at: 1_000_000,
        decided_by: None,
        decided_at: None,
        comment: None,
        consumed_by_call: None,
    }
}

/// A completed task with one lease revoked at `at` and a call (which may
/// name an approval).
async fn ended_task(s: &Store, id: u128, at: i64, approval: Option<u128>) {
    s.write(move |t| t.create_task(&task(id, 1_000_000)))
        .await
        .unwrap();
    active_lease(s, id * 10, id, 900_000).await;
    let mut c = call(id * 10 + 1, id);
    c.approval_id = approval;
    s.write(move |t| t.put_call(&c)).await.unwrap();
    s.write(move |t| t.complete_task(id, at, at, &Local::new()))
        .await
        .unwrap();
    let done = Outcome::Done {
        lease: id * 10,
        note: None,
    };
    s.write(move |t| t.record_outcomes(&[done], at))
        .await
        .unwrap();
}

/// Every trace of a task in the store, as readers see it.
fn traces(s: &Store, id: u128) -> (bool, usize, usize, usize) {
    let r = s.read().unwrap();
    let listed = r
        .list_leases(&LeaseQuery {
            task: Some(id),
            limit: 100,
            scan_budget: 10_000,
            ..LeaseQuery::default()
        })
        .unwrap()
        .0
        .len();
    (
        r.task(id).unwrap().is_some(),
        r.task_leases(id).unwrap().len(),
        r.task_calls(id).unwrap().len(),
        listed,
    )
}

async fn retention_removes_ended_tasks_whole_and_nothing_live(store: Backing) {
    let s = store.open();
    // 1: ended at 100, its approval denied: goes with everything of its own
    s.write(|t| t.create_approval(&approval(70, 1)))
        .await
        .unwrap();
    s.write(|t| t.decide_approval(70, false, "bob", None, 50))
        .await
        .unwrap();
    ended_task(&s, 1, 100, Some(70)).await;
    // 22: ended at 100 but its lease is irrevocable: stays
    s.write(|t| t.create_task(&task(22, 1_000_000)))
        .await
        .unwrap();
    active_lease(&s, 220, 22, 900_000).await;
    s.write(|t| t.complete_task(22, 100, 100, &Local::new()))
        .await
        .unwrap();
    let o = Outcome::Retry {
        lease: 220,
        at: 90_000,
        error: "gone".into(),
        irrevocable: true,
    };
    s.write(move |t| t.record_outcomes(&[o], 100))
        .await
        .unwrap();
    // 3: open, deadline ahead: stays
    s.write(|t| t.create_task(&task(3, 1_000_000)))
        .await
        .unwrap();
    // 4: ended, but an approval asked by it is still pending: stays
    s.write(|t| t.create_approval(&approval(74, 4)))
        .await
        .unwrap();
    ended_task(&s, 4, 100, Some(74)).await;
    // 5: never completed, deadline long past, its lease expired: goes
    s.write(|t| t.create_task(&task(5, 500))).await.unwrap();
    active_lease(&s, 50, 5, 400).await;
    s.write(|t| t.expire_due(400, 10, &Local::new()))
        .await
        .unwrap();
    let o = Outcome::Done {
        lease: 50,
        note: None,
    };
    s.write(move |t| t.record_outcomes(&[o], 400))
        .await
        .unwrap();
    // 6: ended, its break-glass review unsigned: stays
    ended_task(&s, 6, 100, None).await;
    let six = s.read().unwrap().task(6).unwrap().unwrap();
    s.write(move |t| t.flag_review(&six, (61, "demo.read".into(), "why".into(), 90)))
        .await
        .unwrap();
    // 7: ended after the cutoff: stays
    ended_task(&s, 7, 20_000, None).await;
    let before = (
        count(&s, LeaseState::Revoked),
        count(&s, LeaseState::Expired),
    );

    let r = s
        .write(|t| t.remove_ended_tasks(10_000, None, 100, 1_000))
        .await
        .unwrap();
    assert_eq!(
        (r.tasks, r.leases, r.calls, r.approvals, r.reviews),
        (2, 2, 1, 1, 0),
        "{r:?}"
    );
    assert_eq!((r.first, r.last_removed), (Some(1), Some(5)));
    assert_eq!(r.kept, 5, "22, 3, 4, 6, 7");
    assert!(r.done);
    for gone in [1, 5] {
        assert_eq!(traces(&s, gone), (false, 0, 0, 0), "task {gone}");
    }
    for kept in [22, 4, 6, 7] {
        assert!(traces(&s, kept).0, "task {kept}");
        assert_eq!(traces(&s, kept).1, 1, "task {kept}'s lease");
    }
    let rd = s.read().unwrap();
    assert!(rd.lease(10).unwrap().is_none() && rd.lease(50).unwrap().is_none());
    assert!(
        rd.approval(70).unwrap().is_none(),
        "decided: went with its task"
    );
    assert!(rd.approval(74).unwrap().is_some(), "pending: stays");
    assert!(rd.lease(220).unwrap().is_some(), "irrevocable: stays");
    assert!(rd.review(6).unwrap().is_some());
    let tasks: Vec<u128> = rd
        .workload_tasks("dev:a", 0, 100)
        .unwrap()
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(
        tasks,
        [3, 4, 6, 7, 22],
        "the workload's index forgets them too"
    );
    drop(rd);
    assert_eq!(
        (
            count(&s, LeaseState::Revoked),
            count(&s, LeaseState::Expired)
        ),
        (before.0 - 1, before.1 - 1),
        "counters count what is stored"
    );
    // a second pass finds nothing more; the first signed off review frees 6
    let r = s
        .write(|t| t.remove_ended_tasks(10_000, None, 100, 1_000))
        .await
        .unwrap();
    assert_eq!((r.tasks, r.kept), (0, 5));
    s.write(|t| t.sign_off_review(6, "bob", "ok", 200))
        .await
        .unwrap();
    let r = s
        .write(|t| t.remove_ended_tasks(10_000, None, 100, 1_000))
        .await
        .unwrap();
    assert_eq!((r.tasks, r.reviews), (1, 1));
    assert_eq!(traces(&s, 6), (false, 0, 0, 0));
    assert!(s.read().unwrap().review(6).unwrap().is_none());
}

async fn retention_batches_are_bounded_and_resume(store: Backing) {
    let s = store.open();
    for id in 1..=9 {
        ended_task(&s, id, 100, None).await;
    }
    // each task is 3 records (task, lease, call): 7 allow two per batch
    let mut cursor = None;
    let mut batches = Vec::new();
    loop {
        let r = s
            .write(move |t| t.remove_ended_tasks(10_000, cursor, 100, 7))
            .await
            .unwrap();
        assert!(r.records() <= 7, "{r:?}");
        batches.push(r.tasks);
        if r.done {
            break;
        }
        cursor = r.cursor;
    }
    assert_eq!(batches, [2, 2, 2, 2, 1]);
    for id in 1..=9 {
        assert_eq!(traces(&s, id), (false, 0, 0, 0), "task {id}");
    }
    // a task larger than the budget goes over several batches, its lease
    // and call first, its record last, the cursor staying before it
    ended_task(&s, 20, 100, None).await;
    let mut steps = Vec::new();
    loop {
        let r = s
            .write(|t| t.remove_ended_tasks(10_000, None, 100, 1))
            .await
            .unwrap();
        assert!(r.records() <= 1, "{r:?}");
        steps.push((r.tasks, r.leases, r.calls, traces(&s, 20).0));
        if r.done {
            break;
        }
        assert_eq!(r.cursor, None, "the cursor stays before a task in parts");
    }
    assert_eq!(
        steps,
        [(0, 1, 0, true), (0, 0, 1, true), (1, 0, 0, false)],
        "(tasks, leases, calls, task still stored) per batch"
    );
    assert_eq!(traces(&s, 20), (false, 0, 0, 0));
    // at most max_tasks examined per batch
    for id in 30..=33 {
        s.write(move |t| t.create_task(&task(id, 1_000_000)))
            .await
            .unwrap();
    }
    let r = s
        .write(|t| t.remove_ended_tasks(10_000, None, 3, 1_000))
        .await
        .unwrap();
    assert_eq!((r.kept, r.done, r.cursor), (3, false, Some(32)));
}

async fn retention_removes_finished_jobs_with_their_claims(store: Backing) {
    let s = store.open();
    s.write(|t| t.create_task(&task(1, 1_000_000)))
        .await
        .unwrap();
    for l in 10..15 {
        active_lease(&s, l, 1, 900_000).await;
    }
    let job = |id: u128, state: JobState| JobRecord {
        id,
        selector: Selector {
            task: Some(1),
            states: vec![LeaseState::Active],
            ..Selector::default()
        },
        reason: "incident".into(),
        fence: false,
        created_by: "responder".into(),
        created_at: 0,
        state,
        cursor: None,
        scan_done: true,
        scanned: 0,
        finished_at: (state != JobState::Running).then_some(100),
        error: None,
    };
    let done = job(5, JobState::Done);
    let running = job(6, JobState::Running);
    s.write(move |t| {
        t.put_job(&done)?;
        t.put_job(&running)?;
        t.claim_for_job(&done, &[10, 11, 12], 50, &local_token())?;
        t.claim_for_job(&running, &[13], 50, &local_token())
    })
    .await
    .unwrap();
    assert!(!s.read().unwrap().job_counts(5).unwrap().is_empty());
    // two claims per batch: the job's record goes with its last claims
    let (jobs, entries) = s.write(|t| t.remove_ended_jobs(10_000, 2)).await.unwrap();
    assert_eq!((jobs, entries), (0, 2));
    assert!(s.read().unwrap().job(5).unwrap().is_some());
    let (jobs, _) = s.write(|t| t.remove_ended_jobs(10_000, 100)).await.unwrap();
    assert_eq!(jobs, 1);
    let r = s.read().unwrap();
    assert!(r.job(5).unwrap().is_none());
    assert!(r.job_counts(5).unwrap().is_empty());
    assert!(r.job(6).unwrap().is_some(), "a running job stays");
    assert_eq!(r.jobs().unwrap().len(), 1);
    // a job finished after the cutoff stays
    drop(r);
    let (jobs, _) = s.write(|t| t.remove_ended_jobs(50, 100)).await.unwrap();
    assert_eq!(jobs, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_reader_connection_the_server_closed_while_idle_is_not_handed_out() {
    let store = Backing::postgres().await;
    let s = store.open();
    s.write(|t| t.create_task(&task(1, 100_000))).await.unwrap();
    // a read leaves its connection idle in the pool
    assert!(s.read().unwrap().task(1).unwrap().is_some());
    eventually(5, "the reader's connection back in the pool", || {
        pg_backend(&s).db().pool_stats() == (1, 1)
    })
    .await;
    // the server ends every other connection of the store's user
    pg_backend(&s)
        .sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE usename = current_user AND pid <> pg_backend_pid()",
        )
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // the idle connection took in the server's goodbye: the next read gets
    // a new connection instead of failing on the dead one
    let r = s.read().unwrap();
    assert_eq!(r.task(1).unwrap().unwrap().id, 1);
}

/// A reader's connection is driven by the thread that waits on it, which
/// is often a runtime's worker (a request handler): its I/O must not spend
/// that task's cooperative budget, which is given back only when the task
/// yields, and the task does not yield while it waits.
#[test]
fn postgres_a_reader_connection_driven_inside_a_task_reads_past_its_budget() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(Backing::postgres());
    let s = store.open();
    rt.block_on(s.write(|t| t.create_task(&task(1, 100_000))))
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // many reads, one after another, within one poll of one task
    rt.spawn(async move {
        let r = s.read().unwrap();
        let found = (0..400u128)
            .filter(|id| r.task(*id).unwrap().is_some())
            .count();
        let _ = tx.send(found);
    });
    let found = rx.recv_timeout(std::time::Duration::from_secs(60));
    // a task stuck in a loop would keep the runtime from shutting down
    rt.shutdown_background();
    let found =
        found.expect("400 reads (each a round trip) within one task's poll did not finish in 60 s");
    assert_eq!(found, 1);
}
