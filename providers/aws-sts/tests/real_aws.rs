//! Opt-in smoke test against real AWS: what moto cannot show, that AWS
//! enforces the deny. Never run by default (it needs an account); see
//! `integration/aws-smoke.md` for the setup and the command. Run without its
//! settings it fails saying what is missing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use leasehold_provider::{LeaseSpec, Provider, RevokeSpec, Timestamp};
use leasehold_provider_aws_sts::{AwsStsConfig, AwsStsProvider};

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: see integration/aws-smoke.md for the opt-in AWS smoke test")
    })
}

fn now() -> Timestamp {
    Timestamp::from_unix_millis(std::time::UNIX_EPOCH.elapsed().unwrap().as_millis() as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "opt-in: needs an AWS account (integration/aws-smoke.md)"]
async fn real_aws_enforces_the_deny_after_revoke() {
    let arn = var("LEASEHOLD_AWS_SMOKE_ROLE_ARN");
    let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
    let cfg: AwsStsConfig = toml::from_str(&format!(
        "region = \"{region}\"\n[roles.smoke]\nrole_arn = \"{arn}\"\nmax_ttl_seconds = 900\n"
    ))
    .unwrap();
    let p = AwsStsProvider::new(cfg, 3600, Arc::new(now), None).unwrap();
    p.health().await.unwrap();
    let t = now();
    let spec = LeaseSpec {
        lease_id: format!("lease_smoke{}", t.unix_millis()),
        task_id: "task_smoke".into(),
        workload: "smoke:test".into(),
        tenant: None,
        on_behalf_of: "smoke@example.com".into(),
        role: "smoke".into(),
        scope: vec![],
        issued_at: t,
        expires_at: t.saturating_add(Duration::from_secs(900)),
        prepared: None,
        binding: None,
    };
    let issued = p.issue(&spec).await.unwrap();
    let c = &issued.credential;
    let creds = leasehold_provider_aws_sts::testkit::lease_credentials(c);
    let conf = leasehold_provider_aws_sts::sdk_config(&region, None, creds).await;
    let iam = aws_sdk_iam::Client::new(&conf);
    let role_name = arn.rsplit('/').next().unwrap();
    // the role lets its sessions read itself (see the setup): works now
    iam.get_role().role_name(role_name).send().await.unwrap();
    p.revoke(&RevokeSpec::of(&spec, &issued)).await.unwrap();
    // IAM is eventually consistent: the deny holds within a minute
    for _ in 0..60 {
        if iam.get_role().role_name(role_name).send().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("the revoked session could still call iam:GetRole after 60 s");
}
