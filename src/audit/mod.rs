//! The event chain (DESIGN.md invariant 6): every decision and lifecycle
//! step, hash-linked, in the same store and the same transaction as the state
//! change it describes.
//!
//! An event is a JSON object with sorted keys and no whitespace (the
//! *canonical form*): `{"data":{..},"kind":"lease.issued","links":{..},
//! "prev_hash":"<hex>","seq":N,"time":"<RFC 3339>","v":1}`. Its hash is the
//! SHA-256 of those bytes; `prev_hash` is the previous event's hash, so
//! changing, removing, reordering or truncating events breaks a link that
//! [`verify`] names by sequence number. Signed checkpoints ([`checkpoint`])
//! pin the head with an Ed25519 key kept apart from the store key, so even a
//! rewrite of the whole chain is caught.
//!
//! Appending is cheap inside the store's single writer: everything except
//! `prev_hash` and `seq` is rendered before the operation reaches the writer
//! ([`Pending`]); the writer splices those two in and hashes.
//!
//! Things deliberately absent: no secret ever enters an event (credentials,
//! handles, tokens); prompt text only sealed, and only if configured;
//! user-supplied free text is truncated; configured fields can be replaced by
//! an HMAC so operators can match a known value without the chain holding it.

pub mod checkpoint;
pub mod events;
pub mod query;
pub mod verify;

use std::collections::BTreeMap;

use serde_json::Value;

use crate::clock::{Timestamp, rfc3339};

pub use checkpoint::{Checkpoint, CheckpointKey};
pub use events::{Ctx, Via, ahead_or, append};
pub use query::export_line;
pub use verify::{Break, VerifyReport};

/// What happened. The string forms are stable: they are filters in the API
/// and part of every exported line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    BrokerStarted,
    BrokerStopped,
    AuthDenied,
    /// A request of an authenticated workload refused before policy
    /// decided it (an unknown tool, provider or role, a quota, a fence, a
    /// task that ended): what it asked and why.
    RequestRefused,
    TaskOpened,
    TaskCompleted,
    CallDecided,
    ApprovalRequested,
    ApprovalApproved,
    /// An approved request was made, using the approval up (before this
    /// kind existed, `approval.approved` with state `consumed` said so).
    ApprovalConsumed,
    ApprovalDenied,
    ApprovalExpired,
    BreakGlassUsed,
    BreakGlassReviewed,
    LeaseIssuing,
    LeaseIssued,
    LeaseRolledBack,
    LeaseRevoking,
    LeaseRevoked,
    RevocationRetried,
    LeaseIrrevocable,
    WorkloadFenced,
    WorkloadUnfenced,
    PolicyReloaded,
    ChainPruned,
    LeaseAbandoned,
    JobStarted,
    JobFinished,
    ProviderReconciled,
    /// An assistant got a credential for the egress proxy, bound to its
    /// task (`leasehold proxy`).
    ProxyCredentialIssued,
    /// Retention removed records that ended before its cutoff (what, how
    /// many, which tasks).
    RetentionRemoved,
}

impl EventKind {
    pub const ALL: [EventKind; 31] = [
        Self::BrokerStarted,
        Self::BrokerStopped,
        Self::AuthDenied,
        Self::RequestRefused,
        Self::TaskOpened,
        Self::TaskCompleted,
        Self::CallDecided,
        Self::ApprovalRequested,
        Self::ApprovalApproved,
        Self::ApprovalConsumed,
        Self::ApprovalDenied,
        Self::ApprovalExpired,
        Self::BreakGlassUsed,
        Self::BreakGlassReviewed,
        Self::LeaseIssuing,
        Self::LeaseIssued,
        Self::LeaseRolledBack,
        Self::LeaseRevoking,
        Self::LeaseRevoked,
        Self::RevocationRetried,
        Self::LeaseIrrevocable,
        Self::WorkloadFenced,
        Self::WorkloadUnfenced,
        Self::PolicyReloaded,
        Self::ChainPruned,
        Self::LeaseAbandoned,
        Self::JobStarted,
        Self::JobFinished,
        Self::ProviderReconciled,
        Self::ProxyCredentialIssued,
        Self::RetentionRemoved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BrokerStarted => "broker.started",
            Self::BrokerStopped => "broker.stopped",
            Self::AuthDenied => "auth.denied",
            Self::RequestRefused => "request.refused",
            Self::TaskOpened => "task.opened",
            Self::TaskCompleted => "task.completed",
            Self::CallDecided => "call.decided",
            Self::ApprovalRequested => "approval.requested",
            Self::ApprovalApproved => "approval.approved",
            Self::ApprovalConsumed => "approval.consumed",
            Self::ApprovalDenied => "approval.denied",
            Self::ApprovalExpired => "approval.expired",
            Self::BreakGlassUsed => "break_glass.used",
            Self::BreakGlassReviewed => "break_glass.reviewed",
            Self::LeaseIssuing => "lease.issuing",
            Self::LeaseIssued => "lease.issued",
            Self::LeaseRolledBack => "lease.rolled_back",
            Self::LeaseRevoking => "lease.revoking",
            Self::LeaseRevoked => "lease.revoked",
            Self::RevocationRetried => "revocation.retried",
            Self::LeaseIrrevocable => "lease.irrevocable",
            Self::WorkloadFenced => "workload.fenced",
            Self::WorkloadUnfenced => "workload.unfenced",
            Self::PolicyReloaded => "policy.reloaded",
            Self::ChainPruned => "chain.pruned",
            Self::LeaseAbandoned => "lease.abandoned",
            Self::JobStarted => "revocation_job.started",
            Self::JobFinished => "revocation_job.finished",
            Self::ProviderReconciled => "provider.reconciled",
            Self::ProxyCredentialIssued => "proxy.credential_issued",
            Self::RetentionRemoved => "retention.removed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// The ids an event links. Absent links are omitted from the event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Links {
    pub workload: Option<String>,
    pub tenant: Option<String>,
    pub task: Option<String>,
    pub call: Option<String>,
    pub decision: Option<String>,
    pub approval: Option<String>,
    pub lease: Option<String>,
    pub job: Option<String>,
    pub request_id: Option<String>,
    /// The user the assistant acts for (or its HMAC, if configured).
    pub user: Option<String>,
    pub provider: Option<String>,
    pub role: Option<String>,
}

impl Links {
    /// The canonical JSON object of the links present, written directly:
    /// the names are fixed, so their sorted order is too.
    fn write_canonical(&self, out: &mut Vec<u8>) {
        // sorted by name (a test checks the order against `canonical`)
        let fields = [
            ("approval", &self.approval),
            ("call", &self.call),
            ("decision", &self.decision),
            ("job", &self.job),
            ("lease", &self.lease),
            ("provider", &self.provider),
            ("request_id", &self.request_id),
            ("role", &self.role),
            ("task", &self.task),
            ("tenant", &self.tenant),
            ("user", &self.user),
            ("workload", &self.workload),
        ];
        out.push(b'{');
        let mut first = true;
        for (k, v) in fields {
            if let Some(v) = v {
                if !first {
                    out.push(b',');
                }
                first = false;
                out.push(b'"');
                out.extend_from_slice(k.as_bytes());
                out.extend_from_slice(b"\":");
                json_string(v, out);
            }
        }
        out.push(b'}');
    }
}

/// A JSON string, escaped as serde_json escapes it (the canonical form).
fn json_string(s: &str, out: &mut Vec<u8>) {
    let mut ser = serde_json::Serializer::new(out);
    // writing to a Vec cannot fail
    let _ = serde::Serializer::serialize_str(&mut ser, s);
}

/// Canonical JSON: object keys sorted, no whitespace, integers only.
/// Floats are refused: their text form is not canonical across writers.
pub fn canonical(v: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    match v {
        Value::String(s) => json_string(s, out),
        Value::Null | Value::Bool(_) => {
            serde_json::to_writer(&mut *out, v).map_err(|_| CanonicalError)?;
        }
        Value::Number(n) => {
            if n.is_f64() {
                return Err(CanonicalError);
            }
            serde_json::to_writer(&mut *out, v).map_err(|_| CanonicalError)?;
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by_key(|(k, _)| *k);
            canonical_object(entries, out)?;
        }
    }
    Ok(())
}

/// A JSON object of `entries`, which come sorted by key.
fn canonical_object<'a>(
    entries: impl IntoIterator<Item = (&'a String, &'a Value)>,
    out: &mut Vec<u8>,
) -> Result<(), CanonicalError> {
    out.push(b'{');
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_string(k, out);
        out.push(b':');
        canonical(v, out)?;
    }
    out.push(b'}');
    Ok(())
}

/// A value that has no canonical form (a float).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("event data must hold no floating-point numbers")]
pub struct CanonicalError;

/// SHA-256.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut h = [0u8; 32];
    h.copy_from_slice(d.as_ref());
    h
}

/// An event rendered up to its position in the chain: the canonical bytes
/// before `"prev_hash"` and after `"seq"`. The writer splices the rest.
#[derive(Clone)]
pub struct Pending {
    pub kind: EventKind,
    prefix: Vec<u8>,
    /// SHA-256 with `prefix` absorbed: the bulk of the hashing is done by
    /// whoever renders the event, not on the store's one writer thread.
    hashed_prefix: ring::digest::Context,
    suffix: Vec<u8>,
    /// The task it belongs to, for the per-task index.
    pub task: Option<u128>,
}

/// Longest free text kept in an event; longer is truncated (and marked).
pub const MAX_TEXT: usize = 1024;

/// Bound user-supplied free text.
pub fn text(s: &str) -> Value {
    if s.len() <= MAX_TEXT {
        return Value::String(s.to_owned());
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Value::String(format!("{}…[truncated]", &s[..end]))
}

impl Pending {
    pub fn new(
        kind: EventKind,
        time: Timestamp,
        links: &Links,
        data: EventData,
        task: Option<u128>,
    ) -> Result<Self, CanonicalError> {
        // keys in canonical (sorted) order: data, kind, links | prev_hash, seq | time, v
        let mut prefix = Vec::with_capacity(512);
        prefix.extend_from_slice(b"{\"data\":");
        // a BTreeMap: its keys come sorted
        canonical_object(&data, &mut prefix)?;
        prefix.extend_from_slice(b",\"kind\":");
        json_string(kind.as_str(), &mut prefix);
        prefix.extend_from_slice(b",\"links\":");
        links.write_canonical(&mut prefix);
        prefix.push(b',');
        let mut suffix = Vec::with_capacity(48);
        suffix.extend_from_slice(b",\"time\":");
        json_string(&rfc3339(time), &mut suffix);
        suffix.extend_from_slice(b",\"v\":1}");
        let mut hashed_prefix = ring::digest::Context::new(&ring::digest::SHA256);
        hashed_prefix.update(&prefix);
        Ok(Self {
            kind,
            prefix,
            hashed_prefix,
            suffix,
            task,
        })
    }

    /// Its length in bytes at any position, at most: the spliced
    /// `"prev_hash":"<64 hex>","seq":` is 85 bytes, and `seq` at most 20.
    pub fn max_len(&self) -> usize {
        self.prefix.len() + self.suffix.len() + 105
    }

    /// Append the canonical bytes at position `seq` after `prev` to `out`,
    /// and return their hash.
    pub fn seal_into(&self, seq: u64, prev: &[u8; 32], out: &mut Vec<u8>) -> [u8; 32] {
        let start = out.len();
        out.extend_from_slice(&self.prefix);
        let spliced = out.len();
        out.extend_from_slice(b"\"prev_hash\":\"");
        out.extend_from_slice(crate::hex::encode(prev).as_bytes());
        out.extend_from_slice(b"\",\"seq\":");
        out.extend_from_slice(seq.to_string().as_bytes());
        out.extend_from_slice(&self.suffix);
        let mut h = self.hashed_prefix.clone();
        h.update(&out[spliced..]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(h.finish().as_ref());
        debug_assert_eq!(hash, sha256(&out[start..]));
        hash
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("kind", &self.kind)
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .field("suffix", &String::from_utf8_lossy(&self.suffix))
            .field("task", &self.task)
            .finish_non_exhaustive()
    }
}

/// A stored event as the API and exports show it: the canonical object with
/// its `hash` added.
pub fn with_hash(bytes: &[u8], hash: &[u8; 32]) -> Result<Value, String> {
    let mut v: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable event: {e}"))?;
    if let Some(m) = v.as_object_mut() {
        m.insert("hash".into(), Value::String(crate::hex::encode(hash)));
    }
    Ok(v)
}

/// An event's data: sorted by key as its canonical form is, and with no
/// hashing to build (serde_json's map keeps insertion order, here).
pub type EventData = std::collections::BTreeMap<String, Value>;

/// Builds data maps tersely: `data![("cause", "expiry"), ...]`.
#[macro_export]
macro_rules! event_data {
    ($(($k:expr, $v:expr)),* $(,)?) => {{
        #[allow(unused_mut)]
        let mut m = $crate::audit::EventData::new();
        $( m.insert(($k).to_string(), serde_json::Value::from($v)); )*
        m
    }};
}

/// Replace configured fields by an HMAC-SHA256 (keyed separately from
/// the store), so the chain holds no raw value yet a known value matches.
#[derive(Clone)]
pub struct FieldHmac {
    key: ring::hmac::Key,
    fields: Vec<String>,
}

impl std::fmt::Debug for FieldHmac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FieldHmac")
            .field("fields", &self.fields)
            .finish_non_exhaustive()
    }
}

/// The fields `hmac_fields` may name.
pub use crate::config::HMAC_FIELDS;

impl FieldHmac {
    pub fn new(key: &[u8], fields: Vec<String>) -> Self {
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
            fields,
        }
    }

    pub fn applies(&self, field: &str) -> bool {
        self.fields.iter().any(|f| f == field)
    }

    /// `hmac-sha256:<hex>` of the value.
    pub fn digest(&self, value: &str) -> String {
        let tag = ring::hmac::sign(&self.key, value.as_bytes());
        format!("hmac-sha256:{}", crate::hex::encode(tag.as_ref()))
    }

    /// The value as it may enter the chain.
    pub fn field(this: Option<&Self>, field: &str, value: &str) -> String {
        match this {
            Some(h) if h.applies(field) => h.digest(value),
            _ => value.to_owned(),
        }
    }
}

/// How events are shaped before they reach the store: HMAC fields and, for
/// benchmarks only, a no-op sink.
#[derive(Clone, Debug, Default)]
pub struct Auditor {
    pub hmac: Option<FieldHmac>,
    /// Benchmark-only: drop every event (feature `bench-no-events`; release
    /// builds do not have it).
    #[cfg(feature = "bench-no-events")]
    pub noop: bool,
    /// Test-only: fail the append of these kinds (fail-closed tests).
    #[cfg(feature = "fault-injection")]
    pub fail_kinds: Vec<String>,
}

impl Auditor {
    /// Whether events are being recorded at all (always, outside the
    /// benchmark-only no-op build).
    pub fn enabled(&self) -> bool {
        #[cfg(feature = "bench-no-events")]
        {
            !self.noop
        }
        #[cfg(not(feature = "bench-no-events"))]
        {
            true
        }
    }

    /// Should the append of this kind fail (fault injection)?
    pub fn injected_failure(&self, kind: EventKind) -> bool {
        #[cfg(feature = "fault-injection")]
        {
            self.fail_kinds.iter().any(|k| k == kind.as_str())
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            let _ = kind;
            false
        }
    }

    pub fn user(&self, v: &str) -> String {
        FieldHmac::field(self.hmac.as_ref(), "user", v)
    }

    pub fn workload(&self, v: &str) -> String {
        FieldHmac::field(self.hmac.as_ref(), "workload", v)
    }

    pub fn tenant(&self, v: &str) -> String {
        FieldHmac::field(self.hmac.as_ref(), "tenant", v)
    }

    pub fn purpose(&self, v: &str) -> Value {
        match &self.hmac {
            Some(h) if h.applies("purpose") => Value::String(h.digest(v)),
            _ => text(v),
        }
    }
}

/// A sorted map of lease counts, as events report them.
pub fn counts(items: impl IntoIterator<Item = (String, u64)>) -> Value {
    let m: BTreeMap<String, u64> = items.into_iter().collect();
    serde_json::to_value(m).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn canonical_sorts_keys_and_refuses_floats() {
        let v = serde_json::json!({"b": 1, "a": {"z": [1, "x"], "c": null}, "é": "\u{1}"});
        let mut out = Vec::new();
        canonical(&v, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":{"c":null,"z":[1,"x"]},"b":1,"é":"\u0001"}"#
        );
        assert!(canonical(&serde_json::json!({"x": 1.5}), &mut Vec::new()).is_err());
    }

    #[test]
    fn sealed_bytes_are_the_canonical_form() {
        let links = Links {
            task: Some("task_1".into()),
            lease: Some("lease_1".into()),
            ..Links::default()
        };
        let p = Pending::new(
            EventKind::LeaseIssued,
            Timestamp::from_unix_millis(1_800_000_000_000),
            &links,
            crate::event_data![("z", 1), ("a", "x")],
            Some(1),
        )
        .unwrap();
        let mut bytes = b"stored ahead".to_vec();
        let hash = p.seal_into(7, &[0xab; 32], &mut bytes);
        let bytes = bytes.split_off(12);
        assert!(bytes.len() <= p.max_len());
        let parsed: Value = serde_json::from_slice(&bytes).unwrap();
        let mut again = Vec::new();
        canonical(&parsed, &mut again).unwrap();
        assert_eq!(again, bytes, "splicing produces exactly the canonical form");
        assert_eq!(hash, sha256(&bytes));
        assert_eq!(parsed["seq"], 7);
        assert_eq!(parsed["kind"], "lease.issued");
        assert_eq!(parsed["prev_hash"], "ab".repeat(32));
        assert_eq!(parsed["data"]["a"], "x");
    }

    #[test]
    fn links_are_written_in_canonical_form() {
        let all = Links {
            workload: Some("w\"1".into()),
            tenant: Some("t".into()),
            task: Some("task_1".into()),
            call: Some("call_1".into()),
            decision: Some("d".into()),
            approval: Some("a\u{7}".into()),
            lease: Some("lease_1".into()),
            job: Some("job_1".into()),
            request_id: Some("req_1".into()),
            user: Some("ü@example.com".into()),
            provider: Some("token".into()),
            role: Some("demo".into()),
        };
        for links in [
            all,
            Links::default(),
            Links {
                lease: Some("l".into()),
                ..Links::default()
            },
        ] {
            let mut direct = Vec::new();
            links.write_canonical(&mut direct);
            let parsed: Value = serde_json::from_slice(&direct).unwrap();
            let mut again = Vec::new();
            canonical(&parsed, &mut again).unwrap();
            assert_eq!(
                String::from_utf8(direct).unwrap(),
                String::from_utf8(again).unwrap()
            );
        }
    }

    #[test]
    fn kinds_round_trip_and_text_is_bounded() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
        }
        let long = "é".repeat(MAX_TEXT);
        let t = text(&long);
        assert!(t.as_str().unwrap().len() <= MAX_TEXT + 20);
        assert!(t.as_str().unwrap().ends_with("[truncated]"));
    }

    #[test]
    fn hmac_fields_hide_values_but_match_known_ones() {
        let h = FieldHmac::new(b"k", vec!["user".into()]);
        let a = FieldHmac::field(Some(&h), "user", "alice@example.com");
        assert!(a.starts_with("hmac-sha256:") && !a.contains("alice"));
        assert_eq!(a, h.digest("alice@example.com"));
        assert_eq!(FieldHmac::field(Some(&h), "tenant", "t1"), "t1");
    }
}
