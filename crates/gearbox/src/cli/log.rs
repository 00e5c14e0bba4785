//! `gearbox log` and `gearbox result`: finished jobs from the servers' job logs.

use std::io::Write;

use anyhow::{bail, Context};

use super::{admin_line, print_table, runtime, Servers};

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
    let connector = servers.connector()?;
    let line = format!("log {}", query.to_query_string());
    let mut records = Vec::new();
    for server in &servers.servers {
        let reply = runtime.block_on(admin_line(&connector, server, &line))?;
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
    let name = match (args.handle, args.unique) {
        (Some(handle), _) => format!("job {handle}"),
        (None, unique) => format!("job with unique key {}", unique.unwrap_or_default()),
    };
    let Some(record) = fetch_log(&args.servers, &query)?.into_iter().next() else {
        bail!("no completed {name} in the job log");
    };
    let Some(result) = record.result else {
        bail!("the {name} completed, but its result was not kept (start the server with --job-log-bodies BYTES)");
    };
    std::io::stdout().write_all(&result.to_bytes())?;
    Ok(())
}
