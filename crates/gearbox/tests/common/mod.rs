//! The `gearbox` binary run as a child process, and the tools the tests drive it with.
#![allow(dead_code)] // each test file uses a different part

pub mod certs;
pub mod cluster;
pub mod gear;
pub mod proxy;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use gearbox_proto::{Decoder, Message, Request, Response};

pub struct Server {
    pub child: Child,
    /// The plaintext Gearman address (the TLS one under `--ssl`).
    pub addr: SocketAddr,
    /// The TLS Gearman address (`--ssl`, `--ssl-port`).
    pub tls: Option<SocketAddr>,
    /// The dashboard, metrics and API address, when the server serves HTTP.
    pub http: Option<SocketAddr>,
    /// The server's own data directory, removed on drop.
    pub data_dir: std::path::PathBuf,
    /// Every line the server has logged to standard error so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

/// A server process that has not announced its address yet (killed on drop).
pub struct Starting {
    server: Server,
    announced: Receiver<String>,
    announced_tls: Receiver<String>,
    wants_http: bool,
    wants_tls: bool,
    wants_plain: bool,
}

impl Starting {
    /// The lines logged so far.
    pub fn log(&self) -> Vec<String> {
        self.server.log.lock().unwrap().clone()
    }

    /// Sends SIGTERM and returns the exit status and how long the exit took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        self.server.terminate()
    }

    /// Waits (up to 30 s) for the server to announce its addresses.
    pub fn ready(self) -> Server {
        let Starting { mut server, announced, announced_tls, wants_http, wants_tls, wants_plain } = self;
        let next = |what: &str| announced.recv_timeout(Duration::from_secs(30)).expect(what).parse().unwrap();
        let tls = |what: &str| announced_tls.recv_timeout(Duration::from_secs(30)).expect(what).parse().unwrap();
        server.tls = wants_tls.then(|| tls("server announces its TLS address"));
        server.addr = if wants_plain { next("server announces its address") } else { server.tls.unwrap() };
        server.http = wants_http.then(|| next("server announces its HTTP address"));
        server
    }
}

static NEXT_DIR: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A fresh directory for one server's data.
pub fn temp_data_dir() -> std::path::PathBuf {
    let n = NEXT_DIR.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("gearbox-bin-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

impl Server {
    /// Starts `gearbox server` on an ephemeral port with the default (embedded) queue in a
    /// data directory of its own, plus `extra` flags. HTTP is off unless `extra` asks for it
    /// (tests run in parallel; they cannot all have the default HTTP port); the log level is
    /// INFO unless `extra` has `--verbose`.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_in(temp_data_dir(), extra)
    }

    pub fn start_in(data_dir: std::path::PathBuf, extra: &[&str]) -> Server {
        Self::spawn(data_dir, extra, |_| {}).ready()
    }

    /// Starts the server as [`Server::start_in`] does, after `configure` had its say on the
    /// command, and returns without waiting for it to listen.
    pub fn spawn(data_dir: std::path::PathBuf, extra: &[&str], configure: impl FnOnce(&mut Command)) -> Starting {
        let mut command = Command::new(env!("CARGO_BIN_EXE_gearbox"));
        command
            .args(["server", "--listen", "127.0.0.1", "--port", "0", "--data-dir"])
            .arg(&data_dir)
            .args(if extra.iter().any(|a| a.starts_with("--http")) { &[][..] } else { &["--http", "off"][..] })
            .args(if extra.contains(&"--verbose") { &[][..] } else { &["--verbose", "INFO"][..] })
            .args(extra)
            .stderr(Stdio::piped());
        configure(&mut command);
        let mut child = command.spawn().expect("start gearbox");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (tls_tx, tls_rx) = std::sync::mpsc::channel();
        let wants_http = extra.iter().any(|a| a.starts_with("--http")) && !extra.contains(&"off");
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Logged before it is announced: a test that saw the address sees the line.
                lines.lock().unwrap().push(line.clone());
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                if let Some(addr) = line.split("listening for TLS on ").nth(1) {
                    let _ = tls_tx.send(addr.trim().to_string());
                }
                if let Some(addr) = line.split("API on http://").nth(1).or_else(|| line.split("API on https://").nth(1))
                {
                    let _ = tx.send(addr.trim().trim_end_matches('/').to_string());
                }
            }
        });
        let addr = SocketAddr::from(([0, 0, 0, 0], 0)); // until announced
        let wants_tls = extra.iter().any(|a| *a == "--ssl" || *a == "--ssl-port");
        let wants_plain = !extra.contains(&"--ssl");
        Starting {
            server: Server { child, addr, tls: None, http: None, data_dir, log },
            announced: rx,
            announced_tls: tls_rx,
            wants_http,
            wants_tls,
            wants_plain,
        }
    }

    /// The lines logged so far that contain `text`.
    pub fn logged(&self, text: &str) -> Vec<String> {
        self.log.lock().unwrap().iter().filter(|l| l.contains(text)).cloned().collect()
    }

    pub fn port(&self) -> String {
        self.addr.port().to_string()
    }

    pub fn gearadmin(&self, args: &[&str]) -> String {
        let out = run_tool("gearadmin", &[&["-h", "127.0.0.1", "-p", &self.port()], args].concat());
        assert!(out.status.success(), "gearadmin {args:?} failed: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn gearman(&self, args: &[&str]) -> Output {
        run_tool("gearman", &[&["-h", "127.0.0.1", "-p", &self.port()], args].concat())
    }

    /// Starts the `gearman` tool in the background; it is killed when the guard drops, even
    /// if the test fails first (a `gearman -w` whose server is gone spins forever).
    pub fn spawn_gearman(&self, args: &[&str]) -> ChildGuard {
        ChildGuard(
            Command::new("gearman")
                .args(["-h", "127.0.0.1", "-p", &self.port()])
                .args(args)
                .stdout(Stdio::null())
                .spawn()
                .expect("the gearman tool (Debian gearman-tools) is installed"),
        )
    }

    /// Sends SIGTERM and returns the exit status and how long the exit took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            assert!(started.elapsed() < Duration::from_secs(10), "server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// Runs a tool with a deadline so a hang fails the test instead of stalling it.
pub fn run_tool(tool: &str, args: &[&str]) -> Output {
    let child = Command::new("timeout")
        .arg("20")
        .arg(tool)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let out = child.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(127), "{tool} is not installed (the README's test command installs it)");
    out
}

/// Repeats `check` until it returns true, or panics after a deadline.
pub fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends ECHO_REQ with `data` on `stream` and checks that ECHO_RES returns it.
pub fn echo(stream: &mut TcpStream, data: &[u8]) {
    let mut out = BytesMut::new();
    Request::EchoReq { data: data.to_vec().into() }.encode(&mut out);
    stream.write_all(&out).expect("send ECHO_REQ");
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(Message::Packet(frame)) = Decoder::default().decode(&mut buf).expect("a valid reply") {
            match Response::parse(&frame).expect("a known reply") {
                Response::EchoRes { data: got } => return assert_eq!(&got[..], data),
                other => panic!("expected ECHO_RES, got {other:?}"),
            }
        }
        let n = stream.read(&mut chunk).expect("read ECHO_RES");
        assert!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A child process killed on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request on a fresh connection, with a JSON body if any; returns the status,
/// the content type and the body.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, String, String) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    request_with(addr, method, path, Some("application/json"), &body)
}

/// [`request`] with this content type (or none) and body.
pub fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> (u16, String, String) {
    let headers: Vec<(&str, &str)> = content_type.map(|t| ("Content-Type", t)).into_iter().collect();
    let reply = exchange(addr, method, path, &headers, body);
    (reply.status, reply.header("content-type").unwrap_or_default().to_owned(), reply.body)
}

/// An HTTP reply: its status, headers (names in lower case) and body.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection with these headers and body, answered whole.
pub fn exchange(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let headers: String = headers.iter().map(|(name, value)| format!("{name}: {value}\r\n")).collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("a complete HTTP reply");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Reply { status, headers, body: body.to_owned() }
}

/// One admin line and its whole reply (a line, or a listing ending in `.`).
pub fn admin(addr: SocketAddr, line: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while !(reply.ends_with(b"\n")
        && (reply.starts_with(b"OK") || reply.starts_with(b"ERR") || reply.ends_with(b".\n")))
    {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the reply to {line:?} ended");
        reply.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(reply).unwrap()
}

/// Runs the `gearbox` binary's client commands against `server`.
pub fn gearbox(server: &Server, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gearbox"))
        .args(args)
        .env("GEARBOX_SERVERS", server.addr.to_string())
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

pub fn get_json(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let (status, content_type, body) = request(addr, "GET", path, None);
    assert!(content_type.starts_with("application/json"), "{path}: {content_type} {body}");
    (status, serde_json::from_str(&body).unwrap())
}

/// Runs the dashboard's browser check (`tests/browser/dashboard.mjs`, headless Chromium) on
/// the page at `url` with these environment variables, and fails the test if it fails.
pub fn check_dashboard_in_a_browser(url: &str, env: &[(&str, &str)]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/browser/dashboard.mjs");
    let out = Command::new("timeout")
        .envs(env.iter().copied())
        .args(["120", "node", script, url])
        .output()
        .expect("node is installed (the README's test command sets up tests/browser)");
    assert!(
        out.status.success(),
        "browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
