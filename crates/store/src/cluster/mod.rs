//! Several servers on one MariaDB/MySQL or PostgreSQL queue table: a cluster.
//!
//! Each server start is a node *incarnation*: a row of `TABLE_nodes` with a lease that the
//! node renews (`lease_until`, in the database's clock). A queue row's `owner` is the
//! incarnation that alone may dispatch the job, or NULL: any node with a worker for the
//! function may claim it (`FOR UPDATE SKIP LOCKED`, in priority then submission order).
//!
//! - **Fencing.** Every transaction a node writes (a batch of adds and removals, a claim)
//!   first reads its own node row with a shared lock and requires an unexpired lease. A
//!   takeover deletes the dead node's row before it frees that node's jobs, so it waits for a
//!   write already past the check, and every later write of the dead incarnation fails: a
//!   late completion or status update never changes a row another node owns.
//! - **Takeover.** Any node that finds an expired lease deletes that node's row and sets its
//!   jobs unowned in one transaction (a job that was running has its attempt counted already,
//!   when it started). On PostgreSQL, `NOTIFY TABLE_jobs` tells the other nodes at once; on
//!   MariaDB they poll.
//! - **Coalescing.** A unique index on `(unique_key, function_name)` makes a background unique
//!   key one job across the cluster: a node whose insert conflicts answers with the existing
//!   job's handle.
//! - **Sequence numbers** (and so handles) are unique across the cluster: an incarnation
//!   numbers its jobs from [`first_seq`].
//!
//! A transaction left open by a paused node would hold its locks: cluster sessions set
//! `idle_in_transaction_session_timeout` (PostgreSQL) or `idle_transaction_timeout`
//! (MariaDB) to half the lease, so the database ends them.

mod db;
mod schema;
mod store;

pub use db::{Cancel, ClusterDb, Listener, NodeRow, RowStatus, StatusKey, Takeover};
pub(crate) use schema::CLUSTER_TAG;
pub use store::open_cluster_store;

/// Cluster sequence numbers have this bit set, above the single server's (boot-time
/// microseconds, below 2^53).
const SEQ_BASE: u64 = 1 << 62;
/// Jobs an incarnation can number: 2^40.
const SEQ_BITS: u32 = 40;

/// The first sequence number of `incarnation`'s jobs: they never collide with another
/// incarnation's, nor with a single server's.
pub fn first_seq(incarnation: u64) -> u64 {
    SEQ_BASE | ((incarnation & ((1 << (62 - SEQ_BITS)) - 1)) << SEQ_BITS)
}

/// The PostgreSQL channel the nodes of the cluster on `table` are told of claimable jobs on.
fn channel(table: &str) -> String {
    format!("{table}_jobs")
}
