//! Starts a real broker for a test: in process on 127.0.0.1:0 with a
//! temp-dir store (`Harness`), or as a child process of the real binary
//! (`Child`, for crash and log tests). Identities come from the same
//! bootstrap `leasehold dev` uses, so the tokens are real JWTs from a real
//! issuer and real operator tokens.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use leasehold::clock::{Clock, ManualClock, SystemClock, Timestamp};
use leasehold::config::Config;
use leasehold::dev::DevCredentials;
use leasehold::server::{Overrides, ServeError};
use leasehold_provider::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

pub struct Tokens {
    pub a: String,
    pub b: String,
    pub admin: String,
    pub responder: String,
    pub approver: String,
    pub resource: String,
    pub proxy: String,
}

impl Tokens {
    fn from(c: &DevCredentials) -> Self {
        let t = |n: &str| c.identities[n].token.clone();
        Self {
            a: t("assistant-a"),
            b: t("assistant-b"),
            admin: t("admin"),
            responder: t("responder"),
            approver: t("approver"),
            resource: t("resource-server"),
            proxy: t("proxy"),
        }
    }
}

pub struct Options {
    pub manual_clock: bool,
    pub tweak: Box<dyn Fn(&mut Config) + Send>,
    pub overrides: Box<dyn Fn() -> Overrides + Send>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            manual_clock: false,
            tweak: Box::new(|_| {}),
            overrides: Box::new(Overrides::default),
        }
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    /// `http` or `https` (when the config has TLS).
    pub scheme: &'static str,
    pub clock: Option<ManualClock>,
    pub tokens: Tokens,
    pub http: reqwest::Client,
    pub config: Config,
    opts: Options,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
    /// The store's database, when this test binary runs on PostgreSQL
    /// (`crate::ON_POSTGRES`); dropped last, after the broker.
    _pg: Option<leasehold_provider_postgres::testkit::Cluster>,
}

/// `[store.postgres]` for a test database, as node `node`.
pub fn store_section(
    pg: &leasehold_provider_postgres::PostgresConfig,
    node: &str,
) -> leasehold::config::StorePostgres {
    toml::from_str(&format!(
        "host = {:?}\nport = {}\ndatabase = {:?}\nuser = {:?}\npassword_file = {:?}\ntls = 'disable'\nnode = {node:?}\nlease_seconds = 3\npool_size = 6\n",
        pg.host,
        pg.port,
        pg.database,
        pg.user,
        pg.password_file.as_ref().unwrap()
    ))
    .unwrap()
}

/// Real time, rounded to the second (JWT times are seconds).
pub fn now_rounded() -> Timestamp {
    let ms = SystemClock.now().unix_millis();
    Timestamp::from_unix_millis(ms - ms % 1000)
}

impl Harness {
    /// A broker serving TLS with the test certificate (`serve_tls`).
    pub async fn start_tls() -> Self {
        let h = Self::start(Options {
            tweak: Box::new(serve_tls),
            ..Options::default()
        })
        .await;
        assert_eq!(h.scheme, "https");
        h
    }

    pub async fn start(opts: Options) -> Self {
        leasehold::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let clock = opts.manual_clock.then(|| ManualClock::new(now_rounded()));
        let now = clock
            .as_ref()
            .map_or_else(|| SystemClock.now(), |c| c.now());
        let (mut config, creds) = leasehold::dev::prepare(dir.path(), addr, now).unwrap();
        // this binary's store: redb, or a throwaway PostgreSQL database
        let pg = if crate::ON_POSTGRES {
            let cluster = leasehold_provider_postgres::testkit::Cluster::start();
            let conn = cluster.provision_store().await;
            config.store.backend = leasehold::config::StoreBackend::Postgres;
            config.store.postgres = Some(store_section(&conn, "harness"));
            Some(cluster)
        } else {
            None
        };
        (opts.tweak)(&mut config);
        let tls = config.server.tls.is_some();
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if tls {
            let ca = std::fs::read(fixture("tls/ca.pem")).unwrap();
            http = http.add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
        }
        let mut h = Self {
            dir,
            addr,
            scheme: if tls { "https" } else { "http" },
            clock,
            tokens: Tokens::from(&creds),
            http: http.build().unwrap(),
            config,
            opts,
            stop: None,
            join: None,
            _pg: pg,
        };
        h.launch(listener).await;
        h
    }

    async fn launch(&mut self, listener: std::net::TcpListener) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let clock: Arc<dyn Clock> = match &self.clock {
            Some(c) => Arc::new(c.clone()),
            None => Arc::new(SystemClock),
        };
        let overrides = (self.opts.overrides)();
        let fut = leasehold::server::run_with(
            listener,
            self.config.clone(),
            clock,
            async move {
                let _ = rx.await;
            },
            overrides,
        );
        self.join = Some(tokio::spawn(fut));
        self.stop = Some(tx);
        self.wait_healthy().await;
    }

    pub async fn wait_healthy(&self) {
        for _ in 0..200 {
            if let Ok(r) = self.http.get(self.url("/v1/health")).send().await
                && r.status().is_success()
            {
                return;
            }
            if self.join.as_ref().is_some_and(|j| j.is_finished()) {
                panic!("the broker exited during start-up");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("broker did not become healthy");
    }

    /// Graceful stop; returns what `run` returned.
    pub async fn stop(&mut self) -> Result<(), ServeError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.join.take() {
            Some(j) => j.await.unwrap(),
            None => Ok(()),
        }
    }

    /// Stop and start again on the same store, address and clock.
    pub async fn restart(&mut self) {
        self.stop().await.unwrap();
        let listener = std::net::TcpListener::bind(self.addr).unwrap();
        self.launch(listener).await;
    }

    /// The broker's metrics, as an admin scrapes them.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .bearer_auth(&self.tokens.admin)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        if self.scheme == "https" {
            // the test certificate names localhost and 127.0.0.1
            format!("https://localhost:{}{path}", self.addr.port())
        } else {
            format!("http://{}{path}", self.addr)
        }
    }

    pub fn advance(&self, d: Duration) {
        self.clock.as_ref().expect("manual clock").advance(d);
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        token: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, self.url(path));
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get(&self, token: &str, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, token, path, None).await
    }

    pub async fn post(&self, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, token, path, Some(body))
            .await
    }

    pub async fn post_empty(&self, token: &str, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, token, path, None).await
    }

    /// Open a task as `token`; returns its id.
    pub async fn open_task(&self, token: &str, ttl: i64) -> String {
        let (s, v) = self
            .post(token, "/v1/tasks", json!({"purpose": "test", "on_behalf_of": "alice@example.com", "prompt": "do the thing", "tools": ["demo.read"], "ttl_seconds": ttl}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["task_id"].as_str().unwrap().to_owned()
    }

    /// Lease a demo token; returns the whole response (with `credential`).
    pub async fn lease(&self, token: &str, task: &str, ttl: i64) -> Value {
        let (s, v) = self
            .post(
                token,
                &format!("/v1/tasks/{task}/leases"),
                json!({"provider": "token", "role": "demo", "ttl_seconds": ttl}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v
    }

    pub async fn introspect(&self, token: &str) -> bool {
        let resp = self
            .http
            .post(self.url("/v1/introspect"))
            .bearer_auth(&self.tokens.resource)
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json::<Value>().await.unwrap()["active"]
            .as_bool()
            .unwrap()
    }

    pub async fn lease_state(&self, lease: &str) -> String {
        let (s, v) = self
            .get(&self.tokens.admin, &format!("/v1/leases/{lease}"))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["state"].as_str().unwrap().to_owned()
    }

    /// Poll until the lease reaches `state` (the reaper runs in the background).
    pub async fn wait_state(&self, lease: &str, state: &str) {
        for _ in 0..400 {
            if self.lease_state(lease).await == state {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "lease {lease} never reached {state}; it is {}",
            self.lease_state(lease).await
        );
    }

    /// Every lease as (id, state), via the admin API: a snapshot to compare.
    pub async fn snapshot(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/leases?limit=1000&cursor={c}"),
                None => "/v1/leases?limit=1000".to_owned(),
            };
            let (s, v) = self.get(&self.tokens.admin, &path).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            for l in v["leases"].as_array().unwrap() {
                out.push((
                    l["lease_id"].as_str().unwrap().to_owned(),
                    l["state"].as_str().unwrap().to_owned(),
                ));
            }
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return out,
            }
        }
    }

    /// Sign a workload token with the dev issuer's key (for bad-token tests).
    pub fn mint(&self, claims: &Value) -> String {
        mint_in(self.dir.path(), claims)
    }
}

/// Add a policy permitting the dev assistants leases of `provider`.
pub fn permit_leases(c: &mut Config, provider: &str) {
    let text = format!(
        "@id(\"test-{provider}\")\npermit (principal in Leasehold::Group::\"assistants\", action == Leasehold::Action::\"Lease\", resource)\nwhen {{ resource.provider == \"{provider}\" }};\n"
    );
    std::fs::write(c.policy.dir.join(format!("test-{provider}.cedar")), text).unwrap();
}

/// A file under `integration/fixtures/`.
/// Serve TLS with the test certificate (`tls/server.pem`, signed by
/// `tls/ca.pem`, which the harness's client then trusts).
pub fn serve_tls(c: &mut Config) {
    c.server.tls = Some(leasehold::config::TlsConfig {
        cert_file: fixture("tls/server.pem"),
        key_file: fixture("tls/server.key"),
        request_client_certificates: None,
    });
}

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("integration/fixtures")
        .join(rel)
}

pub fn mint_in(dir: &Path, claims: &Value) -> String {
    let doc = std::fs::read(dir.join("dev-issuer.pk8")).unwrap();
    let key = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&doc).unwrap();
    leasehold::dev::sign_jwt(&key, "dev-issuer-1", claims)
}

/// Claims of a valid dev workload token at `now`.
pub fn claims(sub: &str, now: Timestamp) -> Value {
    let t = now.unix_seconds();
    json!({"iss": leasehold::dev::DEV_ISSUER, "sub": sub, "aud": leasehold::dev::DEV_AUDIENCE, "iat": t, "nbf": t, "exp": t + 3600, "tenant": "dev"})
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

// === a provider whose peer can go down ===

/// A provider whose credentials live in a set; its "peer" can be down.
#[derive(Debug, Default)]
pub struct Flaky {
    pub down: AtomicBool,
    pub live: Mutex<HashSet<String>>,
    pub revoke_calls: AtomicU32,
    /// When non-zero: revocations after this many calls fail as if the
    /// peer went down half-way (until it is set back to zero).
    pub fail_after: AtomicU32,
    /// When set, `issue` signals `entered` and waits for `release`: a
    /// credential in flight between the provider and its activation.
    pub hold_issue: AtomicBool,
    pub entered: tokio::sync::Notify,
    pub release: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl Provider for Flaky {
    fn describe(&self) -> Description {
        Description {
            kind: "flaky",
            roles: vec![RoleInfo {
                name: "r".into(),
                max_ttl: Duration::from_secs(3600),
                description: String::new(),
            }],
            revocation: "removes the credential from the set".into(),
        }
    }
    fn validate(&self, role: &str, _: &[String]) -> Result<Duration, ProviderError> {
        if role == "r" {
            Ok(Duration::from_secs(3600))
        } else {
            Err(ProviderError::invalid("no such role"))
        }
    }
    async fn health(&self) -> Result<(), ProviderError> {
        if self.down.load(Ordering::SeqCst) {
            Err(ProviderError::retryable("peer down"))
        } else {
            Ok(())
        }
    }
    async fn issue(&self, spec: &LeaseSpec) -> Result<Issued, ProviderError> {
        self.live.lock().unwrap().insert(spec.lease_id.clone());
        if self.hold_issue.load(Ordering::SeqCst) {
            // wait on `release` before telling the test we are here: a
            // `notify_waiters` between the two would otherwise find no
            // waiter and leave this issue held forever
            let released = self.release.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            self.entered.notify_one();
            if self.hold_issue.load(Ordering::SeqCst) {
                released.await;
            }
        }
        Ok(Issued {
            credential: Credential::new().secret("key", format!("flaky-secret-{}", spec.lease_id)),
            handle: RevocationHandle::new(spec.lease_id.as_bytes().to_vec()),
            expires_at: spec.expires_at,
            description: "flaky".into(),
        })
    }
    async fn revoke(&self, lease: &RevokeSpec) -> Result<(), ProviderError> {
        let n = self.revoke_calls.fetch_add(1, Ordering::SeqCst);
        let after = self.fail_after.load(Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) || (after > 0 && n >= after) {
            return Err(ProviderError::retryable("peer down"));
        }
        self.live
            .lock()
            .unwrap()
            .remove(std::str::from_utf8(lease.handle.as_bytes()).unwrap());
        Ok(())
    }
    async fn rollback(&self, spec: &LeaseSpec) -> Result<(), ProviderError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(ProviderError::retryable("peer down"));
        }
        self.live.lock().unwrap().remove(&spec.lease_id);
        Ok(())
    }
}

// === child processes ===

/// The real `leasehold` binary serving a config file, its stderr captured.
pub struct Child {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

/// JSON calls to a broker running as a child process.
pub struct Remote {
    pub http: reqwest::Client,
    pub base: String,
}

impl Remote {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            http: client(),
            base: format!("http://{addr}"),
        }
    }

    pub async fn post(&self, token: &str, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.unwrap().json().await.unwrap()
    }

    pub async fn get(&self, token: &str, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// RFC 7662, as a resource server.
    pub async fn active(&self, resource_token: &str, token: &str) -> bool {
        let v: Value = self
            .http
            .post(format!("{}/v1/introspect", self.base))
            .bearer_auth(resource_token)
            .form(&[("token", token)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["active"].as_bool().unwrap()
    }
}

/// Ask a broker started with `fault.pause_after_issue_file = marker` for a
/// lease: it mints the credential, writes it to `marker` and hangs before
/// activation. Returns the request (never answered) and what was written.
pub async fn lease_until_paused(
    remote: &Remote,
    token: &str,
    task_id: &str,
    body: Value,
    marker: &Path,
) -> (
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
    Value,
) {
    let pending = {
        let (http, token, url) = (
            remote.http.clone(),
            token.to_owned(),
            format!("{}/v1/tasks/{task_id}/leases", remote.base),
        );
        tokio::spawn(async move { http.post(url).bearer_auth(token).json(&body).send().await })
    };
    for _ in 0..1000 {
        if let Ok(text) = std::fs::read_to_string(marker)
            && let Ok(v) = serde_json::from_str::<Value>(&text)
        {
            return (pending, v);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the broker never reached the point between issue and activation");
}

/// An HTTP client for tests (installs the crypto provider first).
pub fn client() -> reqwest::Client {
    leasehold::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Write keys and credentials into `dir` (as `dev` does) and the matching
/// `serve` config, after `tweak`.
pub fn child_config(
    dir: &Path,
    addr: SocketAddr,
    tweak: impl FnOnce(&mut Config),
) -> (PathBuf, DevCredentials) {
    let (mut config, creds) = leasehold::dev::prepare(dir, addr, SystemClock.now()).unwrap();
    config.server.shutdown_grace_seconds = 5;
    tweak(&mut config);
    let path = dir.join("leasehold.toml");
    std::fs::write(&path, config.to_toml().unwrap()).unwrap();
    (path, creds)
}

/// A real `leasehold serve` child process on a fresh data folder, healthy.
pub struct Spawned {
    /// Holds the data folder and the log; removed on drop.
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub creds: DevCredentials,
    pub log: PathBuf,
    pub remote: Remote,
    pub child: Child,
}

pub async fn spawn_broker(
    tweak: impl FnOnce(&mut Config),
    rust_log: &str,
    extra: &[&str],
) -> Spawned {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let addr = free_port();
    let (config, creds) = child_config(&data, addr, tweak);
    let log = dir.path().join("broker.log");
    let remote = Remote::new(addr);
    let mut child = Child::spawn_with(&config, addr, log.clone(), rust_log, extra);
    child.wait_healthy(&remote.http).await;
    Spawned {
        dir,
        data,
        addr,
        config,
        creds,
        log,
        remote,
        child,
    }
}

impl Child {
    pub fn spawn(config: &Path, addr: SocketAddr, log: PathBuf, rust_log: &str) -> Self {
        Self::spawn_with(config, addr, log, rust_log, &[])
    }

    /// With extra arguments to `serve` (e.g. `--log-format json`).
    pub fn spawn_with(
        config: &Path,
        addr: SocketAddr,
        log: PathBuf,
        rust_log: &str,
        extra: &[&str],
    ) -> Self {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
            .args(["serve", "-c"])
            .arg(config)
            .args(extra)
            .env("RUST_LOG", rust_log)
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        Self { child, addr, log }
    }

    pub async fn wait_healthy(&mut self, http: &reqwest::Client) {
        for _ in 0..400 {
            if let Ok(r) = http
                .get(format!("http://{}/v1/health", self.addr))
                .send()
                .await
                && r.status().is_success()
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "leasehold exited during start-up ({status}); log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "leasehold did not become healthy; log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL on unix
        self.child.wait().unwrap();
    }

    /// Send SIGTERM and return at once.
    pub fn sigterm(&self) {
        let pid = self.child.id().to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.sigterm();
        for _ in 0..300 {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill().unwrap();
        panic!("leasehold did not exit within 6 s of SIGTERM");
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
