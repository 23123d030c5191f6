//! Runtime authorization over HTTP (issue 3): calls decided by policy with
//! their leases, approvals bound to the exact request, break-glass and its
//! review, quotas, and reloads that keep the old set when the new one is bad.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Harness, Options};

fn call_body(tool: &str, target: &str, credential: bool) -> Value {
    let mut b = json!({"tool": tool, "action": "run", "resource": target, "arguments_sha256": "ab".repeat(32)});
    if credential {
        b["credential"] = json!({"provider": "token", "role": "demo", "ttl_seconds": 600});
    }
    b
}

async fn open(h: &Harness, token: &str, user: &str) -> String {
    let (s, v) = h
        .post(token, "/v1/tasks", json!({"purpose": "triage", "on_behalf_of": user, "prompt": "p", "tools": ["demo.read", "demo.write", "demo.admin"], "ttl_seconds": 3600}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v["task_id"].as_str().unwrap().to_owned()
}

async fn call(h: &Harness, token: &str, task: &str, body: &Value) -> (StatusCode, Value) {
    h.post(token, &format!("/v1/tasks/{task}/calls"), body.clone())
        .await
}

#[tokio::test]
async fn calls_are_decided_and_allowed_calls_get_their_lease() {
    let h = Harness::start(Options::default()).await;
    let a = h.tokens.a.clone();
    let task = open(&h, &a, "alice@example.com").await;

    let (s, v) = call(&h, &a, &task, &call_body("demo.read", "doc:1", true)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["policies"], json!(["read-demo", "demo-token-leases"]));
    assert_eq!(v["max_ttl_seconds"], 900);
    let token = v["lease"]["credential"]["token"].as_str().unwrap();
    assert!(h.introspect(token).await);
    assert_eq!(v["lease"]["lease_id"], v["lease_id"]);

    // a call without a credential is decided and recorded, nothing issued
    let (s, v) = call(&h, &a, &task, &call_body("demo.read", "doc:2", false)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v.get("lease").is_none());

    // denials: undeclared tool, break-glass-only tool, unknown tool, forbidden by policy
    let narrow = h.open_task(&a, 600).await; // declares demo.read only
    let (s, v) = call(&h, &a, &narrow, &call_body("demo.write", "doc:1", false)).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("policy_denied")),
        "{v}"
    );
    assert!(
        v["decision"]["reasons"][0]
            .as_str()
            .unwrap()
            .contains("did not declare")
    );
    assert!(
        v["decision"]["call_id"]
            .as_str()
            .unwrap()
            .starts_with("call_")
    );
    let (s, v) = call(&h, &a, &task, &call_body("demo.admin", "db:prod", false)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(
        v["decision"]["reasons"][0]
            .as_str()
            .unwrap()
            .contains("only through break-glass"),
        "{v}"
    );
    let (s, v) = call(&h, &a, &task, &call_body("demo.nuke", "x", false)).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unknown_tool"))
    );

    // the task shows its calls, decided, with their leases
    let (_, detail) = h.get(&a, &format!("/v1/tasks/{task}")).await;
    let calls = detail["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 3, "{detail}");
    assert_eq!(calls[2]["decision"], "deny");
    assert!(calls[0]["lease_id"].as_str().is_some());
}

#[tokio::test]
async fn approval_round_trip_is_bound_used_once_and_recorded() {
    let h = Harness::start(Options::default()).await;
    let a = h.tokens.a.clone();
    let task = open(&h, &a, "alice@example.com").await;
    let body = call_body("demo.write", "ticket:42", true);
    let (s, v) = call(&h, &a, &task, &body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["decision"], "approval_required");
    let approval = v["approval_id"].as_str().unwrap().to_owned();

    // not usable before approval, and the workload cannot approve itself
    let mut retry = body.clone();
    retry["approval_id"] = approval.clone().into();
    let (s, v) = call(&h, &a, &task, &retry).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("approval_invalid")),
        "{v}"
    );
    assert_eq!(
        h.post(&a, &format!("/v1/approvals/{approval}/approve"), json!({}))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.post(
            &h.tokens.admin,
            &format!("/v1/approvals/{approval}/approve"),
            json!({})
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );

    let (_, list) = h.get(&h.tokens.approver, "/v1/approvals").await;
    let pending = &list["approvals"][0];
    assert_eq!(pending["approval_id"], approval.as_str());
    assert_eq!(pending["tool"], "demo.write");
    assert_eq!(pending["resource"], "ticket:42");
    assert_eq!(pending["credential"]["role"], "demo");

    // the workload long-polls while an approver approves
    let waiter = {
        let (http, url, a) = (
            h.http.clone(),
            h.url(&format!("/v1/approvals/{approval}?wait=10")),
            a.clone(),
        );
        tokio::spawn(async move {
            http.get(url)
                .bearer_auth(a)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, v) = h
        .post(
            &h.tokens.approver,
            &format!("/v1/approvals/{approval}/approve"),
            json!({"comment": "ok, ticket 42 only"}),
        )
        .await;
    assert_eq!(
        (s, v["state"].as_str()),
        (StatusCode::OK, Some("approved")),
        "{v}"
    );
    assert_eq!(waiter.await.unwrap()["state"], "approved");

    // bound to the exact request: another target does not match
    let mut other = retry.clone();
    other["resource"] = "ticket:43".into();
    let (s, v) = call(&h, &a, &task, &other).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another request")
    );
    // the right request goes through, once
    let (s, v) = call(&h, &a, &task, &retry).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["approval_id"], approval.as_str());
    assert!(v["lease"]["credential"]["token"].as_str().is_some());
    let (s, v) = call(&h, &a, &task, &retry).await;
    assert_eq!(
        (s, v["error"]["message"].as_str()),
        (StatusCode::CONFLICT, Some("the approval is consumed"))
    );

    let (_, ev) = h
        .get(
            &h.tokens.admin,
            &format!("/v1/events?task={task}&limit=100"),
        )
        .await;
    let kinds: Vec<&str> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in [
        "approval.requested",
        "approval.approved",
        "approval.consumed",
        "call.decided",
        "lease.issued",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    // one approval, approved once and used once: a reader sees no second approval
    let count = |k: &str| kinds.iter().filter(|x| **x == k).count();
    assert_eq!(
        (count("approval.approved"), count("approval.consumed")),
        (1, 1),
        "{kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_expire_and_denials_need_a_reason() {
    let h = Harness::start(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    let a = h.tokens.a.clone();
    let task = open(&h, &a, "alice@example.com").await;
    let body = call_body("demo.write", "ticket:1", false);
    let (_, v) = call(&h, &a, &task, &body).await;
    let first = v["approval_id"].as_str().unwrap().to_owned();
    let (_, v) = call(&h, &a, &task, &body).await;
    let second = v["approval_id"].as_str().unwrap().to_owned();

    let (s, v) = h
        .post(
            &h.tokens.approver,
            &format!("/v1/approvals/{second}/deny"),
            json!({}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("comment_required"))
    );
    let (s, v) = h
        .post(
            &h.tokens.approver,
            &format!("/v1/approvals/{second}/deny"),
            json!({"comment": "not today"}),
        )
        .await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("denied")));
    let mut retry = body.clone();
    retry["approval_id"] = second.clone().into();
    assert_eq!(call(&h, &a, &task, &retry).await.0, StatusCode::CONFLICT);

    // 15 minutes by default
    h.advance(Duration::from_secs(901));
    for _ in 0..200 {
        let (_, v) = h
            .get(&h.tokens.approver, &format!("/v1/approvals/{first}"))
            .await;
        if v["state"] == "expired" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, v) = h
        .get(&h.tokens.approver, &format!("/v1/approvals/{first}"))
        .await;
    assert_eq!(v["state"], "expired");
    let (s, v) = h
        .post(
            &h.tokens.approver,
            &format!("/v1/approvals/{first}/approve"),
            json!({}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("approval_invalid"))
    );
    let (_, ev) = h
        .get(&h.tokens.admin, "/v1/events?kind=approval.expired")
        .await;
    assert_eq!(ev["events"][0]["links"]["approval"], first.as_str());
}

#[tokio::test]
async fn an_approver_cannot_approve_for_themselves() {
    let h = Harness::start(Options::default()).await;
    let a = h.tokens.a.clone();
    // the dev approver is approver@example.com
    let task = open(&h, &a, "approver@example.com").await;
    let (_, v) = call(&h, &a, &task, &call_body("demo.write", "x", false)).await;
    let approval = v["approval_id"].as_str().unwrap();
    let (s, v) = h
        .post(
            &h.tokens.approver,
            &format!("/v1/approvals/{approval}/approve"),
            json!({}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("self_approval"))
    );
    let (_, v) = h
        .get(&h.tokens.approver, &format!("/v1/approvals/{approval}"))
        .await;
    assert_eq!(v["state"], "pending", "nothing changed");
}

/// A webhook receiver that records what it is sent.
async fn webhook() -> (String, Arc<Mutex<Vec<Value>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
            let g = g.clone();
            async move {
                g.lock().unwrap().push(v);
                StatusCode::NO_CONTENT
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, got)
}

#[tokio::test]
async fn break_glass_is_loud_capped_and_reviewed() {
    let (url, hooks) = webhook().await;
    let h = Harness::start(Options {
        tweak: Box::new(move |c| {
            c.policy.break_glass_max_ttl_seconds = 300;
            c.policy.webhook_url = Some(url.clone());
        }),
        ..Options::default()
    })
    .await;
    let a = h.tokens.a.clone();
    let task = open(&h, &a, "alice@example.com").await;
    let mut body = call_body("demo.admin", "db:prod", true);
    body["break_glass"] = json!({"justification": "prod database down, INC-7"});
    let (s, v) = call(&h, &a, &task, &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["break_glass"].as_bool().unwrap());
    assert!(
        v["lease"]["ttl_seconds"].as_u64().unwrap() <= 300,
        "forced to the break-glass maximum: {v}"
    );

    // refused without a justification, or without a BreakGlass permit
    let mut empty = body.clone();
    empty["break_glass"] = json!({"justification": " "});
    assert_eq!(call(&h, &a, &task, &empty).await.0, StatusCode::BAD_REQUEST);
    let b_task = open(&h, &h.tokens.b, "bob@example.com").await;
    let (s, v) = call(&h, &h.tokens.b, &b_task, &body).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(
        v["decision"]["reasons"][0]
            .as_str()
            .unwrap()
            .contains("break-glass is not permitted")
    );

    // flagged for review until an approver signs it off
    let (_, reviews) = h.get(&h.tokens.approver, "/v1/reviews").await;
    assert_eq!(reviews["reviews"][0]["task_id"], task.as_str());
    assert_eq!(
        reviews["reviews"][0]["calls"][0]["justification"],
        "prod database down, INC-7"
    );
    let (s, _) = h
        .post(
            &h.tokens.approver,
            &format!("/v1/reviews/{task}/sign-off"),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a sign-off needs a comment");
    let (s, v) = h
        .post(
            &h.tokens.approver,
            &format!("/v1/reviews/{task}/sign-off"),
            json!({"comment": "justified, INC-7"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, reviews) = h.get(&h.tokens.approver, "/v1/reviews").await;
    assert!(reviews["reviews"].as_array().unwrap().is_empty());

    let (_, ev) = h
        .get(
            &h.tokens.admin,
            &format!("/v1/events?task={task}&limit=100"),
        )
        .await;
    let kinds: Vec<&str> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"break_glass.used") && kinds.contains(&"break_glass.reviewed"),
        "{kinds:?}"
    );
    for _ in 0..100 {
        if hooks
            .lock()
            .unwrap()
            .iter()
            .any(|v| v["type"] == "break_glass.used")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = hooks.lock().unwrap().clone();
    let bg = got
        .iter()
        .find(|v| v["type"] == "break_glass.used")
        .expect("the webhook heard of it");
    assert_eq!(bg["task_id"], task.as_str());
}

#[tokio::test]
async fn a_failing_webhook_never_blocks_a_decision() {
    let h = Harness::start(Options {
        // nothing listens there
        tweak: Box::new(|c| {
            c.policy.webhook_url = Some(format!("http://{}/hook", crate::harness::free_port()))
        }),
        ..Options::default()
    })
    .await;
    let task = open(&h, &h.tokens.a, "alice@example.com").await;
    let started = std::time::Instant::now();
    let (s, _) = call(&h, &h.tokens.a, &task, &call_body("demo.write", "x", false)).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn hard_caps_answer_429() {
    let h = Harness::start(Options {
        tweak: Box::new(|c| {
            c.policy.max_active_leases_per_workload = 2;
            c.limits.max_leases_per_task = 3;
        }),
        ..Options::default()
    })
    .await;
    let a = h.tokens.a.clone();
    let task = open(&h, &a, "alice@example.com").await;
    for _ in 0..2 {
        assert_eq!(
            call(&h, &a, &task, &call_body("demo.read", "d", true))
                .await
                .0,
            StatusCode::OK
        );
    }
    let (s, v) = call(&h, &a, &task, &call_body("demo.read", "d", true)).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("workload_lease_cap"))
    );
    // another workload is unaffected; the per-task cap still applies
    let b = h.tokens.b.clone();
    let bt = open(&h, &b, "bob@example.com").await;
    for _ in 0..2 {
        assert_eq!(
            call(&h, &b, &bt, &call_body("demo.read", "d", true))
                .await
                .0,
            StatusCode::OK
        );
    }
    // revoke both: the workload is under its cap again, the task is not
    for l in h.get(&b, &format!("/v1/tasks/{bt}")).await.1["leases"]
        .as_array()
        .unwrap()
    {
        h.post_empty(
            &b,
            &format!("/v1/leases/{}/revoke", l["lease_id"].as_str().unwrap()),
        )
        .await;
    }
    let (s, v) = call(&h, &b, &bt, &call_body("demo.read", "d", true)).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::OK, None),
        "{v}"
    );
    let (s, v) = call(&h, &b, &bt, &call_body("demo.read", "d", true)).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("task_lease_cap"))
    );
}

#[tokio::test]
async fn a_bad_reload_is_refused_and_the_old_set_stays() {
    let h = Harness::start(Options::default()).await;
    let dir = h.config.policy.dir.clone();
    let a = h.tokens.a.clone();
    let task = open(&h, &a, "alice@example.com").await;
    let (_, before) = h.get(&h.tokens.admin, "/v1/policy").await;

    std::fs::write(
        dir.join("broken.cedar"),
        "\n\nforbid (principal, action, resource)\nwhen { context.no_such_field };",
    )
    .unwrap();
    let (s, v) = h.post_empty(&h.tokens.admin, "/v1/policy/reload").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("policy_invalid")),
        "{v}"
    );
    assert!(
        v["problems"][0]
            .as_str()
            .unwrap()
            .starts_with("broken.cedar:4:"),
        "{v}"
    );
    assert_eq!(h.get(&h.tokens.admin, "/v1/policy").await.1, before);
    assert_eq!(
        call(&h, &a, &task, &call_body("demo.read", "d", false))
            .await
            .0,
        StatusCode::OK,
        "old set in force"
    );

    std::fs::write(dir.join("broken.cedar"), "@id(\"no-reads\")\nforbid (principal, action == Leasehold::Action::\"Call\", resource == Leasehold::Tool::\"demo.read\");").unwrap();
    let (s, v) = h.post_empty(&h.tokens.admin, "/v1/policy/reload").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_ne!(v["version"], before["version"]);
    let (s, v) = call(&h, &a, &task, &call_body("demo.read", "d", false)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(v["decision"]["policies"], json!(["no-reads"]));
    assert_eq!(
        h.post_empty(&a, "/v1/policy/reload").await.0,
        StatusCode::FORBIDDEN
    );
    let (_, ev) = h
        .get(&h.tokens.admin, "/v1/events?kind=policy.reloaded")
        .await;
    assert_eq!(ev["events"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_policy_set() {
    use crate::harness::{Child, Remote, child_config, free_port};
    let dir = tempfile::tempdir().unwrap();
    let addr = free_port();
    let (config, creds) = child_config(dir.path(), addr, |_| {});
    let remote = Remote::new(addr);
    let mut child = Child::spawn(&config, addr, dir.path().join("broker.log"), "info");
    child.wait_healthy(&remote.http).await;
    let a = &creds.identities["assistant-a"].token;
    let body = json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "tools": ["demo.read"], "ttl_seconds": 600});
    let task = remote.post(a, "/v1/tasks", Some(body)).await["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let v = remote
        .post(
            a,
            &format!("/v1/tasks/{task}/calls"),
            Some(call_body("demo.read", "d", false)),
        )
        .await;
    assert_eq!(v["decision"], "allow");
    std::fs::write(
        dir.path().join("policies/hup.cedar"),
        "@id(\"hup\")\nforbid (principal, action == Leasehold::Action::\"Call\", resource);",
    )
    .unwrap();
    let pid = child.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut denied = false;
    for _ in 0..200 {
        let v = remote
            .post(
                a,
                &format!("/v1/tasks/{task}/calls"),
                Some(call_body("demo.read", "d", false)),
            )
            .await;
        if v["decision"]["policies"] == json!(["hup"]) {
            denied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(denied, "SIGHUP did not reload the policy set");
    assert!(
        child.terminate().success(),
        "SIGHUP must not stop the broker"
    );
}

/// A long-poll longer than the request timeout answers with the approval
/// as it stands just before the deadline, never with a timeout.
#[tokio::test]
async fn a_long_poll_answers_before_the_request_times_out() {
    let h = Harness::start(Options {
        tweak: Box::new(|c| c.server.request_timeout_seconds = 3),
        ..Options::default()
    })
    .await;
    let a = h.tokens.a.clone();
    let task = open(&h, &a, "alice@example.com").await;
    let (s, v) = call(&h, &a, &task, &call_body("demo.write", "ticket:9", false)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["approval_id"].as_str().unwrap();
    let started = std::time::Instant::now();
    let (s, v) = h
        .get(&a, &format!("/v1/approvals/{id}?wait=9223372036854775808"))
        .await;
    let took = started.elapsed();
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "pending");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(3),
        "{took:?}"
    );
}
