//! The upstream's answer on its way back to the assistant: a failed
//! connection explained, a redirect out of the route refused, a compressed
//! body refused (it could not be inspected), every form of the injected
//! credential redacted from headers and body.

use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode, Uri};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use serde_json::json;

use crate::config::split_host_port;
use crate::connect::ConnectError;
use crate::decide::Held;
use crate::redact::{RedactBody, Redactor};
use crate::route::{Route, has_dot_segment};
use crate::serve::{Body, BoxError, Proxy, Target, answer, full, strip_hop_by_hop};

/// An answer with a `Content-Length` up to this is read whole, redacted
/// and sent with its length; a longer or unknown one streams, chunked.
const WHOLE_BODY_MAX: usize = 1 << 20;

impl Proxy {
    pub(crate) fn upstream_failed(
        &self,
        route: &Route,
        target: &Target,
        e: &hyper_util::client::legacy::Error,
    ) -> Response<Body> {
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = src {
            if let Some(c) = s.downcast_ref::<ConnectError>() {
                if let ConnectError::Refused { .. } = c {
                    self.count(&route.name, "address_refused");
                    tracing::warn!(route = %route.name, error = %c, "refused: address outside the route");
                    return answer(
                        StatusCode::FORBIDDEN,
                        "address_refused",
                        &c.to_string(),
                        json!({}),
                    );
                }
                return self.fail(
                    &route.name,
                    StatusCode::BAD_GATEWAY,
                    "upstream_unreachable",
                    &c.to_string(),
                );
            }
            src = s.source();
        }
        self.count(&route.name, "upstream_unreachable");
        tracing::warn!(route = %route.name, error = %e, "upstream request failed");
        answer(
            StatusCode::BAD_GATEWAY,
            "upstream_unreachable",
            &format!("{} could not be reached", target.origin()),
            json!({}),
        )
    }

    /// The upstream's answer for the assistant: redirects out of the
    /// route refused, nothing compressed (it could not be inspected), every
    /// form of the credential replaced in headers and body.
    pub(crate) async fn relay(
        &self,
        route: &Arc<Route>,
        target: &Target,
        held: Arc<Held>,
        resp: Response<Incoming>,
        head_only: bool,
    ) -> Response<Body> {
        let (mut parts, body) = resp.into_parts();
        let mut redactor = Redactor::new(held.secrets.clone());
        if parts.status.is_redirection()
            && let Some(loc) = parts.headers.get(header::LOCATION)
        {
            let loc = String::from_utf8_lossy(&redactor.whole(loc.as_bytes())).into_owned();
            if !self.stays_in_route(route, target, &loc) {
                self.count(&route.name, "redirect_refused");
                tracing::info!(route = %route.name, location = %loc, "refused: redirect out of the route");
                return answer(
                    StatusCode::FORBIDDEN,
                    "redirect_refused",
                    &format!(
                        "the upstream redirected ({}) to {loc}, outside route `{}`; the proxy never \
                         follows redirects and does not pass on one that leaves the route",
                        parts.status.as_u16(),
                        route.name
                    ),
                    json!({}),
                );
            }
        }
        if let Some(enc) = parts.headers.get(header::CONTENT_ENCODING)
            && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
        {
            return self.fail(
                &route.name,
                StatusCode::BAD_GATEWAY,
                "encoded_response",
                "the upstream compressed its answer although asked not to; the proxy cannot check \
                 a compressed body for the credential, so it does not pass it on",
            );
        }
        strip_hop_by_hop(&mut parts.headers);
        let names: Vec<HeaderName> = parts.headers.keys().cloned().collect();
        for name in names {
            let values: Vec<HeaderValue> = parts.headers.get_all(&name).iter().cloned().collect();
            let mut changed = false;
            let fixed: Vec<HeaderValue> = values
                .iter()
                .map(|v| {
                    let out = redactor.whole(v.as_bytes());
                    if out != v.as_bytes() {
                        changed = true;
                    }
                    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
                })
                .collect();
            if changed {
                parts.headers.remove(&name);
                for v in fixed {
                    parts.headers.append(name.clone(), v);
                }
            }
        }
        let header_hits = redactor.hits;
        if header_hits > 0 {
            tracing::warn!(route = %route.name, lease_id = %held.grant.lease_id, replaced = header_hits, "the upstream echoed the credential in headers; redacted");
        }
        let has_body = !head_only && !matches!(parts.status.as_u16(), 204 | 304);
        let known = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n <= WHOLE_BODY_MAX);
        let body = match known {
            // a small body of known length is read whole, redacted, and
            // sent with its (new) length
            Some(_) if has_body => {
                let bytes = match body.collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => {
                        return self.fail(
                            &route.name,
                            StatusCode::BAD_GATEWAY,
                            "upstream_unreachable",
                            &format!("reading {}'s answer: {e}", target.origin()),
                        );
                    }
                };
                let before = redactor.hits;
                let out = redactor.whole(&bytes);
                if redactor.hits > before {
                    tracing::warn!(route = %route.name, lease_id = %held.grant.lease_id, replaced = redactor.hits - before, "the upstream echoed the credential; redacted");
                }
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
                full(out)
            }
            _ => {
                if has_body {
                    // redaction may change the length: the body goes chunked
                    parts.headers.remove(header::CONTENT_LENGTH);
                }
                let route_name = route.name.clone();
                let lease = held.grant.lease_id.clone();
                RedactBody::new(
                    body,
                    redactor,
                    Box::new(move |hits| {
                        if hits > 0 {
                            tracing::warn!(route = %route_name, lease_id = %lease, replaced = hits, "the upstream echoed the credential; redacted");
                        }
                    }),
                )
                .map_err(|e| Box::new(e) as BoxError)
                .boxed_unsync()
            }
        };
        self.count(&route.name, "forwarded");
        Response::from_parts(parts, body)
    }

    /// Whether a redirect's target is still this route's.
    fn stays_in_route(&self, route: &Arc<Route>, target: &Target, location: &str) -> bool {
        let (https, host, port, path) = if location.starts_with('/') && !location.starts_with("//")
        {
            (
                target.https,
                target.host.clone(),
                target.port,
                location.to_owned(),
            )
        } else {
            let Ok(u) = location.parse::<Uri>() else {
                return false;
            };
            let (Some(s), Some(a)) = (u.scheme_str(), u.authority()) else {
                return false;
            };
            let https = s == "https";
            let Ok((h, p)) = split_host_port(a.as_str(), if https { 443 } else { 80 }) else {
                return false;
            };
            (https, h, p, u.path().to_owned())
        };
        let path = path.split('?').next().unwrap_or_default();
        !has_dot_segment(path)
            && self
                .routes
                .find(https, &host, port, path)
                .is_some_and(|r| Arc::ptr_eq(r, route))
    }
}
