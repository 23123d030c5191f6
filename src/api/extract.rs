//! The authenticated caller as an axum extractor: a handler that takes a
//! [`Caller`] or a [`WorkloadCaller`] cannot run unauthenticated. The
//! failed-authentication budget (per source address) and the per-workload
//! rate limit are applied here, around `auth`'s verification.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::{ApiError, AppState};
use crate::auth::{AuthError, Caller, Workload};
use crate::config::OperatorRole;

/// The bearer token of a request, if it has a well-formed one.
pub(crate) fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    bearer_of_headers(headers).ok()
}

fn bearer_of(parts: &Parts) -> Result<&str, AuthError> {
    bearer_of_headers(&parts.headers)
}

fn bearer_of_headers(headers: &axum::http::HeaderMap) -> Result<&str, AuthError> {
    let value = headers
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
        use super::limits::{Fairness, Key};
        let l = &state.limits;
        let c = &l.config;
        let ip = super::source_ip(&parts.extensions);
        let now = std::time::Instant::now();
        // An address that keeps failing is refused before its token is
        // looked at, unless the token can be told apart from a guess
        // cheaply: one verified recently (from anywhere), or a JWT (a guess
        // cannot carry a valid signature). So a flood of failures from a
        // shared address throttles the guesser, not the genuine callers
        // behind the same address.
        let token = bearer_of(parts);
        let hash = token.as_ref().ok().map(|t| Fairness::token_hash(t));
        let over_budget = ip.is_some_and(|ip| l.auth_failures_left(ip, now).is_err());
        let distinguishable = match (&token, &hash) {
            (Ok(t), Some(h)) => {
                l.fairness.is_known(h) || t.bytes().filter(|b| *b == b'.').count() == 2
            }
            _ => false,
        };
        let refuse_over_budget = || {
            let wait = ip
                .and_then(|ip| l.auth_failures_left(ip, now).err())
                .unwrap_or(std::time::Duration::from_secs(1));
            ApiError::too_many(
                "auth_rate_limited",
                "too many failed authentications from this address",
                wait,
            )
        };
        if over_budget && !distinguishable {
            return Err(refuse_over_budget());
        }
        let result = match (token, parts.extensions.get::<crate::listen::ClientChain>()) {
            (Ok(token), _) => state.auth.authenticate(token).await,
            // no bearer credential: the connection's client certificate
            (Err(AuthError::Missing), Some(chain)) => state.auth.authenticate_certificate(&chain.0),
            (Err(e), _) => Err(e),
        };
        let caller = match result {
            Ok(caller) => caller,
            Err(e) => {
                if let Some(ip) = ip {
                    l.auth_failed(ip, now);
                }
                // over budget, a failure is answered as one, and not recorded
                if over_budget {
                    return Err(refuse_over_budget());
                }
                let rid = parts
                    .headers
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                state.broker.auth_denied(e.detail(), rid);
                return Err(ApiError::unauthenticated(e));
            }
        };
        admitted(parts, &caller)?;
        if let Some(h) = hash {
            let key = match &caller {
                Caller::Workload(w) => format!("workload:{}", w.id),
                Caller::Operator(o) => format!("operator:{}", o.name),
            };
            l.fairness.learn(h, &key);
        }
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

/// Who a documented operation admits: the workload scheme, or operators
/// with one of these roles.
#[derive(Debug, Default)]
struct Admits {
    workload: bool,
    roles: Vec<OperatorRole>,
}

/// Each operation's callers, read from the OpenAPI document, which is built
/// from each handler's `security(...)`: one definition, shown in the
/// document and enforced here for every authenticated request (the domain
/// checks ownership and roles again).
fn admits() -> &'static std::collections::HashMap<(String, String), Admits> {
    static MAP: std::sync::OnceLock<std::collections::HashMap<(String, String), Admits>> =
        std::sync::OnceLock::new();
    MAP.get_or_init(|| {
        let doc = serde_json::to_value(super::openapi::document()).unwrap_or_default();
        let mut map = std::collections::HashMap::new();
        let paths = doc.get("paths").and_then(serde_json::Value::as_object);
        for (path, ops) in paths.into_iter().flatten() {
            for (method, op) in ops.as_object().into_iter().flatten() {
                let Some(reqs) = op.get("security").and_then(serde_json::Value::as_array) else {
                    continue;
                };
                let mut a = Admits::default();
                for r in reqs {
                    a.workload |= r.get("workload").is_some();
                    let roles = r.get("operator").and_then(serde_json::Value::as_array);
                    for role in roles
                        .into_iter()
                        .flatten()
                        .filter_map(serde_json::Value::as_str)
                    {
                        let known = [
                            OperatorRole::Admin,
                            OperatorRole::Approver,
                            OperatorRole::Responder,
                            OperatorRole::ResourceServer,
                            OperatorRole::Proxy,
                        ];
                        if let Some(r) = known.into_iter().find(|k| k.as_str() == role) {
                            a.roles.push(r);
                        }
                    }
                }
                map.insert((method.to_ascii_uppercase(), path.clone()), a);
            }
        }
        map
    })
}

/// Refuse a caller the route's documented security does not name.
fn admitted(parts: &Parts, caller: &Caller) -> Result<(), ApiError> {
    let Some(route) = parts.extensions.get::<axum::extract::MatchedPath>() else {
        return Ok(());
    };
    let key = (parts.method.as_str().to_owned(), route.as_str().to_owned());
    let Some(a) = admits().get(&key) else {
        return Ok(());
    };
    match caller {
        Caller::Workload(_) if a.workload => Ok(()),
        Caller::Operator(o) if a.roles.iter().any(|r| o.roles.contains(r)) => Ok(()),
        Caller::Operator(_) if a.roles.is_empty() => Err(ApiError::forbidden(
            "workload_required",
            "this endpoint is for workloads; operators cannot open tasks or hold leases",
        )),
        _ => Err(ApiError::forbidden(
            "forbidden",
            "the caller's role may not call this route",
        )),
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

/// The key a credential request proves, verified: a DPoP proof (header
/// `DPoP`, RFC 9449) for this exact request, or else the client
/// certificate of the connection (RFC 8705). `None`: a bearer request.
#[derive(Debug, Clone)]
pub struct ProvenKey(pub Option<leasehold_provider::KeyBinding>);

impl FromRequestParts<AppState> for ProvenKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        use base64::Engine as _;
        use leasehold_provider::KeyBinding;
        let mut proofs = parts.headers.get_all("dpop").iter();
        let invalid = |message: String| {
            ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "invalid_dpop_proof",
                message,
            )
        };
        if let Some(proof) = proofs.next() {
            if proofs.next().is_some() {
                return Err(invalid("send one `DPoP` header".into()));
            }
            let proof = proof
                .to_str()
                .map_err(|_| invalid("the `DPoP` header is not ASCII".into()))?;
            let url = request_url(parts, state)
                .ok_or_else(|| invalid("the request has no host to check `htu` against".into()))?;
            let target = crate::auth::ProofTarget {
                method: parts.method.as_str(),
                url: &url,
                access_token: bearer_token(&parts.headers),
            };
            return match state.auth.verify_dpop(proof, target) {
                Ok(jkt) => Ok(Self(Some(KeyBinding::Dpop { jkt }))),
                Err(crate::auth::DpopError::Busy) => Err(ApiError::new(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "dpop_busy",
                    crate::auth::DpopError::Busy.to_string(),
                )),
                Err(e) => Err(invalid(e.to_string())),
            };
        }
        Ok(Self(
            parts
                .extensions
                .get::<crate::listen::ClientChain>()
                .and_then(|c| {
                    let leaf = c.0.first()?;
                    let digest = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref());
                    Some(KeyBinding::Mtls {
                        x5t_s256: base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .encode(digest.as_ref()),
                    })
                }),
        ))
    }
}

/// The URL a request was sent to, as its client addressed the broker
/// (`server.public_url`, or this listener's scheme and the `Host`), without
/// the query.
fn request_url(parts: &Parts, state: &AppState) -> Option<String> {
    let path = parts.uri.path();
    if let Some(base) = &state.public_url {
        return Some(format!("{base}{path}"));
    }
    let host = parts
        .headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(ToString::to_string))?;
    let scheme = if state.tls { "https" } else { "http" };
    Some(format!("{scheme}://{host}{path}"))
}
