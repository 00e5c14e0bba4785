//! Connections to MariaDB/MySQL and PostgreSQL for the queue stores and the gearmand import:
//! the URL (`Target`), a connection to either backend (`Conn`, and `per_backend!` to write
//! code once for both), the queue table's schema, and which errors mean a lost connection.

use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlDatabaseError};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, Executor};
use tokio::runtime::Runtime;
use url::Url;

use crate::sql_plan::ROW_OVERHEAD;
use crate::{Result, StoreError};

/// 2 added `attempts` (a retried job's attempts so far).
const SCHEMA_VERSION: u32 = 2;
/// The table comment that marks a gearbox queue table, followed by the schema version.
pub(crate) const SCHEMA_TAG: &str = "gearbox queue, schema ";
/// Payload bytes per INSERT on PostgreSQL; on MySQL, half its `max_allowed_packet`.
const PG_STATEMENT_BYTES: usize = 16 << 20;

pub(crate) fn runtime() -> Result<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StoreError::io("starting the database client runtime", e))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    MySql,
    Postgres,
}

impl Kind {
    /// The backend a URL names by its scheme, if it is a database URL.
    pub(crate) fn of_url(url: &str) -> Option<Kind> {
        let (scheme, _) = url.split_once("://")?;
        match scheme.to_ascii_lowercase().as_str() {
            "mysql" | "mariadb" => Some(Kind::MySql),
            "postgres" | "postgresql" => Some(Kind::Postgres),
            _ => None,
        }
    }
}

/// A database URL, split into what the driver connects with and the table.
pub(crate) struct Target {
    pub(crate) kind: Kind,
    /// The URL less the `table` parameter.
    pub(crate) url: Url,
    /// Validated: `[A-Za-z0-9_]+`, so it can be spliced into SQL. Lowercase on PostgreSQL,
    /// which folds unquoted names.
    pub(crate) table: String,
    /// The URL without password or parameters, and the table: for logs and errors.
    pub(crate) public: String,
}

impl Target {
    pub(crate) fn parse(url: &str, default_table: &str) -> Result<Target> {
        let bad = |why: &str| StoreError::Database(format!("bad database URL: {why}"));
        let kind =
            Kind::of_url(url).ok_or_else(|| bad("use mysql://USER@HOST:PORT/DB or postgres://USER@HOST:PORT/DB"))?;
        let mut url = Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        let mut table = None;
        let rest: Vec<(String, String)> = url
            .query_pairs()
            .filter_map(|(k, v)| {
                if k == "table" {
                    table = Some(v.into_owned());
                    None
                } else {
                    Some((k.into_owned(), v.into_owned()))
                }
            })
            .collect();
        if rest.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(&rest);
        }
        if kind == Kind::MySql && url.scheme() != "mysql" {
            url.set_scheme("mysql").map_err(|()| bad("cannot use it as a mysql:// URL"))?;
        }
        let table = table.unwrap_or_else(|| default_table.to_string());
        if table.is_empty() || table.len() > 63 || !table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(bad(&format!("table {table:?}: use 1 to 63 letters, digits and underscores")));
        }
        let table = if kind == Kind::Postgres { table.to_ascii_lowercase() } else { table };
        let mut shown = url.clone();
        // Fails only for URLs that cannot have a password, which then has none to hide.
        let _ = shown.set_password(None);
        shown.set_query(None);
        let public = format!("{shown} table {table}");
        Ok(Target { kind, url, table, public })
    }

    pub(crate) async fn connect(&self) -> sqlx::Result<Conn> {
        Ok(match self.kind {
            Kind::MySql => Conn::MySql(MySqlConnectOptions::from_url(&self.url)?.connect().await?),
            Kind::Postgres => {
                let mut options = PgConnectOptions::from_url(&self.url)?;
                // Names our sessions in pg_stat_activity, e.g. as a lock's holder.
                if options.get_application_name().is_none() {
                    options = options.application_name("gearbox");
                }
                Conn::Postgres(options.connect().await?)
            }
        })
    }

    pub(crate) fn error(&self, e: sqlx::Error) -> StoreError {
        StoreError::Database(format!("{}: {e}", self.public))
    }
}

pub(crate) enum Conn {
    MySql(MySqlConnection),
    Postgres(PgConnection),
}

/// Runs `$body` with `$c` bound to the backend's value inside `$enum` (a [`Conn`] or [`Tx`])
/// and `$db` naming its database type: the same code, compiled once per backend.
macro_rules! per_backend {
    ($enum:ident, $value:expr, $c:ident, $db:ident => $body:expr) => {
        match $value {
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
pub(crate) use per_backend;

impl Conn {
    pub(crate) async fn database(&mut self) -> sqlx::Result<Option<String>> {
        match self {
            Conn::MySql(c) => sqlx::query_scalar("SELECT DATABASE()").fetch_one(c).await,
            Conn::Postgres(c) => sqlx::query_scalar("SELECT current_database()").fetch_one(c).await,
        }
    }

    pub(crate) async fn close(self) -> sqlx::Result<()> {
        per_backend!(Conn, self, c, _DB => c.close().await)
    }

    /// The comment of the table `target` names: `None` if there is no such table.
    pub(crate) async fn table_comment(&mut self, target: &Target) -> Result<Option<Option<String>>> {
        let t = &target.table;
        match self {
            Conn::MySql(c) => sqlx::query_scalar(
                "SELECT TABLE_COMMENT FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
            )
            .bind(t)
            .fetch_optional(c)
            .await
            .map_err(|e| target.error(e)),
            Conn::Postgres(c) => sqlx::query_scalar(
                "SELECT obj_description(oid, 'pg_class') FROM (SELECT to_regclass($1) AS oid) r \
                 WHERE oid IS NOT NULL",
            )
            .bind(t)
            .fetch_optional(c)
            .await
            .map_err(|e| target.error(e)),
        }
    }

    /// Creates the queue table, or checks that an existing one is a gearbox queue of this
    /// schema version.
    pub(crate) async fn ensure_schema(&mut self, target: &Target) -> Result<()> {
        let t = &target.table;
        let comment = self.table_comment(target).await?;
        if let Some(comment) = comment {
            let version =
                comment.as_deref().and_then(|c| c.strip_prefix(SCHEMA_TAG)).and_then(|v| v.parse::<u32>().ok());
            // A later schema version migrates older tables here.
            return match version {
                Some(SCHEMA_VERSION) => Ok(()),
                Some(1) => self.add_attempts(target).await,
                Some(v) => Err(StoreError::Database(format!(
                    "{}: schema version {v}, but this gearbox uses version {SCHEMA_VERSION}",
                    target.public
                ))),
                None if comment.as_deref().is_some_and(|c| c.starts_with(crate::cluster::CLUSTER_TAG)) => {
                    Err(StoreError::Database(format!(
                        "{}: the table is a cluster's queue; start this server with --cluster",
                        target.public
                    )))
                }
                None => {
                    Err(StoreError::Database(format!("{}: the table exists and is not a gearbox queue", target.public)))
                }
            };
        }
        let ddl = match self.kind() {
            Kind::MySql => format!(
                "CREATE TABLE IF NOT EXISTS {t} (\
                   seq BIGINT NOT NULL PRIMARY KEY, \
                   priority SMALLINT NOT NULL, \
                   run_at BIGINT NOT NULL, \
                   function_name BLOB NOT NULL, \
                   unique_key BLOB NOT NULL, \
                   data LONGBLOB NOT NULL, \
                   created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), \
                   attempts INT NOT NULL DEFAULT 0\
                 ) ENGINE=InnoDB COMMENT='{SCHEMA_TAG}{SCHEMA_VERSION}'"
            ),
            Kind::Postgres => format!(
                "CREATE TABLE IF NOT EXISTS {t} (\
                   seq BIGINT NOT NULL PRIMARY KEY, \
                   priority SMALLINT NOT NULL, \
                   run_at BIGINT NOT NULL, \
                   function_name BYTEA NOT NULL, \
                   unique_key BYTEA NOT NULL, \
                   data BYTEA NOT NULL, \
                   created_at TIMESTAMPTZ NOT NULL DEFAULT now(), \
                   attempts INT NOT NULL DEFAULT 0\
                 ); \
                 COMMENT ON TABLE {t} IS '{SCHEMA_TAG}{SCHEMA_VERSION}'"
            ),
        };
        // PostgreSQL runs the two statements of one simple query in one transaction.
        per_backend!(Conn, self, c, _DB => c.execute(ddl.as_str()).await.map(drop)).map_err(|e| target.error(e))?;
        Ok(())
    }

    /// Migrates a schema 1 table (the caller holds the table's lock): adds `attempts`.
    async fn add_attempts(&mut self, target: &Target) -> Result<()> {
        let t = &target.table;
        let ddl = match self.kind() {
            Kind::MySql => format!(
                "ALTER TABLE {t} ADD COLUMN attempts INT NOT NULL DEFAULT 0, COMMENT='{SCHEMA_TAG}{SCHEMA_VERSION}'"
            ),
            Kind::Postgres => format!(
                "ALTER TABLE {t} ADD COLUMN attempts INT NOT NULL DEFAULT 0; \
                 COMMENT ON TABLE {t} IS '{SCHEMA_TAG}{SCHEMA_VERSION}'"
            ),
        };
        per_backend!(Conn, self, c, _DB => c.execute(ddl.as_str()).await.map(drop)).map_err(|e| target.error(e))?;
        tracing::info!("queue database {}: table migrated to schema {SCHEMA_VERSION} (attempts)", target.public);
        Ok(())
    }

    /// Payload bytes per INSERT, and the largest job the database accepts.
    pub(crate) async fn limits(&mut self) -> sqlx::Result<(usize, usize)> {
        match self {
            Conn::MySql(c) => {
                let packet: i64 =
                    sqlx::query_scalar("SELECT CAST(@@max_allowed_packet AS SIGNED)").fetch_one(c).await?;
                let packet = usize::try_from(packet).unwrap_or(usize::MAX);
                Ok((packet / 2, packet.saturating_sub(4 * ROW_OVERHEAD)))
            }
            Conn::Postgres(_) => Ok((PG_STATEMENT_BYTES, usize::MAX)),
        }
    }

    pub(crate) fn kind(&self) -> Kind {
        match self {
            Conn::MySql(_) => Kind::MySql,
            Conn::Postgres(_) => Kind::Postgres,
        }
    }
}

/// A transaction on either backend.
pub(crate) enum Tx<'c> {
    MySql(sqlx::Transaction<'c, sqlx::MySql>),
    Postgres(sqlx::Transaction<'c, sqlx::Postgres>),
}

impl<'c> From<sqlx::Transaction<'c, sqlx::MySql>> for Tx<'c> {
    fn from(t: sqlx::Transaction<'c, sqlx::MySql>) -> Self {
        Tx::MySql(t)
    }
}

impl<'c> From<sqlx::Transaction<'c, sqlx::Postgres>> for Tx<'c> {
    fn from(t: sqlx::Transaction<'c, sqlx::Postgres>) -> Self {
        Tx::Postgres(t)
    }
}

/// Whether the error means the connection is gone or unusable, so that reconnecting may help.
pub(crate) fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            if let Some(my) = db.try_downcast_ref::<MySqlDatabaseError>() {
                // Too many connections, shutdown in progress, aborted or killed connection,
                // network read/write errors, disconnected for inactivity.
                if matches!(my.number(), 1040 | 1053 | 1152 | 1158..=1161 | 1184 | 1927 | 4031) {
                    return true;
                }
            }
            // Connection exceptions; PostgreSQL's admin/crash shutdown, starting up, too many
            // connections.
            db.code().is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03" | "53300"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::DEFAULT_TABLE;

    #[test]
    fn urls_lose_password_and_table() {
        let t =
            Target::parse("mysql://gb:secret@db.example:3307/jobs?table=Q_1&ssl-mode=disabled", DEFAULT_TABLE).unwrap();
        assert_eq!(t.kind, Kind::MySql);
        assert_eq!(t.table, "Q_1");
        assert_eq!(t.public, "mysql://gb@db.example:3307/jobs table Q_1");
        assert_eq!(t.url.as_str(), "mysql://gb:secret@db.example:3307/jobs?ssl-mode=disabled");

        let t = Target::parse("mariadb://gb@db:3306/jobs", DEFAULT_TABLE).unwrap();
        assert_eq!((t.kind, t.url.scheme(), t.table.as_str()), (Kind::MySql, "mysql", DEFAULT_TABLE));

        let t = Target::parse("postgresql://gb:pw@db:5432/jobs?password=pw2&table=Queue", DEFAULT_TABLE).unwrap();
        assert_eq!(t.kind, Kind::Postgres);
        // PostgreSQL folds unquoted names: lock and table must agree on one spelling.
        assert_eq!(t.public, "postgresql://gb@db:5432/jobs table queue");
        assert!(!t.public.contains("pw"));
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in [
            "redis://localhost/0",
            "mysql://root@localhost/test?table=",
            "mysql://root@localhost/test?table=a;drop",
            "postgres://root@localhost/test?table=a%20b",
        ] {
            assert!(matches!(Target::parse(url, DEFAULT_TABLE), Err(StoreError::Database(_))), "{url}");
        }
    }
}
