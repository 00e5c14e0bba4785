//! The job lifecycle on a cluster (`--cluster`, both databases): one dead set, paused
//! functions and fired ticks shared by the nodes; a schedule on every node fires each tick
//! once; a job retried on one node runs after its backoff; a dead job replayed from another.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::admin;
use common::cluster::{node_with, wait_until, Table, MYSQL, POSTGRES};
use common::gear::{Conn, Outcome, TestWorker};
use gearbox_proto::{GrabKind, Request, Response};

fn dead_handles(addr: SocketAddr) -> Vec<String> {
    let reply = admin(addr, "dead list doomed");
    reply
        .lines()
        .filter(|l| *l != ".")
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["handle"].as_str().unwrap().to_string())
        .collect()
}

fn lifecycle_across_nodes(base: &str) {
    let table = Table::new(base, "life");
    let url = table.url(base);
    let dir = std::env::temp_dir().join(format!("gearbox-cluster-life-{}-{}", std::process::id(), table.name));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gearbox.toml");
    std::fs::write(&config, "[[schedule]]\nname = \"beat\"\nfunction = \"tick\"\ncron = \"* * * * * *\"\n").unwrap();
    let flags = ["--config", config.to_str().unwrap(), "--retry", "doomed=1/200ms"];
    let (a, b) = (node_with(&url, &flags), node_with(&url, &flags));

    // Both nodes evaluate every tick; each tick runs once.
    let ticks = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let tick_worker = TestWorker::start(a.addr, "tick", Duration::ZERO, ticks.clone(), |_| Outcome::Complete);

    // A job failing on node b is retried after its backoff, then lands in the dead set,
    // which node a lists.
    let failures = Arc::new(Mutex::new(Vec::new()));
    let failing = TestWorker::start(b.addr, "doomed", Duration::ZERO, failures.clone(), |_| Outcome::Fail);
    let handle = Conn::connect(b.addr).unwrap().submit_background("doomed", "once", "the payload").unwrap();
    wait_until("the dead set, seen from node a", Duration::from_secs(20), || dead_handles(a.addr) == [handle.clone()]);
    let attempts = failures.lock().unwrap().clone();
    assert_eq!(attempts.len(), 2);
    assert!(attempts[1].at - attempts[0].at >= Duration::from_millis(180), "the backoff was kept");
    drop(failing);

    // Replayed from node a; node b's fixed worker runs it.
    let reruns = Arc::new(Mutex::new(Vec::new()));
    let fixed = TestWorker::start(b.addr, "doomed", Duration::ZERO, reruns.clone(), |_| Outcome::Complete);
    let out = Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(["dead", "-s", &a.addr.to_string(), "retry", &handle])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until("the replayed job", Duration::from_secs(20), || reruns.lock().unwrap().len() == 1);
    let rerun = reruns.lock().unwrap()[0].clone();
    assert_eq!((rerun.unique.as_str(), rerun.data.as_str()), ("once", "the payload"));
    assert!(dead_handles(a.addr).is_empty() && dead_handles(b.addr).is_empty());
    drop(fixed);

    // Paused on node a: node b's workers get none of its jobs, until it is resumed on b.
    assert_eq!(admin(a.addr, "pause work"), "OK\r\n");
    wait_until("node b to learn of the pause", Duration::from_secs(5), || {
        admin(b.addr, "limit").contains("work\tpaused\t0\n")
    });
    let mut client = Conn::connect(b.addr).unwrap();
    client.submit_background("work", "w1", "").unwrap();
    let mut worker = Conn::connect(b.addr).unwrap();
    worker.send(&Request::CanDo { function: "work".into() }).unwrap();
    worker.send(&Request::GrabJob(GrabKind::Plain)).unwrap();
    assert!(matches!(worker.recv(Duration::from_secs(5)).unwrap(), Some(Response::NoJob)));
    assert_eq!(admin(b.addr, "resume work"), "OK\r\n");
    wait_until("the job after the resume", Duration::from_secs(10), || {
        worker.send(&Request::GrabJob(GrabKind::Plain)).unwrap();
        matches!(worker.recv(Duration::from_secs(2)).unwrap(), Some(Response::JobAssign { .. }))
    });

    wait_until("four ticks", Duration::from_secs(10), || ticks.lock().unwrap().len() >= 4);
    // A second for a duplicate of the last tick to show up, if the other node fired it too.
    std::thread::sleep(Duration::from_millis(1100));
    drop(tick_worker);
    let elapsed = started.elapsed().as_secs() as usize;
    let uniques: Vec<String> = ticks.lock().unwrap().iter().map(|t| t.unique.clone()).collect();
    let distinct: HashSet<&String> = uniques.iter().collect();
    assert_eq!(distinct.len(), uniques.len(), "a tick ran twice: {uniques:?}");
    assert!(uniques.len() <= elapsed + 1, "{} ticks in {elapsed} s", uniques.len());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn lifecycle_across_nodes_on_mariadb() {
    lifecycle_across_nodes(MYSQL);
}

#[test]
fn lifecycle_across_nodes_on_postgres() {
    lifecycle_across_nodes(POSTGRES);
}
