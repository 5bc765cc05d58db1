//! The messages that reach the state machine thread and the ones it sends to the Raft
//! thread: one enum per hop ([`ToStateMachine`] in, [`SmToRaft`] out), and the write requests they carry.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raft::eraftpb::{Entry, SnapshotMetadata};
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::value::{ExecResult, Rows, Statement};

/// Called with the outcome of the batch a request was part of.
pub(crate) type Waiter = Box<dyn FnOnce(Result<()>) + Send>;

/// Answers a caller with an error.
pub(crate) type Fail = Box<dyn FnOnce(Error) + Send>;

/// A write written in Rust, its result type erased for the queue: it runs on the leader's
/// writer connection inside the batch transaction, in its own SAVEPOINT (an error rolls back
/// only its own changes), and answers its own caller through the typed channel it holds
/// ([`TypedWrite`]), once the batch's entry is settled.
pub trait WriteFn: Send {
    /// Runs the write. `Ok`: what answers the caller once the batch settles (it holds the
    /// result). `Err`: the write's error, and what answers the caller with the error the
    /// batch decides on.
    fn run(self: Box<Self>, c: &Connection) -> std::result::Result<Waiter, (Error, Fail)>;
    /// Answers the caller with `e` without running.
    fn fail(self: Box<Self>, e: Error);
}

/// A Rust write returning `T` to the caller waiting on `reply`.
pub(crate) struct TypedWrite<T, F> {
    /// The write.
    pub(crate) f: F,
    /// Where its result goes.
    pub(crate) reply: oneshot::Sender<Result<T>>,
}

impl<T, F> WriteFn for TypedWrite<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T> + Send,
{
    fn run(self: Box<Self>, c: &Connection) -> std::result::Result<Waiter, (Error, Fail)> {
        let TypedWrite { f, reply } = *self;
        match f(c) {
            Ok(t) => Ok(Box::new(move |settled: Result<()>| {
                let _ = reply.send(settled.map(|_| t));
            })),
            Err(e) => Err((
                e,
                Box::new(move |e| {
                    let _ = reply.send(Err(e));
                }),
            )),
        }
    }

    fn fail(self: Box<Self>, e: Error) {
        let _ = self.reply.send(Err(e));
    }
}

/// What a write request does.
pub enum Work {
    /// SQL statements run atomically.
    Statements {
        /// The statements.
        stmts: Vec<Statement>,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Vec<ExecResult>>>,
    },
    /// Rust code run atomically (see [`WriteFn`]); it answers its caller itself.
    Func(Box<dyn WriteFn>),
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
            Work::Func(f) => f.fail(e),
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
pub enum ToStateMachine {
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

/// Where the state machine sends what the Raft thread must do (the node's Raft handle).
pub trait RaftSink: Send {
    /// Sends one message (lost if the Raft thread has stopped).
    fn send(&self, m: SmToRaft);
}

/// Messages from the state machine to the Raft thread.
pub enum SmToRaft {
    /// Propose an entry.
    Propose {
        /// Encoded [`Frames`].
        data: Bytes,
        /// Proposer sequence, echoed in ProposalFailed.
        seq: u64,
        /// The applied index of the state the batch was executed on: its pages are right
        /// only if no entry after it changes data (I4, checked before proposing).
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
