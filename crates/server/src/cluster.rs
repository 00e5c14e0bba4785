//! A cluster node's thread (`--cluster`): it joins the cluster as a new incarnation, renews
//! the lease, takes over nodes whose lease ran out, claims unowned jobs for idle workers,
//! answers status questions from the database, and keeps the view of every node that the
//! admin `cluster` command, `/api/cluster` and `/metrics` show. The rules of the tables are in
//! `gearbox_store::cluster`; the broker's side is `broker::cluster`.
//!
//! The thread runs a single-threaded runtime of its own with three connections (lease,
//! claims, sweeps), so that neither a slow claim nor a takeover waiting for a dead node's last
//! write holds up a renewal. Timing, for a lease L (10 s by default):
//! - the lease is renewed every L/3, and lets the node dispatch until L − L/5 after the
//!   renewal was sent (the database's copy lasts L from when it ran it);
//! - expired leases are looked for every second, so a dead node's jobs are claimable within
//!   L + 1 s of its last renewal, and claimed at once (PostgreSQL's NOTIFY) or within the poll;
//! - a node that cannot renew in time stops dispatching, forgets its jobs, and joins again as
//!   a new incarnation once the database answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gearbox_store::cluster::{Cancel, ClusterDb, Listener, StatusKey};
use gearbox_store::StoredJob;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::StatusQuery;
use crate::shared::Shared;

/// `--node-lease`'s default.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// How often nodes look for expired leases.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How soon a failed renewal is tried again.
const RENEW_RETRY: Duration = Duration::from_millis(500);
/// How often a node with idle workers looks for unowned jobs without being told (MariaDB has
/// no NOTIFY; on PostgreSQL this catches epoch jobs coming due and lost notifications).
const POLL_MYSQL: Duration = Duration::from_millis(250);
const POLL_POSTGRES: Duration = Duration::from_secs(1);
/// A database call that takes longer is abandoned (the connection made again).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longer for a takeover, which frees a node's jobs in chunks...
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// ...and for a leave at shutdown, which should not hold the exit up for long.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the HTTP side and the admin protocol read about the cluster.
pub(crate) struct ClusterShared {
    pub lease: Duration,
    /// The address this node publishes (host:port of its Gearman listener).
    pub address: String,
    pub view: Mutex<ClusterView>,
    pub counters: Counters,
    /// Wakes the claim loop (the broker notifies it).
    pub wake: Arc<Notify>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub claims: AtomicU64,
    pub claimed_jobs: AtomicU64,
    pub takeovers: AtomicU64,
    pub taken_over_jobs: AtomicU64,
    pub lease_losses: AtomicU64,
    pub status_lookups: AtomicU64,
}

/// Every node as the last refresh saw it (every L/3).
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ClusterView {
    /// This node's incarnation.
    pub node: u64,
    pub nodes: Vec<NodeView>,
    /// Jobs no node owns yet, per function.
    pub unowned: Vec<FunctionCount>,
    pub totals: ClusterTotals,
    /// Why the last refresh failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ClusterTotals {
    pub nodes: usize,
    pub queued: u64,
    pub running: u64,
    pub unowned: u64,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct NodeView {
    pub id: u64,
    pub address: String,
    /// This node.
    pub this: bool,
    /// Seconds since the node last renewed its lease, in the database's clock.
    pub lease_age_secs: f64,
    /// Seconds its lease has left (negative: expired, not yet taken over).
    pub lease_left_secs: f64,
    pub functions: Vec<NodeFunction>,
}

/// What a node publishes with each renewal.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub(crate) struct NodeInfo {
    pub functions: Vec<NodeFunction>,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub(crate) struct NodeFunction {
    pub name: String,
    pub queued: u64,
    pub running: u64,
    pub workers: u64,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct FunctionCount {
    pub function: String,
    pub queued: u64,
}

pub(crate) struct ClusterThread {
    handle: JoinHandle<()>,
    stop: CancellationToken,
}

impl ClusterThread {
    /// Joins the cluster on `url` and runs the node's thread; returns once the node is an
    /// incarnation, or the error that kept it from joining.
    pub(crate) async fn start(shared: Arc<Shared>, url: String) -> Result<ClusterThread, String> {
        let cluster = shared.cluster.clone().expect("a cluster node");
        let stop = CancellationToken::new();
        let (ready, joined) = tokio::sync::oneshot::channel();
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name("gearbox-cluster".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => return drop(ready.send(Err(format!("starting the cluster runtime: {e}")))),
                };
                rt.block_on(run(shared, cluster, url, ready, thread_stop));
            })
            .map_err(|e| format!("starting the cluster thread: {e}"))?;
        match joined.await {
            Ok(Ok(())) => Ok(ClusterThread { handle, stop }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the cluster thread ended before joining".into()),
        }
    }

    /// Leaves the cluster (this node's jobs become claimable at once) and ends the thread.
    /// Call it after the store thread's last commit.
    pub(crate) fn stop(self) {
        self.stop.cancel();
        let _ = self.handle.join();
    }
}

async fn run(
    shared: Arc<Shared>,
    cluster: Arc<ClusterShared>,
    url: String,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
    stop: CancellationToken,
) {
    let lease = cluster.lease;
    let mut db = match ClusterDb::open(&url, lease).await {
        Ok(db) => db,
        Err(e) => return drop(ready.send(Err(e.to_string()))),
    };
    let sent = Instant::now();
    let node = match db.join(&cluster.address, lease).await {
        Ok(node) => node,
        Err(e) => return drop(ready.send(Err(e.to_string()))),
    };
    shared.broker.lock().unwrap().join_cluster(node, sent + valid_for(lease));
    cluster.view.lock().unwrap().node = node;
    tracing::info!("cluster on {}: joined as node {node}, lease {lease:?}", db.describe());
    let _ = ready.send(Ok(()));
    let (claims, sweeps) = (db.another(), db.another());
    tokio::select! {
        _ = lease_loop(&shared, &cluster, &mut db, node, sent) => {}
        _ = claim_loop(&shared, &cluster, claims) => {}
        _ = sweep_loop(&shared, &cluster, sweeps) => {}
        _ = stop.cancelled() => {}
    }
    let node = shared.broker.lock().unwrap().cluster_node();
    if node != 0 {
        // What a slow leave leaves owned is taken over once the lease ends.
        match tokio::time::timeout(LEAVE_TIMEOUT, db.leave(node)).await {
            Ok(Ok(jobs)) => tracing::info!("left the cluster; {jobs} jobs of node {node} are for the others to claim"),
            Ok(Err(e)) => tracing::warn!("leaving the cluster: {e}; other nodes take over once the lease ends"),
            Err(_) => tracing::warn!("leaving the cluster: no answer; other nodes take over once the lease ends"),
        }
    }
}

/// How long after a renewal is sent the node may dispatch: the lease, less a margin for
/// the time the statement took and for clocks.
fn valid_for(lease: Duration) -> Duration {
    lease - lease / 5
}

async fn lease_loop(shared: &Shared, cluster: &ClusterShared, db: &mut ClusterDb, mut node: u64, mut renewed: Instant) {
    let lease = cluster.lease;
    let renew_every = lease / 3;
    let mut valid_until = renewed + valid_for(lease);
    let mut next_try = renewed + renew_every;
    loop {
        tokio::time::sleep_until(next_try.min(valid_until).into()).await;
        let mut lost = None;
        if Instant::now() >= next_try {
            let sent = Instant::now();
            // After a failure, try again soon (but not in a spin).
            next_try = sent + RENEW_RETRY.min(renew_every);
            let info = publish(shared);
            match tokio::time::timeout(renew_every, db.renew(node, lease, &info)).await {
                Ok(Ok(true)) => {
                    renewed = sent;
                    valid_until = sent + valid_for(lease);
                    next_try = sent + renew_every;
                    shared.broker.lock().unwrap().lease_valid_until(valid_until);
                }
                Ok(Ok(false)) => lost = Some("the database says its lease has ended".to_string()),
                Ok(Err(e)) => tracing::warn!("cluster: renewing the lease of node {node}: {e}"),
                Err(_) => {
                    db.reset();
                    tracing::warn!("cluster: renewing the lease of node {node}: no answer in {renew_every:?}");
                }
            }
        }
        if lost.is_none() && Instant::now() >= valid_until {
            lost = Some(format!("not renewed for {:.1?}", renewed.elapsed()));
        }
        if let Some(why) = lost {
            cluster.counters.lease_losses.fetch_add(1, Ordering::Relaxed);
            let dropped = shared.broker.lock().unwrap().leave_cluster();
            tracing::error!(
                "cluster: node {node} lost its lease ({why}): stopped dispatching and forgot its {dropped} \
                 stored jobs (other nodes take them over); joining again"
            );
            (node, renewed) = rejoin(shared, cluster, db).await;
            valid_until = renewed + valid_for(lease);
            next_try = renewed + renew_every;
        }
    }
}

/// Every second: takes over nodes whose lease ended, hands back jobs no worker here can run,
/// and (every lease/3) refreshes the view of the cluster. On a connection of its own, so that
/// a takeover waiting for a dead node's last write never delays a renewal.
async fn sweep_loop(shared: &Shared, cluster: &ClusterShared, mut db: ClusterDb) {
    let mut refreshed: Option<Instant> = None;
    loop {
        let node = shared.broker.lock().unwrap().cluster_node();
        // A takeover frees a dead node's jobs in committed chunks: one cut short by the
        // timeout goes on at the next sweep.
        match tokio::time::timeout(TAKEOVER_TIMEOUT, db.take_over()).await {
            Ok(Ok(taken)) => {
                for t in &taken {
                    if t.resumed {
                        if t.jobs > 0 {
                            tracing::info!(
                                "cluster: went on taking over node {}: {} more jobs are claimable",
                                t.node,
                                t.jobs
                            );
                        }
                    } else {
                        tracing::warn!(
                            "cluster: took over node {} ({}), whose lease ended: {} jobs are claimable",
                            t.node,
                            t.address,
                            t.jobs
                        );
                        cluster.counters.takeovers.fetch_add(1, Ordering::Relaxed);
                    }
                    cluster.counters.taken_over_jobs.fetch_add(t.jobs, Ordering::Relaxed);
                }
                if taken.iter().any(|t| !t.resumed || t.jobs > 0) {
                    cluster.wake.notify_one();
                    // The view shows the dead node gone at once.
                    refreshed = None;
                }
            }
            Ok(Err(e)) => tracing::warn!("cluster: looking for expired nodes: {e}"),
            Err(_) => db.reset(),
        }
        shared.broker.lock().unwrap().release_unserved();
        if refreshed.is_none_or(|at| at.elapsed() >= cluster.lease / 3) {
            refreshed = Some(Instant::now());
            refresh(cluster, &mut db, node).await;
        }
        tokio::time::sleep(SWEEP_EVERY).await;
    }
}

/// Joins again as a new incarnation, trying every second until the database answers.
async fn rejoin(shared: &Shared, cluster: &ClusterShared, db: &mut ClusterDb) -> (u64, Instant) {
    loop {
        let sent = Instant::now();
        match tokio::time::timeout(CALL_TIMEOUT, db.join(&cluster.address, cluster.lease)).await {
            Ok(Ok(node)) => {
                shared.broker.lock().unwrap().join_cluster(node, sent + valid_for(cluster.lease));
                cluster.view.lock().unwrap().node = node;
                tracing::info!("cluster: joined again as node {node}");
                cluster.wake.notify_one();
                return (node, sent);
            }
            Ok(Err(e)) => tracing::warn!("cluster: joining again: {e}"),
            Err(_) => db.reset(),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// This node's functions, as JSON for its row.
fn publish(shared: &Shared) -> String {
    let functions = shared.broker.lock().unwrap().functions_view();
    let info = NodeInfo {
        functions: functions
            .into_iter()
            .filter(|f| f.queued > 0 || f.running > 0 || f.workers > 0)
            .map(|f| NodeFunction {
                name: f.name,
                queued: u64::from(f.queued),
                running: u64::from(f.running),
                workers: u64::from(f.workers),
            })
            .collect(),
    };
    serde_json::to_string(&info).unwrap_or_default()
}

async fn refresh(cluster: &ClusterShared, db: &mut ClusterDb, node: u64) {
    let read = async {
        let nodes = db.nodes().await?;
        let unowned = db.unowned().await?;
        Ok::<_, gearbox_store::StoreError>((nodes, unowned))
    };
    let outcome = tokio::time::timeout(CALL_TIMEOUT, read).await;
    let mut view = cluster.view.lock().unwrap();
    let (nodes, unowned) = match outcome {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => return view.error = Some(e.to_string()),
        Err(_) => return view.error = Some(format!("no answer in {CALL_TIMEOUT:?}")),
    };
    let mut totals = ClusterTotals { nodes: nodes.len(), ..Default::default() };
    view.nodes = nodes
        .into_iter()
        .map(|n| {
            let info: NodeInfo = serde_json::from_str(&n.info).unwrap_or_default();
            for f in &info.functions {
                totals.queued += f.queued;
                totals.running += f.running;
            }
            NodeView {
                id: n.id,
                address: n.address,
                this: n.id == node,
                lease_age_secs: n.renewed_ago.as_secs_f64(),
                lease_left_secs: n.lease_left_micros as f64 / 1e6,
                functions: info.functions,
            }
        })
        .collect();
    view.unowned = unowned
        .into_iter()
        .map(|(f, queued)| {
            totals.unowned += queued;
            FunctionCount { function: String::from_utf8_lossy(&f).into_owned(), queued }
        })
        .collect();
    totals.queued += totals.unowned;
    view.totals = totals;
    view.node = node;
    view.error = None;
}

async fn claim_loop(shared: &Shared, cluster: &ClusterShared, mut db: ClusterDb) {
    let mut listener = match db.listen().await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!("cluster: cannot listen for new jobs ({e}); polling instead");
            None
        }
    };
    let poll = if listener.is_some() { POLL_POSTGRES } else { POLL_MYSQL };
    let (mut wants, mut queries, mut claimed) = (Vec::new(), Vec::new(), Vec::new());
    let mut more = false;
    loop {
        if !more {
            tokio::select! {
                _ = cluster.wake.notified() => {}
                _ = notified(&mut listener) => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
        shared.broker.lock().unwrap().status_queries(&mut queries);
        for q in queries.drain(..) {
            answer_status(shared, cluster, &mut db, q).await;
        }
        let node = {
            let mut broker = shared.broker.lock().unwrap();
            broker.claim_wants(&mut wants);
            broker.cluster_node()
        };
        more = false;
        for (function, limit) in wants.drain(..) {
            more |= claim(shared, cluster, &mut db, node, &function, limit, &mut claimed).await;
        }
    }
}

/// Waits for a notification (forever without a listener).
async fn notified(listener: &mut Option<Listener>) {
    match listener {
        Some(l) => {
            if let Err(e) = l.next().await {
                tracing::warn!("cluster: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Claims up to `limit` jobs of `function`; true if there may be more.
async fn claim(
    shared: &Shared,
    cluster: &ClusterShared,
    db: &mut ClusterDb,
    node: u64,
    function: &Bytes,
    limit: usize,
    claimed: &mut Vec<StoredJob>,
) -> bool {
    claimed.clear();
    let now = crate::broker::unix_now();
    match tokio::time::timeout(CALL_TIMEOUT, db.claim(node, function, now, limit, claimed)).await {
        Ok(Ok(Some(0))) | Ok(Ok(None)) => false,
        Ok(Ok(Some(n))) => {
            cluster.counters.claims.fetch_add(1, Ordering::Relaxed);
            cluster.counters.claimed_jobs.fetch_add(n as u64, Ordering::Relaxed);
            tracing::debug!("cluster: claimed {n} jobs of {}", String::from_utf8_lossy(function));
            if !shared.broker.lock().unwrap().restore_claimed(node, claimed) {
                tracing::warn!(
                    "cluster: claimed {n} jobs as node {node}, which is no more; they wait for its takeover"
                );
            }
            n == limit
        }
        Ok(Err(e)) => {
            tracing::warn!("cluster: claiming jobs of {}: {e}", String::from_utf8_lossy(function));
            restore_uncertain(shared, node, claimed);
            false
        }
        Err(_) => {
            db.reset();
            restore_uncertain(shared, node, claimed);
            false
        }
    }
}

/// A claim whose outcome is unknown (its COMMIT failed or went unanswered) may have made
/// these jobs this node's: it runs them, rather than leave rows it may own unserved. If the
/// claim did not land, another node may run them too (at least once).
fn restore_uncertain(shared: &Shared, node: u64, claimed: &[StoredJob]) {
    if !claimed.is_empty() {
        tracing::warn!("cluster: a claim of {} jobs may or may not have landed; running them here", claimed.len());
        shared.broker.lock().unwrap().restore_claimed(node, claimed);
    }
}

async fn answer_status(shared: &Shared, cluster: &ClusterShared, db: &mut ClusterDb, q: StatusQuery) {
    if q.cancel {
        let reply = match tokio::time::timeout(CALL_TIMEOUT, db.cancel(q.seq.unwrap_or_default())).await {
            Ok(Ok(Cancel::Done)) => {
                tracing::info!("cancelled job {} (no node owned it yet)", String::from_utf8_lossy(&q.unique));
                gearbox_proto::admin::OK.to_string()
            }
            Ok(Ok(Cancel::Owned { node, address })) => {
                format!("ERR JOB_ON_ANOTHER_NODE The+job+belongs+to+node+{node}+at+{address};+cancel+it+there\r\n")
            }
            Ok(Ok(Cancel::Unknown)) => "ERR UNKNOWN_JOB\r\n".to_string(),
            Ok(Err(e)) => format!("ERR QUEUE_ERROR {}\r\n", e.to_string().replace([' ', '\r', '\n'], "+")),
            Err(_) => {
                db.reset();
                "ERR QUEUE_ERROR The+database+did+not+answer\r\n".to_string()
            }
        };
        return shared.broker.lock().unwrap().cancel_answered(q.id, &reply);
    }
    cluster.counters.status_lookups.fetch_add(1, Ordering::Relaxed);
    let key = match q.seq {
        Some(seq) => StatusKey::Seq(seq),
        None => StatusKey::Unique(&q.unique),
    };
    let row = match tokio::time::timeout(CALL_TIMEOUT, db.status(key)).await {
        Ok(Ok(row)) => row,
        Ok(Err(e)) => {
            tracing::warn!("cluster: looking up a job's status: {e}");
            None
        }
        Err(_) => {
            db.reset();
            None
        }
    };
    shared.broker.lock().unwrap().status_answered(q.id, row);
}

/// The admin `cluster` command's answer: a line per node and function (tab-separated:
/// node id, `*` marking the node that answers, address, seconds since its last renewal,
/// function, queued, running, workers), jobs no node owns yet (node `unowned`), a `total`
/// line, then `.`.
pub(crate) fn admin_text(cluster: &ClusterShared) -> String {
    use std::fmt::Write;
    let view = cluster.view.lock().unwrap();
    let mut out = String::new();
    for n in &view.nodes {
        let node = format!("{}{}\t{}\t{:.1}", n.id, if n.this { "*" } else { "" }, n.address, n.lease_age_secs);
        if n.functions.is_empty() {
            let _ = writeln!(out, "{node}\t-\t0\t0\t0");
        }
        for f in &n.functions {
            let _ = writeln!(out, "{node}\t{}\t{}\t{}\t{}", f.name, f.queued, f.running, f.workers);
        }
    }
    for f in &view.unowned {
        let _ = writeln!(out, "unowned\t-\t-\t{}\t{}\t0\t0", f.function, f.queued);
    }
    let t = &view.totals;
    let _ = writeln!(out, "total\t{} nodes\t-\t-\t{}\t{}\t-", t.nodes, t.queued, t.running);
    if let Some(e) = &view.error {
        tracing::debug!("cluster view is stale: {e}");
    }
    out.push_str(".\n");
    out
}
