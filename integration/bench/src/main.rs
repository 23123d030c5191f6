//! leasehold-bench: the three figures of the broker core, measured against
//! the real `leasehold` binary on loopback with durable commits.
//!
//! - `throughput`: concurrent clients each loop open task -> lease (token
//!   provider) -> complete task over HTTP; leases per second, median of
//!   several rounds.
//! - `restart`: a store with N active leases (1,000,000 by default); time
//!   from process start to `GET /v1/ready` = 200, and resident memory.
//! - `expiry`: N leases (100,000) expiring in the same millisecond; how long
//!   after that deadline the last one is revoked (from the lease records'
//!   `ended_at`, and as observed by polling).
//!
//! Stores for `restart` and `expiry` are filled through the broker library's
//! own issue path (intent, provider, activation), not by writing records.

#![forbid(unsafe_code)]

/// The broker's allocator, so in-process measurements (policy decisions)
/// see what the broker sees.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bytes;
mod mysql;
mod proxy;
mod soak;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use std::str::FromStr as _;

use clap::{Parser, Subcommand};
use leasehold::auth::Workload;
use leasehold::clock::{Clock, ManualClock, SystemClock, Timestamp};
use leasehold::dev::DevCredentials;
use leasehold::domain::Broker;
use leasehold::domain::issue::LeaseParams;
use leasehold::domain::task::OpenTask;
use leasehold::providers::Providers;
use leasehold::store::{LeaseQuery, LeaseState, Store, StoreKey, StoreOptions};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Benchmarks for the leasehold broker (see README: Benchmarks)")]
struct Cli {
    /// The leasehold binary to benchmark (default: next to this one).
    #[arg(long, global = true)]
    leasehold: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Issue + complete throughput over HTTP.
    Throughput {
        #[arg(long, default_value_t = 64, value_parser = at_least_one())]
        clients: usize,
        /// Leases issued under each task before it is completed.
        #[arg(long, default_value_t = 1)]
        leases_per_task: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Restart time and memory with many active leases.
    Restart {
        #[arg(long, default_value_t = 1_000_000)]
        leases: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Many leases expiring in the same second.
    Expiry {
        #[arg(long, default_value_t = 100_000)]
        leases: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The event chain's cost (against a no-op-sink build) and verify speed.
    Events {
        /// A `leasehold` built with `--features leasehold/bench-no-events`
        /// (see the README): the chain's cost is the rate against it.
        /// Without it, only the rate with the chain and the verify speed.
        #[arg(long)]
        noop: Option<PathBuf>,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Verify a store holding at least this many events.
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
    },
    /// Issue 3's figures: decision latency with a realistic policy set, and
    /// calls with leases per second over HTTP.
    Policy {
        /// Workloads as entities.
        #[arg(long, default_value_t = 1000)]
        workloads: usize,
        /// Policies in the set.
        #[arg(long, default_value_t = 60)]
        policies: usize,
        #[arg(long, default_value_t = 200_000)]
        decisions: usize,
        /// Calls per task in the HTTP part.
        #[arg(long, default_value_t = 20)]
        calls_per_task: usize,
        /// Concurrent clients in the HTTP part, one connection each.
        #[arg(long, default_value_t = 64, value_parser = at_least_one())]
        clients: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Issue 9's figures: one mass revocation job over many active leases
    /// (API call to last lease revoked), and how soon the fence holds while
    /// the fenced workload keeps asking for leases.
    Revoke {
        #[arg(long, default_value_t = 100_000)]
        leases: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Issue 6's figure: issue latency through the broker (a Vault lease:
    /// per-lease token, database credential read, cubbyhole note, two
    /// durable commits) against a direct read of the same upstream path,
    /// interleaved one for one on one client against one local OpenBao
    /// (dev mode) and PostgreSQL (fsync on).
    Vault {
        #[arg(long, default_value_t = 300)]
        samples: usize,
    },
    /// Issue 27's figures: task cycles per second on 1 broker on redb, 1 on
    /// PostgreSQL and 3 on one PostgreSQL (fresh throwaway clusters, fsync
    /// on, clients spread over the brokers), then failover: kill -9 of the
    /// leader to the first expiry the new leader does, median of several.
    Ha {
        #[arg(long, default_value_t = 64, value_parser = at_least_one())]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Leaders killed, one after another.
        #[arg(long, default_value_t = 5)]
        failovers: usize,
    },
    /// Issue 5's figures against a local PostgreSQL (a throwaway cluster,
    /// fsync on): leases issued per second by 16 concurrent clients, and
    /// the time one mass revocation takes to revoke them all (sessions
    /// terminated, roles dropped).
    Postgres {
        #[arg(long, default_value_t = 10_000)]
        leases: usize,
        #[arg(long, default_value_t = 16, value_parser = at_least_one())]
        clients: usize,
        /// The role template: `weird` (membership in a group role only:
        /// the pattern that scales, and the default) or `read` (a group role
        /// and grants on the schema per lease, which stops at about 600
        /// concurrent leases: the schema's access list outgrows its row).
        #[arg(long, default_value = "weird")]
        role: String,
        /// Idle sessions held open with leased credentials during the revocation.
        #[arg(long, default_value_t = 50)]
        sessions: usize,
        /// The provider's `scram_iterations` (PostgreSQL's default: 4096).
        #[arg(long, default_value_t = 4096)]
        scram_iterations: u32,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Issue 28's figures against a throwaway MariaDB: issue and revoke
    /// latency of the MariaDB provider in process and through its plugin
    /// (one client, interleaved), then through a broker whose MariaDB
    /// provider is the plugin: leases per second by 16 clients and one mass
    /// revocation of them all with 50 sessions open. Needs
    /// `leasehold-plugin-mysql` next to this binary.
    Mysql {
        /// Issue+revoke cycles measured each way.
        #[arg(long, default_value_t = 500)]
        samples: usize,
        #[arg(long, default_value_t = 10_000)]
        leases: usize,
        #[arg(long, default_value_t = 16, value_parser = at_least_one())]
        clients: usize,
        #[arg(long, default_value_t = 50)]
        sessions: usize,
    },
    /// `leasehold proxy`: the latency it adds to a request with a warm
    /// lease (median, p99, against the same request sent directly), and
    /// requests per second through one proxy with many clients.
    Proxy {
        /// Sequential requests per latency sample, each way.
        #[arg(long, default_value_t = 2000, value_parser = at_least_one())]
        requests: usize,
        #[arg(long, default_value_t = 64, value_parser = at_least_one())]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 5, value_parser = at_least_one())]
        rounds: usize,
    },
    /// Issue 32's soak: the throughput load at half its peak for `minutes`
    /// (30 s tokens the reaper expires), a row a minute: latency p50/p99,
    /// RSS, store and log sizes, revocation queue, errors.
    Soak {
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        minutes: u64,
        #[arg(long, default_value_t = 8, value_parser = at_least_one())]
        clients: usize,
        /// Leases per second to hold (default: half the measured peak).
        #[arg(long)]
        rate: Option<f64>,
        /// Seconds of unthrottled load that measure the peak.
        #[arg(long, default_value_t = 10)]
        calibrate_seconds: u64,
        /// Seconds in a "minute" (shorter for a smoke run).
        #[arg(long, default_value_t = 60, hide = true)]
        minute_seconds: u64,
        /// Retention's window (`retention.keep_ended_seconds`, and the
        /// events' minimum age): short, so the store reaches its steady
        /// size within the soak.
        #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(60..))]
        retention_seconds: u64,
    },
    /// What one ended lease costs on disk: `leases` 30-second tokens, 100
    /// to a task, each task completed; then every table of the stopped
    /// store, per lease (entries, key and value bytes), redb's pages and
    /// the file.
    Bytes {
        #[arg(long, default_value_t = 20_000, value_parser = at_least_one())]
        leases: usize,
        #[arg(long, default_value_t = 8, value_parser = at_least_one())]
        clients: usize,
    },
    /// The disk under BENCH_DIR: fsync time after writing N random 4 KiB
    /// pages (what a checkpoint does), and after appending 64 KiB (what a
    /// group commit's log record does). Durable throughput follows it, so a
    /// figure from another machine, or another day on a shared one, is
    /// comparable only next to this.
    Disk,
    /// The three figures of the broker core with their default sizes.
    All,
}

fn leasehold_bin(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(p) = &cli.leasehold {
        return Ok(p.clone());
    }
    let me = std::env::current_exe()?;
    let p = me.with_file_name("leasehold");
    if !p.exists() {
        bail!(
            "{} not found: build it (cargo build --release) or pass --leasehold",
            p.display()
        );
    }
    Ok(p)
}

/// A count of clients: none would measure nothing (and divide by zero).
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// Keys, credentials and a `serve` config in `dir`. `long_leases` raises the
/// caps so leases outlive the benchmark.
fn setup(
    dir: &Path,
    addr: std::net::SocketAddr,
    long_leases: bool,
) -> anyhow::Result<(PathBuf, DevCredentials)> {
    let (mut config, creds) = leasehold::dev::prepare(dir, addr, SystemClock.now())?;
    config.server.shutdown_grace_seconds = 30;
    // one workload from one address drives the load: no rate limits here
    config.server.rate_limits.per_workload_per_second = 0.0;
    config.server.rate_limits.per_address_per_second = 0.0;
    config.store.quick_repair = std::env::var("BENCH_QUICK_REPAIR").map_or(true, |v| v != "0");
    if let Some(d) = std::env::var("BENCH_COMMIT_DELAY_US")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.store.commit_delay_micros = d;
    }
    if long_leases {
        config.policy.max_active_leases_per_workload = 100_000_000;
        config.limits.max_task_ttl_seconds = 7 * 86_400;
        config.limits.max_lease_ttl_seconds = 86_400;
        for p in config.providers.values_mut() {
            if let Some(t) = p.get_mut::<leasehold_provider_token::TokenProviderConfig>() {
                t.roles
                    .values_mut()
                    .for_each(|r| r.max_ttl_seconds = 86_400);
            } else if let Some(pg) = p.get_mut::<leasehold_provider_postgres::PostgresConfig>() {
                pg.roles
                    .values_mut()
                    .for_each(|r| r.max_ttl_seconds = 86_400);
            } else if let Some(v) = p.get_mut::<leasehold_provider_vault::VaultConfig>() {
                v.roles
                    .values_mut()
                    .for_each(|r| r.max_ttl_seconds = 86_400);
            }
        }
    }
    // a permissive policy set: the benchmarks measure the broker, not the
    // example set's quotas
    std::fs::write(config.policy.dir.join("demo.cedar"), BENCH_POLICY)?;
    let path = dir.join("leasehold.toml");
    std::fs::write(&path, config.to_toml()?)?;
    Ok((path, creds))
}

const BENCH_POLICY: &str = r#"
@id("open") permit (principal in Leasehold::Group::"assistants", action == Leasehold::Action::"OpenTask", resource);
@id("read") permit (principal in Leasehold::Group::"assistants", action == Leasehold::Action::"Call", resource == Leasehold::Tool::"demo.read");
@id("lease") permit (principal in Leasehold::Group::"assistants", action == Leasehold::Action::"Lease", resource)
  when { resource.provider == "token" || resource.provider == "appdb" || resource.provider == "vault" || resource.provider == "mariadb" };
"#;

/// A fresh folder for one round's store, under `BENCH_DIR` (default /tmp).
fn bench_dir() -> std::io::Result<tempfile::TempDir> {
    tempfile::tempdir_in(std::env::var_os("BENCH_DIR").unwrap_or_else(|| "/tmp".into()))
}

fn free_addr() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn cpu_seconds_of(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // fields after the parenthesised command name; utime and stime are 14 and 15
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds this whole machine has been busy (every core, every
/// process: brokers, database, load generator), from `/proc/stat`.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait
    let busy: f64 =
        f.iter().take(8).sum::<f64>() - f.get(3).unwrap_or(&0.0) - f.get(4).unwrap_or(&0.0);
    busy / 100.0
}

/// One measuring round: the rate of `done` over `seconds`, and the CPU time
/// the brokers, this process and the whole machine spent per unit done (us).
async fn measure_round(servers: &[Server], done: &AtomicU64, seconds: u64) -> (f64, f64, f64, f64) {
    let cpu = || servers.iter().map(Server::cpu_seconds).sum::<f64>();
    let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    let (s0, c0, m0) = (
        cpu(),
        cpu_seconds_of("/proc/self/stat"),
        machine_busy_seconds(),
    );
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let n = (done.load(Ordering::Relaxed) - n0) as f64;
    let rate = n / t0.elapsed().as_secs_f64();
    let per = |d: f64| d * 1e6 / n.max(1.0);
    (
        rate,
        per(cpu() - s0),
        per(cpu_seconds_of("/proc/self/stat") - c0),
        per(machine_busy_seconds() - m0),
    )
}

struct Server {
    child: Child,
}

impl Server {
    fn spawn(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log)?;
        let child = Command::new(bin)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .args(["serve", "-c"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { child })
    }

    /// CPU seconds (user + system) the process has used.
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds_of(&format!("/proc/{}/stat", self.child.id()))
    }

    fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Some(s) = self.child.try_wait()? {
                if !s.success() {
                    bail!("leasehold exited with {s}");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child.kill()?;
        bail!("leasehold did not stop within 60 s")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn wait_ready(http: &reqwest::Client, base: &str, server: &mut Server) -> anyhow::Result<()> {
    loop {
        if let Ok(r) = http.get(format!("{base}/v1/ready")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if let Some(s) = server.child.try_wait()? {
            bail!("leasehold exited during start-up: {s}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn client(pool: usize) -> anyhow::Result<reqwest::Client> {
    leasehold::install_crypto_provider();
    Ok(reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(pool)
        .timeout(Duration::from_secs(60))
        .build()?)
}

async fn post(
    http: &reqwest::Client,
    url: String,
    token: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let mut req = http.post(url).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let v: Value = resp.json().await?;
    if !status.is_success() {
        bail!("HTTP {status}: {v}");
    }
    Ok(v)
}

/// A lean HTTP/1.1 keep-alive connection, like wrk's: the load generator
/// shares the machine's two cores with the broker, so it must cost little.
struct Conn {
    stream: tokio::io::BufStream<tokio::net::TcpStream>,
    host: String,
}

impl Conn {
    async fn open(addr: std::net::SocketAddr) -> anyhow::Result<Self> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Self {
            stream: tokio::io::BufStream::new(s),
            host: addr.to_string(),
        })
    }

    async fn post(
        &mut self,
        path: &str,
        token: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let body = body.unwrap_or("");
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        self.send(&head, body.as_bytes()).await
    }

    /// Send one request (its head as given) and read the answer (which
    /// must have a `Content-Length`).
    async fn send(&mut self, head: &str, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
        self.stream.write_all(head.as_bytes()).await?;
        self.stream.write_all(body).await?;
        self.stream.flush().await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("bad status line")?;
        let mut len = 0usize;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                bail!("connection closed");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse()?;
            }
        }
        let mut buf = vec![0u8; len];
        self.stream.read_exact(&mut buf).await?;
        Ok((status, buf))
    }
}

/// What one broker did under load.
struct Load {
    rates: Vec<f64>,
    server_cpu: Vec<f64>,
    /// The whole machine's busy CPU per unit done (us).
    machine_cpu: Vec<f64>,
    p50: f64,
    p99: f64,
    ops_per_commit: f64,
    apply_s: f64,
    commit_s: f64,
    /// Round trips under the chain head's lock per commit (PostgreSQL).
    lock_trips_per_commit: f64,
    checkpoints: u64,
    checkpoint_s: f64,
    wal_s: f64,
}

/// Start `bin` on a fresh store, warm up, then measure `rounds` windows.
async fn run_load(
    bin: &Path,
    no_events: bool,
    clients: usize,
    per_task: usize,
    seconds: u64,
    rounds: usize,
) -> anyhow::Result<Load> {
    let dir = bench_dir()?;
    let addr = free_addr()?;
    let (config, creds) = setup(dir.path(), addr, false)?;
    if no_events {
        // the switch exists only in a `bench-no-events` build
        let mut t: toml::Table = toml::from_str(&std::fs::read_to_string(&config)?)?;
        if let Some(toml::Value::Table(a)) = t.get_mut("audit") {
            a.insert("bench_no_events".into(), toml::Value::Boolean(true));
        }
        std::fs::write(&config, toml::to_string(&t)?)?;
    }
    let mut server = Server::spawn(bin, &config, &dir.path().join("broker.log"))?;
    let base = format!("http://{addr}");
    let http = client(clients)?;
    wait_ready(&http, &base, &mut server).await?;
    let label = if no_events {
        "no-op sink"
    } else {
        "event chain"
    };
    let servers = [server];
    let load = drive(
        &[addr],
        &servers,
        &creds,
        clients,
        per_task,
        seconds,
        rounds,
        label,
    )
    .await?;
    let [server] = servers;
    server.stop()?;
    Ok(load)
}

/// `clients` task cycles (open, lease x `per_task`, complete) spread over
/// the brokers at `addrs`, warmed up, then `rounds` windows measured; the
/// store's counters are read from the first broker.
#[allow(clippy::too_many_arguments)]
async fn drive(
    addrs: &[std::net::SocketAddr],
    servers: &[Server],
    creds: &DevCredentials,
    clients: usize,
    per_task: usize,
    seconds: u64,
    rounds: usize,
    label: &str,
) -> anyhow::Result<Load> {
    let per_task = per_task.max(1);
    let tokens = [
        creds.identities["assistant-a"].token.clone(),
        creds.identities["assistant-b"].token.clone(),
    ];
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (token, done, stop) = (tokens[i % 2].clone(), done.clone(), stop.clone());
        let addr = addrs[i % addrs.len()];
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            let mut mine = Vec::new();
            let open = r#"{"purpose":"bench","on_behalf_of":"alice@example.com","prompt_sha256":"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824","tools":["demo.read"],"ttl_seconds":300}"#;
            let lease_body = r#"{"provider":"token","role":"demo","ttl_seconds":60}"#;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let (st, body) = conn.post("/v1/tasks", &token, Some(open)).await?;
                if st != 201 {
                    bail!("open task: HTTP {st}: {}", String::from_utf8_lossy(&body));
                }
                let task: Value = serde_json::from_slice(&body)?;
                let id = task["task_id"].as_str().unwrap_or_default().to_owned();
                for _ in 0..per_task {
                    let (st, body) = conn.post(&format!("/v1/tasks/{id}/leases"), &token, Some(lease_body)).await?;
                    let lease: Value = serde_json::from_slice(&body)?;
                    if st != 201 || lease["credential"]["token"].as_str().is_none() {
                        bail!("lease: HTTP {st}: {lease}");
                    }
                }
                let (st, body) = conn.post(&format!("/v1/tasks/{id}/complete"), &token, None).await?;
                let c: Value = serde_json::from_slice(&body)?;
                if st != 200 || c["revoked"].as_array().map(Vec::len) != Some(per_task) {
                    bail!("completion did not revoke every lease: HTTP {st}: {c}");
                }
                done.fetch_add(per_task as u64, Ordering::Relaxed);
                mine.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(mine)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // warm-up
    let mut rates = Vec::new();
    let (mut server_cpu, mut client_cpu, mut machine_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let (rate, s_us, c_us, m_us) = measure_round(servers, &done, seconds).await;
        println!(
            "  {label} round {}: {rate:.0} leases/s; CPU per lease: broker {s_us:.0} us, load generator {c_us:.0} us, whole machine {m_us:.0} us",
            r + 1
        );
        rates.push(rate);
        server_cpu.push(s_us);
        client_cpu.push(c_us);
        machine_cpu.push(m_us);
    }
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let stats = reqwest::Client::new()
        .get(format!("http://{}/v1/stats", addrs[0]))
        .bearer_auth(&creds.identities["admin"].token)
        .send()
        .await?
        .json::<Value>()
        .await?;
    let commits = stats["store"]["commits"].as_f64().unwrap_or(0.0);
    let ops = stats["store"]["operations"].as_f64().unwrap_or(0.0);
    Ok(Load {
        rates,
        server_cpu,
        machine_cpu,
        p50: percentile(&mut lat, 0.5),
        p99: percentile(&mut lat, 0.99),
        ops_per_commit: ops / commits.max(1.0),
        lock_trips_per_commit: stats["store"]["lock_round_trips"].as_f64().unwrap_or(0.0)
            / commits.max(1.0),
        apply_s: stats["store"]["apply_seconds"].as_f64().unwrap_or(0.0),
        commit_s: stats["store"]["commit_seconds"].as_f64().unwrap_or(0.0),
        checkpoints: stats["store"]["checkpoints"].as_u64().unwrap_or(0),
        checkpoint_s: stats["store"]["checkpoint_seconds"].as_f64().unwrap_or(0.0),
        wal_s: stats["store"]["wal_seconds"].as_f64().unwrap_or(0.0),
    })
}

/// Brokers on one throwaway PostgreSQL cluster (fsync on), each its own
/// config and address, sharing keys, tokens and policies.
struct PgBrokers {
    servers: Vec<Server>,
    addrs: Vec<std::net::SocketAddr>,
    configs: Vec<PathBuf>,
    creds: DevCredentials,
    dir: tempfile::TempDir,
    // dropped last: stops the database
    _pg: leasehold_provider_postgres::testkit::Cluster,
}

impl PgBrokers {
    async fn start(bin: &Path, n: usize) -> anyhow::Result<Self> {
        let pg = leasehold_provider_postgres::testkit::Cluster::start_with(
            leasehold_provider_postgres::testkit::Options {
                fsync: true,
                ..Default::default()
            },
        );
        let conn = pg.provision_store().await;
        let dir = bench_dir()?;
        let first = free_addr()?;
        let (config, creds) = setup(dir.path(), first, false)?;
        let base = leasehold::config::Config::load(&config)?;
        let (mut servers, mut addrs, mut configs) = (Vec::new(), Vec::new(), Vec::new());
        let http = client(4)?;
        for i in 0..n {
            let addr = if i == 0 { first } else { free_addr()? };
            let mut c = base.clone();
            c.server.listen = addr;
            c.store.backend = leasehold::config::StoreBackend::Postgres;
            c.store.postgres = Some(toml::from_str(&format!(
                "host = {:?}\nport = {}\ndatabase = {:?}\nuser = {:?}\npassword_file = {:?}\ntls = 'disable'\nnode = 'node-{i}'\n",
                conn.host,
                conn.port,
                conn.database,
                conn.user,
                conn.password_file.as_ref().context("password file")?
            ))?);
            let file = dir.path().join(format!("node-{i}.toml"));
            std::fs::write(&file, c.to_toml()?)?;
            let mut server = Server::spawn(bin, &file, &dir.path().join(format!("node-{i}.log")))?;
            wait_ready(&http, &format!("http://{addr}"), &mut server).await?;
            servers.push(server);
            addrs.push(addr);
            configs.push(file);
        }
        Ok(Self {
            servers,
            addrs,
            configs,
            creds,
            dir,
            _pg: pg,
        })
    }

    /// The index of the node that leads, waiting for one.
    async fn leader(&self, http: &reqwest::Client, skip: Option<usize>) -> anyhow::Result<usize> {
        let admin = &self.creds.identities["admin"].token;
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            for (i, a) in self.addrs.iter().enumerate() {
                if Some(i) == skip {
                    continue;
                }
                if let Ok(r) = http
                    .get(format!("http://{a}/v1/cluster"))
                    .bearer_auth(admin)
                    .send()
                    .await
                    && let Ok(v) = r.json::<Value>().await
                    && v["this_node_leads"] == true
                {
                    return Ok(i);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("no broker leads")
    }

    fn stop(self) -> anyhow::Result<()> {
        for s in self.servers {
            s.stop()?;
        }
        Ok(())
    }
}

/// Throughput of `n` brokers on one PostgreSQL.
async fn pg_load(
    bin: &Path,
    n: usize,
    clients: usize,
    seconds: u64,
    rounds: usize,
) -> anyhow::Result<Load> {
    let b = PgBrokers::start(bin, n).await?;
    let label = format!("{n} on PostgreSQL");
    let load = drive(
        &b.addrs, &b.servers, &b.creds, clients, 1, seconds, rounds, &label,
    )
    .await?;
    b.stop()?;
    Ok(load)
}

/// Kill -9 the leader `times` times (restarting it as a follower after
/// each): seconds from the kill to the first expiry the new leader does,
/// for a lease that fell due just after the kill.
async fn failover(bin: &Path, times: usize) -> anyhow::Result<Vec<f64>> {
    let mut b = PgBrokers::start(bin, 3).await?;
    let http = client(4)?;
    let a = b.creds.identities["assistant-a"].token.clone();
    let admin = b.creds.identities["admin"].token.clone();
    let mut out = Vec::new();
    for round in 0..times {
        let leader = b.leader(&http, None).await?;
        let follower = (leader + 1) % b.addrs.len();
        let base = format!("http://{}", b.addrs[follower]);
        let task = post(
            &http,
            format!("{base}/v1/tasks"),
            &a,
            Some(json!({"purpose": "failover", "on_behalf_of": "alice@example.com", "prompt": "p", "ttl_seconds": 600})),
        )
        .await?;
        let task = task["task_id"].as_str().context("task id")?.to_owned();
        let lease = post(
            &http,
            format!("{base}/v1/tasks/{task}/leases"),
            &a,
            Some(json!({"provider": "token", "role": "demo", "ttl_seconds": 4})),
        )
        .await?;
        let id = lease["lease_id"].as_str().context("lease id")?.to_owned();
        // kill before the lease is due (at least 3 s after it was issued)
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let killed_at = SystemClock.now().unix_millis();
        b.servers[leader].child.kill()?;
        b.servers[leader].child.wait()?;
        let ended = loop {
            let l: Value = http
                .get(format!("{base}/v1/leases/{id}"))
                .bearer_auth(&admin)
                .send()
                .await?
                .json()
                .await?;
            if l["state"] == "expired" {
                break l["ended_at"]
                    .as_str()
                    .and_then(leasehold::clock::parse_rfc3339)
                    .context("ended_at")?
                    .unix_millis();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let secs = (ended - killed_at) as f64 / 1000.0;
        let new = b.leader(&http, Some(leader)).await?;
        println!(
            "  failover {}: node-{leader} killed; node-{new} leads; the lease due after the kill expired {secs:.2} s after it",
            round + 1
        );
        out.push(secs);
        // the killed node comes back as a follower
        let mut server = Server::spawn(
            bin,
            &b.configs[leader],
            &b.dir.path().join(format!("node-{leader}-{round}.log")),
        )?;
        wait_ready(&http, &format!("http://{}", b.addrs[leader]), &mut server).await?;
        b.servers[leader] = server;
    }
    b.stop()?;
    Ok(out)
}

async fn ha(
    bin: &Path,
    clients: usize,
    seconds: u64,
    rounds: usize,
    failovers: usize,
) -> anyhow::Result<()> {
    disk()?;
    let mut redb = run_load(bin, false, clients, 1, seconds, rounds).await?;
    let mut one = pg_load(bin, 1, clients, seconds, rounds).await?;
    let mut three = pg_load(bin, 3, clients, seconds, rounds).await?;
    let mut times = failover(bin, failovers).await?;
    let (r, o, t) = (
        median(&mut redb.rates),
        median(&mut one.rates),
        median(&mut three.rates),
    );
    println!(
        "ha: task cycles/s (open, lease, complete; {clients} clients, median of {rounds} rounds of {seconds} s, fsync on): \
         1 broker on redb {r:.0}; 1 on PostgreSQL {o:.0} ({:.2}x redb); 3 on one PostgreSQL {t:.0} ({:.2}x one on PostgreSQL); \
         broker CPU per cycle (all brokers): redb {:.0} us, PostgreSQL x1 {:.0} us, x3 {:.0} us; \
         cycle latency p50/p99: redb {:.1}/{:.1} ms, PostgreSQL x1 {:.1}/{:.1} ms, x3 {:.1}/{:.1} ms; \
         operations per commit: redb {:.1}, PostgreSQL x1 {:.1}, x3 (node-0) {:.1}; \
         round trips under the chain head's lock per commit, besides taking it and committing: x1 {:.2}, x3 (node-0) {:.2}",
        o / r,
        t / o,
        median(&mut redb.server_cpu),
        median(&mut one.server_cpu),
        median(&mut three.server_cpu),
        redb.p50,
        redb.p99,
        one.p50,
        one.p99,
        three.p50,
        three.p99,
        redb.ops_per_commit,
        one.ops_per_commit,
        three.ops_per_commit,
        one.lock_trips_per_commit,
        three.lock_trips_per_commit,
    );
    // what the whole machine (brokers, database, load generator) spends
    // per cycle, and the rate its cores would allow at that cost
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let machine = [&mut redb, &mut one, &mut three].map(|l| median(&mut l.machine_cpu));
    println!(
        "ha CPU: whole machine ({cores:.0} cores) busy per task cycle: redb {:.0} us, PostgreSQL x1 {:.0} us, x3 {:.0} us; \
         so even with every core busy, at most {:.0}, {:.0} and {:.0} task cycles/s",
        machine[0],
        machine[1],
        machine[2],
        cores * 1e6 / machine[0].max(1.0),
        cores * 1e6 / machine[1].max(1.0),
        cores * 1e6 / machine[2].max(1.0),
    );
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "ha failover: median {:.2} s over {failovers} kills -9 of the leader (to the first expiry done by the new leader; default lease period 6 s); each: {:?}",
        median(&mut times),
        sorted.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>()
    );
    Ok(())
}

/// Median fsync time (ms) after writing `pages` random 4 KiB pages into a
/// 64 MiB preallocated file under BENCH_DIR, for each of `sizes`.
fn disk_probe(sizes: &[usize]) -> anyhow::Result<Vec<(usize, f64)>> {
    use std::io::{Seek, SeekFrom, Write};
    const FILE_PAGES: u64 = 16_384;
    let dir = bench_dir()?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.path().join("probe"))?;
    let page = [0x5au8; 4096];
    for _ in 0..FILE_PAGES {
        f.write_all(&page)?;
    }
    f.sync_all()?;
    // a small xorshift: the pages need to be scattered, not unpredictable
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::new();
    for &n in sizes {
        let mut times = Vec::new();
        for _ in 0..11 {
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                f.seek(SeekFrom::Start((x % FILE_PAGES) * 4096))?;
                f.write_all(&page)?;
            }
            let t = Instant::now();
            f.sync_data()?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        out.push((n, median(&mut times)));
    }
    Ok(out)
}

/// Median fdatasync time (ms) after appending `bytes` to a file under
/// BENCH_DIR: what a group commit's write-ahead log record costs.
fn append_probe(bytes: usize) -> anyhow::Result<f64> {
    use std::io::Write;
    let dir = bench_dir()?;
    let mut f = std::fs::File::create(dir.path().join("append"))?;
    let buf = vec![0x5au8; bytes];
    let mut times = Vec::new();
    for _ in 0..51 {
        f.write_all(&buf)?;
        let t = Instant::now();
        f.sync_data()?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(&mut times))
}

fn disk() -> anyhow::Result<()> {
    let probe = disk_probe(&[1, 10, 50, 200])?;
    let parts: Vec<String> = probe
        .iter()
        .map(|(n, ms)| format!("{n} page(s) {ms:.2} ms"))
        .collect();
    println!(
        "disk: fsync after writing random 4 KiB pages (median of 11): {}; \
         fdatasync after appending 64 KiB (median of 51): {:.2} ms",
        parts.join(", "),
        append_probe(64 << 10)?
    );
    Ok(())
}

async fn throughput(
    bin: &Path,
    clients: usize,
    per_task: usize,
    seconds: u64,
    rounds: usize,
) -> anyhow::Result<()> {
    disk()?;
    let mut l = run_load(bin, false, clients, per_task, seconds, rounds).await?;
    println!(
        "throughput: median {:.0} leases/s over {rounds} rounds of {seconds} s, {clients} clients \
         ({per_task} lease(s) per task: open task, lease x{per_task}, complete); broker CPU {:.0} us per lease (median); \
         task cycle latency p50 {:.1} ms, p99 {:.1} ms; \
         {:.1} store operations per durable commit; writer time: {:.1} s applying, {:.1} s logging and committing (of which {:.1} s writing and syncing the log), \
         {:.1} s in {} checkpoints",
        median(&mut l.rates),
        median(&mut l.server_cpu),
        l.p50,
        l.p99,
        l.ops_per_commit,
        l.apply_s,
        l.commit_s,
        l.wal_s,
        l.checkpoint_s,
        l.checkpoints,
    );
    Ok(())
}

/// Issue 4's figures: throughput with the event chain against a no-op sink
/// (alternating brokers, one round each, so both see the same machine), and
/// offline verification of a store holding at least `events` events.
async fn events_bench(
    bin: &Path,
    noop: Option<&Path>,
    rounds: usize,
    seconds: u64,
    events: usize,
) -> anyhow::Result<()> {
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        with.extend(run_load(bin, false, 64, 1, seconds, 1).await?.rates);
        if let Some(noop) = noop {
            without.extend(run_load(noop, true, 64, 1, seconds, 1).await?.rates);
        }
    }
    let w = median(&mut with);
    match noop {
        Some(_) => {
            let n = median(&mut without);
            println!(
                "event chain cost: median {w:.0} leases/s with the chain, {n:.0} with a no-op sink ({rounds} alternating rounds of {seconds} s): {:.1}% lower",
                (1.0 - w / n) * 100.0
            );
        }
        None => println!(
            "event chain: median {w:.0} leases/s with the chain ({rounds} rounds of {seconds} s); \
             no --noop build given, so no cost against a no-op sink (see the README)"
        ),
    }
    // a store with at least `events` events: task.opened + (issuing, issued) per lease
    let dir = bench_dir()?;
    let addr = free_addr()?;
    let (config, _) = setup(dir.path(), addr, true)?;
    let leases = events.div_ceil(2);
    println!("  filling a store with {leases} leases ({events}+ events)...");
    populate(&config, Arc::new(SystemClock), leases, 6 * 3600).await?;
    let mut times = Vec::new();
    let mut checked = 0;
    for _ in 0..3 {
        let t0 = Instant::now();
        let out = Command::new(bin)
            .args(["events", "verify", "--store"])
            .arg(dir.path().join("leasehold.redb"))
            .arg("--checkpoint-key")
            .arg(dir.path().join("checkpoint.pk8"))
            .output()?;
        let secs = t0.elapsed().as_secs_f64();
        let report: Value = serde_json::from_slice(&out.stdout)?;
        if !out.status.success() || report["ok"] != true {
            bail!("verification failed: {report}");
        }
        checked = report["events"].as_u64().unwrap_or(0);
        println!("  verify: {checked} events in {secs:.2} s");
        times.push(secs);
    }
    println!(
        "events verify: {checked} events in median {:.2} s (3 runs, offline from the store file)",
        median(&mut times)
    );
    Ok(())
}

/// Fill a store with active leases through the broker's own issue path.
async fn populate(
    config_path: &Path,
    clock: Arc<dyn Clock>,
    leases: usize,
    ttl: i64,
) -> anyhow::Result<f64> {
    let config = leasehold::config::Config::load(config_path)?;
    let key = StoreKey::from_file(config.store.key_file.as_ref().context("key_file")?)?;
    let store = Store::open(&StoreOptions::new(&config.store.path), &key)?;
    let providers = Providers::build(
        &config.providers,
        &store,
        config.broker_limits(),
        std::sync::Arc::new(leasehold::clock::SystemClock),
    )?;
    let policy = Arc::new(
        leasehold::policy::PolicyEngine::load(
            &config.policy.dir,
            leasehold::preflight::role_entities(&config),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let broker = Arc::new(Broker::new(
        store,
        clock,
        providers,
        config.limits.clone(),
        config.reaper.clone(),
        policy,
        leasehold::domain::PolicySettings::from(&config.policy),
    ));
    let per_task = 1000usize.min(leases);
    let workload = Arc::new(Workload {
        id: "dev:assistant-a".into(),
        issuer: "dev".into(),
        subject: "assistant-a".into(),
        tenant: Some("dev".into()),
        attributes: Default::default(),
    });
    let t0 = Instant::now();
    let mut remaining = leases;
    let mut tasks = tokio::task::JoinSet::new();
    while remaining > 0 {
        let n = per_task.min(remaining);
        remaining -= n;
        let (b, w) = (broker.clone(), workload.clone());
        tasks.spawn(async move {
            let task = b
                .open_task(
                    &w,
                    OpenTask {
                        purpose: "bench".into(),
                        on_behalf_of: "alice@example.com".into(),
                        prompt: Some("fill".into()),
                        prompt_sha256: None,
                        tools: vec![],
                        ttl_seconds: ttl + 3600,
                    },
                    &leasehold::audit::Ctx::system(),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let id = leasehold::ids::TaskId(task.id);
            let mut inner = tokio::task::JoinSet::new();
            for chunk in 0..8 {
                let (b, w) = (b.clone(), w.clone());
                let count = n / 8 + usize::from(chunk < n % 8);
                inner.spawn(async move {
                    for _ in 0..count {
                        let p = LeaseParams {
                            provider: "token".into(),
                            role: "demo".into(),
                            ttl_seconds: ttl,
                            scope: vec![],
                            binding: None,
                        };
                        b.request_lease(&w, id, p, None, &leasehold::audit::Ctx::system())
                            .await
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                    }
                    anyhow::Ok(())
                });
            }
            while let Some(r) = inner.join_next().await {
                r??;
            }
            anyhow::Ok(())
        });
        // bounded concurrency: 64 tasks x 8 streams in flight
        while tasks.len() >= 64 {
            if let Some(r) = tasks.join_next().await {
                r??;
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let rate = leases as f64 / t0.elapsed().as_secs_f64();
    match Arc::try_unwrap(broker) {
        Ok(b) => drop(b),
        Err(_) => bail!("the broker is still shared after populating"),
    }
    Ok(rate)
}

async fn restart(bin: &Path, leases: usize, rounds: usize) -> anyhow::Result<()> {
    let dir = bench_dir()?;
    let addr = free_addr()?;
    let (config, creds) = setup(dir.path(), addr, true)?;
    println!("  filling a store with {leases} active leases through the issue path...");
    let rate = populate(&config, Arc::new(SystemClock), leases, 6 * 3600).await?;
    let size = std::fs::metadata(dir.path().join("leasehold.redb"))?.len();
    println!(
        "  filled at {rate:.0} leases/s (library, no HTTP); store file {} MiB",
        size >> 20
    );
    let http = client(4)?;
    let base = format!("http://{addr}");
    let admin = creds.identities["admin"].token.clone();
    let (mut times, mut rss, mut hwm) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let t0 = Instant::now();
        let mut server = Server::spawn(bin, &config, &dir.path().join(format!("restart-{r}.log")))?;
        wait_ready(&http, &base, &mut server).await?;
        let ready = t0.elapsed().as_secs_f64() * 1000.0;
        let (now_rss, peak) = server.rss_kib();
        let stats: Value = http
            .get(format!("{base}/v1/stats"))
            .bearer_auth(&admin)
            .send()
            .await?
            .json()
            .await?;
        let active = stats["leases"]["token"]["active"].as_u64().unwrap_or(0);
        if active != leases as u64 {
            bail!("expected {leases} active leases after restart, found {active}");
        }
        // serving, not just listening: issue one more lease
        let a = &creds.identities["assistant-a"].token;
        let task = post(
            &http,
            format!("{base}/v1/tasks"),
            a,
            Some(json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 60})),
        )
        .await?;
        let id = task["task_id"].as_str().unwrap_or_default();
        post(&http, format!("{base}/v1/tasks/{id}/complete"), a, None).await?;
        server.stop()?;
        println!(
            "  round {}: ready in {ready:.0} ms, RSS {} MiB at ready (peak {} MiB), {active} active leases",
            r + 1,
            now_rss / 1024,
            peak / 1024
        );
        times.push(ready);
        rss.push(now_rss as f64 / 1024.0);
        hwm.push(peak as f64 / 1024.0);
    }
    // after a crash (SIGKILL while serving): how long recovery takes
    let mut server = Server::spawn(bin, &config, &dir.path().join("crash.log"))?;
    wait_ready(&http, &base, &mut server).await?;
    let a = &creds.identities["assistant-a"].token;
    post(
        &http,
        format!("{base}/v1/tasks"),
        a,
        Some(json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 60})),
    )
    .await?;
    server.child.kill()?;
    server.child.wait()?;
    let t0 = Instant::now();
    let mut server = Server::spawn(bin, &config, &dir.path().join("after-crash.log"))?;
    wait_ready(&http, &base, &mut server).await?;
    let after_crash = t0.elapsed().as_secs_f64() * 1000.0;
    let (crash_rss, crash_peak) = server.rss_kib();
    server.stop()?;
    println!(
        "  after SIGKILL: ready in {after_crash:.0} ms, RSS {} MiB (peak {} MiB)",
        crash_rss / 1024,
        crash_peak / 1024
    );
    println!(
        "restart: {leases} active leases; ready in median {:.0} ms (max {:.0}); RSS at ready median {:.0} MiB, peak RSS max {:.0} MiB",
        median(&mut times.clone()),
        times.iter().cloned().fold(0.0, f64::max),
        median(&mut rss),
        hwm.iter().cloned().fold(0.0, f64::max)
    );
    Ok(())
}

async fn expiry(bin: &Path, leases: usize, rounds: usize) -> anyhow::Result<()> {
    let (mut lag_max, mut lag_observed) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let dir = bench_dir()?;
        let addr = free_addr()?;
        let (config, creds) = setup(dir.path(), addr, true)?;
        // Issue every lease "at" the same instant S, with a TTL that puts
        // the deadline T far enough ahead to finish filling and start.
        let ttl: i64 = 600;
        let lead = Duration::from_secs(20 + (leases as u64) / 4_000);
        // a whole second, so the tokens' `exp` (whole seconds) is the deadline exactly
        let deadline = Timestamp::from_unix_millis(
            (SystemClock.now().saturating_add(lead).unix_millis() / 1000 + 1) * 1000,
        );
        let issued_at = Timestamp::from_unix_millis(deadline.unix_millis() - ttl * 1000);
        let clock = ManualClock::new(issued_at);
        populate(&config, Arc::new(clock), leases, ttl).await?;
        if SystemClock.now() >= deadline.saturating_add(Duration::from_secs(0)) {
            bail!(
                "filling took longer than the lead of {lead:?}; the deadline passed before the broker started"
            );
        }
        let http = client(4)?;
        let base = format!("http://{addr}");
        let admin = creds.identities["admin"].token.clone();
        let mut server = Server::spawn(bin, &config, &dir.path().join("broker.log"))?;
        wait_ready(&http, &base, &mut server).await?;
        let wait = SystemClock.now().until(deadline);
        println!(
            "  round {}: {leases} leases expire at one instant, {:.1} s from now",
            r + 1,
            wait.as_secs_f64()
        );
        tokio::time::sleep(wait).await;
        let observed = loop {
            let stats: Value = http
                .get(format!("{base}/v1/stats"))
                .bearer_auth(&admin)
                .send()
                .await?
                .json()
                .await?;
            let t = &stats["leases"]["token"];
            let live = t["active"].as_u64().unwrap_or(1)
                + t["revoking"].as_u64().unwrap_or(1)
                + t["irrevocable"].as_u64().unwrap_or(1);
            if live == 0 {
                break SystemClock.now().unix_millis() - deadline.unix_millis();
            }
            if SystemClock.now().unix_millis() - deadline.unix_millis() > 120_000 {
                bail!("still {live} live leases 2 minutes after the deadline");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        server.stop()?;
        // the precise figure: each lease's own ended_at against its deadline
        let cfg = leasehold::config::Config::load(&config)?;
        let key = StoreKey::from_file(cfg.store.key_file.as_ref().context("key_file")?)?;
        let store = Store::open(&StoreOptions::new(&cfg.store.path), &key)?;
        let reader = store.read()?;
        let mut q = LeaseQuery {
            limit: 1000,
            scan_budget: 1_000_000,
            ..Default::default()
        };
        let (mut n, mut worst, mut early) = (0usize, i64::MIN, 0usize);
        loop {
            let (page, next) = reader.list_leases(&q)?;
            for l in &page {
                if l.state != LeaseState::Expired {
                    bail!("lease in state {} after the run", l.state.as_str());
                }
                let lag = l.ended_at.unwrap_or(i64::MAX) - l.expires_at;
                if lag < 0 {
                    early += 1;
                }
                worst = worst.max(lag);
                n += 1;
            }
            match next {
                Some(c) => q.after = Some(c),
                None => break,
            }
        }
        drop(reader);
        drop(store);
        if n != leases || early > 0 {
            bail!("{n} leases found, {early} revoked before their deadline");
        }
        println!(
            "  round {}: last lease revoked {worst} ms after the deadline (observed by polling: {observed} ms)",
            r + 1
        );
        lag_max.push(worst as f64);
        lag_observed.push(observed as f64);
    }
    println!(
        "expiry: {leases} leases with one deadline; all revoked within median {:.0} ms of it (max over rounds {:.0} ms; polling saw {:.0} ms)",
        median(&mut lag_max.clone()),
        lag_max.iter().cloned().fold(0.0, f64::max),
        median(&mut lag_observed)
    );
    Ok(())
}

/// Poll a revocation job until it is no longer running.
async fn wait_job(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    id: &str,
    start: Instant,
    limit: Duration,
) -> anyhow::Result<Value> {
    loop {
        let s: Value = http
            .get(format!("{base}/v1/revocations/{id}"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        if s["state"] != "running" {
            return Ok(s);
        }
        if start.elapsed() > limit {
            bail!("the job is still running after {} s: {s}", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn vault(bin: &Path, samples: usize) -> anyhow::Result<()> {
    use leasehold_provider_postgres::testkit::{Cluster, DATABASE, MANAGER, Options};
    use leasehold_provider_vault::testkit::Bao;
    let cluster = Cluster::start_with(Options {
        fsync: true,
        tls: None,
    });
    cluster.provision().await;
    let bao = Bao::dev();
    let pw = std::fs::read_to_string(cluster.manager_password_file())?;
    bao.database_setup("database", cluster.port, MANAGER, &pw, DATABASE, "1h")
        .await;
    let token = bao.broker_setup(&["database"], "1h").await;
    let dir = bench_dir()?;
    let token_file = dir.path().join("bao-token");
    std::fs::write(&token_file, &token)?;
    let addr = free_addr()?;
    let (config, creds) = setup(dir.path(), addr, true)?;
    let mut cfg = leasehold::config::Config::load(&config)?;
    cfg.providers.insert(
        "vault".into(),
        leasehold::config::ProviderConfig::new(
            bao.provider_config(leasehold_provider_vault::AuthConfig::Token { token_file }),
        ),
    );
    cfg.limits.max_leases_per_task = u32::try_from(samples + 10).unwrap_or(u32::MAX);
    std::fs::write(&config, cfg.to_toml()?)?;
    let http = client(2)?;
    let base = format!("http://{addr}");
    let mut server = Server::spawn(bin, &config, &dir.path().join("broker.log"))?;
    wait_ready(&http, &base, &mut server).await?;
    let a = creds.identities["assistant-a"].token.clone();
    let task = post(
        &http,
        format!("{base}/v1/tasks"),
        &a,
        Some(
            json!({"purpose": "bench", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 86_400}),
        ),
    )
    .await?;
    let url = format!(
        "{base}/v1/tasks/{}/leases",
        task["task_id"].as_str().unwrap_or_default()
    );
    let direct_url = format!("{}/v1/database/creds/ro", bao.addr());
    let (mut direct, mut broker) = (Vec::new(), Vec::new());
    // warm both paths (connections, the upstream's plugin)
    for i in 0..(samples + 10) {
        let t = Instant::now();
        let r = http
            .get(&direct_url)
            .header("X-Vault-Token", &token)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("direct read: {}", r.status());
        }
        let v: Value = r.json().await?;
        let d = t.elapsed().as_secs_f64() * 1000.0;
        if v["lease_id"].as_str().unwrap_or_default().is_empty() {
            bail!("direct read without a lease id");
        }
        let t = Instant::now();
        post(
            &http,
            url.clone(),
            &a,
            Some(json!({"provider": "vault", "role": "ro", "ttl_seconds": 3600})),
        )
        .await?;
        let b = t.elapsed().as_secs_f64() * 1000.0;
        if i >= 10 {
            direct.push(d);
            broker.push(b);
        }
    }
    // completing the task revokes every lease at the upstream
    let t = Instant::now();
    post(
        &http,
        format!(
            "{base}/v1/tasks/{}/complete",
            task["task_id"].as_str().unwrap_or_default()
        ),
        &a,
        None,
    )
    .await?;
    let complete = t.elapsed().as_secs_f64();
    server.stop()?;
    let (md, mb) = (median(&mut direct), median(&mut broker));
    println!(
        "vault: issue latency over {samples} interleaved samples, one client: direct upstream read median {md:.2} ms \
         (p90 {:.2}), through the broker median {mb:.2} ms (p90 {:.2}); ratio {:.2}x, {:.2} ms added; \
         completing the task revoked {samples} upstream leases in {complete:.2} s",
        percentile(&mut direct, 0.9),
        percentile(&mut broker, 0.9),
        mb / md,
        mb - md,
    );
    Ok(())
}

/// `leases` leases of `provider`/`role` issued by `clients` concurrent
/// clients, one task each; a few of their credentials back.
async fn issue_storm(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    provider: &str,
    role: &str,
    leases: usize,
    clients: usize,
) -> anyhow::Result<Vec<Value>> {
    let mut set = tokio::task::JoinSet::new();
    for c in 0..clients {
        let n = leases / clients + usize::from(c < leases % clients);
        let (http, base, a) = (http.clone(), base.to_owned(), token.to_owned());
        let (provider, role) = (provider.to_owned(), role.to_owned());
        set.spawn(async move {
            let task = post(&http, format!("{base}/v1/tasks"), &a, Some(json!({"purpose": "bench", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 86_400}))).await?;
            let url = format!("{base}/v1/tasks/{}/leases", task["task_id"].as_str().unwrap_or_default());
            let mut creds = Vec::new();
            for _ in 0..n {
                let l = post(&http, url.clone(), &a, Some(json!({"provider": provider, "role": role, "ttl_seconds": 3600}))).await?;
                if creds.len() < 8 {
                    creds.push(l["credential"].clone());
                }
            }
            anyhow::Ok(creds)
        });
    }
    let mut sample = Vec::new();
    while let Some(res) = set.join_next().await {
        sample.extend(res??);
    }
    Ok(sample)
}

/// One mass revocation job over every lease of `provider`, waited for:
/// its duration in seconds, how many it revoked, and its final status.
async fn revoke_provider(
    http: &reqwest::Client,
    base: &str,
    responder: &str,
    provider: &str,
) -> anyhow::Result<(f64, u64, Value)> {
    let start = Instant::now();
    let job = post(
        http,
        format!("{base}/v1/revocations"),
        responder,
        Some(json!({"provider": provider, "reason": "bench"})),
    )
    .await?;
    let id = job["job_id"].as_str().unwrap_or_default().to_owned();
    let status = wait_job(http, base, responder, &id, start, Duration::from_secs(600)).await?;
    let revoked = status["by_provider"][provider]["revoked"]
        .as_u64()
        .unwrap_or(0);
    Ok((start.elapsed().as_secs_f64(), revoked, status))
}

/// `e` with the broker's last warnings from its log.
fn with_broker_warnings(e: anyhow::Error, log: &Path) -> anyhow::Error {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = log
        .lines()
        .rev()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(5)
        .collect();
    anyhow::anyhow!("{e}; the broker's last warnings:\n{}", tail.join("\n"))
}

async fn postgres(
    bin: &Path,
    leases: usize,
    clients: usize,
    role: &str,
    sessions: usize,
    scram_iterations: u32,
    rounds: usize,
) -> anyhow::Result<()> {
    use leasehold_provider_postgres::testkit::{Cluster, Options};
    let (mut rates, mut revokes) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let cluster = Cluster::start_with(Options {
            fsync: std::env::var("BENCH_PG_FSYNC").map_or(true, |v| v != "0"),
            tls: None,
        });
        cluster.provision().await;
        let dir = bench_dir()?;
        let addr = free_addr()?;
        let (config, creds) = setup(dir.path(), addr, true)?;
        let mut cfg = leasehold::config::Config::load(&config)?;
        let mut pg = cluster.provider_config();
        pg.pool_size = 16;
        pg.scram_iterations = scram_iterations;
        cfg.providers
            .insert("appdb".into(), leasehold::config::ProviderConfig::new(pg));
        cfg.limits.max_leases_per_task = u32::try_from(leases).unwrap_or(u32::MAX);
        std::fs::write(&config, cfg.to_toml()?)?;
        let http = client(clients)?;
        let base = format!("http://{addr}");
        let mut server = Server::spawn(bin, &config, &dir.path().join("broker.log"))?;
        wait_ready(&http, &base, &mut server).await?;
        let a = creds.identities["assistant-a"].token.clone();
        let responder = creds.identities["responder"].token.clone();

        // issue: `clients` concurrent clients, one task each
        let t0 = Instant::now();
        let sample = issue_storm(&http, &base, &a, "appdb", role, leases, clients)
            .await
            .map_err(|e| with_broker_warnings(e, &dir.path().join("broker.log")))?;
        let issue_secs = t0.elapsed().as_secs_f64();
        let rate = leases as f64 / issue_secs;

        // idle sessions with leased credentials
        let mut open = Vec::new();
        for c in sample.iter().cycle().take(sessions) {
            let client = cluster
                .connect(
                    c["username"].as_str().unwrap_or_default(),
                    c["password"].as_str().unwrap_or_default(),
                    c["database"].as_str().unwrap_or_default(),
                )
                .await?;
            client.simple_query("SELECT 1").await?;
            open.push(client);
        }

        // one mass revocation of every appdb lease
        let (revoke_secs, revoked, status) =
            revoke_provider(&http, &base, &responder, "appdb").await?;
        let su = cluster.superuser("postgres").await;
        let left: i64 = su
            .query_one(
                "SELECT count(*) FROM pg_roles WHERE starts_with(rolname::text, 'lh_')",
                &[],
            )
            .await?
            .get(0);
        let alive = open.iter().filter(|c| !c.is_closed()).count();
        server.stop()?;
        if revoked != leases as u64 || left != 0 || alive != 0 {
            bail!(
                "revoked {revoked} of {leases}; {left} roles left; {alive} sessions alive: {status}"
            );
        }
        println!(
            "  round {}: issued {leases} in {issue_secs:.2} s ({rate:.0} leases/s, {clients} clients, template {role}); \
             one job revoked all {leases} (roles dropped, {sessions} idle sessions terminated) in {revoke_secs:.2} s ({:.0}/s)",
            r + 1,
            leases as f64 / revoke_secs
        );
        rates.push(rate);
        revokes.push(revoke_secs);
    }
    println!(
        "postgres: {leases} leases issued at median {:.0} leases/s ({clients} clients, template {role}, scram_iterations {scram_iterations}); \
         revoked by one mass revocation in median {:.2} s (max {:.2} s); fsync on",
        median(&mut rates),
        median(&mut revokes.clone()),
        revokes.iter().cloned().fold(0.0, f64::max)
    );
    Ok(())
}

async fn mass_revoke(bin: &Path, leases: usize, rounds: usize) -> anyhow::Result<()> {
    let (mut totals, mut refusals, mut posts) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let dir = bench_dir()?;
        let addr = free_addr()?;
        let (config, creds) = setup(dir.path(), addr, true)?;
        populate(&config, Arc::new(SystemClock), leases, 6 * 3600).await?;
        let http = client(8)?;
        let base = format!("http://{addr}");
        let mut server = Server::spawn(bin, &config, &dir.path().join("broker.log"))?;
        wait_ready(&http, &base, &mut server).await?;
        let responder = creds.identities["responder"].token.clone();
        let a = creds.identities["assistant-a"].token.clone();
        // the compromised workload keeps asking for leases, 4 at a time
        let task = post(
            &http,
            format!("{base}/v1/tasks"),
            &a,
            Some(json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 3600})),
        )
        .await?;
        let task_id = task["task_id"].as_str().unwrap_or_default().to_owned();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t0 = Instant::now();
        let mut askers = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (http, base, a, stop) = (http.clone(), base.clone(), a.clone(), stop.clone());
            let mut url = format!("{base}/v1/tasks/{task_id}/leases");
            askers.spawn(async move {
                // (first refusal, last success) in ms since t0
                let (mut refused, mut granted) = (None::<f64>, None::<f64>);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let sent = t0.elapsed().as_secs_f64() * 1000.0;
                    let resp = http
                        .post(&url)
                        .bearer_auth(&a)
                        .json(&json!({"provider": "token", "role": "demo", "ttl_seconds": 600}))
                        .send()
                        .await?;
                    let status = resp.status().as_u16();
                    let body: Value = resp.json().await?;
                    match status {
                        201 | 200 => granted = Some(sent),
                        403 if body["error"]["code"] == "fenced" => {
                            refused.get_or_insert(sent);
                        }
                        // a fast host fills a task before the fence: the
                        // compromised workload simply opens another
                        429 if body["error"]["code"] == "task_lease_cap" => {
                            let opened = http
                                .post(format!("{base}/v1/tasks"))
                                .bearer_auth(&a)
                                .json(&json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 3600}))
                                .send()
                                .await?;
                            let code = opened.status().as_u16();
                            let v: Value = opened.json().await?;
                            match code {
                                201 => {
                                    url = format!(
                                        "{base}/v1/tasks/{}/leases",
                                        v["task_id"].as_str().unwrap_or_default()
                                    );
                                }
                                403 if v["error"]["code"] == "fenced" => {
                                    refused.get_or_insert(sent);
                                }
                                _ => bail!("opening another task: HTTP {code}: {v}"),
                            }
                        }
                        _ => bail!("lease request: HTTP {status}: {body}"),
                    }
                }
                anyhow::Ok((refused, granted))
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let body = json!({"workload": "dev:assistant-a", "fence": true, "reason": "bench: credential leak"});
        let called = t0.elapsed().as_secs_f64() * 1000.0;
        let start = Instant::now();
        let started = post(
            &http,
            format!("{base}/v1/revocations"),
            &responder,
            Some(body),
        )
        .await?;
        let answered = start.elapsed().as_secs_f64() * 1000.0;
        let job = started["job_id"].as_str().unwrap_or_default().to_owned();
        let status = wait_job(
            &http,
            &base,
            &responder,
            &job,
            start,
            Duration::from_secs(300),
        )
        .await?;
        let observed = start.elapsed().as_secs_f64();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut first_refusal, mut last_grant) = (f64::MAX, 0.0f64);
        while let Some(res) = askers.join_next().await {
            let (refused, granted) = res??;
            first_refusal = first_refusal.min(refused.unwrap_or(f64::MAX));
            last_grant = last_grant.max(granted.unwrap_or(0.0));
        }
        let token = &status["by_provider"]["token"];
        let revoked = token["revoked"].as_u64().unwrap_or(0);
        let stats: Value = http
            .get(format!("{base}/v1/stats"))
            .bearer_auth(&responder)
            .send()
            .await?
            .json()
            .await?;
        let still_active = stats["leases"]["token"]["active"]
            .as_u64()
            .unwrap_or(u64::MAX);
        server.stop()?;
        if revoked < leases as u64 || still_active != 0 {
            bail!(
                "job revoked {revoked} of at least {leases}; {still_active} leases still active: {status}"
            );
        }
        // the precise end: the last lease's own ended_at, against the call
        let cfg = leasehold::config::Config::load(&config)?;
        let key = StoreKey::from_file(cfg.store.key_file.as_ref().context("key_file")?)?;
        let store = Store::open(&StoreOptions::new(&cfg.store.path), &key)?;
        let created = store
            .read()?
            .job(leasehold::ids::JobId::from_str(&job)?.0)?
            .context("job")?
            .created_at;
        let mut q = LeaseQuery {
            limit: 1000,
            scan_budget: 10_000_000,
            state: Some(LeaseState::Revoked),
            ..Default::default()
        };
        let reader = store.read()?;
        let mut last_end = 0i64;
        loop {
            let (page, next) = reader.list_leases(&q)?;
            for l in &page {
                last_end = last_end.max(l.ended_at.unwrap_or(0));
            }
            match next {
                Some(c) => q.after = Some(c),
                None => break,
            }
        }
        drop(reader);
        drop(store);
        // job created_at is stamped when the call is handled; add the time
        // from sending the call to its handling (bounded by the answer time)
        let total = (last_end - created) as f64 / 1000.0 + answered / 1000.0;
        let fence_gap = last_grant - called;
        println!(
            "  round {}: {revoked} leases revoked; last one {:.2} s after the call (job seen done by polling at {observed:.2} s); \
             call answered (fence in force) in {answered:.1} ms; last lease granted to the fenced workload was asked {fence_gap:.1} ms \
             after the call started, first refusal {:.1} ms after",
            r + 1,
            total,
            first_refusal - called
        );
        totals.push(total);
        posts.push(answered);
        refusals.push(first_refusal - called);
    }
    println!(
        "revoke: {leases} active leases revoked by one job in median {:.2} s (call to last lease revoked; max {:.2} s); \
         fence in force in median {:.1} ms (call answered; max {:.1} ms); first refusal of the fenced workload median {:.1} ms after the call",
        median(&mut totals.clone()),
        totals.iter().cloned().fold(0.0, f64::max),
        median(&mut posts.clone()),
        posts.iter().cloned().fold(0.0, f64::max),
        median(&mut refusals)
    );
    Ok(())
}

/// A policy folder shaped like a real deployment: `groups` groups of
/// workloads, tool sets with tools of several risks, permits per group and
/// tool set (some needing approval, some capped), forbids on context.
fn realistic_policies(dir: &Path, workloads: usize, policies: usize) -> anyhow::Result<()> {
    let schema = include_str!("../../../config/policies/leasehold.cedarschema");
    std::fs::write(dir.join("leasehold.cedarschema"), schema)?;
    let groups = 20;
    let toolsets = 10;
    let mut ents = vec![
        json!({"uid": {"type": "Leasehold::Tenant", "id": "acme"}, "attrs": {}, "parents": []}),
    ];
    for g in 0..groups {
        ents.push(
            json!({"uid": {"type": "Leasehold::Group", "id": format!("team-{g}")}, "attrs": {},
            "parents": [{"type": "Leasehold::Tenant", "id": "acme"}]}),
        );
    }
    for w in 0..workloads {
        ents.push(json!({"uid": {"type": "Leasehold::Workload", "id": format!("dev:agent-{w}")}, "attrs": {},
            "parents": [{"type": "Leasehold::Group", "id": format!("team-{}", w % groups)},
                        {"type": "Leasehold::Group", "id": format!("team-{}", (w * 7 + 3) % groups)}]}));
    }
    for t in 0..toolsets {
        ents.push(json!({"uid": {"type": "Leasehold::ToolSet", "id": format!("set-{t}")}, "attrs": {}, "parents": []}));
        for k in 0..5 {
            ents.push(json!({"uid": {"type": "Leasehold::Tool", "id": format!("tool-{t}-{k}")}, "attrs": {"risk": k * 2},
                "parents": [{"type": "Leasehold::ToolSet", "id": format!("set-{t}")}]}));
        }
    }
    std::fs::write(dir.join("entities.json"), serde_json::to_string(&ents)?)?;
    let mut text = String::new();
    text.push_str("permit (principal in Leasehold::Tenant::\"acme\", action == Leasehold::Action::\"OpenTask\", resource);\n");
    text.push_str("permit (principal in Leasehold::Tenant::\"acme\", action == Leasehold::Action::\"Lease\", resource) when { resource.provider == \"token\" && context.requested_ttl <= 3600 };\n");
    text.push_str("forbid (principal, action == Leasehold::Action::\"Lease\", resource) when { context.task.active_leases >= 50 };\n");
    let mut n = 3;
    while n < policies {
        let g = n % groups;
        let t = n % toolsets;
        let text_n = match n % 5 {
            0 => format!(
                "@approval(\"required\")\npermit (principal in Leasehold::Group::\"team-{g}\", action == Leasehold::Action::\"Call\", resource in Leasehold::ToolSet::\"set-{t}\") when {{ context.risk >= 8 }};\n"
            ),
            1 => format!(
                "@max_ttl(\"300\")\npermit (principal in Leasehold::Group::\"team-{g}\", action == Leasehold::Action::\"Call\", resource in Leasehold::ToolSet::\"set-{t}\") when {{ context.risk < 8 }};\n"
            ),
            2 => format!(
                "forbid (principal in Leasehold::Group::\"team-{g}\", action == Leasehold::Action::\"Call\", resource in Leasehold::ToolSet::\"set-{t}\") when {{ context.time.hour < 6 && context.risk >= 6 }};\n"
            ),
            3 => format!(
                "permit (principal in Leasehold::Group::\"team-{g}\", action == Leasehold::Action::\"Call\", resource in Leasehold::ToolSet::\"set-{t}\") when {{ context.task.declared_tools.contains(\"tool-{t}-0\") && context.target like \"ticket:*\" }};\n"
            ),
            _ => format!(
                "forbid (principal, action == Leasehold::Action::\"Call\", resource in Leasehold::ToolSet::\"set-{t}\") when {{ context.task.user == \"blocked-{n}@example.com\" }};\n"
            ),
        };
        text.push_str(&text_n);
        n += 1;
    }
    std::fs::write(dir.join("realistic.cedar"), text)?;
    Ok(())
}

fn policy_latency(workloads: usize, policies: usize, decisions: usize) -> anyhow::Result<()> {
    use leasehold::policy::*;
    let dir = tempfile::tempdir()?;
    realistic_policies(dir.path(), workloads, policies)?;
    let roles = vec![RoleEntity {
        provider: "token".into(),
        role: "demo".into(),
        max_ttl: 900,
    }];
    let engine = PolicyEngine::load(dir.path(), roles).map_err(|e| anyhow::anyhow!("{e}"))?;
    let loaded = engine.current();
    let mut lat = Vec::with_capacity(decisions);
    let mut outcomes = [0usize; 3];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..decisions {
        let w = next() as usize % workloads;
        let t = next() as usize % 10;
        let k = next() as usize % 5;
        let tool = format!("tool-{t}-{k}");
        let who = Principal {
            id: format!("dev:agent-{w}"),
            issuer: "dev".into(),
            tenant: "acme".into(),
            attributes: Default::default(),
        };
        let task = TaskFacts {
            id: "task_x".into(),
            purpose: "bench".into(),
            declared_tools: vec![tool.clone(), format!("tool-{t}-0")],
            prompt_sha256: "00".repeat(32),
            user: format!("user-{}@example.com", i % 97),
            active_leases: (i % 10) as u64,
            lease_count: (i % 10) as u64,
            remaining_seconds: 600,
        };
        let call = CallFacts {
            tool,
            action: "run".into(),
            target: if i % 2 == 0 {
                "ticket:1".into()
            } else {
                "doc:2".into()
            },
            arguments_sha256: String::new(),
            break_glass: None,
            credential: (i % 3 == 0).then(|| LeaseFacts {
                provider: "token".into(),
                role: "demo".into(),
                scope: vec![],
                requested_ttl: 300,
                binding: None,
            }),
        };
        let now = Now {
            unix: 1_800_000_000 + (i as i64) * 37,
        };
        let t0 = Instant::now();
        let d = engine.call(&who, &task, &call, 3, now);
        lat.push(t0.elapsed().as_secs_f64() * 1e6);
        outcomes[match d.outcome {
            Outcome::Allow => 0,
            Outcome::Deny => 1,
            Outcome::ApprovalRequired => 2,
        }] += 1;
    }
    println!(
        "decision latency: {} policies, {workloads} workloads as entities, {decisions} decisions \
         (allow {}, deny {}, approval {}): p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        loaded.policy_count,
        outcomes[0],
        outcomes[1],
        outcomes[2],
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.99),
        lat.iter().cloned().fold(0.0, f64::max),
    );
    Ok(())
}

/// Calls with leases over HTTP: each client opens a task, makes
/// `per_task` calls each asking for a token, completes the task.
async fn calls_throughput(
    bin: &Path,
    clients: usize,
    per_task: usize,
    rounds: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    let dir = bench_dir()?;
    let addr = free_addr()?;
    let (config, creds) = setup(dir.path(), addr, false)?;
    let mut server = Server::spawn(bin, &config, &dir.path().join("broker.log"))?;
    let base = format!("http://{addr}");
    let http = client(4)?;
    wait_ready(&http, &base, &mut server).await?;
    let tokens = [
        creds.identities["assistant-a"].token.clone(),
        creds.identities["assistant-b"].token.clone(),
    ];
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // each client keeps the latency (ms) of the calls it started while the
    // rounds measured, so warm-up and wind-down stay out of the percentiles
    let measuring = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (token, done, stop) = (tokens[i % 2].clone(), done.clone(), stop.clone());
        let measuring = measuring.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut conn = Conn::open(addr).await?;
            let open = r#"{"purpose":"bench","on_behalf_of":"alice@example.com","prompt_sha256":"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824","tools":["demo.read"],"ttl_seconds":600}"#;
            let call = r#"{"tool":"demo.read","action":"read","resource":"doc:1","credential":{"provider":"token","role":"demo","ttl_seconds":60}}"#;
            while !stop.load(Ordering::Relaxed) {
                let (st, body) = conn.post("/v1/tasks", &token, Some(open)).await?;
                if st != 201 {
                    bail!("open task: HTTP {st}: {}", String::from_utf8_lossy(&body));
                }
                let task: Value = serde_json::from_slice(&body)?;
                let id = task["task_id"].as_str().unwrap_or_default().to_owned();
                for _ in 0..per_task {
                    let (t0, counted) = (Instant::now(), measuring.load(Ordering::Relaxed));
                    let (st, body) = conn.post(&format!("/v1/tasks/{id}/calls"), &token, Some(call)).await?;
                    let v: Value = serde_json::from_slice(&body)?;
                    if st != 200 || v["lease"]["credential"]["token"].as_str().is_none() {
                        bail!("call: HTTP {st}: {v}");
                    }
                    if counted {
                        mine.push(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                conn.post(&format!("/v1/tasks/{id}/complete"), &token, None).await?;
            }
            anyhow::Ok(mine)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut rates, mut server_cpu) = (Vec::new(), Vec::new());
    measuring.store(true, Ordering::Relaxed);
    for r in 0..rounds {
        let (rate, s_us, c_us, _) =
            measure_round(std::slice::from_ref(&server), &done, seconds).await;
        println!(
            "  round {}: {rate:.0} decisions with leases/s; CPU per call: broker {s_us:.0} us, load generator {c_us:.0} us",
            r + 1
        );
        rates.push(rate);
        server_cpu.push(s_us);
    }
    measuring.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    server.stop()?;
    println!(
        "calls: median {:.0} decisions with leases/s over {rounds} rounds of {seconds} s, {clients} clients, {per_task} calls per task \
         (each call: a Cedar decision, the call record, a token lease, their events; durable); broker CPU {:.0} us per call (median); \
         call latency p50 {:.1} ms, p99 {:.1} ms; {} calls in all, warm-up included",
        median(&mut rates),
        median(&mut server_cpu),
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.99),
        done.load(Ordering::Relaxed),
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bin = leasehold_bin(&cli)?;
    match cli.command {
        Cmd::Throughput {
            clients,
            leases_per_task,
            seconds,
            rounds,
        } => throughput(&bin, clients, leases_per_task, seconds, rounds).await,
        Cmd::Restart { leases, rounds } => restart(&bin, leases, rounds).await,
        Cmd::Expiry { leases, rounds } => expiry(&bin, leases, rounds).await,
        Cmd::Revoke { leases, rounds } => mass_revoke(&bin, leases, rounds).await,
        Cmd::Vault { samples } => vault(&bin, samples).await,
        Cmd::Postgres {
            leases,
            clients,
            role,
            sessions,
            scram_iterations,
            rounds,
        } => {
            postgres(
                &bin,
                leases,
                clients,
                &role,
                sessions,
                scram_iterations,
                rounds,
            )
            .await
        }
        Cmd::Bytes { leases, clients } => bytes::bytes(&bin, leases, clients).await,
        Cmd::Soak {
            minutes,
            clients,
            rate,
            calibrate_seconds,
            minute_seconds,
            retention_seconds,
        } => {
            soak::soak(
                &bin,
                minutes,
                clients,
                rate,
                calibrate_seconds,
                minute_seconds,
                retention_seconds,
            )
            .await
        }
        Cmd::Proxy {
            requests,
            clients,
            seconds,
            rounds,
        } => proxy::proxy(&bin, requests, clients, seconds, rounds).await,
        Cmd::Mysql {
            samples,
            leases,
            clients,
            sessions,
        } => mysql::mysql(&bin, samples, leases, clients, sessions).await,
        Cmd::Events {
            noop,
            rounds,
            seconds,
            events,
        } => events_bench(&bin, noop.as_deref(), rounds, seconds, events).await,
        Cmd::Policy {
            workloads,
            policies,
            decisions,
            calls_per_task,
            clients,
            rounds,
            seconds,
        } => {
            policy_latency(workloads, policies, decisions)?;
            calls_throughput(&bin, clients, calls_per_task, rounds, seconds).await
        }
        Cmd::Ha {
            clients,
            seconds,
            rounds,
            failovers,
        } => ha(&bin, clients, seconds, rounds, failovers).await,
        Cmd::Disk => disk(),
        Cmd::All => {
            throughput(&bin, 64, 1, 10, 5).await?;
            throughput(&bin, 64, 4, 10, 5).await?;
            expiry(&bin, 100_000, 3).await?;
            restart(&bin, 1_000_000, 5).await
        }
    }
}
