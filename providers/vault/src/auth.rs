//! The broker's own upstream token: read from a file (again whenever the
//! file changes) or obtained by logging in (AppRole, JWT, Kubernetes), renewed
//! in the background, and logged in again before it expires or when the
//! upstream refuses it. Readiness reports why there is no usable token.

use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use leasehold_provider::ProviderError;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use crate::config::AuthConfig;
use crate::upstream::{self, Failure, Upstream, header_safe};

/// A token is refreshed once half its TTL has passed, and never later than
/// this before it expires.
const MIN_MARGIN: Duration = Duration::from_secs(2);
/// How often a token file is checked for a new token even when nothing else
/// is due.
const FILE_CHECK: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct Session {
    token: SecretString,
    /// When it stops working; `None`: it does not expire (a root or
    /// periodic token read from a file).
    expires_at: Option<Instant>,
    /// When the background task should renew or log in again.
    refresh_at: Option<Instant>,
    renewable: bool,
}

#[derive(Debug, Default)]
struct State {
    session: Option<Session>,
    /// The token file's (modified time, length) when it was last read.
    stamp: Option<(Option<SystemTime>, u64)>,
    /// Why the last attempt to get or keep a token failed.
    last_error: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Auth {
    cfg: AuthConfig,
    state: Mutex<State>,
    /// One login at a time.
    login: tokio::sync::Mutex<()>,
}

fn read_secret_file(path: &Path, what: &str) -> Result<SecretString, String> {
    let raw = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))?,
    );
    let v = raw.trim();
    if !header_safe(v) {
        return Err(format!(
            "{what} {}: empty, or not a single line of printable ASCII",
            path.display()
        ));
    }
    Ok(SecretString::from(v.to_owned()))
}

fn stamp(path: &Path) -> Option<(Option<SystemTime>, u64)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().ok(), m.len()))
}

/// When to refresh a token with `ttl` left: at half its life, and at least
/// `MIN_MARGIN` before it ends.
fn refresh_point(now: Instant, ttl: Duration) -> Instant {
    let half = ttl / 2;
    let latest = ttl.saturating_sub(MIN_MARGIN);
    now + half.min(latest)
}

impl Auth {
    pub fn new(cfg: AuthConfig) -> Self {
        Self {
            cfg,
            state: Mutex::new(State::default()),
            login: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fail(&self, msg: String) -> ProviderError {
        self.state().last_error = Some(msg.clone());
        ProviderError::retryable(format!("upstream authentication: {msg}"))
    }

    /// The current token, logging in (or reading the file) first if there
    /// is none, it changed, or it is about to expire.
    pub async fn token(&self, up: &Upstream) -> Result<SecretString, ProviderError> {
        if let Some(t) = self.usable() {
            return Ok(t);
        }
        let _one = self.login.lock().await;
        if let Some(t) = self.usable() {
            return Ok(t);
        }
        self.obtain(up).await
    }

    /// The session's token if it can be used as it is.
    fn usable(&self) -> Option<SecretString> {
        let st = self.state();
        let s = st.session.as_ref()?;
        if let AuthConfig::Token { token_file } = &self.cfg
            && stamp(token_file) != st.stamp
        {
            return None; // the file changed: read it again
        }
        match s.expires_at {
            Some(at) if at <= Instant::now() + MIN_MARGIN => None,
            _ => Some(s.token.clone()),
        }
    }

    /// Forget the token the upstream just refused (it was revoked, or the
    /// file holds a new one): the next call reads or logs in again.
    pub fn refused(&self) {
        let mut st = self.state();
        st.session = None;
        st.stamp = None;
    }

    /// Read the token file or log in, and learn the token's lifetime.
    async fn obtain(&self, up: &Upstream) -> Result<SecretString, ProviderError> {
        let now = Instant::now();
        let session = match &self.cfg {
            AuthConfig::Token { token_file } => {
                let before = stamp(token_file);
                let token = read_secret_file(token_file, "token file").map_err(|m| self.fail(m))?;
                // learn its lifetime; a token that does not work is an error now
                let r = up
                    .send(Some(&token), upstream::get("auth/token/lookup-self"))
                    .await
                    .map_err(|f| self.fail(format!("the token from the file was refused: {f}")))?;
                let ttl = r
                    .data
                    .as_ref()
                    .and_then(|d| d.get("ttl"))
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0);
                let renewable = r
                    .data
                    .as_ref()
                    .and_then(|d| d.get("renewable"))
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false);
                self.state().stamp = before;
                Session {
                    token,
                    expires_at: (ttl > 0).then(|| now + Duration::from_secs(ttl)),
                    refresh_at: (ttl > 0 && renewable)
                        .then(|| refresh_point(now, Duration::from_secs(ttl))),
                    renewable,
                }
            }
            AuthConfig::Approle {
                mount,
                role_id,
                secret_id_file,
            } => {
                let secret =
                    read_secret_file(secret_id_file, "secret_id file").map_err(|m| self.fail(m))?;
                let body = json!({ "role_id": role_id, "secret_id": secret.expose_secret() });
                self.login_with(up, mount, body, now).await?
            }
            AuthConfig::Jwt {
                mount,
                role,
                jwt_file,
            }
            | AuthConfig::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = read_secret_file(jwt_file, "JWT file").map_err(|m| self.fail(m))?;
                let body = json!({ "role": role, "jwt": jwt.expose_secret() });
                self.login_with(up, mount, body, now).await?
            }
        };
        let token = session.token.clone();
        let mut st = self.state();
        st.session = Some(session);
        st.last_error = None;
        Ok(token)
    }

    async fn login_with(
        &self,
        up: &Upstream,
        mount: &str,
        body: serde_json::Value,
        now: Instant,
    ) -> Result<Session, ProviderError> {
        let r = up
            .send(None, upstream::post(format!("auth/{mount}/login"), body))
            .await
            .map_err(|f| self.fail(format!("{} login refused: {f}", self.cfg.method())))?;
        let auth = r.auth.ok_or_else(|| {
            self.fail(format!(
                "{} login answered without a token",
                self.cfg.method()
            ))
        })?;
        let ttl = Duration::from_secs(auth.lease_duration);
        tracing::info!(
            method = self.cfg.method(),
            accessor = %auth.accessor,
            ttl_seconds = auth.lease_duration,
            "logged in to the upstream"
        );
        Ok(Session {
            token: auth.client_token,
            expires_at: (auth.lease_duration > 0).then(|| now + ttl),
            refresh_at: (auth.lease_duration > 0).then(|| refresh_point(now, ttl)),
            renewable: auth.renewable,
        })
    }

    /// Why there is no usable token, if there is none.
    pub fn problem(&self) -> Option<String> {
        let st = self.state();
        let alive = st
            .session
            .as_ref()
            .is_some_and(|s| s.expires_at.is_none_or(|at| at > Instant::now()));
        if alive {
            None
        } else {
            Some(
                st.last_error
                    .clone()
                    .unwrap_or_else(|| "no upstream token yet".into()),
            )
        }
    }

    /// One round of background upkeep; returns how long to sleep.
    pub async fn upkeep(&self, up: &Upstream) -> Duration {
        let due = {
            let st = self.state();
            st.session.as_ref().map(|s| (s.refresh_at, s.renewable))
        };
        let now = Instant::now();
        match due {
            // nothing yet, or the file changed, or it expired: obtain anew
            None => {
                let _ = self.token(up).await;
            }
            Some((Some(at), renewable)) if at <= now => {
                let _one = self.login.lock().await;
                if !(renewable && self.renew(up).await) {
                    match self.obtain(up).await {
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "upstream token refresh failed; retrying")
                        }
                    }
                }
            }
            Some(_) => {
                if self.usable().is_none() {
                    let _ = self.token(up).await;
                }
            }
        }
        let st = self.state();
        let next = st
            .session
            .as_ref()
            .and_then(|s| s.refresh_at)
            .map(|at| at.saturating_duration_since(Instant::now()));
        match (st.session.is_some(), next) {
            (false, _) => Duration::from_secs(1), // failing: try again soon
            (true, Some(d)) => d.clamp(Duration::from_millis(200), FILE_CHECK),
            (true, None) => FILE_CHECK,
        }
    }

    /// Renew the session's token in place; false if the upstream would not,
    /// or would only for less than the margin (its max TTL is near: log in
    /// again instead).
    async fn renew(&self, up: &Upstream) -> bool {
        let Some(token) = self.state().session.as_ref().map(|s| s.token.clone()) else {
            return false;
        };
        let now = Instant::now();
        match up
            .send(
                Some(&token),
                upstream::post("auth/token/renew-self", json!({})),
            )
            .await
        {
            Ok(r) => {
                let Some(a) = r.auth else { return false };
                let ttl = Duration::from_secs(a.lease_duration);
                if ttl <= MIN_MARGIN * 2 {
                    return false;
                }
                let mut st = self.state();
                if let Some(s) = st.session.as_mut() {
                    s.expires_at = Some(now + ttl);
                    s.refresh_at = Some(refresh_point(now, ttl));
                    s.renewable = a.renewable;
                }
                tracing::debug!(ttl_seconds = a.lease_duration, "upstream token renewed");
                true
            }
            Err(Failure::Status { code: 403, .. }) => false,
            Err(f) => {
                tracing::warn!(error = %f, "renewing the upstream token failed");
                false
            }
        }
    }
}
