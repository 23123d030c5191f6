//! Leases: the filtered list, one lease's story, revoke and abandon.

use super::*;

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
            crate::api::leases::list_leases(
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

async fn lease_page(
    st: &AppState,
    user: &Signed,
    id: &str,
    error: Option<&str>,
) -> Result<Markup, ApiError> {
    let l = value(
        crate::api::leases::get_lease(State(st.clone()), user.caller.clone(), Path(id.to_owned()))
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
    Ok(page(Some(user), &format!("Lease {id}"), body))
}

pub async fn lease(State(st): State<AppState>, user: Signed, Path(id): Path<String>) -> Page {
    user.require(&[Responder, Admin], "Leases")?;
    let p = lease_page(&st, &user, &id, None)
        .await
        .map_err(shown(&user))?;
    Ok(respond(StatusCode::OK, p))
}

pub async fn revoke(
    State(st): State<AppState>,
    user: Signed,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Page {
    user.check_csrf(&f.csrf)?;
    user.require(&[Responder, Admin], "Revoking a lease")?;
    let done = crate::api::leases::revoke_lease(
        State(st.clone()),
        user.caller.clone(),
        ReqId(None),
        Path(id.clone()),
    )
    .await;
    let to = format!("/console/leases/{id}");
    let (st, user) = (&st, &user);
    after(user, done, &to, move |m| async move {
        lease_page(st, user, &id, Some(&m)).await
    })
    .await
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
    let done = crate::api::incident::abandon_lease(
        State(st.clone()),
        user.caller.clone(),
        ReqId(None),
        Path(id.clone()),
        ApiJson(body),
    )
    .await;
    let to = format!("/console/leases/{id}");
    let (st, user) = (&st, &user);
    after(user, done, &to, move |m| async move {
        lease_page(st, user, &id, Some(&m)).await
    })
    .await
}
