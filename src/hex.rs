//! Lowercase hex, for digests and fingerprints on the wire and in config.

/// Lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Exactly 64 hex digits (either case, surrounding whitespace ignored) as 32
/// bytes, e.g. a SHA-256.
pub fn decode32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim().as_bytes();
    if s.len() != 64 {
        return None;
    }
    let digit = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip_and_rejects() {
        let bytes: Vec<u8> = (0..32).map(|i| i * 7).collect();
        let h = super::encode(&bytes);
        assert_eq!(super::decode32(&h).unwrap().to_vec(), bytes);
        assert_eq!(super::decode32(&h.to_uppercase()).unwrap().to_vec(), bytes);
        assert!(super::decode32(&h[..62]).is_none());
        assert!(super::decode32(&"+f".repeat(32)).is_none(), "no signs");
        assert!(super::decode32(&"zz".repeat(32)).is_none());
    }
}
