//! `run(listener, config, clock, shutdown)`: everything `serve` and `dev`
//! do after parsing arguments, and what the tests start on port 0.
//!
//! Order matters: the store opens (key and schema checked) before anything
//! listens; recovery queues rollbacks of unresolved intents before the first
//! request; on shutdown readiness turns false first, in-flight requests get
//! the grace period, the reaper stops, and the store is closed cleanly last
//! (so the next start opens it without a repair scan).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::api::{AppState, HttpLimits};
use crate::auth::Authenticator;
use crate::clock::Clock;
use crate::config::Config;
use crate::domain::Broker;
use crate::providers::Providers;
use crate::store::{Store, StoreKey, StoreOptions};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("store key: {0}")]
    Key(#[from] crate::store::KeyError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Provider(#[from] crate::providers::BuildError),
    #[error("authentication: {0}")]
    Auth(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("recovery: {0}")]
    Recovery(String),
    #[error("audit: {0}")]
    Audit(String),
    #[error("policy: {0}")]
    Policy(String),
}

/// Build the event shaping from config (HMAC fields, test and benchmark switches).
fn auditor(config: &Config) -> Result<crate::audit::Auditor, ServeError> {
    #[allow(unused_mut)]
    let mut a = crate::audit::Auditor::default();
    if let Some(p) = &config.audit.hmac_key_file {
        let key =
            StoreKey::from_file(p).map_err(|e| ServeError::Audit(format!("hmac_key_file: {e}")))?;
        a.hmac = Some(crate::audit::FieldHmac::new(
            key.expose(),
            config.audit.hmac_fields.clone(),
        ));
    }
    #[cfg(feature = "bench-no-events")]
    {
        a.noop = config.audit.bench_no_events;
    }
    #[cfg(feature = "fault-injection")]
    {
        a.fail_kinds = config.fault.fail_event_kinds.clone();
    }
    Ok(a)
}

/// Load the store key the config names.
pub fn load_key(config: &Config) -> Result<StoreKey, ServeError> {
    Ok(match (&config.store.key_file, &config.store.key_env) {
        (Some(path), _) => StoreKey::from_file(path)?,
        (None, Some(var)) => StoreKey::from_env(var)?,
        (None, None) => {
            return Err(ServeError::Config(crate::config::ConfigError::Invalid {
                field: "store.key_file".into(),
                message: "the store key is required".into(),
            }));
        }
    })
}

/// What tests may add to a broker beyond its config: extra providers (a
/// peer that fails on demand, to exercise retries end to end).
#[derive(Debug, Default)]
pub struct Overrides {
    pub providers: Vec<(String, Arc<dyn leasehold_provider::Provider>)>,
}

/// Serve until `shutdown` resolves, then drain and close.
pub async fn run(
    listener: std::net::TcpListener,
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run_with(listener, config, clock, shutdown, Overrides::default()).await
}

/// [`run`], with [`Overrides`]. The steps: open the store, build the
/// broker, recover and announce, start the background work, serve until
/// shutdown, drain, stop.
pub async fn run_with(
    listener: std::net::TcpListener,
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    overrides: Overrides,
) -> Result<(), ServeError> {
    crate::install_crypto_provider();
    config.validate()?;
    crate::preflight::check_files(&config)?;
    let store = open_store(&config)?;
    let broker = Arc::new(build_broker(&config, store, clock.clone(), overrides)?);
    broker
        .agree_on_token_keys()
        .await
        .map_err(|e| ServeError::Recovery(e.to_string()))?;
    let recovered = recover_and_announce(&broker).await?;
    let auth = Arc::new(Authenticator::new(&config.auth, clock.clone()).map_err(ServeError::Auth)?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut background = start_background(&config, &broker, &auth, &clock, &stop_rx).await?;
    let ready = Arc::new(AtomicBool::new(true));
    if let Some(handle) = crate::metrics::install() {
        // histogram samples queue up until upkeep folds them into buckets:
        // without a scrape they would grow without bound
        let mut stop = stop_rx.clone();
        background.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
                    _ = stop.changed() => return,
                }
            }
        }));
    }
    let limits = Arc::new(crate::api::Limiter::new(config.server.rate_limits.clone()));
    let state = AppState::new(crate::api::AppShared {
        broker: broker.clone(),
        auth,
        ready: ready.clone(),
        limits,
        health: Arc::default(),
        public_url: config
            .server
            .public_url
            .as_ref()
            .map(|u| u.trim_end_matches('/').to_owned()),
        tls: config.server.tls.is_some(),
        console: Default::default(),
    });
    if let Some(addr) = config.server.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let app = crate::api::metrics_router(state.clone());
        let mut stop = stop_rx.clone();
        tracing::info!(%addr, "metrics and probes listener");
        background.push(tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stop.changed().await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "the metrics listener failed");
            }
        }));
    }
    let app = crate::api::router(
        state,
        HttpLimits {
            max_body_bytes: config.server.max_body_bytes,
            request_timeout: Duration::from_secs(config.server.request_timeout_seconds),
        },
    );
    let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    tracing::info!(
        %addr, tls = config.server.tls.is_some(), store = %broker.store_location(),
        providers = broker.providers().names().collect::<Vec<_>>().join(","), recovered,
        "leasehold serving"
    );
    for (name, p) in &config.providers {
        for w in p.settings().warnings() {
            tracing::warn!(provider = %name, "providers.{name}.{w}");
        }
        // until readiness is first checked
        metrics::gauge!("leasehold_provider_advisories", "provider" => name.clone()).set(0.0);
    }
    serve(listener, app, &config, shutdown, ready, grace).await?;
    let _ = stop_tx.send(true);
    for h in background {
        let _ = h.await;
    }
    broker.stop_jobs().await;
    // the last words of the chain: the stop, then a signed checkpoint over it
    if let Err(e) = broker
        .record(
            crate::audit::EventKind::BrokerStopped,
            None,
            crate::audit::EventData::new(),
        )
        .await
    {
        tracing::error!(error = %e, "recording the stop failed");
    }
    if let Err(e) = broker.checkpoint().await {
        tracing::error!(error = %e, "the final checkpoint failed");
    }
    close(broker, grace).await;
    tracing::info!("leasehold stopped");
    Ok(())
}

/// Open the store the config names, with its key (dropped once open).
/// How this broker joins its PostgreSQL store's cluster.
pub fn store_pg_options(
    pg: &crate::config::StorePostgres,
) -> Result<crate::store::PgOptions, ServeError> {
    let node = pg.node();
    Ok(crate::store::PgOptions {
        connection: pg.connection()?,
        advertise: pg.advertise.clone().unwrap_or_else(|| node.clone()),
        node,
        lease_period: pg.lease_period(),
        passive: false,
    })
}

fn open_store(config: &Config) -> Result<Store, ServeError> {
    let key = load_key(config)?;
    let store = Store::open(&store_options(config, false)?, &key)?;
    drop(key);
    Ok(store)
}

/// How to open the store a configuration names (`passive`: without joining
/// a PostgreSQL store's cluster).
fn store_options(config: &Config, passive: bool) -> Result<StoreOptions, ServeError> {
    #[allow(unused_mut)]
    let mut store_options = StoreOptions {
        cache_bytes: config.store.cache_mib.saturating_mul(1 << 20),
        quick_repair: config.store.quick_repair,
        group_commit: crate::store::GroupCommit {
            delay: Duration::from_micros(config.store.commit_delay_micros),
            siblings: config.store.commit_siblings,
        },
        checkpoint_bytes: config.store.checkpoint_mib.saturating_mul(1 << 20),
        reserve_bytes: config.store.reserve_mib.saturating_mul(1 << 20),
        on_commit: Some(std::sync::Arc::new(|seconds, operations, entered| {
            crate::metrics::store_commit(
                seconds,
                operations,
                entered
                    .iter()
                    .map(|((p, s), n)| (p.as_str(), s.as_str(), *n)),
            );
        })),
        ..StoreOptions::new(&config.store.path)
    };
    #[cfg(feature = "fault-injection")]
    if config.fault.no_checkpoints {
        store_options.checkpoint_bytes = u64::MAX;
        store_options.checkpoint_idle = Duration::from_secs(86_400);
    }
    if let Some(pg) = &config.store.postgres
        && config.store.backend == crate::config::StoreBackend::Postgres
    {
        let mut pg = store_pg_options(pg)?;
        pg.passive = passive;
        store_options.postgres = Some(pg);
    }
    Ok(store_options)
}

/// `config validate`'s store check (PostgreSQL: reachable, privileges,
/// schema, key), reading only. `None` for redb (its checks are the files').
pub fn check_store(config: &Config) -> Result<Option<String>, ServeError> {
    let key = load_key(config)?;
    let options = store_options(config, true)?;
    let Some((found, exists)) = Store::check(&options, &key)? else {
        return Ok(None);
    };
    if !exists {
        return Ok(Some(found));
    }
    // a store that exists: do this node's token keys match the cluster's?
    let store = Store::open(&options, &key)?;
    drop(key);
    let (recorded, running) = crate::domain::cluster::recorded_token_keys(&store)
        .map_err(|e| ServeError::Recovery(e.to_string()))?;
    let tokens: std::collections::BTreeMap<_, _> = config
        .providers
        .iter()
        // only the token providers: building the others could reach peers
        .filter(|(_, p)| {
            p.get::<leasehold_provider_token::TokenProviderConfig>()
                .is_some()
        })
        .map(|(n, p)| (n.clone(), p.clone()))
        .collect();
    let providers = Providers::build(
        &tokens,
        &store,
        config.broker_limits(),
        Arc::new(crate::clock::SystemClock),
    )?;
    let here = crate::domain::cluster::token_key_fingerprint(&providers);
    match recorded {
        Some(r) if r != here && running => Err(ServeError::Recovery(format!(
            "this configuration's token signing keys (fingerprint {}) differ from the running cluster's ({}): give every node the same token keys",
            &here[..16],
            r.get(..16).unwrap_or("?")
        ))),
        Some(r) if r != here => Ok(Some(format!(
            "{found}; the token keys differ from those last recorded (no broker is running: the first to start records these)"
        ))),
        _ => Ok(Some(format!("{found}; the token keys match"))),
    }
}

/// What `leasehold store copy` did.
#[derive(Debug, serde::Serialize)]
pub struct CopyOutcome {
    pub from: String,
    pub to: String,
    pub rows: u64,
    pub tables: std::collections::BTreeMap<&'static str, u64>,
    pub verify: crate::audit::VerifyReport,
}

/// Copy a stopped broker's store (`from`'s) into the empty store `to`
/// names, then verify the chain on the target. Both must use the same store
/// key; no broker may be running on either (redb's lock refuses a running
/// one; on PostgreSQL, a node seen recently does).
pub fn copy_store(from: &Config, to: &Config) -> Result<CopyOutcome, ServeError> {
    let (key, to_key) = (load_key(from)?, load_key(to)?);
    if key.fingerprint() != to_key.fingerprint() {
        return Err(ServeError::Store(crate::store::StoreError::WrongKey {
            given: to_key.fingerprint(),
            expected: key.fingerprint(),
        }));
    }
    drop(to_key);
    let source = Store::open(&store_options(from, true)?, &key)?;
    refuse_running(&source)?;
    let target = Store::open(&store_options(to, true)?, &key)?;
    drop(key);
    refuse_running(&target)?;
    let report = crate::store::copy(&source, &target)?;
    let trusted = std::fs::read(&to.audit.checkpoint_key_file)
        .ok()
        .and_then(|d| crate::audit::CheckpointKey::from_pkcs8(&d).ok())
        .map(|k| k.public_key().to_vec());
    let verify = crate::audit::query::verify_store(&*target.read()?, trusted)?;
    Ok(CopyOutcome {
        from: source.path().display().to_string(),
        to: target.path().display().to_string(),
        rows: report.total(),
        tables: report.rows,
        verify,
    })
}

/// A PostgreSQL store with a broker seen within the last 30 s is in use.
fn refuse_running(store: &Store) -> Result<(), ServeError> {
    if let Some(view) = store.cluster()?
        && let Some(n) = view.nodes.iter().find(|n| n.seen_ms_ago < 30_000)
    {
        return Err(ServeError::Recovery(format!(
            "a broker is running on {} (node `{}` seen {} ms ago): stop every broker first",
            store.path().display(),
            n.node,
            n.seen_ms_ago
        )));
    }
    Ok(())
}

/// The configured providers (and any the tests add), the policy set, and
/// the broker that shares them.
fn build_broker(
    config: &Config,
    store: Store,
    clock: Arc<dyn Clock>,
    overrides: Overrides,
) -> Result<Broker, ServeError> {
    let mut providers = Providers::build(
        &config.providers,
        &store,
        config.broker_limits(),
        clock.clone(),
    )?;
    let mut roles = crate::preflight::role_entities(config);
    for (name, p) in overrides.providers {
        for r in &p.describe().roles {
            roles.push(crate::policy::RoleEntity {
                provider: name.clone(),
                role: r.name.clone(),
                max_ttl: r.max_ttl.as_secs(),
            });
        }
        providers.insert(&name, p);
    }
    let policy = Arc::new(
        crate::policy::PolicyEngine::load(&config.policy.dir, roles)
            .map_err(|e| ServeError::Policy(e.to_string()))?,
    );
    let settings = crate::domain::PolicySettings::from(&config.policy);
    let mut broker = Broker::new(
        store,
        clock.clone(),
        providers,
        config.limits.clone(),
        config.reaper.clone(),
        policy,
        settings,
    );
    if let Some(url) = &config.policy.webhook_url {
        let secret = match &config.policy.webhook_secret_file {
            Some(p) => Some(
                *StoreKey::from_file(p)
                    .map_err(|e| ServeError::Policy(format!("webhook_secret_file: {e}")))?
                    .expose(),
            ),
            None => None,
        };
        broker = broker.with_notifier(
            crate::notify::Notifier::spawn(url.clone(), secret).map_err(ServeError::Policy)?,
        );
    }
    #[cfg(feature = "fault-injection")]
    {
        broker = broker.with_faults(crate::domain::Faults {
            pause_after_issue_file: config.fault.pause_after_issue_file.clone(),
            job_chunk: config.fault.job_chunk,
            job_chunk_pause: Duration::from_millis(config.fault.job_chunk_pause_millis),
        });
    }
    let cp = std::fs::read(&config.audit.checkpoint_key_file).map_err(|e| {
        ServeError::Audit(format!(
            "{}: {e}",
            config.audit.checkpoint_key_file.display()
        ))
    })?;
    let broker = broker
        .with_auditor(auditor(config)?)
        .with_checkpoint_key(
            crate::audit::CheckpointKey::from_pkcs8(&cp).map_err(ServeError::Audit)?,
        )
        .with_denied_per_second(u64::from(config.audit.auth_denied_events_per_second))
        .with_archiving(
            Duration::from_secs(config.audit.prune_min_age_seconds),
            config.audit.archive_dir.clone(),
        )
        .with_retention(config.retention.clone());
    Ok(broker)
}

/// Recover intents a crash left, load the fences, and record the start.
/// Returns how many intents were recovered.
async fn recover_and_announce(broker: &Arc<Broker>) -> Result<usize, ServeError> {
    let recovered = broker
        .recover()
        .await
        .map_err(|e| ServeError::Recovery(e.to_string()))?;
    // fences hold from the first request on
    let fenced = broker
        .load_fences()
        .map_err(|e| ServeError::Recovery(e.to_string()))?;
    if fenced > 0 {
        tracing::warn!(
            fences = fenced,
            "fences in force: fenced workloads, tenants and users get nothing new"
        );
    }
    let started = crate::event_data![
        ("version", env!("CARGO_PKG_VERSION")),
        ("recovered", recovered as u64),
        ("fences", fenced as u64)
    ];
    broker
        .record(crate::audit::EventKind::BrokerStarted, None, started)
        .await
        .map_err(|e| ServeError::Audit(format!("cannot record the start: {e}")))?;
    Ok(recovered)
}

/// The reaper and workers, resumed jobs, checkpoints, SIGHUP reloads and
/// JWKS refreshes, all stopping when `stop` turns true.
async fn start_background(
    config: &Config,
    broker: &Arc<Broker>,
    auth: &Arc<Authenticator>,
    clock: &Arc<dyn Clock>,
    stop_rx: &tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, ServeError> {
    let mut background = crate::domain::reaper::spawn(broker.clone(), stop_rx.clone());
    broker
        .resume_jobs()
        .map_err(|e| ServeError::Recovery(e.to_string()))?;
    // several brokers on one store: take what others announce, and let the
    // leader run the jobs other nodes started
    background.extend(crate::domain::cluster::spawn_change_watch(
        broker.clone(),
        stop_rx.clone(),
    ));
    background.extend(crate::domain::cluster::spawn_job_watch(
        broker.clone(),
        stop_rx.clone(),
    ));
    background.push(tokio::spawn(checkpoint_loop(
        broker.clone(),
        config.audit.checkpoint_interval_seconds,
        stop_rx.clone(),
    )));
    background.push(tokio::spawn(reload_on_sighup(
        broker.clone(),
        stop_rx.clone(),
    )));
    for issuer in auth.issuers() {
        if let Some(every) = issuer.refresh_interval() {
            if let Err(e) = issuer.refresh(clock.now()).await {
                tracing::warn!(issuer = %issuer.name(), error = %e, "initial JWKS fetch failed; will retry");
            }
            let (issuer, clock, mut stop) = (issuer.clone(), clock.clone(), stop_rx.clone());
            background.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = stop.changed() => return,
                    }
                    if let Err(e) = issuer.refresh(clock.now()).await {
                        tracing::warn!(issuer = %issuer.name(), error = %e, "JWKS refresh failed; keeping the old keys");
                    }
                }
            }));
        }
    }

    Ok(background)
}

/// Serve `app` on `listener` (TLS when configured) until `shutdown`: then
/// not ready, a drain delay, and at most `grace` for open requests.
async fn serve(
    listener: std::net::TcpListener,
    app: axum::Router,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: Arc<AtomicBool>,
    grace: Duration,
) -> Result<(), ServeError> {
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_ready = ready;
    let drain_delay = Duration::from_secs(config.server.drain_delay_seconds);
    tokio::spawn(async move {
        shutdown.await;
        // readiness first: load balancers stop sending, then we stop accepting
        drain_ready.store(false, Ordering::SeqCst);
        tracing::info!(
            delay_seconds = drain_delay.as_secs(),
            "shutdown requested: not ready; draining"
        );
        tokio::time::sleep(drain_delay).await;
        let _ = drain_tx.send(());
    });

    let tls = match &config.server.tls {
        None => None,
        Some(tls) => {
            let request = tls.request_client_certificates.unwrap_or_else(|| {
                config
                    .auth
                    .workload_issuers
                    .iter()
                    .any(|i| i.kind == crate::config::IssuerKind::X509)
            });
            Some(crate::listen::tls_acceptor(tls, request).map_err(ServeError::Tls)?)
        }
    };
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    crate::listen::serve(
        listener,
        app,
        tls,
        &config.server.connections,
        async move {
            let _ = drain_rx.await;
        },
        grace,
    )
    .await;
    Ok(())
}

/// SIGHUP reloads the policy set (a bad set is refused and logged; the old
/// one stays in force).
async fn reload_on_sighup(broker: Arc<Broker>, mut stop: tokio::sync::watch::Receiver<bool>) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP; reload through POST /v1/policy/reload");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    let _ = broker.reload_policy(None, None).await;
                }
                _ = stop.changed() => return,
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (broker, stop.changed().await);
    }
}

/// Sign the head of the chain every `every` seconds of the broker's clock.
async fn checkpoint_loop(
    broker: Arc<Broker>,
    every: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let every = i64::try_from(every).unwrap_or(60).saturating_mul(1000);
    loop {
        let next = broker.clock().now().unix_millis().saturating_add(every);
        tokio::select! {
            _ = broker.clock().sleep_until(crate::clock::Timestamp::from_unix_millis(next)) => {}
            _ = stop.changed() => return,
        }
        if broker.clock().now().unix_millis() < next {
            continue;
        }
        match broker.checkpoint().await {
            Ok(Some(cp)) => tracing::debug!(seq = cp.seq, "checkpoint signed"),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "signing a checkpoint failed"),
        }
    }
}

/// Wait for in-flight work to let go of the broker, then close the store
/// (the writer drains its queue and redb records a clean shutdown).
async fn close(broker: Arc<Broker>, grace: Duration) {
    let mut broker = broker;
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        match Arc::try_unwrap(broker) {
            Ok(b) => {
                let store: Store = b.into_store();
                tokio::task::spawn_blocking(move || drop(store)).await.ok();
                return;
            }
            Err(b) if tokio::time::Instant::now() < deadline => {
                broker = b;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => {
                tracing::warn!(
                    "work still in flight at shutdown; the store closes when it finishes"
                );
                return;
            }
        }
    }
}
