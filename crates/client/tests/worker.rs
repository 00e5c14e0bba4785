//! The worker library with the client library, against gearbox and gearmand.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{gearbox, gearmand};
use gearbox_client::worker::{JobError, Worker};
use gearbox_client::{Client, Error, Job, JobEvent};
use tokio_util::sync::CancellationToken;

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
