//! The provider's configuration (the plugin's `config` table, or
//! `[providers.NAME]` of `type = "mysql"` in process) and its offline
//! checks. Everything that reaches SQL text is checked here or in
//! `names`: identifiers and host patterns by their characters, statements
//! by their placeholders.

use std::collections::BTreeMap;
use std::path::PathBuf;

use leasehold_provider::ConfigError;
use serde::{Deserialize, Serialize};

/// MariaDB user names are at most 80 characters (MySQL: 32).
pub const MAX_USER: usize = 80;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// TLS with the server's certificate checked against `ca_file` and its
    /// name against `host`.
    #[default]
    VerifyFull,
    /// Plain TCP: only to a loopback host or a Unix socket.
    Disable,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    /// Host name, IP address, or a Unix socket path (starting `/`).
    pub host: String,
    #[serde(default = "defaults::port")]
    pub port: u16,
    /// The management user: `CREATE USER`, `PROCESS`, `CONNECTION ADMIN`
    /// (or `SUPER`), `SELECT` on `mysql.user`, and every privilege the
    /// grants give, `WITH GRANT OPTION`.
    pub user: String,
    /// The management user's password, read when the provider starts.
    pub password_file: Option<PathBuf>,
    /// Or: the environment variable holding it (the catalog's `env`).
    pub password_env: Option<String>,
    #[serde(default)]
    pub tls: TlsMode,
    /// PEM roots for `tls = "verify-full"`.
    pub ca_file: Option<PathBuf>,
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    #[serde(default = "defaults::connect_timeout_seconds")]
    pub connect_timeout_seconds: u64,
    /// Every leased user is `<prefix><lease id>`; reconciliation only ever
    /// touches users with this prefix.
    #[serde(default = "defaults::user_prefix")]
    pub user_prefix: String,
    /// How long revocation waits for a user's killed sessions to be gone.
    #[serde(default = "defaults::session_wait_millis")]
    pub session_wait_millis: u64,
    /// A schema where, at each issue, an event is created that drops the
    /// user at the lease's end: the server's own backstop should the broker
    /// be gone (needs `event_scheduler = ON` and the `EVENT` privilege on
    /// the schema). Unset: the broker's reaper alone ends the lease.
    pub expiry_schema: Option<String>,
    pub roles: BTreeMap<String, MysqlRole>,
}

/// A role template: what one lease of this role may do.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlRole {
    pub max_ttl_seconds: u64,
    /// The account's host part (`'user'@'host'`): a host name, address or
    /// pattern (`%`, `10.0.%`).
    #[serde(default = "defaults::account_host")]
    pub host: String,
    /// Concurrent sessions one leased user may open.
    #[serde(default = "defaults::max_user_connections")]
    pub max_user_connections: u32,
    /// Statements run after `CREATE USER`, e.g. `GRANT SELECT ON {{scope}}.*
    /// TO {{user}}`. Placeholders: `{{user}}` (the account, quoted), and
    /// `{{scope}}` (a schema, quoted: the statement runs once per scope).
    pub grants: Vec<String>,
    /// The schemas a call may narrow the lease to. A call naming none gets
    /// all of them.
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub description: String,
}

mod defaults {
    pub fn port() -> u16 {
        3306
    }
    pub fn pool_size() -> usize {
        8
    }
    pub fn connect_timeout_seconds() -> u64 {
        5
    }
    pub fn user_prefix() -> String {
        "lh_".into()
    }
    pub fn session_wait_millis() -> u64 {
        5000
    }
    pub fn account_host() -> String {
        "%".into()
    }
    pub fn max_user_connections() -> u32 {
        5
    }
}

/// A schema or user-name part we put between quotes: letters, digits, `_`
/// and `$`, so no quoting rule of any SQL mode can be broken out of.
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
}

/// An account host pattern: a name, an address, `%` and `_` wildcards.
pub fn is_host_pattern(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'%' | b'_' | b':'))
}

const PLACEHOLDERS: [&str; 2] = ["{{user}}", "{{scope}}"];

impl MysqlConfig {
    pub fn validate(&self, max_lease_ttl_seconds: u64) -> Result<(), ConfigError> {
        let is_socket = self.host.starts_with('/');
        if self.host.is_empty() {
            return Err(ConfigError::new("host", "must not be empty"));
        }
        if self.user.is_empty() {
            return Err(ConfigError::new("user", "must not be empty"));
        }
        match (&self.password_file, &self.password_env) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "password_file",
                    "give `password_file` or `password_env`, not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "password_file",
                    "the management user's password: `password_file` or `password_env`",
                ));
            }
            _ => {}
        }
        match self.tls {
            TlsMode::Disable if !is_socket && !leasehold_provider::is_loopback_host(&self.host) => {
                return Err(ConfigError::new(
                    "tls",
                    "plain connections are allowed only to a loopback host or a Unix socket; use `verify-full` with `ca_file`",
                ));
            }
            TlsMode::VerifyFull if !is_socket && self.ca_file.is_none() => {
                return Err(ConfigError::new(
                    "ca_file",
                    "`tls = \"verify-full\"` checks the server against this PEM file",
                ));
            }
            _ => {}
        }
        if !(1..=64).contains(&self.pool_size) {
            return Err(ConfigError::new("pool_size", "must be between 1 and 64"));
        }
        if !(1..=60).contains(&self.connect_timeout_seconds) {
            return Err(ConfigError::new(
                "connect_timeout_seconds",
                "must be between 1 and 60",
            ));
        }
        if !is_identifier(&self.user_prefix) || self.user_prefix.len() > 16 {
            return Err(ConfigError::new(
                "user_prefix",
                "must be 1 to 16 letters, digits or `_`",
            ));
        }
        if self.user_prefix.len() + crate::LEASE_ID_LEN > MAX_USER {
            return Err(ConfigError::new(
                "user_prefix",
                format!("with a lease id the user name would pass {MAX_USER} characters"),
            ));
        }
        if !(100..=120_000).contains(&self.session_wait_millis) {
            return Err(ConfigError::new(
                "session_wait_millis",
                "must be between 100 and 120000",
            ));
        }
        if let Some(s) = &self.expiry_schema
            && !is_identifier(s)
        {
            return Err(ConfigError::new(
                "expiry_schema",
                "must be a schema name of letters, digits, `_` or `$`",
            ));
        }
        if self.roles.is_empty() {
            return Err(ConfigError::new("roles", "at least one role"));
        }
        for (name, r) in &self.roles {
            let field = |f: &str| format!("roles.{name}.{f}");
            if r.max_ttl_seconds == 0 || r.max_ttl_seconds > max_lease_ttl_seconds {
                return Err(ConfigError::new(
                    field("max_ttl_seconds"),
                    format!(
                        "must be between 1 and limits.max_lease_ttl_seconds ({max_lease_ttl_seconds})"
                    ),
                ));
            }
            if !is_host_pattern(&r.host) {
                return Err(ConfigError::new(
                    field("host"),
                    "must be a host name, address or pattern (letters, digits, `.-%_:`)",
                ));
            }
            if r.max_user_connections == 0 {
                return Err(ConfigError::new(
                    field("max_user_connections"),
                    "must be at least 1 (0 means unlimited to the server)",
                ));
            }
            if r.grants.is_empty() {
                return Err(ConfigError::new(
                    field("grants"),
                    "at least one statement: a user with no grant can do nothing",
                ));
            }
            for (i, g) in r.grants.iter().enumerate() {
                check_statement(g)
                    .map_err(|m| ConfigError::new(format!("{}[{i}]", field("grants")), m))?;
                if g.contains("{{scope}}") && r.scopes.is_empty() {
                    return Err(ConfigError::new(
                        format!("{}[{i}]", field("grants")),
                        "uses {{scope}} but the role lists no `scopes`",
                    ));
                }
            }
            for (i, s) in r.scopes.iter().enumerate() {
                if !is_identifier(s) {
                    return Err(ConfigError::new(
                        format!("{}[{i}]", field("scopes")),
                        "must be a schema name of letters, digits, `_` or `$`",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Every `{{...}}` in a statement must be a known placeholder.
fn check_statement(s: &str) -> Result<(), String> {
    let mut rest = s;
    while let Some(i) = rest.find("{{") {
        let tail = &rest[i..];
        match PLACEHOLDERS.iter().find(|p| tail.starts_with(*p)) {
            Some(p) => rest = &tail[p.len()..],
            None => {
                return Err(format!(
                    "unknown placeholder at `{}`: the placeholders are {}",
                    tail.chars().take(20).collect::<String>(),
                    PLACEHOLDERS.join(", ")
                ));
            }
        }
    }
    if !s.contains("{{user}}") {
        return Err("must name the leased account with {{user}}".into());
    }
    Ok(())
}
