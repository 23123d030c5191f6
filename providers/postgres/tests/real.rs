//! The PostgreSQL provider against a real PostgreSQL server (a throwaway
//! cluster per test, see `testkit`): the conformance suite, the revocation
//! post-condition with a live session, faults (server down at issue and at
//! revoke), bad templates and privileges, injection attempts, inventory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use leasehold_provider::conformance::{self, Probe, SpecFactory};
use leasehold_provider::{
    Credential, ErrorClass, Found, LeaseSpec, Provider, RevokeSpec, Timestamp,
};
use leasehold_provider_postgres::testkit::{Cluster, DATABASE, MANAGER};
use leasehold_provider_postgres::{PostgresConfig, PostgresProvider};
use tokio_postgres::error::SqlState;

const MAX_TTL: u64 = 86_400;

#[allow(clippy::disallowed_methods)] // a test of the provider alone: no broker clock here
fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    Timestamp::from_unix_millis(i64::try_from(ms).unwrap())
}

/// Lease ids as the broker prints them: `lease_` and 26 base32 characters.
fn lease_id() -> String {
    use ring::rand::SecureRandom as _;
    static N: AtomicU64 = AtomicU64::new(0);
    let mut b = [0u8; 26];
    ring::rand::SystemRandom::new().fill(&mut b).unwrap();
    let alphabet = b"0123456789abcdefghjkmnpqrstvwxyz";
    let _ = N.fetch_add(1, Ordering::Relaxed);
    let s: String = b
        .iter()
        .map(|x| alphabet[(*x % 32) as usize] as char)
        .collect();
    format!("lease_{s}")
}

struct Specs;

impl SpecFactory for Specs {
    fn spec(&self, role: &str, ttl: Duration) -> LeaseSpec {
        spec(role, ttl, &[])
    }
}

fn spec(role: &str, ttl: Duration, scope: &[&str]) -> LeaseSpec {
    let now = now();
    LeaseSpec {
        lease_id: lease_id(),
        task_id: "task_test".into(),
        workload: "dev:assistant-a".into(),
        tenant: Some("dev".into()),
        on_behalf_of: "alice@example.com".into(),
        role: role.into(),
        scope: scope.iter().map(|s| (*s).to_owned()).collect(),
        issued_at: now,
        expires_at: now.saturating_add(ttl),
        prepared: None,
        binding: None,
    }
}

async fn started() -> (Cluster, PostgresProvider) {
    let c = Cluster::start();
    c.provision().await;
    let p = PostgresProvider::new(c.provider_config(), MAX_TTL).unwrap();
    (c, p)
}

/// Logs in with a leased credential, as a client would.
async fn login(
    c: &Cluster,
    cred: &Credential,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    c.connect(
        cred.expose("username").unwrap(),
        cred.expose("password").unwrap(),
        cred.expose("database").unwrap(),
    )
    .await
}

fn refused(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::INVALID_PASSWORD)
        || e.code() == Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
}

struct LoginProbe<'a>(&'a Cluster);

#[async_trait::async_trait]
impl Probe for LoginProbe<'_> {
    async fn usable(&self, _: &LeaseSpec, cred: &Credential) -> Result<bool, String> {
        match login(self.0, cred).await {
            Ok(client) => {
                client
                    .query_one("SELECT count(*) FROM public.orders", &[])
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(true)
            }
            Err(e) if refused(&e) => Ok(false),
            Err(e) => Err(format!("login failed for another reason: {e}")),
        }
    }
}

async fn role_exists(c: &Cluster, name: &str) -> bool {
    let su = c.superuser("postgres").await;
    su.query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_against_a_real_server() {
    let (c, p) = started().await;
    let report = conformance::run(&p, &LoginProbe(&c), &Specs, "read")
        .await
        .unwrap();
    assert_eq!(report.steps.len(), 8, "{report:?}");
    // nothing left behind with the prefix
    assert_eq!(p.inventory().await.unwrap().unwrap(), Vec::<Found>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_ends_an_idle_session_and_the_password_stops_working() {
    let (c, p) = started().await;
    let s = spec("read", Duration::from_secs(600), &[]);
    let issued = p.issue(&s).await.unwrap();
    let name = issued.credential.expose("username").unwrap().to_owned();
    assert!(name.starts_with("lh_lease_") && name.len() <= 63, "{name}");

    // what the role is: expiry, connection limit, groups, and no plain password
    let su = c.superuser("postgres").await;
    let row = su
        .query_one(
            "SELECT rolvaliduntil::text, rolconnlimit, rolcanlogin, rolpassword FROM pg_authid WHERE rolname = $1",
            &[&name],
        )
        .await
        .unwrap();
    let until: String = row.get(0);
    assert!(
        until.starts_with(
            &time::OffsetDateTime::from_unix_timestamp(s.expires_at.unix_seconds())
                .unwrap()
                .year()
                .to_string()
        ),
        "{until}"
    );
    assert_eq!(row.get::<_, i32>(1), 4);
    assert!(row.get::<_, bool>(2));
    let stored: String = row.get(3);
    assert!(
        stored.starts_with("SCRAM-SHA-256$"),
        "the server stores a verifier"
    );
    assert!(!stored.contains(issued.credential.expose("password").unwrap()));
    let member: bool = su
        .query_one("SELECT pg_has_role($1, 'app_read', 'MEMBER')", &[&name])
        .await
        .unwrap()
        .get(0);
    assert!(member);

    // an idle session, and one in an open transaction
    let idle = login(&c, &issued.credential).await.unwrap();
    let busy = login(&c, &issued.credential).await.unwrap();
    assert_eq!(
        idle.query_one("SELECT count(*) FROM public.orders", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        1
    );
    busy.batch_execute("BEGIN; SELECT * FROM public.orders")
        .await
        .unwrap();

    let t = Instant::now();
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    eprintln!("revoke with two live sessions took {:?}", t.elapsed());

    for (what, session) in [("idle", &idle), ("in a transaction", &busy)] {
        let r = session.query_one("SELECT 1", &[]).await;
        assert!(r.is_err(), "the {what} session survived the revoke");
        assert!(session.is_closed(), "the {what} session is closed");
    }
    let e = login(&c, &issued.credential).await.unwrap_err();
    assert!(refused(&e), "login after revoke: {e}");
    assert!(!role_exists(&c, &name).await, "the role is dropped");
    let n: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    // idempotent
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_narrow_within_the_template_and_injection_goes_nowhere() {
    let (c, p) = started().await;
    // scope `public` only: reporting is out of reach (the group role grants
    // only public.orders)
    let s = spec("read", Duration::from_secs(600), &["public"]);
    let i = p.issue(&s).await.unwrap();
    let client = login(&c, &i.credential).await.unwrap();
    client
        .query_one("SELECT count(*) FROM public.orders", &[])
        .await
        .unwrap();
    let e = client
        .query_one("SELECT count(*) FROM reporting.daily", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");
    // a schema whose name has a quote, a space and Unicode
    let s2 = spec("read", Duration::from_secs(600), &["we\"ird sch ü"]);
    let i2 = p.issue(&s2).await.unwrap();
    let client2 = login(&c, &i2.credential).await.unwrap();
    client2
        .query_one("SELECT count(*) FROM \"we\"\"ird sch ü\".t", &[])
        .await
        .unwrap();
    // a group role with such a name
    let s3 = spec("weird", Duration::from_secs(600), &[]);
    let i3 = p.issue(&s3).await.unwrap();
    let client3 = login(&c, &i3.credential).await.unwrap();
    client3
        .query_one("SELECT count(*) FROM reporting.daily", &[])
        .await
        .unwrap();

    // outside the template, or an injection attempt: refused before SQL
    for bad in [
        vec!["secret_schema"],
        vec!["public; DROP TABLE public.orders; --"],
        vec!["public\" TO PUBLIC; DROP TABLE public.orders; --"],
        vec!["public", "reporting'"],
    ] {
        let scope: Vec<String> = bad.iter().map(|s| (*s).to_owned()).collect();
        let e = p.validate("read", &scope).unwrap_err();
        assert_eq!(e.class, ErrorClass::Invalid, "{bad:?}");
        assert!(
            e.message.contains("outside role template `read`"),
            "{}",
            e.message
        );
        let mut sp = spec("read", Duration::from_secs(600), &[]);
        sp.scope = scope;
        assert_eq!(p.issue(&sp).await.unwrap_err().class, ErrorClass::Invalid);
    }
    // the writer template has no scopes: any scope is outside it
    assert_eq!(
        p.validate("writer", &["public".into()]).unwrap_err().class,
        ErrorClass::Invalid
    );
    assert_eq!(
        p.validate("nope", &[]).unwrap_err().class,
        ErrorClass::Invalid
    );
    // a lease id that could not be a role name is refused, not quoted in
    let mut sp = spec("read", Duration::from_secs(600), &[]);
    sp.lease_id = "lease_x\"; DROP TABLE public.orders; --".into();
    assert_eq!(p.issue(&sp).await.unwrap_err().class, ErrorClass::Invalid);
    let su = c.superuser(DATABASE).await;
    let n: i64 = su
        .query_one("SELECT count(*) FROM public.orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the table is intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_drops_what_the_role_created() {
    let (c, p) = started().await;
    let s = spec("writer", Duration::from_secs(600), &[]);
    let i = p.issue(&s).await.unwrap();
    let client = login(&c, &i.credential).await.unwrap();
    client
        .batch_execute("CREATE TABLE public.scratch (x int); INSERT INTO public.scratch VALUES (1)")
        .await
        .unwrap();
    drop(client);
    p.revoke(&RevokeSpec::of(&s, &i)).await.unwrap();
    let su = c.superuser(DATABASE).await;
    let gone = su
        .query_opt("SELECT 1 FROM pg_tables WHERE tablename = 'scratch'", &[])
        .await
        .unwrap()
        .is_none();
    assert!(gone, "DROP OWNED removed the lease's table");
    assert!(!role_exists(&c, i.credential.expose("username").unwrap()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_at_issue_fails_fast_and_at_revoke_is_retried_until_it_is_back() {
    let (mut c, p) = started().await;
    let s = spec("read", Duration::from_secs(600), &[]);
    let i = p.issue(&s).await.unwrap();
    let name = i.credential.expose("username").unwrap().to_owned();

    c.stop_server();
    let t = Instant::now();
    let e = p
        .issue(&spec("read", Duration::from_secs(600), &[]))
        .await
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "a down database fails fast: {:?}",
        t.elapsed()
    );
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
    assert!(
        e.message
            .contains("cannot connect to PostgreSQL at 127.0.0.1"),
        "{}",
        e.message
    );
    let e = p.revoke(&RevokeSpec::of(&s, &i)).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
    let e = p.health().await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable);

    c.start_server();
    assert!(
        role_exists(&c, &name).await,
        "nothing was dropped while down"
    );
    p.revoke(&RevokeSpec::of(&s, &i)).await.unwrap();
    assert!(!role_exists(&c, &name).await);
    assert!(refused(&login(&c, &i.credential).await.unwrap_err()));
    // only the one role ever existed: the failed issue left nothing
    assert_eq!(p.inventory().await.unwrap().unwrap(), Vec::<Found>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_template_is_named_by_the_health_check_and_leaves_nothing() {
    let c = Cluster::start();
    c.provision().await;
    let mut cfg: PostgresConfig = c.provider_config();
    let mut broken = cfg.roles["writer"].clone();
    broken.statements = vec!["GRANT SELEKT ON public.orders TO {{name}}".into()];
    cfg.roles.insert("broken".into(), broken);
    let p = PostgresProvider::new(cfg.clone(), MAX_TTL).unwrap();
    let e = p.health().await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert!(
        e.message
            .contains("role template `broken` failed its dry run at statements[0]"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("SQLSTATE 42601"),
        "a syntax error: {}",
        e.message
    );
    assert_eq!(
        p.inventory().await.unwrap().unwrap(),
        Vec::<Found>::new(),
        "the dry run rolled back"
    );
    // a group role that does not exist
    cfg.roles.remove("broken");
    let mut missing = cfg.roles["writer"].clone();
    missing.in_roles = vec!["no_such_group".into()];
    cfg.roles.insert("missing".into(), missing);
    let e = PostgresProvider::new(cfg, MAX_TTL)
        .unwrap()
        .health()
        .await
        .unwrap_err();
    assert!(
        e.message.contains("role template `missing`") && e.message.contains("no_such_group"),
        "{}",
        e.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_management_role_without_privileges_is_told_which() {
    let c = Cluster::start();
    c.provision().await;
    let su = c.superuser("postgres").await;
    su.batch_execute(
        "CREATE ROLE weak_nosignal LOGIN CREATEROLE PASSWORD 'pw-nosignal'; \
         CREATE ROLE weak_nocreate LOGIN PASSWORD 'pw-nocreate'; GRANT pg_signal_backend TO weak_nocreate;",
    )
    .await
    .unwrap();
    for (user, missing) in [
        ("weak_nosignal", "pg_signal_backend"),
        ("weak_nocreate", "CREATEROLE"),
    ] {
        let pw = c.dir().join(format!("{user}.pw"));
        std::fs::write(&pw, format!("pw-{}", user.trim_start_matches("weak_"))).unwrap();
        let mut cfg = c.provider_config();
        cfg.user = user.into();
        cfg.password_file = Some(pw);
        let p = PostgresProvider::new(cfg, MAX_TTL).unwrap();
        let e = p.health().await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Permanent, "{e}");
        assert!(
            e.message.contains(missing) && e.message.contains(user),
            "{}",
            e.message
        );
    }
    // a wrong management password is permanent and says so
    let mut cfg = c.provider_config();
    let pw = c.dir().join("wrong.pw");
    std::fs::write(&pw, "not-the-password").unwrap();
    cfg.password_file = Some(pw);
    let e = PostgresProvider::new(cfg, MAX_TTL)
        .unwrap()
        .health()
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert!(e.message.contains("refused"), "{}", e.message);
    assert!(!e.message.contains("not-the-password"));
    // the right one works
    PostgresProvider::new(c.provider_config(), MAX_TTL)
        .unwrap()
        .health()
        .await
        .unwrap();
    let _ = MANAGER;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_lists_only_prefixed_roles_and_remove_refuses_others() {
    let (c, p) = started().await;
    let s = spec("read", Duration::from_secs(600), &[]);
    let i = p.issue(&s).await.unwrap();
    let su = c.superuser("postgres").await;
    su.batch_execute("CREATE ROLE lh_lease_00000000000000000000000000 LOGIN; CREATE ROLE lh_someone_else; CREATE ROLE lhx_not_ours;")
        .await
        .unwrap();
    let found = p.inventory().await.unwrap().unwrap();
    let names: Vec<&str> = found.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(
        names.contains(&"lh_lease_00000000000000000000000000")
            && names.contains(&"lh_someone_else")
    );
    assert!(!names.contains(&"lhx_not_ours") && !names.contains(&"app_read"));
    let orphan = found
        .iter()
        .find(|f| f.name == "lh_lease_00000000000000000000000000")
        .unwrap();
    assert_eq!(
        orphan.lease_id.as_deref(),
        Some("lease_00000000000000000000000000")
    );
    assert_eq!(
        found
            .iter()
            .find(|f| f.name == "lh_someone_else")
            .unwrap()
            .lease_id,
        None
    );
    p.remove(orphan).await.unwrap();
    assert!(!role_exists(&c, &orphan.name).await);
    let e = p
        .remove(&Found {
            name: "app_read".into(),
            lease_id: None,
        })
        .await
        .unwrap_err();
    assert!(e.message.contains("lacks the prefix"), "{}", e.message);
    assert!(role_exists(&c, "app_read").await);
    assert!(
        role_exists(&c, i.credential.expose("username").unwrap()).await,
        "the live lease's role is untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_revoke_of_hundreds_with_live_sessions_and_some_already_gone() {
    let (c, p) = started().await;
    let mut issued = Vec::new();
    for _ in 0..450 {
        let s = spec("read", Duration::from_secs(600), &[]);
        let i = p.issue(&s).await.unwrap();
        issued.push((s, i));
    }
    let sessions: Vec<tokio_postgres::Client> = {
        let mut v = Vec::new();
        for (_, i) in issued.iter().step_by(50) {
            v.push(login(&c, &i.credential).await.unwrap());
        }
        v
    };
    // a few already revoked one by one
    for (s, i) in issued.iter().take(5) {
        p.revoke(&RevokeSpec::of(s, i)).await.unwrap();
    }
    let specs: Vec<RevokeSpec> = issued.iter().map(|(s, i)| RevokeSpec::of(s, i)).collect();
    let t = Instant::now();
    let results = p.revoke_many(&specs).await;
    eprintln!("revoke_many of {} took {:?}", specs.len(), t.elapsed());
    assert_eq!(results.len(), specs.len());
    assert!(
        results.iter().all(Result::is_ok),
        "{:?}",
        results.iter().find(|r| r.is_err())
    );
    assert_eq!(p.inventory().await.unwrap().unwrap(), Vec::<Found>::new());
    for s in &sessions {
        assert!(
            s.query_one("SELECT 1", &[]).await.is_err(),
            "a session survived the batch"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_connections_verify_the_server_certificate() {
    let tls =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../integration/fixtures/tls");
    let c = Cluster::start_with(leasehold_provider_postgres::testkit::Options {
        fsync: false,
        tls: Some((tls.join("server.pem"), tls.join("server.key"))),
    });
    c.provision().await;
    let mut cfg = c.provider_config();
    cfg.tls = leasehold_provider_postgres::TlsMode::VerifyFull;
    cfg.ca_file = Some(tls.join("ca.pem"));
    let p = PostgresProvider::new(cfg.clone(), MAX_TTL).unwrap();
    p.health().await.unwrap();
    let s = spec("weird", Duration::from_secs(600), &[]);
    let i = p.issue(&s).await.unwrap();
    let su = c.superuser("postgres").await;
    let ssl: bool = su
        .query_one("SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE usename = $1", &[&MANAGER])
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the management connections use TLS");
    p.revoke(&RevokeSpec::of(&s, &i)).await.unwrap();
    assert!(!role_exists(&c, i.credential.expose("username").unwrap()).await);

    // a CA that did not sign the server's certificate: refused, and said so
    let other = c.dir().join("other-ca.pem");
    let pem = std::fs::read_to_string(tls.join("server.pem")).unwrap();
    std::fs::write(&other, pem).unwrap();
    cfg.ca_file = Some(other);
    let e = PostgresProvider::new(cfg, MAX_TTL)
        .unwrap()
        .health()
        .await
        .unwrap_err();
    assert!(
        e.message.contains("cannot connect") && e.message.to_lowercase().contains("certificate"),
        "{}",
        e.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verifier_we_compute_is_what_the_server_checks_logins_against() {
    let c = Cluster::start();
    c.provision().await;
    for iterations in [4096, 64] {
        let mut cfg = c.provider_config();
        cfg.scram_iterations = iterations;
        let p = PostgresProvider::new(cfg, MAX_TTL).unwrap();
        let s = spec("weird", Duration::from_secs(600), &[]);
        let i = p.issue(&s).await.unwrap();
        let name = i.credential.expose("username").unwrap();
        let su = c.superuser("postgres").await;
        let stored: String = su
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            stored.starts_with(&format!("SCRAM-SHA-256${iterations}:")),
            "{stored}"
        );
        let session = login(&c, &i.credential).await.unwrap();
        session.query_one("SELECT 1", &[]).await.unwrap();
        // a wrong password is refused: the server really checks
        let wrong = Credential::new()
            .public("username", name)
            .secret("password", "x".repeat(32))
            .public("database", DATABASE);
        assert!(refused(&login(&c, &wrong).await.unwrap_err()));
        p.revoke(&RevokeSpec::of(&s, &i)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_through_group_roles_grant_only_the_groups_asked_for() {
    let (c, p) = started().await;
    let s = spec("groups", Duration::from_secs(600), &["reporting"]);
    let i = p.issue(&s).await.unwrap();
    let client = login(&c, &i.credential).await.unwrap();
    client
        .query_one("SELECT count(*) FROM reporting.daily", &[])
        .await
        .unwrap();
    let e = client
        .query_one("SELECT count(*) FROM public.orders", &[])
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "orders was not asked for: {e}"
    );
    // no scope: every group of the template
    let s2 = spec("groups", Duration::from_secs(600), &[]);
    let i2 = p.issue(&s2).await.unwrap();
    let client2 = login(&c, &i2.credential).await.unwrap();
    client2
        .query_one("SELECT count(*) FROM public.orders", &[])
        .await
        .unwrap();
    client2
        .query_one("SELECT count(*) FROM reporting.daily", &[])
        .await
        .unwrap();
    assert_eq!(
        p.validate("groups", &["app_read".into()])
            .unwrap_err()
            .class,
        ErrorClass::Invalid,
        "a group name is not a scope"
    );
    // the roles hold no privilege of their own: revocation is a plain DROP ROLE
    p.revoke_many(&[RevokeSpec::of(&s, &i), RevokeSpec::of(&s2, &i2)])
        .await
        .into_iter()
        .for_each(|r| r.unwrap());
    assert_eq!(p.inventory().await.unwrap().unwrap(), Vec::<Found>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_notices_a_privilege_taken_away_at_once() {
    let (c, p) = started().await;
    p.health().await.unwrap();
    // the template dry run is cached for a minute; the privilege check is not
    let su = c.superuser("postgres").await;
    su.batch_execute(&format!("REVOKE pg_signal_backend FROM {MANAGER}"))
        .await
        .unwrap();
    let e = p.health().await.unwrap_err();
    assert!(e.message.contains("pg_signal_backend"), "{}", e.message);
    su.batch_execute(&format!("GRANT pg_signal_backend TO {MANAGER}"))
        .await
        .unwrap();
    p.health().await.unwrap();
}

/// A template that grants on an object to each lease's role fills that
/// object's access list; from half of what a catalog row holds, the health
/// time advisories say which object, how full, and what to change, and
/// only for lists that hold a lease's role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filling_access_list_is_reported_at_health_time() {
    let (c, p) = started().await;
    p.health().await.unwrap();
    assert_eq!(p.advisories().await, Vec::<String>::new());
    // `writer` grants on schema public to each lease's role
    let s = spec("writer", Duration::from_secs(300), &[]);
    let issued = p.issue(&s).await.unwrap();
    assert_eq!(
        p.advisories().await,
        Vec::<String>::new(),
        "one entry is far from full"
    );
    // others fill the list to past half of the ceiling
    let entries = c.fill_schema_acl("public", 310).await;
    assert!(entries >= 312, "{entries}");
    let said = p.advisories().await;
    assert_eq!(said.len(), 1, "{said:?}");
    for part in [
        "the access list of schema public".to_owned(),
        format!("holds {entries} entries"),
        format!("about {} fit", leasehold_provider_postgres::ACL_CEILING),
        "row is too big".to_owned(),
        "read, writer".to_owned(),
        "in_roles".to_owned(),
    ] {
        assert!(said[0].contains(&part), "{part:?} not in {}", said[0]);
    }
    // health itself still passes: nothing has failed yet
    p.health().await.unwrap();
    // once no lease's role is on the list, it is not ours to report
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    assert_eq!(p.advisories().await, Vec::<String>::new());
}
