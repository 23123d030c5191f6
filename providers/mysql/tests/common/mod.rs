//! Helpers shared by the MariaDB tests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use leasehold_provider::conformance::{Probe, SpecFactory};
use leasehold_provider::{Credential, LeaseSpec, Timestamp};
use leasehold_provider_mysql::MysqlConfig;
use leasehold_provider_mysql::testkit::{self, Server};
use mysql_async::prelude::Queryable;

static SEQ: AtomicU64 = AtomicU64::new(0);

pub fn now() -> Timestamp {
    #[allow(clippy::disallowed_methods)]
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    Timestamp::from_unix_millis(ms)
}

/// A lease id in the broker's shape (`lease_` and 26 base32 characters).
pub fn lease_id() -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let t = now().unix_millis();
    let mut id = format!(
        "lease_{:013X}{:013X}",
        t,
        n + (std::process::id() as u64) * 1_000_000
    );
    id.truncate(32);
    while id.len() < 32 {
        id.push('0');
    }
    id
}

pub struct Specs;
impl SpecFactory for Specs {
    fn spec(&self, role: &str, ttl: Duration) -> LeaseSpec {
        spec(role, ttl, &[])
    }
}

pub fn spec(role: &str, ttl: Duration, scope: &[&str]) -> LeaseSpec {
    let at = now();
    LeaseSpec {
        lease_id: lease_id(),
        task_id: "task_1".into(),
        workload: "wl".into(),
        tenant: None,
        on_behalf_of: "alice@example.com".into(),
        role: role.into(),
        scope: scope.iter().map(|s| (*s).to_owned()).collect(),
        issued_at: at,
        expires_at: at.saturating_add(ttl),
        prepared: None,
        binding: None,
    }
}

/// Logs in with the credential (the provider's own probe does the same;
/// this one is independent of it).
pub struct Login<'a>(pub &'a Server);
#[async_trait::async_trait]
impl Probe for Login<'_> {
    async fn usable(&self, _: &LeaseSpec, c: &Credential) -> Result<bool, String> {
        usable(self.0, c).await
    }
}

pub async fn usable(server: &Server, c: &Credential) -> Result<bool, String> {
    let opts = testkit::login(
        server,
        c.expose("username").unwrap(),
        c.expose("password").unwrap(),
    );
    match mysql_async::Conn::new(opts).await {
        Ok(mut conn) => {
            let one: Option<u8> = conn
                .query_first("SELECT 1")
                .await
                .map_err(|e| e.to_string())?;
            let _ = conn.disconnect().await;
            Ok(one == Some(1))
        }
        Err(mysql_async::Error::Server(s)) if [1045, 4151].contains(&s.code) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

pub async fn setup() -> (Server, MysqlConfig) {
    let server = tokio::task::spawn_blocking(Server::start).await.unwrap();
    server.provision().await;
    let cfg = server.provider_config();
    (server, cfg)
}

/// A catalog entry for the MariaDB plugin binary of this build, pinned to
/// its digest, with `cfg` as the plugin's configuration.
pub fn catalog(cfg: &MysqlConfig) -> leasehold_plugin::PluginConfig {
    let command = std::path::PathBuf::from(env!("CARGO_BIN_EXE_leasehold-plugin-mysql"));
    let bytes = std::fs::read(&command).unwrap();
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    leasehold_plugin::PluginConfig {
        command,
        args: Vec::new(),
        sha256: d.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
        env: Default::default(),
        timeout_seconds: 10,
        config: toml::Table::try_from(cfg).unwrap(),
    }
}

pub fn limits() -> leasehold_provider::BrokerLimits {
    leasehold_provider::BrokerLimits {
        max_lease_ttl_seconds: 86_400,
        provider_timeout_seconds: 10,
    }
}

/// Kill a process by its PID with SIGKILL.
pub fn kill9(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -9 {pid}");
}
