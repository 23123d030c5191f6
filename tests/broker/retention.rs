//! Retention (`[retention]`): what ended before the window leaves the store
//! on the leader's schedule, in short batches each recorded on the chain;
//! old events go to a verified archive first; nothing live goes.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::{Harness, Options};

/// Every event on the chain now, in order.
async fn all_events(h: &Harness) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let (s, v) = h
            .get(
                &h.tokens.admin,
                &format!("/v1/events?after={after}&limit=1000"),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let page = v["events"].as_array().unwrap().clone();
        out.extend(page);
        match v["next_cursor"].as_u64() {
            Some(n) if n > after => after = n,
            _ => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_ended_before_the_window_leaves_in_recorded_batches_and_nothing_live_does() {
    let h = Harness::start(Options {
        manual_clock: true,
        tweak: Box::new(|c| {
            c.retention.keep_ended_seconds = 3600;
            c.retention.interval_seconds = 1;
            // several batches and several prune steps, even this small
            c.retention.batch_records = 7;
            c.retention.prune_step_events = 5;
            c.audit.prune_min_age_seconds = 3600;
        }),
        ..Options::default()
    })
    .await;
    let mut ended = Vec::new();
    for _ in 0..4 {
        let task = h.open_task(&h.tokens.a, 600).await;
        let lease = h.lease(&h.tokens.a, &task, 300).await;
        let (s, v) = h
            .post_empty(&h.tokens.a, &format!("/v1/tasks/{task}/complete"))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        ended.push((task, lease["lease_id"].as_str().unwrap().to_owned()));
    }
    // a task larger than a batch (10 leases and their calls): it leaves
    // over several, recorded as parts of it, its record with the last
    let big = h.open_task(&h.tokens.a, 600).await;
    let mut big_leases = Vec::new();
    for _ in 0..10 {
        let l = h.lease(&h.tokens.a, &big, 300).await;
        big_leases.push(l["lease_id"].as_str().unwrap().to_owned());
    }
    let (s, v) = h
        .post_empty(&h.tokens.a, &format!("/v1/tasks/{big}/complete"))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    ended.push((big.clone(), big_leases[9].clone()));
    // open, its deadline an hour on (inside the window at the sweep)
    let live = h.open_task(&h.tokens.a, 3600).await;
    let held = h.lease(&h.tokens.a, &live, 300).await;
    let held_id = held["lease_id"].as_str().unwrap().to_owned();
    let before = all_events(&h).await;
    let last_old = before.last().unwrap()["seq"].as_u64().unwrap();

    // inside the window nothing goes
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (s, _) = h
        .get(&h.tokens.admin, &format!("/v1/tasks/{}", ended[0].0))
        .await;
    assert_eq!(s, StatusCode::OK);

    // an hour and a half on: what ended at the start is half an hour
    // past the window
    h.advance(Duration::from_secs(5400));
    let mut gone = false;
    for _ in 0..100 {
        let (s, v) = h.get(&h.tokens.admin, "/v1/events/chain").await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let mut all = true;
        for (task, _) in &ended {
            let (s, _) = h.get(&h.tokens.admin, &format!("/v1/tasks/{task}")).await;
            all &= s == StatusCode::NOT_FOUND;
        }
        if all && v["base_seq"].as_u64() == Some(last_old) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gone,
        "retention removed the ended tasks and archived the old events"
    );
    for (_, lease) in &ended {
        let (s, _) = h.get(&h.tokens.admin, &format!("/v1/leases/{lease}")).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{lease} went with its task");
    }
    // the open task stays (its deadline is inside the window), with its
    // lease (expired meanwhile by the reaper), though its events were old
    // enough to be archived
    let (s, v) = h.get(&h.tokens.a, &format!("/v1/tasks/{live}")).await;
    // (shown as expired: past its deadline, but it ended inside the window)
    assert_eq!(
        (s, v["state"].as_str()),
        (StatusCode::OK, Some("expired")),
        "{v}"
    );
    assert_eq!(h.lease_state(&held_id).await, "expired");

    // on the chain: each batch, what it removed; each prune step, the
    // archive; nothing else changed and the rest verifies
    let events = all_events(&h).await;
    let removed: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "retention.removed")
        .collect();
    assert!(
        removed.len() >= 2,
        "batches of at most 7 records: {removed:?}"
    );
    let sum = |k: &str| -> u64 {
        removed
            .iter()
            .map(|e| e["data"][k].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!((sum("tasks"), sum("leases")), (5, 14), "{removed:?}");
    assert!(sum("calls") >= 14, "{removed:?}");
    for l in &big_leases {
        let (s, _) = h.get(&h.tokens.admin, &format!("/v1/leases/{l}")).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{l} went with its task");
    }
    // each batch names the first and last task it removed (ids made in
    // the same millisecond are not in creation order), or the one it
    // removed part of
    let parts: Vec<&&Value> = removed
        .iter()
        .filter(|e| e["data"]["part_of_task"].is_string())
        .collect();
    assert!(
        parts.len() >= 2
            && parts
                .iter()
                .all(|e| e["data"]["part_of_task"] == big.as_str()),
        "the large task went in parts: {removed:?}"
    );
    for e in &removed {
        let keys: &[&str] = if e["data"]["tasks"].as_u64() > Some(0) {
            &["first_task", "last_task"]
        } else {
            &["part_of_task"]
        };
        for k in keys {
            let t = e["data"][*k].as_str().unwrap();
            assert!(ended.iter().any(|(id, _)| id == t), "{e}");
        }
    }
    let pruned: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "chain.pruned")
        .collect();
    assert!(pruned.len() >= 2, "steps of at most 5 events: {pruned:?}");
    let archive = pruned[0]["data"]["archive"].as_str().unwrap();
    for p in &pruned {
        assert_eq!(p["data"]["archive"], archive);
        assert_eq!(p["data"]["by"], "retention");
        assert!(p["data"]["removed"].as_u64().unwrap() <= 5, "{p}");
    }
    assert_eq!(
        pruned
            .iter()
            .map(|p| p["data"]["removed"].as_u64().unwrap())
            .sum::<u64>(),
        last_old
    );
    assert_eq!(
        pruned.last().unwrap()["data"]["through_seq"].as_u64(),
        Some(last_old)
    );
    let (_, report) = h.get(&h.tokens.admin, "/v1/events/verify").await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["base_seq"].as_u64(), Some(last_old));
    // the archive verifies on its own and holds exactly what left
    let file = h.dir.path().join("archive").join(archive);
    let own = leasehold::cli::events::verify_export(&file, None).unwrap();
    assert!(own.ok && own.last_seq == last_old, "{own:?}");
    let lines = std::fs::read_to_string(&file).unwrap();
    let kept = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("seq").is_some())
        .count() as u64;
    assert_eq!(kept, last_old);
    assert!(
        !h.dir.path().join("archive").read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".partial")),
        "no half-written archive is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_off_or_without_an_archive_keeps_what_it_must() {
    // archiving asked for without an archive folder: refused at start
    let mut c = leasehold::dev::prepare(
        tempfile::tempdir().unwrap().path(),
        "127.0.0.1:0".parse().unwrap(),
        leasehold::clock::Clock::now(&leasehold::clock::SystemClock),
    )
    .unwrap()
    .0;
    c.audit.archive_dir = None;
    c.retention.archive_events = Some(true);
    let err = c.validate().unwrap_err().to_string();
    assert!(
        err.contains("retention.archive_events") && err.contains("archive_dir"),
        "{err}"
    );
    c.retention.archive_events = None;
    c.validate().unwrap();
    c.retention.keep_ended_seconds = 10;
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("retention.keep_ended_seconds"), "{err}");

    // off: an ended task stays however old
    let h = Harness::start(Options {
        manual_clock: true,
        tweak: Box::new(|c| {
            c.retention.enabled = false;
            c.retention.keep_ended_seconds = 60;
            c.retention.interval_seconds = 1;
        }),
        ..Options::default()
    })
    .await;
    let task = h.open_task(&h.tokens.a, 600).await;
    h.post_empty(&h.tokens.a, &format!("/v1/tasks/{task}/complete"))
        .await;
    h.advance(Duration::from_secs(3 * 86_400));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (s, _) = h.get(&h.tokens.admin, &format!("/v1/tasks/{task}")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        !all_events(&h)
            .await
            .iter()
            .any(|e| e["kind"] == "retention.removed" || e["kind"] == "chain.pruned")
    );
}
