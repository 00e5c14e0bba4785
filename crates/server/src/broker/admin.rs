//! The text admin protocol's commands, answered from the broker's state.

use super::job::JobState;
use super::views::CancelError;
use super::{AdminEffect, Broker, ConnId};

impl Broker {
    pub fn admin(&mut self, conn: ConnId, cmd: gearbox_proto::AdminCommand, info: &AdminInfo) -> AdminEffect {
        use gearbox_proto::admin::OK;
        use gearbox_proto::AdminCommand as A;
        use std::fmt::Write;
        let mut out = String::new();
        let mut effect = AdminEffect::None;
        let live = || self.functions.iter().filter(|f| !f.dropped);
        match cmd {
            A::Status => {
                for f in live() {
                    let name = String::from_utf8_lossy(&f.name);
                    let _ = writeln!(out, "{name}\t{}\t{}\t{}", f.total(), f.running, f.workers);
                }
                out.push_str(".\n");
            }
            A::PriorityStatus => {
                for f in live() {
                    let name = String::from_utf8_lossy(&f.name);
                    let [h, n, l] = f.queued;
                    let _ = writeln!(out, "{name}\t{h}\t{n}\t{l}\t{}", f.workers);
                }
                out.push_str(".\n");
            }
            A::Workers => {
                for (_, c) in &self.conns {
                    let id = c.client_id.as_deref().map_or("-".into(), String::from_utf8_lossy);
                    let _ = write!(out, "{} {} {id} :", c.fd, c.ip);
                    for a in &c.abilities {
                        let _ = write!(out, " {}", String::from_utf8_lossy(&self.functions[a.function as usize].name));
                    }
                    out.push('\n');
                }
                out.push_str(".\n");
            }
            A::Version => out = format!("OK {}\n", info.version),
            A::GetPid => out = format!("OK {}\n", std::process::id()),
            A::Verbose => out = format!("OK {}\n", info.verbose),
            A::MaxQueue { function, limits } => {
                let fid = self.function_id(&function);
                self.functions[fid as usize].max_queue = limits;
                out.push_str(OK);
            }
            A::MaxQueueList => {
                for f in live() {
                    let [h, n, l] = f.max_queue;
                    let _ = writeln!(out, "{}\t{h}\t{n}\t{l}", String::from_utf8_lossy(&f.name));
                }
                out.push_str(".\n");
            }
            A::ShowJobs => {
                for (_, j) in self.jobs.iter().filter(|(_, j)| j.state != JobState::Dropped) {
                    let running = matches!(j.state, JobState::Running(_));
                    let retries = j.attempts - u16::from(running);
                    let handle = self.handle(j.seq);
                    let _ =
                        writeln!(out, "{}\t{retries}\t0\t{}", String::from_utf8_lossy(&handle), u8::from(j.background));
                }
                out.push_str(".\n");
            }
            A::ShowUniqueJobs => {
                for (_, j) in self.jobs.iter().filter(|(_, j)| j.state != JobState::Dropped) {
                    let _ = writeln!(out, "{}", String::from_utf8_lossy(j.unique()));
                }
                out.push_str(".\n");
            }
            A::CancelJob { handle } => match self.cancel_job(&handle) {
                Ok(()) => out.push_str(OK),
                // Another node's, or no node's yet: the cluster's database answers.
                Err(CancelError::Unknown) if self.in_cluster() && self.parse_handle(&handle).is_some() => {
                    let seq = self.parse_handle(&handle).expect("checked");
                    self.ask_cluster_cancel(conn, seq, &handle);
                    return effect;
                }
                Err(CancelError::Unknown) => out.push_str("ERR UNKNOWN_JOB\r\n"),
                Err(CancelError::Running) => out.push_str("ERR JOB_RUNNING A+running+job+cannot+be+cancelled\r\n"),
            },
            A::CreateFunction { function } => {
                self.function_id(&function);
                out.push_str(OK);
            }
            A::DropFunction { function } => match self.function_ids.get(&function[..]).copied() {
                None => out.push_str("ERR function not found\r\n"),
                Some(fid) => {
                    let f = &self.functions[fid as usize];
                    if f.workers > 0 || f.running > 0 {
                        out.push_str("ERR there are still connected workers or executing clients\r\n");
                    } else if f.total() > 0 {
                        out.push_str("ERR there are still queued jobs\r\n");
                    } else {
                        self.function_ids.remove(&function[..]);
                        let f = &mut self.functions[fid as usize];
                        self.dropped_totals += f.counts.totals();
                        f.dropped = true;
                        // Nothing live is queued: what the queues still hold are dropped jobs.
                        f.fetched = [0; 3];
                        for key in std::mem::take(&mut f.queues).into_iter().flatten() {
                            self.jobs.remove(key as usize);
                        }
                        f.sleepers.clear();
                        out.push_str(OK);
                    }
                }
            },
            A::Stats => {
                let queued: u64 = live().map(|f| u64::from(f.queued_total() + f.scheduled)).sum();
                let running: u64 = live().map(|f| u64::from(f.running)).sum();
                let t = self.totals();
                let _ = writeln!(out, "connections\t{}", self.conns.len());
                let _ = writeln!(out, "jobs_queued\t{queued}\njobs_running\t{running}");
                let _ = writeln!(out, "jobs_submitted\t{}\njobs_restored\t{}", t.submitted, t.restored);
                let _ = writeln!(out, "jobs_completed\t{}\njobs_failed\t{}", t.completed, t.failed);
                let _ = writeln!(out, "jobs_cancelled\t{}", t.cancelled);
                let _ = writeln!(out, "jobs_retried\t{}\njobs_dead\t{}", t.retried, t.buried);
                match &info.job_log {
                    Some(log) => {
                        let _ = writeln!(out, "job_log\t{}", log.sink);
                        let _ = writeln!(out, "job_log_written\t{}", log.stats.written());
                        let _ = writeln!(out, "job_log_dropped\t{}", log.stats.dropped());
                    }
                    None => out.push_str("job_log\tnone\n"),
                }
                out.push_str(".\n");
            }
            A::Limit { function, limit } => {
                self.set_limit(&function, limit);
                out.push_str(OK);
            }
            A::LimitList => {
                for (name, paused, limit) in self.brakes() {
                    let state = if paused { "paused" } else { "running" };
                    let _ = writeln!(out, "{}	{state}	{limit}", String::from_utf8_lossy(&name));
                }
                out.push_str(".\n");
            }
            A::Retry { function, spec } => {
                let policy = match spec.as_str() {
                    "none" => Ok(None),
                    spec => super::RetryPolicy::parse(spec).map(Some),
                };
                match policy {
                    Ok(policy) => {
                        self.set_retry_policy(&function, policy);
                        out.push_str(OK);
                    }
                    Err(e) => {
                        let _ = write!(out, "ERR INVALID_ARGUMENTS {}\r\n", e.replace(' ', "+"));
                    }
                }
            }
            A::RetryList => {
                let policies = self.retry_policies();
                let default = policies.default.iter().map(|p| (&b"*"[..], p));
                let mut all: Vec<(&[u8], &super::RetryPolicy)> =
                    policies.by_function.iter().map(|(f, p)| (&f[..], p)).chain(default).collect();
                all.sort_by(|a, b| a.0.cmp(b.0));
                for (f, p) in all {
                    let backoff = if p.backoff == super::Backoff::Fixed { "fixed" } else { "exponential" };
                    let (base, max) = (humantime::format_duration(p.base), humantime::format_duration(p.max_delay));
                    let _ = writeln!(out, "{}\t{}\t{backoff}\t{base}\t{max}", String::from_utf8_lossy(f), p.retries);
                }
                out.push_str(".\n");
            }
            // Answered by the connection's task, which waits for the lifecycle store.
            A::Pause { .. } | A::Dead { .. } => {
                out.push_str("ERR LIFECYCLE_UNAVAILABLE The+lifecycle+store+is+not+open\r\n")
            }
            // Answered by the connection's task on a cluster node.
            A::Cluster => out.push_str("ERR NOT_A_CLUSTER This+server+runs+without+--cluster\r\n"),
            // Answered by the connection's task, which can wait for the sink, when a log exists.
            A::Log { .. } => out.push_str("ERR JOB_LOG_OFF The+job+log+is+off+(--job-log+none)\r\n"),
            A::Shutdown { graceful } => {
                if info.allow_shutdown {
                    effect = AdminEffect::Shutdown { graceful };
                    out.push_str(OK);
                } else {
                    out.push_str("ERR SHUTDOWN_DISABLED Start+the+server+with+--allow-shutdown\r\n");
                }
            }
        }
        self.send_text(conn, &out);
        effect
    }
}

/// Facts about the server the admin protocol reports.
pub struct AdminInfo {
    pub version: String,
    pub verbose: String,
    pub allow_shutdown: bool,
    pub job_log: Option<JobLogInfo>,
}

pub struct JobLogInfo {
    /// `embedded` or `mongodb`.
    pub sink: &'static str,
    pub stats: std::sync::Arc<gearbox_joblog::LogStats>,
}
