//! The fuzz step (issue 10): schemathesis, from the document the broker
//! serves, against a running `leasehold dev`, once per kind of caller (a
//! workload and each operator role), with a bounded number of examples per
//! operation. Allowed: zero server errors and zero responses that break the
//! document (undocumented status, wrong content type or headers, a body
//! that does not match its schema). The broker's own log must show no
//! failed (5xx) request either.
//!
//! Needs the `schemathesis` command: `integration/test.sh` installs it from
//! PyPI into its virtual environment and sets LEASEHOLD_SCHEMATHESIS_BIN.
//! LEASEHOLD_FUZZ_EXAMPLES (default 20) and LEASEHOLD_FUZZ_SEED (default
//! fixed, so CI is repeatable; set another to explore) tune the run.
//!
//! Before the run the test opens a task with a lease and a pending
//! approval, and tells schemathesis (its config file) to use their ids for
//! the `{id}` path parameters, so the fuzzed requests reach the handlers'
//! logic rather than stopping at "no such task". Malformed and unknown ids
//! are covered by tests/broker/openapi.rs and bad_input.rs.

use std::path::PathBuf;
use std::process::Command;

use crate::harness::{Child, Remote, client, free_port};

const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
response_headers_conformance,response_schema_conformance";

fn schemathesis() -> PathBuf {
    let Some(bin) = std::env::var_os("LEASEHOLD_SCHEMATHESIS_BIN") else {
        panic!(
            "LEASEHOLD_SCHEMATHESIS_BIN is not set. `integration/test.sh` installs schemathesis \
             (PyPI, pinned there) into integration/.venv and sets it; by hand: \
             `python3 -m venv .venv && .venv/bin/pip install schemathesis==4.32.5`, then \
             LEASEHOLD_SCHEMATHESIS_BIN=.venv/bin/schemathesis"
        )
    };
    let bin = PathBuf::from(bin);
    assert!(
        bin.is_file(),
        "LEASEHOLD_SCHEMATHESIS_BIN={} does not exist",
        bin.display()
    );
    bin
}

/// `Selected: 34/34`, `1523 generated, 1523 passed` from schemathesis's summary.
fn summary_line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines().find(|l| l.contains(key)).map_or("?", str::trim)
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let bin = schemathesis();
    let examples = std::env::var("LEASEHOLD_FUZZ_EXAMPLES").unwrap_or_else(|_| "20".into());
    let seed = std::env::var("LEASEHOLD_FUZZ_SEED").unwrap_or_else(|_| "20261128".into());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("broker.log");
    let addr = free_port();
    let err = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .arg("dev")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data")
        .arg(&data)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let mut broker = Child {
        child,
        addr,
        log: log.clone(),
    };
    broker.wait_healthy(&client()).await;
    let creds: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("dev-credentials.json")).unwrap()).unwrap();
    let ids = seed_state(addr, &creds).await;
    std::fs::write(dir.path().join("schemathesis.toml"), ids).unwrap();
    let schema = format!("http://{addr}/v1/openapi.json");
    let mut report = Vec::new();
    for who in [
        "assistant-a",
        "admin",
        "responder",
        "approver",
        "resource-server",
    ] {
        let token = creds["identities"][who]["token"].as_str().unwrap();
        let out = tokio::task::spawn_blocking({
            let (bin, schema, examples, seed) =
                (bin.clone(), schema.clone(), examples.clone(), seed.clone());
            let cwd = dir.path().to_owned();
            let header = format!("Authorization: Bearer {token}");
            move || {
                Command::new(bin)
                    .current_dir(cwd)
                    .args(["--config-file", "schemathesis.toml"])
                    .args(["run", &schema, "--checks", CHECKS])
                    .args(["--max-examples", &examples, "--seed", &seed])
                    .args(["--request-timeout", "30"])
                    .args(["--generation-database", "none", "--no-color"])
                    .args(["--output-sanitize", "true"])
                    .arg("-H")
                    .arg(header)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "schemathesis as {who} found failures (seed {seed}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = format!(
            "{who}: operations {}, test cases {}",
            summary_line(&stdout, "Tested:"),
            summary_line(&stdout, "generated,")
        );
        println!("{line}");
        report.push(line);
    }
    let broker_log = std::fs::read_to_string(&log).unwrap();
    let failed: Vec<&str> = broker_log
        .lines()
        .filter(|l| l.contains("request failed"))
        .take(5)
        .collect();
    assert!(
        failed.is_empty(),
        "the broker answered 5xx during the fuzz run:\n{}",
        failed.join("\n")
    );
    assert_eq!(broker.terminate().code(), Some(0));
    println!("fuzz summary (examples per operation {examples}, seed {seed}):");
    for l in report {
        println!("  {l}");
    }
}

/// A task of `assistant-a` with a lease and a pending approval; returns the
/// schemathesis config that pins the `{id}` path parameters to them.
async fn seed_state(addr: std::net::SocketAddr, creds: &serde_json::Value) -> String {
    use serde_json::json;
    let remote = Remote::new(addr);
    let token = creds["identities"]["assistant-a"]["token"]
        .as_str()
        .unwrap();
    let task = remote
        .post(token, "/v1/tasks", Some(json!({"purpose": "fuzz", "on_behalf_of": "alice@example.com",
            "prompt": "fuzz it", "tools": ["demo.read", "demo.write", "demo.admin"], "ttl_seconds": 3600})))
        .await;
    let task = task["task_id"].as_str().expect("a task").to_owned();
    let lease = remote
        .post(
            token,
            &format!("/v1/tasks/{task}/leases"),
            Some(json!({"provider": "token", "role": "demo", "ttl_seconds": 600})),
        )
        .await;
    let lease = lease["lease_id"].as_str().expect("a lease").to_owned();
    let held = remote
        .post(
            token,
            &format!("/v1/tasks/{task}/calls"),
            Some(json!({"tool": "demo.write", "action": "run", "resource": "ticket:1"})),
        )
        .await;
    let approval = held["approval_id"]
        .as_str()
        .expect("an approval")
        .to_owned();
    let pin = |regex: &str, id: &str, extra: &str| {
        format!(
            "[[operations]]\ninclude-path-regex = \"{regex}\"\nparameters = {{ \"path.id\" = \"{id}\"{extra} }}\n\n"
        )
    };
    [
        pin("^/v1/(tasks|reviews)/", &task, ""),
        pin("^/v1/leases/", &lease, ""),
        // a long-poll on this pending approval would hold every case up to
        // 29 s: `wait` is pinned to 0 (policy.rs tests the long-poll)
        pin("^/v1/approvals/", &approval, ", \"query.wait\" = 0"),
    ]
    .concat()
}
