//! `gearbox bench`: a load generator for any Gearman server (gearbox or gearmand), speaking
//! the binary protocol over plain TCP, or TLS (`--ssl`, `--ssl-ca-file` …) for every
//! connection, the admin ones included.
//!
//! - `bg`: clients keep `--inflight` SUBMIT_JOB_BG each in flight while workers run them one at
//!   a time; throughput from the first submit to the last WORK_COMPLETE.
//! - `fg`: each client waits for its job's WORK_COMPLETE before submitting the next; throughput
//!   and latency percentiles.
//! - `mem`: queues `--jobs` background jobs with no worker and reports the server's RSS growth
//!   per job, then drains them.
//! - `depth`: queues `--jobs` background jobs with no worker in steps of `--step`, and reports
//!   per step the depth, the rate of JOB_CREATED and the server's RSS; the jobs stay queued.
//! - `drain`: runs the jobs a depth run queued (typically after restarting the server, to see
//!   that its store kept them), then reads the server's RSS once it has been idle a while.
//! - `takeover` (a gearbox cluster): workers on the first server (the victim) each hold one
//!   job, clients queue the rest there, the victim is SIGKILLed, and the other servers' workers
//!   run every job once its lease has run out; how long after the kill the first and the last
//!   job ran, and the rate in between.
//!
//! `--server` may name several servers (a cluster): clients are spread over them round-robin
//! and `--workers` worker connections go to each. mem, depth and drain read one server's RSS
//! and take a single server.
//!
//! Every mode but depth checks that each submitted job ran exactly once (drain: each job the
//! depth run with the same `--jobs` submitted), and reports the servers' CPU time per job,
//! summed over those that run on this host (a PID comes from the admin command `getpid`, or
//! `--server-pid`).

mod admin;
mod conn;
mod ctx;
mod depth;
mod jobs;
mod modes;
mod report;
mod server;
mod takeover;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use gearbox_client::{Connector, Tls};

use ctx::Ctx;
use jobs::JobSet;
use report::Report;

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Background jobs: pipelined submits, throughput and server CPU per job.
    #[default]
    Bg,
    /// Foreground jobs, one at a time per client: throughput and latency.
    Fg,
    /// Queued background jobs with no worker: server memory per job, then the drain rate.
    Mem,
    /// A deep queue filled in steps, no worker: acknowledgement rate and memory by depth.
    Depth,
    /// Workers run the jobs an earlier depth run (same --jobs, --payload) left queued.
    Drain,
    /// A cluster node SIGKILLed with jobs queued and running: how soon the others run them.
    Takeover,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Bg => "bg",
            Mode::Fg => "fg",
            Mode::Mem => "mem",
            Mode::Depth => "depth",
            Mode::Drain => "drain",
            Mode::Takeover => "takeover",
        }
    }

    /// Whether the mode reads a server's RSS, so takes a single server.
    fn reads_rss(self) -> bool {
        matches!(self, Mode::Mem | Mode::Depth | Mode::Drain)
    }
}

/// Load a Gearman server (gearbox or gearmand) and measure throughput, latency, server CPU
/// and memory.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Servers to load, HOST:PORT (comma-separated, or the flag repeated): clients are spread
    /// over them round-robin, each gets --workers workers. takeover kills the first.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:4730")]
    pub server: Vec<String>,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Bg)]
    pub mode: Mode,
    /// Client connections [default: 4 for bg and takeover, 8 for fg, 2 for mem and depth].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub clients: Option<u32>,
    /// Worker connections on each server (takeover: holding workers on the victim, and
    /// workers on each other server).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub workers: u32,
    /// Jobs to run [default: 200000 for bg, 100000 for fg, 500000 for mem, 1000000 for depth
    /// and drain, 10000 for takeover].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub jobs: Option<u64>,
    /// Jobs per step of a depth run's fill [default: a tenth of --jobs].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub step: Option<u64>,
    /// Seconds after the last job ran at which drain reads the server's RSS.
    #[arg(long, default_value_t = 10)]
    pub rss_after: u64,
    /// Background submits each client keeps in flight (bg, mem, depth).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub inflight: u32,
    /// Payload bytes per job; the first 20 carry the job number.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(20..))]
    pub payload: u32,
    /// Function name the jobs are submitted to.
    #[arg(long, default_value = "bench")]
    pub function: String,
    /// Give up (and fail) after this many seconds (takeover: enough for the victim's lease,
    /// 10 s by default, and the run after it).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// The servers' PIDs, in --server's order, for servers that do not answer the admin
    /// command `getpid` (comma-separated, or the flag repeated; servers past the last PID
    /// given are asked).
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Threads of the load generator's own runtime (1: a single-threaded runtime).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: u32,
    /// Also print the results as one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
    /// Connect with TLS (implied by the other --ssl-* flags).
    #[arg(long)]
    pub ssl: bool,
    /// PEM file of the CAs the servers' certificates must chain to [default: the public CAs].
    #[arg(long, value_name = "FILE")]
    pub ssl_ca_file: Option<PathBuf>,
    /// PEM file of a client certificate, for servers that require one (with --ssl-key).
    #[arg(long, value_name = "FILE", requires = "ssl_key")]
    pub ssl_certificate: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[arg(long, value_name = "FILE", requires = "ssl_certificate")]
    pub ssl_key: Option<PathBuf>,
    /// Name the servers' certificates must hold [default: the host of each --server].
    #[arg(long, value_name = "NAME")]
    pub ssl_server_name: Option<String>,
}

impl BenchArgs {
    /// How every connection is opened: TLS if any --ssl flag asks for it.
    fn connector(&self) -> Result<Connector> {
        let flagged = self.ssl_ca_file.is_some() || self.ssl_certificate.is_some() || self.ssl_server_name.is_some();
        if !(self.ssl || flagged) {
            return Ok(Connector::new());
        }
        let mut tls = Tls::builder();
        if let Some(ca) = &self.ssl_ca_file {
            tls = tls.ca_file(ca);
        }
        if let (Some(certificate), Some(key)) = (&self.ssl_certificate, &self.ssl_key) {
            tls = tls.client_certificate(certificate, key);
        }
        if let Some(name) = &self.ssl_server_name {
            tls = tls.server_name(name);
        }
        Ok(Connector::new().with_tls(tls.build()?))
    }
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
    let servers = args.server.len();
    if args.mode.reads_rss() && servers > 1 {
        bail!("--mode {} reads one server's RSS: give a single --server, not {servers}", args.mode.name());
    }
    if args.mode == Mode::Takeover && servers < 2 {
        bail!("--mode takeover needs at least two servers: the victim first, then the survivors");
    }
    if args.server_pid.len() > servers {
        bail!("{} --server-pid values for {servers} servers", args.server_pid.len());
    }
    let (clients, count) = match args.mode {
        Mode::Bg => (4, 200_000),
        Mode::Fg => (8, 100_000),
        Mode::Mem => (2, 500_000),
        Mode::Depth | Mode::Drain => (2, 1_000_000),
        Mode::Takeover => (4, 10_000),
    };
    let count = args.jobs.unwrap_or(count);
    let mut ctx = Ctx::new(&args, args.clients.unwrap_or(clients) as usize).await?;
    let prefix = match args.mode {
        Mode::Bg => format!("b-{}-", ctx.run_id),
        Mode::Fg => format!("f-{}-", ctx.run_id),
        Mode::Takeover => format!("t-{}-", ctx.run_id),
        Mode::Mem => "gl-".to_owned(),
        Mode::Depth | Mode::Drain => depth::PREFIX.to_owned(),
    };
    let jobs = Arc::new(JobSet::new(prefix, count, args.payload as usize));

    let step = args.step.unwrap_or(count.div_ceil(10));
    let per_server = if servers > 1 { " per server" } else { "" };
    let who = match args.mode {
        Mode::Depth => format!(" in steps of {step}, {} clients, no worker", ctx.clients),
        Mode::Drain => format!(", {} workers", ctx.workers),
        Mode::Takeover => format!(
            ", {} clients and {} holding workers on the victim, {} workers on each other server",
            ctx.clients, ctx.workers, ctx.workers
        ),
        _ => format!(", {} clients, {} workers{per_server}", ctx.clients, ctx.workers),
    };
    println!("bench {}: {count} jobs{who}, against {}", args.mode.name(), ctx.describe_servers());
    let mut report = Report { mode: args.mode, server: args.server.join(","), jobs: count, ..Report::default() };
    let outcome = match args.mode {
        Mode::Bg => ctx.bg(&jobs, &mut report).await,
        Mode::Fg => ctx.fg(&jobs, &mut report).await,
        Mode::Mem => ctx.mem(&jobs, &mut report).await,
        Mode::Depth => ctx.depth(&jobs, step, &mut report).await,
        Mode::Drain => ctx.drain(&jobs, Duration::from_secs(args.rss_after), &mut report).await,
        Mode::Takeover => ctx.takeover(&jobs, &mut report).await,
    };
    ctx.tasks.shutdown().await;
    report.completed = jobs.completed();
    report.verdict = (args.mode != Mode::Depth).then(|| jobs.verdict());
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn servers_and_pids_come_comma_separated_or_repeated() {
        let cli = Cli::parse_from(["bench", "--server", "a:1,b:2", "--server", "c:3", "--server-pid", "7,8"]);
        assert_eq!(cli.bench.server, ["a:1", "b:2", "c:3"]);
        assert_eq!(cli.bench.server_pid, [7, 8]);
        let cli = Cli::parse_from(["bench"]);
        assert_eq!(cli.bench.server, ["127.0.0.1:4730"]);
        assert!(cli.bench.server_pid.is_empty());
    }

    #[test]
    fn rss_modes_refuse_several_servers_and_takeover_wants_two() {
        let run = |args: &[&str]| {
            let cli = Cli::parse_from([&["bench", "--timeout", "1"], args].concat());
            run(cli.bench).unwrap_err().to_string()
        };
        for mode in ["mem", "depth", "drain"] {
            let e = run(&["--mode", mode, "--server", "127.0.0.1:1,127.0.0.1:2"]);
            assert!(e.contains("reads one server's RSS"), "{e}");
        }
        let e = run(&["--mode", "takeover", "--server", "127.0.0.1:1"]);
        assert!(e.contains("at least two servers"), "{e}");
        let e = run(&["--server", "127.0.0.1:1", "--server-pid", "1,2"]);
        assert!(e.contains("2 --server-pid values for 1 servers"), "{e}");
    }
}
