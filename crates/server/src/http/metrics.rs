//! `/metrics` in the Prometheus text format (version 0.0.4), rendered from a copy of the
//! broker's state taken when the request arrives.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::broker::{FunctionCounts, FunctionView, Histogram, BUCKET_BOUNDS_US};
use crate::shared::Shared;

const PRIORITIES: [&str; 3] = ["high", "normal", "low"];

/// Reads a per-function gauge.
type Gauge = fn(&FunctionView) -> u32;
/// Reads a per-function counter, by priority.
type Counter = fn(&FunctionCounts) -> &[u64; 3];
/// Reads one of a function's lifecycle counters.
type Total = fn(&FunctionCounts) -> u64;

pub(crate) async fn render(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let (functions, connections, commits) = {
        let broker = shared.broker.lock().unwrap();
        (broker.functions_view(), broker.connection_count(), broker.commit_times().clone())
    };
    let mut out = String::with_capacity(4096 + functions.len() * 4096);
    let names: Vec<String> = functions.iter().map(|f| escape(&f.name)).collect();

    let gauges: [(&str, &str, Gauge); 3] = [
        ("gearbox_queued_jobs", "Jobs waiting for a worker, including jobs scheduled for later.", |f| f.queued),
        ("gearbox_running_jobs", "Jobs a worker is running.", |f| f.running),
        ("gearbox_workers", "Connections that registered the function.", |f| f.workers),
    ];
    for (metric, help, value) in gauges {
        header(&mut out, metric, "gauge", help);
        for (f, name) in functions.iter().zip(&names) {
            let _ = writeln!(out, "{metric}{{function=\"{name}\"}} {}", value(f));
        }
    }
    let counters: [(&str, &str, Counter); 6] = [
        ("gearbox_jobs_submitted_total", "New jobs (coalesced duplicates are not counted).", |c| &c.submitted),
        (
            "gearbox_jobs_restored_total",
            "Jobs loaded from the durable queue at start, or claimed from a cluster.",
            |c| &c.restored,
        ),
        ("gearbox_jobs_completed_total", "Jobs that ended with WORK_COMPLETE.", |c| &c.completed),
        (
            "gearbox_jobs_failed_total",
            "Jobs that ended with WORK_FAIL or WORK_EXCEPTION, or ran out of attempts.",
            |c| &c.failed,
        ),
        (
            "gearbox_jobs_cancelled_total",
            "Jobs cancelled by an admin, or left by every client that waited for them.",
            |c| &c.cancelled,
        ),
        ("gearbox_jobs_handed_over_total", "A cluster node's jobs left for other nodes to run.", |c| &c.handed_over),
    ];
    let lifecycle: [(&str, &str, Total); 2] = [
        ("gearbox_jobs_retried_total", "Failed attempts of background jobs given another by the retry policy.", |c| {
            c.retried
        }),
        ("gearbox_jobs_dead_total", "Background jobs that failed their last attempt (the dead set).", |c| c.buried),
    ];
    for (metric, help, value) in lifecycle {
        header(&mut out, metric, "counter", help);
        for (f, name) in functions.iter().zip(&names) {
            let _ = writeln!(out, "{metric}{{function=\"{name}\"}} {}", value(&f.counts));
        }
    }
    header(&mut out, "gearbox_function_paused", "gauge", "1 while the function is paused.");
    for (f, name) in functions.iter().zip(&names) {
        let _ = writeln!(out, "gearbox_function_paused{{function=\"{name}\"}} {}", u8::from(f.paused));
    }
    for (metric, help, value) in counters {
        header(&mut out, metric, "counter", help);
        for (f, name) in functions.iter().zip(&names) {
            for (priority, n) in PRIORITIES.iter().zip(value(&f.counts)) {
                let _ = writeln!(out, "{metric}{{function=\"{name}\",priority=\"{priority}\"}} {n}");
            }
        }
    }
    let metric = "gearbox_job_queue_wait_seconds";
    header(&mut out, metric, "histogram", "Time from submission to a worker taking the job.");
    for (f, name) in functions.iter().zip(&names) {
        histogram(&mut out, metric, &format!("function=\"{name}\""), &f.counts.queue_wait);
    }
    let metric = "gearbox_job_run_seconds";
    header(&mut out, metric, "histogram", "Time from a worker taking a job to the attempt's end.");
    for (f, name) in functions.iter().zip(&names) {
        histogram(&mut out, metric, &format!("function=\"{name}\""), &f.counts.run_time);
    }

    header(&mut out, "gearbox_connections", "gauge", "Open Gearman connections (clients, workers, admin).");
    let _ = writeln!(out, "gearbox_connections {connections}");
    let metric = "gearbox_refused_total";
    header(&mut out, metric, "counter", "Actions refused by TLS, the ACL or the HTTP tokens, by action.");
    for (action, count) in shared.security.audit.counts() {
        let _ = writeln!(out, "{metric}{{action=\"{}\"}} {count}", action.label());
    }
    let metric = "gearbox_store_commit_seconds";
    header(&mut out, metric, "histogram", "Time one durable-store commit (write and sync) took.");
    histogram(&mut out, metric, "", &commits);
    if let Some(log) = &shared.admin_info.job_log {
        let metric = "gearbox_job_log_written_total";
        header(&mut out, metric, "counter", "Job-log records written to the sink.");
        let _ = writeln!(out, "{metric}{{sink=\"{}\"}} {}", log.sink, log.stats.written());
        let metric = "gearbox_job_log_dropped_total";
        header(&mut out, metric, "counter", "Job-log records dropped because the sink was down or too slow.");
        let _ = writeln!(out, "{metric}{{sink=\"{}\"}} {}", log.sink, log.stats.dropped());
        // Only a sink that counts its own files reports a size (not MongoDB).
        if let Some(usage) = log.stats.usage() {
            job_log_usage(&mut out, log.sink, &usage);
        }
    }
    if let Some(cluster) = &shared.cluster {
        cluster_metrics(&mut out, cluster);
    }
    header(&mut out, "gearbox_uptime_seconds", "gauge", "Seconds since the server started.");
    let _ = writeln!(out, "gearbox_uptime_seconds {}", shared.started.elapsed().as_secs());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out)
}

fn cluster_metrics(out: &mut String, cluster: &crate::cluster::ClusterShared) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &cluster.counters;
    let counters = [
        ("gearbox_cluster_claims_total", "Claims of unowned jobs that found some.", &c.claims),
        ("gearbox_cluster_claimed_jobs_total", "Unowned jobs this node claimed.", &c.claimed_jobs),
        ("gearbox_cluster_takeovers_total", "Nodes whose lease ended that this node took over.", &c.takeovers),
        ("gearbox_cluster_taken_over_jobs_total", "Jobs of those nodes made claimable.", &c.taken_over_jobs),
        ("gearbox_cluster_lease_losses_total", "Times this node lost its lease and joined again.", &c.lease_losses),
        ("gearbox_cluster_status_lookups_total", "GET_STATUS answers read from the database.", &c.status_lookups),
    ];
    for (metric, help, value) in counters {
        header(out, metric, "counter", help);
        let _ = writeln!(out, "{metric} {}", value.load(Relaxed));
    }
    let view = cluster.view.lock().unwrap();
    header(out, "gearbox_cluster_node", "gauge", "This node's incarnation id.");
    let _ = writeln!(out, "gearbox_cluster_node {}", view.node);
    header(out, "gearbox_cluster_nodes", "gauge", "Nodes with a row in the cluster's table (at the last refresh).");
    let _ = writeln!(out, "gearbox_cluster_nodes {}", view.totals.nodes);
    header(out, "gearbox_cluster_unowned_jobs", "gauge", "Jobs no node owns yet, by function (at the last refresh).");
    for f in &view.unowned {
        let _ = writeln!(out, "gearbox_cluster_unowned_jobs{{function=\"{}\"}} {}", escape(&f.function), f.queued);
    }
}

fn job_log_usage(out: &mut String, sink: &str, usage: &gearbox_joblog::Usage) {
    let metric = "gearbox_job_log_bytes";
    header(out, metric, "gauge", "Bytes the job log's files take.");
    let _ = writeln!(out, "{metric}{{sink=\"{sink}\"}} {}", usage.bytes);
    if let Some(max) = usage.max_bytes {
        let metric = "gearbox_job_log_max_bytes";
        header(out, metric, "gauge", "The job log's size limit (--job-log-max-size), in bytes.");
        let _ = writeln!(out, "{metric}{{sink=\"{sink}\"}} {max}");
    }
    let metric = "gearbox_job_log_expired_bytes_total";
    let help = "Job-log bytes deleted since start: older than the retention (age) or over the size limit (size).";
    header(out, metric, "counter", help);
    for (reason, bytes) in [("age", usage.expired_by_age), ("size", usage.expired_by_size)] {
        let _ = writeln!(out, "{metric}{{sink=\"{sink}\",reason=\"{reason}\"}} {bytes}");
    }
}

fn header(out: &mut String, metric: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
}

/// Cumulative buckets, `_sum` and `_count`, with `labels` (may be empty) on every line.
fn histogram(out: &mut String, metric: &str, labels: &str, h: &Histogram) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (bound, n) in BUCKET_BOUNDS_US.iter().zip(&h.buckets) {
        cumulative += n;
        let le = *bound as f64 / 1e6;
        let _ = writeln!(out, "{metric}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{metric}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
    let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
    let _ = writeln!(out, "{metric}_sum{braces} {}", h.sum_us as f64 / 1e6);
    let _ = writeln!(out, "{metric}_count{braces} {}", h.count);
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_are_escaped() {
        let mut h = Histogram::default();
        h.observe_us(50);
        h.observe_us(200);
        h.observe_us(400_000_000);
        let mut out = String::new();
        histogram(&mut out, "m", "function=\"a\"", &h);
        assert!(out.contains("m_bucket{function=\"a\",le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("m_bucket{function=\"a\",le=\"0.00025\"} 2\n"), "{out}");
        assert!(out.contains("m_bucket{function=\"a\",le=\"300\"} 2\n"), "{out}");
        assert!(out.contains("m_bucket{function=\"a\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("m_count{function=\"a\"} 3\n"), "{out}");
        let mut bare = String::new();
        histogram(&mut bare, "s", "", &h);
        assert!(bare.contains("s_bucket{le=\"+Inf\"} 3\n") && bare.contains("s_sum 400.00025\n"), "{bare}");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
