//! Several brokers on one PostgreSQL store, as real processes on loopback:
//! any node serves any request with the answers one broker gives, a fence
//! or a policy reload on one node holds on the others, and when the leader
//! is killed another node takes over its duties (expiry, the revocation
//! queue) within the lease period, losing nothing acknowledged.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use leasehold::config::{StoreBackend, StorePostgres};
use leasehold::dev::DevCredentials;
use leasehold_provider_postgres::testkit::Cluster;
use serde_json::{Value, json};

use crate::harness::{Child, Remote, child_config, free_port};

/// One broker of the cluster.
struct Node {
    name: String,
    remote: Remote,
    child: Child,
}

struct Brokers {
    // dropped after the nodes: the database outlives them
    nodes: Vec<Node>,
    creds: DevCredentials,
    policy_dir: PathBuf,
    _dir: tempfile::TempDir,
    _pg: Cluster,
}

fn store_section(pg: &leasehold_provider_postgres::PostgresConfig, node: &str) -> StorePostgres {
    toml::from_str(&format!(
        "host = {:?}\nport = {}\ndatabase = {:?}\nuser = {:?}\npassword_file = {:?}\ntls = 'disable'\nnode = {node:?}\nlease_seconds = 3\npool_size = 6\n",
        pg.host,
        pg.port,
        pg.database,
        pg.user,
        pg.password_file.as_ref().unwrap()
    ))
    .unwrap()
}

/// The first node's config (the dev keys and tokens, written once), then
/// one file per node: the same keys, tokens and policies, its own address
/// and name.
fn node_configs(
    dir: &Path,
    pg: &leasehold_provider_postgres::PostgresConfig,
    n: usize,
) -> (Vec<(String, std::net::SocketAddr, PathBuf)>, DevCredentials) {
    let first = free_port();
    let (path, creds) = child_config(dir, first, |c| {
        c.store.backend = StoreBackend::Postgres;
        c.store.postgres = Some(store_section(pg, "node-0"));
        c.reaper.retry_base_seconds = 1;
        c.reaper.retry_cap_seconds = 2;
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
        let pg = Cluster::start();
        let conn = pg.provision_store().await;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let (configs, creds) = node_configs(&data, &conn, n);
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
            creds,
            policy_dir: data.join("policies"),
            _dir: dir,
            _pg: pg,
        }
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
    assert!(
        took < Duration::from_secs(5),
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
    for id in &due {
        let story = r.get(&admin, &format!("/v1/events?lease={id}")).await;
        let ends = story["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                let k = e["kind"].as_str().unwrap_or("");
                k == "lease.expired" || k == "lease.revoked"
            })
            .count();
        assert_eq!(ends, 1, "lease {id}: {story}");
    }
    let view = r.get(&admin, "/v1/cluster").await;
    assert_eq!(view["leader"], b.nodes[new].name.as_str(), "{view}");
    drop(dead);
}
