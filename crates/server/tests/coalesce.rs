//! Submissions coalesced by unique key: a job owes something to every submission attached
//! to it. Once a background submission joins a foreground job, the job is a background job:
//! it outlives its foreground clients, is queued again when its worker is lost, and is
//! stored before that submission's JOB_CREATED. Each case runs on the memory queue and on
//! the embedded store. (A SIGKILL right after the acknowledgement is in the binary's tests.)

mod common;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use common::{b, Conn, TestServer};
use gearbox_proto::{Priority, Request, Response};
use gearbox_server::{QueueSpec, ServeOptions};

/// A server on the memory queue or on an embedded store of its own, with a job log.
struct Setup {
    server: TestServer,
    dir: PathBuf,
}

impl Setup {
    async fn start(embedded: bool, name: &str) -> Setup {
        let dir = std::env::temp_dir().join(format!("gearbox-coalesce-{name}-{embedded}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let queue = if embedded { QueueSpec::Embedded(dir.clone()) } else { QueueSpec::Memory };
        let job_log = gearbox_joblog::Options {
            spec: gearbox_joblog::Spec::Embedded,
            data_dir: dir.clone(),
            retention: None,
            max_bytes: None,
            bodies: None,
        };
        let server = TestServer::with(ServeOptions { queue, job_log: Some(job_log), ..Default::default() }).await;
        Setup { server, dir }
    }

    async fn stop(self) {
        self.server.stop().await;
        std::fs::remove_dir_all(&self.dir).unwrap();
    }
}

/// A foreground submission of F/U that waits, then a background one from another client,
/// which gets the same handle. Returns both connections and the handle.
async fn foreground_then_background(server: &TestServer) -> (Conn, Conn, Bytes) {
    let mut fg = server.conn().await;
    let handle = fg.submit("F", "U", "payload", false).await;
    let mut bg = server.conn().await;
    let same = bg.submit("F", "U", "other payload", true).await;
    assert_eq!(same, handle, "the background submission joins the waiting job");
    (fg, bg, handle)
}

async fn status(conn: &mut Conn, handle: &Bytes) -> (bool, bool) {
    conn.send(Request::GetStatus { handle: handle.clone() }).await;
    match conn.recv().await {
        Response::StatusRes { known, running, .. } => (known, running),
        other => panic!("expected STATUS_RES, got {other:?}"),
    }
}

/// The job-log records of `handle`, as JSON lines, once there are `n`.
async fn log_records(conn: &mut Conn, handle: &Bytes, n: usize) -> Vec<serde_json::Value> {
    let line = format!("log handle={}", String::from_utf8_lossy(handle));
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let reply = conn.admin(&line).await;
        let records: Vec<serde_json::Value> =
            reply.lines().filter(|l| *l != ".").map(|l| serde_json::from_str(l).unwrap()).collect();
        if records.len() >= n {
            return records;
        }
        assert!(tokio::time::Instant::now() < deadline, "job log has {records:?}, expected {n} records");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the server lists `n` connections (the asking one included), so that a
/// disconnect is known to be applied.
async fn wait_connections(admin: &mut Conn, n: usize) {
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let listing = admin.admin("workers").await;
        if listing.lines().filter(|l| *l != ".").count() == n {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "expected {n} connections: {listing}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn background_job_outlives_its_foreground_client(embedded: bool) {
    let s = Setup::start(embedded, "outlives").await;
    let (fg, mut bg, handle) = foreground_then_background(&s.server).await;
    let mut admin = s.server.conn().await;
    let h = String::from_utf8_lossy(&handle).into_owned();
    assert_eq!(admin.admin("show jobs").await, format!("{h}\t0\t0\t1\n.\n"), "listed as a background job");
    drop(fg);
    wait_connections(&mut admin, 2).await;
    assert_eq!(admin.admin("status").await, "F\t1\t0\t0\n.\n");
    assert_eq!(status(&mut bg, &handle).await, (true, false));
    let mut worker = Conn::worker(s.server.addr, &["F"]).await;
    let (got, _, unique, data) = worker.grab_some().await;
    assert_eq!((got.clone(), &unique[..], &data[..]), (handle.clone(), &b"U"[..], &b"payload"[..]));
    worker.send(Request::WorkComplete { handle: got, data: b("done") }).await;
    let records = log_records(&mut admin, &handle, 1).await;
    assert_eq!(records[0]["status"], "complete");
    assert_eq!(records[0]["background"], true, "{records:?}");
    s.stop().await;
}

#[tokio::test]
async fn a_coalesced_background_request_outlives_the_foreground_client_memory() {
    background_job_outlives_its_foreground_client(false).await;
}

#[tokio::test]
async fn a_coalesced_background_request_outlives_the_foreground_client_embedded() {
    background_job_outlives_its_foreground_client(true).await;
}

/// The job is running when its foreground client leaves; then its worker is lost (or times
/// out): it is queued again, not dropped.
async fn running_job_is_queued_again_after_its_worker_is_lost(embedded: bool, timeout: bool) {
    let s = Setup::start(embedded, if timeout { "timeout" } else { "lost" }).await;
    let mut worker = Conn::connect(s.server.addr).await;
    if timeout {
        worker.send(Request::CanDoTimeout { function: b("F"), timeout: 1000 }).await;
    } else {
        worker.send(Request::CanDo { function: b("F") }).await;
    }
    let mut fg = s.server.conn().await;
    let handle = fg.submit("F", "U", "payload", false).await;
    let (got, ..) = worker.grab_some().await;
    assert_eq!(got, handle);
    let mut bg = s.server.conn().await;
    assert_eq!(bg.submit("F", "U", "payload", true).await, handle);
    assert_eq!(status(&mut bg, &handle).await, (true, true));
    drop(fg);
    let mut admin = s.server.conn().await;
    wait_connections(&mut admin, 3).await;
    // Still there for the background request (queued again already if the 1 s timeout has
    // passed on a slow machine).
    let (known, running) = status(&mut bg, &handle).await;
    assert!(known && (running || timeout), "known {known}, running {running}");
    if !timeout {
        drop(worker);
    }
    // Lost or timed out (after a second), the job waits for the next worker.
    admin.admin_until("status", if timeout { "F\t1\t0\t1\n.\n" } else { "F\t1\t0\t0\n.\n" }).await;
    let mut next = Conn::worker(s.server.addr, &["F"]).await;
    let (again, ..) = next.grab_some().await;
    assert_eq!(again, handle);
    next.send(Request::WorkComplete { handle: again, data: b("") }).await;
    let outcome = if timeout { "timeout" } else { "lost_worker" };
    let records = log_records(&mut admin, &handle, 2).await;
    let statuses: Vec<&str> = records.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["complete", outcome], "newest first");
    assert!(records.iter().all(|r| r["background"] == true), "{records:?}");
    s.stop().await;
}

#[tokio::test]
async fn a_running_coalesced_job_is_queued_again_when_its_worker_is_lost_memory() {
    running_job_is_queued_again_after_its_worker_is_lost(false, false).await;
}

#[tokio::test]
async fn a_running_coalesced_job_is_queued_again_when_its_worker_is_lost_embedded() {
    running_job_is_queued_again_after_its_worker_is_lost(true, false).await;
}

#[tokio::test]
async fn a_running_coalesced_job_is_queued_again_when_its_worker_times_out() {
    running_job_is_queued_again_after_its_worker_is_lost(true, true).await;
}

/// The other direction, which already held: a foreground client joins a background job,
/// then leaves; the job stays, and the client that stays waiting gets the result.
#[tokio::test]
async fn a_foreground_client_joining_a_background_job_leaves_it_in_place() {
    let s = Setup::start(true, "reverse").await;
    let mut bg = s.server.conn().await;
    let handle = bg.submit("F", "U", "payload", true).await;
    let mut fg1 = s.server.conn().await;
    assert_eq!(fg1.submit("F", "U", "", false).await, handle);
    let mut fg2 = s.server.conn().await;
    assert_eq!(fg2.submit("F", "U", "", false).await, handle);
    drop(fg1);
    let mut admin = s.server.conn().await;
    wait_connections(&mut admin, 3).await;
    let mut worker = Conn::worker(s.server.addr, &["F"]).await;
    let (got, ..) = worker.grab_some().await;
    assert_eq!(got, handle);
    worker.send(Request::WorkComplete { handle: got, data: b("result") }).await;
    assert_eq!(fg2.recv().await, Response::WorkComplete { handle, data: b("result") });
    s.stop().await;
}

/// Many background duplicates pipelined onto one foreground job: each gets JOB_CREATED, in
/// order with the connection's other replies, and the job runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_duplicates_keep_their_reply_order() {
    let s = Setup::start(true, "order").await;
    let mut fg = s.server.conn().await;
    let handle = fg.submit("F", "U", "payload", false).await;
    let mut c = s.server.conn().await;
    let mut out = bytes::BytesMut::new();
    for i in 0..50 {
        let unique = if i % 5 == 0 { format!("other-{i}") } else { "U".into() };
        Request::SubmitJob {
            function: b("F"),
            unique: b(&unique),
            data: b("d"),
            priority: Priority::Normal,
            background: true,
        }
        .encode(&mut out);
        Request::EchoReq { data: b(&i.to_string()) }.encode(&mut out);
    }
    c.send_raw(&out).await;
    for i in 0..50 {
        match c.recv().await {
            Response::JobCreated { handle: h } => assert_eq!(h == handle, i % 5 != 0, "reply {i}"),
            other => panic!("expected JOB_CREATED, got {other:?}"),
        }
        assert_eq!(c.recv().await, Response::EchoRes { data: b(&i.to_string()) });
    }
    drop(fg);
    let mut admin = s.server.conn().await;
    wait_connections(&mut admin, 2).await;
    assert_eq!(admin.admin("status").await, "F\t11\t0\t0\n.\n");
    s.stop().await;
}
