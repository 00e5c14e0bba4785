//! Reads the persistent queue of a gearmand (1.1) so that gearbox can take its jobs over:
//! gearmand's libsqlite3 file, or its MySQL or PostgreSQL table. Read-only.
//!
//! gearmand's queue plugins all keep `unique_key` and `function_name` (text), `priority`
//! (0 high, 1 normal, 2 low), `data` (a blob) and `when_to_run` (Unix seconds, 0 for "now";
//! tables from before gearmand 1.0 lack it, and their jobs read as 0). The default table is
//! gearmand's own: `gearman_queue` for libsqlite3 and MySQL, `queue` for PostgreSQL. gearmand
//! keeps no order: jobs come in table order, which for SQLite is the order they were added.

use std::path::Path;

use futures_util::TryStreamExt;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Row};

use crate::sql_conn::{self, Conn, Kind, Target};
use crate::{Result, StoreError};

/// A background job as gearmand stored it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GearmandJob {
    pub function: Vec<u8>,
    pub unique: Vec<u8>,
    /// 0 high, 1 normal, 2 low.
    pub priority: u8,
    pub data: Vec<u8>,
    /// Unix time (seconds) before which the job must not run; 0 for "now".
    pub when_to_run: i64,
}

const SQLITE_TABLE: &str = "gearman_queue";

/// Calls `each` for every job in gearmand's queue at `source`: a libsqlite3 file's path, or a
/// `mysql://` / `postgres://` URL with an optional `table=NAME`. Returns the number of jobs.
pub fn import_gearmand(source: &str, each: &mut dyn FnMut(GearmandJob)) -> Result<usize> {
    let rt = sql_conn::runtime()?;
    rt.block_on(async {
        match Kind::of_url(source) {
            Some(kind) => {
                let default_table = match kind {
                    Kind::MySql => "gearman_queue",
                    Kind::Postgres => "queue",
                };
                let target = Target::parse(source, default_table)?;
                let conn = target.connect().await.map_err(|e| target.error(e))?;
                from_database(conn, &target, each).await.map_err(|e| target.error(e))
            }
            None => from_sqlite(Path::new(source), each).await,
        }
    })
}

/// The SELECT for gearmand's table: function, unique, priority, data, when_to_run, with the
/// text columns read as their stored bytes.
fn select_sql(kind: Option<Kind>, table: &str, has_when: bool) -> String {
    let when = if has_when { "when_to_run" } else { "0" };
    match kind {
        Some(Kind::MySql) => format!(
            "SELECT CAST(function_name AS BINARY), CAST(unique_key AS BINARY), CAST(priority AS SIGNED), \
             data, CAST(COALESCE({when}, 0) AS SIGNED) FROM {table}"
        ),
        Some(Kind::Postgres) => format!(
            "SELECT convert_to(function_name, getdatabaseencoding()), convert_to(unique_key, getdatabaseencoding()), \
             priority::bigint, data, COALESCE({when}, 0)::bigint FROM {table}"
        ),
        None => format!(
            "SELECT CAST(function_name AS BLOB), CAST(unique_key AS BLOB), priority, CAST(data AS BLOB), \
             COALESCE({when}, 0) FROM {table} ORDER BY rowid"
        ),
    }
}

async fn from_database(conn: Conn, target: &Target, each: &mut dyn FnMut(GearmandJob)) -> sqlx::Result<usize> {
    let table = &target.table;
    match conn {
        Conn::MySql(mut c) => {
            let has_when: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = 'when_to_run'",
            )
            .bind(table)
            .fetch_one(&mut c)
            .await?;
            read_jobs(&mut c, &select_sql(Some(Kind::MySql), table, has_when > 0), each).await
        }
        Conn::Postgres(mut c) => {
            let has_when: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_attribute \
                 WHERE attrelid = to_regclass($1) AND attname = 'when_to_run' AND NOT attisdropped",
            )
            .bind(table)
            .fetch_one(&mut c)
            .await?;
            read_jobs(&mut c, &select_sql(Some(Kind::Postgres), table, has_when > 0), each).await
        }
    }
}

async fn from_sqlite(path: &Path, each: &mut dyn FnMut(GearmandJob)) -> Result<usize> {
    let context = || format!("gearmand queue {}", path.display());
    std::fs::metadata(path).map_err(|e| StoreError::io(context(), e))?;
    let error = |e: sqlx::Error| StoreError::Database(format!("{}: {e}", context()));
    let mut c = SqliteConnectOptions::new().filename(path).read_only(true).connect().await.map_err(error)?;
    let has_when: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pragma_table_info(?) WHERE name = 'when_to_run'")
        .bind(SQLITE_TABLE)
        .fetch_one(&mut c)
        .await
        .map_err(error)?;
    read_jobs(&mut c, &select_sql(None, SQLITE_TABLE, has_when > 0), each).await.map_err(error)
}

async fn read_jobs<'c, DB, E>(exec: E, sql: &'c str, each: &mut dyn FnMut(GearmandJob)) -> sqlx::Result<usize>
where
    DB: sqlx::Database,
    E: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'r> Vec<u8>: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    for<'r> i64: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let mut rows = sqlx::query::<DB>(sql).fetch(exec);
    let mut count = 0;
    while let Some(row) = rows.try_next().await? {
        let text = |i: usize| row.try_get::<Option<Vec<u8>>, _>(i).map(Option::unwrap_or_default);
        let unique = text(1)?;
        let priority: i64 = row.try_get(2)?;
        let priority = u8::try_from(priority).ok().filter(|&p| p <= 2).ok_or_else(|| {
            sqlx::Error::Decode(format!("job {:?} has priority {priority}", String::from_utf8_lossy(&unique)).into())
        })?;
        each(GearmandJob { function: text(0)?, unique, priority, data: text(3)?, when_to_run: row.try_get(4)? });
        count += 1;
    }
    Ok(count)
}
