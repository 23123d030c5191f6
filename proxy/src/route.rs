//! Which route a request takes, what it counts as for the broker, and
//! which addresses its destination may resolve to.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{Destination, Inject, RouteConfig};

/// An address block, `a.b.c.d/n` or `x::y/n` (a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("`{s}` is not an address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length is 0-{max}"))?,
            None => max,
        };
        let c = Self { addr, bits };
        if c.network() != addr {
            return Err(format!(
                "`{s}` has host bits set; the block is {}/{bits}",
                c.network()
            ));
        }
        Ok(c)
    }

    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let m = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & m).into())
            }
            IpAddr::V6(a) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & m).into())
            }
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Self {
                    addr: ip,
                    bits: self.bits,
                }
                .network()
                    == self.addr
            }
            _ => false,
        }
    }

    pub fn is_loopback(&self) -> bool {
        self.addr.is_loopback() && self.bits >= if self.addr.is_ipv4() { 8 } else { 128 }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether an address is one a name on the public internet may resolve
/// to: not loopback, private, link-local (cloud metadata), shared,
/// documentation, multicast, unspecified or reserved.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => {
            let o = a.octets();
            !(a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || a.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10, shared
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0/24
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18/15, benchmarking
                || o[0] >= 240)
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x0064 && s[1] == 0xff9b)) // NAT64
        }
    }
}

/// Which addresses a route's destination may resolve to.
#[derive(Debug, Clone)]
pub enum Allowed {
    Listed(Vec<Cidr>),
    PublicOnly,
}

impl Allowed {
    pub fn admits(&self, ip: IpAddr) -> bool {
        match self {
            Self::Listed(c) => c.iter().any(|c| c.contains(ip)),
            Self::PublicOnly => is_public(ip),
        }
    }
}

/// Whether a path has a `.` or `..` segment, plainly or percent-encoded
/// (which could step out of a route's prefix at the upstream).
pub fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|seg| {
        let lower = seg.to_ascii_lowercase().replace("%2e", ".");
        lower == "." || lower == ".."
    }) || path.to_ascii_lowercase().contains("%2f")
        || path.contains('\\')
}

/// A configured route, ready to match.
#[derive(Debug)]
pub struct Route {
    pub index: usize,
    pub name: String,
    pub dest: Destination,
    pub allowed: Allowed,
    pub cfg: RouteConfig,
}

impl Route {
    pub fn new(index: usize, cfg: RouteConfig) -> Result<Self, String> {
        let dest = Destination::parse(&cfg.destination)?;
        let allowed = match &cfg.addresses {
            Some(list) => Allowed::Listed(
                list.iter()
                    .map(|s| Cidr::parse(s))
                    .collect::<Result<_, _>>()?,
            ),
            None => Allowed::PublicOnly,
        };
        Ok(Self {
            index,
            name: cfg.name.clone(),
            dest,
            allowed,
            cfg,
        })
    }

    fn covers_path(&self, path: &str) -> bool {
        let p = &self.dest.prefix;
        path == p.as_str()
            || (path.starts_with(p.as_str())
                && (p.ends_with('/') || path[p.len()..].starts_with('/')))
    }

    /// `{method}`, `{host}`, `{port}` and `{path}` filled in.
    pub fn render(&self, template: &str, method: &str, path: &str) -> String {
        template
            .replace("{method}", method)
            .replace("{host}", &self.dest.host)
            .replace("{port}", &self.dest.port.to_string())
            .replace("{path}", path)
    }

    pub fn signs(&self) -> bool {
        matches!(self.cfg.inject, Inject::AwsSigv4 { .. })
    }
}

/// Every route; a request takes the one with the longest prefix.
#[derive(Debug)]
pub struct Routes(pub Vec<Arc<Route>>);

impl Routes {
    pub fn find(&self, https: bool, host: &str, port: u16, path: &str) -> Option<&Arc<Route>> {
        self.0
            .iter()
            .filter(|r| r.dest.https == https && r.dest.host == host && r.dest.port == port)
            .filter(|r| r.covers_path(path))
            .max_by_key(|r| r.dest.prefix.len())
    }

    /// Whether any route covers `host:port` over TLS (what `CONNECT` may
    /// open).
    pub fn any_tls(&self, host: &str, port: u16) -> bool {
        self.0
            .iter()
            .any(|r| r.dest.https && r.dest.host == host && r.dest.port == port)
    }

    /// A Unix-socket request names only a host (and maybe a port): the
    /// one origin that host has among the routes.
    pub fn origin_for_host(&self, host: &str, port: Option<u16>) -> Option<(bool, u16)> {
        let mut origins: Vec<(bool, u16)> = self
            .0
            .iter()
            .filter(|r| r.dest.host == host && port.is_none_or(|p| r.dest.port == p))
            .map(|r| (r.dest.https, r.dest.port))
            .collect();
        origins.sort_unstable();
        origins.dedup();
        match origins.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_blocks() {
        let c = Cidr::parse("127.0.0.0/8").unwrap();
        assert!(c.contains("127.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!c.contains("128.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let one = Cidr::parse("127.0.0.2").unwrap();
        assert!(one.contains("127.0.0.2".parse().unwrap()));
        assert!(!one.contains("127.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.1/8").unwrap_err().contains("host bits"));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nonsense").is_err());
        assert!(
            Cidr::parse("::/0")
                .unwrap()
                .contains("2001:db8::1".parse().unwrap())
        );
    }

    #[test]
    fn public_addresses_only() {
        for special in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:169.254.169.254",
            "255.255.255.255",
        ] {
            assert!(!is_public(special.parse().unwrap()), "{special}");
        }
        for public in ["93.184.215.14", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn dot_segments_are_found() {
        for bad in [
            "/v1/../admin",
            "/v1/%2e%2e/admin",
            "/v1/%2E./x",
            "/./x",
            "/v1%2fadmin",
            "/a\\..\\b",
        ] {
            assert!(has_dot_segment(bad), "{bad}");
        }
        for good in ["/v1/x", "/v1/..x", "/a.b/c", "/"] {
            assert!(!has_dot_segment(good), "{good}");
        }
    }
}
