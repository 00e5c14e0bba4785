//! The modes bg, fg and mem.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use gearbox_proto::{PacketType, Response};
use tokio::sync::mpsc;

use crate::conn::{unexpected, Conn};
use crate::ctx::Ctx;
use crate::jobs::{JobSet, Submitter};
use crate::report::Report;

/// Wait after the last JOB_CREATED before reading the server's RSS (mem).
const RSS_SETTLE: Duration = Duration::from_millis(300);

impl Ctx {
    pub async fn bg(&mut self, jobs: &Arc<JobSet>, report: &mut Report) -> Result<()> {
        self.start_workers(jobs).await?;
        let conns = self.connect_clients().await?;
        let cpu = self.cpu_mark();
        let start = Instant::now();
        self.submit_all_bg(conns, jobs, 0..jobs.count()).await?;
        self.await_jobs(jobs, Some((start, cpu)), report).await
    }

    pub async fn fg(&mut self, jobs: &Arc<JobSet>, report: &mut Report) -> Result<()> {
        self.start_workers(jobs).await?;
        let conns = self.connect_clients().await?;
        let next = Arc::new(AtomicU64::new(0));
        let (lat_tx, mut lat_rx) = mpsc::unbounded_channel();
        let cpu = self.cpu_mark();
        let start = Instant::now();
        for conn in conns {
            let submitter = Submitter::new(self.function.clone(), jobs);
            let (next, lat_tx, count) = (next.clone(), lat_tx.clone(), jobs.count());
            self.spawn("client", async move {
                let latencies = submit_fg(conn, submitter, count, &next).await?;
                let _ = lat_tx.send(latencies);
                Ok(())
            });
        }
        let clients = self.clients;
        let latencies = self
            .wait("running foreground jobs", async {
                let mut all = Vec::with_capacity(jobs.count() as usize);
                for _ in 0..clients {
                    all.extend(lat_rx.recv().await.unwrap_or_default());
                }
                all
            })
            .await?;
        report.elapsed = Some(start.elapsed());
        report.server_cpu_us = self.cpu_since(&cpu);
        report.latencies_ns = latencies;
        self.await_jobs(jobs, None, report).await
    }

    pub async fn mem(&mut self, jobs: &Arc<JobSet>, report: &mut Report) -> Result<()> {
        let conns = self.connect_clients().await?;
        let before = self.rss("mem")?;
        let start = Instant::now();
        self.submit_all_bg(conns, jobs, 0..jobs.count()).await?;
        report.submit_elapsed = Some(start.elapsed());
        tokio::time::sleep(RSS_SETTLE).await;
        report.rss_growth = Some(self.rss("mem")? as i64 - before as i64);

        let cpu = self.cpu_mark();
        let start = Instant::now();
        self.start_workers(jobs).await?;
        self.await_jobs(jobs, Some((start, cpu)), report).await
    }
}

/// Submits foreground jobs one at a time, numbers taken from `next` until `count`; returns
/// each job's latency from submit to WORK_COMPLETE, in nanoseconds.
async fn submit_fg(mut conn: Conn, mut submitter: Submitter, count: u64, next: &AtomicU64) -> Result<Vec<u64>> {
    let mut latencies = Vec::new();
    loop {
        let n = next.fetch_add(1, Relaxed);
        if n >= count {
            return Ok(latencies);
        }
        submitter.push(&mut conn, PacketType::SubmitJob, n);
        let start = Instant::now();
        conn.flush().await?;
        let handle = match conn.recv().await? {
            Response::JobCreated { handle } => handle,
            other => return Err(unexpected("client", &other)),
        };
        loop {
            match conn.recv().await? {
                Response::WorkComplete { handle: h, .. } if h == handle => break,
                Response::WorkStatus { .. } | Response::WorkData { .. } | Response::WorkWarning { .. } => {}
                other => return Err(unexpected("client", &other)),
            }
        }
        latencies.push(start.elapsed().as_nanos() as u64);
    }
}
