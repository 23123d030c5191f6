//! Workloads that sign in with X.509 client certificates (SPIFFE
//! X.509-SVIDs) over mutual TLS, and leased tokens bound to the workload's
//! key: a DPoP proof (RFC 9449) or its client certificate (RFC 8705).
//! Certificates are made here with rcgen; proofs are signed here with ring.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use reqwest::StatusCode;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde_json::{Value, json};

use crate::harness::{Harness, Options, fixture};

// === certificates ===

/// A CA made for the test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = p.self_signed(&key).unwrap().pem();
    Ca {
        issuer: Issuer::new(p, key),
        pem,
    }
}

/// A client certificate: PEM of the certificate and key (for reqwest's
/// identity), and the certificate's DER.
struct Client {
    identity_pem: String,
    cert_pem: String,
    der: Vec<u8>,
}

#[derive(Clone, Copy)]
enum Validity {
    Current,
    Expired,
}

fn svid(ca: &Ca, uri: &str, validity: Validity) -> Client {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::from_unix_timestamp(now_s()).unwrap();
    (p.not_before, p.not_after) = match validity {
        Validity::Current => (
            now - time::Duration::hours(1),
            now + time::Duration::hours(1),
        ),
        Validity::Expired => (now - time::Duration::days(2), now - time::Duration::days(1)),
    };
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    Client {
        identity_pem: format!("{}{}", cert.pem(), key.serialize_pem()),
        cert_pem: cert.pem(),
        der: cert.der().to_vec(),
    }
}

/// Replace a file the way an operator's tooling does: a new file renamed
/// over the old one.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A broker on TLS with an `x509` issuer `spire` for the trust domain
/// `prod.test` (bundle `bundle`), the tenant from the SPIFFE ID's second
/// path segment, and a policy admitting its workloads.
async fn mtls_broker(bundle: PathBuf) -> Harness {
    mtls_broker_with(format!(
        "kind = 'x509'\nname = 'spire'\ntrust_bundle_file = {bundle:?}\ntrust_domain = 'prod.test'\ntenant_path_segment = 2\n"
    ))
    .await
}

/// A broker on TLS with this `x509` issuer (named `spire` or `corp`).
async fn mtls_broker_with(issuer_toml: String) -> Harness {
    Harness::start(Options {
        tweak: Box::new(move |c| {
            crate::harness::serve_tls(c);
            let issuer: leasehold::config::IssuerConfig = toml::from_str(&issuer_toml).unwrap();
            c.auth.workload_issuers.push(issuer);
            std::fs::write(
                c.policy.dir.join("x509.cedar"),
                "@id(\"x509-workloads\")\npermit (principal, action, resource)\nwhen { context.workload.issuer == \"spire\" || context.workload.issuer == \"corp\" };\n",
            )
            .unwrap();
        }),
        ..Options::default()
    })
    .await
}

/// An HTTPS client of `h` presenting `cert` (or none).
fn client_with(cert: Option<&Client>) -> reqwest::Client {
    let ca = std::fs::read(fixture("tls/ca.pem")).unwrap();
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
    if let Some(c) = cert {
        b = b.identity(reqwest::Identity::from_pem(c.identity_pem.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

async fn send(http: &reqwest::Client, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let _ = http;
    let r = req.send().await.unwrap();
    let s = r.status();
    let text = r.text().await.unwrap();
    (
        s,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn task_body() -> Value {
    json!({"purpose": "mtls", "on_behalf_of": "alice@example.com", "prompt": "p", "tools": ["demo.read"], "ttl_seconds": 600})
}

/// The `auth.denied` events' reasons, newest last.
async fn denials(h: &Harness) -> Vec<String> {
    let (s, v) = h
        .get(&h.tokens.admin, "/v1/events?kind=auth.denied&limit=1000")
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_sign_in_with_x509_svids_and_refused_certificates_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (good_ca, rogue_ca) = (ca("prod.test CA"), ca("rogue CA"));
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, &good_ca.pem).unwrap();
    let h = mtls_broker(bundle.clone()).await;
    let id = "spiffe://prod.test/tenant/acme/agent/summarizer";

    // a valid X.509-SVID signs in as its SPIFFE ID, tenant from the path
    let good = svid(&good_ca, id, Validity::Current);
    let http = client_with(Some(&good));
    let (s, v) = send(&http, http.post(h.url("/v1/tasks")).json(&task_body())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let task = v["task_id"].as_str().unwrap().to_owned();
    let (s, v) = send(&http, http.get(h.url(&format!("/v1/tasks/{task}")))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["workload"], format!("spire:{id}"));
    assert_eq!(v["tenant"], "acme");

    // refused, each with a 401 that says nothing about why...
    let cases = [
        (
            "another trust domain",
            svid(
                &good_ca,
                "spiffe://other.test/tenant/acme/agent/x",
                Validity::Current,
            ),
            "trust domain",
        ),
        ("expired", svid(&good_ca, id, Validity::Expired), "expired"),
        (
            "an unknown CA",
            svid(&rogue_ca, id, Validity::Current),
            "no CA of the trust bundle",
        ),
        (
            "two URI SANs",
            {
                let key = KeyPair::generate().unwrap();
                let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
                p.subject_alt_names = vec![
                    SanType::URI(id.try_into().unwrap()),
                    SanType::URI(
                        "spiffe://prod.test/tenant/other/agent/y"
                            .try_into()
                            .unwrap(),
                    ),
                ];
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                let cert = p.signed_by(&key, &good_ca.issuer).unwrap();
                Client {
                    identity_pem: format!("{}{}", cert.pem(), key.serialize_pem()),
                    cert_pem: cert.pem(),
                    der: cert.der().to_vec(),
                }
            },
            "exactly one URI SAN",
        ),
        (
            "a certificate that signs certificates",
            {
                let key = KeyPair::generate().unwrap();
                let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
                p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
                p.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                ];
                let cert = p.signed_by(&key, &good_ca.issuer).unwrap();
                Client {
                    identity_pem: format!("{}{}", cert.pem(), key.serialize_pem()),
                    cert_pem: cert.pem(),
                    der: cert.der().to_vec(),
                }
            },
            "must not sign certificates",
        ),
    ];
    for (what, cert, reason) in &cases {
        let http = client_with(Some(cert));
        let (s, v) = send(&http, http.post(h.url("/v1/tasks")).json(&task_body())).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {v}");
        assert_eq!(
            v["error"]["message"], "the client certificate was not accepted",
            "{what}: no detail leaks"
        );
        // ...and recorded on the chain with the reason, for investigators
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let recorded = denials(&h).await;
        assert!(
            recorded.last().is_some_and(|r| r.contains(reason)),
            "{what}: {recorded:?}"
        );
    }
    // without a certificate or a bearer token: the usual 401
    let anon = client_with(None);
    let (s, _) = send(&anon, anon.post(h.url("/v1/tasks")).json(&task_body())).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // a JWT workload still signs in on the same listener
    let (s, v) = h.post(&h.tokens.a, "/v1/tasks", task_body()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    // revoked by removal from the bundle: at once, no restart, no cache
    let other = ca("another CA");
    replace(&bundle, &other.pem);
    let (s, v) = send(&http, http.get(h.url(&format!("/v1/tasks/{task}")))).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        denials(&h)
            .await
            .last()
            .is_some_and(|r| r.contains("no CA of the trust bundle")),
    );
    // and back when the CA is
    replace(&bundle, &format!("{}{}", other.pem, good_ca.pem));
    let (s, v) = send(&http, http.get(h.url(&format!("/v1/tasks/{task}")))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // a bundle that cannot be read vouches for no one
    replace(&bundle, "not a PEM file");
    let (s, _) = send(&http, http.get(h.url(&format!("/v1/tasks/{task}")))).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_sign_in_by_a_subject_pattern_with_the_tenant_from_the_subject() {
    let dir = tempfile::tempdir().unwrap();
    let corp = ca("corp CA");
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, &corp.pem).unwrap();
    let h = mtls_broker_with(format!(
        "kind = 'x509'\nname = 'corp'\ntrust_bundle_file = {bundle:?}\nsubject_pattern = '*.agents.test'\ntenant_subject_attribute = 'O'\n"
    ))
    .await;
    let cert = |cn: &str, org: Option<&str>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        if let Some(o) = org {
            p.distinguished_name.push(DnType::OrganizationName, o);
        }
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let c = p.signed_by(&key, &corp.issuer).unwrap();
        Client {
            identity_pem: format!("{}{}", c.pem(), key.serialize_pem()),
            cert_pem: c.pem(),
            der: c.der().to_vec(),
        }
    };
    let ok = cert("billing.agents.test", Some("acme"));
    let http = client_with(Some(&ok));
    let (s, v) = send(&http, http.post(h.url("/v1/tasks")).json(&task_body())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (_, v) = send(
        &http,
        http.get(h.url(&format!("/v1/tasks/{}", v["task_id"].as_str().unwrap()))),
    )
    .await;
    assert_eq!(v["workload"], "corp:billing.agents.test");
    assert_eq!(v["tenant"], "acme");
    // the wildcard is one label; the tenant must be there; a server's
    // certificate purpose is not a client's
    for (what, c) in [
        (
            "two labels for the wildcard",
            cert("a.billing.agents.test", Some("acme")),
        ),
        (
            "another domain",
            cert("billing.agents.test.evil", Some("acme")),
        ),
        ("no organization (tenant)", cert("ops.agents.test", None)),
        ("server authentication only", {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name
                .push(DnType::CommonName, "web.agents.test");
            p.distinguished_name.push(DnType::OrganizationName, "acme");
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let c = p.signed_by(&key, &corp.issuer).unwrap();
            Client {
                identity_pem: format!("{}{}", c.pem(), key.serialize_pem()),
                cert_pem: c.pem(),
                der: c.der().to_vec(),
            }
        }),
    ] {
        let http = client_with(Some(&c));
        let (s, v) = send(&http, http.post(h.url("/v1/tasks")).json(&task_body())).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_certificates_are_recorded_at_a_bounded_rate() {
    let dir = tempfile::tempdir().unwrap();
    let good_ca = ca("prod.test CA");
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, &good_ca.pem).unwrap();
    let h = mtls_broker(bundle).await;
    let rogue = svid(&ca("rogue"), "spiffe://prod.test/a", Validity::Current);
    let http = client_with(Some(&rogue));
    let before = denials(&h).await.len();
    let mut refused = 0;
    for _ in 0..40 {
        let (s, _) = send(&http, http.post(h.url("/v1/tasks")).json(&task_body())).await;
        if s == StatusCode::UNAUTHORIZED || s == StatusCode::TOO_MANY_REQUESTS {
            refused += 1;
        }
    }
    assert_eq!(refused, 40);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let recorded = denials(&h).await.len() - before;
    let per_second = h.config.audit.auth_denied_events_per_second as usize;
    assert!(
        (1..=per_second * 3).contains(&recorded),
        "{recorded} denials recorded for 40 attempts (at most {per_second}/s)"
    );
}

// === DPoP ===

/// A workload's DPoP key (ES256).
struct DpopKey {
    pair: EcdsaKeyPair,
    jwk: Value,
}

impl DpopKey {
    fn new() -> Self {
        let rng = ring::rand::SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng).unwrap();
        let point = pair.public_key().as_ref();
        let jwk = json!({
            "kty": "EC", "crv": "P-256",
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
        });
        Self { pair, jwk }
    }

    /// RFC 7638, computed independently of the broker's code.
    fn thumbprint(&self) -> String {
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            self.jwk["x"].as_str().unwrap(),
            self.jwk["y"].as_str().unwrap()
        );
        B64.encode(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
    }

    /// A proof with these claims, its header naming `header_jwk`.
    fn sign_with_header(&self, header_jwk: &Value, claims: &Value) -> String {
        let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": header_jwk});
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = self
            .pair
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", B64.encode(sig.as_ref()))
    }

    fn proof(&self, method: &str, url: &str, iat: i64) -> String {
        self.sign_with_header(
            &self.jwk,
            &json!({"jti": uuid(), "htm": method, "htu": url, "iat": iat}),
        )
    }
}

fn uuid() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    B64.encode(b)
}

fn now_s() -> i64 {
    use leasehold::clock::Clock as _;
    leasehold::clock::SystemClock.now().unix_seconds()
}

/// `POST path` as workload `token` with a `DPoP` header.
async fn post_dpop(
    h: &Harness,
    token: &str,
    path: &str,
    proof: &str,
    body: Value,
) -> (StatusCode, Value) {
    let req = h
        .http
        .post(h.url(path))
        .bearer_auth(token)
        .header("DPoP", proof)
        .json(&body);
    send(&h.http, req).await
}

fn claims_of(token: &str) -> Value {
    serde_json::from_slice(&B64.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap()
}

async fn introspection(h: &Harness, token: &str) -> Value {
    let r = h
        .http
        .post(h.url("/v1/introspect"))
        .bearer_auth(&h.tokens.resource)
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

async fn lease_count(h: &Harness) -> usize {
    h.snapshot().await.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_bound_leases_carry_cnf_and_bad_proofs_are_refused() {
    let h = Harness::start(Options::default()).await;
    let a = &h.tokens.a;
    let task = h.open_task(a, 600).await;
    let path = format!("/v1/tasks/{task}/leases");
    let url = h.url(&path);
    let bound = json!({"provider": "token", "role": "demo-bound", "ttl_seconds": 120});
    let key = DpopKey::new();

    // a role that requires binding refuses a bearer request, recording nothing
    let before = lease_count(&h).await;
    let (s, v) = h.post(a, &path, bound.clone()).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "binding_required", "{v}");
    assert_eq!(lease_count(&h).await, before, "nothing recorded");

    // with a proof: a token bound to the key's thumbprint
    let (s, v) = post_dpop(
        &h,
        a,
        &path,
        &key.proof("POST", &url, now_s()),
        bound.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let token = v["credential"]["token"].as_str().unwrap().to_owned();
    assert_eq!(claims_of(&token)["cnf"], json!({"jkt": key.thumbprint()}));
    let i = introspection(&h, &token).await;
    assert_eq!(i["active"], true);
    assert_eq!(i["cnf"], json!({"jkt": key.thumbprint()}));
    // the lease's record says what it is bound to
    let lease = v["lease_id"].as_str().unwrap();
    let (_, l) = h.get(&h.tokens.admin, &format!("/v1/leases/{lease}")).await;
    assert!(
        l["description"]
            .as_str()
            .unwrap()
            .contains(&key.thumbprint()),
        "{l}"
    );

    // an optional role binds too when a proof comes, and not without one
    let demo = json!({"provider": "token", "role": "demo", "ttl_seconds": 60});
    let (s, v) = post_dpop(
        &h,
        a,
        &path,
        &key.proof("POST", &url, now_s()),
        demo.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let t = v["credential"]["token"].as_str().unwrap();
    assert_eq!(claims_of(t)["cnf"]["jkt"], key.thumbprint());
    let (s, v) = h.post(a, &path, demo.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let t = v["credential"]["token"].as_str().unwrap();
    assert!(claims_of(t).get("cnf").is_none());
    assert!(introspection(&h, t).await.get("cnf").is_none());

    // refused at lease time, with nothing recorded
    let replayed = key.proof("POST", &url, now_s());
    let (s, v) = post_dpop(&h, a, &path, &replayed, bound.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let other = DpopKey::new();
    let before = lease_count(&h).await;
    let cases: Vec<(&str, String, &str)> = vec![
        ("replayed (same jti)", replayed, "already used"),
        ("stale iat", key.proof("POST", &url, now_s() - 600), "too old"),
        ("iat in the future", key.proof("POST", &url, now_s() + 600), "future"),
        ("another method", key.proof("PUT", &url, now_s()), "htm"),
        (
            "another URL",
            key.proof("POST", &h.url(&format!("/v1/tasks/{task}/calls")), now_s()),
            "htu",
        ),
        (
            "another host",
            key.proof("POST", &url.replace("127.0.0.1", "broker.example"), now_s()),
            "htu",
        ),
        (
            "signed by another key than its jwk",
            other.sign_with_header(
                &key.jwk,
                &json!({"jti": uuid(), "htm": "POST", "htu": url, "iat": now_s()}),
            ),
            "signature",
        ),
        (
            "a private key in its jwk",
            key.sign_with_header(
                &{
                    let mut j = key.jwk.clone();
                    j["d"] = json!("AAAA");
                    j
                },
                &json!({"jti": uuid(), "htm": "POST", "htu": url, "iat": now_s()}),
            ),
            "jwk",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                B64.encode(json!({"typ": "dpop+jwt", "alg": "none", "jwk": key.jwk}).to_string()),
                B64.encode(json!({"jti": uuid(), "htm": "POST", "htu": url, "iat": now_s()}).to_string())
            ),
            "algorithm",
        ),
        (
            "an ath for another token",
            key.sign_with_header(
                &key.jwk,
                &json!({"jti": uuid(), "htm": "POST", "htu": url, "iat": now_s(), "ath": B64.encode([7u8; 32])}),
            ),
            "ath",
        ),
        ("garbage", "not.a.proof".to_owned(), "JWS"),
    ];
    for (what, proof, says) in cases {
        let (s, v) = post_dpop(&h, a, &path, &proof, bound.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{what}: {v}");
        assert_eq!(v["error"]["code"], "invalid_dpop_proof", "{what}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{what}: {v}"
        );
    }
    assert_eq!(
        lease_count(&h).await,
        before,
        "no refused proof left a lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_see_whether_a_request_is_bound() {
    let h = Harness::start(Options {
        tweak: Box::new(|c| {
            std::fs::write(
                c.policy.dir.join("bound-only.cedar"),
                "@id(\"sensitive-needs-binding\")\n@reason(\"credentials for `sensitive` must be bound to the workload's key\")\nforbid (principal, action == Leasehold::Action::\"Lease\", resource)\nwhen { context.target == \"sensitive\" && !(context.bound && context.binding == \"dpop\") };\n",
            )
            .unwrap();
        }),
        ..Options::default()
    })
    .await;
    let a = &h.tokens.a;
    let task = h.open_task(a, 600).await;
    let path = format!("/v1/tasks/{task}/calls");
    let call = json!({"tool": "demo.read", "action": "read", "resource": "sensitive",
        "credential": {"provider": "token", "role": "demo", "ttl_seconds": 60}});
    let (s, v) = h.post(a, &path, call.clone()).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "policy_denied", "{v}");
    assert!(v.to_string().contains("sensitive-needs-binding"), "{v}");
    let key = DpopKey::new();
    let (s, v) = post_dpop(
        &h,
        a,
        &path,
        &key.proof("POST", &h.url(&path), now_s()),
        call,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let token = v["lease"]["credential"]["token"].as_str().unwrap();
    assert_eq!(claims_of(token)["cnf"]["jkt"], key.thumbprint());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_bound_leases_carry_the_certificate_thumbprint() {
    let dir = tempfile::tempdir().unwrap();
    let good_ca = ca("prod.test CA");
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, &good_ca.pem).unwrap();
    let h = mtls_broker(bundle).await;
    let cert = svid(
        &good_ca,
        "spiffe://prod.test/tenant/acme/agent/a",
        Validity::Current,
    );
    let http = client_with(Some(&cert));
    let (s, v) = send(&http, http.post(h.url("/v1/tasks")).json(&task_body())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let task = v["task_id"].as_str().unwrap().to_owned();
    let body = json!({"provider": "token", "role": "demo-bound", "ttl_seconds": 60});
    let (s, v) = send(
        &http,
        http.post(h.url(&format!("/v1/tasks/{task}/leases")))
            .json(&body),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let token = v["credential"]["token"].as_str().unwrap();
    let x5t = B64.encode(ring::digest::digest(&ring::digest::SHA256, &cert.der).as_ref());
    assert_eq!(claims_of(token)["cnf"], json!({"x5t#S256": x5t}));
    assert_eq!(
        introspection(&h, token).await["cnf"],
        json!({"x5t#S256": x5t})
    );
    // a JWT workload whose connection has no certificate cannot have one
    let t2 = h.open_task(&h.tokens.a, 600).await;
    let (s, v) = h
        .post(&h.tokens.a, &format!("/v1/tasks/{t2}/leases"), body)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "binding_required");
}

// === the resource server's side: the SDK's leasehold.bound ===

fn python() -> String {
    std::env::var("LEASEHOLD_PYTHON").unwrap_or_else(|_| {
        panic!(
            "LEASEHOLD_PYTHON is not set: a Python with `cryptography` (integration/test.sh \
             installs it into integration/.venv and sets it)"
        )
    })
}

/// Run the verification helper on one request; Ok(claims) or Err(why).
fn helper(
    dir: &Path,
    jwks: &Value,
    token: &str,
    method: &str,
    url: &str,
    proof: Option<&str>,
    client_cert_pem: Option<&str>,
) -> Result<Value, String> {
    let w = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let mut cmd = std::process::Command::new(python());
    cmd.env(
        "PYTHONPATH",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/python/src"),
    )
    .env("PYTHONDONTWRITEBYTECODE", "1")
    .args(["-m", "leasehold.bound"])
    .arg("--jwks")
    .arg(w("jwks.json", &jwks.to_string()))
    .arg("--token-file")
    .arg(w("token", token))
    .args(["--method", method, "--url", url]);
    if let Some(p) = proof {
        cmd.arg("--dpop-file").arg(w("proof", p));
    }
    if let Some(c) = client_cert_pem {
        cmd.arg("--client-cert").arg(w("client.pem", c));
    }
    let out = cmd.output().unwrap();
    match out.status.code() {
        Some(0) => Ok(serde_json::from_slice(&out.stdout).unwrap()),
        Some(1) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        _ => panic!(
            "the helper failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// A proof for a resource server request, hashing the token (`ath`).
fn rs_proof(key: &DpopKey, method: &str, url: &str, token: &str) -> String {
    let ath = B64.encode(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    key.sign_with_header(
        &key.jwk,
        &json!({"jti": uuid(), "htm": method, "htu": url, "iat": now_s(), "ath": ath}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verification_helper_accepts_the_key_holder_and_refuses_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let good_ca = ca("prod.test CA");
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, &good_ca.pem).unwrap();
    let h = mtls_broker(bundle).await;
    let (_, jwks) = h.get("", "/.well-known/jwks.json").await;
    let work = tempfile::tempdir().unwrap();
    let api = "https://api.example/v1/docs/1";

    // DPoP-bound: the holder of the key passes, a copy does not
    let key = DpopKey::new();
    let task = h.open_task(&h.tokens.a, 600).await;
    let path = format!("/v1/tasks/{task}/leases");
    let (s, v) = post_dpop(
        &h,
        &h.tokens.a,
        &path,
        &key.proof("POST", &h.url(&path), now_s()),
        json!({"provider": "token", "role": "demo-bound", "ttl_seconds": 120}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let token = v["credential"]["token"].as_str().unwrap();
    assert_eq!(
        introspection(&h, token).await["cnf"]["jkt"],
        key.thumbprint()
    );
    // the resource server's check of one GET with this token and proof
    let dpop = |token: &str, proof: Option<String>| {
        helper(
            work.path(),
            &jwks,
            token,
            "GET",
            api,
            proof.as_deref(),
            None,
        )
    };
    let ok = dpop(token, Some(rs_proof(&key, "GET", api, token))).unwrap();
    assert_eq!(ok["cnf"]["jkt"], key.thumbprint());
    let thief = DpopKey::new();
    let e = dpop(token, Some(rs_proof(&thief, "GET", api, token))).unwrap_err();
    assert!(e.contains("not the key the token is bound to"), "{e}");
    let e = dpop(token, None).unwrap_err();
    assert!(e.contains("a DPoP proof is required"), "{e}");
    let e = dpop(token, Some(rs_proof(&key, "DELETE", api, token))).unwrap_err();
    assert!(e.contains("another method"), "{e}");
    // a forged token (its payload changed) fails the signature
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut c = claims_of(token);
    c["scope"] = json!("demo:admin");
    parts[1] = B64.encode(c.to_string());
    let forged = parts.join(".");
    let e = dpop(&forged, Some(rs_proof(&key, "GET", api, &forged))).unwrap_err();
    assert!(e.contains("bad signature"), "{e}");

    // certificate-bound: the same certificate passes, another does not
    let cert = svid(
        &good_ca,
        "spiffe://prod.test/tenant/acme/agent/a",
        Validity::Current,
    );
    let http = client_with(Some(&cert));
    let (_, v) = send(&http, http.post(h.url("/v1/tasks")).json(&task_body())).await;
    let t = v["task_id"].as_str().unwrap().to_owned();
    let (s, v) = send(
        &http,
        http.post(h.url(&format!("/v1/tasks/{t}/leases")))
            .json(&json!({"provider": "token", "role": "demo-bound", "ttl_seconds": 60})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let token = v["credential"]["token"].as_str().unwrap();
    let mtls = |cert: Option<&str>| helper(work.path(), &jwks, token, "GET", api, None, cert);
    let ok = mtls(Some(&cert.cert_pem)).unwrap();
    assert!(ok["cnf"]["x5t#S256"].is_string());
    let other = svid(
        &good_ca,
        "spiffe://prod.test/tenant/acme/agent/b",
        Validity::Current,
    );
    let e = mtls(Some(&other.cert_pem)).unwrap_err();
    assert!(e.contains("not the one the token is bound to"), "{e}");
    let e = mtls(None).unwrap_err();
    assert!(e.contains("use mutual TLS"), "{e}");
}
