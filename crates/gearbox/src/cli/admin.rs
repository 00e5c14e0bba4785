//! `gearbox admin`: functions, workers, jobs, counters, version, queue limits; cancel a job.

use anyhow::bail;

use super::{admin_line, json_string, print_table, runtime, Servers};

#[derive(clap::Subcommand, Clone)]
enum AdminCommand {
    /// Functions: queued, running, workers
    Status {
        /// Every node of the cluster the server belongs to (`--cluster`): per node and
        /// function, with the lease's age, then the jobs no node owns yet and the totals
        #[arg(long)]
        cluster: bool,
    },
    /// Connections and the functions they can do
    Workers,
    /// Jobs on the server
    Jobs,
    /// Server version
    Version,
    /// Cancel a queued job
    Cancel { handle: String },
    /// Queue limits per function and priority (0: none). With FUNCTION, set its limits
    /// first: one LIMIT for every priority, or HIGH NORMAL LOW; FUNCTION alone removes them
    Maxqueue {
        function: Option<String>,
        #[arg(requires = "function", num_args = 0..=3, allow_negative_numbers = true)]
        limits: Vec<i64>,
    },
    /// Counters: connections, jobs, job-log records written and dropped
    Stats,
    /// Pause a function: it accepts jobs, its workers get none until it is resumed (kept
    /// across restarts, and on every node of a cluster)
    Pause { function: String },
    /// Resume a paused function
    Resume { function: String },
    /// Paused and limited functions. With FUNCTION and N: at most N of its jobs run at once
    /// on this server (0: no limit)
    Limit {
        function: Option<String>,
        #[arg(requires = "function")]
        n: Option<u32>,
    },
    /// Retry policies. With FUNCTION (`*`: every function) and RETRIES[/BASE] (or none): set
    /// its policy until the server restarts
    Retry {
        function: Option<String>,
        #[arg(requires = "function", value_name = "RETRIES[/BASE]|none")]
        policy: Option<String>,
    },
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

pub fn admin(args: AdminArgs) -> anyhow::Result<()> {
    let (line, columns): (String, &[&str]) = match &args.command {
        AdminCommand::Status { cluster: false } => ("status".into(), &["function", "total", "running", "workers"]),
        AdminCommand::Status { cluster: true } => {
            ("cluster".into(), &["node", "address", "lease_age", "function", "queued", "running", "workers"])
        }
        AdminCommand::Workers => ("workers".into(), &["fd", "address", "client_id", "functions"]),
        AdminCommand::Jobs => ("show jobs".into(), &["handle", "retries", "ignored", "background"]),
        AdminCommand::Version => ("version".into(), &["version"]),
        AdminCommand::Cancel { handle } => return cancel(&args.servers, handle, args.json),
        AdminCommand::Maxqueue { function, limits } => {
            if limits.len() == 2 {
                bail!("give one limit for every priority, or three: HIGH NORMAL LOW");
            }
            if let Some(function) = function {
                let limits: Vec<String> = limits.iter().map(i64::to_string).collect();
                set_max_queue(&args.servers, &format!("maxqueue {function} {}", limits.join(" ")))?;
            }
            ("maxqueue".into(), &["function", "high", "normal", "low"])
        }
        AdminCommand::Stats => ("stats".into(), &["name", "value"]),
        AdminCommand::Pause { function } => return set(&args.servers, &format!("pause {function}")),
        AdminCommand::Resume { function } => return set(&args.servers, &format!("resume {function}")),
        AdminCommand::Limit { function, n } => {
            if let (Some(function), Some(n)) = (function, n) {
                return set(&args.servers, &format!("limit {function} {n}"));
            }
            ("limit".into(), &["function", "state", "limit"])
        }
        AdminCommand::Retry { function, policy } => {
            if let (Some(function), Some(policy)) = (function, policy) {
                return set(&args.servers, &format!("retry {function} {policy}"));
            }
            ("retry".into(), &["function", "retries", "backoff", "base", "max_delay"])
        }
    };
    let whole_cluster = matches!(args.command, AdminCommand::Status { cluster: true });
    let runtime = runtime()?;
    let connector = args.servers.connector()?;
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    for server in &args.servers.servers {
        let reply = runtime.block_on(admin_line(&connector, server, &line))?;
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
        if whole_cluster {
            // Every node shows the same view.
            break;
        }
    }
    let many = args.servers.servers.len() > 1 && !whole_cluster;
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

/// Sends a setting's line to every server and says so.
fn set(servers: &Servers, line: &str) -> anyhow::Result<()> {
    set_max_queue(servers, line)?;
    println!("{line}: OK");
    Ok(())
}

fn set_max_queue(servers: &Servers, line: &str) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let connector = servers.connector()?;
    for server in &servers.servers {
        let reply = runtime.block_on(admin_line(&connector, server, line))?;
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
    let connector = servers.connector()?;
    let (mut running_on, mut elsewhere) = (None, None);
    for server in &servers.servers {
        let reply = runtime.block_on(admin_line(&connector, server, &format!("cancel job {handle}")))?;
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
        } else if reply.starts_with("ERR JOB_ON_ANOTHER_NODE") {
            // A cluster node names the node that owns the job: one of the others, perhaps.
            elsewhere = Some(reply.trim_start_matches("ERR JOB_ON_ANOTHER_NODE ").replace('+', " "));
        } else if !reply.starts_with("ERR UNKNOWN_JOB") {
            bail!("{server}: {}", reply.trim_start_matches("ERR ").replace('+', " "));
        }
    }
    match (running_on, elsewhere) {
        (Some(server), _) => bail!("job {handle} is running on {server}; a running job cannot be cancelled"),
        (None, Some(owner)) => bail!("job {handle}: {owner}"),
        (None, None) => {
            bail!("no queued job {handle} on {} (it finished, or never existed)", servers.servers.join(", "))
        }
    }
}
