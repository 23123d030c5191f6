//! `[retention]`: what leaves the store once it has ended long enough ago
//! (run by `domain::retention` on the leader).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What leaves the store once it has ended long enough ago, so a broker
/// running for months stays the size of its window.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Off: nothing is ever removed (the store grows without bound).
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Ended tasks (completed, or past their deadline) are removed this
    /// long after they ended, with their calls, leases, approvals and
    /// review; finished revocation jobs with their claims. Nothing live
    /// goes: an open task, a lease not yet ended (an irrevocable one
    /// stays until abandoned), an undecided approval, an unsigned review,
    /// a running job. Default 30 days.
    #[serde(default = "defaults::keep_ended_seconds")]
    pub keep_ended_seconds: u64,
    /// Whether events older than `keep_ended_seconds` (and never younger
    /// than `audit.prune_min_age_seconds`) are archived into
    /// `audit.archive_dir` (the export format, verified before anything
    /// is removed) and pruned from the store. Default: on when
    /// `audit.archive_dir` is set. Off, the chain grows without bound.
    #[serde(default)]
    pub archive_events: Option<bool>,
    /// How often the leader looks for what to remove.
    #[serde(default = "defaults::retention_interval_seconds")]
    pub interval_seconds: u64,
    /// Records removed per store transaction at most, so a batch never
    /// holds up the writer for more than a few milliseconds.
    #[serde(default = "defaults::retention_batch_records")]
    pub batch_records: usize,
    /// Events pruned per store transaction at most (each step is recorded
    /// as its own `chain.pruned`).
    #[serde(default = "defaults::retention_prune_step_events")]
    pub prune_step_events: u64,
    /// Events per archive file at most; a larger backlog takes several.
    #[serde(default = "defaults::retention_archive_max_events")]
    pub archive_max_events: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            keep_ended_seconds: defaults::keep_ended_seconds(),
            archive_events: None,
            interval_seconds: defaults::retention_interval_seconds(),
            batch_records: defaults::retention_batch_records(),
            prune_step_events: defaults::retention_prune_step_events(),
            archive_max_events: defaults::retention_archive_max_events(),
        }
    }
}

impl RetentionConfig {
    /// Whether events are archived and pruned, given where archives go.
    pub fn archives_events(&self, archive_dir: Option<&Path>) -> bool {
        self.enabled && self.archive_events.unwrap_or(archive_dir.is_some())
    }
}

mod defaults {
    pub fn yes() -> bool {
        true
    }
    pub fn keep_ended_seconds() -> u64 {
        30 * 86_400
    }
    pub fn retention_interval_seconds() -> u64 {
        300
    }
    pub fn retention_batch_records() -> usize {
        100
    }
    pub fn retention_prune_step_events() -> u64 {
        128
    }
    pub fn retention_archive_max_events() -> u64 {
        1_000_000
    }
}
