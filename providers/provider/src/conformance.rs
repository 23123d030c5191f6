//! The conformance suite every provider runs against its real peer.
//!
//! issue -> use -> revoke -> verify unusable -> revoke again is a no-op, plus
//! the crash-recovery path (rollback by lease id with the handle lost, and of
//! a lease whose `prepare` ran but whose `issue` never did) and the batch
//! path. Credentials are minted as the broker mints them: `prepare`, its
//! handle kept in the spec, then `issue`. A provider's test supplies a [`Probe`] that really uses a
//! credential at the peer (logs in, introspects, calls the API): a probe that
//! only looks at the broker's own bookkeeping would prove nothing.

use std::time::Duration;

use crate::{Credential, ErrorClass, LeaseSpec, Provider, RevokeSpec};

/// Uses a credential at the provider's peer.
#[async_trait::async_trait]
pub trait Probe: Send + Sync {
    /// `Ok(true)` if the credential works right now, `Ok(false)` if the peer
    /// refuses it, `Err` if the probe itself could not run.
    async fn usable(&self, spec: &LeaseSpec, credential: &Credential) -> Result<bool, String>;
}

/// Makes a fresh, valid lease spec for each step (unique lease ids).
pub trait SpecFactory: Send + Sync {
    fn spec(&self, role: &str, ttl: Duration) -> LeaseSpec;
}

/// The promises [`run`] checks, in order: each name is pushed to
/// [`Report::steps`] once it has passed.
pub const STEPS: &[&str] = &[
    "describe_and_validate",
    "health",
    "issue_and_use",
    "revoke_unusable_idempotent",
    "rollback_of_nothing",
    "rollback_of_prepared",
    "rollback_by_lease_id",
    "revoke_many",
];

/// The promises [`run_expiry_only`] checks, in order.
pub const EXPIRY_ONLY_STEPS: &[&str] = &[
    "issue_and_use",
    "revoke_is_noted_expiry_only",
    "rollback_is_noted_expiry_only",
    "dies_at_expiry",
];

/// What the suite did, for the test to print.
#[derive(Debug, Default)]
pub struct Report {
    pub steps: Vec<&'static str>,
}

/// A broken promise, named by the step that found it.
#[derive(Debug, thiserror::Error)]
#[error("conformance step `{step}` failed: {detail}")]
pub struct Failure {
    pub step: &'static str,
    pub detail: String,
    /// The promises that passed before this failure.
    pub passed: Vec<&'static str>,
}

fn fail(step: &'static str, detail: impl Into<String>) -> Failure {
    Failure {
        step,
        detail: detail.into(),
        passed: Vec::new(),
    }
}

/// The report so far on success, or the failure with what passed before it.
fn finish(result: Result<(), Failure>, report: Report) -> Result<Report, Failure> {
    match result {
        Ok(()) => Ok(report),
        Err(mut f) => {
            f.passed = report.steps;
            Err(f)
        }
    }
}

fn check(cond: bool, step: &'static str, detail: impl Into<String>) -> Result<(), Failure> {
    if cond {
        Ok(())
    } else {
        Err(fail(step, detail))
    }
}

/// What kind of credential a role issues.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The credential carries a secret. A grant does not (an Azure role
    /// assignment: the workload signs in as itself); the suite then checks
    /// that no field is secret-looking instead.
    pub secret: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { secret: true }
    }
}

/// Run the whole suite for one role of `provider`.
pub async fn run(
    provider: &dyn Provider,
    probe: &dyn Probe,
    specs: &dyn SpecFactory,
    role: &str,
) -> Result<Report, Failure> {
    run_with(provider, probe, specs, role, Options::default()).await
}

/// [`run`] for a role whose credential is described by `options`.
pub async fn run_with(
    provider: &dyn Provider,
    probe: &dyn Probe,
    specs: &dyn SpecFactory,
    role: &str,
    options: Options,
) -> Result<Report, Failure> {
    let mut report = Report::default();
    let r = suite(provider, probe, specs, role, options, &mut report).await;
    finish(r, report)
}

async fn suite(
    provider: &dyn Provider,
    probe: &dyn Probe,
    specs: &dyn SpecFactory,
    role: &str,
    options: Options,
    report: &mut Report,
) -> Result<(), Failure> {
    let ttl = Duration::from_secs(120);

    let desc = provider.describe();
    check(
        desc.role(role).is_some(),
        "describe",
        format!("role `{role}` not described"),
    )?;
    match provider.validate("no-such-role-conformance", &[]) {
        Err(e) if e.class == ErrorClass::Invalid => {}
        other => {
            return Err(fail(
                "validate_unknown_role",
                format!("expected Invalid, got {other:?}"),
            ));
        }
    }
    provider
        .validate(role, &[])
        .map_err(|e| fail("validate", e.to_string()))?;
    report.steps.push("describe_and_validate");

    provider
        .health()
        .await
        .map_err(|e| fail("health", e.to_string()))?;
    report.steps.push("health");

    // issue -> use
    let (spec, issued) = mint(provider, specs.spec(role, ttl), "issue").await?;
    check(
        issued.expires_at <= spec.expires_at,
        "issue_expiry",
        format!(
            "credential expires {:?}, after the lease {:?}",
            issued.expires_at, spec.expires_at
        ),
    )?;
    check(
        issued.expires_at > spec.issued_at,
        "issue_expiry",
        "credential already expired",
    )?;
    let dbg = format!("{issued:?}");
    for secret in issued.credential.secret_values() {
        check(!secret.is_empty(), "secret_nonempty", "empty secret")?;
        check(
            !dbg.contains(secret),
            "debug_redacts",
            "Debug output contains a secret",
        )?;
        check(
            !contains(issued.handle.as_bytes(), secret.as_bytes()),
            "handle_has_no_secret",
            "the revocation handle contains secret material",
        )?;
        check(
            !issued.description.contains(secret),
            "description_has_no_secret",
            "description leaks",
        )?;
    }
    check(
        issued.credential.secret_values().next().is_some() == options.secret,
        "issue_has_secret",
        if options.secret {
            "a credential without a secret part"
        } else {
            "a grant with a secret part"
        },
    )?;
    let usable = probe
        .usable(&spec, &issued.credential)
        .await
        .map_err(|e| fail("use", e))?;
    check(
        usable,
        "use",
        "a freshly issued credential does not work at the peer",
    )?;
    report.steps.push("issue_and_use");

    // revoke -> unusable -> revoke again
    let revoke = RevokeSpec::of(&spec, &issued);
    provider
        .revoke(&revoke)
        .await
        .map_err(|e| fail("revoke", e.to_string()))?;
    let usable = probe
        .usable(&spec, &issued.credential)
        .await
        .map_err(|e| fail("use_after_revoke", e))?;
    check(
        !usable,
        "use_after_revoke",
        "the credential still works after revoke",
    )?;
    provider
        .revoke(&revoke)
        .await
        .map_err(|e| fail("revoke_again", e.to_string()))?;
    report.steps.push("revoke_unusable_idempotent");

    // rollback of an intent that never reached the provider
    let never = specs.spec(role, ttl);
    provider
        .rollback(&never)
        .await
        .map_err(|e| fail("rollback_nothing", e.to_string()))?;
    report.steps.push("rollback_of_nothing");

    // crash after the prepared handle was stored, before issue: rollback
    // takes back what prepare made, and again is a no-op
    let mut half = specs.spec(role, ttl);
    half.prepared = provider
        .prepare(&half)
        .await
        .map_err(|e| fail("prepare_only", e.to_string()))?;
    for step in ["rollback_prepared", "rollback_prepared_again"] {
        provider
            .rollback(&half)
            .await
            .map_err(|e| fail(step, e.to_string()))?;
    }
    report.steps.push("rollback_of_prepared");

    // crash between issue and activation: the handle is lost, rollback finds it
    let (lost, orphan) = mint(provider, specs.spec(role, ttl), "issue_orphan").await?;
    let usable = probe
        .usable(&lost, &orphan.credential)
        .await
        .map_err(|e| fail("use_orphan", e))?;
    check(usable, "use_orphan", "credential does not work")?;
    provider
        .rollback(&lost)
        .await
        .map_err(|e| fail("rollback", e.to_string()))?;
    let usable = probe
        .usable(&lost, &orphan.credential)
        .await
        .map_err(|e| fail("use_after_rollback", e))?;
    check(
        !usable,
        "use_after_rollback",
        "the orphaned credential still works after rollback",
    )?;
    provider
        .rollback(&lost)
        .await
        .map_err(|e| fail("rollback_again", e.to_string()))?;
    let revoke_orphan = RevokeSpec::of(&lost, &orphan);
    provider
        .revoke(&revoke_orphan)
        .await
        .map_err(|e| fail("revoke_after_rollback", e.to_string()))?;
    report.steps.push("rollback_by_lease_id");

    // batch revoke
    let mut batch = Vec::new();
    for _ in 0..3 {
        batch.push(mint(provider, specs.spec(role, ttl), "issue_batch").await?);
    }
    let revokes: Vec<RevokeSpec> = batch.iter().map(|(s, i)| RevokeSpec::of(s, i)).collect();
    let results = provider.revoke_many(&revokes).await;
    check(
        results.len() == revokes.len(),
        "revoke_many",
        "one result per lease",
    )?;
    for r in results {
        r.map_err(|e| fail("revoke_many", e.to_string()))?;
    }
    for (s, i) in &batch {
        let usable = probe
            .usable(s, &i.credential)
            .await
            .map_err(|e| fail("use_after_batch", e))?;
        check(
            !usable,
            "use_after_batch",
            "a batch-revoked credential still works",
        )?;
    }
    report.steps.push("revoke_many");

    Ok(())
}

/// The suite for a credential that cannot be revoked, only outlived (an
/// Azure access token). What it proves instead: issue caps the lease at the
/// credential's own death; revoke and rollback succeed *and say* (a note
/// containing "expiry only") that nothing was revoked; the credential is in fact still usable after revoke
/// (so the note is true), and unusable once its expiry has passed. The
/// peer must issue short-lived credentials for the role (seconds), since
/// the suite waits for one to die.
pub async fn run_expiry_only(
    provider: &dyn Provider,
    probe: &dyn Probe,
    specs: &dyn SpecFactory,
    role: &str,
    now: &(dyn Fn() -> crate::Timestamp + Send + Sync),
) -> Result<Report, Failure> {
    let mut report = Report::default();
    let r = expiry_only_suite(provider, probe, specs, role, now, &mut report).await;
    finish(r, report)
}

async fn expiry_only_suite(
    provider: &dyn Provider,
    probe: &dyn Probe,
    specs: &dyn SpecFactory,
    role: &str,
    now: &(dyn Fn() -> crate::Timestamp + Send + Sync),
    report: &mut Report,
) -> Result<(), Failure> {
    let ttl = Duration::from_secs(120);
    provider
        .validate(role, &[])
        .map_err(|e| fail("validate", e.to_string()))?;
    provider
        .health()
        .await
        .map_err(|e| fail("health", e.to_string()))?;
    let (spec, issued) = mint(provider, specs.spec(role, ttl), "issue").await?;
    check(
        issued.expires_at <= spec.expires_at && issued.expires_at > spec.issued_at,
        "issue_expiry",
        "the credential's expiry is not within the lease",
    )?;
    for secret in issued.credential.secret_values() {
        check(
            !contains(issued.handle.as_bytes(), secret.as_bytes())
                && !issued.description.contains(secret),
            "handle_has_no_secret",
            "the handle or description contains the secret",
        )?;
    }
    check(
        probe
            .usable(&spec, &issued.credential)
            .await
            .map_err(|e| fail("use", e))?,
        "use",
        "a freshly issued credential does not work at the peer",
    )?;
    report.steps.push("issue_and_use");

    let revoke = RevokeSpec::of(&spec, &issued);
    let noted = provider
        .revoke_many_noted(std::slice::from_ref(&revoke))
        .await;
    match noted.as_slice() {
        [Ok(Some(note))] if note.contains("expiry only") => {}
        other => {
            return Err(fail(
                "revoke_says_expiry_only",
                format!("expected Ok with a note saying `expiry only`, got {other:?}"),
            ));
        }
    }
    check(
        probe
            .usable(&spec, &issued.credential)
            .await
            .map_err(|e| fail("use_after_revoke", e))?,
        "use_after_revoke",
        "revoke claims expiry only, yet the credential stopped working: say so",
    )?;
    provider
        .revoke(&revoke)
        .await
        .map_err(|e| fail("revoke_again", e.to_string()))?;
    report.steps.push("revoke_is_noted_expiry_only");

    match provider.rollback_noted(&specs.spec(role, ttl)).await {
        Ok(Some(note)) if note.contains("expiry only") => {}
        other => {
            return Err(fail(
                "rollback_says_expiry_only",
                format!("expected Ok with a note, got {other:?}"),
            ));
        }
    }
    report.steps.push("rollback_is_noted_expiry_only");

    let wait = now().until(issued.expires_at) + Duration::from_secs(1);
    check(
        wait <= Duration::from_secs(60),
        "expiry",
        format!("the peer's credential lives {wait:?}: configure it to live seconds"),
    )?;
    tokio::time::sleep(wait).await;
    check(
        !probe
            .usable(&spec, &issued.credential)
            .await
            .map_err(|e| fail("use_after_expiry", e))?,
        "use_after_expiry",
        "the credential still works after its expiry",
    )?;
    report.steps.push("dies_at_expiry");
    Ok(())
}

/// Mint as the broker does: `prepare`, the handle stored into the spec, then
/// `issue` with it.
async fn mint(
    provider: &dyn Provider,
    mut spec: LeaseSpec,
    step: &'static str,
) -> Result<(LeaseSpec, crate::Issued), Failure> {
    spec.prepared = provider
        .prepare(&spec)
        .await
        .map_err(|e| fail(step, format!("prepare: {e}")))?;
    let issued = provider
        .issue(&spec)
        .await
        .map_err(|e| fail(step, e.to_string()))?;
    Ok((spec, issued))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
