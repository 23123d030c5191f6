//! Requests to the upstream through vaultrs's request layer: its HTTP client
//! (TLS roots, timeout) and its middleware (API version, token and
//! namespace headers), with endpoints of our own. vaultrs's typed calls drop
//! `lease_id` from secret reads and have no `sys/leases` endpoints, so every
//! call here goes through [`Raw`], which keeps the whole response.
//!
//! Error messages never carry a response body: a body can hold the
//! credential itself.

use std::time::Duration;

use leasehold_provider::ProviderError;
use rustify::endpoint::Endpoint;
use rustify::enums::{RequestMethod, RequestType, ResponseType};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use vaultrs::api::EndpointMiddleware;
use vaultrs::client::{Client as _, VaultClient, VaultClientSettingsBuilder};

use crate::config::VaultConfig;

/// One request: method, path under `/v1/`, optional JSON body.
#[derive(Debug, Clone)]
pub(crate) struct Raw {
    pub method: Method,
    pub path: String,
    pub body: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Post,
    Put,
}

impl Endpoint for Raw {
    type Response = serde_json::Value;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        self.path.clone()
    }

    fn method(&self) -> RequestMethod {
        match self.method {
            Method::Get => RequestMethod::GET,
            Method::Post => RequestMethod::POST,
            Method::Put => RequestMethod::PUT,
        }
    }

    fn body(&self) -> Result<Option<Vec<u8>>, rustify::errors::ClientError> {
        match &self.body {
            None => Ok(None),
            Some(v) => serde_json::to_vec(v)
                .map(Some)
                .map_err(|e| rustify::errors::ClientError::DataParseError { source: e.into() }),
        }
    }
}

/// The parts of a Vault response the provider reads. `data` may hold the
/// credential: it is dropped as soon as it has been moved into one.
#[derive(Deserialize, Default)]
pub(crate) struct Response {
    #[serde(default)]
    pub lease_id: String,
    #[serde(default)]
    pub lease_duration: u64,
    #[serde(default)]
    pub renewable: bool,
    pub data: Option<serde_json::Map<String, serde_json::Value>>,
    pub auth: Option<AuthInfo>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("lease_duration", &self.lease_duration)
            .field("renewable", &self.renewable)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
pub(crate) struct AuthInfo {
    pub client_token: SecretString,
    #[serde(default)]
    pub accessor: String,
    #[serde(default)]
    pub lease_duration: u64,
    #[serde(default)]
    pub renewable: bool,
}

/// An upstream failure, before it is classed for the broker.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The upstream answered with this status and these error strings.
    Status { code: u16, errors: Vec<String> },
    /// No answer: refused, reset, timed out, TLS failure.
    Unreachable(String),
    /// An answer we could not read (the body is not quoted: it may be secret).
    Malformed(String),
    /// The broker has no upstream token (login refused, file unreadable).
    Auth(String),
}

impl Failure {
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, Self::Status { code: 403, .. })
    }

    /// What the broker should do about it. `what` names the operation.
    pub fn class(&self, what: &str) -> ProviderError {
        match self {
            Self::Unreachable(e) => {
                ProviderError::retryable(format!("{what}: upstream unreachable: {e}"))
            }
            Self::Malformed(e) => ProviderError::permanent(format!("{what}: {e}")),
            Self::Auth(e) => ProviderError::retryable(format!("{what}: {e}")),
            Self::Status { code, errors } => {
                let detail = if errors.is_empty() {
                    String::new()
                } else {
                    format!(": {}", errors.join("; "))
                };
                let msg = format!("{what}: upstream answered {code}{detail}");
                match code {
                    // sealed, standby without forwarding, overloaded, rate limited
                    503 | 429 | 500 | 502 | 504 | 412 => ProviderError::retryable(msg),
                    _ => ProviderError::permanent(msg),
                }
            }
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status { code, errors } => write!(f, "{code}: {}", errors.join("; ")),
            Self::Unreachable(e) | Self::Malformed(e) | Self::Auth(e) => f.write_str(e),
        }
    }
}

/// The HTTP side of one upstream: address, TLS, namespace, timeout.
pub(crate) struct Upstream {
    client: VaultClient,
    namespace: Option<String>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("address", &self.client.settings().address.as_str())
            .field("namespace", &self.namespace)
            .finish()
    }
}

/// A header value the middleware can carry (it would panic on others).
pub(crate) fn header_safe(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic())
}

impl Upstream {
    pub fn new(cfg: &VaultConfig) -> Result<Self, String> {
        // reqwest is built without a default crypto provider; the broker
        // installs ring's, and a provider built alone (tests) does the same
        let _ = rustls::crypto::ring::default_provider().install_default();
        // the builder panics on an address it cannot parse: check first
        reqwest::Url::parse(&cfg.address).map_err(|e| format!("address: {e}"))?;
        // every setting explicit: the builder's defaults read VAULT_ADDR,
        // VAULT_TOKEN, VAULT_CACERT and VAULT_SKIP_VERIFY from the environment
        let mut b = VaultClientSettingsBuilder::default();
        b.address(cfg.address.as_str())
            .token("")
            .verify(true)
            .identity(None)
            .namespace(None)
            .ca_certs(
                cfg.ca_file
                    .iter()
                    .map(|ca| ca.display().to_string())
                    .collect(),
            )
            .timeout(Some(Duration::from_secs(cfg.request_timeout_seconds)));
        let settings = b.build().map_err(|e| format!("address: {e}"))?;
        let client = VaultClient::new(settings)
            .map_err(|e| format!("client: {}", leasehold_provider::error_chain(&e)))?;
        Ok(Self {
            client,
            namespace: cfg
                .namespace
                .as_ref()
                .map(|n| n.trim_end_matches('/').to_owned()),
        })
    }

    /// Send one request with `token` (none for logins). A 204 reads as an
    /// empty response.
    pub async fn send(&self, token: Option<&SecretString>, req: Raw) -> Result<Response, Failure> {
        let token = token.map(|t| t.expose_secret()).unwrap_or("");
        if !token.is_empty() && !header_safe(token) {
            return Err(Failure::Malformed(
                "the upstream token holds characters a header cannot carry".into(),
            ));
        }
        let middle = EndpointMiddleware {
            token: token.to_owned(),
            version: self.client.middle().version.clone(),
            wrap: None,
            namespace: self.namespace.clone(),
        };
        let out = req.with_middleware(&middle).exec(self.client.http()).await;
        drop(middle);
        match out {
            Ok(resp) => {
                let body = resp.response.body();
                if body.iter().all(u8::is_ascii_whitespace) {
                    return Ok(Response::default());
                }
                serde_json::from_slice::<Response>(body).map_err(|e| {
                    Failure::Malformed(format!(
                        "unexpected response shape (line {}, column {})",
                        e.line(),
                        e.column()
                    ))
                })
            }
            Err(rustify::errors::ClientError::ServerResponseError { code, content }) => {
                #[derive(Deserialize)]
                struct Errors {
                    #[serde(default)]
                    errors: Vec<String>,
                }
                let errors = content
                    .as_deref()
                    .and_then(|c| serde_json::from_str::<Errors>(c).ok())
                    .map(|e| e.errors)
                    .unwrap_or_default();
                Err(Failure::Status { code, errors })
            }
            Err(e) => Err(Failure::Unreachable(leasehold_provider::error_chain(&e))),
        }
    }
}

/// Build a request.
pub(crate) fn get(path: impl Into<String>) -> Raw {
    Raw {
        method: Method::Get,
        path: path.into(),
        body: None,
    }
}

pub(crate) fn post(path: impl Into<String>, body: serde_json::Value) -> Raw {
    Raw {
        method: Method::Post,
        path: path.into(),
        body: Some(body),
    }
}

pub(crate) fn put(path: impl Into<String>, body: serde_json::Value) -> Raw {
    Raw {
        method: Method::Put,
        path: path.into(),
        body: Some(body),
    }
}
