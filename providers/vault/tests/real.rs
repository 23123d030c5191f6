//! The Vault provider against a real OpenBao server whose database secrets
//! engine mints roles in a real PostgreSQL server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use leasehold_provider::conformance::{self, Probe, SpecFactory};
use leasehold_provider::{
    Credential, ErrorClass, Issued, LeaseSpec, Provider, RevokeSpec, Timestamp,
};
use leasehold_provider_postgres::testkit::{Cluster, DATABASE, MANAGER};
use leasehold_provider_vault::testkit::Bao;
use leasehold_provider_vault::{AuthConfig, Kind, VaultConfig, VaultProvider, VaultRole};
use reqwest::Method;
use serde_json::json;

fn now() -> Timestamp {
    let ms = std::time::UNIX_EPOCH
        .elapsed()
        .map(|d| d.as_millis() as i64)
        .unwrap();
    Timestamp::from_unix_millis(ms)
}

static N: AtomicU64 = AtomicU64::new(0);

fn spec(role: &str, ttl: Duration) -> LeaseSpec {
    let n = N.fetch_add(1, Ordering::Relaxed);
    let now = now();
    LeaseSpec {
        lease_id: format!("lease_{:026}", now.unix_millis() as u64 * 1000 + n),
        task_id: "task_test".into(),
        workload: "dev:assistant-a".into(),
        tenant: Some("dev".into()),
        on_behalf_of: "alice@example.com".into(),
        role: role.into(),
        scope: vec![],
        issued_at: now,
        expires_at: now.saturating_add(ttl),
        prepared: None,
        binding: None,
    }
}

struct Specs;
impl SpecFactory for Specs {
    fn spec(&self, role: &str, ttl: Duration) -> LeaseSpec {
        spec(role, ttl)
    }
}

fn role(path: &str, kind: Kind) -> VaultRole {
    VaultRole {
        path: path.into(),
        kind,
        max_ttl_seconds: 3600,
        scopes: vec![],
        public_fields: vec!["username".into()],
        description: String::new(),
    }
}

struct Env {
    pg: Cluster,
    bao: Bao,
    dir: tempfile::TempDir,
}

impl Env {
    /// PostgreSQL, and an OpenBao whose `database` engine has role `ro`
    /// (upstream TTL `default_ttl`), a KV v2 mount `secret` and a KV v1
    /// mount `kv`, and the broker's policies, token role and token.
    async fn start(bao: Bao, default_ttl: &str) -> (Self, String) {
        let pg = Cluster::start();
        pg.provision().await;
        let pw = std::fs::read_to_string(pg.manager_password_file()).unwrap();
        bao.database_setup("database", pg.port, MANAGER, &pw, DATABASE, default_ttl)
            .await;
        bao.ok(
            Method::POST,
            "sys/mounts/kv",
            Some(json!({"type": "kv", "options": {"version": "1"}})),
        )
        .await;
        // dev servers have KV v2 at `secret/`; others get it here
        if bao.api(Method::GET, "sys/mounts/secret", None).await.0 != 200 {
            bao.ok(
                Method::POST,
                "sys/mounts/secret",
                Some(json!({"type": "kv", "options": {"version": "2"}})),
            )
            .await;
        }
        // a fresh KV v2 mount refuses writes until it has set itself up
        let mut written = false;
        for _ in 0..100 {
            let body = json!({"data": {"api_key": "k-123", "username": "svc"}});
            if bao.api(Method::POST, "secret/data/app", Some(body)).await.0 == 200 {
                written = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(written, "KV v2 write: {}", bao.log());
        bao.ok(Method::POST, "kv/plain", Some(json!({"password": "p"})))
            .await;
        let token = bao.broker_setup(&["database", "secret", "kv"], "1h").await;
        let dir = tempfile::tempdir().unwrap();
        (Self { pg, bao, dir }, token)
    }

    fn token_file(&self, token: &str) -> std::path::PathBuf {
        let f = self.dir.path().join("token");
        std::fs::write(&f, format!("{token}\n")).unwrap();
        f
    }

    fn config(&self, auth: AuthConfig) -> VaultConfig {
        let mut c = self.bao.provider_config(auth);
        c.roles
            .insert("nope".into(), role("database/creds/nope", Kind::Dynamic));
        c.roles
            .insert("nomount".into(), role("nomount/creds/x", Kind::Dynamic));
        c.roles
            .insert("denied".into(), role("sys/mounts", Kind::Dynamic));
        c.roles
            .insert("static-as-dynamic".into(), role("kv/plain", Kind::Dynamic));
        c.roles
            .insert("app".into(), role("secret/data/app", Kind::Kv2));
        c.roles.insert("plain".into(), role("kv/plain", Kind::Kv1));
        c
    }

    async fn provider(&self, token: &str) -> VaultProvider {
        let f = self.token_file(token);
        VaultProvider::new(self.config(AuthConfig::Token { token_file: f }), 3600).unwrap()
    }

    async fn role_exists(&self, name: &str) -> bool {
        let su = self.pg.superuser("postgres").await;
        su.query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
            .await
            .unwrap()
            .is_some()
    }

    /// Wait (up to `secs`) until the role is gone.
    async fn role_gone_within(&self, name: &str, secs: u64) -> bool {
        for _ in 0..secs * 10 {
            if !self.role_exists(name).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

struct Login<'a>(&'a Cluster);

#[async_trait::async_trait]
impl Probe for Login<'_> {
    async fn usable(&self, _: &LeaseSpec, cred: &Credential) -> Result<bool, String> {
        let (user, pw) = (
            cred.expose("username").unwrap(),
            cred.expose("password").unwrap(),
        );
        match self.0.connect(user, pw, DATABASE).await {
            Ok(c) => {
                c.query_one("SELECT 1", &[])
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(true)
            }
            Err(e) => match e.code() {
                // invalid_password, invalid_authorization_specification
                Some(s) if s.code() == "28P01" || s.code() == "28000" => Ok(false),
                _ => Err(format!("login failed for another reason: {e}")),
            },
        }
    }
}

async fn mint(p: &VaultProvider, mut s: LeaseSpec) -> (LeaseSpec, Issued) {
    s.prepared = p.prepare(&s).await.unwrap();
    let i = p.issue(&s).await.unwrap();
    (s, i)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_against_real_openbao_and_postgres() {
    let (env, token) = Env::start(Bao::dev(), "1h").await;
    let p = env.provider(&token).await;
    let report = conformance::run(&p, &Login(&env.pg), &Specs, "ro")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", env.bao.log()));
    assert_eq!(report.steps.len(), 8, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_the_upstream_lease_and_the_database_role() {
    let (env, token) = Env::start(Bao::dev(), "1h").await;
    let p = env.provider(&token).await;
    let (s, issued) = mint(&p, spec("ro", Duration::from_secs(300))).await;
    let user = issued.credential.expose("username").unwrap().to_owned();
    let lease = VaultProvider::upstream_lease_id(&issued.handle).unwrap();
    assert!(lease.starts_with("database/creds/ro/"), "{lease}");
    assert!(p.upstream_lease_exists(&lease).await.unwrap());
    assert!(env.role_exists(&user).await);
    assert!(Login(&env.pg).usable(&s, &issued.credential).await.unwrap());
    // the description names no secret and says how it is revoked
    assert!(
        issued.description.contains("sys/leases/revoke"),
        "{}",
        issued.description
    );
    assert!(!issued.description.contains(&lease));

    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    // synchronous: by the time revoke returns, both are gone
    assert!(!p.upstream_lease_exists(&lease).await.unwrap());
    assert!(
        !env.role_exists(&user).await,
        "the database role outlived revoke"
    );
    assert!(!Login(&env.pg).usable(&s, &issued.credential).await.unwrap());
    // the per-lease token is gone too
    let (code, _) = env
        .bao
        .api(
            Method::POST,
            "auth/token/lookup",
            Some(json!({"token": lease_token_of(&issued)})),
        )
        .await;
    assert_eq!(code, 403, "the lease token outlived revoke");
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
}

/// The per-lease token, read from the handle the way the broker would hand
/// it back (tests only: the handle is sealed at rest in the broker).
fn lease_token_of(i: &Issued) -> String {
    let v: serde_json::Value = serde_json::from_slice(i.handle.as_bytes()).unwrap();
    v["token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_finds_the_lease_through_the_prepared_token() {
    let (env, token) = Env::start(Bao::dev(), "1h").await;
    let p = env.provider(&token).await;
    // the broker crashed after issue: it has only the prepared handle
    let (s, issued) = mint(&p, spec("ro", Duration::from_secs(300))).await;
    let user = issued.credential.expose("username").unwrap().to_owned();
    let lease = VaultProvider::upstream_lease_id(&issued.handle).unwrap();
    p.rollback(&s).await.unwrap();
    assert!(!p.upstream_lease_exists(&lease).await.unwrap());
    assert!(
        !env.role_exists(&user).await,
        "rollback left the database role"
    );
    p.rollback(&s).await.unwrap();
    // the prepared handle handed to revoke (a job claimed an issuing lease)
    let (s2, issued2) = mint(&p, spec("ro", Duration::from_secs(300))).await;
    let lease2 = VaultProvider::upstream_lease_id(&issued2.handle).unwrap();
    let as_revoke = RevokeSpec {
        handle: s2.prepared.clone().unwrap(),
        ..RevokeSpec::of(&s2, &issued2)
    };
    p.revoke(&as_revoke).await.unwrap();
    assert!(!p.upstream_lease_exists(&lease2).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_lease_never_outlives_the_broker_deadline() {
    // upstream TTL 40 s, shorter than the broker's 300 s: the lease is capped
    let (env, token) = Env::start(Bao::dev(), "40s").await;
    let p = env.provider(&token).await;
    let (s, issued) = mint(&p, spec("ro", Duration::from_secs(300))).await;
    assert_eq!(
        issued.expires_at,
        s.issued_at.saturating_add(Duration::from_secs(40))
    );
    assert!(
        issued.description.contains("caps this lease"),
        "{}",
        issued.description
    );
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();

    // upstream TTL 40 s, longer than a 3 s broker lease: with the broker
    // gone, the lease token's end takes the upstream lease with it
    let (s, issued) = mint(&p, spec("ro", Duration::from_secs(3))).await;
    assert_eq!(issued.expires_at, s.expires_at);
    let user = issued.credential.expose("username").unwrap().to_owned();
    let lease = VaultProvider::upstream_lease_id(&issued.handle).unwrap();
    assert!(env.role_exists(&user).await);
    assert!(
        env.role_gone_within(&user, 15).await,
        "the upstream lease outlived the broker's deadline without the broker"
    );
    assert!(!p.upstream_lease_exists(&lease).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_paths_and_responses_issue_nothing() {
    let (env, token) = Env::start(Bao::dev(), "1h").await;
    let p = env.provider(&token).await;
    let tokens_before = lease_tokens(&env.bao).await;
    for (r, class, words) in [
        ("nope", ErrorClass::Permanent, "unknown role"),
        ("nomount", ErrorClass::Permanent, "403"),
        ("denied", ErrorClass::Permanent, "permission denied"),
        (
            "static-as-dynamic",
            ErrorClass::Permanent,
            "without a lease id",
        ),
    ] {
        let mut s = spec(r, Duration::from_secs(60));
        s.prepared = p.prepare(&s).await.unwrap();
        let e = p.issue(&s).await.unwrap_err();
        assert_eq!(e.class, class, "{r}: {e}");
        assert!(e.message.contains(words), "{r}: {e}");
        // what prepare made is gone, and a rollback is a no-op
        p.rollback(&s).await.unwrap();
    }
    assert_eq!(
        lease_tokens(&env.bao).await,
        tokens_before,
        "a failed issue left a lease token behind"
    );
    // unknown role and bad scope never reach the upstream
    assert_eq!(
        p.validate("missing", &[]).unwrap_err().class,
        ErrorClass::Invalid
    );
    assert_eq!(
        p.validate("ro", &["x".into()]).unwrap_err().class,
        ErrorClass::Invalid
    );
}

/// Live tokens created by the lease token role (root can list accessors).
async fn lease_tokens(bao: &Bao) -> usize {
    let (_, v) = bao
        .api(
            Method::from_bytes(b"LIST").unwrap(),
            "auth/token/accessors",
            None,
        )
        .await;
    let mut n = 0;
    for a in v["data"]["keys"].as_array().unwrap() {
        let (code, t) = bao
            .api(
                Method::POST,
                "auth/token/lookup-accessor",
                Some(json!({"accessor": a})),
            )
            .await;
        if code == 200 && t["data"]["role"] == "leasehold-lease" {
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_kv_reads_are_leased_with_the_limitation_stated() {
    let (env, token) = Env::start(Bao::dev(), "1h").await;
    let p = env.provider(&token).await;
    let s = spec("app", Duration::from_secs(60));
    assert!(p.prepare(&s).await.unwrap().is_none());
    let i = p.issue(&s).await.unwrap();
    assert_eq!(i.credential.expose("api_key"), Some("k-123"));
    assert!(i.credential.secret_values().any(|v| v == "k-123"));
    assert!(
        !i.credential.secret_values().any(|v| v == "svc"),
        "username is public"
    );
    assert!(
        i.description.contains("nothing to revoke upstream"),
        "{}",
        i.description
    );
    p.revoke(&RevokeSpec::of(&s, &i)).await.unwrap();
    let s = spec("plain", Duration::from_secs(60));
    let i = p.issue(&s).await.unwrap();
    assert_eq!(i.credential.expose("password"), Some("p"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_restart_during_a_task() {
    let (mut env, token) = Env::start(Bao::persistent().await, "1h").await;
    let p = env.provider(&token).await;
    let (s, issued) = mint(&p, spec("ro", Duration::from_secs(600))).await;
    let user = issued.credential.expose("username").unwrap().to_owned();
    let lease = VaultProvider::upstream_lease_id(&issued.handle).unwrap();

    // down: issue fails fast and retryable, revoke is retryable
    env.bao.stop();
    let started = std::time::Instant::now();
    let e = p
        .prepare(&spec("ro", Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "not fast: {:?}",
        started.elapsed()
    );
    let e = p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
    assert!(p.health().await.is_err());

    // back, sealed: still retryable, and readiness says why
    env.bao.start();
    let e = p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
    let h = p.health().await.unwrap_err();
    assert!(h.message.contains("sealed"), "{h}");
    let e = p
        .prepare(&spec("ro", Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");

    // unsealed: the lease survived the restart and revoke reaches it
    env.bao.unseal().await;
    p.health().await.unwrap();
    assert!(p.upstream_lease_exists(&lease).await.unwrap());
    assert!(env.role_exists(&user).await);
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    assert!(!p.upstream_lease_exists(&lease).await.unwrap());
    assert!(!env.role_exists(&user).await);
    // and it issues again
    let (s, issued) = mint(&p, spec("ro", Duration::from_secs(60))).await;
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approle_token_expiry_means_a_new_login() {
    let (env, _) = Env::start(Bao::dev(), "1h").await;
    env.bao
        .ok(
            Method::POST,
            "sys/auth/approle",
            Some(json!({"type": "approle"})),
        )
        .await;
    // tokens live 3 s and cannot be renewed past 5 s
    env.bao
        .ok(
            Method::POST,
            "auth/approle/role/broker",
            Some(json!({
                "token_policies": ["leasehold-broker"],
                "token_ttl": "3s",
                "token_max_ttl": "5s",
            })),
        )
        .await;
    let role_id = env
        .bao
        .ok(Method::GET, "auth/approle/role/broker/role-id", None)
        .await["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret_id = env
        .bao
        .ok(
            Method::POST,
            "auth/approle/role/broker/secret-id",
            Some(json!({})),
        )
        .await["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret_file = env.dir.path().join("secret-id");
    std::fs::write(&secret_file, &secret_id).unwrap();
    let p = VaultProvider::new(
        env.config(AuthConfig::Approle {
            mount: "approle".into(),
            role_id,
            secret_id_file: secret_file,
        }),
        3600,
    )
    .unwrap();
    let (s, issued) = mint(&p, spec("ro", Duration::from_secs(300))).await;
    // well past the first token's max TTL: the background task logged in again
    tokio::time::sleep(Duration::from_secs(8)).await;
    p.health().await.unwrap();
    // the lease read under the first login is alive: lease tokens are orphans
    assert!(Login(&env.pg).usable(&s, &issued.credential).await.unwrap());
    let (s2, issued2) = mint(&p, spec("ro", Duration::from_secs(300))).await;
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    p.revoke(&RevokeSpec::of(&s2, &issued2)).await.unwrap();
    assert!(!Login(&env.pg).usable(&s, &issued.credential).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_or_revoked_token_file_is_read_again() {
    let (env, token) = Env::start(Bao::dev(), "1h").await;
    let p = env.provider(&token).await;
    p.health().await.unwrap();
    // rotated: a new token in the file, the old one revoked
    let fresh = env.bao.token(&["leasehold-broker"], "1h").await;
    env.token_file(&fresh);
    env.bao
        .ok(
            Method::POST,
            "auth/token/revoke",
            Some(json!({"token": token})),
        )
        .await;
    let (s, issued) = mint(&p, spec("ro", Duration::from_secs(60))).await;
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    // revoked and not replaced: readiness fails and says why
    env.bao
        .ok(
            Method::POST,
            "auth/token/revoke",
            Some(json!({"token": fresh})),
        )
        .await;
    let e = p.health().await.unwrap_err();
    assert!(e.message.contains("permission denied"), "{e}");
    let e = p
        .prepare(&spec("ro", Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert!(e.message.contains("permission denied"), "{e}");
}

/// A JWT signed with `key` (EdDSA), as a workload identity provider would.
fn jwt(key: &ring::signature::Ed25519KeyPair, sub: &str) -> String {
    use base64::Engine as _;
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let now = now().unix_seconds();
    let header = b64(br#"{"alg":"EdDSA","typ":"JWT"}"#);
    let claims = b64(json!({
        "iss": "https://issuer.test", "sub": sub, "aud": "leasehold",
        "iat": now, "nbf": now - 5, "exp": now + 600,
    })
    .to_string()
    .as_bytes());
    let signing_input = format!("{header}.{claims}");
    let sig = key.sign(signing_input.as_bytes());
    format!("{signing_input}.{}", b64(sig.as_ref()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_login_is_renewed_and_repeated_before_the_token_ends() {
    use base64::Engine as _;
    use ring::signature::KeyPair as _;
    let (env, _) = Env::start(Bao::dev(), "1h").await;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let key = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    // SubjectPublicKeyInfo for Ed25519: a fixed 12-byte prefix and the key
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(key.public_key().as_ref());
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&spki)
    );
    env.bao
        .ok(Method::POST, "sys/auth/jwt", Some(json!({"type": "jwt"})))
        .await;
    env.bao
        .ok(
            Method::POST,
            "auth/jwt/config",
            Some(json!({
                "jwt_validation_pubkeys": [pem],
                "jwt_supported_algs": ["EdDSA"],
                "bound_issuer": "https://issuer.test",
            })),
        )
        .await;
    env.bao
        .ok(
            Method::POST,
            "auth/jwt/role/broker",
            Some(json!({
                "role_type": "jwt",
                "user_claim": "sub",
                "bound_subject": "leasehold-broker",
                "bound_audiences": ["leasehold"],
                "token_policies": ["leasehold-broker"],
                "token_ttl": "3s",
                "token_max_ttl": "5s",
            })),
        )
        .await;
    let jwt_file = env.dir.path().join("jwt");
    std::fs::write(&jwt_file, jwt(&key, "leasehold-broker")).unwrap();
    let p = VaultProvider::new(
        env.config(AuthConfig::Jwt {
            mount: "jwt".into(),
            role: "broker".into(),
            jwt_file: jwt_file.clone(),
        }),
        3600,
    )
    .unwrap();
    let (s, issued) = mint(&p, spec("ro", Duration::from_secs(300))).await;
    let accessors = |v: &serde_json::Value| v["data"]["keys"].as_array().unwrap().len();
    let list = Method::from_bytes(b"LIST").unwrap();
    let before = accessors(
        &env.bao
            .api(list.clone(), "auth/token/accessors", None)
            .await
            .1,
    );
    // past the first login's max TTL: the broker logged in again on its own
    tokio::time::sleep(Duration::from_secs(8)).await;
    p.health().await.unwrap();
    let after = accessors(&env.bao.api(list, "auth/token/accessors", None).await.1);
    assert!(after > before, "no new login: {before} -> {after} tokens");
    let (s2, issued2) = mint(&p, spec("ro", Duration::from_secs(300))).await;
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    p.revoke(&RevokeSpec::of(&s2, &issued2)).await.unwrap();
    // a JWT the upstream refuses: readiness says the login was refused
    std::fs::write(&jwt_file, jwt(&key, "someone-else")).unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let e = p.health().await.unwrap_err();
    assert!(e.message.contains("jwt login refused"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_and_its_mounts_are_configurable() {
    let pg = Cluster::start();
    pg.provision().await;
    let mut bao = Bao::dev();
    bao.ok(Method::POST, "sys/namespaces/team", None).await;
    bao.namespace = Some("team".into());
    let pw = std::fs::read_to_string(pg.manager_password_file()).unwrap();
    // the engine at a mount of the namespace's own choosing
    bao.database_setup("team-db", pg.port, MANAGER, &pw, DATABASE, "1h")
        .await;
    let token = bao.broker_setup(&["team-db"], "1h").await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let mut cfg = bao.provider_config(AuthConfig::Token { token_file });
    assert_eq!(cfg.namespace.as_deref(), Some("team"));
    cfg.roles.get_mut("ro").unwrap().path = "team-db/creds/ro".into();
    // the same settings without the namespace reach nothing
    let outside = VaultProvider::new(
        VaultConfig {
            namespace: None,
            ..cfg.clone()
        },
        3600,
    )
    .unwrap();
    let e = outside
        .prepare(&spec("ro", Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    let p = VaultProvider::new(cfg, 3600).unwrap();
    let (s, issued) = mint(&p, spec("ro", Duration::from_secs(60))).await;
    assert!(Login(&pg).usable(&s, &issued.credential).await.unwrap());
    let lease = VaultProvider::upstream_lease_id(&issued.handle).unwrap();
    assert!(lease.starts_with("team-db/creds/ro/"), "{lease}");
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    assert!(!Login(&pg).usable(&s, &issued.credential).await.unwrap());
    // the mount exists only inside the namespace: the root namespace has no such route
    bao.namespace = None;
    let (code, _) = bao.api(Method::GET, "sys/mounts/team-db", None).await;
    assert_ne!(code, 200, "team-db is mounted outside the namespace too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewable_token_is_renewed_in_the_background() {
    let (env, _) = Env::start(Bao::dev(), "1h").await;
    // a 4 s token with no maximum: alive after 10 s only if renewed
    let short = env.bao.token(&["leasehold-broker"], "4s").await;
    let p = env.provider(&short).await;
    p.health().await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (code, v) = env
        .bao
        .api(
            Method::POST,
            "auth/token/lookup",
            Some(json!({ "token": short })),
        )
        .await;
    assert_eq!(code, 200, "the token expired: it was not renewed: {v}");
    assert!(v["data"]["ttl"].as_u64().unwrap() > 0, "{v}");
    // the same token, still the broker's
    let (s, issued) = mint(&p, spec("ro", Duration::from_secs(60))).await;
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_upstream_is_verified_against_the_configured_ca() {
    let (env, token) = Env::start(Bao::dev_tls(), "1h").await;
    let p = env.provider(&token).await;
    assert!(env.bao.addr().starts_with("https://"));
    p.health().await.unwrap();
    let (s, issued) = mint(&p, spec("ro", Duration::from_secs(60))).await;
    assert!(Login(&env.pg).usable(&s, &issued.credential).await.unwrap());
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    // without the CA, the server's self-made certificate is not trusted
    let f = env.token_file(&token);
    let mut cfg = env.config(AuthConfig::Token { token_file: f });
    cfg.ca_file = None;
    let untrusting = VaultProvider::new(cfg, 3600).unwrap();
    let e = untrusting.health().await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
    assert!(e.message.to_lowercase().contains("certificate"), "{e}");
}
