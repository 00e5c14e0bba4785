//! A client-side Gearman connection, plaintext or TLS: requests are queued and sent in one
//! write, and every read decodes as many responses as arrived.

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use gearbox_client::{Connector, Stream};
use gearbox_proto::{encode_packet, Decoder, Magic, Message, PacketType, Response};
use tokio::io::AsyncReadExt;

const READ_CHUNK: usize = 64 * 1024;

pub(crate) struct Conn {
    stream: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    decoder: Decoder,
}

impl Conn {
    pub async fn connect(connector: &Connector, addr: &str) -> Result<Conn> {
        let stream = connector.connect(addr).await?;
        Ok(Conn {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(READ_CHUNK),
            decoder: Decoder::default(),
        })
    }

    /// Queues one request; nothing is sent before [`Conn::flush`].
    pub fn push(&mut self, kind: PacketType, args: &[&[u8]]) {
        encode_packet(&mut self.wbuf, Magic::Request, kind, args);
    }

    /// Sends everything queued in a single write.
    pub async fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.send(&self.wbuf).await.context("writing to the server")?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// The next response already received, if a whole one is buffered.
    pub fn next(&mut self) -> Result<Option<Response>> {
        match self.decoder.decode(&mut self.rbuf)? {
            None => Ok(None),
            Some(Message::Packet(frame)) => Ok(Some(Response::parse(&frame)?)),
            Some(Message::AdminLine(line)) => {
                bail!("unexpected text line from the server: {:?}", String::from_utf8_lossy(&line))
            }
        }
    }

    /// Waits for more bytes from the server (one read, however much it brings).
    pub async fn fill(&mut self) -> Result<()> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        let n = self.stream.read_buf(&mut self.rbuf).await.context("reading from the server")?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        Ok(())
    }

    /// Waits for the next response.
    pub async fn recv(&mut self) -> Result<Response> {
        loop {
            if let Some(response) = self.next()? {
                return Ok(response);
            }
            self.fill().await?;
        }
    }
}

/// The error for a response the protocol does not allow at this point.
pub(crate) fn unexpected(who: &str, response: &Response) -> anyhow::Error {
    match response {
        Response::Error { code, text } => {
            anyhow::anyhow!("{who} got ERROR {} {}", String::from_utf8_lossy(code), String::from_utf8_lossy(text))
        }
        other => anyhow::anyhow!("{who} got an unexpected {other:?}"),
    }
}
