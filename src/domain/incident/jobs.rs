//! Revocation jobs: validated, started (with an optional fence) in one
//! transaction, run in the background in chunks from a stored cursor,
//! resumed after a restart, and reported per provider.

use crate::audit::{self, Ctx};
use crate::auth::Caller;
use crate::config::OperatorRole;
use crate::domain::{Broker, BrokerError, require_responder};
use crate::ids::{JobId, LeaseId};
use crate::store::{FenceRecord, JobRecord, JobState, LeaseRecord, LeaseState, Selector};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Leases claimed per transaction by a job.
pub(super) const CHUNK: usize = 2048;

/// A mass revocation request, decoded from the wire.
#[derive(Debug, Clone, Default)]
pub struct JobRequest {
    pub selector: Selector,
    pub reason: String,
    pub fence: bool,
    pub dry_run: bool,
}

/// What `start_job` did.
#[derive(Debug)]
pub enum JobStart {
    DryRun(DryRunView),
    Started(JobRecord),
    /// A job with the same selector is already running.
    Existing(JobRecord),
}

pub(super) type Counts = BTreeMap<String, BTreeMap<&'static str, u64>>;

/// Per provider: `matched` (claimed so far) and every bucket, zeros included.
pub(super) fn counts_view(counts: &Counts) -> BTreeMap<String, BTreeMap<String, u64>> {
    counts
        .iter()
        .map(|(p, buckets)| {
            let mut m = BTreeMap::new();
            m.insert("matched".to_owned(), buckets.values().sum::<u64>());
            for b in crate::store::JOB_BUCKETS {
                m.insert(b.to_owned(), buckets.get(b).copied().unwrap_or(0));
            }
            (p.clone(), m)
        })
        .collect()
}

pub(super) fn bucket_total(counts: &Counts, bucket: &str) -> u64 {
    counts.values().filter_map(|b| b.get(bucket)).sum()
}

pub(super) fn job_view(j: &JobRecord, counts: &Counts, failed: Vec<FailedLeaseView>) -> JobView {
    let s = &j.selector;
    let ts = |ms: i64| crate::clock::rfc3339(crate::clock::Timestamp::from_unix_millis(ms));
    JobView {
        job_id: JobId(j.id).to_string(),
        state: j.state.as_str(),
        reason: j.reason.clone(),
        fence: j.fence,
        created_by: j.created_by.clone(),
        created_at: ts(j.created_at),
        finished_at: j.finished_at.map(ts),
        selector: SelectorView {
            workload: s.workload.clone(),
            tenant: s.tenant.clone(),
            task: s.task.map(|t| crate::ids::TaskId(t).to_string()),
            user: s.user.clone(),
            provider: s.provider.clone(),
            role: s.role.clone(),
            states: s.states.iter().map(|x| x.as_str()).collect(),
            all: s.all,
        },
        scan_done: j.scan_done,
        scanned: j.scanned,
        by_provider: counts_view(counts),
        failed,
        warnings: None,
    }
}

/// A mass revocation job: its selector, progress and counts.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct JobView {
    pub job_id: String,
    /// `running`, `done`, or `failed`
    pub state: &'static str,
    pub reason: String,
    pub fence: bool,
    pub created_by: String,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub selector: SelectorView,
    /// Whether every matching lease has been claimed.
    pub scan_done: bool,
    pub scanned: u64,
    /// Per provider: `matched` and a count per bucket (`revoked`, `retrying`, ...).
    pub by_provider: BTreeMap<String, BTreeMap<String, u64>>,
    /// Leases whose revocation is still failing (up to 100).
    pub failed: Vec<FailedLeaseView>,
    /// When a job starts: anything odd about its selector.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warnings: Option<Vec<String>>,
}

/// Which leases a job takes back (every field given must match).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct SelectorView {
    pub workload: Option<String>,
    pub tenant: Option<String>,
    pub task: Option<String>,
    pub user: Option<String>,
    pub provider: Option<String>,
    pub role: Option<String>,
    pub states: Vec<&'static str>,
    pub all: bool,
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct FailedLeaseView {
    pub lease_id: String,
    pub provider: String,
    pub state: &'static str,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// What a job would take back, without taking anything.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct DryRunView {
    /// Always true.
    pub dry_run: bool,
    pub matched: u64,
    pub by_provider: BTreeMap<String, u64>,
    /// Up to ten lease ids per provider.
    pub sample: BTreeMap<String, Vec<String>>,
    pub warnings: Vec<String>,
}

impl Broker {
    pub(super) fn validate_job(&self, r: &JobRequest) -> Result<(), BrokerError> {
        crate::check::text("reason", &r.reason, 1024).map_err(|_| {
            BrokerError::invalid("reason_required", "a mass revocation needs a `reason`")
        })?;
        let s = &r.selector;
        let narrowed = s.workload.is_some()
            || s.tenant.is_some()
            || s.task.is_some()
            || s.user.is_some()
            || s.provider.is_some()
            || s.role.is_some()
            || s.issued_after.is_some()
            || s.issued_before.is_some();
        if !narrowed && !s.all {
            return Err(BrokerError::invalid(
                "empty_selector",
                "an empty selector selects nothing; say `all` to mean everything",
            ));
        }
        if let Some(p) = &s.provider
            && self.providers.get(p).is_none()
        {
            return Err(BrokerError::invalid(
                "unknown_provider",
                format!("no provider named `{}`", p.escape_default()),
            ));
        }
        if let (Some(a), Some(b)) = (s.issued_after, s.issued_before)
            && a >= b
        {
            return Err(BrokerError::invalid(
                "invalid_time_range",
                "`issued_after` must be before `issued_before`",
            ));
        }
        if r.fence && s.workload.is_none() && s.tenant.is_none() && s.user.is_none() {
            return Err(BrokerError::invalid(
                "invalid_fence",
                "a fence needs a `workload`, `tenant` or `user` in the selector",
            ));
        }
        if s.states
            .iter()
            .any(|st| !matches!(st, LeaseState::Active | LeaseState::Irrevocable))
        {
            return Err(BrokerError::invalid(
                "invalid_state",
                "a job takes back `active` and `irrevocable` leases only",
            ));
        }
        Ok(())
    }

    /// A selector naming a workload the store has never seen is most often a
    /// typo (workload ids are `issuer:subject`): say so, but do it (fencing
    /// a workload before its first request is legitimate).
    pub fn selector_warnings(&self, s: &Selector) -> Result<Vec<String>, BrokerError> {
        let mut out = Vec::new();
        if let Some(w) = &s.workload
            && self.store.read()?.workload_tasks(w, 0, 1)?.is_empty()
        {
            out.push(format!(
                "no task of workload `{}` is on record (workload ids look like `issuer:subject`)",
                w.escape_default()
            ));
        }
        Ok(out)
    }

    /// Start a mass revocation (or count what one would take, for a dry run).
    pub async fn start_job(
        self: &Arc<Self>,
        caller: &Caller,
        mut req: JobRequest,
        ctx: &Ctx,
    ) -> Result<JobStart, BrokerError> {
        require_responder(caller)?;
        if req.selector.states.is_empty() {
            req.selector.states = vec![LeaseState::Active, LeaseState::Irrevocable];
        }
        if let Some(u) = &req.selector.user {
            req.selector.user = Some(crate::check::user("selector.user", u)?);
        }
        if let Some(w) = &req.selector.workload {
            req.selector.workload = Some(crate::check::identifier("selector.workload", w)?);
        }
        if let Some(t) = &req.selector.tenant {
            req.selector.tenant = Some(crate::check::identifier("selector.tenant", t)?);
        }
        self.validate_job(&req)?;
        if req.dry_run {
            let mut v = self.dry_run(&req.selector)?;
            v.warnings = self.selector_warnings(&req.selector)?;
            return Ok(JobStart::DryRun(v));
        }
        let r = self.store.read()?;
        if let Some(running) = r
            .jobs()?
            .into_iter()
            .find(|j| j.state == JobState::Running && j.selector == req.selector)
        {
            return Ok(JobStart::Existing(running));
        }
        drop(r);
        let now = self.clock.now().unix_millis();
        let job = JobRecord {
            id: JobId::generate(self.clock.now()).0,
            selector: req.selector.clone(),
            reason: req.reason.clone(),
            fence: req.fence,
            created_by: caller.principal(),
            created_at: now,
            state: JobState::Running,
            cursor: None,
            scan_done: false,
            scanned: 0,
            finished_at: None,
            error: None,
        };
        let mut fences = Vec::new();
        if req.fence {
            let s = &req.selector;
            for (kind, value) in [
                ("workload", &s.workload),
                ("tenant", &s.tenant),
                ("user", &s.user),
            ] {
                if let Some(v) = value {
                    fences.push(FenceRecord {
                        kind: kind.into(),
                        value: v.clone(),
                        reason: req.reason.clone(),
                        created_by: caller.principal(),
                        created_at: now,
                        job: Some(job.id),
                    });
                }
            }
        }
        let (j, fs, a, c) = (
            job.clone(),
            fences.clone(),
            self.auditor.clone(),
            ctx.clone(),
        );
        self.store
            .write(move |t| {
                t.put_job(&j)?;
                for f in &fs {
                    t.put_fence(f)?;
                    audit::append(t, &a, a.fence(f, None, &c, now))?;
                }
                if !fs.is_empty() {
                    t.announce("fences")?;
                }
                audit::append(t, &a, a.job(&j, None, &c, now))
            })
            .await?;
        // the fence is in force before the caller hears back, and before any revocation
        for f in &fences {
            self.fences.insert(FenceRecord::key(&f.kind, &f.value));
        }
        tracing::warn!(job_id = %JobId(job.id), by = %caller.principal(), fence = req.fence, reason = %req.reason, "mass revocation started");
        self.spawn_job(job.id, ctx.clone());
        Ok(JobStart::Started(job))
    }

    pub(super) fn dry_run(&self, sel: &Selector) -> Result<DryRunView, BrokerError> {
        let r = self.store.read()?;
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let mut sample: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut cursor = None;
        loop {
            let ids = r.candidate_leases(sel, cursor, CHUNK)?;
            let Some(&last) = ids.last() else { break };
            for id in &ids {
                if let Some(l) = r.lease(*id)?
                    && sel.matches(&l)
                {
                    *counts.entry(l.provider.clone()).or_default() += 1;
                    let s = sample.entry(l.provider.clone()).or_default();
                    if s.len() < 10 {
                        s.push(LeaseId(l.id).to_string());
                    }
                }
            }
            cursor = Some(last);
            if ids.len() < CHUNK {
                break;
            }
        }
        let total: u64 = counts.values().sum();
        Ok(DryRunView {
            dry_run: true,
            matched: total,
            by_provider: counts,
            sample,
            warnings: Vec::new(),
        })
    }

    /// Run (or resume) a job in the background, if this node leads (a
    /// cluster's leader picks up jobs other nodes recorded) and it does not
    /// run here already. Returns whether it started.
    pub fn spawn_job(self: &Arc<Self>, id: u128, ctx: Ctx) -> bool {
        let b = self.clone();
        let mut stop = self.jobs.stopping();
        if *stop.borrow() {
            return false;
        }
        let Some(epoch) = self.leader_epoch() else {
            return false;
        };
        if !self.jobs.claim(id) {
            return false;
        }
        let h = tokio::spawn(async move {
            if let Err(e) = b.run_job(id, &ctx, epoch, &mut stop).await {
                tracing::error!(job_id = %JobId(id), error = %e, "revocation job stopped; the leader resumes it");
            }
            b.jobs.release(id);
        });
        self.jobs.track(h);
        true
    }

    pub(super) fn job_chunk(&self) -> usize {
        #[cfg(feature = "fault-injection")]
        if let Some(n) = self.faults.job_chunk {
            return n.max(1);
        }
        CHUNK
    }

    /// Sleep, unless the broker is stopping (then `false`).
    pub(super) async fn job_pause(
        stop: &mut tokio::sync::watch::Receiver<bool>,
        d: Duration,
    ) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => !*stop.borrow(),
            _ = stop.changed() => false,
        }
    }

    pub(super) async fn run_job(
        self: &Arc<Self>,
        id: u128,
        ctx: &Ctx,
        epoch: u64,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), BrokerError> {
        let chunk = self.job_chunk();
        loop {
            if *stop.borrow() {
                tracing::info!(job_id = %JobId(id), "revocation job paused for shutdown; it resumes at the next start");
                return Ok(());
            }
            if self.leader_epoch() != Some(epoch) {
                tracing::warn!(job_id = %JobId(id), "this broker stopped leading; the new leader resumes the revocation job");
                return Ok(());
            }
            let job = self.store.read()?.job(id)?.ok_or(BrokerError::NotFound {
                code: "job_not_found",
            })?;
            if job.state != JobState::Running {
                return Ok(());
            }
            if !job.scan_done {
                let ids = self
                    .store
                    .read()?
                    .candidate_leases(&job.selector, job.cursor, chunk)?;
                let (local, a, c, clock) = (
                    self.local.clone(),
                    self.auditor.clone(),
                    ctx.clone(),
                    self.clock.clone(),
                );
                let queued = self
                    .store
                    .write(move |t| {
                        let now = clock.now().unix_millis();
                        t.require_leader(epoch)?;
                        let mut job = job;
                        let (claimed, queued) = t.claim_for_job(&job, &ids, now, &local)?;
                        for l in &claimed {
                            audit::append(t, &a, a.lease(l, &c, now))?;
                        }
                        job.scanned += ids.len() as u64;
                        if let Some(&last) = ids.last() {
                            job.cursor = Some(last);
                        }
                        job.scan_done = ids.len() < chunk;
                        t.put_job(&job)?;
                        Ok(queued)
                    })
                    .await?;
                for p in &queued {
                    self.wakers.revocations_queued(p);
                }
                #[cfg(feature = "fault-injection")]
                if !self.faults.job_chunk_pause.is_zero() {
                    Self::job_pause(stop, self.faults.job_chunk_pause).await;
                }
                continue;
            }
            // everything selected: wait for the queue to finish the rest
            let counts = self.store.read()?.job_counts(id)?;
            if bucket_total(&counts, "revoking") + bucket_total(&counts, "retrying") > 0 {
                Self::job_pause(stop, Duration::from_millis(50)).await;
                continue;
            }
            let now = self.clock.now().unix_millis();
            let summary = serde_json::to_value(counts_view(&counts)).unwrap_or_default();
            let (a, c) = (self.auditor.clone(), ctx.clone());
            let finished = self
                .store
                .write(move |t| {
                    t.require_leader(epoch)?;
                    let Some(mut job) = t.job(id)? else {
                        return Ok(None);
                    };
                    job.state = JobState::Done;
                    job.finished_at = Some(now);
                    t.put_job(&job)?;
                    audit::append(t, &a, a.job(&job, Some(summary), &c, now))?;
                    Ok(Some(job))
                })
                .await?;
            if let Some(j) = finished {
                let irrevocable = bucket_total(&counts, "irrevocable");
                tracing::warn!(job_id = %JobId(j.id), irrevocable, "mass revocation finished");
            }
            return Ok(());
        }
    }

    /// Resume every job that was running when the broker stopped.
    pub fn resume_jobs(self: &Arc<Self>) -> Result<usize, BrokerError> {
        let running: Vec<JobRecord> = self
            .store
            .read()?
            .jobs()?
            .into_iter()
            .filter(|j| j.state == JobState::Running)
            .collect();
        let mut resumed = 0;
        for j in &running {
            if self.spawn_job(j.id, Ctx::system()) {
                tracing::warn!(job_id = %JobId(j.id), "resuming a mass revocation");
                resumed += 1;
            }
        }
        Ok(resumed)
    }

    /// A job, its counts per provider, and the leases still failing.
    pub fn job_status(&self, caller: &Caller, id: JobId) -> Result<JobView, BrokerError> {
        if !caller.has_any_role(&[OperatorRole::Responder, OperatorRole::Admin]) {
            return Err(BrokerError::Forbidden {
                code: "forbidden",
                message: "jobs are for responders and admins".into(),
            });
        }
        let r = self.store.read()?;
        let job = r.job(id.0)?.ok_or(BrokerError::NotFound {
            code: "job_not_found",
        })?;
        let counts = r.job_counts(id.0)?;
        // the failing leases are found by a scan of the job: only when some are
        let failing = bucket_total(&counts, "retrying") + bucket_total(&counts, "irrevocable") > 0;
        let failed: Vec<FailedLeaseView> = if failing {
            r.job_unfinished(id.0, 100)?
        } else {
            Vec::new()
        }
        .iter()
        .map(|l: &LeaseRecord| FailedLeaseView {
            lease_id: LeaseId(l.id).to_string(),
            provider: l.provider.clone(),
            state: l.state.as_str(),
            attempts: l.revocation.as_ref().map_or(0, |r| r.attempts),
            last_error: l.revocation.as_ref().and_then(|r| r.last_error.clone()),
        })
        .collect();
        Ok(job_view(&job, &counts, failed))
    }

    /// A job as the API shows it (counts read now).
    pub fn job_view(&self, job: &JobRecord) -> Result<JobView, BrokerError> {
        Ok(job_view(
            job,
            &self.store.read()?.job_counts(job.id)?,
            vec![],
        ))
    }

    pub fn list_jobs(&self, caller: &Caller) -> Result<Vec<JobView>, BrokerError> {
        if !caller.has_any_role(&[OperatorRole::Responder, OperatorRole::Admin]) {
            return Err(BrokerError::Forbidden {
                code: "forbidden",
                message: "jobs are for responders and admins".into(),
            });
        }
        let r = self.store.read()?;
        r.jobs()?
            .iter()
            .map(|j| Ok(job_view(j, &r.job_counts(j.id)?, vec![])))
            .collect()
    }
}
