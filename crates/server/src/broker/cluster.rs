//! The broker as one node of a cluster (see `gearbox_store::cluster` and the server's
//! `cluster` module, which hold the leases, claims and takeovers). The broker stays a
//! single-node state machine; it only learns:
//!
//! - which incarnation it is ([`Broker::join_cluster`]), numbering its jobs from that
//!   incarnation's first sequence number and stamping every batch with it;
//! - until when its lease lets it dispatch ([`Broker::lease_valid_until`]): past that instant
//!   workers get NO_JOB, even before the cluster thread notices (a paused process resumes
//!   with a stale view);
//! - that its lease is lost ([`Broker::leave_cluster`]): it forgets the stored jobs it held,
//!   which other nodes take over;
//! - of jobs it claimed ([`Broker::restore_claimed`]), as it learns of restored ones.
//!
//! A new background job is this node's when a worker here can do its function and it is due
//! now; otherwise the store writes it unowned and the broker forgets it once committed, for
//! whichever node has a worker to claim it. The broker says which functions have idle
//! workers and nothing queued ([`Broker::claim_wants`]), and which GET_STATUS questions only
//! the database can answer ([`Broker::status_queries`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use gearbox_joblog::Status as Outcome;
use gearbox_proto::{encode_packet, Magic, PacketType as T};
use gearbox_store::cluster::{first_seq, RowStatus};
use gearbox_store::StoredJob;
use gearbox_store::{Loc, Mark};
use tokio::sync::Notify;

use super::durable::Held;
use super::job::{JobState, Stored};
use super::timer::unix_now;
use super::{Broker, ConnId, JobKey};

pub(super) struct ClusterState {
    /// This incarnation's id; 0 between a lost lease and the next join.
    node: u64,
    /// Dispatching stops at this instant unless a renewal moves it.
    valid_until: Instant,
    /// Wakes the cluster thread: workers idle, or a status question.
    wake: Arc<Notify>,
    statuses: Vec<StatusQuery>,
    next_status: u64,
    /// Jobs being written unowned, for another node to claim.
    unowned: HashSet<u64>,
    /// Jobs being written unowned that this incarnation claimed back meanwhile: its own even
    /// if the batch turns out to be an earlier incarnation's.
    reclaimed: HashSet<u64>,
}

/// A GET_STATUS or GET_STATUS_UNIQUE, or an admin `cancel job`, for a job this node does
/// not hold.
#[derive(Clone, Debug)]
pub struct StatusQuery {
    pub id: u64,
    /// A sequence number, or a unique key.
    pub seq: Option<u64>,
    pub unique: Vec<u8>,
    /// Cancel the job (`seq`) if no node owns it yet; answered with [`Broker::cancel_answered`].
    pub cancel: bool,
}

impl Broker {
    /// Makes this broker a cluster node; `wake` is notified when workers go idle with nothing
    /// queued, or a status question waits for the database.
    pub fn enable_cluster(&mut self, wake: Arc<Notify>) {
        self.cluster = Some(ClusterState {
            node: 0,
            valid_until: Instant::now(),
            wake,
            statuses: Vec::new(),
            next_status: 0,
            unowned: HashSet::new(),
            reclaimed: HashSet::new(),
        });
    }

    pub(super) fn in_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// The incarnation this node is (0: none at the moment).
    pub fn cluster_node(&self) -> u64 {
        self.cluster.as_ref().map_or(0, |c| c.node)
    }

    /// Starts incarnation `node`, whose lease lets it dispatch until `valid_until`.
    pub fn join_cluster(&mut self, node: u64, valid_until: Instant) {
        let c = self.cluster.as_mut().expect("cluster enabled");
        c.node = node;
        c.valid_until = valid_until;
        self.next_seq = first_seq(node);
    }

    /// A renewal extended the lease: dispatch until `valid_until`.
    pub fn lease_valid_until(&mut self, valid_until: Instant) {
        if let Some(c) = self.cluster.as_mut() {
            c.valid_until = valid_until;
        }
    }

    /// Whether this node may hand jobs to workers now.
    pub(super) fn may_dispatch(&self) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.node != 0 && Instant::now() < c.valid_until)
    }

    /// The lease is lost: forget every stored job this incarnation held (others take them
    /// over). Their workers' results will name unknown jobs; waiting foreground clients get
    /// WORK_FAIL. Jobs still being written stay: the store's fence decides them.
    pub fn leave_cluster(&mut self) -> usize {
        let Some(c) = self.cluster.as_mut() else { return 0 };
        c.node = 0;
        // Claims back were the old incarnation's; the rows are now the cluster's to take over.
        c.reclaimed.clear();
        self.current = None;
        // Dropped jobs (cancelled, waiting for their queue to reach them) are gone already.
        // Retries whose rewrite is pending or being written are the old incarnation's rows too.
        let retry_due = std::mem::take(&mut self.retry_due);
        let held: Vec<JobKey> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                (j.stored == Stored::Yes && j.state != JobState::Dropped)
                    || (j.state == JobState::Pending && retry_due.contains_key(&j.seq))
            })
            .map(|(k, _)| k as JobKey)
            .collect();
        for &key in &held {
            self.forget_stored(key);
        }
        for fid in 0..self.functions.len() as u32 {
            self.purge_dropped(fid);
        }
        self.durable.as_mut().expect("durable store enabled").forget_pending_changes();
        held.len()
    }

    fn forget_stored(&mut self, key: JobKey) {
        let job = &self.jobs[key as usize];
        let handle = self.handle(job.seq);
        for &c in job.clients() {
            self.send(c, T::WorkFail, &[&handle]);
        }
        let (fid, p, len, in_ram, state) =
            (job.function as usize, job.priority as usize, job.payload_len as usize, job.in_ram, job.state);
        if in_ram {
            self.durable.as_mut().expect("durable store enabled").ram_bytes -= len;
        }
        self.unindex(key);
        let f = &mut self.functions[fid];
        // Pending here: a retry being written (a new job's add is never stored yet).
        if matches!(state, JobState::Queued | JobState::Scheduled | JobState::Running(_) | JobState::Pending) {
            f.counts.handed_over[p] += 1;
        }
        match state {
            // The queue or schedule heap still holds the key; it is freed when reached.
            JobState::Queued | JobState::Scheduled => {
                if state == JobState::Queued {
                    f.queued[p] -= 1;
                } else {
                    f.scheduled -= 1;
                }
                let job = &mut self.jobs[key as usize];
                job.state = JobState::Dropped;
                job.extra = None;
                job.body = Box::default();
                job.unique_len = 0;
            }
            JobState::Running(w) => {
                f.running -= 1;
                self.take_running(w.get(), key);
                self.jobs.remove(key as usize);
            }
            JobState::Pending => {
                f.pending -= 1;
                self.jobs.remove(key as usize);
            }
            JobState::Dropped => {}
        }
    }

    /// Whether a new background job for function `fid`, due at `run_at`, is this node's.
    pub(super) fn owns_new_job(&self, fid: u32, run_at: i64) -> bool {
        !self.in_cluster() || (self.functions[fid as usize].workers > 0 && run_at <= unix_now())
    }

    /// Records a change of a stored job's row, for the cluster's status and attempt count.
    pub(super) fn mark(&mut self, key: JobKey, mark: Mark) {
        let job = &self.jobs[key as usize];
        if self.in_cluster() && job.stored == Stored::Yes {
            let seq = job.seq;
            self.pending_mark(seq, mark);
        }
    }

    /// A worker of `fid` went away. When it was this node's last, the jobs queued here for
    /// `fid` (that no client waits on) go back to the cluster for a node with workers.
    pub(super) fn worker_left(&mut self, fid: u32) {
        let f = &self.functions[fid as usize];
        if !self.in_cluster() || f.workers > 0 || f.queued_total() == 0 {
            return;
        }
        let keys: Vec<JobKey> = f.queues.iter().flatten().copied().collect();
        let mut released = 0;
        for key in keys {
            let job = &self.jobs[key as usize];
            if job.state == JobState::Queued && job.stored == Stored::Yes && job.clients().is_empty() {
                let seq = job.seq;
                self.forget_stored(key);
                self.pending_mark(seq, Mark::Released);
                released += 1;
            }
        }
        if released > 0 {
            self.purge_dropped(fid);
            let name = String::from_utf8_lossy(&self.functions[fid as usize].name);
            tracing::debug!("released {released} jobs of {name} to the cluster");
        }
    }

    /// Frees the dropped jobs `fid`'s queues still hold (a grab would, but no worker here
    /// may come to grab them).
    fn purge_dropped(&mut self, fid: u32) {
        let (f, jobs) = (&mut self.functions[fid as usize], &mut self.jobs);
        for p in 0..3 {
            let queue = std::mem::take(&mut f.queues[p]);
            f.queues[p] = queue
                .into_iter()
                .filter(|&k| {
                    let dropped = jobs[k as usize].state == JobState::Dropped;
                    if dropped {
                        jobs.remove(k as usize);
                    }
                    !dropped
                })
                .collect();
            f.fetched[p] = 0;
        }
    }

    /// Hands back the queued jobs of every function no worker here can do any more: jobs
    /// that came in after the last worker left (a claim or a commit under way then, a job
    /// queued again after CANT_DO). The cluster thread calls it every second.
    pub fn release_unserved(&mut self) {
        self.current = None;
        let unserved: Vec<u32> = (0..self.functions.len() as u32)
            .filter(|&fid| {
                let f = &self.functions[fid as usize];
                !f.dropped && f.workers == 0 && f.queued_total() > 0
            })
            .collect();
        for fid in unserved {
            self.worker_left(fid);
        }
    }

    /// A worker found nothing to do for these functions: the cluster may have some.
    pub(super) fn workers_idle(&mut self, functions: impl Iterator<Item = u32>) {
        let Some(c) = self.cluster.as_ref() else { return };
        let wake = c.wake.clone();
        for fid in functions {
            self.functions[fid as usize].starved = true;
        }
        wake.notify_one();
    }

    /// Functions with idle workers here and nothing queued for them, with how many jobs to
    /// claim for each, into `out` (cleared).
    pub fn claim_wants(&mut self, out: &mut Vec<(Bytes, usize)>) {
        out.clear();
        if !self.may_dispatch() {
            return;
        }
        for f in self.functions.iter_mut().filter(|f| !f.dropped && !f.paused && f.workers > 0 && f.queued_total() == 0)
        {
            let idle = f
                .sleepers
                .iter()
                .filter(|&&(c, e)| self.conns.get(c as usize).is_some_and(|c| c.sleeping && c.sleep_epoch == e))
                .count();
            // A function at its limit starts nothing more here: its idle workers wait.
            if f.limit > 0 && f.running >= f.limit {
                continue;
            }
            if idle > 0 || f.starved {
                f.starved = false;
                // Enough to keep the workers busy for a while: a claim is a round trip or three.
                // A limited function's jobs wait behind its limit: no more than it can start.
                let mut want = (32 * idle.max(f.workers as usize)).clamp(64, 1000);
                if f.limit > 0 {
                    want = want.min((f.limit - f.running) as usize);
                }
                out.push((f.name.clone(), want));
            }
        }
    }

    /// Takes in jobs incarnation `node` claimed. False if this node is no longer that
    /// incarnation (the claim's rows then wait for its takeover).
    pub fn restore_claimed(&mut self, node: u64, jobs: &[StoredJob]) -> bool {
        self.current = None;
        let job_retries = self.config.job_retries;
        if self.cluster_node() != node {
            return false;
        }
        // A claimed job keeps the number another incarnation gave it: new jobs here go on
        // numbering in this incarnation's own block.
        let next_seq = self.next_seq;
        for job in jobs {
            if let Some(key) = self.find_by_seq(job.seq) {
                if self.leaves_to_cluster(key) {
                    // Written unowned by this node, claimed back before the commit was taken in.
                    self.claim_back(job.seq);
                    self.cluster.as_mut().expect("cluster enabled").reclaimed.insert(job.seq);
                } else if self.jobs[key as usize].stored == Stored::No {
                    // The same job, kept here for its foreground clients after an earlier
                    // incarnation wrote it: stored again, and so removed when it ends.
                    let job = &mut self.jobs[key as usize];
                    job.stored = Stored::Yes;
                    job.loc = Loc(job.seq);
                    job.background = true;
                    self.keep_or_evict(key);
                }
                continue;
            }
            self.restore(job.as_loaded());
            let Some(key) = self.find_by_seq(job.seq) else { continue };
            // Its node died running it: a lost worker, which a retry policy with attempts left
            // forgives past `-j` as it does for a worker lost here.
            let retry_left = self.retry.get(&job.function).is_some_and(|p| job.attempts <= p.retries);
            if job_retries > 0 && job.attempts >= job_retries && !retry_left {
                self.give_up_claimed(key, job.attempts, job_retries);
            }
        }
        self.next_seq = next_seq;
        true
    }

    /// A claimed job whose earlier attempts (on nodes that died running it) used up `-j`.
    fn give_up_claimed(&mut self, key: JobKey, attempts: u32, retries: u32) {
        let handle = self.handle(self.jobs[key as usize].seq);
        tracing::warn!(handle = %String::from_utf8_lossy(&handle), "job failed after {retries} attempts");
        let error = format!("given up after {attempts} attempts (-j {retries})");
        let job = &self.jobs[key as usize];
        if matches!(job.state, JobState::Queued | JobState::Scheduled) {
            self.log_attempt(key, Outcome::Fail, None, None, None, Some(error.as_bytes()));
            self.bury(key, Some(error.as_bytes()));
            self.take_out_of_queue(key);
        }
    }

    /// Whether `key` is being written for another node to claim.
    pub(super) fn leaves_to_cluster(&self, key: JobKey) -> bool {
        let seq = self.jobs[key as usize].seq;
        self.cluster.as_ref().is_some_and(|c| c.unowned.contains(&seq))
    }

    /// Job `seq` is being written unowned.
    pub(super) fn leave_to_cluster(&mut self, seq: u64) {
        if let Some(c) = self.cluster.as_mut() {
            c.unowned.insert(seq);
        }
    }

    /// Whether this incarnation claimed job `seq` back while it was being written (forgotten
    /// once asked: the commit that asks is the job's last).
    pub(super) fn take_reclaimed(&mut self, seq: u64) -> bool {
        self.cluster.as_mut().is_some_and(|c| c.reclaimed.remove(&seq))
    }

    /// Job `seq` is no longer being written unowned (it is this node's, or gone).
    pub(super) fn claim_back(&mut self, seq: u64) {
        if let Some(c) = self.cluster.as_mut() {
            c.unowned.remove(&seq);
        }
    }

    /// A committed job this node does not keep: written unowned, or its unique key named
    /// another node's job (`coalesced`: then it is no new job). It is forgotten, unless
    /// foreground clients wait on it: then it stays a foreground job of this node (the
    /// cluster's copy may run too: at least once).
    pub(super) fn hand_off(&mut self, key: JobKey, run_at: i64, now: i64, coalesced: bool) {
        let seq = self.jobs[key as usize].seq;
        self.claim_back(seq);
        let job = &mut self.jobs[key as usize];
        job.stored = Stored::No;
        let (fid, p, pending, waited) =
            (job.function as usize, job.priority as usize, job.state == JobState::Pending, !job.clients().is_empty());
        if pending {
            self.functions[fid].pending -= 1;
            let counts = &mut self.functions[fid].counts;
            if waited {
                counts.submitted[p] += 1;
                self.jobs[key as usize].background = false;
                self.release(key, run_at, now);
            } else {
                if !coalesced {
                    counts.submitted[p] += 1;
                    counts.handed_over[p] += 1;
                }
                self.unindex(key);
                self.jobs.remove(key as usize);
            }
            return;
        }
        job.background = false;
        if !waited && job.state == JobState::Queued {
            self.drop_queued(key, "its background submission joined another node's job and no client waits for it");
        }
    }

    /// Asks the database about a job this node does not hold; the answer to `conn` waits.
    pub(super) fn ask_cluster(&mut self, conn: ConnId, kind: T, name: &[u8]) {
        let c = self.cluster.as_mut().expect("cluster enabled");
        c.next_status += 1;
        let id = c.next_status;
        let seq = if kind == T::StatusRes { self.parse_handle(name) } else { None };
        let c = self.cluster.as_mut().unwrap();
        c.statuses.push(StatusQuery { id, seq, unique: name.to_vec(), cancel: false });
        c.wake.notify_one();
        self.hold(conn, Held::Cluster { id, unique: kind == T::StatusResUnique, name: name.into() });
    }

    /// Asks the database to cancel job `seq` (named `handle`), which this node does not hold;
    /// the admin reply to `conn` waits.
    pub(super) fn ask_cluster_cancel(&mut self, conn: ConnId, seq: u64, handle: &[u8]) {
        let c = self.cluster.as_mut().expect("cluster enabled");
        c.next_status += 1;
        let id = c.next_status;
        c.statuses.push(StatusQuery { id, seq: Some(seq), unique: handle.to_vec(), cancel: true });
        c.wake.notify_one();
        self.hold(conn, Held::Cluster { id, unique: false, name: handle.into() });
    }

    /// The database's answer to cancel question `id`: the admin reply line(s).
    pub fn cancel_answered(&mut self, id: u64, reply: &str) {
        self.current = None;
        let mut bytes = BytesMut::new();
        bytes.extend_from_slice(reply.as_bytes());
        self.answer_held(id, bytes);
    }

    /// Puts `bytes` in place of the held answer to question `id`, and sends what it held up.
    fn answer_held(&mut self, id: u64, bytes: BytesMut) {
        for conn in self.held_conns.clone() {
            let Some(c) = self.conns.get(conn as usize) else { continue };
            let mut held = c.held.borrow_mut();
            if let Some(slot) = held.iter_mut().flatten().find(|h| matches!(h, Held::Cluster { id: i, .. } if *i == id))
            {
                *slot = Held::Bytes(bytes);
                break;
            }
        }
        self.release_held();
    }

    /// The status questions waiting for the database, into `out` (cleared).
    pub fn status_queries(&mut self, out: &mut Vec<StatusQuery>) {
        out.clear();
        if let Some(c) = self.cluster.as_mut() {
            std::mem::swap(&mut c.statuses, out);
        }
    }

    /// The database's answer to status question `id` (`None`: no such job, or the lookup
    /// failed).
    pub fn status_answered(&mut self, id: u64, row: Option<RowStatus>) {
        self.current = None;
        let held = self.held_conns.iter().find_map(|&conn| {
            let c = self.conns.get(conn as usize)?;
            let held = c.held.borrow();
            held.iter().flatten().find_map(|h| match h {
                Held::Cluster { id: i, unique, name } if *i == id => Some((*unique, name.clone())),
                _ => None,
            })
        });
        let Some((unique, name)) = held else { return };
        let (mut n, mut d) = (itoa::Buffer::new(), itoa::Buffer::new());
        let (known, running, num, den): (&[u8], &[u8], &[u8], &[u8]) = match row {
            Some(r) => (
                b"1",
                if r.running { b"1" } else { b"0" },
                n.format(r.numerator).as_bytes(),
                d.format(r.denominator).as_bytes(),
            ),
            None => (b"0", b"0", b"0", b"0"),
        };
        let mut bytes = BytesMut::new();
        if unique {
            encode_packet(&mut bytes, Magic::Response, T::StatusResUnique, &[&name, known, running, num, den, b"0"]);
        } else {
            encode_packet(&mut bytes, Magic::Response, T::StatusRes, &[&name, known, running, num, den]);
        }
        self.answer_held(id, bytes);
    }
}
