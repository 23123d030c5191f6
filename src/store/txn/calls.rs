//! Calls in a redb transaction (keyed by task and call, so the key is the
//! index).

use super::*;

impl CallWrites for KvTxn<'_> {
    // === calls, approvals, reviews ===

    fn put_call(&mut self, rec: &CallRecord) -> Result<(), StoreError> {
        let bytes = codec::encode(rec)?;
        let r = self
            .calls
            .insert((rec.task_id, rec.id), bytes.as_slice())
            .map(|_| ());
        self.w(r)
    }
}
