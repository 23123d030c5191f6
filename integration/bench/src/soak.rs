//! `leasehold-bench soak`: the throughput load at half of its peak for
//! `minutes`, sampling every minute what an operator would watch: request
//! latency (p50, p99), the broker's RSS, the store file and its log, the
//! revocation queue, errors.
//!
//! The load is issue 32's: clients each open a task, then lease 30-second
//! tokens in it (a new task every 100 leases) without completing, so the
//! reaper expires every lease as fast as they are issued. The peak is
//! measured first (`calibrate_seconds` unthrottled); `--rate` sets the
//! target instead.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;

use crate::{Conn, Server, bench_dir, client, free_addr, percentile, setup, wait_ready};

/// One client's requests, tallied per minute by the sampler.
#[derive(Default)]
struct Tally {
    latencies_ms: std::sync::Mutex<Vec<f64>>,
    errors: AtomicU64,
    done: AtomicU64,
}

async fn client_loop(
    addr: std::net::SocketAddr,
    token: String,
    per_second: Option<f64>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut conn = Conn::open(addr).await?;
    let open = r#"{"purpose":"soak","on_behalf_of":"alice@example.com","prompt_sha256":"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824","tools":["demo.read"],"ttl_seconds":120}"#;
    let lease_body = r#"{"provider":"token","role":"demo","ttl_seconds":30}"#;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut task = String::new();
    let mut in_task = 100;
    while !stop.load(Ordering::Relaxed) {
        if let Some(r) = per_second {
            // paced: the n-th request not before n / rate seconds
            let due = Duration::from_secs_f64(sent as f64 / r);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        sent += 1;
        if in_task >= 100 {
            let (st, body) = conn.post("/v1/tasks", &token, Some(open)).await?;
            if st != 201 {
                tally.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let v: Value = serde_json::from_slice(&body)?;
            task = v["task_id"].as_str().unwrap_or_default().to_owned();
            in_task = 0;
        }
        let t0 = Instant::now();
        let (st, body) = conn
            .post(
                &format!("/v1/tasks/{task}/leases"),
                &token,
                Some(lease_body),
            )
            .await?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        in_task += 1;
        if st == 201 {
            tally.done.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut l) = tally.latencies_ms.lock() {
                l.push(ms);
            }
        } else {
            if tally.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!(
                    "soak: first refused lease: HTTP {st}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            if st == 409 || st == 429 {
                in_task = 100; // an ended or full task: open another
            }
        }
    }
    Ok(())
}

type Clients = (
    Arc<Tally>,
    Arc<AtomicBool>,
    Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
);

/// `clients` loops (the two dev assistants in turn), each at `per_second`
/// or unthrottled, sharing one tally and one stop flag.
fn spawn_clients(
    addr: std::net::SocketAddr,
    tokens: &[String; 2],
    clients: usize,
    per_second: Option<f64>,
) -> Clients {
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = (0..clients)
        .map(|i| {
            tokio::spawn(client_loop(
                addr,
                tokens[i % 2].clone(),
                per_second,
                tally.clone(),
                stop.clone(),
            ))
        })
        .collect();
    (tally, stop, tasks)
}

fn file_mib(p: &Path) -> f64 {
    std::fs::metadata(p).map_or(0.0, |m| m.len() as f64 / (1 << 20) as f64)
}

/// The sum of a metric's series in a Prometheus exposition.
fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The bytes of the files in a folder (the archives).
fn dir_mib(p: &Path) -> f64 {
    std::fs::read_dir(p).map_or(0.0, |d| {
        d.filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len() as f64)
            .sum::<f64>()
            / (1 << 20) as f64
    })
}

pub async fn soak(
    bin: &Path,
    minutes: u64,
    clients: usize,
    rate: Option<f64>,
    calibrate_seconds: u64,
    minute_seconds: u64,
    retention_seconds: u64,
) -> anyhow::Result<()> {
    let dir = bench_dir()?;
    let addr = free_addr()?;
    // caps raised: 30 s leases at this rate are tens of thousands live
    let (config, creds) = setup(dir.path(), addr, true)?;
    // retention set short: ended tasks (their 120 s deadline passed) and
    // events leave `retention_seconds` later, every 10 s
    let mut c = leasehold::config::Config::load(&config)?;
    c.retention.keep_ended_seconds = retention_seconds;
    c.retention.interval_seconds = 10.min(retention_seconds);
    c.audit.prune_min_age_seconds = retention_seconds;
    std::fs::write(&config, c.to_toml()?)?;
    let archive = c
        .audit
        .archive_dir
        .clone()
        .unwrap_or_else(|| dir.path().join("archive"));
    let mut broker = Server::spawn(bin, &config, &dir.path().join("broker.log"))?;
    let http = client(4)?;
    let base = format!("http://{addr}");
    wait_ready(&http, &base, &mut broker).await?;
    let tokens = [
        creds.identities["assistant-a"].token.clone(),
        creds.identities["assistant-b"].token.clone(),
    ];
    let admin = creds.identities["admin"].token.clone();

    // the peak, unthrottled, on a store of its own state (it stays: the
    // soak starts from where calibration left it)
    let target = match rate {
        Some(r) => r,
        None => {
            let (tally, stop, tasks) = spawn_clients(addr, &tokens, clients, None);
            tokio::time::sleep(Duration::from_secs(calibrate_seconds)).await;
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                t.await??;
            }
            let peak = tally.done.load(Ordering::Relaxed) as f64 / calibrate_seconds.max(1) as f64;
            println!(
                "soak: peak {peak:.0} leases/s ({clients} clients, {calibrate_seconds} s unthrottled); soaking at half"
            );
            peak / 2.0
        }
    };
    let (tally, stop, tasks) = spawn_clients(addr, &tokens, clients, Some(target / clients as f64));
    let store = dir.path().join("leasehold.redb");
    let wal = dir.path().join("leasehold.redb-wal");
    println!(
        "soak: {minutes} minute(s) at {target:.0} leases/s (30 s tokens, expired by the reaper; \
         tasks end after 120 s, retention {retention_seconds} s); one row a minute\n\
         {:>6} {:>9} {:>8} {:>8} {:>8} {:>10} {:>9} {:>9} {:>11} {:>7} {:>7}",
        "minute",
        "leases/s",
        "p50 ms",
        "p99 ms",
        "RSS MiB",
        "store MiB",
        "log MiB",
        "leases",
        "archive MiB",
        "queue",
        "errors"
    );
    let mut rows: Vec<(f64, f64, f64)> = Vec::new(); // p99, rss, store
    let mut last_done = 0;
    let mut last_errors = 0;
    for m in 1..=minutes {
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(minute_seconds)).await;
        let mut lat = std::mem::take(
            &mut *tally
                .latencies_ms
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?,
        );
        let done = tally.done.load(Ordering::Relaxed);
        let errors = tally.errors.load(Ordering::Relaxed);
        let metrics = http
            .get(format!("{base}/metrics"))
            .bearer_auth(&admin)
            .send()
            .await?
            .text()
            .await?;
        let (rss, _) = broker.rss_kib();
        let rate = (done - last_done) as f64 / t0.elapsed().as_secs_f64();
        let (p50, p99) = (percentile(&mut lat, 0.5), percentile(&mut lat, 0.99));
        let rss = rss as f64 / 1024.0;
        println!(
            "{m:>6} {rate:>9.0} {p50:>8.2} {p99:>8.2} {rss:>8.0} {:>10.1} {:>9.1} {:>9.0} {:>11.1} {:>7.0} {:>7}",
            file_mib(&store),
            file_mib(&wal),
            metric_sum(&metrics, "leasehold_leases"),
            dir_mib(&archive),
            metric_sum(&metrics, "leasehold_revocation_queue_depth"),
            errors - last_errors
        );
        rows.push((p99, rss, file_mib(&store)));
        last_done = done;
        last_errors = errors;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        let second = rows.get(1).unwrap_or(first);
        println!(
            "soak: p99 last minute / first {:.2} (target <= 1.25); RSS growth after the first minute {:+.1}% (target < 10%); \
             store {:.1} -> {:.1} MiB; errors {}",
            last.0 / first.0,
            (last.1 / second.1 - 1.0) * 100.0,
            first.2,
            last.2,
            tally.errors.load(Ordering::Relaxed)
        );
    }
    broker.stop()?;
    if tally.done.load(Ordering::Relaxed) == 0 {
        bail!("no lease was issued");
    }
    Ok(())
}
