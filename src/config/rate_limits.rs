//! `[server.rate_limits]`: the HTTP layer's token buckets and in-flight cap
//! (enforced in `api::limits`).

use serde::{Deserialize, Serialize};

/// `[server.limits]`. A rate of 0 turns that limit off.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per second one workload may make (sustained)...
    #[serde(default = "defaults::per_workload")]
    pub per_workload_per_second: f64,
    /// ...and in a burst.
    #[serde(default = "defaults::per_workload_burst")]
    pub per_workload_burst: f64,
    /// Requests per second from one source address, before authentication.
    #[serde(default = "defaults::per_address")]
    pub per_address_per_second: f64,
    #[serde(default = "defaults::per_address_burst")]
    pub per_address_burst: f64,
    /// Failed authentications per second from one source address; beyond
    /// them, that address gets 429 without its token being looked at.
    #[serde(default = "defaults::auth_failures")]
    pub auth_failures_per_second: f64,
    #[serde(default = "defaults::auth_failures_burst")]
    pub auth_failures_burst: f64,
    /// Requests in flight at once; more get 503 with Retry-After.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: usize,
    /// Requests one caller (a workload, an operator; before its credential
    /// is verified, that credential) may have in flight at once, counted
    /// before `max_in_flight`: more get 429 with Retry-After at once, so no
    /// single caller can take the whole budget. 0: no cap. Keep it well
    /// under `max_in_flight` (at or above it, it caps nothing).
    #[serde(default = "defaults::per_caller_in_flight")]
    pub per_caller_in_flight: usize,
    /// Long-polls (`GET /v1/approvals/{id}?wait=`) one caller may hold at
    /// once; more answer 429 at once. 0: no cap.
    #[serde(default = "defaults::per_caller_long_polls")]
    pub per_caller_long_polls: usize,
}

mod defaults {
    pub fn per_workload() -> f64 {
        1000.0
    }
    pub fn per_workload_burst() -> f64 {
        2000.0
    }
    pub fn per_address() -> f64 {
        5000.0
    }
    pub fn per_address_burst() -> f64 {
        10_000.0
    }
    pub fn auth_failures() -> f64 {
        5.0
    }
    pub fn auth_failures_burst() -> f64 {
        20.0
    }
    pub fn max_in_flight() -> usize {
        4096
    }
    pub fn per_caller_in_flight() -> usize {
        256
    }
    pub fn per_caller_long_polls() -> usize {
        32
    }
    pub fn max_connections() -> usize {
        8192
    }
    pub fn per_address_connections() -> usize {
        256
    }
    pub fn header_timeout_seconds() -> u64 {
        15
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_workload_per_second: defaults::per_workload(),
            per_workload_burst: defaults::per_workload_burst(),
            per_address_per_second: defaults::per_address(),
            per_address_burst: defaults::per_address_burst(),
            auth_failures_per_second: defaults::auth_failures(),
            auth_failures_burst: defaults::auth_failures_burst(),
            max_in_flight: defaults::max_in_flight(),
            per_caller_in_flight: defaults::per_caller_in_flight(),
            per_caller_long_polls: defaults::per_caller_long_polls(),
        }
    }
}

impl RateLimitConfig {
    /// A problem with the values: (field, message).
    pub fn problem(&self) -> Option<(&'static str, &'static str)> {
        let pairs = [
            (
                "per_workload_per_second",
                self.per_workload_per_second,
                self.per_workload_burst,
            ),
            (
                "per_address_per_second",
                self.per_address_per_second,
                self.per_address_burst,
            ),
            (
                "auth_failures_per_second",
                self.auth_failures_per_second,
                self.auth_failures_burst,
            ),
        ];
        for (field, rate, burst) in pairs {
            if !rate.is_finite() || rate < 0.0 {
                return Some((field, "must be 0 (off) or a positive number"));
            }
            if rate > 0.0 && (!burst.is_finite() || burst < 1.0) {
                return Some((field, "its burst must be at least 1"));
            }
        }
        if self.max_in_flight == 0 {
            return Some(("max_in_flight", "must be positive"));
        }

        None
    }
}

/// `[server.connections]`: what one connection, and one address, may hold
/// (enforced where connections are accepted, `listen`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Connections open at once. Each is a file descriptor: keep it under
    /// the process's limit (`LimitNOFILE`) with room for the store, the
    /// providers and the logs; the broker lowers it to fit the limit it
    /// finds, and says so.
    #[serde(default = "defaults::max_connections")]
    pub max: usize,
    /// Connections open at once from one source address; more are closed
    /// as they arrive (with a log line and a metric).
    #[serde(default = "defaults::per_address_connections")]
    pub per_address: usize,
    /// The longest a connection may take to send a request's headers, or
    /// sit idle between requests, or finish its TLS handshake, before it is
    /// closed.
    #[serde(default = "defaults::header_timeout_seconds")]
    pub header_timeout_seconds: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max: defaults::max_connections(),
            per_address: defaults::per_address_connections(),
            header_timeout_seconds: defaults::header_timeout_seconds(),
        }
    }
}

impl ConnectionLimits {
    /// A problem with the values: (field, message).
    pub fn problem(&self) -> Option<(&'static str, &'static str)> {
        if self.max == 0 {
            return Some(("max", "must be positive"));
        }
        if self.per_address == 0 || self.per_address > self.max {
            return Some(("per_address", "must be between 1 and `max`"));
        }
        if !(1..=300).contains(&self.header_timeout_seconds) {
            return Some(("header_timeout_seconds", "must be between 1 and 300"));
        }
        None
    }
}
