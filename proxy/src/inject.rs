//! A leased credential, held by the proxy only: how it goes into a
//! request, and every form of it a response must not carry back.

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine as _;
use http::HeaderValue;
use http::header::AUTHORIZATION;
use serde_json::Value;
use zeroize::Zeroizing;

use crate::config::Inject;
use crate::route::Route;

/// A lease the proxy holds for one assistant's task and one route.
pub struct Grant {
    pub lease_id: String,
    /// Unix milliseconds.
    pub expires_at_ms: i64,
    fields: BTreeMap<String, Zeroizing<String>>,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("lease_id", &self.lease_id)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Grant {
    /// From the broker's `lease` (an issued lease with its `credential`).
    pub fn from_lease(v: &Value) -> Result<Self, String> {
        let lease_id = v
            .get("lease_id")
            .and_then(Value::as_str)
            .ok_or("the broker's lease has no `lease_id`")?
            .to_owned();
        let expires = v
            .get("expires_at")
            .and_then(Value::as_str)
            .ok_or("the broker's lease has no `expires_at`")?;
        let t =
            time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
                .map_err(|e| format!("the lease's `expires_at`: {e}"))?;
        let expires_at_ms = i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let fields = v
            .get("credential")
            .and_then(Value::as_object)
            .ok_or("the broker's lease has no `credential`")?
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), Zeroizing::new(v.as_str()?.to_owned()))))
            .collect();
        Ok(Self {
            lease_id,
            expires_at_ms,
            fields,
        })
    }

    #[cfg(test)]
    pub fn for_test(fields: &[(&str, &str)]) -> Self {
        Self {
            lease_id: "lease_test".into(),
            expires_at_ms: i64::MAX,
            fields: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Zeroizing::new((*v).to_owned())))
                .collect(),
        }
    }

    fn field(&self, name: &str) -> Result<&str, String> {
        self.fields.get(name).map(|v| v.as_str()).ok_or_else(|| {
            format!(
                "the lease has no credential field `{name}` (it has: {})",
                self.fields.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}

fn header(v: &str) -> Result<HeaderValue, String> {
    let mut h = HeaderValue::from_str(v)
        .map_err(|_| "the credential cannot be sent in a header".to_owned())?;
    h.set_sensitive(true);
    Ok(h)
}

/// The values a response must not carry: what was injected, in every form
/// an upstream might echo it (as sent, base64 for basic auth, percent-
/// encoded), at least 8 bytes long.
pub fn secrets(route: &Route, g: &Grant) -> Result<Vec<Zeroizing<Vec<u8>>>, String> {
    let mut raw: Vec<Zeroizing<String>> = Vec::new();
    match &route.cfg.inject {
        Inject::Bearer { field } | Inject::Header { field, .. } => {
            raw.push(Zeroizing::new(g.field(field)?.to_owned()));
        }
        Inject::Basic {
            username,
            username_field,
            password_field,
        } => {
            let user = basic_user(g, username.as_ref(), username_field.as_ref())?;
            let pass = g.field(password_field)?;
            raw.push(Zeroizing::new(pass.to_owned()));
            raw.push(Zeroizing::new(
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")),
            ));
        }
        Inject::AwsSigv4 { .. } => {
            raw.push(Zeroizing::new(g.field("secret_access_key")?.to_owned()));
            raw.push(Zeroizing::new(g.field("session_token")?.to_owned()));
        }
    }
    let mut out: Vec<Zeroizing<Vec<u8>>> = Vec::new();
    for v in raw {
        let enc = percent_encode(&v);
        if *enc != *v {
            out.push(Zeroizing::new(enc.as_bytes().to_vec()));
        }
        out.push(Zeroizing::new(v.as_bytes().to_vec()));
    }
    out.retain(|n| n.len() >= 8);
    // longest first: a form that contains another is replaced whole
    out.sort_by_key(|n| std::cmp::Reverse(n.len()));
    Ok(out)
}

/// Basic auth's user: fixed, or a field of the credential.
fn basic_user(g: &Grant, fixed: Option<&String>, field: Option<&String>) -> Result<String, String> {
    match (fixed, field) {
        (Some(u), _) => Ok(u.clone()),
        (None, Some(f)) => Ok(g.field(f)?.to_owned()),
        (None, None) => Ok(String::new()),
    }
}

fn percent_encode(s: &str) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(s.len()));
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Put the credential into the request (headers the assistant sent under
/// the same names are replaced). `body` is the whole body, for signing.
pub fn apply(
    route: &Route,
    g: &Grant,
    parts: &mut http::request::Parts,
    body: &[u8],
    now: SystemTime,
) -> Result<(), String> {
    match &route.cfg.inject {
        Inject::Bearer { field } => {
            let v = Zeroizing::new(format!("Bearer {}", g.field(field)?));
            parts.headers.insert(AUTHORIZATION, header(&v)?);
        }
        Inject::Basic {
            username,
            username_field,
            password_field,
        } => {
            let user = basic_user(g, username.as_ref(), username_field.as_ref())?;
            let pair = Zeroizing::new(format!("{user}:{}", g.field(password_field)?));
            let v = Zeroizing::new(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
            ));
            parts.headers.insert(AUTHORIZATION, header(&v)?);
        }
        Inject::Header {
            name,
            field,
            prefix,
        } => {
            let v = Zeroizing::new(format!("{prefix}{}", g.field(field)?));
            let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
            parts.headers.insert(name, header(&v)?);
        }
        Inject::AwsSigv4 { region, service } => sigv4(route, g, parts, body, now, region, service)?,
    }
    Ok(())
}

fn sigv4(
    route: &Route,
    g: &Grant,
    parts: &mut http::request::Parts,
    body: &[u8],
    now: SystemTime,
    region: &str,
    service: &str,
) -> Result<(), String> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    // whatever the assistant signed or claimed is replaced
    for h in [
        "authorization",
        "x-amz-date",
        "x-amz-security-token",
        "x-amz-content-sha256",
    ] {
        parts.headers.remove(h);
    }
    let creds = aws_credential_types::Credentials::new(
        g.field("access_key_id")?,
        g.field("secret_access_key")?,
        Some(g.field("session_token")?.to_owned()),
        None,
        "leasehold-proxy",
    );
    let identity: aws_smithy_runtime_api::client::identity::Identity = creds.into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(now)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("SigV4: {e}"))?
        .into();
    let default_port = if route.dest.https { 443 } else { 80 };
    let authority = if route.dest.port == default_port {
        route.dest.host.clone()
    } else {
        format!("{}:{}", route.dest.host, route.dest.port)
    };
    let uri = format!(
        "{}://{authority}{}",
        if route.dest.https { "https" } else { "http" },
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    parts.headers.insert(
        http::header::HOST,
        HeaderValue::from_str(&authority).map_err(|e| e.to_string())?,
    );
    let mut headers = Vec::new();
    for (k, v) in &parts.headers {
        let v = v
            .to_str()
            .map_err(|_| format!("SigV4 cannot sign the non-ASCII header `{k}`"))?;
        headers.push((k.as_str(), v));
    }
    let signable = SignableRequest::new(
        parts.method.as_str(),
        uri.clone(),
        headers.into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| format!("SigV4: {e}"))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| format!("SigV4: {e}"))?
        .into_parts();
    let mut signed = http::Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .body(())
        .map_err(|e| e.to_string())?;
    instructions.apply_to_request_http1x(&mut signed);
    for (k, v) in signed.headers() {
        let mut v = v.clone();
        v.set_sensitive(true);
        parts.headers.insert(k.clone(), v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(inject: &str) -> Route {
        let cfg: crate::config::RouteConfig = toml::from_str(&format!(
            "name = 'r'\ndestination = 'https://api.example.test/'\ntool = 't'\n[credential]\nprovider = 'p'\nrole = 'r'\nttl_seconds = 60\n[inject]\n{inject}\n"
        ))
        .unwrap();
        Route::new(0, cfg).unwrap()
    }

    fn request() -> http::request::Parts {
        http::Request::builder()
            .method("POST")
            .uri("/?Action=GetCallerIdentity")
            .header("authorization", "Bearer the-assistants-own")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn basic_auth_and_its_echo_forms() {
        let r = route("kind = 'basic'\nusername_field = 'username'");
        let g = Grant::for_test(&[("username", "lh_u1"), ("password", "p@ss/word+9")]);
        let mut p = request();
        apply(&r, &g, &mut p, b"", SystemTime::UNIX_EPOCH).unwrap();
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("lh_u1:p@ss/word+9")
        );
        assert_eq!(p.headers["authorization"], want.as_str());
        assert!(p.headers["authorization"].is_sensitive());
        let s = secrets(&r, &g).unwrap();
        let forms: Vec<&[u8]> = s.iter().map(|n| n.as_slice()).collect();
        assert!(forms.contains(&b"p@ss/word+9".as_slice()));
        assert!(forms.contains(&b"p%40ss%2Fword%2B9".as_slice()));
        assert!(forms.contains(&want.as_bytes()[6..].as_ref()));
    }

    #[test]
    fn a_named_header_with_a_prefix() {
        let r = route("kind = 'header'\nname = 'X-Api-Key'\nprefix = 'key '");
        let g = Grant::for_test(&[("token", "tok-1234567890")]);
        let mut p = request();
        apply(&r, &g, &mut p, b"", SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(p.headers["x-api-key"], "key tok-1234567890");
        // the assistant's own Authorization is not the route's business
        assert_eq!(p.headers["authorization"], "Bearer the-assistants-own");
        let missing = Grant::for_test(&[("password", "x")]);
        assert!(
            apply(&r, &missing, &mut request(), b"", SystemTime::UNIX_EPOCH)
                .unwrap_err()
                .contains("no credential field `token`")
        );
    }

    #[test]
    fn sigv4_replaces_what_the_assistant_sent() {
        let r = route("kind = 'aws-sigv4'\nregion = 'us-east-1'\nservice = 'sts'");
        let g = Grant::for_test(&[
            ("access_key_id", "ASIAEXAMPLE"),
            ("secret_access_key", "secret/key+value"),
            ("session_token", "session-token-value"),
        ]);
        let mut p = request();
        apply(
            &r,
            &g,
            &mut p,
            b"Action=GetCallerIdentity",
            SystemTime::UNIX_EPOCH,
        )
        .unwrap();
        let auth = p.headers["authorization"].to_str().unwrap();
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=ASIAEXAMPLE/19700101/us-east-1/sts/aws4_request"
            ),
            "{auth}"
        );
        assert_eq!(p.headers["x-amz-security-token"], "session-token-value");
        assert_eq!(p.headers["host"], "api.example.test");
        assert!(!auth.contains("secret/key+value"));
    }
}
