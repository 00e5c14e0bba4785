//! The embedded store: an append-only log of segment files in the data directory, in the
//! manner of beanstalkd's binlog.
//!
//! Each commit appends one write of records (job added, job removed) to the current segment
//! and syncs it once, however many jobs the batch holds (group commit). Segments are
//! reserved with `fallocate` before they are written, so a full disk fails a commit cleanly
//! rather than part-way through.
//!
//! Space comes back two ways, neither costing in proportion to the queue on each batch:
//! - a segment none of whose jobs is queued is deleted, once no older segment still holds
//!   an add that one of its removal records cancels;
//! - when the dead part of the log (removal records included) outweighs both the live part
//!   and two segments, the oldest segment whose deletion gives back at least half its size
//!   is compacted: its queued jobs (and removals still needed) are copied forward a bounded
//!   chunk per batch, then it is deleted. A deep queue of live jobs is never rewritten;
//!   copying costs about a byte per byte given back, and the files stay within about twice
//!   the live queue plus a few segments (the floor of two, the one being written, the one
//!   being compacted).
//!
//! The format is in [`record`]; loading, in sequence order, in `load.rs`.

mod compact;
mod load;
mod record;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::{Batch, LoadedJob, Loc, PayloadReader, QueueStore, Result, StoreError};
use compact::Compaction;
use record::{loc, loc_parts, MAGIC, REMOVE_LEN};

/// Segments are rotated past this size and reserved at this size.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

struct Segment {
    id: u32,
    /// File size in bytes.
    bytes: u64,
    /// Add records in the segment (originals and compaction copies, live or not).
    adds: u64,
    /// Bytes of those add records.
    add_bytes: u64,
    /// An upper bound on the queued jobs whose current record is here: counted when added,
    /// and when removed by a removal naming this segment, but not when compaction copies a
    /// job away. Never less than the truth, so a segment it calls empty is.
    live: u64,
    /// Removal records here that cancel an add in an older segment, counted by that
    /// segment (0: not recorded, written by an earlier version). They must be kept as long
    /// as that segment exists, or the job would come back at the next load.
    tombstones: BTreeMap<u32, u64>,
    /// Older segments that may still hold an earlier add record of a job whose current
    /// record is here (the source of a compaction copy): while any exists, this segment is
    /// neither deleted nor compacted, so removals naming it stay needed.
    copied_from: Vec<u32>,
    /// Compaction has copied everything this segment must keep: it is deleted after the
    /// next commit (once the server has recorded where its jobs went).
    retired: bool,
}

impl Segment {
    fn new(id: u32, bytes: u64) -> Segment {
        let tombstones = BTreeMap::new();
        Segment { id, bytes, adds: 0, add_bytes: 0, live: 0, tombstones, copied_from: Vec::new(), retired: false }
    }
}

pub struct LogStore {
    dir: PathBuf,
    /// Held for the store's lifetime: a second server on the directory is refused.
    _lock: File,
    /// Oldest first; the last one is the current segment, being written.
    segments: Vec<Segment>,
    current: File,
    encode_buf: Vec<u8>,
    reader: Arc<SegmentReader>,
    /// Set after an I/O error that could not be undone: every later commit fails.
    broken: Option<String>,
    compaction: Option<Compaction>,
    /// Bytes committed since the last compaction step.
    written: usize,
    /// The highest sequence number in the log when it was loaded, queued or not.
    highest_seq: u64,
    segment_bytes: u64,
}

fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("queue-{id:08}.log"))
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// Reserves `len` bytes for the file without changing its size, so later writes up to there
/// cannot fail for want of space. Filesystems without fallocate are accepted as they are.
fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor owned by `file`.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
        _ => Err(err),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(format!("sync {}", dir.display())))
}

impl LogStore {
    /// Opens (creating if needed) the log in `dir`, locking the directory. Segments are
    /// rotated at `segment_bytes` ([`DEFAULT_SEGMENT_BYTES`] unless testing rotation).
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<LogStore> {
        std::fs::create_dir_all(dir).map_err(io(format!("create data directory {}", dir.display())))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("gearbox.lock"))
            .map_err(io("open lock file"))?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Locked {
                what: format!("data directory {}", dir.display()),
                holder: None,
                waited: Duration::ZERO,
            });
        }
        let mut ids: Vec<u32> = std::fs::read_dir(dir)
            .map_err(io(format!("list {}", dir.display())))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("queue-")?.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let segments = ids.iter().map(|&id| Segment::new(id, 0)).collect();
        let reader = Arc::new(SegmentReader { dir: dir.to_path_buf(), files: RwLock::new(HashMap::new()) });
        // A fresh segment for this run; the old ones are only read (at load) and deleted.
        let next = ids.last().map_or(1, |id| id + 1);
        let current = create_segment(dir, next, segment_bytes)?;
        let mut store = LogStore {
            dir: dir.to_path_buf(),
            _lock: lock,
            segments,
            current,
            encode_buf: Vec::new(),
            reader,
            broken: None,
            compaction: None,
            written: 0,
            highest_seq: 0,
            segment_bytes,
        };
        store.segments.push(Segment::new(next, MAGIC.len() as u64));
        Ok(store)
    }

    fn head(&self) -> &Segment {
        self.segments.last().expect("a current segment")
    }

    fn head_mut(&mut self) -> &mut Segment {
        self.segments.last_mut().expect("a current segment")
    }

    fn segment_mut(&mut self, id: u32) -> Option<&mut Segment> {
        let i = self.segments.binary_search_by_key(&id, |s| s.id).ok()?;
        Some(&mut self.segments[i])
    }

    fn exists(&self, id: u32) -> bool {
        self.segments.binary_search_by_key(&id, |s| s.id).is_ok()
    }

    fn rotate(&mut self, at_least: u64) -> Result<()> {
        // The old segment keeps only what it holds, not its reservation.
        self.current.set_len(self.head().bytes).map_err(io("trim a full segment"))?;
        let id = self.head().id + 1;
        let file = create_segment(&self.dir, id, self.segment_bytes)?;
        let size = MAGIC.len() as u64;
        if at_least > self.segment_bytes {
            reserve(&file, at_least + size).map_err(io("reserve segment"))?;
        }
        self.current = file;
        self.segments.push(Segment::new(id, size));
        Ok(())
    }

    /// Appends `encode_buf` to the current segment and syncs it; on failure the segment is
    /// cut back so nothing of the batch survives. Returns the segment and the offset the
    /// buffer landed at.
    fn append(&mut self) -> Result<(u32, u64)> {
        if let Some(why) = &self.broken {
            return Err(StoreError::Corrupt(why.clone()));
        }
        let len = self.encode_buf.len() as u64;
        let size = self.head().bytes;
        if size + len > self.segment_bytes && size > MAGIC.len() as u64 {
            self.rotate(len)?;
        }
        let size = self.head().bytes;
        let written = self.current.write_all(&self.encode_buf).and_then(|_| self.current.sync_data());
        if let Err(e) = written {
            let undo = self.current.set_len(size).and_then(|_| self.current.sync_all());
            if let Err(undo) = undo {
                self.broken = Some(format!("write failed ({e}) and could not be undone ({undo})"));
            }
            return Err(StoreError::io("append to the queue log", e));
        }
        self.head_mut().bytes += len;
        Ok((self.head().id, size))
    }

    /// Counts the removal of a job whose add record is in segment `target`, written in the
    /// current segment.
    fn count_remove(&mut self, target: u32) {
        let head = self.head().id;
        let exists = match self.segment_mut(target) {
            Some(seg) => {
                seg.live = seg.live.saturating_sub(1);
                true
            }
            None => false,
        };
        if target != head && (exists || target == 0) {
            *self.head_mut().tombstones.entry(target).or_default() += 1;
        }
    }

    /// The removal records of segment `i` that must outlive it for now, by the segment
    /// their add is in, and how many.
    fn needed_tombstones(&self, i: usize) -> impl Iterator<Item = (u32, u64)> + '_ {
        let needed = move |t: u32| if t == 0 { i > 0 } else { self.exists(t) };
        self.segments[i].tombstones.iter().filter(move |(&t, _)| needed(t)).map(|(&t, &n)| (t, n))
    }

    /// Whether segment `i` must outlive others for now: it holds removals of adds in older
    /// segments that still exist, or copies of jobs whose originals are still in an older
    /// segment (then removals naming it stand for those originals too; compaction leaves
    /// such a segment alone as well).
    fn pinned(&self, i: usize) -> bool {
        !self.segments[i].copied_from.is_empty() || self.needed_tombstones(i).next().is_some()
    }

    /// Bytes of segment `i`'s add records of queued jobs (estimated from the share of its
    /// adds still queued).
    fn live_bytes(&self, i: usize) -> u64 {
        let seg = &self.segments[i];
        match seg.adds {
            0 => 0,
            adds => (u128::from(seg.add_bytes) * u128::from(seg.live.min(adds)) / u128::from(adds)) as u64,
        }
    }

    /// Bytes that deleting segment `i` (after copying what it must keep) gives back: its
    /// own dead records, and the removal records elsewhere kept only because it exists.
    fn reclaimable(&self, i: usize) -> u64 {
        let seg = &self.segments[i];
        let needed: u64 = self.needed_tombstones(i).map(|(_, n)| n).sum();
        let kept = MAGIC.len() as u64 + self.live_bytes(i) + needed * REMOVE_LEN as u64;
        let pinning: u64 = self.segments[i + 1..].iter().filter_map(|s| s.tombstones.get(&seg.id)).sum();
        seg.bytes.saturating_sub(kept) + pinning * REMOVE_LEN as u64
    }

    /// Deletes old segments that hold no queued job and no removal still needed, and those
    /// compaction has emptied (by now the server knows where their jobs went). A segment
    /// that cannot be deleted is kept, counted as before, and tried again after the next
    /// commit: the batch already on disk is not failed for it.
    fn drop_dead_segments(&mut self) {
        let mut i = 0;
        let mut dropped = false;
        while i + 1 < self.segments.len() {
            let seg = &self.segments[i];
            if !(seg.retired || (seg.live == 0 && !self.pinned(i))) {
                i += 1;
                continue;
            }
            match self.delete_segment(i) {
                Ok(()) => dropped = true,
                Err(e) => {
                    tracing::warn!("queue log: {e}; trying again after the next commit");
                    i += 1;
                }
            }
        }
        if dropped {
            if let Err(e) = sync_dir(&self.dir) {
                tracing::warn!("queue log: {e}");
            }
        }
    }

    /// Deletes segment `i` (the caller syncs the directory); on failure nothing changes.
    fn delete_segment(&mut self, i: usize) -> Result<()> {
        let id = self.segments[i].id;
        std::fs::remove_file(segment_path(&self.dir, id)).map_err(io(format!("remove segment {id}")))?;
        self.segments.remove(i);
        for seg in &mut self.segments[i..] {
            seg.tombstones.remove(&id);
            seg.copied_from.retain(|&s| s != id);
        }
        self.reader.forget(id);
        Ok(())
    }
}

impl Drop for LogStore {
    fn drop(&mut self) {
        // Give back the current segment's unused reservation; after a crash `load` does it.
        let _ = self.current.set_len(self.head().bytes);
    }
}

fn create_segment(dir: &Path, id: u32, reserve_bytes: u64) -> Result<File> {
    let path = segment_path(dir, id);
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(io(format!("create {}", path.display())))?;
    let ready = reserve(&file, reserve_bytes).and_then(|_| file.write_all(MAGIC)).and_then(|_| file.sync_all());
    if let Err(e) = ready {
        let _ = std::fs::remove_file(&path);
        return Err(StoreError::io(format!("prepare {}", path.display()), e));
    }
    sync_dir(dir)?;
    Ok(file)
}

impl QueueStore for LogStore {
    fn describe(&self) -> String {
        format!("embedded log in {}", self.dir.display())
    }

    fn load(&mut self, each: &mut dyn FnMut(LoadedJob<'_>)) -> Result<()> {
        load::load(self, each)?;
        self.drop_dead_segments();
        Ok(())
    }

    fn highest_seq(&self) -> u64 {
        self.highest_seq
    }

    fn commit(&mut self, batch: &Batch, locs: &mut Vec<Loc>) -> Result<()> {
        locs.clear();
        let mut buf = std::mem::take(&mut self.encode_buf);
        buf.clear();
        let mut data_offsets = Vec::with_capacity(batch.adds().len() + batch.retries().len());
        for add in batch.adds() {
            data_offsets.push(record::put_add(&mut buf, &add, None, add.data));
        }
        let mut add_bytes = buf.len() as u64;
        // A retry's record stands for the removal of the job's earlier records as well (one
        // record: a torn write keeps the old one or the new, never neither).
        for retry in batch.retries() {
            let start = buf.len();
            let read = match retry.carried {
                true => None,
                false => {
                    Some(self.reader.read(retry.loc, retry.data_len).map_err(io("read a payload back for a retry"))?)
                }
            };
            let data = read.as_deref().unwrap_or(retry.job.data);
            let replaced = loc_parts(retry.loc).0;
            data_offsets.push(record::put_add(&mut buf, &retry.job, Some((retry.attempts, replaced)), data));
            add_bytes += (buf.len() - start) as u64;
        }
        for &(seq, l) in batch.removes() {
            record::put_remove(&mut buf, seq, loc_parts(l).0);
        }
        self.encode_buf = buf;
        self.written += self.encode_buf.len();
        let (id, base) = self.append()?;
        locs.extend(data_offsets.iter().map(|&o| loc(id, base + o as u64)));
        let head = self.head_mut();
        head.adds += data_offsets.len() as u64;
        head.add_bytes += add_bytes;
        head.live += data_offsets.len() as u64;
        let replaced = batch.retries().map(|r| r.loc);
        for l in batch.removes().iter().map(|&(_, l)| l).chain(replaced) {
            self.count_remove(loc_parts(l).0);
        }
        // A retried job's new record outlives the segment of its old one, as a compaction
        // copy does (see `Segment::copied_from`): the job's final removal names the newest,
        // and must outlast every earlier record of the job.
        let head = self.head().id;
        for r in batch.retries() {
            let old = loc_parts(r.loc).0;
            if old != head && self.exists(old) && !self.head().copied_from.contains(&old) {
                self.head_mut().copied_from.push(old);
            }
        }
        self.drop_dead_segments();
        Ok(())
    }

    fn payload_reader(&self) -> Option<Arc<dyn PayloadReader>> {
        Some(self.reader.clone())
    }

    fn compaction_candidates(&mut self) -> Result<Option<Vec<(u64, Loc)>>> {
        compact::candidates(self)
    }

    fn compact(&mut self, live: &[u64]) -> Result<Vec<(u64, Loc)>> {
        compact::copy_forward(self, live)
    }
}

/// Open segment files, shared with the server for reading payloads back.
struct SegmentReader {
    dir: PathBuf,
    files: RwLock<HashMap<u32, Arc<File>>>,
}

impl SegmentReader {
    fn file(&self, id: u32) -> std::io::Result<Arc<File>> {
        if let Some(f) = self.files.read().unwrap().get(&id) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(segment_path(&self.dir, id))?);
        self.files.write().unwrap().insert(id, f.clone());
        Ok(f)
    }

    fn forget(&self, id: u32) {
        self.files.write().unwrap().remove(&id);
    }
}

impl PayloadReader for SegmentReader {
    fn read(&self, l: Loc, len: u32) -> std::io::Result<Vec<u8>> {
        let (id, offset) = loc_parts(l);
        let mut buf = vec![0; len as usize];
        self.file(id)?.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}
