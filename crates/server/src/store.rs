//! The durable queue's side of the server: choosing a store, loading it at start, and the
//! store thread that commits the broker's pending changes in batches.
//!
//! The store thread sleeps on a condition variable tied to the broker's mutex. It takes
//! everything pending in one swap, commits it without holding the lock (submissions keep
//! arriving meanwhile and form the next batch: group commit), then applies the outcome.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gearbox_store::{log::LogStore, Batch, QueueStore, StoreError};

use crate::broker::Broker;
use crate::shared::Shared;

/// Where the queue is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueSpec {
    /// Not durable: a restart loses every queued job.
    Memory,
    /// The embedded log in this directory.
    Embedded(PathBuf),
    /// A MariaDB/MySQL or PostgreSQL URL.
    Sql(String),
    /// A MariaDB/MySQL or PostgreSQL URL whose table several servers share, with the
    /// nodes' lease (`--cluster`).
    Cluster { url: String, lease: Duration },
}

impl QueueSpec {
    /// Reads `--queue`: `memory`, `embedded` (in `data_dir`), or a `mysql://` / `postgres://` URL.
    pub fn parse(queue: &str, data_dir: &Path) -> Result<QueueSpec, String> {
        match queue {
            "memory" => Ok(QueueSpec::Memory),
            "embedded" => Ok(QueueSpec::Embedded(data_dir.to_path_buf())),
            url if ["mysql://", "mariadb://", "postgres://", "postgresql://"].iter().any(|p| url.starts_with(p)) => {
                Ok(QueueSpec::Sql(url.to_string()))
            }
            other => Err(format!(
                "unknown queue {other:?}: use memory, embedded, mysql://USER@HOST:PORT/DB or postgres://USER@HOST:PORT/DB"
            )),
        }
    }
}

/// Opens the store `spec` names (`None` for memory), waiting up to `lock_wait` for a database
/// table's lock that another session holds (the embedded store never waits). Call it outside
/// any async runtime: SQL stores drive one of their own.
pub fn open_store(spec: &QueueSpec, lock_wait: Duration) -> Result<Option<Box<dyn QueueStore>>, StoreError> {
    Ok(Some(match spec {
        QueueSpec::Memory => return Ok(None),
        QueueSpec::Embedded(dir) => Box::new(LogStore::open(dir, gearbox_store::log::DEFAULT_SEGMENT_BYTES)?),
        QueueSpec::Sql(url) => gearbox_store::open_sql(url, lock_wait)?,
        QueueSpec::Cluster { url, lease } => gearbox_store::cluster::open_cluster_store(url, *lease)?,
    }))
}

/// Opens the lifecycle store beside the queue: a SQLite file in the embedded store's
/// directory, tables beside a database's queue table (shared by a cluster), or memory.
pub(crate) async fn open_lifecycle(
    spec: &QueueSpec,
) -> Result<Arc<dyn gearbox_store::lifecycle::Lifecycle>, StoreError> {
    use gearbox_store::lifecycle::{open_lifecycle, LifecycleTarget};
    let target = match spec {
        QueueSpec::Memory => LifecycleTarget::Memory,
        QueueSpec::Embedded(dir) => LifecycleTarget::File(dir.join("lifecycle.sqlite")),
        QueueSpec::Sql(url) | QueueSpec::Cluster { url, .. } => LifecycleTarget::Url(url.clone()),
    };
    // SQL clients drive a runtime of their own: not on this one's threads.
    tokio::task::spawn_blocking(move || open_lifecycle(target)).await.expect("opening does not panic")
}

/// Opens the store and loads its jobs into `broker`, on a thread of its own (stores block,
/// and SQL stores drive a runtime of their own) so that the caller can give up waiting: for a
/// table's lock, or for a deep queue to load.
pub(crate) async fn open(
    spec: &QueueSpec,
    lock_wait: Duration,
    broker: Broker,
    wake: Arc<Condvar>,
) -> Result<(Broker, Option<Box<dyn QueueStore>>), StoreError> {
    let spec = spec.clone();
    let (done, opened) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = done.send(load(&spec, lock_wait, broker, wake));
    });
    opened.await.expect("the store loader does not panic")
}

fn load(
    spec: &QueueSpec,
    lock_wait: Duration,
    mut broker: Broker,
    wake: Arc<Condvar>,
) -> Result<(Broker, Option<Box<dyn QueueStore>>), StoreError> {
    let Some(mut store) = open_store(spec, lock_wait)? else { return Ok((broker, None)) };
    broker.enable_durability(wake, store.payload_reader(), store.reads_payloads());
    let started = std::time::Instant::now();
    let mut count = 0usize;
    store.load(&mut |job| {
        count += 1;
        broker.restore(job);
    })?;
    broker.number_after(store.highest_seq());
    tracing::info!("queue store: {}; {count} queued jobs loaded in {:.1?}", store.describe(), started.elapsed());
    Ok((broker, Some(store)))
}

pub(crate) struct StoreThread {
    handle: JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

impl StoreThread {
    pub(crate) fn start(store: Box<dyn QueueStore>, shared: Arc<Shared>) -> StoreThread {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name("gearbox-store".into())
            .spawn(move || commit_loop(store, &shared, &thread_stop))
            .expect("spawn the store thread");
        StoreThread { handle, stop }
    }

    /// Commits what is still pending, then ends the thread.
    pub(crate) fn stop(self, shared: &Shared) {
        {
            let _broker = shared.broker.lock().unwrap();
            self.stop.store(true, Ordering::Relaxed);
            shared.store_wake.notify_all();
        }
        let _ = self.handle.join();
    }
}

/// A commit waits this long after the first job it carries for others to join it (measured:
/// 2 ms gives fewer, larger syncs than 0.5 ms at the same throughput)...
const GROUP_WINDOW: Duration = Duration::from_millis(2);
/// ...unless this many jobs are already waiting.
const GROUP_FULL: usize = 256;
/// Removals alone are written this long after the first of them.
const REMOVE_DELAY: Duration = Duration::from_millis(100);
/// After the lifecycle store refused dead jobs, they are tried again after this, doubling...
const BURY_RETRY_FIRST: Duration = Duration::from_millis(100);
/// ...up to this.
const BURY_RETRY_MAX: Duration = Duration::from_secs(30);

fn commit_loop(mut store: Box<dyn QueueStore>, shared: &Shared, stop: &AtomicBool) {
    let mut batch = Batch::default();
    let mut locs = Vec::new();
    let mut fetch = Fetch::default();
    let mut burials = Vec::new();
    // While the lifecycle store refuses dead jobs: when to try again, the next delay, and the
    // removals of their records, held back until they are written.
    let (mut bury_at, mut bury_delay): (Option<Instant>, Duration) = (None, BURY_RETRY_FIRST);
    let mut held: Vec<(u64, gearbox_store::Loc)> = Vec::new();
    loop {
        let took = {
            let mut broker = shared.broker.lock().unwrap();
            loop {
                let stopping = stop.load(Ordering::Relaxed);
                let state = broker.pending_state();
                let bury_due = broker.has_burials() && bury_at.is_none_or(|at| Instant::now() >= at);
                let wait = match (state.jobs_since, state.changes_since) {
                    _ if stopping || broker.wants_payloads() || bury_due => None,
                    // Group commit: one sync for many submissions costs far less than one each.
                    (Some(since), _) if state.jobs < GROUP_FULL => Some(GROUP_WINDOW.saturating_sub(since.elapsed())),
                    (Some(_), _) => None,
                    (None, Some(since)) => Some(REMOVE_DELAY.saturating_sub(since.elapsed())),
                    (None, None) => Some(Duration::MAX),
                };
                let wait = match bury_at.filter(|_| broker.has_burials()) {
                    Some(at) => wait.map(|w| w.min(at.saturating_duration_since(Instant::now()))),
                    None => wait,
                };
                match wait {
                    Some(left) if left == Duration::MAX => broker = shared.store_wake.wait(broker).unwrap(),
                    Some(left) if !left.is_zero() => {
                        broker = shared.store_wake.wait_timeout(broker, left).unwrap().0;
                    }
                    _ => break,
                }
            }
            // At shutdown, dead jobs the lifecycle store keeps refusing stay queued (their
            // removals are not written), to run again after the restart.
            if stop.load(Ordering::Relaxed) && !broker.has_pending() && (!broker.has_burials() || bury_at.is_some()) {
                return;
            }
            batch.clear();
            broker.take_burials(&mut burials);
            let took = broker.has_pending() || !burials.is_empty();
            if took {
                broker.take_pending(&mut batch);
                for (seq, loc) in held.drain(..) {
                    batch.push_remove(seq, loc);
                }
            }
            took
        };
        if took {
            let started = std::time::Instant::now();
            // Dead jobs first: a crash before the batch removes their records leaves them in
            // both places, never in neither. If they cannot be written, their removals wait
            // with them and the rest of the batch goes ahead.
            if !burials.is_empty() {
                let due = bury_at.is_none_or(|at| Instant::now() >= at);
                match due.then(|| bury(store.as_mut(), shared, &mut burials)) {
                    Some(Ok(())) => (bury_at, bury_delay) = (None, BURY_RETRY_FIRST),
                    failed => {
                        if let Some(Err(e)) = failed {
                            tracing::error!("dead jobs not written ({e}); trying again in {bury_delay:?}");
                            bury_at = Some(Instant::now() + bury_delay);
                            bury_delay = (bury_delay * 2).min(BURY_RETRY_MAX);
                        }
                        let seqs: std::collections::HashSet<u64> = burials.iter().map(|b| b.seq).collect();
                        held = batch.take_removes(|seq| seqs.contains(&seq));
                        shared.broker.lock().unwrap().unwritten_burials(std::mem::take(&mut burials));
                    }
                }
            }
            let outcome = store.commit(&batch, &mut locs).map(|()| &locs[..]).map_err(|e| e.to_string());
            burials.clear();
            let took = started.elapsed();
            let mut broker = shared.broker.lock().unwrap();
            broker.observe_commit(took);
            broker.committed(&batch, outcome, store.coalesced());
            drop(broker);
            // Not while dead jobs wait: their records, no longer the broker's, would not be
            // copied, and their payloads are read back from there.
            if held.is_empty() {
                if let Err(e) = compact(store.as_mut(), shared) {
                    tracing::error!("queue store compaction failed: {e}");
                }
            }
        }
        fetch.run(store.as_mut(), shared);
    }
}

/// Writes dead jobs to the lifecycle store, reading back the payloads not in memory.
fn bury(store: &mut dyn QueueStore, shared: &Shared, burials: &mut [crate::broker::Burial]) -> Result<(), String> {
    if burials.is_empty() {
        return Ok(());
    }
    let Some(lifecycle) = shared.lifecycle.as_ref() else { return Ok(()) };
    let wanted: Vec<(u64, gearbox_store::Loc, u32)> = burials.iter().filter_map(|b| b.read_back).collect();
    if !wanted.is_empty() {
        let mut read: std::collections::HashMap<u64, Vec<u8>> = std::collections::HashMap::new();
        match store.payload_reader() {
            Some(reader) => {
                for &(seq, loc, len) in &wanted {
                    let data = reader.read(loc, len).map_err(|e| format!("reading a dead job's payload: {e}"))?;
                    read.insert(seq, data);
                }
            }
            None => {
                let locs: Vec<_> = wanted.iter().map(|&(seq, loc, _)| (seq, loc)).collect();
                store
                    .read_payloads(&locs, &mut |seq, data| {
                        read.insert(seq, data.to_vec());
                    })
                    .map_err(|e| format!("reading dead jobs' payloads: {e}"))?;
            }
        }
        for b in burials.iter_mut() {
            if let Some((seq, _, _)) = b.read_back {
                b.job.data = read.remove(&seq).unwrap_or_default();
            }
        }
    }
    let jobs: Vec<_> = burials.iter().map(|b| b.job.clone()).collect();
    lifecycle.bury(&jobs).map_err(|e| format!("writing dead jobs: {e}"))
}

/// Payload reads for a store that serves them to the store thread only (a database).
#[derive(Default)]
struct Fetch {
    requests: Vec<(u64, gearbox_store::Loc)>,
    /// What was read: sequence numbers and ranges of `arena`.
    found: Vec<(u64, std::ops::Range<usize>)>,
    arena: Vec<u8>,
}

impl Fetch {
    fn run(&mut self, store: &mut dyn QueueStore, shared: &Shared) {
        if !store.reads_payloads() {
            return;
        }
        shared.broker.lock().unwrap().payload_requests(&mut self.requests);
        if self.requests.is_empty() {
            return;
        }
        self.found.clear();
        self.arena.clear();
        let (found, arena) = (&mut self.found, &mut self.arena);
        let outcome = store.read_payloads(&self.requests, &mut |seq, data| {
            let start = arena.len();
            arena.extend_from_slice(data);
            found.push((seq, start..arena.len()));
        });
        let error = outcome.err().map(|e| e.to_string());
        shared.broker.lock().unwrap().payloads_read(&self.requests, &self.found, &self.arena, error.as_deref());
        // A burst's worth of payloads is not kept for the next read.
        if self.arena.capacity() > 16 << 20 {
            self.arena = Vec::new();
        }
    }
}

/// Lets the store move the jobs still queued out of space it wants to reclaim.
fn compact(store: &mut dyn QueueStore, shared: &Shared) -> Result<(), StoreError> {
    let Some(candidates) = store.compaction_candidates()? else { return Ok(()) };
    let live = shared.broker.lock().unwrap().live_stored(&candidates);
    let moved = store.compact(&live)?;
    shared.broker.lock().unwrap().relocate(&moved);
    Ok(())
}
