//! Several brokers on one PostgreSQL store, as real processes on loopback:
//! any node serves any request with the answers one broker gives, a fence
//! or a policy reload on one node holds on the others, and when the leader
//! is killed another node takes over its duties (expiry, the revocation
//! queue) within the lease period, losing nothing acknowledged.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold::config::StoreBackend;
use leasehold::dev::DevCredentials;
use leasehold_provider_postgres::testkit::Cluster;
use serde_json::{Value, json};

use crate::harness::{Child, Remote, child_config, free_port, store_section};

/// One broker of the cluster.
struct Node {
    name: String,
    remote: Remote,
    child: Child,
}

struct Brokers {
    // dropped after the nodes: the database outlives them
    nodes: Vec<Node>,
    configs: Vec<PathBuf>,
    creds: DevCredentials,
    policy_dir: PathBuf,
    _dir: tempfile::TempDir,
    _pg: Cluster,
}

/// The first node's config (the dev keys and tokens, written once), then
/// one file per node: the same keys, tokens and policies, its own address
/// and name.
fn node_configs(
    dir: &Path,
    pg: &leasehold_provider_postgres::PostgresConfig,
    n: usize,
) -> (Vec<(String, std::net::SocketAddr, PathBuf)>, DevCredentials) {
    node_configs_with(dir, pg, n, |_| {})
}

fn node_configs_with(
    dir: &Path,
    pg: &leasehold_provider_postgres::PostgresConfig,
    n: usize,
    tweak: impl FnOnce(&mut leasehold::config::Config),
) -> (Vec<(String, std::net::SocketAddr, PathBuf)>, DevCredentials) {
    let first = free_port();
    let (path, creds) = child_config(dir, first, |c| {
        c.store.backend = StoreBackend::Postgres;
        c.store.postgres = Some(store_section(pg, "node-0"));
        c.reaper.retry_base_seconds = 1;
        c.reaper.retry_cap_seconds = 2;
        tweak(c);
    });
    let base = leasehold::config::Config::load(&path).unwrap();
    let nodes = (0..n)
        .map(|i| {
            let name = format!("node-{i}");
            let addr = if i == 0 { first } else { free_port() };
            let mut c = base.clone();
            c.server.listen = addr;
            c.store.postgres = Some(store_section(pg, &name));
            let file = dir.join(format!("{name}.toml"));
            std::fs::write(&file, c.to_toml().unwrap()).unwrap();
            (name, addr, file)
        })
        .collect();
    (nodes, creds)
}

impl Brokers {
    async fn start(n: usize) -> Self {
        Self::start_with(n, |_| {}).await
    }

    async fn start_with(n: usize, tweak: impl FnOnce(&mut leasehold::config::Config)) -> Self {
        let pg = Cluster::start();
        let conn = pg.provision_store().await;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let (configs, creds) = node_configs_with(&data, &conn, n, tweak);
        let files = configs.iter().map(|c| c.2.clone()).collect();
        let mut nodes = Vec::new();
        for (name, addr, config) in configs {
            let log = dir.path().join(format!("{name}.log"));
            let remote = Remote::new(addr);
            let mut child = Child::spawn(&config, addr, log, "info");
            child.wait_healthy(&remote.http).await;
            nodes.push(Node {
                name,
                remote,
                child,
            });
        }
        Self {
            nodes,
            configs: files,
            creds,
            policy_dir: data.join("policies"),
            _dir: dir,
            _pg: pg,
        }
    }

    fn config_of(&self, i: usize) -> PathBuf {
        self.configs[i].clone()
    }

    fn token(&self, who: &str) -> String {
        self.creds.identities[who].token.clone()
    }

    /// The node that leads, by `/v1/cluster`, waiting up to `secs`.
    async fn leader(&self, secs: u64) -> usize {
        let admin = self.token("admin");
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            for (i, n) in self.nodes.iter().enumerate() {
                if let Ok(r) = n
                    .remote
                    .http
                    .get(format!("{}/v1/cluster", n.remote.base))
                    .bearer_auth(&admin)
                    .send()
                    .await
                    && let Ok(v) = r.json::<Value>().await
                    && v["this_node_leads"] == true
                {
                    return i;
                }
            }
            assert!(Instant::now() < until, "no node leads within {secs}s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn open_task(r: &Remote, token: &str, ttl: u64) -> String {
    let t = r
        .post(
            token,
            "/v1/tasks",
            Some(json!({"purpose": "cluster", "on_behalf_of": "alice", "prompt": "p", "ttl_seconds": ttl})),
        )
        .await;
    t["task_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{t}"))
        .to_owned()
}

async fn lease(r: &Remote, token: &str, task: &str, ttl: u64) -> Value {
    r.post(
        token,
        &format!("/v1/tasks/{task}/leases"),
        Some(json!({"provider": "token", "role": "demo", "ttl_seconds": ttl})),
    )
    .await
}

async fn status_of(r: &Remote, token: &str, path: &str, body: Value) -> (u16, Value) {
    let resp = r
        .http
        .post(format!("{}{path}", r.base))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = resp.status().as_u16();
    (s, resp.json().await.unwrap_or(Value::Null))
}

async fn verify(r: &Remote, admin: &str) {
    let v = r.get(admin, "/v1/events/verify").await;
    assert_eq!(v["ok"], true, "{v}");
}

/// The task's events of `kind`, in chain order.
async fn task_events(r: &Remote, admin: &str, task: &str, kind: &str) -> Vec<Value> {
    let story = r
        .get(admin, &format!("/v1/events?task={task}&limit=100"))
        .await;
    story["events"]
        .as_array()
        .unwrap_or_else(|| panic!("{story}"))
        .iter()
        .filter(|e| e["kind"] == kind)
        .cloned()
        .collect()
}

/// Each lease's end (expired or revoked) is on the chain exactly once.
async fn ended_once(r: &Remote, admin: &str, leases: &[String]) {
    for id in leases {
        let story = r.get(admin, &format!("/v1/events?lease={id}")).await;
        let ends = story["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "lease.revoked" || e["kind"] == "lease.expired")
            .count();
        assert_eq!(ends, 1, "lease {id}: {story}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_any_request_and_fences_and_policy_reach_every_node() {
    let b = Brokers::start(3).await;
    let (a, admin, responder, resource) = (
        b.token("assistant-a"),
        b.token("admin"),
        b.token("responder"),
        b.token("resource-server"),
    );
    let [n0, n1, n2] = [&b.nodes[0].remote, &b.nodes[1].remote, &b.nodes[2].remote];

    // one leader, three nodes listed
    let leader = b.leader(10).await;
    let view = n1.get(&admin, "/v1/cluster").await;
    assert_eq!(view["clustered"], true, "{view}");
    assert_eq!(view["leader"], b.nodes[leader].name.as_str(), "{view}");
    assert_eq!(view["nodes"].as_array().unwrap().len(), 3, "{view}");
    let ready = n2.get("", "/v1/ready").await;
    assert_eq!(ready["checks"]["store"], "ok", "{ready}");
    // exactly one node says it leads, in its metrics too
    let mut leaders = 0;
    for n in [n0, n1, n2] {
        let text = n
            .http
            .get(format!("{}/metrics", n.base))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
        };
        leaders += value("leasehold_cluster_leader ") as u32;
        assert!(
            value("leasehold_cluster_lease_renewal_age_seconds ") < 3.0,
            "{text}"
        );
        assert!(
            value("leasehold_store_pool_connections{state=\"open\"}") >= 1.0,
            "{text}"
        );
    }
    assert_eq!(leaders, 1);
    assert!(
        ["leader", "follower"].contains(&ready["role"].as_str().unwrap()),
        "{ready}"
    );

    // a lease issued on one node is read on another, and its task is
    // completed on the third: the token is dead wherever it is checked
    let task = open_task(n0, &a, 600).await;
    let l = lease(n0, &a, &task, 300).await;
    let id = l["lease_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{l}"))
        .to_owned();
    let token = l["credential"]["token"].as_str().unwrap().to_owned();
    assert_eq!(
        n1.get(&admin, &format!("/v1/leases/{id}")).await["state"],
        "active"
    );
    assert!(n2.active(&resource, &token).await);
    let done = n2
        .post(&a, &format!("/v1/tasks/{task}/complete"), None)
        .await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(
        n0.get(&admin, &format!("/v1/leases/{id}")).await["state"],
        "revoked"
    );
    assert!(
        !n1.active(&resource, &token).await,
        "a revoked token is active on another node"
    );

    // a fence set through one node refuses on another from the moment the
    // first answers
    let (s, job) = status_of(
        n1,
        &responder,
        "/v1/revocations",
        json!({"workload": "dev:assistant-b", "reason": "incident 7", "fence": true}),
    )
    .await;
    assert!((200..300).contains(&s), "{s} {job}");
    let b_token = b.token("assistant-b");
    for n in [n0, n2] {
        let (s, body) = status_of(
            n,
            &b_token,
            "/v1/tasks",
            json!({"purpose": "p", "on_behalf_of": "alice", "prompt": "p", "ttl_seconds": 60}),
        )
        .await;
        assert_eq!(s, 403, "{body}");
        assert_eq!(body["error"]["code"], "fenced", "{body}");
    }

    // a policy reload on one node puts the same version in force on all,
    // within a second
    std::fs::write(
        b.policy_dir.join("zz-cluster.cedar"),
        "@id(\"cluster-test\")\nforbid (principal, action, resource) when { false };\n",
    )
    .unwrap();
    let before = n2.get(&admin, "/v1/policy").await["version"].clone();
    let reloaded = n0.post(&admin, "/v1/policy/reload", None).await;
    let version = reloaded["version"].clone();
    assert_ne!(version, before, "{reloaded}");
    let t = Instant::now();
    for n in [n1, n2] {
        loop {
            if n.get(&admin, "/v1/policy").await["version"] == version {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "a node kept the old policy for over a second"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    verify(n2, &admin).await;
}

/// A node completes a task from what it committed of it (no read of the
/// database: `Store::read_recent`), so what it renders ahead can be
/// stale: here another node revoked one of the task's leases meanwhile.
/// The completion still revokes only what was active, each lease ends
/// once on the chain, and the task's event counts what it revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_from_rows_another_node_changed_since_ends_each_lease_once() {
    let b = Brokers::start(2).await;
    let (a, admin) = (b.token("assistant-a"), b.token("admin"));
    let [n0, n1] = [&b.nodes[0].remote, &b.nodes[1].remote];
    let task = open_task(n0, &a, 600).await;
    let ids: Vec<String> = [
        lease(n0, &a, &task, 300).await,
        lease(n0, &a, &task, 300).await,
    ]
    .iter()
    .map(|l| {
        l["lease_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{l}"))
            .to_owned()
    })
    .collect();
    let revoked = n1
        .post(&admin, &format!("/v1/leases/{}/revoke", ids[0]), None)
        .await;
    assert_eq!(revoked["state"], "revoked", "{revoked}");
    let done = n0
        .post(&a, &format!("/v1/tasks/{task}/complete"), None)
        .await;
    assert_eq!(done["state"], "completed", "{done}");
    let listed: Vec<&str> = done["revoked"]
        .as_array()
        .unwrap_or_else(|| panic!("{done}"))
        .iter()
        .filter_map(|l| l["lease_id"].as_str())
        .collect();
    assert_eq!(listed, [ids[1].as_str()], "{done}");
    ended_once(n1, &admin, &ids).await;
    let completed = task_events(n1, &admin, &task, "task.completed").await;
    assert_eq!(completed.len(), 1, "{completed:?}");
    assert_eq!(completed[0]["data"]["revoked"], 1, "{completed:?}");
    verify(n0, &admin).await;
}

/// A node decides a lease on what it committed of the task (no read of
/// the database: `domain/call/facts.rs`), so the facts can be stale: here
/// another node leased under the task meanwhile, and a policy allows one
/// active lease per task. The intent's transaction finds the task changed,
/// and the request is decided again on a snapshot: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_decided_on_rows_another_node_changed_since_is_decided_again() {
    let b = Brokers::start(2).await;
    std::fs::write(
        b.policy_dir.join("zz-one-lease.cedar"),
        "@id(\"one-lease-per-task\")\nforbid (principal, action == Leasehold::Action::\"Lease\", resource)\n\
         when { context.task.active_leases >= 1 };\n",
    )
    .unwrap();
    let (a, admin) = (b.token("assistant-a"), b.token("admin"));
    let [n0, n1] = [&b.nodes[0].remote, &b.nodes[1].remote];
    let version = n0.post(&admin, "/v1/policy/reload", None).await["version"].clone();
    for n in [n0, n1] {
        let t = Instant::now();
        while n.get(&admin, "/v1/policy").await["version"] != version {
            assert!(t.elapsed() < Duration::from_secs(5), "policy not reloaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // n0 leases under another task (so it knows the workload's count),
    // opens the task, and n1 leases under it
    let other = open_task(n0, &a, 600).await;
    assert!(lease(n0, &a, &other, 300).await["lease_id"].is_string());
    let task = open_task(n0, &a, 600).await;
    let first = lease(n1, &a, &task, 300).await;
    assert!(first["lease_id"].is_string(), "{first}");
    let (s, body) = status_of(
        n0,
        &a,
        &format!("/v1/tasks/{task}/leases"),
        json!({"provider": "token", "role": "demo", "ttl_seconds": 300}),
    )
    .await;
    assert_eq!(s, 403, "a second lease under the task: {body}");
    assert_eq!(body["error"]["code"], "policy_denied", "{body}");
    // one denial recorded, not an allowed call as well
    let decided = task_events(n1, &admin, &task, "call.decided").await;
    assert_eq!(decided.len(), 2, "{decided:?}");
    assert_eq!(decided[1]["data"]["outcome"], "deny", "{decided:?}");
    verify(n0, &admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_hands_its_duties_over_and_loses_nothing() {
    let mut b = Brokers::start(3).await;
    let (a, admin) = (b.token("assistant-a"), b.token("admin"));
    let leader = b.leader(10).await;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();

    // leases due soon, issued through the followers
    let mut due = Vec::new();
    for (k, &i) in followers.iter().enumerate() {
        let r = &b.nodes[i].remote;
        let task = open_task(r, &a, 600).await;
        for _ in 0..3 + k {
            let l = lease(r, &a, &task, 2).await;
            due.push(
                l["lease_id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{l}"))
                    .to_owned(),
            );
        }
    }
    // a storm of leases on the followers while the leader dies
    let storm: Vec<_> = followers
        .iter()
        .map(|&i| {
            let (base, a) = (b.nodes[i].remote.base.clone(), a.clone());
            tokio::spawn(async move {
                let r = Remote {
                    http: crate::harness::client(),
                    base,
                };
                let task = open_task(&r, &a, 600).await;
                let mut acked = Vec::new();
                let until = Instant::now() + Duration::from_secs(4);
                while Instant::now() < until {
                    let l = lease(&r, &a, &task, 60).await;
                    if let Some(id) = l["lease_id"].as_str() {
                        acked.push(id.to_owned());
                    }
                }
                acked
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    b.nodes[leader].child.kill9();
    let dead = b.nodes.remove(leader);
    let new = b.leader(10).await;
    let took = killed.elapsed();
    // the dead leader's lease ends at most one period after its last
    // renewal, and a follower campaigns every third of it: 4 s, plus room
    // for a loaded test host
    assert!(
        took < Duration::from_secs(6),
        "failover took {took:?} with a 3 s lease"
    );
    let mut acked = Vec::new();
    for s in storm {
        acked.extend(s.await.unwrap());
    }
    assert!(acked.len() > 10, "the storm hardly ran: {}", acked.len());

    // every lease that was due is revoked (by the new leader's expiry),
    // every acknowledged lease is there
    let r = &b.nodes[new].remote;
    let until = Instant::now() + Duration::from_secs(15);
    for id in &due {
        loop {
            let l = r.get(&admin, &format!("/v1/leases/{id}")).await;
            if l["state"] == "expired" || l["state"] == "revoked" {
                break;
            }
            assert!(Instant::now() < until, "lease {id} never expired: {l}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for id in &acked {
        let l = r.get(&admin, &format!("/v1/leases/{id}")).await;
        assert_eq!(
            l["lease_id"],
            id.as_str(),
            "an acknowledged lease is lost: {l}"
        );
    }
    // the chain verifies, and no lease's end is recorded twice
    verify(r, &admin).await;
    ended_once(r, &admin, &due).await;
    let view = r.get(&admin, "/v1/cluster").await;
    assert_eq!(view["leader"], b.nodes[new].name.as_str(), "{view}");
    drop(dead);
}

/// A TCP relay between one broker and PostgreSQL that the test can cut
/// (every connection through it dropped, new ones refused) and reopen.
struct Relay {
    port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (o, c) = (open.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if !o.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut up) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                c.lock().unwrap().push(h.abort_handle());
            }
        });
        Self {
            port,
            open,
            conns,
            accept,
        }
    }

    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    fn reopen(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Start the nodes in order, node-0 alone until it leads (so the test
/// knows which node leads), logs in `logs`.
async fn start_node_0_first(
    configs: Vec<(String, std::net::SocketAddr, PathBuf)>,
    logs: &Path,
) -> Vec<Node> {
    let mut nodes = Vec::new();
    for (i, (name, addr, file)) in configs.into_iter().enumerate() {
        let remote = Remote::new(addr);
        let mut child = Child::spawn(&file, addr, logs.join(format!("{name}.log")), "info");
        child.wait_healthy(&remote.http).await;
        if i == 0 {
            let t = Instant::now();
            while role(&remote).await != "leader" {
                assert!(t.elapsed() < Duration::from_secs(10), "node-0 never led");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        nodes.push(Node {
            name,
            remote,
            child,
        });
    }
    nodes
}

/// A node's role by its readiness probe (`leader`, `follower`).
async fn role(r: &Remote) -> String {
    r.get("", "/v1/ready").await["role"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_database_steps_down_before_its_lease_ends() {
    // node-0 reaches the database through a relay; it starts alone, so it
    // leads; then two more nodes join directly
    let pg = Cluster::start();
    let conn = pg.provision_store().await;
    let relay = Relay::start(conn.port).await;
    let mut through = conn.clone();
    through.port = relay.port;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let (configs, creds) = node_configs(&data, &conn, 3);
    {
        // node-0's own file: the relay's port
        let (name, _, file) = &configs[0];
        let mut c = leasehold::config::Config::load(file).unwrap();
        c.store.postgres = Some(store_section(&through, name));
        std::fs::write(file, c.to_toml().unwrap()).unwrap();
    }
    let admin = creds.identities["admin"].token.clone();
    let a = creds.identities["assistant-a"].token.clone();
    let nodes = start_node_0_first(configs, dir.path()).await;
    let old = &nodes[0].remote;
    let epoch = old.get(&admin, "/v1/cluster").await["epoch"]
        .as_i64()
        .unwrap();
    // leases that fall due while the leader is cut off
    let task = open_task(&nodes[1].remote, &a, 600).await;
    let mut due = Vec::new();
    for _ in 0..3 {
        let l = lease(&nodes[1].remote, &a, &task, 2).await;
        due.push(
            l["lease_id"]
                .as_str()
                .unwrap_or_else(|| panic!("{l}"))
                .to_owned(),
        );
    }

    let cut = Instant::now();
    relay.cut();
    // it stops leading before its 3 s lease would end
    while role(old).await == "leader" {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stepped_down = cut.elapsed();
    assert!(
        stepped_down < Duration::from_secs(3),
        "the cut-off leader stepped down after {stepped_down:?}, past its lease"
    );
    // a follower takes over with the next epoch
    let r = &nodes[1].remote;
    let view = loop {
        let v = r.get(&admin, "/v1/cluster").await;
        if v["leader"].is_string() && v["leader"] != "node-0" {
            break v;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(10),
            "no follower took over: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(view["epoch"].as_i64(), Some(epoch + 1), "{view}");
    // the due leases expire under the new leader, once each
    for id in &due {
        loop {
            let l = r.get(&admin, &format!("/v1/leases/{id}")).await;
            if l["state"] == "expired" {
                break;
            }
            assert!(cut.elapsed() < Duration::from_secs(20), "lease {id}: {l}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // back on the network, the old leader follows; nothing it had in flight
    // changed anything (its epoch is stale), the chain verifies
    relay.reopen();
    let t = Instant::now();
    loop {
        let v = old.http.get(format!("{}/v1/ready", old.base)).send().await;
        if let Ok(v) = v
            && v.status().is_success()
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the old leader never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(role(old).await, "follower");
    let l = lease(old, &a, &task, 60).await;
    assert!(
        l["lease_id"].is_string(),
        "the old leader serves again: {l}"
    );
    verify(r, &admin).await;
    ended_once(r, &admin, &due).await;
    drop(nodes);
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_postgres_during_a_storm_is_503s_then_service_without_a_broker_restart() {
    let mut b = Brokers::start(2).await;
    let (a, admin) = (b.token("assistant-a"), b.token("admin"));
    let r0 = Remote {
        http: crate::harness::client(),
        base: b.nodes[0].remote.base.clone(),
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = {
        let (stop, a) = (stop.clone(), a.clone());
        let bases: Vec<String> = b.nodes.iter().map(|n| n.remote.base.clone()).collect();
        tokio::spawn(async move {
            let http = crate::harness::client();
            let (mut acked, mut unavailable, mut i) = (Vec::new(), 0u32, 0usize);
            // a new task every few leases (the example policy caps a task)
            let mut task: Option<(String, u32)> = None;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let base = &bases[i % bases.len()];
                i += 1;
                let (path, body) = match &task {
                    Some((t, n)) if *n < 10 => (
                        format!("{base}/v1/tasks/{t}/leases"),
                        json!({"provider": "token", "role": "demo", "ttl_seconds": 600}),
                    ),
                    _ => (
                        format!("{base}/v1/tasks"),
                        json!({"purpose": "storm", "on_behalf_of": "alice", "prompt": "p", "ttl_seconds": 600}),
                    ),
                };
                let Ok(resp) = http.post(path).bearer_auth(&a).json(&body).send().await else {
                    continue;
                };
                match resp.status().as_u16() {
                    200 | 201 => {
                        let v: Value = resp.json().await.unwrap();
                        if let Some(id) = v["lease_id"].as_str() {
                            acked.push(id.to_owned());
                            if let Some((_, n)) = task.as_mut() {
                                *n += 1;
                            }
                        } else {
                            task = Some((v["task_id"].as_str().unwrap().to_owned(), 0));
                        }
                    }
                    503 => {
                        assert!(
                            resp.headers().contains_key("retry-after"),
                            "a 503 without Retry-After"
                        );
                        unavailable += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    s => panic!("{s}: {}", resp.text().await.unwrap_or_default()),
                }
            }
            (acked, unavailable)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    b._pg.stop_server();
    tokio::time::sleep(Duration::from_secs(2)).await;
    b._pg.start_server();
    // service comes back by itself
    let t = Instant::now();
    loop {
        let task = r0
            .post(
                &a,
                "/v1/tasks",
                Some(json!({"purpose": "after", "on_behalf_of": "alice", "prompt": "p", "ttl_seconds": 60})),
            )
            .await;
        if let Some(task) = task["task_id"].as_str()
            && lease(&r0, &a, task, 60).await["lease_id"].is_string()
        {
            break;
        }
        let l = &task;
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no service after the restart: {l}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (acked, unavailable) = storm.await.unwrap();
    assert!(unavailable > 0, "no 503 while the database was down");
    assert!(acked.len() > 10, "{}", acked.len());
    for id in &acked {
        let l = r0.get(&admin, &format!("/v1/leases/{id}")).await;
        assert_eq!(l["state"], "active", "an acknowledged lease is lost: {l}");
    }
    verify(&r0, &admin).await;
    let ready = b.nodes[1].remote.get("", "/v1/ready").await;
    assert_eq!(ready["checks"]["store"], "ok", "{ready}");
}

fn store_copy(from: &Path, to: &Path) -> std::process::Output {
    leasehold(&[
        "store".as_ref(),
        "copy".as_ref(),
        "--from".as_ref(),
        from.as_os_str(),
        "--to".as_ref(),
        to.as_os_str(),
    ])
}

/// What a command said, on either stream.
fn said(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn leasehold(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_a_stopped_store_between_backends_and_refuses_a_non_empty_target() {
    // a broker on redb, with tasks, leases and events; then stopped
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let addr = free_port();
    let (redb_config, creds) = child_config(&data, addr, |_| {});
    let (a, admin) = (
        creds.identities["assistant-a"].token.clone(),
        creds.identities["admin"].token.clone(),
    );
    let remote = Remote::new(addr);
    let mut first = Child::spawn(&redb_config, addr, dir.path().join("redb.log"), "info");
    first.wait_healthy(&remote.http).await;
    let task = open_task(&remote, &a, 3600).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let l = lease(&remote, &a, &task, 600).await;
        ids.push(
            l["lease_id"]
                .as_str()
                .unwrap_or_else(|| panic!("{l}"))
                .to_owned(),
        );
    }
    let revoked = remote
        .post(&admin, &format!("/v1/leases/{}/revoke", ids[0]), None)
        .await;
    assert_eq!(revoked["state"], "revoked", "{revoked}");
    let head = remote.get(&admin, "/v1/events/verify").await;
    assert!(first.terminate().success());

    // the same keys, the store in PostgreSQL
    let pg = Cluster::start();
    let conn = pg.provision_store().await;
    let mut c = leasehold::config::Config::load(&redb_config).unwrap();
    c.store.backend = StoreBackend::Postgres;
    c.store.postgres = Some(store_section(&conn, "copy"));
    let pg_config = data.join("pg.toml");
    std::fs::write(&pg_config, c.to_toml().unwrap()).unwrap();

    let out = store_copy(&redb_config, &pg_config);
    assert!(out.status.success(), "{}", said(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verify"]["ok"], true, "{report}");
    // everything, plus what the broker recorded as it stopped
    assert!(
        report["verify"]["last_seq"].as_u64() >= head["last_seq"].as_u64(),
        "{report}"
    );
    assert_eq!(report["tables"]["leases"], 5, "{report}");
    // a second copy into the same database is refused, naming why
    let again = store_copy(&redb_config, &pg_config);
    assert!(!again.status.success());
    assert!(said(&again).contains("not empty"), "{}", said(&again));

    // a broker on the copy serves the same leases and the same chain
    let addr2 = free_port();
    c.server.listen = addr2;
    std::fs::write(&pg_config, c.to_toml().unwrap()).unwrap();
    let remote2 = Remote::new(addr2);
    let mut second = Child::spawn(&pg_config, addr2, dir.path().join("pg.log"), "info");
    second.wait_healthy(&remote2.http).await;
    assert_eq!(
        remote2.get(&admin, &format!("/v1/leases/{}", ids[0])).await["state"],
        "revoked"
    );
    assert_eq!(
        remote2.get(&admin, &format!("/v1/leases/{}", ids[4])).await["state"],
        "active"
    );
    let after = remote2.get(&admin, "/v1/events/verify").await;
    assert_eq!(after["ok"], true, "{after}");
    // while it runs, copying from it is refused
    let back_config = data.join("back.toml");
    let mut back = c.clone();
    back.store.backend = StoreBackend::Redb;
    back.store.postgres = None;
    back.store.path = data.join("back.redb");
    std::fs::write(&back_config, back.to_toml().unwrap()).unwrap();
    let busy = store_copy(&pg_config, &back_config);
    assert!(!busy.status.success());
    assert!(said(&busy).contains("is running"), "{}", said(&busy));
    assert!(second.terminate().success());

    // and back to a new redb file, which verifies offline
    let out = store_copy(&pg_config, &back_config);
    assert!(out.status.success(), "{}", said(&out));
    let verify = leasehold(&[
        "events".as_ref(),
        "verify".as_ref(),
        "--store".as_ref(),
        data.join("back.redb").as_os_str(),
    ]);
    assert!(verify.status.success(), "{}", said(&verify));

    // another key than the source's is refused before anything is written
    let other_key = data.join("other.key");
    std::fs::write(&other_key, "11".repeat(32)).unwrap();
    let mut other = back.clone();
    other.store.path = data.join("other.redb");
    other.store.key_file = Some(other_key);
    let other_config = data.join("other.toml");
    std::fs::write(&other_config, other.to_toml().unwrap()).unwrap();
    let wrong = store_copy(&pg_config, &other_config);
    assert!(!wrong.status.success());
    assert!(said(&wrong).contains("does not match"), "{}", said(&wrong));
    assert!(
        !data.join("other.redb").exists(),
        "a refused copy created the target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_validate_checks_the_store_database_and_writes_nothing() {
    let pg = Cluster::start();
    let conn = pg.provision_store().await;
    let dir = tempfile::tempdir().unwrap();
    let (configs, _) = node_configs(dir.path(), &conn, 1);
    let file = configs[0].2.clone();
    let validate = |f: &Path| {
        leasehold(&[
            "config".as_ref(),
            "validate".as_ref(),
            "--offline".as_ref(),
            f.as_os_str(),
        ])
    };
    let online = |f: &Path| leasehold(&["config".as_ref(), "validate".as_ref(), f.as_os_str()]);
    assert!(validate(&file).status.success());
    let out = online(&file);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("no leasehold schema yet"),
        "{}",
        said(&out)
    );

    let base = leasehold::config::Config::load(&file).unwrap();
    let variant = |name: &str, f: &dyn Fn(&mut leasehold::config::Config)| {
        let mut c = base.clone();
        f(&mut c);
        let p = dir.path().join(name);
        std::fs::write(&p, c.to_toml().unwrap()).unwrap();
        p
    };
    // a wrong password, a role that may not create tables: named
    let bad_pw = dir.path().join("bad.pw");
    std::fs::write(&bad_pw, "nope").unwrap();
    let wrong = variant("wrong.toml", &|c| {
        c.store.postgres.as_mut().unwrap().password_file = Some(bad_pw.clone());
    });
    let out = online(&wrong);
    assert!(!out.status.success());
    assert!(said(&out).contains("leasehold_store"), "{}", said(&out));
    let su = pg.superuser("postgres").await;
    su.batch_execute("CREATE ROLE weak LOGIN PASSWORD 'weakweak'")
        .await
        .unwrap();
    su.batch_execute("CREATE DATABASE weakdb").await.unwrap();
    let weak_pw = dir.path().join("weak.pw");
    std::fs::write(&weak_pw, "weakweak").unwrap();
    let weak = variant("weak.toml", &|c| {
        let p = c.store.postgres.as_mut().unwrap();
        p.user = Some("weak".into());
        p.database = Some("weakdb".into());
        p.password_file = Some(weak_pw.clone());
    });
    let out = online(&weak);
    assert!(!out.status.success());
    assert!(
        said(&out).contains("may not create tables"),
        "{}",
        said(&out)
    );
    let db = pg.superuser("leasehold").await;
    let tables = |db: tokio_postgres::Client| async move {
        db.query(
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'lh\\_%'",
            &[],
        )
        .await
        .unwrap()[0]
            .get::<_, i64>(0)
    };
    assert_eq!(tables(db).await, 0, "validation wrote to the database");

    // once a broker made the store: another key, a newer schema
    let addr = configs[0].1;
    let remote = Remote::new(addr);
    let mut node = Child::spawn(&file, addr, dir.path().join("n.log"), "info");
    node.wait_healthy(&remote.http).await;
    // other token keys than the running cluster's: refused
    let token_key = dir.path().join("other-token.key");
    std::fs::write(
        &token_key,
        leasehold_provider_token::generate_signing_key().unwrap(),
    )
    .unwrap();
    let other_tokens = variant("tokens.toml", &|c| {
        c.providers
            .get_mut("token")
            .unwrap()
            .get_mut::<leasehold_provider_token::TokenProviderConfig>()
            .unwrap()
            .signing_key_file = token_key.clone();
    });
    let out = online(&other_tokens);
    assert!(!out.status.success());
    assert!(said(&out).contains("token signing keys"), "{}", said(&out));
    let out = online(&file);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("the token keys match"),
        "{}",
        said(&out)
    );
    assert!(node.terminate().success());
    // with no broker running, new token keys are a note (a rotation)
    let out = online(&other_tokens);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("no broker is running"),
        "{}",
        said(&out)
    );
    let out = online(&file);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("the store key matches"),
        "{}",
        said(&out)
    );
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, "22".repeat(32)).unwrap();
    let other = variant("other.toml", &|c| {
        c.store.key_file = Some(other_key.clone())
    });
    let out = online(&other);
    assert!(!out.status.success());
    assert!(said(&out).contains("does not match"), "{}", said(&out));
    let db = pg.superuser("leasehold").await;
    db.batch_execute(
        "UPDATE lh_meta SET v = '\\x000000ff'::bytea WHERE rk = 'schema_version'::bytea",
    )
    .await
    .unwrap();
    let out = online(&file);
    assert!(!out.status.success());
    assert!(
        said(&out).contains("newer than this build"),
        "{}",
        said(&out)
    );
    // and serve refuses it the same way
    let mut refused = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["serve", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    refused.stderr.extend_from_slice(&refused.stdout);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("newer than this build"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_other_token_keys_is_refused_while_the_cluster_runs() {
    let b = Brokers::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    // node-0's configuration, with another token signing key
    let key = dir.path().join("other-token.key");
    std::fs::write(
        &key,
        leasehold_provider_token::generate_signing_key().unwrap(),
    )
    .unwrap();
    let first = b.nodes[0]
        .remote
        .base
        .trim_start_matches("http://")
        .to_owned();
    let mut c = leasehold::config::Config::load(&b.config_of(0)).unwrap();
    assert_eq!(c.server.listen.to_string(), first);
    let addr = free_port();
    c.server.listen = addr;
    let pg = c.store.postgres.as_mut().unwrap();
    pg.node = Some("node-x".into());
    c.providers
        .get_mut("token")
        .unwrap()
        .get_mut::<leasehold_provider_token::TokenProviderConfig>()
        .unwrap()
        .signing_key_file = key;
    let file = dir.path().join("x.toml");
    std::fs::write(&file, c.to_toml().unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["serve", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token signing keys"), "{err}");
    // the cluster goes on
    let view = b.nodes[0]
        .remote
        .get(&b.token("admin"), "/v1/cluster")
        .await;
    assert_eq!(view["nodes"].as_array().unwrap().len(), 1, "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workloads_lease_cap_holds_across_nodes() {
    let b = Brokers::start_with(2, |c| c.policy.max_active_leases_per_workload = 3).await;
    let a = b.token("assistant-a");
    let task = open_task(&b.nodes[0].remote, &a, 600).await;
    // twelve requests at once, alternating nodes: the cap is counted in the
    // store's transaction, not per node
    let requests: Vec<_> = (0..12)
        .map(|i| {
            let (base, a, task) = (b.nodes[i % 2].remote.base.clone(), a.clone(), task.clone());
            tokio::spawn(async move {
                let r = Remote {
                    http: crate::harness::client(),
                    base,
                };
                status_of(
                    &r,
                    &a,
                    &format!("/v1/tasks/{task}/leases"),
                    json!({"provider": "token", "role": "demo", "ttl_seconds": 600}),
                )
                .await
            })
        })
        .collect();
    let (mut issued, mut capped) = (0, 0);
    for r in requests {
        let (s, body) = r.await.unwrap();
        match s {
            201 => issued += 1,
            429 => {
                assert_eq!(body["error"]["code"], "workload_lease_cap", "{body}");
                capped += 1;
            }
            s => panic!("{s}: {body}"),
        }
    }
    assert_eq!((issued, capped), (3, 9));
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_rolls_back_what_a_node_killed_between_intent_and_activation_left() {
    // node-1 hangs after minting, before activation; node-0 leads
    let pg = Cluster::start();
    let conn = pg.provision_store().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let (configs, creds) = node_configs_with(&data, &conn, 2, |c| {
        c.reaper.provider_timeout_seconds = 2;
    });
    let marker = dir.path().join("paused.json");
    {
        let (_, _, file) = &configs[1];
        let mut c = leasehold::config::Config::load(file).unwrap();
        c.fault.pause_after_issue_file = Some(marker.clone());
        std::fs::write(file, c.to_toml().unwrap()).unwrap();
    }
    let (admin, resource, a) = (
        creds.identities["admin"].token.clone(),
        creds.identities["resource-server"].token.clone(),
        creds.identities["assistant-a"].token.clone(),
    );
    let mut nodes = start_node_0_first(configs, dir.path()).await;
    let task = open_task(&nodes[1].remote, &a, 600).await;
    let body = json!({"provider": "token", "role": "demo", "ttl_seconds": 600});
    let (pending, paused) =
        crate::harness::lease_until_paused(&nodes[1].remote, &a, &task, body, &marker).await;
    let lease_id = paused["lease_id"].as_str().unwrap().to_owned();
    let orphan = paused["credential"]["token"].as_str().unwrap().to_owned();
    nodes[1].child.kill9();
    assert!(
        pending.await.unwrap().is_err(),
        "the client never got the credential"
    );
    // the leader finds the intent once no node can still be issuing it
    let r = &nodes[0].remote;
    let t = Instant::now();
    let lease = loop {
        let l = r.get(&admin, &format!("/v1/leases/{lease_id}")).await;
        if l["state"] == "rolled_back" {
            break l;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never rolled back: {l}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(lease["revocation"]["cause"], "recovery", "{lease}");
    assert!(
        !r.active(&resource, &orphan).await,
        "the orphaned credential is still usable"
    );
    verify(r, &admin).await;
}

#[cfg(not(feature = "fault-injection"))]
#[test]
fn the_leader_rolls_back_what_a_node_killed_between_intent_and_activation_left() {
    panic!(
        "this test needs the `fault-injection` feature to pause a broker between issue and \
         activation: run `integration/test.sh`, or `cargo nextest run --workspace --features \
         leasehold/fault-injection`"
    );
}
