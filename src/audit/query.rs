//! Reading the chain: filtered pages for the API, verification of a store
//! (online, or offline from a stopped broker's file), and export lines
//! straight from the stored bytes (archives).

use serde_json::Value;

use super::verify::ChainVerifier;
use super::{Checkpoint, EventKind, VerifyReport};
use crate::clock::{Timestamp, parse_rfc3339};
use crate::store::{ReadTxn, StoreError, StoredEvent};

/// Filters for listing events. `user` and `workload` are compared as the
/// chain holds them (already HMAC-ed by the caller if configured).
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub task: Option<u128>,
    pub lease: Option<String>,
    /// The lease's task, when filtering by lease (found by the caller).
    pub lease_task: Option<u128>,
    pub workload: Option<String>,
    pub user: Option<String>,
    pub kind: Option<EventKind>,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    /// Cursor: events after this seq.
    pub after: u64,
    pub limit: usize,
    /// Events examined per call at most.
    pub scan_budget: usize,
}

fn link<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v.get("links")
        .and_then(|l| l.get(name))
        .and_then(Value::as_str)
}

impl EventQuery {
    fn keep(&self, v: &Value) -> bool {
        let time = v
            .get("time")
            .and_then(Value::as_str)
            .and_then(parse_rfc3339);
        self.kind
            .is_none_or(|k| v.get("kind").and_then(Value::as_str) == Some(k.as_str()))
            && self
                .workload
                .as_deref()
                .is_none_or(|w| link(v, "workload") == Some(w))
            && self
                .user
                .as_deref()
                .is_none_or(|u| link(v, "user") == Some(u))
            && self
                .lease
                .as_deref()
                .is_none_or(|l| link(v, "lease") == Some(l))
            && self.since.is_none_or(|s| time.is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| time.is_some_and(|t| t < u))
    }
}

/// One page of events (each with its `hash`), and the cursor to continue.
pub fn page(r: &dyn ReadTxn, q: &EventQuery) -> Result<(Vec<Value>, Option<u64>), StoreError> {
    let limit = q.limit.max(1);
    let budget = q.scan_budget.max(limit);
    let mut out = Vec::new();
    let mut scanned = 0usize;
    let mut cursor = q.after;
    let task = q.task.or(q.lease_task);
    loop {
        let chunk = 256.min(budget - scanned).max(1);
        let batch: Vec<StoredEvent> = match task {
            Some(t) => r.task_events(t, cursor, chunk)?,
            None => r.events_after(cursor, chunk)?,
        };
        let exhausted = batch.len() < chunk;
        for e in batch {
            scanned += 1;
            cursor = e.seq;
            let v = super::with_hash(&e.bytes, &e.hash).map_err(StoreError::Corrupt)?;
            if q.keep(&v) {
                out.push(v);
            }
            if out.len() >= limit || scanned >= budget {
                return Ok((out, Some(cursor)));
            }
        }
        if exhausted {
            return Ok((out, None));
        }
    }
}

/// Verify everything a store holds: the chain from its base, its head, and
/// every checkpoint (signatures against `trusted`, when given).
pub fn verify_store(r: &dyn ReadTxn, trusted: Option<Vec<u8>>) -> Result<VerifyReport, StoreError> {
    let base = r.chain_base()?;
    let head = r.chain_head()?;
    let mut checkpoints = Vec::new();
    let mut bad = Vec::new();
    for (seq, bytes) in r.checkpoints()? {
        match serde_json::from_slice::<Value>(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|v| Checkpoint::from_value(&v))
        {
            Ok(cp) if cp.seq == seq => checkpoints.push(cp),
            Ok(_) | Err(_) => bad.push(seq),
        }
    }
    let mut v = ChainVerifier::new(base.seq, base.hash, checkpoints, trusted);
    let mut last = base.seq;
    let walked = r.for_each_event(&mut |seq, hash, bytes| {
        last = seq;
        v.event(Some(seq), Some(hash), bytes);
    });
    let mut report = v.finish(Some((head.seq, head.hash)));
    // a block that cannot be decoded is a break where the readable events
    // end, not a failure to verify
    match walked {
        Err(StoreError::Corrupt(why)) => {
            let seq = last + 1;
            if report.first_break.as_ref().is_none_or(|b| seq <= b.seq) {
                report.ok = false;
                report.first_break = Some(super::Break {
                    seq,
                    reason: format!("unreadable events: {why}"),
                });
            }
        }
        other => other?,
    }
    if let Some(&seq) = bad.first()
        && report.first_break.as_ref().is_none_or(|b| seq < b.seq)
    {
        report.ok = false;
        report.first_break = Some(super::Break {
            seq,
            reason: "unreadable checkpoint".into(),
        });
    }
    Ok(report)
}

/// An event's export line, as [`super::canonical`] of [`super::with_hash`] writes it, from
/// its stored canonical bytes without building values: `"hash"` is spliced
/// in before the first top-level key that sorts after it (archiving writes
/// millions of these).
pub fn export_line(
    bytes: &[u8],
    hash: &[u8; 32],
    out: &mut Vec<u8>,
) -> Result<(), super::CanonicalError> {
    if bytes.first() != Some(&b'{') || bytes.last() != Some(&b'}') {
        return Err(super::CanonicalError);
    }
    let (mut depth, mut in_string, mut escaped, mut expect_key) = (0u32, false, false, false);
    let mut at = None;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else {
            match c {
                b'"' if depth == 1 && expect_key => {
                    let end = bytes[i + 1..]
                        .iter()
                        .position(|&b| b == b'"')
                        .ok_or(super::CanonicalError)?;
                    if &bytes[i + 1..i + 1 + end] > b"hash".as_slice() {
                        at = Some(i);
                        break;
                    }
                    expect_key = false;
                    i += end + 2;
                    continue;
                }
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    expect_key = depth == 1;
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                b',' if depth == 1 => expect_key = true,
                _ => {}
            }
        }
        i += 1;
    }
    let field = |out: &mut Vec<u8>| {
        out.extend_from_slice(b"\"hash\":\"");
        out.extend_from_slice(crate::hex::encode(hash).as_bytes());
        out.push(b'"');
    };
    match at {
        Some(at) => {
            out.extend_from_slice(&bytes[..at]);
            field(out);
            out.push(b',');
            out.extend_from_slice(&bytes[at..]);
        }
        None => {
            let body = &bytes[..bytes.len() - 1];
            out.extend_from_slice(body);
            if body.len() > 1 {
                out.push(b',');
            }
            field(out);
            out.push(b'}');
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::export_line;

    #[test]
    fn an_export_line_is_the_canonical_event_with_its_hash() {
        let hash = [0xab; 32];
        for bytes in [
            r#"{"data":{"kind":"x","note":"a \\\" }, \"kind\": ] {","z":[{"a":1}]},"kind":"lease.issued","links":{"task":"t"},"prev_hash":"00","seq":3,"time":"2026-01-01T00:00:00Z","v":1}"#,
            r#"{"kind":"broker.started","seq":1,"v":1}"#,
            r#"{"a":1,"b":{"hash":2}}"#,
            r#"{"data":{}}"#,
            r#"{}"#,
        ] {
            let mut line = Vec::new();
            export_line(bytes.as_bytes(), &hash, &mut line).unwrap();
            let mut want = Vec::new();
            crate::audit::canonical(
                &crate::audit::with_hash(bytes.as_bytes(), &hash).unwrap(),
                &mut want,
            )
            .unwrap();
            assert_eq!(
                String::from_utf8(line).unwrap(),
                String::from_utf8(want).unwrap()
            );
        }
        let mut line = Vec::new();
        assert!(export_line(b"[1]", &hash, &mut line).is_err());
    }
}
