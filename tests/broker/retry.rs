//! Revocation is durable and retried (invariant 3), end to end over HTTP,
//! against a provider whose peer can be taken down: failures back off,
//! spend the budget, turn `irrevocable` (visible in the API), keep being
//! retried on the slow schedule, and finish when the peer returns.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use leasehold::server::Overrides;
use leasehold_provider::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Flaky, Harness, Options};

async fn start(flaky: Arc<Flaky>) -> Harness {
    Harness::start(Options {
        manual_clock: true,
        tweak: Box::new(|c| {
            crate::harness::permit_leases(c, "flaky");
            c.reaper.retry_base_seconds = 1;
            c.reaper.retry_cap_seconds = 4;
            c.reaper.retry_budget = 4;
            c.reaper.irrevocable_retry_seconds = 3600;
        }),
        overrides: Box::new(move || Overrides {
            providers: vec![("flaky".into(), flaky.clone() as Arc<dyn Provider>)],
        }),
    })
    .await
}

async fn lease(h: &Harness, task: &str, ttl: i64) -> String {
    let (s, v) = h
        .post(
            &h.tokens.a,
            &format!("/v1/tasks/{task}/leases"),
            json!({"provider": "flaky", "role": "r", "ttl_seconds": ttl}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v["lease_id"].as_str().unwrap().to_owned()
}

async fn view(h: &Harness, id: &str) -> Value {
    h.get(&h.tokens.admin, &format!("/v1/leases/{id}")).await.1
}

async fn wait_attempts(h: &Harness, id: &str, n: u64) -> Value {
    for _ in 0..500 {
        let v = view(h, id).await;
        if v["revocation"]["attempts"].as_u64() >= Some(n) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "lease {id} never reached {n} attempts: {}",
        view(h, id).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_revocations_back_off_become_irrevocable_and_still_finish() {
    let flaky = Arc::new(Flaky::default());
    let h = start(flaky.clone()).await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let id = lease(&h, &task, 10).await;
    flaky.down.store(true, Ordering::SeqCst);

    h.advance(Duration::from_secs(11));
    let v = wait_attempts(&h, &id, 1).await;
    assert_eq!(v["state"], "revoking");
    assert_eq!(v["revocation"]["last_error"], "peer down");
    // attempts 2..4 at backoffs of at most 1, 2, 4 s
    for (n, step) in [(2, 1), (3, 2), (4, 4)] {
        h.advance(Duration::from_secs(step));
        wait_attempts(&h, &id, n).await;
    }
    let v = view(&h, &id).await;
    assert_eq!(v["state"], "irrevocable", "{v}");
    // visible to responders
    let (s, list) = h
        .get(&h.tokens.responder, "/v1/leases?state=irrevocable")
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["leases"][0]["lease_id"], id.as_str());
    assert_eq!(
        h.get("", "/v1/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "the peer is down"
    );

    // not dropped: retried on the slow schedule, and done once the peer is back
    let calls = flaky.revoke_calls.load(Ordering::SeqCst);
    h.advance(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        flaky.revoke_calls.load(Ordering::SeqCst),
        calls,
        "no fast retries once irrevocable"
    );
    flaky.down.store(false, Ordering::SeqCst);
    h.advance(Duration::from_secs(3600));
    h.wait_state(&id, "expired").await;
    assert!(
        flaky.live.lock().unwrap().is_empty(),
        "dead at the provider"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_revocations_report_failures_and_hand_over_to_the_queue() {
    let flaky = Arc::new(Flaky::default());
    let h = start(flaky.clone()).await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let one = lease(&h, &task, 600).await;
    let two = lease(&h, &task, 600).await;
    flaky.down.store(true, Ordering::SeqCst);

    let (s, v) = h
        .post_empty(&h.tokens.a, &format!("/v1/leases/{one}/revoke"))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["state"], "revoking");
    assert_eq!(v["revocation"]["last_error"], "peer down");

    let (s, done) = h
        .post_empty(&h.tokens.a, &format!("/v1/tasks/{task}/complete"))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(done["revoked"].as_array().unwrap().is_empty());
    let pending: Vec<&str> = done["pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["lease_id"].as_str().unwrap())
        .collect();
    assert_eq!(pending.len(), 2, "{done}");
    assert!(pending.contains(&one.as_str()) && pending.contains(&two.as_str()));

    flaky.down.store(false, Ordering::SeqCst);
    h.advance(Duration::from_secs(5));
    h.wait_state(&one, "revoked").await;
    h.wait_state(&two, "revoked").await;
    assert!(flaky.live.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_issue_is_rolled_back() {
    #[derive(Debug, Default)]
    struct Broken(Flaky);
    #[async_trait::async_trait]
    impl Provider for Broken {
        fn describe(&self) -> Description {
            self.0.describe()
        }
        fn validate(&self, role: &str, scope: &[String]) -> Result<Duration, ProviderError> {
            self.0.validate(role, scope)
        }
        async fn health(&self) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn issue(&self, spec: &LeaseSpec) -> Result<Issued, ProviderError> {
            // created something, then failed: only rollback can clean up
            self.0.live.lock().unwrap().insert(spec.lease_id.clone());
            Err(ProviderError::retryable("connection reset after CREATE"))
        }
        async fn revoke(&self, l: &RevokeSpec) -> Result<(), ProviderError> {
            self.0.revoke(l).await
        }
        async fn rollback(&self, spec: &LeaseSpec) -> Result<(), ProviderError> {
            self.0.rollback(spec).await
        }
    }
    let broken = Arc::new(Broken::default());
    let b2 = broken.clone();
    let h = Harness::start(Options {
        manual_clock: true,
        tweak: Box::new(|c| crate::harness::permit_leases(c, "flaky")),
        overrides: Box::new(move || Overrides {
            providers: vec![("flaky".into(), b2.clone() as Arc<dyn Provider>)],
        }),
    })
    .await;
    let task = h.open_task(&h.tokens.a, 600).await;
    let (s, v) = h
        .post(
            &h.tokens.a,
            &format!("/v1/tasks/{task}/leases"),
            json!({"provider": "flaky", "role": "r", "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("provider_unavailable")
        )
    );
    assert!(
        !v.to_string().contains("CREATE"),
        "no provider internals in the answer"
    );
    let (_, detail) = h.get(&h.tokens.a, &format!("/v1/tasks/{task}")).await;
    let id = detail["leases"][0]["lease_id"].as_str().unwrap().to_owned();
    h.wait_state(&id, "rolled_back").await;
    assert!(broken.0.live.lock().unwrap().is_empty());
}
