//! Operators' views of the broker as a whole: stats, the Prometheus
//! exposition with its store-backed gauges refreshed, the policy set in
//! force, token introspection and keys, and readiness. Who may see each is
//! decided here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use leasehold_provider::TokenInfo;
use metrics::gauge;

use super::{Broker, BrokerError};
use crate::auth::Caller;
use crate::config::OperatorRole;
use crate::policy::Loaded;
use crate::store::records::{JobState, LeaseState};

impl Broker {
    /// Refresh the store-backed gauges and render the exposition text.
    pub fn render_metrics(&self) -> Result<String, BrokerError> {
        let Some(handle) = crate::metrics::install() else {
            return Ok(String::new());
        };
        let now = self.clock.now().unix_millis();
        let r = self.store.read()?;
        let counters = r.counters()?;
        for name in self.providers.names() {
            for st in LeaseState::ALL {
                let n = counters.get(&(name.to_owned(), st)).copied().unwrap_or(0);
                gauge!("leasehold_leases", "provider" => name.to_owned(), "state" => st.as_str())
                    .set(n as f64);
            }
            let queued = [LeaseState::Revoking, LeaseState::Irrevocable]
                .iter()
                .map(|s| counters.get(&(name.to_owned(), *s)).copied().unwrap_or(0))
                .sum::<u64>();
            gauge!("leasehold_revocation_queue_depth", "provider" => name.to_owned())
                .set(queued as f64);
            let overdue = r.next_revocation(name)?.map_or(0, |due| (now - due).max(0));
            gauge!("leasehold_revocation_queue_oldest_overdue_seconds", "provider" => name.to_owned())
                .set(overdue as f64 / 1000.0);
        }
        gauge!("leasehold_event_chain_head_seq").set(r.chain_head()?.seq as f64);
        let checkpoint_age = r
            .checkpoints_last()?
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .and_then(|v| v["time"].as_str().and_then(crate::clock::parse_rfc3339))
            .map_or(-1.0, |t| (now - t.unix_millis()).max(0) as f64 / 1000.0);
        gauge!("leasehold_event_checkpoint_age_seconds").set(checkpoint_age);
        gauge!("leasehold_approvals_pending").set(r.pending_approvals(100_000)?.len() as f64);
        gauge!("leasehold_fences_active").set(r.fences()?.len() as f64);
        let running = r
            .jobs()?
            .iter()
            .filter(|j| j.state == JobState::Running)
            .count();
        gauge!("leasehold_revocation_jobs_running").set(running as f64);
        drop(r);
        let s = self.store.stats();
        crate::metrics::store_space(
            s.disk_full.load(Ordering::Relaxed),
            s.refused_no_space.load(Ordering::Relaxed),
            s.checkpoints_postponed.load(Ordering::Relaxed),
        );
        let leadership = self.store.leadership();
        crate::metrics::cluster(
            leadership.epoch().is_some(),
            leadership.transitions(),
            leadership.last_round(),
            self.store.pool(),
        );
        handle.run_upkeep();
        Ok(handle.render())
    }
}

/// The store's commit counters, as read now.
#[derive(Debug, Clone, Default)]
pub struct StoreCounters {
    pub commits: u64,
    pub operations: u64,
    pub apply_seconds: f64,
    pub commit_seconds: f64,
    pub lock_round_trips: u64,
    pub checkpoints: u64,
    pub checkpoint_seconds: f64,
    pub wal_bytes: u64,
    pub wal_seconds: f64,
}

/// Lease counts by provider and state, and the store's counters.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub leases: BTreeMap<String, BTreeMap<String, u64>>,
    pub store: StoreCounters,
}

/// What readiness found: each check by name, and whether all passed;
/// and what healthy providers advise an operator to act on (by check name).
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    pub checks: BTreeMap<String, String>,
    pub ok: bool,
    pub advisories: BTreeMap<String, Vec<String>>,
}

fn forbidden(message: &str) -> BrokerError {
    BrokerError::Forbidden {
        code: "forbidden",
        message: message.into(),
    }
}

fn admin(caller: &Caller) -> Result<(), BrokerError> {
    if caller.has_any_role(&[OperatorRole::Admin]) {
        Ok(())
    } else {
        Err(forbidden("the policy endpoints need the admin role"))
    }
}

impl Broker {
    /// The time now, by the broker's clock (request ids, for one).
    pub fn now(&self) -> crate::clock::Timestamp {
        self.clock.now()
    }

    /// Lease counts and store counters without a scan (the store keeps the
    /// counts transactionally). Admin, responder.
    pub fn stats(&self, caller: &Caller) -> Result<Stats, BrokerError> {
        if !Self::is_reader(caller) {
            return Err(forbidden("stats need the admin or responder role"));
        }
        let counters = self.store.read()?.counters()?;
        let leases = self
            .providers
            .names()
            .map(|name| {
                let by_state = LeaseState::ALL
                    .iter()
                    .map(|&st| {
                        let n = counters.get(&(name.to_owned(), st)).copied().unwrap_or(0);
                        (st.as_str().to_owned(), n)
                    })
                    .collect();
                (name.to_owned(), by_state)
            })
            .collect();
        let s = self.store.stats();
        let secs = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1e6;
        Ok(Stats {
            leases,
            store: StoreCounters {
                commits: s.commits.load(Ordering::Relaxed),
                operations: s.operations.load(Ordering::Relaxed),
                apply_seconds: secs(&s.apply_micros),
                commit_seconds: secs(&s.commit_micros),
                lock_round_trips: s.lock_round_trips.load(Ordering::Relaxed),
                checkpoints: s.checkpoints.load(Ordering::Relaxed),
                checkpoint_seconds: secs(&s.checkpoint_micros),
                wal_bytes: s.wal_bytes.load(Ordering::Relaxed),
                wal_seconds: secs(&s.wal_micros),
            },
        })
    }

    /// The Prometheus exposition for a caller on the main listener: admin
    /// and responder.
    pub fn metrics_for(&self, caller: &Caller) -> Result<String, BrokerError> {
        if !Self::is_reader(caller) {
            return Err(forbidden("metrics need the admin or responder role"));
        }
        self.render_metrics()
    }

    /// The policy set in force (admin).
    pub fn policy_in_force(&self, caller: &Caller) -> Result<Arc<Loaded>, BrokerError> {
        admin(caller)?;
        Ok(self.policy.current())
    }

    /// Reload the policy folder on an admin's request.
    pub async fn reload_policy_as(
        &self,
        caller: &Caller,
        request_id: Option<String>,
    ) -> Result<Arc<Loaded>, BrokerError> {
        admin(caller)?;
        self.reload_policy(request_id, Some(caller.principal()))
            .await
    }

    /// Every provider with its roles: what a caller may ask for (any
    /// authenticated caller; policy still decides each request).
    pub fn provider_catalog(&self) -> Vec<ProviderInfo> {
        self.providers
            .iter()
            .map(|e| ProviderInfo {
                name: e.name.clone(),
                kind: e.description.kind,
                revocation: e.description.revocation.clone(),
                roles: e
                    .description
                    .roles
                    .iter()
                    .map(|r| RoleOffer {
                        name: r.name.clone(),
                        max_ttl_seconds: r.max_ttl.as_secs(),
                        description: r.description.clone(),
                        binding: match e.provider.binding(&r.name) {
                            leasehold_provider::BindingSupport::Unsupported => "unsupported",
                            leasehold_provider::BindingSupport::Optional => "optional",
                            leasehold_provider::BindingSupport::Required => "required",
                        },
                    })
                    .collect(),
            })
            .collect()
    }

    /// Whether the caller may introspect (asked before the form is read).
    pub fn may_introspect(&self, caller: &Caller) -> Result<(), BrokerError> {
        if caller.has_any_role(&[OperatorRole::ResourceServer, OperatorRole::Admin]) {
            Ok(())
        } else {
            Err(forbidden("introspection needs the resource_server role"))
        }
    }

    /// RFC 7662 for resource servers (and admin): the answer of the token
    /// provider that recognises the token, or inactive.
    pub fn introspect(&self, caller: &Caller, token: &str) -> Result<TokenInfo, BrokerError> {
        self.may_introspect(caller)?;
        let now = self.clock.now();
        Ok(self
            .providers
            .tokens()
            .map(|p| p.introspect(token, now))
            .find(|i| i.active)
            .unwrap_or_default())
    }

    /// The public keys of every token provider (JWK objects).
    pub fn jwks(&self) -> Vec<serde_json::Value> {
        self.providers
            .tokens()
            .filter_map(|p| p.jwks().get("keys").and_then(|k| k.as_array()).cloned())
            .flatten()
            .collect()
    }

    /// Whether the store can write and read.
    pub fn store_healthy(&self) -> bool {
        self.store.is_healthy()
    }

    /// Whether writes are being refused for lack of space.
    pub fn store_full(&self) -> bool {
        self.store.stats().disk_full.load(Ordering::Relaxed)
    }

    /// Every provider's health check, with a timeout each. Failures are
    /// logged, not shown.
    pub async fn provider_health(&self) -> Readiness {
        let mut checks = BTreeMap::new();
        let mut advisories = BTreeMap::new();
        let mut ok = true;
        for entry in self.providers.iter() {
            let r = tokio::time::timeout(Duration::from_secs(2), entry.provider.health()).await;
            let status = match r {
                Ok(Ok(())) => {
                    let said =
                        tokio::time::timeout(Duration::from_secs(2), entry.provider.advisories())
                            .await
                            .unwrap_or_default();
                    metrics::gauge!("leasehold_provider_advisories", "provider" => entry.name.clone())
                        .set(said.len() as f64);
                    for a in &said {
                        tracing::warn!(provider = %entry.name, "providers.{}: {a}", entry.name);
                    }
                    if !said.is_empty() {
                        advisories.insert(format!("provider:{}", entry.name), said);
                    }
                    "ok"
                }
                Ok(Err(e)) => {
                    tracing::warn!(provider = %entry.name, error = %e, "provider health check failed");
                    "unavailable"
                }
                Err(_) => {
                    tracing::warn!(provider = %entry.name, "provider health check timed out");
                    "unavailable"
                }
            };
            ok &= status == "ok";
            checks.insert(format!("provider:{}", entry.name), status.into());
        }
        Readiness {
            checks,
            ok,
            advisories,
        }
    }
}

/// A configured provider, as callers see it.
#[derive(Debug, Clone)]
pub struct ProviderInfo {
    pub name: String,
    pub kind: &'static str,
    pub revocation: String,
    pub roles: Vec<RoleOffer>,
}

/// One role of a provider.
#[derive(Debug, Clone)]
pub struct RoleOffer {
    pub name: String,
    pub max_ttl_seconds: u64,
    pub description: String,
    /// `unsupported`, `optional` or `required`: whether its credentials
    /// are bound to the requester's key.
    pub binding: &'static str,
}
