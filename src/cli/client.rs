//! The client verbs: thin HTTP calls that print the broker's JSON.

use serde_json::{Value, json};

use super::{
    ApprovalsCommand, Connection, LeaseCommand, PolicyCommand, ReviewsCommand, TaskCommand,
};
use crate::dev::DevCredentials;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the broker: {0}")]
    Transport(String),
    #[error("{code} (HTTP {status}): {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// A check that ran and failed (the report is printed).
    #[error("{0}")]
    Failed(serde_json::Value),
}

impl ClientError {
    /// Exit code: 1 for a refusal by the broker (4xx), 2 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Api { status, .. } if (400..500).contains(status) => 1,
            Self::Failed(_) => 1,
            _ => 2,
        }
    }
}

#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub fn new(conn: &Connection) -> Result<Self, ClientError> {
        let creds = || -> Result<DevCredentials, ClientError> {
            let text = std::fs::read_to_string(&conn.credentials).map_err(|e| {
                ClientError::Usage(format!(
                    "{}: {e} (start `leasehold dev`, or pass --broker and --token)",
                    conn.credentials.display()
                ))
            })?;
            serde_json::from_str(&text)
                .map_err(|e| ClientError::Usage(format!("{}: {e}", conn.credentials.display())))
        };
        let (base, token) = match (&conn.broker, &conn.token, &conn.identity) {
            (b, Some(t), None) => {
                let base = match b {
                    Some(b) => b.clone(),
                    None => creds()?.broker,
                };
                (base, t.clone())
            }
            (b, None, Some(name)) => {
                let c = creds()?;
                let id = c.identities.get(name).ok_or_else(|| {
                    ClientError::Usage(format!(
                        "no identity `{name}` in {}; known: {}",
                        conn.credentials.display(),
                        c.identities.keys().cloned().collect::<Vec<_>>().join(", ")
                    ))
                })?;
                (b.clone().unwrap_or(c.broker.clone()), id.token.clone())
            }
            (_, Some(_), Some(_)) => {
                return Err(ClientError::Usage("use --token or --as, not both".into()));
            }
            (_, None, None) => {
                return Err(ClientError::Usage(
                    "who are you? pass --as NAME (dev credentials) or --token TOKEN".into(),
                ));
            }
        };
        let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(60));
        if let Some(ca) = &conn.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| ClientError::Usage(format!("{}: {e}", ca.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| ClientError::Usage(format!("{}: {e}", ca.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token,
        })
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let (status, value) = self.call_raw(method, path, body).await?;
        if (200..300).contains(&status) {
            return Ok(value);
        }
        Err(api_error(status, &value))
    }

    /// The status and body, whatever the status.
    pub async fn call_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ClientError::Transport(format!("{url}: {e}")))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }
}

/// The error a non-2xx answer stands for.
pub fn api_error(status: u16, value: &Value) -> ClientError {
    let code = value["error"]["code"]
        .as_str()
        .unwrap_or("unknown")
        .to_owned();
    let mut message = value["error"]["message"].as_str().unwrap_or("").to_owned();
    for extra in ["problems", "decision"] {
        if let Some(v) = value.get(extra) {
            message.push_str(&format!(
                "\n{extra}: {}",
                serde_json::to_string_pretty(v).unwrap_or_default()
            ));
        }
    }
    ClientError::Api {
        status,
        code,
        message,
    }
}

pub(crate) fn seg(s: &str) -> String {
    // ids are [a-z0-9_]; anything else is the broker's to reject, not ours
    // to splice into a path
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

pub async fn task(conn: &Connection, cmd: TaskCommand) -> Result<Value, ClientError> {
    let c = Client::new(conn)?;
    use reqwest::Method;
    match cmd {
        TaskCommand::Open {
            purpose,
            on_behalf_of,
            prompt,
            prompt_sha256,
            tools,
            ttl_seconds,
        } => {
            let mut body = json!({"purpose": purpose, "on_behalf_of": on_behalf_of, "tools": tools, "ttl_seconds": ttl_seconds});
            if let Some(p) = prompt {
                body["prompt"] = p.into();
            }
            if let Some(h) = prompt_sha256 {
                body["prompt_sha256"] = h.into();
            }
            c.call(Method::POST, "/v1/tasks", Some(body)).await
        }
        TaskCommand::Show { task_id } => {
            c.call(Method::GET, &format!("/v1/tasks/{}", seg(&task_id)), None)
                .await
        }
        TaskCommand::Complete { task_id } => {
            c.call(
                Method::POST,
                &format!("/v1/tasks/{}/complete", seg(&task_id)),
                None,
            )
            .await
        }
        TaskCommand::ProxyCredential {
            task_id,
            ttl_seconds,
        } => {
            let body = match ttl_seconds {
                Some(t) => serde_json::json!({"ttl_seconds": t}),
                None => serde_json::json!({}),
            };
            c.call(
                Method::POST,
                &format!("/v1/tasks/{}/proxy-credentials", seg(&task_id)),
                Some(body),
            )
            .await
        }
        TaskCommand::Call {
            task_id,
            tool,
            action,
            resource,
            arguments_sha256,
            provider,
            role,
            ttl_seconds,
            scope,
            approval,
            break_glass,
        } => {
            let mut body = json!({"tool": tool, "action": action, "resource": resource, "arguments_sha256": arguments_sha256});
            if let (Some(p), Some(r), Some(t)) = (provider, role, ttl_seconds) {
                body["credential"] =
                    json!({"provider": p, "role": r, "ttl_seconds": t, "scope": scope});
            }
            if let Some(a) = approval {
                body["approval_id"] = a.into();
            }
            if let Some(j) = break_glass {
                body["break_glass"] = json!({ "justification": j });
            }
            c.call(
                Method::POST,
                &format!("/v1/tasks/{}/calls", seg(&task_id)),
                Some(body),
            )
            .await
        }
    }
}

pub async fn approvals(conn: &Connection, cmd: ApprovalsCommand) -> Result<Value, ClientError> {
    let c = Client::new(conn)?;
    use reqwest::Method;
    match cmd {
        ApprovalsCommand::List => c.call(Method::GET, "/v1/approvals", None).await,
        ApprovalsCommand::Show { approval_id, wait } => {
            let q = wait.map(|w| format!("?wait={w}")).unwrap_or_default();
            c.call(
                Method::GET,
                &format!("/v1/approvals/{}{q}", seg(&approval_id)),
                None,
            )
            .await
        }
        ApprovalsCommand::Approve {
            approval_id,
            comment,
        } => decide(&c, &approval_id, "approve", comment).await,
        ApprovalsCommand::Deny {
            approval_id,
            comment,
        } => decide(&c, &approval_id, "deny", Some(comment)).await,
    }
}

/// Approve or deny, with the approver's comment.
async fn decide(
    c: &Client,
    approval_id: &str,
    verb: &str,
    comment: Option<String>,
) -> Result<Value, ClientError> {
    let path = format!("/v1/approvals/{}/{verb}", seg(approval_id));
    c.call(
        reqwest::Method::POST,
        &path,
        Some(json!({ "comment": comment })),
    )
    .await
}

pub async fn reviews(conn: &Connection, cmd: ReviewsCommand) -> Result<Value, ClientError> {
    let c = Client::new(conn)?;
    use reqwest::Method;
    match cmd {
        ReviewsCommand::List => c.call(Method::GET, "/v1/reviews", None).await,
        ReviewsCommand::SignOff { task_id, comment } => {
            let body = json!({ "comment": comment });
            c.call(
                Method::POST,
                &format!("/v1/reviews/{}/sign-off", seg(&task_id)),
                Some(body),
            )
            .await
        }
    }
}

pub async fn policy(conn: &Connection, cmd: PolicyCommand) -> Result<Value, ClientError> {
    let c = Client::new(conn)?;
    use reqwest::Method;
    match cmd {
        PolicyCommand::Show => c.call(Method::GET, "/v1/policy", None).await,
        PolicyCommand::Reload => c.call(Method::POST, "/v1/policy/reload", None).await,
    }
}

pub async fn lease(conn: &Connection, cmd: LeaseCommand) -> Result<Value, ClientError> {
    let c = Client::new(conn)?;
    use reqwest::Method;
    match cmd {
        LeaseCommand::Request {
            task_id,
            provider,
            role,
            ttl_seconds,
            scope,
        } => {
            let body = json!({"provider": provider, "role": role, "ttl_seconds": ttl_seconds, "scope": scope});
            c.call(
                Method::POST,
                &format!("/v1/tasks/{}/leases", seg(&task_id)),
                Some(body),
            )
            .await
        }
        LeaseCommand::Show { lease_id } => {
            c.call(Method::GET, &format!("/v1/leases/{}", seg(&lease_id)), None)
                .await
        }
        LeaseCommand::Revoke {
            lease_id,
            force: false,
            ..
        } => {
            c.call(
                Method::POST,
                &format!("/v1/leases/{}/revoke", seg(&lease_id)),
                None,
            )
            .await
        }
        LeaseCommand::Revoke {
            lease_id,
            force: true,
            reason,
        } => {
            let body = json!({ "reason": reason.unwrap_or_default() });
            c.call(
                Method::POST,
                &format!("/v1/leases/{}/abandon", seg(&lease_id)),
                Some(body),
            )
            .await
        }
        LeaseCommand::List {
            state,
            workload,
            task,
            provider,
            role,
            limit,
            cursor,
        } => {
            let mut q: Vec<(&str, String)> = vec![("limit", limit.to_string())];
            for (k, v) in [
                ("state", state),
                ("workload", workload),
                ("task", task),
                ("provider", provider),
                ("role", role),
                ("cursor", cursor),
            ] {
                if let Some(v) = v {
                    q.push((k, v));
                }
            }
            let qs: Vec<String> = q
                .iter()
                .map(|(k, v)| format!("{k}={}", urlencode(v)))
                .collect();
            c.call(Method::GET, &format!("/v1/leases?{}", qs.join("&")), None)
                .await
        }
    }
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A metric's value, summed over its label sets, from Prometheus text.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// `leasehold status`: the broker at a glance, from its health, readiness,
/// cluster, stats and metrics (admin or responder).
pub async fn status(conn: &Connection) -> Result<Value, ClientError> {
    use reqwest::Method;
    let c = Client::new(conn)?;
    let health = c.call(Method::GET, "/v1/health", None).await?;
    // not ready is an answer too (503 with the checks)
    let (_, ready) = c.call_raw(Method::GET, "/v1/ready", None).await?;
    let cluster = c.call(Method::GET, "/v1/cluster", None).await?;
    let stats = c.call(Method::GET, "/v1/stats", None).await?;
    let chain = c.call(Method::GET, "/v1/events/chain", None).await?;
    let metrics = c.call(Method::GET, "/metrics", None).await?;
    let text = metrics.as_str().unwrap_or_default();
    let mut counts = Vec::new();
    if let Some(by_provider) = stats["leases"].as_object() {
        for (provider, states) in by_provider {
            for (state, n) in states.as_object().into_iter().flatten() {
                if n.as_u64() != Some(0) {
                    counts.push(
                        serde_json::json!({"provider": provider, "state": state, "count": n}),
                    );
                }
            }
        }
    }
    let checks: Vec<Value> = ready["checks"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| serde_json::json!({"check": k, "status": v}))
        .collect();
    // what to act on before it stops a provider, one row per line
    let advisories: Vec<Value> = stats["advisories"]
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(check, said)| {
            said.as_array()
                .into_iter()
                .flatten()
                .map(move |a| serde_json::json!({"check": check, "advisory": a}))
        })
        .collect();
    Ok(serde_json::json!({
        "broker": c.base,
        "health": health["status"],
        "ready": ready["ready"],
        "role": ready["role"],
        "leader": cluster["leader"].as_str().unwrap_or(if cluster["clustered"] == false { "this broker (single)" } else { "none" }),
        "nodes": if cluster["clustered"] == true { cluster["nodes"].as_array().map_or(0, Vec::len) } else { 1 },
        "revocation_queue": metric_sum(text, "leasehold_revocation_queue_depth").unwrap_or(0.0),
        "revocation_overdue_seconds": metric_sum(text, "leasehold_revocation_queue_oldest_overdue_seconds"),
        "chain_head": chain["head_seq"],
        // negative: no checkpoint yet
        "checkpoint_age_seconds": metric_sum(text, "leasehold_event_checkpoint_age_seconds").filter(|a| *a >= 0.0),
        "checks": checks,
        "advisories": advisories,
        "lease_counts": counts,
    }))
}

#[cfg(test)]
mod tests {
    use super::metric_sum;

    #[test]
    fn metrics_sum_over_labels_and_skip_lookalikes() {
        let text = "# HELP x\nleasehold_revocation_queue_depth{provider=\"a\"} 2\nleasehold_revocation_queue_depth{provider=\"b\"} 3\nleasehold_revocation_queue_depth_other 9\n";
        assert_eq!(
            metric_sum(text, "leasehold_revocation_queue_depth"),
            Some(5.0)
        );
        assert_eq!(metric_sum(text, "nothing"), None);
    }
}
