//! The Raft thread: the RawNode loop (tick, step, propose, ready -> persist -> send ->
//! apply -> advance), read-index rounds, and the status it publishes.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, EntryType, Message};
use raft::{RawNode, StateRole};
use tokio::sync::{oneshot, watch};

use super::handle::{Leadership, RaftRole};
use super::{Shared, ToRaftThread};
use crate::error::{Error, Result};
use crate::log::LogStorage;
use crate::net::transport::Transport;
use crate::snapshot::Manifest;
use crate::state::{SmToRaft, ToStateMachine};

/// A read-index round no quorum has confirmed by then fails its readers (Unavailable).
const READ_ROUND_GIVE_UP: Duration = Duration::from_secs(5);
/// A read-index round not answered by then is issued again (its messages may be lost).
const READ_ROUND_REISSUE: Duration = Duration::from_millis(200);

/// One read-index round and the reads it serves.
struct ReadRound {
    waiters: Vec<ReadWaiter>,
    started: Instant,
    issued: Instant,
}

/// What waits for a read-index round.
enum ReadWaiter {
    /// A linearizable read: gets the read index, then waits to apply it.
    Index(oneshot::Sender<Result<u64>>),
    /// A write batch that changed nothing (a failed CAS, a read-only Txn or interactive
    /// transaction), executed on the leader's state at `base`: it is answered only once a
    /// quorum confirms this node still leads and no data entry committed after `base`
    /// (I7 in docs/ARCHITECTURE.md; a deposed leader that does not know it yet
    /// would otherwise answer from its old state).
    Confirm {
        base: u64,
        done: Box<dyn FnOnce(Result<()>) + Send>,
    },
}

impl ReadWaiter {
    fn gone(&self) -> bool {
        matches!(self, ReadWaiter::Index(tx) if tx.is_closed())
    }
    fn fail(self, e: Error) {
        match self {
            ReadWaiter::Index(tx) => {
                let _ = tx.send(Err(e));
            }
            ReadWaiter::Confirm { done, .. } => done(Err(e)),
        }
    }
}

pub(super) struct RaftDriver {
    raw: RawNode<LogStorage>,
    storage: LogStorage,
    rx: Receiver<ToRaftThread>,
    sm_tx: Sender<ToStateMachine>,
    transport: Arc<Transport>,
    shared: Arc<Shared>,
    /// Read-index rounds in flight: id -> (waiters, started, last issued).
    reads: HashMap<u64, ReadRound>,
    /// Reads that arrived since the last round was issued; they go in the next one.
    waiting_reads: Vec<ReadWaiter>,
    next_read: u64,
    /// Drawn at start: read contexts of this run of this node (see [`read_ctx`]).
    read_nonce: u64,
    compact_log_bytes: u64,
    /// Publishes who leads (read through `Shared::leadership`).
    leadership: watch::Sender<Leadership>,
}

/// The context of read-index round `round`: this node's id, the nonce of this run and the
/// round. The leader keys pending reads by context alone, and a follower matches answers by
/// it, so a bare counter (as it was) collides between nodes and across a restart: an answer
/// meant for round k of a previous run, or a heartbeat ack for another node's round k, could
/// complete this run's round k with an older index.
fn read_ctx(me: u64, nonce: u64, round: u64) -> Vec<u8> {
    [me, nonce, round]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect()
}

/// The round of a read context of this run of this node, if it is one.
fn read_round(ctx: &[u8], me: u64, nonce: u64) -> Option<u64> {
    let word = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            ctx.get(i * 8..i * 8 + 8)?.try_into().ok()?,
        ))
    };
    (ctx.len() == 24 && word(0)? == me && word(1)? == nonce).then_some(word(2)?)
}

impl RaftDriver {
    /// The driver of `raw`, stepped with what arrives on `rx`, applying through `sm_tx`.
    #[allow(clippy::too_many_arguments)] // the thread's own parts, each once
    pub(super) fn new(
        raw: RawNode<LogStorage>,
        storage: LogStorage,
        rx: Receiver<ToRaftThread>,
        sm_tx: Sender<ToStateMachine>,
        transport: Arc<Transport>,
        shared: Arc<Shared>,
        compact_log_bytes: u64,
        leadership: watch::Sender<Leadership>,
    ) -> RaftDriver {
        RaftDriver {
            raw,
            storage,
            rx,
            sm_tx,
            transport,
            shared,
            reads: HashMap::new(),
            waiting_reads: Vec::new(),
            next_read: 1,
            read_nonce: rand::random(),
            compact_log_bytes,
            leadership,
        }
    }

    pub(super) fn run(mut self, tick: Duration) {
        let mut next_tick = Instant::now() + tick;
        'outer: loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(m) => {
                    if !self.handle(m) {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while let Ok(m) = self.rx.try_recv() {
                if !self.handle(m) {
                    break 'outer;
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                // Ticks move `heard_leader` even when there is nothing to ready.
                self.publish_status();
                next_tick += tick;
                if next_tick < now {
                    next_tick = now + tick;
                }
                self.expire_reads();
            }
            self.issue_reads();
            let mut r = self.on_ready();
            if r.is_ok() && !self.waiting_reads.is_empty() && self.reads.is_empty() {
                // A round just finished with reads waiting: start the next one now.
                self.issue_reads();
                r = self.on_ready();
            }
            if let Err(e) = r {
                tracing::error!("raft thread failed, stopping the node: {e}");
                eprintln!("raftsql: fatal: {e}");
                std::process::exit(70);
            }
        }
        let _ = self.storage.write().sync();
    }

    fn handle(&mut self, m: ToRaftThread) -> bool {
        match m {
            ToRaftThread::Step(msg) => {
                let _ = self.raw.step(msg);
            }
            ToRaftThread::Sm(SmToRaft::Propose { data, seq, base }) => {
                // Only a leader proposes: raft-rs on a follower would forward the entry to
                // the new leader, which would append a batch executed on an old state after
                // its own batches (found by the Jepsen watch test: a leader handover left
                // an index entry without its row). Page images are only right on the state
                // they were computed on: also refuse a batch if the log already holds a data
                // entry after that state.
                if self.raw.raft.state != StateRole::Leader {
                    let _ = self.sm_tx.send(ToStateMachine::ProposalFailed(seq));
                } else if let Some(index) = self.data_entry_after(base) {
                    tracing::error!(
                        "refused to propose batch {seq}: it was executed on the state at index \
                         {base}, but the log holds data entry {index} after it (last index {})",
                        self.raw.raft.raft_log.last_index()
                    );
                    let _ = self.sm_tx.send(ToStateMachine::ProposalFailed(seq));
                } else if self.raw.propose(Vec::new(), data.to_vec()).is_err() {
                    let _ = self.sm_tx.send(ToStateMachine::ProposalFailed(seq));
                }
            }
            ToRaftThread::Sm(SmToRaft::Checkpointed(c)) => {
                let mut log = self.storage.write();
                if log.disk_bytes() > self.compact_log_bytes && c + 1 > log.first_index() {
                    match log.compact(c + 1) {
                        Ok(()) => {
                            self.shared
                                .snapshots
                                .log_changed(Some(log.first_index()), None);
                            tracing::info!("compacted the raft log up to index {c}");
                        }
                        Err(e) => tracing::warn!("log compaction failed: {e}"),
                    }
                }
            }
            ToRaftThread::ReadIndex(reply) => self.waiting_reads.push(ReadWaiter::Index(reply)),
            ToRaftThread::Sm(SmToRaft::Confirm { base, done }) => {
                self.waiting_reads.push(ReadWaiter::Confirm { base, done })
            }
            ToRaftThread::ConfChange(cc, reply) => {
                let r = if self.raw.raft.state != StateRole::Leader {
                    Err(Error::NotLeader {
                        leader_id: Some(self.raw.raft.leader_id).filter(|l| *l != 0),
                        leader_addr: None,
                    })
                } else if self.raw.raft.has_pending_conf() {
                    Err(Error::Unavailable(
                        "another configuration change is still being applied".into(),
                    ))
                } else {
                    self.raw
                        .propose_conf_change(Vec::new(), cc)
                        .map_err(|e| Error::Unavailable(format!("configuration change: {e}")))
                };
                let _ = reply.send(r);
            }
            ToRaftThread::TransferLeader(reply) => {
                let me = self.raw.raft.id;
                let r = if self.raw.raft.state != StateRole::Leader {
                    Err(Error::NotLeader {
                        leader_id: Some(self.raw.raft.leader_id).filter(|l| *l != 0),
                        leader_addr: None,
                    })
                } else {
                    let prs = self.raw.raft.prs();
                    let voters: Vec<u64> = prs.conf().voters().ids().iter().collect();
                    let best = voters
                        .into_iter()
                        .filter(|id| *id != me)
                        .filter_map(|id| prs.get(id).map(|p| (p.matched, id)))
                        .max();
                    match best {
                        Some((_, to)) => {
                            self.raw.transfer_leader(to);
                            Ok(to)
                        }
                        None => Err(Error::Unavailable(
                            "no other voter to hand leadership to".into(),
                        )),
                    }
                };
                let _ = reply.send(r);
            }
            ToRaftThread::Shutdown => return false,
        }
        true
    }

    /// Starts a read-index round for every read that arrived since the last round, if no
    /// round is in flight. One heartbeat round then serves many reads; each read is in a
    /// round issued after it arrived, so the index it gets is linearizable for it.
    fn issue_reads(&mut self) {
        if self.waiting_reads.is_empty() || !self.reads.is_empty() {
            return;
        }
        let id = self.next_read;
        self.next_read += 1;
        let now = Instant::now();
        let waiters = std::mem::take(&mut self.waiting_reads);
        self.reads.insert(
            id,
            ReadRound {
                waiters,
                started: now,
                issued: now,
            },
        );
        self.raw
            .read_index(read_ctx(self.raw.raft.id, self.read_nonce, id));
    }

    /// Gives up on rounds older than 5 s (the callers time out at 3 s) and re-issues the others
    /// every 200 ms: raft-rs silently drops a read index request while the leader has not
    /// committed an entry of its term yet, or while a follower knows no leader.
    fn expire_reads(&mut self) {
        let mut expired = Vec::new();
        self.reads.retain(|_, r| {
            r.waiters.retain(|w| !w.gone());
            let keep = !r.waiters.is_empty() && r.started.elapsed() < READ_ROUND_GIVE_UP;
            if !keep {
                expired.append(&mut r.waiters);
            }
            keep
        });
        for w in expired {
            w.fail(Error::Unavailable(format!(
                "no quorum confirmed this node's leadership within {READ_ROUND_GIVE_UP:?}"
            )));
        }
        for (id, r) in self.reads.iter_mut() {
            if r.issued.elapsed() >= READ_ROUND_REISSUE {
                r.issued = Instant::now();
                self.raw
                    .read_index(read_ctx(self.raw.raft.id, self.read_nonce, *id));
            }
        }
    }

    pub(super) fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            match m.write_to_bytes() {
                Ok(b) => self.transport.send(m.to, Bytes::from(b)),
                Err(e) => tracing::warn!("cannot encode raft message: {e}"),
            }
        }
    }

    fn apply_committed(&mut self, entries: Vec<raft::eraftpb::Entry>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        for e in &entries {
            let cs = match e.get_entry_type() {
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data)
                        .map_err(|x| Error::Corrupt(x.to_string()))?;
                    Some(self.raw.apply_conf_change(&cc)?)
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data)
                        .map_err(|x| Error::Corrupt(x.to_string()))?;
                    Some(self.raw.apply_conf_change(&cc)?)
                }
                EntryType::EntryNormal => None,
            };
            if let Some(cs) = cs {
                // Durable before the state machine sees the entry: once a checkpoint covers
                // it, a restart no longer replays it, so a configuration still sitting in the
                // log's write buffer would be lost to a kill -9 (a restarted standby came
                // back with no voters and failed with "removed all voters").
                let mut log = self.storage.write();
                log.set_conf_state(&cs)?;
                log.sync()?;
                drop(log);
                self.shared.snapshots.log_changed(None, Some(cs));
            }
        }
        let _ = self.sm_tx.send(ToStateMachine::Apply(entries));
        Ok(())
    }

    /// The first entry after `base` in the log that carries data (a write batch), if any.
    /// The first data entry in `base+1 ..= upto`, if any.
    fn data_entry_between(&self, base: u64, upto: u64) -> Option<u64> {
        self.data_entry_after(base).filter(|i| *i <= upto)
    }

    fn data_entry_after(&self, base: u64) -> Option<u64> {
        let log = &self.raw.raft.raft_log;
        if base >= log.last_index() {
            return None;
        }
        if base + 1 < log.first_index() {
            return Some(log.first_index());
        }
        match log.entries(base + 1, None, raft::GetEntriesContext::empty(false)) {
            Ok(entries) => entries
                .iter()
                .find(|e| e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty())
                .map(|e| e.index),
            Err(_) => Some(base + 1),
        }
    }

    fn on_ready(&mut self) -> Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        self.send(ready.take_messages());
        if ready.ss().is_some() || ready.hs().is_some() {
            let now = Leadership {
                role: self.raw.raft.state.into(),
                term: self.raw.raft.term,
            };
            let before = *self.leadership.borrow();
            if (now.leads(), now.term) != (before.leads(), before.term) {
                // The state machine hears first: a write queued by a caller that saw the new
                // leadership must reach it after this message, not before.
                let _ = self.sm_tx.send(ToStateMachine::Role {
                    is_leader: now.leads(),
                    term: now.term,
                });
            }
            if now != before {
                self.leadership.send_replace(now);
            }
        }
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            let manifest = Manifest::decode(&snap.data)?;
            let dir = self.shared.snapshots.incoming_dir(&manifest);
            let (done_tx, done_rx) = mpsc::channel();
            let _ = self.sm_tx.send(ToStateMachine::InstallSnapshot {
                meta: snap.get_metadata().clone(),
                dir,
                done: done_tx,
            });
            done_rx.recv().map_err(|_| Error::Shutdown)??;
            let mut log = self.storage.write();
            log.apply_snapshot(snap.get_metadata())?;
            self.shared.snapshots.log_changed(
                Some(log.first_index()),
                Some(snap.get_metadata().get_conf_state().clone()),
            );
        }
        let committed = ready.take_committed_entries();
        self.apply_committed(committed)?;
        if !ready.entries().is_empty() {
            self.storage.write().append(ready.entries())?;
        }
        if let Some(hs) = ready.hs() {
            self.storage.write().set_hard_state(hs)?;
        }
        // Entries, a vote or a term must be durable before the messages that depend on them
        // go out. A hard state whose only change is the commit index need not be (etcd's
        // `MustSync`): a node that restarts with an older commit index learns it again from
        // the leader (its databases may be ahead of it; `Node::start` raises it to what they
        // hold). It is still handed to the operating system, so that it survives a kill -9:
        // `raftsql recover` keeps the entries up to the commit index it finds, and a survivor
        // that applied an acknowledged write must not drop it (recovery.rs found this).
        if !ready.must_sync() {
            if ready.hs().is_some() {
                self.storage.write().flush()?;
            }
        } else {
            let started = Instant::now();
            self.storage.write().sync()?;
            self.shared
                .metrics
                .wal_fsync
                .observe(started.elapsed().as_secs_f64());
        }
        self.send(ready.take_persisted_messages());
        for rs in ready.take_read_states() {
            let Some(id) = read_round(&rs.request_ctx, self.raw.raft.id, self.read_nonce) else {
                continue;
            };
            if let Some(r) = self.reads.remove(&id) {
                for w in r.waiters {
                    match w {
                        ReadWaiter::Index(tx) => {
                            let _ = tx.send(Ok(rs.index));
                        }
                        ReadWaiter::Confirm { base, done } => {
                            done(match self.data_entry_between(base, rs.index) {
                                None => Ok(()),
                                Some(i) => Err(Error::Unavailable(format!(
                                    "entry {i} committed while the request ran on the \
                                     state at {base}; retry"
                                ))),
                            })
                        }
                    }
                }
            }
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.storage.read().hard_state().clone();
            hs.commit = commit;
            let mut log = self.storage.write();
            log.set_hard_state(&hs)?;
            log.flush()?;
        }
        self.send(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_committed(committed)?;
        self.raw.advance_apply();
        self.publish_status();
        Ok(())
    }

    fn publish_status(&self) {
        let r = &self.raw.raft;
        let log = self.storage.read();
        let mut s = self.shared.raft_status.lock();
        if r.leader_id != s.leader_id && r.leader_id != 0 {
            self.shared.metrics.leader_changes.inc();
        }
        s.leader_id = r.leader_id;
        s.term = r.term;
        s.commit = r.raft_log.committed;
        s.role = RaftRole::from(r.state).as_str().into();
        s.log_first = log.first_index();
        s.log_last = log.last_index();
        s.heard_leader = r.state == StateRole::Leader
            || (r.leader_id != 0 && r.election_elapsed < r.election_timeout());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_contexts_match_only_this_run_of_this_node() {
        let ctx = read_ctx(3, 77, 12);
        assert_eq!(read_round(&ctx, 3, 77), Some(12));
        // Another node's round 12, the same node's previous run, the old 8-byte form.
        assert_eq!(read_round(&read_ctx(2, 77, 12), 3, 77), None);
        assert_eq!(read_round(&read_ctx(3, 76, 12), 3, 77), None);
        assert_eq!(read_round(&12u64.to_le_bytes(), 3, 77), None);
        assert_eq!(read_round(&[], 3, 77), None);
    }
}
