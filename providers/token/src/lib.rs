//! The built-in token provider: EdDSA-signed JWTs for one task.
//!
//! A token names the workload (`sub`), the task (`task`), the lease (`jti`),
//! the role and scope, and the user the assistant acts for (`act.sub`). The
//! workload is the subject and the user sits in `act`, the reverse of RFC
//! 8693's use of `act` for the actor: a leasehold token must never look like
//! the user's own token (an assistant is never a human surrogate), so the
//! workload stays the subject and resource servers read the user from `act`.
//!
//! Revocation marks the `jti` inactive in a [`Denylist`] the broker backs
//! with its durable store; resource servers learn it through RFC 7662
//! introspection ([`TokenProvider::introspect`]), and verify signatures with
//! the JWKS ([`TokenProvider::jwks`]). `exp` is the lease expiry rounded
//! down to the second, so a token never outlives its lease even if every
//! revocation path fails.
//!
//! Things deliberately absent: no HMAC or RSA (one algorithm, no confusion),
//! no token storage (the token is returned once; only its `jti` and `exp`
//! are kept, as the revocation handle).

#![forbid(unsafe_code)]

mod config;

pub use config::{KIND, TokenProviderConfig, TokenRoleConfig};
/// Where revoked token ids are kept until the tokens expire on their own.
/// The broker implements it on its durable store, so a revocation survives a
/// restart; `deny` must be durable when it returns `Ok`.
pub use leasehold_provider::Denylist;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use leasehold_provider::{
    BindingSupport, Credential, Description, Issued, KeyBinding, LeaseSpec, Provider,
    ProviderError, RevocationHandle, RevokeSpec, RoleInfo, Timestamp, TokenInfo, TokenIssuer,
};
use ring::signature::{self, Ed25519KeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};

/// A role of the token provider: what a token may carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRole {
    /// The scopes a token of this role may carry; a request narrows within
    /// them, an empty request gets all of them.
    pub scopes: Vec<String>,
    pub max_ttl: Duration,
    /// The `aud` of tokens of this role; the provider's default if `None`.
    pub audience: Option<String>,
    pub description: String,
    /// Serve only requests that prove a key (a DPoP proof or a TLS client
    /// certificate), so every token of this role is bound to it (`cnf`).
    pub require_binding: bool,
}

/// Everything the token provider is configured with except its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSettings {
    /// The `iss` of every token, and what introspection checks.
    pub issuer: String,
    /// The default `aud`.
    pub audience: String,
    pub roles: BTreeMap<String, TokenRole>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenConfigError {
    #[error("the signing key is not an Ed25519 PKCS#8 document: {0}")]
    BadKey(String),
    #[error("role `{role}`: {problem}")]
    BadRole { role: String, problem: String },
    #[error("{0}")]
    Invalid(String),
}

/// Make a new Ed25519 signing key as a PKCS#8 v2 document.
pub fn generate_signing_key() -> Result<Vec<u8>, TokenConfigError> {
    let rng = ring::rand::SystemRandom::new();
    Ed25519KeyPair::generate_pkcs8(&rng)
        .map(|d| d.as_ref().to_vec())
        .map_err(|e| TokenConfigError::BadKey(e.to_string()))
}

/// Is `s` a valid OAuth scope-token (RFC 6749 section 3.3)?
pub fn valid_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

/// The claims of a leasehold token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    pub task: String,
    pub role: String,
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tenant: Option<String>,
    pub act: Actor,
    /// The key the token is bound to (RFC 7800 confirmation: `jkt` for
    /// DPoP, RFC 9449; `x5t#S256` for mutual TLS, RFC 8705). A resource
    /// server must then see that key proven with every use.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cnf: Option<serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub sub: String,
}

/// An RFC 7662 introspection response. Inactive tokens say nothing else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Introspection {
    pub active: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub claims: Option<Claims>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_type: Option<&'static str>,
}

impl Introspection {
    fn inactive() -> Self {
        Self {
            active: false,
            claims: None,
            token_type: None,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Handle {
    jti: String,
    exp_ms: i64,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// The token provider.
pub struct TokenProvider {
    settings: TokenSettings,
    key: Ed25519KeyPair,
    key_id: String,
    header_b64: String,
    denylist: Arc<dyn Denylist>,
}

impl fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenProvider")
            .field("issuer", &self.settings.issuer)
            .field("key_id", &self.key_id)
            .field("roles", &self.settings.roles.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl TokenIssuer for TokenProvider {
    fn jwks(&self) -> serde_json::Value {
        TokenProvider::jwks(self)
    }

    fn introspect(&self, token: &str, now: Timestamp) -> TokenInfo {
        let i = TokenProvider::introspect(self, token, now);
        let mut v = TokenInfo {
            active: i.active,
            token_type: i.token_type,
            ..TokenInfo::default()
        };
        if let Some(c) = i.claims {
            v.iss = Some(c.iss);
            v.sub = Some(c.sub);
            v.aud = Some(c.aud);
            v.iat = Some(c.iat);
            v.nbf = Some(c.nbf);
            v.exp = Some(c.exp);
            v.jti = Some(c.jti);
            v.task = Some(c.task);
            v.role = Some(c.role);
            v.scope = Some(c.scope);
            v.tenant = c.tenant;
            v.act = Some(c.act.sub);
            v.cnf = c.cnf.as_ref().and_then(KeyBinding::from_cnf);
        }
        v
    }
}

impl TokenProvider {
    pub fn new(
        settings: TokenSettings,
        signing_key_pkcs8: &[u8],
        denylist: Arc<dyn Denylist>,
    ) -> Result<Self, TokenConfigError> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(signing_key_pkcs8)
            .map_err(|e| TokenConfigError::BadKey(e.to_string()))?;
        if settings.issuer.is_empty() {
            return Err(TokenConfigError::Invalid("issuer must not be empty".into()));
        }
        if settings.audience.is_empty() {
            return Err(TokenConfigError::Invalid(
                "audience must not be empty".into(),
            ));
        }
        if settings.roles.is_empty() {
            return Err(TokenConfigError::Invalid(
                "at least one role is required".into(),
            ));
        }
        for (name, role) in &settings.roles {
            let bad = |problem: &str| TokenConfigError::BadRole {
                role: name.clone(),
                problem: problem.to_owned(),
            };
            if role.scopes.is_empty() {
                return Err(bad("scopes must list at least one scope"));
            }
            if let Some(s) = role.scopes.iter().find(|s| !valid_scope_token(s)) {
                return Err(bad(&format!("`{s}` is not a valid OAuth scope token")));
            }
            if role.max_ttl.is_zero() {
                return Err(bad("max_ttl must be positive"));
            }
        }
        let key_id = jwk_thumbprint(key.public_key().as_ref());
        let header = serde_json::json!({"alg": "EdDSA", "kid": key_id, "typ": "JWT"});
        let header_b64 = B64.encode(header.to_string());
        Ok(Self {
            settings,
            key,
            key_id,
            header_b64,
            denylist,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    /// The JSON Web Key Set resource servers verify tokens with.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": [{
                "kty": "OKP",
                "crv": "Ed25519",
                "use": "sig",
                "alg": "EdDSA",
                "kid": self.key_id,
                "x": B64.encode(self.key.public_key().as_ref()),
            }]
        })
    }

    /// RFC 7662: is this token active right now? Inactive covers a bad
    /// signature, a foreign issuer or key, expiry, not-yet-valid and
    /// revocation. Errors reading the denylist fail closed (inactive).
    pub fn introspect(&self, token: &str, now: Timestamp) -> Introspection {
        let Some(claims) = self.verify(token) else {
            return Introspection::inactive();
        };
        let now_s = now.unix_seconds();
        if claims.exp <= now_s || claims.nbf > now_s {
            return Introspection::inactive();
        }
        match self.denylist.is_denied(&claims.jti) {
            Ok(false) => Introspection {
                active: true,
                claims: Some(claims),
                token_type: Some("Bearer"),
            },
            Ok(true) | Err(_) => Introspection::inactive(),
        }
    }

    /// Signature, algorithm, key id and issuer; not time or revocation.
    fn verify(&self, token: &str) -> Option<Claims> {
        let mut parts = token.split('.');
        let (h, p, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || token.len() > 16 * 1024 {
            return None;
        }
        let header: Header = serde_json::from_slice(&B64.decode(h).ok()?).ok()?;
        if header.alg != "EdDSA" || header.kid.as_deref() != Some(self.key_id.as_str()) {
            return None;
        }
        let sig = B64.decode(s).ok()?;
        let signed_len = h.len() + 1 + p.len();
        let public =
            signature::UnparsedPublicKey::new(&signature::ED25519, self.key.public_key().as_ref());
        public.verify(&token.as_bytes()[..signed_len], &sig).ok()?;
        let claims: Claims = serde_json::from_slice(&B64.decode(p).ok()?).ok()?;
        (claims.iss == self.settings.issuer).then_some(claims)
    }

    fn role(&self, name: &str) -> Result<&TokenRole, ProviderError> {
        self.settings.roles.get(name).ok_or_else(|| {
            ProviderError::invalid(format!("the token provider has no role `{name}`"))
        })
    }

    fn sign(&self, claims: &Claims) -> Result<String, ProviderError> {
        let payload = serde_json::to_vec(claims)
            .map_err(|e| ProviderError::permanent(format!("encoding claims: {e}")))?;
        let mut token = String::with_capacity(self.header_b64.len() + payload.len() * 4 / 3 + 90);
        token.push_str(&self.header_b64);
        token.push('.');
        B64.encode_string(&payload, &mut token);
        let sig = self.key.sign(token.as_bytes());
        token.push('.');
        B64.encode_string(sig.as_ref(), &mut token);
        Ok(token)
    }

    fn handle(jti: &str, exp: Timestamp) -> Result<RevocationHandle, ProviderError> {
        serde_json::to_vec(&Handle {
            jti: jti.to_owned(),
            exp_ms: exp.unix_millis(),
        })
        .map(RevocationHandle::new)
        .map_err(|e| ProviderError::permanent(format!("encoding handle: {e}")))
    }

    fn decode_handle(handle: &RevocationHandle) -> Result<Handle, ProviderError> {
        serde_json::from_slice(handle.as_bytes()).map_err(|e| {
            ProviderError::permanent(format!("unreadable token revocation handle: {e}"))
        })
    }
}

/// RFC 7638 thumbprint of an Ed25519 public key: a stable `kid`.
fn jwk_thumbprint(public: &[u8]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        B64.encode(public)
    );
    B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

#[async_trait::async_trait]
impl Provider for TokenProvider {
    fn describe(&self) -> Description {
        Description {
            kind: "token",
            roles: self
                .settings
                .roles
                .iter()
                .map(|(name, r)| RoleInfo {
                    name: name.clone(),
                    max_ttl: r.max_ttl,
                    description: r.description.clone(),
                })
                .collect(),
            revocation: "the token id is marked inactive: introspection (RFC 7662) reports it \
                         inactive at once; the token's own exp is the lease expiry"
                .to_owned(),
        }
    }

    fn validate(&self, role: &str, scope: &[String]) -> Result<Duration, ProviderError> {
        let r = self.role(role)?;
        for s in scope {
            if !r.scopes.contains(s) {
                return Err(ProviderError::invalid(format!(
                    "scope `{}` is not allowed for role `{role}`",
                    s.escape_default()
                )));
            }
        }
        Ok(r.max_ttl)
    }

    fn binding(&self, role: &str) -> BindingSupport {
        match self.settings.roles.get(role) {
            Some(r) if r.require_binding => BindingSupport::Required,
            Some(_) => BindingSupport::Optional,
            None => BindingSupport::Unsupported,
        }
    }

    async fn health(&self) -> Result<(), ProviderError> {
        self.denylist
            .is_denied("health-check")
            .map(|_| ())
            .map_err(|e| ProviderError::retryable(format!("denylist unavailable: {e}")))
    }

    async fn issue(&self, spec: &LeaseSpec) -> Result<Issued, ProviderError> {
        let r = self.role(&spec.role)?;
        let ceiling = spec.issued_at.saturating_add(r.max_ttl);
        let expires_at = spec.expires_at.min(ceiling);
        let exp = expires_at.unix_seconds();
        if exp <= spec.issued_at.unix_seconds() {
            return Err(ProviderError::invalid(
                "the lease ends before its first whole second",
            ));
        }
        let scope = if spec.scope.is_empty() {
            r.scopes.join(" ")
        } else {
            spec.scope.join(" ")
        };
        let audience = r
            .audience
            .clone()
            .unwrap_or_else(|| self.settings.audience.clone());
        let claims = Claims {
            iss: self.settings.issuer.clone(),
            sub: spec.workload.clone(),
            aud: audience.clone(),
            iat: spec.issued_at.unix_seconds(),
            nbf: spec.issued_at.unix_seconds(),
            exp,
            jti: spec.lease_id.clone(),
            task: spec.task_id.clone(),
            role: spec.role.clone(),
            scope,
            tenant: spec.tenant.clone(),
            act: Actor {
                sub: spec.on_behalf_of.clone(),
            },
            cnf: spec.binding.as_ref().map(KeyBinding::cnf),
        };
        if r.require_binding && claims.cnf.is_none() {
            // the broker refuses such a request before its intent; never
            // mint a bearer token for a role that promises bound ones
            return Err(ProviderError::invalid(format!(
                "role `{}` issues only bound tokens: send a DPoP proof or use mutual TLS",
                spec.role
            )));
        }
        let token = self.sign(&claims)?;
        let expires_at = Timestamp::from_unix_millis(exp * 1000);
        Ok(Issued {
            credential: Credential::new()
                .secret("token", token)
                .public("token_type", "Bearer")
                .public("audience", audience.clone()),
            handle: Self::handle(&spec.lease_id, expires_at)?,
            expires_at,
            // how revocation works is in `describe()`; the record stays small
            description: match &spec.binding {
                None => format!("EdDSA JWT for audience `{audience}`"),
                Some(KeyBinding::Dpop { jkt }) => {
                    format!("EdDSA JWT for audience `{audience}`, bound to DPoP key {jkt}")
                }
                Some(KeyBinding::Mtls { x5t_s256 }) => format!(
                    "EdDSA JWT for audience `{audience}`, bound to client certificate {x5t_s256}"
                ),
            },
        })
    }

    async fn revoke(&self, lease: &RevokeSpec) -> Result<(), ProviderError> {
        let h = Self::decode_handle(&lease.handle)?;
        self.denylist
            .deny(&[(h.jti, Timestamp::from_unix_millis(h.exp_ms))])
            .await
            .map_err(ProviderError::retryable)
    }

    async fn revoke_many(&self, leases: &[RevokeSpec]) -> Vec<Result<(), ProviderError>> {
        let mut entries = Vec::with_capacity(leases.len());
        let mut results: Vec<Result<(), ProviderError>> = Vec::with_capacity(leases.len());
        for lease in leases {
            match Self::decode_handle(&lease.handle) {
                Ok(h) => {
                    entries.push((h.jti, Timestamp::from_unix_millis(h.exp_ms)));
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if let Err(e) = self.denylist.deny(&entries).await {
            for r in results.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(ProviderError::retryable(e.clone()));
            }
        }
        results
    }

    async fn rollback(&self, spec: &LeaseSpec) -> Result<(), ProviderError> {
        // The jti is the lease id, so the orphan is found without its handle.
        // Deny until the latest moment the token could have expired.
        let until = spec.expires_at.saturating_add(Duration::from_secs(1));
        self.denylist
            .deny(&[(spec.lease_id.clone(), until)])
            .await
            .map_err(ProviderError::retryable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_provider::conformance::{self, Probe, SpecFactory};
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// An in-memory denylist for unit tests only; the broker's tests run
    /// the same suite against its durable store.
    #[derive(Debug, Default)]
    struct MemDenylist(Mutex<HashMap<String, Timestamp>>);

    #[async_trait::async_trait]
    impl Denylist for MemDenylist {
        async fn deny(&self, entries: &[(String, Timestamp)]) -> Result<(), String> {
            let mut m = self.0.lock().map_err(|e| e.to_string())?;
            for (j, t) in entries {
                m.insert(j.clone(), *t);
            }
            Ok(())
        }
        fn is_denied(&self, jti: &str) -> Result<bool, String> {
            Ok(self.0.lock().map_err(|e| e.to_string())?.contains_key(jti))
        }
    }

    const NOW: i64 = 1_800_000_000_000;

    fn provider() -> TokenProvider {
        let mut roles = BTreeMap::new();
        roles.insert(
            "demo".to_owned(),
            TokenRole {
                scopes: vec!["demo:read".into(), "demo:write".into()],
                max_ttl: Duration::from_secs(600),
                audience: None,
                description: "demo".into(),
                require_binding: false,
            },
        );
        roles.insert(
            "bound".to_owned(),
            TokenRole {
                scopes: vec!["demo:read".into()],
                max_ttl: Duration::from_secs(600),
                audience: None,
                description: "bound tokens only".into(),
                require_binding: true,
            },
        );
        let settings = TokenSettings {
            issuer: "https://lh.test".into(),
            audience: "svc".into(),
            roles,
        };
        let key = generate_signing_key().unwrap();
        TokenProvider::new(settings, &key, Arc::new(MemDenylist::default())).unwrap()
    }

    struct Specs(AtomicU64);
    impl SpecFactory for Specs {
        fn spec(&self, role: &str, ttl: Duration) -> LeaseSpec {
            let n = self.0.fetch_add(1, Ordering::Relaxed);
            let now = Timestamp::from_unix_millis(NOW);
            LeaseSpec {
                lease_id: format!("lease_{n}"),
                task_id: "task_1".into(),
                workload: "dev:a".into(),
                tenant: None,
                on_behalf_of: "alice@example.com".into(),
                role: role.into(),
                scope: vec![],
                issued_at: now,
                expires_at: now.saturating_add(ttl),
                prepared: None,
                binding: None,
            }
        }
    }

    struct IntrospectProbe<'a>(&'a TokenProvider);
    #[async_trait::async_trait]
    impl Probe for IntrospectProbe<'_> {
        async fn usable(&self, _: &LeaseSpec, c: &Credential) -> Result<bool, String> {
            let token = c.expose("token").ok_or("no token")?;
            Ok(self
                .0
                .introspect(token, Timestamp::from_unix_millis(NOW + 1000))
                .active)
        }
    }

    #[tokio::test]
    async fn conformance_with_memory_denylist() {
        let p = provider();
        let report = conformance::run(&p, &IntrospectProbe(&p), &Specs(AtomicU64::new(0)), "demo")
            .await
            .unwrap();
        assert_eq!(report.steps.len(), 8);
    }

    #[tokio::test]
    async fn token_claims_and_expiry() {
        let p = provider();
        let spec = Specs(AtomicU64::new(0)).spec("demo", Duration::from_millis(90_500));
        let issued = p.issue(&spec).await.unwrap();
        // rounded down to the second, never after the lease
        assert_eq!(issued.expires_at.unix_millis(), NOW + 90_000);
        let token = issued.credential.expose("token").unwrap();
        let i = p.introspect(token, Timestamp::from_unix_millis(NOW));
        let claims = i.claims.unwrap();
        assert_eq!(claims.sub, "dev:a");
        assert_eq!(claims.act.sub, "alice@example.com");
        assert_eq!(claims.jti, spec.lease_id);
        assert_eq!(claims.scope, "demo:read demo:write");
        // expired at exp exactly
        assert!(
            !p.introspect(token, Timestamp::from_unix_millis(NOW + 90_000))
                .active
        );
        assert!(
            p.introspect(token, Timestamp::from_unix_millis(NOW + 89_999))
                .active
        );
    }

    #[tokio::test]
    async fn role_max_ttl_caps_the_token() {
        let p = provider();
        let spec = Specs(AtomicU64::new(0)).spec("demo", Duration::from_secs(7200));
        let issued = p.issue(&spec).await.unwrap();
        assert_eq!(issued.expires_at.unix_millis(), NOW + 600_000);
    }

    #[test]
    fn forged_and_foreign_tokens_are_inactive() {
        let p = provider();
        let other = provider();
        let now = Timestamp::from_unix_millis(NOW);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let spec = Specs(AtomicU64::new(0)).spec("demo", Duration::from_secs(60));
        let token = rt
            .block_on(p.issue(&spec))
            .unwrap()
            .credential
            .expose("token")
            .unwrap()
            .to_owned();
        assert!(p.introspect(&token, now).active);
        // another key: inactive
        assert!(!other.introspect(&token, now).active);
        // tampered payload: inactive
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged_claims = B64.encode(br#"{"iss":"https://lh.test","sub":"x"}"#);
        parts[1] = &forged_claims;
        assert!(!p.introspect(&parts.join("."), now).active);
        // alg none: inactive
        let none = format!(
            "{}.{}.",
            B64.encode(br#"{"alg":"none"}"#),
            token.split('.').nth(1).unwrap()
        );
        assert!(!p.introspect(&none, now).active);
        assert!(!p.introspect("garbage", now).active);
        assert!(!p.introspect("", now).active);
    }

    #[tokio::test]
    async fn bound_tokens_carry_cnf_and_bound_roles_refuse_bearer() {
        let p = provider();
        let f = Specs(AtomicU64::new(0));
        let now = Timestamp::from_unix_millis(NOW);
        assert_eq!(p.binding("demo"), BindingSupport::Optional);
        assert_eq!(p.binding("bound"), BindingSupport::Required);
        assert_eq!(p.binding("nope"), BindingSupport::Unsupported);
        for binding in [
            KeyBinding::Dpop {
                jkt: "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I".into(),
            },
            KeyBinding::Mtls {
                x5t_s256: "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2".into(),
            },
        ] {
            let mut spec = f.spec("bound", Duration::from_secs(60));
            spec.binding = Some(binding.clone());
            let issued = p.issue(&spec).await.unwrap();
            let token = issued.credential.expose("token").unwrap();
            let info = TokenIssuer::introspect(&p, token, now);
            assert!(info.active);
            assert_eq!(info.cnf, Some(binding.clone()));
            // the claim in the token itself, as a resource server reads it
            let payload = B64.decode(token.split('.').nth(1).unwrap()).unwrap();
            let claims: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            assert_eq!(claims["cnf"], binding.cnf());
            assert!(issued.description.contains("bound to"));
        }
        // a bearer request for a bound-only role mints nothing
        let spec = f.spec("bound", Duration::from_secs(60));
        let e = p.issue(&spec).await.unwrap_err();
        assert_eq!(e.class, leasehold_provider::ErrorClass::Invalid);
        // and an unbound token has no cnf
        let spec = f.spec("demo", Duration::from_secs(60));
        let issued = p.issue(&spec).await.unwrap();
        let info = TokenIssuer::introspect(&p, issued.credential.expose("token").unwrap(), now);
        assert!(info.active && info.cnf.is_none());
    }

    #[test]
    fn scope_validation() {
        let p = provider();
        assert!(p.validate("demo", &["demo:read".into()]).is_ok());
        let e = p.validate("demo", &["admin".into()]).unwrap_err();
        assert_eq!(e.class, leasehold_provider::ErrorClass::Invalid);
        assert!(p.validate("nope", &[]).is_err());
        assert!(valid_scope_token("demo:read"));
        assert!(!valid_scope_token("a b"));
        assert!(!valid_scope_token("a\"b"));
    }

    #[test]
    fn config_errors_are_named() {
        let key = generate_signing_key().unwrap();
        let mut roles = BTreeMap::new();
        roles.insert(
            "r".to_owned(),
            TokenRole {
                scopes: vec![],
                max_ttl: Duration::from_secs(1),
                audience: None,
                description: String::new(),
                require_binding: false,
            },
        );
        let s = TokenSettings {
            issuer: "i".into(),
            audience: "a".into(),
            roles,
        };
        let e = TokenProvider::new(s, &key, Arc::new(MemDenylist::default())).unwrap_err();
        assert!(e.to_string().contains("role `r`"), "{e}");
        let s = TokenSettings {
            issuer: "i".into(),
            audience: "a".into(),
            roles: BTreeMap::new(),
        };
        assert!(
            TokenProvider::new(s.clone(), b"not a key", Arc::new(MemDenylist::default())).is_err()
        );
    }
}
