//! Tampering, in the store file and in an export: a changed field, a deleted
//! event, reordered events, a truncated chain, a rewritten chain, a forged
//! checkpoint. Verification catches each and names the sequence number.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{ReadableDatabase as _, ReadableTable, TableDefinition};
use serde_json::Value;

use crate::harness::{Harness, Options};

/// Blocks of consecutive events, keyed by the seq of the last: `first seq
/// (u64 BE)`, then per event `hash (32) | task (16) | length (u32 BE) |
/// canonical bytes`; stored deflated (read through
/// `leasehold::store::plain_event_block`), rewritten plain here.
const BLOCKS: TableDefinition<u64, &[u8]> = TableDefinition::new("event_blocks");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const CHECKPOINTS: TableDefinition<u64, &[u8]> = TableDefinition::new("checkpoints");

/// A broker that recorded a few dozen events, stopped cleanly (so its last
/// checkpoint covers the head). Returns its data folder.
async fn recorded_chain() -> (tempfile::TempDir, u64) {
    let mut h = Harness::start(Options::default()).await;
    for _ in 0..3 {
        let task = h.open_task(&h.tokens.a, 600).await;
        for _ in 0..3 {
            h.lease(&h.tokens.a, &task, 300).await;
        }
        h.post_empty(&h.tokens.a, &format!("/v1/tasks/{task}/complete"))
            .await;
    }
    h.stop().await.unwrap();
    let dir = std::mem::replace(&mut h.dir, tempfile::tempdir().unwrap());
    let db = redb::Database::open(dir.path().join("leasehold.redb")).unwrap();
    let head = db
        .begin_read()
        .unwrap()
        .open_table(BLOCKS)
        .unwrap()
        .last()
        .unwrap()
        .unwrap()
        .0
        .value();
    (dir, head)
}

fn copy(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(format!("{name}.redb"));
    std::fs::copy(dir.join("leasehold.redb"), &p).unwrap();
    p
}

fn key(dir: &Path) -> Option<Vec<u8>> {
    Some(
        leasehold::audit::checkpoint::load_public_key(
            &std::fs::read(dir.join("checkpoint.pk8")).unwrap(),
        )
        .unwrap(),
    )
}

fn verify(path: &Path, dir: &Path) -> leasehold::audit::VerifyReport {
    leasehold::cli::events::verify_store_file(path, key(dir)).unwrap()
}

fn broke_at(r: &leasehold::audit::VerifyReport, seq: u64, why: &str) {
    assert!(!r.ok, "tampering went unnoticed: {r:?}");
    let b = r.first_break.as_ref().unwrap();
    assert_eq!(b.seq, seq, "{r:?}");
    assert!(b.reason.contains(why), "expected `{why}` in {:?}", b.reason);
}

/// The events of a blocks table, each as `hash (32) || task (16) || event`.
fn read_events(t: &impl ReadableTable<u64, &'static [u8]>) -> BTreeMap<u64, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in t.iter().unwrap() {
        let (_, v) = e.unwrap();
        let v = leasehold::store::plain_event_block(v.value()).unwrap();
        let mut seq = u64::from_be_bytes(v[..8].try_into().unwrap());
        let mut at = 8;
        while at < v.len() {
            let len = u32::from_be_bytes(v[at + 48..at + 52].try_into().unwrap()) as usize;
            let mut ev = v[at..at + 48].to_vec();
            ev.extend_from_slice(&v[at + 52..at + 52 + len]);
            out.insert(seq, ev);
            seq += 1;
            at += 52 + len;
        }
    }
    out
}

/// Store `events` as blocks, one per event (what an attacker who rewrites
/// the file may do: the layout is not what verification relies on).
fn write_events(t: &mut redb::Table<u64, &[u8]>, events: &BTreeMap<u64, Vec<u8>>) {
    let keys: Vec<u64> = t.iter().unwrap().map(|e| e.unwrap().0.value()).collect();
    for k in keys {
        t.remove(k).unwrap();
    }
    for (seq, ev) in events {
        let mut b = seq.to_be_bytes().to_vec();
        b.extend_from_slice(&ev[..48]);
        b.extend_from_slice(&((ev.len() - 48) as u32).to_be_bytes());
        b.extend_from_slice(&ev[48..]);
        t.insert(*seq, b.as_slice()).unwrap();
    }
}

/// Apply `f` to the events of `path`, as `hash || task || event` by seq.
fn with_events(path: &Path, f: impl FnOnce(&mut BTreeMap<u64, Vec<u8>>)) {
    let db = redb::Database::open(path).unwrap();
    let t = db.begin_write().unwrap();
    {
        let mut blocks = t.open_table(BLOCKS).unwrap();
        let mut events = read_events(&blocks);
        f(&mut events);
        write_events(&mut blocks, &events);
    }
    t.commit().unwrap();
}

fn get(t: &BTreeMap<u64, Vec<u8>>, seq: u64) -> Vec<u8> {
    t[&seq].clone()
}

/// Rewrite events from `from` on, re-hashing and re-linking everything as
/// an attacker without the checkpoint key would; `edit` changes the first.
fn rewrite_from(path: &Path, from: u64, edit: impl Fn(&mut Value)) {
    let db = redb::Database::open(path).unwrap();
    let t = db.begin_write().unwrap();
    {
        let mut blocks = t.open_table(BLOCKS).unwrap();
        let mut events = read_events(&blocks);
        let mut prev: [u8; 32] = get(&events, from - 1)[..32].try_into().unwrap();
        let last = *events.keys().last().unwrap();
        for seq in from..=last {
            let v = get(&events, seq);
            let mut ev: Value = serde_json::from_slice(&v[48..]).unwrap();
            if seq == from {
                edit(&mut ev);
            }
            ev["prev_hash"] = Value::String(leasehold::hex::encode(&prev));
            let mut bytes = Vec::new();
            leasehold::audit::canonical(&ev, &mut bytes).unwrap();
            let hash = leasehold::audit::sha256(&bytes);
            let mut nv = hash.to_vec();
            nv.extend_from_slice(&v[32..48]);
            nv.extend_from_slice(&bytes);
            events.insert(seq, nv);
            prev = hash;
        }
        write_events(&mut blocks, &events);
        let mut meta = t.open_table(META).unwrap();
        let mut head = last.to_be_bytes().to_vec();
        head.extend_from_slice(&prev);
        meta.insert("chain_head", head.as_slice()).unwrap();
    }
    t.commit().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_the_store_is_caught_and_located() {
    let (dir, head) = recorded_chain().await;
    let d = dir.path();
    let clean = verify(&d.join("leasehold.redb"), d);
    assert!(clean.ok, "{clean:?}");
    assert_eq!(clean.last_seq, head);
    assert!(
        clean.checkpoints >= 1 && clean.checkpoints_verified == clean.checkpoints,
        "{clean:?}"
    );

    let k = 5;
    // a changed field
    let p = copy(d, "changed");
    with_events(&p, |t| {
        let mut v = get(t, k);
        // the value is hash (32) || task (16) || the event; change the event only
        let text = String::from_utf8(v.split_off(48))
            .unwrap()
            .replace("assistant-a", "assistant-z");
        v.extend_from_slice(text.as_bytes());
        t.insert(k, v);
    });
    broke_at(&verify(&p, d), k, "changed");

    // a deleted event
    let p = copy(d, "deleted");
    with_events(&p, |t| {
        t.remove(&k).unwrap();
    });
    broke_at(&verify(&p, d), k, "missing");

    // two events swapped
    let p = copy(d, "reordered");
    with_events(&p, |t| {
        let (a, b) = (get(t, k), get(t, k + 1));
        t.insert(k, b);
        t.insert(k + 1, a);
    });
    broke_at(&verify(&p, d), k, "reordered");

    // the last events cut off (the head and the final checkpoint remember)
    let p = copy(d, "truncated");
    with_events(&p, |t| {
        for seq in head - 2..=head {
            t.remove(&seq).unwrap();
        }
    });
    broke_at(&verify(&p, d), head - 2, "truncated");

    // a block whose framing is broken (an event's length overstated): the
    // break is at the block's first event, where the readable events end
    let p = copy(d, "unreadable");
    let first = {
        let db = redb::Database::open(&p).unwrap();
        let t = db.begin_write().unwrap();
        let first = {
            let mut blocks = t.open_table(BLOCKS).unwrap();
            let key = blocks
                .range(k..)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .0
                .value();
            let mut b =
                leasehold::store::plain_event_block(blocks.get(key).unwrap().unwrap().value())
                    .unwrap();
            let first = u64::from_be_bytes(b[..8].try_into().unwrap());
            assert!(first <= k && k <= key);
            b[8 + 48..8 + 52].copy_from_slice(&u32::MAX.to_be_bytes());
            blocks.insert(key, b.as_slice()).unwrap();
            first
        };
        t.commit().unwrap();
        first
    };
    broke_at(&verify(&p, d), first, "unreadable events");

    // a consistent rewrite from seq k: only the signed checkpoint betrays it
    let p = copy(d, "rewritten");
    rewrite_from(&p, k, |ev| {
        ev["links"]["workload"] = "dev:someone-else".into()
    });
    let r = verify(&p, d);
    assert!(!r.ok);
    assert!(
        r.first_break
            .as_ref()
            .unwrap()
            .reason
            .contains("checkpoint"),
        "{r:?}"
    );
    assert!(r.first_break.as_ref().unwrap().seq >= k);

    // ...and re-signing the checkpoint with another key is a forgery
    let p = copy(d, "forged");
    rewrite_from(&p, k, |ev| {
        ev["links"]["workload"] = "dev:someone-else".into()
    });
    {
        let db = redb::Database::open(&p).unwrap();
        let t = db.begin_write().unwrap();
        {
            let events = read_events(&t.open_table(BLOCKS).unwrap());
            let mut cps = t.open_table(CHECKPOINTS).unwrap();
            let seqs: Vec<u64> = cps.iter().unwrap().map(|e| e.unwrap().0.value()).collect();
            let doc = leasehold_provider_token::generate_signing_key().unwrap();
            let evil = leasehold::audit::CheckpointKey::from_pkcs8(&doc).unwrap();
            for seq in seqs {
                let hash: [u8; 32] = get(&events, seq)[..32].try_into().unwrap();
                let cp = evil.sign(seq, hash, "2026-01-01T00:00:00Z".into());
                let mut bytes = Vec::new();
                leasehold::audit::canonical(&cp.to_value(), &mut bytes).unwrap();
                cps.insert(seq, bytes.as_slice()).unwrap();
            }
        }
        t.commit().unwrap();
    }
    let r = verify(&p, d);
    assert!(!r.ok);
    assert!(
        r.first_break
            .as_ref()
            .unwrap()
            .reason
            .contains("forged checkpoint"),
        "{r:?}"
    );
    // without the trusted key the forgery verifies: the key is the point
    assert!(
        leasehold::cli::events::verify_store_file(&p, None)
            .unwrap()
            .ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_verify_and_tampered_exports_do_not() {
    let mut h = Harness::start(Options::default()).await;
    for _ in 0..2 {
        let task = h.open_task(&h.tokens.a, 600).await;
        h.lease(&h.tokens.a, &task, 300).await;
        h.post_empty(&h.tokens.a, &format!("/v1/tasks/{task}/complete"))
            .await;
    }
    // a checkpoint inside the export
    h.restart().await;
    let task = h.open_task(&h.tokens.a, 600).await;
    h.lease(&h.tokens.a, &task, 300).await;
    let out = h.dir.path().join("export.jsonl");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["events", "export", "--as", "admin", "--out"])
        .arg(&out)
        .env(
            "LEASEHOLD_CREDENTIALS",
            h.dir.path().join("dev-credentials.json"),
        )
        .status()
        .unwrap();
    assert!(status.success());
    let d = h.dir.path();
    let ok = leasehold::cli::events::verify_export(&out, key(d)).unwrap();
    assert!(ok.ok, "{ok:?}");
    assert!(ok.checkpoints_verified >= 1, "{ok:?}");
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["events", "verify", "--export"])
        .arg(&out)
        .arg("--checkpoint-key")
        .arg(d.join("checkpoint.pk8"))
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stdout)
    );

    let lines: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let events: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("\"prev_hash\""))
        .collect();
    let seq_of = |i: usize| {
        serde_json::from_str::<Value>(&lines[i]).unwrap()["seq"]
            .as_u64()
            .unwrap()
    };
    let write = |name: &str, ls: &[String]| {
        let p = d.join(name);
        std::fs::write(&p, ls.join("\n") + "\n").unwrap();
        leasehold::cli::events::verify_export(&p, key(d)).unwrap()
    };
    let k = events[3];

    let mut changed = lines.clone();
    changed[k] = changed[k].replace("alice@example.com", "mallory@example.com");
    broke_at(&write("changed.jsonl", &changed), seq_of(k), "changed");

    let mut deleted = lines.clone();
    deleted.remove(k);
    broke_at(&write("deleted.jsonl", &deleted), seq_of(k), "missing");

    let mut reordered = lines.clone();
    reordered.swap(k, k + 1);
    broke_at(
        &write("reordered.jsonl", &reordered),
        seq_of(k),
        "out of order",
    );

    // cut the events after the first checkpoint's seq away, keep the checkpoint lines
    let cp_seq = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["checkpoint"]["seq"].as_u64())
        .min()
        .unwrap();
    let truncated: Vec<String> = lines
        .iter()
        .filter(|l| !l.contains("\"prev_hash\"") || seq_of_line(l) < cp_seq)
        .cloned()
        .collect();
    broke_at(&write("truncated.jsonl", &truncated), cp_seq, "truncated");

    let mut forged = lines.clone();
    let ci = forged
        .iter()
        .position(|l| l.contains("\"checkpoint\""))
        .unwrap();
    let mut cp: Value = serde_json::from_str(&forged[ci]).unwrap();
    let doc = leasehold_provider_token::generate_signing_key().unwrap();
    let evil = leasehold::audit::CheckpointKey::from_pkcs8(&doc).unwrap();
    let real = leasehold::audit::Checkpoint::from_value(&cp["checkpoint"]).unwrap();
    cp["checkpoint"] = evil.sign(real.seq, real.hash, real.time.clone()).to_value();
    forged[ci] = cp.to_string();
    broke_at(
        &write("forged.jsonl", &forged),
        real.seq,
        "forged checkpoint",
    );
}

fn seq_of_line(l: &str) -> u64 {
    serde_json::from_str::<Value>(l).unwrap()["seq"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_events_are_archived_and_pruned_and_the_rest_still_verifies() {
    let h = Harness::start(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    for _ in 0..4 {
        let task = h.open_task(&h.tokens.a, 600).await;
        h.lease(&h.tokens.a, &task, 300).await;
    }
    let (_, chain) = h.get(&h.tokens.admin, "/v1/events/chain").await;
    let head = chain["head_seq"].as_u64().unwrap();
    let through = head - 3;
    // fresh events are kept (audit.prune_min_age_seconds, 7 days by default)
    let (s, e) = h
        .post(
            &h.tokens.admin,
            "/v1/events/archive",
            serde_json::json!({"through_seq": through}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (reqwest::StatusCode::BAD_REQUEST, Some("prune_too_recent")),
        "{e}"
    );
    // eight days on, they may go
    h.advance(std::time::Duration::from_secs(8 * 86_400));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let archive = h.dir.path().join("archive.jsonl");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args([
            "events",
            "archive",
            "--as",
            "admin",
            "--through",
            &through.to_string(),
            "--out",
        ])
        .arg(&archive)
        .env(
            "LEASEHOLD_CREDENTIALS",
            h.dir.path().join("dev-credentials.json"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // the operator's copy, and the broker's own archive, both verify
    let archived = leasehold::cli::events::verify_export(&archive, None).unwrap();
    assert!(archived.ok && archived.last_seq == through, "{archived:?}");
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let own = std::path::PathBuf::from(answer["archive"].as_str().unwrap());
    assert!(
        own.starts_with(h.dir.path()),
        "in audit.archive_dir: {answer}"
    );
    let own_report = leasehold::cli::events::verify_export(&own, None).unwrap();
    assert!(
        own_report.ok && own_report.last_seq == through,
        "{own_report:?}"
    );
    assert_eq!(own_report.head_hash, archived.head_hash);
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&own).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let sha = ring::digest::digest(&ring::digest::SHA256, &std::fs::read(&own).unwrap());
    let sha: String = sha.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(answer["sha256"], sha.as_str());
    assert!(
        answer["checkpoint_seq"].as_u64().unwrap() > through,
        "a checkpoint over the new head: {answer}"
    );

    let (_, chain) = h.get(&h.tokens.admin, "/v1/events/chain").await;
    assert_eq!(chain["base_seq"], through);
    assert_eq!(chain["base_hash"], archived.head_hash.as_str());
    let (_, v) = h.get(&h.tokens.admin, "/v1/events?limit=1000").await;
    let first = v["events"][0]["seq"].as_u64().unwrap();
    assert_eq!(first, through + 1, "archived events are gone");
    let pruned = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "chain.pruned")
        .unwrap();
    assert_eq!(pruned["data"]["archive_sha256"], sha.as_str(), "{pruned}");
    assert_eq!(
        pruned["data"]["archive"],
        own.file_name().unwrap().to_str().unwrap()
    );
    let (_, report) = h.get(&h.tokens.admin, "/v1/events/verify").await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["base_seq"], through);
    // verify names the archive the pruned events went to
    let mark = &report["archives"][0];
    assert_eq!(mark["through_seq"], through, "{report}");
    assert_eq!(mark["archive_sha256"], sha.as_str(), "{report}");
    assert_eq!(mark["archive"], own.file_name().unwrap().to_str().unwrap());

    // only what exists, and only by an admin; there is no pruning without
    // the broker's own archive
    let (s, _) = h
        .post(
            &h.tokens.admin,
            "/v1/events/archive",
            serde_json::json!({"through_seq": through}),
        )
        .await;
    assert_eq!(s, reqwest::StatusCode::BAD_REQUEST);
    let (s, _) = h
        .post(
            &h.tokens.responder,
            "/v1/events/archive",
            serde_json::json!({"through_seq": through + 1}),
        )
        .await;
    assert_eq!(s, reqwest::StatusCode::FORBIDDEN);
    let (s, _) = h
        .post(
            &h.tokens.admin,
            "/v1/events/prune",
            serde_json::json!({"through_seq": through + 1, "last_hash": "00".repeat(32)}),
        )
        .await;
    assert_eq!(
        s,
        reqwest::StatusCode::NOT_FOUND,
        "the client-side prune is gone"
    );
}
