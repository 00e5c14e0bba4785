//! Job-log records: borrowed while the broker writes them into a [`Batch`], owned
//! ([`Record`]) when a query returns them.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
pub use gearbox_proto::Priority;
use serde::{Deserialize, Serialize};

/// How a job attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Complete,
    Fail,
    Exception,
    /// Taken out of the queue before it ran (admin `cancel job`, or every waiting client left).
    Cancelled,
    /// The worker's CAN_DO_TIMEOUT ran out.
    Timeout,
    /// The worker disconnected while running it.
    LostWorker,
}

impl Status {
    pub const ALL: [Status; 6] =
        [Status::Complete, Status::Fail, Status::Exception, Status::Cancelled, Status::Timeout, Status::LostWorker];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Complete => "complete",
            Status::Fail => "fail",
            Status::Exception => "exception",
            Status::Cancelled => "cancelled",
            Status::Timeout => "timeout",
            Status::LostWorker => "lost_worker",
        }
    }

    /// Everything but `complete`: the job did not produce a result.
    pub fn is_failure(self) -> bool {
        self != Status::Complete
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Status, String> {
        Status::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| {
            format!(
                "unknown status {s:?}; expected complete, fail, exception, cancelled, timeout, lost_worker, \
                 or failed (all but complete)"
            )
        })
    }
}

/// Job priority as the log names it.
pub fn priority_name(p: Priority) -> &'static str {
    match p {
        Priority::High => "high",
        Priority::Normal => "normal",
        Priority::Low => "low",
    }
}

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// One finished job attempt, borrowing its text. Empty or `None` fields are left out of
/// every sink.
#[derive(Clone, Copy, Debug)]
pub struct RecordRef<'a> {
    pub handle: &'a [u8],
    pub function: &'a [u8],
    /// Empty when the job has no unique key.
    pub unique: &'a [u8],
    pub priority: Priority,
    pub background: bool,
    pub status: Status,
    pub attempt: u32,
    pub submitted_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Millis,
    pub worker_id: Option<&'a [u8]>,
    pub client_id: Option<&'a [u8]>,
    pub payload_bytes: u64,
    pub result_bytes: Option<u64>,
    pub error: Option<&'a [u8]>,
    /// Kept only with `--job-log-bodies`, cut to its limit.
    pub payload: Option<&'a [u8]>,
    pub result: Option<&'a [u8]>,
}

impl RecordRef<'_> {
    pub fn queue_ms(&self) -> Option<u64> {
        self.started_at.map(|s| s.saturating_sub(self.submitted_at).max(0) as u64)
    }

    pub fn run_ms(&self) -> Option<u64> {
        self.started_at.map(|s| self.finished_at.saturating_sub(s).max(0) as u64)
    }

    pub fn to_record(&self) -> Record {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Record {
            handle: text(self.handle),
            function: text(self.function),
            unique: (!self.unique.is_empty()).then(|| text(self.unique)),
            priority: priority_name(self.priority).to_owned(),
            background: self.background,
            status: self.status,
            attempt: self.attempt,
            submitted_at: Timestamp(self.submitted_at),
            started_at: self.started_at.map(Timestamp),
            finished_at: Timestamp(self.finished_at),
            queue_ms: self.queue_ms(),
            run_ms: self.run_ms(),
            worker_id: self.worker_id.map(text),
            client_id: self.client_id.map(text),
            payload_bytes: self.payload_bytes,
            result_bytes: self.result_bytes,
            error: self.error.map(text),
            payload: self.payload.map(Body::from_bytes),
            result: self.result.map(Body::from_bytes),
        }
    }
}

/// A job body: text when it is UTF-8, otherwise base64 (`{"base64": "..."}` in JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Body {
    Text(String),
    Binary { base64: String },
}

impl Body {
    pub fn from_bytes(bytes: &[u8]) -> Body {
        match std::str::from_utf8(bytes) {
            Ok(s) => Body::Text(s.to_owned()),
            Err(_) => Body::Binary { base64: base64::engine::general_purpose::STANDARD.encode(bytes) },
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Body::Text(s) => s.as_bytes().to_vec(),
            Body::Binary { base64 } => base64::engine::general_purpose::STANDARD.decode(base64).unwrap_or_default(),
        }
    }
}

/// A UTC time, written as RFC 3339 with milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub Millis);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = UNIX_EPOCH + Duration::from_millis(self.0.max(0) as u64);
        write!(f, "{}", humantime::format_rfc3339_millis(t))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let s = String::deserialize(d)?;
        let t = humantime::parse_rfc3339(&s).map_err(serde::de::Error::custom)?;
        Ok(Timestamp(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)))
    }
}

/// One job attempt as a query returns it. Serialized with the field names dashboards and
/// queries rely on; fields without a value are left out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub handle: String,
    pub function: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique: Option<String>,
    pub priority: String,
    pub background: bool,
    pub status: Status,
    pub attempt: u32,
    pub submitted_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    pub finished_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub payload_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Body>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Body>,
}

/// Records on their way to a sink, already in the embedded log's encoding (see
/// [`Batch::push`]), in one buffer that is reused: logging a job allocates nothing once the
/// batch has grown to its working size, and the embedded sink writes the buffer as it is.
#[derive(Default)]
pub struct Batch {
    bytes: Vec<u8>,
    len: usize,
}

/// Bytes before a record's text fields: length, status, priority, flags, a spare byte,
/// attempt, three times, and two byte counts.
const FIXED: usize = 4 + 4 + 4 + 3 * 8 + 2 * 8;
const FLAG_BACKGROUND: u8 = 1;
const FLAG_STARTED: u8 = 2;
const FLAG_RESULT_BYTES: u8 = 4;
/// Length of a text field that is absent (as opposed to empty).
const ABSENT: u32 = u32::MAX;

impl Batch {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.len = 0;
    }

    /// The encoded records, back to back.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Appends a record: `u32` length of the rest, status, priority, flags, spare byte,
    /// `u32` attempt, `i64` submitted/started/finished, `u64` payload/result bytes (all little
    /// endian), then handle, function, unique, worker, client, error, payload and result, each
    /// a `u32` length (`u32::MAX` when absent) and its bytes.
    pub fn push(&mut self, r: &RecordRef<'_>) {
        let start = self.bytes.len();
        let b = &mut self.bytes;
        b.extend_from_slice(&[0; 4]);
        let flag = |on: bool, bit: u8| if on { bit } else { 0 };
        let flags = flag(r.background, FLAG_BACKGROUND)
            | flag(r.started_at.is_some(), FLAG_STARTED)
            | flag(r.result_bytes.is_some(), FLAG_RESULT_BYTES);
        b.extend_from_slice(&[status_code(r.status), r.priority as u8, flags, 0]);
        b.extend_from_slice(&r.attempt.to_le_bytes());
        for t in [r.submitted_at, r.started_at.unwrap_or(0), r.finished_at] {
            b.extend_from_slice(&t.to_le_bytes());
        }
        b.extend_from_slice(&r.payload_bytes.to_le_bytes());
        b.extend_from_slice(&r.result_bytes.unwrap_or(0).to_le_bytes());
        let fields =
            [Some(r.handle), Some(r.function), Some(r.unique), r.worker_id, r.client_id, r.error, r.payload, r.result];
        for field in fields {
            match field {
                Some(bytes) => {
                    b.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                    b.extend_from_slice(bytes);
                }
                None => b.extend_from_slice(&ABSENT.to_le_bytes()),
            }
        }
        let len = (b.len() - start - 4) as u32;
        b[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.len += 1;
    }

    pub fn iter(&self) -> Records<'_> {
        Records { bytes: &self.bytes }
    }
}

fn status_code(s: Status) -> u8 {
    Status::ALL.iter().position(|&x| x == s).expect("every status is in ALL") as u8
}

/// Decodes records encoded by [`Batch::push`] from a buffer, stopping at the first one that is
/// cut short or malformed.
pub struct Records<'a> {
    bytes: &'a [u8],
}

impl<'a> Records<'a> {
    pub fn new(bytes: &'a [u8]) -> Records<'a> {
        Records { bytes }
    }

    /// The bytes not yet decoded.
    pub fn rest(&self) -> &'a [u8] {
        self.bytes
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = RecordRef<'a>;

    fn next(&mut self) -> Option<RecordRef<'a>> {
        let (record, rest) = decode(self.bytes)?;
        self.bytes = rest;
        Some(record)
    }
}

fn decode(bytes: &[u8]) -> Option<(RecordRef<'_>, &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let body = bytes.get(4..4 + len)?;
    let rest = &bytes[4 + len..];
    if body.len() < FIXED - 4 {
        return None;
    }
    let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
    let status = *Status::ALL.get(body[0] as usize)?;
    let priority = match body[1] {
        0 => Priority::High,
        1 => Priority::Normal,
        2 => Priority::Low,
        _ => return None,
    };
    let flags = body[2];
    let attempt = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes"));
    let mut text = &body[FIXED - 4..];
    let mut fields: [Option<&[u8]>; 8] = [None; 8];
    for field in &mut fields {
        let n = u32::from_le_bytes(text.get(..4)?.try_into().ok()?);
        text = &text[4..];
        if n != ABSENT {
            *field = Some(text.get(..n as usize)?);
            text = &text[n as usize..];
        }
    }
    let record = RecordRef {
        handle: fields[0].unwrap_or_default(),
        function: fields[1].unwrap_or_default(),
        unique: fields[2].unwrap_or_default(),
        priority,
        background: flags & FLAG_BACKGROUND != 0,
        status,
        attempt,
        submitted_at: u64_at(8) as i64,
        started_at: (flags & FLAG_STARTED != 0).then(|| u64_at(16) as i64),
        finished_at: u64_at(24) as i64,
        payload_bytes: u64_at(32),
        result_bytes: (flags & FLAG_RESULT_BYTES != 0).then(|| u64_at(40)),
        worker_id: fields[3],
        client_id: fields[4],
        error: fields[5],
        payload: fields[6],
        result: fields[7],
    };
    Some((record, rest))
}

/// What `gearbox log` (and the HTTP API) ask for. Written as a URL query string
/// (`function=resize&status=fail&since=1h&limit=20`) on the admin line `log ...`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    pub function: Option<String>,
    /// Only this outcome; `fail` also takes `exception` (the worker reported the job failed,
    /// with or without a reason), as a Gearman client that did not ask for exceptions sees it.
    pub status: Option<Status>,
    /// Only failures (every status but `complete`).
    pub failed: bool,
    /// Records that finished at or after this time.
    pub since: Option<Millis>,
    pub unique: Option<String>,
    pub handle: Option<String>,
    /// At most this many records, newest first.
    pub limit: usize,
}

/// Records a query returns when it does not say.
pub const DEFAULT_LIMIT: usize = 50;
/// Most records one query returns.
pub const MAX_LIMIT: usize = 10_000;

impl Query {
    /// Parses `key=value&...`. `since` takes a duration back from `now` (`90s`, `1h`, `7d`) or
    /// milliseconds since the epoch.
    pub fn parse(s: &str, now: Millis) -> Result<Query, String> {
        let mut q = Query { limit: DEFAULT_LIMIT, ..Query::default() };
        for (key, value) in url::form_urlencoded::parse(s.trim().as_bytes()) {
            if value.is_empty() {
                continue;
            }
            match &*key {
                "function" => q.function = Some(value.into_owned()),
                "status" if value == "failed" => q.failed = true,
                "status" => q.status = Some(value.parse()?),
                "since" => q.since = Some(parse_since(&value, now)?),
                "unique" => q.unique = Some(value.into_owned()),
                "handle" => q.handle = Some(value.into_owned()),
                "limit" => {
                    q.limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| format!("bad limit {value:?}: from 1 to {MAX_LIMIT}"))?
                }
                other => return Err(format!("unknown query key {other:?}")),
            }
        }
        Ok(q)
    }

    /// The query string [`Query::parse`] reads back (with `since` in epoch milliseconds).
    pub fn to_query_string(&self) -> String {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        if let Some(v) = &self.function {
            s.append_pair("function", v);
        }
        if let Some(v) = self.status {
            s.append_pair("status", v.as_str());
        } else if self.failed {
            s.append_pair("status", "failed");
        }
        if let Some(v) = self.since {
            s.append_pair("since", &v.to_string());
        }
        if let Some(v) = &self.unique {
            s.append_pair("unique", v);
        }
        if let Some(v) = &self.handle {
            s.append_pair("handle", v);
        }
        s.append_pair("limit", &self.limit.to_string());
        s.finish()
    }

    /// Whether `r` passes the filters (for sinks that cannot filter natively).
    pub fn matches(&self, r: &RecordRef<'_>) -> bool {
        self.function.as_ref().is_none_or(|f| f.as_bytes() == r.function)
            && self.status.is_none_or(|s| s == r.status || (s == Status::Fail && r.status == Status::Exception))
            && (!self.failed || r.status.is_failure())
            && self.since.is_none_or(|t| r.finished_at >= t)
            && self.unique.as_ref().is_none_or(|u| u.as_bytes() == r.unique)
            && self.handle.as_ref().is_none_or(|h| h.as_bytes() == r.handle)
    }
}

fn parse_since(value: &str, now: Millis) -> Result<Millis, String> {
    if let Ok(ms) = value.parse::<i64>() {
        return Ok(ms);
    }
    let ago = humantime::parse_duration(value).map_err(|e| format!("bad since {value:?}: {e}"))?;
    Ok(now - ago.as_millis() as i64)
}

/// Now, in milliseconds since the epoch.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RecordRef<'static> {
        RecordRef {
            handle: b"H:x:1",
            function: b"resize",
            unique: b"",
            priority: Priority::High,
            background: true,
            status: Status::Exception,
            attempt: 2,
            submitted_at: 1_000,
            started_at: Some(1_500),
            finished_at: 2_250,
            worker_id: Some(b"w1"),
            client_id: None,
            payload_bytes: 10,
            result_bytes: None,
            error: Some(b"boom"),
            payload: None,
            result: Some(b"\xff\x00"),
        }
    }

    #[test]
    fn batch_round_trips_records() {
        let mut batch = Batch::default();
        batch.push(&sample());
        batch.push(&RecordRef { handle: b"H:x:2", unique: b"u", error: None, ..sample() });
        let got: Vec<Record> = batch.iter().map(|r| r.to_record()).collect();
        assert_eq!(batch.len(), 2);
        // Cut short anywhere, a buffer decodes to the records that are whole.
        for cut in 0..batch.as_bytes().len() {
            let whole = Records::new(&batch.as_bytes()[..cut]).count();
            assert!(whole < 2, "{cut}");
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].handle, "H:x:1");
        assert_eq!(got[0].unique, None);
        assert_eq!(got[0].error.as_deref(), Some("boom"));
        assert_eq!(got[0].queue_ms, Some(500));
        assert_eq!(got[0].run_ms, Some(750));
        assert_eq!(got[1].unique.as_deref(), Some("u"));
        assert_eq!(got[1].error, None);
        assert_eq!(got[0].result.as_ref().unwrap().to_bytes(), b"\xff\x00");
    }

    #[test]
    fn json_leaves_missing_fields_out() {
        let json = serde_json::to_value(sample().to_record()).unwrap();
        let obj = json.as_object().unwrap();
        assert!(!obj.contains_key("unique"));
        assert!(!obj.contains_key("client_id"));
        assert!(!obj.contains_key("payload"));
        assert_eq!(obj["status"], "exception");
        assert_eq!(obj["priority"], "high");
        assert_eq!(obj["submitted_at"], "1970-01-01T00:00:01.000Z");
        assert_eq!(obj["result"]["base64"], "/wA=");
        let back: Record = serde_json::from_value(json).unwrap();
        assert_eq!(back, sample().to_record());
    }

    #[test]
    fn query_strings_round_trip() {
        let q = Query::parse("function=a%20b&status=fail&since=1h&limit=5", 10_000_000).unwrap();
        assert_eq!(q.function.as_deref(), Some("a b"));
        assert_eq!(q.status, Some(Status::Fail));
        assert_eq!(q.since, Some(10_000_000 - 3_600_000));
        assert_eq!(q.limit, 5);
        assert_eq!(Query::parse(&q.to_query_string(), 0).unwrap(), q);
        assert!(Query::parse("status=nope", 0).is_err());
        assert!(Query::parse("colour=red", 0).is_err());
        assert_eq!(Query::parse("", 0).unwrap().limit, DEFAULT_LIMIT);
    }
}
