//! The store's errors: a refusal ([`Conflict`]: checked, nothing written)
//! or a failure to do its job.

use std::path::PathBuf;

use super::records::LeaseState;

/// A domain-level refusal: the operation was checked and not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("task not found")]
    TaskNotFound,
    #[error("task is completed")]
    TaskCompleted,
    #[error("task has expired")]
    TaskExpired,
    #[error("lease would outlive its task")]
    OutlivesTask,
    #[error("task already holds its maximum of {0} leases")]
    TaskLeaseCap(u32),
    #[error("the workload already holds its maximum of {0} active leases")]
    WorkloadLeaseCap(u64),
    #[error("lease not found")]
    LeaseNotFound,
    #[error("lease is {}", .0.as_str())]
    LeaseState(LeaseState),
    #[error("record already exists")]
    Duplicate,
    #[error("{0}")]
    Chain(String),
    #[error("approval not found")]
    ApprovalNotFound,
    #[error("{0}")]
    Approval(String),
    #[error("no review for this task")]
    ReviewNotFound,
    #[error("no such fence")]
    FenceNotFound,
    #[error("the workload, tenant or user is fenced")]
    Fenced,
    /// Leader-only work by a node that no longer leads with this epoch
    /// (a deposed leader's late write).
    #[error("this broker no longer leads the cluster (epoch {0})")]
    NotLeader(u64),
    /// What a decision was made on changed before its write (the request
    /// decides again, on a snapshot).
    #[error("what the decision read changed before its write")]
    Stale,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Conflict(Conflict),
    #[error("the store file {path} is in use by another process (is another leasehold running?)")]
    Locked { path: PathBuf },
    #[error("store I/O error: {0}")]
    Io(String),
    #[error("store commit failed: {0}")]
    Commit(String),
    /// The store's filesystem is (nearly) full: nothing was written; the
    /// write can be retried once space is freed.
    #[error("no space for the store: {0}")]
    NoSpace(String),
    #[error("the transaction was aborted because another operation in its batch failed to write")]
    Aborted,
    #[error("the store is closed")]
    Closed,
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    #[error(
        "the store key (fingerprint {given}) does not match the key this store was created with \
         (fingerprint {expected}); refusing to start rather than re-key silently"
    )]
    WrongKey { given: String, expected: String },
    #[error("this is not a leasehold store: {0}")]
    NotAStore(String),
    #[error("the store {0} is not empty: copy only into a new store")]
    NotEmpty(String),
    #[error(
        "the store has schema version {found}, newer than this build supports ({supported}); upgrade leasehold"
    )]
    NewerSchema { found: u32, supported: u32 },
    #[error("no migration from schema version {from} towards {to}")]
    NoMigration { from: u32, to: u32 },
    #[error(
        "the store has schema version {found}, older than this build reads ({supported}) without \
         migrating it; start this build's broker on it once (it migrates the store as it opens), \
         or read it with the build that wrote it"
    )]
    OlderSchema { found: u32, supported: u32 },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Io(e.to_string())
            }
        }
    )*};
}
from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError
);

impl StoreError {
    /// The store could not do its job (as opposed to refusing a request).
    pub fn is_unavailable(&self) -> bool {
        !matches!(self, Self::Conflict(_))
    }
}

/// The write-ahead log's appends (`wal.rs`): why one failed.
#[derive(Debug)]
pub(super) enum AppendError {
    /// No space (or quota) to grow or write the log: nothing was relied on.
    NoSpace(String),
    /// Anything else, including any failed sync: the log's state on disk is
    /// unknown.
    Failed(String),
}

impl AppendError {
    pub(super) fn of(path: &std::path::Path, e: &std::io::Error, space_may_be_why: bool) -> Self {
        let text = format!("{}: {e}", path.display());
        // ENOSPC and EDQUOT
        match e.raw_os_error() {
            Some(28 | 122) if space_may_be_why => Self::NoSpace(text),
            _ => Self::Failed(text),
        }
    }
}

impl std::fmt::Display for AppendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoSpace(t) | Self::Failed(t) => f.write_str(t),
        }
    }
}
