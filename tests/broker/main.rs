//! The broker's integration tests: one test binary (every file under
//! `tests/` would otherwise be a separate, slow-to-link binary), each module
//! a scenario, all against a real broker started by `harness`.

// Test code may unwrap and panic: a failure is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// The store of every in-process broker the harness starts: redb here;
/// `tests/broker_pg` runs some of these modules again on PostgreSQL.
pub const ON_POSTGRES: bool = false;

mod harness;

mod auth;
mod aws;
mod azure;
mod bad_input;
mod binding;
mod cli;
mod cluster;
mod config_examples;
mod conformance;
mod console;
mod crash;
mod disk_full;
mod events;
mod expiry;
mod fuzz;
mod hardening;
mod incident;
mod isolation;
mod layers;
mod lifecycle;
mod limits;
mod metrics;
mod openapi;
mod plugins;
mod policy;
mod postgres;
mod proxy;
mod python_sdk;
mod registered;
mod restart;
mod retention;
mod retry;
mod secrets;
mod shutdown;
mod tamper;
mod tls;
mod vault;
