//! Policy documents, pure: the session policy a lease's `AssumeRole` carries,
//! and the role's inline deny policy that revocation edits. No AWS calls
//! here, so everything moto cannot judge is unit-tested.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::config::SCOPE_PLACEHOLDER;

/// AWS's limit on a session policy's plaintext (`Policy` of AssumeRole).
pub const SESSION_POLICY_MAX_CHARS: usize = 2048;

/// The actions a leased session may never call unless the role allows
/// chaining: assuming another role is the root of many escalations.
pub const CHAINING_ACTIONS: &str = "sts:AssumeRole*";

const REVOKED_SID: &str = "LeaseholdRevokedUntil";
const CUTOFF_SID: &str = "LeaseholdIssuedBeforeUntil";

/// Replace `{{scope}}` in every string of `template` with `scope` (values,
/// not text: a scope cannot break out of its JSON string).
fn substitute(v: &Value, scope: Option<&str>) -> Value {
    match v {
        Value::String(s) => match scope {
            Some(sc) => Value::String(s.replace(SCOPE_PLACEHOLDER, sc)),
            None => Value::String(s.clone()),
        },
        Value::Array(a) => Value::Array(a.iter().map(|x| substitute(x, scope)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (k.clone(), substitute(x, scope)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The session policy for one lease: the template narrowed by `scope`,
/// plus (unless the role allows chaining) a statement denying
/// `sts:AssumeRole*`. Minified; an error if it exceeds AWS's limit.
pub fn session_policy(
    template: &Value,
    scope: Option<&str>,
    allow_chaining: bool,
) -> Result<String, String> {
    let mut doc = substitute(template, scope);
    let statements = doc
        .get_mut("Statement")
        .and_then(Value::as_array_mut)
        .ok_or("the session policy template has no Statement list")?;
    if !allow_chaining {
        statements.push(json!({
            "Sid": "LeaseholdNoRoleChaining",
            "Effect": "Deny",
            "Action": CHAINING_ACTIONS,
            "Resource": "*",
        }));
    }
    let text = serde_json::to_string(&doc).map_err(|e| e.to_string())?;
    if text.len() > SESSION_POLICY_MAX_CHARS {
        return Err(format!(
            "the session policy would be {} characters; AWS allows {SESSION_POLICY_MAX_CHARS}",
            text.len()
        ));
    }
    Ok(text)
}

/// Check a session policy template at config time: a JSON object with
/// `Version` and a non-empty `Statement` list whose entries have an
/// `Effect` of Allow or Deny, and `{{scope}}` (if anywhere) only inside
/// strings.
pub fn check_template(v: &Value) -> Result<(), String> {
    let obj = v.as_object().ok_or("must be a JSON object")?;
    match obj.get("Version").and_then(Value::as_str) {
        Some("2012-10-17") => {}
        _ => return Err("needs \"Version\": \"2012-10-17\"".into()),
    }
    let st = obj
        .get("Statement")
        .and_then(Value::as_array)
        .filter(|s| !s.is_empty())
        .ok_or("needs a non-empty \"Statement\" list")?;
    for (i, s) in st.iter().enumerate() {
        match s.get("Effect").and_then(Value::as_str) {
            Some("Allow" | "Deny") => {}
            _ => {
                return Err(format!(
                    "Statement[{i}] needs \"Effect\": \"Allow\" or \"Deny\""
                ));
            }
        }
        if s.get("Action").is_none() && s.get("NotAction").is_none() {
            return Err(format!("Statement[{i}] has no Action"));
        }
    }
    if !st
        .iter()
        .any(|s| s.get("Effect").and_then(Value::as_str) == Some("Allow"))
    {
        // a session policy is intersected with the role's: without an
        // Allow the session could do nothing at all
        return Err("grants nothing: a session policy needs at least one Allow statement".into());
    }
    Ok(())
}

/// The template used when a role has none: everything the role allows.
pub fn allow_all() -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [{ "Sid": "LeaseholdRole", "Effect": "Allow", "Action": "*", "Resource": "*" }],
    })
}

/// The role's inline deny policy, as leasehold keeps it: revoked session
/// identities grouped by when their sessions end anyway, and at most one
/// cut-off on issue time (the fallback when the list no longer fits).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DenyDoc {
    /// Session end (unix seconds, rounded up) -> SourceIdentity values.
    pub revoked: BTreeMap<i64, BTreeSet<String>>,
    /// Sessions issued before `.0` (RFC 3339) are denied until `.1`.
    pub cutoff: Option<(String, i64)>,
}

/// How one revocation was recorded at the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The session's SourceIdentity is in the deny list.
    SourceIdentity,
    /// The list was full: every session of the role issued before now is
    /// denied (other live sessions of the role included).
    IssueTimeCutoff,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SourceIdentity => "deny on aws:SourceIdentity",
            Self::IssueTimeCutoff => "deny on aws:TokenIssueTime (cut-off for the whole role)",
        }
    }
}

/// Round a session end up to the next quarter hour: fewer statements.
pub fn bucket(end: i64) -> i64 {
    const Q: i64 = 900;
    end.div_euclid(Q) * Q + if end.rem_euclid(Q) == 0 { 0 } else { Q }
}

impl DenyDoc {
    /// Read the policy leasehold wrote. Statements it did not write are an
    /// error: the policy name is leasehold's alone.
    pub fn parse(text: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let mut doc = Self::default();
        let statements = v
            .get("Statement")
            .and_then(Value::as_array)
            .ok_or("no Statement list")?;
        for s in statements {
            let sid = s.get("Sid").and_then(Value::as_str).unwrap_or_default();
            if let Some(t) = sid.strip_prefix(REVOKED_SID) {
                let until: i64 = t.parse().map_err(|_| format!("bad Sid `{sid}`"))?;
                let ids = s
                    .pointer("/Condition/StringEquals/aws:SourceIdentity")
                    .and_then(Value::as_array)
                    .ok_or_else(|| format!("`{sid}` has no SourceIdentity list"))?;
                let set = doc.revoked.entry(until).or_default();
                for id in ids {
                    set.insert(id.as_str().ok_or("a non-string identity")?.to_owned());
                }
            } else if let Some(t) = sid.strip_prefix(CUTOFF_SID) {
                let until: i64 = t.parse().map_err(|_| format!("bad Sid `{sid}`"))?;
                let at = s
                    .pointer("/Condition/DateLessThan/aws:TokenIssueTime")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("`{sid}` has no TokenIssueTime"))?;
                doc.cutoff = Some((at.to_owned(), until));
            } else {
                return Err(format!(
                    "statement `{sid}` was not written by leasehold; the deny policy must be leasehold's alone"
                ));
            }
        }
        Ok(doc)
    }

    /// The policy text, minified; `None` when there is nothing to deny.
    pub fn render(&self) -> Option<String> {
        let mut st = Vec::new();
        if let Some((at, until)) = &self.cutoff {
            st.push(json!({
                "Sid": format!("{CUTOFF_SID}{until}"),
                "Effect": "Deny", "Action": "*", "Resource": "*",
                "Condition": { "DateLessThan": { "aws:TokenIssueTime": at } },
            }));
        }
        for (until, ids) in &self.revoked {
            if ids.is_empty() {
                continue;
            }
            st.push(json!({
                "Sid": format!("{REVOKED_SID}{until}"),
                "Effect": "Deny", "Action": "*", "Resource": "*",
                "Condition": { "StringEquals": { "aws:SourceIdentity": ids } },
            }));
        }
        if st.is_empty() {
            return None;
        }
        serde_json::to_string(&json!({ "Version": "2012-10-17", "Statement": st })).ok()
    }

    /// Does the policy deny a session with this identity issued at
    /// `issued` (RFC 3339, same format as the cut-off)?
    pub fn denies(&self, identity: &str, issued: &str) -> bool {
        self.revoked.values().any(|s| s.contains(identity))
            || self
                .cutoff
                .as_ref()
                .is_some_and(|(at, _)| issued < at.as_str())
    }

    /// Forget what has expired by `now` (unix seconds).
    pub fn prune(&mut self, now: i64) {
        self.revoked.retain(|until, _| *until > now);
        if self.cutoff.as_ref().is_some_and(|(_, until)| *until <= now) {
            self.cutoff = None;
        }
    }

    /// Add revocations; if the result would exceed `max_chars`, fall back
    /// to a cut-off at `now_rfc3339` lasting until `cutoff_until` (every
    /// listed identity was issued before now, so the cut-off covers them and
    /// the list is emptied). Returns the method used.
    pub fn add(
        &mut self,
        entries: &[(String, i64)],
        max_chars: usize,
        now_rfc3339: &str,
        cutoff_until: i64,
    ) -> Method {
        let mut next = self.clone();
        for (id, end) in entries {
            next.revoked
                .entry(bucket(*end))
                .or_default()
                .insert(id.clone());
        }
        if next.render().is_none_or(|t| t.len() <= max_chars) {
            *self = next;
            return Method::SourceIdentity;
        }
        let until = self
            .cutoff
            .as_ref()
            .map_or(cutoff_until, |(_, u)| (*u).max(cutoff_until));
        self.revoked.clear();
        self.cutoff = Some((now_rfc3339.to_owned(), until));
        Method::IssueTimeCutoff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Value {
        json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": "arn:aws:s3:::reports/{{scope}}/*",
            }],
        })
    }

    /// (scope, allow chaining, must contain, must not contain)
    type Case<'a> = (Option<&'a str>, bool, &'a [&'a str], &'a [&'a str]);

    #[test]
    fn session_policies_narrow_by_scope_and_deny_chaining() {
        let cases: &[Case] = &[
            (
                Some("2026"),
                false,
                &[
                    "arn:aws:s3:::reports/2026/*",
                    "sts:AssumeRole*",
                    "LeaseholdNoRoleChaining",
                ],
                &["{{scope}}"],
            ),
            (
                Some("q3"),
                true,
                &["reports/q3/*"],
                &["sts:AssumeRole", "{{scope}}"],
            ),
            // a scope with JSON metacharacters stays inside its string
            (Some("a\"b"), false, &[r#"reports/a\"b/*"#], &["{{scope}}"]),
        ];
        for (scope, chain, has, hasnt) in cases {
            let p = session_policy(&template(), *scope, *chain).unwrap();
            let v: Value = serde_json::from_str(&p).unwrap();
            assert_eq!(v["Version"], "2012-10-17");
            for h in *has {
                assert!(p.contains(h), "{scope:?}/{chain}: missing {h} in {p}");
            }
            for h in *hasnt {
                assert!(!p.contains(h), "{scope:?}/{chain}: {h} in {p}");
            }
            assert!(!p.contains('\n'), "minified");
        }
    }

    #[test]
    fn the_default_template_keeps_the_role_usable() {
        let p = session_policy(&allow_all(), None, false).unwrap();
        let v: Value = serde_json::from_str(&p).unwrap();
        let effects: Vec<&str> = v["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["Effect"].as_str().unwrap())
            .collect();
        assert_eq!(effects, ["Allow", "Deny"], "{p}");
        check_template(&allow_all()).unwrap();
    }

    #[test]
    fn oversized_policies_are_refused() {
        let big = "x".repeat(1900);
        let e = session_policy(&template(), Some(&big), false).unwrap_err();
        assert!(e.contains("2048"), "{e}");
        // exactly at the limit passes, one more fails
        let base = session_policy(&template(), Some(""), false).unwrap().len();
        let fit = "y".repeat(SESSION_POLICY_MAX_CHARS - base);
        assert_eq!(
            session_policy(&template(), Some(&fit), false)
                .unwrap()
                .len(),
            SESSION_POLICY_MAX_CHARS
        );
        let over = format!("{fit}y");
        assert!(session_policy(&template(), Some(&over), false).is_err());
    }

    #[test]
    fn templates_are_checked() {
        let bad = [
            (json!([]), "object"),
            (json!({"Statement": []}), "Version"),
            (
                json!({"Version": "2012-10-17", "Statement": []}),
                "non-empty",
            ),
            (
                json!({"Version": "2012-10-17", "Statement": [{"Effect": "Maybe", "Action": "*"}]}),
                "Effect",
            ),
            (
                json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow"}]}),
                "Action",
            ),
            (
                json!({"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Action": "*"}]}),
                "grants nothing",
            ),
        ];
        for (t, word) in bad {
            let e = check_template(&t).unwrap_err();
            assert!(e.contains(word), "{t}: {e}");
        }
        check_template(&template()).unwrap();
    }

    #[test]
    fn buckets_round_up_to_the_quarter_hour() {
        assert_eq!(bucket(900), 900);
        assert_eq!(bucket(901), 1800);
        assert_eq!(bucket(1799), 1800);
        assert_eq!(bucket(0), 0);
    }

    #[test]
    fn the_deny_doc_round_trips_and_prunes() {
        let mut d = DenyDoc::default();
        assert_eq!(d.render(), None);
        let m = d.add(
            &[("lease_a".into(), 1000), ("lease_b".into(), 2000)],
            10_240,
            "2026-01-01T00:00:00Z",
            50_000,
        );
        assert_eq!(m, Method::SourceIdentity);
        let text = d.render().unwrap();
        let back = DenyDoc::parse(&text).unwrap();
        assert_eq!(back, d);
        assert!(back.denies("lease_a", "2026-01-01T00:00:00Z"));
        assert!(!back.denies("lease_c", "2026-01-01T00:00:00Z"));
        d.prune(1800);
        assert!(!d.denies("lease_a", "x"), "expired entries are dropped");
        assert!(d.denies("lease_b", "x"));
        d.prune(2700);
        assert_eq!(d.render(), None);
    }

    #[test]
    fn a_full_list_falls_back_to_an_issue_time_cutoff() {
        let mut d = DenyDoc::default();
        let many: Vec<(String, i64)> = (0..20).map(|i| (format!("lease_{i:026}"), 5000)).collect();
        assert_eq!(
            d.add(&many, 2_000, "2026-01-01T00:00:00Z", 50_000),
            Method::SourceIdentity
        );
        let more: Vec<(String, i64)> = (20..80).map(|i| (format!("lease_{i:026}"), 5000)).collect();
        let m = d.add(&more, 2_000, "2026-01-01T01:00:00Z", 50_000);
        assert_eq!(m, Method::IssueTimeCutoff);
        assert!(d.revoked.is_empty());
        let text = d.render().unwrap();
        assert!(text.len() <= 2_000);
        let back = DenyDoc::parse(&text).unwrap();
        // every session issued before the cut-off is denied, later ones are not
        assert!(back.denies("lease_00000000000000000000000005", "2026-01-01T00:59:59Z"));
        assert!(!back.denies("lease_new", "2026-01-01T01:00:01Z"));
        // new revocations after the fallback go to the list again
        assert_eq!(
            d.add(
                &[("lease_new".into(), 9000)],
                2_000,
                "2026-01-01T02:00:00Z",
                60_000
            ),
            Method::SourceIdentity
        );
        assert!(d.denies("lease_new", "2026-01-01T01:30:00Z"));
        // the cut-off lasts until the longest session it covers could end
        d.prune(50_001);
        assert!(d.cutoff.is_none());
    }

    #[test]
    fn foreign_statements_are_refused() {
        let text = r#"{"Version":"2012-10-17","Statement":[{"Sid":"Other","Effect":"Deny","Action":"*","Resource":"*"}]}"#;
        assert!(
            DenyDoc::parse(text)
                .unwrap_err()
                .contains("not written by leasehold")
        );
    }
}
