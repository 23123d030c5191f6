//! `leasehold-bench mysql`: issue 28's figures against a throwaway MariaDB.
//!
//! 1. What the plugin boundary costs: issue and revoke latency of the
//!    MariaDB provider in process and through its plugin process
//!    (`leasehold-plugin-mysql`, gRPC over a Unix socket), one client,
//!    interleaved (the order alternates every sample), same server.
//! 2. Through a `leasehold serve` whose MariaDB provider is the plugin:
//!    leases issued per second by 16 concurrent clients, then one mass
//!    revocation of all of them with 50 sessions open (each user locked,
//!    its sessions killed and gone, the user dropped).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use leasehold::clock::{Clock, SystemClock};
use leasehold::ids::{LeaseId, TaskId};
use leasehold_provider::{LeaseSpec, Provider, RevokeSpec};
use leasehold_provider_mysql::testkit::Server as MariaDb;
use mysql_async::prelude::Queryable;

use crate::{
    bench_dir, client, free_addr, issue_storm, median, percentile, revoke_provider, setup,
    wait_ready, with_broker_warnings,
};

fn plugin_bin() -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?.with_file_name("leasehold-plugin-mysql");
    if !p.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p leasehold-provider-mysql)",
            p.display()
        );
    }
    Ok(p)
}

fn catalog(server: &MariaDb) -> anyhow::Result<leasehold_plugin::PluginConfig> {
    let command = plugin_bin()?;
    let d = ring::digest::digest(&ring::digest::SHA256, &std::fs::read(&command)?);
    let mut cfg = server.provider_config();
    cfg.pool_size = 16;
    Ok(leasehold_plugin::PluginConfig {
        sha256: d.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
        command,
        args: Vec::new(),
        env: Default::default(),
        timeout_seconds: 30,
        config: toml::Table::try_from(cfg)?,
    })
}

fn spec(role: &str) -> LeaseSpec {
    let now = SystemClock.now();
    LeaseSpec {
        lease_id: LeaseId::generate(now).to_string(),
        task_id: TaskId::generate(now).to_string(),
        workload: "bench".into(),
        tenant: None,
        on_behalf_of: "u".into(),
        role: role.into(),
        scope: Vec::new(),
        issued_at: now,
        expires_at: now.saturating_add(Duration::from_secs(600)),
        prepared: None,
        binding: None,
    }
}

/// Issue then revoke once: the two latencies in ms.
async fn cycle(p: &dyn Provider) -> anyhow::Result<(f64, f64)> {
    let s = spec("writer");
    let t = Instant::now();
    let issued = p.issue(&s).await?;
    let issue = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    p.revoke(&RevokeSpec::of(&s, &issued)).await?;
    Ok((issue, t.elapsed().as_secs_f64() * 1e3))
}

pub(crate) async fn mysql(
    bin: &Path,
    samples: usize,
    leases: usize,
    clients: usize,
    sessions: usize,
) -> anyhow::Result<()> {
    let server = tokio::task::spawn_blocking(MariaDb::start).await?;
    server.provision().await;

    // 1. the plugin boundary
    let limits = leasehold_provider::BrokerLimits {
        max_lease_ttl_seconds: 86_400,
        provider_timeout_seconds: 30,
    };
    let local = leasehold_provider_mysql::MysqlProvider::new(server.provider_config(), 86_400)
        .map_err(anyhow::Error::msg)?;
    let plugin = leasehold_plugin::PluginProvider::start(catalog(&server)?, &limits)
        .map_err(anyhow::Error::msg)?;
    plugin
        .wait_ready(Duration::from_secs(30))
        .await
        .map_err(anyhow::Error::msg)?;
    for _ in 0..20 {
        cycle(&local).await?;
        cycle(&plugin).await?;
    }
    let (mut li, mut lr, mut pi, mut pr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for n in 0..samples {
        let order: [&dyn Provider; 2] = if n % 2 == 0 {
            [&local, &plugin]
        } else {
            [&plugin, &local]
        };
        for (k, p) in order.into_iter().enumerate() {
            let (i, r) = cycle(p).await?;
            let in_process = (n % 2 == 0) == (k == 0);
            if in_process {
                li.push(i);
                lr.push(r);
            } else {
                pi.push(i);
                pr.push(r);
            }
        }
    }
    let row = |name: &str, v: &mut Vec<f64>| {
        let m = median(v);
        let p99 = percentile(v, 0.99);
        println!("  {name:<24} median {m:.3} ms, p99 {p99:.3} ms");
        m
    };
    println!("mysql: {samples} issue+revoke cycles each way, one client, interleaved");
    let (mli, mlr) = (
        row("issue, in process", &mut li),
        row("revoke, in process", &mut lr),
    );
    let (mpi, mpr) = (
        row("issue, plugin", &mut pi),
        row("revoke, plugin", &mut pr),
    );
    println!(
        "  the plugin adds {:.3} ms to issue and {:.3} ms to revoke at the median",
        mpi - mli,
        mpr - mlr
    );
    drop(plugin);

    // 2. through the broker, the provider being the plugin
    let dir = bench_dir()?;
    let addr = free_addr()?;
    let (config, creds) = setup(dir.path(), addr, true)?;
    let mut cfg = leasehold::config::Config::load(&config)?;
    let mut entry = catalog(&server)?;
    if let Some(toml::Value::Table(roles)) = entry.config.get_mut("roles") {
        for (_, r) in roles.iter_mut() {
            if let Some(t) = r.as_table_mut() {
                t.insert("max_ttl_seconds".into(), toml::Value::Integer(86_400));
            }
        }
    }
    cfg.providers.insert(
        "mariadb".into(),
        leasehold::config::ProviderConfig::new(entry),
    );
    cfg.limits.max_leases_per_task = u32::try_from(leases).unwrap_or(u32::MAX);
    std::fs::write(&config, cfg.to_toml()?)?;
    let http = client(clients)?;
    let base = format!("http://{addr}");
    let log = dir.path().join("broker.log");
    let mut broker = crate::Server::spawn(bin, &config, &log)?;
    wait_ready(&http, &base, &mut broker).await?;
    let a = creds.identities["assistant-a"].token.clone();
    let responder = creds.identities["responder"].token.clone();

    let t0 = Instant::now();
    let sample = issue_storm(&http, &base, &a, "mariadb", "writer", leases, clients)
        .await
        .map_err(|e| with_broker_warnings(e, &log))?;
    let issue_secs = t0.elapsed().as_secs_f64();

    let mut open = Vec::new();
    for c in sample.iter().cycle().take(sessions) {
        let opts = leasehold_provider_mysql::testkit::login(
            &server,
            c["username"].as_str().unwrap_or_default(),
            c["password"].as_str().unwrap_or_default(),
        );
        let mut conn = mysql_async::Conn::new(opts).await?;
        conn.query_drop("SELECT 1").await?;
        open.push(conn);
    }

    let (revoke_secs, revoked, status) =
        revoke_provider(&http, &base, &responder, "mariadb").await?;
    let left = server.users("lh_").await.len();
    let mut alive = 0;
    for mut c in open {
        alive += usize::from(c.query_drop("SELECT 1").await.is_ok());
    }
    broker.stop()?;
    if revoked != leases as u64 || left != 0 || alive != 0 {
        bail!("revoked {revoked} of {leases}; {left} users left; {alive} sessions alive: {status}");
    }
    println!(
        "mysql: through the broker and the plugin, {leases} leases issued in {issue_secs:.2} s \
         ({:.0} leases/s, {clients} clients); one mass revocation took {revoke_secs:.2} s \
         (every user locked, {sessions} open sessions killed and gone, users dropped)",
        leases as f64 / issue_secs
    );
    Ok(())
}
