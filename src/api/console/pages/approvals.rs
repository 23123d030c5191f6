//! Approvals (approvers decide; new ones arrive by server-sent events)
//! and break-glass reviews.

use super::*;

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
            crate::api::approvals::approve(
                State(st.clone()),
                user.caller.clone(),
                ReqId(None),
                Path(id.clone()),
                bytes,
            )
            .await
        }
        "deny" => {
            crate::api::approvals::deny(
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
    let body = crate::api::approvals::DecideBody {
        comment: given(&f.comment),
    };
    let done = crate::api::reviews::sign_off(
        State(st.clone()),
        user.caller.clone(),
        ReqId(None),
        Path(task.clone()),
        ApiJson(body),
    )
    .await;
    let (st, user) = (&st, &user);
    after(user, done, "/console/reviews", move |m| async move {
        reviews_page(st, user, Some((&task, &m)))
    })
    .await
}
