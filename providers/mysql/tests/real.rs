//! The MariaDB provider against a real MariaDB 10.11 (a throwaway server
//! per test, see `testkit`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use leasehold_provider::conformance;
use leasehold_provider::{ErrorClass, Provider, RevokeSpec};
use leasehold_provider_mysql::MysqlProvider;
use leasehold_provider_mysql::testkit;
use mysql_async::prelude::Queryable;

mod common;
use common::{Login, Specs, setup, spec, usable};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_every_role() {
    let (server, cfg) = setup().await;
    let p = MysqlProvider::new(cfg, 86_400).unwrap();
    for role in ["reader", "writer"] {
        let report = conformance::run(&p, &Login(&server), &Specs, role)
            .await
            .unwrap_or_else(|e| panic!("{role}: {e}"));
        assert!(report.steps.contains(&"rollback_by_lease_id"), "{report:?}");
    }
    // the provider's own probe agrees with an independent login
    let s = spec("reader", Duration::from_secs(60), &[]);
    let issued = p.issue(&s).await.unwrap();
    assert_eq!(p.probe(&s, &issued.credential).await.unwrap(), Some(true));
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    assert_eq!(p.probe(&s, &issued.credential).await.unwrap(), Some(false));
    assert!(
        server.users("lh_").await.is_empty(),
        "{:?}",
        server.users("lh_").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_ends_idle_and_mid_transaction_sessions() {
    let (server, cfg) = setup().await;
    let p = MysqlProvider::new(cfg, 86_400).unwrap();
    let s = spec("writer", Duration::from_secs(60), &[]);
    let issued = p.issue(&s).await.unwrap();
    let user = issued.credential.expose("username").unwrap().to_owned();
    let pw = issued.credential.expose("password").unwrap().to_owned();

    let mut idle = mysql_async::Conn::new(testkit::login(&server, &user, &pw))
        .await
        .unwrap();
    idle.query_drop("SELECT 1").await.unwrap();
    let mut busy = mysql_async::Conn::new(testkit::login(&server, &user, &pw))
        .await
        .unwrap();
    busy.query_drop("START TRANSACTION").await.unwrap();
    busy.query_drop("INSERT INTO app.items VALUES (42, 'uncommitted')")
        .await
        .unwrap();
    assert_eq!(server.sessions(&user).await, 2);

    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
    assert_eq!(server.sessions(&user).await, 0, "every session is gone");
    assert!(server.users(&user).await.is_empty(), "the user is dropped");
    assert!(
        idle.query_drop("SELECT 1").await.is_err(),
        "the idle session is dead"
    );
    assert!(
        busy.query_drop("COMMIT").await.is_err(),
        "the open transaction is dead"
    );
    let mut root = server.root().await;
    let n: Option<u64> = root
        .query_first("SELECT COUNT(*) FROM app.items WHERE id = 42")
        .await
        .unwrap();
    assert_eq!(n, Some(0), "the uncommitted insert was rolled back");
    assert!(
        !usable(&server, &issued.credential).await.unwrap(),
        "the password is refused"
    );
    // idempotent
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_narrow_within_the_template_and_injection_is_refused() {
    let (server, cfg) = setup().await;
    let p = MysqlProvider::new(cfg, 86_400).unwrap();
    let s = spec("reader", Duration::from_secs(60), &["reports"]);
    let issued = p.issue(&s).await.unwrap();
    let opts = testkit::login(
        &server,
        issued.credential.expose("username").unwrap(),
        issued.credential.expose("password").unwrap(),
    );
    let mut c = mysql_async::Conn::new(opts).await.unwrap();
    c.query_drop("SELECT * FROM reports.items").await.unwrap();
    assert!(
        c.query_drop("SELECT * FROM app.items").await.is_err(),
        "app is outside the scope"
    );
    drop(c);
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();

    for bad in [
        "app`; DROP DATABASE app; --",
        "mysql",
        "app' OR '1'='1",
        "*",
    ] {
        let e = p.validate("reader", &[bad.to_owned()]).unwrap_err();
        assert_eq!(e.class, ErrorClass::Invalid, "{bad}");
        let e = p
            .issue(&spec("reader", Duration::from_secs(60), &[bad]))
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Invalid, "{bad}");
    }
    assert_eq!(
        p.validate("writer", &["app".into()]).unwrap_err().class,
        ErrorClass::Invalid
    );
    let mut evil = spec("writer", Duration::from_secs(60), &[]);
    evil.lease_id = "lease_x'@'%' IDENTIFIED BY 'x".into();
    assert_eq!(p.issue(&evil).await.unwrap_err().class, ErrorClass::Invalid);
    assert_eq!(
        p.rollback(&evil).await.unwrap_err().class,
        ErrorClass::Invalid
    );
    assert!(server.users("lh_").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_grant_leaves_no_user_and_health_names_what_is_missing() {
    let (server, mut cfg) = setup().await;
    // the manager may not grant on `mysql`
    cfg.roles
        .get_mut("writer")
        .unwrap()
        .grants
        .push("GRANT SELECT ON `mysql`.* TO {{user}}".into());
    let p = MysqlProvider::new(cfg.clone(), 86_400).unwrap();
    let e = p
        .issue(&spec("writer", Duration::from_secs(60), &[]))
        .await
        .unwrap_err();
    assert!(e.message.contains("statement 2"), "{e}");
    assert!(server.users("lh_").await.is_empty(), "all or nothing");
    let e = p.health().await.unwrap_err();
    assert!(e.message.contains("role `writer`"), "{e}");

    let mut root = server.root().await;
    root.query_drop(format!(
        "REVOKE PROCESS ON *.* FROM '{}'@'%'",
        testkit::MANAGER
    ))
    .await
    .unwrap();
    let p = MysqlProvider::new(server.provider_config(), 86_400).unwrap();
    let e = p.health().await.unwrap_err();
    assert!(e.message.contains("lacks PROCESS"), "{e}");
    assert_eq!(e.class, ErrorClass::Permanent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_finds_orphans_and_remove_refuses_foreign_users() {
    let (server, cfg) = setup().await;
    let p = MysqlProvider::new(cfg, 86_400).unwrap();
    let s = spec("writer", Duration::from_secs(60), &[]);
    let _issued = p.issue(&s).await.unwrap();
    let found = p.inventory().await.unwrap().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].lease_id.as_deref(), Some(s.lease_id.as_str()));
    p.remove(&found[0]).await.unwrap();
    assert!(p.inventory().await.unwrap().unwrap().is_empty());
    let foreign = leasehold_provider::Found {
        name: format!("'{}'@'%'", testkit::MANAGER),
        lease_id: None,
    };
    assert_eq!(
        p.remove(&foreign).await.unwrap_err().class,
        ErrorClass::Invalid
    );
    assert_eq!(server.users(testkit::MANAGER).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_is_retryable_while_the_server_is_down() {
    let (mut server, cfg) = setup().await;
    let p = MysqlProvider::new(cfg, 86_400).unwrap();
    let s = spec("writer", Duration::from_secs(60), &[]);
    let issued = p.issue(&s).await.unwrap();
    let r = RevokeSpec::of(&s, &issued);
    tokio::task::block_in_place(|| server.stop_server());
    let e = p.revoke(&r).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    tokio::task::block_in_place(|| server.start_server());
    p.revoke(&r).await.unwrap();
    assert!(!usable(&server, &issued.credential).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_drops_the_user_at_the_lease_end_on_its_own() {
    let (server, mut cfg) = setup().await;
    cfg.expiry_schema = Some(testkit::EVENTS.into());
    let p = MysqlProvider::new(cfg, 86_400).unwrap();
    p.health().await.unwrap();
    let s = spec("writer", Duration::from_secs(2), &[]);
    let issued = p.issue(&s).await.unwrap();
    assert!(usable(&server, &issued.credential).await.unwrap());
    // the broker never revokes: the event does
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while usable(&server, &issued.credential).await.unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "the user outlived its lease by 13 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(server.users("lh_").await.is_empty());
    // revoking afterwards is still fine (idempotent, the event is gone)
    p.revoke(&RevokeSpec::of(&s, &issued)).await.unwrap();
}
