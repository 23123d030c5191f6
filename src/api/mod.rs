//! The HTTP API (v1): router, middleware, handlers.
//!
//! Every response carries `x-request-id` (the caller's, if it sent a sane
//! one, else a fresh `req_...`), and every log line of the request carries
//! it through the request span. Responses are `Cache-Control: no-store`:
//! some carry credentials, and none should sit in a cache.
//!
//! Handlers that change state run their work in a spawned task: a client
//! that disconnects, or a request timeout, must not cancel the lifecycle
//! between intent and activation (the work completes; only the response is
//! lost).

mod approvals;
mod calls;
mod console;
mod error;
mod events;
mod extract;
mod incident;
mod leases;
pub mod limits;
pub mod openapi;
mod ops;
mod proxy;
mod reviews;
mod tasks;
mod tokens;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use tracing::Instrument as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::ApiError;
pub use extract::WorkloadCaller;

use crate::auth::Authenticator;
use crate::domain::Broker;
use crate::ids::RequestId;

/// Shared by every handler: one pointer, since axum clones the state for
/// every extractor and middleware of every request.
#[derive(Clone, Debug)]
pub struct AppState(Arc<AppShared>);

impl AppState {
    pub fn new(shared: AppShared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppShared;
    fn deref(&self) -> &AppShared {
        &self.0
    }
}

/// What [`AppState`] points to.
#[derive(Debug)]
pub struct AppShared {
    pub broker: Arc<Broker>,
    pub auth: Arc<Authenticator>,
    /// Turned false when shutdown begins, so readiness drains the broker.
    pub ready: Arc<AtomicBool>,
    pub limits: Arc<Limiter>,
    /// The last provider health results, reused for a second: readiness is
    /// unauthenticated, and must not become a way to load the providers.
    pub health: Arc<std::sync::Mutex<Option<HealthChecks>>>,
    /// `server.public_url` without a trailing `/`: where clients reach the
    /// broker, for DPoP proofs' `htu`.
    pub public_url: Option<String>,
    /// Whether the main listener speaks TLS (the scheme of `htu` without
    /// `public_url`, and the console cookie's `Secure`).
    pub tls: bool,
    /// The web console's sessions (in memory: a restart signs everyone out).
    pub console: console::Sessions,
}

/// Rate limits and the cap on requests in flight (`server.rate_limits`).
#[derive(Debug)]
pub struct Limiter {
    pub config: limits::RateLimitConfig,
    pub buckets: limits::Buckets,
    pub fairness: Arc<limits::Fairness>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// When provider health was checked, and what it found.
pub type HealthChecks = (std::time::Instant, crate::domain::ops::Readiness);

impl Limiter {
    /// Whether `ip` is within its budget of failed authentications
    /// (`Err`: how long until it is).
    pub(crate) fn auth_failures_left(
        &self,
        ip: std::net::IpAddr,
        now: std::time::Instant,
    ) -> Result<(), Duration> {
        let c = &self.config;
        self.buckets.peek(
            limits::Key::AuthFailures(ip),
            c.auth_failures_per_second,
            c.auth_failures_burst,
            now,
        )
    }

    /// Count a failed authentication from `ip` against its budget.
    pub(crate) fn auth_failed(&self, ip: std::net::IpAddr, now: std::time::Instant) {
        let c = &self.config;
        let _ = self.buckets.take(
            limits::Key::AuthFailures(ip),
            c.auth_failures_per_second,
            c.auth_failures_burst,
            now,
        );
    }

    pub fn new(config: limits::RateLimitConfig) -> Self {
        let in_flight = Arc::new(tokio::sync::Semaphore::new(config.max_in_flight));
        Self {
            config,
            buckets: limits::Buckets::default(),
            fairness: Arc::default(),
            in_flight,
        }
    }
}

/// The source address of a request, when the server recorded it.
pub fn source_ip(ext: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    ext.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

/// What admission hands out, held until the answer.
#[derive(Debug)]
struct Admitted {
    _global: tokio::sync::OwnedSemaphorePermit,
    _caller: Option<limits::Slot>,
}

/// A long-poll: `GET /v1/approvals/{id}?wait=...`.
fn is_long_poll(req: &Request) -> bool {
    req.method() == axum::http::Method::GET
        && req.uri().path().starts_with("/v1/approvals/")
        && req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p.starts_with("wait=")))
}

/// Limit each source address (429), then each caller's share (429: its
/// requests, or long-polls, in flight), then shed load beyond
/// `max_in_flight` (503), before anything else runs. Probes are exempt.
fn admission(state: &AppState, req: &Request) -> Result<Option<Admitted>, ApiError> {
    let path = req.uri().path();
    if matches!(path, "/v1/health" | "/v1/ready") {
        return Ok(None);
    }
    let l = &state.limits;
    if let Some(ip) = source_ip(req.extensions()) {
        let c = &l.config;
        if let Err(wait) = l.buckets.take(
            limits::Key::Address(ip),
            c.per_address_per_second,
            c.per_address_burst,
            std::time::Instant::now(),
        ) {
            return Err(ApiError::too_many(
                "rate_limited",
                "too many requests from this address",
                wait,
            ));
        }
    }
    let caller = match extract::bearer_token(req.headers()) {
        Some(token) => {
            let hash = limits::Fairness::token_hash(token);
            let c = &l.config;
            match l.fairness.admit(
                &hash,
                is_long_poll(req),
                c.per_caller_in_flight,
                c.per_caller_long_polls,
            ) {
                Ok(slot) => Some(slot),
                Err(over) => {
                    crate::metrics::caller_over_share();
                    let what = match over {
                        limits::OverShare::InFlight => {
                            "this caller has too many requests in flight"
                        }
                        limits::OverShare::LongPolls => "this caller holds too many long-polls",
                    };
                    return Err(ApiError::too_many(
                        "caller_over_share",
                        what,
                        Duration::from_secs(1),
                    ));
                }
            }
        }
        None => None,
    };
    match l.in_flight.clone().try_acquire_owned() {
        Ok(permit) => Ok(Some(Admitted {
            _global: permit,
            _caller: caller,
        })),
        Err(_) => Err(ApiError::overloaded()),
    }
}

/// When the request's time is up (`server.request_timeout_seconds`), for
/// handlers that wait (a long-poll must answer before it).
#[derive(Debug, Clone, Copy)]
pub struct RequestDeadline(pub tokio::time::Instant);

/// Answer `503 request_timeout` (in the error shape, with `Retry-After`)
/// when a request takes longer than the configured timeout. Work that a
/// handler detached keeps running; only the answer is given up.
async fn deadline(timeout: Duration, mut req: Request, next: Next) -> Response {
    let at = tokio::time::Instant::now() + timeout;
    req.extensions_mut().insert(RequestDeadline(at));
    match tokio::time::timeout_at(at, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            tracing::warn!(timeout_seconds = timeout.as_secs(), "request timed out");
            axum::response::IntoResponse::into_response(ApiError::timed_out())
        }
    }
}

/// Limits of the HTTP layer.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
}

/// Every route of the API, each with its OpenAPI operation: `routes!`
/// takes a handler's method and path from its `#[utoipa::path]`, so a route
/// cannot be added without its description (and `openapi::document` is
/// built from this same list).
pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(tasks::open_task))
        .routes(routes!(tasks::get_task))
        .routes(routes!(tasks::complete_task))
        .routes(routes!(calls::request_lease))
        .routes(routes!(calls::call))
        .routes(routes!(proxy::issue_proxy_credential))
        .routes(routes!(proxy::proxy_call))
        .routes(routes!(approvals::list_approvals))
        .routes(routes!(approvals::get_approval))
        .routes(routes!(approvals::approve))
        .routes(routes!(approvals::deny))
        .routes(routes!(reviews::list_reviews))
        .routes(routes!(reviews::sign_off))
        .routes(routes!(ops::policy))
        .routes(routes!(ops::reload_policy))
        .routes(routes!(leases::list_leases))
        .routes(routes!(leases::get_lease))
        .routes(routes!(leases::revoke_lease))
        .routes(routes!(incident::abandon_lease))
        .routes(routes!(
            incident::start_revocation,
            incident::list_revocations
        ))
        .routes(routes!(incident::get_revocation))
        .routes(routes!(incident::list_fences))
        .routes(routes!(incident::lift_fence))
        .routes(routes!(incident::reconcile))
        .routes(routes!(incident::blast_radius))
        .routes(routes!(ops::whoami))
        .routes(routes!(ops::providers))
        .routes(routes!(ops::stats))
        .routes(routes!(ops::cluster))
        .routes(routes!(events::events))
        .routes(routes!(events::verify_events))
        .routes(routes!(events::chain))
        .routes(routes!(events::archive_events))
        .routes(routes!(tokens::introspect))
        .routes(routes!(tokens::jwks))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::health))
        .routes(routes!(ops::ready))
        .routes(routes!(ops::openapi_json))
}

pub fn router(state: AppState, limits: HttpLimits) -> Router {
    let (api, _) = routes().split_for_parts();
    api.merge(console::routes())
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            Edge {
                app: state.clone(),
                timeout: limits.request_timeout,
            },
            edge,
        ))
        .with_state(state)
}

/// The plain listener for Prometheus and probes (`server.metrics_listen`).
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(ops::metrics_open))
        .route("/v1/health", get(ops::health))
        .route("/v1/ready", get(ops::ready))
        .fallback(ops::not_found)
        .with_state(state)
}

const REQUEST_ID: &str = "x-request-id";

/// The task or lease a path names (`/v1/tasks/{id}...`, `/v1/leases/{id}...`),
/// when it looks like one.
fn path_ids(path: &str) -> (Option<&str>, Option<&str>) {
    let mut parts = path.trim_start_matches('/').split('/');
    let (Some("v1"), Some(kind), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return (None, None);
    };
    let plausible = |prefix: &str| {
        id.starts_with(prefix)
            && id.len() <= 40
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    match kind {
        "tasks" if plausible("task_") => (Some(id), None),
        "leases" if plausible("lease_") => (None, Some(id)),
        _ => (None, None),
    }
}

fn acceptable_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// What the middleware needs.
#[derive(Clone, Debug)]
struct Edge {
    app: AppState,
    timeout: Duration,
}

/// The one middleware of the API (one layer rather than three: a layer
/// costs a boxed service and a boxed future per request). In order: give
/// every request an id (keeping a sane incoming one) and run it inside a
/// span carrying that id (so every log line of the request has it); admit
/// it (`admission`); answer within the deadline (`deadline`); record its
/// metrics, echo the id, and mark every response uncacheable.
async fn edge(State(edge): State<Edge>, mut req: Request, next: Next) -> Response {
    let state = &edge.app;
    let id = match req.headers().get(REQUEST_ID) {
        Some(v) if acceptable_request_id(v) => v.clone(),
        _ => HeaderValue::from_str(&RequestId::generate(state.broker.now()).to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("req_unknown")),
    };
    // workload, task and lease are filled in as they become known (the
    // Caller extractor, the path, the issue path), so every line of the
    // request carries them
    let (task, lease) = path_ids(req.uri().path());
    let span = tracing::info_span!(
        "request",
        request_id = %id.to_str().unwrap_or(""),
        method = %req.method(),
        path = %req.uri().path(),
        workload = tracing::field::Empty,
        task = task,
        lease = lease,
    );
    req.headers_mut().insert(REQUEST_ID, id.clone());
    // the route template, never the path: ids must not become labels
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let method = req.method().clone();
    let started = std::time::Instant::now();
    let admitted = span.in_scope(|| admission(state, &req));
    let mut resp = match admitted {
        Err(refused) => axum::response::IntoResponse::into_response(refused),
        Ok(permit) => {
            let resp = deadline(edge.timeout, req, next)
                .instrument(span.clone())
                .await;
            drop(permit);
            resp
        }
    };
    let status = resp.status().as_u16();
    crate::metrics::http_request(
        &method,
        route
            .as_ref()
            .map_or("unmatched", axum::extract::MatchedPath::as_str),
        status,
        started.elapsed().as_secs_f64(),
    );
    span.in_scope(|| {
        if status >= 500 {
            tracing::warn!(status, "request failed");
        } else {
            tracing::debug!(status, "request done");
        }
    });
    resp.headers_mut().insert(REQUEST_ID, id);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
