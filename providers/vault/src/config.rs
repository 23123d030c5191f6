//! The provider's configuration (`[providers.NAME]` with `type = "vault"`)
//! and its offline checks. The broker embeds these types in its own config,
//! so unknown keys are errors there too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use leasehold_provider::ConfigError;

/// The placeholder a role's `path` may carry for the call's scope.
pub const SCOPE_PLACEHOLDER: &str = "{{scope}}";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// `https://vault.example:8200`; `http://` only to a loopback address.
    pub address: String,
    /// PEM roots for an `https` address (else the system's).
    pub ca_file: Option<PathBuf>,
    /// Vault Enterprise / OpenBao namespace, sent as `X-Vault-Namespace`.
    pub namespace: Option<String>,
    /// How the broker logs in to the upstream.
    pub auth: AuthConfig,
    /// The token role per-lease tokens are created against
    /// (`auth/token/create/<role>`). Give it `orphan = true`: a token
    /// created without one is a child of the broker's own login token, and
    /// dies (with every lease read through it) when that token does.
    /// Required with `approle`, `jwt` and `kubernetes` auth, whose tokens
    /// expire by design.
    pub lease_token_role: Option<String>,
    /// Policies of the per-lease tokens (a subset of the broker token's or
    /// of the token role's allowed policies). Empty: the broker token's.
    /// They need `read` on each role's path; the built-in `default` policy
    /// (kept) gives them their cubbyhole.
    #[serde(default)]
    pub lease_token_policies: Vec<String>,
    /// Each upstream request's deadline.
    #[serde(default = "defaults::request_timeout_seconds")]
    pub request_timeout_seconds: u64,
    pub roles: BTreeMap<String, VaultRole>,
}

/// How the broker authenticates to the upstream.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "method", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AuthConfig {
    /// A token read from a file, and read again whenever the file changes
    /// (an agent or an operator rotates it). Renewed in the background when
    /// renewable.
    Token { token_file: PathBuf },
    /// AppRole: `role_id` and a `secret_id` read from a file at each login.
    Approle {
        #[serde(default = "defaults::approle_mount")]
        mount: String,
        role_id: String,
        secret_id_file: PathBuf,
    },
    /// JWT/OIDC auth with a JWT read from a file at each login.
    Jwt {
        #[serde(default = "defaults::jwt_mount")]
        mount: String,
        role: String,
        jwt_file: PathBuf,
    },
    /// Kubernetes auth with the pod's service account token.
    Kubernetes {
        #[serde(default = "defaults::kubernetes_mount")]
        mount: String,
        role: String,
        #[serde(default = "defaults::kubernetes_jwt_file")]
        jwt_file: PathBuf,
    },
}

impl AuthConfig {
    pub fn method(&self) -> &'static str {
        match self {
            Self::Token { .. } => "token",
            Self::Approle { .. } => "approle",
            Self::Jwt { .. } => "jwt",
            Self::Kubernetes { .. } => "kubernetes",
        }
    }
}

/// What a role reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A dynamic secret: the response must carry a lease id, which the
    /// broker revokes at the upstream.
    #[default]
    Dynamic,
    /// A KV version 1 read: a static secret, nothing to revoke upstream.
    Kv1,
    /// A KV version 2 read (`<mount>/data/<path>`): a static secret.
    Kv2,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VaultRole {
    /// The path read for a credential, e.g. `database/creds/readonly`. It
    /// may contain `{{scope}}`, replaced by the call's one scope, which must
    /// then be in `scopes`.
    pub path: String,
    #[serde(default)]
    pub kind: Kind,
    pub max_ttl_seconds: u64,
    /// The scopes a call may ask for (only with `{{scope}}` in `path`).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Response fields handed back as public (not secret) values.
    #[serde(default = "defaults::public_fields")]
    pub public_fields: Vec<String>,
    #[serde(default)]
    pub description: String,
}

pub(crate) mod defaults {
    use std::path::PathBuf;

    pub fn request_timeout_seconds() -> u64 {
        10
    }
    pub fn approle_mount() -> String {
        "approle".into()
    }
    pub fn jwt_mount() -> String {
        "jwt".into()
    }
    pub fn kubernetes_mount() -> String {
        "kubernetes".into()
    }
    pub fn kubernetes_jwt_file() -> PathBuf {
        PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
    }
    pub fn public_fields() -> Vec<String> {
        vec!["username".into()]
    }
}

/// A path segment list that stays inside the API: no empty, `.` or `..`
/// segments, only characters Vault paths use.
fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 512 {
        return Err("must be 1-512 characters".into());
    }
    for seg in path.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(format!(
                "`{path}` has an empty, `.` or `..` segment (no leading or trailing `/`)"
            ));
        }
        if !seg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.{}+=@".contains(c))
        {
            return Err(format!(
                "`{path}`: segment `{seg}` has a character outside [A-Za-z0-9-_.+=@]"
            ));
        }
    }
    Ok(())
}

/// A mount or role name in a login path or header.
fn check_name(field: &str, v: &str) -> Result<(), ConfigError> {
    check_path(v).map_err(|m| ConfigError::new(field, m))?;
    if v.contains('{') {
        return Err(ConfigError::new(field, "placeholders are not allowed here"));
    }
    Ok(())
}

impl VaultConfig {
    /// Everything that can be checked without the upstream. `max_ttl` is the
    /// broker's lease ceiling.
    pub fn validate(&self, max_ttl: u64) -> Result<(), ConfigError> {
        let (scheme, rest) = self.address.split_once("://").ok_or_else(|| {
            ConfigError::new(
                "address",
                "must start with https:// (or http:// to loopback)",
            )
        })?;
        let host = rest.split('/').next().unwrap_or("");
        let host = match host.rsplit_once(':') {
            Some((h, port)) if port.parse::<u16>().is_ok() => h,
            _ => host,
        };
        if host.is_empty() {
            return Err(ConfigError::new("address", "has no host"));
        }
        match scheme {
            "https" => {}
            "http" if leasehold_provider::is_loopback_host(host) => {}
            "http" => {
                return Err(ConfigError::new(
                    "address",
                    "plain http is allowed only to a loopback address; use https",
                ));
            }
            _ => {
                return Err(ConfigError::new(
                    "address",
                    "must start with https:// or http://",
                ));
            }
        }
        if rest.trim_end_matches('/').contains('/') {
            return Err(ConfigError::new(
                "address",
                "give the server's base address only; the API path is added",
            ));
        }
        if let Some(ns) = &self.namespace {
            check_name("namespace", ns.trim_end_matches('/'))?;
        }
        match &self.auth {
            AuthConfig::Token { .. } => {}
            AuthConfig::Approle { mount, role_id, .. } => {
                check_name("auth.mount", mount)?;
                if role_id.is_empty() || !role_id.chars().all(|c| c.is_ascii_graphic()) {
                    return Err(ConfigError::new(
                        "auth.role_id",
                        "must be non-empty printable ASCII",
                    ));
                }
            }
            AuthConfig::Jwt { mount, role, .. } | AuthConfig::Kubernetes { mount, role, .. } => {
                check_name("auth.mount", mount)?;
                check_name("auth.role", role)?;
            }
        }
        if self.lease_token_role.is_none() && !matches!(self.auth, AuthConfig::Token { .. }) {
            return Err(ConfigError::new(
                "lease_token_role",
                format!(
                    "required with `{}` auth: per-lease tokens made without an orphan token role \
                     are children of the broker's login token and die with it, taking their \
                     leases along; create one (`auth/token/roles/NAME` with orphan=true) and name it here",
                    self.auth.method()
                ),
            ));
        }
        if let Some(r) = &self.lease_token_role {
            check_name("lease_token_role", r)?;
        }
        for (i, p) in self.lease_token_policies.iter().enumerate() {
            check_name(&format!("lease_token_policies[{i}]"), p)?;
        }
        if self.request_timeout_seconds == 0 || self.request_timeout_seconds > 300 {
            return Err(ConfigError::new("request_timeout_seconds", "must be 1-300"));
        }
        if self.roles.is_empty() {
            return Err(ConfigError::new("roles", "at least one role is required"));
        }
        for (name, r) in &self.roles {
            let f = |k: &str| format!("roles.{name}.{k}");
            check_path(&r.path).map_err(|m| ConfigError::new(f("path"), m))?;
            let placeholders = r.path.matches("{{").count();
            let scoped = r.path.contains(SCOPE_PLACEHOLDER);
            if placeholders != usize::from(scoped) || r.path.matches(SCOPE_PLACEHOLDER).count() > 1
            {
                return Err(ConfigError::new(
                    f("path"),
                    "the only placeholder is `{{scope}}`, at most once",
                ));
            }
            if r.path.replace(SCOPE_PLACEHOLDER, "").contains(['{', '}']) {
                return Err(ConfigError::new(f("path"), "stray `{` or `}`"));
            }
            if scoped && r.scopes.is_empty() {
                return Err(ConfigError::new(
                    f("scopes"),
                    "a path with `{{scope}}` needs the allowed scopes listed",
                ));
            }
            if !scoped && !r.scopes.is_empty() {
                return Err(ConfigError::new(
                    f("scopes"),
                    "scopes need `{{scope}}` in the path to mean anything",
                ));
            }
            let mut seen = BTreeSet::new();
            for s in &r.scopes {
                check_name(&f("scopes"), s)?;
                if s.contains('/') {
                    return Err(ConfigError::new(
                        f("scopes"),
                        format!("`{s}`: one path segment only"),
                    ));
                }
                if !seen.insert(s) {
                    return Err(ConfigError::new(f("scopes"), format!("`{s}` twice")));
                }
            }
            if r.kind == Kind::Kv2 && !r.path.split('/').any(|s| s == "data") {
                return Err(ConfigError::new(
                    f("path"),
                    "a KV version 2 read goes through `<mount>/data/<path>`",
                ));
            }
            if r.max_ttl_seconds == 0 || r.max_ttl_seconds > max_ttl {
                return Err(ConfigError::new(
                    f("max_ttl_seconds"),
                    format!("must be 1-{max_ttl} (the broker's limits.max_lease_ttl_seconds)"),
                ));
            }
        }
        Ok(())
    }

    /// Every file the config names, with its field, for start-up checks.
    pub fn files(&self) -> Vec<(&'static str, &PathBuf)> {
        let mut out = Vec::new();
        if let Some(f) = &self.ca_file {
            out.push(("ca_file", f));
        }
        match &self.auth {
            AuthConfig::Token { token_file } => out.push(("auth.token_file", token_file)),
            AuthConfig::Approle { secret_id_file, .. } => {
                out.push(("auth.secret_id_file", secret_id_file));
            }
            AuthConfig::Jwt { jwt_file, .. } | AuthConfig::Kubernetes { jwt_file, .. } => {
                out.push(("auth.jwt_file", jwt_file));
            }
        }
        out
    }

    /// Every file path the config names, mutable (the broker resolves them
    /// against the config's folder).
    pub fn files_mut(&mut self) -> Vec<&mut PathBuf> {
        let mut out: Vec<&mut PathBuf> = Vec::new();
        if let Some(f) = self.ca_file.as_mut() {
            out.push(f);
        }
        match &mut self.auth {
            AuthConfig::Token { token_file } => out.push(token_file),
            AuthConfig::Approle { secret_id_file, .. } => out.push(secret_id_file),
            AuthConfig::Jwt { jwt_file, .. } | AuthConfig::Kubernetes { jwt_file, .. } => {
                out.push(jwt_file);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VaultConfig {
        toml::from_str(
            r#"
            address = "http://127.0.0.1:8200"
            auth = { method = "token", token_file = "/run/vault-token" }
            [roles.ro]
            path = "database/creds/readonly"
            max_ttl_seconds = 600
            "#,
        )
        .unwrap()
    }

    fn fails(mut f: impl FnMut(&mut VaultConfig), field: &str) {
        let mut c = base();
        f(&mut c);
        let e = c.validate(3600).unwrap_err();
        assert_eq!(e.field, field, "{e}");
    }

    #[test]
    fn a_minimal_config_is_valid() {
        base().validate(3600).unwrap();
        assert_eq!(base().roles["ro"].kind, Kind::Dynamic);
        assert_eq!(base().roles["ro"].public_fields, vec!["username"]);
    }

    #[test]
    fn bad_values_name_their_field() {
        fails(
            |c| c.address = "http://vault.example:8200".into(),
            "address",
        );
        fails(|c| c.address = "ftp://127.0.0.1".into(), "address");
        fails(|c| c.address = "https://v.example/v1".into(), "address");
        fails(|c| c.namespace = Some("a b".into()), "namespace");
        fails(
            |c| c.roles.get_mut("ro").unwrap().path = "database/../sys/seal".into(),
            "roles.ro.path",
        );
        fails(
            |c| c.roles.get_mut("ro").unwrap().path = "/database/creds/x".into(),
            "roles.ro.path",
        );
        fails(
            |c| c.roles.get_mut("ro").unwrap().path = "database/creds/{{name}}".into(),
            "roles.ro.path",
        );
        fails(
            |c| c.roles.get_mut("ro").unwrap().path = "database/creds/{{scope}}".into(),
            "roles.ro.scopes",
        );
        fails(
            |c| c.roles.get_mut("ro").unwrap().scopes = vec!["a".into()],
            "roles.ro.scopes",
        );
        fails(
            |c| c.roles.get_mut("ro").unwrap().max_ttl_seconds = 7200,
            "roles.ro.max_ttl_seconds",
        );
        fails(
            |c| c.roles.get_mut("ro").unwrap().kind = Kind::Kv2,
            "roles.ro.path",
        );
        fails(
            |c| {
                c.auth = AuthConfig::Approle {
                    mount: "approle".into(),
                    role_id: "r".into(),
                    secret_id_file: "/s".into(),
                }
            },
            "lease_token_role",
        );
        fails(|c| c.request_timeout_seconds = 0, "request_timeout_seconds");
        fails(|c| c.roles.clear(), "roles");
    }

    #[test]
    fn unknown_keys_and_methods_are_refused() {
        let e = toml::from_str::<VaultConfig>(
            "address = \"http://127.0.0.1:1\"\nauth = { method = \"token\", token_file = \"/t\", extra = 1 }\nroles = {}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        let e = toml::from_str::<VaultConfig>(
            "address = \"http://127.0.0.1:1\"\nauth = { method = \"ldap\" }\nroles = {}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("ldap"), "{e}");
    }

    #[test]
    fn a_scoped_path_is_valid_with_its_scopes() {
        let mut c = base();
        let r = c.roles.get_mut("ro").unwrap();
        r.path = "database/creds/{{scope}}".into();
        r.scopes = vec!["readonly".into(), "reporting".into()];
        c.validate(3600).unwrap();
    }
}
