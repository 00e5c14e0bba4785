//! An async Gearman client and worker, for gearbox and gearmand alike.
//!
//! ```no_run
//! # async fn demo() -> Result<(), gearbox_client::Error> {
//! use gearbox_client::{Client, Job};
//! let client = Client::new(["127.0.0.1:4730"]);
//! let result = client.run(Job::new("resize", "img.png").unique("img.png")).await?;
//! let handle = client.submit_background(Job::new("mail", "to=me")).await?;
//! let status = client.status(&handle).await?;
//! # Ok(()) }
//! ```
//!
//! With several servers, a job with a unique key always goes to the same server (a
//! consistent hash of the key), so coalescing works across the cluster; other jobs are spread
//! round-robin. A server that cannot be reached is skipped until it can again.
//!
//! TLS and tokens (gearbox's access list; see [`Connector`] for the exchange):
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use gearbox_client::{Client, Job, Tls};
//! let tls = Tls::builder().ca_file("tls/ca.pem").client_certificate("tls/web.pem", "tls/web.key").build()?;
//! let client = Client::new(["jobs.example.com:4740"]).with_tls(tls);
//! client.submit_background(Job::new("resize", "img.png")).await?;
//! let deploy = Client::new(["127.0.0.1:4730"]).with_token(std::env::var("GEARBOX_TOKEN")?);
//! # Ok(()) }
//! ```

mod connection;
mod connector;
mod stream;
mod tls;
pub mod typed;
pub mod worker;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
pub use gearbox_proto::Priority;
use gearbox_proto::{Request, Response};
use tokio::sync::mpsc;

use connection::Connection;
pub use connector::{Connector, CONNECT_TIMEOUT};
pub use stream::Stream;
pub use tls::{Tls, TlsBuilder, TlsError};

/// Why a call failed. `Debug` prints the same text as `Display`, so that
/// `fn main() -> Result<(), gearbox_client::Error>` reports a readable message.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    /// The TLS handshake failed, or the server refused the client certificate just after it.
    #[error("TLS with {server} failed: {reason}")]
    Tls { server: String, reason: String },
    #[error("no server could be reached")]
    NoServer,
    #[error("the connection to the server was lost")]
    Disconnected,
    #[error("i/o: {0}")]
    Io(std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    /// The server's ERROR packet: `PERMISSION_DENIED` for what the access list refuses (and
    /// for an unknown token), `UNKNOWN_OPTION` for a token sent to a server without tokens,
    /// `TLS_REQUIRED` from a TLS port spoken to in plaintext.
    #[error("server error {code}: {text}")]
    Server { code: String, text: String },
    #[error("the job failed")]
    Failed,
    /// The worker's WORK_EXCEPTION payload; its message is shown (unfrozen if a Perl worker
    /// sent it).
    #[error("the job failed: {}", String::from_utf8_lossy(gearbox_proto::exception::text(.0)))]
    Exception(Bytes),
    #[error("timed out")]
    Timeout,
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A job to submit. Payloads are opaque bytes.
#[derive(Clone, Debug)]
pub struct Job {
    function: Bytes,
    payload: Bytes,
    unique: Bytes,
    priority: Priority,
    at: Option<i64>,
}

impl Job {
    pub fn new(function: impl Into<Bytes>, payload: impl Into<Bytes>) -> Job {
        Job {
            function: function.into(),
            payload: payload.into(),
            unique: Bytes::new(),
            priority: Priority::Normal,
            at: None,
        }
    }

    /// Jobs with the same unique key (per function) coalesce into one run.
    pub fn unique(mut self, unique: impl Into<Bytes>) -> Job {
        self.unique = unique.into();
        self
    }

    pub fn priority(mut self, priority: Priority) -> Job {
        self.priority = priority;
        self
    }

    /// Runs the (background) job no earlier than this unix time.
    pub fn at(mut self, unix_seconds: i64) -> Job {
        self.at = Some(unix_seconds);
        self
    }
}

/// What a running foreground job reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobEvent {
    Data(Bytes),
    Warning(Bytes),
    Status {
        numerator: u32,
        denominator: u32,
    },
    Complete(Bytes),
    Fail,
    Exception(Bytes),
    /// The connection to the server was lost before the job ended.
    Lost,
}

/// A submitted background job, with the server that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobHandle {
    server: usize,
    handle: Bytes,
}

impl JobHandle {
    /// The handle as the server sent it (`H:host:123` from gearbox and gearmand).
    pub fn handle(&self) -> &[u8] {
        &self.handle
    }
}

/// The handle as text (bytes that are not UTF-8 are replaced).
impl std::fmt::Display for JobHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.handle))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobStatus {
    pub known: bool,
    pub running: bool,
    pub numerator: u32,
    pub denominator: u32,
}

/// Progress events of a foreground job, ending with `Complete`, `Fail`, `Exception` or `Lost`.
pub struct JobEvents {
    pub handle: Bytes,
    events: mpsc::UnboundedReceiver<JobEvent>,
}

impl JobEvents {
    pub async fn next(&mut self) -> Option<JobEvent> {
        self.events.recv().await
    }
}

struct Server {
    addr: String,
    conn: tokio::sync::Mutex<Option<Connection>>,
    /// Until when the server is skipped after a failed connection attempt.
    down_until: Mutex<Option<Instant>>,
}

/// How long a server that could not be reached is skipped.
const RETRY_DOWN_SERVER: Duration = Duration::from_secs(1);

pub struct Client {
    servers: Vec<Server>,
    next: AtomicUsize,
    timeout: Option<Duration>,
    connector: Connector,
}

impl Client {
    /// A client for these servers (`HOST:PORT`). Connections open on first use.
    pub fn new<S: AsRef<str>>(servers: impl IntoIterator<Item = S>) -> Client {
        let servers = servers
            .into_iter()
            .map(|s| Server {
                addr: s.as_ref().to_string(),
                conn: tokio::sync::Mutex::new(None),
                down_until: Mutex::new(None),
            })
            .collect();
        Client { servers, next: AtomicUsize::new(0), timeout: None, connector: Connector::new() }
    }

    /// Connects to every server over TLS.
    pub fn with_tls(mut self, tls: Tls) -> Client {
        self.connector = self.connector.with_tls(tls);
        self
    }

    /// Sends this token first on every connection (OPTION_REQ `auth=TOKEN`); a server that
    /// refuses it fails the call with [`Error::Server`].
    pub fn with_token(mut self, token: impl Into<String>) -> Client {
        self.connector = self.connector.with_token(token);
        self
    }

    /// Fails calls that take longer (a foreground job: until its result).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = Some(timeout);
        self
    }

    /// Submits a foreground job and waits for its result.
    pub async fn run(&self, job: Job) -> Result<Bytes, Error> {
        self.timed(async {
            let mut events = self.submit(job).await?;
            let mut data = Vec::new();
            while let Some(event) = events.next().await {
                match event {
                    JobEvent::Data(d) => data.extend_from_slice(&d),
                    JobEvent::Complete(d) => {
                        data.extend_from_slice(&d);
                        return Ok(Bytes::from(data));
                    }
                    JobEvent::Fail => return Err(Error::Failed),
                    JobEvent::Exception(e) => return Err(Error::Exception(e)),
                    JobEvent::Lost => return Err(Error::Disconnected),
                    JobEvent::Warning(_) | JobEvent::Status { .. } => {}
                }
            }
            Err(Error::Disconnected)
        })
        .await
    }

    /// Submits a foreground job and returns its progress as it comes.
    pub async fn submit(&self, job: Job) -> Result<JobEvents, Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let request = Request::SubmitJob {
            function: job.function.clone(),
            unique: job.unique.clone(),
            data: job.payload.clone(),
            priority: job.priority,
            background: false,
        };
        let (_, response) = self.call_routed(&job.unique, request, Some(tx)).await?;
        match response {
            Response::JobCreated { handle } => Ok(JobEvents { handle, events: rx }),
            other => Err(Error::Protocol(format!("expected JOB_CREATED, got {other:?}"))),
        }
    }

    /// Submits a background job; returns once the server has accepted (and, for gearbox,
    /// stored) it.
    pub async fn submit_background(&self, job: Job) -> Result<JobHandle, Error> {
        let request = match job.at {
            Some(epoch) => {
                Request::SubmitJobEpoch { function: job.function, unique: job.unique.clone(), epoch, data: job.payload }
            }
            None => Request::SubmitJob {
                function: job.function,
                unique: job.unique.clone(),
                data: job.payload,
                priority: job.priority,
                background: true,
            },
        };
        let (server, response) = self.timed(self.call_routed(&job.unique, request, None)).await?;
        match response {
            Response::JobCreated { handle } => Ok(JobHandle { server, handle }),
            other => Err(Error::Protocol(format!("expected JOB_CREATED, got {other:?}"))),
        }
    }

    /// The status of a background job.
    pub async fn status(&self, job: &JobHandle) -> Result<JobStatus, Error> {
        let request = Request::GetStatus { handle: job.handle.clone() };
        match self.timed(self.call_on(job.server, request, None)).await? {
            Response::StatusRes { known, running, numerator, denominator, .. } => {
                Ok(JobStatus { known, running, numerator, denominator })
            }
            other => Err(Error::Protocol(format!("expected STATUS_RES, got {other:?}"))),
        }
    }

    /// The status of the job with this unique key, asked of the server the key routes to.
    /// `waiting_clients` counts the foreground clients attached to it.
    pub async fn status_by_unique(&self, unique: impl Into<Bytes>) -> Result<(JobStatus, u32), Error> {
        let unique = unique.into();
        let request = Request::GetStatusUnique { unique: unique.clone() };
        match self.timed(self.call_routed(&unique, request, None)).await?.1 {
            Response::StatusResUnique { known, running, numerator, denominator, waiting_clients, .. } => {
                Ok((JobStatus { known, running, numerator, denominator }, waiting_clients))
            }
            other => Err(Error::Protocol(format!("expected STATUS_RES_UNIQUE, got {other:?}"))),
        }
    }

    /// Round trip through the first reachable server.
    pub async fn echo(&self, data: impl Into<Bytes>) -> Result<Bytes, Error> {
        let (_, response) =
            self.timed(self.call_routed(&Bytes::new(), Request::EchoReq { data: data.into() }, None)).await?;
        match response {
            Response::EchoRes { data } => Ok(data),
            other => Err(Error::Protocol(format!("expected ECHO_RES, got {other:?}"))),
        }
    }

    async fn timed<T>(&self, f: impl std::future::Future<Output = Result<T, Error>>) -> Result<T, Error> {
        match self.timeout {
            Some(t) => tokio::time::timeout(t, f).await.map_err(|_| Error::Timeout)?,
            None => f.await,
        }
    }

    /// Sends to the server the key maps to, or the next reachable one after it.
    async fn call_routed(
        &self,
        unique: &Bytes,
        request: Request,
        events: Option<mpsc::UnboundedSender<JobEvent>>,
    ) -> Result<(usize, Response), Error> {
        let n = self.servers.len();
        if n == 0 {
            return Err(Error::NoServer);
        }
        let first =
            if unique.is_empty() { self.next.fetch_add(1, Ordering::Relaxed) % n } else { jump_hash(fnv1a(unique), n) };
        let mut last_error = Error::NoServer;
        for i in 0..n {
            let server = (first + i) % n;
            match self.call_on(server, request.clone(), events.clone()).await {
                Ok(response) => return Ok((server, response)),
                // Only failures to reach the server move on; a server's answer is final.
                Err(e @ (Error::Connect(..) | Error::Tls { .. } | Error::Disconnected | Error::Io(_))) => {
                    last_error = e
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error)
    }

    async fn call_on(
        &self,
        index: usize,
        request: Request,
        events: Option<mpsc::UnboundedSender<JobEvent>>,
    ) -> Result<Response, Error> {
        let server = &self.servers[index];
        let conn = {
            let mut slot = server.conn.lock().await;
            match slot.as_ref().filter(|c| !c.is_closed()) {
                Some(conn) => conn.clone(),
                None => {
                    if server.down_until.lock().unwrap().is_some_and(|t| Instant::now() < t) {
                        return Err(Error::Disconnected);
                    }
                    match Connection::open(&server.addr, &self.connector).await {
                        Ok(conn) => {
                            *slot = Some(conn.clone());
                            conn
                        }
                        // The server answered: it is up, and says no (a refused token).
                        Err(e @ Error::Server { .. }) => return Err(e),
                        Err(e) => {
                            *server.down_until.lock().unwrap() = Some(Instant::now() + RETRY_DOWN_SERVER);
                            return Err(e);
                        }
                    }
                }
            }
        };
        conn.call(request, events).await
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Jump consistent hash (Lamping and Veach): adding a server moves only 1/n of the keys.
fn jump_hash(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_handles_print_as_text() {
        let e = Error::Exception(Bytes::from_static(b"no such image"));
        assert_eq!(format!("{e:?}"), "the job failed: no such image");
        let e = Error::Server { code: "QUEUE_ERROR".into(), text: "Job queue is full".into() };
        assert_eq!(format!("{e:?}"), "server error QUEUE_ERROR: Job queue is full");
        let h = JobHandle { server: 0, handle: Bytes::from_static(b"H:host:42") };
        assert_eq!(h.to_string(), "H:host:42");
    }

    #[test]
    fn jump_hash_is_stable_and_moves_few_keys() {
        let keys: Vec<u64> = (0..10_000u64).map(|k| fnv1a(&k.to_le_bytes())).collect();
        let moved = keys.iter().filter(|&&k| jump_hash(k, 4) != jump_hash(k, 5)).count();
        // About a fifth move when a fifth server joins.
        assert!((1500..2500).contains(&moved), "{moved} moved");
        assert!(keys.iter().all(|&k| jump_hash(k, 4) == jump_hash(k, 4) && jump_hash(k, 4) < 4));
    }
}
