//! The one place errors become HTTP responses.
//!
//! Shape: `{"error": {"code": "lease_not_found", "message": "..."}}`. Codes
//! are stable (clients branch on them); messages are for people. Provider
//! and store failures are logged with their detail and answered without it,
//! so no peer internals (hostnames, SQL, upstream errors) reach a caller.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::auth::AuthError;
use crate::domain::BrokerError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    www_authenticate: bool,
    /// Seconds for `Retry-After` (429, 503 when shedding load).
    retry_after: Option<u64>,
    /// Extra top-level fields (a denial's decision, a policy's problems).
    extra: Option<Box<(&'static str, serde_json::Value)>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            www_authenticate: false,
            retry_after: None,
            extra: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthenticated(e: AuthError) -> Self {
        Self {
            www_authenticate: true,
            ..Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", e.to_string())
        }
    }

    /// 429 with `Retry-After`.
    pub fn too_many(
        code: &'static str,
        message: impl Into<String>,
        wait: std::time::Duration,
    ) -> Self {
        Self {
            retry_after: Some(super::limits::retry_after_secs(wait)),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, message)
        }
    }

    /// 503: more requests in flight than `max_in_flight`.
    pub fn overloaded() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many requests in flight; retry shortly",
            )
        }
    }

    /// 503: the request took longer than `server.request_timeout_seconds`.
    pub fn timed_out() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "request_timeout",
                "the request took longer than the server allows; retry it",
            )
        }
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    pub fn with(mut self, key: &'static str, value: serde_json::Value) -> Self {
        self.extra = Some(Box::new((key, value)));
        self
    }

    pub fn not_found(code: &'static str) -> Self {
        let message = match code {
            "task_not_found" => "no such task",
            "lease_not_found" => "no such lease",
            "approval_not_found" => "no such approval",
            "review_not_found" => "no break-glass review for this task",
            "call_not_found" => "no such call",
            "job_not_found" => "no such revocation job",
            "fence_not_found" => "no such fence",
            _ => "no such resource",
        };
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::Invalid { code, message } => Self::bad_request(code, message),
            BrokerError::NotFound { code } => Self::not_found(code),
            BrokerError::Forbidden { code, message } => Self::forbidden(code, message),
            BrokerError::Conflict { code, message } => {
                Self::new(StatusCode::CONFLICT, code, message)
            }
            BrokerError::Quota { code, message } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, code, message)
            }
            BrokerError::Denied(d) => {
                Self::new(StatusCode::FORBIDDEN, "policy_denied", d.reasons.join("; ")).with(
                    "decision",
                    serde_json::json!({
                        "outcome": "deny",
                        "action": d.action,
                        "call_id": d.call_id,
                        "policies": d.policies,
                        "reasons": d.reasons,
                    }),
                )
            }
            BrokerError::Provider {
                provider,
                retryable,
                detail,
            } => {
                tracing::error!(provider = %provider, retryable, error = %detail, "provider call failed");
                if retryable {
                    Self::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "provider_unavailable",
                        format!(
                            "provider `{provider}` is unavailable; retry later (details in the broker log)"
                        ),
                    )
                } else {
                    Self::new(
                        StatusCode::BAD_GATEWAY,
                        "provider_error",
                        format!(
                            "provider `{provider}` refused the request (details in the broker log)"
                        ),
                    )
                }
            }
            BrokerError::StoreFull(why) => {
                tracing::warn!(error = %why, "write refused: the store's filesystem is full");
                Self {
                    retry_after: Some(30),
                    ..Self::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "store_full",
                        "the store's disk is full: writes are refused, nothing was written; \
                         reads and introspection go on; retry once space is freed",
                    )
                }
            }
            BrokerError::Store(e) => {
                tracing::error!(error = %e, "store failure");
                // the store (a database failing over, a disk) comes back by
                // itself: tell clients when to try again
                Self {
                    retry_after: Some(1),
                    ..Self::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "store_unavailable",
                        "the store is unavailable; retry later",
                    )
                }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        if let Some(extra) = self.extra {
            let (k, v) = *extra;
            body[k] = v;
        }
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.www_authenticate {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"leasehold\""),
            );
        }
        resp
    }
}
