//! One task per connection: read and decode, apply to the broker, write what the outbox holds.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use gearbox_proto::{AdminCommand, DecodeError, Decoder, Message, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::broker::{AdminEffect, Broker, ConnId};
use crate::outbox::{Fate, Outbox};
use crate::security::{Access, AuthError, Refused};
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

pub(crate) async fn run_plain(mut stream: TcpStream, shared: Arc<Shared>) {
    let peer = stream.peer_addr().ok();
    let fd = stream.as_raw_fd();
    let (rd, wr) = stream.split();
    run(rd, wr, Link { peer, fd, tls: false, identity: None }, shared).await;
}

pub(crate) async fn run_tls(stream: TlsStream<TcpStream>, identity: Option<String>, shared: Arc<Shared>) {
    let peer = stream.get_ref().0.peer_addr().ok();
    let fd = stream.get_ref().0.as_raw_fd();
    let (rd, wr) = tokio::io::split(stream);
    run(rd, wr, Link { peer, fd, tls: true, identity }, shared).await;
}

/// What a session knows of its transport.
struct Link {
    peer: Option<SocketAddr>,
    fd: i32,
    tls: bool,
    /// The client certificate's subject CN.
    identity: Option<String>,
}

async fn run<R, W>(mut rd: R, mut wr: W, link: Link, shared: Arc<Shared>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let ip = link.peer.map_or_else(|| "-".into(), |a| a.ip().to_string());
    let outbox = Arc::new(Outbox::default());
    let id = shared.broker.lock().unwrap().connect(outbox.clone(), link.fd, &ip, link.peer.map_or(0, |a| a.port()));
    let mut guard = Guard {
        access: Access::new(&shared.security, link.identity),
        peer: link.peer.map_or_else(|| "-".into(), |a| a.to_string()),
        recheck: false,
    };
    match drive(&mut rd, &mut wr, link.tls, id, &outbox, &mut guard, &shared).await {
        // TLS peers expect close_notify; without it they report a truncated stream.
        Ok(()) if link.tls => {
            let _ = tokio::time::timeout(CLOSE_FLUSH, wr.shutdown()).await;
        }
        Ok(()) => {}
        Err(e) => tracing::debug!(%ip, "connection ended: {e}"),
    }
    shared.broker.lock().unwrap().disconnect(id);
}

async fn drive<R, W>(
    rd: &mut R,
    wr: &mut W,
    tls: bool,
    id: ConnId,
    outbox: &Outbox,
    guard: &mut Guard,
    shared: &Arc<Shared>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let decoder = Decoder::new(shared.max_packet);
    let mut rbuf = BytesMut::with_capacity(READ_SMALL);
    let mut large = false;
    let mut wbuf = BytesMut::new();
    // Created once: re-creating these futures on every turn of the loop costs more than
    // the rest of the loop.
    let mut woken = pin!(outbox.notify().notified());
    let mut close_timer = pin!(tokio::time::sleep(Duration::MAX / 4));
    let mut closing = false;
    // TLS buffers what it is given; it is flushed once everything is written.
    let mut unflushed = false;
    let mut first_read = true;
    loop {
        if wbuf.is_empty() {
            // A closing connection leaves once it has sent everything, acknowledgements the
            // store has yet to commit included (within CLOSE_FLUSH). Whether replies are
            // held is asked first: a commit that releases them puts them in the outbox in
            // the same turn of the lock, so the outbox read after holds them.
            let held = closing && shared.broker.lock().unwrap().holds_replies(id);
            outbox.take_into(&mut wbuf);
            if wbuf.is_empty() && closing && !held && !unflushed {
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
            written = write_or_flush(wr, &wbuf), if !wbuf.is_empty() || unflushed => match written? {
                Some(n) => {
                    wbuf.advance(n);
                    unflushed = tls;
                }
                None => unflushed = false,
            },
            read = rd.read_buf(&mut rbuf), if reading => {
                if read? == 0 {
                    outbox.close();
                    continue;
                }
                large |= rbuf.len() == rbuf.capacity();
                if std::mem::take(&mut first_read) && !tls && rbuf.first() == Some(&crate::accept::TLS_HANDSHAKE) {
                    let peer = &guard.peer;
                    shared.security.audit.refused(Refused::TlsOnPlain, "-", peer, "TLS ClientHello on a plaintext port");
                    return Ok(());
                }
                guard.recheck |= guard.access.refresh(&shared.security);
                loop {
                    match process(&mut rbuf, &decoder, id, guard, shared) {
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
                if guard.access.refresh(&shared.security) {
                    let mut broker = shared.broker.lock().unwrap();
                    broker.begin(id);
                    guard.revoke_abilities(&mut broker, id, shared);
                }
            }
            _ = close_timer.as_mut(), if closing => return Ok(()),
        }
    }
}

/// Writes what it can of `buf`; with nothing to write, flushes (TLS records still buffered).
async fn write_or_flush<W: AsyncWrite + Unpin>(wr: &mut W, buf: &[u8]) -> std::io::Result<Option<usize>> {
    if buf.is_empty() {
        wr.flush().await.map(|()| None)
    } else {
        wr.write(buf).await.map(Some)
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
fn process(rbuf: &mut BytesMut, decoder: &Decoder, id: ConnId, guard: &mut Guard, shared: &Shared) -> Processed {
    let mut broker = shared.broker.lock().unwrap();
    broker.begin(id);
    if std::mem::take(&mut guard.recheck) {
        guard.revoke_abilities(&mut broker, id, shared);
    }
    loop {
        match decoder.decode(rbuf) {
            Ok(None) => return Processed::All,
            Ok(Some(Message::Packet(frame))) => match Request::parse(&frame) {
                Ok(req) => {
                    if guard.allows(&req, &mut broker, id, shared) {
                        broker.apply(id, req)
                    }
                }
                // The framing is intact, so the connection can go on.
                Err(e) => broker.send_error(id, e.code(), &e.to_string()),
            },
            Ok(Some(Message::AdminLine(line))) => match AdminCommand::parse(&line) {
                Ok(cmd) if !guard.allows_admin(&cmd, &broker, id, shared) => {}
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

/// A connection's identity and the checks of the access list (`--acl`) on what it sends.
struct Guard {
    access: Access,
    /// `IP:PORT`, for the audit log.
    peer: String,
    /// The access list was reloaded: registered functions are checked again.
    recheck: bool,
}

impl Guard {
    /// Whether `req` may be applied; a refusal has been answered (or, for CAN_DO, which has
    /// no reply, only logged, as OpenStack's gear does) and audited.
    fn allows(&mut self, req: &Request, broker: &mut Broker, id: ConnId, shared: &Shared) -> bool {
        if let Request::OptionReq { option } = req {
            if let Some(token) = option.strip_prefix(b"auth=") {
                match self.access.authenticate(&shared.security, token) {
                    Ok(()) => {
                        // The new identity may work on less than the old one did.
                        self.revoke_abilities(broker, id, shared);
                        return true;
                    }
                    Err(AuthError::NoAcl) => {
                        let text = "this server has no access list (--acl): it does not check tokens";
                        broker.send_error(id, "UNKNOWN_OPTION", text);
                    }
                    Err(AuthError::Unknown) => {
                        self.refuse(Refused::Token, "auth", shared);
                        broker.send_error(id, "PERMISSION_DENIED", "unknown token");
                    }
                }
                return false;
            }
        }
        let Some(grant) = self.access.grant() else { return true };
        let (refused, function) = match req {
            Request::SubmitJob { function, .. }
            | Request::SubmitJobEpoch { function, .. }
            | Request::SubmitJobSched { function, .. }
            | Request::SubmitReduceJob { function, .. } => {
                if grant.may_submit(function) {
                    return true;
                }
                (Refused::Submit, function)
            }
            Request::CanDo { function } | Request::CanDoTimeout { function, .. } => {
                if grant.may_work(function) {
                    return true;
                }
                let function = String::from_utf8_lossy(function).into_owned();
                self.refuse(Refused::Work, &function, shared);
                return false;
            }
            Request::GetStatus { .. } | Request::GetStatusUnique { .. } if !grant.may_ask_status() => {
                self.refuse(Refused::Status, "GET_STATUS", shared);
                broker.send_error(
                    id,
                    "PERMISSION_DENIED",
                    &format!("{} may not ask for job status", self.access.identity()),
                );
                return false;
            }
            _ => return true,
        };
        let function = String::from_utf8_lossy(function).into_owned();
        self.refuse(refused, &function, shared);
        broker.send_error(id, "PERMISSION_DENIED", &format!("{} may not submit {function}", self.access.identity()));
        false
    }

    /// Whether an admin command may run; a refusal gets `ERR PERMISSION_DENIED`.
    fn allows_admin(&mut self, cmd: &AdminCommand, broker: &Broker, id: ConnId, shared: &Shared) -> bool {
        let Some(grant) = self.access.grant() else { return true };
        if grant.may_admin(cmd) {
            return true;
        }
        let needed = crate::security::acl::needed(cmd);
        self.refuse(Refused::Admin, &format!("{cmd:?}"), shared);
        let identity = self.access.identity().replace(' ', "+");
        let text = format!("{identity}+may+not+run+this+command+(it+needs+admin+{})", needed.label());
        broker.send_text(id, &format!("ERR PERMISSION_DENIED {text}\r\n"));
        false
    }

    /// Unregisters the functions the connection's grant no longer lets it work on (after a
    /// reload, or a token), so that no job of theirs reaches it.
    fn revoke_abilities(&self, broker: &mut Broker, id: ConnId, shared: &Shared) {
        let Some(grant) = self.access.grant() else { return };
        for function in broker.abilities(id) {
            if !grant.may_work(&function) {
                self.refuse(Refused::Work, &String::from_utf8_lossy(&function), shared);
                broker.apply(id, Request::CantDo { function });
            }
        }
    }

    fn refuse(&self, action: Refused, what: &str, shared: &Shared) {
        shared.security.audit.refused(action, self.access.identity(), &self.peer, what);
    }
}
