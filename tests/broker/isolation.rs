//! Least visibility (invariant 7): a workload sees and touches only its own
//! tasks and leases, and another workload's look absent (404, not 403, so
//! ids cannot be probed). Operator roles are separate.

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Harness, Options};

#[tokio::test]
async fn a_workload_cannot_see_or_touch_another_workloads_things() {
    let h = Harness::start(Options::default()).await;
    let t = &h.tokens;
    let task = h.open_task(&t.a, 600).await;
    let lease = h.lease(&t.a, &task, 300).await;
    let lease_id = lease["lease_id"].as_str().unwrap();
    let before = h.snapshot().await;

    let cases = [
        ("GET", format!("/v1/tasks/{task}"), "task_not_found"),
        (
            "POST",
            format!("/v1/tasks/{task}/complete"),
            "task_not_found",
        ),
        ("POST", format!("/v1/tasks/{task}/leases"), "task_not_found"),
        ("GET", format!("/v1/leases/{lease_id}"), "lease_not_found"),
        (
            "POST",
            format!("/v1/leases/{lease_id}/revoke"),
            "lease_not_found",
        ),
    ];
    for (method, path, code) in &cases {
        let body = path
            .ends_with("/leases")
            .then(|| json!({"provider": "token", "role": "demo", "ttl_seconds": 60}));
        let (s, v) = h.call(method.parse().unwrap(), &t.b, path, body).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some(*code)),
            "{method} {path}"
        );
    }
    // B's own world is empty of A's things, and listing everything is for operators
    let (s, v) = h.get(&t.b, "/v1/leases").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );

    assert_eq!(h.snapshot().await, before, "nothing changed");
    assert_eq!(h.lease_state(lease_id).await, "active");
    assert!(
        h.introspect(lease["credential"]["token"].as_str().unwrap())
            .await
    );
}

#[tokio::test]
async fn operator_roles_are_separate() {
    let h = Harness::start(Options::default()).await;
    let t = &h.tokens;
    let task = h.open_task(&t.a, 600).await;
    let lease = h.lease(&t.a, &task, 300).await;
    let lease_id = lease["lease_id"].as_str().unwrap();

    // admin reads tasks and leases; responder reads leases; approver neither
    assert_eq!(
        h.get(&t.admin, &format!("/v1/tasks/{task}")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        h.get(&t.responder, &format!("/v1/leases/{lease_id}"))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        h.get(&t.responder, &format!("/v1/tasks/{task}")).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.get(&t.approver, &format!("/v1/leases/{lease_id}"))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.get(&t.approver, "/v1/leases").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.get(&t.resource, &format!("/v1/leases/{lease_id}"))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    // operators never open tasks or hold leases
    let (s, v) = h
        .post(
            &t.admin,
            "/v1/tasks",
            json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("workload_required"))
    );
    // introspection is for resource servers, not workloads
    let r = h
        .http
        .post(h.url("/v1/introspect"))
        .bearer_auth(&t.b)
        .form(&[("token", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // a responder may revoke anyone's lease
    let (s, v) = h
        .post_empty(&t.responder, &format!("/v1/leases/{lease_id}/revoke"))
        .await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("revoked")));
    assert_eq!(v["revocation"]["requested_by"], "operator:responder");
}
