//! Per-connection output buffer. The broker appends packets for any connection while it holds
//! the broker lock; the connection's own task drains the buffer to its socket.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use bytes::BytesMut;
use tokio::sync::Notify;

const OPEN: u8 = 0;
const CLOSING: u8 = 1;
const KILLED: u8 = 2;

/// What the connection's task should do besides writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Open,
    /// Finish writing what is buffered, then close (server shutdown).
    Closing,
    /// Close now (the peer stopped reading and its buffer grew past the limit).
    Killed,
}

#[derive(Default)]
pub struct Outbox {
    buf: Mutex<BytesMut>,
    notify: Notify,
    fate: AtomicU8,
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

    /// Resolves after the next push, close or kill (or at once if one came since the last).
    pub fn notify(&self) -> &Notify {
        &self.notify
    }

    pub fn close(&self) {
        let _ = self.fate.compare_exchange(OPEN, CLOSING, Ordering::Relaxed, Ordering::Relaxed);
        self.notify.notify_one();
    }

    pub fn kill(&self) {
        self.fate.store(KILLED, Ordering::Relaxed);
        self.notify.notify_one();
    }

    pub fn fate(&self) -> Fate {
        match self.fate.load(Ordering::Relaxed) {
            OPEN => Fate::Open,
            CLOSING => Fate::Closing,
            _ => Fate::Killed,
        }
    }
}
