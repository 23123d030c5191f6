//! What a call's decision is made on ([`Facts`]): the workload's open
//! task, its count of active leases and the workload's.
//!
//! They are read from a snapshot, or, for a plain lease request on a
//! cluster node, from the rows that node's writer last committed
//! (`Store::read_recent`: no round trip to the database). Those may be
//! stale where another node changed them since, so a decision made on them
//! is acted on only if it allows, and the transaction that writes its
//! intent refuses ([`DecidedOn`], `Conflict::Stale`) unless the task and
//! its count are still what it was made on; the request is then decided
//! again, on a snapshot. A refusal is always made on a snapshot.

use crate::auth::Workload;
use crate::domain::issue::TxnStep;
use crate::domain::{Broker, BrokerError};
use crate::ids::TaskId;
use crate::store::{Conflict, Reads, StoreError, TaskRecord, TaskState};

use super::CallParams;

/// What a decision is made on.
pub(super) struct Facts {
    pub(super) task: TaskRecord,
    pub(super) task_active: u64,
    pub(super) workload_active: u64,
    /// Read from the node's recent rows: what the intent's transaction
    /// checks is still so.
    pub(super) on: Option<DecidedOn>,
}

/// The rows a decision made on recent rows read, as it read them.
pub(super) struct DecidedOn {
    task: TaskRecord,
    active: u64,
}

impl DecidedOn {
    /// The intent transaction's check: the task and its count of active
    /// leases are what the decision was made on.
    pub(super) fn step(self) -> TxnStep {
        Box::new(move |txn| {
            let id = self.task.id;
            if txn.task(id)?.as_ref() != Some(&self.task) || txn.task_active(id)? != self.active {
                return Err(StoreError::Conflict(Conflict::Stale));
            }
            Ok(())
        })
    }
}

impl Broker {
    fn decision_reads(w: &Workload, task_id: TaskId) -> Reads {
        Reads::default()
            .task(task_id.0)
            .task_active(task_id.0)
            .workload_active(&w.id)
            .and_nothing_else()
    }

    /// The facts, from one snapshot (on PostgreSQL, one round trip).
    pub(super) fn facts(
        &self,
        w: &Workload,
        task_id: TaskId,
        now_ms: i64,
    ) -> Result<Facts, BrokerError> {
        let r = self.store.read()?;
        r.prefetch(&Self::decision_reads(w, task_id))?;
        let task = Self::open_task_of(&*r, w, task_id, now_ms)?;
        Ok(Facts {
            task_active: r.task_active(task.id)?,
            workload_active: r.workload_active(&w.id)?,
            task,
            on: None,
        })
    }

    /// Whether `p` may be decided on the node's recent rows: a lease asked
    /// for with nothing else (no approval, break-glass or lease reused),
    /// under policies that do not read the workload's count (which every
    /// node changes, so it is not checked again).
    pub(super) fn may_decide_on_recent(&self, p: &CallParams) -> bool {
        p.credential.is_some()
            && p.approval_id.is_none()
            && p.reuse_lease.is_none()
            && p.break_glass.is_none()
            && !self.policy.reads_workload_active()
    }

    /// The facts from the rows this node's writer last committed, if it
    /// has them all and the task is the workload's, open and unexpired
    /// there (`None`: decide on a snapshot).
    pub(super) fn recent_facts(&self, w: &Workload, task_id: TaskId, now_ms: i64) -> Option<Facts> {
        let r = self.store.read_recent(&Self::decision_reads(w, task_id))?;
        let task = Self::open_task_of(&*r, w, task_id, now_ms).ok()?;
        let (task_active, workload_active) =
            (r.task_active(task.id).ok()?, r.workload_active(&w.id).ok()?);
        Some(Facts {
            on: Some(DecidedOn {
                task: task.clone(),
                active: task_active,
            }),
            task,
            task_active,
            workload_active,
        })
    }

    /// The open, unexpired task of this workload.
    pub(in crate::domain) fn open_task_of(
        r: &dyn crate::store::ReadTxn,
        w: &Workload,
        task_id: TaskId,
        now_ms: i64,
    ) -> Result<TaskRecord, BrokerError> {
        let task = r.task(task_id.0)?.ok_or(BrokerError::NotFound {
            code: "task_not_found",
        })?;
        if task.workload != w.id {
            return Err(BrokerError::NotFound {
                code: "task_not_found",
            });
        }
        if task.state != TaskState::Open {
            return Err(BrokerError::conflict(
                "task_completed",
                "the task is completed",
            ));
        }
        if task.expires_at <= now_ms {
            return Err(BrokerError::conflict(
                "task_expired",
                "the task's deadline has passed",
            ));
        }
        Ok(task)
    }
}
