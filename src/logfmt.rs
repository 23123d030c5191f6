//! Text logs that input cannot forge. The text format prints fields as
//! `name=value`; a value taken from a request (a revocation's reason, a
//! path, a provider's message) could otherwise carry ` by=operator:admin`,
//! a newline or a U+2028 and read as fields or lines of its own. Here every
//! value that is not a plain word is quoted and escaped, and the message
//! has its control and separator characters escaped. JSON logs escape by
//! construction.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// The text format's field formatter (`fmt().fmt_fields(SafeFields)`).
#[derive(Debug, Default, Clone, Copy)]
pub struct SafeFields;

impl<'w> FormatFields<'w> for SafeFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = Visitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct Visitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = if field.name() == "message" {
            self.writer
                .write_str(sep)
                .and_then(|()| escape_into(&mut self.writer, value))
        } else {
            write!(self.writer, "{sep}{}=", field.name())
                .and_then(|()| value_into(&mut self.writer, value))
        };
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.write(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

/// A character that must not reach a text log as itself: controls, line
/// and paragraph separators, and the invisible ones that reorder or hide
/// text (bidirectional controls, zero-width characters, the BOM).
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

fn needs_quotes(s: &str) -> bool {
    s.is_empty()
        || s.chars()
            .any(|c| c.is_whitespace() || matches!(c, '=' | '"' | '\\') || unsafe_char(c))
}

fn escape_into(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    for c in s.chars() {
        if unsafe_char(c) {
            write!(w, "\\u{{{:04x}}}", u32::from(c))?;
        } else {
            w.write_char(c)?;
        }
    }
    Ok(())
}

fn value_into(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    if !needs_quotes(s) {
        return w.write_str(s);
    }
    w.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => w.write_str("\\\"")?,
            '\\' => w.write_str("\\\\")?,
            c if unsafe_char(c) || (c.is_whitespace() && c != ' ') => {
                write!(w, "\\u{{{:04x}}}", u32::from(c))?;
            }
            c => w.write_char(c)?,
        }
    }
    w.write_char('"')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(s: &str) -> String {
        let mut out = String::new();
        value_into(&mut out, s).unwrap();
        out
    }

    #[test]
    fn values_that_could_pass_for_fields_or_lines_are_quoted_and_escaped() {
        assert_eq!(value("job_1"), "job_1");
        assert_eq!(
            value("x by=operator:admin fence=true job_id=job_FORGED"),
            "\"x by=operator:admin fence=true job_id=job_FORGED\""
        );
        assert_eq!(value("a\u{2028}b"), "\"a\\u{2028}b\"");
        assert_eq!(value("line\nforged=1"), "\"line\\u{000a}forged=1\"");
        assert_eq!(value("say \"hi\" \\"), "\"say \\\"hi\\\" \\\\\"");
        assert_eq!(value("\u{202E}evil"), "\"\\u{202e}evil\"");
        assert_eq!(value(""), "\"\"");
        let mut msg = String::new();
        escape_into(&mut msg, "two\nlines\u{2029}").unwrap();
        assert_eq!(msg, "two\\u{000a}lines\\u{2029}");
    }
}
