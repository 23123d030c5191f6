//! The egress proxy's two routes: an assistant gets a proxy credential for
//! its task, and `leasehold proxy` (an operator with the `proxy` role)
//! makes calls with it. The credential the call leases goes to the proxy,
//! never to the assistant; see `domain::proxy`.

use super::WorkloadCaller;
use super::calls::{ApprovalRequiredView, CallResponse, CredentialBody, call_response};
use super::openapi::{CallsProvider, Conflict, Guarded, WithBody, WithId};
use super::wire::{
    ApiJson, ErrorBody, ReqId, ctx, detached, parse_approval_id, parse_lease_id, parse_task_id, ts,
};
use super::{ApiError, AppState};
use crate::auth::Caller;
use crate::domain::BrokerError;
use crate::domain::call::CallParams;
use crate::domain::issue::LeaseParams;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use secrecy::ExposeSecret as _;
use serde::{Deserialize, Serialize};

#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/proxy-credentials",
    tag = "tasks",
    operation_id = "issue_proxy_credential",
    security(("workload" = [])),
    params(("id" = String, Path, description = "task id (`task_...`)", pattern = "^task_[0-7][0-9a-hjkmnp-tv-z]{25}$")),
    request_body(content = ProxyCredentialBody, description = "Optional: `ttl_seconds` to end the credential before the task."),
    responses(Guarded, WithBody, WithId, Conflict, (status = 201, description = "The proxy credential (shown once), its id (as the chain names it) and its end.", body = ProxyCredentialView))
)]
/// A credential for `leasehold proxy`, bound to this open task of the
/// caller and ending with it; recorded as `proxy.credential_issued`.
pub async fn issue_proxy_credential(
    State(s): State<AppState>,
    WorkloadCaller(w): WorkloadCaller,
    rid: ReqId,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let id = parse_task_id(&id)?;
    let body: ProxyCredentialBody = super::wire::optional_body(&body)?;
    let broker = s.broker.clone();
    let c = ctx(rid, format!("workload:{}", w.id));
    let issued = detached(async move {
        broker
            .issue_proxy_credential(&w, id, body.ttl_seconds, &c)
            .await
    })
    .await?;
    let view = ProxyCredentialView {
        proxy_credential: issued.token.expose_secret().to_owned(),
        id: issued.id,
        task_id: issued.task.to_string(),
        expires_at: ts(issued.expires_at),
    };
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/proxy/calls",
    tag = "tasks",
    operation_id = "proxy_call",
    security(("operator" = ["proxy"])),
    request_body = ProxyCallBody,
    responses(Guarded, WithBody, Conflict, CallsProvider, (status = 200, description = "Allowed: the call, and the lease with its credential unless `reuse_lease` was used.", body = CallResponse), (status = 202, description = "Waits for a human approver; retry with `approval_id` once approved.", body = ApprovalRequiredView), (status = 403, description = "`policy_denied` with the decision, `proxy_credential_invalid`, or another refusal.", body = ErrorBody), (status = 404, description = "`task_not_found`, or `lease_not_found` for a `reuse_lease` that is not this task's lease of this provider and role.", body = ErrorBody))
)]
/// A call made by the egress proxy for the assistant holding
/// `proxy_credential`: decided and recorded as that workload's own call
/// on its task (the decision names the proxy and the credential).
pub async fn proxy_call(
    State(s): State<AppState>,
    caller: Caller,
    rid: ReqId,
    ApiJson(body): ApiJson<ProxyCallBody>,
) -> Result<Response, ApiError> {
    let Caller::Operator(proxy) = caller else {
        return Err(ApiError::forbidden(
            "forbidden",
            "the caller's role may not call this route",
        ));
    };
    let params = CallParams {
        tool: body.tool,
        action: body.action,
        target: body.resource,
        arguments_sha256: body.arguments_sha256.to_ascii_lowercase(),
        credential: Some(LeaseParams {
            provider: body.credential.provider,
            role: body.credential.role,
            ttl_seconds: body.credential.ttl_seconds,
            scope: body.credential.scope,
            binding: None,
        }),
        approval_id: body
            .approval_id
            .as_deref()
            .map(parse_approval_id)
            .transpose()?,
        break_glass: None,
        reuse_lease: body
            .reuse_lease
            .as_deref()
            .map(parse_lease_id)
            .transpose()?,
    };
    let broker = s.broker.clone();
    let request_id = rid.0.clone();
    let c = ctx(rid, format!("operator:{}", proxy.name));
    let token = body.proxy_credential;
    let outcome = detached(async move {
        let result = broker.proxy_call(&proxy, &token, params, &c).await;
        if let Err(BrokerError::Forbidden {
            code: "proxy_credential_invalid",
            message,
        }) = &result
        {
            broker.auth_denied(format!("proxy {}: {message}", proxy.name), request_id);
        }
        result
    })
    .await?;
    Ok(call_response(outcome.1))
}

/// `POST /v1/tasks/{id}/proxy-credentials`
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProxyCredentialBody {
    /// End the credential this much sooner than the task (never later).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub ttl_seconds: Option<u64>,
}

/// A proxy credential: give it to `leasehold proxy` (as the password of
/// the proxy URL, or `Proxy-Authorization: Bearer`), never to a server.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProxyCredentialView {
    pub proxy_credential: String,
    /// `pxc_...`: how the chain names it.
    pub id: String,
    pub task_id: String,
    pub expires_at: String,
}

/// `POST /v1/proxy/calls`
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProxyCallBody {
    /// What the assistant showed the proxy (`lhp1.`...).
    #[schema(min_length = 1, max_length = 4096)]
    pub proxy_credential: String,
    #[schema(pattern = "^[A-Za-z0-9._:/-]{1,128}$")]
    pub tool: String,
    #[schema(min_length = 1, max_length = 128)]
    pub action: String,
    #[serde(default)]
    #[schema(max_length = 512)]
    pub resource: String,
    #[serde(default)]
    #[schema(pattern = "^([0-9a-fA-F]{64})?$")]
    pub arguments_sha256: String,
    /// The credential the route injects.
    pub credential: CredentialBody,
    /// A live lease of this task, provider and role that the proxy holds:
    /// decide and record the call against it instead of minting another.
    #[serde(default)]
    #[schema(pattern = "^lease_[0-7][0-9a-hjkmnp-tv-z]{25}$")]
    pub reuse_lease: Option<String>,
    /// Retry of a call that needed approval, once approved.
    #[serde(default)]
    #[schema(pattern = "^appr_[0-7][0-9a-hjkmnp-tv-z]{25}$")]
    pub approval_id: Option<String>,
}
