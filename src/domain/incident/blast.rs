//! Blast radius: every task, call, decision and lease of a workload in a
//! window, and which leases are still live.

use crate::auth::Caller;
use crate::config::OperatorRole;
use crate::domain::{Broker, BrokerError};
use crate::ids::LeaseId;
use crate::store::{FenceRecord, LeaseState};

/// Everything one workload did in a window.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct BlastRadius {
    pub workload: String,
    pub since: String,
    pub tasks: Vec<RadiusTask>,
    pub totals: RadiusTotals,
    /// Whether the workload is fenced now.
    pub fenced: bool,
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct RadiusTotals {
    pub tasks: u64,
    pub calls: u64,
    pub leases: u64,
    pub live_leases: u64,
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct RadiusTask {
    pub task_id: String,
    pub on_behalf_of: String,
    pub purpose: String,
    pub created_at: String,
    /// `open` or `completed`
    pub state: &'static str,
    pub calls: Vec<RadiusCall>,
    pub leases: Vec<RadiusLease>,
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct RadiusCall {
    pub call_id: String,
    pub tool: String,
    pub action: String,
    pub resource: String,
    pub decision: String,
    pub policies: Vec<String>,
    pub break_glass: bool,
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct RadiusLease {
    pub lease_id: String,
    pub provider: String,
    pub role: String,
    pub state: &'static str,
    /// Still usable, or not yet known to be revoked.
    pub live: bool,
    pub expires_at: String,
}

impl Broker {
    /// Everything a workload did in a window: tasks, calls and decisions,
    /// leases and which are still live.
    pub fn blast_radius(
        &self,
        caller: &Caller,
        workload: &str,
        since: i64,
        until: i64,
    ) -> Result<BlastRadius, BrokerError> {
        if !caller.has_any_role(&[OperatorRole::Responder, OperatorRole::Admin]) {
            return Err(BrokerError::Forbidden {
                code: "forbidden",
                message: "the blast radius is for responders and admins".into(),
            });
        }
        let workload = &crate::check::identifier("workload", workload)?;
        let r = self.store.read()?;
        let ts = |ms: i64| crate::clock::rfc3339(crate::clock::Timestamp::from_unix_millis(ms));
        let mut tasks = Vec::new();
        let (mut live, mut leases_total, mut calls_total) = (0u64, 0u64, 0u64);
        for t in r.workload_tasks(workload, since, 10_000)? {
            if t.created_at >= until {
                break;
            }
            let calls = r.task_calls(t.id)?;
            let leases = r.task_leases(t.id)?;
            calls_total += calls.len() as u64;
            leases_total += leases.len() as u64;
            let leases = leases
                .iter()
                .map(|l| {
                    let is_live = matches!(
                        l.state,
                        LeaseState::Active
                            | LeaseState::Issuing
                            | LeaseState::Revoking
                            | LeaseState::Irrevocable
                            | LeaseState::Abandoned
                    );
                    live += u64::from(is_live);
                    RadiusLease {
                        lease_id: LeaseId(l.id).to_string(),
                        provider: l.provider.clone(),
                        role: l.role.clone(),
                        state: l.state.as_str(),
                        live: is_live,
                        expires_at: ts(l.expires_at),
                    }
                })
                .collect();
            let calls = calls
                .iter()
                .map(|c| RadiusCall {
                    call_id: crate::ids::CallId(c.id).to_string(),
                    tool: c.tool.clone(),
                    action: c.action.clone(),
                    resource: c.target.clone(),
                    decision: c.outcome.clone(),
                    policies: c.policies.clone(),
                    break_glass: c.break_glass.is_some(),
                })
                .collect();
            tasks.push(RadiusTask {
                task_id: crate::ids::TaskId(t.id).to_string(),
                on_behalf_of: t.on_behalf_of.clone(),
                purpose: t.purpose.clone(),
                created_at: ts(t.created_at),
                state: if t.state == crate::store::TaskState::Completed {
                    "completed"
                } else {
                    "open"
                },
                calls,
                leases,
            });
        }
        Ok(BlastRadius {
            workload: workload.to_owned(),
            since: ts(since),
            totals: RadiusTotals {
                tasks: tasks.len() as u64,
                calls: calls_total,
                leases: leases_total,
                live_leases: live,
            },
            tasks,
            fenced: self.fences.any(&[FenceRecord::key("workload", workload)]),
        })
    }
}
