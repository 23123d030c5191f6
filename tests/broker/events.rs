//! The event chain (issue 4): every step lands in it with its links, it
//! fails closed, and verification catches every kind of tampering, in the
//! store and in an export, naming the sequence number.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold::server::Overrides;
use leasehold_provider::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Harness, Options};

async fn task_events(h: &Harness, task: &str) -> Vec<Value> {
    let (s, v) = h
        .get(
            &h.tokens.admin,
            &format!("/v1/events?task={task}&limit=1000"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["events"].as_array().unwrap().clone()
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["kind"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn a_task_story_has_every_link() {
    let h = Harness::start(Options::default()).await;
    let t = &h.tokens;
    let task = h.open_task(&t.a, 600).await;
    let one = h.lease(&t.a, &task, 300).await;
    let two = h.lease(&t.a, &task, 300).await;
    let one_id = one["lease_id"].as_str().unwrap();
    let two_id = two["lease_id"].as_str().unwrap();
    let r = h
        .http
        .post(h.url(&format!("/v1/leases/{one_id}/revoke")))
        .bearer_auth(&t.responder)
        .header("x-request-id", "incident-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        h.post_empty(&t.a, &format!("/v1/tasks/{task}/complete"))
            .await
            .0,
        StatusCode::OK
    );

    let events = task_events(&h, &task).await;
    assert_eq!(
        kinds(&events),
        [
            "task.opened",
            "call.decided",
            "lease.issuing",
            "lease.issued",
            "call.decided",
            "lease.issuing",
            "lease.issued",
            "lease.revoked",
            "lease.revoked",
            "task.completed"
        ]
    );
    for e in &events {
        let l = &e["links"];
        assert_eq!(l["task"], task.as_str(), "{e}");
        assert_eq!(l["workload"], "dev:assistant-a", "{e}");
        assert_eq!(l["user"], "alice@example.com", "{e}");
        assert!(
            l["request_id"].as_str().is_some(),
            "every event of a request names it: {e}"
        );
        assert_eq!(e["hash"].as_str().unwrap().len(), 64);
        assert!(
            !e.to_string()
                .contains(one["credential"]["token"].as_str().unwrap()),
            "no credential in the chain"
        );
    }
    let opened = &events[0];
    assert_eq!(opened["data"]["prompt_sha256"].as_str().unwrap().len(), 64);
    assert!(
        opened["data"].get("prompt").is_none() && opened["data"].get("prompt_sealed").is_none()
    );
    assert_eq!(
        opened["data"]["policies"],
        json!(["open-task"]),
        "the decision that let it open"
    );
    // every credential request was decided by policy, with the policies named
    assert_eq!(events[1]["data"]["action"], "Lease");
    assert_eq!(events[1]["data"]["outcome"], "allow");
    assert_eq!(events[1]["data"]["policies"], json!(["demo-token-leases"]));
    assert_eq!(events[1]["data"]["max_ttl"], 900);
    assert_eq!(events[1]["links"]["lease"], one_id);
    assert_eq!(events[3]["links"]["lease"], one_id);
    assert_eq!(events[3]["links"]["provider"], "token");
    assert_eq!(events[3]["links"]["role"], "demo");
    // the manual revocation names who asked and under which request
    assert_eq!(events[7]["links"]["lease"], one_id);
    assert_eq!(events[7]["data"]["cause"], "manual");
    assert_eq!(events[7]["data"]["requested_by"], "operator:responder");
    assert_eq!(events[7]["links"]["request_id"], "incident-42");
    assert_eq!(events[8]["links"]["lease"], two_id);
    assert_eq!(events[8]["data"]["cause"], "task_complete");
    assert_eq!(events[9]["data"]["revoked"], 1);
    // seqs strictly increase and link
    for w in events.windows(2) {
        assert!(w[0]["seq"].as_u64() < w[1]["seq"].as_u64());
    }
    // filters: by lease, by kind, by user
    let (_, v) = h.get(&t.admin, &format!("/v1/events?lease={one_id}")).await;
    assert_eq!(
        kinds(v["events"].as_array().unwrap()),
        [
            "call.decided",
            "lease.issuing",
            "lease.issued",
            "lease.revoked"
        ]
    );
    let (_, v) = h
        .get(&t.admin, "/v1/events?kind=lease.issued&limit=1000")
        .await;
    assert_eq!(v["events"].as_array().unwrap().len(), 2);
    let (_, v) = h.get(&t.admin, "/v1/events?user=bob@example.com").await;
    assert!(v["events"].as_array().unwrap().is_empty());
    // the chain is for operators
    assert_eq!(h.get(&t.a, "/v1/events").await.0, StatusCode::FORBIDDEN);
    let (s, v) = h.get(&t.admin, "/v1/events?kind=nope").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_parameter"))
    );
    let (s, report) = h.get(&t.responder, "/v1/events/verify").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(report["ok"], true, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_recovery_revocations_are_in_the_chain() {
    let h = Harness::start(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    let task = h.open_task(&h.tokens.a, 600).await;
    let l = h.lease(&h.tokens.a, &task, 5).await;
    let id = l["lease_id"].as_str().unwrap();
    h.advance(Duration::from_secs(6));
    h.wait_state(id, "expired").await;
    let events = task_events(&h, &task).await;
    let last = events.last().unwrap();
    assert_eq!(last["kind"], "lease.revoked");
    assert_eq!(last["data"]["cause"], "expiry");
    assert!(
        last["links"].get("request_id").is_none(),
        "the broker did it on its own"
    );
}

/// A provider that records what is live, to see a failed request's
/// credential taken back.
#[derive(Debug, Default)]
struct Recording {
    live: Mutex<HashSet<String>>,
    issued: AtomicBool,
}

#[async_trait::async_trait]
impl Provider for Recording {
    fn describe(&self) -> Description {
        Description {
            kind: "recording",
            roles: vec![RoleInfo {
                name: "r".into(),
                max_ttl: Duration::from_secs(3600),
                description: String::new(),
            }],
            revocation: "removes it from the set".into(),
        }
    }
    fn validate(&self, _: &str, _: &[String]) -> Result<Duration, ProviderError> {
        Ok(Duration::from_secs(3600))
    }
    async fn health(&self) -> Result<(), ProviderError> {
        Ok(())
    }
    async fn issue(&self, spec: &LeaseSpec) -> Result<Issued, ProviderError> {
        self.live.lock().unwrap().insert(spec.lease_id.clone());
        self.issued.store(true, Ordering::SeqCst);
        Ok(Issued {
            credential: Credential::new().secret("key", "recorded-secret"),
            handle: RevocationHandle::new(spec.lease_id.as_bytes().to_vec()),
            expires_at: spec.expires_at,
            description: "recorded".into(),
        })
    }
    async fn revoke(&self, l: &RevokeSpec) -> Result<(), ProviderError> {
        self.live
            .lock()
            .unwrap()
            .remove(std::str::from_utf8(l.handle.as_bytes()).unwrap());
        Ok(())
    }
    async fn rollback(&self, spec: &LeaseSpec) -> Result<(), ProviderError> {
        self.live.lock().unwrap().remove(&spec.lease_id);
        Ok(())
    }
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_fails_the_request_and_revokes_the_credential() {
    let rec = Arc::new(Recording::default());
    let r2 = rec.clone();
    let h = Harness::start(Options {
        tweak: Box::new(|c| {
            c.fault.fail_event_kinds = vec!["lease.issued".into()];
            crate::harness::permit_leases(c, "rec");
        }),
        overrides: Box::new(move || Overrides {
            providers: vec![("rec".into(), r2.clone() as Arc<dyn Provider>)],
        }),
        ..Options::default()
    })
    .await;
    let task = h.open_task(&h.tokens.a, 600).await;
    let (s, v) = h
        .post(
            &h.tokens.a,
            &format!("/v1/tasks/{task}/leases"),
            json!({"provider": "rec", "role": "r", "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("store_unavailable")),
        "{v}"
    );
    assert!(
        !v.to_string().contains("recorded-secret"),
        "no credential without its event"
    );
    assert!(
        rec.issued.load(Ordering::SeqCst),
        "the provider did mint one"
    );
    assert!(rec.live.lock().unwrap().is_empty(), "and it was taken back");
    // the failure is recorded and the rollback queued; the worker confirms it
    let events = task_events(&h, &task).await;
    let lease = events[2]["links"]["lease"].as_str().unwrap().to_owned();
    h.wait_state(&lease, "rolled_back").await;
    let events = task_events(&h, &task).await;
    assert_eq!(
        kinds(&events),
        [
            "task.opened",
            "call.decided",
            "lease.issuing",
            "lease.revoking",
            "lease.rolled_back"
        ]
    );
    assert_eq!(events[3]["data"]["cause"], "issue_failed");
    assert!(
        events.iter().all(|e| e["kind"] != "lease.issued"),
        "no issue event for a withheld credential"
    );
    let (_, report) = h.get(&h.tokens.admin, "/v1/events/verify").await;
    assert_eq!(report["ok"], true, "{report}");
}

#[cfg(not(feature = "fault-injection"))]
#[test]
fn a_failed_append_fails_the_request_and_revokes_the_credential() {
    panic!("this test needs the `fault-injection` feature: run integration/test.sh");
}

#[tokio::test]
async fn denied_authentication_is_recorded_but_bounded() {
    // the per-address limit on failures would stop the guesses first
    // (tests/broker/limits.rs); here every guess reaches verification
    let h = Harness::start(Options {
        tweak: Box::new(|c| c.server.rate_limits.auth_failures_per_second = 0.0),
        ..Options::default()
    })
    .await;
    for i in 0..60 {
        let r = h
            .http
            .get(h.url("/v1/leases"))
            .bearer_auth(format!("lho_guess{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, v) = h
        .get(&h.tokens.admin, "/v1/events?kind=auth.denied&limit=1000")
        .await;
    let n = v["events"].as_array().unwrap().len();
    assert!(
        (1..=30).contains(&n),
        "60 guesses in a few seconds recorded {n} times"
    );
    assert!(
        !v.to_string().contains("lho_guess"),
        "the guessed token is not recorded"
    );
}

/// Every refusal of an authenticated workload is on the chain with its
/// reason, in its task's story when it named one of its own, and a flood
/// of them is summarized rather than dropped silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_recorded_with_its_reason_and_floods_are_summarized() {
    let h = Harness::start(Options::default()).await;
    let a = &h.tokens.a;
    let task = h.open_task(a, 600).await;
    let refusals = |events: &[Value]| -> Vec<(String, Value)> {
        events
            .iter()
            .filter(|e| e["kind"] == "request.refused")
            .map(|e| {
                (
                    e["data"]["code"].as_str().unwrap_or("").to_owned(),
                    e.clone(),
                )
            })
            .collect()
    };
    // an assistant probing for a tool it was never given
    let (s, _) = h
        .post(
            a,
            &format!("/v1/tasks/{task}/calls"),
            json!({"tool": "db.drop", "action": "drop", "resource": "db:prod"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // a provider and a role that do not exist
    for body in [
        json!({"provider": "nope", "role": "demo", "ttl_seconds": 60}),
        json!({"provider": "token", "role": "root", "ttl_seconds": 60}),
    ] {
        let (s, _) = h.post(a, &format!("/v1/tasks/{task}/leases"), body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let story = task_events(&h, &task).await;
    let found = refusals(&story);
    let codes: Vec<&str> = found.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        codes,
        ["unknown_tool", "unknown_provider", "unknown_role"],
        "{story:?}"
    );
    let (_, probe) = &found[0];
    assert_eq!(probe["data"]["tool"], "db.drop");
    assert_eq!(probe["links"]["task"], task.as_str());
    assert_eq!(probe["links"]["workload"], "dev:assistant-a");
    assert_eq!(probe["links"]["user"], "alice@example.com");
    assert!(
        probe["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("db.drop")
    );
    assert_eq!(found[2].1["data"]["role"], "root");

    // the task completed: a call after it is refused, and recorded
    let (s, _) = h.post_empty(a, &format!("/v1/tasks/{task}/complete")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = h
        .post(
            a,
            &format!("/v1/tasks/{task}/calls"),
            json!({"tool": "demo.read", "action": "read"}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    // a fenced workload, at a new task (no task to link)
    let (s, _) = h
        .post(
            &h.tokens.responder,
            "/v1/revocations",
            json!({"workload": "dev:assistant-b", "fence": true, "reason": "INC-3"}),
        )
        .await;
    assert!(s.is_success());
    let (s, _) = h
        .post(
            &h.tokens.b,
            "/v1/tasks",
            json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, v) = h
        .get(
            &h.tokens.admin,
            "/v1/events?kind=request.refused&limit=1000",
        )
        .await;
    let all = refusals(v["events"].as_array().unwrap());
    let fenced = all
        .iter()
        .find(|(c, _)| c == "fenced")
        .expect("the fence's refusal");
    assert_eq!(fenced.1["links"]["workload"], "dev:assistant-b");
    assert_eq!(fenced.1["data"]["request"], "open_task");
    assert!(
        all.iter()
            .any(|(c, e)| c == "task_completed" && e["links"]["task"] == task.as_str())
    );

    // a flood: recorded at the bounded rate, the next record counts the rest
    let t2 = h.open_task(a, 600).await;
    for _ in 0..60 {
        h.post(
            a,
            &format!("/v1/tasks/{t2}/calls"),
            json!({"tool": "db.drop", "action": "drop"}),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, _) = h
        .post(
            a,
            &format!("/v1/tasks/{t2}/calls"),
            json!({"tool": "db.drop", "action": "last"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let flood = refusals(&task_events(&h, &t2).await);
    let per_second = h.config.audit.auth_denied_events_per_second as usize;
    assert!(
        flood.len() < 61 && flood.len() >= 2,
        "{} of 61 refusals recorded",
        flood.len()
    );
    assert!(flood.len() <= 3 * per_second + 1, "{}", flood.len());
    let summarized: u64 = flood
        .iter()
        .map(|(_, e)| e["data"]["suppressed_before"].as_u64().unwrap())
        .sum();
    assert_eq!(
        summarized as usize + flood.len(),
        61,
        "every refusal is either recorded or counted"
    );
}

#[tokio::test]
async fn configured_fields_enter_the_chain_as_hmacs() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("hmac.key");
    leasehold::store::StoreKey::generate()
        .unwrap()
        .write_new_file(&key)
        .unwrap();
    let k2 = key.clone();
    let h = Harness::start(Options {
        tweak: Box::new(move |c| {
            c.audit.hmac_key_file = Some(k2.clone());
            c.audit.hmac_fields = vec!["user".into()];
            c.limits.store_prompt_text = true;
        }),
        ..Options::default()
    })
    .await;
    let task = h.open_task(&h.tokens.a, 600).await;
    let events = task_events(&h, &task).await;
    let user = events[0]["links"]["user"].as_str().unwrap();
    assert!(user.starts_with("hmac-sha256:"), "{user}");
    assert!(!events[0].to_string().contains("alice@example.com"));
    // the prompt text is kept only sealed
    assert!(events[0]["data"]["prompt_sealed"].as_str().is_some());
    assert!(!events[0].to_string().contains("do the thing"));
    // an operator who knows the user still finds the events
    let (_, v) = h
        .get(&h.tokens.admin, "/v1/events?user=alice%40example.com")
        .await;
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
}
