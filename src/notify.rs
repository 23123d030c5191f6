//! The approvers' webhook: new approval requests and break-glass use are
//! POSTed as JSON to a configured URL, retried in the background. A slow or
//! failing webhook never delays a decision: notifications queue up (to a
//! bound, beyond which they are dropped with an error log) and the event
//! chain holds the authoritative record either way.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

/// Attempts per notification, with 1, 2, 4, 8 s between them.
const ATTEMPTS: u32 = 5;
const QUEUE: usize = 10_000;

/// A handle to the notifier; cheap to clone. Without a URL it does nothing.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    tx: Option<mpsc::Sender<Value>>,
}

impl Notifier {
    /// Start the delivery task. `secret` signs each body:
    /// `x-leasehold-signature: sha256=<hex HMAC-SHA256 of the body>`.
    pub fn spawn(url: String, secret: Option<[u8; 32]>) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("webhook client: {e}"))?;
        let key = secret.map(|s| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &s));
        let (tx, mut rx) = mpsc::channel::<Value>(QUEUE);
        tokio::spawn(async move {
            while let Some(v) = rx.recv().await {
                let body = v.to_string();
                let mut delay = Duration::from_secs(1);
                for attempt in 1..=ATTEMPTS {
                    let mut req = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone());
                    if let Some(k) = &key {
                        let tag = ring::hmac::sign(k, body.as_bytes());
                        req = req.header(
                            "x-leasehold-signature",
                            format!("sha256={}", crate::hex::encode(tag.as_ref())),
                        );
                    }
                    match req.send().await {
                        Ok(r) if r.status().is_success() => break,
                        Ok(r) => tracing::warn!(
                            status = r.status().as_u16(),
                            attempt,
                            "webhook refused a notification"
                        ),
                        Err(e) => tracing::warn!(error = %e, attempt, "webhook unreachable"),
                    }
                    if attempt == ATTEMPTS {
                        tracing::error!(kind = %v["type"], "webhook notification dropped after {ATTEMPTS} attempts");
                    } else {
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
        });
        Ok(Self { tx: Some(tx) })
    }

    /// Queue a notification; never waits.
    pub fn notify(&self, v: Value) {
        if let Some(tx) = &self.tx
            && tx.try_send(v).is_err()
        {
            tracing::error!(
                "webhook queue full: a notification was dropped (the event chain has it)"
            );
        }
    }
}
