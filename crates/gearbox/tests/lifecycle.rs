//! The job lifecycle end to end, against the `gearbox` binary: retries with backoff, the dead
//! set (across SIGKILL, retried from the CLI), pausing, concurrency limits and periodic jobs
//! (also across a restart).

mod common;

use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::gear::{Conn, Outcome, TestWorker};
use common::{admin, gearbox, temp_data_dir, wait_for, Server};
use gearbox_proto::{GrabKind, Request, Response};
use serde_json::Value;

fn json_lines(out: &Output) -> Vec<Value> {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn log_records(server: &Server, handle: &str) -> Vec<Value> {
    let mut records = json_lines(&gearbox(server, &["log", "--json", "-n", "100", "--handle", handle]));
    records.reverse(); // oldest first
    records
}

#[test]
fn a_failing_job_backs_off_and_completes_on_its_third_attempt() {
    let server = Server::start(&["--retry", "flaky=3/100ms"]);
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let _worker = TestWorker::start(server.addr, "flaky", Duration::ZERO, attempts.clone(), |n| match n {
        1 | 2 => Outcome::Fail,
        _ => Outcome::Complete,
    });
    let mut client = Conn::connect(server.addr).unwrap();
    let handle = client.submit_background("flaky", "report-42", "payload").unwrap();
    wait_for("the first failure", || !attempts.lock().unwrap().is_empty());
    // Between attempts the job keeps its handle and unique key: known, not running.
    wait_for("three records", || log_records(&server, &handle).len() == 3);
    let records = log_records(&server, &handle);
    let statuses: Vec<&str> = records.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["fail", "fail", "complete"], "{records:#?}");
    let numbers: Vec<u64> = records.iter().map(|r| r["attempt"].as_u64().unwrap()).collect();
    assert_eq!(numbers, [1, 2, 3]);
    let seen = attempts.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|a| a.handle == handle && a.unique == "report-42" && a.data == "payload"));
    // 100 ms then 200 ms, each ±10%.
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(gaps[0] >= Duration::from_millis(90), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(180), "{gaps:?}");
    assert!(gaps[1] > gaps[0], "{gaps:?}");
    let stats = admin(server.addr, "stats");
    assert!(stats.contains("jobs_retried\t2\n"), "{stats}");
    assert!(stats.contains("jobs_completed\t1\n"), "{stats}");
}

#[test]
fn a_job_waiting_for_its_retry_is_known_and_survives_a_restart() {
    let dir = temp_data_dir();
    let mut server = Server::start_in(dir.clone(), &["--retry", "later=2/3s"]);
    let handle = {
        let mut client = Conn::connect(server.addr).unwrap();
        let handle = client.submit_background("later", "u-later", "p").unwrap();
        let mut worker = Conn::connect(server.addr).unwrap();
        worker.send(&Request::CanDo { function: "later".into() }).unwrap();
        worker.send(&Request::GrabJob(GrabKind::Plain)).unwrap();
        match worker.recv(Duration::from_secs(10)).unwrap() {
            Some(Response::JobAssign { handle: h, .. }) => worker.send(&Request::WorkFail { handle: h }).unwrap(),
            other => panic!("expected the job, got {other:?}"),
        }
        wait_for("the retry to be scheduled", || client.status(&handle) == (true, false, 0, 0));
        assert_eq!(client.status_unique("u-later"), (true, false));
        handle
    };
    // The retry's record is durable before the job waits: a SIGKILL keeps it.
    wait_for("the failure in the log", || log_records(&server, &handle).len() == 1);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    std::mem::forget(server);
    let server = Server::start_in(dir, &["--retry", "later=2/3s"]);
    let mut client = Conn::connect(server.addr).unwrap();
    assert_eq!(client.status(&handle), (true, false, 0, 0));
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let _worker = TestWorker::start(server.addr, "later", Duration::ZERO, attempts.clone(), |_| Outcome::Complete);
    wait_for("the second attempt", || !attempts.lock().unwrap().is_empty());
    let attempt = attempts.lock().unwrap()[0].clone();
    assert_eq!((attempt.handle.as_str(), attempt.unique.as_str()), (handle.as_str(), "u-later"));
    wait_for("its completion in the log", || log_records(&server, &handle).iter().any(|r| r["status"] == "complete"));
    let done = log_records(&server, &handle).into_iter().find(|r| r["status"] == "complete").unwrap();
    assert_eq!(done["attempt"], 2, "the attempt count outlives the restart: {done}");
}

fn dead_list(server: &Server, function: &str) -> Vec<Value> {
    json_lines(&gearbox(server, &["dead", "list", "--json", "--function", function]))
}

#[test]
fn a_job_that_always_fails_lands_in_the_dead_set_survives_sigkill_and_runs_again() {
    let dir = temp_data_dir();
    let mut server = Server::start_in(dir.clone(), &["--retry", "doomed=1/50ms"]);
    let handle = {
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let _worker =
            TestWorker::start(server.addr, "doomed", Duration::ZERO, attempts.clone(), |_| Outcome::Exception);
        let mut client = Conn::connect(server.addr).unwrap();
        let handle = client.submit_background("doomed", "order-7", "the payload\0with a NUL").unwrap();
        wait_for("the dead set", || dead_list(&server, "doomed").len() == 1);
        assert_eq!(attempts.lock().unwrap().len(), 2, "one attempt and one retry");
        assert_eq!(client.status(&handle), (false, false, 0, 0), "a dead job is no longer queued");
        handle
    };
    let dead = &dead_list(&server, "doomed")[0];
    assert_eq!(dead["handle"], handle.as_str());
    assert_eq!(dead["unique"], "order-7");
    assert_eq!(dead["attempts"], 2);
    assert_eq!(dead["error"], "disk full");
    // The unique key is free again: a new submission is a new job.
    let other = Conn::connect(server.addr).unwrap().submit_background("other", "order-7", "").unwrap();
    assert_ne!(other, handle);

    server.child.kill().unwrap();
    server.child.wait().unwrap();
    std::mem::forget(server);
    let server = Server::start_in(dir, &["--retry", "doomed=1/50ms"]);
    let shown = json_lines(&gearbox(&server, &["dead", "show", "--json", &handle]));
    assert_eq!(shown[0]["payload"], "the payload\u{0}with a NUL");
    assert_eq!(shown[0]["function"], "doomed");

    // The worker is fixed: run it again from the CLI.
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let _worker = TestWorker::start(server.addr, "doomed", Duration::ZERO, attempts.clone(), |_| Outcome::Complete);
    let retried = json_lines(&gearbox(&server, &["dead", "retry", "--json", &handle]));
    let new_handle = retried[0]["new_handle"].as_str().expect("a new handle").to_string();
    wait_for("the job to run again", || attempts.lock().unwrap().len() == 1);
    let again = attempts.lock().unwrap()[0].clone();
    assert_eq!((again.handle.as_str(), again.unique.as_str()), (new_handle.as_str(), "order-7"));
    assert_eq!(again.data, "the payload\u{0}with a NUL");
    assert!(dead_list(&server, "doomed").is_empty());
    let missing = gearbox(&server, &["dead", "retry", &handle]);
    assert!(!missing.status.success(), "a handle no longer dead is refused: {missing:?}");
}

#[test]
fn dead_jobs_are_deleted_in_bulk_and_none_turns_the_dead_set_off() {
    let server = Server::start(&[]);
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let _worker = TestWorker::start(server.addr, "bad", Duration::ZERO, attempts.clone(), |_| Outcome::Fail);
    let mut client = Conn::connect(server.addr).unwrap();
    for i in 0..5 {
        client.submit_background("bad", &format!("b{i}"), "x").unwrap();
    }
    wait_for("five dead jobs", || dead_list(&server, "bad").len() == 5);
    let out = gearbox(&server, &["dead", "delete", "--all", "--function", "bad"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("deleted 5"), "{out:?}");
    assert!(dead_list(&server, "bad").is_empty());
    drop(_worker);

    let off = Server::start(&["--dead", "none"]);
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let _worker = TestWorker::start(off.addr, "bad", Duration::ZERO, attempts.clone(), |_| Outcome::Fail);
    Conn::connect(off.addr).unwrap().submit_background("bad", "", "x").unwrap();
    wait_for("the attempt", || attempts.lock().unwrap().len() == 1);
    wait_for("its record", || admin(off.addr, "stats").contains("jobs_failed\t1\n"));
    assert!(dead_list(&off, "bad").is_empty());
}

#[test]
fn a_paused_function_takes_jobs_gives_none_and_stays_paused_across_a_restart() {
    let dir = temp_data_dir();
    let mut server = Server::start_in(dir.clone(), &[]);
    assert_eq!(admin(server.addr, "pause reports"), "OK\r\n");
    let mut client = Conn::connect(server.addr).unwrap();
    let handles: Vec<String> =
        (0..3).map(|i| client.submit_background("reports", &format!("r{i}"), "").unwrap()).collect();
    server.terminate();
    std::mem::forget(server);

    let server = Server::start_in(dir, &[]);
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let _worker = TestWorker::start(server.addr, "reports", Duration::ZERO, attempts.clone(), |_| Outcome::Complete);
    // A worker asking for a paused function's jobs gets NO_JOB.
    let mut probe = Conn::connect(server.addr).unwrap();
    probe.send(&Request::CanDo { function: "reports".into() }).unwrap();
    probe.send(&Request::GrabJob(GrabKind::Plain)).unwrap();
    assert!(matches!(probe.recv(Duration::from_secs(5)).unwrap(), Some(Response::NoJob)));
    drop(probe);
    let limits = admin(server.addr, "limit");
    assert!(limits.contains("reports\tpaused\t0\n"), "{limits}");
    // The worker sleeps rather than spinning: it has not been given anything for a while.
    std::thread::sleep(Duration::from_millis(500));
    assert!(attempts.lock().unwrap().is_empty());
    let out = gearbox(&server, &["admin", "resume", "reports"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("every job to run", || attempts.lock().unwrap().len() == 3);
    let mut ran: Vec<String> = attempts.lock().unwrap().iter().map(|a| a.handle.clone()).collect();
    ran.sort();
    let mut expected = handles.clone();
    expected.sort();
    assert_eq!(ran, expected);
}

#[test]
fn a_limit_of_two_never_runs_three_at_once() {
    let server = Server::start(&["--limit", "slow=2"]);
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<JoinHandle<()>> = (0..6)
        .map(|_| {
            let (addr, running, most, done) = (server.addr, running.clone(), most.clone(), done.clone());
            std::thread::spawn(move || {
                let mut conn = Conn::connect(addr).unwrap();
                conn.send(&Request::CanDo { function: "slow".into() }).unwrap();
                let deadline = Instant::now() + Duration::from_secs(30);
                while done.load(Ordering::SeqCst) < 12 && Instant::now() < deadline {
                    conn.send(&Request::GrabJob(GrabKind::Plain)).unwrap();
                    match conn.recv(Duration::from_secs(2)).unwrap() {
                        Some(Response::JobAssign { handle, .. }) => {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(150));
                            running.fetch_sub(1, Ordering::SeqCst);
                            conn.send(&Request::WorkComplete { handle, data: Default::default() }).unwrap();
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {
                            conn.send(&Request::PreSleep).unwrap();
                            let _ = conn.recv(Duration::from_millis(300));
                        }
                    }
                }
            })
        })
        .collect();
    let mut client = Conn::connect(server.addr).unwrap();
    for i in 0..12 {
        client.submit_background("slow", &format!("s{i}"), "").unwrap();
    }
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 12, "every job ran");
    assert_eq!(most.load(Ordering::SeqCst), 2, "two at once, never three");
}

fn write_config(dir: &std::path::Path, text: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("gearbox.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn an_every_second_schedule_fires_once_per_tick_across_a_restart() {
    let dir = temp_data_dir();
    let config_dir = std::env::temp_dir().join(format!("gearbox-schedule-{}", std::process::id()));
    let config = write_config(
        &config_dir,
        "[[schedule]]\nname = \"beat\"\nfunction = \"tick\"\ncron = \"* * * * * *\"\npayload = \"hello\"\n",
    );
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut server = Server::start_in(dir.clone(), &["--config", &config]);
    let worker = TestWorker::start(server.addr, "tick", Duration::ZERO, attempts.clone(), |_| Outcome::Complete);
    std::thread::sleep(Duration::from_millis(2600));
    drop(worker);
    server.terminate();
    std::mem::forget(server);
    let server = Server::start_in(dir, &["--config", &config]);
    let _worker = TestWorker::start(server.addr, "tick", Duration::ZERO, attempts.clone(), |_| Outcome::Complete);
    std::thread::sleep(Duration::from_millis(2600));
    let elapsed = started.elapsed().as_secs() as usize;
    let seen = attempts.lock().unwrap().clone();
    let mut ticks: Vec<i64> = seen
        .iter()
        .map(|a| {
            assert_eq!(a.data, "hello");
            a.unique.strip_prefix("beat@").expect("NAME@UNIX_TIME").parse().unwrap()
        })
        .collect();
    let count = ticks.len();
    ticks.dedup();
    assert_eq!(ticks.len(), count, "no tick ran twice: {seen:?}");
    // Two runs of about 2.6 s each, with the restart between them not replayed.
    assert!((3..=elapsed + 1).contains(&count), "{count} ticks in {elapsed} s: {seen:?}");
    assert!(ticks.windows(2).all(|w| w[1] > w[0]));
    let _ = std::fs::remove_dir_all(config_dir);
}

#[test]
fn retry_policies_change_at_runtime() {
    let server = Server::start(&["--retry", "*=4/1s"]);
    assert_eq!(admin(server.addr, "retry mail 2/10ms"), "OK\r\n");
    let list = admin(server.addr, "retry");
    assert!(list.contains("*\t4\texponential\t1s\t"), "{list}");
    assert!(list.contains("mail\t2\texponential\t10ms\t"), "{list}");
    assert_eq!(admin(server.addr, "retry mail none"), "OK\r\n");
    assert!(!admin(server.addr, "retry").contains("mail"));
    assert!(admin(server.addr, "retry mail lots").starts_with("ERR INVALID_ARGUMENTS"));
}

/// Runs SQL statements on the test machine's MariaDB.
fn mariadb(statements: &[String]) -> Vec<i64> {
    use sqlx::Connection;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = sqlx::MySqlConnection::connect("mysql://root@127.0.0.1:3306/test").await.unwrap();
        let mut counts = Vec::new();
        for s in statements {
            if s.starts_with("SELECT") {
                counts.push(sqlx::query_scalar(s).fetch_one(&mut c).await.unwrap());
            } else {
                sqlx::query(s).execute(&mut c).await.unwrap();
            }
        }
        counts
    })
}

/// When the dead set cannot be written (here its table is gone), a job that died stays in
/// the queue while other jobs go on; after a restart, with the table back, it runs again and
/// lands in the dead set. Nothing is lost.
/// Drops a queue table and the lifecycle's tables beside it, at the end of a test.
struct Tables(String);

impl Drop for Tables {
    fn drop(&mut self) {
        let t = &self.0;
        mariadb(&[format!("DROP TABLE IF EXISTS {t}, {t}_dead, {t}_state")]);
    }
}

#[test]
fn a_dead_job_the_dead_set_refuses_stays_queued() {
    let table = format!("lc_refused_{}", std::process::id());
    let _tables = Tables(table.clone());
    let url = format!("mysql://root@127.0.0.1:3306/test?table={table}");
    let dir = temp_data_dir();
    let mut server = Server::start_in(dir.clone(), &["--queue", &url]);
    mariadb(&[format!("DROP TABLE {table}_dead")]);
    let (failed, done) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let failing = TestWorker::start(server.addr, "doomed", Duration::ZERO, failed.clone(), |_| Outcome::Fail);
    let fine = TestWorker::start(server.addr, "fine", Duration::ZERO, done.clone(), |_| Outcome::Complete);
    let mut client = Conn::connect(server.addr).unwrap();
    client.submit_background("doomed", "d1", "keep me").unwrap();
    wait_for("the failure", || !failed.lock().unwrap().is_empty());
    wait_for("the refusal in the log", || !server.logged("dead jobs not written").is_empty());
    for i in 0..20 {
        client.submit_background("fine", &format!("f{i}"), "").unwrap();
    }
    wait_for("the other jobs", || done.lock().unwrap().len() == 20);
    let rows =
        |function: &str| mariadb(&[format!("SELECT COUNT(*) FROM {table} WHERE function_name = '{function}'")])[0];
    wait_for("the other jobs' rows to go", || rows("fine") == 0);
    assert_eq!(rows("doomed"), 1, "the dead job's row stays while the dead set refuses it");
    drop((failing, fine));
    server.terminate();
    std::mem::forget(server);

    // The restart creates the dead set's table again; the job runs and dies once more.
    let server = Server::start_in(dir, &["--queue", &url]);
    let failed = Arc::new(Mutex::new(Vec::new()));
    let _failing = TestWorker::start(server.addr, "doomed", Duration::ZERO, failed.clone(), |_| Outcome::Fail);
    wait_for("the dead set", || dead_list(&server, "doomed").len() == 1);
    assert_eq!(failed.lock().unwrap()[0].data, "keep me");
    wait_for("its row to go", || rows("doomed") == 0);
}
