//! Revocation jobs, fences and abandoned leases in a redb transaction.

use super::*;

impl IncidentWrites for KvTxn<'_> {
    // === mass revocation, fences ===

    fn job(&self, id: u128) -> Result<Option<JobRecord>, StoreError> {
        match self.jobs.get(id)? {
            Some(g) => Ok(Some(codec::decode(g.value())?)),
            None => Ok(None),
        }
    }

    fn put_job(&mut self, job: &JobRecord) -> Result<(), StoreError> {
        let bytes = codec::encode(job)?;
        let r = self.jobs.insert(job.id, bytes.as_slice()).map(|_| ());
        self.w(r)
    }

    fn claim_for_job(
        &mut self,
        job: &JobRecord,
        candidates: &[u128],
        now: i64,
        local: &Local,
    ) -> Result<(Vec<LeaseRecord>, Vec<String>), StoreError> {
        let mut out = Vec::new();
        let mut queued_providers: Vec<String> = Vec::new();
        for id in candidates {
            let Some(rec) = self.lease(*id)? else {
                continue;
            };
            if !job.selector.matches(&rec)
                || !matches!(rec.state, LeaseState::Active | LeaseState::Irrevocable)
            {
                continue;
            }
            let why = Why {
                cause: RevokeCause::Job,
                by: Some(job.created_by.as_str()),
                job: Some(job.id),
            };
            let (rec, queued) = self.revoke_or_queue(rec, why, now, now, local)?;
            let r = self.job_leases.insert((job.id, rec.id), ()).map(|_| ());
            self.w(r)?;
            if queued && !queued_providers.contains(&rec.provider) {
                queued_providers.push(rec.provider.clone());
            }
            out.push(rec);
        }
        Ok((out, queued_providers))
    }

    fn fence(&self, key: &str) -> Result<Option<FenceRecord>, StoreError> {
        match self.fences.get(key)? {
            Some(g) => Ok(Some(codec::decode(g.value())?)),
            None => Ok(None),
        }
    }

    fn refuse_fenced(&self, keys: &[String]) -> Result<(), StoreError> {
        for k in keys {
            if self.fences.get(k.as_str())?.is_some() {
                return conflict(Conflict::Fenced);
            }
        }
        Ok(())
    }

    fn put_fence(&mut self, f: &FenceRecord) -> Result<(), StoreError> {
        let bytes = codec::encode(f)?;
        let key = FenceRecord::key(&f.kind, &f.value);
        let r = self
            .fences
            .insert(key.as_str(), bytes.as_slice())
            .map(|_| ());
        self.w(r)
    }

    fn lift_fence(&mut self, kind: &str, value: &str) -> Result<FenceRecord, StoreError> {
        let key = FenceRecord::key(kind, value);
        let Some(f) = self.fence(&key)? else {
            return conflict(Conflict::FenceNotFound);
        };
        let r = self.fences.remove(key.as_str()).map(|_| ());
        self.w(r)?;
        Ok(f)
    }

    fn abandon(
        &mut self,
        lease: u128,
        by: &str,
        reason: &str,
        now: i64,
    ) -> Result<LeaseRecord, StoreError> {
        let Some(mut rec) = self.lease(lease)? else {
            return conflict(Conflict::LeaseNotFound);
        };
        if rec.state != LeaseState::Irrevocable {
            return conflict(Conflict::LeaseState(rec.state));
        }
        self.dequeue(&rec)?;
        if let Some(r) = rec.revocation.as_mut() {
            r.last_error = Some(format!("abandoned by {by}: {reason}"));
            r.requested_by = Some(by.to_owned());
        }
        rec.state = LeaseState::Abandoned;
        rec.ended_at = Some(now);
        self.put_lease(&rec, Some(LeaseState::Irrevocable))?;
        Ok(rec)
    }
}
