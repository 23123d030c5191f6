//! What a provider kind registers with the broker, so that adding a
//! provider is its crate, one line in the broker's registry and one Cargo
//! line: nothing else in the broker names a kind.
//!
//! A kind is the `type` written in configuration. It parses its own TOML
//! table into a [`ProviderSettings`] value (errors name the field path),
//! which the broker then asks for everything it needs without knowing the
//! type: offline validation, the roles policy sees, the files to resolve
//! against the configuration's folder and to check, a dry run against the
//! peer for `config validate`, and how to build the provider with the
//! facilities the broker offers ([`BuildContext`]). Optional capabilities
//! come back with the built provider ([`Built`]).

use std::any::Any;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{ConfigError, Provider, ProviderError, Timestamp};

/// The broker's limits a provider's configuration is checked against.
#[derive(Clone, Copy, Debug)]
pub struct BrokerLimits {
    /// `limits.max_lease_ttl_seconds`: no role may allow more.
    pub max_lease_ttl_seconds: u64,
    /// `reaper.provider_timeout_seconds`: how long the broker waits for a
    /// provider call.
    pub provider_timeout_seconds: u64,
}

/// The broker's clock, for providers whose requests need "now" (they
/// never read the system time).
pub type Now = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// A durable list of revoked token ids that the broker keeps in its own
/// store (so a revocation is acknowledged once it is committed).
#[async_trait::async_trait]
pub trait Denylist: Send + Sync + fmt::Debug + 'static {
    /// Mark these token ids inactive until their expiry.
    async fn deny(&self, entries: &[(String, Timestamp)]) -> Result<(), String>;
    /// Is this token id marked inactive?
    fn is_denied(&self, jti: &str) -> Result<bool, String>;
}

/// What the broker hands a kind when it builds a provider.
#[derive(Clone)]
pub struct BuildContext {
    pub limits: BrokerLimits,
    pub now: Now,
    /// The broker's denylist, for providers that revoke by marking a token
    /// inactive (they then issue tokens the broker introspects).
    pub denylist: Arc<dyn Denylist>,
}

impl fmt::Debug for BuildContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BuildContext")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// An RFC 7662 answer about a token a provider issued, as the claims the
/// broker reports (inactive tokens say nothing else).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenInfo {
    pub active: bool,
    pub iss: Option<String>,
    pub sub: Option<String>,
    pub aud: Option<String>,
    pub iat: Option<i64>,
    pub nbf: Option<i64>,
    pub exp: Option<i64>,
    /// The lease id.
    pub jti: Option<String>,
    pub task: Option<String>,
    pub role: Option<String>,
    pub scope: Option<String>,
    pub tenant: Option<String>,
    /// The user the task acts for (RFC 8693 `act`).
    pub act: Option<String>,
    /// The key the token is bound to (RFC 7800 `cnf`), if it is.
    pub cnf: Option<crate::KeyBinding>,
    pub token_type: Option<&'static str>,
}

/// Capability: the provider issues tokens that resource servers check with
/// the broker (RFC 7662 introspection) or verify with its public keys.
/// Its revocation is an entry in the broker's own store, so the broker
/// revokes its leases inside the transaction that decides it.
pub trait TokenIssuer: Provider {
    /// The public keys, as a JWK Set (`{"keys": [...]}`).
    fn jwks(&self) -> serde_json::Value;
    /// Whether `token` is one of ours, unexpired and not revoked.
    fn introspect(&self, token: &str, now: Timestamp) -> TokenInfo;
}

/// A built provider and its optional capabilities.
#[derive(Debug, Clone)]
pub struct Built {
    pub provider: Arc<dyn Provider>,
    pub tokens: Option<Arc<dyn TokenIssuer>>,
}

impl Built {
    /// A provider with no capability beyond the trait.
    pub fn plain(provider: Arc<dyn Provider>) -> Self {
        Self {
            provider,
            tokens: None,
        }
    }
}

/// `roles()` for the usual shape: a map of role name to a role whose
/// `max_ttl_seconds` `ttl` reads.
pub fn role_ttls<R>(
    roles: &std::collections::BTreeMap<String, R>,
    ttl: impl Fn(&R) -> u64,
) -> Vec<(&str, u64)> {
    roles.iter().map(|(n, r)| (n.as_str(), ttl(r))).collect()
}

/// A provider kind's configuration: what its crate implements. The
/// broker's registry holds a [`Kind`] of it.
#[async_trait::async_trait]
pub trait ProviderSettings:
    DeserializeOwned + Serialize + Clone + fmt::Debug + Send + Sync + 'static
{
    /// The `type` written in configuration.
    const TYPE: &'static str;

    /// Every role with its `max_ttl_seconds`.
    fn roles(&self) -> Vec<(&str, u64)>;

    /// Offline checks; errors name the field below `providers.<name>`.
    fn validate(&self, limits: &BrokerLimits) -> Result<(), ConfigError>;

    /// The files the configuration names, by field: resolved against the
    /// configuration's folder, and checked by `config validate`.
    fn files(&self) -> Vec<(&'static str, &Path)> {
        Vec::new()
    }

    /// The same files, to resolve in place.
    fn files_mut(&mut self) -> Vec<&mut PathBuf> {
        Vec::new()
    }

    /// `config validate`'s file checks: by default every named file must
    /// exist. Never prints a secret.
    fn check_files(&self) -> Result<(), ConfigError> {
        for (field, f) in self.files() {
            std::fs::metadata(f)
                .map_err(|e| ConfigError::new(field, format!("{}: {e}", f.display())))?;
        }
        Ok(())
    }

    /// `config validate`'s dry run against the peer, if the kind has one:
    /// `Ok(Some(what was checked))`; a retryable error means the peer could
    /// not be reached (reported, not fatal).
    async fn dry_run(&self, _limits: &BrokerLimits) -> Result<Option<String>, ProviderError> {
        Ok(None)
    }

    /// What is valid but will hurt in production (a template that stops
    /// working past some number of leases, ...): each a sentence naming
    /// the field below `providers.<name>`, printed by `config validate` and
    /// logged at start.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// Build the provider.
    fn build(&self, ctx: &BuildContext) -> Result<Built, String>;
}

/// A kind as the broker holds it: object-safe, so the registry is a list.
#[async_trait::async_trait]
pub trait AnySettings: fmt::Debug + Send + Sync + Any {
    fn type_name(&self) -> &'static str;
    fn roles(&self) -> Vec<(&str, u64)>;
    fn validate(&self, limits: &BrokerLimits) -> Result<(), ConfigError>;
    fn files_mut(&mut self) -> Vec<&mut PathBuf>;
    fn check_files(&self) -> Result<(), ConfigError>;
    async fn dry_run(&self, limits: &BrokerLimits) -> Result<Option<String>, ProviderError>;
    fn warnings(&self) -> Vec<String>;
    fn build(&self, ctx: &BuildContext) -> Result<Built, String>;
    /// The table as written (without `type`).
    fn to_toml(&self) -> Result<toml::Table, String>;
    fn clone_box(&self) -> Box<dyn AnySettings>;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

#[async_trait::async_trait]
impl<T: ProviderSettings> AnySettings for T {
    fn type_name(&self) -> &'static str {
        T::TYPE
    }
    fn roles(&self) -> Vec<(&str, u64)> {
        ProviderSettings::roles(self)
    }
    fn validate(&self, limits: &BrokerLimits) -> Result<(), ConfigError> {
        ProviderSettings::validate(self, limits)
    }
    fn files_mut(&mut self) -> Vec<&mut PathBuf> {
        ProviderSettings::files_mut(self)
    }
    fn check_files(&self) -> Result<(), ConfigError> {
        ProviderSettings::check_files(self)
    }
    async fn dry_run(&self, limits: &BrokerLimits) -> Result<Option<String>, ProviderError> {
        ProviderSettings::dry_run(self, limits).await
    }
    fn warnings(&self) -> Vec<String> {
        ProviderSettings::warnings(self)
    }
    fn build(&self, ctx: &BuildContext) -> Result<Built, String> {
        ProviderSettings::build(self, ctx)
    }
    fn to_toml(&self) -> Result<toml::Table, String> {
        toml::Table::try_from(self).map_err(|e| e.to_string())
    }
    fn clone_box(&self) -> Box<dyn AnySettings> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A registered kind: parses its `type`'s tables.
pub trait ProviderKind: Send + Sync + 'static {
    /// The `type` written in configuration.
    fn type_name(&self) -> &'static str;
    /// Parse one provider's table (without `type`); the error names the
    /// field path, as the `toml` crate reports it.
    fn parse(&self, table: toml::Table) -> Result<Box<dyn AnySettings>, String>;
}

/// The registry entry of a [`ProviderSettings`] type:
/// `pub static KIND: Kind<MyConfig> = Kind::new();` in the provider crate,
/// `&my_provider::KIND` in the broker's registry.
pub struct Kind<T>(PhantomData<fn() -> T>);

impl<T> Kind<T> {
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

impl<T> Default for Kind<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for Kind<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kind")
    }
}

impl<T: ProviderSettings> ProviderKind for Kind<T> {
    fn type_name(&self) -> &'static str {
        T::TYPE
    }

    fn parse(&self, table: toml::Table) -> Result<Box<dyn AnySettings>, String> {
        toml::Value::Table(table)
            .try_into::<T>()
            .map(|t| Box::new(t) as Box<dyn AnySettings>)
            .map_err(|e| e.to_string().trim_end().to_owned())
    }
}
