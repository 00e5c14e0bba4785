//! The durable state of the job lifecycle: the **dead-job set** (background jobs that failed
//! their last attempt, kept for inspection and retry), the **paused functions**, and the
//! **fired ticks** of periodic schedules.
//!
//! [`open_lifecycle`] keeps it in an SQLite database (in memory, or a file of its own) or in
//! two tables beside a MariaDB/MySQL or PostgreSQL queue table, shared by every server on that
//! URL (the nodes of a cluster): `{table}_dead`, a row per dead job, and `{table}_state`, a row
//! per paused function and per schedule that fired.
//!
//! The methods block: each [`Lifecycle`] drives a single-threaded tokio runtime of its own,
//! behind a mutex, so the server calls it from its store thread or from
//! `tokio::task::spawn_blocking`, never from an async task directly (dropping the last handle
//! anywhere is fine). Against MariaDB and PostgreSQL an operation that loses its connection
//! (or a deadlock) retries, connecting again, with backoff for up to ten seconds before it
//! fails with [`StoreError::Database`]; every operation is safe to repeat (see
//! [`Lifecycle::claim_tick`] for the one that needs care).
//!
//! - `conn`: the connections to the three databases and the retry loop;
//! - `schema`: the tables, created by the first server;
//! - `dead`: the dead-job set's statements;
//! - `state`: paused functions and schedule ticks.

mod conn;
mod dead;
mod schema;
mod state;

use std::path::PathBuf;
use std::sync::Arc;

use crate::{Result, StoreError};

pub use conn::MAX_TABLE;

/// The longest error text kept with a dead job, in bytes (the size of a MariaDB `TEXT`):
/// longer texts are cut at a character boundary.
pub const MAX_ERROR_BYTES: usize = 65_535;

/// A background job that failed its last attempt.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeadJob {
    /// The job's handle, e.g. `H:host:N`: the key of the dead set (at most 100 characters;
    /// MariaDB/MySQL compare handles regardless of case, the others bytewise).
    pub handle: String,
    /// At most 512 bytes on MariaDB/MySQL.
    pub function: Vec<u8>,
    pub unique: Vec<u8>,
    /// The payload.
    pub data: Vec<u8>,
    /// 0 high, 1 normal, 2 low.
    pub priority: u8,
    /// Attempts made, the last one included.
    pub attempts: u32,
    /// The last attempt's error text (`""` if none). Stored with NUL characters replaced by
    /// U+FFFD (PostgreSQL text cannot hold them) and cut to [`MAX_ERROR_BYTES`].
    pub error: String,
    /// When the job died: unix time in milliseconds.
    pub died_at: i64,
}

/// A dead job without its payload (what lists show).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeadEntry {
    pub handle: String,
    pub function: Vec<u8>,
    pub unique: Vec<u8>,
    /// The payload's size in bytes.
    pub data_len: u64,
    /// 0 high, 1 normal, 2 low.
    pub priority: u8,
    pub attempts: u32,
    pub error: String,
    /// Unix time in milliseconds.
    pub died_at: i64,
}

/// Which dead jobs [`Lifecycle::dead_list`] shows.
#[derive(Clone, Debug, Default)]
pub struct DeadFilter {
    /// Only the jobs of this function.
    pub function: Option<Vec<u8>>,
    /// At most this many entries; 0 = no limit.
    pub limit: usize,
    /// Skips this many entries first.
    pub offset: usize,
}

/// Where the state is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LifecycleTarget {
    /// An in-memory SQLite database, lost at exit.
    Memory,
    /// An SQLite file (its directory is created if needed).
    File(PathBuf),
    /// A `mysql://`, `mariadb://`, `postgres://` or `postgresql://` URL, with an optional
    /// `table=NAME` parameter (default `gearbox_queue`): the tables are `NAME_dead` and
    /// `NAME_state`.
    Url(String),
}

/// The job lifecycle's durable state. Every method blocks (see the module documentation) and
/// fails with [`StoreError::Database`] when the database refuses the statement, or stays
/// unreachable for ten seconds.
pub trait Lifecycle: Send + Sync {
    /// Where the state is kept, for logs (a URL without its password).
    fn describe(&self) -> String;

    /// Adds jobs to the dead set in one transaction, replacing an entry with the same handle
    /// (of two jobs with one handle in `jobs`, the later wins). Durable when it returns `Ok`
    /// (except in [`LifecycleTarget::Memory`]). Errors: a handle longer than 100 characters,
    /// a function name longer than 512 bytes on MariaDB/MySQL, a job larger than the
    /// database accepts in one statement (MariaDB's `max_allowed_packet`); then no job of
    /// `jobs` was added.
    fn bury(&self, jobs: &[DeadJob]) -> Result<()>;

    /// Dead jobs without their payloads, newest first (`died_at` descending, then handle
    /// ascending), of the filter's function if it names one, `offset` entries skipped and at
    /// most `limit` shown.
    fn dead_list(&self, filter: &DeadFilter) -> Result<Vec<DeadEntry>>;

    /// The number of dead jobs per function, sorted by function (bytewise).
    fn dead_counts(&self) -> Result<Vec<(Vec<u8>, u64)>>;

    /// The dead job with this handle, payload included.
    fn dead_get(&self, handle: &str) -> Result<Option<DeadJob>>;

    /// Removes these handles from the dead set, in one transaction; returns how many
    /// existed. (If the connection was lost while the removal committed, the retry counts only
    /// what was still there.)
    fn dead_remove(&self, handles: &[String]) -> Result<u64>;

    /// Retention: removes the entries that died before `died_before` (unix milliseconds), if
    /// given, then the oldest beyond the newest `keep_at_most` (in [`Lifecycle::dead_list`]'s
    /// order), if given. Returns how many were removed. Served by the index on `died_at`: a
    /// call that removes nothing reads at most `keep_at_most` index entries.
    fn dead_expire(&self, died_before: Option<i64>, keep_at_most: Option<u64>) -> Result<u64>;

    /// The paused functions, sorted (bytewise).
    fn paused(&self) -> Result<Vec<Vec<u8>>>;

    /// Pauses or resumes a function; pausing a paused function (or resuming one that is not
    /// paused) changes nothing.
    fn set_paused(&self, function: &[u8], paused: bool) -> Result<()>;

    /// Records that schedule `name` fired its tick at `tick` (unix seconds) if no tick at or
    /// after `tick` was recorded before; returns whether this caller won the tick.
    ///
    /// Atomic across processes sharing the database: of N servers calling `claim_tick(name,
    /// t)` concurrently exactly one gets `true`, and a tick never fires twice, even long after
    /// (a compare-and-set on the recorded last tick). Each call records a token of its own
    /// with the tick it sets, so a retry after a lost connection tells whether the cut-off
    /// attempt had won: a win is never reported twice. (It reports `false` if, in those
    /// seconds, another server also recorded a later tick.)
    fn claim_tick(&self, name: &str, tick: i64) -> Result<bool>;

    /// The last tick recorded for `name` (unix seconds).
    fn last_tick(&self, name: &str) -> Result<Option<i64>>;
}

/// Opens (creating its tables if needed) the lifecycle state: [`LifecycleTarget::Memory`] = an
/// in-memory SQLite database, lost at exit; [`LifecycleTarget::File`] = an SQLite file in WAL
/// mode with `synchronous=FULL` (a commit survives a crash), which several handles (in this
/// process or others) may open at once; [`LifecycleTarget::Url`] = tables `{table}_dead` and
/// `{table}_state` beside the queue table the URL names (created by the first server; servers
/// starting together take turns), shared by every server on that URL.
///
/// Errors: [`StoreError::Io`] if the file's directory cannot be created;
/// [`StoreError::Database`] for a bad URL, a table name longer than [`MAX_TABLE`], an
/// unreachable database or file, or tables (a file) that exist and are not gearbox lifecycle
/// state of this schema version.
pub fn open_lifecycle(target: LifecycleTarget) -> Result<Arc<dyn Lifecycle>> {
    Ok(Arc::new(conn::SqlLifecycle::open(target)?))
}

impl Lifecycle for conn::SqlLifecycle {
    fn describe(&self) -> String {
        self.what().to_string()
    }

    fn bury(&self, jobs: &[DeadJob]) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        if let Some(job) = jobs.iter().find(|j| j.handle.chars().count() > dead::MAX_HANDLE_CHARS) {
            return Err(StoreError::Database(format!(
                "{}: handle {:?} is longer than {} characters",
                self.what(),
                job.handle,
                dead::MAX_HANDLE_CHARS
            )));
        }
        self.run(dead::Bury::new(jobs))
    }

    fn dead_list(&self, filter: &DeadFilter) -> Result<Vec<DeadEntry>> {
        self.run(dead::List(filter))
    }

    fn dead_counts(&self) -> Result<Vec<(Vec<u8>, u64)>> {
        self.run(dead::Counts)
    }

    fn dead_get(&self, handle: &str) -> Result<Option<DeadJob>> {
        self.run(dead::Get(handle))
    }

    fn dead_remove(&self, handles: &[String]) -> Result<u64> {
        if handles.is_empty() {
            return Ok(0);
        }
        self.run(dead::Remove(handles))
    }

    fn dead_expire(&self, died_before: Option<i64>, keep_at_most: Option<u64>) -> Result<u64> {
        if died_before.is_none() && keep_at_most.is_none() {
            return Ok(0);
        }
        self.run(dead::Expire { died_before, keep_at_most })
    }

    fn paused(&self) -> Result<Vec<Vec<u8>>> {
        self.run(state::Paused)
    }

    fn set_paused(&self, function: &[u8], paused: bool) -> Result<()> {
        self.run(state::SetPaused { function, paused })
    }

    fn claim_tick(&self, name: &str, tick: i64) -> Result<bool> {
        self.run(state::ClaimTick::new(name, tick))
    }

    fn last_tick(&self, name: &str) -> Result<Option<i64>> {
        self.run(state::LastTick(name))
    }
}
