//! The text admin protocol: one command per line, whitespace-separated words, commands
//! matched without regard to case (as gearmand does).

use bytes::Bytes;

/// An admin command with its arguments checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminCommand {
    Status,
    PriorityStatus,
    Workers,
    Version,
    GetPid,
    Verbose,
    /// `maxqueue FUNC [ALL | HIGH NORMAL LOW]`; no sizes resets to unlimited. Zero is unlimited.
    MaxQueue {
        function: Bytes,
        limits: [u32; 3],
    },
    /// `maxqueue` alone: lists the limits in force (gearmand cannot read them back).
    MaxQueueList,
    ShowJobs,
    ShowUniqueJobs,
    CancelJob {
        handle: Bytes,
    },
    CreateFunction {
        function: Bytes,
    },
    DropFunction {
        function: Bytes,
    },
    Shutdown {
        graceful: bool,
    },
    /// gearbox's `log QUERY`: job-log records as JSON lines, then `.`. The query is a URL
    /// query string (`function=f&status=fail&since=1h&limit=20`).
    Log {
        query: String,
    },
    /// gearbox's `stats`: `NAME VALUE` lines (counters, job-log health), then `.`.
    Stats,
    /// gearbox's `cluster`: every node of a cluster, its functions and the totals, then `.`.
    Cluster,
    /// gearbox's `pause FUNCTION` / `resume FUNCTION`: `OK`.
    Pause {
        function: Bytes,
        paused: bool,
    },
    /// gearbox's `limit FUNCTION N`: at most N of its jobs run at once (0: no limit); `OK`.
    /// `limit` alone lists paused and limited functions.
    Limit {
        function: Bytes,
        limit: u32,
    },
    LimitList,
    /// gearbox's `retry FUNCTION RETRIES[/BASE]` (`none` removes it; `*` is every function):
    /// `OK`. `retry` alone lists the policies.
    Retry {
        function: Bytes,
        spec: String,
    },
    RetryList,
    /// gearbox's `dead list [FUNCTION]`, `dead show HANDLE`, `dead retry HANDLE…|all
    /// [FUNCTION]`, `dead delete HANDLE…|all [FUNCTION]`: JSON lines then `.`, or `OK N`.
    Dead {
        words: Vec<Bytes>,
    },
}

/// A line that is not a valid command; [`AdminError::reply`] gives gearmand's answer to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminError {
    Empty,
    UnknownCommand(String),
    InvalidArguments(String),
    UnknownShowArguments,
}

impl AdminError {
    pub fn reply(&self) -> String {
        match self {
            AdminError::Empty => "ERR UNKNOWN_COMMAND Unknown+server+commandNULL\r\n".into(),
            AdminError::UnknownCommand(c) => {
                format!("ERR UNKNOWN_COMMAND Unknown+server+command{c}\r\n")
            }
            AdminError::InvalidArguments(c) => {
                format!("ERR INVALID_ARGUMENTS An+incomplete+set+of+arguments+was+sent+to+this+command+{c}\r\n")
            }
            AdminError::UnknownShowArguments => "ERR UNKNOWN_SHOW_ARGUMENTS\r\n".into(),
        }
    }
}

/// The reply to a successful command that returns nothing else.
pub const OK: &str = "OK\r\n";

impl AdminCommand {
    pub fn parse(line: &Bytes) -> Result<AdminCommand, AdminError> {
        let words: Vec<Bytes> =
            line.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty()).map(|w| line.slice_ref(w)).collect();
        let Some(first) = words.first() else {
            return Err(AdminError::Empty);
        };
        let name = String::from_utf8_lossy(first).into_owned();
        let is = |i: usize, word: &str| words.get(i).is_some_and(|w| w.eq_ignore_ascii_case(word.as_bytes()));
        let invalid = || AdminError::InvalidArguments(name.clone());
        let cmd = match name.to_ascii_lowercase().as_str() {
            "status" => AdminCommand::Status,
            "prioritystatus" => AdminCommand::PriorityStatus,
            "workers" => AdminCommand::Workers,
            "version" => AdminCommand::Version,
            "getpid" => AdminCommand::GetPid,
            "verbose" => AdminCommand::Verbose,
            "maxqueue" => match words.len() {
                1 => AdminCommand::MaxQueueList,
                2 | 3 | 5 => {
                    let size = |i: usize| words.get(i).map_or(0, |w| atoi_non_negative(w));
                    let limits = if words.len() == 5 { [size(2), size(3), size(4)] } else { [size(2); 3] };
                    AdminCommand::MaxQueue { function: words[1].clone(), limits }
                }
                _ => return Err(invalid()),
            },
            "show" if words.len() == 2 && is(1, "jobs") => AdminCommand::ShowJobs,
            "show" if words.len() == 3 && is(1, "unique") && is(2, "jobs") => AdminCommand::ShowUniqueJobs,
            "show" => return Err(AdminError::UnknownShowArguments),
            "cancel" if words.len() == 3 && is(1, "job") => AdminCommand::CancelJob { handle: words[2].clone() },
            "create" if words.len() == 3 && is(1, "function") => {
                AdminCommand::CreateFunction { function: words[2].clone() }
            }
            "drop" if words.len() == 3 && is(1, "function") => {
                AdminCommand::DropFunction { function: words[2].clone() }
            }
            "cancel" | "create" | "drop" => return Err(invalid()),
            "shutdown" if words.len() == 1 => AdminCommand::Shutdown { graceful: false },
            "shutdown" if words.len() == 2 && is(1, "graceful") => AdminCommand::Shutdown { graceful: true },
            "shutdown" => return Err(invalid()),
            "log" => {
                let rest = String::from_utf8_lossy(&line[..]).trim().get(3..).unwrap_or_default().trim().to_owned();
                AdminCommand::Log { query: rest }
            }
            "stats" if words.len() == 1 => AdminCommand::Stats,
            "cluster" if words.len() == 1 => AdminCommand::Cluster,
            "pause" | "resume" if words.len() == 2 => {
                AdminCommand::Pause { function: words[1].clone(), paused: is(0, "pause") }
            }
            "limit" if words.len() == 1 => AdminCommand::LimitList,
            "limit" if words.len() == 3 => {
                let limit = std::str::from_utf8(&words[2]).ok().and_then(|n| n.parse().ok()).ok_or_else(invalid)?;
                AdminCommand::Limit { function: words[1].clone(), limit }
            }
            "retry" if words.len() == 1 => AdminCommand::RetryList,
            "retry" if words.len() == 3 => AdminCommand::Retry {
                function: words[1].clone(),
                spec: String::from_utf8_lossy(&words[2]).into_owned(),
            },
            "dead" if words.len() >= 2 => AdminCommand::Dead { words: words[1..].to_vec() },
            "pause" | "resume" | "limit" | "retry" | "dead" => return Err(invalid()),
            _ => return Err(AdminError::UnknownCommand(name)),
        };
        Ok(cmd)
    }
}

/// gearmand reads sizes with `atoi` and treats negative ones as zero (no limit).
fn atoi_non_negative(w: &[u8]) -> u32 {
    if w.first() == Some(&b'-') {
        0
    } else {
        crate::message::parse_u32_lenient(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &'static str) -> Result<AdminCommand, AdminError> {
        AdminCommand::parse(&Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn commands_parse_case_insensitively() {
        assert_eq!(parse("STATUS"), Ok(AdminCommand::Status));
        assert_eq!(parse("Show Unique Jobs"), Ok(AdminCommand::ShowUniqueJobs));
        assert_eq!(parse("  workers  "), Ok(AdminCommand::Workers));
        assert_eq!(
            parse("create function resize"),
            Ok(AdminCommand::CreateFunction { function: Bytes::from_static(b"resize") })
        );
    }

    #[test]
    fn maxqueue_takes_one_or_three_sizes() {
        let f = Bytes::from_static(b"f");
        assert_eq!(parse("maxqueue f"), Ok(AdminCommand::MaxQueue { function: f.clone(), limits: [0; 3] }));
        assert_eq!(parse("maxqueue f 10"), Ok(AdminCommand::MaxQueue { function: f.clone(), limits: [10; 3] }));
        assert_eq!(parse("maxqueue f 1 -2 3"), Ok(AdminCommand::MaxQueue { function: f, limits: [1, 0, 3] }));
        assert_eq!(parse("maxqueue"), Ok(AdminCommand::MaxQueueList));
        assert!(matches!(parse("maxqueue f 1 2"), Err(AdminError::InvalidArguments(_))));
    }

    #[test]
    fn bad_lines_get_gearmand_errors() {
        assert_eq!(parse("bogus").unwrap_err().reply(), "ERR UNKNOWN_COMMAND Unknown+server+commandbogus\r\n");
        assert_eq!(parse("show me").unwrap_err(), AdminError::UnknownShowArguments);
        assert!(matches!(parse("drop function"), Err(AdminError::InvalidArguments(_))));
        assert!(matches!(parse("shutdown now"), Err(AdminError::InvalidArguments(_))));
        assert_eq!(parse(""), Err(AdminError::Empty));
    }

    #[test]
    fn log_keeps_its_query_string() {
        assert_eq!(parse("log"), Ok(AdminCommand::Log { query: String::new() }));
        assert_eq!(parse("LOG  status=fail&limit=3 \r"), Ok(AdminCommand::Log { query: "status=fail&limit=3".into() }));
        assert_eq!(parse("stats"), Ok(AdminCommand::Stats));
        assert_eq!(parse("CLUSTER"), Ok(AdminCommand::Cluster));
    }
}
