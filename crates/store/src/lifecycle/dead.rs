//! The dead-job set's statements: a row per dead job in the `dead` table, keyed by handle.
//! Lists read the indexes in their order (see `schema`); the payload's size is a column of
//! its own, so that a list never reads payloads.

use std::borrow::Cow;
use std::collections::HashMap;

use super::conn::{Arg, Backend, DbConn, Dialect, Op};
use super::{DeadEntry, DeadFilter, DeadJob, MAX_ERROR_BYTES};

/// The longest handle, in characters (the column is a `VARCHAR(100)`).
pub(super) const MAX_HANDLE_CHARS: usize = 100;
/// Jobs per INSERT of a burial, and their payload bytes (a larger job goes alone).
const BURY_ROWS: usize = 100;
const BURY_BYTES: usize = 1 << 20;
/// Handles per DELETE.
const REMOVE_ROWS: usize = 500;

const COLUMNS: &str = "handle, function_name, unique_key, data, data_len, priority, attempts, error_text, died_at";
/// The columns an upsert replaces.
const REPLACED: [&str; 8] =
    ["function_name", "unique_key", "data", "data_len", "priority", "attempts", "error_text", "died_at"];

/// A list's row: the columns of [`DeadEntry`].
type EntryRow = (String, Vec<u8>, Vec<u8>, i64, i16, i64, String, i64);
/// A dead job's row: the columns of [`DeadJob`].
type JobRow = (String, Vec<u8>, Vec<u8>, Vec<u8>, i16, i64, String, i64);

/// The error text as stored: NUL characters replaced (PostgreSQL text cannot hold them), cut
/// to [`MAX_ERROR_BYTES`] at a character boundary.
fn stored_error(error: &str) -> Cow<'_, str> {
    let mut end = error.len().min(MAX_ERROR_BYTES);
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    let error = &error[..end];
    if error.contains('\0') {
        Cow::Owned(error.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(error)
    }
}

fn priority(p: i16) -> u8 {
    p.clamp(0, 2) as u8
}

fn attempts(a: i64) -> u32 {
    a.clamp(0, u32::MAX.into()) as u32
}

/// Adds (or replaces) dead jobs, in one transaction.
pub(super) struct Bury<'a> {
    /// The last job of each handle, in the order given.
    jobs: Vec<(&'a DeadJob, Cow<'a, str>)>,
}

impl<'a> Bury<'a> {
    pub(super) fn new(jobs: &'a [DeadJob]) -> Bury<'a> {
        // One statement may not name a row twice (PostgreSQL refuses): the later job wins.
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(jobs.len());
        for (i, job) in jobs.iter().enumerate() {
            last.insert(&job.handle, i);
        }
        let jobs = jobs
            .iter()
            .enumerate()
            .filter(|(i, job)| last[job.handle.as_str()] == *i)
            .map(|(_, job)| (job, stored_error(&job.error)))
            .collect();
        Bury { jobs }
    }

    /// The jobs in statements: at most [`BURY_ROWS`] and (unless alone) [`BURY_BYTES`] each.
    fn chunks(&self) -> Vec<std::ops::Range<usize>> {
        let mut chunks = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, (job, error)) in self.jobs.iter().enumerate() {
            let size = job.data.len() + job.function.len() + job.unique.len() + error.len() + 64;
            if i > start && (i - start == BURY_ROWS || bytes + size > BURY_BYTES) {
                chunks.push(start..i);
                (start, bytes) = (i, 0);
            }
            bytes += size;
        }
        if start < self.jobs.len() {
            chunks.push(start..self.jobs.len());
        }
        chunks
    }
}

fn upsert_sql(d: &Dialect, rows: usize) -> String {
    let mut sql = format!("INSERT INTO {{dead}} ({COLUMNS}) VALUES ");
    for i in 0..rows {
        sql.push_str(if i == 0 { "(?, ?, ?, ?, ?, ?, ?, ?, ?)" } else { ", (?, ?, ?, ?, ?, ?, ?, ?, ?)" });
    }
    let replaced: Vec<String> = match d.backend {
        Backend::MySql => {
            sql.push_str(" ON DUPLICATE KEY UPDATE ");
            REPLACED.iter().map(|c| format!("{c} = VALUES({c})")).collect()
        }
        Backend::Sqlite | Backend::Postgres => {
            sql.push_str(" ON CONFLICT (handle) DO UPDATE SET ");
            REPLACED.iter().map(|c| format!("{c} = excluded.{c}")).collect()
        }
    };
    sql.push_str(&replaced.join(", "));
    d.sql(&sql)
}

impl Op for Bury<'_> {
    type Out = ();

    async fn attempt(&mut self, d: &Dialect, c: &mut DbConn, _again: bool) -> sqlx::Result<()> {
        let mut tx = c.begin_write().await?;
        for range in self.chunks() {
            let rows = range.len();
            let sql = upsert_sql(d, rows);
            let mut args = Vec::with_capacity(rows * 9);
            for (job, error) in &self.jobs[range] {
                args.extend([
                    Arg::Text(&job.handle),
                    Arg::Bytes(&job.function),
                    Arg::Bytes(&job.unique),
                    Arg::Bytes(&job.data),
                    Arg::Int(job.data.len() as i64),
                    Arg::Int(job.priority.into()),
                    Arg::Int(job.attempts.into()),
                    Arg::Text(error),
                    Arg::Int(job.died_at),
                ]);
            }
            tx.ex().exec_sized(&sql, &args, rows == BURY_ROWS || rows == 1).await?;
        }
        tx.commit().await
    }
}

/// A page of the dead set.
pub(super) struct List<'a>(pub(super) &'a DeadFilter);

impl Op for List<'_> {
    type Out = Vec<DeadEntry>;

    async fn attempt(&mut self, d: &Dialect, c: &mut DbConn, _again: bool) -> sqlx::Result<Vec<DeadEntry>> {
        let filter = self.0;
        let limit = if filter.limit == 0 { i64::MAX } else { i64::try_from(filter.limit).unwrap_or(i64::MAX) };
        let offset = i64::try_from(filter.offset).unwrap_or(i64::MAX);
        let mut args = Vec::with_capacity(3);
        if let Some(function) = &filter.function {
            args.push(Arg::Bytes(function));
        }
        args.extend([Arg::Int(limit), Arg::Int(offset)]);
        let sql = d.sql(&format!(
            "SELECT handle, function_name, unique_key, data_len, priority, attempts, error_text, died_at \
             FROM {{dead}} {} ORDER BY died_at DESC, handle LIMIT ? OFFSET ?",
            if filter.function.is_some() { "WHERE function_name = ?" } else { "" }
        ));
        let rows: Vec<EntryRow> = c.ex().rows(&sql, &args).await?;
        Ok(rows
            .into_iter()
            .map(|(handle, function, unique, data_len, p, a, error, died_at)| DeadEntry {
                handle,
                function,
                unique,
                data_len: data_len.max(0) as u64,
                priority: priority(p),
                attempts: attempts(a),
                error,
                died_at,
            })
            .collect())
    }
}

/// Dead jobs per function.
pub(super) struct Counts;

impl Op for Counts {
    type Out = Vec<(Vec<u8>, u64)>;

    async fn attempt(&mut self, d: &Dialect, c: &mut DbConn, _again: bool) -> sqlx::Result<Self::Out> {
        let sql = d.sql("SELECT function_name, COUNT(*) FROM {dead} GROUP BY function_name ORDER BY function_name");
        let rows: Vec<(Vec<u8>, i64)> = c.ex().rows(&sql, &[]).await?;
        Ok(rows.into_iter().map(|(function, n)| (function, n.max(0) as u64)).collect())
    }
}

/// One dead job, payload included.
pub(super) struct Get<'a>(pub(super) &'a str);

impl Op for Get<'_> {
    type Out = Option<DeadJob>;

    async fn attempt(&mut self, d: &Dialect, c: &mut DbConn, _again: bool) -> sqlx::Result<Option<DeadJob>> {
        let sql = d.sql(
            "SELECT handle, function_name, unique_key, data, priority, attempts, error_text, died_at \
             FROM {dead} WHERE handle = ?",
        );
        let row: Option<JobRow> = c.ex().row(&sql, &[Arg::Text(self.0)]).await?;
        Ok(row.map(|(handle, function, unique, data, p, a, error, died_at)| DeadJob {
            handle,
            function,
            unique,
            data,
            priority: priority(p),
            attempts: attempts(a),
            error,
            died_at,
        }))
    }
}

/// Removes handles, in one transaction.
pub(super) struct Remove<'a>(pub(super) &'a [String]);

impl Op for Remove<'_> {
    type Out = u64;

    async fn attempt(&mut self, d: &Dialect, c: &mut DbConn, _again: bool) -> sqlx::Result<u64> {
        let mut tx = c.begin_write().await?;
        let mut removed = 0;
        for handles in self.0.chunks(REMOVE_ROWS) {
            let marks = vec!["?"; handles.len()].join(", ");
            let sql = d.sql(&format!("DELETE FROM {{dead}} WHERE handle IN ({marks})"));
            let args: Vec<Arg> = handles.iter().map(|h| Arg::Text(h)).collect();
            removed += tx.ex().exec_sized(&sql, &args, handles.len() == 1).await?;
        }
        tx.commit().await?;
        Ok(removed)
    }
}

/// Retention by age and by count, in one transaction.
pub(super) struct Expire {
    pub(super) died_before: Option<i64>,
    pub(super) keep_at_most: Option<u64>,
}

impl Op for Expire {
    type Out = u64;

    async fn attempt(&mut self, d: &Dialect, c: &mut DbConn, _again: bool) -> sqlx::Result<u64> {
        let mut tx = c.begin_write().await?;
        let mut ex = tx.ex();
        let mut removed = 0;
        let older = d.sql("DELETE FROM {dead} WHERE died_at < ?");
        if let Some(before) = self.died_before {
            removed += ex.exec(&older, &[Arg::Int(before)]).await?;
        }
        if let Some(keep) = self.keep_at_most {
            // The first entry to go, in list order (died_at descending, then handle): found in
            // the died_at index, by reading `keep` entries of it, and then the entries that
            // died in the same millisecond.
            let keep = i64::try_from(keep).unwrap_or(i64::MAX);
            let boundary = d.sql("SELECT died_at FROM {dead} ORDER BY died_at DESC LIMIT 1 OFFSET ?");
            if let Some((died_at,)) = ex.row::<(i64,)>(&boundary, &[Arg::Int(keep)]).await? {
                let newer = d.sql("SELECT COUNT(*) FROM {dead} WHERE died_at > ?");
                let (newer,) = ex.row::<(i64,)>(&newer, &[Arg::Int(died_at)]).await?.unwrap_or((0,));
                let first = d.sql("SELECT handle FROM {dead} WHERE died_at = ? ORDER BY handle LIMIT 1 OFFSET ?");
                let kept_of_tie = (keep - newer).max(0);
                let first: Option<(String,)> = ex.row(&first, &[Arg::Int(died_at), Arg::Int(kept_of_tie)]).await?;
                removed += ex.exec(&older, &[Arg::Int(died_at)]).await?;
                if let Some((handle,)) = first {
                    let tie = d.sql("DELETE FROM {dead} WHERE died_at = ? AND handle >= ?");
                    removed += ex.exec(&tie, &[Arg::Int(died_at), Arg::Text(&handle)]).await?;
                }
            }
        }
        tx.commit().await?;
        Ok(removed)
    }
}
