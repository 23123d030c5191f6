//! Tasks: open, show, complete.
//!
//! A task is the unit everything else hangs from: its deadline bounds every
//! lease under it, and completing it revokes every lease before the response
//! is sent. Visibility: a workload sees only its own tasks (others' are
//! `404`, not `403`, so ids cannot be probed); admins see all.

use std::collections::HashMap;

use crate::audit::{self, Ctx};
use crate::auth::{Caller, Workload};
use crate::config::OperatorRole;
use crate::domain::{Broker, BrokerError};
use crate::ids::TaskId;
use crate::store::{
    LeaseRecord, LeaseState, RevokeCause, TaskRecord, TaskState, Why, local_revocation,
    queued_revocation,
};

type Rendered = Result<audit::Pending, audit::CanonicalError>;

/// Events of a completion rendered ahead (`Broker::completion_events`).
struct CompletionEvents {
    leases: HashMap<u128, (LeaseRecord, Rendered)>,
    task: (TaskRecord, (usize, usize), Rendered),
}

/// A request to open a task, already decoded from the wire.
#[derive(Debug, Clone)]
pub struct OpenTask {
    pub purpose: String,
    pub on_behalf_of: String,
    pub prompt: Option<String>,
    pub prompt_sha256: Option<String>,
    pub tools: Vec<String>,
    pub ttl_seconds: i64,
}

/// A task as its owner or an admin reads it.
#[derive(Debug)]
pub struct TaskDetail {
    pub task: TaskRecord,
    pub calls: Vec<crate::store::records::CallRecord>,
    pub leases: Vec<LeaseRecord>,
}

/// What completing a task did.
#[derive(Debug)]
pub struct CompletionReport {
    pub task: TaskRecord,
    /// Leases this completion revoked (now terminal).
    pub revoked: Vec<LeaseRecord>,
    /// Leases still being revoked (provider failed; retried by the queue).
    pub pending: Vec<LeaseRecord>,
}

impl Broker {
    /// Open a task; a refusal other than policy's (a fence, bad input) is
    /// recorded as `request.refused`.
    pub async fn open_task(
        &self,
        w: &Workload,
        req: OpenTask,
        ctx: &Ctx,
    ) -> Result<TaskRecord, BrokerError> {
        let result = self.open_task_unrecorded(w, req, ctx).await;
        if let Err(e) = &result {
            let asked = crate::event_data![("request", "open_task")];
            self.record_refusal(w, None, asked, e, ctx).await;
        }
        result
    }

    async fn open_task_unrecorded(
        &self,
        w: &Workload,
        req: OpenTask,
        ctx: &Ctx,
    ) -> Result<TaskRecord, BrokerError> {
        // the one form self-approval, fences, selectors and the chain compare
        let mut req = req;
        req.on_behalf_of = crate::check::user("on_behalf_of", &req.on_behalf_of)?;
        let (ttl, tools) = self.check_open_task(w, &req)?;
        let prompt_sha256 = self.prompt_digest(&req)?;
        let now = self.clock.now();
        let id = TaskId::generate(now);
        let prompt_sealed = match (&req.prompt, self.limits.store_prompt_text) {
            (Some(p), true) => Some(
                self.store
                    .sealer()
                    .seal(id.0, "prompt", p.as_bytes())
                    .map_err(|_| {
                        BrokerError::Store(crate::store::StoreError::Corrupt(
                            "sealing failed".into(),
                        ))
                    })?,
            ),
            _ => None,
        };
        let rec = TaskRecord {
            id: id.0,
            workload: w.id.clone(),
            tenant: w.tenant.clone(),
            purpose: req.purpose,
            on_behalf_of: req.on_behalf_of,
            prompt_sha256,
            prompt_sealed,
            tools,
            created_at: now.unix_millis(),
            expires_at: now.saturating_add(ttl).unix_millis(),
            state: TaskState::Open,
            completed_at: None,
            lease_count: 0,
        };
        let decision = self.decide_open_task(w, &rec, ttl.as_secs());
        crate::metrics::decision("open_task", decision.outcome.as_str());
        let (stored, a, ctx) = (rec.clone(), self.auditor.clone(), ctx.clone());
        if decision.outcome != crate::policy::Outcome::Allow {
            return Err(self.refuse_task(w, stored, decision, &ctx).await);
        }
        let fence = crate::domain::fences::fence_keys(w, Some(&rec.on_behalf_of));
        // rendered here, not on the store's one writer thread
        let event = a.task_opened(&stored, &decision.policies, &ctx);
        // its count of active leases (none) is named too: read under the
        // lock, the node then knows it for the task's first lease decision
        // (`Store::read_recent`)
        let reads = crate::store::Reads::default()
            .task(rec.id)
            .task_active(rec.id);
        self.store
            .write_reading(reads, move |t| {
                t.refuse_fenced(&fence)?;
                t.create_task(&stored)?;
                audit::append(t, &a, event)
            })
            .await?;
        tracing::debug!(task_id = %id, workload = %w.id, "task opened");
        Ok(rec)
    }

    /// The request's own checks (text, TTL, tools) and the fence; the
    /// TTL and the sorted, distinct tools.
    fn check_open_task(
        &self,
        w: &Workload,
        req: &OpenTask,
    ) -> Result<(std::time::Duration, Vec<String>), BrokerError> {
        crate::check::text("purpose", &req.purpose, 512)?;
        crate::check::text("on_behalf_of", &req.on_behalf_of, 256)?;
        self.check_fence(w, Some(&req.on_behalf_of))?;
        let ttl = crate::check::ttl(
            "ttl_seconds",
            req.ttl_seconds,
            self.limits.max_task_ttl_seconds,
        )?;
        if req.tools.len() > self.limits.max_tools {
            return Err(BrokerError::invalid(
                "invalid_request",
                format!("`tools` lists more than {} tools", self.limits.max_tools),
            ));
        }
        if let Some(t) = req.tools.iter().find(|t| !crate::check::is_tool_name(t)) {
            return Err(BrokerError::invalid(
                "invalid_request",
                format!(
                    "`tools`: `{}` is not a tool name (1-128 of [A-Za-z0-9._:/-])",
                    t.escape_default()
                ),
            ));
        }
        let mut tools = req.tools.clone();
        tools.sort();
        tools.dedup();
        Ok((ttl, tools))
    }

    /// What the task records of its prompt: the SHA-256 of the text, or
    /// the digest sent instead of it (never both, never neither).
    fn prompt_digest(&self, req: &OpenTask) -> Result<[u8; 32], BrokerError> {
        Ok(match (&req.prompt, &req.prompt_sha256) {
            (Some(_), Some(_)) => {
                return Err(BrokerError::invalid(
                    "invalid_request",
                    "send `prompt` or `prompt_sha256`, not both",
                ));
            }
            (None, None) => {
                return Err(BrokerError::invalid(
                    "invalid_request",
                    "`prompt` or `prompt_sha256` is required: the task records what it was asked to do",
                ));
            }
            (Some(p), None) => {
                if p.len() > self.limits.max_prompt_bytes {
                    return Err(BrokerError::invalid(
                        "invalid_request",
                        format!(
                            "`prompt` is longer than {} bytes",
                            self.limits.max_prompt_bytes
                        ),
                    ));
                }
                let d = ring::digest::digest(&ring::digest::SHA256, p.as_bytes());
                let mut h = [0u8; 32];
                h.copy_from_slice(d.as_ref());
                h
            }
            (None, Some(h)) => crate::hex::decode32(h).ok_or_else(|| {
                BrokerError::invalid(
                    "invalid_request",
                    "`prompt_sha256` must be 64 hex characters",
                )
            })?,
        })
    }

    /// A task policy did not allow: the refusal goes on the chain, and the
    /// caller gets the decision (opening cannot wait for an approval).
    async fn refuse_task(
        &self,
        w: &Workload,
        stored: TaskRecord,
        decision: crate::policy::Decision,
        ctx: &Ctx,
    ) -> BrokerError {
        let a = self.auditor.clone();
        let (d, c) = (decision.clone(), ctx.clone());
        let recorded = self
            .store
            .write(move |t| audit::append(t, &a, a.task_refused(&stored, &d, &c)))
            .await;
        if let Err(e) = recorded {
            return e.into();
        }
        let loaded = self.policy.current();
        let mut reasons = decision.reasons.clone();
        if decision.outcome == crate::policy::Outcome::ApprovalRequired {
            reasons.push(
                "opening a task cannot wait for an approval; ask for approval on the call".into(),
            );
        }
        BrokerError::Denied(Box::new(crate::domain::Denial {
            action: "OpenTask",
            call_id: None,
            policies: decision.visible_policies(&loaded, w.tenant.as_deref().unwrap_or("")),
            reasons,
        }))
    }

    /// The events completing `task` will append if nothing changes before
    /// the writer gets to it (the leases active now revoked or queued, then
    /// the task completed), rendered here rather than on the store's one
    /// writer thread, each with the record it was rendered from.
    fn completion_events(
        &self,
        r: &crate::store::Reader,
        mut task: TaskRecord,
        now: i64,
        claim_until: i64,
        ctx: &Ctx,
    ) -> Result<CompletionEvents, BrokerError> {
        let why = Why::of(RevokeCause::TaskComplete);
        let a = &self.auditor;
        let mut leases = HashMap::new();
        let (mut revoked, mut claimed) = (0, 0);
        for rec in r.task_leases(task.id)? {
            if rec.state != LeaseState::Active {
                continue;
            }
            let rec = if self.local.contains(&rec.provider) {
                revoked += 1;
                local_revocation(rec, why, now)
            } else {
                claimed += 1;
                queued_revocation(rec, why, now, claim_until)
            };
            let event = a.lease(&rec, ctx, now);
            leases.insert(rec.id, (rec, event));
        }
        task.state = TaskState::Completed;
        task.completed_at = Some(now);
        let event = a.task_completed(&task, revoked, claimed, ctx);
        Ok(CompletionEvents {
            leases,
            task: (task, (revoked, claimed), event),
        })
    }

    /// Read a task the caller may see.
    pub fn visible_task(&self, caller: &Caller, id: TaskId) -> Result<TaskRecord, BrokerError> {
        Self::visible_task_in(&self.store.read()?, caller, id)
    }

    /// [`Broker::visible_task`] in the snapshot `r`.
    fn visible_task_in(
        r: &crate::store::Reader,
        caller: &Caller,
        id: TaskId,
    ) -> Result<TaskRecord, BrokerError> {
        let task = r.task(id.0)?.ok_or(BrokerError::NotFound {
            code: "task_not_found",
        })?;
        let visible = match caller {
            Caller::Workload(w) => w.id == task.workload,
            Caller::Operator(_) => caller.has_any_role(&[OperatorRole::Admin]),
        };
        if visible {
            Ok(task)
        } else if matches!(caller, Caller::Operator(_)) {
            Err(BrokerError::Forbidden {
                code: "forbidden",
                message: "reading tasks needs the admin role".into(),
            })
        } else {
            Err(BrokerError::NotFound {
                code: "task_not_found",
            })
        }
    }

    /// The task with its calls and leases (never a credential), read
    /// from one snapshot.
    pub fn get_task(&self, caller: &Caller, id: TaskId) -> Result<TaskDetail, BrokerError> {
        let task = self.visible_task(caller, id)?;
        let r = self.store.read()?;
        Ok(TaskDetail {
            calls: r.task_calls(id.0)?,
            leases: r.task_leases(id.0)?,
            task,
        })
    }

    /// Close the task and revoke every lease under it before answering.
    pub async fn complete_task(
        &self,
        w: &Workload,
        id: TaskId,
        ctx: &Ctx,
    ) -> Result<CompletionReport, BrokerError> {
        let caller = Caller::Workload(std::sync::Arc::new(w.clone()));
        // the task and its leases: whose task it is never changes, and
        // they are read only to render events ahead, which the write
        // checks against what it stores. So what this node committed of
        // them lately will do (on PostgreSQL: no round trip); else one
        // snapshot (begun, fetched and ended in one round trip)
        let reads = crate::store::Reads::default()
            .task(id.0)
            .leases_of_task(id.0)
            .and_nothing_else();
        let r = match self.store.read_recent(&reads) {
            Some(r) => r,
            None => {
                let r = self.store.read()?;
                r.prefetch(&reads)?;
                r
            }
        };
        let task = Self::visible_task_in(&r, &caller, id)?;
        let now = self.clock.now().unix_millis();
        let claim_until = now.saturating_add(self.claim_window_ms());
        let (local, a, c) = (self.local.clone(), self.auditor.clone(), ctx.clone());
        let mut ahead = self.completion_events(&r, task, now, claim_until, ctx)?;
        drop(r);
        // what completing reads: the task, its leases, the denylist's
        // entries of its token leases, and the counts its active leases
        // leave
        let reads = ahead.leases.values().fold(
            crate::store::Reads::default()
                .task(id.0)
                .task_leases(id.0)
                .task_active(id.0),
            |r, (l, _)| {
                r.lease(l.id)
                    .denied(l.id)
                    .workload_active(&l.workload)
                    .counters(&l.provider)
            },
        );
        let completion = self
            .store
            .write_reading(reads, move |t| {
                let done = t.complete_task(id.0, now, claim_until, &local)?;
                // each event rendered ahead is used only if the record it
                // was rendered from is the one stored
                for l in done.revoked.iter().chain(done.claimed.iter()) {
                    let event =
                        audit::ahead_or(ahead.leases.remove(&l.id), l, || a.lease(l, &c, now));
                    audit::append(t, &a, event)?;
                }
                let (r, q) = (done.revoked.len(), done.claimed.len());
                let (task, counts, event) = ahead.task;
                let ahead = (counts == (r, q)).then_some((task, event));
                let event =
                    audit::ahead_or(ahead, &done.task, || a.task_completed(&done.task, r, q, &c));
                audit::append(t, &a, event)?;
                Ok(done)
            })
            .await?;
        let done = self.revoke_claimed(completion.claimed, ctx).await;
        let mut revoked = completion.revoked;
        let mut pending = Vec::new();
        for rec in done {
            if rec.state.is_terminal() {
                revoked.push(rec);
            } else {
                pending.push(rec);
            }
        }
        // leases that were already being revoked (expiry, manual) before
        for rec in completion.all {
            if matches!(rec.state, LeaseState::Revoking | LeaseState::Irrevocable)
                && !revoked.iter().chain(pending.iter()).any(|r| r.id == rec.id)
            {
                pending.push(rec);
            }
        }
        tracing::debug!(task_id = %id, revoked = revoked.len(), pending = pending.len(), "task completed");
        Ok(CompletionReport {
            task: completion.task,
            revoked,
            pending,
        })
    }
}
