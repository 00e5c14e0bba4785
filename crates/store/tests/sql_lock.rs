//! The lock through which one server owns a queue table, against the shared MariaDB and
//! PostgreSQL: a second store is refused, a store opening waits a bounded time for a held lock
//! and names its holder, and a commit that reconnects waits for its lock within its retry
//! window.

use std::time::{Duration, Instant};

#[macro_use]
mod common;

use common::{assert_locked, batch_of, commit, is_mysql, job, load, open, Table, MYSQL, POSTGRES};
use gearbox_store::{open_sql, StoreError, TableLock};
use sqlx::mysql::MySqlConnection;
use sqlx::postgres::PgConnection;
use sqlx::Connection;

/// Whether a lock holder's description names session `id` (a MySQL connection id or a
/// PostgreSQL backend pid).
fn names_session(holder: &str, id: i64) -> bool {
    [format!("connection {id}"), format!("session pid {id}")]
        .iter()
        .any(|p| holder.strip_prefix(p.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with(' ')))
}

/// A session of the test's own that holds a table's lock, as a second server (or the lingering
/// session of a killed one) would.
struct LockHolder {
    rt: tokio::runtime::Runtime,
    conn: HolderConn,
    lock: TableLock,
}

enum HolderConn {
    MySql(MySqlConnection),
    Postgres(PgConnection),
}

impl LockHolder {
    /// Connects to `base` with application name `holder-test` (PostgreSQL) and takes the lock
    /// of the table `store_url` names, waiting up to 10 s for a lock being released.
    fn take(base: &str, store_url: &str) -> LockHolder {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let lock = TableLock::of_url(store_url).expect("lock of the URL");
        let deadline = Instant::now() + Duration::from_secs(10);
        let conn = rt.block_on(async {
            let mut conn = if is_mysql(base) {
                HolderConn::MySql(MySqlConnection::connect(base).await?)
            } else {
                HolderConn::Postgres(PgConnection::connect(&format!("{base}?application_name=holder-test")).await?)
            };
            loop {
                let got = match &mut conn {
                    HolderConn::MySql(c) => {
                        sqlx::query_scalar::<_, Option<i64>>("SELECT GET_LOCK(?, 0)")
                            .bind(lock.mysql_name())
                            .fetch_one(c)
                            .await?
                            == Some(1)
                    }
                    HolderConn::Postgres(c) => {
                        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(lock.pg_key()).fetch_one(c).await?
                    }
                };
                if got {
                    return Ok::<_, sqlx::Error>(conn);
                }
                assert!(Instant::now() < deadline, "the test could not take the table's lock");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        LockHolder { rt, conn: conn.expect("hold the lock"), lock }
    }

    /// The holding session's id: `CONNECTION_ID()` on MySQL, `pg_backend_pid()` on PostgreSQL.
    fn session(&mut self) -> i64 {
        let id = self.rt.block_on(async {
            match &mut self.conn {
                HolderConn::MySql(c) => {
                    sqlx::query_scalar::<_, i64>("SELECT CAST(CONNECTION_ID() AS SIGNED)").fetch_one(c).await
                }
                HolderConn::Postgres(c) => {
                    sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()").fetch_one(c).await.map(i64::from)
                }
            }
        });
        id.expect("session id")
    }

    fn release(mut self) {
        let released = self.rt.block_on(async {
            match &mut self.conn {
                HolderConn::MySql(c) => sqlx::query_scalar::<_, Option<i64>>("SELECT RELEASE_LOCK(?)")
                    .bind(self.lock.mysql_name())
                    .fetch_one(c)
                    .await
                    .map(|r| r == Some(1)),
                HolderConn::Postgres(c) => {
                    sqlx::query_scalar("SELECT pg_advisory_unlock($1)").bind(self.lock.pg_key()).fetch_one(c).await
                }
            }
        });
        assert!(released.expect("release the lock"), "the test did not hold the lock");
    }
}

/// Waits for a thread's outcome, failing the test after `limit`.
fn join_within<T>(thread: std::thread::JoinHandle<T>, limit: Duration, what: &str) -> T {
    let deadline = Instant::now() + limit;
    while !thread.is_finished() {
        assert!(Instant::now() < deadline, "{what} did not finish in {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    thread.join().expect(what)
}

fn lock(base: &str) {
    let table = Table::new(base);
    let first = open(&table.url());
    assert_locked(&table.url(), &table.name);
    drop(first);
    let mut second = open(&table.url());
    assert!(load(&mut *second).is_empty());
}

fn lock_taken_while_disconnected(base: &str) {
    let table = Table::new(base);
    let mut first = open(&table.url());
    let one = job(1, 1, 0, b"f", b"u1", b"one");
    commit(&mut *first, &batch_of(&[&one], &[])).expect("commit");
    table.kill_session();

    // The killed session's lock may outlive it for a moment.
    let mut second = open_sql(&table.url(), Duration::from_secs(10)).expect("second open");
    let second_session = table.store_session();
    let two = job(2, 1, 0, b"f", b"u2", b"two");
    // The first store retries for its whole window (its own session might have been the
    // holder), then gives up naming the new owner, and from then on refuses at once.
    let started = Instant::now();
    match commit(&mut *first, &batch_of(&[&two], &[])) {
        Err(StoreError::Locked { holder, waited, .. }) => {
            let holder = holder.expect("the holder is named");
            assert!(names_session(&holder, second_session), "{holder} is not session {second_session}");
            assert!(waited >= Duration::from_secs(5), "gave up after {waited:?}");
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_secs(5), "gave up after {:?}", started.elapsed());
    let started = Instant::now();
    assert!(matches!(commit(&mut *first, &batch_of(&[&two], &[])), Err(StoreError::Locked { .. })));
    assert!(started.elapsed() < Duration::from_secs(1), "retried a store that lost its table");
    let three = job(3, 1, 0, b"f", b"u3", b"three");
    commit(&mut *second, &batch_of(&[&three], &[])).expect("commit by the new owner");
    assert_eq!(load(&mut *second), [one, three]);
}

/// A server that starts while another session holds its table's lock (a killed predecessor's,
/// not yet ended by the database) waits for it and then works normally.
fn open_waits_for_lock(base: &str) {
    let table = Table::new(base);
    let holder = LockHolder::take(base, &table.url());
    let url = table.url();
    let opening = std::thread::spawn(move || open_sql(&url, Duration::from_secs(30)));
    // Lasts past several polls of the lock.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!opening.is_finished(), "the open returned while the lock was held");
    let released = Instant::now();
    holder.release();
    let mut store = join_within(opening, Duration::from_secs(10), "the open").expect("open after the release");
    eprintln!("{base}: opened {:.1?} after the lock was released", released.elapsed());

    let one = job(1, 1, 0, b"f", b"u1", b"one");
    commit(&mut *store, &batch_of(&[&one], &[])).expect("commit");
    assert_eq!(load(&mut *store), [one]);
    assert_locked(&table.url(), &table.name);
}

/// When the lock stays held, opening gives up after its bound, naming the holder.
fn open_gives_up_naming_holder(base: &str) {
    let table = Table::new(base);
    let mut holder = LockHolder::take(base, &table.url());
    let session = holder.session();
    let started = Instant::now();
    let error = match open_sql(&table.url(), Duration::from_secs(1)) {
        Err(e) => e,
        Ok(_) => panic!("opened a table whose lock another session holds"),
    };
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(3), "gave up after {took:?}");
    let message = error.to_string();
    eprintln!("{base}: {message}");
    match error {
        StoreError::Locked { what, holder, waited } => {
            assert_eq!(what, format!("{base} table {}", table.name));
            assert_eq!(waited, Duration::from_secs(1));
            let holder = holder.expect("the holder is named");
            assert!(names_session(&holder, session), "{holder} is not session {session}");
            assert!(holder.contains(" from 127.0.0.1:"), "{holder}");
            let details = if is_mysql(base) { ", user root" } else { ", application holder-test, connected " };
            assert!(holder.contains(details), "{holder}");
        }
        other => panic!("expected Locked, got {other}"),
    }
    assert!(message.starts_with(&format!("another gearbox server holds {base} table {} (", table.name)), "{message}");
    assert!(message.ends_with("; waited 1s"), "{message}");
    holder.release();
}

/// A commit that reconnects and finds the lock held (here by the test, standing in for the
/// store's own lost session that the database has not ended yet) waits within its retry
/// window, then takes the lock and succeeds.
fn commit_waits_for_lock_after_reconnect(base: &str) {
    let table = Table::new(base);
    let mut store = open(&table.url());
    let one = job(1, 1, 0, b"f", b"u1", b"one");
    commit(&mut *store, &batch_of(&[&one], &[])).expect("commit");
    table.kill_session();
    let holder = LockHolder::take(base, &table.url());

    let two = job(2, 1, 0, b"f", b"u2", b"two");
    let batch = batch_of(&[&two], &[]);
    let committing = std::thread::spawn(move || {
        let outcome = commit(&mut *store, &batch);
        (store, outcome)
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(!committing.is_finished(), "the commit returned while the lock was held");
    holder.release();
    let (mut store, outcome) = join_within(committing, Duration::from_secs(10), "the commit");
    outcome.expect("commit once the lock is free");
    assert_eq!(load(&mut *store), [one, two]);
    assert_locked(&table.url(), &table.name);
}

/// On PostgreSQL the store's session is named `gearbox` unless the URL names it.
#[test]
fn postgres_session_is_named_gearbox() {
    let table = Table::new(POSTGRES);
    let url = format!("{POSTGRES}?table={}", table.name);
    let _store = open(&url);
    let holder = assert_locked(&url, &table.name);
    assert!(holder.contains(", application gearbox, connected "), "{holder}");
}

on_both_backends!(
    lock,
    lock_taken_while_disconnected,
    open_waits_for_lock,
    open_gives_up_naming_holder,
    commit_waits_for_lock_after_reconnect
);
