//! Accepting Gearman connections, plaintext or TLS. A TLS port answers a plaintext client
//! with an error it can read (`TLS_REQUIRED`) and closes; a handshake that fails or stalls
//! ends that connection only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use gearbox_proto::{encode_packet, Magic, PacketType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use crate::security::{tls::common_name, Refused};
use crate::shared::Shared;

/// How long a TLS client has to send its ClientHello and finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a plaintext client on a TLS port gets to read why it is refused.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);
/// The first byte of a TLS record carrying a handshake message (RFC 8446, 5.1).
pub(crate) const TLS_HANDSHAKE: u8 = 0x16;

/// Accepts on `listener` until shutdown; `tls` makes every connection speak TLS.
pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tasks: TaskTracker, tls: bool) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(5);
                let _ = stream.set_nodelay(true);
                if tls {
                    tasks.spawn(tls_session(stream, shared.clone()));
                } else {
                    tasks.spawn(crate::session::run_plain(stream, shared.clone()));
                }
            }
            Err(e) => {
                warn_accept_failed(&e);
                // Typically EMFILE: wait for connections to close rather than spin.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Handshakes, then runs the session with the client certificate's CN as its identity.
async fn tls_session(stream: TcpStream, shared: Arc<Shared>) {
    let peer = stream.peer_addr().map_or_else(|_| "-".into(), |a| a.to_string());
    let acceptor = shared.security.tls.as_ref().expect("TLS listeners only with TLS").gearman();
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {}
        Ok(Ok(1)) => return refuse_plaintext(stream, first[0] == 0, &peer, &shared).await,
        _ => return,
    }
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return shared.security.audit.refused(Refused::Handshake, "-", &peer, &e.to_string()),
        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
    };
    let certificate = stream.get_ref().1.peer_certificates().and_then(|c| c.first());
    let identity = certificate.and_then(common_name);
    if certificate.is_some() && identity.is_none() {
        tracing::warn!(%peer, "a verified client certificate has no subject CN (in UTF-8): the connection is anonymous");
    }
    crate::session::run_tls(stream, identity, shared).await;
}

/// Tells a plaintext client on a TLS port, in its own protocol, to use TLS, then closes.
async fn refuse_plaintext(mut stream: TcpStream, binary: bool, peer: &str, shared: &Shared) {
    shared.security.audit.refused(Refused::Handshake, "-", peer, "plaintext on a TLS port");
    let mut reply = BytesMut::new();
    if binary {
        let text: &[u8] = b"this port speaks TLS: connect with TLS, or to the plaintext port";
        encode_packet(&mut reply, Magic::Response, PacketType::Error, &[b"TLS_REQUIRED", text]);
    } else {
        reply.extend_from_slice(b"ERR TLS_REQUIRED This+port+speaks+TLS\r\n");
    }
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(&reply).await?;
        stream.shutdown().await?;
        // Reading what the client sent before closing keeps the kernel from answering it
        // with a reset, which could discard the reply before the client reads it.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Logs a failed accept. Running out of file descriptors is said once, with what to do about
/// it; while it lasts, every retry fails the same way, so the rest go to DEBUG.
fn warn_accept_failed(e: &std::io::Error) {
    static OUT_OF_FILES_WARNED: AtomicBool = AtomicBool::new(false);
    let out_of_files = match e.raw_os_error() {
        Some(libc::EMFILE) => format!(
            "the open-files limit ({}) caps connections; raise it with --file-descriptors \
             (above the hard limit as root, or raise the hard limit: systemd's LimitNOFILE=)",
            crate::fd_limit::current()
        ),
        Some(libc::ENFILE) => "the system's open-files table is full (fs.file-max)".to_string(),
        _ => return tracing::warn!("accept failed: {e}"),
    };
    if OUT_OF_FILES_WARNED.swap(true, Ordering::Relaxed) {
        tracing::debug!("accept failed: {e}");
    } else {
        tracing::warn!("accept failed: {e}: {out_of_files}; new connections wait until others close");
    }
}
