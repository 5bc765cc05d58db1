//! The messages that reach the state machine thread and the ones it sends to the Raft
//! thread: one enum per hop ([`SmMsg`] in, [`ToRaft`] out), and the write requests they carry.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raft::eraftpb::{Entry, SnapshotMetadata};
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::value::{ExecResult, Rows, Statement};

/// A write written in Rust: runs on the leader's writer connection inside the batch
/// transaction, in its own SAVEPOINT (an error rolls back only its own changes). What it
/// returns reaches the caller once the batch's entry is committed and applied.
pub type WriteFn = Box<dyn FnOnce(&Connection) -> Result<Box<dyn std::any::Any + Send>> + Send>;

/// Called with the outcome of the batch a request was part of.
pub(super) type Waiter = Box<dyn FnOnce(Result<()>) + Send>;

/// What a write request does.
pub enum Work {
    /// SQL statements run atomically.
    Statements {
        /// The statements.
        stmts: Vec<Statement>,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Vec<ExecResult>>>,
    },
    /// Rust code run atomically (see [`WriteFn`]).
    Func {
        /// The code.
        f: WriteFn,
        /// Where its result goes.
        reply: oneshot::Sender<Result<Box<dyn std::any::Any + Send>>>,
    },
}

/// One write request waiting for the writer.
pub struct WriteReq {
    /// Target database.
    pub db: String,
    /// What to do.
    pub work: Work,
    /// Answer Timeout if not started by then.
    pub deadline: Instant,
}

impl WriteReq {
    /// Answers the caller with an error without running anything.
    pub fn fail(self, e: Error) {
        match self.work {
            Work::Statements { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Work::Func { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }

    pub(super) fn is_sql(&self) -> bool {
        matches!(self.work, Work::Statements { .. })
    }

    /// Answers a SQL request now if `r` failed, or returns what answers it once the batch
    /// commits.
    pub(super) fn settle(self, r: Result<Vec<ExecResult>>) -> Option<Waiter> {
        let Work::Statements { reply, .. } = self.work else {
            unreachable!("settle is for SQL requests")
        };
        match r {
            Ok(results) => Some(Box::new(move |c: Result<()>| {
                let _ = reply.send(c.map(|_| results));
            })),
            Err(e) => {
                let _ = reply.send(Err(e));
                None
            }
        }
    }
}

/// Operations on an interactive transaction.
pub enum TxOp {
    /// Start one on `db`; answers with the transaction id.
    Begin {
        /// Database.
        db: String,
        /// Idle time after which it is rolled back.
        idle: Duration,
        /// Answer.
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Run a statement (rows returned, e.g. a SELECT or RETURNING).
    Exec {
        /// Transaction id.
        id: u64,
        /// Statement.
        stmt: Statement,
        /// Answer: rows plus what it changed.
        reply: oneshot::Sender<Result<(Rows, ExecResult)>>,
    },
    /// Commit: replicate and answer once committed.
    Commit {
        /// Transaction id.
        id: u64,
        /// Answer.
        reply: oneshot::Sender<Result<()>>,
    },
    /// Roll back.
    Rollback {
        /// Transaction id.
        id: u64,
    },
}

/// Messages to the state machine thread.
pub enum SmMsg {
    /// Committed entries, in log order.
    Apply(Vec<Entry>),
    /// Leadership changed: `leader` is this node's view of who leads in `term`.
    Role {
        /// True if this node is the leader.
        is_leader: bool,
        /// Current term.
        term: u64,
    },
    /// Raft refused a proposal (not leader any more).
    ProposalFailed(u64),
    /// A write request.
    Write(WriteReq),
    /// An interactive transaction operation.
    Tx(TxOp),
    /// Replace every database with a received snapshot.
    InstallSnapshot {
        /// Snapshot position.
        meta: SnapshotMetadata,
        /// Directory holding the received `<db>.db` files.
        dir: PathBuf,
        /// Answer once durable.
        done: std::sync::mpsc::Sender<Result<()>>,
    },
    /// Build a snapshot for followers (see `snapshot.rs`).
    MakeSnapshot,
    /// Stop the thread.
    Shutdown,
}

/// Messages from the state machine to the Raft thread.
pub enum ToRaft {
    /// Propose an entry.
    Propose {
        /// Encoded [`Frames`].
        data: Bytes,
        /// Proposer sequence, echoed in ProposalFailed.
        seq: u64,
        /// The applied index of the state the batch was executed on: its pages are right
        /// only if no entry after it changes data (invariant 5, checked before proposing).
        base: u64,
    },
    /// Databases are durable up to this index: the log may be compacted to it.
    Checkpointed(u64),
    /// A batch that changed nothing, executed on the state at `base`: call `done` once a
    /// read-index round confirms this node still leads and nothing committed after `base`.
    Confirm {
        /// The applied index the batch was executed on.
        base: u64,
        /// Answers the batch's callers.
        done: Box<dyn FnOnce(Result<()>) + Send>,
    },
}
