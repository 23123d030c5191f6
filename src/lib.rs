//! leasehold: a secrets broker that leases just-in-time credentials to
//! AI-assistant workloads for one bounded task at a time.
//!
//! Start at [`server::run`]; the bird's-eye view is in `ARCHITECTURE.md`.
//! Dependency direction: `api -> auth, task, lease -> store, providers`;
//! `reaper` drives expiry and revocation through the same broker.

#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod auth;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dev;
pub mod domain;
pub mod hex;
pub mod ids;
pub mod listen;
pub mod logfmt;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod preflight;
pub mod providers;
pub mod registry;
pub mod server;
pub mod store;

/// Install ring as the process-wide rustls provider (TLS server, JWKS and
/// CLI clients). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
