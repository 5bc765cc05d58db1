//! raftsql-core: SQLite databases replicated through Raft by their WAL frames.
//!
//! A write runs on the leader's single writer connection; the pages its COMMIT appends to
//! the WAL become one Raft log entry ([`entry::Frames`]); every node applies the same pages,
//! so replicas are byte-identical. See `docs/ARCHITECTURE.md` for the whole data path and
//! the invariants, and each module for the part it owns:
//!
//! - [`vfs`]: the SQLite VFS giving access to the wal-index header;
//! - [`entry`]: the replicated entry format;
//! - [`log`]: the durable Raft log (segments of checksummed records);
//! - [`state`]: the state machine (databases, writer, apply, checkpoints);
//! - `guard`: what SQL from a client may do (the checks on every connection it runs on);
//! - [`snapshot`]: snapshots for lagging followers;
//! - [`backup`]: backup files of a whole cluster, and restoring one into a new cluster;
//!   [`backup_schedule`]: a node saving its own on a schedule, pruning old ones;
//! - [`recover`]: disaster recovery when a quorum is lost for good;
//! - [`roles`]: which configuration change brings voters and standbys to their targets;
//! - [`members`]: the member registry, join tokens, and the leader's role keeper;
//!   `history`: the leader and role changes it records (for `cluster show`);
//! - [`transport`]: framed TCP between nodes and clients;
//! - [`node`]: the Raft thread and the [`Node`] API; [`client`]: the remote [`Client`].
#![warn(missing_docs)]

pub mod backup;
pub mod backup_schedule;
pub mod client;
mod committed;
mod consistency;
pub mod entry;
pub mod error;
mod guard;
mod history;
pub mod log;
pub mod members;
pub mod metrics;
pub mod mux;
pub mod node;
pub mod recover;
pub mod roles;
pub mod snapshot;
pub mod state;
pub mod tls;
pub mod transport;
pub mod value;
pub mod vfs;

pub use client::Client;
pub use consistency::Consistency;
pub use error::{ConstraintKind, Error, Result};
pub use node::{parse_peers, Node, NodeConfig, ServiceHandler, Status, Transaction};
pub use value::{split_sql, ExecResult, Rows, Statement, Value};
