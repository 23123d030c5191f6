//! The console's pages. Each reads and changes through the JSON API's own
//! handlers with the signed-in operator as the caller, and renders their
//! views; a refused form is shown again with the API's message next to it.
//! This file holds sign-in and what every page shares; the pages are in
//! `approvals` (with break-glass reviews), `leases`, `incident` (jobs,
//! fences, the blast radius) and `events`.

mod approvals;
mod events;
mod incident;
mod leases;

pub use approvals::*;
pub use events::*;
pub use incident::*;
pub use leases::*;

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Form;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::view::{self, csrf, duration, form_error, left, page, respond, s, story};
use super::{COOKIE, LOGIN_COOKIE, Signed, cookie_of, random_token, same, set_cookie, with_cookie};
use crate::api::wire::{ApiJson, ApiQuery, ReqId};
use crate::api::{ApiError, AppState};
use crate::auth::Caller;
use crate::config::OperatorRole::{Admin, Approver, Responder};

type Page = Result<Response, Response>;

/// A JSON view of an API answer.
fn value<T: Serialize>(r: Result<Json<T>, ApiError>) -> Result<Value, ApiError> {
    r.map(|Json(t)| serde_json::to_value(t).unwrap_or(Value::Null))
}

/// An API answer that is a whole response: its status and JSON body.
async fn response_value(r: Result<Response, ApiError>) -> Result<(StatusCode, Value), ApiError> {
    let resp = r?;
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 16 * 1024 * 1024)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

/// An API request type from the console's fields.
fn parse<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::bad_request("invalid_request", e.to_string()))
}

/// An API error that ends a page: the refusal page with its message.
fn shown(user: &Signed) -> impl Fn(ApiError) -> Response + '_ {
    move |e| view::refused(user, e.status, &e.message)
}

/// After a form the API answered: to `to` when it was done; otherwise the
/// form's page again, rendered by `again` with the API's message beside
/// the form, under the API's status.
async fn after<T, F>(
    user: &Signed,
    done: Result<T, ApiError>,
    to: &str,
    again: impl FnOnce(String) -> F,
) -> Page
where
    F: std::future::Future<Output = Result<Markup, ApiError>>,
{
    match done {
        Ok(_) => Ok(Redirect::to(to).into_response()),
        Err(e) => {
            let page = again(e.message).await.map_err(shown(user))?;
            Ok(respond(e.status, page))
        }
    }
}

/// The non-blank fields, as a JSON object.
fn given_fields(pairs: &[(&str, &Option<String>)]) -> serde_json::Map<String, Value> {
    pairs
        .iter()
        .filter_map(|(k, v)| given(v).map(|v| ((*k).to_owned(), Value::String(v))))
        .collect()
}

/// `Some(text)` for a non-blank field.
fn given(v: &Option<String>) -> Option<String> {
    v.as_ref()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn now_ms(st: &AppState) -> i64 {
    st.broker.now_ms()
}

// === sign-in ===

pub async fn home(user: Signed) -> Response {
    let to = if user.has(&[Approver]) {
        "/console/approvals"
    } else if user.has(&[Responder]) {
        "/console/incident"
    } else if user.has(&[Admin]) {
        "/console/leases"
    } else {
        "/console/reviews"
    };
    Redirect::to(to).into_response()
}

/// When the system RNG fails, there is no safe way to go on.
fn no_randomness() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "the system random number generator failed",
    )
        .into_response()
}

fn login_page(status: StatusCode, error: Option<&str>, secure: bool) -> Response {
    let Some(token) = random_token() else {
        return no_randomness();
    };
    let body = html! {
        form.card method="post" action="/console/login" {
            input type="hidden" name="csrf" value=(token);
            label for="token" { "Operator token" }
            input id="token" type="password" name="token" autocomplete="off" required;
            (form_error(error))
            button type="submit" { "Sign in" }
        }
        p.muted { "Sign in with your operator token (admin, approver or responder). The session lasts at most 8 hours, 30 minutes idle." }
    };
    with_cookie(
        respond(status, page(None, "Sign in", body)),
        set_cookie(LOGIN_COOKIE, &token, Duration::from_secs(600), secure),
    )
}

pub async fn login_form(State(st): State<AppState>) -> Response {
    login_page(StatusCode::OK, None, st.tls)
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    token: String,
}

pub async fn login(
    State(st): State<AppState>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let expected = cookie_of(&headers, LOGIN_COOKIE).unwrap_or("");
    if expected.is_empty() || !same(&f.csrf, expected) {
        return login_page(
            StatusCode::FORBIDDEN,
            Some("The sign-in form expired or was not ours; try again."),
            st.tls,
        );
    }
    // the API's failed-authentication budget per address holds here too
    let ip = crate::api::source_ip(&ext);
    let now = std::time::Instant::now();
    if let Some(ip) = ip
        && st.limits.auth_failures_left(ip, now).is_err()
    {
        return login_page(
            StatusCode::TOO_MANY_REQUESTS,
            Some("Too many failed sign-ins from this address; wait a moment."),
            st.tls,
        );
    }
    let token = f.token.trim();
    match st.auth.authenticate(token).await {
        Ok(Caller::Operator(op)) => {
            let Some(id) = st.console.start(op.clone()) else {
                return no_randomness();
            };
            tracing::info!(operator = %op.name, "console sign-in");
            let resp = Redirect::to("/console/").into_response();
            let resp = with_cookie(resp, set_cookie(COOKIE, &id, super::ABSOLUTE, st.tls));
            with_cookie(resp, set_cookie(LOGIN_COOKIE, "", Duration::ZERO, st.tls))
        }
        Ok(Caller::Workload(_)) => login_page(
            StatusCode::FORBIDDEN,
            Some("That is a workload's token; the console is for operators."),
            st.tls,
        ),
        Err(e) => {
            if let Some(ip) = ip {
                st.limits.auth_failed(ip, now);
            }
            st.broker
                .auth_denied(format!("console sign-in: {}", e.detail()), None);
            login_page(
                StatusCode::UNAUTHORIZED,
                Some("The token was not accepted."),
                st.tls,
            )
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

pub async fn logout(
    State(st): State<AppState>,
    user: Signed,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Page {
    user.check_csrf(&f.csrf)?;
    if let Some(id) = cookie_of(&headers, COOKIE) {
        st.console.end(id);
    }
    tracing::info!(operator = %user.operator.name, "console sign-out");
    Ok(with_cookie(
        Redirect::to("/console/login").into_response(),
        set_cookie(COOKIE, "", Duration::ZERO, st.tls),
    ))
}

pub async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind): (&'static [u8], &str) = match name.as_str() {
        // htmx 2.0.11 from npm (htmx.org), unmodified; sha256 in assets/README
        "htmx.min.js" => (include_bytes!("../assets/htmx.min.js"), "text/javascript"),
        "console.js" => (include_bytes!("../assets/console.js"), "text/javascript"),
        "console.css" => (include_bytes!("../assets/console.css"), "text/css"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_str(kind).unwrap_or(HeaderValue::from_static("text/plain")),
        )],
        body,
    )
        .into_response()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn events_of(st: &AppState, caller: &Caller, filter: Value) -> Result<Vec<Value>, ApiError> {
    let params = parse(filter)?;
    let v = value(
        crate::api::events::events(State(st.clone()), caller.clone(), ApiQuery(params)).await,
    )?;
    Ok(v["events"].as_array().cloned().unwrap_or_default())
}
