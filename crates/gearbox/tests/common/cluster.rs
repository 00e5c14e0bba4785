//! Nodes of a cluster on the shared MariaDB and PostgreSQL, and their tables.

use std::time::{Duration, Instant};

use sqlx::Connection;

use super::{temp_data_dir, Server};

pub const MYSQL: &str = "mysql://root@127.0.0.1:3306/test";
pub const POSTGRES: &str = "postgres://root@127.0.0.1:5432/test";
pub const LEASE: Duration = Duration::from_secs(3);

/// A cluster's table of this test's own, dropped (with its nodes table) at the end.
pub struct Table {
    pub base: String,
    pub name: String,
}

impl Table {
    pub fn new(base: &str, test: &str) -> Table {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        Table { base: base.into(), name: format!("c_{test}_{}_{nanos:x}", std::process::id()) }
    }

    pub fn url(&self, base: &str) -> String {
        format!("{base}?table={}", self.name)
    }

    /// Rows left in the queue table.
    pub fn rows(&self) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {}", self.name);
        block_on(async {
            if self.base.starts_with("mysql") {
                let mut c = sqlx::MySqlConnection::connect(&self.base).await.unwrap();
                sqlx::query_scalar(&sql).fetch_one(&mut c).await.unwrap()
            } else {
                let mut c = sqlx::PgConnection::connect(&self.base).await.unwrap();
                sqlx::query_scalar(&sql).fetch_one(&mut c).await.unwrap()
            }
        })
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let statements = ["", "_nodes", "_leases", "_dead", "_state"]
            .map(|suffix| format!("DROP TABLE IF EXISTS {}{suffix}", self.name));
        block_on(async {
            if self.base.starts_with("mysql") {
                let Ok(mut c) = sqlx::MySqlConnection::connect(&self.base).await else { return };
                for s in &statements {
                    let _ = sqlx::query(s).execute(&mut c).await;
                }
            } else {
                let Ok(mut c) = sqlx::PgConnection::connect(&self.base).await else { return };
                for s in &statements {
                    let _ = sqlx::query(s).execute(&mut c).await;
                }
            }
        });
    }
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

pub fn node(url: &str) -> Server {
    node_with(url, &[])
}

/// A node with `extra` flags.
pub fn node_with(url: &str, extra: &[&str]) -> Server {
    let lease = format!("{}s", LEASE.as_secs());
    let flags = ["--cluster", "--queue", url, "--node-lease", &lease, "--job-log", "none"];
    Server::spawn(temp_data_dir(), &[&flags[..], extra].concat(), |_| {}).ready()
}

pub fn signal(server: &Server, sig: libc::c_int) {
    // SAFETY: plain syscall on our own child process.
    unsafe { libc::kill(server.child.id() as libc::pid_t, sig) };
}

/// Repeats `check` until it holds, or panics after `within`.
pub fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}
