//! The event chain: its head and last checkpoint, verification on
//! demand, a task's story.

use super::*;

async fn events_page(
    st: &AppState,
    user: &Signed,
    report: Option<Value>,
) -> Result<Markup, ApiError> {
    let chain = value(crate::api::events::chain(State(st.clone()), user.caller.clone()).await)?;
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
        crate::api::events::verify_events(State(st.clone()), user.caller.clone()).await,
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
