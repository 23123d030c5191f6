//! Signed checkpoints: the head of the chain (sequence, hash, time) signed
//! with an Ed25519 key configured apart from the store key. Whoever can
//! rewrite the store cannot forge a checkpoint, so a chain rewritten from
//! some event onwards no longer matches the checkpoints after it.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _};
use serde_json::{Value, json};

use super::{canonical, sha256};

/// The signing key (PKCS#8 Ed25519).
pub struct CheckpointKey {
    key: Ed25519KeyPair,
    key_id: String,
}

impl std::fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// A short id for a public key: the first 8 bytes of its SHA-256, hex.
pub fn key_id(public: &[u8]) -> String {
    crate::hex::encode(&sha256(public)[..8])
}

impl CheckpointKey {
    pub fn from_pkcs8(doc: &[u8]) -> Result<Self, String> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(doc).map_err(|_| {
            "not an Ed25519 PKCS#8 key (make one with `leasehold keygen checkpoint`)".to_owned()
        })?;
        let key_id = key_id(key.public_key().as_ref());
        Ok(Self { key, key_id })
    }

    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    /// The public key as printed for operators (base64url, no padding).
    pub fn public_key_text(&self) -> String {
        B64.encode(self.public_key())
    }

    pub fn sign(&self, seq: u64, hash: [u8; 32], time: String) -> Checkpoint {
        let mut cp = Checkpoint {
            seq,
            hash,
            time,
            key_id: self.key_id.clone(),
            signature: Vec::new(),
        };
        cp.signature = self.key.sign(&cp.message()).as_ref().to_vec();
        cp
    }
}

/// Read a trusted public key: the PKCS#8 private key file itself, or the
/// base64url public key `leasehold keygen checkpoint` prints.
pub fn load_public_key(bytes: &[u8]) -> Result<Vec<u8>, String> {
    if let Ok(k) = CheckpointKey::from_pkcs8(bytes) {
        return Ok(k.public_key().to_vec());
    }
    let text = String::from_utf8_lossy(bytes);
    let raw = B64.decode(text.trim().trim_end_matches('=')).map_err(|_| {
        "not a checkpoint key: expected a PKCS#8 key file or a base64url public key".to_owned()
    })?;
    if raw.len() != 32 {
        return Err("an Ed25519 public key is 32 bytes".into());
    }
    Ok(raw)
}

/// One signed head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: [u8; 32],
    pub time: String,
    pub key_id: String,
    pub signature: Vec<u8>,
}

impl Checkpoint {
    /// What is signed: a canonical object naming its own type, so the
    /// signature cannot be replayed as anything else.
    pub fn message(&self) -> Vec<u8> {
        let v = json!({
            "hash": crate::hex::encode(&self.hash),
            "key_id": self.key_id,
            "seq": self.seq,
            "time": self.time,
            "type": "leasehold.checkpoint.v1",
        });
        let mut out = Vec::new();
        // a fixed shape of strings and an integer: always canonical
        let _ = canonical(&v, &mut out);
        out
    }

    pub fn to_value(&self) -> Value {
        json!({
            "seq": self.seq,
            "hash": crate::hex::encode(&self.hash),
            "time": self.time,
            "key_id": self.key_id,
            "signature": B64.encode(&self.signature),
        })
    }

    pub fn from_value(v: &Value) -> Result<Self, String> {
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("checkpoint without `{k}`"))
        };
        Ok(Self {
            seq: v
                .get("seq")
                .and_then(Value::as_u64)
                .ok_or("checkpoint without `seq`")?,
            hash: crate::hex::decode32(s("hash")?)
                .ok_or("checkpoint hash is not 32 bytes of hex")?,
            time: s("time")?.to_owned(),
            key_id: s("key_id")?.to_owned(),
            signature: B64
                .decode(s("signature")?)
                .map_err(|_| "checkpoint signature is not base64url")?,
        })
    }

    /// Is this checkpoint signed by `public`?
    pub fn verify(&self, public: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, public)
            .verify(&self.message(), &self.signature)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CheckpointKey {
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        CheckpointKey::from_pkcs8(doc.as_ref()).unwrap()
    }

    #[test]
    fn sign_verify_and_forgery() {
        let k = key();
        let cp = k.sign(42, [7; 32], "2026-11-28T10:00:00Z".into());
        assert!(cp.verify(k.public_key()));
        let back = Checkpoint::from_value(&cp.to_value()).unwrap();
        assert_eq!(back, cp);
        let mut moved = cp.clone();
        moved.seq = 43;
        assert!(
            !moved.verify(k.public_key()),
            "a signature does not move to another head"
        );
        let other = key();
        assert!(!cp.verify(other.public_key()));
        assert_eq!(
            load_public_key(k.public_key_text().as_bytes()).unwrap(),
            k.public_key()
        );
        assert!(load_public_key(b"nonsense").is_err());
    }
}
