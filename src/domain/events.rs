//! The event chain as operators read it: filtered pages, verification
//! now, the chain's base, head and checkpoints, and pruning of archived
//! events. Admin and responder read; only admin prunes.

use crate::audit::query::{EventQuery, page, verify_store};
use crate::audit::verify::VerifyReport;
use crate::audit::{Ctx, EventKind};
use crate::auth::Caller;
use crate::clock::Timestamp;
use crate::config::OperatorRole;

use super::{Broker, BrokerError};

/// What a reader asks of the chain (decoded and checked by the caller).
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub task: Option<u128>,
    /// The lease as written (events name it), and its id.
    pub lease: Option<(String, u128)>,
    pub workload: Option<String>,
    pub user: Option<String>,
    pub kind: Option<EventKind>,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub after: u64,
    pub limit: usize,
}

/// Where the chain starts and ends, and what vouches for it.
#[derive(Debug, Clone)]
pub struct ChainInfo {
    pub base: crate::store::ChainHead,
    pub head: crate::store::ChainHead,
    /// The public key checkpoints verify with, as text.
    pub checkpoint_key: Option<String>,
    pub checkpoints: Vec<serde_json::Value>,
}

/// What one archive-and-prune did.
#[derive(Debug, Clone)]
pub struct Archived {
    /// The archive file the broker wrote and verified.
    pub archive: std::path::PathBuf,
    pub sha256: String,
    pub pruned: u64,
    /// Where the chain starts now.
    pub base_seq: u64,
    /// The checkpoint signed right after, over the new head.
    pub checkpoint: Option<u64>,
    /// Prune steps (transactions), and the longest any held the writer.
    pub steps: u64,
    pub longest_step: std::time::Duration,
}

/// Events examined per page at most.
const SCAN_BUDGET: usize = 20_000;

fn chain_reader(caller: &Caller) -> Result<(), BrokerError> {
    if Broker::is_reader(caller) {
        Ok(())
    } else {
        Err(BrokerError::Forbidden {
            code: "forbidden",
            message: "the event chain is for the admin and responder roles".into(),
        })
    }
}

fn chain_pruner(caller: &Caller) -> Result<(), BrokerError> {
    if caller.has_any_role(&[OperatorRole::Admin]) {
        Ok(())
    } else {
        Err(BrokerError::Forbidden {
            code: "forbidden",
            message: "pruning the chain needs the admin role".into(),
        })
    }
}

/// Run a read that may walk many blocks off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BrokerError::Store(crate::store::StoreError::Io(format!("reader task: {e}"))))?
        .map_err(BrokerError::from)
}

impl Broker {
    /// Whether the caller may read the chain (asked before its request is
    /// decoded, so a caller without the role learns nothing of its shape).
    pub fn may_read_chain(&self, caller: &Caller) -> Result<(), BrokerError> {
        chain_reader(caller)
    }

    /// One page of events in chain order, and the cursor of the next.
    /// Workload and user filters match the chain's (possibly keyed) form.
    pub async fn events(
        &self,
        caller: &Caller,
        f: EventFilter,
    ) -> Result<(Vec<serde_json::Value>, Option<u64>), BrokerError> {
        chain_reader(caller)?;
        self.event_page(f).await
    }

    /// [`Broker::events`] for the broker's own use (archiving).
    async fn event_page(
        &self,
        f: EventFilter,
    ) -> Result<(Vec<serde_json::Value>, Option<u64>), BrokerError> {
        let reader = self.store.read()?;
        let lease_task = match &f.lease {
            Some((_, id)) => Some(reader.lease(*id)?.map_or(0, |r| r.task_id)),
            None => None,
        };
        let a = &self.auditor;
        let q = EventQuery {
            task: f.task,
            lease: f.lease.map(|(text, _)| text),
            lease_task,
            workload: f.workload.as_deref().map(|w| a.workload(w)),
            user: f.user.as_deref().map(|u| a.user(u)),
            kind: f.kind,
            since: f.since,
            until: f.until,
            after: f.after,
            limit: f.limit,
            scan_budget: SCAN_BUDGET,
        };
        blocking(move || page(&*reader, &q)).await
    }

    /// Verify the whole chain and every checkpoint, now.
    pub async fn verify_chain(&self, caller: &Caller) -> Result<VerifyReport, BrokerError> {
        chain_reader(caller)?;
        let reader = self.store.read()?;
        let trusted = self
            .checkpoint_key
            .as_ref()
            .map(|k| k.public_key().to_vec());
        let report = blocking(move || verify_store(&*reader, trusted)).await?;
        if !report.ok {
            tracing::error!(first_break = ?report.first_break, "the event chain does not verify");
        }
        Ok(report)
    }

    /// The chain's base and head, its checkpoints and their key.
    pub fn chain_info(&self, caller: &Caller) -> Result<ChainInfo, BrokerError> {
        chain_reader(caller)?;
        self.chain_state()
    }

    pub(in crate::domain) fn chain_state(&self) -> Result<ChainInfo, BrokerError> {
        let r = self.store.read()?;
        let checkpoints = r
            .checkpoints()?
            .into_iter()
            .map(|(_, bytes)| {
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .unwrap_or(serde_json::Value::Null)
            })
            .collect();
        Ok(ChainInfo {
            base: r.chain_base()?,
            head: r.chain_head()?,
            checkpoint_key: self.checkpoint_key.as_ref().map(|k| k.public_key_text()),
            checkpoints,
        })
    }

    /// Archive and prune the oldest events through `through` (admin), as
    /// one operation of the broker's own: it writes them to a file in
    /// `audit.archive_dir` (the export format), verifies the file, and only
    /// then removes them, recording the archive's name and SHA-256 on the
    /// chain in the same transaction, and signs a checkpoint over the new
    /// head. Nothing younger than `audit.prune_min_age_seconds` goes.
    pub async fn archive_events(
        &self,
        caller: &Caller,
        ctx: &Ctx,
        through: u64,
    ) -> Result<Archived, BrokerError> {
        chain_pruner(caller)?;
        let dir = self.archive_dir.clone().ok_or_else(|| {
            BrokerError::invalid(
                "archive_not_configured",
                "set audit.archive_dir: events are pruned only into an archive the broker writes and verifies",
            )
        })?;
        let info = self.chain_info(caller)?;
        if through <= info.base.seq || through > info.head.seq {
            return Err(BrokerError::invalid(
                "invalid_range",
                format!(
                    "can archive only events {}..={}",
                    info.base.seq + 1,
                    info.head.seq
                ),
            ));
        }
        self.check_prune_age(caller, through).await?;
        self.archive_through(
            &dir,
            &info,
            through,
            None,
            caller.principal(),
            ctx.request_id.clone(),
        )
        .await
    }

    /// Write events base+1..=`through` to a new archive in `dir`, verify
    /// it, then prune them in steps of at most `self.prune_step` events,
    /// each step its own transaction recording a `chain.pruned` that names
    /// the archive and its SHA-256 (so no step holds the writer up long),
    /// paced like retention's batches,
    /// and sign a checkpoint over the new head. `epoch`: the leader's
    /// (retention), checked in each step's transaction.
    pub(in crate::domain) async fn archive_through(
        &self,
        dir: &std::path::Path,
        info: &ChainInfo,
        through: u64,
        epoch: Option<u64>,
        by: String,
        rid: Option<String>,
    ) -> Result<Archived, BrokerError> {
        let name = format!("chain-{:012}-{through:012}.jsonl", info.base.seq + 1);
        let path = dir.join(&name);
        let steps = self.write_archive(info, through, &path).await?;
        let trusted = self
            .checkpoint_key
            .as_ref()
            .map(|k| k.public_key().to_vec());
        let file = path.clone();
        // on the background thread, niced: requests come first
        let report = super::background::run(move || {
            crate::audit::verify::verify_export_file(&file, trusted)
        })
        .await
        .map_err(|e| BrokerError::Store(crate::store::StoreError::Io(e)))?
        .map_err(|e| BrokerError::Store(crate::store::StoreError::Io(e)))?;
        let verified = crate::hex::decode32(&report.head_hash).filter(|h| {
            report.ok && report.last_seq == through && steps.last() == Some(&(through, *h))
        });
        if verified.is_none() {
            return Err(BrokerError::Store(crate::store::StoreError::Corrupt(
                format!(
                    "the archive {} does not verify; nothing was pruned",
                    path.display()
                ),
            )));
        }
        // tens of MiB read and hashed: not on an async worker
        let file = path.clone();
        let sha = super::background::run(move || {
            std::fs::read(&file).map(|bytes| {
                crate::hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref())
            })
        })
        .await
        .map_err(|e| BrokerError::Store(crate::store::StoreError::Io(e)))?
        .map_err(|e| {
            BrokerError::Store(crate::store::StoreError::Io(format!(
                "{}: {e}",
                path.display()
            )))
        })?;
        let (mut removed, mut longest_step) = (0, std::time::Duration::ZERO);
        let count = steps.len() as u64;
        for (step, hash) in steps {
            let (a, now) = (self.auditor.clone(), self.clock.now().unix_millis());
            let (by, rid, archive, archive_sha) =
                (by.clone(), rid.clone(), name.clone(), sha.clone());
            let started = std::time::Instant::now();
            let (n, held) = self
                .store
                .write(move |t| {
                    let held = std::time::Instant::now();
                    if let Some(e) = epoch {
                        t.require_leader(e)?;
                    }
                    let removed = t.prune_events(step, &hash)?;
                    let data = crate::event_data![
                        ("through_seq", step),
                        ("last_hash", crate::hex::encode(&hash)),
                        ("removed", removed),
                        ("archive", archive),
                        ("archive_sha256", archive_sha),
                        ("archive_through_seq", through),
                        ("by", by),
                    ];
                    crate::audit::append(t, &a, a.broker(EventKind::ChainPruned, now, rid, data))?;
                    Ok((removed, held.elapsed()))
                })
                .await?;
            removed += n;
            longest_step = longest_step.max(held);
            // pause as long as the step took, so pruning a backlog never
            // takes more than half the writer (requests queued behind one
            // step, not behind a run of them)
            tokio::time::sleep(started.elapsed().max(std::time::Duration::from_millis(1))).await;
        }
        let checkpoint = self.checkpoint().await?.map(|c| c.seq);
        Ok(Archived {
            archive: path,
            sha256: sha,
            pruned: removed,
            base_seq: through,
            checkpoint,
            steps: count,
            longest_step,
        })
    }

    /// Refuse when event `through` is younger than the minimum age.
    async fn check_prune_age(&self, caller: &Caller, through: u64) -> Result<(), BrokerError> {
        let last = self
            .events(
                caller,
                EventFilter {
                    after: through.saturating_sub(1),
                    limit: 1,
                    ..EventFilter::default()
                },
            )
            .await?
            .0
            .into_iter()
            .next();
        let at = last
            .as_ref()
            .filter(|e| e.get("seq").and_then(serde_json::Value::as_u64) == Some(through))
            .and_then(|e| e.get("time").and_then(serde_json::Value::as_str))
            .and_then(crate::clock::parse_rfc3339);
        let newest_allowed = self.clock.now().unix_millis()
            - i64::try_from(self.prune_min_age.as_millis()).unwrap_or(i64::MAX);
        match at {
            Some(at) if at.unix_millis() <= newest_allowed => Ok(()),
            Some(_) => Err(BrokerError::invalid(
                "prune_too_recent",
                format!(
                    "event {through} is younger than audit.prune_min_age_seconds ({} s): events are kept at least that long",
                    self.prune_min_age.as_secs()
                ),
            )),
            None => Err(BrokerError::invalid(
                "invalid_range",
                format!("no event {through}"),
            )),
        }
    }

    /// The export of events base+1..=through, with the checkpoints in that
    /// range, written to a new file of mode 0600 and synced.
    /// Returns the steps to prune in: every `prune_step`-th event's seq and
    /// hash, and `through`'s last.
    async fn write_archive(
        &self,
        info: &ChainInfo,
        through: u64,
        path: &std::path::Path,
    ) -> Result<Vec<(u64, [u8; 32])>, BrokerError> {
        use std::io::Write as _;
        let io = |e: std::io::Error| {
            BrokerError::Store(crate::store::StoreError::Io(format!(
                "{}: {e}",
                path.display()
            )))
        };
        if let Some(dir) = path.parent() {
            let mut b = std::fs::DirBuilder::new();
            b.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt as _;
                b.mode(0o700);
            }
            b.create(dir).map_err(io)?;
        }
        // written beside its name, then renamed: an attempt cut short (a
        // crash before the prune) leaves no half file under the name, and
        // the next attempt at the same range writes it again
        let partial = path.with_extension("jsonl.partial");
        let mut open = std::fs::OpenOptions::new();
        open.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            open.mode(0o600);
        }
        let file = open.open(&partial).map_err(io)?;
        let mut out = std::io::BufWriter::new(file);
        let header = serde_json::json!({"chain": {"base_seq": info.base.seq, "base_hash": crate::hex::encode(&info.base.hash)}});
        writeln!(out, "{header}").map_err(io)?;
        for cp in &info.checkpoints {
            let seq = cp
                .get("seq")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            if seq > info.base.seq && seq <= through {
                writeln!(out, "{}", serde_json::json!({ "checkpoint": cp })).map_err(io)?;
            }
        }
        // the events, from one snapshot, on the background thread (niced,
        // off the async workers): their stored bytes with the hash spliced
        // in (no values built)
        let reader = self.store.read()?;
        let base = info.base.seq;
        let step = self.retention.prune_step_events.max(1);
        let named = path.to_path_buf();
        let steps = super::background::run(move || {
            let mut steps = Vec::new();
            let mut line = Vec::new();
            let mut after = base;
            // synced as it goes, a MiB at a time: one sync of the whole
            // archive would queue tens of MiB ahead of the write-ahead
            // log's next sync on the same disk
            let mut unsynced = 0;
            while after < through {
                let page = reader.events_after(after, 1000)?;
                if page.is_empty() {
                    return Err(crate::store::StoreError::Corrupt(format!(
                        "events {}..={through} are missing",
                        after + 1
                    )));
                }
                for e in page.into_iter().take_while(|e| e.seq <= through) {
                    if (e.seq - base).is_multiple_of(step) || e.seq == through {
                        steps.push((e.seq, e.hash));
                    }
                    line.clear();
                    crate::audit::export_line(&e.bytes, &e.hash, &mut line).map_err(|_| {
                        crate::store::StoreError::Corrupt(format!(
                            "event {} is not an object",
                            e.seq
                        ))
                    })?;
                    line.push(b'\n');
                    out.write_all(&line)
                        .map_err(|err| crate::store::StoreError::Io(err.to_string()))?;
                    unsynced += line.len();
                    if unsynced >= 1 << 20 {
                        unsynced = 0;
                        out.flush()
                            .and_then(|()| out.get_ref().sync_data())
                            .map_err(|err| crate::store::StoreError::Io(err.to_string()))?;
                    }
                    after = e.seq;
                }
            }
            let file = out
                .into_inner()
                .map_err(|e| crate::store::StoreError::Io(e.into_error().to_string()))?;
            let synced = file
                .sync_all()
                .and_then(|()| std::fs::rename(&partial, &named));
            let synced = synced.and_then(|()| match named.parent() {
                Some(dir) => std::fs::File::open(dir).and_then(|d| d.sync_all()),
                None => Ok(()),
            });
            synced
                .map_err(|e| crate::store::StoreError::Io(format!("{}: {e}", named.display())))?;
            Ok(steps)
        })
        .await
        .map_err(|e| BrokerError::Store(crate::store::StoreError::Io(format!("archive: {e}"))))??;
        Ok(steps)
    }
}
