//! The everyday commands against a running server: `gearbox submit`, `gearbox work`,
//! `gearbox admin`.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{wait_for, ChildGuard, Server};

fn gearbox(server: &Server, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(args)
        .env("GEARBOX_SERVERS", server.addr.to_string())
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn worker(server: &Server, args: &[&str]) -> ChildGuard {
    ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_gearbox"))
            .arg("work")
            .args(["--server", &server.addr.to_string()])
            .args(args)
            .spawn()
            .unwrap(),
    )
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn submit_and_work_round_trip() {
    let server = Server::start(&[]);
    let _rev = worker(&server, &["-f", "rev", "--", "rev"]);
    let _fail = worker(&server, &["-f", "fails", "--", "false"]);
    assert_eq!(stdout(&gearbox(&server, &["submit", "-f", "rev", "hello"], None)).trim(), "olleh");
    assert_eq!(stdout(&gearbox(&server, &["submit", "-f", "rev"], Some(b"from stdin"))).trim(), "nidts morf");
    let failed = gearbox(&server, &["submit", "-f", "fails", "x"], None);
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("the job failed"), "{failed:?}");

    let lines: String = (0..200).map(|i| format!("line{i}\n")).collect();
    let bulk = gearbox(&server, &["submit", "-f", "rev", "--bulk"], Some(lines.as_bytes()));
    assert!(bulk.status.success(), "{bulk:?}");
    assert!(String::from_utf8_lossy(&bulk.stderr).contains("200 jobs: 200 ok, 0 failed"), "{bulk:?}");
}

#[test]
fn background_jobs_and_admin_views() {
    let server = Server::start(&[]);
    let handle = stdout(&gearbox(&server, &["submit", "-f", "later", "--background", "--unique", "u1", "x"], None));
    assert!(handle.starts_with("H:"), "{handle}");
    let status = stdout(&gearbox(&server, &["admin", "status"], None));
    assert!(status.lines().next().unwrap().starts_with("FUNCTION"), "{status}");
    assert!(status.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["later", "1", "0", "0"]), "{status}");
    let json = stdout(&gearbox(&server, &["admin", "--json", "jobs"], None));
    assert!(json.contains(&format!("\"handle\":\"{}\"", handle.trim())) && json.contains("\"background\":1"), "{json}");
    assert!(stdout(&gearbox(&server, &["admin", "version"], None)).contains("gearbox"));
    stdout(&gearbox(&server, &["admin", "cancel", handle.trim()], None));
    let after = stdout(&gearbox(&server, &["admin", "status"], None));
    assert!(after.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["later", "0", "0", "0"]), "{after}");
    let unknown = gearbox(&server, &["admin", "cancel", "H:nope:1"], None);
    assert!(!unknown.status.success() && String::from_utf8_lossy(&unknown.stderr).contains("UNKNOWN_JOB"));
}

#[test]
fn work_stops_after_count_and_on_sigterm() {
    let server = Server::start(&[]);
    let mut counted = worker(&server, &["-f", "once", "-c", "1", "--", "cat"]);
    assert_eq!(stdout(&gearbox(&server, &["submit", "-f", "once", "payload"], None)), "payload");
    wait_for("the worker to exit after one job", || counted.0.try_wait().unwrap().is_some());
    let mut serving = worker(&server, &["-f", "idle", "--", "cat"]);
    wait_for("the worker to register", || stdout(&gearbox(&server, &["admin", "workers"], None)).contains("idle"));
    Command::new("kill").args(["-TERM", &serving.0.id().to_string()]).status().unwrap();
    wait_for("the worker to exit on SIGTERM", || serving.0.try_wait().unwrap().is_some());
}
