//! A cluster node's [`QueueStore`]: it writes the node's batches, fenced by the incarnation
//! that built them ([`Batch::owner`]), and loads nothing (a node starts owning no job; the
//! jobs of earlier incarnations are taken over and claimed like any other).
//!
//! One transaction per batch: the lease check, `DELETE … AND owner = node`, the inserts
//! (owned by the node, or NULL for any node to claim) that stop at a conflicting unique key,
//! the lookup of the job each conflict names, then the marks (attempts, running, progress).
//! A lost connection is retried, with backoff, for up to ten seconds; a retried insert that
//! finds its own row counts as done.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use sqlx::{Connection, Row};
use tokio::runtime::Runtime;

use super::channel;
use super::db::{fenced, ClusterDb};
use crate::sql_conn::{is_connection_error, per_backend, runtime, Conn, Kind, Tx};
use crate::sql_plan::{push_placeholders, select_data_sql, Plan, MAX_PARAMS};
use crate::{Batch, LoadedJob, Loc, Mark, QueueStore, Result, StoreError};

/// Bind parameters per inserted row.
const INSERT_PARAMS: usize = 7;
const RETRY_FOR: Duration = Duration::from_secs(10);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
const READ_ROWS: usize = 1000;

/// Opens a cluster node's store on the table `url` names (see [`ClusterDb::open`]).
pub fn open_cluster_store(url: &str, lease: Duration) -> Result<Box<dyn QueueStore>> {
    let rt = runtime()?;
    let mut db = rt.block_on(ClusterDb::open(url, lease))?;
    let (statement_bytes, max_job_bytes) = rt.block_on(async {
        let conn = db.conn().await?;
        conn.limits().await.map_err(|e| StoreError::Database(e.to_string()))
    })?;
    Ok(Box::new(ClusterStore { rt, db, statement_bytes, max_job_bytes, coalesced: Vec::new() }))
}

struct ClusterStore {
    rt: Runtime,
    db: ClusterDb,
    statement_bytes: usize,
    max_job_bytes: usize,
    coalesced: Vec<(u64, u64)>,
}

/// What a batch does to rows it does not add or remove: per job, attempts started, whether
/// it ends up running, and its last progress.
#[derive(Default, Clone, Copy, PartialEq, Eq, Hash)]
struct RowChange {
    starts: u32,
    running: Option<bool>,
    progress: Option<(u32, u32)>,
    released: bool,
}

fn row_changes(batch: &Batch) -> Vec<(RowChange, Vec<i64>)> {
    let mut per_job: HashMap<u64, RowChange> = HashMap::new();
    for &(seq, mark) in batch.marks() {
        let change = per_job.entry(seq).or_default();
        match mark {
            Mark::Started => {
                change.starts += 1;
                change.running = Some(true);
            }
            Mark::Requeued => change.running = Some(false),
            Mark::Progress(n, d) => change.progress = Some((n, d)),
            Mark::Released => {
                change.running = Some(false);
                change.released = true;
            }
        }
    }
    // Jobs that started alike share one UPDATE; progress is per job.
    let mut grouped: HashMap<RowChange, Vec<i64>> = HashMap::new();
    for (seq, change) in per_job {
        grouped.entry(change).or_default().push(seq as i64);
    }
    grouped.into_iter().collect()
}

/// Writes `batch` in one transaction; false if the incarnation that built it has lost its
/// lease. `coalesced` gets the adds whose unique key another job holds, and that job.
async fn write(
    db: &mut ClusterDb,
    batch: &Batch,
    plan: &Plan<'_>,
    coalesced: &mut Vec<(u64, u64)>,
) -> sqlx::Result<bool> {
    coalesced.clear();
    let fence = db.fence_sql();
    let (kind, table) = (db.kind(), db.table().to_string());
    let conn = match db.conn().await {
        Ok(conn) => conn,
        Err(e) => return Err(sqlx::Error::Io(std::io::Error::other(e.to_string()))),
    };
    let mut tx = per_backend!(Conn, conn, c, _DB => c.begin().await.map(Tx::from))?;
    if !fenced(&mut tx, &fence, batch.owner).await? {
        return Ok(false);
    }
    for seqs in plan.removes.chunks(MAX_PARAMS - 1) {
        let mut sql = match kind {
            Kind::MySql => format!("DELETE {table} FROM {} WHERE owner = ", by_seq(kind, &table)),
            Kind::Postgres => format!("DELETE FROM {table} WHERE owner = "),
        };
        push_placeholders(&mut sql, kind, 1, 1);
        sql.push_str(" AND seq IN (");
        push_placeholders(&mut sql, kind, 2, seqs.len());
        sql.push(')');
        per_backend!(Tx, &mut tx, t, DB => {
            let mut q = sqlx::query::<DB>(&sql).bind(batch.owner as i64);
            for &seq in seqs {
                q = q.bind(seq);
            }
            q.execute(&mut **t).await.map(drop)
        })?;
    }
    let mut unowned = batch.marks().iter().any(|&(_, m)| m == Mark::Released);
    let by_unique = format!(
        "SELECT seq FROM {table} WHERE unique_key = {} AND function_name = {}",
        if kind == Kind::MySql { "?" } else { "$1" },
        if kind == Kind::MySql { "?" } else { "$2" }
    );
    let by_seq =
        format!("SELECT function_name, data FROM {table} WHERE seq = {}", if kind == Kind::MySql { "?" } else { "$1" });
    for rows in plan.add_chunks.iter().map(|r| &plan.adds[r.clone()]) {
        let sql = insert_sql(kind, &table, rows.len());
        let inserted: HashSet<i64> = per_backend!(Tx, &mut tx, t, DB => {
            let mut q = sqlx::query_scalar::<DB, i64>(&sql);
            for a in rows {
                let unique = (!a.unique.is_empty()).then_some(a.unique);
                let owner = a.owned.then_some(batch.owner as i64);
                q = q.bind(a.seq as i64).bind(i16::from(a.priority)).bind(a.run_at).bind(a.function).bind(unique).bind(a.data).bind(owner);
            }
            q.fetch_all(&mut **t).await
        })?
        .into_iter()
        .collect();
        unowned |= rows.iter().any(|a| !a.owned);
        for a in rows.iter().filter(|a| !inserted.contains(&(a.seq as i64))) {
            if !a.unique.is_empty() {
                // A unique key another job holds: that job is the answer.
                let existing = per_backend!(Tx, &mut tx, t, DB => {
                    sqlx::query_scalar::<DB, i64>(&by_unique).bind(a.unique).bind(a.function).fetch_optional(&mut **t).await
                })?;
                match existing {
                    Some(seq) if seq as u64 != a.seq => coalesced.push((a.seq, seq as u64)),
                    // Its own row, from an attempt whose COMMIT went unanswered.
                    Some(_) => {}
                    // The holder ended meanwhile: the next attempt inserts it.
                    None => return Err(sqlx::Error::Protocol(format!("job {} met a unique key just freed", a.seq))),
                }
                continue;
            }
            // No unique key: only its own row, from an attempt whose COMMIT went unanswered,
            // can hold its sequence number.
            let row = per_backend!(Tx, &mut tx, t, DB => {
                sqlx::query_as::<DB, (Vec<u8>, Vec<u8>)>(&by_seq).bind(a.seq as i64).fetch_optional(&mut **t).await
            })?;
            if row.as_ref().is_none_or(|(f, d)| f != a.function || d != a.data) {
                return Err(sqlx::Error::Configuration(
                    format!("job {} collides with another job's sequence number", a.seq).into(),
                ));
            }
        }
    }
    for (change, seqs) in row_changes(batch) {
        update_rows(&mut tx, kind, &table, batch.owner, change, &seqs).await?;
    }
    // After the marks: a retry's attempts and state are the job's as of this batch.
    let retry = match kind {
        Kind::MySql => format!(
            "UPDATE {} SET run_at = ?, attempts = ?, running = 0 WHERE owner = ? AND seq = ?",
            self::by_seq(kind, &table)
        ),
        Kind::Postgres => {
            format!("UPDATE {table} SET run_at = $1, attempts = $2, running = 0 WHERE owner = $3 AND seq = $4")
        }
    };
    for r in batch.retries() {
        let attempts = i32::try_from(r.attempts).unwrap_or(i32::MAX);
        per_backend!(Tx, &mut tx, t, DB => {
            sqlx::query::<DB>(&retry).bind(r.job.run_at).bind(attempts).bind(batch.owner as i64).bind(r.job.seq as i64)
                .execute(&mut **t).await.map(drop)
        })?;
    }
    if unowned {
        if let Tx::Postgres(t) = &mut tx {
            sqlx::query("SELECT pg_notify($1, '')").bind(channel(&table)).execute(&mut **t).await?;
        }
    }
    per_backend!(Tx, tx, t, _DB => t.commit().await)?;
    Ok(true)
}

/// The table, for a statement that names its rows by sequence number. MariaDB would pick the
/// claim index for `owner = ?` (and on a table without statistics, scan it all), locking
/// other nodes' rows on the way: the primary key locks exactly the rows named.
pub(crate) fn by_seq(kind: Kind, table: &str) -> String {
    match kind {
        Kind::MySql => format!("{table} FORCE INDEX (PRIMARY)"),
        Kind::Postgres => table.to_string(),
    }
}

/// A deadlock or a lock wait that timed out: the transaction was rolled back and can be
/// tried again (MariaDB 1213, 1205; PostgreSQL 40P01, 55P03, 40001).
fn is_conflict(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else { return false };
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return matches!(my.number(), 1205 | 1213);
    }
    db.code().is_some_and(|c| matches!(&*c, "40001" | "40P01" | "55P03"))
}

fn insert_sql(kind: Kind, table: &str, rows: usize) -> String {
    let mut sql = format!(
        "INSERT {}INTO {table} (seq, priority, run_at, function_name, unique_key, data, owner) VALUES ",
        if kind == Kind::MySql { "IGNORE " } else { "" }
    );
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        push_placeholders(&mut sql, kind, row * INSERT_PARAMS + 1, INSERT_PARAMS);
        sql.push(')');
    }
    if kind == Kind::Postgres {
        sql.push_str(" ON CONFLICT DO NOTHING");
    }
    sql.push_str(" RETURNING seq");
    sql
}

/// Applies one kind of change to the rows `seqs` that `owner` owns.
async fn update_rows(
    tx: &mut Tx<'_>,
    kind: Kind,
    table: &str,
    owner: u64,
    change: RowChange,
    seqs: &[i64],
) -> sqlx::Result<()> {
    let mut sets = Vec::new();
    if change.starts > 0 {
        sets.push(format!("attempts = attempts + {}", change.starts));
    }
    if let Some(running) = change.running {
        sets.push(format!("running = {}", i32::from(running)));
    }
    if let Some((n, d)) = change.progress {
        sets.push(format!("numerator = {n}, denominator = {d}"));
    }
    // Last: the WHERE clause names the owner as it was.
    if change.released {
        sets.push("owner = NULL".into());
    }
    if sets.is_empty() {
        return Ok(());
    }
    for chunk in seqs.chunks(MAX_PARAMS - 1) {
        let mut sql = format!("UPDATE {} SET {} WHERE owner = ", by_seq(kind, table), sets.join(", "));
        push_placeholders(&mut sql, kind, 1, 1);
        sql.push_str(" AND seq IN (");
        push_placeholders(&mut sql, kind, 2, chunk.len());
        sql.push(')');
        per_backend!(Tx, &mut *tx, t, DB => {
            let mut q = sqlx::query::<DB>(&sql).bind(owner as i64);
            for &seq in chunk {
                q = q.bind(seq);
            }
            q.execute(&mut **t).await.map(drop)
        })?;
    }
    Ok(())
}

impl QueueStore for ClusterStore {
    fn describe(&self) -> String {
        format!("cluster on {}", self.db.describe())
    }

    fn load(&mut self, _each: &mut dyn FnMut(LoadedJob<'_>)) -> Result<()> {
        Ok(())
    }

    fn commit(&mut self, batch: &Batch, locs: &mut Vec<Loc>) -> Result<()> {
        locs.clear();
        locs.extend(batch.adds().map(|a| Loc(a.seq)).chain(batch.retries().map(|r| Loc(r.job.seq))));
        self.coalesced.clear();
        if batch.is_empty() {
            return Ok(());
        }
        let plan = Plan::with_rows(batch, self.statement_bytes, self.max_job_bytes, INSERT_PARAMS, true)?;
        let started = Instant::now();
        let mut delay = Duration::from_millis(50);
        let mut coalesced = Vec::new();
        loop {
            let (rt, db) = (&self.rt, &mut self.db);
            let attempt = rt.block_on(async {
                tokio::time::timeout(ATTEMPT_TIMEOUT, write(db, batch, &plan, &mut coalesced)).await
            });
            let public = self.db.describe().to_string();
            let error = match attempt {
                Ok(Ok(true)) => {
                    self.coalesced = coalesced;
                    return Ok(());
                }
                Ok(Ok(false)) => {
                    return Err(StoreError::Database(format!(
                        "{public}: this node's cluster lease has ended; it rejoins as a new node"
                    )))
                }
                Ok(Err(e)) => e,
                Err(_) => sqlx::Error::Io(std::io::Error::other(format!("no answer in {ATTEMPT_TIMEOUT:?}"))),
            };
            let lost = is_connection_error(&error) || is_conflict(&error);
            let error = self.db.failed(error);
            if !lost || started.elapsed() + delay >= RETRY_FOR {
                return Err(error);
            }
            tracing::warn!("cluster queue: {error}; retrying in {delay:?}");
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    fn coalesced(&self) -> &[(u64, u64)] {
        &self.coalesced
    }

    fn reads_payloads(&self) -> bool {
        true
    }

    fn read_payloads(&mut self, wanted: &[(u64, Loc)], each: &mut dyn FnMut(u64, &[u8])) -> Result<()> {
        let seqs: Vec<i64> = wanted.iter().map(|&(seq, _)| seq as i64).collect();
        let (kind, table) = (self.db.kind(), self.db.table().to_string());
        let db = &mut self.db;
        let target = db.describe().to_string();
        let outcome = self.rt.block_on(async {
            let conn = db.conn().await?;
            for chunk in seqs.chunks(READ_ROWS) {
                let sql = select_data_sql(kind, &table, chunk.len());
                let read: sqlx::Result<()> = async {
                    per_backend!(Conn, &mut *conn, c, DB => {
                        let mut q = sqlx::query::<DB>(&sql);
                        for &seq in chunk {
                            q = q.bind(seq);
                        }
                        let mut rows = q.fetch(&mut *c);
                        while let Some(row) = rows.try_next().await? {
                            let seq: i64 = row.try_get(0)?;
                            let data: &[u8] = row.try_get(1)?;
                            each(seq as u64, data);
                        }
                        Ok::<(), sqlx::Error>(())
                    })
                }
                .await;
                read.map_err(|e| StoreError::Database(format!("{target}: {e}")))?;
            }
            Ok(())
        });
        if outcome.is_err() {
            self.db.reset();
        }
        outcome
    }
}
