//! One connection to one server, driven by a task of its own.
//!
//! Every request the client sends gets exactly one direct reply (JOB_CREATED, STATUS_RES,
//! ECHO_RES, OPTION_RES, or ERROR instead of any of them), and servers reply in request
//! order, so direct replies are matched to a FIFO of waiters. Progress and results of
//! foreground jobs (WORK_*) are routed by job handle.

use std::collections::{HashMap, VecDeque};

use bytes::{Bytes, BytesMut};
use gearbox_proto::{Decoder, Message, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::{Connector, Error, JobEvent, Stream};

pub(crate) struct Call {
    pub request: Request,
    pub reply: oneshot::Sender<Result<Response, Error>>,
    /// For foreground submissions: where the job's progress and result go.
    pub events: Option<mpsc::UnboundedSender<JobEvent>>,
}

/// A handle on the connection task; dropping every clone closes the connection.
#[derive(Clone)]
pub(crate) struct Connection {
    calls: mpsc::UnboundedSender<Call>,
}

impl Connection {
    pub async fn open(addr: &str, connector: &Connector) -> Result<Connection, Error> {
        let stream = connector.connect(addr).await?;
        let (calls, rx) = mpsc::unbounded_channel();
        tokio::spawn(drive(stream, rx));
        let conn = Connection { calls };
        // Ask for exception messages; servers that refuse the option still work, but a TLS
        // port spoken to in plaintext says so and closes.
        match conn.call(Request::OptionReq { option: Bytes::from_static(b"exceptions") }, None).await {
            Ok(_) => Ok(conn),
            Err(Error::Server { code, text }) if code == "TLS_REQUIRED" => Err(Error::Server { code, text }),
            Err(Error::Server { code, .. }) => {
                tracing::debug!("{addr} refuses the exceptions option: {code}");
                Ok(conn)
            }
            Err(e) => Err(e),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.calls.is_closed()
    }

    pub async fn call(
        &self,
        request: Request,
        events: Option<mpsc::UnboundedSender<JobEvent>>,
    ) -> Result<Response, Error> {
        let (reply, rx) = oneshot::channel();
        self.calls.send(Call { request, reply, events }).map_err(|_| Error::Disconnected)?;
        rx.await.map_err(|_| Error::Disconnected)?
    }
}

struct Waiter {
    reply: oneshot::Sender<Result<Response, Error>>,
    events: Option<mpsc::UnboundedSender<JobEvent>>,
}

async fn drive(stream: Stream, mut calls: mpsc::UnboundedReceiver<Call>) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut waiting: VecDeque<Waiter> = VecDeque::new();
    let mut jobs: HashMap<Bytes, mpsc::UnboundedSender<JobEvent>> = HashMap::new();
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::new();
    let decoder = Decoder::default();
    let failure = loop {
        tokio::select! {
            call = calls.recv() => {
                let Some(call) = call else { return };
                out.clear();
                call.request.encode(&mut out);
                // More calls already queued go out in the same write.
                waiting.push_back(Waiter { reply: call.reply, events: call.events });
                while let Ok(call) = calls.try_recv() {
                    call.request.encode(&mut out);
                    waiting.push_back(Waiter { reply: call.reply, events: call.events });
                }
                // Over TLS the bytes wait in the TLS layer until flushed.
                if let Err(e) = async { wr.write_all(&out).await?; wr.flush().await }.await {
                    break Error::Io(e);
                }
            }
            read = rd.read_buf(&mut rbuf) => {
                match read {
                    Ok(0) => break Error::Disconnected,
                    Err(e) => break Error::Io(e),
                    Ok(_) => {}
                }
                if let Err(e) = dispatch(&decoder, &mut rbuf, &mut waiting, &mut jobs) {
                    break e;
                }
            }
        }
    };
    tracing::debug!("connection closed: {failure}");
    for w in waiting {
        let _ = w.reply.send(Err(Error::Disconnected));
    }
    for (_, events) in jobs {
        let _ = events.send(JobEvent::Lost);
    }
}

/// Routes every complete packet in `rbuf`.
fn dispatch(
    decoder: &Decoder,
    rbuf: &mut BytesMut,
    waiting: &mut VecDeque<Waiter>,
    jobs: &mut HashMap<Bytes, mpsc::UnboundedSender<JobEvent>>,
) -> Result<(), Error> {
    while let Some(message) = decoder.decode(rbuf).map_err(|e| Error::Protocol(e.to_string()))? {
        let Message::Packet(frame) = message else {
            return Err(Error::Protocol("the server sent a text line".into()));
        };
        let response = Response::parse(&frame).map_err(|e| Error::Protocol(e.to_string()))?;
        let (handle, event, last) = match response {
            Response::WorkData { handle, data } => (handle, JobEvent::Data(data), false),
            Response::WorkWarning { handle, data } => (handle, JobEvent::Warning(data), false),
            Response::WorkStatus { handle, numerator, denominator } => {
                (handle, JobEvent::Status { numerator, denominator }, false)
            }
            Response::WorkComplete { handle, data } => (handle, JobEvent::Complete(data), true),
            Response::WorkFail { handle } => (handle, JobEvent::Fail, true),
            Response::WorkException { handle, data } => (handle, JobEvent::Exception(data), true),
            direct => {
                let Some(waiter) = waiting.pop_front() else {
                    return Err(Error::Protocol(format!("unexpected {direct:?}")));
                };
                if let (Response::JobCreated { handle }, Some(events)) = (&direct, waiter.events) {
                    jobs.insert(handle.clone(), events);
                }
                let _ = waiter.reply.send(match direct {
                    Response::Error { code, text } => Err(Error::Server {
                        code: String::from_utf8_lossy(&code).into_owned(),
                        text: String::from_utf8_lossy(&text).into_owned(),
                    }),
                    other => Ok(other),
                });
                continue;
            }
        };
        if let Some(events) = jobs.get(&handle) {
            let _ = events.send(event);
        }
        if last {
            jobs.remove(&handle);
        }
    }
    Ok(())
}
