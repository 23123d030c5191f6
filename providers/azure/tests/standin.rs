//! The Azure provider against its peers: Entra's token endpoint
//! (oauth2-mock-server over HTTPS) and the ARM/Graph stand-in
//! (integration/azure-standin). "Usable" is proven at the peers: a role
//! assignment by the workload signing in as itself and reading its
//! permissions at the scope from ARM, a password by signing in with it at
//! the token endpoint, an access token by the storage stand-in accepting it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use leasehold_azure_standin::{self as standin, Peers};
use leasehold_provider::conformance::{self, Options, Probe, SpecFactory};
use leasehold_provider::{Credential, ErrorClass, LeaseSpec, Provider, RevokeSpec, Timestamp};
use leasehold_provider_azure::{AzureAuth, AzureConfig, AzureProvider, assignment_name};

fn now() -> Timestamp {
    let ms = std::time::UNIX_EPOCH.elapsed().unwrap().as_millis() as i64;
    Timestamp::from_unix_millis(ms)
}

static N: AtomicU64 = AtomicU64::new(0);

/// Workload ids, mapped to the stand-in's four workload principals.
fn workload(i: usize) -> String {
    format!("test:assistant-{i}")
}

fn spec(role: &str, ttl: Duration, scope: &[&str]) -> LeaseSpec {
    let n = N.fetch_add(1, Ordering::Relaxed);
    let now = now();
    LeaseSpec {
        lease_id: format!("lease_{:026}", now.unix_millis() as u64 * 1000 + n),
        task_id: "task_01jdq3example".into(),
        workload: workload(0),
        tenant: None,
        on_behalf_of: "alice@example.com".into(),
        role: role.into(),
        scope: scope.iter().map(|s| (*s).to_owned()).collect(),
        issued_at: now,
        expires_at: now.saturating_add(ttl),
        prepared: None,
        binding: None,
    }
}

/// Azure holds one assignment per principal, role and scope, so leases
/// that live at once (the suite's batch) go to different workloads.
struct Specs;
impl SpecFactory for Specs {
    fn spec(&self, role: &str, ttl: Duration) -> LeaseSpec {
        let mut s = spec(role, ttl, &[]);
        s.workload = workload(N.load(Ordering::Relaxed) as usize % 4);
        s
    }
}

/// The stand-in's config for these peers (see `Peers::provider_toml`).
fn config(p: &Peers, dir: &std::path::Path) -> AzureConfig {
    toml::from_str(&p.provider_toml(&dir.join("client-secret"))).unwrap()
}

struct Env {
    peers: Peers,
    dir: tempfile::TempDir,
}

impl Env {
    async fn start() -> Self {
        Self {
            peers: Peers::start().await,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn config(&self) -> AzureConfig {
        config(&self.peers, self.dir.path())
    }

    fn provider(&self) -> AzureProvider {
        AzureProvider::new(self.config(), 86_400).unwrap()
    }
}

/// The workload signs in as itself and asks ARM what it may do at the
/// lease's scope.
struct AssignmentProbe<'a>(&'a Peers);

#[async_trait::async_trait]
impl Probe for AssignmentProbe<'_> {
    async fn usable(&self, spec: &LeaseSpec, credential: &Credential) -> Result<bool, String> {
        let i = (0..4)
            .find(|i| spec.workload == workload(*i))
            .ok_or("unknown workload")?;
        let w = &self.0.workloads[i];
        let token = self
            .0
            .login(
                &w.client_id,
                &w.secret,
                "https://management.azure.com/.default",
            )
            .await
            .map_err(|e| format!("workload sign-in: {e:?}"))?;
        let scope = credential
            .expose("scope")
            .ok_or("no scope in the credential")?;
        let actions = self
            .0
            .permissions(&token, scope)
            .await
            .map_err(|s| format!("ARM permissions answered {s}"))?;
        Ok(actions.iter().any(|a| a == "*/read"))
    }
}

/// Sign in with the leased password at the token endpoint.
struct PasswordProbe<'a>(&'a Peers);

#[async_trait::async_trait]
impl Probe for PasswordProbe<'_> {
    async fn usable(&self, _spec: &LeaseSpec, credential: &Credential) -> Result<bool, String> {
        let client = credential.expose("client_id").ok_or("no client_id")?;
        let secret = credential
            .expose("client_secret")
            .ok_or("no client_secret")?;
        match self
            .0
            .login(client, secret, "https://graph.microsoft.com/.default")
            .await
        {
            Ok(_) => Ok(true),
            Err((401, body)) if body.contains("AADSTS7000215") => Ok(false),
            Err(e) => Err(format!("unexpected sign-in answer {e:?}")),
        }
    }
}

/// Present the leased token to the storage stand-in.
struct TokenProbe<'a>(&'a Peers);

#[async_trait::async_trait]
impl Probe for TokenProbe<'_> {
    async fn usable(&self, _spec: &LeaseSpec, credential: &Credential) -> Result<bool, String> {
        self.0
            .storage_accepts(credential.expose("access_token").ok_or("no access_token")?)
            .await
    }
}

#[tokio::test]
async fn role_assignment_conformance() {
    let env = Env::start().await;
    let p = env.provider();
    let report = conformance::run_with(
        &p,
        &AssignmentProbe(&env.peers),
        &Specs,
        "fixed",
        Options { secret: false },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\ntoken endpoint log: {}", env.peers.token_log()));
    assert_eq!(report.steps.len(), 8, "{:?}", report.steps);
    // only the broker's own grant is left
    let left = env.peers.assignments();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].3, env.peers.broker.object_id);
}

#[tokio::test]
async fn app_password_conformance() {
    let env = Env::start().await;
    let p = env.provider();
    let report = conformance::run(&p, &PasswordProbe(&env.peers), &Specs, "app")
        .await
        .unwrap_or_else(|e| panic!("{e}\ntoken endpoint log: {}", env.peers.token_log()));
    assert_eq!(report.steps.len(), 8, "{:?}", report.steps);
    assert!(
        env.peers.passwords().is_empty(),
        "{:?}",
        env.peers.passwords()
    );
}

#[tokio::test]
async fn access_token_conformance_is_expiry_only() {
    let env = Env::start().await;
    // tokens for storage live 4 s here, so the suite can watch one die
    env.peers.token_lifetime(standin::STORAGE_AUDIENCE, 4);
    let p = env.provider();
    let report = conformance::run_expiry_only(&p, &TokenProbe(&env.peers), &Specs, "storage", &now)
        .await
        .unwrap_or_else(|e| panic!("{e}\ntoken endpoint log: {}", env.peers.token_log()));
    assert_eq!(report.steps.len(), 4, "{:?}", report.steps);

    // the lease is capped at the token's lifetime, and says it cannot be revoked
    let s = spec("storage", Duration::from_secs(3600), &[]);
    let issued = p.issue(&s).await.unwrap();
    assert!(issued.expires_at.unix_millis() <= now().unix_millis() + 4_000);
    assert!(
        issued.description.contains("cannot be revoked"),
        "{}",
        issued.description
    );
}

#[tokio::test]
async fn a_password_ends_exactly_when_its_lease_does() {
    let env = Env::start().await;
    let p = env.provider();
    let mut s = spec("app", Duration::from_secs(600), &[]);
    s.expires_at = Timestamp::from_unix_millis(s.expires_at.unix_millis() / 1000 * 1000 + 700);
    let issued = p.issue(&s).await.unwrap();
    // whole seconds, rounded down: never after the lease
    let want = s.expires_at.unix_seconds();
    assert_eq!(issued.expires_at.unix_millis(), want * 1000);
    let listed = env.peers.passwords();
    assert_eq!(listed.len(), 1);
    let end =
        time::OffsetDateTime::parse(&listed[0].2, &time::format_description::well_known::Rfc3339)
            .unwrap();
    assert_eq!(
        end.unix_timestamp(),
        want,
        "Graph's endDateTime {}",
        listed[0].2
    );
    assert!(
        listed[0]
            .1
            .as_deref()
            .is_some_and(|n| n.starts_with(&format!("leasehold lease {}", s.lease_id))),
        "{listed:?}"
    );
    assert_eq!(
        issued.credential.expose("tenant_id"),
        Some(env.peers.tenant_id.as_str())
    );
    assert_eq!(
        issued.credential.expose("client_id"),
        Some(env.peers.app_client_id.as_str())
    );
}

#[tokio::test]
async fn revoke_after_out_of_band_deletion_is_idempotent() {
    let env = Env::start().await;
    let p = env.provider();

    let s = spec("reader", Duration::from_secs(600), &["rg-reports"]);
    let issued = p.issue(&s).await.unwrap();
    let rg = env.peers.resource_group("rg-reports");
    assert!(
        env.peers
            .unassign(&rg, &assignment_name(&s.lease_id, "reader"))
    );
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();

    let s = spec("app", Duration::from_secs(600), &[]);
    let issued = p.issue(&s).await.unwrap();
    let key = issued.credential.expose("key_id").unwrap().to_owned();
    assert!(env.peers.remove_password(&key));
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    // Graph answered 404 Request_ResourceNotFound to the second removal
    let removals: Vec<u16> = env
        .peers
        .seen()
        .iter()
        .filter(|r| r.path.ends_with("/removePassword"))
        .map(|r| r.status)
        .collect();
    assert_eq!(removals, vec![404]);
}

#[tokio::test]
async fn throttling_is_waited_out_as_retry_after_asks() {
    let env = Env::start().await;
    let p = env.provider();
    // warm the token cache so only the Graph calls are timed
    p.health().await.unwrap();

    env.peers.throttle(2, "1");
    let started = Instant::now();
    let s = spec("app", Duration::from_secs(600), &[]);
    p.issue(&s).await.unwrap();
    let adds: Vec<_> = env
        .peers
        .seen()
        .into_iter()
        .filter(|r| r.path.ends_with("/addPassword"))
        .collect();
    assert_eq!(
        adds.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![429, 429, 200]
    );
    for pair in adds.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_secs(1),
            "retried after {gap:?}, Retry-After was 1 s"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));

    // more throttling than attempts: retryable, so the broker answers 503
    env.peers.throttle(3, "0");
    let e = p
        .issue(&spec("app", Duration::from_secs(600), &[]))
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
    assert!(e.message.contains("429"), "{e}");

    // a wait longer than max_retry_after_seconds is not waited out
    env.peers.throttle(1, "120");
    let started = Instant::now();
    let e = p
        .issue(&spec("app", Duration::from_secs(600), &[]))
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
    assert!(e.message.contains("retry after 120 s"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        env.peers.passwords().len(),
        1,
        "only the first issue made a password"
    );
}

#[tokio::test]
async fn token_endpoint_down_is_retryable_at_issue_and_revoke() {
    let mut env = Env::start().await;
    let p = env.provider();
    let s = spec("app", Duration::from_secs(600), &[]);
    let issued = p.issue(&s).await.unwrap();

    env.peers.stop_token_endpoint();
    // a provider with no cached token: Entra is needed and unreachable
    let fresh = env.provider();
    let e = fresh
        .issue(&spec("app", Duration::from_secs(600), &[]))
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
    assert!(e.message.contains("Entra ID"), "{e}");
    let e = fresh
        .revoke(&RevokeSpec::of(&s, &issued))
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
    let e = fresh.health().await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
    assert_eq!(env.peers.passwords().len(), 1);

    // back up: the retried revoke lands
    env.peers.restart_token_endpoint().await;
    fresh.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    assert!(env.peers.passwords().is_empty());
    assert!(
        !PasswordProbe(&env.peers)
            .usable(&s, &issued.credential)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn a_scope_outside_the_template_is_refused_before_anything_is_made() {
    let env = Env::start().await;
    let p = env.provider();
    for bad in [
        vec!["rg-other"],
        vec!["rg-team-a/../../rg-other"],
        vec!["rg-reports", "rg-team-a"],
        vec![],
    ] {
        let scope: Vec<String> = bad.iter().map(|s| (*s).to_owned()).collect();
        let e = p.validate("reader", &scope).unwrap_err();
        assert_eq!(e.class, ErrorClass::Invalid, "{bad:?}: {e}");
        let e = p
            .issue(&spec("reader", Duration::from_secs(60), &bad))
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Invalid, "{bad:?}: {e}");
    }
    assert!(p.validate("reader", &["rg-team-blue".into()]).is_ok());
    let e = p.validate("app", &["x".into()]).unwrap_err();
    assert_eq!(e.class, ErrorClass::Invalid);
    let e = p.validate("nope", &[]).unwrap_err();
    assert_eq!(e.class, ErrorClass::Invalid);
    assert_eq!(
        env.peers.assignments().len(),
        1,
        "only the broker's own grant"
    );
}

#[tokio::test]
async fn an_existing_assignment_is_a_conflict_and_is_never_taken_over() {
    let env = Env::start().await;
    let p = env.provider();
    let rg = env.peers.resource_group("rg-reports");
    let reader = env.peers.role_definition(standin::READER);

    // 1. the lease's name is taken, by an assignment for another principal
    let s = spec("reader", Duration::from_secs(600), &["rg-reports"]);
    let name = assignment_name(&s.lease_id, "reader");
    env.peers
        .assign(&rg, &name, &reader, &env.peers.workloads[1].object_id);
    let e = p.issue(&s).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert!(e.message.contains("conflict"), "{e}");
    p.rollback(&s).await.unwrap();
    assert!(
        env.peers.assignments().iter().any(|a| a.1 == name),
        "rollback deleted an assignment that was not the lease's"
    );

    // 2. the workload already holds this role here under another name
    let standing = "0b3a5d3c-1111-4e2a-9a51-7f3c2b1e0d9f";
    env.peers
        .assign(&rg, standing, &reader, &env.peers.workloads[0].object_id);
    let s = spec("reader", Duration::from_secs(600), &["rg-reports"]);
    let e = p.issue(&s).await.unwrap_err();
    assert!(e.message.contains("RoleAssignmentExists"), "{e}");
    p.rollback(&s).await.unwrap();
    let left: Vec<String> = env.peers.assignments().into_iter().map(|a| a.1).collect();
    assert!(
        left.contains(&standing.to_owned()) && left.contains(&name),
        "{left:?}"
    );
    assert_eq!(left.len(), 3, "nothing was created: {left:?}");
}

#[tokio::test]
async fn issue_waits_until_the_assignment_reads_back() {
    let env = Env::start().await;
    let p = env.provider();
    env.peers.propagation_delay(Duration::from_millis(1500));
    let s = spec("reader", Duration::from_secs(600), &["rg-reports"]);
    let started = Instant::now();
    let issued = p.issue(&s).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(
        AssignmentProbe(&env.peers)
            .usable(&s, &issued.credential)
            .await
            .unwrap(),
        "returned before the assignment took effect"
    );
    assert!(
        issued.description.contains("may take minutes"),
        "{}",
        issued.description
    );

    // never readable within propagation_timeout_seconds: retryable, and deleted
    env.peers.propagation_delay(Duration::from_secs(60));
    let s = spec("reader", Duration::from_secs(600), &["rg-team-x"]);
    let e = p.issue(&s).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
    let name = assignment_name(&s.lease_id, "reader");
    assert!(!env.peers.assignments().iter().any(|a| a.1 == name));
}

#[tokio::test]
async fn a_workload_signed_in_through_entra_is_its_own_principal() {
    let env = Env::start().await;
    let p = env.provider();
    let mut s = spec("reader", Duration::from_secs(600), &["rg-reports"]);
    s.workload = format!("entra:{}", env.peers.workloads[1].object_id);
    p.issue(&s).await.unwrap();
    let name = assignment_name(&s.lease_id, "reader");
    let a = env
        .peers
        .assignments()
        .into_iter()
        .find(|a| a.1 == name)
        .unwrap();
    assert_eq!(a.3, env.peers.workloads[1].object_id);

    // and a workload with no principal gets nothing
    let mut s = spec("reader", Duration::from_secs(600), &["rg-reports"]);
    s.workload = "test:stranger".into();
    let e = p.issue(&s).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Invalid, "{e}");
}

#[tokio::test]
async fn a_refused_sign_in_is_permanent_and_says_why() {
    let env = Env::start().await;
    // wrong secret
    let mut c = env.config();
    let bad = env.dir.path().join("wrong-secret");
    std::fs::write(&bad, "not-the-secret").unwrap();
    c.auth = AzureAuth::ClientSecret {
        client_id: env.peers.broker.client_id.clone(),
        client_secret_file: bad,
    };
    let e = AzureProvider::new(c, 86_400)
        .unwrap()
        .health()
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert!(e.message.contains("AADSTS7000215"), "{e}");
    assert!(!e.message.contains("not-the-secret"), "{e}");
    // a tenant Entra does not know
    let mut c = env.config();
    c.tenant_id = "9f0e8d7c-6b5a-4938-8271-605f4e3d2c1b".into();
    let e = AzureProvider::new(c, 86_400)
        .unwrap()
        .health()
        .await
        .unwrap_err();
    assert!(e.message.contains("AADSTS90002"), "{e}");
    // an empty secret file is a config error, before any call
    let mut c = env.config();
    let empty = env.dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    c.auth = AzureAuth::ClientSecret {
        client_id: env.peers.broker.client_id.clone(),
        client_secret_file: empty,
    };
    let e = AzureProvider::new(c, 86_400).unwrap_err();
    assert_eq!(e.field, "auth.client_secret_file");
}

/// An unsigned JWT naming `iss` and `sub`, as a projected service-account
/// token file would hold (the stand-in checks who it names, not its
/// signature).
fn assertion(iss: &str, sub: &str) -> String {
    use base64::Engine as _;
    let b = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap())
    };
    let exp = now().unix_seconds() + 3600;
    format!(
        "{}.{}.c2ln",
        b(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
        b(
            serde_json::json!({"iss": iss, "sub": sub, "aud": "api://AzureADTokenExchange", "exp": exp})
        )
    )
}

#[tokio::test]
async fn workload_identity_federation_signs_in_with_a_token_file() {
    let env = Env::start().await;
    let (iss, sub) = ("https://k8s.test", "system:serviceaccount:ai:leasehold");
    env.peers.federate(&env.peers.broker.client_id, iss, sub);
    let token_file = env.dir.path().join("sa-token");
    std::fs::write(&token_file, assertion(iss, sub)).unwrap();
    let mut c = env.config();
    c.auth = AzureAuth::WorkloadIdentity {
        client_id: env.peers.broker.client_id.clone(),
        token_file: token_file.clone(),
    };
    let p = AzureProvider::new(c.clone(), 86_400).unwrap();
    p.health().await.unwrap();
    let s = spec("app", Duration::from_secs(600), &[]);
    let issued = p.issue(&s).await.unwrap();
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();

    // an assertion for another subject is refused
    std::fs::write(
        &token_file,
        assertion(iss, "system:serviceaccount:ai:other"),
    )
    .unwrap();
    let e = AzureProvider::new(c, 86_400)
        .unwrap()
        .health()
        .await
        .unwrap_err();
    assert!(e.message.contains("AADSTS700213"), "{e}");
}

#[tokio::test]
async fn inventory_finds_what_carries_a_lease_mark_and_remove_takes_only_that() {
    let env = Env::start().await;
    let p = env.provider();
    let ra = spec("reader", Duration::from_secs(600), &["rg-reports"]);
    p.issue(&ra).await.unwrap();
    let pw = spec("app", Duration::from_secs(600), &[]);
    p.issue(&pw).await.unwrap();
    // someone else's assignment, no mark
    let rg = env.peers.resource_group("rg-team-x");
    let theirs = "7d3c9b1a-2222-4e2a-9a51-7f3c2b1e0d9f";
    let reader = env.peers.role_definition(standin::READER);
    env.peers
        .assign(&rg, theirs, &reader, &env.peers.workloads[2].object_id);

    let found = p.inventory().await.unwrap().unwrap();
    let mut leases: Vec<&str> = found.iter().filter_map(|f| f.lease_id.as_deref()).collect();
    leases.sort_unstable();
    let mut want = vec![ra.lease_id.as_str(), pw.lease_id.as_str()];
    want.sort_unstable();
    assert_eq!(leases, want, "{found:?}");
    for f in &found {
        p.remove(f).await.unwrap();
        p.remove(f).await.unwrap();
    }
    assert!(p.inventory().await.unwrap().unwrap().is_empty());
    assert!(env.peers.passwords().is_empty());
    assert_eq!(
        env.peers.assignments().len(),
        2,
        "the broker's grant and theirs stay"
    );

    // a Found naming an object without the lease's mark removes nothing
    let forged = leasehold_provider::Found {
        name: format!(
            "role_assignment {rg}/providers/Microsoft.Authorization/roleAssignments/{theirs}"
        ),
        lease_id: Some(ra.lease_id.clone()),
    };
    p.remove(&forged).await.unwrap();
    assert!(env.peers.assignments().iter().any(|a| a.1 == theirs));
    let e = p
        .remove(&leasehold_provider::Found {
            name: "something".into(),
            lease_id: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Invalid);
}

#[tokio::test]
async fn revoke_also_takes_a_password_a_retried_add_left_behind() {
    let env = Env::start().await;
    let p = env.provider();
    let s = spec("app", Duration::from_secs(600), &[]);
    // the same lease's password added twice (a retry after a lost answer)
    let first = p.issue(&s).await.unwrap();
    let second = p.issue(&s).await.unwrap();
    assert_eq!(env.peers.passwords().len(), 2);
    p.revoke(&RevokeSpec::of(&s, &second)).await.unwrap();
    assert!(
        env.peers.passwords().is_empty(),
        "{:?}",
        env.peers.passwords()
    );
    assert!(
        !PasswordProbe(&env.peers)
            .usable(&s, &first.credential)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn a_batch_revoke_answers_each_lease_in_its_place() {
    let env = Env::start().await;
    let p = env.provider();
    let mut revokes = Vec::new();
    for _ in 0..10 {
        let s = spec("app", Duration::from_secs(600), &[]);
        let issued = p.issue(&s).await.unwrap();
        revokes.push(RevokeSpec::of(&s, &issued));
    }
    // an unreadable handle fails alone, in its place
    let mut broken = revokes[3].clone();
    broken.handle = leasehold_provider::RevocationHandle::new(b"not json".to_vec());
    revokes.insert(3, broken);
    let results = p.revoke_many_noted(&revokes).await;
    assert_eq!(results.len(), 11);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.is_err(), i == 3, "{i}: {r:?}");
    }
    assert!(env.peers.passwords().is_empty());
}
