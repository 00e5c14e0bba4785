//! The outcome of a run, printed for people and, on request, as one JSON line for scripts.

use std::fmt::Write as _;
use std::time::Duration;

use crate::jobs::Verdict;
use crate::Mode;

#[derive(Default)]
pub(crate) struct Report {
    pub mode: Mode,
    /// Every server, comma-separated, in --server's order.
    pub server: String,
    pub jobs: u64,
    /// Jobs that ran at least once.
    pub completed: u64,
    /// The measured phase: first submit to last WORK_COMPLETE (bg), first submit to the last
    /// client's last WORK_COMPLETE (fg), workers' start to last WORK_COMPLETE (mem's drain),
    /// the victim's SIGKILL to the last WORK_COMPLETE (takeover).
    pub elapsed: Option<Duration>,
    /// Server CPU (user + system) over the measured phase, in microseconds, summed over the
    /// servers whose PID is known (takeover: the survivors).
    pub server_cpu_us: Option<u64>,
    /// Foreground latencies, submit to WORK_COMPLETE, in nanoseconds (fg).
    pub latencies_ns: Vec<u64>,
    /// Time to get every JOB_CREATED back (mem).
    pub submit_elapsed: Option<Duration>,
    /// Server VmRSS growth from before the first submit to after the last JOB_CREATED (mem,
    /// depth).
    pub rss_growth: Option<i64>,
    /// The fill, step by step (depth).
    pub steps: Vec<Step>,
    /// Jobs queued for the function, and the server's VmRSS, before the workers start (drain).
    pub queued_at_start: Option<u64>,
    pub rss_at_start: Option<u64>,
    /// The server's VmRSS this long after the last job ran (drain).
    pub rss_idle: Option<(Duration, u64)>,
    /// When the survivors ran the victim's jobs (takeover).
    pub takeover: Option<Takeover>,
    /// What the workers saw; `None` when no job runs (depth).
    pub verdict: Option<Verdict>,
    pub error: Option<String>,
}

/// When the survivors of a takeover ran the victim's jobs, counted from its SIGKILL.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Takeover {
    /// Until a survivor's worker received the first job.
    pub first: Duration,
    /// Until the worker that ran the last job sent its WORK_COMPLETE.
    pub last: Duration,
}

/// One step of a depth run's fill.
pub(crate) struct Step {
    /// Jobs queued for the function at the end of the step, as the server's `status` says.
    pub depth: u64,
    /// Jobs submitted in this step, and the time from its first submit to its last
    /// JOB_CREATED.
    pub jobs: u64,
    pub elapsed: Duration,
    /// The server's VmRSS at the end of the step, and its growth since before the fill.
    pub rss: u64,
    pub rss_growth: i64,
    /// Server CPU (user + system) during the step, in microseconds.
    pub cpu_us: Option<u64>,
}

impl Step {
    fn ack_per_sec(&self) -> f64 {
        self.jobs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn growth_per_job(&self) -> Option<f64> {
        (self.depth > 0).then(|| self.rss_growth as f64 / self.depth as f64)
    }

    fn cpu_us_per_ack(&self) -> Option<f64> {
        (self.jobs > 0).then_some(self.cpu_us? as f64 / self.jobs as f64)
    }

    pub fn print_header() {
        println!(
            "  {:>4} {:>11} {:>12} {:>9} {:>10} {:>11}",
            "step", "depth", "ack jobs/s", "RSS MB", "bytes/job", "CPU µs/ack"
        );
    }

    /// One line of the table, printed as the step ends (a deep fill takes a while).
    pub fn print_row(&self, n: usize) {
        let opt = |v: Option<f64>, places: usize| v.map_or("-".to_owned(), |v| format!("{v:.places$}"));
        println!(
            "  {n:>4} {:>11} {:>12.0} {:>9.1} {:>10} {:>11}",
            self.depth,
            self.ack_per_sec(),
            self.rss as f64 / 1e6,
            opt(self.growth_per_job(), 0),
            opt(self.cpu_us_per_ack(), 2)
        );
    }

    fn json(&self) -> String {
        let num = |v: Option<f64>| v.map_or("null".to_owned(), |v| format!("{v:.2}"));
        format!(
            "{{\"depth\":{},\"ack_per_sec\":{:.2},\"step_seconds\":{:.4},\"rss_bytes\":{},\
             \"rss_growth_per_job\":{},\"cpu_us_per_ack\":{}}}",
            self.depth,
            self.ack_per_sec(),
            self.elapsed.as_secs_f64(),
            self.rss,
            num(self.growth_per_job()),
            num(self.cpu_us_per_ack()),
        )
    }
}

impl Report {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.verdict.as_ref().is_none_or(Verdict::ok)
    }

    fn jobs_per_sec(&self) -> Option<f64> {
        let secs = self.elapsed?.as_secs_f64();
        (secs > 0.0).then(|| self.completed as f64 / secs)
    }

    /// The survivors' rate once the takeover was done: the jobs after the first, over the
    /// time from the first to the last (takeover).
    fn drain_per_sec(&self) -> Option<f64> {
        let t = self.takeover?;
        let secs = (t.last.saturating_sub(t.first)).as_secs_f64();
        (secs > 0.0).then(|| self.completed.saturating_sub(1) as f64 / secs)
    }

    fn cpu_us_per_job(&self) -> Option<f64> {
        (self.completed > 0).then_some(self.server_cpu_us? as f64 / self.completed as f64)
    }

    fn rss_bytes_per_job(&self) -> Option<f64> {
        Some(self.rss_growth? as f64 / self.jobs as f64)
    }

    fn submit_per_sec(&self) -> Option<f64> {
        let secs = self.submit_elapsed?.as_secs_f64();
        (secs > 0.0).then(|| self.jobs as f64 / secs)
    }

    /// p50, p99 and max latency in microseconds.
    fn percentiles_us(&self) -> Option<[f64; 3]> {
        let mut v = self.latencies_ns.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        Some([at(0.50), at(0.99), at(1.0)])
    }

    pub fn print_human(&self) {
        if let (Some(rate), Some(elapsed)) = (self.jobs_per_sec(), self.elapsed) {
            let phase = match self.mode {
                Mode::Bg => "first submit to last WORK_COMPLETE",
                Mode::Fg => "first submit to last result",
                Mode::Takeover => "SIGKILL to the last WORK_COMPLETE",
                _ => "draining the queue",
            };
            println!(
                "  throughput  {rate:.0} jobs/s ({} jobs in {:.3} s, {phase})",
                self.completed,
                elapsed.as_secs_f64()
            );
        }
        if let Some(cpu) = self.cpu_us_per_job() {
            println!("  server CPU  {cpu:.2} µs/job");
        }
        if let Some(t) = self.takeover {
            println!(
                "  takeover    first job ran {:.0} ms after the SIGKILL, the last {:.0} ms after",
                ms(t.first),
                ms(t.last)
            );
        }
        if let Some(rate) = self.drain_per_sec() {
            println!("  drain       {rate:.0} jobs/s on the survivors, from the first job to the last");
        }
        if let Some([p50, p99, max]) = self.percentiles_us() {
            println!("  latency     p50 {p50:.0} µs, p99 {p99:.0} µs, max {max:.0} µs");
        }
        if let Some(rate) = self.submit_per_sec() {
            println!("  submit      {rate:.0} jobs/s until the last JOB_CREATED");
        }
        if let (Some(growth), Some(per_job)) = (self.rss_growth, self.rss_bytes_per_job()) {
            println!(
                "  memory      {:+.1} MB RSS for {} queued jobs = {per_job:.0} bytes/job",
                growth as f64 / 1e6,
                self.jobs
            );
        }
        if let (Some(queued), Some(rss)) = (self.queued_at_start, self.rss_at_start) {
            println!("  at start    {queued} jobs queued, server RSS {:.1} MB", rss as f64 / 1e6);
        }
        if let Some((after, rss)) = self.rss_idle {
            println!("  idle        server RSS {:.1} MB {} s after the last job", rss as f64 / 1e6, after.as_secs());
        }
        match &self.verdict {
            Some(v) if v.ok() => {
                println!("  check       OK: {} of {} jobs ran exactly once", self.completed, self.jobs)
            }
            Some(v) => println!(
                "  check       FAILED: {} lost, {} run more than once, {} with a wrong payload",
                v.lost, v.duplicated, v.corrupt
            ),
            None if self.ok() => println!("  check       OK: {} jobs acknowledged and queued", self.jobs),
            None => {}
        }
        if let Some(v) = self.verdict.filter(|v| v.foreign > 0) {
            println!("  note        {} jobs from elsewhere ran too", v.foreign);
        }
        if let Some(e) = &self.error {
            println!("  error       {e}");
        }
    }

    pub fn json(&self) -> String {
        let num = |v: Option<f64>| v.map_or("null".to_owned(), |v| format!("{v:.2}"));
        let pct = self.percentiles_us();
        let v = self.verdict.unwrap_or_default();
        let steps: Vec<String> = self.steps.iter().map(Step::json).collect();
        let opt = |v: Option<u64>| v.map_or("null".to_owned(), |v| v.to_string());
        let mut s = String::from("{");
        let _ = write!(
            s,
            "\"mode\":\"{}\",\"server\":{},\"jobs\":{},\"completed\":{},\"seconds\":{},\
             \"jobs_per_sec\":{},\"server_cpu_us_per_job\":{},\"p50_us\":{},\"p99_us\":{},\
             \"max_us\":{},\"submit_jobs_per_sec\":{},\"rss_bytes_per_job\":{},\
             \"steps\":[{}],\"queued_at_start\":{},\"rss_bytes_at_start\":{},\"idle_secs\":{},\
             \"rss_bytes_idle\":{},\"takeover_first_ms\":{},\"takeover_last_ms\":{},\
             \"takeover_drain_jobs_per_sec\":{},\"lost\":{},\"duplicated\":{},\"corrupt\":{},\"foreign\":{},\"ok\":{},\"error\":{}",
            self.mode.name(),
            json_string(&self.server),
            self.jobs,
            self.completed,
            self.elapsed.map_or("null".to_owned(), |e| format!("{:.4}", e.as_secs_f64())),
            num(self.jobs_per_sec()),
            num(self.cpu_us_per_job()),
            num(pct.map(|p| p[0])),
            num(pct.map(|p| p[1])),
            num(pct.map(|p| p[2])),
            num(self.submit_per_sec()),
            num(self.rss_bytes_per_job()),
            steps.join(","),
            opt(self.queued_at_start),
            opt(self.rss_at_start),
            opt(self.rss_idle.map(|(after, _)| after.as_secs())),
            opt(self.rss_idle.map(|(_, rss)| rss)),
            num(self.takeover.map(|t| ms(t.first))),
            num(self.takeover.map(|t| ms(t.last))),
            num(self.drain_per_sec()),
            v.lost,
            v.duplicated,
            v.corrupt,
            v.foreign,
            self.ok(),
            self.error.as_deref().map_or("null".to_owned(), json_string),
        );
        s.push('}');
        s
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_has_every_key_and_escapes_text() {
        let report = Report {
            mode: Mode::Fg,
            server: "h:1".into(),
            jobs: 4,
            completed: 4,
            elapsed: Some(Duration::from_secs(2)),
            server_cpu_us: Some(100),
            latencies_ns: vec![4000, 1000, 3000, 2000],
            error: Some("a \"b\"\n".into()),
            ..Report::default()
        };
        let json = report.json();
        for key in [
            "\"jobs_per_sec\":2.00",
            "\"server_cpu_us_per_job\":25.00",
            "\"p50_us\":3.00",
            "\"max_us\":4.00",
            "\"rss_bytes_per_job\":null",
            "\"ok\":false",
            "\"error\":\"a \\\"b\\\"\\u000a\"",
        ] {
            assert!(json.contains(key), "{key} missing from {json}");
        }
        assert!(json.starts_with('{') && json.ends_with('}') && !json.contains('\n'));
    }

    #[test]
    fn takeover_reports_first_last_and_the_drain_rate() {
        let report = Report {
            mode: Mode::Takeover,
            server: "a:1,b:2,c:3".into(),
            jobs: 1001,
            completed: 1001,
            elapsed: Some(Duration::from_millis(12_000)),
            takeover: Some(Takeover { first: Duration::from_millis(10_500), last: Duration::from_millis(12_000) }),
            ..Report::default()
        };
        let json = report.json();
        for key in [
            "\"server\":\"a:1,b:2,c:3\"",
            "\"takeover_first_ms\":10500.00",
            "\"takeover_last_ms\":12000.00",
            "\"takeover_drain_jobs_per_sec\":666.67",
            "\"ok\":true",
        ] {
            assert!(json.contains(key), "{key} missing from {json}");
        }
        let none = Report { mode: Mode::Bg, ..Report::default() }.json();
        assert!(none.contains("\"takeover_first_ms\":null,\"takeover_last_ms\":null,"), "{none}");
    }

    #[test]
    fn depth_json_has_each_step_and_no_verdict() {
        let step = |depth, secs| Step {
            depth,
            jobs: 1000,
            elapsed: Duration::from_secs(secs),
            rss: 9_000_000,
            rss_growth: 500_000,
            cpu_us: Some(3000),
        };
        let report = Report {
            mode: Mode::Depth,
            jobs: 2000,
            steps: vec![step(1000, 1), step(2000, 2)],
            rss_growth: Some(500_000),
            ..Report::default()
        };
        assert!(report.ok());
        let json = report.json();
        for key in [
            "\"steps\":[{\"depth\":1000,\"ack_per_sec\":1000.00,\"step_seconds\":1.0000,\"rss_bytes\":9000000,\
             \"rss_growth_per_job\":500.00,\"cpu_us_per_ack\":3.00},{\"depth\":2000,\"ack_per_sec\":500.00,",
            "\"rss_growth_per_job\":250.00,\"cpu_us_per_ack\":3.00}],",
            "\"rss_bytes_per_job\":250.00",
            "\"lost\":0",
            "\"ok\":true",
        ] {
            assert!(json.contains(key), "{key} missing from {json}");
        }
    }
}
