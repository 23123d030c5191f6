//! What every resource shares: the JSON, query and request-id extractors
//! (errors in the API's shape), id parsing, the error body, and running
//! state-changing work detached from the request.

use super::ApiError;
use crate::audit::Ctx;
use crate::auth::Caller;
use crate::clock::rfc3339;
use crate::domain::BrokerError;
use crate::ids::{LeaseId, TaskId};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use leasehold_provider::Timestamp;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::future::Future;

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

pub(super) fn json_rejection(rej: JsonRejection) -> ApiError {
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

pub(super) fn ts(ms: i64) -> String {
    rfc3339(Timestamp::from_unix_millis(ms))
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

/// Run state-changing work to completion even if the request is dropped
/// (its client gone, its deadline passed). The work runs in the request's
/// own task, so an answer costs no hand-off between threads; only if the
/// request is dropped first does what remains of the work move to a task
/// of its own, which finishes it (see [`Finish`]). A panic in the work is
/// a 500, as a failed task would be.
pub(super) async fn detached<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, BrokerError>> + Send + 'static,
{
    use tracing::Instrument as _;
    // boxed: moving the work to a task then moves a pointer, where it
    // would otherwise copy the whole future (a call's holds every state of
    // the issue path)
    let mut work = Finish(Some(Box::pin(f.instrument(tracing::Span::current()))));
    match std::future::poll_fn(|cx| work.poll(cx)).await {
        Some(r) => r.map_err(ApiError::from),
        None => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )),
    }
}

type Work<T> = std::pin::Pin<Box<dyn Future<Output = Result<T, BrokerError>> + Send + 'static>>;

/// Work that is finished whatever happens to whoever awaits it: dropped
/// unfinished, it is spawned to run to its end.
struct Finish<T: Send + 'static>(Option<Work<T>>);

impl<T: Send + 'static> Finish<T> {
    /// `None`: the work panicked (logged; it is not resumed).
    fn poll(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<T, BrokerError>>> {
        use std::task::Poll;
        let Some(work) = self.0.as_mut() else {
            return Poll::Ready(None);
        };
        let polled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work.as_mut().poll(cx)));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(r)) => {
                self.0 = None;
                Poll::Ready(Some(r))
            }
            Err(_) => {
                self.0 = None;
                tracing::error!("request work panicked");
                Poll::Ready(None)
            }
        }
    }
}

impl<T: Send + 'static> Drop for Finish<T> {
    fn drop(&mut self) {
        if let Some(work) = self.0.take() {
            // outside a runtime (it is shutting down) nothing could run it
            // anyway, as with any task it would have dropped
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = work.await;
                });
            }
        }
    }
}

pub(super) fn ctx(rid: ReqId, principal: String) -> Ctx {
    Ctx::request(rid.0, principal)
}

pub(super) const MAX_PAGE: usize = 1000;

pub(super) fn time_param(
    name: &str,
    v: Option<&str>,
) -> Result<Option<crate::clock::Timestamp>, ApiError> {
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

pub(super) fn approver_ctx(rid: ReqId, caller: &Caller) -> Ctx {
    ctx(rid, caller.principal())
}

/// A JSON body that may be absent (an approval needs no comment).
pub(super) fn optional_body<T: serde::de::DeserializeOwned + Default>(
    bytes: &[u8],
) -> Result<T, ApiError> {
    // no body, or JSON `null`, means no fields
    if bytes.iter().all(u8::is_ascii_whitespace) || bytes.trim_ascii() == b"null" {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("invalid_request", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn detached_work_finishes_after_its_request_is_dropped() {
        let (open, gate) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
        let ran_inline = Arc::new(AtomicBool::new(false));
        let r = ran_inline.clone();
        let request = detached(async move {
            r.store(true, Ordering::SeqCst);
            let _ = gate.await;
            let _ = done_tx.send(());
            Ok::<_, BrokerError>(())
        });
        // the request is polled once (the work starts in it), then dropped
        // as a client that went away drops it
        let mut request = Box::pin(request);
        assert!(futures_poll_once(request.as_mut()).await.is_pending());
        assert!(
            ran_inline.load(Ordering::SeqCst),
            "the work ran in the request"
        );
        drop(request);
        open.send(()).expect("the work still waits");
        tokio::time::timeout(std::time::Duration::from_secs(5), done)
            .await
            .expect("the dropped work finished on a task of its own")
            .expect("and got to its end");
    }

    #[tokio::test]
    async fn detached_work_answers_its_result_and_a_panic_is_a_500() {
        let ok = detached(async { Ok::<_, BrokerError>(7) }).await;
        assert_eq!(ok.ok(), Some(7));
        let refused =
            detached(async { Err::<(), _>(BrokerError::invalid("invalid_request", "no")) })
                .await
                .expect_err("an error stays an error");
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        let panicked = detached(async {
            if std::hint::black_box(true) {
                panic!("boom");
            }
            Ok::<(), BrokerError>(())
        })
        .await
        .expect_err("a panic is an error");
        assert_eq!(panicked.status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    /// Poll a future once and say what it answered.
    async fn futures_poll_once<F: Future + ?Sized>(
        mut f: std::pin::Pin<&mut F>,
    ) -> std::task::Poll<F::Output> {
        std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx))).await
    }
}
