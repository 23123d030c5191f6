//! Decisions at the moment of action: tool calls, direct credential
//! requests, the approvals that gate them and break-glass.
//!
//! Every call is decided by policy against the task's context; an allowed
//! call that asks for a credential gets its lease in the same response,
//! TTL-capped by policy (and by the break-glass maximum). The decision, the
//! call record, the use of an approval and the lease intent commit in one
//! transaction with their events. Denials are recorded too.
//!
//! An approval binds the exact request (a hash of workload, task, tool,
//! action, target, arguments and credential), expires, is used once, and is
//! never granted by the workload or by an approver acting for themselves.
//! What a decision is made on, and when it may be the node's recent rows:
//! `facts.rs`.

mod facts;

use std::time::Duration;

use serde_json::json;

use crate::audit::{self, Ctx};
use crate::auth::Workload;
use crate::domain::issue::{IssuedLease, LeaseParams, TxnStep, no_step};
use crate::domain::{Broker, BrokerError, Denial};
use crate::ids::{ApprovalId, CallId, LeaseId, TaskId};
use crate::policy::{CallFacts, Decision, LeaseFacts, Now, Outcome, Principal, TaskFacts};
use crate::store::{
    ApprovalRecord, ApprovalState, CallRecord, Conflict, CredentialSpec, StoreError, TaskRecord,
};
use facts::{DecidedOn, Facts};
use leasehold_provider::KeyBinding;

/// A tool call to decide, decoded from the wire.
#[derive(Debug, Clone, Default)]
pub struct CallParams {
    pub tool: String,
    pub action: String,
    pub target: String,
    pub arguments_sha256: String,
    pub credential: Option<LeaseParams>,
    pub approval_id: Option<ApprovalId>,
    pub break_glass: Option<String>,
    /// With `credential`: use this active lease of the task (its provider
    /// and role) instead of minting another. The call is decided and
    /// recorded as any other, linked to the lease. What the egress proxy
    /// does while a lease it holds is live.
    pub reuse_lease: Option<LeaseId>,
}

/// What `decide` found, for the step that acts on it.
struct Decided {
    task: TaskRecord,
    workload_active: u64,
    /// Decided on the node's recent rows: what the intent checks.
    on: Option<DecidedOn>,
    tenant: String,
    decision: Decision,
    loaded: std::sync::Arc<crate::policy::Loaded>,
    call: CallRecord,
    action_name: &'static str,
    now: crate::clock::Timestamp,
}

/// What a decided call (or direct credential request) produced.
#[derive(Debug)]
pub enum CallOutcome {
    Allowed {
        call: CallRecord,
        lease: Option<IssuedLease>,
    },
    ApprovalRequired {
        call: CallRecord,
        approval: ApprovalRecord,
    },
}

pub fn principal(w: &Workload) -> Principal {
    Principal {
        id: w.id.clone(),
        issuer: w.issuer.clone(),
        tenant: w.tenant.clone().unwrap_or_default(),
        attributes: w.attributes.clone(),
    }
}

/// What a call or credential request asked, for its refusal's event.
pub(in crate::domain) fn asked_of(p: &CallParams, direct: bool) -> audit::EventData {
    let mut data = if direct {
        crate::event_data![("request", "lease")]
    } else {
        crate::event_data![
            ("request", "call"),
            ("tool", audit::text(&p.tool)),
            ("operation", audit::text(&p.action)),
            ("target", audit::text(&p.target))
        ]
    };
    if let Some(c) = &p.credential {
        data.insert("provider".into(), audit::text(&c.provider));
        data.insert("role".into(), audit::text(&c.role));
    }
    data
}

/// A decision's kind, as its metric names it.
fn kind(direct: bool) -> &'static str {
    if direct { "lease" } else { "call" }
}

/// The hash an approval is bound to.
fn request_hash(w: &str, task: u128, p: &CallParams) -> [u8; 32] {
    let v = json!({
        "workload": w,
        "task": TaskId(task).to_string(),
        "tool": p.tool,
        "action": p.action,
        "target": p.target,
        "arguments_sha256": p.arguments_sha256,
        "credential": p.credential.as_ref().map(|c| {
            let mut v = json!({
                "provider": c.provider, "role": c.role, "ttl_seconds": c.ttl_seconds, "scope": c.scope,
            });
            // an approval of a bound request holds for that key only (and
            // hashes of unbound requests stay as they were)
            if let Some(b) = &c.binding {
                v["binding"] = b.cnf();
            }
            v
        }),
    });
    let mut bytes = Vec::new();
    // strings, integers and nulls only: always canonical
    let _ = audit::canonical(&v, &mut bytes);
    audit::sha256(&bytes)
}

impl Broker {
    fn task_facts(&self, task: &TaskRecord, active: u64, now_ms: i64) -> TaskFacts {
        TaskFacts {
            id: TaskId(task.id).to_string(),
            purpose: task.purpose.clone(),
            declared_tools: task.tools.clone(),
            prompt_sha256: crate::hex::encode(&task.prompt_sha256),
            user: task.on_behalf_of.clone(),
            active_leases: active,
            lease_count: u64::from(task.lease_count),
            remaining_seconds: u64::try_from((task.expires_at - now_ms).max(0) / 1000).unwrap_or(0),
        }
    }

    /// Decide whether this workload may open this task (before it exists).
    pub(crate) fn decide_open_task(&self, w: &Workload, task: &TaskRecord, ttl: u64) -> Decision {
        let facts = self.task_facts(task, 0, task.created_at);
        self.policy.open_task(
            &principal(w),
            &facts,
            ttl,
            Now {
                unix: task.created_at.div_euclid(1000),
            },
        )
    }

    fn check_call_input(&self, p: &CallParams, direct: bool) -> Result<(), BrokerError> {
        if !direct {
            if !crate::check::is_tool_name(&p.tool) {
                return Err(BrokerError::invalid(
                    "invalid_request",
                    "`tool` must be 1-128 of [A-Za-z0-9._:/-]",
                ));
            }
            crate::check::text("action", &p.action, 128)?;
            if !self.policy.current().has_tool(&p.tool) {
                return Err(BrokerError::invalid(
                    "unknown_tool",
                    format!("no tool `{}` is registered with the policy set", p.tool),
                ));
            }
        }
        if p.target.len() > 512 || p.target.chars().any(char::is_control) {
            return Err(BrokerError::invalid(
                "invalid_request",
                "`resource` is at most 512 printable characters",
            ));
        }
        if !p.arguments_sha256.is_empty() && crate::hex::decode32(&p.arguments_sha256).is_none() {
            return Err(BrokerError::invalid(
                "invalid_request",
                "`arguments_sha256` must be 64 hex characters",
            ));
        }
        if let Some(j) = &p.break_glass {
            crate::check::text("break_glass.justification", j, 1024)?;
        }
        if let Some(c) = &p.credential {
            self.check_credential(c)?;
        }
        Ok(())
    }

    /// Decide a tool call and act on the decision.
    pub async fn call(
        &self,
        w: &Workload,
        task_id: TaskId,
        p: CallParams,
        ctx: &Ctx,
    ) -> Result<CallOutcome, BrokerError> {
        let result = self.decide_and_act(w, task_id, &p, ctx, false).await;
        if let Err(e) = &result {
            // what was asked is rendered only for a refusal, off the hot path
            self.refused_in_task(w, task_id, asked_of(&p, false), e, ctx)
                .await;
        }
        result
    }

    /// Record a refusal of a request that named `task_id`, linked to it
    /// when it is the workload's own.
    pub(in crate::domain) async fn refused_in_task(
        &self,
        w: &Workload,
        task_id: TaskId,
        mut asked: audit::EventData,
        e: &BrokerError,
        ctx: &Ctx,
    ) {
        if matches!(
            e,
            BrokerError::Denied(_)
                | BrokerError::Provider { .. }
                | BrokerError::Store(_)
                | BrokerError::StoreFull(_)
        ) {
            return;
        }
        let task = self
            .store
            .read()
            .ok()
            .and_then(|r| r.task(task_id.0).ok().flatten())
            .filter(|t| t.workload == w.id);
        if task.is_none() {
            asked.insert("task".into(), json!(task_id.to_string()));
        }
        self.record_refusal(w, task.as_ref(), asked, e, ctx).await;
    }

    /// Decide a call (or, `direct`, a credential request) and act on it:
    /// record a denial, ask for an approval, or issue what was allowed.
    pub(in crate::domain) async fn decide_and_act(
        &self,
        w: &Workload,
        task_id: TaskId,
        p: &CallParams,
        ctx: &Ctx,
        direct: bool,
    ) -> Result<CallOutcome, BrokerError> {
        self.check_call_input(p, direct)?;
        let now = self.clock.now();
        let cap = self.settings.max_active_leases_per_workload;
        if self.may_decide_on_recent(p)
            && let Some(f) = self.recent_facts(w, task_id, now.unix_millis())
        {
            let d = self.decide(w, p, direct, now, f)?;
            // acted on only if it allows: anything else is decided again,
            // on a snapshot, as is a decision whose facts changed since
            // (`facts.rs`)
            if d.decision.outcome == Outcome::Allow && d.workload_active < cap {
                match self.act_on(w, task_id, p, ctx, d).await {
                    Err(BrokerError::Store(StoreError::Conflict(Conflict::Stale))) => {}
                    done => {
                        crate::metrics::decision(kind(direct), Outcome::Allow.as_str());
                        return done;
                    }
                }
            }
        }
        let f = self.facts(w, task_id, now.unix_millis())?;
        let d = self.decide(w, p, direct, now, f)?;
        crate::metrics::decision(kind(direct), d.decision.outcome.as_str());
        self.act_on(w, task_id, p, ctx, d).await
    }

    /// Act on a decision: record a denial, ask for an approval, or issue
    /// what was allowed.
    async fn act_on(
        &self,
        w: &Workload,
        task_id: TaskId,
        p: &CallParams,
        ctx: &Ctx,
        d: Decided,
    ) -> Result<CallOutcome, BrokerError> {
        if d.decision.outcome == Outcome::Deny {
            return Err(self.record_denial(d, p, task_id, ctx).await);
        }
        let workload_active = d.workload_active;
        if p.credential.is_some()
            && p.reuse_lease.is_none()
            && workload_active >= self.settings.max_active_leases_per_workload
        {
            return Err(BrokerError::Quota {
                code: "workload_lease_cap",
                message: format!(
                    "the workload already holds {workload_active} active leases (cap {})",
                    self.settings.max_active_leases_per_workload
                ),
            });
        }
        // the hash an approval is bound to: only a call that needs or
        // brings an approval has use for it
        let hash = if d.decision.outcome == Outcome::ApprovalRequired || p.approval_id.is_some() {
            request_hash(&w.id, d.task.id, p)
        } else {
            [0; 32]
        };

        if d.decision.outcome == Outcome::ApprovalRequired && p.approval_id.is_none() {
            return self.request_approval(w, task_id, d, p, hash, ctx).await;
        }
        let on_behalf_of = p.break_glass.as_ref().map(|_| d.task.on_behalf_of.clone());
        let result = self.act_allowed(w, d, p, hash, ctx).await?;
        if let (Some(j), CallOutcome::Allowed { call, .. }) = (&p.break_glass, &result) {
            tracing::warn!(call_id = %CallId(call.id), task_id = %task_id, workload = %w.id, tool = %p.tool, "BREAK-GLASS call allowed");
            self.notifier.notify(json!({
                "type": "break_glass.used",
                "call_id": CallId(call.id).to_string(),
                "task_id": task_id.to_string(),
                "workload": w.id,
                "on_behalf_of": on_behalf_of,
                "tool": p.tool,
                "justification": j,
                "lease_id": call.lease_id.map(|l| LeaseId(l).to_string()),
            }));
        }
        Ok(result)
    }

    /// The decision on `facts` (the task, open): not fenced, policy's
    /// answer, and the call record it makes.
    fn decide(
        &self,
        w: &Workload,
        p: &CallParams,
        direct: bool,
        now: crate::clock::Timestamp,
        facts: Facts,
    ) -> Result<Decided, BrokerError> {
        let now_ms = now.unix_millis();
        let Facts {
            task,
            task_active,
            workload_active,
            on,
        } = facts;
        self.check_fence(w, Some(&task.on_behalf_of))?;
        let facts = self.task_facts(&task, task_active, now_ms);
        let who = principal(w);
        let when = Now {
            unix: now.unix_seconds(),
        };
        let lease_facts = p.credential.as_ref().map(|c| LeaseFacts {
            provider: c.provider.clone(),
            role: c.role.clone(),
            scope: c.scope.clone(),
            requested_ttl: u64::try_from(c.ttl_seconds).unwrap_or(0),
            binding: self.effective_binding(c).map(KeyBinding::method),
        });
        let decision = if direct {
            match &lease_facts {
                Some(l) => self.policy.lease(&who, &facts, l, workload_active, when),
                None => {
                    return Err(BrokerError::invalid(
                        "invalid_request",
                        "a credential is required",
                    ));
                }
            }
        } else {
            let facts_call = CallFacts {
                tool: p.tool.clone(),
                action: p.action.clone(),
                target: p.target.clone(),
                arguments_sha256: p.arguments_sha256.clone(),
                break_glass: p.break_glass.clone(),
                credential: lease_facts,
            };
            self.policy
                .call(&who, &facts, &facts_call, workload_active, when)
        };
        let loaded = self.policy.current();
        let call_id = CallId::generate(now);
        let action_name = if direct { "Lease" } else { "Call" };
        let call = CallRecord {
            id: call_id.0,
            task_id: task.id,
            workload: w.id.clone(),
            tool: p.tool.clone(),
            action: p.action.clone(),
            target: p.target.clone(),
            arguments_sha256: p.arguments_sha256.clone(),
            outcome: decision.outcome.as_str().to_owned(),
            policies: decision.policies.clone(),
            reasons: decision.reasons.clone(),
            max_ttl: decision.obligations.max_ttl,
            break_glass: p.break_glass.clone(),
            approval_id: p.approval_id.map(|a| a.0),
            lease_id: None,
            policy_version: decision.version.clone(),
            created_at: now_ms,
        };
        Ok(Decided {
            task,
            workload_active,
            on,
            tenant: who.tenant,
            decision,
            loaded,
            call,
            action_name,
            now,
        })
    }

    /// A denial is recorded (the call and its event) and answered.
    async fn record_denial(
        &self,
        d: Decided,
        p: &CallParams,
        task_id: TaskId,
        ctx: &Ctx,
    ) -> BrokerError {
        let Decided {
            task,
            tenant,
            decision,
            loaded,
            call,
            action_name,
            ..
        } = d;
        let a = self.auditor.clone();
        let call_id = CallId(call.id);
        let (c, t, cx) = (call.clone(), task.clone(), ctx.clone());
        let recorded = self
            .store
            .write(move |txn| {
                txn.put_call(&c)?;
                audit::append(txn, &a, a.decided(&t, &c, action_name, &cx))
            })
            .await;
        if let Err(e) = recorded {
            return e.into();
        }
        tracing::info!(call_id = %call_id, task_id = %task_id, tool = %p.tool, "call denied by policy");
        BrokerError::Denied(Box::new(Denial {
            action: action_name,
            call_id: Some(call_id.to_string()),
            policies: decision.visible_policies(&loaded, &tenant),
            reasons: decision.reasons,
        }))
    }

    /// A call that needs a human: the approval, bound to `hash`, is stored
    /// with the call, and approvers are notified.
    async fn request_approval(
        &self,
        w: &Workload,
        task_id: TaskId,
        d: Decided,
        p: &CallParams,
        hash: [u8; 32],
        ctx: &Ctx,
    ) -> Result<CallOutcome, BrokerError> {
        let Decided {
            task,
            decision,
            mut call,
            action_name,
            now,
            ..
        } = d;
        let now_ms = now.unix_millis();
        let a = self.auditor.clone();
        let approval = ApprovalRecord {
            id: ApprovalId::generate(now).0,
            task_id: task.id,
            workload: w.id.clone(),
            tenant: w.tenant.clone(),
            on_behalf_of: task.on_behalf_of.clone(),
            request_hash: hash,
            tool: p.tool.clone(),
            action: p.action.clone(),
            target: p.target.clone(),
            arguments_sha256: p.arguments_sha256.clone(),
            credential: p.credential.as_ref().map(|c| CredentialSpec {
                provider: c.provider.clone(),
                role: c.role.clone(),
                ttl_seconds: u64::try_from(c.ttl_seconds).unwrap_or(0),
                scope: c.scope.clone(),
            }),
            requested_by_call: call.id,
            policies: decision.policies.clone(),
            state: ApprovalState::Pending,
            created_at: now_ms,
            expires_at: now.saturating_add(self.settings.approval_ttl).unix_millis(),
            decided_by: None,
            decided_at: None,
            comment: None,
            consumed_by_call: None,
        };
        call.approval_id = Some(approval.id);
        let (c, t, ap, cx) = (call.clone(), task.clone(), approval.clone(), ctx.clone());
        self.store
            .write(move |txn| {
                txn.create_approval(&ap)?;
                txn.put_call(&c)?;
                audit::append(txn, &a, a.decided(&t, &c, action_name, &cx))?;
                audit::append(txn, &a, a.approval(&ap, &cx, now_ms))
            })
            .await?;
        self.wakers.expiry.notify_one();
        self.notifier.notify(json!({
                "type": "approval.requested",
                "approval_id": ApprovalId(approval.id).to_string(),
                "task_id": task_id.to_string(),
                "workload": w.id,
                "on_behalf_of": task.on_behalf_of,
                "tool": p.tool,
                "action": p.action,
                "resource": p.target,
                "credential": p.credential.as_ref().map(|c| format!("{}/{}", c.provider, c.role)),
                "expires_at": crate::clock::rfc3339(crate::clock::Timestamp::from_unix_millis(approval.expires_at)),
                "policies": decision.policies,
            }));
        Ok(CallOutcome::ApprovalRequired { call, approval })
    }

    /// An allowed (or approved) call: the approval is used, the call and
    /// any break-glass review recorded, and its credential issued, all with
    /// the lease intent in one transaction.
    async fn act_allowed(
        &self,
        w: &Workload,
        d: Decided,
        p: &CallParams,
        hash: [u8; 32],
        ctx: &Ctx,
    ) -> Result<CallOutcome, BrokerError> {
        let Decided {
            task,
            decision,
            mut call,
            action_name,
            now,
            on,
            ..
        } = d;
        let now_ms = now.unix_millis();
        // allowed (or approved): use the approval, record the call, break-glass
        call.outcome = Outcome::Allow.as_str().to_owned();
        let approval = p.approval_id;
        let approved: TxnStep = match approval {
            Some(aid) => Box::new(move |txn| txn.check_approval(aid.0, &hash, now_ms)),
            None => no_step(),
        };
        // decided on the node's recent rows: still so, or decided again
        let check: TxnStep = match on {
            Some(on) => {
                let on = on.step();
                Box::new(move |txn| {
                    on(txn)?;
                    approved(txn)
                })
            }
            None => approved,
        };
        let bg = p.break_glass.clone();
        let make_also = |call: CallRecord| -> TxnStep {
            let (a, t, cx) = (self.auditor.clone(), task.clone(), ctx.clone());
            let bg = bg.clone();
            // rendered here, not on the store's one writer thread
            let decided = a.decided(&t, &call, action_name, &cx);
            Box::new(move |txn| {
                if let Some(aid) = approval {
                    let used = txn.consume_approval(aid.0, &hash, call.id, now_ms)?;
                    audit::append(txn, &a, a.approval(&used, &cx, now_ms))?;
                }
                txn.put_call(&call)?;
                audit::append(txn, &a, decided)?;
                if let Some(j) = bg {
                    let review = txn.flag_review(&t, (call.id, call.tool.clone(), j, now_ms))?;
                    audit::append(txn, &a, a.break_glass(&review, false, &cx, now_ms))?;
                }
                Ok(())
            })
        };
        let result = match &p.credential {
            Some(c) if p.reuse_lease.is_some() => {
                let lease = p.reuse_lease.map_or(0, |l| l.0);
                call.lease_id = Some(lease);
                let also = make_also(call.clone());
                let fence = crate::domain::fences::fence_keys(w, Some(&task.on_behalf_of));
                let (task_id, provider, role) = (task.id, c.provider.clone(), c.role.clone());
                self.store
                    .write(move |txn| {
                        txn.refuse_fenced(&fence)?;
                        reusable(txn, lease, task_id, &provider, &role, now_ms)?;
                        check(txn)?;
                        also(txn)
                    })
                    .await?;
                CallOutcome::Allowed { call, lease: None }
            }
            Some(c) => {
                let mut cap = decision.obligations.max_ttl.map(Duration::from_secs);
                if p.break_glass.is_some() {
                    cap = Some(cap.map_or(self.settings.break_glass_max_ttl, |c| {
                        c.min(self.settings.break_glass_max_ttl)
                    }));
                }
                let prepared = self.prepare_lease(w, &task, c, cap)?;
                call.lease_id = Some(prepared.rec.id);
                let also = make_also(call.clone());
                let issued = self.issue_prepared(w, prepared, ctx, check, also).await?;
                CallOutcome::Allowed {
                    call,
                    lease: Some(issued),
                }
            }
            None => {
                let also = make_also(call.clone());
                let fence = crate::domain::fences::fence_keys(w, Some(&task.on_behalf_of));
                self.store
                    .write(move |txn| {
                        txn.refuse_fenced(&fence)?;
                        check(txn)?;
                        also(txn)
                    })
                    .await?;
                CallOutcome::Allowed { call, lease: None }
            }
        };
        Ok(result)
    }
}

/// A lease a call may reuse: this task's, of this provider and role, active
/// and unexpired, read in the transaction that records the call (a
/// revocation or expiry committed first refuses it).
fn reusable(
    txn: &mut crate::store::Txn<'_>,
    lease: u128,
    task: u128,
    provider: &str,
    role: &str,
    now_ms: i64,
) -> Result<(), crate::store::StoreError> {
    use crate::store::{Conflict, LeaseState, StoreError};
    let l = txn
        .lease(lease)?
        .filter(|l| l.task_id == task && l.provider == provider && l.role == role)
        .ok_or(StoreError::Conflict(Conflict::LeaseNotFound))?;
    if l.state != LeaseState::Active {
        return Err(StoreError::Conflict(Conflict::LeaseState(l.state)));
    }
    if l.expires_at <= now_ms {
        return Err(StoreError::Conflict(Conflict::LeaseState(
            LeaseState::Expired,
        )));
    }
    Ok(())
}
