//! Giving memory back after a burst.
//!
//! A burst of a million jobs leaves behind a job slab, indices and queues sized for it, and
//! the allocator holding the pages of a million freed payloads. When the slab is mostly
//! empty, the jobs left are moved into one of their own size, every index and queue is
//! rebuilt to fit, and the allocator is asked to return its free pages to the system. That
//! costs in proportion to the jobs left (an eighth of the slab at most), and runs at most
//! once per eightfold shrink, from the timer's once-a-second sweep.

use std::cmp::Reverse;

use hashbrown::HashTable;
use slab::Slab;

use super::job::JobState;
use super::{Broker, JobKey};

/// A slab with fewer slots than this is left as it is...
const SHRINK_FROM: usize = if cfg!(test) { 4 } else { 1 << 16 };
/// ...or used more than one slot in this many. (Both small in tests, so that the model
/// test's sweeps rebuild often.)
const SPARSE: usize = if cfg!(test) { 2 } else { 8 };

impl Broker {
    /// Shrinks everything sized for a burst if the job slab is under an eighth full;
    /// returns whether it did.
    pub(super) fn shrink_after_burst(&mut self) -> bool {
        let capacity = self.jobs.capacity();
        if capacity < SHRINK_FROM || self.jobs.len() * SPARSE > capacity {
            return false;
        }
        let started = std::time::Instant::now();
        let old = std::mem::take(&mut self.jobs);
        // Old key -> new key (NONE for a free slot): 4 bytes a slot, for a moment.
        const NONE: JobKey = JobKey::MAX;
        let mut moved = vec![NONE; capacity];
        let mut jobs = Slab::with_capacity(old.len());
        for (key, job) in old {
            moved[key] = jobs.insert(job) as JobKey;
        }
        self.jobs = jobs;
        let new_key = |key: JobKey| moved.get(key as usize).copied().filter(|&k| k != NONE);

        // Dropped jobs wait in a queue or the schedule to be freed; they are in no index.
        self.by_seq = HashTable::new();
        self.by_unique = HashTable::new();
        let indexed: Vec<JobKey> =
            self.jobs.iter().filter(|(_, j)| j.state != JobState::Dropped).map(|(k, _)| k as JobKey).collect();
        for key in indexed {
            self.index(key);
        }
        for f in &mut self.functions {
            for queue in &mut f.queues {
                *queue = queue.iter().filter_map(|&k| new_key(k)).collect();
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
        drop(moved);
        release_free_memory();
        tracing::debug!(
            "{} jobs left after a burst of {capacity}: shrunk in {:.1?}",
            self.jobs.len(),
            started.elapsed()
        );
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
