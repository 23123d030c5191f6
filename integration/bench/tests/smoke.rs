//! Every benchmark the README shows, run at a tiny size against this
//! build's `leasehold` (debug), so none can rot unnoticed: a bench that
//! stops on an error, a changed API or a default that no longer works
//! fails here, long before someone runs it for figures.
//!
//! `events` runs without its `--noop` build (a `bench-no-events` binary the
//! suite does not build): the rate with the chain and the verify speed.

// Test code may unwrap and panic: a failure is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

fn leasehold() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_leasehold-bench"));
    let bin = bench.with_file_name("leasehold");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace; the suite does)",
        bin.display()
    );
    bin
}

/// Run `leasehold-bench ARGS` in a scratch folder; fail with its output.
fn bench(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_leasehold-bench"))
        .arg("--leasehold")
        .arg(leasehold())
        .args(args)
        .env("BENCH_DIR", dir.path())
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "leasehold-bench {args:?} failed:\n{stdout}\n{stderr}"
    );
    assert!(
        !stdout.trim().is_empty(),
        "leasehold-bench {args:?} printed nothing"
    );
    stdout
}

#[test]
fn throughput() {
    bench(&[
        "throughput",
        "--clients",
        "2",
        "--seconds",
        "1",
        "--rounds",
        "1",
    ]);
}

#[test]
fn restart() {
    bench(&["restart", "--leases", "200", "--rounds", "1"]);
}

#[test]
fn expiry() {
    bench(&["expiry", "--leases", "200", "--rounds", "1"]);
}

#[test]
fn policy() {
    bench(&[
        "policy",
        "--workloads",
        "20",
        "--policies",
        "10",
        "--decisions",
        "500",
        "--calls-per-task",
        "2",
        "--clients",
        "2",
        "--rounds",
        "1",
        "--seconds",
        "1",
    ]);
}

#[test]
fn revoke() {
    bench(&["revoke", "--leases", "300", "--rounds", "1"]);
}

#[test]
fn events() {
    bench(&[
        "events",
        "--rounds",
        "1",
        "--seconds",
        "1",
        "--events",
        "2000",
    ]);
}

#[test]
fn postgres() {
    bench(&[
        "postgres",
        "--leases",
        "60",
        "--clients",
        "2",
        "--sessions",
        "2",
        "--rounds",
        "1",
    ]);
}

#[test]
fn disk() {
    bench(&["disk"]);
}

#[test]
fn mysql() {
    bench(&[
        "mysql",
        "--samples",
        "5",
        "--leases",
        "60",
        "--clients",
        "2",
        "--sessions",
        "2",
    ]);
}

#[test]
fn vault() {
    bench(&["vault", "--samples", "5"]);
}

#[test]
fn ha() {
    let out = bench(&[
        "ha",
        "--clients",
        "2",
        "--seconds",
        "1",
        "--rounds",
        "1",
        "--failovers",
        "1",
    ]);
    assert!(out.contains("3 on one PostgreSQL"), "{out}");
    assert!(out.contains("whole machine"), "{out}");
    assert!(out.contains("ha failover: median"), "{out}");
}

#[test]
fn proxy() {
    let out = bench(&[
        "proxy",
        "--requests",
        "20",
        "--clients",
        "4",
        "--seconds",
        "1",
        "--rounds",
        "1",
    ]);
    assert!(out.contains("added median"), "{out}");
    assert!(out.contains("requests/s through one proxy"), "{out}");
}

#[test]
fn bytes() {
    let out = bench(&["bytes", "--leases", "300", "--clients", "2"]);
    assert!(out.contains("keys and values"), "{out}");
    assert!(out.contains("event_blocks"), "{out}");
}

#[test]
fn soak() {
    let out = bench(&[
        "soak",
        "--minutes",
        "2",
        "--minute-seconds",
        "1",
        "--calibrate-seconds",
        "1",
        "--clients",
        "2",
    ]);
    assert!(out.contains("p99 last minute / first"), "{out}");
}
