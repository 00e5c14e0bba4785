//! The modes depth and drain: a queue filled step by step with no worker (how the
//! acknowledgement rate and the server's memory change with depth), then, typically after the
//! server restarted, drained by workers that check every job ran exactly once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::admin::Admin;
use crate::ctx::Ctx;
use crate::jobs::JobSet;
use crate::report::{Report, Step};

/// The unique keys' prefix, the same in every run so that a drain (another process, perhaps
/// after a server restart) knows the jobs a depth run queued.
pub(crate) const PREFIX: &str = "d-";

/// How often drain asks whether the server still has jobs for the function.
const LOST_POLL: Duration = Duration::from_millis(500);

impl Ctx {
    pub async fn depth(&mut self, jobs: &Arc<JobSet>, step: u64, report: &mut Report) -> Result<()> {
        let function = String::from_utf8_lossy(&self.function).into_owned();
        let addr = self.addrs[0].clone();
        let connector = self.connector.clone();
        let mut admin = self.wait("connecting", Admin::connect(&connector, &addr)).await??;
        let queued = self.wait("asking for status", admin.status(&function)).await??.total;
        if queued > 0 {
            bail!(
                "{queued} {function} jobs are queued already: depth starts from an empty queue \
                 (drain them with --mode drain, or use another --function)"
            );
        }
        let mut conns = self.connect_clients().await?;
        let before = self.rss("depth")?;
        Step::print_header();
        let mut next = 0;
        while next < jobs.count() {
            let range = next..jobs.count().min(next + step);
            next = range.end;
            let cpu = self.cpu_mark();
            let start = Instant::now();
            conns = self.submit_all_bg(conns, jobs, range.clone()).await?;
            let elapsed = start.elapsed();
            let cpu_us = self.cpu_since(&cpu);
            let depth = self.wait("asking for status", admin.status(&function)).await??.queued();
            let rss = self.rss("depth")?;
            let step = Step {
                depth,
                jobs: range.end - range.start,
                elapsed,
                rss,
                rss_growth: rss as i64 - before as i64,
                cpu_us,
            };
            step.print_row(report.steps.len() + 1);
            report.steps.push(step);
        }
        report.submit_elapsed = Some(report.steps.iter().map(|s| s.elapsed).sum());
        report.rss_growth = report.steps.last().map(|s| s.rss_growth);
        let depth = report.steps.last().map_or(0, |s| s.depth);
        if depth != jobs.count() {
            bail!("the server says {depth} {function} jobs are queued after {} were acknowledged", jobs.count());
        }
        Ok(())
    }

    /// Runs the jobs a depth run queued; reads the server's RSS before and `rss_after` after
    /// the last one ran.
    pub async fn drain(&mut self, jobs: &Arc<JobSet>, rss_after: Duration, report: &mut Report) -> Result<()> {
        let function = String::from_utf8_lossy(&self.function).into_owned();
        let addr = self.addrs[0].clone();
        let connector = self.connector.clone();
        let mut admin = self.wait("connecting", Admin::connect(&connector, &addr)).await??;
        report.queued_at_start = Some(self.wait("asking for status", admin.status(&function)).await??.queued());
        report.rss_at_start = Some(self.rss("drain")?);
        let watched = jobs.clone();
        self.spawn("watching the queue", watch_for_lost(admin, function, watched));
        let cpu = self.cpu_mark();
        let start = Instant::now();
        self.start_workers(jobs).await?;
        self.await_jobs(jobs, Some((start, cpu)), report).await?;
        let last = jobs.finished_at().context("jobs done without an end time")?;
        tokio::time::sleep_until((last + rss_after).into()).await;
        report.rss_idle = Some((rss_after, self.rss("drain")?));
        Ok(())
    }
}

/// Fails the run once the server has no `function` jobs left while some of ours never ran:
/// they were lost, and waiting for them until the timeout would tell nothing more. (A worker
/// counts a job before it sends WORK_COMPLETE, so none can be on its way when `status` says
/// zero.)
async fn watch_for_lost(mut admin: Admin, function: String, jobs: Arc<JobSet>) -> Result<()> {
    while jobs.completed() < jobs.count() {
        tokio::time::sleep(LOST_POLL).await;
        if admin.status(&function).await?.total == 0 {
            let missing = jobs.count() - jobs.completed();
            if missing > 0 {
                bail!("the server has no {function} jobs left, but {missing} of ours never ran");
            }
        }
    }
    Ok(())
}
