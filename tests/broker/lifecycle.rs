//! The full lifecycle over HTTP: open -> lease -> use -> complete, and
//! completion revoking everything under the task.

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Harness, Options};

#[tokio::test]
async fn full_lifecycle_over_http() {
    let h = Harness::start(Options::default()).await;
    let t = &h.tokens;

    let (s, task) = h
        .post(
            &t.a,
            "/v1/tasks",
            json!({
                "purpose": "summarise the quarterly report",
                "on_behalf_of": "alice@example.com",
                "prompt": "Summarise Q3 for me",
                "tools": ["docs.read", "docs.read", "mail.send"],
                "ttl_seconds": 600
            }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{task}");
    let task_id = task["task_id"].as_str().unwrap();
    assert!(task_id.starts_with("task_"));
    assert_eq!(task["workload"], "dev:assistant-a");
    assert_eq!(task["state"], "open");
    assert_eq!(task["tools"], json!(["docs.read", "mail.send"]));
    // only the hash of the prompt is kept
    assert_eq!(task["prompt_sha256"], hex_sha256("Summarise Q3 for me"));
    assert!(task.get("prompt").is_none());

    let lease = h.lease(&t.a, task_id, 120).await;
    let lease_id = lease["lease_id"].as_str().unwrap().to_owned();
    assert_eq!(lease["state"], "active");
    assert_eq!(lease["task_id"], task_id);
    assert_eq!(lease["workload"], "dev:assistant-a");
    assert_eq!(lease["provider"], "token");
    assert_eq!(lease["role"], "demo");
    let token = lease["credential"]["token"].as_str().unwrap().to_owned();
    assert_eq!(lease["credential"]["token_type"], "Bearer");

    // "use": a resource server introspects it, and sees who and for whom
    let resp = h
        .http
        .post(h.url("/v1/introspect"))
        .bearer_auth(&t.resource)
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    let i: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(i["active"], true);
    assert_eq!(i["sub"], "dev:assistant-a");
    assert_eq!(i["act"]["sub"], "alice@example.com");
    assert_eq!(i["jti"], lease_id.as_str());
    assert_eq!(i["task"], task_id);

    // the JWKS verifies the token's signature offline
    let (s, jwks) = h.get("", "/.well-known/jwks.json").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(jwks["keys"][0]["crv"], "Ed25519");

    // reading the lease never shows its credential
    let (s, shown) = h.get(&t.a, &format!("/v1/leases/{lease_id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(shown.get("credential").is_none());
    assert!(!shown.to_string().contains(&token));

    let (s, detail) = h.get(&t.a, &format!("/v1/tasks/{task_id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(detail["leases"].as_array().unwrap().len(), 1);
    assert_eq!(detail["lease_count"], 1);

    let (s, done) = h
        .post_empty(&t.a, &format!("/v1/tasks/{task_id}/complete"))
        .await;
    assert_eq!(s, StatusCode::OK, "{done}");
    assert_eq!(done["state"], "completed");
    assert_eq!(done["revoked"][0]["lease_id"], lease_id.as_str());
    assert_eq!(done["revoked"][0]["state"], "revoked");
    assert_eq!(done["revoked"][0]["revocation"]["cause"], "task_complete");
    assert!(
        !h.introspect(&token).await,
        "revoked means dead at the provider"
    );

    // the task is closed for new leases
    let (s, e) = h
        .post(
            &t.a,
            &format!("/v1/tasks/{task_id}/leases"),
            json!({"provider": "token", "role": "demo", "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("task_completed"))
    );
}

fn hex_sha256(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn completion_revokes_every_lease_before_answering() {
    let h = Harness::start(Options::default()).await;
    let t = &h.tokens;
    let task = h.open_task(&t.a, 600).await;
    let other = h.open_task(&t.a, 600).await;
    let mut tokens = Vec::new();
    for _ in 0..5 {
        tokens.push(
            h.lease(&t.a, &task, 300).await["credential"]["token"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let survivor = h.lease(&t.a, &other, 300).await;
    // one revoked by hand first: completion must still report the rest
    let first = h.get(&t.a, &format!("/v1/tasks/{task}")).await.1["leases"][0]["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, v) = h
        .post_empty(&t.a, &format!("/v1/leases/{first}/revoke"))
        .await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("revoked")));

    let (s, done) = h
        .post_empty(&t.a, &format!("/v1/tasks/{task}/complete"))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(done["revoked"].as_array().unwrap().len(), 4);
    assert!(done["pending"].as_array().unwrap().is_empty());
    // the answer came after the revocations: every token is already dead
    for tok in &tokens {
        assert!(!h.introspect(tok).await);
    }
    let (_, detail) = h.get(&t.a, &format!("/v1/tasks/{task}")).await;
    assert_eq!(detail["state"], "completed");
    assert!(
        detail["leases"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["state"] == "revoked")
    );
    // another task's lease is untouched
    assert!(
        h.introspect(survivor["credential"]["token"].as_str().unwrap())
            .await
    );
    assert_eq!(
        h.lease_state(survivor["lease_id"].as_str().unwrap()).await,
        "active"
    );
}

#[tokio::test]
async fn lease_ttl_is_capped_by_task_deadline_and_role() {
    let h = Harness::start(Options::default()).await;
    let t = &h.tokens;
    // task deadline (30 s) beats the requested 300 s
    let task = h.open_task(&t.a, 30).await;
    let l = h.lease(&t.a, &task, 300).await;
    let (_, detail) = h.get(&t.a, &format!("/v1/tasks/{task}")).await;
    let lease_exp = leasehold::clock::parse_rfc3339(l["expires_at"].as_str().unwrap()).unwrap();
    let task_exp = leasehold::clock::parse_rfc3339(detail["expires_at"].as_str().unwrap()).unwrap();
    assert!(lease_exp <= task_exp);
    assert!(l["ttl_seconds"].as_u64().unwrap() <= 30);
    // the role's max (900 s) beats the requested 3600 s (the config cap)
    let task = h.open_task(&t.a, 3600).await;
    let l = h.lease(&t.a, &task, 3600).await;
    assert!(l["ttl_seconds"].as_u64().unwrap() <= 900, "{l}");
}

#[tokio::test]
async fn request_ids_are_in_every_response() {
    let h = Harness::start(Options::default()).await;
    let r = h.http.get(h.url("/v1/health")).send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(id.starts_with("req_"), "{id}");
    assert_eq!(r.headers()["cache-control"], "no-store");
    let r = h
        .http
        .get(h.url("/v1/tasks/nope"))
        .header("x-request-id", "trace-abc.123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-abc.123");
    // junk ids are replaced, not echoed into logs
    let r = h
        .http
        .get(h.url("/v1/health"))
        .header("x-request-id", "a b\tc")
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_")
    );
    let (s, ready) = h.get("", "/v1/ready").await;
    assert_eq!(s, StatusCode::OK, "{ready}");
    assert_eq!(ready["checks"]["provider:token"], "ok");
}
