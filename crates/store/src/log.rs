//! The embedded store: an append-only log of segment files in the data directory, in the
//! manner of beanstalkd's binlog.
//!
//! Each commit appends one write of records (job added, job removed) to the current segment
//! and syncs it once, however many jobs the batch holds (group commit). Segments are
//! reserved with `fallocate` before they are written, so a full disk fails a commit cleanly
//! rather than part-way through. A segment is deleted once it is the oldest and none of its
//! jobs is still queued; when too many segments pile up, the jobs still queued in the oldest
//! one are copied forward and it is deleted, so the files stay bounded by the live queue.
//!
//! Record: `len u32 | crc32 u32 | kind u8 | body`, little-endian, `len` counting kind and
//! body, the CRC covering them. Add body: `seq u64 | priority u8 | run_at i64 | flen u16 |
//! ulen u16 | dlen u32 | function | unique | data`. Remove body: `seq u64`.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::{Batch, Loc, PayloadReader, QueueStore, Result, StoreError, StoredJob};

const MAGIC: &[u8; 8] = b"GBXLOG01";
const KIND_ADD: u8 = 1;
const KIND_REMOVE: u8 = 2;
const ADD_FIXED: usize = 8 + 1 + 8 + 2 + 2 + 4;
/// Segments are rotated past this size and reserved at this size.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// With more segments than this, the oldest one's queued jobs are copied forward.
const MAX_SEGMENTS: usize = 4;

/// A location: segment id in the high 32 bits, byte offset of the payload in the low 32.
fn loc(segment: u32, offset: u64) -> Loc {
    Loc((u64::from(segment) << 32) | offset)
}

fn loc_parts(l: Loc) -> (u32, u64) {
    ((l.0 >> 32) as u32, l.0 & 0xffff_ffff)
}

struct Segment {
    id: u32,
    /// Jobs added in this segment and not yet removed.
    live: u64,
}

pub struct LogStore {
    dir: PathBuf,
    /// Held for the store's lifetime: a second server on the directory is refused.
    _lock: File,
    segments: Vec<Segment>,
    current: File,
    /// Bytes written to the current segment.
    size: u64,
    encode_buf: Vec<u8>,
    reader: Arc<SegmentReader>,
    /// Set after an I/O error that could not be undone: every later commit fails.
    broken: Option<String>,
    /// Segment whose jobs `compaction_candidates` last listed.
    compacting: Option<u32>,
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
        let segments = ids.iter().map(|&id| Segment { id, live: 0 }).collect();
        let reader = Arc::new(SegmentReader { dir: dir.to_path_buf(), files: RwLock::new(HashMap::new()) });
        // A fresh segment for this run; the old ones are only read (at load) and deleted.
        let next = ids.last().map_or(1, |id| id + 1);
        let (current, size) = create_segment(dir, next, segment_bytes)?;
        let mut store = LogStore {
            dir: dir.to_path_buf(),
            _lock: lock,
            segments,
            current,
            size,
            encode_buf: Vec::new(),
            reader,
            broken: None,
            compacting: None,
            segment_bytes,
        };
        store.segments.push(Segment { id: next, live: 0 });
        Ok(store)
    }

    fn current_id(&self) -> u32 {
        self.segments.last().expect("a current segment").id
    }

    fn segment_mut(&mut self, id: u32) -> Option<&mut Segment> {
        self.segments.iter_mut().find(|s| s.id == id)
    }

    fn rotate(&mut self, at_least: u64) -> Result<()> {
        // The old segment keeps only what it holds, not its reservation.
        self.current.set_len(self.size).map_err(io("trim a full segment"))?;
        let id = self.current_id() + 1;
        let (file, size) = create_segment(&self.dir, id, self.segment_bytes)?;
        if at_least > self.segment_bytes {
            reserve(&file, at_least + size).map_err(io("reserve segment"))?;
        }
        self.current = file;
        self.size = size;
        self.segments.push(Segment { id, live: 0 });
        Ok(())
    }

    /// Appends `encode_buf` to the current segment and syncs it; on failure the segment is
    /// cut back so nothing of the batch survives.
    fn append(&mut self) -> Result<()> {
        let len = self.encode_buf.len() as u64;
        if self.size + len > self.segment_bytes && self.size > MAGIC.len() as u64 {
            self.rotate(len)?;
        }
        let written = self.current.write_all(&self.encode_buf).and_then(|_| self.current.sync_data());
        if let Err(e) = written {
            let undo = self.current.set_len(self.size).and_then(|_| self.current.sync_all());
            if let Err(undo) = undo {
                self.broken = Some(format!("write failed ({e}) and could not be undone ({undo})"));
            }
            return Err(StoreError::io("append to the queue log", e));
        }
        self.size += len;
        Ok(())
    }

    /// Deletes leading segments that hold no queued job.
    fn drop_dead_segments(&mut self) -> Result<()> {
        let mut dropped = false;
        while self.segments.len() > 1 && self.segments[0].live == 0 {
            let id = self.segments.remove(0).id;
            self.reader.forget(id);
            std::fs::remove_file(segment_path(&self.dir, id)).map_err(io("remove an empty segment"))?;
            dropped = true;
        }
        if dropped {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

impl Drop for LogStore {
    fn drop(&mut self) {
        // Give back the current segment's unused reservation; after a crash `load` does it.
        let _ = self.current.set_len(self.size);
    }
}

fn create_segment(dir: &Path, id: u32, reserve_bytes: u64) -> Result<(File, u64)> {
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
    Ok((file, MAGIC.len() as u64))
}

fn put_record(buf: &mut Vec<u8>, kind: u8, body: impl FnOnce(&mut Vec<u8>)) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0; 8]);
    buf.push(kind);
    body(buf);
    let len = (buf.len() - start - 8) as u32;
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    start
}

/// A decoded record and the offset of its payload in the segment.
enum Record {
    Add(StoredJob),
    Remove(u64),
}

fn parse_record(body: &[u8], body_offset: u64, segment: u32) -> Option<Record> {
    let (&kind, rest) = body.split_first()?;
    match kind {
        KIND_ADD if rest.len() >= ADD_FIXED => {
            let seq = u64::from_le_bytes(rest[0..8].try_into().ok()?);
            let priority = rest[8];
            let run_at = i64::from_le_bytes(rest[9..17].try_into().ok()?);
            let flen = u16::from_le_bytes(rest[17..19].try_into().ok()?) as usize;
            let ulen = u16::from_le_bytes(rest[19..21].try_into().ok()?) as usize;
            let dlen = u32::from_le_bytes(rest[21..25].try_into().ok()?) as usize;
            let vars = &rest[ADD_FIXED..];
            if vars.len() != flen + ulen + dlen {
                return None;
            }
            let data_offset = body_offset + 1 + (ADD_FIXED + flen + ulen) as u64;
            Some(Record::Add(StoredJob {
                seq,
                priority,
                run_at,
                function: vars[..flen].to_vec(),
                unique: vars[flen..flen + ulen].to_vec(),
                data: vars[flen + ulen..].to_vec(),
                loc: loc(segment, data_offset),
            }))
        }
        KIND_REMOVE if rest.len() == 8 => Some(Record::Remove(u64::from_le_bytes(rest.try_into().ok()?))),
        _ => None,
    }
}

/// Reads every record of a segment. A damaged record ends the segment: that is a torn write
/// from a crash when it is the last segment written (`tolerate_tail`), corruption otherwise.
fn scan_segment(dir: &Path, id: u32, tolerate_tail: bool, mut each: impl FnMut(u64, Record)) -> Result<u64> {
    let path = segment_path(dir, id);
    let file = File::open(&path).map_err(io(format!("open {}", path.display())))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    if r.read_exact(&mut magic).is_err() || &magic != MAGIC {
        if tolerate_tail {
            return Ok(0);
        }
        return Err(StoreError::Corrupt(format!("{} has no segment header", path.display())));
    }
    let mut offset = MAGIC.len() as u64;
    let mut header = [0u8; 8];
    let mut body = Vec::new();
    loop {
        match r.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(offset),
            Err(e) => return Err(StoreError::io(format!("read {}", path.display()), e)),
        }
        let len = u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().unwrap());
        body.resize(len, 0);
        let complete = len > 0 && r.read_exact(&mut body).is_ok();
        let record = complete
            .then(|| crc32fast::hash(&body) == crc)
            .filter(|ok| *ok)
            .and_then(|_| parse_record(&body, offset + 8, id));
        match record {
            Some(rec) => each(offset, rec),
            None if tolerate_tail => {
                tracing::warn!("{}: discarding a torn record at byte {offset} (crash during a write)", path.display());
                return Ok(offset);
            }
            None => return Err(StoreError::Corrupt(format!("{}: bad record at byte {offset}", path.display()))),
        }
        offset += 8 + len as u64;
    }
}

impl QueueStore for LogStore {
    fn describe(&self) -> String {
        format!("embedded log in {}", self.dir.display())
    }

    fn load(&mut self, each: &mut dyn FnMut(StoredJob)) -> Result<()> {
        // Pass 1: which adds survive, and where their records start. Pass 2 reads them in
        // sequence order, so a large queue is never held in memory at once.
        let mut live: BTreeMap<u64, (u32, u64)> = BTreeMap::new();
        let old: Vec<u32> = self.segments[..self.segments.len() - 1].iter().map(|s| s.id).collect();
        for (i, &id) in old.iter().enumerate() {
            let last = i + 1 == old.len();
            let end = scan_segment(&self.dir, id, last, |offset, rec| match rec {
                Record::Add(job) => {
                    live.insert(job.seq, (id, offset));
                }
                Record::Remove(seq) => {
                    live.remove(&seq);
                }
            })?;
            // Cut a torn tail so that later scans are clean, and give back the space the
            // segment had reserved past its end.
            let f = OpenOptions::new().write(true).open(segment_path(&self.dir, id));
            f.and_then(|f| f.set_len(end.max(MAGIC.len() as u64)).and_then(|_| f.sync_all()))
                .map_err(io("trim a segment"))?;
        }
        for seg in self.segments.iter_mut() {
            seg.live = 0;
        }
        let mut header = [0u8; 8];
        let mut body = Vec::new();
        for (&seq, &(id, offset)) in &live {
            let file = self.reader.file(id).map_err(io("open a segment"))?;
            file.read_exact_at(&mut header, offset)
                .and_then(|_| {
                    body.resize(u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize, 0);
                    file.read_exact_at(&mut body, offset + 8)
                })
                .map_err(io("read a queued job"))?;
            match parse_record(&body, offset + 8, id) {
                Some(Record::Add(job)) if job.seq == seq => each(job),
                _ => return Err(StoreError::Corrupt(format!("job {seq} changed under the loader"))),
            }
            if let Some(seg) = self.segment_mut(id) {
                seg.live += 1;
            }
        }
        self.drop_dead_segments()
    }

    fn commit(&mut self, batch: &Batch, locs: &mut Vec<Loc>) -> Result<()> {
        if let Some(why) = &self.broken {
            return Err(StoreError::Corrupt(why.clone()));
        }
        locs.clear();
        let mut buf = std::mem::take(&mut self.encode_buf);
        buf.clear();
        let mut data_offsets = Vec::with_capacity(batch.adds().len());
        for add in batch.adds() {
            let start = put_record(&mut buf, KIND_ADD, |b| {
                b.extend_from_slice(&add.seq.to_le_bytes());
                b.push(add.priority);
                b.extend_from_slice(&add.run_at.to_le_bytes());
                b.extend_from_slice(&(add.function.len() as u16).to_le_bytes());
                b.extend_from_slice(&(add.unique.len() as u16).to_le_bytes());
                b.extend_from_slice(&(add.data.len() as u32).to_le_bytes());
                b.extend_from_slice(add.function);
                b.extend_from_slice(add.unique);
                b.extend_from_slice(add.data);
            });
            data_offsets.push(start + 9 + ADD_FIXED + add.function.len() + add.unique.len());
        }
        for (seq, _) in batch.removes() {
            put_record(&mut buf, KIND_REMOVE, |b| b.extend_from_slice(&seq.to_le_bytes()));
        }
        self.encode_buf = buf;
        self.append()?;
        // `append` may have rotated: offsets are relative to where this batch landed.
        let id = self.current_id();
        let base = self.size - self.encode_buf.len() as u64;
        locs.extend(data_offsets.iter().map(|&o| loc(id, base + o as u64)));
        if let Some(seg) = self.segment_mut(id) {
            seg.live += data_offsets.len() as u64;
        }
        for &(_, l) in batch.removes() {
            let (seg_id, _) = loc_parts(l);
            if let Some(seg) = self.segment_mut(seg_id) {
                seg.live = seg.live.saturating_sub(1);
            }
        }
        self.drop_dead_segments()
    }

    fn payload_reader(&self) -> Option<Arc<dyn PayloadReader>> {
        Some(self.reader.clone())
    }

    fn compaction_candidates(&mut self) -> Result<Vec<u64>> {
        if self.segments.len() <= MAX_SEGMENTS {
            return Ok(Vec::new());
        }
        let id = self.segments[0].id;
        let mut seqs = Vec::new();
        scan_segment(&self.dir, id, false, |_, rec| {
            if let Record::Add(job) = rec {
                seqs.push(job.seq);
            }
        })?;
        self.compacting = Some(id);
        Ok(seqs)
    }

    fn compact(&mut self, live: &[u64]) -> Result<Vec<(u64, Loc)>> {
        let Some(id) = self.compacting.take() else { return Ok(Vec::new()) };
        let wanted: std::collections::HashSet<u64> = live.iter().copied().collect();
        let mut batch = Batch::default();
        scan_segment(&self.dir, id, false, |_, rec| {
            if let Record::Add(job) = rec {
                if wanted.contains(&job.seq) {
                    batch.push_add(job.seq, job.priority, job.run_at, &job.function, &job.unique, &job.data);
                }
            }
        })?;
        let mut locs = Vec::new();
        if !batch.is_empty() {
            self.commit(&batch, &mut locs)?;
        }
        // Its jobs now live further on (a crash before this point loads both copies of a
        // job; `load` keeps one per sequence number).
        if let Some(seg) = self.segment_mut(id) {
            seg.live = 0;
        }
        self.drop_dead_segments()?;
        Ok(batch.adds().map(|a| a.seq).zip(locs).collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gearbox-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn load_all(store: &mut LogStore) -> Vec<StoredJob> {
        let mut jobs = Vec::new();
        store.load(&mut |j| jobs.push(j)).unwrap();
        jobs
    }

    fn add(batch: &mut Batch, seq: u64) {
        batch.push_add(
            seq,
            (seq % 3) as u8,
            seq as i64 * 10,
            b"fn",
            format!("u{seq}").as_bytes(),
            &[seq as u8, 0, 255],
        );
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
            assert_eq!(reader.read(locs[2], 3).unwrap(), vec![3, 0, 255]);
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
        assert_eq!((jobs[1].priority, jobs[1].run_at, &jobs[1].data[..]), (0, 30, &[3, 0, 255][..]));
        let reader = store.payload_reader().unwrap();
        assert_eq!(reader.read(jobs[2].loc, 3).unwrap(), vec![5, 0, 255]);
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
        let dir = temp_dir("torn");
        {
            let mut store = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
            let mut batch = Batch::default();
            add(&mut batch, 1);
            store.commit(&batch, &mut Vec::new()).unwrap();
        }
        // Half a record at the end, as a crash mid-write leaves it.
        let seg = segment_path(&dir, 1);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, KIND_ADD, 9, 9]).unwrap();
        drop(f);
        let mut store = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
        assert_eq!(load_all(&mut store).iter().map(|j| j.seq).collect::<Vec<_>>(), [1]);
        drop(store);
        let mut store = LogStore::open(&dir, DEFAULT_SEGMENT_BYTES).unwrap();
        assert_eq!(load_all(&mut store).len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn segments_are_deleted_or_compacted_so_files_stay_bounded() {
        let dir = temp_dir("compact");
        let mut store = LogStore::open(&dir, 4096).unwrap();
        let mut locs = Vec::new();
        // Job 1 stays queued throughout; thousands of others come and go.
        let mut batch = Batch::default();
        add(&mut batch, 1);
        store.commit(&batch, &mut locs).unwrap();
        let mut pinned = locs[0];
        for round in 0..200u64 {
            let mut batch = Batch::default();
            for i in 0..20 {
                add(&mut batch, 100 + round * 20 + i);
            }
            store.commit(&batch, &mut locs).unwrap();
            let mut batch = Batch::default();
            for (i, l) in locs.iter().enumerate() {
                batch.push_remove(100 + round * 20 + i as u64, *l);
            }
            store.commit(&batch, &mut Vec::new()).unwrap();
            let candidates = store.compaction_candidates().unwrap();
            if !candidates.is_empty() {
                let live: Vec<u64> = candidates.into_iter().filter(|&s| s == 1).collect();
                for (seq, l) in store.compact(&live).unwrap() {
                    assert_eq!(seq, 1);
                    pinned = l;
                }
            }
        }
        let files = std::fs::read_dir(&dir).unwrap().count();
        assert!(files <= MAX_SEGMENTS + 3, "{files} files left");
        assert_eq!(store.payload_reader().unwrap().read(pinned, 3).unwrap(), vec![1, 0, 255]);
        drop(store);
        let mut store = LogStore::open(&dir, 4096).unwrap();
        assert_eq!(load_all(&mut store).iter().map(|j| j.seq).collect::<Vec<_>>(), [1]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
