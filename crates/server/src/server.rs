//! Accepting connections, the timer task, and orderly shutdown.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::accept_loop;
use crate::broker::{AdminInfo, Broker, BrokerConfig, JobLogInfo};
use crate::cluster::{ClusterShared, ClusterThread};
use crate::shared::Shared;
use crate::store::{open_lifecycle, QueueSpec, StoreThread};

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] gearbox_store::StoreError),
    #[error(transparent)]
    JobLog(#[from] gearbox_joblog::Error),
    #[error("cluster: {0}")]
    Cluster(String),
    #[error("lifecycle store (dead set, paused functions, schedules): {0}")]
    Lifecycle(gearbox_store::StoreError),
    #[error(transparent)]
    Security(#[from] crate::security::SecurityError),
}

/// The sockets a server serves on, bound by the caller.
#[derive(Default)]
pub struct Listeners {
    /// Plaintext Gearman listeners.
    pub gearman: Vec<TcpListener>,
    /// TLS Gearman listeners (`--ssl`, `--ssl-port`).
    pub tls: Vec<TcpListener>,
    /// The dashboard, metrics and API.
    pub http: Option<TcpListener>,
}

/// Settings of a running server that are not about sockets or processes.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub broker: BrokerConfig,
    pub max_packet: u32,
    pub allow_shutdown: bool,
    /// Reported by the admin `verbose` command.
    pub verbose: String,
    pub queue: QueueSpec,
    /// How long opening a database queue waits for its table's lock.
    pub queue_lock_wait: Duration,
    /// `None` records nothing.
    pub job_log: Option<gearbox_joblog::Options>,
    pub lifecycle: crate::lifecycle::LifecycleOptions,
    pub security: crate::security::SecurityOptions,
    /// Notified on SIGHUP: the TLS files and the ACL are read again.
    pub reload: Arc<tokio::sync::Notify>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            broker: BrokerConfig::default(),
            max_packet: gearbox_proto::DEFAULT_MAX_PACKET,
            allow_shutdown: false,
            verbose: "INFO".into(),
            queue: QueueSpec::Memory,
            queue_lock_wait: gearbox_store::DEFAULT_LOCK_WAIT,
            job_log: None,
            lifecycle: Default::default(),
            security: Default::default(),
            reload: Default::default(),
        }
    }
}

/// How long open connections get to flush after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Serves on `listeners` until `shutdown` is cancelled (by the caller, a signal handler, or
/// the admin `shutdown` command), then stops accepting, lets connections flush, commits what
/// the store still has pending, writes the job log's last records, and returns. Fails if the
/// queue store or the job log cannot be opened.
pub async fn serve(
    listeners: Vec<TcpListener>,
    http: Option<TcpListener>,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    serve_on(Listeners { gearman: listeners, tls: Vec::new(), http }, options, shutdown).await
}

/// [`serve`] with TLS listeners beside (or instead of) plaintext ones.
pub async fn serve_on(
    listeners: Listeners,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let Listeners { gearman: listeners, tls: tls_listeners, http } = listeners;
    // Read first: a bad certificate or ACL stops the server before it opens its store.
    let security = Arc::new(crate::security::Security::open(&options.security)?);
    let store_wake = Arc::new(Condvar::new());
    let opening =
        crate::store::open(&options.queue, options.queue_lock_wait, Broker::new(options.broker), store_wake.clone());
    // A signal while the store waits for its table's lock, or loads a deep queue, stops the
    // server then (the waiting thread goes with the process).
    let (mut broker, store) = tokio::select! {
        opened = opening => opened?,
        _ = shutdown.cancelled() => {
            tracing::info!("stopped before the queue store was open");
            return Ok(());
        }
    };
    let job_log = match &options.job_log {
        Some(o) => gearbox_joblog::open(o).await?,
        None => None,
    };
    let (mut log_writer, mut search, mut log_info) = (None, None, None);
    if let Some(opened) = job_log {
        broker.set_job_log(opened.log);
        log_writer = Some(opened.writer);
        search = Some(opened.search);
        let sink = match options.job_log.as_ref().map(|o| &o.spec) {
            Some(gearbox_joblog::Spec::Mongo(_)) => "mongodb",
            _ => "embedded",
        };
        log_info = Some(JobLogInfo { sink, stats: opened.stats });
    }
    let lifecycle = match open_lifecycle(&options.queue).await {
        Ok(store) => store,
        Err(e) => return Err(ServeError::Lifecycle(e)),
    };
    let paused = {
        let store = lifecycle.clone();
        tokio::task::spawn_blocking(move || store.paused()).await.expect("no panic").map_err(ServeError::Lifecycle)?
    };
    broker.set_keep_dead(options.lifecycle.keep_dead);
    if !matches!(options.queue, QueueSpec::Cluster { .. }) {
        let dead = crate::lifecycle::dead_handles(&lifecycle).await.map_err(ServeError::Lifecycle)?;
        let queued: Vec<String> = dead.into_iter().filter(|h| broker.holds(h.as_bytes())).collect();
        crate::lifecycle::forget_dead_still_queued(&lifecycle, queued).await.map_err(ServeError::Lifecycle)?;
    }
    for function in &paused {
        broker.set_paused(function, true);
    }
    for (function, limit) in &options.lifecycle.limits {
        broker.set_limit(function.as_bytes(), *limit);
    }
    let timer = broker.timer_notify();
    let cluster = match &options.queue {
        QueueSpec::Cluster { lease, .. } => {
            let wake = Arc::new(tokio::sync::Notify::new());
            broker.enable_cluster(wake.clone());
            Some(Arc::new(ClusterShared {
                lease: *lease,
                address: node_address(if listeners.is_empty() { &tls_listeners } else { &listeners }),
                view: Default::default(),
                counters: Default::default(),
                wake,
            }))
        }
        _ => None,
    };
    let shared = Arc::new(Shared {
        broker: Mutex::new(broker),
        max_packet: options.max_packet,
        admin_info: AdminInfo {
            version: format!("{} (gearbox)", env!("CARGO_PKG_VERSION")),
            verbose: options.verbose,
            allow_shutdown: options.allow_shutdown,
            job_log: log_info,
        },
        shutdown: shutdown.clone(),
        store_wake,
        job_log: search,
        started: Instant::now(),
        cluster,
        lifecycle: Some(lifecycle),
        schedules: crate::lifecycle::Schedules::new(&options.lifecycle.schedules),
        security: security.clone(),
    });
    crate::lifecycle::spawn(shared.clone(), options.lifecycle.clone(), options.queue == QueueSpec::Memory);
    let store_thread = store.map(|store| StoreThread::start(store, shared.clone()));
    let cluster_thread = match &options.queue {
        QueueSpec::Cluster { url, .. } => match ClusterThread::start(shared.clone(), url.clone()).await {
            Ok(thread) => Some(thread),
            Err(e) => {
                if let Some(thread) = store_thread {
                    let shared = shared.clone();
                    let _ = tokio::task::spawn_blocking(move || thread.stop(&shared)).await;
                }
                return Err(ServeError::Cluster(e));
            }
        },
        _ => None,
    };
    for listener in &listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!("listening on {addr}");
        }
    }
    for listener in &tls_listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!("listening for TLS on {addr}");
        }
    }
    if let Some(acl) = &options.security.acl {
        tracing::info!("access list {} in force", acl.display());
    }
    let tasks = TaskTracker::new();
    tasks.spawn(reload_on(options.reload.clone(), shared.clone()));

    tasks.spawn(run_timer(shared.clone(), timer));
    if let Some(listener) = http {
        tasks.spawn(crate::http::serve(listener, shared.clone(), shutdown.clone()));
    }
    for listener in listeners {
        tasks.spawn(accept_loop(listener, shared.clone(), tasks.clone(), false));
    }
    for listener in tls_listeners {
        tasks.spawn(accept_loop(listener, shared.clone(), tasks.clone(), true));
    }
    shutdown.cancelled().await;
    shared.broker.lock().unwrap().close_all();
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait()).await.is_err() {
        tracing::warn!("some connections did not finish in time; closing them");
    }
    if let Some(thread) = store_thread {
        let shared = shared.clone();
        let _ = tokio::task::spawn_blocking(move || thread.stop(&shared)).await;
    }
    if let Some(thread) = cluster_thread {
        let _ = tokio::task::spawn_blocking(move || thread.stop()).await;
    }
    if let Some(writer) = log_writer {
        shared.broker.lock().unwrap().close_job_log();
        let _ = tokio::task::spawn_blocking(move || writer.stop()).await;
    }
    Ok(())
}

/// What a cluster node publishes as its address: the host name (for a wildcard listener)
/// and the port of its first Gearman listener.
fn node_address(listeners: &[TcpListener]) -> String {
    let Some(addr) = listeners.first().and_then(|l| l.local_addr().ok()) else { return String::new() };
    if addr.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}:{}", host.trim(), addr.port())
    } else {
        addr.to_string()
    }
}

/// Reads the certificates and the ACL again whenever `reload` is notified (SIGHUP).
async fn reload_on(reload: Arc<tokio::sync::Notify>, shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = reload.notified() => {}
        }
        let security = shared.security.clone();
        let _ = tokio::task::spawn_blocking(move || security.reload()).await;
        // Every session looks at its grant now, not at its next request: an idle worker
        // loses the functions it may no longer work on before a job is offered to it.
        shared.broker.lock().unwrap().wake_all();
    }
}

async fn run_timer(shared: Arc<Shared>, wake: Arc<tokio::sync::Notify>) {
    loop {
        let next = shared.broker.lock().unwrap().tick(Instant::now());
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = wake.notified() => {}
        }
    }
}
