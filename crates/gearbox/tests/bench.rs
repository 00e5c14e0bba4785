//! `gearbox bench` end to end: a depth run fills a server's queue in steps, the server
//! restarts on the same embedded store, and a drain run finds every job exactly once.

mod common;

use std::process::{Command, Output};

use common::{temp_data_dir, Server};

fn bench(server: &Server, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(["bench", "--server", &server.addr.to_string(), "--json", "--timeout", "60"])
        .args(args)
        .output()
        .expect("run gearbox bench")
}

/// The bench's JSON line, after checking that it succeeded.
fn json(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout.lines().last().unwrap_or_default().to_owned()
}

#[test]
fn a_depth_fill_survives_a_restart_and_drains_exactly_once() {
    let data_dir = temp_data_dir();
    let mut server = Server::start_in(data_dir.clone(), &[]);
    let fill = json(&bench(&server, &["--mode", "depth", "--jobs", "3000", "--step", "1000"]));
    for key in ["\"depth\":1000,", "\"depth\":2000,", "\"depth\":3000,", "\"ok\":true"] {
        assert!(fill.contains(key), "{key} missing from {fill}");
    }
    assert_eq!(fill.matches("\"ack_per_sec\"").count(), 3, "{fill}");

    server.terminate();
    server.data_dir = temp_data_dir(); // keep the data for the restart
    let server = Server::start_in(data_dir, &[]);
    let refused = bench(&server, &["--mode", "depth", "--jobs", "10"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("3000 bench jobs are queued already"), "{refused:?}");

    let drain = json(&bench(&server, &["--mode", "drain", "--jobs", "3000", "--rss-after", "0"]));
    for key in ["\"queued_at_start\":3000,", "\"completed\":3000,", "\"duplicated\":0,", "\"ok\":true"] {
        assert!(drain.contains(key), "{key} missing from {drain}");
    }
}
