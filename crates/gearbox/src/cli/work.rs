//! `gearbox work`: runs a command for every job, like `gearman -w`.

use std::time::Duration;

use anyhow::{bail, Context};
use gearbox_client::Connector;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{explain, runtime, Servers};

#[derive(clap::Args)]
pub struct WorkArgs {
    #[command(flatten)]
    servers: Servers,
    /// Function to serve; repeat for several
    #[arg(short, long, required = true)]
    function: Vec<String>,
    /// Exit after this many jobs
    #[arg(short = 'c', long)]
    count: Option<u64>,
    /// Command run for each job: the payload on its standard input, its standard output the
    /// result; a non-zero exit fails the job (WORK_EXCEPTION, with the last 4 KiB of its
    /// standard error and the exit status)
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// `gearbox work`: runs a command for every job, like `gearman -w`. One connection per
/// server; a lost server is reconnected with backoff; SIGTERM or SIGINT stops taking jobs
/// after the one running. A server that refuses the connection (its token, or plaintext on
/// a TLS port) ends the command with the reason: trying again would not help.
pub fn work(args: WorkArgs) -> anyhow::Result<()> {
    let connector = std::sync::Arc::new(args.servers.connector()?);
    runtime()?.block_on(async {
        let args = std::sync::Arc::new(args);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        for server in args.servers.servers.clone() {
            let (args, connector, done, stop) = (args.clone(), connector.clone(), done.clone(), stop.clone());
            tasks.spawn(async move {
                let mut backoff = Duration::from_millis(100);
                while !stop.is_cancelled() {
                    match work_on(&server, &connector, &args, &done, &stop).await {
                        Ok(()) => return Ok(()),
                        // The server answered with a refusal.
                        Err(e) if matches!(e.downcast_ref(), Some(gearbox_client::Error::Server { .. })) => {
                            return Err(e.context(server));
                        }
                        Err(e) => eprintln!("gearbox work: {server}: {e:#}; reconnecting in {backoff:?}"),
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Ok(())
            });
        }
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
        let mut failure: Option<anyhow::Error> = None;
        let mut settle = |joined: Result<anyhow::Result<()>, tokio::task::JoinError>| {
            if let Ok(Err(e)) = joined {
                stop.cancel();
                failure.get_or_insert(e);
            }
        };
        tokio::select! {
            _ = term.recv() => stop.cancel(),
            _ = int.recv() => stop.cancel(),
            _ = async { while let Some(joined) = tasks.join_next().await { settle(joined) } } => {}
        }
        while let Some(joined) = tasks.join_next().await {
            settle(joined);
        }
        failure.map_or(Ok(()), Err)
    })
}

async fn work_on(
    server: &str,
    connector: &Connector,
    args: &WorkArgs,
    done: &std::sync::atomic::AtomicU64,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use gearbox_proto::{Decoder, GrabKind, Message, Request, Response};
    use std::sync::atomic::Ordering::Relaxed;
    let mut stream = connector.connect(server).await.map_err(explain)?;
    let mut out = bytes::BytesMut::new();
    for f in &args.function {
        Request::CanDo { function: f.clone().into() }.encode(&mut out);
    }
    Request::GrabJob(GrabKind::Uniq).encode(&mut out);
    stream.send(&out).await?;
    let mut buf = bytes::BytesMut::with_capacity(64 * 1024);
    loop {
        let frame = loop {
            if let Some(Message::Packet(f)) = Decoder::default().decode(&mut buf)? {
                break f;
            }
            let read = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                read = stream.read_buf(&mut buf) => read?,
            };
            if read == 0 {
                bail!("the server closed the connection");
            }
        };
        out.clear();
        match Response::parse(&frame)? {
            Response::NoJob => Request::PreSleep.encode(&mut out),
            Response::Noop => Request::GrabJob(GrabKind::Uniq).encode(&mut out),
            Response::JobAssignUniq { handle, data, .. } => {
                match run_command(&args.command, &data).await {
                    Ok(result) => Request::WorkComplete { handle, data: result.into() }.encode(&mut out),
                    Err(e) => {
                        // The command's standard error has been shown already: just the status here.
                        let why = format!("{e:#}");
                        let status = why.lines().last().unwrap_or_default().trim_matches(['(', ')']);
                        eprintln!("gearbox work: job {}: {status}", String::from_utf8_lossy(&handle));
                        // The reason reaches clients that asked for exceptions, and the job log;
                        // others see a plain WORK_FAIL.
                        Request::WorkException { handle, data: format!("{e:#}").into() }.encode(&mut out)
                    }
                }
                let n = done.fetch_add(1, Relaxed) + 1;
                if args.count.is_some_and(|c| n >= c) || stop.is_cancelled() {
                    stream.send(&out).await?;
                    stop.cancel();
                    return Ok(());
                }
                Request::GrabJob(GrabKind::Uniq).encode(&mut out);
            }
            Response::Error { code, text } => {
                bail!("server error {}: {}", String::from_utf8_lossy(&code), String::from_utf8_lossy(&text))
            }
            other => bail!("unexpected {other:?}"),
        }
        stream.send(&out).await?;
    }
}

/// How much of a failing command's standard error becomes the job's exception text.
const STDERR_TAIL: usize = 4096;

/// Runs the command with `payload` on its standard input; its standard output on success.
/// Its standard error passes through to ours; on failure the error carries its last 4 KiB.
async fn run_command(command: &[String], payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", command[0]))?;
    let mut stdin = child.stdin.take().expect("piped");
    let payload = payload.to_vec();
    // Feed stdin while reading stdout, so a large payload cannot deadlock the pipe.
    let feed = tokio::spawn(async move {
        let _ = stdin.write_all(&payload).await;
    });
    let stderr = tokio::spawn(stderr_tail(child.stderr.take().expect("piped")));
    let output = child.wait_with_output().await?;
    let _ = feed.await;
    let stderr = stderr.await.unwrap_or_default();
    if !output.status.success() {
        let tail = String::from_utf8_lossy(&stderr);
        let tail = tail.trim();
        if tail.is_empty() {
            bail!("{} exited with {}", command[0], output.status);
        }
        bail!("{tail}\n({} exited with {})", command[0], output.status);
    }
    Ok(output.stdout)
}

/// Copies a child's standard error to ours and returns its last [`STDERR_TAIL`] bytes.
async fn stderr_tail(mut from: tokio::process::ChildStderr) -> Vec<u8> {
    let mut tail = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut ours = tokio::io::stderr();
    while let Ok(n @ 1..) = from.read(&mut chunk).await {
        let _ = ours.write_all(&chunk[..n]).await;
        tail.extend_from_slice(&chunk[..n]);
        if tail.len() > 2 * STDERR_TAIL {
            tail.drain(..tail.len() - STDERR_TAIL);
        }
    }
    if tail.len() > STDERR_TAIL {
        tail.drain(..tail.len() - STDERR_TAIL);
        // Start at a character: skip the rest of one the cut went through.
        let continuation = tail.iter().take_while(|&&b| b & 0xC0 == 0x80).count();
        tail.drain(..continuation);
    }
    tail
}
