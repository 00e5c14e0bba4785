//! The SQL queue stores against real databases: the shared MariaDB and PostgreSQL, each test
//! on a table of its own, and private instances that the restart tests start, stop and start
//! again. The table lock's tests are in `sql_lock.rs`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[macro_use]
mod common;

use common::{
    assert_locked, batch_of, block_on, commit, exec, is_mysql, job, load, open, stop_child, Table, MYSQL, POSTGRES,
};
use gearbox_store::{open_sql, Batch, Loc, StoreError, StoredJob};
use sqlx::mysql::MySqlConnection;
use sqlx::postgres::PgConnection;
use sqlx::Connection;

fn roundtrip(base: &str) {
    let table = Table::new(base);
    let mut store = open(&table.url());
    assert_eq!(store.describe(), format!("{base} table {}", table.name));
    assert!(load(&mut *store).is_empty());

    let big = vec![0xAB; 200_000];
    let jobs = [
        job(1, 0, 0, b"f", b"", b""),
        job(2, 1, 1_700_000_000, b"fn\0nul", b"\x80\xff", b"\0\x01\xff\xfe not utf-8: \xc3\x28"),
        job(3, 2, i64::MAX, b"reports", b"u3", &big),
        job(4, 1, 0, b"g", b"u4", b"four"),
        job(5, 0, 42, b"g", b"u5", b"five"),
    ];
    commit(&mut *store, &batch_of(&jobs.iter().collect::<Vec<_>>(), &[])).expect("commit adds");
    assert_eq!(load(&mut *store), jobs);

    // Removes, one of a job that is not there, and a job added and removed in one batch.
    let six = job(6, 1, 0, b"g", b"u6", b"gone at once");
    let seven = job(7, 2, 7, b"h", b"u7", b"seven");
    commit(&mut *store, &batch_of(&[&six, &seven], &[2, 999, 6])).expect("commit mixed");
    commit(&mut *store, &batch_of(&[], &[4])).expect("commit removes");
    commit(&mut *store, &Batch::default()).expect("commit nothing");
    drop(store);

    let mut store = open(&table.url());
    let expected = vec![jobs[0].clone(), jobs[2].clone(), jobs[4].clone(), seven];
    assert_eq!(load(&mut *store), expected);
}

fn big_batch(base: &str) {
    const N: u64 = 50_000;
    let table = Table::new(base);
    let mut store = open(&table.url());
    let payload = |seq: u64| -> Vec<u8> { (0..200).map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i)).collect() };
    let mut batch = Batch::default();
    for seq in 1..=N {
        batch.push_add(seq, (seq % 3) as u8, seq as i64, b"bulk", format!("u{seq}").as_bytes(), &payload(seq));
    }
    let started = Instant::now();
    commit(&mut *store, &batch).expect("commit 50,000 adds");
    eprintln!("{base}: 50,000 adds committed in {:.1?}", started.elapsed());

    let mut next = 1;
    store
        .load(&mut |j| {
            assert_eq!(j.seq, next);
            assert_eq!((j.priority, j.run_at), ((next % 3) as u8, next as i64));
            assert_eq!(j.unique, format!("u{next}").as_bytes());
            assert_eq!(j.data, payload(next));
            next += 1;
        })
        .expect("load");
    assert_eq!(next, N + 1);

    // Payloads read back by location (the sequence number), 1,000 a statement; a job the
    // table does not hold is left out.
    let wanted: Vec<(u64, Loc)> = (1..=N).step_by(7).chain([N + 5]).map(|s| (s, Loc(s))).collect();
    let mut read = Vec::new();
    store.read_payloads(&wanted, &mut |seq, data| read.push((seq, data.to_vec()))).expect("read payloads");
    read.sort_unstable();
    assert_eq!(read.len(), wanted.len() - 1);
    assert!(read.iter().all(|(seq, data)| *data == payload(*seq)));

    let removes: Vec<u64> = (1..=N).collect();
    commit(&mut *store, &batch_of(&[], &removes)).expect("commit 50,000 removes");
    assert!(load(&mut *store).is_empty());
}

fn reconnect_after_session_killed(base: &str) {
    let table = Table::new(base);
    let mut store = open(&table.url());
    let one = job(1, 1, 0, b"f", b"u1", b"one");
    let two = job(2, 1, 0, b"f", b"u2", b"two");
    commit(&mut *store, &batch_of(&[&one], &[])).expect("commit");
    table.kill_session();
    commit(&mut *store, &batch_of(&[&two], &[])).expect("commit after the session ended");
    assert_eq!(load(&mut *store), [one, two]);
    // The new session holds the lock again.
    assert_locked(&table.url(), &table.name);
}

/// A job bigger than MySQL's `max_allowed_packet` fails at once and leaves the store usable; on
/// PostgreSQL it exceeds a statement's byte budget and goes into an INSERT of its own.
fn oversized_job(base: &str) {
    let table = Table::new(base);
    let mut store = open(&table.url());
    let packet = if is_mysql(base) {
        block_on(async {
            let mut c = MySqlConnection::connect(base).await?;
            sqlx::query_scalar::<_, i64>("SELECT CAST(@@max_allowed_packet AS SIGNED)").fetch_one(&mut c).await
        })
        .expect("max_allowed_packet")
    } else {
        16 << 20
    };
    let small = job(1, 1, 0, b"f", b"u1", b"small");
    let huge = job(2, 1, 0, b"f", b"u2", &vec![7; usize::try_from(packet).expect("size") + 1]);
    let batch = batch_of(&[&small, &huge], &[]);
    let started = Instant::now();
    let outcome = commit(&mut *store, &batch);
    if is_mysql(base) {
        match outcome {
            Err(StoreError::Database(why)) => assert!(why.contains("packet limit"), "{why}"),
            other => panic!("expected a database error, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(2), "it was retried");
        commit(&mut *store, &batch_of(&[&small], &[])).expect("commit after the refusal");
        assert_eq!(load(&mut *store), [small]);
    } else {
        outcome.expect("commit");
        assert_eq!(load(&mut *store), [small, huge]);
    }
}

fn not_a_queue_table(base: &str) {
    let table = Table::new(base);
    block_on(exec(base, &[&format!("CREATE TABLE {} (a INT)", table.name)])).expect("create");
    match open_sql(&table.url(), Duration::ZERO) {
        Err(StoreError::Database(why)) => assert!(why.contains("not a gearbox queue"), "{why}"),
        Err(e) => panic!("expected a database error, got {e}"),
        Ok(_) => panic!("opened a table that is not a queue"),
    }
}

/// A retry updates the job's time and attempts in place; both load back.
fn retries(base: &str) {
    let table = Table::new(base);
    let mut store = open(&table.url());
    let jobs = [job(1, 1, 0, b"f", b"u1", b"one"), job(2, 1, 0, b"f", b"", b"two")];
    commit(&mut *store, &batch_of(&jobs.iter().collect::<Vec<_>>(), &[])).expect("commit adds");
    let mut batch = Batch::default();
    batch.push_retry(1, Loc(1), 1, 1_800_000_000, 2, (b"f", b"u1"), None, 3, true);
    let mut locs = Vec::new();
    store.commit(&batch, &mut locs).expect("commit a retry");
    assert_eq!(locs, [Loc(1)]);
    drop(store);
    let mut store = open(&table.url());
    let loaded = load(&mut *store);
    let retried = StoredJob { run_at: 1_800_000_000, attempts: 2, ..jobs[0].clone() };
    assert_eq!(loaded, [retried, jobs[1].clone()]);
}

/// A table of schema 1 (before attempts) gains the column at open and keeps its jobs.
fn migrates_schema_1(base: &str) {
    let table = Table::new(base);
    let t = &table.name;
    let ddl = if is_mysql(base) {
        format!(
            "CREATE TABLE {t} (seq BIGINT NOT NULL PRIMARY KEY, priority SMALLINT NOT NULL, run_at BIGINT NOT NULL, \
             function_name BLOB NOT NULL, unique_key BLOB NOT NULL, data LONGBLOB NOT NULL, \
             created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB COMMENT='gearbox queue, schema 1'"
        )
    } else {
        format!(
            "CREATE TABLE {t} (seq BIGINT NOT NULL PRIMARY KEY, priority SMALLINT NOT NULL, run_at BIGINT NOT NULL, \
             function_name BYTEA NOT NULL, unique_key BYTEA NOT NULL, data BYTEA NOT NULL, \
             created_at TIMESTAMPTZ NOT NULL DEFAULT now()); COMMENT ON TABLE {t} IS 'gearbox queue, schema 1'"
        )
    };
    let insert = format!(
        "INSERT INTO {t} (seq, priority, run_at, function_name, unique_key, data) VALUES (7, 1, 0, 'f', 'u', 'd')"
    );
    block_on(exec(base, &[&ddl, &insert])).expect("a schema 1 table");
    let mut store = open(&table.url());
    assert_eq!(load(&mut *store), [job(7, 1, 0, b"f", b"u", b"d")]);
    drop(store);
    // Migrated once: the next open finds schema 2.
    let mut store = open(&table.url());
    assert_eq!(load(&mut *store).len(), 1);
}

on_both_backends!(
    roundtrip,
    big_batch,
    reconnect_after_session_killed,
    oversized_job,
    not_a_queue_table,
    retries,
    migrates_schema_1
);

// --- Database restarts, on private instances ---

fn spare_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local address").port()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The first of `names` found on the PATH or in the sbin directories, which a non-root PATH
/// may lack.
fn program(names: &[&str]) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs: Vec<&str> = path.split(':').chain(["/usr/sbin", "/usr/local/sbin", "/sbin"]).collect();
    names
        .iter()
        .flat_map(|name| dirs.iter().map(move |dir| Path::new(dir).join(name)))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("none of {names:?} is installed"))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
}

/// Waits until `url` accepts connections.
fn wait_ready(url: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let connected = block_on(async {
            if is_mysql(url) {
                MySqlConnection::connect(url).await.map(drop)
            } else {
                PgConnection::connect(url).await.map(drop)
            }
        });
        match connected {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => {
                panic!("{url} not ready: {e}\n{}", std::fs::read_to_string(log).unwrap_or_default())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

trait Instance {
    /// The URL of its database `test`.
    fn url(&self) -> String;
    fn start(&mut self);
    fn stop(&mut self);
}

struct Mariadb {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Mariadb {
    fn new() -> Mariadb {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut install = Command::new(program(&["mariadb-install-db", "mysql_install_db"]));
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        if is_root() {
            install.arg("--user=root");
        }
        run(&mut install);
        let mut db = Mariadb { dir, port: spare_port(), child: None };
        db.start();
        let server = format!("mysql://root@127.0.0.1:{}", db.port);
        block_on(exec(&server, &["CREATE DATABASE test"])).expect("create database");
        db
    }
}

impl Instance for Mariadb {
    fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/test", self.port)
    }

    fn start(&mut self) {
        let dir = self.dir.path();
        let log = dir.join("error.log");
        let mut cmd = Command::new(program(&["mariadbd", "mysqld"]));
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--port={}", self.port))
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg(format!("--log-error={}", log.display()))
            .args(["--bind-address=127.0.0.1", "--skip-log-bin", "--innodb-buffer-pool-size=16M"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if is_root() {
            cmd.arg("--user=root");
        }
        self.child = Some(cmd.spawn().expect("start mariadbd"));
        wait_ready(&format!("mysql://root@127.0.0.1:{}", self.port), &log);
    }

    fn stop(&mut self) {
        stop_child(&mut self.child, libc::SIGTERM);
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGKILL);
    }
}

struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// postgres refuses to run as root: run it as the `postgres` user then.
    user: Option<(u32, u32)>,
    child: Option<Child>,
}

impl Postgres {
    fn new() -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries in /usr/lib/postgresql")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .max()
            .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
            .expect("a PostgreSQL version in /usr/lib/postgresql");
        let dir = tempfile::tempdir().expect("temp dir");
        let user = is_root().then(|| {
            // SAFETY: getpwnam with a NUL-terminated name; the record is read at once.
            let pw = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
            assert!(!pw.is_null(), "no postgres user to run PostgreSQL as");
            // SAFETY: non-null, points to the static record getpwnam filled in.
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the temp dir");
            (uid, gid)
        });
        let mut db = Postgres { dir, bin, port: spare_port(), user, child: None };
        let mut initdb = db.command("initdb");
        initdb.arg("-D").arg(db.dir.path().join("data")).args(["-A", "trust", "-U", "root", "--no-sync"]);
        run(&mut initdb);
        db.start();
        let server = format!("postgres://root@127.0.0.1:{}/postgres", db.port);
        block_on(exec(&server, &["CREATE DATABASE test"])).expect("create database");
        db
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd.stdin(Stdio::null());
        cmd
    }
}

impl Instance for Postgres {
    fn url(&self) -> String {
        format!("postgres://root@127.0.0.1:{}/test", self.port)
    }

    fn start(&mut self) {
        let dir = self.dir.path();
        let log_path = dir.join("postgres.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("log file");
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(dir.join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(dir)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        self.child = Some(cmd.spawn().expect("start postgres"));
        wait_ready(&format!("postgres://root@127.0.0.1:{}/postgres", self.port), &log_path);
    }

    fn stop(&mut self) {
        // Fast shutdown: sessions are ended at once.
        stop_child(&mut self.child, libc::SIGINT);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGQUIT);
    }
}

/// A commit made while the database is down waits for it to come back, then succeeds.
fn survives_restart(db: &mut dyn Instance) {
    let url = format!("{}?table=gearbox_queue", db.url());
    let mut store = open(&url);
    let before: Vec<StoredJob> =
        (1..=3).map(|seq| job(seq, 1, 0, b"f", format!("u{seq}").as_bytes(), b"before")).collect();
    commit(&mut *store, &batch_of(&before.iter().collect::<Vec<_>>(), &[])).expect("commit");

    db.stop();
    let during: Vec<StoredJob> =
        (4..=6).map(|seq| job(seq, 2, 0, b"f", format!("u{seq}").as_bytes(), b"during")).collect();
    let batch = batch_of(&during.iter().collect::<Vec<_>>(), &[1]);
    let committing = std::thread::spawn(move || {
        let outcome = commit(&mut *store, &batch);
        (store, outcome)
    });
    // An outage of half a second, during which the commit must keep retrying.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!committing.is_finished(), "the commit returned while the database was down");
    let restarted = Instant::now();
    db.start();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !committing.is_finished() {
        assert!(Instant::now() < deadline, "the commit still waits after the restart");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut store, outcome) = committing.join().expect("commit thread");
    outcome.expect("commit across the restart");
    eprintln!("{}: committed {:.1?} after the restart began", db.url(), restarted.elapsed());

    let expected: Vec<StoredJob> = before[1..].iter().chain(&during).cloned().collect();
    assert_eq!(load(&mut *store), expected);
    // The store took its lock again.
    assert_locked(&url, "gearbox_queue");
}

#[test]
fn mysql_restart() {
    survives_restart(&mut Mariadb::new());
}

#[test]
fn postgres_restart() {
    survives_restart(&mut Postgres::new());
}
