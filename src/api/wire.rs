//! Wire types: what the HTTP API accepts and returns. Field names are part
//! of the contract (DESIGN.md): `task_id`, `lease_id`, `workload`, `state`,
//! RFC 3339 UTC times, whole-second `ttl_seconds`. Storage records convert
//! into these explicitly; nothing here is stored.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use leasehold_provider::{Credential, Timestamp};
use serde::de::DeserializeOwned;
use serde::ser::SerializeMap as _;
use serde::{Deserialize, Serialize};

use super::ApiError;
use crate::clock::rfc3339;
use crate::ids::{LeaseId, TaskId};
use crate::store::records::{LeaseRecord, LeaseState, Revocation, TaskRecord, TaskState};

// === extractors ===

/// `axum::Json` with our error shape: unknown fields and wrong types name the
/// field (400 `invalid_request`), broken JSON is 400 `malformed_json`, a
/// missing content type is 415, an oversized body 413.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(rej) => Err(json_rejection(rej)),
        }
    }
}

fn json_rejection(rej: JsonRejection) -> ApiError {
    let status = rej.status();
    match rej {
        JsonRejection::JsonDataError(e) => ApiError::bad_request("invalid_request", e.body_text()),
        JsonRejection::JsonSyntaxError(e) => ApiError::bad_request("malformed_json", e.body_text()),
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as `Content-Type: application/json`",
        ),
        other if status == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            other.body_text(),
        ),
        other => ApiError::bad_request("invalid_request", other.body_text()),
    }
}

/// Query strings, with unknown parameters rejected (400 `invalid_parameter`).
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                Err(ApiError::bad_request("invalid_parameter", e.body_text()))
            }
            Err(e) => Err(ApiError::bad_request("invalid_parameter", e.body_text())),
        }
    }
}

/// The request id the middleware assigned (for events).
#[derive(Debug, Clone)]
pub struct ReqId(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for ReqId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ))
    }
}

pub fn parse_task_id(s: &str) -> Result<TaskId, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request("invalid_id", "not a task id (task_...)"))
}

pub fn parse_approval_id(s: &str) -> Result<crate::ids::ApprovalId, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request("invalid_id", "not an approval id (appr_...)"))
}

pub fn parse_lease_id(s: &str) -> Result<LeaseId, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request("invalid_id", "not a lease id (lease_...)"))
}

// === requests ===

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

/// A tool name.
#[derive(Debug, utoipa::ToSchema)]
#[schema(pattern = "^[A-Za-z0-9._:/-]{1,128}$")]
#[allow(dead_code)]
pub struct ToolName(String);

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

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventListParams {
    #[param(pattern = "^task_[0-7][0-9a-hjkmnp-tv-z]{25}$")]
    pub task: Option<String>,
    #[param(pattern = "^lease_[0-7][0-9a-hjkmnp-tv-z]{25}$")]
    pub lease: Option<String>,
    #[param(min_length = 1)]
    pub workload: Option<String>,
    #[param(min_length = 1)]
    pub user: Option<String>,
    #[param(min_length = 1)]
    pub kind: Option<String>,
    /// RFC 3339
    #[param(format = DateTime)]
    pub since: Option<String>,
    /// RFC 3339
    #[param(format = DateTime)]
    pub until: Option<String>,
    /// Cursor: events after this seq.
    pub after: Option<u64>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneBody {
    /// Remove events up to and including this seq…
    #[schema(minimum = 1)]
    pub through_seq: u64,
    /// …whose hash the archive ends with (proof the caller holds it).
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    pub last_hash: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct IntrospectBody {
    pub token: String,
    #[serde(default)]
    pub token_type_hint: Option<String>,
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

// === responses ===

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

fn ts(ms: i64) -> String {
    rfc3339(Timestamp::from_unix_millis(ms))
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

/// The credential an approval request asked for.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CredentialSpecView {
    pub provider: String,
    pub role: String,
    pub ttl_seconds: u64,
    pub scope: Vec<String>,
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
pub struct CompletionView {
    pub task_id: String,
    pub state: &'static str,
    /// Leases this completion revoked.
    pub revoked: Vec<LeaseView>,
    /// Leases whose revocation failed and is being retried.
    pub pending: Vec<LeaseView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LeaseListView {
    pub leases: Vec<LeaseView>,
    /// Pass as `cursor` for the next page; absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
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

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApprovalList {
    pub approvals: Vec<ApprovalView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReviewList {
    pub reviews: Vec<ReviewView>,
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
    pub store: StoreStatsView,
}

/// One event of the chain, as stored (canonical JSON) plus its hash.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Event)]
pub struct EventSchema {
    /// Format version.
    pub v: u32,
    pub seq: u64,
    /// e.g. `task.opened`, `call.decided`, `lease.issued`, `lease.revoked`
    pub kind: String,
    /// RFC 3339 UTC
    pub time: String,
    /// SHA-256 (hex) of the previous event's canonical bytes.
    pub prev_hash: String,
    /// SHA-256 (hex) of this event's canonical bytes.
    pub hash: String,
    /// What happened; the fields depend on `kind`.
    pub data: std::collections::BTreeMap<String, serde_json::Value>,
    /// The ids the event concerns (task, lease, workload, ...).
    pub links: std::collections::BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventList {
    #[schema(value_type = Vec<EventSchema>)]
    pub events: Vec<serde_json::Value>,
    /// Pass as `after` for the next page; absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<u64>,
}

/// A signed checkpoint of the chain head.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Checkpoint)]
pub struct CheckpointSchema {
    pub seq: u64,
    pub hash: String,
    pub time: String,
    pub key_id: String,
    /// Ed25519, base64.
    pub signature: String,
}

/// Where the chain starts and ends, and the key its checkpoints verify with.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChainView {
    pub base_seq: u64,
    pub base_hash: String,
    pub head_seq: u64,
    pub head_hash: String,
    pub checkpoint_key: Option<String>,
    #[schema(value_type = Vec<CheckpointSchema>)]
    pub checkpoints: Vec<serde_json::Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PruneView {
    pub pruned: u64,
    pub base_seq: u64,
}

/// RFC 7662: an inactive token says nothing else; an active one carries
/// its claims.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct IntrospectionView {
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    /// The lease id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The user the task acts for (RFC 8693 `act`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub act: Option<ActorView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_type: Option<&'static str>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ActorView {
    pub sub: String,
}

impl From<leasehold_provider::TokenInfo> for IntrospectionView {
    fn from(i: leasehold_provider::TokenInfo) -> Self {
        Self {
            active: i.active,
            iss: i.iss,
            sub: i.sub,
            aud: i.aud,
            iat: i.iat,
            nbf: i.nbf,
            exp: i.exp,
            jti: i.jti,
            task: i.task,
            role: i.role,
            scope: i.scope,
            tenant: i.tenant,
            act: i.act.map(|sub| ActorView { sub }),
            token_type: i.token_type,
        }
    }
}

/// One public key (RFC 7517).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Jwk)]
pub struct JwkSchema {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub kid: String,
    pub alg: String,
    #[serde(rename = "use")]
    pub use_: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JwkSet {
    #[schema(value_type = Vec<JwkSchema>)]
    pub keys: Vec<serde_json::Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HealthView {
    /// Always `ok`: the process answers.
    pub status: &'static str,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReadyView {
    pub ready: bool,
    /// `broker`, `store` and `provider:<name>`: `ok`, `unavailable` or
    /// `shutting down`.
    pub checks: std::collections::BTreeMap<String, String>,
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

/// Every error: `{"error": {"code", "message"}}`, plus a field for some.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
    /// `policy_denied`: the decision (outcome, action, call id, policies, reasons).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<DenialView>,
    /// `policy_invalid`: each problem, with file and line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problems: Option<Vec<String>>,
    /// `job_running`: the job already under way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<crate::domain::incident::JobView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable; clients branch on it (e.g. `lease_not_found`, `policy_denied`,
    /// `rate_limited`, `provider_unavailable`).
    pub code: &'static str,
    /// For people.
    pub message: String,
}

/// A denial as its caller sees it (never another tenant's policy text).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DenialView {
    /// Always `deny`.
    pub outcome: &'static str,
    pub action: &'static str,
    pub call_id: Option<String>,
    pub policies: Vec<String>,
    pub reasons: Vec<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobList {
    pub jobs: Vec<crate::domain::incident::JobView>,
}
