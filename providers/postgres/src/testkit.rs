//! A throwaway PostgreSQL cluster for tests: `initdb` in a temp dir (as the
//! `postgres` user when running as root, since initdb refuses root), the
//! server on a free loopback port with SCRAM authentication, stopped and
//! deleted on drop, including when the test panics.
//!
//! The server binaries are found through `LEASEHOLD_PG_BINDIR`, then
//! `/usr/lib/postgresql/<version>/bin`, then `PATH`. Without them a test
//! fails saying how to get them; it never skips.

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::config::{PostgresConfig, PostgresRole, TlsMode};

/// The management role every test cluster has.
pub const MANAGER: &str = "leasehold_mgmt";
/// The database the tests use.
pub const DATABASE: &str = "app";

#[derive(Debug)]
pub struct Cluster {
    dir: tempfile::TempDir,
    pub port: u16,
    bindir: PathBuf,
    owner: Option<(u32, u32)>,
    superuser_password: String,
    manager_password: String,
    running: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `fsync = off` for speed; benchmarks keep it on.
    pub fsync: bool,
    /// Serve TLS with this certificate and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
}

fn bindir() -> PathBuf {
    if let Ok(d) = std::env::var("LEASEHOLD_PG_BINDIR") {
        return PathBuf::from(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, b)) = versions.pop() {
        return b;
    }
    if let Some(p) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
    }) {
        return p;
    }
    panic!(
        "PostgreSQL server binaries (initdb, pg_ctl) not found. Install them (Debian: `apt-get install postgresql-15`) \
         or point LEASEHOLD_PG_BINDIR at their directory."
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn random_password() -> String {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 18];
    ring::rand::SystemRandom::new().fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The uid and gid of `postgres`, when we are root (initdb refuses root).
fn postgres_owner() -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    let euid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1);
    if euid != 0 {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "running as root, the PostgreSQL test cluster needs the `postgres` user (initdb refuses root); \
             install postgresql-15 or run the tests as another user"
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    Some((id("-u"), id("-g")))
}

impl Cluster {
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Self {
        let bindir = bindir();
        let dir = tempfile::Builder::new()
            .prefix("leasehold-pg-")
            .tempdir()
            .unwrap();
        let owner = postgres_owner();
        let mut c = Self {
            dir,
            port: 0,
            bindir,
            owner,
            superuser_password: random_password(),
            manager_password: random_password(),
            running: false,
        };
        let pwfile = c.dir.path().join("superuser.pw");
        std::fs::write(&pwfile, &c.superuser_password).unwrap();
        std::fs::write(c.dir.path().join("manager.pw"), &c.manager_password).unwrap();
        if let Some((uid, gid)) = owner {
            for p in [c.dir.path(), &pwfile] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
            }
        }
        let data = c.data();
        c.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--pwfile",
                pwfile.to_str().unwrap(),
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "--no-instructions",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nmax_connections = 300\nfsync = {}\n\
             synchronous_commit = {}\nlog_min_messages = warning\npassword_encryption = 'scram-sha-256'\n",
            c.dir.path().display(),
            if opts.fsync { "on" } else { "off" },
            if opts.fsync { "on" } else { "off" },
        );
        let path = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&path).unwrap();
        existing.push_str(&conf);
        if let Some((cert, key)) = &opts.tls {
            use std::os::unix::fs::PermissionsExt as _;
            for (src, dst) in [(cert, "server.crt"), (key, "server.key")] {
                let to = data.join(dst);
                std::fs::copy(src, &to).unwrap();
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(&to, Some(uid), Some(gid)).unwrap();
                }
            }
            existing
                .push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        std::fs::write(&path, existing).unwrap();
        c.start_server();
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server binary, run as `postgres` when we are root.
    fn command(&self, bin: &str) -> Command {
        let exe = self.bindir.join(bin);
        if self.owner.is_some() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, bin: &str, args: &[&str]) -> std::process::Output {
        let exe = self.bindir.join(bin);
        let out = self
            .command(bin)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}{}",
            exe.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Start (again) on a free port, or on the same port after a stop.
    pub fn start_server(&mut self) {
        if self.port == 0 {
            self.port = free_port();
        }
        let data = self.data();
        let log = self.dir.path().join("server.log");
        let port = format!("-p {}", self.port);
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &port,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        self.running = true;
    }

    /// Stop the server (fast: sessions are cut), keeping its data.
    pub fn stop_server(&mut self) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
        self.running = false;
    }

    pub fn connect_config(
        &self,
        user: &str,
        password: &str,
        database: &str,
    ) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(database)
            .connect_timeout(Duration::from_secs(5));
        c
    }

    /// A client connection; the connection task runs in the background.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        database: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = self
            .connect_config(user, password, database)
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    pub async fn superuser(&self, database: &str) -> tokio_postgres::Client {
        self.connect("postgres", &self.superuser_password, database)
            .await
            .unwrap()
    }

    /// Grant usage on `schema` (in the app database) to `roles` new
    /// NOLOGIN roles, `filler_1`..: an access list filled by others.
    /// Returns how many entries the schema's list then holds.
    pub async fn fill_schema_acl(&self, schema: &str, roles: u32) -> usize {
        let su = self.superuser(DATABASE).await;
        let target = postgres_protocol::escape::escape_identifier(schema);
        let sql: String = (1..=roles)
            .map(|i| {
                format!(
                    "CREATE ROLE filler_{i} NOLOGIN; GRANT USAGE ON SCHEMA {target} TO filler_{i};"
                )
            })
            .collect();
        su.batch_execute(&sql).await.unwrap();
        let entries: i32 = su
            .query_one(
                "SELECT cardinality(nspacl) FROM pg_namespace WHERE nspname = $1",
                &[&schema],
            )
            .await
            .unwrap()
            .get(0);
        usize::try_from(entries).unwrap()
    }

    /// The database `app` with schemas `public` and `reporting`, a table in
    /// each, the group roles `app_read` and `we"ird role ü`, and the
    /// management role with `CREATEROLE` and `pg_signal_backend`.
    pub async fn provision(&self) {
        let su = self.superuser("postgres").await;
        su.batch_execute(&format!(
            "CREATE ROLE {MANAGER} LOGIN CREATEROLE PASSWORD '{}'; GRANT pg_signal_backend TO {MANAGER};",
            self.manager_password
        ))
        .await
        .unwrap();
        su.batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .await
            .unwrap();
        let app = self.superuser(DATABASE).await;
        app.batch_execute(&format!(
            "CREATE TABLE public.orders (id int PRIMARY KEY, item text); INSERT INTO public.orders VALUES (1, 'book');
             CREATE SCHEMA reporting; CREATE TABLE reporting.daily (day date, total int);
             CREATE SCHEMA \"we\"\"ird sch ü\"; CREATE TABLE \"we\"\"ird sch ü\".t (x int);
             CREATE ROLE app_read NOLOGIN; GRANT SELECT ON public.orders TO app_read;
             CREATE ROLE \"we\"\"ird role ü\" NOLOGIN; GRANT SELECT ON reporting.daily TO \"we\"\"ird role ü\";
             GRANT USAGE ON SCHEMA reporting TO \"we\"\"ird role ü\";
             GRANT USAGE ON SCHEMA reporting, \"we\"\"ird sch ü\" TO {MANAGER} WITH GRANT OPTION;
             GRANT SELECT ON ALL TABLES IN SCHEMA public, reporting, \"we\"\"ird sch ü\" TO {MANAGER} WITH GRANT OPTION;
             GRANT USAGE, CREATE ON SCHEMA public TO {MANAGER} WITH GRANT OPTION;"
        ))
        .await
        .unwrap();
    }

    /// A database `leasehold` owned by a login role `leasehold_store` (no
    /// other privilege): what a broker's PostgreSQL store needs. Returns
    /// its connection (plain TCP on loopback, password in a file).
    pub async fn provision_store(&self) -> PostgresConfig {
        let password = random_password();
        let su = self.superuser("postgres").await;
        su.batch_execute(&format!(
            "CREATE ROLE leasehold_store LOGIN PASSWORD '{password}'"
        ))
        .await
        .unwrap();
        su.batch_execute("CREATE DATABASE leasehold OWNER leasehold_store")
            .await
            .unwrap();
        let file = self.dir.path().join("store.pw");
        std::fs::write(&file, &password).unwrap();
        PostgresConfig {
            roles: std::collections::BTreeMap::new(),
            user: "leasehold_store".into(),
            database: "leasehold".into(),
            password_file: Some(file),
            ..self.provider_config()
        }
    }

    pub fn manager_password_file(&self) -> PathBuf {
        self.dir.path().join("manager.pw")
    }

    /// A provider config for this cluster: template `read` (group role
    /// `app_read` plus grants per scope), `weird` (a group role with a
    /// quote, a space and Unicode in its name), `groups` (scopes `orders`
    /// and `reporting` as group roles), `writer` (may create tables in
    /// `public`).
    pub fn provider_config(&self) -> PostgresConfig {
        let role = |in_roles: Vec<&str>, statements: Vec<&str>, scopes: Vec<&str>| PostgresRole {
            max_ttl_seconds: 3600,
            connection_limit: 4,
            in_roles: in_roles.into_iter().map(str::to_owned).collect(),
            statements: statements.into_iter().map(str::to_owned).collect(),
            scopes: scopes.into_iter().map(str::to_owned).collect(),
            scope_roles: std::collections::BTreeMap::new(),
            revocation_statements: Vec::new(),
            drop_owned: true,
            description: String::new(),
        };
        let mut roles = std::collections::BTreeMap::new();
        roles.insert(
            "read".to_owned(),
            role(
                vec!["app_read"],
                vec![
                    "GRANT USAGE ON SCHEMA {{scope}} TO {{name}}",
                    "GRANT SELECT ON ALL TABLES IN SCHEMA {{scope}} TO {{name}}",
                ],
                vec!["public", "reporting", "we\"ird sch ü"],
            ),
        );
        roles.insert(
            "weird".to_owned(),
            role(vec!["we\"ird role ü"], vec![], vec![]),
        );
        // scopes through group roles: `orders` joins app_read, `reporting` the weird group
        let mut groups = role(vec![], vec![], vec![]);
        groups
            .scope_roles
            .insert("orders".into(), vec!["app_read".into()]);
        groups
            .scope_roles
            .insert("reporting".into(), vec!["we\"ird role ü".into()]);
        roles.insert("groups".to_owned(), groups);
        roles.insert(
            "writer".to_owned(),
            role(
                vec![],
                vec!["GRANT CREATE, USAGE ON SCHEMA public TO {{name}}"],
                vec![],
            ),
        );
        PostgresConfig {
            host: "127.0.0.1".into(),
            port: self.port,
            database: DATABASE.into(),
            user: MANAGER.into(),
            password_file: Some(self.manager_password_file()),
            password_env: None,
            tls: TlsMode::Disable,
            ca_file: None,
            pool_size: 8,
            connect_timeout_seconds: 2,
            role_prefix: "lh_".into(),
            password_length: 32,
            password_alphabet: "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                .into(),
            terminate_wait_millis: 5000,
            scram_iterations: 4096,
            roles,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let data = self.data();
            let _ = self
                .command("pg_ctl")
                .args([
                    "-D",
                    data.to_str().unwrap_or_default(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ])
                .output();
        }
    }
}
