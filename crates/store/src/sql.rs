//! MariaDB/MySQL and PostgreSQL queue stores: the queue is one table, a row per job, owned by
//! one server at a time.
//!
//! [`open_sql`] takes `mysql://USER[:PASS]@HOST:PORT/DB` (or `mariadb://`) or
//! `postgres://USER[:PASS]@HOST:PORT/DB` (or `postgresql://`), with an optional `table=NAME`
//! parameter (default `gearbox_queue`). It creates the table if needed (the table's comment
//! records the schema version, so later versions can migrate it) and takes an exclusive lock
//! for the store's lifetime, on the connection the store writes through (see [`TableLock`]),
//! waiting a while for a predecessor's to be released. A job's location is its sequence
//! number: the server may drop payloads from memory and have them read back, in batches
//! (`SELECT … WHERE seq IN (…)`), before it hands the jobs to workers. On PostgreSQL the
//! session's `application_name` is `gearbox` unless the URL gives one.
//!
//! Each batch is one transaction: multi-row INSERTs, then `DELETE … WHERE seq IN (…)`, chunked
//! under the protocols' 65,535 bind parameters and MySQL's `max_allowed_packet` (see
//! `sql_plan`). When the connection breaks (the database restarted, the session was killed), a commit reconnects,
//! takes the lock again and retries the whole batch with backoff for up to ten seconds (the
//! lock may still be held by the store's own lost session). If another server holds the table
//! after that, this store fails every later commit.
//!
//! The methods block: they drive a single-threaded tokio runtime of the store's own, so they
//! must be called from a plain thread, not from within another runtime. Connections, URLs
//! and the table's schema are in `sql_conn`.

use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use sqlx::{Connection, Row};
use tokio::runtime::Runtime;

use crate::sql_conn::{is_connection_error, per_backend, runtime, Conn, Target, Tx};
use crate::sql_lock::{lock_table, TableLock};
use crate::sql_plan::{delete_sql, insert_sql, retry_sql, select_data_sql, Plan, MAX_PARAMS};
use crate::{Batch, LoadedJob, Loc, QueueStore, Result, StoreError};

pub(crate) const DEFAULT_TABLE: &str = "gearbox_queue";
/// How long a server waits at start for the lock of a table another session holds: long
/// enough for a database to notice that a killed predecessor's connection is gone.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(30);
/// Statements of up to this many rows recur with every batch and stay prepared on the
/// connection; bigger ones are rare and costly to keep prepared on the server.
const CACHED_ROWS: usize = 64;
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How long a commit keeps retrying once it lost the connection.
const RETRY_FOR: Duration = Duration::from_secs(10);
/// Jobs whose payloads one SELECT reads.
const READ_ROWS: usize = 1000;
/// Bounds one attempt, so that a database that stops answering fails commits instead of
/// hanging them until TCP gives up.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens (creating if needed) the queue table named by `url` and locks it for this store,
/// waiting up to `lock_wait` ([`DEFAULT_LOCK_WAIT`] for a server; zero tries once) if another
/// session holds the lock.
///
/// Errors: [`StoreError::Locked`] (naming the holder) if the lock is still held after
/// `lock_wait`; [`StoreError::Database`] for a bad URL, an unreachable database, or a table
/// that is not a gearbox queue of this schema version.
pub fn open_sql(url: &str, lock_wait: Duration) -> Result<Box<dyn QueueStore>> {
    let target = Target::parse(url, DEFAULT_TABLE)?;
    let rt = runtime()?;
    let db = rt.block_on(Db::open(target, lock_wait))?;
    Ok(Box::new(SqlStore { rt, db, broken: None }))
}

/// Why an attempt at a batch failed.
enum Failure {
    /// The connection broke or could not be made: a retry may succeed.
    Lost { error: String, maybe_committed: bool },
    /// Reconnected, but another session (described, if the database shows it) holds the
    /// table's lock.
    Locked(Option<String>),
    /// The database refused the batch.
    Refused(String),
}

impl Failure {
    fn from_sqlx(e: sqlx::Error, committing: bool) -> Failure {
        if is_connection_error(&e) {
            Failure::Lost { error: e.to_string(), maybe_committed: committing }
        } else {
            Failure::Refused(e.to_string())
        }
    }
}

/// Why the store refuses every batch.
enum Broken {
    /// Another session took the table; its description, if known.
    Locked(Option<String>),
    /// A commit failed at a point where the database may have applied it.
    Unknown(String),
}

struct SqlStore {
    rt: Runtime,
    db: Db,
    broken: Option<Broken>,
}

struct Db {
    target: Target,
    lock: TableLock,
    /// None after the connection broke, until a commit reconnects.
    conn: Option<Conn>,
    statement_bytes: usize,
    max_job_bytes: usize,
    /// Set while a COMMIT is in flight: losing the connection then leaves the outcome unknown.
    committing: bool,
}

impl Db {
    async fn open(target: Target, lock_wait: Duration) -> Result<Db> {
        let mut conn = target.connect().await.map_err(|e| target.error(e))?;
        let database = conn
            .database()
            .await
            .map_err(|e| target.error(e))?
            .ok_or_else(|| StoreError::Database(format!("{}: the URL names no database", target.public)))?;
        let lock = TableLock::new(&database, &target.table);
        lock_table(&mut conn, &target, &lock, lock_wait).await?;
        conn.ensure_schema(&target).await?;
        let (statement_bytes, max_job_bytes) = conn.limits().await.map_err(|e| target.error(e))?;
        Ok(Db { target, lock, conn: Some(conn), statement_bytes, max_job_bytes, committing: false })
    }

    async fn write(&mut self, plan: &Plan<'_>, idempotent: bool) -> std::result::Result<(), Failure> {
        self.committing = false;
        let table = &self.target.table;
        let conn = connection(&mut self.conn, &self.target, &self.lock).await?;
        let kind = conn.kind();
        let mut tx = per_backend!(Conn, conn, c, _DB => c.begin().await.map(Tx::from))
            .map_err(|e| Failure::from_sqlx(e, false))?;
        for rows in plan.add_chunks.iter().map(|r| &plan.adds[r.clone()]) {
            let sql = insert_sql(kind, table, rows.len(), idempotent);
            per_backend!(Tx, &mut tx, t, DB => {
                let mut q = sqlx::query::<DB>(&sql).persistent(rows.len() <= CACHED_ROWS);
                for a in rows {
                    q = q.bind(a.seq as i64).bind(i16::from(a.priority)).bind(a.run_at).bind(a.function).bind(a.unique).bind(a.data);
                }
                q.execute(&mut **t).await.map(drop)
            })
            .map_err(|e| Failure::from_sqlx(e, false))?;
        }
        let retry = retry_sql(kind, table);
        for &(seq, run_at, attempts) in &plan.retries {
            per_backend!(Tx, &mut tx, t, DB => {
                sqlx::query::<DB>(&retry).bind(run_at).bind(attempts).bind(seq).execute(&mut **t).await.map(drop)
            })
            .map_err(|e| Failure::from_sqlx(e, false))?;
        }
        for seqs in plan.removes.chunks(MAX_PARAMS) {
            let sql = delete_sql(kind, table, seqs.len());
            per_backend!(Tx, &mut tx, t, DB => {
                let mut q = sqlx::query::<DB>(&sql).persistent(seqs.len() <= CACHED_ROWS);
                for &seq in seqs {
                    q = q.bind(seq);
                }
                q.execute(&mut **t).await.map(drop)
            })
            .map_err(|e| Failure::from_sqlx(e, false))?;
        }
        self.committing = true;
        per_backend!(Tx, tx, t, _DB => t.commit().await).map_err(|e| Failure::from_sqlx(e, true))?;
        self.committing = false;
        Ok(())
    }

    async fn load(&mut self, each: &mut dyn FnMut(LoadedJob<'_>)) -> Result<()> {
        let public = self.target.public.clone();
        let sql = format!(
            "SELECT seq, priority, run_at, function_name, unique_key, data, attempts FROM {} ORDER BY seq",
            self.target.table
        );
        let conn = connection(&mut self.conn, &self.target, &self.lock).await.map_err(|f| match f {
            Failure::Locked(holder) => StoreError::Locked { what: public.clone(), holder, waited: Duration::ZERO },
            Failure::Lost { error, .. } | Failure::Refused(error) => StoreError::Database(format!("{public}: {error}")),
        })?;
        let db_error = |e: sqlx::Error| StoreError::Database(format!("{public}: {e}"));
        let corrupt = |what: &str, seq: i64| StoreError::Corrupt(format!("{public}: job {seq} has a bad {what}"));
        per_backend!(Conn, conn, c, DB => {
            let mut rows = sqlx::query::<DB>(&sql).fetch(&mut *c);
            while let Some(row) = rows.try_next().await.map_err(db_error)? {
                let seq: i64 = row.try_get(0).map_err(db_error)?;
                let priority: i16 = row.try_get(1).map_err(db_error)?;
                each(LoadedJob {
                    seq: u64::try_from(seq).map_err(|_| corrupt("sequence number", seq))?,
                    priority: u8::try_from(priority).ok().filter(|&p| p <= 2).ok_or_else(|| corrupt("priority", seq))?,
                    run_at: row.try_get(2).map_err(db_error)?,
                    function: row.try_get(3).map_err(db_error)?,
                    unique: row.try_get(4).map_err(db_error)?,
                    data: row.try_get(5).map_err(db_error)?,
                    loc: Loc(seq as u64),
                    attempts: row.try_get::<i32, _>(6).map_err(db_error)?.max(0) as u32,
                });
            }
            Ok(())
        })
    }
}

impl Db {
    /// Calls `each` with the payload of every job of `seqs` the table holds.
    async fn read_payloads(
        &mut self,
        seqs: &[i64],
        each: &mut dyn FnMut(u64, &[u8]),
    ) -> std::result::Result<(), Failure> {
        let conn = connection(&mut self.conn, &self.target, &self.lock).await?;
        let kind = conn.kind();
        for chunk in seqs.chunks(READ_ROWS) {
            let sql = select_data_sql(kind, &self.target.table, chunk.len());
            per_backend!(Conn, &mut *conn, c, DB => {
                let mut q = sqlx::query::<DB>(&sql).persistent(chunk.len() == READ_ROWS);
                for &seq in chunk {
                    q = q.bind(seq);
                }
                let mut rows = q.fetch(&mut *c);
                while let Some(row) = rows.try_next().await.map_err(|e| Failure::from_sqlx(e, false))? {
                    let seq: i64 = row.try_get(0).map_err(|e| Failure::from_sqlx(e, false))?;
                    let data: &[u8] = row.try_get(1).map_err(|e| Failure::from_sqlx(e, false))?;
                    each(seq as u64, data);
                }
                Ok::<(), Failure>(())
            })?;
        }
        Ok(())
    }
}

/// The connection, reconnecting (and taking the lock again) if it was lost.
async fn connection<'a>(
    slot: &'a mut Option<Conn>,
    target: &Target,
    lock: &TableLock,
) -> std::result::Result<&'a mut Conn, Failure> {
    let conn = match slot.take() {
        Some(conn) => conn,
        None => {
            let mut conn = target.connect().await.map_err(|e| Failure::from_sqlx(e, false))?;
            if !conn.try_lock(lock).await.map_err(|e| Failure::from_sqlx(e, false))? {
                let holder = conn.lock_holder(lock).await.map_err(|e| Failure::from_sqlx(e, false))?;
                return Err(Failure::Locked(holder));
            }
            tracing::info!("queue database {}: reconnected", target.public);
            conn
        }
    };
    Ok(slot.insert(conn))
}

impl QueueStore for SqlStore {
    fn describe(&self) -> String {
        self.db.target.public.clone()
    }

    fn load(&mut self, each: &mut dyn FnMut(LoadedJob<'_>)) -> Result<()> {
        self.rt.block_on(self.db.load(each))
    }

    fn reads_payloads(&self) -> bool {
        true
    }

    fn read_payloads(&mut self, wanted: &[(u64, Loc)], each: &mut dyn FnMut(u64, &[u8])) -> Result<()> {
        self.read(wanted, each)
    }

    fn commit(&mut self, batch: &Batch, locs: &mut Vec<Loc>) -> Result<()> {
        let public = &self.db.target.public;
        match &self.broken {
            Some(Broken::Locked(holder)) => {
                return Err(StoreError::Locked { what: public.clone(), holder: holder.clone(), waited: Duration::ZERO })
            }
            Some(Broken::Unknown(why)) => {
                return Err(StoreError::Database(format!(
                    "{public}: refusing batches since a commit may or may not have been applied ({why}); \
                     restart to reload the queue"
                )))
            }
            None => {}
        }
        locs.clear();
        locs.extend(batch.adds().map(|a| Loc(a.seq)).chain(batch.retries().map(|r| Loc(r.job.seq))));
        if batch.is_empty() {
            return Ok(());
        }
        let plan = Plan::new(batch, self.db.statement_bytes, self.db.max_job_bytes)?;
        if plan.adds.is_empty() && plan.removes.is_empty() && plan.retries.is_empty() {
            return Ok(());
        }
        let mut first_failure = None;
        let mut delay = RETRY_FIRST;
        let mut maybe_committed = false;
        loop {
            let write = self.db.write(&plan, maybe_committed);
            let attempt = self.rt.block_on(async { tokio::time::timeout(ATTEMPT_TIMEOUT, write).await });
            let failure = match attempt {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(failure)) => failure,
                Err(_) => Failure::Lost {
                    error: format!("no answer in {ATTEMPT_TIMEOUT:?}"),
                    maybe_committed: self.db.committing,
                },
            };
            let public = &self.db.target.public;
            let failed_at = *first_failure.get_or_insert_with(Instant::now);
            let may_retry = Instant::now() + delay < failed_at + RETRY_FOR;
            let error = match failure {
                Failure::Lost { error, maybe_committed: m } => {
                    self.db.conn = None;
                    maybe_committed |= m;
                    if may_retry {
                        tracing::warn!("queue database {public}: {error}; retrying in {delay:?}");
                        back_off(&mut delay);
                        continue;
                    }
                    StoreError::Database(format!("{public}: connection lost, gave up after {RETRY_FOR:?}: {error}"))
                }
                // The holder may be this store's own lost session, which the database has not
                // ended yet: give it the same time as a lost connection.
                Failure::Locked(holder) => {
                    if may_retry {
                        let who = holder.as_deref().unwrap_or("another session");
                        tracing::warn!(
                            "queue database {public}: reconnected, but {who} holds the table's lock; retrying in {delay:?}"
                        );
                        back_off(&mut delay);
                        continue;
                    }
                    self.broken = Some(Broken::Locked(holder.clone()));
                    // In tenths of a second, for the message.
                    let waited = Duration::from_millis((failed_at.elapsed().as_millis() as u64).div_ceil(100) * 100);
                    return Err(StoreError::Locked { what: public.clone(), holder, waited });
                }
                Failure::Refused(error) => StoreError::Database(format!("{public}: {error}")),
            };
            if maybe_committed {
                self.broken = Some(Broken::Unknown(error.to_string()));
            }
            return Err(error);
        }
    }
}

/// Sleeps `delay` before the next attempt, and doubles it (up to [`RETRY_MAX`]).
impl SqlStore {
    /// See [`QueueStore::read_payloads`]: retried with backoff, reconnecting, for up to
    /// ten seconds.
    fn read(&mut self, wanted: &[(u64, Loc)], each: &mut dyn FnMut(u64, &[u8])) -> Result<()> {
        let seqs: Vec<i64> = wanted.iter().map(|&(seq, _)| seq as i64).collect();
        let started = Instant::now();
        let mut delay = RETRY_FIRST;
        loop {
            let read = self.db.read_payloads(&seqs, each);
            let attempt = self.rt.block_on(async { tokio::time::timeout(ATTEMPT_TIMEOUT, read).await });
            let public = &self.db.target.public;
            let error = match attempt {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(Failure::Lost { error, .. })) => error,
                Ok(Err(Failure::Locked(holder))) => {
                    return Err(StoreError::Locked { what: public.clone(), holder, waited: started.elapsed() })
                }
                Ok(Err(Failure::Refused(error))) => return Err(StoreError::Database(format!("{public}: {error}"))),
                Err(_) => format!("no answer in {ATTEMPT_TIMEOUT:?}"),
            };
            self.db.conn = None;
            if Instant::now() + delay >= started + RETRY_FOR {
                return Err(StoreError::Database(format!("{public}: reading payloads, gave up: {error}")));
            }
            tracing::warn!("queue database {public}: reading payloads: {error}; retrying in {delay:?}");
            back_off(&mut delay);
        }
    }
}

fn back_off(delay: &mut Duration) {
    std::thread::sleep(*delay);
    *delay = (*delay * 2).min(RETRY_MAX);
}

impl Drop for SqlStore {
    fn drop(&mut self) {
        let Some(mut conn) = self.db.conn.take() else { return };
        // Release the lock rather than leave it to the server, which frees a closed session's
        // locks only once it notices: a successor may be opening the table right now.
        let lock = &self.db.lock;
        let release = async {
            let _ = conn.unlock(lock).await;
            conn.close().await
        };
        let _ = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), release).await });
    }
}
