//! The console's layout and the pieces every page shares. maud escapes
//! every value it interpolates: nothing stored (a purpose, a comment, a
//! reason, a resource) is ever markup.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use super::Signed;
use crate::config::OperatorRole;

/// A whole page.
pub fn page(user: Option<&Signed>, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                // htmx may not inject styles or evaluate strings (the CSP forbids both)
                meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"allowEval":false,"allowScriptTags":false,"selfRequestsOnly":true}"#;
                title { (title) " · leasehold" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/htmx.min.js" defer {}
                script src="/console/assets/console.js" defer {}
            }
            body {
                header {
                    a.brand href="/console/" { "leasehold" }
                    @if let Some(u) = user {
                        nav { (nav(u)) }
                        form.signout method="post" action="/console/logout" {
                            input type="hidden" name="csrf" value=(u.csrf);
                            span.who { (u.operator.name) " (" (roles(u)) ")" }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

fn roles(u: &Signed) -> String {
    u.operator
        .roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Only the pages the signed-in roles may use.
fn nav(u: &Signed) -> Markup {
    use OperatorRole::{Admin, Approver, Responder};
    html! {
        @if u.has(&[Approver, Admin]) { a href="/console/approvals" { "Approvals" } }
        @if u.has(&[Approver, Admin, Responder]) { a href="/console/reviews" { "Break-glass reviews" } }
        @if u.has(&[Responder, Admin]) { a href="/console/leases" { "Leases" } }
        @if u.has(&[Responder]) { a href="/console/incident" { "Incident" } }
        @if u.has(&[Responder, Admin]) { a href="/console/events" { "Events" } }
    }
}

/// An HTML answer.
pub fn respond(status: StatusCode, markup: Markup) -> Response {
    (status, Html(markup.into_string())).into_response()
}

/// A refusal as a page (the role is missing, a form was forged, ...).
pub fn refused(user: &Signed, status: StatusCode, message: &str) -> Response {
    respond(
        status,
        page(
            Some(user),
            "Not allowed",
            html! { p.error role="alert" { (message) } },
        ),
    )
}

/// The API's error for a form, shown next to it.
pub fn form_error(message: Option<&str>) -> Markup {
    html! {
        @if let Some(m) = message { p.error role="alert" { (m) } }
    }
}

/// The hidden CSRF field of every form.
pub fn csrf(u: &Signed) -> Markup {
    html! { input type="hidden" name="csrf" value=(u.csrf); }
}

/// A string field of a JSON view.
pub fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Seconds as "3m 20s".
pub fn duration(seconds: i64) -> String {
    if seconds <= 0 {
        return "expired".into();
    }
    let (h, m, s) = (seconds / 3600, (seconds % 3600) / 60, seconds % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m {s}s"),
        _ => format!("{h}h {m}m"),
    }
}

/// Seconds from `now_ms` until an RFC 3339 time.
pub fn left(now_ms: i64, rfc3339: &str) -> i64 {
    crate::clock::parse_rfc3339(rfc3339).map_or(0, |t| (t.unix_millis() - now_ms) / 1000)
}

/// One event of the chain as a row of a story.
pub fn event_row(e: &Value) -> Markup {
    let data = e.get("data").cloned().unwrap_or(Value::Null);
    html! {
        tr {
            td.num { (e.get("seq").and_then(Value::as_u64).unwrap_or(0)) }
            td { (s(e, "time")) }
            td.kind { (s(e, "kind")) }
            td { code.data { (data_line(&data)) } }
        }
    }
}

/// An event's data as `key=value` pairs, in order.
fn data_line(data: &Value) -> String {
    match data {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join("  "),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A story: events in chain order.
pub fn story(events: &[Value]) -> Markup {
    html! {
        @if events.is_empty() {
            p.muted { "No events." }
        } @else {
            table.events {
                thead { tr { th { "seq" } th { "time" } th { "kind" } th { "what" } } }
                tbody { @for e in events { (event_row(e)) } }
            }
        }
    }
}
