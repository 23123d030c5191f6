//! The Python SDK (`sdk/python`) and its MCP gateway, tested with pytest
//! against a real `leasehold dev` (this build's binary) that the tests'
//! fixture starts on a free loopback port. Needs a Python with the SDK's
//! dependencies and test tools: `integration/test.sh` installs them (pinned)
//! into integration/.venv and sets LEASEHOLD_PYTHON.

use std::path::Path;
use std::process::Command;

fn python() -> String {
    std::env::var("LEASEHOLD_PYTHON").unwrap_or_else(|_| {
        panic!(
            "LEASEHOLD_PYTHON is not set: a Python with httpx, pydantic, mcp, pytest and mypy \
             (integration/test.sh installs them into integration/.venv and sets it; by hand: \
             python3 -m venv .venv && .venv/bin/pip install -r the pins in integration/test.sh)"
        )
    })
}

/// Run pytest on some of the SDK's test files; fail with its output.
fn pytest(files: &[&str]) {
    pytest_in("sdk/python", files, &[]);
}

/// Run pytest in `dir` (relative to the repository) on `files`.
pub(crate) fn pytest_in(dir: &str, files: &[&str], env: &[(&str, &Path)]) {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/python");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut cmd = Command::new(python());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "console_output_style=classic",
        ])
        .args(files)
        .current_dir(&root)
        .env("LEASEHOLD_BIN", env!("CARGO_BIN_EXE_leasehold"))
        .env("PYTHONPATH", sdk.join("src"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("running pytest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pytest {files:?} failed:\n{stdout}\n{stderr}"
    );
    // a run that collected nothing must not pass for one that tested
    assert!(
        stdout.contains(" passed") && !stdout.contains(" skipped"),
        "pytest {files:?}: {stdout}"
    );
}

#[test]
fn python_sdk_against_a_real_broker() {
    pytest(&[
        "tests/test_client.py",
        "tests/test_async.py",
        "tests/test_models.py",
    ]);
}

#[test]
fn python_sdk_installs_type_checks_and_retries_safely() {
    pytest(&["tests/test_package.py"]);
}

#[test]
fn mcp_gateway_with_the_official_mcp_client() {
    pytest(&["tests/test_mcp.py"]);
}
