//! A restart keeps every active lease and its deadline, and the reaper picks
//! up from the on-disk expiry index.

use std::time::Duration;

use crate::harness::{Harness, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_active_leases_and_deadlines() {
    let mut h = Harness::start(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    let t = h.tokens.a.clone();
    let task = h.open_task(&t, 3600).await;
    let mut before = Vec::new();
    for ttl in [30, 60, 300, 900] {
        let l = h.lease(&t, &task, ttl).await;
        before.push((
            l["lease_id"].as_str().unwrap().to_owned(),
            l["expires_at"].as_str().unwrap().to_owned(),
            l["credential"]["token"].as_str().unwrap().to_owned(),
        ));
    }
    let revoked = h.lease(&t, &task, 900).await;
    let revoked_id = revoked["lease_id"].as_str().unwrap().to_owned();
    h.post_empty(&t, &format!("/v1/leases/{revoked_id}/revoke"))
        .await;

    h.restart().await;

    for (id, exp, token) in &before {
        let (_, l) = h.get(&h.tokens.admin, &format!("/v1/leases/{id}")).await;
        assert_eq!(l["state"], "active", "{l}");
        assert_eq!(&l["expires_at"], exp);
        assert!(h.introspect(token).await);
    }
    assert_eq!(h.lease_state(&revoked_id).await, "revoked");
    assert!(
        !h.introspect(revoked["credential"]["token"].as_str().unwrap())
            .await,
        "revocations survive restart"
    );

    // the reaper resumes from the index after the restart
    h.advance(Duration::from_secs(61));
    h.wait_state(&before[0].0, "expired").await;
    h.wait_state(&before[1].0, "expired").await;
    assert_eq!(h.lease_state(&before[2].0).await, "active");
    // and the task can still be completed
    let (s, done) = h
        .post_empty(&t, &format!("/v1/tasks/{task}/complete"))
        .await;
    assert_eq!(s, reqwest::StatusCode::OK, "{done}");
    assert_eq!(done["revoked"].as_array().unwrap().len(), 2);
}
