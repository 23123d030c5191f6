//! Leases in a redb transaction: the state machine and its indexes.

use super::*;

impl LeaseWrites for KvTxn<'_> {
    fn lease(&self, id: u128) -> Result<Option<LeaseRecord>, StoreError> {
        match self.leases.get(id)? {
            Some(g) => Ok(Some(codec::decode(g.value())?)),
            None => Ok(None),
        }
    }

    fn workload_active(&self, workload: &str) -> Result<u64, StoreError> {
        let stored = self
            .workload_active
            .get(workload)?
            .map(|g| g.value())
            .unwrap_or(0);
        let delta = self.active_deltas.get(workload).copied().unwrap_or(0);
        Ok(stored.saturating_add_signed(delta))
    }

    fn task_active(&self, task: u128) -> Result<u64, StoreError> {
        let stored = self.task_active.get(task)?.map(|g| g.value()).unwrap_or(0);
        let delta = self.task_deltas.get(&task).copied().unwrap_or(0);
        Ok(stored.saturating_add_signed(delta))
    }

    fn lease_intent(
        &mut self,
        rec: &LeaseRecord,
        now: i64,
        max_per_task: u32,
    ) -> Result<(), StoreError> {
        let Some(mut task) = self.task(rec.task_id)? else {
            return conflict(Conflict::TaskNotFound);
        };
        if task.workload != rec.workload {
            return conflict(Conflict::TaskNotFound);
        }
        if task.state != TaskState::Open {
            return conflict(Conflict::TaskCompleted);
        }
        if task.expires_at <= now {
            return conflict(Conflict::TaskExpired);
        }
        if rec.expires_at > task.expires_at {
            return conflict(Conflict::OutlivesTask);
        }
        if task.lease_count >= max_per_task {
            return conflict(Conflict::TaskLeaseCap(max_per_task));
        }
        if rec.state != LeaseState::Issuing || self.leases.get(rec.id)?.is_some() {
            return conflict(Conflict::Duplicate);
        }
        task.lease_count += 1;
        self.put_task(&task)?;
        self.put_lease(rec, None)?;
        let r = self.issuing.insert(rec.id, ()).map(|_| ());
        self.w(r)?;
        let r = self
            .task_leases
            .insert((rec.task_id, rec.id), ())
            .map(|_| ());
        self.w(r)?;
        let r = self
            .workload_leases
            .insert((rec.workload.as_str(), rec.id), ())
            .map(|_| ());
        self.w(r)
    }

    fn record_prepared(&mut self, lease: u128, sealed: &[u8]) -> Result<(), StoreError> {
        let Some(mut rec) = self.lease(lease)? else {
            return conflict(Conflict::LeaseNotFound);
        };
        if rec.state != LeaseState::Issuing {
            return conflict(Conflict::LeaseState(rec.state));
        }
        rec.handle_sealed = Some(sealed.to_vec());
        self.put_lease(&rec, Some(LeaseState::Issuing))
    }

    fn activate(&mut self, a: &Activation, now: i64) -> Result<LeaseRecord, StoreError> {
        let Some(mut rec) = self.lease(a.lease)? else {
            return conflict(Conflict::LeaseNotFound);
        };
        if rec.state != LeaseState::Issuing {
            return conflict(Conflict::LeaseState(rec.state));
        }
        let task = self
            .task(rec.task_id)?
            .ok_or(StoreError::Conflict(Conflict::TaskNotFound))?;
        if task.state != TaskState::Open {
            return conflict(Conflict::TaskCompleted);
        }
        if task.expires_at <= now {
            return conflict(Conflict::TaskExpired);
        }
        if a.expires_at > rec.expires_at || a.expires_at <= now {
            return conflict(Conflict::OutlivesTask);
        }
        a.apply(&mut rec);
        let r = self.issuing.remove(rec.id).map(|_| ());
        self.w(r)?;
        let r = self.expiry.insert((rec.expires_at, rec.id), ()).map(|_| ());
        self.w(r)?;
        self.put_lease(&rec, Some(LeaseState::Issuing))?;
        Ok(rec)
    }

    fn issue_failed(
        &mut self,
        lease: u128,
        error: &str,
        now: i64,
        local: &Local,
    ) -> Result<LeaseRecord, StoreError> {
        let Some(rec) = self.lease(lease)? else {
            return conflict(Conflict::LeaseNotFound);
        };
        if rec.state != LeaseState::Issuing {
            return conflict(Conflict::LeaseState(rec.state));
        }
        let (mut rec, _) =
            self.revoke_or_queue(rec, Why::of(RevokeCause::IssueFailed), now, now, local)?;
        if let Some(r) = rec.revocation.as_mut() {
            r.last_error = Some(error.to_owned());
        }
        let state = rec.state;
        self.put_lease(&rec, Some(state))?;
        Ok(rec)
    }

    fn request_revoke(
        &mut self,
        lease: u128,
        cause: RevokeCause,
        by: Option<&str>,
        now: i64,
        claim_until: i64,
        local: &Local,
    ) -> Result<RevokeRequest, StoreError> {
        let Some(rec) = self.lease(lease)? else {
            return conflict(Conflict::LeaseNotFound);
        };
        match rec.state {
            LeaseState::Active | LeaseState::Irrevocable => {
                let (rec, queued) = self.revoke_or_queue(
                    rec,
                    Why {
                        cause,
                        by,
                        job: None,
                    },
                    now,
                    claim_until,
                    local,
                )?;
                Ok(RevokeRequest {
                    rec,
                    queued,
                    changed: true,
                })
            }
            _ => Ok(RevokeRequest {
                rec,
                queued: false,
                changed: false,
            }),
        }
    }

    fn record_outcomes(
        &mut self,
        outcomes: &[Outcome],
        now: i64,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let mut out = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            let id = match o {
                Outcome::Done { lease, .. } | Outcome::Retry { lease, .. } => *lease,
            };
            let Some(mut rec) = self.lease(id)? else {
                continue;
            };
            if !matches!(rec.state, LeaseState::Revoking | LeaseState::Irrevocable) {
                continue; // finished by another path meanwhile
            }
            let Some(mut rv) = rec.revocation.clone() else {
                return Err(StoreError::Corrupt(format!(
                    "lease {id} is revoking without a revocation record"
                )));
            };
            let prev = rec.state;
            self.dequeue(&rec)?;
            match o {
                Outcome::Done { note, .. } => {
                    if let Some(n) = note {
                        let d = rec.description.take().unwrap_or_default();
                        rec.description = Some(if d.is_empty() {
                            format!("revoked: {n}")
                        } else {
                            format!("{d}; revoked: {n}")
                        });
                    }
                    rec.state = rv.cause.terminal_state();
                    rec.ended_at = Some(now);
                    rec.handle_sealed = None; // nothing left to revoke with
                    rv.attempts += 1;
                    rv.last_error = None;
                }
                Outcome::Retry {
                    at,
                    error,
                    irrevocable,
                    ..
                } => {
                    rv.attempts += 1;
                    rv.next_attempt_at = *at;
                    rv.last_error = Some(error.clone());
                    if *irrevocable {
                        rec.state = LeaseState::Irrevocable;
                    }
                    self.enqueue(&rec.provider.clone(), *at, id)?;
                }
            }
            rec.revocation = Some(rv);
            self.put_lease(&rec, Some(prev))?;
            out.push(rec);
        }
        Ok(out)
    }

    fn expire_due(
        &mut self,
        now: i64,
        limit: usize,
        local: &Local,
    ) -> Result<ExpiryPass, StoreError> {
        let mut due = Vec::new();
        for e in self.expiry.range((i64::MIN, 0u128)..=(now, u128::MAX))? {
            let (k, _) = e?;
            due.push(k.value());
            if due.len() >= limit {
                break;
            }
        }
        let mut pass = ExpiryPass {
            scanned: due.len(),
            ..ExpiryPass::default()
        };
        for (exp, id) in &due {
            match self.lease(*id)? {
                Some(rec) if rec.state == LeaseState::Active => {
                    let (rec, queued) =
                        self.revoke_or_queue(rec, Why::of(RevokeCause::Expiry), now, now, local)?;
                    if queued && !pass.queued_providers.contains(&rec.provider) {
                        pass.queued_providers.push(rec.provider.clone());
                    }
                    pass.handled.push(rec);
                }
                _ => {
                    // an index entry without an active lease: drop it
                    let r = self.expiry.remove((*exp, *id)).map(|_| ());
                    self.w(r)?;
                }
            }
        }
        Ok(pass)
    }

    fn recover_intents(
        &mut self,
        now: i64,
        created_before: Option<i64>,
        local: &Local,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let mut ids = Vec::new();
        let end = match created_before {
            // ids are (creation ms << 80) | random
            Some(ms) => u128::try_from(ms.max(0)).unwrap_or(0) << 80,
            None => u128::MAX,
        };
        for e in self.issuing.range(0..end)? {
            ids.push(e?.0.value());
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.lease(id)? {
                Some(rec) if rec.state == LeaseState::Issuing => {
                    out.push(
                        self.revoke_or_queue(rec, Why::of(RevokeCause::Recovery), now, now, local)?
                            .0,
                    );
                }
                _ => {
                    let r = self.issuing.remove(id).map(|_| ());
                    self.w(r)?;
                }
            }
        }
        Ok(out)
    }
}
