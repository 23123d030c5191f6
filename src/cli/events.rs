//! `leasehold events ...`: read, export, verify and archive the chain.
//!
//! An export is JSON Lines: a header `{"chain":{"base_seq":N,"base_hash":..}}`
//! (where the exported part starts), the signed checkpoints as
//! `{"checkpoint":{..}}`, then one event per line with its `hash`. Verifying
//! an export needs nothing but the file (and the checkpoint public key, to
//! check signatures).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::client::{Client, ClientError};
use super::{Connection, EventsCommand};
use crate::audit::VerifyReport;

fn usage(e: impl std::fmt::Display) -> ClientError {
    ClientError::Usage(e.to_string())
}

fn trusted_key(path: Option<&Path>) -> Result<Option<Vec<u8>>, ClientError> {
    path.map(|p| {
        let bytes = std::fs::read(p).map_err(|e| usage(format!("{}: {e}", p.display())))?;
        crate::audit::checkpoint::load_public_key(&bytes).map_err(usage)
    })
    .transpose()
}

/// Verify an export file (two passes: header and checkpoints, then events).
pub fn verify_export(path: &Path, trusted: Option<Vec<u8>>) -> Result<VerifyReport, ClientError> {
    crate::audit::verify::verify_export_file(path, trusted).map_err(usage)
}

/// Verify a stopped broker's store file.
pub fn verify_store_file(
    path: &Path,
    trusted: Option<Vec<u8>>,
) -> Result<VerifyReport, ClientError> {
    let snap = crate::store::Snapshot::open(path).map_err(usage)?;
    let reader = snap.read().map_err(usage)?;
    crate::audit::query::verify_store(&*reader, trusted).map_err(usage)
}

async fn pages(
    c: &Client,
    query: &str,
    mut each: impl FnMut(&Value) -> bool,
) -> Result<Option<u64>, ClientError> {
    let mut after: Option<u64> = None;
    loop {
        let path = match after {
            Some(a) => format!("/v1/events?limit=1000&{query}&after={a}"),
            None => format!("/v1/events?limit=1000&{query}"),
        };
        let page = c.call(reqwest::Method::GET, &path, None).await?;
        for e in page["events"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if !each(e) {
                return Ok(e["seq"].as_u64());
            }
        }
        match page["next_cursor"].as_u64() {
            Some(n) => after = Some(n),
            None => {
                return Ok(page["events"]
                    .as_array()
                    .and_then(|a| a.last())
                    .and_then(|e| e["seq"].as_u64())
                    .or(after));
            }
        }
    }
}

/// One line of a task's story, for people.
fn story_line(e: &Value) -> String {
    let d = &e["data"];
    let l = &e["links"];
    let detail = match e["kind"].as_str().unwrap_or("") {
        "task.opened" => format!(
            "by {} for {}: \"{}\" (prompt sha256 {}…), tools {}",
            l["workload"].as_str().unwrap_or("?"),
            l["user"].as_str().unwrap_or("?"),
            d["purpose"].as_str().unwrap_or(""),
            d["prompt_sha256"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(12)
                .collect::<String>(),
            d["tools"],
        ),
        "lease.issuing" | "lease.issued" | "lease.revoking" => format!(
            "{} {}/{} until {}",
            l["lease"].as_str().unwrap_or("?"),
            l["provider"].as_str().unwrap_or("?"),
            l["role"].as_str().unwrap_or("?"),
            d["expires_at"].as_str().unwrap_or("?"),
        ),
        "lease.revoked" | "lease.rolled_back" | "lease.irrevocable" | "revocation.retried" => {
            format!(
                "{} cause {}{}",
                l["lease"].as_str().unwrap_or("?"),
                d["cause"].as_str().unwrap_or("?"),
                d["error"]
                    .as_str()
                    .map(|e| format!(", error: {e}"))
                    .unwrap_or_default(),
            )
        }
        "task.completed" => format!("{} revoked, {} pending", d["revoked"], d["pending"]),
        _ => d.to_string(),
    };
    format!(
        "{:>8}  {}  {:<20} {}",
        e["seq"],
        e["time"].as_str().unwrap_or(""),
        e["kind"].as_str().unwrap_or(""),
        detail
    )
}

fn query_string(pairs: &[(&str, Option<String>)]) -> String {
    pairs
        .iter()
        .filter_map(|(k, v)| {
            v.as_ref()
                .map(|v| format!("{k}={}", super::client::urlencode(v)))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Write an export; returns the last seq written.
async fn export(
    c: &Client,
    out: &mut dyn std::io::Write,
    after: u64,
    through: Option<u64>,
    follow: bool,
) -> Result<u64, ClientError> {
    let io = |e: std::io::Error| usage(e.to_string());
    let chain = c
        .call(reqwest::Method::GET, "/v1/events/chain", None)
        .await?;
    let (base_seq, base_hash) = if after == 0 || after <= chain["base_seq"].as_u64().unwrap_or(0) {
        (
            chain["base_seq"].as_u64().unwrap_or(0),
            chain["base_hash"].as_str().unwrap_or("").to_owned(),
        )
    } else {
        let prev = c
            .call(
                reqwest::Method::GET,
                &format!("/v1/events?limit=1&after={}", after - 1),
                None,
            )
            .await?;
        let h = prev["events"][0]["hash"]
            .as_str()
            .ok_or_else(|| usage(format!("no event {after}")))?
            .to_owned();
        (after, h)
    };
    writeln!(
        out,
        "{}",
        json!({"chain": {"base_seq": base_seq, "base_hash": base_hash}})
    )
    .map_err(io)?;
    let mut written_cps = std::collections::BTreeSet::new();
    let mut last = base_seq;
    loop {
        let chain = c
            .call(reqwest::Method::GET, "/v1/events/chain", None)
            .await?;
        for cp in chain["checkpoints"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let seq = cp["seq"].as_u64().unwrap_or(0);
            if seq > base_seq && through.is_none_or(|t| seq <= t) && written_cps.insert(seq) {
                writeln!(out, "{}", json!({ "checkpoint": cp })).map_err(io)?;
            }
        }
        let mut err = None;
        pages(c, &format!("after={last}"), |e| {
            let seq = e["seq"].as_u64().unwrap_or(0);
            if through.is_some_and(|t| seq > t) {
                return false;
            }
            let mut line = Vec::new();
            if crate::audit::canonical(e, &mut line).is_err() {
                err = Some(usage("an event without a canonical form"));
                return false;
            }
            if let Err(e) = out.write_all(&line).and_then(|()| out.write_all(b"\n")) {
                err = Some(usage(e));
                return false;
            }
            last = seq;
            true
        })
        .await?;
        if let Some(e) = err {
            return Err(e);
        }
        out.flush().map_err(io)?;
        if !follow || through.is_some_and(|t| last >= t) {
            return Ok(last);
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

pub async fn run(conn: &Connection, cmd: EventsCommand) -> Result<Value, ClientError> {
    match cmd {
        EventsCommand::Verify {
            store,
            export: file,
            checkpoint_key,
        } => {
            let trusted = trusted_key(checkpoint_key.as_deref())?;
            let report = match (store, file) {
                (Some(s), None) => verify_store_file(&s, trusted)?,
                (None, Some(f)) => verify_export(&f, trusted)?,
                (None, None) => {
                    let c = Client::new(conn)?;
                    let v = c
                        .call(reqwest::Method::GET, "/v1/events/verify", None)
                        .await?;
                    return if v["ok"] == true {
                        Ok(v)
                    } else {
                        Err(ClientError::Failed(v))
                    };
                }
                (Some(_), Some(_)) => return Err(usage("give --store or --export, not both")),
            };
            let v = serde_json::to_value(&report).map_err(usage)?;
            if report.ok {
                Ok(v)
            } else {
                Err(ClientError::Failed(v))
            }
        }
        EventsCommand::List {
            task,
            lease,
            workload,
            user,
            kind,
            since,
            until,
            after,
            limit,
        } => {
            let c = Client::new(conn)?;
            let q = query_string(&[
                ("task", task),
                ("lease", lease),
                ("workload", workload),
                ("user", user),
                ("kind", kind),
                ("since", since),
                ("until", until),
                ("after", after.map(|a| a.to_string())),
                ("limit", Some(limit.to_string())),
            ]);
            c.call(reqwest::Method::GET, &format!("/v1/events?{q}"), None)
                .await
        }
        EventsCommand::Show { task } => {
            let c = Client::new(conn)?;
            let mut lines = Vec::new();
            pages(&c, &query_string(&[("task", Some(task.clone()))]), |e| {
                lines.push(story_line(e));
                true
            })
            .await?;
            if lines.is_empty() {
                return Err(usage(format!("no events for {task}")));
            }
            let mut stdout = std::io::stdout().lock();
            for l in lines {
                let _ = writeln!(stdout, "{l}");
            }
            Ok(Value::Null)
        }
        EventsCommand::Export { out, after, follow } => {
            let c = Client::new(conn)?;
            let last = match out {
                Some(path) => {
                    let mut f = std::io::BufWriter::new(
                        std::fs::File::create(&path)
                            .map_err(|e| usage(format!("{}: {e}", path.display())))?,
                    );
                    export(&c, &mut f, after, None, follow).await?
                }
                None => {
                    let mut stdout = std::io::stdout().lock();
                    export(&c, &mut stdout, after, None, follow).await?
                }
            };
            eprintln!("exported through seq {last}");
            Ok(Value::Null)
        }
        EventsCommand::Archive { through, out } => archive(conn, through, out).await,
    }
}

/// Ask the broker to archive and prune the oldest events through
/// `through`: it writes the archive into its `audit.archive_dir`, verifies
/// it, prunes, and answers with the file and its SHA-256. With `out`, the
/// archive (read back through the API before the prune is asked for) is
/// also written here, for the operator's own copy.
async fn archive(
    conn: &Connection,
    through: u64,
    out: Option<PathBuf>,
) -> Result<Value, ClientError> {
    let c = Client::new(conn)?;
    if let Some(out) = &out {
        let mut f = std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(out)
                .map_err(|e| usage(format!("{}: {e}", out.display())))?,
        );
        let last = export(&c, &mut f, 0, Some(through), false).await?;
        if last != through {
            return Err(usage(format!("the chain ends at {last}, before {through}")));
        }
        f.flush().map_err(usage)?;
    }
    let body = json!({"through_seq": through});
    c.call(reqwest::Method::POST, "/v1/events/archive", Some(body))
        .await
}
