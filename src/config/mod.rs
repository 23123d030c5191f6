//! The broker's configuration: TOML, unknown fields rejected, every error
//! naming its field.
//!
//! Parsing ([`Config::from_toml`]) catches syntax, unknown fields and wrong
//! types (the `toml` crate names the key and line); [`Config::validate`]
//! catches what types cannot: ranges, mutually exclusive options, the
//! loopback-without-TLS rule, unsafe algorithms. `leasehold config validate`
//! runs both plus the file checks ([`Config::check_files`]), exactly what
//! `serve` runs before it binds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod providers;
mod rate_limits;
mod retention;
mod store_pg;
mod validate;

pub use providers::ProviderConfig;
pub use store_pg::StorePostgres;
pub use validate::ALLOWED_ALGORITHMS;
pub(crate) use validate::is_trust_domain;

pub use rate_limits::{ConnectionLimits, RateLimitConfig};
pub use retention::RetentionConfig;

/// The fields `audit.hmac_fields` may name (the audit layer keys them).
pub const HMAC_FIELDS: &[&str] = &["user", "purpose", "workload", "tenant"];

/// A configuration problem, with the dotted path of the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("`{field}`: {message}")]
    Invalid { field: String, message: String },
}

pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub reaper: ReaperConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    pub auth: AuthConfig,
    pub audit: AuditConfig,
    pub policy: PolicyConfig,
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Test-only fault hooks; absent from release builds.
    #[cfg(feature = "fault-injection")]
    #[serde(default)]
    pub fault: FaultConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on, e.g. `127.0.0.1:7711`.
    pub listen: SocketAddr,
    pub tls: Option<TlsConfig>,
    /// Listening on a non-loopback address without TLS is refused unless
    /// this is set (for a TLS-terminating sidecar on the same host).
    #[serde(default)]
    pub allow_plaintext_non_loopback: bool,
    /// The URL clients reach this broker at (`https://broker.example`),
    /// when a proxy in front changes scheme, host or port: what DPoP
    /// proofs (`htu`) are checked against. Without it, the scheme of this
    /// listener and the request's `Host`.
    #[serde(default)]
    pub public_url: Option<String>,
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default = "defaults::request_timeout_seconds")]
    pub request_timeout_seconds: u64,
    #[serde(default = "defaults::shutdown_grace_seconds")]
    pub shutdown_grace_seconds: u64,
    /// On SIGTERM, report not ready but keep serving this long before
    /// refusing new connections, so a load balancer that polls readiness
    /// moves traffic away first (e.g. 5 behind Kubernetes Services).
    #[serde(default)]
    pub drain_delay_seconds: u64,
    /// A second, plain-HTTP listener for Prometheus (`GET /metrics`, no
    /// credential) and probes (`/v1/health`, `/v1/ready`). Keep it on
    /// loopback or a private network. Without it, `/metrics` is served on
    /// the main listener to the admin and responder roles.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Per-workload, per-address and authentication-failure rate limits,
    /// and the cap on requests in flight (429/503 with Retry-After).
    #[serde(default)]
    pub rate_limits: RateLimitConfig,
    /// Caps on connections (in total, per source address) and how long a
    /// connection may idle or take to send its headers.
    #[serde(default)]
    pub connections: ConnectionLimits,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Ask clients for a certificate (never require one): for workloads
    /// that sign in with one (`kind = "x509"` issuers) and for leases
    /// bound to it (RFC 8705). The default: only when an x509 issuer is
    /// configured. Browsers may then offer a certificate picker.
    pub request_client_certificates: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `redb` (the default: the embedded file at `path`, one broker) or
    /// `postgres` (`[store.postgres]`: several brokers share one database).
    #[serde(default)]
    pub backend: StoreBackend,
    /// The redb file (with `backend = "redb"`).
    #[serde(default)]
    pub path: PathBuf,
    /// The database (with `backend = "postgres"`).
    pub postgres: Option<StorePostgres>,
    /// A file holding the 256-bit store key (64 hex characters or base64).
    pub key_file: Option<PathBuf>,
    /// Or the name of an environment variable holding it.
    pub key_env: Option<String>,
    /// Page cache size. Bounds resident memory; hot pages stay cached.
    #[serde(default = "defaults::cache_mib")]
    pub cache_mib: usize,
    /// Save allocator state with every checkpoint so a crash needs no full
    /// repair scan on the next start (slightly slower checkpoints).
    #[serde(default = "defaults::yes")]
    pub quick_repair: bool,
    /// Checkpoint (write the store file durably, empty the write-ahead log)
    /// once the log holds this many MiB.
    #[serde(default = "defaults::checkpoint_mib")]
    pub checkpoint_mib: u64,
    /// Writes are refused (503 `store_full`, nothing written) while the
    /// store's filesystem has less than this free, so the log, the store
    /// file and checkpoints always have room, and the broker resumes by
    /// itself when space is freed.
    #[serde(default = "defaults::reserve_mib")]
    pub reserve_mib: u64,
    /// Under concurrent load, how long a batch stays open to gather more
    /// operations into one durable commit (0 turns it off); the writer
    /// applies them as they arrive meanwhile. Applies only when the previous
    /// commit carried at least `commit_siblings` operations, so a lone
    /// request never waits. The embedded store only: a PostgreSQL node's
    /// batch never lingers, as its open transaction holds the cluster's
    /// chain head lock (`store::pg::writer`).
    #[serde(default = "defaults::commit_delay_micros")]
    pub commit_delay_micros: u64,
    #[serde(default = "defaults::commit_siblings")]
    pub commit_siblings: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    #[default]
    Redb,
    Postgres,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "defaults::max_task_ttl_seconds")]
    pub max_task_ttl_seconds: u64,
    #[serde(default = "defaults::max_lease_ttl_seconds")]
    pub max_lease_ttl_seconds: u64,
    #[serde(default = "defaults::max_leases_per_task")]
    pub max_leases_per_task: u32,
    /// Keep the prompt text (encrypted) and not only its SHA-256.
    #[serde(default)]
    pub store_prompt_text: bool,
    #[serde(default = "defaults::max_prompt_bytes")]
    pub max_prompt_bytes: usize,
    #[serde(default = "defaults::max_tools")]
    pub max_tools: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_task_ttl_seconds: defaults::max_task_ttl_seconds(),
            max_lease_ttl_seconds: defaults::max_lease_ttl_seconds(),
            max_leases_per_task: defaults::max_leases_per_task(),
            store_prompt_text: false,
            max_prompt_bytes: defaults::max_prompt_bytes(),
            max_tools: defaults::max_tools(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReaperConfig {
    /// First retry delay of a failed revocation.
    #[serde(default = "defaults::retry_base_seconds")]
    pub retry_base_seconds: u64,
    /// Longest delay between retries.
    #[serde(default = "defaults::retry_cap_seconds")]
    pub retry_cap_seconds: u64,
    /// Attempts before a lease is declared irrevocable.
    #[serde(default = "defaults::retry_budget")]
    pub retry_budget: u32,
    /// How often irrevocable leases are still retried.
    #[serde(default = "defaults::irrevocable_retry_seconds")]
    pub irrevocable_retry_seconds: u64,
    /// Leases moved or revoked per store transaction.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Longest a single provider call may take before it counts as failed.
    #[serde(default = "defaults::provider_timeout_seconds")]
    pub provider_timeout_seconds: u64,
    /// Every this many seconds, reconcile each provider that can list what
    /// it issued (PostgreSQL): orphans are reported (log, metric
    /// `leasehold_provider_orphans`, a `provider.reconciled` event), never
    /// removed; `leasehold providers reconcile --drop` removes them. 0: off.
    #[serde(default)]
    pub reconcile_interval_seconds: u64,
}

impl Default for ReaperConfig {
    fn default() -> Self {
        Self {
            retry_base_seconds: defaults::retry_base_seconds(),
            retry_cap_seconds: defaults::retry_cap_seconds(),
            retry_budget: defaults::retry_budget(),
            irrevocable_retry_seconds: defaults::irrevocable_retry_seconds(),
            batch_size: defaults::batch_size(),
            provider_timeout_seconds: defaults::provider_timeout_seconds(),
            reconcile_interval_seconds: 0,
        }
    }
}

/// Runtime authorization.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The policy folder: one `*.cedarschema`, `*.cedar` policies and
    /// `entities.json`. Reloaded on SIGHUP and `POST /v1/policy/reload`.
    pub dir: PathBuf,
    /// How long an approval request stays open (and an approval usable).
    #[serde(default = "defaults::approval_ttl_seconds")]
    pub approval_ttl_seconds: u64,
    /// Break-glass leases are capped at this TTL.
    #[serde(default = "defaults::break_glass_max_ttl_seconds")]
    pub break_glass_max_ttl_seconds: u64,
    /// Hard cap on a workload's active leases, whatever policy says (429).
    #[serde(default = "defaults::max_active_leases_per_workload")]
    pub max_active_leases_per_workload: u64,
    /// Notified (POST, JSON) of approval requests and break-glass use;
    /// retried in the background, never blocking a decision.
    pub webhook_url: Option<String>,
    /// Signs webhook bodies (`x-leasehold-signature: sha256=<hex HMAC>`).
    pub webhook_secret_file: Option<PathBuf>,
}

/// The event chain.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Ed25519 PKCS#8 key that signs checkpoints of the chain; kept apart
    /// from the store key (`leasehold keygen checkpoint FILE`).
    pub checkpoint_key_file: PathBuf,
    /// How often the head is signed (also at shutdown).
    #[serde(default = "defaults::checkpoint_interval_seconds")]
    pub checkpoint_interval_seconds: u64,
    /// A key for HMAC-ing the fields in `hmac_fields` before they enter the
    /// chain (32+ random bytes, hex or base64, like the store key).
    pub hmac_key_file: Option<PathBuf>,
    /// Fields recorded as `hmac-sha256:<hex>` instead of their value: any
    /// of `user`, `purpose`, `workload`, `tenant`.
    #[serde(default)]
    pub hmac_fields: Vec<String>,
    /// Denied authentication attempts recorded per second at most; the rest
    /// are counted into the next recorded one.
    #[serde(default = "defaults::auth_denied_events_per_second")]
    pub auth_denied_events_per_second: u32,
    /// Events younger than this are never pruned, whatever an admin asks
    /// (default 7 days): the chain cannot be emptied from the API.
    #[serde(default = "defaults::prune_min_age_seconds")]
    pub prune_min_age_seconds: u64,
    /// Where `leasehold events archive` (`POST /v1/events/archive`) writes
    /// the archives it verifies before pruning (created 0700). Without it,
    /// nothing can be pruned.
    #[serde(default)]
    pub archive_dir: Option<PathBuf>,
    /// Benchmark-only: record no events (feature `bench-no-events`).
    #[cfg(feature = "bench-no-events")]
    #[serde(default)]
    pub bench_no_events: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub workload_issuers: Vec<IssuerConfig>,
    #[serde(default)]
    pub operators: Vec<OperatorConfig>,
    /// How old a DPoP proof (RFC 9449) may be when it arrives, and how far
    /// in the future its `iat` may lie (clock skew).
    #[serde(default = "defaults::dpop_max_age_seconds")]
    pub dpop_max_age_seconds: u64,
    #[serde(default = "defaults::dpop_leeway_seconds")]
    pub dpop_leeway_seconds: u64,
}

/// How a workload issuer's workloads prove who they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IssuerKind {
    /// Signed JWTs (`Authorization: Bearer`), checked against a JWKS.
    #[default]
    Jwt,
    /// TLS client certificates (X.509-SVIDs, or any certificate under a
    /// trust bundle), checked against the bundle.
    X509,
}

/// A trusted issuer of workload identities: a Kubernetes API server
/// (projected service-account tokens), a SPIFFE trust domain (JWT-SVIDs,
/// or X.509-SVIDs with `kind = "x509"`), a CI system, a private CA.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// `jwt` (the default) or `x509`.
    #[serde(default)]
    pub kind: IssuerKind,
    /// Short name; workload ids are `<name>:<sub>` (JWT) or
    /// `<name>:<SPIFFE ID or subject CN>` (X.509).
    pub name: String,
    /// JWT: the exact `iss` claim.
    #[serde(default)]
    pub issuer: String,
    /// JWT: accepted `aud` values (at least one must match).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// JWT: pinned signature algorithms. Only asymmetric ones are accepted.
    #[serde(default)]
    pub algorithms: Vec<String>,
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    #[serde(default = "defaults::jwks_refresh_seconds")]
    pub jwks_refresh_seconds: u64,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    #[serde(default = "defaults::leeway_seconds")]
    pub leeway_seconds: u64,
    /// The claim that carries the tenant, or
    pub tenant_claim: Option<String>,
    /// a fixed tenant for every workload of this issuer.
    pub tenant: Option<String>,
    /// Claims copied onto the workload as attributes (for policy).
    #[serde(default)]
    pub attribute_claims: Vec<String>,
    /// X.509: the PEM file of CA certificates this issuer trusts. Re-read
    /// when it changes: removing a CA refuses its workloads at once.
    pub trust_bundle_file: Option<PathBuf>,
    /// X.509: accept X.509-SVIDs of this SPIFFE trust domain (exactly one
    /// `spiffe://<trust_domain>/<path>` URI SAN); the workload is the
    /// SPIFFE ID. Or
    pub trust_domain: Option<String>,
    /// X.509: accept certificates whose subject common name matches this
    /// pattern (one `*` standing for one DNS label, e.g.
    /// `*.agents.example.org`); the workload is the common name.
    pub subject_pattern: Option<String>,
    /// X.509 with `trust_domain`: the tenant is this (1-based) segment of
    /// the SPIFFE ID's path, e.g. 2 for `spiffe://td/tenant/acme/agent`.
    pub tenant_path_segment: Option<usize>,
    /// X.509 with `subject_pattern`: the tenant is this attribute of the
    /// subject, `O` or `OU`.
    pub tenant_subject_attribute: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorRole {
    Admin,
    Approver,
    Responder,
    /// A resource server that may call token introspection.
    ResourceServer,
    /// `leasehold proxy`: makes calls for assistants that show it a proxy
    /// credential of their task, and injects what is leased.
    Proxy,
}

impl OperatorRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Approver => "approver",
            Self::Responder => "responder",
            Self::ResourceServer => "resource_server",
            Self::Proxy => "proxy",
        }
    }
}

/// A human or system operator with a static bearer token, stored only as
/// its SHA-256.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    pub name: String,
    pub roles: Vec<OperatorRole>,
    /// Hex SHA-256 of the bearer token.
    pub token_sha256: String,
    /// The person behind the token, as tasks name users (`on_behalf_of`):
    /// an approver never approves a request made on their own behalf.
    pub user: Option<String>,
}

#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// After the provider issued and before the lease is activated, write
    /// the lease id and credential to this file and hang (crash test).
    pub pause_after_issue_file: Option<PathBuf>,
    /// Fail the append of events of these kinds (fail-closed tests).
    #[serde(default)]
    pub fail_event_kinds: Vec<String>,
    /// Leases a revocation job claims per transaction (restart-mid-job tests).
    pub job_chunk: Option<usize>,
    /// Pause after each chunk a revocation job claims, in milliseconds.
    #[serde(default)]
    pub job_chunk_pause_millis: u64,
    /// Never checkpoint while running, so that after a SIGKILL every
    /// acknowledged write is only in the write-ahead log (crash tests).
    #[serde(default)]
    pub no_checkpoints: bool,
}

pub(crate) mod defaults {
    pub fn yes() -> bool {
        true
    }
    pub fn max_body_bytes() -> usize {
        64 * 1024
    }
    pub fn request_timeout_seconds() -> u64 {
        30
    }
    pub fn shutdown_grace_seconds() -> u64 {
        10
    }
    pub fn cache_mib() -> usize {
        64
    }
    pub fn commit_delay_micros() -> u64 {
        500
    }
    pub fn checkpoint_mib() -> u64 {
        // the store's own default (`StoreOptions::DEFAULT_CHECKPOINT_BYTES`),
        // which a unit test holds equal
        16
    }
    pub fn commit_siblings() -> usize {
        4
    }
    pub fn reserve_mib() -> u64 {
        // `StoreOptions::DEFAULT_RESERVE_BYTES`
        64
    }
    pub fn max_task_ttl_seconds() -> u64 {
        8 * 3600
    }
    pub fn max_lease_ttl_seconds() -> u64 {
        3600
    }
    pub fn max_leases_per_task() -> u32 {
        1000
    }
    pub fn max_prompt_bytes() -> usize {
        32 * 1024
    }
    pub fn max_tools() -> usize {
        64
    }
    pub fn retry_base_seconds() -> u64 {
        1
    }
    pub fn retry_cap_seconds() -> u64 {
        300
    }
    pub fn retry_budget() -> u32 {
        10
    }
    pub fn irrevocable_retry_seconds() -> u64 {
        86_400
    }
    pub fn batch_size() -> usize {
        4096
    }
    pub fn provider_timeout_seconds() -> u64 {
        30
    }
    pub fn approval_ttl_seconds() -> u64 {
        900
    }
    pub fn break_glass_max_ttl_seconds() -> u64 {
        900
    }
    pub fn max_active_leases_per_workload() -> u64 {
        10_000
    }
    pub fn checkpoint_interval_seconds() -> u64 {
        60
    }
    pub fn prune_min_age_seconds() -> u64 {
        7 * 86_400
    }
    pub fn auth_denied_events_per_second() -> u32 {
        10
    }
    pub fn jwks_refresh_seconds() -> u64 {
        300
    }
    pub fn leeway_seconds() -> u64 {
        30
    }
    pub fn dpop_max_age_seconds() -> u64 {
        60
    }
    pub fn dpop_leeway_seconds() -> u64 {
        5
    }
}

impl Config {
    /// Read and parse a file, resolving relative paths against its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Self::from_toml(&text, &path.display().to_string())?;
        if let Some(dir) = path.parent() {
            cfg.resolve_paths(dir);
        }
        Ok(cfg)
    }

    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if !self.store.path.as_os_str().is_empty() {
            fix(&mut self.store.path);
        }
        if let Some(p) = self.store.key_file.as_mut() {
            fix(p);
        }
        if let Some(pg) = self.store.postgres.as_mut() {
            for p in [pg.password_file.as_mut(), pg.ca_file.as_mut()]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
        }
        fix(&mut self.audit.checkpoint_key_file);
        fix(&mut self.policy.dir);
        if let Some(p) = self.policy.webhook_secret_file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.audit.archive_dir.as_mut() {
            fix(p);
        }
        if let Some(p) = self.audit.hmac_key_file.as_mut() {
            fix(p);
        }
        if let Some(tls) = self.server.tls.as_mut() {
            fix(&mut tls.cert_file);
            fix(&mut tls.key_file);
        }
        for i in &mut self.auth.workload_issuers {
            if let Some(p) = i.jwks_file.as_mut() {
                fix(p);
            }
            if let Some(p) = i.trust_bundle_file.as_mut() {
                fix(p);
            }
        }
        for p in self.providers.values_mut() {
            for f in p.settings_mut().files_mut() {
                fix(f);
            }
        }
    }

    /// Every provider role, as the policy engine sees them.
    /// (provider, role, `max_ttl_seconds`) for every configured role.
    pub fn provider_roles(&self) -> Vec<(String, String, u64)> {
        self.providers
            .iter()
            .flat_map(|(name, p)| {
                p.role_ttls()
                    .into_iter()
                    .map(|(role, max_ttl)| (name.clone(), role.to_owned(), max_ttl))
            })
            .collect()
    }

    /// The configuration as TOML that [`Config::from_toml`] reads back.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| invalid("config", format!("cannot write as TOML: {e}")))
    }

    /// The broker's limits, as a provider's configuration sees them.
    pub fn broker_limits(&self) -> leasehold_provider::BrokerLimits {
        leasehold_provider::BrokerLimits {
            max_lease_ttl_seconds: self.limits.max_lease_ttl_seconds,
            provider_timeout_seconds: self.reaper.provider_timeout_seconds,
        }
    }
}

#[cfg(test)]
mod tests;
