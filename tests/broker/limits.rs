//! Rate limits, load shedding and slow clients: a workload over its rate
//! gets 429 with Retry-After while others carry on; a token-guessing flood
//! from one address is refused before its tokens are looked at, without
//! touching an honest caller at another address; requests beyond the cap
//! in flight get 503; a client that never finishes its body is cut off.
//! Nothing answers 5xx but the shedding, and nothing is lost.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::harness::{Flaky, Harness};
use crate::incident::start;

fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_over_its_rate_gets_429_and_others_carry_on() {
    let h = start(Arc::new(Flaky::default()), |c| {
        c.server.rate_limits.per_workload_per_second = 2.0;
        c.server.rate_limits.per_workload_burst = 10.0;
    })
    .await;
    let task = h.open_task(&h.tokens.a, 600).await; // 1 of 10
    let url = h.url(&format!("/v1/tasks/{task}/leases"));
    let started = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (http, url, a) = (h.http.clone(), url.clone(), h.tokens.a.clone());
        set.spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(a)
                .json(&json!({"provider": "flaky", "role": "r", "ttl_seconds": 60}))
                .send()
                .await
                .unwrap();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            let status = r.status();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, retry, body)
        });
    }
    let (mut ok, mut limited) = (0, 0);
    while let Some(r) = set.join_next().await {
        let (status, retry, body) = r.unwrap();
        match status {
            StatusCode::CREATED => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1;
                assert_eq!(body["error"]["code"], "rate_limited");
                assert!(
                    retry.is_some_and(|s| (1..=2).contains(&s)),
                    "Retry-After: {retry:?}"
                );
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    // the burst (10, less the task) and what refilled at 2/s while the flood lasted
    let refill = (started.elapsed().as_secs_f64() * 2.0).ceil() as usize;
    assert!(
        (9..=10 + refill).contains(&ok),
        "the burst passes, the rest waits: {ok} created"
    );
    assert_eq!(ok + limited, 200);
    // what was answered 201 is exactly what the broker holds
    assert_eq!(
        h.snapshot()
            .await
            .iter()
            .filter(|(_, s)| s == "active")
            .count(),
        ok
    );
    // another workload is not affected
    let (s, _) = h.post(&h.tokens.b, "/v1/tasks", json!({"purpose": "p", "on_behalf_of": "bob@example.com", "prompt": "x", "ttl_seconds": 60})).await;
    assert_eq!(s, StatusCode::CREATED);
    // and the limited one gets through again after waiting
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, v) = h
        .post(
            &h.tokens.a,
            &format!("/v1/tasks/{task}/leases"),
            json!({"provider": "flaky", "role": "r", "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guessing_flood_is_refused_early_and_spares_other_addresses() {
    let h = start(Arc::new(Flaky::default()), |c| {
        c.server.rate_limits.auth_failures_per_second = 1.0;
        c.server.rate_limits.auth_failures_burst = 5.0;
    })
    .await;
    let attacker = client_from("127.0.0.1");
    let honest = client_from("127.0.0.2");
    let mut codes = Vec::new();
    let started = std::time::Instant::now();
    for i in 0..50 {
        let r = attacker
            .post(h.url("/v1/tasks"))
            .bearer_auth(format!("guess-{i}"))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        codes.push(r.status());
    }
    // the burst of 5 (and what refilled at 1/s meanwhile) is verified and refused
    let refill = started.elapsed().as_secs_f64().ceil() as usize;
    let verified = codes
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    assert!((5..=5 + refill).contains(&verified), "{codes:?}");
    assert_eq!(
        codes
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count(),
        50 - verified
    );
    // from the flooding address even a valid token waits (its tokens are not looked at)
    let r = attacker
        .get(h.url("/v1/stats"))
        .bearer_auth(&h.tokens.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "auth_rate_limited");
    // an honest caller at another address is untouched
    let r = honest
        .post(h.url("/v1/tasks"))
        .bearer_auth(&h.tokens.a)
        .json(&json!({"purpose": "p", "on_behalf_of": "alice@example.com", "prompt": "x", "ttl_seconds": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // the denials were recorded, rate-limited in the log, never more than the verified ones
    let ev: serde_json::Value = honest
        .get(h.url("/v1/events?kind=auth.denied"))
        .bearer_auth(&h.tokens.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(ev["events"].as_array().unwrap().len() <= verified, "{ev}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_cap_in_flight_are_shed_with_503() {
    let flaky = Arc::new(Flaky::default());
    let h = start(flaky.clone(), |c| c.server.rate_limits.max_in_flight = 2).await;
    let task = h.open_task(&h.tokens.a, 600).await;
    flaky.hold_issue.store(true, Ordering::SeqCst);
    let mut held = Vec::new();
    for _ in 0..2 {
        let (http, url, a) = (
            h.http.clone(),
            h.url(&format!("/v1/tasks/{task}/leases")),
            h.tokens.a.clone(),
        );
        held.push(tokio::spawn(async move {
            http.post(url)
                .bearer_auth(a)
                .json(&json!({"provider": "flaky", "role": "r", "ttl_seconds": 60}))
                .send()
                .await
                .unwrap()
                .status()
        }));
        flaky.entered.notified().await;
    }
    let r = h
        .http
        .get(h.url("/v1/stats"))
        .bearer_auth(&h.tokens.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    // probes still answer: a shedding broker is alive
    assert_eq!(
        h.http
            .get(h.url("/v1/health"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    flaky.hold_issue.store(false, Ordering::SeqCst);
    flaky.release.notify_waiters();
    for j in held {
        assert_eq!(j.await.unwrap(), StatusCode::CREATED);
    }
    assert_eq!(h.get(&h.tokens.admin, "/v1/stats").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_body_is_cut_off() {
    let h: Harness = start(Arc::new(Flaky::default()), |c| {
        c.server.request_timeout_seconds = 1
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "POST /v1/tasks HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"purpose\":",
        h.tokens.a
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the broker answers within its timeout")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    // in the error shape, like every other error (the fuzzer caught an empty body)
    assert!(
        text.contains(r#"{"error":{"code":"request_timeout""#),
        "{text}"
    );
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 1"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(h.snapshot().await.is_empty());
}
