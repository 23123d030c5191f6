//! The broker's decision for each request, and the leases the proxy holds:
//! one per task (by its proxy credential) and route while it lives, minted
//! one at a time, dropped when the broker says it ended or the task did.

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use serde_json::json;
use zeroize::Zeroizing;

use crate::broker::{Answer, Call, Refusal};
use crate::inject::{self, Grant};
use crate::route::Route;
use crate::serve::{Body, Proxy, Target, answer, hex, sha256};

/// A lease the proxy holds, with the forms of its credential to redact.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) grant: Grant,
    pub(crate) secrets: Arc<Vec<Zeroizing<Vec<u8>>>>,
}

/// (SHA-256 of the proxy credential, route index).
pub(crate) type Key = ([u8; 32], usize);

impl Proxy {
    /// The broker's decision for this request, and the lease to inject:
    /// one held for this task and route while it lives, else a new one.
    #[allow(clippy::result_large_err)] // the error is the answer, sent at once
    pub(crate) async fn decide(
        &self,
        route: &Arc<Route>,
        credential: &str,
        method: &str,
        target: &Target,
        approval: Option<&str>,
    ) -> Result<Arc<Held>, Response<Body>> {
        let key: Key = (sha256(credential.as_bytes()), route.index);
        let path = target.path();
        let action = route.render(&route.cfg.action, method, path);
        let resource = route.render(&route.cfg.resource, method, path);
        let arguments = hex(&sha256(
            format!("{method} {}", target.path_and_query).as_bytes(),
        ));
        let mut guard = None;
        for attempt in 0..2 {
            let live = self.live(&key);
            if live.is_none() && guard.is_none() {
                // one mint per task and route at a time; the rest reuse it
                let lock = self
                    .minting
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(key)
                    .or_default()
                    .clone();
                guard = Some(lock.lock_owned().await);
                if self.live(&key).is_some() {
                    continue;
                }
            }
            let call = Call {
                proxy_credential: credential,
                tool: &route.cfg.tool,
                action: action.clone(),
                resource: resource.clone(),
                arguments_sha256: arguments.clone(),
                credential: &route.cfg.credential,
                reuse_lease: live.as_ref().map(|h| h.grant.lease_id.as_str()),
                approval_id: approval,
            };
            let started = Instant::now();
            let answer_ = self.broker.call(&call).await;
            self.observe(
                "leasehold_proxy_broker_call_duration_seconds",
                &route.name,
                started.elapsed().as_secs_f64(),
            );
            match answer_ {
                Err(e) => {
                    self.count(&route.name, "broker_unavailable");
                    tracing::warn!(route = %route.name, error = %e, "broker call failed");
                    let mut r = answer(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "broker_unavailable",
                        "the broker could not decide this request; retry shortly",
                        json!({}),
                    );
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return Err(r);
                }
                Ok(Answer::Allowed {
                    grant: Some(g),
                    call_id,
                    ..
                }) => {
                    let secrets = inject::secrets(route, &g).map_err(|e| {
                        self.count(&route.name, "inject_failed");
                        answer(
                            StatusCode::BAD_GATEWAY,
                            "inject_failed",
                            &format!("route `{}`: {e}", route.name),
                            json!({}),
                        )
                    })?;
                    tracing::info!(route = %route.name, call_id = %call_id, lease_id = %g.lease_id, "allowed; new lease");
                    let held = Arc::new(Held {
                        grant: g,
                        secrets: Arc::new(secrets),
                    });
                    let mut map = self
                        .held
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if map.len() > 65_536 {
                        let now = crate::now_ms();
                        map.retain(|_, h| h.grant.expires_at_ms > now);
                    }
                    map.insert(key, held.clone());
                    return Ok(held);
                }
                Ok(Answer::Allowed {
                    grant: None,
                    call_id,
                    ..
                }) => match live {
                    Some(h) => {
                        tracing::debug!(route = %route.name, call_id = %call_id, lease_id = %h.grant.lease_id, "allowed; lease reused");
                        return Ok(h);
                    }
                    None => {
                        return Err(answer(
                            StatusCode::BAD_GATEWAY,
                            "no_lease",
                            "the broker allowed the call without a lease",
                            json!({}),
                        ));
                    }
                },
                Ok(Answer::Approval {
                    call_id,
                    approval_id,
                    expires_at,
                }) => {
                    self.count(&route.name, "approval_required");
                    let mut r = answer(
                        StatusCode::FORBIDDEN,
                        "approval_required",
                        &format!(
                            "a human approver must approve this request; once approved, send it again \
                             with the header `Leasehold-Approval: {approval_id}`"
                        ),
                        json!({"approval_id": approval_id, "call_id": call_id, "expires_at": expires_at}),
                    );
                    if let Ok(v) = HeaderValue::from_str(&approval_id) {
                        r.headers_mut().insert("leasehold-approval-id", v);
                    }
                    return Err(r);
                }
                Ok(Answer::Refused(r))
                    if attempt == 0
                        && live.is_some()
                        && matches!(r.code.as_str(), "lease_not_found" | "lease_state") =>
                {
                    // the lease ended under us (revoked, expired): mint again
                    self.forget(&key);
                    continue;
                }
                Ok(Answer::Refused(r)) => return Err(self.refused(route, &key, r)),
            }
        }
        Err(answer(
            StatusCode::BAD_GATEWAY,
            "no_lease",
            "no lease could be obtained",
            json!({}),
        ))
    }

    fn live(&self, key: &Key) -> Option<Arc<Held>> {
        let now = crate::now_ms();
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .filter(|h| h.grant.expires_at_ms - self.renew_margin_ms > now)
            .cloned()
    }

    fn forget(&self, key: &Key) {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    /// A refusal as the assistant reads it.
    fn refused(&self, route: &Route, key: &Key, r: Refusal) -> Response<Body> {
        let ended = matches!(
            r.code.as_str(),
            "task_completed" | "task_expired" | "task_not_found" | "proxy_credential_invalid"
        );
        if ended {
            // nothing of this credential is any use any more
            self.held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|k, _| k.0 != key.0);
            self.minting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|k, _| k.0 != key.0);
        }
        let (status, outcome) = match (r.status, r.code.as_str()) {
            (_, "proxy_credential_invalid") => {
                (StatusCode::PROXY_AUTHENTICATION_REQUIRED, "unauthenticated")
            }
            (_, "policy_denied") => (StatusCode::FORBIDDEN, "denied"),
            (429, _) => (StatusCode::TOO_MANY_REQUESTS, "refused"),
            (503, _) => (StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable"),
            (s, _) if s >= 500 => (StatusCode::BAD_GATEWAY, "broker_unavailable"),
            _ => (StatusCode::FORBIDDEN, "refused"),
        };
        self.count(&route.name, outcome);
        tracing::info!(route = %route.name, code = %r.code, "refused by the broker");
        let mut extra = json!({});
        if !r.reasons.is_empty() {
            extra["reasons"] = json!(r.reasons);
        }
        if let Some(c) = &r.call_id {
            extra["call_id"] = json!(c);
        }
        let mut resp = answer(status, &r.code, &r.message, extra);
        if let Some(ra) = r
            .retry_after
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, ra);
        }
        resp
    }
}
