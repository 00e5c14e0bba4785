//! `gearbox bench` end to end: a depth run fills a server's queue in steps, the server
//! restarts on the same embedded store, and a drain run finds every job exactly once; and a
//! cluster of three nodes on the test machine's PostgreSQL, loaded over all three and then
//! made to take over a node the bench kills.

mod common;

use std::process::{Command, Output};

use common::{temp_data_dir, Server};

const POSTGRES: &str = "postgres://root@127.0.0.1:5432/test";

fn bench(server: &Server, args: &[&str]) -> Output {
    bench_on(&server.addr.to_string(), args)
}

/// Runs the bench against `servers` (comma-separated).
fn bench_on(servers: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(["bench", "--server", servers, "--json", "--timeout", "60"])
        .args(args)
        .output()
        .expect("run gearbox bench")
}

/// A PostgreSQL queue table of this test's own, dropped with its nodes table at the end.
struct PgTable(String);

impl PgTable {
    fn new(test: &str) -> PgTable {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        PgTable(format!("b_{test}_{}_{nanos:x}", std::process::id()))
    }
}

impl Drop for PgTable {
    fn drop(&mut self) {
        use sqlx::Connection;
        let drop = format!("DROP TABLE IF EXISTS {0}_nodes, {0}_leases, {0}_dead, {0}_state, {0}", self.0);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            if let Ok(mut c) = sqlx::PgConnection::connect(POSTGRES).await {
                let _ = sqlx::raw_sql(&drop).execute(&mut c).await;
            }
        });
    }
}

/// A number field of a JSON line.
fn number(json: &str, key: &str) -> f64 {
    let rest = json.split(&format!("\"{key}\":")).nth(1).unwrap_or_else(|| panic!("no {key} in {json}"));
    rest.split([',', '}']).next().unwrap().parse().unwrap_or_else(|_| panic!("{key} is not a number in {json}"))
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

#[test]
fn several_cluster_nodes_share_the_load_and_take_over_a_killed_one() {
    let table = PgTable::new("cluster");
    let queue = format!("{POSTGRES}?table={}", table.0);
    let node = || {
        let flags = ["--cluster", "--queue", &queue, "--node-lease", "2s", "--job-log", "none"];
        Server::spawn(temp_data_dir(), &flags, |_| {}).ready()
    };
    let nodes = [node(), node(), node()];
    let servers = nodes.iter().map(|n| n.addr.to_string()).collect::<Vec<_>>().join(",");

    let bg = json(&bench_on(&servers, &["--mode", "bg", "--jobs", "3000", "--clients", "3", "--workers", "2"]));
    for key in [&format!("\"server\":\"{servers}\""), "\"completed\":3000,", "\"duplicated\":0,", "\"ok\":true"] {
        assert!(bg.contains(key), "{key} missing from {bg}");
    }
    assert!(number(&bg, "server_cpu_us_per_job") >= 0.0, "{bg}");

    let refused = bench_on(&servers, &["--mode", "mem"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("reads one server's RSS"), "{refused:?}");

    let args = ["--mode", "takeover", "--jobs", "500", "--clients", "2", "--workers", "2"];
    let takeover = json(&bench_on(&servers, &args));
    for key in ["\"completed\":500,", "\"lost\":0,", "\"duplicated\":0,", "\"ok\":true"] {
        assert!(takeover.contains(key), "{key} missing from {takeover}");
    }
    // The victim renews every 2/3 s: its lease ends at least 4/3 s after the kill.
    let (first, last) = (number(&takeover, "takeover_first_ms"), number(&takeover, "takeover_last_ms"));
    assert!(first > 1000.0 && last >= first, "{takeover}");
}
