//! Crash tests, one per durable store: five cycles of background submissions at about
//! 5,000 jobs/s from 4 connections, each ended by SIGKILL at a random moment; after the last
//! restart every acknowledged job must run. Then, per store, a background request coalesced
//! onto a foreground job, killed right after its acknowledgement. The SQL stores use the
//! shared MariaDB and PostgreSQL of the test machine (the README's test command starts them).

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{temp_data_dir, Server};
use gearbox_proto::{Decoder, GrabKind, Message, Priority, Request, Response};

const CYCLES: usize = 5;
const JOBS_PER_CYCLE: usize = 20_000;
const CONNECTIONS: usize = 4;
const RATE_PER_SECOND: usize = 5_000;

/// A few random bits without a dependency: the clock's nanoseconds, mixed.
fn random_below(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    nanos.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) % n
}

fn encode(req: &Request) -> BytesMut {
    let mut b = BytesMut::new();
    req.encode(&mut b);
    b
}

/// Reads responses until `stop` says so or the connection ends.
fn read_responses(mut stream: TcpStream, mut each: impl FnMut(Response) -> bool) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut chunk = [0u8; 64 * 1024];
    loop {
        while let Ok(Some(Message::Packet(f))) = Decoder::default().decode(&mut buf) {
            if !each(Response::parse(&f).unwrap()) {
                return;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Submits this cycle's jobs at the target rate until the server dies; returns the unique
/// keys the server acknowledged with JOB_CREATED.
fn submit_until_killed(addr: SocketAddr, cycle: usize, conn: usize, acked: Arc<Mutex<Vec<String>>>) {
    let Ok(stream) = TcpStream::connect(addr) else { return };
    let reader = stream.try_clone().unwrap();
    let sent: Arc<Mutex<Vec<String>>> = Arc::default();
    let sent_for_reader = sent.clone();
    let reading = std::thread::spawn(move || {
        let mut next = 0;
        read_responses(reader, |r| {
            assert!(matches!(r, Response::JobCreated { .. }), "unexpected {r:?}");
            // Replies come in submission order.
            let unique = sent_for_reader.lock().unwrap()[next].clone();
            acked.lock().unwrap().push(unique);
            next += 1;
            true
        })
    });
    let mut stream = stream;
    let per_conn = JOBS_PER_CYCLE / CONNECTIONS;
    let per_tick = RATE_PER_SECOND / CONNECTIONS / 100; // a burst every 10 ms
    let started = Instant::now();
    let mut n = 0;
    while n < per_conn {
        let mut out = BytesMut::new();
        for _ in 0..per_tick.min(per_conn - n) {
            let unique = format!("crash-{cycle}-{conn}-{n}");
            let req = Request::SubmitJob {
                function: "crash".into(),
                unique: unique.clone().into(),
                data: vec![b'x'; 100].into(),
                priority: Priority::Normal,
                background: true,
            };
            out.extend_from_slice(&encode(&req));
            sent.lock().unwrap().push(unique);
            n += 1;
        }
        if stream.write_all(&out).is_err() {
            break;
        }
        let due = started + Duration::from_millis(10 * (n / per_tick) as u64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    let _ = reading.join();
}

/// Runs every job queued for "crash" and returns the unique keys run.
fn drain(addr: SocketAddr) -> HashSet<String> {
    let ran: Arc<Mutex<HashSet<String>>> = Arc::default();
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let ran = ran.clone();
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut out = encode(&Request::CanDo { function: "crash".into() });
                out.extend_from_slice(&encode(&Request::GrabJob(GrabKind::Uniq)));
                stream.write_all(&out).unwrap();
                let mut writer = stream.try_clone().unwrap();
                read_responses(stream, |r| match r {
                    Response::JobAssignUniq { handle, unique, .. } => {
                        ran.lock().unwrap().insert(String::from_utf8(unique.to_vec()).unwrap());
                        let mut out = encode(&Request::WorkComplete { handle, data: "".into() });
                        out.extend_from_slice(&encode(&Request::GrabJob(GrabKind::Uniq)));
                        writer.write_all(&out).is_ok()
                    }
                    Response::NoJob => false,
                    other => panic!("unexpected {other:?}"),
                });
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    Arc::try_unwrap(ran).unwrap().into_inner().unwrap()
}

fn crash_cycles(queue: Option<&str>) {
    let started = Instant::now();
    let data_dir = temp_data_dir();
    let extra: Vec<&str> = queue.map(|q| vec!["--queue", q]).unwrap_or_default();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    for cycle in 0..CYCLES {
        let boot = Instant::now();
        let mut server = Server::start_in(data_dir.clone(), &extra);
        assert!(boot.elapsed() < Duration::from_secs(30), "restart took {:?}", boot.elapsed());
        let addr = server.addr;
        let submitters: Vec<_> = (0..CONNECTIONS)
            .map(|conn| {
                let acked = acked.clone();
                std::thread::spawn(move || submit_until_killed(addr, cycle, conn, acked))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200 + random_below(3800)));
        server.child.kill().unwrap(); // SIGKILL
        server.child.wait().unwrap();
        for s in submitters {
            s.join().unwrap();
        }
        // Keep the data directory for the next cycle.
        server.data_dir = temp_data_dir();
    }
    let server = Server::start_in(data_dir, &extra);
    let ran = drain(server.addr);
    let acked = acked.lock().unwrap();
    let lost: Vec<&String> = acked.iter().filter(|u| !ran.contains(*u)).collect();
    assert!(acked.len() > 1000, "only {} jobs acknowledged", acked.len());
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged jobs lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    let took = started.elapsed();
    eprintln!(
        "{}: {} acknowledged jobs all ran after {CYCLES} SIGKILLs, in {took:.1?}",
        queue.unwrap_or("embedded"),
        acked.len()
    );
    assert!(took < Duration::from_secs(180), "took {took:?}");
}

#[test]
fn embedded_store_loses_no_acknowledged_job() {
    crash_cycles(None);
}

/// A fresh table per run; the server creates it, the test drops it.
fn sql_table(kind: &str) -> String {
    format!("crash_{kind}_{}_{}", std::process::id(), random_below(1_000_000))
}

#[test]
fn mariadb_store_loses_no_acknowledged_job() {
    let table = sql_table("mysql");
    crash_cycles(Some(&format!("mysql://root@127.0.0.1:3306/test?table={table}")));
    drop_table("mariadb", &["-h", "127.0.0.1", "-u", "root", "test", "-e"], &table);
}

#[test]
fn postgres_store_loses_no_acknowledged_job() {
    let table = sql_table("pg");
    crash_cycles(Some(&format!("postgres://postgres@127.0.0.1:5432/test?table={table}")));
    drop_table("psql", &["-q", "-h", "127.0.0.1", "-U", "postgres", "test", "-c"], &table);
}

/// Sends one request and reads one response.
fn call(stream: &mut TcpStream, req: &Request) -> Response {
    stream.write_all(&encode(req)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = None;
    read_responses(stream.try_clone().unwrap(), |r| {
        got = Some(r);
        false
    });
    got.expect("a response")
}

fn submit(stream: &mut TcpStream, unique: &str, background: bool) -> bytes::Bytes {
    let req = Request::SubmitJob {
        function: "coalesce".into(),
        unique: unique.to_string().into(),
        data: format!("payload of {unique}").into(),
        priority: Priority::Normal,
        background,
    };
    match call(stream, &req) {
        Response::JobCreated { handle } => handle,
        other => panic!("expected JOB_CREATED, got {other:?}"),
    }
}

/// A background request coalesced onto a waiting foreground job is acknowledged only once
/// stored: a SIGKILL right after its JOB_CREATED loses it no more than a plain one.
fn coalesced_background_request_survives_sigkill(queue: Option<&str>) {
    let data_dir = temp_data_dir();
    let extra: Vec<&str> = queue.map(|q| vec!["--queue", q]).unwrap_or_default();
    let mut server = Server::start_in(data_dir.clone(), &extra);
    let mut foreground = TcpStream::connect(server.addr).unwrap();
    let handle = submit(&mut foreground, "U", false);
    let mut background = TcpStream::connect(server.addr).unwrap();
    assert_eq!(submit(&mut background, "U", true), handle);
    let plain = submit(&mut background, "plain", true);
    server.child.kill().unwrap(); // SIGKILL, the foreground client still connected
    server.child.wait().unwrap();
    server.data_dir = temp_data_dir(); // keep the data for the restart

    let server = Server::start_in(data_dir, &extra);
    let mut worker = TcpStream::connect(server.addr).unwrap();
    worker.write_all(&encode(&Request::CanDo { function: "coalesce".into() })).unwrap();
    let mut ran = Vec::new();
    loop {
        match call(&mut worker, &Request::GrabJob(GrabKind::Uniq)) {
            Response::JobAssignUniq { handle, unique, data, .. } => {
                ran.push((handle.clone(), String::from_utf8(unique.to_vec()).unwrap(), data));
                worker.write_all(&encode(&Request::WorkComplete { handle, data: "".into() })).unwrap();
            }
            Response::NoJob => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let expected = vec![
        (handle, "U".to_string(), bytes::Bytes::from("payload of U")),
        (plain, "plain".to_string(), bytes::Bytes::from("payload of plain")),
    ];
    assert_eq!(ran, expected, "both acknowledged requests, with their handles and first payload");
}

#[test]
fn embedded_store_keeps_a_coalesced_background_request() {
    coalesced_background_request_survives_sigkill(None);
}

#[test]
fn mariadb_store_keeps_a_coalesced_background_request() {
    let table = sql_table("mysql");
    coalesced_background_request_survives_sigkill(Some(&format!("mysql://root@127.0.0.1:3306/test?table={table}")));
    drop_table("mariadb", &["-h", "127.0.0.1", "-u", "root", "test", "-e"], &table);
}

#[test]
fn postgres_store_keeps_a_coalesced_background_request() {
    let table = sql_table("pg");
    coalesced_background_request_survives_sigkill(Some(&format!(
        "postgres://postgres@127.0.0.1:5432/test?table={table}"
    )));
    drop_table("psql", &["-q", "-h", "127.0.0.1", "-U", "postgres", "test", "-c"], &table);
}

fn drop_table(tool: &str, args: &[&str], table: &str) {
    // The lifecycle's tables (dead set, paused functions) sit beside the queue's.
    let sql = format!("DROP TABLE {table}; DROP TABLE IF EXISTS {table}_dead, {table}_state");
    let status = std::process::Command::new(tool).args(args).arg(sql).status().unwrap();
    assert!(status.success());
}
