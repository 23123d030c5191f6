//! TLS through rustls, and workload keys fetched from a JWKS URL.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Harness, Options, claims};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_tls_and_refuses_plaintext() {
    let h = Harness::start_tls().await;
    let task = h.open_task(&h.tokens.a, 600).await;
    let lease = h.lease(&h.tokens.a, &task, 60).await;
    assert!(
        h.introspect(lease["credential"]["token"].as_str().unwrap())
            .await
    );
    // the same port does not speak plaintext HTTP
    let plain = crate::harness::client()
        .get(format!("http://{}/v1/health", h.addr))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    // and a client that does not trust the CA refuses the connection
    let untrusting = crate::harness::client()
        .get(h.url("/v1/health"))
        .send()
        .await;
    assert!(
        untrusting.is_err(),
        "the test CA must not be trusted by default"
    );
}

/// A JWKS endpoint whose document the test can change, counting fetches.
struct Jwks {
    doc: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    fail: Arc<std::sync::atomic::AtomicBool>,
    addr: std::net::SocketAddr,
}

async fn serve_jwks(initial: String) -> Jwks {
    let doc = Arc::new(Mutex::new(initial));
    let fetches = Arc::new(AtomicUsize::new(0));
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (d, f, x) = (doc.clone(), fetches.clone(), fail.clone());
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let (d, f, x) = (d.clone(), f.clone(), x.clone());
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                if x.load(Ordering::SeqCst) {
                    return (StatusCode::INTERNAL_SERVER_ERROR, String::new());
                }
                (StatusCode::OK, d.lock().unwrap().clone())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Jwks {
        doc,
        fetches,
        fail,
        addr,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_keys_come_from_a_jwks_url_and_rotate() {
    // the dev issuer's key, published over HTTP instead of from a file
    let seed = tempfile::tempdir().unwrap();
    leasehold::dev::prepare(
        seed.path(),
        "127.0.0.1:1".parse().unwrap(),
        crate::harness::now_rounded(),
    )
    .unwrap();
    let first = std::fs::read_to_string(seed.path().join("dev-issuer.jwks.json")).unwrap();
    let jwks = serve_jwks(first).await;
    let url = format!("http://{}/jwks", jwks.addr);
    let h = Harness::start(Options {
        manual_clock: true,
        tweak: Box::new(move |c| {
            let i = &mut c.auth.workload_issuers[0];
            i.jwks_file = None;
            i.jwks_url = Some(url.clone());
        }),
        ..Options::default()
    })
    .await;
    // the harness's own dev issuer key differs from the seed's; sign with the seed's
    let seed_token = crate::harness::mint_in(
        seed.path(),
        &claims("assistant-a", crate::harness::now_rounded()),
    );
    let body = json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 60});
    let (s, _) = h.post(&seed_token, "/v1/tasks", body.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "keys fetched at start-up");
    let fetched = jwks.fetches.load(Ordering::SeqCst);
    assert_eq!(fetched, 1);

    // rotate: a new key with a new kid replaces the old one at the URL
    let doc = leasehold_provider_token::generate_signing_key().unwrap();
    let key = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&doc).unwrap();
    *jwks.doc.lock().unwrap() = leasehold::dev::jwks_for(&key, "dev-issuer-2").to_string();
    let rotated = leasehold::dev::sign_jwt(
        &key,
        "dev-issuer-2",
        &claims("assistant-a", crate::harness::now_rounded()),
    );
    // an unknown kid refetches, but at most every 30 s: first refused...
    let (s, _) = h.post(&rotated, "/v1/tasks", body.clone()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1, "no refetch storm");
    // ...then, after the minimum interval, fetched and accepted
    h.advance(Duration::from_secs(31));
    let (s, v) = h.post(&rotated, "/v1/tasks", body.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 2);
    // the old key is gone: a fresh token signed with it is refused (the old
    // token itself was cached; the cache lasts at most 60 s)
    h.advance(Duration::from_secs(61));
    let old = crate::harness::mint_in(
        seed.path(),
        &claims("assistant-b", crate::harness::now_rounded()),
    );
    let (s, _) = h.post(&old, "/v1/tasks", body.clone()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // the endpoint failing keeps the keys we have
    jwks.fail.store(true, Ordering::SeqCst);
    h.advance(Duration::from_secs(31));
    let unknown = leasehold::dev::sign_jwt(
        &key,
        "dev-issuer-3",
        &claims("assistant-a", crate::harness::now_rounded()),
    );
    let (s, _) = h.post(&unknown, "/v1/tasks", body.clone()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let again = leasehold::dev::sign_jwt(
        &key,
        "dev-issuer-2",
        &claims("assistant-b", crate::harness::now_rounded()),
    );
    let (s, _) = h.post(&again, "/v1/tasks", body).await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "a failed refresh keeps the old keys"
    );
}
