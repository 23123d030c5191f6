//! The `leasehold` binary: parse arguments, load config, call `run`.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use leasehold::cli::{
    Cli, Command, ConfigCommand, KeygenCommand, LogFormat, ProvidersCommand, StoreCommand,
};
use leasehold::clock::{Clock as _, SystemClock};

/// glibc malloc took about a sixth of the broker's CPU under load (arena
/// contention between the store writer and the request threads, and
/// consolidation of freed pages); mimalloc's per-thread heaps avoid both.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Logs go to stderr through a writer thread: request threads format a line
/// and hand it over instead of making a write system call each. The writer
/// never drops lines (it applies back-pressure when its queue is full); the
/// guard flushes what is queued when `main` returns.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use std::io::IsTerminal as _;
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(64 * 1024)
        .thread_name("leasehold-log")
        .finish(std::io::stderr());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // tokio-postgres logs every statement it sends at debug level, and the
    // PostgreSQL provider's CREATE ROLE carries a password verifier: never
    // below info, whatever RUST_LOG asks (this replaces any directive for it)
    // vaultrs and rustify trace requests and log upstream errors on their
    // own; the Vault provider logs what matters, without response bodies.
    // The AWS SDK's signer traces canonical requests (with the session
    // token header) at trace level: never below info.
    let filter = [
        "tokio_postgres=info",
        "vaultrs=off",
        "rustify=off",
        "aws_sigv4=info",
        "aws_smithy_runtime=info",
        "aws_smithy_http_client=info",
        "aws_config=info",
        "aws_runtime=info",
    ]
    .into_iter()
    .filter_map(|d| d.parse().ok())
    .fold(filter, |f, d| f.add_directive(d));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        // every value quoted and escaped when it needs to be: input cannot forge fields or lines
        LogFormat::Text => builder.fmt_fields(leasehold::logfmt::SafeFields).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
    guard
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn serve(config: leasehold::config::Config) -> anyhow::Result<()> {
    let rt = runtime()?;
    rt.block_on(async move {
        let listener = std::net::TcpListener::bind(config.server.listen)
            .with_context(|| format!("binding {}", config.server.listen))?;
        leasehold::server::run(listener, config, Arc::new(SystemClock), shutdown_signal()).await?;
        Ok(())
    })
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    leasehold::install_crypto_provider();
    match cli.command {
        Command::Serve { config, log_format } => {
            let _logs = init_logging(log_format);
            let cfg = leasehold::config::Config::load(&config)?;
            serve(cfg)?;
        }
        Command::Dev {
            listen,
            data,
            log_format,
        } => dev(listen, &data, log_format)?,
        Command::Proxy {
            config,
            check,
            log_format,
        } => {
            let cfg = leasehold_proxy::ProxyConfig::load(&config)?;
            if check {
                for note in leasehold_proxy::check(&cfg).map_err(anyhow::Error::msg)? {
                    println!("{note}");
                }
                println!(
                    "{}: ok ({} routes, listening on {})",
                    config.display(),
                    cfg.routes.len(),
                    cfg.listen
                );
                return Ok(ExitCode::SUCCESS);
            }
            let _logs = init_logging(log_format);
            // one worker thread by default: a proxied request is a chain of
            // hand-offs (assistant, broker, upstream), and with one thread
            // none of them wakes another core (measured: the proxy's own
            // share of the added latency fell from ~0.2 ms to ~0.06 ms)
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(cfg.worker_threads)
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(async move {
                    let running = leasehold_proxy::start(cfg)
                        .await
                        .map_err(anyhow::Error::msg)?;
                    shutdown_signal().await;
                    running.stop().await;
                    anyhow::Ok(())
                })?;
        }
        Command::Openapi { output } => {
            let doc = leasehold::api::openapi::document_json()?;
            match output {
                Some(path) => std::fs::write(&path, doc + "\n")
                    .with_context(|| format!("writing {}", path.display()))?,
                None => println!("{doc}"),
            }
        }
        Command::Config {
            command: ConfigCommand::Validate { file, offline },
        } => validate_config(&file, offline)?,
        Command::Keygen { command } => keygen(command)?,
        Command::Store {
            command: StoreCommand::Copy { from, to },
        } => return copy_store(&from, &to),
        Command::Task { conn, command } => {
            return client(&conn, leasehold::cli::client::task(&conn, command));
        }
        Command::Lease { conn, command } => {
            return client(&conn, leasehold::cli::client::lease(&conn, command));
        }
        Command::Approvals { conn, command } => {
            return client(&conn, leasehold::cli::client::approvals(&conn, command));
        }
        Command::Reviews { conn, command } => {
            return client(&conn, leasehold::cli::client::reviews(&conn, command));
        }
        Command::Policy { conn, command } => {
            return client(&conn, leasehold::cli::client::policy(&conn, command));
        }
        Command::Events { conn, command } => {
            return client(&conn, leasehold::cli::events::run(&conn, command));
        }
        Command::Revoke {
            conn,
            command,
            selector,
        } => {
            return client(
                &conn,
                leasehold::cli::incident::revoke(&conn, command, selector),
            );
        }
        Command::Providers {
            command:
                ProvidersCommand::Conformance {
                    config,
                    name,
                    role,
                    expiry_only,
                },
            ..
        } => return conformance(&config, &name, &role, expiry_only),
        Command::Providers { conn, command } => {
            return client(&conn, leasehold::cli::incident::providers(&conn, command));
        }
        Command::Fence { conn, command } => {
            return client(&conn, leasehold::cli::incident::fence(&conn, command));
        }
        Command::Status { conn } => {
            return client(&conn, leasehold::cli::client::status(&conn));
        }
        Command::BlastRadius {
            conn,
            workload,
            since,
            until,
        } => {
            return client(
                &conn,
                leasehold::cli::incident::blast_radius(&conn, workload, since, until),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A client verb: run it against the broker and print its answer, as a
/// table or JSON (`-o`).
fn client(
    conn: &leasehold::cli::Connection,
    verb: impl std::future::Future<
        Output = Result<serde_json::Value, leasehold::cli::client::ClientError>,
    >,
) -> anyhow::Result<ExitCode> {
    let output = leasehold::cli::table::Output::resolve(conn.output);
    Ok(print_result(output, runtime()?.block_on(verb)))
}

/// `leasehold dev`: bootstrap the data folder and serve on loopback.
fn dev(
    listen: std::net::SocketAddr,
    data: &std::path::Path,
    log_format: LogFormat,
) -> anyhow::Result<()> {
    let _logs = init_logging(log_format);
    let listener =
        std::net::TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let (config, creds) = leasehold::dev::prepare(data, addr, SystemClock.now())?;
    eprintln!(
        "leasehold dev: http://{addr}  (data in {}; credentials in {})\n  \
             try: leasehold task open --as assistant-a --purpose demo --on-behalf-of you@example.com --prompt hello --ttl 600",
        data.display(),
        data.join("dev-credentials.json").display()
    );
    drop(creds);
    let rt = runtime()?;
    rt.block_on(leasehold::server::run(
        listener,
        config,
        Arc::new(SystemClock),
        shutdown_signal(),
    ))?;
    Ok(())
}

/// `leasehold config validate`: parse, check every file, and (unless
/// `offline`) dry-run each provider against its peer.
fn validate_config(file: &std::path::Path, offline: bool) -> anyhow::Result<()> {
    let cfg = leasehold::config::Config::load(file)?;
    leasehold::preflight::check_files(&cfg)?;
    for (name, p) in &cfg.providers {
        for w in p.settings().warnings() {
            eprintln!("warning: providers.{name}.{w}");
        }
    }
    if !offline {
        if let Some(found) = leasehold::server::check_store(&cfg)? {
            println!("{found}");
        }
        let rt = runtime()?;
        rt.block_on(leasehold::providers::dry_run(&cfg))?;
    }
    println!(
        "{}: valid ({} provider(s), {} workload issuer(s), {} operator(s))",
        file.display(),
        cfg.providers.len(),
        cfg.auth.workload_issuers.len(),
        cfg.auth.operators.len()
    );
    Ok(())
}

/// `leasehold providers conformance`: each role's promises, passed or
/// failed; exit 1 when any failed.
fn conformance(
    file: &std::path::Path,
    name: &str,
    roles: &[String],
    expiry_only: bool,
) -> anyhow::Result<ExitCode> {
    let _logs = init_logging(LogFormat::Text);
    let cfg = leasehold::config::Config::load(file)?;
    let outcomes = runtime()?
        .block_on(leasehold::cli::conformance::run(
            &cfg,
            name,
            roles,
            expiry_only,
            Arc::new(SystemClock),
        ))
        .map_err(anyhow::Error::msg)?;
    let mut failed = 0;
    for o in &outcomes {
        println!("provider `{name}`, role `{}`:", o.role);
        for line in &o.lines {
            println!("{line}");
        }
        failed += usize::from(!o.passed);
    }
    println!(
        "conformance: {} role(s), {} passed, {failed} failed",
        outcomes.len(),
        outcomes.len() - failed
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `leasehold store copy`: the outcome as JSON; exit 1 when the target's
/// chain does not verify.
fn copy_store(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<ExitCode> {
    let (f, t) = (
        leasehold::config::Config::load(from)?,
        leasehold::config::Config::load(to)?,
    );
    let out = leasehold::server::copy_store(&f, &t)?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    if out.verify.ok {
        eprintln!(
            "copied {} rows from {} to {}; the chain verifies on the target",
            out.rows, out.from, out.to
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("copied, but the chain does NOT verify on the target");
        Ok(ExitCode::from(1))
    }
}

/// `leasehold keygen`: write a new key of the kind asked for.
fn keygen(command: KeygenCommand) -> anyhow::Result<()> {
    match command {
        KeygenCommand::Store { file } => {
            leasehold::store::StoreKey::generate()?.write_new_file(&file)?;
            println!(
                "wrote a new store key to {} (keep it; the store cannot be opened without it)",
                file.display()
            );
        }
        KeygenCommand::Token { file } => {
            write_new_private(&file, &leasehold_provider_token::generate_signing_key()?)?;
            println!(
                "wrote a new Ed25519 token signing key to {}",
                file.display()
            );
        }
        KeygenCommand::Checkpoint { file } => {
            let doc = leasehold_provider_token::generate_signing_key()?;
            write_new_private(&file, &doc)?;
            let key =
                leasehold::audit::CheckpointKey::from_pkcs8(&doc).map_err(anyhow::Error::msg)?;
            println!("wrote a new Ed25519 checkpoint key to {}", file.display());
            println!(
                "public key (for `leasehold events verify --checkpoint-key`): {}",
                key.public_key_text()
            );
        }
        KeygenCommand::Operator => {
            let token = leasehold::auth::generate_operator_token().map_err(anyhow::Error::msg)?;
            println!("token:        {token}");
            println!(
                "token_sha256: {}",
                leasehold::auth::operator_token_hash(&token)
            );
        }
    }
    Ok(())
}

/// A new file, readable by its owner only; never overwrites.
fn write_new_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    opts.open(path)
        .and_then(|mut f| f.write_all(bytes))
        .with_context(|| format!("writing {}", path.display()))
}

fn print_result(
    output: leasehold::cli::table::Output,
    r: Result<serde_json::Value, leasehold::cli::client::ClientError>,
) -> ExitCode {
    use leasehold::cli::client::ClientError;
    use leasehold::cli::table::{Output, hint, render};
    let print = |v: &serde_json::Value| match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
        ),
        Output::Table => print!("{}", render(v)),
    };
    match r {
        Ok(serde_json::Value::Null) => ExitCode::SUCCESS,
        Ok(v) => {
            print(&v);
            ExitCode::SUCCESS
        }
        Err(ClientError::Failed(v)) => {
            print(&v);
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            if let ClientError::Api { code, .. } = &e
                && let Some(h) = hint(code)
            {
                eprintln!("hint: {h}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
