//! The text admin protocol, byte for byte as gearmand answers.

mod common;

use common::{b, Conn, TestServer};
use gearbox_proto::{Priority, Request, Response};

#[tokio::test]
async fn status_workers_and_jobs_listings() {
    let server = TestServer::start().await;
    let mut admin = server.conn().await;
    assert_eq!(admin.admin("status").await, ".\n");

    let mut client = server.conn().await;
    let h1 = client.submit("resize", "img-1", "a", true).await;
    client.submit_prio("resize", "img-2", "b", Priority::High, true).await;
    client.submit_prio("mail", "", "c", Priority::Low, false).await;
    let mut worker = Conn::worker(server.addr, &["resize"]).await;
    worker.send(Request::SetClientId { id: b("thumbnailer-1") }).await;
    let (running, ..) = worker.grab_some().await;

    assert_eq!(admin.admin("status").await, "resize\t2\t1\t1\nmail\t1\t0\t0\n.\n");
    assert_eq!(admin.admin("prioritystatus").await, "resize\t0\t1\t0\t1\nmail\t0\t0\t1\t0\n.\n");
    let workers = admin.admin("workers").await;
    assert!(workers.ends_with("\n.\n"));
    assert!(
        workers.lines().any(|l| l.ends_with(" 127.0.0.1 thumbnailer-1 : resize")),
        "worker line missing in {workers:?}"
    );
    assert!(workers.lines().any(|l| l.ends_with(" 127.0.0.1 - :")), "client line missing in {workers:?}");

    let jobs = admin.admin("show jobs").await;
    let running_line = format!("{}\t0\t0\t1", String::from_utf8_lossy(&running));
    assert!(jobs.lines().any(|l| l == running_line), "{running_line:?} not in {jobs:?}");
    assert_eq!(jobs.lines().count(), 4);
    let uniques = admin.admin("show unique jobs").await;
    let mut lines: Vec<&str> = uniques.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["", ".", "img-1", "img-2"]);
    assert_ne!(h1, running, "the high-priority job is assigned first");
}

#[tokio::test]
async fn simple_commands_answer_like_gearmand() {
    let server = TestServer::start().await;
    let mut admin = server.conn().await;
    assert!(admin.admin("version").await.starts_with("OK "));
    assert_eq!(admin.admin("getpid").await, format!("OK {}\n", std::process::id()));
    assert_eq!(admin.admin("verbose").await, "OK INFO\n");
    assert_eq!(admin.admin("bogus").await, "ERR UNKNOWN_COMMAND Unknown+server+commandbogus\r\n");
    assert_eq!(admin.admin("show nothing").await, "ERR UNKNOWN_SHOW_ARGUMENTS\r\n");
    assert_eq!(admin.admin("shutdown").await, "ERR SHUTDOWN_DISABLED Start+the+server+with+--allow-shutdown\r\n");
    // Case does not matter, CRLF and LF both end a line.
    assert_eq!(admin.admin("STATUS").await, ".\n");
    assert!(admin.admin("Version\r").await.starts_with("OK "));
}

#[tokio::test]
async fn create_drop_and_cancel() {
    let server = TestServer::start().await;
    let mut admin = server.conn().await;
    assert_eq!(admin.admin("create function thumbs").await, "OK\r\n");
    assert_eq!(admin.admin("status").await, "thumbs\t0\t0\t0\n.\n");
    assert_eq!(admin.admin("drop function thumbs").await, "OK\r\n");
    assert_eq!(admin.admin("status").await, ".\n");
    assert_eq!(admin.admin("drop function thumbs").await, "ERR function not found\r\n");

    // Never orphan jobs: a function with queued jobs or workers cannot be dropped.
    let mut client = server.conn().await;
    let handle = client.submit("busy", "", "x", false).await;
    assert_eq!(admin.admin("drop function busy").await, "ERR there are still queued jobs\r\n");
    let worker = Conn::worker(server.addr, &["busy"]).await;
    admin.admin_until("status", "busy\t1\t0\t1\n.\n").await;
    assert_eq!(
        admin.admin("drop function busy").await,
        "ERR there are still connected workers or executing clients\r\n"
    );
    drop(worker);

    // Cancelling a queued job tells its waiting client and empties the queue.
    let line = format!("cancel job {}", String::from_utf8_lossy(&handle));
    assert_eq!(admin.admin(&line).await, "OK\r\n");
    assert_eq!(client.recv().await, Response::WorkFail { handle: handle.clone() });
    assert_eq!(admin.admin(&line).await, "ERR UNKNOWN_JOB\r\n");
    admin.admin_until("status", "busy\t0\t0\t0\n.\n").await;
    assert_eq!(admin.admin("drop function busy").await, "OK\r\n");
}

#[tokio::test]
async fn admin_and_binary_alternate_on_one_connection() {
    let server = TestServer::start().await;
    let mut c = server.conn().await;
    c.submit("f", "", "", true).await;
    assert_eq!(c.admin("status").await, "f\t1\t0\t0\n.\n");
    c.send(Request::EchoReq { data: b("after admin") }).await;
    assert_eq!(c.recv().await, Response::EchoRes { data: b("after admin") });
}

#[tokio::test]
async fn admin_shutdown_when_allowed() {
    let options = gearbox_server::ServeOptions { allow_shutdown: true, ..Default::default() };
    let server = TestServer::with(options).await;
    let mut idle = server.conn().await;
    let mut admin = server.conn().await;
    assert_eq!(admin.admin("shutdown graceful").await, "OK\r\n");
    assert!(idle.try_recv().await.is_none(), "connections are closed");
}
