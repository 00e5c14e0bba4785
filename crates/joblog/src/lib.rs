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

/// `--job-log-max-size` when not given: 1 GiB, about 7 million records of the 145 bytes
/// `gearbox bench` jobs take (a week at 12 jobs a second), so that a server left running on a
/// small disk does not fill it.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

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
    /// What the log takes on disk, when the sink knows it without asking anyone (the embedded
    /// sink counts its files); `None` otherwise (MongoDB). Called after every write and expiry,
    /// so it must be cheap.
    fn usage(&self) -> Option<Usage> {
        None
    }
}

/// A sink's size, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// What its files take now.
    pub bytes: u64,
    /// The limit it keeps to (`--job-log-max-size`); `None` for no limit.
    pub max_bytes: Option<u64>,
    /// Deleted since start because it was older than the retention...
    pub expired_by_age: u64,
    /// ...or to stay under `max_bytes`.
    pub expired_by_size: u64,
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

/// Parses a size limit: bytes (`1048576`), or a number with a decimal unit (`512MB`, `10GB`:
/// powers of 1,000) or a binary one (`1GiB`, or `1G` as dd and systemd read it: powers of
/// 1,024), fractions allowed (`1.5GB`), case ignored. `none` or `0` means no limit.
/// Errors say what was wrong and what is accepted.
pub fn parse_size(s: &str) -> Result<Option<u64>, String> {
    let bad = |why: &str| format!("bad size {s:?}: {why}; use bytes or e.g. 512MB, 10GB, 1GiB, or none");
    let t = s.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let (number, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len()));
    let unit_bytes: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        _ => return Err(bad("unknown unit")),
    };
    let bytes = if number.contains('.') {
        let n: f64 = number.parse().map_err(|_| bad("not a number"))?;
        let bytes = n * unit_bytes as f64;
        // `as` saturates; refuse rather than quietly cap.
        (bytes < u64::MAX as f64).then_some(bytes as u64)
    } else {
        number.parse::<u64>().map_err(|_| bad("not a number"))?.checked_mul(unit_bytes)
    };
    match bytes.ok_or_else(|| bad("too large"))? {
        0 => Ok(None),
        n => Ok(Some(n)),
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub spec: Spec,
    /// Where the embedded sink keeps its file.
    pub data_dir: PathBuf,
    /// Records older than this are deleted; `None` keeps them.
    pub retention: Option<Duration>,
    /// The embedded sink deletes its oldest files to stay within this many bytes; `None` for
    /// no limit. MongoDB ignores it.
    pub max_bytes: Option<u64>,
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
            let (sink, search) =
                embedded::open(&options.data_dir.join(embedded::DIR_NAME), options.retention, options.max_bytes)?;
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

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_decimal_and_binary_units_and_none() {
        for (text, bytes) in [
            ("1048576", Some(1 << 20)),
            ("512MB", Some(512_000_000)),
            ("10 GB", Some(10_000_000_000)),
            ("1GiB", Some(1 << 30)),
            ("1g", Some(1 << 30)),
            ("64KiB", Some(64 << 10)),
            ("1.5GB", Some(1_500_000_000)),
            ("2TiB", Some(2 << 40)),
            ("none", None),
            ("0", None),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in ["", "GB", "-1GB", "10XB", "1.2.3MB", "99999999999TB", "1e9"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")) && err.contains("512MB"), "{bad}: {err}");
        }
    }
}
