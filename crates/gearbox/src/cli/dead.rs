//! `gearbox dead`: the jobs that failed their last attempt — list, show, run again, delete.

use anyhow::bail;

use super::{admin_line, print_table, runtime, Servers};

#[derive(clap::Subcommand, Clone)]
enum DeadCommand {
    /// Dead jobs, newest first (at most 1,000)
    List {
        /// Only this function's
        #[arg(long, short = 'f')]
        function: Option<String>,
    },
    /// One dead job with its payload and last error
    Show { handle: String },
    /// Run dead jobs again (a new background job each, with the original function, unique
    /// key, priority and payload); they leave the dead set once the server has the new job
    Retry(Chosen),
    /// Remove dead jobs for good
    Delete(Chosen),
}

/// Which dead jobs: handles, or all (of a function).
#[derive(clap::Args, Clone)]
struct Chosen {
    /// Handles of dead jobs
    #[arg(required_unless_present = "all")]
    handles: Vec<String>,
    /// Every dead job (of --function, if given)
    #[arg(long, conflicts_with = "handles")]
    all: bool,
    #[arg(long, short = 'f', requires = "all")]
    function: Option<String>,
}

impl Chosen {
    /// As the admin command takes it: `HANDLE…`, `all` or `all FUNCTION`.
    fn words(&self) -> String {
        match (self.all, &self.function) {
            (true, Some(f)) => format!("all {f}"),
            (true, None) => "all".into(),
            (false, _) => self.handles.join(" "),
        }
    }
}

#[derive(clap::Args)]
pub struct DeadArgs {
    #[command(flatten)]
    servers: Servers,
    /// Print JSON (one object per line) instead of a table
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: DeadCommand,
}

/// Unix milliseconds as an RFC 3339 time (UTC, to the second).
fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn dead(args: DeadArgs) -> anyhow::Result<()> {
    let line = match &args.command {
        DeadCommand::List { function } => format!("dead list {}", function.as_deref().unwrap_or_default()),
        DeadCommand::Show { handle } => format!("dead show {handle}"),
        DeadCommand::Retry(chosen) => format!("dead retry {}", chosen.words()),
        DeadCommand::Delete(chosen) => format!("dead delete {}", chosen.words()),
    };
    // The dead set is shared by a cluster's nodes, and kept per server otherwise: the first
    // server named is asked.
    let server = args.servers.servers.first().expect("a default server");
    let reply = runtime()?.block_on(admin_line(&args.servers.connector()?, server, line.trim()))?;
    if let Some(err) = reply.strip_prefix("ERR ") {
        bail!("{server}: {}", err.trim().replace('+', " "));
    }
    if let DeadCommand::Delete(_) = args.command {
        let n = reply.trim().trim_start_matches("OK").trim();
        match args.json {
            true => println!("{{\"deleted\":{n}}}"),
            false => println!("deleted {n} dead jobs"),
        }
        return Ok(());
    }
    let records: Vec<serde_json::Value> =
        reply.lines().filter(|l| *l != ".").map(serde_json::from_str).collect::<Result<_, _>>()?;
    if args.json {
        for r in &records {
            println!("{r}");
        }
        return Ok(());
    }
    let field = |r: &serde_json::Value, k: &str| match &r[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        v => v.to_string(),
    };
    match args.command {
        DeadCommand::List { .. } => {
            let header = ["HANDLE", "FUNCTION", "UNIQUE", "ATTEMPTS", "DIED", "ERROR"].map(String::from).to_vec();
            let rows = records.iter().map(|r| {
                let died = r["died_at"].as_i64().map(rfc3339).unwrap_or_default();
                let error: String = field(r, "error").replace('\n', " ").chars().take(60).collect();
                vec![field(r, "handle"), field(r, "function"), field(r, "unique"), field(r, "attempts"), died, error]
            });
            print_table(&std::iter::once(header).chain(rows).collect::<Vec<_>>())
        }
        DeadCommand::Show { .. } => {
            for r in &records {
                for k in ["handle", "function", "unique", "priority", "attempts", "error", "payload_bytes", "payload"] {
                    println!("{k:<14}{}", field(r, k));
                }
                let died = r["died_at"].as_i64().map(rfc3339).unwrap_or_default();
                println!("{:<14}{died}", "died");
            }
            Ok(())
        }
        DeadCommand::Retry(_) => {
            let mut failed = 0;
            for r in &records {
                match r.get("new_handle").and_then(|h| h.as_str()) {
                    Some(new) => println!("{} -> {new}", field(r, "handle")),
                    None => {
                        failed += 1;
                        eprintln!("{}: {}", field(r, "handle"), field(r, "error"));
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} dead jobs could not be retried", records.len());
            }
            Ok(())
        }
        DeadCommand::Delete(_) => unreachable!("answered above"),
    }
}
