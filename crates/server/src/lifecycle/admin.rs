//! The admin protocol's lifecycle commands that wait for the lifecycle store: `pause`,
//! `resume` and `dead …`. Answered by the connection's task, without the broker's lock.

use std::sync::Arc;

use bytes::Bytes;
use gearbox_store::lifecycle::{DeadEntry, DeadFilter, DeadJob};

use super::Selection;
use crate::shared::Shared;

/// A dead job as JSON shows it: names and payload as text (bytes that are not UTF-8 shown
/// as U+FFFD), times in Unix milliseconds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeadView {
    pub handle: String,
    pub function: String,
    pub unique: String,
    pub priority: &'static str,
    pub attempts: u32,
    pub error: String,
    pub died_at: i64,
    pub payload_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

fn priority(p: u8) -> &'static str {
    match p {
        0 => "high",
        2 => "low",
        _ => "normal",
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl From<DeadEntry> for DeadView {
    fn from(e: DeadEntry) -> DeadView {
        DeadView {
            handle: e.handle,
            function: text(&e.function),
            unique: text(&e.unique),
            priority: priority(e.priority),
            attempts: e.attempts,
            error: e.error,
            died_at: e.died_at,
            payload_bytes: e.data_len,
            payload: None,
        }
    }
}

impl From<DeadJob> for DeadView {
    fn from(j: DeadJob) -> DeadView {
        DeadView {
            handle: j.handle,
            function: text(&j.function),
            unique: text(&j.unique),
            priority: priority(j.priority),
            attempts: j.attempts,
            error: j.error,
            died_at: j.died_at,
            payload_bytes: j.data.len() as u64,
            payload: Some(text(&j.data)),
        }
    }
}

/// Most dead jobs `dead list` shows (the newest).
const LISTED: usize = 1000;

fn err(code: &str, msg: &str) -> String {
    format!("ERR {code} {}\r\n", msg.replace(' ', "+"))
}

fn json_lines<T: serde::Serialize>(items: impl IntoIterator<Item = T>) -> String {
    let mut out = String::new();
    for item in items {
        out.push_str(&serde_json::to_string(&item).expect("views serialize"));
        out.push('\n');
    }
    out.push_str(".\n");
    out
}

/// `HANDLE…` or `all [FUNCTION]`.
fn selection(words: &[Bytes]) -> Option<Selection> {
    match words {
        [] => None,
        [all] if all.eq_ignore_ascii_case(b"all") => Some(Selection::All { function: None }),
        [all, f] if all.eq_ignore_ascii_case(b"all") => Some(Selection::All { function: Some(f.to_vec()) }),
        handles => Some(Selection::Handles(handles.iter().map(|h| text(h)).collect())),
    }
}

/// Answers `pause F` / `resume F`.
pub(crate) async fn pause(shared: &Shared, function: Bytes, paused: bool) -> String {
    if shared.lifecycle.is_none() {
        return err("LIFECYCLE_UNAVAILABLE", "The lifecycle store is not open");
    }
    match super::set_paused(shared, function.to_vec(), paused).await {
        Ok(()) => gearbox_proto::admin::OK.into(),
        Err(e) => err("LIFECYCLE_UNAVAILABLE", &e),
    }
}

/// Answers `dead …`.
pub(crate) async fn dead(shared: &Arc<Shared>, words: &[Bytes]) -> String {
    if shared.lifecycle.is_none() {
        return err("LIFECYCLE_UNAVAILABLE", "The lifecycle store is not open");
    }
    let usage = || {
        err("INVALID_ARGUMENTS", "use: dead list [FUNCTION] | dead show HANDLE | dead retry HANDLE...|all [FUNCTION] | dead delete HANDLE...|all [FUNCTION]")
    };
    let Some((verb, rest)) = words.split_first() else { return usage() };
    let answer = match (verb.to_ascii_lowercase().as_slice(), rest) {
        (b"list", [] | [_]) => {
            let filter = DeadFilter { function: rest.first().map(|f| f.to_vec()), limit: LISTED, offset: 0 };
            super::dead_list(shared, filter).await.map(|list| json_lines(list.into_iter().map(DeadView::from)))
        }
        (b"show", [handle]) => match super::dead_get(shared, text(handle)).await {
            Ok(Some(job)) => Ok(json_lines([DeadView::from(job)])),
            Ok(None) => Ok(err("UNKNOWN_JOB", "No such dead job")),
            Err(e) => Err(e),
        },
        (b"retry", rest) => match selection(rest) {
            Some(sel) => super::dead_retry(shared, sel).await.map(json_lines),
            None => return usage(),
        },
        (b"delete", rest) => match selection(rest) {
            Some(sel) => super::dead_delete(shared, sel).await.map(|n| format!("OK {n}\n")),
            None => return usage(),
        },
        _ => return usage(),
    };
    answer.unwrap_or_else(|e| err("LIFECYCLE_UNAVAILABLE", &e))
}
