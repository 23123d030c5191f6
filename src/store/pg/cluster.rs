//! Leader election for several brokers on one PostgreSQL: a lease row
//! timed by the database's clock, renewed well before it ends, with an
//! epoch (a fencing token) that every leader-only write checks in its own
//! transaction (`Session::require_leader`). Not advisory locks: they vanish
//! silently when the database fails over and do not survive a
//! transaction-pooling proxy; a row does both.
//!
//! A node campaigns every third of the lease period. The row is taken when
//! it is free or expired (by the database's `now()`), and kept by its
//! holder; a new holder (or a holder whose lease lapsed) gets the next
//! epoch. Locally, a node counts itself leader until 80% of the period
//! after it *sent* the statement that won or renewed: the database's lease
//! ends a full period after it *ran* it, so the node stops its duties
//! before anyone else can start them, whatever the network did. A node that
//! cannot reach the database stops leading at that deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};

use super::super::StoreError;
use super::PgOptions;
use super::conn::Conn;
use super::session::{Db, Param, pg_err};

pub(super) const DDL: &str = "
CREATE TABLE IF NOT EXISTS lh_leader (
    id int PRIMARY KEY CHECK (id = 1),
    holder text NOT NULL,
    epoch bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    since timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS lh_nodes (
    node text PRIMARY KEY,
    advertise text NOT NULL,
    started_at timestamptz NOT NULL,
    seen_at timestamptz NOT NULL
);
";

/// Take the row if free or expired, keep it if ours: returns the epoch
/// when this node leads.
const CAMPAIGN: &str = "
INSERT INTO lh_leader AS l (id, holder, epoch, expires_at, since)
VALUES (1, $1, 1, clock_timestamp() + $2 * interval '1 millisecond', clock_timestamp())
ON CONFLICT (id) DO UPDATE SET
    epoch = CASE WHEN l.holder = $1 AND l.expires_at > clock_timestamp() THEN l.epoch ELSE l.epoch + 1 END,
    since = CASE WHEN l.holder = $1 AND l.expires_at > clock_timestamp() THEN l.since ELSE clock_timestamp() END,
    holder = $1,
    expires_at = clock_timestamp() + $2 * interval '1 millisecond'
WHERE l.holder = $1 OR l.expires_at <= clock_timestamp()
RETURNING epoch";

const HEARTBEAT: &str = "
INSERT INTO lh_nodes AS n (node, advertise, started_at, seen_at)
VALUES ($1, $2, clock_timestamp(), clock_timestamp())
ON CONFLICT (node) DO UPDATE SET
    advertise = $2,
    started_at = CASE WHEN $3 THEN clock_timestamp() ELSE n.started_at END,
    seen_at = clock_timestamp()";

/// Hand the lease back at a clean stop, so another node leads at once.
const RESIGN: &str =
    "UPDATE lh_leader SET expires_at = clock_timestamp() WHERE id = 1 AND holder = $1";

/// This node's view of its leadership: which epoch it leads with, if any.
/// A single broker on redb always leads (epoch 0, nothing to fence).
#[derive(Clone)]
pub struct Leadership {
    state: Arc<Mutex<Option<(u64, Instant)>>>,
    changes: watch::Sender<Option<u64>>,
    single: bool,
    transitions: Arc<std::sync::atomic::AtomicU64>,
    /// The last election round that reached the database: when, and how
    /// long its round trip took.
    round: Arc<Mutex<Option<(Instant, Duration)>>>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("epoch", &self.epoch())
            .finish_non_exhaustive()
    }
}

impl Default for Leadership {
    /// A cluster member, not (yet) leading.
    fn default() -> Self {
        Self {
            state: Arc::new(Mutex::new(None)),
            changes: watch::channel(None).0,
            single: false,
            transitions: Arc::default(),
            round: Arc::default(),
        }
    }
}

impl Leadership {
    /// The only broker on its store: always the leader.
    pub fn single() -> Self {
        Self {
            state: Arc::new(Mutex::new(None)),
            changes: watch::channel(Some(0)).0,
            single: true,
            transitions: Arc::default(),
            round: Arc::default(),
        }
    }

    /// The epoch this node leads with now, or `None`. Checked against the
    /// local deadline at every call, so a node that stopped hearing from
    /// the database stops leading on time even if no one tells it.
    pub fn epoch(&self) -> Option<u64> {
        if self.single {
            return Some(0);
        }
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.filter(|(_, until)| Instant::now() < *until)
            .map(|(e, _)| e)
    }

    /// Is this one of several brokers?
    pub fn clustered(&self) -> bool {
        !self.single
    }

    /// Changes of leadership (the epoch, or `None`), to wake leader loops.
    pub fn subscribe(&self) -> watch::Receiver<Option<u64>> {
        self.changes.subscribe()
    }

    /// Leadership changes seen by this node (gained or lost).
    pub fn transitions(&self) -> u64 {
        self.transitions.load(Ordering::Relaxed)
    }

    /// Seconds since the last election round reached the database (the
    /// leader's renewal lag), and that round's duration. `None` for a
    /// single broker, or before the first round.
    pub fn last_round(&self) -> Option<(f64, f64)> {
        let r = self.round.lock().unwrap_or_else(|e| e.into_inner());
        r.map(|(at, took)| (at.elapsed().as_secs_f64(), took.as_secs_f64()))
    }

    fn round_done(&self, sent: Instant) {
        let mut r = self.round.lock().unwrap_or_else(|e| e.into_inner());
        *r = Some((Instant::now(), sent.elapsed()));
    }

    fn set(&self, epoch: Option<u64>, until: Instant) {
        let before = self.epoch();
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            *s = epoch.map(|e| (e, until));
        }
        if before != epoch {
            self.transitions.fetch_add(1, Ordering::Relaxed);
            match epoch {
                Some(e) => tracing::info!(epoch = e, "this broker now leads the cluster"),
                None => tracing::warn!("this broker no longer leads the cluster"),
            }
            self.changes.send_replace(epoch);
        }
    }

    /// Called when the local deadline passes without a renewal.
    fn lapse_if_due(&self) {
        let due = {
            let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.is_some_and(|(_, until)| Instant::now() >= until)
        };
        if due {
            self.set(None, Instant::now());
        }
    }
}

/// One node of the cluster as `/v1/cluster` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeView {
    pub node: String,
    pub advertise: String,
    pub started_at: String,
    /// Milliseconds since its last heartbeat, by the database's clock.
    pub seen_ms_ago: i64,
    pub leader: bool,
}

/// The cluster as the database sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterView {
    /// The node that asked.
    pub this_node: String,
    pub leader: Option<String>,
    pub epoch: Option<i64>,
    pub lease_ends_at: Option<String>,
    /// Milliseconds until the leader's lease ends (negative: it has lapsed).
    pub lease_ms_left: Option<i64>,
    pub leader_since: Option<String>,
    pub nodes: Vec<NodeView>,
}

/// The election loop and the change listener, on the database's runtime.
pub(super) struct Elector {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    listener: tokio::task::JoinHandle<()>,
    rt: tokio::runtime::Handle,
}

impl Elector {
    pub(super) fn start(
        db: Arc<Db>,
        opts: PgOptions,
        leadership: Leadership,
        healthy: Arc<AtomicBool>,
        changes: broadcast::Sender<String>,
    ) -> Result<Self, StoreError> {
        let stop = Arc::new(AtomicBool::new(false));
        let rt = db.rt().clone();
        let listener = rt.spawn(listen(db.clone(), changes, stop.clone()));
        let task = rt.spawn(elect(db, opts, leadership, healthy, stop.clone()));
        Ok(Self {
            stop,
            task,
            listener,
            rt,
        })
    }

    /// Stop campaigning; a leader resigns so another node takes over now.
    pub(super) fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (task, listener) = (self.task, self.listener);
        self.rt.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), listener).await;
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(Duration::from_secs(4));
    }
}

/// What nodes announce (fences, the policy) reaches every node's
/// subscribers; `resync` after every (re)connection, since announcements
/// made while this node was not listening are lost.
async fn listen(db: Arc<Db>, changes: broadcast::Sender<String>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let (client, mut rx) = match db.listen("leasehold").await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "cannot listen for cluster changes; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let _ = changes.send("resync".into());
        loop {
            tokio::select! {
                n = rx.recv() => match n {
                    Some(n) => {
                        let _ = changes.send(n.payload().to_owned());
                    }
                    None => break,
                },
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
            }
        }
        drop(client);
    }
}

async fn elect(
    db: Arc<Db>,
    opts: PgOptions,
    leadership: Leadership,
    healthy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let period = opts.lease_period;
    let every = period / 3;
    let mut conn: Option<Arc<Conn>> = None;
    let mut first = true;
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let sent = Instant::now();
        let round = tokio::time::timeout(every, async {
            let c = match conn.take().filter(|c| !c.is_closed()) {
                Some(c) => c,
                None => db.connect_async().await?,
            };
            let r = campaign(&c, &opts, first).await;
            conn = Some(c);
            r
        })
        .await;
        match round {
            Ok(Ok(epoch)) => {
                first = false;
                healthy.store(true, Ordering::Relaxed);
                leadership.round_done(sent);
                leadership.set(epoch, sent + period.mul_f64(0.8));
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "leader election: the database did not answer");
                conn = None;
            }
            Err(_) => {
                tracing::warn!("leader election: the database did not answer in time");
                conn = None;
            }
        }
        // sleep until the next round, waking to lapse on time
        let next = sent + every;
        loop {
            leadership.lapse_if_due();
            let now = Instant::now();
            if now >= next || stop.load(Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep((next - now).min(Duration::from_millis(50))).await;
        }
    }
    let was = leadership.epoch();
    leadership.set(None, Instant::now());
    if let Some(c) = conn {
        let node: Param = Box::new(opts.node.clone());
        if was.is_some() {
            let _ = c.query(RESIGN, &[node]).await;
        }
        let node: Param = Box::new(opts.node.clone());
        let _ = c
            .query("DELETE FROM lh_nodes WHERE node = $1", &[node])
            .await;
    }
}

async fn campaign(c: &Conn, opts: &PgOptions, first: bool) -> Result<Option<u64>, StoreError> {
    let e = |e: tokio_postgres::Error| pg_err(&e);
    let params: Vec<Param> = vec![
        Box::new(opts.node.clone()),
        Box::new(opts.advertise.clone()),
        Box::new(first),
    ];
    c.query(HEARTBEAT, &params).await.map_err(e)?;
    let ms = i64::try_from(opts.lease_period.as_millis()).unwrap_or(i64::MAX);
    let params: Vec<Param> = vec![Box::new(opts.node.clone()), Box::new(ms as f64)];
    let rows = c.query(CAMPAIGN, &params).await.map_err(e)?;
    Ok(rows
        .first()
        .map(|r| r.get::<_, i64>(0))
        .and_then(|e| u64::try_from(e).ok()))
}

/// The cluster as the database sees it now.
pub(super) async fn view(c: &Conn, this_node: String) -> Result<ClusterView, StoreError> {
    let e = |e: tokio_postgres::Error| pg_err(&e);
    let leader = c
        .query(
            "SELECT holder, epoch, expires_at::text, \
             (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::bigint, since::text \
             FROM lh_leader WHERE id = 1",
            &[],
        )
        .await
        .map_err(e)?;
    let leader = leader.first();
    let holder: Option<String> = leader.map(|r| r.get(0));
    let left: Option<i64> = leader.map(|r| r.get(3));
    let current = holder.clone().filter(|_| left.is_some_and(|l| l > 0));
    let nodes = c
        .query(
            "SELECT node, advertise, started_at::text, \
             (extract(epoch FROM clock_timestamp() - seen_at) * 1000)::bigint \
             FROM lh_nodes ORDER BY node",
            &[],
        )
        .await
        .map_err(e)?;
    Ok(ClusterView {
        this_node,
        leader: current.clone(),
        epoch: leader.map(|r| r.get(1)),
        lease_ends_at: leader.map(|r| r.get(2)),
        lease_ms_left: left,
        leader_since: leader.map(|r| r.get(4)),
        nodes: nodes
            .iter()
            .map(|r| {
                let node: String = r.get(0);
                NodeView {
                    leader: current.as_deref() == Some(node.as_str()),
                    node,
                    advertise: r.get(1),
                    started_at: r.get(2),
                    seen_ms_ago: r.get(3),
                }
            })
            .collect(),
    })
}
