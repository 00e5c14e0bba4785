//! Read-only views of the broker's state for the HTTP API and metrics, copied out under the
//! lock so that rendering happens without it.

use serde::Serialize;

use super::job::JobState;
use super::{Broker, FunctionCounts, Histogram, JobKey, Totals};

#[derive(Clone, Debug, Serialize)]
pub struct FunctionView {
    pub name: String,
    /// Waiting for a worker, every priority, plus jobs scheduled for later.
    pub queued: u32,
    pub queued_high: u32,
    pub queued_normal: u32,
    pub queued_low: u32,
    pub scheduled: u32,
    pub running: u32,
    pub workers: u32,
    /// Counts since the server started; `submitted + restored` equals `queued + running +
    /// completed + failed + cancelled + handed_over` (jobs waiting for the store's commit
    /// aside).
    pub submitted: u64,
    pub restored: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Left for other nodes of a cluster.
    pub handed_over: u64,
    /// Failed attempts given another, and jobs that went to the dead set (counted as failed).
    pub retried: u64,
    pub dead: u64,
    /// Workers get none of its jobs until it is resumed.
    pub paused: bool,
    /// At most this many of its jobs run at once; 0 for no limit.
    pub limit: u32,
    /// Its retry policy, if any (its own or `*`'s).
    pub retry: Option<super::RetryPolicy>,
    #[serde(skip)]
    pub counts: FunctionCounts,
}

#[derive(Clone, Debug, Serialize)]
pub struct WorkerView {
    pub fd: i32,
    pub ip: String,
    pub client_id: String,
    pub functions: Vec<String>,
    pub running: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct JobView {
    pub handle: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique: Option<String>,
    pub priority: &'static str,
    pub background: bool,
    /// queued, scheduled, running or pending (waiting for the store).
    pub state: &'static str,
    pub attempts: u16,
    pub numerator: u32,
    pub denominator: u32,
}

/// Why a job could not be cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelError {
    Unknown,
    Running,
}

impl Broker {
    pub fn functions_view(&self) -> Vec<FunctionView> {
        self.functions
            .iter()
            .filter(|f| !f.dropped)
            .map(|f| {
                let [high, normal, low] = f.queued;
                let totals = f.counts.totals();
                FunctionView {
                    name: String::from_utf8_lossy(&f.name).into_owned(),
                    queued: f.queued_total() + f.scheduled,
                    queued_high: high,
                    queued_normal: normal,
                    queued_low: low,
                    scheduled: f.scheduled,
                    running: f.running,
                    workers: f.workers,
                    submitted: totals.submitted,
                    restored: totals.restored,
                    completed: totals.completed,
                    failed: totals.failed,
                    cancelled: totals.cancelled,
                    handed_over: totals.handed_over,
                    retried: totals.retried,
                    dead: totals.buried,
                    paused: f.paused,
                    limit: f.limit,
                    retry: self.retry.get(&f.name),
                    counts: f.counts.clone(),
                }
            })
            .collect()
    }

    /// Connections that registered at least one function.
    pub fn workers_view(&self) -> Vec<WorkerView> {
        self.conns
            .iter()
            .filter(|(_, c)| !c.abilities.is_empty())
            .map(|(_, c)| WorkerView {
                fd: c.fd,
                ip: c.ip.to_string(),
                client_id: c.client_id.as_deref().map_or("-".into(), |id| String::from_utf8_lossy(id).into_owned()),
                functions: c
                    .abilities
                    .iter()
                    .map(|a| String::from_utf8_lossy(&self.functions[a.function as usize].name).into_owned())
                    .collect(),
                running: c.running.len(),
            })
            .collect()
    }

    /// Jobs since the server started, of every function (dropped ones too).
    pub fn totals(&self) -> Totals {
        let mut totals = self.dropped_totals;
        for f in self.functions.iter().filter(|f| !f.dropped) {
            totals += f.counts.totals();
        }
        totals
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Up to `limit` live jobs of `function`: running ones first, then queued ones in the
    /// order workers will get them, then scheduled ones. `None` if the function is unknown.
    pub fn jobs_view(&self, function: &str, limit: usize) -> Option<Vec<JobView>> {
        let &fid = self.function_ids.get(function.as_bytes())?;
        let f = &self.functions[fid as usize];
        let mut keys: Vec<JobKey> = Vec::new();
        for (_, c) in &self.conns {
            keys.extend(c.running.iter().map(|r| r.key).filter(|&k| self.jobs[k as usize].function == fid));
        }
        for queue in &f.queues {
            keys.extend(queue.iter().copied().filter(|&k| self.jobs[k as usize].state == JobState::Queued));
        }
        keys.truncate(limit);
        if keys.len() < limit && f.scheduled > 0 {
            // Scheduled jobs are in no queue: find them the slow way. (Jobs waiting for the
            // store are left out: they wait a few milliseconds at most.)
            let scheduled = self.jobs.iter().filter(|(_, j)| j.function == fid && j.state == JobState::Scheduled);
            keys.extend(scheduled.map(|(k, _)| k as JobKey).take(limit - keys.len()));
        }
        Some(keys.into_iter().map(|k| self.job_view_of(k)).collect())
    }

    /// A live job by handle.
    pub fn job_view(&self, handle: &str) -> Option<JobView> {
        self.find_by_handle(handle.as_bytes()).map(|k| self.job_view_of(k))
    }

    fn job_view_of(&self, key: JobKey) -> JobView {
        let job = &self.jobs[key as usize];
        let (numerator, denominator) = job.progress();
        JobView {
            handle: String::from_utf8_lossy(&self.handle(job.seq)).into_owned(),
            unique: (!job.unique().is_empty()).then(|| String::from_utf8_lossy(job.unique()).into_owned()),
            priority: gearbox_joblog::record::priority_name(job.priority),
            background: job.background,
            state: match job.state {
                JobState::Queued => "queued",
                JobState::Scheduled => "scheduled",
                JobState::Running(_) => "running",
                JobState::Pending => "pending",
                JobState::Dropped => "dropped",
            },
            attempts: job.attempts,
            numerator,
            denominator,
        }
    }

    /// Takes a queued or scheduled job out of the queue; its waiting clients get WORK_FAIL.
    pub fn cancel_job(&mut self, handle: &[u8]) -> Result<(), CancelError> {
        let key = self.find_by_handle(handle).ok_or(CancelError::Unknown)?;
        if matches!(self.jobs[key as usize].state, JobState::Running(_) | JobState::Pending) {
            return Err(CancelError::Running);
        }
        for &c in self.jobs[key as usize].clients() {
            self.send(c, gearbox_proto::PacketType::WorkFail, &[handle]);
        }
        self.drop_queued(key, "cancelled by an admin");
        Ok(())
    }

    /// Time the store took per commit.
    pub fn commit_times(&self) -> &Histogram {
        &self.commit_times
    }

    pub fn observe_commit(&mut self, took: std::time::Duration) {
        self.commit_times.observe_us(took.as_micros() as u64);
    }
}
