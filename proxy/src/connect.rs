//! Connections to upstreams: the destination's name is resolved for every
//! new connection and every address it resolves to must be one the route
//! admits (so a name re-pointed after the route was checked, DNS
//! rebinding, reaches nothing); the proxy then connects to a checked
//! address itself, and speaks TLS with the route's host name.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::route::Route;

/// Name resolution, swappable in tests (a name whose answer changes).
pub trait Resolve: Send + Sync + std::fmt::Debug {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + '_>>;
}

/// The system's resolver (`getaddrinfo`: `/etc/hosts`, then DNS).
#[derive(Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + '_>> {
        let target = format!("{host}:{port}");
        Box::pin(async move { Ok(tokio::net::lookup_host(target).await?.collect()) })
    }
}

/// Why no connection was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The destination resolved to an address its route does not admit.
    #[error("{host} resolved to {addr}, which route `{route}` does not admit")]
    Refused {
        route: String,
        host: String,
        addr: std::net::IpAddr,
    },
    #[error("resolving {host}: {why}")]
    Resolve { host: String, why: String },
    #[error("connecting to {host}: {why}")]
    Io { host: String, why: String },
}

/// Resolve the route's host, refuse if any answer is outside the route,
/// return the admitted addresses.
pub async fn checked_addresses(
    route: &Route,
    resolver: &dyn Resolve,
) -> Result<Vec<SocketAddr>, ConnectError> {
    let host = &route.dest.host;
    let addrs =
        resolver
            .resolve(host, route.dest.port)
            .await
            .map_err(|e| ConnectError::Resolve {
                host: host.clone(),
                why: e.to_string(),
            })?;
    if addrs.is_empty() {
        return Err(ConnectError::Resolve {
            host: host.clone(),
            why: "no addresses".into(),
        });
    }
    // every answer, not just the first: an attacker's name may mix them
    if let Some(bad) = addrs.iter().find(|a| !route.allowed.admits(a.ip())) {
        return Err(ConnectError::Refused {
            route: route.name.clone(),
            host: host.clone(),
            addr: bad.ip(),
        });
    }
    Ok(addrs)
}

/// The connector of one route's upstream client.
#[derive(Clone, Debug)]
pub struct Connector {
    pub route: Arc<Route>,
    pub tls: Arc<rustls::ClientConfig>,
    pub resolver: Arc<dyn Resolve>,
    pub timeout: Duration,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        // the route's own destination, whatever the URI says
        let this = self.clone();
        Box::pin(async move { this.connect().await })
    }
}

impl Connector {
    async fn connect(&self) -> Result<Conn, ConnectError> {
        let host = self.route.dest.host.clone();
        let io = |why: String| ConnectError::Io {
            host: host.clone(),
            why,
        };
        let addrs = checked_addresses(&self.route, &*self.resolver).await?;
        let mut last = String::from("no address");
        let mut stream = None;
        for a in addrs {
            match tokio::time::timeout(self.timeout, TcpStream::connect(a)).await {
                Ok(Ok(s)) => {
                    stream = Some(s);
                    break;
                }
                Ok(Err(e)) => last = format!("{a}: {e}"),
                Err(_) => last = format!("{a}: timed out"),
            }
        }
        let tcp = stream.ok_or_else(|| io(last))?;
        finish(tcp, &host, self.route.dest.https.then_some(&self.tls))
            .await
            .map_err(io)
    }
}

/// A connected socket as a pooled client holds it: Nagle off, and TLS to
/// `host` (verified by `tls`'s roots) when `tls` is given.
pub(crate) async fn finish(
    tcp: TcpStream,
    host: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Conn, String> {
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(Conn(TokioIo::new(Stream::Plain(tcp))));
    };
    let name =
        rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    Ok(Conn(TokioIo::new(Stream::Tls(Box::new(tls)))))
}

/// The proxy's pooled HTTP/1 client over `connector` (upstreams and the
/// broker alike).
pub(crate) fn pooled<C, B>(connector: C) -> hyper_util::client::legacy::Client<C, B>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
    B: hyper::body::Body + Send,
    B::Data: Send,
{
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// A plain or TLS connection to an upstream.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What the pooled client holds.
#[derive(Debug)]
pub struct Conn(TokioIo<Stream>);

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A name whose answer changes between lookups (DNS rebinding).
    #[derive(Debug)]
    struct Rebinding(Mutex<Vec<&'static str>>);

    impl Resolve for Rebinding {
        fn resolve(
            &self,
            _: &str,
            port: u16,
        ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + '_>> {
            let next = self.0.lock().unwrap().remove(0);
            Box::pin(async move { Ok(vec![SocketAddr::new(next.parse().unwrap(), port)]) })
        }
    }

    fn route(addresses: Option<Vec<&str>>) -> Route {
        let cfg: crate::config::RouteConfig = toml::from_str(&format!(
            "name = 'r'\ndestination = 'https://api.example.test/'\ntool = 't'\n{}\n[credential]\nprovider = 'token'\nrole = 'demo'\nttl_seconds = 60\n[inject]\nkind = 'bearer'\n",
            addresses.map_or(String::new(), |a| format!("addresses = {a:?}"))
        ))
        .unwrap();
        Route::new(0, cfg).unwrap()
    }

    #[tokio::test]
    async fn every_connection_is_checked_again() {
        let r = route(Some(vec!["127.0.0.1/32"]));
        let dns = Rebinding(Mutex::new(vec!["127.0.0.1", "10.0.0.7", "127.0.0.1"]));
        assert!(checked_addresses(&r, &dns).await.is_ok());
        // the same name, re-pointed: refused at the next connection
        match checked_addresses(&r, &dns).await {
            Err(ConnectError::Refused { addr, .. }) => assert_eq!(addr.to_string(), "10.0.0.7"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(checked_addresses(&r, &dns).await.is_ok());
    }

    #[tokio::test]
    async fn without_addresses_only_public_ones() {
        let r = route(None);
        let dns = Rebinding(Mutex::new(vec!["169.254.169.254", "93.184.215.14"]));
        assert!(matches!(
            checked_addresses(&r, &dns).await,
            Err(ConnectError::Refused { .. })
        ));
        assert!(checked_addresses(&r, &dns).await.is_ok());
    }
}
