//! A job's second chances and a function's brakes: retries with backoff after a failed
//! attempt, the dead set after the last one, pausing a function, and a limit on how many of
//! its jobs run at once.
//!
//! A background job that ends in WORK_FAIL or WORK_EXCEPTION, or runs out of `-j` attempts,
//! is kept when its function's [`RetryPolicy`] allows another attempt: it keeps its handle
//! and unique key, and waits (GET_STATUS: known, not running) until its backoff has passed.
//! On a durable store its record is rewritten first with the time of the next attempt and
//! the attempts so far (the job is pending meanwhile, as a new one is), so a restart keeps
//! both. After the last attempt the job goes to the dead set (see `gearbox_store::lifecycle`),
//! written by the store thread before the removal of its record, so a crash in between
//! leaves it in both places, never in neither. Foreground jobs are never retried: their
//! client gets the failure, as with gearmand.

use std::time::Duration;

use bytes::Bytes;
use gearbox_joblog::now_millis;
use gearbox_store::lifecycle::DeadJob;
use gearbox_store::Loc;

use super::job::{JobState, Stored};
use super::{Broker, FunctionId, JobKey};

/// How the wait before the next attempt grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    /// `base × 2^(attempt − 1)`, ±10% jitter, at most `max_delay`.
    Exponential,
    /// `base` every time.
    Fixed,
}

/// Retries of a function's failed background jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RetryPolicy {
    /// Attempts after the first: a job runs at most `retries + 1` times.
    pub retries: u32,
    pub backoff: Backoff,
    /// The first wait.
    #[serde(serialize_with = "millis")]
    pub base: Duration,
    /// The longest wait.
    #[serde(serialize_with = "millis")]
    pub max_delay: Duration,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// Defaults of a [`RetryPolicy`].
pub mod defaults {
    use std::time::Duration;
    /// The wait before the first retry when a policy names none (Sidekiq's floor).
    pub const BASE: Duration = Duration::from_secs(15);
    /// The longest wait when a policy names none.
    pub const MAX_DELAY: Duration = Duration::from_secs(24 * 3600);
    /// The longest wait any policy can ask for (longer ones are cut to it).
    pub const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);
}

impl RetryPolicy {
    /// `RETRIES[/BASE]`, as `--retry FUNCTION=` takes it: `5`, `5/2s`, `3/100ms`.
    pub fn parse(spec: &str) -> Result<RetryPolicy, String> {
        let (retries, base) = match spec.split_once('/') {
            Some((r, b)) => (r, Some(b)),
            None => (spec, None),
        };
        let retries = retries.trim().parse().map_err(|_| format!("{spec:?}: the retries must be a number"))?;
        let base = match base {
            Some(b) => humantime::parse_duration(b.trim()).map_err(|e| format!("{spec:?}: {e}"))?,
            None => defaults::BASE,
        };
        Ok(RetryPolicy { retries, backoff: Backoff::Exponential, base, max_delay: defaults::MAX_DELAY.max(base) })
    }

    /// The wait after the `attempt`-th attempt failed (1 for the first); never more than
    /// [`defaults::LONGEST`].
    pub fn delay(&self, attempt: u32) -> Duration {
        let max = self.max_delay.min(defaults::LONGEST);
        match self.backoff {
            Backoff::Fixed => self.base.min(defaults::LONGEST),
            Backoff::Exponential => {
                let doubled = self.base.saturating_mul(1u32 << attempt.saturating_sub(1).min(30));
                let capped = doubled.min(max).as_secs_f64();
                Duration::from_secs_f64((capped * (0.9 + 0.2 * fastrand::f64())).min(max.as_secs_f64()))
            }
        }
    }
}

/// Retry policies by function name, `*` for every other function.
#[derive(Clone, Debug, Default)]
pub struct RetryPolicies {
    pub by_function: hashbrown::HashMap<Bytes, RetryPolicy>,
    pub default: Option<RetryPolicy>,
}

impl RetryPolicies {
    pub fn get(&self, function: &[u8]) -> Option<RetryPolicy> {
        self.by_function.get(function).copied().or(self.default)
    }

    /// Sets (`Some`) or removes the policy of `function` (`*`: the default).
    pub fn set(&mut self, function: &[u8], policy: Option<RetryPolicy>) {
        match (function, policy) {
            (b"*", policy) => self.default = policy,
            (f, Some(p)) => {
                self.by_function.insert(Bytes::copy_from_slice(f), p);
            }
            (f, None) => {
                self.by_function.remove(f);
            }
        }
    }
}

/// A dead job waiting to be written, and where to read its payload back from if the job
/// did not hold it in memory.
pub struct Burial {
    /// The job's sequence number: its record's removal waits for this entry's write.
    pub seq: u64,
    pub job: DeadJob,
    pub read_back: Option<(u64, Loc, u32)>,
}

impl Broker {
    /// Whether workers may be given `fid`'s jobs now: not paused, under its limit.
    pub(super) fn dispatchable(&self, fid: FunctionId) -> bool {
        let f = &self.functions[fid as usize];
        !f.paused && (f.limit == 0 || f.running < f.limit)
    }

    /// After an attempt of `key` failed (its worker reported it, or `-j` ran out; counted as
    /// failed): true if the job is kept for another attempt (then counted as retried
    /// instead); otherwise it goes to the dead set (a background job, when the dead set is
    /// on) and the caller ends it.
    pub(super) fn retry_or_bury(&mut self, key: JobKey, error: Option<&[u8]>) -> bool {
        let job = &self.jobs[key as usize];
        if !job.background {
            return false;
        }
        let name = &self.functions[job.function as usize].name;
        let attempts = u32::from(job.attempts).max(1);
        match self.retry.get(name) {
            Some(policy) if attempts <= policy.retries => {
                let due = now_millis() + policy.delay(attempts).as_millis() as i64;
                let counts = &mut self.functions[job.function as usize].counts;
                counts.failed[job.priority as usize] -= 1;
                counts.retried += 1;
                // Foreground clients that joined it have had their WORK_FAIL: the job is done
                // for them.
                let clients = self.jobs[key as usize].extra.as_mut().map(|e| std::mem::take(&mut e.clients));
                for c in clients.unwrap_or_default() {
                    if let Some(conn) = self.conns.get_mut(c as usize) {
                        conn.waiting.remove(&key);
                    }
                }
                self.schedule_retry(key, due);
                true
            }
            _ => {
                self.bury(key, error);
                false
            }
        }
    }

    /// Keeps `key` for another attempt at `due` (Unix milliseconds).
    fn schedule_retry(&mut self, key: JobKey, due: i64) {
        let job = &self.jobs[key as usize];
        let fid = job.function;
        // A job whose record is not written yet (made background while it ran) is retried in
        // memory only: its record, once written, runs it again at once after a restart.
        if job.stored != Stored::Yes || self.durable.is_none() {
            return self.schedule_ms(key, due);
        }
        let run_at = due.div_euclid(1000) + i64::from(due.rem_euclid(1000) > 0);
        let in_ram = job.in_ram;
        let (seq, loc, priority, attempts, len) =
            (job.seq, job.loc, job.priority as u8, u32::from(job.attempts).max(1), job.payload_len);
        let name = self.functions[fid as usize].name.clone();
        let d = self.durable.as_mut().expect("checked above");
        let job = &mut self.jobs[key as usize];
        job.stored = Stored::Adding { odd: d.batch_number() % 2 == 1 };
        job.state = JobState::Pending;
        self.functions[fid as usize].pending += 1;
        let data = in_ram.then(|| job.data());
        // In a cluster the node keeps the job: a takeover frees it with its time.
        d.pending_soon().push_retry(seq, loc, priority, run_at, attempts, (&name, job.unique()), data, len, true);
        self.retry_due.insert(seq, due);
    }

    /// Queues `key`'s dead-set entry: written before the removal of its record.
    pub(super) fn bury(&mut self, key: JobKey, error: Option<&[u8]>) {
        if !self.keep_dead {
            return;
        }
        let job = &self.jobs[key as usize];
        let read_back = (!job.in_ram).then_some((job.seq, job.loc, job.payload_len));
        let entry = DeadJob {
            handle: String::from_utf8_lossy(&self.handle(job.seq)).into_owned(),
            function: self.functions[job.function as usize].name.to_vec(),
            unique: job.unique().to_vec(),
            data: if job.in_ram { job.data().to_vec() } else { Vec::new() },
            priority: job.priority as u8,
            attempts: u32::from(job.attempts),
            error: error.map(|e| String::from_utf8_lossy(e).into_owned()).unwrap_or_default(),
            died_at: now_millis(),
        };
        self.functions[job.function as usize].counts.buried += 1;
        self.burials.push(Burial { seq: job.seq, job: entry, read_back });
        if let Some(d) = self.durable.as_ref() {
            d.wake.notify_one();
        }
    }

    /// Dead jobs to write (the store thread takes them with the batch they must precede;
    /// without a durable store, the server's lifecycle task).
    pub fn take_burials(&mut self, out: &mut Vec<Burial>) {
        out.append(&mut self.burials);
    }

    /// Dead jobs whose write failed: tried again with the next batch.
    pub fn unwritten_burials(&mut self, mut burials: Vec<Burial>) {
        burials.append(&mut self.burials);
        self.burials = burials;
    }

    /// Whether the job `handle` names is here (queued, scheduled, running or pending).
    pub fn holds(&self, handle: &[u8]) -> bool {
        self.find_by_handle(handle).is_some()
    }

    pub fn has_burials(&self) -> bool {
        !self.burials.is_empty()
    }

    /// Turns the dead set off (`--dead none`): jobs that fail their last attempt are dropped,
    /// as with gearmand.
    pub fn set_keep_dead(&mut self, keep: bool) {
        self.keep_dead = keep;
    }

    pub fn retry_policies(&self) -> &RetryPolicies {
        &self.retry
    }

    pub fn set_retry_policy(&mut self, function: &[u8], policy: Option<RetryPolicy>) {
        self.retry.set(function, policy);
    }

    /// Pauses or resumes `function` (created if unknown): a paused function accepts jobs,
    /// and its workers get NO_JOB for it.
    pub fn set_paused(&mut self, function: &[u8], paused: bool) {
        self.pause_changes += 1;
        self.apply_paused(function, paused);
    }

    fn apply_paused(&mut self, function: &[u8], paused: bool) {
        let fid = self.function_id(function);
        self.functions[fid as usize].paused = paused;
        self.wake_dispatchable(fid);
    }

    /// How many times [`Broker::set_paused`] was called: see [`Broker::sync_paused`].
    pub fn pause_changes(&self) -> u64 {
        self.pause_changes
    }

    /// Makes exactly `paused` the paused functions (a cluster's shared state, read when
    /// [`Broker::pause_changes`] said `changes`): unless a pause or resume here came since,
    /// which the list may not show yet.
    pub fn sync_paused(&mut self, paused: &[Vec<u8>], changes: u64) {
        if changes != self.pause_changes {
            return;
        }
        let now: hashbrown::HashSet<&[u8]> = paused.iter().map(Vec::as_slice).collect();
        let changed: Vec<Bytes> = self
            .functions
            .iter()
            .filter(|f| !f.dropped && f.paused != now.contains(&f.name[..]))
            .map(|f| f.name.clone())
            .collect();
        for name in changed {
            let paused = now.contains(&name[..]);
            self.apply_paused(&name, paused);
        }
        for name in paused {
            if !self.function_ids.contains_key(&name[..]) {
                self.apply_paused(name, true);
            }
        }
    }

    /// At most `limit` of `function`'s jobs running at once on this server; 0 for no limit.
    pub fn set_limit(&mut self, function: &[u8], limit: u32) {
        let fid = self.function_id(function);
        self.functions[fid as usize].limit = limit;
        self.wake_dispatchable(fid);
    }

    /// Functions paused, and limits, by name.
    pub fn brakes(&self) -> Vec<(Bytes, bool, u32)> {
        let set = self.functions.iter().filter(|f| !f.dropped && (f.paused || f.limit > 0));
        set.map(|f| (f.name.clone(), f.paused, f.limit)).collect()
    }

    /// Wakes as many sleeping workers as `fid` can now take jobs.
    pub(super) fn wake_dispatchable(&mut self, fid: FunctionId) {
        let f = &self.functions[fid as usize];
        let mut room = f.queued_total().min(if f.limit == 0 { u32::MAX } else { f.limit.saturating_sub(f.running) });
        while room > 0 && self.dispatchable(fid) && !self.functions[fid as usize].sleepers.is_empty() {
            self.wake_one(fid);
            room -= 1;
        }
    }

    /// A job of a limited function stopped running: one more may start.
    pub(super) fn slot_freed(&mut self, fid: FunctionId) {
        let f = &self.functions[fid as usize];
        if f.limit > 0 && !f.paused && f.queued_total() > 0 {
            self.wake_one(fid);
        }
    }
}
