//! Malformed input closes at most the offending connection, quickly, and loses nothing.

mod common;

use std::time::{Duration, Instant};

use common::{b, Conn, TestServer};
use gearbox_proto::{Request, Response};

/// Sends `bytes`, then expects an ERROR (or ERR line) and a close within a second.
async fn expect_error_and_close(server: &TestServer, bytes: &[u8], expect: &str) {
    let mut c = server.conn().await;
    let started = Instant::now();
    c.send_raw(bytes).await;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(1), async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        loop {
            match c.stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("connection not closed within a second for {bytes:02x?}"));
    assert!(started.elapsed() < Duration::from_secs(1));
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains(expect), "expected {expect:?} in {text:?}");
}

#[tokio::test]
async fn framing_errors_close_only_that_connection() {
    let server = TestServer::start().await;
    let mut client = server.conn().await;
    let queued = client.submit("f", "keep-me", "precious", true).await;
    let mut bystander = server.conn().await;

    expect_error_and_close(&server, b"\0XYZ\0\0\0\x01\0\0\0\0", "INVALID_MAGIC").await;
    expect_error_and_close(&server, b"\0REQ\0\0\0\x63", "INVALID_COMMAND").await;
    // A length header past the limit is refused before the body arrives.
    expect_error_and_close(&server, b"\0REQ\0\0\0\x07\x7f\xff\xff\xff", "ARGUMENT_TOO_LARGE").await;
    expect_error_and_close(&server, &vec![b'x'; 9000], "ERR LINE_TOO_LONG").await;

    bystander.send(Request::EchoReq { data: b("alive") }).await;
    assert_eq!(bystander.recv().await, Response::EchoRes { data: b("alive") });
    let mut worker = Conn::worker(server.addr, &["f"]).await;
    let (h, _, unique, data) = worker.grab_some().await;
    assert_eq!((h, &unique[..], &data[..]), (queued, &b"keep-me"[..], &b"precious"[..]));
}

#[tokio::test]
async fn malformed_arguments_get_an_error_and_the_connection_goes_on() {
    let server = TestServer::start().await;
    let mut c = server.conn().await;
    // SUBMIT_JOB with one argument instead of three.
    c.send_raw(b"\0REQ\0\0\0\x07\0\0\0\x02fn").await;
    assert!(matches!(c.recv().await, Response::Error { code, .. } if code == "INVALID_PACKET"));
    // A response packet sent to the server.
    c.send_raw(b"\0RES\0\0\0\x06\0\0\0\0").await;
    assert!(matches!(c.recv().await, Response::Error { .. }));
    // An over-long unique key.
    let long = "u".repeat(300);
    c.send(Request::SubmitJob {
        function: b("f"),
        unique: b(&long),
        data: b(""),
        priority: gearbox_proto::Priority::Normal,
        background: true,
    })
    .await;
    assert!(matches!(c.recv().await, Response::Error { code, .. } if code == "ARGUMENT_TOO_LARGE"));
    assert_eq!(c.admin("").await, "ERR UNKNOWN_COMMAND Unknown+server+commandNULL\r\n");
    c.send(Request::EchoReq { data: b("ok") }).await;
    assert_eq!(c.recv().await, Response::EchoRes { data: b("ok") });
}

#[tokio::test]
async fn a_stalled_partial_packet_does_not_hold_up_others() {
    let server = TestServer::start().await;
    let mut stalled = server.conn().await;
    // Half a header, then nothing.
    stalled.send_raw(b"\0REQ\0\0").await;
    let mut other = server.conn().await;
    let h = other.submit("f", "", "x", true).await;
    let mut worker = Conn::worker(server.addr, &["f"]).await;
    assert_eq!(worker.grab_some().await.0, h);
    // The stalled connection can still finish its packet.
    stalled.send_raw(b"\0\x10\0\0\0\x02hi").await;
    assert_eq!(stalled.recv().await, Response::EchoRes { data: b("hi") });
}

#[tokio::test]
async fn packets_split_across_many_writes_decode() {
    let server = TestServer::start().await;
    let mut c = server.conn().await;
    let mut bytes = bytes::BytesMut::new();
    for i in 0..50 {
        Request::EchoReq { data: b(&format!("echo-{i}")) }.encode(&mut bytes);
    }
    for chunk in bytes.chunks(7) {
        c.send_raw(chunk).await;
    }
    for i in 0..50 {
        assert_eq!(c.recv().await, Response::EchoRes { data: b(&format!("echo-{i}")) });
    }
}

#[tokio::test]
async fn a_client_that_never_reads_is_cut_off_without_stalling_others() {
    let mut options = gearbox_server::ServeOptions::default();
    options.broker.max_outbox = 4 * 1024 * 1024;
    let server = TestServer::with(options).await;
    let mut deaf = server.conn().await;
    let handle = deaf.submit("stream", "", "", false).await;
    let mut worker = Conn::worker(server.addr, &["stream"]).await;
    let (h, ..) = worker.grab_some().await;
    assert_eq!(h, handle);
    // Far more partial results than the deaf client's socket buffers and outbox can hold.
    let chunk = b(&"d".repeat(256 * 1024));
    for _ in 0..100 {
        worker.send(Request::WorkData { handle: h.clone(), data: chunk.clone() }).await;
    }
    worker.send(Request::EchoReq { data: b("worker still served") }).await;
    assert_eq!(worker.recv().await, Response::EchoRes { data: b("worker still served") });
    let mut other = server.conn().await;
    other.send(Request::EchoReq { data: b("others too") }).await;
    assert_eq!(other.recv().await, Response::EchoRes { data: b("others too") });
    // The deaf client's connection was closed: draining it ends in EOF, well short of 25 MB.
    let mut received = 0usize;
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match deaf.stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the connection was not closed");
    assert!(received < 20 * 1024 * 1024, "received {received} bytes");
}
