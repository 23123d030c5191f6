//! `/v1/approvals`: pending approvals, one approval (with a long poll),
//! approve or deny.

use super::calls::CredentialSpecView;
use super::openapi::{Conflict, Guarded, WithBody, WithId, WithQuery};
use super::wire::{ApiQuery, ReqId, approver_ctx, detached, optional_body, parse_approval_id, ts};
use super::{ApiError, AppState};
use crate::auth::Caller;
use crate::ids::TaskId;
use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[utoipa::path(
    get,
    path = "/v1/approvals",
    tag = "approvals",
    operation_id = "list_approvals",
    security(("operator" = ["approver", "admin"])),
    responses(Guarded, (status = 200, description = "Approvals waiting for a decision.", body = ApprovalList))
)]
pub async fn list_approvals(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<ApprovalList>, ApiError> {
    let list = s.broker.pending_approvals(&caller)?;
    Ok(Json(ApprovalList {
        approvals: list.iter().map(ApprovalView::from).collect(),
    }))
}

#[utoipa::path(
    get,
    path = "/v1/approvals/{id}",
    tag = "approvals",
    operation_id = "get_approval",
    security(("workload" = []), ("operator" = ["approver", "admin", "responder"])),
    params(("id" = String, Path, description = "approval id (`appr_...`)", pattern = "^appr_[0-7][0-9a-hjkmnp-tv-z]{25}$"), WaitParams),
    responses(Guarded, WithId, WithQuery, (status = 200, description = "The approval (after waiting for a decision, with `wait`).", body = ApprovalView))
)]
/// One approval; `?wait=N` long-polls up to N (at most 30) seconds for a decision.
pub async fn get_approval(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<WaitParams>,
    deadline: Option<axum::Extension<super::RequestDeadline>>,
) -> Result<Json<ApprovalView>, ApiError> {
    let id = parse_approval_id(&id)?;
    let mut wait = Duration::from_secs(q.wait.unwrap_or(0).min(30));
    // answer (with the approval as it stands) before the request times out
    if let Some(axum::Extension(d)) = deadline {
        let left = d.0.saturating_duration_since(tokio::time::Instant::now());
        wait = wait.min(left.saturating_sub(Duration::from_secs(1)));
    }
    let a = s.broker.await_approval(&caller, id, wait).await?;
    Ok(Json(ApprovalView::from(&a)))
}

#[utoipa::path(
    post,
    path = "/v1/approvals/{id}/approve",
    tag = "approvals",
    operation_id = "approve",
    security(("operator" = ["approver"])),
    params(("id" = String, Path, description = "approval id (`appr_...`)", pattern = "^appr_[0-7][0-9a-hjkmnp-tv-z]{25}$")),
    request_body(content = Option<DecideBody>, description = "Optional: a comment."),
    responses(Guarded, WithBody, WithId, Conflict, (status = 200, description = "Approved; the workload may now retry its request once.", body = ApprovalView))
)]
pub async fn approve(
    State(s): State<AppState>,
    caller: Caller,
    rid: ReqId,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<ApprovalView>, ApiError> {
    let body = optional_body(&body)?;
    decide(s, caller, rid, id, true, body).await
}

#[utoipa::path(
    post,
    path = "/v1/approvals/{id}/deny",
    tag = "approvals",
    operation_id = "deny",
    security(("operator" = ["approver"])),
    params(("id" = String, Path, description = "approval id (`appr_...`)", pattern = "^appr_[0-7][0-9a-hjkmnp-tv-z]{25}$")),
    request_body(content = Option<DecideBody>, description = "A comment is required to deny."),
    responses(Guarded, WithBody, WithId, Conflict, (status = 200, description = "Denied.", body = ApprovalView))
)]
pub async fn deny(
    State(s): State<AppState>,
    caller: Caller,
    rid: ReqId,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<ApprovalView>, ApiError> {
    let body = optional_body(&body)?;
    decide(s, caller, rid, id, false, body).await
}

async fn decide(
    s: AppState,
    caller: Caller,
    rid: ReqId,
    id: String,
    approve: bool,
    body: DecideBody,
) -> Result<Json<ApprovalView>, ApiError> {
    let id = parse_approval_id(&id)?;
    let c = approver_ctx(rid, &caller);
    let broker = s.broker.clone();
    let a = detached(async move {
        broker
            .decide_approval(&caller, id, approve, body.comment, &c)
            .await
    })
    .await?;
    Ok(Json(ApprovalView::from(&a)))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecideBody {
    /// Required to deny and to sign off.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 1024)]
    pub comment: Option<String>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WaitParams {
    /// Long-poll: wait up to this many seconds (max 30) for a decision.
    pub wait: Option<u64>,
}

/// An approval request as approvers and its workload see it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApprovalView {
    pub approval_id: String,
    pub task_id: String,
    pub workload: String,
    pub on_behalf_of: String,
    pub tool: String,
    pub action: String,
    pub resource: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialSpecView>,
    pub policies: Vec<String>,
    /// `pending`, `approved`, `denied`, `expired` or `consumed`
    pub state: &'static str,
    pub request_sha256: String,
    pub created_at: String,
    pub expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

impl From<&crate::store::records::ApprovalRecord> for ApprovalView {
    fn from(a: &crate::store::records::ApprovalRecord) -> Self {
        Self {
            approval_id: crate::ids::ApprovalId(a.id).to_string(),
            task_id: TaskId(a.task_id).to_string(),
            workload: a.workload.clone(),
            on_behalf_of: a.on_behalf_of.clone(),
            tool: a.tool.clone(),
            action: a.action.clone(),
            resource: a.target.clone(),
            credential: a.credential.as_ref().map(|c| CredentialSpecView {
                provider: c.provider.clone(),
                role: c.role.clone(),
                ttl_seconds: c.ttl_seconds,
                scope: c.scope.clone(),
            }),
            policies: a.policies.clone(),
            state: a.state.as_str(),
            request_sha256: crate::hex::encode(&a.request_hash),
            created_at: ts(a.created_at),
            expires_at: ts(a.expires_at),
            decided_by: a.decided_by.clone(),
            decided_at: a.decided_at.map(ts),
            comment: a.comment.clone(),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApprovalList {
    pub approvals: Vec<ApprovalView>,
}
