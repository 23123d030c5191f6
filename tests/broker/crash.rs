//! Intent before issue (invariant 1), proven with a real process: the broker
//! is SIGKILLed after the provider minted a credential and before the lease
//! was activated. The restarted broker must find the intent and roll the
//! credential back at the provider, so nothing orphaned stays usable.

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
        c.fault.pause_after_issue_file = Some(pause)
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
