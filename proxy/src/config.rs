//! `leasehold proxy`'s configuration (TOML), checked before anything
//! listens: every mistake is refused naming its field.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

use crate::route::Cidr;

/// A configuration mistake, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Where assistants reach the proxy: a loopback `address:port`, or
    /// `unix:/path` for a Unix socket (mode 0660). The proxy credential
    /// travels in clear to it, so nothing else is accepted.
    pub listen: String,
    pub broker: BrokerSettings,
    /// The local CA that `CONNECT` interception signs with: `ca.pem` (give
    /// it to assistants: `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`,
    /// `NODE_EXTRA_CA_CERTS`) and `ca-key.pem` (mode 0600, never shared).
    /// Created on first start.
    pub ca_dir: PathBuf,
    /// Roots for upstream TLS, instead of the system's (routes may name
    /// their own).
    #[serde(default)]
    pub upstream_ca_file: Option<PathBuf>,
    /// A lease is used until this long before it ends, then another is
    /// requested.
    #[serde(default = "default_renew_margin")]
    pub lease_renew_margin_seconds: u64,
    /// A SigV4-signed request's body is read whole to sign it; at most this.
    #[serde(default = "default_signed_body")]
    pub max_signed_body_bytes: usize,
    /// Seconds to wait for an upstream's response head.
    #[serde(default = "default_upstream_timeout")]
    pub upstream_timeout_seconds: u64,
    /// Threads serving requests. One keeps every hand-off of a request on
    /// one core, which is most of the latency the proxy adds; raise it
    /// when one core cannot carry the request rate.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
}

fn default_worker_threads() -> usize {
    1
}

fn default_renew_margin() -> u64 {
    5
}
fn default_signed_body() -> usize {
    8 << 20
}
fn default_upstream_timeout() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSettings {
    /// The broker's URL (`https://`, or `http://` to a loopback address).
    pub url: String,
    /// The proxy's operator token (role `proxy`), re-read when it changes.
    pub token_file: PathBuf,
    /// The broker's CA, when it is not in the system's roots: then the
    /// only one trusted for the broker.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_broker_timeout")]
    pub timeout_seconds: u64,
}

fn default_broker_timeout() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// `scheme://host[:port][/path prefix]`: what this route covers.
    pub destination: String,
    /// The addresses the destination may resolve to (CIDRs). Without it,
    /// only public addresses: a name that resolves to loopback, private,
    /// link-local (cloud metadata) or other special addresses is refused.
    /// Checked on every connection.
    #[serde(default)]
    pub addresses: Option<Vec<String>>,
    /// Roots for this route's upstream TLS.
    #[serde(default)]
    pub upstream_ca_file: Option<PathBuf>,
    /// The broker tool a request counts as (registered with the policy).
    pub tool: String,
    /// Templates over `{method}`, `{host}`, `{port}`, `{path}`.
    #[serde(default = "default_action")]
    pub action: String,
    #[serde(default = "default_resource")]
    pub resource: String,
    pub credential: CredentialConfig,
    pub inject: Inject,
}

fn default_action() -> String {
    "{method}".into()
}
fn default_resource() -> String {
    "{host}{path}".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    pub provider: String,
    pub role: String,
    pub ttl_seconds: i64,
    #[serde(default)]
    pub scope: Vec<String>,
}

/// How the leased credential goes into the request.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Inject {
    /// `Authorization: Bearer <field>` (default field `token`).
    Bearer {
        #[serde(default = "default_token_field")]
        field: String,
    },
    /// `Authorization: Basic` with a fixed `username` or the credential's
    /// `username_field`, and the credential's `password_field`.
    Basic {
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        username_field: Option<String>,
        #[serde(default = "default_password_field")]
        password_field: String,
    },
    /// A named header: `prefix` + the credential's `field`.
    Header {
        name: String,
        #[serde(default = "default_token_field")]
        field: String,
        #[serde(default)]
        prefix: String,
    },
    /// AWS Signature Version 4 with an `aws-sts` lease's session.
    AwsSigv4 { region: String, service: String },
}

fn default_token_field() -> String {
    "token".into()
}
fn default_password_field() -> String {
    "password".into()
}

/// Where the proxy listens.
#[derive(Debug, Clone)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A route's destination, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub https: bool,
    pub host: String,
    pub port: u16,
    pub prefix: String,
}

impl Destination {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or("expected scheme://host[:port][/prefix]")?;
        let https = match scheme {
            "https" => true,
            "http" => false,
            other => return Err(format!("scheme `{other}`: expected http or https")),
        };
        if rest.contains(['?', '#', '@']) {
            return Err("no query, fragment or user info".into());
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = split_host_port(authority, if https { 443 } else { 80 })?;
        if crate::route::has_dot_segment(path) {
            return Err("the path prefix may not contain `.` or `..` segments".into());
        }
        Ok(Self {
            https,
            host,
            port,
            prefix: path.to_owned(),
        })
    }
}

/// `host[:port]` (IPv6 in brackets), the host lower-cased.
pub fn split_host_port(authority: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, rest) = v6.split_once(']').ok_or("unclosed `[` in the host")?;
        let port = match rest.strip_prefix(':') {
            Some(p) => Some(p),
            None if rest.is_empty() => None,
            None => return Err("unexpected text after `]`".into()),
        };
        (h.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (authority.to_owned(), None),
        }
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
    {
        return Err(format!("`{host}` is not a host name or address"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("`{p}` is not a port"))?,
        None => default_port,
    };
    Ok((host.to_ascii_lowercase(), port))
}

const PLACEHOLDERS: [&str; 4] = ["{method}", "{host}", "{port}", "{path}"];

fn check_template(field: &str, t: &str) -> Result<(), ConfigError> {
    let mut rest = t;
    while let Some(i) = rest.find('{') {
        let tail = &rest[i..];
        let Some(p) = PLACEHOLDERS.iter().find(|p| tail.starts_with(**p)) else {
            return Err(err(
                field,
                format!(
                    "unknown placeholder in `{t}`; the template may use {}",
                    PLACEHOLDERS.join(", ")
                ),
            ));
        };
        rest = &tail[p.len()..];
    }
    Ok(())
}

fn is_tool_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b))
}

/// Headers a route may not inject into (they frame the connection).
const RESERVED_HEADERS: [&str; 10] = [
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-connection",
    "keep-alive",
];

impl ProxyConfig {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let c: Self = toml::from_str(text).map_err(|e| err("config", e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("config", format!("{}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    pub fn listen(&self) -> Result<Listen, ConfigError> {
        if let Some(p) = self.listen.strip_prefix("unix:") {
            if !p.starts_with('/') {
                return Err(err("listen", "a Unix socket path must be absolute"));
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        let addr: SocketAddr = self.listen.parse().map_err(|_| {
            err(
                "listen",
                format!("`{}` is not address:port or unix:/path", self.listen),
            )
        })?;
        if !addr.ip().is_loopback() {
            return Err(err(
                "listen",
                "assistants send their proxy credential in clear: listen on a loopback address \
                 or a Unix socket",
            ));
        }
        Ok(Listen::Tcp(addr))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.listen()?;
        let broker =
            reqwest::Url::parse(&self.broker.url).map_err(|e| err("broker.url", e.to_string()))?;
        match broker.scheme() {
            "https" => {}
            "http" if url_is_loopback(&broker) => {}
            "http" => {
                return Err(err(
                    "broker.url",
                    "`http://` only to a loopback address; use https",
                ));
            }
            s => return Err(err("broker.url", format!("scheme `{s}`"))),
        }
        if !(1..=256).contains(&self.worker_threads) {
            return Err(err("worker_threads", "1-256"));
        }
        if self.broker.timeout_seconds == 0 || self.upstream_timeout_seconds == 0 {
            return Err(err("timeout_seconds", "must be at least 1"));
        }
        if self.routes.is_empty() {
            return Err(err(
                "route",
                "no routes: every destination would be refused; add [[route]] tables",
            ));
        }
        let mut names = BTreeSet::new();
        let mut covered = BTreeSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let f = |name: &str| format!("route[{i}].{name}");
            if r.name.is_empty() || !is_tool_name(&r.name) {
                return Err(err(f("name"), "1-128 of [A-Za-z0-9._:/-]"));
            }
            if !names.insert(r.name.clone()) {
                return Err(err(f("name"), format!("`{}` is used twice", r.name)));
            }
            let d = Destination::parse(&r.destination).map_err(|m| err(f("destination"), m))?;
            if !covered.insert((d.https, d.host.clone(), d.port, d.prefix.clone())) {
                return Err(err(
                    f("destination"),
                    "another route covers exactly this destination",
                ));
            }
            let cidrs = match &r.addresses {
                Some(list) => {
                    if list.is_empty() {
                        return Err(err(
                            f("addresses"),
                            "empty: leave it out for public addresses only",
                        ));
                    }
                    list.iter()
                        .map(|s| Cidr::parse(s).map_err(|m| err(f("addresses"), m)))
                        .collect::<Result<Vec<_>, _>>()?
                }
                None => Vec::new(),
            };
            if !d.https && (cidrs.is_empty() || !cidrs.iter().all(Cidr::is_loopback)) {
                return Err(err(
                    f("destination"),
                    "`http://` sends the injected credential in clear: only to loopback \
                     `addresses`; use https",
                ));
            }
            if let Ok(ip) = d.host.parse::<IpAddr>()
                && !cidrs.is_empty()
                && !cidrs.iter().any(|c| c.contains(ip))
            {
                return Err(err(
                    f("addresses"),
                    format!("the destination's own address {ip} is not among them"),
                ));
            }
            if !is_tool_name(&r.tool) {
                return Err(err(f("tool"), "1-128 of [A-Za-z0-9._:/-]"));
            }
            check_template(&f("action"), &r.action)?;
            check_template(&f("resource"), &r.resource)?;
            if r.action.is_empty() {
                return Err(err(f("action"), "empty"));
            }
            let c = &r.credential;
            if c.provider.is_empty() || c.role.is_empty() {
                return Err(err(f("credential"), "`provider` and `role` are required"));
            }
            if c.ttl_seconds < 1 {
                return Err(err(f("credential.ttl_seconds"), "must be at least 1"));
            }
            if u64::try_from(c.ttl_seconds).unwrap_or(0) <= self.lease_renew_margin_seconds {
                return Err(err(
                    f("credential.ttl_seconds"),
                    format!(
                        "must exceed lease_renew_margin_seconds ({}), or no lease would ever be used",
                        self.lease_renew_margin_seconds
                    ),
                ));
            }
            match &r.inject {
                Inject::Bearer { field } | Inject::Header { field, .. } if field.is_empty() => {
                    return Err(err(f("inject.field"), "empty"));
                }
                Inject::Header { name, .. } => {
                    let lower = name.to_ascii_lowercase();
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                        || RESERVED_HEADERS.contains(&lower.as_str())
                        || lower.starts_with("leasehold-")
                    {
                        return Err(err(
                            f("inject.name"),
                            format!("`{name}` is not a header a route may set"),
                        ));
                    }
                }
                Inject::Basic {
                    username,
                    username_field,
                    ..
                } if username.is_some() == username_field.is_some() => {
                    return Err(err(
                        f("inject"),
                        "basic: exactly one of `username` or `username_field`",
                    ));
                }
                Inject::AwsSigv4 { region, service } => {
                    let word = |s: &str| {
                        !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    };
                    if !word(region) || !word(service) {
                        return Err(err(
                            f("inject"),
                            "aws-sigv4: `region` and `service` are AWS names (e.g. us-east-1, sts)",
                        ));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn url_is_loopback(u: &reqwest::Url) -> bool {
    match u.host_str() {
        Some("localhost") => true,
        Some(h) => h
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|a| a.is_loopback()),
        None => false,
    }
}
