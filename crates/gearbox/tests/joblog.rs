//! The job log end to end: jobs run against the real binary with the embedded sink and with
//! MongoDB (the MongoDB-wire test server the README's test command starts; its address in
//! `GEARBOX_TEST_MONGO`), then read back with `gearbox log`, `gearbox result` and
//! `gearbox admin stats`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use bytes::BytesMut;
use common::{gearbox, get_json, request, temp_data_dir, wait_for, Server};
use gearbox_proto::{Decoder, GrabKind, Message, Priority, Request, Response};
use serde_json::Value;

/// A raw Gearman connection, to act as a client or worker exactly as a test needs.
struct Peer {
    stream: TcpStream,
    buf: BytesMut,
}

impl Peer {
    fn connect(server: &Server, id: &str) -> Peer {
        let stream = TcpStream::connect(server.addr).unwrap();
        stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut peer = Peer { stream, buf: BytesMut::new() };
        peer.send(Request::SetClientId { id: id.to_owned().into() });
        peer
    }

    fn send(&mut self, req: Request) {
        let mut out = BytesMut::new();
        req.encode(&mut out);
        self.stream.write_all(&out).unwrap();
    }

    fn recv(&mut self) -> Response {
        loop {
            if let Some(Message::Packet(frame)) = Decoder::default().decode(&mut self.buf).unwrap() {
                return Response::parse(&frame).unwrap();
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn submit_background(&mut self, function: &str, unique: &str, data: &str) -> String {
        self.send(Request::SubmitJob {
            function: function.to_owned().into(),
            unique: unique.to_owned().into(),
            data: data.to_owned().into(),
            priority: Priority::Normal,
            background: true,
        });
        match self.recv() {
            Response::JobCreated { handle } => String::from_utf8(handle.to_vec()).unwrap(),
            other => panic!("expected JOB_CREATED, got {other:?}"),
        }
    }

    /// Registers for `function` and takes one job, sleeping until there is one; returns its handle.
    fn grab(&mut self, function: &str) -> bytes::Bytes {
        self.send(Request::CanDo { function: function.to_owned().into() });
        self.send(Request::GrabJob(GrabKind::Uniq));
        loop {
            match self.recv() {
                Response::JobAssignUniq { handle, .. } => return handle,
                Response::NoJob => self.send(Request::PreSleep),
                Response::Noop => self.send(Request::GrabJob(GrabKind::Uniq)),
                other => panic!("expected a job, got {other:?}"),
            }
        }
    }
}

fn log_json(server: &Server, filters: &[&str]) -> Vec<Value> {
    let limit: &[&str] = if filters.contains(&"-n") { &[] } else { &["-n", "100"] };
    let out = gearbox(server, &[&["log", "--json"], limit, filters].concat());
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn find<'a>(records: &'a [Value], handle: &str, status: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["handle"] == handle && r["status"] == status)
        .unwrap_or_else(|| panic!("no {status} record for {handle} in {records:#?}"))
}

/// A database of its own on the MongoDB test server, per test.
fn mongo_uri(test: &str) -> String {
    let base = std::env::var("GEARBOX_TEST_MONGO").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".into());
    format!("{}/gearbox_e2e_{}_{test}", base.trim_end_matches('/'), std::process::id())
}

#[test]
fn every_outcome_is_recorded_and_failures_are_listed() {
    every_outcome_is_recorded(&[]);
}

#[test]
fn every_outcome_is_recorded_in_mongodb() {
    every_outcome_is_recorded(&["--job-log", &mongo_uri("outcomes")]);
}

fn every_outcome_is_recorded(flags: &[&str]) {
    let server = Server::start(&[&["--job-log-bodies", "64"], flags].concat());
    let mut client = Peer::connect(&server, "web-1");
    let ok = client.submit_background("resize", "img-1", "photo.png");
    let failing = client.submit_background("resize", "", "bad.png");
    let throwing = client.submit_background("resize", "", "huge.png");
    let orphan = client.submit_background("resize", "", "lost.png");

    let mut worker = Peer::connect(&server, "worker-a");
    let h = worker.grab("resize");
    assert_eq!(h, ok.as_bytes());
    worker.send(Request::WorkComplete { handle: h, data: "thumb-1".into() });
    let h = worker.grab("resize");
    worker.send(Request::WorkFail { handle: h });
    let h = worker.grab("resize");
    worker.send(Request::WorkException { handle: h, data: "out of memory".into() });
    let h = worker.grab("resize");
    assert_eq!(h, orphan.as_bytes());
    drop(worker); // lost while running: the job is queued again

    let mut second = Peer::connect(&server, "worker-b");
    let h = second.grab("resize");
    assert_eq!(h, orphan.as_bytes());
    second.send(Request::WorkComplete { handle: h, data: vec![0xff, 0x00].into() });

    // A record reaches the sink within a second of the job's end.
    wait_for("five records", || log_json(&server, &[]).len() == 5);
    let all = log_json(&server, &[]);
    let done = find(&all, &ok, "complete");
    assert_eq!(done["function"], "resize");
    assert_eq!(done["unique"], "img-1");
    assert_eq!(done["priority"], "normal");
    assert_eq!(done["background"], true);
    assert_eq!(done["attempt"], 1);
    assert_eq!(done["worker_id"], "worker-a");
    assert_eq!(done["client_id"], "web-1");
    assert_eq!(done["payload_bytes"], 9);
    assert_eq!(done["result_bytes"], 7);
    assert_eq!(done["payload"], "photo.png");
    assert_eq!(done["result"], "thumb-1");
    for field in ["submitted_at", "started_at", "finished_at", "queue_ms", "run_ms"] {
        assert!(!done[field].is_null(), "{field} missing in {done}");
    }
    let fail = find(&all, &failing, "fail");
    assert!(fail.get("unique").is_none() && fail.get("error").is_none() && fail.get("result").is_none());
    assert_eq!(find(&all, &throwing, "exception")["error"], "out of memory");
    let lost = find(&all, &orphan, "lost_worker");
    assert_eq!((lost["attempt"].as_u64(), lost["worker_id"].as_str()), (Some(1), Some("worker-a")));
    let rerun = find(&all, &orphan, "complete");
    assert_eq!((rerun["attempt"].as_u64(), rerun["worker_id"].as_str()), (Some(2), Some("worker-b")));
    assert_eq!(rerun["result"]["base64"], "/wA=");

    // Newest first, and the filters narrow it down.
    let failed = log_json(&server, &["--status", "failed"]);
    assert_eq!(failed.len(), 3, "{failed:#?}");
    assert_eq!(log_json(&server, &["--status", "exception"]).len(), 1);
    // `fail` is what a client sees as failed: WORK_FAIL, and WORK_EXCEPTION with its error.
    let fails = log_json(&server, &["--status", "fail"]);
    assert_eq!(fails.len(), 2, "{fails:#?}");
    assert!(fails.iter().any(|r| r["error"] == "out of memory"), "{fails:#?}");
    assert_eq!(log_json(&server, &["--unique", "img-1"]).len(), 1);
    assert_eq!(log_json(&server, &["--function", "other"]).len(), 0);
    assert_eq!(log_json(&server, &["--since", "1h", "-n", "2"]).len(), 2);
    let table = gearbox(&server, &["log", "--status", "failed"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("exception") && table.contains("out of memory") && table.contains("lost_worker"), "{table}");

    // A background job's result can be fetched later, by handle or by unique key.
    assert_eq!(gearbox(&server, &["result", &ok]).stdout, b"thumb-1");
    assert_eq!(gearbox(&server, &["result", "--unique", "img-1"]).stdout, b"thumb-1");
    let missing = gearbox(&server, &["result", &failing]);
    assert!(!missing.status.success());

    let stats = String::from_utf8(gearbox(&server, &["admin", "stats"]).stdout).unwrap();
    assert!(stats.lines().any(|l| l.split_whitespace().eq(["job_log_written", "5"])), "{stats}");
    assert!(stats.lines().any(|l| l.split_whitespace().eq(["job_log_dropped", "0"])), "{stats}");
}

#[test]
fn cancelled_and_timed_out_attempts_are_recorded() {
    let server = Server::start(&[]);
    let mut client = Peer::connect(&server, "c");
    let cancelled = client.submit_background("slow", "", "x");
    let cancel = gearbox(&server, &["admin", "cancel", &cancelled]);
    assert!(cancel.status.success(), "{cancel:?}");
    let timed = client.submit_background("slow", "", "y");
    let mut worker = Peer::connect(&server, "w");
    worker.send(Request::CanDoTimeout { function: "slow".into(), timeout: 1 });
    worker.send(Request::GrabJob(GrabKind::Uniq));
    assert!(matches!(worker.recv(), Response::JobAssignUniq { .. }));
    // Nothing is sent back: the server gives up on the worker after a second.
    wait_for("cancel and timeout records", || log_json(&server, &["--status", "failed"]).len() == 2);
    let records = log_json(&server, &[]);
    let c = find(&records, &cancelled, "cancelled");
    assert!(c.get("started_at").is_none() && c.get("run_ms").is_none(), "{c}");
    assert_eq!(find(&records, &timed, "timeout")["worker_id"], "w");
}

#[test]
fn records_outlive_a_restart_and_expire_with_retention() {
    let dir = temp_data_dir();
    let mut server = Server::start_in(dir.clone(), &["--job-log-retention", "0"]);
    let handle = Peer::connect(&server, "c").submit_background("gone", "", "x");
    gearbox(&server, &["admin", "cancel", &handle]);
    wait_for("the record", || log_json(&server, &[]).len() == 1);
    server.terminate();
    std::mem::forget(server); // keep its data directory for the next server

    let server = Server::start_in(dir.clone(), &["--job-log-retention", "0"]);
    assert_eq!(log_json(&server, &[])[0]["handle"], handle.as_str());
    drop(server);

    let server = Server::start_in(dir, &["--job-log-retention", "2s"]);
    wait_for("expiry", || log_json(&server, &[]).is_empty());
}

/// The value of the sample `line` (`NAME{LABELS}`) in Prometheus text; panics if missing.
fn sample(metrics: &str, line: &str) -> u64 {
    let value = metrics.lines().find_map(|l| l.strip_prefix(line)?.strip_prefix(' '));
    value.unwrap_or_else(|| panic!("no {line} in\n{metrics}")).parse().unwrap()
}

#[test]
fn a_size_limit_bounds_the_log_and_its_size_is_reported() {
    const MAX: u64 = 1 << 20; // segments of 128 KiB, about one batch (1,024 records)
    const JOBS: u64 = 30_000; // about 4 MB of records
    let dir = temp_data_dir();
    let extra = ["--http", "127.0.0.1:0", "--queue", "memory"];
    // Set through the environment, so that this path is tried too.
    let server = Server::spawn(dir.clone(), &extra, |c| {
        c.env("GEARBOX_JOB_LOG_MAX_SIZE", "1MiB");
    })
    .ready();
    let http = server.http.unwrap();
    let metrics = || request(http, "GET", "/metrics", None).2;
    let bench = Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(["bench", "--mode", "bg", "--jobs", &JOBS.to_string(), "--server", &server.addr.to_string()])
        .output()
        .unwrap();
    assert!(bench.status.success(), "{bench:?}");
    wait_for("every record written", || sample(&metrics(), "gearbox_job_log_written_total{sink=\"embedded\"}") >= JOBS);
    let on_disk = || -> u64 {
        let files = std::fs::read_dir(dir.join("joblog")).unwrap();
        files.map(|f| f.unwrap().metadata().unwrap().len()).sum()
    };
    let bytes = || sample(&metrics(), "gearbox_job_log_bytes{sink=\"embedded\"}");
    wait_for("the metric to match the files", || bytes() == on_disk());

    let text = metrics();
    let bytes = sample(&text, "gearbox_job_log_bytes{sink=\"embedded\"}");
    assert!(bytes > MAX / 2 && bytes <= MAX, "{bytes} bytes");
    assert_eq!(sample(&text, "gearbox_job_log_max_bytes{sink=\"embedded\"}"), MAX);
    let by_size = sample(&text, "gearbox_job_log_expired_bytes_total{sink=\"embedded\",reason=\"size\"}");
    assert!(by_size > 2 * MAX, "{by_size} bytes deleted to stay under the limit");
    assert_eq!(sample(&text, "gearbox_job_log_expired_bytes_total{sink=\"embedded\",reason=\"age\"}"), 0);
    let (_, status) = get_json(http, "/api/status");
    let log = &status["job_log"];
    assert_eq!((log["bytes"].as_u64(), log["max_bytes"].as_u64()), (Some(bytes), Some(MAX)), "{status}");
    assert_eq!(log["expired_bytes_size"].as_u64(), Some(by_size));

    // The newest records are the ones kept.
    let newest = log_json(&server, &["-n", "1"]);
    assert_eq!((newest[0]["function"].as_str(), newest[0]["status"].as_str()), (Some("bench"), Some("complete")));
    let kept = log_json(&server, &["-n", "10000"]).len() as u64;
    assert!(kept > 1000 && kept < JOBS / 2, "{kept} records kept");
}

#[test]
fn a_dead_mongodb_costs_records_not_jobs() {
    // Nothing listens on port 1: every write fails.
    let server = Server::start(&["--job-log", "mongodb://127.0.0.1:1/gearbox", "--queue", "memory"]);
    let worker = Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(["work", "--server", &server.addr.to_string(), "-f", "rev", "--", "rev"])
        .spawn()
        .unwrap();
    let _worker = common::ChildGuard(worker);
    let started = std::time::Instant::now();
    let lines: String = (0..300).map(|i| format!("job{i}\n")).collect();
    let mut bulk = Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(["submit", "--server", &server.addr.to_string(), "-f", "rev", "--bulk"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    bulk.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    let out = bulk.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("300 jobs: 300 ok"), "{out:?}");
    // 300 jobs each running a process: seconds, not the sink's timeouts.
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "{:?}", started.elapsed());
    wait_for("dropped records to be counted", || {
        let stats = String::from_utf8(gearbox(&server, &["admin", "stats"]).stdout).unwrap();
        stats.lines().any(|l| l.starts_with("job_log_dropped") && !l.ends_with(" 0") && !l.ends_with("\t0"))
    });
    let query = gearbox(&server, &["log"]);
    assert!(!query.status.success());
    assert!(String::from_utf8_lossy(&query.stderr).contains("MongoDB"), "{query:?}");
}

#[test]
fn a_server_without_a_job_log_says_so() {
    let server = Server::start(&["--job-log", "none"]);
    let out = gearbox(&server, &["log"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("job log is off"), "{out:?}");
}

#[test]
fn a_bad_job_log_setting_stops_the_server_with_a_clear_error() {
    for (flags, error) in [
        (["--job-log", "postgres://somewhere"], "unknown job log"),
        (["--job-log-max-size", "10XB"], "bad size \"10XB\": unknown unit; use bytes or e.g. 512MB"),
    ] {
        let out =
            Command::new(env!("CARGO_BIN_EXE_gearbox")).args(["server", "--port", "0"]).args(flags).output().unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(error), "{out:?}");
    }
}
