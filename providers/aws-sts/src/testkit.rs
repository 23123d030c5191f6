//! A throwaway moto server (AWS's API, wire format only) for tests, on a
//! free loopback port, stopped by its PID on drop.
//!
//! The binary is `LEASEHOLD_MOTO_BIN` (the test script installs
//! `moto[server]` from PyPI and sets it), else `moto_server` on `PATH`.
//! Without it a test fails saying how to get it; it never skips.

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_credential_types::Credentials;

/// A leased credential as SDK credentials, to use it at the wire.
pub fn lease_credentials(c: &leasehold_provider::Credential) -> Credentials {
    Credentials::new(
        c.expose("access_key_id").expect("access_key_id"),
        c.expose("secret_access_key").expect("secret_access_key"),
        Some(c.expose("session_token").expect("session_token").to_owned()),
        None,
        "lease",
    )
}

fn binary() -> PathBuf {
    if let Some(p) = leasehold_provider::find_program("LEASEHOLD_MOTO_BIN", "moto_server") {
        return p;
    }
    panic!(
        "moto's `moto_server` not found. `integration/test.sh` installs it (PyPI: moto[server] \
         into a virtual environment); by hand: `python3 -m venv .venv && .venv/bin/pip install \
         'moto[server]'`, then set LEASEHOLD_MOTO_BIN=.venv/bin/moto_server"
    );
}

#[derive(Debug)]
pub struct Moto {
    pub port: u16,
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

/// moto's default account.
pub const ACCOUNT: &str = "123456789012";

impl Moto {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary().display()));
        let mut m = Self {
            port,
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(s) = m.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("moto_server exited ({s}): {}", m.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen: {}",
                m.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// The broker's credentials at moto (any are accepted).
    pub fn credentials() -> Credentials {
        Credentials::new(
            "AKIDLEASEHOLDTEST",
            "leasehold-test-secret",
            None,
            None,
            "moto",
        )
    }

    /// An IAM client against this server.
    pub async fn iam(&self) -> aws_sdk_iam::Client {
        let conf =
            crate::sdk_config("us-east-1", Some(&self.endpoint()), Self::credentials()).await;
        aws_sdk_iam::Client::new(&conf)
    }

    /// Create an IAM role (trust: this account) and return its ARN.
    pub async fn create_role(&self, name: &str) -> String {
        let trust = format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::{ACCOUNT}:root"}},"Action":["sts:AssumeRole","sts:TagSession","sts:SetSourceIdentity"]}}]}}"#
        );
        let out = self
            .iam()
            .await
            .create_role()
            .role_name(name)
            .assume_role_policy_document(trust)
            .max_session_duration(3600)
            .send()
            .await
            .unwrap();
        out.role().unwrap().arn().to_owned()
    }

    /// Stop the server (SIGKILL by PID).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}
