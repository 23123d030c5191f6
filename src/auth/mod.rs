//! Authentication: bearer credential -> [`Caller`].
//!
//! Workloads present JWTs from configured issuers (Kubernetes projected
//! service-account tokens, SPIFFE JWT-SVIDs, any OIDC issuer with a JWKS);
//! operators present static bearer tokens whose SHA-256 is in config, each
//! with its roles (admin, approver, responder, resource_server).
//!
//! This module knows no HTTP: the API layer's extractor (`api::extract`)
//! hands it the bearer credential, so a handler that takes a [`Caller`]
//! cannot run unauthenticated. What a caller may *see* (least visibility: a workload
//! only its own tasks and leases) is decided in the task and lease services.
//!
//! Things deliberately absent: no HMAC-signed workload tokens, no `none`, no
//! algorithm taken from the token without being pinned in config; no
//! workload acting as a human (the user it acts for is a field of the task).

mod dpop;
mod jwt;
mod x509;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use dpop::{DpopError, DpopVerifier, ProofTarget};
pub use jwt::{IssuerVerifier, load_jwks_file};
pub use x509::{X509Verifier, load_bundle};

use crate::clock::{Clock, Timestamp};
use crate::config::{AuthConfig, OperatorRole};

/// An authenticated workload: a runtime identity, never a human surrogate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Stable id: `<issuer name>:<sub>`. Owner of its tasks and leases, and
    /// a revocation selector.
    pub id: String,
    pub issuer: String,
    pub subject: String,
    pub tenant: Option<String>,
    pub attributes: BTreeMap<String, String>,
}

/// An operator with one or more roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub name: String,
    pub roles: BTreeSet<OperatorRole>,
    /// The person behind the token (as tasks name users), if configured.
    pub user: Option<String>,
}

/// Whoever made the request.
#[derive(Debug, Clone)]
pub enum Caller {
    Workload(Arc<Workload>),
    Operator(Arc<Operator>),
}

impl Caller {
    /// How the caller is named in records (`requested_by`) and logs.
    pub fn principal(&self) -> String {
        match self {
            Self::Workload(w) => format!("workload:{}", w.id),
            Self::Operator(o) => format!("operator:{}", o.name),
        }
    }

    pub fn has_any_role(&self, roles: &[OperatorRole]) -> bool {
        match self {
            Self::Operator(o) => roles.iter().any(|r| o.roles.contains(r)),
            Self::Workload(_) => false,
        }
    }

    pub fn workload(&self) -> Option<&Arc<Workload>> {
        match self {
            Self::Workload(w) => Some(w),
            Self::Operator(_) => None,
        }
    }
}

/// Why a credential was refused. Shown to the caller (401): specific enough
/// to fix a client, never naming keys or other tenants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer credential (send `Authorization: Bearer <token>`)")]
    Missing,
    #[error("malformed bearer credential")]
    Malformed,
    #[error("unknown operator token")]
    UnknownOperator,
    #[error("the token's issuer is not trusted")]
    UnknownIssuer,
    #[error("the token's algorithm is not accepted for its issuer")]
    Algorithm,
    #[error("no key of the issuer matches the token")]
    UnknownKey,
    #[error("the token's signature or claims are invalid: {0}")]
    Invalid(String),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the issuer's keys could not be loaded")]
    KeysUnavailable,
    /// A client certificate refused; the reason is recorded and logged,
    /// never shown to the caller.
    #[error("the client certificate was not accepted")]
    Certificate(String),
}

impl AuthError {
    /// The reason as an investigator reads it (on the chain, in the log):
    /// for a refused certificate, why.
    pub fn detail(&self) -> String {
        match self {
            Self::Certificate(why) => format!("client certificate refused: {why}"),
            other => other.to_string(),
        }
    }
}

struct Cached {
    workload: Arc<Workload>,
    valid_until: i64,
}

/// A verified client certificate chain and the generations of the trust
/// bundles at the time: a reload of any voids it.
type CachedChain = (Cached, Vec<u64>);

/// Verified tokens are cached by their SHA-256 for at most this long (and
/// never past their own expiry), so a busy workload costs one signature
/// check a minute, not one per request.
const CACHE_TTL_MS: i64 = 60_000;
const CACHE_MAX: usize = 65_536;

pub struct Authenticator {
    operators: HashMap<[u8; 32], Arc<Operator>>,
    issuers: HashMap<String, Arc<IssuerVerifier>>,
    x509: Vec<X509Verifier>,
    dpop: DpopVerifier,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    /// Verified client certificate chains, by the SHA-256 of the chain,
    /// with the generations of the bundles they were checked against.
    cert_cache: Mutex<HashMap<[u8; 32], CachedChain>>,
    clock: Arc<dyn Clock>,
    denied_log: LogLimiter,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("operators", &self.operators.len())
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Hex SHA-256 of an operator token, as written in config.
pub fn operator_token_hash(token: &str) -> String {
    crate::hex::encode(&sha256(token.as_bytes()))
}

impl Authenticator {
    pub fn new(cfg: &AuthConfig, clock: Arc<dyn Clock>) -> Result<Self, String> {
        let mut operators = HashMap::new();
        for op in &cfg.operators {
            let h = crate::hex::decode32(&op.token_sha256)
                .ok_or_else(|| format!("operator {}: bad token_sha256", op.name))?;
            operators.insert(
                h,
                Arc::new(Operator {
                    name: op.name.clone(),
                    roles: op.roles.iter().copied().collect(),
                    user: op.user.clone(),
                }),
            );
        }
        let mut issuers = HashMap::new();
        let mut x509 = Vec::new();
        for ic in &cfg.workload_issuers {
            match ic.kind {
                crate::config::IssuerKind::Jwt => {
                    issuers.insert(
                        ic.issuer.clone(),
                        Arc::new(IssuerVerifier::new(ic.clone())?),
                    );
                }
                crate::config::IssuerKind::X509 => x509.push(X509Verifier::new(ic.clone())?),
            }
        }
        Ok(Self {
            operators,
            issuers,
            x509,
            dpop: DpopVerifier::new(cfg.dpop_max_age_seconds, cfg.dpop_leeway_seconds),
            cache: Mutex::new(HashMap::new()),
            cert_cache: Mutex::new(HashMap::new()),
            clock,
            denied_log: LogLimiter::default(),
        })
    }

    pub fn issuers(&self) -> impl Iterator<Item = &Arc<IssuerVerifier>> {
        self.issuers.values()
    }

    /// Check a DPoP proof for a request; the key thumbprint to bind to.
    pub fn verify_dpop(&self, proof: &str, target: ProofTarget<'_>) -> Result<String, DpopError> {
        self.dpop.verify(proof, target, self.clock.now())
    }

    /// Authenticate a request by the client certificate of its connection
    /// (one without a bearer credential).
    pub fn authenticate_certificate(
        &self,
        chain: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<Caller, AuthError> {
        let result = self.certificate_inner(chain);
        if let Err(e) = &result
            && self.denied_log.allow(self.clock.now())
        {
            tracing::warn!(reason = %e.detail(), "authentication denied");
        }
        result
    }

    fn certificate_inner(
        &self,
        chain: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<Caller, AuthError> {
        use x509_parser::prelude::{FromDer as _, X509Certificate};
        let leaf = chain.first().ok_or(AuthError::Missing)?;
        if chain.len() > 8 || chain.iter().any(|c| c.len() > 16 * 1024) {
            return Err(AuthError::Certificate(
                "the chain is too long or too large".into(),
            ));
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for c in chain {
            ctx.update(&u32::try_from(c.len()).unwrap_or(u32::MAX).to_be_bytes());
            ctx.update(c.as_ref());
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(ctx.finish().as_ref());
        let now = self.clock.now();
        let now_ms = now.unix_millis();
        // every bundle's generation now: a reload voids cached verdicts
        let generations: Vec<u64> = self.x509.iter().map(X509Verifier::generation).collect();
        if let Ok(cache) = self.cert_cache.lock()
            && let Some((c, g)) = cache.get(&digest)
            && c.valid_until > now_ms
            && *g == generations
        {
            return Ok(Caller::Workload(c.workload.clone()));
        }
        let (_, parsed) = X509Certificate::from_der(leaf.as_ref())
            .map_err(|_| AuthError::Certificate("the certificate cannot be parsed".into()))?;
        let issuer = self
            .x509
            .iter()
            .find(|v| v.claims(&parsed))
            .ok_or_else(|| {
                AuthError::Certificate("no x509 issuer accepts its trust domain or subject".into())
            })?;
        let (workload, exp_ms) = issuer.verify(chain, now)?;
        let workload = Arc::new(workload);
        let cached = Cached {
            workload: workload.clone(),
            valid_until: exp_ms.min(now_ms + CACHE_TTL_MS),
        };
        remember(&self.cert_cache, digest, (cached, generations), |(c, _)| {
            c.valid_until > now_ms
        });
        Ok(Caller::Workload(workload))
    }

    /// Verify a bearer credential.
    pub async fn authenticate(&self, bearer: &str) -> Result<Caller, AuthError> {
        let result = self.authenticate_inner(bearer).await;
        if let Err(e) = &result
            && self.denied_log.allow(self.clock.now())
        {
            tracing::warn!(reason = %e.detail(), "authentication denied");
        }
        result
    }

    async fn authenticate_inner(&self, bearer: &str) -> Result<Caller, AuthError> {
        if bearer.is_empty() || bearer.len() > 16 * 1024 {
            return Err(AuthError::Malformed);
        }
        let digest = sha256(bearer.as_bytes());
        if let Some(op) = self.operators.get(&digest) {
            return Ok(Caller::Operator(op.clone()));
        }
        if bearer.starts_with(OPERATOR_TOKEN_PREFIX) {
            return Err(AuthError::UnknownOperator);
        }
        let now = self.clock.now().unix_millis();
        if let Ok(cache) = self.cache.lock()
            && let Some(c) = cache.get(&digest)
            && c.valid_until > now
        {
            return Ok(Caller::Workload(c.workload.clone()));
        }
        let iss = jwt::unverified_issuer(bearer)?;
        let verifier = self.issuers.get(&iss).ok_or(AuthError::UnknownIssuer)?;
        let (workload, exp_ms) = verifier.verify(bearer, self.clock.now()).await?;
        let workload = Arc::new(workload);
        let cached = Cached {
            workload: workload.clone(),
            valid_until: exp_ms.min(now + CACHE_TTL_MS),
        };
        remember(&self.cache, digest, cached, |c| c.valid_until > now);
        Ok(Caller::Workload(workload))
    }
}

/// Cache a verdict; when the cache is full, drop the expired ones first,
/// and everything if that is not enough.
fn remember<V>(
    cache: &Mutex<HashMap<[u8; 32], V>>,
    key: [u8; 32],
    value: V,
    live: impl Fn(&V) -> bool,
) {
    if let Ok(mut cache) = cache.lock() {
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, v| live(v));
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, value);
    }
}

/// Operator tokens minted by leasehold start with this, so a mistyped one is
/// refused without trying to parse it as a JWT.
pub const OPERATOR_TOKEN_PREFIX: &str = "lho_";

/// Make a new random operator token.
pub fn generate_operator_token() -> Result<String, String> {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| "the system RNG failed".to_owned())?;
    Ok(format!(
        "{OPERATOR_TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    ))
}

/// At most a few denial log lines per second: a token-guessing flood must
/// not turn into a log flood.
#[derive(Debug, Default)]
struct LogLimiter {
    window: AtomicU64,
    count: AtomicU64,
}

impl LogLimiter {
    const PER_SECOND: u64 = 10;

    fn allow(&self, now: Timestamp) -> bool {
        let sec = u64::try_from(now.unix_seconds()).unwrap_or(0);
        if self.window.swap(sec, Ordering::Relaxed) != sec {
            self.count.store(0, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed) < Self::PER_SECOND
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_hash_round_trips() {
        let t = generate_operator_token().unwrap();
        assert!(t.starts_with("lho_"));
        assert_eq!(
            crate::hex::decode32(&operator_token_hash(&t)).unwrap(),
            sha256(t.as_bytes())
        );
        assert!(crate::hex::decode32("zz").is_none());
    }

    #[test]
    fn denial_logging_is_rate_limited() {
        let l = LogLimiter::default();
        let t = Timestamp::from_unix_millis(5_000);
        let allowed = (0..100).filter(|_| l.allow(t)).count() as u64;
        assert_eq!(allowed, LogLimiter::PER_SECOND);
        assert!(l.allow(Timestamp::from_unix_millis(6_000)));
    }
}
