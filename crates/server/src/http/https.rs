//! HTTPS (`--http-ssl`, implied by `--ssl`): a listener for `axum::serve` whose connections
//! arrive with their TLS handshake done. Each handshake runs in a task of its own, with a
//! deadline, so a slow or silent client delays nobody else; the certificate is the one in
//! force when the connection came (it is reloaded on SIGHUP).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::accept::TLS_HANDSHAKE;
use crate::security::{Refused, Security};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections whose handshake is done, waiting for `axum::serve` to take them.
const READY_BACKLOG: usize = 64;

/// The TLS side of an HTTP listener.
pub(super) struct HttpsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl HttpsListener {
    /// Starts accepting on `listener` until `shutdown`; `security` must have TLS.
    pub fn start(listener: TcpListener, security: Arc<Security>, shutdown: CancellationToken) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_BACKLOG);
        tokio::spawn(accept(listener, security, tx, shutdown));
        Ok(HttpsListener { local, ready })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // Shutting down: axum::serve stops on its own signal.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

async fn accept(
    listener: TcpListener,
    security: Arc<Security>,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                tokio::spawn(handshake(stream, peer, security.clone(), ready.clone()));
            }
            Err(e) => {
                // Typically EMFILE: wait for connections to close rather than spin.
                tracing::debug!("HTTPS accept failed: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    security: Arc<Security>,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let acceptor = security.tls.as_ref().expect("HTTPS only with TLS").http();
    let refused = |what: &str| security.audit.refused(Refused::Handshake, "-", &peer.to_string(), what);
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {}
        Ok(Ok(1)) => {
            refused("plain HTTP on an HTTPS port");
            return refuse_plain_http(stream).await;
        }
        // Closed before a byte (a browser's spare connection), or silent.
        _ => return,
    }
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => {
            let _ = ready.send((stream, peer)).await;
        }
        Ok(Err(e)) => refused(&e.to_string()),
        Err(_) => tracing::debug!(%peer, "HTTPS handshake timed out"),
    }
}

/// Answers a plain HTTP request on the HTTPS port with a 400 that says so, then closes.
async fn refuse_plain_http(mut stream: TcpStream) {
    let text = "This port speaks HTTPS: use an https:// address.\n";
    let reply = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        // Read the request first, or closing with it unread resets the connection and the
        // client may never see the answer.
        let mut head = [0u8; 4096];
        let _ = stream.read(&mut head).await?;
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}
