//! A raftsql node: the Raft thread, the state machine thread, the network endpoint, and the
//! [`Node`] API that ties them together.
//!
//! # Threads
//! - **raft** (`raftsql-raft`): owns the `RawNode`. Each turn it drains its inbox (peer
//!   messages, proposals, read-index requests), ticks, then handles one `Ready` the way
//!   raft-rs prescribes: send the leader's messages, hand committed entries to the state
//!   machine, append new entries and the hard state to the log, **fsync once**, send the
//!   messages that had to wait for that fsync, advance. Everything proposed while the
//!   previous fsync ran shares the next one (group commit at the log).
//! - **state machine** (`raftsql-sm`, see `state.rs`): owns the SQLite writer connections;
//!   applies committed entries; runs leader write batches and proposes their pages.
//! - **tokio**: the listener, one sender task per peer, request handlers, readers
//!   (`spawn_blocking`).
//!
//! # Reads
//! Linearizable reads use Raft's ReadIndex (raft-rs `ReadOnlyOption::Safe`): the leader
//! confirms with a heartbeat quorum that it still leads at commit index `r`, the node waits
//! until it has applied `r`, then reads. We chose ReadIndex over a lease because a lease
//! relies on bounded clock drift and pauses (a paused leader with a stale lease would serve
//! stale reads, which the fault tests provoke on purpose). The cost is one heartbeat round
//! trip per read batch. Followers serve linearizable reads the same way (the read index
//! comes from the leader), and `LOCAL` reads from whatever they have applied.
//!
//! # Files
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`Node`], its shared state, the messages to the Raft thread |
//! | `config.rs` | [`NodeConfig`], `node.json`, the data directory lock |
//! | `boot.rs` | [`Node::start`] |
//! | `api.rs` | the public API and the shared state's side of it |
//! | `forward.rs` | writes and service calls a follower forwards to the leader |
//! | `handler.rs` | what arrives from the network (Raft messages, requests) |
//! | `raft_loop.rs` | the Raft thread |
//! | `snapshot_pull.rs` | pulling a snapshot from the leader |

mod api;
mod boot;
mod config;
mod forward;
mod handle;
mod handler;
mod raft_loop;
mod snapshot_pull;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;

use tokio::sync::watch;

use crate::error::Result;
use crate::net::transport::Transport;
use crate::snapshot::SnapshotStore;
use crate::state::{DbMap, Progress, ToStateMachine};

pub use api::Transaction;
pub(crate) use boot::Removed;
pub(crate) use config::{lock_data_dir, NodeFile};
pub use config::{
    parse_peers, stored_id, stored_node, NodeConfig, StoredNode, DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_OFFLINE_AFTER, DEFAULT_STATEMENT_TIMEOUT, DEFAULT_TICK, DEFAULT_WRITE_TIMEOUT,
    MAX_TX_IDLE,
};
use handle::{Leadership, RaftHandle, ToRaftThread};
pub use handler::error_response;

/// Raft-side facts, refreshed after every Ready.
#[derive(Clone, Debug, Default)]
pub struct RaftStatus {
    /// Leader's id, 0 if unknown.
    pub leader_id: u64,
    /// Current term.
    pub term: u64,
    /// Commit index.
    pub commit: u64,
    /// "leader", "follower", "candidate" or "pre-candidate".
    pub role: String,
    /// First index in the log.
    pub log_first: u64,
    /// Last index in the log.
    pub log_last: u64,
    /// This node leads, or heard from its leader within an election timeout. A standby
    /// (learner) cut off from the leader never campaigns, so it keeps `leader_id`: this is
    /// what says it has lost it.
    pub heard_leader: bool,
}

/// A snapshot of the node's state, for `status` and tests.
#[derive(Clone, Debug)]
pub struct Status {
    /// This node.
    pub id: u64,
    /// Raft facts.
    pub raft: RaftStatus,
    /// Leader address, if known.
    pub leader_addr: Option<SocketAddr>,
    /// Last applied index.
    pub applied: u64,
    /// Durable checkpoint index.
    pub checkpoint: u64,
}

/// A registered service, and whether clients (not only members) may call it.
type Service = (Arc<dyn ServiceHandler>, bool);

pub(super) struct Shared {
    cfg: NodeConfig,
    raft: RaftHandle,
    sm_tx: Sender<ToStateMachine>,
    /// Who leads, as the Raft thread last published it.
    leadership: watch::Receiver<Leadership>,
    raft_status: Mutex<RaftStatus>,
    dbs: DbMap,
    progress: Arc<Progress>,
    applied_rx: watch::Receiver<u64>,
    snapshots: Arc<SnapshotStore>,
    transport: Mutex<Option<Arc<Transport>>>,
    peers: Mutex<BTreeMap<u64, SocketAddr>>,
    receiving_snapshot: AtomicBool,
    stopped: AtomicBool,
    /// The connection to the leader that forwarded requests share (by its address).
    leader_conns: crate::net::mux::MuxCache,
    /// The newest completed read index and when its round started ([`Consistency::Bounded`]).
    fresh: Mutex<Option<(Instant, u64)>>,
    /// Services by name, and whether clients (not only members) may call them.
    services: parking_lot::RwLock<HashMap<String, Service>>,
    /// This node's TLS files (a TLS cluster): the CA signs joiners' certificates.
    tls: Option<crate::net::tls::Material>,
    /// Set once this node has left the cluster or was removed from it (with why).
    departed: watch::Sender<Option<String>>,
    /// What the node measures over time (fsyncs, leader changes).
    metrics: crate::metrics::Metrics,
}

/// A service the embedding application runs on every node, reachable from other nodes with
/// [`Node::call_leader`] (the etcd facade forwards writes this way).
pub trait ServiceHandler: Send + Sync + 'static {
    /// Handles one call; the payload format is the service's own.
    fn call(
        &self,
        payload: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes>> + Send>>;
}

/// A running raftsql node. Cheap to clone; all clones drive the same node.
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    _lock: Arc<File>,
}

/// A [`Node`] reference that does not keep the node running (for its own background tasks
/// and services, so that dropping the last [`Node`] still stops it).
#[derive(Clone)]
pub struct WeakNode {
    shared: std::sync::Weak<Shared>,
    threads: std::sync::Weak<Mutex<Vec<JoinHandle<()>>>>,
    lock: std::sync::Weak<File>,
}

impl WeakNode {
    /// The node, unless it was dropped or shut down.
    pub fn upgrade(&self) -> Option<Node> {
        let node = Node {
            shared: self.shared.upgrade()?,
            threads: self.threads.upgrade()?,
            _lock: self.lock.upgrade()?,
        };
        if node.shared.stopped.load(Ordering::SeqCst) {
            return None;
        }
        Some(node)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Only the last clone stops the node (the threads hold their own references).
        if Arc::strong_count(&self.threads) == 1
            && !self.shared.stopped.swap(true, Ordering::SeqCst)
        {
            self.shared.raft.shutdown();
            let _ = self.shared.sm_tx.send(ToStateMachine::Shutdown);
            for t in self.threads.lock().drain(..) {
                let _ = t.join();
            }
        }
    }
}
