//! Several brokers on one store: what runs once runs on the leader.
//!
//! Requests (open, call, lease, complete, revoke, approve, fence, start a
//! mass revocation) are served by any node: their rules are checked in the
//! store's transaction, which the cluster serializes. The work nobody asks
//! for — expiry, the revocation queue, revocation jobs, checkpoints,
//! denylist pruning, scheduled reconciliation, the recovery of intents a
//! dead node left behind — runs on the leader only ([`Broker::leading`]),
//! and each of its writes checks the leader's epoch in its own transaction
//! (`require_leader`), so a deposed leader that wakes up late changes
//! nothing. A single broker on redb always leads; nothing changes for it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::auth::Caller;
use crate::config::OperatorRole;
use crate::domain::{Broker, BrokerError};
use crate::store::{ClusterView, Leadership};

/// A fingerprint of every token provider's public keys (what the nodes of
/// a cluster must agree on).
pub fn token_key_fingerprint(providers: &crate::providers::Providers) -> String {
    let mut keys: Vec<String> = providers.tokens().map(|t| t.jwks().to_string()).collect();
    keys.sort();
    crate::hex::encode(&crate::audit::sha256(keys.join("\n").as_bytes()))
}

/// The token keys recorded by the nodes of a cluster, if any, and whether a
/// node other than these ones ran in the last 30 s (`config validate`).
pub fn recorded_token_keys(
    store: &crate::store::Store,
) -> Result<(Option<String>, bool), BrokerError> {
    let stored = store
        .agreed("token_keys")?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    let running = store
        .cluster()?
        .is_some_and(|v| v.nodes.iter().any(|n| n.seen_ms_ago < OTHER_NODE_RECENT_MS));
    Ok((stored, running))
}

/// Another node seen this recently is running.
const OTHER_NODE_RECENT_MS: i64 = 30_000;

/// How often a leader looks for revocation jobs another node started.
const JOB_POLL: Duration = Duration::from_millis(200);

impl Broker {
    /// This node's leadership.
    pub fn leadership(&self) -> Leadership {
        self.store.leadership()
    }

    /// The epoch this node leads with now (a single broker: always 0).
    pub fn leader_epoch(&self) -> Option<u64> {
        self.store.leadership().epoch()
    }

    /// Wait until this node leads; `None` once shutting down.
    pub(in crate::domain) async fn leading(
        &self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<u64> {
        let leadership = self.store.leadership();
        let mut changes = leadership.subscribe();
        loop {
            if *shutdown.borrow() {
                return None;
            }
            if let Some(e) = leadership.epoch() {
                return Some(e);
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = shutdown.changed() => {}
                // the local deadline lapses without a message
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// The cluster: nodes, leader, epoch, lease end. Admins and responders.
    pub fn cluster_view(&self, caller: &Caller) -> Result<Option<ClusterView>, BrokerError> {
        if !caller.has_any_role(&[OperatorRole::Admin, OperatorRole::Responder]) {
            return Err(BrokerError::Forbidden {
                code: "forbidden",
                message: "the cluster view needs the admin or responder role".into(),
            });
        }
        Ok(self.store.cluster()?)
    }

    /// Start-up: every node of a cluster must sign tokens with the same keys
    /// (a token one node issues is introspected and revoked on any other).
    /// The first node records the keys' fingerprint; a node whose keys
    /// differ is refused while another node runs. With no other node
    /// running (a full restart, e.g. to rotate the key), the new keys are
    /// recorded. A single broker on redb skips this (no write at start).
    pub async fn agree_on_token_keys(&self) -> Result<(), BrokerError> {
        if !self.leadership().clustered() {
            // one broker has no one to agree with
            return Ok(());
        }
        let fp = token_key_fingerprint(&self.providers);
        let alone = match self.store.cluster()? {
            None => true,
            Some(view) => !view
                .nodes
                .iter()
                .any(|n| n.node != view.this_node && n.seen_ms_ago < OTHER_NODE_RECENT_MS),
        };
        let value = fp.clone().into_bytes();
        let stored = self
            .store
            .write(move |t| t.agree("token_keys", &value, alone))
            .await?;
        match stored {
            None => Ok(()),
            Some(other) => Err(BrokerError::conflict(
                "token_keys_differ",
                format!(
                    "this broker's token signing keys (fingerprint {}) differ from the running cluster's ({}): tokens it issued would not verify on the other nodes; give every node the same token keys",
                    &fp[..16],
                    String::from_utf8_lossy(&other).get(..16).unwrap_or("?")
                ),
            )),
        }
    }

    /// Where the store lives, for logs (a file, or `postgres://host:port/db`).
    pub fn store_location(&self) -> String {
        self.store.path().display().to_string()
    }
}

/// How often a clustered node re-reads the fences even without being told.
const FENCE_REFRESH: Duration = Duration::from_secs(2);

/// On every node of a cluster: apply what other nodes announce. Fences are
/// re-read (they are checked in every transaction anyway; the copy in
/// memory refuses early, and must not keep refusing after a lift); a policy
/// reload on one node reloads the set here, and a set that differs from the
/// announced version is reported loudly (the nodes' policy files differ).
pub fn spawn_change_watch(
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let mut changes = broker.store.changes()?;
    Some(tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                m = changes.recv() => match m {
                    Ok(m) => m,
                    // missed some: re-read everything
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => "resync".into(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = tokio::time::sleep(FENCE_REFRESH) => "fences".into(),
                _ = shutdown.changed() => return,
            };
            broker.apply_change(&msg).await;
        }
    }))
}

impl Broker {
    async fn apply_change(&self, msg: &str) {
        if (msg == "fences" || msg == "resync")
            && let Err(e) = self.load_fences()
        {
            tracing::warn!(error = %e, "re-reading the fences failed");
        }
        if let Some(version) = msg.strip_prefix("policy ") {
            if self.policy.current().version == version {
                return;
            }
            match self
                .reload_policy_from(None, Some("cluster".into()), true)
                .await
            {
                Ok(l) if l.version == version => {}
                Ok(l) => tracing::error!(
                    announced = version, here = %l.version,
                    "another broker reloaded a policy set this broker's files do not match: decisions differ between nodes until the files agree"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "reloading the policy set another broker announced failed")
                }
            }
        }
    }
}

/// On a cluster's leader: run the revocation jobs other nodes started (a
/// node that does not lead records a job and leaves it to the leader).
pub fn spawn_job_watch(
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    if !broker.leadership().clustered() {
        return None;
    }
    Some(tokio::spawn(async move {
        loop {
            if broker.leading(&mut shutdown).await.is_none() {
                return;
            }
            if let Err(e) = broker.resume_jobs() {
                tracing::warn!(error = %e, "looking for revocation jobs failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(JOB_POLL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }))
}
