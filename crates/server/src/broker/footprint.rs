//! Giving memory back after a burst.
//!
//! A burst of a million jobs leaves behind a job slab, indices and queues sized for it, and
//! the allocator holding the pages of a million freed payloads. When the slab is mostly
//! empty, the jobs left are moved into one of their own size, every index and queue is
//! rebuilt to fit, and what was sized for the burst is freed and the allocator asked to
//! return its free pages to the system, on a thread of its own. Under the lock that costs
//! in proportion to the jobs left (an eighth of the slab, and 2^17 jobs, at most) plus a
//! scan of the index's control bytes; it runs at most once per eightfold shrink, from the
//! timer's once-a-second sweep (measured: 93 ms for 16k jobs left of a 10M-job burst).

use std::cmp::Reverse;
use std::collections::HashMap;

use slab::Slab;

use super::job::JobState;
use super::{Broker, JobKey};

/// A slab with fewer slots than this is left as it is...
const SHRINK_FROM: usize = if cfg!(test) { 4 } else { 1 << 16 };
/// ...or used more than one slot in this many. (Both small in tests, so that the model
/// test's sweeps rebuild often.)
const SPARSE: usize = if cfg!(test) { 2 } else { 8 };
/// ...or holding more jobs than this: the rebuild holds the broker's lock, so this bounds
/// the pause (measured: 0.1 s for 216k jobs left of 4M slots). A burst of ten million waits
/// until its drain is this far along.
const MAX_LEFT: usize = 1 << 17;

impl Broker {
    /// Shrinks everything sized for a burst if the job slab is under an eighth full;
    /// returns whether it did.
    pub(super) fn shrink_after_burst(&mut self) -> bool {
        let capacity = self.jobs.capacity();
        if capacity < SHRINK_FROM || self.jobs.len() * SPARSE > capacity || self.jobs.len() > MAX_LEFT {
            return false;
        }
        let started = std::time::Instant::now();
        // The jobs left are found through what refers to them (the index of live jobs; the
        // queues and the schedule, which also hold dropped ones), not by walking every slot.
        let mut old = std::mem::take(&mut self.jobs);
        let mut moved: HashMap<JobKey, JobKey> = HashMap::with_capacity(old.len());
        let mut jobs = Slab::with_capacity(old.len());
        let referenced =
            self.by_seq.iter().copied().chain(self.functions.iter().flat_map(|f| f.queues.iter().flatten().copied()));
        for key in referenced.chain(self.scheduled.iter().map(|Reverse((_, _, k))| *k)) {
            if let std::collections::hash_map::Entry::Vacant(slot) = moved.entry(key) {
                if let Some(job) = old.try_remove(key as usize) {
                    slot.insert(jobs.insert(job) as JobKey);
                }
            }
        }
        debug_assert!(old.is_empty(), "{} jobs that nothing refers to", old.len());
        self.jobs = jobs;
        let new_key = |key: JobKey| moved.get(&key).copied();

        // Dropped jobs wait in a queue or the schedule to be freed; they are in no index.
        let old_indices = (std::mem::take(&mut self.by_seq), std::mem::take(&mut self.by_unique));
        let indexed: Vec<JobKey> =
            self.jobs.iter().filter(|(_, j)| j.state != JobState::Dropped).map(|(k, _)| k as JobKey).collect();
        for key in indexed {
            self.index(key);
        }
        let mut old_queues = Vec::new();
        for f in &mut self.functions {
            for queue in &mut f.queues {
                let new = queue.iter().filter_map(|&k| new_key(k)).collect();
                old_queues.push(std::mem::replace(queue, new));
            }
            f.fetched = [0; 3];
            f.sleepers.shrink_to_fit();
        }
        // Entries for slots no longer in use are stale (their checks would skip them).
        let scheduled = std::mem::take(&mut self.scheduled);
        self.scheduled =
            scheduled.into_iter().filter_map(|Reverse((at, seq, k))| Some(Reverse((at, seq, new_key(k)?)))).collect();
        let timeouts = std::mem::take(&mut self.timeouts);
        self.timeouts = timeouts
            .into_iter()
            .filter_map(|Reverse((at, seq, n, k))| Some(Reverse((at, seq, n, new_key(k)?))))
            .collect();
        for (_, conn) in self.conns.iter_mut() {
            for running in &mut conn.running {
                running.key = new_key(running.key).expect("a running job is in the slab");
            }
            conn.waiting = conn.waiting.iter().filter_map(|&k| new_key(k)).collect();
        }
        // What was sized for the burst is freed, and memory handed back, off the lock.
        let garbage = (old, old_indices, old_queues);
        let freeing = std::thread::Builder::new().name("gearbox-free".into()).spawn(move || {
            drop(garbage);
            release_free_memory();
        });
        // Without a thread to spare, the garbage went with the closure, here.
        if freeing.is_err() {
            release_free_memory();
        }
        let (left, took) = (self.jobs.len(), started.elapsed());
        tracing::info!("{left} jobs left of a burst of up to {capacity}: tables rebuilt in {took:.1?}");
        true
    }
}

/// Asks the allocator to return free pages to the system (glibc keeps them otherwise).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
