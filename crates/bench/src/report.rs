//! The outcome of a run, printed for people and, on request, as one JSON line for scripts.

use std::fmt::Write as _;
use std::time::Duration;

use crate::jobs::Verdict;
use crate::Mode;

#[derive(Default)]
pub(crate) struct Report {
    pub mode: Mode,
    pub server: String,
    pub jobs: u64,
    /// Jobs that ran at least once.
    pub completed: u64,
    /// The measured phase: first submit to last WORK_COMPLETE (bg), first submit to the last
    /// client's last WORK_COMPLETE (fg), workers' start to last WORK_COMPLETE (mem's drain).
    pub elapsed: Option<Duration>,
    /// Server CPU (user + system) over the measured phase, in microseconds.
    pub server_cpu_us: Option<u64>,
    /// Foreground latencies, submit to WORK_COMPLETE, in nanoseconds (fg).
    pub latencies_ns: Vec<u64>,
    /// Time to get every JOB_CREATED back (mem).
    pub submit_elapsed: Option<Duration>,
    /// Server VmRSS growth from before the first submit to after the last JOB_CREATED (mem).
    pub rss_growth: Option<i64>,
    pub verdict: Verdict,
    pub error: Option<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.verdict.ok()
    }

    fn jobs_per_sec(&self) -> Option<f64> {
        let secs = self.elapsed?.as_secs_f64();
        (secs > 0.0).then(|| self.completed as f64 / secs)
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
                Mode::Mem => "draining the queue",
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
        let v = &self.verdict;
        if v.ok() {
            println!("  check       OK: {} of {} jobs ran exactly once", self.completed, self.jobs);
        } else {
            println!(
                "  check       FAILED: {} lost, {} run more than once, {} with a wrong payload",
                v.lost, v.duplicated, v.corrupt
            );
        }
        if v.foreign > 0 {
            println!("  note        {} jobs from elsewhere ran too", v.foreign);
        }
        if let Some(e) = &self.error {
            println!("  error       {e}");
        }
    }

    pub fn json(&self) -> String {
        let num = |v: Option<f64>| v.map_or("null".to_owned(), |v| format!("{v:.2}"));
        let pct = self.percentiles_us();
        let v = &self.verdict;
        let mut s = String::from("{");
        let _ = write!(
            s,
            "\"mode\":\"{}\",\"server\":{},\"jobs\":{},\"completed\":{},\"seconds\":{},\
             \"jobs_per_sec\":{},\"server_cpu_us_per_job\":{},\"p50_us\":{},\"p99_us\":{},\
             \"max_us\":{},\"submit_jobs_per_sec\":{},\"rss_bytes_per_job\":{},\
             \"lost\":{},\"duplicated\":{},\"corrupt\":{},\"foreign\":{},\"ok\":{},\"error\":{}",
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
}
