//! The lifecycle's settings: retry policies (`--retry`, `[retry.FUNCTION]`), concurrency
//! limits (`--limit`, `[limit]`), the dead set's retention (`--dead`, `--dead-max-age`,
//! `--dead-max-jobs`) and periodic jobs (`[[schedule]]`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::broker::{Backoff, RetryPolicies, RetryPolicy};

/// Dead jobs are kept this long by default (Sidekiq's six months).
pub const DEFAULT_DEAD_MAX_AGE: Duration = Duration::from_secs(180 * 24 * 3600);
/// At most this many dead jobs by default (Sidekiq's 10,000).
pub const DEFAULT_DEAD_MAX_JOBS: u64 = 10_000;

/// A function's retry policy as the config file writes it.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetryTable {
    /// Attempts after the first.
    pub retries: u32,
    /// `exponential` (the default) or `fixed`.
    pub backoff: Option<Backoff>,
    /// The first wait, e.g. `2s` [default: 15s].
    pub base: Option<String>,
    /// The longest wait, e.g. `1h` [default: 24h].
    pub max_delay: Option<String>,
}

impl RetryTable {
    fn policy(&self, function: &str) -> Result<RetryPolicy, String> {
        let duration = |what: &str, value: &Option<String>, default: Duration| match value {
            Some(v) => humantime::parse_duration(v).map_err(|e| format!("retry.{function}.{what} {v:?}: {e}")),
            None => Ok(default),
        };
        let base = duration("base", &self.base, crate::broker::lifecycle_defaults::BASE)?;
        let max_delay = duration("max-delay", &self.max_delay, crate::broker::lifecycle_defaults::MAX_DELAY)?;
        Ok(RetryPolicy {
            retries: self.retries,
            backoff: self.backoff.unwrap_or(Backoff::Exponential),
            base,
            max_delay: max_delay.max(base),
        })
    }
}

/// A periodic job (`[[schedule]]`): each tick of `cron` submits one background job of
/// `function` with the unique key `NAME@UNIX_TIME`.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Schedule {
    pub name: String,
    pub function: String,
    /// Seconds minutes hours day-of-month month day-of-week; five fields (no seconds) also.
    pub cron: String,
    #[serde(default)]
    pub payload: String,
    /// `high`, `normal` (the default) or `low`.
    pub priority: Option<String>,
    /// An IANA time zone, e.g. `Europe/Berlin` [default: UTC].
    pub timezone: Option<String>,
}

/// The lifecycle settings a server runs with.
#[derive(Debug, Clone)]
pub struct LifecycleOptions {
    /// Concurrency limits by function.
    pub limits: Vec<(String, u32)>,
    /// Whether jobs that fail their last attempt are kept (`--dead none`: dropped).
    pub keep_dead: bool,
    pub dead_max_age: Option<Duration>,
    pub dead_max_jobs: Option<u64>,
    pub schedules: Vec<Schedule>,
}

impl Default for LifecycleOptions {
    fn default() -> Self {
        LifecycleOptions {
            limits: Vec::new(),
            keep_dead: true,
            dead_max_age: Some(DEFAULT_DEAD_MAX_AGE),
            dead_max_jobs: Some(DEFAULT_DEAD_MAX_JOBS),
            schedules: Vec::new(),
        }
    }
}

/// `FUNCTION=VALUE`.
fn split_assignment<'a>(flag: &str, s: &'a str) -> Result<(&'a str, &'a str), String> {
    s.split_once('=')
        .filter(|(f, _)| !f.is_empty())
        .ok_or_else(|| format!("--{flag} {s:?}: use FUNCTION=VALUE (or *=VALUE for every function)"))
}

/// The retry policies of `--retry FUNCTION=RETRIES[/BASE]` flags over the config file's
/// `[retry.FUNCTION]` tables.
pub fn retry_policies(flags: &[String], tables: &BTreeMap<String, RetryTable>) -> Result<RetryPolicies, String> {
    let mut policies = RetryPolicies::default();
    for (function, table) in tables {
        policies.set(function.as_bytes(), Some(table.policy(function)?));
    }
    for flag in flags {
        let (function, spec) = split_assignment("retry", flag)?;
        let policy = RetryPolicy::parse(spec).map_err(|e| format!("--retry {function}={e}"))?;
        policies.set(function.as_bytes(), Some(policy));
    }
    Ok(policies)
}

/// The limits of `--limit FUNCTION=N` flags over the config file's `[limit]` table.
pub fn limits(flags: &[String], table: &BTreeMap<String, u32>) -> Result<Vec<(String, u32)>, String> {
    let mut limits: BTreeMap<String, u32> = table.clone();
    for flag in flags {
        let (function, n) = split_assignment("limit", flag)?;
        let n = n.parse().map_err(|_| format!("--limit {flag:?}: the limit must be a number (0: none)"))?;
        limits.insert(function.to_string(), n);
    }
    Ok(limits.into_iter().collect())
}

/// `--dead keep|none`, `--dead-max-age` (`0`: no limit) and `--dead-max-jobs` (`0`: no limit).
pub fn dead_retention(
    dead: Option<&str>,
    max_age: Option<&str>,
    max_jobs: Option<u64>,
) -> Result<(bool, Option<Duration>, Option<u64>), String> {
    let keep = match dead.unwrap_or("keep") {
        "keep" => true,
        "none" => false,
        other => return Err(format!("--dead {other:?}: use keep or none")),
    };
    let age = match max_age {
        Some(a) => humantime::parse_duration(a).map_err(|e| format!("--dead-max-age {a:?}: {e}"))?,
        None => DEFAULT_DEAD_MAX_AGE,
    };
    let jobs = max_jobs.unwrap_or(DEFAULT_DEAD_MAX_JOBS);
    Ok((keep, (!age.is_zero()).then_some(age), (jobs > 0).then_some(jobs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_tables() {
        let mut tables = BTreeMap::new();
        tables.insert(
            "resize".to_string(),
            RetryTable { retries: 9, backoff: Some(Backoff::Fixed), base: Some("1s".into()), max_delay: None },
        );
        let p = retry_policies(&["*=2/100ms".into(), "mail=4".into()], &tables).unwrap();
        assert_eq!(p.get(b"resize").unwrap().backoff, Backoff::Fixed);
        assert_eq!(p.get(b"other").unwrap().base, Duration::from_millis(100));
        assert_eq!(p.get(b"mail").unwrap().retries, 4);
        assert!(retry_policies(&["nofunction".into()], &BTreeMap::new()).is_err());
        assert!(retry_policies(&["f=x/1s".into()], &BTreeMap::new()).is_err());
    }

    #[test]
    fn limits_and_retention_parse() {
        assert_eq!(limits(&["f=2".into()], &BTreeMap::new()).unwrap(), vec![("f".to_string(), 2)]);
        assert!(limits(&["f=two".into()], &BTreeMap::new()).is_err());
        assert_eq!(dead_retention(Some("none"), Some("0"), Some(0)).unwrap(), (false, None, None));
        assert!(dead_retention(Some("maybe"), None, None).is_err());
    }
}
