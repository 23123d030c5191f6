//! The provider's configuration (`[providers.NAME]` with `type = "postgres"`)
//! and its offline checks. The broker embeds these types in its own config,
//! so unknown keys are errors there too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use leasehold_provider::ConfigError;

use crate::template::{Placeholder, Template};

/// Lease ids are `lease_` and 26 base32 characters.
pub const LEASE_ID_LEN: usize = 32;
/// PostgreSQL truncates identifiers longer than this (NAMEDATALEN - 1).
pub const MAX_IDENTIFIER: usize = 63;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// TLS with the server's certificate checked against `ca_file` and its
    /// name against `host`.
    #[default]
    VerifyFull,
    /// Plain TCP: only to a loopback host or a Unix socket directory.
    Disable,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Host name, IP address, or a Unix socket directory (starting `/`).
    pub host: String,
    #[serde(default = "defaults::port")]
    pub port: u16,
    pub database: String,
    /// The management role: `CREATEROLE` and a member of `pg_signal_backend`.
    pub user: String,
    /// The management role's password, read at each new connection (so a
    /// rotated password is picked up without a restart).
    pub password_file: Option<PathBuf>,
    /// Or: the environment variable holding it.
    pub password_env: Option<String>,
    #[serde(default)]
    pub tls: TlsMode,
    /// PEM roots for `tls = "verify-full"`.
    pub ca_file: Option<PathBuf>,
    /// Most connections open at once (issue, revoke, health share them).
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    #[serde(default = "defaults::connect_timeout_seconds")]
    pub connect_timeout_seconds: u64,
    /// Every leased role is `<prefix><lease id>`; reconciliation only ever
    /// touches roles with this prefix.
    #[serde(default = "defaults::role_prefix")]
    pub role_prefix: String,
    #[serde(default = "defaults::password_length")]
    pub password_length: usize,
    #[serde(default = "defaults::password_alphabet")]
    pub password_alphabet: String,
    /// PBKDF2 rounds of the SCRAM-SHA-256 verifier sent for each leased
    /// role. PostgreSQL's default is 4096. Stretching protects guessable
    /// passwords; the broker's are random (32 of 62 characters: 190 bits),
    /// so a low value (e.g. 64) is as safe and makes issuing several times
    /// faster: PostgreSQL runs these rounds again on every CREATE ROLE to
    /// check the password is not empty, and clients on every login.
    #[serde(default = "defaults::scram_iterations")]
    pub scram_iterations: u32,
    /// How long revocation waits for each terminated session to exit.
    #[serde(default = "defaults::terminate_wait_millis")]
    pub terminate_wait_millis: u64,
    pub roles: BTreeMap<String, PostgresRole>,
}

/// A role template: what one lease of this role may do.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresRole {
    pub max_ttl_seconds: u64,
    /// Concurrent sessions one leased role may open.
    #[serde(default = "defaults::connection_limit")]
    pub connection_limit: u32,
    /// Existing group roles the leased role joins (`IN ROLE`).
    #[serde(default)]
    pub in_roles: Vec<String>,
    /// SQL run in the creating transaction. Placeholders: `{{name}}` (the
    /// role, a quoted identifier), `{{password}}` (the password's
    /// SCRAM-SHA-256 verifier, a quoted literal: the plain password never
    /// reaches the server), `{{expiration}}` (a quoted timestamp literal),
    /// `{{scope}}` (each granted scope, a quoted identifier or
    /// schema-qualified name; the statement runs once per scope).
    #[serde(default)]
    pub statements: Vec<String>,
    /// The names a call may ask for as its scope (schemas, or `schema.table`).
    /// A call that names none gets all of them.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Scopes granted through group roles: a call naming `reporting` joins
    /// the groups listed for it. Unlike per-lease GRANTs on a shared object
    /// (whose ACL PostgreSQL keeps in one catalog row of at most ~8 kB:
    /// about 600 grantees), group membership scales to any number of
    /// concurrent leases and never makes issues wait for each other.
    #[serde(default)]
    pub scope_roles: BTreeMap<String, Vec<String>>,
    /// SQL run before the role is dropped (e.g. `REASSIGN OWNED BY {{name}}
    /// TO app_owner`). Placeholder: `{{name}}`.
    #[serde(default)]
    pub revocation_statements: Vec<String>,
    /// `DROP OWNED BY` the role before dropping it: removes its privileges
    /// and whatever it created in this database.
    #[serde(default = "defaults::yes")]
    pub drop_owned: bool,
    #[serde(default)]
    pub description: String,
}

mod defaults {
    pub fn port() -> u16 {
        5432
    }
    pub fn pool_size() -> usize {
        8
    }
    pub fn connect_timeout_seconds() -> u64 {
        5
    }
    pub fn role_prefix() -> String {
        "lh_".into()
    }
    pub fn password_length() -> usize {
        32
    }
    pub fn password_alphabet() -> String {
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789".into()
    }
    pub fn scram_iterations() -> u32 {
        4096
    }
    pub fn terminate_wait_millis() -> u64 {
        5000
    }
    pub fn connection_limit() -> u32 {
        4
    }
    pub fn yes() -> bool {
        true
    }
}

/// A loopback host or a Unix socket directory: plain TCP is acceptable.
pub fn is_local(host: &str) -> bool {
    host.starts_with('/')
        || host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl PostgresConfig {
    /// Offline checks: everything that can be known without the database.
    /// `max_ttl` is the broker's ceiling for any lease.
    pub fn validate(&self, max_ttl: u64) -> Result<(), ConfigError> {
        self.validate_connection()?;
        self.validate_roles(max_ttl)
    }

    /// The connection's fields alone (host, credentials, TLS, pool): what
    /// any use of a database needs (the broker's PostgreSQL store too).
    pub fn validate_connection(&self) -> Result<(), ConfigError> {
        if self.host.is_empty() {
            return Err(ConfigError::new("host", "must not be empty"));
        }
        if self.port == 0 {
            return Err(ConfigError::new("port", "must not be 0"));
        }
        if self.database.is_empty() {
            return Err(ConfigError::new("database", "must not be empty"));
        }
        if self.user.is_empty() {
            return Err(ConfigError::new("user", "must not be empty"));
        }
        match (&self.password_file, &self.password_env) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "password_file",
                    "set either password_file or password_env, not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "password_file",
                    "set password_file or password_env",
                ));
            }
            (_, Some(e)) if e.is_empty() => {
                return Err(ConfigError::new("password_env", "must not be empty"));
            }
            _ => {}
        }
        match self.tls {
            TlsMode::Disable if !is_local(&self.host) => {
                return Err(ConfigError::new(
                    "tls",
                    format!(
                        "`disable` sends the management password in clear: only for loopback or a socket directory, not `{}`",
                        self.host
                    ),
                ));
            }
            TlsMode::VerifyFull if self.ca_file.is_none() => {
                return Err(ConfigError::new(
                    "ca_file",
                    "tls = \"verify-full\" needs the PEM file of the server's CA",
                ));
            }
            _ => {}
        }
        if !(1..=256).contains(&self.pool_size) {
            return Err(ConfigError::new("pool_size", "must be between 1 and 256"));
        }
        if !(1..=60).contains(&self.connect_timeout_seconds) {
            return Err(ConfigError::new(
                "connect_timeout_seconds",
                "must be between 1 and 60",
            ));
        }
        Ok(())
    }

    /// What leasing roles needs: names, passwords, and the templates.
    fn validate_roles(&self, max_ttl: u64) -> Result<(), ConfigError> {
        let p = &self.role_prefix;
        let prefix_ok = p.len() <= MAX_IDENTIFIER - LEASE_ID_LEN
            && p.starts_with(|c: char| c.is_ascii_lowercase())
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !prefix_ok {
            return Err(ConfigError::new(
                "role_prefix",
                format!(
                    "1-{} of [a-z0-9_], starting with a letter (role names are the prefix and a {LEASE_ID_LEN}-character lease id, within PostgreSQL's {MAX_IDENTIFIER}-byte limit)",
                    MAX_IDENTIFIER - LEASE_ID_LEN
                ),
            ));
        }
        if !(16..=128).contains(&self.password_length) {
            return Err(ConfigError::new(
                "password_length",
                "must be between 16 and 128",
            ));
        }
        let alphabet: BTreeSet<char> = self.password_alphabet.chars().collect();
        if alphabet.len() != self.password_alphabet.chars().count() {
            return Err(ConfigError::new(
                "password_alphabet",
                "repeats a character (that would bias the passwords)",
            ));
        }
        if alphabet.len() < 16 || !alphabet.iter().all(|c| c.is_ascii_graphic()) {
            return Err(ConfigError::new(
                "password_alphabet",
                "at least 16 distinct printable ASCII characters, no spaces",
            ));
        }
        if !(1..=1_000_000).contains(&self.scram_iterations) {
            return Err(ConfigError::new(
                "scram_iterations",
                "must be between 1 and 1000000",
            ));
        }
        if self.scram_iterations < 4096 && self.password_length * 6 < 128 {
            return Err(ConfigError::new(
                "scram_iterations",
                "below 4096 only with passwords of at least 22 characters (128 bits): stretching is what protects shorter ones",
            ));
        }
        if !(100..=60_000).contains(&self.terminate_wait_millis) {
            return Err(ConfigError::new(
                "terminate_wait_millis",
                "must be between 100 and 60000",
            ));
        }
        if self.roles.is_empty() {
            return Err(ConfigError::new(
                "roles",
                "configure at least one role template",
            ));
        }
        for (name, r) in &self.roles {
            r.validate(&format!("roles.{name}"), max_ttl)?;
        }
        Ok(())
    }
}

impl PostgresRole {
    /// Every scope a call may ask for: `scopes` and the keys of `scope_roles`.
    pub fn allowed_scopes(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.scopes.iter().map(String::as_str).collect();
        for k in self.scope_roles.keys() {
            if !out.contains(&k.as_str()) {
                out.push(k);
            }
        }
        out
    }

    fn validate(&self, field: &str, max_ttl: u64) -> Result<(), ConfigError> {
        if self.max_ttl_seconds == 0 || self.max_ttl_seconds > max_ttl {
            return Err(ConfigError::new(
                format!("{field}.max_ttl_seconds"),
                format!("must be between 1 and {max_ttl}"),
            ));
        }
        if !(1..=10_000).contains(&self.connection_limit) {
            return Err(ConfigError::new(
                format!("{field}.connection_limit"),
                "must be between 1 and 10000",
            ));
        }
        for (i, g) in self.in_roles.iter().enumerate() {
            if g.is_empty() || g.len() > MAX_IDENTIFIER || g.contains('\0') {
                return Err(ConfigError::new(
                    format!("{field}.in_roles[{i}]"),
                    format!("1-{MAX_IDENTIFIER} bytes, no NUL"),
                ));
            }
        }
        for (scope, groups) in &self.scope_roles {
            let f = format!("{field}.scope_roles.{scope}");
            if scope.is_empty() || scope.len() > 128 {
                return Err(ConfigError::new(f, "a scope name of 1-128 bytes"));
            }
            if groups.is_empty() {
                return Err(ConfigError::new(f, "list at least one group role"));
            }
            if let Some(g) = groups
                .iter()
                .find(|g| g.is_empty() || g.len() > MAX_IDENTIFIER || g.contains('\0'))
            {
                return Err(ConfigError::new(
                    f,
                    format!(
                        "`{}`: group role names are 1-{MAX_IDENTIFIER} bytes, no NUL",
                        g.escape_default()
                    ),
                ));
            }
        }
        let mut uses_scope = false;
        for (i, s) in self.statements.iter().enumerate() {
            let t = Template::parse(s)
                .map_err(|m| ConfigError::new(format!("{field}.statements[{i}]"), m))?;
            uses_scope |= t.uses(Placeholder::Scope);
        }
        for (i, s) in self.revocation_statements.iter().enumerate() {
            let t = Template::parse(s)
                .map_err(|m| ConfigError::new(format!("{field}.revocation_statements[{i}]"), m))?;
            if let Some(p) = [
                Placeholder::Password,
                Placeholder::Expiration,
                Placeholder::Scope,
            ]
            .into_iter()
            .find(|p| t.uses(*p))
            {
                return Err(ConfigError::new(
                    format!("{field}.revocation_statements[{i}]"),
                    format!(
                        "only {{{{name}}}} is known at revocation, not {{{{{}}}}}",
                        p.as_str()
                    ),
                ));
            }
        }
        for (i, s) in self.scopes.iter().enumerate() {
            let parts: Vec<&str> = s.split('.').collect();
            if parts.len() > 2
                || parts
                    .iter()
                    .any(|p| p.is_empty() || p.len() > MAX_IDENTIFIER || p.contains('\0'))
            {
                return Err(ConfigError::new(
                    format!("{field}.scopes[{i}]"),
                    "a name or schema.name, each 1-63 bytes",
                ));
            }
        }
        if uses_scope && self.scopes.is_empty() {
            return Err(ConfigError::new(
                format!("{field}.scopes"),
                "statements use {{scope}}: list the scopes a call may ask for",
            ));
        }
        if !uses_scope && !self.scopes.is_empty() {
            return Err(ConfigError::new(
                format!("{field}.statements"),
                "scopes are listed but no statement uses {{scope}}",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_on_an_object_per_lease_is_warned_about_with_the_ceiling() {
        use leasehold_provider::ProviderSettings as _;
        let mut c = base();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("roles.read.statements[0]"), "{}", w[0]);
        assert!(
            w[0].contains("600") && w[0].contains("in_roles"),
            "{}",
            w[0]
        );
        // membership in a group role alone: nothing to warn about
        c.roles.get_mut("read").unwrap().statements.clear();
        assert!(c.warnings().is_empty());
    }

    fn base() -> PostgresConfig {
        let role = PostgresRole {
            max_ttl_seconds: 600,
            connection_limit: 2,
            in_roles: vec!["app_read".into()],
            statements: vec!["GRANT USAGE ON SCHEMA {{scope}} TO {{name}}".into()],
            scopes: vec!["public".into()],
            scope_roles: BTreeMap::new(),
            revocation_statements: vec![],
            drop_owned: true,
            description: String::new(),
        };
        PostgresConfig {
            host: "127.0.0.1".into(),
            port: 5432,
            database: "app".into(),
            user: "mgmt".into(),
            password_file: Some("pw".into()),
            password_env: None,
            tls: TlsMode::Disable,
            ca_file: None,
            pool_size: 8,
            connect_timeout_seconds: 5,
            role_prefix: "lh_".into(),
            password_length: 32,
            password_alphabet: defaults::password_alphabet(),
            terminate_wait_millis: 5000,
            scram_iterations: 4096,
            roles: [("read".to_owned(), role)].into(),
        }
    }

    fn field_of(f: impl FnOnce(&mut PostgresConfig)) -> String {
        let mut c = base();
        f(&mut c);
        c.validate(3600).unwrap_err().field
    }

    #[test]
    fn offline_checks_name_the_field() {
        base().validate(3600).unwrap();
        assert_eq!(
            field_of(|c| c.host = "db.internal".into()),
            "tls",
            "plain TCP off loopback"
        );
        assert_eq!(field_of(|c| c.tls = TlsMode::VerifyFull), "ca_file");
        assert_eq!(
            field_of(|c| c.role_prefix = "a_very_long_prefix_for_leased_roles_".into()),
            "role_prefix"
        );
        assert_eq!(field_of(|c| c.role_prefix = "LH".into()), "role_prefix");
        assert_eq!(
            field_of(|c| c.password_alphabet = "aabcdefghijklmnopq".into()),
            "password_alphabet"
        );
        assert_eq!(field_of(|c| c.password_length = 8), "password_length");
        assert_eq!(
            field_of(|c| {
                c.password_length = 16;
                c.scram_iterations = 64;
            }),
            "scram_iterations"
        );
        assert_eq!(
            field_of(|c| c.password_env = Some("X".into())),
            "password_file"
        );
        assert_eq!(
            field_of(|c| c.roles.get_mut("read").unwrap().max_ttl_seconds = 7200),
            "roles.read.max_ttl_seconds"
        );
        assert_eq!(
            field_of(|c| c.roles.get_mut("read").unwrap().scopes.clear()),
            "roles.read.scopes"
        );
        assert_eq!(
            field_of(
                |c| c.roles.get_mut("read").unwrap().statements = vec!["GRANT x TO {{nam}}".into()]
            ),
            "roles.read.statements[0]"
        );
        assert_eq!(
            field_of(|c| c.roles.get_mut("read").unwrap().revocation_statements =
                vec!["ALTER ROLE {{name}} PASSWORD {{password}}".into()]),
            "roles.read.revocation_statements[0]"
        );
        assert_eq!(
            field_of(|c| c.roles.get_mut("read").unwrap().scopes = vec!["a.b.c".into()]),
            "roles.read.scopes[0]"
        );
        assert!(
            is_local("/var/run/postgresql")
                && is_local("::1")
                && is_local("localhost")
                && !is_local("10.0.0.1")
        );
    }
}
