//! Background jobs on a durable store.
//!
//! A background submission becomes a *pending* job: it is indexed (so duplicates coalesce
//! onto it) but not dispatchable, and its record joins the batch the store thread commits
//! next. The client's JOB_CREATED waits for that commit. A background submission coalesced
//! onto a foreground job makes it a background job: its record is written the same way (the
//! job keeps running or waiting meanwhile) and that submission's JOB_CREATED waits too.
//!
//! Replies to one connection must keep their order, so once a connection waits for a
//! commit, everything else sent to it waits behind it in a queue of held replies. When a
//! batch commits, the acknowledgements of the jobs it carried become JOB_CREATED (or an
//! ERROR if it failed) in place, and each queue is released up to its first unresolved one.
//!
//! Payloads of committed jobs are kept in memory up to a budget; past it they are dropped
//! and read back from the store (see `payload`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar};
use std::time::Instant;

use bytes::BytesMut;
use gearbox_proto::{encode_packet, Magic, PacketType as T};
use gearbox_store::{Batch, LoadedJob, Loc, PayloadReader};

use super::job::{JobState, Stored};
use super::timer::unix_now;
use super::{Broker, ConnId, JobKey, MAX_UNIQUE};

pub(super) struct Durability {
    /// Changes not yet handed to the store thread.
    pending: Batch,
    /// Wakes the store thread (it waits on the broker's mutex).
    pub(super) wake: Arc<Condvar>,
    /// Reads payloads back from any thread (the embedded store)...
    pub(super) reader: Option<Arc<dyn PayloadReader>>,
    /// ...or the store thread reads them in batches (a database).
    pub(super) fetches: bool,
    /// Jobs handed to workers whose JOB_ASSIGN waits for the store thread to read the payload.
    pub(super) wanted: Vec<u64>,
    /// Payload bytes in memory, of stored jobs.
    pub(super) ram_bytes: usize,
    /// The number of the batch `pending` becomes; the one before it is being written.
    batch: u64,
    /// When the oldest pending change, and the oldest pending job, arrived.
    change_since: Option<Instant>,
    add_since: Option<Instant>,
}

impl Durability {
    pub(super) fn batch_number(&self) -> u64 {
        self.batch
    }

    /// The pending batch, for a change that a commit must follow soon, as a new job's does
    /// (a retry: see [`Batch::push_retry`]).
    pub(super) fn pending_soon(&mut self) -> &mut Batch {
        if self.add_since.is_none() {
            let now = Instant::now();
            self.add_since = Some(now);
            self.change_since.get_or_insert(now);
            self.wake.notify_one();
        }
        &mut self.pending
    }

    /// Forgets pending removals and marks: they name rows of an incarnation that lost its
    /// lease, and would otherwise be written under the next, which may claim those rows again.
    pub(super) fn forget_pending_changes(&mut self) {
        self.pending.keep_only_adds();
    }
}

/// What waits for the store thread: how many new jobs since when, and since when anything.
#[derive(Clone, Copy, Debug)]
pub struct PendingState {
    pub jobs: usize,
    pub jobs_since: Option<Instant>,
    pub changes_since: Option<Instant>,
}

/// A reply to a connection that waits for a commit. Kept small: every background
/// submission's acknowledgement is one.
pub(super) enum Held {
    Bytes(BytesMut),
    /// The answer to a background submission (or a foreground one that joined a pending
    /// job) with this sequence number, waiting for the commit of the batch with this number,
    /// which carries the job's record: it becomes `Created`, or the bytes of an ERROR if the
    /// commit fails.
    Ack {
        seq: u64,
        batch: u64,
        /// A background submission's: in a cluster, answered with the handle of the job that
        /// holds its unique key, if another node has one.
        background: bool,
    },
    /// JOB_CREATED for this job, encoded when released.
    Created(u64),
    /// JOB_ASSIGN (or JOB_ASSIGN_UNIQ) of this job, once the store thread has read its
    /// payload.
    Assign {
        seq: u64,
        uniq: bool,
    },
    /// An answer that waits for the cluster's database (question `id`): STATUS_RES (or
    /// STATUS_RES_UNIQUE, when `unique`) for `name`, or an admin reply.
    Cluster {
        id: u64,
        unique: bool,
        name: Box<[u8]>,
    },
}

const _: () = assert!(std::mem::size_of::<Held>() <= 40, "Held grew: every acknowledgement pays for it");

impl Broker {
    /// Switches background submissions to the durable path. `wake` is notified (while the
    /// broker lock is held) whenever changes or payload reads wait for the store thread.
    /// Payloads past the memory budget are read back through `reader`, or, if the store
    /// `fetches` them, by the store thread (see [`Broker::payload_requests`]).
    pub fn enable_durability(&mut self, wake: Arc<Condvar>, reader: Option<Arc<dyn PayloadReader>>, fetches: bool) {
        self.durable = Some(Durability {
            pending: Batch::default(),
            wake,
            reader,
            fetches,
            wanted: Vec::new(),
            ram_bytes: 0,
            batch: 0,
            change_since: None,
            add_since: None,
        });
    }

    pub fn has_pending(&self) -> bool {
        self.durable.as_ref().is_some_and(|d| !d.pending.is_empty())
    }

    /// What waits for the store thread.
    pub fn pending_state(&self) -> PendingState {
        match &self.durable {
            Some(d) => PendingState {
                jobs: d.pending.adds().len() + d.pending.retries().len(),
                jobs_since: d.add_since,
                changes_since: d.change_since,
            },
            None => PendingState { jobs: 0, jobs_since: None, changes_since: None },
        }
    }

    /// Moves the pending changes into `batch` (which the caller has cleared), stamped with
    /// the cluster incarnation that wrote them.
    pub fn take_pending(&mut self, batch: &mut Batch) {
        let node = self.cluster_node();
        if let Some(d) = self.durable.as_mut() {
            std::mem::swap(&mut d.pending, batch);
            batch.owner = node;
            d.batch += 1;
            d.change_since = None;
            d.add_since = None;
        }
    }

    /// Records a removal. Nobody waits for one: it is written with the next jobs, or after
    /// a short delay (a crash before then runs the job again: at-least-once).
    pub(super) fn pending_remove(&mut self, seq: u64, loc: Loc) {
        let d = self.durable.as_mut().expect("durable store enabled");
        if d.change_since.is_none() {
            d.change_since = Some(Instant::now());
            d.wake.notify_one();
        }
        d.pending.push_remove(seq, loc);
    }

    /// Records a change of a stored job's row (a cluster's store writes it), with the next
    /// batch or after a short delay, as a removal.
    pub(super) fn pending_mark(&mut self, seq: u64, mark: gearbox_store::Mark) {
        let d = self.durable.as_mut().expect("durable store enabled");
        if d.change_since.is_none() {
            d.change_since = Some(Instant::now());
            d.wake.notify_one();
        }
        d.pending.push_mark(seq, mark);
    }

    /// Writes a background job's record with the next batch; the submitter's JOB_CREATED
    /// waits for it.
    /// In a cluster, a new job is left for another node to claim unless this node can run
    /// it now (see `cluster`).
    pub(super) fn store_add(&mut self, conn: ConnId, key: JobKey, run_at: i64) {
        let job = &self.jobs[key as usize];
        let owned = job.state != JobState::Pending || self.owns_new_job(job.function, run_at);
        if !owned {
            self.leave_to_cluster(job.seq);
        }
        let d = self.durable.as_mut().expect("durable store enabled");
        let job = &mut self.jobs[key as usize];
        job.stored = Stored::Adding { odd: d.batch % 2 == 1 };
        let (seq, priority, batch) = (job.seq, job.priority as u8, d.batch);
        let name = self.functions[job.function as usize].name.clone();
        if d.add_since.is_none() {
            let now = Instant::now();
            d.add_since = Some(now);
            d.change_since.get_or_insert(now);
            d.wake.notify_one();
        }
        d.pending.push_add(seq, priority, run_at, &name, job.unique(), job.data());
        if !owned {
            d.pending.disown_last();
        }
        self.hold_ack(conn, seq, batch, true);
    }

    /// The number of the batch carrying a record in `Stored::Adding { odd }`: the pending
    /// batch or the one being written, whichever has that parity.
    pub(super) fn batch_carrying(&self, odd: bool) -> u64 {
        let pending = self.durable.as_ref().expect("durable store enabled").batch;
        if (pending % 2 == 1) == odd {
            pending
        } else {
            pending - 1
        }
    }

    /// Forgets a stored job (it finished, failed or was cancelled). A job whose record is
    /// still being written is removed once the commit says where the record landed.
    pub(super) fn unstore(&mut self, key: JobKey) {
        let job = &self.jobs[key as usize];
        if job.stored != Stored::Yes {
            return;
        }
        let (seq, loc, in_ram, len) = (job.seq, job.loc, job.in_ram, job.payload_len as usize);
        if in_ram {
            self.durable.as_mut().unwrap().ram_bytes -= len;
        }
        self.pending_remove(seq, loc);
    }

    /// Whether replies to `conn` wait for a commit.
    pub fn holds_replies(&self, conn: ConnId) -> bool {
        self.conns.get(conn as usize).is_some_and(|c| c.held.borrow().is_some())
    }

    /// Queues JOB_CREATED for `seq`, once `batch` commits, behind everything already held for
    /// `conn`; `background` if a background submission waits for it.
    pub(super) fn hold_ack(&mut self, conn: ConnId, seq: u64, batch: u64, background: bool) {
        self.hold(conn, Held::Ack { seq, batch, background });
    }

    /// Queues a reply that waits for the store thread behind everything held for `conn`.
    pub(super) fn hold(&mut self, conn: ConnId, reply: Held) {
        let Some(c) = self.conns.get(conn as usize) else { return };
        let mut held = c.held.borrow_mut();
        if held.is_none() {
            self.held_conns.push(conn);
        }
        held.get_or_insert_with(VecDeque::new).push_back(reply);
    }

    /// Applies the outcome of committing `batch`. On success its new jobs become runnable
    /// and every job it carried is stored; on failure new jobs are dropped and jobs made
    /// background by a coalesced submission go back to being foreground jobs. Either way the
    /// submissions waiting on it get their answer. In a cluster, `coalesced` names the adds
    /// the store did not keep because another job holds their unique key (and that job), and
    /// jobs written unowned are handed to the cluster.
    pub fn committed(&mut self, batch: &Batch, outcome: Result<&[Loc], String>, coalesced: &[(u64, u64)]) {
        self.current = None;
        let now = unix_now();
        let coalesced: HashMap<u64, u64> = coalesced.iter().copied().collect();
        // Written by an incarnation this node no longer is: its jobs belong to that one, which
        // the cluster takes over.
        let stale = self.in_cluster() && batch.owner != self.cluster_node();
        for (i, add) in batch.adds().enumerate() {
            let key = self.find_by_seq(add.seq);
            let reclaimed = self.take_reclaimed(add.seq);
            debug_assert!(key.is_none_or(|k| matches!(self.jobs[k as usize].stored, Stored::Adding { .. })));
            // Where the record landed. A commit that failed may still have landed: this node's
            // claim of the job says so (a cluster store's location is the sequence number).
            let landed = match &outcome {
                Ok(locs) => Some(locs[i]),
                Err(_) if reclaimed => Some(Loc(add.seq)),
                Err(_) => None,
            };
            match (landed, key) {
                (Some(_), Some(key))
                    if (stale && !reclaimed) || coalesced.contains_key(&add.seq) || self.leaves_to_cluster(key) =>
                {
                    self.hand_off(key, add.run_at, now, coalesced.contains_key(&add.seq))
                }
                (Some(loc), Some(key)) => {
                    let job = &mut self.jobs[key as usize];
                    job.loc = loc;
                    job.stored = Stored::Yes;
                    let (pending, fid, priority) = (job.state == JobState::Pending, job.function, job.priority);
                    self.keep_or_evict(key);
                    if pending {
                        let f = &mut self.functions[fid as usize];
                        f.pending -= 1;
                        f.counts.submitted[priority as usize] += 1;
                        self.release(key, add.run_at, now);
                    }
                }
                // The job ended while its record was being written: remove the record (one
                // written by an earlier incarnation is that one's, for the cluster to take over).
                (Some(loc), None) if !stale => self.pending_remove(add.seq, loc),
                (Some(_), None) => {}
                (None, Some(key)) => {
                    self.claim_back(add.seq);
                    self.unadd(key)
                }
                (None, None) => {}
            }
        }
        self.retries_committed(batch, &outcome);
        if let Err(why) = &outcome {
            tracing::error!("queue store commit failed: {why}");
            // Nobody waits on removals: retry them with the next batch; and the jobs handed
            // back to a cluster, which this node no longer holds. Not those of an incarnation
            // the node no longer is: the cluster takes its rows over.
            if !stale {
                for &(seq, loc) in batch.removes() {
                    self.pending_remove(seq, loc);
                }
                for &(seq, mark) in batch.marks() {
                    if mark == gearbox_store::Mark::Released {
                        self.pending_mark(seq, mark);
                    }
                }
            }
        }
        self.answer_acks(outcome.as_ref().err().map(String::as_str), &coalesced);
        self.release_held();
    }

    /// Retried jobs wait for their next attempt once their record is rewritten. If it could
    /// not be, they wait all the same: the old record runs them again after a restart.
    fn retries_committed(&mut self, batch: &Batch, outcome: &Result<&[Loc], String>) {
        let first = batch.adds().len();
        for (i, retry) in batch.retries().enumerate() {
            let seq = retry.job.seq;
            let due = self.retry_due.remove(&seq).unwrap_or(retry.job.run_at.saturating_mul(1000));
            let Some(key) = self.find_by_seq(seq) else { continue };
            let job = &mut self.jobs[key as usize];
            if job.state != JobState::Pending || !matches!(job.stored, Stored::Adding { .. }) {
                continue;
            }
            let landed = outcome.as_ref().ok().map(|locs| locs[first + i]);
            if let Some(loc) = landed {
                job.loc = loc;
            }
            job.stored = Stored::Yes;
            self.functions[job.function as usize].pending -= 1;
            self.schedule_ms(key, due);
        }
    }

    /// A job whose record could not be stored: a new one is dropped; one that a coalesced
    /// background submission made background is a foreground job again, dropped if it is
    /// queued and no client waits for it any more.
    fn unadd(&mut self, key: JobKey) {
        let job = &mut self.jobs[key as usize];
        job.stored = Stored::No;
        if job.state == JobState::Pending {
            self.functions[job.function as usize].pending -= 1;
            self.unindex(key);
            self.jobs.remove(key as usize);
            return;
        }
        job.background = false;
        if job.clients().is_empty() && job.state == JobState::Queued {
            self.drop_queued(key, "its background submission could not be stored and no client waits for it");
        }
    }

    /// Turns the held acknowledgements waiting for the batch just written into their answers.
    fn answer_acks(&mut self, error: Option<&str>, coalesced: &HashMap<u64, u64>) {
        if self.held_conns.is_empty() {
            return;
        }
        let written = self.durable.as_ref().unwrap().batch - 1;
        let error = error.map(|why| format!("could not store the job: {why}"));
        for &conn in &self.held_conns {
            let Some(c) = self.conns.get(conn as usize) else { continue };
            let mut held = c.held.borrow_mut();
            for reply in held.iter_mut().flatten() {
                let Held::Ack { seq, batch, background } = *reply else { continue };
                if batch != written {
                    continue;
                }
                *reply = match &error {
                    None if background => Held::Created(coalesced.get(&seq).copied().unwrap_or(seq)),
                    None => Held::Created(seq),
                    Some(why) => {
                        let mut bytes = BytesMut::new();
                        encode_packet(&mut bytes, Magic::Response, T::Error, &[b"QUEUE_ERROR", why.as_bytes()]);
                        Held::Bytes(bytes)
                    }
                };
            }
        }
    }

    /// Makes a committed or restored job runnable (now or at its time).
    pub(super) fn release(&mut self, key: JobKey, run_at: i64, now: i64) {
        if run_at > now {
            self.schedule(key, run_at);
        } else {
            self.enqueue(key, false);
        }
    }

    /// Sends each held connection its replies up to the first unanswered acknowledgement.
    pub(super) fn release_held(&mut self) {
        let mut still_held = Vec::new();
        for conn in std::mem::take(&mut self.held_conns) {
            let Some(c) = self.conns.get(conn as usize) else { continue };
            let mut queue = c.held.borrow_mut().take().unwrap_or_default();
            loop {
                match queue.front() {
                    Some(Held::Bytes(bytes)) => self.push_out(conn, |b| b.extend_from_slice(bytes)),
                    Some(&Held::Created(seq)) => {
                        let handle = self.handle(seq);
                        self.push_out(conn, |b| encode_packet(b, Magic::Response, T::JobCreated, &[&handle]));
                    }
                    Some(Held::Ack { .. } | Held::Assign { .. } | Held::Cluster { .. }) | None => break,
                }
                queue.pop_front();
            }
            if !queue.is_empty() {
                *self.conns[conn as usize].held.borrow_mut() = Some(queue);
                still_held.push(conn);
            }
        }
        self.held_conns = still_held;
    }

    /// Puts a job loaded from the store back in the queue, with its original handle.
    pub fn restore(&mut self, stored: LoadedJob<'_>) {
        let fid = self.function_id(stored.function);
        let priority = match stored.priority {
            0 => gearbox_proto::Priority::High,
            2 => gearbox_proto::Priority::Low,
            _ => gearbox_proto::Priority::Normal,
        };
        // Stores yield each job once (a log's duplicates are resolved at load, a table's
        // sequence number is its key): no lookup before the insert.
        self.next_seq = self.next_seq.max(stored.seq + 1);
        debug_assert!(self.find_by_seq(stored.seq).is_none(), "job {} loaded twice", stored.seq);
        let unique = if stored.unique.len() <= MAX_UNIQUE {
            stored.unique
        } else {
            // Only an import from another server could hold such a key: keep the job, unkeyed.
            tracing::warn!("restored job {} has a unique key longer than {MAX_UNIQUE} bytes; ignoring it", stored.seq);
            b""
        };
        // Past the memory budget the payload is not even copied: it is read back when needed.
        let len = stored.data.len();
        let in_ram = self.take_into_ram(len, stored.loc);
        // The store does not keep submission times: the job log sees the load time.
        let data = if in_ram { stored.data } else { b"" };
        let key = self.insert_job(stored.seq, fid, priority, true, unique, data);
        let job = &mut self.jobs[key as usize];
        job.loc = stored.loc;
        job.stored = Stored::Yes;
        job.state = JobState::Pending;
        job.payload_len = len as u32;
        job.in_ram = in_ram;
        job.attempts = stored.attempts.min(u32::from(u16::MAX)) as u16;
        if !unique.is_empty() && self.find_by_unique(fid, unique) != Some(key) {
            // Two stored jobs with one unique key (possible after an import): keep both.
            tracing::warn!("restored job {} shares its unique key with another", stored.seq);
        }
        self.functions[fid as usize].counts.restored[priority as usize] += 1;
        self.release(key, stored.run_at, unix_now());
    }

    /// New jobs take sequence numbers above `seq` (the highest the store has a record of:
    /// after the clock stepped back, the boot time alone might reuse one).
    pub fn number_after(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq + 1);
    }

    /// Which of the store's compaction `candidates` (sequence number, location) are stored
    /// jobs whose current record is at that location.
    pub fn live_stored(&self, candidates: &[(u64, Loc)]) -> Vec<u64> {
        let current =
            |&&(seq, loc): &&(u64, Loc)| self.find_by_seq(seq).is_some_and(|k| self.jobs[k as usize].loc == loc);
        candidates.iter().filter(current).map(|&(seq, _)| seq).collect()
    }

    /// Records where the store moved jobs. A job that ended while it was being moved gets
    /// its removal written again, after the copy.
    pub fn relocate(&mut self, moved: &[(u64, Loc)]) {
        for &(seq, loc) in moved {
            match self.find_by_seq(seq) {
                Some(key) => {
                    self.jobs[key as usize].loc = loc;
                    // A retry waiting to be written replaces the record where it is now.
                    // (Compaction runs between commits: the retry is pending, not in flight.)
                    if self.retry_due.contains_key(&seq) {
                        self.durable.as_mut().expect("durable store enabled").pending.retarget_retry(seq, loc);
                    }
                }
                None => self.pending_remove(seq, loc),
            }
        }
    }
}
