//! `leasehold-bench bytes`: what one ended lease costs on disk. Clients
//! lease 30-second tokens, 100 to a task, and complete each task (its
//! leases revoked with it); the broker stops (a clean stop checkpoints)
//! and every table of its store is measured: entries, key and value bytes
//! per lease, then redb's pages and the file.

use std::path::Path;

use anyhow::bail;
use serde_json::Value;

use crate::{Conn, Server, bench_dir, client, free_addr, setup, wait_ready};

const PER_TASK: usize = 100;

async fn lease_tasks(
    addr: std::net::SocketAddr,
    token: String,
    tasks: usize,
) -> anyhow::Result<()> {
    let mut conn = Conn::open(addr).await?;
    let open = r#"{"purpose":"bytes","on_behalf_of":"alice@example.com","prompt_sha256":"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824","tools":["demo.read"],"ttl_seconds":600}"#;
    let lease = r#"{"provider":"token","role":"demo","ttl_seconds":30}"#;
    for _ in 0..tasks {
        let (st, body) = conn.post("/v1/tasks", &token, Some(open)).await?;
        if st != 201 {
            bail!(
                "opening a task: HTTP {st}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let v: Value = serde_json::from_slice(&body)?;
        let task = v["task_id"].as_str().unwrap_or_default().to_owned();
        for _ in 0..PER_TASK {
            let (st, body) = conn
                .post(&format!("/v1/tasks/{task}/leases"), &token, Some(lease))
                .await?;
            if st != 201 {
                bail!("leasing: HTTP {st}: {}", String::from_utf8_lossy(&body));
            }
        }
        let (st, body) = conn
            .post(&format!("/v1/tasks/{task}/complete"), &token, None)
            .await?;
        if st != 200 {
            bail!("completing: HTTP {st}: {}", String::from_utf8_lossy(&body));
        }
    }
    Ok(())
}

pub async fn bytes(bin: &Path, leases: usize, clients: usize) -> anyhow::Result<()> {
    let dir = bench_dir()?;
    let addr = free_addr()?;
    let (config, creds) = setup(dir.path(), addr, true)?;
    // nothing may leave while it is measured
    let mut c = leasehold::config::Config::load(&config)?;
    c.retention.enabled = false;
    std::fs::write(&config, c.to_toml()?)?;
    let mut broker = Server::spawn(bin, &config, &dir.path().join("broker.log"))?;
    wait_ready(&client(1)?, &format!("http://{addr}"), &mut broker).await?;
    let tasks = leases.div_ceil(PER_TASK);
    let tokens = [
        creds.identities["assistant-a"].token.clone(),
        creds.identities["assistant-b"].token.clone(),
    ];
    let mut jobs = Vec::new();
    for i in 0..clients {
        let share = tasks / clients + usize::from(i < tasks % clients);
        jobs.push(tokio::spawn(lease_tasks(
            addr,
            tokens[i % 2].clone(),
            share,
        )));
    }
    for j in jobs {
        j.await??;
    }
    broker.stop()?;
    let leased = (tasks * PER_TASK) as f64;
    let f = leasehold::store::footprint(&dir.path().join("leasehold.redb"))?;
    println!(
        "bytes: {} ended leases ({PER_TASK} to a task, each task completed); per lease:\n{:<18} {:>10} {:>10} {:>10} {:>10}",
        tasks * PER_TASK,
        "table",
        "entries",
        "key B",
        "value B",
        "total B"
    );
    let mut total = 0u64;
    for (name, t) in &f.tables {
        if t.entries == 0 {
            continue;
        }
        let sum = t.key_bytes + t.value_bytes;
        total += sum;
        println!(
            "{name:<18} {:>10.3} {:>10.1} {:>10.1} {:>10.1}",
            t.entries as f64 / leased,
            t.key_bytes as f64 / leased,
            t.value_bytes as f64 / leased,
            sum as f64 / leased
        );
    }
    println!(
        "bytes: keys and values {:.0} B/lease; redb's trees {:.0} B/lease stored + {:.0} metadata + {:.0} unused in pages; file {:.0} B/lease ({:.1} MiB)",
        total as f64 / leased,
        f.stored_bytes as f64 / leased,
        f.metadata_bytes as f64 / leased,
        f.fragmented_bytes as f64 / leased,
        f.file_bytes as f64 / leased,
        f.file_bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}
