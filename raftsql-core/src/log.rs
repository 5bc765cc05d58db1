//! The durable Raft log: an append-only directory of segment files.
//!
//! [`RaftLog`] keeps every entry since the last compaction point (the *base*) in memory and
//! mirrors every change to disk as a record appended to the newest segment file. Opening a log
//! replays all segments and reproduces the in-memory state exactly. [`LogStorage`] shares a
//! `RaftLog` with `raft::RawNode` through the [`raft::Storage`] trait.
//!
//! # On-disk format
//!
//! The log directory holds segment files named `{base:020}-{seq:020}.seg` (see
//! [`segment_file_name`]): `seq` increases by one for every new segment and orders the segments,
//! `base` is the index of the segment's leading base record. (A sequence number is needed because
//! several segments may share a base index: a segment that fills up during normal operation rolls
//! over to a new one with the same base.) Besides segments the directory holds a `LOCK` file,
//! transiently `*.seg.tmp` files of segments being created, and, in a log that keeps one, the
//! spare segment `spare.seg.tmp` (L7).
//!
//! Each segment starts with the 8-byte magic `RSQLLOG1`, followed by records:
//!
//! ```text
//! [len: u32 LE][crc32: u32 LE over (kind byte + payload)][kind: u8][payload: len bytes]
//! ```
//!
//! | kind | name       | payload                                                                 |
//! |------|------------|-------------------------------------------------------------------------|
//! | 1    | Entries    | `count: u32 LE`, then per entry `len: u32 LE` + protobuf `eraftpb::Entry` |
//! | 2    | HardState  | protobuf `eraftpb::HardState`                                           |
//! | 3    | Base       | `index: u64 LE`, `term: u64 LE`, protobuf `eraftpb::ConfState`           |
//! | 4    | ConfState  | protobuf `eraftpb::ConfState`                                           |
//!
//! All integers are little-endian. The CRC is CRC-32 (IEEE, as computed by `crc32fast`).
//!
//! # Replay semantics
//!
//! Records are applied in order, segment after segment:
//!
//! * **Entries** `[s, s+n)`: requires `base < s <= last_index + 1` and contiguous indexes. Entries
//!   at `s` and above are dropped (conflict resolution) and the new ones appended.
//! * **HardState** / **ConfState**: replace the current value.
//! * **Base** `(i, t, cs)` always sets the conf state to `cs` (the conf state in force when the
//!   record was written) and then, for the *leading* record of a segment:
//!   - first segment: the log starts at base `(i, t)` with no entries;
//!   - `i` equals the current base (and `t` its term): a continuation, written when a full
//!     segment rolls over; entries are kept;
//!   - `i` greater than the current base: a reset point (snapshot, or a compaction that rewrote
//!     the live entries into a fresh segment): all entries are dropped, the base becomes `(i, t)`.
//!
//!   A Base record that is *not* the first of its segment is a compaction record: `i` must lie in
//!   `[base, last_index]` with term `t`; entries up to `i` are dropped.
//!
//! # Invariants of the log (L1-L7; the cluster's are I1-I16 in docs/ARCHITECTURE.md)
//!
//! **L1.** Replaying all segments reproduces the in-memory state (entries, base, hard state, conf
//!    state) exactly. Every mutating method writes its record(s) *before* changing memory, in the
//!    same order, and mutates memory with the same code replay uses.
//! **L2.** Every segment starts with a header `Base` + `HardState` describing the state at its creation;
//!    segments are written to `*.seg.tmp`, synced, renamed into place and the directory is synced,
//!    so a segment never appears half-created (see the recovery rules for what happens anyway).
//! **L3.** Every segment except the last is completely durable: before a new segment is created the
//!    current one is flushed and `fdatasync`ed. Hence torn data can only ever be in the last
//!    segment, and a bad record anywhere else is corruption.
//! **L4.** The oldest segment on disk replays correctly on its own. Old segments are only deleted
//!    right after a *self-contained* segment (reset Base + HardState + every live entry) has been
//!    made durable, and they are deleted newest first, so a crash in the middle of the deletion
//!    leaves an oldest-prefix of segments followed by the self-contained one, which still replays
//!    to the right state.
//! **L5.** After an I/O error while writing, the log is *poisoned*: the on-disk tail may hold a
//!    partial record that later appends would bury (turning a torn tail into corruption), so every
//!    later mutation fails with [`LogError::Poisoned`]. Reads keep working.
//! **L6.** The last segment may end in zero bytes: space allocated ahead of the appends
//!    ([`PREALLOCATE`] at a time, `fallocate`), so that the `fdatasync` after an append does not
//!    also have to commit a new file size (etcd preallocates its WAL segments for the same
//!    reason). Replay ends the segment's records where only zero bytes remain (no record starts
//!    with a zero length, crc and kind: the crc of an empty payload of kind 0 is not 0), and the
//!    next append writes there. Before a segment stops being the last, its zero tail is cut off
//!    and the cut is synced, so L3's "a bad record in an earlier segment is corruption" stands.
//! **L7.** A log that keeps a spare ([`RaftLog::keep_spare`], the node's) makes its segments of
//!    a file already written with zeros and synced (`spare.rs`: an `fdatasync` into written
//!    blocks skips the extent update that allocated ones need), and rolls over early into one
//!    when the active segment was only allocated. The spare is a `*.seg.tmp` file until its
//!    header is written, synced and it is renamed into place: L2 holds for it, and opening the
//!    log removes a spare a crash left behind. A spare is as large as the segment size or the
//!    node's compaction threshold, whichever is smaller (a compaction rewrites the log into a
//!    new segment, so a segment does not grow past it). After a restart the last segment
//!    counts as allocated: the first spare ends it early (one extra segment per restart).

#![warn(missing_docs)]

mod spare;

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fs2::FileExt;
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use protobuf::Message;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

/// Magic bytes at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"RSQLLOG1";

/// Segment size after which appends roll over to a new segment file (64 MiB).
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

/// Record kind: a batch of entries.
const KIND_ENTRIES: u8 = 1;
/// Record kind: a hard state.
const KIND_HARD_STATE: u8 = 2;
/// Record kind: a base (snapshot / compaction point).
const KIND_BASE: u8 = 3;
/// Record kind: a conf state.
const KIND_CONF_STATE: u8 = 4;

/// `len` + `crc` + `kind`.
const RECORD_HEADER_LEN: usize = 9;

/// Space allocated at a time at the end of the last segment (L6).
pub const PREALLOCATE: u64 = 8 << 20;

/// Bytes a log writes after opening before it asks for a spare segment (at most the segment
/// size): a log opened and closed again soon (tests, the tools) does not write one.
const SPARE_AFTER: u64 = 1 << 20;

/// Entries records are split so that each payload stays around this size.
const MAX_ENTRIES_PAYLOAD: usize = 16 << 20;

/// Largest accepted log index. Keeps `last_index + 1` and friends far away from overflow, also
/// for hostile input.
const MAX_INDEX: u64 = u64::MAX >> 1;

const LOCK_FILE: &str = "LOCK";
const SEGMENT_SUFFIX: &str = ".seg";
const TMP_SUFFIX: &str = ".seg.tmp";

/// Errors of the durable Raft log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An I/O operation on `path` failed.
    #[error("raft log I/O error on {}: {source}", path.display())]
    Io {
        /// File or directory the operation was on.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A segment file holds data that is neither valid nor a torn tail.
    #[error("corrupt raft log segment {} at byte offset {offset}: {reason}", path.display())]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the bad record (or of the problem) in the file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The durable hard state says entries up to `commit` are committed, but the log ends
    /// before them.
    #[error(
        "raft log lost committed entries: hard state commit is {commit} but the log ends at {last_index}"
    )]
    LostCommitted {
        /// The persisted commit index.
        commit: u64,
        /// The last index found in the log.
        last_index: u64,
    },
    /// Another `RaftLog` (in this or another process) has the directory open.
    #[error("raft log directory {} is locked by another user", path.display())]
    Locked {
        /// The log directory.
        path: PathBuf,
    },
    /// The call is not valid for the current state of the log (caller bug).
    #[error("invalid raft log operation: {reason}")]
    Invalid {
        /// What is wrong.
        reason: String,
    },
    /// An earlier write or sync failed; the log refuses further mutations.
    #[error("raft log is unusable after an earlier write failure: {reason}")]
    Poisoned {
        /// The original failure.
        reason: String,
    },
    /// A raft message could not be encoded.
    #[error("failed to encode a raft message: {0}")]
    Encode(#[from] protobuf::ProtobufError),
    /// A raft storage error (for example `SnapshotOutOfDate`).
    #[error(transparent)]
    Raft(#[from] raft::Error),
}

impl From<LogError> for raft::Error {
    fn from(e: LogError) -> raft::Error {
        match e {
            LogError::Raft(e) => e,
            other => raft::Error::Store(StorageError::Other(Box::new(other))),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(reason: impl Into<String>) -> LogError {
    LogError::Invalid {
        reason: reason.into(),
    }
}

/// File name of the segment with sequence number `seq` whose leading base record has index
/// `base_index`: `{base_index:020}-{seq:020}.seg`.
pub fn segment_file_name(base_index: u64, seq: u64) -> String {
    format!("{base_index:020}-{seq:020}{SEGMENT_SUFFIX}")
}

/// Parses a [`segment_file_name`] into `(base_index, seq)`.
fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
    let (base, seq) = stem.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(base) || !digits(seq) {
        return None;
    }
    Some((base.parse().ok()?, seq.parse().ok()?))
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

// ---------------------------------------------------------------------------------------------
// In-memory state (shared by live operations and replay)
// ---------------------------------------------------------------------------------------------

/// The logical content of the log. Live operations and replay mutate it through the same
/// methods, which is what makes replay exact (L1).
#[derive(Clone, Debug, Default, PartialEq)]
struct LogState {
    /// Index of the last compacted entry (or snapshot index); entries start at `base_index + 1`.
    base_index: u64,
    /// Term of `base_index`.
    base_term: u64,
    /// `entries[i].index == base_index + 1 + i`.
    entries: VecDeque<Entry>,
    hard_state: HardState,
    conf_state: ConfState,
}

impl LogState {
    fn first_index(&self) -> u64 {
        self.base_index + 1
    }

    fn last_index(&self) -> u64 {
        self.base_index + self.entries.len() as u64
    }

    /// Term of `idx`, if it is the base or one of the entries.
    fn term(&self, idx: u64) -> Option<u64> {
        if idx == self.base_index {
            Some(self.base_term)
        } else if idx < self.base_index || idx > self.last_index() {
            None
        } else {
            Some(self.entries[(idx - self.base_index - 1) as usize].term)
        }
    }

    /// Checks that `ents` may be appended: non-empty, contiguous, not below the base and
    /// without a gap after the last entry.
    fn check_append(&self, ents: &[Entry]) -> Result<(), String> {
        let Some(first) = ents.first() else {
            return Err("empty batch of entries".into());
        };
        let first = first.index;
        for (i, e) in ents.iter().enumerate() {
            let want = first.checked_add(i as u64);
            if want != Some(e.index) {
                return Err(format!(
                    "entries are not contiguous: entry {i} of a batch starting at {first} has index {}",
                    e.index
                ));
            }
        }
        let last = first + (ents.len() as u64 - 1);
        if last > MAX_INDEX {
            return Err(format!("entry index {last} is out of range"));
        }
        if first <= self.base_index {
            return Err(format!(
                "entry {first} is at or below the compaction point {}",
                self.base_index
            ));
        }
        if first > self.last_index() + 1 {
            return Err(format!(
                "entry {first} would leave a gap after the last index {}",
                self.last_index()
            ));
        }
        Ok(())
    }

    /// Appends `ents` after [`LogState::check_append`], dropping conflicting entries.
    fn append(&mut self, ents: &[Entry]) {
        let keep = (ents[0].index - self.base_index - 1) as usize;
        self.entries.truncate(keep);
        self.entries.extend(ents.iter().cloned());
    }

    /// Drops entries up to and including `index`, which must be in `[base_index, last_index]`
    /// with term `term`.
    fn compact_to(&mut self, index: u64, term: u64) {
        let drop = (index - self.base_index) as usize;
        self.entries.drain(..drop);
        self.base_index = index;
        self.base_term = term;
    }

    /// Drops every entry and moves the base to `(index, term)`.
    fn reset(&mut self, index: u64, term: u64) {
        self.entries.clear();
        self.base_index = index;
        self.base_term = term;
    }

    /// Applies one replayed record (see "Replay semantics" in the module documentation).
    /// `leading`: first record of its segment; `first_segment`: first segment replayed.
    fn replay(&mut self, rec: Record, leading: bool, first_segment: bool) -> Result<(), String> {
        match rec {
            Record::Base {
                index,
                term,
                conf_state,
            } => {
                if index > MAX_INDEX {
                    return Err(format!("base index {index} is out of range"));
                }
                if leading && first_segment {
                    *self = LogState {
                        base_index: index,
                        base_term: term,
                        ..LogState::default()
                    };
                } else if leading {
                    if index > self.base_index {
                        self.reset(index, term);
                    } else if index < self.base_index {
                        return Err(format!(
                            "segment base {index} is below the base {} in force",
                            self.base_index
                        ));
                    } else if term != self.base_term {
                        return Err(format!(
                            "segment base term {term} disagrees with term {} of base {index}",
                            self.base_term
                        ));
                    }
                } else {
                    match self.term(index) {
                        Some(t) if t == term => self.compact_to(index, term),
                        Some(t) => {
                            return Err(format!(
                            "compaction to {index} at term {term}, but the log has term {t} there"
                        ))
                        }
                        None => {
                            return Err(format!(
                                "compaction to {index} outside the log [{}, {}]",
                                self.base_index,
                                self.last_index()
                            ))
                        }
                    }
                }
                self.conf_state = conf_state;
            }
            Record::Entries(ents) => {
                self.check_append(&ents)?;
                self.append(&ents);
            }
            Record::HardState(hs) => self.hard_state = hs,
            Record::ConfState(cs) => self.conf_state = cs,
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Record encoding
// ---------------------------------------------------------------------------------------------

/// A decoded record.
#[derive(Debug)]
enum Record {
    Entries(Vec<Entry>),
    HardState(HardState),
    Base {
        index: u64,
        term: u64,
        conf_state: ConfState,
    },
    ConfState(ConfState),
}

fn is_known_kind(kind: u8) -> bool {
    (KIND_ENTRIES..=KIND_CONF_STATE).contains(&kind)
}

fn push_record(out: &mut Vec<u8>, kind: u8, payload: &[u8]) -> Result<(), LogError> {
    let len = u32::try_from(payload.len()).map_err(|_| {
        invalid(format!(
            "record payload of {} bytes exceeds the 4 GiB record limit",
            payload.len()
        ))
    })?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    crc.update(payload);
    out.reserve(RECORD_HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    Ok(())
}

/// Appends Entries records holding `entries`, split into records of about
/// [`MAX_ENTRIES_PAYLOAD`] bytes.
fn push_entries_records<'a>(
    out: &mut Vec<u8>,
    entries: impl IntoIterator<Item = &'a Entry>,
) -> Result<(), LogError> {
    fn flush(out: &mut Vec<u8>, payload: &mut Vec<u8>, count: &mut u32) -> Result<(), LogError> {
        if *count > 0 {
            payload[..4].copy_from_slice(&count.to_le_bytes());
            push_record(out, KIND_ENTRIES, payload)?;
        }
        payload.clear();
        payload.extend_from_slice(&[0; 4]);
        *count = 0;
        Ok(())
    }
    let mut payload = vec![0u8; 4];
    let mut count = 0u32;
    for e in entries {
        let bytes = e.write_to_bytes()?;
        let len = u32::try_from(bytes.len())
            .map_err(|_| invalid(format!("entry {} is too large to log", e.index)))?;
        if count > 0 && payload.len() + 4 + bytes.len() > MAX_ENTRIES_PAYLOAD {
            flush(out, &mut payload, &mut count)?;
        }
        payload.extend_from_slice(&len.to_le_bytes());
        payload.extend_from_slice(&bytes);
        count += 1;
    }
    flush(out, &mut payload, &mut count)
}

fn push_base_record(
    out: &mut Vec<u8>,
    index: u64,
    term: u64,
    cs: &ConfState,
) -> Result<(), LogError> {
    let mut payload = Vec::with_capacity(16 + cs.compute_size() as usize);
    payload.extend_from_slice(&index.to_le_bytes());
    payload.extend_from_slice(&term.to_le_bytes());
    payload.extend_from_slice(&cs.write_to_bytes()?);
    push_record(out, KIND_BASE, &payload)
}

/// Magic + `Base` + `HardState` (+ every live entry when `with_entries`): the header of a new
/// segment describing `state` (L2).
fn encode_segment_header(state: &LogState, with_entries: bool) -> Result<Vec<u8>, LogError> {
    let mut out = SEGMENT_MAGIC.to_vec();
    push_base_record(
        &mut out,
        state.base_index,
        state.base_term,
        &state.conf_state,
    )?;
    push_record(
        &mut out,
        KIND_HARD_STATE,
        &state.hard_state.write_to_bytes()?,
    )?;
    if with_entries {
        push_entries_records(&mut out, state.entries.iter())?;
    }
    Ok(out)
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Decodes the payload of a checksum-verified record. Errors are corruption (the record was
/// written completely, yet does not make sense).
fn decode_record(kind: u8, payload: &[u8]) -> Result<Record, String> {
    match kind {
        KIND_ENTRIES => {
            let count =
                read_u32(payload, 0).ok_or("entries record is too short for its count")? as usize;
            if count == 0 {
                return Err("entries record holds no entries".into());
            }
            // Every entry takes at least its 4-byte length: bounds the allocation below.
            if count > (payload.len() - 4) / 4 {
                return Err(format!(
                    "entries record claims {count} entries, too many for its size"
                ));
            }
            let mut entries = Vec::with_capacity(count);
            let mut pos = 4usize;
            for i in 0..count {
                let len = read_u32(payload, pos)
                    .ok_or_else(|| format!("entry {i} length is cut off"))?
                    as usize;
                pos += 4;
                let bytes = payload
                    .get(pos..)
                    .and_then(|rest| rest.get(..len))
                    .ok_or_else(|| format!("entry {i} of {len} bytes runs past the record"))?;
                let entry = Entry::parse_from_bytes(bytes)
                    .map_err(|e| format!("entry {i} does not decode: {e}"))?;
                entries.push(entry);
                pos += len;
            }
            if pos != payload.len() {
                return Err(format!(
                    "{} trailing bytes after the entries",
                    payload.len() - pos
                ));
            }
            Ok(Record::Entries(entries))
        }
        KIND_HARD_STATE => HardState::parse_from_bytes(payload)
            .map(Record::HardState)
            .map_err(|e| format!("hard state does not decode: {e}")),
        KIND_BASE => {
            let index = read_u64(payload, 0).ok_or("base record is too short")?;
            let term = read_u64(payload, 8).ok_or("base record is too short")?;
            let conf_state = ConfState::parse_from_bytes(&payload[16..])
                .map_err(|e| format!("base conf state does not decode: {e}"))?;
            Ok(Record::Base {
                index,
                term,
                conf_state,
            })
        }
        KIND_CONF_STATE => ConfState::parse_from_bytes(payload)
            .map(Record::ConfState)
            .map_err(|e| format!("conf state does not decode: {e}")),
        other => Err(format!("unknown record kind {other}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Segment scanning and recovery
// ---------------------------------------------------------------------------------------------

/// A framed, checksum-verified record found in a segment.
#[derive(Clone, Copy, Debug)]
struct RawRecord {
    /// Offset of the record header in the file.
    offset: usize,
    kind: u8,
    /// Offset of the payload.
    payload_start: usize,
    /// Offset just past the record.
    end: usize,
}

/// Outcome of [`scan_segment`].
#[derive(Debug)]
enum SegmentScan {
    /// The segment's records, where they end (before a zero tail, L6), and the offset and
    /// cause of a torn tail to cut off, if any.
    Records {
        records: Vec<RawRecord>,
        end: usize,
        torn: Option<(usize, String)>,
    },
    /// The (last) segment was torn while being created and holds nothing usable.
    TornCreation(String),
}

enum RecordCheck {
    Valid {
        kind: u8,
        end: usize,
    },
    /// The record does not fit in the file.
    Incomplete(String),
    /// The record fits in the file (ending at `end`) but its checksum does not match.
    BadChecksum {
        end: usize,
    },
}

fn check_record_at(bytes: &[u8], off: usize) -> RecordCheck {
    let rest = &bytes[off..];
    let (Some(len), Some(crc), Some(&kind)) = (read_u32(rest, 0), read_u32(rest, 4), rest.get(8))
    else {
        return RecordCheck::Incomplete(format!(
            "record header cut off after {} bytes",
            rest.len()
        ));
    };
    let total = RECORD_HEADER_LEN as u64 + u64::from(len);
    if total > rest.len() as u64 {
        return RecordCheck::Incomplete(format!(
            "record of {len} payload bytes runs past the end of the file"
        ));
    }
    let end = off + total as usize;
    if crc32fast::hash(&bytes[off + 8..end]) != crc {
        return RecordCheck::BadChecksum { end };
    }
    RecordCheck::Valid { kind, end }
}

/// Allocates the file up to `len` bytes (zeros), without moving its write position.
fn allocate(f: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `f` is an open file for the duration of the call; fallocate only reads its
    // arguments.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Finds a complete, checksum-valid record of a known kind starting anywhere at or after
/// `from`. Only used on the failure path, to tell a torn tail from a damaged record that has
/// good data after it.
fn find_valid_record(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len()).find(|&p| {
        // Cheap filters before the checksum.
        let Some(&kind) = bytes.get(p + 8) else {
            return false;
        };
        if !is_known_kind(kind) {
            return false;
        }
        matches!(check_record_at(bytes, p), RecordCheck::Valid { .. })
    })
}

/// Splits a segment into records and decides how a damaged spot is handled.
///
/// Recovery rules (L3 makes them sound: only the last segment can hold unsynced,
/// hence possibly torn, data):
///
/// * A segment must start with [`SEGMENT_MAGIC`]. If it does not, it is corrupt, unless it is the
///   last segment and is shorter than the magic or consists of zero bytes only: a torn creation,
///   which the caller deletes.
/// * A record that is incomplete (runs past the end of the file) or fails its checksum is a
///   *torn tail* if it is in the last segment, everything after it up to the end of the file is
///   zero bytes, and no complete, checksum-valid record starts anywhere after its first byte. The
///   caller cuts the file at the record's offset.
/// * Every other bad record is corruption: a bad record in an earlier segment, one followed by
///   non-zero bytes, or one followed by a valid record (this catches a damaged length field that
///   makes a record appear to run to the end of the file). A corrupt log is never served.
/// * A complete record with a valid checksum but an unknown kind is corruption.
fn scan_segment(bytes: &[u8], is_last: bool) -> Result<SegmentScan, (usize, String)> {
    let magic_len = SEGMENT_MAGIC.len();
    if bytes.len() < magic_len {
        if is_last {
            return Ok(SegmentScan::TornCreation(format!(
                "segment of {} bytes is shorter than its magic",
                bytes.len()
            )));
        }
        return Err((0, "segment is shorter than its magic".into()));
    }
    if bytes[..magic_len] != SEGMENT_MAGIC {
        if is_last && bytes.iter().all(|&b| b == 0) {
            return Ok(SegmentScan::TornCreation(
                "segment holds only zero bytes".into(),
            ));
        }
        return Err((0, "segment does not start with the segment magic".into()));
    }
    let mut records = Vec::new();
    let mut off = magic_len;
    while off < bytes.len() {
        let (reason, claimed_end) = match check_record_at(bytes, off) {
            RecordCheck::Valid { kind, end } => {
                if !is_known_kind(kind) {
                    return Err((off, format!("record of unknown kind {kind}")));
                }
                records.push(RawRecord {
                    offset: off,
                    kind,
                    payload_start: off + RECORD_HEADER_LEN,
                    end,
                });
                off = end;
                continue;
            }
            RecordCheck::Incomplete(reason) => (reason, bytes.len()),
            RecordCheck::BadChecksum { end } => ("checksum mismatch".to_string(), end),
        };
        if !is_last {
            return Err((off, format!("{reason} (in a segment that is not the last)")));
        }
        if bytes[off..].iter().all(|&b| b == 0) {
            // Space allocated ahead of the appends (L6), not a record: the records end here.
            return Ok(SegmentScan::Records {
                records,
                end: off,
                torn: None,
            });
        }
        if let Some(p) = bytes[claimed_end..].iter().position(|&b| b != 0) {
            return Err((
                off,
                format!(
                    "{reason}, followed by non-zero data at offset {}",
                    claimed_end + p
                ),
            ));
        }
        if let Some(p) = find_valid_record(bytes, off + 1) {
            return Err((
                off,
                format!("{reason}, but a valid record follows at offset {p}"),
            ));
        }
        return Ok(SegmentScan::Records {
            records,
            end: off,
            torn: Some((off, reason)),
        });
    }
    Ok(SegmentScan::Records {
        records,
        end: bytes.len(),
        torn: None,
    })
}

// ---------------------------------------------------------------------------------------------
// RaftLog
// ---------------------------------------------------------------------------------------------

/// Bookkeeping for one segment file.
#[derive(Debug)]
struct SegmentMeta {
    seq: u64,
    path: PathBuf,
    /// Bytes written to the segment, including bytes still in the write buffer.
    size: u64,
    /// The file's length: `size` plus the zero bytes allocated ahead of the appends (L6).
    allocated: u64,
    /// Those zero bytes were written and synced (the segment was a spare, L7), not only
    /// allocated.
    zeros_written: bool,
}

/// The durable Raft log: entries since the base, the hard state and the conf state, kept in
/// memory and persisted as records in a directory of segment files (see the module
/// documentation for the format and the recovery rules).
///
/// Memory is bounded by the node compacting the log after checkpoints ([`RaftLog::compact`]).
pub struct RaftLog {
    dir: PathBuf,
    segment_size: u64,
    state: LogState,
    /// Oldest first; the last one is the active segment.
    segments: Vec<SegmentMeta>,
    /// Writer of the last segment (`Some` iff `segments` is non-empty, unless poisoned).
    active: Option<BufWriter<File>>,
    next_seq: u64,
    poisoned: Option<String>,
    /// `fallocate` failed once (a file system without it): appends just grow the file.
    no_allocate: bool,
    /// The spare segment new segments are made of (L7), if this log keeps one. Declared before
    /// `_lock`: dropping it joins its thread before the directory is unlocked, so a log opened
    /// again on the directory never races with a thread still writing the old spare.
    spare: Option<spare::Spare>,
    /// Bytes appended since the log was opened (a spare is wanted past [`SPARE_AFTER`]).
    appended: u64,
    /// Holds the exclusive lock on the directory for the life of the log.
    _lock: File,
}

impl fmt::Debug for RaftLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RaftLog")
            .field("dir", &self.dir)
            .field("base_index", &self.state.base_index)
            .field("base_term", &self.state.base_term)
            .field("last_index", &self.state.last_index())
            .field("hard_state", &self.state.hard_state)
            .field("conf_state", &self.state.conf_state)
            .field("segments", &self.segments.len())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl RaftLog {
    /// Opens the log in `dir` (created if missing) with the default segment size and replays
    /// every segment. Fails with [`LogError::Corrupt`] on damaged data (a torn tail of the last
    /// segment is cut off instead), with [`LogError::LostCommitted`] if committed entries are
    /// missing, and with [`LogError::Locked`] if the directory is already open.
    pub fn open(dir: &Path) -> Result<RaftLog, LogError> {
        Self::open_with_segment_size(dir, DEFAULT_SEGMENT_SIZE)
    }

    /// Like [`RaftLog::open`], rolling over to a new segment once the active one reaches
    /// `segment_size` bytes (tests use small sizes).
    pub fn open_with_segment_size(dir: &Path, segment_size: u64) -> Result<RaftLog, LogError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        if lock.try_lock_exclusive().is_err() {
            return Err(LogError::Locked {
                path: dir.to_path_buf(),
            });
        }

        let mut found: Vec<(u64, u64, PathBuf)> = Vec::new();
        for dirent in fs::read_dir(dir).map_err(io_err(dir))? {
            let dirent = dirent.map_err(io_err(dir))?;
            let path = dirent.path();
            let Some(name) = dirent.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name == spare::SPARE_FILE {
                // The spare of the last run (L7), written or not: a new one is made.
                tracing::debug!(path = %path.display(), "removing the spare raft log segment");
                fs::remove_file(&path).map_err(io_err(&path))?;
            } else if name.ends_with(TMP_SUFFIX) {
                // A segment whose creation did not finish (L2): never part of the log.
                tracing::warn!(path = %path.display(), "removing unfinished raft log segment");
                fs::remove_file(&path).map_err(io_err(&path))?;
            } else if let Some((base, seq)) = parse_segment_name(&name) {
                found.push((seq, base, path));
            }
        }
        found.sort_by_key(|(seq, _, _)| *seq);
        if let Some(w) = found.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(LogError::Corrupt {
                path: w[1].2.clone(),
                offset: 0,
                reason: format!("two segments have sequence number {}", w[1].0),
            });
        }

        let mut state = LogState::default();
        let mut segments: Vec<SegmentMeta> = Vec::new();
        let count = found.len();
        for (i, (seq, base, path)) in found.into_iter().enumerate() {
            let is_last = i + 1 == count;
            let corrupt = |offset: usize, reason: String| LogError::Corrupt {
                path: path.clone(),
                offset: offset as u64,
                reason,
            };
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            let (records, end, torn) = match scan_segment(&bytes, is_last) {
                Err((offset, reason)) => return Err(corrupt(offset, reason)),
                Ok(SegmentScan::TornCreation(reason)) => {
                    tracing::warn!(path = %path.display(), %reason, "removing torn raft log segment");
                    remove_segment_file(dir, &path)?;
                    continue;
                }
                Ok(SegmentScan::Records { records, end, torn }) => (records, end, torn),
            };
            if records.is_empty() {
                if is_last {
                    // Nothing but (part of) its header made it to disk.
                    tracing::warn!(path = %path.display(), "removing raft log segment without records");
                    remove_segment_file(dir, &path)?;
                    continue;
                }
                return Err(corrupt(
                    SEGMENT_MAGIC.len(),
                    "segment holds no records".into(),
                ));
            }
            for (j, raw) in records.iter().enumerate() {
                let rec = decode_record(raw.kind, &bytes[raw.payload_start..raw.end])
                    .map_err(|r| corrupt(raw.offset, r))?;
                if j == 0 {
                    match &rec {
                        Record::Base { index, .. } if *index != base => {
                            return Err(corrupt(
                                raw.offset,
                                format!("base record index {index} does not match the file name"),
                            ))
                        }
                        Record::Base { .. } => {}
                        _ => {
                            return Err(corrupt(
                                raw.offset,
                                "segment does not start with a base record".into(),
                            ))
                        }
                    }
                }
                state
                    .replay(rec, j == 0, segments.is_empty())
                    .map_err(|r| corrupt(raw.offset, r))?;
            }
            // Where the records end: before a zero tail (L6), or at a torn record.
            let size = end;
            let mut allocated = bytes.len();
            if let Some((offset, reason)) = torn {
                tracing::warn!(
                    path = %path.display(),
                    offset,
                    %reason,
                    "cutting torn tail off the raft log"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(offset as u64)
                    .and_then(|_| f.sync_all())
                    .map_err(io_err(&path))?;
                allocated = offset;
            }
            segments.push(SegmentMeta {
                seq,
                path,
                size: size as u64,
                allocated: allocated as u64,
                zeros_written: false,
            });
        }

        if state.last_index() < state.hard_state.commit {
            return Err(LogError::LostCommitted {
                commit: state.hard_state.commit,
                last_index: state.last_index(),
            });
        }

        let active = match segments.last() {
            Some(seg) => {
                // Appends go where the records end, before any zero tail (L6).
                let mut f = OpenOptions::new()
                    .write(true)
                    .open(&seg.path)
                    .map_err(io_err(&seg.path))?;
                f.seek(SeekFrom::Start(seg.size))
                    .map_err(io_err(&seg.path))?;
                Some(BufWriter::new(f))
            }
            None => None,
        };
        let next_seq = segments.last().map_or(1, |s| s.seq + 1);
        Ok(RaftLog {
            dir: dir.to_path_buf(),
            segment_size,
            state,
            segments,
            active,
            next_seq,
            poisoned: None,
            no_allocate: false,
            spare: None,
            appended: 0,
            _lock: lock,
        })
    }

    /// Keeps a spare segment from now on (L7): once this log has written a little, a thread
    /// writes the next segment's file with zeros ahead of time, so that the `fdatasync`s
    /// after appends skip the file system's extent updates. The spare is `max_bytes` long, or
    /// the segment size if that is smaller: the node gives its compaction threshold, past
    /// which the log is rewritten into a new segment anyway. The node's log keeps one; tools
    /// that open a log for a moment do not.
    pub fn keep_spare(&mut self, max_bytes: u64) -> Result<(), LogError> {
        if self.spare.is_none() {
            let size = self.segment_size.min(max_bytes).max(1);
            let spare = spare::Spare::start(&self.dir, size).map_err(io_err(&self.dir))?;
            if self.appended >= self.spare_after() {
                spare.want();
            }
            self.spare = Some(spare);
        }
        Ok(())
    }

    /// Bytes appended since opening after which a spare is wanted (L7).
    fn spare_after(&self) -> u64 {
        SPARE_AFTER.min(self.segment_size)
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True once the log holds anything: a non-empty conf state (e.g. from
    /// [`RaftLog::bootstrap`]), a base above 0, an entry or a non-default hard state.
    pub fn is_initialized(&self) -> bool {
        self.state.conf_state != ConfState::default()
            || self.state.base_index > 0
            || !self.state.entries.is_empty()
            || self.state.hard_state != HardState::default()
    }

    /// Initializes a fresh log with the cluster's first configuration. Like
    /// `MemStorage::initialize_with_conf_state` the log stays at base index 0, term 0, so that
    /// all nodes of a new cluster start identical. Durable when it returns (a Base record in a
    /// synced segment), so a restart does not bootstrap again. Fails with
    /// [`LogError::Invalid`] if the log is already initialized or `conf_state` is empty.
    pub fn bootstrap(&mut self, conf_state: ConfState) -> Result<(), LogError> {
        self.check_poisoned()?;
        if self.is_initialized() {
            return Err(invalid("bootstrap of an already initialized raft log"));
        }
        if conf_state == ConfState::default() {
            return Err(invalid("bootstrap with an empty conf state"));
        }
        self.state.conf_state = conf_state;
        self.rewrite()
    }

    /// Appends `entries` (contiguous indexes), first dropping any existing entries at or after
    /// `entries[0].index` (conflict resolution). The record is buffered, not synced: call
    /// [`RaftLog::sync`] before acknowledging. Fails with [`LogError::Invalid`] (and changes
    /// nothing) for non-contiguous entries, entries at or below the compaction point, or a gap
    /// after the last index.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), LogError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.check_poisoned()?;
        self.state.check_append(entries).map_err(invalid)?;
        let mut rec = Vec::new();
        push_entries_records(&mut rec, entries)?;
        self.prepare_write()?;
        self.write_bytes(&rec)?;
        self.state.append(entries);
        Ok(())
    }

    /// Records a new hard state (buffered, like [`RaftLog::append`]). Append the entries a hard
    /// state commits before the hard state itself, or a crash between the two can leave a log
    /// that fails to open with [`LogError::LostCommitted`].
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), LogError> {
        self.check_poisoned()?;
        let mut rec = Vec::new();
        push_record(&mut rec, KIND_HARD_STATE, &hs.write_to_bytes()?)?;
        self.prepare_write()?;
        self.write_bytes(&rec)?;
        self.state.hard_state = hs.clone();
        Ok(())
    }

    /// Records a new conf state (buffered, like [`RaftLog::append`]).
    pub fn set_conf_state(&mut self, cs: &ConfState) -> Result<(), LogError> {
        self.check_poisoned()?;
        let mut rec = Vec::new();
        push_record(&mut rec, KIND_CONF_STATE, &cs.write_to_bytes()?)?;
        self.prepare_write()?;
        self.write_bytes(&rec)?;
        self.state.conf_state = cs.clone();
        Ok(())
    }

    /// Hands every record written so far to the operating system (no `fdatasync`): it then
    /// survives the process being killed, though not a power loss.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.check_poisoned()?;
        self.write_out(false)
    }

    /// Makes every record written so far durable: flushes the write buffer and `fdatasync`s the
    /// active segment. (New segments are synced, and the directory with them, when they are
    /// created, so there is no directory sync to do here.)
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.check_poisoned()?;
        self.write_out(true)
    }

    /// Installs a snapshot's position: drops all entries, moves the base to
    /// `(meta.index, meta.term)`, sets the conf state to `meta.conf_state` and raises the hard
    /// state's commit and term to at least the snapshot's index and term. Starts a new segment
    /// whose first record is the new base, deletes all older segments, and is durable when it
    /// returns. Fails with `SnapshotOutOfDate` if `meta.index` is not above the current base.
    pub fn apply_snapshot(&mut self, meta: &SnapshotMetadata) -> Result<(), LogError> {
        self.check_poisoned()?;
        if meta.index <= self.state.base_index {
            return Err(raft::Error::Store(StorageError::SnapshotOutOfDate).into());
        }
        if meta.index > MAX_INDEX {
            return Err(invalid(format!(
                "snapshot index {} is out of range",
                meta.index
            )));
        }
        self.state.reset(meta.index, meta.term);
        self.state.conf_state = meta.get_conf_state().clone();
        let hs = &mut self.state.hard_state;
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        self.rewrite()
    }

    /// Disaster recovery (`raftsql recover`): makes `(index, term)` the base, drops every
    /// entry (those up to `index` are in the databases; those after it were never known to be
    /// committed), replaces the configuration with `conf_state` and sets the commit index to
    /// `index`. Unlike [`RaftLog::apply_snapshot`] the base may stay where it is. Durable when
    /// it returns. Fails with [`LogError::Invalid`] if `index` is below the base or past the
    /// last entry.
    pub fn reset_for_recovery(
        &mut self,
        index: u64,
        term: u64,
        conf_state: ConfState,
    ) -> Result<(), LogError> {
        self.check_poisoned()?;
        if index < self.state.base_index || index > self.state.last_index() {
            return Err(invalid(format!(
                "recovery point {index} outside the log ({}..={})",
                self.state.base_index,
                self.state.last_index()
            )));
        }
        self.state.reset(index, term);
        self.state.conf_state = conf_state;
        let hs = &mut self.state.hard_state;
        hs.commit = index;
        hs.term = hs.term.max(term);
        self.rewrite()
    }

    /// Discards the entries below `index`; the base becomes `(index - 1, term(index - 1))`.
    /// A no-op if `index <= first_index()`; [`LogError::Invalid`] if `index > last_index() + 1`.
    /// Only compact applied (hence committed) entries.
    ///
    /// Reclaiming disk space: segments cannot simply be deleted from the front, because the
    /// first remaining segment must replay on its own (L4) while entries it needs may
    /// sit in the segments before it. So if the live entries (those from `index` on) take at
    /// most half of the log's bytes, the log rolls over to a new self-contained segment holding
    /// the base, the hard state and a copy of the live entries, syncs it and deletes every older
    /// segment, which frees at least as much as it copies. Otherwise it appends a (buffered)
    /// compaction record, and a later compaction reclaims the space. The node compacts after
    /// checkpoints, up to the applied index, so the live tail is normally small and compaction
    /// leaves a single small segment.
    pub fn compact(&mut self, index: u64) -> Result<(), LogError> {
        self.check_poisoned()?;
        let first = self.state.first_index();
        if index <= first {
            return Ok(());
        }
        let last = self.state.last_index();
        if index > last + 1 {
            return Err(invalid(format!(
                "compaction to {index} beyond the last index {last}"
            )));
        }
        let base = index - 1;
        let term = self.state.entries[(base - first) as usize].term;
        let live: u64 = self
            .state
            .entries
            .iter()
            .skip((index - first) as usize)
            .map(|e| u64::from(e.compute_size()) + 4)
            .sum();
        if live.saturating_mul(2) <= self.disk_bytes() {
            self.state.compact_to(base, term);
            self.rewrite()
        } else {
            let mut rec = Vec::new();
            push_base_record(&mut rec, base, term, &self.state.conf_state)?;
            self.prepare_write()?;
            self.write_bytes(&rec)?;
            self.state.compact_to(base, term);
            Ok(())
        }
    }

    /// Index of the first entry that may be available (`base + 1`).
    pub fn first_index(&self) -> u64 {
        self.state.first_index()
    }

    /// Index of the last entry (the base index if there are no entries).
    pub fn last_index(&self) -> u64 {
        self.state.last_index()
    }

    /// Term of entry `idx`; the base index answers with the base term. `Compacted` below the
    /// base, `Unavailable` above the last index.
    pub fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.state.base_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.state
            .term(idx)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    /// Entries `[low, high)`, limited like `MemStorage`: the result holds at least one entry
    /// (if the range is non-empty) and stops before the total protobuf size would exceed
    /// `max_size`. `Compacted` if `low < first_index()`, `Unavailable` if
    /// `high > last_index() + 1` (where `MemStorage` panics).
    pub fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> raft::Result<Vec<Entry>> {
        let first = self.state.first_index();
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.state.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if low > high {
            return Err(raft::Error::Store(StorageError::Other(
                format!("invalid entries range [{low}, {high})").into(),
            )));
        }
        let limit = max_size.filter(|&m| m != raft::NO_LIMIT);
        let mut out = Vec::new();
        let mut size = 0u64;
        for e in self
            .state
            .entries
            .range((low - first) as usize..(high - first) as usize)
        {
            size += u64::from(e.compute_size());
            if !out.is_empty() && limit.is_some_and(|m| size > m) {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    /// The current hard state.
    pub fn hard_state(&self) -> &HardState {
        &self.state.hard_state
    }

    /// The current conf state.
    pub fn conf_state(&self) -> &ConfState {
        &self.state.conf_state
    }

    /// Total size of all segment files, including buffered bytes not yet written out. The node
    /// compacts the log once this passes its threshold.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.size).sum()
    }

    // -- internals -----------------------------------------------------------------------------

    fn check_poisoned(&self) -> Result<(), LogError> {
        match &self.poisoned {
            Some(reason) => Err(LogError::Poisoned {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn poison(&mut self, e: &LogError) {
        if self.poisoned.is_none() {
            tracing::error!(error = %e, "raft log write failed; refusing further writes");
            self.poisoned = Some(e.to_string());
        }
    }

    /// Flushes the active segment's write buffer and, if `sync`, `fdatasync`s it.
    fn write_out(&mut self, sync: bool) -> Result<(), LogError> {
        let (Some(w), Some(seg)) = (self.active.as_mut(), self.segments.last()) else {
            return Ok(());
        };
        let done = w.flush().and_then(|_| {
            if sync {
                w.get_ref().sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(source) = done {
            let e = LogError::Io {
                path: seg.path.clone(),
                source,
            };
            self.poison(&e);
            return Err(e);
        }
        Ok(())
    }

    /// Makes sure there is an active segment with room for a record: creates the first segment,
    /// or rolls over once the active one has reached the segment size, or early, out of a
    /// segment that was only allocated, once a spare is ready (L7).
    fn prepare_write(&mut self) -> Result<(), LogError> {
        let spare_ready = || self.spare.as_ref().is_some_and(|s| s.ready());
        match self.segments.last() {
            None => self.create_segment(true),
            Some(seg) if seg.size >= self.segment_size => self.create_segment(false),
            // L7: out of an only allocated segment as soon as a written one is there.
            Some(seg) if !seg.zeros_written && spare_ready() => self.create_segment(false),
            Some(_) => Ok(()),
        }
    }

    /// Appends encoded records to the active segment.
    fn write_bytes(&mut self, bytes: &[u8]) -> Result<(), LogError> {
        // A spare is asked for once, when the log crosses the threshold; after that each
        // segment made of a spare asks for the next (try_create_segment), not each append.
        let threshold = self.spare_after();
        let was_below = self.appended < threshold;
        self.appended += bytes.len() as u64;
        if let Some(spare) = self
            .spare
            .as_ref()
            .filter(|_| was_below && self.appended >= threshold)
        {
            spare.want();
        }
        let (Some(w), Some(seg)) = (self.active.as_mut(), self.segments.last_mut()) else {
            return Err(invalid("raft log has no active segment"));
        };
        let end = seg.size + bytes.len() as u64;
        if end > seg.allocated {
            // L6. Without the space (a file system without fallocate, a full disk) appends
            // just grow the file, and a full disk fails the write below.
            let want = end + PREALLOCATE;
            if !self.no_allocate && allocate(w.get_ref(), want).is_ok() {
                seg.allocated = want;
            } else {
                self.no_allocate = true;
                seg.allocated = end;
            }
        }
        if let Err(source) = w.write_all(bytes) {
            let e = LogError::Io {
                path: seg.path.clone(),
                source,
            };
            self.poison(&e);
            return Err(e);
        }
        seg.size = end;
        Ok(())
    }

    /// Creates a new active segment whose header describes the current state (with every live
    /// entry if `with_entries`).
    ///
    /// L3: the current active segment is synced first, because it stops being the last
    /// segment. L2: the new segment is written under a temporary name, synced, renamed
    /// and the directory synced.
    fn create_segment(&mut self, with_entries: bool) -> Result<(), LogError> {
        self.write_out(true)?;
        self.trim_active()?;
        let result = self.try_create_segment(with_entries);
        if let Err(e) = &result {
            self.poison(e);
        }
        result
    }

    fn try_create_segment(&mut self, with_entries: bool) -> Result<(), LogError> {
        let header = encode_segment_header(&self.state, with_entries)?;
        self.active = None;
        let seq = self.next_seq;
        self.next_seq += 1;
        let name = segment_file_name(self.state.base_index, seq);
        let path = self.dir.join(&name);
        // A spare (L7) is written with zeros and synced already: the header goes over its
        // start. Else a new file, allocated as appends come.
        let spare = self.spare.as_ref().and_then(|s| s.take());
        let tmp = match &spare {
            Some((path, _)) => path.clone(),
            None => self.dir.join(format!("{name}.tmp")),
        };
        let write_tmp = || -> io::Result<File> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(spare.is_none())
                .open(&tmp)?;
            f.write_all(&header)?;
            f.sync_all()?;
            Ok(f)
        };
        let file = match write_tmp() {
            Ok(f) => f,
            Err(source) => {
                let _ = fs::remove_file(&tmp);
                return Err(LogError::Io { path: tmp, source });
            }
        };
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        let size = header.len() as u64;
        let spare_size = spare.map_or(0, |(_, len)| len);
        self.segments.push(SegmentMeta {
            seq,
            path,
            size,
            allocated: size.max(spare_size),
            zeros_written: spare_size > size,
        });
        // The spare is renamed away: the next one may be written.
        if let Some(s) = self.spare.as_ref().filter(|_| spare_size > 0) {
            s.want();
        }
        // The handle still refers to the renamed file and is positioned at the end of the
        // header (the end of the file, or the start of a spare's zeros).
        self.active = Some(BufWriter::new(file));
        Ok(())
    }

    /// Cuts the zero tail off the active segment and syncs the cut, before the segment stops
    /// being the last (L6).
    fn trim_active(&mut self) -> Result<(), LogError> {
        let (Some(w), Some(seg)) = (self.active.as_ref(), self.segments.last_mut()) else {
            return Ok(());
        };
        if seg.allocated > seg.size {
            let f = w.get_ref();
            if let Err(source) = f.set_len(seg.size).and_then(|_| f.sync_data()) {
                let e = LogError::Io {
                    path: seg.path.clone(),
                    source,
                };
                self.poison(&e);
                return Err(e);
            }
            seg.allocated = seg.size;
        }
        Ok(())
    }

    /// Writes a self-contained segment holding the whole current state, then deletes every older
    /// segment (L4). Durable when it returns.
    fn rewrite(&mut self) -> Result<(), LogError> {
        self.create_segment(true)?;
        // Newest first: a crash part way leaves the oldest segments, which replay on their own,
        // followed by the new self-contained segment whose reset base overrides them.
        while self.segments.len() > 1 {
            let i = self.segments.len() - 2;
            let path = self.segments[i].path.clone();
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(LogError::Io { path, source }),
            }
            self.segments.remove(i);
        }
        sync_dir(&self.dir)
    }
}

fn remove_segment_file(dir: &Path, path: &Path) -> Result<(), LogError> {
    fs::remove_file(path).map_err(io_err(path))?;
    sync_dir(dir)
}

// ---------------------------------------------------------------------------------------------
// raft::Storage
// ---------------------------------------------------------------------------------------------

/// Supplies snapshots to raft (the state machine builds them).
pub trait SnapshotProvider: Send + Sync {
    /// Returns a snapshot whose index is at least `request_index`, for peer `to`, or
    /// `SnapshotTemporarilyUnavailable` while one is being prepared.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot>;
}

/// Shared handle implementing [`raft::Storage`] over a [`RaftLog`] (behind a
/// `parking_lot::RwLock`) and a [`SnapshotProvider`].
#[derive(Clone)]
pub struct LogStorage {
    log: Arc<RwLock<RaftLog>>,
    snapshots: Arc<dyn SnapshotProvider>,
}

impl fmt::Debug for LogStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("LogStorage");
        match self.log.try_read() {
            Some(log) => d.field("log", &*log),
            None => d.field("log", &"<locked>"),
        };
        d.finish_non_exhaustive()
    }
}

impl LogStorage {
    /// Wraps `log`; snapshots requested by raft come from `snapshots`.
    pub fn new(log: RaftLog, snapshots: Arc<dyn SnapshotProvider>) -> Self {
        LogStorage {
            log: Arc::new(RwLock::new(log)),
            snapshots,
        }
    }

    /// Read access to the log.
    pub fn read(&self) -> RwLockReadGuard<'_, RaftLog> {
        self.log.read()
    }

    /// Write access to the log (to append, set states, sync, compact, apply snapshots).
    pub fn write(&self) -> RwLockWriteGuard<'_, RaftLog> {
        self.log.write()
    }
}

impl Storage for LogStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let log = self.log.read();
        Ok(RaftState::new(
            log.hard_state().clone(),
            log.conf_state().clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.log.read().entries(low, high, max_size.into())
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.log.read().term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.log.read().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.log.read().last_index())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        self.snapshots.snapshot(request_index, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use raft::storage::MemStorage;
    use std::fs;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range
            .map(|i| entry(i, term, format!("entry {i}").as_bytes()))
            .collect()
    }

    fn voters(v: &[u64]) -> ConfState {
        ConfState {
            voters: v.to_vec(),
            ..Default::default()
        }
    }

    fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote,
            commit,
            ..Default::default()
        }
    }

    fn snapshot_meta(index: u64, term: u64, cs: ConfState) -> SnapshotMetadata {
        SnapshotMetadata {
            index,
            term,
            conf_state: Some(cs).into(),
            ..Default::default()
        }
    }

    /// Segment files in `dir`, oldest first.
    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<(u64, PathBuf)> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter_map(|p| {
                let (_, seq) = parse_segment_name(p.file_name()?.to_str()?)?;
                Some((seq, p))
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// Everything observable about a log.
    #[derive(Clone, Debug, PartialEq)]
    struct Observed {
        first: u64,
        last: u64,
        base_term: u64,
        entries: Vec<Entry>,
        hs: HardState,
        cs: ConfState,
    }

    fn observe(log: &RaftLog) -> Observed {
        Observed {
            first: log.first_index(),
            last: log.last_index(),
            base_term: log.term(log.first_index() - 1).unwrap(),
            entries: log
                .entries(log.first_index(), log.last_index() + 1, None)
                .unwrap(),
            hs: log.hard_state().clone(),
            cs: log.conf_state().clone(),
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        assert!(!log.is_initialized());
        assert_eq!((log.first_index(), log.last_index()), (1, 0));
        assert_eq!(log.term(0), Ok(0));
        assert_eq!(log.entries(1, 1, None), Ok(vec![]));
        log.bootstrap(voters(&[1, 2, 3])).unwrap();
        log.append(&entries(1..=10, 1)).unwrap();
        log.set_hard_state(&hard_state(1, 2, 7)).unwrap();
        log.set_conf_state(&voters(&[1, 2, 3, 4])).unwrap();
        log.sync().unwrap();
        let before = observe(&log);
        assert_eq!(before.entries, entries(1..=10, 1));
        drop(log);

        let log = RaftLog::open(dir.path()).unwrap();
        assert_eq!(observe(&log), before);
        assert!(log.is_initialized());
        assert_eq!(log.term(10), Ok(1));
        assert_eq!(
            log.term(11),
            Err(raft::Error::Store(StorageError::Unavailable))
        );
        assert_eq!(log.conf_state(), &voters(&[1, 2, 3, 4]));
        assert_eq!(log.hard_state(), &hard_state(1, 2, 7));
    }

    #[test]
    fn bootstrap_is_durable_and_happens_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        assert!(matches!(
            log.bootstrap(ConfState::default()),
            Err(LogError::Invalid { .. })
        ));
        log.bootstrap(voters(&[1, 2, 3])).unwrap();
        // No sync: bootstrap itself is durable.
        drop(log);
        let mut log = RaftLog::open(dir.path()).unwrap();
        assert!(log.is_initialized());
        assert_eq!(log.conf_state(), &voters(&[1, 2, 3]));
        assert_eq!((log.first_index(), log.last_index()), (1, 0));
        assert_eq!(log.term(0), Ok(0));
        assert!(matches!(
            log.bootstrap(voters(&[1])),
            Err(LogError::Invalid { .. })
        ));
    }

    #[test]
    fn conflicting_append_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.append(&entries(1..=10, 1)).unwrap();
        log.append(&entries(6..=8, 2)).unwrap();
        assert_eq!(log.last_index(), 8);
        assert_eq!(
            (log.term(5), log.term(6), log.term(8)),
            (Ok(1), Ok(2), Ok(2))
        );
        assert_eq!(
            log.term(9),
            Err(raft::Error::Store(StorageError::Unavailable))
        );
        let before = observe(&log);
        drop(log);
        let mut log = RaftLog::open(dir.path()).unwrap();
        assert_eq!(observe(&log), before);
        log.append(&entries(9..=9, 3)).unwrap();
        log.append(&entries(2..=3, 4)).unwrap();
        let before = observe(&log);
        assert_eq!(log.last_index(), 3);
        drop(log);
        assert_eq!(observe(&RaftLog::open(dir.path()).unwrap()), before);
    }

    #[test]
    fn invalid_appends_and_compactions_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.append(&entries(1..=5, 1)).unwrap();
        log.compact(3).unwrap();
        let before = observe(&log);
        let gap = log.append(&entries(7..=7, 1));
        assert!(matches!(gap, Err(LogError::Invalid { .. })), "{gap:?}");
        let compacted = log.append(&entries(2..=6, 1));
        assert!(matches!(compacted, Err(LogError::Invalid { .. })));
        let holes = log.append(&[entry(6, 1, b""), entry(8, 1, b"")]);
        assert!(matches!(holes, Err(LogError::Invalid { .. })));
        assert!(matches!(log.compact(7), Err(LogError::Invalid { .. })));
        log.compact(1).unwrap(); // below first index: no-op
        log.compact(3).unwrap(); // at first index: no-op
        assert_eq!(observe(&log), before);
        assert_eq!(
            log.term(1),
            Err(raft::Error::Store(StorageError::Compacted))
        );
        assert_eq!(log.term(2), Ok(1));
        assert_eq!(
            log.entries(2, 4, None),
            Err(raft::Error::Store(StorageError::Compacted))
        );
        assert_eq!(
            log.entries(3, 7, None),
            Err(raft::Error::Store(StorageError::Unavailable))
        );
        drop(log);
        assert_eq!(observe(&RaftLog::open(dir.path()).unwrap()), before);
    }

    #[test]
    fn compaction_deletes_old_segments_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open_with_segment_size(dir.path(), 1024).unwrap();
        for i in 1..=200 {
            log.append(&entries(i..=i, 1)).unwrap();
        }
        log.set_hard_state(&hard_state(1, 1, 200)).unwrap();
        log.sync().unwrap();
        let files = segment_files(dir.path()).len();
        assert!(files > 3, "only {files} segments");

        log.compact(196).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (196, 200));
        assert_eq!(log.term(195), Ok(1));
        assert_eq!(segment_files(dir.path()).len(), 1);
        assert_eq!(log.segments.len(), 1);
        assert!(log.disk_bytes() < 1024, "{}", log.disk_bytes());
        let before = observe(&log);
        drop(log);

        let mut log = RaftLog::open_with_segment_size(dir.path(), 1024).unwrap();
        assert_eq!(observe(&log), before);
        // Compact everything, then keep going.
        log.compact(201).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (201, 200));
        assert_eq!(log.term(200), Ok(1));
        log.append(&entries(201..=202, 2)).unwrap();
        let before = observe(&log);
        drop(log);
        assert_eq!(
            observe(&RaftLog::open_with_segment_size(dir.path(), 1024).unwrap()),
            before
        );
    }

    /// A crash while a rewrite deletes the old segments (newest first) leaves the oldest
    /// segments plus the new self-contained one: that must replay to the new state.
    #[test]
    fn interrupted_rewrite_replays_to_the_new_state() {
        type Step = fn(&mut RaftLog);
        let steps: [(&str, Step); 3] = [
            ("compact", |log| log.compact(57).unwrap()),
            ("compact everything", |log| log.compact(61).unwrap()),
            ("snapshot", |log| {
                log.apply_snapshot(&snapshot_meta(70, 4, voters(&[2, 3])))
                    .unwrap()
            }),
        ];
        for (what, step) in steps {
            let dir = tempfile::tempdir().unwrap();
            let mut log = RaftLog::open_with_segment_size(dir.path(), 300).unwrap();
            log.bootstrap(voters(&[1, 2, 3])).unwrap();
            for i in 1..=60 {
                log.append(&entries(i..=i, 1 + i / 20)).unwrap();
                if i == 30 {
                    log.compact(5).unwrap(); // most entries stay live: a compaction record
                }
            }
            log.append(&entries(58..=60, 3)).unwrap(); // conflicting tail
            log.set_hard_state(&hard_state(3, 1, 60)).unwrap();
            let old: Vec<(PathBuf, Vec<u8>)> = {
                log.sync().unwrap();
                // What the rewrite leaves of them once the new segment exists: the last one
                // without its zero tail (cut before the new segment is created, L6).
                let last_size = log.segments.last().unwrap().size as usize;
                let files = segment_files(dir.path());
                let n = files.len();
                files
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let mut b = fs::read(&p).unwrap();
                        if i + 1 == n {
                            b.truncate(last_size);
                        }
                        (p, b)
                    })
                    .collect()
            };
            assert!(old.len() > 2, "{what}: only {} segments", old.len());
            step(&mut log);
            let after = observe(&log);
            let new = segment_files(dir.path());
            assert_eq!(new.len(), 1, "{what}");
            let new_bytes = fs::read(&new[0]).unwrap();
            drop(log);
            for kept in 0..=old.len() {
                let crash = tempfile::tempdir().unwrap();
                for (p, b) in &old[..kept] {
                    fs::write(crash.path().join(p.file_name().unwrap()), b).unwrap();
                }
                fs::write(crash.path().join(new[0].file_name().unwrap()), &new_bytes).unwrap();
                let log = RaftLog::open_with_segment_size(crash.path(), 300).unwrap();
                assert_eq!(observe(&log), after, "{what}, {kept} old segments left");
            }
        }
    }

    #[test]
    fn compaction_record_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.append(&entries(1..=20, 1)).unwrap();
        log.append(&entries(21..=30, 2)).unwrap();
        // Most of the log stays live: no rollover, just a compaction record.
        let seq = log.segments[0].seq;
        log.compact(5).unwrap();
        assert_eq!((log.segments.len(), log.segments[0].seq), (1, seq));
        assert_eq!((log.first_index(), log.term(4)), (5, Ok(1)));
        log.compact(22).unwrap();
        assert_eq!((log.first_index(), log.term(21)), (22, Ok(2)));
        log.append(&entries(31..=31, 2)).unwrap();
        let before = observe(&log);
        drop(log);
        assert_eq!(observe(&RaftLog::open(dir.path()).unwrap()), before);
    }

    #[test]
    fn apply_snapshot_resets_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open_with_segment_size(dir.path(), 300).unwrap();
        log.bootstrap(voters(&[1, 2, 3])).unwrap();
        for i in 1..=10 {
            log.append(&entries(i..=i, 1)).unwrap();
        }
        log.set_hard_state(&hard_state(2, 1, 5)).unwrap();
        assert!(log.segments.len() > 1);
        log.apply_snapshot(&snapshot_meta(20, 3, voters(&[1, 2])))
            .unwrap();
        assert_eq!((log.first_index(), log.last_index()), (21, 20));
        assert_eq!(log.term(20), Ok(3));
        assert_eq!(log.hard_state(), &hard_state(3, 1, 20));
        assert_eq!(log.conf_state(), &voters(&[1, 2]));
        assert_eq!(segment_files(dir.path()).len(), 1);
        let stale = log.apply_snapshot(&snapshot_meta(20, 3, voters(&[1])));
        assert!(matches!(
            stale,
            Err(LogError::Raft(raft::Error::Store(
                StorageError::SnapshotOutOfDate
            )))
        ));
        // No sync: apply_snapshot is durable by itself.
        drop(log);
        let mut log = RaftLog::open_with_segment_size(dir.path(), 300).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (21, 20));
        assert_eq!(log.hard_state(), &hard_state(3, 1, 20));
        assert_eq!(log.conf_state(), &voters(&[1, 2]));
        log.append(&entries(21..=22, 3)).unwrap();
        let before = observe(&log);
        drop(log);
        assert_eq!(
            observe(&RaftLog::open_with_segment_size(dir.path(), 300).unwrap()),
            before
        );
    }

    #[test]
    fn segments_roll_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open_with_segment_size(dir.path(), 256).unwrap();
        for i in 1..=100 {
            log.append(&entries(i..=i, 1 + i / 30)).unwrap();
            if i % 7 == 0 {
                log.set_hard_state(&hard_state(1 + i / 30, 1, i - 3))
                    .unwrap();
                log.sync().unwrap();
            }
        }
        log.sync().unwrap();
        let files = segment_files(dir.path());
        assert!(files.len() > 5, "only {} segments", files.len());
        let sizes: Vec<u64> = log.segments.iter().map(|s| s.size).collect();
        assert_eq!(log.disk_bytes(), sizes.iter().sum::<u64>());
        for (i, p) in files.iter().enumerate() {
            let bytes = fs::read(p).unwrap();
            assert_eq!(bytes[..8], SEGMENT_MAGIC);
            let size = sizes[i] as usize;
            if i + 1 < files.len() {
                // L6: a segment that is no longer the last has no zero tail.
                assert_eq!(bytes.len(), size, "segment {i}");
            } else {
                assert!(bytes.len() > size, "{} <= {size}", bytes.len());
                assert!(bytes[size..].iter().all(|&b| b == 0));
            }
        }
        let before = observe(&log);
        drop(log);
        let mut log = RaftLog::open_with_segment_size(dir.path(), 256).unwrap();
        assert_eq!(observe(&log), before);
        log.append(&entries(101..=120, 5)).unwrap();
        let before = observe(&log);
        drop(log);
        assert_eq!(
            observe(&RaftLog::open_with_segment_size(dir.path(), 256).unwrap()),
            before
        );
    }

    #[test]
    fn lost_committed_entries_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.append(&entries(1..=3, 1)).unwrap();
        log.set_hard_state(&hard_state(1, 1, 5)).unwrap();
        log.sync().unwrap();
        drop(log);
        match RaftLog::open(dir.path()) {
            Err(LogError::LostCommitted {
                commit: 5,
                last_index: 3,
            }) => {}
            other => panic!("expected LostCommitted, got {other:?}"),
        }
    }

    #[test]
    fn torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.append(&entries(1..=5, 1)).unwrap();
        log.sync().unwrap();
        let synced = log.disk_bytes();
        let synced_state = observe(&log);
        log.append(&entries(6..=8, 1)).unwrap();
        let full = log.disk_bytes();
        drop(log);
        let path = segment_files(dir.path()).pop().unwrap();
        let written = fs::read(&path).unwrap();
        assert!(written.len() as u64 > full, "{} <= {full}", written.len());
        assert!(written[full as usize..].iter().all(|&b| b == 0));
        let half = synced + (full - synced) / 2;
        // The file cut in the middle of the unsynced record, and the same record torn inside
        // the space allocated ahead of it (the rest of the file zeros, L6).
        for zeros_after in [false, true] {
            let mut bytes = written.clone();
            if zeros_after {
                bytes[half as usize..].fill(0);
            } else {
                bytes.truncate(half as usize);
            }
            fs::write(&path, &bytes).unwrap();
            let mut log = RaftLog::open(dir.path()).unwrap();
            assert_eq!(observe(&log), synced_state);
            assert_eq!(fs::metadata(&path).unwrap().len(), synced);
            log.append(&entries(6..=6, 2)).unwrap();
            let before = observe(&log);
            drop(log);
            assert_eq!(observe(&RaftLog::open(dir.path()).unwrap()), before);
        }
    }

    /// L6: the zero bytes after the last record are space for appends, kept across a reopen;
    /// appends after the reopen go right after the last record and survive the next one.
    #[test]
    fn a_zero_tail_is_space_for_the_next_appends() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.append(&entries(1..=5, 1)).unwrap();
        log.sync().unwrap();
        let len = log.disk_bytes();
        let before = observe(&log);
        drop(log);
        let path = segment_files(dir.path()).pop().unwrap();
        let allocated = fs::metadata(&path).unwrap().len();
        assert!(allocated > len, "{allocated} <= {len}");
        let mut log = RaftLog::open(dir.path()).unwrap();
        assert_eq!(observe(&log), before);
        assert_eq!(log.disk_bytes(), len);
        assert_eq!(fs::metadata(&path).unwrap().len(), allocated);
        log.append(&entries(6..=9, 1)).unwrap();
        log.sync().unwrap();
        let after = observe(&log);
        drop(log);
        assert_eq!(fs::metadata(&path).unwrap().len(), allocated);
        assert_eq!(observe(&RaftLog::open(dir.path()).unwrap()), after);
    }

    #[test]
    fn torn_segment_creation_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        log.append(&entries(1..=5, 1)).unwrap();
        log.sync().unwrap();
        let before = observe(&log);
        let next = segment_file_name(0, log.next_seq);
        let (last, size) = (log.segments[0].path.clone(), log.segments[0].size);
        drop(log);
        // Creating a segment first cuts the zero tail off the one before (L6).
        OpenOptions::new()
            .write(true)
            .open(&last)
            .unwrap()
            .set_len(size)
            .unwrap();
        for content in [&b"RSQ"[..], &[0u8; 64][..], &SEGMENT_MAGIC[..]] {
            fs::write(dir.path().join(&next), content).unwrap();
            fs::write(dir.path().join(format!("{next}.tmp")), b"junk").unwrap();
            let log = RaftLog::open(dir.path()).unwrap();
            assert_eq!(observe(&log), before);
            drop(log);
            assert_eq!(segment_files(dir.path()).len(), 1);
            assert!(!dir.path().join(format!("{next}.tmp")).exists());
        }
    }

    #[test]
    fn damage_before_the_tail_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open_with_segment_size(dir.path(), 256).unwrap();
        for i in 1..=40 {
            log.append(&entries(i..=i, 1)).unwrap();
        }
        log.sync().unwrap();
        drop(log);
        let files = segment_files(dir.path());
        assert!(files.len() > 2);

        // A flipped payload byte in an earlier segment.
        let first = &files[0];
        let clean = fs::read(first).unwrap();
        let mut bad = clean.clone();
        let at = bad.len() - 3;
        bad[at] ^= 0x40;
        fs::write(first, &bad).unwrap();
        match RaftLog::open_with_segment_size(dir.path(), 256) {
            Err(LogError::Corrupt { path, .. }) => assert_eq!(&path, first),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        fs::write(first, &clean).unwrap();

        // A length field in the last segment inflated so that the record seems to run to the
        // end of the file: the valid records after it give it away.
        let last = files.last().unwrap();
        let clean = fs::read(last).unwrap();
        let mut bad = clean.clone();
        bad[8 + 3] = 0x7f; // high byte of the first record's length
        fs::write(last, &bad).unwrap();
        match RaftLog::open_with_segment_size(dir.path(), 256) {
            Err(LogError::Corrupt { path, offset, .. }) => {
                assert_eq!((&path, offset), (last, 8))
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // Garbage after a bad record.
        let mut bad = clean.clone();
        bad[20] ^= 1;
        bad.extend_from_slice(b"garbage");
        fs::write(last, &bad).unwrap();
        assert!(matches!(
            RaftLog::open_with_segment_size(dir.path(), 256),
            Err(LogError::Corrupt { .. })
        ));
        // A bad magic.
        let mut bad = clean.clone();
        bad[0] = b'X';
        fs::write(last, &bad).unwrap();
        assert!(matches!(
            RaftLog::open_with_segment_size(dir.path(), 256),
            Err(LogError::Corrupt { offset: 0, .. })
        ));
        fs::write(last, &clean).unwrap();
        RaftLog::open_with_segment_size(dir.path(), 256).unwrap();
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<RaftLog>();
        send_sync::<LogStorage>();
        send_sync::<LogError>();
    }

    #[test]
    fn directory_is_locked_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = RaftLog::open(dir.path()).unwrap();
        assert!(matches!(
            RaftLog::open(dir.path()),
            Err(LogError::Locked { .. })
        ));
        drop(log);
        RaftLog::open(dir.path()).unwrap();
    }

    #[test]
    fn reads_match_mem_storage() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RaftLog::open(dir.path()).unwrap();
        let ents: Vec<Entry> = (3..=6)
            .map(|i| entry(i, i, &vec![7; i as usize * 5]))
            .collect();
        log.apply_snapshot(&snapshot_meta(2, 2, voters(&[1])))
            .unwrap();
        log.append(&ents).unwrap();
        let mem = MemStorage::new();
        let mut snap = Snapshot::default();
        snap.set_metadata(snapshot_meta(2, 2, voters(&[1])));
        mem.wl().apply_snapshot(snap).unwrap();
        mem.wl().append(&ents).unwrap();

        let sizes: Vec<u64> = ents.iter().map(|e| u64::from(e.compute_size())).collect();
        let mut limits = vec![None, Some(0), Some(u64::MAX), Some(1)];
        for i in 0..sizes.len() {
            let prefix: u64 = sizes[..=i].iter().sum();
            limits.extend([Some(prefix - 1), Some(prefix), Some(prefix + 1)]);
        }
        for low in 2..=7 {
            for high in low..=7 {
                for &max in &limits {
                    let ctx = GetEntriesContext::empty(false);
                    assert_eq!(
                        log.entries(low, high, max),
                        mem.entries(low, high, max, ctx),
                        "entries({low}, {high}, {max:?})"
                    );
                }
            }
        }
        for idx in 0..=8 {
            assert_eq!(log.term(idx), mem.term(idx), "term({idx})");
        }
        assert_eq!(log.first_index(), mem.first_index().unwrap());
        assert_eq!(log.last_index(), mem.last_index().unwrap());
    }

    struct NoSnapshots;

    impl SnapshotProvider for NoSnapshots {
        fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ))
        }
    }

    /// Runs a single-voter raft node on the log until it has nothing left to do.
    fn drive(node: &mut raft::RawNode<LogStorage>, storage: &LogStorage, applied: &mut Vec<Entry>) {
        while node.has_ready() {
            let mut rd = node.ready();
            applied.extend(rd.take_committed_entries());
            if !rd.entries().is_empty() {
                storage.write().append(rd.entries()).unwrap();
            }
            if let Some(hs) = rd.hs() {
                storage.write().set_hard_state(hs).unwrap();
            }
            storage.write().sync().unwrap();
            let mut light = node.advance(rd);
            if let Some(commit) = light.commit_index() {
                let mut hs = storage.read().hard_state().clone();
                hs.commit = commit;
                storage.write().set_hard_state(&hs).unwrap();
                storage.write().sync().unwrap();
            }
            applied.extend(light.take_committed_entries());
            node.advance_apply();
        }
    }

    #[test]
    fn drives_a_raft_node() {
        let dir = tempfile::tempdir().unwrap();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let cfg = raft::Config {
            id: 1,
            ..Default::default()
        };
        let mut applied = Vec::new();
        for round in 0..2u8 {
            let mut log = RaftLog::open(dir.path()).unwrap();
            if !log.is_initialized() {
                log.bootstrap(voters(&[1])).unwrap();
            }
            let storage = LogStorage::new(log, Arc::new(NoSnapshots));
            let mut node = raft::RawNode::new(&cfg, storage.clone(), &logger).unwrap();
            node.campaign().unwrap();
            drive(&mut node, &storage, &mut applied);
            assert_eq!(node.raft.state, raft::StateRole::Leader);
            node.propose(vec![], vec![b'x', round]).unwrap();
            drive(&mut node, &storage, &mut applied);
            let data: Vec<&[u8]> = applied
                .iter()
                .filter(|e| !e.data.is_empty())
                .map(|e| &e.data[..])
                .collect();
            assert_eq!(data.last(), Some(&&[b'x', round][..]));
            let log = storage.read();
            assert_eq!(log.hard_state().commit, log.last_index());
            assert_eq!(storage.initial_state().unwrap().conf_state, voters(&[1]));
        }
        let log = RaftLog::open(dir.path()).unwrap();
        let all = log.entries(1, log.last_index() + 1, None).unwrap();
        let proposals = all.iter().filter(|e| !e.data.is_empty()).count();
        assert_eq!(proposals, 2);
    }

    // ---------------------------------------------------------------------------------------
    // Property tests against a model
    // ---------------------------------------------------------------------------------------

    /// The obvious in-memory log (MemStorage semantics, but keeping the base term).
    #[derive(Clone, Debug, Default)]
    struct Model {
        base: u64,
        base_term: u64,
        entries: Vec<Entry>,
        hs: HardState,
        cs: ConfState,
    }

    impl Model {
        fn first(&self) -> u64 {
            self.base + 1
        }
        fn last(&self) -> u64 {
            self.base + self.entries.len() as u64
        }
        fn term(&self, i: u64) -> u64 {
            if i == self.base {
                self.base_term
            } else {
                self.entries[(i - self.base - 1) as usize].term
            }
        }
        fn observed(&self) -> Observed {
            Observed {
                first: self.first(),
                last: self.last(),
                base_term: self.base_term,
                entries: self.entries.clone(),
                hs: self.hs.clone(),
                cs: self.cs.clone(),
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Append `count` entries starting `back` entries before the end (conflicts), never at
        /// or below the commit index.
        Append {
            back: u64,
            count: u64,
            bump: u64,
            data: Vec<u8>,
        },
        /// Raise the commit index by a fraction (per cent) of the uncommitted entries.
        HardState {
            frac: u64,
            vote: u64,
        },
        ConfState {
            voters: Vec<u64>,
        },
        /// Compact to a fraction (per cent) of the way from the first index to commit + 1.
        Compact {
            frac: u64,
        },
        /// Install a snapshot past the end of the log.
        Snapshot {
            ahead: u64,
            bump: u64,
            voters: Vec<u64>,
        },
        Sync,
        Reopen,
    }

    fn simple_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..4, 1u64..5, 0u64..2, prop::collection::vec(any::<u8>(), 0..40))
                .prop_map(|(back, count, bump, data)| Op::Append { back, count, bump, data }),
            3 => (0u64..=100, 0u64..4).prop_map(|(frac, vote)| Op::HardState { frac, vote }),
            1 => prop::collection::vec(1u64..6, 0..4).prop_map(|voters| Op::ConfState { voters }),
        ]
    }

    fn any_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            10 => simple_op(),
            2 => (0u64..=100).prop_map(|frac| Op::Compact { frac }),
            1 => (0u64..3, 0u64..2, prop::collection::vec(1u64..6, 1..4))
                .prop_map(|(ahead, bump, voters)| Op::Snapshot { ahead, bump, voters }),
            2 => Just(Op::Sync),
            1 => Just(Op::Reopen),
        ]
    }

    struct Harness {
        dir: tempfile::TempDir,
        segment_size: u64,
        /// The log keeps a spare segment (L7).
        spare: bool,
        log: Option<RaftLog>,
        model: Model,
    }

    impl Harness {
        fn new(segment_size: u64) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let log = RaftLog::open_with_segment_size(dir.path(), segment_size).unwrap();
            Harness {
                dir,
                segment_size,
                spare: false,
                log: Some(log),
                model: Model::default(),
            }
        }

        /// A log that keeps a spare segment (L7), also after each reopen.
        fn with_spare(segment_size: u64) -> Harness {
            let mut h = Harness::new(segment_size);
            h.spare = true;
            h.log().keep_spare(u64::MAX).unwrap();
            h
        }

        fn log(&mut self) -> &mut RaftLog {
            self.log.as_mut().unwrap()
        }

        fn reopen(&mut self) -> Result<(), LogError> {
            self.log = None;
            self.log = Some(RaftLog::open_with_segment_size(
                self.dir.path(),
                self.segment_size,
            )?);
            if self.spare {
                self.log().keep_spare(u64::MAX)?;
            }
            Ok(())
        }

        fn check(&self) {
            assert_eq!(observe(self.log.as_ref().unwrap()), self.model.observed());
        }

        fn apply(&mut self, op: &Op) {
            let m = &mut self.model;
            match op {
                Op::Append {
                    back,
                    count,
                    bump,
                    data,
                } => {
                    let lo = m.first().max(m.hs.commit + 1);
                    let start = (m.last() + 1).saturating_sub(*back).max(lo);
                    let term = m.term(start - 1) + bump;
                    let ents: Vec<Entry> =
                        (0..*count).map(|i| entry(start + i, term, data)).collect();
                    self.log.as_mut().unwrap().append(&ents).unwrap();
                    m.entries.truncate((start - m.base - 1) as usize);
                    m.entries.extend(ents);
                }
                Op::HardState { frac, vote } => {
                    let (lo, hi) = (m.hs.commit, m.last());
                    let hs = hard_state(
                        m.hs.term.max(m.term(m.last())),
                        *vote,
                        lo + (hi - lo) * frac / 100,
                    );
                    self.log.as_mut().unwrap().set_hard_state(&hs).unwrap();
                    m.hs = hs;
                }
                Op::ConfState { voters: v } => {
                    self.log
                        .as_mut()
                        .unwrap()
                        .set_conf_state(&voters(v))
                        .unwrap();
                    m.cs = voters(v);
                }
                Op::Compact { frac } => {
                    let (lo, hi) = (m.first(), m.hs.commit + 1);
                    let idx = lo + (hi - lo) * frac / 100;
                    self.log.as_mut().unwrap().compact(idx).unwrap();
                    if idx > m.first() {
                        let t = m.term(idx - 1);
                        let n = (idx - m.first()) as usize;
                        m.entries.drain(..n);
                        m.base = idx - 1;
                        m.base_term = t;
                    }
                }
                Op::Snapshot {
                    ahead,
                    bump,
                    voters: v,
                } => {
                    let idx = m.last() + 1 + ahead;
                    let term = m.term(m.last()) + bump;
                    self.log
                        .as_mut()
                        .unwrap()
                        .apply_snapshot(&snapshot_meta(idx, term, voters(v)))
                        .unwrap();
                    m.base = idx;
                    m.base_term = term;
                    m.entries.clear();
                    m.cs = voters(v);
                    m.hs.commit = m.hs.commit.max(idx);
                    m.hs.term = m.hs.term.max(term);
                }
                Op::Sync => self.log().sync().unwrap(),
                Op::Reopen => self.reopen().unwrap(),
            }
            self.check();
        }
    }

    /// Appends one entry of 300 bytes of `n` (then the next `n`): the spare tests' unit of
    /// log growth.
    fn append_one(h: &mut Harness, n: &mut u8) {
        h.apply(&Op::Append {
            back: 0,
            count: 1,
            bump: 0,
            data: vec![*n; 300],
        });
        *n = n.wrapping_add(1);
    }

    /// Waits (20 s at most) until the log's spare segment is written.
    fn await_spare(log: &RaftLog) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !log.spare.as_ref().expect("a log keeping a spare").ready() {
            assert!(
                std::time::Instant::now() < deadline,
                "no spare segment within 20 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// L7: a log that keeps a spare makes its segments of files written with zeros ahead of
    /// time (rolling over early out of a segment that was only allocated), they replay like any
    /// other, and a spare a closed log left behind is removed when the log opens.
    #[test]
    fn segments_made_of_spares_replay_and_a_left_spare_is_removed() {
        let size = 16 << 10;
        let mut h = Harness::with_spare(size);
        let append = |h: &mut Harness, n: u8| {
            h.apply(&Op::Append {
                back: 0,
                count: 4,
                bump: 0,
                data: vec![n; 300],
            });
            h.apply(&Op::HardState { frac: 100, vote: 0 });
        };
        // Until the log has written a segment's worth, nothing asks for a spare.
        append(&mut h, 0);
        let spare_path = h.dir.path().join(spare::SPARE_FILE);
        assert!(
            !spare_path.exists(),
            "a spare before the log wrote anything"
        );
        let first = h.log().segments.last().unwrap().path.clone();
        assert!(!h.log().segments.last().unwrap().zeros_written);
        // One operation at a time up to the threshold, so that no operation after the one
        // that asks for the spare can roll over into it before the rounds below look.
        let mut n = 1;
        while h.log().appended < size {
            append_one(&mut h, &mut n);
        }
        // Three times: a spare is ready, the next rollover (early out of the first segment,
        // then at the segment size) makes the new segment of it.
        let mut made_of_spares = Vec::new();
        for round in 0..3 {
            await_spare(h.log.as_ref().unwrap());
            let before = h.log().segments.last().unwrap().path.clone();
            let mut appends = 0;
            while h.log().segments.last().unwrap().path == before {
                append(&mut h, n);
                n = n.wrapping_add(1);
                appends += 1;
            }
            if round == 0 {
                assert_eq!(appends, 1, "no early rollover into the ready spare");
            }
            let seg = h.log().segments.last().unwrap();
            assert!(
                seg.zeros_written && seg.allocated == size,
                "round {round}: {seg:?}"
            );
            assert_eq!(fs::metadata(&seg.path).unwrap().len(), size);
            made_of_spares.push(seg.path.clone());
        }
        // The first segment rolled over early; segments that stopped being the last lost
        // their zero tails (L6).
        let records_end = |p: &Path| match scan_segment(&fs::read(p).unwrap(), false) {
            Ok(SegmentScan::Records { end, .. }) => end as u64,
            _ => panic!("{} does not scan", p.display()),
        };
        for p in [&first, &made_of_spares[0], &made_of_spares[1]] {
            assert_eq!(
                fs::metadata(p).unwrap().len(),
                records_end(p),
                "{}",
                p.display()
            );
        }
        await_spare(h.log.as_ref().unwrap());
        assert!(spare_path.exists());
        let segments = segment_files(h.dir.path());
        assert!(made_of_spares.iter().all(|p| segments.contains(p)));
        h.reopen().unwrap();
        h.check();
        assert!(!spare_path.exists(), "the left spare was not removed");
        assert_eq!(segment_files(h.dir.path()), segments);
    }

    /// L7: while no spare can be written (here a directory stands where the spare goes, as a
    /// full disk would fail it) the log goes on with allocated segments, and once the
    /// obstacle is gone a later try makes spares again.
    #[test]
    fn a_failing_spare_leaves_the_log_working_and_is_tried_again() {
        let size = 16 << 10;
        let mut h = Harness::with_spare(size);
        let spare_path = h.dir.path().join(spare::SPARE_FILE);
        fs::create_dir(&spare_path).unwrap();
        let mut n = 0u8;
        // Past the threshold and through two rollovers at the segment size: no spare.
        let mut rollovers = 0;
        while rollovers < 2 {
            let before = h.log().segments.len();
            append_one(&mut h, &mut n);
            if h.log().segments.len() > before {
                rollovers += 1;
                assert!(!h.log().segments.last().unwrap().zeros_written);
            }
        }
        assert!(!h.log.as_ref().unwrap().spare.as_ref().unwrap().ready());
        h.check();
        // The obstacle goes: a later try succeeds, and the next rollover uses the spare.
        fs::remove_dir(&spare_path).unwrap();
        await_spare(h.log.as_ref().unwrap());
        h.apply(&Op::HardState { frac: 100, vote: 0 });
        let seg = h.log().segments.last().unwrap();
        assert!(seg.zeros_written && seg.allocated == size, "{seg:?}");
        h.reopen().unwrap();
        h.check();
    }

    fn copy_dir(from: &Path, to: &Path) {
        for e in fs::read_dir(from).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap() != LOCK_FILE {
                fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Random operations agree with the model, in memory and after reopening.
        #[test]
        fn prop_matches_model_across_reopen(
            ops in prop::collection::vec(any_op(), 0..60),
            small in any::<bool>(),
            spare in any::<bool>(),
        ) {
            let size = if small { 300 } else { DEFAULT_SEGMENT_SIZE };
            // With a spare (L7) segments roll over whenever one is ready: any interleaving.
            let mut h = if spare { Harness::with_spare(size) } else { Harness::new(size) };
            for op in &ops {
                h.apply(op);
            }
            h.reopen().unwrap();
            h.check();
        }

        /// Cutting (or zeroing) the last segment anywhere after the last sync loses at most the
        /// records after the cut, never anything synced.
        #[test]
        fn prop_torn_tail_keeps_a_prefix(
            before in prop::collection::vec(any_op(), 0..20),
            after in prop::collection::vec(simple_op(), 1..10),
            cut in 0u64..=1000,
            zero_fill in any::<bool>(),
        ) {
            let mut h = Harness::new(1 << 20);
            for op in &before {
                h.apply(op);
            }
            h.apply(&Op::HardState { frac: 0, vote: 0 }); // make sure a segment exists
            h.log().sync().unwrap();
            let segments = h.log().segments.len();
            let path = h.log().segments.last().unwrap().path.clone();
            let last_size = |h: &mut Harness| h.log().segments.last().unwrap().size;
            let mut states = vec![(last_size(&mut h), h.model.observed())];
            for op in &after {
                h.apply(op);
                prop_assert_eq!(h.log().segments.len(), segments);
                states.push((last_size(&mut h), h.model.observed()));
            }
            let synced_len = states[0].0;
            h.log = None;
            let full_len = states[states.len() - 1].0;
            prop_assert!(fs::metadata(&path).unwrap().len() >= full_len);
            let cut = synced_len + (full_len - synced_len) * cut / 1000;
            if zero_fill {
                let mut bytes = fs::read(&path).unwrap();
                bytes[cut as usize..].fill(0);
                fs::write(&path, &bytes).unwrap();
            } else {
                OpenOptions::new().write(true).open(&path).unwrap().set_len(cut).unwrap();
            }
            let (kept, expected) = states.iter().rev().find(|(end, _)| *end <= cut).unwrap().clone();
            h.reopen().unwrap();
            prop_assert_eq!(observe(h.log.as_ref().unwrap()), expected.clone());
            prop_assert_eq!(h.log().segments.last().unwrap().size, kept);
            // Past the records: nothing, or zeros when the cut left the rest zero (L6).
            let left = fs::read(&path).unwrap();
            prop_assert!(left[kept as usize..].iter().all(|&b| b == 0));
            // The log keeps working after recovery.
            h.log().append(&[entry(expected.last + 1, expected.base_term.max(1) + 5, b"again")]).unwrap();
            let again = observe(h.log.as_ref().unwrap());
            h.reopen().unwrap();
            prop_assert_eq!(observe(h.log.as_ref().unwrap()), again);
        }

        /// A flipped byte is reported as corruption, except that damage to the very last record
        /// may instead be cut off as a torn tail (losing exactly that record).
        #[test]
        fn prop_flipped_byte_is_detected(
            ops in prop::collection::vec(any_op(), 1..40),
            which_segment in any::<prop::sample::Index>(),
            which_byte in any::<prop::sample::Index>(),
            mask in 1u8..=255,
        ) {
            let mut h = Harness::new(256);
            for op in &ops {
                h.apply(op);
            }
            h.apply(&Op::HardState { frac: 0, vote: 0 });
            h.log().sync().unwrap();
            h.log = None;
            let files = segment_files(h.dir.path());
            let seg = which_segment.index(files.len());
            let is_last = seg + 1 == files.len();
            let path = &files[seg];
            let clean = fs::read(path).unwrap();
            let SegmentScan::Records { records, torn: None, end } = scan_segment(&clean, is_last).unwrap() else {
                panic!("clean segment does not scan cleanly");
            };
            // A byte of the records, or a few past them (the space allocated ahead, L6).
            let pos = which_byte.index((end + 64).min(clean.len()));
            let in_final_record =
                is_last && records.last().is_some_and(|r| r.offset <= pos && pos < r.end);
            // Past the records, in the space allocated ahead (L6): nothing is lost, the byte
            // is either cut off as a torn record or reported.
            let past_the_records = is_last && pos >= end;
            let unchanged = past_the_records.then(|| {
                RaftLog::open_with_segment_size(h.dir.path(), 256).map(|l| observe(&l)).unwrap()
            });
            // What "losing exactly the final record" looks like.
            let expected = in_final_record.then(|| {
                let copy = tempfile::tempdir().unwrap();
                copy_dir(h.dir.path(), copy.path());
                let copied = copy.path().join(path.file_name().unwrap());
                let f = OpenOptions::new().write(true).open(&copied).unwrap();
                f.set_len(records.last().unwrap().offset as u64).unwrap();
                drop(f);
                RaftLog::open_with_segment_size(copy.path(), 256).map(|l| observe(&l))
            });
            let mut bad = clean.clone();
            bad[pos] ^= mask;
            fs::write(path, &bad).unwrap();
            let got = RaftLog::open_with_segment_size(h.dir.path(), 256);
            if let Some(want) = unchanged {
                match got {
                    Ok(log) => prop_assert_eq!(observe(&log), want),
                    Err(LogError::Corrupt { path: p, .. }) => prop_assert_eq!(&p, path),
                    other => panic!("byte {pos} past the records: got {other:?}"),
                }
                return Ok(());
            }
            match (expected, got) {
                (None, Err(LogError::Corrupt { path: p, .. })) => prop_assert_eq!(&p, path),
                (None, other) => panic!("expected Corrupt for byte {pos} of {}, got {other:?}", path.display()),
                (Some(_), Err(LogError::Corrupt { .. })) => {}
                (Some(Ok(want)), Ok(log)) => prop_assert_eq!(observe(&log), want),
                (Some(Err(LogError::LostCommitted { .. })), Err(LogError::LostCommitted { .. })) => {}
                (Some(want), got) => panic!("expected {want:?}, got {got:?}"),
            }
        }

        /// Arbitrary bytes as a segment never make `open` panic (what the fuzz target checks).
        #[test]
        fn prop_open_never_panics(
            body in prop::collection::vec(any::<u8>(), 0..300),
            with_magic in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = if with_magic { SEGMENT_MAGIC.to_vec() } else { Vec::new() };
            bytes.extend_from_slice(&body);
            fs::write(dir.path().join(segment_file_name(0, 1)), &bytes).unwrap();
            if let Ok(log) = RaftLog::open(dir.path()) {
                let state = observe(&log);
                drop(log);
                prop_assert_eq!(observe(&RaftLog::open(dir.path()).unwrap()), state);
            }
        }
    }
}
