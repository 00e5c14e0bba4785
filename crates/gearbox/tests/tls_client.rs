//! The client side of TLS and tokens: gearbox's client and worker library, its CLI (`submit`,
//! `work`, `admin`, `token`) and `gearbox bench`, against the server binary; and gearmand,
//! which takes no tokens.

mod common;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::certs::Certs;
use common::{wait_for, ChildGuard, Server};
use gearbox_client::worker::{JobError, Worker};
use gearbox_client::{Client, Error, Job, Tls};

/// The variables the client commands read, removed from every command run here.
const CLIENT_VARIABLES: [&str; 6] = [
    "GEARBOX_SERVERS",
    "GEARBOX_SSL",
    "GEARBOX_TOKEN",
    "GEARMAN_CA_CERTIFICATE",
    "GEARMAN_CLIENT_PEM",
    "GEARMAN_CLIENT_KEY",
];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `gearbox ARGS` with these variables (and none other of [`CLIENT_VARIABLES`]), killed
/// after 30 s.
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new("timeout");
    command.arg("30").arg(env!("CARGO_BIN_EXE_gearbox")).args(args);
    for var in CLIENT_VARIABLES {
        command.env_remove(var);
    }
    command.envs(env.iter().copied()).env("RUST_BACKTRACE", "0");
    command
}

fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(args, env).stdin(Stdio::null()).output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// Runs `f` on a runtime of its own.
fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

fn tls_server(certs: &Certs, extra: &[&str]) -> Server {
    let flags = certs.server_flags();
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// TLS trusting the test CA, presenting a certificate with subject CN `who`.
fn tls_as(certs: &Certs, who: &str) -> Tls {
    let (certificate, key) = certs.client(who);
    Tls::builder().ca_file(&certs.ca).client_certificate(certificate, key).build().unwrap()
}

fn write_acl(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("acl.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A worker serving `reverse` until the returned sender is dropped or fired.
fn reverse_worker(worker: Worker) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = worker.register("reverse", |job| async move {
        let mut data = job.payload().to_vec();
        data.reverse();
        Ok::<_, JobError>(data.into())
    });
    (stop, tokio::spawn(worker.run(stopped)))
}

#[test]
fn client_and_worker_run_jobs_over_tls_as_their_certificates_identities() {
    let certs = Certs::new();
    let acl =
        write_acl(&certs.dir, "[identity.web]\nsubmit = [\"reverse\"]\n[identity.resizer]\nwork = [\"reverse\"]\n");
    let server = tls_server(&certs, &["--ssl", "--acl", s(&acl)]);
    let addr = server.addr.to_string();
    block_on(async {
        let (stop, worker) = reverse_worker(Worker::new([&addr]).with_tls(tls_as(&certs, "resizer")));
        let client = Client::new([&addr]).with_tls(tls_as(&certs, "web")).with_timeout(Duration::from_secs(20));
        let result = client.run(Job::new("reverse", "hello tls")).await.unwrap();
        assert_eq!(&result[..], b"slt olleh");

        let handle = client.submit_background(Job::new("reverse", "in the background")).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.status(&handle).await.unwrap().known {
            assert!(Instant::now() < deadline, "the background job never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // The identity is the certificate's: the worker's may not submit.
        let resizer = Client::new([&addr]).with_tls(tls_as(&certs, "resizer"));
        match resizer.submit_background(Job::new("reverse", "x")).await {
            Err(Error::Server { code, text }) => {
                assert_eq!(code, "PERMISSION_DENIED");
                assert_eq!(text, "resizer may not submit reverse");
            }
            other => panic!("expected PERMISSION_DENIED, got {other:?}"),
        }
        stop.send(()).unwrap();
        worker.await.unwrap();
    });
}

#[test]
fn the_client_says_why_a_tls_connection_failed() {
    let certs = Certs::new();
    let server = tls_server(&certs, &["--ssl-port", "0"]);
    let (plain, tls) = (server.addr.to_string(), server.tls.unwrap().to_string());
    let foreign_ca = certs.foreign_ca();
    let (stranger_cert, stranger_key) = certs.foreign_client("stranger");
    let fails = |client: Client| block_on(async move { client.echo("x").await.unwrap_err() });
    let tls_reason = |e: Error| match e {
        Error::Tls { server, reason } => {
            assert_eq!(server, tls);
            reason
        }
        other => panic!("expected a TLS error, got {other:?}"),
    };

    // A server whose certificate another CA signed.
    let tls_trusting = |ca: &Path| Tls::builder().ca_file(ca);
    let (web_cert, web_key) = certs.client("web");
    let e = fails(
        Client::new([&tls])
            .with_tls(tls_trusting(&foreign_ca).client_certificate(&web_cert, &web_key).build().unwrap()),
    );
    let reason = tls_reason(e);
    assert!(reason.starts_with(&format!("the server's certificate is not signed by a CA in {}", s(&foreign_ca))));

    // No client certificate, or one from a CA the server does not trust.
    let reason = tls_reason(fails(Client::new([&tls]).with_tls(tls_trusting(&certs.ca).build().unwrap())));
    assert!(reason.starts_with("the server wants a client certificate, and none was given"), "{reason}");
    let stranger = tls_trusting(&certs.ca).client_certificate(&stranger_cert, &stranger_key).build().unwrap();
    let reason = tls_reason(fails(Client::new([&tls]).with_tls(stranger)));
    assert!(reason.starts_with(&format!("the server refused the client certificate {}", s(&stranger_cert))));

    // The certificate holds 127.0.0.1 and localhost, not another name.
    let named =
        |name: &str| tls_trusting(&certs.ca).client_certificate(&web_cert, &web_key).server_name(name).build().unwrap();
    let reason = tls_reason(fails(Client::new([&tls]).with_tls(named("jobs.example.com"))));
    assert!(reason.contains("not valid for name \"jobs.example.com\""), "{reason}");
    let client = Client::new([&tls]).with_tls(named("localhost"));
    assert_eq!(&block_on(client.echo("named")).unwrap()[..], b"named");

    // TLS to the plaintext port, plaintext to the TLS port.
    let e = fails(Client::new([&plain]).with_tls(named("localhost")));
    match e {
        Error::Tls { reason, .. } => assert!(reason.contains("is it a plaintext port?"), "{reason}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    match fails(Client::new([&tls])) {
        Error::Server { code, .. } => assert_eq!(code, "TLS_REQUIRED"),
        other => panic!("expected TLS_REQUIRED, got {other:?}"),
    }
}

#[test]
fn cli_submit_work_and_admin_over_tls_with_gearman_variables() {
    let certs = Certs::new();
    let server = tls_server(&certs, &["--ssl-port", "0"]);
    let tls = server.tls.unwrap().to_string();
    let (web_cert, web_key) = certs.client("web");
    let (resizer_cert, resizer_key) = certs.client("resizer");
    let as_web = [
        ("GEARMAN_CA_CERTIFICATE", s(&certs.ca)),
        ("GEARMAN_CLIENT_PEM", s(&web_cert)),
        ("GEARMAN_CLIENT_KEY", s(&web_key)),
    ];
    let as_resizer = [
        ("GEARMAN_CA_CERTIFICATE", s(&certs.ca)),
        ("GEARMAN_CLIENT_PEM", s(&resizer_cert)),
        ("GEARMAN_CLIENT_KEY", s(&resizer_key)),
    ];

    // A worker for one job, and a foreground submission it answers.
    let work_args = ["work", "-s", &tls, "--ssl", "-f", "upper", "-c", "1", "--", "tr", "a-z", "A-Z"];
    let mut worker = ChildGuard(command(&work_args, &as_resizer).stdin(Stdio::null()).spawn().unwrap());
    let out = cli(&["submit", "-s", &tls, "--ssl", "-f", "upper", "over tls"], &as_web);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "OVER TLS");
    let mut exited = None;
    wait_for("gearbox work to exit after its one job", || {
        exited = worker.0.try_wait().unwrap();
        exited.is_some()
    });
    assert!(exited.unwrap().success());

    // A background job, seen by `admin status`; GEARBOX_SSL=1 stands for --ssl.
    let out = cli(&["submit", "-s", &tls, "--ssl", "-b", "-f", "later", "x"], &as_web);
    assert!(out.status.success() && stdout(&out).starts_with("H:"), "{out:?}");
    let env = [&as_web[..], &[("GEARBOX_SSL", "1")]].concat();
    let out = cli(&["admin", "status", "-s", &tls, "--json"], &env);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains(r#"{"function":"later","total":1,"running":0,"workers":0}"#), "{out:?}");

    // The GEARMAN_* variables alone do not turn TLS on (plaintext programs see them too).
    let out = cli(&["admin", "status", "-s", &tls], &as_web);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("speaks TLS on this port: add --ssl"), "{out:?}");
    let out = cli(&["submit", "-s", &tls, "-b", "-f", "later", "x"], &as_web);
    assert!(stderr(&out).contains("add --ssl: server error TLS_REQUIRED"), "{out:?}");

    // A flag implies --ssl; the CA of the command line wins over the variable.
    let foreign_ca = certs.foreign_ca();
    let out = cli(&["admin", "-s", &tls, "--ssl-ca-file", s(&foreign_ca), "status"], &as_web);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&format!("is not signed by a CA in {}", s(&foreign_ca))), "{out:?}");
    let out = cli(&["admin", "status", "-s", &tls, "--ssl-certificate", s(&web_cert)], &[]);
    assert!(stderr(&out).contains("needs its key: --ssl-key (or GEARMAN_CLIENT_KEY)"), "{out:?}");
}

/// `gearbox token`'s two lines: the token, and the access list's line with its hash.
fn new_token() -> (String, String) {
    let out = cli(&["token"], &[]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let mut lines = text.lines();
    (lines.next().unwrap().to_string(), lines.next().unwrap().to_string())
}

#[test]
fn tokens_from_gearbox_token_are_accepted_and_others_refused() {
    let (token, acl_line) = new_token();
    assert!(token.starts_with("gbx_") && token.len() == 68, "{token}");
    let hash = gearbox_server::security::acl::token_hash(token.as_bytes());
    assert_eq!(acl_line, format!("tokens = [\"sha256:{hash}\"]"));
    assert_ne!(new_token().0, token);
    let out = cli(&["token", "--hash", &token], &[]);
    assert_eq!(stdout(&out), format!("sha256:{hash}"));
    let mut piped = command(&["token", "--hash"], &[]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(piped.stdin.as_mut().unwrap(), format!("{token}\n").as_bytes()).unwrap();
    assert_eq!(stdout(&piped.wait_with_output().unwrap()), format!("sha256:{hash}"));

    let dir = common::temp_data_dir().with_extension("acl");
    std::fs::create_dir_all(&dir).unwrap();
    let acl = write_acl(&dir, &format!("[identity.deploy]\n{acl_line}\nsubmit = [\"deploy.*\"]\nadmin = \"read\"\n"));
    let server = Server::start(&["--acl", s(&acl)]);
    let addr = server.addr.to_string();

    let out = cli(&["submit", "-s", &addr, "--token", &token, "-b", "-f", "deploy.app", "v2"], &[]);
    assert!(out.status.success() && stdout(&out).starts_with("H:"), "{out:?}");
    let out = cli(&["admin", "status", "-s", &addr, "--json"], &[("GEARBOX_TOKEN", &token)]);
    assert!(stdout(&out).contains(r#"{"function":"deploy.app","total":1"#), "{out:?}");
    let out = cli(&["submit", "-s", &addr, "--token", &token, "-b", "-f", "payments", "x"], &[]);
    assert!(stderr(&out).contains("PERMISSION_DENIED: deploy may not submit payments"), "{out:?}");

    // A wrong token, and none.
    let wrong = ["-s", &addr, "--token", "gbx_wrong"];
    for args in
        [&["submit", "-b", "-f", "deploy.app", "x"][..], &["admin", "status"], &["work", "-f", "x", "--", "cat"]]
    {
        let out = cli(&[&args[..1], &wrong, &args[1..]].concat(), &[]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("PERMISSION_DENIED: unknown token"), "{args:?}: {out:?}");
    }
    let out = cli(&["submit", "-s", &addr, "-b", "-f", "deploy.app", "x"], &[]);
    assert!(stderr(&out).contains("anonymous may not submit deploy.app"), "{out:?}");

    // The library the same way.
    block_on(async {
        let client = Client::new([&addr]).with_token(token.clone());
        client.submit_background(Job::new("deploy.app", "v3")).await.unwrap();
        let wrong = Client::new([&addr]).with_token("gbx_wrong");
        match wrong.submit_background(Job::new("deploy.app", "v3")).await {
            Err(Error::Server { code, text }) => {
                assert_eq!((code.as_str(), text.as_str()), ("PERMISSION_DENIED", "unknown token"))
            }
            other => panic!("expected PERMISSION_DENIED, got {other:?}"),
        }
    });
    let out = cli(&["admin", "status", "-s", &addr, "--json"], &[("GEARBOX_TOKEN", &token)]);
    assert!(stdout(&out).contains(r#"{"function":"deploy.app","total":2"#), "{out:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_token_sent_to_gearmand_says_it_takes_no_tokens() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _gearmand = ChildGuard(
        Command::new("gearmand")
            .args(["--listen", "127.0.0.1", "--port", &port.to_string(), "--log-file", "none"])
            .spawn()
            .expect("gearmand (Debian gearman-job-server) is installed"),
    );
    wait_for("gearmand to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let addr = format!("127.0.0.1:{port}");
    let e = block_on(Client::new([&addr]).with_token("gbx_anything").echo("x")).unwrap_err();
    match e {
        Error::Server { code, text } => {
            assert_eq!(code, "UNKNOWN_OPTION");
            assert!(text.starts_with("this server does not take tokens"), "{text}");
        }
        other => panic!("expected UNKNOWN_OPTION, got {other:?}"),
    }
    let out = cli(&["admin", "status", "-s", &addr, "--token", "gbx_anything"], &[]);
    assert!(stderr(&out).contains("this server does not take tokens"), "{out:?}");
}

#[test]
fn bench_drives_a_tls_port() {
    let certs = Certs::new();
    let server = tls_server(&certs, &["--ssl-port", "0"]);
    let (cert, key) = certs.client("bench");
    let tls = server.tls.unwrap().to_string();
    let args = ["--ssl-ca-file", s(&certs.ca), "--ssl-certificate", s(&cert), "--ssl-key", s(&key)];
    let bench = |extra: &[&str]| cli(&[&["bench", "--server", &tls, "--jobs", "2000", "--json"], extra].concat(), &[]);
    let out = bench(&args);
    assert!(out.status.success(), "{out:?}");
    let json = stdout(&out);
    assert!(json.lines().last().unwrap().contains("\"completed\":2000"), "{json}");
    // Without its certificate the bench is refused before it starts.
    let out = bench(&args[..2]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("the server wants a client certificate"), "{out:?}");
}
