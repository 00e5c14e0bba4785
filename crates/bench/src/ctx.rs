//! What every mode shares: the server, the deadline, the tasks a run started (whose errors
//! all end up in one channel), and the building blocks the modes are made of.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use gearbox_proto::{PacketType, Response};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::conn::{unexpected, Conn};
use crate::jobs::{self, JobSet, Submitter};
use crate::report::Report;
use crate::server::ServerProc;
use crate::BenchArgs;

/// How long to keep the workers after the last job ran, so a job run twice is seen.
const DUPLICATE_GRACE: Duration = Duration::from_millis(200);

pub(crate) struct Ctx {
    pub addr: String,
    pub function: Bytes,
    pub run_id: String,
    pub clients: usize,
    pub workers: usize,
    inflight: usize,
    pub server: Option<ServerProc>,
    deadline: tokio::time::Instant,
    timeout: u64,
    /// Every worker and client; aborted when the run ends.
    pub tasks: JoinSet<()>,
    fail_tx: mpsc::UnboundedSender<anyhow::Error>,
    fail_rx: mpsc::UnboundedReceiver<anyhow::Error>,
}

impl Ctx {
    pub async fn new(args: &BenchArgs, clients: usize) -> Result<Ctx> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
        let server = tokio::time::timeout_at(deadline, ServerProc::find(&args.server, args.server_pid))
            .await
            .context("timed out looking for the server's PID")??;
        let (fail_tx, fail_rx) = mpsc::unbounded_channel();
        let mut seed = std::collections::hash_map::RandomState::new().build_hasher();
        seed.write_u128(std::time::UNIX_EPOCH.elapsed()?.as_nanos());
        Ok(Ctx {
            addr: args.server.clone(),
            function: Bytes::from(args.function.clone().into_bytes()),
            run_id: format!("{:08x}", seed.finish() as u32),
            clients,
            workers: args.workers as usize,
            inflight: args.inflight as usize,
            server,
            deadline,
            timeout: args.timeout,
            tasks: JoinSet::new(),
            fail_tx,
            fail_rx,
        })
    }

    /// Awaits `fut`, unless a task fails or the deadline passes first.
    pub async fn wait<T>(&mut self, doing: &str, fut: impl Future<Output = T>) -> Result<T> {
        tokio::select! {
            value = fut => Ok(value),
            Some(e) = self.fail_rx.recv() => Err(e),
            () = tokio::time::sleep_until(self.deadline) => {
                bail!("timed out after {} s {doing}", self.timeout)
            }
        }
    }

    /// Starts `fut` as a task whose error, if any, fails the run.
    pub fn spawn<F>(&mut self, what: &'static str, fut: F)
    where
        F: Future<Output = Result<()>> + Send + 'static,
    {
        let fails = self.fail_tx.clone();
        self.tasks.spawn(async move {
            if let Err(e) = fut.await {
                let _ = fails.send(e.context(what));
            }
        });
    }

    pub fn cpu_us(&self) -> Option<u64> {
        self.server.as_ref()?.cpu_us()
    }

    pub fn cpu_since(&self, start: Option<u64>) -> Option<u64> {
        Some(self.cpu_us()?.saturating_sub(start?))
    }

    /// The server's resident memory, which `mode` cannot do without.
    pub fn rss(&self, mode: &str) -> Result<u64> {
        self.server
            .as_ref()
            .with_context(|| format!("{mode} mode needs the server's PID (getpid or --server-pid)"))?
            .rss_bytes()
            .context("cannot read the server's VmRSS")
    }

    /// Starts the workers and waits until the server has answered each of them.
    pub async fn start_workers(&mut self, jobs: &Arc<JobSet>) -> Result<()> {
        let mut ready = Vec::with_capacity(self.workers);
        for _ in 0..self.workers {
            let (tx, rx) = oneshot::channel();
            let worker = jobs::worker(self.addr.clone(), self.function.clone(), jobs.clone(), tx);
            self.spawn("worker", worker);
            ready.push(rx);
        }
        self.wait("starting the workers", async {
            for rx in ready {
                let _ = rx.await;
            }
        })
        .await
    }

    pub async fn connect_clients(&mut self) -> Result<Vec<Conn>> {
        let mut conns = Vec::with_capacity(self.clients);
        for _ in 0..self.clients {
            let addr = self.addr.clone();
            conns.push(self.wait("connecting", Conn::connect(&addr)).await??);
        }
        Ok(conns)
    }

    /// Spreads jobs `range` over `conns`, each keeping `--inflight` SUBMIT_JOB_BG in flight,
    /// waits for every JOB_CREATED, and hands the connections back.
    pub async fn submit_all_bg(
        &mut self,
        conns: Vec<Conn>,
        jobs: &Arc<JobSet>,
        range: Range<u64>,
    ) -> Result<Vec<Conn>> {
        let (n, count) = (conns.len() as u64, range.end - range.start);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        for (i, mut conn) in (0..).zip(conns) {
            let submitter = Submitter::new(self.function.clone(), jobs);
            let part = range.start + count * i / n..range.start + count * (i + 1) / n;
            let (done, inflight) = (done_tx.clone(), self.inflight);
            self.spawn("client", async move {
                submit_bg(&mut conn, submitter, part, inflight).await?;
                let _ = done.send(conn);
                Ok(())
            });
        }
        self.wait("waiting for JOB_CREATED", async {
            let mut conns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                conns.extend(done_rx.recv().await);
            }
            conns
        })
        .await
    }

    /// Waits for the last job to run. With `phase` (its start and the server's CPU time then),
    /// the measured phase ends with the last WORK_COMPLETE. Then waits a little longer, so a
    /// job run twice is seen.
    pub async fn await_jobs(
        &mut self,
        jobs: &JobSet,
        phase: Option<(Instant, Option<u64>)>,
        report: &mut Report,
    ) -> Result<()> {
        self.wait("waiting for the workers", jobs.done.notified()).await?;
        if let Some((start, cpu)) = phase {
            report.server_cpu_us = self.cpu_since(cpu);
            let end = jobs.finished_at().context("jobs done without an end time")?;
            report.elapsed = Some(end - start);
        }
        tokio::time::sleep(DUPLICATE_GRACE).await;
        Ok(())
    }
}

/// Submits jobs `range` with `inflight` of them awaiting their JOB_CREATED at any time; every
/// reply is answered by the next submit, all replies of one read by a single write.
async fn submit_bg(conn: &mut Conn, mut submitter: Submitter, range: Range<u64>, inflight: usize) -> Result<()> {
    let mut next = range.start;
    let mut pending = 0;
    while next < range.end && pending < inflight {
        submitter.push(conn, PacketType::SubmitJobBg, next);
        next += 1;
        pending += 1;
    }
    conn.flush().await?;
    while pending > 0 {
        conn.fill().await?;
        while let Some(response) = conn.next()? {
            let Response::JobCreated { .. } = response else {
                return Err(unexpected("client", &response));
            };
            pending -= 1;
            if next < range.end {
                submitter.push(conn, PacketType::SubmitJobBg, next);
                next += 1;
                pending += 1;
            }
        }
        conn.flush().await?;
    }
    Ok(())
}
