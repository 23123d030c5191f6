//! Tasks in a redb transaction.

use super::*;

impl TaskWrites for KvTxn<'_> {
    // === reads (no side effects) ===

    fn task(&self, id: u128) -> Result<Option<TaskRecord>, StoreError> {
        match self.tasks.get(id)? {
            Some(g) => Ok(Some(codec::decode(g.value())?)),
            None => Ok(None),
        }
    }

    // === operations ===

    fn create_task(&mut self, rec: &TaskRecord) -> Result<(), StoreError> {
        if self.tasks.get(rec.id)?.is_some() {
            return conflict(Conflict::Duplicate);
        }
        self.put_task(rec)?;
        let r = self
            .workload_tasks
            .insert((rec.workload.as_str(), rec.id), ())
            .map(|_| ());
        self.w(r)
    }

    fn complete_task(
        &mut self,
        task_id: u128,
        now: i64,
        claim_until: i64,
        local: &Local,
    ) -> Result<Completion, StoreError> {
        let Some(mut task) = self.task(task_id)? else {
            return conflict(Conflict::TaskNotFound);
        };
        if task.state == TaskState::Completed {
            return conflict(Conflict::TaskCompleted);
        }
        let ids = self.lease_ids_of_task(task_id)?;
        let mut all = Vec::with_capacity(ids.len());
        for id in ids {
            let rec = self.lease(id)?.ok_or_else(|| {
                StoreError::Corrupt(format!("task index names missing lease {id}"))
            })?;
            all.push(rec);
        }
        task.state = TaskState::Completed;
        task.completed_at = Some(now);
        self.put_task(&task)?;
        let mut claimed = Vec::new();
        let mut revoked = Vec::new();
        for rec in &mut all {
            if rec.state == LeaseState::Active {
                let (moved, queued) = self.revoke_or_queue(
                    rec.clone(),
                    Why::of(RevokeCause::TaskComplete),
                    now,
                    claim_until,
                    local,
                )?;
                *rec = moved.clone();
                if queued {
                    claimed.push(moved);
                } else {
                    revoked.push(moved);
                }
            }
        }
        Ok(Completion {
            task,
            claimed,
            revoked,
            all,
        })
    }
}
