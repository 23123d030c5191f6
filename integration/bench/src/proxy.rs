//! `leasehold-bench proxy`: what `leasehold proxy` adds to a request.
//!
//! A real `leasehold serve` (durable commits), the real `leasehold proxy`
//! in front of it, and a minimal upstream in this process (a fixed 200 on
//! keep-alive connections, so it costs next to nothing). The assistant's
//! task holds a warm lease: every request through the proxy is still a
//! broker call, decided by policy and recorded on the chain (reusing the
//! lease), then forwarded with the credential injected.
//!
//! 1. Latency: `requests` sequential requests directly to the upstream,
//!    then as many through the proxy (the order alternates by round); the
//!    added latency is the difference of the medians (and of the p99s).
//! 2. Throughput: `clients` keep-alive connections through the proxy for
//!    `seconds`, per round; the CPU the broker and the proxy spent per
//!    request.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{
    Conn, Server, bench_dir, client, cpu_seconds_of, free_addr, median, percentile, post, setup,
    wait_ready,
};

/// A fixed answer on every request, keep-alive; on a thread and runtime of
/// its own, so the load generator's scheduling does not add to either path.
fn upstream() -> anyhow::Result<std::net::SocketAddr> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async move {
        let Ok(l) = tokio::net::TcpListener::from_std(std_listener) else {
            return;
        };
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
                let mut s = tokio::io::BufStream::new(s);
                let mut line = String::new();
                loop {
                    // a GET: the head only
                    let mut any = false;
                    loop {
                        line.clear();
                        match s.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if line == "\r\n" && any {
                            break;
                        }
                        any = true;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
                    if s.write_all(ok).await.is_err() || s.flush().await.is_err() {
                        return;
                    }
                }
            });
        }
    })
    });
    Ok(addr)
}

struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn sample(conn: &mut Conn, head: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (status, body) = conn.send(head, b"").await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if status != 200 {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
    }
    Ok(ms)
}

pub async fn proxy(
    bin: &Path,
    requests: usize,
    clients: usize,
    seconds: u64,
    rounds: usize,
) -> anyhow::Result<()> {
    let dir = bench_dir()?;
    let addr = free_addr()?;
    let (config, creds) = setup(dir.path(), addr, false)?;
    let mut broker = Server::spawn(bin, &config, &dir.path().join("broker.log"))?;
    let http = client(4)?;
    let base = format!("http://{addr}");
    wait_ready(&http, &base, &mut broker).await?;
    let up = upstream()?;

    // the proxy, as an operator would run it
    let token = dir.path().join("proxy.token");
    std::fs::write(&token, &creds.identities["proxy"].token)?;
    let paddr = free_addr()?;
    let pconf = dir.path().join("proxy.toml");
    std::fs::write(
        &pconf,
        format!(
            "listen = \"{paddr}\"\nca_dir = \"{}\"\n[broker]\nurl = \"{base}\"\ntoken_file = \"{}\"\n\n\
             [[route]]\nname = \"api\"\ndestination = \"http://127.0.0.1:{}/v1/\"\naddresses = [\"127.0.0.1/32\"]\ntool = \"demo.read\"\n\
             [route.credential]\nprovider = \"token\"\nrole = \"demo\"\nttl_seconds = 900\n[route.inject]\nkind = \"bearer\"\n",
            dir.path().join("proxy-ca").display(),
            token.display(),
            up.port()
        ),
    )?;
    let plog = dir.path().join("proxy.log");
    let proxy = Proc(
        Command::new(bin)
            .args(["proxy", "--config"])
            .arg(&pconf)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&plog)?)
            .spawn()
            .context("starting leasehold proxy")?,
    );
    let started = Instant::now();
    while tokio::net::TcpStream::connect(paddr).await.is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "leasehold proxy did not listen: {}",
                std::fs::read_to_string(&plog).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // the assistant's task (long enough for every round) and its credential
    let a = &creds.identities["assistant-a"].token;
    let task = post(
        &http,
        format!("{base}/v1/tasks"),
        a,
        Some(
            json!({"purpose": "bench", "on_behalf_of": "alice@example.com",
                    "prompt": "proxy", "tools": ["demo.read"], "ttl_seconds": 3600}),
        ),
    )
    .await?;
    let task = task["task_id"].as_str().context("task_id")?.to_owned();
    let pc: Value = post(
        &http,
        format!("{base}/v1/tasks/{task}/proxy-credentials"),
        a,
        Some(json!({})),
    )
    .await?;
    let cred = pc["proxy_credential"]
        .as_str()
        .context("proxy_credential")?
        .to_owned();
    let direct_head = format!("GET /v1/ok HTTP/1.1\r\nhost: {up}\r\n\r\n");
    let proxied_head = format!(
        "GET http://{up}/v1/ok HTTP/1.1\r\nhost: {up}\r\nproxy-authorization: Bearer {cred}\r\n\r\n"
    );

    // 1. latency with a warm lease, measured from a thread and runtime of
    // its own (as one assistant process would be)
    let (dh, ph) = (direct_head.clone(), proxied_head.clone());
    let latency = std::thread::spawn(move || -> anyhow::Result<Rounds> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(latency_rounds(up, paddr, dh, ph, requests, rounds))
    });
    let (mut d50, mut d99, mut p50, mut p99, mut add50, mut add99) = latency
        .join()
        .map_err(|_| anyhow::anyhow!("the latency thread panicked"))??;
    println!(
        "proxy latency, warm lease, one client, {rounds} rounds of {requests} requests each way: \
         added median {:.3} ms (p99 {:.3} ms); direct p50 {:.3} ms p99 {:.3} ms, through the proxy p50 {:.3} ms p99 {:.3} ms (medians over rounds)",
        median(&mut add50),
        median(&mut add99),
        median(&mut d50),
        median(&mut d99),
        median(&mut p50),
        median(&mut p99),
    );

    // what of that is the broker's decision: the same call the proxy
    // makes (lease reused), sent to the broker directly
    let detail: Value = serde_json::from_str(
        &http
            .get(format!("{base}/v1/tasks/{task}"))
            .bearer_auth(a)
            .send()
            .await?
            .text()
            .await?,
    )?;
    let lease = detail["leases"][0]["lease_id"]
        .as_str()
        .context("the proxy's lease")?
        .to_owned();
    let call = json!({"proxy_credential": cred, "tool": "demo.read", "action": "GET",
        "resource": format!("127.0.0.1/v1/ok"), "reuse_lease": lease,
        "credential": {"provider": "token", "role": "demo", "ttl_seconds": 900}})
    .to_string();
    let ptoken = &creds.identities["proxy"].token;
    let ptoken = ptoken.clone();
    let admin = &creds.identities["admin"].token;
    let before = store_stats(&http, &base, admin).await?;
    let read = (a.clone(), format!("/v1/leases/{lease}"));
    let (mut decide, mut health, mut reads) = std::thread::spawn(move || -> anyhow::Result<_> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(broker_rounds(addr, ptoken, call, read, requests, rounds))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the latency thread panicked"))??;
    let broker_ms = median(&mut decide);
    println!(
        "  the broker alone, same connection, p50: GET /v1/health {:.3} ms (HTTP only); GET /v1/leases/{{id}} {:.3} ms (authentication and a read); the call {broker_ms:.3} ms",
        median(&mut health),
        median(&mut reads),
    );
    let after = store_stats(&http, &base, admin).await?;
    let d = |k: &str| after[k].as_f64().unwrap_or(0.0) - before[k].as_f64().unwrap_or(0.0);
    let commits = d("commits").max(1.0);
    println!(
        "  the store's writer in that phase, per commit: {:.2} operations; apply {:.0} us, commit {:.0} us, of which the log's append and sync {:.0} us",
        d("operations") / commits,
        d("apply_seconds") * 1e6 / commits,
        d("commit_seconds") * 1e6 / commits,
        d("wal_seconds") * 1e6 / commits,
    );
    println!(
        "  of which the broker's decision (POST /v1/proxy/calls, lease reused, durable), sent directly: p50 {broker_ms:.3} ms; \
         the proxy's own part: {:.3} ms",
        median(&mut add50.clone()) - broker_ms
    );

    // 2. throughput with `clients` connections through the proxy
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (done, failed, stop, head) = (
            done.clone(),
            failed.clone(),
            stop.clone(),
            proxied_head.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let Ok(mut c) = Conn::open(paddr).await else {
                failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            while !stop.load(Ordering::Relaxed) {
                match c.send(&head, b"").await {
                    Ok((200, _)) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }));
    }
    let proxy_cpu = format!("/proc/{}/stat", proxy.0.id());
    let (mut rates, mut broker_us, mut proxy_us) = (vec![], vec![], vec![]);
    tokio::time::sleep(Duration::from_secs(1)).await; // warm-up
    for r in 0..rounds {
        let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
        let (b0, x0) = (broker.cpu_seconds(), cpu_seconds_of(&proxy_cpu));
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let n = (done.load(Ordering::Relaxed) - n0) as f64;
        let rate = n / t0.elapsed().as_secs_f64();
        let b = (broker.cpu_seconds() - b0) * 1e6 / n.max(1.0);
        let x = (cpu_seconds_of(&proxy_cpu) - x0) * 1e6 / n.max(1.0);
        println!(
            "  round {}: {rate:.0} requests/s; broker CPU {b:.0} us, proxy CPU {x:.0} us per request",
            r + 1
        );
        rates.push(rate);
        broker_us.push(b);
        proxy_us.push(x);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!(
            "{failed} clients failed; proxy log: {}",
            std::fs::read_to_string(&plog).unwrap_or_default()
        );
    }
    println!(
        "proxy throughput: median {:.0} requests/s through one proxy, {clients} clients, {rounds} rounds of {seconds} s \
         (each a broker call recorded on the chain, lease reused); CPU per request: broker {:.0} us, proxy {:.0} us (medians)",
        median(&mut rates),
        median(&mut broker_us),
        median(&mut proxy_us),
    );
    // the task still stands: nothing was refused along the way
    let s = http
        .get(format!("{base}/v1/tasks/{task}"))
        .bearer_auth(a)
        .send()
        .await?
        .status();
    if !s.is_success() {
        bail!("the task is gone: {s}");
    }
    drop(proxy);
    broker.stop()?;
    Ok(())
}

type Rounds = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

/// Per round: direct p50, p99; proxied p50, p99; added p50, p99 (ms).
async fn latency_rounds(
    up: std::net::SocketAddr,
    paddr: std::net::SocketAddr,
    direct_head: String,
    proxied_head: String,
    requests: usize,
    rounds: usize,
) -> anyhow::Result<Rounds> {
    let mut direct = Conn::open(up).await?;
    let mut proxied = Conn::open(paddr).await?;
    sample(&mut proxied, &proxied_head, 50).await?; // the lease, and warm connections
    sample(&mut direct, &direct_head, 50).await?;
    let (mut d50, mut d99, mut p50, mut p99, mut add50, mut add99) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        let (mut d, mut p) = if r % 2 == 0 {
            let d = sample(&mut direct, &direct_head, requests).await?;
            (d, sample(&mut proxied, &proxied_head, requests).await?)
        } else {
            let p = sample(&mut proxied, &proxied_head, requests).await?;
            (sample(&mut direct, &direct_head, requests).await?, p)
        };
        let (a, b) = (percentile(&mut d, 0.5), percentile(&mut d, 0.99));
        let (c, e) = (percentile(&mut p, 0.5), percentile(&mut p, 0.99));
        println!(
            "  round {}: direct p50 {a:.3} ms p99 {b:.3} ms; through the proxy p50 {c:.3} ms p99 {e:.3} ms",
            r + 1
        );
        d50.push(a);
        d99.push(b);
        p50.push(c);
        p99.push(e);
        add50.push(c - a);
        add99.push(e - b);
    }
    Ok((d50, d99, p50, p99, add50, add99))
}

/// Per round, the p50 (ms) of the proxy's broker call sent directly, and
/// for comparison of `GET /v1/health` and of a read of the lease (`read`:
/// the workload's token and the path).
async fn broker_rounds(
    addr: std::net::SocketAddr,
    token: String,
    call: String,
    read: (String, String),
    requests: usize,
    rounds: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let mut b = Conn::open(addr).await?;
    let host = addr.to_string();
    let health = format!("GET /v1/health HTTP/1.1\r\nhost: {host}\r\n\r\n");
    let lease = format!(
        "GET {} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {}\r\n\r\n",
        read.1, read.0
    );
    let (mut calls, mut healths, mut reads) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (mut c, mut h, mut r) = (
            Vec::with_capacity(requests),
            Vec::with_capacity(requests),
            Vec::with_capacity(requests),
        );
        for _ in 0..requests {
            let t = Instant::now();
            let (status, body) = b.post("/v1/proxy/calls", &token, Some(&call)).await?;
            c.push(t.elapsed().as_secs_f64() * 1000.0);
            if status != 200 {
                bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
            }
            for (head, into) in [(&health, &mut h), (&lease, &mut r)] {
                let t = Instant::now();
                let (status, body) = b.send(head, b"").await?;
                into.push(t.elapsed().as_secs_f64() * 1000.0);
                if status != 200 {
                    bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
                }
            }
        }
        calls.push(percentile(&mut c, 0.5));
        healths.push(percentile(&mut h, 0.5));
        reads.push(percentile(&mut r, 0.5));
    }
    Ok((calls, healths, reads))
}

/// The store's writer counters (`GET /v1/stats`, `store`).
async fn store_stats(http: &reqwest::Client, base: &str, admin: &str) -> anyhow::Result<Value> {
    let v: Value = http
        .get(format!("{base}/v1/stats"))
        .bearer_auth(admin)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v["store"].clone())
}
