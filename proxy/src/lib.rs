//! `leasehold proxy`: an HTTP egress proxy for assistants' processes. An
//! assistant sets `HTTP_PROXY`/`HTTPS_PROXY` with its task's proxy
//! credential; each request to a routed destination becomes a broker call
//! decided by policy, and leaves with a credential injected that the
//! assistant never sees (and that responses never carry back).
//!
//! ```text
//! assistant ──HTTP / CONNECT──► proxy ──POST /v1/proxy/calls──► broker
//!                                 │  (decision; a lease, or reuse of one)
//!                                 └──request + credential──► upstream
//! ```
//!
//! Map: `config` (TOML, checked), `route` (matching, templates, address
//! rules), `connect` (resolve and check every connection, TLS), `broker`
//! (the call), `inject` (bearer, basic, header, SigV4; what to redact),
//! `redact` (headers and streaming bodies), `ca` (the local CA for
//! `CONNECT`), `serve` (the listener and each request's path), `decide`
//! (the broker's decision and the leases held), `relay` (the answer back).

#![forbid(unsafe_code)]

mod broker;
mod ca;
pub mod config;
mod connect;
mod decide;
mod inject;
mod redact;
mod relay;
mod route;
mod serve;

pub use config::{ConfigError, ProxyConfig};
pub use connect::{Resolve, SystemResolver};
pub use serve::{Running, start, start_with};

/// The wall clock: SigV4 dates, lease ends, certificate validity. The
/// proxy is its own process and keeps no durable state, so it reads the
/// clock here, in one place.
#[allow(clippy::disallowed_methods)]
pub(crate) fn now() -> std::time::SystemTime {
    std::time::SystemTime::now()
}

pub(crate) fn now_ms() -> i64 {
    now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What `leasehold proxy --check` verifies beyond the TOML: the broker
/// token file, the local CA (if it exists yet), every upstream CA file.
/// Returns notes for the operator.
pub fn check(config: &ProxyConfig) -> Result<Vec<String>, String> {
    let mut notes = Vec::new();
    broker::Broker::new(&config.broker)?;
    if config.ca_dir.join("ca.pem").exists() || config.ca_dir.join("ca-key.pem").exists() {
        let ca = ca::LocalCa::open(&config.ca_dir)?;
        notes.push(format!("local CA: {}", ca.cert_path.display()));
    } else {
        notes.push(format!(
            "local CA: none yet; created at the first start in {}",
            config.ca_dir.display()
        ));
    }
    for f in std::iter::once(config.upstream_ca_file.as_ref())
        .chain(config.routes.iter().map(|r| r.upstream_ca_file.as_ref()))
        .flatten()
    {
        serve::upstream_tls(Some(f)).map_err(|e| format!("upstream CA {e}"))?;
    }
    Ok(notes)
}
