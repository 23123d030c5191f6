//! Secrets are returned once and never stored (invariant 5): after a full
//! lifecycle at the most verbose log level, the issued token's bytes appear
//! in no log line and in no file of the data folder.

use std::path::Path;

use serde_json::json;

use crate::harness::{Spawned, spawn_broker};

pub(crate) fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    // the write-ahead log is preallocated with zeros: skip them (no needle
    // holds a zero byte), so an unoptimized build scans it in time
    let end = hay.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    hay[..end]
        .windows(needle.len())
        .any(|w| w[0] == needle[0] && w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_or_store_files() {
    let Spawned {
        dir: _dir,
        data,
        creds,
        log,
        remote,
        mut child,
        ..
    } = spawn_broker(
        |_c| {
            // everything stays in the write-ahead log until shutdown
            #[cfg(feature = "fault-injection")]
            {
                _c.fault.no_checkpoints = true;
            }
        },
        "trace",
        &[],
    )
    .await;
    let a = &creds.identities["assistant-a"].token;
    let admin = &creds.identities["admin"].token;
    let resource = &creds.identities["resource-server"].token;

    let mut tokens = Vec::new();
    let mut task_ids = Vec::new();
    for _ in 0..3 {
        let body = json!({"purpose": "p", "on_behalf_of": "alice", "prompt": "secret prompt text", "ttl_seconds": 600});
        let id = remote.post(a, "/v1/tasks", Some(body)).await["task_id"]
            .as_str()
            .unwrap()
            .to_owned();
        for _ in 0..2 {
            let body = json!({"provider": "token", "role": "demo", "ttl_seconds": 300});
            let l = remote
                .post(a, &format!("/v1/tasks/{id}/leases"), Some(body))
                .await;
            let token = l["credential"]["token"].as_str().unwrap().to_owned();
            assert!(remote.active(resource, &token).await);
            tokens.push(token);
        }
        task_ids.push(id);
    }
    // revoke one by hand, complete two tasks, leave one task's leases active
    let listed = remote.get(admin, "/v1/leases?limit=1").await;
    let first_lease = listed["leases"][0]["lease_id"].as_str().unwrap();
    assert_eq!(
        remote
            .post(admin, &format!("/v1/leases/{first_lease}/revoke"), None)
            .await["state"],
        "revoked"
    );
    for id in &task_ids[..2] {
        assert_eq!(
            remote
                .post(a, &format!("/v1/tasks/{id}/complete"), None)
                .await["state"],
            "completed"
        );
    }
    // the log as it is before the shutdown checkpoint empties it
    let wal = leasehold::store::wal::path_for(&data.join("leasehold.redb"));
    let wal_copy = data.join("wal-before-shutdown");
    std::fs::copy(&wal, &wal_copy).unwrap();
    #[cfg(feature = "fault-injection")]
    assert!(
        std::fs::read(&wal_copy)
            .unwrap()
            .iter()
            .filter(|b| **b != 0)
            .count()
            > 10_000,
        "the write-ahead log held the whole lifecycle"
    );
    assert!(child.terminate().success());

    let log_bytes = std::fs::read(&log).unwrap();
    let log_text = String::from_utf8_lossy(&log_bytes);
    assert!(
        log_text.contains("lease issued"),
        "the log must be verbose enough to matter"
    );
    // request ids reach the log lines of the request
    assert!(
        log_text
            .lines()
            .any(|l| l.contains("lease issued") && l.contains("request_id=req_")),
        "log lines of a request carry its request id"
    );
    let store_key = std::fs::read_to_string(data.join("store.key")).unwrap();
    let mut needles: Vec<(String, Vec<u8>)> = Vec::new();
    for t in &tokens {
        needles.push(("token".into(), t.as_bytes().to_vec()));
        needles.push((
            "token signature".into(),
            t.rsplit('.').next().unwrap().as_bytes().to_vec(),
        ));
    }
    needles.push(("workload token".into(), a.as_bytes().to_vec()));
    needles.push(("operator token".into(), admin.as_bytes().to_vec()));
    needles.push(("store key".into(), store_key.trim().as_bytes().to_vec()));
    needles.push(("prompt text".into(), b"secret prompt text".to_vec()));
    for (what, needle) in &needles {
        assert!(!contains(&log_bytes, needle), "a {what} appears in the log");
    }
    for f in files_under(&data) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        // the files that legitimately hold credentials for the operator
        if ["dev-credentials.json", "store.key"].contains(&name.as_str()) {
            continue;
        }
        let bytes = std::fs::read(&f).unwrap();
        for (what, needle) in &needles {
            assert!(
                !contains(&bytes, needle),
                "a {what} appears in {}",
                f.display()
            );
        }
    }
}

/// `--log-format json`: one JSON object per line, each line of a request
/// inside its span with the request id, the workload, the task and (once
/// issued) the lease; `RUST_LOG` filters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_request_workload_task_and_lease() {
    let Spawned {
        dir: _dir,
        creds,
        log,
        remote,
        mut child,
        ..
    } = spawn_broker(
        |_| {},
        "debug,h2=info,hyper=info",
        &["--log-format", "json"],
    )
    .await;
    let a = &creds.identities["assistant-a"].token;
    let task = remote
        .post(
            a,
            "/v1/tasks",
            Some(
                json!({"purpose": "p", "on_behalf_of": "alice", "prompt": "x", "ttl_seconds": 600}),
            ),
        )
        .await;
    let task = task["task_id"].as_str().unwrap().to_owned();
    let l = remote
        .post(
            a,
            &format!("/v1/tasks/{task}/leases"),
            Some(json!({"provider": "token", "role": "demo", "ttl_seconds": 60})),
        )
        .await;
    let lease = l["lease_id"].as_str().unwrap().to_owned();
    assert!(child.terminate().success());

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let issued = lines
        .iter()
        .find(|l| l["message"] == "lease issued")
        .expect("a `lease issued` line");
    let span = &issued["span"];
    assert!(
        span["request_id"].as_str().unwrap().starts_with("req_"),
        "{issued}"
    );
    assert_eq!(span["workload"], "dev:assistant-a", "{issued}");
    assert_eq!(span["task"], task.as_str(), "{issued}");
    assert_eq!(issued["level"], "INFO");
    // the request's last line knows the lease it issued
    let done = lines
        .iter()
        .find(|l| {
            l["message"] == "request done"
                && l["span"]["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("/leases"))
        })
        .expect("the lease request's closing line");
    assert_eq!(done["span"]["lease"], lease.as_str(), "{done}");
    // debug is on, trace is filtered out
    assert!(lines.iter().any(|l| l["level"] == "DEBUG"));
    assert!(lines.iter().all(|l| l["level"] != "TRACE"));
    assert!(
        !text.contains(l["credential"]["token"].as_str().unwrap()),
        "no credential in the log"
    );
}
