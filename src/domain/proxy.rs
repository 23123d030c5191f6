//! Proxy credentials: what an assistant shows `leasehold proxy` so that
//! the proxy can make calls for it, inject what is leased, and never hand
//! the assistant a credential.
//!
//! A proxy credential names one open task of one workload and ends no
//! later than the task. It is an HMAC (a key derived from the store key, so
//! any broker of the cluster verifies it) over the workload's identity at
//! issue time, the task and its end. It is worth nothing alone: the broker
//! accepts it only in the body of a call made by an operator with the
//! `proxy` role (`POST /v1/proxy/calls`), and every such call is decided
//! like the workload's own, against the task as it is then. A completed or
//! expired task, or a fence, refuses it; so it dies with the task. Issuing
//! one is recorded on the task (`proxy.credential_issued`), and every call
//! made with it names it (`via` on `call.decided`).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::audit::{self, Ctx, Via};
use crate::auth::{Operator, Workload};
use crate::domain::call::{CallOutcome, CallParams};
use crate::domain::{Broker, BrokerError};
use crate::ids::TaskId;

const PREFIX: &str = "lhp1.";
const MAC_PURPOSE: &str = "proxy-credential v1";
/// A proxy credential is at most this long (a header, an URL's userinfo).
const MAX_LEN: usize = 4096;

/// A proxy credential, as handed to the assistant once.
#[derive(Debug)]
pub struct ProxyCredential {
    pub id: String,
    pub token: secrecy::SecretString,
    pub task: TaskId,
    pub expires_at: i64,
}

/// What a proxy credential says (signed).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Claims {
    /// The credential's id (16 random bytes, hex): how the chain names it.
    id: String,
    task: String,
    workload: String,
    issuer: String,
    subject: String,
    tenant: Option<String>,
    attributes: BTreeMap<String, String>,
    /// Unix milliseconds.
    expires_at: i64,
}

fn invalid(why: &str) -> BrokerError {
    BrokerError::Forbidden {
        code: "proxy_credential_invalid",
        message: format!("the proxy credential was not accepted: {why}"),
    }
}

impl Broker {
    fn proxy_key(&self) -> Result<ring::hmac::Key, BrokerError> {
        self.store.sealer().mac_key(MAC_PURPOSE).map_err(|_| {
            BrokerError::Store(crate::store::StoreError::Corrupt(
                "deriving the proxy credential key failed".into(),
            ))
        })
    }

    /// A proxy credential for the workload's open task, ending with the
    /// task (or after `ttl_seconds`, when sooner). Recorded on the task.
    pub async fn issue_proxy_credential(
        &self,
        w: &Workload,
        task_id: TaskId,
        ttl_seconds: Option<u64>,
        ctx: &Ctx,
    ) -> Result<ProxyCredential, BrokerError> {
        let result = self
            .issue_proxy_unrecorded(w, task_id, ttl_seconds, ctx)
            .await;
        if let Err(e) = &result {
            let asked = crate::event_data![("request", "proxy_credential")];
            self.refused_in_task(w, task_id, asked, e, ctx).await;
        }
        result
    }

    async fn issue_proxy_unrecorded(
        &self,
        w: &Workload,
        task_id: TaskId,
        ttl_seconds: Option<u64>,
        ctx: &Ctx,
    ) -> Result<ProxyCredential, BrokerError> {
        if ttl_seconds == Some(0) {
            return Err(BrokerError::invalid(
                "invalid_request",
                "`ttl_seconds` must be at least 1",
            ));
        }
        let now = self.clock.now().unix_millis();
        let task = {
            let r = self.store.read()?;
            Self::open_task_of(&*r, w, task_id, now)?
        };
        self.check_fence(w, Some(&task.on_behalf_of))?;
        let expires_at = ttl_seconds.map_or(task.expires_at, |t| {
            task.expires_at
                .min(now.saturating_add(i64::try_from(t.saturating_mul(1000)).unwrap_or(i64::MAX)))
        });
        let mut raw = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).map_err(
            |_| BrokerError::Store(crate::store::StoreError::Corrupt("no randomness".into())),
        )?;
        let claims = Claims {
            id: format!("pxc_{}", crate::hex::encode(&raw)),
            task: task_id.to_string(),
            workload: w.id.clone(),
            issuer: w.issuer.clone(),
            subject: w.subject.clone(),
            tenant: w.tenant.clone(),
            attributes: w.attributes.clone(),
            expires_at,
        };
        let body = serde_json::to_vec(&claims)
            .map_err(|e| BrokerError::Store(crate::store::StoreError::Corrupt(e.to_string())))?;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = b64.encode(&body);
        let tag = ring::hmac::sign(&self.proxy_key()?, payload.as_bytes());
        let token = format!("{PREFIX}{payload}.{}", b64.encode(tag.as_ref()));
        // the record: on the task's chain, in a transaction that sees the
        // task still open and its workload unfenced
        let fence = crate::domain::fences::fence_keys(w, Some(&task.on_behalf_of));
        let (a, t, cx, id) = (
            self.auditor.clone(),
            task.clone(),
            ctx.clone(),
            claims.id.clone(),
        );
        self.store
            .write(move |txn| {
                txn.refuse_fenced(&fence)?;
                let open = txn.task(t.id)?;
                if !open.is_some_and(|o| o.state == crate::store::TaskState::Open) {
                    return Err(crate::store::StoreError::Conflict(
                        crate::store::Conflict::TaskCompleted,
                    ));
                }
                audit::append(txn, &a, a.proxy_credential(&t, &id, expires_at, now, &cx))
            })
            .await?;
        tracing::info!(task_id = %task_id, workload = %w.id, proxy_credential = %claims.id, "proxy credential issued");
        Ok(ProxyCredential {
            id: claims.id,
            token: token.into(),
            task: task_id,
            expires_at,
        })
    }

    /// Who a proxy credential speaks for: its workload (as it was when the
    /// credential was issued), its task and its id. Checks the signature
    /// and the end; the task's state is checked by the call itself.
    fn proxy_subject(&self, token: &str) -> Result<(Workload, TaskId, String), BrokerError> {
        if token.len() > MAX_LEN {
            return Err(invalid("too long"));
        }
        let rest = token
            .strip_prefix(PREFIX)
            .ok_or_else(|| invalid("not a leasehold proxy credential"))?;
        let (payload, tag) = rest.split_once('.').ok_or_else(|| invalid("malformed"))?;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let tag = b64.decode(tag).map_err(|_| invalid("malformed"))?;
        ring::hmac::verify(&self.proxy_key()?, payload.as_bytes(), &tag)
            .map_err(|_| invalid("bad signature (another broker's, or altered)"))?;
        let body = b64.decode(payload).map_err(|_| invalid("malformed"))?;
        let c: Claims = serde_json::from_slice(&body).map_err(|_| invalid("malformed"))?;
        if c.expires_at <= self.clock.now().unix_millis() {
            return Err(invalid("expired"));
        }
        let task: TaskId = c.task.parse().map_err(|_| invalid("malformed"))?;
        let w = Workload {
            id: c.workload,
            issuer: c.issuer,
            subject: c.subject,
            tenant: c.tenant,
            attributes: c.attributes,
        };
        Ok((w, task, c.id))
    }

    /// A call the proxy makes for the assistant holding `token`: decided
    /// and recorded exactly as the workload's own call on its task, with
    /// the proxy and the credential named on the decision.
    pub async fn proxy_call(
        &self,
        proxy: &Operator,
        token: &str,
        p: CallParams,
        ctx: &Ctx,
    ) -> Result<(Workload, CallOutcome), BrokerError> {
        let (w, task, id) = match self.proxy_subject(token) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(proxy = %proxy.name, error = %e, "proxy credential refused");
                return Err(e);
            }
        };
        let mut ctx = ctx.clone();
        ctx.actor = Some(format!("workload:{}", w.id));
        ctx.via = Some(Via {
            proxy: proxy.name.clone(),
            credential: id,
        });
        let outcome = self.call(&w, task, p, &ctx).await?;
        Ok((w, outcome))
    }
}
