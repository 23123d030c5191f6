//! The broker's lifecycle, policy, incident and event tests again, with the
//! store in PostgreSQL: each test's broker gets its own throwaway database
//! (the harness sees `ON_POSTGRES`), and must give the answers it gives on
//! redb. The modules are the same files as in `tests/broker`.

// Test code may unwrap and panic: a failure is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

pub const ON_POSTGRES: bool = true;

#[path = "../broker/harness.rs"]
mod harness;

#[path = "../broker/events.rs"]
mod events;
#[path = "../broker/incident.rs"]
mod incident;
#[path = "../broker/lifecycle.rs"]
mod lifecycle;
#[path = "../broker/policy.rs"]
mod policy;
#[path = "../broker/retention.rs"]
mod retention;
