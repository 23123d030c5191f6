//! `/v1/tasks/{id}/calls` and `/v1/tasks/{id}/leases`: one tool call or
//! credential request, decided by policy at the moment of action.

use super::WorkloadCaller;
use super::extract::ProvenKey;
use super::leases::{CredentialWire, IssuedLeaseView, LeaseView};
use super::openapi::{CallsProvider, Conflict, Guarded, WithBody, WithId};
use super::wire::{ApiJson, ErrorBody, ReqId, ctx, detached, parse_approval_id, parse_task_id, ts};
use super::{ApiError, AppState};
use crate::domain::call::{CallOutcome, CallParams};
use crate::domain::issue::LeaseParams;
use crate::ids::{LeaseId, TaskId};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/calls",
    tag = "tasks",
    operation_id = "call",
    security(("workload" = [])),
    params(("id" = String, Path, description = "task id (`task_...`)", pattern = "^task_[0-7][0-9a-hjkmnp-tv-z]{25}$"), ("DPoP" = Option<String>, Header, description = "A DPoP proof (RFC 9449) for this request: the credential is then bound to its key (`cnf.jkt`). Without it, a request over mutual TLS binds to the client certificate (`cnf[\"x5t#S256\"]`). A bad proof is a 400 `invalid_dpop_proof`; a role with `require_binding` refuses an unbound request (403 `binding_required`).")),
    request_body = CallBody,
    responses(Guarded, WithBody, WithId, Conflict, CallsProvider, (status = 200, description = "Allowed; with `lease` when the call asked for a credential.", body = CallResponse), (status = 202, description = "Waits for a human approver; retry with `approval_id` once approved.", body = ApprovalRequiredView), (status = 403, description = "`policy_denied` with the decision, or another refusal.", body = ErrorBody))
)]
/// Decide one tool call; an allowed call with a credential gets its lease.
pub async fn call(
    State(s): State<AppState>,
    WorkloadCaller(w): WorkloadCaller,
    ProvenKey(binding): ProvenKey,
    rid: ReqId,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CallBody>,
) -> Result<Response, ApiError> {
    let id = parse_task_id(&id)?;
    let params = CallParams {
        tool: body.tool,
        action: body.action,
        target: body.resource,
        arguments_sha256: body.arguments_sha256.to_ascii_lowercase(),
        credential: body.credential.map(|c| LeaseParams {
            provider: c.provider,
            role: c.role,
            ttl_seconds: c.ttl_seconds,
            scope: c.scope,
            binding: binding.clone(),
        }),
        approval_id: body
            .approval_id
            .as_deref()
            .map(parse_approval_id)
            .transpose()?,
        break_glass: body.break_glass.map(|b| b.justification),
        reuse_lease: None,
    };
    let broker = s.broker.clone();
    let c = ctx(rid, format!("workload:{}", w.id));
    let outcome = detached(async move { broker.call(&w, id, params, &c).await }).await?;
    Ok(call_response(outcome))
}

/// A decided call's answer: 200 with the call (and the lease of an allowed
/// call that asked for one), or 202 for an approval.
pub(super) fn call_response(outcome: CallOutcome) -> Response {
    match outcome {
        CallOutcome::Allowed { call, lease } => Json(CallResponse {
            call: CallView::from(&call),
            lease: lease.map(|issued| IssuedLeaseView {
                lease: LeaseView::from(&issued.lease),
                credential: CredentialWire(issued.credential),
            }),
        })
        .into_response(),
        CallOutcome::ApprovalRequired { call, approval } => approval_required(&call, &approval),
    }
}

#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/leases",
    tag = "leases",
    operation_id = "request_lease",
    security(("workload" = [])),
    params(("id" = String, Path, description = "task id (`task_...`)", pattern = "^task_[0-7][0-9a-hjkmnp-tv-z]{25}$"), ("DPoP" = Option<String>, Header, description = "A DPoP proof (RFC 9449) for this request: the credential is then bound to its key (`cnf.jkt`). Without it, a request over mutual TLS binds to the client certificate (`cnf[\"x5t#S256\"]`). A bad proof is a 400 `invalid_dpop_proof`; a role with `require_binding` refuses an unbound request (403 `binding_required`).")),
    request_body = LeaseBody,
    responses(Guarded, WithBody, WithId, Conflict, CallsProvider, (status = 201, description = "Allowed: the lease and its credential (the only response that carries one).", body = IssuedLeaseView), (status = 202, description = "Waits for a human approver; retry with `approval_id` once approved.", body = ApprovalRequiredView), (status = 403, description = "`policy_denied` with the decision, or another refusal.", body = ErrorBody))
)]
pub async fn request_lease(
    State(s): State<AppState>,
    WorkloadCaller(w): WorkloadCaller,
    ProvenKey(binding): ProvenKey,
    rid: ReqId,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<LeaseBody>,
) -> Result<Response, ApiError> {
    let id = parse_task_id(&id)?;
    let approval = body
        .approval_id
        .as_deref()
        .map(parse_approval_id)
        .transpose()?;
    let params = LeaseParams {
        provider: body.provider,
        role: body.role,
        ttl_seconds: body.ttl_seconds,
        scope: body.scope,
        binding,
    };
    let broker = s.broker.clone();
    let c = ctx(rid, format!("workload:{}", w.id));
    let outcome =
        detached(async move { broker.request_lease(&w, id, params, approval, &c).await }).await?;
    match outcome {
        CallOutcome::Allowed {
            lease: Some(issued),
            ..
        } => {
            let view = IssuedLeaseView {
                lease: LeaseView::from(&issued.lease),
                credential: CredentialWire(issued.credential),
            };
            Ok((StatusCode::CREATED, Json(view)).into_response())
        }
        CallOutcome::Allowed { lease: None, .. } => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no lease was issued",
        )),
        CallOutcome::ApprovalRequired { call, approval } => Ok(approval_required(&call, &approval)),
    }
}

fn approval_required(
    call: &crate::store::records::CallRecord,
    approval: &crate::store::records::ApprovalRecord,
) -> Response {
    let body = ApprovalRequiredView {
        decision: "approval_required",
        call_id: crate::ids::CallId(call.id).to_string(),
        approval_id: crate::ids::ApprovalId(approval.id).to_string(),
        expires_at: crate::clock::rfc3339(crate::clock::Timestamp::from_unix_millis(
            approval.expires_at,
        )),
        policies: call.policies.clone(),
        message: "a human approver must approve this exact request; retry it with `approval_id` once approved",
    };
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseBody {
    #[schema(min_length = 1)]
    pub provider: String,
    #[schema(min_length = 1)]
    pub role: String,
    /// Capped by policy, the role, `limits.max_lease_ttl_seconds` and the task.
    #[schema(minimum = 1)]
    pub ttl_seconds: i64,
    #[serde(default)]
    pub scope: Vec<String>,
    /// Retry of a request that needed approval, once approved.
    #[serde(default)]
    #[schema(pattern = "^appr_[0-7][0-9a-hjkmnp-tv-z]{25}$")]
    pub approval_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialBody {
    #[schema(min_length = 1)]
    pub provider: String,
    #[schema(min_length = 1)]
    pub role: String,
    #[schema(minimum = 1)]
    pub ttl_seconds: i64,
    #[serde(default)]
    pub scope: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakGlassBody {
    #[schema(min_length = 1, max_length = 1024)]
    pub justification: String,
}

/// `POST /v1/tasks/{id}/calls`
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallBody {
    #[schema(pattern = "^[A-Za-z0-9._:/-]{1,128}$")]
    pub tool: String,
    #[schema(min_length = 1, max_length = 128)]
    pub action: String,
    /// What the call touches (e.g. `doc:1`); a credential is scoped to it.
    #[serde(default)]
    #[schema(max_length = 512)]
    pub resource: String,
    /// SHA-256 of the call's arguments, recorded with the decision.
    #[serde(default)]
    #[schema(pattern = "^([0-9a-fA-F]{64})?$")]
    pub arguments_sha256: String,
    #[serde(default)]
    pub credential: Option<CredentialBody>,
    /// Retry of a call that needed approval, once approved.
    #[serde(default)]
    #[schema(pattern = "^appr_[0-7][0-9a-hjkmnp-tv-z]{25}$")]
    pub approval_id: Option<String>,
    #[serde(default)]
    pub break_glass: Option<BreakGlassBody>,
}

/// A decided call (never its credential; the lease is referenced by id).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CallView {
    pub call_id: String,
    pub task_id: String,
    pub workload: String,
    /// `allow`, `deny` or `approval_required`
    pub decision: String,
    pub tool: String,
    pub action: String,
    pub resource: String,
    pub policies: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ttl_seconds: Option<u64>,
    pub break_glass: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    pub policy_version: String,
    pub created_at: String,
}

impl From<&crate::store::records::CallRecord> for CallView {
    fn from(c: &crate::store::records::CallRecord) -> Self {
        Self {
            call_id: crate::ids::CallId(c.id).to_string(),
            task_id: TaskId(c.task_id).to_string(),
            workload: c.workload.clone(),
            decision: c.outcome.clone(),
            tool: c.tool.clone(),
            action: c.action.clone(),
            resource: c.target.clone(),
            policies: c.policies.clone(),
            reasons: c.reasons.clone(),
            max_ttl_seconds: c.max_ttl,
            break_glass: c.break_glass.is_some(),
            approval_id: c.approval_id.map(|a| crate::ids::ApprovalId(a).to_string()),
            lease_id: c.lease_id.map(|l| LeaseId(l).to_string()),
            policy_version: c.policy_version.clone(),
            created_at: ts(c.created_at),
        }
    }
}

/// `202`: the request waits for a human approver.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApprovalRequiredView {
    /// Always `approval_required`.
    pub decision: &'static str,
    pub call_id: String,
    pub approval_id: String,
    pub expires_at: String,
    pub policies: Vec<String>,
    pub message: &'static str,
}

/// A decided call; an allowed call that asked for a credential carries
/// its lease.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CallResponse {
    #[serde(flatten)]
    pub call: CallView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<IssuedLeaseView>,
}

/// The credential an approval request asked for.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CredentialSpecView {
    pub provider: String,
    pub role: String,
    pub ttl_seconds: u64,
    pub scope: Vec<String>,
}
