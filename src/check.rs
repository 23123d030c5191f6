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

/// A user (the person a task acts for, a fence's or a selector's user) in
/// its one canonical form, so that self-approval, fences, selectors and the
/// event chain compare people as people mean them: trimmed, Unicode NFKC,
/// case-folded (addresses are compared without case in practice, and
/// `Approver@Example.com` is the same person as `approver@example.com`).
/// Refused rather than accepted: invisible characters (zero-width,
/// bidirectional controls, soft hyphen, BOM) and letters mixing the Latin,
/// Greek and Cyrillic scripts (a Cyrillic `а` in a Latin name).
pub fn user(field: &str, value: &str) -> Result<String, Invalid> {
    use unicode_normalization::UnicodeNormalization as _;
    let nfkc = canonical(field, value, 256, "invalid_user")?;
    let folded: String = nfkc.to_lowercase().nfkc().collect();
    if mixed_scripts(&folded) {
        return Err(mixed(field, "invalid_user"));
    }
    Ok(folded)
}

/// A workload's subject or a tenant in its one canonical form: trimmed and
/// NFKC, so fences and selectors match however the name was typed; not
/// case-folded (identity providers' subjects are case-sensitive). Refused:
/// invisible characters and letters mixing Latin, Greek and Cyrillic.
pub fn identifier(field: &str, value: &str) -> Result<String, Invalid> {
    canonical(field, value, 512, "invalid_identifier")
}

/// Text, with no invisible character, trimmed and NFKC, its letters of one
/// of the confusable scripts at most.
fn canonical(field: &str, value: &str, max: usize, code: &'static str) -> Result<String, Invalid> {
    use unicode_normalization::UnicodeNormalization as _;
    text(field, value, max)?;
    if let Some(c) = value.chars().find(|c| invisible(*c)) {
        return Err(invalid(
            code,
            format!(
                "`{field}` contains an invisible character (U+{:04X}); give the name as it is written",
                u32::from(c)
            ),
        ));
    }
    let nfkc: String = value.trim().nfkc().collect();
    if mixed_scripts(&nfkc) {
        return Err(mixed(field, code));
    }
    Ok(nfkc)
}

fn mixed(field: &str, code: &'static str) -> Invalid {
    invalid(
        code,
        format!("`{field}` mixes letters of the Latin, Greek and Cyrillic scripts"),
    )
}

fn mixed_scripts(s: &str) -> bool {
    s.chars()
        .filter_map(script)
        .fold(0u8, |acc, b| acc | b)
        .count_ones()
        > 1
}

/// Characters that change how text looks or reads without being seen.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{17B4}'
            | '\u{17B5}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
    )
}

/// The confusable script a letter belongs to, as a bit: Latin, Greek,
/// Cyrillic; `None` for everything else (digits, punctuation, other
/// scripts, which mix with any of these without being mistaken for them).
fn script(c: char) -> Option<u8> {
    if !c.is_alphabetic() {
        return None;
    }
    match u32::from(c) {
        0x0041..=0x024F | 0x1E00..=0x1EFF => Some(1),
        0x0370..=0x03FF | 0x1F00..=0x1FFF => Some(2),
        0x0400..=0x052F | 0x2DE0..=0x2DFF | 0xA640..=0xA69F => Some(4),
        _ => None,
    }
}

#[cfg(test)]
mod user_tests {
    use super::user;

    #[test]
    fn variants_of_one_person_are_one_user() {
        let one = user("u", "approver@example.com").unwrap();
        for v in [
            "Approver@Example.com",
            "APPROVER@EXAMPLE.COM",
            " approver@example.com ",
            "ａｐｐｒｏｖｅｒ@example.com",
        ] {
            assert_eq!(user("u", v).unwrap(), one, "{v}");
        }
        assert_eq!(user("u", "APPROVER").unwrap(), "approver");
    }

    #[test]
    fn identifiers_are_normalized_but_keep_their_case() {
        use super::identifier;
        assert_eq!(
            identifier("sub", " ｄｅｖ:Assistant-A ").unwrap(),
            "dev:Assistant-A"
        );
        assert_eq!(
            identifier("sub", "system:serviceaccount:ns:sa").unwrap(),
            "system:serviceaccount:ns:sa"
        );
        assert_eq!(
            identifier("sub", "dev:assistant\u{200B}-a")
                .unwrap_err()
                .code,
            "invalid_identifier"
        );
        assert_eq!(
            identifier("sub", "dev:\u{0430}ssistant-a")
                .unwrap_err()
                .code,
            "invalid_identifier"
        );
        assert_eq!(
            identifier("sub", "\u{202E}dev").unwrap_err().code,
            "invalid_identifier"
        );
    }

    #[test]
    fn invisible_and_mixed_script_names_are_refused() {
        for v in [
            "approver\u{200B}@example.com",
            "\u{202E}approver",
            "appro\u{00AD}ver",
            "\u{0430}pprover@example.com",
        ] {
            let e = user("u", v).unwrap_err();
            assert_eq!(e.code, "invalid_user", "{v}");
        }
        // one script, not Latin, is a name like any other
        assert_eq!(user("u", "Иван").unwrap(), "иван");
        assert_eq!(
            user("u", "Zoë O'Brien-Łukasz").unwrap(),
            "zoë o'brien-łukasz"
        );
    }
}
