//! The state every part of a running server shares: the broker behind its lock, and the
//! facts and handles that connection tasks, the store thread and the HTTP side need.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::broker::{AdminInfo, Broker};

pub(crate) struct Shared {
    pub broker: Mutex<Broker>,
    pub max_packet: u32,
    pub admin_info: AdminInfo,
    pub shutdown: CancellationToken,
    /// Wakes the store thread; used with `broker`'s mutex.
    pub store_wake: Arc<Condvar>,
    /// Reads the job log back (`log` admin command); `None` when the log is off.
    pub job_log: Option<Arc<dyn gearbox_joblog::Search>>,
    pub started: Instant,
    /// Set on a cluster node (`--cluster`).
    pub cluster: Option<Arc<crate::cluster::ClusterShared>>,
    /// The dead set, paused functions and fired ticks (see `lifecycle`).
    pub lifecycle: Option<Arc<dyn gearbox_store::lifecycle::Lifecycle>>,
    /// The periodic jobs, for the API and the dashboard.
    pub schedules: crate::lifecycle::Schedules,
    /// TLS, the access list and the audit of refusals.
    pub security: Arc<crate::security::Security>,
}
