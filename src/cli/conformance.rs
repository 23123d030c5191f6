//! `leasehold providers conformance`: the conformance suite the built-in
//! providers pass, run against one configured provider or plugin, each
//! promise printed as passed or failed. What a platform team runs against
//! its own plugin before deploying it.
//!
//! It builds only the named provider, in this process, from the broker's
//! configuration (a running broker is not needed, nor touched: a token
//! provider's revocations go to a denylist in memory). The suite mints real
//! credentials at the provider's peer and revokes them; checking that a
//! credential works, and stops working, is the provider's own `probe` (a
//! plugin's `Probe` call), never the broker's bookkeeping.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold_provider::conformance::{
    self, EXPIRY_ONLY_STEPS, Failure, Probe, Report, STEPS, SpecFactory,
};
use leasehold_provider::{BuildContext, Credential, Denylist, LeaseSpec, Provider, Timestamp};

use crate::clock::Clock;
use crate::config::Config;
use crate::ids::{LeaseId, TaskId};

/// One role's outcome.
#[derive(Debug)]
pub struct RoleOutcome {
    pub role: String,
    pub lines: Vec<String>,
    pub passed: bool,
}

/// Run the suite for `roles` (all of the provider's when empty) of the
/// provider `name` in `config`. `expiry_only`: the provider's credentials
/// cannot be revoked, only outlived (the expiry-only suite).
pub async fn run(
    config: &Config,
    name: &str,
    roles: &[String],
    expiry_only: bool,
    clock: Arc<dyn Clock>,
) -> Result<Vec<RoleOutcome>, String> {
    let pc = config.providers.get(name).ok_or_else(|| {
        format!(
            "no provider `{name}` in the configuration (it has: {})",
            config
                .providers
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let now_clock = clock.clone();
    let ctx = BuildContext {
        limits: config.broker_limits(),
        now: Arc::new(move || now_clock.now()),
        denylist: Arc::new(MemoryDenylist::default()),
    };
    let built = pc
        .settings()
        .build(&ctx)
        .map_err(|e| format!("provider `{name}`: {e}"))?;
    let provider = built.provider;
    let all: Vec<String> = pc
        .role_ttls()
        .iter()
        .map(|(r, _)| (*r).to_owned())
        .collect();
    let roles = if roles.is_empty() {
        all.clone()
    } else {
        roles.to_vec()
    };
    if let Some(unknown) = roles.iter().find(|r| !all.contains(r)) {
        return Err(format!(
            "provider `{name}` has no role `{unknown}` (it has: {})",
            all.join(", ")
        ));
    }
    // a plugin starts in the background: its health call waits for it (up
    // to its timeout), so the suite starts with a provider that serves
    if let Err(e) = provider.health().await {
        tracing::warn!(provider = %name, "the provider is not healthy before the suite: {e}");
    }
    let probe = ProviderProbe(provider.clone());
    let specs = Specs {
        clock: clock.clone(),
    };
    let now = move || clock.now();
    let mut out = Vec::new();
    for role in roles {
        let (steps, result) = if expiry_only {
            let r =
                conformance::run_expiry_only(provider.as_ref(), &probe, &specs, &role, &now).await;
            (EXPIRY_ONLY_STEPS, r)
        } else {
            let r = conformance::run(provider.as_ref(), &probe, &specs, &role).await;
            (STEPS, r)
        };
        out.push(outcome(role, steps, result));
    }
    Ok(out)
}

fn outcome(role: String, steps: &[&str], result: Result<Report, Failure>) -> RoleOutcome {
    let (passed, failure) = match result {
        Ok(r) => (r.steps, None),
        Err(f) => (f.passed.clone(), Some(f)),
    };
    let mut lines = Vec::new();
    let mut failed_shown = false;
    for step in steps {
        if passed.contains(step) {
            lines.push(format!("  passed   {step}"));
        } else if let (Some(f), false) = (&failure, failed_shown) {
            failed_shown = true;
            lines.push(format!("  FAILED   {step} (at `{}`): {}", f.step, f.detail));
        } else {
            lines.push(format!("  not run  {step}"));
        }
    }
    RoleOutcome {
        role,
        passed: failure.is_none(),
        lines,
    }
}

/// Lease specs as the broker makes them: real lease ids, the broker's clock.
struct Specs {
    clock: Arc<dyn Clock>,
}

impl SpecFactory for Specs {
    fn spec(&self, role: &str, ttl: Duration) -> LeaseSpec {
        let now = self.clock.now();
        LeaseSpec {
            lease_id: LeaseId::generate(now).to_string(),
            task_id: TaskId::generate(now).to_string(),
            workload: "leasehold-conformance".into(),
            tenant: None,
            on_behalf_of: "conformance@leasehold.invalid".into(),
            role: role.to_owned(),
            scope: Vec::new(),
            issued_at: now,
            expires_at: now.saturating_add(ttl),
            prepared: None,
            binding: None,
        }
    }
}

/// The provider's own check that a credential works at its peer.
struct ProviderProbe(Arc<dyn Provider>);

#[async_trait::async_trait]
impl Probe for ProviderProbe {
    async fn usable(&self, spec: &LeaseSpec, credential: &Credential) -> Result<bool, String> {
        match self.0.probe(spec, credential).await {
            Ok(Some(usable)) => Ok(usable),
            Ok(None) => Err(
                "this provider cannot check its own credentials (it implements no `probe`), \
                 and the suite must use each credential at the peer"
                    .into(),
            ),
            Err(e) => Err(format!("probe: {e}")),
        }
    }
}

/// Revoked token ids, for a token provider built outside the broker.
#[derive(Debug, Default)]
struct MemoryDenylist(Mutex<HashSet<String>>);

#[async_trait::async_trait]
impl Denylist for MemoryDenylist {
    async fn deny(&self, entries: &[(String, Timestamp)]) -> Result<(), String> {
        let mut set = self.0.lock().map_err(|_| "denylist poisoned".to_owned())?;
        set.extend(entries.iter().map(|(j, _)| j.clone()));
        Ok(())
    }

    fn is_denied(&self, jti: &str) -> Result<bool, String> {
        let set = self.0.lock().map_err(|_| "denylist poisoned".to_owned())?;
        Ok(set.contains(jti))
    }
}
