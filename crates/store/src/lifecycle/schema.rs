//! The lifecycle's two tables: `dead` (a row per dead job, keyed by handle) and `state` (a
//! row per paused function and per schedule that fired, keyed by kind and name).
//!
//! The dead table's indexes, `(died_at DESC, handle)` and `(function_name, died_at DESC,
//! handle)`, are in list order (newest first, then handle), so that a page of the list, and
//! retention's search for the oldest entries to go, read index entries instead of sorting the
//! set (MariaDB before 10.8 and MySQL before 8.0 ignore `DESC`, and sort).
//!
//! A server checks first that they exist and creates them only if not: on PostgreSQL every
//! DDL statement, even a `CREATE … IF NOT EXISTS` that does nothing, locks the table and
//! would make the other servers wait for this start. Servers starting together take turns
//! for the creation (PostgreSQL: an advisory lock held by the DDL's transaction; MariaDB:
//! `GET_LOCK`; SQLite: the write lock). The dead table's comment (on SQLite, the file's
//! `user_version`) records the schema version, so a later version can migrate it.

use sqlx::mysql::MySqlConnection;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, Executor};

use super::conn::{Backend, DbConn, Dialect};
use crate::{Result, StoreError};

/// The comment of the dead table, followed by the schema version.
const TAG: &str = "gearbox lifecycle, schema ";
const VERSION: i64 = 1;

/// The statements that create the tables, in order; each may run again after a start that
/// was cut short. `{t}` prefixes index names with the queue table's name.
fn ddl(backend: Backend) -> Vec<String> {
    match backend {
        Backend::Sqlite => vec![
            "CREATE TABLE IF NOT EXISTS {state} (\
               kind TEXT NOT NULL, \
               name BLOB NOT NULL, \
               value INTEGER NOT NULL, \
               claimed_by INTEGER NULL, \
               PRIMARY KEY (kind, name)) WITHOUT ROWID"
                .into(),
            "CREATE TABLE IF NOT EXISTS {dead} (\
               handle TEXT NOT NULL PRIMARY KEY, \
               function_name BLOB NOT NULL, \
               unique_key BLOB NOT NULL, \
               data BLOB NOT NULL, \
               data_len INTEGER NOT NULL, \
               priority INTEGER NOT NULL, \
               attempts INTEGER NOT NULL, \
               error_text TEXT NOT NULL, \
               died_at INTEGER NOT NULL)"
                .into(),
            "CREATE INDEX IF NOT EXISTS {t}dead_fn ON {dead} (function_name, died_at DESC, handle)".into(),
            "CREATE INDEX IF NOT EXISTS {t}dead_at ON {dead} (died_at DESC, handle)".into(),
            format!("PRAGMA user_version = {VERSION}"),
        ],
        // utf8mb4 for the texts, whatever the database's default; its default collation (not
        // `_bin`, which the driver takes for bytes).
        Backend::MySql => vec![
            "CREATE TABLE IF NOT EXISTS {state} (\
               kind VARCHAR(16) NOT NULL, \
               name VARBINARY(512) NOT NULL, \
               value BIGINT NOT NULL, \
               claimed_by BIGINT NULL, \
               PRIMARY KEY (kind, name)\
             ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
                .into(),
            format!(
                "CREATE TABLE IF NOT EXISTS {{dead}} (\
                   handle VARCHAR(100) NOT NULL PRIMARY KEY, \
                   function_name VARBINARY(512) NOT NULL, \
                   unique_key BLOB NOT NULL, \
                   data LONGBLOB NOT NULL, \
                   data_len BIGINT NOT NULL, \
                   priority SMALLINT NOT NULL, \
                   attempts BIGINT NOT NULL, \
                   error_text TEXT NOT NULL, \
                   died_at BIGINT NOT NULL, \
                   KEY {{t}}dead_fn (function_name, died_at DESC, handle), \
                   KEY {{t}}dead_at (died_at DESC, handle)\
                 ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COMMENT='{TAG}{VERSION}'"
            ),
        ],
        // Handles sort bytewise ("C"), as on the other databases, not by the locale.
        Backend::Postgres => vec![
            "CREATE TABLE IF NOT EXISTS {state} (\
               kind VARCHAR(16) NOT NULL, \
               name BYTEA NOT NULL, \
               value BIGINT NOT NULL, \
               claimed_by BIGINT NULL, \
               PRIMARY KEY (kind, name))"
                .into(),
            "CREATE TABLE IF NOT EXISTS {dead} (\
               handle VARCHAR(100) COLLATE \"C\" NOT NULL PRIMARY KEY, \
               function_name BYTEA NOT NULL, \
               unique_key BYTEA NOT NULL, \
               data BYTEA NOT NULL, \
               data_len BIGINT NOT NULL, \
               priority SMALLINT NOT NULL, \
               attempts BIGINT NOT NULL, \
               error_text TEXT NOT NULL, \
               died_at BIGINT NOT NULL)"
                .into(),
            "CREATE INDEX IF NOT EXISTS {t}dead_fn ON {dead} (function_name, died_at DESC, handle)".into(),
            "CREATE INDEX IF NOT EXISTS {t}dead_at ON {dead} (died_at DESC, handle)".into(),
            format!("COMMENT ON TABLE {{dead}} IS '{TAG}{VERSION}'"),
        ],
    }
}

/// Creates the tables, or checks that existing ones are the lifecycle's of this version.
/// `what` names the place, for errors.
pub(super) async fn ensure(d: &Dialect, c: &mut DbConn, what: &str) -> Result<()> {
    let err = |e: sqlx::Error| StoreError::Database(format!("{what}: {e}"));
    let statements: Vec<String> = ddl(d.backend).iter().map(|s| d.sql(s)).collect();
    match c {
        DbConn::Sqlite(c) => {
            if sqlite_version(c).await.map_err(err)? == VERSION {
                return Ok(());
            }
            let mut tx = c.begin_with("BEGIN IMMEDIATE").await.map_err(err)?;
            match sqlite_version(&mut tx).await.map_err(err)? {
                0 => {
                    for s in &statements {
                        tx.execute(s.as_str()).await.map_err(err)?;
                    }
                }
                VERSION => {}
                v => {
                    return Err(StoreError::Database(format!(
                        "{what}: the file's user_version is {v}: it is not gearbox lifecycle state of \
                         schema version {VERSION}"
                    )))
                }
            }
            tx.commit().await.map_err(err)
        }
        DbConn::MySql(c) => {
            if ready(&inspect_mysql(c, d).await.map_err(err)?, d, what)? {
                return Ok(());
            }
            // Lock names are server-wide, of at most 64 characters.
            let lock = format!("gb-lc:{}", d.table);
            let got: Option<i64> =
                sqlx::query_scalar("SELECT GET_LOCK(?, 30)").bind(&lock).fetch_one(&mut *c).await.map_err(err)?;
            if got != Some(1) {
                return Err(StoreError::Database(format!(
                    "{what}: another server held the lifecycle's schema lock for 30 s"
                )));
            }
            let created: Result<()> = async {
                if !ready(&inspect_mysql(c, d).await.map_err(err)?, d, what)? {
                    for s in &statements {
                        c.execute(s.as_str()).await.map_err(err)?;
                    }
                }
                Ok(())
            }
            .await;
            let unlocked = sqlx::query("DO RELEASE_LOCK(?)").bind(&lock).execute(&mut *c).await;
            created?;
            unlocked.map(drop).map_err(err)
        }
        DbConn::Postgres(c) => {
            if ready(&inspect_pg(c, d).await.map_err(err)?, d, what)? {
                return Ok(());
            }
            // DDL is transactional on PostgreSQL: the lock ends with it.
            let mut tx = c.begin().await.map_err(err)?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(format!("gearbox lifecycle {}", d.table))
                .execute(&mut *tx)
                .await
                .map_err(err)?;
            if !ready(&inspect_pg(&mut tx, d).await.map_err(err)?, d, what)? {
                for s in &statements {
                    tx.execute(s.as_str()).await.map_err(err)?;
                }
            }
            tx.commit().await.map_err(err)
        }
    }
}

/// What a database holds of the lifecycle's tables.
struct Found {
    /// How many of the tables (and on PostgreSQL, the indexes) exist.
    objects: i64,
    /// The dead table's comment; `None` if there is no such table.
    comment: Option<Option<String>>,
}

/// Whether the tables are all there; an error if the dead table is not the lifecycle's, or of
/// another schema version.
fn ready(found: &Found, d: &Dialect, what: &str) -> Result<bool> {
    if let Some(comment) = &found.comment {
        match comment.as_deref().unwrap_or_default().strip_prefix(TAG) {
            Some(v) if v == VERSION.to_string() => {}
            Some(v) => {
                return Err(StoreError::Database(format!(
                    "{what}: lifecycle schema version {v}, but this gearbox uses version {VERSION}"
                )))
            }
            None => {
                return Err(StoreError::Database(format!(
                    "{what}: the table {} exists and is not a gearbox lifecycle table",
                    d.dead
                )))
            }
        }
    }
    let wanted = if d.backend == Backend::Postgres { 4 } else { 2 };
    Ok(found.objects == wanted)
}

async fn inspect_mysql(c: &mut MySqlConnection, d: &Dialect) -> sqlx::Result<Found> {
    let objects: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN (?, ?)",
    )
    .bind(&d.dead)
    .bind(&d.state)
    .fetch_one(&mut *c)
    .await?;
    let comment: Option<String> = sqlx::query_scalar(
        "SELECT TABLE_COMMENT FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
    )
    .bind(&d.dead)
    .fetch_optional(&mut *c)
    .await?;
    Ok(Found { objects, comment: comment.map(Some) })
}

async fn inspect_pg(c: &mut PgConnection, d: &Dialect) -> sqlx::Result<Found> {
    let names = [d.dead.clone(), d.state.clone(), d.sql("{t}dead_fn"), d.sql("{t}dead_at")];
    let objects: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM unnest($1::text[]) AS n(name) WHERE to_regclass(n.name) IS NOT NULL")
            .bind(names.to_vec())
            .fetch_one(&mut *c)
            .await?;
    let comment: Option<Option<String>> = sqlx::query_scalar(
        "SELECT obj_description(oid, 'pg_class') FROM (SELECT to_regclass($1) AS oid) r WHERE oid IS NOT NULL",
    )
    .bind(&d.dead)
    .fetch_optional(&mut *c)
    .await?;
    Ok(Found { objects, comment })
}

async fn sqlite_version(c: &mut SqliteConnection) -> sqlx::Result<i64> {
    sqlx::query_scalar("PRAGMA user_version").fetch_one(c).await
}
