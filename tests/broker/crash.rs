//! Intent before issue (invariant 1), proven with a real process: the broker
//! is SIGKILLed after the provider minted a credential and before the lease
//! was activated. The restarted broker must find the intent and roll the
//! credential back at the provider, so nothing orphaned stays usable.
//!
//! And group commit's promise, with the same kind of kill: every write the
//! broker answered is there after the restart, from its write-ahead log.

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_intent_and_activation_rolls_back() {
    use std::time::Duration;

    use serde_json::{Value, json};

    use crate::harness::{Child, Remote, child_config, free_port, lease_until_paused};

    let dir = tempfile::tempdir().unwrap();
    let addr = free_port();
    let marker = dir.path().join("paused.json");
    let pause = marker.clone();
    let (config, creds) = child_config(dir.path(), addr, move |c| {
        c.fault.pause_after_issue_file = Some(pause);
        // the intent is then only in the write-ahead log when the kill comes
        c.fault.no_checkpoints = true;
    });
    let remote = Remote::new(addr);
    let http = remote.http.clone();
    let mut first = Child::spawn(&config, addr, dir.path().join("first.log"), "info");
    first.wait_healthy(&http).await;
    let a = creds.identities["assistant-a"].token.clone();
    let body =
        json!({"purpose": "crash", "on_behalf_of": "alice", "prompt": "p", "ttl_seconds": 3600});
    let task = remote.post(&a, "/v1/tasks", Some(body)).await;
    let task_id = task["task_id"].as_str().unwrap().to_owned();

    // this request will never be answered: the broker hangs after issuing
    let body = json!({"provider": "token", "role": "demo", "ttl_seconds": 600});
    let (pending, paused) = lease_until_paused(&remote, &a, &task_id, body, &marker).await;
    let lease_id = paused["lease_id"].as_str().unwrap().to_owned();
    let orphan = paused["credential"]["token"].as_str().unwrap().to_owned();

    first.kill9();
    assert!(
        pending.await.unwrap().is_err(),
        "the client never got the credential"
    );

    // restart on the same store, without the fault
    let (config, creds) = child_config(dir.path(), addr, |_| {});
    let mut second = Child::spawn(&config, addr, dir.path().join("second.log"), "info");
    second.wait_healthy(&http).await;
    let admin = creds.identities["admin"].token.clone();
    let resource = creds.identities["resource-server"].token.clone();
    let mut lease = Value::Null;
    for _ in 0..500 {
        lease = remote.get(&admin, &format!("/v1/leases/{lease_id}")).await;
        if lease["state"] == "rolled_back" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(lease["state"], "rolled_back", "{lease}");
    assert_eq!(lease["revocation"]["cause"], "recovery");
    // the orphaned token has not expired, yet the provider says it is dead
    assert!(
        !remote.active(&resource, &orphan).await,
        "the orphaned credential is still usable"
    );
    let story = remote
        .get(&admin, &format!("/v1/events?lease={lease_id}"))
        .await;
    let kinds: Vec<&str> = story["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["call.decided", "lease.issuing", "lease.rolled_back"],
        "the chain tells the crash story"
    );
    assert_eq!(story["events"][2]["data"]["cause"], "recovery");
    let log = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    assert!(log.contains("rolling it back"), "{log}");
    assert!(second.terminate().success());
}

#[cfg(not(feature = "fault-injection"))]
#[test]
fn sigkill_between_intent_and_activation_rolls_back() {
    panic!(
        "this test needs the `fault-injection` feature to pause the broker between issue and \
         activation: run `integration/test.sh`, or `cargo nextest run --workspace --features \
         leasehold/fault-injection`"
    );
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_write() {
    use serde_json::{Value, json};

    use crate::harness::{Child, Remote, child_config, free_port};

    let dir = tempfile::tempdir().unwrap();
    let addr = free_port();
    let (config, creds) = child_config(dir.path(), addr, |c| c.fault.no_checkpoints = true);
    let remote = std::sync::Arc::new(Remote::new(addr));
    let mut first = Child::spawn(&config, addr, dir.path().join("first.log"), "info");
    first.wait_healthy(&remote.http).await;
    let tokens = [
        creds.identities["assistant-a"].token.clone(),
        creds.identities["assistant-b"].token.clone(),
    ];
    // eight clients at once, so batches carry several operations
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8usize {
        let (remote, token) = (remote.clone(), tokens[i % 2].clone());
        set.spawn(async move {
            let mut seen = Vec::new();
            for j in 0..5usize {
                let body = json!({"purpose": "crash", "on_behalf_of": "alice", "prompt": "p", "ttl_seconds": 3600});
                let task = remote.post(&token, "/v1/tasks", Some(body)).await;
                let task_id = task["task_id"].as_str().unwrap().to_owned();
                let body = json!({"provider": "token", "role": "demo", "ttl_seconds": 600});
                let lease = remote
                    .post(&token, &format!("/v1/tasks/{task_id}/leases"), Some(body))
                    .await;
                let id = lease["lease_id"].as_str().unwrap().to_owned();
                let state = if j % 2 == 0 {
                    let done = remote
                        .post(&token, &format!("/v1/tasks/{task_id}/complete"), None)
                        .await;
                    assert_eq!(done["state"], "completed", "{done}");
                    "revoked"
                } else {
                    "active"
                };
                seen.push((id, state, lease["expires_at"].clone()));
            }
            seen
        });
    }
    let mut acknowledged = Vec::new();
    while let Some(r) = set.join_next().await {
        acknowledged.extend(r.unwrap());
    }
    let admin = creds.identities["admin"].token.clone();
    let stats = remote.get(&admin, "/v1/stats").await;
    assert_eq!(stats["store"]["checkpoints"], 0, "{stats}");
    assert!(stats["store"]["commits"].as_u64().unwrap() > 0, "{stats}");
    let before = remote.get(&admin, "/v1/events/verify").await;
    let last = before["last_seq"].as_u64().unwrap();
    let event_at = |last: u64| format!("/v1/events?after={}&limit=1", last - 1);
    let last_event = remote.get(&admin, &event_at(last)).await;
    first.kill9();

    let (config, creds) = child_config(dir.path(), addr, |_| {});
    let mut second = Child::spawn(&config, addr, dir.path().join("second.log"), "info");
    second.wait_healthy(&remote.http).await;
    let admin = creds.identities["admin"].token.clone();
    for (id, state, expires_at) in &acknowledged {
        let lease: Value = remote.get(&admin, &format!("/v1/leases/{id}")).await;
        assert_eq!(lease["state"], *state, "{lease}");
        assert_eq!(lease["expires_at"], *expires_at, "{lease}");
    }
    let verify = remote.get(&admin, "/v1/events/verify").await;
    assert_eq!(verify["ok"], true, "{verify}");
    assert!(
        verify["last_seq"].as_u64().unwrap() >= last,
        "{before} {verify}"
    );
    assert_eq!(
        remote.get(&admin, &event_at(last)).await["events"][0],
        last_event["events"][0],
        "the last event before the kill survived unchanged"
    );
    assert_eq!(last_event["events"][0]["seq"], last, "{last_event}");
    let log = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    assert!(
        log.contains("store recovered from its write-ahead log"),
        "{log}"
    );
    assert!(second.terminate().success());
}

#[cfg(not(feature = "fault-injection"))]
#[test]
fn sigkill_loses_no_acknowledged_write() {
    panic!(
        "this test needs the `fault-injection` feature to turn checkpoints off: run \
         `integration/test.sh`, or `cargo nextest run --workspace --features leasehold/fault-injection`"
    );
}
