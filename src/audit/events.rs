//! The events of the lifecycle, built from the records they describe, and
//! appended inside the transaction that changes those records.

use base64::Engine as _;
use serde_json::Value;

use super::{Auditor, EventKind, Links, Pending};
use crate::clock::{Timestamp, rfc3339};
use crate::event_data;
use crate::ids::{ApprovalId, CallId};
use crate::ids::{LeaseId, TaskId};
use crate::store::{
    ApprovalRecord, ApprovalState, CallRecord, LeaseRecord, LeaseState, ReviewRecord, StoreError,
    TaskRecord, Txn,
};

/// Who and which request caused an event.
#[derive(Clone, Debug, Default)]
pub struct Ctx {
    pub request_id: Option<String>,
    /// `workload:<id>` or `operator:<name>`, when someone asked.
    pub actor: Option<String>,
    /// The egress proxy that made the request for the workload, and the
    /// proxy credential it was shown: recorded with the decision.
    pub via: Option<Via>,
}

/// A request a proxy made on a workload's behalf (`leasehold proxy`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Via {
    /// The proxy's operator name.
    pub proxy: String,
    /// The id of the proxy credential the assistant presented.
    pub credential: String,
}

impl Ctx {
    pub fn request(request_id: Option<String>, actor: String) -> Self {
        Self {
            request_id,
            actor: Some(actor),
            via: None,
        }
    }

    /// Work the broker does on its own (expiry, retries, recovery).
    pub fn system() -> Self {
        Self::default()
    }
}

fn ms(t: i64) -> Timestamp {
    Timestamp::from_unix_millis(t)
}

/// An event rendered ahead of its transaction (off the store's one writer
/// thread) from the record the transaction was expected to store: it is
/// used only if `stored` is that record; otherwise the event is rendered
/// again from what was stored.
pub fn ahead_or<R: PartialEq, E>(
    ahead: Option<(R, E)>,
    stored: &R,
    render: impl FnOnce() -> E,
) -> E {
    match ahead {
        Some((expected, event)) if expected == *stored => event,
        _ => render(),
    }
}

/// Append `event` in this transaction, or fail the transaction. Appending
/// cannot be skipped: a state change whose event cannot be recorded does not
/// commit (fail closed).
pub fn append(
    t: &mut Txn<'_>,
    auditor: &Auditor,
    event: Result<Pending, super::CanonicalError>,
) -> Result<(), StoreError> {
    if !auditor.enabled() {
        return Ok(());
    }
    let event = event.map_err(|e| t.fail(&format!("event not recordable: {e}")))?;
    if auditor.injected_failure(event.kind) {
        return Err(t.fail("injected event append failure"));
    }
    t.append(&event).map(|_| ())
}

impl Auditor {
    fn task_links(&self, task: &TaskRecord, ctx: &Ctx) -> Links {
        Links {
            workload: Some(self.workload(&task.workload)),
            tenant: task.tenant.as_deref().map(|t| self.tenant(t)),
            task: Some(TaskId(task.id).to_string()),
            request_id: ctx.request_id.clone(),
            user: Some(self.user(&task.on_behalf_of)),
            ..Links::default()
        }
    }

    fn lease_links(&self, l: &LeaseRecord, ctx: &Ctx) -> Links {
        Links {
            job: l
                .revocation
                .as_ref()
                .and_then(|r| r.job)
                .map(|j| crate::ids::JobId(j).to_string()),
            workload: Some(self.workload(&l.workload)),
            tenant: l.tenant.as_deref().map(|t| self.tenant(t)),
            task: Some(TaskId(l.task_id).to_string()),
            lease: Some(LeaseId(l.id).to_string()),
            request_id: ctx.request_id.clone(),
            user: Some(self.user(&l.on_behalf_of)),
            provider: Some(l.provider.clone()),
            role: Some(l.role.clone()),
            ..Links::default()
        }
    }

    /// `task.opened`: purpose, prompt hash (and the sealed prompt text, only
    /// when configured), declared tools, deadline.
    pub fn task_opened(
        &self,
        task: &TaskRecord,
        policies: &[String],
        ctx: &Ctx,
    ) -> Result<Pending, super::CanonicalError> {
        let mut data = event_data![
            ("purpose", self.purpose(&task.purpose)),
            ("prompt_sha256", crate::hex::encode(&task.prompt_sha256)),
            ("tools", Value::from(task.tools.clone())),
            ("expires_at", rfc3339(ms(task.expires_at))),
            ("policies", Value::from(policies.to_vec())),
        ];
        if let Some(sealed) = &task.prompt_sealed {
            // ciphertext under the store key: readable only with it
            data.insert(
                "prompt_sealed".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(sealed)),
            );
        }
        if let Some(a) = &ctx.actor {
            data.insert("by".into(), Value::String(a.clone()));
        }
        Pending::new(
            EventKind::TaskOpened,
            ms(task.created_at),
            &self.task_links(task, ctx),
            data,
            Some(task.id),
        )
    }

    /// `proxy.credential_issued`: the task's assistant got a credential
    /// for `leasehold proxy` (its id and end; never the credential).
    pub fn proxy_credential(
        &self,
        task: &TaskRecord,
        id: &str,
        expires_at: i64,
        now: i64,
        ctx: &Ctx,
    ) -> Result<Pending, super::CanonicalError> {
        let data = event_data![
            ("proxy_credential", id),
            ("expires_at", rfc3339(ms(expires_at)))
        ];
        Pending::new(
            EventKind::ProxyCredentialIssued,
            ms(now),
            &self.task_links(task, ctx),
            data,
            Some(task.id),
        )
    }

    pub fn task_completed(
        &self,
        task: &TaskRecord,
        revoked: usize,
        pending: usize,
        ctx: &Ctx,
    ) -> Result<Pending, super::CanonicalError> {
        let data = event_data![("revoked", revoked as u64), ("pending", pending as u64)];
        let time = ms(task.completed_at.unwrap_or(task.created_at));
        Pending::new(
            EventKind::TaskCompleted,
            time,
            &self.task_links(task, ctx),
            data,
            Some(task.id),
        )
    }

    /// The event a lease's new state calls for.
    pub fn lease(
        &self,
        l: &LeaseRecord,
        ctx: &Ctx,
        now: i64,
    ) -> Result<Pending, super::CanonicalError> {
        let rv = l.revocation.as_ref();
        let kind = match l.state {
            LeaseState::Issuing => EventKind::LeaseIssuing,
            LeaseState::Active => EventKind::LeaseIssued,
            LeaseState::Revoking if rv.is_some_and(|r| r.attempts > 0) => {
                EventKind::RevocationRetried
            }
            LeaseState::Revoking => EventKind::LeaseRevoking,
            LeaseState::Irrevocable => EventKind::LeaseIrrevocable,
            LeaseState::Revoked | LeaseState::Expired => EventKind::LeaseRevoked,
            LeaseState::RolledBack => EventKind::LeaseRolledBack,
            LeaseState::Abandoned => EventKind::LeaseAbandoned,
        };
        let mut data = event_data![
            ("state", l.state.as_str()),
            ("expires_at", rfc3339(ms(l.expires_at)))
        ];
        match l.state {
            LeaseState::Issuing => {
                data.insert("scope".into(), Value::from(l.scope.clone()));
                data.insert(
                    "requested_ttl_seconds".into(),
                    Value::from(l.requested_ttl_seconds),
                );
            }
            LeaseState::Active => {
                data.insert("scope".into(), Value::from(l.scope.clone()));
                if let Some(d) = &l.description {
                    data.insert("description".into(), super::text(d));
                }
            }
            // how it was revoked, when the provider said (see `Outcome::Done`)
            s if s.is_terminal() => {
                if let Some(how) = l
                    .description
                    .as_deref()
                    .and_then(|d| d.rsplit_once("revoked: "))
                {
                    data.insert("revoked_by".into(), super::text(how.1));
                }
            }
            _ => {}
        }
        if let Some(r) = rv {
            data.insert("cause".into(), Value::from(r.cause.as_str()));
            if let Some(j) = r.job {
                data.insert("job".into(), Value::from(crate::ids::JobId(j).to_string()));
            }
            data.insert("attempts".into(), Value::from(r.attempts));
            if let Some(by) = &r.requested_by {
                data.insert("requested_by".into(), Value::from(by.clone()));
            }
            if let Some(e) = &r.last_error {
                data.insert("error".into(), super::text(e));
            }
            if !l.state.is_terminal() {
                data.insert(
                    "next_attempt_at".into(),
                    Value::from(rfc3339(ms(r.next_attempt_at))),
                );
            }
        }
        Pending::new(
            kind,
            ms(now),
            &self.lease_links(l, ctx),
            data,
            Some(l.task_id),
        )
    }

    /// `call.decided`: a decision on a call, a direct lease or a task,
    /// with the policies that determined it and what they oblige.
    pub fn decided(
        &self,
        task: &TaskRecord,
        call: &CallRecord,
        action: &str,
        ctx: &Ctx,
    ) -> Result<Pending, super::CanonicalError> {
        let mut links = self.task_links(task, ctx);
        links.call = Some(CallId(call.id).to_string());
        links.decision = Some(CallId(call.id).to_string());
        links.approval = call.approval_id.map(|a| ApprovalId(a).to_string());
        links.lease = call.lease_id.map(|l| LeaseId(l).to_string());
        let mut data = event_data![
            ("action", action),
            ("tool", call.tool.clone()),
            ("operation", super::text(&call.action)),
            ("target", super::text(&call.target)),
            ("arguments_sha256", call.arguments_sha256.clone()),
            ("outcome", call.outcome.clone()),
            ("policies", Value::from(call.policies.clone())),
            (
                "reasons",
                Value::from(
                    call.reasons
                        .iter()
                        .map(|r| super::text(r))
                        .collect::<Vec<_>>()
                )
            ),
            ("policy_version", call.policy_version.clone()),
        ];
        if let Some(t) = call.max_ttl {
            data.insert("max_ttl".into(), Value::from(t));
        }
        if let Some(j) = &call.break_glass {
            data.insert("break_glass".into(), super::text(j));
        }
        if let Some(v) = &ctx.via {
            data.insert(
                "via".into(),
                serde_json::json!({"proxy": v.proxy, "proxy_credential": v.credential}),
            );
        }
        Pending::new(
            EventKind::CallDecided,
            ms(call.created_at),
            &links,
            data,
            Some(task.id),
        )
    }

    /// `call.decided` for a task that policy refused to open (the task was
    /// never created; the event keeps the refusal).
    pub fn task_refused(
        &self,
        task: &TaskRecord,
        d: &crate::policy::Decision,
        ctx: &Ctx,
    ) -> Result<Pending, super::CanonicalError> {
        let mut links = self.task_links(task, ctx);
        links.task = None;
        let data = event_data![
            ("action", "OpenTask"),
            ("outcome", d.outcome.as_str()),
            ("policies", Value::from(d.policies.clone())),
            (
                "reasons",
                Value::from(d.reasons.iter().map(|r| super::text(r)).collect::<Vec<_>>())
            ),
            ("purpose", self.purpose(&task.purpose)),
            ("policy_version", d.version.clone()),
        ];
        Pending::new(
            EventKind::CallDecided,
            ms(task.created_at),
            &links,
            data,
            None,
        )
    }

    /// `approval.requested|approved|consumed|denied|expired`, by the
    /// approval's state.
    pub fn approval(
        &self,
        a: &ApprovalRecord,
        ctx: &Ctx,
        now: i64,
    ) -> Result<Pending, super::CanonicalError> {
        let kind = match a.state {
            ApprovalState::Pending => EventKind::ApprovalRequested,
            ApprovalState::Approved => EventKind::ApprovalApproved,
            ApprovalState::Consumed => EventKind::ApprovalConsumed,
            ApprovalState::Denied => EventKind::ApprovalDenied,
            ApprovalState::Expired => EventKind::ApprovalExpired,
        };
        let links = Links {
            workload: Some(self.workload(&a.workload)),
            tenant: a.tenant.as_deref().map(|t| self.tenant(t)),
            task: Some(TaskId(a.task_id).to_string()),
            call: Some(CallId(a.requested_by_call).to_string()),
            approval: Some(ApprovalId(a.id).to_string()),
            request_id: ctx.request_id.clone(),
            user: Some(self.user(&a.on_behalf_of)),
            ..Links::default()
        };
        let mut data = event_data![
            ("state", a.state.as_str()),
            ("tool", a.tool.clone()),
            ("target", super::text(&a.target)),
            ("request_sha256", crate::hex::encode(&a.request_hash)),
            ("expires_at", rfc3339(ms(a.expires_at))),
        ];
        if let Some(by) = &a.decided_by {
            data.insert("decided_by".into(), Value::from(by.clone()));
        }
        if let Some(c) = &a.comment {
            data.insert("comment".into(), super::text(c));
        }
        Pending::new(kind, ms(now), &links, data, Some(a.task_id))
    }

    /// `break_glass.used` (a call went through) or `break_glass.reviewed`.
    pub fn break_glass(
        &self,
        r: &ReviewRecord,
        reviewed: bool,
        ctx: &Ctx,
        now: i64,
    ) -> Result<Pending, super::CanonicalError> {
        let links = Links {
            workload: Some(self.workload(&r.workload)),
            task: Some(TaskId(r.task_id).to_string()),
            call: r.calls.last().map(|c| CallId(c.0).to_string()),
            request_id: ctx.request_id.clone(),
            user: Some(self.user(&r.on_behalf_of)),
            ..Links::default()
        };
        let (kind, data) = if reviewed {
            (
                EventKind::BreakGlassReviewed,
                event_data![
                    ("signed_off_by", r.signed_off_by.clone().unwrap_or_default()),
                    ("comment", super::text(r.comment.as_deref().unwrap_or(""))),
                    ("calls", r.calls.len() as u64),
                ],
            )
        } else {
            let (_, tool, justification, _) = r.calls.last().cloned().unwrap_or_default();
            (
                EventKind::BreakGlassUsed,
                event_data![
                    ("tool", tool),
                    ("justification", super::text(&justification))
                ],
            )
        };
        Pending::new(kind, ms(now), &links, data, Some(r.task_id))
    }

    /// `workload.fenced` / `workload.unfenced` (also tenants and users).
    pub fn fence(
        &self,
        f: &crate::store::FenceRecord,
        lifted: Option<(&str, &str)>,
        ctx: &Ctx,
        now: i64,
    ) -> Result<Pending, super::CanonicalError> {
        let mut links = Links {
            request_id: ctx.request_id.clone(),
            job: f.job.map(|j| crate::ids::JobId(j).to_string()),
            ..Links::default()
        };
        match f.kind.as_str() {
            "workload" => links.workload = Some(self.workload(&f.value)),
            "tenant" => links.tenant = Some(self.tenant(&f.value)),
            _ => links.user = Some(self.user(&f.value)),
        }
        let (kind, data) = match lifted {
            None => (
                EventKind::WorkloadFenced,
                event_data![
                    ("kind", f.kind.clone()),
                    ("reason", super::text(&f.reason)),
                    ("by", f.created_by.clone())
                ],
            ),
            Some((by, reason)) => (
                EventKind::WorkloadUnfenced,
                event_data![
                    ("kind", f.kind.clone()),
                    ("reason", super::text(reason)),
                    ("by", by),
                    ("fenced_for", super::text(&f.reason))
                ],
            ),
        };
        Pending::new(kind, ms(now), &links, data, None)
    }

    /// `provider.reconciled`: what a reconciliation found at a provider
    /// that no live lease accounts for, and whether it was removed.
    pub fn reconciled(
        &self,
        provider: &str,
        report: &serde_json::Value,
        by: &str,
        ctx: &Ctx,
        now: i64,
    ) -> Result<Pending, super::CanonicalError> {
        let links = Links {
            request_id: ctx.request_id.clone(),
            provider: Some(provider.to_owned()),
            ..Links::default()
        };
        let data = event_data![
            ("by", by),
            ("found", report["found"].clone()),
            ("accounted", report["accounted"].clone()),
            ("orphans", report["orphans"].clone()),
            ("drop", report["drop"].clone()),
        ];
        Pending::new(EventKind::ProviderReconciled, ms(now), &links, data, None)
    }

    /// `revocation_job.started` / `.finished`.
    pub fn job(
        &self,
        j: &crate::store::JobRecord,
        finished: Option<serde_json::Value>,
        ctx: &Ctx,
        now: i64,
    ) -> Result<Pending, super::CanonicalError> {
        let s = &j.selector;
        let links = Links {
            job: Some(crate::ids::JobId(j.id).to_string()),
            request_id: ctx.request_id.clone(),
            workload: s.workload.as_deref().map(|w| self.workload(w)),
            tenant: s.tenant.as_deref().map(|t| self.tenant(t)),
            user: s.user.as_deref().map(|u| self.user(u)),
            task: s.task.map(|t| TaskId(t).to_string()),
            provider: s.provider.clone(),
            role: s.role.clone(),
            ..Links::default()
        };
        let mut data = event_data![
            ("reason", super::text(&j.reason)),
            ("fence", j.fence),
            ("by", j.created_by.clone()),
            ("all", s.all)
        ];
        let kind = match finished {
            Some(counts) => {
                data.insert("counts".into(), counts);
                data.insert("state".into(), Value::from(j.state.as_str()));
                EventKind::JobFinished
            }
            None => EventKind::JobStarted,
        };
        Pending::new(kind, ms(now), &links, data, s.task)
    }

    /// A broker-level event (started, stopped, auth denied, pruned).
    /// `request.refused`: linked to the workload, and to the task and the
    /// user when the request named a task of its own.
    pub fn refusal(
        &self,
        workload: (&str, Option<&str>),
        task: Option<(u128, &str)>,
        now: i64,
        ctx: &Ctx,
        data: super::EventData,
    ) -> Result<Pending, super::CanonicalError> {
        let links = Links {
            workload: Some(self.workload(workload.0)),
            tenant: workload.1.map(|t| self.tenant(t)),
            task: task.map(|(id, _)| TaskId(id).to_string()),
            user: task.map(|(_, user)| self.user(user)),
            request_id: ctx.request_id.clone(),
            ..Links::default()
        };
        Pending::new(
            EventKind::RequestRefused,
            ms(now),
            &links,
            data,
            task.map(|(id, _)| id),
        )
    }

    pub fn broker(
        &self,
        kind: EventKind,
        now: i64,
        request_id: Option<String>,
        data: super::EventData,
    ) -> Result<Pending, super::CanonicalError> {
        let links = Links {
            request_id,
            ..Links::default()
        };
        Pending::new(kind, ms(now), &links, data, None)
    }
}

impl crate::store::Chained for Pending {
    fn seal_into(&self, seq: u64, prev: &[u8; 32], out: &mut Vec<u8>) -> [u8; 32] {
        Pending::seal_into(self, seq, prev, out)
    }

    fn size_hint(&self) -> usize {
        self.max_len()
    }

    fn task(&self) -> Option<u128> {
        self.task
    }
}

#[cfg(test)]
mod tests {
    use super::ahead_or;

    #[test]
    fn an_event_rendered_ahead_is_used_only_for_the_record_it_was_rendered_from() {
        let rendered = std::cell::Cell::new(0);
        let again = || {
            rendered.set(rendered.get() + 1);
            "rendered from the stored record"
        };
        assert_eq!(ahead_or(Some((1, "ahead")), &1, again), "ahead");
        assert_eq!(rendered.get(), 0, "not rendered twice");
        assert_eq!(
            ahead_or(Some((1, "ahead")), &2, again),
            "rendered from the stored record"
        );
        assert_eq!(ahead_or(None, &2, again), "rendered from the stored record");
        assert_eq!(rendered.get(), 2);
    }
}
