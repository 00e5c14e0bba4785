//! A batch of queue changes, encoded into one reusable arena so that building it costs no
//! allocation per job.

use std::ops::Range;

use crate::Loc;

#[derive(Clone, Debug)]
struct Add {
    seq: u64,
    priority: u8,
    run_at: i64,
    function: Range<usize>,
    unique: Range<usize>,
    data: Range<usize>,
    owned: bool,
}

/// A change to a stored job's row that only a cluster's store records (see
/// [`crate::cluster`]); other stores ignore marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// A worker took the job: one more attempt, and it is running.
    Started,
    /// Its worker went away and it is queued again.
    Requeued,
    /// The worker's WORK_STATUS: numerator and denominator.
    Progress(u32, u32),
    /// Queued again, and handed back for any node to claim (its node has no worker left).
    Released,
}

/// A stored job that failed and waits for another attempt: its record is rewritten with the
/// time of that attempt and the attempts so far (see [`Batch::push_retry`]).
#[derive(Clone, Debug)]
struct Retry {
    add: Add,
    /// The job's current record.
    loc: Loc,
    attempts: u32,
    /// Payload bytes; the arena holds them only when `carried`.
    data_len: u32,
    carried: bool,
}

/// Adds and removes to commit together. Removes name the job's sequence number and the
/// location its add returned.
#[derive(Default, Debug)]
pub struct Batch {
    arena: Vec<u8>,
    adds: Vec<Add>,
    retries: Vec<Retry>,
    removes: Vec<(u64, Loc)>,
    marks: Vec<(u64, Mark)>,
    /// The cluster node incarnation the batch was built by (0 outside a cluster): a cluster's
    /// store writes it only while that incarnation holds its lease.
    pub owner: u64,
}

/// One added job, borrowed from a [`Batch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddView<'a> {
    pub seq: u64,
    pub priority: u8,
    pub run_at: i64,
    pub function: &'a [u8],
    pub unique: &'a [u8],
    pub data: &'a [u8],
    /// In a cluster: whether the node that built the batch owns the job (false leaves it
    /// for any node to claim).
    pub owned: bool,
}

impl AddView<'_> {
    /// The job as a store would yield it at load (with no location).
    pub fn to_stored(&self) -> crate::StoredJob {
        crate::StoredJob {
            seq: self.seq,
            priority: self.priority,
            run_at: self.run_at,
            function: self.function.to_vec(),
            unique: self.unique.to_vec(),
            data: self.data.to_vec(),
            loc: Loc::NONE,
            attempts: 0,
        }
    }
}

/// A job's retry, borrowed from a [`Batch`]: the store replaces the job's record at `loc`
/// with one that runs at `job.run_at` and counts `attempts`. A store that rewrites records
/// (the embedded log) reads the payload back from `loc` when `data` is `None`; a database
/// updates the row in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryView<'a> {
    /// The job, as its new record holds it (`job.data` is empty when not carried).
    pub job: AddView<'a>,
    pub loc: Loc,
    pub attempts: u32,
    pub data_len: u32,
    /// Whether `job.data` holds the payload.
    pub carried: bool,
}

impl Batch {
    pub fn push_add(&mut self, seq: u64, priority: u8, run_at: i64, function: &[u8], unique: &[u8], data: &[u8]) {
        let mut put = |bytes: &[u8]| {
            let start = self.arena.len();
            self.arena.extend_from_slice(bytes);
            start..self.arena.len()
        };
        let (function, unique, data) = (put(function), put(unique), put(data));
        self.adds.push(Add { seq, priority, run_at, function, unique, data, owned: true });
    }

    /// Rewrites stored job `seq` (now at `loc`) to run again at `run_at` (Unix seconds) after
    /// `attempts` attempts. `data` is the payload if it is in memory (`None`: `data_len`
    /// bytes the store reads back if it needs them). In a cluster, `owned` false hands the
    /// job back for any node to claim when it is due.
    #[allow(clippy::too_many_arguments)]
    pub fn push_retry(
        &mut self,
        seq: u64,
        loc: Loc,
        priority: u8,
        run_at: i64,
        attempts: u32,
        names: (&[u8], &[u8]),
        data: Option<&[u8]>,
        data_len: u32,
        owned: bool,
    ) {
        let mut put = |bytes: &[u8]| {
            let start = self.arena.len();
            self.arena.extend_from_slice(bytes);
            start..self.arena.len()
        };
        let (function, unique, data_range) = (put(names.0), put(names.1), put(data.unwrap_or_default()));
        let add = Add { seq, priority, run_at, function, unique, data: data_range, owned };
        self.retries.push(Retry { add, loc, attempts, data_len, carried: data.is_some() });
    }

    /// The record job `seq`'s retry replaces is now at `loc` (compaction moved it).
    pub fn retarget_retry(&mut self, seq: u64, loc: Loc) {
        for r in self.retries.iter_mut().filter(|r| r.add.seq == seq) {
            r.loc = loc;
        }
    }

    pub fn retries(&self) -> impl ExactSizeIterator<Item = RetryView<'_>> + '_ {
        self.retries.iter().map(|r| RetryView {
            job: self.view(&r.add),
            loc: r.loc,
            attempts: r.attempts,
            data_len: r.data_len,
            carried: r.carried,
        })
    }

    fn view(&self, a: &Add) -> AddView<'_> {
        AddView {
            seq: a.seq,
            priority: a.priority,
            run_at: a.run_at,
            function: &self.arena[a.function.clone()],
            unique: &self.arena[a.unique.clone()],
            data: &self.arena[a.data.clone()],
            owned: a.owned,
        }
    }

    /// Leaves the last added job unowned (see [`AddView::owned`]).
    pub fn disown_last(&mut self) {
        if let Some(add) = self.adds.last_mut() {
            add.owned = false;
        }
    }

    pub fn push_mark(&mut self, seq: u64, mark: Mark) {
        self.marks.push((seq, mark));
    }

    pub fn marks(&self) -> &[(u64, Mark)] {
        &self.marks
    }

    /// Forgets the removals, retries and marks, keeping the adds (a cluster node that lost its
    /// lease no longer owns those rows; the node that takes them over runs their jobs again).
    pub fn keep_only_adds(&mut self) {
        self.removes.clear();
        self.retries.clear();
        self.marks.clear();
    }

    pub fn push_remove(&mut self, seq: u64, loc: Loc) {
        self.removes.push((seq, loc));
    }

    pub fn adds(&self) -> impl ExactSizeIterator<Item = AddView<'_>> + '_ {
        self.adds.iter().map(|a| self.view(a))
    }

    /// Takes out the removals of the jobs `which` names (they wait for a later batch).
    pub fn take_removes(&mut self, which: impl Fn(u64) -> bool) -> Vec<(u64, Loc)> {
        let (taken, kept) = self.removes.drain(..).partition(|&(seq, _)| which(seq));
        self.removes = kept;
        taken
    }

    pub fn removes(&self) -> &[(u64, Loc)] {
        &self.removes
    }

    pub fn is_empty(&self) -> bool {
        self.adds.is_empty() && self.retries.is_empty() && self.removes.is_empty() && self.marks.is_empty()
    }

    pub fn clear(&mut self) {
        self.arena.clear();
        self.adds.clear();
        self.retries.clear();
        self.removes.clear();
        self.marks.clear();
        self.owner = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_read_back_as_pushed() {
        let mut b = Batch::default();
        b.push_add(7, 1, 0, b"f", b"u", b"data\0with nul");
        b.push_remove(3, Loc(9));
        b.push_add(8, 0, 42, b"g", b"", b"");
        let adds: Vec<_> = b.adds().collect();
        assert_eq!(adds.len(), 2);
        assert_eq!(adds[0].data, b"data\0with nul");
        assert_eq!((adds[1].seq, adds[1].run_at, adds[1].function), (8, 42, &b"g"[..]));
        assert_eq!(b.removes(), &[(3, Loc(9))]);
        b.clear();
        assert!(b.is_empty());
    }
}
