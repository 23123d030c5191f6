//! The MariaDB provider as a plugin process (`leasehold-plugin-mysql`),
//! driven by the broker's plugin host, against a real MariaDB.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold_plugin::PluginProvider;
use leasehold_provider::conformance;
use leasehold_provider::{Provider, RevokeSpec};

mod common;
use common::{Login, Specs, catalog, kill9, limits, setup, spec, usable};

const READY: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_passes_the_conformance_suite() {
    let (server, cfg) = setup().await;
    let p = PluginProvider::start(catalog(&cfg), &limits()).unwrap();
    p.wait_ready(READY).await.unwrap();
    assert_eq!(
        p.describe().revocation,
        leasehold_provider_mysql::MysqlProvider::new(cfg.clone(), 86_400)
            .unwrap()
            .describe()
            .revocation
    );
    for role in ["reader", "writer"] {
        conformance::run(&p, &Login(&server), &Specs, role)
            .await
            .unwrap_or_else(|e| panic!("{role}: {e}"));
    }
    // scopes are validated by the plugin, before anything is recorded
    assert!(p.validate("reader", &["reports".into()]).is_ok());
    let e = p.validate("reader", &["app`; DROP".into()]).unwrap_err();
    assert_eq!(e.class, leasehold_provider::ErrorClass::Invalid, "{e}");
    assert!(server.users("lh_").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_digest_is_refused_with_both_digests() {
    let (_server, cfg) = setup().await;
    let mut entry = catalog(&cfg);
    let actual = entry.sha256.clone();
    entry.sha256 = "0".repeat(64);
    let p = PluginProvider::start(entry, &limits()).unwrap();
    let e = p.wait_ready(Duration::from_secs(2)).await.unwrap_err();
    assert!(e.contains(&actual) && e.contains(&"0".repeat(64)), "{e}");
    let h = p.health().await.unwrap_err();
    assert!(
        h.is_retryable() && h.message.contains("leasehold-plugin-mysql"),
        "{h}"
    );
    assert!(p.pid().is_none(), "never started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_plugin_is_restarted_and_an_interrupted_revocation_completes() {
    let (server, cfg) = setup().await;
    let p = Arc::new(PluginProvider::start(catalog(&cfg), &limits()).unwrap());
    p.wait_ready(READY).await.unwrap();
    let mut leases = Vec::new();
    for _ in 0..300 {
        let s = spec("reader", Duration::from_secs(300), &[]);
        let i = p.issue(&s).await.unwrap();
        leases.push((s, i));
    }
    // 50 open sessions among them
    let mut sessions = Vec::new();
    for (_, i) in leases.iter().take(50) {
        let opts = leasehold_provider_mysql::testkit::login(
            &server,
            i.credential.expose("username").unwrap(),
            i.credential.expose("password").unwrap(),
        );
        sessions.push(mysql_async::Conn::new(opts).await.unwrap());
    }
    let revokes: Vec<RevokeSpec> = leases.iter().map(|(s, i)| RevokeSpec::of(s, i)).collect();
    let pid = p.pid().unwrap();
    let (p2, r2) = (p.clone(), revokes.clone());
    let during = tokio::spawn(async move { p2.revoke_many(&r2).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    kill9(pid);
    let first = during.await.unwrap();
    let failed = first.iter().filter(|r| r.is_err()).count();
    assert!(
        first.iter().all(|r| r.as_ref().is_ok_or_retryable()),
        "a dead plugin's answers are retryable"
    );
    // restarted with backoff; the retry finishes the job
    wait_restarted(&p, pid).await;
    let second = p.revoke_many(&revokes).await;
    assert!(
        second.iter().all(Result::is_ok),
        "{:?}",
        second.iter().find(|r| r.is_err())
    );
    assert!(server.users("lh_").await.is_empty(), "every user is gone");
    for (_, i) in leases.iter().take(5) {
        assert!(!usable(&server, &i.credential).await.unwrap());
    }
    eprintln!("{failed} of 300 revocations failed with the plugin killed, all done after restart");
}

/// Until a new plugin process (not `old`) serves: the host learns of a
/// death when it reaps the child, so right after a kill it may still
/// report the old one.
async fn wait_restarted(p: &PluginProvider, old: u32) {
    let deadline = std::time::Instant::now() + READY;
    while p.pid().is_none_or(|pid| pid == old) {
        assert!(
            std::time::Instant::now() < deadline,
            "no new plugin process within {READY:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

trait OkOrRetryable {
    fn is_ok_or_retryable(&self) -> bool;
}
impl OkOrRetryable for Result<&(), &leasehold_provider::ProviderError> {
    fn is_ok_or_retryable(&self) -> bool {
        match self {
            Ok(()) => true,
            Err(e) => e.is_retryable(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_plugin_mid_issue_orphans_nothing_after_rollback() {
    let (server, cfg) = setup().await;
    let p = Arc::new(PluginProvider::start(catalog(&cfg), &limits()).unwrap());
    p.wait_ready(READY).await.unwrap();
    let pid = p.pid().unwrap();
    let specs: Vec<_> = (0..40)
        .map(|_| spec("writer", Duration::from_secs(300), &[]))
        .collect();
    let mut tasks = Vec::new();
    for s in specs.clone() {
        let p = p.clone();
        tasks.push(tokio::spawn(async move { p.issue(&s).await.map(|_| ()) }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    kill9(pid);
    let mut failed = Vec::new();
    for (s, t) in specs.iter().zip(tasks) {
        if let Err(e) = t.await.unwrap() {
            assert!(e.is_retryable(), "{e}");
            failed.push(s.clone());
        }
    }
    assert!(
        !failed.is_empty(),
        "the kill landed after every issue: nothing was interrupted"
    );
    // what the broker does for an issue that failed: roll back by lease id
    wait_restarted(&p, pid).await;
    for s in &failed {
        p.rollback(s).await.unwrap();
    }
    let failed_ids: Vec<String> = failed
        .iter()
        .map(|s| format!("lh_{}", s.lease_id))
        .collect();
    let left = server.users("lh_").await;
    assert!(
        left.iter().all(|u| !failed_ids.contains(u)),
        "an interrupted issue left its user"
    );
    assert_eq!(left.len(), 40 - failed.len(), "the others were issued");
}

/// A tracing layer that keeps every line, at every level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_cross_the_socket_unlogged_on_either_side() {
    let logs = Captured::default();
    let w = logs.clone();
    // global: the plugin's output is forwarded on the runtime's threads
    // (nextest runs each test in a process of its own)
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || w.clone())
            .finish(),
    )
    .unwrap();
    let (server, cfg) = setup().await;
    let mut entry = catalog(&cfg);
    entry.env.insert("RUST_LOG".into(), "trace".into());
    let p = PluginProvider::start(entry, &limits()).unwrap();
    p.wait_ready(READY).await.unwrap();
    let s = spec("writer", Duration::from_secs(60), &[]);
    let issued = p.issue(&s).await.unwrap();
    let password = issued.credential.expose("password").unwrap().to_owned();
    assert!(usable(&server, &issued.credential).await.unwrap());
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // the plugin's stderr is forwarded
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("leasehold::plugin"),
        "the plugin's trace output reached the log"
    );
    assert!(
        text.lines().count() > 20,
        "trace level is on: {} lines",
        text.lines().count()
    );
    assert!(!text.contains(&password), "the password is in the log");
    let mgmt = std::fs::read_to_string(cfg.password_file.as_ref().unwrap()).unwrap();
    assert!(
        !text.contains(mgmt.trim()),
        "the management password is in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_verified_tls_and_refused_with_another_ca() {
    let (ca, cert, key) = leasehold_provider_mysql::testkit::test_tls();
    let server = tokio::task::spawn_blocking(move || {
        leasehold_provider_mysql::testkit::Server::start_with(Some((cert, key)))
    })
    .await
    .unwrap();
    server.provision().await;
    let mut cfg = server.provider_config();
    cfg.tls = leasehold_provider_mysql::TlsMode::VerifyFull;
    cfg.ca_file = Some(ca);
    cfg.validate(86_400).unwrap();
    // through the plugin: the kit's TLS stack verifies the server
    let p = PluginProvider::start(catalog(&cfg), &limits()).unwrap();
    p.wait_ready(READY).await.unwrap();
    p.health().await.unwrap();
    let s = spec("writer", Duration::from_secs(60), &[]);
    let issued = p.issue(&s).await.unwrap();
    assert_eq!(p.probe(&s, &issued.credential).await.unwrap(), Some(true));
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    assert_eq!(p.probe(&s, &issued.credential).await.unwrap(), Some(false));
    drop(p);
    // a CA that did not sign the server's certificate: refused, retryable
    // (the connection failed), naming the certificate problem
    let other = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other.path(), include_str!("other-ca.pem")).unwrap();
    cfg.ca_file = Some(other.path().to_owned());
    let p = leasehold_provider_mysql::MysqlProvider::new(cfg, 86_400).unwrap();
    let e = p.health().await.unwrap_err();
    assert!(e.message.to_lowercase().contains("certificate"), "{e}");
}
