//! Approvals and break-glass reviews in a redb transaction.

use super::*;

impl ApprovalWrites for KvTxn<'_> {
    fn approval(&self, id: u128) -> Result<Option<ApprovalRecord>, StoreError> {
        match self.approvals.get(id)? {
            Some(g) => Ok(Some(codec::decode(g.value())?)),
            None => Ok(None),
        }
    }

    fn create_approval(&mut self, rec: &ApprovalRecord) -> Result<(), StoreError> {
        if self.approvals.get(rec.id)?.is_some() {
            return conflict(Conflict::Duplicate);
        }
        self.put_approval(rec)?;
        let r = self
            .approval_expiry
            .insert((rec.expires_at, rec.id), ())
            .map(|_| ());
        self.w(r)
    }

    fn decide_approval(
        &mut self,
        id: u128,
        approve: bool,
        by: &str,
        comment: Option<&str>,
        now: i64,
    ) -> Result<ApprovalRecord, StoreError> {
        let Some(mut a) = self.approval(id)? else {
            return conflict(Conflict::ApprovalNotFound);
        };
        if a.state != ApprovalState::Pending {
            return conflict(Conflict::Approval(format!(
                "the approval is {}",
                a.state.as_str()
            )));
        }
        if a.expires_at <= now {
            return conflict(Conflict::Approval("the approval has expired".into()));
        }
        a.state = if approve {
            ApprovalState::Approved
        } else {
            ApprovalState::Denied
        };
        a.decided_by = Some(by.to_owned());
        a.decided_at = Some(now);
        a.comment = comment.map(str::to_owned);
        if !approve {
            let r = self
                .approval_expiry
                .remove((a.expires_at, a.id))
                .map(|_| ());
            self.w(r)?;
        }
        self.put_approval(&a)?;
        Ok(a)
    }

    fn check_approval(&self, id: u128, hash: &[u8; 32], now: i64) -> Result<(), StoreError> {
        let Some(a) = self.approval(id)? else {
            return conflict(Conflict::ApprovalNotFound);
        };
        if &a.request_hash != hash {
            return conflict(Conflict::Approval(
                "the approval was granted for another request".into(),
            ));
        }
        match a.state {
            ApprovalState::Approved if a.expires_at > now => Ok(()),
            ApprovalState::Approved | ApprovalState::Expired => {
                conflict(Conflict::Approval("the approval has expired".into()))
            }
            s => conflict(Conflict::Approval(format!(
                "the approval is {}",
                s.as_str()
            ))),
        }
    }

    fn consume_approval(
        &mut self,
        id: u128,
        hash: &[u8; 32],
        call: u128,
        now: i64,
    ) -> Result<ApprovalRecord, StoreError> {
        let Some(mut a) = self.approval(id)? else {
            return conflict(Conflict::ApprovalNotFound);
        };
        if &a.request_hash != hash {
            return conflict(Conflict::Approval(
                "the approval was granted for another request".into(),
            ));
        }
        match a.state {
            ApprovalState::Approved if a.expires_at > now => {}
            ApprovalState::Approved | ApprovalState::Expired => {
                return conflict(Conflict::Approval("the approval has expired".into()));
            }
            s => {
                return conflict(Conflict::Approval(format!(
                    "the approval is {}",
                    s.as_str()
                )));
            }
        }
        a.state = ApprovalState::Consumed;
        a.consumed_by_call = Some(call);
        let r = self
            .approval_expiry
            .remove((a.expires_at, a.id))
            .map(|_| ());
        self.w(r)?;
        self.put_approval(&a)?;
        Ok(a)
    }

    fn expire_approvals(
        &mut self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<ApprovalRecord>, StoreError> {
        let mut due = Vec::new();
        for e in self
            .approval_expiry
            .range((i64::MIN, 0u128)..=(now, u128::MAX))?
        {
            due.push(e?.0.value());
            if due.len() >= limit {
                break;
            }
        }
        let mut out = Vec::new();
        for (exp, id) in due {
            let r = self.approval_expiry.remove((exp, id)).map(|_| ());
            self.w(r)?;
            if let Some(mut a) = self.approval(id)?
                && matches!(a.state, ApprovalState::Pending | ApprovalState::Approved)
            {
                a.state = ApprovalState::Expired;
                self.put_approval(&a)?;
                out.push(a);
            }
        }
        Ok(out)
    }

    fn review(&self, task: u128) -> Result<Option<ReviewRecord>, StoreError> {
        match self.reviews.get(task)? {
            Some(g) => Ok(Some(codec::decode(g.value())?)),
            None => Ok(None),
        }
    }

    fn flag_review(
        &mut self,
        task: &TaskRecord,
        call: (u128, String, String, i64),
    ) -> Result<ReviewRecord, StoreError> {
        let mut r = self.review(task.id)?.unwrap_or(ReviewRecord {
            task_id: task.id,
            workload: task.workload.clone(),
            on_behalf_of: task.on_behalf_of.clone(),
            calls: Vec::new(),
            created_at: call.3,
            signed_off_by: None,
            signed_off_at: None,
            comment: None,
        });
        r.calls.push(call);
        r.signed_off_by = None;
        r.signed_off_at = None;
        r.comment = None;
        let bytes = codec::encode(&r)?;
        let w = self.reviews.insert(task.id, bytes.as_slice()).map(|_| ());
        self.w(w)?;
        let w = self.pending_reviews.insert(task.id, ()).map(|_| ());
        self.w(w)?;
        Ok(r)
    }

    fn sign_off_review(
        &mut self,
        task: u128,
        by: &str,
        comment: &str,
        now: i64,
    ) -> Result<ReviewRecord, StoreError> {
        let Some(mut r) = self.review(task)? else {
            return conflict(Conflict::ReviewNotFound);
        };
        if r.signed_off_by.is_some() {
            return conflict(Conflict::Approval(
                "the review is already signed off".into(),
            ));
        }
        r.signed_off_by = Some(by.to_owned());
        r.signed_off_at = Some(now);
        r.comment = Some(comment.to_owned());
        let bytes = codec::encode(&r)?;
        let w = self.reviews.insert(task, bytes.as_slice()).map(|_| ());
        self.w(w)?;
        let w = self.pending_reviews.remove(task).map(|_| ());
        self.w(w)?;
        Ok(r)
    }
}
