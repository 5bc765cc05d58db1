//! Fuzzes segment parsing and replay of the durable Raft log.
//!
//! The input becomes the segment file(s) of an otherwise empty log directory and
//! `RaftLog::open` must never panic: errors (`Corrupt`, `LostCommitted`, ...) are fine. When
//! it succeeds, the recovered log must answer reads over its whole range, and reopening it must
//! give the same state (recovery, including cutting off a torn tail, is idempotent).
//!
//! The first input byte selects a layout, so the fuzzer need not discover it by itself:
//! bit 0 prepends the segment magic; bit 1 splits the rest into two segments (the split point
//! is given by the upper six bits), exercising the rules for segments that are not the last.
//! Each file is named after the base index its first record claims, so that the file-name check
//! does not hide everything behind it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use raftsql_core::fuzzing::{segment_file_name, RaftLog, SEGMENT_MAGIC};

fn segment(with_magic: bool, body: &[u8]) -> Vec<u8> {
    let mut seg = Vec::with_capacity(SEGMENT_MAGIC.len() + body.len());
    if with_magic {
        seg.extend_from_slice(&SEGMENT_MAGIC);
    }
    seg.extend_from_slice(body);
    seg
}

/// The index of the Base record a segment would start with (0 if it is too short).
fn claimed_base(seg: &[u8]) -> u64 {
    // magic (8) + record header (9), then the base index.
    seg.get(17..25)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let with_magic = mode & 1 == 1;
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let write = |seq: u64, bytes: &[u8]| {
        let name = segment_file_name(claimed_base(bytes), seq);
        std::fs::write(dir.path().join(name), bytes).expect("write a segment file");
    };
    if mode & 2 == 2 {
        let split = body.len() * usize::from(mode >> 2) / 63;
        write(1, &segment(with_magic, &body[..split]));
        write(2, &segment(with_magic, &body[split..]));
    } else {
        write(1, &segment(with_magic, body));
    }

    let Ok(log) = RaftLog::open(dir.path()) else {
        return;
    };
    let (first, last) = (log.first_index(), log.last_index());
    assert!(
        first <= last + 1,
        "first index {first} > last index {last} + 1"
    );
    let base_term = log.term(first - 1).expect("the base index has a term");
    let entries = log
        .entries(first, last + 1, None)
        .expect("entries over the whole range");
    assert_eq!(entries.len() as u64, last + 1 - first);
    for (e, idx) in entries.iter().zip(first..) {
        assert_eq!(e.index, idx);
        assert_eq!(log.term(idx).expect("term of an entry"), e.term);
    }
    assert!(log.hard_state().commit <= last);
    let state = (
        first,
        last,
        base_term,
        entries,
        log.hard_state().clone(),
        log.conf_state().clone(),
    );
    drop(log);

    let log = RaftLog::open(dir.path()).expect("reopening a recovered log");
    let (first, last) = (log.first_index(), log.last_index());
    let again = (
        first,
        last,
        log.term(first - 1).expect("the base index has a term"),
        log.entries(first, last + 1, None)
            .expect("entries over the whole range"),
        log.hard_state().clone(),
        log.conf_state().clone(),
    );
    assert_eq!(state, again, "reopening changed the recovered state");
});
