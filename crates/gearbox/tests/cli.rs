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
    // --json goes before or after the subcommand.
    for args in [["admin", "--json", "jobs"], ["admin", "jobs", "--json"]] {
        let json = stdout(&gearbox(&server, &args, None));
        assert!(
            json.contains(&format!("\"handle\":\"{}\"", handle.trim())) && json.contains("\"background\":1"),
            "{json}"
        );
    }
    assert!(stdout(&gearbox(&server, &["admin", "version"], None)).contains("gearbox"));
    let cancelled = stdout(&gearbox(&server, &["admin", "cancel", handle.trim()], None));
    assert_eq!(cancelled.trim(), format!("cancelled {} on {}", handle.trim(), server.addr));
    let after = stdout(&gearbox(&server, &["admin", "status"], None));
    assert!(after.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["later", "0", "0", "0"]), "{after}");
    let unknown = gearbox(&server, &["admin", "cancel", "H:nope:1"], None);
    let why = String::from_utf8_lossy(&unknown.stderr);
    assert!(!unknown.status.success() && why.contains("no queued job H:nope:1"), "{why}");

    let limits = stdout(&gearbox(&server, &["admin", "maxqueue", "later", "5"], None));
    assert!(limits.lines().any(|l| l.split_whitespace().eq(["later", "5", "5", "5"])), "{limits}");
    let limits = stdout(&gearbox(&server, &["admin", "maxqueue", "later", "1", "-1", "3", "--json"], None));
    assert!(limits.contains(r#"{"function":"later","high":1,"normal":0,"low":3}"#), "{limits}");
    let two = gearbox(&server, &["admin", "maxqueue", "later", "1", "2"], None);
    assert!(!two.status.success() && String::from_utf8_lossy(&two.stderr).contains("or three: HIGH NORMAL LOW"));
    let stats = stdout(&gearbox(&server, &["admin", "stats"], None));
    for counter in [["jobs_submitted", "1"], ["jobs_restored", "0"], ["jobs_cancelled", "1"]] {
        assert!(stats.lines().any(|l| l.split_whitespace().eq(counter)), "{counter:?} in {stats}");
    }

    // A bulk submission says why jobs failed.
    stdout(&gearbox(&server, &["admin", "maxqueue", "capped", "2"], None));
    let bulk = gearbox(&server, &["submit", "-f", "capped", "--background", "--bulk"], Some(b"1\n2\n3\n4\n5\n"));
    let why = String::from_utf8_lossy(&bulk.stderr);
    assert!(!bulk.status.success(), "{why}");
    assert!(
        why.contains("5 jobs: 2 ok, 3 failed") && why.contains("3 failed: server error QUEUE_ERROR: Job queue is full"),
        "{why}"
    );
}

/// A failing command's standard error becomes the job's exception text: the client that
/// asked for it and the job log see why.
#[test]
fn a_failing_commands_stderr_is_the_exception_text() {
    let server = Server::start(&[]);
    let script = "echo progress output; echo 'resize: no such image' >&2; exit 3";
    let _w = worker(&server, &["-f", "resize", "--", "sh", "-c", script]);
    let failed = gearbox(&server, &["submit", "-f", "resize", "x.png"], None);
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("resize: no such image"), "{failed:?}");
    let log = || stdout(&gearbox(&server, &["log", "-f", "resize", "--json"], None));
    wait_for("the failure in the job log", || log().contains("exception"));
    let record: serde_json::Value = serde_json::from_str(log().lines().next().unwrap()).unwrap();
    assert_eq!(record["error"], "resize: no such image\n(sh exited with exit status: 3)", "{record}");
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
