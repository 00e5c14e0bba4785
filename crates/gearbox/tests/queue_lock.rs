//! A server restarted on a database queue whose lock another session still holds (as a killed
//! predecessor's session does until the database ends it) says once that it waits, for whom,
//! and starts as soon as the lock is released. Uses the shared MariaDB and PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use common::{echo, temp_data_dir, wait_for, Server};
use gearbox_store::TableLock;
use sqlx::{Connection, Executor};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn table_name(kind: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("lockwait_{kind}_{}_{nanos:x}", std::process::id())
}

/// Starts a server on `queue` while the test holds its lock (`holder`: how the server should
/// name the test's session), checks that it waits and says so once, releases the lock, and
/// checks that the server then starts and serves.
fn waits_for_the_lock(queue: &str, holder: &str, release: impl FnOnce()) {
    let starting = Server::spawn(temp_data_dir(), &["--queue", queue], |_| {});
    let waiting = "waiting up to 30s for it";
    wait_for("the server to say it waits", || starting.log().iter().any(|l| l.contains(waiting)));
    let line = starting.log().into_iter().find(|l| l.contains(waiting)).unwrap();
    assert!(line.contains(&format!("the table's lock is held by {holder}")), "{line}");
    // Several polls of the lock go by while it stays held.
    std::thread::sleep(Duration::from_secs(1));
    assert!(!starting.log().iter().any(|l| l.contains("listening on")), "started while the lock was held");
    let released = Instant::now();
    release();
    let server = starting.ready();
    eprintln!("{queue}: listening {:.1?} after the release", released.elapsed());
    assert_eq!(server.logged(waiting).len(), 1, "{:?}", server.logged(waiting));
    assert_eq!(server.logged("took the table's lock after").len(), 1);
    echo(&mut std::net::TcpStream::connect(server.addr).unwrap(), b"up");
}

#[test]
fn mariadb_server_waits_for_a_held_lock() {
    let base = "mysql://root@127.0.0.1:3306/test";
    let table = table_name("mysql");
    let queue = format!("{base}?table={table}");
    let name = TableLock::of_url(&queue).unwrap().mysql_name().into_owned();
    let rt = runtime();
    let mut conn = rt.block_on(sqlx::MySqlConnection::connect(base)).unwrap();
    let (got, id): (i64, i64) = rt
        .block_on(
            sqlx::query_as("SELECT GET_LOCK(?, 0), CAST(CONNECTION_ID() AS SIGNED)").bind(&name).fetch_one(&mut conn),
        )
        .unwrap();
    assert_eq!(got, 1);
    waits_for_the_lock(&queue, &format!("connection {id} from 127.0.0.1:"), || {
        let released: i64 =
            rt.block_on(sqlx::query_scalar("SELECT RELEASE_LOCK(?)").bind(&name).fetch_one(&mut conn)).unwrap();
        assert_eq!(released, 1);
    });
    rt.block_on(conn.execute(format!("DROP TABLE {table}").as_str())).unwrap();
    rt.block_on(conn.execute(format!("DROP TABLE IF EXISTS {table}_dead, {table}_state").as_str())).unwrap();
}

/// SIGTERM while the server waits for the lock stops it then, not when the wait ends.
#[test]
fn a_server_waiting_for_the_lock_stops_on_sigterm() {
    let base = "postgres://root@127.0.0.1:5432/test";
    let table = table_name("pg_term");
    let queue = format!("{base}?table={table}");
    let key = TableLock::of_url(&queue).unwrap().pg_key();
    let rt = runtime();
    let mut conn = rt.block_on(sqlx::PgConnection::connect(base)).unwrap();
    let got: bool =
        rt.block_on(sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut conn)).unwrap();
    assert!(got);
    let mut starting = Server::spawn(temp_data_dir(), &["--queue", &queue, "--queue-lock-wait", "60s"], |_| {});
    wait_for("the server to say it waits", || starting.log().iter().any(|l| l.contains("waiting up to 60s")));
    let (status, took) = starting.terminate();
    assert!(status.success() && took < Duration::from_secs(5), "exit {status:?} after {took:?}");
}

#[test]
fn postgres_server_waits_for_a_held_lock() {
    let base = "postgres://root@127.0.0.1:5432/test";
    let table = table_name("pg");
    let queue = format!("{base}?table={table}");
    let key = TableLock::of_url(&queue).unwrap().pg_key();
    let rt = runtime();
    let mut conn = rt.block_on(sqlx::PgConnection::connect(base)).unwrap();
    let (got, pid): (bool, i32) = rt
        .block_on(sqlx::query_as("SELECT pg_try_advisory_lock($1), pg_backend_pid()").bind(key).fetch_one(&mut conn))
        .unwrap();
    assert!(got);
    waits_for_the_lock(&queue, &format!("session pid {pid} from 127.0.0.1:"), || {
        let released: bool =
            rt.block_on(sqlx::query_scalar("SELECT pg_advisory_unlock($1)").bind(key).fetch_one(&mut conn)).unwrap();
        assert!(released);
    });
    rt.block_on(conn.execute(format!("DROP TABLE {table}").as_str())).unwrap();
    rt.block_on(conn.execute(format!("DROP TABLE IF EXISTS {table}_dead, {table}_state").as_str())).unwrap();
}
