//! Workers: register async functions, and `run` serves them from every server.
//!
//! ```no_run
//! # async fn demo() {
//! use gearbox_client::worker::{JobError, Worker};
//! Worker::new(["127.0.0.1:4730"])
//!     .register("reverse", |job| async move {
//!         job.status(1, 2);
//!         let mut data = job.payload().to_vec();
//!         data.reverse();
//!         Ok::<_, JobError>(data.into())
//!     })
//!     .concurrency(4)
//!     .run(gearbox_client::worker::shutdown_signal())
//!     .await;
//! # }
//! ```
//!
//! Each concurrency slot is one connection per server that takes one job at a time. An
//! `Err` becomes WORK_EXCEPTION with its message (clients that did not ask for exceptions
//! see WORK_FAIL); a panic fails the job, not the worker. When the shutdown future resolves,
//! no new job is taken and running ones finish. Lost servers are reconnected with backoff.
//! [`Worker::with_tls`] and [`Worker::with_token`] connect as the
//! [`Client`](crate::Client)'s do.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use gearbox_proto::{Decoder, GrabKind, Message, Request, Response};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};

use crate::{Connector, Error, Stream, Tls};

/// Why a job did not complete.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Sent as WORK_EXCEPTION with this message.
    #[error("{0}")]
    Exception(String),
    /// Sent as a plain WORK_FAIL.
    #[error("failed")]
    Fail,
}

impl From<String> for JobError {
    fn from(message: String) -> JobError {
        JobError::Exception(message)
    }
}

impl From<&str> for JobError {
    fn from(message: &str) -> JobError {
        JobError::Exception(message.to_string())
    }
}

/// A job being worked on.
pub struct WorkerJob {
    handle: Bytes,
    function: Bytes,
    unique: Bytes,
    payload: Bytes,
    progress: mpsc::UnboundedSender<Request>,
}

impl WorkerJob {
    pub fn handle(&self) -> &[u8] {
        &self.handle
    }
    pub fn function(&self) -> &[u8] {
        &self.function
    }
    pub fn unique(&self) -> &[u8] {
        &self.unique
    }
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
    /// Tells waiting clients how far along the job is.
    pub fn status(&self, numerator: u32, denominator: u32) {
        let _ = self.progress.send(Request::WorkStatus { handle: self.handle.clone(), numerator, denominator });
    }
    /// Sends partial results to waiting clients.
    pub fn data(&self, data: impl Into<Bytes>) {
        let _ = self.progress.send(Request::WorkData { handle: self.handle.clone(), data: data.into() });
    }
    pub fn warning(&self, data: impl Into<Bytes>) {
        let _ = self.progress.send(Request::WorkWarning { handle: self.handle.clone(), data: data.into() });
    }
}

/// Resolves on SIGTERM or SIGINT: pass it to [`Worker::run`] for the usual graceful stop.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

type JobFuture = Pin<Box<dyn Future<Output = Result<Bytes, JobError>> + Send>>;
type Handler = Arc<dyn Fn(WorkerJob) -> JobFuture + Send + Sync>;

pub struct Worker {
    servers: Vec<String>,
    functions: HashMap<String, (Handler, Option<u32>)>,
    concurrency: usize,
    connector: Connector,
}

impl Worker {
    pub fn new<S: AsRef<str>>(servers: impl IntoIterator<Item = S>) -> Worker {
        Worker {
            servers: servers.into_iter().map(|s| s.as_ref().to_string()).collect(),
            functions: HashMap::new(),
            concurrency: 1,
            connector: Connector::new(),
        }
    }

    /// Connects to every server over TLS.
    pub fn with_tls(mut self, tls: Tls) -> Worker {
        self.connector = self.connector.with_tls(tls);
        self
    }

    /// Sends this token first on every connection (OPTION_REQ `auth=TOKEN`), before CAN_DO.
    /// A refused token is logged, and the connection tried again with backoff, as a lost
    /// server is.
    pub fn with_token(mut self, token: impl Into<String>) -> Worker {
        self.connector = self.connector.with_token(token);
        self
    }

    /// Serves `function` with an async closure.
    pub fn register<F, Fut, E>(self, function: &str, handler: F) -> Worker
    where
        F: Fn(WorkerJob) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, E>> + Send + 'static,
        E: Into<JobError>,
    {
        self.register_with_timeout(function, None, handler)
    }

    /// Like `register`, and tells the server to give the job to another worker if one takes
    /// longer than `timeout` (CAN_DO_TIMEOUT).
    pub fn register_with_timeout<F, Fut, E>(mut self, function: &str, timeout: Option<Duration>, handler: F) -> Worker
    where
        F: Fn(WorkerJob) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, E>> + Send + 'static,
        E: Into<JobError>,
    {
        let handler: Handler = Arc::new(move |job| {
            let fut = handler(job);
            Box::pin(async move { fut.await.map_err(Into::into) })
        });
        let timeout = timeout.map(|t| t.as_millis().min(u128::from(u32::MAX)) as u32);
        self.functions.insert(function.to_string(), (handler, timeout));
        self
    }

    /// How many jobs this process runs at once (per server).
    pub fn concurrency(mut self, n: usize) -> Worker {
        self.concurrency = n.max(1);
        self
    }

    /// Serves until `shutdown` resolves, then lets running jobs finish.
    pub async fn run(self, shutdown: impl Future) {
        let functions = Arc::new(self.functions);
        let connector = Arc::new(self.connector);
        let (stop_tx, stop) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for server in &self.servers {
            for _ in 0..self.concurrency {
                tasks.spawn(serve(server.clone(), connector.clone(), functions.clone(), stop.clone()));
            }
        }
        tokio::select! {
            _ = shutdown => {}
            _ = async { while tasks.join_next().await.is_some() {} } => return,
        }
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
    }
}

/// One slot on one server: reconnects until told to stop.
async fn serve(
    server: String,
    connector: Arc<Connector>,
    functions: Arc<HashMap<String, (Handler, Option<u32>)>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    while !*stop.borrow() {
        match slot(&server, &connector, &functions, &mut stop).await {
            Ok(()) => return,
            Err(e) => tracing::warn!("worker connection to {server}: {e}; reconnecting in {backoff:?}"),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn slot(
    server: &str,
    connector: &Connector,
    functions: &HashMap<String, (Handler, Option<u32>)>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Error> {
    let mut stream = connector.connect(server).await?;
    let mut out = BytesMut::new();
    for (name, (_, timeout)) in functions {
        let function = Bytes::copy_from_slice(name.as_bytes());
        match timeout {
            Some(timeout) => Request::CanDoTimeout { function, timeout: *timeout }.encode(&mut out),
            None => Request::CanDo { function }.encode(&mut out),
        }
    }
    Request::GrabJob(GrabKind::Uniq).encode(&mut out);
    stream.send(&out).await.map_err(Error::Io)?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        let response = tokio::select! {
            _ = stop.changed() => return Ok(()),
            r = next_response(&mut stream, &mut buf) => r.map_err(Error::Io)?,
        };
        out.clear();
        match response {
            Response::NoJob => Request::PreSleep.encode(&mut out),
            Response::Noop => Request::GrabJob(GrabKind::Uniq).encode(&mut out),
            Response::JobAssignUniq { handle, function, unique, data } => {
                let handler =
                    std::str::from_utf8(&function).ok().and_then(|f| functions.get(f)).map(|(h, _)| h.clone());
                let ending = match handler {
                    Some(handler) => {
                        run_job(&mut stream, handler, handle, function, unique, data).await.map_err(Error::Io)?
                    }
                    None => Request::WorkFail { handle },
                };
                ending.encode(&mut out);
                if *stop.borrow() {
                    return stream.send(&out).await.map_err(Error::Io);
                }
                Request::GrabJob(GrabKind::Uniq).encode(&mut out);
            }
            Response::Error { code, text } => {
                tracing::warn!("{server}: {}: {}", String::from_utf8_lossy(&code), String::from_utf8_lossy(&text));
                continue;
            }
            other => return Err(Error::Protocol(format!("unexpected {other:?}"))),
        }
        stream.send(&out).await.map_err(Error::Io)?;
    }
}

/// Runs one job, forwarding its progress as it comes; returns the packet that ends it.
async fn run_job(
    stream: &mut Stream,
    handler: Handler,
    handle: Bytes,
    function: Bytes,
    unique: Bytes,
    payload: Bytes,
) -> std::io::Result<Request> {
    let (progress, mut updates) = mpsc::unbounded_channel();
    let job = WorkerJob { handle: handle.clone(), function, unique, payload, progress };
    // Its own task: a panic ends the task, not this connection.
    let mut task = tokio::spawn(handler(job));
    let mut out = BytesMut::new();
    let outcome = loop {
        tokio::select! {
            update = updates.recv() => {
                if let Some(update) = update {
                    out.clear();
                    update.encode(&mut out);
                    stream.send(&out).await?;
                }
            }
            done = &mut task => break done,
        }
    };
    // Progress sent just before the end still goes first.
    while let Ok(update) = updates.try_recv() {
        out.clear();
        update.encode(&mut out);
        stream.send(&out).await?;
    }
    Ok(match outcome {
        Ok(Ok(result)) => Request::WorkComplete { handle, data: result },
        Ok(Err(JobError::Exception(message))) => Request::WorkException { handle, data: message.into() },
        Ok(Err(JobError::Fail)) => Request::WorkFail { handle },
        Err(panic) => {
            tracing::error!("job {} panicked: {panic}", String::from_utf8_lossy(&handle));
            Request::WorkFail { handle }
        }
    })
}

async fn next_response(stream: &mut Stream, buf: &mut BytesMut) -> std::io::Result<Response> {
    loop {
        let decoded = Decoder::default().decode(buf).map_err(std::io::Error::other)?;
        if let Some(Message::Packet(frame)) = decoded {
            return Response::parse(&frame).map_err(std::io::Error::other);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the server closed the connection"));
        }
    }
}
