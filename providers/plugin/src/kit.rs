//! The plugin's side, for Rust: a provider crate becomes a plugin binary
//! with a few lines.
//!
//! ```no_run
//! # #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)] struct MyConfig;
//! # #[async_trait::async_trait]
//! # impl leasehold_provider::ProviderSettings for MyConfig {
//! #     const TYPE: &'static str = "mine";
//! #     fn roles(&self) -> Vec<(&str, u64)> { vec![] }
//! #     fn validate(&self, _: &leasehold_provider::BrokerLimits) -> Result<(), leasehold_provider::ConfigError> { Ok(()) }
//! #     fn build(&self, _: &leasehold_provider::BuildContext) -> Result<leasehold_provider::Built, String> { Err("".into()) }
//! # }
//! fn main() -> std::process::ExitCode {
//!     leasehold_plugin::kit::main(leasehold_plugin::kit::Plugin::<MyConfig>::new(
//!         "leasehold-plugin-mine",
//!         env!("CARGO_PKG_VERSION"),
//!     ))
//! }
//! ```
//!
//! The kit listens on the socket the broker names, prints the handshake
//! line, parses the configuration the broker sends with the provider's own
//! `ProviderSettings` (so a built-in provider and its plugin share every
//! check), builds the provider and answers each call through the
//! `Provider` trait. It logs to stderr (which the broker forwards) with
//! `RUST_LOG` (default `info`), never a credential, and exits when the
//! broker goes away (its stdin ends).

use std::io::Write;
use std::marker::PhantomData;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use leasehold_provider::{
    BrokerLimits, BuildContext, Denylist, LeaseSpec, Provider, ProviderError, ProviderSettings,
    Timestamp,
};
use tonic::{Request, Response, Status};

use crate::convert::{
    credential_from_wire, error_to_wire, found_from_wire, found_to_wire, issued_to_wire,
    revoke_from_wire, spec_from_wire,
};
use crate::wire::{self, provider_server::ProviderServer};
use crate::{HANDSHAKE_PREFIX, MAX_MESSAGE, PROTOCOL_VERSION, SOCKET_ENV};

/// Which roles take which scopes, for `Describe`.
type Scopes<T> = fn(&T, &str) -> Vec<String>;

/// What the kit needs beyond the provider: the plugin's name and version,
/// and the capabilities it declares.
pub struct Plugin<T> {
    name: &'static str,
    version: &'static str,
    revocable: bool,
    scopes: Option<Scopes<T>>,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Plugin<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl<T: ProviderSettings> Plugin<T> {
    pub fn new(name: &'static str, version: &'static str) -> Self {
        Self {
            name,
            version,
            revocable: true,
            scopes: None,
            _t: PhantomData,
        }
    }

    /// The provider's credentials cannot be revoked, only outlived.
    pub fn expiry_only(mut self) -> Self {
        self.revocable = false;
        self
    }

    /// The scopes each role accepts, shown by `Describe`.
    pub fn scopes(mut self, scopes: Scopes<T>) -> Self {
        self.scopes = Some(scopes);
        self
    }
}

/// The plugin binary's `main`: serve until the broker goes away.
pub fn main<T: ProviderSettings>(plugin: Plugin<T>) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    // one TLS crypto provider for the process, whatever features the
    // plugin's dependencies turn on (rustls refuses to pick between two)
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(socket) = std::env::var_os(SOCKET_ENV) else {
        eprintln!(
            "{}: this is a leasehold provider plugin. The broker starts it from a catalog \
             entry (`type = \"plugin\"`, `command`, `sha256`) and talks to it over the \
             socket it names in {SOCKET_ENV}; it is not run by hand.",
            plugin.name
        );
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: {e}", plugin.name);
            return ExitCode::FAILURE;
        }
    };
    // the broker holds our stdin open; its end means the broker is gone
    let _ = std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
    match runtime.block_on(serve(plugin, socket.into())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Listen on `socket`, print the handshake line and serve.
pub async fn serve<T: ProviderSettings>(
    plugin: Plugin<T>,
    socket: std::path::PathBuf,
) -> Result<(), String> {
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(|e| format!("listening on {}: {e}", socket.display()))?;
    let service = Service {
        plugin,
        built: OnceLock::new(),
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{HANDSHAKE_PREFIX}|{PROTOCOL_VERSION}|unix|{}",
            socket.display()
        )
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing the handshake line: {e}"))?;
    }
    tonic::transport::Server::builder()
        .add_service(
            ProviderServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await
        .map_err(|e| format!("serving: {e}"))
}

struct Service<T> {
    plugin: Plugin<T>,
    built: OnceLock<(T, Arc<dyn Provider>)>,
}

impl<T: ProviderSettings> Service<T> {
    fn provider(&self) -> Result<&Arc<dyn Provider>, Status> {
        self.built
            .get()
            .map(|(_, p)| p)
            .ok_or_else(|| Status::failed_precondition("no Handshake yet"))
    }

    fn handshake(&self, req: wire::HandshakeRequest) -> Result<(), ProviderError> {
        if !req.protocol_versions.contains(&PROTOCOL_VERSION) {
            return Err(ProviderError::permanent(format!(
                "this plugin speaks protocol {PROTOCOL_VERSION}, the broker offers {:?}",
                req.protocol_versions
            )));
        }
        let limits = req.limits.unwrap_or_default();
        let limits = BrokerLimits {
            max_lease_ttl_seconds: limits.max_lease_ttl_seconds,
            provider_timeout_seconds: limits.provider_timeout_seconds,
        };
        // the error names the field and never repeats a value
        let settings: T = serde_json::from_str(&req.config_json).map_err(|e| {
            ProviderError::invalid(format!(
                "configuration (line {}, column {}): {}",
                e.line(),
                e.column(),
                match e.classify() {
                    serde_json::error::Category::Data =>
                        "a field is missing, unknown or of the wrong type",
                    _ => "not valid JSON",
                }
            ))
        })?;
        settings
            .validate(&limits)
            .map_err(|e| ProviderError::invalid(format!("config.{}: {}", e.field, e.message)))?;
        let ctx = BuildContext {
            limits,
            now: Arc::new(system_now),
            denylist: Arc::new(NoDenylist),
        };
        let built = settings.build(&ctx).map_err(ProviderError::invalid)?;
        if self.built.set((settings, built.provider)).is_err() {
            return Err(ProviderError::permanent("already configured"));
        }
        tracing::info!(provider = %req.provider_name, "configured");
        Ok(())
    }
}

/// The plugin process's own clock, for providers that ask "now" (the
/// broker's times arrive in each `LeaseSpec`).
#[allow(clippy::disallowed_methods)]
fn system_now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Timestamp::from_unix_millis(ms)
}

/// Plugins have no access to the broker's store: a provider that revokes by
/// the broker's denylist (the token issuer) cannot be a plugin.
#[derive(Debug)]
struct NoDenylist;

#[async_trait::async_trait]
impl Denylist for NoDenylist {
    async fn deny(&self, _: &[(String, Timestamp)]) -> Result<(), String> {
        Err("a plugin has no access to the broker's denylist".into())
    }
    fn is_denied(&self, _: &str) -> Result<bool, String> {
        Err("a plugin has no access to the broker's denylist".into())
    }
}

fn err(e: &ProviderError) -> Option<wire::Error> {
    Some(error_to_wire(e))
}

#[tonic::async_trait]
impl<T: ProviderSettings> wire::provider_server::Provider for Service<T> {
    async fn handshake(
        &self,
        req: Request<wire::HandshakeRequest>,
    ) -> Result<Response<wire::HandshakeResponse>, Status> {
        let error = self.handshake(req.into_inner()).err();
        if let Some(e) = &error {
            tracing::error!("handshake refused: {e}");
        }
        Ok(Response::new(wire::HandshakeResponse {
            protocol_version: PROTOCOL_VERSION,
            plugin: self.plugin.name.to_owned(),
            version: self.plugin.version.to_owned(),
            error: error.as_ref().and_then(err),
        }))
    }

    async fn describe(
        &self,
        _: Request<wire::DescribeRequest>,
    ) -> Result<Response<wire::DescribeResponse>, Status> {
        let (settings, p) = self
            .built
            .get()
            .ok_or_else(|| Status::failed_precondition("no Handshake yet"))?;
        let d = p.describe();
        let inventory = p.inventory().await.map(|f| f.is_some()).unwrap_or(true);
        Ok(Response::new(wire::DescribeResponse {
            kind: d.kind.to_owned(),
            roles: d
                .roles
                .iter()
                .map(|r| wire::Role {
                    name: r.name.clone(),
                    max_ttl_seconds: r.max_ttl.as_secs(),
                    description: r.description.clone(),
                    scopes: self
                        .plugin
                        .scopes
                        .map(|f| f(settings, &r.name))
                        .unwrap_or_default(),
                })
                .collect(),
            revocation: d.revocation,
            revocable: self.plugin.revocable,
            inventory,
        }))
    }

    async fn validate(
        &self,
        req: Request<wire::ValidateRequest>,
    ) -> Result<Response<wire::ValidateResponse>, Status> {
        let req = req.into_inner();
        let r = self.provider()?.validate(&req.role, &req.scope);
        Ok(Response::new(match r {
            Ok(d) => wire::ValidateResponse {
                max_ttl_seconds: d.as_secs(),
                error: None,
            },
            Err(e) => wire::ValidateResponse {
                max_ttl_seconds: 0,
                error: err(&e),
            },
        }))
    }

    async fn health(
        &self,
        _: Request<wire::HealthRequest>,
    ) -> Result<Response<wire::Outcome>, Status> {
        let r = self.provider()?.health().await;
        Ok(Response::new(wire::Outcome {
            error: r.err().as_ref().and_then(err),
        }))
    }

    async fn prepare(
        &self,
        req: Request<wire::LeaseSpec>,
    ) -> Result<Response<wire::PrepareResponse>, Status> {
        let spec = spec_from_wire(req.into_inner());
        Ok(Response::new(match self.provider()?.prepare(&spec).await {
            Ok(h) => wire::PrepareResponse {
                handle: h.map(|h| h.as_bytes().to_vec()),
                error: None,
            },
            Err(e) => wire::PrepareResponse {
                handle: None,
                error: err(&e),
            },
        }))
    }

    async fn issue(
        &self,
        req: Request<wire::LeaseSpec>,
    ) -> Result<Response<wire::IssueResponse>, Status> {
        let spec: LeaseSpec = spec_from_wire(req.into_inner());
        Ok(Response::new(match self.provider()?.issue(&spec).await {
            Ok(issued) => issued_to_wire(&spec.lease_id, &issued),
            Err(e) => wire::IssueResponse {
                lease_id: spec.lease_id,
                error: err(&e),
                ..Default::default()
            },
        }))
    }

    async fn revoke(
        &self,
        req: Request<wire::RevokeRequest>,
    ) -> Result<Response<wire::RevokeResponse>, Status> {
        let leases: Vec<_> = req
            .into_inner()
            .leases
            .into_iter()
            .map(revoke_from_wire)
            .collect();
        let results = self.provider()?.revoke_many_noted(&leases).await;
        Ok(Response::new(wire::RevokeResponse {
            results: results
                .into_iter()
                .map(|r| match r {
                    Ok(note) => wire::NotedOutcome { error: None, note },
                    Err(e) => wire::NotedOutcome {
                        error: err(&e),
                        note: None,
                    },
                })
                .collect(),
        }))
    }

    async fn rollback(
        &self,
        req: Request<wire::LeaseSpec>,
    ) -> Result<Response<wire::NotedOutcome>, Status> {
        let spec = spec_from_wire(req.into_inner());
        Ok(Response::new(
            match self.provider()?.rollback_noted(&spec).await {
                Ok(note) => wire::NotedOutcome { error: None, note },
                Err(e) => wire::NotedOutcome {
                    error: err(&e),
                    note: None,
                },
            },
        ))
    }

    async fn inventory(
        &self,
        _: Request<wire::InventoryRequest>,
    ) -> Result<Response<wire::InventoryResponse>, Status> {
        Ok(Response::new(match self.provider()?.inventory().await {
            Ok(found) => wire::InventoryResponse {
                supported: found.is_some(),
                found: found
                    .unwrap_or_default()
                    .iter()
                    .map(found_to_wire)
                    .collect(),
                error: None,
            },
            Err(e) => wire::InventoryResponse {
                supported: true,
                found: Vec::new(),
                error: err(&e),
            },
        }))
    }

    async fn remove(&self, req: Request<wire::Found>) -> Result<Response<wire::Outcome>, Status> {
        let found = found_from_wire(req.into_inner());
        let r = self.provider()?.remove(&found).await;
        Ok(Response::new(wire::Outcome {
            error: r.err().as_ref().and_then(err),
        }))
    }

    async fn probe(
        &self,
        req: Request<wire::ProbeRequest>,
    ) -> Result<Response<wire::ProbeResponse>, Status> {
        let req = req.into_inner();
        let spec = spec_from_wire(req.spec.unwrap_or_default());
        let credential = credential_from_wire(req.credential);
        Ok(Response::new(
            match self.provider()?.probe(&spec, &credential).await {
                Ok(usable) => wire::ProbeResponse {
                    supported: usable.is_some(),
                    usable: usable.unwrap_or(false),
                    error: None,
                },
                Err(e) => wire::ProbeResponse {
                    supported: true,
                    usable: false,
                    error: err(&e),
                },
            },
        ))
    }
}
