//! The errors of raftsql-core. Each says what happened and, where there is one, what to do.

use std::path::PathBuf;
use std::sync::Arc;

/// Errors returned by [`crate::Node`], [`crate::Client`] and the storage layers. Cheap to
/// clone (the causes that are not `Clone` are shared), so one error can answer every caller
/// of a batch.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// Writes (and linearizable reads when no leader is known) go to the leader.
    #[error("this node is not the leader{}", leader_hint(.leader_id, .leader_addr))]
    NotLeader {
        /// Leader's node id, if known.
        leader_id: Option<u64>,
        /// Leader's address, if known: send the request there.
        leader_addr: Option<String>,
    },
    /// SQLite rejected the statement (syntax, a missing table, a refused statement, ...);
    /// nothing was written. A constraint failure is [`Error::Constraint`].
    #[error("SQL error (SQLite code {code}): {message}")]
    Sql {
        /// SQLite's primary result code (`SQLITE_ERROR` = 1, `SQLITE_AUTH` = 23, ...).
        code: i32,
        /// SQLite's message.
        message: String,
    },
    /// A constraint failed (UNIQUE, PRIMARY KEY, NOT NULL, CHECK, FOREIGN KEY, or a trigger's
    /// `RAISE`): the request was rolled back and nothing of it was written. Requests
    /// group-committed with it are not affected.
    #[error("constraint failed (SQLite code {code}): {message}")]
    Constraint {
        /// SQLite's extended result code, e.g. 2067 (`SQLITE_CONSTRAINT_UNIQUE`); see
        /// [`Error::constraint`].
        code: i32,
        /// SQLite's message, e.g. "UNIQUE constraint failed: users.email".
        message: String,
    },
    /// The leader lost leadership after the write was proposed: the write may or may not
    /// commit. Read back before retrying.
    #[error("leadership was lost while the write was being replicated; its outcome is unknown")]
    OutcomeUnknown,
    /// No quorum answered in time.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// The request did not complete in time.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// Bad input from the caller.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The node is stopping.
    #[error("the node is shutting down")]
    Shutdown,
    /// Another process holds this data directory.
    #[error("data directory {} is in use by another raftsql process (lock file {} is held)", .dir.display(), .dir.join("LOCK").display())]
    DataDirInUse {
        /// The data directory.
        dir: PathBuf,
    },
    /// A file operation failed.
    #[error("I/O error on {}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The Raft log on disk is damaged or inconsistent.
    #[error(transparent)]
    Log(Arc<crate::log::LogError>),
    /// Stored state is damaged (a checksum or format check failed).
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// An error inside raft-rs.
    #[error("raft: {0}")]
    Raft(#[source] Arc<raft::Error>),
    /// A network or protocol error talking to another node.
    #[error("transport: {0}")]
    Transport(String),
    /// The embedding application's own error: returned by its closure in
    /// [`crate::Node::write`] or [`crate::Node::read`], or by one of its services, and carried
    /// with its code intact to the caller, across nodes too (a forwarded service call).
    /// raftsql-etcd carries etcd's errors this way.
    #[error("{message}")]
    Application {
        /// The application's code for it.
        code: u32,
        /// What to tell the caller.
        message: String,
    },
    /// Anything else (a bug, or an unexpected SQLite failure).
    #[error("internal error: {0}")]
    Internal(String),
}

fn leader_hint(id: &Option<u64>, addr: &Option<String>) -> String {
    match (id, addr) {
        (Some(id), Some(a)) => format!("; the leader is node {id} at {a}"),
        (Some(id), None) => format!("; the leader is node {id}"),
        _ => "; no leader is known right now (an election may be in progress)".into(),
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which constraint failed (from SQLite's extended result code), see [`Error::constraint`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConstraintKind {
    /// `UNIQUE` (or a unique index).
    Unique,
    /// `PRIMARY KEY` (including a rowid that exists already).
    PrimaryKey,
    /// `NOT NULL`.
    NotNull,
    /// `CHECK`.
    Check,
    /// `FOREIGN KEY`.
    ForeignKey,
    /// A trigger's `RAISE(ABORT|FAIL|ROLLBACK, ...)`.
    Trigger,
    /// Any other constraint (or a server that sent only the primary code).
    Other,
}

impl Error {
    /// Which constraint failed, if this is an [`Error::Constraint`].
    ///
    /// ```
    /// use raftsql_core::{ConstraintKind, Error};
    /// let e = Error::Constraint { code: 2067, message: "UNIQUE constraint failed: t.k".into() };
    /// assert_eq!(e.constraint(), Some(ConstraintKind::Unique));
    /// assert_eq!(Error::OutcomeUnknown.constraint(), None);
    /// ```
    pub fn constraint(&self) -> Option<ConstraintKind> {
        use rusqlite::ffi;
        let Error::Constraint { code, .. } = self else {
            return None;
        };
        Some(match *code {
            ffi::SQLITE_CONSTRAINT_UNIQUE => ConstraintKind::Unique,
            ffi::SQLITE_CONSTRAINT_PRIMARYKEY | ffi::SQLITE_CONSTRAINT_ROWID => {
                ConstraintKind::PrimaryKey
            }
            ffi::SQLITE_CONSTRAINT_NOTNULL => ConstraintKind::NotNull,
            ffi::SQLITE_CONSTRAINT_CHECK => ConstraintKind::Check,
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ConstraintKind::ForeignKey,
            ffi::SQLITE_CONSTRAINT_TRIGGER => ConstraintKind::Trigger,
            _ => ConstraintKind::Other,
        })
    }

    /// SQLite's result code of an [`Error::Sql`] (primary) or [`Error::Constraint`]
    /// (extended), if this is one of them.
    pub fn sqlite_code(&self) -> Option<i32> {
        match self {
            Error::Sql { code, .. } | Error::Constraint { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True when the request certainly did not take effect and sending it again (to the
    /// leader, once there is one) is safe: [`Error::NotLeader`], [`Error::Unavailable`].
    /// [`Error::OutcomeUnknown`] is not: read back first.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::NotLeader { .. } | Error::Unavailable(_))
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source: Arc::new(source),
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        match &e {
            rusqlite::Error::SqliteFailure(f, msg)
                if f.extended_code & 0xff == rusqlite::ffi::SQLITE_CONSTRAINT =>
            {
                Error::Constraint {
                    code: f.extended_code,
                    message: msg.clone().unwrap_or_else(|| f.to_string()),
                }
            }
            rusqlite::Error::SqliteFailure(f, msg) => Error::Sql {
                code: f.extended_code & 0xff,
                message: msg.clone().unwrap_or_else(|| f.to_string()),
            },
            _ => Error::Sql {
                code: 1,
                message: e.to_string(),
            },
        }
    }
}

impl From<crate::log::LogError> for Error {
    fn from(e: crate::log::LogError) -> Self {
        Error::Log(Arc::new(e))
    }
}

impl From<raft::Error> for Error {
    fn from(e: raft::Error) -> Self {
        Error::Raft(Arc::new(e))
    }
}
