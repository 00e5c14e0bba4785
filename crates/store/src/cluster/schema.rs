//! A cluster's tables: the queue (a row per background job, with the node that owns it),
//! its nodes (an incarnation per server start; a row that never changes, which every write of
//! the node locks in share mode and a takeover deletes first) and their leases (renewed, and
//! so apart from the node row: a renewal never waits for the node's own writes). Created by
//! the first node; later nodes check the queue table's comment, as the single-server store
//! does.

use sqlx::Executor;

use crate::sql_conn::{per_backend, Conn, Kind, Target};
use crate::{Result, StoreError};

/// The table comment that marks a cluster queue, followed by the schema version.
pub(crate) const CLUSTER_TAG: &str = "gearbox cluster queue, schema ";
const CLUSTER_VERSION: u32 = 1;

fn queue_ddl(kind: Kind, t: &str) -> Vec<String> {
    match kind {
        Kind::MySql => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (\
                   seq BIGINT NOT NULL PRIMARY KEY, \
                   priority SMALLINT NOT NULL, \
                   run_at BIGINT NOT NULL, \
                   function_name VARBINARY(512) NOT NULL, \
                   unique_key VARBINARY(255) NULL, \
                   data LONGBLOB NOT NULL, \
                   owner BIGINT NULL, \
                   attempts INT NOT NULL DEFAULT 0, \
                   running SMALLINT NOT NULL DEFAULT 0, \
                   numerator BIGINT NOT NULL DEFAULT 0, \
                   denominator BIGINT NOT NULL DEFAULT 0, \
                   created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), \
                   KEY {t}_claim (owner, function_name, priority, created_at, seq), \
                   UNIQUE KEY {t}_unique (unique_key, function_name)\
                 ) ENGINE=InnoDB COMMENT='{CLUSTER_TAG}{CLUSTER_VERSION}'"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {t}_nodes (\
                   id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, \
                   address VARCHAR(255) NOT NULL, \
                   started_at DATETIME(6) NOT NULL\
                 ) ENGINE=InnoDB"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {t}_leases (\
                   id BIGINT NOT NULL PRIMARY KEY, \
                   renewed_at DATETIME(6) NOT NULL, \
                   lease_until DATETIME(6) NOT NULL, \
                   info LONGTEXT NOT NULL\
                 ) ENGINE=InnoDB"
            ),
        ],
        Kind::Postgres => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (\
                   seq BIGINT NOT NULL PRIMARY KEY, \
                   priority SMALLINT NOT NULL, \
                   run_at BIGINT NOT NULL, \
                   function_name BYTEA NOT NULL, \
                   unique_key BYTEA NULL, \
                   data BYTEA NOT NULL, \
                   owner BIGINT NULL, \
                   attempts INT NOT NULL DEFAULT 0, \
                   running SMALLINT NOT NULL DEFAULT 0, \
                   numerator BIGINT NOT NULL DEFAULT 0, \
                   denominator BIGINT NOT NULL DEFAULT 0, \
                   created_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            ),
            // Partial: PostgreSQL orders by an index's columns only after equalities, and
            // `owner IS NULL` is none, so a claim would sort every unowned job.
            format!(
                "CREATE INDEX IF NOT EXISTS {t}_claim ON {t} (function_name, priority, created_at, seq) \
                 WHERE owner IS NULL"
            ),
            format!("CREATE INDEX IF NOT EXISTS {t}_owner ON {t} (owner)"),
            format!("CREATE UNIQUE INDEX IF NOT EXISTS {t}_unique ON {t} (unique_key, function_name)"),
            format!(
                "CREATE TABLE IF NOT EXISTS {t}_nodes (\
                   id BIGSERIAL PRIMARY KEY, \
                   address TEXT NOT NULL, \
                   started_at TIMESTAMPTZ NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {t}_leases (\
                   id BIGINT PRIMARY KEY, \
                   renewed_at TIMESTAMPTZ NOT NULL, \
                   lease_until TIMESTAMPTZ NOT NULL, \
                   info TEXT NOT NULL)"
            ),
            format!("COMMENT ON TABLE {t} IS '{CLUSTER_TAG}{CLUSTER_VERSION}'"),
        ],
    }
}

/// Creates the cluster's tables, or checks that existing ones are a cluster queue of this
/// schema version. Nodes starting together take turns (a lock held for the DDL only).
pub(crate) async fn ensure_cluster_schema(conn: &mut Conn, target: &Target) -> Result<()> {
    let err = |e| target.error(e);
    let lock = format!("gearbox schema {}", target.table);
    match conn {
        Conn::MySql(c) => {
            let got: Option<i64> =
                sqlx::query_scalar("SELECT GET_LOCK(?, 30)").bind(&lock).fetch_one(&mut *c).await.map_err(err)?;
            if got != Some(1) {
                return Err(StoreError::Database(format!(
                    "{}: another node held the schema lock for 30 s",
                    target.public
                )));
            }
        }
        Conn::Postgres(c) => {
            sqlx::query("SELECT pg_advisory_lock(hashtext($1))").bind(&lock).execute(&mut *c).await.map_err(err)?;
        }
    }
    let outcome = create_or_check(conn, target).await;
    let unlocked = match conn {
        Conn::MySql(c) => sqlx::query("DO RELEASE_LOCK(?)").bind(&lock).execute(c).await.map(drop),
        Conn::Postgres(c) => {
            sqlx::query("SELECT pg_advisory_unlock(hashtext($1))").bind(&lock).execute(c).await.map(drop)
        }
    };
    outcome?;
    unlocked.map_err(err)
}

async fn create_or_check(conn: &mut Conn, target: &Target) -> Result<()> {
    if let Some(comment) = conn.table_comment(target).await? {
        let comment = comment.unwrap_or_default();
        if let Some(version) = comment.strip_prefix(CLUSTER_TAG) {
            if version.parse::<u32>() != Ok(CLUSTER_VERSION) {
                return Err(StoreError::Database(format!(
                    "{}: cluster schema {version}, but this gearbox uses version {CLUSTER_VERSION}",
                    target.public
                )));
            }
        } else {
            let what = if comment.starts_with(crate::sql_conn::SCHEMA_TAG) {
                "a single-server gearbox queue: give the cluster a table of its own (?table=NAME), \
                 or start this server without --cluster"
            } else {
                "not a gearbox queue"
            };
            return Err(StoreError::Database(format!("{}: the table exists and is {what}", target.public)));
        }
    }
    if complete(conn, target).await? {
        // Nothing to create: DDL would lock the queue table (PostgreSQL's CREATE INDEX IF NOT
        // EXISTS and COMMENT do) and make every node's writes wait for this start.
        return Ok(());
    }
    // Every statement is IF NOT EXISTS: a start cut short between them is completed. On
    // PostgreSQL the statements of one simple query run in one transaction.
    let ddl = queue_ddl(conn.kind(), &target.table);
    let ddl = if conn.kind() == Kind::Postgres { vec![ddl.join("; ")] } else { ddl };
    for ddl in ddl {
        per_backend!(Conn, &mut *conn, c, _DB => c.execute(ddl.as_str()).await.map(drop))
            .map_err(|e| target.error(e))?;
    }
    Ok(())
}

/// Whether the cluster's tables (and, on PostgreSQL, its indexes) all exist.
async fn complete(conn: &mut Conn, target: &Target) -> Result<bool> {
    let t = &target.table;
    let found: sqlx::Result<i64> = match conn {
        Conn::MySql(c) => {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() \
                 AND TABLE_NAME IN (?, ?, ?)",
            )
            .bind(t)
            .bind(format!("{t}_nodes"))
            .bind(format!("{t}_leases"))
            .fetch_one(c)
            .await
        }
        Conn::Postgres(c) => {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM unnest($1::text[]) AS n(name) WHERE to_regclass(n.name) IS NOT NULL",
            )
            .bind(
                ["", "_nodes", "_leases", "_claim", "_owner", "_unique"].map(|suffix| format!("{t}{suffix}")).to_vec(),
            )
            .fetch_one(c)
            .await
        }
    };
    let wanted = if conn.kind() == Kind::Postgres { 6 } else { 3 };
    Ok(found.map_err(|e| target.error(e))? == wanted)
}
