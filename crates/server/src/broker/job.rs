//! Jobs: the record kept per job, its indices (by handle and by function and unique key),
//! and how a job leaves the broker: finished by its worker, or dropped from the queue. Every
//! attempt's end is counted and written to the job log here.

use std::hash::BuildHasher;

use gearbox_joblog::{now_millis, Millis, RecordRef, Status as Outcome};
use gearbox_proto::Priority;
use gearbox_store::Loc;

use super::{Broker, ConnId, FunctionId, JobKey, MAX_UNIQUE};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum JobState {
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
pub(super) struct PackedConn([u8; 4]);

impl PackedConn {
    pub(super) fn new(conn: ConnId) -> PackedConn {
        PackedConn(conn.to_ne_bytes())
    }

    pub(super) fn get(self) -> ConnId {
        ConnId::from_ne_bytes(self.0)
    }
}

/// Whether the durable store holds a job's record.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Stored {
    /// Not written: a foreground job, or no durable store.
    No,
    /// In the batch being written or the next one (told apart by the parity of the batch's
    /// number); its location is not known yet.
    Adding { odd: bool },
    /// Committed, at [`Job::loc`].
    Yes,
}

/// Kept small: a deep queue holds millions of these.
pub(super) struct Job {
    pub(super) seq: u64,
    /// Where the durable store keeps the job.
    pub(super) loc: Loc,
    /// The unique key followed by the payload (when `in_ram`), in one allocation.
    pub(super) body: Box<[u8]>,
    /// Waiting clients and progress, for the jobs that have them.
    pub(super) extra: Option<Box<JobExtra>>,
    /// Milliseconds since the epoch (for a job loaded from the store: when it was loaded).
    pub(super) submitted_at: Millis,
    /// The [`Conn::serial`](super::conn::Conn::serial) of the connection that submitted it.
    pub(super) submitter: u32,
    pub(super) function: FunctionId,
    pub(super) payload_len: u32,
    pub(super) state: JobState,
    pub(super) attempts: u16,
    /// At most [`MAX_UNIQUE`].
    pub(super) unique_len: u8,
    pub(super) priority: Priority,
    /// A background submission is attached: the job is kept and stored until it ends, whoever
    /// else waits on it. Set by the first such submission, whether or not it created the job.
    pub(super) background: bool,
    pub(super) stored: Stored,
    /// False when the payload was dropped from memory to be read back from the store.
    pub(super) in_ram: bool,
}

#[derive(Default)]
pub(super) struct JobExtra {
    /// Foreground clients waiting for the result.
    pub(super) clients: Vec<ConnId>,
    pub(super) numerator: u32,
    pub(super) denominator: u32,
}

const _: () = assert!(std::mem::size_of::<Job>() <= 72, "Job grew: every queued job pays for it");

impl Job {
    pub(super) fn clients(&self) -> &[ConnId] {
        self.extra.as_ref().map_or(&[], |e| &e.clients)
    }

    pub(super) fn extra_mut(&mut self) -> &mut JobExtra {
        self.extra.get_or_insert_with(Default::default)
    }

    pub(super) fn progress(&self) -> (u32, u32) {
        self.extra.as_ref().map_or((0, 0), |e| (e.numerator, e.denominator))
    }

    pub(super) fn unique(&self) -> &[u8] {
        &self.body[..self.unique_len as usize]
    }

    /// The payload, when in memory (see [`Broker::payload`]).
    pub(super) fn data(&self) -> &[u8] {
        &self.body[self.unique_len as usize..]
    }
}

fn seq_hash(seq: u64) -> u64 {
    seq.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl Broker {
    pub(super) fn find_by_handle(&self, handle: &[u8]) -> Option<JobKey> {
        self.find_by_seq(self.parse_handle(handle)?)
    }

    pub(super) fn find_by_seq(&self, seq: u64) -> Option<JobKey> {
        self.by_seq.find(seq_hash(seq), |&k| self.jobs[k as usize].seq == seq).copied()
    }

    pub(super) fn unique_hash(&self, function: FunctionId, unique: &[u8]) -> u64 {
        self.hasher.hash_one((function, unique))
    }

    pub(super) fn find_by_unique(&self, function: FunctionId, unique: &[u8]) -> Option<JobKey> {
        let hash = self.unique_hash(function, unique);
        self.by_unique
            .find(hash, |&k| {
                let j = &self.jobs[k as usize];
                j.function == function && j.unique() == unique
            })
            .copied()
    }

    /// Creates an indexed job, not yet queued. `unique` is at most [`MAX_UNIQUE`] bytes.
    pub(super) fn insert_job(
        &mut self,
        seq: u64,
        function: FunctionId,
        priority: Priority,
        background: bool,
        unique: &[u8],
        data: &[u8],
    ) -> JobKey {
        debug_assert!(unique.len() <= MAX_UNIQUE);
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
            unique_len: unique.len() as u8,
            extra: None,
            submitted_at: now_millis(),
            submitter: u32::MAX,
            body: body.into_boxed_slice(),
            payload_len: data.len() as u32,
            stored: Stored::No,
            in_ram: true,
            loc: Loc::NONE,
        }) as JobKey;
        self.index(key);
        key
    }

    pub(super) fn index(&mut self, key: JobKey) {
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
    pub(super) fn unindex(&mut self, key: JobKey) {
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

    /// A running job ended (completed, failed, or gave up): log it and forget it.
    pub(super) fn finish(&mut self, key: JobKey, outcome: Outcome, result: Option<&[u8]>, error: Option<&[u8]>) {
        let job = &self.jobs[key as usize];
        let fid = job.function;
        if let JobState::Running(w) = job.state {
            let w = w.get();
            self.functions[fid as usize].running -= 1;
            let started_at = self.take_running(w, key);
            self.log_attempt(key, outcome, Some(w), started_at, result, error);
            self.slot_freed(fid);
        }
        if matches!(outcome, Outcome::Fail | Outcome::Exception) && self.retry_or_bury(key, error) {
            return;
        }
        self.unstore(key);
        self.unindex(key);
        self.jobs.remove(key as usize);
    }

    /// Counts an attempt that ended and writes its job-log record.
    pub(super) fn log_attempt(
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
            Outcome::Cancelled => counts.cancelled[job.priority as usize] += 1,
            Outcome::Timeout | Outcome::LostWorker => {}
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

    /// Takes a queued or scheduled job out of service. Its slot stays allocated until the
    /// queue or schedule heap that still holds its key reaches it.
    pub(super) fn drop_queued(&mut self, key: JobKey, why: &str) {
        self.log_attempt(key, Outcome::Cancelled, None, None, None, Some(why.as_bytes()));
        self.take_out_of_queue(key);
    }

    /// The rest of [`Broker::drop_queued`], once the attempt is logged.
    pub(super) fn take_out_of_queue(&mut self, key: JobKey) {
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
}

/// At most the first `max` bytes of `b`.
fn prefix(b: &[u8], max: usize) -> &[u8] {
    &b[..b.len().min(max)]
}
