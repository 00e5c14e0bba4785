//! Counters kept for metrics: jobs per function by priority and outcome, and histograms of
//! queue wait, run time and store commit time.

/// Upper bounds of the histogram buckets, in microseconds (the last bucket is unbounded).
pub const BUCKET_BOUNDS_US: [u64; 19] = [
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
];

/// A fixed-bucket histogram of durations.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last counts those above every bound.
    pub buckets: [u64; BUCKET_BOUNDS_US.len() + 1],
    pub sum_us: u64,
    pub count: u64,
}

impl Histogram {
    pub fn observe_us(&mut self, us: u64) {
        let i = BUCKET_BOUNDS_US.partition_point(|&bound| bound < us);
        self.buckets[i] += 1;
        self.sum_us += us;
        self.count += 1;
    }

    /// Job times are kept in milliseconds; a negative span (the clock stepped back) counts as 0.
    pub fn observe_ms(&mut self, ms: i64) {
        self.observe_us(ms.max(0) as u64 * 1000);
    }
}

/// Counters since the server started, indexed by priority (high, normal, low). Jobs in
/// the queue or running, plus those completed, failed, cancelled and handed over, add up to
/// those submitted and restored.
#[derive(Clone, Debug, Default)]
pub struct FunctionCounts {
    /// New jobs, counted when acknowledged (a submission coalesced into an existing job by
    /// its unique key is not one).
    pub submitted: [u64; 3],
    /// Jobs loaded from the durable queue at start, or claimed from a cluster.
    pub restored: [u64; 3],
    pub completed: [u64; 3],
    /// WORK_FAIL, WORK_EXCEPTION, or given up after `-j` attempts.
    pub failed: [u64; 3],
    /// Taken out of the queue by an admin, or left by every client that waited for them.
    pub cancelled: [u64; 3],
    /// A cluster node's jobs left for other nodes: written unowned, handed back when the last
    /// worker left, or forgotten when the node lost its lease.
    pub handed_over: [u64; 3],
    /// Failed attempts of background jobs that were given another (not counted as failed).
    pub retried: u64,
    /// Background jobs that failed their last attempt and went to the dead set (also failed).
    pub buried: u64,
    pub queue_wait: Histogram,
    pub run_time: Histogram,
}

impl FunctionCounts {
    /// The counts of every priority together.
    pub fn totals(&self) -> Totals {
        let sum = |by_priority: &[u64; 3]| by_priority.iter().sum();
        Totals {
            submitted: sum(&self.submitted),
            restored: sum(&self.restored),
            completed: sum(&self.completed),
            failed: sum(&self.failed),
            cancelled: sum(&self.cancelled),
            handed_over: sum(&self.handed_over),
            retried: self.retried,
            buried: self.buried,
        }
    }
}

/// Jobs since the server started, as in [`FunctionCounts`], over every priority (and, for the
/// server's totals, every function).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub submitted: u64,
    pub restored: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub handed_over: u64,
    pub retried: u64,
    pub buried: u64,
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, other: Totals) {
        self.submitted += other.submitted;
        self.restored += other.restored;
        self.completed += other.completed;
        self.failed += other.failed;
        self.cancelled += other.cancelled;
        self.handed_over += other.handed_over;
        self.retried += other.retried;
        self.buried += other.buried;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let mut h = Histogram::default();
        h.observe_us(0);
        h.observe_us(100);
        h.observe_us(101);
        h.observe_ms(-5);
        h.observe_ms(1);
        h.observe_us(300_000_001);
        assert_eq!(h.buckets[0], 3); // 0, 100 and the negative span
        assert_eq!(h.buckets[1], 1);
        assert_eq!(h.buckets[3], 1);
        assert_eq!(h.buckets[BUCKET_BOUNDS_US.len()], 1);
        assert_eq!(h.count, 6);
        assert_eq!(h.sum_us, 100 + 101 + 1_000 + 300_000_001);
    }
}
