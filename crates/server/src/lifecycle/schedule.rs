//! Periodic jobs. Each tick of a schedule's cron expression submits one background job with
//! the unique key `NAME@UNIX_TIME`, once: the tick is first claimed in the lifecycle store
//! (a compare-and-set on the last tick fired), so no tick fires twice — not after a restart,
//! not on two cluster nodes, not after its job has finished. A tick claimed by a server that
//! dies before its job is acknowledged is lost (at most once). Ticks missed while no server
//! ran are not replayed: after a start the next tick is the first one to come.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{Offset, TimeZone, Utc};
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

/// The first tick of `cron` after `after` (Unix seconds). The cron crate reckons in local
/// time, which repeats an hour when daylight saving ends and skips one when it starts: where
/// the UTC offset changes before its answer, the seconds up to it are looked at one by one.
fn next_after(cron: &Cron, tz: Tz, after: i64) -> Option<i64> {
    const DAY: i64 = 86_400;
    let at = |t: i64| Some(Utc.timestamp_opt(t, 0).single()?.with_timezone(&tz));
    let offset = |t: i64| at(t).map(|d| d.offset().fix());
    let matches = |t: i64| at(t).is_some_and(|d| cron.is_time_matching(&d).unwrap_or(false));
    let mut from = after;
    for _ in 0..8 {
        let fast = cron.find_next_occurrence(&at(from)?, false).ok()?.timestamp();
        if fast > from && offset(fast) == offset(from) {
            return Some(fast);
        }
        if fast > from + DAY {
            // Nothing fires before it in local time: look only at its last day.
            from = fast - DAY;
            continue;
        }
        let end = if fast > from { fast } else { from + DAY };
        if let Some(t) = (from + 1..=end).find(|&t| matches(t)) {
            return Some(t);
        }
        if fast > from {
            // A time the clocks skipped: the cron crate's answer is the first that exists.
            return Some(fast);
        }
        from = end;
    }
    None
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
                match next.and_then(|t| Utc.timestamp_opt(t, 0).single()) {
                    Some(at) => tracing::info!(schedule = %spec.name, function = %spec.function, "next run at {at}"),
                    None => tracing::warn!(schedule = %spec.name, "its cron expression never fires"),
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cron(expr: &str) -> Cron {
        Cron::new(expr).with_seconds_optional().parse().unwrap()
    }

    /// Unix seconds of a UTC time on 2024-10-27, when Berlin's clocks went back from 03:00
    /// CEST (01:00 UTC) to 02:00 CET.
    fn utc(h: u32, m: u32) -> i64 {
        Utc.with_ymd_and_hms(2024, 10, 27, h, m, 0).unwrap().timestamp()
    }

    #[test]
    fn quarter_hours_go_on_through_the_repeated_hour() {
        let (c, berlin) = (cron("0 */15 * * * *"), Tz::Europe__Berlin);
        let mut t = utc(0, 30);
        let mut ticks = Vec::new();
        while t < utc(2, 30) {
            t = next_after(&c, berlin, t).unwrap();
            ticks.push(t);
        }
        let every_15: Vec<i64> = (0..8).map(|i| utc(0, 45) + i * 900).collect();
        assert_eq!(ticks, every_15, "no quarter hour skipped or repeated across the change");
        // From inside the repeated hour, the next tick is still ahead.
        assert_eq!(next_after(&c, berlin, utc(1, 10)), Some(utc(1, 15)));
    }

    #[test]
    fn a_time_the_clocks_skip_runs_when_they_have_gone_forward() {
        // 2024-03-31: Berlin went from 02:00 CET (01:00 UTC) to 03:00 CEST.
        let c = cron("0 30 2 * * *");
        let before = Utc.with_ymd_and_hms(2024, 3, 30, 23, 0, 0).unwrap().timestamp();
        let next = next_after(&c, Tz::Europe__Berlin, before).unwrap();
        assert_eq!(next, Utc.with_ymd_and_hms(2024, 3, 31, 1, 0, 0).unwrap().timestamp(), "03:00 CEST that day");
    }

    #[test]
    fn utc_schedules_take_the_cron_crate_at_its_word() {
        let c = cron("0 0 3 * * *");
        assert_eq!(next_after(&c, Tz::UTC, utc(2, 0)), Some(utc(3, 0)));
        let every_second = cron("* * * * * *");
        assert_eq!(next_after(&every_second, Tz::UTC, 1_700_000_000), Some(1_700_000_001));
        // A yearly schedule across a change of offset is found without looking at every second.
        let yearly = cron("0 0 0 1 1 *");
        let started = std::time::Instant::now();
        let next = next_after(&yearly, Tz::Europe__Berlin, utc(12, 0)).unwrap();
        assert_eq!(next, Utc.with_ymd_and_hms(2024, 12, 31, 23, 0, 0).unwrap().timestamp());
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
