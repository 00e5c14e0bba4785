//! Connections beyond the default open-files limit. The server starts as systemd starts it, with
//! a soft limit of 1,024 and a higher hard limit: it raises the soft limit and serves thousands
//! of connections, at a few KB each; told to keep 1,024 (`-f`), it says once that the limit
//! caps connections and serves the connections that waited as others close.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::{echo, temp_data_dir, wait_for, Server, Starting};

const SYSTEMD_SOFT_LIMIT: u64 = 1024;

/// Raises this process's soft open-files limit to its hard limit (the test holds thousands of
/// sockets too) and returns the hard limit.
fn raise_own_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid rlimit pointer.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(limit.rlim_max >= 4096, "the test needs a hard open-files limit of 4,096 or more, not {}", limit.rlim_max);
    limit.rlim_max
}

/// Starts the server with a soft open-files limit of 1,024 and the hard limit `hard`.
fn start(extra: &[&str], hard: u64) -> Starting {
    Server::spawn(temp_data_dir(), extra, move |command| {
        let limit = libc::rlimit { rlim_cur: SYSTEMD_SOFT_LIMIT, rlim_max: hard };
        // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    })
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
}

#[test]
fn thousands_of_connections_under_a_soft_limit_of_1024() {
    const CONNECTIONS: usize = 3_000;
    let hard = raise_own_limit();
    let server = start(&[], hard).ready();
    let raised = server.logged(&format!("open files limit: {hard} (raised from {SYSTEMD_SOFT_LIMIT})"));
    assert_eq!(raised.len(), 1, "{:?}", server.log.lock().unwrap());

    // One at a time, each answered before the next: the listen backlog (1,024) is not what
    // this test is about.
    let rss_before = rss_kib(&server);
    let started = Instant::now();
    let mut conns = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let mut conn = connect(server.addr);
        echo(&mut conn, format!("connection {i}").as_bytes());
        conns.push(conn);
    }
    // All of them at once, still open and served.
    for (i, conn) in conns.iter_mut().enumerate() {
        echo(conn, format!("again {i}").as_bytes());
    }
    let per_connection = (rss_kib(&server) - rss_before) * 1024 / CONNECTIONS as u64;
    eprintln!(
        "{CONNECTIONS} connections opened and answered in {:.1?}, {per_connection} bytes each",
        started.elapsed()
    );
    assert!(server.logged("accept failed").is_empty(), "{:?}", server.logged("accept failed"));
    // About 2.2 KB each (a small read buffer until a peer sends more); 5.7 KB with the 4 KiB
    // buffer every connection had before.
    assert!(per_connection < 4096, "{per_connection} bytes per idle connection");
}

/// The server's resident memory, in KiB.
fn rss_kib(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_limit_that_caps_connections_is_said_once() {
    const SERVED: usize = 900;
    const CONNECTIONS: usize = 1_100;
    let hard = raise_own_limit();
    let server = start(&["-f", "1024", "--verbose", "DEBUG"], hard).ready();
    assert_eq!(server.logged(&format!("open files limit: {SYSTEMD_SOFT_LIMIT}")).len(), 1);

    // Well under the limit, one at a time (see above); then a burst of connections the server
    // cannot all accept: the kernel completes them and they wait in the backlog.
    let mut conns: Vec<TcpStream> = (0..SERVED)
        .map(|i| {
            let mut conn = connect(server.addr);
            echo(&mut conn, format!("connection {i}").as_bytes());
            conn
        })
        .collect();
    conns.extend((SERVED..CONNECTIONS).map(|_| connect(server.addr)));
    // Every failed accept after the first goes to DEBUG: wait for a few of them.
    wait_for("several failed accepts", || server.logged("accept failed").len() >= 4);
    let warnings: Vec<String> = server.logged("accept failed").into_iter().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("open-files limit (1024) caps connections") && warnings[0].contains("--file-descriptors"),
        "{}",
        warnings[0]
    );

    // As connections close, the waiting ones are accepted and served.
    conns.drain(..200);
    for (i, conn) in conns.iter_mut().rev().take(100).enumerate() {
        echo(conn, format!("waited {i}").as_bytes());
    }
    assert_eq!(server.logged("accept failed").iter().filter(|l| l.contains("WARN")).count(), 1);
}
