//! Start-up recovery of the database files: the committed entries after the checkpoint index
//! are written straight into the files before SQLite opens them (I9), and the
//! generation and checkpoint metadata are found or rewritten.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use raft::eraftpb::EntryType;

use super::checkpoint::{read_meta, Meta};
use super::db::{open_writer, remove_wal_files, PAGE_SIZE};
use crate::entry::{Change, Frames};
use crate::error::{Error, Result};
use crate::fsutil::{check_db_name, with_suffix};
use crate::fsutil::{fsync_dir, write_atomic};

/// The directory of the current generation of databases under `root`, if there is one.
pub fn current_generation(root: &Path) -> Result<Option<PathBuf>> {
    let current = root.join("CURRENT");
    match fs::read_to_string(&current) {
        Ok(name) => Ok(Some(root.join(name.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&current, e)),
    }
}

/// Records `voters` and `learners` as the configuration at the current generation's
/// checkpoint (for disaster recovery, with the node stopped). Returns the new `meta.json`.
pub fn rewrite_checkpoint_conf(root: &Path, voters: Vec<u64>, learners: Vec<u64>) -> Result<Meta> {
    let gen = current_generation(root)?
        .ok_or_else(|| Error::Corrupt(format!("{}: no CURRENT generation", root.display())))?;
    let mut meta = read_meta(&gen)?;
    meta.voters = voters;
    meta.learners = learners;
    meta.checkpoint_target = 0;
    write_atomic(&gen.join("meta.json"), &serde_json::to_vec(&meta).unwrap())?;
    super::target::clear(&gen)?;
    Ok(meta)
}

/// Brings the database files of the current generation up to the last committed entry the
/// log holds, by writing the entries' pages straight into the files, before SQLite opens
/// them (I9).
///
/// After a crash in the middle of a checkpoint the files mix pages of several states; SQLite
/// must not read them until they are whole again, so this replay does not go through it.
/// Writing every page of every entry from the checkpoint index on, in log order, and
/// truncating each file to its entry's size rebuilds exactly the state of the last entry.
/// Returns the index the files now hold.
pub fn recover_files(root: &Path, log: &crate::log::RaftLog) -> Result<u64> {
    let Some(gen) = current_generation(root)? else {
        return Ok(0);
    };
    let mut meta = read_meta(&gen)?;
    // Older nodes recorded the target in meta.json; this one in its own record (target.rs).
    let target = meta.checkpoint_target.max(super::target::read(&gen)?);
    let upto = log.hard_state().commit.max(target).min(log.last_index());
    if upto <= meta.checkpoint_index {
        return Ok(meta.checkpoint_index);
    }
    let started = Instant::now();
    let mut files: HashMap<String, File> = HashMap::new();
    let mut last_term = meta.checkpoint_term;
    let mut next = meta.checkpoint_index + 1;
    while next <= upto {
        let entries = log
            .entries(next, upto + 1, Some(8 << 20))
            .map_err(|e| Error::Corrupt(format!("replaying the log from {next}: {e}")))?;
        for e in entries {
            next = e.index + 1;
            last_term = e.term;
            if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
                continue;
            }
            let f = Frames::decode(e.data.clone())
                .map_err(|err| Error::Corrupt(format!("entry {}: {err}", e.index)))?;
            check_db_name(&f.db)?;
            let path = gen.join(format!("{}.db", f.db));
            if !files.contains_key(&f.db) {
                files.insert(f.db.clone(), open_for_replay(&path)?);
            }
            let file = &files[&f.db];
            // Entries up to an interrupted checkpoint's target may find pages the checkpoint
            // already carried further: their ranges are written as they are (entry.rs: a
            // replay over mixed versions ends at the last one). From there on every page is
            // exactly its entry's base, and each one is checked against the entry's crc32.
            let mixed = e.index <= target;
            let size = f.page_size as usize;
            for c in &f.pages {
                let at = (c.pgno as u64 - 1) * f.page_size as u64;
                let io = |e| Error::io(&path, e);
                match &c.change {
                    Change::Ranges(rs) if mixed => {
                        for r in rs {
                            file.write_all_at(&r.data, at + r.offset as u64)
                                .map_err(io)?;
                        }
                    }
                    change => {
                        let base = match change {
                            Change::Image(_) => None,
                            Change::Ranges(_) => read_file_page(file, at, size).map_err(io)?,
                        };
                        let page = c.apply_to(base.as_deref(), size).map_err(|x| {
                            Error::Corrupt(format!(
                                "replaying entry {} into {}: {x}",
                                e.index, f.db
                            ))
                        })?;
                        file.write_all_at(&page, at).map_err(io)?;
                    }
                }
            }
            file.set_len(f.db_pages as u64 * f.page_size as u64)
                .map_err(|e| Error::io(&path, e))?;
        }
    }
    for (name, f) in &files {
        f.sync_all()
            .map_err(|e| Error::io(gen.join(format!("{name}.db")), e))?;
    }
    fsync_dir(&gen)?;
    meta.checkpoint_index = upto;
    meta.checkpoint_term = last_term;
    meta.checkpoint_target = 0;
    write_atomic(&gen.join("meta.json"), &serde_json::to_vec(&meta).unwrap())?;
    tracing::info!(
        "replayed the log into the database files up to index {upto} in {:?}",
        started.elapsed()
    );
    Ok(upto)
}

/// Opens a database file for the replay, first making whole what a crash may have left of
/// its creation.
///
/// A database's first entry is diffed against the page 1 SQLite writes when `open_writer`
/// creates the file (the header with the page size and WAL mode, identical on every node),
/// and no entry carries that page. SQLite writes it through a rollback journal, so a crash
/// before or while it does leaves no file, an empty one, or page 1 beside a journal that is
/// hot (SQLite would roll the file back to 0 pages when it next opens it, after this replay).
/// The journal is dropped (raftsql databases are in WAL mode from their creation on, so a
/// rollback journal can only be that one) and a file shorter than a page is created again
/// the same way, which gives that page back.
fn open_for_replay(path: &Path) -> Result<File> {
    remove_wal_files(path);
    let journal = with_suffix(path, "-journal");
    match fs::remove_file(&journal) {
        Ok(()) => tracing::info!(
            "dropped {}, left by a crash while SQLite created the file",
            journal.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&journal, e)),
    }
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(Error::io(path, e)),
    };
    if len < PAGE_SIZE as u64 {
        if len > 0 {
            fs::remove_file(path).map_err(|e| Error::io(path, e))?;
        }
        crate::vfs::register().map_err(Error::Internal)?;
        drop(open_writer(path)?);
        remove_wal_files(path);
        tracing::info!(
            "created {} again: a crash had left {len} bytes of it",
            path.display()
        );
    }
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// The page of `size` bytes at `at` in a database file: `None` past its end, zeros past the
/// end of a page the file holds only in part.
fn read_file_page(file: &File, at: u64, size: usize) -> std::io::Result<Option<Vec<u8>>> {
    let len = file.metadata()?.len();
    if at >= len {
        return Ok(None);
    }
    let mut page = vec![0u8; size];
    let have = ((len - at) as usize).min(size);
    file.read_exact_at(&mut page[..have], at)?;
    Ok(Some(page))
}
