//! The connection to the lifecycle's database (SQLite, MariaDB/MySQL or PostgreSQL), the SQL
//! dialect of each, and the loop that runs an operation: on MariaDB/PostgreSQL a lost
//! connection is made again and the operation retried, with backoff, for up to ten seconds.

use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::mysql::{MySqlConnection, MySqlRow};
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteRow, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection};
use tokio::runtime::Runtime;

use super::{schema, LifecycleTarget};
use crate::sql_conn::{is_connection_error, runtime, Conn, Target};
use crate::{Result, StoreError};

/// The longest `table` of a URL: the lifecycle's names (`{table}_state`, `{table}_dead_fn`)
/// must fit the databases' 63 characters.
pub const MAX_TABLE: usize = 55;
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How long an operation keeps retrying once it lost the connection.
const RETRY_FOR: Duration = Duration::from_secs(10);
/// Bounds one attempt on MariaDB/PostgreSQL, so that a database that stops answering fails
/// the operation instead of hanging it until TCP gives up.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an SQLite statement waits for another connection's write transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Backend {
    Sqlite,
    MySql,
    Postgres,
}

/// A connection to any of the three databases.
pub(super) enum DbConn {
    Sqlite(SqliteConnection),
    MySql(MySqlConnection),
    Postgres(PgConnection),
}

/// A transaction on any of the three databases.
pub(super) enum Tx<'c> {
    Sqlite(sqlx::Transaction<'c, sqlx::Sqlite>),
    MySql(sqlx::Transaction<'c, sqlx::MySql>),
    Postgres(sqlx::Transaction<'c, sqlx::Postgres>),
}

/// Runs `$body` with `$c` bound to the backend's value inside `$enum` (a [`DbConn`] or [`Tx`])
/// and `$db` naming its database type: the same code, compiled once per backend (as
/// `sql_conn::per_backend!` does for the two network databases).
macro_rules! per_db {
    ($enum:ident, $value:expr, $c:ident, $db:ident => $body:expr) => {
        match $value {
            $enum::Sqlite($c) => {
                #[allow(dead_code)]
                type $db = sqlx::Sqlite;
                $body
            }
            $enum::MySql($c) => {
                #[allow(dead_code)]
                type $db = sqlx::MySql;
                $body
            }
            $enum::Postgres($c) => {
                #[allow(dead_code)]
                type $db = sqlx::Postgres;
                $body
            }
        }
    };
}

impl DbConn {
    /// Begins a write transaction. On SQLite it takes the write lock at once (`BEGIN
    /// IMMEDIATE`), waiting for other writers: a transaction that read first and then
    /// wanted to write would fail at once if another connection wrote in between.
    pub(super) async fn begin_write(&mut self) -> sqlx::Result<Tx<'_>> {
        Ok(match self {
            DbConn::Sqlite(c) => Tx::Sqlite(c.begin_with("BEGIN IMMEDIATE").await?),
            DbConn::MySql(c) => Tx::MySql(c.begin().await?),
            DbConn::Postgres(c) => Tx::Postgres(c.begin().await?),
        })
    }

    async fn close(self) -> sqlx::Result<()> {
        per_db!(DbConn, self, c, _DB => c.close().await)
    }
}

impl Tx<'_> {
    pub(super) async fn commit(self) -> sqlx::Result<()> {
        per_db!(Tx, self, t, _DB => t.commit().await)
    }

    /// Runs statements in the transaction.
    pub(super) fn ex(&mut self) -> Ex<'_> {
        match self {
            Tx::Sqlite(t) => Ex::Sqlite(t),
            Tx::MySql(t) => Ex::MySql(t),
            Tx::Postgres(t) => Ex::Postgres(t),
        }
    }
}

impl DbConn {
    /// Runs statements on the connection, each a transaction of its own.
    pub(super) fn ex(&mut self) -> Ex<'_> {
        match self {
            DbConn::Sqlite(c) => Ex::Sqlite(c),
            DbConn::MySql(c) => Ex::MySql(c),
            DbConn::Postgres(c) => Ex::Postgres(c),
        }
    }
}

/// A bound value of a statement.
#[derive(Clone, Copy, Debug)]
pub(super) enum Arg<'a> {
    Int(i64),
    Text(&'a str),
    Bytes(&'a [u8]),
}

/// Where statements run: a connection, or a transaction on it.
pub(super) enum Ex<'a> {
    Sqlite(&'a mut SqliteConnection),
    MySql(&'a mut MySqlConnection),
    Postgres(&'a mut PgConnection),
}

/// A row type every backend decodes (a tuple of `i64`, `i16`, `String`, `Vec<u8>`…).
pub(super) trait FromAnyRow:
    for<'r> sqlx::FromRow<'r, SqliteRow>
    + for<'r> sqlx::FromRow<'r, MySqlRow>
    + for<'r> sqlx::FromRow<'r, PgRow>
    + Send
    + Unpin
{
}

impl<T> FromAnyRow for T where
    T: for<'r> sqlx::FromRow<'r, SqliteRow>
        + for<'r> sqlx::FromRow<'r, MySqlRow>
        + for<'r> sqlx::FromRow<'r, PgRow>
        + Send
        + Unpin
{
}

/// Binds `$args` (a slice of [`Arg`]) to the query `$q`.
macro_rules! bind_args {
    ($q:expr, $args:expr) => {{
        let mut q = $q;
        for arg in $args {
            q = match *arg {
                Arg::Int(v) => q.bind(v),
                Arg::Text(v) => q.bind(v),
                Arg::Bytes(v) => q.bind(v),
            };
        }
        q
    }};
}

impl Ex<'_> {
    /// Runs a statement; returns the rows it affected (on MariaDB, that an UPDATE matched).
    pub(super) async fn exec(&mut self, sql: &str, args: &[Arg<'_>]) -> sqlx::Result<u64> {
        self.exec_sized(sql, args, true).await
    }

    /// [`Ex::exec`], for statements of many sizes: those that recur (`keep`) stay prepared
    /// on the connection, the others are prepared for this once.
    pub(super) async fn exec_sized(&mut self, sql: &str, args: &[Arg<'_>], keep: bool) -> sqlx::Result<u64> {
        per_db!(Ex, self, c, DB => {
            let q = bind_args!(sqlx::query::<DB>(sql).persistent(keep), args);
            q.execute(&mut **c).await.map(|r| r.rows_affected())
        })
    }

    pub(super) async fn rows<T: FromAnyRow>(&mut self, sql: &str, args: &[Arg<'_>]) -> sqlx::Result<Vec<T>> {
        per_db!(Ex, self, c, DB => bind_args!(sqlx::query_as::<DB, T>(sql), args).fetch_all(&mut **c).await)
    }

    pub(super) async fn row<T: FromAnyRow>(&mut self, sql: &str, args: &[Arg<'_>]) -> sqlx::Result<Option<T>> {
        per_db!(Ex, self, c, DB => bind_args!(sqlx::query_as::<DB, T>(sql), args).fetch_optional(&mut **c).await)
    }
}

/// Table names, and the SQL of one backend.
pub(super) struct Dialect {
    pub(super) backend: Backend,
    /// The URL's table (the queue's), which the lifecycle's table and index names extend;
    /// empty on SQLite.
    pub(super) table: String,
    pub(super) dead: String,
    pub(super) state: String,
}

impl Dialect {
    fn new(backend: Backend, table: &str) -> Dialect {
        let name = |suffix: &str| if table.is_empty() { suffix.to_string() } else { format!("{table}_{suffix}") };
        Dialect { backend, table: table.to_string(), dead: name("dead"), state: name("state") }
    }

    /// `sql` with `{dead}`, `{state}` and `{t}` (the prefix of index names) replaced, written
    /// with `?` placeholders and turned into `$1, $2, …` for PostgreSQL.
    pub(super) fn sql(&self, sql: &str) -> String {
        let prefix = if self.table.is_empty() { String::new() } else { format!("{}_", self.table) };
        let sql = sql.replace("{dead}", &self.dead).replace("{state}", &self.state).replace("{t}", &prefix);
        if self.backend != Backend::Postgres {
            return sql;
        }
        let mut out = String::with_capacity(sql.len() + 16);
        let mut n = 0;
        for ch in sql.chars() {
            if ch == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(ch);
            }
        }
        out
    }
}

/// What an operation does in one attempt, on a connection (in a transaction of its own if it
/// writes more than one statement). It is run again after a lost connection, so it must be
/// safe to repeat; `again` tells that an earlier attempt was cut off.
pub(super) trait Op {
    type Out;
    async fn attempt(&mut self, d: &Dialect, c: &mut DbConn, again: bool) -> sqlx::Result<Self::Out>;
}

impl<O: Op> Op for &mut O {
    type Out = O::Out;

    async fn attempt(&mut self, d: &Dialect, c: &mut DbConn, again: bool) -> sqlx::Result<O::Out> {
        (**self).attempt(d, c, again).await
    }
}

enum Place {
    /// Never connected again: an in-memory database would be empty, and a file's connection
    /// does not get lost.
    Sqlite(SqliteConnectOptions),
    Remote(Target),
}

struct Db {
    place: Place,
    dialect: Dialect,
    /// None after the connection was lost, until the next operation connects.
    conn: Option<DbConn>,
}

impl Db {
    async fn connect(&self) -> sqlx::Result<DbConn> {
        match &self.place {
            Place::Sqlite(options) => Ok(DbConn::Sqlite(options.connect().await?)),
            Place::Remote(target) => Ok(match target.connect().await? {
                Conn::MySql(c) => DbConn::MySql(c),
                Conn::Postgres(c) => DbConn::Postgres(c),
            }),
        }
    }

    /// The connection, made (again) if needed.
    async fn connection(&mut self) -> sqlx::Result<(&Dialect, &mut DbConn)> {
        if self.conn.is_none() {
            let conn = self.connect().await?;
            self.conn = Some(conn);
        }
        Ok((&self.dialect, self.conn.as_mut().expect("connected above")))
    }

    fn reconnects(&self) -> bool {
        matches!(self.place, Place::Remote(_))
    }
}

struct Inner {
    /// Taken only by `Drop`.
    rt: Option<Runtime>,
    db: Db,
}

/// The [`super::Lifecycle`] on any of the three databases.
pub(super) struct SqlLifecycle {
    what: String,
    inner: Mutex<Inner>,
}

impl SqlLifecycle {
    pub(super) fn open(target: LifecycleTarget) -> Result<SqlLifecycle> {
        let (place, dialect, what) = match target {
            LifecycleTarget::Memory => {
                let options = SqliteConnectOptions::from_str("sqlite::memory:")
                    .map_err(|e| StoreError::Database(format!("in-memory SQLite: {e}")))?;
                (Place::Sqlite(options), Dialect::new(Backend::Sqlite, ""), "in-memory lifecycle state".to_string())
            }
            LifecycleTarget::File(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
                }
                let options = SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(BUSY_TIMEOUT);
                let what = format!("lifecycle state in {}", path.display());
                (Place::Sqlite(options), Dialect::new(Backend::Sqlite, ""), what)
            }
            LifecycleTarget::Url(url) => {
                let target = Target::parse(&url, crate::sql::DEFAULT_TABLE)?;
                let t = target.table.clone();
                if t.len() > MAX_TABLE {
                    return Err(StoreError::Database(format!(
                        "{}: the lifecycle's tables need a table name of at most {MAX_TABLE} characters",
                        target.public
                    )));
                }
                let base = target.public.strip_suffix(&format!(" table {t}")).unwrap_or(&target.public);
                let what = format!("{base} tables {t}_dead, {t}_state");
                let backend = match target.kind {
                    crate::sql_conn::Kind::MySql => Backend::MySql,
                    crate::sql_conn::Kind::Postgres => Backend::Postgres,
                };
                (Place::Remote(target), Dialect::new(backend, &t), what)
            }
        };
        let rt = runtime()?;
        let mut db = Db { place, dialect, conn: None };
        rt.block_on(async {
            let (dialect, conn) = db.connection().await.map_err(|e| database(&what, e))?;
            schema::ensure(dialect, conn, &what).await
        })?;
        Ok(SqlLifecycle { what, inner: Mutex::new(Inner { rt: Some(rt), db }) })
    }

    pub(super) fn what(&self) -> &str {
        &self.what
    }

    /// Runs `op`, retrying it after a lost connection or a deadlock (MariaDB/PostgreSQL) for
    /// up to [`RETRY_FOR`].
    pub(super) fn run<O: Op>(&self, op: O) -> Result<O::Out> {
        self.run_with(op, false)
    }

    /// Runs `op` as if an earlier attempt had been cut off.
    #[cfg(test)]
    pub(super) fn run_as_retry<O: Op>(&self, op: O) -> Result<O::Out> {
        self.run_with(op, true)
    }

    fn run_with<O: Op>(&self, mut op: O, mut again: bool) -> Result<O::Out> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Inner { rt, db } = &mut *inner;
        let rt = rt.as_ref().expect("the runtime lives until drop");
        let started = Instant::now();
        let mut delay = RETRY_FIRST;
        loop {
            let remote = db.reconnects();
            let outcome = rt.block_on(async {
                let attempt = async {
                    let (dialect, conn) = db.connection().await?;
                    op.attempt(dialect, conn, again).await
                };
                if remote {
                    tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await.ok()
                } else {
                    Some(attempt.await)
                }
            });
            let (error, lost) = match outcome {
                Some(Ok(out)) => return Ok(out),
                Some(Err(e)) if remote && is_connection_error(&e) => (e.to_string(), true),
                // Rolled back, on a connection that is fine.
                Some(Err(e)) if remote && is_deadlock(&e) => (e.to_string(), false),
                Some(Err(e)) => return Err(database(&self.what, e)),
                None => (format!("no answer in {ATTEMPT_TIMEOUT:?}"), true),
            };
            if lost {
                db.conn = None;
            }
            if started.elapsed() + delay >= RETRY_FOR {
                let what = if lost { "connection lost" } else { "deadlocked" };
                return Err(StoreError::Database(format!(
                    "{}: {what}, gave up after {RETRY_FOR:?}: {error}",
                    self.what
                )));
            }
            tracing::warn!("lifecycle database {}: {error}; retrying in {delay:?}", self.what);
            std::thread::sleep(delay);
            delay = (delay * 2).min(RETRY_MAX);
            again = true;
        }
    }
}

/// Whether the database rolled the transaction back to break a deadlock (or a serialization
/// conflict): MariaDB's 1213 and PostgreSQL's `40P01` (`40001` on both).
fn is_deadlock(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.code().is_some_and(|c| c == "40001" || c == "40P01"),
        _ => false,
    }
}

fn database(what: &str, e: sqlx::Error) -> StoreError {
    StoreError::Database(format!("{what}: {e}"))
}

impl Drop for Inner {
    fn drop(&mut self) {
        let Some(rt) = self.rt.take() else { return };
        let conn = self.db.conn.take();
        // The server may drop its last handle inside an async task, where blocking on (or
        // dropping) a runtime panics: close the connection on a thread of its own.
        let close = move || {
            if let Some(conn) = conn {
                let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), conn.close()).await });
            }
            drop(rt);
        };
        if let Ok(closer) = std::thread::Builder::new().name("lifecycle-close".into()).spawn(close) {
            let _ = closer.join();
        }
    }
}
