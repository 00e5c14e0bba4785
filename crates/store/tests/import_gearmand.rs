//! gearmand's persistent queues, written by a real gearmand (libsqlite3, MySQL and PostgreSQL
//! plugins), read back by `import_gearmand`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod common;

use common::stop_child;
use gearbox_store::{import_gearmand, GearmandJob, StoreError};
use sqlx::mysql::MySqlConnection;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor};

const MYSQL: &str = "mysql://root@127.0.0.1:3306/test";
const POSTGRES: &str = "postgres://root@127.0.0.1:5432/test";

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}

fn spare_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local address").port()
}

fn unique_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").subsec_nanos();
    format!("gm_{}_{nanos:x}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// `name` found on the PATH or in the sbin directories, which a non-root PATH may lack.
fn program(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| panic!("{name} is not installed"))
}

/// A gearmand of this test's own, with the given queue options; stopped (SIGTERM) on drop.
struct Gearmand {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
}

impl Gearmand {
    fn start(dir: &Path, queue: &[&str]) -> Gearmand {
        let port = spare_port();
        let log = dir.join("gearmand.log");
        let child = Command::new(program("gearmand"))
            .args(["--listen", "127.0.0.1", "--port", &port.to_string(), "--log-file"])
            .arg(&log)
            .args(queue)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gearmand");
        let mut g = Gearmand { child: Some(child), port, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = g.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("gearmand exited with {status}:\n{}", g.log_text());
            }
            assert!(Instant::now() < deadline, "gearmand does not listen:\n{}", g.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        g
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Submits a background job with the `gearman` tool, the payload on its standard input.
    fn submit(&self, priority_flag: Option<&str>, function: &str, unique: &str, data: &[u8]) {
        let mut child = Command::new(program("gearman"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-b", "-f", function, "-u", unique])
            .args(priority_flag)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run gearman");
        child.stdin.take().expect("stdin").write_all(data).expect("write the payload");
        let out = child.wait_with_output().expect("gearman");
        assert!(out.status.success(), "gearman: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Submits a job to run at `epoch` (SUBMIT_JOB_EPOCH, which the tool cannot send).
    fn submit_epoch(&self, function: &str, unique: &str, epoch: i64, data: &[u8]) {
        let mut body = Vec::new();
        for part in [function.as_bytes(), unique.as_bytes(), epoch.to_string().as_bytes()] {
            body.extend_from_slice(part);
            body.push(0);
        }
        body.extend_from_slice(data);
        let mut packet = b"\0REQ".to_vec();
        packet.extend_from_slice(&36u32.to_be_bytes());
        packet.extend_from_slice(&u32::try_from(body.len()).expect("size").to_be_bytes());
        packet.extend_from_slice(&body);
        let mut conn = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to gearmand");
        conn.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        conn.write_all(&packet).expect("send");
        let mut header = [0u8; 12];
        conn.read_exact(&mut header).expect("answer");
        // JOB_CREATED
        assert_eq!(&header[..8], b"\0RES\0\0\0\x08", "gearmand answered {header:?}");
        let len = u32::from_be_bytes(header[8..].try_into().expect("4 bytes"));
        conn.read_exact(&mut vec![0; len as usize]).expect("job handle");
    }

    fn stop(&mut self) {
        stop_child(&mut self.child, libc::SIGTERM);
    }
}

impl Drop for Gearmand {
    fn drop(&mut self) {
        self.stop();
    }
}

fn gjob(function: &str, unique: &str, priority: u8, data: &[u8], when_to_run: i64) -> GearmandJob {
    GearmandJob {
        function: function.as_bytes().to_vec(),
        unique: unique.as_bytes().to_vec(),
        priority,
        data: data.to_vec(),
        when_to_run,
    }
}

/// Queues the same jobs through `gearmand`, stops it, and returns them in submission order.
fn queue_jobs(mut gearmand: Gearmand) -> Vec<GearmandJob> {
    let later = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64 + 3600;
    gearmand.submit(None, "resize", "u-normal", b"hello");
    gearmand.submit(Some("-I"), "resize", "u-high", b"high");
    gearmand.submit(Some("-L"), "mail", "u-low", b"a\0b\xff\xfe");
    gearmand.submit_epoch("tick", "u-epoch", later, b"later");
    gearmand.stop();
    vec![
        gjob("resize", "u-normal", 1, b"hello", 0),
        gjob("resize", "u-high", 0, b"high", 0),
        gjob("mail", "u-low", 2, b"a\0b\xff\xfe", 0),
        gjob("tick", "u-epoch", 1, b"later", later),
    ]
}

fn import(source: &str) -> Vec<GearmandJob> {
    let mut jobs = Vec::new();
    let count = import_gearmand(source, &mut |j| jobs.push(j)).unwrap_or_else(|e| panic!("import {source}: {e}"));
    assert_eq!(count, jobs.len());
    jobs
}

fn by_unique(mut jobs: Vec<GearmandJob>) -> Vec<GearmandJob> {
    jobs.sort_by(|a, b| a.unique.cmp(&b.unique));
    jobs
}

#[test]
fn libsqlite3_queue() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("queue.db");
    let db_arg = format!("--libsqlite3-db={}", db.display());
    let expected = queue_jobs(Gearmand::start(dir.path(), &["-q", "libsqlite3", &db_arg]));
    let before = std::fs::read(&db).expect("queue file");

    let path = db.to_str().expect("UTF-8 path");
    // SQLite keeps the order the jobs came in.
    assert_eq!(import(path), expected);
    assert_eq!(std::fs::read(&db).expect("queue file"), before, "the import changed the file");
}

#[test]
fn libsqlite3_queue_from_before_when_to_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("old.db");
    block_on(async {
        let mut c = SqliteConnectOptions::new().filename(&db).create_if_missing(true).connect().await?;
        c.execute(
            "CREATE TABLE gearman_queue (unique_key TEXT PRIMARY KEY, function_name TEXT, priority INTEGER, data BLOB); \
             INSERT INTO gearman_queue VALUES ('u1', 'f', 2, x'00ff'), ('u2', 'g', 1, NULL);",
        )
        .await?;
        c.close().await
    })
    .expect("make an old queue file");
    assert_eq!(
        import(db.to_str().expect("UTF-8 path")),
        [gjob("f", "u1", 2, b"\0\xff", 0), gjob("g", "u2", 1, b"", 0)]
    );
}

#[test]
fn missing_file() {
    match import_gearmand("/nonexistent/gearmand.db", &mut |_| panic!("no jobs")) {
        Err(StoreError::Io { .. }) => {}
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

/// Drops gearmand's table in the shared database at the end of the test.
struct DropTable {
    base: &'static str,
    name: String,
}

impl Drop for DropTable {
    fn drop(&mut self) {
        let sql = format!("DROP TABLE IF EXISTS {}", self.name);
        let dropped = block_on(async {
            if self.base == MYSQL {
                MySqlConnection::connect(self.base).await?.execute(sql.as_str()).await.map(drop)
            } else {
                PgConnection::connect(self.base).await?.execute(sql.as_str()).await.map(drop)
            }
        });
        if let Err(e) = dropped {
            eprintln!("could not drop {}: {e}", self.name);
        }
    }
}

#[test]
fn mysql_queue() {
    let dir = tempfile::tempdir().expect("temp dir");
    let table = DropTable { base: MYSQL, name: unique_name() };
    let queue = [
        "-q",
        "mysql",
        "--mysql-host",
        "127.0.0.1",
        "--mysql-user",
        "root",
        "--mysql-db",
        "test",
        "--mysql-table",
        &table.name,
    ];
    let expected = queue_jobs(Gearmand::start(dir.path(), &queue));
    assert_eq!(by_unique(import(&format!("{MYSQL}?table={}", table.name))), by_unique(expected));
}

#[test]
fn postgres_queue() {
    let dir = tempfile::tempdir().expect("temp dir");
    let table = DropTable { base: POSTGRES, name: unique_name() };
    let conninfo = "host=127.0.0.1 port=5432 user=root dbname=test";
    let queue = ["-q", "Postgres", "--libpq-conninfo", conninfo, "--libpq-table", &table.name];
    let expected = queue_jobs(Gearmand::start(dir.path(), &queue));
    assert_eq!(by_unique(import(&format!("{POSTGRES}?table={}", table.name))), by_unique(expected));
}
