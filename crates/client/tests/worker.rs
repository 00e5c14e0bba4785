//! The worker library with the client library, against gearbox and gearmand.

use std::time::Duration;

use bytes::Bytes;
use gearbox_client::worker::{JobError, Worker};
use gearbox_client::{Client, Error, Job, JobEvent};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

async fn gearbox() -> (String, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    tokio::spawn(gearbox_server::serve(vec![listener], Default::default(), stop.clone()));
    (addr, stop)
}

struct Gearmand(std::process::Child);

impl Drop for Gearmand {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn gearmand() -> (String, Gearmand) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let pid_file = std::env::temp_dir().join(format!("gearmand-worker-test-{port}.pid"));
    let child = std::process::Command::new("gearmand")
        .args(["--listen", "127.0.0.1", "--port", &port.to_string(), "--threads=0", "--log-file", "none"])
        .arg(format!("--pid-file={}", pid_file.display()))
        .spawn()
        .expect("gearmand is installed");
    let addr = format!("127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "gearmand does not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (addr, Gearmand(child))
}

fn worker(addr: &str) -> Worker {
    Worker::new([addr])
        .register("reverse", |job| async move {
            job.status(1, 2);
            job.data("partial:");
            let mut data = job.payload().to_vec();
            data.reverse();
            Ok::<_, JobError>(Bytes::from(data))
        })
        .register("explode", |_job| async move { Err::<Bytes, _>("kaboom") })
        .register("panics", |_job| async move {
            if true {
                panic!("bug in a job");
            }
            Ok::<_, JobError>(Bytes::new())
        })
        .concurrency(2)
}

async fn exercise(addr: &str) {
    let stop = CancellationToken::new();
    let serving = tokio::spawn(worker(addr).run(stop.clone().cancelled_owned()));
    let client = Client::new([addr]).with_timeout(Duration::from_secs(10));
    assert_eq!(client.run(Job::new("reverse", "abc")).await.unwrap(), "partial:cba");
    let mut events = client.submit(Job::new("reverse", "xy")).await.unwrap();
    let mut seen = Vec::new();
    while let Some(e) = events.next().await {
        let last = matches!(e, JobEvent::Complete(_));
        seen.push(e);
        if last {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            JobEvent::Status { numerator: 1, denominator: 2 },
            JobEvent::Data(Bytes::from("partial:")),
            JobEvent::Complete(Bytes::from("yx"))
        ]
    );
    match client.run(Job::new("explode", "")).await {
        Err(Error::Exception(message)) => assert_eq!(message, "kaboom"),
        other => panic!("expected an exception, got {other:?}"),
    }
    assert!(matches!(client.run(Job::new("panics", "")).await, Err(Error::Failed)));
    // The panic cost the job, not the worker.
    assert_eq!(client.run(Job::new("reverse", "ok")).await.unwrap(), "partial:ko");
    stop.cancel();
    serving.await.unwrap();
}

#[tokio::test]
async fn worker_and_client_against_gearbox() {
    let (addr, stop) = gearbox().await;
    exercise(&addr).await;
    stop.cancel();
}

#[tokio::test]
async fn worker_and_client_against_gearmand() {
    let (addr, _gearmand) = gearmand().await;
    exercise(&addr).await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_running_jobs_and_takes_no_more() {
    let (addr, server_stop) = gearbox().await;
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let slow = Worker::new([addr.as_str()]).register("slow", move |job| {
        let started = started_tx.clone();
        async move {
            let _ = started.send(());
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, JobError>(job.payload().clone())
        }
    });
    let serving = tokio::spawn(slow.run(stop.clone().cancelled_owned()));
    let client = std::sync::Arc::new(Client::new([addr.as_str()]).with_timeout(Duration::from_secs(10)));
    let running = tokio::spawn({
        let client = client.clone();
        async move { client.run(Job::new("slow", "first")).await }
    });
    started.recv().await.unwrap();
    stop.cancel();
    assert_eq!(running.await.unwrap().unwrap(), "first", "the running job finished");
    serving.await.unwrap();
    // The worker's connections are closed: nothing can take this one.
    let queued = client.submit_background(Job::new("slow", "second")).await.unwrap();
    let status = client.status(&queued).await.unwrap();
    assert!(status.known && !status.running, "no job is taken after shutdown");
    server_stop.cancel();
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Resize {
    path: String,
    width: u32,
}

impl gearbox_client::typed::TypedJob for Resize {
    const FUNCTION: &'static str = "resize";
    type Output = String;
}

#[tokio::test]
async fn typed_jobs_share_one_type() {
    let (addr, server_stop) = gearbox().await;
    let stop = CancellationToken::new();
    let serving = tokio::spawn(
        Worker::new([addr.as_str()])
            .handle(|r: Resize, _job| async move { Ok::<_, JobError>(format!("{}@{}", r.path, r.width)) })
            .run(stop.clone().cancelled_owned()),
    );
    let client = Client::new([addr.as_str()]).with_timeout(Duration::from_secs(10));
    let out = client.run_typed(&Resize { path: "cat.png".into(), width: 128 }).await.unwrap();
    assert_eq!(out, "cat.png@128");
    // JSON on the wire: any client can submit it, and a bad payload is a clear failure.
    let raw = client.run(Job::new("resize", r#"{"path":"a.png","width":64}"#)).await.unwrap();
    assert_eq!(raw, "\"a.png@64\"");
    match client.run(Job::new("resize", "not json")).await {
        Err(Error::Exception(message)) => assert!(String::from_utf8_lossy(&message).contains("bad resize payload")),
        other => panic!("expected an exception, got {other:?}"),
    }
    stop.cancel();
    serving.await.unwrap();
    server_stop.cancel();
}
