//! The broker: the store, the providers, the clock and the limits, shared by
//! the HTTP handlers and the reaper. The lifecycle lives in `task/` and
//! `lease/` (as `impl Broker` blocks), expiry and retries in `reaper/`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

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
    /// The provider failed; the detail is logged, not shown.
    #[error("provider `{provider}` failed: {detail}")]
    Provider { provider: String, retryable: bool, detail: String },
    /// The store failed; the detail is logged, not shown.
    #[error("store unavailable: {0}")]
    Store(StoreError),
}

impl BrokerError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid { code, message: message.into() }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::Conflict { code, message: message.into() }
    }
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(c) => match c {
                Conflict::TaskNotFound => Self::NotFound { code: "task_not_found" },
                Conflict::LeaseNotFound => Self::NotFound { code: "lease_not_found" },
                Conflict::TaskCompleted => Self::conflict("task_completed", "the task is completed"),
                Conflict::TaskExpired => Self::conflict("task_expired", "the task's deadline has passed"),
                Conflict::OutlivesTask => {
                    Self::conflict("task_expired", "the task ends before the lease could start")
                }
                Conflict::TaskLeaseCap(n) => {
                    Self::Quota { code: "task_lease_cap", message: format!("the task already holds {n} leases") }
                }
                Conflict::LeaseState(s) => Self::conflict("lease_state", format!("the lease is {}", s.as_str())),
                Conflict::Duplicate => Self::conflict("duplicate", "the record already exists"),
            },
            other => Self::Store(other),
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
}

pub struct Broker {
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub providers: Arc<Providers>,
    pub limits: Limits,
    pub reaper: ReaperConfig,
    pub wakers: Arc<Wakers>,
    /// Providers whose revocation is an entry in our own store (token):
    /// revoked inside the transaction that decides the revocation.
    pub local: Arc<crate::store::Local>,
    #[cfg(feature = "fault-injection")]
    pub faults: Faults,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("store", &self.store).finish_non_exhaustive()
    }
}

impl Broker {
    pub fn new(
        store: Store,
        clock: Arc<dyn Clock>,
        providers: Providers,
        limits: Limits,
        reaper: ReaperConfig,
    ) -> Self {
        let wakers = Arc::new(Wakers::new(providers.names()));
        let local = Arc::new(providers.iter().filter(|e| e.token.is_some()).map(|e| e.name.clone()).collect());
        Self {
            local,
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

    pub fn provider_timeout(&self) -> Duration {
        Duration::from_secs(self.reaper.provider_timeout_seconds)
    }

    /// How long a request that claimed leases for revocation owns them before
    /// the queue takes over (if the request died, say).
    pub fn claim_window_ms(&self) -> i64 {
        i64::try_from(self.reaper.provider_timeout_seconds).unwrap_or(30).saturating_mul(2000)
    }

    /// Operators who may read any task or lease.
    pub fn is_reader(caller: &Caller) -> bool {
        caller.has_any_role(&[OperatorRole::Admin, OperatorRole::Responder])
    }
}
