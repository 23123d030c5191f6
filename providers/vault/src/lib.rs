//! The Vault/OpenBao provider: the assistant gets a task lease, the upstream
//! secrets engine mints the credential.
//!
//! **Per-lease token.** `prepare` creates a token for the one lease (against
//! `lease_token_role`, orphan, TTL ending a second before the broker's
//! deadline, metadata naming the lease, task and workload). The broker
//! stores it, sealed, on the lease intent. `issue` reads the role's path
//! *with that token*, so the upstream lease belongs to it: when the token
//! ends (revoked, or expired at the broker's deadline while the broker is
//! down), the upstream revokes the lease too.
//!
//! **Issue.** The read must return a `lease_id` (for `kind = "dynamic"`);
//! one without is an error and nothing is issued. The lease id is written to
//! the token's cubbyhole before the credential is returned, so a rollback
//! that has only the token finds it. An upstream lease shorter than the
//! broker's deadline caps the broker lease; a longer one is revoked at the
//! broker's deadline (by the broker, and by the token's end).
//!
//! **Revoke.** `sys/leases/revoke` with `sync = true` (the upstream has
//! revoked the credential at its backend when it answers), then the token.
//! An upstream lease already gone is success. Sealed or unreachable:
//! retryable, and the broker's queue retries.
//!
//! **Rollback.** With the prepared token: the lease id from its cubbyhole is
//! revoked as above, then the token. Without one nothing was read.
//!
//! **KV.** `kind = "kv1"`/`"kv2"` leases a static secret: there is nothing
//! to revoke upstream, and the lease description says so.

#![forbid(unsafe_code)]

pub mod config;

mod auth;
mod kind;
mod upstream;

#[cfg(feature = "testkit")]
pub mod testkit;

use std::sync::Arc;
use std::time::Duration;

use leasehold_provider::{
    Credential, Description, Issued, LeaseSpec, Provider, ProviderError, RevocationHandle,
    RevokeSpec, RoleInfo,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use config::{AuthConfig, ConfigError, Kind, VaultConfig, VaultRole};
pub use kind::KIND;

use crate::auth::Auth;
use crate::config::SCOPE_PLACEHOLDER;
use crate::upstream::{Failure, Raw, Upstream};

/// Revocations in flight at once in `revoke_many`.
const REVOKE_CONCURRENCY: usize = 8;

/// The cubbyhole path of a per-lease token where `issue` notes the upstream
/// lease id.
const CUBBY: &str = "cubbyhole/leasehold";

/// What the broker stores (sealed) to take a credential back.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Handle {
    /// `prepare` made this token; `issue` may or may not have read with it.
    /// The accessor is public: `issue` names it in the lease description.
    Prepared { token: String, accessor: String },
    /// An upstream lease read with the per-lease token.
    Lease { lease_id: String, token: String },
    /// A static (KV) read: nothing upstream to revoke.
    Static,
}

impl Handle {
    fn encode(&self) -> RevocationHandle {
        RevocationHandle::new(serde_json::to_vec(self).unwrap_or_default())
    }

    fn decode(h: &RevocationHandle) -> Result<Self, ProviderError> {
        serde_json::from_slice(h.as_bytes())
            .map_err(|_| ProviderError::permanent("the revocation handle is not a Vault handle"))
    }
}

#[derive(Debug)]
struct Inner {
    cfg: VaultConfig,
    up: Upstream,
    auth: Auth,
}

#[derive(Debug)]
pub struct VaultProvider {
    inner: Arc<Inner>,
    upkeep: Option<tokio::task::AbortHandle>,
}

impl Drop for VaultProvider {
    fn drop(&mut self) {
        if let Some(h) = &self.upkeep {
            h.abort();
        }
    }
}

/// The token's TTL for a lease: whole seconds up to a second before the
/// deadline, so it ends no later than the lease (at least one second).
fn token_ttl(spec: &LeaseSpec) -> u64 {
    let secs = spec.issued_at.until(spec.expires_at).as_secs();
    if secs > 2 { secs - 1 } else { secs.max(1) }
}

impl Inner {
    fn role(&self, name: &str) -> Result<&VaultRole, ProviderError> {
        leasehold_provider::configured_role(&self.cfg.roles, name)
    }

    /// The path a lease of `role` with `scope` reads.
    fn path(
        &self,
        role: &VaultRole,
        name: &str,
        scope: &[String],
    ) -> Result<String, ProviderError> {
        if !role.path.contains(SCOPE_PLACEHOLDER) {
            if !scope.is_empty() {
                return Err(ProviderError::invalid(format!(
                    "role `{name}` takes no scope"
                )));
            }
            return Ok(role.path.clone());
        }
        match scope {
            [one] if role.scopes.contains(one) => Ok(role.path.replace(SCOPE_PLACEHOLDER, one)),
            [one] => Err(ProviderError::invalid(format!(
                "scope `{one}` is not allowed for role `{name}`; allowed: {}",
                role.scopes.join(", ")
            ))),
            _ => Err(ProviderError::invalid(format!(
                "role `{name}` takes exactly one scope, one of: {}",
                role.scopes.join(", ")
            ))),
        }
    }

    /// A request with the broker's own token; a 403 makes it read or log in
    /// again and try once more (the token was revoked or rotated).
    async fn as_broker(&self, req: Raw) -> Result<upstream::Response, Failure> {
        let token = self
            .auth
            .token(&self.up)
            .await
            .map_err(|e| Failure::Auth(e.message))?;
        match self.up.send(Some(&token), req.clone()).await {
            Err(f) if f.is_permission_denied() => {
                self.auth.refused();
                let fresh = self
                    .auth
                    .token(&self.up)
                    .await
                    .map_err(|e| Failure::Auth(e.message))?;
                if fresh.expose_secret() == token.expose_secret() {
                    return Err(f); // same token: a real permission problem
                }
                self.up.send(Some(&fresh), req).await
            }
            other => other,
        }
    }

    /// End a per-lease token with itself. Gone already (403) is success.
    async fn end_token(&self, token: &SecretString) -> Result<(), ProviderError> {
        match self
            .up
            .send(
                Some(token),
                upstream::post("auth/token/revoke-self", json!({})),
            )
            .await
        {
            Ok(_) | Err(Failure::Status { code: 403, .. }) => Ok(()),
            Err(f) => Err(f.class("revoking the lease's token")),
        }
    }

    /// Revoke an upstream lease and wait until the upstream has. Already
    /// gone is success.
    async fn revoke_lease(&self, lease_id: &str) -> Result<(), ProviderError> {
        let req = upstream::put(
            "sys/leases/revoke",
            json!({ "lease_id": lease_id, "sync": true }),
        );
        match self.as_broker(req).await {
            Ok(_) => Ok(()),
            // older servers answer 400 "invalid lease" for one already gone
            Err(Failure::Status { code: 400, errors })
                if errors.iter().any(|e| e.contains("invalid lease")) =>
            {
                Ok(())
            }
            Err(f) => Err(f.class("sys/leases/revoke")),
        }
    }

    /// Take back whatever was read with a prepared token: the lease noted in
    /// its cubbyhole, then the token.
    async fn unwind(&self, token: &SecretString) -> Result<(), ProviderError> {
        match self.up.send(Some(token), upstream::get(CUBBY)).await {
            Ok(r) => {
                let noted = r
                    .data
                    .as_ref()
                    .and_then(|d| d.get("lease_id"))
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned);
                if let Some(lease) = noted {
                    self.revoke_lease(&lease).await?;
                }
            }
            // nothing noted: nothing was read, or the note never landed
            Err(Failure::Status { code: 404, .. }) => {}
            // the token is gone: so are its leases, the upstream revoked them with it
            Err(Failure::Status { code: 403, .. }) => return Ok(()),
            Err(f) => return Err(f.class("reading the lease's token cubbyhole")),
        }
        self.end_token(token).await
    }

    async fn revoke_handle(&self, h: Handle) -> Result<(), ProviderError> {
        match h {
            Handle::Static => Ok(()),
            Handle::Prepared { token, .. } => self.unwind(&SecretString::from(token)).await,
            Handle::Lease {
                lease_id, token, ..
            } => {
                self.revoke_lease(&lease_id).await?;
                self.end_token(&SecretString::from(token)).await
            }
        }
    }
}

impl VaultProvider {
    /// Build from a config. Does not contact the upstream: the broker starts
    /// (and reports not ready) while it is down. Inside a tokio runtime it
    /// starts the background task that keeps the broker's upstream token
    /// fresh; it stops when the provider is dropped.
    pub fn new(cfg: VaultConfig, max_ttl: u64) -> Result<Self, ConfigError> {
        cfg.validate(max_ttl)?;
        let up = Upstream::new(&cfg).map_err(|message| ConfigError {
            field: "address".into(),
            message,
        })?;
        let inner = Arc::new(Inner {
            auth: Auth::new(cfg.auth.clone()),
            cfg,
            up,
        });
        let upkeep = tokio::runtime::Handle::try_current().ok().map(|rt| {
            let weak = Arc::downgrade(&inner);
            rt.spawn(async move {
                loop {
                    let Some(inner) = weak.upgrade() else { return };
                    let pause = inner.auth.upkeep(&inner.up).await;
                    drop(inner);
                    tokio::time::sleep(pause).await;
                }
            })
            .abort_handle()
        });
        Ok(Self { inner, upkeep })
    }

    /// Look an upstream lease up with the broker's token: `Ok(false)` when
    /// the upstream no longer knows it. For tests and for operators checking
    /// that revocation reached the upstream.
    pub async fn upstream_lease_exists(&self, lease_id: &str) -> Result<bool, ProviderError> {
        match self
            .inner
            .as_broker(upstream::put(
                "sys/leases/lookup",
                json!({ "lease_id": lease_id }),
            ))
            .await
        {
            Ok(_) => Ok(true),
            Err(Failure::Status { code: 400, .. }) => Ok(false),
            Err(f) => Err(f.class("sys/leases/lookup")),
        }
    }

    /// The upstream lease id behind a revocation handle, if it has one.
    pub fn upstream_lease_id(handle: &RevocationHandle) -> Option<String> {
        match Handle::decode(handle).ok()? {
            Handle::Lease { lease_id, .. } => Some(lease_id),
            _ => None,
        }
    }
}

#[async_trait::async_trait]
impl Provider for VaultProvider {
    fn describe(&self) -> Description {
        Description {
            kind: "vault",
            roles: self
                .inner
                .cfg
                .roles
                .iter()
                .map(|(name, r)| RoleInfo {
                    name: name.clone(),
                    max_ttl: Duration::from_secs(r.max_ttl_seconds),
                    description: if r.description.is_empty() {
                        format!("reads {}", r.path)
                    } else {
                        r.description.clone()
                    },
                })
                .collect(),
            revocation: "the upstream lease is revoked with sys/leases/revoke (sync) and the \
                         per-lease token it was read with is revoked; static KV reads cannot be \
                         revoked upstream"
                .into(),
        }
    }

    fn validate(&self, role: &str, scope: &[String]) -> Result<Duration, ProviderError> {
        let r = self.inner.role(role)?;
        self.inner.path(r, role, scope)?;
        Ok(Duration::from_secs(r.max_ttl_seconds))
    }

    async fn health(&self) -> Result<(), ProviderError> {
        let r = self
            .inner
            .as_broker(upstream::get("auth/token/lookup-self"))
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(f) => {
                let e = f.class("upstream token lookup");
                Err(match self.inner.auth.problem() {
                    Some(why) if !e.message.contains(&why) => {
                        ProviderError::retryable(format!("{}; upstream token: {why}", e.message))
                    }
                    _ => e,
                })
            }
        }
    }

    async fn prepare(&self, spec: &LeaseSpec) -> Result<Option<RevocationHandle>, ProviderError> {
        let role = self.inner.role(&spec.role)?;
        if role.kind != Kind::Dynamic {
            return Ok(None);
        }
        let cfg = &self.inner.cfg;
        let ttl = format!("{}s", token_ttl(spec));
        let mut body = json!({
            "ttl": ttl,
            "explicit_max_ttl": ttl,
            "renewable": false,
            "display_name": format!("leasehold-{}", spec.lease_id),
            "meta": {
                "leasehold_lease": spec.lease_id,
                "leasehold_task": spec.task_id,
                "leasehold_workload": spec.workload,
                "leasehold_role": spec.role,
            },
        });
        if !cfg.lease_token_policies.is_empty() {
            body["policies"] = json!(cfg.lease_token_policies);
        }
        let path = match &cfg.lease_token_role {
            Some(r) => format!("auth/token/create/{r}"),
            None => "auth/token/create".into(),
        };
        let r = self
            .inner
            .as_broker(upstream::post(path, body))
            .await
            .map_err(|f| f.class("creating the lease's token"))?;
        let auth = r
            .auth
            .ok_or_else(|| ProviderError::permanent("token create answered without a token"))?;
        Ok(Some(
            Handle::Prepared {
                token: auth.client_token.expose_secret().to_owned(),
                accessor: auth.accessor,
            }
            .encode(),
        ))
    }

    async fn issue(&self, spec: &LeaseSpec) -> Result<Issued, ProviderError> {
        let role = self.inner.role(&spec.role)?;
        let path = self.inner.path(role, &spec.role, &spec.scope)?;
        if role.kind != Kind::Dynamic {
            return self.issue_static(spec, role, &path).await;
        }
        let (token, accessor) = match spec.prepared.as_ref().map(Handle::decode).transpose()? {
            Some(Handle::Prepared { token, accessor }) => (SecretString::from(token), accessor),
            _ => {
                return Err(ProviderError::permanent(
                    "issue without a prepared lease token (the broker calls prepare first)",
                ));
            }
        };
        let r = match self.inner.up.send(Some(&token), upstream::get(&path)).await {
            Ok(r) => r,
            Err(f) => {
                let e = f.class(&format!("reading `{path}`"));
                if let Err(e2) = self.inner.end_token(&token).await {
                    tracing::warn!(error = %e2, "ending an unused lease token failed; it expires at the lease deadline");
                }
                return Err(e);
            }
        };
        if r.lease_id.is_empty() {
            // nothing issued: the read made no lease the broker could revoke
            drop(r);
            self.inner.end_token(&token).await.ok();
            return Err(ProviderError::permanent(format!(
                "`{path}` answered without a lease id: not a dynamic secret, so nothing was \
                 issued (for a static KV secret set kind = \"kv1\" or \"kv2\")"
            )));
        }
        let lease_id = r.lease_id.clone();
        let fail = |e: ProviderError| async move {
            if let Err(e2) = self.inner.revoke_lease(&lease_id).await {
                tracing::warn!(error = %e2, "revoking an upstream lease of a failed issue failed; the broker rolls it back");
            }
            e
        };
        // note the lease on its token before the credential leaves
        if let Err(f) = self
            .inner
            .up
            .send(
                Some(&token),
                upstream::post(CUBBY, json!({ "lease_id": r.lease_id })),
            )
            .await
        {
            return Err(fail(f.class("noting the lease in its token's cubbyhole")).await);
        }
        let credential = match credential_of(r.data, role) {
            Ok(c) => c,
            Err(e) => return Err(fail(e).await),
        };
        let upstream_end = spec
            .issued_at
            .saturating_add(Duration::from_secs(r.lease_duration));
        let expires_at = if r.lease_duration > 0 {
            spec.expires_at.min(upstream_end)
        } else {
            spec.expires_at
        };
        let capped = expires_at < spec.expires_at;
        let description = format!(
            "upstream lease under `{path}` ({}renewable, upstream TTL {} s{}), read with lease \
             token {accessor}; revoked with sys/leases/revoke",
            if r.renewable { "" } else { "not " },
            r.lease_duration,
            if capped {
                ", which caps this lease"
            } else {
                "; revoked at the broker's deadline"
            },
        );
        let handle = Handle::Lease {
            lease_id: r.lease_id,
            token: token.expose_secret().to_owned(),
        }
        .encode();
        Ok(Issued {
            credential,
            handle,
            expires_at,
            description,
        })
    }

    async fn revoke(&self, lease: &RevokeSpec) -> Result<(), ProviderError> {
        self.inner
            .revoke_handle(Handle::decode(&lease.handle)?)
            .await
    }

    /// A few at a time: each revocation waits for the upstream to revoke
    /// at its backend (a database role dropped), so one after another would
    /// leave the upstream mostly idle.
    async fn revoke_many(&self, leases: &[RevokeSpec]) -> Vec<Result<(), ProviderError>> {
        let mut set = tokio::task::JoinSet::new();
        let mut out: Vec<Option<Result<(), ProviderError>>> = vec![None; leases.len()];
        let mut next = leases.iter().enumerate();
        loop {
            while set.len() < REVOKE_CONCURRENCY
                && let Some((i, l)) = next.next()
            {
                let (inner, handle) = (self.inner.clone(), Handle::decode(&l.handle));
                set.spawn(async move {
                    let r = match handle {
                        Ok(h) => inner.revoke_handle(h).await,
                        Err(e) => Err(e),
                    };
                    (i, r)
                });
            }
            match set.join_next().await {
                Some(Ok((i, r))) => out[i] = Some(r),
                Some(Err(e)) => tracing::error!(error = %e, "a revocation task failed"),
                None => break,
            }
        }
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(ProviderError::retryable("the revocation did not finish")))
            })
            .collect()
    }

    async fn rollback(&self, spec: &LeaseSpec) -> Result<(), ProviderError> {
        match spec.prepared.as_ref().map(Handle::decode).transpose()? {
            // never prepared (or a static role): nothing was read with a lease
            None => Ok(()),
            Some(h) => self.inner.revoke_handle(h).await,
        }
    }
}

impl VaultProvider {
    async fn issue_static(
        &self,
        spec: &LeaseSpec,
        role: &VaultRole,
        path: &str,
    ) -> Result<Issued, ProviderError> {
        let r = self
            .inner
            .as_broker(upstream::get(path))
            .await
            .map_err(|f| f.class(&format!("reading `{path}`")))?;
        let data = match role.kind {
            Kind::Kv2 => r
                .data
                .and_then(|mut d| d.remove("data"))
                .and_then(|v| match v {
                    serde_json::Value::Object(m) => Some(m),
                    _ => None,
                }),
            _ => r.data,
        };
        let credential = credential_of(data, role)?;
        Ok(Issued {
            credential,
            handle: Handle::Static.encode(),
            expires_at: spec.expires_at,
            description: format!(
                "static secret from `{path}`: nothing to revoke upstream; the broker ends the \
                 lease at its deadline, but whoever read the secret keeps it until it is \
                 rotated upstream"
            ),
        })
    }
}

/// The response's `data` as a credential: `public_fields` public, every
/// other field secret (non-string values as JSON text).
fn credential_of(
    data: Option<serde_json::Map<String, serde_json::Value>>,
    role: &VaultRole,
) -> Result<Credential, ProviderError> {
    let data = data
        .filter(|d| !d.is_empty())
        .ok_or_else(|| ProviderError::permanent("the upstream answered with no data"))?;
    let mut c = Credential::new();
    for (k, v) in data {
        let text = match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        c = if role.public_fields.iter().any(|p| p == &k) {
            c.public(&k, text)
        } else {
            c.secret(&k, text)
        };
    }
    Ok(c)
}
