//! The job lifecycle's HTTP side against the real binary: the dead set, pausing, limits, retry
//! policies and schedules through the JSON API, and the dashboard's Dead jobs page, Pause
//! buttons and Schedules panel in a real headless Chromium (tests/browser).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::gear::Conn;
use common::{admin, get_json, request, request_with, wait_for, Server};
use gearbox_proto::{GrabKind, Request, Response};
use serde_json::{json, Value};

/// A request with a JSON body (or none, still saying `Content-Type: application/json`); the
/// status and the reply as JSON (`null` if empty).
fn call(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (status, _, reply) = request(addr, method, path, body.as_ref());
    let value = if reply.is_empty() { Value::Null } else { serde_json::from_str(&reply).unwrap() };
    (status, value)
}

fn function<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["functions"].as_array().unwrap().iter().find(|f| f["name"] == name).unwrap_or(&Value::Null)
}

fn dead_counts(http: SocketAddr) -> Value {
    get_json(http, "/api/dead").1["counts"].clone()
}

/// A job a test worker was given.
#[derive(Clone, Debug)]
struct Attempt {
    function: String,
    handle: String,
    unique: String,
    data: String,
}

/// A worker thread for some functions that fails each job with the exception "disk full"
/// until `fixed` is set, and completes it after. With nothing to do it sleeps until the server
/// wakes it.
struct TestWorker {
    fixed: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestWorker {
    fn start(addr: SocketAddr, functions: &[&str], fixed: bool) -> TestWorker {
        let (stop, fixed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(fixed)));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let functions: Vec<String> = functions.iter().map(|f| f.to_string()).collect();
        let thread = std::thread::spawn({
            let (stop, fixed, attempts) = (stop.clone(), fixed.clone(), attempts.clone());
            move || {
                let mut conn = Conn::connect(addr).unwrap();
                for f in functions {
                    conn.send(&Request::CanDo { function: f.into_bytes().into() }).unwrap();
                }
                while !stop.load(Ordering::Relaxed) {
                    conn.send(&Request::GrabJob(GrabKind::Uniq)).unwrap();
                    let job = loop {
                        match conn.recv(Duration::from_secs(5)) {
                            Ok(Some(Response::JobAssignUniq { handle, function, unique, data })) => {
                                break Some((handle, function, unique, data))
                            }
                            Ok(Some(Response::NoJob)) | Ok(None) => break None,
                            Ok(Some(_)) => continue,
                            Err(_) => return,
                        }
                    };
                    let Some((handle, function, unique, data)) = job else {
                        // Asleep until a NOOP wakes it (or a while has passed).
                        conn.send(&Request::PreSleep).unwrap();
                        let _ = conn.recv(Duration::from_secs(2));
                        continue;
                    };
                    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                    attempts.lock().unwrap().push(Attempt {
                        function: text(&function),
                        handle: text(&handle),
                        unique: text(&unique),
                        data: text(&data),
                    });
                    let reply = if fixed.load(Ordering::SeqCst) {
                        Request::WorkComplete { handle, data: Default::default() }
                    } else {
                        Request::WorkException { handle, data: "disk full".into() }
                    };
                    conn.send(&reply).unwrap();
                }
            }
        });
        TestWorker { fixed, attempts, stop, thread: Some(thread) }
    }

    fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().unwrap().clone()
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn the_dead_set_is_listed_shown_retried_and_deleted_over_http() {
    let server = Server::start(&["--http", "127.0.0.1:0"]);
    let http = server.http.unwrap();
    let worker = TestWorker::start(server.addr, &["doomed", "cursed"], false);
    let mut client = Conn::connect(server.addr).unwrap();
    let doomed: Vec<String> = (0..3)
        .map(|i| client.submit_background("doomed", &format!("d{i}"), &format!("payload {i}")).unwrap())
        .collect();
    for i in 0..2 {
        client.submit_background("cursed", &format!("c{i}"), "x").unwrap();
    }
    wait_for("five dead jobs", || dead_counts(http) == json!({"doomed": 3, "cursed": 2}));

    // The list: newest first, without payloads; the counts whatever the filter.
    let (code, dead) = get_json(http, "/api/dead");
    assert_eq!(code, 200);
    let jobs = dead["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 5, "{dead}");
    assert!(jobs.windows(2).all(|w| w[0]["died_at"].as_i64() >= w[1]["died_at"].as_i64()), "{dead}");
    let d0 = jobs.iter().find(|j| j["handle"] == doomed[0].as_str()).expect("d0 is listed");
    assert_eq!((&d0["function"], &d0["unique"], &d0["attempts"]), (&json!("doomed"), &json!("d0"), &json!(1)));
    assert_eq!(
        (&d0["error"], &d0["payload_bytes"], &d0["priority"]),
        (&json!("disk full"), &json!(9), &json!("normal"))
    );
    assert!(d0.get("payload").is_none(), "lists leave payloads out: {d0}");
    let (_, cursed) = get_json(http, "/api/dead?function=cursed");
    assert_eq!(cursed["jobs"].as_array().unwrap().len(), 2);
    assert!(cursed["jobs"].as_array().unwrap().iter().all(|j| j["function"] == "cursed"), "{cursed}");
    assert_eq!(cursed["counts"], dead["counts"]);
    let (_, page) = get_json(http, "/api/dead?limit=2&offset=1");
    assert_eq!(page["jobs"].as_array().unwrap()[..], jobs[1..3]);
    for bad in ["limit=0", "limit=1001", "limit=many", "offset=-1", "colour=red"] {
        let (code, err) = get_json(http, &format!("/api/dead?{bad}"));
        assert_eq!(code, 400, "{bad}: {err}");
        assert!(err["error"].is_string(), "{err}");
    }

    // One job, with its payload; unknown handles are 404s.
    let (code, one) = get_json(http, &format!("/api/dead/{}", doomed[0]));
    assert_eq!(code, 200);
    assert_eq!((&one["payload"], &one["unique"]), (&json!("payload 0"), &json!("d0")));
    assert_eq!(get_json(http, "/api/dead/H:nowhere:1").0, 404);
    assert_eq!(call(http, "DELETE", "/api/dead/H:nowhere:1", None).0, 404);
    assert_eq!(call(http, "POST", "/api/dead/H:nowhere:1/retry", None).0, 404);

    // Retried, it runs again as a new job with its payload and unique key.
    worker.fixed.store(true, Ordering::SeqCst);
    let (code, retried) = call(http, "POST", &format!("/api/dead/{}/retry", doomed[0]), None);
    assert_eq!(code, 200, "{retried}");
    assert_eq!(retried["handle"], doomed[0].as_str());
    let new_handle = retried["new_handle"].as_str().expect("a new handle").to_string();
    assert_ne!(new_handle, doomed[0]);
    wait_for("the retried job to run", || worker.attempts().iter().any(|a| a.handle == new_handle));
    let again = worker.attempts().into_iter().find(|a| a.handle == new_handle).unwrap();
    assert_eq!((again.function.as_str(), again.unique.as_str(), again.data.as_str()), ("doomed", "d0", "payload 0"));
    assert_eq!(get_json(http, &format!("/api/dead/{}", doomed[0])).0, 404);
    assert_eq!(call(http, "POST", &format!("/api/dead/{}/retry", doomed[0]), None).0, 404);

    // Deleted one by one, and all of a function's at once.
    let (code, _, body) = request(http, "DELETE", &format!("/api/dead/{}", doomed[1]), None);
    assert_eq!((code, body.as_str()), (204, ""));
    assert_eq!(call(http, "DELETE", &format!("/api/dead/{}", doomed[1]), None).0, 404);
    let (code, deleted) = call(http, "POST", "/api/dead/delete", Some(json!({"all": true, "function": "cursed"})));
    assert_eq!((code, deleted), (200, json!({"deleted": 2})));
    assert_eq!(dead_counts(http), json!({"doomed": 1}));

    // Retried in bulk by handle: each answer says what became of it.
    let (code, bulk) = call(http, "POST", "/api/dead/retry", Some(json!({"handles": [doomed[2], "H:nowhere:2"]})));
    assert_eq!(code, 200, "{bulk}");
    let answers = bulk["retried"].as_array().unwrap();
    assert_eq!(answers.len(), 2, "{bulk}");
    let third = answers[0]["new_handle"].as_str().expect("a new handle").to_string();
    assert_eq!((&answers[1]["handle"], &answers[1]["error"]), (&json!("H:nowhere:2"), &json!("not in the dead set")));
    wait_for("the third job to run again", || worker.attempts().iter().any(|a| a.handle == third && a.unique == "d2"));
    assert_eq!(get_json(http, "/api/dead").1, json!({"jobs": [], "counts": {}}));
    let (code, none) = call(http, "POST", "/api/dead/retry", Some(json!({"all": true})));
    assert_eq!((code, none), (200, json!({"retried": []})));

    for bad in [
        json!({"all": false}),
        json!({"handles": ["x"], "all": true}),
        json!({"function": "doomed"}),
        json!({"all": true, "function": ""}),
        json!({"handles": "x"}),
        json!({"handles": [], "colour": "red"}),
    ] {
        let (code, err) = call(http, "POST", "/api/dead/delete", Some(bad.clone()));
        assert_eq!(code, 400, "{bad}: {err}");
        assert!(err["error"].is_string(), "{err}");
    }
    // A cross-site form cannot send JSON: without it nothing changes.
    let form = Some("application/x-www-form-urlencoded");
    assert_eq!(request_with(http, "POST", "/api/dead/delete", form, "all=true").0, 400);
    assert_eq!(request_with(http, "POST", "/api/dead/delete", Some("text/plain"), r#"{"all":true}"#).0, 400);
    assert_eq!(request_with(http, "POST", "/api/dead/H:nowhere:1/retry", form, "").0, 400);
}

#[test]
fn functions_are_paused_limited_and_given_retry_policies_over_http() {
    let server = Server::start(&["--http", "127.0.0.1:0", "--retry", "*=4/1s"]);
    let http = server.http.unwrap();

    // Paused, a function takes jobs and gives its workers none until it is resumed.
    let (code, paused) = call(http, "POST", "/api/functions/reports/pause", None);
    assert_eq!((code, paused), (200, json!({"function": "reports", "paused": true})));
    assert!(admin(server.addr, "limit").contains("reports\tpaused\t0\n"));
    let handle = Conn::connect(server.addr).unwrap().submit_background("reports", "r1", "x").unwrap();
    let worker = TestWorker::start(server.addr, &["reports"], true);
    assert_eq!(function(&get_json(http, "/api/status").1, "reports")["paused"], true);
    std::thread::sleep(Duration::from_millis(500));
    assert!(worker.attempts().is_empty(), "a paused function's job ran");
    let (code, resumed) = call(http, "POST", "/api/functions/reports/resume", None);
    assert_eq!((code, resumed), (200, json!({"function": "reports", "paused": false})));
    let resumed_at = Instant::now();
    wait_for("the job to run", || worker.attempts().iter().any(|a| a.handle == handle));
    // The sleeping worker is woken at once, not by the server's once-a-second sweep.
    assert!(resumed_at.elapsed() < Duration::from_millis(500), "woken after {:?}", resumed_at.elapsed());
    assert!(!admin(server.addr, "limit").contains("reports"));

    // Names in paths are percent-decoded.
    let (code, odd) = call(http, "POST", "/api/functions/a%20b%2Fc/pause", None);
    assert_eq!((code, odd), (200, json!({"function": "a b/c", "paused": true})));
    assert!(admin(server.addr, "limit").contains("a b/c\tpaused\t0\n"));
    assert_eq!(call(http, "POST", "/api/functions/a%20b%2Fc/resume", None).0, 200);
    // A cross-site form post (or a request of no type) changes nothing.
    let form = Some("application/x-www-form-urlencoded");
    assert_eq!(request_with(http, "POST", "/api/functions/reports/pause", form, "x=1").0, 400);
    assert_eq!(request_with(http, "POST", "/api/functions/reports/pause", None, "").0, 400);
    assert!(!admin(server.addr, "limit").contains("reports"));
    assert_eq!(call(http, "GET", "/api/functions/reports/pause", None).0, 405);

    // Limits.
    let (code, limit) = call(http, "PUT", "/api/functions/slow/limit", Some(json!({"limit": 2})));
    assert_eq!((code, limit), (200, json!({"function": "slow", "limit": 2})));
    assert!(admin(server.addr, "limit").contains("slow\trunning\t2\n"));
    assert_eq!(function(&get_json(http, "/api/status").1, "slow")["limit"], 2);
    assert_eq!(call(http, "PUT", "/api/functions/slow/limit", Some(json!({"limit": 0}))).0, 200);
    assert!(!admin(server.addr, "limit").contains("slow"));
    for bad in [json!({"limit": -1}), json!({"limit": "two"}), json!({}), json!({"limit": 1, "burst": 2})] {
        assert_eq!(call(http, "PUT", "/api/functions/slow/limit", Some(bad.clone())).0, 400, "{bad}");
    }
    assert_eq!(request_with(http, "PUT", "/api/functions/slow/limit", Some("text/plain"), r#"{"limit":1}"#).0, 400);

    // Retry policies: the default from the command line, others set and removed at runtime.
    let default = json!({"retries": 4, "backoff": "exponential", "base_ms": 1000, "max_delay_ms": 86_400_000});
    assert_eq!(get_json(http, "/api/retry"), (200, json!({"*": default})));
    let fixed = json!({"retries": 2, "backoff": "fixed", "base": "10ms", "max_delay": "1s"});
    let (code, set) = call(http, "PUT", "/api/retry/mail", Some(fixed));
    let mail = json!({"retries": 2, "backoff": "fixed", "base_ms": 10, "max_delay_ms": 1000});
    assert_eq!(code, 200, "{set}");
    assert_eq!(set, json!({"function": "mail", "retries": 2, "backoff": "fixed", "base_ms": 10, "max_delay_ms": 1000}));
    assert!(admin(server.addr, "retry").contains("mail\t2\tfixed\t10ms\t1s\n"));
    // Left out, the durations are the config file's defaults.
    let (_, set) = call(http, "PUT", "/api/retry/slow", Some(json!({"retries": 1})));
    let slow = json!({"retries": 1, "backoff": "exponential", "base_ms": 15_000, "max_delay_ms": 86_400_000});
    assert_eq!(
        set,
        json!({"function": "slow", "retries": 1, "backoff": "exponential", "base_ms": 15_000, "max_delay_ms": 86_400_000})
    );
    assert_eq!(function(&get_json(http, "/api/status").1, "slow")["retry"]["retries"], 1);
    assert_eq!(get_json(http, "/api/retry").1, json!({"*": default, "mail": mail, "slow": slow}));
    for bad in [
        json!({"retries": 2, "base": "soon"}),
        json!({"retries": 2, "backoff": "linear"}),
        json!({"backoff": "fixed"}),
        json!({"retries": -1}),
    ] {
        let (code, err) = call(http, "PUT", "/api/retry/mail", Some(bad.clone()));
        assert_eq!(code, 400, "{bad}: {err}");
    }
    assert_eq!(call(http, "DELETE", "/api/retry/mail", None).0, 204);
    assert_eq!(call(http, "DELETE", "/api/retry/mail", None).0, 404);
    assert_eq!(call(http, "DELETE", "/api/retry/*", None).0, 204);
    assert_eq!(get_json(http, "/api/retry").1.as_object().unwrap().keys().collect::<Vec<_>>(), ["slow"]);
    assert_eq!(get_json(http, "/api/schedules"), (200, json!([])));

    // The OpenAPI document describes every one of these.
    let (_, doc) = get_json(http, "/api/openapi.json");
    for (path, methods) in [
        ("/api/dead", &["get"][..]),
        ("/api/dead/{handle}", &["get", "delete"]),
        ("/api/dead/{handle}/retry", &["post"]),
        ("/api/dead/retry", &["post"]),
        ("/api/dead/delete", &["post"]),
        ("/api/functions/{name}/pause", &["post"]),
        ("/api/functions/{name}/resume", &["post"]),
        ("/api/functions/{name}/limit", &["put"]),
        ("/api/retry", &["get"]),
        ("/api/retry/{function}", &["put", "delete"]),
        ("/api/schedules", &["get"]),
    ] {
        for method in methods {
            assert!(doc["paths"][path][method].is_object(), "{method} {path} is not described");
        }
    }
    for schema in ["DeadJob", "DeadSelection", "Retried", "Paused", "RetryPolicy", "RetryPolicyRequest", "Schedule"] {
        assert!(doc["components"]["schemas"][schema].is_object(), "no schema {schema}");
    }
}

#[test]
fn the_dashboard_retries_deletes_and_pauses_in_a_real_browser() {
    let config_dir = common::temp_data_dir();
    std::fs::create_dir_all(&config_dir).unwrap();
    let config = config_dir.join("gearbox.toml");
    let schedule = "[[schedule]]\nname = \"nightly\"\nfunction = \"report\"\ncron = \"0 0 3 * * *\"\ntimezone = \"Europe/Berlin\"\n";
    std::fs::write(&config, schedule).unwrap();
    let server = Server::start(&[
        "--http",
        "127.0.0.1:0",
        "--retry",
        "doomed=0/10ms",
        "--limit",
        "slow=3",
        "--config",
        config.to_str().unwrap(),
    ]);
    let http = server.http.unwrap();
    let worker = TestWorker::start(server.addr, &["doomed", "cursed", "reports"], false);
    let mut client = Conn::connect(server.addr).unwrap();
    let retry = client.submit_background("doomed", "order-1", "retry me").unwrap();
    let delete = client.submit_background("doomed", "order-2", "delete me").unwrap();
    let other = client.submit_background("cursed", "order-3", "leave me").unwrap();
    wait_for("three dead jobs", || dead_counts(http) == json!({"doomed": 2, "cursed": 1}));
    worker.fixed.store(true, Ordering::SeqCst); // the retried job completes
    let (_, schedules) = get_json(http, "/api/schedules");
    assert_eq!((&schedules[0]["name"], &schedules[0]["timezone"]), (&json!("nightly"), &json!("Europe/Berlin")));
    let next = schedules[0]["next_run"].as_i64().unwrap().to_string();

    let handshake = config_dir.join("handshake");
    std::fs::create_dir_all(&handshake).unwrap();
    let url = format!("http://{http}/");
    let env = [
        ("DEAD_FUNCTION", "doomed"),
        ("DEAD_RETRY", retry.as_str()),
        ("DEAD_DELETE", delete.as_str()),
        ("DEAD_OTHER", other.as_str()),
        ("DEAD_PAYLOAD", "retry me"),
        ("PAUSE_FUNCTION", "reports"),
        ("HANDSHAKE_DIR", handshake.to_str().unwrap()),
        ("EXPECT_RETRY_BADGE", "doomed"),
        ("EXPECT_LIMIT", "slow=3"),
        ("EXPECT_SCHEDULE", "nightly"),
        ("EXPECT_SCHEDULE_NEXT", next.as_str()),
    ];
    let paused_job = std::thread::scope(|scope| {
        let browser = scope.spawn(|| common::check_dashboard_in_a_browser(&url, &env));
        // While the page has the function paused: the admin protocol says so, and its new job
        // waits.
        let deadline = Instant::now() + Duration::from_secs(100);
        while !handshake.join("paused").exists() {
            assert!(!browser.is_finished(), "the browser check ended before pausing");
            assert!(Instant::now() < deadline, "the browser check did not pause reports");
            std::thread::sleep(Duration::from_millis(50));
        }
        let limits = admin(server.addr, "limit");
        assert!(limits.contains("reports\tpaused\t0\n"), "{limits}");
        let job = Conn::connect(server.addr).unwrap().submit_background("reports", "while-paused", "p").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(!worker.attempts().iter().any(|a| a.handle == job), "a paused function's job ran");
        std::fs::write(handshake.join("checked"), "").unwrap();
        browser.join().expect("the browser check passes");
        job
    });

    // The page resumed the function: its job ran.
    assert!(!admin(server.addr, "limit").contains("reports"));
    wait_for("the job held by the pause", || worker.attempts().iter().any(|a| a.handle == paused_job));
    // The retried job ran again with its unique key and payload; the deleted one is gone.
    let rerun = worker.attempts().into_iter().find(|a| a.unique == "order-1" && a.handle != retry);
    let rerun = rerun.expect("the retried job ran again");
    assert_eq!((rerun.function.as_str(), rerun.data.as_str()), ("doomed", "retry me"));
    assert_eq!(dead_counts(http), json!({"cursed": 1}));
    assert_eq!(get_json(http, &format!("/api/dead/{delete}")).0, 404);
    assert!(!worker.attempts().iter().any(|a| a.unique == "order-2" && a.handle != delete), "the deleted job ran");
    let _ = std::fs::remove_dir_all(config_dir);
}
