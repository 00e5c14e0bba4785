//! The jobs of one run: unique keys and payloads that both carry the job number, the tally
//! of executions that proves every job ran exactly once, and the worker that executes them.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use anyhow::Result;
use bytes::Bytes;
use gearbox_client::Connector;
use gearbox_proto::{PacketType, Response};
use tokio::sync::{oneshot, Notify};

use crate::conn::{unexpected, Conn};

/// Digits of the job number at the start of every payload.
const PAYLOAD_DIGITS: usize = 20;

/// Jobs `0..count`, with unique keys `<prefix><n>`.
pub(crate) struct JobSet {
    prefix: Vec<u8>,
    payload_len: usize,
    runs: Vec<AtomicU32>,
    distinct: AtomicU64,
    foreign: AtomicU64,
    corrupt: AtomicU64,
    /// When a worker received the first job of the set to run.
    started_at: OnceLock<Instant>,
    finished_at: Mutex<Option<Instant>>,
    /// Signalled once every job has run at least once.
    pub done: Notify,
}

/// What the workers saw, checked against what was submitted.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Verdict {
    /// Jobs that never ran.
    pub lost: u64,
    /// Jobs that ran more than once.
    pub duplicated: u64,
    /// Executions whose payload did not carry the job number of their unique key.
    pub corrupt: u64,
    /// Executions of jobs not from this run (leftovers in the server's queue).
    pub foreign: u64,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.corrupt == 0
    }
}

impl JobSet {
    pub fn new(prefix: String, count: u64, payload_len: usize) -> JobSet {
        JobSet {
            prefix: prefix.into_bytes(),
            payload_len: payload_len.max(PAYLOAD_DIGITS),
            runs: (0..count).map(|_| AtomicU32::new(0)).collect(),
            distinct: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            started_at: OnceLock::new(),
            finished_at: Mutex::new(None),
            done: Notify::new(),
        }
    }

    pub fn count(&self) -> u64 {
        self.runs.len() as u64
    }

    /// Jobs that have run at least once so far.
    pub fn completed(&self) -> u64 {
        self.distinct.load(Relaxed)
    }

    /// When a worker received the first job to run (takeover: the first run on a survivor).
    pub fn started_at(&self) -> Option<Instant> {
        self.started_at.get().copied()
    }

    /// When the worker that ran the last outstanding job sent its WORK_COMPLETE.
    pub fn finished_at(&self) -> Option<Instant> {
        *self.finished_at.lock().unwrap()
    }

    /// The number of the job with this unique key, if it is one of the set's.
    pub fn job_number(&self, unique: &[u8]) -> Option<u64> {
        let n = parse_digits(unique.strip_prefix(&self.prefix[..])?)?;
        (n < self.count()).then_some(n)
    }

    /// Counts one execution; true when it was the last job still to run.
    fn record(&self, unique: &[u8], data: &[u8]) -> bool {
        let Some(n) = self.job_number(unique) else {
            self.foreign.fetch_add(1, Relaxed);
            return false;
        };
        if data.len() != self.payload_len || parse_digits(&data[..PAYLOAD_DIGITS]) != Some(n) {
            self.corrupt.fetch_add(1, Relaxed);
        }
        if self.runs[n as usize].fetch_add(1, Relaxed) != 0 {
            return false;
        }
        let before = self.distinct.fetch_add(1, Relaxed);
        if before == 0 {
            let _ = self.started_at.set(Instant::now());
        }
        before + 1 == self.count()
    }

    fn finish(&self, at: Instant) {
        *self.finished_at.lock().unwrap() = Some(at);
        self.done.notify_one();
    }

    pub fn verdict(&self) -> Verdict {
        let mut v =
            Verdict { corrupt: self.corrupt.load(Relaxed), foreign: self.foreign.load(Relaxed), ..Verdict::default() };
        for runs in &self.runs {
            match runs.load(Relaxed) {
                0 => v.lost += 1,
                1 => {}
                _ => v.duplicated += 1,
            }
        }
        v
    }
}

fn parse_digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > PAYLOAD_DIGITS {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| b.is_ascii_digit().then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))?)
}

/// Encodes submit packets for the jobs of a set, reusing its buffers.
pub(crate) struct Submitter {
    function: Bytes,
    unique: Vec<u8>,
    prefix_len: usize,
    payload: Vec<u8>,
    digits: itoa::Buffer,
}

impl Submitter {
    pub fn new(function: Bytes, jobs: &JobSet) -> Submitter {
        Submitter {
            function,
            unique: jobs.prefix.clone(),
            prefix_len: jobs.prefix.len(),
            payload: vec![b'.'; jobs.payload_len],
            digits: itoa::Buffer::new(),
        }
    }

    /// Queues the submit of job `n` on `conn`.
    pub fn push(&mut self, conn: &mut Conn, kind: PacketType, n: u64) {
        self.unique.truncate(self.prefix_len);
        self.unique.extend_from_slice(self.digits.format(n).as_bytes());
        let mut rest = n;
        for b in self.payload[..PAYLOAD_DIGITS].iter_mut().rev() {
            *b = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        conn.push(kind, &[&self.function, &self.unique, &self.payload]);
    }
}

/// A worker that holds one job at a time: GRAB_JOB_UNIQ, PRE_SLEEP on NO_JOB until a NOOP,
/// and WORK_COMPLETE sent together with the next grab. Runs until aborted; `ready` fires
/// once the server has answered, so its CAN_DO is registered.
pub(crate) async fn worker(
    connector: Arc<Connector>,
    addr: String,
    function: Bytes,
    jobs: Arc<JobSet>,
    ready: oneshot::Sender<()>,
) -> Result<()> {
    let mut conn = Conn::connect(&connector, &addr).await?;
    conn.push(PacketType::CanDo, &[&function]);
    conn.push(PacketType::GrabJobUniq, &[]);
    conn.flush().await?;
    let mut ready = Some(ready);
    let mut sleeping = false;
    loop {
        conn.fill().await?;
        let mut finished = false;
        while let Some(response) = conn.next()? {
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            match response {
                Response::NoJob => {
                    conn.push(PacketType::PreSleep, &[]);
                    sleeping = true;
                }
                Response::Noop => {
                    if std::mem::take(&mut sleeping) {
                        conn.push(PacketType::GrabJobUniq, &[]);
                    }
                }
                Response::JobAssignUniq { handle, unique, data, .. } => {
                    finished |= jobs.record(&unique, &data);
                    conn.push(PacketType::WorkComplete, &[&handle, b""]);
                    conn.push(PacketType::GrabJobUniq, &[]);
                }
                other => return Err(unexpected("worker", &other)),
            }
        }
        conn.flush().await?;
        if finished {
            jobs.finish(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executions_are_tallied_per_job() {
        let jobs = JobSet::new("b-x-".into(), 3, 30);
        let payload = |n: u64| {
            let mut p = format!("{n:020}").into_bytes();
            p.resize(30, b'.');
            p
        };
        assert!(!jobs.record(b"other", &payload(0)));
        assert_eq!(jobs.started_at(), None, "a foreign job does not start the set");
        assert!(!jobs.record(b"b-x-0", &payload(0)));
        let started = jobs.started_at().expect("the first run starts the set");
        assert!(!jobs.record(b"b-x-2", &payload(2)));
        assert!(!jobs.record(b"b-x-2", &payload(2)));
        assert!(!jobs.record(b"b-x-9", &payload(9)));
        assert!(!jobs.record(b"other", &payload(0)));
        assert!(jobs.record(b"b-x-1", &payload(0)));
        assert_eq!(jobs.started_at(), Some(started));
        let v = jobs.verdict();
        assert_eq!((v.lost, v.duplicated, v.corrupt, v.foreign), (0, 1, 1, 3));
        assert!(!v.ok());
    }

    #[test]
    fn digits_parse_strictly() {
        assert_eq!(parse_digits(b"00000000000000000042"), Some(42));
        assert_eq!(parse_digits(b"4x"), None);
        assert_eq!(parse_digits(b""), None);
        assert_eq!(parse_digits(b"99999999999999999999"), None);
    }
}
