//! A throwaway MariaDB server for tests: `mariadb-install-db` in a temp
//! dir, `mariadbd` on a free loopback port (and a socket in the dir),
//! stopped by its PID and deleted on drop, including when the test panics.
//!
//! The binaries are found through `LEASEHOLD_MARIADB_BINDIR`, then `PATH`
//! and `/usr/sbin`, `/usr/bin`. Without them a test fails saying how to get
//! them; it never skips.

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;

use crate::config::{MysqlConfig, MysqlRole, TlsMode};

/// The management user every test server has.
pub const MANAGER: &str = "leasehold_mgmt";
/// The schemas the test roles grant on.
pub const SCHEMAS: [&str; 2] = ["app", "reports"];
/// The schema expiry events live in.
pub const EVENTS: &str = "leasehold_events";

#[derive(Debug)]
pub struct Server {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    manager_password: String,
    /// Serve TLS only, with this certificate and key (PEM files).
    tls: Option<(PathBuf, PathBuf)>,
}

/// The repository's test TLS material (`integration/fixtures/tls`): a CA,
/// and a certificate for `localhost` and `127.0.0.1` signed by it.
pub fn test_tls() -> (PathBuf, PathBuf, PathBuf) {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../integration/fixtures/tls");
    (d.join("ca.pem"), d.join("server.pem"), d.join("server.key"))
}

fn find(name: &str) -> PathBuf {
    if let Some(d) = std::env::var_os("LEASEHOLD_MARIADB_BINDIR") {
        return Path::new(&d).join(name);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "MariaDB's `{name}` not found. Install the server (Debian: `apt-get install mariadb-server`; \
                 integration/test.sh does this when run as root) or point LEASEHOLD_MARIADB_BINDIR at its binaries."
            )
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Server {
    /// Install a data directory and start the server, then create the
    /// management user and the test schemas.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// `start`, the server requiring TLS with `tls` (certificate, key).
    pub fn start_with(tls: Option<(PathBuf, PathBuf)>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("lh-mariadb-")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let root = is_root();
        let mut install = Command::new(find("mariadb-install-db"));
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .arg(format!("--tmpdir={}", tmp.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if root {
            install.arg("--user=root");
        }
        let out = install.output().expect("running mariadb-install-db");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut s = Self {
            dir,
            port: free_port(),
            child: None,
            manager_password: "mgmt-password-for-tests-only".into(),
            tls,
        };
        s.start_server();
        s
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("mariadb.sock")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Start `mariadbd` and wait until it accepts connections.
    pub fn start_server(&mut self) {
        let data = self.dir.path().join("data");
        let mut cmd = Command::new(find("mariadbd"));
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!(
                "--pid-file={}",
                self.dir.path().join("mariadb.pid").display()
            ))
            .arg(format!(
                "--log-error={}",
                self.dir.path().join("error.log").display()
            ))
            .arg(format!(
                "--tmpdir={}",
                self.dir.path().join("tmp").display()
            ))
            .arg("--skip-name-resolve")
            .arg("--event-scheduler=ON")
            .arg("--innodb-flush-log-at-trx-commit=2")
            .arg("--max-connections=500")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if is_root() {
            cmd.arg("--user=root");
        }
        if let Some((cert, key)) = &self.tls {
            cmd.arg(format!("--ssl-cert={}", cert.display()))
                .arg(format!("--ssl-key={}", key.display()))
                .arg("--require-secure-transport=ON");
        }
        self.child = Some(cmd.spawn().expect("starting mariadbd"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "mariadbd exited ({status}): {}",
                    std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the server (by its PID) and wait for it.
    pub fn stop_server(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    /// A connection as root over the socket.
    pub async fn root(&self) -> mysql_async::Conn {
        let opts = mysql_async::OptsBuilder::default()
            .socket(Some(self.socket().display().to_string()))
            .user(Some("root"));
        mysql_async::Conn::new(opts)
            .await
            .expect("connecting as root")
    }

    /// The management user with what the provider needs, the test schemas
    /// (a table in each) and the events' schema.
    pub async fn provision(&self) {
        let mut c = self.root().await;
        for s in SCHEMAS {
            c.query_drop(format!("CREATE DATABASE IF NOT EXISTS `{s}`"))
                .await
                .unwrap();
            c.query_drop(format!(
                "CREATE TABLE IF NOT EXISTS `{s}`.items (id INT PRIMARY KEY, name TEXT) ENGINE=InnoDB"
            ))
            .await
            .unwrap();
            c.query_drop(format!("INSERT IGNORE INTO `{s}`.items VALUES (1, 'one')"))
                .await
                .unwrap();
        }
        c.query_drop(format!("CREATE DATABASE IF NOT EXISTS `{EVENTS}`"))
            .await
            .unwrap();
        c.query_drop(format!(
            "CREATE USER IF NOT EXISTS '{MANAGER}'@'%' IDENTIFIED BY '{}'",
            self.manager_password
        ))
        .await
        .unwrap();
        c.query_drop(format!(
            "GRANT CREATE USER, PROCESS, CONNECTION ADMIN, RELOAD ON *.* TO '{MANAGER}'@'%'"
        ))
        .await
        .unwrap();
        c.query_drop(format!("GRANT SELECT ON mysql.user TO '{MANAGER}'@'%'"))
            .await
            .unwrap();
        c.query_drop(format!(
            "GRANT SELECT ON mysql.global_priv TO '{MANAGER}'@'%'"
        ))
        .await
        .unwrap();
        for s in SCHEMAS {
            c.query_drop(format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON `{s}`.* TO '{MANAGER}'@'%' WITH GRANT OPTION"
            ))
            .await
            .unwrap();
        }
        c.query_drop(format!("GRANT EVENT ON `{EVENTS}`.* TO '{MANAGER}'@'%'"))
            .await
            .unwrap();
        c.disconnect().await.unwrap();
    }

    pub fn manager_password_file(&self) -> PathBuf {
        let f = self.dir.path().join("manager.password");
        std::fs::write(&f, &self.manager_password).unwrap();
        f
    }

    /// A provider configuration with a `reader` role (SELECT on one or
    /// both schemas) and a `writer` role.
    pub fn provider_config(&self) -> MysqlConfig {
        let mut roles = BTreeMap::new();
        roles.insert(
            "reader".to_owned(),
            MysqlRole {
                max_ttl_seconds: 3600,
                host: "%".into(),
                max_user_connections: 60,
                grants: vec!["GRANT SELECT ON {{scope}}.* TO {{user}}".into()],
                scopes: SCHEMAS.iter().map(|s| (*s).to_owned()).collect(),
                description: "read the app's schemas".into(),
            },
        );
        roles.insert(
            "writer".to_owned(),
            MysqlRole {
                max_ttl_seconds: 600,
                host: "%".into(),
                max_user_connections: 5,
                grants: vec!["GRANT SELECT, INSERT, UPDATE ON `app`.* TO {{user}}".into()],
                scopes: Vec::new(),
                description: "write the app's schema".into(),
            },
        );
        MysqlConfig {
            host: "127.0.0.1".into(),
            port: self.port,
            user: MANAGER.into(),
            password_file: Some(self.manager_password_file()),
            password_env: None,
            tls: TlsMode::Disable,
            ca_file: None,
            pool_size: 8,
            connect_timeout_seconds: 5,
            user_prefix: "lh_".into(),
            session_wait_millis: 5000,
            expiry_schema: None,
            roles,
        }
    }

    /// The users whose name starts with `prefix`.
    pub async fn users(&self, prefix: &str) -> Vec<String> {
        let mut c = self.root().await;
        let users: Vec<String> = c.query("SELECT User FROM mysql.user").await.unwrap();
        c.disconnect().await.unwrap();
        users
            .into_iter()
            .filter(|u| u.starts_with(prefix))
            .collect()
    }

    /// Sessions open for `user`.
    pub async fn sessions(&self, user: &str) -> usize {
        let mut c = self.root().await;
        let n: Option<u64> = c
            .exec_first(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = ?",
                (user,),
            )
            .await
            .unwrap();
        c.disconnect().await.unwrap();
        n.unwrap_or(0) as usize
    }
}

/// Connection options for a leased credential against `server`.
pub fn login(server: &Server, user: &str, password: &str) -> mysql_async::Opts {
    mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(server.port)
        .user(Some(user))
        .pass(Some(password))
        .prefer_socket(false)
        .into()
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_server();
    }
}
