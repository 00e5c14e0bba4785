//! Servers for the client tests: gearbox in process, gearmand (Debian's) as a child process.
#![allow(dead_code)] // each test file uses a different part

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A gearbox server on an ephemeral port (memory queue); cancel the token to stop it.
pub async fn gearbox() -> (String, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    tokio::spawn(gearbox_server::serve(vec![listener], None, Default::default(), stop.clone()));
    (addr, stop)
}

/// A child process, killed on drop.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spare_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// gearmand on a spare port, once it listens.
pub async fn gearmand() -> (String, Proc) {
    let port = spare_port();
    let pid_file = std::env::temp_dir().join(format!("gearmand-client-test-{port}.pid"));
    let child = std::process::Command::new("gearmand")
        .args(["--listen", "127.0.0.1", "--port", &port.to_string(), "--threads=0", "--log-file", "none"])
        .arg(format!("--pid-file={}", pid_file.display()))
        .spawn()
        .expect("gearmand (Debian gearman-job-server) is installed");
    let addr = format!("127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "gearmand does not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (addr, Proc(child))
}
