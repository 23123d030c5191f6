//! Approvers: approving or denying held-back calls, and signing off
//! break-glass reviews. Only the approver role may; never the workload that
//! asked, never an approver for a request made on their own behalf.

use crate::audit::{self, Ctx};
use crate::auth::Caller;
use crate::config::OperatorRole;
use crate::domain::{Broker, BrokerError};
use crate::ids::{ApprovalId, TaskId};
use crate::store::{ApprovalRecord, ApprovalState, ReviewRecord};

/// Whether the operator is the user a request was made for: nobody
/// approves or reviews what was done on their own behalf.
fn acts_for(op: &crate::auth::Operator, user: &str) -> bool {
    // `user` is canonical (stored so); the operator's names are put in the
    // same form, and one that cannot be is never the user
    let canonical = |s: &str| crate::check::user("user", s).ok();
    let user = canonical(user);
    user.is_some()
        && (op.user.as_deref().and_then(canonical) == user || canonical(&op.name) == user)
}

fn approver(caller: &Caller) -> Result<&crate::auth::Operator, BrokerError> {
    match caller {
        Caller::Operator(o) if o.roles.contains(&OperatorRole::Approver) => Ok(o),
        _ => Err(BrokerError::Forbidden {
            code: "forbidden",
            message: "this needs the approver role".into(),
        }),
    }
}

impl Broker {
    /// Pending approvals (approvers, admins).
    pub fn pending_approvals(&self, caller: &Caller) -> Result<Vec<ApprovalRecord>, BrokerError> {
        if !caller.has_any_role(&[OperatorRole::Approver, OperatorRole::Admin]) {
            return Err(BrokerError::Forbidden {
                code: "forbidden",
                message: "listing approvals needs the approver role".into(),
            });
        }
        Ok(self.store.read()?.pending_approvals(1000)?)
    }

    /// Pending approvals with what an approver decides on: each one's task
    /// (purpose, prompt hash) and the prompt's text when the broker keeps it
    /// (`limits.store_prompt_text`). Approvers and admins.
    pub fn pending_with_context(
        &self,
        caller: &Caller,
    ) -> Result<Vec<ApprovalContext>, BrokerError> {
        let pending = self.pending_approvals(caller)?;
        let r = self.store.read()?;
        let mut out = Vec::with_capacity(pending.len());
        for approval in pending {
            let task = r.task(approval.task_id)?;
            let prompt = task
                .as_ref()
                .and_then(|t| t.prompt_sealed.as_ref().map(|s| (t.id, s)))
                .and_then(|(id, sealed)| self.store.sealer().open(id, "prompt", sealed).ok())
                .map(|p| String::from_utf8_lossy(&p).into_owned());
            out.push(ApprovalContext {
                approval,
                task,
                prompt,
            });
        }
        Ok(out)
    }

    /// One approval: its workload, approvers, admins and responders.
    pub fn get_approval(
        &self,
        caller: &Caller,
        id: ApprovalId,
    ) -> Result<ApprovalRecord, BrokerError> {
        let a = self
            .store
            .read()?
            .approval(id.0)?
            .ok_or(BrokerError::NotFound {
                code: "approval_not_found",
            })?;
        let visible = match caller {
            Caller::Workload(w) => w.id == a.workload,
            Caller::Operator(_) => caller.has_any_role(&[
                OperatorRole::Approver,
                OperatorRole::Admin,
                OperatorRole::Responder,
            ]),
        };
        if visible {
            Ok(a)
        } else {
            Err(BrokerError::NotFound {
                code: "approval_not_found",
            })
        }
    }

    /// Approve or deny. A denial needs a comment.
    pub async fn decide_approval(
        &self,
        caller: &Caller,
        id: ApprovalId,
        approve: bool,
        comment: Option<String>,
        ctx: &Ctx,
    ) -> Result<ApprovalRecord, BrokerError> {
        let op = approver(caller)?;
        match &comment {
            Some(c) => crate::check::text("comment", c, 1024)?,
            None if !approve => {
                return Err(BrokerError::invalid(
                    "comment_required",
                    "denying an approval needs a comment saying why",
                ));
            }
            None => {}
        }
        let a = self
            .store
            .read()?
            .approval(id.0)?
            .ok_or(BrokerError::NotFound {
                code: "approval_not_found",
            })?;
        if acts_for(op, &a.on_behalf_of) {
            return Err(BrokerError::Forbidden {
                code: "self_approval",
                message: "an approver cannot decide a request made on their own behalf".into(),
            });
        }
        let by = caller.principal();
        let now = self.clock.now().unix_millis();
        let (au, c) = (self.auditor.clone(), ctx.clone());
        let decided = self
            .store
            .write(move |t| {
                let a = t.decide_approval(id.0, approve, &by, comment.as_deref(), now)?;
                audit::append(t, &au, au.approval(&a, &c, now))?;
                Ok(a)
            })
            .await?;
        tracing::info!(approval_id = %id, approved = approve, by = %caller.principal(), "approval decided");
        Ok(decided)
    }

    /// Wait (up to `wait`) for an approval to leave `pending`.
    pub async fn await_approval(
        &self,
        caller: &Caller,
        id: ApprovalId,
        wait: std::time::Duration,
    ) -> Result<ApprovalRecord, BrokerError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let a = self.get_approval(caller, id)?;
            if a.state != ApprovalState::Pending || tokio::time::Instant::now() >= deadline {
                return Ok(a);
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Expire approvals past their deadline; returns when the next one is due.
    pub async fn expire_approvals(&self, epoch: u64) -> Result<Option<i64>, BrokerError> {
        let now = self.clock.now().unix_millis();
        let a = self.auditor.clone();
        let expired = self
            .store
            .write(move |t| {
                t.require_leader(epoch)?;
                let expired = t.expire_approvals(now, 1000)?;
                for e in &expired {
                    audit::append(t, &a, a.approval(e, &Ctx::system(), now))?;
                }
                Ok(expired)
            })
            .await?;
        for e in &expired {
            tracing::info!(approval_id = %ApprovalId(e.id), "approval expired");
        }
        Ok(self.store.read()?.next_approval_expiry()?)
    }

    /// Tasks that used break-glass and await sign-off.
    pub fn pending_reviews(&self, caller: &Caller) -> Result<Vec<ReviewRecord>, BrokerError> {
        if !caller.has_any_role(&[
            OperatorRole::Approver,
            OperatorRole::Admin,
            OperatorRole::Responder,
        ]) {
            return Err(BrokerError::Forbidden {
                code: "forbidden",
                message: "reviews are for approvers".into(),
            });
        }
        Ok(self.store.read()?.pending_reviews(1000)?)
    }

    /// An approver signs a break-glass review off.
    pub async fn sign_off_review(
        &self,
        caller: &Caller,
        task: TaskId,
        comment: String,
        ctx: &Ctx,
    ) -> Result<ReviewRecord, BrokerError> {
        let op = approver(caller)?;
        crate::check::text("comment", &comment, 1024)?;
        let r = self
            .store
            .read()?
            .review(task.0)?
            .ok_or(BrokerError::NotFound {
                code: "review_not_found",
            })?;
        if acts_for(op, &r.on_behalf_of) {
            return Err(BrokerError::Forbidden {
                code: "self_approval",
                message: "an approver cannot review break-glass used on their own behalf".into(),
            });
        }
        let by = caller.principal();
        let now = self.clock.now().unix_millis();
        let (a, c) = (self.auditor.clone(), ctx.clone());
        Ok(self
            .store
            .write(move |t| {
                let r = t.sign_off_review(task.0, &by, &comment, now)?;
                audit::append(t, &a, a.break_glass(&r, true, &c, now))?;
                Ok(r)
            })
            .await?)
    }
}

/// A pending approval and what an approver needs to decide on it.
#[derive(Debug, Clone)]
pub struct ApprovalContext {
    pub approval: ApprovalRecord,
    /// The task it belongs to (gone only if the store lost it).
    pub task: Option<crate::store::TaskRecord>,
    /// The prompt's text, when the broker keeps it sealed.
    pub prompt: Option<String>,
}
