//! TLS on the Gearman port and the access list, with OpenStack's `gear` (PyPI, the TLS
//! Gearman client that Debian's libgearman is not) as client and worker, the `gearman` and
//! `gearadmin` tools on plaintext ports, and raw sockets for what no client would send.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::certs::Certs;
use common::gear::Conn;
use common::{admin, wait_for, ChildGuard, Server};
use gearbox_proto::{Decoder, Message, Request, Response};

const GEAR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/gear_tls.py");

/// The Python with `gear` installed (the test command makes a venv for it).
fn python() -> String {
    std::env::var("GEARBOX_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

type Identity = (PathBuf, PathBuf);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `gear` submits one job over TLS as `who`; its output and exit status.
fn gear_submit(addr: SocketAddr, who: &Identity, ca: &Path, function: &str, payload: &str, background: bool) -> Output {
    let port = addr.port().to_string();
    let mut args = vec![GEAR, "submit", "127.0.0.1", &port, s(&who.0), s(&who.1), s(ca), function, payload];
    if background {
        args.push("background");
    }
    let out = Command::new("timeout").arg("30").arg(python()).args(&args).output().expect("run python");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'gear'"),
        "gear is not installed (the README's test command installs it)"
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A `gear` worker over TLS as `who`, registered once this returns; its output lines.
fn gear_worker(addr: SocketAddr, who: &Identity, ca: &Path, functions: &[&str]) -> (ChildGuard, Receiver<String>) {
    let port = addr.port().to_string();
    let mut child = Command::new(python())
        .args([GEAR, "worker", "127.0.0.1", &port, s(&who.0), s(&who.1), s(ca)])
        .args(functions)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let guard = ChildGuard(child);
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)).expect("the gear worker registers"), "ready");
    (guard, rx)
}

/// The server's workers listing has a line with `function`.
fn registered(server: &Server, function: &str) -> bool {
    admin(server.addr, "workers")
        .lines()
        .any(|l| l.split(':').nth(1).is_some_and(|f| f.split_whitespace().any(|w| w == function)))
}

fn tls_server(certs: &Certs, extra: &[&str]) -> Server {
    let flags = certs.server_flags();
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Reads everything until the peer closes (failing after `within`); what was read.
fn read_to_close(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let started = Instant::now();
    stream.set_read_timeout(Some(within)).unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("not closed within {within:?}: {e}"),
        }
    }
    assert!(started.elapsed() < within, "closed only after {:?}", started.elapsed());
    all
}

#[test]
fn gear_client_and_worker_run_jobs_over_tls() {
    let certs = Certs::new();
    let server = tls_server(&certs, &["--ssl"]);
    let (worker, client) = (certs.client("resizer"), certs.client("web"));
    let (_w, ran) = gear_worker(server.addr, &worker, &certs.ca, &["reverse"]);

    let out = gear_submit(server.addr, &client, &certs.ca, "reverse", "hello tls", false);
    assert_eq!(stdout(&out), "result slt olleh", "{out:?}");
    let out = gear_submit(server.addr, &client, &certs.ca, "reverse", "in the background", true);
    assert!(stdout(&out).starts_with("queued H:"), "{out:?}");
    let mut seen = Vec::new();
    while !seen.contains(&"ran reverse in the background".to_string()) {
        seen.push(ran.recv_timeout(Duration::from_secs(10)).expect("the background job runs"));
    }
}

#[test]
fn plaintext_on_a_tls_port_is_told_and_closed_while_others_go_on() {
    let certs = Certs::new();
    let server = tls_server(&certs, &["--ssl-port", "0"]);
    let tls = server.tls.unwrap();
    let (worker, client) = (certs.client("resizer"), certs.client("web"));
    let (_w, _ran) = gear_worker(tls, &worker, &certs.ca, &["reverse"]);

    // A binary client gets an ERROR packet it can read, then the connection closes.
    let mut stream = TcpStream::connect(tls).unwrap();
    let mut out = BytesMut::new();
    Request::EchoReq { data: "plain".into() }.encode(&mut out);
    stream.write_all(&out).unwrap();
    let mut reply = BytesMut::from(&read_to_close(&mut stream, Duration::from_secs(1))[..]);
    match Decoder::default().decode(&mut reply).unwrap() {
        Some(Message::Packet(frame)) => match Response::parse(&frame).unwrap() {
            Response::Error { code, .. } => assert_eq!(&code[..], b"TLS_REQUIRED"),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    // An admin line gets an admin error.
    let mut stream = TcpStream::connect(tls).unwrap();
    stream.write_all(b"status\n").unwrap();
    let reply = read_to_close(&mut stream, Duration::from_secs(1));
    assert!(reply.starts_with(b"ERR TLS_REQUIRED"), "{}", String::from_utf8_lossy(&reply));
    // The real gearman tool fails instead of hanging.
    let out = common::run_tool("gearman", &["-h", "127.0.0.1", "-p", &tls.port().to_string(), "-f", "reverse", "x"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains('x'), "{out:?}");

    // Meanwhile TLS clients and the plaintext port work.
    let out = gear_submit(tls, &client, &certs.ca, "reverse", "abc", false);
    assert_eq!(stdout(&out), "result cba", "{out:?}");
    let out = server.gearman(&["-f", "reverse", "plain"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "nialp", "{out:?}");
    assert!(!server.logged("action=\"tls_handshake\"").is_empty());
}

#[test]
fn a_certificate_from_another_ca_is_refused_while_others_go_on() {
    let certs = Certs::new();
    let server = tls_server(&certs, &["--ssl"]);
    let (_w, _ran) = gear_worker(server.addr, &certs.client("resizer"), &certs.ca, &["reverse"]);

    let out = gear_submit(server.addr, &certs.foreign_client("mallory"), &certs.ca, "reverse", "x", false);
    assert!(!out.status.success() && !stdout(&out).contains("result"), "{out:?}");
    wait_for("the refused handshake to be logged", || {
        server.logged("action=\"tls_handshake\"").iter().any(|l| l.contains("peer=\"127.0.0.1:"))
    });
    let out = gear_submit(server.addr, &certs.client("web"), &certs.ca, "reverse", "ok", false);
    assert_eq!(stdout(&out), "result ko", "{out:?}");
}

#[test]
fn a_tls_client_hello_on_a_plaintext_port_is_closed_while_others_go_on() {
    let certs = Certs::new();
    let server = tls_server(&certs, &["--ssl-port", "0"]);
    let _worker = server.spawn_gearman(&["-w", "-f", "reverse", "--", "rev"]);
    wait_for("the gearman worker", || registered(&server, "reverse"));

    // gear speaking TLS to the plaintext port: refused, and nothing reaches the broker.
    let out = gear_submit(server.addr, &certs.client("web"), &certs.ca, "reverse", "x", false);
    assert!(!out.status.success(), "{out:?}");
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00]).unwrap();
    assert!(read_to_close(&mut stream, Duration::from_secs(1)).is_empty());
    assert!(!server.logged("action=\"tls_on_plaintext_port\"").is_empty());

    let mut conn = Conn::connect(server.addr).unwrap();
    assert!(conn.submit_background("reverse", "", "still here").is_ok());
}

const ACL: &str = r#"
[identity.web]
submit = ["reverse", "mail.*"]
admin = "read"

[identity.resizer]
work = ["reverse"]

[identity.deploy]
tokens = ["sha256:TOKEN_HASH"]
submit = ["*"]
admin = "write"

[identity.anonymous]
admin = "read"
"#;

const TOKEN: &str = "gbx_test_token_0123456789abcdef";

fn write_acl(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("acl.toml");
    let hash = gearbox_server::security::acl::token_hash(TOKEN.as_bytes());
    std::fs::write(&path, text.replace("TOKEN_HASH", &hash)).unwrap();
    path
}

#[test]
fn the_acl_allows_and_denies_submissions_workers_and_admin_commands() {
    let certs = Certs::new();
    let acl = write_acl(&certs.dir, ACL);
    let server = tls_server(&certs, &["--ssl-port", "0", "--acl", s(&acl)]);
    let tls = server.tls.unwrap();
    let (web, resizer) = (certs.client("web"), certs.client("resizer"));

    // CAN_DO: the worker may register reverse, not payments (ignored, and logged).
    let (_w, _ran) = gear_worker(tls, &resizer, &certs.ca, &["reverse", "payments"]);
    wait_for("the worker's CAN_DO reverse", || registered(&server, "reverse"));
    assert!(!registered(&server, "payments"));
    wait_for("the refused CAN_DO logged", || {
        server.logged("action=\"work\"").iter().any(|l| l.contains("identity=\"resizer\"") && l.contains("payments"))
    });

    // Submissions: web may submit reverse, not payments; someone the ACL does not name, nothing.
    assert_eq!(stdout(&gear_submit(tls, &web, &certs.ca, "reverse", "acl", false)), "result lca");
    let out = gear_submit(tls, &web, &certs.ca, "payments", "x", false);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(stdout(&out), "refused PERMISSION_DENIED web may not submit payments");
    let out = gear_submit(tls, &certs.client("stranger"), &certs.ca, "reverse", "x", false);
    assert!(stdout(&out).starts_with("refused PERMISSION_DENIED stranger"), "{out:?}");

    // Anonymous (the plaintext port, the gearman tool): admin read, no submissions.
    let out = server.gearman(&["-f", "reverse", "anon"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("nona"), "{out:?}");
    assert!(server.gearadmin(&["--status"]).contains("reverse"));
    let reply = admin(server.addr, "cancel job H:nowhere:1");
    assert!(reply.starts_with("ERR PERMISSION_DENIED anonymous+may+not"), "{reply}");
    let reply = admin(server.addr, "pause reverse");
    assert!(reply.starts_with("ERR PERMISSION_DENIED"), "{reply}");

    // A token: OPTION_REQ auth=TOKEN makes the connection `deploy`.
    let mut conn = Conn::connect(server.addr).unwrap();
    conn.send(&Request::OptionReq { option: "auth=wrong-token".into() }).unwrap();
    match conn.recv(Duration::from_secs(5)).unwrap() {
        Some(Response::Error { code, .. }) => assert_eq!(&code[..], b"PERMISSION_DENIED"),
        other => panic!("{other:?}"),
    }
    assert!(conn.submit_background("payments", "", "x").unwrap_err().starts_with("PERMISSION_DENIED"));
    conn.send(&Request::OptionReq { option: format!("auth={TOKEN}").into() }).unwrap();
    match conn.recv(Duration::from_secs(5)).unwrap() {
        Some(Response::OptionRes { option }) => assert_eq!(&option[..], b"auth"),
        other => panic!("{other:?}"),
    }
    assert!(conn.submit_background("payments", "", "x").unwrap().starts_with("H:"));

    for action in ["submit", "work", "admin", "token"] {
        assert!(!server.logged(&format!("action=\"{action}\"")).is_empty(), "{action} refusals are logged");
    }
}

#[test]
fn a_reload_takes_rights_back_from_open_connections() {
    let dir = common::temp_data_dir().with_extension("acl");
    std::fs::create_dir_all(&dir).unwrap();
    let open = "[identity.anonymous]\nwork = [\"reverse\"]\nsubmit = [\"reverse\"]\nadmin = \"read\"\n\n\
                [identity.deploy]\ntokens = [\"sha256:TOKEN_HASH\"]\nsubmit = [\"*\"]\n";
    let acl = write_acl(&dir, open);
    let server = Server::start(&["--acl", s(&acl)]);
    let mut worker = Conn::connect(server.addr).unwrap();
    worker.send(&Request::CanDo { function: "reverse".into() }).unwrap();
    let mut deploy = Conn::connect(server.addr).unwrap();
    deploy.send(&Request::OptionReq { option: format!("auth={TOKEN}").into() }).unwrap();
    assert!(matches!(deploy.recv(Duration::from_secs(5)).unwrap(), Some(Response::OptionRes { .. })));
    assert!(deploy.submit_background("payments", "", "x").unwrap().starts_with("H:"));
    wait_for("the worker's CAN_DO", || registered(&server, "reverse"));

    // The token is gone and anonymous may no longer work on reverse.
    write_acl(&dir, &open.replace("work = [\"reverse\"]\n", "").replace("TOKEN_HASH", &"0".repeat(64)));
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    wait_for("the reload", || !server.logged("reloaded the ACL").is_empty());
    let refused = deploy.submit_background("payments", "", "y").unwrap_err();
    assert!(refused.starts_with("PERMISSION_DENIED anonymous may not submit payments"), "{refused}");
    assert!(deploy.submit_background("reverse", "", "queued").unwrap().starts_with("H:"));
    // The idle worker's registration is taken back at the reload: no job reaches it.
    wait_for("the worker's registration taken back", || !registered(&server, "reverse"));
    worker.send(&Request::GrabJob(gearbox_proto::GrabKind::Plain)).unwrap();
    assert!(matches!(worker.recv(Duration::from_secs(5)).unwrap(), Some(Response::NoJob)));
    assert!(!server.logged("token is no longer in the ACL").is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_token_sent_to_a_server_without_an_acl_is_not_taken() {
    let server = Server::start(&[]);
    let mut conn = Conn::connect(server.addr).unwrap();
    conn.send(&Request::OptionReq { option: format!("auth={TOKEN}").into() }).unwrap();
    match conn.recv(Duration::from_secs(5)).unwrap() {
        Some(Response::Error { code, text }) => {
            assert_eq!(&code[..], b"UNKNOWN_OPTION");
            assert!(String::from_utf8_lossy(&text).contains("--acl"));
        }
        other => panic!("{other:?}"),
    }
}

/// The subject of the certificate the server presents on `addr`, as openssl prints it.
fn served_subject(addr: SocketAddr, certs: &Certs, who: &Identity) -> String {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-CAfile", s(&certs.ca)])
        .args(["-cert", s(&who.0), "-key", s(&who.1)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is installed");
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find(|l| l.starts_with("subject=")).unwrap_or_default().to_string()
}

#[test]
fn sighup_reloads_the_certificate_and_the_acl_without_dropping_connections() {
    let certs = Certs::new();
    let acl = write_acl(&certs.dir, ACL);
    let server = tls_server(&certs, &["--ssl", "--acl", s(&acl)]);
    let (web, resizer) = (certs.client("web"), certs.client("resizer"));
    let (_w, ran) = gear_worker(server.addr, &resizer, &certs.ca, &["reverse"]);
    assert!(served_subject(server.addr, &certs, &web).contains("gearbox"));
    let out = gear_submit(server.addr, &web, &certs.ca, "payments", "x", false);
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    certs.replace_server_cert("gearbox-renewed");
    write_acl(&certs.dir, &ACL.replace(r#"submit = ["reverse", "mail.*"]"#, r#"submit = ["reverse", "payments"]"#));
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    wait_for("the reload", || server.logged("reloaded the ACL").len() == 1);
    assert_eq!(server.logged("reloaded the TLS certificate").len(), 1);

    assert!(served_subject(server.addr, &certs, &web).contains("gearbox-renewed"));
    // The worker connected before the reload still takes jobs.
    let out = gear_submit(server.addr, &web, &certs.ca, "reverse", "after", false);
    assert_eq!(stdout(&out), "result retfa", "{out:?}");
    assert!(ran.try_iter().any(|l| l == "ran reverse after"));
    // And web may now submit payments (no worker: background).
    let out = gear_submit(server.addr, &web, &certs.ca, "payments", "x", true);
    assert!(stdout(&out).starts_with("queued H:"), "{out:?}");

    // A broken ACL on the next reload is reported, and the last good one stays.
    std::fs::write(&acl, "[identity.web\n").unwrap();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    wait_for("the failed reload", || !server.logged("ACL reload failed").is_empty());
    let out = gear_submit(server.addr, &web, &certs.ca, "payments", "y", true);
    assert!(stdout(&out).starts_with("queued H:"), "{out:?}");
}

#[test]
fn bad_tls_settings_stop_the_server_at_start_with_a_clear_error() {
    let certs = Certs::new();
    let starts = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_gearbox"))
            .args(["server", "--listen", "127.0.0.1", "--port", "0", "--http", "off", "--queue", "memory"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = starts(&["--ssl"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs both --ssl-certificate and --ssl-key"), "{out:?}");
    let missing = certs.dir.join("nope.pem");
    let out = starts(&["--ssl", "--ssl-certificate", s(&missing), "--ssl-key", s(&certs.server_key)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.pem"), "{out:?}");
    let out = starts(&["--ssl", "--ssl-certificate", s(&certs.server_key), "--ssl-key", s(&certs.server_key)]);
    assert!(!out.status.success(), "{out:?}");
    let acl = certs.dir.join("bad-acl.toml");
    std::fs::write(&acl, "[identity.x]\ntokens = [\"plain\"]\n").unwrap();
    let out = starts(&["--acl", s(&acl)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("hashed"), "{out:?}");
}

/// An admin line over TLS without a client certificate (rustls); the reply, or the error
/// that ended the connection.
fn admin_without_certificate(addr: SocketAddr, certs: &Certs, line: &str) -> Result<String, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(&certs.ca).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(format!("{line}\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while !(reply.ends_with(b".\n") || (reply.starts_with(b"ERR") && reply.ends_with(b"\n"))) {
        match tls.read(&mut buf) {
            Ok(0) => return Err("closed".into()),
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

#[test]
fn optional_client_certificates_make_the_certificateless_anonymous() {
    let certs = Certs::new();
    let acl = write_acl(&certs.dir, ACL);
    let optional = tls_server(&certs, &["--ssl", "--ssl-verify-client", "optional", "--acl", s(&acl)]);
    let reply = admin_without_certificate(optional.addr, &certs, "status").unwrap();
    assert!(reply.ends_with(".\n"), "anonymous may read: {reply}");
    let reply = admin_without_certificate(optional.addr, &certs, "shutdown").unwrap();
    assert!(reply.starts_with("ERR PERMISSION_DENIED anonymous"), "{reply}");
    // The default with a CA file: a certificate is required.
    let required = tls_server(&certs, &["--ssl", "--acl", s(&acl)]);
    let err = admin_without_certificate(required.addr, &certs, "status").unwrap_err();
    assert!(err.contains("CertificateRequired") || err.contains("certificate"), "{err}");
}
