//! `/v1/reviews`: break-glass tasks awaiting sign-off, and the sign-off.

use super::approvals::DecideBody;
use super::openapi::{Conflict, Guarded, WithBody, WithId};
use super::wire::{ApiJson, ReqId, approver_ctx, detached, parse_task_id, ts};
use super::{ApiError, AppState};
use crate::auth::Caller;
use crate::ids::TaskId;
use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;

#[utoipa::path(
    get,
    path = "/v1/reviews",
    tag = "approvals",
    operation_id = "list_reviews",
    security(("operator" = ["approver", "admin", "responder"])),
    responses(Guarded, (status = 200, description = "Break-glass tasks awaiting sign-off.", body = ReviewList))
)]
pub async fn list_reviews(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<ReviewList>, ApiError> {
    let list = s.broker.pending_reviews(&caller)?;
    Ok(Json(ReviewList {
        reviews: list.iter().map(ReviewView::from).collect(),
    }))
}

#[utoipa::path(
    post,
    path = "/v1/reviews/{id}/sign-off",
    tag = "approvals",
    operation_id = "sign_off",
    security(("operator" = ["approver"])),
    params(("id" = String, Path, description = "task id (`task_...`) of the review", pattern = "^task_[0-7][0-9a-hjkmnp-tv-z]{25}$")),
    request_body = DecideBody,
    responses(Guarded, WithBody, WithId, Conflict, (status = 200, description = "Signed off.", body = ReviewView))
)]
pub async fn sign_off(
    State(s): State<AppState>,
    caller: Caller,
    rid: ReqId,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<DecideBody>,
) -> Result<Json<ReviewView>, ApiError> {
    let id = parse_task_id(&id)?;
    let comment = body
        .comment
        .ok_or_else(|| ApiError::bad_request("comment_required", "a sign-off needs a comment"))?;
    let c = approver_ctx(rid, &caller);
    let broker = s.broker.clone();
    let r = detached(async move { broker.sign_off_review(&caller, id, comment, &c).await }).await?;
    Ok(Json(ReviewView::from(&r)))
}

/// One break-glass call of a task under review.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReviewCallView {
    pub call_id: String,
    pub tool: String,
    pub justification: String,
    /// RFC 3339
    pub at: String,
}

/// A task that used break-glass, awaiting sign-off.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReviewView {
    pub task_id: String,
    pub workload: String,
    pub on_behalf_of: String,
    pub calls: Vec<ReviewCallView>,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_off_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_off_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

impl From<&crate::store::records::ReviewRecord> for ReviewView {
    fn from(r: &crate::store::records::ReviewRecord) -> Self {
        Self {
            task_id: TaskId(r.task_id).to_string(),
            workload: r.workload.clone(),
            on_behalf_of: r.on_behalf_of.clone(),
            calls: r
                .calls
                .iter()
                .map(|(id, tool, j, at)| ReviewCallView {
                    call_id: crate::ids::CallId(*id).to_string(),
                    tool: tool.clone(),
                    justification: j.clone(),
                    at: ts(*at),
                })
                .collect(),
            created_at: ts(r.created_at),
            signed_off_by: r.signed_off_by.clone(),
            signed_off_at: r.signed_off_at.map(ts),
            comment: r.comment.clone(),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReviewList {
    pub reviews: Vec<ReviewView>,
}
