//! The AWS provider: an STS session per lease, and revocation AWS itself
//! enforces.
//!
//! **Issue.** `AssumeRole` into the lease's role with `RoleSessionName` and
//! `SourceIdentity` set to the lease id (SourceIdentity survives role
//! chaining and the session cannot change it), session tags for the task,
//! workload and lease (transitive), an inline session policy built from the
//! role's template narrowed by the call's scope (with a deny on
//! `sts:AssumeRole*` unless the role allows chaining), `DurationSeconds` =
//! the lease TTL clamped to 900 s and the role's maximum, and the role's
//! `ExternalId`. The lease ends when AWS's session does if that is sooner.
//! A lease shorter than AWS's 900 s minimum gets a 900 s session that the
//! broker revokes (below) at the lease's deadline.
//!
//! **Revoke.** AWS cannot revoke one STS session, but a role's policy can
//! deny it: the lease id goes into the role's inline deny policy as a
//! `aws:SourceIdentity` value, grouped by when the session ends anyway so
//! entries are dropped once useless. When the list no longer fits the
//! policy budget, the role falls back to denying every session issued
//! before now (`aws:TokenIssueTime`). Edits are serialized per role in this
//! process and verified by reading back, retried if another writer's edit
//! replaced ours. Rollback is the same deny, found from the lease id alone.

#![forbid(unsafe_code)]

pub mod config;
mod kind;
pub mod policy;

#[cfg(feature = "testkit")]
pub mod testkit;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use leasehold_provider::{
    Credential, Description, Issued, LeaseSpec, Provider, ProviderError, RevocationHandle,
    RevokeSpec, RoleInfo, Timestamp,
};
use serde::{Deserialize, Serialize};

pub use aws_credential_types::Credentials;
pub use config::{AwsRole, AwsStsConfig, ConfigError};
pub use kind::KIND;

use crate::config::{MAX_SESSION_SECONDS, MIN_SESSION_SECONDS, SCOPE_PLACEHOLDER};
use crate::policy::{DenyDoc, Method};

/// The broker's clock, handed to the provider: revocation needs "now" for
/// the issue-time cut-off and for pruning, and providers never read the
/// system clock.
pub type Now = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// Session tag keys (transitive).
const TAG_LEASE: &str = "leasehold-lease";
const TAG_TASK: &str = "leasehold-task";
const TAG_WORKLOAD: &str = "leasehold-workload";

#[derive(Debug)]
struct Role {
    cfg: AwsRole,
    name: String,
    template: serde_json::Value,
}

struct Clients {
    sts: aws_sdk_sts::Client,
    iam: aws_sdk_iam::Client,
}

pub struct AwsStsProvider {
    cfg: AwsStsConfig,
    roles: BTreeMap<String, Role>,
    clients: tokio::sync::OnceCell<Clients>,
    credentials: Option<Credentials>,
    now: Now,
    /// One deny-policy edit at a time per IAM role.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for AwsStsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsStsProvider")
            .field("region", &self.cfg.region)
            .field("endpoint_url", &self.cfg.endpoint_url)
            .field("roles", &self.roles.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// What the broker stores to revoke a session.
#[derive(Serialize, Deserialize)]
struct Handle {
    role_name: String,
    source_identity: String,
    /// When AWS's session ends at the latest (unix seconds).
    session_end: i64,
}

/// Session tag values: letters, digits, spaces and `_.:/=+-@`, 256 at most.
fn tag_value_ok(v: &str) -> bool {
    v.len() <= 256
        && v.chars()
            .all(|c| c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c))
}

/// RoleSessionName and SourceIdentity: 2-64 of `[\w+=,.@-]`.
fn session_name_ok(v: &str) -> bool {
    (2..=64).contains(&v.len()) && config::is_iam_word(v)
}

/// An AWS SDK error, classed. Throttling and transport failures are
/// retryable (the SDK already retried them); the rest are permanent.
fn classify<E, R>(what: &str, e: &aws_sdk_sts::error::SdkError<E, R>) -> ProviderError
where
    E: aws_sdk_sts::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    use aws_sdk_sts::error::SdkError;
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            let code = err.code().unwrap_or("Unknown");
            let msg = format!("{what}: {code}: {}", err.message().unwrap_or_default());
            match code {
                "Throttling"
                | "ThrottlingException"
                | "RequestLimitExceeded"
                | "ServiceUnavailable"
                | "InternalFailure"
                | "InternalError" => ProviderError::retryable(msg),
                _ => ProviderError::permanent(msg),
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            ProviderError::retryable(format!(
                "{what}: AWS unreachable or not answering: {}",
                leasehold_provider::error_chain(e)
            ))
        }
        other => ProviderError::permanent(format!(
            "{what}: {}",
            leasehold_provider::error_chain(other)
        )),
    }
}

impl AwsStsProvider {
    /// Build from a config. AWS is not contacted until the first call: the
    /// broker starts (and reports not ready) while it is unreachable.
    /// `credentials`: fixed broker credentials instead of the standard chain
    /// (environment, profile, web identity, instance metadata); for tests.
    pub fn new(
        cfg: AwsStsConfig,
        max_ttl: u64,
        now: Now,
        credentials: Option<Credentials>,
    ) -> Result<Self, ConfigError> {
        cfg.validate(max_ttl)?;
        let mut roles = BTreeMap::new();
        for (name, r) in &cfg.roles {
            let template = match &r.session_policy {
                Some(t) => serde_json::from_str(t).map_err(|e| ConfigError {
                    field: format!("roles.{name}.session_policy"),
                    message: e.to_string(),
                })?,
                None => policy::allow_all(),
            };
            let role_name = config::role_name(&r.role_arn)
                .map_err(|m| ConfigError {
                    field: format!("roles.{name}.role_arn"),
                    message: m,
                })?
                .to_owned();
            roles.insert(
                name.clone(),
                Role {
                    cfg: r.clone(),
                    name: role_name,
                    template,
                },
            );
        }
        Ok(Self {
            cfg,
            roles,
            clients: tokio::sync::OnceCell::new(),
            credentials,
            now,
            locks: Mutex::new(HashMap::new()),
        })
    }

    async fn clients(&self) -> &Clients {
        self.clients
            .get_or_init(|| async {
                let http = https_client();
                let mut loader = aws_config::defaults(BehaviorVersion::latest())
                    .region(Region::new(self.cfg.region.clone()))
                    .http_client(http.clone())
                    .retry_config(
                        aws_config::retry::RetryConfig::standard()
                            .with_max_attempts(self.cfg.max_attempts)
                            .with_initial_backoff(Duration::from_millis(100)),
                    )
                    .timeout_config(
                        aws_config::timeout::TimeoutConfig::builder()
                            .connect_timeout(Duration::from_secs(3))
                            .operation_attempt_timeout(Duration::from_secs(10))
                            .operation_timeout(Duration::from_secs(30))
                            .build(),
                    );
                if let Some(u) = &self.cfg.endpoint_url {
                    loader = loader.endpoint_url(u);
                }
                if let Some(p) = &self.cfg.profile {
                    loader = loader.profile_name(p);
                }
                if let Some(c) = &self.credentials {
                    loader = loader.credentials_provider(c.clone());
                } else if let Some(f) = &self.cfg.credentials_file {
                    let files = aws_runtime::env_config::file::EnvConfigFiles::builder()
                        .with_file(
                            aws_runtime::env_config::file::EnvConfigFileKind::Credentials,
                            f,
                        )
                        .build();
                    let pc = aws_config::provider_config::ProviderConfig::without_region()
                        .with_region(Some(Region::new(self.cfg.region.clone())))
                        .with_http_client(http.clone());
                    let mut b = aws_config::profile::ProfileFileCredentialsProvider::builder()
                        .configure(&pc)
                        .profile_files(files);
                    if let Some(p) = &self.cfg.profile {
                        b = b.profile_name(p);
                    }
                    loader = loader.credentials_provider(b.build());
                }
                let conf = loader.load().await;
                Clients {
                    sts: aws_sdk_sts::Client::new(&conf),
                    iam: aws_sdk_iam::Client::new(&conf),
                }
            })
            .await
    }

    fn role(&self, name: &str) -> Result<&Role, ProviderError> {
        leasehold_provider::configured_role(&self.roles, name)
    }

    /// The one scope a call narrows to, checked against the role.
    fn scope<'a>(
        &self,
        role: &Role,
        name: &str,
        scope: &'a [String],
    ) -> Result<Option<&'a str>, ProviderError> {
        let scoped = role
            .cfg
            .session_policy
            .as_ref()
            .is_some_and(|t| t.contains(SCOPE_PLACEHOLDER));
        leasehold_provider::one_scope(
            name,
            scoped,
            scope,
            &role.cfg.scopes,
            config::is_scope_value,
        )
    }

    /// The session's duration for a lease: its TTL clamped to AWS's bounds
    /// and the role's maximum.
    fn duration(role: &Role, spec: &LeaseSpec) -> u64 {
        spec.issued_at.until(spec.expires_at).as_secs().clamp(
            MIN_SESSION_SECONDS,
            role.cfg.max_ttl_seconds.max(MIN_SESSION_SECONDS),
        )
    }

    fn lock(&self, role_name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(role_name.to_owned())
            .or_default()
            .clone()
    }

    /// The longest session any configured role with this IAM name can have.
    fn longest_session(&self, role_name: &str) -> i64 {
        let s = self
            .roles
            .values()
            .filter(|r| r.name == role_name)
            .map(|r| r.cfg.max_ttl_seconds)
            .max()
            .unwrap_or(MAX_SESSION_SECONDS)
            .max(MIN_SESSION_SECONDS);
        i64::try_from(s).unwrap_or(i64::MAX)
    }

    /// Read the role's deny policy (empty when absent).
    async fn read_deny(&self, role_name: &str) -> Result<DenyDoc, ProviderError> {
        let iam = &self.clients().await.iam;
        match iam
            .get_role_policy()
            .role_name(role_name)
            .policy_name(&self.cfg.deny_policy_name)
            .send()
            .await
        {
            Ok(out) => {
                // IAM returns the document URL-encoded
                let raw = out.policy_document();
                let text = url_decode(raw);
                DenyDoc::parse(&text).map_err(|m| {
                    ProviderError::permanent(format!(
                        "role {role_name}: policy {}: {m}",
                        self.cfg.deny_policy_name
                    ))
                })
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_no_such_entity_exception()) =>
            {
                Ok(DenyDoc::default())
            }
            Err(e) => Err(classify(&format!("iam:GetRolePolicy on {role_name}"), &e)),
        }
    }

    /// Deny these sessions (identity, session end) at the role. Serialized
    /// per role here; verified by reading back, retried when another
    /// writer's edit replaced ours.
    pub async fn deny(
        &self,
        role_name: &str,
        entries: &[(String, i64)],
    ) -> Result<Method, ProviderError> {
        let lock = self.lock(role_name);
        let _one = lock.lock().await;
        let iam = &self.clients().await.iam;
        let mut last = None;
        for attempt in 0..5u32 {
            let now = (self.now)();
            let now_s = now.unix_seconds();
            // a cut-off at the next whole second: aws:TokenIssueTime has
            // second precision, and a session issued earlier in this second
            // must be covered
            let now_text = now.saturating_add(Duration::from_secs(1)).rfc3339();
            let mut doc = self.read_deny(role_name).await?;
            doc.prune(now_s);
            let method = doc.add(
                entries,
                self.cfg.deny_policy_max_chars,
                &now_text,
                now_s + self.longest_session(role_name),
            );
            let text = doc.render().unwrap_or_default();
            iam.put_role_policy()
                .role_name(role_name)
                .policy_name(&self.cfg.deny_policy_name)
                .policy_document(text)
                .send()
                .await
                .map_err(|e| classify(&format!("iam:PutRolePolicy on {role_name}"), &e))?;
            // read back: a concurrent writer elsewhere may have replaced ours
            let back = self.read_deny(role_name).await?;
            // listed, or issued (before now) under a cut-off at or after now
            let cut = back
                .cutoff
                .as_ref()
                .is_some_and(|(at, _)| at.as_str() >= now_text.as_str());
            if cut
                || entries
                    .iter()
                    .all(|(id, _)| back.revoked.values().any(|s| s.contains(id)))
            {
                return Ok(method);
            }
            last = Some(attempt);
            tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
        }
        Err(ProviderError::retryable(format!(
            "role {role_name}: the deny policy kept losing our entries to concurrent edits ({} attempts)",
            last.map_or(0, |a| a + 1)
        )))
    }

    /// The role's deny policy as it is now: for tests and for operators.
    pub async fn deny_policy(&self, role: &str) -> Result<DenyDoc, ProviderError> {
        let r = self.role(role)?;
        self.read_deny(&r.name).await
    }

    fn handle_for(&self, role: &Role, spec: &LeaseSpec) -> Handle {
        let duration = i64::try_from(Self::duration(role, spec)).unwrap_or(i64::MAX);
        Handle {
            role_name: role.name.clone(),
            source_identity: spec.lease_id.clone(),
            // the later of the lease's end and AWS's: entries must outlive both
            session_end: (spec.issued_at.unix_seconds() + duration)
                .max(spec.expires_at.unix_seconds())
                + 60,
        }
    }
}

/// The HTTPS client every AWS call goes through: rustls with ring, the
/// process's one crypto provider (no aws-lc).
pub fn https_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// An SDK config for `region` with these credentials (and an endpoint, for
/// a test server): how tests and the smoke test use leased credentials.
pub async fn sdk_config(
    region: &str,
    endpoint: Option<&str>,
    credentials: Credentials,
) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .credentials_provider(credentials)
        .http_client(https_client());
    if let Some(e) = endpoint {
        loader = loader.endpoint_url(e);
    }
    loader.load().await
}

/// IAM returns policy documents URL-encoded (`%7B%22Version…`); decode
/// `%XX` unless the text is already JSON.
pub fn url_decode(s: &str) -> String {
    if s.trim_start().starts_with('{') {
        return s.to_owned();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 3 <= b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[async_trait::async_trait]
impl Provider for AwsStsProvider {
    fn describe(&self) -> Description {
        Description {
            kind: "aws-sts",
            roles: self
                .roles
                .iter()
                .map(|(name, r)| RoleInfo {
                    name: name.clone(),
                    max_ttl: Duration::from_secs(r.cfg.max_ttl_seconds),
                    description: if r.cfg.description.is_empty() {
                        format!("assumes {}", r.cfg.role_arn)
                    } else {
                        r.cfg.description.clone()
                    },
                })
                .collect(),
            revocation:
                "the session's SourceIdentity (its lease id) is denied by an inline policy \
                         on the role (or, when that policy is full, every session of the role \
                         issued before the revocation)"
                    .into(),
        }
    }

    fn validate(&self, role: &str, scope: &[String]) -> Result<Duration, ProviderError> {
        let r = self.role(role)?;
        let s = self.scope(r, role, scope)?;
        // the policy must fit before anything is recorded: a clear 400
        policy::session_policy(&r.template, s, r.cfg.allow_role_chaining)
            .map_err(ProviderError::invalid)?;
        Ok(Duration::from_secs(r.cfg.max_ttl_seconds))
    }

    async fn health(&self) -> Result<(), ProviderError> {
        self.clients()
            .await
            .sts
            .get_caller_identity()
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("sts:GetCallerIdentity", &e))
    }

    async fn issue(&self, spec: &LeaseSpec) -> Result<Issued, ProviderError> {
        let role = self.role(&spec.role)?;
        let scope = self.scope(role, &spec.role, &spec.scope)?;
        let session_policy =
            policy::session_policy(&role.template, scope, role.cfg.allow_role_chaining)
                .map_err(ProviderError::invalid)?;
        if !session_name_ok(&spec.lease_id) {
            return Err(ProviderError::invalid(
                "the lease id is not a valid session name",
            ));
        }
        let tags = [
            (TAG_LEASE, spec.lease_id.as_str()),
            (TAG_TASK, spec.task_id.as_str()),
            (TAG_WORKLOAD, spec.workload.as_str()),
        ];
        let mut sdk_tags = Vec::new();
        for (k, v) in tags {
            if !tag_value_ok(v) {
                return Err(ProviderError::invalid(format!(
                    "session tag {k} cannot carry `{v}` (256 of letters, digits, space, _.:/=+-@)"
                )));
            }
            sdk_tags.push(
                aws_sdk_sts::types::Tag::builder()
                    .key(k)
                    .value(v)
                    .build()
                    .map_err(|e| ProviderError::invalid(e.to_string()))?,
            );
        }
        let duration = Self::duration(role, spec);
        let out = self
            .clients()
            .await
            .sts
            .assume_role()
            .role_arn(&role.cfg.role_arn)
            .role_session_name(&spec.lease_id)
            .source_identity(&spec.lease_id)
            .policy(session_policy)
            .duration_seconds(i32::try_from(duration).unwrap_or(i32::MAX))
            .set_tags(Some(sdk_tags))
            .set_transitive_tag_keys(Some(tags.iter().map(|(k, _)| (*k).to_owned()).collect()))
            .set_external_id(role.cfg.external_id.clone())
            .send()
            .await
            .map_err(|e| classify(&format!("sts:AssumeRole {}", role.cfg.role_arn), &e))?;
        let c = out
            .credentials()
            .ok_or_else(|| ProviderError::permanent("AssumeRole answered without credentials"))?;
        let aws_end = Timestamp::from_unix_millis(c.expiration().secs().saturating_mul(1000));
        let granted = spec.issued_at.saturating_add(Duration::from_secs(duration));
        let expires_at = spec
            .expires_at
            .min(granted)
            .min(aws_end.max(spec.issued_at.saturating_add(Duration::from_secs(1))));
        let credential = Credential::new()
            .public("access_key_id", c.access_key_id())
            .secret("secret_access_key", c.secret_access_key())
            .secret("session_token", c.session_token())
            .public("region", self.cfg.region.clone())
            .public("expiration", aws_end.rfc3339());
        let h = self.handle_for(role, spec);
        let handle = RevocationHandle::new(serde_json::to_vec(&h).unwrap_or_default());
        let short = spec.issued_at.until(spec.expires_at).as_secs() < MIN_SESSION_SECONDS;
        let description = format!(
            "STS session {} on {} ({duration} s{}{}); revoked by a deny on aws:SourceIdentity in {}'s {} policy",
            spec.lease_id,
            role.cfg.role_arn,
            if expires_at < spec.expires_at {
                ", which caps this lease"
            } else {
                ""
            },
            if short {
                "; AWS's minimum outlasts the lease, the deny at its deadline ends it"
            } else {
                ""
            },
            role.name,
            self.cfg.deny_policy_name,
        );
        Ok(Issued {
            credential,
            handle,
            expires_at,
            description,
        })
    }

    async fn revoke(&self, lease: &RevokeSpec) -> Result<(), ProviderError> {
        self.revoke_many(std::slice::from_ref(lease))
            .await
            .pop()
            .unwrap_or_else(|| Err(ProviderError::permanent("no result")))
    }

    async fn revoke_many(&self, leases: &[RevokeSpec]) -> Vec<Result<(), ProviderError>> {
        self.revoke_many_noted(leases)
            .await
            .into_iter()
            .map(|r| r.map(|_| ()))
            .collect()
    }

    /// One read-modify-write of each role's deny policy for the whole batch.
    async fn revoke_many_noted(
        &self,
        leases: &[RevokeSpec],
    ) -> Vec<Result<Option<String>, ProviderError>> {
        let mut out: Vec<Result<Option<String>, ProviderError>> = Vec::with_capacity(leases.len());
        let mut by_role: BTreeMap<String, Vec<(usize, String, i64)>> = BTreeMap::new();
        for (i, l) in leases.iter().enumerate() {
            match serde_json::from_slice::<Handle>(l.handle.as_bytes()) {
                Ok(h) => {
                    out.push(Ok(None));
                    by_role.entry(h.role_name).or_default().push((
                        i,
                        h.source_identity,
                        h.session_end,
                    ));
                }
                Err(_) => out.push(Err(ProviderError::permanent(
                    "the revocation handle is not an AWS STS handle",
                ))),
            }
        }
        for (role, items) in by_role {
            let entries: Vec<(String, i64)> = items
                .iter()
                .map(|(_, id, end)| (id.clone(), *end))
                .collect();
            let r = self.deny(&role, &entries).await;
            if let Ok(method) = &r {
                tracing::info!(role = %role, sessions = entries.len(), method = method.as_str(), "STS sessions revoked");
            }
            for (i, _, _) in &items {
                out[*i] = r
                    .as_ref()
                    .map(|m| Some(m.as_str().to_owned()))
                    .map_err(Clone::clone);
            }
        }
        out
    }

    async fn rollback_noted(&self, spec: &LeaseSpec) -> Result<Option<String>, ProviderError> {
        let role = self.role(&spec.role)?;
        let h = self.handle_for(role, spec);
        self.deny(&h.role_name, &[(h.source_identity, h.session_end)])
            .await
            .map(|m| Some(m.as_str().to_owned()))
    }

    async fn rollback(&self, spec: &LeaseSpec) -> Result<(), ProviderError> {
        self.rollback_noted(spec).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(max: u64) -> Role {
        Role {
            cfg: AwsRole {
                role_arn: "arn:aws:iam::123456789012:role/r".into(),
                max_ttl_seconds: max,
                session_policy: None,
                scopes: vec![],
                allow_role_chaining: false,
                external_id: None,
                description: String::new(),
            },
            name: "r".into(),
            template: policy::allow_all(),
        }
    }

    fn spec(ttl: u64) -> LeaseSpec {
        let t = Timestamp::from_unix_millis(1_800_000_000_000);
        LeaseSpec {
            lease_id: "lease_x".into(),
            task_id: "task_x".into(),
            workload: "w".into(),
            tenant: None,
            on_behalf_of: "u".into(),
            role: "r".into(),
            scope: vec![],
            issued_at: t,
            expires_at: t.saturating_add(Duration::from_secs(ttl)),
            prepared: None,
            binding: None,
        }
    }

    #[test]
    fn durations_clamp_to_aws_bounds_and_the_role() {
        for (ttl, max, want) in [
            (120, 3600, 900),
            (900, 3600, 900),
            (1200, 3600, 1200),
            (7200, 3600, 3600),
            (50_000, 43_200, 43_200),
        ] {
            assert_eq!(
                AwsStsProvider::duration(&role(max), &spec(ttl)),
                want,
                "{ttl}/{max}"
            );
        }
    }

    #[test]
    fn tag_values_and_session_names_are_checked() {
        assert!(tag_value_ok("dev:assistant-a"));
        assert!(tag_value_ok("spiffe://example.org/ns/a/sa/b"));
        assert!(!tag_value_ok("a\"b"));
        assert!(!tag_value_ok(&"x".repeat(257)));
        assert!(session_name_ok("lease_01jdq3"));
        assert!(!session_name_ok("l"));
        assert!(!session_name_ok("lease id"));
        assert!(!session_name_ok(&"x".repeat(65)));
    }

    #[test]
    fn policy_documents_from_iam_are_url_decoded() {
        assert_eq!(url_decode("%7B%22a%22%3A1%7D"), "{\"a\":1}");
        assert_eq!(url_decode("{\"a\":\"%7B\"}"), "{\"a\":\"%7B\"}");
    }
}
