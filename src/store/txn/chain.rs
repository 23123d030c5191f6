//! The event chain in a redb transaction: appends join the batch's open
//! block; checkpoints; pruning of archived events (and their checkpoints).

use super::*;

impl ChainWrites for KvTxn<'_> {
    // === the event chain ===

    fn append(&mut self, event: &dyn Chained) -> Result<u64, StoreError> {
        let seq = self.head.seq + 1;
        let task = event.task();
        if self.block.would_outgrow(event.size_hint()) {
            self.write_block()?;
        }
        let prev = self.head.hash;
        let mut hash = [0u8; 32];
        let first = self.block.push(seq, task.unwrap_or(0), |out| {
            out.reserve(event.size_hint());
            hash = event.seal_into(seq, &prev, out);
            hash
        });
        // the task index points at a task's first event in each block
        if let (true, Some(t)) = (first, task) {
            let r = self.event_tasks.insert((t, seq), ()).map(|_| ());
            self.w(r)?;
        }
        self.head = ChainHead { seq, hash };
        self.head_dirty = true;
        Ok(seq)
    }

    fn fail(&mut self, why: &str) -> StoreError {
        self.poisoned = true;
        StoreError::Io(why.to_owned())
    }

    fn chain_head(&self) -> ChainHead {
        self.head
    }

    fn put_checkpoint(&mut self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let r = self.checkpoints.insert(seq, bytes).map(|_| ());
        self.w(r)
    }

    fn prune_events(&mut self, through: u64, expected: &[u8; 32]) -> Result<u64, StoreError> {
        let base = match self.meta.get("chain_base")?.map(|g| g.value().to_vec()) {
            Some(b) => {
                ChainHead::from_bytes(&b).ok_or_else(|| StoreError::Corrupt("chain base".into()))?
            }
            None => ChainHead::default(),
        };
        if through <= base.seq || through > self.head.seq {
            return conflict(Conflict::Chain(format!(
                "can prune only events {}..={} (the chain holds {}..={})",
                base.seq + 1,
                self.head.seq,
                base.seq + 1,
                self.head.seq
            )));
        }
        self.write_block()?;
        // the block holding `through` is the first whose key is >= it
        let holding = self
            .events
            .range(through..)?
            .next()
            .transpose()?
            .map(|(k, v)| blocks::unpack(v.value()).map(|b| (k.value(), b.into_owned())))
            .transpose()?;
        let found = match &holding {
            Some((key, block)) => blocks::find(*key, block, through)?.map(|e| e.hash),
            None => None,
        };
        let Some(hash) = found else {
            return conflict(Conflict::Chain(format!("event {through} is missing")));
        };
        if hash != *expected {
            return conflict(Conflict::Chain(format!(
                "the archive's last hash does not match event {through}"
            )));
        }
        // every block up to the one holding `through`: removed whole, or
        // (that last one) cut down to the events after `through`. All are
        // decoded before anything changes, so a malformed block refuses the
        // prune and leaves the chain as it was; only their keys and index
        // entries are kept meanwhile (a prune may cover millions of events).
        let mut doomed = Vec::new();
        let mut removed = 0;
        let mut unindexed = Vec::new();
        for e in self.events.range(..=through)? {
            let (k, v) = e?;
            removed += pruned_of(k.value(), v.value(), through, &mut unindexed)?;
            doomed.push(k.value());
        }
        let mut rest = None;
        if let Some((key, block)) = holding.filter(|(k, _)| *k > through) {
            removed += pruned_of(key, &block, through, &mut unindexed)?;
            rest = blocks::after(key, &block, through)?.map(|r| (key, r));
            doomed.push(key);
        }
        for key in doomed {
            let r = self.events.remove(key).map(|_| ());
            self.w(r)?;
        }
        for (task, seq) in unindexed {
            let r = self.event_tasks.remove((task, seq)).map(|_| ());
            self.w(r)?;
        }
        // what remains of the cut block, and its tasks' index entries (a
        // task whose first event there was pruned now starts later)
        if let Some((key, rest)) = rest {
            let r = self
                .events
                .insert(key, blocks::pack(rest.block).as_slice())
                .map(|_| ());
            self.w(r)?;
            for (task, seq) in rest.firsts {
                let r = self.event_tasks.insert((task, seq), ()).map(|_| ());
                self.w(r)?;
            }
        }
        // checkpoints over pruned events went into the archive with them
        let mut signed = Vec::new();
        for e in self.checkpoints.range(..=through)? {
            signed.push(e?.0.value());
        }
        for seq in signed {
            let r = self.checkpoints.remove(seq).map(|_| ());
            self.w(r)?;
        }
        let base = ChainHead {
            seq: through,
            hash: *expected,
        };
        let r = self
            .meta
            .insert("chain_base", &base.to_bytes()[..])
            .map(|_| ());
        self.w(r)?;
        Ok(removed)
    }
}
