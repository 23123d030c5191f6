//! Graceful shutdown under load: SIGTERM while clients are issuing leases.
//! Every request the broker answered with success is durably recorded (a
//! restarted broker on the same store has every such lease, active), the
//! broker exits cleanly, and its last words in the chain are the stop and a
//! checkpoint over it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Child, Spawned, spawn_broker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_traffic_loses_no_answered_request() {
    let Spawned {
        dir: _dir,
        addr,
        config,
        creds,
        log,
        remote,
        mut child,
        ..
    } = spawn_broker(
        |c| {
            c.server.shutdown_grace_seconds = 5;
            c.limits.max_leases_per_task = 100_000;
            c.policy.max_active_leases_per_workload = 100_000;
        },
        "info",
        &[],
    )
    .await;
    let a = creds.identities["assistant-a"].token.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (http, a, stop) = (remote.http.clone(), a.clone(), stop.clone());
        clients.spawn(async move {
            let base = format!("http://{addr}");
            // the example policy allows 20 active leases per task: a new task every 15
            let open_task = || async {
                let task: Value = http
                    .post(format!("{base}/v1/tasks"))
                    .bearer_auth(&a)
                    .json(&json!({"purpose": "p", "on_behalf_of": "alice", "prompt": "x", "ttl_seconds": 3600}))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                Some(format!("{base}/v1/tasks/{}/leases", task["task_id"].as_str()?))
            };
            let mut url = open_task().await.unwrap();
            let (mut answered, mut refused) = (Vec::new(), 0u32);
            while !stop.load(Ordering::Relaxed) {
                if !answered.is_empty() && answered.len() % 15 == 0 {
                    match open_task().await {
                        Some(u) => url = u,
                        None => {
                            refused += 1;
                            continue;
                        }
                    }
                }
                let resp = http.post(&url).bearer_auth(&a).json(&json!({"provider": "token", "role": "demo", "ttl_seconds": 600})).send().await;
                match resp {
                    Ok(r) if r.status().as_u16() == 201 => {
                        let v: Value = r.json().await.unwrap();
                        answered.push(v["lease_id"].as_str().unwrap().to_owned());
                    }
                    // draining (503) or gone (connection refused/reset): not a success
                    Ok(r) => {
                        let status = r.status();
                        let body = r.text().await.unwrap_or_default();
                        assert!(status.is_server_error(), "unexpected {status}: {body}");
                        refused += 1;
                    }
                    Err(_) => refused += 1,
                }
            }
            (answered, refused)
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.sigterm();
    // clients keep going until the broker is gone
    let status = tokio::task::spawn_blocking(move || {
        let s = loop {
            if let Some(s) = child.child.try_wait().unwrap() {
                break s;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        (s, child)
    })
    .await
    .unwrap();
    let (exit, child) = status;
    assert!(exit.success(), "a clean exit after SIGTERM: {exit}");
    drop(child);
    stop.store(true, Ordering::Relaxed);
    let mut answered = Vec::new();
    while let Some(r) = clients.join_next().await {
        answered.extend(r.unwrap().0);
    }
    assert!(
        answered.len() > 50,
        "traffic was flowing: {} leases",
        answered.len()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("shutdown requested: not ready; draining")
            && text.contains("leasehold stopped"),
        "{text}"
    );

    // the same store, started again: every answered lease is there, active
    let mut again = Child::spawn(&config, addr, log.clone(), "info");
    again.wait_healthy(&remote.http).await;
    let admin = &creds.identities["admin"].token;
    for id in &answered {
        let v = remote.get(admin, &format!("/v1/leases/{id}")).await;
        assert_eq!(
            v["state"], "active",
            "lease {id} was answered 201 before the stop: {v}"
        );
    }
    // the chain verifies, and the stop is in it, under a checkpoint
    let v = remote.get(admin, "/v1/events/verify").await;
    assert_eq!(v["ok"], true, "{v}");
    let stops = remote.get(admin, "/v1/events?kind=broker.stopped").await;
    let stopped = stops["events"].as_array().unwrap();
    assert_eq!(stopped.len(), 1, "{stops}");
    let chain = remote.get(admin, "/v1/events/chain").await;
    let last_cp = chain["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["seq"].as_u64())
        .max()
        .unwrap();
    assert!(
        last_cp >= stopped[0]["seq"].as_u64().unwrap(),
        "the final checkpoint covers the stop: {chain}"
    );
    assert!(again.terminate().success());
}

/// With a drain delay, readiness turns false at once while requests are
/// still served, so a load balancer moves traffic away before the broker
/// stops accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_false_before_the_broker_stops_accepting() {
    let Spawned {
        dir: _dir,
        addr,
        creds,
        remote,
        mut child,
        ..
    } = spawn_broker(|c| c.server.drain_delay_seconds = 4, "info", &[]).await;
    let ready = |http: reqwest::Client| async move {
        http.get(format!("http://{addr}/v1/ready"))
            .send()
            .await
            .map(|r| r.status().as_u16())
    };
    assert_eq!(ready(remote.http.clone()).await.unwrap(), 200);
    let sent = std::time::Instant::now();
    child.sigterm();
    let mut not_ready_at = None;
    while sent.elapsed() < Duration::from_millis(1500) {
        if ready(remote.http.clone()).await.ok() == Some(503) {
            not_ready_at = Some(sent.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let not_ready_at = not_ready_at.expect("readiness turned false during the drain delay");
    // still serving real requests while not ready
    let a = &creds.identities["assistant-a"].token;
    let task = remote
        .post(
            a,
            "/v1/tasks",
            Some(
                json!({"purpose": "p", "on_behalf_of": "alice", "prompt": "x", "ttl_seconds": 60}),
            ),
        )
        .await;
    assert!(
        task["task_id"].as_str().is_some(),
        "served during the drain: {task}"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(4),
        "that was inside the delay"
    );
    let exit = tokio::task::spawn_blocking(move || child.terminate())
        .await
        .unwrap();
    assert!(exit.success());
    assert!(
        sent.elapsed() >= Duration::from_secs(4),
        "the broker kept accepting for the delay"
    );
    assert!(
        not_ready_at < Duration::from_millis(1500),
        "not ready at once: {not_ready_at:?}"
    );
}
