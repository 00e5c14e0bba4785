//! The everyday client commands: `gearbox submit` and `gearbox admin`.

use std::io::{BufRead, Read, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use gearbox_client::{Client, Job};
use gearbox_proto::Priority;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the client commands connect.
#[derive(clap::Args, Clone)]
pub struct Servers {
    /// Job server HOST:PORT; repeat (or comma-separate) for several
    #[arg(
        long = "server",
        short = 's',
        env = "GEARBOX_SERVERS",
        value_delimiter = ',',
        default_value = "127.0.0.1:4730"
    )]
    servers: Vec<String>,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum PriorityArg {
    High,
    Normal,
    Low,
}

#[derive(clap::Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    servers: Servers,
    /// Function to run
    #[arg(short, long)]
    function: String,
    /// Queue the job and return its handle instead of waiting for the result
    #[arg(short, long)]
    background: bool,
    #[arg(long, value_enum, default_value = "normal")]
    priority: PriorityArg,
    /// Unique key: jobs with the same key (per function) run once
    #[arg(short, long)]
    unique: Option<String>,
    /// Run a background job no earlier than this unix time
    #[arg(long, requires = "background")]
    at: Option<i64>,
    /// One job per line of standard input, many at a time; prints a summary
    #[arg(long)]
    bulk: bool,
    /// Payload; read from standard input when absent
    data: Option<String>,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

pub fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.servers.servers).with_timeout(Duration::from_secs(3600));
    let job = |payload: Vec<u8>| {
        let priority = match args.priority {
            PriorityArg::High => Priority::High,
            PriorityArg::Normal => Priority::Normal,
            PriorityArg::Low => Priority::Low,
        };
        let mut job = Job::new(args.function.clone(), payload).priority(priority);
        if let Some(u) = &args.unique {
            job = job.unique(u.clone());
        }
        if let Some(at) = args.at {
            job = job.at(at);
        }
        job
    };
    if args.bulk {
        let lines: Vec<Vec<u8>> = std::io::stdin().lock().split(b'\n').collect::<Result<_, _>>()?;
        return runtime()?.block_on(bulk(&client, lines.into_iter().map(job).collect(), args.background));
    }
    let payload = match args.data {
        Some(d) => d.into_bytes(),
        None => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            buf
        }
    };
    runtime()?.block_on(async {
        if args.background {
            let handle = client.submit_background(job(payload)).await?;
            println!("{}", String::from_utf8_lossy(handle.handle()));
        } else {
            let result = client.run(job(payload)).await?;
            std::io::stdout().write_all(&result)?;
        }
        Ok(())
    })
}

/// Submits many jobs, 64 at a time, with a progress line on standard error.
async fn bulk(client: &Client, jobs: Vec<Job>, background: bool) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let total = jobs.len();
    let (done, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let started = Instant::now();
    let queue = std::sync::Mutex::new(jobs.into_iter());
    let one = || async {
        loop {
            let Some(job) = queue.lock().unwrap().next() else { return };
            let ok =
                if background { client.submit_background(job).await.is_ok() } else { client.run(job).await.is_ok() };
            if !ok {
                failed.fetch_add(1, Relaxed);
            }
            let n = done.fetch_add(1, Relaxed) + 1;
            if n % 100 == 0 || n == total {
                let width = 30 * n / total.max(1);
                eprint!("\r[{}{}] {n}/{total}", "=".repeat(width), " ".repeat(30 - width));
            }
        }
    };
    let workers: Vec<_> = (0..64).map(|_| one()).collect();
    join_all(workers).await;
    let secs = started.elapsed().as_secs_f64();
    let failed = failed.load(Relaxed);
    eprintln!(
        "\n{total} jobs: {} ok, {failed} failed in {secs:.2}s ({:.0} jobs/s)",
        total - failed,
        total as f64 / secs
    );
    if failed > 0 {
        bail!("{failed} jobs failed");
    }
    Ok(())
}

/// Runs the futures concurrently on the current task until all are done. They borrow the
/// caller's state, so they are polled here rather than spawned.
async fn join_all<F: std::future::Future<Output = ()>>(futures: Vec<F>) {
    let mut pending: Vec<_> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        pending.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if pending.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

#[derive(clap::Subcommand, Clone)]
enum AdminCommand {
    /// Functions: queued, running, workers
    Status,
    /// Connections and the functions they can do
    Workers,
    /// Jobs on the server
    Jobs,
    /// Server version
    Version,
    /// Cancel a queued job
    Cancel { handle: String },
    /// Queue limits per function and priority (0: none). With FUNCTION, set its limits
    /// first: one LIMIT for every priority, or HIGH NORMAL LOW; none removes them
    Maxqueue {
        function: Option<String>,
        #[arg(requires = "function", num_args = 0..=3, allow_negative_numbers = true)]
        limits: Vec<i64>,
    },
    /// Counters: connections, jobs, job-log records written and dropped
    Stats,
}

#[derive(clap::Args)]
pub struct AdminArgs {
    #[command(flatten)]
    servers: Servers,
    /// Print JSON (one object per line) instead of a table
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

/// Sends one admin line and reads the reply (a single line, or a listing ending in ".").
async fn admin_line(server: &str, line: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(server).await.with_context(|| format!("connecting to {server}"))?;
    stream.write_all(format!("{line}\n").as_bytes()).await?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await??;
        if n == 0 {
            bail!("{server} closed the connection");
        }
        reply.extend_from_slice(&buf[..n]);
        let single = reply.starts_with(b"OK") || reply.starts_with(b"ERR");
        if (single && reply.ends_with(b"\n")) || reply == b".\n" || reply.ends_with(b"\n.\n") {
            return Ok(String::from_utf8_lossy(&reply).into_owned());
        }
    }
}

pub fn admin(args: AdminArgs) -> anyhow::Result<()> {
    let (line, columns): (String, &[&str]) = match &args.command {
        AdminCommand::Status => ("status".into(), &["function", "total", "running", "workers"]),
        AdminCommand::Workers => ("workers".into(), &["fd", "address", "client_id", "functions"]),
        AdminCommand::Jobs => ("show jobs".into(), &["handle", "retries", "ignored", "background"]),
        AdminCommand::Version => ("version".into(), &["version"]),
        AdminCommand::Cancel { handle } => return cancel(&args.servers, handle, args.json),
        AdminCommand::Maxqueue { function, limits } => {
            if let Some(function) = function {
                let limits: Vec<String> = limits.iter().map(i64::to_string).collect();
                set_max_queue(&args.servers, &format!("maxqueue {function} {}", limits.join(" ")))?;
            }
            ("maxqueue".into(), &["function", "high", "normal", "low"])
        }
        AdminCommand::Stats => ("stats".into(), &["name", "value"]),
    };
    let runtime = runtime()?;
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    for server in &args.servers.servers {
        let reply = runtime.block_on(admin_line(server, &line))?;
        if let Some(err) = reply.strip_prefix("ERR ") {
            bail!("{server}: {}", err.trim().replace('+', " "));
        }
        for l in reply.lines().filter(|l| *l != ".") {
            let fields: Vec<String> = match args.command {
                AdminCommand::Workers => {
                    let (head, functions) = l.split_once(" :").unwrap_or((l, ""));
                    let mut f: Vec<String> = head.splitn(3, ' ').map(str::to_string).collect();
                    f.push(functions.trim().to_string());
                    f
                }
                AdminCommand::Version => {
                    vec![l.trim_start_matches("OK").trim().to_string()]
                }
                _ => l.split('\t').map(str::to_string).collect(),
            };
            rows.push((server.clone(), fields));
        }
    }
    let many = args.servers.servers.len() > 1;
    if args.json {
        for (server, fields) in &rows {
            let mut obj: Vec<String> = Vec::new();
            if many {
                obj.push(format!("\"server\":{}", json_string(server)));
            }
            for (c, v) in columns.iter().zip(fields) {
                let value = if v.parse::<u64>().is_ok() && *c != "handle" { v.clone() } else { json_string(v) };
                obj.push(format!("\"{c}\":{value}"));
            }
            println!("{{{}}}", obj.join(","));
        }
        return Ok(());
    }
    let mut header: Vec<String> = columns.iter().map(|c| c.to_uppercase()).collect();
    if many {
        header.insert(0, "SERVER".into());
    }
    let table: Vec<Vec<String>> = std::iter::once(header)
        .chain(rows.into_iter().map(|(s, mut f)| {
            if many {
                f.insert(0, s);
            }
            f
        }))
        .collect();
    print_table(&table)
}

fn set_max_queue(servers: &Servers, line: &str) -> anyhow::Result<()> {
    let runtime = runtime()?;
    for server in &servers.servers {
        let reply = runtime.block_on(admin_line(server, line))?;
        if !reply.starts_with("OK") {
            bail!("{server}: {}", reply.trim().trim_start_matches("ERR ").replace('+', " "));
        }
    }
    Ok(())
}

/// `gearbox admin cancel H`: asks every server (a handle lives on one of them) and says
/// what became of the job.
fn cancel(servers: &Servers, handle: &str, json: bool) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let mut running_on = None;
    for server in &servers.servers {
        let reply = runtime.block_on(admin_line(server, &format!("cancel job {handle}")))?;
        let reply = reply.trim();
        if reply.starts_with("OK") {
            if json {
                println!(
                    "{{\"handle\":{},\"server\":{},\"cancelled\":true}}",
                    json_string(handle),
                    json_string(server)
                );
            } else {
                println!("cancelled {handle} on {server}");
            }
            return Ok(());
        }
        if reply.starts_with("ERR JOB_RUNNING") {
            running_on = Some(server);
        } else if !reply.starts_with("ERR UNKNOWN_JOB") {
            bail!("{server}: {}", reply.trim_start_matches("ERR ").replace('+', " "));
        }
    }
    match running_on {
        Some(server) => bail!("job {handle} is running on {server}; a running job cannot be cancelled"),
        None => bail!("no queued job {handle} on {} (it finished, or never existed)", servers.servers.join(", ")),
    }
}

/// Prints rows as left-aligned columns, the first row being the header.
fn print_table(table: &[Vec<String>]) -> anyhow::Result<()> {
    let columns = table.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..columns).map(|i| table.iter().map(|r| r.get(i).map_or(0, |c| c.len())).max().unwrap_or(0)).collect();
    let mut out = std::io::stdout().lock();
    for row in table {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }
    Ok(())
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[derive(clap::Args)]
pub struct LogArgs {
    #[command(flatten)]
    servers: Servers,
    /// Only jobs of this function
    #[arg(short, long)]
    function: Option<String>,
    /// Only this outcome: complete, fail (WORK_FAIL or WORK_EXCEPTION), exception, cancelled,
    /// timeout, lost_worker; or failed, for all but complete
    #[arg(long)]
    status: Option<String>,
    /// Only jobs that finished in this last span of time (90s, 15m, 1h, 7d)
    #[arg(long)]
    since: Option<String>,
    /// Only jobs with this unique key
    #[arg(short, long)]
    unique: Option<String>,
    /// Only the job with this handle
    #[arg(long)]
    handle: Option<String>,
    /// At most this many records, newest first
    #[arg(short = 'n', long, default_value_t = 20,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=gearbox_joblog::record::MAX_LIMIT as u64))]
    limit: usize,
    /// Print one JSON record per line
    #[arg(long)]
    json: bool,
}

impl LogArgs {
    fn query(&self) -> anyhow::Result<gearbox_joblog::Query> {
        let mut q = gearbox_joblog::Query {
            function: self.function.clone(),
            unique: self.unique.clone(),
            handle: self.handle.clone(),
            limit: self.limit,
            ..Default::default()
        };
        match self.status.as_deref() {
            Some("failed") => q.failed = true,
            Some(s) => q.status = Some(s.parse().map_err(anyhow::Error::msg)?),
            None => {}
        }
        if let Some(since) = &self.since {
            let ago = humantime::parse_duration(since).with_context(|| format!("bad --since {since:?}"))?;
            q.since = Some(gearbox_joblog::now_millis() - ago.as_millis() as i64);
        }
        Ok(q)
    }
}

/// Asks every server for job-log records matching `query`; newest first, at most its limit.
fn fetch_log(servers: &Servers, query: &gearbox_joblog::Query) -> anyhow::Result<Vec<gearbox_joblog::Record>> {
    let runtime = runtime()?;
    let line = format!("log {}", query.to_query_string());
    let mut records = Vec::new();
    for server in &servers.servers {
        let reply = runtime.block_on(admin_line(server, &line))?;
        if let Some(err) = reply.strip_prefix("ERR ") {
            bail!("{server}: {}", err.trim().replace('+', " "));
        }
        for l in reply.lines().filter(|l| *l != ".") {
            let record: gearbox_joblog::Record =
                serde_json::from_str(l).with_context(|| format!("{server} sent a bad record: {l}"))?;
            records.push(record);
        }
    }
    records.sort_by_key(|r| std::cmp::Reverse(r.finished_at));
    records.truncate(query.limit);
    Ok(records)
}

/// `gearbox log`: finished jobs from the servers' job logs.
pub fn log(args: LogArgs) -> anyhow::Result<()> {
    let records = fetch_log(&args.servers, &args.query()?)?;
    if args.json {
        let mut out = std::io::stdout().lock();
        for r in &records {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
        return Ok(());
    }
    let ms = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    let mut table = vec![["FINISHED", "FUNCTION", "STATUS", "TRY", "QUEUE_MS", "RUN_MS", "HANDLE", "WORKER", "ERROR"]
        .map(String::from)
        .to_vec()];
    for r in &records {
        table.push(vec![
            r.finished_at.to_string(),
            r.function.clone(),
            r.status.to_string(),
            r.attempt.to_string(),
            ms(r.queue_ms),
            ms(r.run_ms),
            r.handle.clone(),
            r.worker_id.clone().unwrap_or_else(|| "-".into()),
            r.error.as_deref().unwrap_or("").replace('\n', " "),
        ]);
    }
    print_table(&table)
}

#[derive(clap::Args)]
pub struct ResultArgs {
    #[command(flatten)]
    servers: Servers,
    /// The job's handle (or use --unique)
    #[arg(required_unless_present = "unique")]
    handle: Option<String>,
    /// Fetch the newest result of the job with this unique key instead
    #[arg(short, long, conflicts_with = "handle")]
    unique: Option<String>,
    /// With --unique: only jobs of this function
    #[arg(short, long)]
    function: Option<String>,
}

/// `gearbox result`: a finished job's result, as kept by a job log run with
/// `--job-log-bodies`, written to standard output.
pub fn result(args: ResultArgs) -> anyhow::Result<()> {
    let query = gearbox_joblog::Query {
        handle: args.handle.clone(),
        unique: args.unique.clone(),
        function: args.function.clone(),
        status: Some(gearbox_joblog::Status::Complete),
        limit: 1,
        ..Default::default()
    };
    let name = args.handle.or(args.unique).unwrap_or_default();
    let Some(record) = fetch_log(&args.servers, &query)?.into_iter().next() else {
        bail!("no completed job {name} in the job log");
    };
    let Some(result) = record.result else {
        bail!("job {name} completed, but its result was not kept (start the server with --job-log-bodies BYTES)");
    };
    std::io::stdout().write_all(&result.to_bytes())?;
    Ok(())
}

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
/// after the one running.
pub fn work(args: WorkArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let args = std::sync::Arc::new(args);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        for server in args.servers.servers.clone() {
            let (args, done, stop) = (args.clone(), done.clone(), stop.clone());
            tasks.spawn(async move {
                let mut backoff = Duration::from_millis(100);
                while !stop.is_cancelled() {
                    match work_on(&server, &args, &done, &stop).await {
                        Ok(()) => return,
                        Err(e) => eprintln!("gearbox work: {server}: {e:#}; reconnecting in {backoff:?}"),
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            });
        }
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
        tokio::select! {
            _ = term.recv() => stop.cancel(),
            _ = int.recv() => stop.cancel(),
            _ = async { while tasks.join_next().await.is_some() {} } => {}
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    })
}

async fn work_on(
    server: &str,
    args: &WorkArgs,
    done: &std::sync::atomic::AtomicU64,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use gearbox_proto::{Decoder, GrabKind, Message, Request, Response};
    use std::sync::atomic::Ordering::Relaxed;
    let mut stream = tokio::net::TcpStream::connect(server).await?;
    let mut out = bytes::BytesMut::new();
    for f in &args.function {
        Request::CanDo { function: f.clone().into() }.encode(&mut out);
    }
    Request::GrabJob(GrabKind::Uniq).encode(&mut out);
    stream.write_all(&out).await?;
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
                        let status = why.lines().last().unwrap_or_default();
                        eprintln!("gearbox work: job {}: {status}", String::from_utf8_lossy(&handle));
                        // The reason reaches clients that asked for exceptions, and the job log;
                        // others see a plain WORK_FAIL.
                        Request::WorkException { handle, data: format!("{e:#}").into() }.encode(&mut out)
                    }
                }
                let n = done.fetch_add(1, Relaxed) + 1;
                if args.count.is_some_and(|c| n >= c) || stop.is_cancelled() {
                    stream.write_all(&out).await?;
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
        stream.write_all(&out).await?;
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
    }
    tail
}
