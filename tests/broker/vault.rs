//! The Vault provider through the broker, against a real OpenBao whose
//! database engine mints roles in a real PostgreSQL: a task's lease is
//! revoked at the upstream when the task completes, an upstream outage
//! fails issues fast (nothing active) and is waited out by revocation, and a
//! broker killed between issue and activation rolls the upstream lease back
//! on restart through the per-lease token it recorded before issuing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use leasehold::config::{Config, ProviderConfig};
use leasehold_provider_postgres::testkit::{Cluster, DATABASE, MANAGER};
use leasehold_provider_vault::testkit::Bao;
use leasehold_provider_vault::{AuthConfig, VaultConfig};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Harness, Options, permit_leases};

/// PostgreSQL with the database engine of `bao` pointed at it, and the
/// broker's token in a file under `dir`.
async fn peers(bao: &Bao, dir: &Path) -> (Cluster, PathBuf) {
    let pg = Cluster::start();
    pg.provision().await;
    let pw = std::fs::read_to_string(pg.manager_password_file()).unwrap();
    bao.database_setup("database", pg.port, MANAGER, &pw, DATABASE, "1h")
        .await;
    let token = bao.broker_setup(&["database"], "1h").await;
    let file = dir.join("bao-token");
    std::fs::write(&file, token).unwrap();
    (pg, file)
}

fn with_vault(c: &mut Config, bao: &Bao, token_file: &Path) {
    apply(c, vault_config(bao, token_file));
}

fn vault_config(bao: &Bao, token_file: &Path) -> VaultConfig {
    bao.provider_config(AuthConfig::Token {
        token_file: token_file.to_owned(),
    })
}

fn apply(c: &mut Config, vault: VaultConfig) {
    c.providers
        .insert("vault".into(), ProviderConfig::new(vault));
    permit_leases(c, "vault");
    c.reaper.retry_base_seconds = 1;
    c.reaper.retry_cap_seconds = 2;
}

async fn start(bao: &Bao, token_file: &Path) -> Harness {
    let cfg = vault_config(bao, token_file);
    Harness::start(Options {
        tweak: Box::new(move |c| apply(c, cfg.clone())),
        ..Options::default()
    })
    .await
}

async fn lease(h: &Harness, task: &str) -> (StatusCode, Value) {
    h.post(
        &h.tokens.a,
        &format!("/v1/tasks/{task}/leases"),
        json!({"provider": "vault", "role": "ro", "ttl_seconds": 600}),
    )
    .await
}

async fn login_works(pg: &Cluster, cred: &Value) -> bool {
    match pg
        .connect(
            cred["username"].as_str().unwrap(),
            cred["password"].as_str().unwrap(),
            DATABASE,
        )
        .await
    {
        Ok(c) => c.query_one("SELECT 1", &[]).await.is_ok(),
        Err(e) => {
            let code = e.code().map(|c| c.code().to_owned()).unwrap_or_default();
            assert!(
                code == "28P01" || code == "28000",
                "login failed for another reason: {e}"
            );
            false
        }
    }
}

/// The upstream's leases under the role's path (root lists them).
async fn upstream_leases(bao: &Bao) -> Vec<String> {
    let (code, v) = bao
        .api(
            Method::from_bytes(b"LIST").unwrap(),
            "sys/leases/lookup/database/creds/ro/",
            None,
        )
        .await;
    if code == 404 {
        return vec![];
    }
    assert_eq!(code, 200, "{v}");
    v["data"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completing_the_task_revokes_the_upstream_lease() {
    let bao = Bao::dev();
    let dir = tempfile::tempdir().unwrap();
    let (pg, token_file) = peers(&bao, dir.path()).await;
    let h = start(&bao, &token_file).await;
    let (s, ready) = h.get("", "/v1/ready").await;
    assert_eq!(s, StatusCode::OK, "{ready}");
    assert_eq!(ready["checks"]["provider:vault"], "ok");

    let task = h.open_task(&h.tokens.a, 3600).await;
    let (s, v) = lease(&h, &task).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["lease_id"].as_str().unwrap().to_owned();
    let cred = v["credential"].clone();
    assert!(login_works(&pg, &cred).await);
    assert_eq!(upstream_leases(&bao).await.len(), 1);
    let (_, rec) = h.get(&h.tokens.admin, &format!("/v1/leases/{id}")).await;
    assert!(
        rec["description"]
            .as_str()
            .unwrap()
            .contains("sys/leases/revoke"),
        "{rec}"
    );

    let (s, v) = h
        .post_empty(&h.tokens.a, &format!("/v1/tasks/{task}/complete"))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(h.lease_state(&id).await, "revoked");
    assert!(
        !login_works(&pg, &cred).await,
        "the credential outlived its task"
    );
    assert!(
        upstream_leases(&bao).await.is_empty(),
        "the upstream lease outlived its task"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_outage_fails_issues_fast_and_revocation_waits_it_out() {
    let mut bao = Bao::persistent().await;
    let dir = tempfile::tempdir().unwrap();
    let (pg, token_file) = peers(&bao, dir.path()).await;
    let h = start(&bao, &token_file).await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let (s, v) = lease(&h, &task).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["lease_id"].as_str().unwrap().to_owned();
    let cred = v["credential"].clone();

    bao.stop();
    let started = std::time::Instant::now();
    let (s, v) = lease(&h, &task).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // nothing active: the failed lease is rolled back, only the first is live
    let (_, list) = h.get(&h.tokens.admin, "/v1/leases?state=active").await;
    assert_eq!(list["leases"].as_array().unwrap().len(), 1, "{list}");
    let (s, ready) = h.get("", "/v1/ready").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{ready}");

    // completing the task queues the revocation; it keeps failing while down
    let (s, v) = h
        .post_empty(&h.tokens.a, &format!("/v1/tasks/{task}/complete"))
        .await;
    assert!(s.is_success() || s == StatusCode::ACCEPTED, "{s} {v}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.lease_state(&id).await, "revoking");

    // back (sealed at first), unsealed: the queue reaches the upstream
    bao.start();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        h.lease_state(&id).await,
        "revoking",
        "revoked while sealed?"
    );
    bao.unseal().await;
    for _ in 0..100 {
        if h.lease_state(&id).await == "revoked" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h.lease_state(&id).await, "revoked");
    assert!(!login_works(&pg, &cred).await);
    assert!(upstream_leases(&bao).await.is_empty());
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_issue_and_activation_rolls_the_upstream_lease_back() {
    use crate::harness::{Child, Remote, child_config, free_port, lease_until_paused};

    let bao = Bao::dev();
    let dir = tempfile::tempdir().unwrap();
    let (pg, token_file) = peers(&bao, dir.path()).await;
    let addr = free_port();
    let marker = dir.path().join("paused.json");
    let pause = marker.clone();
    let (config, creds) = child_config(dir.path(), addr, |c| {
        with_vault(c, &bao, &token_file);
        c.fault.pause_after_issue_file = Some(pause);
    });
    let remote = Remote::new(addr);
    let mut first = Child::spawn(&config, addr, dir.path().join("first.log"), "info");
    first.wait_healthy(&remote.http).await;
    let a = creds.identities["assistant-a"].token.clone();
    let body =
        json!({"purpose": "crash", "on_behalf_of": "alice", "prompt": "p", "ttl_seconds": 3600});
    let task = remote.post(&a, "/v1/tasks", Some(body)).await;
    let task_id = task["task_id"].as_str().unwrap().to_owned();
    let body = json!({"provider": "vault", "role": "ro", "ttl_seconds": 600});
    let (pending, paused) = lease_until_paused(&remote, &a, &task_id, body, &marker).await;
    let lease_id = paused["lease_id"].as_str().unwrap().to_owned();
    let orphan = paused["credential"].clone();
    assert!(login_works(&pg, &orphan).await);
    assert_eq!(upstream_leases(&bao).await.len(), 1);
    first.kill9();
    assert!(pending.await.unwrap().is_err());

    let (config, creds) = child_config(dir.path(), addr, |c| with_vault(c, &bao, &token_file));
    let mut second = Child::spawn(&config, addr, dir.path().join("second.log"), "info");
    second.wait_healthy(&remote.http).await;
    let admin = creds.identities["admin"].token.clone();
    let mut lease = Value::Null;
    for _ in 0..500 {
        lease = remote.get(&admin, &format!("/v1/leases/{lease_id}")).await;
        if lease["state"] == "rolled_back" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lease["state"], "rolled_back", "{lease}");
    assert!(
        !login_works(&pg, &orphan).await,
        "the orphaned database login still works"
    );
    assert!(
        upstream_leases(&bao).await.is_empty(),
        "the upstream lease survived the crash"
    );
    assert!(second.terminate().success());
}

/// Invariant 5 with the Vault provider, at the most verbose log level: the
/// database passwords and the broker's upstream token appear in no log line
/// and no file of the data folder. (The per-lease tokens cannot be read back
/// from the upstream, only their accessors: the test checks there is one per
/// lease, carrying the lease's metadata; they are sealed in the store like
/// every handle, which `secrets.rs` covers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_upstream_secret_in_logs_or_store_files() {
    use crate::harness::{Spawned, spawn_broker};

    let bao = Bao::dev();
    let peers_dir = tempfile::tempdir().unwrap();
    let (_pg, token_file) = peers(&bao, peers_dir.path()).await;
    let broker_token = std::fs::read_to_string(&token_file).unwrap();
    let Spawned {
        dir: _dir,
        data,
        creds,
        log,
        remote,
        mut child,
        ..
    } = spawn_broker(|c| with_vault(c, &bao, &token_file), "trace", &[]).await;
    let a = &creds.identities["assistant-a"].token;
    let body = json!({"purpose": "p", "on_behalf_of": "alice", "prompt": "p", "ttl_seconds": 600});
    let task = remote.post(a, "/v1/tasks", Some(body)).await["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut passwords = Vec::new();
    for _ in 0..3 {
        let body = json!({"provider": "vault", "role": "ro", "ttl_seconds": 300});
        let l = remote
            .post(a, &format!("/v1/tasks/{task}/leases"), Some(body))
            .await;
        passwords.push(l["credential"]["password"].as_str().unwrap().to_owned());
    }
    // the per-lease tokens, while they live, by accessor
    let mut lease_accessors = Vec::new();
    let (_, list) = bao
        .api(
            Method::from_bytes(b"LIST").unwrap(),
            "auth/token/accessors",
            None,
        )
        .await;
    for acc in list["data"]["keys"].as_array().unwrap() {
        let (_, t) = bao
            .api(
                Method::POST,
                "auth/token/lookup-accessor",
                Some(json!({"accessor": acc})),
            )
            .await;
        if t["data"]["role"] == "leasehold-lease" {
            assert_eq!(t["data"]["meta"]["leasehold_workload"], "dev:assistant-a");
            lease_accessors.push(acc.as_str().unwrap().to_owned());
        }
    }
    assert_eq!(lease_accessors.len(), 3, "one token per lease");
    remote
        .post(a, &format!("/v1/tasks/{task}/complete"), None)
        .await;
    assert!(child.terminate().success());

    let log_bytes = std::fs::read(&log).unwrap();
    assert!(String::from_utf8_lossy(&log_bytes).contains("lease issued"));
    let mut needles: Vec<(&str, String)> =
        passwords.iter().map(|p| ("password", p.clone())).collect();
    needles.push(("broker upstream token", broker_token.trim().to_owned()));
    let contains = |hay: &[u8], n: &str| hay.windows(n.len()).any(|w| w == n.as_bytes());
    for (what, n) in &needles {
        assert!(!contains(&log_bytes, n), "a {what} appears in the log");
    }
    let mut files = vec![data.clone()];
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if ["dev-credentials.json", "store.key"].contains(&name.as_str()) {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        for (what, n) in &needles {
            assert!(!contains(&bytes, n), "a {what} appears in {}", p.display());
        }
    }
}
