//! The job lifecycle's server side: the dead set (list, show, retry, delete), pausing
//! functions, and the task that keeps the lifecycle state in step — the dead set's retention,
//! a cluster's paused functions, dead jobs of a server without a durable store, and periodic
//! jobs (`schedule`). Each operation blocks on the lifecycle store
//! (`gearbox_store::lifecycle`) on a blocking thread, never under the broker's lock.

pub(crate) mod admin;
pub mod config;
mod schedule;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gearbox_proto::{Priority, Request, Response};
use gearbox_store::lifecycle::{DeadEntry, DeadFilter, DeadJob, Lifecycle};

use crate::http::local::LocalConn;
use crate::shared::Shared;
pub use config::{LifecycleOptions, Schedule};
pub use schedule::validate as validate_schedules;
pub use schedule::ScheduleView;
pub(crate) use schedule::Schedules;

/// Dead jobs an operation acts on per round trip to the lifecycle store.
const PAGE: usize = 1000;

/// The error of a [`Retried`] whose handle is not in the dead set.
pub(crate) const NOT_DEAD: &str = "not in the dead set";

/// Which dead jobs an operation acts on.
#[derive(Clone, Debug)]
pub enum Selection {
    Handles(Vec<String>),
    /// Every dead job, or every one of a function.
    All {
        function: Option<Vec<u8>>,
    },
}

/// A dead job retried: its old handle, and the handle of the job that runs it now (or why it
/// could not be submitted).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Retried {
    pub handle: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_handle: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn store(shared: &Shared) -> Result<Arc<dyn Lifecycle>, String> {
    shared.lifecycle.clone().ok_or_else(|| "the lifecycle store is not open".to_string())
}

/// Runs `op` on the lifecycle store on a blocking thread.
async fn blocking<T: Send + 'static>(
    shared: &Shared,
    op: impl FnOnce(&dyn Lifecycle) -> gearbox_store::Result<T> + Send + 'static,
) -> Result<T, String> {
    let store = store(shared)?;
    tokio::task::spawn_blocking(move || op(store.as_ref()).map_err(|e| e.to_string()))
        .await
        .map_err(|e| format!("lifecycle store task: {e}"))?
}

pub(crate) async fn dead_list(shared: &Shared, filter: DeadFilter) -> Result<Vec<DeadEntry>, String> {
    blocking(shared, move |s| s.dead_list(&filter)).await
}

/// Dead jobs per function.
pub(crate) async fn dead_counts(shared: &Shared) -> Result<Vec<(Vec<u8>, u64)>, String> {
    blocking(shared, |s| s.dead_counts()).await
}

pub(crate) async fn dead_get(shared: &Shared, handle: String) -> Result<Option<DeadJob>, String> {
    blocking(shared, move |s| s.dead_get(&handle)).await
}

/// The handles a selection names, read once: jobs that die meanwhile (a retried job
/// failing again) are not taken up again.
async fn selected(shared: &Shared, selection: Selection) -> Result<Vec<String>, String> {
    match selection {
        Selection::Handles(handles) => Ok(handles),
        Selection::All { function } => {
            let filter = DeadFilter { function, limit: 0, offset: 0 };
            Ok(dead_list(shared, filter).await?.into_iter().map(|e| e.handle).collect())
        }
    }
}

/// Removes the selected dead jobs; returns how many there were.
pub(crate) async fn dead_delete(shared: &Shared, selection: Selection) -> Result<u64, String> {
    let mut removed = 0;
    for page in selected(shared, selection).await?.chunks(PAGE) {
        let page = page.to_vec();
        removed += blocking(shared, move |s| s.dead_remove(&page)).await?;
    }
    Ok(removed)
}

/// Runs the selected dead jobs again: each is submitted as a new background job with its
/// function, unique key, priority and payload (a job already queued under that unique key
/// takes it over, as any submission would), then leaves the dead set once the server has
/// acknowledged it. Handles not in the dead set are reported with an error. A page of jobs
/// is submitted at once, so their acknowledgements share commits.
pub(crate) async fn dead_retry(shared: &Arc<Shared>, selection: Selection) -> Result<Vec<Retried>, String> {
    let mut out = Vec::new();
    let mut conn = LocalConn::open(shared);
    for page in selected(shared, selection).await?.chunks(PAGE) {
        let page = page.to_vec();
        let jobs = blocking(shared, move |s| {
            page.into_iter().map(|h| s.dead_get(&h).map(|job| (h, job))).collect::<gearbox_store::Result<Vec<_>>>()
        })
        .await?;
        // Answers in the order of the selection; the submitted ones' come back in order.
        let mut sent = Vec::new();
        for (handle, job) in jobs {
            let Some(job) = job else {
                out.push(Retried { handle, new_handle: None, error: Some("not in the dead set".into()) });
                continue;
            };
            let priority = match job.priority {
                0 => Priority::High,
                2 => Priority::Low,
                _ => Priority::Normal,
            };
            conn.send(Request::SubmitJob {
                function: Bytes::from(job.function),
                unique: Bytes::from(job.unique),
                data: Bytes::from(job.data),
                priority,
                background: true,
            });
            sent.push(out.len());
            out.push(Retried { handle, new_handle: None, error: None });
        }
        let mut submitted = Vec::new();
        for i in sent {
            let answer = &mut out[i];
            match conn.recv().await {
                Response::JobCreated { handle: new } => {
                    submitted.push(answer.handle.clone());
                    answer.new_handle = Some(String::from_utf8_lossy(&new).into_owned());
                }
                Response::Error { code, text } => {
                    let why = format!("{}: {}", String::from_utf8_lossy(&code), String::from_utf8_lossy(&text));
                    answer.error = Some(why);
                }
                other => answer.error = Some(format!("unexpected {other:?}")),
            }
        }
        blocking(shared, move |s| s.dead_remove(&submitted)).await?;
    }
    Ok(out)
}

/// Pauses or resumes `function` on this server, and in the lifecycle store so that a restart
/// (and every cluster node, within a second) keeps it.
pub(crate) async fn set_paused(shared: &Shared, function: Vec<u8>, paused: bool) -> Result<(), String> {
    let name = function.clone();
    blocking(shared, move |s| s.set_paused(&name, paused)).await?;
    let mut broker = shared.broker.lock().unwrap();
    // Called from no connection's packets (the HTTP API; an admin connection after its
    // await): without this, the NOOP a resume sends to the connection whose packets were
    // applied last (often a worker that has just sent PRE_SLEEP) would not wake its task, and
    // that worker would sleep on with jobs queued.
    broker.begin_external();
    broker.set_paused(&function, paused);
    Ok(())
}

/// Every handle in the dead set.
pub(crate) async fn dead_handles(lifecycle: &Arc<dyn Lifecycle>) -> gearbox_store::Result<Vec<String>> {
    let store = lifecycle.clone();
    let dead = tokio::task::spawn_blocking(move || store.dead_list(&DeadFilter::default())).await.expect("no panic")?;
    Ok(dead.into_iter().map(|e| e.handle).collect())
}

/// Removes from the dead set the jobs the queue still holds (`queued`): a crash between
/// writing a dead job and removing its record leaves it in both, and the queue runs it again.
pub(crate) async fn forget_dead_still_queued(
    lifecycle: &Arc<dyn Lifecycle>,
    queued: Vec<String>,
) -> gearbox_store::Result<()> {
    if queued.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        "dead set: {} jobs are queued again (the server stopped before their records were removed)",
        queued.len()
    );
    let store = lifecycle.clone();
    tokio::task::spawn_blocking(move || store.dead_remove(&queued)).await.expect("no panic").map(drop)
}

/// Starts the lifecycle task: see the module's description. Ends with `shared.shutdown`.
pub(crate) fn spawn(shared: Arc<Shared>, options: LifecycleOptions, memory_queue: bool) {
    spawn_schedules(shared.clone());
    tokio::spawn(async move {
        let mut expired_at = tokio::time::Instant::now();
        let mut second = tokio::time::interval(Duration::from_secs(1));
        second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = second.tick() => {}
            }
            if memory_queue {
                write_burials(&shared).await;
            }
            if shared.cluster.is_some() {
                // A pause or resume here while the list is read makes the list stale.
                let changes = shared.broker.lock().unwrap().pause_changes();
                match blocking(&shared, |s| s.paused()).await {
                    Ok(paused) => {
                        let mut broker = shared.broker.lock().unwrap();
                        broker.begin_external();
                        broker.sync_paused(&paused, changes);
                    }
                    Err(e) => tracing::warn!("lifecycle store: reading paused functions: {e}"),
                }
            }
            if expired_at.elapsed() >= Duration::from_secs(60) {
                expired_at = tokio::time::Instant::now();
                expire(&shared, &options).await;
            }
        }
    });
}

/// Fires the schedules' ticks, on a task of their own: the lifecycle task can wait seconds
/// for a database.
fn spawn_schedules(shared: Arc<Shared>) {
    let schedules = shared.schedules.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = tick.tick() => schedules.fire_due(&shared).await,
            }
        }
    });
}

/// Writes dead jobs of a server without a durable store (a durable one's store thread
/// writes them with the batch that removes their records).
async fn write_burials(shared: &Shared) {
    let mut burials = Vec::new();
    shared.broker.lock().unwrap().take_burials(&mut burials);
    if burials.is_empty() {
        return;
    }
    let jobs: Vec<DeadJob> = burials.iter().map(|b| b.job.clone()).collect();
    if let Err(e) = blocking(shared, move |s| s.bury(&jobs)).await {
        tracing::error!("lifecycle store: writing dead jobs: {e}; trying again");
        shared.broker.lock().unwrap().unwritten_burials(burials);
    }
}

async fn expire(shared: &Shared, options: &LifecycleOptions) {
    let before = options.dead_max_age.map(|age| gearbox_joblog::now_millis() - age.as_millis() as i64);
    let keep = options.dead_max_jobs;
    match blocking(shared, move |s| s.dead_expire(before, keep)).await {
        Ok(0) => {}
        Ok(n) => tracing::info!("dead set: {n} jobs past their retention removed"),
        Err(e) => tracing::warn!("dead set retention: {e}"),
    }
}
