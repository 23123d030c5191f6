//! The OpenAPI document (issue 10): every route is described, the document
//! the broker serves is the one `leasehold openapi` writes, and every
//! documented operation, driven with a request that conforms to its schema,
//! answers a documented status with a body that conforms to that status's
//! schema.

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Harness, Options};

fn document() -> Value {
    serde_json::from_str(&leasehold::api::openapi::document_json().expect("the document renders"))
        .expect("the document is JSON")
}

/// Every (METHOD, path template) the document describes.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if matches!(
                method.as_str(),
                "get" | "post" | "put" | "patch" | "delete" | "head" | "options"
            ) {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// A validator for `schema`, resolving `#/components/...` in `doc`.
fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let root = json!({"allOf": [schema], "components": doc["components"]});
    jsonschema::draft202012::new(&root)
        .unwrap_or_else(|e| panic!("schema {schema} does not compile: {e}"))
}

fn check(doc: &Value, schema: &Value, instance: &Value, what: &str) {
    let v = validator(doc, schema);
    let errors: Vec<String> = v
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} does not conform to its schema:\n  {}\ninstance: {instance:#}",
        errors.join("\n  ")
    );
}

enum Body {
    None,
    Json(Value),
    Form(Vec<(&'static str, String)>),
}

/// Drives operations against a broker and checks each exchange against
/// the document; remembers which operations it drove.
struct Driver<'h> {
    h: &'h Harness,
    doc: Value,
    driven: BTreeSet<(String, String)>,
}

impl<'h> Driver<'h> {
    fn new(h: &'h Harness) -> Self {
        Self {
            h,
            doc: document(),
            driven: BTreeSet::new(),
        }
    }

    /// Send `method path` (the template names the documented operation),
    /// check the request body against the request schema, the status
    /// against the documented ones and the body against that response's
    /// schema. Returns the status and the body.
    async fn drive(
        &mut self,
        method: Method,
        template: &str,
        path: &str,
        token: &str,
        body: Body,
    ) -> (StatusCode, Value) {
        let op = self.doc["paths"][template][method.as_str().to_lowercase()].clone();
        assert!(op.is_object(), "{method} {template} is not documented");
        let mut req = self.h.http.request(method.clone(), self.h.url(path));
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        match &body {
            Body::None => {}
            Body::Json(v) => {
                let schema = &op["requestBody"]["content"]["application/json"]["schema"];
                assert!(
                    schema.is_object(),
                    "{method} {template} documents no JSON body"
                );
                check(
                    &self.doc,
                    schema,
                    v,
                    &format!("the request to {method} {template}"),
                );
                req = req.json(v);
            }
            Body::Form(fields) => {
                assert!(
                    op["requestBody"]["content"]["application/x-www-form-urlencoded"].is_object(),
                    "{method} {template} documents no form body"
                );
                req = req.form(fields);
            }
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let text = resp.text().await.expect("body");
        let documented = &op["responses"][status.as_str()];
        assert!(
            documented.is_object(),
            "{method} {path} answered {status}, which its operation does not document: {text}"
        );
        let content = documented["content"].as_object().expect("response content");
        let (media, media_obj) = content.iter().next().expect("one media type");
        assert!(
            ctype.starts_with(media.split(';').next().unwrap_or(media)),
            "{method} {path}: content type {ctype}, documented {media}"
        );
        let value = if media.starts_with("application/json") {
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
            check(
                &self.doc,
                &media_obj["schema"],
                &v,
                &format!("the {status} answer of {method} {path}"),
            );
            v
        } else {
            assert!(!text.is_empty(), "{method} {path}: empty {media} body");
            Value::String(text)
        };
        self.driven
            .insert((method.to_string(), template.to_owned()));
        (status, value)
    }
}

fn call_body(tool: &str, resource: &str) -> Value {
    json!({"tool": tool, "action": "run", "resource": resource,
           "arguments_sha256": "ab".repeat(32),
           "credential": {"provider": "token", "role": "demo", "ttl_seconds": 300}})
}

#[tokio::test]
async fn every_documented_operation_conforms_to_the_document() {
    // the prune below is of a fresh event: allowed only with no minimum age
    let h = Harness::start(Options {
        tweak: Box::new(|c| c.audit.prune_min_age_seconds = 0),
        ..Options::default()
    })
    .await;
    let t = &h.tokens;
    let mut d = Driver::new(&h);
    use Body::{Form, Json as J, None as N};
    use Method as M;

    // probes and public keys
    d.drive(M::GET, "/v1/health", "/v1/health", "", N).await;
    d.drive(M::GET, "/v1/ready", "/v1/ready", "", N).await;
    let (_, served) = d
        .drive(M::GET, "/v1/openapi.json", "/v1/openapi.json", "", N)
        .await;
    assert_eq!(served, d.doc, "the served document is the generated one");
    let (_, jwks) = d
        .drive(
            M::GET,
            "/.well-known/jwks.json",
            "/.well-known/jwks.json",
            "",
            N,
        )
        .await;
    assert!(!jwks["keys"].as_array().unwrap().is_empty());

    // a task, a lease, calls of every outcome
    let (s, task) = d
        .drive(
            M::POST,
            "/v1/tasks",
            "/v1/tasks",
            &t.a,
            J(json!({
            "purpose": "triage", "on_behalf_of": "alice@example.com", "prompt": "look into it",
            "tools": ["demo.read", "demo.write", "demo.admin"], "ttl_seconds": 3600})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let id = task["task_id"].as_str().unwrap().to_owned();
    let workload = task["workload"].as_str().unwrap().to_owned();
    let (s, lease) = d
        .drive(
            M::POST,
            "/v1/tasks/{id}/leases",
            &format!("/v1/tasks/{id}/leases"),
            &t.a,
            J(json!({"provider": "token", "role": "demo", "ttl_seconds": 300})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let lease_id = lease["lease_id"].as_str().unwrap().to_owned();
    let calls = format!("/v1/tasks/{id}/calls");
    let (s, allowed) = d
        .drive(
            M::POST,
            "/v1/tasks/{id}/calls",
            &calls,
            &t.a,
            J(call_body("demo.read", "doc:1")),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let token = allowed["lease"]["credential"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    // the egress proxy's two routes: a proxy credential, a call with it
    // (minting, then reusing the lease), and one it refuses
    let pcs = format!("/v1/tasks/{id}/proxy-credentials");
    let (s, pc) = d
        .drive(
            M::POST,
            "/v1/tasks/{id}/proxy-credentials",
            &pcs,
            &t.a,
            J(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{pc}");
    let cred = pc["proxy_credential"].as_str().unwrap().to_owned();
    let pcall = |reuse: Option<&str>| {
        let mut b = json!({"proxy_credential": cred, "tool": "demo.read", "action": "GET",
            "resource": "api.example.org/v1/x",
            "credential": {"provider": "token", "role": "demo", "ttl_seconds": 60}});
        if let Some(l) = reuse {
            b["reuse_lease"] = json!(l);
        }
        b
    };
    let (s, minted) = d
        .drive(
            M::POST,
            "/v1/proxy/calls",
            "/v1/proxy/calls",
            &t.proxy,
            J(pcall(None)),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{minted}");
    let proxied = minted["lease"]["lease_id"].as_str().unwrap().to_owned();
    let (s, reused) = d
        .drive(
            M::POST,
            "/v1/proxy/calls",
            "/v1/proxy/calls",
            &t.proxy,
            J(pcall(Some(&proxied))),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{reused}");
    assert_eq!(reused["lease_id"], proxied.as_str());
    assert!(
        reused.get("lease").is_none(),
        "a reused lease's credential is not sent again"
    );
    let (s, wrong) = d
        .drive(
            M::POST,
            "/v1/proxy/calls",
            "/v1/proxy/calls",
            &t.proxy,
            J(pcall(Some("lease_00000000000000000000000000"))),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "no such lease of the task: {wrong}"
    );
    let (s, held) = d
        .drive(
            M::POST,
            "/v1/tasks/{id}/calls",
            &calls,
            &t.a,
            J(call_body("demo.write", "ticket:1")),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let approval = held["approval_id"].as_str().unwrap().to_owned();
    let (s, denied) = d
        .drive(
            M::POST,
            "/v1/tasks/{id}/calls",
            &calls,
            &t.a,
            J(json!({
            "tool": "demo.admin", "action": "run", "resource": "db:prod"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{denied}");
    assert_eq!(denied["error"]["code"], "policy_denied");
    let mut glass = call_body("demo.admin", "db:prod");
    glass["break_glass"] = json!({"justification": "prod database down, INC-7"});
    let (s, _) = d
        .drive(M::POST, "/v1/tasks/{id}/calls", &calls, &t.a, J(glass))
        .await;
    assert_eq!(s, StatusCode::OK);
    d.drive(
        M::GET,
        "/v1/tasks/{id}",
        &format!("/v1/tasks/{id}"),
        &t.a,
        N,
    )
    .await;

    // approvals and reviews
    let (_, pending) = d
        .drive(M::GET, "/v1/approvals", "/v1/approvals", &t.approver, N)
        .await;
    assert_eq!(pending["approvals"].as_array().unwrap().len(), 1);
    d.drive(
        M::GET,
        "/v1/approvals/{id}",
        &format!("/v1/approvals/{approval}?wait=0"),
        &t.a,
        N,
    )
    .await;
    // the body is optional: JSON `null`, which the document allows, is no comment
    let (s, _) = d
        .drive(
            M::POST,
            "/v1/approvals/{id}/approve",
            &format!("/v1/approvals/{approval}/approve"),
            &t.approver,
            J(Value::Null),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, held) = d
        .drive(
            M::POST,
            "/v1/tasks/{id}/calls",
            &calls,
            &t.a,
            J(call_body("demo.write", "ticket:2")),
        )
        .await;
    let second = held["approval_id"].as_str().unwrap().to_owned();
    let (s, _) = d
        .drive(
            M::POST,
            "/v1/approvals/{id}/deny",
            &format!("/v1/approvals/{second}/deny"),
            &t.approver,
            J(json!({"comment": "not today"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, reviews) = d
        .drive(M::GET, "/v1/reviews", "/v1/reviews", &t.approver, N)
        .await;
    assert_eq!(reviews["reviews"].as_array().unwrap().len(), 1);
    let (s, _) = d
        .drive(
            M::POST,
            "/v1/reviews/{id}/sign-off",
            &format!("/v1/reviews/{id}/sign-off"),
            &t.approver,
            J(json!({"comment": "justified"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    // leases and tokens
    d.drive(
        M::GET,
        "/v1/leases",
        "/v1/leases?state=active&limit=10",
        &t.admin,
        N,
    )
    .await;
    d.drive(
        M::GET,
        "/v1/leases/{id}",
        &format!("/v1/leases/{lease_id}"),
        &t.a,
        N,
    )
    .await;
    let (_, active) = d
        .drive(
            M::POST,
            "/v1/introspect",
            "/v1/introspect",
            &t.resource,
            Form(vec![("token", token)]),
        )
        .await;
    assert_eq!(active["active"], true);
    let (_, revoked) = d
        .drive(
            M::POST,
            "/v1/leases/{id}/revoke",
            &format!("/v1/leases/{lease_id}/revoke"),
            &t.a,
            N,
        )
        .await;
    assert_eq!(revoked["state"], "revoked");
    let (s, _) = d
        .drive(
            M::POST,
            "/v1/leases/{id}/abandon",
            &format!("/v1/leases/{lease_id}/abandon"),
            &t.responder,
            J(json!({"reason": "gone"})),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "only an irrevocable lease can be abandoned"
    );

    // admin: policy, stats, metrics, the chain
    d.drive(M::GET, "/v1/policy", "/v1/policy", &t.admin, N)
        .await;
    d.drive(
        M::POST,
        "/v1/policy/reload",
        "/v1/policy/reload",
        &t.admin,
        N,
    )
    .await;
    d.drive(M::GET, "/v1/stats", "/v1/stats", &t.admin, N).await;
    d.drive(M::GET, "/v1/cluster", "/v1/cluster", &t.responder, N)
        .await;
    // who and what, for clients that check before they start
    let (_, me) = d.drive(M::GET, "/v1/whoami", "/v1/whoami", &t.a, N).await;
    assert_eq!(me["kind"], "workload", "{me}");
    let (_, me) = d
        .drive(M::GET, "/v1/whoami", "/v1/whoami", &t.approver, N)
        .await;
    assert_eq!(me["roles"], serde_json::json!(["approver"]), "{me}");
    let (_, p) = d
        .drive(M::GET, "/v1/providers", "/v1/providers", &t.a, N)
        .await;
    assert!(
        p["providers"][0]["roles"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["binding"] == "required"),
        "{p}"
    );
    d.drive(M::GET, "/metrics", "/metrics", &t.admin, N).await;
    let (_, events) = d
        .drive(
            M::GET,
            "/v1/events",
            &format!("/v1/events?task={id}&limit=3"),
            &t.responder,
            N,
        )
        .await;
    assert!(events["next_cursor"].is_u64(), "{events}");
    let (_, report) = d
        .drive(
            M::GET,
            "/v1/events/verify",
            "/v1/events/verify",
            &t.admin,
            N,
        )
        .await;
    assert_eq!(report["ok"], true);
    d.drive(M::GET, "/v1/events/chain", "/v1/events/chain", &t.admin, N)
        .await;
    let (_, first) = d
        .drive(M::GET, "/v1/events", "/v1/events?limit=1", &t.admin, N)
        .await;
    assert!(first["events"][0]["hash"].is_string());
    let (s, _) = d
        .drive(
            M::POST,
            "/v1/events/archive",
            "/v1/events/archive",
            &t.admin,
            J(json!({"through_seq": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    // incident response
    let (s, dry) = d
        .drive(
            M::POST,
            "/v1/revocations",
            "/v1/revocations",
            &t.responder,
            J(json!({"workload": workload, "reason": "drill", "dry_run": true})),
        )
        .await;
    assert_eq!((s, &dry["dry_run"]), (StatusCode::OK, &json!(true)));
    let (s, job) = d
        .drive(
            M::POST,
            "/v1/revocations",
            "/v1/revocations",
            &t.responder,
            J(json!({"workload": workload, "reason": "drill", "fence": true})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let job_id = job["job_id"].as_str().unwrap().to_owned();
    d.drive(
        M::GET,
        "/v1/revocations",
        "/v1/revocations",
        &t.responder,
        N,
    )
    .await;
    d.drive(
        M::GET,
        "/v1/revocations/{id}",
        &format!("/v1/revocations/{job_id}"),
        &t.responder,
        N,
    )
    .await;
    let (_, fences) = d
        .drive(M::GET, "/v1/fences", "/v1/fences", &t.responder, N)
        .await;
    assert_eq!(fences["fences"].as_array().unwrap().len(), 1);
    d.drive(
        M::GET,
        "/v1/blast-radius",
        &format!("/v1/blast-radius?workload={workload}"),
        &t.responder,
        N,
    )
    .await;
    let (s, _) = d
        .drive(
            M::POST,
            "/v1/fences/lift",
            "/v1/fences/lift",
            &t.responder,
            J(json!({"kind": "workload", "value": workload, "reason": "drill over"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = d
        .drive(
            M::POST,
            "/v1/providers/{name}/reconcile",
            "/v1/providers/token/reconcile",
            &t.responder,
            J(json!({})),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "token leases expire on their own: {v}"
    );
    let (s, _) = d
        .drive(
            M::POST,
            "/v1/tasks/{id}/complete",
            &format!("/v1/tasks/{id}/complete"),
            &t.a,
            N,
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    // the error shape, on a few failures
    for (template, path, token, want) in [
        (
            "/v1/leases/{id}",
            "/v1/leases/lease_nope",
            t.a.as_str(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/tasks/{id}",
            "/v1/tasks/task_0000000000000000000000000",
            t.a.as_str(),
            StatusCode::BAD_REQUEST,
        ),
        ("/v1/stats", "/v1/stats", "", StatusCode::UNAUTHORIZED),
        (
            "/v1/cluster",
            "/v1/cluster",
            t.a.as_str(),
            StatusCode::FORBIDDEN,
        ),
        (
            "/v1/stats",
            "/v1/stats",
            t.a.as_str(),
            StatusCode::FORBIDDEN,
        ),
    ] {
        let (s, _) = d.drive(M::GET, template, path, token, N).await;
        assert_eq!(s, want, "{path}");
    }

    let all = operations(&d.doc);
    let missed: Vec<_> = all.difference(&d.driven).collect();
    assert!(
        missed.is_empty(),
        "operations this test does not drive: {missed:?}"
    );
}

#[tokio::test]
async fn every_documented_operation_reaches_a_handler() {
    let h = Harness::start(Options::default()).await;
    let doc = document();
    for (method, template) in operations(&doc) {
        let path = template.replace("{id}", "x").replace("{name}", "x");
        let (status, body) = h
            .call(
                Method::from_bytes(method.as_bytes()).unwrap(),
                "",
                &path,
                None,
            )
            .await;
        let code = body["error"]["code"].as_str().unwrap_or("");
        assert!(
            !matches!(code, "not_found" | "method_not_allowed"),
            "{method} {template} is documented but no route answers it ({status} {body})"
        );
    }
    // and the converse: an undocumented path is the fallback's
    let (s, v) = h.get("", "/v1/undocumented").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
}

/// Routes are registered only through `utoipa_axum::routes!`, which takes
/// each one's method and path from the handler's `#[utoipa::path]`: no
/// plain axum registration may creep into the API router. The one
/// exception is the web console's HTML pages, merged whole, every one of
/// them under `/console`. The metrics listener serves a subset of the
/// documented paths.
#[test]
fn no_route_is_registered_outside_the_document() {
    let src = include_str!("../../src/api/mod.rs");
    let start = src.find("pub(crate) fn routes()").expect("routes()");
    let end = src.find("pub fn metrics_router").expect("metrics_router");
    let api = src[start..end].replacen(".merge(console::routes())", "", 1);
    let console = include_str!("../../src/api/console/mod.rs");
    let mut pages = 0;
    for piece in console.split(".route(\"").skip(1) {
        let path = piece.split('"').next().unwrap();
        assert!(
            path == "/console" || path.starts_with("/console/"),
            "the console registers {path}, outside /console"
        );
        pages += 1;
    }
    assert!(pages > 10, "only {pages} console routes read");
    for plain in [
        ".route(",
        ".route_service(",
        ".nest(",
        ".nest_service(",
        ".merge(",
    ] {
        assert!(
            !api.contains(plain),
            "the API router registers a route with `{plain}`: use `.routes(routes!(handler))` with a #[utoipa::path]"
        );
    }
    let doc = document();
    let metrics = &src[end..];
    let mut n = 0;
    for piece in metrics.split(".route(\"").skip(1) {
        let path = piece.split('"').next().unwrap();
        assert!(
            doc["paths"][path].is_object(),
            "the metrics listener serves {path}, which the document does not describe"
        );
        n += 1;
    }
    assert_eq!(
        n, 3,
        "the metrics listener's routes changed; update this test"
    );
}

#[test]
fn the_cli_writes_the_served_document() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("openapi.json");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["openapi", "--output"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let written: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(written, document());
    assert_eq!(written["openapi"], "3.1.0");
    let schemes = &written["components"]["securitySchemes"];
    assert_eq!(schemes["workload"]["scheme"], "bearer");
    assert_eq!(schemes["workload"]["bearerFormat"], "JWT");
    assert_eq!(schemes["operator"]["scheme"], "bearer");
    // every operation says who may call it, except the public ones
    let public = [
        "/v1/health",
        "/v1/ready",
        "/v1/openapi.json",
        "/.well-known/jwks.json",
    ];
    for (method, path) in operations(&written) {
        let op = &written["paths"][&path][method.to_lowercase()];
        assert_eq!(
            op["security"].is_array(),
            !public.contains(&path.as_str()),
            "{method} {path}: security requirement"
        );
        assert!(
            op["operationId"].is_string(),
            "{method} {path}: operationId"
        );
        assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
    }
}

/// The checker the tests above rely on does reject what a schema forbids
/// (so their passing means something): a lease without its id, a wrong
/// type, an undocumented error shape.
#[test]
fn the_checker_rejects_nonconforming_bodies() {
    let doc = document();
    let lease = json!({"$ref": "#/components/schemas/LeaseView"});
    let v = validator(&doc, &lease);
    let good = json!({"lease_id": "lease_1", "task_id": "task_1", "workload": "w", "on_behalf_of": "u",
        "provider": "token", "role": "demo", "scope": [], "state": "active", "ttl_seconds": 60,
        "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-01T00:01:00Z"});
    assert!(
        v.is_valid(&good),
        "{:?}",
        v.iter_errors(&good)
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
    );
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("lease_id");
    assert!(!v.is_valid(&missing));
    let mut wrong = good.clone();
    wrong["ttl_seconds"] = json!("sixty");
    assert!(!v.is_valid(&wrong));
    let error = validator(&doc, &json!({"$ref": "#/components/schemas/ErrorBody"}));
    assert!(error.is_valid(&json!({"error": {"code": "x", "message": "y"}})));
    assert!(!error.is_valid(&json!({"message": "y"})));
}

/// The `state` filter's documented values are exactly the lease states.
#[test]
fn the_documented_lease_states_are_the_stores() {
    let doc = document();
    let params = doc["paths"]["/v1/leases"]["get"]["parameters"]
        .as_array()
        .unwrap();
    let state = params.iter().find(|p| p["name"] == "state").unwrap();
    let mut documented: Vec<String> = state["schema"]["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("no enum in {}", state["schema"]))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let mut store: Vec<String> = leasehold::store::LeaseState::ALL
        .iter()
        .map(|s| s.as_str().to_owned())
        .collect();
    documented.sort();
    store.sort();
    assert_eq!(documented, store);
}
