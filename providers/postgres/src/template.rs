//! SQL templates with `{{placeholder}}`s, expanded in one pass: each value
//! is quoted by the driver's escaping functions (`escape_identifier`,
//! `escape_literal`) and never re-scanned, so a value cannot inject text or
//! another placeholder.

use postgres_protocol::escape::{escape_identifier, escape_literal};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    Name,
    Password,
    Expiration,
    Scope,
}

impl Placeholder {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Name => "name",
            Self::Password => "password",
            Self::Expiration => "expiration",
            Self::Scope => "scope",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Name, Self::Password, Self::Expiration, Self::Scope]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Text(String),
    Slot(Placeholder),
}

/// A parsed statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Segment>);

/// The values for one expansion. `password` is the SCRAM verifier.
#[derive(Debug, Clone, Copy, Default)]
pub struct Values<'a> {
    pub name: &'a str,
    pub password: &'a str,
    pub expiration: &'a str,
    pub scope: Option<&'a str>,
}

impl Template {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Err("an empty statement".into());
        }
        let mut out = Vec::new();
        let mut rest = s;
        while let Some(start) = rest.find("{{") {
            let Some(len) = rest[start + 2..].find("}}") else {
                return Err("`{{` without a closing `}}`".into());
            };
            let key = rest[start + 2..start + 2 + len].trim();
            let slot = Placeholder::parse(key).ok_or_else(|| {
                format!("unknown placeholder {{{{{key}}}}}; known: {{{{name}}}}, {{{{password}}}}, {{{{expiration}}}}, {{{{scope}}}}")
            })?;
            if start > 0 {
                out.push(Segment::Text(rest[..start].to_owned()));
            }
            out.push(Segment::Slot(slot));
            rest = &rest[start + 2 + len + 2..];
        }
        if !rest.is_empty() {
            out.push(Segment::Text(rest.to_owned()));
        }
        Ok(Self(out))
    }

    pub fn uses(&self, p: Placeholder) -> bool {
        self.0.contains(&Segment::Slot(p))
    }

    /// The statement with every placeholder replaced by its quoted value.
    pub fn expand(&self, v: &Values<'_>) -> String {
        let mut out = String::new();
        for seg in &self.0 {
            match seg {
                Segment::Text(t) => out.push_str(t),
                Segment::Slot(Placeholder::Name) => out.push_str(&escape_identifier(v.name)),
                Segment::Slot(Placeholder::Password) => out.push_str(&escape_literal(v.password)),
                Segment::Slot(Placeholder::Expiration) => {
                    out.push_str(&escape_literal(v.expiration))
                }
                Segment::Slot(Placeholder::Scope) => {
                    out.push_str(&qualified(v.scope.unwrap_or_default()))
                }
            }
        }
        out
    }
}

/// `schema` or `schema.table`, each part a quoted identifier.
pub fn qualified(name: &str) -> String {
    name.split('.')
        .map(escape_identifier)
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_quoted_once_and_never_rescanned() {
        let t = Template::parse("GRANT SELECT ON ALL TABLES IN SCHEMA {{scope}} TO {{ name }}")
            .unwrap();
        let v = Values {
            name: "a\"b {{password}}",
            password: "p'w",
            expiration: "x",
            scope: Some("we ird.t\"x"),
        };
        assert_eq!(
            t.expand(&v),
            r#"GRANT SELECT ON ALL TABLES IN SCHEMA "we ird"."t""x" TO "a""b {{password}}""#
        );
        let t =
            Template::parse("ALTER ROLE {{name}} PASSWORD {{password}} VALID UNTIL {{expiration}}")
                .unwrap();
        assert_eq!(
            t.expand(&Values {
                name: "r",
                password: "it's",
                expiration: "2026-01-01T00:00:00Z",
                scope: None
            }),
            r#"ALTER ROLE "r" PASSWORD 'it''s' VALID UNTIL '2026-01-01T00:00:00Z'"#
        );
        // backslashes force the E'' form, which PostgreSQL reads literally
        assert_eq!(escape_literal("a\\b"), r" E'a\\b'");
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        assert!(
            Template::parse("GRANT x TO {{nme}}")
                .unwrap_err()
                .contains("unknown placeholder {{nme}}")
        );
        assert!(
            Template::parse("GRANT x TO {{name")
                .unwrap_err()
                .contains("without a closing")
        );
        assert!(Template::parse("  ").is_err());
        let t = Template::parse("SELECT 1").unwrap();
        assert!(!t.uses(Placeholder::Name));
        assert_eq!(t.expand(&Values::default()), "SELECT 1");
    }
}
