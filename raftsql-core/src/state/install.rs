//! The state machine's side of snapshots: asking for one to be built at the checkpoint, and
//! installing a received one as a new generation.

use std::fs::{self, File};
use std::path::Path;
use std::sync::atomic::Ordering;

use raft::eraftpb::SnapshotMetadata;

use super::checkpoint::{failpoint_err, Meta};
use super::StateMachine;
use crate::error::{Error, Result};
use crate::fsutil::{fsync_dir, write_atomic};
use crate::vfs;

impl StateMachine {
    /// Pins every database at the applied index and hands them to the snapshot writer. If
    /// any database cannot be pinned the snapshot fails as a whole (a snapshot lacking a
    /// database would make a follower or a backup silently lack it).
    pub(super) fn make_snapshot(&mut self) {
        let index = self.applied();
        let term = self.applied_term;
        let mut pinned = Vec::new();
        for (name, db) in &self.dbs {
            let r = failpoint_err("snapshot-pin", name)
                .and_then(|_| db.handle.pin())
                .map(|p| p.into_connection());
            match r {
                Ok(c) => pinned.push((name.clone(), c)),
                Err(e) => {
                    let why = format!("database {name} could not be pinned at index {index}: {e}");
                    tracing::error!("snapshot not built: {why}");
                    self.snapshots.build_failed(why);
                    return;
                }
            }
        }
        self.snapshots.build_in_background(index, term, pinned);
    }

    /// Replaces all databases with a received snapshot, atomically and durably.
    pub(super) fn install_snapshot(&mut self, meta: &SnapshotMetadata, dir: &Path) -> Result<()> {
        // A checkpoint still fsyncing the old generation's files finishes first: its
        // meta.json write must not land after the new generation's.
        if let Err(e) = self.finish_checkpoint(true) {
            tracing::warn!("checkpoint failed before a snapshot install: {e}");
        }
        self.abort_in_flight(Error::OutcomeUnknown);
        self.rollback_tx();
        let gen_name = format!("gen-{}-{}", meta.index, rand::random::<u32>());
        let gen = self.root.join(&gen_name);
        fs::create_dir_all(&gen).map_err(|e| Error::io(&gen, e))?;
        for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) == Some("db") {
                let to = gen.join(p.file_name().unwrap());
                fs::rename(&p, &to).map_err(|e| Error::io(&p, e))?;
                File::open(&to)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io(&to, e))?;
            }
        }
        let cs = meta.get_conf_state();
        let new_meta = Meta {
            checkpoint_index: meta.index,
            checkpoint_term: meta.term,
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            checkpoint_target: 0,
        };
        write_atomic(
            &gen.join("meta.json"),
            &serde_json::to_vec(&new_meta).unwrap(),
        )?;
        fsync_dir(&gen)?;
        write_atomic(&self.root.join("CURRENT"), gen_name.as_bytes())?;
        // Switch: drop the old writers; readers holding old handles finish on the old files.
        let old = std::mem::replace(&mut self.gen_dir, gen);
        for (_, db) in self.dbs.drain() {
            vfs::forget(&db.handle.key);
        }
        self.meta = new_meta;
        self.target = 0;
        // The copy thread's connections are to the old files: it ends with them, and the
        // next checkpoint starts it again.
        self.copier = None;
        self.open_all()?;
        let _ = fs::remove_dir_all(&old);
        let _ = fs::remove_dir_all(dir);
        self.frames_since_checkpoint = 0;
        self.set_applied(meta.index, meta.term);
        self.progress.checkpoint.store(meta.index, Ordering::SeqCst);
        tracing::info!(
            "installed snapshot at index {} term {}",
            meta.index,
            meta.term
        );
        Ok(())
    }
}
