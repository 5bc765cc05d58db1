//! One WAL's bytes, as the file would hold them, kept in memory up to [`MEM_BYTES`] (the
//! `raftsql` VFS's WAL files, vfs.rs).
//!
//! A WAL is short: the state machine checkpoints it every `--checkpoint-frames` pages (16 MiB
//! by default) and a leader transaction may add at most one entry's pages. It grows past that
//! only while a checkpoint is held back (a long read, a snapshot being built, pins old frames)
//! and writes go on, or with a larger `--checkpoint-frames`. Memory must stay bounded then
//! too, so the bytes past [`MEM_BYTES`] go to a file beside the database, `<db>-walspill`,
//! written at their own offsets (sparse below [`MEM_BYTES`]); it is deleted once the WAL is
//! short again. Like the WAL itself it is never read after a restart (the node deletes it
//! with the WAL, `state::db::remove_wal_files`).
//!
//! # Invariants
//! - `mem.len() == min(len, MEM_BYTES)`; bytes `[MEM_BYTES, len)` are in the spill file.
//! - Reading past `len` returns fewer bytes (a short read, as a file answers).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;

use parking_lot::RwLock;

/// Bytes of a WAL held in memory; the rest is spilled to a file.
pub(crate) const MEM_BYTES: usize = 64 << 20;

/// After a truncation a WAL keeps its memory for the next frames, up to this much (twice the
/// default checkpoint's worth); a larger buffer is freed down to the new length.
const KEEP_BYTES: usize = 32 << 20;

/// Past this size, a WAL's buffer grows by this much at a time instead of doubling.
const GROW_STEP: usize = 4 << 20;

/// One WAL: its bytes, and the bound a leader transaction writes under (vfs.rs).
pub(crate) struct MemWal {
    pub(crate) data: RwLock<WalBytes>,
    /// The length past which writes are refused with `SQLITE_FULL`; `usize::MAX` when
    /// unlimited.
    pub(crate) limit: AtomicUsize,
}

impl MemWal {
    /// An empty WAL whose spill file, if it ever needs one, is `spill`.
    pub(crate) fn new(spill: PathBuf) -> MemWal {
        MemWal {
            data: RwLock::new(WalBytes {
                len: 0,
                mem: Vec::new(),
                spill: None,
                spill_path: spill,
            }),
            limit: AtomicUsize::new(usize::MAX),
        }
    }
}

/// The bytes of a WAL: the first [`MEM_BYTES`] in memory, the rest in the spill file.
pub(crate) struct WalBytes {
    len: usize,
    mem: Vec<u8>,
    spill: Option<File>,
    spill_path: PathBuf,
}

impl WalBytes {
    /// The WAL's length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Copies the bytes at `off` into `out`; returns how many there were (fewer than
    /// `out.len()` at the end of the WAL).
    pub(crate) fn read_at(&self, off: usize, out: &mut [u8]) -> io::Result<usize> {
        let end = off.saturating_add(out.len()).min(self.len);
        if off >= end {
            return Ok(0);
        }
        let in_mem = end.min(MEM_BYTES);
        if off < in_mem {
            out[..in_mem - off].copy_from_slice(&self.mem[off..in_mem]);
        }
        let spilled = off.max(MEM_BYTES);
        if spilled < end {
            let f = self.spill.as_ref().ok_or_else(|| {
                io::Error::other(format!("{}: the spilled WAL is missing", self.path()))
            })?;
            f.read_exact_at(&mut out[spilled - off..end - off], spilled as u64)?;
        }
        Ok(end - off)
    }

    /// Writes `src` at `off` (a gap past the end reads as zeros, as in a file).
    pub(crate) fn write_at(&mut self, off: usize, src: &[u8]) -> io::Result<()> {
        let end = off + src.len();
        let in_mem = end.min(MEM_BYTES);
        if self.mem.len() < in_mem {
            self.reserve_to(in_mem);
        }
        if off < in_mem && off == self.mem.len() {
            // Appending, as SQLite writes frames: no zeros written first.
            self.mem.extend_from_slice(&src[..in_mem - off]);
        } else {
            if self.mem.len() < in_mem {
                self.mem.resize(in_mem, 0);
            }
            if off < in_mem {
                self.mem[off..in_mem].copy_from_slice(&src[..in_mem - off]);
            }
        }
        let spilled = off.max(MEM_BYTES);
        if spilled < end {
            self.spill_file()?
                .write_all_at(&src[spilled - off..], spilled as u64)?;
        }
        self.len = self.len.max(end);
        Ok(())
    }

    /// Sets the length to `len`: truncates (freeing memory and the spill file once the WAL
    /// fits in memory again) or extends with zeros.
    pub(crate) fn set_len(&mut self, len: usize) -> io::Result<()> {
        self.mem.resize(len.min(MEM_BYTES), 0);
        if self.mem.capacity() > KEEP_BYTES.max(self.mem.len() * 2) {
            self.mem.shrink_to(self.mem.len());
        }
        if len <= MEM_BYTES {
            self.remove_spill();
        } else {
            self.spill_file()?.set_len(len as u64)?;
        }
        self.len = len;
        Ok(())
    }

    /// Makes room in memory for `n` bytes: a power of two up to [`GROW_STEP`], then whole
    /// steps, so that the buffer of a default checkpoint interval stays under
    /// [`KEEP_BYTES`] (doubling a buffer just past 16 MiB would not).
    fn reserve_to(&mut self, n: usize) {
        if self.mem.capacity() >= n {
            return;
        }
        let want = if n < GROW_STEP {
            n.next_power_of_two()
        } else {
            n.next_multiple_of(GROW_STEP).min(MEM_BYTES)
        };
        self.mem.reserve_exact(want - self.mem.len());
    }

    /// Deletes the spill file, if any (the WAL is forgotten or fits in memory).
    pub(crate) fn remove_spill(&mut self) {
        if self.spill.take().is_some() {
            let _ = fs::remove_file(&self.spill_path);
        }
    }

    /// The bytes of memory this WAL holds, used or not.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.mem.capacity()
    }

    /// Whether bytes of this WAL are in its spill file.
    #[cfg(test)]
    pub(crate) fn spilled(&self) -> bool {
        self.spill.is_some()
    }

    fn spill_file(&mut self) -> io::Result<&File> {
        if self.spill.is_none() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.spill_path)?;
            self.spill = Some(f);
        }
        Ok(self.spill.as_ref().unwrap())
    }

    fn path(&self) -> String {
        self.spill_path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes written across the memory bound read back the same, the spill file exists only
    /// while the WAL is longer than memory holds, and reads past the end are short.
    #[test]
    fn a_wal_longer_than_memory_spills_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let spill = dir.path().join("t.db-walspill");
        let wal = MemWal::new(spill.clone());
        let mut w = wal.data.write();
        let chunk: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut off = MEM_BYTES - 300_000;
        w.write_at(0, b"header").unwrap();
        w.write_at(off, &chunk).unwrap();
        off += chunk.len();
        assert_eq!(w.len(), off);
        assert!(w.spilled() && spill.exists());
        let mut back = vec![0u8; chunk.len()];
        assert_eq!(
            w.read_at(off - chunk.len(), &mut back).unwrap(),
            chunk.len()
        );
        assert_eq!(back, chunk);
        // The gap between the header and the chunk reads as zeros.
        let mut gap = vec![1u8; 100];
        assert_eq!(w.read_at(1000, &mut gap).unwrap(), 100);
        assert!(gap.iter().all(|b| *b == 0));
        // Past the end: short.
        let mut tail = vec![0u8; 10];
        assert_eq!(w.read_at(off - 4, &mut tail).unwrap(), 4);
        // Truncated into memory: the spill file goes, the head stays.
        w.set_len(MEM_BYTES / 2).unwrap();
        assert!(!w.spilled() && !spill.exists());
        let mut head = [0u8; 6];
        assert_eq!(w.read_at(0, &mut head).unwrap(), 6);
        assert_eq!(&head, b"header");
        w.set_len(0).unwrap();
        assert_eq!(w.read_at(0, &mut head).unwrap(), 0);
    }

    /// A checkpoint's truncation keeps the buffer the frames of a default checkpoint interval
    /// grew, so that the next interval's frames do not map (and page-fault) it anew. Written
    /// as SQLite writes a WAL: its 32-byte header, then per frame a 24-byte frame header and
    /// the page; 4,000 pages (`--checkpoint-frames`' default) and the 3 x 256 a two-phase
    /// checkpoint lets through meanwhile (state/passive_copy.rs).
    #[test]
    fn a_checkpoint_keeps_the_buffer_of_a_default_interval() {
        let dir = tempfile::tempdir().unwrap();
        let wal = MemWal::new(dir.path().join("t.db-walspill"));
        let mut w = wal.data.write();
        let page = [7u8; 4096];
        for round in 0..3 {
            w.write_at(0, &[1u8; 32]).unwrap();
            let mut off = 32;
            for _ in 0..4_000 + 3 * 256 {
                w.write_at(off, &[2u8; 24]).unwrap();
                w.write_at(off + 24, &page).unwrap();
                off += 24 + page.len();
            }
            let grown = w.capacity();
            w.set_len(0).unwrap();
            assert_eq!(
                w.capacity(),
                grown,
                "round {round}: truncating a WAL of {off} bytes freed its buffer of {grown}"
            );
        }
    }
}
