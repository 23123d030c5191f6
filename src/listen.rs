//! Accepting connections: the caps on connections (in total, and per
//! source address), the header and idle timeout, TLS, and the graceful
//! drain at shutdown. A connection over a cap is closed as it arrives, with
//! a log line (at most one a second) and a metric, so a flood of idle or
//! slow sockets can neither exhaust the file descriptors nor hold them:
//! probes and genuine callers keep being answered.
//!
//! Over TLS, a client may present a certificate (asked for, never
//! required); its chain rides on each of the connection's requests as a
//! [`ClientChain`] for the authentication layer to check.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceExt as _;

use crate::config::{ConnectionLimits, TlsConfig};

/// The certificate chain (leaf first) the TLS client presented on the
/// connection a request arrived on. The handshake proved the client holds
/// the leaf's key; nothing else about it is checked yet.
#[derive(Clone, Debug)]
pub struct ClientChain(pub Arc<[rustls::pki_types::CertificateDer<'static>]>);

/// The TLS acceptor for `[server.tls]`: TLS 1.2 and 1.3 with ring, HTTP/2
/// and HTTP/1.1 by ALPN, and, with `request_client_certificates`, a request
/// for a client certificate.
pub fn tls_acceptor(
    tls: &TlsConfig,
    request_client_certificates: bool,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("server.tls.cert_file {}: {e}", tls.cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls.cert_file {}: no certificate in it",
            tls.cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| format!("server.tls.key_file {}: {e}", tls.key_file.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?;
    let builder = if request_client_certificates {
        builder.with_client_cert_verifier(Arc::new(RequestClientCertificate::default()))
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("server.tls: the certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The TLS layer's side: ask for a client certificate, never require one,
/// and accept the handshake of any whose key the client proves it holds;
/// the request is then authenticated (or refused, with a 401 that is
/// recorded) by the `x509` workload issuers (`auth::X509Verifier`), which
/// check the chain.
#[derive(Debug)]
pub struct RequestClientCertificate {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl Default for RequestClientCertificate {
    fn default() -> Self {
        Self {
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl rustls::server::danger::ClientCertVerifier for RequestClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        // the chain is checked per request, by the issuer that claims it
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// File descriptors kept for everything but connections (the store, its
/// log, providers' pools, the metrics listener, plugins).
const RESERVED_FDS: usize = 256;

/// How many connections each address has open, and all of them.
#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// A connection's place; given back when it closes.
#[derive(Debug)]
struct Place {
    open: Arc<Mutex<Open>>,
    ip: IpAddr,
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Ok(mut o) = self.open.lock() {
            o.total = o.total.saturating_sub(1);
            if let Some(n) = o.by_address.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    o.by_address.remove(&self.ip);
                }
            }
        }
    }
}

/// The open-file limit of this process (`Max open files` in
/// `/proc/self/limits`), if it can be read.
fn open_file_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The connection cap that fits this process's descriptor limit.
pub fn effective_max(limits: &ConnectionLimits) -> usize {
    match open_file_limit() {
        Some(fds) if fds.saturating_sub(RESERVED_FDS) < limits.max => {
            let fit = fds.saturating_sub(RESERVED_FDS).max(16);
            tracing::warn!(
                configured = limits.max,
                open_file_limit = fds,
                using = fit,
                "server.connections.max does not fit the open-file limit; raise LimitNOFILE or lower it"
            );
            fit
        }
        _ => limits.max,
    }
}

/// Serve `app` on `listener` until `drain` resolves; then stop accepting
/// and give open connections `grace` to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: &ConnectionLimits,
    drain: impl std::future::Future<Output = ()> + Send,
    grace: Duration,
) {
    let max = effective_max(limits);
    let per_address = limits.per_address.min(max);
    let timeout = Duration::from_secs(limits.header_timeout_seconds);
    let open = Arc::new(Mutex::new(Open::default()));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(timeout))
        .keep_alive_timeout(timeout);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let mut last_refusal_log: Option<Instant> = None;
    tokio::pin!(drain);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut drain => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // out of descriptors, or a connection reset before it
                    // was accepted: wait a moment rather than spin
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let place = {
            let Ok(mut o) = open.lock() else { continue };
            let from = o.by_address.get(&peer.ip()).copied().unwrap_or(0);
            if o.total >= max || from >= per_address {
                let why = if o.total >= max {
                    "total"
                } else {
                    "per_address"
                };
                drop(o);
                crate::metrics::connection_refused(why);
                if last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last_refusal_log = Some(Instant::now());
                    tracing::warn!(
                        peer = %peer.ip(),
                        cap = why,
                        max,
                        per_address,
                        "connection refused: server.connections cap reached"
                    );
                }
                drop(stream);
                continue;
            }
            o.total += 1;
            *o.by_address.entry(peer.ip()).or_insert(0) += 1;
            Place {
                open: open.clone(),
                ip: peer.ip(),
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = move |chain: Option<ClientChain>| {
            tower::ServiceBuilder::new()
                .map_request(move |mut req: axum::extract::Request| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    if let Some(c) = &chain {
                        req.extensions_mut().insert(c.clone());
                    }
                    req
                })
                .service(app)
        };
        let (builder, tls, watcher) = (builder.clone(), tls.clone(), graceful.watcher());
        tokio::spawn(async move {
            let _place = place;
            match tls {
                None => {
                    serve_one(
                        &builder,
                        FirstByte::new(stream, timeout),
                        service(None),
                        watcher,
                    )
                    .await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let chain = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .filter(|c| !c.is_empty())
                                .map(|c| {
                                    ClientChain(c.iter().map(|d| d.clone().into_owned()).collect())
                                });
                            serve_one(
                                &builder,
                                FirstByte::new(tls, timeout),
                                service(chain),
                                watcher,
                            )
                            .await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => tracing::warn!("grace period over; dropping remaining connections"),
    }
}

/// A connection that must send its first byte before a deadline: the
/// protocol detection (HTTP/1 or HTTP/2) waits for it with no timeout of
/// its own, and after it hyper's header timeout and HTTP/2 keep-alive take
/// over.
struct FirstByte<I> {
    io: I,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<I> FirstByte<I> {
    fn new(io: I, within: Duration) -> Self {
        Self {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstByte<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.deadline = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no request within the header timeout",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstByte<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

async fn serve_one<I, S>(
    builder: &Builder<TokioExecutor>,
    io: I,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            axum::extract::Request,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn =
        builder.serve_connection_with_upgrades(
            TokioIo::new(io),
            TowerToHyperService::new(service.map_request(
                |r: hyper::Request<hyper::body::Incoming>| r.map(axum::body::Body::new),
            )),
        );
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
