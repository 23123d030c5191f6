//! Bad input, table-driven: each case gets the right status and a stable
//! error code, and none changes stored state (the lease snapshot and the
//! task are compared before and after every case).

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Harness, Options};

#[derive(Clone, Copy)]
enum Who {
    A,
    Admin,
    Nobody,
}

enum Body {
    None,
    Json(Value),
    Raw(&'static str, String),
}

struct Case {
    name: &'static str,
    who: Who,
    method: Method,
    path: String,
    body: Body,
    status: StatusCode,
    code: &'static str,
}

fn case(
    name: &'static str,
    method: Method,
    path: impl Into<String>,
    body: Body,
    status: StatusCode,
    code: &'static str,
) -> Case {
    Case {
        name,
        who: Who::A,
        method,
        path: path.into(),
        body,
        status,
        code,
    }
}

async fn check(h: &Harness, c: &Case) {
    let token = match c.who {
        Who::A => h.tokens.a.clone(),
        Who::Admin => h.tokens.admin.clone(),
        Who::Nobody => String::new(),
    };
    let mut req = h.http.request(c.method.clone(), h.url(&c.path));
    if !token.is_empty() {
        req = req.bearer_auth(token);
    }
    req = match &c.body {
        Body::None => req,
        Body::Json(v) => req.json(v),
        Body::Raw(ct, text) => {
            let r = req.body(text.clone());
            if ct.is_empty() {
                r
            } else {
                r.header("content-type", *ct)
            }
        }
    };
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let v: Value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{}: not JSON: {text}", c.name));
    assert_eq!(status, c.status, "{}: {v}", c.name);
    if c.status.is_success() {
        return;
    }
    assert_eq!(v["error"]["code"], c.code, "{}: {v}", c.name);
    assert!(
        !v["error"]["message"].as_str().unwrap_or("").is_empty(),
        "{}: a message for people",
        c.name
    );
}

fn lease_req(ttl: Value, provider: &str, role: &str) -> Body {
    Body::Json(json!({"provider": provider, "role": role, "ttl_seconds": ttl}))
}

fn task_req(ttl: Value) -> Body {
    Body::Json(json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": ttl}))
}

#[tokio::test]
async fn every_bad_input_has_its_status_and_code_and_changes_nothing() {
    let h = Harness::start(Options::default()).await;
    let a = h.tokens.a.clone();
    let open = h.open_task(&a, 600).await;
    let live = h.lease(&a, &open, 300).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = h.open_task(&a, 600).await;
    let dead = h.lease(&a, &done, 300).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        h.post_empty(&a, &format!("/v1/tasks/{done}/complete"))
            .await
            .0,
        StatusCode::OK
    );
    let unknown_task = leasehold::ids::TaskId::generate(crate::harness::now_rounded()).to_string();
    let unknown_lease =
        leasehold::ids::LeaseId::generate(crate::harness::now_rounded()).to_string();
    let leases = format!("/v1/tasks/{open}/leases");
    let huge = "x".repeat(70 * 1024);
    use Method as M;
    use StatusCode as S;

    let mut cases = vec![
        case(
            "malformed JSON",
            M::POST,
            "/v1/tasks",
            Body::Raw("application/json", "{\"purpose\": ".into()),
            S::BAD_REQUEST,
            "malformed_json",
        ),
        case(
            "not an object",
            M::POST,
            "/v1/tasks",
            Body::Raw("application/json", "[1,2]".into()),
            S::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "unknown field",
            M::POST,
            "/v1/tasks",
            Body::Json(
                json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 60, "admin": true}),
            ),
            S::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "wrong type",
            M::POST,
            "/v1/tasks",
            task_req(json!("60")),
            S::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "missing field",
            M::POST,
            "/v1/tasks",
            Body::Json(json!({"purpose": "p", "prompt": "x", "ttl_seconds": 60})),
            S::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "no content type",
            M::POST,
            "/v1/tasks",
            Body::Raw("", "{}".into()),
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        case(
            "oversized body",
            M::POST,
            "/v1/tasks",
            Body::Raw("application/json", format!("{{\"purpose\":\"{huge}\"}}")),
            S::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        case(
            "task ttl zero",
            M::POST,
            "/v1/tasks",
            task_req(json!(0)),
            S::BAD_REQUEST,
            "invalid_ttl",
        ),
        case(
            "task ttl negative",
            M::POST,
            "/v1/tasks",
            task_req(json!(-5)),
            S::BAD_REQUEST,
            "invalid_ttl",
        ),
        case(
            "task ttl over the cap",
            M::POST,
            "/v1/tasks",
            task_req(json!(8 * 3600 + 1)),
            S::BAD_REQUEST,
            "invalid_ttl",
        ),
        case(
            "task ttl not whole",
            M::POST,
            "/v1/tasks",
            task_req(json!(1.5)),
            S::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "neither prompt nor hash",
            M::POST,
            "/v1/tasks",
            Body::Json(json!({"purpose": "p", "on_behalf_of": "u", "ttl_seconds": 60})),
            S::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "bad prompt hash",
            M::POST,
            "/v1/tasks",
            Body::Json(
                json!({"purpose": "p", "on_behalf_of": "u", "prompt_sha256": "abc", "ttl_seconds": 60}),
            ),
            S::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "control characters",
            M::POST,
            "/v1/tasks",
            Body::Json(
                json!({"purpose": "p\u{7}", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 60}),
            ),
            S::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "bad tool name",
            M::POST,
            "/v1/tasks",
            Body::Json(
                json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "tools": ["rm -rf"], "ttl_seconds": 60}),
            ),
            S::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "lease ttl zero",
            M::POST,
            leases.clone(),
            lease_req(json!(0), "token", "demo"),
            S::BAD_REQUEST,
            "invalid_ttl",
        ),
        case(
            "lease ttl negative",
            M::POST,
            leases.clone(),
            lease_req(json!(-1), "token", "demo"),
            S::BAD_REQUEST,
            "invalid_ttl",
        ),
        case(
            "lease ttl over the cap",
            M::POST,
            leases.clone(),
            lease_req(json!(3601), "token", "demo"),
            S::BAD_REQUEST,
            "invalid_ttl",
        ),
        case(
            "unknown provider",
            M::POST,
            leases.clone(),
            lease_req(json!(60), "vault", "demo"),
            S::BAD_REQUEST,
            "unknown_provider",
        ),
        case(
            "unknown role",
            M::POST,
            leases.clone(),
            lease_req(json!(60), "token", "root"),
            S::BAD_REQUEST,
            "unknown_role",
        ),
        case(
            "scope outside the role",
            M::POST,
            leases.clone(),
            Body::Json(
                json!({"provider": "token", "role": "demo", "ttl_seconds": 60, "scope": ["admin:all"]}),
            ),
            S::BAD_REQUEST,
            "scope_not_allowed",
        ),
        case(
            "lease on a completed task",
            M::POST,
            format!("/v1/tasks/{done}/leases"),
            lease_req(json!(60), "token", "demo"),
            S::CONFLICT,
            "task_completed",
        ),
        case(
            "completing a completed task",
            M::POST,
            format!("/v1/tasks/{done}/complete"),
            Body::None,
            S::CONFLICT,
            "task_completed",
        ),
        case(
            "revoking a revoked lease",
            M::POST,
            format!("/v1/leases/{dead}/revoke"),
            Body::None,
            S::OK,
            "",
        ),
        case(
            "unknown task",
            M::GET,
            format!("/v1/tasks/{unknown_task}"),
            Body::None,
            S::NOT_FOUND,
            "task_not_found",
        ),
        case(
            "completing an unknown task",
            M::POST,
            format!("/v1/tasks/{unknown_task}/complete"),
            Body::None,
            S::NOT_FOUND,
            "task_not_found",
        ),
        case(
            "lease on an unknown task",
            M::POST,
            format!("/v1/tasks/{unknown_task}/leases"),
            lease_req(json!(60), "token", "demo"),
            S::NOT_FOUND,
            "task_not_found",
        ),
        case(
            "unknown lease",
            M::GET,
            format!("/v1/leases/{unknown_lease}"),
            Body::None,
            S::NOT_FOUND,
            "lease_not_found",
        ),
        case(
            "revoking an unknown lease",
            M::POST,
            format!("/v1/leases/{unknown_lease}/revoke"),
            Body::None,
            S::NOT_FOUND,
            "lease_not_found",
        ),
        case(
            "malformed task id",
            M::GET,
            "/v1/tasks/../../etc/passwd",
            Body::None,
            S::NOT_FOUND,
            "not_found",
        ),
        case(
            "malformed task id",
            M::GET,
            "/v1/tasks/task_xyz",
            Body::None,
            S::BAD_REQUEST,
            "invalid_id",
        ),
        case(
            "a lease id as task id",
            M::GET,
            format!("/v1/tasks/{live}"),
            Body::None,
            S::BAD_REQUEST,
            "invalid_id",
        ),
        case(
            "no such endpoint",
            M::GET,
            "/v1/nothing",
            Body::None,
            S::NOT_FOUND,
            "not_found",
        ),
        case(
            "wrong method",
            M::DELETE,
            format!("/v1/tasks/{open}"),
            Body::None,
            S::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    let mut more = vec![
        Case {
            name: "no credential",
            who: Who::Nobody,
            method: M::POST,
            path: "/v1/tasks".into(),
            body: task_req(json!(60)),
            status: S::UNAUTHORIZED,
            code: "unauthenticated",
        },
        Case {
            name: "unknown list filter",
            who: Who::Admin,
            method: M::GET,
            path: "/v1/leases?colour=red".into(),
            body: Body::None,
            status: S::BAD_REQUEST,
            code: "invalid_parameter",
        },
        Case {
            name: "unknown state filter",
            who: Who::Admin,
            method: M::GET,
            path: "/v1/leases?state=zombie".into(),
            body: Body::None,
            status: S::BAD_REQUEST,
            code: "invalid_parameter",
        },
        Case {
            name: "limit zero",
            who: Who::Admin,
            method: M::GET,
            path: "/v1/leases?limit=0".into(),
            body: Body::None,
            status: S::BAD_REQUEST,
            code: "invalid_parameter",
        },
        Case {
            name: "bad cursor",
            who: Who::Admin,
            method: M::GET,
            path: "/v1/leases?cursor=x".into(),
            body: Body::None,
            status: S::BAD_REQUEST,
            code: "invalid_id",
        },
    ];
    cases.append(&mut more);

    let before = h.snapshot().await;
    let (_, task_before) = h.get(&a, &format!("/v1/tasks/{open}")).await;
    for c in &cases {
        check(&h, c).await;
        assert_eq!(
            h.snapshot().await,
            before,
            "{} changed stored state",
            c.name
        );
    }
    let (_, task_after) = h.get(&a, &format!("/v1/tasks/{open}")).await;
    assert_eq!(task_before, task_after);
    // the idempotent revoke answered with the lease as it was
    let (s, v) = h.post_empty(&a, &format!("/v1/leases/{dead}/revoke")).await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("revoked")));
    assert_eq!(h.lease_state(&live).await, "active");
}
