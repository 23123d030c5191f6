//! The store key and field encryption (DESIGN.md invariant 5).
//!
//! One 256-bit key, from a file or an environment variable, never generated
//! behind the operator's back (only `leasehold dev` creates one, in its own
//! data folder). Each sealed field gets its own AES-256-GCM key, derived with
//! HKDF-SHA256 from the store key, the record id and the field name, so no
//! key encrypts more than a handful of values and random 96-bit nonces stay
//! far from their collision bound however many leases the store sees. The
//! record id and field name are also the associated data: a ciphertext moved
//! to another record or field fails to open.

use std::fmt;
use std::io::Write as _;
use std::path::Path;

use base64::Engine as _;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom as _, SystemRandom};
use zeroize::Zeroizing;

const SEAL_VERSION: u8 = 1;
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the store key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the environment variable {0} holding the store key is not set")]
    MissingEnv(String),
    #[error(
        "the store key must be 32 bytes written as 64 hex characters or base64; got something else"
    )]
    Malformed,
    #[error("cannot write the store key file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("the system random number generator failed")]
    Random,
}

/// The 256-bit store key. Zeroized on drop; `Debug` shows only its
/// fingerprint.
#[derive(Clone)]
pub struct StoreKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey(fingerprint {})", self.fingerprint())
    }
}

impl StoreKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Parse 64 hex characters or standard/URL-safe base64 of 32 bytes.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let t = Zeroizing::new(text.trim().to_owned());
        if let Some(bytes) = crate::hex::decode32(&t) {
            return Ok(Self(Zeroizing::new(bytes)));
        }
        let mut out = Zeroizing::new([0u8; 32]);
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(t.as_bytes())
            .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(t.as_bytes()))
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t.as_bytes()))
            .map(Zeroizing::new)
            .map_err(|_| KeyError::Malformed)?;
        if decoded.len() != 32 {
            return Err(KeyError::Malformed);
        }
        out.copy_from_slice(&decoded);
        Ok(Self(out))
    }

    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path)
            .map(Zeroizing::new)
            .map_err(|source| KeyError::Read {
                path: path.display().to_string(),
                source,
            })?;
        Self::parse(&text)
    }

    pub fn from_env(var: &str) -> Result<Self, KeyError> {
        let v = std::env::var(var)
            .map(Zeroizing::new)
            .map_err(|_| KeyError::MissingEnv(var.to_owned()))?;
        Self::parse(&v)
    }

    pub fn generate() -> Result<Self, KeyError> {
        let mut k = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(&mut k[..])
            .map_err(|_| KeyError::Random)?;
        Ok(Self(k))
    }

    /// Write the key as hex to a new file readable only by its owner.
    pub fn write_new_file(&self, path: &Path) -> Result<(), KeyError> {
        let werr = |source| KeyError::Write {
            path: path.display().to_string(),
            source,
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(werr)?;
        let mut hex = Zeroizing::new(crate::hex::encode(&self.0[..]));
        hex.push('\n');
        f.write_all(hex.as_bytes()).map_err(werr)?;
        f.sync_all().map_err(werr)
    }

    /// The key bytes, for deriving other keys from a key file of this format
    /// (the audit HMAC key). Keep the exposure local.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// A non-secret identifier of the key, for error messages: the first 8
    /// bytes of a domain-separated SHA-256.
    pub fn fingerprint(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"leasehold store key fingerprint v1\0");
        ctx.update(&self.0[..]);
        crate::hex::encode(&ctx.finish().as_ref()[..8])
    }
}

/// Seals and opens sensitive fields.
pub struct Sealer {
    prk: hkdf::Prk,
    rng: SystemRandom,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer([REDACTED])")
    }
}

/// A sealed field could not be opened: wrong key, or tampered ciphertext.
#[derive(Debug, thiserror::Error)]
#[error("sealed field could not be opened (wrong store key or tampered data)")]
pub struct OpenError;

impl Sealer {
    pub fn new(key: &StoreKey) -> Self {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"leasehold store seal v1");
        Self {
            prk: salt.extract(&key.0[..]),
            rng: SystemRandom::new(),
        }
    }

    fn field_key(&self, record: u128, field: &str) -> Result<LessSafeKey, OpenError> {
        let id = record.to_be_bytes();
        let info = [&id[..], field.as_bytes()];
        let okm = self
            .prk
            .expand(&info, &aead::AES_256_GCM)
            .map_err(|_| OpenError)?;
        Ok(LessSafeKey::new(UnboundKey::from(okm)))
    }

    fn aad(record: u128, field: &str) -> Vec<u8> {
        let mut a = record.to_be_bytes().to_vec();
        a.extend_from_slice(field.as_bytes());
        a
    }

    /// `version || nonce || ciphertext || tag`.
    pub fn seal(&self, record: u128, field: &str, plaintext: &[u8]) -> Result<Vec<u8>, OpenError> {
        let key = self.field_key(record, field)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| OpenError)?;
        let mut buf =
            Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + aead::AES_256_GCM.tag_len());
        buf.push(SEAL_VERSION);
        buf.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(Self::aad(record, field)),
            &mut body,
        )
        .map_err(|_| OpenError)?;
        buf.extend_from_slice(&body);
        // the plaintext copy is overwritten by ciphertext in place; nothing to wipe
        Ok(buf)
    }

    /// An HMAC-SHA256 key for `purpose`, derived from the store key (so
    /// every broker sharing a store derives the same one, and nothing else
    /// can): what the broker signs and alone verifies, such as the proxy
    /// credentials bound to a task.
    pub fn mac_key(&self, purpose: &str) -> Result<ring::hmac::Key, OpenError> {
        let info = [b"mac:".as_slice(), purpose.as_bytes()];
        let okm = self
            .prk
            .expand(&info, ring::hmac::HMAC_SHA256)
            .map_err(|_| OpenError)?;
        Ok(ring::hmac::Key::from(okm))
    }

    pub fn open(
        &self,
        record: u128,
        field: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        if sealed.len() < 1 + NONCE_LEN + aead::AES_256_GCM.tag_len() || sealed[0] != SEAL_VERSION {
            return Err(OpenError);
        }
        let key = self.field_key(record, field)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[1..1 + NONCE_LEN]);
        let mut body = Zeroizing::new(sealed[1 + NONCE_LEN..].to_vec());
        let plain_len = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(record, field)),
                &mut body,
            )
            .map_err(|_| OpenError)?
            .len();
        body.truncate(plain_len);
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_binds_record_and_field() {
        let k = StoreKey::generate().unwrap();
        let s = Sealer::new(&k);
        let sealed = s.seal(42, "handle", b"secret handle").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            &s.open(42, "handle", &sealed).unwrap()[..],
            b"secret handle"
        );
        assert!(
            s.open(43, "handle", &sealed).is_err(),
            "moved to another record"
        );
        assert!(
            s.open(42, "prompt", &sealed).is_err(),
            "moved to another field"
        );
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(s.open(42, "handle", &tampered).is_err());
        let other = Sealer::new(&StoreKey::generate().unwrap());
        assert!(other.open(42, "handle", &sealed).is_err(), "wrong key");
        // two seals of the same value differ (random nonce)
        assert_ne!(sealed, s.seal(42, "handle", b"secret handle").unwrap());
    }

    #[test]
    fn key_parsing() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let a = StoreKey::parse(hex).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&a.0[..]);
        let b = StoreKey::parse(&format!("{b64}\n")).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(StoreKey::parse("short").is_err());
        assert!(StoreKey::parse(&hex[..62]).is_err());
        assert!(!format!("{a:?}").contains("0011"));
    }

    #[test]
    fn key_file_is_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("store.key");
        let k = StoreKey::generate().unwrap();
        k.write_new_file(&p).unwrap();
        assert_eq!(
            StoreKey::from_file(&p).unwrap().fingerprint(),
            k.fingerprint()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert!(k.write_new_file(&p).is_err(), "never overwrites a key");
    }
}
