//! `gearbox bench`: a load generator for any Gearman server (gearbox or gearmand), speaking
//! the binary protocol over plain TCP.
//!
//! - `bg`: clients keep `--inflight` SUBMIT_JOB_BG each in flight while workers run them one at
//!   a time; throughput from the first submit to the last WORK_COMPLETE.
//! - `fg`: each client waits for its job's WORK_COMPLETE before submitting the next; throughput
//!   and latency percentiles.
//! - `mem`: queues `--jobs` background jobs with no worker and reports the server's RSS growth
//!   per job, then drains them.
//!
//! Every mode checks that each submitted job ran exactly once, and reports the server's CPU
//! time per job when the server runs on this host (its PID comes from the admin command
//! `getpid`, or `--server-pid`).

mod conn;
mod jobs;
mod report;
mod server;

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use gearbox_proto::{PacketType, Response};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use conn::{unexpected, Conn};
use jobs::{JobSet, Submitter};
use report::Report;
use server::ServerProc;

/// How long to keep the workers after the last job ran, so a job run twice is seen.
const DUPLICATE_GRACE: Duration = Duration::from_millis(200);
/// Wait after the last JOB_CREATED before reading the server's RSS (mem).
const RSS_SETTLE: Duration = Duration::from_millis(300);

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Background jobs: pipelined submits, throughput and server CPU per job.
    #[default]
    Bg,
    /// Foreground jobs, one at a time per client: throughput and latency.
    Fg,
    /// Queued background jobs with no worker: server memory per job, then the drain rate.
    Mem,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Bg => "bg",
            Mode::Fg => "fg",
            Mode::Mem => "mem",
        }
    }
}

/// Load a Gearman server (gearbox or gearmand) and measure throughput, latency, server CPU
/// and memory.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Server to load, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:4730")]
    pub server: String,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Bg)]
    pub mode: Mode,
    /// Client connections [default: 4 for bg, 8 for fg, 2 for mem].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub clients: Option<u32>,
    /// Worker connections.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub workers: u32,
    /// Jobs to run [default: 200000 for bg, 100000 for fg, 500000 for mem].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub jobs: Option<u64>,
    /// Background submits each client keeps in flight (bg, mem).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub inflight: u32,
    /// Payload bytes per job; the first 20 carry the job number.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(20..))]
    pub payload: u32,
    /// Function name the jobs are submitted to.
    #[arg(long, default_value = "bench")]
    pub function: String,
    /// Give up (and fail) after this many seconds.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// The server's PID, if it does not answer the admin command `getpid`.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Threads of the load generator's own runtime (1: a single-threaded runtime).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: u32,
    /// Also print the results as one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark on a runtime of its own (`--threads`), whatever the caller's is, and
/// fails if it timed out or any job was lost, run twice or garbled.
pub fn run(args: BenchArgs) -> Result<()> {
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads as usize).enable_all().build()?
    };
    runtime.block_on(bench(args))
}

async fn bench(args: BenchArgs) -> Result<()> {
    let (clients, count) = match args.mode {
        Mode::Bg => (4, 200_000),
        Mode::Fg => (8, 100_000),
        Mode::Mem => (2, 500_000),
    };
    let count = args.jobs.unwrap_or(count);
    let mut ctx = Ctx::new(&args, args.clients.unwrap_or(clients) as usize).await?;
    let prefix = match args.mode {
        Mode::Bg => format!("b-{}-", ctx.run_id),
        Mode::Fg => format!("f-{}-", ctx.run_id),
        Mode::Mem => "gl-".to_owned(),
    };
    let jobs = Arc::new(JobSet::new(prefix, count, args.payload as usize));

    let server = ctx.server.as_ref().map_or(String::new(), |s| format!(" ({}, pid {})", s.name, s.pid));
    println!(
        "bench {}: {count} jobs, {} clients, {} workers, against {}{server}",
        args.mode.name(),
        ctx.clients,
        ctx.workers,
        args.server
    );
    let mut report = Report { mode: args.mode, server: args.server.clone(), jobs: count, ..Report::default() };
    let outcome = match args.mode {
        Mode::Bg => ctx.bg(&jobs, &mut report).await,
        Mode::Fg => ctx.fg(&jobs, &mut report).await,
        Mode::Mem => ctx.mem(&jobs, &mut report).await,
    };
    ctx.tasks.shutdown().await;
    report.completed = jobs.completed();
    report.verdict = jobs.verdict();
    report.error = outcome.err().map(|e| format!("{e:#}"));
    report.print_human();
    if args.json {
        println!("{}", report.json());
    }
    if let Some(e) = &report.error {
        bail!("bench failed: {e}");
    }
    if !report.ok() {
        bail!("bench failed: not every job ran exactly once");
    }
    Ok(())
}

/// What every mode shares: the server, the deadline, and the tasks it started, whose errors
/// all end up in one channel.
struct Ctx {
    addr: String,
    function: Bytes,
    run_id: String,
    clients: usize,
    workers: usize,
    inflight: usize,
    server: Option<ServerProc>,
    deadline: tokio::time::Instant,
    timeout: u64,
    /// Every worker and client; aborted when the run ends.
    tasks: JoinSet<()>,
    fail_tx: mpsc::UnboundedSender<anyhow::Error>,
    fail_rx: mpsc::UnboundedReceiver<anyhow::Error>,
}

impl Ctx {
    async fn new(args: &BenchArgs, clients: usize) -> Result<Ctx> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
        let server = tokio::time::timeout_at(deadline, ServerProc::find(&args.server, args.server_pid))
            .await
            .context("timed out looking for the server's PID")??;
        let (fail_tx, fail_rx) = mpsc::unbounded_channel();
        let mut seed = std::collections::hash_map::RandomState::new().build_hasher();
        seed.write_u128(std::time::UNIX_EPOCH.elapsed()?.as_nanos());
        Ok(Ctx {
            addr: args.server.clone(),
            function: Bytes::from(args.function.clone().into_bytes()),
            run_id: format!("{:08x}", seed.finish() as u32),
            clients,
            workers: args.workers as usize,
            inflight: args.inflight as usize,
            server,
            deadline,
            timeout: args.timeout,
            tasks: JoinSet::new(),
            fail_tx,
            fail_rx,
        })
    }

    /// Awaits `fut`, unless a task fails or the deadline passes first.
    async fn wait<T>(&mut self, doing: &str, fut: impl Future<Output = T>) -> Result<T> {
        tokio::select! {
            value = fut => Ok(value),
            Some(e) = self.fail_rx.recv() => Err(e),
            () = tokio::time::sleep_until(self.deadline) => {
                bail!("timed out after {} s {doing}", self.timeout)
            }
        }
    }

    /// Starts `fut` as a task whose error, if any, fails the run.
    fn spawn<F>(&mut self, what: &'static str, fut: F)
    where
        F: Future<Output = Result<()>> + Send + 'static,
    {
        let fails = self.fail_tx.clone();
        self.tasks.spawn(async move {
            if let Err(e) = fut.await {
                let _ = fails.send(e.context(what));
            }
        });
    }

    fn cpu_us(&self) -> Option<u64> {
        self.server.as_ref()?.cpu_us()
    }

    fn cpu_since(&self, start: Option<u64>) -> Option<u64> {
        Some(self.cpu_us()?.saturating_sub(start?))
    }

    /// Starts the workers and waits until the server has answered each of them.
    async fn start_workers(&mut self, jobs: &Arc<JobSet>) -> Result<()> {
        let mut ready = Vec::with_capacity(self.workers);
        for _ in 0..self.workers {
            let (tx, rx) = oneshot::channel();
            let worker = jobs::worker(self.addr.clone(), self.function.clone(), jobs.clone(), tx);
            self.spawn("worker", worker);
            ready.push(rx);
        }
        self.wait("starting the workers", async {
            for rx in ready {
                let _ = rx.await;
            }
        })
        .await
    }

    async fn connect_clients(&mut self) -> Result<Vec<Conn>> {
        let mut conns = Vec::with_capacity(self.clients);
        for _ in 0..self.clients {
            let addr = self.addr.clone();
            conns.push(self.wait("connecting", Conn::connect(&addr)).await??);
        }
        Ok(conns)
    }

    /// Spreads the jobs over `conns`, each keeping `--inflight` SUBMIT_JOB_BG in flight, and
    /// waits for every JOB_CREATED.
    async fn submit_all_bg(&mut self, conns: Vec<Conn>, jobs: &Arc<JobSet>) -> Result<()> {
        let (n, count) = (conns.len() as u64, jobs.count());
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        for (i, conn) in (0..).zip(conns) {
            let submitter = Submitter::new(self.function.clone(), jobs);
            let range = count * i / n..count * (i + 1) / n;
            let (done, inflight) = (done_tx.clone(), self.inflight);
            self.spawn("client", async move {
                submit_bg(conn, submitter, range, inflight).await?;
                let _ = done.send(());
                Ok(())
            });
        }
        self.wait("waiting for JOB_CREATED", async {
            for _ in 0..n {
                done_rx.recv().await;
            }
        })
        .await
    }

    /// Waits for the last job to run. With `phase` (its start and the server's CPU time then),
    /// the measured phase ends with the last WORK_COMPLETE. Then waits a little longer, so a
    /// job run twice is seen.
    async fn await_jobs(
        &mut self,
        jobs: &JobSet,
        phase: Option<(Instant, Option<u64>)>,
        report: &mut Report,
    ) -> Result<()> {
        self.wait("waiting for the workers", jobs.done.notified()).await?;
        if let Some((start, cpu)) = phase {
            report.server_cpu_us = self.cpu_since(cpu);
            let end = jobs.finished_at().context("jobs done without an end time")?;
            report.elapsed = Some(end - start);
        }
        tokio::time::sleep(DUPLICATE_GRACE).await;
        Ok(())
    }

    async fn bg(&mut self, jobs: &Arc<JobSet>, report: &mut Report) -> Result<()> {
        self.start_workers(jobs).await?;
        let conns = self.connect_clients().await?;
        let cpu = self.cpu_us();
        let start = Instant::now();
        self.submit_all_bg(conns, jobs).await?;
        self.await_jobs(jobs, Some((start, cpu)), report).await
    }

    async fn fg(&mut self, jobs: &Arc<JobSet>, report: &mut Report) -> Result<()> {
        self.start_workers(jobs).await?;
        let conns = self.connect_clients().await?;
        let next = Arc::new(AtomicU64::new(0));
        let (lat_tx, mut lat_rx) = mpsc::unbounded_channel();
        let cpu = self.cpu_us();
        let start = Instant::now();
        for conn in conns {
            let submitter = Submitter::new(self.function.clone(), jobs);
            let (next, lat_tx, count) = (next.clone(), lat_tx.clone(), jobs.count());
            self.spawn("client", async move {
                let latencies = submit_fg(conn, submitter, count, &next).await?;
                let _ = lat_tx.send(latencies);
                Ok(())
            });
        }
        let clients = self.clients;
        let latencies = self
            .wait("running foreground jobs", async {
                let mut all = Vec::with_capacity(jobs.count() as usize);
                for _ in 0..clients {
                    all.extend(lat_rx.recv().await.unwrap_or_default());
                }
                all
            })
            .await?;
        report.elapsed = Some(start.elapsed());
        report.server_cpu_us = self.cpu_since(cpu);
        report.latencies_ns = latencies;
        self.await_jobs(jobs, None, report).await
    }

    async fn mem(&mut self, jobs: &Arc<JobSet>, report: &mut Report) -> Result<()> {
        let rss = |ctx: &Ctx| -> Result<u64> {
            ctx.server
                .as_ref()
                .context("mem mode needs the server's PID (getpid or --server-pid)")?
                .rss_bytes()
                .context("cannot read the server's VmRSS")
        };
        let conns = self.connect_clients().await?;
        let before = rss(self)?;
        let start = Instant::now();
        self.submit_all_bg(conns, jobs).await?;
        report.submit_elapsed = Some(start.elapsed());
        tokio::time::sleep(RSS_SETTLE).await;
        report.rss_growth = Some(rss(self)? as i64 - before as i64);

        let cpu = self.cpu_us();
        let start = Instant::now();
        self.start_workers(jobs).await?;
        self.await_jobs(jobs, Some((start, cpu)), report).await
    }
}

/// Submits jobs `range` with `inflight` of them awaiting their JOB_CREATED at any time; every
/// reply is answered by the next submit, all replies of one read by a single write.
async fn submit_bg(mut conn: Conn, mut submitter: Submitter, range: Range<u64>, inflight: usize) -> Result<()> {
    let mut next = range.start;
    let mut pending = 0;
    while next < range.end && pending < inflight {
        submitter.push(&mut conn, PacketType::SubmitJobBg, next);
        next += 1;
        pending += 1;
    }
    conn.flush().await?;
    while pending > 0 {
        conn.fill().await?;
        while let Some(response) = conn.next()? {
            let Response::JobCreated { .. } = response else {
                return Err(unexpected("client", &response));
            };
            pending -= 1;
            if next < range.end {
                submitter.push(&mut conn, PacketType::SubmitJobBg, next);
                next += 1;
                pending += 1;
            }
        }
        conn.flush().await?;
    }
    Ok(())
}

/// Submits foreground jobs one at a time, numbers taken from `next` until `count`; returns
/// each job's latency from submit to WORK_COMPLETE, in nanoseconds.
async fn submit_fg(mut conn: Conn, mut submitter: Submitter, count: u64, next: &AtomicU64) -> Result<Vec<u64>> {
    let mut latencies = Vec::new();
    loop {
        let n = next.fetch_add(1, Relaxed);
        if n >= count {
            return Ok(latencies);
        }
        submitter.push(&mut conn, PacketType::SubmitJob, n);
        let start = Instant::now();
        conn.flush().await?;
        let handle = match conn.recv().await? {
            Response::JobCreated { handle } => handle,
            other => return Err(unexpected("client", &other)),
        };
        loop {
            match conn.recv().await? {
                Response::WorkComplete { handle: h, .. } if h == handle => break,
                Response::WorkStatus { .. } | Response::WorkData { .. } | Response::WorkWarning { .. } => {}
                other => return Err(unexpected("client", &other)),
            }
        }
        latencies.push(start.elapsed().as_nanos() as u64);
    }
}
