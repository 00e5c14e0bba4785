//! Per-connection output buffer. The broker appends packets for any connection while it holds
//! the broker lock; the connection's own task drains the buffer to its socket.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use bytes::BytesMut;
use tokio::sync::Notify;

#[derive(Default)]
pub struct Outbox {
    buf: Mutex<BytesMut>,
    notify: Notify,
    /// Set when the connection must end (for example it stopped reading and its buffer grew
    /// past the limit); its task closes it at the next wake-up.
    kill: AtomicBool,
}

impl Outbox {
    /// Appends with `write`; wakes the connection's task unless `quiet` (its own task is
    /// running and will flush anyway) or the buffer already had data (it was woken then).
    /// Returns the buffered length afterwards.
    pub fn push(&self, quiet: bool, write: impl FnOnce(&mut BytesMut)) -> usize {
        let mut buf = self.buf.lock().unwrap();
        let was_empty = buf.is_empty();
        write(&mut buf);
        let len = buf.len();
        drop(buf);
        if was_empty && !quiet {
            self.notify.notify_one();
        }
        len
    }

    /// Moves everything buffered into `out` (which the caller has emptied).
    pub fn take_into(&self, out: &mut BytesMut) {
        let mut buf = self.buf.lock().unwrap();
        if !buf.is_empty() {
            std::mem::swap(&mut *buf, out);
        }
    }

    pub async fn wait(&self) {
        self.notify.notified().await
    }

    pub fn kill(&self) {
        self.kill.store(true, Ordering::Relaxed);
        self.notify.notify_one();
    }

    pub fn is_killed(&self) -> bool {
        self.kill.load(Ordering::Relaxed)
    }
}
