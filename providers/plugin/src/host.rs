//! The broker's side: the provider that supervises the plugin process and
//! calls it (its catalog entry is `catalog.rs`).
//!
//! The plugin starts in the background when the provider is built; until
//! it has answered its handshake, and while it is down, the provider is
//! unready (every call fails fast, retryable, naming the plugin and why),
//! never the broker. A plugin that exits is started again with backoff
//! (100 ms doubling to 30 s); revocations that failed meanwhile stay on the
//! broker's durable queue and are retried. Every call is bounded by
//! `timeout_seconds`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold_provider::{
    BrokerLimits, Credential, Description, Found, Issued, LeaseSpec, Provider, ProviderError,
    RevocationHandle, RevokeSpec, RoleInfo, Timestamp,
};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::catalog::PluginConfig;
use crate::convert::{
    credential_from_wire, credential_to_wire, error_from_wire, found_from_wire, found_to_wire,
    outcome, revoke_to_wire, spec_to_wire,
};
use crate::lane;
use crate::process::{self, status_text};
use crate::wire::{self, provider_client::ProviderClient};

/// Revocations sent in one `Revoke` call.
const REVOKE_CHUNK: usize = 1000;
/// Validation answers remembered per plugin generation.
const VALIDATE_CACHE: usize = 4096;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

// === impl PluginProvider ===

#[derive(Clone, Debug)]
enum State {
    Starting,
    Ready(Arc<Conn>),
    Down(String),
}

#[derive(Debug)]
struct Conn {
    client: ProviderClient<Channel>,
    socket: PathBuf,
    generation: u64,
    pid: Option<u32>,
    describe: wire::DescribeResponse,
}

#[derive(Debug)]
struct Inner {
    label: String,
    cfg: PluginConfig,
    limits: wire::Limits,
    timeout: Duration,
    state: watch::Sender<State>,
    validated: Mutex<ValidateCache>,
    lane: Mutex<lane::Lane>,
}

#[derive(Debug, Default)]
struct ValidateCache {
    generation: u64,
    answers: HashMap<(String, Vec<String>), Result<Duration, ProviderError>>,
}

/// A provider served by a plugin process (see the module's doc).
#[derive(Debug)]
pub struct PluginProvider {
    inner: Arc<Inner>,
    supervisor: tokio::task::JoinHandle<()>,
}

impl Drop for PluginProvider {
    fn drop(&mut self) {
        // the child is killed when the supervisor's future is dropped
        self.supervisor.abort();
    }
}

impl PluginProvider {
    /// Start supervising the plugin in the background (needs a Tokio
    /// runtime); returns at once.
    pub fn start(cfg: PluginConfig, limits: &BrokerLimits) -> Result<Self, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "a plugin provider is built inside the broker's runtime".to_owned())?;
        let inner = Arc::new(Inner {
            label: cfg.label(),
            limits: cfg.limits(limits),
            timeout: Duration::from_secs(cfg.timeout_seconds),
            cfg,
            state: watch::Sender::new(State::Starting),
            validated: Mutex::new(ValidateCache::default()),
            lane: Mutex::new(lane::Lane::new()?),
        });
        let supervisor = runtime.spawn(supervise(inner.clone()));
        Ok(Self { inner, supervisor })
    }

    /// The plugin's process id while it runs (tests kill it).
    pub fn pid(&self) -> Option<u32> {
        match &*self.inner.state.borrow() {
            State::Ready(c) => c.pid,
            _ => None,
        }
    }

    /// Wait until the plugin serves, or `timeout`; the last error if not.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let mut rx = self.inner.state.subscribe();
        let res = tokio::time::timeout(timeout, async {
            loop {
                if let State::Ready(_) = &*rx.borrow_and_update() {
                    return Ok(());
                }
                if rx.changed().await.is_err() {
                    return Err("the supervisor stopped".to_owned());
                }
            }
        })
        .await;
        match res {
            Ok(r) => r,
            Err(_) => Err(match &*self.inner.state.borrow() {
                State::Down(e) => e.clone(),
                _ => "still starting".to_owned(),
            }),
        }
    }

    /// The serving plugin, waiting while it starts (up to the timeout);
    /// retryable errors naming the plugin otherwise.
    async fn conn(&self) -> Result<Arc<Conn>, ProviderError> {
        let mut rx = self.inner.state.subscribe();
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        loop {
            match &*rx.borrow_and_update() {
                State::Ready(c) => return Ok(c.clone()),
                State::Down(e) => return Err(self.inner.unready(e)),
                State::Starting => {}
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(self.inner.unready("still starting")),
            }
        }
    }

    /// One RPC to the serving plugin under the timeout.
    async fn call<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T, ProviderError>
    where
        F: FnOnce(ProviderClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let conn = self.conn().await?;
        match tokio::time::timeout(self.inner.timeout, f(conn.client.clone())).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(ProviderError::retryable(format!(
                "plugin `{}`: {what}: {}",
                self.inner.label,
                status_text(&s)
            ))),
            Err(_) => Err(ProviderError::retryable(format!(
                "plugin `{}` did not answer {what} within {}s",
                self.inner.label,
                self.inner.timeout.as_secs()
            ))),
        }
    }

    async fn revoke_chunk(
        &self,
        leases: &[RevokeSpec],
    ) -> Vec<Result<Option<String>, ProviderError>> {
        let req = wire::RevokeRequest {
            leases: leases.iter().map(revoke_to_wire).collect(),
        };
        match self
            .call("Revoke", |mut c| async move { c.revoke(req).await })
            .await
        {
            Ok(r) if r.results.len() == leases.len() => r
                .results
                .into_iter()
                .map(|o| outcome(o.error).map(|()| o.note))
                .collect(),
            Ok(r) => {
                let e = ProviderError::retryable(format!(
                    "plugin `{}` answered {} results for {} revocations",
                    self.inner.label,
                    r.results.len(),
                    leases.len()
                ));
                leases.iter().map(|_| Err(e.clone())).collect()
            }
            Err(e) => leases.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    fn validate_remote(&self, role: &str, scope: &[String]) -> Result<Duration, ProviderError> {
        let State::Ready(conn) = self.inner.state.borrow().clone() else {
            let why = match &*self.inner.state.borrow() {
                State::Down(e) => e.clone(),
                _ => "still starting".to_owned(),
            };
            return Err(self.inner.unready(&why));
        };
        let key = (role.to_owned(), scope.to_vec());
        if let Ok(cache) = self.inner.validated.lock()
            && cache.generation == conn.generation
            && let Some(answer) = cache.answers.get(&key)
        {
            return answer.clone();
        }
        let req = wire::ValidateRequest {
            role: role.to_owned(),
            scope: scope.to_vec(),
        };
        // `validate` is synchronous (the broker checks a request before it
        // records anything); the call runs on a thread of its own, so it
        // works from any runtime, bounded by the timeout.
        let answer = self
            .inner
            .lane
            .lock()
            .map_err(|_| ProviderError::retryable("plugin validation lane poisoned"))?
            .validate(&conn.socket, conn.generation, req, self.inner.timeout)
            .map_err(|m| {
                ProviderError::retryable(format!("plugin `{}`: Validate: {m}", self.inner.label))
            })?;
        let answer = match answer.error {
            Some(e) => Err(error_from_wire(e)),
            None => Ok(Duration::from_secs(answer.max_ttl_seconds)),
        };
        if let Ok(mut cache) = self.inner.validated.lock() {
            if cache.generation != conn.generation || cache.answers.len() >= VALIDATE_CACHE {
                cache.generation = conn.generation;
                cache.answers.clear();
            }
            cache.answers.insert(key, answer.clone());
        }
        answer
    }
}

impl Inner {
    fn unready(&self, why: &str) -> ProviderError {
        ProviderError::retryable(format!("plugin `{}` is not ready: {why}", self.label))
    }
}

/// Start, watch, restart with backoff; forever (until aborted).
async fn supervise(inner: Arc<Inner>) {
    let mut backoff = BACKOFF_START;
    let mut generation = 0u64;
    loop {
        inner.state.send_replace(State::Starting);
        let started = tokio::time::Instant::now();
        match process::start(
            &inner.label,
            &inner.label,
            &inner.cfg,
            inner.limits,
            inner.timeout,
        )
        .await
        {
            Ok(mut running) => {
                generation += 1;
                let pid = running.child.id();
                tracing::info!(
                    plugin = %inner.label,
                    pid,
                    version = %running.handshake.version,
                    "provider plugin started"
                );
                inner.state.send_replace(State::Ready(Arc::new(Conn {
                    client: running.client.clone(),
                    socket: running.socket.clone(),
                    generation,
                    pid,
                    describe: running.describe.clone(),
                })));
                let status = running.child.wait().await;
                let why = match status {
                    Ok(s) => format!("the plugin exited ({s})"),
                    Err(e) => format!("waiting for the plugin: {e}"),
                };
                tracing::error!(plugin = %inner.label, "{why}; starting it again");
                inner.state.send_replace(State::Down(why));
                if started.elapsed() > BACKOFF_MAX {
                    backoff = BACKOFF_START;
                }
            }
            Err(why) => {
                tracing::error!(plugin = %inner.label, "provider plugin not started: {why}");
                inner.state.send_replace(State::Down(why));
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[async_trait::async_trait]
impl Provider for PluginProvider {
    /// The catalog's roles (what policy was checked against); the plugin's
    /// own description must agree, or it is not started.
    fn describe(&self) -> Description {
        let described = match &*self.inner.state.borrow() {
            State::Ready(c) => Some(c.describe.clone()),
            _ => None,
        };
        let roles = self
            .inner
            .cfg
            .role_ttls()
            .into_iter()
            .map(|(name, max)| {
                let d = described
                    .as_ref()
                    .and_then(|d| d.roles.iter().find(|r| r.name == name));
                RoleInfo {
                    name: name.to_owned(),
                    max_ttl: Duration::from_secs(d.map_or(max, |r| r.max_ttl_seconds)),
                    description: d.map(|r| r.description.clone()).unwrap_or_default(),
                }
            })
            .collect();
        Description {
            kind: "plugin",
            roles,
            revocation: described.map(|d| d.revocation).unwrap_or_else(|| {
                format!("by the plugin `{}` (not started yet)", self.inner.label)
            }),
        }
    }

    fn validate(&self, role: &str, scope: &[String]) -> Result<Duration, ProviderError> {
        let roles = self.inner.cfg.role_ttls();
        if !roles.iter().any(|(r, _)| *r == role) {
            return Err(ProviderError::invalid(format!(
                "no role `{}`; configured: {}",
                role.escape_default(),
                roles.iter().map(|(r, _)| *r).collect::<Vec<_>>().join(", ")
            )));
        }
        self.validate_remote(role, scope)
    }

    async fn health(&self) -> Result<(), ProviderError> {
        let r = self
            .call("Health", |mut c| async move {
                c.health(wire::HealthRequest {}).await
            })
            .await?;
        outcome(r.error)
    }

    async fn prepare(&self, spec: &LeaseSpec) -> Result<Option<RevocationHandle>, ProviderError> {
        let req = spec_to_wire(spec);
        let r = self
            .call("Prepare", |mut c| async move { c.prepare(req).await })
            .await?;
        outcome(r.error)?;
        Ok(r.handle.map(RevocationHandle::new))
    }

    async fn issue(&self, spec: &LeaseSpec) -> Result<Issued, ProviderError> {
        let req = spec_to_wire(spec);
        let r = self
            .call("Issue", |mut c| async move { c.issue(req).await })
            .await?;
        outcome(r.error)?;
        let expires_at = Timestamp::from_unix_millis(r.expires_at_ms);
        let wrong = if r.lease_id != spec.lease_id {
            Some(format!(
                "answered Issue for lease `{}` when asked for `{}`",
                r.lease_id.escape_default(),
                spec.lease_id
            ))
        } else if expires_at > spec.expires_at {
            Some(format!(
                "issued a credential that outlives its lease ({} ms past it)",
                expires_at.unix_millis() - spec.expires_at.unix_millis()
            ))
        } else {
            None
        };
        if let Some(wrong) = wrong {
            // whatever it made is taken back before the broker refuses it
            let revoke = RevokeSpec {
                lease_id: r.lease_id.clone(),
                role: spec.role.clone(),
                expires_at,
                handle: RevocationHandle::new(r.handle.clone()),
            };
            let taken_back = match self.revoke(&revoke).await {
                Ok(()) => "revoked it".to_owned(),
                Err(e) => format!("revoking it failed: {e}"),
            };
            return Err(ProviderError::permanent(format!(
                "plugin `{}` {wrong}; {taken_back}",
                self.inner.label
            )));
        }
        Ok(Issued {
            credential: credential_from_wire(r.credential),
            handle: RevocationHandle::new(r.handle),
            expires_at,
            description: r.description,
        })
    }

    async fn revoke(&self, lease: &RevokeSpec) -> Result<(), ProviderError> {
        self.revoke_many_noted(std::slice::from_ref(lease))
            .await
            .pop()
            .unwrap_or_else(|| Err(ProviderError::retryable("no revocation result")))
            .map(|_| ())
    }

    async fn revoke_many(&self, leases: &[RevokeSpec]) -> Vec<Result<(), ProviderError>> {
        self.revoke_many_noted(leases)
            .await
            .into_iter()
            .map(|r| r.map(|_| ()))
            .collect()
    }

    async fn revoke_many_noted(
        &self,
        leases: &[RevokeSpec],
    ) -> Vec<Result<Option<String>, ProviderError>> {
        let mut out = Vec::with_capacity(leases.len());
        for chunk in leases.chunks(REVOKE_CHUNK) {
            out.extend(self.revoke_chunk(chunk).await);
        }
        out
    }

    async fn rollback(&self, spec: &LeaseSpec) -> Result<(), ProviderError> {
        self.rollback_noted(spec).await.map(|_| ())
    }

    async fn rollback_noted(&self, spec: &LeaseSpec) -> Result<Option<String>, ProviderError> {
        let req = spec_to_wire(spec);
        let r = self
            .call("Rollback", |mut c| async move { c.rollback(req).await })
            .await?;
        outcome(r.error)?;
        Ok(r.note)
    }

    async fn inventory(&self) -> Result<Option<Vec<Found>>, ProviderError> {
        let r = self
            .call("Inventory", |mut c| async move {
                c.inventory(wire::InventoryRequest {}).await
            })
            .await?;
        outcome(r.error)?;
        Ok(r.supported
            .then(|| r.found.into_iter().map(found_from_wire).collect()))
    }

    async fn remove(&self, found: &Found) -> Result<(), ProviderError> {
        let req = found_to_wire(found);
        let r = self
            .call("Remove", |mut c| async move { c.remove(req).await })
            .await?;
        outcome(r.error)
    }

    async fn probe(
        &self,
        spec: &LeaseSpec,
        credential: &Credential,
    ) -> Result<Option<bool>, ProviderError> {
        let req = wire::ProbeRequest {
            spec: Some(spec_to_wire(spec)),
            credential: credential_to_wire(credential),
        };
        let r = self
            .call("Probe", |mut c| async move { c.probe(req).await })
            .await?;
        outcome(r.error)?;
        Ok(r.supported.then_some(r.usable))
    }
}
