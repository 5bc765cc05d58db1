//! Phase 1 of a checkpoint: the WAL's committed frames copied into the database files on a
//! thread and connections of their own (`PRAGMA wal_checkpoint(PASSIVE)`), while the state
//! machine goes on executing, committing and applying. Phase 2 (`checkpoint.rs`, on the
//! state machine's writer) then copies only the frames written meanwhile and empties the
//! WAL; it is the checkpoint of before, with less left to copy. The copy used to stop the
//! state machine for ~15 ms, 6-7 times a second under 64 etcd put clients
//! (`docs/notes/checkpoint-copy.md`).
//!
//! # Invariants
//! - **P1, bounded by the target.** The copy never writes a page of an entry after the
//!   checkpoint target recorded before it starts (I9: recovery checks every page of a later
//!   entry against its base). The state machine pins a reader at that entry before the
//!   copy starts ([`super::db::DbHandle::pin`]); SQLite never backfills past a frame a
//!   reader still holds a read mark on, and copies nothing while a reader holds read slot 0.
//! - **P2, never a speculative header.** SQLite bounds a checkpoint by the wal-index header
//!   it reads when it starts (its `mxPage`, and the database file's size it truncates to).
//!   That read happens with the database's read gate entered (`vfs::with_header_pin`), so
//!   it is never the header of a leader's speculative COMMIT (the gate is closed from COMMIT
//!   to the rewind).
//! - **P3, one checkpoint at a time.** Phase 2 starts only once the copy has answered
//!   (`StateMachine::maybe_checkpoint`), snapshot installs and shutdown wait for it
//!   (`StateMachine::finish_checkpoint`); SQLite's checkpoint lock would refuse a second
//!   one anyway.
//!
//! The copy writes only pages that are in the WAL, with their committed bytes, so a read of
//! the database file for a page that is not in the WAL (`vfs::read_committed_page`) sees
//! the same bytes before and after it. A failed copy leaves phase 2 the whole WAL to copy.
//!
//! Tests: `passive_copy::tests::a_copy_started_during_a_speculative_commit_copies_only_committed_pages`
//! (P2), `..._stops_at_the_pinned_reader` (P1),
//! `crash::a_crash_after_the_passive_copy_recovers_exactly` (a crash between the phases).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use rusqlite::Connection;

use super::db::{open_read_write, DbHandle, Pinned};
use crate::error::{Error, Result};
use crate::vfs;

/// One database's part of a copy: its handle and the reader pinned at the target.
pub(super) struct CopyJob {
    pub(super) handle: Arc<DbHandle>,
    pub(super) pin: Pinned,
}

/// A round of the copy: record `target` in generation `gen`, then copy every job's
/// database; the answer is how many frames are in the files afterwards (the pins are
/// dropped by then).
struct CopyRound {
    gen: PathBuf,
    target: u64,
    jobs: Vec<CopyJob>,
    done: Sender<Result<u64>>,
}

/// The thread `raftsql-ckcopy`, started with the first checkpoint and kept for the node's
/// life: it keeps one connection per database between rounds (and closes those of
/// databases a round no longer names, after a snapshot install), instead of a new thread
/// and new connections 6-7 times a second.
pub(super) struct CopyThread {
    tx: Option<Sender<CopyRound>>,
    join: Option<JoinHandle<()>>,
}

impl CopyThread {
    pub(super) fn start() -> Result<CopyThread> {
        let (tx, rx) = mpsc::channel::<CopyRound>();
        let join = std::thread::Builder::new()
            .name("raftsql-ckcopy".into())
            .spawn(move || {
                let mut copiers: HashMap<PathBuf, Copier> = HashMap::new();
                while let Ok(round) = rx.recv() {
                    copiers.retain(|p, _| round.jobs.iter().any(|j| &j.handle.path == p));
                    let _ = round.done.send(run_round(
                        &mut copiers,
                        round.gen,
                        round.target,
                        round.jobs,
                    ));
                }
            })
            .map_err(|e| Error::Internal(format!("no thread for the checkpoint's copy: {e}")))?;
        Ok(CopyThread {
            tx: Some(tx),
            join: Some(join),
        })
    }

    /// Starts a round; the receiver gets its answer.
    pub(super) fn round(
        &self,
        gen: &Path,
        target: u64,
        jobs: Vec<CopyJob>,
    ) -> Result<Receiver<Result<u64>>> {
        let (done, rx) = mpsc::channel();
        let round = CopyRound {
            gen: gen.to_path_buf(),
            target,
            jobs,
            done,
        };
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(round).ok())
            .ok_or_else(|| Error::Internal("the checkpoint's copy thread has stopped".into()))?;
        Ok(rx)
    }
}

impl Drop for CopyThread {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// One round on the copy thread: the target first (P1), then each database's copy.
fn run_round(
    copiers: &mut HashMap<PathBuf, Copier>,
    gen: PathBuf,
    target: u64,
    jobs: Vec<CopyJob>,
) -> Result<u64> {
    super::target::write(&gen, target)?;
    let mut frames = 0;
    let mut out = Ok(());
    for job in jobs {
        let copier = match copiers.entry(job.handle.path.clone()) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => Copier::open(&job.handle).map(|c| e.insert(c)),
        };
        match copier.and_then(|c| c.run()) {
            Ok(n) => frames += n,
            Err(e) => {
                // A connection that failed is opened again next time.
                copiers.remove(&job.handle.path);
                out = Err(e);
            }
        }
        drop(job.pin);
    }
    if frames > 0 {
        super::checkpoint::failpoint("checkpoint-after-copy");
    }
    out.map(|_| frames)
}

/// A connection ready to checkpoint one database.
pub(super) struct Copier {
    handle: Arc<DbHandle>,
    conn: Connection,
}

impl Copier {
    const SQL: &'static str = "PRAGMA wal_checkpoint(PASSIVE)";

    /// Opens the connection and its WAL, and prepares the checkpoint.
    pub(super) fn open(handle: &Arc<DbHandle>) -> Result<Copier> {
        // Like the writer: no checkpoint on close, never wait for a lock, no fsync here
        // (the checkpoint's fsyncs follow phase 2).
        let c = open_read_write(&handle.path, false)?;
        c.busy_timeout(std::time::Duration::ZERO)?;
        // The first statement loads the schema and opens the WAL, which reads its header:
        // through the gate, like any reader.
        handle.gate.enter();
        let opened = c
            .execute_batch("PRAGMA synchronous=OFF")
            .and_then(|_| c.prepare_cached(Self::SQL).map(drop));
        handle.gate.leave();
        opened?;
        Ok(Copier {
            handle: handle.clone(),
            conn: c,
        })
    }

    /// Runs the checkpoint, its header read behind the gate (P2); returns how many frames of
    /// the WAL are in the database file afterwards.
    pub(super) fn run(&self) -> Result<u64> {
        // Crash tests: the process aborts in the middle of a copy, after its second page
        // write, so that the file holds some of the copy's pages and not the others.
        const MID_COPY: &str = "checkpoint-mid-copy";
        let torn = std::env::var("RAFTSQL_CRASH_AT").is_ok_and(|v| v == MID_COPY);
        if torn {
            vfs::abort_after_writes(Some((2, MID_COPY)));
        }
        let r = self.copy();
        if torn {
            vfs::abort_after_writes(None);
        }
        r
    }

    fn copy(&self) -> Result<u64> {
        let mut st = self.conn.prepare_cached(Self::SQL)?;
        let h = self.handle.clone();
        let r = vfs::with_header_pin(
            move |take| {
                if take {
                    h.gate.enter()
                } else {
                    h.gate.leave()
                }
            },
            || st.query_row([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(2)?))),
        );
        let (_busy, done) = r?;
        Ok(done.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A passive checkpoint of one database on a connection of its own; returns how many
    /// frames of the WAL are in the database file afterwards.
    fn copy(handle: &Arc<DbHandle>) -> Result<u64> {
        Copier::open(handle)?.run()
    }
    use crate::state::db::{open_writer, remove_wal_files};

    fn handle(dir: &std::path::Path) -> (Arc<DbHandle>, Connection) {
        vfs::register().unwrap();
        let path = dir.join("main.db");
        remove_wal_files(&path);
        let w = open_writer(&path).unwrap();
        (Arc::new(DbHandle::new("main", path)), w)
    }

    /// Inserts rows `keys` of 500 random bytes into `t`, one statement each.
    fn insert_rows(w: &Connection, keys: std::ops::RangeInclusive<i64>) {
        for k in keys {
            w.execute("INSERT INTO t VALUES (?1, randomblob(500))", [k])
                .unwrap();
        }
    }

    /// Rows of `t` in the database file alone, as a fresh copy of it without its WAL sees.
    fn rows_in_file(h: &DbHandle, dir: &std::path::Path) -> i64 {
        let copy = dir.join("copy.db");
        std::fs::copy(&h.path, &copy).unwrap();
        let c = Connection::open(&copy).unwrap();
        c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    /// P2: a copy whose header read falls inside a leader's speculative COMMIT (gate closed,
    /// header counting frames that may never commit) waits for the gate, and copies only
    /// what the rewound header holds.
    #[test]
    fn a_copy_started_during_a_speculative_commit_copies_only_committed_pages() {
        let dir = tempfile::tempdir().unwrap();
        let (h, w) = handle(dir.path());
        w.execute_batch("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        insert_rows(&w, 1..=100);
        // The copy's connection is open (and has read the header once) before the commit.
        let copier = Copier::open(&h).unwrap();
        // The leader's speculative COMMIT: the gate closed, the header saved, 100 more rows
        // committed by SQLite (they double the database), not yet rewound.
        let saved = vfs::save_header(&h.key).unwrap();
        h.gate.close();
        w.execute_batch("BEGIN IMMEDIATE").unwrap();
        insert_rows(&w, 101..=200);
        w.execute_batch("COMMIT").unwrap();
        let copier = std::thread::spawn(move || copier.run());
        // With the gate the copy waits there once it holds the checkpoint lock; without it,
        // it would copy the speculative frames and end.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while h.gate.waiting() == 0 && !copier.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "the copy never reached the gate"
            );
            std::thread::yield_now();
        }
        // The rewind: the frames vanish, then the gate opens.
        assert!(vfs::restore_header(&h.key, &saved));
        h.gate.open();
        let done = copier.join().unwrap().unwrap();
        assert!(done > 0, "the committed frames were not copied");
        assert_eq!(
            rows_in_file(&h, dir.path()),
            100,
            "the copy wrote the speculative COMMIT's pages"
        );
    }

    /// The database file's pages.
    fn file_pages(h: &DbHandle) -> Vec<Vec<u8>> {
        std::fs::read(&h.path)
            .unwrap()
            .chunks(4096)
            .map(|c| c.to_vec())
            .collect()
    }

    /// The pages of the state `c` sees.
    fn pages_of(c: &Connection) -> Vec<Vec<u8>> {
        let mut st = c
            .prepare("SELECT data FROM sqlite_dbpage ORDER BY pgno")
            .unwrap();
        let rows = st.query_map([], |r| r.get(0)).unwrap();
        rows.map(|r| r.unwrap()).collect()
    }

    /// P1: a copy never writes a page of a state after the one a pinned reader holds. (After
    /// a partial copy the file alone is no consistent state: SQLite copies each page's
    /// newest frame only when that frame is within its bound, so every page of the file is
    /// either what it was, what the pinned state holds, or zeros past the file's old end.)
    #[test]
    fn a_copy_stops_at_the_pinned_reader() {
        let dir = tempfile::tempdir().unwrap();
        let (h, w) = handle(dir.path());
        w.execute_batch("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        w.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        insert_rows(&w, 1..=200);
        let at_pin = pages_of(&w);
        let pin = h.pin().unwrap();
        // The first 100 rows change after the pin: their pages' newest frames are past it.
        w.execute("UPDATE t SET v = randomblob(500) WHERE k <= 100", [])
            .unwrap();
        let before = file_pages(&h);
        copy(&h).unwrap();
        let after = file_pages(&h);
        let mut copied = 0;
        for (i, page) in after.iter().enumerate() {
            let (was, pinned) = (before.get(i), at_pin.get(i));
            // SQLite first extends the file to the size of the state it copies.
            let grown = was.is_none() && page.iter().all(|b| *b == 0);
            assert!(
                Some(page) == was || Some(page) == pinned || grown,
                "page {} of the file is neither what it was nor the pinned state's",
                i + 1
            );
            copied += (Some(page) != was && !grown) as usize;
        }
        assert!(copied > 0, "the copy wrote nothing");
        drop(pin);
        copy(&h).unwrap();
        assert_eq!(rows_in_file(&h, dir.path()), 200);
    }
}
