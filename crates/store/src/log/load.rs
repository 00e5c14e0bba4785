//! Loading the log at start.
//!
//! Pass 1 maps each old segment and notes every record as an event: its job's sequence
//! number and its position (segment, offset, add or removal). Sorted by sequence number
//! then position (a stable sort: each segment is mostly one run already in order), a job's
//! events say everything: its last event decides whether it is queued and where its current
//! record is; earlier adds are stale copies; a removal must be kept while any segment with
//! an earlier add of the job exists. Pass 2 hands the queued jobs over in sequence order,
//! reading them from the maps: no allocation and no system call per job.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use memmap2::Mmap;

use super::record::{checked_record, next_record, Next, Record, MAGIC};
use super::{io, segment_path, LogStore};
use crate::{LoadedJob, Result, StoreError};

/// `segment << 33 | offset << 1 | removal`: sorts in log order.
fn position(segment: u32, offset: u64, removal: bool) -> u64 {
    (u64::from(segment) << 33) | (offset << 1) | u64::from(removal)
}

fn unpack(pos: u64) -> (u32, u64, bool) {
    ((pos >> 33) as u32, (pos >> 1) & 0xffff_ffff, pos & 1 == 1)
}

/// Maps a segment file, or `None` if it is empty.
fn map(file: &File) -> std::io::Result<Option<Mmap>> {
    if file.metadata()?.len() == 0 {
        return Ok(None);
    }
    // SAFETY: the file is ours (the directory is locked) and nothing truncates it while
    // mapped: torn tails are cut after the map is dropped.
    unsafe { Mmap::map(file) }.map(Some)
}

pub(super) fn load(store: &mut LogStore, each: &mut dyn FnMut(LoadedJob<'_>)) -> Result<()> {
    let old: Vec<u32> = store.segments[..store.segments.len() - 1].iter().map(|s| s.id).collect();
    let mut events: Vec<(u64, u64)> = Vec::new();
    // The last segment written may end in a torn record: the last one holding more than a
    // header (starts stopped before their load leave bare segments after it).
    let mut sizes = Vec::with_capacity(old.len());
    for &id in &old {
        let path = segment_path(&store.dir, id);
        sizes.push(std::fs::metadata(&path).map_err(io(format!("open {}", path.display())))?.len());
    }
    let last_written = sizes.iter().rposition(|&len| len > MAGIC.len() as u64);
    for (i, &id) in old.iter().enumerate() {
        let path = segment_path(&store.dir, id);
        let file =
            OpenOptions::new().read(true).write(true).open(&path).map_err(io(format!("open {}", path.display())))?;
        let mapped = map(&file).map_err(io(format!("map {}", path.display())))?;
        let bytes = mapped.as_deref().unwrap_or(&[]);
        let tolerate_tail = last_written.is_none_or(|last| i >= last);
        let (end, add_bytes) = scan(bytes, id, tolerate_tail, &path, &mut events)?;
        drop(mapped);
        // Cut a torn tail so that later reads are clean, and give back the space the
        // segment had reserved past its end. A segment whose header never made it to disk
        // is left as a bare header.
        let trimmed = match end {
            0 => file.set_len(0).and_then(|_| file.write_all_at(MAGIC, 0)),
            _ => file.set_len(end),
        };
        let end = end.max(MAGIC.len() as u64);
        trimmed.and_then(|_| file.sync_all()).map_err(io("trim a segment"))?;
        let seg = store.segment_mut(id).expect("an old segment");
        seg.bytes = end;
        seg.add_bytes = add_bytes;
    }
    events.sort();
    // Sequence numbers are never reused while the log holds any record of them.
    store.highest_seq = events.last().map_or(0, |&(seq, _)| seq);

    let mut maps = HashMap::new();
    for &id in &old {
        let file = store.reader.file(id).map_err(io("open a segment"))?;
        if let Some(m) = map(&file).map_err(io("map a segment"))? {
            maps.insert(id, m);
        }
    }
    // The segments holding each add of the job so far, oldest first.
    let mut adds: Vec<u32> = Vec::new();
    for group in events.chunk_by(|a, b| a.0 == b.0) {
        adds.clear();
        let mut current = None;
        for &(_, pos) in group {
            let (id, offset, removal) = unpack(pos);
            let seg = store.segment_mut(id).expect("an old segment");
            if removal {
                for &t in adds.iter().filter(|&&t| t != id) {
                    *seg.tombstones.entry(t).or_default() += 1;
                }
                current = None;
            } else {
                seg.adds += 1;
                // A later record of a job (a compaction copy, a retry) outlives the segments
                // of its earlier ones, whether the job is queued or ended: its removal names
                // the latest, and must outlast them all (as at runtime).
                for &source in adds.iter().filter(|&&s| s != id) {
                    if !seg.copied_from.contains(&source) {
                        seg.copied_from.push(source);
                    }
                }
                adds.push(id);
                current = Some((id, offset));
            }
        }
        let Some((id, offset)) = current else { continue };
        let seg = store.segment_mut(id).expect("an old segment");
        seg.live += 1;
        let bytes = maps.get(&id).map_or(&[][..], |m| &m[offset as usize..]);
        match checked_record(bytes, offset, id) {
            Next::Record { record: Record::Add { job, .. }, .. } => each(job),
            _ => return Err(StoreError::Corrupt(format!("job {} changed under the loader", group[0].0))),
        }
    }
    Ok(())
}

/// Notes the events of one segment's records; returns where its intact records end and the
/// bytes of its add records. A
/// damaged record ends the segment: a torn write from a crash when it is the last segment
/// written (`tolerate_tail`), corruption otherwise.
fn scan(
    bytes: &[u8],
    id: u32,
    tolerate_tail: bool,
    path: &std::path::Path,
    events: &mut Vec<(u64, u64)>,
) -> Result<(u64, u64)> {
    if bytes.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        return match tolerate_tail {
            true => Ok((0, 0)),
            false => Err(StoreError::Corrupt(format!("{} has no segment header", path.display()))),
        };
    }
    if bytes.len() as u64 > u64::from(u32::MAX) {
        return Err(StoreError::Corrupt(format!("{} is larger than 4 GiB", path.display())));
    }
    let mut offset = MAGIC.len();
    let mut add_bytes = 0;
    loop {
        match next_record(&bytes[offset..], offset as u64, id) {
            Next::End => return Ok((offset as u64, add_bytes)),
            Next::Record { len, record } => {
                let (seq, removal) = match record {
                    Record::Add { job, replaces, .. } => {
                        add_bytes += len as u64;
                        if replaces.is_some() {
                            // A retry record: the removal of the job's earlier records first.
                            events.push((job.seq, position(id, offset as u64, false) - 1));
                        }
                        (job.seq, false)
                    }
                    Record::Remove { seq, .. } => (seq, true),
                };
                events.push((seq, position(id, offset as u64, removal)));
                offset += len;
            }
            Next::Damaged if tolerate_tail => {
                tracing::warn!("{}: discarding a torn record at byte {offset} (crash during a write)", path.display());
                return Ok((offset as u64, add_bytes));
            }
            Next::Damaged => {
                return Err(StoreError::Corrupt(format!("{}: bad record at byte {offset}", path.display())))
            }
        }
    }
}
