//! A Gearman client connection with no socket: the HTTP API submits jobs through it, so they
//! get exactly the rules a network client gets (unique keys, queue limits, the durable store's
//! acknowledgement, results forwarded to waiting clients).

use std::sync::Arc;

use bytes::BytesMut;
use gearbox_proto::{Decoder, Message, Request, Response};

use crate::broker::ConnId;
use crate::outbox::Outbox;
use crate::shared::Shared;

pub(crate) struct LocalConn {
    id: ConnId,
    outbox: Arc<Outbox>,
    shared: Arc<Shared>,
    buf: BytesMut,
}

impl LocalConn {
    pub fn open(shared: &Arc<Shared>) -> LocalConn {
        let outbox = Arc::new(Outbox::default());
        let id = shared.broker.lock().unwrap().connect(outbox.clone(), -1, "http", 0);
        let conn = LocalConn { id, outbox, shared: shared.clone(), buf: BytesMut::new() };
        conn.send(Request::SetClientId { id: bytes::Bytes::from_static(b"http") });
        conn
    }

    pub fn send(&self, req: Request) {
        let mut broker = self.shared.broker.lock().unwrap();
        // Replies to this connection are then written without a wake-up (`recv` looks first),
        // and packets to others wake their tasks.
        broker.begin(self.id);
        broker.apply(self.id, req);
    }

    /// The next packet the broker sends this connection.
    pub async fn recv(&mut self) -> Response {
        loop {
            let notified = self.outbox.notify().notified();
            let mut more = BytesMut::new();
            self.outbox.take_into(&mut more);
            self.buf.extend_from_slice(&more);
            // The broker only writes whole, well-formed packets.
            if let Ok(Some(Message::Packet(frame))) = Decoder::default().decode(&mut self.buf) {
                if let Ok(response) = Response::parse(&frame) {
                    return response;
                }
            }
            notified.await;
        }
    }
}

impl Drop for LocalConn {
    fn drop(&mut self) {
        // A foreground job nobody else waits for is dropped if it has not started yet.
        self.shared.broker.lock().unwrap().disconnect(self.id);
    }
}
