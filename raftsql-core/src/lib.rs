//! SQLite databases replicated through Raft by their pages, on disk.
//!
//! Embed a [`Node`] in your program (it is a member of the cluster: it stores a replica,
//! votes, and serves reads from its own files), or talk to a cluster from outside with a
//! [`Client`]. Either way you get SQLite's SQL, with writes acknowledged only once a quorum
//! has them on disk, and reads as fresh as you ask ([`Consistency`]).
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use raftsql_core::{Client, Consistency, Node, NodeConfig, Value};
//!
//! // A cluster of one in a temporary directory. For three, give each node the same
//! // `peers` (id -> address) and its own id, data directory and address.
//! let dir = tempfile::tempdir()?;
//! let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
//! let node = Node::start(NodeConfig::new(1, dir.path(), addr)).await?;
//! node.wait_ready(Duration::from_secs(10)).await?;
//!
//! // Writes run on the leader, atomically, replicated.
//! node.execute("main", "CREATE TABLE kv(k TEXT PRIMARY KEY, v TEXT)", vec![]).await?;
//! node.execute("main", "INSERT INTO kv VALUES (?1, ?2)", vec!["hello".into(), "world".into()])
//!     .await?;
//!
//! // Reads run on this node, as fresh as asked.
//! let rows = node.query_with("main", "SELECT v FROM kv", vec![], Consistency::Local).await?;
//! assert_eq!(rows.rows, vec![vec![Value::Text("world".into())]]);
//!
//! // From another process (or task): a client that finds the leader itself.
//! let client = Client::new(vec![addr], "raftsql");
//! let rows = client.query("main", "SELECT count(*) FROM kv", vec![]).await?;
//! assert_eq!(rows.rows, vec![vec![Value::Integer(1)]]);
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! `examples/kv_http.rs` is a small key-value HTTP service embedding a node, started three
//! times to form a cluster (see the README).
//!
//! # What you can rely on
//!
//! - **Writes** ([`Node::execute`], [`Node::execute_batch`], [`Node::write`],
//!   [`Node::transaction`], and the same on [`Client`]) run on the leader, each request in
//!   its own savepoint of a group-commit transaction, and are answered once a quorum has the
//!   pages on disk and this node applied them. A [`Node`] that does not lead answers
//!   [`Error::NotLeader`] with the leader's address; a [`Client`] follows it there, and a
//!   write that reached a follower over the network is forwarded to the leader.
//! - **Reads** take a [`Consistency`]: `Linearizable` (the default: sees every write
//!   acknowledged before it started, on any node), `Bounded(d)` (at most `d` stale, usually
//!   without a round trip), `Local` (whatever this node has, never waits for the network).
//! - **Errors** are an [`Error`] to match on: [`Error::NotLeader`] and
//!   [`Error::Unavailable`] mean nothing happened and retrying is safe
//!   ([`Error::is_retryable`]); [`Error::OutcomeUnknown`] means a write may or may not have
//!   committed (read back before retrying); [`Error::Constraint`] carries SQLite's extended
//!   code ([`Error::constraint`]); [`Error::Sql`] is any other SQL error. A [`Node`] and a
//!   [`Client`] return the same variants for the same cause.
//! - **A [`Client`] is cheap to clone**: clones share one multiplexed connection per node
//!   and the knowledge of who leads; share one among all your tasks.
//!
//! # Layout
//!
//! The layers, from the top down; a module uses only those below it (`docs/ARCHITECTURE.md`
//! has the data path of a write and every invariant with the test that checks it):
//!
//! | layer | path | owns |
//! |---|---|---|
//! | composition | `start.rs` | [`Node::start`]: the core with the services above it attached |
//! | operations | [`members`], [`backup`], [`recover`], `roles.rs` | membership, join tokens and the role keeper; backups; disaster recovery; the role planner |
//! | API | `client.rs`, `consistency.rs`, `error.rs`, `value.rs` | [`Client`], [`Consistency`], [`Error`], [`Value`] / [`Statement`] / [`Rows`] |
//! | node | `node/` | [`Node`]: config, boot, API, forwarding to the leader, the network handler, the Raft thread, snapshot pulls |
//! | state machine | `state/`, `guard.rs`, `snapshot.rs`, `committed.rs` | databases and the writer, batches, apply, checkpoints, recovery; what client SQL may do; snapshots |
//! | replication format | `entry.rs`, `log.rs` | the replicated entry; the durable Raft log |
//! | storage | `vfs.rs` | the SQLite VFS that exposes the wal-index header |
//! | network | `net/` | frames, dialing, [`tls`], the server, the per-peer transport, one-call and multiplexed connections |
//!
//! Threads: the Raft thread (`raftsql-raft`: ready → send → persist → apply → advance), the
//! state machine thread (`raftsql-sm`, one writer connection per database), the checkpoint
//! fsync thread, and tokio tasks for the network and the API; they talk through one typed
//! message enum per hop.
#![warn(missing_docs)]

pub mod backup;
mod client;
mod committed;
mod consistency;
mod entry;
mod error;
mod fsutil;
mod guard;
mod log;
pub mod members;
mod memwal;
mod metrics;
mod net;
mod node;
pub mod recover;
mod roles;
mod snapshot;
mod start;
mod state;
mod value;
mod vfs;

pub use backup::schedule as backup_schedule;
pub use client::{Client, Prepared, RemoteTransaction, DEFAULT_TIMEOUT};
pub use consistency::Consistency;
pub use error::{ConstraintKind, Error, Result};
pub use log::LogError;
pub use metrics::{Metrics, WriteMetrics};
pub use net::tls;
pub use net::{Dialer, Peer, DEFAULT_MAX_CLIENT_FRAME, MAX_FRAME};
pub use node::{
    parse_peers, stored_id, stored_node, Node, NodeConfig, RaftStatus, ServiceHandler, Status,
    StoredNode, Transaction, WeakNode, DEFAULT_MAX_RESULT_BYTES, DEFAULT_OFFLINE_AFTER,
    DEFAULT_STATEMENT_TIMEOUT, DEFAULT_TICK, DEFAULT_WRITE_TIMEOUT, MAX_TX_IDLE,
};
pub use roles::{Role, Targets};
pub use value::{split_sql, ExecResult, Rows, Statement, Value};

/// Internals the fuzz targets and the process tests reach into: decoders of everything that
/// arrives from disk or the network, and the raw connection. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::client::from_pb;
    pub use crate::entry::Frames;
    pub use crate::log::{segment_file_name, RaftLog, SEGMENT_MAGIC};
    pub use crate::net::conn::RpcConn;
    pub use crate::net::frame::decode_frame;
    pub use crate::node::error_response;
    pub use crate::snapshot::Manifest;
}
