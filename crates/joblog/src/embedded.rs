//! The embedded sink: a SQLite file in the data directory, in WAL mode so that queries read
//! while the writer writes. Records are not synced one by one (the job log is a record of
//! what happened, not the queue): a batch is one transaction, synced at WAL checkpoints.

use std::path::{Path, PathBuf};

use rusqlite::{params_from_iter, Connection, OpenFlags, OptionalExtension};

use crate::record::{priority_name, Batch, Body, Query, Record, Status, Timestamp};
use crate::{Error, Millis, Search, SearchFuture, Sink};

pub const FILE_NAME: &str = "joblog.sqlite3";

/// Rows deleted per transaction when expiring, so readers and the writer are not held up.
const EXPIRE_CHUNK: usize = 10_000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    handle TEXT NOT NULL,
    function TEXT NOT NULL,
    uniq TEXT,
    priority TEXT NOT NULL,
    background INTEGER NOT NULL,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    submitted_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER NOT NULL,
    worker_id TEXT,
    client_id TEXT,
    payload_bytes INTEGER NOT NULL,
    result_bytes INTEGER,
    error TEXT,
    payload BLOB,
    result BLOB
);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at);
CREATE INDEX IF NOT EXISTS jobs_function ON jobs(function, finished_at);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, finished_at);
CREATE INDEX IF NOT EXISTS jobs_unique ON jobs(uniq) WHERE uniq IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_handle ON jobs(handle);
";

const INSERT: &str = "INSERT INTO jobs (handle, function, uniq, priority, background, status, attempt, \
    submitted_at, started_at, finished_at, worker_id, client_id, payload_bytes, result_bytes, error, payload, result) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)";

pub struct EmbeddedSink {
    conn: Connection,
}

pub struct EmbeddedSearch {
    path: PathBuf,
}

/// Opens (creating if needed) the job log at `path`.
pub fn open(path: &Path) -> Result<(EmbeddedSink, EmbeddedSearch), Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)?;
    Ok((EmbeddedSink { conn }, EmbeddedSearch { path: path.to_owned() }))
}

fn text(b: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(b)
}

impl Sink for EmbeddedSink {
    fn write(&mut self, batch: &Batch) -> Result<(), Error> {
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(INSERT)?;
            for r in batch.iter() {
                insert.execute(rusqlite::params![
                    text(r.handle),
                    text(r.function),
                    (!r.unique.is_empty()).then(|| text(r.unique)),
                    priority_name(r.priority),
                    r.background,
                    r.status.as_str(),
                    r.attempt,
                    r.submitted_at,
                    r.started_at,
                    r.finished_at,
                    r.worker_id.map(text),
                    r.client_id.map(text),
                    r.payload_bytes as i64,
                    r.result_bytes.map(|n| n as i64),
                    r.error.map(text),
                    r.payload,
                    r.result,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn expire(&mut self, before: Millis) -> Result<u64, Error> {
        let mut total = 0;
        loop {
            let n = self.conn.execute(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished_at < ?1 LIMIT ?2)",
                rusqlite::params![before, EXPIRE_CHUNK as i64],
            )?;
            total += n as u64;
            if n < EXPIRE_CHUNK {
                return Ok(total);
            }
        }
    }
}

impl Search for EmbeddedSearch {
    fn search(&self, query: Query) -> SearchFuture<'_> {
        let path = self.path.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || search(&path, &query))
                .await
                .map_err(|e| Error::Io(std::io::Error::other(e)))?
        })
    }
}

fn search(path: &Path, q: &Query) -> Result<Vec<Record>, Error> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mut sql = String::from(
        "SELECT handle, function, uniq, priority, background, status, attempt, submitted_at, started_at, \
         finished_at, worker_id, client_id, payload_bytes, result_bytes, error, payload, result FROM jobs WHERE 1=1",
    );
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    let mut filter = |clause: &str, value: rusqlite::types::Value| {
        sql.push_str(clause);
        args.push(value);
    };
    if let Some(f) = &q.function {
        filter(" AND function = ?", f.clone().into());
    }
    if let Some(s) = q.status {
        filter(" AND status = ?", s.as_str().to_owned().into());
    } else if q.failed {
        filter(" AND status != ?", Status::Complete.as_str().to_owned().into());
    }
    if let Some(t) = q.since {
        filter(" AND finished_at >= ?", t.into());
    }
    if let Some(u) = &q.unique {
        filter(" AND uniq = ?", u.clone().into());
    }
    if let Some(h) = &q.handle {
        filter(" AND handle = ?", h.clone().into());
    }
    sql.push_str(" ORDER BY finished_at DESC, id DESC LIMIT ?");
    args.push((q.limit.max(1) as i64).into());
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params_from_iter(args), |row| {
        let status: String = row.get(5)?;
        let submitted_at: Millis = row.get(7)?;
        let started_at: Option<Millis> = row.get(8)?;
        let finished_at: Millis = row.get(9)?;
        let body = |i: usize| -> rusqlite::Result<Option<Body>> {
            Ok(row.get::<_, Option<Vec<u8>>>(i)?.map(|b| Body::from_bytes(&b)))
        };
        Ok(Record {
            handle: row.get(0)?,
            function: row.get(1)?,
            unique: row.get(2)?,
            priority: row.get(3)?,
            background: row.get(4)?,
            status: status.parse().unwrap_or(Status::Fail),
            attempt: row.get(6)?,
            submitted_at: Timestamp(submitted_at),
            started_at: started_at.map(Timestamp),
            finished_at: Timestamp(finished_at),
            queue_ms: started_at.map(|s| (s - submitted_at).max(0) as u64),
            run_ms: started_at.map(|s| (finished_at - s).max(0) as u64),
            worker_id: row.get(10)?,
            client_id: row.get(11)?,
            payload_bytes: row.get::<_, i64>(12)? as u64,
            result_bytes: row.get::<_, Option<i64>>(13)?.map(|n| n as u64),
            error: row.get(14)?,
            payload: body(15)?,
            result: body(16)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Number of records in the file (for tests and `stats`).
pub fn count(path: &Path) -> Result<u64, Error> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(conn.query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get::<_, i64>(0)).optional()?.unwrap_or(0) as u64)
}
