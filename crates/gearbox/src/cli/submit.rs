//! `gearbox submit`: one job, or one per input line with `--bulk`.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::time::{Duration, Instant};

use anyhow::bail;
use gearbox_client::{Client, Job};
use gearbox_proto::Priority;

use super::{explain, runtime, Servers};

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

pub fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let client = args.servers.client()?.with_timeout(Duration::from_secs(3600));
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
            let handle = client.submit_background(job(payload)).await.map_err(explain)?;
            println!("{}", String::from_utf8_lossy(handle.handle()));
        } else {
            let result = client.run(job(payload)).await.map_err(explain)?;
            std::io::stdout().write_all(&result)?;
        }
        Ok(())
    })
}

/// How many distinct reasons for failures a bulk submission lists, most frequent first.
const BULK_REASONS: usize = 5;

/// Submits many jobs, 64 at a time, with a progress line on standard error, and says why
/// those that failed did.
async fn bulk(client: &Client, jobs: Vec<Job>, background: bool) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let total = jobs.len();
    let done = AtomicUsize::new(0);
    // How many failed, by reason.
    let failures: std::sync::Mutex<BTreeMap<String, usize>> = Default::default();
    let started = Instant::now();
    let queue = std::sync::Mutex::new(jobs.into_iter());
    let one = || async {
        loop {
            let Some(job) = queue.lock().unwrap().next() else { return };
            let outcome = if background {
                client.submit_background(job).await.map(drop)
            } else {
                client.run(job).await.map(drop)
            };
            if let Err(e) = outcome {
                // The first line: a worker's exception text can be long.
                let why = e.to_string().lines().next().unwrap_or_default().to_string();
                *failures.lock().unwrap().entry(why).or_default() += 1;
            }
            let n = done.fetch_add(1, Relaxed) + 1;
            if n.is_multiple_of(100) || n == total {
                let width = 30 * n / total.max(1);
                eprint!("\r[{}{}] {n}/{total}", "=".repeat(width), " ".repeat(30 - width));
            }
        }
    };
    let workers: Vec<_> = (0..64).map(|_| one()).collect();
    join_all(workers).await;
    let secs = started.elapsed().as_secs_f64();
    let failures = failures.into_inner().unwrap();
    let failed: usize = failures.values().sum();
    eprintln!(
        "\n{total} jobs: {} ok, {failed} failed in {secs:.2}s ({:.0} jobs/s)",
        total - failed,
        total as f64 / secs
    );
    let mut reasons: Vec<(&String, &usize)> = failures.iter().collect();
    reasons.sort_by_key(|&(_, n)| std::cmp::Reverse(*n));
    for (why, n) in reasons.iter().take(BULK_REASONS) {
        eprintln!("  {n} failed: {why}");
    }
    if reasons.len() > BULK_REASONS {
        eprintln!("  ... and {} other reasons", reasons.len() - BULK_REASONS);
    }
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
