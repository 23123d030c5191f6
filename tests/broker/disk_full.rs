//! A full disk: the store's own small filesystem (a tmpfs this test mounts,
//! as root) filled until writes are refused. Refused writes answer 503
//! `store_full` with `Retry-After` and write nothing; reads, introspection
//! and health go on; readiness and the metric say why; freeing space
//! resumes writes by themselves; nothing acknowledged is lost across a
//! restart and the chain verifies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Harness, Options};

/// A tmpfs of `mib` MiB at a fresh directory, unmounted when dropped.
struct Mounted {
    dir: tempfile::TempDir,
}

impl Mounted {
    fn new(mib: u64) -> Self {
        let uid = std::process::Command::new("id").arg("-u").output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "this test mounts a small tmpfs of its own and needs root: run the suite as root \
             (integration/test.sh in CI does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(self.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

async fn open(h: &Harness) -> (StatusCode, Value, Option<String>) {
    let r = h
        .http
        .post(h.url("/v1/tasks"))
        .bearer_auth(&h.tokens.a)
        .json(
            &json!({"purpose": "fill the disk", "on_behalf_of": "alice@example.com",
            "prompt": "p".repeat(2000), "tools": ["demo.read"], "ttl_seconds": 3600}),
        )
        .send()
        .await
        .unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (r.status(), r.json().await.unwrap(), retry)
}

async fn metric(h: &Harness, name: &str) -> f64 {
    let text = h.metrics().await;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(f64::NAN, |v| v.parse().unwrap())
}

/// Below `store.reserve_mib`, writes are refused while room is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_keeps_reads_and_recovers_by_itself() {
    full_disk(8, 12).await;
}

/// Without a reserve the log's own growth meets ENOSPC: still a clean
/// refusal, never a failed commit, and the same recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_reserve_the_logs_enospc_is_a_refusal_too() {
    full_disk(0, 4).await;
}

/// Fill the store's filesystem to `room_mib` free, write until refused.
async fn full_disk(reserve_mib: u64, room_mib: u64) {
    let fs = Mounted::new(48);
    let store: PathBuf = fs.path().join("leasehold.redb");
    let mut h = Harness::start(Options {
        tweak: Box::new(move |c| {
            c.store.path = store.clone();
            c.store.reserve_mib = reserve_mib;
        }),
        ..Options::default()
    })
    .await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let lease = h.lease(&h.tokens.a, &task, 600).await;
    let token = lease["credential"]["token"].as_str().unwrap().to_owned();

    let filler = fs.path().join("filler");
    let fill = fs.free().saturating_sub(room_mib << 20);
    std::fs::write(&filler, vec![0u8; usize::try_from(fill).unwrap()]).unwrap();

    let mut acked = Vec::new();
    let mut refused = None;
    for _ in 0..20_000 {
        let (s, v, retry) = open(&h).await;
        if s == StatusCode::CREATED {
            acked.push(v["task_id"].as_str().unwrap().to_owned());
            continue;
        }
        refused = Some((s, v, retry));
        break;
    }
    let (s, v, retry) = refused.expect("writes were never refused");
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "store_full", "{v}");
    assert_eq!(retry.as_deref(), Some("30"));
    assert!(!acked.is_empty(), "some writes fit before the reserve");
    if reserve_mib > 0 {
        assert!(
            fs.free() >= (reserve_mib / 2) << 20,
            "refused while the reserve was still there"
        );
    }

    // every write is refused, and leaves nothing: a lease, a completion
    let before = h.get(&h.tokens.admin, "/v1/leases?limit=1000").await.1["leases"]
        .as_array()
        .unwrap()
        .len();
    let (s, v) = h
        .post(
            &h.tokens.a,
            &format!("/v1/tasks/{task}/leases"),
            json!({"provider": "token", "role": "demo", "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "store_full");
    let after = h.get(&h.tokens.admin, "/v1/leases?limit=1000").await.1["leases"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, after, "the refused lease left nothing");
    let (s, v) = h
        .post_empty(&h.tokens.a, &format!("/v1/tasks/{task}/complete"))
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(
        h.lease_state(lease["lease_id"].as_str().unwrap()).await,
        "active"
    );

    // reads, introspection and health go on; readiness and the metric say why
    let (s, _) = h.get(&h.tokens.a, &format!("/v1/tasks/{task}")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h.introspect(&token).await);
    let (s, _) = h.get("", "/v1/health").await;
    assert_eq!(s, StatusCode::OK);
    let (s, ready) = h.get("", "/v1/ready").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_eq!(ready["checks"]["store"], "full", "{ready}");
    assert_eq!(metric(&h, "leasehold_store_disk_full").await, 1.0);
    assert!(metric(&h, "leasehold_store_writes_refused_no_space_total").await >= 3.0);

    // space comes back: writes resume by themselves
    std::fs::remove_file(&filler).unwrap();
    let mut resumed = false;
    for _ in 0..100 {
        let (s, v, _) = open(&h).await;
        if s == StatusCode::CREATED {
            acked.push(v["task_id"].as_str().unwrap().to_owned());
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(resumed, "writes did not resume");
    assert_eq!(metric(&h, "leasehold_store_disk_full").await, 0.0);
    let (s, ready) = h.get("", "/v1/ready").await;
    assert_eq!(s, StatusCode::OK, "{ready}");

    // nothing acknowledged is lost, and the chain verifies
    h.restart().await;
    for id in acked
        .iter()
        .step_by(acked.len().div_ceil(50).max(1))
        .chain(acked.last())
    {
        let (s, v) = h.get(&h.tokens.a, &format!("/v1/tasks/{id}")).await;
        assert_eq!(s, StatusCode::OK, "{id}: {v}");
    }
    let (s, v) = h.get(&h.tokens.admin, "/v1/events/verify").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    drop(h);
}
