//! The AWS provider at the wire level, against moto. moto accepts the calls
//! but enforces nothing (no policy evaluation, tags and SourceIdentity
//! dropped), so "revoked" here means what AWS would enforce: the role's
//! deny policy, read back with GetRolePolicy, names the session. What goes
//! on the wire (SourceIdentity, tags, session policy, duration) is checked
//! against a local stand-in that records the request.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use leasehold_provider::conformance::{self, Probe, SpecFactory};
use leasehold_provider::{Credential, ErrorClass, LeaseSpec, Provider, RevokeSpec, Timestamp};
use leasehold_provider_aws_sts::policy::Method;
use leasehold_provider_aws_sts::testkit::Moto;
use leasehold_provider_aws_sts::{AwsRole, AwsStsConfig, AwsStsProvider, Now};

fn now() -> Timestamp {
    let ms = std::time::UNIX_EPOCH.elapsed().unwrap().as_millis() as i64;
    Timestamp::from_unix_millis(ms)
}

fn clock() -> Now {
    Arc::new(now)
}

static N: AtomicU64 = AtomicU64::new(0);

fn spec(role: &str, ttl: Duration, scope: &[&str]) -> LeaseSpec {
    let n = N.fetch_add(1, Ordering::Relaxed);
    let now = now();
    LeaseSpec {
        lease_id: format!("lease_{:026}", now.unix_millis() as u64 * 1000 + n),
        task_id: "task_01jdq3example".into(),
        workload: "dev:assistant-a".into(),
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

struct Specs;
impl SpecFactory for Specs {
    fn spec(&self, role: &str, ttl: Duration) -> LeaseSpec {
        spec(role, ttl, &[])
    }
}

fn config(endpoint: String, reader_arn: &str) -> AwsStsConfig {
    let mut c: AwsStsConfig = toml::from_str(&format!(
        r#"
        region = "us-east-1"
        endpoint_url = "{endpoint}"
        max_attempts = 2
        [roles.reader]
        role_arn = "{reader_arn}"
        max_ttl_seconds = 3600
        [roles.reports]
        role_arn = "{reader_arn}"
        max_ttl_seconds = 3600
        session_policy = '{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"s3:GetObject","Resource":"arn:aws:s3:::reports/{{{{scope}}}}/*"}}]}}'
        scopes = ["2026/*", "summary"]
        external_id = "leasehold-test-external"
        "#
    ))
    .unwrap();
    let resources: Vec<String> = (0..10)
        .map(|n| format!("\"arn:aws:s3:::bucket{n}/{{{{scope}}}}/*\""))
        .collect();
    c.roles.insert(
        "wide".into(),
        AwsRole {
            role_arn: reader_arn.into(),
            max_ttl_seconds: 3600,
            session_policy: Some(format!(
                r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"s3:GetObject","Resource":[{}]}}]}}"#,
                resources.join(",")
            )),
            scopes: vec!["*".into()],
            allow_role_chaining: false,
            external_id: None,
            description: String::new(),
        },
    );
    c.roles.insert(
        "ghost".into(),
        AwsRole {
            role_arn: "arn:aws:iam::123456789012:role/does-not-exist".into(),
            max_ttl_seconds: 3600,
            session_policy: None,
            scopes: vec![],
            allow_role_chaining: false,
            external_id: None,
            description: String::new(),
        },
    );
    c
}

async fn started() -> (Moto, AwsStsProvider) {
    let moto = Moto::start();
    let arn = moto.create_role("app-reader").await;
    let p = AwsStsProvider::new(
        config(moto.endpoint(), &arn),
        86_400,
        clock(),
        Some(Moto::credentials()),
    )
    .unwrap();
    (moto, p)
}

/// Uses the credential at the wire (GetCallerIdentity with it), and says
/// whether AWS would still honour it: not if the role's deny policy names
/// the session.
struct CallerIdentity<'a> {
    moto: &'a Moto,
    provider: &'a AwsStsProvider,
}

#[async_trait::async_trait]
impl Probe for CallerIdentity<'_> {
    async fn usable(&self, spec: &LeaseSpec, c: &Credential) -> Result<bool, String> {
        let creds = leasehold_provider_aws_sts::testkit::lease_credentials(c);
        let conf =
            leasehold_provider_aws_sts::sdk_config("us-east-1", Some(&self.moto.endpoint()), creds)
                .await;
        let who = aws_sdk_sts::Client::new(&conf)
            .get_caller_identity()
            .send()
            .await
            .map_err(|e| format!("GetCallerIdentity with the leased credentials: {e:?}"))?;
        let arn = who.arn().unwrap_or_default();
        if !arn.contains(&spec.lease_id) {
            return Err(format!("the session is not the lease's: {arn}"));
        }
        let deny = self
            .provider
            .deny_policy(&spec.role)
            .await
            .map_err(|e| e.to_string())?;
        Ok(!deny.denies(&spec.lease_id, "9999-12-31T00:00:00Z"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_against_moto() {
    let (moto, p) = started().await;
    let probe = CallerIdentity {
        moto: &moto,
        provider: &p,
    };
    let report = conformance::run(&p, &probe, &Specs, "reader")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", moto.log_text()));
    assert_eq!(report.steps.len(), 8, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_puts_the_session_in_the_roles_deny_policy() {
    let (moto, p) = started().await;
    let s = spec("reports", Duration::from_secs(1200), &["2026/q3"]);
    let i = p.issue(&s).await.unwrap();
    // AWS's end, in whole seconds, caps the lease
    assert!(i.expires_at <= s.expires_at);
    assert!(i.expires_at.unix_millis() > s.expires_at.unix_millis() - 2_000);
    assert!(
        i.credential
            .expose("access_key_id")
            .unwrap()
            .starts_with("ASIA")
    );
    assert!(
        i.description.contains("aws:SourceIdentity"),
        "{}",
        i.description
    );
    let before = p.deny_policy("reports").await.unwrap();
    assert!(!before.denies(&s.lease_id, "x"));
    p.revoke(&RevokeSpec::of(&s, &i)).await.unwrap();
    // the post-condition, read back from IAM
    let iam = moto.iam().await;
    let doc = iam
        .get_role_policy()
        .role_name("app-reader")
        .policy_name("leasehold-revoked-sessions")
        .send()
        .await
        .unwrap();
    let decoded = leasehold_provider_aws_sts::url_decode(doc.policy_document());
    assert!(decoded.contains(&s.lease_id), "{decoded}");
    assert!(decoded.contains("aws:SourceIdentity"), "{decoded}");
    assert!(decoded.contains("\"Deny\""), "{decoded}");
    // again: a no-op that keeps it
    p.revoke(&RevokeSpec::of(&s, &i)).await.unwrap();
    assert!(
        p.deny_policy("reports")
            .await
            .unwrap()
            .denies(&s.lease_id, "x")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_revocations_on_one_role_all_land() {
    let (_moto, p) = started().await;
    let mut issued = Vec::new();
    for _ in 0..50 {
        let s = spec("reader", Duration::from_secs(900), &[]);
        let i = p.issue(&s).await.unwrap();
        issued.push((s, i));
    }
    // fifty separate revocations at once (not one batch): the per-role
    // serialization must keep every entry
    let p = Arc::new(p);
    let mut set = tokio::task::JoinSet::new();
    for (s, i) in &issued {
        let (who, r) = (p.clone(), RevokeSpec::of(s, i));
        set.spawn(async move { who.revoke(&r).await });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    let deny = p.deny_policy("reader").await.unwrap();
    let missing: Vec<&str> = issued
        .iter()
        .map(|(s, _)| s.lease_id.as_str())
        .filter(|id| !deny.denies(id, "9999-12-31T00:00:00Z") || deny.cutoff.is_some())
        .collect();
    assert!(
        missing.is_empty(),
        "dropped by concurrent edits: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_deny_policy_falls_back_to_an_issue_time_cutoff() {
    let moto = Moto::start();
    let arn = moto.create_role("app-reader").await;
    let mut cfg = config(moto.endpoint(), &arn);
    cfg.deny_policy_max_chars = 1024;
    let p = AwsStsProvider::new(cfg, 86_400, clock(), Some(Moto::credentials())).unwrap();
    let mut methods = Vec::new();
    let mut specs = Vec::new();
    for _ in 0..40 {
        let s = spec("reader", Duration::from_secs(900), &[]);
        let i = p.issue(&s).await.unwrap();
        let h: serde_json::Value = serde_json::from_slice(i.handle.as_bytes()).unwrap();
        let m = p
            .deny(
                "app-reader",
                &[(s.lease_id.clone(), h["session_end"].as_i64().unwrap())],
            )
            .await
            .unwrap();
        methods.push(m);
        specs.push(s);
    }
    assert_eq!(methods[0], Method::SourceIdentity);
    assert!(methods.contains(&Method::IssueTimeCutoff), "{methods:?}");
    let deny = p.deny_policy("reader").await.unwrap();
    let (cutoff, _) = deny.cutoff.clone().expect("a cut-off");
    // every revoked session was issued before the cut-off (or is listed)
    for s in &specs {
        let issued = time::OffsetDateTime::from_unix_timestamp(s.issued_at.unix_seconds())
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        assert!(
            deny.denies(&s.lease_id, &issued),
            "{} not covered by {cutoff}",
            s.lease_id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_before_any_call() {
    let (_moto, p) = started().await;
    assert_eq!(
        p.validate("nope", &[]).unwrap_err().class,
        ErrorClass::Invalid
    );
    for scope in [
        vec!["2025/q1".to_owned()],
        vec!["*".into()],
        vec![],
        vec!["summary".into(), "2026/a".into()],
    ] {
        let e = p.validate("reports", &scope).unwrap_err();
        assert_eq!(e.class, ErrorClass::Invalid, "{scope:?}: {e}");
    }
    p.validate("reports", &["2026/q3".into()]).unwrap();
    p.validate("reports", &["summary".into()]).unwrap();
    // a scope that pushes the session policy past 2,048 characters: the
    // template names it in several resources
    let long = "x".repeat(250);
    let e = p.validate("wide", std::slice::from_ref(&long)).unwrap_err();
    assert_eq!(e.class, ErrorClass::Invalid);
    assert!(e.message.contains("2048"), "{e}");
    p.validate("wide", &["short".into()]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_unreachable_at_revoke_is_retryable() {
    let (mut moto, p) = started().await;
    let s = spec("reader", Duration::from_secs(900), &[]);
    let i = p.issue(&s).await.unwrap();
    moto.stop();
    let e = p.revoke(&RevokeSpec::of(&s, &i)).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
    let e = p
        .issue(&spec("reader", Duration::from_secs(900), &[]))
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
}

/// A stand-in for STS that records each request (when it arrived, its
/// body) and answers Throttling.
type Received = Arc<std::sync::Mutex<Vec<(std::time::Instant, String)>>>;

async fn throttling_sts() -> (String, Arc<AtomicUsize>, Received) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (h, b) = (hits.clone(), bodies.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (h, b) = (h.clone(), b.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some(head_end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() < head_end + 4 + len {
                        continue;
                    }
                    b.lock().unwrap().push((
                        std::time::Instant::now(),
                        text[head_end + 4..head_end + 4 + len].to_owned(),
                    ));
                    h.fetch_add(1, Ordering::SeqCst);
                    let body = "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error><RequestId>1</RequestId></ErrorResponse>";
                    let resp = format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/xml\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    buf.clear();
                }
            });
        }
    });
    (format!("http://{addr}"), hits, bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_retried_then_retryable_and_the_request_carries_the_lease() {
    let (endpoint, hits, bodies) = throttling_sts().await;
    let mut cfg = config(endpoint, "arn:aws:iam::123456789012:role/app-reader");
    cfg.max_attempts = 3;
    let p = AwsStsProvider::new(cfg, 86_400, clock(), Some(Moto::credentials())).unwrap();
    let s = spec("reports", Duration::from_secs(120), &["summary"]);
    let e = p.issue(&s).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");
    assert!(e.message.contains("Throttling"), "{e}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        3,
        "max_attempts requests, with backoff"
    );
    // The SDK's backoff is full jitter: uniform in [0, 100 ms) before the
    // second attempt and [0, 200 ms) before the third, so no fixed minimum
    // holds (a 100 ms floor failed one run in four). Without any backoff the
    // attempts follow each other within a millisecond or so; with it, the
    // two waits sum below 5 ms about once in 1,600 runs.
    let times: Vec<std::time::Instant> = bodies.lock().unwrap().iter().map(|r| r.0).collect();
    let waited = times[2] - times[0];
    assert!(waited >= Duration::from_millis(5), "no backoff: {waited:?}");
    assert!(
        waited < Duration::from_secs(2),
        "backoff beyond its cap: {waited:?}"
    );
    // what AssumeRole carried (moto drops all of it)
    let body = bodies.lock().unwrap()[0].1.clone();
    let form: Vec<(String, String)> = body
        .split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), leasehold_provider_aws_sts::url_decode(v))
        })
        .collect();
    let get = |k: &str| {
        form.iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(get("Action"), "AssumeRole");
    assert_eq!(get("RoleSessionName"), s.lease_id);
    assert_eq!(get("SourceIdentity"), s.lease_id);
    // a 120 s lease: AWS's minimum, 900 s
    assert_eq!(get("DurationSeconds"), "900");
    assert_eq!(get("ExternalId"), "leasehold-test-external");
    let tags: Vec<(String, String)> = (1..=3)
        .map(|n| {
            (
                get(&format!("Tags.member.{n}.Key")),
                get(&format!("Tags.member.{n}.Value")),
            )
        })
        .collect();
    assert!(
        tags.contains(&("leasehold-lease".into(), s.lease_id.clone())),
        "{tags:?}"
    );
    assert!(
        tags.contains(&("leasehold-task".into(), s.task_id.clone())),
        "{tags:?}"
    );
    assert!(
        tags.contains(&("leasehold-workload".into(), s.workload.clone())),
        "{tags:?}"
    );
    let transitive: Vec<String> = (1..=3)
        .map(|n| get(&format!("TransitiveTagKeys.member.{n}")))
        .collect();
    assert!(
        transitive.contains(&"leasehold-lease".to_owned()),
        "{transitive:?}"
    );
    let policy: serde_json::Value = serde_json::from_str(&get("Policy")).unwrap();
    let text = policy.to_string();
    assert!(text.contains("arn:aws:s3:::reports/summary/*"), "{text}");
    assert!(text.contains("sts:AssumeRole*"), "{text}");
}
