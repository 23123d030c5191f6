//! Identifiers: 128 bits, time-ordered, printed with a kind prefix.
//!
//! The top 48 bits are the creation time in milliseconds, the low 80 bits
//! come from the system CSPRNG. Ordering by id is ordering by creation, so
//! the store's primary keys double as a time index, and ids are unguessable.
//! Printed as `<kind>_<26 chars of lowercase Crockford base32>`: only ASCII
//! alphanumerics and `_`, safe inside provider-side names (role names,
//! session names).

use std::fmt;
use std::str::FromStr;

use ring::rand::SecureRandom as _;

use crate::clock::Timestamp;

const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

fn decode_char(c: u8) -> Option<u8> {
    let c = c.to_ascii_lowercase();
    let c = match c {
        b'o' => b'0',
        b'i' | b'l' => b'1',
        other => other,
    };
    ALPHABET
        .iter()
        .position(|&a| a == c)
        .and_then(|p| u8::try_from(p).ok())
}

/// A fresh 128-bit id for `now`.
pub fn generate(now: Timestamp) -> u128 {
    let mut rand = [0u8; 16];
    // SystemRandom reads the OS CSPRNG; it fails only if the OS has none,
    // and then no id is safe: fall back to the time alone would collide, so
    // we mix the address of a stack value and a counter as a last resort.
    if ring::rand::SystemRandom::new()
        .fill(&mut rand[6..])
        .is_err()
    {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        rand[8..].copy_from_slice(&n.to_be_bytes());
    }
    let ms = u128::from(u64::try_from(now.unix_millis()).unwrap_or(0) & 0xFFFF_FFFF_FFFF);
    (ms << 80) | (u128::from_be_bytes(rand) & ((1u128 << 80) - 1))
}

/// The creation time (ms since the epoch) embedded in an id.
pub fn created_millis(id: u128) -> i64 {
    i64::try_from(id >> 80).unwrap_or(i64::MAX)
}

fn encode(v: u128) -> [u8; 26] {
    let mut out = [0u8; 26];
    for (i, slot) in out.iter_mut().enumerate() {
        let shift = 125 - 5 * i as u32;
        let idx = if shift == 125 {
            (v >> 125) & 0x7
        } else {
            (v >> shift) & 0x1f
        };
        *slot = ALPHABET[idx as usize];
    }
    out
}

fn decode(s: &str) -> Option<u128> {
    let b = s.as_bytes();
    if b.len() != 26 {
        return None;
    }
    let first = decode_char(b[0])?;
    if first > 7 {
        return None;
    }
    let mut v = u128::from(first);
    for &c in &b[1..] {
        v = (v << 5) | u128::from(decode_char(c)?);
    }
    Some(v)
}

macro_rules! id_type {
    ($name:ident, $prefix:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u128);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn generate(now: Timestamp) -> Self {
                Self(generate(now))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let enc = encode(self.0);
                f.write_str($prefix)?;
                f.write_str("_")?;
                // the alphabet is ASCII, so this never fails
                f.write_str(std::str::from_utf8(&enc).map_err(|_| fmt::Error)?)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                s.strip_prefix($prefix)
                    .and_then(|r| r.strip_prefix('_'))
                    .and_then(decode)
                    .map(Self)
                    .ok_or(InvalidId { kind: $prefix })
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}

id_type!(TaskId, "task", "The id of a task.");
id_type!(LeaseId, "lease", "The id of a lease.");
id_type!(
    RequestId,
    "req",
    "The id of one HTTP request, for correlating logs and responses."
);
id_type!(CallId, "call", "The id of a decided tool call.");
id_type!(ApprovalId, "appr", "The id of an approval request.");
id_type!(JobId, "job", "The id of a mass revocation job.");

/// A string that is not an id of the expected kind.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("not a valid {kind} id")]
pub struct InvalidId {
    pub kind: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_order() {
        let a = LeaseId::generate(Timestamp::from_unix_millis(1_000));
        let b = LeaseId::generate(Timestamp::from_unix_millis(2_000));
        assert!(a < b);
        let s = a.to_string();
        assert!(s.starts_with("lease_") && s.len() == 32, "{s}");
        assert!(s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'));
        assert_eq!(s.parse::<LeaseId>().unwrap(), a);
        assert_eq!(
            s.to_uppercase()
                .replace("LEASE_", "lease_")
                .parse::<LeaseId>()
                .unwrap(),
            a
        );
        for v in [0u128, u128::MAX, 1 << 127, 12345] {
            assert_eq!(decode(std::str::from_utf8(&encode(v)).unwrap()), Some(v));
        }
    }

    #[test]
    fn rejects_wrong_kind_and_garbage() {
        let t = TaskId::generate(Timestamp::from_unix_millis(5));
        assert!(t.to_string().parse::<LeaseId>().is_err());
        assert!("lease_".parse::<LeaseId>().is_err());
        assert!(
            "lease_zzzzzzzzzzzzzzzzzzzzzzzzzz"
                .parse::<LeaseId>()
                .is_err()
        ); // > 128 bits
        assert!(
            "lease_0000000000000000000000000u"
                .parse::<LeaseId>()
                .is_err()
        );
        assert!("../etc/passwd".parse::<TaskId>().is_err());
    }

    #[test]
    fn ids_are_unique() {
        let now = Timestamp::from_unix_millis(42);
        let set: std::collections::HashSet<u128> = (0..10_000).map(|_| generate(now)).collect();
        assert_eq!(set.len(), 10_000);
    }
}
