//! `[store.postgres]`: the store in PostgreSQL, shared by several brokers.
//! The connection follows the PostgreSQL provider's rules (verify-full TLS
//! against `ca_file`; plain only to a loopback host or a socket directory;
//! the password from a file or the environment, never in the file itself).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use leasehold_provider_postgres::{PostgresConfig, TlsMode};

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorePostgres {
    /// `postgres://user@host:port/database` (no password: use
    /// `password_file` or `password_env`). Or the fields below.
    pub url: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub database: Option<String>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    #[serde(default)]
    pub tls: TlsMode,
    pub ca_file: Option<PathBuf>,
    /// Connections this broker opens: one for its writer, one for the
    /// election, the rest for reads.
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    #[serde(default = "defaults::connect_timeout_seconds")]
    pub connect_timeout_seconds: u64,
    /// This broker's name in the cluster, unique among running brokers
    /// (default: the host name and the process id).
    pub node: Option<String>,
    /// Where people reach this broker, shown in `/v1/cluster` (default:
    /// the node name).
    pub advertise: Option<String>,
    /// How long the leader's lease lasts without renewal: the longest the
    /// cluster goes without expiry and revocation work after a leader
    /// dies. Renewed every third of it.
    #[serde(default = "defaults::lease_seconds")]
    pub lease_seconds: u64,
}

mod defaults {
    pub fn pool_size() -> usize {
        8
    }
    pub fn connect_timeout_seconds() -> u64 {
        5
    }
    pub fn lease_seconds() -> u64 {
        6
    }
}

/// The parts of a `postgres://` URL.
#[derive(Debug, Default, PartialEq, Eq)]
struct Url {
    user: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    database: Option<String>,
}

fn parse_url(url: &str) -> Result<Url, ConfigError> {
    let bad = |m: &str| invalid("store.postgres.url", m.to_owned());
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| bad("must start with postgres:// (or postgresql://)"))?;
    if rest.contains('?') {
        return Err(bad(
            "takes no query parameters: set tls and ca_file in [store.postgres]",
        ));
    }
    let (authority, database) = match rest.split_once('/') {
        Some((a, d)) => (a, Some(d)),
        None => (rest, None),
    };
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if user.is_some_and(|u| u.contains(':')) {
        return Err(bad(
            "must not hold a password: put it in password_file or password_env",
        ));
    }
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            Some(
                p.parse::<u16>()
                    .map_err(|_| bad("the port must be a number"))?,
            ),
        ),
        None => (hostport, None),
    };
    let some = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_owned);
    Ok(Url {
        user: some(user),
        host: some(Some(host)),
        port,
        database: some(database),
    })
}

impl StorePostgres {
    /// The connection, with every field checked (the provider's rules).
    pub fn connection(&self) -> Result<PostgresConfig, ConfigError> {
        let url = match &self.url {
            Some(u) => parse_url(u)?,
            None => Url::default(),
        };
        let pick =
            |field: &str, own: &Option<String>, from_url: Option<String>| match (own, from_url) {
                (Some(_), Some(_)) => Err(invalid(
                    format!("store.postgres.{field}"),
                    "set it in url or as a field, not both",
                )),
                (Some(v), None) => Ok(v.clone()),
                (None, Some(v)) => Ok(v),
                (None, None) => Err(invalid(
                    format!("store.postgres.{field}"),
                    "required (as a field or in url)",
                )),
            };
        let host = pick("host", &self.host, url.host)?;
        let database = pick("database", &self.database, url.database)?;
        let user = pick("user", &self.user, url.user)?;
        let port = match (self.port, url.port) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "store.postgres.port",
                    "set it in url or as a field, not both",
                ));
            }
            (p, u) => p.or(u).unwrap_or(5432),
        };
        let mut c: PostgresConfig = toml::from_str(&format!(
            "host = {host:?}\ndatabase = {database:?}\nuser = {user:?}\n[roles]\n"
        ))
        .map_err(|e| invalid("store.postgres", e.to_string()))?;
        c.port = port;
        c.password_file = self.password_file.clone();
        c.password_env = self.password_env.clone();
        c.tls = self.tls;
        c.ca_file = self.ca_file.clone();
        c.pool_size = self.pool_size;
        c.connect_timeout_seconds = self.connect_timeout_seconds;
        c.validate_connection()
            .map_err(|e| invalid(format!("store.postgres.{}", e.field), e.message))?;
        if self.pool_size < 3 {
            return Err(invalid(
                "store.postgres.pool_size",
                "at least 3 (the writer, the election, and one for reads)",
            ));
        }
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.connection()?;
        if !(2..=300).contains(&self.lease_seconds) {
            return Err(invalid("store.postgres.lease_seconds", "between 2 and 300"));
        }
        if let Some(n) = &self.node
            && (n.is_empty() || n.len() > 200 || n.chars().any(char::is_control))
        {
            return Err(invalid(
                "store.postgres.node",
                "1 to 200 printable characters",
            ));
        }
        Ok(())
    }

    pub fn node(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "broker".into());
            format!("{host}-{}", std::process::id())
        })
    }

    pub fn lease_period(&self) -> Duration {
        Duration::from_secs(self.lease_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_and_refused_with_a_reason() {
        assert_eq!(
            parse_url("postgres://lh@db.example:6432/leasehold").unwrap(),
            Url {
                user: Some("lh".into()),
                host: Some("db.example".into()),
                port: Some(6432),
                database: Some("leasehold".into()),
            }
        );
        assert_eq!(parse_url("postgresql://127.0.0.1/x").unwrap().port, None);
        for (url, says) in [
            ("mysql://a/b", "postgres://"),
            ("postgres://lh:secret@h/db", "password"),
            ("postgres://h:port/db", "number"),
            ("postgres://h/db?sslmode=disable", "query"),
        ] {
            let e = parse_url(url).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    fn store(extra: &str) -> Result<PostgresConfig, ConfigError> {
        let c: StorePostgres = toml::from_str(extra).unwrap();
        c.validate()?;
        c.connection()
    }

    #[test]
    fn the_connection_follows_the_providers_rules() {
        let ok = store(
            "url = 'postgres://lh@127.0.0.1:5433/leasehold'\npassword_file = '/p'\ntls = 'disable'",
        )
        .unwrap();
        assert_eq!(
            (ok.host.as_str(), ok.port, ok.user.as_str()),
            ("127.0.0.1", 5433, "lh")
        );
        let e = store(
            "url = 'postgres://lh@db.example/leasehold'\npassword_file = '/p'\ntls = 'disable'",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("store.postgres.tls"), "{e}");
        let e = store("url = 'postgres://lh@db.example/leasehold'\npassword_file = '/p'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.postgres.ca_file"), "{e}");
        let e = store("url = 'postgres://lh@127.0.0.1/leasehold'\nuser = 'x'\npassword_file = '/p'\ntls = 'disable'")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("store.postgres.user") && e.contains("not both"),
            "{e}"
        );
        let e = store("host = '127.0.0.1'\nuser = 'x'\npassword_file = '/p'\ntls = 'disable'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.postgres.database"), "{e}");
        let e = store("url = 'postgres://lh@127.0.0.1/l'\ntls = 'disable'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("password"), "{e}");
        let e = store("url = 'postgres://lh@127.0.0.1/l'\npassword_file = '/p'\ntls = 'disable'\nlease_seconds = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lease_seconds"), "{e}");
    }
}
