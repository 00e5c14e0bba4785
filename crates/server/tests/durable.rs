//! The embedded durable queue: what survives a restart, reply order while commits are
//! pending, payloads read back from disk (and from the databases), and a full disk.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{b, Conn, TestServer};
use gearbox_proto::{Priority, Request, Response};
use gearbox_server::{QueueSpec, ServeOptions};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gearbox-durable-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn start(dir: &Path) -> TestServer {
    TestServer::with(ServeOptions { queue: QueueSpec::Embedded(dir.to_path_buf()), ..Default::default() }).await
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test]
async fn background_jobs_survive_a_restart_with_handles_priorities_and_times() {
    let dir = temp_dir("restart");
    let server = start(&dir).await;
    let mut c = server.conn().await;
    let low = c.submit_prio("f", "u-low", "low", Priority::Low, true).await;
    let normal = c.submit_prio("f", "u-normal", "normal", Priority::Normal, true).await;
    let high = c.submit_prio("f", "u-high", "high", Priority::High, true).await;
    let later = now() + 3600;
    c.send(Request::SubmitJobEpoch { function: b("f"), unique: b("u-later"), epoch: later, data: b("later") }).await;
    let Response::JobCreated { handle: scheduled } = c.recv().await else { panic!("no JOB_CREATED") };
    // Foreground jobs are not persisted: their client is connected and sees the loss.
    c.submit("f", "u-fg", "fg", false).await;
    // A completed job is not restored.
    c.submit("done", "", "x", true).await;
    let mut w = Conn::worker(server.addr, &["done"]).await;
    let (h, ..) = w.grab_some().await;
    w.send(Request::WorkComplete { handle: h, data: b("") }).await;
    let mut admin = server.conn().await;
    admin.admin_until("status", "f\t5\t0\t0\ndone\t0\t0\t1\n.\n").await;
    drop((c, w));
    server.stop().await;

    let server = start(&dir).await;
    let mut admin = server.conn().await;
    assert_eq!(admin.admin("status").await, "f\t4\t0\t0\n.\n");
    let jobs = admin.admin("show jobs").await;
    assert!(jobs.contains(&*String::from_utf8_lossy(&scheduled)), "{jobs}");
    let mut worker = Conn::worker(server.addr, &["f"]).await;
    let mut got = Vec::new();
    while let Some((h, _, unique, data)) = worker.grab().await {
        got.push((h.clone(), String::from_utf8(unique.to_vec()).unwrap(), String::from_utf8(data.to_vec()).unwrap()));
        worker.send(Request::WorkComplete { handle: h, data: b("") }).await;
    }
    let expected = [(high, "u-high", "high"), (normal, "u-normal", "normal"), (low, "u-low", "low")];
    let expected: Vec<_> = expected.into_iter().map(|(h, u, d)| (h, u.to_string(), d.to_string())).collect();
    assert_eq!(got, expected, "same handles, in priority order; the scheduled job waits");
    server.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_keep_their_order_while_commits_are_pending() {
    let dir = temp_dir("order");
    let server = start(&dir).await;
    let mut c = server.conn().await;
    let mut bytes = bytes::BytesMut::new();
    let submit = |unique: &str, background| Request::SubmitJob {
        function: b("f"),
        unique: b(unique),
        data: b("d"),
        priority: Priority::Normal,
        background,
    };
    for req in [
        submit("a", true),
        submit("fg", false),
        submit("a", true),
        Request::EchoReq { data: b("after") },
        submit("b", true),
    ] {
        req.encode(&mut bytes);
    }
    c.send_raw(&bytes).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(c.recv().await);
    }
    let handle = |r: &Response| match r {
        Response::JobCreated { handle } => handle.clone(),
        other => panic!("expected JOB_CREATED, got {other:?}"),
    };
    let (a1, fg, a2, b1) = (handle(&got[0]), handle(&got[1]), handle(&got[2]), handle(&got[4]));
    assert_eq!(a1, a2, "a duplicate of a job being stored gets its handle");
    assert_ne!(a1, fg);
    assert_ne!(a1, b1);
    assert_eq!(got[3], Response::EchoRes { data: b("after") });
    server.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_second_server_on_the_data_directory_is_refused() {
    let dir = temp_dir("lock");
    let server = start(&dir).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = ServeOptions { queue: QueueSpec::Embedded(dir.clone()), ..Default::default() };
    let second = gearbox_server::serve(vec![listener], None, options, Default::default());
    let err = tokio::time::timeout(Duration::from_secs(5), second).await.expect("refused at once").unwrap_err();
    assert!(err.to_string().contains("another gearbox server"), "{err}");
    server.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// 1500 jobs of 10 KB, past the 8 MiB of payloads kept in memory: half run, the server
/// restarts (loading the rest, most of them without their payload), the other half run. Each
/// runs once, in order, with its payload.
async fn payloads_past_the_budget_run_intact(queue: QueueSpec) {
    let options = || ServeOptions { queue: queue.clone(), ..Default::default() };
    let server = TestServer::with(options()).await;
    let mut c = server.conn().await;
    let count = 1500;
    let payload = |i: usize| format!("{i:06}-{}", "x".repeat(10_000));
    let mut bytes = bytes::BytesMut::new();
    for i in 0..count {
        Request::SubmitJob {
            function: b("big"),
            unique: b(&format!("big-{i}")),
            data: b(&payload(i)),
            priority: Priority::Normal,
            background: true,
        }
        .encode(&mut bytes);
    }
    c.send_raw(&bytes).await;
    for _ in 0..count {
        assert!(matches!(c.recv().await, Response::JobCreated { .. }));
    }
    let mut next = 0;
    let mut server = server;
    for run_until in [count / 2, count] {
        let mut worker = Conn::worker(server.addr, &["big"]).await;
        while next < run_until {
            let (h, _, unique, data) = worker.grab_some().await;
            assert_eq!(unique, b(&format!("big-{next}")));
            assert!(data == b(&payload(next)), "payload of job {next} differs");
            worker.send(Request::WorkComplete { handle: h, data: b("") }).await;
            next += 1;
        }
        // Packets are applied in order: once the echo is back, so are the completions.
        worker.send(Request::EchoReq { data: b("sync") }).await;
        assert!(matches!(worker.recv().await, Response::EchoRes { .. }));
        server.stop().await;
        server = TestServer::with(options()).await;
    }
    assert_eq!(Conn::worker(server.addr, &["big"]).await.grab().await, None, "a job ran twice");
    server.stop().await;
}

#[tokio::test]
async fn payloads_beyond_the_memory_budget_are_read_back_from_disk() {
    let dir = temp_dir("evict");
    payloads_past_the_budget_run_intact(QueueSpec::Embedded(dir.clone())).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A table of its own for a test on a database store, dropped at the end.
struct Table {
    name: String,
    drop_with: (&'static str, &'static [&'static str]),
}

impl Table {
    fn new(kind: &str, drop_with: (&'static str, &'static [&'static str])) -> Table {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        Table { name: format!("durable_{kind}_{}_{nanos}", std::process::id()), drop_with }
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let (program, args) = self.drop_with;
        let _ = std::process::Command::new(program)
            .args(args)
            .arg(format!("DROP TABLE IF EXISTS {0}, {0}_dead, {0}_state", self.name))
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_beyond_the_memory_budget_are_read_back_from_postgres() {
    let table = Table::new("pg", ("psql", &["-q", "-h", "127.0.0.1", "-U", "postgres", "test", "-c"]));
    let url = format!("postgres://postgres@127.0.0.1:5432/test?table={}", table.name);
    payloads_past_the_budget_run_intact(QueueSpec::Sql(url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_beyond_the_memory_budget_are_read_back_from_mariadb() {
    let table = Table::new("my", ("mariadb", &["-h", "127.0.0.1", "-u", "root", "test", "-e"]));
    let url = format!("mysql://root@127.0.0.1:3306/test?table={}", table.name);
    payloads_past_the_budget_run_intact(QueueSpec::Sql(url)).await;
}

/// A small tmpfs, unmounted on drop. Needs root, as the test command runs.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(name: &str, size: &str) -> Tmpfs {
        let dir = temp_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs needs root (the test command runs as root)");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn a_full_disk_fails_submissions_visibly_and_loses_nothing() {
    let disk = Tmpfs::mount("full", "160m");
    let data = disk.0.join("queue");
    let server = start(&data).await;
    // Fill the disk, leaving the server only the segment it reserved at start.
    let filler = disk.0.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 1 << 20];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    drop(f);

    let mut c = server.conn().await;
    let payload = "p".repeat(1 << 20);
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..100 {
        c.send(Request::SubmitJob {
            function: b("f"),
            unique: b(&format!("job-{i}")),
            data: b(&payload),
            priority: Priority::Normal,
            background: true,
        })
        .await;
        match c.recv().await {
            Response::JobCreated { .. } => accepted.push(i),
            Response::Error { code, .. } => {
                assert_eq!(code, b("QUEUE_ERROR"));
                refused += 1;
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(refused == 1 && accepted.len() > 10, "accepted {} then refused {refused}", accepted.len());
    // A background request joining a foreground job cannot be stored either: it is refused,
    // and the job stays a foreground job, which leaves with its client.
    let mut fg = server.conn().await;
    fg.submit("g", "joined", &payload, false).await;
    c.send(Request::SubmitJob {
        function: b("g"),
        unique: b("joined"),
        data: b(&payload),
        priority: Priority::Normal,
        background: true,
    })
    .await;
    assert!(matches!(c.recv().await, Response::Error { code, .. } if code == b("QUEUE_ERROR")));
    drop(fg);
    let mut admin = server.conn().await;
    admin.admin_until("status", &format!("f\t{}\t0\t0\ng\t0\t0\t0\n.\n", accepted.len())).await;
    // The server is still up, and works again once there is room.
    c.send(Request::EchoReq { data: b("alive") }).await;
    assert_eq!(c.recv().await, Response::EchoRes { data: b("alive") });
    std::fs::remove_file(&filler).unwrap();
    let after = c.submit("f", "after-space", "small", true).await;
    drop(c);
    server.stop().await;

    // Every acknowledged job is there after a restart; the refused one is not.
    let server = start(&data).await;
    let mut worker = Conn::worker(server.addr, &["f"]).await;
    let mut uniques = Vec::new();
    let mut last = None;
    while let Some((h, _, unique, _)) = worker.grab().await {
        uniques.push(String::from_utf8(unique.to_vec()).unwrap());
        worker.send(Request::WorkComplete { handle: h.clone(), data: b("") }).await;
        last = Some(h);
    }
    let mut expected: Vec<String> = accepted.iter().map(|i| format!("job-{i}")).collect();
    expected.push("after-space".into());
    assert_eq!(uniques, expected);
    assert_eq!(last, Some(after));
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// `n` background submissions for `function` (unique keys `u0`, `u1`, ...), to send at once.
fn background_submissions(function: &str, n: usize) -> bytes::BytesMut {
    let mut bytes = bytes::BytesMut::new();
    for i in 0..n {
        let unique = b(&format!("u{i}"));
        let req = Request::SubmitJob {
            function: b(function),
            unique,
            data: b("d"),
            priority: Priority::Normal,
            background: true,
        };
        req.encode(&mut bytes);
    }
    bytes
}

/// Jobs waiting for their commit count against `maxqueue` and keep `drop function` from
/// orphaning them: a pipelined burst lands within one commit window.
#[tokio::test]
async fn jobs_waiting_for_their_commit_count_against_limits() {
    let dir = temp_dir("limits");
    let server = start(&dir).await;
    let mut admin = server.conn().await;
    assert_eq!(admin.admin("maxqueue f 3").await, "OK\r\n");
    let mut c = server.conn().await;
    c.send_raw(&background_submissions("f", 10)).await;
    let mut created = 0;
    for _ in 0..10 {
        match c.recv().await {
            Response::JobCreated { .. } => created += 1,
            Response::Error { code, .. } => assert_eq!(&code[..], b"QUEUE_ERROR"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(created, 3);
    assert_eq!(admin.admin("drop function f").await, "ERR there are still queued jobs\r\n");
    server.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A server stopped while submissions wait for their commit still commits them and tells
/// their clients: every job stored at shutdown was acknowledged, and nothing acknowledged is
/// missing after the restart.
#[tokio::test]
async fn shutdown_acknowledges_what_it_commits() {
    let dir = temp_dir("shutdown-acks");
    let server = start(&dir).await;
    let mut c = server.conn().await;
    c.send_raw(&background_submissions("f", 2000)).await;
    // Stop as soon as the first acknowledgement shows the submissions are being applied.
    assert!(matches!(c.recv().await, Response::JobCreated { .. }));
    server.shutdown.cancel();
    let mut acknowledged = 1;
    while let Some(reply) = c.try_recv().await {
        assert!(matches!(reply, Response::JobCreated { .. }), "{reply:?}");
        acknowledged += 1;
    }
    server.stop().await;

    let server = start(&dir).await;
    let mut admin = server.conn().await;
    assert_eq!(admin.admin("status").await, format!("f\t{acknowledged}\t0\t0\n.\n"));
    server.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
