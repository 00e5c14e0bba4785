//! The database lock through which one gearbox server owns a queue table: `GET_LOCK` on
//! MariaDB/MySQL, a session advisory lock on PostgreSQL, both held by the store's session.
//!
//! A server killed a moment ago may still hold it: the database frees a dead client's locks
//! only once it notices the connection is gone. So opening waits for the lock for a bounded
//! time ([`open_sql`](crate::open_sql)'s `lock_wait`), polling rather than blocking so the
//! bound is kept exactly and the holder can be named in the log and in the error.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use sqlx::mysql::MySqlConnectOptions;
use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions;

use crate::sql::DEFAULT_TABLE;
use crate::sql_conn::{Conn, Kind, Target};
use crate::{Result, StoreError};

/// How often a waiting open tries the lock again.
const POLL: Duration = Duration::from_millis(200);
/// MySQL truncates longer `GET_LOCK` names.
const MYSQL_LOCK_NAME_MAX: usize = 64;

/// The lock that makes a gearbox server the owner of one queue table. Another session that
/// holds it keeps servers off the table: take it with `SELECT GET_LOCK(name, 0)` on
/// MariaDB/MySQL ([`TableLock::mysql_name`]) or `SELECT pg_try_advisory_lock(key)` on
/// PostgreSQL ([`TableLock::pg_key`], in the table's database).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableLock {
    /// `gearbox:DATABASE:TABLE`; each backend derives its lock name or key from it.
    id: String,
}

impl TableLock {
    pub(crate) fn new(database: &str, table: &str) -> TableLock {
        TableLock { id: format!("gearbox:{database}:{table}") }
    }

    /// The lock of the table a queue URL names (as [`open_sql`](crate::open_sql) takes it,
    /// `table` parameter included), in the database its path names.
    ///
    /// Errors: [`StoreError::Database`] for a URL that is not a MySQL/PostgreSQL URL or
    /// names no database.
    pub fn of_url(url: &str) -> Result<TableLock> {
        let target = Target::parse(url, DEFAULT_TABLE)?;
        let options_error = |e: sqlx::Error| StoreError::Database(format!("bad database URL: {e}"));
        let database = match target.kind {
            Kind::MySql => {
                MySqlConnectOptions::from_url(&target.url).map_err(options_error)?.get_database().map(String::from)
            }
            Kind::Postgres => {
                PgConnectOptions::from_url(&target.url).map_err(options_error)?.get_database().map(String::from)
            }
        };
        let database =
            database.ok_or_else(|| StoreError::Database(format!("{}: the URL names no database", target.public)))?;
        Ok(TableLock::new(&database, &target.table))
    }

    /// The `GET_LOCK` name on MariaDB/MySQL: at most 64 characters.
    pub fn mysql_name(&self) -> Cow<'_, str> {
        if self.id.len() <= MYSQL_LOCK_NAME_MAX {
            Cow::Borrowed(&self.id)
        } else {
            Cow::Owned(format!("gearbox:{:016x}", fnv1a(&self.id)))
        }
    }

    /// The advisory lock key on PostgreSQL.
    pub fn pg_key(&self) -> i64 {
        fnv1a(&self.id) as i64
    }
}

/// A hash that stays the same across builds and platforms: lock identities must agree
/// between servers.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// A PostgreSQL lock holder: pid, client address and port, application name, session start (UTC).
type PgHolder = (i32, Option<String>, Option<i32>, Option<String>, Option<String>);

impl Conn {
    /// Takes the table's lock for this session without waiting; false if another holds it.
    pub(crate) async fn try_lock(&mut self, lock: &TableLock) -> sqlx::Result<bool> {
        match self {
            Conn::MySql(c) => {
                let got: Option<i64> =
                    sqlx::query_scalar("SELECT GET_LOCK(?, 0)").bind(lock.mysql_name()).fetch_one(c).await?;
                Ok(got == Some(1))
            }
            Conn::Postgres(c) => {
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(lock.pg_key()).fetch_one(c).await
            }
        }
    }

    pub(crate) async fn unlock(&mut self, lock: &TableLock) -> sqlx::Result<()> {
        match self {
            Conn::MySql(c) => {
                sqlx::query("DO RELEASE_LOCK(?)").bind(lock.mysql_name()).execute(c).await?;
            }
            Conn::Postgres(c) => {
                sqlx::query("SELECT pg_advisory_unlock($1)").bind(lock.pg_key()).execute(c).await?;
            }
        }
        Ok(())
    }

    /// Who holds the lock, as far as the database shows this session: `connection 42 from
    /// 10.0.0.5:51234, user gearbox` on MySQL, `session pid 1234 from 10.0.0.5:51234,
    /// application gearbox, connected 2025-01-31 12:00:00 UTC` on PostgreSQL. `None` if nobody
    /// holds it (any more).
    pub(crate) async fn lock_holder(&mut self, lock: &TableLock) -> sqlx::Result<Option<String>> {
        match self {
            Conn::MySql(c) => {
                // PROCESSLIST shows other users' connections only with the PROCESS privilege.
                let row: Option<(i64, Option<String>, Option<String>)> = sqlx::query_as(
                    "SELECT CAST(l.id AS SIGNED), p.HOST, p.USER \
                     FROM (SELECT IS_USED_LOCK(?) AS id) l \
                     LEFT JOIN information_schema.PROCESSLIST p ON p.ID = l.id \
                     WHERE l.id IS NOT NULL",
                )
                .bind(lock.mysql_name())
                .fetch_optional(c)
                .await?;
                Ok(row.map(|(id, host, user)| {
                    let mut holder = format!("connection {id}");
                    if let Some(host) = host.filter(|h| !h.is_empty()) {
                        holder.push_str(&format!(" from {host}"));
                    }
                    if let Some(user) = user.filter(|u| !u.is_empty()) {
                        holder.push_str(&format!(", user {user}"));
                    }
                    holder
                }))
            }
            Conn::Postgres(c) => {
                // A bigint advisory key shows in pg_locks as classid (high 32 bits), objid
                // (low 32 bits) and objsubid 1. pg_stat_activity hides other roles' client
                // details unless this role may read all statistics.
                let key = lock.pg_key() as u64;
                let row: Option<PgHolder> = sqlx::query_as(
                    "SELECT l.pid, host(a.client_addr), a.client_port, a.application_name, \
                            to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') \
                     FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                       AND l.classid::bigint = $1 AND l.objid::bigint = $2 \
                     LIMIT 1",
                )
                .bind((key >> 32) as i64)
                .bind((key & 0xffff_ffff) as i64)
                .fetch_optional(c)
                .await?;
                Ok(row.map(|(pid, addr, port, application, started)| {
                    let mut holder = format!("session pid {pid}");
                    match (addr, port) {
                        (Some(addr), Some(port)) => holder.push_str(&format!(" from {addr}:{port}")),
                        (None, Some(-1)) => holder.push_str(" over a Unix socket"),
                        _ => {}
                    }
                    if let Some(application) = application.filter(|a| !a.is_empty()) {
                        holder.push_str(&format!(", application {application}"));
                    }
                    if let Some(started) = started {
                        holder.push_str(&format!(", connected {started} UTC"));
                    }
                    holder
                }))
            }
        }
    }
}

/// Takes the table's lock on `conn`, waiting up to `wait` for another session to release it
/// (say once, in the log, that it waits and for whom).
///
/// Errors: [`StoreError::Locked`] naming the holder once the wait is over,
/// [`StoreError::Database`] if the database fails meanwhile.
pub(crate) async fn lock_table(conn: &mut Conn, target: &Target, lock: &TableLock, wait: Duration) -> Result<()> {
    let started = Instant::now();
    let deadline = started + wait;
    let mut warned = false;
    loop {
        if conn.try_lock(lock).await.map_err(|e| target.error(e))? {
            if warned {
                tracing::info!(
                    "queue database {}: took the table's lock after {:.1?}",
                    target.public,
                    started.elapsed()
                );
            }
            return Ok(());
        }
        // Asked again each time: the holder may have changed, or just left.
        let holder = conn.lock_holder(lock).await.map_err(|e| target.error(e))?;
        let now = Instant::now();
        if now >= deadline {
            return Err(StoreError::Locked { what: target.public.clone(), holder, waited: wait });
        }
        // Released since we tried: try again at once.
        let Some(holder) = holder else { continue };
        if !warned {
            tracing::warn!(
                "queue database {}: the table's lock is held by {holder}, perhaps a server that just \
                 stopped whose session the database has not ended yet; waiting up to {wait:?} for it",
                target.public
            );
            warned = true;
        }
        tokio::time::sleep(POLL.min(deadline - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Servers of different versions must agree on a table's lock.
    #[test]
    fn lock_identities_stay_the_same() {
        assert_eq!(TableLock::new("test", "gearbox_queue").mysql_name(), "gearbox:test:gearbox_queue");
        assert_eq!(TableLock::new("test", "gearbox_queue").pg_key(), -4_511_388_338_708_124_563);
        let long = TableLock::new(&"d".repeat(64), &"t".repeat(63));
        assert_eq!(long.mysql_name(), "gearbox:f9eca93a7b390f8d");
    }

    #[test]
    fn mysql_lock_names_fit() {
        assert_eq!(TableLock::new("test", "q").mysql_name(), "gearbox:test:q");
        let long = TableLock::new(&"d".repeat(64), &"t".repeat(63));
        assert!(long.mysql_name().len() <= MYSQL_LOCK_NAME_MAX);
        assert_ne!(long.mysql_name(), TableLock::new(&"d".repeat(64), &"u".repeat(63)).mysql_name());
    }

    #[test]
    fn lock_of_url() {
        let lock = TableLock::of_url("mysql://root@db:3306/jobs?table=q1").unwrap();
        assert_eq!(lock, TableLock::new("jobs", "q1"));
        // PostgreSQL folds the table name, as the store does.
        let lock = TableLock::of_url("postgres://root@db/jobs?table=Q1").unwrap();
        assert_eq!(lock.pg_key(), TableLock::new("jobs", "q1").pg_key());
        assert!(matches!(TableLock::of_url("mysql://root@db:3306"), Err(StoreError::Database(_))));
    }
}
