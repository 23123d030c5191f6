//! The token provider's configuration (`type = "token"`) and its registry
//! entry: the broker knows it only through [`KIND`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use leasehold_provider::{BrokerLimits, BuildContext, Built, ConfigError, Kind, ProviderSettings};
use serde::{Deserialize, Serialize};

use crate::{TokenProvider, TokenRole, TokenSettings, valid_scope_token};

/// The registry entry of the token provider.
pub static KIND: Kind<TokenProviderConfig> = Kind::new();

/// `[providers.<name>]` with `type = "token"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenProviderConfig {
    /// `iss` of issued tokens.
    pub issuer: String,
    /// Default `aud`.
    pub audience: String,
    /// Ed25519 PKCS#8 (DER) signing key.
    pub signing_key_file: PathBuf,
    pub roles: BTreeMap<String, TokenRoleConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRoleConfig {
    pub scopes: Vec<String>,
    pub max_ttl_seconds: u64,
    pub audience: Option<String>,
    #[serde(default)]
    pub description: String,
    /// Refuse requests that do not prove a key (a DPoP proof, RFC 9449, or
    /// a TLS client certificate, RFC 8705), so every token of this role is
    /// sender-constrained: a copy is useless without the workload's key.
    #[serde(default)]
    pub require_binding: bool,
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl TokenProviderConfig {
    fn settings(&self) -> TokenSettings {
        TokenSettings {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            roles: self
                .roles
                .iter()
                .map(|(n, r)| {
                    (
                        n.clone(),
                        TokenRole {
                            scopes: r.scopes.clone(),
                            max_ttl: Duration::from_secs(r.max_ttl_seconds),
                            audience: r.audience.clone(),
                            description: r.description.clone(),
                            require_binding: r.require_binding,
                        },
                    )
                })
                .collect(),
        }
    }
}

#[async_trait::async_trait]
impl ProviderSettings for TokenProviderConfig {
    const TYPE: &'static str = "token";

    fn roles(&self) -> Vec<(&str, u64)> {
        leasehold_provider::role_ttls(&self.roles, |r| r.max_ttl_seconds)
    }

    fn validate(&self, limits: &BrokerLimits) -> Result<(), ConfigError> {
        if self.issuer.is_empty() {
            return Err(ConfigError::new("issuer", "must not be empty"));
        }
        if self.audience.is_empty() {
            return Err(ConfigError::new("audience", "must not be empty"));
        }
        if self.roles.is_empty() {
            return Err(ConfigError::new("roles", "configure at least one role"));
        }
        for (role, r) in &self.roles {
            let rf = format!("roles.{role}");
            if !is_name(role) {
                return Err(ConfigError::new(rf, "role names are 1-64 of [A-Za-z0-9_-]"));
            }
            if r.scopes.is_empty() {
                return Err(ConfigError::new(
                    format!("{rf}.scopes"),
                    "list at least one scope",
                ));
            }
            if let Some(s) = r.scopes.iter().find(|s| !valid_scope_token(s)) {
                return Err(ConfigError::new(
                    format!("{rf}.scopes"),
                    format!("`{s}` is not a valid OAuth scope token"),
                ));
            }
            if r.max_ttl_seconds == 0 || r.max_ttl_seconds > limits.max_lease_ttl_seconds {
                return Err(ConfigError::new(
                    format!("{rf}.max_ttl_seconds"),
                    format!(
                        "must be between 1 and limits.max_lease_ttl_seconds ({})",
                        limits.max_lease_ttl_seconds
                    ),
                ));
            }
        }
        Ok(())
    }

    fn files(&self) -> Vec<(&'static str, &Path)> {
        vec![("signing_key_file", self.signing_key_file.as_path())]
    }

    fn files_mut(&mut self) -> Vec<&mut PathBuf> {
        vec![&mut self.signing_key_file]
    }

    fn check_files(&self) -> Result<(), ConfigError> {
        let key = zeroize::Zeroizing::new(std::fs::read(&self.signing_key_file).map_err(|e| {
            ConfigError::new(
                "signing_key_file",
                format!("{}: {e}", self.signing_key_file.display()),
            )
        })?);
        ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&key).map_err(|_| {
            ConfigError::new(
                "signing_key_file",
                "not an Ed25519 PKCS#8 key (make one with `leasehold keygen token`)",
            )
        })?;
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> Result<Built, String> {
        let key = zeroize::Zeroizing::new(std::fs::read(&self.signing_key_file).map_err(|e| {
            format!(
                "cannot read signing key {}: {e}",
                self.signing_key_file.display()
            )
        })?);
        let p = Arc::new(
            TokenProvider::new(self.settings(), &key, ctx.denylist.clone())
                .map_err(|e| e.to_string())?,
        );
        Ok(Built {
            provider: p.clone(),
            tokens: Some(p),
        })
    }
}
