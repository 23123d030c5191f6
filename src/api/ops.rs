//! Operations: the policy set, stats, metrics, probes, the OpenAPI
//! document and the fallbacks.

use super::openapi::{Guarded, Public};
use super::wire::{ErrorBody, ReqId};
use super::{ApiError, AppState};
use crate::auth::Caller;
use crate::domain::BrokerError;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[utoipa::path(
    get,
    path = "/v1/policy",
    tag = "admin",
    operation_id = "policy",
    security(("operator" = ["admin"])),
    responses(Guarded, (status = 200, description = "The policy set in force.", body = PolicyView))
)]
/// The policy set in force (admin).
pub async fn policy(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<PolicyView>, ApiError> {
    let loaded = s.broker.policy_in_force(&caller)?;
    Ok(Json(PolicyView::from(&*loaded)))
}

#[utoipa::path(
    post,
    path = "/v1/policy/reload",
    tag = "admin",
    operation_id = "reload_policy",
    security(("operator" = ["admin"])),
    responses(Guarded, (status = 200, description = "The new set is in force.", body = PolicyView), (status = 422, description = "`policy_invalid` with `problems` (file and line); the previous set stays in force.", body = ErrorBody))
)]
/// Reload the policy folder (admin): all or nothing; a bad set is refused
/// with file and line and the old set stays in force.
pub async fn reload_policy(
    State(s): State<AppState>,
    caller: Caller,
    rid: ReqId,
) -> Result<Json<PolicyView>, ApiError> {
    match s.broker.reload_policy_as(&caller, rid.0).await {
        Ok(l) => Ok(Json(PolicyView::from(&*l))),
        Err(BrokerError::Invalid { message, .. }) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "policy_invalid",
            "the policy set does not validate; the previous set stays in force",
        )
        .with(
            "problems",
            serde_json::Value::from(message.lines().map(str::to_owned).collect::<Vec<_>>()),
        )),
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "admin",
    operation_id = "stats",
    security(("operator" = ["admin", "responder"])),
    responses(Guarded, (status = 200, description = "Lease counts and store counters, without a scan.", body = StatsView))
)]
/// Lease counts by provider and state, and store commit counters, without
/// a scan (the store keeps the counts transactionally). Admin, responder.
pub async fn stats(State(s): State<AppState>, caller: Caller) -> Result<Json<StatsView>, ApiError> {
    let st = s.broker.stats(&caller)?;
    let c = st.store;
    Ok(Json(StatsView {
        leases: st.leases,
        advisories: provider_health(&s).await.advisories,
        store: StoreStatsView {
            commits: c.commits,
            operations: c.operations,
            apply_seconds: c.apply_seconds,
            commit_seconds: c.commit_seconds,
            lock_round_trips: c.lock_round_trips,
            checkpoints: c.checkpoints,
            checkpoint_seconds: c.checkpoint_seconds,
            wal_bytes: c.wal_bytes,
            wal_seconds: c.wal_seconds,
        },
    }))
}

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn metrics_response(body: String) -> Result<Response, ApiError> {
    Ok(([(axum::http::header::CONTENT_TYPE, PROMETHEUS_TEXT)], body).into_response())
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "admin",
    operation_id = "metrics",
    security(("operator" = ["admin", "responder"])),
    responses(Guarded, (status = 200, description = "Prometheus text exposition. (On `server.metrics_listen`, when configured, it is served without a credential.)", body = String, content_type = "text/plain; version=0.0.4; charset=utf-8"))
)]
/// Prometheus exposition on the main listener: admin and responder.
pub async fn metrics(State(s): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    metrics_response(s.broker.metrics_for(&caller)?)
}

/// Prometheus exposition on the metrics listener (no credential: that
/// listener belongs on loopback or a private network).
pub async fn metrics_open(State(s): State<AppState>) -> Result<Response, ApiError> {
    metrics_response(s.broker.render_metrics()?)
}

#[utoipa::path(
    get,
    path = "/v1/health",
    tag = "probes",
    operation_id = "health",
    responses((status = 200, description = "The process answers.", body = HealthView))
)]
pub async fn health() -> Json<HealthView> {
    Json(HealthView { status: "ok" })
}

/// The providers' health, checked at most once a second: readiness is
/// unauthenticated, and must not become a way to load the providers.
async fn provider_health(s: &AppState) -> crate::domain::ops::Readiness {
    let cached = s
        .health
        .lock()
        .ok()
        .and_then(|c| c.clone())
        .filter(|(at, _)| at.elapsed() < Duration::from_secs(1));
    if let Some((_, r)) = cached {
        return r;
    }
    let r = s.broker.provider_health().await;
    if let Ok(mut cache) = s.health.lock() {
        *cache = Some((std::time::Instant::now(), r.clone()));
    }
    r
}

#[utoipa::path(
    get,
    path = "/v1/ready",
    tag = "probes",
    operation_id = "ready",
    responses((status = 200, description = "Ready: not draining, the store and every provider answer.", body = ReadyView), (status = 503, description = "Not ready (draining, or a check failed).", body = ReadyView))
)]
/// Ready when not draining, the store answers and every provider's health
/// check passes. Details of failures are logged, not shown publicly.
pub async fn ready(State(s): State<AppState>) -> Response {
    let mut checks = std::collections::BTreeMap::new();
    let mut ok = s.ready.load(Ordering::Relaxed);
    if !ok {
        checks.insert("broker".into(), "shutting down".into());
    }
    let store_ok = s.broker.store_healthy() && !s.broker.store_full();
    checks.insert(
        "store".into(),
        if !s.broker.store_healthy() {
            "unavailable"
        } else if s.broker.store_full() {
            // writes are refused until space is freed; reads go on
            "full"
        } else {
            "ok"
        }
        .into(),
    );
    ok &= store_ok;
    // every node serves; leadership is reported, not required
    let leadership = s.broker.leadership();
    let role = match (leadership.clustered(), leadership.epoch()) {
        (false, _) => "single",
        (true, Some(_)) => "leader",
        (true, None) => "follower",
    };
    let providers = provider_health(&s).await;
    for (name, status) in providers.checks {
        // what to act on is for operators (`leasehold status`); readiness
        // is public, so it says only that there is something
        let status = match providers.advisories.get(&name).map(Vec::len) {
            Some(n) => format!("{status}, {n} advisory (see `leasehold status`)"),
            None => status,
        };
        checks.insert(name, status);
    }
    ok &= providers.ok;
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(ReadyView {
            ready: ok,
            role,
            checks,
        }),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/v1/cluster",
    tag = "admin",
    operation_id = "cluster",
    security(("operator" = ["admin", "responder"])),
    responses(Guarded, (status = 200, description = "The brokers sharing this store, the leader, its epoch and lease.", body = ClusterWire))
)]
/// The brokers sharing this store (PostgreSQL): each node and when it was
/// last seen, the leader, its epoch (fencing token) and when its lease
/// ends, by the database's clock. A single broker on redb answers
/// `clustered: false`. Admin, responder.
pub async fn cluster(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<ClusterWire>, ApiError> {
    let view = s.broker.cluster_view(&caller)?;
    let this = s.broker.leadership();
    Ok(Json(match view {
        None => ClusterWire {
            clustered: false,
            this_node_leads: this.epoch().is_some(),
            leader: None,
            epoch: None,
            lease_ends_at: None,
            lease_ms_left: None,
            leader_since: None,
            nodes: Vec::new(),
        },
        Some(v) => ClusterWire {
            clustered: true,
            this_node_leads: this.epoch().is_some(),
            leader: v.leader,
            epoch: v.epoch,
            lease_ends_at: v.lease_ends_at,
            lease_ms_left: v.lease_ms_left,
            leader_since: v.leader_since,
            nodes: v
                .nodes
                .into_iter()
                .map(|n| ClusterNodeWire {
                    node: n.node,
                    advertise: n.advertise,
                    started_at: n.started_at,
                    seen_ms_ago: n.seen_ms_ago,
                    leader: n.leader,
                })
                .collect(),
        },
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ClusterWire {
    /// False: one broker on its own redb file (it always leads).
    pub clustered: bool,
    /// Whether the broker that answered leads now.
    pub this_node_leads: bool,
    /// The node holding an unexpired leader lease, if any.
    pub leader: Option<String>,
    /// The leader's epoch: every leader-only write checks it.
    pub epoch: Option<i64>,
    pub lease_ends_at: Option<String>,
    /// Milliseconds until the lease ends (negative: lapsed, not yet taken).
    pub lease_ms_left: Option<i64>,
    pub leader_since: Option<String>,
    pub nodes: Vec<ClusterNodeWire>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ClusterNodeWire {
    pub node: String,
    pub advertise: String,
    pub started_at: String,
    /// Milliseconds since its last heartbeat (the database's clock).
    pub seen_ms_ago: i64,
    pub leader: bool,
}

/// This document: OpenAPI 3.1, generated from the handlers and wire types.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "probes",
    operation_id = "openapi",
    responses(Public, (status = 200, description = "The OpenAPI 3.1 document of this API.", body = Object))
)]
pub async fn openapi_json() -> Response {
    static DOC: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    match DOC.get_or_init(|| super::openapi::document_json().map_err(|e| e.to_string())) {
        Ok(doc) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            doc.clone(),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "could not render the OpenAPI document");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
            .into_response()
        }
    }
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

/// The policy set in force.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PolicyView {
    /// SHA-256 of the set, recorded with every decision.
    pub version: String,
    pub policies: usize,
    pub files: Vec<String>,
}

impl From<&crate::policy::Loaded> for PolicyView {
    fn from(l: &crate::policy::Loaded) -> Self {
        Self {
            version: l.version.clone(),
            policies: l.policy_count,
            files: l.files.clone(),
        }
    }
}

/// Store commit counters since start.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StoreStatsView {
    /// Group commits (each one write-ahead log record, one fdatasync).
    pub commits: u64,
    pub operations: u64,
    /// Writer time applying operations, and logging and committing them.
    pub apply_seconds: f64,
    pub commit_seconds: f64,
    /// On PostgreSQL: round trips batches made while holding the cluster's
    /// chain head lock, besides the one that took it and the one that
    /// committed (each keeps every node waiting). Zero on redb.
    pub lock_round_trips: u64,
    /// Durable commits of the store file that emptied the log, and their time.
    pub checkpoints: u64,
    pub checkpoint_seconds: f64,
    pub wal_bytes: u64,
    /// Of `commit_seconds`, the time writing and syncing the log.
    pub wal_seconds: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatsView {
    /// Lease counts by provider, then by state.
    pub leases: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    /// What healthy providers advise acting on before it stops them (by
    /// check, e.g. `provider:pg`): a PostgreSQL access list filling up.
    pub advisories: std::collections::BTreeMap<String, Vec<String>>,
    pub store: StoreStatsView,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HealthView {
    /// Always `ok`: the process answers.
    pub status: &'static str,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReadyView {
    pub ready: bool,
    /// `single` (one broker on redb), `leader` or `follower` (several on
    /// PostgreSQL; every node serves requests, the leader also runs expiry,
    /// revocation, jobs and checkpoints).
    pub role: &'static str,
    /// `broker`, `store` and `provider:<name>`: `ok`, `unavailable` or
    /// `shutting down`.
    pub checks: std::collections::BTreeMap<String, String>,
}

#[utoipa::path(
    get,
    path = "/v1/whoami",
    tag = "tasks",
    operation_id = "whoami",
    security(("workload" = []), ("operator" = ["admin", "approver", "responder", "resource_server"])),
    responses(Guarded, (status = 200, description = "Who the credential of this request signs in as.", body = IdentityView))
)]
/// Who the request's credential signs in as: a workload (its id, issuer,
/// subject and tenant) or an operator (its name and roles). For clients
/// that check their credential before they start.
pub async fn whoami(caller: Caller) -> Json<IdentityView> {
    Json(match &caller {
        Caller::Workload(w) => IdentityView {
            kind: "workload",
            id: w.id.clone(),
            issuer: Some(w.issuer.clone()),
            subject: Some(w.subject.clone()),
            tenant: w.tenant.clone(),
            roles: vec![],
        },
        Caller::Operator(o) => IdentityView {
            kind: "operator",
            id: o.name.clone(),
            issuer: None,
            subject: None,
            tenant: None,
            roles: o.roles.iter().map(|r| r.as_str()).collect(),
        },
    })
}

/// `GET /v1/whoami`
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IdentityView {
    /// `workload` or `operator`.
    pub kind: &'static str,
    /// A workload's id (`<issuer>:<subject>`), or an operator's name.
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// An operator's roles.
    pub roles: Vec<&'static str>,
}

#[utoipa::path(
    get,
    path = "/v1/providers",
    tag = "leases",
    operation_id = "providers",
    security(("workload" = []), ("operator" = ["admin", "approver", "responder"])),
    responses(Guarded, (status = 200, description = "Every provider and its roles.", body = ProviderList))
)]
/// The providers and roles a credential may be asked of (policy still
/// decides every request), with their ceilings and whether their
/// credentials are bound to the requester's key.
pub async fn providers(State(s): State<AppState>, _caller: Caller) -> Json<ProviderList> {
    Json(ProviderList {
        providers: s
            .broker
            .provider_catalog()
            .into_iter()
            .map(|p| ProviderView {
                name: p.name,
                kind: p.kind,
                revocation: p.revocation,
                roles: p
                    .roles
                    .into_iter()
                    .map(|r| RoleView {
                        name: r.name,
                        max_ttl_seconds: r.max_ttl_seconds,
                        description: r.description,
                        binding: r.binding,
                    })
                    .collect(),
            })
            .collect(),
    })
}

/// `GET /v1/providers`
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProviderList {
    pub providers: Vec<ProviderView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProviderView {
    pub name: String,
    /// The provider's `type` (`token`, `postgres`, `plugin`, ...).
    pub kind: &'static str,
    /// How its revocation works, in one sentence.
    pub revocation: String,
    pub roles: Vec<RoleView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RoleView {
    pub name: String,
    pub max_ttl_seconds: u64,
    pub description: String,
    /// `unsupported`, `optional` or `required` (`require_binding`): whether
    /// its credentials are bound to the key a request proves.
    pub binding: &'static str,
}
