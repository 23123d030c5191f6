//! The responder's verbs: `revoke` (start a mass revocation and follow it
//! with a progress line), `revoke status`, `fence list|lift`, `blast-radius`.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use super::client::{Client, ClientError, api_error, seg, urlencode};
use super::{Connection, FenceCommand, ProvidersCommand, RevokeCommand, RevokeSelector};

/// Start a job (or a dry run) from the selector flags, or run a subcommand.
pub async fn revoke(
    conn: &Connection,
    command: Option<RevokeCommand>,
    sel: RevokeSelector,
) -> Result<Value, ClientError> {
    let c = Client::new(conn)?;
    match command {
        Some(RevokeCommand::List) => return c.call(Method::GET, "/v1/revocations", None).await,
        Some(RevokeCommand::Status {
            job_id,
            follow: false,
        }) => {
            return finished(
                c.call(
                    Method::GET,
                    &format!("/v1/revocations/{}", seg(&job_id)),
                    None,
                )
                .await?,
            );
        }
        Some(RevokeCommand::Status {
            job_id,
            follow: true,
        }) => return follow(&c, &job_id).await,
        None => {}
    }
    let Some(reason) = sel.reason.clone() else {
        return Err(ClientError::Usage(
            "--reason is required: say why (it is recorded in the event chain)".into(),
        ));
    };
    let mut body = json!({
        "states": sel.states,
        "all": sel.all,
        "reason": reason,
        "fence": sel.fence,
        "dry_run": sel.dry_run,
    });
    for (k, v) in [
        ("workload", &sel.workload),
        ("tenant", &sel.tenant),
        ("task", &sel.task),
        ("user", &sel.user),
        ("provider", &sel.provider),
        ("role", &sel.role),
        ("issued_after", &sel.issued_after),
        ("issued_before", &sel.issued_before),
    ] {
        if let Some(v) = v {
            body[k] = Value::from(v.clone());
        }
    }
    let (status, answer) = c
        .call_raw(Method::POST, "/v1/revocations", Some(body))
        .await?;
    for w in answer["warnings"].as_array().into_iter().flatten() {
        eprintln!("warning: {}", w.as_str().unwrap_or_default());
    }
    let job_id = match status {
        200 if sel.dry_run => return Ok(answer),
        202 => answer["job_id"].as_str().unwrap_or_default().to_owned(),
        409 if answer["error"]["code"] == "job_running" => {
            let id = answer["job"]["job_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            eprintln!("a job with the same selector is already running: following {id}");
            id
        }
        _ => return Err(api_error(status, &answer)),
    };
    if job_id.is_empty() {
        return Err(ClientError::Transport(
            "the broker answered without a job id".into(),
        ));
    }
    eprintln!(
        "job {job_id} started{}",
        if sel.fence { " (fence in force)" } else { "" }
    );
    if sel.no_wait {
        return Ok(answer);
    }
    follow(&c, &job_id).await
}

/// Poll a job until it is done, drawing the progress line on stderr (in
/// place on a terminal, one line a second otherwise), and return its final
/// status. Fails (exit 1) if anything ended irrevocable.
async fn follow(c: &Client, job_id: &str) -> Result<Value, ClientError> {
    let tty = std::io::stderr().is_terminal();
    let path = format!("/v1/revocations/{}", seg(job_id));
    let start = Instant::now();
    let mut last_print = None::<Instant>;
    let mut progress = Progress::default();
    loop {
        let status = c.call(Method::GET, &path, None).await?;
        let done = status["state"] != "running";
        progress.observe(&status, start.elapsed());
        let due = last_print.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(1));
        if tty || due || done {
            let line = progress.line(job_id, &status);
            let mut err = std::io::stderr().lock();
            let _ = if tty {
                write!(err, "\r\x1b[2K{line}")
            } else {
                writeln!(err, "{line}")
            };
            let _ = err.flush();
            last_print = Some(Instant::now());
        }
        if done {
            if tty {
                eprintln!();
            }
            return finished(status);
        }
        tokio::time::sleep(Duration::from_millis(if tty { 200 } else { 250 })).await;
    }
}

/// A finished job with irrevocable leases is a failure the caller must see.
fn finished(status: Value) -> Result<Value, ClientError> {
    let irrevocable: u64 = status["by_provider"]
        .as_object()
        .map(|m| m.values().filter_map(|p| p["irrevocable"].as_u64()).sum())
        .unwrap_or(0);
    if status["state"] != "running" && irrevocable > 0 {
        return Err(ClientError::Failed(status));
    }
    Ok(status)
}

/// Rate and ETA from the counts seen so far.
#[derive(Debug, Default)]
struct Progress {
    /// (elapsed, leases ended) samples, the last few seconds of them.
    samples: Vec<(Duration, u64)>,
}

fn ended(p: &Value) -> u64 {
    ["revoked", "irrevocable", "abandoned"]
        .iter()
        .filter_map(|k| p[*k].as_u64())
        .sum()
}

impl Progress {
    fn observe(&mut self, status: &Value, at: Duration) {
        let total = status["by_provider"]
            .as_object()
            .map_or(0, |m| m.values().map(ended).sum());
        self.samples.push((at, total));
        // keep a window of about five seconds
        while self.samples.len() > 2
            && at.saturating_sub(self.samples[0].0) > Duration::from_secs(5)
        {
            self.samples.remove(0);
        }
    }

    fn rate(&self) -> f64 {
        match (self.samples.first(), self.samples.last()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                (b.1.saturating_sub(a.1)) as f64 / (b.0 - a.0).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    /// `job_… running  token 61234/100000 revoked, 0 retrying, 0 irrevocable | 30512/s | ETA 2s`
    fn line(&self, job_id: &str, status: &Value) -> String {
        let mut parts = Vec::new();
        let (mut matched, mut done) = (0u64, 0u64);
        if let Some(m) = status["by_provider"].as_object() {
            for (name, p) in m {
                let n = p["matched"].as_u64().unwrap_or(0);
                matched += n;
                done += ended(p);
                parts.push(format!(
                    "{name} {}/{n} revoked, {} retrying, {} irrevocable",
                    p["revoked"].as_u64().unwrap_or(0),
                    p["retrying"].as_u64().unwrap_or(0),
                    p["irrevocable"].as_u64().unwrap_or(0),
                ));
            }
        }
        if parts.is_empty() {
            parts.push("nothing matched yet".into());
        }
        let state = status["state"].as_str().unwrap_or("?");
        let rate = self.rate();
        let eta = if state != "running" {
            "done".to_owned()
        } else if status["scan_done"] != true {
            format!(
                "selecting ({} scanned)",
                status["scanned"].as_u64().unwrap_or(0)
            )
        } else if rate > 0.0 {
            format!("ETA {:.0}s", matched.saturating_sub(done) as f64 / rate)
        } else {
            "ETA ?".to_owned()
        };
        format!(
            "{job_id} {state}  {} | {rate:.0}/s | {eta}",
            parts.join(" | ")
        )
    }
}

pub async fn fence(conn: &Connection, command: FenceCommand) -> Result<Value, ClientError> {
    let c = Client::new(conn)?;
    match command {
        FenceCommand::List => c.call(Method::GET, "/v1/fences", None).await,
        FenceCommand::Lift {
            workload,
            tenant,
            user,
            reason,
        } => {
            let (kind, value) = match (workload, tenant, user) {
                (Some(w), None, None) => ("workload", w),
                (None, Some(t), None) => ("tenant", t),
                (None, None, Some(u)) => ("user", u),
                _ => {
                    return Err(ClientError::Usage(
                        "give exactly one of --workload, --tenant, --user".into(),
                    ));
                }
            };
            let body = json!({ "kind": kind, "value": value, "reason": reason });
            c.call(Method::POST, "/v1/fences/lift", Some(body)).await
        }
    }
}

pub async fn providers(conn: &Connection, command: ProvidersCommand) -> Result<Value, ClientError> {
    let c = Client::new(conn)?;
    match command {
        ProvidersCommand::Reconcile { name, drop } => {
            let path = format!("/v1/providers/{}/reconcile", seg(&name));
            c.call(Method::POST, &path, Some(json!({ "drop": drop })))
                .await
        }
        // runs in process, not against a broker (main.rs)
        ProvidersCommand::Conformance { .. } => Err(ClientError::Usage(
            "`providers conformance` runs locally: `leasehold providers conformance --config FILE NAME`".into(),
        )),
    }
}

pub async fn blast_radius(
    conn: &Connection,
    workload: String,
    since: Option<String>,
    until: Option<String>,
) -> Result<Value, ClientError> {
    let c = Client::new(conn)?;
    let mut q = vec![format!("workload={}", urlencode(&workload))];
    for (k, v) in [("since", since), ("until", until)] {
        if let Some(v) = v {
            q.push(format!("{k}={}", urlencode(&v)));
        }
    }
    c.call(
        Method::GET,
        &format!("/v1/blast-radius?{}", q.join("&")),
        None,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_counts_rate_and_eta() {
        let status = |revoked: u64| {
            json!({
                "state": "running", "scan_done": true, "scanned": 1000,
                "by_provider": {"token": {"matched": 1000, "revoked": revoked, "retrying": 2, "irrevocable": 0, "abandoned": 0}},
            })
        };
        let mut p = Progress::default();
        p.observe(&status(100), Duration::from_secs(0));
        p.observe(&status(600), Duration::from_secs(1));
        let line = p.line("job_x", &status(600));
        assert!(
            line.contains("token 600/1000 revoked, 2 retrying, 0 irrevocable"),
            "{line}"
        );
        assert!(line.contains("500/s"), "{line}");
        assert!(line.contains("ETA 1s"), "{line}");
    }

    #[test]
    fn a_finished_job_with_irrevocable_leases_fails() {
        let s = json!({"state": "done", "by_provider": {"a": {"irrevocable": 1}, "b": {"irrevocable": 0}}});
        assert!(matches!(finished(s), Err(ClientError::Failed(_))));
        let s = json!({"state": "done", "by_provider": {"a": {"irrevocable": 0}}});
        assert!(finished(s).is_ok());
    }
}
