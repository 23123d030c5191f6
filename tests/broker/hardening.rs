//! Issue 34's findings, each reproduced as the attacker did it: one
//! workload holding thousands of long-polls must not shed anyone else; a
//! flood of failed authentications from a shared address must not keep the
//! genuine callers behind it out.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Harness, Options};

async fn pending_approval(h: &Harness, token: &str) -> String {
    let (s, v) = h
        .post(token, "/v1/tasks", json!({"purpose": "triage", "on_behalf_of": "alice@example.com", "prompt": "p", "tools": ["demo.write"], "ttl_seconds": 3600}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let task = v["task_id"].as_str().unwrap().to_owned();
    let body = json!({"tool": "demo.write", "action": "run", "resource": "ticket:1", "arguments_sha256": "ab".repeat(32)});
    let (s, v) = h
        .post(token, &format!("/v1/tasks/{task}/calls"), body)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    v["approval_id"].as_str().unwrap().to_owned()
}

/// Finding 1: a workload with one pending approval opened 4,200 long-polls
/// and every other caller got `503 overloaded` for ~29 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_workload_s_long_polls_cannot_shed_the_others() {
    let h = Harness::start(Options {
        tweak: Box::new(|c| {
            c.server.rate_limits.max_in_flight = 400;
            c.server.rate_limits.per_caller_in_flight = 100;
            c.server.rate_limits.per_caller_long_polls = 20;
            // the connections themselves are let in: this is about requests
            c.server.connections.max = 4000;
            c.server.connections.per_address = 2000;
        }),
        ..Options::default()
    })
    .await;
    let approval = pending_approval(&h, &h.tokens.b).await;
    // 1,000 long-polls from workload b, all at once
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut polls = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let (http, url, b) = (
            http.clone(),
            h.url(&format!("/v1/approvals/{approval}?wait=8")),
            h.tokens.b.clone(),
        );
        polls.spawn(async move {
            let t = Instant::now();
            let r = http.get(url).bearer_auth(b).send().await.unwrap();
            let retry = r.headers().contains_key("retry-after");
            let status = r.status();
            let v: Value = r.json().await.unwrap();
            (status, retry, v, t.elapsed())
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // meanwhile workload a opens tasks and the responder reads stats, at normal latency
    for _ in 0..10 {
        let t = Instant::now();
        let (s, v) = h
            .post(&h.tokens.a, "/v1/tasks", json!({"purpose": "p", "on_behalf_of": "bob@example.com", "prompt": "x", "ttl_seconds": 60}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        let (s, v) = h.get(&h.tokens.responder, "/v1/stats").await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (mut held, mut refused) = (0, 0);
    while let Some(r) = polls.join_next().await {
        let (status, retry, v, took) = r.unwrap();
        match status {
            StatusCode::OK => held += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(v["error"]["code"], "caller_over_share", "{v}");
                assert!(retry, "429 carries Retry-After");
                assert!(
                    took < Duration::from_secs(5),
                    "refused at once, not after waiting: {took:?}"
                );
                refused += 1;
            }
            other => panic!("{other}: {v}"),
        }
    }
    assert!(held <= 20, "{held} long-polls held, the cap is 20");
    assert_eq!(held + refused, 1000);
}

/// Finding 3: 21 bad tokens from one address, then genuine workload and
/// admin requests from the same address were all `429 auth_rate_limited`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_flood_from_a_shared_address_does_not_keep_genuine_callers_out() {
    let h = Harness::start(Options::default()).await;
    // the operator has used its token before the flood (it is long-lived);
    // the workload's JWT carries a signature a guess cannot
    let (s, _) = h.get(&h.tokens.admin, "/v1/stats").await;
    assert_eq!(s, StatusCode::OK);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = {
        let (http, url, stop) = (h.http.clone(), h.url("/v1/tasks"), stop.clone());
        tokio::spawn(async move {
            let (mut n, mut limited, t) = (0u32, 0u32, Instant::now());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = http
                    .post(url.clone())
                    .bearer_auth(format!("guess-{n}"))
                    .json(&json!({}))
                    .send()
                    .await
                    .unwrap();
                limited += u32::from(r.status() == StatusCode::TOO_MANY_REQUESTS);
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await; // 50 failures/s
            }
            (n, limited, t.elapsed().as_secs_f64())
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..10 {
        let (s, v) = h
            .post(&h.tokens.a, "/v1/tasks", json!({"purpose": "p", "on_behalf_of": "bob@example.com", "prompt": "x", "ttl_seconds": 60}))
            .await;
        assert_eq!(
            s,
            StatusCode::CREATED,
            "the genuine workload is kept out: {v}"
        );
        let (s, v) = h.get(&h.tokens.admin, "/v1/stats").await;
        assert_eq!(s, StatusCode::OK, "the genuine operator is kept out: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (n, limited, secs) = attacker.await.unwrap();
    // guessing stays throttled: past the burst (20) and the rate (5/s), the
    // guesses are refused unread
    let verified = f64::from(n - limited);
    assert!(
        verified <= 20.0 + 5.0 * secs + 1.0,
        "{} of {n} guesses verified in {secs:.1} s",
        n - limited
    );
    assert!(
        f64::from(n) >= 30.0 * secs,
        "the flood ran at about 50/s: {n} in {secs:.1} s"
    );
    // a token never seen before, not a JWT, from the flooding address still waits
    let r = h
        .http
        .get(h.url("/v1/stats"))
        .bearer_auth(&h.tokens.responder)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
}

/// Finding 6: a revocation `reason` of `x by=operator:admin fence=true
/// job_id=job_FORGED` produced a text log line that read as if an admin
/// had started a fenced job with a forged id; U+2028 passed raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_text_cannot_forge_fields_or_lines_in_the_text_log() {
    let mut b = crate::harness::spawn_broker(|_| {}, "info", &[]).await;
    let responder = b.creds.identities["responder"].token.clone();
    let forged = "x by=operator:admin fence=true job_id=job_FORGED";
    for reason in [
        forged,
        "line one\u{2028}job_id=job_FORGED2 by=operator:admin",
    ] {
        let v = b
            .remote
            .post(
                &responder,
                "/v1/revocations",
                Some(json!({"workload": "nobody:none", "reason": reason})),
            )
            .await;
        assert!(v["job_id"].is_string(), "{v}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    b.child.terminate();
    let log = std::fs::read_to_string(&b.log).unwrap();
    let started: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("mass revocation started"))
        .collect();
    assert_eq!(started.len(), 2, "{log}");
    assert!(
        started[0].contains(&format!("reason=\"{forged}\"")),
        "the reason is one quoted value: {}",
        started[0]
    );
    assert!(
        started[0].contains("by=operator:responder"),
        "{}",
        started[0]
    );
    assert!(
        started[1].contains("reason=\"line one\\u{2028}job_id=job_FORGED2 by=operator:admin\""),
        "{}",
        started[1]
    );
    assert!(!log.contains('\u{2028}'), "U+2028 reached the log raw");
}

async fn open_for(h: &Harness, user: &str) -> (StatusCode, Value) {
    h.post(&h.tokens.a, "/v1/tasks", json!({"purpose": "triage", "on_behalf_of": user, "prompt": "p", "tools": ["demo.write"], "ttl_seconds": 3600}))
        .await
}

/// Finding 4: the approver `approver@example.com` could approve calls of
/// tasks opened for `Approver@Example.com`, `APPROVER@EXAMPLE.COM`, the
/// address with a trailing space, a zero-width space or a Cyrillic `а`; a
/// fence on `victim@example.com` did not stop `Victim@example.com` or a
/// trailing space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_compare_as_people_mean_them() {
    let h = Harness::start(Options::default()).await;
    // the dev approver is approver@example.com: every variant is them
    for variant in [
        "Approver@Example.com",
        "APPROVER@EXAMPLE.COM",
        "approver@example.com ",
        "ａｐｐｒｏｖｅｒ@example.com",
    ] {
        let (s, v) = open_for(&h, variant).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let task = v["task_id"].as_str().unwrap().to_owned();
        let (_, t) = h.get(&h.tokens.a, &format!("/v1/tasks/{task}")).await;
        assert_eq!(
            t["on_behalf_of"], "approver@example.com",
            "stored canonical: {t}"
        );
        let body = json!({"tool": "demo.write", "action": "run", "resource": "x", "arguments_sha256": "ab".repeat(32)});
        let (_, c) = h
            .post(&h.tokens.a, &format!("/v1/tasks/{task}/calls"), body)
            .await;
        let approval = c["approval_id"].as_str().unwrap();
        let (s, v) = h
            .post(
                &h.tokens.approver,
                &format!("/v1/approvals/{approval}/approve"),
                json!({}),
            )
            .await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("self_approval")),
            "{variant}: {v}"
        );
    }
    // invisible characters and mixed scripts are refused, not accepted
    for variant in [
        "approver\u{200B}@example.com",
        "\u{0430}pprover@example.com",
        "appro\u{00AD}ver@example.com",
    ] {
        let (s, v) = open_for(&h, variant).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_user")),
            "{variant:?}: {v}"
        );
    }
    // a fence on a user holds for every way of writing them
    let (s, v) = h
        .post(
            &h.tokens.responder,
            "/v1/revocations",
            json!({"user": "Victim@Example.com", "fence": true, "reason": "incident 7"}),
        )
        .await;
    assert!(s.is_success(), "{v}");
    for variant in [
        "victim@example.com",
        "Victim@example.com",
        "victim@example.com ",
        "VICTIM@EXAMPLE.COM",
    ] {
        let (s, v) = open_for(&h, variant).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{variant}: {v}");
    }
    let (_, fences) = h.get(&h.tokens.responder, "/v1/fences").await;
    assert!(
        fences.to_string().contains("victim@example.com"),
        "the fence is recorded canonical: {fences}"
    );
    // and lifting it with another spelling lifts it
    let (s, v) = h
        .post(
            &h.tokens.responder,
            "/v1/fences/lift",
            json!({"kind": "user", "value": "VICTIM@example.com", "reason": "resolved"}),
        )
        .await;
    assert!(s.is_success(), "{v}");
    let (s, v) = open_for(&h, "victim@example.com").await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

/// A `leasehold serve` child whose open-file limit is `nofile`.
async fn broker_with_fd_limit(
    nofile: u32,
    tweak: impl FnOnce(&mut leasehold::config::Config),
) -> (
    tempfile::TempDir,
    crate::harness::Child,
    crate::harness::Remote,
    leasehold::dev::DevCredentials,
) {
    let dir = tempfile::tempdir().unwrap();
    let addr = crate::harness::free_port();
    let (config, creds) = crate::harness::child_config(dir.path(), addr, tweak);
    let log = dir.path().join("broker.log");
    let err = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new("bash")
        .args([
            "-c",
            &format!("ulimit -n {nofile} && exec \"$0\" serve -c \"$1\""),
        ])
        .arg(env!("CARGO_BIN_EXE_leasehold"))
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let mut child = crate::harness::Child { child, addr, log };
    let remote = crate::harness::Remote::new(addr);
    child.wait_healthy(&remote.http).await;
    (dir, child, remote, creds)
}

/// A connected socket from `from` (another loopback address than the
/// genuine callers'), or `None` when the broker refused it.
async fn connect_from(from: &str, to: std::net::SocketAddr) -> Option<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    s.connect(to).await.ok()
}

/// Whether the broker has closed `s` (EOF or reset) within `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {} // an answer (408, 400): keep reading to the close
        }
    }
}

/// Finding 2: 1,000 idle sockets and 200 slow-header sockets were never
/// closed, and under a 1,024 descriptor limit 1,100 idle sockets made
/// `/v1/health` time out for 25 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_sockets_are_capped_and_closed_and_the_broker_keeps_answering() {
    let (_dir, mut child, remote, creds) = broker_with_fd_limit(1024, |c| {
        c.server.connections.per_address = 200;
        c.server.connections.header_timeout_seconds = 2;
    })
    .await;
    let addr = child.addr;
    // an idle flood from one address: 1,100 sockets, more than the descriptors
    let mut idle = Vec::new();
    for _ in 0..1100 {
        if let Some(s) = connect_from("127.0.0.2", addr).await {
            idle.push(s);
        }
    }
    // probes and genuine callers (another address) keep being answered, at once
    let token = creds.identities["assistant-a"].token.clone();
    for _ in 0..5 {
        let t = Instant::now();
        let r = remote
            .http
            .get(format!("{}/v1/health", remote.base))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let v = remote
            .post(&token, "/v1/tasks", Some(json!({"purpose": "p", "on_behalf_of": "bob@example.com", "prompt": "x", "ttl_seconds": 60})))
            .await;
        assert!(v["task_id"].is_string(), "{v}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    // the flood got at most its address's share; the rest were closed as they came
    let mut refused = 0;
    for s in idle.iter_mut().skip(200) {
        refused += usize::from(closed_within(s, Duration::from_millis(200)).await);
    }
    assert!(
        refused >= 890,
        "{refused} of the 900 over the cap were closed"
    );
    // and the 200 let in are closed once idle for the header timeout (2 s)
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut closed = 0;
    for s in idle.iter_mut().take(200) {
        closed += usize::from(closed_within(s, Duration::from_secs(2)).await);
    }
    assert_eq!(
        closed, 200,
        "idle sockets are closed after the header timeout"
    );
    drop(idle);

    // slowloris: headers a byte at a time, never finished
    let mut slow = Vec::new();
    for _ in 0..50 {
        slow.push(connect_from("127.0.0.3", addr).await.unwrap());
    }
    let started = Instant::now();
    let mut alive = slow.len();
    let request = b"POST /v1/tasks HTTP/1.1\r\nhost: x\r\nx-slow: ";
    let mut i = 0;
    while alive > 0 && started.elapsed() < Duration::from_secs(6) {
        use tokio::io::AsyncWriteExt as _;
        alive = 0;
        for s in &mut slow {
            if s.write_all(&request[i % request.len()..=i % request.len()])
                .await
                .is_ok()
                && s.flush().await.is_ok()
            {
                alive += 1;
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut closed = 0;
    for s in &mut slow {
        closed += usize::from(closed_within(s, Duration::from_millis(500)).await);
    }
    assert_eq!(
        closed, 50,
        "slow-header sockets are cut off after the header timeout"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let log = std::fs::read_to_string(&child.log).unwrap();
    assert!(
        log.contains("connection refused: server.connections cap reached"),
        "a clear log line"
    );
    let metrics = remote
        .http
        .get(format!("{}/metrics", remote.base))
        .bearer_auth(&creds.identities["admin"].token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("leasehold_connections_refused_total{cap=\"per_address\"}"),
        "{metrics}"
    );
    child.terminate();
}

/// Finding 5: an admin pruned the chain to its head (events two minutes
/// old included) with `through_seq` and `last_hash` read from the API, and
/// `verify` then reported `ok` over one event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_cannot_erase_recent_events_through_the_api() {
    let h = Harness::start(Options::default()).await;
    for _ in 0..3 {
        h.open_task(&h.tokens.a, 600).await;
    }
    let (_, chain) = h.get(&h.tokens.admin, "/v1/events/chain").await;
    let head = chain["head_seq"].as_u64().unwrap();
    // the old way: through_seq and last_hash read from the API
    let (s, _) = h
        .post(
            &h.tokens.admin,
            "/v1/events/prune",
            json!({"through_seq": head, "last_hash": chain["head_hash"]}),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "no pruning without the broker's own archive"
    );
    // the broker's own archive: refused for events younger than 7 days
    let (s, e) = h
        .post(
            &h.tokens.admin,
            "/v1/events/archive",
            json!({"through_seq": head}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("prune_too_recent")),
        "{e}"
    );
    let (_, after) = h.get(&h.tokens.admin, "/v1/events/chain").await;
    assert_eq!(after["base_seq"], chain["base_seq"], "nothing was pruned");
    let (_, v) = h.get(&h.tokens.admin, "/v1/events?limit=1000").await;
    assert!(
        v["events"].as_array().unwrap().len() as u64 >= head,
        "every event is still there"
    );
}

/// Finding 7 (in part): the `policies/` directory was 0755.
#[test]
fn directories_the_broker_creates_are_its_own() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a/b/data");
    leasehold::dev::prepare(
        &data,
        "127.0.0.1:7711".parse().unwrap(),
        crate::harness::now_rounded(),
    )
    .unwrap();
    for d in [
        dir.path().join("a"),
        dir.path().join("a/b"),
        data.clone(),
        data.join("policies"),
    ] {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", d.display());
    }
}

/// The callers an OpenAPI operation allows: `workload`, each operator role,
/// or `anyone` when it has no security requirement.
fn documented_callers(op: &Value) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    match op.get("security").and_then(Value::as_array) {
        None => {
            out.insert("anyone".to_owned());
        }
        Some(reqs) if reqs.is_empty() => {
            out.insert("anyone".to_owned());
        }
        Some(reqs) => {
            for r in reqs {
                if r.get("workload").is_some() {
                    out.insert("workload".to_owned());
                }
                for role in r
                    .get("operator")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    out.insert(role.as_str().unwrap().to_owned());
                }
            }
        }
    }
    out
}

/// Finding 7: who may do what differed between the code, the README's API
/// table and the OpenAPI document. The README's table must name, for every
/// route, exactly the callers the document does (`owner` and `workload`
/// both mean the workload scheme; "anyone" a route without one).
#[test]
fn the_readme_api_table_names_the_callers_the_openapi_document_does() {
    let doc: Value =
        serde_json::from_str(&leasehold::api::openapi::document_json().unwrap()).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let words = [
        "anyone",
        "workload",
        "owner",
        "admin",
        "approver",
        "responder",
        "resource_server",
    ];
    let mut problems = Vec::new();
    let mut seen = 0;
    for line in readme.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (routes, who) = (cells[1], cells[2]);
        let mut named: std::collections::BTreeSet<String> = words
            .iter()
            .filter(|w| {
                who.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .any(|t| t == **w)
            })
            .map(|w| {
                if *w == "owner" {
                    "workload".to_owned()
                } else {
                    (*w).to_owned()
                }
            })
            .collect();
        if named.is_empty() {
            continue;
        }
        // `GET /v1/approvals`, `GET /v1/approvals/{id}[?wait=S]` -> each route
        for part in routes.split("`, `") {
            let part = part.trim_matches('`');
            let Some((method, path)) = part.split_once(' ') else {
                continue;
            };
            let path = path.split('[').next().unwrap().split('?').next().unwrap();
            let path = if path.starts_with("...") {
                continue;
            } else {
                path
            };
            let Some(op) = doc["paths"]
                .get(path)
                .and_then(|p| p.get(method.to_ascii_lowercase()))
            else {
                problems.push(format!(
                    "README names `{method} {path}`, the document has no such operation"
                ));
                continue;
            };
            seen += 1;
            let documented = documented_callers(op);
            if documented != named {
                problems.push(format!(
                    "`{method} {path}`: README says {named:?}, the document {documented:?}"
                ));
            }
        }
        named.clear();
    }
    assert!(
        seen >= 25,
        "only {seen} routes read from the README's table"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A real id for a path parameter, by its documented pattern's prefix
/// (`^task_...`), from `ids`; a well-formed one that names nothing else.
fn id_for(param: &Value, ids: &std::collections::BTreeMap<&str, String>) -> String {
    let pattern = param["schema"]["pattern"].as_str().unwrap_or("");
    let prefix: String = pattern
        .trim_start_matches('^')
        .chars()
        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
        .collect();
    match ids.get(prefix.as_str()) {
        Some(id) => id.clone(),
        None if prefix.is_empty() => "token".to_owned(), // a provider's name
        None => format!("{prefix}0{}", "0".repeat(25)),
    }
}

/// Finding 7: enforcement walks the same matrix the document states. Every
/// operation × no credential, a workload (the owner of every resource
/// named), another workload (refused on the owner's resources, admitted to
/// collections), and each operator role, on real resources: refused (401 without
/// a credential, 403 with the wrong one, or 404 where a resource is hidden
/// from those who may not see it) exactly when the document does not name
/// that caller. Roles are checked before a body or query is read, so a 400
/// (to the empty body the walk sends) means the caller got past the check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_enforces_exactly_the_callers_the_document_names() {
    let h = Harness::start(Options {
        tweak: Box::new(|c| c.server.rate_limits.auth_failures_per_second = 0.0),
        ..Options::default()
    })
    .await;
    // real resources, owned by workload a
    let approval = pending_approval(&h, &h.tokens.a).await;
    let task = h.open_task(&h.tokens.a, 3600).await;
    let lease = h.lease(&h.tokens.a, &task, 300).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, job) = h
        .post(
            &h.tokens.responder,
            "/v1/revocations",
            json!({"workload": "nobody:none", "reason": "walk"}),
        )
        .await;
    let ids: std::collections::BTreeMap<&str, String> = [
        ("task_", task),
        ("lease_", lease),
        ("appr_", approval),
        ("job_", job["job_id"].as_str().unwrap().to_owned()),
    ]
    .into();
    let doc: Value =
        serde_json::from_str(&leasehold::api::openapi::document_json().unwrap()).unwrap();
    let callers: Vec<(&str, &str)> = vec![
        ("workload", h.tokens.a.as_str()),
        ("admin", h.tokens.admin.as_str()),
        ("approver", h.tokens.approver.as_str()),
        ("responder", h.tokens.responder.as_str()),
        ("resource_server", h.tokens.resource.as_str()),
    ];
    let (mut problems, mut decided, mut undecided) = (Vec::new(), 0, Vec::new());
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let documented = documented_callers(op);
            if documented.contains("anyone") {
                continue;
            }
            let mut url = path.clone();
            for p in op["parameters"].as_array().into_iter().flatten() {
                if p["in"] == "path" {
                    let name = p["name"].as_str().unwrap();
                    url = url.replace(&format!("{{{name}}}"), &id_for(p, &ids));
                }
            }
            let send = |token: Option<&str>| {
                let mut req = h
                    .http
                    .request(method.to_uppercase().parse().unwrap(), h.url(&url));
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                if method == "post" {
                    if op["requestBody"]["content"]
                        .get("application/x-www-form-urlencoded")
                        .is_some()
                    {
                        req = req
                            .header("content-type", "application/x-www-form-urlencoded")
                            .body("token=x");
                    } else {
                        req = req.json(&json!({}));
                    }
                }
                req.send()
            };
            let s = send(None).await.unwrap().status();
            if s != StatusCode::UNAUTHORIZED {
                problems.push(format!(
                    "{} {path} without a credential: {s}",
                    method.to_uppercase()
                ));
            }
            // another workload: admitted by the scheme, but never to a's
            // resources (refused or not found), only to collections
            if documented.contains("workload") {
                // with a body that is valid, so only ownership can refuse it
                let valid = match path.as_str() {
                    "/v1/tasks/{id}/calls" => Some(
                        json!({"tool": "demo.read", "action": "run", "resource": "x", "arguments_sha256": "ab".repeat(32)}),
                    ),
                    "/v1/tasks/{id}/leases" => {
                        Some(json!({"provider": "token", "role": "demo", "ttl_seconds": 60}))
                    }
                    "/v1/tasks" => Some(
                        json!({"purpose": "p", "on_behalf_of": "bob@example.com", "prompt": "x", "ttl_seconds": 60}),
                    ),
                    _ => None,
                };
                let s = match valid {
                    Some(body) => h
                        .http
                        .post(h.url(&url))
                        .bearer_auth(&h.tokens.b)
                        .json(&body)
                        .send()
                        .await
                        .unwrap()
                        .status(),
                    None => send(Some(h.tokens.b.as_str())).await.unwrap().status(),
                };
                let names_a_resource = url != *path;
                let refused = matches!(s, StatusCode::FORBIDDEN | StatusCode::NOT_FOUND);
                if names_a_resource != refused {
                    problems.push(format!(
                        "{} {path} as another workload: {s}",
                        method.to_uppercase()
                    ));
                }
                decided += 1;
            }
            for (who, token) in &callers {
                let s = send(Some(token)).await.unwrap().status();
                // a 400 (the walk's empty body) means the caller got past the
                // role check: routes check roles before reading a body
                if s == StatusCode::BAD_REQUEST {
                    undecided.push(format!("{} {path} as {who}", method.to_uppercase()));
                }
                decided += 1;
                let refused = matches!(
                    s,
                    StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED | StatusCode::NOT_FOUND
                );
                let allowed = documented.contains(*who);
                if allowed == refused
                    && !(allowed && s == StatusCode::NOT_FOUND && path.contains("reviews"))
                {
                    problems.push(format!(
                        "{} {path} as {who}: {s}, the document {} it",
                        method.to_uppercase(),
                        if allowed { "allows" } else { "does not allow" }
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    eprintln!("{decided} verdicts; past the check with a 400 to the empty body: {undecided:?}");
    assert!(decided >= 150, "only {decided} verdicts");
}

/// Finding 4, for workloads: a workload id or tenant is kept in one form
/// (NFKC, trimmed; case kept, as identity providers' subjects are
/// case-sensitive), so a fence or selector typed with full-width letters or
/// spaces still names it; a token whose subject hides invisible characters
/// or mixes scripts is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_ids_compare_in_one_form_and_disguised_subjects_are_refused() {
    let h = Harness::start(Options::default()).await;
    let (_, t) = h
        .get(
            &h.tokens.a,
            &format!("/v1/tasks/{}", h.open_task(&h.tokens.a, 600).await),
        )
        .await;
    let id = t["workload"].as_str().unwrap().to_owned();
    // full-width and padded: the same workload
    let typed: String = format!(
        " {} ",
        id.chars()
            .map(|c| if c.is_ascii_lowercase() {
                char::from_u32(u32::from(c) - 0x61 + 0xFF41).unwrap()
            } else {
                c
            })
            .collect::<String>()
    );
    let (s, v) = h
        .post(
            &h.tokens.responder,
            "/v1/revocations",
            json!({"workload": typed, "fence": true, "reason": "incident 8"}),
        )
        .await;
    assert!(s.is_success(), "{v}");
    let (s, v) = h
        .post(&h.tokens.a, "/v1/tasks", json!({"purpose": "p", "on_behalf_of": "bob@example.com", "prompt": "x", "ttl_seconds": 60}))
        .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "the fence typed in another form holds: {v}"
    );
    // a subject with a zero-width space, or a Cyrillic letter in a Latin name
    for sub in ["assistant\u{200B}-a", "\u{0430}ssistant-a"] {
        let mut claims = crate::harness::claims(sub, crate::harness::now_rounded());
        claims["sub"] = json!(sub);
        let token = h.mint(&claims);
        let (s, v) = h
            .post(&token, "/v1/tasks", json!({"purpose": "p", "on_behalf_of": "bob@example.com", "prompt": "x", "ttl_seconds": 60}))
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{sub:?}: {v}");
    }
}
