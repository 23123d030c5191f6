//! The store's encoding of tasks and leases.
//!
//! Records are postcard (a compact, documented, stable serde format) behind a
//! one-byte record version, so a later schema can tell old records from new
//! ones and the migration hook can rewrite them. These are storage types:
//! the API converts them explicitly into its wire types.
//!
//! Sensitive fields (`handle_sealed`, `prompt_sealed`) hold AES-256-GCM
//! ciphertext from [`super::Sealer`]; nothing here is ever plaintext secret.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    Open,
    Completed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: u128,
    pub workload: String,
    pub tenant: Option<String>,
    pub purpose: String,
    pub on_behalf_of: String,
    pub prompt_sha256: [u8; 32],
    /// The prompt text, sealed, only when config keeps prompt text.
    pub prompt_sealed: Option<Vec<u8>>,
    pub tools: Vec<String>,
    pub created_at: i64,
    /// The hard deadline; no lease of the task outlives it.
    pub expires_at: i64,
    pub state: TaskState,
    pub completed_at: Option<i64>,
    /// Leases ever requested under the task (for the per-task cap).
    pub lease_count: u32,
}

/// The lease lifecycle. `Issuing` is the durable intent; the terminal
/// states are `Revoked`, `Expired` and `RolledBack`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LeaseState {
    Issuing,
    Active,
    Revoking,
    Revoked,
    Expired,
    Irrevocable,
    RolledBack,
    /// An irrevocable lease a responder gave up on, with a reason (recorded,
    /// never silent; the credential may still work until it expires).
    Abandoned,
}

impl LeaseState {
    pub const ALL: [LeaseState; 8] = [
        Self::Issuing,
        Self::Active,
        Self::Revoking,
        Self::Revoked,
        Self::Expired,
        Self::Irrevocable,
        Self::RolledBack,
        Self::Abandoned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issuing => "issuing",
            Self::Active => "active",
            Self::Revoking => "revoking",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::Irrevocable => "irrevocable",
            Self::RolledBack => "rolled_back",
            Self::Abandoned => "abandoned",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No further transition is possible.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Revoked | Self::Expired | Self::RolledBack | Self::Abandoned
        )
    }
}

/// Why a lease is being revoked; it decides the terminal state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RevokeCause {
    TaskComplete,
    Expiry,
    Manual,
    /// Start-up found the intent of an issue that never completed.
    Recovery,
    /// The provider call failed after the intent was written.
    IssueFailed,
    /// A responder's mass revocation job.
    Job,
}

impl RevokeCause {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TaskComplete => "task_complete",
            Self::Expiry => "expiry",
            Self::Manual => "manual",
            Self::Recovery => "recovery",
            Self::IssueFailed => "issue_failed",
            Self::Job => "mass_revocation",
        }
    }

    /// The state a lease ends in once this revocation succeeds.
    pub fn terminal_state(self) -> LeaseState {
        match self {
            Self::Expiry => LeaseState::Expired,
            Self::Recovery | Self::IssueFailed => LeaseState::RolledBack,
            Self::TaskComplete | Self::Manual | Self::Job => LeaseState::Revoked,
        }
    }

    /// Without a stored handle the provider must find the credential by
    /// lease id (`Provider::rollback`).
    pub fn uses_rollback(self) -> bool {
        matches!(self, Self::Recovery | Self::IssueFailed)
    }
}

/// The durable record of a revocation in progress or done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub cause: RevokeCause,
    /// Who asked (operator or workload id), if anyone did.
    pub requested_by: Option<String>,
    pub requested_at: i64,
    pub attempts: u32,
    /// The key of the lease's entry in the revocation queue.
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    /// The mass revocation job that claimed the lease, if one did.
    pub job: Option<u128>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub id: u128,
    pub task_id: u128,
    pub workload: String,
    pub tenant: Option<String>,
    pub on_behalf_of: String,
    pub provider: String,
    pub role: String,
    pub scope: Vec<String>,
    pub requested_ttl_seconds: u64,
    pub created_at: i64,
    pub issued_at: Option<i64>,
    /// The deadline, fixed at intent time; activation may only lower it.
    pub expires_at: i64,
    pub state: LeaseState,
    /// The provider's revocation handle, sealed. Dropped once revoked.
    pub handle_sealed: Option<Vec<u8>>,
    pub description: Option<String>,
    pub revocation: Option<Revocation>,
    pub ended_at: Option<i64>,
}

/// Where a lease claimed by a job counts in the job's progress:
/// `revoked` (ended, any cause), `revoking` (not tried yet), `retrying`
/// (tried and failed, trying again), `irrevocable`, `abandoned`.
pub fn job_bucket(l: &LeaseRecord) -> &'static str {
    match l.state {
        LeaseState::Revoked | LeaseState::Expired | LeaseState::RolledBack => "revoked",
        LeaseState::Revoking if l.revocation.as_ref().is_some_and(|r| r.attempts > 0) => "retrying",
        LeaseState::Revoking => "revoking",
        LeaseState::Irrevocable => "irrevocable",
        LeaseState::Abandoned => "abandoned",
        LeaseState::Active | LeaseState::Issuing => "pending",
    }
}

/// The buckets of [`job_bucket`], in display order.
pub const JOB_BUCKETS: [&str; 6] = [
    "revoked",
    "revoking",
    "retrying",
    "irrevocable",
    "abandoned",
    "pending",
];

/// What a mass revocation job selects. Every given field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    pub workload: Option<String>,
    pub tenant: Option<String>,
    pub task: Option<u128>,
    pub user: Option<String>,
    pub provider: Option<String>,
    pub role: Option<String>,
    /// Lease states to take back (default: active and irrevocable).
    pub states: Vec<LeaseState>,
    pub issued_after: Option<i64>,
    pub issued_before: Option<i64>,
    /// Everything (required when nothing else is given).
    pub all: bool,
}

impl Selector {
    pub fn matches(&self, l: &LeaseRecord) -> bool {
        let issued = l.issued_at.unwrap_or(l.created_at);
        self.workload.as_ref().is_none_or(|w| &l.workload == w)
            && self
                .tenant
                .as_ref()
                .is_none_or(|t| l.tenant.as_ref() == Some(t))
            && self.task.is_none_or(|t| l.task_id == t)
            && self.user.as_ref().is_none_or(|u| &l.on_behalf_of == u)
            && self.provider.as_ref().is_none_or(|p| &l.provider == p)
            && self.role.as_ref().is_none_or(|r| &l.role == r)
            && self.states.contains(&l.state)
            && self.issued_after.is_none_or(|a| issued >= a)
            && self.issued_before.is_none_or(|b| issued < b)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Still selecting leases, or some are still being revoked.
    Running,
    /// Every selected lease ended (some may be irrevocable: see the counts).
    Done,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }
}

/// A durable mass revocation: its selector and how far it got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: u128,
    pub selector: Selector,
    pub reason: String,
    pub fence: bool,
    pub created_by: String,
    pub created_at: i64,
    pub state: JobState,
    /// The last lease id looked at: a restarted job resumes after it.
    pub cursor: Option<u128>,
    pub scan_done: bool,
    pub scanned: u64,
    pub finished_at: Option<i64>,
    pub error: Option<String>,
}

/// Something that may get nothing new.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    /// `workload`, `tenant` or `user`
    pub kind: String,
    pub value: String,
    pub reason: String,
    pub created_by: String,
    pub created_at: i64,
    pub job: Option<u128>,
}

impl FenceRecord {
    pub fn key(kind: &str, value: &str) -> String {
        format!("{kind}:{value}")
    }
}

/// One decided tool call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    pub id: u128,
    pub task_id: u128,
    pub workload: String,
    pub tool: String,
    pub action: String,
    pub target: String,
    #[serde(with = "crate::store::digest")]
    pub arguments_sha256: String,
    /// `allow`, `deny` or `approval_required`.
    pub outcome: String,
    pub policies: Vec<String>,
    pub reasons: Vec<String>,
    pub max_ttl: Option<u64>,
    /// The justification, for break-glass calls.
    pub break_glass: Option<String>,
    pub approval_id: Option<u128>,
    pub lease_id: Option<u128>,
    #[serde(with = "crate::store::digest")]
    pub policy_version: String,
    pub created_at: i64,
}

/// The credential a call asked for, as an approval binds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialSpec {
    pub provider: String,
    pub role: String,
    pub ttl_seconds: u64,
    pub scope: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApprovalState {
    Pending,
    Approved,
    Denied,
    Expired,
    Consumed,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Expired => "expired",
            Self::Consumed => "consumed",
        }
    }
}

/// A human decision bound to the exact request it approves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    pub id: u128,
    pub task_id: u128,
    pub workload: String,
    pub tenant: Option<String>,
    pub on_behalf_of: String,
    /// SHA-256 of workload, task, tool, action, target, arguments and
    /// credential: the approval is good for that request and no other.
    pub request_hash: [u8; 32],
    pub tool: String,
    pub action: String,
    pub target: String,
    #[serde(with = "crate::store::digest")]
    pub arguments_sha256: String,
    pub credential: Option<CredentialSpec>,
    pub requested_by_call: u128,
    pub policies: Vec<String>,
    pub state: ApprovalState,
    pub created_at: i64,
    pub expires_at: i64,
    pub decided_by: Option<String>,
    pub decided_at: Option<i64>,
    pub comment: Option<String>,
    pub consumed_by_call: Option<u128>,
}

/// A task that used break-glass, awaiting an approver's sign-off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewRecord {
    pub task_id: u128,
    pub workload: String,
    pub on_behalf_of: String,
    /// (call id, tool, justification, time)
    pub calls: Vec<(u128, String, String, i64)>,
    pub created_at: i64,
    pub signed_off_by: Option<String>,
    pub signed_off_at: Option<i64>,
    pub comment: Option<String>,
}

/// Filters for listing leases. `after` is the paging cursor (exclusive).
#[derive(Debug, Clone, Default)]
pub struct LeaseQuery {
    pub workload: Option<String>,
    pub task: Option<u128>,
    pub provider: Option<String>,
    pub role: Option<String>,
    pub state: Option<LeaseState>,
    pub after: Option<u128>,
    pub limit: usize,
    /// Records examined per call at most; a page may come back short with a
    /// cursor when filters are selective.
    pub scan_budget: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_parse_and_terminals() {
        for s in LeaseState::ALL {
            assert_eq!(LeaseState::parse(s.as_str()), Some(s));
        }
        assert_eq!(LeaseState::parse("dead"), None);
        assert_eq!(RevokeCause::Expiry.terminal_state(), LeaseState::Expired);
        assert_eq!(
            RevokeCause::Recovery.terminal_state(),
            LeaseState::RolledBack
        );
        assert!(!LeaseState::Irrevocable.is_terminal());
    }
}
