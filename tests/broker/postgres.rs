//! The PostgreSQL provider through the broker, against a real server: a
//! task's database lease dies with its live session when the task
//! completes, revocation waits out a database outage and then drops the
//! role, readiness follows the database, bad scopes are refused before
//! anything is recorded, and reconciliation finds (and only when asked,
//! drops) a role created behind the broker's back.

use std::time::Duration;

use leasehold_provider_postgres::testkit::Cluster;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_postgres::error::SqlState;

use crate::harness::{Harness, Options, permit_leases};

async fn start(cluster: &Cluster, manual_clock: bool) -> Harness {
    let pg = cluster.provider_config();
    Harness::start(Options {
        manual_clock,
        tweak: Box::new(move |c| {
            c.providers.insert(
                "appdb".into(),
                leasehold::config::ProviderConfig::new(pg.clone()),
            );
            permit_leases(c, "appdb");
            c.reaper.retry_base_seconds = 1;
            c.reaper.retry_cap_seconds = 2;
        }),
        ..Options::default()
    })
    .await
}

async fn lease(h: &Harness, task: &str, scope: &[&str]) -> (StatusCode, Value) {
    h.post(
        &h.tokens.a,
        &format!("/v1/tasks/{task}/leases"),
        json!({"provider": "appdb", "role": "read", "ttl_seconds": 600, "scope": scope}),
    )
    .await
}

async fn login(c: &Cluster, cred: &Value) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    c.connect(
        cred["username"].as_str().unwrap(),
        cred["password"].as_str().unwrap(),
        cred["database"].as_str().unwrap(),
    )
    .await
}

fn refused(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::INVALID_PASSWORD)
        || e.code() == Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
}

async fn roles_with_prefix(c: &Cluster) -> Vec<String> {
    let su = c.superuser("postgres").await;
    su.query(
        "SELECT rolname::text FROM pg_roles WHERE starts_with(rolname::text, 'lh_') ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completing_the_task_kills_the_database_role_and_its_idle_session() {
    let cluster = Cluster::start();
    cluster.provision().await;
    let h = start(&cluster, false).await;
    let (s, ready) = h.get("", "/v1/ready").await;
    assert_eq!(s, StatusCode::OK, "{ready}");
    assert_eq!(ready["checks"]["provider:appdb"], "ok");

    let task = h.open_task(&h.tokens.a, 3600).await;
    let (s, l) = lease(&h, &task, &["public"]).await;
    assert_eq!(s, StatusCode::CREATED, "{l}");
    let cred = &l["credential"];
    assert_eq!(
        cred["username"],
        format!("lh_{}", l["lease_id"].as_str().unwrap())
    );
    let session = login(&cluster, cred).await.unwrap();
    let n: i64 = session
        .query_one("SELECT count(*) FROM public.orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // the lease record never holds the password
    let (_, shown) = h
        .get(
            &h.tokens.a,
            &format!("/v1/leases/{}", l["lease_id"].as_str().unwrap()),
        )
        .await;
    assert!(
        !shown
            .to_string()
            .contains(cred["password"].as_str().unwrap())
    );

    let (s, done) = h
        .post_empty(&h.tokens.a, &format!("/v1/tasks/{task}/complete"))
        .await;
    assert_eq!(s, StatusCode::OK, "{done}");
    assert!(
        session.query_one("SELECT 1", &[]).await.is_err(),
        "the idle session survived task completion"
    );
    assert!(
        refused(&login(&cluster, cred).await.unwrap_err()),
        "the password still works"
    );
    assert!(roles_with_prefix(&cluster).await.is_empty());
    assert_eq!(
        h.lease_state(l["lease_id"].as_str().unwrap()).await,
        "revoked"
    );

    // a scope outside the template, or an injection attempt: 400, nothing recorded
    let task = h.open_task(&h.tokens.a, 3600).await;
    let before = h.snapshot().await;
    for scope in [
        vec!["secret"],
        vec!["public; DROP TABLE public.orders; --"],
        vec!["public\"; DROP ROLE app_read; --"],
    ] {
        let (s, v) = lease(&h, &task, &scope).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["code"], "scope_not_allowed", "{v}");
    }
    assert_eq!(h.snapshot().await, before);
    let su = cluster
        .superuser(leasehold_provider_postgres::testkit::DATABASE)
        .await;
    assert_eq!(
        su.query_one("SELECT count(*) FROM public.orders", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_waits_out_a_database_outage_then_drops_the_role() {
    let mut cluster = Cluster::start();
    cluster.provision().await;
    let h = start(&cluster, true).await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let (s, l) = lease(&h, &task, &[]).await;
    assert_eq!(s, StatusCode::CREATED, "{l}");
    let id = l["lease_id"].as_str().unwrap().to_owned();

    cluster.stop_server();
    // down at issue time: a fast, clear 503; nothing active
    let t = std::time::Instant::now();
    let (s, v) = lease(&h, &task, &[]).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let (_, active) = h.get(&h.tokens.responder, "/v1/leases?state=active").await;
    assert_eq!(
        active["leases"].as_array().unwrap().len(),
        1,
        "only the first lease is active: {active}"
    );
    let (s, ready) = h.get("", "/v1/ready").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["checks"]["provider:appdb"], "unavailable");

    // down at revoke time: queued and retried
    let (s, v) = h
        .post_empty(&h.tokens.a, &format!("/v1/leases/{id}/revoke"))
        .await;
    assert!(s.is_success(), "{v}");
    for _ in 0..3 {
        h.advance(Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(h.lease_state(&id).await, "revoking");
    let (_, rec) = h
        .get(&h.tokens.responder, &format!("/v1/leases/{id}"))
        .await;
    assert!(
        rec.to_string().contains("cannot connect"),
        "the last error says why: {rec}"
    );

    cluster.start_server();
    for _ in 0..50 {
        h.advance(Duration::from_secs(3));
        if h.lease_state(&id).await == "revoked" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h.lease_state(&id).await, "revoked");
    assert!(
        roles_with_prefix(&cluster).await.is_empty(),
        "the role is dropped once the database is back"
    );
    assert!(refused(
        &login(&cluster, &l["credential"]).await.unwrap_err()
    ));
    assert_eq!(h.get("", "/v1/ready").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_orphans_and_drops_them_only_when_asked() {
    let cluster = Cluster::start();
    cluster.provision().await;
    let h = start(&cluster, false).await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let (_, live) = lease(&h, &task, &[]).await;
    let live_role = live["credential"]["username"].as_str().unwrap().to_owned();
    let (_, revoked) = lease(&h, &task, &[]).await;
    let revoked_id = revoked["lease_id"].as_str().unwrap().to_owned();
    h.post_empty(&h.tokens.a, &format!("/v1/leases/{revoked_id}/revoke"))
        .await;
    h.wait_state(&revoked_id, "revoked").await;
    // behind the broker's back: a role for a lease that does not exist, one
    // re-created for a revoked lease, one with the prefix but no lease id,
    // and one without the prefix
    let su = cluster.superuser("postgres").await;
    su.batch_execute(&format!(
        "CREATE ROLE lh_lease_00000000000000000000000000 LOGIN PASSWORD 'x'; CREATE ROLE \"lh_{revoked_id}\" LOGIN; \
         CREATE ROLE lh_manual; CREATE ROLE not_ours LOGIN;"
    ))
    .await
    .unwrap();

    // workloads and approvers may not; the report changes nothing
    assert_eq!(
        h.post(&h.tokens.a, "/v1/providers/appdb/reconcile", json!({}))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    let (s, v) = h
        .post(&h.tokens.admin, "/v1/providers/token/reconcile", json!({}))
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("not_reconcilable")),
        "{v}"
    );
    let (s, v) = h
        .post(&h.tokens.admin, "/v1/providers/nope/reconcile", json!({}))
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unknown_provider")),
        "{v}"
    );
    let (s, report) = h
        .post(&h.tokens.admin, "/v1/providers/appdb/reconcile", json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{report}");
    assert_eq!(report["found"], 4, "{report}");
    assert_eq!(report["accounted"], 1);
    let orphans = report["orphans"].as_array().unwrap();
    let reason = |name: &str| {
        orphans
            .iter()
            .find(|o| o["name"] == name)
            .map(|o| o["reason"].as_str().unwrap().to_owned())
    };
    assert_eq!(
        reason("lh_lease_00000000000000000000000000").as_deref(),
        Some("no such lease in the store")
    );
    assert_eq!(
        reason(&format!("lh_{revoked_id}")).as_deref(),
        Some("its lease is revoked")
    );
    assert_eq!(
        reason("lh_manual").as_deref(),
        Some("the name does not encode a lease id")
    );
    assert!(reason("not_ours").is_none() && reason(&live_role).is_none());
    assert_eq!(
        roles_with_prefix(&cluster).await.len(),
        4,
        "a report drops nothing"
    );

    // from the command line, dropping
    let (ok, report, err) = crate::cli::leasehold(
        &h,
        &[
            "providers",
            "reconcile",
            "appdb",
            "--drop",
            "--as",
            "responder",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        report["orphans"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["removed"] == true),
        "{report}"
    );
    assert_eq!(
        roles_with_prefix(&cluster).await,
        vec![live_role.clone()],
        "only the live lease's role is left"
    );
    let n: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = 'not_ours'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "a role without the prefix is never touched");
    let (_, ev) = h
        .get(&h.tokens.admin, "/v1/events?kind=provider.reconciled")
        .await;
    assert_eq!(
        ev["events"].as_array().unwrap().len(),
        2,
        "both runs are in the chain: {ev}"
    );
    // the live lease still works
    let session = login(&cluster, &live["credential"]).await.unwrap();
    session.query_one("SELECT 1", &[]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_validate_dry_runs_templates_and_names_the_broken_one() {
    let mut cluster = Cluster::start();
    cluster.provision().await;
    let h = start(&cluster, false).await;
    let validate = |config: leasehold::config::Config, name: &str| {
        let path = h.dir.path().join(name);
        std::fs::write(&path, config.to_toml().unwrap()).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
            .args(["config", "validate"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = validate(h.config.clone(), "good.toml");
    assert!(ok, "{err}");
    assert!(
        err.contains("providers.appdb: every role template passed a dry run"),
        "{err}"
    );
    // valid, but a grant on one object per lease stops near 600 leases: said
    assert!(
        err.contains("warning: providers.appdb.roles.read.statements[0] grants on an object")
            && err.contains("about 600 leases")
            && err.contains("in_roles"),
        "{err}"
    );
    assert!(
        !err.contains("roles.weird."),
        "membership in a group role is not warned about: {err}"
    );

    let mut broken = h.config.clone();
    let pg = broken
        .providers
        .get_mut("appdb")
        .unwrap()
        .get_mut::<leasehold_provider_postgres::PostgresConfig>()
        .expect("postgres");
    let mut t = pg.roles["writer"].clone();
    t.statements = vec!["GRANT SELECT ON public.no_such_table TO {{name}}".into()];
    pg.roles.insert("reports".into(), t);
    let (ok, err) = validate(broken.clone(), "broken.toml");
    assert!(!ok, "a template that cannot run fails validation");
    assert!(
        err.contains("appdb")
            && err.contains("role template `reports`")
            && err.contains("no_such_table"),
        "{err}"
    );
    assert!(
        roles_with_prefix(&cluster).await.is_empty(),
        "the dry run left nothing behind"
    );

    // unreachable: a note, not a failure (the health check runs it later)
    cluster.stop_server();
    let (ok, err) = validate(broken, "down.toml");
    assert!(ok, "{err}");
    assert!(
        err.contains("not dry-run") && err.contains("health check"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_database_secret_in_logs_at_trace_level() {
    use crate::harness::{Spawned, spawn_broker};
    let cluster = Cluster::start();
    cluster.provision().await;
    let pg = cluster.provider_config();
    let tweak = move |c: &mut leasehold::config::Config| {
        c.providers.insert(
            "appdb".into(),
            leasehold::config::ProviderConfig::new(pg.clone()),
        );
        permit_leases(c, "appdb");
    };
    // the operator asks for everything, tokio-postgres included
    let Spawned {
        dir: _dir,
        creds,
        log,
        remote,
        mut child,
        ..
    } = spawn_broker(tweak, "trace,tokio_postgres=trace", &[]).await;
    let a = &creds.identities["assistant-a"].token;
    let task = remote
        .post(
            a,
            "/v1/tasks",
            Some(
                json!({"purpose": "p", "on_behalf_of": "alice", "prompt": "x", "ttl_seconds": 600}),
            ),
        )
        .await;
    let task = task["task_id"].as_str().unwrap().to_owned();
    let mut passwords = Vec::new();
    let mut verifiers = Vec::new();
    let su = cluster.superuser("postgres").await;
    for scope in [vec![], vec!["public"]] {
        let l = remote.post(a, &format!("/v1/tasks/{task}/leases"), Some(json!({"provider": "appdb", "role": "read", "ttl_seconds": 300, "scope": scope}))).await;
        let cred = &l["credential"];
        passwords.push(cred["password"].as_str().unwrap().to_owned());
        let stored: String = su
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[&cred["username"].as_str().unwrap()],
            )
            .await
            .unwrap()
            .get(0);
        // SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>
        let keys = stored.rsplit_once('$').unwrap().1.to_owned();
        verifiers.extend(keys.split(':').map(str::to_owned));
        login(&cluster, cred)
            .await
            .unwrap()
            .query_one("SELECT 1", &[])
            .await
            .unwrap();
    }
    remote
        .post(a, &format!("/v1/tasks/{task}/complete"), None)
        .await;
    assert!(child.terminate().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("lease issued") && text.contains("DEBUG"),
        "the log is at its most verbose: {}",
        &text[..text.len().min(3000)]
    );
    let manager = std::fs::read_to_string(cluster.manager_password_file()).unwrap();
    for (what, s) in passwords
        .iter()
        .map(|p| ("leased password", p))
        .chain(verifiers.iter().map(|v| ("verifier key", v)))
        .chain([("management password", &manager)])
    {
        assert!(!text.contains(s.trim()), "a {what} appears in the log");
    }
    assert!(
        !text.contains("CREATE ROLE"),
        "no statement text from the driver"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_reconciliation_reports_an_orphan_and_leaves_it() {
    let cluster = Cluster::start();
    cluster.provision().await;
    let pg = cluster.provider_config();
    let h = Harness::start(Options {
        tweak: Box::new(move |c| {
            c.providers.insert(
                "appdb".into(),
                leasehold::config::ProviderConfig::new(pg.clone()),
            );
            permit_leases(c, "appdb");
            c.reaper.reconcile_interval_seconds = 1;
        }),
        ..Options::default()
    })
    .await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let (s, _) = lease(&h, &task, &[]).await;
    assert_eq!(s, StatusCode::CREATED);
    // a clean pass records nothing
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, ev) = h
        .get(&h.tokens.admin, "/v1/events?kind=provider.reconciled")
        .await;
    assert!(ev["events"].as_array().unwrap().is_empty(), "{ev}");
    let su = cluster.superuser("postgres").await;
    su.batch_execute("CREATE ROLE lh_lease_11111111111111111111111111 LOGIN")
        .await
        .unwrap();
    let mut found = Value::Null;
    for _ in 0..50 {
        let (_, ev) = h
            .get(&h.tokens.admin, "/v1/events?kind=provider.reconciled")
            .await;
        if let Some(e) = ev["events"].as_array().unwrap().first() {
            found = e.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        found["data"]["orphans"][0]["name"], "lh_lease_11111111111111111111111111",
        "{found}"
    );
    assert_eq!(found["data"]["by"], "system");
    let text = h.metrics().await;
    assert!(
        text.contains("leasehold_provider_orphans{provider=\"appdb\"} 1"),
        "{text}"
    );
    assert_eq!(
        roles_with_prefix(&cluster).await.len(),
        2,
        "reported, never dropped by the periodic job"
    );
}

/// A template granting on an object to each lease's role (`read` grants
/// on the scope's schema): once that access list is half full, readiness
/// says there is an advisory (and stays ready), the operator's views say
/// what it is (stats, `leasehold status`, a metric), and it goes when the
/// leases go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filling_access_list_is_an_advisory_in_status_and_readiness() {
    let cluster = Cluster::start();
    cluster.provision().await;
    let h = start(&cluster, false).await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let (s, l) = lease(&h, &task, &["reporting"]).await;
    assert_eq!(s, StatusCode::CREATED, "{l}");
    let entries = cluster.fill_schema_acl("reporting", 320).await;
    let holds = format!("the access list of schema reporting holds {entries} entries");
    // readiness caches its checks for a second
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, ready) = h.get("", "/v1/ready").await;
    assert_eq!(s, StatusCode::OK, "an advisory is not a failure: {ready}");
    assert_eq!(
        ready["checks"]["provider:appdb"],
        "ok, 1 advisory (see `leasehold status`)"
    );
    assert!(
        !ready.to_string().contains("reporting"),
        "details are for operators: {ready}"
    );
    let (s, stats) = h.get(&h.tokens.admin, "/v1/stats").await;
    assert_eq!(s, StatusCode::OK, "{stats}");
    let said = stats["advisories"]["provider:appdb"][0]
        .as_str()
        .unwrap_or_default();
    assert!(
        said.contains(&holds) && said.contains("in_roles"),
        "{stats}"
    );
    let (ok, out, err) =
        crate::cli::leasehold_text(&h, &["status", "--as", "admin", "-o", "table"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("ADVISORY") && out.contains(&holds), "{out}");
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("leasehold_provider_advisories{provider=\"appdb\"} 1"),
        "{metrics}"
    );
    // the task completes, its role is dropped: nothing of ours on the list
    let (s, done) = h
        .post(
            &h.tokens.a,
            &format!("/v1/tasks/{task}/complete"),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{done}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, ready) = h.get("", "/v1/ready").await;
    assert_eq!(ready["checks"]["provider:appdb"], "ok");
    let (_, stats) = h.get(&h.tokens.admin, "/v1/stats").await;
    assert_eq!(stats["advisories"], json!({}), "{stats}");
}
