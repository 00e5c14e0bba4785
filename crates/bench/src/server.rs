//! The server process seen through /proc: its PID (asked with the admin command `getpid`,
//! which gearmand and gearbox both answer with `OK <pid>`), CPU time and resident memory.

use std::time::Duration;

use anyhow::{bail, Result};
use gearbox_client::Connector;

use crate::admin::Admin;

/// Unit of utime/stime in /proc/PID/stat: USER_HZ, 100 on every Linux ABI.
const TICKS_PER_SEC: u64 = 100;

pub(crate) struct ServerProc {
    pub pid: u32,
    /// The process name from /proc/PID/comm, shown so a wrong PID is easy to spot.
    pub name: String,
}

impl ServerProc {
    /// The server process: `explicit` if given, otherwise whatever `getpid` answers.
    /// `None` (with a warning) when the server does not say or runs on another host.
    pub async fn find(connector: &Connector, addr: &str, explicit: Option<u32>) -> Result<Option<ServerProc>> {
        let pid = match explicit {
            Some(pid) => pid,
            None => match tokio::time::timeout(Duration::from_secs(5), ask_pid(connector, addr)).await {
                Ok(Ok(pid)) => pid,
                Ok(Err(e)) => {
                    eprintln!("warning: no PID for {addr} ({e:#}); its CPU and memory not measured");
                    return Ok(None);
                }
                Err(_) => {
                    eprintln!("warning: `getpid` got no answer from {addr}; its CPU and memory not measured");
                    return Ok(None);
                }
            },
        };
        match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            Ok(name) => Ok(Some(ServerProc { pid, name: name.trim_end().to_owned() })),
            Err(_) if explicit.is_some() => bail!("no process {pid} on this host"),
            Err(_) => {
                eprintln!(
                    "warning: the PID of {addr}, {pid}, is not on this host; \
                     its CPU and memory not measured"
                );
                Ok(None)
            }
        }
    }

    /// User plus system CPU time used so far by all the server's threads, in microseconds.
    pub fn cpu_us(&self) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // The command name may hold spaces and parentheses; fields resume after the last ')'
        // with field 3 (state), so utime (14) and stime (15) are the 12th and 13th.
        let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(11);
        let utime: u64 = fields.next()?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        Some((utime + stime) * 1_000_000 / TICKS_PER_SEC)
    }

    /// Resident set size (VmRSS) in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line["VmRSS:".len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    }
}

async fn ask_pid(connector: &Connector, addr: &str) -> Result<u32> {
    Admin::connect(connector, addr).await?.getpid().await
}
