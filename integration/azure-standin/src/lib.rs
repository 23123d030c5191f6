//! Test peers for leasehold's Azure provider. No emulator exists for Entra
//! ID, Azure Resource Manager or Microsoft Graph, so the tests run against:
//!
//! - **Entra's token endpoint**: `oauth2-mock-server` from npm, started by
//!   [`Peers::start`] through `integration/azure/token-server.mjs`, over
//!   HTTPS (azure_identity refuses a plain-text authority host) with a
//!   certificate from a test CA generated here. Who may log in comes from
//!   a registry file this crate keeps: the broker's own app, four workload
//!   service principals, and every password the Graph stand-in adds.
//! - **ARM and Graph**: an HTTPS server in this process that follows their
//!   documented shapes for what the provider calls: role assignments
//!   (`PUT`/`GET`/`DELETE .../providers/Microsoft.Authorization/roleAssignments/{guid}`,
//!   api-version 2022-04-01), caller permissions at a scope
//!   (`GET .../providers/Microsoft.Authorization/permissions`), and an
//!   application's passwords (`POST /v1.0/applications/{id}/addPassword`
//!   and `removePassword`, `GET /v1.0/applications/{id}`), with their status
//!   codes, error bodies and `Retry-After` on throttling. Every request's
//!   bearer token is checked against the token endpoint's keys (`/jwks`),
//!   its audience, tenant and expiry.
//!
//! What this cannot reproduce is listed in `integration/azure/README.md`.
//!
//! Faults for tests: throttling ([`Peers::throttle`]), a delay before a new
//! assignment is readable ([`Peers::propagation_delay`]), the token endpoint
//! stopped and started again ([`Peers::stop_token_endpoint`]).

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]
// A peer keeps Azure's time, not the broker's injected clock.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// Azure's built-in role definitions the stand-in knows (id, name, actions).
pub const READER: &str = "acdd72a7-3385-48ef-bd42-f606fba81ae7";
pub const CONTRIBUTOR: &str = "b24988ac-6180-42a0-ab88-20f7382dd24c";
pub const USER_ACCESS_ADMINISTRATOR: &str = "18d7d88d-d35e-4fb5-a5c3-7773c20a72d9";
/// Audiences of the two control planes and of the resource the
/// `access_token` tests lease tokens for.
pub const ARM_AUDIENCE: &str = "https://management.azure.com";
pub const GRAPH_AUDIENCE: &str = "https://graph.microsoft.com";
pub const STORAGE_AUDIENCE: &str = "https://storage.azure.com";
/// The only api-version the role-assignment stand-in accepts.
pub const ARM_API_VERSION: &str = "2022-04-01";

const ROLE_DEFS: &[(&str, &str, &[&str])] = &[
    (READER, "Reader", &["*/read"]),
    (CONTRIBUTOR, "Contributor", &["*"]),
    (
        USER_ACCESS_ADMINISTRATOR,
        "User Access Administrator",
        &["*/read", "Microsoft.Authorization/*"],
    ),
];

/// An app registration with its service principal and one secret.
#[derive(Clone, Debug)]
pub struct Client {
    pub client_id: String,
    pub object_id: String,
    pub secret: String,
}

#[derive(Clone, Debug)]
struct Assignment {
    name: String,
    scope: String,
    role_definition_id: String,
    principal_id: String,
    principal_type: String,
    condition: Option<String>,
    condition_version: Option<String>,
    description: Option<String>,
    created: String,
    readable_at: Instant,
}

#[derive(Clone, Debug)]
struct Password {
    key_id: String,
    display_name: Option<String>,
    hint: String,
    start: String,
    end: String,
    end_unix: i64,
    sha256: String,
}

#[derive(Debug)]
struct App {
    app_id: String,
    owners: Vec<String>,
    passwords: Vec<Password>,
}

#[derive(Debug, Default)]
struct Faults {
    throttle: u32,
    retry_after: String,
    propagation: Duration,
}

/// One request the stand-in answered.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub status: u16,
}

struct Inner {
    tenant: String,
    subscription: String,
    authority: String,
    clients: Vec<Client>,
    federated: BTreeMap<String, Vec<(String, String)>>,
    assignments: BTreeMap<String, Assignment>,
    apps: BTreeMap<String, App>,
    lifetimes: BTreeMap<String, u64>,
    faults: Faults,
    seen: Vec<Seen>,
    keys: Vec<(String, jsonwebtoken::DecodingKey)>,
    registry: PathBuf,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

type Shared = Arc<Mutex<Inner>>;

/// The running peers. Everything stops on drop.
pub struct Peers {
    pub tenant_id: String,
    pub subscription_id: String,
    /// The broker's own app registration (owner of [`Peers::app`], User
    /// Access Administrator on the subscription).
    pub broker: Client,
    /// Four workload service principals with no role anywhere.
    pub workloads: Vec<Client>,
    /// The application whose passwords `app_password` leases (object id,
    /// app id).
    pub app_object_id: String,
    pub app_client_id: String,
    /// `https://127.0.0.1:PORT`: the authority host (token endpoint).
    pub authority: String,
    /// `https://127.0.0.1:PORT`: ARM and Graph.
    pub endpoint: String,
    /// The test CA's certificate (PEM file) both servers chain to.
    pub ca_file: PathBuf,
    token_port: u16,
    token: Option<Child>,
    token_log: PathBuf,
    dir: tempfile::TempDir,
    inner: Shared,
    server: axum_server::Handle<std::net::SocketAddr>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("authority", &self.authority)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

fn guid() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    leasehold_provider_azure::config::guid(b, 4)
}

fn secret() -> String {
    let mut b = [0u8; 30];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn node() -> PathBuf {
    leasehold_provider::find_program("LEASEHOLD_NODE_BIN", "node").unwrap_or_else(|| {
        panic!(
            "`node` not found: the Azure tests run Entra's token endpoint stand-in \
             (oauth2-mock-server) on Node.js 20.19 or later. Install it (apt-get install nodejs \
             npm) or set LEASEHOLD_NODE_BIN"
        )
    })
}

/// `integration/azure`, where token-server.mjs and its node_modules are.
fn script_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../azure");
    if !dir.join("node_modules/oauth2-mock-server").is_dir() {
        panic!(
            "oauth2-mock-server is not installed in {}: `integration/test.sh` installs it; by \
             hand: `npm ci --prefix integration/azure`",
            dir.display()
        );
    }
    dir
}

fn write_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "leasehold Azure stand-in test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "leasehold Azure stand-in");
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let (ca_path, cert_path, key_path) = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (ca_path, cert_path, key_path)
}

impl Peers {
    /// Generate the test CA, start the token endpoint and the ARM/Graph
    /// stand-in, each on a free loopback port.
    pub async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let (ca_file, cert, key) = write_ca(dir.path());
        let client = || Client {
            client_id: guid(),
            object_id: guid(),
            secret: secret(),
        };
        let (broker, workloads) = (client(), (0..4).map(|_| client()).collect::<Vec<_>>());
        let tenant = guid();
        let subscription = guid();
        let (app_object_id, app_client_id) = (guid(), guid());
        let mut assignments = BTreeMap::new();
        let sub_scope = format!("/subscriptions/{subscription}");
        let uaa_name = guid();
        assignments.insert(
            assignment_key(&sub_scope, &uaa_name),
            Assignment {
                name: uaa_name,
                scope: sub_scope,
                role_definition_id: USER_ACCESS_ADMINISTRATOR.into(),
                principal_id: broker.object_id.clone(),
                principal_type: "ServicePrincipal".into(),
                condition: None,
                condition_version: None,
                description: Some("the broker's own grant".into()),
                created: rfc3339(time::OffsetDateTime::now_utc()),
                readable_at: Instant::now(),
            },
        );
        let mut apps = BTreeMap::new();
        apps.insert(
            app_object_id.clone(),
            App {
                app_id: app_client_id.clone(),
                owners: vec![broker.object_id.clone()],
                passwords: Vec::new(),
            },
        );
        let registry = dir.path().join("registry.json");
        let inner = Arc::new(Mutex::new(Inner {
            tenant: tenant.clone(),
            subscription: subscription.clone(),
            authority: String::new(),
            clients: std::iter::once(&broker)
                .chain(&workloads)
                .cloned()
                .collect(),
            federated: BTreeMap::new(),
            assignments,
            apps,
            lifetimes: BTreeMap::new(),
            faults: Faults::default(),
            seen: Vec::new(),
            keys: Vec::new(),
            registry: registry.clone(),
        }));
        inner.lock().unwrap().write_registry();

        let http = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(&std::fs::read(&ca_file).unwrap()).unwrap(),
            )
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();

        // ARM and Graph
        let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(&cert, &key)
            .await
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = axum_server::Handle::new();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let h = server.clone();
        tokio::spawn(async move {
            axum_server::from_tcp_rustls(listener, tls)
                .unwrap()
                .handle(h)
                .serve(app.into_make_service())
                .await
                .unwrap();
        });

        let token_log = dir.path().join("token-server.log");
        let mut peers = Self {
            tenant_id: tenant,
            subscription_id: subscription,
            broker,
            workloads,
            app_object_id,
            app_client_id,
            authority: String::new(),
            endpoint: format!("https://127.0.0.1:{}", addr.port()),
            ca_file,
            token_port: 0,
            token: None,
            token_log,
            dir,
            inner,
            server,
            http,
        };
        peers.spawn_token_endpoint(&cert, &key, 0);
        peers.authority = format!("https://127.0.0.1:{}", peers.token_port);
        peers.inner.lock().unwrap().authority = peers.authority.clone();
        peers.refresh_keys().await;
        peers
    }

    fn spawn_token_endpoint(&mut self, cert: &Path, key: &Path, port: u16) {
        let log = std::fs::File::create(&self.token_log).unwrap();
        let mut child = Command::new(node())
            .current_dir(script_dir())
            .arg("token-server.mjs")
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg("--registry")
            .arg(self.dir.path().join("registry.json"))
            .arg("--port")
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", node().display()));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: Value = serde_json::from_str(line.trim()).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!(
                "the token endpoint did not start: {}",
                std::fs::read_to_string(&self.token_log).unwrap_or_default()
            )
        });
        self.token_port = u16::try_from(port["port"].as_u64().unwrap()).unwrap();
        self.token = Some(child);
    }

    async fn refresh_keys(&self) {
        let jwks: Value = self
            .http
            .get(format!("{}/jwks", self.authority))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let keys = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(k.clone()).unwrap();
                (
                    jwk.common.key_id.clone().unwrap_or_default(),
                    jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
                )
            })
            .collect::<Vec<_>>();
        // tokens signed before a restart stay valid, as Entra's do across
        // key rollover until they expire
        self.inner.lock().unwrap().keys.extend(keys);
    }

    /// The token endpoint's log (stderr), for failure messages.
    pub fn token_log(&self) -> String {
        std::fs::read_to_string(&self.token_log).unwrap_or_default()
    }

    /// Stop the token endpoint (SIGKILL by its PID): Entra unreachable.
    pub fn stop_token_endpoint(&mut self) {
        if let Some(mut c) = self.token.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port, with new signing keys.
    pub async fn restart_token_endpoint(&mut self) {
        self.stop_token_endpoint();
        let (cert, key) = (
            self.dir.path().join("server.pem"),
            self.dir.path().join("server.key"),
        );
        self.spawn_token_endpoint(&cert, &key, self.token_port);
        self.refresh_keys().await;
    }

    /// The next `n` ARM and Graph requests get 429 with this `Retry-After`.
    pub fn throttle(&self, n: u32, retry_after: &str) {
        let mut i = self.inner.lock().unwrap();
        i.faults.throttle = n;
        i.faults.retry_after = retry_after.to_owned();
    }

    /// New role assignments answer 404 to reads for this long (ARM's
    /// replication delay).
    pub fn propagation_delay(&self, d: Duration) {
        self.inner.lock().unwrap().faults.propagation = d;
    }

    /// Tokens for this resource (audience) live this long.
    pub fn token_lifetime(&self, audience: &str, seconds: u64) {
        let mut i = self.inner.lock().unwrap();
        i.lifetimes.insert(audience.to_owned(), seconds);
        i.write_registry();
    }

    /// Let an assertion with this issuer and subject log in as `client_id`
    /// (workload identity federation).
    pub fn federate(&self, client_id: &str, issuer: &str, subject: &str) {
        let mut i = self.inner.lock().unwrap();
        i.federated
            .entry(client_id.to_owned())
            .or_default()
            .push((issuer.to_owned(), subject.to_owned()));
        i.write_registry();
    }

    /// Every request answered so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.inner.lock().unwrap().seen.clone()
    }

    /// A leasehold `type = "azure"` provider table (TOML, without `type`)
    /// for these peers: the broker signs in with its client secret (written
    /// to `secret_file`); the workloads `test:assistant-0` to `-3` (and
    /// `dev:assistant-a`, the dev broker's, as number 0) are mapped to the
    /// four workload principals; `entra:` subjects are principals; roles
    /// `reader` (Reader on `rg-reports` or any `rg-team-*`), `fixed` (Reader
    /// on `rg-fixed`), `app` (a password on [`Peers::app_object_id`]) and
    /// `storage` (a storage access token).
    pub fn provider_toml(&self, secret_file: &Path) -> String {
        std::fs::write(secret_file, format!("{}\n", self.broker.secret)).unwrap();
        let reader = self.role_definition(READER);
        let sub = &self.subscription_id;
        let w = |i: usize| &self.workloads[i].object_id;
        format!(
            r#"
            tenant_id = "{tenant}"
            authority_host = "{authority}"
            arm_endpoint = "{endpoint}"
            graph_endpoint = "{endpoint}"
            ca_file = "{ca}"
            max_attempts = 3
            max_retry_after_seconds = 5
            propagation_timeout_seconds = 5
            principal_from_subject = ["entra"]
            auth = {{ method = "client_secret", client_id = "{client}", client_secret_file = "{secret}" }}
            [workload_principals]
            "dev:assistant-a" = "{w0}"
            "test:assistant-0" = "{w0}"
            "test:assistant-1" = "{w1}"
            "test:assistant-2" = "{w2}"
            "test:assistant-3" = "{w3}"
            [roles.reader]
            mode = "role_assignment"
            max_ttl_seconds = 3600
            role_definition_id = "{reader}"
            scope = "/subscriptions/{sub}/resourceGroups/{{{{scope}}}}"
            scopes = ["rg-reports", "rg-team-*"]
            [roles.fixed]
            mode = "role_assignment"
            max_ttl_seconds = 3600
            role_definition_id = "{reader}"
            scope = "/subscriptions/{sub}/resourceGroups/rg-fixed"
            [roles.app]
            mode = "app_password"
            max_ttl_seconds = 3600
            application_object_id = "{app}"
            application_client_id = "{app_client}"
            [roles.storage]
            mode = "access_token"
            max_ttl_seconds = 3600
            resource_scope = "{STORAGE_AUDIENCE}/.default"
            "#,
            tenant = self.tenant_id,
            authority = self.authority,
            endpoint = self.endpoint,
            ca = self.ca_file.display(),
            client = self.broker.client_id,
            secret = secret_file.display(),
            w0 = w(0),
            w1 = w(1),
            w2 = w(2),
            w3 = w(3),
            app = self.app_object_id,
            app_client = self.app_client_id,
        )
    }

    /// `/subscriptions/{id}/resourceGroups/{rg}`.
    pub fn resource_group(&self, rg: &str) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{rg}",
            self.subscription_id
        )
    }

    /// A full role definition id for a built-in role.
    pub fn role_definition(&self, guid: &str) -> String {
        format!(
            "/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions/{guid}",
            self.subscription_id
        )
    }

    /// Create a role assignment out of band (as another admin would).
    pub fn assign(&self, scope: &str, name: &str, role: &str, principal: &str) {
        self.assign_described(scope, name, role, principal, "created out of band");
    }

    /// The same, with a description of the caller's choosing.
    pub fn assign_described(
        &self,
        scope: &str,
        name: &str,
        role: &str,
        principal: &str,
        description: &str,
    ) {
        let mut i = self.inner.lock().unwrap();
        i.assignments.insert(
            assignment_key(scope, name),
            Assignment {
                name: name.into(),
                scope: scope.into(),
                role_definition_id: role.into(),
                principal_id: principal.into(),
                principal_type: "ServicePrincipal".into(),
                condition: None,
                condition_version: None,
                description: Some(description.into()),
                created: rfc3339(time::OffsetDateTime::now_utc()),
                readable_at: Instant::now(),
            },
        );
    }

    /// Delete a role assignment out of band; true if it existed.
    pub fn unassign(&self, scope: &str, name: &str) -> bool {
        self.inner
            .lock()
            .unwrap()
            .assignments
            .remove(&assignment_key(scope, name))
            .is_some()
    }

    /// Role assignments as (scope, name, role guid, principal).
    pub fn assignments(&self) -> Vec<(String, String, String, String)> {
        self.inner
            .lock()
            .unwrap()
            .assignments
            .values()
            .map(|a| {
                (
                    a.scope.clone(),
                    a.name.clone(),
                    a.role_definition_id.clone(),
                    a.principal_id.clone(),
                )
            })
            .collect()
    }

    /// The application's passwords as (key id, display name, end time).
    pub fn passwords(&self) -> Vec<(String, Option<String>, String)> {
        self.inner.lock().unwrap().apps[&self.app_object_id]
            .passwords
            .iter()
            .map(|p| (p.key_id.clone(), p.display_name.clone(), p.end.clone()))
            .collect()
    }

    /// Remove a password out of band; true if it existed.
    pub fn remove_password(&self, key_id: &str) -> bool {
        let mut i = self.inner.lock().unwrap();
        let app = i.apps.get_mut(&self.app_object_id).unwrap();
        let before = app.passwords.len();
        app.passwords.retain(|p| p.key_id != key_id);
        let removed = app.passwords.len() != before;
        i.write_registry();
        removed
    }

    /// A client-credentials token for `client_id` with `secret`, as any
    /// Entra client gets one: `Ok(token)` or `Err((status, error body))`.
    pub async fn login(
        &self,
        client_id: &str,
        secret: &str,
        scope: &str,
    ) -> Result<String, (u16, String)> {
        let r = self
            .http
            .post(format!(
                "{}/{}/oauth2/v2.0/token",
                self.authority, self.tenant_id
            ))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_secret", secret),
                ("scope", scope),
            ])
            .send()
            .await
            .map_err(|e| (0, e.to_string()))?;
        let status = r.status().as_u16();
        let body = r.text().await.map_err(|e| (status, e.to_string()))?;
        if status != 200 {
            return Err((status, body));
        }
        let v: Value = serde_json::from_str(&body).map_err(|e| (status, e.to_string()))?;
        Ok(v["access_token"].as_str().unwrap_or_default().to_owned())
    }

    /// The actions `token`'s principal may perform at `scope`, from ARM's
    /// permissions API (`Err(status)` when ARM refuses the token).
    pub async fn permissions(&self, token: &str, scope: &str) -> Result<Vec<String>, u16> {
        let r = self
            .http
            .get(format!(
                "{}{scope}/providers/Microsoft.Authorization/permissions?api-version={ARM_API_VERSION}",
                self.endpoint
            ))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|_| 0u16)?;
        if r.status() != 200 {
            return Err(r.status().as_u16());
        }
        let v: Value = r.json().await.map_err(|_| 0u16)?;
        Ok(v["value"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["actions"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect())
    }

    /// Does the storage stand-in accept this token right now?
    pub async fn storage_accepts(&self, token: &str) -> Result<bool, String> {
        let r = self
            .http
            .get(format!("{}/_standin/storage", self.endpoint))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        match r.status().as_u16() {
            200 => Ok(true),
            401 => Ok(false),
            s => Err(format!("storage stand-in answered {s}")),
        }
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        self.stop_token_endpoint();
        self.server.shutdown();
    }
}

fn assignment_key(scope: &str, name: &str) -> String {
    format!(
        "{}|{}",
        scope.to_ascii_lowercase(),
        name.to_ascii_lowercase()
    )
}

impl Inner {
    /// The token endpoint's view: tenants, clients, secrets (hashed).
    fn write_registry(&self) {
        let mut clients = serde_json::Map::new();
        for c in &self.clients {
            clients.insert(
                c.client_id.clone(),
                json!({
                    "object_id": c.object_id,
                    "secrets": [{"sha256": sha256_hex(&c.secret), "end": 9_999_999_999i64}],
                    "federated": self.federated.get(&c.client_id).into_iter().flatten()
                        .map(|(i, s)| json!({"issuer": i, "subject": s})).collect::<Vec<_>>(),
                }),
            );
        }
        for (object_id, app) in &self.apps {
            clients.insert(
                app.app_id.clone(),
                json!({
                    "object_id": format!("sp-{object_id}"),
                    "secrets": app.passwords.iter()
                        .map(|p| json!({"sha256": p.sha256, "end": p.end_unix}))
                        .collect::<Vec<_>>(),
                }),
            );
        }
        let reg = json!({
            "tenants": { self.tenant.clone(): { "clients": clients } },
            "lifetimes": self.lifetimes,
        });
        let tmp = self.registry.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&reg).unwrap()).unwrap();
        std::fs::rename(&tmp, &self.registry).unwrap();
    }

    /// The caller's object id, if the token is valid for `audience`.
    fn caller(&self, headers: &HeaderMap, audience: &str) -> Result<String, String> {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or("no bearer token")?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        let kid = header.kid.unwrap_or_default();
        let key = self
            .keys
            .iter()
            .find(|(k, _)| *k == kid)
            .map(|(_, k)| k)
            .ok_or("signed with a key the token endpoint does not have")?;
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        v.set_audience(&[audience]);
        v.leeway = 0;
        let data = jsonwebtoken::decode::<Value>(token, key, &v).map_err(|e| e.to_string())?;
        let c = data.claims;
        if c["tid"] != self.tenant.as_str() {
            return Err("token from another tenant".into());
        }
        if !c["iss"]
            .as_str()
            .is_some_and(|i| i.starts_with("https://localhost:") || i.starts_with(&self.authority))
        {
            return Err("token from another issuer".into());
        }
        c["oid"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| "token without oid".into())
    }

    /// Actions granted to `principal` at `scope` (by assignments at it or
    /// above it).
    fn actions(&self, principal: &str, scope: &str) -> Vec<String> {
        let scope = scope.to_ascii_lowercase();
        let now = Instant::now();
        self.assignments
            .values()
            .filter(|a| a.principal_id == principal && now >= a.readable_at)
            .filter(|a| {
                let s = a.scope.to_ascii_lowercase();
                scope == s || scope.starts_with(&format!("{s}/"))
            })
            .flat_map(|a| {
                let guid = a.role_definition_id.rsplit('/').next().unwrap_or_default();
                ROLE_DEFS
                    .iter()
                    .find(|(id, _, _)| *id == guid)
                    .map(|(_, _, acts)| acts.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .collect()
    }
}

fn glob(pattern: &str, action: &str) -> bool {
    let (p, a) = (pattern.to_ascii_lowercase(), action.to_ascii_lowercase());
    match p.split_once('*') {
        None => p == a,
        Some((pre, post)) => {
            a.len() >= pre.len() + post.len() && a.starts_with(pre) && a.ends_with(post)
        }
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

fn graph_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {
            "code": code,
            "message": message,
            "innerError": {"date": rfc3339(time::OffsetDateTime::now_utc()),
                           "request-id": guid(), "client-request-id": guid()}
        }})),
    )
        .into_response()
}

async fn handle(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let query = uri.query().unwrap_or_default().to_owned();
    let mut i = inner.lock().unwrap();
    let r = answer(&mut i, &method, &path, &query, &headers, &body);
    i.seen.push(Seen {
        at: Instant::now(),
        method: method.to_string(),
        path,
        status: r.status().as_u16(),
    });
    r
}

fn answer(
    i: &mut Inner,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    if path == "/_standin/storage" {
        return match i.caller(headers, STORAGE_AUDIENCE) {
            Ok(oid) => axum::Json(json!({"oid": oid})).into_response(),
            Err(m) => error(StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken", &m),
        };
    }
    let graph = path.starts_with("/v1.0/");
    if i.faults.throttle > 0 {
        i.faults.throttle -= 1;
        let mut r = if graph {
            graph_error(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "Too many requests.",
            )
        } else {
            error(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "The request is being throttled.",
            )
        };
        r.headers_mut()
            .insert("retry-after", i.faults.retry_after.parse().unwrap());
        return r;
    }
    if graph {
        let caller = match i.caller(headers, GRAPH_AUDIENCE) {
            Ok(c) => c,
            Err(m) => {
                return graph_error(
                    StatusCode::UNAUTHORIZED,
                    "InvalidAuthenticationToken",
                    &format!("Access token validation failure: {m}"),
                );
            }
        };
        return graph_answer(i, method, path, &caller, body);
    }
    let caller = match i.caller(headers, ARM_AUDIENCE) {
        Ok(c) => c,
        Err(m) => {
            return error(
                StatusCode::UNAUTHORIZED,
                "InvalidAuthenticationToken",
                &format!("The access token is invalid: {m}"),
            );
        }
    };
    let api = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("api-version="))
        .unwrap_or_default();
    if api.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        );
    }
    if api != ARM_API_VERSION {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidApiVersionParameter",
            &format!(
                "The api-version '{api}' is invalid. The supported versions are '{ARM_API_VERSION}'."
            ),
        );
    }
    arm_answer(i, method, path, &caller, body)
}

fn arm_answer(i: &mut Inner, method: &Method, path: &str, caller: &str, body: &[u8]) -> Response {
    const MARK: &str = "/providers/microsoft.authorization/";
    let lower = path.to_ascii_lowercase();
    let Some(at) = lower.find(MARK) else {
        return error(
            StatusCode::NOT_FOUND,
            "InvalidResourceType",
            "The resource type could not be found.",
        );
    };
    let (scope, rest) = (&path[..at], &path[at + MARK.len()..]);
    let sub = format!("/subscriptions/{}", i.subscription);
    if !(scope.eq_ignore_ascii_case(&sub)
        || scope
            .to_ascii_lowercase()
            .starts_with(&format!("{}/", sub.to_ascii_lowercase())))
    {
        return error(
            StatusCode::NOT_FOUND,
            "SubscriptionNotFound",
            "The subscription could not be found.",
        );
    }
    if scope.split('/').skip(1).any(str::is_empty) || scope.ends_with('/') {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRoleAssignmentScope",
            "The scope is not valid.",
        );
    }
    let allowed = |i: &Inner, op: &str| i.actions(caller, scope).iter().any(|p| glob(p, op));
    if rest.eq_ignore_ascii_case("permissions") && method == Method::GET {
        let actions = i.actions(caller, scope);
        return axum::Json(json!({"value": [{
            "actions": actions, "notActions": [], "dataActions": [], "notDataActions": []
        }]}))
        .into_response();
    }
    if rest.eq_ignore_ascii_case("roleAssignments") && method == Method::GET {
        if !allowed(i, "Microsoft.Authorization/roleAssignments/read") {
            return forbidden(
                caller,
                "Microsoft.Authorization/roleAssignments/read",
                scope,
            );
        }
        // without $filter: every assignment at the scope and below it
        let under = scope.to_ascii_lowercase();
        let value: Vec<Value> = i
            .assignments
            .values()
            .filter(|a| {
                let s = a.scope.to_ascii_lowercase();
                s == under || s.starts_with(&format!("{under}/"))
            })
            .map(|a| assignment_view(a, caller))
            .collect();
        return axum::Json(json!({ "value": value })).into_response();
    }
    let Some(name) = rest
        .strip_prefix("roleAssignments/")
        .or_else(|| rest.strip_prefix("roleassignments/"))
    else {
        return error(
            StatusCode::NOT_FOUND,
            "InvalidResourceType",
            "The resource type could not be found.",
        );
    };
    if !leasehold_provider_azure::config::is_guid(name) {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRoleAssignmentId",
            &format!(
                "The role assignment ID '{name}' is not valid. The role assignment ID must be a GUID."
            ),
        );
    }
    let key = assignment_key(scope, name);
    let id = format!("{scope}/providers/Microsoft.Authorization/roleAssignments/{name}");
    let view = |a: &Assignment| assignment_view(a, caller);
    match *method {
        Method::GET => {
            if !allowed(i, "Microsoft.Authorization/roleAssignments/read") {
                return forbidden(caller, "Microsoft.Authorization/roleAssignments/read", &id);
            }
            match i.assignments.get(&key) {
                Some(a) if Instant::now() >= a.readable_at => axum::Json(view(a)).into_response(),
                _ => error(
                    StatusCode::NOT_FOUND,
                    "RoleAssignmentNotFound",
                    &format!("The role assignment '{name}' is not found."),
                ),
            }
        }
        Method::DELETE => {
            if !allowed(i, "Microsoft.Authorization/roleAssignments/delete") {
                return forbidden(
                    caller,
                    "Microsoft.Authorization/roleAssignments/delete",
                    &id,
                );
            }
            match i.assignments.remove(&key) {
                Some(a) => axum::Json(view(&a)).into_response(),
                None => StatusCode::NO_CONTENT.into_response(),
            }
        }
        Method::PUT => {
            if !allowed(i, "Microsoft.Authorization/roleAssignments/write") {
                return forbidden(caller, "Microsoft.Authorization/roleAssignments/write", &id);
            }
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestContent",
                    "The request content was invalid and could not be deserialized.",
                );
            };
            let p = &v["properties"];
            let (Some(role), Some(principal)) =
                (p["roleDefinitionId"].as_str(), p["principalId"].as_str())
            else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestContent",
                    "roleDefinitionId and principalId are required.",
                );
            };
            let role_guid = role.rsplit('/').next().unwrap_or_default();
            let role_ok = role.to_ascii_lowercase().starts_with(&format!(
                "{}/providers/microsoft.authorization/roledefinitions/",
                sub.to_ascii_lowercase()
            )) && ROLE_DEFS.iter().any(|(g, _, _)| *g == role_guid);
            if !role_ok {
                return error(
                    StatusCode::BAD_REQUEST,
                    "RoleDefinitionDoesNotExist",
                    &format!("The specified role definition with ID '{role_guid}' does not exist."),
                );
            }
            if !i.clients.iter().any(|c| c.object_id == principal) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "PrincipalNotFound",
                    &format!(
                        "Principal {} does not exist in the directory {}.",
                        principal.replace('-', ""),
                        i.tenant
                    ),
                );
            }
            let condition = p["condition"].as_str().map(str::to_owned);
            let condition_version = p["conditionVersion"].as_str().map(str::to_owned);
            if condition.is_some() && condition_version.as_deref() != Some("2.0") {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRoleAssignmentRequest",
                    "A condition requires conditionVersion 2.0.",
                );
            }
            if let Some(existing) = i.assignments.get(&key) {
                let same = existing.principal_id == principal
                    && existing.role_definition_id.rsplit('/').next() == Some(role_guid)
                    && existing.condition == condition;
                if !same {
                    return error(
                        StatusCode::CONFLICT,
                        "RoleAssignmentUpdateNotPermitted",
                        "Tenant ID, application ID, principal ID, and scope are not allowed to be updated.",
                    );
                }
                return (StatusCode::CREATED, axum::Json(view(existing))).into_response();
            }
            if let Some(other) = i.assignments.values().find(|a| {
                a.scope.eq_ignore_ascii_case(scope)
                    && a.principal_id == principal
                    && a.role_definition_id.rsplit('/').next() == Some(role_guid)
                    && a.condition == condition
            }) {
                let other_id = format!(
                    "{}/providers/Microsoft.Authorization/roleAssignments/{}",
                    other.scope, other.name
                );
                return error(
                    StatusCode::CONFLICT,
                    "RoleAssignmentExists",
                    &format!(
                        "The role assignment already exists. The ID of the existing role assignment is {}.",
                        other_id
                            .rsplit('/')
                            .next()
                            .unwrap_or_default()
                            .replace('-', "")
                    ),
                );
            }
            let a = Assignment {
                name: name.to_owned(),
                scope: scope.to_owned(),
                role_definition_id: role.to_owned(),
                principal_id: principal.to_owned(),
                principal_type: p["principalType"].as_str().unwrap_or("User").to_owned(),
                condition,
                condition_version,
                description: p["description"].as_str().map(str::to_owned),
                created: rfc3339(time::OffsetDateTime::now_utc()),
                readable_at: Instant::now() + i.faults.propagation,
            };
            let body = view(&a);
            i.assignments.insert(key, a);
            (StatusCode::CREATED, axum::Json(body)).into_response()
        }
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "The requested method is not allowed.",
        ),
    }
}

fn assignment_view(a: &Assignment, caller: &str) -> Value {
    json!({
        "id": format!("{}/providers/Microsoft.Authorization/roleAssignments/{}", a.scope, a.name),
        "name": a.name,
        "type": "Microsoft.Authorization/roleAssignments",
        "properties": {
            "roleDefinitionId": a.role_definition_id,
            "principalId": a.principal_id,
            "principalType": a.principal_type,
            "scope": a.scope,
            "condition": a.condition,
            "conditionVersion": a.condition_version,
            "description": a.description,
            "createdOn": a.created,
            "updatedOn": a.created,
            "createdBy": caller,
            "updatedBy": caller,
        }
    })
}

fn forbidden(caller: &str, action: &str, scope: &str) -> Response {
    error(
        StatusCode::FORBIDDEN,
        "AuthorizationFailed",
        &format!(
            "The client with object id '{caller}' does not have authorization to perform action '{action}' over scope '{scope}' or the scope is invalid."
        ),
    )
}

fn graph_answer(i: &mut Inner, method: &Method, path: &str, caller: &str, body: &[u8]) -> Response {
    let rest = &path["/v1.0/applications/".len().min(path.len())..];
    if !path.starts_with("/v1.0/applications/") {
        return graph_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("Resource not found for the segment '{path}'."),
        );
    }
    let (id, action) = rest.split_once('/').unwrap_or((rest, ""));
    let Some(app) = i.apps.get_mut(id) else {
        return graph_error(
            StatusCode::NOT_FOUND,
            "Request_ResourceNotFound",
            &format!(
                "Resource '{id}' does not exist or one of its queried reference-property objects are not present."
            ),
        );
    };
    if !app.owners.iter().any(|o| o == caller) {
        return graph_error(
            StatusCode::FORBIDDEN,
            "Authorization_RequestDenied",
            "Insufficient privileges to complete the operation.",
        );
    }
    let view = |p: &Password| {
        json!({
            "customKeyIdentifier": null,
            "displayName": p.display_name,
            "endDateTime": p.end,
            "hint": p.hint,
            "keyId": p.key_id,
            "secretText": null,
            "startDateTime": p.start,
        })
    };
    match (method.as_str(), action) {
        ("GET", "") => axum::Json(json!({
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#applications(passwordCredentials)/$entity",
            "id": id,
            "appId": app.app_id,
            "passwordCredentials": app.passwords.iter().map(view).collect::<Vec<_>>(),
        }))
        .into_response(),
        ("POST", "addPassword") => {
            let v: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(_) => {
                    return graph_error(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "Unable to read JSON request payload.",
                    );
                }
            };
            let pc = &v["passwordCredential"];
            let now = time::OffsetDateTime::now_utc();
            let end = match pc["endDateTime"].as_str() {
                None => now + time::Duration::days(730),
                Some(s) => match time::OffsetDateTime::parse(
                    s,
                    &time::format_description::well_known::Rfc3339,
                ) {
                    Ok(t) => t,
                    Err(_) => {
                        return graph_error(
                            StatusCode::BAD_REQUEST,
                            "BadRequest",
                            "Cannot convert the literal to the expected type 'Edm.DateTimeOffset'.",
                        );
                    }
                },
            };
            if end <= now {
                return graph_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidKeyEndDate",
                    "Key credential end date is invalid.",
                );
            }
            let text = secret();
            let p = Password {
                key_id: guid(),
                display_name: pc["displayName"].as_str().map(str::to_owned),
                hint: text[..3].to_owned(),
                start: rfc3339(now),
                end: rfc3339(end),
                end_unix: end.unix_timestamp(),
                sha256: sha256_hex(&text),
            };
            let mut out = view(&p);
            out["secretText"] = Value::String(text);
            out["@odata.context"] =
                "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.passwordCredential".into();
            app.passwords.push(p);
            i.write_registry();
            axum::Json(out).into_response()
        }
        ("POST", "removePassword") => {
            let key = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v["keyId"].as_str().map(str::to_owned));
            let Some(key) = key.filter(|k| leasehold_provider_azure::config::is_guid(k)) else {
                return graph_error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "Invalid value specified for property 'keyId' of resource 'PasswordCredential'.",
                );
            };
            let before = app.passwords.len();
            app.passwords.retain(|p| p.key_id != key);
            if app.passwords.len() == before {
                return graph_error(
                    StatusCode::NOT_FOUND,
                    "Request_ResourceNotFound",
                    &format!("No password credential found with keyId {key}."),
                );
            }
            i.write_registry();
            StatusCode::NO_CONTENT.into_response()
        }
        _ => graph_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "Request_BadRequest",
            "The requested method is not allowed.",
        ),
    }
}
