//! The AWS provider through the broker, against moto: a task's STS session
//! is denied at the role when the task completes (what AWS would enforce;
//! moto itself enforces nothing), the event says how it was revoked, and a
//! scope that does not fit is a 400 before anything is recorded.

use std::path::Path;

use leasehold::config::{Config, ProviderConfig};
use leasehold_provider_aws_sts::AwsStsConfig;
use leasehold_provider_aws_sts::testkit::Moto;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Harness, Options, permit_leases};

fn aws_config(moto: &Moto, arn: &str, dir: &Path) -> AwsStsConfig {
    // the broker's credentials as a shared credentials file
    let file = dir.join("aws-credentials");
    let c = Moto::credentials();
    std::fs::write(
        &file,
        format!(
            "[leasehold]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            c.access_key_id(),
            c.secret_access_key()
        ),
    )
    .unwrap();
    toml::from_str(&format!(
        r#"
        region = "us-east-1"
        endpoint_url = "{}"
        credentials_file = "{}"
        profile = "leasehold"
        [roles.reports]
        role_arn = "{arn}"
        max_ttl_seconds = 3600
        session_policy = '{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"s3:GetObject","Resource":"arn:aws:s3:::reports/{{{{scope}}}}/*"}}]}}'
        scopes = ["2026/*"]
        "#,
        moto.endpoint(),
        file.display()
    ))
    .unwrap()
}

fn apply(c: &mut Config, aws: AwsStsConfig) {
    c.providers.insert("aws".into(), ProviderConfig::new(aws));
    permit_leases(c, "aws");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completing_the_task_denies_the_session_at_the_role() {
    let moto = Moto::start();
    let arn = moto.create_role("reports-reader").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = aws_config(&moto, &arn, dir.path());
    let h = Harness::start(Options {
        tweak: Box::new(move |c| apply(c, cfg.clone())),
        ..Options::default()
    })
    .await;
    let (s, ready) = h.get("", "/v1/ready").await;
    assert_eq!(s, StatusCode::OK, "{ready}");

    let task = h.open_task(&h.tokens.a, 3600).await;
    let url = format!("/v1/tasks/{task}/leases");
    // outside the template: refused before anything is recorded or sent
    for scope in [json!(["2025/q1"]), json!([]), json!(["2026/*"])] {
        let (s, v) = h
            .post(
                &h.tokens.a,
                &url,
                json!({"provider": "aws", "role": "reports", "ttl_seconds": 900, "scope": scope}),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{scope}: {v}");
    }
    let (s, v) = h
        .post(
            &h.tokens.a,
            &url,
            json!({"provider": "aws", "role": "reports", "ttl_seconds": 900, "scope": ["2026/q3"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["lease_id"].as_str().unwrap().to_owned();
    assert!(
        v["credential"]["access_key_id"]
            .as_str()
            .unwrap()
            .starts_with("ASIA")
    );
    assert!(v["credential"]["session_token"].as_str().is_some());
    let (_, all) = h.get(&h.tokens.admin, "/v1/leases?provider=aws").await;
    assert_eq!(
        all["leases"].as_array().unwrap().len(),
        1,
        "the refused requests left nothing: {all}"
    );

    let (s, v) = h
        .post_empty(&h.tokens.a, &format!("/v1/tasks/{task}/complete"))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(h.lease_state(&id).await, "revoked");
    // the post-condition at the role, read back from IAM
    let p = leasehold_provider_aws_sts::AwsStsProvider::new(
        aws_config(&moto, &arn, dir.path()),
        86_400,
        std::sync::Arc::new(crate::harness::now_rounded),
        None,
    )
    .unwrap();
    let deny = p.deny_policy("reports").await.unwrap();
    assert!(deny.denies(&id, "9999-12-31T00:00:00Z"), "{deny:?}");
    // and the chain says how
    let (_, story) = h
        .get(&h.tokens.admin, &format!("/v1/events?lease={id}"))
        .await;
    let revoked: Vec<&Value> = story["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "lease.revoked")
        .collect();
    assert_eq!(revoked.len(), 1, "{story}");
    assert_eq!(
        revoked[0]["data"]["revoked_by"], "deny on aws:SourceIdentity",
        "{story}"
    );
    let (_, rec) = h.get(&h.tokens.admin, &format!("/v1/leases/{id}")).await;
    assert!(
        rec["description"]
            .as_str()
            .unwrap()
            .ends_with("revoked: deny on aws:SourceIdentity"),
        "{rec}"
    );
}
