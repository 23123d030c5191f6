//! Opt-in smoke test against a real Entra tenant and subscription: what the
//! stand-in cannot show, that Entra refuses a removed password and ARM
//! stops granting a deleted assignment. Never run by default (it needs a
//! tenant); see `integration/azure/README.md` for the setup and the
//! command. Run without its settings it fails saying what is missing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use leasehold_provider::{LeaseSpec, Provider, RevokeSpec, Timestamp};
use leasehold_provider_azure::{AzureConfig, AzureProvider};

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: see integration/azure/README.md for the opt-in Azure smoke test")
    })
}

fn now() -> Timestamp {
    Timestamp::from_unix_millis(std::time::UNIX_EPOCH.elapsed().unwrap().as_millis() as i64)
}

fn spec(role: &str, scope: Vec<String>) -> LeaseSpec {
    let t = now();
    LeaseSpec {
        lease_id: format!("lease_smoke{}", t.unix_millis()),
        task_id: "task_smoke".into(),
        workload: "smoke:app".into(),
        tenant: None,
        on_behalf_of: "smoke@example.com".into(),
        role: role.into(),
        scope,
        issued_at: t,
        expires_at: t.saturating_add(Duration::from_secs(900)),
        prepared: None,
        binding: None,
    }
}

/// Poll `f` every 5 s for up to `limit` until it returns true.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    panic!("{what}: not within {limit:?}");
}

async fn sign_in(tenant: &str, client: &str, secret: &str) -> Option<String> {
    let r = reqwest::Client::new()
        .post(format!(
            "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
        ))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client),
            ("client_secret", secret),
            ("scope", "https://management.azure.com/.default"),
        ])
        .send()
        .await
        .ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    v["access_token"].as_str().map(str::to_owned)
}

async fn can_read(token: &str, scope: &str) -> bool {
    let r = reqwest::Client::new()
        .get(format!(
            "https://management.azure.com{scope}/providers/Microsoft.Authorization/permissions?api-version=2022-04-01"
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    v["value"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["actions"].as_array().cloned().unwrap_or_default())
        .any(|a| a == "*/read")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "opt-in: needs an Entra tenant and a subscription (integration/azure/README.md)"]
async fn real_tenant_takes_back_the_password_and_the_assignment() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tenant = var("AZURE_TENANT_ID");
    let scope = var("LEASEHOLD_AZURE_SMOKE_SCOPE");
    let sub = scope.split('/').nth(2).unwrap().to_owned();
    let cfg: AzureConfig = toml::from_str(&format!(
        r#"
        tenant_id = "{tenant}"
        auth = {{ method = "client_secret", client_id = "{client}", client_secret_file = "{secret}" }}
        workload_principals = {{ "smoke:app" = "{principal}" }}
        propagation_timeout_seconds = 25
        [roles.app]
        mode = "app_password"
        max_ttl_seconds = 900
        application_object_id = "{app}"
        application_client_id = "{app_client}"
        [roles.reader]
        mode = "role_assignment"
        max_ttl_seconds = 900
        role_definition_id = "/subscriptions/{sub}/providers/Microsoft.Authorization/roleDefinitions/acdd72a7-3385-48ef-bd42-f606fba81ae7"
        scope = "{scope}"
        "#,
        client = var("AZURE_CLIENT_ID"),
        secret = var("LEASEHOLD_AZURE_SMOKE_SECRET_FILE"),
        principal = var("LEASEHOLD_AZURE_SMOKE_APP_PRINCIPAL"),
        app = var("LEASEHOLD_AZURE_SMOKE_APP_OBJECT_ID"),
        app_client = var("LEASEHOLD_AZURE_SMOKE_APP_CLIENT_ID"),
    ))
    .unwrap();
    let p = AzureProvider::new(cfg, 3600).unwrap();
    p.health().await.unwrap();

    // a password that signs the app in
    let pw_spec = spec("app", vec![]);
    let pw = p.issue(&pw_spec).await.unwrap();
    let (client, secret) = (
        pw.credential.expose("client_id").unwrap().to_owned(),
        pw.credential.expose("client_secret").unwrap().to_owned(),
    );
    let mut token = None;
    for _ in 0..24 {
        token = sign_in(&tenant, &client, &secret).await;
        if token.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let token = token.expect("the new password did not sign in within 120 s");

    // a role assignment for the app's principal, seen by ARM
    let ra_spec = spec("reader", vec![]);
    let ra = p.issue(&ra_spec).await.unwrap();
    eventually(
        Duration::from_secs(300),
        "the assignment grants */read",
        || can_read(&token, &scope),
    )
    .await;

    p.revoke(&RevokeSpec::of(&ra_spec, &ra)).await.unwrap();
    eventually(
        Duration::from_secs(600),
        "the deleted assignment stops granting",
        || async { !can_read(&token, &scope).await },
    )
    .await;

    p.revoke(&RevokeSpec::of(&pw_spec, &pw)).await.unwrap();
    eventually(
        Duration::from_secs(300),
        "the removed password stops signing in",
        || {
            let (t, c, s) = (tenant.clone(), client.clone(), secret.clone());
            async move { sign_in(&t, &c, &s).await.is_none() }
        },
    )
    .await;
}
