//! The listener and each request's path: authenticate the assistant,
//! match a route, ask the broker, connect to a checked address, inject,
//! forward, redact the answer.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use serde_json::json;
use zeroize::Zeroizing;

use crate::broker::Broker;
use crate::ca::LocalCa;
use crate::config::{Listen, ProxyConfig, split_host_port};
use crate::connect::{Connector, Resolve, SystemResolver};
use crate::decide::{Held, Key};
use crate::inject;
use crate::route::{Route, Routes, has_dot_segment};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;
type Upstream = Client<Connector, Body>;

/// The header an assistant sends to retry a request once approved.
const APPROVAL_HEADER: &str = "leasehold-approval";

pub(crate) struct Proxy {
    pub(crate) routes: Routes,
    upstream: Vec<Upstream>,
    pub(crate) broker: Broker,
    ca: LocalCa,
    pub(crate) held: Mutex<HashMap<Key, Arc<Held>>>,
    pub(crate) minting: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) renew_margin_ms: i64,
    max_signed_body: usize,
    upstream_timeout: Duration,
    unix: bool,
    metrics: PrometheusRecorder,
}

/// A running proxy (tests and the benchmark start it in process).
#[derive(Debug)]
pub struct Running {
    /// The TCP address, when listening on one.
    pub addr: Option<SocketAddr>,
    /// The local CA's certificate: what assistants must trust.
    pub ca_cert: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(j) = self.join.take() {
            let _ = j.await;
        }
    }

    /// Wait until the proxy stops (for the binary: until the shutdown
    /// future resolves).
    pub async fn wait(mut self) {
        if let Some(j) = self.join.take() {
            let _ = j.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Start the proxy with the system resolver.
pub async fn start(config: ProxyConfig) -> Result<Running, String> {
    start_with(config, Arc::new(SystemResolver)).await
}

pub(crate) fn upstream_tls(extra: Option<&PathBuf>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match extra {
        Some(path) => {
            use rustls::pki_types::pem::PemObject as _;
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            for c in certs {
                let c = c.map_err(|e| format!("{}: {e}", path.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
        }
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Start the proxy, resolving names with `resolver`.
pub async fn start_with(
    config: ProxyConfig,
    resolver: Arc<dyn Resolve>,
) -> Result<Running, String> {
    let listen = config.listen().map_err(|e| e.to_string())?;
    let ca = LocalCa::open(&config.ca_dir)?;
    let broker = Broker::new(&config.broker)?;
    let default_tls = upstream_tls(config.upstream_ca_file.as_ref())?;
    let mut routes = Vec::new();
    let mut upstream = Vec::new();
    for (i, r) in config.routes.iter().enumerate() {
        let route = Arc::new(Route::new(i, r.clone()).map_err(|e| format!("route[{i}]: {e}"))?);
        let tls = match &r.upstream_ca_file {
            Some(p) => {
                upstream_tls(Some(p)).map_err(|e| format!("route[{i}].upstream_ca_file: {e}"))?
            }
            None => default_tls.clone(),
        };
        let connector = Connector {
            route: route.clone(),
            tls,
            resolver: resolver.clone(),
            timeout: Duration::from_secs(10),
        };
        upstream.push(crate::connect::pooled(connector));
        routes.push(route);
    }
    let metrics = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .map_err(|e| e.to_string())?
        .build_recorder();
    let proxy = Arc::new(Proxy {
        routes: Routes(routes),
        upstream,
        broker,
        ca,
        held: Mutex::new(HashMap::new()),
        minting: Mutex::new(HashMap::new()),
        renew_margin_ms: i64::try_from(config.lease_renew_margin_seconds.saturating_mul(1000))
            .unwrap_or(i64::MAX),
        max_signed_body: config.max_signed_body_bytes,
        upstream_timeout: Duration::from_secs(config.upstream_timeout_seconds),
        unix: matches!(listen, Listen::Unix(_)),
        metrics,
    });
    let ca_cert = proxy.ca.cert_path.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, join) = match listen {
        Listen::Tcp(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| format!("listen {a}: {e}"))?;
            let addr = l.local_addr().map_err(|e| e.to_string())?;
            tracing::info!(%addr, routes = proxy.routes.0.len(), ca = %ca_cert.display(), "leasehold proxy listening");
            let p = proxy.clone();
            (
                Some(addr),
                tokio::spawn(async move {
                    let mut rx = rx;
                    loop {
                        tokio::select! {
                            _ = &mut rx => break,
                            a = l.accept() => match a {
                                Ok((s, _)) => {
                                    let _ = s.set_nodelay(true);
                                    serve_conn(p.clone(), s);
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "accept failed");
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                        }
                    }
                }),
            )
        }
        Listen::Unix(path) => {
            use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
            if let Ok(m) = std::fs::symlink_metadata(&path) {
                if m.file_type().is_socket() {
                    let _ = std::fs::remove_file(&path);
                } else {
                    return Err(format!(
                        "listen: {} exists and is not a socket",
                        path.display()
                    ));
                }
            }
            let l = tokio::net::UnixListener::bind(&path)
                .map_err(|e| format!("listen {}: {e}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
                .map_err(|e| format!("listen {}: {e}", path.display()))?;
            tracing::info!(socket = %path.display(), routes = proxy.routes.0.len(), "leasehold proxy listening");
            let p = proxy.clone();
            (
                None,
                tokio::spawn(async move {
                    let mut rx = rx;
                    loop {
                        tokio::select! {
                            _ = &mut rx => break,
                            a = l.accept() => match a {
                                Ok((s, _)) => serve_conn(p.clone(), s),
                                Err(e) => {
                                    tracing::warn!(error = %e, "accept failed");
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                        }
                    }
                    let _ = std::fs::remove_file(&path);
                }),
            )
        }
    };
    Ok(Running {
        addr,
        ca_cert,
        stop: Some(tx),
        join: Some(join),
    })
}

fn serve_conn<S>(proxy: Arc<Proxy>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = hyper::service::service_fn(move |req| {
            let p = proxy.clone();
            async move { Ok::<_, Infallible>(p.handle(req, None).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades()
            .await;
    });
}

/// A `CONNECT` tunnel: every request in it goes to this origin, for this
/// proxy credential.
#[derive(Debug)]
struct Tunnel {
    host: String,
    port: u16,
    credential: Zeroizing<String>,
}

pub(crate) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// The proxy's own answer: JSON, `Leasehold-Error: <code>`, never a
/// credential (nothing here is built from one).
pub(crate) fn answer(
    status: StatusCode,
    code: &str,
    message: &str,
    extra: serde_json::Value,
) -> Response<Body> {
    let mut body = json!({"error": {"code": code, "message": message}});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(code) {
        h.insert("leasehold-error", v);
    }
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        h.insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"leasehold proxy\""),
        );
    }
    r
}

/// The proxy credential from `Proxy-Authorization`: `Bearer <credential>`
/// or `Basic` with the credential as the password (what an
/// `http://task:<credential>@host:port` proxy URL sends).
fn proxy_credential(headers: &HeaderMap) -> Option<Zeroizing<String>> {
    let v = headers.get(header::PROXY_AUTHORIZATION)?.to_str().ok()?;
    if let Some(t) = v.strip_prefix("Bearer ") {
        return Some(Zeroizing::new(t.trim().to_owned()));
    }
    let b = v.strip_prefix("Basic ")?;
    let raw = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .ok()?,
    );
    let s = std::str::from_utf8(&raw).ok()?;
    let (_, pass) = s.split_once(':')?;
    // a URL's userinfo arrives percent-encoded by some clients
    Some(Zeroizing::new(pass.to_owned())).filter(|p| !p.is_empty())
}

/// Hop-by-hop headers (RFC 9110 7.6.1), and those `Connection` names.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
}

pub(crate) fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where a request goes.
pub(crate) struct Target {
    pub(crate) https: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Path and query, as sent.
    pub(crate) path_and_query: String,
}

impl Target {
    pub(crate) fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query.as_str(), |(p, _)| p)
    }

    pub(crate) fn origin(&self) -> String {
        format!(
            "{}://{}:{}",
            if self.https { "https" } else { "http" },
            self.host,
            self.port
        )
    }
}

impl Proxy {
    pub(crate) fn count(&self, route: &str, outcome: &'static str) {
        metrics::with_local_recorder(&self.metrics, || {
            metrics::counter!("leasehold_proxy_requests_total", "route" => route.to_owned(), "outcome" => outcome)
                .increment(1);
        });
    }

    /// Count a refusal under its code and answer with it.
    pub(crate) fn fail(
        &self,
        route: &str,
        status: StatusCode,
        code: &'static str,
        message: &str,
    ) -> Response<Body> {
        self.count(route, code);
        answer(status, code, message, json!({}))
    }

    pub(crate) fn observe(&self, name: &'static str, route: &str, seconds: f64) {
        metrics::with_local_recorder(&self.metrics, || {
            metrics::histogram!(name, "route" => route.to_owned()).record(seconds);
        });
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        tunnel: Option<Arc<Tunnel>>,
    ) -> Response<Body> {
        if tunnel.is_none() && req.method() == Method::CONNECT {
            return self.connect(req);
        }
        let target = match self.target(&req, tunnel.as_deref()) {
            Ok(t) => t,
            Err(own) => return own,
        };
        let credential = match &tunnel {
            Some(t) => Some(t.credential.clone()),
            None => proxy_credential(req.headers()),
        };
        let Some(credential) = credential else {
            self.count("-", "unauthenticated");
            return answer(
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                "proxy_credential_required",
                "send your task's proxy credential: Proxy-Authorization: Bearer <credential>, or \
                 the password of the proxy URL (http://task:<credential>@host:port)",
                json!({}),
            );
        };
        if has_dot_segment(target.path()) {
            self.count("-", "refused");
            return answer(
                StatusCode::BAD_REQUEST,
                "path_not_normal",
                "the path has `.` or `..` segments (plain or encoded) or encoded slashes; send \
                 its normal form",
                json!({}),
            );
        }
        let Some(route) = self
            .routes
            .find(target.https, &target.host, target.port, target.path())
            .cloned()
        else {
            self.count("-", "not_routed");
            tracing::info!(origin = %target.origin(), path = %target.path(), "refused: no route");
            return answer(
                StatusCode::FORBIDDEN,
                "not_routed",
                &format!(
                    "no route covers {}{}; the proxy refuses every destination it does not route",
                    target.origin(),
                    target.path()
                ),
                json!({}),
            );
        };
        let started = Instant::now();
        let resp = self.forward(&route, target, &credential, req).await;
        self.observe(
            "leasehold_proxy_request_duration_seconds",
            &route.name,
            started.elapsed().as_secs_f64(),
        );
        resp
    }

    /// The request's destination, or the proxy's own answer (its metrics,
    /// its health, or why the request is not one it takes).
    #[allow(clippy::result_large_err)] // the error is the answer, sent at once
    fn target(
        &self,
        req: &Request<Incoming>,
        tunnel: Option<&Tunnel>,
    ) -> Result<Target, Response<Body>> {
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        if let Some(t) = tunnel {
            return Ok(Target {
                https: true,
                host: t.host.clone(),
                port: t.port,
                path_and_query: pq,
            });
        }
        let uri = req.uri();
        if let (Some(scheme), Some(auth)) = (uri.scheme_str(), uri.authority()) {
            let https = match scheme {
                "http" => false,
                "https" => true,
                _ => {
                    return Err(answer(
                        StatusCode::BAD_REQUEST,
                        "bad_scheme",
                        "only http and https",
                        json!({}),
                    ));
                }
            };
            let (host, port) = split_host_port(auth.as_str(), if https { 443 } else { 80 })
                .map_err(|m| answer(StatusCode::BAD_REQUEST, "bad_host", &m, json!({})))?;
            return Ok(Target {
                https,
                host,
                port,
                path_and_query: pq,
            });
        }
        if self.unix {
            // a Unix socket's clients send origin-form: the Host names it
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default();
            let (name, port) = match host.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || host.starts_with('[') => (
                    h.trim_matches(['[', ']']).to_ascii_lowercase(),
                    p.parse::<u16>().ok(),
                ),
                _ => (host.to_ascii_lowercase(), None),
            };
            return match self.routes.origin_for_host(&name, port) {
                Some((https, port)) => Ok(Target {
                    https,
                    host: name,
                    port,
                    path_and_query: pq,
                }),
                None => {
                    self.count("-", "not_routed");
                    Err(answer(
                        StatusCode::FORBIDDEN,
                        "not_routed",
                        &format!("no route (or more than one origin) for host `{host}`"),
                        json!({}),
                    ))
                }
            };
        }
        Err(self.own(req))
    }

    /// `GET /metrics` and `GET /health` on the proxy itself.
    fn own(&self, req: &Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => {
                let mut r = Response::new(full(self.metrics.handle().render()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            (&Method::GET, "/health") => {
                answer(StatusCode::OK, "ok", "serving", json!({"status": "ok"}))
            }
            _ => answer(
                StatusCode::BAD_REQUEST,
                "not_a_proxy_request",
                "this is an egress proxy: send absolute-form requests (set HTTP_PROXY/HTTPS_PROXY) \
                 or CONNECT; GET /metrics and /health are its own",
                json!({}),
            ),
        }
    }

    /// `CONNECT host:port`: only to a routed TLS origin; the tunnel is
    /// intercepted under the local CA.
    fn connect(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let Some(auth) = req.uri().authority().map(|a| a.as_str().to_owned()) else {
            return answer(
                StatusCode::BAD_REQUEST,
                "bad_connect",
                "CONNECT host:port",
                json!({}),
            );
        };
        let Ok((host, port)) = split_host_port(&auth, 443) else {
            return answer(
                StatusCode::BAD_REQUEST,
                "bad_connect",
                "CONNECT host:port",
                json!({}),
            );
        };
        let Some(credential) = proxy_credential(req.headers()) else {
            self.count("-", "unauthenticated");
            return answer(
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                "proxy_credential_required",
                "send your task's proxy credential with CONNECT (the password of the proxy URL)",
                json!({}),
            );
        };
        if !self.routes.any_tls(&host, port) {
            self.count("-", "not_routed");
            tracing::info!(%host, port, "refused CONNECT: no route");
            return answer(
                StatusCode::FORBIDDEN,
                "not_routed",
                &format!(
                    "no route covers https://{host}:{port}; the proxy refuses every destination it does not route"
                ),
                json!({}),
            );
        }
        let cfg = match self.ca.server_config(&host) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, %host, "minting a certificate failed");
                return answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "could not mint a certificate",
                    json!({}),
                );
            }
        };
        let tunnel = Arc::new(Tunnel {
            host,
            port,
            credential,
        });
        let this = self.clone();
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "CONNECT upgrade failed");
                    return;
                }
            };
            let tls = match tokio_rustls::TlsAcceptor::from(cfg)
                .accept(TokioIo::new(upgraded))
                .await
            {
                Ok(t) => t,
                Err(e) => {
                    tracing::info!(error = %e, host = %tunnel.host, "TLS in a CONNECT tunnel failed (does the client trust the proxy's CA?)");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| {
                let (p, t) = (this.clone(), tunnel.clone());
                async move { Ok::<_, Infallible>(p.handle(req, Some(t)).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
        Response::new(empty())
    }

    /// Decide with the broker, then send the request upstream with the
    /// credential and bring the answer back redacted.
    async fn forward(
        &self,
        route: &Arc<Route>,
        target: Target,
        credential: &str,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let approval = parts
            .headers
            .get(APPROVAL_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let held = match self
            .decide(
                route,
                credential,
                parts.method.as_str(),
                &target,
                approval.as_deref(),
            )
            .await
        {
            Ok(h) => h,
            Err(r) => return r,
        };
        // what goes upstream: no proxy or hop-by-hop headers, ours removed,
        // a body we can read
        strip_hop_by_hop(&mut parts.headers);
        let ours: Vec<HeaderName> = parts
            .headers
            .keys()
            .filter(|k| k.as_str().starts_with("leasehold-"))
            .cloned()
            .collect();
        for k in ours {
            parts.headers.remove(k);
        }
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let default_port = if route.dest.https { 443 } else { 80 };
        let authority = if route.dest.port == default_port {
            route.dest.host.clone()
        } else {
            format!("{}:{}", route.dest.host, route.dest.port)
        };
        if let Ok(h) = HeaderValue::from_str(&authority) {
            parts.headers.insert(header::HOST, h);
        }
        let uri = format!(
            "{}://{authority}{}",
            if route.dest.https { "https" } else { "http" },
            target.path_and_query
        );
        parts.uri = match uri.parse::<Uri>() {
            Ok(u) => u,
            Err(_) => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    "bad_uri",
                    "the request URI is not valid",
                    json!({}),
                );
            }
        };
        parts.version = http::Version::HTTP_11;
        let (body, signed): (Body, Bytes) = if route.signs() {
            match Limited::new(body, self.max_signed_body).collect().await {
                Ok(c) => {
                    let b = c.to_bytes();
                    (full(b.clone()), b)
                }
                Err(_) => {
                    self.count(&route.name, "refused");
                    return answer(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        &format!(
                            "a SigV4-signed request's body is read whole to sign it: at most {} bytes",
                            self.max_signed_body
                        ),
                        json!({}),
                    );
                }
            }
        } else {
            (
                body.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
                Bytes::new(),
            )
        };
        if let Err(e) = inject::apply(route, &held.grant, &mut parts, &signed, crate::now()) {
            self.count(&route.name, "inject_failed");
            tracing::error!(route = %route.name, error = %e, "injecting the credential failed");
            return answer(
                StatusCode::BAD_GATEWAY,
                "inject_failed",
                &format!("route `{}`: {e}", route.name),
                json!({}),
            );
        }
        let head_only = parts.method == Method::HEAD;
        let upstream = &self.upstream[route.index];
        let sent = tokio::time::timeout(
            self.upstream_timeout,
            upstream.request(Request::from_parts(parts, body)),
        )
        .await;
        let resp = match sent {
            Err(_) => {
                return self.fail(
                    &route.name,
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    &format!("{} did not answer in time", target.origin()),
                );
            }
            Ok(Err(e)) => return self.upstream_failed(route, &target, &e),
            Ok(Ok(r)) => r,
        };
        self.relay(route, &target, held, resp, head_only).await
    }
}
