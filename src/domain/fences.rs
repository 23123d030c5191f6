//! Fences as the request path sees them: the keys that apply to a
//! workload acting for a user, an in-memory mirror of the stored fences
//! (the store is the truth: every transaction that creates something for a
//! workload checks the stored fences too), and the check itself.

use std::collections::HashSet;
use std::sync::RwLock;

use super::{Broker, BrokerError};
use crate::auth::Workload;
use crate::store::records::FenceRecord;

/// Fences in memory, for a check on every request without a read.
#[derive(Debug, Default)]
pub struct FenceCache {
    keys: RwLock<HashSet<String>>,
}

impl FenceCache {
    pub fn set(&self, keys: impl IntoIterator<Item = String>) {
        if let Ok(mut k) = self.keys.write() {
            *k = keys.into_iter().collect();
        }
    }

    pub(crate) fn insert(&self, key: String) {
        if let Ok(mut k) = self.keys.write() {
            k.insert(key);
        }
    }

    pub(crate) fn remove(&self, key: &str) {
        if let Ok(mut k) = self.keys.write() {
            k.remove(key);
        }
    }

    pub fn any(&self, keys: &[String]) -> bool {
        self.keys
            .read()
            .map(|k| keys.iter().any(|x| k.contains(x)))
            .unwrap_or(true)
    }
}

/// The fence keys that apply to a workload acting for a user.
pub fn fence_keys(w: &Workload, user: Option<&str>) -> Vec<String> {
    let mut keys = vec![FenceRecord::key("workload", &w.id)];
    if let Some(t) = &w.tenant {
        keys.push(FenceRecord::key("tenant", t));
    }
    if let Some(u) = user {
        keys.push(FenceRecord::key("user", u));
    }
    keys
}

impl Broker {
    /// Refuse fenced workloads, tenants and users.
    pub fn check_fence(&self, w: &Workload, user: Option<&str>) -> Result<(), BrokerError> {
        if self.fences.any(&fence_keys(w, user)) {
            return Err(BrokerError::from(crate::store::StoreError::Conflict(
                crate::store::Conflict::Fenced,
            )));
        }
        Ok(())
    }
}
