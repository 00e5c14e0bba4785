//! Durable queue stores. The server keeps its queue in memory and writes every change of a
//! background job through a [`QueueStore`], in batches ("group commit"), from one thread of
//! its own: a store never runs on the threads that dispatch jobs, so its methods block.
//!
//! - [`log`]: the embedded default, an append-only log of segment files with compaction.
//! - `sql`: MariaDB/MySQL and PostgreSQL tables (one server owns a table).
//! - [`cluster`]: several servers on one MariaDB/MySQL or PostgreSQL queue table.
//! - [`lifecycle`]: the job lifecycle's durable state beside the queue (dead jobs, paused
//!   functions, fired schedule ticks), in SQLite or the queue's database.
//!
//! The contract: after [`QueueStore::commit`] returns `Ok`, the batch survives a crash;
//! [`QueueStore::load`] then yields every job added and not removed, in the order added.

mod batch;
pub mod cluster;
pub mod lifecycle;
pub mod log;

pub use batch::{AddView, Batch, Mark, RetryView};

use std::sync::Arc;
use std::time::Duration;

/// Where a stored payload can be read back from, so the server need not keep it in memory.
/// Opaque to the server; [`Loc::NONE`] when the backend offers no such reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Loc(pub u64);

impl Loc {
    pub const NONE: Loc = Loc(0);
}

/// A job as a store yields it at load, borrowing the store's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedJob<'a> {
    /// The job's sequence number; its handle is derived from it.
    pub seq: u64,
    /// 0 high, 1 normal, 2 low.
    pub priority: u8,
    /// Unix time (seconds) before which the job must not run; 0 for "now".
    pub run_at: i64,
    pub function: &'a [u8],
    pub unique: &'a [u8],
    pub data: &'a [u8],
    /// Where the payload can be read back ([`Loc::NONE`] if it cannot).
    pub loc: Loc,
    /// Attempts the job has had (kept from its last retry; 0 for a job never retried).
    pub attempts: u32,
}

impl LoadedJob<'_> {
    pub fn to_owned(&self) -> StoredJob {
        StoredJob {
            seq: self.seq,
            priority: self.priority,
            run_at: self.run_at,
            function: self.function.to_vec(),
            unique: self.unique.to_vec(),
            data: self.data.to_vec(),
            loc: self.loc,
            attempts: self.attempts,
        }
    }
}

/// An owned [`LoadedJob`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredJob {
    /// The job's sequence number; its handle is derived from it.
    pub seq: u64,
    /// 0 high, 1 normal, 2 low.
    pub priority: u8,
    /// Unix time (seconds) before which the job must not run; 0 for "now".
    pub run_at: i64,
    pub function: Vec<u8>,
    pub unique: Vec<u8>,
    pub data: Vec<u8>,
    pub loc: Loc,
    /// Attempts the job has had (see [`LoadedJob::attempts`]).
    pub attempts: u32,
}

impl StoredJob {
    pub fn as_loaded(&self) -> LoadedJob<'_> {
        LoadedJob {
            seq: self.seq,
            priority: self.priority,
            run_at: self.run_at,
            function: &self.function,
            unique: &self.unique,
            data: &self.data,
            loc: self.loc,
            attempts: self.attempts,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// Another server (or session) holds the store's lock. `what` names the store (a data
    /// directory, or a database URL without password and its table); `holder` is who holds
    /// the lock, when the database shows it (e.g. `session pid 1234 from 10.0.0.5:51234`);
    /// `waited` is how long the store waited for the lock (zero: it did not wait).
    #[error("another gearbox server holds {what}{}{}", parenthesized(holder), waited_for(*waited))]
    Locked { what: String, holder: Option<String>, waited: Duration },
    #[error("corrupt queue store: {0}")]
    Corrupt(String),
    #[error("database: {0}")]
    Database(String),
}

fn parenthesized(holder: &Option<String>) -> String {
    holder.as_ref().map(|h| format!(" ({h})")).unwrap_or_default()
}

fn waited_for(waited: Duration) -> String {
    if waited.is_zero() {
        String::new()
    } else {
        format!("; waited {waited:?}")
    }
}

impl StoreError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> StoreError {
        StoreError::Io { context: context.into(), source }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Reads payloads back by location, from any thread.
pub trait PayloadReader: Send + Sync {
    fn read(&self, loc: Loc, len: u32) -> std::io::Result<Vec<u8>>;
}

/// A durable queue backend. All methods are called from the server's store thread.
pub trait QueueStore: Send {
    /// A short description for logs ("embedded log in /var/lib/gearbox", "postgres://…").
    fn describe(&self) -> String;

    /// Calls `each` once for every job added and not removed, in the order added.
    fn load(&mut self, each: &mut dyn FnMut(LoadedJob<'_>)) -> Result<()>;

    /// The highest sequence number the store holds a record of, queued or not, as of
    /// [`QueueStore::load`]: new jobs must number above it (0 if the store keeps no record of
    /// ended jobs).
    fn highest_seq(&self) -> u64 {
        0
    }

    /// Makes the batch durable: its adds, retries and removes. On success `locs` holds the
    /// location of each add, then of each retry's new record, in batch order. On failure nothing of the batch may reappear
    /// after a restart (a backend that cannot guarantee that must refuse further batches).
    fn commit(&mut self, batch: &Batch, locs: &mut Vec<Loc>) -> Result<()>;

    /// The adds of the last committed batch that the store did not keep because another job
    /// holds their unique key (a cluster's, see [`cluster`]): the add's sequence number and
    /// the other job's.
    fn coalesced(&self) -> &[(u64, u64)] {
        &[]
    }

    /// A reader for payloads by [`Loc`], from any thread, if the backend supports it.
    fn payload_reader(&self) -> Option<Arc<dyn PayloadReader>> {
        None
    }

    /// Whether [`QueueStore::read_payloads`] works, for a backend without a
    /// [`PayloadReader`] (a database, where a read is a round trip).
    fn reads_payloads(&self) -> bool {
        false
    }

    /// Calls `each(seq, payload)` for each of the `wanted` jobs (sequence number and
    /// location) the store holds, in one or a few round trips. Jobs it does not hold are
    /// left out.
    fn read_payloads(&mut self, _wanted: &[(u64, Loc)], _each: &mut dyn FnMut(u64, &[u8])) -> Result<()> {
        Ok(())
    }

    /// The next step of reclaiming space, if the backend wants one: the jobs it would move,
    /// by sequence number and the location of the record it holds. The server answers with
    /// those still queued at that location through [`QueueStore::compact`]. A step costs a
    /// bounded amount of work, whatever the depth of the queue.
    fn compaction_candidates(&mut self) -> Result<Option<Vec<(u64, Loc)>>> {
        Ok(None)
    }

    /// Rewrites the `live` jobs among the last candidates (a subsequence of them, in their
    /// order) and returns their new locations.
    fn compact(&mut self, _live: &[u64]) -> Result<Vec<(u64, Loc)>> {
        Ok(Vec::new())
    }
}

mod gearmand_import;
mod sql;
mod sql_conn;
mod sql_lock;
mod sql_plan;

pub use gearmand_import::{import_gearmand, GearmandJob};
pub use sql::{open_sql, DEFAULT_LOCK_WAIT};
pub use sql_lock::TableLock;
