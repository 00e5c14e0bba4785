//! The job log: one record per job attempt (how it ended, when, where, how long), written in
//! batches by a thread of its own so that logging never slows dispatch.
//!
//! - [`record`]: the record (borrowed in a [`Batch`], owned as [`Record`]) and [`Query`].
//! - [`writer`]: the broker's [`JobLog`] handle and the writer thread (retry, then drop
//!   with a counter).
//! - [`embedded`]: the default sink, append-only segment files in the data directory.
//! - [`mongo`]: the MongoDB sink (collection `jobs`, expiry by a TTL index).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub mod embedded;
pub mod mongo;
pub mod record;
pub mod writer;

pub use record::{now_millis, Batch, Body, Millis, Query, Record, RecordRef, Status, Timestamp};
pub use writer::{JobLog, LogStats, WriterThread};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("MongoDB job log: {0}")]
    Mongo(String),
    #[error("job log: {0}")]
    Io(#[from] std::io::Error),
}

/// Where finished jobs are written. Called on the writer thread only.
pub trait Sink: Send + 'static {
    /// Writes every record of `batch`.
    fn write(&mut self, batch: &Batch) -> Result<(), Error>;
    /// Deletes records that finished before `before` (or, for the embedded sink, the files
    /// holding only such records); returns how many, for the log. Sinks that expire records
    /// themselves (MongoDB's TTL index) do nothing.
    fn expire(&mut self, before: Millis) -> Result<u64, Error>;
}

pub type SearchFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<Record>, Error>> + Send + 'a>>;

/// Reads the log back, newest first. Called from connection tasks, concurrently with writes.
pub trait Search: Send + Sync + 'static {
    fn search(&self, query: Query) -> SearchFuture<'_>;
}

/// `--job-log`: `embedded`, `none`, or a `mongodb://` URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    None,
    Embedded,
    Mongo(String),
}

impl FromStr for Spec {
    type Err = String;
    fn from_str(s: &str) -> Result<Spec, String> {
        match s {
            "none" | "off" => Ok(Spec::None),
            "embedded" => Ok(Spec::Embedded),
            uri if uri.starts_with("mongodb://") => Ok(Spec::Mongo(uri.to_owned())),
            // SRV lookups need the driver's DNS resolver, which is left out of the build.
            uri if uri.starts_with("mongodb+srv://") => {
                Err("mongodb+srv:// is not supported; list the hosts: mongodb://HOST1:PORT,HOST2:PORT/DB".into())
            }
            other => Err(format!("unknown job log {other:?}; expected embedded, none or mongodb://HOST:PORT/DB")),
        }
    }
}

/// Parses a retention such as `7d`, `12h` or `0` (keep forever).
pub fn parse_retention(s: &str) -> Result<Option<Duration>, String> {
    if s == "0" || s == "forever" {
        return Ok(None);
    }
    humantime::parse_duration(s).map(Some).map_err(|e| format!("bad retention {s:?}: {e}"))
}

#[derive(Clone, Debug)]
pub struct Options {
    pub spec: Spec,
    /// Where the embedded sink keeps its file.
    pub data_dir: PathBuf,
    /// Records older than this are deleted; `None` keeps them.
    pub retention: Option<Duration>,
    /// Keep payloads and results, cut to this many bytes.
    pub bodies: Option<usize>,
}

/// A job log ready for use: the broker's handle, the search side, and the writer thread.
pub struct Opened {
    pub log: JobLog,
    pub search: Arc<dyn Search>,
    pub stats: Arc<LogStats>,
    pub writer: WriterThread,
}

/// Opens the configured sink and starts its writer thread; `None` for `--job-log none`.
/// The embedded sink fails here if its file cannot be opened. MongoDB being down is not
/// fatal: the writer retries, and drops records it cannot deliver.
pub async fn open(options: &Options) -> Result<Option<Opened>, Error> {
    let (sink, search): (Box<dyn Sink>, Arc<dyn Search>) = match &options.spec {
        Spec::None => return Ok(None),
        Spec::Embedded => {
            let (sink, search) = embedded::open(&options.data_dir.join(embedded::DIR_NAME), options.retention)?;
            (Box::new(sink), Arc::new(search))
        }
        Spec::Mongo(uri) => {
            let (sink, search) = mongo::open(uri, options.retention).await?;
            (Box::new(sink), Arc::new(search))
        }
    };
    let (log, stats, writer) = writer::start(sink, options.retention, options.bodies);
    Ok(Some(Opened { log, search, stats, writer }))
}
