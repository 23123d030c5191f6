//! The catalog entry (`type = "plugin"`): the program, its pinned digest,
//! its environment, its timeout and the plugin's own configuration, with
//! the offline checks, the files `config validate` checks, its dry run
//! (start the plugin, hand it its configuration, ask its health) and how
//! the provider is built.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use leasehold_provider::{
    BrokerLimits, BuildContext, Built, ConfigError, Kind, ProviderError, ProviderSettings,
};
use serde::{Deserialize, Serialize};

use crate::convert::outcome;
use crate::host::PluginProvider;
use crate::process::{self, status_text};
use crate::wire;

/// The registry entry: `type = "plugin"`.
pub static KIND: Kind<PluginConfig> = Kind::new();

const MAX_TIMEOUT_SECONDS: u64 = 600;

fn default_timeout() -> u64 {
    10
}

/// A catalog entry: the program, its pinned digest, its environment and
/// its own configuration, which the broker hands it at start and does not
/// read beyond `roles.<name>.max_ttl_seconds` (what policy is checked
/// against).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The program; relative paths are resolved against the configuration's
    /// folder.
    pub command: PathBuf,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// The program's SHA-256 (hex), checked before every start.
    pub sha256: String,
    /// The plugin's whole environment, with `PATH` and the socket's: the
    /// broker's own environment is not passed on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The longest the broker waits for the plugin to start or to answer a
    /// call.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// The plugin's own configuration, passed to it as JSON over the socket
    /// (never in its arguments or environment). It must have
    /// `roles.<name>.max_ttl_seconds` for every role.
    #[serde(default)]
    pub config: toml::Table,
}

impl std::fmt::Debug for PluginConfig {
    // the environment's values and the plugin's configuration may hold
    // secrets: names only
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginConfig")
            .field("command", &self.command)
            .field("args", &self.args)
            .field("sha256", &self.sha256)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("timeout_seconds", &self.timeout_seconds)
            .field("config", &self.config.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PluginConfig {
    /// The roles of `config.roles` with their `max_ttl_seconds` (0 when
    /// missing or not a positive integer; `validate` says so).
    pub fn role_ttls(&self) -> Vec<(&str, u64)> {
        let Some(toml::Value::Table(roles)) = self.config.get("roles") else {
            return Vec::new();
        };
        roles
            .iter()
            .map(|(name, r)| {
                let max = r
                    .get("max_ttl_seconds")
                    .and_then(toml::Value::as_integer)
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or(0);
                (name.as_str(), max)
            })
            .collect()
    }

    /// What the broker calls this plugin in messages: the program's name.
    pub fn label(&self) -> String {
        self.command
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.command.display().to_string())
    }

    pub(crate) fn limits(&self, limits: &BrokerLimits) -> wire::Limits {
        wire::Limits {
            max_lease_ttl_seconds: limits.max_lease_ttl_seconds,
            provider_timeout_seconds: limits.provider_timeout_seconds,
        }
    }
}

#[async_trait::async_trait]
impl ProviderSettings for PluginConfig {
    const TYPE: &'static str = "plugin";

    fn roles(&self) -> Vec<(&str, u64)> {
        self.role_ttls()
    }

    fn validate(&self, limits: &BrokerLimits) -> Result<(), ConfigError> {
        if self.command.as_os_str().is_empty() {
            return Err(ConfigError::new(
                "command",
                "must name the plugin's program",
            ));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ConfigError::new(
                "sha256",
                "must be the program's SHA-256 as 64 hex digits (`sha256sum PROGRAM`)",
            ));
        }
        if !(1..=MAX_TIMEOUT_SECONDS).contains(&self.timeout_seconds) {
            return Err(ConfigError::new(
                "timeout_seconds",
                format!("must be between 1 and {MAX_TIMEOUT_SECONDS}"),
            ));
        }
        for name in self.env.keys() {
            let valid = name.bytes().enumerate().all(|(i, b)| {
                b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit())
            });
            if !valid || name.is_empty() {
                return Err(ConfigError::new(
                    format!("env.{name}"),
                    "is not an environment variable name",
                ));
            }
            if name.starts_with("LEASEHOLD_PLUGIN_") {
                return Err(ConfigError::new(
                    format!("env.{name}"),
                    "LEASEHOLD_PLUGIN_* is set by the broker",
                ));
            }
        }
        let roles = self.role_ttls();
        if roles.is_empty() {
            return Err(ConfigError::new(
                "config.roles",
                "the plugin's configuration must list its roles, each with `max_ttl_seconds`",
            ));
        }
        for (name, max) in roles {
            if max == 0 || max > limits.max_lease_ttl_seconds {
                return Err(ConfigError::new(
                    format!("config.roles.{name}.max_ttl_seconds"),
                    format!(
                        "must be a whole number of seconds between 1 and limits.max_lease_ttl_seconds ({})",
                        limits.max_lease_ttl_seconds
                    ),
                ));
            }
        }
        Ok(())
    }

    fn files(&self) -> Vec<(&'static str, &Path)> {
        vec![("command", self.command.as_path())]
    }

    fn files_mut(&mut self) -> Vec<&mut PathBuf> {
        vec![&mut self.command]
    }

    fn check_files(&self) -> Result<(), ConfigError> {
        process::check_program(self).map_err(|m| ConfigError::new("command", m))
    }

    /// Start the plugin, hand it its configuration, compare its roles, ask
    /// its health, stop it.
    async fn dry_run(&self, limits: &BrokerLimits) -> Result<Option<String>, ProviderError> {
        let timeout = Duration::from_secs(self.timeout_seconds);
        let label = self.label();
        let mut running = process::start(&label, &label, self, self.limits(limits), timeout)
            .await
            .map_err(|m| ProviderError::permanent(format!("plugin `{label}`: {m}")))?;
        let health = tokio::time::timeout(timeout, running.client.health(wire::HealthRequest {}))
            .await
            .map_err(|_| ProviderError::retryable(format!("plugin `{label}`: Health timed out")))?
            .map_err(|s| {
                ProviderError::retryable(format!("plugin `{label}`: {}", status_text(&s)))
            })?
            .into_inner();
        outcome(health.error)?;
        let _ = running.child.start_kill();
        Ok(Some(format!(
            "plugin `{label}` ({} {}) started, speaks protocol {}, offers the catalog's {} role(s), healthy",
            running.handshake.plugin,
            running.handshake.version,
            running.handshake.protocol_version,
            running.describe.roles.len()
        )))
    }

    fn build(&self, ctx: &BuildContext) -> Result<Built, String> {
        let provider = PluginProvider::start(self.clone(), &ctx.limits)?;
        Ok(Built::plain(Arc::new(provider)))
    }
}
