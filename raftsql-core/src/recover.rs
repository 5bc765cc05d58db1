//! Disaster recovery when a quorum is lost for good (`raftsql recover`).
//!
//! When most voters are gone and will not come back, Raft can make no progress: no write
//! commits, no leader is elected. Recovery turns one surviving node, stopped, into the sole
//! voter of its cluster, keeping exactly the state it knows to be committed:
//!
//! 1. the database files are brought up to the node's commit index (the same replay a restart
//!    does, `state::recover_files`);
//! 2. the Raft log is reset to that point ([`RaftLog::reset_for_recovery`]): entries after
//!    the commit index are dropped, because this node cannot know whether they committed
//!    (etcd's `--force-new-cluster` drops them too), and the configuration becomes
//!    `voters = [this node]`;
//! 3. the checkpoint's configuration in `meta.json` says the same, the member registry keeps
//!    only this node, join tokens are dropped, and outgoing snapshots (made for the old
//!    configuration) are deleted.
//!
//! Invariant: recovery never invents state. The databases afterwards hold exactly the
//! entries up to the node's commit index, which a quorum of the old cluster had acknowledged.
//! Acknowledged writes that this node had not yet learned were committed are lost, which is
//! why recovery should run on the survivor with the highest commit index (`--dry-run` prints
//! it on each one without changing anything).
//!
//! The other survivors must not restart with their old data: their logs may hold entries the
//! recovered node dropped. They join again with a token, from empty data directories.

use std::path::{Path, PathBuf};

use raft::eraftpb::ConfState;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::log::RaftLog;
use crate::members::{read_registry_file, rewrite_registry_file, SYSTEM_DB};
use crate::node::{lock_data_dir, NodeFile};
use crate::state;
use raftsql_proto::v1 as pb;

/// What recovery found and did (or would do, with `dry_run`).
#[derive(Clone, Debug, Serialize)]
pub struct RecoveryReport {
    /// This node's id.
    pub id: u64,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The current term.
    pub term: u64,
    /// The commit index this node knew: the state it keeps.
    pub commit_index: u64,
    /// The last entry in its log.
    pub last_index: u64,
    /// Entries after the commit index, dropped (their outcome is unknown).
    pub dropped_entries: u64,
    /// Voters before.
    pub old_voters: Vec<u64>,
    /// Standbys (learners) before.
    pub old_learners: Vec<u64>,
    /// Voters after: this node alone.
    pub new_voters: Vec<u64>,
    /// Members removed from the registry (id and address).
    pub removed_members: Vec<(u64, String)>,
    /// Nothing was changed.
    pub dry_run: bool,
}

/// Makes the stopped node in `data_dir` the only voter of its cluster (see the module
/// documentation). With `dry_run`, only reports what it would do.
pub fn recover(data_dir: &Path, dry_run: bool) -> Result<RecoveryReport> {
    if !data_dir.join("node.json").exists() {
        return Err(Error::Invalid(format!(
            "{} is not a raftsql data directory (no node.json)",
            data_dir.display()
        )));
    }
    let _lock = lock_data_dir(data_dir)?;
    let mut nf = NodeFile::load(data_dir)?;
    if nf.left {
        return Err(Error::Invalid(format!(
            "node {} left the cluster; its data cannot be recovered into a cluster",
            nf.id
        )));
    }
    let mut log = RaftLog::open(&data_dir.join("raft"))?;
    if !log.is_initialized() {
        return Err(Error::Invalid(format!(
            "node {} never joined a cluster (its Raft log is empty): nothing to recover",
            nf.id
        )));
    }
    let state_root = data_dir.join("state");
    let hs = log.hard_state().clone();
    let cs = log.conf_state().clone();
    let last_index = log.last_index();
    let mut report = RecoveryReport {
        id: nf.id,
        data_dir: data_dir.to_path_buf(),
        term: hs.term,
        commit_index: hs.commit,
        last_index,
        dropped_entries: last_index.saturating_sub(hs.commit),
        old_voters: cs.voters.clone(),
        old_learners: cs.learners.clone(),
        new_voters: vec![nf.id],
        removed_members: Vec::new(),
        dry_run,
    };
    let gen = state::current_generation(&state_root)?;
    let registry = gen.as_ref().map(|g| g.join(format!("{SYSTEM_DB}.db")));
    let me = nf.id;
    let others = |ms: Vec<pb::Member>| -> Vec<(u64, String)> {
        ms.into_iter()
            .filter(|m| m.id != me)
            .map(|m| (m.id, m.addr))
            .collect()
    };
    if dry_run {
        if let Some(p) = &registry {
            report.removed_members = others(read_registry_file(p)?);
        }
        return Ok(report);
    }
    // 1. The databases up to the commit index (what a restart would replay).
    let upto = state::recover_files(&state_root, &log)?;
    let commit = upto.max(hs.commit);
    let term = log.term(commit).map_err(|e| {
        Error::Corrupt(format!(
            "the term of the commit index {commit} is unknown: {e}"
        ))
    })?;
    report.commit_index = commit;
    report.dropped_entries = last_index.saturating_sub(commit);
    // 2. The log: base at the commit index, this node the only voter.
    let new_cs = ConfState {
        voters: vec![nf.id],
        ..Default::default()
    };
    log.reset_for_recovery(commit, term, new_cs)?;
    // 3. The checkpoint's configuration, the registry, old snapshots, the peer list.
    state::rewrite_checkpoint_conf(&state_root, vec![nf.id], Vec::new())?;
    if let Some(p) = &registry {
        let retire: Vec<u64> = cs
            .voters
            .iter()
            .chain(cs.learners.iter())
            .copied()
            .collect();
        let event = raftsql_proto::v1::ClusterEvent {
            node: me,
            kind: "role".into(),
            from_role: "voter".into(),
            to_role: "voter".into(),
            reason: format!(
                "raftsql recover: the only voter after the quorum was lost (commit index {commit})"
            ),
            ..Default::default()
        };
        report.removed_members = others(rewrite_registry_file(p, Some(me), &retire, event)?);
    }
    let snaps = data_dir.join("snapshots");
    if snaps.exists() {
        std::fs::remove_dir_all(&snaps).map_err(|e| Error::io(&snaps, e))?;
    }
    nf.peers.retain(|id, _| *id == nf.id);
    nf.store(data_dir)?;
    tracing::info!(
        "recovered node {} as the only voter at index {commit} (term {term})",
        nf.id
    );
    Ok(report)
}
