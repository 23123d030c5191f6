//! Workload JWT verification against one configured issuer.
//!
//! The algorithm is pinned per issuer in config and must also match the
//! key's type (and the key's own `alg` when the JWKS states one), so an RSA
//! public key can never be used as an HMAC secret and `none` never verifies.
//! Time claims are checked against the broker's clock, with the issuer's
//! small leeway, not against the system time inside the JWT library.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::{AuthError, Workload};
use crate::clock::Timestamp;
use crate::config::IssuerConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Ed25519,
    P256,
    P384,
    Rsa,
}

fn family_of(alg: Algorithm) -> Option<Family> {
    match alg {
        Algorithm::EdDSA => Some(Family::Ed25519),
        Algorithm::ES256 => Some(Family::P256),
        Algorithm::ES384 => Some(Family::P384),
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Some(Family::Rsa),
        // HMAC is never accepted for workloads
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => None,
    }
}

fn parse_algorithm(name: &str) -> Option<Algorithm> {
    let a: Algorithm = name.parse().ok()?;
    family_of(a).map(|_| a)
}

fn key_algorithm(k: KeyAlgorithm) -> Option<Algorithm> {
    parse_algorithm(&format!("{k:?}"))
}

struct VerifyKey {
    kid: Option<String>,
    alg: Option<Algorithm>,
    family: Family,
    key: DecodingKey,
}

/// Parse a JWKS document, keeping the asymmetric keys (symmetric `oct` keys
/// are ignored: they cannot identify a workload).
fn parse_jwks(bytes: &[u8]) -> Result<Vec<VerifyKey>, String> {
    let set: JwkSet =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let family = match &jwk.algorithm {
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                Family::Ed25519
            }
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Family::P256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => Family::P384,
            AlgorithmParameters::RSA(_) => Family::Rsa,
            _ => continue,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key in JWKS: {e}"))?;
        keys.push(VerifyKey {
            kid: jwk.common.key_id.clone(),
            alg: jwk.common.key_algorithm.and_then(key_algorithm),
            family,
            key,
        });
    }
    if keys.is_empty() {
        return Err("the JWKS holds no usable asymmetric key".into());
    }
    Ok(keys)
}

/// Check a JWKS file; used by `config validate` and start-up.
pub fn load_jwks_file(path: &Path) -> Result<usize, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_jwks(&bytes).map(|k| k.len())
}

/// The `iss` of a token, read without verification only to choose which
/// issuer's keys verify it.
pub(super) fn unverified_issuer(token: &str) -> Result<String, AuthError> {
    let payload = token.split('.').nth(1).ok_or(AuthError::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed)?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
    v.get("iss")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or(AuthError::UnknownIssuer)
}

/// Verifies the tokens of one issuer.
pub struct IssuerVerifier {
    cfg: IssuerConfig,
    algorithms: Vec<Algorithm>,
    keys: RwLock<Arc<Vec<VerifyKey>>>,
    last_fetch: Mutex<Option<i64>>,
    http: Option<reqwest::Client>,
}

impl std::fmt::Debug for IssuerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerVerifier")
            .field("name", &self.cfg.name)
            .field("issuer", &self.cfg.issuer)
            .finish()
    }
}

/// A key-miss refetch happens at most this often.
const REFETCH_MIN_MS: i64 = 30_000;

impl IssuerVerifier {
    pub fn new(cfg: IssuerConfig) -> Result<Self, String> {
        let algorithms = cfg
            .algorithms
            .iter()
            .map(|a| {
                parse_algorithm(a)
                    .ok_or_else(|| format!("issuer {}: algorithm {a} not allowed", cfg.name))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (keys, http) = match (&cfg.jwks_file, &cfg.jwks_url) {
            (Some(path), _) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| format!("issuer {}: {}: {e}", cfg.name, path.display()))?;
                (
                    parse_jwks(&bytes).map_err(|e| format!("issuer {}: {e}", cfg.name))?,
                    None,
                )
            }
            (None, Some(_)) => {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .map_err(|e| format!("issuer {}: HTTP client: {e}", cfg.name))?;
                (Vec::new(), Some(client))
            }
            (None, None) => return Err(format!("issuer {}: no JWKS source", cfg.name)),
        };
        Ok(Self {
            cfg,
            algorithms,
            keys: RwLock::new(Arc::new(keys)),
            last_fetch: Mutex::new(None),
            http,
        })
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn refresh_interval(&self) -> Option<Duration> {
        self.http
            .as_ref()
            .map(|_| Duration::from_secs(self.cfg.jwks_refresh_seconds))
    }

    /// Fetch the JWKS from its URL (no-op for file sources). Keeps the old
    /// keys when the fetch fails.
    pub async fn refresh(&self, now: Timestamp) -> Result<(), String> {
        let (Some(http), Some(url)) = (&self.http, &self.cfg.jwks_url) else {
            return Ok(());
        };
        if let Ok(mut l) = self.last_fetch.lock() {
            *l = Some(now.unix_millis());
        }
        let resp = http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("fetching {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("fetching {url}: HTTP {}", resp.status()));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| format!("reading {url}: {e}"))?;
        if bytes.len() > 1024 * 1024 {
            return Err(format!("{url}: JWKS larger than 1 MiB"));
        }
        let keys = parse_jwks(&bytes)?;
        if let Ok(mut k) = self.keys.write() {
            *k = Arc::new(keys);
        }
        Ok(())
    }

    fn current(&self) -> Arc<Vec<VerifyKey>> {
        self.keys.read().map(|k| k.clone()).unwrap_or_default()
    }

    fn may_refetch(&self, now: Timestamp) -> bool {
        self.http.is_some()
            && self
                .last_fetch
                .lock()
                .map(|l| l.is_none_or(|t| now.unix_millis() - t >= REFETCH_MIN_MS))
                .unwrap_or(false)
    }

    fn select(keys: &[VerifyKey], kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
        let family = family_of(alg)?;
        let fits = |k: &&VerifyKey| k.family == family && k.alg.is_none_or(|a| a == alg);
        let mut candidates = keys.iter().filter(fits);
        match kid {
            Some(kid) => candidates
                .find(|k| k.kid.as_deref() == Some(kid))
                .map(|k| k.key.clone()),
            None => {
                // without a kid, only an unambiguous key is acceptable
                let first = candidates.next()?;
                candidates.next().is_none().then(|| first.key.clone())
            }
        }
    }

    /// Verify a token; returns the workload and the token's expiry (ms).
    pub async fn verify(&self, token: &str, now: Timestamp) -> Result<(Workload, i64), AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::Algorithm);
        }
        let mut key = Self::select(&self.current(), header.kid.as_deref(), header.alg);
        if key.is_none() && self.may_refetch(now) {
            if let Err(e) = self.refresh(now).await {
                tracing::warn!(issuer = %self.cfg.name, error = %e, "JWKS refresh failed");
                if self.current().is_empty() {
                    return Err(AuthError::KeysUnavailable);
                }
            }
            key = Self::select(&self.current(), header.kid.as_deref(), header.alg);
        }
        let key = key.ok_or(AuthError::UnknownKey)?;

        let mut v = Validation::new(header.alg);
        v.validate_exp = false; // checked below against the broker's clock
        v.validate_nbf = false;
        v.leeway = 0;
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&self.cfg.audiences);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key, &v)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                AuthError::Invalid(
                    match e.kind() {
                        K::InvalidSignature => "bad signature",
                        K::InvalidAudience => "audience not accepted",
                        K::InvalidIssuer => "issuer mismatch",
                        K::MissingRequiredClaim(_) => {
                            "a required claim (exp, iss, aud, sub) is missing"
                        }
                        _ => "token rejected",
                    }
                    .to_owned(),
                )
            })?;
        let claims = data.claims;
        let leeway = i64::try_from(self.cfg.leeway_seconds).unwrap_or(0);
        let now_s = now.unix_seconds();
        let num = |name: &str| claims.get(name).and_then(Value::as_i64);
        let exp = num("exp").ok_or_else(|| AuthError::Invalid("exp is not a number".into()))?;
        if now_s >= exp.saturating_add(leeway) {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = num("nbf")
            && nbf > now_s.saturating_add(leeway)
        {
            return Err(AuthError::NotYetValid);
        }
        if let Some(iat) = num("iat")
            && iat > now_s.saturating_add(leeway)
        {
            return Err(AuthError::NotYetValid);
        }
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if sub.is_empty() || sub.len() > 255 || sub.chars().any(char::is_control) {
            return Err(AuthError::Invalid(
                "sub must be 1-255 printable characters".into(),
            ));
        }
        // one canonical form, so fences and selectors match however typed
        let sub =
            crate::check::identifier("sub", sub).map_err(|e| AuthError::Invalid(e.message))?;
        let tenant = match (&self.cfg.tenant, &self.cfg.tenant_claim) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(c)) => claims.get(c).and_then(Value::as_str).map(str::to_owned),
            (None, None) => None,
        };
        let tenant = tenant
            .map(|t| crate::check::identifier("tenant", &t))
            .transpose()
            .map_err(|e| AuthError::Invalid(e.message))?;
        let attributes = self
            .cfg
            .attribute_claims
            .iter()
            .filter_map(|c| {
                claims.get(c).map(|v| {
                    let s = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                    (c.clone(), s)
                })
            })
            .collect();
        let exp_ms = exp.saturating_add(leeway).saturating_mul(1000);
        Ok((
            Workload {
                id: format!("{}:{sub}", self.cfg.name),
                issuer: self.cfg.name.clone(),
                subject: sub.clone(),
                tenant,
                attributes,
            },
            exp_ms,
        ))
    }
}
