//! The provider's configuration (`[providers.NAME]` with `type = "azure"`)
//! and its offline checks: everything Entra, ARM or Graph would refuse, and
//! every combination that could hand a workload the broker's own power, is
//! refused here, at `leasehold config validate` and at start-up.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use leasehold_provider::ConfigError;

/// The placeholder a role's scope template may carry for the call's scope.
pub const SCOPE_PLACEHOLDER: &str = "{{scope}}";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// The Entra ID tenant (directory) id, a GUID.
    pub tenant_id: String,
    /// How the broker signs in to Entra ID.
    pub auth: AzureAuth,
    /// Entra's sign-in host: `https://login.microsoftonline.com`, or a
    /// sovereign cloud's (`https://login.microsoftonline.us`,
    /// `https://login.chinacloudapi.cn`). https only.
    #[serde(default = "defaults::authority_host")]
    pub authority_host: String,
    /// Azure Resource Manager's endpoint and the token scope for it.
    #[serde(default = "defaults::arm_endpoint")]
    pub arm_endpoint: String,
    #[serde(default = "defaults::arm_scope")]
    pub arm_scope: String,
    /// Microsoft Graph's endpoint and the token scope for it.
    #[serde(default = "defaults::graph_endpoint")]
    pub graph_endpoint: String,
    #[serde(default = "defaults::graph_scope")]
    pub graph_scope: String,
    /// A PEM file of extra certificate authorities to trust for all of the
    /// above (a TLS-inspecting proxy, private endpoints, tests).
    pub ca_file: Option<PathBuf>,
    /// Attempts per Azure call. 429 and 5xx answers are retried after their
    /// `Retry-After`, others with exponential backoff and jitter.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// The longest `Retry-After` the broker waits out inside one call; a
    /// longer one fails the call as retryable (the issuing request gets a
    /// 503, a revocation goes back to the queue).
    #[serde(default = "defaults::max_retry_after_seconds")]
    pub max_retry_after_seconds: u64,
    /// How long an issue waits for a new role assignment to be readable
    /// before giving up (and deleting it). Keep it below the broker's
    /// `reaper.provider_timeout_seconds`.
    #[serde(default = "defaults::propagation_timeout_seconds")]
    pub propagation_timeout_seconds: u64,
    /// Each workload's Entra object id (its service principal or managed
    /// identity), by the workload's id (`<issuer name>:<subject>`).
    #[serde(default)]
    pub workload_principals: BTreeMap<String, String>,
    /// Issuer names (of `[[auth.issuers]]`) whose subjects are Entra object
    /// ids: a workload signed in through Entra itself is its own principal.
    #[serde(default)]
    pub principal_from_subject: Vec<String>,
    pub roles: BTreeMap<String, AzureRole>,
}

/// How the broker proves who it is to Entra ID.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum AzureAuth {
    /// An app registration's client secret, read from a file (a mounted
    /// secret), never from the config itself.
    ClientSecret {
        client_id: String,
        client_secret_file: PathBuf,
    },
    /// Workload identity federation: a token file (a Kubernetes projected
    /// service-account token) exchanged for the app's token.
    WorkloadIdentity {
        client_id: String,
        token_file: PathBuf,
    },
    /// The managed identity of the VM or App Service the broker runs on;
    /// `client_id` picks a user-assigned one.
    ManagedIdentity { client_id: Option<String> },
}

/// What a role leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// A role assignment for the workload's own principal, deleted at revoke.
    RoleAssignment,
    /// A password on an application, ending when the lease does.
    AppPassword,
    /// An access token from the broker's own credential; expiry only.
    AccessToken,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoleAssignment => "role_assignment",
            Self::AppPassword => "app_password",
            Self::AccessToken => "access_token",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AzureRole {
    pub mode: Mode,
    pub max_ttl_seconds: u64,
    #[serde(default)]
    pub description: String,
    /// `role_assignment`: the role definition, as
    /// `/subscriptions/<sub>/providers/Microsoft.Authorization/roleDefinitions/<guid>`.
    pub role_definition_id: Option<String>,
    /// `role_assignment`: where the assignment is made, e.g.
    /// `/subscriptions/<sub>/resourceGroups/{{scope}}`; `{{scope}}` is
    /// replaced by the call's one scope.
    pub scope: Option<String>,
    /// `role_assignment`: the scopes a call may ask for. An entry ending in
    /// `*` allows any scope with that prefix.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// `role_assignment`: an ABAC condition (conditionVersion 2.0).
    pub condition: Option<String>,
    /// `app_password`: the application's object id (Graph's `id`).
    pub application_object_id: Option<String>,
    /// `app_password`: the application's client id (`appId`), returned
    /// with the password.
    pub application_client_id: Option<String>,
    /// `access_token`: the scope the token is for, e.g.
    /// `https://storage.azure.com/.default`.
    pub resource_scope: Option<String>,
}

pub(crate) mod defaults {
    pub fn authority_host() -> String {
        "https://login.microsoftonline.com".into()
    }
    pub fn arm_endpoint() -> String {
        "https://management.azure.com".into()
    }
    pub fn arm_scope() -> String {
        "https://management.azure.com/.default".into()
    }
    pub fn graph_endpoint() -> String {
        "https://graph.microsoft.com".into()
    }
    pub fn graph_scope() -> String {
        "https://graph.microsoft.com/.default".into()
    }
    pub fn max_attempts() -> u32 {
        4
    }
    pub fn max_retry_after_seconds() -> u64 {
        20
    }
    pub fn propagation_timeout_seconds() -> u64 {
        20
    }
}

/// 16 bytes as a GUID of `version` (4: random, 5: name-based), with the
/// RFC 9562 variant, in the 8-4-4-4-12 form.
pub fn guid(mut b: [u8; 16], version: u8) -> String {
    b[6] = (b[6] & 0x0f) | (version << 4);
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A GUID in its usual 8-4-4-4-12 form.
pub fn is_guid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// A scope value: narrows an ARM scope by resource group or resource path.
/// ARM names use letters, digits and `-_.()`; `/` separates segments, none
/// empty or a dot path.
pub fn is_scope_value(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.()/".contains(c))
        && s.split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

/// An `https://` URL with a host and nothing after it but an optional `/`.
fn https_base(field: &str, u: &str) -> Result<(), ConfigError> {
    let rest = u
        .strip_prefix("https://")
        .ok_or_else(|| ConfigError::new(field, "must be an https:// URL"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(ConfigError::new(
            field,
            "must be a scheme and host only, e.g. https://management.azure.com",
        ));
    }
    Ok(())
}

fn token_scope(field: &str, s: &str) -> Result<(), ConfigError> {
    if !s.ends_with("/.default") || s.len() <= "/.default".len() || s.contains(' ') {
        return Err(ConfigError::new(
            field,
            "a resource's `.default` scope, e.g. https://storage.azure.com/.default",
        ));
    }
    Ok(())
}

/// `/subscriptions/<guid>/providers/Microsoft.Authorization/roleDefinitions/<guid>`.
fn role_definition_ok(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    matches!(
        parts.as_slice(),
        ["", subs, sub, providers, ns, defs, guid]
            if subs.eq_ignore_ascii_case("subscriptions") && is_guid(sub)
                && providers.eq_ignore_ascii_case("providers")
                && ns.eq_ignore_ascii_case("Microsoft.Authorization")
                && defs.eq_ignore_ascii_case("roleDefinitions") && is_guid(guid)
    )
}

impl AzureConfig {
    pub fn validate(&self, max_ttl: u64) -> Result<(), ConfigError> {
        if !is_guid(&self.tenant_id) {
            return Err(ConfigError::new(
                "tenant_id",
                "the directory (tenant) id, a GUID like 72f988bf-86f1-41af-91ab-2d7cd011db47",
            ));
        }
        match &self.auth {
            AzureAuth::ClientSecret { client_id, .. }
            | AzureAuth::WorkloadIdentity { client_id, .. } => {
                if !is_guid(client_id) {
                    return Err(ConfigError::new(
                        "auth.client_id",
                        "the application (client) id, a GUID",
                    ));
                }
            }
            AzureAuth::ManagedIdentity { client_id } => {
                if client_id.as_deref().is_some_and(|c| !is_guid(c)) {
                    return Err(ConfigError::new(
                        "auth.client_id",
                        "a user-assigned identity's client id, a GUID",
                    ));
                }
            }
        }
        https_base("authority_host", &self.authority_host)?;
        https_base("arm_endpoint", &self.arm_endpoint)?;
        https_base("graph_endpoint", &self.graph_endpoint)?;
        token_scope("arm_scope", &self.arm_scope)?;
        token_scope("graph_scope", &self.graph_scope)?;
        if !(1..=10).contains(&self.max_attempts) {
            return Err(ConfigError::new("max_attempts", "must be 1-10"));
        }
        if !(1..=300).contains(&self.max_retry_after_seconds) {
            return Err(ConfigError::new("max_retry_after_seconds", "must be 1-300"));
        }
        if !(1..=600).contains(&self.propagation_timeout_seconds) {
            return Err(ConfigError::new(
                "propagation_timeout_seconds",
                "must be 1-600",
            ));
        }
        for (w, p) in &self.workload_principals {
            if !is_guid(p) {
                return Err(ConfigError::new(
                    format!("workload_principals.{w}"),
                    "an Entra object id, a GUID",
                ));
            }
        }
        if self.roles.is_empty() {
            return Err(ConfigError::new("roles", "at least one role is required"));
        }
        for (name, r) in &self.roles {
            self.validate_role(name, r, max_ttl)?;
        }
        Ok(())
    }

    fn validate_role(&self, name: &str, r: &AzureRole, max_ttl: u64) -> Result<(), ConfigError> {
        let f = |k: &str| format!("roles.{name}.{k}");
        if r.max_ttl_seconds == 0 || r.max_ttl_seconds > max_ttl {
            return Err(ConfigError::new(
                f("max_ttl_seconds"),
                format!("must be 1-{max_ttl} (the broker's limits.max_lease_ttl_seconds)"),
            ));
        }
        // fields that belong to another mode are mistakes, not decoration
        let present = [
            (
                "role_definition_id",
                r.role_definition_id.is_some(),
                Mode::RoleAssignment,
            ),
            ("scope", r.scope.is_some(), Mode::RoleAssignment),
            ("scopes", !r.scopes.is_empty(), Mode::RoleAssignment),
            ("condition", r.condition.is_some(), Mode::RoleAssignment),
            (
                "application_object_id",
                r.application_object_id.is_some(),
                Mode::AppPassword,
            ),
            (
                "application_client_id",
                r.application_client_id.is_some(),
                Mode::AppPassword,
            ),
            (
                "resource_scope",
                r.resource_scope.is_some(),
                Mode::AccessToken,
            ),
        ];
        if let Some((k, _, m)) = present.iter().find(|(_, set, m)| *set && *m != r.mode) {
            return Err(ConfigError::new(
                f(k),
                format!("is for mode `{}`, not `{}`", m.as_str(), r.mode.as_str()),
            ));
        }
        fn need(field: String, mode: Mode, v: &Option<String>) -> Result<&str, ConfigError> {
            v.as_deref().filter(|s| !s.is_empty()).ok_or_else(|| {
                ConfigError::new(field, format!("required for mode `{}`", mode.as_str()))
            })
        }
        let need = |k: &str, v| need(f(k), r.mode, v);
        match r.mode {
            Mode::RoleAssignment => {
                let def = need("role_definition_id", &r.role_definition_id)?;
                if !role_definition_ok(def) {
                    return Err(ConfigError::new(
                        f("role_definition_id"),
                        "/subscriptions/<guid>/providers/Microsoft.Authorization/roleDefinitions/<guid>",
                    ));
                }
                let scope = need("scope", &r.scope)?;
                let parts: Vec<&str> = scope.split('/').collect();
                let sub_ok = parts.len() >= 3
                    && parts[0].is_empty()
                    && parts[1].eq_ignore_ascii_case("subscriptions")
                    && is_guid(parts[2]);
                let literal = scope.replace(SCOPE_PLACEHOLDER, "x");
                if !sub_ok
                    || !is_scope_value(literal.trim_start_matches('/'))
                    || scope.matches(SCOPE_PLACEHOLDER).count() > 1
                {
                    return Err(ConfigError::new(
                        f("scope"),
                        "/subscriptions/<guid>[/resourceGroups/<name>...], with {{scope}} at most once",
                    ));
                }
                let scoped = scope.contains(SCOPE_PLACEHOLDER);
                if scoped == r.scopes.is_empty() {
                    return Err(ConfigError::new(
                        f("scopes"),
                        "list the allowed scopes exactly when `scope` uses {{scope}}",
                    ));
                }
                for s in &r.scopes {
                    let v = s.strip_suffix('*').unwrap_or(s);
                    if !(is_scope_value(v) || (s == "*")) {
                        return Err(ConfigError::new(
                            f("scopes"),
                            format!("`{s}` has characters a scope cannot use"),
                        ));
                    }
                }
                if let Some(c) = &r.condition
                    && (c.trim().is_empty() || c.len() > 8_192)
                {
                    return Err(ConfigError::new(f("condition"), "1-8192 characters"));
                }
                if self.workload_principals.is_empty() && self.principal_from_subject.is_empty() {
                    return Err(ConfigError::new(
                        "workload_principals",
                        format!(
                            "role `{name}` assigns a role to the workload's own principal: map workloads to Entra object ids here, or name issuers in principal_from_subject"
                        ),
                    ));
                }
            }
            Mode::AppPassword => {
                for k in ["application_object_id", "application_client_id"] {
                    let v = if k == "application_object_id" {
                        &r.application_object_id
                    } else {
                        &r.application_client_id
                    };
                    if !is_guid(need(k, v)?) {
                        return Err(ConfigError::new(f(k), "a GUID"));
                    }
                }
            }
            Mode::AccessToken => {
                let s = need("resource_scope", &r.resource_scope)?;
                token_scope(&f("resource_scope"), s)?;
                let own = [&self.arm_scope, &self.graph_scope];
                let base = |x: &str| {
                    x.trim_end_matches("/.default")
                        .trim_end_matches('/')
                        .to_ascii_lowercase()
                };
                if own.iter().any(|o| base(o) == base(s)) {
                    return Err(ConfigError::new(
                        f("resource_scope"),
                        "is a control plane the broker itself signs in to: a leased token would act as the broker",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Files the config names, for the broker's checks and path fixing.
    pub fn files_mut(&mut self) -> Vec<&mut PathBuf> {
        let mut out: Vec<&mut PathBuf> = self.ca_file.iter_mut().collect();
        match &mut self.auth {
            AzureAuth::ClientSecret {
                client_secret_file, ..
            } => out.push(client_secret_file),
            AzureAuth::WorkloadIdentity { token_file, .. } => out.push(token_file),
            AzureAuth::ManagedIdentity { .. } => {}
        }
        out
    }

    /// Files the config names, by field.
    pub fn files(&self) -> Vec<(&'static str, &PathBuf)> {
        let mut out: Vec<(&'static str, &PathBuf)> =
            self.ca_file.iter().map(|f| ("ca_file", f)).collect();
        match &self.auth {
            AzureAuth::ClientSecret {
                client_secret_file, ..
            } => out.push(("auth.client_secret_file", client_secret_file)),
            AzureAuth::WorkloadIdentity { token_file, .. } => {
                out.push(("auth.token_file", token_file));
            }
            AzureAuth::ManagedIdentity { .. } => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUB: &str = "00000000-0000-0000-0000-00000000000a";

    fn base() -> AzureConfig {
        toml::from_str(&format!(
            r#"
            tenant_id = "72f988bf-86f1-41af-91ab-2d7cd011db47"
            auth = {{ method = "client_secret", client_id = "11111111-1111-1111-1111-111111111111", client_secret_file = "/run/secrets/azure" }}
            workload_principals = {{ "k8s:assistant" = "22222222-2222-2222-2222-222222222222" }}
            [roles.reader]
            mode = "role_assignment"
            max_ttl_seconds = 3600
            role_definition_id = "/subscriptions/{SUB}/providers/Microsoft.Authorization/roleDefinitions/acdd72a7-3385-48ef-bd42-f606fba81ae7"
            scope = "/subscriptions/{SUB}/resourceGroups/{{{{scope}}}}"
            scopes = ["rg-reports", "rg-team-*"]
            [roles.app]
            mode = "app_password"
            max_ttl_seconds = 900
            application_object_id = "33333333-3333-3333-3333-333333333333"
            application_client_id = "44444444-4444-4444-4444-444444444444"
            [roles.storage]
            mode = "access_token"
            max_ttl_seconds = 600
            resource_scope = "https://storage.azure.com/.default"
            "#
        ))
        .unwrap()
    }

    fn fails(mut f: impl FnMut(&mut AzureConfig), field: &str) {
        let mut c = base();
        f(&mut c);
        let e = c.validate(86_400).unwrap_err();
        assert_eq!(e.field, field, "{e}");
    }

    fn role<'a>(c: &'a mut AzureConfig, n: &str) -> &'a mut AzureRole {
        c.roles.get_mut(n).unwrap()
    }

    #[test]
    fn a_good_config_is_valid() {
        base().validate(86_400).unwrap();
    }

    #[test]
    fn what_azure_would_refuse_is_refused_here() {
        fails(
            |c| c.tenant_id = "contoso.onmicrosoft.com".into(),
            "tenant_id",
        );
        fails(
            |c| {
                c.auth = AzureAuth::ClientSecret {
                    client_id: "my-app".into(),
                    client_secret_file: "/x".into(),
                }
            },
            "auth.client_id",
        );
        fails(
            |c| c.authority_host = "http://login.microsoftonline.com".into(),
            "authority_host",
        );
        fails(
            |c| c.arm_endpoint = "https://management.azure.com/subscriptions".into(),
            "arm_endpoint",
        );
        fails(|c| c.graph_scope = "User.Read".into(), "graph_scope");
        fails(|c| c.max_attempts = 0, "max_attempts");
        fails(
            |c| role(c, "reader").role_definition_id = Some("Reader".into()),
            "roles.reader.role_definition_id",
        );
        fails(
            |c| role(c, "reader").scope = Some("/resourceGroups/x".into()),
            "roles.reader.scope",
        );
        fails(|c| role(c, "reader").scopes.clear(), "roles.reader.scopes");
        fails(
            |c| role(c, "reader").scopes.push("../other".into()),
            "roles.reader.scopes",
        );
        fails(
            |c| role(c, "app").application_object_id = None,
            "roles.app.application_object_id",
        );
        fails(
            |c| role(c, "app").resource_scope = Some("https://x/.default".into()),
            "roles.app.resource_scope",
        );
        fails(
            |c| role(c, "storage").max_ttl_seconds = 100_000,
            "roles.storage.max_ttl_seconds",
        );
        fails(|c| c.roles.clear(), "roles");
        fails(
            |c| {
                c.workload_principals.clear();
                c.principal_from_subject.clear();
            },
            "workload_principals",
        );
        fails(
            |c| {
                c.workload_principals
                    .insert("k8s:other".into(), "not-a-guid".into());
            },
            "workload_principals.k8s:other",
        );
    }

    #[test]
    fn the_brokers_own_control_planes_are_not_leased_as_tokens() {
        for s in [
            "https://management.azure.com/.default",
            "https://graph.microsoft.com//.default",
            "HTTPS://GRAPH.MICROSOFT.COM/.default",
        ] {
            fails(
                |c| role(c, "storage").resource_scope = Some(s.into()),
                "roles.storage.resource_scope",
            );
        }
    }

    #[test]
    fn auth_methods_parse_and_unknown_fields_are_refused() {
        let t = |auth: &str| {
            toml::from_str::<AzureConfig>(&format!(
                "tenant_id = \"72f988bf-86f1-41af-91ab-2d7cd011db47\"\nauth = {auth}\n[roles]\n"
            ))
        };
        assert!(matches!(
            t(r#"{ method = "managed_identity" }"#).unwrap().auth,
            AzureAuth::ManagedIdentity { client_id: None }
        ));
        assert!(matches!(
            t(r#"{ method = "workload_identity", client_id = "x", token_file = "/t" }"#)
                .unwrap()
                .auth,
            AzureAuth::WorkloadIdentity { .. }
        ));
        let e = t(r#"{ method = "client_secret", client_id = "x", client_secret = "inline" }"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("client_secret"), "{e}");
        let e = t(r#"{ method = "certificate" }"#).unwrap_err().to_string();
        assert!(e.contains("certificate"), "{e}");
    }

    #[test]
    fn scope_values_cannot_widen() {
        for bad in ["", "..", "a/../b", "a//b", "a*", "a b", "a\"b", "/a"] {
            assert!(!is_scope_value(bad), "{bad}");
        }
        for good in [
            "rg-reports",
            "rg/providers/Microsoft.Storage/storageAccounts/acct1",
        ] {
            assert!(is_scope_value(good), "{good}");
        }
    }
}
