//! The client against real servers: gearbox (in process) and gearmand (Debian's, as a child
//! process), with the `gearman` tool as the worker.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{gearbox, gearmand, spare_port, Proc};
use gearbox_client::{Client, Error, Job};
use gearbox_proto::Priority;

/// `gearman -w` running `cmd` for each job of `function`.
fn worker(addr: &str, function: &str, cmd: &[&str]) -> Proc {
    let (host, port) = addr.rsplit_once(':').unwrap();
    Proc(
        Command::new("gearman")
            .args(["-h", host, "-p", port, "-w", "-f", function, "--"])
            .args(cmd)
            .stdout(Stdio::null())
            .spawn()
            .expect("the gearman tool (Debian gearman-tools) is installed"),
    )
}

async fn exercise(addr: &str) {
    let _rev = worker(addr, "rev", &["rev"]);
    let _fail = worker(addr, "fails", &["false"]);
    let client = Client::new([addr]).with_timeout(Duration::from_secs(10));
    assert_eq!(client.echo("ping").await.unwrap(), "ping");
    assert_eq!(client.run(Job::new("rev", "hello")).await.unwrap(), "olleh");
    let high = Job::new("rev", "abc").priority(Priority::High).unique("u-abc");
    assert_eq!(client.run(high).await.unwrap(), "cba");
    assert!(matches!(client.run(Job::new("fails", "x")).await, Err(Error::Failed)));

    let handle = client.submit_background(Job::new("nobody-runs-this", "x").unique("u-waits")).await.unwrap();
    let status = client.status(&handle).await.unwrap();
    assert!(status.known && !status.running);
    let (by_unique, waiting) = client.status_by_unique("u-waits").await.unwrap();
    assert_eq!((by_unique, waiting), (status, 0));
    let gone = client.submit_background(Job::new("rev", "bg")).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while client.status(&gone).await.unwrap().known {
        assert!(tokio::time::Instant::now() < deadline, "background job never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn against_gearbox() {
    let (addr, stop) = gearbox().await;
    exercise(&addr).await;
    stop.cancel();
}

#[tokio::test]
async fn against_gearmand() {
    let (addr, _gearmand) = gearmand().await;
    exercise(&addr).await;
}

#[tokio::test]
async fn a_dead_server_is_skipped() {
    let (addr, stop) = gearbox().await;
    let dead = format!("127.0.0.1:{}", spare_port());
    let client = Client::new([dead.as_str(), addr.as_str()]).with_timeout(Duration::from_secs(10));
    for i in 0..10 {
        // Round-robin would send half of these to the dead server.
        client.submit_background(Job::new("f", format!("{i}"))).await.unwrap();
        client.submit_background(Job::new("f", "x").unique(format!("key-{i}"))).await.unwrap();
    }
    stop.cancel();
}

#[tokio::test]
async fn unique_keys_route_to_one_server_so_jobs_coalesce() {
    let (a, stop_a) = gearbox().await;
    let (b, stop_b) = gearbox().await;
    let client = Client::new([a.as_str(), b.as_str()]);
    for i in 0..20 {
        let job = || Job::new("f", "x").unique(format!("same-{i}"));
        let first = client.submit_background(job()).await.unwrap();
        let second = client.submit_background(job()).await.unwrap();
        assert_eq!(first, second, "the duplicate went to the same server and coalesced");
    }
    stop_a.cancel();
    stop_b.cancel();
}

#[tokio::test]
async fn jobs_keep_flowing_when_a_server_is_killed() {
    let (a, stop_a) = gearbox().await;
    let (b, stop_b) = gearbox().await;
    let client = Client::new([a.as_str(), b.as_str()]).with_timeout(Duration::from_secs(10));
    for i in 0..10 {
        client.submit_background(Job::new("f", format!("{i}"))).await.unwrap();
    }
    // Kill one: its connection drops, and submissions move to the other server.
    stop_a.cancel();
    for i in 0..20 {
        client.submit_background(Job::new("f", "x").unique(format!("after-{i}"))).await.unwrap();
        client.submit_background(Job::new("f", format!("{i}"))).await.unwrap();
    }
    stop_b.cancel();
}
