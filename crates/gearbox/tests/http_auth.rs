//! The HTTP side's protection against the real binary: admin and read-only tokens, the
//! dashboard's login (session cookie and CSRF token, in a real headless Chromium too), the
//! same-origin rule for changes, the refusal to serve a network address without a token,
//! HTTPS, and the audit of refusals.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;

use common::certs::Certs;
use common::{exchange, Reply, Server};
use serde_json::Value;

const ADMIN: &str = "admin-token-0123456789";
const READ: &str = "read-token-0123456789";
const JSON: (&str, &str) = ("Content-Type", "application/json");
const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn json(reply: &Reply) -> Value {
    serde_json::from_str(&reply.body).unwrap_or_else(|_| panic!("not JSON: {} {}", reply.status, reply.body))
}

/// `gearbox_refused_total{action=ACTION}` as the admin token reads it.
fn refused(http: SocketAddr, action: &str) -> u64 {
    let metrics = exchange(http, "GET", "/metrics", &[("Authorization", &bearer(ADMIN))], "");
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    count(&metrics.body, action)
}

fn count(metrics: &str, action: &str) -> u64 {
    let prefix = format!("gearbox_refused_total{{action=\"{action}\"}} ");
    let line = metrics.lines().find_map(|l| l.strip_prefix(&prefix));
    line.unwrap_or_else(|| panic!("no {prefix} in\n{metrics}")).parse().unwrap()
}

/// POST /api/functions/NAME/pause with these headers.
fn pause(http: SocketAddr, name: &str, headers: &[(&str, &str)]) -> Reply {
    exchange(http, "POST", &format!("/api/functions/{name}/pause"), &[&[JSON], headers].concat(), "")
}

fn logs_in(http: SocketAddr, token: &str) -> Reply {
    exchange(http, "POST", "/login", &[FORM], &format!("token={token}"))
}

/// The `NAME=VALUE` of a login's session cookie.
fn session_cookie(login: &Reply) -> String {
    assert_eq!((login.status, login.header("location")), (303, Some("/")), "{}", login.body);
    let set = login.header("set-cookie").expect("a session cookie");
    set.split(';').next().unwrap().to_owned()
}

/// The CSRF token the dashboard page carries.
fn csrf_of_page(page: &str) -> String {
    let meta = "<meta name=\"gearbox-csrf\" content=\"";
    let start = page.find(meta).expect("the CSRF meta tag") + meta.len();
    page[start..].split('"').next().unwrap().to_owned()
}

#[test]
fn tokens_guard_the_api_and_every_refusal_is_audited() {
    let server = Server::start(&["--http", "127.0.0.1:0", "--http-token", ADMIN, "--http-read-token", READ]);
    let http = server.http.unwrap();
    let admin = bearer(ADMIN);
    let read = bearer(READ);

    let none = exchange(http, "GET", "/api/status", &[], "");
    assert_eq!(none.status, 401);
    assert_eq!(none.header("www-authenticate"), Some("Bearer realm=\"gearbox\""));
    assert!(json(&none)["error"].as_str().unwrap().contains("Authorization: Bearer"), "{}", none.body);
    let wrong = exchange(http, "GET", "/api/status", &[("Authorization", "Bearer not-the-token-at-all")], "");
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.header("www-authenticate"), Some("Bearer realm=\"gearbox\", error=\"invalid_token\""));
    assert_eq!(exchange(http, "GET", "/api/status", &[("Authorization", "Basic YWRtaW46eA==")], "").status, 401);
    assert_eq!(exchange(http, "GET", "/metrics", &[], "").status, 401);

    // The read-only token reads everything, and changes nothing.
    for path in ["/api/status", "/metrics", "/api/openapi.json", "/api/dead"] {
        assert_eq!(exchange(http, "GET", path, &[("Authorization", &read)], "").status, 200, "{path}");
    }
    let doc = json(&exchange(http, "GET", "/api/openapi.json", &[("Authorization", &read)], ""));
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer", "{doc}");
    let refused_change = pause(http, "resize", &[("Authorization", &read)]);
    assert_eq!(refused_change.status, 403);
    assert_eq!(json(&refused_change)["error"], "this token may only read");
    let cancel = exchange(http, "DELETE", "/api/jobs/H:x:1", &[("Authorization", &read)], "");
    assert_eq!(cancel.status, 403);

    // The admin token changes things.
    let paused = pause(http, "resize", &[("Authorization", &admin)]);
    assert_eq!(paused.status, 200, "{}", paused.body);
    assert_eq!(json(&paused)["paused"], true);
    assert_eq!(exchange(http, "DELETE", "/api/jobs/H:x:1", &[("Authorization", &admin)], "").status, 404);

    // A browser without a session gets the login page in place of the dashboard.
    let page = exchange(http, "GET", "/", &[], "");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("action=\"/login\"") && !page.body.contains("functions-table"), "{}", page.body);
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    let dashboard = exchange(http, "GET", "/", &[("Authorization", &admin)], "");
    assert!(dashboard.body.contains("functions-table"));

    // Six refusals (the login page is not one), each logged with who, from where and what.
    assert_eq!(refused(http, "http"), 6);
    let logged = server.logged("refused");
    let line = logged.iter().find(|l| l.contains("read-token")).expect("the read-only token's refusal");
    assert!(line.contains("POST /api/functions/resize/pause") && line.contains("127.0.0.1:"), "{line}");
}

#[test]
fn open_metrics_need_no_token() {
    let server = Server::start(&["--http", "127.0.0.1:0", "--http-token", ADMIN, "--http-open-metrics"]);
    let http = server.http.unwrap();
    let metrics = exchange(http, "GET", "/metrics", &[], "");
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("gearbox_connections "), "{}", metrics.body);
    assert_eq!(exchange(http, "GET", "/api/status", &[], "").status, 401);
    assert_eq!(count(&exchange(http, "GET", "/metrics", &[], "").body, "http"), 1);
}

#[test]
fn the_login_cookie_reads_and_changes_with_its_csrf_token() {
    let server = Server::start(&["--http", "127.0.0.1:0", "--http-token", ADMIN, "--http-read-token", READ]);
    let http = server.http.unwrap();

    let wrong = logs_in(http, "not-the-token-at-all");
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("Wrong token") && wrong.header("set-cookie").is_none(), "{}", wrong.body);

    let login = logs_in(http, ADMIN);
    let cookie = session_cookie(&login);
    let set = login.header("set-cookie").unwrap();
    assert!(cookie.starts_with(&format!("gearbox_session_{}=", http.port())), "{set}");
    for attribute in ["Path=/", "Max-Age=43200", "HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(set.split("; ").any(|a| a == attribute), "{attribute} missing in {set}");
    }
    let with_cookie = [("Cookie", cookie.as_str())];

    // The dashboard carries the session's CSRF token; reads need only the cookie.
    let page = exchange(http, "GET", "/", &with_cookie, "");
    assert!(page.body.contains("functions-table"), "{}", page.body);
    assert_eq!(page.header("cache-control"), Some("no-store"));
    let csrf = csrf_of_page(&page.body);
    assert_eq!(csrf.len(), 64);
    assert!(!set.contains(&csrf), "the CSRF token is not the session id");
    assert_eq!(exchange(http, "GET", "/api/status", &with_cookie, "").status, 200);

    // Changes need the CSRF token besides; a bearer token needs none.
    assert_eq!(pause(http, "mail", &with_cookie).status, 403);
    let wrong_csrf = pause(http, "mail", &[with_cookie[0], ("X-CSRF-Token", &"0".repeat(64))]);
    assert_eq!((wrong_csrf.status, json(&wrong_csrf)["error"].as_str()), (403, Some("missing or wrong X-CSRF-Token")));
    let paused = pause(http, "mail", &[with_cookie[0], ("X-CSRF-Token", &csrf)]);
    assert_eq!(paused.status, 200, "{}", paused.body);
    assert_eq!(pause(http, "mail", &[("Authorization", &bearer(ADMIN))]).status, 200);

    // Logging out ends the session and clears the cookie.
    let logout = exchange(http, "POST", "/logout", &with_cookie, "");
    assert_eq!(logout.status, 303);
    assert!(logout.header("set-cookie").unwrap().contains("Max-Age=0"), "{:?}", logout.headers);
    assert_eq!(exchange(http, "GET", "/api/status", &with_cookie, "").status, 401);
    assert!(exchange(http, "GET", "/", &with_cookie, "").body.contains("action=\"/login\""));

    // A session opened with the read-only token reads, and changes nothing.
    let cookie = session_cookie(&logs_in(http, READ));
    let page = exchange(http, "GET", "/", &[("Cookie", &cookie)], "");
    let csrf = csrf_of_page(&page.body);
    assert_eq!(exchange(http, "GET", "/api/status", &[("Cookie", &cookie)], "").status, 200);
    assert_eq!(pause(http, "mail", &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)]).status, 403);

    // The wrong login, the missing and the wrong CSRF token, the ended session, the read-only change.
    assert_eq!(refused(http, "http"), 5);
}

#[test]
fn changes_from_another_site_are_refused_even_without_tokens() {
    let server = Server::start(&["--http", "127.0.0.1:0"]);
    let http = server.http.unwrap();
    let evil = pause(http, "mail", &[("Origin", "http://evil.example")]);
    assert_eq!(evil.status, 403);
    assert!(json(&evil)["error"].as_str().unwrap().contains("another site"), "{}", evil.body);
    assert_eq!(pause(http, "mail", &[("Origin", "null")]).status, 403);
    // Another port on the same host is another site too.
    let other_port = format!("http://127.0.0.1:{}", http.port() + 1);
    assert_eq!(pause(http, "mail", &[("Origin", &other_port)]).status, 403);
    let form = exchange(http, "POST", "/api/jobs", &[("Origin", "http://evil.example"), FORM], "function=x");
    assert_eq!(form.status, 403);

    // The dashboard's own requests, and requests not from a browser, pass; so do reads.
    assert_eq!(pause(http, "mail", &[("Origin", &format!("http://{http}"))]).status, 200);
    assert_eq!(pause(http, "mail", &[]).status, 200);
    assert_eq!(exchange(http, "GET", "/api/status", &[("Origin", "http://evil.example")], "").status, 200);
    let metrics = exchange(http, "GET", "/metrics", &[], "");
    assert_eq!(count(&metrics.body, "http"), 4);
}

#[test]
fn http_on_a_network_address_needs_a_token_or_http_insecure() {
    let out = Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(["server", "--listen", "127.0.0.1", "--port", "0", "--queue", "memory", "--job-log", "none"])
        .args(["--http", "0.0.0.0:0"])
        .env_remove("GEARBOX_HTTP_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to serve HTTP on 0.0.0.0:"), "{stderr}");
    assert!(stderr.contains("--http-insecure"), "{stderr}");

    let server = Server::start(&["--http", "0.0.0.0:0", "--http-insecure"]);
    let http = SocketAddr::from(([127, 0, 0, 1], server.http.unwrap().port()));
    assert_eq!(exchange(http, "GET", "/api/status", &[], "").status, 200);
    assert_eq!(server.logged("without a token (--http-insecure)").len(), 1);

    // With a token it starts; the login cookie then cannot be Secure over plain HTTP.
    let server = Server::start(&["--http", "0.0.0.0:0", "--http-token", ADMIN]);
    let http = SocketAddr::from(([127, 0, 0, 1], server.http.unwrap().port()));
    assert_eq!(exchange(http, "GET", "/api/status", &[], "").status, 401);
    let login = logs_in(http, ADMIN);
    session_cookie(&login);
    assert!(!login.header("set-cookie").unwrap().contains("Secure"), "{:?}", login.headers);
    assert_eq!(server.logged("login cookie goes over plain HTTP").len(), 1);
}

/// A GET with `host` in the Host header; the status.
fn get_as(http: SocketAddr, host: &str, path: &str) -> u16 {
    use std::io::Read;
    let mut stream = TcpStream::connect(http).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("an HTTP status line")
}

#[test]
fn a_tokenless_http_side_answers_only_to_addresses_and_localhost() {
    // A page whose own name was re-pointed at 127.0.0.1 (DNS rebinding) sends that name.
    let server = Server::start(&["--http", "127.0.0.1:0"]);
    let http = server.http.unwrap();
    assert_eq!(get_as(http, &http.to_string(), "/api/status"), 200);
    assert_eq!(get_as(http, &format!("localhost:{}", http.port()), "/api/status"), 200);
    assert_eq!(get_as(http, &format!("rebind.example:{}", http.port()), "/api/status"), 403);
    // With a token, the name does not matter: the token does.
    let server = Server::start(&["--http", "127.0.0.1:0", "--http-token", ADMIN]);
    assert_eq!(get_as(server.http.unwrap(), "jobs.example.com", "/api/status"), 401);
}

#[test]
fn with_an_acl_the_http_side_needs_a_token_too() {
    let dir = common::temp_data_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let acl = dir.join("acl.toml");
    std::fs::write(&acl, "[identity.anonymous]\nadmin = \"read\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(["server", "--listen", "127.0.0.1", "--port", "0", "--queue", "memory", "--job-log", "none"])
        .args(["--http", "127.0.0.1:0", "--acl", acl.to_str().unwrap()])
        .env_remove("GEARBOX_HTTP_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("while --acl is in force"), "{stderr}");
    // HTTP not asked for by name (the default address): left off, and the server runs.
    let mut child = Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(["server", "--listen", "127.0.0.1", "--port", "0", "--queue", "memory", "--job-log", "none"])
        .args(["--acl", acl.to_str().unwrap()])
        .env_remove("GEARBOX_HTTP_TOKEN")
        .env_remove("GEARBOX_HTTP")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines: Vec<String> = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()))
        .map_while(Result::ok)
        .take_while(|l| !l.contains("listening on"))
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    assert!(lines.iter().any(|l| l.contains("HTTP (dashboard, metrics, API) is off: with --acl")), "{lines:?}");
    let server = Server::start(&["--http", "127.0.0.1:0", "--acl", acl.to_str().unwrap(), "--http-token", ADMIN]);
    assert_eq!(
        exchange(server.http.unwrap(), "GET", "/api/status", &[("Authorization", &bearer(ADMIN))], "").status,
        200
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// curl with the test CA: the status and the body.
fn curl(certs: &Certs, url: &str, headers: &[&str]) -> (u16, String) {
    let mut command = Command::new("curl");
    command.args(["-sS", "--max-time", "20", "--cacert"]).arg(&certs.ca).args(["-w", "\n%{http_code}"]);
    for header in headers {
        command.args(["-H", header]);
    }
    let out = command.arg(url).output().expect("curl is installed");
    assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), body.to_owned())
}

#[test]
fn https_serves_with_the_certificate_while_handshakes_stall() {
    let certs = Certs::new();
    let flags = certs.server_flags();
    let mut args = vec!["--http", "127.0.0.1:0", "--http-ssl", "--http-token", ADMIN];
    args.extend(flags.iter().map(String::as_str));
    let server = Server::start(&args);
    let http = server.http.unwrap();
    assert_eq!(server.logged("dashboard, metrics and API on https://").len(), 1);

    // Two clients that never finish their handshake hold up nobody.
    let _silent = TcpStream::connect(http).unwrap();
    let mut half = TcpStream::connect(http).unwrap();
    half.write_all(&[0x16, 0x03, 0x01]).unwrap();

    let auth = format!("Authorization: Bearer {ADMIN}");
    let (status, body) = curl(&certs, &format!("https://127.0.0.1:{}/api/status", http.port()), &[&auth]);
    assert_eq!(status, 200, "{body}");
    assert!(serde_json::from_str::<Value>(&body).unwrap()["totals"].is_object(), "{body}");
    let (status, _) = curl(&certs, &format!("https://localhost:{}/api/status", http.port()), &[]);
    assert_eq!(status, 401);
    let (status, page) = curl(&certs, &format!("https://localhost:{}/", http.port()), &[]);
    assert_eq!(status, 200);
    assert!(page.contains("action=\"/login\""), "{page}");

    // Plain HTTP on the HTTPS port is told so.
    let plain = exchange(http, "GET", "/api/status", &[], "");
    assert_eq!(plain.status, 400);
    assert!(plain.body.contains("HTTPS"), "{}", plain.body);
    let (_, metrics) = curl(&certs, &format!("https://127.0.0.1:{}/metrics", http.port()), &[&auth]);
    assert_eq!((count(&metrics, "http"), count(&metrics, "tls_handshake")), (1, 1), "{metrics}");
}

#[test]
fn the_dashboard_logs_in_with_a_token_in_a_real_browser() {
    let server = Server::start(&["--http", "127.0.0.1:0", "--http-token", ADMIN]);
    let http = server.http.unwrap();
    common::check_dashboard_in_a_browser(&format!("http://{http}/"), &[("TOKEN", ADMIN)]);
    // What the page did reached the server.
    let status = json(&exchange(http, "GET", "/api/status", &[("Authorization", &bearer(ADMIN))], ""));
    let probe = status["functions"].as_array().unwrap().iter().find(|f| f["name"] == "browser_probe").cloned();
    assert_eq!(probe.unwrap_or_default()["queued"], 3, "{status}");
}
