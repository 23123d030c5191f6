//! The contract between the leasehold broker and a credential provider.
//!
//! A provider mints a credential for one lease and takes it back. The broker
//! owns everything around that: the durable intent written before [`Provider::issue`]
//! is called, the encrypted storage of the [`RevocationHandle`], the retry
//! queue around [`Provider::revoke`], and crash recovery through
//! [`Provider::rollback`]. A provider therefore stays small, but it must keep
//! four promises, which the conformance kit (feature `conformance`) checks
//! against each provider's real peer:
//!
//! 1. `issue` never returns a credential that outlives `LeaseSpec::expires_at`.
//! 2. `revoke` is idempotent: revoking something already gone is success.
//! 3. `rollback` finds and kills whatever `issue` may have created for a lease
//!    id even though the broker never saw the handle (it crashed first), and
//!    is a no-op when nothing was created.
//! 4. After `revoke` or `rollback` returns `Ok`, the credential is unusable at
//!    the provider, not merely forgotten by the broker.
//!
//! Things deliberately absent: providers never see the broker's store, its
//! policy or its HTTP layer, and never depend on the broker crate.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

#[cfg(feature = "conformance")]
pub mod conformance;
mod kind;

pub use kind::{
    AnySettings, BrokerLimits, BuildContext, Built, Denylist, Kind, Now, ProviderKind,
    ProviderSettings, TokenInfo, TokenIssuer, role_ttls,
};

// === impl Timestamp ===

/// A point in time as milliseconds since the Unix epoch, UTC.
///
/// Providers get time from the broker (which gets it from its injected
/// clock), never from the system, so expiry is testable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_unix_millis(ms: i64) -> Self {
        Self(ms)
    }

    pub const fn unix_millis(self) -> i64 {
        self.0
    }

    /// Whole seconds, rounded down: a credential that carries a seconds
    /// expiry (a JWT `exp`, `VALID UNTIL`) then dies no later than the lease.
    pub const fn unix_seconds(self) -> i64 {
        self.0.div_euclid(1000)
    }

    pub fn saturating_add(self, d: Duration) -> Self {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(ms))
    }

    /// RFC 3339 in UTC, whole seconds (rounded down, as `unix_seconds`),
    /// for peers that take an expiry as a date (`endDateTime`, a
    /// policy's `DateLessThan`).
    pub fn rfc3339(self) -> String {
        time::OffsetDateTime::from_unix_timestamp(self.unix_seconds())
            .ok()
            .and_then(|d| {
                d.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default()
    }

    /// The time from `self` until `later`, zero if `later` is not later.
    pub fn until(self, later: Timestamp) -> Duration {
        let ms = later.0.saturating_sub(self.0).max(0);
        Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    }
}

// === impl ProviderError ===

/// How the broker should treat a failed provider call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The peer is unreachable, overloaded or sealed: try again later.
    Retryable,
    /// The peer refused for a reason retrying will not fix.
    Permanent,
    /// The request itself is wrong (unknown role, scope outside the
    /// template): the caller's fault, reported as bad input.
    Invalid,
}

/// A provider failure. The message is for operators: it goes to logs and to
/// the lease's `last_error`, so it must never contain secret material.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub class: ErrorClass,
    pub message: String,
}

impl ProviderError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Retryable,
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Invalid,
            message: message.into(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class == ErrorClass::Retryable
    }
}

// === impl Credential ===

/// One field of a credential: either safe to show (a username, an audience)
/// or secret (a token, a password). Secrets are zeroized on drop and redacted
/// from `Debug`.
pub enum CredentialValue {
    Public(String),
    Secret(SecretString),
}

impl fmt::Debug for CredentialValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Public(v) => f.debug_tuple("Public").field(v).finish(),
            Self::Secret(_) => f.write_str("Secret([REDACTED])"),
        }
    }
}

/// The credential handed to the caller exactly once. It is never stored by
/// the broker; it lives in memory only until the response is written.
#[derive(Debug, Default)]
pub struct Credential {
    fields: BTreeMap<String, CredentialValue>,
}

impl Credential {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn public(mut self, name: &str, value: impl Into<String>) -> Self {
        self.fields
            .insert(name.to_owned(), CredentialValue::Public(value.into()));
        self
    }

    pub fn secret(mut self, name: &str, value: impl Into<String>) -> Self {
        self.fields.insert(
            name.to_owned(),
            CredentialValue::Secret(SecretString::from(value.into())),
        );
        self
    }

    pub fn get(&self, name: &str) -> Option<&CredentialValue> {
        self.fields.get(name)
    }

    /// The exposed value of a field, public or secret. Call sites that use
    /// this are where secret material leaves its wrapper: keep them few.
    pub fn expose(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(|v| match v {
            CredentialValue::Public(s) => s.as_str(),
            CredentialValue::Secret(s) => s.expose_secret(),
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fields.keys().map(String::as_str)
    }

    /// Every secret value, exposed. For leak checks (tests, the conformance
    /// kit) that must prove a secret appears nowhere else.
    pub fn secret_values(&self) -> impl Iterator<Item = &str> {
        self.fields.values().filter_map(|v| match v {
            CredentialValue::Secret(s) => Some(s.expose_secret()),
            CredentialValue::Public(_) => None,
        })
    }

    /// The JSON object for the one response that carries the credential.
    /// The returned value holds exposed secrets: serialize it and drop it.
    pub fn to_response_json(&self) -> serde_json::Value {
        let map = self
            .fields
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    CredentialValue::Public(s) => s.clone(),
                    CredentialValue::Secret(s) => s.expose_secret().to_owned(),
                };
                (k.clone(), serde_json::Value::String(s))
            })
            .collect();
        serde_json::Value::Object(map)
    }
}

// === impl RevocationHandle ===

/// What a provider needs to take a credential back (a role name, an upstream
/// lease id, a key id). The broker encrypts it at rest; it is zeroized on
/// drop and never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct RevocationHandle(Zeroizing<Vec<u8>>);

impl RevocationHandle {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for RevocationHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RevocationHandle([REDACTED; {} bytes])", self.0.len())
    }
}

// === impl LeaseSpec ===

/// Everything a provider is told about the lease it is asked to mint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSpec {
    /// The broker's lease id: unique, safe to embed in names (ASCII
    /// alphanumerics and `_`). Providers derive deterministic names from it
    /// so that `rollback` can find what `issue` created.
    pub lease_id: String,
    pub task_id: String,
    /// The stable id of the workload the lease is for.
    pub workload: String,
    pub tenant: Option<String>,
    /// The user the assistant acts for (the `act` of delegation).
    pub on_behalf_of: String,
    pub role: String,
    /// The narrowing the call asked for; already validated by `validate`.
    pub scope: Vec<String>,
    pub issued_at: Timestamp,
    /// The broker's deadline: min(requested TTL, policy and config caps,
    /// task deadline, the role's max TTL). The credential must not outlive it.
    pub expires_at: Timestamp,
    /// What [`Provider::prepare`] returned for this lease, once the broker
    /// has stored it: given to `issue` and to `rollback`, `None` for
    /// providers that do not prepare.
    pub prepared: Option<RevocationHandle>,
    /// The key the workload proved it holds with this request (a DPoP
    /// proof, or its TLS client certificate), for providers that bind
    /// their credentials to it ([`Provider::binding`]); `None` otherwise.
    pub binding: Option<KeyBinding>,
}

/// The key a credential is bound to, so that a copy of it is useless
/// without the workload's private key (a sender-constrained credential).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyBinding {
    /// RFC 9449 (DPoP): the base64url SHA-256 JWK thumbprint (RFC 7638) of
    /// the public key that signed the request's proof; `cnf.jkt`.
    Dpop { jkt: String },
    /// RFC 8705 (mutual TLS): the base64url SHA-256 of the DER of the
    /// client certificate the request arrived with; `cnf["x5t#S256"]`.
    Mtls { x5t_s256: String },
}

impl KeyBinding {
    /// `dpop` or `mtls`: what policies and events see.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Dpop { .. } => "dpop",
            Self::Mtls { .. } => "mtls",
        }
    }

    /// The JWT confirmation claim (RFC 7800) that carries the binding.
    pub fn cnf(&self) -> serde_json::Value {
        match self {
            Self::Dpop { jkt } => serde_json::json!({ "jkt": jkt }),
            Self::Mtls { x5t_s256 } => serde_json::json!({ "x5t#S256": x5t_s256 }),
        }
    }

    /// Read a confirmation claim back; `None` for anything else.
    pub fn from_cnf(v: &serde_json::Value) -> Option<Self> {
        let o = v.as_object()?;
        match (o.get("jkt"), o.get("x5t#S256")) {
            (Some(j), None) => Some(Self::Dpop {
                jkt: j.as_str()?.to_owned(),
            }),
            (None, Some(x)) => Some(Self::Mtls {
                x5t_s256: x.as_str()?.to_owned(),
            }),
            _ => None,
        }
    }
}

/// Whether a provider binds a role's credentials to the requester's key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BindingSupport {
    /// Its credentials cannot be bound; a proof sent with a request is
    /// ignored (the request counts as unbound).
    #[default]
    Unsupported,
    /// Bound when the request proves a key, bearer otherwise.
    Optional,
    /// Only bound requests are served (`require_binding = true`): the broker
    /// refuses an unbound one before it records anything.
    Required,
}

/// What `issue` returns.
#[derive(Debug)]
pub struct Issued {
    pub credential: Credential,
    pub handle: RevocationHandle,
    /// When the credential dies on its own, at or before `LeaseSpec::expires_at`.
    pub expires_at: Timestamp,
    /// One line for the lease record: what was minted and how it is revoked.
    pub description: String,
}

/// What `revoke` is given: the stored handle and enough context to log.
#[derive(Clone, Debug)]
pub struct RevokeSpec {
    pub lease_id: String,
    pub role: String,
    pub expires_at: Timestamp,
    pub handle: RevocationHandle,
}

impl RevokeSpec {
    /// Revoke what `issue` returned for `spec`.
    pub fn of(spec: &LeaseSpec, issued: &Issued) -> Self {
        Self {
            lease_id: spec.lease_id.clone(),
            role: spec.role.clone(),
            expires_at: issued.expires_at,
            handle: issued.handle.clone(),
        }
    }
}

/// A role a provider offers, with its ceiling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleInfo {
    pub name: String,
    pub max_ttl: Duration,
    pub description: String,
}

/// A provider's self-description, shown by the API and used by the broker to
/// validate requests before any intent is written.
#[derive(Clone, Debug)]
pub struct Description {
    /// The `type` in config, e.g. `token`, `postgres`.
    pub kind: &'static str,
    pub roles: Vec<RoleInfo>,
    /// How revocation works and what it guarantees, in one sentence.
    pub revocation: String,
}

impl Description {
    pub fn role(&self, name: &str) -> Option<&RoleInfo> {
        self.roles.iter().find(|r| r.name == name)
    }
}

/// A credential provider. Implementations are `Send + Sync` and shared by
/// every request; they hold their own connection pools.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + fmt::Debug + 'static {
    fn describe(&self) -> Description;

    /// Check a request before the broker writes its intent: the role exists
    /// and the scope is within what the role's template allows. Errors are of
    /// class `Invalid`. Returns the role's maximum TTL.
    fn validate(&self, role: &str, scope: &[String]) -> Result<Duration, ProviderError>;

    /// Whether `role`'s credentials are bound to the key the request proves
    /// ([`LeaseSpec::binding`]). The default: never.
    fn binding(&self, _role: &str) -> BindingSupport {
        BindingSupport::Unsupported
    }

    /// Can this provider mint and revoke right now? Used by readiness.
    async fn health(&self) -> Result<(), ProviderError>;

    /// What an operator should act on before it stops the provider, found
    /// at health time (PostgreSQL: an access list nearing what its catalog
    /// row holds). Asked only after `health` passed; each line says what,
    /// how far, and what to change. The default: nothing.
    async fn advisories(&self) -> Vec<String> {
        Vec::new()
    }

    /// Create, before minting, whatever the credential will hang on, for a
    /// peer where `rollback` could not otherwise find it from the lease id
    /// (Vault: a per-lease token whose leases die with it). The broker
    /// stores the returned handle durably, sealed, before it calls `issue`,
    /// and gives it to `issue` and `rollback` as `LeaseSpec::prepared`. What
    /// `prepare` creates must die on its own by `LeaseSpec::expires_at`, since
    /// a crash can land between it and the broker's record.
    async fn prepare(&self, _spec: &LeaseSpec) -> Result<Option<RevocationHandle>, ProviderError> {
        Ok(None)
    }

    /// Mint a credential for one lease.
    async fn issue(&self, spec: &LeaseSpec) -> Result<Issued, ProviderError>;

    /// Take a credential back. Idempotent: already gone is `Ok`.
    async fn revoke(&self, lease: &RevokeSpec) -> Result<(), ProviderError>;

    /// Revoke many at once. The default calls `revoke` for each, a few at a
    /// time; providers with a batch primitive override it. The result has
    /// one entry per input, in order.
    async fn revoke_many(&self, leases: &[RevokeSpec]) -> Vec<Result<(), ProviderError>> {
        let mut out = Vec::with_capacity(leases.len());
        for lease in leases {
            out.push(self.revoke(lease).await);
        }
        out
    }

    /// `revoke_many`, also saying how each lease was revoked, for providers
    /// that have more than one way (AWS: a deny on the session's identity,
    /// or an issue-time cut-off for the whole role). The broker calls this
    /// one and records the note on the lease and in its event.
    async fn revoke_many_noted(
        &self,
        leases: &[RevokeSpec],
    ) -> Vec<Result<Option<String>, ProviderError>> {
        self.revoke_many(leases)
            .await
            .into_iter()
            .map(|r| r.map(|()| None))
            .collect()
    }

    /// `rollback`, also saying how, as `revoke_many_noted` does.
    async fn rollback_noted(&self, spec: &LeaseSpec) -> Result<Option<String>, ProviderError> {
        self.rollback(spec).await.map(|()| None)
    }

    /// Undo an `issue` whose result the broker never recorded (it crashed
    /// between intent and activation). Must find the credential from the
    /// spec alone (with `spec.prepared` when `prepare` returned a handle and
    /// the broker stored it), and succeed when nothing was created.
    async fn rollback(&self, spec: &LeaseSpec) -> Result<(), ProviderError>;

    /// Everything at the peer that carries this broker's mark (a role name
    /// prefix, a tag), for reconciliation after crashes outside the
    /// broker's control. `None`: this provider cannot enumerate (its
    /// credentials die on their own, or the peer has no listing).
    async fn inventory(&self) -> Result<Option<Vec<Found>>, ProviderError> {
        Ok(None)
    }

    /// Does `credential` work at the peer right now? For conformance runs
    /// against a configured provider (`leasehold providers conformance`),
    /// which must use a credential, not trust the broker's bookkeeping.
    /// `Ok(None)`: this provider cannot check its own credentials.
    async fn probe(
        &self,
        _spec: &LeaseSpec,
        _credential: &Credential,
    ) -> Result<Option<bool>, ProviderError> {
        Ok(None)
    }

    /// Remove one thing `inventory` found that no live lease accounts for.
    /// Idempotent. Must refuse anything without the broker's mark.
    async fn remove(&self, found: &Found) -> Result<(), ProviderError> {
        Err(ProviderError::invalid(format!(
            "this provider cannot remove `{}`",
            found.name
        )))
    }
}

/// A configured role by name, or an `Invalid` error listing the roles there
/// are (what every provider's `validate` and `issue` answer for an unknown
/// role).
pub fn configured_role<'a, R>(
    roles: &'a BTreeMap<String, R>,
    name: &str,
) -> Result<&'a R, ProviderError> {
    roles.get(name).ok_or_else(|| {
        ProviderError::invalid(format!(
            "no role `{name}`; configured: {}",
            roles.keys().cloned().collect::<Vec<_>>().join(", ")
        ))
    })
}

/// The one scope a call narrows a role to, for providers whose role
/// templates take `{{scope}}` (`scoped`) from an allowlist in which an entry
/// ending in `*` allows any scope with that prefix. `valid` checks the
/// value's characters (nothing that could widen it). `None`: the role is
/// not scoped and none was asked for. Errors are `Invalid`.
pub fn one_scope<'a>(
    role: &str,
    scoped: bool,
    scope: &'a [String],
    allowlist: &[String],
    valid: impl Fn(&str) -> bool,
) -> Result<Option<&'a str>, ProviderError> {
    match (scoped, scope) {
        (false, []) => Ok(None),
        (false, _) => Err(ProviderError::invalid(format!(
            "role `{role}` takes no scope"
        ))),
        (true, [one]) => {
            let allowed = valid(one)
                && allowlist.iter().any(|s| match s.strip_suffix('*') {
                    Some(prefix) => one.starts_with(prefix),
                    None => s == one,
                });
            if allowed {
                Ok(Some(one.as_str()))
            } else {
                Err(ProviderError::invalid(format!(
                    "scope `{one}` is not allowed for role `{role}`; allowed: {}",
                    allowlist.join(", ")
                )))
            }
        }
        (true, _) => Err(ProviderError::invalid(format!(
            "role `{role}` takes exactly one scope, one of: {}",
            allowlist.join(", ")
        ))),
    }
}

/// An error and its sources, one line: for provider messages built from a
/// client library's error (never from a response body).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// A peer's program for tests and tools: the path in the environment
/// variable `env`, else `name` found on `PATH`.
pub fn find_program(env: &str, name: &str) -> Option<std::path::PathBuf> {
    if let Some(b) = std::env::var_os(env) {
        return Some(b.into());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|b| b.is_file())
}

/// Is `host` (a name or an IP literal, brackets allowed) a loopback address?
/// Providers allow plain-text transports only to these.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// A provider configuration error: the field (relative to the provider's
/// table in the broker's config) and what is wrong with it. The broker
/// prefixes the field with `providers.NAME.`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A credential found at a provider's peer by [`Provider::inventory`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The peer's name for it (a role name): public, never secret.
    pub name: String,
    /// The lease id the name encodes, when it parses as one.
    pub lease_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secrets() {
        let c = Credential::new()
            .public("user", "alice")
            .secret("token", "s3cr3t-value");
        let dbg = format!("{c:?}");
        assert!(dbg.contains("alice"));
        assert!(!dbg.contains("s3cr3t-value"), "{dbg}");
        let h = RevocationHandle::new(b"handle-bytes".to_vec());
        assert!(!format!("{h:?}").contains("handle-bytes"));
    }

    #[test]
    fn response_json_exposes_both_kinds() {
        let c = Credential::new()
            .public("user", "alice")
            .secret("token", "t");
        let v = c.to_response_json();
        assert_eq!(v["user"], "alice");
        assert_eq!(v["token"], "t");
        assert_eq!(c.secret_values().collect::<Vec<_>>(), vec!["t"]);
    }

    #[test]
    fn timestamp_seconds_round_down() {
        assert_eq!(Timestamp::from_unix_millis(1_999).unix_seconds(), 1);
        assert_eq!(Timestamp::from_unix_millis(-1).unix_seconds(), -1);
        let t = Timestamp::from_unix_millis(1000);
        assert_eq!(t.until(Timestamp::from_unix_millis(500)), Duration::ZERO);
        assert_eq!(
            t.until(Timestamp::from_unix_millis(3000)),
            Duration::from_secs(2)
        );
        assert_eq!(t.saturating_add(Duration::from_secs(1)).unix_millis(), 2000);
    }
}
