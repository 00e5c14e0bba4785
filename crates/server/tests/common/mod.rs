//! A server on an ephemeral port and a raw protocol connection to drive it.
#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use gearbox_proto::{Decoder, Message, Request, Response};
use gearbox_server::ServeOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub const DEADLINE: Duration = Duration::from_secs(5);

pub struct TestServer {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), gearbox_server::ServeError>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::with(ServeOptions::default()).await
    }

    pub async fn with(options: ServeOptions) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(gearbox_server::serve(vec![listener], None, options, shutdown.clone()));
        let server = TestServer { addr, shutdown, task };
        // Ready once it answers: a durable store is open and loaded by then.
        let mut probe = server.conn().await;
        probe.send(Request::EchoReq { data: b("ready") }).await;
        assert_eq!(probe.recv().await, Response::EchoRes { data: b("ready") });
        server
    }

    /// Stops the server (as on SIGTERM) and waits until it has.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
        task.await.unwrap().unwrap();
    }

    pub async fn conn(&self) -> Conn {
        Conn::connect(self.addr).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub struct Conn {
    pub stream: TcpStream,
    buf: BytesMut,
}

pub fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Conn { stream, buf: BytesMut::new() }
    }

    pub async fn send(&mut self, req: Request) {
        let mut out = BytesMut::new();
        req.encode(&mut out);
        self.stream.write_all(&out).await.unwrap();
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next response, or a panic after the deadline.
    pub async fn recv(&mut self) -> Response {
        tokio::time::timeout(DEADLINE, self.try_recv()).await.expect("no response in time").expect("connection closed")
    }

    /// The next response, or None if the server closed the connection.
    pub async fn try_recv(&mut self) -> Option<Response> {
        loop {
            if let Some(Message::Packet(f)) = Decoder::default().decode(&mut self.buf).unwrap() {
                return Some(Response::parse(&f).unwrap());
            }
            if self.stream.read_buf(&mut self.buf).await.ok()? == 0 {
                return None;
            }
        }
    }

    /// Asserts nothing arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Ok(r) = tokio::time::timeout(wait, self.try_recv()).await {
            panic!("expected no packet, got {r:?}");
        }
    }

    /// Sends an admin line and returns the reply: one `OK`/`ERR` line, or a listing up to
    /// its closing ".".
    pub async fn admin(&mut self, line: &str) -> String {
        self.send_raw(format!("{line}\n").as_bytes()).await;
        tokio::time::timeout(DEADLINE, async {
            loop {
                let text = String::from_utf8_lossy(&self.buf).into_owned();
                let single = text.starts_with("OK") || text.starts_with("ERR");
                let done = if single { text.ends_with('\n') } else { text == ".\n" || text.ends_with("\n.\n") };
                if done && !text.is_empty() {
                    self.buf.clear();
                    return text;
                }
                if self.stream.read_buf(&mut self.buf).await.unwrap() == 0 {
                    panic!("closed while waiting for admin reply; got {text:?}");
                }
            }
        })
        .await
        .expect("no admin reply in time")
    }

    /// Submits a job and returns its handle.
    pub async fn submit(&mut self, function: &str, unique: &str, data: &str, background: bool) -> Bytes {
        self.submit_prio(function, unique, data, gearbox_proto::Priority::Normal, background).await
    }

    pub async fn submit_prio(
        &mut self,
        function: &str,
        unique: &str,
        data: &str,
        priority: gearbox_proto::Priority,
        background: bool,
    ) -> Bytes {
        self.send(Request::SubmitJob { function: b(function), unique: b(unique), data: b(data), priority, background })
            .await;
        match self.recv().await {
            Response::JobCreated { handle } => handle,
            other => panic!("expected JOB_CREATED, got {other:?}"),
        }
    }

    /// A worker connection registered for `functions`.
    pub async fn worker(addr: SocketAddr, functions: &[&str]) -> Conn {
        let mut w = Conn::connect(addr).await;
        for f in functions {
            w.send(Request::CanDo { function: b(f) }).await;
        }
        w
    }

    /// GRAB_JOB_UNIQ; returns (handle, function, unique, data) or None on NO_JOB.
    pub async fn grab(&mut self) -> Option<(Bytes, Bytes, Bytes, Bytes)> {
        self.send(Request::GrabJob(gearbox_proto::GrabKind::Uniq)).await;
        match self.recv().await {
            Response::JobAssignUniq { handle, function, unique, data } => Some((handle, function, unique, data)),
            Response::NoJob => None,
            other => panic!("expected a job or NO_JOB, got {other:?}"),
        }
    }

    /// Repeats an admin command until its reply is `expected`, or panics after the deadline.
    pub async fn admin_until(&mut self, line: &str, expected: &str) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let reply = self.admin(line).await;
            if reply == expected {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{line:?} still answers {reply:?}, not {expected:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn grab_some(&mut self) -> (Bytes, Bytes, Bytes, Bytes) {
        self.grab().await.expect("a job is queued")
    }
}
