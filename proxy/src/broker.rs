//! The proxy's side of the broker: one call per request
//! (`POST /v1/proxy/calls`), made with the proxy's own operator token and
//! the assistant's proxy credential.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::config::{BrokerSettings, CredentialConfig};
use crate::inject::Grant;

/// What the broker answered a call.
#[derive(Debug)]
pub enum Answer {
    /// Allowed; `grant` when a lease was minted (else the reused one).
    Allowed {
        call_id: String,
        grant: Option<Grant>,
    },
    /// A human must approve; retry with the approval's id.
    Approval {
        call_id: String,
        approval_id: String,
        expires_at: String,
    },
    /// Refused: policy, a fence, an ended task, a bad proxy credential...
    Refused(Refusal),
}

/// A refusal as the broker gave it (never carries a credential).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub reasons: Vec<String>,
    pub call_id: Option<String>,
    pub retry_after: Option<String>,
}

/// The broker could not be asked.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// One call's request.
#[derive(Debug)]
pub struct Call<'a> {
    pub proxy_credential: &'a str,
    pub tool: &'a str,
    pub action: String,
    pub resource: String,
    pub arguments_sha256: String,
    pub credential: &'a CredentialConfig,
    pub reuse_lease: Option<&'a str>,
    pub approval_id: Option<&'a str>,
}

/// A file's modification time, size and inode: it changed if these did.
type Stamp = (std::time::SystemTime, u64, u64);

/// The token as last read, its file's stamp then, and when it was last
/// checked.
type Cached = (Stamp, Arc<Zeroizing<String>>, std::time::Instant);

/// The token file, re-read when it changes (a rotation needs no restart).
#[derive(Debug)]
struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<Cached>>,
}

impl TokenFile {
    fn get(&self) -> Result<Arc<Zeroizing<String>>, Unreachable> {
        use std::os::unix::fs::MetadataExt as _;
        // looked at again at most once a second, not on every request
        {
            let c = self
                .cached
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((_, t, at)) = c.as_ref()
                && at.elapsed() < std::time::Duration::from_secs(1)
            {
                return Ok(t.clone());
            }
        }
        let meta = std::fs::metadata(&self.path)
            .map_err(|e| Unreachable(format!("broker.token_file {}: {e}", self.path.display())))?;
        let stamp = (
            meta.modified().unwrap_or(std::time::UNIX_EPOCH),
            meta.len(),
            meta.ino(),
        );
        let mut c = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((s, t, at)) = c.as_mut()
            && *s == stamp
        {
            *at = std::time::Instant::now();
            return Ok(t.clone());
        }
        let text =
            Zeroizing::new(std::fs::read_to_string(&self.path).map_err(|e| {
                Unreachable(format!("broker.token_file {}: {e}", self.path.display()))
            })?);
        let token = Arc::new(Zeroizing::new(text.trim().to_owned()));
        if token.is_empty() {
            return Err(Unreachable(format!(
                "broker.token_file {} is empty",
                self.path.display()
            )));
        }
        *c = Some((stamp, token.clone(), std::time::Instant::now()));
        Ok(token)
    }
}

/// The broker's answers are small; a bigger one is not the broker's.
const MAX_ANSWER: usize = 1 << 20;

type Client = hyper_util::client::legacy::Client<BrokerConnector, http_body_util::Full<Bytes>>;

#[derive(Debug)]
pub struct Broker {
    http: Client,
    calls: http::Uri,
    timeout: Duration,
    token: TokenFile,
}

/// Connections to the broker: its URL's host and port, TLS for `https`
/// (verified against `ca_file`, else the system's roots). hyper's own
/// pooled client over it, not reqwest: a call is on every request the
/// proxy forwards, and reqwest's URL, redirect and header layers cost a
/// noticeable part of the proxy's own time per request.
#[derive(Debug, Clone)]
struct BrokerConnector {
    /// Without an IPv6 literal's brackets.
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
}

impl tower_service::Service<http::Uri> for BrokerConnector {
    type Response = crate::connect::Conn;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<crate::connect::Conn>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        // the configured broker, whatever the URI says
        let this = self.clone();
        Box::pin(async move {
            let tcp = tokio::time::timeout(
                this.timeout,
                tokio::net::TcpStream::connect((this.host.as_str(), this.port)),
            )
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
            crate::connect::finish(tcp, &this.host, this.tls.as_ref())
                .await
                .map_err(std::io::Error::other)
        })
    }
}

impl Broker {
    pub fn new(s: &BrokerSettings) -> Result<Self, String> {
        let calls_url = format!("{}/v1/proxy/calls", s.url.trim_end_matches('/'));
        let calls: http::Uri = calls_url
            .parse()
            .map_err(|e| format!("broker.url {}: {e}", s.url))?;
        let https = match calls.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("broker.url {}: not http or https", s.url)),
        };
        let host = calls
            .host()
            .ok_or_else(|| format!("broker.url {}: no host", s.url))?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = calls.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            Some(
                crate::serve::upstream_tls(s.ca_file.as_ref())
                    .map_err(|e| format!("broker.ca_file: {e}"))?,
            )
        } else {
            None
        };
        let timeout = Duration::from_secs(s.timeout_seconds);
        let http = crate::connect::pooled(BrokerConnector {
            host,
            port,
            tls,
            timeout,
        });
        let token = TokenFile {
            path: s.token_file.clone(),
            cached: Mutex::new(None),
        };
        token.get().map_err(|e| e.0)?;
        Ok(Self {
            http,
            calls,
            timeout,
            token,
        })
    }

    pub async fn call(&self, c: &Call<'_>) -> Result<Answer, Unreachable> {
        let token = self.token.get()?;
        let mut body = json!({
            "proxy_credential": c.proxy_credential,
            "tool": c.tool,
            "action": c.action,
            "resource": c.resource,
            "arguments_sha256": c.arguments_sha256,
            "credential": {
                "provider": c.credential.provider,
                "role": c.credential.role,
                "ttl_seconds": c.credential.ttl_seconds,
                "scope": c.credential.scope,
            },
        });
        if let Some(l) = c.reuse_lease {
            body["reuse_lease"] = json!(l);
        }
        if let Some(a) = c.approval_id {
            body["approval_id"] = json!(a);
        }
        let body = serde_json::to_vec(&body)
            .map_err(|e| Unreachable(format!("encoding the call: {e}")))?;
        let mut auth = http::HeaderValue::from_str(&format!("Bearer {}", token.as_str()))
            .map_err(|_| Unreachable("broker.token_file holds an invalid token".into()))?;
        auth.set_sensitive(true);
        let req = http::Request::post(self.calls.clone())
            .header(http::header::AUTHORIZATION, auth)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(Bytes::from(body)))
            .map_err(|e| Unreachable(format!("building the call: {e}")))?;
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| Unreachable(format!("the broker could not be reached: {e}")))?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            // the body may hold a credential: read it into memory we wipe
            let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(
                resp.into_body(),
                MAX_ANSWER,
            ))
            .await
            .map_err(|e| Unreachable(format!("reading the broker's answer: {e}")))?;
            Ok::<_, Unreachable>((
                status,
                retry_after,
                Zeroizing::new(body.to_bytes().to_vec()),
            ))
        };
        let (status, retry_after, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| Unreachable("the broker did not answer in time".into()))??;
        let v: Value = serde_json::from_slice(&bytes).map_err(|_| {
            Unreachable(format!(
                "the broker answered {status} with a body that is not JSON"
            ))
        })?;
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        match status {
            200 => {
                let grant = match v.get("lease") {
                    Some(l) => Some(Grant::from_lease(l).map_err(Unreachable)?),
                    None => None,
                };
                Ok(Answer::Allowed {
                    call_id: s(&v, "call_id").unwrap_or_default(),
                    grant,
                })
            }
            202 => Ok(Answer::Approval {
                call_id: s(&v, "call_id").unwrap_or_default(),
                approval_id: s(&v, "approval_id").unwrap_or_default(),
                expires_at: s(&v, "expires_at").unwrap_or_default(),
            }),
            _ => {
                let e = v.get("error").cloned().unwrap_or(Value::Null);
                let d = v.get("decision").cloned().unwrap_or(Value::Null);
                Ok(Answer::Refused(Refusal {
                    status,
                    code: s(&e, "code").unwrap_or_else(|| "broker_error".into()),
                    message: s(&e, "message").unwrap_or_default(),
                    reasons: d
                        .get("reasons")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .map(str::to_owned)
                                .collect()
                        })
                        .unwrap_or_default(),
                    call_id: s(&d, "call_id"),
                    retry_after,
                }))
            }
        }
    }
}
