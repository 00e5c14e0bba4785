//! The job lifecycle's state (dead jobs, paused functions, schedule ticks) on every backend:
//! an in-memory SQLite database, an SQLite file (opened again: the state survives), and the
//! shared MariaDB and PostgreSQL, each test on tables of its own.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{block_on, exec, Table, MYSQL, POSTGRES};
use gearbox_store::lifecycle::{
    open_lifecycle, DeadEntry, DeadFilter, DeadJob, Lifecycle, LifecycleTarget, MAX_ERROR_BYTES, MAX_TABLE,
};
use gearbox_store::StoreError;

/// Where a test keeps the state.
enum Env {
    Memory,
    File(tempfile::TempDir),
    Db { base: &'static str, table: Table },
}

impl Env {
    fn memory() -> Env {
        Env::Memory
    }

    fn file() -> Env {
        Env::File(tempfile::tempdir().expect("temp dir"))
    }

    fn db(base: &'static str) -> Env {
        Env::Db { base, table: Table::new(base) }
    }

    fn target(&self) -> LifecycleTarget {
        match self {
            Env::Memory => LifecycleTarget::Memory,
            // A directory that does not exist yet.
            Env::File(dir) => LifecycleTarget::File(dir.path().join("state").join("lifecycle.db")),
            Env::Db { table, .. } => LifecycleTarget::Url(table.url()),
        }
    }

    fn open(&self) -> Arc<dyn Lifecycle> {
        open_lifecycle(self.target()).unwrap_or_else(|e| panic!("open {:?}: {e}", self.target()))
    }

    /// Whether another open sees the same state (not so in memory).
    fn shared(&self) -> bool {
        !matches!(self, Env::Memory)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Env::Db { base, table } = self {
            let drops = [
                format!("DROP TABLE IF EXISTS {}_dead", table.name),
                format!("DROP TABLE IF EXISTS {}_state", table.name),
            ];
            if let Err(e) = block_on(exec(base, &[&drops[0], &drops[1]])) {
                eprintln!("could not drop {}'s lifecycle tables: {e}", table.name);
            }
        }
    }
}

/// Defines `memory::NAME`, `file::NAME`, `mysql::NAME` and `postgres::NAME` tests that run
/// `NAME(&env)`, for each NAME.
macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(#[test] fn $test() { super::$test(&super::Env::memory()) })*
        }
        mod file {
            $(#[test] fn $test() { super::$test(&super::Env::file()) })*
        }
        mod mysql {
            $(#[test] fn $test() { super::$test(&super::Env::db(super::MYSQL)) })*
        }
        mod postgres {
            $(#[test] fn $test() { super::$test(&super::Env::db(super::POSTGRES)) })*
        }
    };
}

on_every_backend!(dead_set, dead_expire_at_scale, paused_functions, ticks, tick_race);

#[allow(clippy::too_many_arguments)]
fn dead(
    handle: &str,
    function: &[u8],
    unique: &[u8],
    data: &[u8],
    priority: u8,
    attempts: u32,
    error: &str,
    died_at: i64,
) -> DeadJob {
    DeadJob {
        handle: handle.into(),
        function: function.into(),
        unique: unique.into(),
        data: data.into(),
        priority,
        attempts,
        error: error.into(),
        died_at,
    }
}

fn entry(j: &DeadJob) -> DeadEntry {
    DeadEntry {
        handle: j.handle.clone(),
        function: j.function.clone(),
        unique: j.unique.clone(),
        data_len: j.data.len() as u64,
        priority: j.priority,
        attempts: j.attempts,
        error: j.error.clone(),
        died_at: j.died_at,
    }
}

fn list(lc: &dyn Lifecycle, function: Option<&[u8]>, limit: usize, offset: usize) -> Vec<DeadEntry> {
    lc.dead_list(&DeadFilter { function: function.map(<[u8]>::to_vec), limit, offset }).expect("dead_list")
}

fn handles(entries: &[DeadEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.handle.as_str()).collect()
}

fn dead_set(env: &Env) {
    let lc = env.open();
    assert!(list(&*lc, None, 0, 0).is_empty());
    assert!(lc.dead_counts().unwrap().is_empty());
    assert_eq!(lc.dead_get("H:a:1").unwrap(), None);
    assert_eq!(lc.dead_remove(&["H:a:1".into()]).unwrap(), 0);
    lc.bury(&[]).unwrap();

    let binary_fn: &[u8] = b"bin\0\xff\x80";
    let jobs = vec![
        dead("H:a:1", b"resize", b"u1", b"\0\x01\xff\0 not utf-8: \xc3\x28", 0, 3, "boom", 1_000),
        dead(
            "H:a:2",
            binary_fn,
            b"\x00\xfe",
            &[0; 100_000],
            2,
            u32::MAX,
            "d\u{e9}j\u{e0} vu \u{2713} \u{1F600}",
            3_000,
        ),
        dead("H:a:3", b"resize", b"", b"", 1, 1, "", 2_000),
        // Dies with H:a:3: the handle breaks the tie.
        dead("H:b:1", b"resize", b"u4", b"four", 1, 2, "timeout", 2_000),
        dead("H:a:4", b"email", b"u5", b"five", 1, 1, "smtp", 500),
    ];
    lc.bury(&jobs).unwrap();
    let order = ["H:a:2", "H:a:3", "H:b:1", "H:a:1", "H:a:4"];
    let all = list(&*lc, None, 0, 0);
    assert_eq!(handles(&all), order);
    let by_handle: BTreeMap<&str, &DeadJob> = jobs.iter().map(|j| (j.handle.as_str(), j)).collect();
    assert_eq!(all, order.iter().map(|h| entry(by_handle[h])).collect::<Vec<_>>());

    // Filter and pages.
    assert_eq!(handles(&list(&*lc, Some(b"resize"), 0, 0)), ["H:a:3", "H:b:1", "H:a:1"]);
    assert_eq!(handles(&list(&*lc, Some(binary_fn), 0, 0)), ["H:a:2"]);
    assert_eq!(handles(&list(&*lc, Some(b"bin"), 0, 0)), Vec::<&str>::new());
    assert_eq!(handles(&list(&*lc, None, 2, 0)), ["H:a:2", "H:a:3"]);
    assert_eq!(handles(&list(&*lc, None, 2, 2)), ["H:b:1", "H:a:1"]);
    assert_eq!(handles(&list(&*lc, None, 2, 4)), ["H:a:4"]);
    assert_eq!(handles(&list(&*lc, None, 0, 3)), ["H:a:1", "H:a:4"]);
    assert!(list(&*lc, None, 0, 5).is_empty());
    assert_eq!(handles(&list(&*lc, Some(b"resize"), 1, 1)), ["H:b:1"]);
    assert_eq!(lc.dead_counts().unwrap(), [(binary_fn.to_vec(), 1), (b"email".to_vec(), 1), (b"resize".to_vec(), 3)]);
    for job in &jobs {
        assert_eq!(lc.dead_get(&job.handle).unwrap().as_ref(), Some(job), "{}", job.handle);
    }

    // Burying a handle again replaces its entry; in one call, the later job wins.
    let again = dead("H:a:1", b"resize", b"u1", b"retried\0", 1, 4, "again", 4_000);
    lc.bury(&[dead("H:a:1", b"x", b"", b"", 0, 0, "first", 1), again.clone()]).unwrap();
    assert_eq!(lc.dead_get("H:a:1").unwrap(), Some(again.clone()));
    assert_eq!(handles(&list(&*lc, None, 0, 0)), ["H:a:1", "H:a:2", "H:a:3", "H:b:1", "H:a:4"]);
    assert_eq!(lc.dead_counts().unwrap()[2], (b"resize".to_vec(), 3));

    // Error texts: NUL becomes U+FFFD, and a long text is cut at a character boundary.
    let long = "\u{e9}".repeat(MAX_ERROR_BYTES);
    lc.bury(&[dead("H:c:1", b"f", b"", b"", 1, 1, "a\0b", 10), dead("H:c:2", b"f", b"", b"", 1, 1, &long, 11)])
        .unwrap();
    assert_eq!(lc.dead_get("H:c:1").unwrap().unwrap().error, "a\u{FFFD}b");
    let cut = lc.dead_get("H:c:2").unwrap().unwrap().error;
    assert_eq!(cut, "\u{e9}".repeat(MAX_ERROR_BYTES / 2));
    // A handle the column cannot hold is refused, and nothing of the call is kept.
    let too_long = "H:".to_string() + &"x".repeat(99);
    assert!(matches!(
        lc.bury(&[dead("H:c:3", b"f", b"", b"", 1, 1, "", 12), dead(&too_long, b"f", b"", b"", 1, 1, "", 12)]),
        Err(StoreError::Database(_))
    ));
    assert_eq!(lc.dead_get("H:c:3").unwrap(), None);

    // Removal counts what existed.
    assert_eq!(
        lc.dead_remove(&["H:a:3".into(), "H:nope".into(), "H:a:3".into(), "H:c:1".into(), "H:c:2".into()]).unwrap(),
        3
    );
    assert_eq!(lc.dead_remove(&["H:b:1".into(), "H:a:4".into()]).unwrap(), 2);
    assert_eq!(lc.dead_get("H:a:3").unwrap(), None);
    let left = vec![entry(&again), entry(&jobs[1])];
    assert_eq!(list(&*lc, None, 0, 0), left);

    if env.shared() {
        drop(lc);
        let lc = env.open();
        assert_eq!(list(&*lc, None, 0, 0), left);
        assert_eq!(lc.dead_get("H:a:2").unwrap().as_ref(), Some(&jobs[1]));
    }
}

/// Runs `f`, prints how long it took, and checks that it stayed well under a second.
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    let took = started.elapsed();
    eprintln!("{what}: {took:?}");
    assert!(took < Duration::from_millis(500), "{what} took {took:?}");
    out
}

fn dead_expire_at_scale(env: &Env) {
    const N: usize = 20_000;
    const T0: i64 = 1_700_000_000_000;
    let lc = env.open();
    // Two jobs die each millisecond: the handle orders them.
    let jobs: Vec<DeadJob> = (0..N)
        .map(|i| {
            let function = format!("f{}", i % 4);
            dead(&format!("H:e:{i:05}"), function.as_bytes(), b"", &[i as u8; 16], 1, 1, "", T0 + (i / 2) as i64)
        })
        .collect();
    let started = Instant::now();
    lc.bury(&jobs).unwrap();
    eprintln!("bury {N}: {:?}", started.elapsed());
    // The model: list order, newest first.
    let mut model: Vec<(i64, String)> = jobs.iter().map(|j| (j.died_at, j.handle.clone())).collect();
    model.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let check = |model: &[(i64, String)]| {
        let listed = list(&*lc, None, 0, 0);
        assert_eq!(listed.len(), model.len());
        assert!(listed.iter().zip(model).all(|(e, (died_at, handle))| e.died_at == *died_at && &e.handle == handle));
        let counted: u64 = lc.dead_counts().unwrap().iter().map(|(_, n)| n).sum();
        assert_eq!(counted, model.len() as u64);
    };

    assert_eq!(timed("expire nothing (keep more)", || lc.dead_expire(None, Some(N as u64))).unwrap(), 0);
    assert_eq!(timed("expire nothing (none older)", || lc.dead_expire(Some(T0), None)).unwrap(), 0);
    assert_eq!(timed("expire by age", || lc.dead_expire(Some(T0 + 1_000), None)).unwrap(), 2_000);
    model.retain(|(died_at, _)| *died_at >= T0 + 1_000);
    check(&model);
    // An odd count splits a pair that died together.
    assert_eq!(timed("expire by count", || lc.dead_expire(None, Some(15_001))).unwrap(), 2_999);
    model.truncate(15_001);
    check(&model);
    assert_eq!(lc.dead_get(&model[15_000].1).unwrap().map(|j| j.died_at), Some(model[15_000].0));
    assert_eq!(timed("expire by age and count", || lc.dead_expire(Some(T0 + 5_000), Some(100))).unwrap(), 14_901);
    model.truncate(100);
    check(&model);
    assert_eq!(timed("page at depth", || list(&*lc, Some(b"f1"), 10, 20)).len(), 5);
    assert_eq!(lc.dead_expire(None, None).unwrap(), 0);
    assert_eq!(lc.dead_expire(None, Some(0)).unwrap(), 100);
    check(&[]);
}

fn paused_functions(env: &Env) {
    let lc = env.open();
    assert!(lc.paused().unwrap().is_empty());
    lc.set_paused(b"resize", true).unwrap();
    lc.set_paused(b"\0\xff", true).unwrap();
    lc.set_paused(b"resize", true).unwrap();
    lc.set_paused(b"email", false).unwrap();
    assert_eq!(lc.paused().unwrap(), [b"\0\xff".to_vec(), b"resize".to_vec()]);
    lc.set_paused(b"resize", false).unwrap();
    lc.set_paused(b"resize", false).unwrap();
    assert_eq!(lc.paused().unwrap(), [b"\0\xff".to_vec()]);
    // A schedule's tick is no paused function, even of the same name.
    assert!(lc.claim_tick("\0\u{ff}", 1).unwrap());
    assert_eq!(lc.paused().unwrap(), [b"\0\xff".to_vec()]);
    if env.shared() {
        drop(lc);
        assert_eq!(env.open().paused().unwrap(), [b"\0\xff".to_vec()]);
    }
}

fn ticks(env: &Env) {
    let lc = env.open();
    let name = "nightly report \u{2713}";
    assert_eq!(lc.last_tick(name).unwrap(), None);
    assert!(lc.claim_tick(name, 1_700_000_100).unwrap());
    assert!(!lc.claim_tick(name, 1_700_000_100).unwrap());
    assert!(!lc.claim_tick(name, 1_700_000_040).unwrap());
    assert_eq!(lc.last_tick(name).unwrap(), Some(1_700_000_100));
    assert!(lc.claim_tick(name, 1_700_000_160).unwrap());
    assert_eq!(lc.last_tick(name).unwrap(), Some(1_700_000_160));
    // Schedules are independent.
    assert!(lc.claim_tick("every minute", 60).unwrap());
    assert!(!lc.claim_tick("every minute", 0).unwrap());
    assert_eq!(lc.last_tick("every minute").unwrap(), Some(60));
    assert!(lc.claim_tick("negative", -5).unwrap());
    assert!(!lc.claim_tick("negative", i64::MIN).unwrap());
    assert_eq!(lc.last_tick(name).unwrap(), Some(1_700_000_160));
    if env.shared() {
        drop(lc);
        let lc = env.open();
        assert!(!lc.claim_tick(name, 1_700_000_160).unwrap());
        assert_eq!(lc.last_tick(name).unwrap(), Some(1_700_000_160));
        assert!(lc.claim_tick(name, 1_700_000_220).unwrap());
    }
}

/// Four servers (each with a lifecycle of its own, opened together on fresh tables) race for
/// each tick of a schedule: every tick is won exactly once.
fn tick_race(env: &Env) {
    const SERVERS: usize = 4;
    const TICKS: i64 = 50;
    let barrier = Arc::new(Barrier::new(SERVERS));
    // In memory the servers share one lifecycle (another open would be another database).
    let one = (!env.shared()).then(|| env.open());
    let won: Vec<Vec<i64>> = std::thread::scope(|s| {
        let servers: Vec<_> = (0..SERVERS)
            .map(|_| {
                let barrier = barrier.clone();
                let target = env.target();
                let one = one.clone();
                s.spawn(move || {
                    barrier.wait();
                    let lc = one.unwrap_or_else(|| open_lifecycle(target).expect("open"));
                    let mut won = Vec::new();
                    for tick in 1..=TICKS {
                        barrier.wait();
                        if lc.claim_tick("race", tick).expect("claim_tick") {
                            won.push(tick);
                        }
                    }
                    won
                })
            })
            .collect();
        servers.into_iter().map(|s| s.join().expect("server thread")).collect()
    });
    let mut all: Vec<i64> = won.concat();
    all.sort_unstable();
    assert_eq!(all, (1..=TICKS).collect::<Vec<_>>(), "wins per server: {won:?}");
    assert_eq!(one.unwrap_or_else(|| env.open()).last_tick("race").unwrap(), Some(TICKS));
}

/// The server calls from `spawn_blocking`, and may drop its last handle in an async task.
#[test]
fn called_from_a_tokio_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lifecycle.db");
    rt.block_on(async {
        for target in [LifecycleTarget::Memory, LifecycleTarget::File(path.clone())] {
            let lc = tokio::task::spawn_blocking(move || open_lifecycle(target)).await.unwrap().unwrap();
            let claim = lc.clone();
            assert!(tokio::task::spawn_blocking(move || claim.claim_tick("s", 1)).await.unwrap().unwrap());
            // The last handle goes inside the runtime.
            drop(lc);
        }
    });
    let lc = open_lifecycle(LifecycleTarget::File(path)).unwrap();
    assert_eq!(lc.last_tick("s").unwrap(), Some(1));
}

#[test]
fn describes_and_refuses_bad_places() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(open_lifecycle(LifecycleTarget::Memory).unwrap().describe(), "in-memory lifecycle state");
    let path = dir.path().join("lc.db");
    assert_eq!(
        open_lifecycle(LifecycleTarget::File(path.clone())).unwrap().describe(),
        format!("lifecycle state in {}", path.display())
    );

    // The file is in WAL mode (which the file keeps).
    let mode: String = block_on(async {
        use sqlx::ConnectOptions;
        let mut c = sqlx::sqlite::SqliteConnectOptions::new().filename(&path).connect().await?;
        sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut c).await
    })
    .unwrap();
    assert_eq!(mode, "wal");

    // A file's directory that cannot be made.
    let blocked = dir.path().join("plain-file");
    std::fs::write(&blocked, b"x").unwrap();
    let under: PathBuf = blocked.join("lc.db");
    assert!(matches!(open_lifecycle(LifecycleTarget::File(under)), Err(StoreError::Io { .. })));
    // An SQLite file of something else.
    let other = dir.path().join("other.db");
    block_on(async {
        use sqlx::{ConnectOptions, Executor};
        let mut c =
            sqlx::sqlite::SqliteConnectOptions::new().filename(&other).create_if_missing(true).connect().await?;
        c.execute("PRAGMA user_version = 7").await.map(drop)
    })
    .unwrap();
    let e = open_lifecycle(LifecycleTarget::File(other)).err().expect("refused");
    assert!(e.to_string().contains("user_version is 7"), "{e}");

    let long = "t".repeat(MAX_TABLE + 1);
    for url in [format!("{MYSQL}?table={long}"), "redis://localhost/0".into(), format!("{POSTGRES}?table=a;b")] {
        assert!(matches!(open_lifecycle(LifecycleTarget::Url(url.clone())), Err(StoreError::Database(_))), "{url}");
    }
}

/// Tables of the lifecycle's names that are something else are refused, not used.
fn foreign_tables(base: &'static str) {
    let env = Env::db(base);
    let Env::Db { table, .. } = &env else { unreachable!() };
    block_on(exec(base, &[&format!("CREATE TABLE {}_dead (id BIGINT)", table.name)])).unwrap();
    let e = open_lifecycle(env.target()).err().expect("refused");
    assert!(e.to_string().contains("is not a gearbox lifecycle table"), "{e}");
}

#[test]
fn foreign_tables_mysql() {
    foreign_tables(MYSQL);
}

#[test]
fn foreign_tables_postgres() {
    foreign_tables(POSTGRES);
}

/// On the URL the test gives, the lifecycle names its own tables and sessions.
#[test]
fn describes_a_database() {
    let env = Env::db(POSTGRES);
    let Env::Db { table, .. } = &env else { unreachable!() };
    let t = &table.name;
    assert_eq!(env.open().describe(), format!("{POSTGRES} tables {t}_dead, {t}_state"));
}

/// A PostgreSQL session ended behind the lifecycle's back (a database restart): the next
/// operations connect again.
#[test]
fn reconnects_postgres() {
    let env = Env::db(POSTGRES);
    let Env::Db { table, .. } = &env else { unreachable!() };
    let lc = env.open();
    assert!(lc.claim_tick("s", 1).unwrap());
    table.kill_session();
    assert!(lc.claim_tick("s", 2).unwrap());
    assert!(!lc.claim_tick("s", 2).unwrap());
    lc.bury(&[dead("H:r:1", b"f", b"", b"x", 1, 1, "", 1)]).unwrap();
    table.kill_session();
    assert_eq!(list(&*lc, None, 0, 0).len(), 1);
}

/// What a killed server had been told was durable is in the file when it is opened again
/// (the WAL, never checkpointed nor closed, is recovered).
#[test]
fn file_survives_sigkill() {
    const CHILD: &str = "GEARBOX_LIFECYCLE_CHILD_DB";
    let job = dead("H:k:1", b"f\0", b"u", b"payload\0", 1, 2, "died", 42);
    if let Some(path) = std::env::var_os(CHILD) {
        // The child: commit, say so, and wait to be killed (a while at most).
        let lc = open_lifecycle(LifecycleTarget::File(path.into())).unwrap();
        lc.bury(std::slice::from_ref(&job)).unwrap();
        lc.set_paused(b"f\0", true).unwrap();
        assert!(lc.claim_tick("s", 7).unwrap());
        println!("committed");
        std::io::Write::flush(&mut std::io::stdout()).unwrap();
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lc.db");
    let mut child = Some(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "file_survives_sigkill", "--nocapture", "--test-threads=1"])
            .env(CHILD, &path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.as_mut().unwrap().stdout.take().unwrap();
    let committed =
        std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(|l| l.ok()).any(|l| l.contains("committed"));
    common::stop_child(&mut child, libc::SIGKILL);
    assert!(committed, "the child did not commit");
    let lc = open_lifecycle(LifecycleTarget::File(path)).unwrap();
    assert_eq!(lc.dead_get("H:k:1").unwrap(), Some(job));
    assert_eq!(lc.paused().unwrap(), [b"f\0".to_vec()]);
    assert!(!lc.claim_tick("s", 7).unwrap());
}
