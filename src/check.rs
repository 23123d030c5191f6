//! Input checks shared by every domain service: free text, TTLs, tool
//! names. One home, so a field is checked the same way wherever it
//! arrives. Each failure carries the stable code the API answers with.

use std::time::Duration;

/// Bad input: the stable code and a message naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    pub code: &'static str,
    pub message: String,
}

fn invalid(code: &'static str, message: String) -> Invalid {
    Invalid { code, message }
}

/// Free text: present, at most `max` bytes, no control characters.
pub fn text(field: &str, value: &str, max: usize) -> Result<(), Invalid> {
    if value.trim().is_empty() {
        return Err(invalid(
            "invalid_request",
            format!("`{field}` must not be empty"),
        ));
    }
    if value.len() > max {
        return Err(invalid(
            "invalid_request",
            format!("`{field}` is longer than {max} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(
            "invalid_request",
            format!("`{field}` contains control characters"),
        ));
    }
    Ok(())
}

/// A TTL in whole seconds: positive and at most `max`.
pub fn ttl(field: &str, ttl: i64, max: u64) -> Result<Duration, Invalid> {
    match u64::try_from(ttl) {
        Ok(t) if t > 0 && t <= max => Ok(Duration::from_secs(t)),
        _ => Err(invalid(
            "invalid_ttl",
            format!("`{field}` must be a whole number of seconds between 1 and {max}; got {ttl}"),
        )),
    }
}

/// A tool name as tasks declare it and calls name it: 1-128 of
/// `[A-Za-z0-9._\-:/]`.
pub fn is_tool_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_name_the_field_and_the_code() {
        for (value, want) in [
            ("", "`f` must not be empty"),
            ("  ", "`f` must not be empty"),
            ("abcdef", "`f` is longer than 5 bytes"),
            ("a\u{7}", "`f` contains control characters"),
        ] {
            let e = text("f", value, 5).unwrap_err();
            assert_eq!(
                (e.code, e.message.as_str()),
                ("invalid_request", want),
                "{value:?}"
            );
        }
        assert!(text("f", "ok", 5).is_ok());
        assert_eq!(ttl("t", 60, 60), Ok(Duration::from_secs(60)));
        for bad in [0, -1, 61] {
            assert_eq!(ttl("t", bad, 60).unwrap_err().code, "invalid_ttl");
        }
        assert!(is_tool_name("db.read:prod/x-1"));
        assert!(!is_tool_name("") && !is_tool_name("a b") && !is_tool_name(&"a".repeat(129)));
    }
}
