//! Incident response: the mass revocation (selector, dry run, typed
//! confirmation), its job's progress, fences and the blast radius.

use super::*;

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
        value(crate::api::incident::list_fences(State(st.clone()), user.caller.clone()).await)?;
    let jobs = value(
        crate::api::incident::list_revocations(State(st.clone()), user.caller.clone()).await,
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
        crate::api::incident::start_revocation(
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
        crate::api::incident::start_revocation(
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
        crate::api::incident::get_revocation(
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
        crate::api::incident::get_revocation(State(st.clone()), user.caller.clone(), Path(id))
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
            crate::api::incident::lift_fence(
                State(st.clone()),
                user.caller.clone(),
                ReqId(None),
                ApiJson(body),
            )
            .await,
        ),
        Err(e) => Err(e),
    };
    let (st, user) = (&st, &user);
    after(user, result, "/console/incident", move |m| async move {
        incident_page(st, user, &SelectorForm::default(), None, Some(&m)).await
    })
    .await
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
            crate::api::incident::blast_radius(State(st.clone()), user.caller.clone(), ApiQuery(p))
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
