//! Periodic jobs. Each tick of a schedule's cron expression submits one background job with
//! the unique key `NAME@UNIX_TIME`, once: the tick is first claimed in the lifecycle store
//! (a compare-and-set on the last tick fired), so no tick fires twice — not after a restart,
//! not on two cluster nodes, not after its job has finished. A tick claimed by a server that
//! dies before its job is acknowledged is lost (at most once). Ticks missed while no server
//! ran are not replayed: after a start the next tick is the first one to come.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use gearbox_proto::{Priority, Request, Response};

use super::config::Schedule;
use crate::http::local::LocalConn;
use crate::shared::Shared;

/// A tick this far behind the clock is skipped (the server was stopped or stalled).
const LATE: i64 = 5;

struct Entry {
    spec: Schedule,
    cron: Cron,
    tz: Tz,
    priority: Priority,
    /// The next tick, in Unix seconds.
    next: Option<i64>,
    last_fired: Option<i64>,
}

/// A schedule as the dashboard and the API show it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ScheduleView {
    pub name: String,
    pub function: String,
    pub cron: String,
    pub timezone: String,
    /// Unix seconds.
    pub next_run: Option<i64>,
    /// The last tick this server fired, in Unix seconds.
    pub last_fired: Option<i64>,
}

/// Checks the schedules of a config: names unique and usable in a unique key, cron
/// expressions, time zones and priorities valid.
pub fn validate(schedules: &[Schedule]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for s in schedules {
        if s.name.is_empty() || s.name.contains('@') || !names.insert(&s.name) {
            return Err(format!("schedule {:?}: names must be unique, non-empty and without '@'", s.name));
        }
        if s.function.is_empty() {
            return Err(format!("schedule {:?}: no function", s.name));
        }
        parse(s)?;
    }
    Ok(())
}

fn parse(s: &Schedule) -> Result<(Cron, Tz, Priority), String> {
    let cron = Cron::new(&s.cron)
        .with_seconds_optional()
        .parse()
        .map_err(|e| format!("schedule {:?}: cron {:?}: {e}", s.name, s.cron))?;
    let tz = match s.timezone.as_deref() {
        None => Tz::UTC,
        Some(name) => name.parse().map_err(|_| format!("schedule {:?}: unknown time zone {name:?}", s.name))?,
    };
    let priority = match s.priority.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("normal") => Priority::Normal,
        Some("high") => Priority::High,
        Some("low") => Priority::Low,
        Some(other) => return Err(format!("schedule {:?}: priority {other:?}: use high, normal or low", s.name)),
    };
    Ok((cron, tz, priority))
}

/// The first tick of `cron` after `after` (Unix seconds).
fn next_after(cron: &Cron, tz: Tz, after: i64) -> Option<i64> {
    let time = tz.from_utc_datetime(&Utc.timestamp_opt(after, 0).single()?.naive_utc());
    cron.find_next_occurrence(&time, false).ok().map(|t| t.timestamp())
}

/// The server's schedules; clones share them.
#[derive(Clone, Default)]
pub(crate) struct Schedules(Arc<Mutex<Vec<Entry>>>);

impl Schedules {
    /// Schedules checked by [`validate`]; their first ticks are the next to come.
    pub(crate) fn new(specs: &[Schedule]) -> Schedules {
        let now = Utc::now().timestamp();
        let entries = specs
            .iter()
            .filter_map(|spec| {
                let (cron, tz, priority) = parse(spec).ok()?;
                let next = next_after(&cron, tz, now);
                Some(Entry { spec: spec.clone(), cron, tz, priority, next, last_fired: None })
            })
            .collect();
        Schedules(Arc::new(Mutex::new(entries)))
    }

    pub(crate) fn views(&self) -> Vec<ScheduleView> {
        let entries = self.0.lock().unwrap();
        entries
            .iter()
            .map(|e| ScheduleView {
                name: e.spec.name.clone(),
                function: e.spec.function.clone(),
                cron: e.spec.cron.clone(),
                timezone: e.tz.name().to_string(),
                next_run: e.next,
                last_fired: e.last_fired,
            })
            .collect()
    }

    /// Fires every tick that is due.
    pub(crate) async fn fire_due(&self, shared: &Arc<Shared>) {
        let now = Utc::now().timestamp();
        let due: Vec<(usize, i64)> = {
            let entries = self.0.lock().unwrap();
            entries.iter().enumerate().filter_map(|(i, e)| e.next.filter(|&t| t <= now).map(|t| (i, t))).collect()
        };
        for (i, tick) in due {
            let (spec, priority) = {
                let entries = self.0.lock().unwrap();
                (entries[i].spec.clone(), entries[i].priority)
            };
            if tick >= now - LATE {
                if let Err(e) = fire(shared, &spec, priority, tick).await {
                    tracing::error!(schedule = %spec.name, "tick {tick} not fired: {e}");
                }
            } else {
                tracing::warn!(schedule = %spec.name, "tick {tick} skipped: {}s late", now - tick);
            }
            let mut entries = self.0.lock().unwrap();
            let e = &mut entries[i];
            e.last_fired = Some(tick);
            e.next = next_after(&e.cron, e.tz, tick.max(now - LATE));
        }
    }
}

/// Claims `tick` of `spec` and, if this server won it, submits its job.
async fn fire(shared: &Arc<Shared>, spec: &Schedule, priority: Priority, tick: i64) -> Result<(), String> {
    let name = spec.name.clone();
    let won = super::blocking(shared, move |s| s.claim_tick(&name, tick)).await?;
    if !won {
        return Ok(());
    }
    let mut conn = LocalConn::open(shared);
    conn.send(Request::SubmitJob {
        function: Bytes::from(spec.function.clone()),
        unique: Bytes::from(format!("{}@{tick}", spec.name)),
        data: Bytes::from(spec.payload.clone()),
        priority,
        background: true,
    });
    match conn.recv().await {
        Response::JobCreated { handle } => {
            tracing::info!(schedule = %spec.name, handle = %String::from_utf8_lossy(&handle), "tick {tick} fired");
            Ok(())
        }
        Response::Error { code, text } => {
            Err(format!("{}: {}", String::from_utf8_lossy(&code), String::from_utf8_lossy(&text)))
        }
        other => Err(format!("unexpected answer {other:?}")),
    }
}
