//! DPoP proofs (RFC 9449): a workload proves, with each credential
//! request, that it holds a private key; the credential it is leased is
//! then bound to that key (`cnf.jkt`), so a copy of it is useless to
//! whoever lacks the key.
//!
//! A proof is a JWT of type `dpop+jwt`, signed with an asymmetric key whose
//! public half is in its header (`jwk`), naming the request's method
//! (`htm`) and URL (`htu`), when it was made (`iat`) and a unique id
//! (`jti`). It is refused when any of that does not match this request,
//! when it is older than the accepted window or from the future, when its
//! `jti` was seen before within the window (on this node: a replayed proof
//! would only get a token bound to a key the replayer does not hold), when
//! the key is symmetric or carries private members, or when the signature
//! does not verify with the key of the header under the algorithm of the
//! header, which must fit the key's type.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use crate::clock::Timestamp;

/// Why a proof was refused; shown to the caller (400 `invalid_dpop_proof`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    #[error("the DPoP proof is not a compact JWS with JSON header and claims")]
    Malformed,
    #[error("the DPoP proof's `typ` must be `dpop+jwt`")]
    Type,
    #[error("the DPoP proof's algorithm is not accepted (asymmetric only, fitting its key)")]
    Algorithm,
    #[error("the DPoP proof's `jwk` must be one public EC (P-256, P-384), Ed25519 or RSA key")]
    Key,
    #[error("the DPoP proof's signature does not verify with its `jwk`")]
    Signature,
    #[error("the DPoP proof lacks `{0}`, or it has the wrong type")]
    Claim(&'static str),
    #[error("the DPoP proof's `htm` is not this request's method")]
    Method,
    #[error("the DPoP proof's `htu` is not this request's URL")]
    Url,
    #[error("the DPoP proof's `iat` is outside the accepted window ({0})")]
    Time(&'static str),
    #[error("the DPoP proof was already used (`jti` seen before)")]
    Replayed,
    #[error("the DPoP proof's `ath` does not match the access token sent with it")]
    AccessTokenHash,
    #[error("too many DPoP proofs in the window; retry shortly")]
    Busy,
}

/// The request a proof must be for.
#[derive(Debug, Clone, Copy)]
pub struct ProofTarget<'a> {
    /// `POST`, ...
    pub method: &'a str,
    /// The URL the request was sent to, as the broker is reached.
    pub url: &'a str,
    /// The bearer credential the request carries, checked against `ath`
    /// when the proof has one.
    pub access_token: Option<&'a str>,
}

/// Checks proofs and remembers their ids for the window.
#[derive(Debug)]
pub struct DpopVerifier {
    max_age_seconds: i64,
    leeway_seconds: i64,
    seen: Mutex<HashMap<[u8; 32], i64>>,
    capacity: usize,
}

/// Proof ids remembered at most: 2^18 entries (about 16 MiB) hold a
/// window's proofs at over 4,000 bound requests a second on one node.
const SEEN_CAPACITY: usize = 1 << 18;

/// A proof larger than this is refused before it is parsed.
const MAX_PROOF_BYTES: usize = 8 * 1024;

impl DpopVerifier {
    pub fn new(max_age_seconds: u64, leeway_seconds: u64) -> Self {
        Self {
            max_age_seconds: i64::try_from(max_age_seconds).unwrap_or(60),
            leeway_seconds: i64::try_from(leeway_seconds).unwrap_or(5),
            seen: Mutex::new(HashMap::new()),
            capacity: SEEN_CAPACITY,
        }
    }

    /// Verify `proof` for `target` at `now`; returns the key's thumbprint
    /// (`jkt`) the credential is to be bound to.
    pub fn verify(
        &self,
        proof: &str,
        target: ProofTarget<'_>,
        now: Timestamp,
    ) -> Result<String, DpopError> {
        if proof.len() > MAX_PROOF_BYTES {
            return Err(DpopError::Malformed);
        }
        let mut parts = proof.split('.');
        let (Some(h), Some(c), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(DpopError::Malformed);
        };
        let header = json_object(h)?;
        let claims = json_object(c)?;
        if header.get("typ").and_then(Value::as_str) != Some("dpop+jwt") {
            return Err(DpopError::Type);
        }
        let alg: Algorithm = header
            .get("alg")
            .and_then(Value::as_str)
            .and_then(|a| a.parse().ok())
            .ok_or(DpopError::Algorithm)?;
        let jwk_value = header.get("jwk").ok_or(DpopError::Key)?;
        let (key, jkt) = public_key(jwk_value, alg)?;
        let message = &proof[..h.len() + 1 + c.len()];
        if !jsonwebtoken::crypto::verify(sig, message.as_bytes(), &key, alg).unwrap_or(false) {
            return Err(DpopError::Signature);
        }
        let text = |name: &'static str| {
            claims
                .get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty() && s.len() <= 2048)
                .ok_or(DpopError::Claim(name))
        };
        let jti = text("jti")?;
        if text("htm")? != target.method {
            return Err(DpopError::Method);
        }
        let expected = normalize_url(target.url).ok_or(DpopError::Url)?;
        if normalize_url(text("htu")?).as_deref() != Some(expected.as_str()) {
            return Err(DpopError::Url);
        }
        let iat = claims
            .get("iat")
            .and_then(Value::as_i64)
            .ok_or(DpopError::Claim("iat"))?;
        let now_s = now.unix_seconds();
        if iat > now_s + self.leeway_seconds {
            return Err(DpopError::Time("made in the future"));
        }
        if iat < now_s - self.max_age_seconds - self.leeway_seconds {
            return Err(DpopError::Time("too old"));
        }
        match (claims.get("ath"), target.access_token) {
            (None, _) => {}
            (Some(Value::String(ath)), Some(token)) => {
                let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
                if *ath != B64.encode(digest.as_ref()) {
                    return Err(DpopError::AccessTokenHash);
                }
            }
            (Some(_), _) => return Err(DpopError::AccessTokenHash),
        }
        self.remember(
            &jkt,
            jti,
            iat + self.max_age_seconds + self.leeway_seconds,
            now_s,
        )?;
        Ok(jkt)
    }

    /// Record a proof id until `until`; refuse one seen before.
    fn remember(&self, jkt: &str, jti: &str, until: i64, now_s: i64) -> Result<(), DpopError> {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(jkt.as_bytes());
        ctx.update(b"\0");
        ctx.update(jti.as_bytes());
        let mut id = [0u8; 32];
        id.copy_from_slice(ctx.finish().as_ref());
        let mut seen = self.seen.lock().map_err(|_| DpopError::Busy)?;
        if seen.get(&id).is_some_and(|t| *t >= now_s) {
            return Err(DpopError::Replayed);
        }
        if seen.len() >= self.capacity {
            seen.retain(|_, t| *t >= now_s);
            if seen.len() >= self.capacity {
                // forgetting a live id would let it be replayed: refuse
                return Err(DpopError::Busy);
            }
        }
        seen.insert(id, until);
        Ok(())
    }
}

fn json_object(segment: &str) -> Result<Map<String, Value>, DpopError> {
    let bytes = B64.decode(segment).map_err(|_| DpopError::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(DpopError::Malformed),
    }
}

/// The proof's public key, checked against its algorithm, and its RFC 7638
/// thumbprint (base64url SHA-256 of the required members, in order).
fn public_key(v: &Value, alg: Algorithm) -> Result<(DecodingKey, String), DpopError> {
    let o = v.as_object().ok_or(DpopError::Key)?;
    // private or symmetric key material never belongs in a proof
    if ["d", "p", "q", "dp", "dq", "qi", "oth", "k"]
        .iter()
        .any(|m| o.contains_key(*m))
    {
        return Err(DpopError::Key);
    }
    let member = |name: &str| {
        o.get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or(DpopError::Key)
    };
    let jwk: Jwk = serde_json::from_value(v.clone()).map_err(|_| DpopError::Key)?;
    let fits = match (&jwk.algorithm, alg) {
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES384) => p.curve == EllipticCurve::P384,
        (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => {
            p.curve == EllipticCurve::Ed25519
        }
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512,
        ) => true,
        (AlgorithmParameters::EllipticCurve(_) | AlgorithmParameters::OctetKeyPair(_), _)
        | (AlgorithmParameters::RSA(_), _) => return Err(DpopError::Algorithm),
        (AlgorithmParameters::OctetKey(_), _) => return Err(DpopError::Key),
    };
    if !fits {
        return Err(DpopError::Algorithm);
    }
    // RFC 7638: the required members, lexicographically, no whitespace
    let canonical = match member("kty")? {
        "EC" => format!(
            r#"{{"crv":{},"kty":"EC","x":{},"y":{}}}"#,
            json_str(member("crv")?),
            json_str(member("x")?),
            json_str(member("y")?)
        ),
        "OKP" => format!(
            r#"{{"crv":{},"kty":"OKP","x":{}}}"#,
            json_str(member("crv")?),
            json_str(member("x")?)
        ),
        "RSA" => format!(
            r#"{{"e":{},"kty":"RSA","n":{}}}"#,
            json_str(member("e")?),
            json_str(member("n")?)
        ),
        _ => return Err(DpopError::Key),
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| DpopError::Key)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
    Ok((key, B64.encode(digest.as_ref())))
}

fn json_str(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// RFC 9449 §4.3: `htu` is compared without query and fragment, after
/// syntax- and scheme-based normalization (case of scheme and host, the
/// default port, an empty path). `None` for what is not an http(s) URL.
fn normalize_url(url: &str) -> Option<String> {
    let url = url.split(['?', '#']).next()?;
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => ":443",
        "http" => ":80",
        _ => return None,
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let mut authority = authority.to_ascii_lowercase();
    if authority.ends_with(default_port) {
        authority.truncate(authority.len() - default_port.len());
    }
    Some(format!("{scheme}://{authority}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprint_matches_rfc_7638_example() {
        // RFC 7638 §3.1
        let jwk = serde_json::json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        let (_, jkt) = public_key(&jwk, Algorithm::RS256).unwrap();
        assert_eq!(jkt, "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
        // the same key under an EC algorithm is refused
        assert_eq!(
            public_key(&jwk, Algorithm::ES256).err(),
            Some(DpopError::Algorithm)
        );
        // private members are refused
        let mut private = jwk.clone();
        private["d"] = Value::String("AAAA".into());
        assert_eq!(
            public_key(&private, Algorithm::RS256).err(),
            Some(DpopError::Key)
        );
        let oct = serde_json::json!({"kty": "oct", "k": "c2VjcmV0"});
        assert!(public_key(&oct, Algorithm::HS256).is_err());
    }

    #[test]
    fn urls_compare_normalized() {
        let n = |u| normalize_url(u);
        assert_eq!(
            n("HTTPS://Broker.Example:443/v1/tasks/t/leases?x=1#f"),
            n("https://broker.example/v1/tasks/t/leases")
        );
        assert_eq!(n("http://h:80"), n("http://h/"));
        assert_ne!(n("http://h:8080/a"), n("http://h/a"));
        assert_ne!(n("https://h/a"), n("http://h/a"));
        assert_eq!(n("ftp://h/a"), None);
        assert_eq!(n("https://user@h/a"), None);
    }
}
