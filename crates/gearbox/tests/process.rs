//! The `gearbox` binary as users run it: real third-party Gearman clients (the `gearman` and
//! `gearadmin` tools, Perl's Gearman::Client, PHP's gearman extension), signals, pid file.
//! The README's test command installs gearman-tools and libgearman-client-perl.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{run_tool, wait_for, Server};

#[test]
fn gearman_cli_worker_and_client() {
    let server = Server::start(&[]);
    let _worker = server.spawn_gearman(&["-w", "-f", "rev", "--", "rev"]);
    let out = server.gearman(&["-f", "rev", "hello"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "olleh");
}

/// Log lines to a pipe (journald, a file, this test) carry no terminal colour codes.
#[test]
fn logs_to_a_pipe_have_no_colours() {
    let server = Server::start(&[]);
    let log = server.log.lock().unwrap().clone();
    assert!(log.iter().any(|l| l.contains("INFO") && l.contains("listening on")), "{log:?}");
    assert!(log.iter().all(|l| !l.contains('\x1b')), "{log:?}");
}

#[test]
fn gearadmin_reads_status_workers_and_jobs() {
    let server = Server::start(&[]);
    // Two background jobs for a function with no worker yet.
    for data in ["one", "two"] {
        let out = server.gearman(&["-b", "-f", "later", data]);
        assert!(out.status.success(), "{out:?}");
    }
    let _worker = server.spawn_gearman(&["-w", "-f", "rev", "--", "rev"]);
    wait_for("the worker to register", || server.gearadmin(&["--status"]).contains("rev\t0\t0\t1\n"));
    let status = server.gearadmin(&["--status"]);
    assert!(status.contains("later\t2\t0\t0\n"), "{status:?}");
    assert!(status.ends_with(".\n"), "{status:?}");

    let workers = server.gearadmin(&["--workers"]);
    assert!(workers.lines().any(|l| l.ends_with(" : rev")), "{workers:?}");

    let jobs = server.gearadmin(&["--show-jobs"]);
    let handles: Vec<&str> = jobs.lines().filter(|l| *l != ".").map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(handles.len(), 2, "{jobs:?}");
    assert!(handles.iter().all(|h| h.starts_with("H:")), "{jobs:?}");

    assert!(server.gearadmin(&["--priority-status"]).contains("later\t0\t2\t0\t0\n"));
    assert_eq!(server.gearadmin(&["--getpid"]).trim(), server.child.id().to_string());
    assert!(server.gearadmin(&["--server-version"]).contains("gearbox"));

    let cancelled = server.gearadmin(&["--cancel-job", handles[0]]);
    assert!(!cancelled.contains("ERR"), "{cancelled:?}");
    assert!(server.gearadmin(&["--status"]).contains("later\t1\t0\t0\n"));

    assert!(!server.gearadmin(&["--create-function", "fresh"]).contains("ERR"));
    assert!(server.gearadmin(&["--status"]).contains("fresh\t0\t0\t0\n"));
    assert!(!server.gearadmin(&["--drop-function", "fresh"]).contains("ERR"));
    assert!(!server.gearadmin(&["--status"]).contains("fresh"));
}

#[test]
fn perl_gearman_client_and_worker() {
    let server = Server::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/perl_client_worker.pl");
    let out = run_tool("perl", &[script, &server.addr.to_string()]);
    let tap = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "Perl interop failed:\n{tap}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(tap.contains("1..9") && !tap.contains("not ok"), "{tap}");
    // Gearman::Worker freezes a `die` message with Storable: the job log shows its text.
    let args = ["log", "-s", &server.addr.to_string(), "-f", "explode", "--json"];
    let log = || String::from_utf8_lossy(&run_tool(env!("CARGO_BIN_EXE_gearbox"), &args).stdout).into_owned();
    wait_for("the Perl worker's exception in the job log", || log().contains("exception"));
    let record: serde_json::Value = serde_json::from_str(log().lines().next().unwrap()).unwrap();
    assert_eq!(record["error"], "kaboom\n", "{record}");
}

#[test]
fn sigterm_exits_promptly_with_idle_and_stalled_connections() {
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("gearbox-proc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("gearbox.pid");
    let mut server = Server::start(&["-P", pid_file.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap().trim(), server.child.id().to_string());

    let _idle = std::net::TcpStream::connect(server.addr).unwrap();
    let mut stalled = std::net::TcpStream::connect(server.addr).unwrap();
    stalled.write_all(b"\0REQ\0\0\0\x07\0\0\0\x40half").unwrap();
    // A client that never reads while replies pile up.
    let mut flooder = std::net::TcpStream::connect(server.addr).unwrap();
    let echo = [&b"\0REQ\0\0\0\x10\0\0\x10\0"[..], &[b'x'; 4096]].concat();
    flooder.set_nonblocking(true).unwrap();
    for _ in 0..2000 {
        if flooder.write_all(&echo).is_err() {
            break;
        }
    }
    let (status, took) = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(!pid_file.exists(), "pid file removed on exit");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_config_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(["server", "--verbose", "LOUD", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown log level"), "{out:?}");
}

#[test]
fn import_gearmand_sqlite_queue() {
    let dir = common::temp_data_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("gearmand.sqlite");
    // A real gearmand with its libsqlite3 queue, on a port of its own.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let mut gearmand = common::ChildGuard(
        Command::new("gearmand")
            .args(["--listen", "127.0.0.1", "--port", &port, "--log-file", "none", "-q", "libsqlite3"])
            .arg(format!("--libsqlite3-db={}", db.display()))
            .arg(format!("--pid-file={}", dir.join("gearmand.pid").display()))
            .spawn()
            .expect("gearmand (Debian gearman-job-server) is installed"),
    );
    wait_for("gearmand to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_ok()
    });
    for (flag, unique, data) in [("-L", "u-low", "low"), ("-b", "u-normal", "normal"), ("-I", "u-high", "high")] {
        let mut args = vec!["-h", "127.0.0.1", "-p", &port, "-f", "migrated", "-u", unique];
        if flag != "-b" {
            args.push(flag);
        }
        args.extend(["-b", data]);
        let out = run_tool("gearman", &args);
        assert!(out.status.success(), "{out:?}");
    }
    gearmand.0.kill().unwrap();
    gearmand.0.wait().unwrap();

    let data_dir = dir.join("gearbox");
    let out = Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(["import-gearmand", db.to_str().unwrap(), "--data-dir", data_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported 3 jobs"), "{out:?}");

    let server = Server::start_in(data_dir, &[]);
    assert!(server.gearadmin(&["--status"]).contains("migrated\t3\t0\t0\n"));
    let out = server.gearman(&["-w", "-f", "migrated", "-c", "3", "--", "cat"]);
    assert!(out.status.success(), "{out:?}");
    assert!(server.gearadmin(&["--status"]).contains("migrated\t0\t0\t0\n"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn php_gearman_client_and_worker() {
    let server = Server::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/php_client_worker.php");
    let out = run_tool("php", &[script, &server.port()]);
    let tap = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "PHP interop failed:\n{tap}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(tap.contains("1..8") && !tap.contains("not ok"), "{tap}");
}
