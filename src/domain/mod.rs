//! The broker: the store, the providers, the clock and the limits, shared by
//! the HTTP handlers and the reaper. The lifecycle lives in `task/` and
//! `lease/` (as `impl Broker` blocks), expiry and retries in `reaper/`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

pub mod approval;
pub mod background;
pub mod call;
pub mod cluster;
pub mod events;
pub mod fences;
pub mod incident;
pub mod issue;
pub mod jobs;
pub mod lease;
pub mod ops;
pub mod proxy;
pub mod reaper;
pub mod retention;
pub mod task;

use crate::auth::Caller;
use crate::clock::Clock;
use crate::config::{Limits, OperatorRole, ReaperConfig};
use crate::providers::Providers;
use crate::store::{Conflict, Store, StoreError};

/// A domain error; `api::ApiError` turns it into a status and a stable code.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Bad input: 400 with the given code.
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// Unknown, or not visible to this caller: 404.
    #[error("{code}")]
    NotFound { code: &'static str },
    /// The caller lacks the role: 403.
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    /// The state forbids it: 409.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// A cap was reached: 429.
    #[error("{message}")]
    Quota { code: &'static str, message: String },
    /// Policy said no: 403, with the decision.
    #[error("denied by policy")]
    Denied(Box<Denial>),
    /// The provider failed; the detail is logged, not shown.
    #[error("provider `{provider}` failed: {detail}")]
    Provider {
        provider: String,
        retryable: bool,
        detail: String,
    },
    /// The store failed; the detail is logged, not shown.
    #[error("store unavailable: {0}")]
    Store(StoreError),
    /// The store's filesystem is full: nothing was written; retry later.
    #[error("the store's disk is full: {0}")]
    StoreFull(String),
}

impl BrokerError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            code,
            message: message.into(),
        }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::Conflict {
            code,
            message: message.into(),
        }
    }
}

impl From<crate::check::Invalid> for BrokerError {
    fn from(e: crate::check::Invalid) -> Self {
        Self::Invalid {
            code: e.code,
            message: e.message,
        }
    }
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoSpace(why) => Self::StoreFull(why),
            StoreError::Conflict(c) => match c {
                Conflict::TaskNotFound => Self::NotFound {
                    code: "task_not_found",
                },
                Conflict::LeaseNotFound => Self::NotFound {
                    code: "lease_not_found",
                },
                Conflict::TaskCompleted => {
                    Self::conflict("task_completed", "the task is completed")
                }
                Conflict::TaskExpired => {
                    Self::conflict("task_expired", "the task's deadline has passed")
                }
                Conflict::OutlivesTask => {
                    Self::conflict("task_expired", "the task ends before the lease could start")
                }
                Conflict::TaskLeaseCap(n) => Self::Quota {
                    code: "task_lease_cap",
                    message: format!("the task already holds {n} leases"),
                },
                Conflict::WorkloadLeaseCap(n) => Self::Quota {
                    code: "workload_lease_cap",
                    message: format!("the workload already holds {n} active leases (its cap)"),
                },
                Conflict::LeaseState(s) => {
                    Self::conflict("lease_state", format!("the lease is {}", s.as_str()))
                }
                Conflict::Duplicate => Self::conflict("duplicate", "the record already exists"),
                Conflict::Chain(m) => Self::conflict("chain_conflict", m),
                Conflict::ApprovalNotFound => Self::NotFound {
                    code: "approval_not_found",
                },
                Conflict::Approval(m) => Self::conflict("approval_invalid", m),
                Conflict::ReviewNotFound => Self::NotFound {
                    code: "review_not_found",
                },
                Conflict::FenceNotFound => Self::NotFound {
                    code: "fence_not_found",
                },
                Conflict::Fenced => Self::Forbidden {
                    code: "fenced",
                    message:
                        "a responder fenced this workload, tenant or user: nothing new is issued"
                            .into(),
                },
                // leader-only work refused to a deposed leader: the store
                // did its job, this node may not do this one
                c @ (Conflict::NotLeader(_) | Conflict::Stale) => {
                    Self::Store(StoreError::Conflict(c))
                }
            },
            other => Self::Store(other),
        }
    }
}

/// Incident response is the responder's.
pub(in crate::domain) fn require_responder(caller: &Caller) -> Result<(), BrokerError> {
    if caller.has_any_role(&[OperatorRole::Responder]) {
        Ok(())
    } else {
        Err(BrokerError::Forbidden {
            code: "forbidden",
            message: "incident response needs the responder role".into(),
        })
    }
}

/// A policy denial as the caller sees it.
#[derive(Debug, Clone)]
pub struct Denial {
    pub action: &'static str,
    pub call_id: Option<String>,
    /// Ids of the determining policies the caller may see.
    pub policies: Vec<String>,
    pub reasons: Vec<String>,
}

/// Policy settings the broker enforces around decisions.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    pub approval_ttl: Duration,
    pub break_glass_max_ttl: Duration,
    pub max_active_leases_per_workload: u64,
}

impl Default for PolicySettings {
    fn default() -> Self {
        Self {
            approval_ttl: Duration::from_secs(900),
            break_glass_max_ttl: Duration::from_secs(900),
            max_active_leases_per_workload: 10_000,
        }
    }
}

impl From<&crate::config::PolicyConfig> for PolicySettings {
    fn from(p: &crate::config::PolicyConfig) -> Self {
        Self {
            approval_ttl: Duration::from_secs(p.approval_ttl_seconds),
            break_glass_max_ttl: Duration::from_secs(p.break_glass_max_ttl_seconds),
            max_active_leases_per_workload: p.max_active_leases_per_workload,
        }
    }
}

/// Wakes the reaper and the revocation workers early.
#[derive(Debug, Default)]
pub struct Wakers {
    pub expiry: Notify,
    /// When the expiry loop plans to wake next (ms); a sooner lease wakes it.
    pub planned_expiry: AtomicI64,
    pub workers: BTreeMap<String, Notify>,
}

impl Wakers {
    pub fn new<'a>(providers: impl Iterator<Item = &'a str>) -> Self {
        Self {
            expiry: Notify::new(),
            planned_expiry: AtomicI64::new(i64::MAX),
            workers: providers.map(|p| (p.to_owned(), Notify::new())).collect(),
        }
    }

    pub fn lease_activated(&self, expires_at: i64) {
        if expires_at < self.planned_expiry.load(Ordering::Acquire) {
            self.expiry.notify_one();
        }
    }

    pub fn revocations_queued(&self, provider: &str) {
        if let Some(n) = self.workers.get(provider) {
            n.notify_one();
        }
    }
}

/// Test-only fault hooks.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub pause_after_issue_file: Option<std::path::PathBuf>,
    pub job_chunk: Option<usize>,
    pub job_chunk_pause: Duration,
}

pub struct Broker {
    pub(in crate::domain) store: Store,
    pub(in crate::domain) clock: Arc<dyn Clock>,
    pub(in crate::domain) providers: Arc<Providers>,
    pub(in crate::domain) limits: Limits,
    pub(in crate::domain) reaper: ReaperConfig,
    pub(in crate::domain) wakers: Arc<Wakers>,
    /// Providers whose revocation is an entry in our own store (token):
    /// revoked inside the transaction that decides the revocation.
    pub(in crate::domain) local: Arc<crate::store::Local>,
    /// Shapes events (HMAC fields; test and benchmark switches).
    pub(in crate::domain) auditor: Arc<crate::audit::Auditor>,
    /// Signs checkpoints of the event chain (and gives online verification
    /// its trusted key).
    pub(in crate::domain) checkpoint_key: Option<Arc<crate::audit::CheckpointKey>>,
    pub(in crate::domain) prune_min_age: std::time::Duration,
    pub(in crate::domain) archive_dir: Option<std::path::PathBuf>,
    /// What leaves the store once ended long enough ago.
    pub(in crate::domain) retention: crate::config::RetentionConfig,
    /// Rate limit for recording denied authentication attempts.
    pub(in crate::domain) denied: DeniedLimiter,
    /// The same for refused requests (`request.refused`).
    pub(in crate::domain) refused: DeniedLimiter,
    /// Runtime authorization.
    pub(in crate::domain) policy: Arc<crate::policy::PolicyEngine>,
    pub(in crate::domain) settings: PolicySettings,
    /// The approvers' webhook.
    pub(in crate::domain) notifier: crate::notify::Notifier,
    /// Fenced workloads, tenants and users, in memory for the request path
    /// (the store is the truth; credential-issuing transactions check it).
    pub(in crate::domain) fences: fences::FenceCache,
    /// Revocation jobs running in the background (stopped at shutdown; a
    /// stopped job resumes at the next start).
    pub(in crate::domain) jobs: jobs::JobRunner,
    #[cfg(feature = "fault-injection")]
    pub(in crate::domain) faults: Faults,
}

/// At most `per_second` denied-authentication events a second; the rest
/// are counted and reported by the next one recorded.
#[derive(Debug, Default)]
pub struct DeniedLimiter {
    pub per_second: u64,
    window: std::sync::atomic::AtomicI64,
    count: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl DeniedLimiter {
    pub fn new(per_second: u64) -> Self {
        Self {
            per_second,
            ..Self::default()
        }
    }

    /// `Some(suppressed since the last recorded one)` if this one is recorded.
    pub fn admit(&self, now_s: i64) -> Option<u64> {
        if self.window.swap(now_s, Ordering::AcqRel) != now_s {
            self.count.store(0, Ordering::Release);
        }
        if self.count.fetch_add(1, Ordering::AcqRel) < self.per_second {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Broker {
    pub fn new(
        store: Store,
        clock: Arc<dyn Clock>,
        providers: Providers,
        limits: Limits,
        reaper: ReaperConfig,
        policy: Arc<crate::policy::PolicyEngine>,
        settings: PolicySettings,
    ) -> Self {
        let wakers = Arc::new(Wakers::new(providers.names()));
        let local = Arc::new(
            providers
                .iter()
                .filter(|e| e.tokens.is_some())
                .map(|e| e.name.clone())
                .collect(),
        );
        Self {
            local,
            auditor: Arc::new(crate::audit::Auditor::default()),
            checkpoint_key: None,
            prune_min_age: std::time::Duration::from_secs(7 * 86_400),
            archive_dir: None,
            retention: crate::config::RetentionConfig::default(),
            denied: DeniedLimiter::new(10),
            refused: DeniedLimiter::new(10),
            policy,
            settings,
            notifier: crate::notify::Notifier::default(),
            fences: fences::FenceCache::default(),
            jobs: jobs::JobRunner::default(),
            store,
            clock,
            providers: Arc::new(providers),
            limits,
            reaper,
            wakers,
            #[cfg(feature = "fault-injection")]
            faults: Faults::default(),
        }
    }

    /// The approvers' webhook (the default sends nothing).
    pub fn with_notifier(mut self, notifier: crate::notify::Notifier) -> Self {
        self.notifier = notifier;
        self
    }

    /// How events are shaped (HMAC fields; test and benchmark switches).
    pub fn with_auditor(mut self, auditor: crate::audit::Auditor) -> Self {
        self.auditor = Arc::new(auditor);
        self
    }

    /// The key that signs checkpoints of the chain.
    pub fn with_checkpoint_key(mut self, key: crate::audit::CheckpointKey) -> Self {
        self.checkpoint_key = Some(Arc::new(key));
        self
    }

    /// Events younger than this are never pruned; archives go to `dir`.
    pub fn with_archiving(
        mut self,
        min_age: std::time::Duration,
        dir: Option<std::path::PathBuf>,
    ) -> Self {
        self.prune_min_age = min_age;
        self.archive_dir = dir;
        self
    }

    /// Retention's window, schedule and batches.
    pub fn with_retention(mut self, retention: crate::config::RetentionConfig) -> Self {
        self.retention = retention;
        self
    }

    /// At most this many denied-authentication events a second.
    pub fn with_denied_per_second(mut self, per_second: u64) -> Self {
        self.denied = DeniedLimiter::new(per_second);
        self.refused = DeniedLimiter::new(per_second);
        self
    }

    /// Test-only fault hooks.
    #[cfg(feature = "fault-injection")]
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Give up the broker for its store (shutdown closes the store once
    /// nothing else holds the broker).
    pub fn into_store(self) -> Store {
        self.store
    }

    /// The configured providers.
    pub fn providers(&self) -> &crate::providers::Providers {
        &self.providers
    }

    /// The broker's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Stop the running revocation jobs (shutdown; they resume at the next
    /// start).
    pub async fn stop_jobs(&self) {
        self.jobs.stop().await;
    }

    pub fn provider_timeout(&self) -> Duration {
        Duration::from_secs(self.reaper.provider_timeout_seconds)
    }

    /// How long a request that claimed leases for revocation owns them before
    /// the queue takes over (if the request died, say).
    pub fn claim_window_ms(&self) -> i64 {
        i64::try_from(self.reaper.provider_timeout_seconds)
            .unwrap_or(30)
            .saturating_mul(2000)
    }

    /// Append a broker-level event (started, stopped, auth denied) in a
    /// transaction of its own.
    pub async fn record(
        &self,
        kind: crate::audit::EventKind,
        request_id: Option<String>,
        data: crate::audit::EventData,
    ) -> Result<(), BrokerError> {
        let now = self.clock.now().unix_millis();
        let a = self.auditor.clone();
        self.store
            .write(move |t| crate::audit::append(t, &a, a.broker(kind, now, request_id, data)))
            .await
            .map_err(BrokerError::from)
    }

    /// Put a refused request of a workload on the chain (`request.refused`)
    /// with the refusal's code and message and what was asked, linked to
    /// its task when it named one of its own; at most the configured number
    /// a second, the next one saying how many were left out. Policy's own
    /// denials are already `call.decided`; failures of a provider or the
    /// store are not refusals. Never changes the answer.
    pub(crate) async fn record_refusal(
        &self,
        w: &crate::auth::Workload,
        task: Option<&crate::store::TaskRecord>,
        asked: crate::audit::EventData,
        e: &BrokerError,
        ctx: &crate::audit::Ctx,
    ) {
        let code = match e {
            BrokerError::Invalid { code, .. }
            | BrokerError::Forbidden { code, .. }
            | BrokerError::Conflict { code, .. }
            | BrokerError::Quota { code, .. }
            | BrokerError::NotFound { code } => *code,
            BrokerError::Denied(_)
            | BrokerError::Provider { .. }
            | BrokerError::Store(_)
            | BrokerError::StoreFull(_) => return,
        };
        let Some(suppressed) = self.refused.admit(self.clock.now().unix_seconds()) else {
            return;
        };
        let mut data = asked;
        data.insert("code".into(), serde_json::Value::from(code));
        data.insert("reason".into(), crate::audit::text(&e.to_string()));
        data.insert(
            "suppressed_before".into(),
            serde_json::Value::from(suppressed),
        );
        let now = self.clock.now().unix_millis();
        let a = self.auditor.clone();
        let event = a.refusal(
            (&w.id, w.tenant.as_deref()),
            task.map(|t| (t.id, t.on_behalf_of.as_str())),
            now,
            ctx,
            data,
        );
        if let Err(e) = self
            .store
            .write(move |t| crate::audit::append(t, &a, event))
            .await
        {
            tracing::warn!(error = %e, "recording a refused request failed");
        }
    }

    /// The broker's time now, in milliseconds since the epoch.
    pub fn now_ms(&self) -> i64 {
        self.clock.now().unix_millis()
    }

    /// Record a denied authentication attempt, rate-limited. Never blocks
    /// the refusal itself.
    pub fn auth_denied(self: &Arc<Self>, reason: String, request_id: Option<String>) {
        let Some(suppressed) = self.denied.admit(self.clock.now().unix_seconds()) else {
            return;
        };
        let b = self.clone();
        tokio::spawn(async move {
            let data = crate::event_data![
                ("reason", crate::audit::text(&reason)),
                ("suppressed_before", suppressed)
            ];
            if let Err(e) = b
                .record(crate::audit::EventKind::AuthDenied, request_id, data)
                .await
            {
                tracing::warn!(error = %e, "recording a denied authentication failed");
            }
        });
    }

    /// Reload the policy folder; on success record `policy.reloaded`, on
    /// failure keep the old set and return every problem (`Invalid`).
    pub async fn reload_policy(
        &self,
        request_id: Option<String>,
        by: Option<String>,
    ) -> Result<Arc<crate::policy::Loaded>, BrokerError> {
        self.reload_policy_from(request_id, by, false).await
    }

    /// [`Self::reload_policy`]; `from_cluster`: another node asked, so
    /// there is no one to tell.
    pub(in crate::domain) async fn reload_policy_from(
        &self,
        request_id: Option<String>,
        by: Option<String>,
        from_cluster: bool,
    ) -> Result<Arc<crate::policy::Loaded>, BrokerError> {
        match self.policy.reload() {
            Ok(l) => {
                let data = crate::event_data![
                    ("version", l.version.clone()),
                    ("policies", l.policy_count as u64),
                    ("files", serde_json::Value::from(l.files.clone())),
                    ("by", by.unwrap_or_else(|| "SIGHUP".into())),
                ];
                self.record(crate::audit::EventKind::PolicyReloaded, request_id, data)
                    .await?;
                tracing::info!(version = %l.version, policies = l.policy_count, "policy set reloaded");
                if !from_cluster {
                    // the other nodes reload too
                    let what = format!("policy {}", l.version);
                    self.store.write(move |t| t.announce(&what)).await?;
                }
                Ok(l)
            }
            Err(e) => {
                tracing::error!(problems = %e, "policy reload refused; the previous set stays in force");
                Err(BrokerError::invalid("policy_invalid", e.to_string()))
            }
        }
    }

    /// Sign the head of the chain if it moved since the last checkpoint.
    pub async fn checkpoint(&self) -> Result<Option<crate::audit::Checkpoint>, BrokerError> {
        let Some(key) = self.checkpoint_key.clone() else {
            return Ok(None);
        };
        // the leader signs the cluster's checkpoints
        let Some(epoch) = self.leader_epoch() else {
            return Ok(None);
        };
        let r = self.store.read()?;
        let head = r.chain_head()?;
        if head.seq == 0 || r.last_checkpoint_seq()?.is_some_and(|s| s >= head.seq) {
            return Ok(None);
        }
        drop(r);
        let cp = key.sign(head.seq, head.hash, crate::clock::rfc3339(self.clock.now()));
        let mut bytes = Vec::new();
        crate::audit::canonical(&cp.to_value(), &mut bytes)
            .map_err(|e| BrokerError::Store(crate::store::StoreError::Corrupt(e.to_string())))?;
        let seq = cp.seq;
        self.store
            .write(move |t| {
                t.require_leader(epoch)?;
                t.put_checkpoint(seq, &bytes)
            })
            .await?;
        Ok(Some(cp))
    }

    /// Operators who may read any task or lease.
    pub fn is_reader(caller: &Caller) -> bool {
        caller.has_any_role(&[OperatorRole::Admin, OperatorRole::Responder])
    }
}
