//! The checkpoint target: the last entry whose pages a checkpoint may have put into the
//! database files of a generation (recovery replays at least that far and accepts pages
//! carried past their base up to it, I9).
//!
//! It is recorded before every copy into the files, twice per checkpoint (passive_copy.rs,
//! checkpoint.rs), so it has a record of its own that costs one `fdatasync`, instead of a
//! rewrite of `meta.json` (a file, its fsync, a rename and the directory's fsync: 5-6 ms
//! under load on the state machine thread).
//!
//! ```text
//! checkpoint-target = slot 0 at byte 0 | slot 1 at byte 512 (sectors of their own)
//! slot = magic "RSQT" | seq: u64 LE | target: u64 LE | crc32(magic..target): u32 LE
//! ```
//!
//! # Invariants
//! - A write goes to the slot that does not hold the newest valid record, and is synced
//!   before it returns: a torn write leaves the other slot, the previous target, intact.
//!   The directory is synced too until the file holds a valid record.
//! - The target read is the newest valid slot's (0 with no file or no valid slot), or
//!   `meta.json`'s older `checkpoint_target`, whichever is larger (`recovery.rs`).
//!
//! Test: `target::tests::the_newest_whole_slot_wins`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::fsutil::fsync_dir;

const FILE: &str = "checkpoint-target";
const MAGIC: &[u8; 4] = b"RSQT";
/// Bytes of a slot.
const SLOT: usize = 24;
/// Where slot `i` starts.
const SLOT_AT: [usize; 2] = [0, 512];

/// (seq, target) of a whole slot.
fn parse(b: &[u8; SLOT]) -> Option<(u64, u64)> {
    let crc = u32::from_le_bytes(b[20..24].try_into().unwrap());
    (&b[0..4] == MAGIC && crc32fast::hash(&b[0..20]) == crc).then(|| {
        (
            u64::from_le_bytes(b[4..12].try_into().unwrap()),
            u64::from_le_bytes(b[12..20].try_into().unwrap()),
        )
    })
}

/// Both slots of an open record: (index of the newest whole one, its seq and target).
fn newest(f: &File) -> io::Result<Option<(usize, u64, u64)>> {
    let mut b = [0u8; 512 + SLOT];
    let n = f.read_at(&mut b, 0)?;
    let slots = (0..2).filter(|i| SLOT_AT[*i] + SLOT <= n).filter_map(|i| {
        let slot: &[u8; SLOT] = b[SLOT_AT[i]..SLOT_AT[i] + SLOT].try_into().unwrap();
        parse(slot).map(|(s, t)| (i, s, t))
    });
    Ok(slots.max_by_key(|(_, s, _)| *s))
}

/// The target recorded in generation `gen` (0 if none).
pub(super) fn read(gen: &Path) -> Result<u64> {
    let p = gen.join(FILE);
    match File::open(&p) {
        Ok(f) => Ok(newest(&f)
            .map_err(|e| Error::io(&p, e))?
            .map_or(0, |(_, _, t)| t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::io(&p, e)),
    }
}

/// Records `target` for generation `gen`, durably, before it returns.
pub(super) fn write(gen: &Path, target: u64) -> Result<()> {
    let p = gen.join(FILE);
    let io = |e| Error::io(&p, e);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .map_err(io)?;
    let last = newest(&f).map_err(io)?;
    let (slot, seq) = match last {
        Some((i, s, _)) => (1 - i, s + 1),
        None => (0, 1),
    };
    let mut b = [0u8; SLOT];
    b[0..4].copy_from_slice(MAGIC);
    b[4..12].copy_from_slice(&seq.to_le_bytes());
    b[12..20].copy_from_slice(&target.to_le_bytes());
    let crc = crc32fast::hash(&b[0..20]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&b, SLOT_AT[slot] as u64).map_err(io)?;
    f.sync_data().map_err(io)?;
    if last.is_none() {
        // A new file (or one whose first write failed): its name must survive a crash too.
        fsync_dir(gen)?;
    }
    Ok(())
}

/// Sets generation `gen`'s target back to 0, if it has a record (disaster recovery).
pub(super) fn clear(gen: &Path) -> Result<()> {
    if gen.join(FILE).exists() {
        write(gen, 0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes alternate between the slots; a torn newest slot leaves the one before it.
    #[test]
    fn the_newest_whole_slot_wins() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), 0);
        for t in [5, 9, 12] {
            write(dir.path(), t).unwrap();
            assert_eq!(read(dir.path()).unwrap(), t);
        }
        // 12 is in slot 0 (the third write), 9 in slot 1: tear slot 0.
        let p = dir.path().join(FILE);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff; 7], 10).unwrap();
        assert_eq!(read(dir.path()).unwrap(), 9);
        // The next write goes over the torn slot, not over 9.
        write(dir.path(), 20).unwrap();
        assert_eq!(read(dir.path()).unwrap(), 20);
        f.write_all_at(&[0; SLOT], 0).unwrap();
        assert_eq!(read(dir.path()).unwrap(), 9);
        // A torn slot 1 as well: no target is recorded.
        f.write_all_at(&[1; 3], 512 + 20).unwrap();
        assert_eq!(read(dir.path()).unwrap(), 0);
    }
}
