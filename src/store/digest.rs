//! A digest field stored in 33 bytes instead of 65.
//!
//! Calls and approvals keep SHA-256 digests (`arguments_sha256`,
//! `policy_version`) as 64 lowercase hex characters, which postcard writes as
//! a length byte and the 64 characters. Through this module a field that is
//! exactly such a digest is written as a byte string of a marker (0xFF, which
//! never occurs in UTF-8) and the 32 raw bytes; anything else is written as
//! the string it is, byte for byte the encoding of an ordinary `String`. So
//! records written before keep reading unchanged (no record version, no
//! migration), and reading gives back exactly the string that was stored.
//! Human-readable formats (JSON) see the plain string.

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

const MARKER: u8 = 0xFF;

fn raw(s: &str) -> Option<[u8; 32]> {
    let lower_hex = s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    lower_hex.then(|| crate::hex::decode32(s)).flatten()
}

pub fn serialize<S: Serializer>(s: &str, ser: S) -> Result<S::Ok, S::Error> {
    match raw(s) {
        Some(bytes) if !ser.is_human_readable() => {
            let mut out = [0u8; 33];
            out[0] = MARKER;
            out[1..].copy_from_slice(&bytes);
            ser.serialize_bytes(&out)
        }
        _ => ser.serialize_str(s),
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    if de.is_human_readable() {
        de.deserialize_string(Text)
    } else {
        de.deserialize_bytes(Text)
    }
}

struct Text;

impl Visitor<'_> for Text {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a digest or a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<String, E> {
        match v.split_first() {
            Some((&MARKER, digest)) if digest.len() == 32 => Ok(crate::hex::encode(digest)),
            _ => std::str::from_utf8(v)
                .map(str::to_owned)
                .map_err(|_| E::invalid_value(de::Unexpected::Bytes(v), &self)),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Plain {
        a: String,
        b: u8,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Packed {
        #[serde(with = "super")]
        a: String,
        b: u8,
    }

    #[test]
    fn a_digest_takes_33_bytes_and_everything_reads_back_exactly() {
        let digest = crate::hex::encode(&[0xab; 32]);
        for text in [
            digest.clone(),
            digest.to_uppercase(), // not what the broker writes: kept as text
            "v".to_owned(),
            String::new(),
            "é".repeat(32),
            digest[..63].to_owned(),
            format!("{digest}0"),
        ] {
            let packed = postcard::to_allocvec(&Packed {
                a: text.clone(),
                b: 7,
            })
            .unwrap();
            let back: Packed = postcard::from_bytes(&packed).unwrap();
            assert_eq!(back.a, text);
            assert_eq!(back.b, 7);
            // records written before (a plain String field) read the same
            let old = postcard::to_allocvec(&Plain {
                a: text.clone(),
                b: 7,
            })
            .unwrap();
            assert_eq!(postcard::from_bytes::<Packed>(&old).unwrap().a, text);
            if text == digest {
                assert_eq!(packed.len(), 1 + 33 + 1);
                assert_eq!(old.len(), 1 + 64 + 1);
            } else {
                assert_eq!(packed, old, "anything else is stored as a plain string");
            }
            // JSON sees the string
            let json = serde_json::to_string(&Packed {
                a: text.clone(),
                b: 1,
            })
            .unwrap();
            assert_eq!(
                json,
                serde_json::to_string(&Plain {
                    a: text.clone(),
                    b: 1
                })
                .unwrap()
            );
            assert_eq!(serde_json::from_str::<Packed>(&json).unwrap().a, text);
        }
        // a marker without 32 bytes behind it is not a digest, nor text
        let mut bad = postcard::to_allocvec(&Packed { a: digest, b: 7 }).unwrap();
        bad[0] = 20;
        assert!(postcard::from_bytes::<Packed>(&bad).is_err());
    }
}
