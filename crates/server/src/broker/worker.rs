//! Workers: the functions a connection can do, grabbing jobs, results, and workers that
//! vanish or time out.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use gearbox_joblog::{now_millis, Millis, Status as Outcome};
use gearbox_proto::{GrabKind, PacketType as T};
use gearbox_store::Mark;

use super::function::push_sleeper;
use super::job::{JobState, PackedConn};
use super::{Broker, ConnId, FunctionId, JobKey, MAX_FUNCTION};

/// Shortest job timeout honoured for CAN_DO_TIMEOUT, as in gearmand.
const MIN_JOB_TIMEOUT: Duration = Duration::from_millis(1000);

/// A function a worker connection registered, with its CAN_DO_TIMEOUT.
pub(super) struct Ability {
    pub(super) function: FunctionId,
    pub(super) timeout: Option<Duration>,
}

/// A job a worker is running, and since when.
pub(super) struct Running {
    pub(super) key: JobKey,
    pub(super) started_at: Millis,
}

impl Broker {
    pub(super) fn grab(&mut self, conn: ConnId, kind: GrabKind) {
        if !self.may_dispatch() {
            return self.send(conn, T::NoJob, &[]);
        }
        let c = &mut self.conns[conn as usize];
        c.sleeping = false;
        // Highest priority first across all the worker's functions; oldest first within one.
        let mut best: Option<(usize, u64, FunctionId)> = None;
        for ability in &c.abilities {
            let f = &mut self.functions[ability.function as usize];
            if f.paused || (f.limit > 0 && f.running >= f.limit) {
                continue;
            }
            for p in 0..3 {
                while let Some(&k) = f.queues[p].front() {
                    if self.jobs[k as usize].state == JobState::Dropped {
                        f.queues[p].pop_front();
                        f.fetched[p] = f.fetched[p].saturating_sub(1);
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
            if self.cluster.is_some() {
                let abilities: Vec<FunctionId> = c.abilities.iter().map(|a| a.function).collect();
                self.workers_idle(abilities.into_iter());
            }
            return self.send(conn, T::NoJob, &[]);
        };
        let timeout = c.abilities.iter().find(|a| a.function == fid).and_then(|a| a.timeout);
        let f = &mut self.functions[fid as usize];
        let key = f.queues[p].pop_front().expect("candidate exists");
        f.fetched[p] = f.fetched[p].saturating_sub(1);
        f.queued[p] -= 1;
        f.running += 1;
        let started_at = now_millis();
        self.conns[conn as usize].running.push(Running { key, started_at });
        let job = &mut self.jobs[key as usize];
        f.counts.queue_wait.observe_ms(started_at - job.submitted_at);
        job.state = JobState::Running(PackedConn::new(conn));
        job.attempts = job.attempts.saturating_add(1);
        self.mark(key, Mark::Started);
        let job = &self.jobs[key as usize];
        if let Some(t) = timeout {
            let deadline = Instant::now() + t;
            self.timeouts.push(Reverse((deadline, job.seq, job.attempts, key)));
            self.arm_timer(deadline);
        }
        let job = &self.jobs[key as usize];
        if self.awaits_fetch(job) {
            return self.hold_assign(conn, key, kind != GrabKind::Plain);
        }
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

    pub(super) fn pre_sleep(&mut self, conn: ConnId) {
        let c = &self.conns[conn as usize];
        let has_work = c
            .abilities
            .iter()
            .any(|a| self.functions[a.function as usize].queued_total() > 0 && self.dispatchable(a.function));
        if has_work && self.may_dispatch() {
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
        if self.in_cluster() {
            self.workers_idle(std::iter::empty());
        }
    }

    /// CAN_DO (`timeout_ms` 0) or CAN_DO_TIMEOUT.
    pub(super) fn can_do(&mut self, conn: ConnId, function: &[u8], timeout_ms: u32) {
        let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms.into()).max(MIN_JOB_TIMEOUT));
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
            if f.queued_total() > 0 && !f.paused && (f.limit == 0 || f.running < f.limit) {
                self.conns[conn as usize].sleeping = false;
                self.send(conn, T::Noop, &[]);
            } else {
                push_sleeper(f, conn, epoch, &self.conns);
            }
        }
    }

    pub(super) fn reset_abilities(&mut self, conn: ConnId) {
        let abilities = std::mem::take(&mut self.conns[conn as usize].abilities);
        for ability in abilities {
            self.functions[ability.function as usize].workers -= 1;
            self.worker_left(ability.function);
        }
    }

    pub(super) fn cant_do(&mut self, conn: ConnId, function: &[u8]) {
        let Some(&fid) = self.function_ids.get(function) else {
            return;
        };
        let c = &mut self.conns[conn as usize];
        if let Some(i) = c.abilities.iter().position(|a| a.function == fid) {
            c.abilities.swap_remove(i);
            self.functions[fid as usize].workers -= 1;
            self.worker_left(fid);
        }
    }

    /// The job `handle` names, if `conn` is the worker running it; otherwise an ERROR.
    pub(super) fn running_job(&self, conn: ConnId, handle: &[u8]) -> Option<JobKey> {
        let seq = self.parse_handle(handle);
        let c = &self.conns[conn as usize];
        let found = seq.and_then(|seq| c.running.iter().map(|r| r.key).find(|&k| self.jobs[k as usize].seq == seq));
        if found.is_none() && (seq.is_none() || seq != c.excepted) {
            self.send_error(conn, "JOB_NOT_FOUND", "Job given in work result not found");
        }
        found
    }

    /// WORK_DATA or WORK_WARNING: passed on to the waiting clients.
    pub(super) fn forward(&self, conn: ConnId, kind: T, handle: &[u8], data: &[u8]) {
        if let Some(key) = self.running_job(conn, handle) {
            for &c in self.jobs[key as usize].clients() {
                self.send(c, kind, &[handle, data]);
            }
        }
    }

    pub(super) fn work_status(&mut self, conn: ConnId, handle: &[u8], numerator: u32, denominator: u32) {
        let Some(key) = self.running_job(conn, handle) else {
            return;
        };
        let extra = self.jobs[key as usize].extra_mut();
        extra.numerator = numerator;
        extra.denominator = denominator;
        self.mark(key, Mark::Progress(numerator, denominator));
        let mut n = itoa::Buffer::new();
        let mut d = itoa::Buffer::new();
        let args: [&[u8]; 3] = [handle, n.format(numerator).as_bytes(), d.format(denominator).as_bytes()];
        for &c in self.jobs[key as usize].clients() {
            self.send(c, T::WorkStatus, &args);
        }
    }

    pub(super) fn work_complete(&mut self, conn: ConnId, handle: &[u8], data: &[u8]) {
        if let Some(key) = self.running_job(conn, handle) {
            for &c in self.jobs[key as usize].clients() {
                self.send(c, T::WorkComplete, &[handle, data]);
            }
            self.finish(key, Outcome::Complete, Some(data), None);
        }
    }

    pub(super) fn work_fail(&mut self, conn: ConnId, handle: &[u8]) {
        if let Some(key) = self.running_job(conn, handle) {
            for &c in self.jobs[key as usize].clients() {
                self.send(c, T::WorkFail, &[handle]);
            }
            self.finish(key, Outcome::Fail, None, None);
        }
    }

    /// Clients that asked for exceptions get WORK_EXCEPTION, the others WORK_FAIL.
    pub(super) fn work_exception(&mut self, conn: ConnId, handle: &[u8], data: &[u8]) {
        if let Some(key) = self.running_job(conn, handle) {
            for &c in self.jobs[key as usize].clients() {
                if self.conns[c as usize].exceptions {
                    self.send(c, T::WorkException, &[handle, data]);
                } else {
                    self.send(c, T::WorkFail, &[handle]);
                }
            }
            self.conns[conn as usize].excepted = Some(self.jobs[key as usize].seq);
            // Clients get the payload as sent; the job log, its text.
            self.finish(key, Outcome::Exception, None, Some(gearbox_proto::exception::text(data)));
        }
    }

    /// Takes `key` off `worker`'s running list; returns when it started there.
    pub(super) fn take_running(&mut self, worker: ConnId, key: JobKey) -> Option<Millis> {
        let running = &mut self.conns.get_mut(worker as usize)?.running;
        let i = running.iter().position(|r| r.key == key)?;
        Some(running.swap_remove(i).started_at)
    }

    /// The worker running `key` went away or timed out: queue the job again, unless it has
    /// used up its attempts (then fail it) or nobody is left to want its result.
    pub(super) fn lose_worker(&mut self, key: JobKey, outcome: Outcome, worker: Option<ConnId>, started_at: Millis) {
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
            self.slot_freed(job.function);
            if self.retry_or_bury(key, Some(error.as_bytes())) {
                return;
            }
            self.unstore(key);
            self.unindex(key);
            self.jobs.remove(key as usize);
            return;
        }
        self.log_attempt(key, outcome, worker, Some(started_at), None, None);
        self.slot_freed(self.jobs[key as usize].function);
        if !background && abandoned {
            // Nobody wants the result any more: the job ends without another attempt.
            let job = &self.jobs[key as usize];
            self.functions[job.function as usize].counts.cancelled[job.priority as usize] += 1;
            self.unindex(key);
            self.jobs.remove(key as usize);
        } else {
            self.mark(key, Mark::Requeued);
            self.enqueue(key, true);
        }
    }
}
