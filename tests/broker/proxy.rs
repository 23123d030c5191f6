//! `leasehold proxy` end to end: a real broker, the proxy, stand-in
//! upstreams over HTTP and HTTPS that check each bearer by the broker's
//! introspection (or echo what they got), moto checking SigV4, and
//! assistants (reqwest here; Python's `requests` in its own process) that
//! never hold a credential.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxStatus};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use futures_util::StreamExt as _;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Harness, Options, fixture};

// === the stand-in upstream ===

#[derive(Clone)]
struct Seen {
    broker: String,
    resource_token: String,
    /// Every `Authorization` value the upstream received.
    authorizations: Arc<Mutex<Vec<String>>>,
}

impl Seen {
    fn bearers(&self) -> Vec<String> {
        self.authorizations
            .lock()
            .unwrap()
            .iter()
            .filter_map(|a| a.strip_prefix("Bearer ").map(str::to_owned))
            .collect()
    }
}

async fn record(s: &Seen, h: &HeaderMap) -> Option<String> {
    let a = h.get("authorization")?.to_str().ok()?.to_owned();
    s.authorizations.lock().unwrap().push(a.clone());
    Some(a)
}

/// 200 only for a bearer the broker's introspection calls active.
async fn ok(State(s): State<Seen>, h: HeaderMap) -> Response {
    let Some(a) = record(&s, &h).await else {
        return (AxStatus::UNAUTHORIZED, "no credential").into_response();
    };
    let token = a.strip_prefix("Bearer ").unwrap_or_default().to_owned();
    // the broker's test CA, for a broker that serves TLS
    let ca = std::fs::read(fixture("tls/ca.pem")).unwrap();
    let v: Value = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap()
        .post(format!("{}/v1/introspect", s.broker))
        .bearer_auth(&s.resource_token)
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    if v["active"] == true {
        axum::Json(json!({"ok": true, "lease": v["jti"], "task": v["task"]})).into_response()
    } else {
        (AxStatus::UNAUTHORIZED, "inactive credential").into_response()
    }
}

/// Echoes every request header, in the body and in response headers.
async fn echo(State(s): State<Seen>, h: HeaderMap) -> Response {
    let auth = record(&s, &h).await.unwrap_or_default();
    let all: HashMap<String, String> = h
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    (
        [
            ("x-echo-authorization", auth.clone()),
            ("set-cookie", format!("session={auth}")),
        ],
        axum::Json(json!({"headers": all, "again": auth})),
    )
        .into_response()
}

/// Echoes the `Authorization` it got, split across two chunks of a
/// chunked body (so redaction must see across chunk boundaries).
async fn echo_stream(State(s): State<Seen>, h: HeaderMap) -> Response {
    let auth = record(&s, &h).await.unwrap_or_default();
    let mid = auth.len() / 2;
    let parts = vec![
        "got: ".to_owned(),
        auth[..mid].to_owned(),
        auth[mid..].to_owned(),
        " end".to_owned(),
    ];
    let chunks = futures_util::stream::iter(
        parts
            .into_iter()
            .map(|p| Ok::<_, std::io::Error>(axum::body::Bytes::from(p))),
    )
    .then(|c| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        c
    });
    axum::body::Body::from_stream(chunks).into_response()
}

async fn away(State(s): State<Seen>, h: HeaderMap) -> Response {
    record(&s, &h).await;
    (
        AxStatus::FOUND,
        [("location", "http://127.0.0.1:9/elsewhere")],
        "",
    )
        .into_response()
}

async fn here(State(s): State<Seen>, h: HeaderMap) -> Response {
    record(&s, &h).await;
    (AxStatus::FOUND, [("location", "/v1/ok")], "").into_response()
}

async fn gzip(State(s): State<Seen>, h: HeaderMap) -> Response {
    record(&s, &h).await;
    ([("content-encoding", "gzip")], vec![0x1f_u8, 0x8b, 8, 0]).into_response()
}

/// Ticks for a few seconds (a long answer the task may end during).
async fn stream(State(s): State<Seen>, h: HeaderMap) -> Response {
    record(&s, &h).await;
    let ticks = futures_util::stream::unfold(0u32, |n| async move {
        if n >= 30 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((
            Ok::<_, std::io::Error>(axum::body::Bytes::from(format!("tick {n}\n"))),
            n + 1,
        ))
    });
    axum::body::Body::from_stream(ticks).into_response()
}

struct Upstream {
    http: SocketAddr,
    https: SocketAddr,
    ca: PathBuf,
    seen: Seen,
    _dir: tempfile::TempDir,
}

/// A test CA and a certificate for `localhost` and 127.0.0.1 signed by it.
fn tls_pair(dir: &Path) -> (PathBuf, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "upstream test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let ca_path = dir.join("upstream-ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (ca_path, Arc::new(cfg))
}

impl Upstream {
    async fn start(h: &Harness) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let seen = Seen {
            broker: h.url(""),
            resource_token: h.tokens.resource.clone(),
            authorizations: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/v1/ok", any(ok))
            .route("/v1/write", any(ok))
            .route("/v1/admin", any(ok))
            .route("/v1/echo", any(echo))
            .route("/v1/echo-stream", get(echo_stream))
            .route("/v1/away", get(away))
            .route("/v1/here", get(here))
            .route("/v1/gzip", get(gzip))
            .route("/v1/stream", get(stream))
            .with_state(seen.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = l.local_addr().unwrap();
        let plain = app.clone();
        tokio::spawn(async move { axum::serve(l, plain).await.unwrap() });
        let (ca, tls) = tls_pair(dir.path());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let https = l.local_addr().unwrap();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let svc = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            http,
            https,
            ca,
            seen,
            _dir: dir,
        }
    }
}

// === the proxy ===

/// One `[[route]]` injecting a `token/demo` lease as a bearer.
fn route(name: &str, destination: &str, addresses: &str, tool: &str) -> String {
    format!(
        "\n[[route]]\nname = \"{name}\"\ndestination = \"{destination}\"\naddresses = [\"{addresses}\"]\ntool = \"{tool}\"\n\
         [route.credential]\nprovider = \"token\"\nrole = \"demo\"\nttl_seconds = 60\n[route.inject]\nkind = \"bearer\"\n"
    )
}

/// The proxy's configuration for these upstreams (and `extra` routes).
fn proxy_toml(h: &Harness, up: &Upstream, dir: &Path, extra: &str) -> String {
    let token = dir.join("proxy.token");
    std::fs::write(&token, &h.tokens.proxy).unwrap();
    let (hp, sp) = (up.http.port(), up.https.port());
    format!(
        r#"
listen = "127.0.0.1:0"
ca_dir = "{ca}"
upstream_ca_file = "{upca}"

[broker]
url = "{broker}"
token_file = "{token}"

{routes}{extra}
"#,
        routes = [
            route(
                "api",
                &format!("http://127.0.0.1:{hp}/v1/"),
                "127.0.0.1/32",
                "demo.read"
            ),
            route(
                "api-tls",
                &format!("https://localhost:{sp}/v1/"),
                "127.0.0.1/32\", \"::1/128",
                "demo.read"
            ),
            route(
                "write",
                &format!("http://127.0.0.1:{hp}/v1/write"),
                "127.0.0.1/32",
                "demo.write"
            ),
            route(
                "admin",
                &format!("http://127.0.0.1:{hp}/v1/admin"),
                "127.0.0.1/32",
                "demo.admin"
            ),
            // `localhost` resolves to 127.0.0.1 (and ::1), neither of them listed
            route(
                "rebound",
                &format!("http://localhost:{hp}/v1/"),
                "127.0.0.2/32",
                "demo.read"
            ),
        ]
        .concat(),
        ca = dir.join("proxy-ca").display(),
        upca = up.ca.display(),
        broker = h.url(""),
        token = token.display(),
    )
}

struct Env {
    h: Harness,
    up: Upstream,
    proxy: leasehold_proxy::Running,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn env() -> Env {
    let h = Harness::start(Options::default()).await;
    let up = Upstream::start(&h).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        leasehold_proxy::ProxyConfig::from_toml(&proxy_toml(&h, &up, dir.path(), "")).unwrap();
    let proxy = leasehold_proxy::start(cfg).await.unwrap();
    let addr = proxy.addr.unwrap();
    Env {
        h,
        up,
        proxy,
        addr,
        _dir: dir,
    }
}

impl Env {
    /// A task of assistant A and its proxy credential.
    async fn task(&self) -> (String, String, String) {
        let (s, v) = self
            .h
            .post(
                &self.h.tokens.a,
                "/v1/tasks",
                json!({"purpose": "through the proxy", "on_behalf_of": "alice@example.com",
                       "prompt": "fetch the report", "tools": ["demo.read", "demo.write", "demo.admin"],
                       "ttl_seconds": 600}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let task = v["task_id"].as_str().unwrap().to_owned();
        let (s, v) = self
            .h
            .post(
                &self.h.tokens.a,
                &format!("/v1/tasks/{task}/proxy-credentials"),
                json!({}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let cred = v["proxy_credential"].as_str().unwrap().to_owned();
        assert!(cred.starts_with("lhp1."), "{v}");
        (task, cred, v["id"].as_str().unwrap().to_owned())
    }

    /// An assistant's HTTP client: everything through the proxy, trusting
    /// only the proxy's CA (never the upstream's).
    fn client(&self, cred: Option<&str>) -> reqwest::Client {
        let mut proxy = reqwest::Proxy::all(format!("http://{}", self.addr)).unwrap();
        if let Some(c) = cred {
            proxy = proxy.basic_auth("task", c);
        }
        let ca = std::fs::read(&self.proxy.ca_cert).unwrap();
        reqwest::Client::builder()
            .proxy(proxy)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.up.http.port())
    }

    fn https(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.up.https.port())
    }

    async fn events(&self, task: &str) -> Vec<Value> {
        let (s, v) = self
            .h
            .get(
                &self.h.tokens.admin,
                &format!("/v1/events?task={task}&limit=1000"),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["events"].as_array().unwrap().clone()
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

async fn body(r: reqwest::Response) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let s = r.status();
    let h = r.headers().clone();
    (s, h, r.text().await.unwrap())
}

fn error_code(text: &str) -> String {
    serde_json::from_str::<Value>(text).unwrap_or(Value::Null)["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

// === the tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assistant_calls_through_the_proxy_and_never_sees_the_credential() {
    let e = env().await;
    let (task, cred, cred_id) = e.task().await;
    let c = e.client(Some(&cred));

    // plain HTTP, then HTTPS through CONNECT (intercepted under the local
    // CA; the upstream's certificate is checked by the proxy)
    let mut leases = Vec::new();
    for url in [
        e.http("/v1/ok"),
        e.https("/v1/ok"),
        e.http("/v1/ok"),
        e.https("/v1/ok"),
    ] {
        let (s, h, text) = body(c.get(&url).send().await.unwrap()).await;
        assert_eq!(s, StatusCode::OK, "{url}: {text}");
        assert!(h.get("authorization").is_none());
        let v: Value = serde_json::from_str(&text).unwrap();
        leases.push(v["lease"].as_str().unwrap().to_owned());
    }
    // one lease per route, reused while it lives
    assert_eq!(leases[0], leases[2], "{leases:?}");
    assert_eq!(leases[1], leases[3], "{leases:?}");
    assert_ne!(leases[0], leases[1]);
    let tokens = e.up.seen.bearers();
    assert_eq!(tokens.len(), 4);
    for t in &tokens {
        assert!(
            e.h.introspect(t).await,
            "the upstream got a live credential"
        );
    }

    // the chain: the credential's issue on the task, every call decided
    // with the proxy and the credential named, each linked to its lease
    let events = e.events(&task).await;
    let issued: Vec<&Value> = events
        .iter()
        .filter(|v| v["kind"] == "proxy.credential_issued")
        .collect();
    assert_eq!(issued.len(), 1, "{events:?}");
    assert_eq!(issued[0]["data"]["proxy_credential"], cred_id.as_str());
    assert!(!serde_json::to_string(&events).unwrap().contains(&cred));
    let calls: Vec<&Value> = events
        .iter()
        .filter(|v| v["kind"] == "call.decided")
        .collect();
    assert_eq!(calls.len(), 4, "{events:?}");
    for (call, lease) in calls.iter().zip(&leases) {
        assert_eq!(call["data"]["outcome"], "allow", "{call}");
        assert_eq!(call["data"]["via"]["proxy"], "proxy", "{call}");
        assert_eq!(call["data"]["via"]["proxy_credential"], cred_id.as_str());
        assert_eq!(call["links"]["lease"], lease.as_str(), "{call}");
        assert_eq!(call["data"]["tool"], "demo.read");
    }
    let issued_leases = events
        .iter()
        .filter(|v| v["kind"] == "lease.issued")
        .count();
    assert_eq!(issued_leases, 2, "two leases for four calls");

    // an upstream that echoes what it got: the credential comes back
    // redacted from headers and body, nothing else touched
    let (s, h, text) = body(c.get(e.http("/v1/echo")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let bearer = e.up.seen.bearers().pop().unwrap();
    assert!(!text.contains(&bearer), "{text}");
    assert!(text.contains("Bearer [redacted by leasehold]"), "{text}");
    assert!(text.contains("\"accept-encoding\":\"identity\""), "{text}");
    assert_eq!(h["x-echo-authorization"], "Bearer [redacted by leasehold]");
    assert_eq!(h["set-cookie"], "session=Bearer [redacted by leasehold]");
    assert!(
        !text.to_ascii_lowercase().contains("proxy-authorization"),
        "{text}"
    );
    assert!(
        !text.contains(&cred),
        "the proxy credential went upstream: {text}"
    );
    // streamed, chunked, the credential split across two chunks
    let (s, h, text) = body(c.get(e.http("/v1/echo-stream")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert!(h.get("content-length").is_none(), "{h:?}");
    assert_eq!(text, "got: Bearer [redacted by leasehold] end");

    // a lease revoked under the proxy (a responder's revoke): the next
    // request gets a new one, and the old credential stays dead
    let (s, v) =
        e.h.post_empty(
            &e.h.tokens.responder,
            &format!("/v1/leases/{}/revoke", leases[0]),
        )
        .await;
    assert!(s.is_success(), "{v}");
    let (s, _, text) = body(c.get(e.http("/v1/ok")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let fresh = serde_json::from_str::<Value>(&text).unwrap()["lease"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(fresh, leases[0], "a revoked lease is not reused");
    assert!(!e.h.introspect(&tokens[0]).await);

    // the proxy's counters
    let m = e.metrics().await;
    assert!(
        m.contains("leasehold_proxy_requests_total{route=\"api\",outcome=\"forwarded\"} 5"),
        "{m}"
    );
    assert!(
        m.contains("leasehold_proxy_request_duration_seconds"),
        "{m}"
    );

    // completing the task revokes every lease; the next request is refused
    let (s, v) =
        e.h.post_empty(&e.h.tokens.a, &format!("/v1/tasks/{task}/complete"))
            .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for l in &leases {
        assert_eq!(e.h.lease_state(l).await, "revoked");
    }
    for t in &tokens {
        assert!(!e.h.introspect(t).await);
    }
    for url in [e.http("/v1/ok"), e.https("/v1/ok")] {
        let (s, _, text) = body(c.get(&url).send().await.unwrap()).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{text}");
        assert_eq!(error_code(&text), "task_completed", "{text}");
    }
    assert_eq!(
        e.up.seen.bearers().len(),
        7,
        "nothing more reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_come_back_as_answers_the_assistant_can_read() {
    let e = env().await;
    let (task, cred, _) = e.task().await;
    let c = e.client(Some(&cred));

    // no proxy credential, or a forged one: 407, nothing decided
    let (s, h, text) = body(e.client(None).get(e.http("/v1/ok")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::PROXY_AUTHENTICATION_REQUIRED, "{text}");
    assert!(h.contains_key("proxy-authenticate"));
    let mut forged = cred.clone();
    forged.pop();
    forged.push(if cred.ends_with('A') { 'B' } else { 'A' });
    let (s, _, text) = body(
        e.client(Some(&forged))
            .get(e.http("/v1/ok"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::PROXY_AUTHENTICATION_REQUIRED, "{text}");
    assert_eq!(error_code(&text), "proxy_credential_invalid", "{text}");
    // a workload cannot use the proxy's route itself
    let (s, v) =
        e.h.post(
            &e.h.tokens.a,
            "/v1/proxy/calls",
            json!({"proxy_credential": cred, "tool": "demo.read", "action": "GET",
                   "credential": {"provider": "token", "role": "demo", "ttl_seconds": 60}}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    // destinations not routed: another port, a path outside the prefix,
    // CONNECT to an unrouted host, a path that climbs out of the prefix
    for url in [
        "http://127.0.0.1:9/v1/ok".to_owned(),
        e.http("/v2/ok"),
        "https://127.0.0.1:9/v1/ok".to_owned(),
    ] {
        let r = c.get(&url).send().await;
        match r {
            Ok(r) => {
                let (s, _, text) = body(r).await;
                assert_eq!(s, StatusCode::FORBIDDEN, "{url}: {text}");
                assert_eq!(error_code(&text), "not_routed", "{text}");
            }
            // reqwest reports a refused CONNECT as an error
            Err(err) => assert!(url.starts_with("https"), "{url}: {err}"),
        }
    }
    let raw = raw_request(
        e.addr,
        &format!(
            "GET http://127.0.0.1:{}/v1/%2e%2e/admin HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer {cred}\r\nConnection: close\r\n\r\n",
            e.up.http.port()
        ),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("path_not_normal"), "{raw}");
    let raw = raw_request(
        e.addr,
        &format!("CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\nProxy-Authorization: Bearer {cred}\r\n\r\n"),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 403"), "{raw}");
    assert!(raw.contains("not_routed"), "{raw}");

    // a name that resolves outside its route's addresses
    let url = format!("http://localhost:{}/v1/ok", e.up.http.port());
    let (s, _, text) = body(c.get(&url).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{text}");
    assert_eq!(error_code(&text), "address_refused", "{text}");
    assert!(
        text.contains("127.0.0.2") || text.contains("does not admit"),
        "{text}"
    );

    // redirects: within the route passed on (the client asks again through
    // the proxy); out of it refused
    let (s, h, text) = body(c.get(e.http("/v1/here")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::FOUND, "{text}");
    assert_eq!(h["location"], "/v1/ok");
    let (s, _, text) = body(c.get(e.http("/v1/away")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{text}");
    assert_eq!(error_code(&text), "redirect_refused", "{text}");
    // a body the proxy could not inspect
    let (s, _, text) = body(c.get(e.http("/v1/gzip")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{text}");
    assert_eq!(error_code(&text), "encoded_response", "{text}");

    // policy: denied with its reason; approval-gated with the approval id
    let (s, _, text) = body(c.get(e.http("/v1/admin")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{text}");
    assert_eq!(error_code(&text), "policy_denied", "{text}");
    let before = e.up.seen.authorizations.lock().unwrap().len();
    let (s, h, text) = body(c.post(e.http("/v1/write")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{text}");
    assert_eq!(error_code(&text), "approval_required", "{text}");
    let approval = h["leasehold-approval-id"].to_str().unwrap().to_owned();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["approval_id"], approval.as_str());
    assert_eq!(
        e.up.seen.authorizations.lock().unwrap().len(),
        before,
        "nothing went upstream"
    );
    let (s, v) =
        e.h.post(
            &e.h.tokens.approver,
            &format!("/v1/approvals/{approval}/approve"),
            json!({"comment": "ok"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, text) = body(
        c.post(e.http("/v1/write"))
            .header("Leasehold-Approval", &approval)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert!(
        !e.up
            .seen
            .authorizations
            .lock()
            .unwrap()
            .iter()
            .any(|a| a.contains("appr_")),
        "the approval header is the proxy's"
    );
    // used once: the same approval again is refused by the broker
    let (s, _, text) = body(
        c.post(e.http("/v1/write"))
            .header("Leasehold-Approval", &approval)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{text}");

    // a fenced workload: refused at the next request, lease or not
    let (s, _, text) = body(c.get(e.http("/v1/ok")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let (s, v) =
        e.h.post(
            &e.h.tokens.responder,
            "/v1/revocations",
            json!({"workload": "dev:assistant-a", "reason": "INC-9", "fence": true}),
        )
        .await;
    assert!(s.is_success(), "{v}");
    let (s, _, text) = body(c.get(e.http("/v1/ok")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{text}");
    assert!(error_code(&text).contains("fenced"), "{text}");

    // every refusal the broker decided is on the task's chain
    let events = e.events(&task).await;
    let kinds: Vec<&str> = events.iter().filter_map(|v| v["kind"].as_str()).collect();
    assert!(kinds.contains(&"approval.requested"), "{kinds:?}");
    assert!(kinds.contains(&"approval.consumed"), "{kinds:?}");
    assert!(
        events
            .iter()
            .any(|v| v["kind"] == "call.decided" && v["data"]["outcome"] == "deny"),
        "{kinds:?}"
    );
    let m = e.metrics().await;
    for outcome in [
        "not_routed",
        "unauthenticated",
        "address_refused",
        "redirect_refused",
        "denied",
        "approval_required",
    ] {
        assert!(
            m.contains(&format!("outcome=\"{outcome}\"")),
            "{outcome}: {m}"
        );
    }
    e.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_ends_mid_stream_loses_its_lease_and_the_next_request() {
    let e = env().await;
    let (task, cred, _) = e.task().await;
    let c = e.client(Some(&cred));
    let mut r = c.get(e.http("/v1/stream")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let first = r.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("tick"));
    let (s, v) =
        e.h.post_empty(&e.h.tokens.a, &format!("/v1/tasks/{task}/complete"))
            .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let lease = v["revoked"][0]["lease_id"].as_str().unwrap().to_owned();
    assert_eq!(e.h.lease_state(&lease).await, "revoked");
    let token = e.up.seen.bearers()[0].clone();
    assert!(!e.h.introspect(&token).await);
    let (s, _, text) = body(c.get(e.http("/v1/ok")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{text}");
    assert_eq!(error_code(&text), "task_completed", "{text}");
    drop(r);
}

/// One request written by hand (what no client library would send).
async fn raw_request(addr: SocketAddr, text: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(text.as_bytes()).await.unwrap();
    let mut out = vec![0; 8192];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out[..n]).into_owned()
}

/// moto with its signature checks on: the broker signs in as an IAM user
/// made for it, the proxy signs each assistant request with the task's
/// STS session (SigV4), and moto verifies that signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigv4_signs_with_the_tasks_aws_session() {
    use leasehold_provider_aws_sts::testkit::{ACCOUNT, Moto};
    leasehold::install_crypto_provider();
    let moto = Moto::start();
    let iam = moto.iam().await;
    iam.create_user()
        .user_name("leasehold")
        .send()
        .await
        .unwrap();
    iam.put_user_policy()
        .user_name("leasehold")
        .policy_name("all")
        .policy_document(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#)
        .send()
        .await
        .unwrap();
    let key = iam
        .create_access_key()
        .user_name("leasehold")
        .send()
        .await
        .unwrap();
    let key = key.access_key().unwrap();
    let trust = format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":{{"AWS":["arn:aws:iam::{ACCOUNT}:root","arn:aws:iam::{ACCOUNT}:user/leasehold"]}},"Action":["sts:AssumeRole","sts:TagSession","sts:SetSourceIdentity"]}}]}}"#
    );
    let role = iam
        .create_role()
        .role_name("reports-reader")
        .assume_role_policy_document(trust)
        .max_session_duration(3600)
        .send()
        .await
        .unwrap();
    let arn = role.role().unwrap().arn().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("aws-credentials");
    std::fs::write(
        &creds,
        format!(
            "[leasehold]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            key.access_key_id(),
            key.secret_access_key()
        ),
    )
    .unwrap();
    // from here on moto checks every request's signature
    let reset = reqwest::Client::new()
        .post(format!("{}/moto-api/reset-auth", moto.endpoint()))
        .body("0")
        .send()
        .await
        .unwrap();
    assert!(reset.status().is_success());
    let unsigned = reqwest::Client::new()
        .post(moto.endpoint())
        .form(&[("Action", "GetCallerIdentity"), ("Version", "2011-06-15")])
        .send()
        .await
        .unwrap();
    assert_ne!(
        unsigned.status(),
        StatusCode::OK,
        "moto must refuse unsigned requests"
    );

    let aws: leasehold_provider_aws_sts::AwsStsConfig = toml::from_str(&format!(
        "region = \"us-east-1\"\nendpoint_url = \"{}\"\ncredentials_file = \"{}\"\nprofile = \"leasehold\"\n[roles.reports]\nrole_arn = \"{arn}\"\nmax_ttl_seconds = 3600\n",
        moto.endpoint(),
        creds.display()
    ))
    .unwrap();
    let h = Harness::start(Options {
        tweak: Box::new(move |c| {
            c.providers.insert(
                "aws".into(),
                leasehold::config::ProviderConfig::new(aws.clone()),
            );
            crate::harness::permit_leases(c, "aws");
        }),
        ..Options::default()
    })
    .await;
    let up = Upstream::start(&h).await;
    let extra = format!(
        r#"
[[route]]
name = "sts"
destination = "http://127.0.0.1:{}/"
addresses = ["127.0.0.1/32"]
tool = "demo.read"
resource = "sts:{{method}}"
[route.credential]
provider = "aws"
role = "reports"
ttl_seconds = 900
[route.inject]
kind = "aws-sigv4"
region = "us-east-1"
service = "sts"
"#,
        moto.port
    );
    let pdir = tempfile::tempdir().unwrap();
    let cfg =
        leasehold_proxy::ProxyConfig::from_toml(&proxy_toml(&h, &up, pdir.path(), &extra)).unwrap();
    let proxy = leasehold_proxy::start(cfg).await.unwrap();
    let e = Env {
        addr: proxy.addr.unwrap(),
        h,
        up,
        proxy,
        _dir: pdir,
    };
    let (task, cred, _) = e.task().await;
    let c = e.client(Some(&cred));
    let mut arns = Vec::new();
    for _ in 0..2 {
        let (s, _, text) = body(
            c.post(moto.endpoint())
                .form(&[("Action", "GetCallerIdentity"), ("Version", "2011-06-15")])
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{text}");
        let arn = text
            .split("<Arn>")
            .nth(1)
            .and_then(|t| t.split("</Arn>").next())
            .unwrap()
            .to_owned();
        arns.push(arn);
    }
    // moto says who signed: the task's session, named by its lease
    let (_, leases) =
        e.h.get(&e.h.tokens.admin, &format!("/v1/leases?task={task}"))
            .await;
    let leases = leases["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 1, "one session, reused: {leases:?}");
    let lease = leases[0]["lease_id"].as_str().unwrap();
    assert_eq!(
        arns[0],
        format!("arn:aws:sts::{ACCOUNT}:assumed-role/reports-reader/{lease}")
    );
    assert_eq!(arns[0], arns[1]);
    // what the assistant sent was not signed by it: a signature of its
    // own is replaced, not passed on
    let (s, _, text) = body(
        c.post(moto.endpoint())
            .header("Authorization", "AWS4-HMAC-SHA256 Credential=AKIAFORGED/20260101/us-east-1/sts/aws4_request, SignedHeaders=host, Signature=00")
            .form(&[("Action", "GetCallerIdentity"), ("Version", "2011-06-15")])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert!(text.contains(lease), "{text}");
    // while moto refuses that signature sent to it directly
    let direct = reqwest::Client::new()
        .post(moto.endpoint())
        .header("Authorization", "AWS4-HMAC-SHA256 Credential=AKIAFORGED/20260101/us-east-1/sts/aws4_request, SignedHeaders=host, Signature=00")
        .form(&[("Action", "GetCallerIdentity"), ("Version", "2011-06-15")])
        .send()
        .await
        .unwrap();
    assert_ne!(direct.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_reaches_a_broker_over_tls_through_its_ca_alone() {
    let h = Harness::start_tls().await;
    let up = Upstream::start(&h).await;
    // the same proxy twice: trusting the broker's CA, then another CA
    let with_ca = |dir: &Path, ca: &Path| {
        let toml = proxy_toml(&h, &up, dir, "").replace(
            "[broker]\n",
            &format!("[broker]\nca_file = \"{}\"\n", ca.display()),
        );
        leasehold_proxy::ProxyConfig::from_toml(&toml).unwrap()
    };
    let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let right = with_ca(dir.path(), &fixture("tls/ca.pem"));
    let wrong = with_ca(other.path(), &up.ca);
    let proxy = leasehold_proxy::start(right).await.unwrap();
    let addr = proxy.addr.unwrap();
    let e = Env {
        h,
        up,
        proxy,
        addr,
        _dir: dir,
    };
    let (_, cred, _) = e.task().await;
    let (s, _, text) = body(
        e.client(Some(&cred))
            .get(e.http("/v1/ok"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let tokens = e.up.seen.bearers();
    assert_eq!(tokens.len(), 1);
    assert!(e.h.introspect(&tokens[0]).await);

    // the upstream's CA did not sign the broker's certificate: no call is
    // decided, and the assistant is told the broker could not be asked
    let wrong = leasehold_proxy::start(wrong).await.unwrap();
    let c = {
        let ca = std::fs::read(&wrong.ca_cert).unwrap();
        reqwest::Client::builder()
            .proxy(
                reqwest::Proxy::all(format!("http://{}", wrong.addr.unwrap()))
                    .unwrap()
                    .basic_auth("task", &cred),
            )
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    };
    let (s, h, text) = body(c.get(e.http("/v1/ok")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert_eq!(error_code(&text), "broker_unavailable");
    assert!(h.get("retry-after").is_some());
    assert_eq!(e.up.seen.bearers().len(), 1, "nothing more went upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_unix_socket_the_host_names_the_route() {
    let h = Harness::start(Options::default()).await;
    let up = Upstream::start(&h).await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("proxy.sock");
    let text = proxy_toml(&h, &up, dir.path(), "").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"unix:{}\"", sock.display()),
    );
    let cfg = leasehold_proxy::ProxyConfig::from_toml(&text).unwrap();
    let proxy = leasehold_proxy::start(cfg).await.unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o660
    );
    let e = Env {
        addr: "127.0.0.1:9".parse().unwrap(),
        h,
        up,
        proxy,
        _dir: dir,
    };
    let (_, cred, _) = e.task().await;
    let ask = |host: String, path: &str, cred: &str| {
        let sock = sock.clone();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: Bearer {cred}\r\nConnection: close\r\n\r\n"
        );
        async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
                .await
                .unwrap()
                .unwrap();
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    // plain HTTP to the proxy; TLS to the upstream is the proxy's
    let tls = ask(format!("localhost:{}", e.up.https.port()), "/v1/ok", &cred).await;
    assert!(tls.starts_with("HTTP/1.1 200"), "{tls}");
    assert!(tls.contains("\"ok\":true"), "{tls}");
    let plain = ask(format!("127.0.0.1:{}", e.up.http.port()), "/v1/ok", &cred).await;
    assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
    let nowhere = ask("example.org".into(), "/v1/ok", &cred).await;
    assert!(nowhere.starts_with("HTTP/1.1 403"), "{nowhere}");
    assert!(nowhere.contains("not_routed"), "{nowhere}");
    let bare = ask(format!("127.0.0.1:{}", e.up.http.port()), "/v1/ok", "").await;
    assert!(bare.starts_with("HTTP/1.1 407"), "{bare}");
    e.proxy.stop().await;
    assert!(!sock.exists(), "the socket is removed at stop");
}

#[test]
fn proxy_configuration_mistakes_name_their_field() {
    let base = |route: &str, top: &str| {
        format!(
            "listen = \"127.0.0.1:8480\"\nca_dir = \"/tmp/x\"\n{top}\n[broker]\nurl = \"http://127.0.0.1:8443\"\ntoken_file = \"/tmp/t\"\n{route}"
        )
    };
    let route = |dest: &str, more: &str, inject: &str| {
        format!(
            "[[route]]\nname = \"r\"\ndestination = \"{dest}\"\ntool = \"demo.read\"\n{more}\n[route.credential]\nprovider = \"token\"\nrole = \"demo\"\nttl_seconds = 60\n[route.inject]\n{inject}\n"
        )
    };
    let ok = route("https://api.example.org/v1/", "", "kind = \"bearer\"");
    leasehold_proxy::ProxyConfig::from_toml(&base(&ok, "")).unwrap();
    for (text, field) in [
        (
            base(&ok, "").replace("127.0.0.1:8480", "0.0.0.0:8480"),
            "listen",
        ),
        (
            base(&ok, "").replace("http://127.0.0.1:8443", "http://broker.example.org"),
            "broker.url",
        ),
        (base("", ""), "route"),
        (
            base(&route("ftp://x/", "", "kind = \"bearer\""), ""),
            "route[0].destination",
        ),
        (
            base(
                &route("http://api.example.org/", "", "kind = \"bearer\""),
                "",
            ),
            "route[0].destination",
        ),
        (
            base(
                &route("https://api.example.org/a/../b", "", "kind = \"bearer\""),
                "",
            ),
            "route[0].destination",
        ),
        (
            base(
                &route(
                    "https://api.example.org/",
                    "addresses = [\"10.0.0.1/8\"]",
                    "kind = \"bearer\"",
                ),
                "",
            ),
            "route[0].addresses",
        ),
        (
            base(
                &route(
                    "https://api.example.org/",
                    "addresses = []",
                    "kind = \"bearer\"",
                ),
                "",
            ),
            "route[0].addresses",
        ),
        (
            base(
                &route(
                    "https://10.0.0.1/",
                    "addresses = [\"10.0.1.0/24\"]",
                    "kind = \"bearer\"",
                ),
                "",
            ),
            "route[0].addresses",
        ),
        (
            base(
                &route(
                    "https://api.example.org/",
                    "action = \"{verb}\"",
                    "kind = \"bearer\"",
                ),
                "",
            ),
            "route[0].action",
        ),
        (
            base(
                &route(
                    "https://api.example.org/",
                    "",
                    "kind = \"header\"\nname = \"Host\"",
                ),
                "",
            ),
            "route[0].inject.name",
        ),
        (
            base(
                &route("https://api.example.org/", "", "kind = \"basic\""),
                "",
            ),
            "route[0].inject",
        ),
        (
            base(
                &route(
                    "https://api.example.org/",
                    "",
                    "kind = \"aws-sigv4\"\nregion = \"us east\"\nservice = \"sts\"",
                ),
                "",
            ),
            "route[0].inject",
        ),
        (
            base(
                &route("https://api.example.org/", "", "kind = \"bearer\"")
                    .replace("ttl_seconds = 60", "ttl_seconds = 3"),
                "",
            ),
            "route[0].credential.ttl_seconds",
        ),
        (base(&format!("{ok}{ok}"), ""), "route[1].name"),
        (
            base(&ok, "").replace("[broker]", "surprise = 1\n[broker]"),
            "config",
        ),
    ] {
        let e = leasehold_proxy::ProxyConfig::from_toml(&text).unwrap_err();
        assert_eq!(e.field, field, "{e}\n{text}");
    }
}

/// A child process killed (by its PID) when the test ends, failed or not.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every readable region of a process's memory (`/proc/<pid>/mem`).
fn process_memory(pid: u32) -> Vec<u8> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut all = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0; usize::try_from(b - a).unwrap()];
        if mem.seek(SeekFrom::Start(a)).is_ok() && mem.read_exact(&mut buf).is_ok() {
            all.extend_from_slice(&buf);
        }
    }
    all
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The Python assistant (plain `requests` with proxy settings) against the
/// `leasehold proxy` binary: its memory, environment and every byte it
/// received hold no credential the APIs were given, and neither does the
/// proxy's debug log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_requests_assistant_never_holds_a_credential() {
    let python = std::env::var("LEASEHOLD_PYTHON").unwrap_or_else(|_| {
        panic!(
            "LEASEHOLD_PYTHON is not set: a Python with requests, httpx and pydantic \
             (integration/test.sh installs them into integration/.venv and sets it)"
        )
    });
    let h = Harness::start(Options::default()).await;
    let up = Upstream::start(&h).await;
    let dir = tempfile::tempdir().unwrap();
    let addr = crate::harness::free_port();
    let text = proxy_toml(&h, &up, dir.path(), "")
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""));
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["proxy", "--check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("5 routes"));
    let log = dir.path().join("proxy.log");
    let mut proxy = Kill(
        std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
            .args(["proxy", "--config"])
            .arg(&config)
            .env("RUST_LOG", "debug")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        assert!(
            proxy.0.try_wait().unwrap().is_none(),
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let token_file = dir.path().join("assistant.token");
    std::fs::write(&token_file, &h.tokens.a).unwrap();
    let out = dir.path().join("received.bin");
    let canary = format!("{:032x}", rand_u128());
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/proxy/assistant.py");
    let mut child = std::process::Command::new(python)
        .arg(&script)
        .args([
            format!("http://127.0.0.1:{}/v1/ok", up.http.port()),
            format!("https://localhost:{}/v1/ok", up.https.port()),
            format!("http://127.0.0.1:{}/v1/echo", up.http.port()),
            format!("https://localhost:{}/v1/echo", up.https.port()),
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "PYTHONPATH",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/python/src"),
        )
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("LEASEHOLD_URL", h.url(""))
        .env("LEASEHOLD_TOKEN_FILE", &token_file)
        .env("PROXY_ADDR", addr.to_string())
        .env("PROXY_CA", dir.path().join("proxy-ca/ca.pem"))
        .env("OUT", &out)
        .env("CANARY", &canary)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let read = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        stdout.read_line(&mut line).unwrap();
        (stdout, line)
    });
    let (mut stdout, line) = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the assistant did not report")
        .unwrap();
    if line.is_empty() {
        let out = child.wait_with_output().unwrap();
        panic!(
            "the assistant failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(report["statuses"], json!([200, 200, 200, 200]), "{report}");

    // what the APIs were given: four calls, two leases (one per route)
    let tokens: std::collections::BTreeSet<String> = up.seen.bearers().into_iter().collect();
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    let memory = process_memory(pid);
    assert!(
        contains(&memory, format!("canary-{canary}").as_bytes()),
        "the memory search must find what the assistant holds ({} bytes read)",
        memory.len()
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let received = std::fs::read(&out).unwrap();
    assert!(
        contains(&received, b"[redacted by leasehold]"),
        "the echo came back redacted"
    );
    for t in &tokens {
        assert!(t.len() > 20);
        // the token, and its signature alone
        let sig = t.rsplit('.').next().unwrap();
        for needle in [t.as_str(), sig] {
            assert!(
                !contains(&memory, needle.as_bytes()),
                "in the assistant's memory"
            );
            assert!(!contains(&environ, needle.as_bytes()), "in its environment");
            assert!(
                !contains(&received, needle.as_bytes()),
                "in what it received"
            );
        }
    }
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"\n").unwrap();
    }
    let mut rest = String::new();
    {
        use std::io::Read as _;
        stdout.read_to_string(&mut rest).unwrap();
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{rest}");
    let done: Value = serde_json::from_str(rest.trim()).unwrap();
    assert_eq!(done["revoked"].as_array().unwrap().len(), 2, "{done}");
    for t in &tokens {
        assert!(!h.introspect(t).await, "revoked with the task");
    }
    drop(proxy);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("allowed; new lease"), "{log}");
    for t in &tokens {
        assert!(!log.contains(t.as_str()), "the proxy logged a credential");
        assert!(!log.contains(t.rsplit('.').next().unwrap()));
    }
}

fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    u128::from_be_bytes(b)
}

/// The README's walk-through, as written: `leasehold dev` (which writes
/// the proxy's token), the echo stand-in, `leasehold proxy` with
/// `config/proxy.example.toml` (its ports moved to free ones), a task and
/// its proxy credential from the CLI, and a request whose echo shows the
/// injected credential redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walk_through_works() {
    let python = std::env::var("LEASEHOLD_PYTHON").unwrap_or_else(|_| "python3".into());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let (broker, echo, paddr) = (
        crate::harness::free_port(),
        crate::harness::free_port(),
        crate::harness::free_port(),
    );
    let bin = env!("CARGO_BIN_EXE_leasehold");
    let quiet = || std::process::Stdio::null();
    let _dev = Kill(
        std::process::Command::new(bin)
            .args([
                "dev",
                "--listen",
                &broker.to_string(),
                "--data",
                "leasehold-data",
            ])
            .current_dir(dir.path())
            .stdout(quiet())
            .stderr(quiet())
            .spawn()
            .unwrap(),
    );
    let _echo = Kill(
        std::process::Command::new(&python)
            .arg(repo.join("integration/proxy/echo_upstream.py"))
            .arg(echo.to_string())
            .stdout(quiet())
            .stderr(quiet())
            .spawn()
            .unwrap(),
    );
    let example = std::fs::read_to_string(repo.join("config/proxy.example.toml")).unwrap();
    let config = example
        .replace("127.0.0.1:7790", &paddr.to_string())
        .replace("127.0.0.1:7711", &broker.to_string())
        .replace("127.0.0.1:7720", &echo.to_string());
    assert_ne!(config, example);
    std::fs::write(dir.path().join("proxy.toml"), config).unwrap();
    let http = crate::harness::client();
    for _ in 0..400 {
        if http
            .get(format!("http://{broker}/v1/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
            && dir.path().join("leasehold-data/proxy.token").exists()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _proxy = Kill(
        std::process::Command::new(bin)
            .args(["proxy", "--config", "proxy.toml"])
            .current_dir(dir.path())
            .stdout(quiet())
            .stderr(quiet())
            .spawn()
            .unwrap(),
    );
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(args)
            .args(["-o", "json"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let task = cli(&[
        "task",
        "open",
        "--as",
        "assistant-a",
        "--purpose",
        "try the proxy",
        "--on-behalf-of",
        "alice@example.com",
        "--prompt",
        "p",
        "--tool",
        "demo.read",
        "--ttl",
        "600",
    ]);
    let task = task["task_id"].as_str().unwrap();
    let pc = cli(&["task", "proxy-credential", task, "--as", "assistant-a"]);
    let cred = pc["proxy_credential"].as_str().unwrap();
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(paddr).await.is_ok()
            && tokio::net::TcpStream::connect(echo).await.is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let c = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://task:{cred}@{paddr}")).unwrap())
        .build()
        .unwrap();
    let r = c
        .get(format!("http://{echo}/v1/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["headers"]["authorization"], "Bearer [redacted by leasehold]",
        "{v}"
    );
    let done = cli(&["task", "complete", task, "--as", "assistant-a"]);
    assert_eq!(done["revoked"].as_array().unwrap().len(), 1, "{done}");
}
