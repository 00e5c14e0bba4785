//! The job broker: functions, queues, jobs, workers and waiting clients.
//!
//! All state changes happen here, synchronously, under one lock held only while a batch of
//! packets is applied (never across an await). Replies and forwarded results are encoded
//! straight into the target connection's [`Outbox`]; the connection's own task writes them.
//!
//! One noun per file:
//! - this file: the [`Broker`] itself and [`Broker::apply`], which hands each packet to the
//!   rule that handles it;
//! - `job`: a job's record, its indices (by handle, by function and unique key), and how a
//!   job ends (finished, dropped, logged);
//! - `client`: submissions, coalescing by unique key, the clients waiting on a job, status;
//! - `worker`: abilities, grabbing jobs, work results, lost and timed-out workers;
//! - `function`: a function's queues, counters and sleeping workers;
//! - `conn`: connections and sending to them;
//! - `timer`: epoch jobs, CAN_DO_TIMEOUT deadlines and the wake-up sweep;
//! - `durable`: the durable store's side (pending jobs, held replies, restore);
//! - `admin`, `views`, `stats`: the admin protocol, copies for HTTP, counters.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use gearbox_proto::{PacketType as T, Priority, Request};
use hashbrown::HashTable;
use slab::Slab;
use tokio::sync::Notify;

mod admin;
mod client;
mod cluster;
mod conn;
mod durable;
mod footprint;
mod function;
mod job;
mod lifecycle;
mod payload;
mod stats;
mod timer;
mod views;
mod worker;

pub use admin::{AdminInfo, JobLogInfo};
pub use cluster::StatusQuery;
use conn::Conn;
use durable::Durability;

pub use durable::PendingState;
use function::Function;
use gearbox_joblog::JobLog;
use job::Job;
pub use lifecycle::{defaults as lifecycle_defaults, Backoff, Burial, RetryPolicies, RetryPolicy};

pub use stats::{FunctionCounts, Histogram, Totals, BUCKET_BOUNDS_US};
pub use timer::unix_now;
pub use views::{CancelError, FunctionView, JobView, WorkerView};

pub type ConnId = u32;
type JobKey = u32;
type FunctionId = u32;

/// Longest unique key accepted.
pub const MAX_UNIQUE: usize = 255;
/// Longest function name accepted (gearmand's limit).
pub const MAX_FUNCTION: usize = 512;

#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Attempts before a job whose workers keep disappearing is failed; 0 = no limit.
    pub job_retries: u32,
    /// Host name used in job handles (`H:HOST:N`).
    pub host: String,
    /// A connection whose unsent output grows past this is closed.
    pub max_outbox: usize,
    /// Retries of failed background jobs, by function (none by default, as gearmand).
    pub retry: RetryPolicies,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            job_retries: 0,
            host: "gearbox".into(),
            max_outbox: 256 * 1024 * 1024,
            retry: RetryPolicies::default(),
        }
    }
}

/// What an admin command asks of the server beyond its reply.
#[derive(Debug, PartialEq, Eq)]
pub enum AdminEffect {
    None,
    Shutdown { graceful: bool },
}

/// A job handle formatted on the stack: `H:HOST:SEQ`.
pub struct Handle {
    buf: [u8; 64],
    len: usize,
}

impl std::ops::Deref for Handle {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

pub struct Broker {
    config: BrokerConfig,
    /// `H:HOST:`, at most 40 bytes so a handle always fits in 64.
    handle_prefix: Vec<u8>,
    /// Next job sequence number. Starts at the boot time in microseconds so that handles
    /// stay unique across restarts (the server hands out far fewer than a million a second).
    next_seq: u64,
    jobs: Slab<Job>,
    by_seq: HashTable<JobKey>,
    by_unique: HashTable<JobKey>,
    hasher: hashbrown::DefaultHashBuilder,
    functions: Vec<Function>,
    /// Names are the clients' to choose: hashed as the job indices are (seeded per process).
    function_ids: hashbrown::HashMap<Bytes, FunctionId>,
    conns: Slab<Conn>,
    /// The connection whose packets are being applied; its task flushes without a wake-up.
    current: Option<ConnId>,
    scheduled: BinaryHeap<Reverse<(i64, u64, JobKey)>>,
    timeouts: BinaryHeap<Reverse<(Instant, u64, u16, JobKey)>>,
    timer: Arc<Notify>,
    timer_at: Option<Instant>,
    last_sweep: Instant,
    durable: Option<Durability>,
    /// Set on a cluster node.
    cluster: Option<cluster::ClusterState>,
    /// Connections with held replies.
    held_conns: Vec<ConnId>,
    job_log: Option<JobLog>,
    next_serial: u32,
    /// Live connections by [`Conn::serial`].
    serials: HashMap<u32, ConnId>,
    commit_times: Histogram,
    /// [`FunctionCounts::totals`] of dropped functions, so that server totals never go down.
    dropped_totals: Totals,
    /// Retry policies, changed at runtime by the admin and HTTP sides.
    retry: RetryPolicies,
    /// When each job whose record is being rewritten for a retry is due (Unix ms).
    retry_due: HashMap<u64, i64>,
    /// Dead jobs not yet written (see `lifecycle`).
    burials: Vec<Burial>,
    keep_dead: bool,
    /// Pauses and resumes made here (see [`Broker::sync_paused`]).
    pause_changes: u64,
}

impl Broker {
    pub fn new(config: BrokerConfig) -> Broker {
        let host: String = config.host.chars().filter(|c| !c.is_whitespace() && *c != ':').take(36).collect();
        let handle_prefix = format!("H:{host}:").into_bytes();
        let boot_micros = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64);
        let retry = config.retry.clone();
        Broker {
            config,
            handle_prefix,
            next_seq: boot_micros,
            jobs: Slab::new(),
            by_seq: HashTable::new(),
            by_unique: HashTable::new(),
            hasher: Default::default(),
            functions: Vec::new(),
            function_ids: hashbrown::HashMap::new(),
            conns: Slab::new(),
            current: None,
            scheduled: BinaryHeap::new(),
            timeouts: BinaryHeap::new(),
            timer: Arc::new(Notify::new()),
            timer_at: None,
            last_sweep: Instant::now(),
            durable: None,
            cluster: None,
            held_conns: Vec::new(),
            job_log: None,
            next_serial: 0,
            serials: HashMap::new(),
            commit_times: Histogram::default(),
            dropped_totals: Totals::default(),
            retry,
            retry_due: HashMap::new(),
            burials: Vec::new(),
            keep_dead: true,
            pause_changes: 0,
        }
    }

    /// Records every job attempt's end in `log` from now on.
    pub fn set_job_log(&mut self, log: JobLog) {
        self.job_log = Some(log);
    }

    /// Hands the job log's last records to its writer (shutdown).
    pub fn close_job_log(&mut self) {
        if let Some(log) = self.job_log.as_mut() {
            log.close();
        }
    }

    /// Notified when a deadline earlier than the timer's current one is added.
    pub fn timer_notify(&self) -> Arc<Notify> {
        self.timer.clone()
    }

    fn handle(&self, seq: u64) -> Handle {
        let mut h = Handle { buf: [0; 64], len: self.handle_prefix.len() };
        h.buf[..h.len].copy_from_slice(&self.handle_prefix);
        let mut digits = itoa::Buffer::new();
        let d = digits.format(seq).as_bytes();
        h.buf[h.len..h.len + d.len()].copy_from_slice(d);
        h.len += d.len();
        h
    }

    /// The sequence number in a handle of this server; in a cluster, of any node (`H:HOST:N`
    /// whatever the host).
    fn parse_handle(&self, handle: &[u8]) -> Option<u64> {
        let digits = match handle.strip_prefix(self.handle_prefix.as_slice()) {
            Some(digits) => digits,
            None if self.in_cluster() && handle.starts_with(b"H:") => {
                &handle[handle.iter().rposition(|&b| b == b':')? + 1..]
            }
            None => return None,
        };
        std::str::from_utf8(digits).ok()?.parse().ok()
    }

    pub fn apply(&mut self, conn: ConnId, req: Request) {
        match req {
            Request::SubmitJob { function, unique, data, priority, background } => {
                self.submit(conn, &function, &unique, &data, priority, background, None)
            }
            Request::SubmitJobEpoch { function, unique, epoch, data } => {
                self.submit(conn, &function, &unique, &data, Priority::Normal, true, Some(epoch))
            }
            Request::SubmitJobSched { .. } => {
                self.send_error(conn, "INVALID_COMMAND", "SUBMIT_JOB_SCHED is not supported; use SUBMIT_JOB_EPOCH")
            }
            Request::SubmitReduceJob { .. } => {
                self.send_error(conn, "INVALID_COMMAND", "Reduce jobs are not supported")
            }
            Request::GrabJob(kind) => self.grab(conn, kind),
            Request::PreSleep => self.pre_sleep(conn),
            Request::CanDo { function } => self.can_do(conn, &function, 0),
            Request::CanDoTimeout { function, timeout } => self.can_do(conn, &function, timeout),
            Request::CantDo { function } => self.cant_do(conn, &function),
            Request::ResetAbilities => self.reset_abilities(conn),
            Request::WorkStatus { handle, numerator, denominator } => {
                self.work_status(conn, &handle, numerator, denominator)
            }
            Request::WorkData { handle, data } => self.forward(conn, T::WorkData, &handle, &data),
            Request::WorkWarning { handle, data } => self.forward(conn, T::WorkWarning, &handle, &data),
            Request::WorkComplete { handle, data } => self.work_complete(conn, &handle, &data),
            Request::WorkFail { handle } => self.work_fail(conn, &handle),
            Request::WorkException { handle, data } => self.work_exception(conn, &handle, &data),
            Request::GetStatus { handle } => {
                let job = self.find_by_handle(&handle);
                if job.is_none() && self.in_cluster() && self.parse_handle(&handle).is_some() {
                    return self.ask_cluster(conn, T::StatusRes, &handle);
                }
                self.send_status(conn, T::StatusRes, &handle, job);
            }
            Request::GetStatusUnique { unique } => {
                // The unique key alone does not name a function; report the first match.
                let job = (0..self.functions.len() as FunctionId).find_map(|fid| self.find_by_unique(fid, &unique));
                if job.is_none() && self.in_cluster() && !unique.is_empty() {
                    return self.ask_cluster(conn, T::StatusResUnique, &unique);
                }
                self.send_status(conn, T::StatusResUnique, &unique, job);
            }
            Request::EchoReq { data } => self.send(conn, T::EchoRes, &[&data]),
            Request::OptionReq { option } => {
                if option.eq_ignore_ascii_case(b"exceptions") {
                    self.conns[conn as usize].exceptions = true;
                    self.send(conn, T::OptionRes, &[&option]);
                } else if option.starts_with(b"auth=") {
                    // The session has checked the token against the ACL (`security::Access`);
                    // the reply names the option, never the token.
                    self.send(conn, T::OptionRes, &[b"auth"]);
                } else {
                    self.send_error(conn, "UNKNOWN_OPTION", "Server does not recognize given option");
                }
            }
            Request::SetClientId { id } => self.conns[conn as usize].client_id = Some(id),
            Request::AllYours => {}
        }
    }
}

#[cfg(test)]
mod tests;
