//! Provider plugins through the broker: the MariaDB plugin (Rust, the kit)
//! and the accounts plugin (Python, grpcio) pass `leasehold providers
//! conformance`; a task's lifecycle through a plugin ends with the database
//! user gone; a plugin that hangs, answers garbage, or answers for another
//! lease makes its provider unready or its lease fail, never the broker; a
//! plugin killed while revocations are due is restarted and the durable
//! queue finishes them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use leasehold::config::ProviderConfig;
use leasehold_plugin::PluginConfig;
use leasehold_provider_mysql::testkit::Server;
use mysql_async::prelude::Queryable;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Harness, Options, child_config, permit_leases};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn sha256(path: &Path) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, &std::fs::read(path).unwrap());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// `leasehold-plugin-mysql` of this build (next to the test binary's
/// folder: `cargo nextest run --workspace` builds it).
fn mysql_plugin_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("leasehold-plugin-mysql");
    assert!(
        bin.is_file(),
        "{} not built: run the tests with --workspace, or `cargo build -p leasehold-provider-mysql`",
        bin.display()
    );
    bin
}

fn mysql_catalog(server: &Server) -> PluginConfig {
    let command = mysql_plugin_bin();
    PluginConfig {
        sha256: sha256(&command),
        command,
        args: Vec::new(),
        env: Default::default(),
        timeout_seconds: 10,
        config: toml::Table::try_from(server.provider_config()).unwrap(),
    }
}

/// The Python plugin with its account table in `dir`, behaving unless
/// `misbehave` says how not to.
fn python_catalog(dir: &Path, misbehave: Option<&str>) -> PluginConfig {
    let venv_bin = std::env::var("LEASEHOLD_PLUGIN_PYTHON_PATH").unwrap_or_else(|_| {
        panic!(
            "LEASEHOLD_PLUGIN_PYTHON_PATH is not set: it is the bin folder of a Python with grpcio and \
             grpcio-tools (integration/test.sh installs them into integration/.venv and sets it)"
        )
    });
    let command = repo("integration/plugin-python/leasehold_accounts_plugin.py");
    let mut args = vec![
        "--proto".to_owned(),
        repo("providers/plugin/proto").display().to_string(),
    ];
    if let Some(m) = misbehave {
        args.extend(["--misbehave".to_owned(), m.to_owned()]);
    }
    let config: toml::Table = toml::from_str(&format!(
        "database = {:?}\n[roles.analyst]\nmax_ttl_seconds = 900\nscopes = [\"sales\", \"support\"]\n[roles.ops]\nmax_ttl_seconds = 300\n",
        dir.join("accounts.sqlite").display().to_string()
    ))
    .unwrap();
    PluginConfig {
        sha256: sha256(&command),
        command,
        args,
        env: [("PATH".to_owned(), format!("{venv_bin}:/usr/bin:/bin"))].into(),
        timeout_seconds: 5,
        config,
    }
}

async fn start(name: &'static str, catalog: PluginConfig) -> Harness {
    Harness::start(Options {
        manual_clock: false,
        tweak: Box::new(move |c| {
            c.providers
                .insert(name.into(), ProviderConfig::new(catalog.clone()));
            permit_leases(c, name);
            c.reaper.retry_base_seconds = 1;
            c.reaper.retry_cap_seconds = 1;
        }),
        ..Options::default()
    })
    .await
}

async fn lease(h: &Harness, task: &str, provider: &str, role: &str) -> (StatusCode, Value) {
    h.post(
        &h.tokens.a,
        &format!("/v1/tasks/{task}/leases"),
        json!({"provider": provider, "role": role, "ttl_seconds": 300}),
    )
    .await
}

async fn wait_ready(h: &Harness, check: &str) -> Value {
    for _ in 0..100 {
        let (s, v) = h.get("", "/v1/ready").await;
        if s == StatusCode::OK && v["checks"][check] == "ok" {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "{check} never became ready: {:?}",
        h.get("", "/v1/ready").await
    );
}

/// `leasehold providers conformance` against `catalog`, as a platform team
/// runs it: its output and exit status.
fn conformance_cli(dir: &Path, name: &str, catalog: PluginConfig) -> (bool, String) {
    let (config, _) = child_config(dir, crate::harness::free_port(), |c| {
        c.providers
            .insert(name.into(), ProviderConfig::new(catalog));
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["providers", "conformance", "--config"])
        .arg(&config)
        .arg(name)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_plugin_passes_the_conformance_command() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = python_catalog(dir.path(), None);
    let (ok, out) = tokio::task::spawn_blocking({
        let d = dir.path().to_owned();
        move || conformance_cli(&d, "accounts", catalog)
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    for role in ["analyst", "ops"] {
        assert!(out.contains(&format!("role `{role}`")), "{out}");
    }
    for step in leasehold_provider::conformance::STEPS {
        assert_eq!(
            out.matches(&format!("passed   {step}")).count(),
            2,
            "{step}: {out}"
        );
    }
    assert!(out.contains("2 passed, 0 failed"), "{out}");

    // and a plugin that breaks a promise fails it, naming the step
    let catalog = python_catalog(dir.path(), Some("wrong-lease-id"));
    let (ok, out) = tokio::task::spawn_blocking({
        let d = dir.path().to_owned();
        move || conformance_cli(&d, "accounts", catalog)
    })
    .await
    .unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("FAILED   issue_and_use"), "{out}");
    assert!(out.contains("when asked for"), "{out}");
    assert!(out.contains("not run  revoke_many"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mariadb_plugin_passes_the_conformance_command() {
    let server = tokio::task::spawn_blocking(Server::start).await.unwrap();
    server.provision().await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = mysql_catalog(&server);
    let (ok, out) = tokio::task::spawn_blocking({
        let d = dir.path().to_owned();
        move || conformance_cli(&d, "mariadb", catalog)
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("2 passed, 0 failed"), "{out}");
    assert!(
        server.users("lh_").await.is_empty(),
        "the suite leaves nothing behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_through_the_mariadb_plugin_ends_with_the_user_gone() {
    let server = tokio::task::spawn_blocking(Server::start).await.unwrap();
    server.provision().await;
    let h = start("mariadb", mysql_catalog(&server)).await;
    wait_ready(&h, "provider:mariadb").await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let (s, l) = h
        .post(
            &h.tokens.a,
            &format!("/v1/tasks/{task}/leases"),
            json!({"provider": "mariadb", "role": "reader", "ttl_seconds": 300, "scope": ["reports"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{l}");
    let cred = &l["credential"];
    let user = cred["username"].as_str().unwrap();
    assert_eq!(user, format!("lh_{}", l["lease_id"].as_str().unwrap()));
    let opts =
        leasehold_provider_mysql::testkit::login(&server, user, cred["password"].as_str().unwrap());
    let mut session = mysql_async::Conn::new(opts.clone()).await.unwrap();
    let n: Option<u64> = session
        .query_first("SELECT COUNT(*) FROM reports.items")
        .await
        .unwrap();
    assert_eq!(n, Some(1));
    // a scope outside the template: 400 from the plugin's check, nothing recorded
    let before = h.snapshot().await;
    let (s, v) = h
        .post(
            &h.tokens.a,
            &format!("/v1/tasks/{task}/leases"),
            json!({"provider": "mariadb", "role": "reader", "ttl_seconds": 300, "scope": ["mysql"]}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("scope_not_allowed")),
        "{v}"
    );
    assert_eq!(h.snapshot().await, before);

    let (s, done) = h
        .post_empty(&h.tokens.a, &format!("/v1/tasks/{task}/complete"))
        .await;
    assert_eq!(s, StatusCode::OK, "{done}");
    assert!(
        session.query_drop("SELECT 1").await.is_err(),
        "the open session is gone"
    );
    assert!(server.users("lh_").await.is_empty(), "the user is dropped");
    assert!(
        mysql_async::Conn::new(opts).await.is_err(),
        "the password is refused"
    );
    assert_eq!(
        h.lease_state(l["lease_id"].as_str().unwrap()).await,
        "revoked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_plugin_is_restarted_and_its_revocations_finish_from_the_queue() {
    let server = tokio::task::spawn_blocking(Server::start).await.unwrap();
    server.provision().await;
    let h = start("mariadb", mysql_catalog(&server)).await;
    wait_ready(&h, "provider:mariadb").await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        let (s, l) = lease(&h, &task, "mariadb", "writer").await;
        assert_eq!(s, StatusCode::CREATED, "{l}");
        ids.push(l["lease_id"].as_str().unwrap().to_owned());
    }
    // the plugin dies; the task completes while it is down
    let pid = plugin_pid(&server, "leasehold-plugin-mysql");
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let (s, done) = h
        .post_empty(&h.tokens.a, &format!("/v1/tasks/{task}/complete"))
        .await;
    assert_eq!(s, StatusCode::OK, "{done}");
    for id in &ids {
        h.wait_state(id, "revoked").await;
    }
    assert!(server.users("lh_").await.is_empty(), "every user is gone");
    assert_ne!(
        plugin_pid(&server, "leasehold-plugin-mysql"),
        pid,
        "a new plugin process"
    );
    // and the broker kept serving the other provider throughout
    assert_eq!(h.get("", "/v1/health").await.0, StatusCode::OK);
}

/// The PID of the plugin process serving the MariaDB at `server` (the
/// management user's session list knows its peers; simpler: pgrep by name
/// among this process's children).
fn plugin_pid(_server: &Server, name: &str) -> u32 {
    let me = std::process::id().to_string();
    let out = std::process::Command::new("pgrep")
        .args(["-P", &me, "-f", name])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<u32> = text
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 1, "one `{name}` child: {pids:?}");
    pids[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_never_answers_makes_its_provider_unready_not_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    for misbehave in ["hang-handshake", "garbage"] {
        let h = start("accounts", python_catalog(dir.path(), Some(misbehave))).await;
        // the broker is up at once: the plugin starts in the background
        assert_eq!(h.get("", "/v1/health").await.0, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (s, ready) = h.get("", "/v1/ready").await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{misbehave}: {ready}");
        assert_eq!(
            ready["checks"]["provider:accounts"], "unavailable",
            "{ready}"
        );
        assert_eq!(ready["checks"]["provider:token"], "ok", "{ready}");
        let task = h.open_task(&h.tokens.a, 3600).await;
        let t = std::time::Instant::now();
        let (s, v) = lease(&h, &task, "accounts", "ops").await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{misbehave}: {v}");
        assert!(t.elapsed() < Duration::from_secs(7), "{:?}", t.elapsed());
        assert_eq!(v["error"]["code"], "provider_unavailable", "{v}");
        // the token provider still leases
        let (s, v) = lease(&h, &task, "token", "demo").await;
        assert_eq!(s, StatusCode::CREATED, "{misbehave}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_for_another_lease_or_none_at_all_fails_that_lease_only() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(
        "accounts",
        python_catalog(dir.path(), Some("wrong-lease-id")),
    )
    .await;
    wait_ready(&h, "provider:accounts").await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let (s, v) = lease(&h, &task, "accounts", "ops").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_GATEWAY, Some("provider_error")),
        "{v}"
    );
    let accounts = account_count(&dir.path().join("accounts.sqlite"));
    assert_eq!(
        accounts, 0,
        "what the plugin made for the other lease was revoked"
    );
    drop(h);

    let h = start("accounts", python_catalog(dir.path(), Some("hang-issue"))).await;
    wait_ready(&h, "provider:accounts").await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let t = std::time::Instant::now();
    let (s, v) = lease(&h, &task, "accounts", "ops").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("provider_unavailable")
        ),
        "{v}"
    );
    // bounded by the plugin's timeout (5 s), not the broker's
    assert!(
        (Duration::from_secs(5)..Duration::from_secs(12)).contains(&t.elapsed()),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(h.get("", "/v1/health").await.0, StatusCode::OK);
}

/// Rows in the Python plugin's account table (read with the sqlite3 CLI of
/// the plugin's Python, so the test needs no SQLite binding).
fn account_count(db: &Path) -> usize {
    let venv_bin = std::env::var("LEASEHOLD_PLUGIN_PYTHON_PATH").unwrap();
    let out = std::process::Command::new(format!("{venv_bin}/python3"))
        .args([
            "-c",
            "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('SELECT count(*) FROM accounts').fetchone()[0])",
        ])
        .arg(db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_validate_starts_the_plugin_and_refuses_a_wrong_digest() {
    let server = tokio::task::spawn_blocking(Server::start).await.unwrap();
    server.provision().await;
    let dir = tempfile::tempdir().unwrap();
    let entry = mysql_catalog(&server);
    let (path, _) = child_config(dir.path(), crate::harness::free_port(), {
        let entry = entry.clone();
        move |c| {
            c.providers
                .insert("mariadb".into(), ProviderConfig::new(entry));
        }
    });
    let validate = |path: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
            .args(["config", "validate"])
            .arg(path)
            .output()
            .unwrap()
    };
    let out = tokio::task::block_in_place(|| validate(&path));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("speaks protocol 1") && text.contains("healthy"),
        "{text}"
    );

    let bad = dir.path().join("bad.toml");
    let wrong = "ab".repeat(32);
    std::fs::write(
        &bad,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace(&entry.sha256, &wrong),
    )
    .unwrap();
    let out = tokio::task::block_in_place(|| validate(&bad));
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "a wrong digest was accepted");
    assert!(text.contains("providers.mariadb.command"), "{text}");
    assert!(
        text.contains(&entry.sha256) && text.contains(&wrong),
        "both digests: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_through_the_plugin_finds_and_drops_users_no_lease_accounts_for() {
    let server = tokio::task::spawn_blocking(Server::start).await.unwrap();
    server.provision().await;
    let h = start("mariadb", mysql_catalog(&server)).await;
    wait_ready(&h, "provider:mariadb").await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let (s, live) = lease(&h, &task, "mariadb", "writer").await;
    assert_eq!(s, StatusCode::CREATED, "{live}");
    let live_user = live["credential"]["username"].as_str().unwrap().to_owned();
    // behind the broker's back: a prefixed user no lease accounts for, and one without the prefix
    let mut root = server.root().await;
    root.query_drop("CREATE USER 'lh_lease_00000000000000000000000000'@'%' IDENTIFIED BY 'x'")
        .await
        .unwrap();
    root.query_drop("CREATE USER 'not_ours'@'%' IDENTIFIED BY 'x'")
        .await
        .unwrap();

    let (s, report) = h
        .post(
            &h.tokens.admin,
            "/v1/providers/mariadb/reconcile",
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{report}");
    assert_eq!(
        (report["found"].as_u64(), report["accounted"].as_u64()),
        (Some(2), Some(1)),
        "{report}"
    );
    let orphans = report["orphans"].as_array().unwrap();
    assert_eq!(orphans.len(), 1, "{report}");
    assert_eq!(
        orphans[0]["name"], "'lh_lease_00000000000000000000000000'@'%'",
        "{report}"
    );
    assert_eq!(
        orphans[0]["reason"], "no such lease in the store",
        "{report}"
    );
    assert_eq!(
        server.users("lh_lease_0000").await.len(),
        1,
        "a report drops nothing"
    );

    let (s, report) = h
        .post(
            &h.tokens.admin,
            "/v1/providers/mariadb/reconcile",
            json!({"drop": true}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{report}");
    assert_eq!(report["orphans"][0]["removed"], true, "{report}");
    assert!(server.users("lh_lease_0000").await.is_empty(), "{report}");
    assert_eq!(
        server.users(&live_user).await.len(),
        1,
        "the live lease's user stays"
    );
    assert_eq!(
        server.users("not_ours").await.len(),
        1,
        "unmarked users are never touched"
    );
}
