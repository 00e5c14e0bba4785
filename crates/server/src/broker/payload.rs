//! Payloads of stored jobs: kept in memory up to a budget, read back past it.
//!
//! The embedded store reads a payload back from its files (a `pread` from the page cache)
//! when a worker takes the job. A database is a round trip away, too slow to wait for under
//! the broker's lock, so the store thread reads payloads in batches instead: ahead of time
//! for the next queued jobs of functions that have workers (a cursor per queue marks how far
//! it has gone), and at once for a job a worker took before its payload came back, whose
//! JOB_ASSIGN is then held (as a JOB_CREATED waiting for a commit is) until it arrives.

use std::borrow::Cow;
use std::collections::HashSet;
use std::ops::Range;

use bytes::BytesMut;
use gearbox_joblog::Status as Outcome;
use gearbox_proto::{encode_packet, Magic, PacketType as T};
use gearbox_store::Loc;

use super::durable::Held;
use super::job::{Job, JobState, PackedConn};
use super::{Broker, ConnId, JobKey};

/// Payload bytes of stored jobs kept in memory; the rest are read back when needed. (A few
/// bytes in tests, so that the model test's jobs go out of memory and come back.)
const PAYLOAD_RAM_BUDGET: usize = if cfg!(test) { 1 } else { 8 << 20 };
/// Jobs whose payloads one request to the store thread names, at most...
const MAX_REQUEST: usize = 10_000;
/// ...and queue entries one request looks at, at most.
const MAX_SCAN: usize = 1 << 16;

impl Broker {
    /// Whether a stored payload of `len` bytes at `loc` stays in memory; counts it if so.
    pub(super) fn take_into_ram(&mut self, len: usize, loc: Loc) -> bool {
        let d = self.durable.as_mut().expect("durable store enabled");
        let can_read_back = (d.reader.is_some() || d.fetches) && loc != Loc::NONE;
        let keep = !can_read_back || d.ram_bytes + len <= PAYLOAD_RAM_BUDGET;
        if keep {
            d.ram_bytes += len;
        }
        keep
    }

    /// Keeps a newly stored job's payload in memory within the budget; past it, drops it
    /// for the store to serve later.
    pub(super) fn keep_or_evict(&mut self, key: JobKey) {
        let job = &self.jobs[key as usize];
        if !self.take_into_ram(job.payload_len as usize, job.loc) {
            let job = &mut self.jobs[key as usize];
            job.body = job.unique().into();
            job.in_ram = false;
        }
    }

    /// A job's payload, from memory or read back from the store's files.
    pub(super) fn payload<'a>(&self, job: &'a Job) -> std::io::Result<Cow<'a, [u8]>> {
        if job.in_ram {
            return Ok(Cow::Borrowed(job.data()));
        }
        let reader = self.durable.as_ref().and_then(|d| d.reader.as_ref());
        match reader {
            Some(r) => r.read(job.loc, job.payload_len).map(Cow::Owned),
            None => Err(std::io::Error::other("payload not in memory and the store cannot read it back")),
        }
    }

    /// Whether the job's payload must come from the store thread before it can be assigned.
    pub(super) fn awaits_fetch(&self, job: &Job) -> bool {
        !job.in_ram && self.durable.as_ref().is_some_and(|d| d.fetches)
    }

    /// Holds the JOB_ASSIGN of `key` (just given to worker `conn`) until its payload is read.
    pub(super) fn hold_assign(&mut self, conn: ConnId, key: JobKey, uniq: bool) {
        let seq = self.jobs[key as usize].seq;
        let d = self.durable.as_mut().expect("durable store enabled");
        d.wanted.push(seq);
        d.wake.notify_one();
        self.hold(conn, Held::Assign { seq, uniq });
    }

    /// Whether a worker waits for a payload (the store thread should read at once).
    pub fn wants_payloads(&self) -> bool {
        self.durable.as_ref().is_some_and(|d| !d.wanted.is_empty())
    }

    /// The payloads the store thread should read now, into `out` (cleared): those of jobs
    /// workers wait for, then those of the next queued jobs of functions with workers, as
    /// far as the memory budget allows.
    pub fn payload_requests(&mut self, out: &mut Vec<(u64, Loc)>) {
        out.clear();
        let Some(d) = self.durable.as_mut().filter(|d| d.fetches) else { return };
        for seq in std::mem::take(&mut d.wanted) {
            if let Some(key) = self.find_by_seq(seq) {
                out.push((seq, self.jobs[key as usize].loc));
            }
        }
        let d = self.durable.as_ref().unwrap();
        let mut room = PAYLOAD_RAM_BUDGET.saturating_sub(d.ram_bytes);
        for f in self.functions.iter_mut().filter(|f| f.workers > 0 && f.queued_total() > 0) {
            for p in 0..3 {
                let queue = &f.queues[p];
                let mut i = f.fetched[p];
                // Bounded per call, in case a reset cursor has a long in-memory front to pass.
                let end = queue.len().min(i + MAX_SCAN);
                while i < end && out.len() < MAX_REQUEST {
                    let job = &self.jobs[queue[i] as usize];
                    if job.state != JobState::Dropped && !job.in_ram {
                        let len = job.payload_len as usize;
                        if len > room {
                            break;
                        }
                        room -= len;
                        out.push((job.seq, job.loc));
                    }
                    i += 1;
                }
                f.fetched[p] = i;
            }
        }
    }

    /// Takes in the payloads the store thread read for `requested`: `found` names each by
    /// sequence number and its bytes in `arena`; `error` says why the read failed. Held
    /// JOB_ASSIGNs are answered: with the payload; or, if the read failed, with NO_JOB and
    /// the job queued again; or, if the store no longer holds the payload, with NO_JOB and
    /// the job failed.
    pub fn payloads_read(
        &mut self,
        requested: &[(u64, Loc)],
        found: &[(u64, Range<usize>)],
        arena: &[u8],
        error: Option<&str>,
    ) {
        for (seq, range) in found {
            let Some(key) = self.find_by_seq(*seq) else { continue };
            let job = &mut self.jobs[key as usize];
            if job.in_ram || job.payload_len as usize != range.len() {
                continue;
            }
            let mut body = Vec::with_capacity(job.unique_len as usize + range.len());
            body.extend_from_slice(job.unique());
            body.extend_from_slice(&arena[range.clone()]);
            job.body = body.into_boxed_slice();
            job.in_ram = true;
            self.durable.as_mut().unwrap().ram_bytes += range.len();
        }
        if let Some(why) = error {
            tracing::error!("reading payloads from the queue store failed: {why}");
            // Read them again from the front of each queue.
            for f in &mut self.functions {
                f.fetched = [0; 3];
            }
        }
        let requested: HashSet<u64> = requested.iter().map(|&(seq, _)| seq).collect();
        for conn in self.held_conns.clone() {
            let Some(c) = self.conns.get(conn as usize) else { continue };
            let assigns: Vec<(u64, bool)> = c
                .held
                .borrow()
                .iter()
                .flatten()
                .filter_map(|h| match *h {
                    Held::Assign { seq, uniq } => Some((seq, uniq)),
                    _ => None,
                })
                .collect();
            for (seq, uniq) in assigns {
                let Some(reply) = self.assign_reply(conn, seq, uniq, requested.contains(&seq), error) else { continue };
                let c = &self.conns[conn as usize];
                let mut held = c.held.borrow_mut();
                let slot = held.iter_mut().flatten().find(|h| matches!(h, Held::Assign { seq: s, .. } if *s == seq));
                if let Some(slot) = slot {
                    *slot = Held::Bytes(reply);
                }
            }
        }
        self.release_held();
    }

    /// The answer to a held JOB_ASSIGN of job `seq`, or `None` if it must wait further.
    fn assign_reply(
        &mut self,
        conn: ConnId,
        seq: u64,
        uniq: bool,
        requested: bool,
        error: Option<&str>,
    ) -> Option<BytesMut> {
        let mut bytes = BytesMut::new();
        let key =
            self.find_by_seq(seq).filter(|&k| self.jobs[k as usize].state == JobState::Running(PackedConn::new(conn)));
        let Some(key) = key else {
            // Taken from this worker meanwhile (cancelled, timed out): it gets nothing to do.
            encode_packet(&mut bytes, Magic::Response, T::NoJob, &[]);
            return Some(bytes);
        };
        let job = &self.jobs[key as usize];
        if job.in_ram {
            let handle = self.handle(seq);
            let name = &self.functions[job.function as usize].name;
            match uniq {
                false => encode_packet(&mut bytes, Magic::Response, T::JobAssign, &[&handle, name, job.data()]),
                true => encode_packet(
                    &mut bytes,
                    Magic::Response,
                    T::JobAssignUniq,
                    &[&handle, name, job.unique(), job.data()],
                ),
            }
            return Some(bytes);
        }
        if !requested {
            return None;
        }
        if error.is_some() {
            // The store may answer later: the job waits at the front of its queue.
            self.functions[job.function as usize].running -= 1;
            self.take_running(conn, key);
            self.enqueue(key, true);
        } else {
            let handle = self.handle(seq);
            tracing::error!(handle = %String::from_utf8_lossy(&handle), "dropping a job whose payload the store no longer holds");
            for &c in self.jobs[key as usize].clients() {
                self.send(c, T::WorkFail, &[&handle]);
            }
            self.finish(key, Outcome::Fail, None, Some(b"the payload could not be read back from the store"));
        }
        encode_packet(&mut bytes, Magic::Response, T::NoJob, &[]);
        Some(bytes)
    }
}
