//! Reconciliation: what a provider's peer holds with the broker's mark
//! (a PostgreSQL role with the prefix) that no live lease accounts for.
//! Recovery for crashes outside the broker's control (a restored database
//! backup, a role created by hand, a store lost with its intents). Reports
//! by default; removes only when asked, and only what carries the mark.

use crate::audit::{self, Ctx};
use crate::auth::Caller;
use crate::config::OperatorRole;
use crate::domain::{Broker, BrokerError};
use crate::ids::LeaseId;
use crate::providers::ProviderEntry;
use crate::store::LeaseState;
use leasehold_provider::Found;

/// What a reconciliation found: credentials at the peer that no live
/// lease accounts for.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ReconcileReport {
    pub provider: String,
    /// Credentials the peer holds that leasehold made.
    pub found: usize,
    /// Of those, the ones a live lease accounts for.
    pub accounted: usize,
    pub orphans: Vec<OrphanView>,
    /// Whether the orphans were removed.
    pub drop: bool,
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct OrphanView {
    pub name: String,
    pub lease_id: Option<String>,
    pub lease_state: Option<&'static str>,
    pub reason: String,
    pub removed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the provider holds that no live lease accounts for: the item,
/// its lease's state if there is one, and why.
type Orphan = (Found, Option<&'static str>, String);

impl Broker {
    /// Compare a provider's inventory with the store; with `drop`, remove
    /// the orphans. Recorded as `provider.reconciled`.
    pub async fn reconcile(
        &self,
        caller: &Caller,
        provider: &str,
        drop: bool,
        ctx: &Ctx,
    ) -> Result<ReconcileReport, BrokerError> {
        if !caller.has_any_role(&[OperatorRole::Admin, OperatorRole::Responder]) {
            return Err(BrokerError::Forbidden {
                code: "forbidden",
                message: "reconciliation is for admins and responders".into(),
            });
        }
        self.reconcile_provider(provider, drop, &caller.principal(), ctx, true)
            .await
    }

    /// The periodic job (`reaper.reconcile_interval_seconds`): report only,
    /// and record an event only when something is found.
    pub async fn reconcile_all_periodic(&self) {
        let names: Vec<String> = self.providers.names().map(str::to_owned).collect();
        for name in names {
            match self
                .reconcile_provider(&name, false, "system", &Ctx::system(), false)
                .await
            {
                Ok(report) => {
                    let n = report.orphans.len();
                    crate::metrics::provider_orphans(&name, n);
                }
                Err(BrokerError::Invalid {
                    code: "not_reconcilable",
                    ..
                }) => {}
                Err(e) => {
                    tracing::warn!(provider = %name, error = %e, "periodic reconciliation failed")
                }
            }
        }
    }

    async fn reconcile_provider(
        &self,
        provider: &str,
        drop: bool,
        by: &str,
        ctx: &Ctx,
        always_record: bool,
    ) -> Result<ReconcileReport, BrokerError> {
        let entry = self
            .providers
            .get(provider)
            .ok_or_else(|| {
                BrokerError::invalid("unknown_provider", format!("no provider `{provider}`"))
            })?
            .clone();
        let provider_err = |e: leasehold_provider::ProviderError| BrokerError::Provider {
            provider: provider.to_owned(),
            retryable: e.is_retryable(),
            detail: e.message,
        };
        let Some(found) = entry.provider.inventory().await.map_err(provider_err)? else {
            return Err(BrokerError::invalid(
                "not_reconcilable",
                format!(
                    "provider `{provider}` ({}) keeps nothing to reconcile: its credentials expire on their own",
                    entry.description.kind
                ),
            ));
        };
        let (orphans, accounted) = self.classify(provider, &found)?;
        let listed = Self::list_orphans(&entry, orphans, drop).await;
        let report = ReconcileReport {
            provider: provider.to_owned(),
            found: found.len(),
            accounted,
            orphans: listed,
            drop,
        };
        if !report.orphans.is_empty() {
            tracing::warn!(
                provider,
                orphans = report.orphans.len(),
                drop,
                "reconciliation found credentials no lease accounts for"
            );
        }
        if report.orphans.is_empty() && !always_record {
            return Ok(report);
        }
        let now = self.clock.now().unix_millis();
        let (a, c, by, rep, name) = (
            self.auditor.clone(),
            ctx.clone(),
            by.to_owned(),
            serde_json::to_value(&report).unwrap_or_default(),
            provider.to_owned(),
        );
        self.store
            .write(move |t| {
                audit::append(t, &a, a.reconciled(&name, &rep, &by, &c, now))?;
                Ok(())
            })
            .await?;
        Ok(report)
    }

    /// Which of what the provider holds a live lease accounts for (counted)
    /// and which it does not (with why).
    fn classify(
        &self,
        provider: &str,
        found: &[Found],
    ) -> Result<(Vec<Orphan>, usize), BrokerError> {
        let mut orphans = Vec::new();
        let mut accounted = 0usize;
        {
            let r = self.store.read()?;
            for f in found {
                let lease = f
                    .lease_id
                    .as_deref()
                    .and_then(|l| l.parse::<LeaseId>().ok());
                let rec = match lease {
                    Some(id) => r.lease(id.0)?,
                    None => None,
                };
                let live = rec.as_ref().is_some_and(|l| {
                    l.provider == provider
                        && matches!(
                            l.state,
                            LeaseState::Issuing
                                | LeaseState::Active
                                | LeaseState::Revoking
                                | LeaseState::Irrevocable
                        )
                });
                if live {
                    accounted += 1;
                    continue;
                }
                let reason = match (&lease, &rec) {
                    (None, _) => "the name does not encode a lease id".to_owned(),
                    (Some(_), None) => "no such lease in the store".to_owned(),
                    (Some(_), Some(l)) if l.provider != provider => {
                        format!("the lease belongs to provider `{}`", l.provider)
                    }
                    (Some(_), Some(l)) => format!("its lease is {}", l.state.as_str()),
                };
                orphans.push((f.clone(), rec.map(|l| l.state.as_str()), reason));
            }
        }
        Ok((orphans, accounted))
    }

    /// The orphans as reported, removed at the provider when `drop`.
    async fn list_orphans(
        entry: &ProviderEntry,
        orphans: Vec<Orphan>,
        drop: bool,
    ) -> Vec<OrphanView> {
        let provider = entry.name.as_str();
        let mut listed = Vec::with_capacity(orphans.len());
        for (f, state, reason) in orphans {
            let mut v = OrphanView {
                name: f.name.clone(),
                lease_id: f.lease_id.clone(),
                lease_state: state,
                reason,
                removed: false,
                error: None,
            };
            if drop {
                match entry.provider.remove(&f).await {
                    Ok(()) => v.removed = true,
                    Err(e) => {
                        tracing::warn!(provider, name = %f.name, error = %e, "could not remove an orphan");
                        v.error = Some(e.message);
                    }
                }
            }
            listed.push(v);
        }
        listed
    }
}
