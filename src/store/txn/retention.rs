//! Retention in a transaction: ended tasks leave with everything of theirs,
//! finished jobs with their claims. Check, then write: a batch reads and
//! decides everything before its first removal.

use super::*;

/// Everything one removable task takes with it.
struct Doomed {
    task: TaskRecord,
    leases: Vec<LeaseRecord>,
    calls: Vec<u128>,
    approvals: Vec<u128>,
    review: bool,
}

impl Doomed {
    fn records(&self) -> usize {
        1 + self.leases.len() + self.calls.len() + self.approvals.len() + usize::from(self.review)
    }
}

/// When a task ended: its completion, or its deadline if it was never
/// completed (nothing can be done under it after that).
fn ended_at(task: &TaskRecord) -> i64 {
    match task.state {
        TaskState::Completed => task.completed_at.unwrap_or(task.expires_at),
        TaskState::Open => task.expires_at,
    }
}

impl KvTxn<'_> {
    /// What removing `task` would take, or `None` when it must stay.
    fn plan_removal(&self, task: TaskRecord, cutoff: i64) -> Result<Option<Doomed>, StoreError> {
        if ended_at(&task) >= cutoff || self.pending_reviews.get(task.id)?.is_some() {
            return Ok(None);
        }
        let mut leases = Vec::new();
        for id in self.lease_ids_of_task(task.id)? {
            let rec = self.lease(id)?.ok_or_else(|| {
                StoreError::Corrupt(format!("task index names missing lease {id}"))
            })?;
            // an irrevocable lease is not terminal: it stays until an
            // operator abandons it
            if !rec.state.is_terminal() || rec.ended_at.unwrap_or(rec.expires_at) >= cutoff {
                return Ok(None);
            }
            leases.push(rec);
        }
        let mut calls = Vec::new();
        let mut approvals: Vec<u128> = Vec::new();
        for e in self.calls.range((task.id, 0u128)..=(task.id, u128::MAX))? {
            let (k, v) = e?;
            let call: CallRecord = codec::decode(v.value())?;
            calls.push(k.value().1);
            if let Some(a) = call.approval_id
                && !approvals.contains(&a)
            {
                approvals.push(a);
            }
        }
        let mut stored = Vec::with_capacity(approvals.len());
        for id in approvals {
            let Some(g) = self.approvals.get(id)? else {
                continue;
            };
            let a: ApprovalRecord = codec::decode(g.value())?;
            if matches!(a.state, ApprovalState::Pending | ApprovalState::Approved) {
                return Ok(None);
            }
            stored.push(id);
        }
        let review = self.reviews.get(task.id)?.is_some();
        Ok(Some(Doomed {
            task,
            leases,
            calls,
            approvals: stored,
            review,
        }))
    }

    /// A lease of task `task`, with its index entries and its count.
    fn remove_lease(&mut self, task: u128, l: &LeaseRecord) -> Result<(), StoreError> {
        let r = self.leases.remove(l.id).map(|_| ());
        self.w(r)?;
        let r = self.task_leases.remove((task, l.id)).map(|_| ());
        self.w(r)?;
        let r = self
            .workload_leases
            .remove((l.workload.as_str(), l.id))
            .map(|_| ());
        self.w(r)?;
        *self
            .deltas
            .entry((l.provider.clone(), l.state))
            .or_default() -= 1;
        Ok(())
    }

    /// Part of a task too large for one batch: up to `budget` of its leases
    /// and calls (at least one). Its record, approvals and review stay for
    /// the batch that removes the rest: a removable task stays removable
    /// (what ended before the cutoff stays ended), so the next batch plans
    /// it again and goes on.
    fn remove_part(
        &mut self,
        d: &Doomed,
        budget: usize,
        out: &mut Removed,
    ) -> Result<(), StoreError> {
        let id = d.task.id;
        let budget = budget.max(1);
        let leases = &d.leases[..d.leases.len().min(budget)];
        for l in leases {
            self.remove_lease(id, l)?;
        }
        let calls = &d.calls[..d.calls.len().min(budget - leases.len())];
        for c in calls {
            let r = self.calls.remove((id, *c)).map(|_| ());
            self.w(r)?;
        }
        out.leases += leases.len() as u64;
        out.calls += calls.len() as u64;
        out.part_of = Some(id);
        Ok(())
    }

    fn remove_doomed(&mut self, d: &Doomed, out: &mut Removed) -> Result<(), StoreError> {
        let id = d.task.id;
        for l in &d.leases {
            self.remove_lease(id, l)?;
        }
        for c in &d.calls {
            let r = self.calls.remove((id, *c)).map(|_| ());
            self.w(r)?;
        }
        for a in &d.approvals {
            let r = self.approvals.remove(*a).map(|_| ());
            self.w(r)?;
        }
        if d.review {
            let r = self.reviews.remove(id).map(|_| ());
            self.w(r)?;
        }
        let r = self
            .workload_tasks
            .remove((d.task.workload.as_str(), id))
            .map(|_| ());
        self.w(r)?;
        let r = self.tasks.remove(id).map(|_| ());
        self.w(r)?;
        out.tasks += 1;
        out.leases += d.leases.len() as u64;
        out.calls += d.calls.len() as u64;
        out.approvals += d.approvals.len() as u64;
        out.reviews += u64::from(d.review);
        out.first.get_or_insert(id);
        out.last_removed = Some(id);
        Ok(())
    }
}

impl RetentionWrites for KvTxn<'_> {
    fn remove_ended_tasks(
        &mut self,
        cutoff: i64,
        after: Option<u128>,
        max_tasks: usize,
        max_records: usize,
    ) -> Result<Removed, StoreError> {
        let mut out = Removed {
            cursor: after,
            done: true,
            ..Removed::default()
        };
        let start = match after {
            Some(u128::MAX) => return Ok(out),
            Some(a) => a + 1,
            None => 0,
        };
        // ids are time-ordered: no task created at or after the cutoff can
        // have ended before it
        let mut candidates = Vec::new();
        for e in self.tasks.range(start..)? {
            let (k, v) = e?;
            let id = k.value();
            if crate::ids::created_millis(id) >= cutoff {
                break;
            }
            if candidates.len() >= max_tasks.max(1) {
                out.done = false;
                break;
            }
            candidates.push(codec::decode::<TaskRecord>(v.value())?);
        }
        let mut doomed = Vec::new();
        let mut part = None;
        let mut planned = 0;
        for task in candidates {
            let id = task.id;
            match self.plan_removal(task, cutoff)? {
                Some(d) => {
                    if planned + d.records() > max_records {
                        // the next batch starts with it
                        if planned > 0 {
                            out.done = false;
                            break;
                        }
                        // first in the batch and larger than it: it goes
                        // over several (leases and calls first, its record
                        // last), the cursor staying before it; with
                        // neither, it is a handful of records and goes whole
                        if !(d.leases.is_empty() && d.calls.is_empty()) {
                            out.done = false;
                            part = Some(d);
                            break;
                        }
                    }
                    planned += d.records();
                    doomed.push(d);
                }
                None => out.kept += 1,
            }
            out.cursor = Some(id);
        }
        for d in &doomed {
            self.remove_doomed(d, &mut out)?;
        }
        if let Some(d) = part {
            self.remove_part(&d, max_records, &mut out)?;
        }
        Ok(out)
    }

    fn remove_ended_jobs(
        &mut self,
        cutoff: i64,
        max_records: usize,
    ) -> Result<(u64, u64), StoreError> {
        let mut finished = Vec::new();
        for e in self.jobs.iter()? {
            let (k, v) = e?;
            if crate::ids::created_millis(k.value()) >= cutoff {
                break;
            }
            let job: JobRecord = codec::decode(v.value())?;
            if job.state != records::JobState::Running
                && job.finished_at.is_some_and(|f| f < cutoff)
            {
                finished.push(job.id);
            }
        }
        let (mut jobs, mut entries) = (0, 0);
        for job in finished {
            let budget = max_records.saturating_sub(entries as usize);
            if budget == 0 {
                break;
            }
            let mut claims = Vec::new();
            for e in self.job_leases.range((job, 0u128)..=(job, u128::MAX))? {
                if claims.len() >= budget {
                    break;
                }
                claims.push(e?.0.value().1);
            }
            let all = claims.len() < budget;
            let mut counts = Vec::new();
            if all {
                for e in self.job_counts.range((job, "", "")..)? {
                    let k = e?.0;
                    let (j, provider, bucket) = k.value();
                    if j != job {
                        break;
                    }
                    counts.push((provider.to_owned(), bucket.to_owned()));
                }
            }
            for lease in &claims {
                let r = self.job_leases.remove((job, *lease)).map(|_| ());
                self.w(r)?;
            }
            entries += claims.len() as u64;
            if !all {
                break;
            }
            for (provider, bucket) in &counts {
                let r = self
                    .job_counts
                    .remove((job, provider.as_str(), bucket.as_str()))
                    .map(|_| ());
                self.w(r)?;
            }
            let r = self.jobs.remove(job).map(|_| ());
            self.w(r)?;
            entries += counts.len() as u64 + 1;
            jobs += 1;
        }
        Ok((jobs, entries))
    }
}
