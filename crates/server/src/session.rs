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
use crate::shared::Shared;

/// A connection's read buffer starts with room for the packets of a typical client or worker,
/// so that thousands of idle connections stay cheap...
const READ_SMALL: usize = 512;
/// ...and once a read fills it (the peer sends more than that at once), reads at least this
/// much, growing by up to `READ_CHUNK` at a time.
const READ_LARGE: usize = 4096;
const READ_CHUNK: usize = 64 * 1024;
/// Stop reading from a peer while this much output to it is unsent.
const WRITE_HIGH_WATER: usize = 4 * 1024 * 1024;
/// How long a closing connection may take to flush its last bytes.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

pub(crate) async fn run(mut stream: TcpStream, shared: Arc<Shared>) {
    let peer = stream.peer_addr().ok();
    let ip = peer.map_or_else(|| "-".into(), |a| a.ip().to_string());
    let fd = stream.as_raw_fd();
    let outbox = Arc::new(Outbox::default());
    let id = shared.broker.lock().unwrap().connect(outbox.clone(), fd, &ip, peer.map_or(0, |a| a.port()));
    if let Err(e) = drive(&mut stream, id, &outbox, &shared).await {
        tracing::debug!(%ip, "connection ended: {e}");
    }
    shared.broker.lock().unwrap().disconnect(id);
}

async fn drive(stream: &mut TcpStream, id: ConnId, outbox: &Outbox, shared: &Arc<Shared>) -> std::io::Result<()> {
    let (mut rd, mut wr) = stream.split();
    let decoder = Decoder::new(shared.max_packet);
    let mut rbuf = BytesMut::with_capacity(READ_SMALL);
    let mut large = false;
    let mut wbuf = BytesMut::new();
    // Created once: re-creating these futures on every turn of the loop costs more than
    // the rest of the loop.
    let mut woken = pin!(outbox.notify().notified());
    let mut close_timer = pin!(tokio::time::sleep(Duration::MAX / 4));
    let mut closing = false;
    loop {
        if wbuf.is_empty() {
            // A closing connection leaves once it has sent everything, acknowledgements the
            // store has yet to commit included (within CLOSE_FLUSH). Whether replies are
            // held is asked first: a commit that releases them puts them in the outbox in
            // the same turn of the lock, so the outbox read after holds them.
            let held = closing && shared.broker.lock().unwrap().holds_replies(id);
            outbox.take_into(&mut wbuf);
            if wbuf.is_empty() && closing && !held {
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
        // Takes back the space of consumed packets, or grows the buffer.
        let (min_free, grow) =
            if large { (READ_LARGE / 4, rbuf.capacity().clamp(READ_LARGE, READ_CHUNK)) } else { (64, READ_SMALL) };
        if rbuf.capacity() - rbuf.len() < min_free {
            rbuf.reserve(grow);
        }
        let reading = !closing && wbuf.len() < WRITE_HIGH_WATER;
        tokio::select! {
            biased;
            written = wr.write(&wbuf), if !wbuf.is_empty() => {
                wbuf.advance(written?);
            }
            read = rd.read_buf(&mut rbuf), if reading => {
                if read? == 0 {
                    outbox.close();
                    continue;
                }
                large |= rbuf.len() == rbuf.capacity();
                loop {
                    match process(&mut rbuf, &decoder, id, shared) {
                        Processed::All => break,
                        Processed::Close => {
                            outbox.close();
                            break;
                        }
                        // Later input waits for the answer, so replies stay in order.
                        Processed::LogQuery(query) => {
                            let reply = log_query(shared, &query).await;
                            shared.broker.lock().unwrap().send_text(id, &reply);
                        }
                        Processed::Lifecycle(cmd) => {
                            let reply = match cmd {
                                AdminCommand::Pause { function, paused } => {
                                    crate::lifecycle::admin::pause(shared, function, paused).await
                                }
                                AdminCommand::Dead { words } => crate::lifecycle::admin::dead(shared, &words).await,
                                _ => unreachable!("only lifecycle commands stop processing"),
                            };
                            shared.broker.lock().unwrap().send_text(id, &reply);
                        }
                    }
                }
            }
            _ = woken.as_mut(), if wbuf.is_empty() => {
                woken.set(outbox.notify().notified());
            }
            _ = close_timer.as_mut(), if closing => return Ok(()),
        }
    }
}

enum Processed {
    /// Every complete message was applied.
    All,
    /// The stream is unusable: an error reply has been queued and the connection should close.
    Close,
    /// Stopped at a `log` admin command, which reads the job log without the broker's lock.
    LogQuery(String),
    /// Stopped at a lifecycle command (`pause`, `resume`, `dead …`), which waits for the
    /// lifecycle store without the broker's lock.
    Lifecycle(AdminCommand),
}

/// Applies the complete messages in `rbuf`.
fn process(rbuf: &mut BytesMut, decoder: &Decoder, id: ConnId, shared: &Shared) -> Processed {
    let mut broker = shared.broker.lock().unwrap();
    broker.begin(id);
    loop {
        match decoder.decode(rbuf) {
            Ok(None) => return Processed::All,
            Ok(Some(Message::Packet(frame))) => match Request::parse(&frame) {
                Ok(req) => broker.apply(id, req),
                // The framing is intact, so the connection can go on.
                Err(e) => broker.send_error(id, e.code(), &e.to_string()),
            },
            Ok(Some(Message::AdminLine(line))) => match AdminCommand::parse(&line) {
                Ok(AdminCommand::Log { query }) if shared.job_log.is_some() => return Processed::LogQuery(query),
                Ok(cmd @ (AdminCommand::Pause { .. } | AdminCommand::Dead { .. })) if shared.lifecycle.is_some() => {
                    return Processed::Lifecycle(cmd)
                }
                Ok(AdminCommand::Cluster) if shared.cluster.is_some() => {
                    let cluster = shared.cluster.as_deref().expect("checked");
                    broker.send_text(id, &crate::cluster::admin_text(cluster));
                }
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
                return Processed::Close;
            }
        }
    }
}

/// Answers `log QUERY`: one JSON record per line, newest first, then `.`.
async fn log_query(shared: &Shared, query: &str) -> String {
    let escape = |msg: String| msg.replace(' ', "+");
    let Some(search) = &shared.job_log else {
        return "ERR JOB_LOG_OFF The+job+log+is+off\r\n".into();
    };
    let query = match gearbox_joblog::Query::parse(query, gearbox_joblog::now_millis()) {
        Ok(q) => q,
        Err(e) => return format!("ERR BAD_QUERY {}\r\n", escape(e)),
    };
    match search.search(query).await {
        Ok(records) => {
            let mut out = String::new();
            for r in records {
                out.push_str(&serde_json::to_string(&r).expect("records serialize"));
                out.push('\n');
            }
            out.push_str(".\n");
            out
        }
        Err(e) => {
            tracing::warn!("job log query failed: {e}");
            format!("ERR JOB_LOG_UNAVAILABLE {}\r\n", escape(e.to_string()))
        }
    }
}
