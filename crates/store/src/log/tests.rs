use std::collections::BTreeMap;
use std::io::Write;

use super::*;
use crate::StoredJob;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gearbox-log-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn load_all(store: &mut LogStore) -> Vec<StoredJob> {
    let mut jobs = Vec::new();
    store.load(&mut |j| jobs.push(j.to_owned())).unwrap();
    jobs
}

/// Mostly small; one in 97 larger than a compaction chunk.
fn payload(seq: u64) -> Vec<u8> {
    let mut data = seq.to_le_bytes().to_vec();
    let len = if seq.is_multiple_of(97) { 2500 } else { 8 + seq % 40 };
    data.resize(len as usize, 0xab);
    data
}

fn add(batch: &mut Batch, seq: u64) {
    batch.push_add(seq, (seq % 3) as u8, seq as i64 * 10, b"fn", format!("u{seq}").as_bytes(), &payload(seq));
}

/// Commits the adds of jobs `seqs` in one batch; returns their locations.
fn commit_adds(store: &mut LogStore, seqs: impl IntoIterator<Item = u64>) -> Vec<Loc> {
    let mut batch = Batch::default();
    for seq in seqs {
        add(&mut batch, seq);
    }
    let mut locs = Vec::new();
    store.commit(&batch, &mut locs).unwrap();
    locs
}

/// A log holding job 1 and then half a record, as a crash mid-write leaves it.
fn log_with_torn_tail(name: &str) -> PathBuf {
    let dir = temp_dir(name);
    commit_adds(&mut LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap(), [1]);
    let mut f = OpenOptions::new().append(true).open(segment_path(&dir, 1)).unwrap();
    f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, 1, 9, 9]).unwrap();
    dir
}

fn files(dir: &Path) -> (usize, u64) {
    let logs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("queue-"))
        .collect();
    (logs.len(), logs.iter().map(|e| e.metadata().unwrap().len()).sum())
}

#[test]
fn committed_jobs_survive_reopen_in_order() {
    let dir = temp_dir("reopen");
    let mut locs = Vec::new();
    {
        let mut store = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
        assert!(load_all(&mut store).is_empty());
        let mut batch = Batch::default();
        for seq in 1..=5 {
            add(&mut batch, seq);
        }
        store.commit(&batch, &mut locs).unwrap();
        assert_eq!(locs.len(), 5);
        let reader = store.payload_reader().unwrap();
        assert_eq!(reader.read(locs[2], 11).unwrap(), payload(3));
        let mut batch = Batch::default();
        batch.push_remove(2, locs[1]);
        batch.push_remove(4, locs[3]);
        add(&mut batch, 6);
        batch.push_remove(6, Loc::NONE);
        store.commit(&batch, &mut locs).unwrap();
        // Dropped without any shutdown, as after SIGKILL.
    }
    let mut store = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
    let jobs = load_all(&mut store);
    let seqs: Vec<u64> = jobs.iter().map(|j| j.seq).collect();
    assert_eq!(seqs, [1, 3, 5]);
    assert_eq!(jobs[1].unique, b"u3");
    assert_eq!((jobs[1].priority, jobs[1].run_at, &jobs[1].data[..]), (0, 30, &payload(3)[..]));
    let reader = store.payload_reader().unwrap();
    assert_eq!(reader.read(jobs[2].loc, 13).unwrap(), payload(5));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_second_store_on_the_directory_is_refused() {
    let dir = temp_dir("lock");
    let first = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
    assert!(matches!(LogStore::open(&dir, DEFAULT_SEGMENT_BYTES), Err(StoreError::Locked { .. })));
    drop(first);
    LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_torn_tail_is_discarded() {
    let dir = log_with_torn_tail("torn");
    let mut store = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
    assert_eq!(load_all(&mut store).iter().map(|j| j.seq).collect::<Vec<_>>(), [1]);
    drop(store);
    // A crash while a segment was being created leaves one without its header.
    std::fs::write(segment_path(&dir, 3), b"GBX").unwrap();
    let mut store = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
    assert_eq!(load_all(&mut store).len(), 1);
    drop(store);
    let mut store = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
    assert_eq!(load_all(&mut store).len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn removals_written_by_earlier_versions_are_honoured() {
    let dir = temp_dir("v1");
    commit_adds(&mut LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap(), [1, 2]);
    // Kind 2, body `seq u64`: a removal without its add's segment.
    let mut rec = vec![0u8; 8];
    rec.push(2);
    rec.extend_from_slice(&1u64.to_le_bytes());
    let crc = crc32fast::hash(&rec[8..]);
    rec[0..4].copy_from_slice(&9u32.to_le_bytes());
    rec[4..8].copy_from_slice(&crc.to_le_bytes());
    OpenOptions::new().append(true).open(segment_path(&dir, 1)).unwrap().write_all(&rec).unwrap();
    let mut store = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
    assert_eq!(load_all(&mut store).iter().map(|j| j.seq).collect::<Vec<_>>(), [2]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What the server does for the store, on a model of the queue: seq -> current location.
struct Driver {
    /// `None` only while reopening.
    store: Option<LogStore>,
    queued: BTreeMap<u64, Loc>,
    /// Attempts of the jobs retried so far.
    attempts: BTreeMap<u64, u32>,
    next: u64,
    rng: u64,
    copied: u64,
}

impl Driver {
    fn new(dir: &Path, segment_bytes: u64) -> Driver {
        let mut store = LogStore::open(dir, segment_bytes).unwrap();
        assert!(load_all(&mut store).is_empty());
        let (queued, attempts) = (BTreeMap::new(), BTreeMap::new());
        Driver { store: Some(store), queued, attempts, next: 1, rng: 0x9e37_79b9_7f4a_7c15, copied: 0 }
    }

    fn store(&mut self) -> &mut LogStore {
        self.store.as_mut().unwrap()
    }

    /// Bytes of the add records of the queued jobs (a retry record holds 8 more).
    fn live_bytes(&self) -> u64 {
        let retry = |s: &u64| if self.attempts.contains_key(s) { 8 } else { 0 };
        self.queued.keys().map(|s| 40 + retry(s) + payload(*s).len() as u64).sum()
    }

    fn random(&mut self, below: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % below
    }

    fn add(&mut self, n: u64) {
        let seqs = self.next..self.next + n;
        self.next += n;
        let locs = commit_adds(self.store(), seqs.clone());
        self.queued.extend(seqs.zip(locs));
    }

    fn remove(&mut self, seqs: &[u64]) {
        let mut batch = Batch::default();
        for seq in seqs {
            batch.push_remove(*seq, self.queued.remove(seq).unwrap());
            self.attempts.remove(seq);
        }
        self.store().commit(&batch, &mut Vec::new()).unwrap();
    }

    /// Adds a retry of queued job `seq` to `batch` (half of them carry their payload).
    fn push_retry(&mut self, batch: &mut Batch, seq: u64) {
        let attempts = self.attempts.get(&seq).map_or(1, |a| a + 1);
        self.attempts.insert(seq, attempts);
        let data = payload(seq);
        let carried = (seq + u64::from(attempts)).is_multiple_of(2).then_some(&data[..]);
        let (loc, unique) = (self.queued[&seq], format!("u{seq}"));
        let names = (&b"fn"[..], unique.as_bytes());
        batch.push_retry(seq, loc, (seq % 3) as u8, seq as i64 * 10, attempts, names, carried, data.len() as u32, true);
    }

    /// Retries jobs `seqs` in one batch: each gets a new record.
    fn retry(&mut self, seqs: &[u64]) {
        let mut batch = Batch::default();
        for &seq in seqs {
            self.push_retry(&mut batch, seq);
        }
        let mut locs = Vec::new();
        self.store().commit(&batch, &mut locs).unwrap();
        for (&seq, loc) in seqs.iter().zip(locs) {
            self.queued.insert(seq, loc);
        }
    }

    /// One compaction step, with `racing` jobs ending between the server's answer and the
    /// copy (their removal names the old location; the server then removes the copy too).
    /// With `retrying`, as many others fail in that window: their retry names the old
    /// location until the server learns of the copy, and then the copy's.
    fn compact(&mut self, racing: usize, retrying: usize) -> bool {
        let Some(candidates) = self.store().compaction_candidates().unwrap() else { return false };
        let live: Vec<u64> =
            candidates.iter().filter(|(s, l)| self.queued.get(s) == Some(l)).map(|&(s, _)| s).collect();
        let mut pending = Batch::default();
        for &seq in live.iter().take(racing) {
            pending.push_remove(seq, self.queued.remove(&seq).unwrap());
            self.attempts.remove(&seq);
        }
        let retried: Vec<u64> = live.iter().skip(racing).take(retrying).copied().collect();
        for &seq in &retried {
            self.push_retry(&mut pending, seq);
        }
        for (seq, l) in self.store().compact(&live).unwrap() {
            self.copied += 1;
            match self.queued.get_mut(&seq) {
                Some(at) => {
                    *at = l;
                    pending.retarget_retry(seq, l);
                }
                None => pending.push_remove(seq, l),
            }
        }
        let mut locs = Vec::new();
        self.store().commit(&pending, &mut locs).unwrap();
        for (&seq, loc) in retried.iter().zip(locs) {
            self.queued.insert(seq, loc);
        }
        true
    }

    fn reopen(&mut self, dir: &Path, segment_bytes: u64) {
        self.store = None;
        let mut store = LogStore::open(dir, segment_bytes).unwrap();
        let jobs = load_all(&mut store);
        let seqs: Vec<u64> = jobs.iter().map(|j| j.seq).collect();
        let expected: Vec<u64> = self.queued.keys().copied().collect();
        let extra: Vec<&u64> = seqs.iter().filter(|s| !self.queued.contains_key(s)).collect();
        let missing: Vec<&u64> = expected.iter().filter(|s| !seqs.contains(s)).collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "loaded jobs: {} extra {extra:?}, missing {missing:?}",
            seqs.len()
        );
        let reader = store.payload_reader().unwrap();
        self.store = Some(store);
        for job in jobs {
            assert_eq!(job.data, payload(job.seq));
            assert_eq!(job.attempts, self.attempts.get(&job.seq).copied().unwrap_or(0), "job {}", job.seq);
            assert_eq!(reader.read(job.loc, job.data.len() as u32).unwrap(), job.data);
            self.queued.insert(job.seq, job.loc);
        }
    }
}

#[test]
fn a_log_of_queued_jobs_is_never_rewritten() {
    let dir = temp_dir("deep");
    let mut d = Driver::new(&dir, 4096);
    for _ in 0..300 {
        d.add(10);
        assert!(!d.compact(0, 0), "compaction of a log with nothing dead");
    }
    let (count, bytes) = files(&dir);
    assert!(count >= 50, "{count} segments");
    d.reopen(&dir, 4096);
    assert_eq!(files(&dir), (count + 1, bytes + MAGIC.len() as u64));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn jobs_left_behind_are_copied_forward_and_files_stay_bounded() {
    let dir = temp_dir("pinned");
    let mut d = Driver::new(&dir, 4096);
    // One job in 25 stays queued throughout; thousands of others come and go.
    for _ in 0..400 {
        d.add(25);
        let done: Vec<u64> = d.queued.keys().copied().filter(|&s| s % 25 != 0).collect();
        d.remove(&done);
        d.compact(0, 0);
        let (_, bytes) = files(&dir);
        let live = d.live_bytes();
        assert!(bytes <= 2 * live + 8 * 4096, "{bytes} bytes for {} queued", d.queued.len());
    }
    // Copying costs at most about a byte per byte reclaimed: well under the churn.
    assert!(d.copied > 0, "nothing was copied");
    assert!(d.copied < d.next / 2, "{} copies for {} jobs added", d.copied, d.next - 1);
    d.reopen(&dir, 4096);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Random adds, removals (oldest-first drains and random picks), compaction steps with
/// racing removals, and reopenings (as after a crash, mid-compaction included): the log
/// always loads exactly the queued jobs, and its files stay within a bound of them.
#[test]
fn random_histories_load_exactly_the_queued_jobs() {
    // Retries make histories whose troubles need more than one seed to show.
    for seed in [0x9e37_79b9_7f4a_7c15, 0x0000_3141_5926, 0x0000_dead_beef] {
        random_history(seed);
    }
}

fn random_history(seed: u64) {
    let dir = temp_dir("random");
    let seg = 8192;
    let mut d = Driver::new(&dir, seg);
    d.rng = seed;
    for step in 0..3000 {
        match d.random(12) {
            0..=3 => {
                let n = 1 + d.random(40);
                d.add(n)
            }
            // Workers drain the oldest jobs, but one in 13 is left behind for a while.
            4 | 5 => {
                let n = d.random(60) as usize;
                let oldest: Vec<u64> = d.queued.keys().copied().filter(|s| s % 13 != 0).take(n).collect();
                d.remove(&oldest);
            }
            6 => {
                let keys: Vec<u64> = d.queued.keys().copied().collect();
                let picks: std::collections::BTreeSet<u64> =
                    (0..keys.len().min(5)).map(|_| keys[d.random(keys.len() as u64) as usize]).collect();
                d.remove(&picks.into_iter().collect::<Vec<_>>());
            }
            7 | 8 => {
                let (racing, retrying) = (d.random(3) as usize, d.random(3) as usize);
                d.compact(racing, retrying);
            }
            // Failed jobs are retried, some many times.
            9 | 10 => {
                let keys: Vec<u64> = d.queued.keys().copied().collect();
                let picks: std::collections::BTreeSet<u64> = (0..keys.len().min(1 + d.random(8) as usize))
                    .map(|_| keys[d.random(keys.len() as u64) as usize])
                    .collect();
                d.retry(&picks.into_iter().collect::<Vec<_>>());
            }
            _ if step % 7 == 0 => d.reopen(&dir, seg),
            _ => {}
        }
        // The server takes a compaction step after every commit.
        d.compact(0, 0);
        let live = d.live_bytes();
        let (_, bytes) = files(&dir);
        // Retries rewrite live jobs, whose old records wait for their segment to go: a
        // quarter more than twice the live part.
        assert!(bytes <= 9 * live / 4 + 8 * seg, "step {step}: {bytes} bytes on disk for {live} queued");
    }
    assert!(d.copied > 0, "compaction never ran");
    d.reopen(&dir, seg);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The server relocates the jobs of a compaction step only after `compact` returns, and a
/// worker may take one of them in between, reading its payload where the broker last knew
/// it: the segment must still be there, even after its last chunk.
#[test]
fn payloads_stay_readable_until_relocated() {
    let dir = temp_dir("window");
    let mut d = Driver::new(&dir, 4096);
    let mut failures = Vec::new();
    for _ in 0..400 {
        d.add(25);
        let done: Vec<u64> = d.queued.keys().copied().filter(|&s| s % 25 != 0).collect();
        d.remove(&done);
        let Some(candidates) = d.store().compaction_candidates().unwrap() else { continue };
        let live: Vec<u64> = candidates.iter().filter(|(s, l)| d.queued.get(s) == Some(l)).map(|&(s, _)| s).collect();
        let old: Vec<(u64, Loc)> = live.iter().map(|s| (*s, d.queued[s])).collect();
        let moved = d.store().compact(&live).unwrap();
        let reader = d.store().payload_reader().unwrap();
        for &(seq, l) in &old {
            if let Err(e) = reader.read(l, payload(seq).len() as u32) {
                failures.push(format!("job {seq}: {e}"));
            }
        }
        for (seq, l) in moved {
            d.queued.insert(seq, l);
        }
    }
    assert!(failures.is_empty(), "{} payloads unreadable before relocation, e.g. {}", failures.len(), failures[0]);
}

/// A commit whose records are on disk succeeds even if deleting a dead segment then fails
/// (it is tried again later): its removals are counted once, and no segment that holds a
/// queued job is deleted.
#[test]
fn a_failed_cleanup_does_not_fail_the_commit() {
    let dir = temp_dir("cleanup");
    let seg = 120;
    let mut store = LogStore::open(&dir, seg).unwrap();
    assert!(load_all(&mut store).is_empty());
    let loc1 = commit_adds(&mut store, [1])[0];
    let loc2 = commit_adds(&mut store, [2, 3])[0];
    let mut locs = Vec::new();
    assert_ne!(loc_parts(loc1).0, loc_parts(loc2).0, "jobs 2 and 3 in a later segment");
    // Segment 1 cannot be deleted for a moment (an I/O error, EIO/EROFS/EPERM...): simulated
    // by a directory in its place.
    let path1 = segment_path(&dir, loc_parts(loc1).0);
    let aside = dir.join("aside");
    std::fs::rename(&path1, &aside).unwrap();
    std::fs::create_dir(&path1).unwrap();
    std::fs::write(path1.join("x"), b"x").unwrap();
    let mut batch = Batch::default();
    batch.push_remove(1, loc1);
    batch.push_remove(2, loc2);
    store.commit(&batch, &mut locs).expect("the batch is on disk: the commit succeeds");
    std::fs::remove_dir_all(&path1).unwrap();
    std::fs::rename(&aside, &path1).unwrap();
    // The next commit deletes it.
    store.commit(&Batch::default(), &mut locs).unwrap();
    assert!(!path1.exists(), "segment 1 deleted once it can be");
    drop(store);
    let mut store = LogStore::open(&dir, seg).unwrap();
    let seqs: Vec<u64> = load_all(&mut store).iter().map(|j| j.seq).collect();
    assert_eq!(seqs, [3], "job 3 was never removed");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `open` creates this run's segment before `load` cuts the previous run's torn tail; a stop
/// during the load leaves the torn segment second to last, followed by bare headers.
#[test]
fn a_torn_tail_survives_an_interrupted_load() {
    let dir = log_with_torn_tail("interrupted");
    drop(LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap()); // killed before `load` ran
    let mut store = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
    let mut n = 0;
    let loaded = store.load(&mut |_| n += 1);
    assert!(loaded.is_ok(), "{:?}", loaded.err());
    assert_eq!(n, 1, "job 1 loads");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_retried_job_loads_with_its_new_time_and_attempts() {
    let dir = temp_dir("retry");
    let mut store = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
    let locs = commit_adds(&mut store, [1, 2]);
    // Job 1 carries its payload; job 2's is read back from its record.
    let mut batch = Batch::default();
    batch.push_retry(1, locs[0], 0, 500, 1, (b"fn", b"u1"), Some(&payload(1)), payload(1).len() as u32, true);
    batch.push_retry(2, locs[1], 1, 600, 3, (b"fn", b"u2"), None, payload(2).len() as u32, true);
    let mut new_locs = Vec::new();
    store.commit(&batch, &mut new_locs).unwrap();
    assert_eq!(new_locs.len(), 2);
    assert!(new_locs.iter().zip(&locs).all(|(new, old)| new != old));
    let reader = store.payload_reader().unwrap();
    assert_eq!(reader.read(new_locs[1], payload(2).len() as u32).unwrap(), payload(2));
    drop(store);

    let mut store = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
    let jobs = load_all(&mut store);
    let got: Vec<(u64, i64, u32, Vec<u8>)> =
        jobs.iter().map(|j| (j.seq, j.run_at, j.attempts, j.data.clone())).collect();
    assert_eq!(got, [(1, 500, 1, payload(1)), (2, 600, 3, payload(2))]);

    // A retried job's removal names its new record: nothing comes back.
    let relocs: Vec<Loc> = jobs.iter().map(|j| j.loc).collect();
    let mut batch = Batch::default();
    batch.push_remove(1, relocs[0]);
    batch.push_remove(2, relocs[1]);
    store.commit(&batch, &mut Vec::new()).unwrap();
    drop(store);
    let mut store = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
    assert!(load_all(&mut store).is_empty());
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A retry record cut short by a crash leaves the job as it was, never gone.
#[test]
fn a_torn_retry_keeps_the_job_as_it_was() {
    let dir = temp_dir("torn-retry");
    let mut store = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
    let locs = commit_adds(&mut store, [1]);
    let before = std::fs::metadata(segment_path(&dir, 1)).unwrap().len();
    let mut batch = Batch::default();
    batch.push_retry(1, locs[0], 1, 900, 1, (b"fn", b"u1"), None, payload(1).len() as u32, true);
    store.commit(&batch, &mut Vec::new()).unwrap();
    drop(store);
    let after = std::fs::metadata(segment_path(&dir, 1)).unwrap().len();
    assert!(after > before + 10);
    OpenOptions::new().write(true).open(segment_path(&dir, 1)).unwrap().set_len(before + 10).unwrap();
    let mut store = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
    let jobs = load_all(&mut store);
    assert_eq!(jobs.iter().map(|j| (j.seq, j.run_at, j.attempts)).collect::<Vec<_>>(), [(1, 10, 0)]);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
