//! `/console`: the web console for approvers and incident responders,
//! server-rendered (maud) on the broker's own listener, shipped inside the
//! binary with a vendored, pinned htmx (2.0.11) and one small script of our
//! own; every read-only page works with JavaScript off.
//!
//! Sign-in exchanges an operator token for a session: a random id in a
//! cookie (`HttpOnly`, `SameSite=Strict`, `Path=/console`, `Secure` under
//! TLS), held server-side in memory with its operator, its CSRF token, an
//! idle and an absolute deadline; sign-out forgets it, and a restart
//! forgets them all. Every state change is a POST carrying the session's
//! CSRF token; every page carries a strict Content-Security-Policy (no
//! inline script or style), `X-Frame-Options: DENY` and `no-store`.
//!
//! What a page shows and does goes through the same handlers as the JSON
//! API (`super::approvals`, `super::incident`, ...), with the signed-in
//! operator as the caller: the same role checks, the same validation, the
//! same error messages (shown next to the form that caused them).

// A refusal is a whole page, returned at once from a handler that renders
// pages anyway (`Result<Response, Response>`): its size is not a cost here.
#![allow(clippy::result_large_err)]

mod pages;
mod view;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};

use super::AppState;
use crate::auth::{Caller, Operator};
use crate::config::OperatorRole;

/// The console's session cookie.
const COOKIE: &str = "lh_console";
/// The double-submit cookie of the sign-in form (before there is a session).
const LOGIN_COOKIE: &str = "lh_console_login";
/// A session ends this long after sign-in, whatever happens...
const ABSOLUTE: Duration = Duration::from_secs(8 * 3600);
/// ...or after this long without a request.
const IDLE: Duration = Duration::from_secs(30 * 60);
/// Sessions held at most; the oldest go first.
const MAX_SESSIONS: usize = 10_000;

#[derive(Debug)]
struct Session {
    operator: Arc<Operator>,
    csrf: String,
    started: Instant,
    seen: Instant,
}

/// The console's sessions, by the SHA-256 of their id (the id itself is
/// only in the browser's cookie).
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Session>>,
}

/// 256 random bits, URL-safe; `None` if the system RNG fails.
fn random_token() -> Option<String> {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut b).ok()?;
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

fn digest(id: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Sessions {
    /// A new session for `operator`; its id (for the cookie).
    fn start(&self, operator: Arc<Operator>) -> Option<String> {
        let id = random_token()?;
        let csrf = random_token()?;
        let now = Instant::now();
        if let Ok(mut m) = self.map.lock() {
            m.retain(|_, s| !expired(s, now));
            if m.len() >= MAX_SESSIONS
                && let Some(oldest) = m.iter().min_by_key(|(_, s)| s.started).map(|(k, _)| *k)
            {
                m.remove(&oldest);
            }
            m.insert(
                digest(&id),
                Session {
                    operator,
                    csrf,
                    started: now,
                    seen: now,
                },
            );
        }
        Some(id)
    }

    /// The live session with this id, touched.
    fn find(&self, id: &str) -> Option<(Arc<Operator>, String)> {
        let now = Instant::now();
        let mut m = self.map.lock().ok()?;
        let key = digest(id);
        let s = m.get_mut(&key)?;
        if expired(s, now) {
            m.remove(&key);
            return None;
        }
        s.seen = now;
        Some((s.operator.clone(), s.csrf.clone()))
    }

    fn end(&self, id: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(&digest(id));
        }
    }
}

fn expired(s: &Session, now: Instant) -> bool {
    now.duration_since(s.started) >= ABSOLUTE || now.duration_since(s.seen) >= IDLE
}

fn cookie_of<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn set_cookie(name: &str, value: &str, max_age: Duration, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        max_age.as_secs()
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The signed-in operator of a console request. A request without a live
/// session is sent to the sign-in page (nothing it asked is done).
#[derive(Debug, Clone)]
pub struct Signed {
    pub operator: Arc<Operator>,
    pub csrf: String,
    pub caller: Caller,
}

impl Signed {
    pub fn has(&self, roles: &[OperatorRole]) -> bool {
        roles.iter().any(|r| self.operator.roles.contains(r))
    }

    /// `Ok` if the operator has one of `roles`, else the 403 page.
    pub fn require(&self, roles: &[OperatorRole], what: &str) -> Result<(), Response> {
        if self.has(roles) {
            return Ok(());
        }
        let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        Err(view::refused(
            self,
            StatusCode::FORBIDDEN,
            &format!("{what} needs the {} role.", names.join(" or ")),
        ))
    }

    /// `Ok` if the form's CSRF token is this session's.
    pub fn check_csrf(&self, sent: &str) -> Result<(), Response> {
        if same(sent, &self.csrf) {
            Ok(())
        } else {
            Err(view::refused(
                self,
                StatusCode::FORBIDDEN,
                "The form's CSRF token is missing or wrong, so nothing was changed. Reload the page and try again.",
            ))
        }
    }
}

impl FromRequestParts<AppState> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let found = cookie_of(&parts.headers, COOKIE).and_then(|id| state.console.find(id));
        match found {
            Some((operator, csrf)) => Ok(Self {
                caller: Caller::Operator(operator.clone()),
                operator,
                csrf,
            }),
            None => Err(Redirect::to("/console/login").into_response()),
        }
    }
}

/// Every console answer: a strict CSP, no framing, no sniffing, no caching,
/// no referrer.
async fn security_headers(req: axum::extract::Request, next: middleware::Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The console's routes, for the API router to merge.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(pages::home))
        .route("/console/", get(pages::home))
        .route("/console/login", get(pages::login_form).post(pages::login))
        .route("/console/logout", post(pages::logout))
        .route("/console/assets/{name}", get(pages::asset))
        .route("/console/approvals", get(pages::approvals))
        .route("/console/approvals/list", get(pages::approvals_list))
        .route("/console/approvals/events", get(pages::approvals_events))
        .route("/console/approvals/{id}/{decision}", post(pages::decide))
        .route("/console/reviews", get(pages::reviews))
        .route("/console/reviews/{task}/sign-off", post(pages::sign_off))
        .route("/console/leases", get(pages::leases))
        .route("/console/leases/{id}", get(pages::lease))
        .route("/console/leases/{id}/revoke", post(pages::revoke))
        .route("/console/leases/{id}/abandon", post(pages::abandon))
        .route("/console/incident", get(pages::incident))
        .route("/console/incident/dry-run", post(pages::dry_run))
        .route("/console/incident/start", post(pages::start_job))
        .route("/console/jobs/{id}", get(pages::job))
        .route("/console/jobs/{id}/progress", get(pages::job_progress))
        .route("/console/fences/lift", post(pages::lift_fence))
        .route("/console/blast-radius", get(pages::blast_radius))
        .route("/console/events", get(pages::events))
        .route("/console/events/verify", post(pages::verify))
        .route("/console/tasks", get(pages::task_lookup))
        .route("/console/tasks/{id}", get(pages::task_story))
        .layer(middleware::from_fn(security_headers))
}

/// Set the session cookie (sign-in) or clear it (sign-out).
fn with_cookie(mut resp: Response, value: HeaderValue) -> Response {
    resp.headers_mut().append(header::SET_COOKIE, value);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op() -> Arc<Operator> {
        Arc::new(Operator {
            name: "a".into(),
            roles: [OperatorRole::Approver].into_iter().collect(),
            user: None,
        })
    }

    #[test]
    fn sessions_start_find_and_end() {
        let s = Sessions::default();
        let id = s.start(op()).unwrap();
        let (o, csrf) = s.find(&id).unwrap();
        assert_eq!(o.name, "a");
        assert_eq!(csrf.len(), 43);
        assert!(s.find("forged").is_none());
        s.end(&id);
        assert!(s.find(&id).is_none(), "a session is gone after sign-out");
    }

    #[test]
    fn cookies_are_read_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("x=1; lh_console=abc; y=2"),
        );
        assert_eq!(cookie_of(&h, COOKIE), Some("abc"));
        assert_eq!(cookie_of(&h, "z"), None);
        let c = set_cookie(COOKIE, "v", ABSOLUTE, true);
        let c = c.to_str().unwrap();
        for part in [
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Path=/console",
            "Max-Age=28800",
        ] {
            assert!(c.contains(part), "{c}");
        }
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
