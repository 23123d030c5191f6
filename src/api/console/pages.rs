//! The console's pages. Each reads and changes through the JSON API's own
//! handlers with the signed-in operator as the caller, and renders their
//! views; a refused form is shown again with the API's message next to it.

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
        "htmx.min.js" => (include_bytes!("assets/htmx.min.js"), "text/javascript"),
        "console.js" => (include_bytes!("assets/console.js"), "text/javascript"),
        "console.css" => (include_bytes!("assets/console.css"), "text/css"),
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

// === approvals ===

/// One pending approval, with what it asks and the form to decide it.
fn approval_card(
    user: &Signed,
    a: &crate::domain::approval::ApprovalContext,
    now: i64,
    error: Option<&str>,
) -> Markup {
    let r = &a.approval;
    let id = crate::ids::ApprovalId(r.id).to_string();
    let task_id = crate::ids::TaskId(r.task_id).to_string();
    let own = user
        .operator
        .user
        .as_deref()
        .is_some_and(|u| u == r.on_behalf_of);
    let left_s = (r.expires_at - now) / 1000;
    html! {
        article.card.approval id=(format!("approval-{id}")) {
            h2 { (r.tool) " · " (r.action) " · " code { (r.target) } }
            dl {
                dt { "workload" } dd { (r.workload) }
                dt { "tenant" } dd { (r.tenant.as_deref().unwrap_or("—")) }
                dt { "acting for" } dd { (r.on_behalf_of) }
                @if let Some(t) = &a.task {
                    dt { "task" } dd { (t.purpose) " " span.muted { "(" (task_id) ")" } }
                    dt { "prompt sha256" } dd { code { (crate::hex::encode(&t.prompt_sha256)) } }
                }
                @if let Some(p) = &a.prompt {
                    dt { "prompt" } dd { pre.prompt { (p) } }
                }
                dt { "arguments sha256" } dd { code { (if r.arguments_sha256.is_empty() { "—" } else { r.arguments_sha256.as_str() }) } }
                @if let Some(c) = &r.credential {
                    dt { "credential" } dd { (c.provider) "/" (c.role) ", " (c.ttl_seconds) "s" @if !c.scope.is_empty() { ", scope " (c.scope.join(" ")) } }
                }
                dt { "asked by policy" } dd { (r.policies.join(", ")) }
                dt { "request sha256" } dd { code { (crate::hex::encode(&r.request_hash)) } }
                dt { "time left" } dd.left { (duration(left_s)) }
                dt { "approval" } dd { code { (id) } }
            }
            @if own {
                p.muted { "This is a request made for you: another approver must decide it." }
            } @else if user.has(&[Approver]) {
                form method="post" action=(format!("/console/approvals/{id}/approve")) {
                    (csrf(user))
                    label for=(format!("comment-{id}")) { "Comment (required to deny)" }
                    textarea id=(format!("comment-{id}")) name="comment" rows="2" maxlength="1024" {}
                    (form_error(error))
                    button.approve type="submit" { "Approve" }
                    button.deny type="submit" formaction=(format!("/console/approvals/{id}/deny")) { "Deny" }
                }
            }
        }
    }
}

/// The list of pending approvals (also the fragment htmx swaps in).
fn approvals_section(
    st: &AppState,
    user: &Signed,
    error: Option<(&str, &str)>,
) -> Result<Markup, ApiError> {
    let list = st.broker.pending_with_context(&user.caller)?;
    let now = now_ms(st);
    let seen = fingerprint(list.iter().map(|a| a.approval.id));
    Ok(html! {
        section id="approvals" data-fingerprint=(seen) hx-get="/console/approvals/list" hx-trigger="refresh" hx-swap="outerHTML" {
            // an error about an approval no longer pending has no card to stand by
            @if let Some((id, message)) = error.filter(|(id, _)| !list.iter().any(|a| crate::ids::ApprovalId(a.approval.id).to_string() == *id)) {
                p.error role="alert" { (id) ": " (message) }
            }
            p.muted { (list.len()) " pending, newest first. New requests appear here as they arrive." }
            @for a in list.iter().rev() {
                @let id = crate::ids::ApprovalId(a.approval.id).to_string();
                (approval_card(user, a, now, error.filter(|(i, _)| *i == id).map(|(_, m)| m)))
            }
        }
    })
}

pub async fn approvals(State(st): State<AppState>, user: Signed) -> Page {
    user.require(&[Approver, Admin], "Approvals")?;
    let section = approvals_section(&st, &user, None).map_err(shown(&user))?;
    Ok(respond(
        StatusCode::OK,
        page(
            Some(&user),
            "Approvals",
            html! {
                div id="live" data-events="/console/approvals/events" {}
                (section)
            },
        ),
    ))
}

pub async fn approvals_list(State(st): State<AppState>, user: Signed) -> Page {
    user.require(&[Approver, Admin], "Approvals")?;
    let section = approvals_section(&st, &user, None).map_err(shown(&user))?;
    Ok(respond(StatusCode::OK, section))
}

/// Which approvals are pending, in a few characters: what the page shows
/// and what the event stream announces, so the browser swaps the list in
/// only when it differs.
fn fingerprint(ids: impl Iterator<Item = u128>) -> String {
    let mut ids: Vec<u128> = ids.collect();
    ids.sort_unstable();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for id in ids {
        ctx.update(&id.to_be_bytes());
    }
    crate::hex::encode(&ctx.finish().as_ref()[..8])
}

/// Server-sent events: `changed`, with the pending set's fingerprint,
/// whenever the set of pending approvals changes (and once at the start).
/// The stream ends before the request timeout; the browser's EventSource
/// reconnects.
pub async fn approvals_events(State(st): State<AppState>, user: Signed) -> Page {
    user.require(&[Approver, Admin], "Approvals")?;
    let started = tokio::time::Instant::now();
    let stream = futures_util::stream::unfold(
        (st, user, None::<Vec<u128>>),
        move |(st, user, last)| async move {
            if started.elapsed() >= Duration::from_secs(20) {
                return None;
            }
            let mut last = last;
            loop {
                let now: Vec<u128> = st
                    .broker
                    .pending_approvals(&user.caller)
                    .map(|l| l.iter().map(|a| a.id).collect())
                    .unwrap_or_default();
                if last.as_ref() != Some(&now) {
                    let event = Event::default()
                        .event("changed")
                        .data(fingerprint(now.iter().copied()))
                        .retry(Duration::from_secs(1));
                    last = Some(now);
                    return Some((Ok::<_, std::convert::Infallible>(event), (st, user, last)));
                }
                if started.elapsed() >= Duration::from_secs(20) {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[derive(Debug, Deserialize)]
pub struct DecideForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    comment: Option<String>,
}

pub async fn decide(
    State(st): State<AppState>,
    user: Signed,
    Path((id, decision)): Path<(String, String)>,
    Form(f): Form<DecideForm>,
) -> Page {
    user.check_csrf(&f.csrf)?;
    user.require(&[Approver], "Deciding an approval")?;
    let body = match given(&f.comment) {
        Some(c) => json!({ "comment": c }),
        None => json!({}),
    };
    let bytes = Bytes::from(body.to_string());
    let result = match decision.as_str() {
        "approve" => {
            super::super::approvals::approve(
                State(st.clone()),
                user.caller.clone(),
                ReqId(None),
                Path(id.clone()),
                bytes,
            )
            .await
        }
        "deny" => {
            super::super::approvals::deny(
                State(st.clone()),
                user.caller.clone(),
                ReqId(None),
                Path(id.clone()),
                bytes,
            )
            .await
        }
        _ => {
            return Err(view::refused(
                &user,
                StatusCode::NOT_FOUND,
                "No such decision.",
            ));
        }
    };
    match result {
        Ok(_) => Ok(Redirect::to("/console/approvals").into_response()),
        Err(e) => {
            let section =
                approvals_section(&st, &user, Some((&id, &e.message))).map_err(shown(&user))?;
            Ok(respond(
                e.status,
                page(
                    Some(&user),
                    "Approvals",
                    html! {
                        div id="live" data-events="/console/approvals/events" {}
                        (section)
                    },
                ),
            ))
        }
    }
}

// === break-glass reviews ===

fn reviews_page(
    st: &AppState,
    user: &Signed,
    error: Option<(&str, &str)>,
) -> Result<Markup, ApiError> {
    let list = st.broker.pending_reviews(&user.caller)?;
    Ok(page(
        Some(user),
        "Break-glass reviews",
        html! {
            p.muted { "Tasks that used break-glass, each waiting for an approver's sign-off." }
            @if list.is_empty() { p { "Nothing to review." } }
            @for r in &list {
                @let task = crate::ids::TaskId(r.task_id).to_string();
                article.card.review {
                    h2 { "Task " code { (task) } }
                    dl {
                        dt { "workload" } dd { (r.workload) }
                        dt { "acting for" } dd { (r.on_behalf_of) }
                    }
                    table {
                        thead { tr { th { "tool" } th { "justification" } th { "at" } } }
                        tbody {
                            @for (_, tool, justification, at) in &r.calls {
                                tr { td { (tool) } td { (justification) } td { (crate::clock::rfc3339(crate::clock::Timestamp::from_unix_millis(*at))) } }
                            }
                        }
                    }
                    @if user.has(&[Responder, Admin]) { p { a href=(format!("/console/tasks/{task}")) { "What the task did" } } }
                    @if user.has(&[Approver]) {
                        form method="post" action=(format!("/console/reviews/{task}/sign-off")) {
                            (csrf(user))
                            label for=(format!("signoff-{task}")) { "Comment (required)" }
                            textarea id=(format!("signoff-{task}")) name="comment" rows="2" maxlength="1024" {}
                            (form_error(error.filter(|(t, _)| *t == task).map(|(_, m)| m)))
                            button type="submit" { "Sign off" }
                        }
                    }
                }
            }
        },
    ))
}

pub async fn reviews(State(st): State<AppState>, user: Signed) -> Page {
    user.require(&[Approver, Admin, Responder], "Break-glass reviews")?;
    let p = reviews_page(&st, &user, None).map_err(shown(&user))?;
    Ok(respond(StatusCode::OK, p))
}

pub async fn sign_off(
    State(st): State<AppState>,
    user: Signed,
    Path(task): Path<String>,
    Form(f): Form<DecideForm>,
) -> Page {
    user.check_csrf(&f.csrf)?;
    user.require(&[Approver], "Signing off")?;
    let body = super::super::approvals::DecideBody {
        comment: given(&f.comment),
    };
    match super::super::reviews::sign_off(
        State(st.clone()),
        user.caller.clone(),
        ReqId(None),
        Path(task.clone()),
        ApiJson(body),
    )
    .await
    {
        Ok(_) => Ok(Redirect::to("/console/reviews").into_response()),
        Err(e) => {
            let p = reviews_page(&st, &user, Some((&task, &e.message))).map_err(shown(&user))?;
            Ok(respond(e.status, p))
        }
    }
}

// === leases ===

#[derive(Debug, Default, Deserialize)]
pub struct LeaseFilter {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    workload: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    task: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
}

pub async fn leases(
    State(st): State<AppState>,
    user: Signed,
    Query(f): Query<LeaseFilter>,
) -> Page {
    user.require(&[Responder, Admin], "Leases")?;
    let mut q = given_fields(&[
        ("state", &f.state),
        ("workload", &f.workload),
        ("provider", &f.provider),
        ("role", &f.role),
        ("task", &f.task),
        ("cursor", &f.cursor),
    ]);
    q.insert("limit".into(), json!(500));
    let listed = match parse(Value::Object(q)) {
        Ok(params) => value(
            super::super::leases::list_leases(
                State(st.clone()),
                user.caller.clone(),
                ApiQuery(params),
            )
            .await,
        ),
        Err(e) => Err(e),
    };
    let (rows, next, error) = match listed {
        Ok(v) => (
            v["leases"].as_array().cloned().unwrap_or_default(),
            v["next_cursor"].as_str().map(str::to_owned),
            None,
        ),
        Err(e) => (vec![], None, Some(e.message)),
    };
    // tenant and user narrow the page the broker answered
    let keep =
        |l: &Value, key: &str, want: &Option<String>| given(want).is_none_or(|w| s(l, key) == w);
    let rows: Vec<&Value> = rows
        .iter()
        .filter(|l| keep(l, "tenant", &f.tenant) && keep(l, "on_behalf_of", &f.user))
        .collect();
    let field = |name: &str, label: &str, v: &Option<String>| {
        html! {
            label { (label) input name=(name) value=(v.clone().unwrap_or_default()); }
        }
    };
    let body = html! {
        form.filters method="get" action="/console/leases" {
            label { "state "
                select name="state" {
                    @for st_name in ["", "issuing", "active", "revoking", "irrevocable", "revoked", "expired", "abandoned", "failed"] {
                        option value=(st_name) selected[f.state.as_deref() == Some(st_name)] { (if st_name.is_empty() { "any" } else { st_name }) }
                    }
                }
            }
            (field("workload", "workload", &f.workload))
            (field("tenant", "tenant", &f.tenant))
            (field("user", "user", &f.user))
            (field("provider", "provider", &f.provider))
            (field("role", "role", &f.role))
            (field("task", "task", &f.task))
            button type="submit" { "Filter" }
        }
        (form_error(error.as_deref()))
        table.leases {
            thead { tr { th { "lease" } th { "state" } th { "workload" } th { "tenant" } th { "acting for" } th { "provider/role" } th { "expires" } } }
            tbody {
                @for l in &rows {
                    tr class=(if s(l, "state") == "irrevocable" { "irrevocable" } else { "" }) {
                        td { a href=(format!("/console/leases/{}", s(l, "lease_id"))) { code { (s(l, "lease_id")) } } }
                        td.state { (s(l, "state")) }
                        td { (s(l, "workload")) }
                        td { (s(l, "tenant")) }
                        td { (s(l, "on_behalf_of")) }
                        td { (s(l, "provider")) "/" (s(l, "role")) }
                        td { (s(l, "expires_at")) }
                    }
                }
            }
        }
        @if rows.is_empty() { p.muted { "No lease matches." } }
        @if let Some(c) = next {
            p { a href=(format!("/console/leases?{}", serde_urlencoded_pairs(&f, &c))) { "Next page" } }
        }
    };
    Ok(respond(StatusCode::OK, page(Some(&user), "Leases", body)))
}

/// The filter's query string with another cursor.
fn serde_urlencoded_pairs(f: &LeaseFilter, cursor: &str) -> String {
    let mut out = Vec::new();
    for (k, v) in [
        ("state", &f.state),
        ("workload", &f.workload),
        ("tenant", &f.tenant),
        ("user", &f.user),
        ("provider", &f.provider),
        ("role", &f.role),
        ("task", &f.task),
    ] {
        if let Some(v) = given(v) {
            out.push(format!("{k}={}", urlencode(&v)));
        }
    }
    out.push(format!("cursor={}", urlencode(cursor)));
    out.join("&")
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
        super::super::events::events(State(st.clone()), caller.clone(), ApiQuery(params)).await,
    )?;
    Ok(v["events"].as_array().cloned().unwrap_or_default())
}

async fn lease_page(
    st: &AppState,
    user: &Signed,
    id: &str,
    error: Option<&str>,
) -> Result<(StatusCode, Markup), ApiError> {
    let l = value(
        super::super::leases::get_lease(
            State(st.clone()),
            user.caller.clone(),
            Path(id.to_owned()),
        )
        .await,
    )?;
    let events = events_of(st, &user.caller, json!({ "lease": id, "limit": 500 }))
        .await
        .unwrap_or_default();
    let state = s(&l, "state");
    let body = html! {
        dl.card {
            dt { "state" } dd class=(format!("state {state}")) { (state) }
            dt { "workload" } dd { (s(&l, "workload")) }
            dt { "tenant" } dd { (s(&l, "tenant")) }
            dt { "acting for" } dd { (s(&l, "on_behalf_of")) }
            dt { "task" } dd { a href=(format!("/console/tasks/{}", s(&l, "task_id"))) { code { (s(&l, "task_id")) } } }
            dt { "provider/role" } dd { (s(&l, "provider")) "/" (s(&l, "role")) }
            dt { "scope" } dd { (l["scope"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ")).unwrap_or_default()) }
            dt { "issued" } dd { (s(&l, "issued_at")) }
            dt { "expires" } dd { (s(&l, "expires_at")) }
            dt { "what" } dd { (s(&l, "description")) }
            @if let Some(r) = l.get("revocation").filter(|r| !r.is_null()) {
                dt { "revocation" } dd { (s(r, "cause")) ", " (r["attempts"]) " attempts" @if !s(r, "last_error").is_empty() { ", last error: " (s(r, "last_error")) } }
            }
        }
        (form_error(error))
        @if matches!(state, "active" | "issuing" | "revoking" | "irrevocable") && user.has(&[Responder, Admin]) {
            form method="post" action=(format!("/console/leases/{id}/revoke")) {
                (csrf(user))
                button.deny type="submit" { "Revoke now" }
            }
        }
        @if state == "irrevocable" && user.has(&[Responder]) {
            form method="post" action=(format!("/console/leases/{id}/abandon")) {
                (csrf(user))
                label for="abandon-reason" { "Abandon it (the peer must be cleaned up by hand): reason" }
                input id="abandon-reason" name="reason" maxlength="1024";
                button type="submit" { "Abandon" }
            }
        }
        h2 { "Its story" }
        (story(&events))
    };
    Ok((
        StatusCode::OK,
        page(Some(user), &format!("Lease {id}"), body),
    ))
}

pub async fn lease(State(st): State<AppState>, user: Signed, Path(id): Path<String>) -> Page {
    user.require(&[Responder, Admin], "Leases")?;
    let (status, p) = lease_page(&st, &user, &id, None)
        .await
        .map_err(shown(&user))?;
    Ok(respond(status, p))
}

pub async fn revoke(
    State(st): State<AppState>,
    user: Signed,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Page {
    user.check_csrf(&f.csrf)?;
    user.require(&[Responder, Admin], "Revoking a lease")?;
    match super::super::leases::revoke_lease(
        State(st.clone()),
        user.caller.clone(),
        ReqId(None),
        Path(id.clone()),
    )
    .await
    {
        Ok(_) => Ok(Redirect::to(&format!("/console/leases/{id}")).into_response()),
        Err(e) => {
            let (_, p) = lease_page(&st, &user, &id, Some(&e.message))
                .await
                .map_err(shown(&user))?;
            Ok(respond(e.status, p))
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ReasonForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

pub async fn abandon(
    State(st): State<AppState>,
    user: Signed,
    Path(id): Path<String>,
    Form(f): Form<ReasonForm>,
) -> Page {
    user.check_csrf(&f.csrf)?;
    user.require(&[Responder], "Abandoning a lease")?;
    let body = match parse(json!({ "reason": f.reason })) {
        Ok(b) => b,
        Err(e) => return Err(view::refused(&user, e.status, &e.message)),
    };
    match super::super::incident::abandon_lease(
        State(st.clone()),
        user.caller.clone(),
        ReqId(None),
        Path(id.clone()),
        ApiJson(body),
    )
    .await
    {
        Ok(_) => Ok(Redirect::to(&format!("/console/leases/{id}")).into_response()),
        Err(e) => {
            let (_, p) = lease_page(&st, &user, &id, Some(&e.message))
                .await
                .map_err(shown(&user))?;
            Ok(respond(e.status, p))
        }
    }
}

// === incident response ===

/// The selector of a mass revocation, as the forms carry it.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct SelectorForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    workload: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    issued_after: Option<String>,
    #[serde(default)]
    issued_before: Option<String>,
    #[serde(default)]
    all: Option<String>,
    #[serde(default)]
    fence: Option<String>,
    #[serde(default)]
    reason: String,
    /// The reason typed again, to confirm.
    #[serde(default)]
    confirm: Option<String>,
}

impl SelectorForm {
    /// The selector's fields, as the form carries them.
    fn fields(&self) -> [(&'static str, &Option<String>); 7] {
        [
            ("workload", &self.workload),
            ("tenant", &self.tenant),
            ("user", &self.user),
            ("provider", &self.provider),
            ("role", &self.role),
            ("issued_after", &self.issued_after),
            ("issued_before", &self.issued_before),
        ]
    }

    fn body(&self, dry_run: bool) -> Value {
        let mut m = given_fields(&self.fields());
        m.insert("all".into(), Value::Bool(self.all.is_some()));
        m.insert("fence".into(), Value::Bool(self.fence.is_some()));
        m.insert(
            "reason".into(),
            Value::String(self.reason.trim().to_owned()),
        );
        m.insert("dry_run".into(), Value::Bool(dry_run));
        Value::Object(m)
    }

    fn hidden(&self) -> Markup {
        html! {
            @for (k, v) in given_fields(&self.fields()) {
                input type="hidden" name=(k) value=(v.as_str().unwrap_or(""));
            }
            @if self.all.is_some() { input type="hidden" name="all" value="on"; }
            input type="hidden" name="reason" value=(self.reason);
        }
    }
}

fn selector_fields(f: &SelectorForm) -> Markup {
    let field = |name: &str, label: &str, v: &Option<String>, hint: &str| {
        html! {
            label { (label) input name=(name) value=(v.clone().unwrap_or_default()) placeholder=(hint); }
        }
    };
    html! {
        (field("workload", "workload", &f.workload, "issuer:subject"))
        (field("tenant", "tenant", &f.tenant, ""))
        (field("user", "user", &f.user, "alice@example.com"))
        (field("provider", "provider", &f.provider, ""))
        (field("role", "role", &f.role, ""))
        (field("issued_after", "issued after", &f.issued_after, "RFC 3339"))
        (field("issued_before", "issued before", &f.issued_before, "RFC 3339"))
        label.check { input type="checkbox" name="all" checked[f.all.is_some()]; " every live lease" }
        label { "reason (recorded with the job)" input name="reason" value=(f.reason) maxlength="1024"; }
        label.check { input type="checkbox" name="fence" checked[f.fence.is_some()]; " fence the workload, tenant or user too (refuse new tasks, calls and leases)" }
    }
}

async fn incident_page(
    st: &AppState,
    user: &Signed,
    f: &SelectorForm,
    error: Option<&str>,
    fence_error: Option<&str>,
) -> Result<Markup, ApiError> {
    let fences =
        value(super::super::incident::list_fences(State(st.clone()), user.caller.clone()).await)?;
    let jobs = value(
        super::super::incident::list_revocations(State(st.clone()), user.caller.clone()).await,
    )?;
    Ok(page(
        Some(user),
        "Incident",
        html! {
            section.card {
                h2 { "Mass revocation" }
                form.selector method="post" action="/console/incident/dry-run" {
                    (csrf(user))
                    (selector_fields(f))
                    (form_error(error))
                    button type="submit" { "Dry run: what would it take?" }
                }
            }
            section.card {
                h2 { "Fences in force" }
                @let list = fences["fences"].as_array().cloned().unwrap_or_default();
                @if list.is_empty() { p.muted { "None." } }
                (form_error(fence_error))
                @for fence in &list {
                    form.fence method="post" action="/console/fences/lift" {
                        (csrf(user))
                        input type="hidden" name="kind" value=(s(fence, "kind"));
                        input type="hidden" name="value" value=(s(fence, "value"));
                        span { strong { (s(fence, "kind")) " " (s(fence, "value")) } " — " (s(fence, "reason")) " (" (s(fence, "created_by")) ", " (s(fence, "created_at")) ")" }
                        input name="reason" placeholder="why lift it" maxlength="1024";
                        button type="submit" { "Lift" }
                    }
                }
            }
            section.card {
                h2 { "Blast radius" }
                form method="get" action="/console/blast-radius" {
                    label { "workload" input name="workload" placeholder="issuer:subject"; }
                    label { "since" input name="since" placeholder="RFC 3339 (default: a day ago)"; }
                    label { "until" input name="until" placeholder="RFC 3339"; }
                    button type="submit" { "Show" }
                }
            }
            section.card {
                h2 { "Jobs" }
                @let list = jobs["jobs"].as_array().cloned().unwrap_or_default();
                @if list.is_empty() { p.muted { "None yet." } }
                ul { @for j in &list { li { a href=(format!("/console/jobs/{}", s(j, "job_id"))) { code { (s(j, "job_id")) } } " " (s(j, "state")) " — " (s(j, "reason")) } } }
            }
        },
    ))
}

pub async fn incident(State(st): State<AppState>, user: Signed) -> Page {
    user.require(&[Responder], "Incident response")?;
    let p = incident_page(&st, &user, &SelectorForm::default(), None, None)
        .await
        .map_err(shown(&user))?;
    Ok(respond(StatusCode::OK, p))
}

fn confirm_page(user: &Signed, f: &SelectorForm, dry: &Value, error: Option<&str>) -> Markup {
    page(
        Some(user),
        "Confirm the revocation",
        html! {
            section.card {
                h2 { (dry["matched"]) " leases would be revoked" }
                table {
                    thead { tr { th { "provider" } th { "leases" } th { "sample" } } }
                    tbody {
                        @if let Some(m) = dry["by_provider"].as_object() {
                            @for (p, n) in m {
                                tr { td { (p) } td.num { (n) } td { @for id in dry["sample"][p].as_array().cloned().unwrap_or_default() { code { (id.as_str().unwrap_or("")) } " " } } }
                            }
                        }
                    }
                }
                @for w in dry["warnings"].as_array().cloned().unwrap_or_default() { p.warning { (w.as_str().unwrap_or("")) } }
                p { "Reason: " strong { (f.reason) } }
                form method="post" action="/console/incident/start" {
                    (csrf(user))
                    (f.hidden())
                    label.check { input type="checkbox" name="fence" checked[f.fence.is_some()]; " fence as well" }
                    label { "Type the reason again to confirm" input name="confirm" autocomplete="off" maxlength="1024"; }
                    (form_error(error))
                    button.deny type="submit" { "Revoke them" }
                }
                p { a href="/console/incident" { "Back" } }
            }
        },
    )
}

async fn dry(st: &AppState, user: &Signed, f: &SelectorForm) -> Result<Value, ApiError> {
    let body = parse(f.body(true))?;
    let (_, v) = response_value(
        super::super::incident::start_revocation(
            State(st.clone()),
            user.caller.clone(),
            ReqId(None),
            ApiJson(body),
        )
        .await,
    )
    .await?;
    Ok(v)
}

pub async fn dry_run(
    State(st): State<AppState>,
    user: Signed,
    Form(f): Form<SelectorForm>,
) -> Page {
    user.check_csrf(&f.csrf)?;
    user.require(&[Responder], "Incident response")?;
    match dry(&st, &user, &f).await {
        Ok(v) => Ok(respond(StatusCode::OK, confirm_page(&user, &f, &v, None))),
        Err(e) => {
            let p = incident_page(&st, &user, &f, Some(&e.message), None)
                .await
                .map_err(shown(&user))?;
            Ok(respond(e.status, p))
        }
    }
}

pub async fn start_job(
    State(st): State<AppState>,
    user: Signed,
    Form(f): Form<SelectorForm>,
) -> Page {
    user.check_csrf(&f.csrf)?;
    user.require(&[Responder], "Incident response")?;
    let typed = f.confirm.as_deref().unwrap_or("").trim();
    if typed != f.reason.trim() {
        let v = dry(&st, &user, &f).await.map_err(shown(&user))?;
        return Ok(respond(
            StatusCode::BAD_REQUEST,
            confirm_page(
                &user,
                &f,
                &v,
                Some("Type the reason exactly as above to confirm; nothing was revoked."),
            ),
        ));
    }
    let body = match parse(f.body(false)) {
        Ok(b) => b,
        Err(e) => return Err(view::refused(&user, e.status, &e.message)),
    };
    match response_value(
        super::super::incident::start_revocation(
            State(st.clone()),
            user.caller.clone(),
            ReqId(None),
            ApiJson(body),
        )
        .await,
    )
    .await
    {
        Ok((_, job)) => {
            Ok(Redirect::to(&format!("/console/jobs/{}", s(&job, "job_id"))).into_response())
        }
        Err(e) => {
            let p = incident_page(&st, &user, &f, Some(&e.message), None)
                .await
                .map_err(shown(&user))?;
            Ok(respond(e.status, p))
        }
    }
}

/// A job's progress: per provider, the rate and the time left; polled by
/// htmx each second while it runs (a page refresh does the same without
/// JavaScript).
fn progress(job: &Value, now: i64) -> Markup {
    let running = s(job, "state") == "running";
    let id = s(job, "job_id");
    let elapsed = (now
        - crate::clock::parse_rfc3339(s(job, "created_at")).map_or(now, |t| t.unix_millis()))
    .max(1) as f64
        / 1000.0;
    let mut done = 0u64;
    let mut matched = 0u64;
    if let Some(m) = job["by_provider"].as_object() {
        for counts in m.values() {
            matched += counts["matched"].as_u64().unwrap_or(0);
            done += ["revoked", "expired", "abandoned"]
                .iter()
                .filter_map(|k| counts[*k].as_u64())
                .sum::<u64>();
        }
    }
    let rate = done as f64 / elapsed;
    let eta = if rate > 0.0 && matched > done {
        Some(((matched - done) as f64 / rate) as i64)
    } else {
        None
    };
    html! {
        section id="progress" class="card" hx-get=[running.then(|| format!("/console/jobs/{id}/progress"))] hx-trigger=[running.then_some("every 1s")] hx-swap="outerHTML" {
            p { "State: " strong.state { (s(job, "state")) } " · " (done) " of " (matched) " done · " (format!("{rate:.0}")) " leases/s"
                @if let Some(e) = eta { " · about " (duration(e.max(1))) " left" } }
            table {
                thead { tr { th { "provider" } th { "matched" } th { "revoked" } th { "revoking" } th { "retrying" } th { "irrevocable" } th { "expired" } } }
                tbody {
                    @if let Some(m) = job["by_provider"].as_object() {
                        @for (p, c) in m {
                            tr {
                                td { (p) }
                                @for k in ["matched", "revoked", "revoking", "retrying", "irrevocable", "expired"] { td.num { (c[k].as_u64().unwrap_or(0)) } }
                            }
                        }
                    }
                }
            }
            @let failed = job["failed"].as_array().cloned().unwrap_or_default();
            @if !failed.is_empty() {
                h2 { "Failing leases" }
                table {
                    thead { tr { th { "lease" } th { "provider" } th { "state" } th { "attempts" } th { "last error" } } }
                    tbody { @for f in &failed { tr {
                        td { a href=(format!("/console/leases/{}", s(f, "lease_id"))) { code { (s(f, "lease_id")) } } }
                        td { (s(f, "provider")) } td { (s(f, "state")) } td.num { (f["attempts"]) } td { (s(f, "last_error")) }
                    } } }
                }
            }
        }
    }
}

pub async fn job(State(st): State<AppState>, user: Signed, Path(id): Path<String>) -> Page {
    user.require(&[Responder, Admin], "Jobs")?;
    let job = value(
        super::super::incident::get_revocation(
            State(st.clone()),
            user.caller.clone(),
            Path(id.clone()),
        )
        .await,
    )
    .map_err(shown(&user))?;
    let sel = &job["selector"];
    let body = html! {
        dl.card {
            dt { "reason" } dd { (s(&job, "reason")) }
            dt { "by" } dd { (s(&job, "created_by")) ", " (s(&job, "created_at")) }
            dt { "fence" } dd { (if job["fence"].as_bool() == Some(true) { "yes" } else { "no" }) }
            dt { "selector" } dd { code { (sel.to_string()) } }
        }
        (progress(&job, now_ms(&st)))
        noscript { p.muted { "Reload to follow its progress (the page updates itself with JavaScript)." } }
    };
    Ok(respond(
        StatusCode::OK,
        page(Some(&user), &format!("Job {id}"), body),
    ))
}

pub async fn job_progress(
    State(st): State<AppState>,
    user: Signed,
    Path(id): Path<String>,
) -> Page {
    user.require(&[Responder, Admin], "Jobs")?;
    let job = value(
        super::super::incident::get_revocation(State(st.clone()), user.caller.clone(), Path(id))
            .await,
    )
    .map_err(shown(&user))?;
    Ok(respond(StatusCode::OK, progress(&job, now_ms(&st))))
}

#[derive(Debug, Deserialize)]
pub struct LiftForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    reason: String,
}

pub async fn lift_fence(State(st): State<AppState>, user: Signed, Form(f): Form<LiftForm>) -> Page {
    user.check_csrf(&f.csrf)?;
    user.require(&[Responder], "Lifting a fence")?;
    let result = match parse(json!({ "kind": f.kind, "value": f.value, "reason": f.reason })) {
        Ok(body) => value(
            super::super::incident::lift_fence(
                State(st.clone()),
                user.caller.clone(),
                ReqId(None),
                ApiJson(body),
            )
            .await,
        ),
        Err(e) => Err(e),
    };
    match result {
        Ok(_) => Ok(Redirect::to("/console/incident").into_response()),
        Err(e) => {
            let p = incident_page(&st, &user, &SelectorForm::default(), None, Some(&e.message))
                .await
                .map_err(shown(&user))?;
            Ok(respond(e.status, p))
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct BlastForm {
    #[serde(default)]
    workload: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
}

pub async fn blast_radius(
    State(st): State<AppState>,
    user: Signed,
    Query(f): Query<BlastForm>,
) -> Page {
    user.require(&[Responder, Admin], "The blast radius")?;
    let q = given_fields(&[
        ("workload", &f.workload),
        ("since", &f.since),
        ("until", &f.until),
    ]);
    let result = match parse(Value::Object(q)) {
        Ok(p) => value(
            super::super::incident::blast_radius(
                State(st.clone()),
                user.caller.clone(),
                ApiQuery(p),
            )
            .await,
        ),
        Err(e) => Err(e),
    };
    let body = match result {
        Err(e) => html! {
            (form_error(Some(&e.message)))
            p { a href="/console/incident" { "Back" } }
        },
        Ok(b) => html! {
            p { "Workload " strong { (s(&b, "workload")) } " since " (s(&b, "since"))
                @if b["fenced"].as_bool() == Some(true) { " · " strong.fenced { "fenced" } } }
            p { (b["totals"]["tasks"]) " tasks, " (b["totals"]["calls"]) " calls, " (b["totals"]["leases"]) " leases, "
                strong { (b["totals"]["live_leases"]) " still live" } }
            @for t in b["tasks"].as_array().cloned().unwrap_or_default() {
                article.card {
                    h2 { a href=(format!("/console/tasks/{}", s(&t, "task_id"))) { code { (s(&t, "task_id")) } } " " (s(&t, "purpose")) }
                    p.muted { "acting for " (s(&t, "on_behalf_of")) ", " (s(&t, "created_at")) ", " (s(&t, "state")) }
                    table {
                        thead { tr { th { "call" } th { "decision" } th { "policies" } } }
                        tbody { @for c in t["calls"].as_array().cloned().unwrap_or_default() { tr {
                            td { @if s(&c, "tool").is_empty() { span.muted { "(a lease request)" } } @else { (s(&c, "tool")) " " (s(&c, "action")) " " code { (s(&c, "resource")) } } }
                            td { (s(&c, "decision")) @if c["break_glass"].as_bool() == Some(true) { " (break-glass)" } }
                            td { (c["policies"].as_array().map(|p| p.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default()) }
                        } } }
                    }
                    table {
                        thead { tr { th { "lease" } th { "provider/role" } th { "state" } th { "expires" } } }
                        tbody { @for l in t["leases"].as_array().cloned().unwrap_or_default() {
                            tr class=(if l["live"].as_bool() == Some(true) { "live" } else { "" }) {
                                td { a href=(format!("/console/leases/{}", s(&l, "lease_id"))) { code { (s(&l, "lease_id")) } } }
                                td { (s(&l, "provider")) "/" (s(&l, "role")) }
                                td { (s(&l, "state")) @if l["live"].as_bool() == Some(true) { " · live" } }
                                td { (s(&l, "expires_at")) }
                            }
                        } }
                    }
                }
            }
        },
    };
    Ok(respond(
        StatusCode::OK,
        page(Some(&user), "Blast radius", body),
    ))
}

// === events ===

async fn events_page(
    st: &AppState,
    user: &Signed,
    report: Option<Value>,
) -> Result<Markup, ApiError> {
    let chain = value(super::super::events::chain(State(st.clone()), user.caller.clone()).await)?;
    let now = now_ms(st);
    let last = chain["checkpoints"]
        .as_array()
        .and_then(|c| c.last())
        .cloned();
    Ok(page(
        Some(user),
        "Events",
        html! {
            section.card {
                h2 { "The chain" }
                dl {
                    dt { "head" } dd { (chain["head_seq"]) " " code { (s(&chain, "head_hash")) } }
                    dt { "base" } dd { (chain["base_seq"]) }
                    @if let Some(c) = &last {
                        dt { "last checkpoint" } dd { (c["seq"]) " at " (s(c, "time")) " (" (duration(-left(now, s(c, "time")))) " ago)" }
                    } @else {
                        dt { "last checkpoint" } dd { "none yet" }
                    }
                }
                form method="post" action="/console/events/verify" {
                    (csrf(user))
                    button type="submit" { "Verify now" }
                }
                @if let Some(r) = &report {
                    @if r["ok"].as_bool() == Some(true) {
                        p.ok { "Verified: " (r["events"]) " events, " (r["checkpoints_verified"]) " checkpoints; the chain is intact." }
                    } @else {
                        p.error role="alert" { "Broken at event " (r["first_break"]["seq"]) ": " (s(&r["first_break"], "reason")) }
                    }
                }
            }
            section.card {
                h2 { "A task's story" }
                form method="get" action="/console/tasks" {
                    label { "task id" input name="id" placeholder="task_..."; }
                    button type="submit" { "Show" }
                }
            }
        },
    ))
}

pub async fn events(
    State(st): State<AppState>,
    user: Signed,
    Query(q): Query<BTreeMap<String, String>>,
) -> Page {
    user.require(&[Admin, Responder], "The event chain")?;
    if let Some(id) = q.get("task") {
        return Ok(Redirect::to(&format!("/console/tasks/{}", urlencode(id))).into_response());
    }
    let p = events_page(&st, &user, None).await.map_err(shown(&user))?;
    Ok(respond(StatusCode::OK, p))
}

pub async fn verify(State(st): State<AppState>, user: Signed, Form(f): Form<CsrfForm>) -> Page {
    user.check_csrf(&f.csrf)?;
    user.require(&[Admin, Responder], "Verifying the chain")?;
    let (_, report) = response_value(
        super::super::events::verify_events(State(st.clone()), user.caller.clone()).await,
    )
    .await
    .map_err(shown(&user))?;
    let p = events_page(&st, &user, Some(report))
        .await
        .map_err(shown(&user))?;
    Ok(respond(StatusCode::OK, p))
}

pub async fn task_story(State(st): State<AppState>, user: Signed, Path(id): Path<String>) -> Page {
    user.require(&[Admin, Responder], "A task's story")?;
    let events = events_of(&st, &user.caller, json!({ "task": id, "limit": 1000 }))
        .await
        .map_err(shown(&user))?;
    Ok(respond(
        StatusCode::OK,
        page(Some(&user), &format!("Task {id}"), story(&events)),
    ))
}

/// `/console/tasks?id=...` (the story form without JavaScript).
pub async fn task_lookup(Query(q): Query<BTreeMap<String, String>>) -> Response {
    match q.get("id").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        Some(id) => Redirect::to(&format!("/console/tasks/{}", urlencode(id))).into_response(),
        None => Redirect::to("/console/events").into_response(),
    }
}
