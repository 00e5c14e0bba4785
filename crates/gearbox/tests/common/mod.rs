//! The `gearbox` binary run as a child process, and the tools the tests drive it with.
#![allow(dead_code)] // each test file uses a different part

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// The dashboard, metrics and API address, when the server serves HTTP.
    pub http: Option<SocketAddr>,
    /// The server's own data directory, removed on drop.
    pub data_dir: std::path::PathBuf,
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
    /// (tests run in parallel; they cannot all have the default HTTP port).
    pub fn start(extra: &[&str]) -> Server {
        Self::start_in(temp_data_dir(), extra)
    }

    pub fn start_in(data_dir: std::path::PathBuf, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gearbox"))
            .args(["server", "--listen", "127.0.0.1", "--port", "0", "--verbose", "INFO", "--data-dir"])
            .arg(&data_dir)
            .args(if extra.iter().any(|a| a.starts_with("--http")) { &[][..] } else { &["--http", "off"][..] })
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gearbox");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let wants_http = extra.iter().any(|a| a.starts_with("--http")) && !extra.contains(&"off");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                if let Some(addr) = line.split("API on http://").nth(1) {
                    let _ = tx.send(addr.trim().trim_end_matches('/').to_string());
                }
            }
        });
        let announced = |what: &str| rx.recv_timeout(Duration::from_secs(30)).expect(what).parse().unwrap();
        let addr = announced("server announces its address");
        let http = wants_http.then(|| announced("server announces its HTTP address"));
        Server { child, addr, http, data_dir }
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

/// A child process killed on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
