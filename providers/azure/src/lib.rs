//! The Azure provider. Azure access tokens cannot be revoked, so leasehold
//! leases what can be taken back, chosen per role:
//!
//! - **`role_assignment`**: a role assignment on ARM for the workload's own
//!   Entra principal, at the role's scope narrowed by the call, named by a
//!   GUID derived from the lease id (so rollback finds it from the lease id
//!   alone), described with the lease id (so nothing else is ever deleted
//!   in its name). Issue waits until the assignment reads back; revoke
//!   deletes it. Azure can take minutes to apply an assignment change at
//!   every resource provider: the lease's description says so. Azure keeps
//!   one assignment per principal, role and scope, so a second lease of the
//!   same role at the same scope for the same workload, while the first
//!   lives, is refused as a conflict (sharing one would let the first
//!   lease's revoke cut the second short).
//! - **`app_password`**: a password on a designated application whose
//!   `endDateTime` is the lease's expiry, so a revoke that never lands still
//!   dies on time. Returns tenant, client id and secret; revoke removes it
//!   by key id; rollback finds it by its display name (the lease id).
//! - **`access_token`**: a token for a configured resource from the broker's
//!   own credential, the lease capped to the token's lifetime. It cannot be
//!   revoked: the lease's description and its revocation note say so, so
//!   policy can keep this mode away from high-risk calls.
//!
//! The broker signs in with azure_identity (client secret, workload
//! identity federation or managed identity) and calls ARM and Graph over
//! their REST APIs with its own client, retrying 429 and 5xx answers after
//! their `Retry-After`.

#![forbid(unsafe_code)]

pub mod config;
mod http;
mod kind;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use leasehold_provider::{
    Credential, Description, Found, Issued, LeaseSpec, Provider, ProviderError, RevocationHandle,
    RevokeSpec, RoleInfo, Timestamp,
};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use config::{AzureAuth, AzureConfig, AzureRole, ConfigError, Mode};
pub use kind::KIND;

use crate::config::SCOPE_PLACEHOLDER;
use crate::http::Api;

/// Revocations in flight at once in `revoke_many_noted`.
const REVOKE_CONCURRENCY: usize = 8;

/// ARM's role-assignment API version.
pub const ARM_API_VERSION: &str = "2022-04-01";

pub struct AzureProvider {
    cfg: AzureConfig,
    api: Api,
}

impl std::fmt::Debug for AzureProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureProvider")
            .field("tenant_id", &self.cfg.tenant_id)
            .field("roles", &self.cfg.roles.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// What the broker stores to take a lease back.
#[derive(Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
enum Handle {
    RoleAssignment {
        /// The assignment's full id (scope + name).
        id: String,
        principal_id: String,
    },
    AppPassword {
        application_object_id: String,
        key_id: String,
    },
    AccessToken {
        /// When the token dies (unix seconds): nothing else ends it.
        token_expires: i64,
    },
}

/// The role assignment name for a lease: a GUID from SHA-256 of the lease
/// id and role (version 5 and variant bits set, as ARM expects a GUID).
pub fn assignment_name(lease_id: &str, role: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in ["leasehold-role-assignment", lease_id, role] {
        ctx.update(part.as_bytes());
        ctx.update(&[0]);
    }
    let d = ctx.finish();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    config::guid(b, 5)
}

/// The mark in every assignment's description and password's display name.
fn mark(lease_id: &str) -> String {
    format!("leasehold lease {lease_id}")
}

/// The lease id a mark names, if `text` carries one.
fn marked_lease(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("leasehold lease ")?;
    let id = rest.split([';', ' ']).next().unwrap_or_default();
    (!id.is_empty()).then_some(id)
}

/// `Found::name` prefixes, one per kind of object inventory reports.
const FOUND_ASSIGNMENT: &str = "role_assignment ";
const FOUND_PASSWORD: &str = "app_password ";

fn marked(text: &str, lease_id: &str) -> bool {
    let m = mark(lease_id);
    text == m || text.starts_with(&format!("{m} ")) || text.starts_with(&format!("{m};"))
}

/// Passwords and tokens are not narrowed by a call.
fn no_scope(role: &str, scope: &[String]) -> Result<(), ProviderError> {
    if scope.is_empty() {
        Ok(())
    } else {
        Err(ProviderError::invalid(format!(
            "role `{role}` takes no scope"
        )))
    }
}

fn handle_bytes(h: &Handle) -> Result<RevocationHandle, ProviderError> {
    serde_json::to_vec(h)
        .map(RevocationHandle::new)
        .map_err(|e| ProviderError::permanent(format!("encoding the handle: {e}")))
}

impl AzureProvider {
    /// Build from a config. Nothing is contacted until the first call: the
    /// broker starts (and reports not ready) while Entra is unreachable.
    pub fn new(cfg: AzureConfig, max_ttl: u64) -> Result<Self, ConfigError> {
        cfg.validate(max_ttl)?;
        let http =
            http::client(cfg.ca_file.as_deref()).map_err(|m| ConfigError::new("ca_file", m))?;
        let credential = Self::credential(&cfg, http.clone())?;
        Ok(Self {
            api: Api {
                http,
                credential,
                max_attempts: cfg.max_attempts,
                max_retry_after: Duration::from_secs(cfg.max_retry_after_seconds),
            },
            cfg,
        })
    }

    fn credential(
        cfg: &AzureConfig,
        http: reqwest::Client,
    ) -> Result<Arc<dyn TokenCredential>, ConfigError> {
        use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
        use azure_core::http::{ClientOptions, RetryOptions, Transport};
        let mut cloud = CustomConfiguration::default();
        cloud.authority_host = cfg.authority_host.trim_end_matches('/').to_owned();
        let options = ClientOptions {
            transport: Some(Transport::new(Arc::new(http::Transport(http)))),
            cloud: Some(Arc::new(CloudConfiguration::from(cloud))),
            // our own loop retries, with the rest of the call
            retry: RetryOptions::none(),
            ..Default::default()
        };
        let err = |field: &str| {
            let field = field.to_owned();
            move |e: azure_core::Error| ConfigError::new(field, e.to_string())
        };
        Ok(match &cfg.auth {
            AzureAuth::ClientSecret {
                client_id,
                client_secret_file,
            } => {
                let secret = std::fs::read_to_string(client_secret_file).map_err(|e| {
                    ConfigError::new(
                        "auth.client_secret_file",
                        format!("{}: {e}", client_secret_file.display()),
                    )
                })?;
                let secret = secret.trim().to_owned();
                if secret.is_empty() {
                    return Err(ConfigError::new(
                        "auth.client_secret_file",
                        format!("{} is empty", client_secret_file.display()),
                    ));
                }
                azure_identity::ClientSecretCredential::new(
                    &cfg.tenant_id,
                    client_id.clone(),
                    azure_core::credentials::Secret::new(secret),
                    Some(azure_identity::ClientSecretCredentialOptions {
                        client_options: options,
                    }),
                )
                .map_err(err("auth"))?
            }
            AzureAuth::WorkloadIdentity {
                client_id,
                token_file,
            } => azure_identity::WorkloadIdentityCredential::new(Some(
                azure_identity::WorkloadIdentityCredentialOptions {
                    credential_options: azure_identity::ClientAssertionCredentialOptions {
                        client_options: options,
                    },
                    client_id: Some(client_id.clone()),
                    tenant_id: Some(cfg.tenant_id.clone()),
                    token_file_path: Some(token_file.clone()),
                },
            ))
            .map_err(err("auth"))?,
            AzureAuth::ManagedIdentity { client_id } => {
                azure_identity::ManagedIdentityCredential::new(Some(
                    azure_identity::ManagedIdentityCredentialOptions {
                        user_assigned_id: client_id
                            .clone()
                            .map(azure_identity::UserAssignedId::ClientId),
                        client_options: options,
                    },
                ))
                .map_err(err("auth"))?
            }
        })
    }

    fn role(&self, name: &str) -> Result<&AzureRole, ProviderError> {
        leasehold_provider::configured_role(&self.cfg.roles, name)
    }

    /// The ARM scope of a role assignment: the role's template with the
    /// call's one scope in it, checked against the allowlist.
    fn arm_scope(
        &self,
        name: &str,
        role: &AzureRole,
        scope: &[String],
    ) -> Result<String, ProviderError> {
        let template = role.scope.as_deref().unwrap_or_default();
        let scoped = template.contains(SCOPE_PLACEHOLDER);
        let one = leasehold_provider::one_scope(
            name,
            scoped,
            scope,
            &role.scopes,
            config::is_scope_value,
        )?;
        Ok(one.map_or_else(
            || template.to_owned(),
            |one| template.replace(SCOPE_PLACEHOLDER, one),
        ))
    }

    /// The workload's Entra object id.
    fn principal(&self, workload: &str) -> Result<String, ProviderError> {
        if let Some(p) = self.cfg.workload_principals.get(workload) {
            return Ok(p.clone());
        }
        if let Some((issuer, subject)) = workload.split_once(':')
            && self.cfg.principal_from_subject.iter().any(|i| i == issuer)
            && config::is_guid(subject)
        {
            return Ok(subject.to_ascii_lowercase());
        }
        Err(ProviderError::invalid(format!(
            "workload `{workload}` has no Azure principal: map it in workload_principals"
        )))
    }

    fn arm_url(&self, id: &str) -> String {
        format!(
            "{}{id}?api-version={ARM_API_VERSION}",
            self.cfg.arm_endpoint.trim_end_matches('/')
        )
    }

    fn graph_url(&self, path: &str) -> String {
        format!(
            "{}/v1.0{path}",
            self.cfg.graph_endpoint.trim_end_matches('/')
        )
    }

    async fn arm(
        &self,
        what: &str,
        method: Method,
        id: &str,
        body: Option<&Value>,
    ) -> Result<http::Answer, ProviderError> {
        self.api
            .call(what, &self.cfg.arm_scope, method, &self.arm_url(id), body)
            .await
    }

    async fn graph(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<http::Answer, ProviderError> {
        self.api
            .call(
                what,
                &self.cfg.graph_scope,
                method,
                &self.graph_url(path),
                body,
            )
            .await
    }

    /// The applications `app_password` roles add passwords to, once each.
    fn applications(&self) -> BTreeSet<&str> {
        self.cfg
            .roles
            .values()
            .filter_map(|r| r.application_object_id.as_deref())
            .collect()
    }

    // --- role_assignment ---

    fn assignment_id(scope: &str, name: &str) -> String {
        format!("{scope}/providers/Microsoft.Authorization/roleAssignments/{name}")
    }

    async fn issue_assignment(
        &self,
        spec: &LeaseSpec,
        role: &AzureRole,
    ) -> Result<Issued, ProviderError> {
        let scope = self.arm_scope(&spec.role, role, &spec.scope)?;
        let principal = self.principal(&spec.workload)?;
        let name = assignment_name(&spec.lease_id, &spec.role);
        let id = Self::assignment_id(&scope, &name);
        let definition = role.role_definition_id.clone().unwrap_or_default();
        let mut props = json!({
            "roleDefinitionId": definition,
            "principalId": principal,
            "principalType": "ServicePrincipal",
            "description": format!(
                "{}; task {}; ends {}",
                mark(&spec.lease_id), spec.task_id, spec.expires_at.rfc3339()
            ),
        });
        if let Some(c) = &role.condition {
            props["condition"] = json!(c);
            props["conditionVersion"] = json!("2.0");
        }
        let a = self
            .arm(
                "create role assignment",
                Method::PUT,
                &id,
                Some(&json!({"properties": props})),
            )
            .await?;
        match (a.status, a.code()) {
            (200 | 201, _) => {}
            (409, code) => {
                // Someone else's assignment: never recorded, never deleted.
                return Err(ProviderError::permanent(format!(
                    "conflict: {code}: an assignment of this role to this principal at {scope} already exists and was not made for this lease; nothing was created"
                )));
            }
            (400, "PrincipalNotFound") => {
                return Err(ProviderError::permanent(format!(
                    "create role assignment: the workload's principal {principal} is not in tenant {}",
                    self.cfg.tenant_id
                )));
            }
            _ => return Err(a.into_error("create role assignment")),
        }
        // ARM answers before every replica has it: wait until it reads back.
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(self.cfg.propagation_timeout_seconds);
        let mut pause = Duration::from_millis(250);
        loop {
            let r = self
                .arm("read role assignment", Method::GET, &id, None)
                .await?;
            if r.status == 200 && r.body["properties"]["principalId"] == principal.as_str() {
                break;
            }
            if r.status != 404 && r.status != 200 {
                return Err(r.into_error("read role assignment"));
            }
            if tokio::time::Instant::now() + pause > deadline {
                let _ = self.delete_assignment(&id, &spec.lease_id).await;
                return Err(ProviderError::retryable(format!(
                    "the role assignment was not readable within {} s (propagation_timeout_seconds); deleted it",
                    self.cfg.propagation_timeout_seconds
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
        let handle = handle_bytes(&Handle::RoleAssignment {
            id: id.clone(),
            principal_id: principal.clone(),
        })?;
        Ok(Issued {
            credential: Credential::new()
                .public("tenant_id", &self.cfg.tenant_id)
                .public("principal_id", &principal)
                .public("role_definition_id", definition)
                .public("scope", &scope)
                .public("role_assignment_id", &id)
                .public("expires_at", spec.expires_at.rfc3339()),
            handle,
            expires_at: spec.expires_at,
            description: format!(
                "role assignment {name} at {scope} for principal {principal}; revoked by deleting it; Azure may take minutes to apply an assignment change everywhere"
            ),
        })
    }

    /// Delete an assignment if it is the lease's (its description carries
    /// the lease's mark); gone already is success.
    async fn delete_assignment(&self, id: &str, lease_id: &str) -> Result<(), ProviderError> {
        // Read first, to leave alone an assignment that is not the lease's.
        // A 404 still deletes: a replica that has not seen the assignment
        // yet answers 404 too, and deleting what is gone is a no-op.
        let r = self
            .arm("read role assignment", Method::GET, id, None)
            .await?;
        match r.status {
            404 => {}
            200 => {
                let desc = r.body["properties"]["description"]
                    .as_str()
                    .unwrap_or_default();
                if !marked(desc, lease_id) {
                    tracing::warn!(
                        lease_id,
                        "the role assignment under this lease's name is not the lease's; left in place"
                    );
                    return Ok(());
                }
            }
            _ => return Err(r.into_error("read role assignment")),
        }
        let d = self
            .arm("delete role assignment", Method::DELETE, id, None)
            .await?;
        match d.status {
            200 | 204 | 404 => Ok(()),
            _ => Err(d.into_error("delete role assignment")),
        }
    }

    // --- app_password ---

    async fn issue_password(
        &self,
        spec: &LeaseSpec,
        role: &AzureRole,
    ) -> Result<Issued, ProviderError> {
        no_scope(&spec.role, &spec.scope)?;
        let app = role.application_object_id.clone().unwrap_or_default();
        let end = Timestamp::from_unix_millis(spec.expires_at.unix_seconds() * 1000);
        let body = json!({"passwordCredential": {
            "displayName": format!("{}; task {}", mark(&spec.lease_id), spec.task_id),
            "endDateTime": end.rfc3339(),
        }});
        let a = self
            .graph(
                "add application password",
                Method::POST,
                &format!("/applications/{app}/addPassword"),
                Some(&body),
            )
            .await?;
        if a.status != 200 && a.status != 201 {
            return Err(a.into_error("add application password"));
        }
        let (Some(key_id), Some(secret)) =
            (a.body["keyId"].as_str(), a.body["secretText"].as_str())
        else {
            return Err(ProviderError::permanent(
                "add application password: the answer has no keyId or secretText",
            ));
        };
        // Graph's own end time is the credential's: it must not outlive the lease.
        let graph_end = a.body["endDateTime"]
            .as_str()
            .and_then(|s| {
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
            })
            .map(|t| {
                Timestamp::from_unix_millis(
                    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX),
                )
            });
        let handle = handle_bytes(&Handle::AppPassword {
            application_object_id: app.clone(),
            key_id: key_id.to_owned(),
        })?;
        if graph_end.is_none_or(|g| g > spec.expires_at) {
            let _ = self.remove_password(&app, key_id).await;
            return Err(ProviderError::permanent(
                "add application password: Graph set an end time after the lease's; removed it",
            ));
        }
        Ok(Issued {
            credential: Credential::new()
                .public("tenant_id", &self.cfg.tenant_id)
                .public(
                    "client_id",
                    role.application_client_id.clone().unwrap_or_default(),
                )
                .secret("client_secret", secret)
                .public("key_id", key_id)
                .public("expires_at", end.rfc3339()),
            handle,
            expires_at: end,
            description: format!(
                "password {key_id} on application {app}, endDateTime {} (Entra ends it then even if a revoke fails); revoked by removing it",
                end.rfc3339()
            ),
        })
    }

    async fn remove_password(&self, app: &str, key_id: &str) -> Result<(), ProviderError> {
        let r = self
            .graph(
                "remove application password",
                Method::POST,
                &format!("/applications/{app}/removePassword"),
                Some(&json!({"keyId": key_id})),
            )
            .await?;
        if matches!(r.status, 200 | 204 | 404) {
            return Ok(());
        }
        // Whatever the refusal, a key that is no longer listed is gone.
        let listed = self.passwords(app).await?;
        if listed.iter().any(|(k, _)| k == key_id) {
            return Err(r.into_error("remove application password"));
        }
        Ok(())
    }

    /// Remove every password on `app` that carries `lease_id`'s mark.
    async fn remove_marked_passwords(
        &self,
        app: &str,
        lease_id: &str,
    ) -> Result<(), ProviderError> {
        for (key, name) in self.passwords(app).await? {
            if marked(&name, lease_id) {
                self.remove_password(app, &key).await?;
            }
        }
        Ok(())
    }

    /// The application's passwords as (key id, display name).
    async fn passwords(&self, app: &str) -> Result<Vec<(String, String)>, ProviderError> {
        let r = self
            .graph(
                "list application passwords",
                Method::GET,
                &format!("/applications/{app}?$select=id,appId,passwordCredentials"),
                None,
            )
            .await?;
        if r.status != 200 {
            return Err(r.into_error("list application passwords"));
        }
        Ok(r.body["passwordCredentials"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p["keyId"].as_str()?.to_owned(),
                    p["displayName"].as_str().unwrap_or_default().to_owned(),
                ))
            })
            .collect())
    }

    // --- access_token ---

    async fn issue_token(
        &self,
        spec: &LeaseSpec,
        role: &AzureRole,
    ) -> Result<Issued, ProviderError> {
        no_scope(&spec.role, &spec.scope)?;
        let scope = role.resource_scope.clone().unwrap_or_default();
        let t = self.api.token(&scope).await?;
        let token_expires = t.expires_on.unix_timestamp();
        let dies = Timestamp::from_unix_millis(token_expires.saturating_mul(1000));
        let expires_at = dies.min(spec.expires_at);
        if expires_at <= spec.issued_at {
            return Err(ProviderError::retryable(
                "the access token Entra returned has already expired",
            ));
        }
        Ok(Issued {
            credential: Credential::new()
                .public("token_type", "Bearer")
                .public("scope", &scope)
                .secret("access_token", t.token.secret())
                .public("expires_at", dies.rfc3339()),
            handle: handle_bytes(&Handle::AccessToken { token_expires })?,
            expires_at,
            description: format!(
                "access token for {scope}, valid until {}; cannot be revoked: it stays usable until then even after the lease ends",
                dies.rfc3339()
            ),
        })
    }

    fn token_note(token_expires: i64) -> String {
        format!(
            "expiry only (an Azure access token cannot be revoked; it stays valid until {})",
            Timestamp::from_unix_millis(token_expires.saturating_mul(1000)).rfc3339()
        )
    }

    async fn revoke_noted(&self, lease: &RevokeSpec) -> Result<Option<String>, ProviderError> {
        let h: Handle = serde_json::from_slice(lease.handle.as_bytes())
            .map_err(|e| ProviderError::permanent(format!("unreadable revocation handle: {e}")))?;
        match h {
            Handle::RoleAssignment { id, .. } => {
                self.delete_assignment(&id, &lease.lease_id).await?;
                Ok(None)
            }
            Handle::AppPassword {
                application_object_id,
                key_id,
            } => {
                self.remove_password(&application_object_id, &key_id)
                    .await?;
                // addPassword is not idempotent: a retry after a lost answer
                // leaves a second password with the same mark. It ends with
                // the lease anyway; take it now too.
                self.remove_marked_passwords(&application_object_id, &lease.lease_id)
                    .await?;
                Ok(None)
            }
            Handle::AccessToken { token_expires } => Ok(Some(Self::token_note(token_expires))),
        }
    }
}

#[async_trait::async_trait]
impl Provider for AzureProvider {
    fn describe(&self) -> Description {
        Description {
            kind: "azure",
            roles: self
                .cfg
                .roles
                .iter()
                .map(|(name, r)| RoleInfo {
                    name: name.clone(),
                    max_ttl: Duration::from_secs(r.max_ttl_seconds),
                    description: if r.description.is_empty() {
                        match r.mode {
                            Mode::RoleAssignment => format!(
                                "role assignment at {}",
                                r.scope.as_deref().unwrap_or_default()
                            ),
                            Mode::AppPassword => "application password".into(),
                            Mode::AccessToken => format!(
                                "access token for {} (expiry only)",
                                r.resource_scope.as_deref().unwrap_or_default()
                            ),
                        }
                    } else {
                        r.description.clone()
                    },
                })
                .collect(),
            revocation: "role assignments are deleted and application passwords removed (and end on their own at the lease's expiry); access tokens cannot be revoked and live until they expire".into(),
        }
    }

    fn validate(&self, role: &str, scope: &[String]) -> Result<Duration, ProviderError> {
        let r = self.role(role)?;
        match r.mode {
            Mode::RoleAssignment => {
                self.arm_scope(role, r, scope)?;
            }
            Mode::AppPassword | Mode::AccessToken => no_scope(role, scope)?,
        }
        Ok(Duration::from_secs(r.max_ttl_seconds))
    }

    async fn health(&self) -> Result<(), ProviderError> {
        let roles = || self.cfg.roles.values();
        if roles().any(|r| r.mode == Mode::RoleAssignment) {
            self.api.token(&self.cfg.arm_scope).await?;
        }
        for app in self.applications() {
            let r = self
                .graph(
                    "read application",
                    Method::GET,
                    &format!("/applications/{app}?$select=id"),
                    None,
                )
                .await?;
            if r.status != 200 {
                return Err(r.into_error(&format!("read application {app}")));
            }
        }
        for scope in roles().filter_map(|r| r.resource_scope.as_deref()) {
            self.api.token(scope).await?;
        }
        Ok(())
    }

    async fn issue(&self, spec: &LeaseSpec) -> Result<Issued, ProviderError> {
        let role = self.role(&spec.role)?;
        match role.mode {
            Mode::RoleAssignment => self.issue_assignment(spec, role).await,
            Mode::AppPassword => self.issue_password(spec, role).await,
            Mode::AccessToken => self.issue_token(spec, role).await,
        }
    }

    async fn revoke(&self, lease: &RevokeSpec) -> Result<(), ProviderError> {
        self.revoke_noted(lease).await.map(|_| ())
    }

    async fn revoke_many_noted(
        &self,
        leases: &[RevokeSpec],
    ) -> Vec<Result<Option<String>, ProviderError>> {
        // A few at a time: each is two to four calls, and a mass revocation
        // should not take one round trip per call per lease; ARM's and
        // Graph's throttling answers are waited out by the retry loop.
        let mut out = Vec::with_capacity(leases.len());
        for chunk in leases.chunks(REVOKE_CONCURRENCY) {
            out.extend(futures::future::join_all(chunk.iter().map(|l| self.revoke_noted(l))).await);
        }
        out
    }

    async fn rollback_noted(&self, spec: &LeaseSpec) -> Result<Option<String>, ProviderError> {
        let role = self.role(&spec.role)?;
        match role.mode {
            Mode::RoleAssignment => {
                let scope = self.arm_scope(&spec.role, role, &spec.scope)?;
                let id = Self::assignment_id(&scope, &assignment_name(&spec.lease_id, &spec.role));
                self.delete_assignment(&id, &spec.lease_id).await?;
                Ok(None)
            }
            Mode::AppPassword => {
                let app = role.application_object_id.clone().unwrap_or_default();
                self.remove_marked_passwords(&app, &spec.lease_id).await?;
                Ok(None)
            }
            Mode::AccessToken => Ok(Some(
                "expiry only (an access token cannot be revoked; one issued before the crash lives until it expires)".into(),
            )),
        }
    }

    async fn rollback(&self, spec: &LeaseSpec) -> Result<(), ProviderError> {
        self.rollback_noted(spec).await.map(|_| ())
    }

    /// Every role assignment (in the subscriptions the roles name) and every
    /// password (on the roles' applications) that carries a lease's mark.
    /// Role assignments never expire on their own, so this is how ones a
    /// lost store no longer knows about are found. `None` when the roles
    /// are all access tokens, which expire.
    async fn inventory(&self) -> Result<Option<Vec<Found>>, ProviderError> {
        let mut found = Vec::new();
        let subs: BTreeSet<String> = self
            .cfg
            .roles
            .values()
            .filter_map(|r| r.scope.as_deref())
            .map(|scope| scope.split('/').take(3).collect::<Vec<_>>().join("/"))
            .collect();
        let apps = self.applications();
        if subs.is_empty() && apps.is_empty() {
            return Ok(None);
        }
        for sub in subs {
            let mut url = format!(
                "{}{sub}/providers/Microsoft.Authorization/roleAssignments?api-version={ARM_API_VERSION}",
                self.cfg.arm_endpoint.trim_end_matches('/')
            );
            // follow nextLink, but only on the configured endpoint
            for _ in 0..1000 {
                let r = self
                    .api
                    .call(
                        "list role assignments",
                        &self.cfg.arm_scope,
                        Method::GET,
                        &url,
                        None,
                    )
                    .await?;
                if r.status != 200 {
                    return Err(r.into_error("list role assignments"));
                }
                for a in r.body["value"].as_array().into_iter().flatten() {
                    let desc = a["properties"]["description"].as_str().unwrap_or_default();
                    if let (Some(lease), Some(id)) = (marked_lease(desc), a["id"].as_str()) {
                        found.push(Found {
                            name: format!("{FOUND_ASSIGNMENT}{id}"),
                            lease_id: Some(lease.to_owned()),
                        });
                    }
                }
                match r.body["nextLink"].as_str() {
                    Some(next) if next.starts_with(self.cfg.arm_endpoint.trim_end_matches('/')) => {
                        url = next.to_owned();
                    }
                    _ => break,
                }
            }
        }
        for app in apps {
            for (key, name) in self.passwords(app).await? {
                if let Some(lease) = marked_lease(&name) {
                    found.push(Found {
                        name: format!("{FOUND_PASSWORD}{app}/{key}"),
                        lease_id: Some(lease.to_owned()),
                    });
                }
            }
        }
        Ok(Some(found))
    }

    /// Delete one thing `inventory` found, checking its mark again first.
    async fn remove(&self, found: &Found) -> Result<(), ProviderError> {
        let lease = found.lease_id.as_deref().ok_or_else(|| {
            ProviderError::invalid(format!("`{}` carries no lease mark", found.name))
        })?;
        if let Some(id) = found.name.strip_prefix(FOUND_ASSIGNMENT) {
            return self.delete_assignment(id, lease).await;
        }
        if let Some((app, key)) = found
            .name
            .strip_prefix(FOUND_PASSWORD)
            .and_then(|r| r.split_once('/'))
        {
            let ours = self
                .passwords(app)
                .await?
                .iter()
                .any(|(k, name)| k == key && marked(name, lease));
            if !ours {
                return Ok(());
            }
            return self.remove_password(app, key).await;
        }
        Err(ProviderError::invalid(format!(
            "`{}` is not something this provider made",
            found.name
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_names_are_deterministic_guids() {
        let a = assignment_name("lease_01", "reader");
        assert_eq!(a, assignment_name("lease_01", "reader"));
        assert_ne!(a, assignment_name("lease_02", "reader"));
        assert_ne!(a, assignment_name("lease_01", "writer"));
        assert!(config::is_guid(&a), "{a}");
        assert_eq!(&a[14..15], "5");
    }

    #[test]
    fn the_mark_names_its_lease() {
        assert_eq!(marked_lease("leasehold lease l_1; task t"), Some("l_1"));
        assert_eq!(marked_lease("leasehold lease l_1"), Some("l_1"));
        assert_eq!(marked_lease("leasehold lease "), None);
        assert_eq!(marked_lease("the broker's own grant"), None);
    }

    #[test]
    fn the_mark_does_not_match_a_longer_lease_id() {
        assert!(marked("leasehold lease l_1; task t", "l_1"));
        assert!(marked("leasehold lease l_1", "l_1"));
        assert!(!marked("leasehold lease l_12; task t", "l_1"));
        assert!(!marked("someone else's", "l_1"));
    }
}
