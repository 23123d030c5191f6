//! Responders' routes: mass revocation jobs, fences, reconciliation,
//! abandoning an irrevocable lease, blast radius.

use super::leases::LeaseView;
use super::openapi::{CallsProvider, Conflict, Guarded, WithBody, WithId, WithQuery};
use super::wire::{
    ApiJson, ApiQuery, ErrorBody, ReqId, ctx, detached, parse_lease_id, parse_task_id, time_param,
    ts,
};
use super::{ApiError, AppState};
use crate::auth::Caller;
use crate::domain::incident::JobStart;
use crate::store::records::LeaseState;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

#[utoipa::path(
    post,
    path = "/v1/revocations",
    tag = "incident",
    operation_id = "start_revocation",
    security(("operator" = ["responder"])),
    request_body = RevocationBody,
    responses(Guarded, WithBody, (status = 200, description = "Dry run: what the job would take.", body = crate::domain::incident::DryRunView), (status = 202, description = "The job is running in the background (fences are in force already).", body = crate::domain::incident::JobView), (status = 409, description = "`job_running`: a job with the same selector is under way (`job`).", body = ErrorBody))
)]
/// Start a mass revocation: `202` with the job (the work runs in the
/// background), `200` with counts for a dry run, `409 job_running` with
/// the running job if one with the same selector is under way.
pub async fn start_revocation(
    State(s): State<AppState>,
    caller: Caller,
    rid: ReqId,
    ApiJson(body): ApiJson<RevocationBody>,
) -> Result<Response, ApiError> {
    let req = body.into_request()?;
    let broker = s.broker.clone();
    let c = ctx(rid, caller.principal());
    let started = detached(async move { broker.start_job(&caller, req, &c).await }).await?;
    let status_of = |job: &crate::store::records::JobRecord| s.broker.job_view(job);
    match started {
        JobStart::DryRun(v) => Ok(Json(v).into_response()),
        JobStart::Started(job) => {
            let mut view = status_of(&job)?;
            view.warnings = Some(s.broker.selector_warnings(&job.selector)?);
            Ok((StatusCode::ACCEPTED, Json(view)).into_response())
        }
        JobStart::Existing(job) => {
            let view = status_of(&job)?;
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "job_running",
                format!(
                    "a job with the same selector is running: {}",
                    crate::ids::JobId(job.id)
                ),
            )
            .with("job", serde_json::to_value(view).unwrap_or_default()))
        }
    }
}

#[utoipa::path(
    get,
    path = "/v1/revocations",
    tag = "incident",
    operation_id = "list_revocations",
    security(("operator" = ["admin", "responder"])),
    responses(Guarded, (status = 200, description = "Every job.", body = JobList))
)]
pub async fn list_revocations(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<JobList>, ApiError> {
    Ok(Json(JobList {
        jobs: s.broker.list_jobs(&caller)?,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/revocations/{id}",
    tag = "incident",
    operation_id = "get_revocation",
    security(("operator" = ["admin", "responder"])),
    params(("id" = String, Path, description = "job id (`job_...`)", pattern = "^job_[0-7][0-9a-hjkmnp-tv-z]{25}$")),
    responses(Guarded, WithId, (status = 200, description = "The job, its counts, and the leases still failing.", body = crate::domain::incident::JobView))
)]
pub async fn get_revocation(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<crate::domain::incident::JobView>, ApiError> {
    let id: crate::ids::JobId = id
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_id", "not a job id (job_...)"))?;
    Ok(Json(s.broker.job_status(&caller, id)?))
}

#[utoipa::path(
    get,
    path = "/v1/fences",
    tag = "incident",
    operation_id = "list_fences",
    security(("operator" = ["admin", "responder"])),
    responses(Guarded, (status = 200, description = "Fences in force.", body = FenceList))
)]
pub async fn list_fences(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<FenceList>, ApiError> {
    let fences = s
        .broker
        .list_fences(&caller)?
        .iter()
        .map(FenceView::from)
        .collect();
    Ok(Json(FenceList { fences }))
}

#[utoipa::path(
    post,
    path = "/v1/fences/lift",
    tag = "incident",
    operation_id = "lift_fence",
    security(("operator" = ["responder"])),
    request_body = LiftFenceBody,
    responses(Guarded, WithBody, (status = 200, description = "Lifted.", body = LiftedFence), (status = 404, description = "`fence_not_found`.", body = ErrorBody))
)]
pub async fn lift_fence(
    State(s): State<AppState>,
    caller: Caller,
    rid: ReqId,
    ApiJson(body): ApiJson<LiftFenceBody>,
) -> Result<Json<LiftedFence>, ApiError> {
    let broker = s.broker.clone();
    let c = ctx(rid, caller.principal());
    let f = detached(async move {
        broker
            .lift_fence(&caller, body.kind, body.value, body.reason, &c)
            .await
    })
    .await?;
    Ok(Json(LiftedFence {
        lifted: FenceView::from(&f),
    }))
}

#[utoipa::path(
    post,
    path = "/v1/providers/{name}/reconcile",
    tag = "incident",
    operation_id = "reconcile",
    security(("operator" = ["admin", "responder"])),
    params(("name" = String, Path, description = "provider name from the configuration")),
    request_body = ReconcileBody,
    responses(Guarded, WithBody, CallsProvider, (status = 200, description = "What the peer holds that no live lease accounts for.", body = crate::domain::incident::ReconcileReport))
)]
/// Compare a provider's peer with the store; remove orphans when asked.
pub async fn reconcile(
    State(s): State<AppState>,
    caller: Caller,
    rid: ReqId,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<ReconcileBody>,
) -> Result<Json<crate::domain::incident::ReconcileReport>, ApiError> {
    let broker = s.broker.clone();
    let c = ctx(rid, caller.principal());
    let report =
        detached(async move { broker.reconcile(&caller, &name, body.drop, &c).await }).await?;
    Ok(Json(report))
}

#[utoipa::path(
    post,
    path = "/v1/leases/{id}/abandon",
    tag = "incident",
    operation_id = "abandon_lease",
    security(("operator" = ["responder"])),
    params(("id" = String, Path, description = "lease id (`lease_...`)", pattern = "^lease_[0-7][0-9a-hjkmnp-tv-z]{25}$")),
    request_body = AbandonBody,
    responses(Guarded, WithBody, WithId, Conflict, (status = 200, description = "The irrevocable lease is marked abandoned (loudly); the broker stops retrying.", body = LeaseView))
)]
pub async fn abandon_lease(
    State(s): State<AppState>,
    caller: Caller,
    rid: ReqId,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<AbandonBody>,
) -> Result<Json<LeaseView>, ApiError> {
    let id = parse_lease_id(&id)?;
    let broker = s.broker.clone();
    let c = ctx(rid, caller.principal());
    let rec =
        detached(async move { broker.abandon_lease(&caller, id, body.reason, &c).await }).await?;
    Ok(Json(LeaseView::from(&rec)))
}

#[utoipa::path(
    get,
    path = "/v1/blast-radius",
    tag = "incident",
    operation_id = "blast_radius",
    security(("operator" = ["admin", "responder"])),
    params(BlastRadiusParams),
    responses(Guarded, WithQuery, (status = 200, description = "Tasks, calls and leases of the workload in the window.", body = crate::domain::incident::BlastRadius))
)]
/// Everything one workload did in a window (default: the last 24 hours).
pub async fn blast_radius(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(p): ApiQuery<BlastRadiusParams>,
) -> Result<Json<crate::domain::incident::BlastRadius>, ApiError> {
    let workload = p.workload;
    if workload.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "`workload` is required",
        ));
    }
    let now = s.broker.now().unix_millis();
    let since =
        time_param("since", p.since.as_deref())?.map_or(now - 86_400_000, |t| t.unix_millis());
    let until = time_param("until", p.until.as_deref())?.map_or(i64::MAX, |t| t.unix_millis());
    if since >= until {
        return Err(ApiError::bad_request(
            "invalid_time_range",
            "`since` must be before `until`",
        ));
    }
    Ok(Json(
        s.broker.blast_radius(&caller, &workload, since, until)?,
    ))
}

/// `POST /v1/revocations`: a selector (every field given must match),
/// a reason, and whether to fence and whether to only count.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevocationBody {
    #[serde(default)]
    pub workload: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub task: Option<String>,
    /// The user the leases' tasks act for.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    /// Lease states to take back: `active`, `irrevocable` (default both).
    #[serde(default)]
    pub states: Vec<String>,
    /// RFC 3339.
    #[serde(default)]
    #[schema(format = DateTime)]
    pub issued_after: Option<String>,
    #[serde(default)]
    #[schema(format = DateTime)]
    pub issued_before: Option<String>,
    #[serde(default)]
    pub all: bool,
    /// Why (required; recorded with the job).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 1024)]
    pub reason: String,
    #[serde(default)]
    pub fence: bool,
    #[serde(default)]
    pub dry_run: bool,
}

impl RevocationBody {
    pub fn into_request(self) -> Result<crate::domain::incident::JobRequest, ApiError> {
        let time = |name: &str, v: Option<String>| -> Result<Option<i64>, ApiError> {
            v.map(|s| {
                crate::clock::parse_rfc3339(&s)
                    .map(|t| t.unix_millis())
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_parameter",
                            format!("`{name}` must be an RFC 3339 time"),
                        )
                    })
            })
            .transpose()
        };
        let mut states = Vec::new();
        for st in &self.states {
            match LeaseState::parse(st) {
                Some(x @ (LeaseState::Active | LeaseState::Irrevocable)) => states.push(x),
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_state",
                        format!(
                            "`states`: `{}` is not `active` or `irrevocable`",
                            st.escape_default()
                        ),
                    ));
                }
            }
        }
        states.sort_by_key(|s| s.as_str());
        states.dedup();
        let nonempty = |name: &str, v: Option<String>| -> Result<Option<String>, ApiError> {
            match v {
                Some(s) if s.trim().is_empty() || s.len() > 256 => Err(ApiError::bad_request(
                    "invalid_parameter",
                    format!("`{name}` must be 1-256 characters"),
                )),
                other => Ok(other),
            }
        };
        let selector = crate::store::records::Selector {
            workload: nonempty("workload", self.workload)?,
            tenant: nonempty("tenant", self.tenant)?,
            task: self
                .task
                .as_deref()
                .map(parse_task_id)
                .transpose()?
                .map(|t| t.0),
            user: nonempty("user", self.user)?,
            provider: nonempty("provider", self.provider)?,
            role: nonempty("role", self.role)?,
            states,
            issued_after: time("issued_after", self.issued_after)?,
            issued_before: time("issued_before", self.issued_before)?,
            all: self.all,
        };
        Ok(crate::domain::incident::JobRequest {
            selector,
            reason: self.reason,
            fence: self.fence,
            dry_run: self.dry_run,
        })
    }
}

/// `POST /v1/fences/lift`
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LiftFenceBody {
    /// `workload`, `tenant` or `user`.
    #[schema(pattern = "^(workload|tenant|user)$")]
    pub kind: String,
    #[schema(min_length = 1)]
    pub value: String,
    /// Why (required).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 1024)]
    pub reason: String,
}

/// `POST /v1/providers/{name}/reconcile`
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconcileBody {
    /// Remove the orphans found (default: report only).
    #[serde(default)]
    pub drop: bool,
}

/// `POST /v1/leases/{id}/abandon`
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AbandonBody {
    /// Why (required).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 1024)]
    pub reason: String,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct BlastRadiusParams {
    /// The workload id (`issuer:subject`).
    #[param(min_length = 1)]
    pub workload: String,
    /// RFC 3339; default: the last 24 hours.
    #[param(format = DateTime)]
    pub since: Option<String>,
    #[param(format = DateTime)]
    pub until: Option<String>,
}

/// A fence: new tasks, calls and leases matching it are refused.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FenceView {
    /// `workload`, `tenant` or `user`.
    pub kind: String,
    pub value: String,
    pub reason: String,
    pub created_by: String,
    pub created_at: String,
    pub job_id: Option<String>,
}

impl From<&crate::store::records::FenceRecord> for FenceView {
    fn from(f: &crate::store::records::FenceRecord) -> Self {
        Self {
            kind: f.kind.clone(),
            value: f.value.clone(),
            reason: f.reason.clone(),
            created_by: f.created_by.clone(),
            created_at: ts(f.created_at),
            job_id: f.job.map(|j| crate::ids::JobId(j).to_string()),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FenceList {
    pub fences: Vec<FenceView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LiftedFence {
    pub lifted: FenceView,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobList {
    pub jobs: Vec<crate::domain::incident::JobView>,
}
