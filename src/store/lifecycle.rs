//! What every backend shares: the inputs and outputs of the write
//! operations (an activation, a completion, a revocation's cause) and the
//! lease state machine's pure rules, so a second backend computes the
//! same records and events as redb does.

use super::records::{LeaseRecord, LeaseState, Revocation, RevokeCause, TaskRecord};

/// The outcome of one revocation attempt, as decided by the reaper.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The provider confirmed: the lease reaches its terminal state.
    /// `note`: how, when the provider can revoke more than one way; it is
    /// appended to the lease's description (and so to its event).
    Done { lease: u128, note: Option<String> },
    /// It failed: try again at `at`. `irrevocable` marks that the retry
    /// budget is spent (the lease keeps being retried, slowly).
    Retry {
        lease: u128,
        at: i64,
        error: String,
        irrevocable: bool,
    },
}

/// What activation writes.
#[derive(Debug, Clone)]
pub struct Activation {
    pub lease: u128,
    pub handle_sealed: Vec<u8>,
    pub issued_at: i64,
    pub expires_at: i64,
    pub description: String,
}

impl Activation {
    /// The record this activation makes of its `issuing` intent.
    pub fn apply(&self, rec: &mut LeaseRecord) {
        rec.state = LeaseState::Active;
        rec.handle_sealed = Some(self.handle_sealed.clone());
        rec.issued_at = Some(self.issued_at);
        rec.expires_at = self.expires_at;
        rec.description = Some(self.description.clone());
    }
}

/// The revocation `why` asks for at `now`, carrying over what the lease's
/// earlier revocation knew: its attempts, last error and job. The cause is
/// a job's, else the one it already has (a lease being revoked keeps its
/// first cause), else `why.cause`.
fn revocation(rec: &LeaseRecord, why: Why<'_>, now: i64) -> Revocation {
    let earlier = rec.revocation.as_ref();
    let cause = match (why.job, rec.state, earlier) {
        (Some(_), _, _) => RevokeCause::Job,
        (None, LeaseState::Irrevocable | LeaseState::Revoking, Some(r)) => r.cause,
        _ => why.cause,
    };
    Revocation {
        cause,
        requested_by: why.by.map(str::to_owned),
        requested_at: now,
        attempts: earlier.map_or(0, |r| r.attempts),
        next_attempt_at: now,
        last_error: earlier.and_then(|r| r.last_error.clone()),
        job: why.job.or_else(|| earlier.and_then(|r| r.job)),
    }
}

/// The record a lease becomes when it is queued for revocation at `at`.
/// The store writes it; task completion uses it to render events ahead
/// (as activation uses `Activation::apply`).
pub fn queued_revocation(mut rec: LeaseRecord, why: Why<'_>, now: i64, at: i64) -> LeaseRecord {
    rec.revocation = Some(Revocation {
        next_attempt_at: at,
        ..revocation(&rec, why, now)
    });
    rec.state = LeaseState::Revoking;
    rec
}

/// The record a lease of a local provider becomes when it is revoked in
/// the transaction.
pub fn local_revocation(mut rec: LeaseRecord, why: Why<'_>, now: i64) -> LeaseRecord {
    let r = revocation(&rec, why, now);
    rec.state = r.cause.terminal_state();
    rec.ended_at = Some(now);
    rec.handle_sealed = None;
    rec.revocation = Some(Revocation {
        attempts: r.attempts + 1,
        last_error: None,
        ..r
    });
    rec
}

/// Result of a task completion: the task, the leases this completion claimed
/// for immediate revocation, those it revoked in the transaction (local
/// providers), and every lease of the task.
#[derive(Debug)]
pub struct Completion {
    pub task: TaskRecord,
    pub claimed: Vec<LeaseRecord>,
    pub revoked: Vec<LeaseRecord>,
    pub all: Vec<LeaseRecord>,
}

/// What a revocation request did: the lease as it is now, whether it was
/// queued (for the caller to attempt) and whether anything changed.
#[derive(Debug)]
pub struct RevokeRequest {
    pub rec: LeaseRecord,
    pub queued: bool,
    pub changed: bool,
}

/// What one expiry pass did.
#[derive(Debug, Default)]
pub struct ExpiryPass {
    /// Index entries looked at (the pass is complete when fewer than asked).
    pub scanned: usize,
    /// Leases revoked (local providers) or queued, as they are now.
    pub handled: Vec<LeaseRecord>,
    /// Providers with newly queued revocations.
    pub queued_providers: Vec<String>,
}

/// Why a lease is being revoked, and by whom.
#[derive(Clone, Copy, Debug)]
pub struct Why<'a> {
    pub cause: RevokeCause,
    pub by: Option<&'a str>,
    pub job: Option<u128>,
}

impl Why<'_> {
    pub fn of(cause: RevokeCause) -> Self {
        Self {
            cause,
            by: None,
            job: None,
        }
    }
}

/// Providers whose revocation is local to this store (the token provider):
/// their leases are revoked inside the transaction that decides it.
pub type Local = std::collections::BTreeSet<String>;

/// Something that takes its place in the event chain (`audit::Pending`):
/// the store links and stores it without knowing its format.
pub trait Chained {
    /// Append the bytes of the event at `seq` after `prev` to `out`, and
    /// return their hash.
    fn seal_into(&self, seq: u64, prev: &[u8; 32], out: &mut Vec<u8>) -> [u8; 32];
    /// At most how many bytes `seal_into` appends (an event block is closed
    /// before an event would take it past its size).
    fn size_hint(&self) -> usize;
    /// The task the event belongs to, for the per-task index.
    fn task(&self) -> Option<u128>;
}

/// The last event of the chain (seq 0 and a zero hash before the first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl ChainHead {
    pub fn to_bytes(self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[..8].copy_from_slice(&self.seq.to_be_bytes());
        b[8..].copy_from_slice(&self.hash);
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let seq = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
        let hash = b.get(8..40)?.try_into().ok()?;
        Some(Self { seq, hash })
    }
}

/// One event as stored: its place, hash, task and canonical bytes.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub hash: [u8; 32],
    pub task: Option<u128>,
    pub bytes: Vec<u8>,
}
