//! Incident response end to end: mass revocation jobs across providers
//! (one failing half-way), restart mid-job, fences that hold from the
//! answer on and survive restart, dry runs that change nothing, irrevocable
//! leases retried or abandoned, the blast radius, and bad input.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use leasehold::clock::Clock as _;
use leasehold::server::Overrides;
use leasehold_provider::Provider;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Flaky, Harness, Options};

/// Permissive: these tests are about revocation, not the example quotas.
const POLICY: &str = r#"
@id("open") permit (principal in Leasehold::Group::"assistants", action == Leasehold::Action::"OpenTask", resource);
@id("read") permit (principal in Leasehold::Group::"assistants", action == Leasehold::Action::"Call", resource == Leasehold::Tool::"demo.read");
@id("lease") permit (principal in Leasehold::Group::"assistants", action == Leasehold::Action::"Lease", resource);
"#;

pub(crate) const A: &str = "dev:assistant-a";

pub(crate) async fn start(
    flaky: Arc<Flaky>,
    tweak: impl Fn(&mut leasehold::config::Config) + Send + 'static,
) -> Harness {
    Harness::start(Options {
        manual_clock: true,
        tweak: Box::new(move |c| {
            std::fs::write(c.policy.dir.join("demo.cedar"), POLICY).unwrap();
            c.reaper.retry_base_seconds = 1;
            c.reaper.retry_cap_seconds = 2;
            c.reaper.retry_budget = 1000;
            c.limits.max_leases_per_task = 1000;
            tweak(c);
        }),
        overrides: Box::new(move || Overrides {
            providers: vec![("flaky".into(), flaky.clone() as Arc<dyn Provider>)],
        }),
    })
    .await
}

/// `n` leases of `provider`/`role` for `token`, 100 per task, 16 at a time.
pub(crate) async fn fill(
    h: &Harness,
    token: &str,
    provider: &str,
    role: &str,
    n: usize,
) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    let mut tasks = Vec::new();
    for _ in 0..n.div_ceil(100) {
        tasks.push(h.open_task(token, 3600).await);
    }
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let url = h.url(&format!("/v1/tasks/{}/leases", tasks[i / 100]));
        let (http, token) = (h.http.clone(), token.to_owned());
        let body = json!({"provider": provider, "role": role, "ttl_seconds": 600});
        set.spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::CREATED);
            resp.json::<Value>().await.unwrap()["lease_id"]
                .as_str()
                .unwrap()
                .to_owned()
        });
        if set.len() >= 16 {
            out.push(set.join_next().await.unwrap().unwrap());
        }
    }
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    out
}

pub(crate) async fn job(h: &Harness, id: &str) -> Value {
    let (s, v) = h
        .get(&h.tokens.responder, &format!("/v1/revocations/{id}"))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

/// Poll a job until `pred` holds (the job runs in the background).
pub(crate) async fn wait_job(
    h: &Harness,
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..1500 {
        let v = job(h, id).await;
        if pred(&v) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {id} never got to {what}: {}", job(h, id).await);
}

pub(crate) fn count(v: &Value, provider: &str, bucket: &str) -> u64 {
    v["by_provider"][provider][bucket].as_u64().unwrap_or(0)
}

pub(crate) async fn revoke_all_of(h: &Harness, workload: &str, fence: bool) -> (StatusCode, Value) {
    h.post(
        &h.tokens.responder,
        "/v1/revocations",
        json!({"workload": workload, "reason": "incident 42", "fence": fence}),
    )
    .await
}

async fn stats(h: &Harness) -> Value {
    h.get(&h.tokens.admin, "/v1/stats").await.1
}

async fn verify_chain(h: &Harness) {
    let (s, v) = h.get(&h.tokens.admin, "/v1/events/verify").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["ok"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_across_two_providers_finishes_one_while_the_other_fails_and_retries() {
    let flaky = Arc::new(Flaky::default());
    let h = start(flaky.clone(), |_| {}).await;
    let tokens = fill(&h, &h.tokens.a, "token", "demo", 2000).await;
    let flakies = fill(&h, &h.tokens.a, "flaky", "r", 2000).await;
    // assistant-b's leases are not selected
    let task_b = h.open_task(&h.tokens.b, 3600).await;
    let b_lease = h.lease(&h.tokens.b, &task_b, 600).await;
    // the flaky peer goes down half-way through its revocations
    flaky.fail_after.store(1000, Ordering::SeqCst);

    let (s, started) = revoke_all_of(&h, A, false).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{started}");
    let id = started["job_id"].as_str().unwrap().to_owned();
    assert_eq!(started["state"], "running");

    // the token provider finishes; the flaky one has half revoked and half retrying
    let mid = wait_job(&h, &id, "token done, flaky retrying", |v| {
        count(v, "token", "revoked") == 2000
            && count(v, "flaky", "revoked") + count(v, "flaky", "retrying") == 2000
            && count(v, "flaky", "retrying") > 0
    })
    .await;
    assert_eq!(mid["state"], "running", "{mid}");
    assert_eq!(count(&mid, "flaky", "revoked"), 1000, "{mid}");
    assert_eq!(count(&mid, "flaky", "matched"), 2000);
    assert_eq!(count(&mid, "flaky", "irrevocable"), 0);
    let failed = mid["failed"].as_array().unwrap();
    assert!(!failed.is_empty() && failed.len() <= 100, "{mid}");
    assert_eq!(failed[0]["provider"], "flaky");
    assert_eq!(failed[0]["last_error"], "peer down");
    for t in tokens.iter().take(50) {
        assert_eq!(h.lease_state(t).await, "revoked");
    }
    // a revoked token is dead at once, everywhere
    assert_eq!(
        stats(&h).await["leases"]["token"]["active"],
        1,
        "only assistant-b's lease is left"
    );

    // the peer returns: retries finish the job
    flaky.fail_after.store(0, Ordering::SeqCst);
    h.advance(Duration::from_secs(3));
    let done = wait_job(&h, &id, "done", |v| v["state"] == "done").await;
    assert_eq!(count(&done, "flaky", "revoked"), 2000, "{done}");
    assert_eq!(count(&done, "token", "revoked"), 2000, "{done}");
    assert_eq!(
        count(&done, "flaky", "irrevocable") + count(&done, "flaky", "retrying"),
        0
    );
    assert!(done["failed"].as_array().unwrap().is_empty());
    assert!(
        flaky.live.lock().unwrap().is_empty(),
        "every flaky credential is gone at its peer"
    );
    let one = h
        .get(&h.tokens.responder, &format!("/v1/leases/{}", flakies[0]))
        .await
        .1;
    assert_eq!(one["state"], "revoked");
    assert_eq!(one["revocation"]["cause"], "mass_revocation");
    assert_eq!(one["revocation"]["job_id"], id.as_str());
    assert_eq!(one["revocation"]["requested_by"], "operator:responder");

    // not selected, and not touched: assistant-b, the operators, the providers
    assert_eq!(
        h.lease_state(b_lease["lease_id"].as_str().unwrap()).await,
        "active"
    );
    assert!(
        h.introspect(b_lease["credential"]["token"].as_str().unwrap())
            .await
    );
    let task = h.open_task(&h.tokens.a, 600).await;
    h.lease(&h.tokens.a, &task, 60).await;

    // the job's story is in the chain, linked by its id
    let (_, ev) = h
        .get(
            &h.tokens.responder,
            "/v1/events?kind=revocation_job.finished",
        )
        .await;
    let fin = &ev["events"][0];
    assert_eq!(fin["links"]["job"], id.as_str(), "{ev}");
    assert_eq!(fin["data"]["counts"]["flaky"]["revoked"], 2000);
    assert_eq!(fin["data"]["reason"], "incident 42");
    verify_chain(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_resumes_after_a_restart_where_it_stopped() {
    let flaky = Arc::new(Flaky::default());
    let mut h = start(flaky, |c| {
        c.fault.job_chunk = Some(50);
        c.fault.job_chunk_pause_millis = 100;
    })
    .await;
    let leases = fill(&h, &h.tokens.a, "token", "demo", 1000).await;
    let (s, started) = revoke_all_of(&h, A, false).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{started}");
    let id = started["job_id"].as_str().unwrap().to_owned();
    let partway = wait_job(&h, &id, "some progress", |v| {
        count(v, "token", "revoked") >= 100
    })
    .await;
    h.restart().await;
    let after_restart = job(&h, &id).await;
    let revoked_at_stop = count(&after_restart, "token", "revoked");
    assert!(
        revoked_at_stop >= count(&partway, "token", "revoked") && revoked_at_stop < 1000,
        "stopped part-way: {after_restart}"
    );
    assert_eq!(after_restart["scan_done"], false);
    // resumed by the restarted broker, from its cursor
    let done = wait_job(&h, &id, "done", |v| v["state"] == "done").await;
    assert_eq!(count(&done, "token", "revoked"), 1000, "{done}");
    assert_eq!(
        count(&done, "token", "matched"),
        1000,
        "each lease counted once: {done}"
    );
    assert_eq!(done["scanned"], 1000, "nothing scanned twice: {done}");
    for l in &leases {
        assert_eq!(h.lease_state(l).await, "revoked");
    }
    // one revocation event per lease
    let mut seen = 0;
    let mut after = 0u64;
    loop {
        let (_, ev) = h
            .get(
                &h.tokens.admin,
                &format!("/v1/events?kind=lease.revoked&limit=1000&after={after}"),
            )
            .await;
        let page = ev["events"].as_array().unwrap();
        if page.is_empty() {
            break;
        }
        seen += page.len();
        after = page.last().unwrap()["seq"].as_u64().unwrap();
    }
    assert_eq!(seen, 1000);
    verify_chain(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_stops_tasks_calls_and_leases_at_once_and_survives_restart() {
    let flaky = Arc::new(Flaky::default());
    let mut h = start(flaky.clone(), |_| {}).await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let held = h.lease(&h.tokens.a, &task, 600).await;
    // a credential in flight: the provider has minted it, activation waits
    flaky.hold_issue.store(true, Ordering::SeqCst);
    let (http, url, a) = (
        h.http.clone(),
        h.url(&format!("/v1/tasks/{task}/leases")),
        h.tokens.a.clone(),
    );
    let in_flight = tokio::spawn(async move {
        let r = http
            .post(url)
            .bearer_auth(a)
            .json(&json!({"provider": "flaky", "role": "r", "ttl_seconds": 600}))
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    });
    flaky.entered.notified().await;

    let (s, started) = revoke_all_of(&h, A, true).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{started}");
    // in force when the call answers: every way to get something new is shut
    let fenced = |(s, v): (StatusCode, Value)| {
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
        assert_eq!(v["error"]["code"], "fenced", "{v}");
    };
    fenced(
        h.post(
            &h.tokens.a,
            "/v1/tasks",
            json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 60}),
        )
        .await,
    );
    fenced(
        h.post(
            &h.tokens.a,
            &format!("/v1/tasks/{task}/leases"),
            json!({"provider": "token", "role": "demo", "ttl_seconds": 60}),
        )
        .await,
    );
    fenced(
        h.post(
            &h.tokens.a,
            &format!("/v1/tasks/{task}/calls"),
            json!({"tool": "demo.read", "action": "read"}),
        )
        .await,
    );
    // the credential in flight is refused at activation and rolled back
    flaky.hold_issue.store(false, Ordering::SeqCst);
    flaky.release.notify_one();
    let (s, v) = in_flight.await.unwrap();
    fenced((s, v));
    for _ in 0..200 {
        if flaky.live.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        flaky.live.lock().unwrap().is_empty(),
        "the minted credential was taken back"
    );
    // the old lease went with the job; assistant-b is not fenced
    let id = started["job_id"].as_str().unwrap().to_owned();
    wait_job(&h, &id, "done", |v| v["state"] == "done").await;
    assert!(
        !h.introspect(held["credential"]["token"].as_str().unwrap())
            .await
    );
    let task_b = h.open_task(&h.tokens.b, 600).await;
    h.lease(&h.tokens.b, &task_b, 60).await;

    let (s, list) = h.get(&h.tokens.responder, "/v1/fences").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["fences"][0]["kind"], "workload");
    assert_eq!(list["fences"][0]["value"], A);
    assert_eq!(list["fences"][0]["job_id"], id.as_str());

    // a restart keeps the fence
    h.restart().await;
    fenced(
        h.post(
            &h.tokens.a,
            "/v1/tasks",
            json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 60}),
        )
        .await,
    );
    assert_eq!(
        h.get(&h.tokens.responder, "/v1/fences").await.1["fences"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // lifting needs a reason, and a fence that exists
    let (s, v) = h
        .post(
            &h.tokens.responder,
            "/v1/fences/lift",
            json!({"kind": "workload", "value": A}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("reason_required"))
    );
    let (s, v) = h
        .post(
            &h.tokens.responder,
            "/v1/fences/lift",
            json!({"kind": "workload", "value": "dev:nobody", "reason": "r"}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("fence_not_found"))
    );
    let (s, v) = h
        .post(
            &h.tokens.a,
            "/v1/fences/lift",
            json!({"kind": "workload", "value": A, "reason": "me"}),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "a workload cannot lift its own fence: {v}"
    );
    let (s, v) = h
        .post(
            &h.tokens.responder,
            "/v1/fences/lift",
            json!({"kind": "workload", "value": A, "reason": "keys rotated"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let task = h.open_task(&h.tokens.a, 600).await;
    h.lease(&h.tokens.a, &task, 60).await;
    assert!(
        h.get(&h.tokens.responder, "/v1/fences").await.1["fences"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    let (_, ev) = h
        .get(&h.tokens.responder, "/v1/events?kind=workload.unfenced")
        .await;
    assert_eq!(ev["events"][0]["data"]["reason"], "keys rotated", "{ev}");
    assert_eq!(ev["events"][0]["data"]["fenced_for"], "incident 42");
    verify_chain(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_by_user_and_by_tenant() {
    let h = start(Arc::new(Flaky::default()), |_| {}).await;
    let (s, v) = h
        .post(
            &h.tokens.responder,
            "/v1/revocations",
            json!({"user": "alice@example.com", "fence": true, "reason": "phished"}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    // any workload acting for alice is refused; for someone else it is not
    let (s, v) = h.post(&h.tokens.b, "/v1/tasks", json!({"purpose": "p", "on_behalf_of": "alice@example.com", "prompt": "x", "ttl_seconds": 60})).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("fenced")),
        "{v}"
    );
    let (s, _) = h.post(&h.tokens.b, "/v1/tasks", json!({"purpose": "p", "on_behalf_of": "bob@example.com", "prompt": "x", "ttl_seconds": 60})).await;
    assert_eq!(s, StatusCode::CREATED);

    let (s, v) = h
        .post(
            &h.tokens.responder,
            "/v1/revocations",
            json!({"tenant": "dev", "fence": true, "reason": "tenant breach"}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let (s, v) = h.post(&h.tokens.b, "/v1/tasks", json!({"purpose": "p", "on_behalf_of": "bob@example.com", "prompt": "x", "ttl_seconds": 60})).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("fenced")),
        "{v}"
    );
    assert_eq!(
        h.get(&h.tokens.responder, "/v1/fences").await.1["fences"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_counts_and_changes_nothing() {
    let h = start(Arc::new(Flaky::default()), |_| {}).await;
    fill(&h, &h.tokens.a, "token", "demo", 30).await;
    fill(&h, &h.tokens.a, "flaky", "r", 20).await;
    fill(&h, &h.tokens.b, "token", "demo", 5).await;
    let before = h.snapshot().await;
    let head = h.get(&h.tokens.admin, "/v1/events/chain").await.1;

    let (s, v) = h
        .post(
            &h.tokens.responder,
            "/v1/revocations",
            json!({"workload": A, "fence": true, "dry_run": true, "reason": "how bad"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["matched"], 50);
    assert_eq!(v["by_provider"]["token"], 30);
    assert_eq!(v["by_provider"]["flaky"], 20);
    assert_eq!(v["sample"]["token"].as_array().unwrap().len(), 10);
    let (_, v) = h
        .post(
            &h.tokens.responder,
            "/v1/revocations",
            json!({"all": true, "provider": "token", "dry_run": true, "reason": "how bad"}),
        )
        .await;
    assert_eq!(v["matched"], 35, "{v}");

    assert_eq!(h.snapshot().await, before, "no lease changed");
    assert_eq!(
        h.get(&h.tokens.admin, "/v1/events/chain").await.1["head_seq"],
        head["head_seq"],
        "no event written"
    );
    assert!(
        h.get(&h.tokens.responder, "/v1/fences").await.1["fences"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        h.get(&h.tokens.responder, "/v1/revocations").await.1["jobs"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    h.open_task(&h.tokens.a, 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_stable_codes_and_change_nothing() {
    let flaky = Arc::new(Flaky::default());
    let h = start(flaky.clone(), |_| {}).await;
    fill(&h, &h.tokens.a, "flaky", "r", 3).await;
    let before = h.snapshot().await;
    let r = &h.tokens.responder;
    for (body, code) in [
        (json!({"reason": "r"}), "empty_selector"),
        (
            json!({"states": ["active"], "reason": "r"}),
            "empty_selector",
        ),
        (json!({"workload": A}), "reason_required"),
        (json!({"workload": A, "reason": "  "}), "reason_required"),
        (
            json!({"provider": "nope", "reason": "r"}),
            "unknown_provider",
        ),
        (
            json!({"all": true, "issued_after": "2026-01-02T00:00:00Z", "issued_before": "2026-01-01T00:00:00Z", "reason": "r"}),
            "invalid_time_range",
        ),
        (
            json!({"all": true, "issued_after": "yesterday", "reason": "r"}),
            "invalid_parameter",
        ),
        (
            json!({"workload": A, "states": ["revoked"], "reason": "r"}),
            "invalid_state",
        ),
        (
            json!({"provider": "token", "fence": true, "reason": "r"}),
            "invalid_fence",
        ),
        (json!({"task": "lease_x", "reason": "r"}), "invalid_id"),
        (json!({"workload": "", "reason": "r"}), "invalid_parameter"),
        (
            json!({"workload": A, "reason": "r", "surprise": 1}),
            "invalid_request",
        ),
    ] {
        let (s, v) = h.post(r, "/v1/revocations", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["code"], code, "{body}: {v}");
    }
    // roles: workloads, admins and approvers do not start jobs
    for t in [&h.tokens.a, &h.tokens.admin, &h.tokens.approver] {
        let (s, v) = h
            .post(t, "/v1/revocations", json!({"all": true, "reason": "r"}))
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    }
    let (s, v) = h.get(r, "/v1/revocations/job_nope").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_id"))
    );
    let (s, v) = h
        .get(r, "/v1/revocations/job_00000000000000000000000000")
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("job_not_found")),
        "{v}"
    );
    assert_eq!(h.snapshot().await, before);
    assert!(
        h.get(r, "/v1/revocations").await.1["jobs"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // a second job on the same selector while one runs: the running one
    flaky.down.store(true, Ordering::SeqCst);
    let (s, first) = revoke_all_of(&h, A, false).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{first}");
    let (s, second) = revoke_all_of(&h, A, false).await;
    assert_eq!(s, StatusCode::CONFLICT, "{second}");
    assert_eq!(second["error"]["code"], "job_running");
    assert_eq!(second["job"]["job_id"], first["job_id"]);
    assert_eq!(
        h.get(r, "/v1/revocations").await.1["jobs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // a different selector is a different job
    let (s, _) = h
        .post(
            r,
            "/v1/revocations",
            json!({"workload": A, "provider": "flaky", "reason": "r"}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn irrevocable_leases_are_listed_retried_or_abandoned_with_a_reason() {
    let flaky = Arc::new(Flaky::default());
    let h = start(flaky.clone(), |c| c.reaper.retry_budget = 2).await;
    let leases = fill(&h, &h.tokens.a, "flaky", "r", 3).await;
    flaky.down.store(true, Ordering::SeqCst);
    let (s, started) = revoke_all_of(&h, A, false).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let id = started["job_id"].as_str().unwrap().to_owned();
    let mut done = Value::Null;
    for _ in 0..50 {
        h.advance(Duration::from_secs(3));
        let v = job(&h, &id).await;
        if v["state"] == "done" {
            done = v;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count(&done, "flaky", "irrevocable"),
        3,
        "the job ends, reporting what it could not revoke: {done}"
    );
    assert_eq!(done["failed"].as_array().unwrap().len(), 3);
    let (_, list) = h
        .get(&h.tokens.responder, "/v1/leases?state=irrevocable")
        .await;
    assert_eq!(list["leases"].as_array().unwrap().len(), 3);
    assert_eq!(stats(&h).await["leases"]["flaky"]["irrevocable"], 3);

    // abandon: needs a reason, the responder role, an irrevocable lease
    let (s, v) = h
        .post(
            &h.tokens.responder,
            &format!("/v1/leases/{}/abandon", leases[0]),
            json!({}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("reason_required"))
    );
    let (s, _) = h
        .post(
            &h.tokens.admin,
            &format!("/v1/leases/{}/abandon", leases[0]),
            json!({"reason": "x"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = h
        .post(
            &h.tokens.responder,
            &format!("/v1/leases/{}/abandon", leases[0]),
            json!({"reason": "peer decommissioned"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "abandoned");
    let (s, v) = h
        .post(
            &h.tokens.responder,
            &format!("/v1/leases/{}/abandon", leases[0]),
            json!({"reason": "again"}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("lease_state")),
        "{v}"
    );
    let (_, ev) = h
        .get(
            &h.tokens.responder,
            &format!("/v1/events?lease={}&kind=lease.abandoned", leases[0]),
        )
        .await;
    assert_eq!(ev["events"].as_array().unwrap().len(), 1, "recorded: {ev}");
    assert_eq!(job(&h, &id).await["by_provider"]["flaky"]["abandoned"], 1);

    // retry: the peer is back, a revoke goes through the queue again
    flaky.down.store(false, Ordering::SeqCst);
    let (s, v) = h
        .post_empty(
            &h.tokens.responder,
            &format!("/v1/leases/{}/revoke", leases[1]),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    h.wait_state(&leases[1], "revoked").await;
    let after = job(&h, &id).await;
    assert_eq!(
        count(&after, "flaky", "revoked"),
        1,
        "the job's counts follow its leases: {after}"
    );
    assert_eq!(count(&after, "flaky", "irrevocable"), 1);
    verify_chain(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blast_radius_lists_what_a_workload_did_and_what_is_still_live() {
    let h = start(Arc::new(Flaky::default()), |_| {}).await;
    let t1 = h.open_task(&h.tokens.a, 3600).await;
    let l1 = h.lease(&h.tokens.a, &t1, 600).await;
    let (s, call) = h
        .post(
            &h.tokens.a,
            &format!("/v1/tasks/{t1}/calls"),
            json!({"tool": "demo.read", "action": "read", "resource": "ticket/7"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{call}");
    let t2 = h.open_task(&h.tokens.a, 3600).await;
    let l2 = h.lease(&h.tokens.a, &t2, 600).await;
    h.post_empty(&h.tokens.a, &format!("/v1/tasks/{t2}/complete"))
        .await;
    let tb = h.open_task(&h.tokens.b, 3600).await;

    let (s, v) = h
        .get(
            &h.tokens.responder,
            &format!("/v1/blast-radius?workload={A}"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let tasks = v["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2, "{v}");
    assert!(
        tasks.iter().all(|t| t["task_id"] != tb.as_str()),
        "only the selected workload"
    );
    let first = tasks.iter().find(|t| t["task_id"] == t1.as_str()).unwrap();
    assert_eq!(first["on_behalf_of"], "alice@example.com");
    let calls = first["calls"].as_array().unwrap();
    assert!(
        calls.iter().any(|c| c["tool"] == "demo.read"
            && c["resource"] == "ticket/7"
            && c["decision"] == "allow"),
        "{first}"
    );
    assert_eq!(first["leases"][0]["lease_id"], l1["lease_id"]);
    assert_eq!(first["leases"][0]["live"], true);
    let second = tasks.iter().find(|t| t["task_id"] == t2.as_str()).unwrap();
    assert_eq!(second["leases"][0]["lease_id"], l2["lease_id"]);
    assert_eq!(second["leases"][0]["live"], false);
    assert_eq!(second["state"], "completed");
    assert_eq!(v["totals"]["live_leases"], 1);
    assert_eq!(v["totals"]["tasks"], 2);

    // the window: nothing since the future
    let later = leasehold::clock::rfc3339(
        h.clock
            .as_ref()
            .unwrap()
            .now()
            .saturating_add(Duration::from_secs(60)),
    );
    let (_, v) = h
        .get(
            &h.tokens.responder,
            &format!("/v1/blast-radius?workload={A}&since={later}"),
        )
        .await;
    assert!(v["tasks"].as_array().unwrap().is_empty(), "{v}");
    // bad input and roles
    let (s, v) = h.get(&h.tokens.responder, "/v1/blast-radius").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_parameter"))
    );
    let (s, v) = h
        .get(
            &h.tokens.responder,
            &format!("/v1/blast-radius?workload={A}&since={later}&until=2020-01-01T00:00:00Z"),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_time_range"))
    );
    let (s, _) = h
        .get(&h.tokens.a, &format!("/v1/blast-radius?workload={A}"))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_all_job_spares_operators_and_the_broker_s_own_credentials() {
    let h = start(Arc::new(Flaky::default()), |_| {}).await;
    fill(&h, &h.tokens.a, "token", "demo", 20).await;
    fill(&h, &h.tokens.b, "flaky", "r", 20).await;
    let (s, started) = h
        .post(
            &h.tokens.responder,
            "/v1/revocations",
            json!({"all": true, "reason": "rotate everything"}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{started}");
    let id = started["job_id"].as_str().unwrap().to_owned();
    let done = wait_job(&h, &id, "done", |v| v["state"] == "done").await;
    assert_eq!(
        count(&done, "token", "revoked") + count(&done, "flaky", "revoked"),
        40,
        "{done}"
    );
    let st = stats(&h).await;
    assert_eq!(st["leases"]["token"]["active"], 0);
    assert_eq!(st["leases"]["flaky"]["active"], 0);
    // operators still authenticate; the providers still issue (their own
    // upstream credentials are configuration, never leases)
    for t in [&h.tokens.admin, &h.tokens.responder] {
        assert_eq!(h.get(t, "/v1/stats").await.0, StatusCode::OK);
    }
    let task = h.open_task(&h.tokens.a, 600).await;
    let l = h.lease(&h.tokens.a, &task, 60).await;
    assert!(
        h.introspect(l["credential"]["token"].as_str().unwrap())
            .await
    );
    let (s, _) = h
        .post(
            &h.tokens.a,
            &format!("/v1/tasks/{task}/leases"),
            json!({"provider": "flaky", "role": "r", "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
}
