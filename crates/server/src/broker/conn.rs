//! Connections: what the broker knows of each, and sending to them. A reply to a connection
//! that waits for a durable commit is held behind it (see `durable`).

use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use gearbox_joblog::Status as Outcome;
use gearbox_proto::{encode_packet, Magic, PacketType as T};

use super::durable::Held;
use super::worker::{Ability, Running};
use super::{Broker, ConnId, JobKey};
use crate::outbox::Outbox;

pub(super) struct Conn {
    pub(super) outbox: Arc<Outbox>,
    pub(super) fd: i32,
    pub(super) ip: Box<str>,
    /// `IP:PORT`, naming the connection in the job log when it set no client id.
    pub(super) peer: Box<str>,
    /// Never reused, unlike the connection's slab key: jobs remember their submitter by it.
    pub(super) serial: u32,
    pub(super) client_id: Option<Bytes>,
    pub(super) abilities: Vec<Ability>,
    pub(super) sleeping: bool,
    pub(super) sleep_epoch: u32,
    pub(super) exceptions: bool,
    /// Jobs assigned to this worker connection.
    pub(super) running: Vec<Running>,
    /// The last job this worker ended with WORK_EXCEPTION. Some workers (Perl's
    /// Gearman::Worker) follow the exception with a WORK_FAIL, which is then ignored instead
    /// of answered with an ERROR they cannot handle.
    pub(super) excepted: Option<u64>,
    /// Foreground jobs this client waits on.
    pub(super) waiting: HashSet<JobKey>,
    /// Replies waiting behind a JOB_CREATED that waits for the durable store.
    pub(super) held: RefCell<Option<VecDeque<Held>>>,
}

impl Broker {
    pub fn connect(&mut self, outbox: Arc<Outbox>, fd: i32, ip: &str, port: u16) -> ConnId {
        let serial = self.next_serial;
        self.next_serial = self.next_serial.wrapping_add(1);
        let id = self.conns.insert(Conn {
            outbox,
            fd,
            ip: ip.into(),
            peer: format!("{ip}:{port}").into(),
            serial,
            client_id: None,
            abilities: Vec::new(),
            sleeping: false,
            sleep_epoch: 0,
            exceptions: false,
            running: Vec::new(),
            excepted: None,
            waiting: HashSet::new(),
            held: RefCell::new(None),
        }) as ConnId;
        self.serials.insert(serial, id);
        id
    }

    pub fn disconnect(&mut self, conn: ConnId) {
        // Whatever this sends goes to other connections, whose tasks must be woken.
        self.current = None;
        let Some(c) = self.conns.get_mut(conn as usize) else {
            return;
        };
        c.sleeping = false;
        let abilities = std::mem::take(&mut c.abilities);
        let running = std::mem::take(&mut c.running);
        for ability in &abilities {
            self.functions[ability.function as usize].workers -= 1;
        }
        // The connection stays known until its jobs are logged with its name.
        for r in running {
            self.lose_worker(r.key, Outcome::LostWorker, Some(conn), r.started_at);
        }
        for ability in &abilities {
            self.worker_left(ability.function);
        }
        let mut c = self.conns.remove(conn as usize);
        self.serials.remove(&c.serial);
        for key in c.waiting.drain() {
            self.detach_client(key, conn);
        }
    }

    /// The functions a worker connection has registered (CAN_DO), for re-checking them when
    /// its rights change.
    pub fn abilities(&self, conn: ConnId) -> Vec<Bytes> {
        let Some(c) = self.conns.get(conn as usize) else { return Vec::new() };
        c.abilities.iter().map(|a| self.functions[a.function as usize].name.clone()).collect()
    }

    /// Wakes every connection's task (after a reload of the access list).
    pub fn wake_all(&self) {
        for (_, c) in &self.conns {
            c.outbox.notify().notify_one();
        }
    }

    /// Asks every connection to flush and close (server shutdown).
    pub fn close_all(&self) {
        for (_, c) in &self.conns {
            c.outbox.close();
        }
    }

    /// Starts applying packets from `conn`: replies to it need no wake-up.
    pub fn begin(&mut self, conn: ConnId) {
        self.current = Some(conn);
    }

    /// Starts a change that comes from no connection (the HTTP API): everyone written to
    /// is woken.
    pub fn begin_external(&mut self) {
        self.current = None;
    }

    pub(super) fn send(&self, conn: ConnId, kind: T, args: &[&[u8]]) {
        self.send_raw(conn, |b| encode_packet(b, Magic::Response, kind, args));
    }

    pub(super) fn send_raw(&self, conn: ConnId, write: impl FnOnce(&mut BytesMut)) {
        let Some(c) = self.conns.get(conn as usize) else { return };
        if let Some(queue) = c.held.borrow_mut().as_mut() {
            match queue.back_mut() {
                Some(Held::Bytes(bytes)) => write(bytes),
                _ => {
                    let mut bytes = BytesMut::new();
                    write(&mut bytes);
                    queue.push_back(Held::Bytes(bytes));
                }
            }
            return;
        }
        self.push_out(conn, write);
    }

    /// Writes to a connection's outbox, bypassing any held replies.
    pub(super) fn push_out(&self, conn: ConnId, write: impl FnOnce(&mut BytesMut)) {
        if let Some(c) = self.conns.get(conn as usize) {
            let len = c.outbox.push(self.current == Some(conn), write);
            if len > self.config.max_outbox {
                c.outbox.kill();
            }
        }
    }

    pub fn send_error(&self, conn: ConnId, code: &str, text: &str) {
        self.send(conn, T::Error, &[code.as_bytes(), text.as_bytes()]);
    }

    pub fn send_text(&self, conn: ConnId, text: &str) {
        self.send_raw(conn, |b| b.extend_from_slice(text.as_bytes()));
    }
}
