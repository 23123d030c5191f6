//! HTTP for the Azure provider: one reqwest client (rustls, the system's
//! roots plus `ca_file`) used both as azure_identity's transport and for
//! ARM and Graph, and the retry loop that honours `Retry-After`.

use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use azure_core::http::headers::{HeaderName, HeaderValue, Headers};
use azure_core::http::request::Body;
use azure_core::http::{AsyncRawResponse, HttpClient};
use leasehold_provider::ProviderError;
use serde_json::Value;

/// Build the client. `ca_file` adds roots; the system's stay.
pub(crate) fn client(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(f) = ca_file {
        let pem = std::fs::read(f).map_err(|e| format!("ca_file {}: {e}", f.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("ca_file {}: {e}", f.display()))?
        {
            b = b.add_root_certificate(cert);
        }
    }
    b.build().map_err(|e| format!("HTTP client: {e}"))
}

/// azure_identity's requests, sent through our client.
#[derive(Debug)]
pub(crate) struct Transport(pub reqwest::Client);

#[async_trait::async_trait]
impl HttpClient for Transport {
    async fn execute_request(
        &self,
        request: &azure_core::http::Request,
    ) -> azure_core::Result<AsyncRawResponse> {
        use azure_core::error::{Error, ErrorKind};
        use azure_core::http::Method as M;
        let method = match request.method() {
            M::Get => reqwest::Method::GET,
            M::Post => reqwest::Method::POST,
            M::Put => reqwest::Method::PUT,
            M::Delete => reqwest::Method::DELETE,
            M::Patch => reqwest::Method::PATCH,
            M::Head => reqwest::Method::HEAD,
            _ => {
                return Err(Error::with_message(
                    ErrorKind::Other,
                    "an HTTP method this transport does not send",
                ));
            }
        };
        let mut req = self.0.request(method, request.url().as_str());
        for (name, value) in request.headers().iter() {
            req = req.header(name.as_str(), value.as_str());
        }
        let Body::Bytes(body) = request.body() else {
            return Err(Error::with_message(
                ErrorKind::Other,
                "streamed request bodies are not supported",
            ));
        };
        let rsp = req.body(body.clone()).send().await.map_err(|e| {
            let kind = if e.is_connect() || e.is_timeout() {
                ErrorKind::Connection
            } else {
                ErrorKind::Io
            };
            Error::with_error(kind, e, "sending a request to Entra ID")
        })?;
        let status = rsp.status().as_u16();
        let mut headers = Headers::new();
        for (k, v) in rsp.headers() {
            if let Ok(v) = v.to_str() {
                headers.insert(
                    HeaderName::from(k.as_str().to_owned()),
                    HeaderValue::from(v.to_owned()),
                );
            }
        }
        let bytes = rsp
            .bytes()
            .await
            .map_err(|e| Error::with_error(ErrorKind::Io, e, "reading Entra ID's answer"))?;
        Ok(AsyncRawResponse::from_bytes(status.into(), headers, bytes))
    }
}

/// A failure to get a token, classed: Entra unreachable or overloaded is
/// retryable, a refusal (bad secret, unknown client or tenant) is not.
pub(crate) fn token_error(scope: &str, e: &azure_core::Error) -> ProviderError {
    use azure_core::error::ErrorKind;
    let mut retryable = false;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(az) = err.downcast_ref::<azure_core::Error>() {
            match az.kind() {
                ErrorKind::Connection | ErrorKind::Io => retryable = true,
                ErrorKind::HttpResponse { status, .. } => {
                    let s = u16::from(*status);
                    retryable |= s == 429 || s >= 500;
                }
                _ => {}
            }
        }
        if err.downcast_ref::<reqwest::Error>().is_some() {
            retryable = true;
        }
        cur = err.source();
    }
    // The message is Entra's error description (AADSTS...) or the transport's;
    // neither carries the secret, which only travels in the request body.
    let first = leasehold_provider::error_chain(e);
    let first = first.lines().next().unwrap_or_default();
    let msg = format!("signing in to Entra ID for {scope}: {first}");
    if retryable {
        ProviderError::retryable(msg)
    } else {
        ProviderError::permanent(msg)
    }
}

/// The answer to one ARM or Graph call.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    /// `code: message` from ARM's and Graph's common error shape.
    pub fn error_text(&self) -> String {
        let e = &self.body["error"];
        match (e["code"].as_str(), e["message"].as_str()) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c.to_owned(),
            _ => "no error body".to_owned(),
        }
    }

    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or_default()
    }

    /// This answer as a provider error for `what`.
    pub fn into_error(self, what: &str) -> ProviderError {
        let msg = format!("{what}: {} {}", self.status, self.error_text());
        if self.status == 429 || self.status >= 500 {
            ProviderError::retryable(msg)
        } else {
            ProviderError::permanent(msg)
        }
    }
}

/// How long a 429 or 503 asks us to wait: `retry-after-ms`,
/// `x-ms-retry-after-ms`, then `Retry-After` in seconds or as an HTTP date
/// (measured from the answer's own `Date`, so neither clock's skew counts).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).map(str::trim);
    for k in ["retry-after-ms", "x-ms-retry-after-ms"] {
        if let Some(ms) = get(k).and_then(|v| v.parse::<u64>().ok()) {
            return Some(Duration::from_millis(ms));
        }
    }
    let v = get("retry-after")?;
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let date = |s: &str| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc2822).ok()
    };
    let (at, sent) = (date(v)?, date(get("date")?)?);
    let ms = (at - sent).whole_milliseconds().max(0);
    Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// Exponential backoff with full jitter: uniform in [0, min(cap, base·2^n)].
fn backoff(attempt: u32) -> Duration {
    let ceiling = 200u64.saturating_mul(1 << attempt.min(6)).min(5_000);
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    Duration::from_millis(u64::from_le_bytes(b) % (ceiling + 1))
}

/// ARM and Graph, with the broker's token for each.
#[derive(Debug)]
pub(crate) struct Api {
    pub http: reqwest::Client,
    pub credential: Arc<dyn TokenCredential>,
    pub max_attempts: u32,
    pub max_retry_after: Duration,
}

impl Api {
    /// A token for `scope` from the broker's credential.
    pub async fn token(
        &self,
        scope: &str,
    ) -> Result<azure_core::credentials::AccessToken, ProviderError> {
        self.credential
            .get_token(&[scope], None)
            .await
            .map_err(|e| token_error(scope, &e))
    }

    /// One call, retried on 429, 5xx, transport failures and an
    /// unreachable token endpoint, honouring `Retry-After`. Any other
    /// answer (2xx, 4xx) is returned for the caller to judge.
    pub async fn call(
        &self,
        what: &str,
        scope: &str,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ProviderError> {
        let mut last = ProviderError::retryable(format!("{what}: not attempted"));
        for attempt in 0..self.max_attempts {
            if attempt > 0 {
                tracing::debug!(what, attempt, "retrying an Azure call");
            }
            let token = match self.token(scope).await {
                Ok(t) => t,
                Err(e) if e.is_retryable() => {
                    last = e;
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut req = self
                .http
                .request(method.clone(), url)
                .bearer_auth(token.token.secret());
            if let Some(b) = body {
                req = req.json(b);
            }
            let rsp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    last = ProviderError::retryable(format!(
                        "{what}: Azure unreachable: {}",
                        leasehold_provider::error_chain(&e.without_url())
                    ));
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
            };
            let status = rsp.status().as_u16();
            let wait = retry_after(rsp.headers());
            let bytes = rsp.bytes().await.unwrap_or_default();
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap_or(Value::Null)
            };
            let answer = Answer { status, body };
            if !(status == 429 || matches!(status, 500 | 502 | 503 | 504)) {
                return Ok(answer);
            }
            let text = answer.error_text();
            let wait = match wait {
                Some(w) if w > self.max_retry_after => {
                    return Err(ProviderError::retryable(format!(
                        "{what}: {status} {text}; Azure asks to retry after {} s, more than max_retry_after_seconds",
                        w.as_secs()
                    )));
                }
                Some(w) => w,
                None => backoff(attempt),
            };
            last = answer.into_error(what);
            if attempt + 1 < self.max_attempts {
                tracing::info!(
                    what,
                    status,
                    wait_ms = wait.as_millis() as u64,
                    "Azure throttled or failed; waiting before a retry"
                );
                tokio::time::sleep(wait).await;
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_every_form() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("x-ms-retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("date", "Sat, 28 Nov 2026 21:00:00 GMT".parse().unwrap());
        h.insert(
            "retry-after",
            "Sat, 28 Nov 2026 21:00:30 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::from_secs(30)));
        h.remove("date");
        assert_eq!(
            retry_after(&h),
            None,
            "an HTTP date needs the answer's Date"
        );
    }

    #[test]
    fn backoff_stays_under_its_cap() {
        for n in 0..20 {
            assert!(backoff(n) <= Duration::from_secs(5));
        }
    }
}
