//! The client verbs against a running broker, as an operator would type them.

use serde_json::Value;

use crate::harness::{Harness, Options};

/// The verb's exit status, standard output and standard error as text.
pub(crate) async fn leasehold_text(h: &Harness, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"));
    cmd.args(args)
        .env(
            "LEASEHOLD_CREDENTIALS",
            h.dir.path().join("dev-credentials.json"),
        )
        .env_remove("LEASEHOLD_TOKEN")
        .env_remove("LEASEHOLD_BROKER")
        .env_remove("LEASEHOLD_AS");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub(crate) async fn leasehold(h: &Harness, args: &[&str]) -> (bool, Value, String) {
    let (ok, stdout, stderr) = leasehold_text(h, args).await;
    (
        ok,
        serde_json::from_str(&stdout).unwrap_or(Value::Null),
        stderr,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_and_lease_verbs() {
    let h = Harness::start(Options::default()).await;
    let (ok, task, err) = leasehold(
        &h,
        &[
            "task",
            "open",
            "--as",
            "assistant-a",
            "--purpose",
            "triage",
            "--on-behalf-of",
            "bob@example.com",
            "--prompt",
            "look at ticket 4",
            "--tool",
            "demo.read",
            "--ttl",
            "600",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let task_id = task["task_id"].as_str().unwrap();

    let (ok, lease, err) = leasehold(
        &h,
        &[
            "lease",
            "request",
            task_id,
            "--as",
            "assistant-a",
            "--provider",
            "token",
            "--role",
            "demo",
            "--ttl",
            "60",
            "--scope",
            "demo:read",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let lease_id = lease["lease_id"].as_str().unwrap();
    assert_eq!(lease["scope"][0], "demo:read");
    assert!(lease["credential"]["token"].as_str().is_some());

    // --broker and --token work without the credentials file's identity names
    let url = format!("http://{}", h.addr);
    let (ok, shown, err) = leasehold(
        &h,
        &[
            "lease",
            "show",
            lease_id,
            "--broker",
            &url,
            "--token",
            &h.tokens.a,
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(shown["state"], "active");
    assert!(shown.get("credential").is_none());

    let (ok, list, err) = leasehold(
        &h,
        &["lease", "list", "--as", "responder", "--state", "active"],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(list["leases"].as_array().unwrap().len(), 1);

    // a refusal exits 1 with the code
    let (ok, _, err) = leasehold(&h, &["lease", "show", lease_id, "--as", "assistant-b"]).await;
    assert!(!ok);
    assert!(err.contains("lease_not_found"), "{err}");

    let (ok, shown, _) = leasehold(&h, &["task", "show", task_id, "--as", "assistant-a"]).await;
    assert!(ok);
    assert_eq!(shown["leases"][0]["lease_id"], lease_id);

    let (ok, revoked, err) = leasehold(&h, &["lease", "revoke", lease_id, "--as", "admin"]).await;
    assert!(ok, "{err}");
    assert_eq!(revoked["state"], "revoked");

    let (ok, done, err) =
        leasehold(&h, &["task", "complete", task_id, "--as", "assistant-a"]).await;
    assert!(ok, "{err}");
    assert_eq!(done["state"], "completed");

    // the task's story, for people
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"));
    cmd.args(["events", "show", "--task", task_id, "--as", "admin"])
        .env(
            "LEASEHOLD_CREDENTIALS",
            h.dir.path().join("dev-credentials.json"),
        );
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let story = String::from_utf8_lossy(&out.stdout);
    let order: Vec<&str> = [
        "task.opened",
        "lease.issuing",
        "lease.issued",
        "lease.revoked",
        "task.completed",
    ]
    .into_iter()
    .filter(|k| story.contains(k))
    .collect();
    assert_eq!(order.len(), 5, "{story}");
    assert!(
        story.find("task.opened") < story.find("lease.issued")
            && story.find("lease.revoked") < story.find("task.completed")
    );
    assert!(
        story.contains("bob@example.com") && story.contains("cause manual"),
        "{story}"
    );

    let (ok, _, err) = leasehold(&h, &["task", "show", task_id]).await;
    assert!(!ok);
    assert!(err.contains("--as"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_approvals_from_the_command_line() {
    let h = Harness::start(Options::default()).await;
    let (ok, task, err) = leasehold(
        &h,
        &[
            "task",
            "open",
            "--as",
            "assistant-a",
            "--purpose",
            "fix ticket",
            "--on-behalf-of",
            "alice@example.com",
            "--prompt",
            "fix 42",
            "--tool",
            "demo.write",
            "--tool",
            "demo.read",
            "--ttl",
            "600",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let task_id = task["task_id"].as_str().unwrap();
    let call = [
        "task",
        "call",
        task_id,
        "--as",
        "assistant-a",
        "--tool",
        "demo.write",
        "--action",
        "update",
        "--resource",
        "ticket:42",
        "--provider",
        "token",
        "--role",
        "demo",
        "--ttl",
        "60",
    ];
    let (ok, held, err) = leasehold(&h, &call).await;
    assert!(ok, "{err}");
    assert_eq!(held["decision"], "approval_required");
    let approval = held["approval_id"].as_str().unwrap();

    let (ok, list, _) = leasehold(&h, &["approvals", "list", "--as", "approver"]).await;
    assert!(ok);
    assert_eq!(list["approvals"][0]["approval_id"], approval);
    let (ok, _, err) = leasehold(
        &h,
        &["approvals", "approve", approval, "--as", "assistant-a"],
    )
    .await;
    assert!(!ok && err.contains("forbidden"), "{err}");
    let (ok, v, err) = leasehold(
        &h,
        &[
            "approvals",
            "approve",
            approval,
            "--as",
            "approver",
            "--comment",
            "ticket 42 only",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(v["state"], "approved");

    let mut retry: Vec<&str> = call.to_vec();
    retry.extend(["--approval", approval]);
    let (ok, done, err) = leasehold(&h, &retry).await;
    assert!(ok, "{err}");
    assert_eq!(done["decision"], "allow");
    assert!(done["lease"]["credential"]["token"].as_str().is_some());

    // a denial from the command line needs its reason, and the caller sees why
    let (_, held, _) = leasehold(&h, &call).await;
    let second = held["approval_id"].as_str().unwrap();
    let (ok, v, err) = leasehold(
        &h,
        &[
            "approvals",
            "deny",
            second,
            "--as",
            "approver",
            "--comment",
            "not this week",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(v["comment"], "not this week");
    let (ok, _, err) = leasehold(
        &h,
        &[
            "task",
            "call",
            task_id,
            "--as",
            "assistant-a",
            "--tool",
            "demo.admin",
            "--action",
            "x",
        ],
    )
    .await;
    assert!(!ok && err.contains("policy_denied"), "{err}");
}

/// The responder's verbs: a mass revocation followed by its progress line,
/// its status later, fences listed and lifted, the blast radius, and an
/// irrevocable lease ending the command non-zero, then abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_follows_the_job_fences_and_blast_radius() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    let flaky = Arc::new(crate::harness::Flaky::default());
    let f2 = flaky.clone();
    let h = Harness::start(Options {
        manual_clock: true,
        tweak: Box::new(|c| {
            crate::harness::permit_leases(c, "flaky");
            c.fault.job_chunk = Some(5);
            c.fault.job_chunk_pause_millis = 150;
            c.reaper.retry_base_seconds = 1;
            c.reaper.retry_cap_seconds = 1;
            c.reaper.retry_budget = 1;
        }),
        overrides: Box::new(move || leasehold::server::Overrides {
            providers: vec![(
                "flaky".into(),
                f2.clone() as Arc<dyn leasehold_provider::Provider>,
            )],
        }),
    })
    .await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    for _ in 0..15 {
        h.lease(&h.tokens.a, &task, 600).await;
    }

    let (ok, dry, err) = leasehold(
        &h,
        &[
            "revoke",
            "--as",
            "responder",
            "--workload",
            "dev:assistant-a",
            "--reason",
            "leak",
            "--dry-run",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(dry["matched"], 15);

    let (ok, done, err) = leasehold(
        &h,
        &[
            "revoke",
            "--as",
            "responder",
            "--workload",
            "dev:assistant-a",
            "--fence",
            "--reason",
            "token leaked in a log",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(done["state"], "done");
    assert_eq!(done["by_provider"]["token"]["revoked"], 15);
    let job_id = done["job_id"].as_str().unwrap();
    // the progress: the job id, then lines with counts per provider, rate and ETA
    assert!(
        err.contains(&format!("job {job_id} started (fence in force)")),
        "{err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with(job_id)).collect();
    assert!(
        lines.len() >= 2,
        "a line a second while it runs, and the last: {err}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" running ") && l.contains("/s |")),
        "{err}"
    );
    let last = lines.last().unwrap();
    assert!(
        last.contains("done  token 15/15 revoked, 0 retrying, 0 irrevocable"),
        "{last}"
    );

    let (ok, status, err) = leasehold(&h, &["revoke", "status", job_id, "--as", "responder"]).await;
    assert!(ok, "{err}");
    assert_eq!(status["by_provider"]["token"]["matched"], 15);
    let (ok, fences, _) = leasehold(&h, &["fence", "list", "--as", "responder"]).await;
    assert!(ok);
    assert_eq!(fences["fences"][0]["value"], "dev:assistant-a");
    let (ok, radius, err) = leasehold(
        &h,
        &[
            "blast-radius",
            "--as",
            "responder",
            "--workload",
            "dev:assistant-a",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(radius["totals"]["leases"], 15);
    assert_eq!(radius["totals"]["live_leases"], 0);
    assert_eq!(radius["fenced"], true);
    let (ok, _, err) = leasehold(
        &h,
        &[
            "revoke",
            "--as",
            "responder",
            "--workload",
            "dev:assistant-a",
        ],
    )
    .await;
    assert!(!ok && err.contains("--reason"), "{err}");
    let (ok, _, err) = leasehold(
        &h,
        &[
            "fence",
            "lift",
            "--as",
            "responder",
            "--workload",
            "dev:assistant-a",
            "--reason",
            "rotated",
        ],
    )
    .await;
    assert!(ok, "{err}");

    // a lease that cannot be revoked: the command says so and exits 1
    let task = h.open_task(&h.tokens.b, 3600).await;
    let (_, v) = h
        .post(
            &h.tokens.b,
            &format!("/v1/tasks/{task}/leases"),
            serde_json::json!({"provider": "flaky", "role": "r", "ttl_seconds": 600}),
        )
        .await;
    let stuck = v["lease_id"].as_str().unwrap().to_owned();
    flaky.down.store(true, Ordering::SeqCst);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"));
    cmd.args([
        "revoke",
        "--as",
        "responder",
        "--provider",
        "flaky",
        "--reason",
        "peer compromised",
    ])
    .env(
        "LEASEHOLD_CREDENTIALS",
        h.dir.path().join("dev-credentials.json"),
    );
    let run = tokio::task::spawn_blocking(move || cmd.output().unwrap());
    while !run.is_finished() {
        h.advance(std::time::Duration::from_secs(2));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let out = run.await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["by_provider"]["flaky"]["irrevocable"], 1, "{report}");
    assert_eq!(report["failed"][0]["lease_id"], stuck.as_str());
    assert!(
        stderr.contains("0/1 revoked, 0 retrying, 1 irrevocable"),
        "{stderr}"
    );

    let (ok, _, err) = leasehold(
        &h,
        &["lease", "revoke", &stuck, "--as", "responder", "--force"],
    )
    .await;
    assert!(
        !ok && err.contains("--reason"),
        "--force needs a reason: {err}"
    );
    let (ok, abandoned, err) = leasehold(
        &h,
        &[
            "lease",
            "revoke",
            &stuck,
            "--as",
            "responder",
            "--force",
            "--reason",
            "peer is gone",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(abandoned["state"], "abandoned");
}

/// `leasehold dev` with a relative data folder (the default) writes a
/// `dev-config.toml` that `config validate` accepts from anywhere: its
/// paths name the same files, not the folder joined to itself.
#[test]
fn the_dev_config_validates_from_a_relative_data_folder() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::harness::free_port();
    let mut dev = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args([
            "dev",
            "--listen",
            &port.to_string(),
            "--data",
            "leasehold-data",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let config = dir.path().join("leasehold-data/dev-config.toml");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !config.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let validate = |cwd: &std::path::Path, file: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
            .args(["config", "validate", file, "--offline"])
            .current_dir(cwd)
            .output()
            .unwrap()
    };
    let from_parent = validate(dir.path(), "leasehold-data/dev-config.toml");
    let from_inside = validate(&dir.path().join("leasehold-data"), "dev-config.toml");
    let _ = dev.kill();
    let _ = dev.wait();
    for out in [from_parent, from_inside] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
    }
}

/// People get tables (`-o table`, the default on a terminal), scripts JSON
/// (`-o json`, the default when piped); errors go to stderr with the code
/// and a hint; `leasehold status` sums the broker up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_for_people_json_for_scripts_and_status() {
    let h = Harness::start(Options::default()).await;
    let task = h.open_task(&h.tokens.a, 600).await;
    let lease = h.lease(&h.tokens.a, &task, 60).await;
    let id = lease["lease_id"].as_str().unwrap();

    let (ok, out, err) =
        leasehold_text(&h, &["lease", "list", "--as", "responder", "-o", "table"]).await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("LEASE") && lines[0].contains("STATE") && lines[0].contains("EXPIRES"),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(id) && l.contains("active")),
        "{out}"
    );
    // piped without -o: JSON, as before
    let (ok, out, _) = leasehold_text(&h, &["lease", "list", "--as", "responder"]).await;
    assert!(ok);
    let v: Value = serde_json::from_str(&out).expect("JSON when piped");
    assert!(v["leases"].is_array());
    let (_, out, _) =
        leasehold_text(&h, &["lease", "list", "--as", "responder", "-o", "json"]).await;
    assert!(serde_json::from_str::<Value>(&out).is_ok());

    // status, as a table and as JSON
    let (ok, out, err) = leasehold_text(&h, &["status", "--as", "admin", "-o", "table"]).await;
    assert!(ok, "{err}");
    for want in [
        "health",
        "ok",
        "ready",
        "revocation_queue",
        "chain_head",
        "CHECK",
        "provider:token",
        "LEASES",
    ] {
        assert!(out.contains(want), "{want} missing from:\n{out}");
    }
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["token", "active", "1"]),
        "{out}"
    );
    assert!(!out.contains("rolled_back"), "no rows of zero: {out}");
    let (ok, v, err) = leasehold(&h, &["status", "--as", "responder"]).await;
    assert!(ok, "{err}");
    assert_eq!(v["ready"], true);
    assert_eq!(v["role"], "single");
    assert_eq!(v["revocation_queue"], 0.0);
    assert!(
        v["lease_counts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["provider"] == "token" && c["state"] == "active" && c["count"] == 1)
    );

    // errors: stderr, the code, a hint, exit 1 for a refusal
    let (ok, out, err) = leasehold_text(&h, &["status", "--as", "assistant-a"]).await;
    assert!(!ok && out.is_empty());
    assert!(
        err.contains("error: forbidden") && err.contains("hint:"),
        "{err}"
    );
    let (ok, _, err) = leasehold_text(&h, &["lease", "show", id, "--as", "assistant-b"]).await;
    assert!(!ok);
    assert!(
        err.contains("lease_not_found") && err.contains("hint: check the id"),
        "{err}"
    );
}
