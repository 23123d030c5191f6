//! Provider plugins: a provider that runs as its own process and speaks
//! gRPC over a Unix socket, so a platform team adds a provider without
//! forking the broker.
//!
//! - [`wire`]: the protocol, generated from
//!   `proto/leasehold/plugin/v1/provider.proto` (which documents it).
//! - The broker's side: the catalog entry `type = "plugin"` ([`KIND`],
//!   [`PluginConfig`]) and [`PluginProvider`], which starts the program
//!   after checking its SHA-256, supervises it (restarts with backoff) and
//!   implements the in-process `Provider` trait by calling it.
//! - [`kit`]: the plugin's side for Rust: any `ProviderSettings` type
//!   becomes a plugin binary with `kit::main`.

#![forbid(unsafe_code)]

/// The protocol's messages and services, generated at build time.
#[allow(
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
pub mod wire {
    tonic::include_proto!("leasehold.plugin.v1");
}

mod catalog;
mod convert;
mod host;
pub mod kit;
mod lane;
mod process;

pub use catalog::{KIND, PluginConfig};
pub use host::PluginProvider;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The first field of the line a plugin prints on stdout once it serves.
pub const HANDSHAKE_PREFIX: &str = "leasehold-plugin";
/// Where the plugin must listen: a socket path in a 0700 directory.
pub const SOCKET_ENV: &str = "LEASEHOLD_PLUGIN_SOCKET";
/// The protocol versions the broker speaks, comma separated.
pub const PROTOCOL_ENV: &str = "LEASEHOLD_PLUGIN_PROTOCOL";
/// gRPC messages may be this large (a revocation batch of thousands).
pub(crate) const MAX_MESSAGE: usize = 64 << 20;
