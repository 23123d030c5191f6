//! Handlers: decode the wire type, call the broker, encode the answer.
//! Authorization of *who may see what* is the broker's (task/ and lease/);
//! authentication is the extractor's (auth/).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::{Form, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::WorkloadCaller;
use super::openapi::{CallsProvider, Conflict, Guarded, Public, WithBody, WithId, WithQuery};
use super::wire::*;
use super::{ApiError, AppState};
use crate::audit::Ctx;
use crate::auth::Caller;
use crate::config::OperatorRole;
use crate::domain::BrokerError;
use crate::domain::call::{CallOutcome, CallParams};
use crate::domain::incident::JobStart;
use crate::domain::lease::LeaseParams;
use crate::domain::task::OpenTask;
use crate::store::records::{LeaseQuery, LeaseState};

/// Run state-changing work to completion even if the request is dropped.
async fn detached<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, BrokerError>> + Send + 'static,
{
    use tracing::Instrument as _;
    // boxed: the task then moves a pointer, where it would otherwise copy
    // the whole future (a call's holds every state of the issue path)
    // through spawn into its cell
    match tokio::spawn(Box::pin(f).instrument(tracing::Span::current())).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => {
            tracing::error!(error = %e, "request task failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            ))
        }
    }
}

fn ctx(rid: ReqId, principal: String) -> Ctx {
    Ctx::request(rid.0, principal)
}

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
        Json(TaskView::new(&task, s.broker.clock.now())),
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
    let (task, leases) = s.broker.get_task(&caller, id)?;
    let calls = s
        .broker
        .store
        .read()
        .and_then(|r| r.task_calls(id.0))
        .map_err(BrokerError::from)?;
    Ok(Json(TaskDetail {
        task: TaskView::new(&task, s.broker.clock.now()),
        calls: calls.iter().map(CallView::from).collect(),
        leases: leases.iter().map(LeaseView::from).collect(),
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

#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/leases",
    tag = "leases",
    operation_id = "request_lease",
    security(("workload" = [])),
    params(("id" = String, Path, description = "task id (`task_...`)", pattern = "^task_[0-7][0-9a-hjkmnp-tv-z]{25}$")),
    request_body = LeaseBody,
    responses(Guarded, WithBody, WithId, Conflict, CallsProvider, (status = 201, description = "Allowed: the lease and its credential (the only response that carries one).", body = IssuedLeaseView), (status = 202, description = "Waits for a human approver; retry with `approval_id` once approved.", body = ApprovalRequiredView), (status = 403, description = "`policy_denied` with the decision, or another refusal.", body = ErrorBody))
)]
pub async fn request_lease(
    State(s): State<AppState>,
    WorkloadCaller(w): WorkloadCaller,
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

#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/calls",
    tag = "tasks",
    operation_id = "call",
    security(("workload" = [])),
    params(("id" = String, Path, description = "task id (`task_...`)", pattern = "^task_[0-7][0-9a-hjkmnp-tv-z]{25}$")),
    request_body = CallBody,
    responses(Guarded, WithBody, WithId, Conflict, CallsProvider, (status = 200, description = "Allowed; with `lease` when the call asked for a credential.", body = CallResponse), (status = 202, description = "Waits for a human approver; retry with `approval_id` once approved.", body = ApprovalRequiredView), (status = 403, description = "`policy_denied` with the decision, or another refusal.", body = ErrorBody))
)]
/// Decide one tool call; an allowed call with a credential gets its lease.
pub async fn call(
    State(s): State<AppState>,
    WorkloadCaller(w): WorkloadCaller,
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
        }),
        approval_id: body
            .approval_id
            .as_deref()
            .map(parse_approval_id)
            .transpose()?,
        break_glass: body.break_glass.map(|b| b.justification),
    };
    let broker = s.broker.clone();
    let c = ctx(rid, format!("workload:{}", w.id));
    let outcome = detached(async move { broker.call(&w, id, params, &c).await }).await?;
    match outcome {
        CallOutcome::Allowed { call, lease } => Ok(Json(CallResponse {
            call: CallView::from(&call),
            lease: lease.map(|issued| IssuedLeaseView {
                lease: LeaseView::from(&issued.lease),
                credential: CredentialWire(issued.credential),
            }),
        })
        .into_response()),
        CallOutcome::ApprovalRequired { call, approval } => Ok(approval_required(&call, &approval)),
    }
}

fn approver_ctx(rid: ReqId, caller: &Caller) -> Ctx {
    ctx(rid, caller.principal())
}

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

/// A JSON body that may be absent (an approval needs no comment).
fn optional_body<T: serde::de::DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, ApiError> {
    // no body, or JSON `null`, means no fields
    if bytes.iter().all(u8::is_ascii_whitespace) || bytes.trim_ascii() == b"null" {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("invalid_request", e.to_string()))
}

#[utoipa::path(
    post,
    path = "/v1/approvals/{id}/approve",
    tag = "approvals",
    operation_id = "approve",
    security(("operator" = ["approver", "admin"])),
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
    security(("operator" = ["approver", "admin"])),
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
    security(("operator" = ["approver", "admin"])),
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
    if !caller.has_any_role(&[OperatorRole::Admin]) {
        return Err(ApiError::forbidden(
            "forbidden",
            "the policy endpoints need the admin role",
        ));
    }
    Ok(Json(PolicyView::from(&*s.broker.policy.current())))
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
    if !caller.has_any_role(&[OperatorRole::Admin]) {
        return Err(ApiError::forbidden(
            "forbidden",
            "the policy endpoints need the admin role",
        ));
    }
    let broker = s.broker.clone();
    let by = caller.principal();
    match broker.reload_policy(rid.0, Some(by)).await {
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

const MAX_PAGE: usize = 1000;

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
    if !crate::domain::Broker::is_reader(&caller) {
        return Err(ApiError::forbidden(
            "forbidden",
            "stats need the admin or responder role",
        ));
    }
    let counters = s
        .broker
        .store
        .read()
        .and_then(|r| r.counters())
        .map_err(BrokerError::from)?;
    let leases = s
        .broker
        .providers
        .names()
        .map(|name| {
            let by_state = LeaseState::ALL
                .iter()
                .map(|&st| {
                    let n = counters.get(&(name.to_owned(), st)).copied().unwrap_or(0);
                    (st.as_str().to_owned(), n)
                })
                .collect();
            (name.to_owned(), by_state)
        })
        .collect();
    let stats = s.broker.store.stats();
    Ok(Json(StatsView {
        leases,
        store: StoreStatsView {
            commits: stats.commits.load(Ordering::Relaxed),
            operations: stats.operations.load(Ordering::Relaxed),
            apply_seconds: stats.apply_micros.load(Ordering::Relaxed) as f64 / 1e6,
            commit_seconds: stats.commit_micros.load(Ordering::Relaxed) as f64 / 1e6,
            checkpoints: stats.checkpoints.load(Ordering::Relaxed),
            checkpoint_seconds: stats.checkpoint_micros.load(Ordering::Relaxed) as f64 / 1e6,
            wal_bytes: stats.wal_bytes.load(Ordering::Relaxed),
            wal_seconds: stats.wal_micros.load(Ordering::Relaxed) as f64 / 1e6,
        },
    }))
}

fn require_reader(caller: &Caller) -> Result<(), ApiError> {
    if crate::domain::Broker::is_reader(caller) {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "forbidden",
            "the event chain is for the admin and responder roles",
        ))
    }
}

fn time_param(name: &str, v: Option<&str>) -> Result<Option<crate::clock::Timestamp>, ApiError> {
    v.map(|s| {
        crate::clock::parse_rfc3339(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_parameter",
                format!("`{name}` must be an RFC 3339 time"),
            )
        })
    })
    .transpose()
}

#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    operation_id = "events",
    security(("operator" = ["admin", "responder"])),
    params(EventListParams),
    responses(Guarded, WithQuery, (status = 200, description = "Events in chain order.", body = EventList))
)]
/// The event chain, filtered, in order, paged by `after`.
pub async fn events(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(p): ApiQuery<EventListParams>,
) -> Result<Json<EventList>, ApiError> {
    require_reader(&caller)?;
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            format!("`limit` must be between 1 and {MAX_PAGE}"),
        ));
    }
    let kind = p
        .kind
        .as_deref()
        .map(|k| {
            crate::audit::EventKind::parse(k).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_parameter",
                    format!("unknown event kind `{}`", k.escape_default()),
                )
            })
        })
        .transpose()?;
    let since = time_param("since", p.since.as_deref())?;
    let until = time_param("until", p.until.as_deref())?;
    if let (Some(a), Some(b)) = (since, until)
        && a >= b
    {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "`since` must be before `until`",
        ));
    }
    let task = p
        .task
        .as_deref()
        .map(parse_task_id)
        .transpose()?
        .map(|t| t.0);
    let reader = s.broker.store.read().map_err(BrokerError::from)?;
    let lease_task = match p.lease.as_deref() {
        Some(l) => {
            let id = parse_lease_id(l)?;
            Some(
                reader
                    .lease(id.0)
                    .map_err(BrokerError::from)?
                    .map_or(0, |r| r.task_id),
            )
        }
        None => None,
    };
    let a = &s.broker.auditor;
    let q = crate::audit::query::EventQuery {
        task,
        lease: p.lease.clone(),
        lease_task,
        workload: p.workload.as_deref().map(|w| a.workload(w)),
        user: p.user.as_deref().map(|u| a.user(u)),
        kind,
        since,
        until,
        after: p.after.unwrap_or(0),
        limit,
        scan_budget: 20_000,
    };
    let (events, next) =
        tokio::task::spawn_blocking(move || crate::audit::query::page(&reader, &q))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            })?
            .map_err(BrokerError::from)?;
    Ok(Json(EventList {
        events,
        next_cursor: next,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/events/verify",
    tag = "events",
    operation_id = "verify_events",
    security(("operator" = ["admin", "responder"])),
    responses(Guarded, (status = 200, description = "The verification report (`ok` false names the first break).", body = crate::audit::verify::VerifyReport))
)]
/// Verify the whole chain and every checkpoint, now.
pub async fn verify_events(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    require_reader(&caller)?;
    let reader = s.broker.store.read().map_err(BrokerError::from)?;
    let trusted = s
        .broker
        .checkpoint_key
        .as_ref()
        .map(|k| k.public_key().to_vec());
    let report =
        tokio::task::spawn_blocking(move || crate::audit::query::verify_store(&reader, trusted))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            })?
            .map_err(BrokerError::from)?;
    if !report.ok {
        tracing::error!(first_break = ?report.first_break, "the event chain does not verify");
    }
    Ok(Json(report).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/events/chain",
    tag = "events",
    operation_id = "chain",
    security(("operator" = ["admin", "responder"])),
    responses(Guarded, (status = 200, description = "Base, head and signed checkpoints.", body = ChainView))
)]
/// Where the chain starts and ends, and the key its checkpoints verify with.
pub async fn chain(State(s): State<AppState>, caller: Caller) -> Result<Json<ChainView>, ApiError> {
    require_reader(&caller)?;
    let r = s.broker.store.read().map_err(BrokerError::from)?;
    let (base, head) = (
        r.chain_base().map_err(BrokerError::from)?,
        r.chain_head().map_err(BrokerError::from)?,
    );
    let mut checkpoints = Vec::new();
    for (_, bytes) in r.checkpoints().map_err(BrokerError::from)? {
        checkpoints.push(
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or(serde_json::Value::Null),
        );
    }
    Ok(Json(ChainView {
        base_seq: base.seq,
        base_hash: crate::hex::encode(&base.hash),
        head_seq: head.seq,
        head_hash: crate::hex::encode(&head.hash),
        checkpoint_key: s
            .broker
            .checkpoint_key
            .as_ref()
            .map(|k| k.public_key_text()),
        checkpoints,
    }))
}

#[utoipa::path(
    post,
    path = "/v1/events/prune",
    tag = "events",
    operation_id = "prune_events",
    security(("operator" = ["admin"])),
    request_body = PruneBody,
    responses(Guarded, WithBody, Conflict, (status = 200, description = "Events up to `through_seq` removed; the chain now starts after it.", body = PruneView))
)]
/// Drop archived events (admin): the caller proves it holds the archive by
/// naming the hash of its last event.
pub async fn prune_events(
    State(s): State<AppState>,
    caller: Caller,
    rid: ReqId,
    ApiJson(body): ApiJson<PruneBody>,
) -> Result<Json<PruneView>, ApiError> {
    if !caller.has_any_role(&[OperatorRole::Admin]) {
        return Err(ApiError::forbidden(
            "forbidden",
            "pruning the chain needs the admin role",
        ));
    }
    let hash = crate::hex::decode32(&body.last_hash).ok_or_else(|| {
        ApiError::bad_request("invalid_request", "`last_hash` must be 64 hex characters")
    })?;
    let (through, a, now) = (
        body.through_seq,
        s.broker.auditor.clone(),
        s.broker.clock.now().unix_millis(),
    );
    let by = caller.principal();
    let removed = s
        .broker
        .store
        .write(move |t| {
            let removed = t.prune_events(through, &hash)?;
            let data = crate::event_data![
                ("through_seq", through),
                ("last_hash", crate::hex::encode(&hash)),
                ("removed", removed),
                ("by", by),
            ];
            crate::audit::append(
                t,
                &a,
                a.broker(crate::audit::EventKind::ChainPruned, now, rid.0, data),
            )?;
            Ok(removed)
        })
        .await
        .map_err(BrokerError::from)?;
    Ok(Json(PruneView {
        pruned: removed,
        base_seq: through,
    }))
}

#[utoipa::path(
    post,
    path = "/v1/introspect",
    tag = "tokens",
    operation_id = "introspect",
    security(("operator" = ["resource_server", "admin"])),
    request_body(content = IntrospectBody, content_type = "application/x-www-form-urlencoded"),
    responses(Guarded, (status = 200, description = "RFC 7662: `active` false for unknown, revoked or expired tokens.", body = IntrospectionView), (status = 400, description = "`invalid_request`: `token` missing or not a form.", body = ErrorBody))
)]
/// RFC 7662 token introspection, for resource servers.
pub async fn introspect(
    State(s): State<AppState>,
    caller: Caller,
    form: Result<Form<IntrospectBody>, axum::extract::rejection::FormRejection>,
) -> Result<Response, ApiError> {
    if !caller.has_any_role(&[OperatorRole::ResourceServer, OperatorRole::Admin]) {
        return Err(ApiError::forbidden(
            "forbidden",
            "introspection needs the resource_server role",
        ));
    }
    let Form(body) = form.map_err(|e| {
        ApiError::bad_request(
            "invalid_request",
            format!(
                "send `token` as application/x-www-form-urlencoded (RFC 7662): {}",
                e.body_text()
            ),
        )
    })?;
    let _hint = body.token_type_hint;
    let now = s.broker.clock.now();
    let answer = s
        .broker
        .providers
        .tokens()
        .map(|p| p.introspect(&body.token, now))
        .find(|i| i.active)
        .map_or_else(IntrospectionView::default, IntrospectionView::from);
    Ok(Json(answer).into_response())
}

#[utoipa::path(
    get,
    path = "/.well-known/jwks.json",
    tag = "tokens",
    operation_id = "jwks",
    responses(Public, (status = 200, description = "The public keys of every token provider.", body = JwkSet))
)]
/// The public keys of every token provider.
pub async fn jwks(State(s): State<AppState>) -> Json<JwkSet> {
    let keys: Vec<serde_json::Value> = s
        .broker
        .providers
        .tokens()
        .filter_map(|p| p.jwks().get("keys").and_then(|k| k.as_array()).cloned())
        .flatten()
        .collect();
    Json(JwkSet { keys })
}

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn metrics_response(s: &AppState) -> Result<Response, ApiError> {
    let body = s.broker.render_metrics()?;
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
    if !crate::domain::Broker::is_reader(&caller) {
        return Err(ApiError::forbidden(
            "forbidden",
            "metrics need the admin or responder role",
        ));
    }
    metrics_response(&s)
}

/// Prometheus exposition on the metrics listener (no credential: that
/// listener belongs on loopback or a private network).
pub async fn metrics_open(State(s): State<AppState>) -> Result<Response, ApiError> {
    metrics_response(&s)
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
    let store_ok = s.broker.store.is_healthy();
    checks.insert(
        "store".into(),
        if store_ok { "ok" } else { "unavailable" }.into(),
    );
    ok &= store_ok;
    let cached = s
        .health
        .lock()
        .ok()
        .and_then(|c| c.clone())
        .filter(|(at, _, _)| at.elapsed() < Duration::from_secs(1));
    let (provider_checks, providers_ok) = match cached {
        Some((_, c, pok)) => (c, pok),
        None => {
            let (c, pok) = provider_health(&s).await;
            if let Ok(mut cache) = s.health.lock() {
                *cache = Some((std::time::Instant::now(), c.clone(), pok));
            }
            (c, pok)
        }
    };
    checks.extend(provider_checks);
    ok &= providers_ok;
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(ReadyView { ready: ok, checks })).into_response()
}

/// Every provider's health check, with a timeout each.
async fn provider_health(s: &AppState) -> (std::collections::BTreeMap<String, String>, bool) {
    let mut checks = std::collections::BTreeMap::new();
    let mut ok = true;
    for entry in s.broker.providers.iter() {
        let r = tokio::time::timeout(Duration::from_secs(2), entry.provider.health()).await;
        let status = match r {
            Ok(Ok(())) => "ok",
            Ok(Err(e)) => {
                tracing::warn!(provider = %entry.name, error = %e, "provider health check failed");
                "unavailable"
            }
            Err(_) => {
                tracing::warn!(provider = %entry.name, "provider health check timed out");
                "unavailable"
            }
        };
        ok &= status == "ok";
        checks.insert(format!("provider:{}", entry.name), status.into());
    }
    (checks, ok)
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

// === incident response ===

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
    let now = s.broker.clock.now().unix_millis();
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
