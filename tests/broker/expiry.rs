//! Every lease dies on time (invariant 2), driven by a paused clock: the
//! broker's clock only moves when the test advances it, so nothing here
//! sleeps for a lease's TTL.

use std::time::Duration;

use reqwest::StatusCode;

use crate::harness::{Harness, Options};

fn manual() -> Options {
    Options {
        manual_clock: true,
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_when_the_clock_passes_their_deadline() {
    let h = Harness::start(manual()).await;
    let t = &h.tokens;
    let task = h.open_task(&t.a, 3600).await;
    let short = h.lease(&t.a, &task, 60).await;
    let long = h.lease(&t.a, &task, 600).await;
    let short_id = short["lease_id"].as_str().unwrap();
    let long_id = long["lease_id"].as_str().unwrap();

    h.advance(Duration::from_secs(59));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        h.lease_state(short_id).await,
        "active",
        "not a second early"
    );

    h.advance(Duration::from_secs(2));
    h.wait_state(short_id, "expired").await;
    let (_, l) = h.get(&t.admin, &format!("/v1/leases/{short_id}")).await;
    assert_eq!(l["revocation"]["cause"], "expiry");
    assert!(
        !h.introspect(short["credential"]["token"].as_str().unwrap())
            .await
    );
    assert_eq!(h.lease_state(long_id).await, "active");
    assert!(
        h.introspect(long["credential"]["token"].as_str().unwrap())
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sooner_lease_wakes_the_reaper_early() {
    let h = Harness::start(manual()).await;
    let t = &h.tokens;
    let task = h.open_task(&t.a, 3600).await;
    // the reaper now sleeps towards this lease's deadline (or its idle re-check)
    let _far = h.lease(&t.a, &task, 900).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let near = h.lease(&t.a, &task, 5).await;
    let near_id = near["lease_id"].as_str().unwrap();
    // 6 s is far below the reaper's idle re-check: only an early wake-up
    // can expire the lease now
    h.advance(Duration::from_secs(6));
    h.wait_state(near_id, "expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_never_outlive_their_task() {
    let h = Harness::start(manual()).await;
    let t = &h.tokens;
    let task = h.open_task(&t.a, 30).await;
    let l = h.lease(&t.a, &task, 600).await;
    let id = l["lease_id"].as_str().unwrap();
    h.advance(Duration::from_secs(31));
    h.wait_state(id, "expired").await;
    let (s, detail) = h.get(&t.a, &format!("/v1/tasks/{task}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(detail["state"], "expired");
    // nothing new under an expired task
    let (s, e) = h
        .post(
            &t.a,
            &format!("/v1/tasks/{task}/leases"),
            serde_json::json!({"provider": "token", "role": "demo", "ttl_seconds": 10}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("task_expired"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_leases_expiring_together_are_all_revoked() {
    let h = Harness::start(Options {
        manual_clock: true,
        // small batches: the reaper must loop, not stop after one
        tweak: Box::new(|c| c.reaper.batch_size = 16),
        ..Options::default()
    })
    .await;
    let t = &h.tokens;
    let mut ids = Vec::new();
    for _ in 0..10 {
        let task = h.open_task(&t.a, 3600).await;
        for _ in 0..10 {
            ids.push(
                h.lease(&t.a, &task, 120).await["lease_id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
    }
    h.advance(Duration::from_secs(121));
    for id in &ids {
        h.wait_state(id, "expired").await;
    }
}
