//! Functions: per-priority FIFO queues of jobs, counters, and the workers sleeping on them.
//! Sleeping workers are woken one per queued job (not all of them); the timer's sweep wakes
//! another if the first went away without taking the job.

use std::collections::VecDeque;

use bytes::Bytes;
use gearbox_proto::PacketType as T;
use slab::Slab;

use super::conn::Conn;
use super::job::JobState;
use super::{Broker, ConnId, FunctionCounts, FunctionId, JobKey};

pub(super) struct Function {
    pub(super) name: Bytes,
    /// Job keys per priority, FIFO. May hold keys of dropped jobs (cancelled or abandoned),
    /// which are skipped and freed when they reach the front.
    pub(super) queues: [VecDeque<JobKey>; 3],
    pub(super) queued: [u32; 3],
    /// Per queue, how many entries from the front have their payload in memory or asked of
    /// the store (see `payload`).
    pub(super) fetched: [usize; 3],
    pub(super) scheduled: u32,
    /// New background jobs waiting for the durable store's commit.
    pub(super) pending: u32,
    pub(super) running: u32,
    pub(super) workers: u32,
    pub(super) max_queue: [u32; 3],
    /// Workers that sent PRE_SLEEP, with the sleep epoch at the time; stale entries are skipped.
    pub(super) sleepers: VecDeque<(ConnId, u32)>,
    pub(super) dropped: bool,
    /// In a cluster: a worker asked for a job and found none since the last claim.
    pub(super) starved: bool,
    /// Workers get NO_JOB for it (see `lifecycle`).
    pub(super) paused: bool,
    /// At most this many of its jobs run at once; 0 for no limit.
    pub(super) limit: u32,
    pub(super) counts: FunctionCounts,
}

impl Function {
    pub(super) fn new(name: Bytes) -> Function {
        Function {
            name,
            queues: Default::default(),
            queued: [0; 3],
            fetched: [0; 3],
            scheduled: 0,
            pending: 0,
            running: 0,
            workers: 0,
            max_queue: [0; 3],
            sleepers: VecDeque::new(),
            dropped: false,
            starved: false,
            paused: false,
            limit: 0,
            counts: FunctionCounts::default(),
        }
    }

    pub(super) fn queued_total(&self) -> u32 {
        self.queued.iter().sum()
    }

    pub(super) fn total(&self) -> u32 {
        self.queued_total() + self.running + self.scheduled + self.pending
    }
}

impl Broker {
    pub(super) fn function_id(&mut self, name: &[u8]) -> FunctionId {
        if let Some(&id) = self.function_ids.get(name) {
            return id;
        }
        let name = Bytes::copy_from_slice(name);
        let id = match self.functions.iter().position(|f| f.dropped) {
            Some(free) => {
                self.functions[free] = Function::new(name.clone());
                free as FunctionId
            }
            None => {
                self.functions.push(Function::new(name.clone()));
                (self.functions.len() - 1) as FunctionId
            }
        };
        self.function_ids.insert(name, id);
        id
    }

    /// Puts a job in its function's queue and wakes one sleeping worker for it.
    /// A job coming back from a lost worker goes to the front: it was first in line.
    pub(super) fn enqueue(&mut self, key: JobKey, front: bool) {
        let job = &mut self.jobs[key as usize];
        job.state = JobState::Queued;
        let (fid, p) = (job.function, job.priority as usize);
        let f = &mut self.functions[fid as usize];
        if front {
            f.queues[p].push_front(key);
            f.fetched[p] = 0;
        } else {
            f.queues[p].push_back(key);
        }
        f.queued[p] += 1;
        if self.dispatchable(fid) {
            self.wake_one(fid);
        }
    }

    pub(super) fn wake_one(&mut self, fid: FunctionId) {
        while let Some((c, epoch)) = self.functions[fid as usize].sleepers.pop_front() {
            if let Some(conn) = self.conns.get_mut(c as usize) {
                if conn.sleeping && conn.sleep_epoch == epoch {
                    conn.sleeping = false;
                    self.send(c, T::Noop, &[]);
                    return;
                }
            }
        }
    }
}

/// Records a sleeping worker for a function, pruning stale entries when they pile up.
pub(super) fn push_sleeper(f: &mut Function, conn: ConnId, epoch: u32, conns: &Slab<Conn>) {
    if f.sleepers.len() > 2 * f.workers as usize + 8 {
        f.sleepers.retain(|&(c, e)| conns.get(c as usize).is_some_and(|c| c.sleeping && c.sleep_epoch == e));
    }
    f.sleepers.push_back((conn, epoch));
}
