//! Prometheus metrics: served to the right roles, exact for the states an
//! operator alerts on (irrevocable leases, the revocation queue, fences),
//! counting retries and provider errors, bounded labels (never an id), a
//! separate plain listener when configured, and scrapes during a mass
//! revocation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Flaky, Harness, free_port};
use crate::incident::{A, count, fill, job, revoke_all_of, start, wait_job};

/// Parse the exposition text into `name{labels}` -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample line: {l}"));
            (
                k.to_owned(),
                v.parse::<f64>()
                    .unwrap_or_else(|_| panic!("not a number: {l}")),
            )
        })
        .collect()
}

fn value(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| {
        panic!(
            "no sample {key}; have:\n{}",
            m.keys().cloned().collect::<Vec<_>>().join("\n")
        )
    })
}

/// Sum of every sample of `name` whose labels contain all of `labels`.
fn sum(m: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    m.iter()
        .filter(|(k, _)| k.split('{').next() == Some(name) && labels.iter().all(|l| k.contains(l)))
        .map(|(_, v)| v)
        .sum()
}

async fn scrape(h: &Harness, token: &str) -> (StatusCode, String, Option<String>) {
    let mut req = h.http.get(h.url("/metrics"));
    if !token.is_empty() {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.unwrap();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    (resp.status(), resp.text().await.unwrap(), ct)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_leases_irrevocable_queue_retries_and_fences_without_ids() {
    let flaky = Arc::new(Flaky::default());
    let h = start(flaky.clone(), |c| c.reaper.retry_budget = 2).await;
    let leases = fill(&h, &h.tokens.a, "flaky", "r", 5).await;

    // roles: responders and admins read metrics; workloads and strangers do not
    let (s, _, _) = scrape(&h, "").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    for t in [&h.tokens.a, &h.tokens.approver] {
        let (s, _, _) = scrape(&h, t).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
    }
    let (s, text, ct) = scrape(&h, &h.tokens.admin).await;
    assert_eq!(s, StatusCode::OK);
    assert!(ct.unwrap().starts_with("text/plain; version=0.0.4"));
    let m = samples(&text);
    assert_eq!(
        value(&m, r#"leasehold_leases{provider="flaky",state="active"}"#),
        5.0
    );
    assert_eq!(
        value(
            &m,
            r#"leasehold_leases{provider="flaky",state="irrevocable"}"#
        ),
        0.0
    );
    assert_eq!(
        sum(
            &m,
            "leasehold_lease_transitions_total",
            &[r#"provider="flaky""#, r#"state="active""#]
        ),
        5.0
    );
    assert_eq!(
        value(
            &m,
            r#"leasehold_http_requests_total{method="POST",route="/v1/tasks/{id}/leases",status="201"}"#
        ),
        5.0,
        "requests are labelled by route template"
    );
    assert_eq!(
        sum(
            &m,
            "leasehold_decisions_total",
            &[r#"action="lease""#, r#"outcome="allow""#]
        ),
        5.0
    );
    assert!(
        sum(
            &m,
            "leasehold_provider_call_duration_seconds_count",
            &[r#"operation="issue""#, r#"provider="flaky""#]
        ) >= 5.0
    );
    assert!(value(&m, "leasehold_store_commit_duration_seconds_count") > 0.0);
    assert!(value(&m, "leasehold_event_chain_head_seq") > 0.0);

    // the peer goes down; a fencing job leaves every lease irrevocable
    flaky.down.store(true, Ordering::SeqCst);
    let (s, started) = revoke_all_of(&h, A, true).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{started}");
    let id = started["job_id"].as_str().unwrap().to_owned();
    for _ in 0..100 {
        h.advance(Duration::from_secs(3));
        if job(&h, &id).await["state"] == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count(&job(&h, &id).await, "flaky", "irrevocable"), 5);
    let (_, text, _) = scrape(&h, &h.tokens.responder).await;
    let m = samples(&text);
    assert_eq!(
        value(
            &m,
            r#"leasehold_leases{provider="flaky",state="irrevocable"}"#
        ),
        5.0,
        "irrevocable leases are counted"
    );
    assert_eq!(
        value(&m, r#"leasehold_leases{provider="flaky",state="active"}"#),
        0.0
    );
    assert_eq!(
        value(&m, r#"leasehold_revocation_queue_depth{provider="flaky"}"#),
        5.0
    );
    assert_eq!(
        sum(
            &m,
            "leasehold_lease_transitions_total",
            &[r#"provider="flaky""#, r#"state="irrevocable""#]
        ),
        5.0
    );
    assert!(
        value(
            &m,
            r#"leasehold_revocation_retries_total{provider="flaky"}"#
        ) >= 10.0,
        "two failed attempts each"
    );
    assert!(
        sum(
            &m,
            "leasehold_provider_errors_total",
            &[
                r#"provider="flaky""#,
                r#"operation="revoke""#,
                r#"class="retryable""#
            ]
        ) >= 2.0
    );
    assert_eq!(value(&m, "leasehold_fences_active"), 1.0);
    assert_eq!(value(&m, "leasehold_revocation_jobs_running"), 0.0);
    assert!(
        value(
            &m,
            r#"leasehold_revocation_queue_oldest_overdue_seconds{provider="flaky"}"#
        ) >= 0.0
    );

    // bounded labels: any token is a method in HTTP, and each would be a
    // series; a method the API does not know is counted as "other"
    for method in ["BREW", "WHEN"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = h.http.request(m, h.url("/v1/tasks")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
    // no lease, task or job id anywhere in the exposition
    let (_, blast, _) = scrape(&h, &h.tokens.responder).await;
    assert!(
        !blast.contains("BREW") && !blast.contains("WHEN"),
        "{blast}"
    );
    assert_eq!(
        value(
            &samples(&blast),
            r#"leasehold_http_requests_total{method="other",route="/v1/tasks",status="405"}"#
        ),
        2.0
    );
    for l in &leases {
        assert!(
            !blast.contains(l.as_str()),
            "lease id {l} leaked into the metrics"
        );
    }
    assert!(!blast.contains(&id), "job id leaked into the metrics");
    assert!(
        !blast.contains("task_"),
        "a task id leaked into the metrics"
    );
    assert!(
        !blast.contains("flaky-secret-"),
        "a credential leaked into the metrics"
    );

    // every metric the example alert rules use exists, with that name
    let rules = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yaml"),
    )
    .unwrap();
    let mut used: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("leasehold_"))
        .collect();
    used.sort_unstable();
    used.dedup();
    assert!(
        used.len() >= 8,
        "the rules cover the metrics that matter: {used:?}"
    );
    for name in used {
        let base = name.strip_suffix("_bucket").unwrap_or(name);
        assert!(
            blast.contains(&format!("# TYPE {base} ")),
            "deploy/prometheus/alerts.yaml uses {name}, which the broker does not export"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_metrics_listener_serves_prometheus_and_probes_only() {
    let addr = free_port();
    let h = start(Arc::new(Flaky::default()), move |c| {
        c.server.metrics_listen = Some(addr)
    })
    .await;
    let http = reqwest::Client::new();
    let resp = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "no credential on the metrics listener"
    );
    let m = samples(&resp.text().await.unwrap());
    assert_eq!(
        value(&m, r#"leasehold_leases{provider="flaky",state="active"}"#),
        0.0
    );
    for probe in ["/v1/health", "/v1/ready"] {
        assert_eq!(
            http.get(format!("http://{addr}{probe}"))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
    }
    // nothing else of the API is reachable there, even with a token
    let resp = http
        .get(format!("http://{addr}/v1/stats"))
        .bearer_auth(&h.tokens.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = http
        .post(format!("http://{addr}/v1/tasks"))
        .bearer_auth(&h.tokens.a)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // the main listener still serves /metrics to operators
    assert_eq!(scrape(&h, &h.tokens.admin).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_during_a_mass_revocation_answer_and_see_it_progress() {
    let flaky = Arc::new(Flaky::default());
    let h = start(flaky.clone(), |_| {}).await;
    fill(&h, &h.tokens.a, "flaky", "r", 600).await;
    let (s, started) = revoke_all_of(&h, A, false).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{started}");
    let id = started["job_id"].as_str().unwrap().to_owned();
    let mut seen = Vec::new();
    loop {
        let (s, text, _) = scrape(&h, &h.tokens.responder).await;
        assert_eq!(s, StatusCode::OK);
        let m = samples(&text);
        let revoked = value(&m, r#"leasehold_leases{provider="flaky",state="revoked"}"#);
        let active = value(&m, r#"leasehold_leases{provider="flaky",state="active"}"#);
        let revoking = value(&m, r#"leasehold_leases{provider="flaky",state="revoking"}"#);
        assert_eq!(
            revoked + active + revoking,
            600.0,
            "every lease in exactly one state: {revoked} {active} {revoking}"
        );
        seen.push(revoked);
        if revoked == 600.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "progress only goes forward: {seen:?}"
    );
    wait_job(&h, &id, "done", |v| v["state"] == "done").await;
    let m = samples(&scrape(&h, &h.tokens.responder).await.1);
    assert_eq!(value(&m, "leasehold_revocation_jobs_running"), 0.0);
    assert_eq!(
        sum(
            &m,
            "leasehold_lease_transitions_total",
            &[r#"provider="flaky""#, r#"state="revoked""#]
        ),
        600.0
    );
}
