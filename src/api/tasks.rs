//! `/v1/tasks`: open a task, read it, complete it (its leases revoked).

use super::WorkloadCaller;
use super::calls::CallView;
use super::leases::LeaseView;
use super::openapi::{Conflict, Guarded, WithBody, WithId};
use super::wire::{ApiJson, ReqId, ctx, detached, parse_task_id, ts};
use super::{ApiError, AppState};
use crate::auth::Caller;
use crate::domain::task::OpenTask;
use crate::ids::TaskId;
use crate::store::records::{TaskRecord, TaskState};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use leasehold_provider::Timestamp;
use serde::{Deserialize, Serialize};

#[utoipa::path(
    post,
    path = "/v1/tasks",
    tag = "tasks",
    operation_id = "open_task",
    security(("workload" = [])),
    request_body = OpenTaskBody,
    responses(Guarded, WithBody, (status = 201, description = "The task is open.", body = TaskView))
)]
pub async fn open_task(
    State(s): State<AppState>,
    WorkloadCaller(w): WorkloadCaller,
    rid: ReqId,
    ApiJson(body): ApiJson<OpenTaskBody>,
) -> Result<Response, ApiError> {
    let req = OpenTask {
        purpose: body.purpose,
        on_behalf_of: body.on_behalf_of,
        prompt: body.prompt,
        prompt_sha256: body.prompt_sha256,
        tools: body.tools,
        ttl_seconds: body.ttl_seconds,
    };
    let broker = s.broker.clone();
    let c = ctx(rid, format!("workload:{}", w.id));
    let task = detached(async move { broker.open_task(&w, req, &c).await }).await?;
    Ok((
        StatusCode::CREATED,
        Json(TaskView::new(&task, s.broker.now())),
    )
        .into_response())
}

#[utoipa::path(
    get,
    path = "/v1/tasks/{id}",
    tag = "tasks",
    operation_id = "get_task",
    security(("workload" = []), ("operator" = ["admin"])),
    params(("id" = String, Path, description = "task id (`task_...`)", pattern = "^task_[0-7][0-9a-hjkmnp-tv-z]{25}$")),
    responses(Guarded, WithId, (status = 200, description = "The task with its calls and leases (never a credential).", body = TaskDetail))
)]
pub async fn get_task(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<TaskDetail>, ApiError> {
    let id = parse_task_id(&id)?;
    let d = s.broker.get_task(&caller, id)?;
    Ok(Json(TaskDetail {
        task: TaskView::new(&d.task, s.broker.now()),
        calls: d.calls.iter().map(CallView::from).collect(),
        leases: d.leases.iter().map(LeaseView::from).collect(),
    }))
}

#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/complete",
    tag = "tasks",
    operation_id = "complete_task",
    security(("workload" = [])),
    params(("id" = String, Path, description = "task id (`task_...`)", pattern = "^task_[0-7][0-9a-hjkmnp-tv-z]{25}$")),
    responses(Guarded, WithId, Conflict, (status = 200, description = "Completed; every lease of the task was revoked (or is being retried: `pending`).", body = CompletionView))
)]
pub async fn complete_task(
    State(s): State<AppState>,
    WorkloadCaller(w): WorkloadCaller,
    rid: ReqId,
    Path(id): Path<String>,
) -> Result<Json<CompletionView>, ApiError> {
    let id = parse_task_id(&id)?;
    let broker = s.broker.clone();
    let c = ctx(rid, format!("workload:{}", w.id));
    let report = detached(async move { broker.complete_task(&w, id, &c).await }).await?;
    Ok(Json(CompletionView {
        task_id: id.to_string(),
        state: "completed",
        revoked: report.revoked.iter().map(LeaseView::from).collect(),
        pending: report.pending.iter().map(LeaseView::from).collect(),
    }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenTaskBody {
    /// Why the task exists (printable, not blank).
    #[schema(min_length = 1, max_length = 512)]
    pub purpose: String,
    /// The user the assistant acts for.
    #[schema(min_length = 1, max_length = 256)]
    pub on_behalf_of: String,
    /// The prompt (only its SHA-256 is kept); this or `prompt_sha256`, not both.
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    pub prompt_sha256: Option<String>,
    /// The tools the task may call (a call to any other is denied).
    #[serde(default)]
    #[schema(inline, value_type = Vec<ToolName>)]
    pub tools: Vec<String>,
    /// Capped by `limits.max_task_ttl_seconds`.
    #[schema(minimum = 1)]
    pub ttl_seconds: i64,
}

/// A tool name.
#[derive(Debug, utoipa::ToSchema)]
#[schema(pattern = "^[A-Za-z0-9._:/-]{1,128}$")]
#[allow(dead_code)]
pub struct ToolName(String);

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TaskView {
    pub task_id: String,
    pub workload: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// `open`, `completed`, or `expired` (open past its deadline).
    pub state: &'static str,
    pub purpose: String,
    pub on_behalf_of: String,
    pub prompt_sha256: String,
    pub tools: Vec<String>,
    pub created_at: String,
    pub expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    pub lease_count: u32,
}

impl TaskView {
    pub fn new(t: &TaskRecord, now: Timestamp) -> Self {
        let state = match t.state {
            TaskState::Completed => "completed",
            TaskState::Open if t.expires_at <= now.unix_millis() => "expired",
            TaskState::Open => "open",
        };
        Self {
            task_id: TaskId(t.id).to_string(),
            workload: t.workload.clone(),
            tenant: t.tenant.clone(),
            state,
            purpose: t.purpose.clone(),
            on_behalf_of: t.on_behalf_of.clone(),
            prompt_sha256: crate::hex::encode(&t.prompt_sha256),
            tools: t.tools.clone(),
            created_at: ts(t.created_at),
            expires_at: ts(t.expires_at),
            completed_at: t.completed_at.map(ts),
            lease_count: t.lease_count,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TaskDetail {
    #[serde(flatten)]
    pub task: TaskView,
    pub calls: Vec<CallView>,
    pub leases: Vec<LeaseView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CompletionView {
    pub task_id: String,
    pub state: &'static str,
    /// Leases this completion revoked.
    pub revoked: Vec<LeaseView>,
    /// Leases whose revocation failed and is being retried.
    pub pending: Vec<LeaseView>,
}
