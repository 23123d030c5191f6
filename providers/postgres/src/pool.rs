//! Management connections: a bounded pool, TLS through rustls, and the
//! mapping of driver errors to the broker's classes.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold_provider::ProviderError;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use zeroize::Zeroizing;

use crate::config::{PostgresConfig, TlsMode};

pub struct Pool {
    cfg: PostgresConfig,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    idle: Mutex<Vec<Client>>,
    permits: Semaphore,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("host", &self.cfg.host)
            .field("port", &self.cfg.port)
            .field("database", &self.cfg.database)
            .field("size", &self.cfg.pool_size)
            .finish_non_exhaustive()
    }
}

/// A pooled connection; back to the pool on drop unless it broke.
pub struct Conn<'a> {
    client: Option<Client>,
    pool: &'a Pool,
    _permit: SemaphorePermit<'a>,
}

impl std::fmt::Debug for Conn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Conn")
    }
}

impl Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        // set at construction, taken only in drop
        self.client.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take()
            && !c.is_closed()
            && let Ok(mut idle) = self.pool.idle.lock()
        {
            idle.push(c);
        }
    }
}

impl Pool {
    pub fn new(cfg: PostgresConfig) -> Result<Self, String> {
        let tls = match cfg.tls {
            TlsMode::Disable => None,
            TlsMode::VerifyFull => Some(rustls_connector(&cfg)?),
        };
        let permits = Semaphore::new(cfg.pool_size);
        Ok(Self {
            cfg,
            tls,
            idle: Mutex::new(Vec::new()),
            permits,
        })
    }

    pub fn config(&self) -> &PostgresConfig {
        &self.cfg
    }

    /// A connection: an idle one, or a new one. Waits at most the connect
    /// timeout for a free slot.
    pub async fn get(&self) -> Result<Conn<'_>, ProviderError> {
        let wait = Duration::from_secs(self.cfg.connect_timeout_seconds);
        let permit = tokio::time::timeout(wait, self.permits.acquire())
            .await
            .map_err(|_| {
                ProviderError::retryable(format!(
                    "all {} database connections are busy",
                    self.cfg.pool_size
                ))
            })?
            .map_err(|_| ProviderError::permanent("the connection pool is closed"))?;
        let reused = self.idle.lock().ok().and_then(|mut idle| {
            while let Some(c) = idle.pop() {
                if !c.is_closed() {
                    return Some(c);
                }
            }
            None
        });
        let client = match reused {
            Some(c) => c,
            None => self.connect().await?,
        };
        Ok(Conn {
            client: Some(client),
            pool: self,
            _permit: permit,
        })
    }

    /// A new connection, outside the pool's count (the caller manages it).
    pub async fn connect(&self) -> Result<Client, ProviderError> {
        let (client, io) = self.connect_with(None).await?;
        tokio::spawn(io);
        Ok(client)
    }

    /// A new connection whose I/O runs only while its caller polls the
    /// returned [`Driver`] (alongside the client's requests), on the
    /// caller's own thread, instead of in a task of its own: a caller that
    /// waits for each answer saves a thread's wake-up per request. Left
    /// unpolled, it reads nothing, so it notices being closed only when
    /// next polled. The socket stays with the runtime this is awaited on,
    /// which must keep running.
    pub async fn connect_driven(&self) -> Result<(Client, Driver), ProviderError> {
        let (client, io) = self.connect_with(None).await?;
        // unconstrained by tokio's cooperative budget: a caller blocking on
        // it inside a task of another runtime would spend that task's
        // budget, which is given back only when the task yields
        Ok((client, Box::pin(tokio::task::unconstrained(io))))
    }

    /// A new connection whose `NOTIFY` messages (after a `LISTEN`) arrive
    /// on the returned channel; the channel closes with the connection.
    pub async fn connect_listening(
        &self,
    ) -> Result<
        (
            Client,
            tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
        ),
        ProviderError,
    > {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (client, io) = self.connect_with(Some(tx)).await?;
        tokio::spawn(io);
        Ok((client, rx))
    }

    /// A new connection and its I/O, for the caller to run.
    async fn connect_with(
        &self,
        notify: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
    ) -> Result<(Client, Driver), ProviderError> {
        let password = self.password()?;
        let mut c = tokio_postgres::Config::new();
        c.host(&self.cfg.host)
            .port(self.cfg.port)
            .dbname(&self.cfg.database)
            .user(&self.cfg.user)
            .password(password.as_bytes())
            .application_name("leasehold")
            .connect_timeout(Duration::from_secs(self.cfg.connect_timeout_seconds));
        let wait = Duration::from_secs(self.cfg.connect_timeout_seconds);
        let unreachable = |e: String| {
            ProviderError::retryable(format!(
                "cannot connect to PostgreSQL at {}:{}/{} as `{}`: {e}",
                self.cfg.host, self.cfg.port, self.cfg.database, self.cfg.user
            ))
        };
        match &self.tls {
            None => open(&c, tokio_postgres::NoTls, wait, &unreachable, notify).await,
            Some(tls) => open(&c, tls.clone(), wait, &unreachable, notify).await,
        }
    }

    fn password(&self) -> Result<Zeroizing<String>, ProviderError> {
        if let Some(p) = &self.cfg.password_file {
            let s = std::fs::read_to_string(p).map_err(|e| {
                ProviderError::permanent(format!("cannot read password_file {}: {e}", p.display()))
            })?;
            return Ok(Zeroizing::new(s.trim_end_matches(['\n', '\r']).to_owned()));
        }
        if let Some(var) = &self.cfg.password_env {
            return std::env::var(var).map(Zeroizing::new).map_err(|_| {
                ProviderError::permanent(format!(
                    "the environment variable {var} (password_env) is not set"
                ))
            });
        }
        Err(ProviderError::permanent(
            "no management password configured",
        ))
    }
}

/// A connection's I/O: it ends when the connection does. Polled by a task
/// of its own or, for [`Pool::connect_driven`], by the connection's user.
pub type Driver = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Connect with a TLS mode (plain or rustls). The connection's I/O is
/// returned for the caller to run; with `notify`, it hands `NOTIFY`
/// messages on.
async fn open<T>(
    c: &tokio_postgres::Config,
    tls: T,
    wait: Duration,
    unreachable: &(dyn Fn(String) -> ProviderError + Sync),
    notify: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
) -> Result<(Client, Driver), ProviderError>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut conn) = tokio::time::timeout(wait, c.connect(tls))
        .await
        .map_err(|_| unreachable("timed out".into()))?
        .map_err(|e| connect_error(&e, unreachable))?;
    let io: Driver = match notify {
        None => Box::pin(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "management connection closed");
            }
        }),
        Some(tx) => Box::pin(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
                match m {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if tx.send(n).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "listening connection closed");
                        break;
                    }
                }
            }
        }),
    };
    Ok((client, io))
}

/// Authentication failures are the operator's to fix; anything else at
/// connect time (refused, reset, starting up) may pass.
fn connect_error(
    e: &tokio_postgres::Error,
    unreachable: &(dyn Fn(String) -> ProviderError + Sync),
) -> ProviderError {
    match e.code() {
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            ProviderError::permanent(format!(
                "the management role was refused: {}",
                db_message(e)
            ))
        }
        _ => unreachable(db_message(e)),
    }
}

fn rustls_connector(
    cfg: &PostgresConfig,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let path = cfg
        .ca_file
        .as_ref()
        .ok_or("tls = \"verify-full\" needs ca_file")?;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("ca_file {}: no certificate in it", path.display()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The server's message (with its SQLSTATE) or the driver's.
pub fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                src = inner.source();
            }
            s
        }
    }
}

/// Two transactions changed the same catalog row (concurrent GRANTs on one
/// schema, a DROP OWNED beside them): PostgreSQL reports it as an internal
/// error, but running the transaction again succeeds.
pub fn concurrent_update(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        Some(db) => {
            let c = db.code().code();
            c == "40001" || c == "40P01" || (c == "XX000" && db.message().contains("concurrently"))
        }
        None => false,
    }
}

/// Whether trying again later may succeed.
pub fn retryable(e: &tokio_postgres::Error) -> bool {
    if concurrent_update(e) {
        return true;
    }
    let Some(code) = e.code() else {
        // no SQLSTATE: the connection broke or never was
        return true;
    };
    let c = code.code();
    // connection, resources, operator intervention, system, serialization,
    // deadlock, lock timeout
    c.starts_with("08")
        || c.starts_with("53")
        || c.starts_with("57")
        || c.starts_with("58")
        || c == "40001"
        || c == "40P01"
        || c == "55P03"
}

/// A driver error as a provider error, `what` saying what was being done.
/// Privilege errors name what the management role lacks.
pub fn classify(e: &tokio_postgres::Error, what: &str) -> ProviderError {
    let msg = format!("{what}: {}", db_message(e));
    if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        return ProviderError::permanent(format!(
            "{msg}; the management role lacks this privilege"
        ));
    }
    if retryable(e) {
        ProviderError::retryable(msg)
    } else {
        ProviderError::permanent(msg)
    }
}
