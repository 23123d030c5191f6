//! The token denylist in a redb transaction.

use super::*;

impl TokenWrites for KvTxn<'_> {
    fn deny(&mut self, entries: &[(u128, i64)]) -> Result<(), StoreError> {
        for (jti, exp) in entries {
            let prev = self.denylist.get(*jti)?.map(|g| g.value());
            if prev.is_some_and(|p| p >= *exp) {
                continue;
            }
            let r = self.denylist.insert(*jti, *exp).map(|_| ());
            self.w(r)?;
        }
        Ok(())
    }

    fn prune_denylist(
        &mut self,
        now: i64,
        horizon_ms: i64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let cutoff = now.saturating_sub(horizon_ms);
        let mut dead = Vec::new();
        for e in self.denylist.iter()? {
            let (k, v) = e?;
            let (jti, exp) = (k.value(), v.value());
            if exp < now {
                dead.push(jti);
            } else if crate::ids::created_millis(jti) > cutoff {
                break;
            }
            if dead.len() >= limit {
                break;
            }
        }
        for jti in &dead {
            let r = self.denylist.remove(*jti).map(|_| ());
            self.w(r)?;
        }
        Ok(dead.len())
    }
}
