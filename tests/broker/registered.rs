//! A provider kind defined here, outside `src/`, proves the registry: it
//! registers with one call, loads from TOML, is refused by the checks
//! `config validate` runs with its own field-named errors, passes the
//! conformance suite as the broker builds it, and serves a task's lease
//! end to end. Nothing in `src/` names it.
//!
//! Its peer is an in-process vault of secrets (`PEER`): a credential is
//! usable while its secret is there, and revocation removes it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use leasehold::clock::{Clock as _, SystemClock, Timestamp};
use leasehold::config::Config;
use leasehold::providers::Providers;
use leasehold::store::{Store, StoreKey, StoreOptions};
use leasehold_provider::conformance::{self, Probe, SpecFactory};
use leasehold_provider::{
    BrokerLimits, BuildContext, Built, ConfigError, Credential, Description, Issued, Kind,
    LeaseSpec, Provider, ProviderError, ProviderSettings, RevocationHandle, RevokeSpec, RoleInfo,
};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::harness::{Harness, Options, permit_leases};

/// The secrets the provider has issued and not revoked, by lease id.
static PEER: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

fn peer<R>(f: impl FnOnce(&mut HashMap<String, String>) -> R) -> R {
    let mut g = PEER.lock().unwrap();
    f(g.get_or_insert_with(HashMap::new))
}

static KIND: Kind<MemoConfig> = Kind::new();

fn register() {
    // each test is its own process under nextest; a second registration in
    // one process is refused, which `cargo test` would hit
    let _ = leasehold::registry::register(&KIND);
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MemoConfig {
    /// Bytes of each secret.
    secret_bytes: usize,
    roles: BTreeMap<String, MemoRole>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MemoRole {
    max_ttl_seconds: u64,
    prefix: String,
}

impl ProviderSettings for MemoConfig {
    const TYPE: &'static str = "memo";

    fn roles(&self) -> Vec<(&str, u64)> {
        leasehold_provider::role_ttls(&self.roles, |r| r.max_ttl_seconds)
    }

    fn validate(&self, limits: &BrokerLimits) -> Result<(), ConfigError> {
        if !(8..=64).contains(&self.secret_bytes) {
            return Err(ConfigError::new("secret_bytes", "must be between 8 and 64"));
        }
        for (name, r) in &self.roles {
            if r.prefix.is_empty() {
                return Err(ConfigError::new(
                    format!("roles.{name}.prefix"),
                    "must not be empty",
                ));
            }
            if r.max_ttl_seconds > limits.max_lease_ttl_seconds {
                return Err(ConfigError::new(
                    format!("roles.{name}.max_ttl_seconds"),
                    "above the broker's lease ceiling",
                ));
            }
        }
        Ok(())
    }

    fn build(&self, _: &BuildContext) -> Result<Built, String> {
        Ok(Built::plain(std::sync::Arc::new(Memo(self.clone()))))
    }
}

#[derive(Debug)]
struct Memo(MemoConfig);

#[async_trait::async_trait]
impl Provider for Memo {
    fn describe(&self) -> Description {
        Description {
            kind: "memo",
            roles: self
                .0
                .roles
                .iter()
                .map(|(n, r)| RoleInfo {
                    name: n.clone(),
                    max_ttl: Duration::from_secs(r.max_ttl_seconds),
                    description: String::new(),
                })
                .collect(),
            revocation: "the secret is removed from the peer".into(),
        }
    }

    fn validate(&self, role: &str, scope: &[String]) -> Result<Duration, ProviderError> {
        let r = self
            .0
            .roles
            .get(role)
            .ok_or_else(|| ProviderError::invalid(format!("no role `{role}`")))?;
        if !scope.is_empty() {
            return Err(ProviderError::invalid("memo roles take no scope"));
        }
        Ok(Duration::from_secs(r.max_ttl_seconds))
    }

    async fn health(&self) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn issue(&self, spec: &LeaseSpec) -> Result<Issued, ProviderError> {
        let role = &self.0.roles[&spec.role];
        let mut bytes = vec![0u8; self.0.secret_bytes];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| ProviderError::retryable("no randomness"))?;
        let secret = format!(
            "{}{}",
            role.prefix,
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        peer(|p| p.insert(spec.lease_id.clone(), secret.clone()));
        Ok(Issued {
            credential: Credential::new().secret("secret", secret),
            handle: RevocationHandle::new(spec.lease_id.clone().into_bytes()),
            expires_at: spec.expires_at,
            description: format!("memo secret for {}", spec.lease_id),
        })
    }

    async fn revoke(&self, lease: &RevokeSpec) -> Result<(), ProviderError> {
        let id = String::from_utf8(lease.handle.as_bytes().to_vec())
            .map_err(|_| ProviderError::permanent("not a memo handle"))?;
        peer(|p| p.remove(&id));
        Ok(())
    }

    async fn rollback(&self, spec: &LeaseSpec) -> Result<(), ProviderError> {
        peer(|p| p.remove(&spec.lease_id));
        Ok(())
    }
}

/// The body of `[providers.memo]` (appended to a whole file, so its
/// roles are an inline table).
const MEMO_TOML: &str = r#"
type = "memo"
secret_bytes = 16
roles = { note = { max_ttl_seconds = 600, prefix = "memo_" } }
"#;

/// A configuration's TOML with `[providers.memo]` appended, as an
/// operator would write it.
fn memo_toml(c: &Config, table: &str) -> String {
    format!("{}\n[providers.memo]\n{table}", c.to_toml().unwrap())
}

/// The dev config with a `memo` provider, through TOML.
fn with_memo(c: &mut Config, table: &str) {
    *c = Config::from_toml(&memo_toml(c, table), "memo.toml").unwrap();
}

/// A dev configuration in `dir` (keys and policies made there).
fn dev_config(dir: &tempfile::TempDir) -> Config {
    leasehold::dev::prepare(
        dir.path(),
        "127.0.0.1:1".parse().unwrap(),
        SystemClock.now(),
    )
    .unwrap()
    .0
}

fn validate_error(table: &str) -> String {
    register();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memo.toml");
    std::fs::write(&path, memo_toml(&dev_config(&dir), table)).unwrap();
    // what `leasehold config validate` runs offline
    match Config::load(&path).and_then(|c| leasehold::preflight::check_files(&c).map(|()| c)) {
        Ok(_) => panic!("accepted: {table}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_registered_kind_is_refused_with_its_own_field_named_errors() {
    assert_eq!(
        validate_error(&MEMO_TOML.replace("secret_bytes = 16", "secret_bytes = 2")),
        "`providers.memo.secret_bytes`: must be between 8 and 64"
    );
    assert_eq!(
        validate_error(&MEMO_TOML.replace("\"memo_\"", "\"\"")),
        "`providers.memo.roles.note.prefix`: must not be empty"
    );
    let unknown = validate_error(&format!("{MEMO_TOML}colour = \"red\"\n"));
    assert!(unknown.contains("unknown field `colour`"), "{unknown}");
    let typed = validate_error(&MEMO_TOML.replace("600", "\"long\""));
    assert!(
        typed.contains("max_ttl_seconds") && typed.contains("invalid type"),
        "{typed}"
    );
}

#[test]
fn an_unregistered_kind_is_refused_naming_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let text = memo_toml(&dev_config(&dir), MEMO_TOML);
    let e = Config::from_toml(&text, "memo.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "unknown provider type `memo`; expected one of: token, postgres, vault, aws-sts, azure"
        ),
        "{e}"
    );
}

struct Specs(AtomicU64, Timestamp);

impl SpecFactory for Specs {
    fn spec(&self, role: &str, ttl: Duration) -> LeaseSpec {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        LeaseSpec {
            lease_id: format!("lease_memo{n}"),
            task_id: "task_conformance".into(),
            workload: "dev:assistant-a".into(),
            tenant: None,
            on_behalf_of: "alice@example.com".into(),
            role: role.into(),
            scope: Vec::new(),
            issued_at: self.1,
            expires_at: self.1.saturating_add(ttl),
            prepared: None,
            binding: None,
        }
    }
}

struct PeerProbe;

#[async_trait::async_trait]
impl Probe for PeerProbe {
    async fn usable(&self, spec: &LeaseSpec, c: &Credential) -> Result<bool, String> {
        let secret = c.expose("secret").ok_or("no secret in the credential")?;
        Ok(peer(|p| p.get(&spec.lease_id).is_some_and(|s| s == secret)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_kind_conforms_as_the_broker_builds_it() {
    register();
    let dir = tempfile::tempdir().unwrap();
    let mut config = dev_config(&dir);
    with_memo(&mut config, MEMO_TOML);
    assert_eq!(config.providers["memo"].kind(), "memo");
    assert!(config.providers["memo"].get::<MemoConfig>().is_some());
    let key = StoreKey::from_file(config.store.key_file.as_ref().unwrap()).unwrap();
    let store = Store::open(&StoreOptions::new(&config.store.path), &key).unwrap();
    let providers = Providers::build(
        &config.providers,
        &store,
        config.broker_limits(),
        std::sync::Arc::new(SystemClock),
    )
    .unwrap();
    let memo = providers.get("memo").unwrap();
    assert_eq!(memo.description.kind, "memo");
    assert!(memo.tokens.is_none());
    let specs = Specs(AtomicU64::new(0), SystemClock.now());
    let report = conformance::run(memo.provider.as_ref(), &PeerProbe, &specs, "note")
        .await
        .unwrap();
    assert!(!report.steps.is_empty(), "{report:?}");
    // written back, the configuration reads the same
    let again = Config::from_toml(&config.to_toml().unwrap(), "again.toml").unwrap();
    assert_eq!(
        format!("{:?}", again.providers["memo"]),
        format!("{:?}", config.providers["memo"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_kind_serves_a_task_end_to_end() {
    register();
    let h = Harness::start(Options {
        tweak: Box::new(|c| {
            with_memo(c, MEMO_TOML);
            permit_leases(c, "memo");
        }),
        ..Options::default()
    })
    .await;
    let a = h.tokens.a.clone();
    let task = h.open_task(&a, 600).await;
    let (status, body) = h
        .post(
            &a,
            &format!("/v1/tasks/{task}/leases"),
            json!({"provider": "memo", "role": "note", "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let lease = body["lease_id"].as_str().unwrap().to_owned();
    let secret = body["credential"]["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("memo_"), "{body}");
    assert_eq!(peer(|p| p.get(&lease).cloned()), Some(secret));

    let (status, body) = h
        .post_empty(&a, &format!("/v1/tasks/{task}/complete"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    h.wait_state(&lease, "revoked").await;
    assert_eq!(
        peer(|p| p.get(&lease).cloned()),
        None,
        "revoked at the peer"
    );
}
