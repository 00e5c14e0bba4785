//! The broker's side of the job log ([`JobLog`]) and the thread that writes batches to the
//! sink. The broker only ever appends to an in-memory batch and hands full (or old)
//! batches over a bounded channel without waiting; when the channel is full, because the
//! sink is slow or down, the batch is dropped and counted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::record::{now_millis, Batch, RecordRef};
use crate::{Sink, Usage};

/// Records per batch before it is handed to the writer...
const BATCH_RECORDS: usize = 1024;
/// ...or bytes (with `--job-log-bodies`, records can be large): at most about
/// `QUEUED_BATCHES` times this waits in memory for a slow sink.
const BATCH_BYTES: usize = 1024 * 1024;
/// A batch older than this is handed over even when not full, so that a record reaches the
/// sink well within a second of its job's end.
const FLUSH_AFTER: Duration = Duration::from_millis(200);
/// Batches waiting for the writer; more are dropped.
const QUEUED_BATCHES: usize = 64;
/// How long the writer retries one batch on a sink that was working.
const RETRY_FOR: Duration = Duration::from_secs(5);
/// While the sink is down, one attempt at most this often; batches in between are dropped.
const DOWN_RETRY: Duration = Duration::from_secs(1);
/// How often expired records are deleted, at most (short retentions look more often).
const EXPIRE_EVERY: Duration = Duration::from_secs(60);
/// At most one "dropped records" warning this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Counters shown to admins. The writer thread keeps them; readers (metrics, status) take a
/// look without asking it.
#[derive(Debug, Default)]
pub struct LogStats {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    /// Whether the sink reports its [`Usage`]; the fields below copy the last report.
    sized: AtomicBool,
    bytes: AtomicU64,
    /// 0 for no limit.
    max_bytes: AtomicU64,
    expired_by_age: AtomicU64,
    expired_by_size: AtomicU64,
}

impl LogStats {
    /// Counts `n` dropped records; warns (at most once a [`WARN_EVERY`], per `last_warning`)
    /// with `why` and the total so far.
    fn drop_records(&self, n: usize, last_warning: &mut Option<Instant>, why: std::fmt::Arguments<'_>) {
        let total = self.dropped.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            *last_warning = Some(Instant::now());
            tracing::warn!("{why}; {total} job-log records dropped so far");
        }
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The sink's size as it last reported it (after its latest write or expiry); `None` for
    /// sinks that do not report one (MongoDB).
    pub fn usage(&self) -> Option<Usage> {
        self.sized.load(Ordering::Acquire).then(|| Usage {
            bytes: self.bytes.load(Ordering::Relaxed),
            max_bytes: Some(self.max_bytes.load(Ordering::Relaxed)).filter(|&max| max > 0),
            expired_by_age: self.expired_by_age.load(Ordering::Relaxed),
            expired_by_size: self.expired_by_size.load(Ordering::Relaxed),
        })
    }

    fn set_usage(&self, usage: Usage) {
        self.bytes.store(usage.bytes, Ordering::Relaxed);
        self.max_bytes.store(usage.max_bytes.unwrap_or(0), Ordering::Relaxed);
        self.expired_by_age.store(usage.expired_by_age, Ordering::Relaxed);
        self.expired_by_size.store(usage.expired_by_size, Ordering::Relaxed);
        self.sized.store(true, Ordering::Release);
    }
}

enum Msg {
    Batch(Batch),
    Stop,
}

/// Held by the broker: collects records and hands batches to the writer thread.
pub struct JobLog {
    current: Batch,
    /// When the first record of `current` was added.
    oldest: Option<Instant>,
    to_writer: SyncSender<Msg>,
    spare: Receiver<Batch>,
    stats: Arc<LogStats>,
    bodies: Option<usize>,
    last_warning: Option<Instant>,
}

/// The writer thread; [`WriterThread::stop`] writes what is queued and joins it.
pub struct WriterThread {
    thread: Option<JoinHandle<()>>,
}

/// Starts a writer thread for `sink`; [`crate::open`] does this for the configured sinks.
pub fn start(
    sink: Box<dyn Sink>,
    retention: Option<Duration>,
    bodies: Option<usize>,
) -> (JobLog, Arc<LogStats>, WriterThread) {
    let (to_writer, from_broker) = sync_channel(QUEUED_BATCHES);
    let (spare_tx, spare) = sync_channel(QUEUED_BATCHES + 2);
    let stats = Arc::new(LogStats::default());
    if let Some(usage) = sink.usage() {
        stats.set_usage(usage);
    }
    let writer = Writer {
        sink,
        stats: stats.clone(),
        spare: spare_tx,
        down_since: None,
        last_attempt: None,
        last_warning: None,
    };
    let thread = std::thread::Builder::new()
        .name("gearbox-joblog".into())
        .spawn(move || writer.run(from_broker, retention))
        .expect("spawn the job-log writer thread");
    let log = JobLog {
        current: Batch::default(),
        oldest: None,
        to_writer,
        spare,
        stats: stats.clone(),
        bodies,
        last_warning: None,
    };
    (log, stats, WriterThread { thread: Some(thread) })
}

impl JobLog {
    /// The most payload or result bytes kept per record; `None` keeps no bodies.
    pub fn bodies(&self) -> Option<usize> {
        self.bodies
    }

    /// Adds a record. Returns the time by which [`JobLog::flush_due`] should be called
    /// when this record started a new batch.
    pub fn record(&mut self, r: &RecordRef<'_>) -> Option<Instant> {
        self.current.push(r);
        if self.current.len() >= BATCH_RECORDS || self.current.as_bytes().len() >= BATCH_BYTES {
            self.flush();
            return None;
        }
        if self.oldest.is_none() {
            let now = Instant::now();
            self.oldest = Some(now);
            return Some(now + FLUSH_AFTER);
        }
        None
    }

    /// Hands the batch over if it has waited long enough; returns when to look again.
    pub fn flush_due(&mut self, now: Instant) -> Option<Instant> {
        let oldest = self.oldest?;
        if now.duration_since(oldest) >= FLUSH_AFTER {
            self.flush();
            return None;
        }
        Some(oldest + FLUSH_AFTER)
    }

    /// Hands the current batch to the writer without waiting; drops it if the writer is
    /// too far behind.
    pub fn flush(&mut self) {
        self.oldest = None;
        if self.current.is_empty() {
            return;
        }
        let fresh = self.spare.try_recv().unwrap_or_default();
        let batch = std::mem::replace(&mut self.current, fresh);
        if let Err(TrySendError::Full(Msg::Batch(batch)) | TrySendError::Disconnected(Msg::Batch(batch))) =
            self.to_writer.try_send(Msg::Batch(batch))
        {
            let why = format_args!("job log writer is behind (sink slow or down)");
            self.stats.drop_records(batch.len(), &mut self.last_warning, why);
        }
    }

    /// Hands over what is left and tells the writer to finish; used at shutdown.
    pub fn close(&mut self) {
        self.flush();
        let _ = self.to_writer.send(Msg::Stop);
    }
}

impl WriterThread {
    /// Waits for the writer to write what it was given (call [`JobLog::close`] first).
    pub fn stop(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Writer {
    sink: Box<dyn Sink>,
    stats: Arc<LogStats>,
    spare: SyncSender<Batch>,
    down_since: Option<Instant>,
    last_attempt: Option<Instant>,
    last_warning: Option<Instant>,
}

impl Writer {
    fn run(mut self, batches: Receiver<Msg>, retention: Option<Duration>) {
        let mut next_expiry = Instant::now();
        let expire_every =
            retention.map_or(EXPIRE_EVERY, |keep| (keep / 2).clamp(Duration::from_millis(100), EXPIRE_EVERY));
        loop {
            if let Some(keep) = retention {
                if Instant::now() >= next_expiry {
                    next_expiry = Instant::now() + expire_every;
                    match self.sink.expire(now_millis() - keep.as_millis() as i64) {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!("job log: {n} expired records deleted"),
                        Err(e) => tracing::warn!("job log: deleting expired records failed: {e}"),
                    }
                    self.publish_usage();
                }
            }
            match batches.recv_timeout(expire_every) {
                Ok(Msg::Batch(mut batch)) => {
                    self.write(&batch);
                    batch.clear();
                    let _ = self.spare.try_send(batch);
                }
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn publish_usage(&self) {
        if let Some(usage) = self.sink.usage() {
            self.stats.set_usage(usage);
        }
    }

    /// Writes a batch, retrying with backoff while the sink has been working; while it is
    /// down, tries at most once a [`DOWN_RETRY`] and drops the rest.
    fn write(&mut self, batch: &Batch) {
        let deadline = Instant::now() + RETRY_FOR;
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.down_since.is_some() && self.last_attempt.is_some_and(|t| t.elapsed() < DOWN_RETRY) {
                return self.drop_batch(batch, None);
            }
            let written = self.sink.write(batch);
            // Counted from the attempt's end: a dead sink can take seconds to fail.
            self.last_attempt = Some(Instant::now());
            // Before `written` counts the batch, so that a reader who sees it counted sees its size.
            self.publish_usage();
            match written {
                Ok(()) => {
                    self.stats.written.fetch_add(batch.len() as u64, Ordering::Release);
                    if let Some(since) = self.down_since.take() {
                        tracing::info!("job log sink is back after {:.1} s", since.elapsed().as_secs_f64());
                    }
                    return;
                }
                Err(e) if self.down_since.is_some() || Instant::now() + backoff > deadline => {
                    self.down_since.get_or_insert_with(Instant::now);
                    return self.drop_batch(batch, Some(e));
                }
                Err(e) => {
                    tracing::debug!("job log write failed, retrying in {backoff:?}: {e}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn drop_batch(&mut self, batch: &Batch, error: Option<crate::Error>) {
        match error {
            Some(e) => {
                self.stats.drop_records(batch.len(), &mut self.last_warning, format_args!("job log sink failed: {e}"))
            }
            None => self.stats.drop_records(batch.len(), &mut self.last_warning, format_args!("job log sink is down")),
        }
    }
}
