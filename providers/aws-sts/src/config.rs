//! The provider's configuration (`[providers.NAME]` with `type = "aws-sts"`)
//! and its offline checks. moto accepts almost anything, so everything AWS
//! would refuse is refused here first.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use leasehold_provider::ConfigError;

/// The placeholder a session policy template may carry for the call's scope.
pub const SCOPE_PLACEHOLDER: &str = "{{scope}}";
/// AWS's bounds on `DurationSeconds`.
pub const MIN_SESSION_SECONDS: u64 = 900;
pub const MAX_SESSION_SECONDS: u64 = 43_200;
/// An IAM role's inline policies may total 10,240 characters.
pub const ROLE_INLINE_POLICY_MAX: usize = 10_240;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsStsConfig {
    pub region: String,
    /// One endpoint for STS and IAM (a private endpoint, or a test server);
    /// `http://` only to a loopback address. Default: AWS's.
    pub endpoint_url: Option<String>,
    /// A shared credentials file (the `~/.aws/credentials` format) to read
    /// the broker's credentials from, e.g. one a secrets mount provides.
    /// Default: the standard chain (environment, profile, web identity,
    /// instance metadata).
    pub credentials_file: Option<std::path::PathBuf>,
    /// The profile in `credentials_file` (or of the standard chain).
    pub profile: Option<String>,
    /// The inline policy leasehold keeps on each role to deny revoked
    /// sessions. It is leasehold's alone: other statements in it are an error.
    #[serde(default = "defaults::deny_policy_name")]
    pub deny_policy_name: String,
    /// Characters the deny policy may use before revocation falls back to
    /// an issue-time cut-off for the whole role. IAM allows 10,240 for all
    /// of a role's inline policies together: leave room for the others.
    #[serde(default = "defaults::deny_policy_max_chars")]
    pub deny_policy_max_chars: usize,
    /// Attempts per AWS call (throttling and transient errors are retried
    /// with exponential backoff), then the broker answers 503 or requeues.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    pub roles: BTreeMap<String, AwsRole>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsRole {
    /// `arn:aws:iam::<account>:role/<path/>name`.
    pub role_arn: String,
    /// The role's `MaxSessionDuration` or less (900-43,200).
    pub max_ttl_seconds: u64,
    /// A session policy template (JSON). Strings may contain `{{scope}}`,
    /// replaced by the call's one scope. Default: allow everything the role
    /// allows.
    pub session_policy: Option<String>,
    /// The scopes a call may ask for. An entry ending in `*` allows any
    /// scope with that prefix (e.g. `reports/*`).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Let leased sessions assume other roles. Off: every session policy
    /// denies `sts:AssumeRole*`.
    #[serde(default)]
    pub allow_role_chaining: bool,
    pub external_id: Option<String>,
    #[serde(default)]
    pub description: String,
}

pub(crate) mod defaults {
    pub fn deny_policy_name() -> String {
        "leasehold-revoked-sessions".into()
    }
    pub fn deny_policy_max_chars() -> usize {
        6_144
    }
    pub fn max_attempts() -> u32 {
        4
    }
}

/// The name part of a role ARN, checked.
pub fn role_name(arn: &str) -> Result<&str, String> {
    let rest = arn.strip_prefix("arn:").ok_or("must start with arn:")?;
    let parts: Vec<&str> = rest.splitn(5, ':').collect();
    match parts.as_slice() {
        [partition, "iam", "", account, resource]
            if !partition.is_empty()
                && account.len() == 12
                && account.bytes().all(|b| b.is_ascii_digit()) =>
        {
            let path = resource
                .strip_prefix("role/")
                .ok_or("the resource must be role/<name>")?;
            let name = path.rsplit('/').next().unwrap_or_default();
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
            {
                return Err(format!("`{name}` is not an IAM role name"));
            }
            Ok(name)
        }
        _ => Err("must be arn:<partition>:iam::<12-digit account>:role/<name>".into()),
    }
}

/// Characters IAM allows in policy names and STS in session names.
pub fn is_iam_word(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
}

/// A scope value: narrows a resource, so no IAM wildcard and no JSON or
/// ARN structure beyond path characters.
pub fn is_scope_value(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@+".contains(c))
        && !s.split('/').any(|seg| seg == "..")
}

impl AwsStsConfig {
    pub fn validate(&self, max_ttl: u64) -> Result<(), ConfigError> {
        if self.region.is_empty()
            || !self
                .region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(ConfigError::new("region", "e.g. us-east-1"));
        }
        if let Some(u) = &self.endpoint_url {
            let (scheme, rest) = u
                .split_once("://")
                .ok_or_else(|| ConfigError::new("endpoint_url", "must start with https://"))?;
            let host = rest.split(['/', ':']).next().unwrap_or_default();
            match scheme {
                "https" => {}
                "http" if leasehold_provider::is_loopback_host(host) => {}
                _ => {
                    return Err(ConfigError::new(
                        "endpoint_url",
                        "must be https:// (http:// only to a loopback address)",
                    ));
                }
            }
        }
        if self.deny_policy_name.is_empty()
            || self.deny_policy_name.len() > 128
            || !is_iam_word(&self.deny_policy_name)
        {
            return Err(ConfigError::new(
                "deny_policy_name",
                "1-128 of [A-Za-z0-9+=,.@_-]",
            ));
        }
        if !(1_024..=ROLE_INLINE_POLICY_MAX).contains(&self.deny_policy_max_chars) {
            return Err(ConfigError::new(
                "deny_policy_max_chars",
                format!("must be 1024-{ROLE_INLINE_POLICY_MAX}"),
            ));
        }
        if !(1..=10).contains(&self.max_attempts) {
            return Err(ConfigError::new("max_attempts", "must be 1-10"));
        }
        if self.roles.is_empty() {
            return Err(ConfigError::new("roles", "at least one role is required"));
        }
        for (name, r) in &self.roles {
            let f = |k: &str| format!("roles.{name}.{k}");
            role_name(&r.role_arn).map_err(|m| ConfigError::new(f("role_arn"), m))?;
            if !(MIN_SESSION_SECONDS..=MAX_SESSION_SECONDS).contains(&r.max_ttl_seconds) {
                return Err(ConfigError::new(
                    f("max_ttl_seconds"),
                    format!(
                        "AWS sessions last {MIN_SESSION_SECONDS}-{MAX_SESSION_SECONDS} s; set the role's MaxSessionDuration or less"
                    ),
                ));
            }
            if r.max_ttl_seconds > max_ttl.max(MIN_SESSION_SECONDS) {
                return Err(ConfigError::new(
                    f("max_ttl_seconds"),
                    format!("above the broker's limits.max_lease_ttl_seconds ({max_ttl})"),
                ));
            }
            let template = match &r.session_policy {
                Some(t) => serde_json::from_str::<serde_json::Value>(t)
                    .map_err(|e| ConfigError::new(f("session_policy"), format!("not JSON: {e}")))?,
                None => crate::policy::allow_all(),
            };
            crate::policy::check_template(&template)
                .map_err(|m| ConfigError::new(f("session_policy"), m))?;
            let scoped = r
                .session_policy
                .as_ref()
                .is_some_and(|t| t.contains(SCOPE_PLACEHOLDER));
            if scoped == r.scopes.is_empty() {
                return Err(ConfigError::new(
                    f("scopes"),
                    "list the allowed scopes exactly when the session policy uses {{scope}}",
                ));
            }
            for s in &r.scopes {
                let v = s.strip_suffix('*').unwrap_or(s);
                if !(is_scope_value(v) || s == "*") {
                    return Err(ConfigError::new(
                        f("scopes"),
                        format!("`{s}` has characters a scope cannot use"),
                    ));
                }
            }
            // the largest session policy the template can make must fit
            let longest = "x".repeat(256);
            let sample = r
                .scopes
                .iter()
                .any(|s| s.ends_with('*'))
                .then_some(longest.as_str());
            let sample = sample.or(r.scopes.iter().map(String::as_str).max_by_key(|s| s.len()));
            if let Err(m) = crate::policy::session_policy(&template, sample, r.allow_role_chaining)
                && !r.scopes.iter().any(|s| s.ends_with('*'))
            {
                return Err(ConfigError::new(f("session_policy"), m));
            }
            if let Some(x) = &r.external_id
                && (x.len() < 2 || x.len() > 1224 || !x.chars().all(|c| c.is_ascii_graphic()))
            {
                return Err(ConfigError::new(
                    f("external_id"),
                    "2-1224 printable characters",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> AwsStsConfig {
        toml::from_str(
            r#"
            region = "us-east-1"
            [roles.reader]
            role_arn = "arn:aws:iam::123456789012:role/app/reader"
            max_ttl_seconds = 3600
            session_policy = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"arn:aws:s3:::b/{{scope}}/*"}]}'
            scopes = ["reports", "inv/*"]
            "#,
        )
        .unwrap()
    }

    fn fails(mut f: impl FnMut(&mut AwsStsConfig), field: &str) {
        let mut c = base();
        f(&mut c);
        let e = c.validate(86_400).unwrap_err();
        assert_eq!(e.field, field, "{e}");
    }

    fn role(c: &mut AwsStsConfig) -> &mut AwsRole {
        c.roles.get_mut("reader").unwrap()
    }

    #[test]
    fn a_good_config_is_valid() {
        base().validate(86_400).unwrap();
        assert_eq!(
            role_name("arn:aws:iam::123456789012:role/app/reader"),
            Ok("reader")
        );
    }

    #[test]
    fn what_aws_would_refuse_is_refused_here() {
        fails(|c| c.region = "US East".into(), "region");
        fails(
            |c| c.endpoint_url = Some("http://moto.example:5000".into()),
            "endpoint_url",
        );
        fails(|c| c.deny_policy_name = "a b".into(), "deny_policy_name");
        fails(
            |c| c.deny_policy_max_chars = 20_000,
            "deny_policy_max_chars",
        );
        fails(
            |c| role(c).role_arn = "arn:aws:iam::123:role/x".into(),
            "roles.reader.role_arn",
        );
        fails(
            |c| role(c).role_arn = "arn:aws:s3:::bucket".into(),
            "roles.reader.role_arn",
        );
        fails(
            |c| role(c).max_ttl_seconds = 600,
            "roles.reader.max_ttl_seconds",
        );
        fails(
            |c| role(c).max_ttl_seconds = 50_000,
            "roles.reader.max_ttl_seconds",
        );
        fails(
            |c| role(c).session_policy = Some("{nope".into()),
            "roles.reader.session_policy",
        );
        fails(
            |c| {
                role(c).session_policy = Some(
                    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Action":"*"}]}"#
                        .into(),
                )
            },
            "roles.reader.session_policy",
        );
        fails(|c| role(c).scopes.clear(), "roles.reader.scopes");
        fails(
            |c| role(c).scopes.push("a*b*".into()),
            "roles.reader.scopes",
        );
        fails(
            |c| role(c).external_id = Some("x".into()),
            "roles.reader.external_id",
        );
        fails(|c| c.roles.clear(), "roles");
    }

    #[test]
    fn scope_values_cannot_widen() {
        for bad in ["*", "a*", "a?", "../x", "a\"b", "", "a b"] {
            assert!(!is_scope_value(bad), "{bad}");
        }
        for good in ["reports", "2026/q3", "arn:aws:dynamodb:us-east-1:1:table/t"] {
            assert!(is_scope_value(good), "{good}");
        }
    }
}
