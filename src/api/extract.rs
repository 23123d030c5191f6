//! The authenticated caller as an axum extractor: a handler that takes a
//! [`Caller`] or a [`WorkloadCaller`] cannot run unauthenticated. The
//! failed-authentication budget (per source address) and the per-workload
//! rate limit are applied here, around `auth`'s verification.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::{ApiError, AppState};
use crate::auth::{AuthError, Caller, Workload};

fn bearer_of(parts: &Parts) -> Result<&str, AuthError> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    Ok(token.trim())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        use super::limits::Key;
        let l = &state.limits;
        let c = &l.config;
        let ip = super::source_ip(&parts.extensions);
        let now = std::time::Instant::now();
        // an address that keeps failing is refused before its token is
        // even looked at; its failures never touch anyone else's budget
        if let Some(ip) = ip
            && let Err(wait) = l.buckets.peek(
                Key::AuthFailures(ip),
                c.auth_failures_per_second,
                c.auth_failures_burst,
                now,
            )
        {
            return Err(ApiError::too_many(
                "auth_rate_limited",
                "too many failed authentications from this address",
                wait,
            ));
        }
        let result = match bearer_of(parts) {
            Ok(token) => state.auth.authenticate(token).await,
            Err(e) => Err(e),
        };
        let caller = result.map_err(|e| {
            if let Some(ip) = ip {
                let _ = l.buckets.take(
                    Key::AuthFailures(ip),
                    c.auth_failures_per_second,
                    c.auth_failures_burst,
                    now,
                );
            }
            let rid = parts
                .headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            state.broker.auth_denied(e.to_string(), rid);
            ApiError::unauthenticated(e)
        })?;
        if let Caller::Workload(w) = &caller {
            tracing::Span::current().record("workload", w.id.as_str());
        }
        if let Caller::Workload(w) = &caller
            && let Err(wait) = l.buckets.take(
                Key::Workload(w.id.clone()),
                c.per_workload_per_second,
                c.per_workload_burst,
                now,
            )
        {
            return Err(ApiError::too_many(
                "rate_limited",
                "this workload is over its request rate",
                wait,
            ));
        }
        Ok(caller)
    }
}

/// A caller that must be a workload (task and lease requests).
#[derive(Debug, Clone)]
pub struct WorkloadCaller(pub Arc<Workload>);

impl FromRequestParts<AppState> for WorkloadCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match Caller::from_request_parts(parts, state).await? {
            Caller::Workload(w) => Ok(Self(w)),
            Caller::Operator(_) => Err(ApiError::forbidden(
                "workload_required",
                "this endpoint is for workloads; operators cannot open tasks or hold leases",
            )),
        }
    }
}
