//! The log's on-disk format: segment header, records, and locations.
//!
//! A segment starts with [`MAGIC`]. Record: `len u32 | crc32 u32 | kind u8 | body`,
//! little-endian, `len` counting kind and body, the CRC covering them.
//! - Add: `seq u64 | priority u8 | run_at i64 | flen u16 | ulen u16 | dlen u32 | function |
//!   unique | data`.
//! - Retry: an add with `attempts u32 | replaced u32` after `run_at`: the record of a job
//!   waiting for another attempt. It also removes the job's earlier records, the one it
//!   replaces being in segment `replaced` (load reads it as a removal then an add; compaction
//!   keeps the removal while that segment exists), so that one record, which a torn write
//!   keeps whole or not at all, replaces them.
//! - Remove in: `seq u64 | segment u32`, the segment that held the job's add record (so that
//!   compaction knows how long the removal must be kept).
//! - Remove (written by earlier versions): `seq u64`; where its add was is not recorded.

use crate::{LoadedJob, Loc};

pub(super) const MAGIC: &[u8; 8] = b"GBXLOG01";
pub(super) const HEADER: usize = 8;
const KIND_ADD: u8 = 1;
const KIND_REMOVE: u8 = 2;
const KIND_REMOVE_IN: u8 = 3;
const KIND_RETRY: u8 = 4;
const ADD_FIXED: usize = 8 + 1 + 8 + 2 + 2 + 4;
/// Bytes of a removal record as this version writes it.
pub(super) const REMOVE_LEN: usize = HEADER + 1 + 8 + 4;

/// A location: segment id in the high 32 bits, byte offset of the payload in the low 32.
pub(super) fn loc(segment: u32, offset: u64) -> Loc {
    Loc((u64::from(segment) << 32) | offset)
}

pub(super) fn loc_parts(l: Loc) -> (u32, u64) {
    ((l.0 >> 32) as u32, l.0 & 0xffff_ffff)
}

/// A decoded record, borrowing its bytes.
pub(super) enum Record<'a> {
    /// A job, whose payload starts `data_at` bytes after the record's start; a retry record
    /// names the segment of the record it `replaces` (and removes).
    Add { job: LoadedJob<'a>, data_at: usize, replaces: Option<u32> },
    /// A job's removal; `segment` held its add (0: not recorded).
    Remove { seq: u64, segment: u32 },
}

fn put_record(buf: &mut Vec<u8>, kind: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    buf.push(kind);
    body(buf);
    let len = (buf.len() - start - HEADER) as u32;
    let crc = crc32fast::hash(&buf[start + HEADER..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Appends an add record with payload `data`, or with `retry` (attempts, and the segment of
/// the record it replaces) a retry record; returns where its payload starts, relative to `buf`.
pub(super) fn put_add(buf: &mut Vec<u8>, add: &crate::AddView<'_>, retry: Option<(u32, u32)>, data: &[u8]) -> usize {
    let kind = if retry.is_some() { KIND_RETRY } else { KIND_ADD };
    put_record(buf, kind, |b| {
        b.extend_from_slice(&add.seq.to_le_bytes());
        b.push(add.priority);
        b.extend_from_slice(&add.run_at.to_le_bytes());
        if let Some((attempts, replaced)) = retry {
            b.extend_from_slice(&attempts.to_le_bytes());
            b.extend_from_slice(&replaced.to_le_bytes());
        }
        b.extend_from_slice(&(add.function.len() as u16).to_le_bytes());
        b.extend_from_slice(&(add.unique.len() as u16).to_le_bytes());
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(add.function);
        b.extend_from_slice(add.unique);
        b.extend_from_slice(data);
    });
    buf.len() - data.len()
}

/// Appends the removal of job `seq`, whose add record is in `segment`.
pub(super) fn put_remove(buf: &mut Vec<u8>, seq: u64, segment: u32) {
    put_record(buf, KIND_REMOVE_IN, |b| {
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&segment.to_le_bytes());
    });
}

/// What lies at a position of a segment's bytes.
pub(super) enum Next<'a> {
    /// A whole, intact record of `len` bytes (header included).
    Record { len: usize, record: Record<'a> },
    /// No more bytes.
    End,
    /// A record cut short or damaged: a torn write at the end of the last segment written,
    /// corruption anywhere else; or, in a partial read, a record that goes on past `bytes`.
    Damaged,
}

/// Reads the record at the start of `bytes`, which lies at `offset` in `segment`.
pub(super) fn next_record(bytes: &[u8], offset: u64, segment: u32) -> Next<'_> {
    record_at(bytes, offset, segment, true)
}

/// [`next_record`] for a record already found intact (its CRC is not computed again).
pub(super) fn checked_record(bytes: &[u8], offset: u64, segment: u32) -> Next<'_> {
    record_at(bytes, offset, segment, false)
}

fn record_at(bytes: &[u8], offset: u64, segment: u32, verify: bool) -> Next<'_> {
    if bytes.is_empty() {
        return Next::End;
    }
    if bytes.len() < HEADER {
        return Next::Damaged;
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
    let Some(body) = bytes.get(HEADER..HEADER + len).filter(|b| !b.is_empty()) else { return Next::Damaged };
    if verify && crc32fast::hash(body) != crc {
        return Next::Damaged;
    }
    match parse(body, offset, segment) {
        Some(record) => Next::Record { len: HEADER + len, record },
        None => Next::Damaged,
    }
}

fn parse(body: &[u8], offset: u64, segment: u32) -> Option<Record<'_>> {
    let (&kind, rest) = body.split_first()?;
    let seq = u64::from_le_bytes(rest.get(0..8)?.try_into().ok()?);
    match kind {
        KIND_ADD | KIND_RETRY => {
            // A retry record holds the attempts after run_at; the rest is laid out as an add's.
            let extra = if kind == KIND_RETRY { 8 } else { 0 };
            if rest.len() < ADD_FIXED + extra {
                return None;
            }
            let priority = rest[8];
            let run_at = i64::from_le_bytes(rest[9..17].try_into().ok()?);
            let (attempts, replaces) = match kind {
                KIND_RETRY => (
                    u32::from_le_bytes(rest[17..21].try_into().ok()?),
                    Some(u32::from_le_bytes(rest[21..25].try_into().ok()?)),
                ),
                _ => (0, None),
            };
            let lens = &rest[17 + extra..];
            let flen = u16::from_le_bytes(lens[0..2].try_into().ok()?) as usize;
            let ulen = u16::from_le_bytes(lens[2..4].try_into().ok()?) as usize;
            let dlen = u32::from_le_bytes(lens[4..8].try_into().ok()?) as usize;
            let vars = &rest[ADD_FIXED + extra..];
            if vars.len() != flen + ulen + dlen {
                return None;
            }
            let data_at = HEADER + 1 + ADD_FIXED + extra + flen + ulen;
            let job = LoadedJob {
                seq,
                priority,
                run_at,
                function: &vars[..flen],
                unique: &vars[flen..flen + ulen],
                data: &vars[flen + ulen..],
                loc: loc(segment, offset + data_at as u64),
                attempts,
            };
            Some(Record::Add { job, data_at, replaces })
        }
        KIND_REMOVE if rest.len() == 8 => Some(Record::Remove { seq, segment: 0 }),
        KIND_REMOVE_IN if rest.len() == 12 => {
            Some(Record::Remove { seq, segment: u32::from_le_bytes(rest[8..12].try_into().ok()?) })
        }
        _ => None,
    }
}
