//! Helpers shared by the store's integration tests: child processes, and for the SQL stores
//! the shared MariaDB and PostgreSQL (root, no password, database `test`), a table per test.
#![allow(dead_code, unused_macros)] // each test file uses a different part

use std::process::Child;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gearbox_store::{open_sql, Batch, Loc, QueueStore, StoreError, StoredJob, TableLock};
use sqlx::mysql::MySqlConnection;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};

/// Signals a child this test started and waits for it to exit, killing it after a deadline.
pub fn stop_child(child: &mut Option<Child>, signal: libc::c_int) {
    let Some(mut child) = child.take() else { return };
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: plain syscall; `pid` is our own child, not yet reaped.
    unsafe { libc::kill(pid, signal) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub const MYSQL: &str = "mysql://root@127.0.0.1:3306/test";
pub const POSTGRES: &str = "postgres://root@127.0.0.1:5432/test";

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

pub fn is_mysql(base: &str) -> bool {
    base.starts_with("mysql:")
}

/// Runs statements on a connection of their own.
pub async fn exec(base: &str, statements: &[&str]) -> sqlx::Result<()> {
    if is_mysql(base) {
        let mut c = MySqlConnection::connect(base).await?;
        for s in statements {
            c.execute(*s).await?;
        }
    } else {
        let mut c = PgConnection::connect(base).await?;
        for s in statements {
            c.execute(*s).await?;
        }
    }
    Ok(())
}

/// A table name of this test's own, dropped at the end.
pub struct Table {
    base: String,
    pub name: String,
}

impl Table {
    pub fn new(base: &str) -> Table {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").subsec_nanos();
        let name = format!("t_{}_{nanos:x}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        Table { base: base.to_string(), name }
    }

    /// The store's URL. On PostgreSQL the session is named after the table, so that a test
    /// can find and end it.
    pub fn url(&self) -> String {
        if is_mysql(&self.base) {
            format!("{}?table={}", self.base, self.name)
        } else {
            format!("{}?table={}&application_name={}", self.base, self.name, self.name)
        }
    }

    /// The id of the store's database session: the connection id holding the table's lock on
    /// MySQL, the backend pid of the session named after the table on PostgreSQL.
    pub fn store_session(&self) -> i64 {
        block_on(async {
            if is_mysql(&self.base) {
                let mut c = MySqlConnection::connect(&self.base).await?;
                let lock = TableLock::of_url(&self.url()).expect("lock of the URL");
                sqlx::query_scalar::<_, Option<i64>>("SELECT CAST(IS_USED_LOCK(?) AS SIGNED)")
                    .bind(lock.mysql_name())
                    .fetch_one(&mut c)
                    .await
            } else {
                let mut c = PgConnection::connect(&self.base).await?;
                sqlx::query_scalar::<_, i32>("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
                    .bind(&self.name)
                    .fetch_optional(&mut c)
                    .await
                    .map(|pid| pid.map(i64::from))
            }
        })
        .expect("find the store's session")
        .expect("the store has a session")
    }

    /// Ends the store's database session behind its back, as a database restart would.
    pub fn kill_session(&self) {
        let session = self.store_session();
        block_on(async {
            if is_mysql(&self.base) {
                let mut c = MySqlConnection::connect(&self.base).await?;
                c.execute(format!("KILL {session}").as_str()).await?;
            } else {
                let mut c = PgConnection::connect(&self.base).await?;
                let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
                    .bind(i32::try_from(session).expect("pid"))
                    .fetch_one(&mut c)
                    .await?;
                assert!(ended);
            }
            Ok::<(), sqlx::Error>(())
        })
        .expect("end the store's session");
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let drop_table = format!("DROP TABLE IF EXISTS {}", self.name);
        if let Err(e) = block_on(exec(&self.base, &[&drop_table])) {
            eprintln!("could not drop {}: {e}", self.name);
        }
    }
}

pub fn job(seq: u64, priority: u8, run_at: i64, function: &[u8], unique: &[u8], data: &[u8]) -> StoredJob {
    StoredJob {
        seq,
        priority,
        run_at,
        function: function.to_vec(),
        unique: unique.to_vec(),
        data: data.to_vec(),
        loc: Loc(seq),
        attempts: 0,
    }
}

pub fn batch_of(adds: &[&StoredJob], removes: &[u64]) -> Batch {
    let mut b = Batch::default();
    for j in adds {
        b.push_add(j.seq, j.priority, j.run_at, &j.function, &j.unique, &j.data);
    }
    for &seq in removes {
        b.push_remove(seq, Loc::NONE);
    }
    b
}

pub fn commit(store: &mut dyn QueueStore, batch: &Batch) -> Result<(), StoreError> {
    let mut locs = vec![Loc(7)];
    store.commit(batch, &mut locs)?;
    // A job's location in a database is its sequence number.
    assert_eq!(locs, batch.adds().map(|a| Loc(a.seq)).collect::<Vec<_>>());
    Ok(())
}

pub fn load(store: &mut dyn QueueStore) -> Vec<StoredJob> {
    let mut jobs = Vec::new();
    store.load(&mut |j| jobs.push(j.to_owned())).expect("load");
    jobs
}

pub fn open(url: &str) -> Box<dyn QueueStore> {
    open_sql(url, Duration::ZERO).unwrap_or_else(|e| panic!("open {url}: {e}"))
}

/// Opening `url` fails at once because another session holds the table; returns who.
pub fn assert_locked(url: &str, table: &str) -> String {
    match open_sql(url, Duration::ZERO) {
        Err(StoreError::Locked { what, holder, waited }) => {
            assert!(what.ends_with(&format!(" table {table}")), "{what}");
            assert_eq!(waited, Duration::ZERO);
            holder.expect("the database names the holder")
        }
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("opened a table another store holds"),
    }
}

/// Defines `mysql::NAME` and `postgres::NAME` tests that run `NAME(base URL)`, for each NAME;
/// the test file imports `MYSQL` and `POSTGRES`.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod mysql {
            $(#[test] fn $test() { super::$test(super::MYSQL) })*
        }
        mod postgres {
            $(#[test] fn $test() { super::$test(super::POSTGRES) })*
        }
    };
}
