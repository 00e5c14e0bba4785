//! The text admin protocol, which gearmand and gearbox both speak: `getpid` for the server's
//! PID, `status` for a function's queue (and on a gearbox cluster node, `cluster` for the
//! jobs no node owns yet).

use anyhow::{bail, Context, Result};
use gearbox_client::{Connector, Stream};
use tokio::io::AsyncReadExt;

/// Longest admin line expected; a longer one means this is not an admin answer.
const MAX_LINE: usize = 64 * 1024;

pub(crate) struct Admin {
    stream: Stream,
    buf: Vec<u8>,
}

/// One function's line of `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FunctionStatus {
    /// Jobs queued or running.
    pub total: u64,
    pub running: u64,
}

impl FunctionStatus {
    pub fn queued(&self) -> u64 {
        self.total.saturating_sub(self.running)
    }
}

impl Admin {
    pub async fn connect(connector: &Connector, addr: &str) -> Result<Admin> {
        let stream = connector.connect(addr).await?;
        Ok(Admin { stream, buf: Vec::new() })
    }

    /// The server's answer to `getpid`: `OK <pid>`.
    pub async fn getpid(&mut self) -> Result<u32> {
        self.stream.send(b"getpid\n").await?;
        let line = self.line().await?;
        line.strip_prefix("OK ")
            .and_then(|pid| pid.trim().parse().ok())
            .with_context(|| format!("unexpected answer to getpid: {line:?}"))
    }

    /// `function`'s jobs as `status` counts them, plus, on a gearbox cluster node, those no
    /// node owns yet (from `cluster`, as of the cluster's last view; none elsewhere).
    pub async fn status(&mut self, function: &str) -> Result<FunctionStatus> {
        let mut found = self.node_status(function).await?;
        found.total += self.unowned(function).await?;
        Ok(found)
    }

    /// `function`'s unowned jobs in the `cluster` answer: `unowned \t - \t - \t FUNCTION \t
    /// QUEUED \t 0 \t 0` lines; 0 from a server that is no cluster node (it answers `ERR`).
    async fn unowned(&mut self, function: &str) -> Result<u64> {
        self.stream.send(b"cluster\n").await?;
        let mut unowned = 0;
        loop {
            let line = self.line().await?;
            if line == "." || line.starts_with("ERR") {
                return Ok(unowned);
            }
            let fields: Vec<&str> = line.split('\t').collect();
            if fields.len() == 7 && fields[0] == "unowned" && fields[3] == function {
                unowned = fields[4].parse().with_context(|| format!("bad number in cluster line {line:?}"))?;
            }
        }
    }

    /// `function`'s line of `status` (all zero when the server does not list it).
    async fn node_status(&mut self, function: &str) -> Result<FunctionStatus> {
        self.stream.send(b"status\n").await?;
        let mut found = FunctionStatus::default();
        loop {
            let line = self.line().await?;
            if line == "." {
                return Ok(found);
            }
            // FUNCTION \t TOTAL \t RUNNING \t AVAILABLE_WORKERS, split from the right in case
            // the name holds a tab.
            let fields: Vec<&str> = line.rsplitn(4, '\t').collect();
            if fields.len() != 4 {
                bail!("unexpected line in the answer to status: {line:?}");
            }
            if fields[3] == function {
                let number = |s: &str| s.parse().with_context(|| format!("bad number in status line {line:?}"));
                found = FunctionStatus { total: number(fields[2])?, running: number(fields[1])? };
            }
        }
    }

    /// The next line, without its line end.
    async fn line(&mut self) -> Result<String> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&self.buf[..end]).trim_end_matches('\r').to_owned();
                self.buf.drain(..=end);
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE {
                bail!("the server's admin answer has no line end");
            }
            if self.stream.read_buf(&mut self.buf).await.context("reading an admin answer")? == 0 {
                bail!("the server closed the admin connection");
            }
        }
    }
}
