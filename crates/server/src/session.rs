//! One task per connection: read and decode, apply to the broker, write what the outbox holds.

use std::os::fd::AsRawFd;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use gearbox_proto::{AdminCommand, DecodeError, Decoder, Message, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::broker::{AdminEffect, ConnId};
use crate::outbox::{Fate, Outbox};
use crate::server::Shared;

const READ_CHUNK: usize = 64 * 1024;
/// Stop reading from a peer while this much output to it is unsent.
const WRITE_HIGH_WATER: usize = 4 * 1024 * 1024;
/// How long a closing connection may take to flush its last bytes.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

pub(crate) async fn run(mut stream: TcpStream, shared: Arc<Shared>) {
    let ip = stream.peer_addr().map(|a| a.ip().to_string()).unwrap_or_else(|_| "-".into());
    let fd = stream.as_raw_fd();
    let outbox = Arc::new(Outbox::default());
    let id = shared.broker.lock().unwrap().connect(outbox.clone(), fd, &ip);
    if let Err(e) = drive(&mut stream, id, &outbox, &shared).await {
        tracing::debug!(%ip, "connection ended: {e}");
    }
    shared.broker.lock().unwrap().disconnect(id);
}

async fn drive(stream: &mut TcpStream, id: ConnId, outbox: &Outbox, shared: &Shared) -> std::io::Result<()> {
    let (mut rd, mut wr) = stream.split();
    let decoder = Decoder::new(shared.max_packet);
    // Small until the peer sends much: idle connections (thousands of workers) stay cheap.
    let mut rbuf = BytesMut::with_capacity(4096);
    let mut wbuf = BytesMut::new();
    // Created once: re-creating these futures on every turn of the loop costs more than
    // the rest of the loop.
    let mut woken = pin!(outbox.notify().notified());
    let mut close_timer = pin!(tokio::time::sleep(Duration::MAX / 4));
    let mut closing = false;
    loop {
        if wbuf.is_empty() {
            outbox.take_into(&mut wbuf);
            if wbuf.is_empty() && closing {
                return Ok(());
            }
        }
        match outbox.fate() {
            Fate::Open => {}
            Fate::Killed => {
                tracing::warn!("closing a connection that stopped reading its replies");
                return Ok(());
            }
            Fate::Closing if !closing => {
                closing = true;
                close_timer.as_mut().reset(tokio::time::Instant::now() + CLOSE_FLUSH);
                continue;
            }
            Fate::Closing => {}
        }
        if rbuf.capacity() - rbuf.len() < 1024 {
            rbuf.reserve(rbuf.capacity().clamp(4096, READ_CHUNK));
        }
        let reading = !closing && wbuf.len() < WRITE_HIGH_WATER;
        tokio::select! {
            biased;
            written = wr.write(&wbuf), if !wbuf.is_empty() => {
                wbuf.advance(written?);
            }
            read = rd.read_buf(&mut rbuf), if reading => {
                if read? == 0 || !process(&mut rbuf, &decoder, id, shared) {
                    outbox.close();
                }
            }
            _ = woken.as_mut(), if wbuf.is_empty() => {
                woken.set(outbox.notify().notified());
            }
            _ = close_timer.as_mut(), if closing => return Ok(()),
        }
    }
}

/// Applies every complete message in `rbuf`. Returns false when the stream is unusable
/// (an error reply has been queued and the connection should close).
fn process(rbuf: &mut BytesMut, decoder: &Decoder, id: ConnId, shared: &Shared) -> bool {
    let mut broker = shared.broker.lock().unwrap();
    broker.begin(id);
    loop {
        match decoder.decode(rbuf) {
            Ok(None) => return true,
            Ok(Some(Message::Packet(frame))) => match Request::parse(&frame) {
                Ok(req) => broker.apply(id, req),
                // The framing is intact, so the connection can go on.
                Err(e) => broker.send_error(id, e.code(), &e.to_string()),
            },
            Ok(Some(Message::AdminLine(line))) => match AdminCommand::parse(&line) {
                Ok(cmd) => {
                    if let AdminEffect::Shutdown { graceful } = broker.admin(id, cmd, &shared.admin_info) {
                        tracing::info!(graceful, "shutdown requested over the admin protocol");
                        shared.shutdown.cancel();
                    }
                }
                Err(e) => broker.send_text(id, &e.reply()),
            },
            Err(e) => {
                tracing::info!("closing connection after bad input: {e}");
                match e {
                    DecodeError::LineTooLong => broker.send_text(id, "ERR LINE_TOO_LONG Admin+line+too+long\r\n"),
                    DecodeError::BadMagic(_) => broker.send_error(id, "INVALID_MAGIC", &e.to_string()),
                    DecodeError::UnknownType(_) => broker.send_error(id, "INVALID_COMMAND", &e.to_string()),
                    DecodeError::TooLarge { .. } => broker.send_error(id, "ARGUMENT_TOO_LARGE", &e.to_string()),
                }
                rbuf.clear();
                return false;
            }
        }
    }
}
