//! The typed ways into the Raft thread: [`ToRaftThread`] is the one message enum of that hop,
//! [`RaftHandle`] sends it (the API, the network handler, snapshot pulls and, through
//! [`crate::state::RaftSink`], the state machine), and [`Leadership`] is what the thread
//! publishes back about who leads, once, on a watch channel every reader shares.

use std::sync::mpsc::Sender;

use raft::eraftpb::{ConfChange, Message};
use raft::StateRole;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::state::{RaftSink, SmToRaft};

/// Everything the Raft thread is asked to do.
pub(super) enum ToRaftThread {
    /// A Raft message from a peer.
    Step(Message),
    /// What the state machine asks (proposals, checkpoints, leadership confirmations).
    Sm(SmToRaft),
    /// A read index: every write committed before the request is at or below it.
    ReadIndex(oneshot::Sender<Result<u64>>),
    /// Propose a configuration change (this node must lead).
    ConfChange(ConfChange, oneshot::Sender<Result<()>>),
    /// Hand leadership to the most up-to-date other voter; answers its id.
    TransferLeader(oneshot::Sender<Result<u64>>),
    /// Stop the thread.
    Shutdown,
}

/// The sending side of the Raft thread's inbox; cheap to clone.
#[derive(Clone)]
pub(super) struct RaftHandle(Sender<ToRaftThread>);

impl RaftHandle {
    pub(super) fn new(tx: Sender<ToRaftThread>) -> RaftHandle {
        RaftHandle(tx)
    }

    /// Steps a peer's message (dropped if the thread has stopped: Raft resends).
    pub(super) fn step(&self, m: Message) {
        let _ = self.0.send(ToRaftThread::Step(m));
    }

    /// Asks for a read index.
    pub(super) fn read_index(&self) -> Result<oneshot::Receiver<Result<u64>>> {
        self.ask(ToRaftThread::ReadIndex)
    }

    /// Proposes a configuration change.
    pub(super) fn conf_change(&self, cc: ConfChange) -> Result<oneshot::Receiver<Result<()>>> {
        self.ask(|reply| ToRaftThread::ConfChange(cc, reply))
    }

    /// Hands leadership over.
    pub(super) fn transfer_leader(&self) -> Result<oneshot::Receiver<Result<u64>>> {
        self.ask(ToRaftThread::TransferLeader)
    }

    /// Stops the thread.
    pub(super) fn shutdown(&self) {
        let _ = self.0.send(ToRaftThread::Shutdown);
    }

    /// Sends a request carrying its answer channel; `Shutdown` if the thread is gone.
    fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> ToRaftThread,
    ) -> Result<oneshot::Receiver<Result<T>>> {
        let (tx, rx) = oneshot::channel();
        self.0.send(make(tx)).map_err(|_| Error::Shutdown)?;
        Ok(rx)
    }
}

impl RaftSink for RaftHandle {
    fn send(&self, m: SmToRaft) {
        let _ = self.0.send(ToRaftThread::Sm(m));
    }
}

/// This node's role in its Raft group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum RaftRole {
    /// Follows a leader (or waits for one).
    #[default]
    Follower,
    /// Probes whether it could win an election.
    PreCandidate,
    /// Campaigns.
    Candidate,
    /// Leads.
    Leader,
}

impl RaftRole {
    /// The name in statuses and metrics.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RaftRole::Leader => "leader",
            RaftRole::Follower => "follower",
            RaftRole::Candidate => "candidate",
            RaftRole::PreCandidate => "pre-candidate",
        }
    }
}

impl From<StateRole> for RaftRole {
    fn from(r: StateRole) -> RaftRole {
        match r {
            StateRole::Leader => RaftRole::Leader,
            StateRole::Follower => RaftRole::Follower,
            StateRole::Candidate => RaftRole::Candidate,
            StateRole::PreCandidate => RaftRole::PreCandidate,
        }
    }
}

/// Who leads, as this node knows it: published by the Raft thread whenever it changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Leadership {
    /// This node's role.
    pub(crate) role: RaftRole,
    /// The current term.
    pub(crate) term: u64,
}

impl Leadership {
    /// Whether this node leads.
    pub(crate) fn leads(&self) -> bool {
        self.role == RaftRole::Leader
    }
}
