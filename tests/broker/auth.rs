//! Authentication: every way a workload token can be wrong is a 401 with
//! the stable code `unauthenticated`, and changes nothing.

use reqwest::StatusCode;
use serde_json::{Value, json};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

use crate::harness::{Harness, Options, claims};

fn unsigned(header: Value, claims: &Value) -> String {
    format!(
        "{}.{}.",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    )
}

fn hs256(secret: &[u8], claims: &Value) -> String {
    let mut t = format!(
        "{}.{}",
        B64.encode(r#"{"alg":"HS256","typ":"JWT","kid":"dev-issuer-1"}"#),
        B64.encode(claims.to_string())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let sig = ring::hmac::sign(&key, t.as_bytes());
    t.push('.');
    t.push_str(&B64.encode(sig.as_ref()));
    t
}

#[tokio::test]
async fn bad_tokens_are_refused() {
    let h = Harness::start(Options::default()).await;
    let now = crate::harness::now_rounded();
    let good = claims("assistant-a", now);
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove(k);
        c
    };
    // a stranger's key, same kid: a forged signature
    let stranger = {
        let doc = leasehold_provider_token::generate_signing_key().unwrap();
        let k = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&doc).unwrap();
        leasehold::dev::sign_jwt(&k, "dev-issuer-1", &good)
    };
    // the issuer's public key used as an HMAC secret: the classic confusion
    let jwks: Value =
        serde_json::from_slice(&std::fs::read(h.dir.path().join("dev-issuer.jwks.json")).unwrap())
            .unwrap();
    let public = B64.decode(jwks["keys"][0]["x"].as_str().unwrap()).unwrap();
    let t = now.unix_seconds();

    let cases: Vec<(&str, String)> = vec![
        ("expired", h.mint(&with("exp", json!(t - 120)))),
        ("not yet valid", h.mint(&with("nbf", json!(t + 600)))),
        ("issued in the future", h.mint(&with("iat", json!(t + 600)))),
        (
            "wrong audience",
            h.mint(&with("aud", json!("someone-else"))),
        ),
        (
            "foreign issuer",
            h.mint(&with("iss", json!("https://evil.example"))),
        ),
        ("no subject", h.mint(&without("sub"))),
        ("no expiry", h.mint(&without("exp"))),
        ("forged signature", stranger),
        (
            "alg none",
            unsigned(json!({"alg": "none", "typ": "JWT"}), &good),
        ),
        ("HS256 with the public key", hs256(&public, &good)),
        (
            "RS256 header",
            unsigned(json!({"alg": "RS256", "kid": "dev-issuer-1"}), &good),
        ),
        ("garbage", "not.a.jwt".to_owned()),
        (
            "unknown operator token",
            "lho_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_owned(),
        ),
        ("empty", String::new()),
    ];
    let before = h.snapshot().await;
    for (what, token) in &cases {
        let (s, v) = h
            .post(
                token,
                "/v1/tasks",
                json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 60}),
            )
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {v}");
        assert_eq!(v["error"]["code"], "unauthenticated", "{what}");
    }
    // the scheme must be Bearer, and the challenge says so
    let r = h
        .http
        .get(h.url("/v1/leases"))
        .header("authorization", format!("Basic {}", h.tokens.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert_eq!(h.snapshot().await, before);

    // inside the configured leeway (30 s) a just-expired token still works
    let skewed = h.mint(&with("exp", json!(t - 10)));
    let (s, _) = h
        .post(
            &skewed,
            "/v1/tasks",
            json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
}

#[tokio::test]
async fn workload_identity_comes_from_the_token() {
    let h = Harness::start(Options::default()).await;
    let token = h.mint(&claims("assistant-b", crate::harness::now_rounded()));
    let (s, v) = h
        .post(
            &token,
            "/v1/tasks",
            json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(v["workload"], "dev:assistant-b");
    assert_eq!(v["tenant"], "dev");
    // a valid token for a workload no policy grants anything: authenticated, then refused
    let stranger = h.mint(&claims("ci-runner-7", crate::harness::now_rounded()));
    let (s, v) = h
        .post(
            &stranger,
            "/v1/tasks",
            json!({"purpose": "p", "on_behalf_of": "u", "prompt": "x", "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("policy_denied")),
        "{v}"
    );
}
