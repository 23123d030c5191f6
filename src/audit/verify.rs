//! Verifying a chain, from the store or from an export, and naming the first
//! broken link precisely.
//!
//! Checks, per event in order: its `seq` is the next one (a deleted or
//! reordered event shows as a gap or a step back); its bytes hash to the
//! stored hash (a changed field); its `prev_hash` is the previous event's hash
//! (a replaced event); at a checkpoint, the hash is the signed one. At the end:
//! no checkpoint lies beyond the last event and the recorded head is the last
//! event (a truncated chain). Every checkpoint's signature is checked against
//! the trusted key, when one is given.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::{Checkpoint, canonical, sha256};

/// The first broken link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Break {
    pub seq: u64,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct VerifyReport {
    pub ok: bool,
    /// Events checked.
    pub events: u64,
    /// The chain starts after this event (pruned before it), 0 for genesis.
    pub base_seq: u64,
    pub last_seq: u64,
    pub head_hash: String,
    pub checkpoints: u64,
    /// Checkpoints whose signature was checked against a trusted key.
    pub checkpoints_verified: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_break: Option<Break>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Each prune the verified chain records: through which seq, into which
    /// archive (its file name and SHA-256), and the event that says so.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub archives: Vec<ArchiveMark>,
}

/// A `chain.pruned` event, as `verify` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ArchiveMark {
    /// The `chain.pruned` event.
    pub seq: u64,
    pub through_seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_sha256: Option<String>,
}

#[derive(serde::Deserialize)]
struct Position {
    seq: u64,
    prev_hash: String,
    #[serde(default)]
    kind: String,
}

/// Feeds events in order; [`ChainVerifier::finish`] gives the report.
#[derive(Debug)]
pub struct ChainVerifier {
    base_seq: u64,
    next_seq: u64,
    prev: [u8; 32],
    checkpoints: BTreeMap<u64, Checkpoint>,
    trusted: Option<Vec<u8>>,
    events: u64,
    first_break: Option<Break>,
    archives: Vec<ArchiveMark>,
}

impl ChainVerifier {
    pub fn new(
        base_seq: u64,
        base_hash: [u8; 32],
        checkpoints: Vec<Checkpoint>,
        trusted: Option<Vec<u8>>,
    ) -> Self {
        Self {
            base_seq,
            next_seq: base_seq + 1,
            prev: base_hash,
            checkpoints: checkpoints.into_iter().map(|c| (c.seq, c)).collect(),
            trusted,
            events: 0,
            first_break: None,
            archives: Vec::new(),
        }
    }

    /// Record a break; the earliest seq wins whichever check found it.
    fn fail(&mut self, seq: u64, reason: String) {
        if self.first_break.as_ref().is_none_or(|b| seq < b.seq) {
            self.first_break = Some(Break { seq, reason });
        }
    }

    pub fn broken(&self) -> bool {
        self.first_break.is_some()
    }

    /// One stored event: its key in the store (if any), its stored hash (if
    /// any) and its canonical bytes.
    pub fn event(&mut self, key_seq: Option<u64>, stored_hash: Option<[u8; 32]>, bytes: &[u8]) {
        self.events += 1;
        if self.broken() {
            return;
        }
        let expected = self.next_seq;
        let pos: Position = match serde_json::from_slice(bytes) {
            Ok(p) => p,
            Err(e) => {
                return self.fail(
                    key_seq.unwrap_or(expected),
                    format!("unreadable event: {e}"),
                );
            }
        };
        if let Some(k) = key_seq
            && k != pos.seq
        {
            return self.fail(
                k,
                format!(
                    "stored as seq {k} but its content says seq {}: events moved or reordered",
                    pos.seq
                ),
            );
        }
        if pos.seq != expected {
            let why = if pos.seq > expected {
                format!(
                    "expected seq {expected}, found {}: events {expected}..{} are missing or out of order",
                    pos.seq,
                    pos.seq - 1
                )
            } else {
                format!(
                    "expected seq {expected}, found {}: events out of order or repeated",
                    pos.seq
                )
            };
            return self.fail(expected, why);
        }
        let hash = sha256(bytes);
        if stored_hash.is_some_and(|h| h != hash) {
            return self.fail(
                pos.seq,
                "the event's content does not match its hash (changed)".into(),
            );
        }
        if crate::hex::decode32(&pos.prev_hash) != Some(self.prev) {
            return self.fail(
                pos.seq,
                format!("prev_hash does not match the hash of event {}", pos.seq - 1),
            );
        }
        if let Some(cp) = self.checkpoints.get(&pos.seq)
            && cp.hash != hash
        {
            return self.fail(
                pos.seq,
                "the signed checkpoint at this seq names another hash".into(),
            );
        }
        if pos.kind == "chain.pruned"
            && let Ok(v) = serde_json::from_slice::<Value>(bytes)
        {
            let data = &v["data"];
            let text = |k: &str| data.get(k).and_then(Value::as_str).map(str::to_owned);
            self.archives.push(ArchiveMark {
                seq: pos.seq,
                through_seq: data.get("through_seq").and_then(Value::as_u64).unwrap_or(0),
                archive: text("archive"),
                archive_sha256: text("archive_sha256"),
            });
        }
        self.prev = hash;
        self.next_seq += 1;
    }

    /// One exported line (an event object with its `hash`).
    pub fn export_line(&mut self, v: &Value) {
        let Some(obj) = v.as_object() else {
            self.events += 1;
            return self.fail(self.next_seq, "a line that is not an object".into());
        };
        let stored = obj
            .get("hash")
            .and_then(Value::as_str)
            .and_then(crate::hex::decode32);
        let mut body = obj.clone();
        body.remove("hash");
        let mut bytes = Vec::new();
        if canonical(&Value::Object(body), &mut bytes).is_err() || stored.is_none() {
            self.events += 1;
            return self.fail(self.next_seq, "malformed event line".into());
        }
        self.event(None, stored, &bytes);
    }

    /// Finish; `head` is the head the store recorded, if verifying a store.
    pub fn finish(mut self, head: Option<(u64, [u8; 32])>) -> VerifyReport {
        let last_seq = self.next_seq - 1;
        if !self.broken()
            && let Some((&seq, _)) = self.checkpoints.range(last_seq + 1..).next()
        {
            self.fail(
                last_seq + 1,
                format!(
                    "truncated: a checkpoint covers seq {seq} but the chain ends at {last_seq}"
                ),
            );
        }
        if !self.broken()
            && let Some((hseq, hhash)) = head
            && (hseq != last_seq || hhash != self.prev)
        {
            self.fail(
                last_seq + 1,
                format!(
                    "truncated: the recorded head is seq {hseq} but the chain ends at {last_seq}"
                ),
            );
        }
        let mut verified = 0;
        let mut note = None;
        let trusted = self.trusted.clone();
        let cps: Vec<Checkpoint> = self.checkpoints.values().cloned().collect();
        match &trusted {
            Some(key) => {
                for cp in &cps {
                    if cp.verify(key) {
                        verified += 1;
                    } else {
                        self.fail(
                            cp.seq,
                            "forged checkpoint: its signature does not verify with the trusted key"
                                .into(),
                        );
                    }
                }
            }
            None => {
                note = Some(
                    "checkpoint signatures not checked: no trusted checkpoint key given".into(),
                );
            }
        }
        VerifyReport {
            ok: self.first_break.is_none(),
            events: self.events,
            base_seq: self.base_seq,
            last_seq,
            head_hash: crate::hex::encode(&self.prev),
            checkpoints: cps.len() as u64,
            checkpoints_verified: verified,
            first_break: self.first_break,
            note,
            archives: self.archives,
        }
    }
}

/// Verify an export file (JSON Lines: a `chain` header, `checkpoint`
/// lines, then events), in two passes: header and checkpoints, then events.
/// Needs nothing but the file, and the checkpoint public key to check
/// signatures.
pub fn verify_export_file(
    path: &std::path::Path,
    trusted: Option<Vec<u8>>,
) -> Result<VerifyReport, String> {
    use std::io::BufRead as _;
    let open = || {
        std::fs::File::open(path)
            .map(std::io::BufReader::new)
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let (mut base_seq, mut base_hash, mut checkpoints) = (0u64, [0u8; 32], Vec::new());
    for (n, line) in open()?.lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(h) = v.get("chain") {
            base_seq = h.get("base_seq").and_then(Value::as_u64).unwrap_or(0);
            base_hash = h
                .get("base_hash")
                .and_then(Value::as_str)
                .and_then(crate::hex::decode32)
                .ok_or_else(|| format!("line {}: a chain header without base_hash", n + 1))?;
        } else if let Some(c) = v.get("checkpoint") {
            checkpoints
                .push(Checkpoint::from_value(c).map_err(|e| format!("line {}: {e}", n + 1))?);
        }
    }
    let mut verifier = ChainVerifier::new(base_seq, base_hash, checkpoints, trusted);
    for line in open()?.lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if v.get("chain").is_some() || v.get("checkpoint").is_some() => {}
            Ok(v) => verifier.export_line(&v),
            Err(_) => verifier.export_line(&Value::Null),
        }
    }
    Ok(verifier.finish(None))
}
