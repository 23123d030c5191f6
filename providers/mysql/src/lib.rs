//! leasehold's MariaDB/MySQL provider: one user per lease.
//!
//! Issue creates `'<prefix><lease id>'@'<role host>'` with a random
//! password (only its hash reaches the server: `IDENTIFIED BY PASSWORD`),
//! the role's session limit and grants, all or nothing: a failed grant
//! drops the user before the error is returned. Revocation locks the
//! account (no new logins), kills every session of the user and waits
//! until they are gone (`DROP USER` alone leaves open sessions running),
//! then drops the user; it is idempotent, batched for many leases, and
//! retried by the broker while the server is down. Rollback does the same
//! from the lease id alone. Inventory lists the prefixed users, for
//! reconciliation.
//!
//! Runs in process (`type = "mysql"` through [`KIND`]) or as the plugin
//! binary `leasehold-plugin-mysql` (the kit around the same code).

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use leasehold_provider::{
    Credential, Description, Found, Issued, LeaseSpec, Provider, ProviderError, RevocationHandle,
    RevokeSpec, RoleInfo, configured_role,
};
use mysql_async::prelude::Queryable;

mod config;
mod kind;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use config::{MysqlConfig, MysqlRole, TlsMode, is_host_pattern, is_identifier};
pub use kind::KIND;

/// Lease ids are `lease_` and 26 base32 characters.
pub const LEASE_ID_LEN: usize = 32;
/// Accounts per statement when many are revoked at once.
const BATCH: usize = 500;
/// The template dry run in `health` runs at most this often.
const TEMPLATE_RECHECK: Duration = Duration::from_secs(60);
const PASSWORD_LEN: usize = 32;
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// ER_ACCESS_DENIED_ERROR, ER_ACCOUNT_HAS_BEEN_LOCKED (MariaDB), MySQL's
/// ER_ACCOUNT_HAS_BEEN_LOCKED: the peer refuses the credential.
const REFUSED_LOGIN: [u16; 3] = [1045, 4151, 3118];
/// ER_NO_SUCH_THREAD: the session ended between listing and killing.
const NO_SUCH_THREAD: u16 = 1094;

/// A leased account: a user name we made (prefix and lease id) and the
/// role's host pattern, both checked to need no escaping.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Account {
    user: String,
    host: String,
}

impl Account {
    /// `'user'@'host'`.
    fn quoted(&self) -> String {
        format!("'{}'@'{}'", self.user, self.host)
    }

    fn handle(&self) -> RevocationHandle {
        RevocationHandle::new(format!("{}\n{}", self.user, self.host).into_bytes())
    }
}

pub struct MysqlProvider {
    cfg: MysqlConfig,
    pool: mysql_async::Pool,
    templates_checked: std::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for MysqlProvider {
    // the pool's options hold the management password: never printed
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlProvider")
            .field("host", &self.cfg.host)
            .field("port", &self.cfg.port)
            .field("user", &self.cfg.user)
            .finish_non_exhaustive()
    }
}

impl MysqlProvider {
    pub fn new(cfg: MysqlConfig, max_lease_ttl_seconds: u64) -> Result<Self, String> {
        cfg.validate(max_lease_ttl_seconds)
            .map_err(|e| e.to_string())?;
        let password = read_password(&cfg)?;
        let opts = connect_opts(&cfg, &cfg.user, &password);
        let constraints = mysql_async::PoolConstraints::new(0, cfg.pool_size)
            .ok_or_else(|| "pool_size must be at least 1".to_owned())?;
        let pool = mysql_async::Pool::new(
            mysql_async::OptsBuilder::from_opts(opts)
                .pool_opts(mysql_async::PoolOpts::default().with_constraints(constraints)),
        );
        Ok(Self {
            cfg,
            pool,
            templates_checked: std::sync::Mutex::new(None),
        })
    }

    async fn conn(&self) -> Result<mysql_async::Conn, ProviderError> {
        let wait = Duration::from_secs(self.cfg.connect_timeout_seconds);
        match tokio::time::timeout(wait, self.pool.get_conn()).await {
            Ok(r) => r.map_err(|e| classify("connecting", &e)),
            Err(_) => Err(ProviderError::retryable(format!(
                "connecting to {}:{} timed out after {}s",
                self.cfg.host,
                self.cfg.port,
                wait.as_secs()
            ))),
        }
    }

    fn role(&self, name: &str) -> Result<&MysqlRole, ProviderError> {
        configured_role(&self.cfg.roles, name)
    }

    /// The schemas a lease gets: those it asked for, each in the role's
    /// list; all of them when it asked for none.
    fn narrow<'a>(
        &self,
        role: &str,
        r: &'a MysqlRole,
        scope: &'a [String],
    ) -> Result<Vec<&'a str>, ProviderError> {
        if scope.is_empty() {
            return Ok(r.scopes.iter().map(String::as_str).collect());
        }
        if r.scopes.is_empty() {
            return Err(ProviderError::invalid(format!(
                "role `{role}` takes no scope"
            )));
        }
        scope
            .iter()
            .map(|s| {
                if is_identifier(s) && r.scopes.contains(s) {
                    Ok(s.as_str())
                } else {
                    Err(ProviderError::invalid(format!(
                        "scope `{}` is not allowed for role `{role}`; allowed: {}",
                        s.escape_default(),
                        r.scopes.join(", ")
                    )))
                }
            })
            .collect()
    }

    fn account(&self, lease_id: &str, role: &MysqlRole) -> Result<Account, ProviderError> {
        if lease_id.len() != LEASE_ID_LEN || !is_identifier(lease_id) {
            return Err(ProviderError::invalid(format!(
                "`{}` is not a lease id",
                lease_id.escape_default()
            )));
        }
        Ok(Account {
            user: format!("{}{lease_id}", self.cfg.user_prefix),
            host: role.host.clone(),
        })
    }

    fn account_from_handle(&self, h: &RevocationHandle) -> Result<Account, ProviderError> {
        let text = std::str::from_utf8(h.as_bytes())
            .map_err(|_| ProviderError::permanent("revocation handle is not UTF-8"))?;
        let (user, host) = text
            .split_once('\n')
            .ok_or_else(|| ProviderError::permanent("revocation handle is malformed"))?;
        self.checked_account(user, host)
    }

    /// An account read back from the server or a handle: ours (the
    /// prefix), and needing no escaping.
    fn checked_account(&self, user: &str, host: &str) -> Result<Account, ProviderError> {
        if !user.starts_with(&self.cfg.user_prefix)
            || !is_identifier(user)
            || !is_host_pattern(host)
        {
            return Err(ProviderError::invalid(format!(
                "`{}`@`{}` is not an account this provider makes",
                user.escape_default(),
                host.escape_default()
            )));
        }
        Ok(Account {
            user: user.to_owned(),
            host: host.to_owned(),
        })
    }

    /// The statements that give `acct` its role, `{{scope}}` ones once per
    /// schema.
    fn grants(r: &MysqlRole, acct: &Account, scopes: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for g in &r.grants {
            let g = g.replace("{{user}}", &acct.quoted());
            if g.contains("{{scope}}") {
                for s in scopes {
                    out.push(g.replace("{{scope}}", &format!("`{s}`")));
                }
            } else {
                out.push(g);
            }
        }
        out
    }

    /// Create the user, run the grants (and the expiry event); on any
    /// failure drop what was made. `lock`: create it locked (the dry run).
    async fn create(
        &self,
        conn: &mut mysql_async::Conn,
        acct: &Account,
        r: &MysqlRole,
        scopes: &[&str],
        password_hash: &str,
        expires_at_seconds: Option<i64>,
    ) -> Result<(), ProviderError> {
        let lock = if expires_at_seconds.is_none() {
            " ACCOUNT LOCK"
        } else {
            ""
        };
        let create = format!(
            "CREATE USER {} IDENTIFIED BY PASSWORD '{password_hash}' WITH MAX_USER_CONNECTIONS {}{lock}",
            acct.quoted(),
            r.max_user_connections
        );
        conn.query_drop(create)
            .await
            .map_err(|e| classify(&format!("CREATE USER {}", acct.quoted()), &e))?;
        let mut rest = Self::grants(r, acct, scopes);
        if let (Some(schema), Some(at)) = (&self.cfg.expiry_schema, expires_at_seconds) {
            rest.push(format!(
                "CREATE EVENT `{schema}`.`{}` ON SCHEDULE AT FROM_UNIXTIME({at}) ON COMPLETION NOT PRESERVE DO DROP USER IF EXISTS {}",
                acct.user,
                acct.quoted()
            ));
        }
        for (i, stmt) in rest.iter().enumerate() {
            if let Err(e) = conn.query_drop(stmt.as_str()).await {
                let err = classify(&format!("statement {} of role template", i + 1), &e);
                if let Err(undo) = self.end(conn, std::slice::from_ref(acct)).await {
                    tracing::warn!(user = %acct.user, "dropping the half-made user failed: {undo}");
                }
                return Err(err);
            }
        }
        Ok(())
    }

    /// Lock, kill every session and wait for them to be gone, drop:
    /// idempotent, for any number of accounts.
    async fn end(
        &self,
        conn: &mut mysql_async::Conn,
        accts: &[Account],
    ) -> Result<(), ProviderError> {
        for batch in accts.chunks(BATCH) {
            let list = batch
                .iter()
                .map(Account::quoted)
                .collect::<Vec<_>>()
                .join(", ");
            conn.query_drop(format!("ALTER USER IF EXISTS {list} ACCOUNT LOCK"))
                .await
                .map_err(|e| classify("ALTER USER ... ACCOUNT LOCK", &e))?;
            let users = batch
                .iter()
                .map(|a| format!("'{}'", a.user))
                .collect::<Vec<_>>()
                .join(", ");
            let deadline = Instant::now() + Duration::from_millis(self.cfg.session_wait_millis);
            loop {
                let ids: Vec<u64> = conn
                    .query(format!(
                        "SELECT ID FROM information_schema.PROCESSLIST WHERE USER IN ({users}) AND ID <> CONNECTION_ID()"
                    ))
                    .await
                    .map_err(|e| classify("listing sessions", &e))?;
                if ids.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(ProviderError::retryable(format!(
                        "{} session(s) still running {} ms after being killed",
                        ids.len(),
                        self.cfg.session_wait_millis
                    )));
                }
                for id in ids {
                    match conn.query_drop(format!("KILL CONNECTION {id}")).await {
                        Ok(()) => {}
                        Err(mysql_async::Error::Server(s)) if s.code == NO_SUCH_THREAD => {}
                        Err(e) => return Err(classify("KILL CONNECTION", &e)),
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            conn.query_drop(format!("DROP USER IF EXISTS {list}"))
                .await
                .map_err(|e| classify("DROP USER", &e))?;
            if let Some(schema) = &self.cfg.expiry_schema {
                for a in batch {
                    conn.query_drop(format!("DROP EVENT IF EXISTS `{schema}`.`{}`", a.user))
                        .await
                        .map_err(|e| classify("DROP EVENT", &e))?;
                }
            }
        }
        Ok(())
    }

    /// The management user may do what issuing and revoking need; the
    /// missing privileges are named.
    async fn check_privileges(&self, conn: &mut mysql_async::Conn) -> Result<(), ProviderError> {
        let grants: Vec<String> = conn
            .query("SHOW GRANTS FOR CURRENT_USER()")
            .await
            .map_err(|e| classify("SHOW GRANTS", &e))?;
        let global: Vec<String> = grants
            .iter()
            .filter(|g| g.contains(" ON *.* TO "))
            .flat_map(|g| {
                let privs = g
                    .trim_start_matches("GRANT ")
                    .split(" ON *.* TO ")
                    .next()
                    .unwrap_or("");
                privs
                    .split(',')
                    .map(|p| p.trim().to_ascii_uppercase())
                    .collect::<Vec<_>>()
            })
            .collect();
        let has = |p: &str| global.iter().any(|g| g == p || g == "ALL PRIVILEGES");
        let mut missing = Vec::new();
        for p in ["CREATE USER", "PROCESS"] {
            if !has(p) {
                missing.push(p);
            }
        }
        if !has("CONNECTION ADMIN") && !has("SUPER") {
            missing.push("CONNECTION ADMIN");
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ProviderError::permanent(format!(
                "the management user `{}` lacks {} ON *.* (needed to create users, see and kill their sessions)",
                self.cfg.user,
                missing.join(", ")
            )))
        }
    }

    /// Every role's template, run for a throwaway locked user that is
    /// dropped at once: a grant the management user may not give fails
    /// here, not at the first lease.
    pub async fn check_templates(&self) -> Result<(), ProviderError> {
        let mut conn = self.conn().await?;
        self.check_privileges(&mut conn).await?;
        for (name, r) in &self.cfg.roles {
            let acct = Account {
                user: format!("{}check_{}", self.cfg.user_prefix, random_string(12)?),
                host: r.host.clone(),
            };
            let scopes: Vec<&str> = r.scopes.iter().map(String::as_str).collect();
            let hash = native_hash(&random_string(PASSWORD_LEN)?);
            self.create(&mut conn, &acct, r, &scopes, &hash, None)
                .await
                .map_err(|e| ProviderError {
                    class: e.class,
                    message: format!("role `{name}`: {}", e.message),
                })?;
            self.end(&mut conn, &[acct]).await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Provider for MysqlProvider {
    fn describe(&self) -> Description {
        Description {
            kind: "mysql",
            roles: self
                .cfg
                .roles
                .iter()
                .map(|(name, r)| RoleInfo {
                    name: name.clone(),
                    max_ttl: Duration::from_secs(r.max_ttl_seconds),
                    description: r.description.clone(),
                })
                .collect(),
            revocation: "locks the account, kills its sessions and waits until they are gone, then drops the user".into(),
        }
    }

    fn validate(&self, role: &str, scope: &[String]) -> Result<Duration, ProviderError> {
        let r = self.role(role)?;
        self.narrow(role, r, scope)?;
        Ok(Duration::from_secs(r.max_ttl_seconds))
    }

    async fn health(&self) -> Result<(), ProviderError> {
        let fresh = self
            .templates_checked
            .lock()
            .ok()
            .and_then(|t| *t)
            .is_some_and(|t| t.elapsed() < TEMPLATE_RECHECK);
        if fresh {
            let mut conn = self.conn().await?;
            return self.check_privileges(&mut conn).await;
        }
        self.check_templates().await?;
        if let Ok(mut t) = self.templates_checked.lock() {
            *t = Some(Instant::now());
        }
        Ok(())
    }

    async fn issue(&self, spec: &LeaseSpec) -> Result<Issued, ProviderError> {
        let r = self.role(&spec.role)?;
        let scopes = self.narrow(&spec.role, r, &spec.scope)?;
        let acct = self.account(&spec.lease_id, r)?;
        let ceiling = spec
            .issued_at
            .saturating_add(Duration::from_secs(r.max_ttl_seconds));
        let expires_at = spec.expires_at.min(ceiling);
        if expires_at <= spec.issued_at {
            return Err(ProviderError::invalid("the lease has already expired"));
        }
        let password = zeroize::Zeroizing::new(random_string(PASSWORD_LEN)?);
        let hash = native_hash(&password);
        let mut conn = self.conn().await?;
        self.create(
            &mut conn,
            &acct,
            r,
            &scopes,
            &hash,
            Some(expires_at.unix_seconds()),
        )
        .await?;
        let mut credential = Credential::new()
            .public("username", acct.user.clone())
            .secret("password", password.as_str());
        if self.cfg.host.starts_with('/') {
            credential = credential.public("socket", self.cfg.host.clone());
        } else {
            credential = credential
                .public("host", self.cfg.host.clone())
                .public("port", self.cfg.port.to_string());
        }
        Ok(Issued {
            credential,
            handle: acct.handle(),
            expires_at,
            description: format!(
                "MariaDB/MySQL user {} ({} session(s) at most{})",
                acct.quoted(),
                r.max_user_connections,
                if scopes.is_empty() {
                    String::new()
                } else {
                    format!(", schemas {}", scopes.join(", "))
                }
            ),
        })
    }

    async fn revoke(&self, lease: &RevokeSpec) -> Result<(), ProviderError> {
        let acct = self.account_from_handle(&lease.handle)?;
        let mut conn = self.conn().await?;
        self.end(&mut conn, &[acct]).await
    }

    async fn revoke_many(&self, leases: &[RevokeSpec]) -> Vec<Result<(), ProviderError>> {
        let mut out: Vec<Result<(), ProviderError>> = Vec::with_capacity(leases.len());
        let mut accts = Vec::new();
        let mut at = Vec::new();
        for (i, l) in leases.iter().enumerate() {
            match self.account_from_handle(&l.handle) {
                Ok(a) => {
                    accts.push(a);
                    at.push(i);
                    out.push(Ok(()));
                }
                Err(e) => out.push(Err(e)),
            }
        }
        let result = match self.conn().await {
            Ok(mut conn) => self.end(&mut conn, &accts).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            for i in at {
                out[i] = Err(e.clone());
            }
        }
        out
    }

    async fn rollback(&self, spec: &LeaseSpec) -> Result<(), ProviderError> {
        let r = self.role(&spec.role)?;
        let acct = self.account(&spec.lease_id, r)?;
        let mut conn = self.conn().await?;
        self.end(&mut conn, &[acct]).await
    }

    async fn inventory(&self) -> Result<Option<Vec<Found>>, ProviderError> {
        let mut conn = self.conn().await?;
        let rows: Vec<(String, String)> = conn
            .query("SELECT User, Host FROM mysql.user")
            .await
            .map_err(|e| classify("listing users", &e))?;
        Ok(Some(
            rows.into_iter()
                .filter(|(u, _)| u.starts_with(&self.cfg.user_prefix))
                .map(|(user, host)| {
                    let rest = &user[self.cfg.user_prefix.len()..];
                    let lease_id = (rest.len() == LEASE_ID_LEN && rest.starts_with("lease_"))
                        .then(|| rest.to_owned());
                    Found {
                        name: format!("'{user}'@'{host}'"),
                        lease_id,
                    }
                })
                .collect(),
        ))
    }

    async fn remove(&self, found: &Found) -> Result<(), ProviderError> {
        let parsed = found
            .name
            .strip_prefix('\'')
            .and_then(|s| s.strip_suffix('\''))
            .and_then(|s| s.split_once("'@'"));
        let Some((user, host)) = parsed else {
            return Err(ProviderError::invalid(format!(
                "`{}` is not an account name ('user'@'host')",
                found.name.escape_default()
            )));
        };
        let acct = self.checked_account(user, host)?;
        let mut conn = self.conn().await?;
        self.end(&mut conn, &[acct]).await
    }

    /// Log in with the credential and run `SELECT 1`.
    async fn probe(
        &self,
        _spec: &LeaseSpec,
        credential: &Credential,
    ) -> Result<Option<bool>, ProviderError> {
        let (Some(user), Some(password)) =
            (credential.expose("username"), credential.expose("password"))
        else {
            return Err(ProviderError::invalid(
                "the credential has no username and password",
            ));
        };
        let opts = connect_opts(&self.cfg, user, password);
        let attempt = async {
            let mut conn = mysql_async::Conn::new(opts).await?;
            let one: Option<u8> = conn.query_first("SELECT 1").await?;
            conn.disconnect().await?;
            Ok::<_, mysql_async::Error>(one == Some(1))
        };
        match tokio::time::timeout(
            Duration::from_secs(self.cfg.connect_timeout_seconds),
            attempt,
        )
        .await
        {
            Ok(Ok(ok)) => Ok(Some(ok)),
            Ok(Err(mysql_async::Error::Server(s))) if REFUSED_LOGIN.contains(&s.code) => {
                Ok(Some(false))
            }
            Ok(Err(e)) => Err(classify("logging in with the credential", &e)),
            Err(_) => Err(ProviderError::retryable(
                "logging in with the credential timed out",
            )),
        }
    }
}

fn connect_opts(cfg: &MysqlConfig, user: &str, password: &str) -> mysql_async::Opts {
    let mut b = mysql_async::OptsBuilder::default()
        .user(Some(user))
        .pass(Some(password))
        .prefer_socket(false);
    if cfg.host.starts_with('/') {
        b = b.socket(Some(cfg.host.clone()));
    } else {
        b = b.ip_or_hostname(cfg.host.clone()).tcp_port(cfg.port);
    }
    if cfg.tls == TlsMode::VerifyFull && !cfg.host.starts_with('/') {
        let mut ssl = mysql_async::SslOpts::default();
        if let Some(ca) = &cfg.ca_file {
            ssl = ssl.with_root_certs(vec![ca.clone().into()]);
        }
        b = b.ssl_opts(Some(ssl));
    }
    b.into()
}

fn read_password(cfg: &MysqlConfig) -> Result<String, String> {
    match (&cfg.password_file, &cfg.password_env) {
        (Some(f), _) => std::fs::read_to_string(f)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|e| format!("password_file {}: {e}", f.display())),
        (None, Some(var)) => {
            std::env::var(var).map_err(|_| format!("password_env: {var} is not set"))
        }
        (None, None) => Err("no password_file or password_env".into()),
    }
}

fn random_string(len: usize) -> Result<String, ProviderError> {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        rng.fill(&mut buf)
            .map_err(|_| ProviderError::retryable("the system's random source failed"))?;
        // rejection sampling keeps every character equally likely
        let limit = 256 - 256 % ALPHABET.len();
        for b in buf {
            if (b as usize) < limit && out.len() < len {
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    Ok(out)
}

/// `mysql_native_password`'s stored form: `*` and the upper-case hex of
/// SHA1(SHA1(password)), so the password itself never reaches the server
/// (nor its logs).
fn native_hash(password: &str) -> String {
    use ring::digest::{SHA1_FOR_LEGACY_USE_ONLY, digest};
    let once = digest(&SHA1_FOR_LEGACY_USE_ONLY, password.as_bytes());
    let twice = digest(&SHA1_FOR_LEGACY_USE_ONLY, once.as_ref());
    let hex: String = twice.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    format!("*{hex}")
}

/// A client error as a provider error: connection trouble and lock waits
/// are retryable, refusals permanent. Server messages name accounts and
/// statements, never a password (only hashes are sent).
fn classify(what: &str, e: &mysql_async::Error) -> ProviderError {
    match e {
        mysql_async::Error::Server(s) => {
            let msg = format!("{what}: {} (error {})", s.message, s.code);
            match s.code {
                // too many connections, lock wait timeout, deadlock, server shutdown
                1040 | 1205 | 1213 | 1053 | 1927 => ProviderError::retryable(msg),
                _ => ProviderError::permanent(msg),
            }
        }
        other => ProviderError::retryable(format!(
            "{what}: {}",
            leasehold_provider::error_chain(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_hash_matches_the_server_s() {
        // SELECT PASSWORD('secret') on MariaDB
        assert_eq!(
            native_hash("secret"),
            "*14E65567ABDB5135D0CFD9A70B3032C179A49EE7"
        );
    }

    #[test]
    fn random_strings_are_alphanumeric_and_distinct() {
        let a = random_string(32).unwrap();
        let b = random_string(32).unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }
}
