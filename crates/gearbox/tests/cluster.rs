//! Three gearbox servers on one queue table (`--cluster`), on the shared MariaDB and
//! PostgreSQL of the test machine: a node killed, paused past its lease, or cut off from the
//! database; the database gone for a moment under load; coalescing and status across nodes.
//! Leases are 3 s here so that takeovers come quickly.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{node, signal, wait_until, Table, LEASE, MYSQL, POSTGRES};
use common::gear::{Conn, Taken, Worker};
use common::proxy::Proxy;
use common::{temp_data_dir, Server};

fn db_addr(base: &str) -> SocketAddr {
    if base.starts_with("mysql") {
        "127.0.0.1:3306".parse().unwrap()
    } else {
        "127.0.0.1:5432".parse().unwrap()
    }
}

fn done_uniques(log: &Mutex<Vec<Taken>>, workers: &[&str]) -> HashSet<String> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|t| t.done && workers.iter().any(|w| t.worker.starts_with(w)))
        .map(|t| t.unique.clone())
        .collect()
}

/// Submits `count` background jobs to `addr`, one every `every`, until the node stops
/// answering; returns the unique keys it acknowledged, and the errors it answered with.
fn submit_spread(
    addr: SocketAddr,
    prefix: String,
    count: usize,
    every: Duration,
) -> std::thread::JoinHandle<(Vec<String>, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut acked, mut errors) = (Vec::new(), Vec::new());
        let Ok(mut conn) = Conn::connect(addr) else { return (acked, errors) };
        for i in 0..count {
            let unique = format!("{prefix}-{i}");
            match conn.submit_background("work", &unique, "x") {
                Ok(_) => acked.push(unique),
                Err(e) if e.contains("QUEUE_ERROR") => errors.push(e),
                Err(_) => break,
            }
            std::thread::sleep(every);
        }
        (acked, errors)
    })
}

fn killed_node_jobs_run_on_the_survivors(base: &str) {
    let table = Table::new(base, "kill");
    let url = table.url(base);
    let (a, mut b, c) = (node(&url), node(&url), node(&url));
    let log: Arc<Mutex<Vec<Taken>>> = Arc::default();
    let work = Duration::from_millis(50);
    let mut workers = Vec::new();
    for (name, n) in [("a", &a), ("b", &b), ("c", &c)] {
        for i in 0..2 {
            workers.push(Worker::start(&format!("{name}{i}"), n.addr, "work", work, log.clone()));
        }
    }
    let submitters: Vec<_> = [("a", &a), ("b", &b), ("c", &c)]
        .iter()
        .map(|(name, n)| submit_spread(n.addr, format!("k{name}"), 100, Duration::from_millis(10)))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let b_took = log.lock().unwrap().iter().filter(|t| t.worker.starts_with('b') && !t.done).count();
    b.child.kill().unwrap();
    let killed = Instant::now();
    let mut acked = Vec::new();
    for (name, submitter) in ["a", "b", "c"].into_iter().zip(submitters) {
        let (ok, errors) = submitter.join().unwrap();
        assert!(name == "b" || errors.is_empty(), "node {name} refused submissions: {errors:?}");
        acked.extend(ok);
    }
    assert!(acked.iter().filter(|k| k.starts_with("kb")).count() > 10, "node b acknowledged jobs before it died");
    let acked: HashSet<String> = acked.into_iter().collect();
    wait_until(
        "every acknowledged job to run on a survivor or on b before it died",
        LEASE + Duration::from_secs(20),
        || {
            let done = done_uniques(&log, &["a", "b", "c"]);
            acked.iter().all(|k| done.contains(k)) && table.rows() == 0
        },
    );
    let last = log.lock().unwrap().iter().filter(|t| !t.worker.starts_with('b')).map(|t| t.at).max().unwrap();
    let taken_over = a.logged("took over node").len() + c.logged("took over node").len();
    assert_eq!(taken_over, 1, "one survivor took node b over");
    assert!(last - killed < LEASE + Duration::from_secs(5), "the last job ran {:?} after the kill", last - killed);
    eprintln!("b was running {b_took} jobs when killed; the last job ran {:?} after", last - killed);

    // The survivors, having run b's jobs, take new ones as before (with and without keys).
    let mut more = HashSet::new();
    for n in [&a, &c] {
        let mut conn = Conn::connect(n.addr).unwrap();
        for i in 0..20 {
            let unique = format!("after-{}-{i}", n.port());
            conn.submit_background("work", &unique, "x").unwrap();
            conn.submit_background("work", "", "x").unwrap();
            more.insert(unique);
        }
    }
    wait_until("the new jobs to run", Duration::from_secs(20), || {
        let done = done_uniques(&log, &["a", "c"]);
        more.iter().all(|k| done.contains(k)) && table.rows() == 0
    });
}

fn paused_node_is_fenced_and_rejoins(base: &str) {
    let table = Table::new(base, "pause");
    let url = table.url(base);
    let (a, b, c) = (node(&url), node(&url), node(&url));
    let log: Arc<Mutex<Vec<Taken>>> = Arc::default();
    let b_worker = Worker::start_held("b", b.addr, "p", Duration::ZERO, log.clone(), false);
    let handle = Conn::connect(b.addr).unwrap().submit_background("p", "only", "x").unwrap();
    wait_until("b's worker to take the job", Duration::from_secs(10), || !log.lock().unwrap().is_empty());
    let a_worker = Worker::start_held("a", a.addr, "p", Duration::ZERO, log.clone(), false);

    signal(&b, libc::SIGSTOP);
    let stopped = Instant::now();
    wait_until("a to take the paused node's job", LEASE + Duration::from_secs(5), || {
        log.lock().unwrap().iter().any(|t| t.worker == "a")
    });
    eprintln!("a took the job {:?} after b was paused", stopped.elapsed());
    // Known and running, on a node that does not own it (a's start is written within 100 ms).
    let mut status = Conn::connect(c.addr).unwrap();
    wait_until("c to see the job running", Duration::from_secs(5), || status.status(&handle) == (true, true, 0, 0));

    // b wakes up and its worker completes the job: that must not end a's attempt.
    signal(&b, libc::SIGCONT);
    b_worker.release.store(true, std::sync::atomic::Ordering::Relaxed);
    wait_until("b's worker to send its result", Duration::from_secs(10), || {
        log.lock().unwrap().iter().any(|t| t.worker == "b" && t.done)
    });
    wait_until("b to join again", Duration::from_secs(15), || !b.logged("joined again as node").is_empty());
    assert_eq!(b.logged("lost its lease").len(), 1);
    // A commit of b after its worker's result: any removal b still had pending went with it.
    let mut after = Conn::connect(b.addr).unwrap();
    wait_until("b to accept a job again", Duration::from_secs(10), || {
        after.submit_background("other", "", "x").is_ok()
    });
    assert_eq!(status.status(&handle), (true, true, 0, 0), "b's late result changed nothing");

    a_worker.release.store(true, std::sync::atomic::Ordering::Relaxed);
    wait_until("the job to end", Duration::from_secs(10), || status.status(&handle) == (false, false, 0, 0));
    // The view refreshes every lease/3: b's old incarnation gone, its new one there.
    wait_until("three nodes in the view", Duration::from_secs(10), || {
        admin_lines(&a, "cluster").iter().filter(|l| !l.starts_with("total") && !l.starts_with("unowned")).count() == 3
    });
}

/// The answer to an admin command, without the final `.`.
fn admin_lines(server: &Server, command: &str) -> Vec<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream.write_all(format!("{command}\n").as_bytes()).unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(stream).lines() {
        let line = line.unwrap();
        if line == "." || line.starts_with("ERR") {
            break;
        }
        lines.push(line);
    }
    lines
}

fn cut_off_node_stops_dispatching(base: &str) {
    let table = Table::new(base, "cut");
    let proxy = Proxy::start(db_addr(base));
    let (a, b) = (node(&table.url(base)), node(&table.url(&proxy.url(base))));
    let log: Arc<Mutex<Vec<Taken>>> = Arc::default();
    let b_worker = Worker::start_held("b", b.addr, "work", Duration::ZERO, log.clone(), false);
    let mut submit = Conn::connect(b.addr).unwrap();
    let uniques: Vec<String> = (0..4).map(|i| format!("cut-{i}")).collect();
    for u in &uniques {
        submit.submit_background("work", u, "x").unwrap();
    }
    wait_until("b's worker to take a job", Duration::from_secs(10), || !log.lock().unwrap().is_empty());
    let _a_worker = Worker::start("a", a.addr, "work", Duration::ZERO, log.clone());

    proxy.cut();
    let cut = Instant::now();
    b_worker.release.store(true, std::sync::atomic::Ordering::Relaxed);
    wait_until("every job to run on a", LEASE + Duration::from_secs(10), || {
        let done = done_uniques(&log, &["a"]);
        uniques.iter().all(|u| done.contains(u))
    });
    eprintln!("a ran b's jobs {:?} after b was cut off", cut.elapsed());
    // a carries on with new work meanwhile.
    let mut on_a = Conn::connect(a.addr).unwrap();
    on_a.submit_background("work", "fresh", "x").unwrap();
    wait_until("a to run new work", Duration::from_secs(10), || done_uniques(&log, &["a"]).contains("fresh"));
    let late: Vec<Duration> =
        log.lock().unwrap().iter().filter(|t| t.worker == "b" && t.at > cut).map(|t| t.at - cut).collect();
    assert!(late.iter().all(|&d| d < LEASE), "b dispatched after its lease: {late:?}");
    assert!(!b.logged("lost its lease").is_empty());

    proxy.heal();
    wait_until("b to join again", Duration::from_secs(20), || !b.logged("joined again as node").is_empty());
    wait_until("the table to empty", Duration::from_secs(10), || table.rows() == 0);
}

fn database_gone_for_a_moment(base: &str) {
    let table = Table::new(base, "outage");
    let proxy = Proxy::start(db_addr(base));
    let url = table.url(&proxy.url(base));
    let nodes = [node(&url), node(&url), node(&url)];
    let log: Arc<Mutex<Vec<Taken>>> = Arc::default();
    let _workers: Vec<Worker> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| Worker::start(&format!("w{i}"), n.addr, "work", Duration::ZERO, log.clone()))
        .collect();
    let submitters: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let addr = n.addr;
            std::thread::spawn(move || {
                // Keeps submitting through the outage: refused submissions are not acknowledged.
                let mut acked = Vec::new();
                let mut conn = Conn::connect(addr).unwrap();
                for j in 0..200 {
                    let unique = format!("o{i}-{j}");
                    if conn.submit_background("work", &unique, "x").is_ok() {
                        acked.push(unique);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    proxy.cut();
    std::thread::sleep(Duration::from_millis(1500));
    proxy.heal();
    let acked: HashSet<String> = submitters.into_iter().flat_map(|s| s.join().unwrap()).collect();
    assert!(acked.len() > 100, "submissions went on around the outage: {}", acked.len());
    wait_until("every acknowledged job to run and leave the table", Duration::from_secs(30), || {
        let done = done_uniques(&log, &["w"]);
        acked.iter().all(|k| done.contains(k)) && table.rows() == 0
    });
}

fn one_job_server_seen_from_any_node(base: &str) {
    let table = Table::new(base, "one");
    let url = table.url(base);
    let a = node(&url);
    let b = node(&url);
    let lease = format!("{}s", LEASE.as_secs());
    let c = Server::spawn(
        temp_data_dir(),
        &["--cluster", "--queue", &url, "--node-lease", &lease, "--job-log", "none", "--http", "127.0.0.1:0"],
        |_| {},
    )
    .ready();
    let handle = Conn::connect(a.addr).unwrap().submit_background("f", "same", "x").unwrap();
    for n in [&b, &c] {
        let again = Conn::connect(n.addr).unwrap().submit_background("f", "same", "y").unwrap();
        assert_eq!(again, handle, "a duplicate sent to another node names the same job");
    }
    let other = Conn::connect(b.addr).unwrap().submit_background("f", "different", "x").unwrap();
    assert_ne!(other, handle);
    let mut on_b = Conn::connect(b.addr).unwrap();
    assert_eq!(on_b.status(&handle), (true, false, 0, 0));
    assert_eq!(on_b.status_unique("same"), (true, false));
    assert_eq!(on_b.status("H:gearbox:4611686018427387904"), (false, false, 0, 0));

    // A worker on c claims the jobs; its progress shows on every node.
    let mut worker = Conn::connect(c.addr).unwrap();
    worker.send(&gearbox_proto::Request::CanDo { function: "f".into() }).unwrap();
    let mut handles = Vec::new();
    wait_until("c's worker to get both jobs", Duration::from_secs(10), || {
        worker.send(&gearbox_proto::Request::GrabJob(gearbox_proto::GrabKind::Plain)).unwrap();
        if let Ok(Some(gearbox_proto::Response::JobAssign { handle, .. })) = worker.recv(Duration::from_secs(5)) {
            handles.push(String::from_utf8(handle.to_vec()).unwrap());
        }
        handles.len() == 2
    });
    assert!(handles.contains(&handle));
    worker
        .send(&gearbox_proto::Request::WorkStatus {
            handle: handle.clone().into_bytes().into(),
            numerator: 1,
            denominator: 4,
        })
        .unwrap();
    wait_until("a to see the progress", Duration::from_secs(10), || on_b.status(&handle) == (true, true, 1, 4));
    let mut on_a = Conn::connect(a.addr).unwrap();
    assert_eq!(on_a.status_unique("same"), (true, true));

    // The view is refreshed every lease/3.
    wait_until("the view to show three nodes", Duration::from_secs(5), || {
        let (code, view) = common::get_json(c.http.unwrap(), "/api/cluster");
        code == 200 && view["nodes"].as_array().unwrap().len() == 3
    });
    let cli =
        common::run_tool(env!("CARGO_BIN_EXE_gearbox"), &["admin", "-s", &c.addr.to_string(), "status", "--cluster"]);
    let text = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success(), "{cli:?}");
    assert_eq!(text.lines().filter(|l| l.contains("127.0.0.1:")).count(), 3, "{text}");

    for h in &handles {
        worker
            .send(&gearbox_proto::Request::WorkComplete {
                handle: h.clone().into_bytes().into(),
                data: Default::default(),
            })
            .unwrap();
    }
    wait_until("the job to end everywhere", Duration::from_secs(10), || on_a.status(&handle) == (false, false, 0, 0));
    assert_eq!(table.rows(), 0);

    // The dashboard's cluster panel, in a real browser. A worker that never asks for work
    // keeps the page's jobs queued on c, where the page looks for them.
    let mut idle = Conn::connect(c.addr).unwrap();
    idle.send(&gearbox_proto::Request::CanDo { function: "browser_probe".into() }).unwrap();
    idle.send(&gearbox_proto::Request::EchoReq { data: "ok".into() }).unwrap();
    assert!(matches!(idle.recv(Duration::from_secs(5)).unwrap(), Some(gearbox_proto::Response::EchoRes { .. })));
    common::check_dashboard_in_a_browser(&format!("http://{}/", c.http.unwrap()), &[("EXPECT_NODES", "3")]);
}

fn jobs_go_where_the_workers_are(base: &str) {
    let table = Table::new(base, "follow");
    let url = table.url(base);
    let (a, b, c) = (node(&url), node(&url), node(&url));
    let log: Arc<Mutex<Vec<Taken>>> = Arc::default();
    let a_worker = Worker::start_held("a", a.addr, "g", Duration::ZERO, log.clone(), false);
    let mut on_a = Conn::connect(a.addr).unwrap();
    for i in 0..3 {
        on_a.submit_background("g", &format!("g-{i}"), "x").unwrap();
    }
    wait_until("a's worker to take a job", Duration::from_secs(10), || !log.lock().unwrap().is_empty());
    // a's only worker for g goes: its jobs go back to the cluster, and b's worker runs them.
    drop(a_worker);
    let _b_worker = Worker::start("b", b.addr, "g", Duration::ZERO, log.clone());
    wait_until("b to run a's jobs", Duration::from_secs(10), || done_uniques(&log, &["b"]).len() == 3);

    // An epoch job sent to c (no worker) runs once, on b, when it is due.
    let epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64 + 2;
    let mut on_c = Conn::connect(c.addr).unwrap();
    on_c.send(&gearbox_proto::Request::SubmitJobEpoch {
        function: "g".into(),
        unique: "at".into(),
        epoch,
        data: "x".into(),
    })
    .unwrap();
    assert!(matches!(on_c.recv(Duration::from_secs(10)).unwrap(), Some(gearbox_proto::Response::JobCreated { .. })));
    wait_until("the epoch job to run", Duration::from_secs(10), || done_uniques(&log, &["b"]).contains("at"));
    let ran: Vec<Taken> = log.lock().unwrap().iter().filter(|t| t.unique == "at").cloned().collect();
    assert_eq!(ran.len(), 1, "{ran:?}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let ran_at = now - ran[0].at.elapsed().as_secs_f64();
    assert!(ran_at >= epoch as f64 - 0.01, "ran {:.2} s early", epoch as f64 - ran_at);
    wait_until("the table to empty", Duration::from_secs(10), || table.rows() == 0);

    // Cancelling from any node: a job no node owns yet is cancelled; one a node owns is
    // cancelled there, and the others say which node that is.
    let unowned = on_c.submit_background("nobody", "", "x").unwrap();
    let cancel = |n: &Server, handle: &str| {
        common::run_tool(env!("CARGO_BIN_EXE_gearbox"), &["admin", "-s", &n.addr.to_string(), "cancel", handle])
    };
    let out = cancel(&a, &unowned);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(Conn::connect(b.addr).unwrap().status(&unowned), (false, false, 0, 0));
    let held = Worker::start_held("b-held", b.addr, "h", Duration::ZERO, log.clone(), false);
    // Once b knows its worker, b owns what is submitted to it.
    wait_until("b to know its worker", Duration::from_secs(10), || {
        admin_lines(&b, "status").iter().any(|l| l.starts_with("h\t") && l.ends_with("\t1"))
    });
    let mut on_b = Conn::connect(b.addr).unwrap();
    on_b.submit_background("h", "first", "x").unwrap();
    let owned = on_b.submit_background("h", "second", "x").unwrap();
    wait_until("b's worker to hold the first", Duration::from_secs(10), || {
        log.lock().unwrap().iter().any(|t| t.unique == "first")
    });
    let out = cancel(&a, &owned);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("belongs to node"), "{out:?}");
    let out = cancel(&b, &owned);
    assert!(out.status.success(), "{out:?}");
    drop(held);
}

/// `gearbox import-gearmand --cluster` puts a gearmand queue into a running cluster's table,
/// for the node with workers to claim.
fn import_gearmand_into_a_running_cluster(base: &str) {
    let table = Table::new(base, "import");
    let url = table.url(base);
    let a = node(&url);
    let dir = temp_data_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("gearmand.sqlite");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let mut gearmand = common::ChildGuard(
        std::process::Command::new("gearmand")
            .args(["--listen", "127.0.0.1", "--port", &port, "--log-file", "none", "-q", "libsqlite3"])
            .arg(format!("--libsqlite3-db={}", db.display()))
            .arg(format!("--pid-file={}", dir.join("gearmand.pid").display()))
            .spawn()
            .expect("gearmand (Debian gearman-job-server) is installed"),
    );
    wait_until("gearmand to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_ok()
    });
    for i in 0..3 {
        let unique = format!("from-gearmand-{i}");
        let out =
            common::run_tool("gearman", &["-h", "127.0.0.1", "-p", &port, "-f", "migrated", "-u", &unique, "-b", "x"]);
        assert!(out.status.success(), "{out:?}");
    }
    gearmand.0.kill().unwrap();
    gearmand.0.wait().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(["import-gearmand", db.to_str().unwrap(), "--queue", &url, "--cluster"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported 3 jobs"), "{out:?}");
    let log: Arc<Mutex<Vec<Taken>>> = Arc::default();
    let _worker = Worker::start("a", a.addr, "migrated", Duration::ZERO, log.clone());
    wait_until("the imported jobs to run", Duration::from_secs(10), || done_uniques(&log, &["a"]).len() == 3);
    wait_until("the table to empty", Duration::from_secs(10), || table.rows() == 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

macro_rules! on_both_databases {
    ($($test:ident),* $(,)?) => {
        mod mysql {
            $(#[test] fn $test() { super::$test(super::MYSQL) })*
        }
        mod postgres {
            $(#[test] fn $test() { super::$test(super::POSTGRES) })*
        }
    };
}

on_both_databases!(
    killed_node_jobs_run_on_the_survivors,
    paused_node_is_fenced_and_rejoins,
    cut_off_node_stops_dispatching,
    database_gone_for_a_moment,
    one_job_server_seen_from_any_node,
    jobs_go_where_the_workers_are,
    import_gearmand_into_a_running_cluster,
);
