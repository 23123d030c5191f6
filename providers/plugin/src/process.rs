//! Starting one plugin process: the digest check, the private socket
//! directory, the stdout handshake line, the gRPC connection, `Handshake`
//! and `Describe`. Everything here is bounded by the catalog's timeout;
//! any failure drops the child, which kills it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, ChildStdin, Command};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::catalog::PluginConfig;
use crate::wire::provider_client::ProviderClient;
use crate::{HANDSHAKE_PREFIX, MAX_MESSAGE, PROTOCOL_ENV, PROTOCOL_VERSION, SOCKET_ENV, wire};

/// The `PATH` a plugin gets unless its catalog entry sets one.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// The longest stderr line forwarded to the broker's log.
const MAX_LOG_LINE: usize = 4096;

/// A started, handshaken plugin.
#[derive(Debug)]
pub(crate) struct Running {
    pub child: Child,
    /// Held open: the plugin exits at its end-of-file.
    pub _stdin: Option<ChildStdin>,
    /// The 0700 directory the socket is in; removed on drop.
    pub _dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub client: ProviderClient<Channel>,
    pub handshake: wire::HandshakeResponse,
    pub describe: wire::DescribeResponse,
}

/// The hex SHA-256 of the file at `path`.
pub(crate) fn sha256_file(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    Ok(d.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// The checks made before every start: the program is a regular file that
/// only its owner may change, and its digest is the pinned one.
pub(crate) fn check_program(cfg: &PluginConfig) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let path = &cfg.command;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    let mode = meta.permissions().mode();
    if mode & 0o111 == 0 {
        return Err(format!("{} is not executable", path.display()));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "{} may be changed by other users (mode {:o}): refusing to start it",
            path.display(),
            mode & 0o7777
        ));
    }
    let actual = sha256_file(path)?;
    if !actual.eq_ignore_ascii_case(&cfg.sha256) {
        return Err(format!(
            "{} has SHA-256 {actual}, the catalog pins {}: refusing to start it \
             (if the program was upgraded on purpose, set `sha256` to the new digest)",
            path.display(),
            cfg.sha256.to_ascii_lowercase()
        ));
    }
    Ok(())
}

/// Start the program and bring it to the point where it serves requests.
pub(crate) async fn start(
    label: &str,
    name: &str,
    cfg: &PluginConfig,
    limits: wire::Limits,
    timeout: Duration,
) -> Result<Running, String> {
    check_program(cfg)?;
    let dir = tempfile::Builder::new()
        .prefix("leasehold-plugin-")
        .tempdir()
        .map_err(|e| format!("creating the socket directory: {e}"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("securing the socket directory: {e}"))?;
    }
    let socket = dir.path().join("plugin.sock");
    let mut cmd = Command::new(&cfg.command);
    cmd.args(&cfg.args)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .envs(&cfg.env)
        .env(SOCKET_ENV, &socket)
        .env(PROTOCOL_ENV, PROTOCOL_VERSION.to_string())
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", cfg.command.display()))?;
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward_log(label.to_owned(), err));
    }
    let stdin = child.stdin.take();
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| "the plugin's stdout was not captured".to_owned())?;
    let deadline = tokio::time::Instant::now() + timeout;

    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::select! {
        line = tokio::time::timeout_at(deadline, lines.next_line()) => match line {
            Err(_) => return Err(format!(
                "no handshake line on stdout within {}s (a plugin prints `{HANDSHAKE_PREFIX}|{PROTOCOL_VERSION}|unix|<socket>` once it serves)",
                timeout.as_secs()
            )),
            Ok(Err(e)) => return Err(format!("reading the handshake line: {e}")),
            Ok(Ok(None)) => return Err("the plugin closed stdout without a handshake line".into()),
            Ok(Ok(Some(line))) => line,
        },
        status = child.wait() => {
            return Err(match status {
                Ok(s) => format!("the plugin exited ({s}) before its handshake"),
                Err(e) => format!("waiting for the plugin: {e}"),
            });
        }
    };
    parse_handshake_line(&line, &socket)?;
    // keep draining stdout, so a chatty plugin never blocks on a full pipe
    tokio::spawn(forward_log(label.to_owned(), lines.into_inner()));

    let client = tokio::time::timeout_at(deadline, connect(&socket))
        .await
        .map_err(|_| format!("connecting to {} timed out", socket.display()))??;
    let mut client = client;
    let hs = tokio::time::timeout_at(
        deadline,
        client.handshake(wire::HandshakeRequest {
            protocol_versions: vec![PROTOCOL_VERSION],
            provider_name: name.to_owned(),
            config_json: config_json(cfg)?,
            limits: Some(limits),
        }),
    )
    .await
    .map_err(|_| format!("no answer to Handshake within {}s", timeout.as_secs()))?
    .map_err(|s| format!("Handshake failed: {}", status_text(&s)))?
    .into_inner();
    if let Some(e) = hs.error {
        return Err(format!(
            "the plugin refused its configuration: {}",
            e.message
        ));
    }
    if hs.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "the plugin speaks protocol {}, this broker speaks {PROTOCOL_VERSION}",
            hs.protocol_version
        ));
    }
    let describe = tokio::time::timeout_at(deadline, client.describe(wire::DescribeRequest {}))
        .await
        .map_err(|_| format!("no answer to Describe within {}s", timeout.as_secs()))?
        .map_err(|s| format!("Describe failed: {}", status_text(&s)))?
        .into_inner();
    check_roles(cfg, &describe)?;
    Ok(Running {
        child,
        _stdin: stdin,
        _dir: dir,
        socket,
        client,
        handshake: hs,
        describe,
    })
}

fn parse_handshake_line(line: &str, socket: &Path) -> Result<(), String> {
    let shown: String = line
        .chars()
        .take(80)
        .flat_map(char::escape_default)
        .collect();
    let fields: Vec<&str> = line.trim_end().split('|').collect();
    match fields.as_slice() {
        [HANDSHAKE_PREFIX, version, "unix", path] => {
            if *version != PROTOCOL_VERSION.to_string() {
                return Err(format!(
                    "the plugin speaks protocol {}, this broker speaks {PROTOCOL_VERSION}",
                    version.escape_default()
                ));
            }
            if Path::new(path) != socket {
                return Err(format!(
                    "the plugin listens on {}, not on the socket it was given",
                    path.escape_default()
                ));
            }
            Ok(())
        }
        _ => Err(format!(
            "the plugin's first line is not a handshake (`{HANDSHAKE_PREFIX}|{PROTOCOL_VERSION}|unix|<socket>`): `{shown}`"
        )),
    }
}

/// A gRPC channel over the Unix socket at `path`.
pub(crate) async fn connect(path: &Path) -> Result<ProviderClient<Channel>, String> {
    let path = path.to_owned();
    // the URI is required by the API and unused: the connector dials the socket
    let channel = Endpoint::from_static("http://plugin.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| {
            format!(
                "connecting to the plugin: {}",
                leasehold_provider::error_chain(&e)
            )
        })?;
    Ok(ProviderClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// The catalog's `config` table as the JSON the plugin parses.
fn config_json(cfg: &PluginConfig) -> Result<String, String> {
    serde_json::to_string(&cfg.config).map_err(|e| format!("`config` as JSON: {e}"))
}

/// The plugin must offer exactly the catalog's roles, each within the
/// catalog's ceiling (which is what policy was checked against).
fn check_roles(cfg: &PluginConfig, d: &wire::DescribeResponse) -> Result<(), String> {
    let configured = cfg.role_ttls();
    let described: Vec<&str> = d.roles.iter().map(|r| r.name.as_str()).collect();
    for (name, max) in &configured {
        match d.roles.iter().find(|r| r.name == *name) {
            None => {
                return Err(format!(
                    "the plugin does not offer role `{name}` (it offers: {})",
                    described.join(", ")
                ));
            }
            Some(r) if r.max_ttl_seconds > *max => {
                return Err(format!(
                    "the plugin allows role `{name}` {}s, the catalog {max}s",
                    r.max_ttl_seconds
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = described
        .iter()
        .find(|n| !configured.iter().any(|(c, _)| c == *n))
    {
        return Err(format!(
            "the plugin offers role `{}`, which the catalog's `config.roles` does not list",
            extra.escape_default()
        ));
    }
    Ok(())
}

pub(crate) fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// The plugin's stderr (and stdout after the handshake) into the broker's
/// log, a line at a time, at info.
async fn forward_log(label: String, out: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(mut line)) = lines.next_line().await {
        if line.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        tracing::info!(target: "leasehold::plugin", plugin = %label, "{line}");
    }
}
