//! The issue path every credential takes (a call's, a direct request's,
//! break-glass's): the heart of invariant 1 (intent before issue):
//!
//! 1. validate everything (provider, role, scope, TTL, task) without writing;
//! 2. write the lease as `issuing` and wait until it is durable;
//! 3. call the provider (`prepare`, whose handle, if any, is stored on the
//!    intent before `issue`, so a rollback can find what `issue` made);
//! 4. write it `active` (with the sealed revocation handle and its entry in
//!    the expiry index) and wait until that is durable;
//! 5. only then return the credential.
//!
//! A crash after 2 leaves an `issuing` record that start-up recovery rolls
//! back at the provider; a provider failure after 2 queues a rollback; an
//! activation refused because the task closed meanwhile queues a rollback.
//! The credential itself is never stored anywhere.

use std::time::Duration;

use leasehold_provider::{
    BindingSupport, Credential, ErrorClass, Issued, KeyBinding, LeaseSpec, ProviderError,
    RevokeSpec, Timestamp,
};

use crate::audit::{self, Ctx};
use crate::auth::Workload;
use crate::domain::reaper::spec_of;
use crate::domain::{Broker, BrokerError};
use crate::ids::{LeaseId, TaskId};
use crate::providers::ProviderEntry;
use crate::store::{Activation, LeaseRecord, LeaseState, StoreError, TaskRecord};

/// A credential request, already decoded from the wire.
#[derive(Debug, Clone)]
pub struct LeaseParams {
    pub provider: String,
    pub role: String,
    pub ttl_seconds: i64,
    pub scope: Vec<String>,
    /// The key the request proved (a DPoP proof, or the TLS client
    /// certificate it arrived with), already verified by the API layer.
    pub binding: Option<KeyBinding>,
}

/// A lease validated and computed, not yet written.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub rec: LeaseRecord,
    pub entry: ProviderEntry,
    /// What the credential is bound to, for providers that bind.
    pub binding: Option<KeyBinding>,
}

/// A step run inside a store transaction alongside the lease intent.
pub(crate) type TxnStep =
    Box<dyn for<'t> FnOnce(&mut crate::store::Txn<'t>) -> Result<(), StoreError> + Send>;

/// A step that does nothing.
pub(crate) fn no_step() -> TxnStep {
    Box::new(|_| Ok(()))
}

/// An issued lease and the credential, which exists only in this value.
#[derive(Debug)]
pub struct IssuedLease {
    pub lease: LeaseRecord,
    pub credential: Credential,
}

const MAX_SCOPE_ITEMS: usize = 32;

impl Broker {
    /// Validate a credential request without writing anything: provider,
    /// role, scope, TTL. Returns the provider entry and the role's maximum.
    pub(crate) fn check_credential(
        &self,
        p: &LeaseParams,
    ) -> Result<(ProviderEntry, Duration, Duration), BrokerError> {
        let ttl = crate::check::ttl(
            "ttl_seconds",
            p.ttl_seconds,
            self.limits.max_lease_ttl_seconds,
        )?;
        if p.scope.len() > MAX_SCOPE_ITEMS
            || p.scope
                .iter()
                .any(|s| s.is_empty() || s.len() > 256 || s.chars().any(char::is_control))
        {
            return Err(BrokerError::invalid(
                "invalid_request",
                format!(
                    "`scope` takes at most {MAX_SCOPE_ITEMS} non-empty items of up to 256 characters"
                ),
            ));
        }
        let entry = self.providers.get(&p.provider).ok_or_else(|| {
            BrokerError::invalid(
                "unknown_provider",
                format!("no provider named `{}`", p.provider.escape_default()),
            )
        })?;
        if entry.description.role(&p.role).is_none() {
            return Err(BrokerError::invalid(
                "unknown_role",
                format!(
                    "provider `{}` has no role `{}`",
                    p.provider,
                    p.role.escape_default()
                ),
            ));
        }
        let role_max = entry
            .provider
            .validate(&p.role, &p.scope)
            .map_err(|e| match e.class {
                ErrorClass::Invalid => BrokerError::invalid("scope_not_allowed", e.message),
                _ => BrokerError::Provider {
                    provider: p.provider.clone(),
                    retryable: e.is_retryable(),
                    detail: e.message,
                },
            })?;
        if entry.provider.binding(&p.role) == BindingSupport::Required && p.binding.is_none() {
            return Err(BrokerError::Forbidden {
                code: "binding_required",
                message: format!(
                    "`{}/{}` issues only bound credentials: send a DPoP proof (RFC 9449, \
                     header `DPoP`) or call over mutual TLS with a client certificate",
                    p.provider, p.role
                ),
            });
        }
        Ok((entry.clone(), ttl, role_max))
    }

    /// The key a credential for `p` will be bound to: the request's proof,
    /// if its provider binds that role's credentials (otherwise the
    /// request counts as unbound, for policy and for the record).
    pub(crate) fn effective_binding<'p>(&self, p: &'p LeaseParams) -> Option<&'p KeyBinding> {
        let entry = self.providers.get(&p.provider)?;
        match entry.provider.binding(&p.role) {
            BindingSupport::Unsupported => None,
            BindingSupport::Optional | BindingSupport::Required => p.binding.as_ref(),
        }
    }

    /// The lease record a request would write, its deadline the minimum of
    /// the requested TTL, the policy cap, the role's maximum and the task's
    /// deadline (invariant 2).
    pub(crate) fn prepare_lease(
        &self,
        w: &Workload,
        task: &TaskRecord,
        p: &LeaseParams,
        policy_cap: Option<Duration>,
    ) -> Result<Prepared, BrokerError> {
        let (entry, ttl, role_max) = self.check_credential(p)?;
        let now = self.clock.now();
        let mut expires_at = now
            .saturating_add(ttl)
            .min(now.saturating_add(role_max))
            .min(Timestamp::from_unix_millis(task.expires_at));
        if let Some(cap) = policy_cap {
            expires_at = expires_at.min(now.saturating_add(cap));
        }
        if expires_at.unix_millis() - now.unix_millis() < 1000 {
            return Err(BrokerError::conflict(
                "task_expired",
                "the task ends in less than a second",
            ));
        }
        let rec = LeaseRecord {
            id: LeaseId::generate(now).0,
            task_id: task.id,
            workload: w.id.clone(),
            tenant: w.tenant.clone(),
            on_behalf_of: task.on_behalf_of.clone(),
            provider: p.provider.clone(),
            role: p.role.clone(),
            scope: p.scope.clone(),
            requested_ttl_seconds: ttl.as_secs(),
            created_at: now.unix_millis(),
            issued_at: None,
            expires_at: expires_at.unix_millis(),
            state: LeaseState::Issuing,
            handle_sealed: None,
            description: None,
            revocation: None,
            ended_at: None,
        };
        let binding = self.effective_binding(p).cloned();
        Ok(Prepared {
            rec,
            entry,
            binding,
        })
    }

    /// Issue a prepared lease: intent, provider, activation (see the module
    /// docs). `check` runs in the intent's transaction before anything is
    /// written (so a refusal leaves nothing); `also` writes alongside the
    /// intent (the call record, the approval's use, their events).
    pub(crate) async fn issue_prepared(
        &self,
        w: &Workload,
        prepared: Prepared,
        ctx: &Ctx,
        check: TxnStep,
        also: TxnStep,
    ) -> Result<IssuedLease, BrokerError> {
        let Prepared {
            rec,
            entry,
            binding,
        } = prepared;
        let fence = crate::domain::fences::fence_keys(w, Some(&rec.on_behalf_of));
        // 2. the durable intent
        self.write_intent(&rec, fence.clone(), ctx, check, also)
            .await?;
        // 3. the provider
        let minted = self.mint_checked(&entry, &rec, binding, ctx).await?;
        #[cfg(feature = "fault-injection")]
        self.fault_pause_after_issue(&rec, &minted.0.credential)
            .await;
        // 4. activation, and 5. only then does the credential leave
        self.activate(w, &rec, &entry, minted, fence, ctx).await
    }

    /// Step 2: write the lease as `issuing` (with `check` before it and
    /// `also` after it, in the same transaction) and wait until durable.
    async fn write_intent(
        &self,
        rec: &LeaseRecord,
        fence: Vec<String>,
        ctx: &Ctx,
        check: TxnStep,
        also: TxnStep,
    ) -> Result<(), BrokerError> {
        let (intent, a, c) = (rec.clone(), self.auditor.clone(), ctx.clone());
        let (now_ms, cap) = (
            self.clock.now().unix_millis(),
            self.limits.max_leases_per_task,
        );
        // events are rendered here, not on the store's one writer thread
        let event = a.lease(&intent, &c, now_ms);
        let reads = crate::store::Reads::default()
            .lease(intent.id)
            .task(intent.task_id)
            .task_active(intent.task_id)
            .counters(&intent.provider);
        self.store
            .write_reading(reads, move |t| {
                t.refuse_fenced(&fence)?;
                check(t)?;
                t.lease_intent(&intent, now_ms, cap)?;
                also(t)?;
                audit::append(t, &a, event)
            })
            .await?;
        Ok(())
    }

    /// Step 3: the provider mints, within the provider timeout, a credential
    /// that does not outlive its lease; its revocation handle is sealed.
    /// Any failure is recorded (and rolled back) before it is returned.
    async fn mint_checked(
        &self,
        entry: &ProviderEntry,
        rec: &LeaseRecord,
        binding: Option<KeyBinding>,
        ctx: &Ctx,
    ) -> Result<(Issued, Vec<u8>), BrokerError> {
        let spec = LeaseSpec {
            binding,
            ..spec_of(rec)
        };
        let started = std::time::Instant::now();
        let result =
            tokio::time::timeout(self.provider_timeout(), self.mint(entry, rec, spec.clone()))
                .await;
        let class = match &result {
            Err(_) => Some("timeout"),
            Ok(r) => r.as_ref().err().map(crate::domain::reaper::error_class),
        };
        crate::metrics::provider_call(
            &rec.provider,
            "issue",
            started.elapsed().as_secs_f64(),
            class,
        );
        let issued = match result {
            Ok(Ok(issued)) if issued.expires_at <= spec.expires_at => issued,
            Ok(Ok(_)) => {
                return Err(self
                    .fail_issue(
                        rec,
                        "the provider returned a credential outliving its lease",
                        false,
                        ctx,
                    )
                    .await);
            }
            Ok(Err(e)) => {
                let invalid = e.class == ErrorClass::Invalid;
                let err = self
                    .fail_issue(rec, &e.message, e.is_retryable(), ctx)
                    .await;
                return Err(if invalid {
                    BrokerError::invalid("invalid_request", e.message)
                } else {
                    err
                });
            }
            Err(_) => {
                return Err(self
                    .fail_issue(rec, "the provider did not answer in time", true, ctx)
                    .await);
            }
        };
        match self
            .store
            .sealer()
            .seal(rec.id, "handle", issued.handle.as_bytes())
        {
            Ok(sealed) => Ok((issued, sealed)),
            Err(_) => Err(self
                .fail_issue(rec, "sealing the revocation handle failed", false, ctx)
                .await),
        }
    }

    /// Step 4: write the lease `active` and wait until durable; only then
    /// is the credential returned. If the activation cannot be recorded the
    /// credential is withheld and revoked.
    async fn activate(
        &self,
        w: &Workload,
        rec: &LeaseRecord,
        entry: &ProviderEntry,
        (issued, sealed): (Issued, Vec<u8>),
        fence: Vec<String>,
        ctx: &Ctx,
    ) -> Result<IssuedLease, BrokerError> {
        let (id, task_id) = (LeaseId(rec.id), TaskId(rec.task_id));
        let activation = Activation {
            lease: rec.id,
            handle_sealed: sealed,
            issued_at: rec.created_at,
            expires_at: issued.expires_at.unix_millis(),
            description: issued.description.clone(),
        };
        let now_ms = self.clock.now().unix_millis();
        let (a, c) = (self.auditor.clone(), ctx.clone());
        // the record activation makes of the intent, and its event
        let mut expected = rec.clone();
        activation.apply(&mut expected);
        let event = a.lease(&expected, &c, now_ms);
        let (workload, quota) = (
            rec.workload.clone(),
            self.settings.max_active_leases_per_workload,
        );
        let reads = crate::store::Reads::default()
            .lease(rec.id)
            .task(rec.task_id)
            .task_active(rec.task_id)
            .workload_active(&rec.workload)
            .counters(&rec.provider);
        let activated = self.store.write_reading(reads, move |t| {
            // a fence set while the provider was minting wins: rolled back
            t.refuse_fenced(&fence)?;
            // so does the workload's cap: activations are serialized (on
            // every node of a cluster), intents are not, so the cap on
            // active leases is exact here
            if t.workload_active(&workload)? >= quota {
                return Err(StoreError::Conflict(
                    crate::store::Conflict::WorkloadLeaseCap(quota),
                ));
            }
            let rec = t.activate(&activation, now_ms)?;
            // the stored record is the one rendered, unless the intent
            // changed meanwhile (then render what is stored)
            let event =
                audit::ahead_or(Some((expected, event)), &rec, || a.lease(&rec, &c, now_ms));
            audit::append(t, &a, event)?;
            Ok(rec)
        });
        match activated.await {
            Ok(active) => {
                self.wakers.lease_activated(active.expires_at);
                tracing::Span::current().record("lease", tracing::field::display(&id));
                tracing::info!(
                    lease_id = %id, task_id = %task_id, workload = %w.id,
                    provider = %rec.provider, role = %rec.role, expires_at = active.expires_at,
                    "lease issued"
                );
                // 5. only now does the credential leave
                Ok(IssuedLease {
                    lease: active,
                    credential: issued.credential,
                })
            }
            Err(StoreError::Conflict(c)) => {
                // the task closed, or a fence went up, while the provider was minting
                let detail = match c {
                    crate::store::Conflict::Fenced => "fenced before activation",
                    crate::store::Conflict::WorkloadLeaseCap(_) => {
                        "the workload reached its lease cap before activation"
                    }
                    _ => "the task closed before activation",
                };
                let err = BrokerError::from(StoreError::Conflict(c));
                self.fail_issue(rec, detail, false, ctx).await;
                Err(err)
            }
            Err(e) => {
                // Not recorded as active: take the credential back now; the
                // intent stays `issuing`, so recovery retries at next start.
                let revoke = RevokeSpec {
                    lease_id: id.to_string(),
                    role: rec.role.clone(),
                    expires_at: issued.expires_at,
                    handle: issued.handle.clone(),
                };
                if let Err(pe) = entry.provider.revoke(&revoke).await {
                    tracing::error!(lease_id = %id, error = %pe, "revoking an unrecorded credential failed; recovery will roll it back");
                }
                tracing::error!(lease_id = %id, error = %e, "activation failed; credential withheld and revoked");
                // record the failure if the store takes it; if not, the
                // intent stays and start-up recovery rolls it back
                self.fail_issue(rec, "activation could not be recorded", true, ctx)
                    .await;
                // a full disk is said as such (503 store_full)
                Err(BrokerError::from(e))
            }
        }
    }

    /// The provider's part of an issue: `prepare`, its handle stored
    /// (sealed) on the intent so a rollback can find it, then `issue`.
    async fn mint(
        &self,
        entry: &ProviderEntry,
        rec: &LeaseRecord,
        mut spec: LeaseSpec,
    ) -> Result<leasehold_provider::Issued, ProviderError> {
        if let Some(prepared) = entry.provider.prepare(&spec).await? {
            let sealed = self
                .store
                .sealer()
                .seal(rec.id, "handle", prepared.as_bytes())
                .map_err(|_| ProviderError::permanent("sealing the prepared handle failed"))?;
            let id = rec.id;
            self.store
                .write(move |t| t.record_prepared(id, &sealed))
                .await
                .map_err(|e| {
                    tracing::error!(lease_id = %LeaseId(id), error = %e, "recording the prepared handle failed");
                    ProviderError::retryable("the prepared handle could not be recorded")
                })?;
            spec.prepared = Some(prepared);
        }
        entry.provider.issue(&spec).await
    }

    /// The issue failed after the intent: queue a rollback (the provider may
    /// have created something before failing) and report the failure.
    async fn fail_issue(
        &self,
        rec: &LeaseRecord,
        detail: &str,
        retryable: bool,
        ctx: &Ctx,
    ) -> BrokerError {
        let (id, now) = (rec.id, self.clock.now().unix_millis());
        let msg = detail.to_owned();
        let (local, a, c) = (self.local.clone(), self.auditor.clone(), ctx.clone());
        let failed = self.store.write(move |t| {
            let r = t.issue_failed(id, &msg, now, &local)?;
            audit::append(t, &a, a.lease(&r, &c, now))
        });
        match failed.await {
            Ok(_) => self.wakers.revocations_queued(&rec.provider),
            Err(e) => {
                tracing::error!(lease_id = %LeaseId(id), error = %e, "recording a failed issue failed; recovery will roll it back")
            }
        }
        tracing::warn!(lease_id = %LeaseId(id), provider = %rec.provider, error = %detail, "issue failed; rollback queued");
        BrokerError::Provider {
            provider: rec.provider.clone(),
            retryable,
            detail: detail.to_owned(),
        }
    }

    #[cfg(feature = "fault-injection")]
    async fn fault_pause_after_issue(&self, rec: &LeaseRecord, credential: &Credential) {
        if let Some(path) = &self.faults.pause_after_issue_file {
            let body = serde_json::json!({
                "lease_id": LeaseId(rec.id).to_string(),
                "credential": credential.to_response_json(),
            });
            let _ = std::fs::write(path, body.to_string());
            std::future::pending::<()>().await;
        }
    }
}
