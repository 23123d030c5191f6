//! `/v1/leases`: one lease (never its credential), revoke it, list them.

use super::openapi::{CallsProvider, Conflict, Guarded, WithId, WithQuery};
use super::wire::{ApiQuery, MAX_PAGE, ReqId, ctx, detached, parse_lease_id, parse_task_id, ts};
use super::{ApiError, AppState};
use crate::auth::Caller;
use crate::ids::{LeaseId, TaskId};
use crate::store::records::LeaseQuery;
use crate::store::records::{LeaseRecord, LeaseState, Revocation};
use axum::Json;
use axum::extract::{Path, State};
use leasehold_provider::Credential;
use serde::ser::SerializeMap as _;
use serde::{Deserialize, Serialize};

#[utoipa::path(
    get,
    path = "/v1/leases/{id}",
    tag = "leases",
    operation_id = "get_lease",
    security(("workload" = []), ("operator" = ["admin", "responder"])),
    params(("id" = String, Path, description = "lease id (`lease_...`)", pattern = "^lease_[0-7][0-9a-hjkmnp-tv-z]{25}$")),
    responses(Guarded, WithId, (status = 200, description = "The lease (never its credential).", body = LeaseView))
)]
pub async fn get_lease(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<LeaseView>, ApiError> {
    let id = parse_lease_id(&id)?;
    Ok(Json(LeaseView::from(&s.broker.get_lease(&caller, id)?)))
}

#[utoipa::path(
    post,
    path = "/v1/leases/{id}/revoke",
    tag = "leases",
    operation_id = "revoke_lease",
    security(("workload" = []), ("operator" = ["admin", "responder"])),
    params(("id" = String, Path, description = "lease id (`lease_...`)", pattern = "^lease_[0-7][0-9a-hjkmnp-tv-z]{25}$")),
    responses(Guarded, WithId, Conflict, CallsProvider, (status = 200, description = "Revoked at the provider, or queued for retry (`revoking`); idempotent.", body = LeaseView))
)]
pub async fn revoke_lease(
    State(s): State<AppState>,
    caller: Caller,
    rid: ReqId,
    Path(id): Path<String>,
) -> Result<Json<LeaseView>, ApiError> {
    let id = parse_lease_id(&id)?;
    let broker = s.broker.clone();
    let c = ctx(rid, caller.principal());
    let rec = detached(async move { broker.revoke_lease(&caller, id, &c).await }).await?;
    Ok(Json(LeaseView::from(&rec)))
}

#[utoipa::path(
    get,
    path = "/v1/leases",
    tag = "leases",
    operation_id = "list_leases",
    security(("operator" = ["admin", "responder"])),
    params(LeaseListParams),
    responses(Guarded, WithQuery, (status = 200, description = "One page of leases, newest last.", body = LeaseListView))
)]
pub async fn list_leases(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(p): ApiQuery<LeaseListParams>,
) -> Result<Json<LeaseListView>, ApiError> {
    let state = match p.state.as_deref() {
        None => None,
        Some(st) => Some(LeaseState::parse(st).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_parameter",
                format!(
                    "`state` must be one of {}",
                    LeaseState::ALL
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?),
    };
    let task = p
        .task
        .as_deref()
        .map(parse_task_id)
        .transpose()?
        .map(|t| t.0);
    let after = p
        .cursor
        .as_deref()
        .map(parse_lease_id)
        .transpose()?
        .map(|l| l.0);
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            format!("`limit` must be between 1 and {MAX_PAGE}"),
        ));
    }
    let q = LeaseQuery {
        workload: p.workload,
        task,
        provider: p.provider,
        role: p.role,
        state,
        after,
        limit,
        scan_budget: 20_000,
    };
    let (leases, next) = s.broker.list_leases(&caller, &q)?;
    Ok(Json(LeaseListView {
        leases: leases.iter().map(LeaseView::from).collect(),
        next_cursor: next.map(|c| crate::ids::LeaseId(c).to_string()),
    }))
}

/// A lease state, as the API names it.
#[derive(Debug, utoipa::ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum LeaseStateName {
    Issuing,
    Active,
    Revoking,
    Revoked,
    Expired,
    RolledBack,
    Irrevocable,
    Abandoned,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LeaseListParams {
    #[param(value_type = Option<LeaseStateName>, inline)]
    pub state: Option<String>,
    #[param(min_length = 1)]
    pub workload: Option<String>,
    #[param(pattern = "^task_[0-7][0-9a-hjkmnp-tv-z]{25}$")]
    pub task: Option<String>,
    #[param(min_length = 1)]
    pub provider: Option<String>,
    #[param(min_length = 1)]
    pub role: Option<String>,
    /// The last `lease_id` of the previous page (`next_cursor`).
    #[param(pattern = "^lease_[0-7][0-9a-hjkmnp-tv-z]{25}$")]
    pub cursor: Option<String>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RevocationView {
    pub cause: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    pub requested_at: String,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The mass revocation job that took this lease back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

impl RevocationView {
    fn new(r: &Revocation, finished: bool) -> Self {
        Self {
            cause: r.cause.as_str(),
            requested_by: r.requested_by.clone(),
            requested_at: ts(r.requested_at),
            attempts: r.attempts,
            next_attempt_at: (!finished).then(|| ts(r.next_attempt_at)),
            last_error: r.last_error.clone(),
            job_id: r.job.map(|j| crate::ids::JobId(j).to_string()),
        }
    }
}

/// A lease as the API shows it: never its credential, never its handle.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LeaseView {
    pub lease_id: String,
    pub task_id: String,
    pub workload: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub on_behalf_of: String,
    pub provider: String,
    pub role: String,
    pub scope: Vec<String>,
    pub state: &'static str,
    pub ttl_seconds: u64,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<String>,
    pub expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revocation: Option<RevocationView>,
}

impl From<&LeaseRecord> for LeaseView {
    fn from(l: &LeaseRecord) -> Self {
        let start = l.issued_at.unwrap_or(l.created_at);
        Self {
            lease_id: LeaseId(l.id).to_string(),
            task_id: TaskId(l.task_id).to_string(),
            workload: l.workload.clone(),
            tenant: l.tenant.clone(),
            on_behalf_of: l.on_behalf_of.clone(),
            provider: l.provider.clone(),
            role: l.role.clone(),
            scope: l.scope.clone(),
            state: l.state.as_str(),
            ttl_seconds: u64::try_from((l.expires_at - start).max(0) / 1000).unwrap_or(0),
            created_at: ts(l.created_at),
            issued_at: l.issued_at.map(ts),
            expires_at: ts(l.expires_at),
            ended_at: l.ended_at.map(ts),
            description: l.description.clone(),
            revocation: l
                .revocation
                .as_ref()
                .map(|r| RevocationView::new(r, l.state.is_terminal())),
        }
    }
}

/// Serializes a credential straight from its secret wrappers into the
/// response body, without an intermediate plaintext copy.
#[derive(Debug)]
pub struct CredentialWire(pub Credential);

impl Serialize for CredentialWire {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let names: Vec<&str> = self.0.names().collect();
        let mut map = s.serialize_map(Some(names.len()))?;
        for name in names {
            map.serialize_entry(name, self.0.expose(name).unwrap_or_default())?;
        }
        map.end()
    }
}

/// The one response that carries a credential.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IssuedLeaseView {
    #[serde(flatten)]
    pub lease: LeaseView,
    /// The secret itself; its fields depend on the provider (a token
    /// provider gives `token`, PostgreSQL `username` and `password`, ...).
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub credential: CredentialWire,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LeaseListView {
    pub leases: Vec<LeaseView>,
    /// Pass as `cursor` for the next page; absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}
