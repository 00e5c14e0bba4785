//! Timers: jobs scheduled for an epoch time, CAN_DO_TIMEOUT deadlines, the wake-up sweep and
//! the job log's flush, all driven by [`Broker::tick`] from the server's timer task.

use std::cmp::Reverse;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gearbox_joblog::{now_millis, Status as Outcome};

use super::job::JobState;
use super::{Broker, FunctionId, JobKey};

/// How often queued functions with sleeping workers get a second wake-up, in case the
/// worker woken first went away without taking the job.
const WAKE_SWEEP: Duration = Duration::from_secs(1);

/// The wall clock, in Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Time from `now` to the unix time `at` (both in milliseconds), at most a day (the timer
/// looks again by then), so a far-future epoch cannot overflow an `Instant`.
pub(super) fn until(at: i64, now: i64) -> Duration {
    Duration::from_millis(at.saturating_sub(now).clamp(0, 86_400_000) as u64)
}

impl Broker {
    /// Holds a job until its epoch time (Unix seconds).
    pub(super) fn schedule(&mut self, key: JobKey, at: i64) {
        self.schedule_ms(key, at.saturating_mul(1000));
    }

    /// Holds a job until `at`, in Unix milliseconds.
    pub(super) fn schedule_ms(&mut self, key: JobKey, at: i64) {
        let job = &mut self.jobs[key as usize];
        job.state = JobState::Scheduled;
        self.functions[job.function as usize].scheduled += 1;
        self.scheduled.push(Reverse((at, job.seq, key)));
        self.arm_timer(Instant::now() + until(at, now_millis()));
    }

    pub(super) fn arm_timer(&mut self, deadline: Instant) {
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
        let wall = now_millis();
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
                    // A retry goes to the front: it was first in line once.
                    let retry = job.attempts > 0;
                    self.enqueue(key, retry);
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
                if self.functions[fid as usize].queued_total() > 0 && self.dispatchable(fid) {
                    self.wake_one(fid);
                }
            }
            self.shrink_after_burst();
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
