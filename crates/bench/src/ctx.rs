//! What every mode shares: the servers, the deadline, the tasks a run started (whose errors
//! all end up in one channel), and the building blocks the modes are made of.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use gearbox_client::Connector;
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
    /// The servers, HOST:PORT, in --server's order.
    pub addrs: Vec<String>,
    /// How to connect: plaintext or TLS.
    pub connector: Arc<Connector>,
    pub function: Bytes,
    pub run_id: String,
    pub clients: usize,
    /// Worker connections on each server.
    pub workers: usize,
    inflight: usize,
    /// Each server's process, where it runs on this host and its PID is known.
    pub procs: Vec<Option<ServerProc>>,
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
        let connector = Arc::new(args.connector()?);
        let mut procs = Vec::with_capacity(args.server.len());
        for (i, addr) in args.server.iter().enumerate() {
            let found = ServerProc::find(&connector, addr, args.server_pid.get(i).copied());
            procs.push(
                tokio::time::timeout_at(deadline, found)
                    .await
                    .with_context(|| format!("timed out looking for the PID of {addr}"))??,
            );
        }
        let (fail_tx, fail_rx) = mpsc::unbounded_channel();
        let mut seed = std::collections::hash_map::RandomState::new().build_hasher();
        seed.write_u128(std::time::UNIX_EPOCH.elapsed()?.as_nanos());
        Ok(Ctx {
            addrs: args.server.clone(),
            connector,
            function: Bytes::from(args.function.clone().into_bytes()),
            run_id: format!("{:08x}", seed.finish() as u32),
            clients,
            workers: args.workers as usize,
            inflight: args.inflight as usize,
            procs,
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

    /// The servers for the header line: each address, with its process name and PID if known.
    pub fn describe_servers(&self) -> String {
        let each = self.addrs.iter().zip(&self.procs).map(|(addr, proc)| match proc {
            Some(p) => format!("{addr} ({}, pid {})", p.name, p.pid),
            None => addr.clone(),
        });
        each.collect::<Vec<_>>().join(", ")
    }

    /// Every server's CPU time now (see [`Ctx::cpu_since`]).
    pub fn cpu_mark(&self) -> CpuMark {
        CpuMark(self.procs.iter().map(|p| p.as_ref().and_then(ServerProc::cpu_us)).collect())
    }

    /// CPU time the servers used since `mark`, in microseconds: the sum over those whose time
    /// could be read both then and now (a server killed meanwhile drops out); `None` if none.
    pub fn cpu_since(&self, mark: &CpuMark) -> Option<u64> {
        let now = self.cpu_mark();
        let used = mark.0.iter().zip(&now.0).filter_map(|(&then, &now)| Some(now?.saturating_sub(then?)));
        used.reduce(|a, b| a + b)
    }

    /// The single server's resident memory, which `mode` cannot do without.
    pub fn rss(&self, mode: &str) -> Result<u64> {
        self.procs[0]
            .as_ref()
            .with_context(|| format!("{mode} mode needs the server's PID (getpid or --server-pid)"))?
            .rss_bytes()
            .context("cannot read the server's VmRSS")
    }

    /// Starts `--workers` workers on every server and waits until each has been answered.
    pub async fn start_workers(&mut self, jobs: &Arc<JobSet>) -> Result<()> {
        let addrs = self.addrs.clone();
        self.start_workers_on(jobs, &addrs).await
    }

    /// Starts `--workers` workers on each of `addrs` and waits until the server has answered
    /// each of them.
    pub async fn start_workers_on(&mut self, jobs: &Arc<JobSet>, addrs: &[String]) -> Result<()> {
        let mut ready = Vec::with_capacity(self.workers * addrs.len());
        for addr in addrs {
            for _ in 0..self.workers {
                let (tx, rx) = oneshot::channel();
                let worker =
                    jobs::worker(self.connector.clone(), addr.clone(), self.function.clone(), jobs.clone(), tx);
                self.spawn("worker", worker);
                ready.push(rx);
            }
        }
        self.wait("starting the workers", async {
            for rx in ready {
                let _ = rx.await;
            }
        })
        .await
    }

    /// Connects `--clients` clients, spread over the servers round-robin.
    pub async fn connect_clients(&mut self) -> Result<Vec<Conn>> {
        let addrs = self.addrs.clone();
        self.connect_clients_to(&addrs).await
    }

    /// Connects `--clients` clients, spread over `addrs` round-robin.
    pub async fn connect_clients_to(&mut self, addrs: &[String]) -> Result<Vec<Conn>> {
        let mut conns = Vec::with_capacity(self.clients);
        for addr in addrs.iter().cycle().take(self.clients) {
            let connector = self.connector.clone();
            conns.push(self.wait("connecting", Conn::connect(&connector, addr)).await??);
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

    /// Waits for the last job to run. With `phase` (its start and the servers' CPU time then),
    /// the measured phase ends with the last WORK_COMPLETE. Then waits a little longer, so a
    /// job run twice is seen.
    pub async fn await_jobs(
        &mut self,
        jobs: &JobSet,
        phase: Option<(Instant, CpuMark)>,
        report: &mut Report,
    ) -> Result<()> {
        self.wait("waiting for the workers", jobs.done.notified()).await?;
        if let Some((start, cpu)) = phase {
            report.server_cpu_us = self.cpu_since(&cpu);
            let end = jobs.finished_at().context("jobs done without an end time")?;
            report.elapsed = Some(end - start);
        }
        tokio::time::sleep(DUPLICATE_GRACE).await;
        Ok(())
    }
}

/// Each server's CPU time at one instant, in microseconds (`None`: its PID is unknown, or it
/// has exited).
pub(crate) struct CpuMark(Vec<Option<u64>>);

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
