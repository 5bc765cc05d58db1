//! Checkpoints: the WAL copied into the database files, the files fsynced on a thread of
//! their own, and only then the checkpoint index C recorded in `meta.json` (I9).
//!
//! A checkpoint has three steps, and the state machine thread only starts and ends them:
//! 1. the passive copy of the committed frames, on a thread (`passive_copy.rs`);
//! 2. on this thread, `wal_checkpoint(TRUNCATE)` on the writer: the frames written during
//!    step 1, then the WAL emptied;
//! 3. the files fsynced on a thread, then C recorded.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::msg::SmToRaft;
use super::passive_copy::{CopyJob, CopyThread};
use super::target;
use super::StateMachine;
use crate::error::{Error, Result};
use crate::fsutil::{fsync_dir, write_atomic};

/// When a reader still needs older frames, the checkpoint is tried again after this.
const CHECKPOINT_RETRY: Duration = Duration::from_millis(100);

/// A copy round that leaves more frames than this written meanwhile is followed by another
/// one, up to [`COPY_ROUNDS`], so that phase 2, which stops the state machine, has only a
/// few left to copy (a frame takes ~5 us to copy under load; a round of 4,000 took 20-30 ms
/// under 64 etcd put clients, and phase 2 after it 4-8 ms).
const COPY_AGAIN_FRAMES: u64 = 256;
/// At most this many copy rounds per checkpoint.
const COPY_ROUNDS: u32 = 3;

/// What `meta.json` records about a generation.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    /// Every database file holds exactly the entries up to this index.
    pub checkpoint_index: u64,
    /// Term of that entry.
    pub checkpoint_term: u64,
    /// Voters at that index.
    pub voters: Vec<u64>,
    /// Learners at that index.
    pub learners: Vec<u64>,
    /// A checkpoint to this index was started: the database files may hold pages of entries
    /// up to it (recovery replays at least that far before SQLite opens them). Read for data
    /// directories of older versions; the target now has a record of its own (target.rs).
    #[serde(default)]
    pub checkpoint_target: u64,
}

pub(super) fn read_meta(gen: &Path) -> Result<Meta> {
    let p = gen.join("meta.json");
    let mut s = String::new();
    File::open(&p)
        .and_then(|mut f| f.read_to_string(&mut s))
        .map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&s).map_err(|e| Error::Corrupt(format!("{}: {e}", p.display())))
}

/// A checkpoint whose first phase, the passive copy, runs on a thread of its own.
pub(super) struct Copying {
    started: Instant,
    /// How long the state machine stopped to start it.
    stalled: Duration,
    /// The target the copy records before it copies.
    target: u64,
    /// Which round of the copy this is (1, 2, ...).
    round: u32,
    /// `frames_since_checkpoint` when this round's readers were pinned.
    frames_at_pin: u64,
    /// How many frames the copy left in the database files, or why it failed.
    done: Receiver<Result<u64>>,
}

/// A checkpoint whose copy is done, waiting for the fsyncs of its files.
pub(super) struct Syncing {
    /// Its index and term: the checkpoint index and term once the files are durable.
    applied: u64,
    term: u64,
    started: Instant,
    done: Receiver<Result<()>>,
}

/// fsyncs each database file, then their directory.
fn sync_files(files: &[PathBuf], dir: &Path) -> Result<()> {
    for f in files {
        File::open(f)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(f, e))?;
    }
    fsync_dir(dir)
}

impl StateMachine {
    /// Checkpoints every database into its file and advances C (I9): starts the passive
    /// copy when the WAL has grown enough, and runs the second phase once it is done. Called
    /// only with no interactive transaction open (phase 2 needs the writer).
    pub(super) fn maybe_checkpoint(&mut self) -> Result<()> {
        if let Some(c) = &self.copying {
            let r = match c.done.try_recv() {
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => Err(Error::Internal(
                    "the checkpoint's copy thread ended without an answer".into(),
                )),
                Ok(r) => r,
            };
            let c = self.copying.take().unwrap();
            let written = self.frames_since_checkpoint - c.frames_at_pin;
            match r {
                Ok(frames) => {
                    self.target = c.target;
                    tracing::debug!(
                        "checkpoint copy round {}: {frames} frames in the files after {:?}, \
                         {written} written since",
                        c.round,
                        c.started.elapsed()
                    );
                    if written > COPY_AGAIN_FRAMES && c.round < COPY_ROUNDS {
                        return self.start_copy(c.started, c.stalled, c.round + 1);
                    }
                }
                // Phase 2 copies it all, as a checkpoint did before it had two phases, and
                // records the target itself (the copy may have failed to).
                Err(e) => {
                    tracing::warn!("the checkpoint's passive copy failed: {e}");
                    self.target = 0;
                }
            }
            return self.checkpoint(c.started, c.stalled);
        }
        if let Some(started) = self.truncate_again {
            // Phase 2 found readers on older frames: only phase 2 is tried again.
            if Instant::now() < self.next_checkpoint {
                return Ok(());
            }
            self.truncate_again = None;
            return self.checkpoint(started, Duration::ZERO);
        }
        if self.syncing.is_some()
            || self.frames_since_checkpoint < self.settings.checkpoint_frames
            || Instant::now() < self.next_checkpoint
        {
            return Ok(());
        }
        self.start_copy(Instant::now(), Duration::ZERO, 1)
    }

    /// Pins a reader of each database at the applied entry and starts a round of the passive
    /// copy, which records that entry as the target first (passive_copy.rs, P1). Without a
    /// pin or a thread, phase 2 does the whole copy. `started`: the checkpoint's start;
    /// `stalled`: how long this thread already stopped for it.
    fn start_copy(&mut self, started: Instant, stalled: Duration, round: u32) -> Result<()> {
        let applied = self.applied();
        if applied <= self.meta.checkpoint_index {
            return Ok(());
        }
        let stall = Instant::now();
        let stalled = move || stalled + stall.elapsed();
        match self.send_round(applied) {
            Ok(done) => {
                self.copying = Some(Copying {
                    target: applied,
                    started,
                    stalled: stalled(),
                    round,
                    frames_at_pin: self.frames_since_checkpoint,
                    done,
                });
                Ok(())
            }
            Err(e) => {
                // The pins taken are dropped by now.
                tracing::warn!("checkpoint copy not started: {e}");
                self.checkpoint(started, stalled())
            }
        }
    }

    /// Pins every database at `applied` and hands them to the copy thread (started with
    /// the first round), which records `applied` as the target before it copies (P1): its
    /// fsync need not stop this thread.
    fn send_round(&mut self, applied: u64) -> Result<Receiver<Result<u64>>> {
        let jobs =
            self.dbs
                .values()
                .map(|db| {
                    let pin = db.handle.pin().map_err(|e| {
                        Error::Internal(format!("database {}: {e}", db.handle.name))
                    })?;
                    Ok(CopyJob {
                        handle: db.handle.clone(),
                        pin,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
        if self.copier.is_none() {
            self.copier = Some(CopyThread::start()?);
        }
        self.copier
            .as_ref()
            .expect("started above")
            .round(&self.gen_dir, applied, jobs)
    }

    /// Records that the database files may hold pages of entries up to `applied`
    /// (recovery replays at least that far), before anything copies them there.
    fn record_target(&mut self, applied: u64) -> Result<()> {
        if self.target != applied {
            target::write(&self.gen_dir, applied)?;
            self.target = applied;
        }
        Ok(())
    }

    /// Phase 2 of a checkpoint of every database: records its target, has SQLite copy what
    /// is left of the WAL into each database file and empty the WAL, and leaves the fsyncs
    /// of the files to a thread of their own ([`StateMachine::finish_checkpoint`] records
    /// the checkpoint index once they are done). Writes and applies go on during the
    /// fsyncs. Nothing else writes the database files meanwhile: the next checkpoint waits
    /// for this one.
    /// `stalled`: how long this thread already stopped for the checkpoint (phase 1's start).
    fn checkpoint(&mut self, started: Instant, stalled: Duration) -> Result<()> {
        let applied = self.applied();
        if applied <= self.meta.checkpoint_index || self.syncing.is_some() {
            return Ok(());
        }
        let stall = Instant::now();
        let observe = |s: &Self| {
            s.settings
                .metrics
                .checkpoint_stall
                .observe((stalled + stall.elapsed()).as_secs_f64())
        };
        // Record the target first: once SQLite starts copying, the files hold pages of
        // entries up to `applied`, and recovery must replay at least that far.
        self.record_target(applied)?;
        for db in self.dbs.values() {
            let (busy, log, done): (i64, i64, i64) =
                db.writer
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?;
            // Complete once every frame is in the database file, even if readers kept
            // SQLite from resetting the WAL (`busy`): C only needs the file to hold it all.
            let _ = busy;
            if log > 0 && done < log {
                // A reader still needs older frames; try again later.
                self.next_checkpoint = Instant::now() + CHECKPOINT_RETRY;
                self.truncate_again = Some(started);
                observe(self);
                return Ok(());
            }
        }
        observe(self);
        self.frames_since_checkpoint = 0;
        let files: Vec<PathBuf> = self.dbs.values().map(|d| d.handle.path.clone()).collect();
        let dir = self.gen_dir.clone();
        let (tx, done) = mpsc::channel();
        let sync = move || {
            let r = sync_files(&files, &dir);
            if r.is_ok() {
                failpoint("checkpoint-before-meta");
            }
            let _ = tx.send(r);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("raftsql-ckpt".into())
            .spawn(sync)
        {
            // No thread to be had: the next checkpoint starts at once and fsyncs it all.
            self.frames_since_checkpoint = self.settings.checkpoint_frames;
            return Err(Error::Internal(format!(
                "no thread for the checkpoint's fsyncs: {e}"
            )));
        }
        self.syncing = Some(Syncing {
            applied,
            term: self.applied_term,
            started,
            done,
        });
        Ok(())
    }

    /// Records the checkpoint index of a checkpoint whose fsyncs are done (`wait`: waits for
    /// them), and lets the Raft log be compacted up to it. If they failed, the next
    /// checkpoint starts at once and fsyncs everything again.
    pub(super) fn finish_checkpoint(&mut self, wait: bool) -> Result<()> {
        if wait {
            // Nothing may write the files after this (a snapshot install, a shutdown): a
            // copy still running ends first, and its phase 2 is not run.
            if let Some(c) = self.copying.take() {
                let _ = c.done.recv();
            }
        }
        let Some(s) = &self.syncing else {
            return Ok(());
        };
        let r = if wait {
            s.done.recv().map_err(|_| TryRecvError::Disconnected)
        } else {
            s.done.try_recv()
        };
        let r = match r {
            Err(TryRecvError::Empty) => return Ok(()),
            Err(TryRecvError::Disconnected) => Err(Error::Internal(
                "the checkpoint's fsync thread ended without an answer".into(),
            )),
            Ok(r) => r,
        };
        let s = self.syncing.take().unwrap();
        if let Err(e) = r {
            self.frames_since_checkpoint = self.settings.checkpoint_frames;
            return Err(e);
        }
        let applied = s.applied;
        self.meta.checkpoint_index = applied;
        self.meta.checkpoint_term = s.term;
        write_atomic(
            &self.gen_dir.join("meta.json"),
            &serde_json::to_vec(&self.meta).unwrap(),
        )?;
        self.settings
            .metrics
            .checkpoint
            .observe(s.started.elapsed().as_secs_f64());
        self.progress.checkpoint.store(applied, Ordering::SeqCst);
        self.raft.send(SmToRaft::Checkpointed(applied));
        tracing::debug!("checkpoint at index {applied}");
        Ok(())
    }
}

/// Crash-test hook: aborts the process at the named point when the environment variable
/// `RAFTSQL_CRASH_AT` names it (used by the crash tests; costs one env lookup).
pub(super) fn failpoint(name: &str) {
    if std::env::var("RAFTSQL_CRASH_AT").is_ok_and(|v| v == name) {
        eprintln!("raftsql: failpoint {name} reached: aborting");
        std::process::abort();
    }
}

/// Test hook: fails with an error at the named point for `what` when `RAFTSQL_FAIL_AT` is
/// `name:what` (used by the snapshot tests; costs one env lookup).
pub(super) fn failpoint_err(name: &str, what: &str) -> Result<()> {
    match std::env::var("RAFTSQL_FAIL_AT") {
        Ok(v) if v == format!("{name}:{what}") => Err(Error::Internal(format!(
            "failpoint {name}:{what} (RAFTSQL_FAIL_AT)"
        ))),
        _ => Ok(()),
    }
}
