//! Compaction: moving the queued jobs out of a mostly dead segment so it can be deleted.
//!
//! It starts only when the dead part of the log outweighs the live part and two segments,
//! and picks the oldest segment whose deletion gives back at least half its size (its dead
//! records, and the removal records elsewhere kept only because it exists). Each step reads
//! one chunk of that segment, the server says which of its jobs are still queued at those
//! very records, and the step appends copies of them, and of the removal records that must
//! outlive the segment, to the current segment in one write. After the last chunk the
//! segment is deleted after the next commit (by then the server has recorded where its jobs
//! went). A crash part-way leaves both copies of some jobs; the loader keeps the later one.

use std::ops::Range;
use std::os::unix::fs::FileExt;

use super::record::{loc, next_record, Next, Record, HEADER, MAGIC};
use super::{io, LogStore};
use crate::{Loc, Result, StoreError};

/// Bytes of a segment read per step, at least: bounds the time a step adds to a commit.
/// (Small in tests, so that segments take many steps.) A step reads at least twice what was
/// committed since the last one, so that compaction keeps up with any write rate.
const CHUNK: usize = if cfg!(test) { 2000 } else { 4 << 20 };

pub(super) struct Compaction {
    segment: u32,
    /// Where the chunk read last starts, and where the next one starts.
    offset: u64,
    next: u64,
    chunk: Vec<u8>,
    adds: Vec<ChunkAdd>,
    /// The chunk's removal records: the job and the segment of the add removed (0: not
    /// recorded).
    removes: Vec<(u64, u32)>,
}

struct ChunkAdd {
    seq: u64,
    loc: Loc,
    record: Range<usize>,
    data_at: usize,
}

/// Starts or continues a compaction; returns the jobs of its next chunk.
pub(super) fn candidates(store: &mut LogStore) -> Result<Option<Vec<(u64, Loc)>>> {
    if store.compaction.as_ref().is_some_and(|c| !store.exists(c.segment)) {
        store.compaction = None;
    }
    if store.compaction.is_none() {
        let Some(segment) = choose(store) else { return Ok(None) };
        let offset = MAGIC.len() as u64;
        let (chunk, adds, removes) = (Vec::new(), Vec::new(), Vec::new());
        store.compaction = Some(Compaction { segment, offset, next: offset, chunk, adds, removes });
    }
    let size = store.segment_mut(store.compaction.as_ref().unwrap().segment).unwrap().bytes;
    let c = store.compaction.as_mut().unwrap();
    let file = store.reader.file(c.segment).map_err(io("open a segment"))?;
    c.offset = c.next;
    read_chunk(&file, c, size, CHUNK.max(2 * store.written))?;
    store.written = 0;
    Ok(Some(c.adds.iter().map(|a| (a.seq, a.loc)).collect()))
}

/// The segment to compact, if the log holds enough dead bytes to be worth it: more than
/// its queued jobs, and more than two segments. Removal records count as dead: compacting
/// the segments they point at makes them so.
fn choose(store: &LogStore) -> Option<u32> {
    let old = 0..store.segments.len() - 1;
    let total: u64 = old.clone().map(|i| store.segments[i].bytes).sum();
    let live: u64 = old.clone().map(|i| store.live_bytes(i)).sum();
    let dead = total - live.min(total);
    if dead <= live || dead <= 2 * store.segment_bytes {
        return None;
    }
    old.into_iter()
        .find(|&i| {
            let seg = &store.segments[i];
            !seg.retired && seg.copied_from.is_empty() && store.reclaimable(i) * 2 >= seg.bytes
        })
        .map(|i| store.segments[i].id)
}

/// Reads the records of `c.segment` from `c.offset`, up to `budget` bytes (or one record,
/// if larger).
fn read_chunk(file: &std::fs::File, c: &mut Compaction, size: u64, budget: usize) -> Result<()> {
    let want = (budget as u64).min(size.saturating_sub(c.offset)) as usize;
    c.chunk.resize(want, 0);
    file.read_exact_at(&mut c.chunk, c.offset).map_err(io("read a segment to compact"))?;
    c.adds.clear();
    c.removes.clear();
    let mut at = 0;
    loop {
        match next_record(&c.chunk[at..], c.offset + at as u64, c.segment) {
            Next::Record { len, record } => {
                match record {
                    Record::Add { job, data_at, .. } => {
                        c.adds.push(ChunkAdd { seq: job.seq, loc: job.loc, record: at..at + len, data_at })
                    }
                    Record::Remove { seq, segment } => c.removes.push((seq, segment)),
                }
                at += len;
            }
            Next::End => break,
            // A record running past the chunk starts the next one.
            Next::Damaged if at > 0 => break,
            // The first record: larger than a chunk (then read whole), or damaged.
            Next::Damaged => {
                let len = c.chunk.get(..4).map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
                let whole = HEADER + len;
                if whole <= c.chunk.len() || c.offset + whole as u64 > size {
                    let at = c.offset;
                    return Err(StoreError::Corrupt(format!("segment {}: bad record at byte {at}", c.segment)));
                }
                c.chunk.resize(whole, 0);
                file.read_exact_at(&mut c.chunk, c.offset).map_err(io("read a segment to compact"))?;
            }
        }
    }
    c.next = c.offset + at as u64;
    Ok(())
}

/// Copies the chunk's `live` jobs and its removals still needed to the current segment;
/// deletes the segment after its last chunk. Returns the jobs' new locations.
pub(super) fn copy_forward(store: &mut LogStore, live: &[u64]) -> Result<Vec<(u64, Loc)>> {
    let Some(c) = store.compaction.take() else { return Ok(Vec::new()) };
    let mut buf = std::mem::take(&mut store.encode_buf);
    buf.clear();
    let older_exists = store.segments[0].id < c.segment;
    let needed = |target: u32| if target == 0 { older_exists } else { target != c.segment && store.exists(target) };
    // `live` follows the candidates' order. A job retried twice may have two records here,
    // the later one current: matched from the end, the later one takes the job's entry.
    let mut wanted = live.iter().rev().peekable();
    let mut is_live: Vec<bool> = c.adds.iter().rev().map(|a| wanted.next_if_eq(&&a.seq).is_some()).collect();
    is_live.reverse();
    // Removals first (they are of ended jobs; a retried job's later records are copied after).
    // A retry record's own removal of the record it replaced needs no copy: its segment is
    // compacted only once that record's segment is gone (`Segment::copied_from`).
    let mut kept = Vec::new();
    for &(seq, target) in &c.removes {
        if needed(target) {
            super::record::put_remove(&mut buf, seq, target);
            kept.push(target);
        }
    }
    let removal_bytes = buf.len();
    let mut copied = Vec::with_capacity(live.len());
    for (add, _) in c.adds.iter().zip(&is_live).filter(|(_, &live)| live) {
        copied.push((add.seq, buf.len() + add.data_at));
        buf.extend_from_slice(&c.chunk[add.record.clone()]);
    }
    let add_bytes = (buf.len() - removal_bytes) as u64;
    store.encode_buf = buf;
    let mut moved = Vec::new();
    if !store.encode_buf.is_empty() {
        let (id, base) = store.append()?;
        let head = store.head_mut();
        head.adds += copied.len() as u64;
        head.add_bytes += add_bytes;
        head.live += copied.len() as u64;
        for t in kept {
            *head.tombstones.entry(t).or_default() += 1;
        }
        // Until the originals are gone, the copies' segment stays (see `Segment::copied_from`;
        // a segment with copies of its own is never compacted, so there are no older ones).
        if !copied.is_empty() && !head.copied_from.contains(&c.segment) {
            head.copied_from.push(c.segment);
        }
        moved.extend(copied.into_iter().map(|(seq, at)| (seq, loc(id, base + at as u64))));
    }
    let segment = store.segment_mut(c.segment);
    match segment {
        // Deleted after the next commit: until the server has recorded the jobs' new
        // locations, a worker may still read a payload from here.
        Some(seg) if c.next >= seg.bytes => seg.retired = true,
        Some(_) => store.compaction = Some(c),
        None => {}
    }
    Ok(moved)
}
