//! The mode takeover: a gearbox cluster node SIGKILLed while it owns every job of the run,
//! some of them running, and how soon the other nodes run them all.
//!
//! 1. `--workers` holding workers connect to the victim (the first server) and ask for work;
//!    each keeps the one job it is given and never answers for it, so that the victim dies
//!    with jobs running as well as queued.
//! 2. `--workers` ordinary workers connect to each other server before anything is submitted:
//!    they are idle, so their nodes look for unowned jobs, and find none.
//! 3. The clients submit every job to the victim, which owns them because it has workers for
//!    the function (the holders), and wait for every JOB_CREATED.
//! 4. Once every holder has its job, the victim is SIGKILLed. Its jobs stay its own until its
//!    lease runs out; then a survivor takes them over and the survivors' workers claim and run
//!    them, each exactly once, the held ones included.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use gearbox_client::Connector;
use gearbox_proto::{PacketType, Response};
use tokio::sync::oneshot;

use crate::conn::{unexpected, Conn};
use crate::ctx::Ctx;
use crate::jobs::JobSet;
use crate::report::{Report, Takeover};

impl Ctx {
    pub async fn takeover(&mut self, jobs: &Arc<JobSet>, report: &mut Report) -> Result<()> {
        let addrs = self.addrs.clone();
        let (victim, survivors) = addrs.split_first().context("takeover needs a victim and survivors")?;
        let pid = self.procs[0].as_ref().map(|p| p.pid).with_context(|| {
            format!("takeover kills {victim}, the first server: its PID must be known on this host (getpid or --server-pid)")
        })?;
        if jobs.count() < self.workers as u64 {
            bail!("{} holding workers need at least as many jobs, not {}", self.workers, jobs.count());
        }

        let (mut ready, mut held) = (Vec::new(), Vec::new());
        for _ in 0..self.workers {
            let (ready_tx, ready_rx) = oneshot::channel();
            let (held_tx, held_rx) = oneshot::channel();
            self.spawn(
                "holding worker",
                hold(self.connector.clone(), victim.clone(), self.function.clone(), jobs.clone(), ready_tx, held_tx),
            );
            ready.push(ready_rx);
            held.push(held_rx);
        }
        self.all_fire("starting the holding workers", ready).await?;
        self.start_workers_on(jobs, survivors).await?;
        let conns = self.connect_clients_to(std::slice::from_ref(victim)).await?;
        self.submit_all_bg(conns, jobs, 0..jobs.count()).await?;
        self.all_fire("waiting for each holding worker's job", held).await?;
        if jobs.started_at().is_some() {
            bail!("a survivor ran a job before the victim was killed: the victim did not own every job");
        }

        let cpu = self.cpu_mark();
        // SAFETY: kill(2) touches no memory of ours.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("SIGKILL to {victim}, pid {pid}"));
        }
        let killed = Instant::now();
        self.await_jobs(jobs, Some((killed, cpu)), report).await?;
        let first = jobs.started_at().context("jobs done without a start time")?;
        let last = jobs.finished_at().context("jobs done without an end time")?;
        report.takeover = Some(Takeover { first: first - killed, last: last - killed });
        Ok(())
    }

    /// Waits until every one of `signals` has fired. One whose sender was dropped belongs to a
    /// task that failed: its error, on its way through the failure channel, is waited for.
    async fn all_fire(&mut self, doing: &str, signals: Vec<oneshot::Receiver<()>>) -> Result<()> {
        let fired = self
            .wait(doing, async {
                let mut all = true;
                for rx in signals {
                    all &= rx.await.is_ok();
                }
                all
            })
            .await?;
        if !fired {
            self.wait(doing, std::future::pending::<()>()).await?;
        }
        Ok(())
    }
}

/// A worker that takes one job and keeps it: CAN_DO, GRAB_JOB_UNIQ (PRE_SLEEP on NO_JOB until
/// a NOOP), then nothing, its connection left open so that the job stays running on the
/// server. `ready` fires once the server has answered (its CAN_DO is registered), `held` once
/// it has its job. Runs until aborted.
async fn hold(
    connector: Arc<Connector>,
    addr: String,
    function: Bytes,
    jobs: Arc<JobSet>,
    ready: oneshot::Sender<()>,
    held: oneshot::Sender<()>,
) -> Result<()> {
    let mut conn = Conn::connect(&connector, &addr).await?;
    conn.push(PacketType::CanDo, &[&function]);
    conn.push(PacketType::GrabJobUniq, &[]);
    conn.flush().await?;
    let mut ready = Some(ready);
    let mut sleeping = false;
    loop {
        let response = conn.recv().await?;
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        match response {
            Response::NoJob => {
                conn.push(PacketType::PreSleep, &[]);
                sleeping = true;
            }
            Response::Noop => {
                if std::mem::take(&mut sleeping) {
                    conn.push(PacketType::GrabJobUniq, &[]);
                }
            }
            Response::JobAssignUniq { unique, .. } => {
                if jobs.job_number(&unique).is_none() {
                    bail!("a holding worker got a job not of this run: {:?}", String::from_utf8_lossy(&unique));
                }
                let _ = held.send(());
                return std::future::pending().await;
            }
            other => return Err(unexpected("holding worker", &other)),
        }
        conn.flush().await?;
    }
}
