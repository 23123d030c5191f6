//! The Azure provider through the broker, against the Entra token endpoint
//! (oauth2-mock-server) and the ARM/Graph stand-in: a task's role
//! assignment and application password are gone when the task completes,
//! an access token's lease says plainly that it was not revoked, a scope
//! outside the template is a 400, and Entra unreachable is a 503.

use std::path::Path;

use leasehold::config::{Config, ProviderConfig};
use leasehold_azure_standin::{self as standin, Peers};
use leasehold_provider_azure::AzureConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Harness, Options, permit_leases};

fn azure_config(p: &Peers, dir: &Path) -> AzureConfig {
    toml::from_str(&p.provider_toml(&dir.join("azure-client-secret"))).unwrap()
}

async fn broker(p: &Peers, dir: &Path) -> Harness {
    let cfg = azure_config(p, dir);
    Harness::start(Options {
        tweak: Box::new(move |c: &mut Config| {
            c.providers
                .insert("azure".into(), ProviderConfig::new(cfg.clone()));
            permit_leases(c, "azure");
        }),
        ..Options::default()
    })
    .await
}

async fn lease(h: &Harness, task: &str, role: &str, scope: Value) -> (StatusCode, Value) {
    h.post(
        &h.tokens.a,
        &format!("/v1/tasks/{task}/leases"),
        json!({"provider": "azure", "role": role, "ttl_seconds": 900, "scope": scope}),
    )
    .await
}

fn revoked_by(story: &Value) -> Vec<Value> {
    story["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "lease.revoked")
        .map(|e| e["data"]["revoked_by"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completing_the_task_takes_back_the_assignment_and_the_password() {
    let peers = Peers::start().await;
    let dir = tempfile::tempdir().unwrap();
    let h = broker(&peers, dir.path()).await;
    let (s, ready) = h.get("", "/v1/ready").await;
    assert_eq!(s, StatusCode::OK, "{ready}");

    let task = h.open_task(&h.tokens.a, 3600).await;
    for scope in [json!(["rg-other"]), json!([]), json!(["rg-team-a/../x"])] {
        let (s, v) = lease(&h, &task, "reader", scope.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{scope}: {v}");
    }
    let (s, ra) = lease(&h, &task, "reader", json!(["rg-team-blue"])).await;
    assert_eq!(s, StatusCode::CREATED, "{ra}");
    let rg = peers.resource_group("rg-team-blue");
    assert_eq!(ra["credential"]["scope"], rg.as_str(), "{ra}");
    assert_eq!(
        ra["credential"]["principal_id"],
        peers.workloads[0].object_id.as_str()
    );
    let (s, pw) = lease(&h, &task, "app", json!([])).await;
    assert_eq!(s, StatusCode::CREATED, "{pw}");
    let secret = pw["credential"]["client_secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let client = pw["credential"]["client_id"].as_str().unwrap().to_owned();
    assert!(
        peers
            .login(&client, &secret, "https://graph.microsoft.com/.default")
            .await
            .is_ok()
    );
    assert_eq!(
        peers.assignments().len(),
        2,
        "the broker's own and the lease's"
    );
    let (_, all) = h.get(&h.tokens.admin, "/v1/leases?provider=azure").await;
    assert_eq!(all["leases"].as_array().unwrap().len(), 2, "{all}");

    let (s, v) = h
        .post_empty(&h.tokens.a, &format!("/v1/tasks/{task}/complete"))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for l in [&ra, &pw] {
        assert_eq!(
            h.lease_state(l["lease_id"].as_str().unwrap()).await,
            "revoked"
        );
    }
    assert_eq!(peers.assignments().len(), 1, "{:?}", peers.assignments());
    assert!(peers.passwords().is_empty());
    let e = peers
        .login(&client, &secret, "https://graph.microsoft.com/.default")
        .await
        .unwrap_err();
    assert_eq!(e.0, 401, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_token_lease_says_it_was_not_revoked() {
    let peers = Peers::start().await;
    let dir = tempfile::tempdir().unwrap();
    let h = broker(&peers, dir.path()).await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let (s, v) = lease(&h, &task, "storage", json!([])).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["lease_id"].as_str().unwrap().to_owned();
    let token = v["credential"]["access_token"].as_str().unwrap().to_owned();
    let (_, rec) = h.get(&h.tokens.admin, &format!("/v1/leases/{id}")).await;
    assert!(
        rec["description"]
            .as_str()
            .unwrap()
            .contains("cannot be revoked"),
        "{rec}"
    );
    let (s, _) = h
        .post_empty(&h.tokens.a, &format!("/v1/tasks/{task}/complete"))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, story) = h
        .get(&h.tokens.admin, &format!("/v1/events?lease={id}"))
        .await;
    let notes = revoked_by(&story);
    assert_eq!(notes.len(), 1, "{story}");
    assert!(
        notes[0]
            .as_str()
            .unwrap()
            .starts_with("expiry only (an Azure access token cannot be revoked"),
        "{story}"
    );
    // and it is true: the token still works
    assert!(peers.storage_accepts(&token).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_unreachable_is_not_ready_and_a_503_until_it_is_back() {
    let mut peers = Peers::start().await;
    peers.stop_token_endpoint();
    let dir = tempfile::tempdir().unwrap();
    let h = broker(&peers, dir.path()).await;
    let (s, ready) = h.get("", "/v1/ready").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_eq!(ready["checks"]["provider:azure"], "unavailable", "{ready}");

    let task = h.open_task(&h.tokens.a, 3600).await;
    let (s, v) = lease(&h, &task, "app", json!([])).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "provider_unavailable", "{v}");
    assert!(peers.passwords().is_empty());

    peers.restart_token_endpoint().await;
    let (s, v) = lease(&h, &task, "app", json!([])).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(peers.passwords().len(), 1);
}

/// Invariant 5 for Azure, at the most verbose log level (azure_identity,
/// reqwest and hyper included): the leased password, the leased access
/// token and the broker's own client secret appear in no log line and in no
/// file of the data folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_azure_secret_in_logs_or_store_files() {
    use crate::harness::{Spawned, spawn_broker};
    use crate::secrets::{contains, files_under};

    let peers = Peers::start().await;
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = azure_config(&peers, cfg_dir.path());
    let Spawned {
        dir: _dir,
        data,
        creds,
        log,
        remote,
        mut child,
        ..
    } = spawn_broker(
        move |c| {
            c.providers.insert("azure".into(), ProviderConfig::new(cfg));
            permit_leases(c, "azure");
        },
        "trace",
        &[],
    )
    .await;
    let a = &creds.identities["assistant-a"].token;
    let body = json!({"purpose": "p", "on_behalf_of": "alice", "prompt": "x", "ttl_seconds": 600});
    let task = remote.post(a, "/v1/tasks", Some(body)).await["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!("/v1/tasks/{task}/leases");
    let mut secrets = vec![("broker client secret", peers.broker.secret.clone())];
    for (role, field) in [("app", "client_secret"), ("storage", "access_token")] {
        let body = json!({"provider": "azure", "role": role, "ttl_seconds": 300});
        let l = remote.post(a, &url, Some(body)).await;
        let v = l["credential"][field]
            .as_str()
            .unwrap_or_else(|| panic!("{l}"));
        secrets.push((field, v.to_owned()));
    }
    let done = remote
        .post(a, &format!("/v1/tasks/{task}/complete"), None)
        .await;
    assert_eq!(done["state"], "completed", "{done}");
    assert!(child.terminate().success());

    let log_bytes = std::fs::read(&log).unwrap();
    let text = String::from_utf8_lossy(&log_bytes);
    assert!(
        text.contains("lease issued") && text.contains("TRACE"),
        "the log must be verbose enough to matter"
    );
    for (what, s) in &secrets {
        assert!(
            !contains(&log_bytes, s.as_bytes()),
            "the {what} appears in the log"
        );
        for f in files_under(&data) {
            let bytes = std::fs::read(&f).unwrap();
            assert!(
                !contains(&bytes, s.as_bytes()),
                "the {what} appears in {}",
                f.display()
            );
        }
    }
}

/// Role assignments never expire on their own: reconciliation finds a
/// marked one no live lease accounts for (a store restored from an old
/// backup, say) and removes it, and leaves everything else alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_removes_a_marked_assignment_no_lease_accounts_for() {
    let peers = Peers::start().await;
    let dir = tempfile::tempdir().unwrap();
    let h = broker(&peers, dir.path()).await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let (s, live) = lease(&h, &task, "reader", json!(["rg-team-live"])).await;
    assert_eq!(s, StatusCode::CREATED, "{live}");
    let rg = peers.resource_group("rg-team-lost");
    let orphan = "4c1d2e3f-5a6b-4c7d-8e9f-0a1b2c3d4e5f";
    peers.assign_described(
        &rg,
        orphan,
        &peers.role_definition(standin::READER),
        &peers.workloads[0].object_id,
        "leasehold lease lease_01m8zzzzzzzzzzzzzzzzzzzzzz; task t",
    );
    let (s, report) = h
        .post(
            &h.tokens.admin,
            "/v1/providers/azure/reconcile",
            json!({"drop": true}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{report}");
    assert_eq!(report["found"], 2, "{report}");
    assert_eq!(report["accounted"], 1, "{report}");
    let orphans = report["orphans"].as_array().unwrap();
    assert_eq!(orphans.len(), 1, "{report}");
    assert!(
        orphans[0]["name"].as_str().unwrap().ends_with(orphan),
        "{report}"
    );
    assert_eq!(orphans[0]["removed"], true, "{report}");
    let left: Vec<String> = peers.assignments().into_iter().map(|a| a.1).collect();
    assert!(!left.contains(&orphan.to_owned()), "{left:?}");
    assert_eq!(
        left.len(),
        2,
        "the broker's grant and the live lease's: {left:?}"
    );
}
