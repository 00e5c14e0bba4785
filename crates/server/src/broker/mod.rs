//! The job broker: functions, queues, jobs, workers and waiting clients.
//!
//! All state changes happen here, synchronously, under one lock held only while a batch of
//! packets is applied (never across an await). Replies and forwarded results are encoded
//! straight into the target connection's [`Outbox`]; the connection's own task writes them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use gearbox_proto::{encode_packet, GrabKind, Magic, PacketType as T, Priority, Request};
use hashbrown::HashTable;
use slab::Slab;
use tokio::sync::Notify;

use crate::outbox::Outbox;

mod admin;
mod durable;
mod stats;
mod views;

pub use admin::{AdminInfo, JobLogInfo};
pub use durable::PendingState;
use durable::{Durability, Held};
use gearbox_joblog::{now_millis, JobLog, Millis, RecordRef, Status as Outcome};
use gearbox_store::Loc;
pub use stats::{FunctionCounts, Histogram, BUCKET_BOUNDS_US};
use std::cell::RefCell;
pub use views::{CancelError, FunctionView, JobView, WorkerView};

pub type ConnId = u32;
type JobKey = u32;
type FunctionId = u32;

/// Longest unique key accepted.
pub const MAX_UNIQUE: usize = 255;
/// Longest function name accepted (gearmand's limit).
pub const MAX_FUNCTION: usize = 512;
/// Shortest job timeout honoured for CAN_DO_TIMEOUT, as in gearmand.
const MIN_JOB_TIMEOUT: Duration = Duration::from_millis(1000);
/// How often queued functions with sleeping workers get a second wake-up, in case the
/// worker woken first went away without taking the job.
const WAKE_SWEEP: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Attempts before a job whose workers keep disappearing is failed; 0 = no limit.
    pub job_retries: u32,
    /// Host name used in job handles (`H:HOST:N`).
    pub host: String,
    /// A connection whose unsent output grows past this is closed.
    pub max_outbox: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig { job_retries: 0, host: "gearbox".into(), max_outbox: 256 * 1024 * 1024 }
    }
}

struct Function {
    name: Bytes,
    /// Job keys per priority, FIFO. May hold keys of dropped jobs (cancelled or abandoned),
    /// which are skipped and freed when they reach the front.
    queues: [VecDeque<JobKey>; 3],
    queued: [u32; 3],
    scheduled: u32,
    running: u32,
    workers: u32,
    max_queue: [u32; 3],
    /// Workers that sent PRE_SLEEP, with the sleep epoch at the time; stale entries are skipped.
    sleepers: VecDeque<(ConnId, u32)>,
    dropped: bool,
    counts: FunctionCounts,
}

impl Function {
    fn new(name: Bytes) -> Function {
        Function {
            name,
            queues: Default::default(),
            queued: [0; 3],
            scheduled: 0,
            running: 0,
            workers: 0,
            max_queue: [0; 3],
            sleepers: VecDeque::new(),
            dropped: false,
            counts: FunctionCounts::default(),
        }
    }

    fn queued_total(&self) -> u32 {
        self.queued.iter().sum()
    }

    fn total(&self) -> u32 {
        self.queued_total() + self.running + self.scheduled
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum JobState {
    Queued,
    /// Waiting for its epoch time (SUBMIT_JOB_EPOCH).
    Scheduled,
    Running(PackedConn),
    /// Waiting for the durable store to commit it; not yet runnable.
    Pending,
    /// Removed from every index but still referenced by a queue or the schedule heap.
    Dropped,
}

/// A [`ConnId`] kept as bytes: with no 4-byte alignment, [`JobState`] packs into 5 bytes and
/// [`Job`] into 72.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct PackedConn([u8; 4]);

impl PackedConn {
    fn new(conn: ConnId) -> PackedConn {
        PackedConn(conn.to_ne_bytes())
    }

    fn get(self) -> ConnId {
        ConnId::from_ne_bytes(self.0)
    }
}

/// Kept small: a deep queue holds millions of these.
struct Job {
    seq: u64,
    /// Where the durable store keeps the job.
    loc: Loc,
    /// The unique key followed by the payload (when `in_ram`), in one allocation.
    body: Box<[u8]>,
    /// Waiting clients and progress, for the jobs that have them.
    extra: Option<Box<JobExtra>>,
    /// Milliseconds since the epoch (for a job loaded from the store: when it was loaded).
    submitted_at: Millis,
    /// The [`Conn::serial`] of the connection that submitted it.
    submitter: u32,
    function: FunctionId,
    payload_len: u32,
    state: JobState,
    attempts: u16,
    unique_len: u16,
    priority: Priority,
    background: bool,
    /// False when the payload was dropped from memory to be read back from the store.
    in_ram: bool,
}

#[derive(Default)]
struct JobExtra {
    /// Foreground clients waiting for the result.
    clients: Vec<ConnId>,
    numerator: u32,
    denominator: u32,
}

const _: () = assert!(std::mem::size_of::<Job>() <= 72, "Job grew: every queued job pays for it");

impl Job {
    fn clients(&self) -> &[ConnId] {
        self.extra.as_ref().map_or(&[], |e| &e.clients)
    }

    fn extra_mut(&mut self) -> &mut JobExtra {
        self.extra.get_or_insert_with(Default::default)
    }

    fn progress(&self) -> (u32, u32) {
        self.extra.as_ref().map_or((0, 0), |e| (e.numerator, e.denominator))
    }

    fn unique(&self) -> &[u8] {
        &self.body[..self.unique_len as usize]
    }

    /// The payload, when in memory (see [`Broker::payload`]).
    fn data(&self) -> &[u8] {
        &self.body[self.unique_len as usize..]
    }
}

struct Ability {
    function: FunctionId,
    timeout: Option<Duration>,
}

/// A job a worker is running, and since when.
struct Running {
    key: JobKey,
    started_at: Millis,
}

struct Conn {
    outbox: Arc<Outbox>,
    fd: i32,
    ip: Box<str>,
    /// `IP:PORT`, naming the connection in the job log when it set no client id.
    peer: Box<str>,
    /// Never reused, unlike the connection's slab key: jobs remember their submitter by it.
    serial: u32,
    client_id: Option<Bytes>,
    abilities: Vec<Ability>,
    sleeping: bool,
    sleep_epoch: u32,
    exceptions: bool,
    /// Jobs assigned to this worker connection.
    running: Vec<Running>,
    /// The last job this worker ended with WORK_EXCEPTION. Some workers (Perl's
    /// Gearman::Worker) follow the exception with a WORK_FAIL, which is then ignored instead
    /// of answered with an ERROR they cannot handle.
    excepted: Option<u64>,
    /// Foreground jobs this client waits on.
    waiting: HashSet<JobKey>,
    /// Replies waiting behind a JOB_CREATED that waits for the durable store.
    held: RefCell<Option<VecDeque<Held>>>,
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
    function_ids: HashMap<Bytes, FunctionId>,
    conns: Slab<Conn>,
    /// The connection whose packets are being applied; its task flushes without a wake-up.
    current: Option<ConnId>,
    scheduled: BinaryHeap<Reverse<(i64, u64, JobKey)>>,
    timeouts: BinaryHeap<Reverse<(Instant, u64, u16, JobKey)>>,
    timer: Arc<Notify>,
    timer_at: Option<Instant>,
    last_sweep: Instant,
    durable: Option<Durability>,
    /// Connections with held replies.
    held_conns: Vec<ConnId>,
    job_log: Option<JobLog>,
    next_serial: u32,
    /// Live connections by [`Conn::serial`].
    serials: HashMap<u32, ConnId>,
    commit_times: Histogram,
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Time from `now` to the unix time `at`, at most a day (the timer looks again by then), so
/// a far-future epoch cannot overflow an `Instant`.
fn until(at: i64, now: i64) -> Duration {
    Duration::from_secs(at.saturating_sub(now).clamp(0, 86_400) as u64)
}

fn seq_hash(seq: u64) -> u64 {
    seq.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl Broker {
    pub fn new(config: BrokerConfig) -> Broker {
        let host: String = config.host.chars().filter(|c| !c.is_whitespace() && *c != ':').take(36).collect();
        let handle_prefix = format!("H:{host}:").into_bytes();
        let boot_micros = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64);
        Broker {
            config,
            handle_prefix,
            next_seq: boot_micros,
            jobs: Slab::new(),
            by_seq: HashTable::new(),
            by_unique: HashTable::new(),
            hasher: Default::default(),
            functions: Vec::new(),
            function_ids: HashMap::new(),
            conns: Slab::new(),
            current: None,
            scheduled: BinaryHeap::new(),
            timeouts: BinaryHeap::new(),
            timer: Arc::new(Notify::new()),
            timer_at: None,
            last_sweep: Instant::now(),
            durable: None,
            held_conns: Vec::new(),
            job_log: None,
            next_serial: 0,
            serials: HashMap::new(),
            commit_times: Histogram::default(),
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

    // ----- connections -----

    pub fn connect(&mut self, outbox: Arc<Outbox>, fd: i32, ip: &str, port: u16) -> ConnId {
        let serial = self.next_serial;
        self.next_serial = self.next_serial.wrapping_add(1);
        let id = self.conns.insert(Conn {
            outbox,
            fd,
            ip: ip.into(),
            peer: format!("{ip}:{port}").into(),
            serial,
            client_id: None,
            abilities: Vec::new(),
            sleeping: false,
            sleep_epoch: 0,
            exceptions: false,
            running: Vec::new(),
            excepted: None,
            waiting: HashSet::new(),
            held: RefCell::new(None),
        }) as ConnId;
        self.serials.insert(serial, id);
        id
    }

    pub fn disconnect(&mut self, conn: ConnId) {
        // Whatever this sends goes to other connections, whose tasks must be woken.
        self.current = None;
        let Some(c) = self.conns.get_mut(conn as usize) else {
            return;
        };
        c.sleeping = false;
        let abilities = std::mem::take(&mut c.abilities);
        let running = std::mem::take(&mut c.running);
        for ability in abilities {
            self.functions[ability.function as usize].workers -= 1;
        }
        // The connection stays known until its jobs are logged with its name.
        for r in running {
            self.lose_worker(r.key, Outcome::LostWorker, Some(conn), r.started_at);
        }
        let mut c = self.conns.remove(conn as usize);
        self.serials.remove(&c.serial);
        for key in c.waiting.drain() {
            self.detach_client(key, conn);
        }
    }

    /// Asks every connection to flush and close (server shutdown).
    pub fn close_all(&self) {
        for (_, c) in &self.conns {
            c.outbox.close();
        }
    }

    /// Starts applying packets from `conn`: replies to it need no wake-up.
    pub fn begin(&mut self, conn: ConnId) {
        self.current = Some(conn);
    }

    /// Starts a change that comes from no connection (the HTTP API): everyone written to
    /// is woken.
    pub fn begin_external(&mut self) {
        self.current = None;
    }

    fn send(&self, conn: ConnId, kind: T, args: &[&[u8]]) {
        self.send_raw(conn, |b| encode_packet(b, Magic::Response, kind, args));
    }

    fn send_raw(&self, conn: ConnId, write: impl FnOnce(&mut BytesMut)) {
        let Some(c) = self.conns.get(conn as usize) else { return };
        if let Some(queue) = c.held.borrow_mut().as_mut() {
            match queue.back_mut() {
                Some(Held::Bytes(bytes)) => write(bytes),
                _ => {
                    let mut bytes = BytesMut::new();
                    write(&mut bytes);
                    queue.push_back(Held::Bytes(bytes));
                }
            }
            return;
        }
        self.push_out(conn, write);
    }

    /// Writes to a connection's outbox, bypassing any held replies.
    fn push_out(&self, conn: ConnId, write: impl FnOnce(&mut BytesMut)) {
        if let Some(c) = self.conns.get(conn as usize) {
            let len = c.outbox.push(self.current == Some(conn), write);
            if len > self.config.max_outbox {
                c.outbox.kill();
            }
        }
    }

    pub fn send_error(&self, conn: ConnId, code: &str, text: &str) {
        self.send(conn, T::Error, &[code.as_bytes(), text.as_bytes()]);
    }

    pub fn send_text(&self, conn: ConnId, text: &str) {
        self.send_raw(conn, |b| b.extend_from_slice(text.as_bytes()));
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

    fn parse_handle(&self, handle: &[u8]) -> Option<u64> {
        let digits = handle.strip_prefix(self.handle_prefix.as_slice())?;
        std::str::from_utf8(digits).ok()?.parse().ok()
    }

    fn find_by_handle(&self, handle: &[u8]) -> Option<JobKey> {
        self.find_by_seq(self.parse_handle(handle)?)
    }

    fn find_by_seq(&self, seq: u64) -> Option<JobKey> {
        self.by_seq.find(seq_hash(seq), |&k| self.jobs[k as usize].seq == seq).copied()
    }

    fn unique_hash(&self, function: FunctionId, unique: &[u8]) -> u64 {
        self.hasher.hash_one((function, unique))
    }

    fn find_by_unique(&self, function: FunctionId, unique: &[u8]) -> Option<JobKey> {
        let hash = self.unique_hash(function, unique);
        self.by_unique
            .find(hash, |&k| {
                let j = &self.jobs[k as usize];
                j.function == function && j.unique() == unique
            })
            .copied()
    }

    fn function_id(&mut self, name: &[u8]) -> FunctionId {
        if let Some(&id) = self.function_ids.get(name) {
            return id;
        }
        let name = Bytes::copy_from_slice(name);
        let id = match self.functions.iter().position(|f| f.dropped) {
            Some(free) => {
                self.functions[free] = Function::new(name.clone());
                free as FunctionId
            }
            None => {
                self.functions.push(Function::new(name.clone()));
                (self.functions.len() - 1) as FunctionId
            }
        };
        self.function_ids.insert(name, id);
        id
    }

    // ----- packets -----

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
            Request::CanDo { function } => self.can_do(conn, &function, None),
            Request::CanDoTimeout { function, timeout } => {
                let timeout = (timeout > 0).then(|| Duration::from_millis(timeout.into()).max(MIN_JOB_TIMEOUT));
                self.can_do(conn, &function, timeout)
            }
            Request::CantDo { function } => self.cant_do(conn, &function),
            Request::ResetAbilities => {
                let c = &mut self.conns[conn as usize];
                for ability in c.abilities.drain(..) {
                    self.functions[ability.function as usize].workers -= 1;
                }
            }
            Request::WorkStatus { handle, numerator, denominator } => {
                let Some(key) = self.running_job(conn, &handle) else {
                    return;
                };
                let job = &mut self.jobs[key as usize];
                let extra = job.extra_mut();
                extra.numerator = numerator;
                extra.denominator = denominator;
                let mut n = itoa::Buffer::new();
                let mut d = itoa::Buffer::new();
                let args: [&[u8]; 3] = [&handle, n.format(numerator).as_bytes(), d.format(denominator).as_bytes()];
                for &c in self.jobs[key as usize].clients() {
                    self.send(c, T::WorkStatus, &args);
                }
            }
            Request::WorkData { handle, data } => self.forward(conn, T::WorkData, &handle, &data),
            Request::WorkWarning { handle, data } => self.forward(conn, T::WorkWarning, &handle, &data),
            Request::WorkComplete { handle, data } => {
                if let Some(key) = self.running_job(conn, &handle) {
                    for &c in self.jobs[key as usize].clients() {
                        self.send(c, T::WorkComplete, &[&handle, &data]);
                    }
                    self.finish(key, Outcome::Complete, Some(&data), None);
                }
            }
            Request::WorkFail { handle } => {
                if let Some(key) = self.running_job(conn, &handle) {
                    for &c in self.jobs[key as usize].clients() {
                        self.send(c, T::WorkFail, &[&handle]);
                    }
                    self.finish(key, Outcome::Fail, None, None);
                }
            }
            Request::WorkException { handle, data } => {
                if let Some(key) = self.running_job(conn, &handle) {
                    for &c in self.jobs[key as usize].clients() {
                        if self.conns[c as usize].exceptions {
                            self.send(c, T::WorkException, &[&handle, &data]);
                        } else {
                            self.send(c, T::WorkFail, &[&handle]);
                        }
                    }
                    self.conns[conn as usize].excepted = Some(self.jobs[key as usize].seq);
                    self.finish(key, Outcome::Exception, None, Some(&data));
                }
            }
            Request::GetStatus { handle } => {
                let job = self.find_by_handle(&handle);
                self.send_status(conn, T::StatusRes, &handle, job);
            }
            Request::GetStatusUnique { unique } => {
                // The unique key alone does not name a function; report the first match.
                let job = (0..self.functions.len() as FunctionId).find_map(|fid| self.find_by_unique(fid, &unique));
                self.send_status(conn, T::StatusResUnique, &unique, job);
            }
            Request::EchoReq { data } => self.send(conn, T::EchoRes, &[&data]),
            Request::OptionReq { option } => {
                if option.eq_ignore_ascii_case(b"exceptions") {
                    self.conns[conn as usize].exceptions = true;
                    self.send(conn, T::OptionRes, &[&option]);
                } else {
                    self.send_error(conn, "UNKNOWN_OPTION", "Server does not recognize given option");
                }
            }
            Request::SetClientId { id } => self.conns[conn as usize].client_id = Some(id),
            Request::AllYours => {}
        }
    }

    /// STATUS_RES (or STATUS_RES_UNIQUE, which adds the waiting clients) for `job`, named
    /// as the client asked.
    fn send_status(&self, conn: ConnId, kind: T, name: &[u8], job: Option<JobKey>) {
        let (mut n, mut d, mut w) = (itoa::Buffer::new(), itoa::Buffer::new(), itoa::Buffer::new());
        let args: [&[u8]; 6] = match job.map(|k| &self.jobs[k as usize]) {
            Some(job) => [
                name,
                b"1",
                if matches!(job.state, JobState::Running(_)) { b"1" } else { b"0" },
                n.format(job.progress().0).as_bytes(),
                d.format(job.progress().1).as_bytes(),
                w.format(job.clients().len()).as_bytes(),
            ],
            None => [name, b"0", b"0", b"0", b"0", b"0"],
        };
        let count = if kind == T::StatusResUnique { 6 } else { 5 };
        self.send(conn, kind, &args[..count]);
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        conn: ConnId,
        function: &[u8],
        unique: &[u8],
        data: &[u8],
        priority: Priority,
        background: bool,
        run_at: Option<i64>,
    ) {
        if unique.len() > MAX_UNIQUE {
            return self.send_error(conn, "ARGUMENT_TOO_LARGE", "Unique value too large");
        }
        if function.is_empty() || function.len() > MAX_FUNCTION {
            return self.send_error(conn, "INVALID_PACKET", "Function name is empty or longer than 512 bytes");
        }
        let fid = self.function_id(function);
        // A unique key of "-" asks for coalescing on the payload itself (libgearman's convention).
        let unique: &[u8] = if unique == b"-" && data.len() <= MAX_UNIQUE { data } else { unique };
        if !unique.is_empty() {
            if let Some(key) = self.find_by_unique(fid, unique) {
                if !background {
                    self.attach(conn, key);
                }
                let job = &self.jobs[key as usize];
                if job.state == JobState::Pending {
                    return self.hold_ack(conn, job.seq);
                }
                let handle = self.handle(job.seq);
                return self.send(conn, T::JobCreated, &[&handle]);
            }
        }
        let f = &self.functions[fid as usize];
        let limit = f.max_queue[priority as usize];
        if limit > 0 && f.total() >= limit {
            return self.send_error(conn, "QUEUE_ERROR", "Job queue is full");
        }

        let seq = self.next_seq;
        self.next_seq += 1;
        let key = self.insert_job(seq, fid, priority, background, unique, data);
        let job = &mut self.jobs[key as usize];
        job.submitter = self.conns[conn as usize].serial;
        // One clock read per submission: the job's own time serves for scheduling too.
        let now = job.submitted_at.div_euclid(1000);
        self.functions[fid as usize].counts.submitted[priority as usize] += 1;
        let run_at = run_at.unwrap_or(0);
        if background && self.durable.is_some() {
            self.jobs[key as usize].state = JobState::Pending;
            return self.store_add(conn, key, run_at);
        }
        if !background {
            self.attach(conn, key);
        }
        if run_at > now {
            self.schedule(key, run_at, now);
        } else {
            self.enqueue(key, false);
        }
        let handle = self.handle(seq);
        self.send(conn, T::JobCreated, &[&handle]);
    }

    /// Creates an indexed job, not yet queued.
    fn insert_job(
        &mut self,
        seq: u64,
        function: FunctionId,
        priority: Priority,
        background: bool,
        unique: &[u8],
        data: &[u8],
    ) -> JobKey {
        let mut body = Vec::with_capacity(unique.len() + data.len());
        body.extend_from_slice(unique);
        body.extend_from_slice(data);
        let key = self.jobs.insert(Job {
            seq,
            function,
            priority,
            background,
            state: JobState::Queued,
            attempts: 0,
            unique_len: unique.len() as u16,
            extra: None,
            submitted_at: now_millis(),
            submitter: u32::MAX,
            body: body.into_boxed_slice(),
            payload_len: data.len() as u32,
            in_ram: true,
            loc: Loc::NONE,
        }) as JobKey;
        self.index(key);
        key
    }

    /// Holds a job until its epoch time.
    fn schedule(&mut self, key: JobKey, at: i64, now: i64) {
        let job = &mut self.jobs[key as usize];
        job.state = JobState::Scheduled;
        self.functions[job.function as usize].scheduled += 1;
        self.scheduled.push(Reverse((at, job.seq, key)));
        self.arm_timer(Instant::now() + until(at, now));
    }

    fn index(&mut self, key: JobKey) {
        let job = &self.jobs[key as usize];
        let jobs = &self.jobs;
        self.by_seq.insert_unique(seq_hash(job.seq), key, |&k| seq_hash(jobs[k as usize].seq));
        if job.unique_len > 0 {
            let hasher = &self.hasher;
            let hash = hasher.hash_one((job.function, job.unique()));
            self.by_unique.insert_unique(hash, key, |&k| {
                let j = &jobs[k as usize];
                hasher.hash_one((j.function, j.unique()))
            });
        }
    }

    /// Removes a job from the lookup indices and from its clients' waiting sets.
    fn unindex(&mut self, key: JobKey) {
        let job = &self.jobs[key as usize];
        if let Ok(e) = self.by_seq.find_entry(seq_hash(job.seq), |&k| k == key) {
            e.remove();
        }
        if job.unique_len > 0 {
            let hash = self.unique_hash(job.function, job.unique());
            if let Ok(e) = self.by_unique.find_entry(hash, |&k| k == key) {
                e.remove();
            }
        }
        for &c in self.jobs[key as usize].clients() {
            if let Some(conn) = self.conns.get_mut(c as usize) {
                conn.waiting.remove(&key);
            }
        }
    }

    fn attach(&mut self, conn: ConnId, key: JobKey) {
        let job = &mut self.jobs[key as usize];
        if !job.clients().contains(&conn) {
            job.extra_mut().clients.push(conn);
            self.conns[conn as usize].waiting.insert(key);
        }
    }

    /// Puts a job in its function's queue and wakes one sleeping worker for it.
    /// A job coming back from a lost worker goes to the front: it was first in line.
    fn enqueue(&mut self, key: JobKey, front: bool) {
        let job = &mut self.jobs[key as usize];
        job.state = JobState::Queued;
        let (fid, p) = (job.function, job.priority as usize);
        let f = &mut self.functions[fid as usize];
        if front {
            f.queues[p].push_front(key);
        } else {
            f.queues[p].push_back(key);
        }
        f.queued[p] += 1;
        self.wake_one(fid);
    }

    fn wake_one(&mut self, fid: FunctionId) {
        while let Some((c, epoch)) = self.functions[fid as usize].sleepers.pop_front() {
            if let Some(conn) = self.conns.get_mut(c as usize) {
                if conn.sleeping && conn.sleep_epoch == epoch {
                    conn.sleeping = false;
                    self.send(c, T::Noop, &[]);
                    return;
                }
            }
        }
    }

    fn grab(&mut self, conn: ConnId, kind: GrabKind) {
        let c = &mut self.conns[conn as usize];
        c.sleeping = false;
        // Highest priority first across all the worker's functions; oldest first within one.
        let mut best: Option<(usize, u64, FunctionId)> = None;
        for ability in &c.abilities {
            let f = &mut self.functions[ability.function as usize];
            for p in 0..3 {
                while let Some(&k) = f.queues[p].front() {
                    if self.jobs[k as usize].state == JobState::Dropped {
                        f.queues[p].pop_front();
                        self.jobs.remove(k as usize);
                        continue;
                    }
                    break;
                }
                if let Some(&k) = f.queues[p].front() {
                    let candidate = (p, self.jobs[k as usize].seq, ability.function);
                    if best.is_none_or(|b| (candidate.0, candidate.1) < (b.0, b.1)) {
                        best = Some(candidate);
                    }
                    break;
                }
            }
        }
        let Some((p, _, fid)) = best else {
            return self.send(conn, T::NoJob, &[]);
        };
        let timeout = c.abilities.iter().find(|a| a.function == fid).and_then(|a| a.timeout);
        let f = &mut self.functions[fid as usize];
        let key = f.queues[p].pop_front().expect("candidate exists");
        f.queued[p] -= 1;
        f.running += 1;
        let started_at = now_millis();
        self.conns[conn as usize].running.push(Running { key, started_at });
        let job = &mut self.jobs[key as usize];
        f.counts.queue_wait.observe_ms(started_at - job.submitted_at);
        job.state = JobState::Running(PackedConn::new(conn));
        job.attempts = job.attempts.saturating_add(1);
        if let Some(t) = timeout {
            let deadline = Instant::now() + t;
            self.timeouts.push(Reverse((deadline, job.seq, job.attempts, key)));
            self.arm_timer(deadline);
        }
        let job = &self.jobs[key as usize];
        let handle = self.handle(job.seq);
        let name = &self.functions[fid as usize].name;
        let data = match self.payload(job) {
            Ok(data) => data,
            Err(e) => {
                // The store cannot give the payload back: the job cannot run anywhere.
                tracing::error!(handle = %String::from_utf8_lossy(&handle), "dropping a job whose payload cannot be read: {e}");
                for &c in job.clients() {
                    self.send(c, T::WorkFail, &[&handle]);
                }
                let error = format!("the payload could not be read back from the store: {e}");
                self.finish(key, Outcome::Fail, None, Some(error.as_bytes()));
                return self.grab(conn, kind);
            }
        };
        match kind {
            GrabKind::Plain => self.send(conn, T::JobAssign, &[&handle, name, &data]),
            GrabKind::Uniq | GrabKind::All => self.send(conn, T::JobAssignUniq, &[&handle, name, job.unique(), &data]),
        }
    }

    fn pre_sleep(&mut self, conn: ConnId) {
        let c = &self.conns[conn as usize];
        let has_work = c.abilities.iter().any(|a| self.functions[a.function as usize].queued_total() > 0);
        if has_work {
            return self.send(conn, T::Noop, &[]);
        }
        let c = &mut self.conns[conn as usize];
        c.sleeping = true;
        c.sleep_epoch = c.sleep_epoch.wrapping_add(1);
        let epoch = c.sleep_epoch;
        for i in 0..self.conns[conn as usize].abilities.len() {
            let fid = self.conns[conn as usize].abilities[i].function;
            push_sleeper(&mut self.functions[fid as usize], conn, epoch, &self.conns);
        }
    }

    fn can_do(&mut self, conn: ConnId, function: &[u8], timeout: Option<Duration>) {
        if function.is_empty() || function.len() > MAX_FUNCTION {
            return self.send_error(conn, "INVALID_PACKET", "Function name is empty or longer than 512 bytes");
        }
        let fid = self.function_id(function);
        let c = &mut self.conns[conn as usize];
        if let Some(a) = c.abilities.iter_mut().find(|a| a.function == fid) {
            a.timeout = timeout;
            return;
        }
        c.abilities.push(Ability { function: fid, timeout });
        let (sleeping, epoch) = (c.sleeping, c.sleep_epoch);
        let f = &mut self.functions[fid as usize];
        f.workers += 1;
        if sleeping {
            if f.queued_total() > 0 {
                self.conns[conn as usize].sleeping = false;
                self.send(conn, T::Noop, &[]);
            } else {
                push_sleeper(f, conn, epoch, &self.conns);
            }
        }
    }

    fn cant_do(&mut self, conn: ConnId, function: &[u8]) {
        let Some(&fid) = self.function_ids.get(function) else {
            return;
        };
        let c = &mut self.conns[conn as usize];
        if let Some(i) = c.abilities.iter().position(|a| a.function == fid) {
            c.abilities.swap_remove(i);
            self.functions[fid as usize].workers -= 1;
        }
    }

    /// The job `handle` names, if `conn` is the worker running it; otherwise an ERROR.
    fn running_job(&self, conn: ConnId, handle: &[u8]) -> Option<JobKey> {
        let seq = self.parse_handle(handle);
        let c = &self.conns[conn as usize];
        let found = seq.and_then(|seq| c.running.iter().map(|r| r.key).find(|&k| self.jobs[k as usize].seq == seq));
        if found.is_none() && (seq.is_none() || seq != c.excepted) {
            self.send_error(conn, "JOB_NOT_FOUND", "Job given in work result not found");
        }
        found
    }

    fn forward(&self, conn: ConnId, kind: T, handle: &[u8], data: &[u8]) {
        if let Some(key) = self.running_job(conn, handle) {
            for &c in self.jobs[key as usize].clients() {
                self.send(c, kind, &[handle, data]);
            }
        }
    }

    /// A running job ended (completed, failed, or gave up): log it and forget it.
    fn finish(&mut self, key: JobKey, outcome: Outcome, result: Option<&[u8]>, error: Option<&[u8]>) {
        let job = &self.jobs[key as usize];
        if let JobState::Running(w) = job.state {
            let w = w.get();
            self.functions[job.function as usize].running -= 1;
            let started_at = self.take_running(w, key);
            self.log_attempt(key, outcome, Some(w), started_at, result, error);
        }
        self.unstore(key);
        self.unindex(key);
        self.jobs.remove(key as usize);
    }

    /// Takes `key` off `worker`'s running list; returns when it started there.
    fn take_running(&mut self, worker: ConnId, key: JobKey) -> Option<Millis> {
        let running = &mut self.conns.get_mut(worker as usize)?.running;
        let i = running.iter().position(|r| r.key == key)?;
        Some(running.swap_remove(i).started_at)
    }

    /// Counts an attempt that ended and writes its job-log record.
    fn log_attempt(
        &mut self,
        key: JobKey,
        outcome: Outcome,
        worker: Option<ConnId>,
        started_at: Option<Millis>,
        result: Option<&[u8]>,
        error: Option<&[u8]>,
    ) {
        let finished_at = now_millis();
        let job = &self.jobs[key as usize];
        let counts = &mut self.functions[job.function as usize].counts;
        match outcome {
            Outcome::Complete => counts.completed[job.priority as usize] += 1,
            Outcome::Fail | Outcome::Exception => counts.failed[job.priority as usize] += 1,
            Outcome::Cancelled | Outcome::Timeout | Outcome::LostWorker => {}
        }
        if let Some(started_at) = started_at {
            counts.run_time.observe_ms(finished_at - started_at);
        }
        if self.job_log.is_none() {
            return;
        }
        let handle = self.handle(job.seq);
        let name = |c: ConnId| self.conns.get(c as usize).map(|c| c.client_id.as_deref().unwrap_or(c.peer.as_bytes()));
        let client = job.clients().first().copied().or_else(|| self.serials.get(&job.submitter).copied());
        let log = self.job_log.as_mut().expect("checked above");
        let bodies = log.bodies();
        let deadline = log.record(&RecordRef {
            handle: &handle,
            function: &self.functions[job.function as usize].name,
            unique: job.unique(),
            priority: job.priority,
            background: job.background,
            status: outcome,
            attempt: u32::from(job.attempts),
            submitted_at: job.submitted_at,
            started_at,
            finished_at,
            worker_id: worker.and_then(name),
            client_id: client.and_then(name),
            payload_bytes: u64::from(job.payload_len),
            result_bytes: result.map(|r| r.len() as u64),
            error,
            payload: bodies.filter(|_| job.in_ram).map(|max| prefix(job.data(), max)),
            result: bodies.zip(result).map(|(max, r)| prefix(r, max)),
        });
        if let Some(deadline) = deadline {
            self.arm_timer(deadline);
        }
    }

    /// The worker running `key` went away or timed out: queue the job again, unless it has
    /// used up its attempts (then fail it) or nobody is left to want its result.
    fn lose_worker(&mut self, key: JobKey, outcome: Outcome, worker: Option<ConnId>, started_at: Millis) {
        let job = &mut self.jobs[key as usize];
        self.functions[job.function as usize].running -= 1;
        job.state = JobState::Queued;
        let (seq, attempts, background, abandoned) =
            (job.seq, u32::from(job.attempts), job.background, job.clients().is_empty());
        let retries = self.config.job_retries;
        if retries > 0 && attempts >= retries {
            let handle = self.handle(seq);
            tracing::warn!(handle = %String::from_utf8_lossy(&handle), "job failed after {retries} attempts");
            for &c in self.jobs[key as usize].clients() {
                self.send(c, T::WorkFail, &[&handle]);
            }
            let error = format!("given up after {attempts} attempts (-j {retries})");
            self.log_attempt(key, outcome, worker, Some(started_at), None, Some(error.as_bytes()));
            let job = &self.jobs[key as usize];
            self.functions[job.function as usize].counts.failed[job.priority as usize] += 1;
            self.unstore(key);
            self.unindex(key);
            self.jobs.remove(key as usize);
            return;
        }
        self.log_attempt(key, outcome, worker, Some(started_at), None, None);
        if !background && abandoned {
            self.unindex(key);
            self.jobs.remove(key as usize);
        } else {
            self.enqueue(key, true);
        }
    }

    /// A client stopped waiting for `key`. A queued foreground job nobody waits for is dropped.
    fn detach_client(&mut self, key: JobKey, conn: ConnId) {
        let job = &mut self.jobs[key as usize];
        if let Some(extra) = job.extra.as_mut() {
            extra.clients.retain(|&c| c != conn);
        }
        if job.clients().is_empty() && !job.background && job.state == JobState::Queued {
            self.drop_queued(key, "every waiting client disconnected");
        }
    }

    /// Takes a queued or scheduled job out of service. Its slot stays allocated until the
    /// queue or schedule heap that still holds its key reaches it.
    fn drop_queued(&mut self, key: JobKey, why: &str) {
        self.log_attempt(key, Outcome::Cancelled, None, None, None, Some(why.as_bytes()));
        let job = &self.jobs[key as usize];
        let f = &mut self.functions[job.function as usize];
        match job.state {
            JobState::Queued => f.queued[job.priority as usize] -= 1,
            JobState::Scheduled => f.scheduled -= 1,
            _ => unreachable!("only queued or scheduled jobs are dropped"),
        }
        self.unstore(key);
        self.unindex(key);
        let job = &mut self.jobs[key as usize];
        job.state = JobState::Dropped;
        job.extra = None;
    }

    // ----- timers -----

    fn arm_timer(&mut self, deadline: Instant) {
        if self.timer_at.is_none_or(|t| deadline < t) {
            self.timer_at = Some(deadline);
            self.timer.notify_one();
        }
    }

    /// Runs due timeouts and scheduled jobs; returns when to call again.
    pub fn tick(&mut self, now: Instant) -> Instant {
        self.current = None;
        while let Some(&Reverse((deadline, seq, attempt, key))) = self.timeouts.peek() {
            if deadline > now {
                break;
            }
            self.timeouts.pop();
            let Some(job) = self.jobs.get(key as usize) else {
                continue;
            };
            if job.seq != seq || job.attempts != attempt {
                continue;
            }
            if let JobState::Running(w) = job.state {
                let w = w.get();
                tracing::warn!(handle = %String::from_utf8_lossy(&self.handle(seq)), "worker timed out; job queued again");
                let started_at = self.take_running(w, key).unwrap_or_else(now_millis);
                self.lose_worker(key, Outcome::Timeout, Some(w), started_at);
            }
        }
        let wall = unix_now();
        while let Some(&Reverse((at, seq, key))) = self.scheduled.peek() {
            if at > wall {
                break;
            }
            self.scheduled.pop();
            let Some(job) = self.jobs.get(key as usize) else {
                continue;
            };
            if job.seq != seq {
                continue;
            }
            match job.state {
                JobState::Scheduled => {
                    self.functions[job.function as usize].scheduled -= 1;
                    self.enqueue(key, false);
                }
                JobState::Dropped => {
                    self.jobs.remove(key as usize);
                }
                _ => {}
            }
        }
        if now.duration_since(self.last_sweep) >= WAKE_SWEEP {
            self.last_sweep = now;
            for fid in 0..self.functions.len() as FunctionId {
                if self.functions[fid as usize].queued_total() > 0 {
                    self.wake_one(fid);
                }
            }
        }
        let mut next = self.last_sweep + WAKE_SWEEP;
        if let Some(flush_at) = self.job_log.as_mut().and_then(|log| log.flush_due(now)) {
            next = next.min(flush_at);
        }
        if let Some(Reverse((deadline, ..))) = self.timeouts.peek() {
            next = next.min(*deadline);
        }
        if let Some(Reverse((at, ..))) = self.scheduled.peek() {
            next = next.min(now + until(*at, wall));
        }
        self.timer_at = Some(next);
        next
    }
}

/// At most the first `max` bytes of `b`.
fn prefix(b: &[u8], max: usize) -> &[u8] {
    &b[..b.len().min(max)]
}

/// Records a sleeping worker for a function, pruning stale entries when they pile up.
fn push_sleeper(f: &mut Function, conn: ConnId, epoch: u32, conns: &Slab<Conn>) {
    if f.sleepers.len() > 2 * f.workers as usize + 8 {
        f.sleepers.retain(|&(c, e)| conns.get(c as usize).is_some_and(|c| c.sleeping && c.sleep_epoch == e));
    }
    f.sleepers.push_back((conn, epoch));
}

#[cfg(test)]
mod tests {
    use super::*;
    use gearbox_proto::Request;

    fn submit(b: &mut Broker, conn: ConnId, unique: &str, background: bool) {
        b.apply(
            conn,
            Request::SubmitJob {
                function: Bytes::from_static(b"f"),
                unique: Bytes::copy_from_slice(unique.as_bytes()),
                data: Bytes::from_static(b"payload"),
                priority: Priority::Normal,
                background,
            },
        );
    }

    #[test]
    fn finished_jobs_leave_no_trace_in_the_indices() {
        let mut b = Broker::new(BrokerConfig::default());
        let client = b.connect(Arc::new(Outbox::default()), 0, "test", 1);
        let worker = b.connect(Arc::new(Outbox::default()), 1, "test", 2);
        b.apply(worker, Request::CanDo { function: Bytes::from_static(b"f") });
        for i in 0..1000 {
            submit(&mut b, client, &format!("u{i}"), i % 2 == 0);
            b.apply(worker, Request::GrabJob(GrabKind::Uniq));
            let key = b.conns[worker as usize].running[0].key;
            let handle = Bytes::copy_from_slice(&b.handle(b.jobs[key as usize].seq));
            b.apply(worker, Request::WorkComplete { handle, data: Bytes::new() });
        }
        assert_eq!((b.jobs.len(), b.by_seq.len(), b.by_unique.len()), (0, 0, 0));
        assert!(b.conns[client as usize].waiting.is_empty());
    }
}

/// Random sequences of packets, disconnects and timer ticks never panic and keep the
/// broker's counters and indices consistent with its jobs.
#[cfg(test)]
mod model {
    use super::*;
    use gearbox_proto::{AdminCommand, Request};
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Submit {
            conn: usize,
            function: u8,
            unique: u8,
            background: bool,
            priority: u8,
            later: bool,
        },
        CanDo(usize, u8),
        CantDo(usize, u8),
        Grab(usize),
        PreSleep(usize),
        Finish {
            conn: usize,
            how: u8,
        },
        Status(usize),
        Cancel(usize, u64),
        Disconnect(usize),
        Tick,
        /// The store thread commits what is pending, successfully or not.
        Commit(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        let c = 0..4usize;
        prop_oneof![
            (c.clone(), 0..3u8, 0..4u8, any::<bool>(), 0..3u8, any::<bool>()).prop_map(
                |(conn, function, unique, background, priority, later)| Op::Submit {
                    conn,
                    function,
                    unique,
                    background,
                    priority,
                    later
                }
            ),
            (c.clone(), 0..3u8).prop_map(|(c, f)| Op::CanDo(c, f)),
            (c.clone(), 0..3u8).prop_map(|(c, f)| Op::CantDo(c, f)),
            c.clone().prop_map(Op::Grab),
            c.clone().prop_map(Op::PreSleep),
            (c.clone(), 0..4u8).prop_map(|(conn, how)| Op::Finish { conn, how }),
            c.clone().prop_map(Op::Status),
            (c.clone(), 0..8u64).prop_map(|(c, n)| Op::Cancel(c, n)),
            c.prop_map(Op::Disconnect),
            Just(Op::Tick),
            any::<bool>().prop_map(Op::Commit),
        ]
    }

    /// A job-log sink that keeps what it is given.
    struct Collect(Arc<std::sync::Mutex<Vec<gearbox_joblog::Record>>>);

    impl gearbox_joblog::Sink for Collect {
        fn write(&mut self, batch: &gearbox_joblog::Batch) -> Result<(), gearbox_joblog::Error> {
            self.0.lock().unwrap().extend(batch.iter().map(|r| r.to_record()));
            Ok(())
        }
        fn expire(&mut self, _: Millis) -> Result<u64, gearbox_joblog::Error> {
            Ok(0)
        }
    }

    fn check(b: &Broker) {
        for (fid, f) in b.functions.iter().enumerate().filter(|(_, f)| !f.dropped) {
            let fid = fid as FunctionId;
            let jobs = || b.jobs.iter().map(|(_, j)| j).filter(move |j| j.function == fid);
            for p in 0..3 {
                let queued = jobs().filter(|j| j.state == JobState::Queued && j.priority as usize == p).count();
                assert_eq!(f.queued[p] as usize, queued, "queued count of priority {p}");
            }
            assert_eq!(f.running as usize, jobs().filter(|j| matches!(j.state, JobState::Running(_))).count());
            assert_eq!(f.scheduled as usize, jobs().filter(|j| j.state == JobState::Scheduled).count());
            let workers = b.conns.iter().filter(|(_, c)| c.abilities.iter().any(|a| a.function == fid)).count();
            assert_eq!(f.workers as usize, workers);
        }
        let live = b.jobs.iter().filter(|(_, j)| j.state != JobState::Dropped).count();
        assert_eq!(b.by_seq.len(), live);
        for (key, job) in &b.jobs {
            if let JobState::Running(w) = job.state {
                let w = w.get();
                assert!(b.conns[w as usize].running.iter().any(|r| r.key == key as JobKey));
            }
            for &c in job.clients() {
                assert!(b.conns[c as usize].waiting.contains(&(key as JobKey)));
            }
        }
    }

    fn commit(b: &mut Broker, ok: bool) {
        let mut batch = gearbox_store::Batch::default();
        b.take_pending(&mut batch);
        let locs: Vec<Loc> = (1..=batch.adds().len() as u64).map(Loc).collect();
        b.committed(&batch, if ok { Ok(&locs) } else { Err("disk full".into()) });
    }

    proptest! {
        #[test]
        fn any_sequence_keeps_the_broker_consistent(ops in proptest::collection::vec(op(), 1..80), durable: bool) {
            let mut b = Broker::new(BrokerConfig { job_retries: 3, ..BrokerConfig::default() });
            if durable {
                b.enable_durability(Arc::new(std::sync::Condvar::new()), None);
            }
            let records = Arc::new(std::sync::Mutex::new(Vec::new()));
            let (log, _, writer) = gearbox_joblog::writer::start(Box::new(Collect(records.clone())), None, Some(8));
            b.set_job_log(log);
            let mut conns: Vec<ConnId> = (0..4).map(|i| b.connect(Arc::new(Outbox::default()), i, "t", 1)).collect();
            let name = |f: u8| Bytes::from(format!("f{f}"));
            for op in ops {
                match op {
                    Op::Submit { conn, function, unique, background, priority, later } => {
                        let unique = if unique == 0 { Bytes::new() } else { Bytes::from(format!("u{unique}")) };
                        let priority = Priority::ALL[priority as usize];
                        let req = if later {
                            Request::SubmitJobEpoch { function: name(function), unique, epoch: i64::MAX, data: Bytes::from_static(b"d") }
                        } else {
                            Request::SubmitJob { function: name(function), unique, data: Bytes::from_static(b"d"), priority, background }
                        };
                        b.apply(conns[conn], req);
                    }
                    Op::CanDo(c, f) => b.apply(conns[c], Request::CanDo { function: name(f) }),
                    Op::CantDo(c, f) => b.apply(conns[c], Request::CantDo { function: name(f) }),
                    Op::Grab(c) => b.apply(conns[c], Request::GrabJob(GrabKind::Uniq)),
                    Op::PreSleep(c) => b.apply(conns[c], Request::PreSleep),
                    Op::Finish { conn, how } => {
                        let Some(key) = b.conns[conns[conn] as usize].running.first().map(|r| r.key) else { continue };
                        let handle = Bytes::copy_from_slice(&b.handle(b.jobs[key as usize].seq));
                        let req = match how {
                            0 => Request::WorkComplete { handle, data: Bytes::new() },
                            1 => Request::WorkFail { handle },
                            2 => Request::WorkException { handle, data: Bytes::new() },
                            _ => Request::WorkStatus { handle, numerator: 1, denominator: 2 },
                        };
                        b.apply(conns[conn], req);
                    }
                    Op::Status(c) => b.apply(conns[c], Request::GetStatusUnique { unique: Bytes::from_static(b"u1") }),
                    Op::Cancel(c, n) => {
                        let handle = Bytes::copy_from_slice(&b.handle(b.next_seq.saturating_sub(n + 1)));
                        let info = AdminInfo { version: String::new(), verbose: String::new(), allow_shutdown: false, job_log: None };
                        b.admin(conns[c], AdminCommand::CancelJob { handle }, &info);
                    }
                    Op::Disconnect(c) => {
                        b.disconnect(conns[c]);
                        conns[c] = b.connect(Arc::new(Outbox::default()), c as i32, "t", 1);
                    }
                    Op::Tick => {
                        b.tick(Instant::now() + Duration::from_secs(5));
                    }
                    Op::Commit(ok) => commit(&mut b, ok || !durable),
                }
                check(&b);
            }
            // Once everything is committed, no job is pending and no reply is held.
            commit(&mut b, true);
            check(&b);
            prop_assert!(b.jobs.iter().all(|(_, j)| j.state != JobState::Pending));
            prop_assert!(b.conns.iter().all(|(_, c)| c.held.borrow().is_none()));
            for c in conns {
                b.disconnect(c);
                check(&b);
            }
            prop_assert!(b.jobs.iter().all(|(_, j)| j.background || j.state == JobState::Dropped));

            // Every attempt that ended was logged once, as the counters say.
            b.close_job_log();
            writer.stop();
            let records = records.lock().unwrap();
            let count = |status: Outcome| records.iter().filter(|r| r.status == status).count() as u64;
            let given_up = records.iter().filter(|r| r.error.as_deref().is_some_and(|e| e.starts_with("given up"))).count() as u64;
            let completed: u64 = b.functions.iter().map(|f| f.counts.completed.iter().sum::<u64>()).sum();
            let failed: u64 = b.functions.iter().map(|f| f.counts.failed.iter().sum::<u64>()).sum();
            prop_assert_eq!(count(Outcome::Complete), completed);
            prop_assert_eq!(count(Outcome::Fail) + count(Outcome::Exception) + given_up, failed);
            for r in records.iter() {
                prop_assert_eq!(r.started_at.is_none(), r.status == Outcome::Cancelled, "{:?}", r);
                prop_assert_eq!(r.result.is_some(), r.status == Outcome::Complete, "{:?}", r);
                prop_assert!(r.payload.is_some() && r.attempt <= 3, "{:?}", r);
            }
        }
    }
}
