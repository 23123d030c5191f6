//! The token provider through the shared conformance suite, with its real
//! peer: the broker's durable store as the denylist, built exactly as the
//! broker builds it from config, and introspection as the "use".

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use leasehold::clock::{Clock as _, SystemClock, Timestamp};
use leasehold::providers::Providers;
use leasehold::store::{Store, StoreKey, StoreOptions};
use leasehold_provider::TokenIssuer;
use leasehold_provider::conformance::{self, Probe, SpecFactory};
use leasehold_provider::{Credential, LeaseSpec};

struct Specs(AtomicU64, Timestamp);

impl SpecFactory for Specs {
    fn spec(&self, role: &str, ttl: Duration) -> LeaseSpec {
        self.0.fetch_add(1, Ordering::Relaxed);
        LeaseSpec {
            // the broker's denylist is keyed by lease id, as every jti it signs is one
            lease_id: leasehold::ids::LeaseId::generate(self.1).to_string(),
            task_id: "task_conformance".into(),
            workload: "dev:assistant-a".into(),
            tenant: Some("dev".into()),
            on_behalf_of: "alice@example.com".into(),
            role: role.into(),
            scope: vec!["demo:read".into()],
            issued_at: self.1,
            expires_at: self.1.saturating_add(ttl),
            prepared: None,
            binding: None,
        }
    }
}

struct Introspect<'a>(&'a dyn TokenIssuer);

#[async_trait::async_trait]
impl Probe for Introspect<'_> {
    async fn usable(&self, _: &LeaseSpec, c: &Credential) -> Result<bool, String> {
        let token = c.expose("token").ok_or("no token in the credential")?;
        Ok(self.0.introspect(token, SystemClock.now()).active)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_provider_conforms_on_the_durable_store() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = leasehold::dev::prepare(
        dir.path(),
        "127.0.0.1:1".parse().unwrap(),
        SystemClock.now(),
    )
    .unwrap();
    let key = StoreKey::from_file(config.store.key_file.as_ref().unwrap()).unwrap();
    let opts = StoreOptions::new(&config.store.path);
    let store = Store::open(&opts, &key).unwrap();
    let providers = Providers::build(
        &config.providers,
        &store,
        config.broker_limits(),
        std::sync::Arc::new(leasehold::clock::SystemClock),
    )
    .unwrap();
    let token = providers.get("token").unwrap().tokens.clone().unwrap();
    let specs = Specs(AtomicU64::new(0), SystemClock.now());
    let report = conformance::run(token.as_ref(), &Introspect(token.as_ref()), &specs, "demo")
        .await
        .unwrap();
    assert_eq!(report.steps.len(), 8, "{report:?}");

    // revocations are durable: a fresh process (store reopened) agrees
    let revoked = specs.spec("demo", Duration::from_secs(60));
    let issued = leasehold_provider::Provider::issue(token.as_ref(), &revoked)
        .await
        .unwrap();
    leasehold_provider::Provider::rollback(token.as_ref(), &revoked)
        .await
        .unwrap();
    drop((providers, token));
    drop(store);
    let store = Store::open(&opts, &key).unwrap();
    let providers = Providers::build(
        &config.providers,
        &store,
        config.broker_limits(),
        std::sync::Arc::new(leasehold::clock::SystemClock),
    )
    .unwrap();
    let token = providers.get("token").unwrap().tokens.clone().unwrap();
    assert!(
        !token
            .introspect(
                issued.credential.expose("token").unwrap(),
                SystemClock.now()
            )
            .active
    );
}
