//! leasehold's PostgreSQL provider: one login role per lease.
//!
//! **Issue** creates `<prefix><lease id>` with a generated password (only its
//! SCRAM-SHA-256 verifier is sent to the server), `VALID UNTIL` the lease's
//! end, a connection limit, the template's group roles and grant
//! statements, all in one transaction: either the role exists with every
//! grant, or nothing does.
//!
//! **Revoke** makes the role unusable at once and for good: `NOLOGIN`
//! (committed first, so no new session starts), every live session
//! terminated and waited for, then the template's revocation statements,
//! `DROP OWNED` and `DROP ROLE` in one transaction, and a last sweep for any
//! session that raced in. Already gone is success. Batches share those
//! round trips, which is what makes ten thousand revocations take seconds.
//!
//! **Rollback** finds the role by name from the lease id alone.
//! **Inventory** lists roles with the prefix, and only those, for
//! reconciliation.
//!
//! The management role needs `CREATEROLE` and membership in
//! `pg_signal_backend`; the health check says which is missing, and dry-runs
//! every template in a rolled-back transaction.

#![forbid(unsafe_code)]

mod acl;
mod config;
mod kind;
mod pool;
mod template;
#[cfg(feature = "testkit")]
pub mod testkit;

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt as _;
use leasehold_provider::{
    Credential, Description, Found, Issued, LeaseSpec, Provider, ProviderError, RevocationHandle,
    RevokeSpec, RoleInfo, Timestamp,
};
use postgres_protocol::escape::escape_identifier;
use tokio_postgres::error::SqlState;
use zeroize::Zeroizing;

pub use acl::ACL_CEILING;
pub(crate) use acl::grants_on_an_object;
pub use config::{ConfigError, PostgresConfig, PostgresRole, TlsMode, is_local};
pub use kind::KIND;
pub use pool::{Driver, Pool, db_message};
use pool::{classify, concurrent_update};
use template::{Template, Values};

/// Roles revoked per round trip in a batch.
const BATCH: usize = 200;
/// How long a passed template dry run counts for the health check.
const TEMPLATE_RECHECK: Duration = Duration::from_secs(60);
/// Tries of a transaction that lost a race on a catalog row.
const CONCURRENT_ATTEMPTS: u32 = 8;

/// A role template, parsed.
#[derive(Debug)]
struct Role {
    cfg: PostgresRole,
    statements: Vec<Template>,
    revocation: Vec<Template>,
}

#[derive(Debug)]
pub struct PostgresProvider {
    pool: Pool,
    roles: BTreeMap<String, Role>,
    rng: ring::rand::SystemRandom,
    catalog: tokio::sync::Mutex<()>,
    templates_checked: std::sync::Mutex<Option<std::time::Instant>>,
    /// The roles whose templates grant on an object to each lease's role
    /// (see `acl`).
    acl_roles: Vec<String>,
}

impl PostgresProvider {
    /// Build from a validated config. Does not connect: the broker starts
    /// (and reports not ready) while the database is down.
    pub fn new(cfg: PostgresConfig, max_ttl: u64) -> Result<Self, ConfigError> {
        cfg.validate(max_ttl)?;
        let mut roles = BTreeMap::new();
        for (name, r) in &cfg.roles {
            let parse = |list: &[String], what: &str| {
                list.iter()
                    .enumerate()
                    .map(|(i, s)| {
                        Template::parse(s).map_err(|message| ConfigError {
                            field: format!("roles.{name}.{what}[{i}]"),
                            message,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let role = Role {
                statements: parse(&r.statements, "statements")?,
                revocation: parse(&r.revocation_statements, "revocation_statements")?,
                cfg: r.clone(),
            };
            roles.insert(name.clone(), role);
        }
        let acl_roles = cfg
            .roles
            .iter()
            .filter(|(_, r)| r.statements.iter().any(|s| grants_on_an_object(s)))
            .map(|(name, _)| name.clone())
            .collect();
        let pool = Pool::new(cfg).map_err(|message| ConfigError {
            field: "ca_file".into(),
            message,
        })?;
        Ok(Self {
            pool,
            roles,
            rng: ring::rand::SystemRandom::new(),
            catalog: tokio::sync::Mutex::new(()),
            templates_checked: std::sync::Mutex::new(None),
            acl_roles,
        })
    }

    fn cfg(&self) -> &PostgresConfig {
        self.pool.config()
    }

    fn role(&self, name: &str) -> Result<&Role, ProviderError> {
        leasehold_provider::configured_role(&self.roles, name)
    }

    /// The scopes a lease gets: the call's, each within the template, or
    /// all of the template's when the call names none.
    fn narrow<'a>(
        &self,
        role_name: &str,
        role: &'a Role,
        scope: &'a [String],
    ) -> Result<Vec<&'a str>, ProviderError> {
        let allowed = role.cfg.allowed_scopes();
        if scope.is_empty() {
            return Ok(allowed);
        }
        let mut out = Vec::new();
        for s in scope {
            if !allowed.contains(&s.as_str()) {
                let list = if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                };
                return Err(ProviderError::invalid(format!(
                    "scope `{}` is outside role template `{role_name}` (allowed: {list})",
                    s.escape_default()
                )));
            }
            if !out.contains(&s.as_str()) {
                out.push(s.as_str());
            }
        }
        Ok(out)
    }

    /// The role name for a lease: deterministic, so rollback finds it.
    fn role_name(&self, lease_id: &str) -> Result<String, ProviderError> {
        let ok = !lease_id.is_empty()
            && lease_id.len() <= config::LEASE_ID_LEN
            && lease_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            return Err(ProviderError::invalid(format!(
                "lease id `{}` cannot name a role",
                lease_id.escape_default()
            )));
        }
        Ok(format!("{}{lease_id}", self.cfg().role_prefix))
    }

    fn password(&self) -> Result<Zeroizing<String>, ProviderError> {
        use ring::rand::SecureRandom as _;
        let alphabet: Vec<char> = self.cfg().password_alphabet.chars().collect();
        let n = alphabet.len();
        // rejection sampling: only bytes below the largest multiple of n
        let limit = 256 - (256 % n);
        let mut out = Zeroizing::new(String::with_capacity(self.cfg().password_length));
        let mut buf = Zeroizing::new([0u8; 64]);
        while out.len() < self.cfg().password_length {
            self.rng
                .fill(&mut buf[..])
                .map_err(|_| ProviderError::retryable("the system random source failed"))?;
            for &b in buf.iter() {
                if (b as usize) < limit && out.len() < self.cfg().password_length {
                    out.push(alphabet[b as usize % n]);
                }
            }
        }
        Ok(out)
    }

    /// Every statement that creates a lease's role, in order, each with
    /// what it is called in errors.
    fn creation_sql(
        &self,
        role: &Role,
        name: &str,
        verifier: &str,
        until: &str,
        scopes: &[&str],
    ) -> Vec<(String, String)> {
        let mut sql = Vec::with_capacity(2 + role.statements.len());
        // the template's group roles, and those of each granted scope
        let mut groups: Vec<&str> = role.cfg.in_roles.iter().map(String::as_str).collect();
        for s in scopes {
            for g in role.cfg.scope_roles.get(*s).into_iter().flatten() {
                if !groups.contains(&g.as_str()) {
                    groups.push(g);
                }
            }
        }
        let in_roles = if groups.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = groups.iter().map(|g| escape_identifier(g)).collect();
            format!(" IN ROLE {}", list.join(", "))
        };
        sql.push((
            "CREATE ROLE".to_owned(),
            format!(
                "CREATE ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT \
                 PASSWORD {} VALID UNTIL {} CONNECTION LIMIT {}{in_roles}",
                escape_identifier(name),
                postgres_protocol::escape::escape_literal(verifier),
                postgres_protocol::escape::escape_literal(until),
                role.cfg.connection_limit,
            ),
        ));
        for (i, t) in role.statements.iter().enumerate() {
            let base = Values {
                name,
                password: verifier,
                expiration: until,
                scope: None,
            };
            let label = format!("statements[{i}]");
            if t.uses(template::Placeholder::Scope) {
                for s in scopes
                    .iter()
                    .filter(|s| role.cfg.scopes.iter().any(|a| a == *s))
                {
                    sql.push((
                        format!("{label} for scope `{s}`"),
                        t.expand(&Values {
                            scope: Some(s),
                            ..base
                        }),
                    ));
                }
            } else {
                sql.push((label, t.expand(&base)));
            }
        }
        sql
    }

    /// Revoke roles by name: no new logins, sessions ended, objects and the
    /// roles dropped. Names must carry the prefix. Gone already is fine.
    async fn drop_roles(&self, names: &[String], role: Option<&Role>) -> Result<(), ProviderError> {
        if let Some(n) = names
            .iter()
            .find(|n| !n.starts_with(&self.cfg().role_prefix))
        {
            return Err(ProviderError::permanent(format!(
                "refusing to drop `{}`: it lacks the prefix `{}`",
                n.escape_default(),
                self.cfg().role_prefix
            )));
        }
        let mut conn = self.pool.get().await?;
        let rows = conn
            .query(
                "SELECT rolname::text, oid FROM pg_roles WHERE rolname = ANY($1::text[])",
                &[&names],
            )
            .await
            .map_err(|e| classify(&e, "listing roles to revoke"))?;
        if rows.is_empty() {
            return Ok(());
        }
        let present: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let oids: Vec<u32> = rows.iter().map(|r| r.get(1)).collect();
        let quoted: Vec<String> = present.iter().map(|n| escape_identifier(n)).collect();
        // 1. no new session, committed before anything else
        let nologin: String = quoted
            .iter()
            .map(|q| format!("ALTER ROLE {q} NOLOGIN;"))
            .collect();
        conn.batch_execute(&nologin)
            .await
            .map_err(|e| classify(&e, "blocking logins"))?;
        // 2. end every live session and wait for it to exit
        self.terminate(&conn, &oids).await?;
        // 3. what the role owns or was granted, then the role
        let mut sql = Vec::new();
        if let Some(r) = role {
            for name in &present {
                for (i, t) in r.revocation.iter().enumerate() {
                    sql.push((
                        format!("revocation_statements[{i}]"),
                        t.expand(&Values {
                            name,
                            ..Values::default()
                        }),
                    ));
                }
            }
        }
        let drop_roles = (
            "dropping the roles".to_owned(),
            format!("DROP ROLE IF EXISTS {}", quoted.join(", ")),
        );
        // Most roles own nothing and hold only group memberships: DROP ROLE
        // alone does it. One that still holds privileges or owns objects
        // makes it fail with 2BP01; then (if the template allows) the
        // management role takes the roles' privileges for the length of the
        // transaction (DROP OWNED needs them) and drops what they own. The
        // membership is not kept between issue and revoke: a management
        // role that is a member of thousands of roles makes every
        // permission check PostgreSQL does for it slow.
        let drop_owned = role.is_none_or(|r| r.cfg.drop_owned);
        let mut plain = sql.clone();
        plain.push(drop_roles.clone());
        {
            // one at a time in the shared catalogs: concurrent DROP OWNED
            // and GRANTs on one schema only fight each other
            let _catalog = self.catalog.lock().await;
            match self.run_retrying(&mut conn, &plain).await {
                Ok(()) => {}
                Err((_, e))
                    if e.code() == Some(&SqlState::DEPENDENT_OBJECTS_STILL_EXIST) && drop_owned =>
                {
                    sql.push((
                        "joining the roles".into(),
                        format!("GRANT {} TO CURRENT_USER", quoted.join(", ")),
                    ));
                    sql.push((
                        "dropping what the roles own".into(),
                        format!("DROP OWNED BY {}", quoted.join(", ")),
                    ));
                    sql.push(drop_roles);
                    self.run_retrying(&mut conn, &sql)
                        .await
                        .map_err(|(label, e)| classify(&e, &label))?;
                }
                Err((label, e)) => return Err(classify(&e, &label)),
            }
        }
        // 4. a session that authenticated in the instant before NOLOGIN
        self.terminate(&conn, &oids).await
    }

    /// Signal every session of these roles at once, then wait until all
    /// have exited. (`pg_terminate_backend(pid, timeout)` would wait for
    /// each in turn, polling at 100 ms: seconds for a few dozen sessions.)
    async fn terminate(
        &self,
        conn: &tokio_postgres::Client,
        oids: &[u32],
    ) -> Result<(), ProviderError> {
        const LIVE: &str =
            "SELECT pid FROM pg_stat_activity WHERE usesysid = ANY($1) AND pid <> pg_backend_pid()";
        let signalled = conn
            .query(
                "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE usesysid = ANY($1) AND pid <> pg_backend_pid()",
                &[&oids],
            )
            .await
            .map_err(|e| classify(&e, "terminating sessions"))?;
        if signalled.is_empty() {
            return Ok(());
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.cfg().terminate_wait_millis);
        loop {
            let live = conn
                .query(LIVE, &[&oids])
                .await
                .map_err(|e| classify(&e, "waiting for sessions to end"))?;
            let Some(row) = live.first() else {
                return Ok(());
            };
            if tokio::time::Instant::now() >= deadline {
                let pid: i32 = row.get(0);
                return Err(ProviderError::retryable(format!(
                    "{} session(s) (pid {pid}, ...) still running {} ms after being terminated",
                    live.len(),
                    self.cfg().terminate_wait_millis
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Revoke a chunk together; if that fails, each on its own so one bad
    /// role does not hold back the others.
    async fn revoke_chunk(
        &self,
        chunk: &[(usize, String)],
        role: Option<&Role>,
    ) -> Vec<(usize, Result<(), ProviderError>)> {
        let names: Vec<String> = chunk.iter().map(|(_, n)| n.clone()).collect();
        match self.drop_roles(&names, role).await {
            Ok(()) => chunk.iter().map(|(i, _)| (*i, Ok(()))).collect(),
            Err(e) if chunk.len() == 1 => vec![(chunk[0].0, Err(e))],
            Err(_) => {
                let mut out = Vec::with_capacity(chunk.len());
                for (i, n) in chunk {
                    out.push((*i, self.drop_roles(std::slice::from_ref(n), role).await));
                }
                out
            }
        }
    }

    /// Check the management role's privileges and dry-run every template in
    /// a transaction that is rolled back. Errors name the template.
    pub async fn check_templates(&self) -> Result<(), ProviderError> {
        let mut conn = self.pool.get().await?;
        self.check_privileges(&conn).await?;
        self.dry_run(&mut conn).await
    }

    /// The management role can create roles and end their sessions.
    async fn check_privileges(&self, conn: &tokio_postgres::Client) -> Result<(), ProviderError> {
        let row = conn
            .query_one(
                "SELECT r.rolsuper, r.rolcreaterole, pg_has_role(current_user, 'pg_signal_backend', 'USAGE') \
                 FROM pg_roles r WHERE r.rolname = current_user",
                &[],
            )
            .await
            .map_err(|e| classify(&e, "reading the management role"))?;
        let (superuser, createrole, signal): (bool, bool, bool) =
            (row.get(0), row.get(1), row.get(2));
        let user = &self.cfg().user;
        if !superuser && !createrole {
            return Err(ProviderError::permanent(format!(
                "the management role `{user}` lacks CREATEROLE (needed to create and drop leased roles)"
            )));
        }
        if !superuser && !signal {
            return Err(ProviderError::permanent(format!(
                "the management role `{user}` is not a member of pg_signal_backend (needed to end leased roles' sessions)"
            )));
        }
        Ok(())
    }

    async fn dry_run(&self, conn: &mut tokio_postgres::Client) -> Result<(), ProviderError> {
        let probe = format!(
            "{}dryrun_{}",
            self.cfg().role_prefix,
            hex(&self.random_bytes::<8>()?)
        );
        let verifier = self.scram_verifier(&self.password()?)?;
        let until = rfc3339(
            Timestamp::from_unix_millis(0)
                .unix_seconds()
                .saturating_add(4_102_444_800),
        );
        for (name, role) in &self.roles {
            let scopes = role.cfg.allowed_scopes();
            let mut sql = self.creation_sql(role, &probe, &verifier, &until, &scopes);
            for (i, t) in role.revocation.iter().enumerate() {
                sql.push((
                    format!("revocation_statements[{i}]"),
                    t.expand(&Values {
                        name: &probe,
                        ..Values::default()
                    }),
                ));
            }
            if role.cfg.drop_owned {
                sql.push((
                    "GRANT to the management role".to_owned(),
                    format!("GRANT {} TO CURRENT_USER", escape_identifier(&probe)),
                ));
                sql.push((
                    "DROP OWNED".to_owned(),
                    format!("DROP OWNED BY {}", escape_identifier(&probe)),
                ));
            }
            sql.push((
                "DROP ROLE".to_owned(),
                format!("DROP ROLE {}", escape_identifier(&probe)),
            ));
            let tx = conn
                .transaction()
                .await
                .map_err(|e| classify(&e, "starting the dry run"))?;
            for (label, stmt) in &sql {
                if let Err(e) = tx.batch_execute(stmt).await {
                    let err = classify(
                        &e,
                        &format!("role template `{name}` failed its dry run at {label}"),
                    );
                    let _ = tx.rollback().await;
                    return Err(ProviderError {
                        message: redact(&err.message, &[&verifier]),
                        ..err
                    });
                }
            }
            tx.rollback()
                .await
                .map_err(|e| classify(&e, "rolling back the dry run"))?;
        }
        Ok(())
    }

    /// The SCRAM-SHA-256 verifier PostgreSQL stores for a password (RFC
    /// 5802/7677): the server never sees the password itself. Our passwords
    /// are printable ASCII, which SASLprep leaves as they are.
    fn scram_verifier(&self, password: &str) -> Result<String, ProviderError> {
        use base64::Engine as _;
        use ring::{digest, hmac, pbkdf2};
        let b64 = base64::engine::general_purpose::STANDARD;
        let iterations = self.cfg().scram_iterations;
        let salt = self.random_bytes::<16>()?;
        let mut salted = zeroize::Zeroizing::new([0u8; 32]);
        let rounds = std::num::NonZeroU32::new(iterations).unwrap_or(std::num::NonZeroU32::MIN);
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            rounds,
            &salt,
            password.as_bytes(),
            &mut salted[..],
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, &salted[..]);
        let client_key = hmac::sign(&key, b"Client Key");
        let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
        let server_key = hmac::sign(&key, b"Server Key");
        Ok(format!(
            "SCRAM-SHA-256${iterations}:{}${}:{}",
            b64.encode(salt),
            b64.encode(stored_key.as_ref()),
            b64.encode(server_key.as_ref())
        ))
    }

    /// Run statements in one transaction, again (after a short random
    /// pause) when it lost a race on a catalog row.
    async fn run_retrying(
        &self,
        conn: &mut tokio_postgres::Client,
        sql: &[(String, String)],
    ) -> Result<(), (String, tokio_postgres::Error)> {
        let mut attempt = 1;
        loop {
            match run_in_transaction(conn, sql).await {
                Err((_, e)) if concurrent_update(&e) && attempt < CONCURRENT_ATTEMPTS => {
                    attempt += 1;
                    self.backoff().await;
                }
                other => return other,
            }
        }
    }

    /// A short random pause before running a transaction again.
    async fn backoff(&self) {
        let jitter = self.random_bytes::<1>().map_or(5, |b| u64::from(b[0] % 20));
        tokio::time::sleep(Duration::from_millis(2 + jitter)).await;
    }

    fn random_bytes<const N: usize>(&self) -> Result<[u8; N], ProviderError> {
        use ring::rand::SecureRandom as _;
        let mut b = [0u8; N];
        self.rng
            .fill(&mut b)
            .map_err(|_| ProviderError::retryable("the system random source failed"))?;
        Ok(b)
    }
}

/// Run statements in one transaction; on failure, which one and why (the
/// transaction is rolled back).
async fn run_in_transaction(
    conn: &mut tokio_postgres::Client,
    sql: &[(String, String)],
) -> Result<(), (String, tokio_postgres::Error)> {
    let tx = conn
        .transaction()
        .await
        .map_err(|e| ("starting a transaction".to_owned(), e))?;
    for (label, stmt) in sql {
        if let Err(e) = tx.batch_execute(stmt).await {
            let _ = tx.rollback().await;
            return Err((label.clone(), e));
        }
    }
    tx.commit().await.map_err(|e| ("committing".to_owned(), e))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 3339 in UTC for whole seconds since the epoch.
fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "infinity".into())
}

/// Replace every secret in an error message (the server may quote a
/// statement's literal in a syntax error).
fn redact(message: &str, secrets: &[&str]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(message.to_owned(), |m, s| m.replace(s, "[REDACTED]"))
}

#[async_trait::async_trait]
impl Provider for PostgresProvider {
    fn describe(&self) -> Description {
        Description {
            kind: "postgres",
            roles: self
                .roles
                .iter()
                .map(|(name, r)| RoleInfo {
                    name: name.clone(),
                    max_ttl: Duration::from_secs(r.cfg.max_ttl_seconds),
                    description: r.cfg.description.clone(),
                })
                .collect(),
            revocation: "blocks logins, terminates the role's sessions, drops what it owns and drops the role".into(),
        }
    }

    fn validate(&self, role: &str, scope: &[String]) -> Result<Duration, ProviderError> {
        let r = self.role(role)?;
        self.narrow(role, r, scope)?;
        Ok(Duration::from_secs(r.cfg.max_ttl_seconds))
    }

    /// Connect and check the management role's privileges every time; the
    /// template dry run (a CREATE ROLE rolled back, which costs the server
    /// a PBKDF2 run) at most once a minute while it keeps passing, so an
    /// unauthenticated readiness probe cannot be used to load the database.
    async fn health(&self) -> Result<(), ProviderError> {
        let fresh = self
            .templates_checked
            .lock()
            .ok()
            .and_then(|t| *t)
            .is_some_and(|t| t.elapsed() < TEMPLATE_RECHECK);
        if fresh {
            let conn = self.pool.get().await?;
            return self.check_privileges(&conn).await;
        }
        self.check_templates().await?;
        if let Ok(mut t) = self.templates_checked.lock() {
            *t = Some(std::time::Instant::now());
        }
        Ok(())
    }

    /// Only for a provider with a role that grants on an object to each
    /// lease's role: the access lists of ours at least half full.
    async fn advisories(&self) -> Vec<String> {
        if self.acl_roles.is_empty() {
            return Vec::new();
        }
        let lists = match self.pool.get().await {
            Ok(conn) => acl::full_lists(&conn, acl::REPORT_FROM, &self.cfg().role_prefix).await,
            Err(e) => return vec![format!("could not read the access lists' sizes: {e}")],
        };
        match lists {
            Ok(lists) => lists
                .iter()
                .map(|(kind, name, n)| acl::advisory(kind, name, *n, &self.acl_roles))
                .collect(),
            Err(e) => vec![format!(
                "could not read the access lists' sizes: {}",
                db_message(&e)
            )],
        }
    }

    async fn issue(&self, spec: &LeaseSpec) -> Result<Issued, ProviderError> {
        let role = self.role(&spec.role)?;
        let scopes = self.narrow(&spec.role, role, &spec.scope)?;
        let name = self.role_name(&spec.lease_id)?;
        let password = self.password()?;
        let verifier = self.scram_verifier(&password)?;
        let expires = spec.expires_at.unix_seconds();
        let until = rfc3339(expires);
        let sql = self.creation_sql(role, &name, &verifier, &until, &scopes);
        let mut conn = self.pool.get().await?;
        // Template statements GRANT on shared objects (a schema, its
        // tables): PostgreSQL cannot update one object's ACL from two
        // transactions at once, so those issues take turns with each other
        // and with revocations. Group roles alone (`in_roles`) never wait.
        let _catalog = if role.statements.is_empty() {
            None
        } else {
            Some(self.catalog.lock().await)
        };
        if let Err((label, e)) = self.run_retrying(&mut conn, &sql).await {
            let err = classify(&e, &format!("role template `{}`: {label}", spec.role));
            return Err(ProviderError {
                message: redact(&err.message, &[&password, &verifier]),
                ..err
            });
        }
        let cfg = self.cfg();
        Ok(Issued {
            credential: Credential::new()
                .public("username", name.clone())
                .secret("password", password.as_str())
                .public("host", cfg.host.clone())
                .public("port", cfg.port.to_string())
                .public("database", cfg.database.clone()),
            handle: RevocationHandle::new(name.clone().into_bytes()),
            expires_at: Timestamp::from_unix_millis(expires.saturating_mul(1000)),
            description: format!(
                "postgres role {name} on {}:{}/{} from template {}, valid until {until}",
                cfg.host, cfg.port, cfg.database, spec.role
            ),
        })
    }

    async fn revoke(&self, lease: &RevokeSpec) -> Result<(), ProviderError> {
        let name = handle_name(&lease.handle)?;
        self.drop_roles(&[name], self.roles.get(&lease.role)).await
    }

    async fn revoke_many(&self, leases: &[RevokeSpec]) -> Vec<Result<(), ProviderError>> {
        let mut out: Vec<Option<Result<(), ProviderError>>> =
            (0..leases.len()).map(|_| None).collect();
        // group by template (their revocation statements differ), then chunk
        let mut groups: BTreeMap<&str, Vec<(usize, String)>> = BTreeMap::new();
        for (i, l) in leases.iter().enumerate() {
            match handle_name(&l.handle) {
                Ok(n) => groups.entry(l.role.as_str()).or_default().push((i, n)),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        let chunks: Vec<(&str, &[(usize, String)])> = groups
            .iter()
            .flat_map(|(r, items)| items.chunks(BATCH).map(move |c| (*r, c)))
            .collect();
        let width = self.cfg().pool_size.max(1);
        type Chunk<'a> =
            futures_util::future::BoxFuture<'a, Vec<(usize, Result<(), ProviderError>)>>;
        let futures: Vec<Chunk<'_>> = chunks
            .into_iter()
            .map(|(r, c)| Box::pin(self.revoke_chunk(c, self.roles.get(r))) as Chunk<'_>)
            .collect();
        let results: Vec<Vec<(usize, Result<(), ProviderError>)>> =
            futures_util::stream::iter(futures)
                .buffer_unordered(width)
                .collect()
                .await;
        for (i, r) in results.into_iter().flatten() {
            out[i] = Some(r);
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ProviderError::permanent("not attempted"))))
            .collect()
    }

    async fn rollback(&self, spec: &LeaseSpec) -> Result<(), ProviderError> {
        let name = self.role_name(&spec.lease_id)?;
        self.drop_roles(&[name], self.roles.get(&spec.role)).await
    }

    async fn inventory(&self) -> Result<Option<Vec<Found>>, ProviderError> {
        let conn = self.pool.get().await?;
        let prefix = &self.cfg().role_prefix;
        let rows = conn
            .query(
                "SELECT rolname::text FROM pg_roles WHERE starts_with(rolname::text, $1) ORDER BY rolname",
                &[prefix],
            )
            .await
            .map_err(|e| classify(&e, "listing leased roles"))?;
        Ok(Some(
            rows.iter()
                .map(|r| {
                    let name: String = r.get(0);
                    let lease_id = name
                        .strip_prefix(prefix.as_str())
                        .filter(|l| l.starts_with("lease_"))
                        .map(str::to_owned);
                    Found { name, lease_id }
                })
                .collect(),
        ))
    }

    async fn remove(&self, found: &Found) -> Result<(), ProviderError> {
        self.drop_roles(std::slice::from_ref(&found.name), None)
            .await
    }
}

fn handle_name(h: &RevocationHandle) -> Result<String, ProviderError> {
    std::str::from_utf8(h.as_bytes())
        .map(str::to_owned)
        .map_err(|_| ProviderError::permanent("the revocation handle is not a role name"))
}
