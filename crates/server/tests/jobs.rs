//! Job semantics over real sockets: submission, assignment, results, priorities, coalescing,
//! re-queueing, timeouts, scheduling.

mod common;

use std::time::Duration;

use common::{b, Conn, TestServer};
use gearbox_proto::{GrabKind, Priority, Request, Response};

// Also on a multi-threaded runtime (`gearbox server -t 2`): wake-ups cross threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_job_gets_data_status_and_result() {
    let server = TestServer::start().await;
    let mut worker = Conn::worker(server.addr, &["rev"]).await;
    let mut client = server.conn().await;
    let handle = client.submit("rev", "", "hello", false).await;

    let (h, function, _, data) = worker.grab_some().await;
    assert_eq!((h.clone(), &function[..], &data[..]), (handle.clone(), &b"rev"[..], &b"hello"[..]));
    worker.send(Request::WorkData { handle: h.clone(), data: b("part") }).await;
    worker.send(Request::WorkWarning { handle: h.clone(), data: b("careful") }).await;
    worker.send(Request::WorkStatus { handle: h.clone(), numerator: 1, denominator: 2 }).await;
    worker.send(Request::WorkComplete { handle: h.clone(), data: b("olleh") }).await;

    assert_eq!(client.recv().await, Response::WorkData { handle: handle.clone(), data: b("part") });
    assert_eq!(client.recv().await, Response::WorkWarning { handle: handle.clone(), data: b("careful") });
    assert_eq!(client.recv().await, Response::WorkStatus { handle: handle.clone(), numerator: 1, denominator: 2 });
    assert_eq!(client.recv().await, Response::WorkComplete { handle: handle.clone(), data: b("olleh") });
    // The job is gone afterwards.
    client.send(Request::GetStatus { handle: handle.clone() }).await;
    assert_eq!(
        client.recv().await,
        Response::StatusRes { handle, known: false, running: false, numerator: 0, denominator: 0 }
    );
}

#[tokio::test]
async fn grab_variants_and_status_queries() {
    let server = TestServer::start().await;
    let mut client = server.conn().await;
    let handle = client.submit("f", "u-1", "payload", true).await;
    client.send(Request::GetStatus { handle: handle.clone() }).await;
    assert_eq!(
        client.recv().await,
        Response::StatusRes { handle: handle.clone(), known: true, running: false, numerator: 0, denominator: 0 }
    );

    let mut worker = Conn::worker(server.addr, &["f"]).await;
    worker.send(Request::GrabJob(GrabKind::Plain)).await;
    assert_eq!(
        worker.recv().await,
        Response::JobAssign { handle: handle.clone(), function: b("f"), data: b("payload") }
    );
    worker.send(Request::WorkStatus { handle: handle.clone(), numerator: 3, denominator: 10 }).await;
    client.send(Request::GetStatusUnique { unique: b("u-1") }).await;
    // WORK_STATUS and GET_STATUS_UNIQUE race on different connections: poll until applied.
    let mut got = client.recv().await;
    while got
        != (Response::StatusResUnique {
            unique: b("u-1"),
            known: true,
            running: true,
            numerator: 3,
            denominator: 10,
            waiting_clients: 0,
        })
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
        client.send(Request::GetStatusUnique { unique: b("u-1") }).await;
        got = client.recv().await;
    }
    client.send(Request::EchoReq { data: b("ping\0with nul") }).await;
    assert_eq!(client.recv().await, Response::EchoRes { data: b("ping\0with nul") });
}

#[tokio::test]
async fn priorities_apply_across_functions_and_fifo_within_one() {
    let server = TestServer::start().await;
    let mut client = server.conn().await;
    client.submit_prio("a", "", "low-1", Priority::Low, true).await;
    client.submit_prio("b", "", "normal-1", Priority::Normal, true).await;
    client.submit_prio("a", "", "normal-2", Priority::Normal, true).await;
    client.submit_prio("b", "", "high-1", Priority::High, true).await;
    client.submit_prio("a", "", "high-2", Priority::High, true).await;
    client.submit_prio("b", "", "low-2", Priority::Low, true).await;
    let mut worker = Conn::worker(server.addr, &["a", "b"]).await;
    let mut order = Vec::new();
    while let Some((h, _, _, data)) = worker.grab().await {
        order.push(String::from_utf8(data.to_vec()).unwrap());
        worker.send(Request::WorkComplete { handle: h, data: b("") }).await;
    }
    assert_eq!(order, ["high-1", "high-2", "normal-1", "normal-2", "low-1", "low-2"]);
}

// Also on a multi-threaded runtime (`gearbox server -t 2`): wake-ups cross threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_jobs_coalesce() {
    let server = TestServer::start().await;
    let mut c1 = server.conn().await;
    let mut c2 = server.conn().await;
    let mut c3 = server.conn().await;
    let h1 = c1.submit("f", "same", "x", false).await;
    let h2 = c2.submit("f", "same", "ignored", false).await;
    let h3 = c3.submit("f", "same", "ignored", true).await;
    assert_eq!(h1, h2);
    assert_eq!(h1, h3);
    // Same unique under another function is another job.
    let other = c3.submit("g", "same", "y", true).await;
    assert_ne!(other, h1);

    let mut worker = Conn::worker(server.addr, &["f"]).await;
    let (h, _, unique, data) = worker.grab_some().await;
    assert_eq!((&unique[..], &data[..]), (&b"same"[..], &b"x"[..]));
    assert!(worker.grab().await.is_none(), "coalesced submissions make one job");
    worker.send(Request::WorkStatus { handle: h.clone(), numerator: 1, denominator: 1 }).await;
    worker.send(Request::WorkComplete { handle: h.clone(), data: b("done") }).await;
    for c in [&mut c1, &mut c2] {
        assert_eq!(c.recv().await, Response::WorkStatus { handle: h.clone(), numerator: 1, denominator: 1 });
        assert_eq!(c.recv().await, Response::WorkComplete { handle: h.clone(), data: b("done") });
    }
    c3.expect_silence(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn exceptions_reach_only_clients_that_asked() {
    let server = TestServer::start().await;
    let mut plain = server.conn().await;
    let mut wants = server.conn().await;
    wants.send(Request::OptionReq { option: b("exceptions") }).await;
    assert_eq!(wants.recv().await, Response::OptionRes { option: b("exceptions") });
    wants.send(Request::OptionReq { option: b("bogus") }).await;
    assert!(matches!(wants.recv().await, Response::Error { .. }));

    let h = plain.submit("f", "u", "", false).await;
    wants.submit("f", "u", "", false).await;
    let mut worker = Conn::worker(server.addr, &["f"]).await;
    worker.grab_some().await;
    worker.send(Request::WorkException { handle: h.clone(), data: b("boom") }).await;
    assert_eq!(wants.recv().await, Response::WorkException { handle: h.clone(), data: b("boom") });
    // A clean WORK_FAIL: exactly the handle, no stray bytes.
    assert_eq!(plain.recv().await, Response::WorkFail { handle: h.clone() });
    // Perl's worker follows an exception with WORK_FAIL: no ERROR for that.
    worker.send(Request::WorkFail { handle: h.clone() }).await;
    worker.send(Request::EchoReq { data: b("next") }).await;
    assert_eq!(worker.recv().await, Response::EchoRes { data: b("next") });
}

#[tokio::test]
async fn work_fail_and_unknown_handles() {
    let server = TestServer::start().await;
    let mut client = server.conn().await;
    let h = client.submit("f", "", "", false).await;
    let mut worker = Conn::worker(server.addr, &["f"]).await;
    worker.grab_some().await;
    worker.send(Request::WorkFail { handle: h.clone() }).await;
    assert_eq!(client.recv().await, Response::WorkFail { handle: h.clone() });
    // Reporting on a job that is not this worker's is an error, and the connection goes on.
    worker.send(Request::WorkComplete { handle: h.clone(), data: b("late") }).await;
    assert!(matches!(worker.recv().await, Response::Error { code, .. } if code == "JOB_NOT_FOUND"));
    worker.send(Request::EchoReq { data: b("still here") }).await;
    assert_eq!(worker.recv().await, Response::EchoRes { data: b("still here") });
}

#[tokio::test]
async fn sleeping_worker_is_woken_by_noop() {
    let server = TestServer::start().await;
    let mut worker = Conn::worker(server.addr, &["f"]).await;
    assert!(worker.grab().await.is_none());
    worker.send(Request::PreSleep).await;
    worker.expect_silence(Duration::from_millis(100)).await;
    let mut client = server.conn().await;
    client.submit("f", "", "wake", true).await;
    assert_eq!(worker.recv().await, Response::Noop);
    assert_eq!(&worker.grab_some().await.3[..], b"wake");
    // PRE_SLEEP while work is queued answers NOOP at once.
    client.submit("f", "", "more", true).await;
    worker.send(Request::PreSleep).await;
    assert_eq!(worker.recv().await, Response::Noop);
}

// Also on a multi-threaded runtime (`gearbox server -t 2`): wake-ups cross threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_of_a_vanished_worker_is_queued_again() {
    let server = TestServer::start().await;
    let mut client = server.conn().await;
    let h = client.submit("f", "", "data", false).await;
    let mut w1 = Conn::worker(server.addr, &["f"]).await;
    w1.grab_some().await;
    let mut w2 = Conn::worker(server.addr, &["f"]).await;
    assert!(w2.grab().await.is_none());
    w2.send(Request::PreSleep).await;
    drop(w1);
    assert_eq!(w2.recv().await, Response::Noop);
    let (h2, _, _, data) = w2.grab_some().await;
    assert_eq!((h2.clone(), &data[..]), (h.clone(), &b"data"[..]));
    w2.send(Request::WorkComplete { handle: h2, data: b("ok") }).await;
    assert_eq!(client.recv().await, Response::WorkComplete { handle: h, data: b("ok") });
}

#[tokio::test]
async fn job_retries_limit_fails_the_job() {
    let mut options = gearbox_server::ServeOptions::default();
    options.broker.job_retries = 2;
    let server = TestServer::with(options).await;
    let mut client = server.conn().await;
    let h = client.submit("f", "", "poison", false).await;
    for _ in 0..2 {
        let mut w = Conn::worker(server.addr, &["f"]).await;
        w.grab_some().await;
    }
    assert_eq!(client.recv().await, Response::WorkFail { handle: h });
    let mut admin = server.conn().await;
    admin.admin_until("show jobs", ".\n").await;
}

#[tokio::test]
async fn can_do_timeout_requeues_a_stuck_job() {
    let server = TestServer::start().await;
    let mut client = server.conn().await;
    let h = client.submit("slow", "", "x", false).await;
    let mut stuck = server.conn().await;
    stuck.send(Request::CanDoTimeout { function: b("slow"), timeout: 1000 }).await;
    let started = std::time::Instant::now();
    stuck.grab_some().await;
    let mut w2 = Conn::worker(server.addr, &["slow"]).await;
    assert!(w2.grab().await.is_none());
    w2.send(Request::PreSleep).await;
    assert_eq!(w2.recv().await, Response::Noop, "the timed-out job is offered again");
    assert!(started.elapsed() >= Duration::from_millis(900), "not before the timeout");
    let (h2, ..) = w2.grab_some().await;
    assert_eq!(h2, h);
    // The stuck worker's late result is refused.
    stuck.send(Request::WorkComplete { handle: h.clone(), data: b("late") }).await;
    assert!(matches!(stuck.recv().await, Response::Error { .. }));
    w2.send(Request::WorkComplete { handle: h.clone(), data: b("ok") }).await;
    assert_eq!(client.recv().await, Response::WorkComplete { handle: h, data: b("ok") });
}

#[tokio::test]
async fn abandoned_foreground_job_leaves_the_queue() {
    let server = TestServer::start().await;
    let mut client = server.conn().await;
    client.submit("f", "", "nobody waits", false).await;
    let mut admin = server.conn().await;
    assert_eq!(admin.admin("status").await, "f\t1\t0\t0\n.\n");
    drop(client);
    admin.admin_until("status", "f\t0\t0\t0\n.\n").await;
    let mut worker = Conn::worker(server.addr, &["f"]).await;
    assert!(worker.grab().await.is_none());
}

#[tokio::test]
async fn epoch_job_runs_at_its_time() {
    let server = TestServer::start().await;
    let mut client = server.conn().await;
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64 + 2;
    client.send(Request::SubmitJobEpoch { function: b("later"), unique: b(""), epoch: at, data: b("tick") }).await;
    assert!(matches!(client.recv().await, Response::JobCreated { .. }));
    let mut worker = Conn::worker(server.addr, &["later"]).await;
    assert!(worker.grab().await.is_none(), "not runnable before its time");
    worker.send(Request::PreSleep).await;
    assert_eq!(worker.recv().await, Response::Noop);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(now >= at);
    assert_eq!(&worker.grab_some().await.3[..], b"tick");
}

#[tokio::test]
async fn maxqueue_limits_submissions() {
    let server = TestServer::start().await;
    let mut c = server.conn().await;
    assert_eq!(c.admin("maxqueue f 2").await, "OK\r\n");
    c.submit("f", "", "1", true).await;
    c.submit("f", "", "2", true).await;
    c.send(Request::SubmitJob {
        function: b("f"),
        unique: b(""),
        data: b("3"),
        priority: Priority::Normal,
        background: true,
    })
    .await;
    assert!(matches!(c.recv().await, Response::Error { code, .. } if code == "QUEUE_ERROR"));
    assert_eq!(c.admin("maxqueue").await, "f\t2\t2\t2\n.\n");
    assert_eq!(c.admin("maxqueue f").await, "OK\r\n");
    c.submit("f", "", "3", true).await;
}

#[tokio::test]
async fn handles_differ_across_restarts() {
    let first = TestServer::start().await;
    let h1 = first.conn().await.submit("f", "", "", true).await;
    drop(first);
    let second = TestServer::start().await;
    let h2 = second.conn().await.submit("f", "", "", true).await;
    assert_ne!(h1, h2);
}
