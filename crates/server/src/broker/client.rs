//! Clients: submissions, coalescing by unique key, the foreground clients waiting on a job,
//! and job status.

use gearbox_proto::{PacketType as T, Priority};

use super::job::{JobState, Stored};
use super::{Broker, ConnId, JobKey, MAX_FUNCTION, MAX_UNIQUE};

impl Broker {
    /// STATUS_RES (or STATUS_RES_UNIQUE, which adds the waiting clients) for `job`, named
    /// as the client asked.
    pub(super) fn send_status(&self, conn: ConnId, kind: T, name: &[u8], job: Option<JobKey>) {
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
    pub(super) fn submit(
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
        let mut unique = unique;
        if !unique.is_empty() {
            if let Some(key) = self.find_by_unique(fid, unique) {
                if background || !self.leaves_to_cluster(key) {
                    return self.coalesce(conn, key, background);
                }
                // A foreground job stays on this node: it does not wait on a job written for
                // another node to claim, but runs here as a job of its own.
                unique = b"";
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
        let run_at = run_at.unwrap_or(0);
        if background && self.durable.is_some() {
            self.jobs[key as usize].state = JobState::Pending;
            self.functions[fid as usize].pending += 1;
            return self.store_add(conn, key, run_at);
        }
        self.functions[fid as usize].counts.submitted[priority as usize] += 1;
        if !background {
            self.attach(conn, key);
        }
        if run_at > now {
            self.schedule(key, run_at);
        } else {
            self.enqueue(key, false);
        }
        let handle = self.handle(seq);
        self.send(conn, T::JobCreated, &[&handle]);
    }

    /// A submission whose unique key names an existing job joins it. A foreground client
    /// waits for its result; a background submission makes the job a background job, which
    /// then outlives its foreground clients and is stored before this submission's
    /// JOB_CREATED. The job's priority and time stay those of its first submission.
    fn coalesce(&mut self, conn: ConnId, key: JobKey, background: bool) {
        let job = &self.jobs[key as usize];
        let (seq, upgrade) = (job.seq, background && !job.background);
        if !background {
            self.attach(conn, key);
        } else if upgrade {
            self.jobs[key as usize].background = true;
            if self.durable.is_some() {
                return self.store_add(conn, key, 0);
            }
        }
        let job = &self.jobs[key as usize];
        // A job waiting for its first commit may yet be refused; a background submission
        // waits for the commit of the job's record in any case.
        if let Stored::Adding { odd } = job.stored {
            if job.state == JobState::Pending || background {
                let batch = self.batch_carrying(odd);
                return self.hold_ack(conn, seq, batch, background);
            }
        }
        let handle = self.handle(seq);
        self.send(conn, T::JobCreated, &[&handle]);
    }

    pub(super) fn attach(&mut self, conn: ConnId, key: JobKey) {
        let job = &mut self.jobs[key as usize];
        if !job.clients().contains(&conn) {
            job.extra_mut().clients.push(conn);
            self.conns[conn as usize].waiting.insert(key);
        }
    }

    /// A client stopped waiting for `key`. A queued job nobody waits for is dropped, unless
    /// a background submission is attached to it.
    pub(super) fn detach_client(&mut self, key: JobKey, conn: ConnId) {
        let job = &mut self.jobs[key as usize];
        if let Some(extra) = job.extra.as_mut() {
            extra.clients.retain(|&c| c != conn);
        }
        if job.clients().is_empty() && !job.background && job.state == JobState::Queued {
            self.drop_queued(key, "every waiting client disconnected");
        }
    }
}
