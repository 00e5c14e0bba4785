//! How to reach a server: TCP, then TLS if configured, then the token if any.

use bytes::{Bytes, BytesMut};
use gearbox_proto::{Decoder, Message, Request, Response};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::{Error, Stream, Tls};

/// Opens connections the way [`Client`](crate::Client) and
/// [`Worker`](crate::worker::Worker) do, for code that speaks the protocol itself (admin
/// lines, its own worker loop).
///
/// With a token, the first request on every connection is OPTION_REQ `auth=TOKEN`; gearbox
/// answers OPTION_RES, or ERROR `PERMISSION_DENIED` for a token its access list does not
/// know, and servers without tokens (gearmand) answer ERROR `UNKNOWN_OPTION`: either ERROR
/// fails the connection with [`Error::Server`]. Over TLS without a token, an ECHO_REQ takes
/// its place, so that a server that refuses the client certificate after the handshake (as
/// TLS 1.3 lets it) fails the connection here, with [`Error::Tls`] saying so.
#[derive(Clone, Default)]
pub struct Connector {
    tls: Option<Tls>,
    token: Option<String>,
}

impl Connector {
    /// Plaintext, without a token.
    pub fn new() -> Connector {
        Connector::default()
    }

    pub fn with_tls(mut self, tls: Tls) -> Connector {
        self.tls = Some(tls);
        self
    }

    /// Sends this token (OPTION_REQ `auth=TOKEN`) first on every connection.
    pub fn with_token(mut self, token: impl Into<String>) -> Connector {
        self.token = Some(token.into());
        self
    }

    /// Connects to `addr` (`HOST:PORT`), with TLS and the token if configured, within
    /// [`CONNECT_TIMEOUT`] (else [`Error::Timeout`]: a peer that accepts and never answers
    /// must not hold a worker or a client's failover forever).
    pub async fn connect(&self, addr: &str) -> Result<Stream, Error> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.open(addr)).await.map_err(|_| Error::Timeout)?
    }

    async fn open(&self, addr: &str) -> Result<Stream, Error> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| Error::Connect(addr.to_string(), e))?;
        tcp.set_nodelay(true).ok();
        let mut stream = match &self.tls {
            Some(tls) => Stream::tls(tls.handshake(tcp, addr).await?),
            None => Stream::plain(tcp),
        };
        let first = match (&self.token, &self.tls) {
            (Some(token), _) => Request::OptionReq { option: Bytes::from(format!("auth={token}")) },
            (None, Some(_)) => Request::EchoReq { data: Bytes::new() },
            (None, None) => return Ok(stream),
        };
        let reply = exchange(&mut stream, first).await.map_err(|e| match (&self.tls, e) {
            (Some(tls), Error::Io(e)) => tls.error(addr, &e),
            (_, e) => e,
        })?;
        match reply {
            Response::OptionRes { .. } | Response::EchoRes { .. } => Ok(stream),
            Response::Error { code, text } => Err(refusal(&code, &text)),
            other => Err(Error::Protocol(format!("{addr} answered the first request with {other:?}"))),
        }
    }
}

/// How long connecting, the TLS handshake and the first exchange may take together.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The server's ERROR to the first request as an [`Error::Server`], said plainly when it
/// means the server does not take tokens.
fn refusal(code: &[u8], text: &[u8]) -> Error {
    let code = String::from_utf8_lossy(code).into_owned();
    let text = String::from_utf8_lossy(text).into_owned();
    let text = match code.as_str() {
        "UNKNOWN_OPTION" => format!("this server does not take tokens (OPTION_REQ auth): {text}"),
        _ => text,
    };
    Error::Server { code, text }
}

/// Sends one request and reads its reply.
async fn exchange(stream: &mut Stream, request: Request) -> Result<Response, Error> {
    let mut out = BytesMut::new();
    request.encode(&mut out);
    stream.send(&out).await.map_err(Error::Io)?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        match Decoder::default().decode(&mut buf).map_err(|e| Error::Protocol(e.to_string()))? {
            Some(Message::Packet(frame)) => return Response::parse(&frame).map_err(|e| Error::Protocol(e.to_string())),
            Some(Message::AdminLine(line)) => {
                return Err(Error::Protocol(format!("the server sent a text line: {}", String::from_utf8_lossy(&line))))
            }
            None => {}
        }
        if stream.read_buf(&mut buf).await.map_err(Error::Io)? == 0 {
            return Err(Error::Disconnected);
        }
    }
}
