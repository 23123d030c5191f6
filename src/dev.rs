//! `leasehold dev`: the zero-setup broker.
//!
//! Loopback only, a redb store in a local data folder, the token provider
//! with a `demo` role, and a built-in development identity issuer. Keys are
//! created on the first run and reused after (the store key never changes
//! behind the store's back); tokens are minted afresh on every start and
//! written to `dev-credentials.json` (mode 0600): two workloads, so
//! isolation can be tried, and one token per operator role. The equivalent
//! `serve` configuration is written to `dev-config.toml`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};

use crate::auth::{generate_operator_token, operator_token_hash};
use crate::clock::Timestamp;
use crate::config::*;
use crate::store::StoreKey;
use leasehold_provider_token::{TokenProviderConfig, TokenRoleConfig};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7711";
/// The example policy set (`config/policies`), which `dev` starts with.
pub const EXAMPLE_POLICIES: [(&str, &str); 3] = [
    (
        "leasehold.cedarschema",
        include_str!("../config/policies/leasehold.cedarschema"),
    ),
    ("demo.cedar", include_str!("../config/policies/demo.cedar")),
    (
        "entities.json",
        include_str!("../config/policies/entities.json"),
    ),
];
pub const DEFAULT_DATA_DIR: &str = "leasehold-data";
pub const DEV_ISSUER: &str = "https://leasehold.dev.invalid/issuer";
pub const DEV_AUDIENCE: &str = "leasehold";
pub const DEV_WORKLOADS: [&str; 2] = ["assistant-a", "assistant-b"];
/// Dev workload tokens live this long; restart `leasehold dev` for new ones.
const DEV_TOKEN_TTL_S: i64 = 7 * 86_400;

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(
        "`leasehold dev` listens on loopback only; {0} is not a loopback address (use `serve` with TLS)"
    )]
    NotLoopback(SocketAddr),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Key(String),
}

/// `dev-credentials.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevCredentials {
    /// Base URL of the dev broker.
    pub broker: String,
    /// name -> credential; workloads and operators.
    pub identities: BTreeMap<String, DevIdentity>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevIdentity {
    /// `workload` or an operator role.
    pub kind: String,
    /// The workload id (`dev:<name>`) or operator name.
    pub id: String,
    pub token: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DevError> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn ensure_ed25519(path: &Path) -> Result<Vec<u8>, DevError> {
    if path.exists() {
        let bytes = std::fs::read(path).map_err(io(path))?;
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(&bytes).map_err(|_| {
            DevError::Key(format!("{} is not an Ed25519 PKCS#8 key", path.display()))
        })?;
        return Ok(bytes);
    }
    let doc = leasehold_provider_token::generate_signing_key()
        .map_err(|e| DevError::Key(e.to_string()))?;
    write_private(path, &doc)?;
    Ok(doc)
}

/// Sign a compact JWT with an Ed25519 key (the dev issuer's).
pub fn sign_jwt(key: &Ed25519KeyPair, kid: &str, claims: &serde_json::Value) -> String {
    let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": kid});
    let mut t = B64.encode(header.to_string());
    t.push('.');
    t.push_str(&B64.encode(claims.to_string()));
    let sig = key.sign(t.as_bytes());
    t.push('.');
    t.push_str(&B64.encode(sig.as_ref()));
    t
}

/// A JWKS document holding one Ed25519 public key.
pub fn jwks_for(key: &Ed25519KeyPair, kid: &str) -> serde_json::Value {
    serde_json::json!({"keys": [{
        "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": kid,
        "x": B64.encode(key.public_key().as_ref()),
    }]})
}

/// Everything `dev` needs: the config it runs, and the credentials it wrote.
pub fn prepare(
    data: &Path,
    listen: SocketAddr,
    now: Timestamp,
) -> Result<(Config, DevCredentials), DevError> {
    if !listen.ip().is_loopback() {
        return Err(DevError::NotLoopback(listen));
    }
    private_dir(data).map_err(io(data))?;
    // absolute, so `dev-config.toml` means the same files wherever it is
    // read from (a relative path there resolves against its own folder)
    let data = &std::fs::canonicalize(data).map_err(io(data))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700)).map_err(io(data))?;
    }
    let keys = ensure_keys(data)?;
    let (identities, operators) = identities(&keys.issuer, now)?;
    let policies = ensure_policies(data)?;
    let config = dev_config(data, listen, keys, operators, policies);
    config
        .validate()
        .map_err(|e| DevError::Key(e.to_string()))?;
    // the same configuration for `leasehold serve -c`, valid with this run's
    // credentials (operator token hashes change on every `dev` start)
    let toml = config.to_toml().map_err(|e| DevError::Key(e.to_string()))?;
    write_private(&data.join("dev-config.toml"), toml.as_bytes())?;
    let creds = DevCredentials {
        broker: format!("http://{listen}"),
        identities,
    };
    let json = serde_json::to_vec_pretty(&creds).map_err(|e| DevError::Key(e.to_string()))?;
    write_private(&data.join("dev-credentials.json"), &json)?;
    // the `proxy` operator's token on its own, for `leasehold proxy`
    // (config/proxy.example.toml reads it from here)
    if let Some(p) = creds.identities.get("proxy") {
        write_private(&data.join("proxy.token"), p.token.as_bytes())?;
    }
    Ok((config, creds))
}

/// The keys `dev` keeps in its data folder, made on first use.
struct DevKeys {
    store: PathBuf,
    token: PathBuf,
    checkpoint: PathBuf,
    /// The dev workload issuer's key, and its JWKS file.
    issuer: Ed25519KeyPair,
    jwks: PathBuf,
}

/// The store, token, checkpoint and dev-issuer keys, and the issuer's JWKS.
fn ensure_keys(data: &Path) -> Result<DevKeys, DevError> {
    let key_path = data.join("store.key");
    if !key_path.exists() {
        StoreKey::generate()
            .and_then(|k| k.write_new_file(&key_path))
            .map_err(|e| DevError::Key(e.to_string()))?;
    }
    let token_key = data.join("token-signing.pk8");
    ensure_ed25519(&token_key)?;
    let checkpoint_key = data.join("checkpoint.pk8");
    ensure_ed25519(&checkpoint_key)?;
    let issuer_doc = ensure_ed25519(&data.join("dev-issuer.pk8"))?;
    let issuer_key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&issuer_doc)
        .map_err(|_| DevError::Key("dev issuer key unreadable".into()))?;
    let kid = "dev-issuer-1";
    let jwks_path = data.join("dev-issuer.jwks.json");
    write_private(
        &jwks_path,
        jwks_for(&issuer_key, kid).to_string().as_bytes(),
    )?;

    Ok(DevKeys {
        store: key_path,
        token: token_key,
        checkpoint: checkpoint_key,
        issuer: issuer_key,
        jwks: jwks_path,
    })
}

/// Tokens for the two dev workloads (signed by the dev issuer) and for one
/// operator of each role, with the operators' configuration.
fn identities(
    issuer_key: &Ed25519KeyPair,
    now: Timestamp,
) -> Result<(BTreeMap<String, DevIdentity>, Vec<OperatorConfig>), DevError> {
    let kid = "dev-issuer-1";
    let mut identities = BTreeMap::new();
    let iat = now.unix_seconds();
    for name in DEV_WORKLOADS {
        let claims = serde_json::json!({
            "iss": DEV_ISSUER, "sub": name, "aud": DEV_AUDIENCE,
            "iat": iat, "nbf": iat, "exp": iat + DEV_TOKEN_TTL_S, "tenant": "dev",
        });
        identities.insert(
            name.to_owned(),
            DevIdentity {
                kind: "workload".into(),
                id: format!("dev:{name}"),
                token: sign_jwt(issuer_key, kid, &claims),
            },
        );
    }
    let mut operators = Vec::new();
    for (name, role) in [
        ("admin", OperatorRole::Admin),
        ("approver", OperatorRole::Approver),
        ("responder", OperatorRole::Responder),
        ("resource-server", OperatorRole::ResourceServer),
        ("proxy", OperatorRole::Proxy),
    ] {
        let token = generate_operator_token().map_err(DevError::Key)?;
        operators.push(OperatorConfig {
            name: name.to_owned(),
            roles: vec![role],
            token_sha256: operator_token_hash(&token),
            user: Some(format!("{name}@example.com")),
        });
        identities.insert(
            name.to_owned(),
            DevIdentity {
                kind: role.as_str().to_owned(),
                id: name.to_owned(),
                token,
            },
        );
    }

    Ok((identities, operators))
}

/// A directory (and any missing parents) only its owner may enter.
fn private_dir(path: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        b.mode(0o700);
    }
    b.create(path)
}

/// The example policy set, copied once so it can be edited and reloaded.
fn ensure_policies(data: &Path) -> Result<PathBuf, DevError> {
    let policies = data.join("policies");
    if !policies.exists() {
        private_dir(&policies).map_err(io(&policies))?;
        for (name, text) in EXAMPLE_POLICIES {
            write_private(&policies.join(name), text.as_bytes())?;
        }
    }
    Ok(policies)
}

/// The configuration `dev` serves: loopback, the embedded store, the dev
/// issuer, the example policies and the token provider with a `demo` role.
fn dev_config(
    data: &Path,
    listen: SocketAddr,
    keys: DevKeys,
    operators: Vec<OperatorConfig>,
    policies: PathBuf,
) -> Config {
    let mut roles = BTreeMap::new();
    roles.insert(
        "demo".to_owned(),
        TokenRoleConfig {
            scopes: vec!["demo:read".into(), "demo:write".into()],
            max_ttl_seconds: 900,
            audience: None,
            description: "a demonstration token for the dev broker's own resource servers".into(),
            require_binding: false,
        },
    );
    roles.insert(
        "demo-bound".to_owned(),
        TokenRoleConfig {
            scopes: vec!["demo:read".into()],
            max_ttl_seconds: 300,
            audience: None,
            description: "a token bound to the workload's key (DPoP or its client certificate): \
                          useless to whoever copies it"
                .into(),
            require_binding: true,
        },
    );
    let mut providers = BTreeMap::new();
    providers.insert(
        "token".to_owned(),
        ProviderConfig::new(TokenProviderConfig {
            issuer: format!("http://{listen}"),
            audience: "leasehold-demo".into(),
            signing_key_file: keys.token,
            roles,
        }),
    );
    Config {
        server: ServerConfig {
            listen,
            tls: None,
            allow_plaintext_non_loopback: false,
            public_url: None,
            max_body_bytes: 64 * 1024,
            request_timeout_seconds: 30,
            shutdown_grace_seconds: 5,
            metrics_listen: None,
            rate_limits: Default::default(),
            connections: Default::default(),
            drain_delay_seconds: 0,
        },
        store: StoreConfig {
            backend: crate::config::StoreBackend::Redb,
            postgres: None,
            path: data.join("leasehold.redb"),
            key_file: Some(keys.store),
            key_env: None,
            cache_mib: 64,
            quick_repair: true,
            checkpoint_mib: crate::config::defaults::checkpoint_mib(),
            reserve_mib: crate::config::defaults::reserve_mib(),
            commit_delay_micros: 500,
            commit_siblings: 4,
        },
        limits: Limits::default(),
        reaper: ReaperConfig::default(),
        retention: crate::config::RetentionConfig::default(),
        auth: AuthConfig {
            workload_issuers: vec![IssuerConfig {
                kind: crate::config::IssuerKind::Jwt,
                name: "dev".into(),
                issuer: DEV_ISSUER.into(),
                audiences: vec![DEV_AUDIENCE.into()],
                algorithms: vec!["EdDSA".into()],
                jwks_file: Some(keys.jwks),
                jwks_url: None,
                jwks_refresh_seconds: 300,
                leeway_seconds: 30,
                tenant_claim: Some("tenant".into()),
                tenant: None,
                attribute_claims: vec![],
                trust_bundle_file: None,
                trust_domain: None,
                subject_pattern: None,
                tenant_path_segment: None,
                tenant_subject_attribute: None,
            }],
            operators,
            dpop_max_age_seconds: 60,
            dpop_leeway_seconds: 5,
        },
        audit: AuditConfig {
            checkpoint_key_file: keys.checkpoint,
            checkpoint_interval_seconds: 60,
            hmac_key_file: None,
            hmac_fields: vec![],
            auth_denied_events_per_second: 10,
            prune_min_age_seconds: crate::config::defaults::prune_min_age_seconds(),
            archive_dir: Some(data.join("archive")),
            #[cfg(feature = "bench-no-events")]
            bench_no_events: false,
        },
        policy: PolicyConfig {
            dir: policies,
            approval_ttl_seconds: 900,
            break_glass_max_ttl_seconds: 900,
            max_active_leases_per_workload: 10_000,
            webhook_url: None,
            webhook_secret_file: None,
        },
        providers,
        #[cfg(feature = "fault-injection")]
        fault: FaultConfig::default(),
    }
}
