//! The `gearbox` command: the job server and the tools around it.

mod cli;
mod import;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "gearbox", version, about = "A durable, fast Gearman job server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the job server (Gearman protocol and admin protocol on one port)
    Server(Box<gearbox_server::Settings>),
    /// Submit a job (or, with --bulk, one per input line) and print its result or handle
    Submit(cli::SubmitArgs),
    /// Serve functions by running a command for each job (payload on stdin, result on stdout)
    Work(cli::WorkArgs),
    /// Ask servers for their functions, workers, jobs, counters or version, or cancel a job
    Admin(cli::AdminArgs),
    /// Show finished jobs from the servers' job logs (failures with --status failed)
    Log(cli::LogArgs),
    /// Jobs that failed their last attempt: list, show, retry, delete
    Dead(cli::DeadArgs),
    /// Print a finished job's result, when the job log keeps results (--job-log-bodies)
    Result(cli::ResultArgs),
    /// Make a token for the access list (--acl): prints the token and the line for the file
    Token(cli::TokenArgs),
    /// Copy the jobs of a gearmand persistent queue (libsqlite3, MySQL, PostgreSQL) into gearbox's queue
    ImportGearmand(import::ImportArgs),
    /// Load a Gearman server (gearbox or gearmand) and measure it; checks no job is lost or run twice
    Bench(gearbox_bench::BenchArgs),
}

/// Errors print as one line with their causes (`Error: what: why`), and never with a
/// backtrace, whatever `RUST_BACKTRACE` says: they are a user's to read.
fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Server(settings) => {
            let config = settings.resolve()?;
            init_logging(&config)?;
            let runtime = if config.threads <= 1 {
                tokio::runtime::Builder::new_current_thread().enable_all().build()?
            } else {
                tokio::runtime::Builder::new_multi_thread().worker_threads(config.threads).enable_all().build()?
            };
            runtime.block_on(gearbox_server::run(config))?;
            // Connections still open after the grace period are dropped with the runtime.
            runtime.shutdown_timeout(std::time::Duration::from_millis(100));
        }
        // The load generator builds the runtime it wants.
        Command::Bench(args) => gearbox_bench::run(args)?,
        Command::ImportGearmand(args) => import::run(args)?,
        Command::Submit(args) => cli::submit(args)?,
        Command::Admin(args) => cli::admin(args)?,
        Command::Log(args) => cli::log(args)?,
        Command::Dead(args) => cli::dead(args)?,
        Command::Result(args) => cli::result(args)?,
        Command::Work(args) => cli::work(args)?,
        Command::Token(args) => cli::token(args)?,
    }
    Ok(())
}

fn init_logging(config: &gearbox_server::Config) -> anyhow::Result<()> {
    let builder = tracing_subscriber::fmt().with_max_level(config.log_level);
    match &config.log_file {
        Some(path) if path.as_os_str() == "none" => {}
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            builder.with_ansi(false).with_writer(Mutex::new(file)).init();
        }
        // Colours only for a person at a terminal, not for journald or a file.
        None => builder.with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).init(),
    }
    Ok(())
}
