//! The HTTP side against the real binary: the JSON API, /metrics, the OpenAPI document, the
//! --http address rules, and the dashboard in a real headless Chromium (tests/browser).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::Command;

use common::{get_json, request, wait_for, ChildGuard, Server};
use serde_json::{json, Value};

fn post_json(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let (status, _, reply) = request(addr, "POST", path, Some(&body));
    (status, serde_json::from_str(&reply).unwrap_or_else(|_| panic!("{path}: not JSON: {reply}")))
}

fn function<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["functions"].as_array().unwrap().iter().find(|f| f["name"] == name).unwrap_or(&Value::Null)
}

fn worker(server: &Server, function: &str, command: &[&str]) -> ChildGuard {
    ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_gearbox"))
            .args(["work", "--server", &server.addr.to_string(), "-f", function, "--"])
            .args(command)
            .spawn()
            .unwrap(),
    )
}

#[test]
fn the_api_submits_lists_and_cancels_jobs() {
    let server = Server::start(&["--http", "127.0.0.1:0", "--job-log-bodies", "100"]);
    let http = server.http.unwrap();

    let (code, status) = get_json(http, "/api/status");
    assert_eq!(code, 200);
    assert_eq!(status["totals"]["submitted"], 0);
    assert_eq!(status["job_log"]["sink"], "embedded");

    // Background jobs by default, with priority and unique key.
    let (code, queued) = post_json(
        http,
        "/api/jobs",
        json!({"function": "resize", "payload": "a.png", "priority": "high", "unique": "a"}),
    );
    assert_eq!(code, 200, "{queued}");
    let handle = queued["handle"].as_str().unwrap().to_owned();
    let (_, again) = post_json(http, "/api/jobs", json!({"function": "resize", "payload": "a.png", "unique": "a"}));
    assert_eq!(again["handle"], handle.as_str(), "same unique key, same job");
    post_json(http, "/api/jobs", json!({"function": "resize", "payload": {"base64": "AAE="}, "priority": "low"}));
    let (_, status) = get_json(http, "/api/status");
    let resize = function(&status, "resize");
    assert_eq!((resize["queued"].as_u64(), resize["queued_high"].as_u64()), (Some(2), Some(1)));
    assert_eq!(status["totals"]["submitted"], 2);

    let (code, jobs) = get_json(http, "/api/functions/resize/jobs");
    assert_eq!(code, 200);
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!((jobs[0]["handle"].as_str(), jobs[0]["state"].as_str()), (Some(handle.as_str()), Some("queued")));
    assert_eq!(jobs[0]["unique"], "a");
    assert_eq!(get_json(http, "/api/functions/nothing/jobs").0, 404);

    let (code, job) = get_json(http, &format!("/api/jobs/{handle}"));
    assert_eq!(code, 200);
    assert_eq!((job["known"].as_bool(), job["running"].as_bool()), (Some(true), Some(false)));
    assert!(job["record"].is_null());

    // Cancel: the job leaves the queue and its cancellation is in the log.
    let (code, _, body) = request(http, "DELETE", &format!("/api/jobs/{handle}"), None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(request(http, "DELETE", &format!("/api/jobs/{handle}"), None).0, 404);
    wait_for("the cancelled record", || {
        let (_, job) = get_json(http, &format!("/api/jobs/{handle}"));
        job["record"]["status"] == "cancelled" && job["known"] == false
    });

    // Foreground: waits for the result.
    let _rev = worker(&server, "rev", &["rev"]);
    let (code, done) = post_json(
        http,
        "/api/jobs",
        json!({"function": "rev", "payload": "hello", "background": false, "wait_ms": 10000}),
    );
    assert_eq!(code, 200, "{done}");
    assert_eq!((done["status"].as_str(), done["result"].as_str()), (Some("complete"), Some("olleh")));
    let _fails = worker(&server, "fails", &["false"]);
    let (_, failed) = post_json(http, "/api/jobs", json!({"function": "fails", "background": false}));
    // `gearbox work` fails a job with an exception that says why.
    assert_eq!(failed["status"], "exception", "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("exited with"), "{failed}");
    let (code, late) = post_json(http, "/api/jobs", json!({"function": "nobody", "background": false, "wait_ms": 200}));
    assert_eq!(code, 504, "{late}");

    wait_for("the workers", || get_json(http, "/api/workers").1.as_array().unwrap().len() == 2);
    let (_, workers) = get_json(http, "/api/workers");
    assert!(workers.as_array().unwrap().iter().any(|w| w["functions"] == json!(["rev"])), "{workers}");

    wait_for("the log", || get_json(http, "/api/log?status=failed").1["records"].as_array().unwrap().len() == 2);
    let (_, log) = get_json(http, "/api/log?function=rev");
    assert_eq!(log["records"][0]["result"], "olleh");
    assert_eq!(get_json(http, "/api/log?status=bogus").0, 400);

    // Bad requests get a clear error.
    let (code, err) = post_json(http, "/api/jobs", json!({"function": "f", "priority": "urgent"}));
    assert_eq!(code, 400);
    assert!(err["error"].as_str().unwrap().contains("urgent"), "{err}");
    let (code, _, body) = request(http, "POST", "/api/jobs", None);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("error"), "{body}");
    assert_eq!(get_json(http, "/api/jobs/H:nowhere:1").0, 404);
}

#[test]
fn metrics_show_live_state_in_prometheus_format() {
    let server = Server::start(&["--http", "127.0.0.1:0"]);
    let http = server.http.unwrap();
    for _ in 0..3 {
        post_json(http, "/api/jobs", json!({"function": "mail", "payload": "x"}));
    }
    let _rev = worker(&server, "rev", &["rev"]);
    post_json(http, "/api/jobs", json!({"function": "rev", "payload": "ab", "background": false, "wait_ms": 10000}));
    let (code, content_type, text) = request(http, "GET", "/metrics", None);
    assert_eq!(code, 200);
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    for line in [
        "gearbox_queued_jobs{function=\"mail\"} 3",
        "gearbox_workers{function=\"rev\"} 1",
        "gearbox_running_jobs{function=\"mail\"} 0",
        "gearbox_jobs_submitted_total{function=\"mail\",priority=\"normal\"} 3",
        "gearbox_jobs_completed_total{function=\"rev\",priority=\"normal\"} 1",
        "gearbox_jobs_failed_total{function=\"rev\",priority=\"normal\"} 0",
        "gearbox_job_run_seconds_count{function=\"rev\"} 1",
        "gearbox_job_queue_wait_seconds_bucket{function=\"rev\",le=\"+Inf\"} 1",
        "gearbox_job_log_dropped_total{sink=\"embedded\"} 0",
        "# TYPE gearbox_store_commit_seconds histogram",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    // Every sample line is NAME{LABELS} VALUE with a number.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample {line:?}");
    }
    assert!(text.contains("gearbox_connections "), "{text}");

    // The dashboard's chart starts from the server's samples: one is taken at start.
    let (code, history) = get_json(http, "/api/throughput");
    assert_eq!(code, 200);
    assert!(!history["samples"].as_array().unwrap().is_empty(), "{history}");
    assert!(history["now_ms"].as_i64().unwrap() >= history["samples"][0]["at_ms"].as_i64().unwrap());

    let (code, doc) = get_json(http, "/api/openapi.json");
    assert_eq!(code, 200);
    assert_eq!(doc["openapi"], "3.0.3");
    for path in
        ["/api/status", "/api/workers", "/api/functions/{name}/jobs", "/api/log", "/api/jobs", "/api/jobs/{handle}"]
    {
        assert!(doc["paths"][path].is_object(), "{path} is not described");
    }
}

#[test]
fn an_explicit_busy_address_is_fatal_and_the_default_one_is_not() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(["server", "--listen", "127.0.0.1", "--port", "0", "--queue", "memory", "--http", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen for HTTP"), "{out:?}");

    // The default address (127.0.0.1:4731) busy: occupy it unless something already does; the
    // server must still start, without HTTP, and say so.
    let _default = TcpListener::bind("127.0.0.1:4731");
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_gearbox"))
            .args(["server", "--listen", "127.0.0.1", "--port", "0", "--queue", "memory", "--job-log", "none"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = std::io::BufReader::new(child.0.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in std::io::BufRead::lines(stderr).map_while(Result::ok) {
        let started = line.contains("listening on");
        seen.push(line);
        if started {
            break;
        }
    }
    assert!(seen.last().is_some_and(|l| l.contains("listening on")), "the server did not start: {seen:#?}");
    assert!(seen.iter().any(|l| l.contains("HTTP (dashboard, metrics, API) is off")), "{seen:#?}");
}

#[test]
fn the_dashboard_shows_queues_changing_in_a_real_browser() {
    let server = Server::start(&["--http", "127.0.0.1:0"]);
    let url = format!("http://{}/", server.http.unwrap());
    // A failed job with a long error, for the job-log view to show.
    let error = format!("resize: cannot open {}: no such file", "/srv/images/".repeat(40));
    let _w = worker(&server, "explode", &["sh", "-c", &format!("echo '{error}' >&2; exit 2")]);
    let failed = Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(["submit", "--server", &server.addr.to_string(), "-f", "explode", "x"])
        .output()
        .unwrap();
    assert!(!failed.status.success());
    wait_for("the failure in the job log", || {
        let (_, log) = get_json(server.http.unwrap(), "/api/log?function=explode");
        log.to_string().contains("no such file")
    });
    common::check_dashboard_in_a_browser(
        &url,
        &[("EXPECT_ERROR", &error), ("EXPECT_LOG_LIMIT", "1.0 GiB")], // the default --job-log-max-size
    );
    // What the page did reached the server.
    let (_, status) = get_json(server.http.unwrap(), "/api/status");
    assert_eq!(function(&status, "browser_probe")["queued"], 3, "{status}");
}

/// After a restart the per-function counters still add up: jobs loaded from the durable
/// queue are counted as restored.
#[test]
fn counters_add_up_after_a_restart() {
    let data_dir = common::temp_data_dir();
    let mut server = Server::start_in(data_dir.clone(), &["--http", "127.0.0.1:0"]);
    for i in 0..3 {
        let (code, _) =
            post_json(server.http.unwrap(), "/api/jobs", json!({"function": "later", "payload": i.to_string()}));
        assert_eq!(code, 200);
    }
    server.terminate();
    server.data_dir = common::temp_data_dir(); // the restart keeps the data

    let server = Server::start_in(data_dir, &["--http", "127.0.0.1:0"]);
    let _w = worker(&server, "later", &["cat"]);
    let http = server.http.unwrap();
    wait_for("the restored jobs to run", || function(&get_json(http, "/api/status").1, "later")["completed"] == 3);
    let (_, status) = get_json(http, "/api/status");
    let f = function(&status, "later");
    assert_eq!(
        (&f["submitted"], &f["restored"], &f["queued"], &f["failed"], &f["cancelled"]),
        (&json!(0), &json!(3), &json!(0), &json!(0), &json!(0)),
        "{f}"
    );
    assert_eq!(status["totals"]["restored"], 3, "{status}");
    let (_, _, metrics) = request(http, "GET", "/metrics", None);
    assert!(metrics.contains("gearbox_jobs_restored_total{function=\"later\",priority=\"normal\"} 3"), "{metrics}");
}
