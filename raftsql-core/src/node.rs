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

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fs2::FileExt;
use parking_lot::Mutex;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeV2, ConfState, EntryType, Message, MessageType, SnapshotMetadata,
};
use raft::{RawNode, StateRole};
use raftsql_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::consistency::Consistency;
use crate::error::{Error, Result};
use crate::log::{LogStorage, RaftLog};
use crate::members::Keeper;
use crate::net::conn::RpcConn;
use crate::net::server::{Handler, ResponseFuture};
use crate::net::transport::Transport;
use crate::net::{Dialer, Peer};
use crate::roles::{Change, Role, Targets};
use crate::snapshot::{Manifest, SnapshotStore};
use crate::state::{
    self, DbMap, Progress, SmMsg, SmSettings, StateMachine, ToRaft, TxOp, WriteReq,
};
use crate::value::{ExecResult, Rows, Statement, Value};

/// How to run a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id (non-zero, unique in the cluster).
    pub id: u64,
    /// Directory holding the Raft log, databases and snapshots.
    pub data_dir: PathBuf,
    /// Address to listen on for peers and clients.
    pub listen: SocketAddr,
    /// Every member's id and address (this node included), used to bootstrap a new cluster.
    /// A node restarting from an existing data directory uses the membership it stored.
    pub peers: BTreeMap<u64, SocketAddr>,
    /// Cluster name; connections from another cluster are refused.
    pub cluster: String,
    /// Raft tick.
    pub tick: Duration,
    /// Election timeout in ticks (randomized up to twice that).
    pub election_ticks: usize,
    /// Heartbeat interval in ticks.
    pub heartbeat_ticks: usize,
    /// Checkpoint after this many WAL frames (pages) since the last one.
    pub checkpoint_frames: u64,
    /// Compact the Raft log (up to the checkpoint) once it is larger than this.
    pub compact_log_bytes: u64,
    /// Longest a write waits for the writer and for its commit.
    pub write_timeout: Duration,
    /// This node joins an existing cluster (`peers` are its members, from the join answer)
    /// instead of bootstrapping a new one: it starts with an empty Raft configuration and
    /// asks the leader for a snapshot.
    pub join: bool,
    /// Voters and standbys the cluster keeps (used while this node leads).
    pub targets: Targets,
    /// A member that has not answered the leader's probes for this long counts as offline.
    pub offline_after: Duration,
    /// This node's failure domain ("" = none): promotions prefer domains not yet covered.
    pub domain: String,
    /// This node's weight: lower is preferred for promotion.
    pub weight: u32,
    /// Largest request a client may send (one frame of the client protocol); larger ones
    /// close the connection. Peers may send up to [`crate::MAX_FRAME`].
    pub max_request_bytes: usize,
    /// Largest query result (the sum of its values' sizes) answered; a larger one fails with
    /// [`Error::Invalid`] asking for a narrower query.
    pub max_result_bytes: usize,
    /// TLS between nodes and for clients (off unless set; a data directory that has `tls/`
    /// always runs TLS).
    pub tls: crate::net::tls::TlsSettings,
    /// The longest a client's statement may run (a query, or one request's statements on the
    /// writer, which every other write waits for); a longer one is interrupted.
    pub statement_timeout: Duration,
}

/// How long a read waits for the leader to confirm a read index.
const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(3);

/// The default [`NodeConfig::statement_timeout`].
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The default [`NodeConfig::max_result_bytes`]: 32 MiB (well inside one frame).
pub const DEFAULT_MAX_RESULT_BYTES: usize = 32 << 20;

/// The longest idle timeout a client may ask for its interactive transaction: while open,
/// the transaction holds its database's writer and every other write waits.
pub const MAX_TX_IDLE: Duration = Duration::from_secs(60);

impl NodeConfig {
    /// Defaults for node `id` at `listen`, storing under `data_dir`, with no peers set.
    pub fn new(id: u64, data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        NodeConfig {
            id,
            data_dir: data_dir.into(),
            listen,
            peers: BTreeMap::from([(id, listen)]),
            cluster: "raftsql".into(),
            tick: Duration::from_millis(50),
            election_ticks: 10,
            heartbeat_ticks: 2,
            checkpoint_frames: 4000,
            compact_log_bytes: 64 << 20,
            write_timeout: Duration::from_secs(10),
            join: false,
            targets: Targets::default(),
            offline_after: Duration::from_secs(3),
            domain: String::new(),
            weight: 0,
            max_request_bytes: crate::DEFAULT_MAX_CLIENT_FRAME,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            tls: Default::default(),
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
        }
    }
}

/// What `<data>/node.json` records.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct NodeFile {
    pub(crate) id: u64,
    pub(crate) cluster: String,
    pub(crate) peers: BTreeMap<u64, SocketAddr>,
    /// Joined an existing cluster: never bootstrap a Raft configuration.
    #[serde(default)]
    pub(crate) joined: bool,
    /// Left the cluster (or was removed): refuse to start.
    #[serde(default)]
    pub(crate) left: bool,
}

impl NodeFile {
    /// Reads `<data_dir>/node.json`.
    pub(crate) fn load(data_dir: &Path) -> Result<NodeFile> {
        let p = data_dir.join("node.json");
        let b = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_slice(&b).map_err(|e| Error::Corrupt(format!("{}: {e}", p.display())))
    }

    /// Writes `<data_dir>/node.json` atomically and durably.
    pub(crate) fn store(&self, data_dir: &Path) -> Result<()> {
        crate::fsutil::write_atomic(
            &data_dir.join("node.json"),
            &serde_json::to_vec_pretty(self).unwrap(),
        )
    }
}

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

enum RaftMsg {
    Step(Message),
    Sm(ToRaft),
    ReadIndex(oneshot::Sender<Result<u64>>),
    /// Propose a configuration change (this node must lead).
    ConfChange(ConfChange, oneshot::Sender<Result<()>>),
    /// Hand leadership to the most up-to-date other voter; answers its id.
    TransferLeader(oneshot::Sender<Result<u64>>),
    Shutdown,
}

/// A registered service, and whether clients (not only members) may call it.
type Service = (Arc<dyn ServiceHandler>, bool);

struct Shared {
    cfg: NodeConfig,
    raft_tx: Mutex<Sender<RaftMsg>>,
    sm_tx: Mutex<Sender<SmMsg>>,
    raft_status: Mutex<RaftStatus>,
    dbs: DbMap,
    progress: Arc<Progress>,
    applied_rx: watch::Receiver<u64>,
    snapshots: Arc<SnapshotStore>,
    transport: Mutex<Option<Arc<Transport>>>,
    peers: Mutex<BTreeMap<u64, SocketAddr>>,
    receiving_snapshot: AtomicBool,
    stopped: AtomicBool,
    forward_pool: Mutex<HashMap<SocketAddr, Vec<RpcConn>>>,
    /// The newest completed read index and when its round started ([`Consistency::Bounded`]).
    fresh: Mutex<Option<(Instant, u64)>>,
    /// Services by name, and whether clients (not only members) may call them.
    services: parking_lot::RwLock<HashMap<String, Service>>,
    /// This node's TLS files (a TLS cluster): the CA signs joiners' certificates.
    tls: Option<crate::net::tls::Material>,
    /// The member registry's view on this node and, while it leads, the role keeper's.
    pub(crate) keeper: Keeper,
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
pub(crate) struct WeakNode {
    shared: std::sync::Weak<Shared>,
    threads: std::sync::Weak<Mutex<Vec<JoinHandle<()>>>>,
    lock: std::sync::Weak<File>,
}

impl WeakNode {
    /// The node, unless it was dropped or shut down.
    pub(crate) fn upgrade(&self) -> Option<Node> {
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

/// Takes the exclusive lock on a data directory (creating it), held while the file lives.
pub(crate) fn lock_data_dir(dir: &Path) -> Result<File> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let p = dir.join("LOCK");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| Error::io(&p, e))?;
    f.try_lock_exclusive().map_err(|_| Error::DataDirInUse {
        dir: dir.to_path_buf(),
    })?;
    Ok(f)
}

/// The id of the node whose data directory is `data_dir`, if one was started there.
pub fn stored_id(data_dir: &Path) -> Result<Option<u64>> {
    Ok(stored_node(data_dir)?.map(|s| s.id))
}

/// What a data directory says about the node that was started in it.
#[derive(Clone, Debug)]
pub struct StoredNode {
    /// Its id.
    pub id: u64,
    /// Its cluster's name.
    pub cluster: String,
    /// The address its peers know it by, if recorded.
    pub addr: Option<SocketAddr>,
}

/// The node started in `data_dir`, if any.
pub fn stored_node(data_dir: &Path) -> Result<Option<StoredNode>> {
    if !data_dir.join("node.json").exists() {
        return Ok(None);
    }
    let nf = NodeFile::load(data_dir)?;
    Ok(Some(StoredNode {
        id: nf.id,
        addr: nf.peers.get(&nf.id).copied(),
        cluster: nf.cluster,
    }))
}

/// Refuses to start the node `nf` describes as `cfg` says: a node that left, or another
/// node's id. (Checked before TLS is set up, whose certificate errors would hide it.)
fn refuse_stored(cfg: &NodeConfig, nf: &NodeFile) -> Result<()> {
    if nf.left {
        return Err(Error::Invalid(format!(
            "node {} left the cluster or was removed from it; its data directory {} \
             cannot be started again: move it away, run `raftsql add-node` on a member \
             and `raftsql join ADDR/TOKEN --data-dir <empty dir>` here",
            nf.id,
            cfg.data_dir.display()
        )));
    }
    if nf.id != cfg.id {
        return Err(Error::Invalid(format!(
            "data directory {} belongs to node {}, not node {}: drop --id (it is \
             read from the directory) or give the data directory of node {}",
            cfg.data_dir.display(),
            nf.id,
            cfg.id,
            cfg.id
        )));
    }
    Ok(())
}

/// The node file `stored` (already read and checked by [`refuse_stored`]), or a new one.
fn load_or_create_node_file(cfg: &NodeConfig, stored: Option<NodeFile>) -> Result<NodeFile> {
    match stored {
        Some(nf) => Ok(nf),
        None => {
            if !cfg.peers.contains_key(&cfg.id) {
                return Err(Error::Invalid(format!(
                    "the peer list does not include this node ({})",
                    cfg.id
                )));
            }
            let nf = NodeFile {
                id: cfg.id,
                cluster: cfg.cluster.clone(),
                peers: cfg.peers.clone(),
                joined: cfg.join,
                left: false,
            };
            nf.store(&cfg.data_dir)?;
            Ok(nf)
        }
    }
}

impl Node {
    /// Starts a node: recovers its state from `data_dir` (or bootstraps a new cluster from
    /// `peers`), binds `listen`, and joins the cluster. Must run inside a tokio runtime.
    ///
    /// A cluster of one in a temporary directory (`NodeConfig::peers` names every member
    /// of a larger one: start each with its own id, the same peers):
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use raftsql_core::{Node, NodeConfig};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// let node = Node::start(NodeConfig::new(1, dir.path(), addr)).await?;
    /// node.wait_ready(Duration::from_secs(10)).await?;
    /// node.execute("main", "CREATE TABLE t(x)", vec![]).await?;
    /// node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn start(mut cfg: NodeConfig) -> Result<Node> {
        if cfg.id == 0 {
            return Err(Error::Invalid("node id must be non-zero".into()));
        }
        let lock = lock_data_dir(&cfg.data_dir)?;
        // SQLite names files by absolute path; so do we (the wal-index is found by path).
        cfg.data_dir = cfg
            .data_dir
            .canonicalize()
            .map_err(|e| Error::io(&cfg.data_dir, e))?;
        let fresh = !cfg.data_dir.join("node.json").exists();
        let stored = if fresh {
            None
        } else {
            Some(NodeFile::load(&cfg.data_dir)?)
        };
        if let Some(nf) = &stored {
            refuse_stored(&cfg, nf)?;
        }
        let material = crate::net::tls::setup(&cfg, fresh)?;
        let peer_tls = match &material {
            Some(m) => Some(Arc::new(crate::net::tls::PeerTls::new(m, &cfg.tls.client)?)),
            None => None,
        };
        let nf = load_or_create_node_file(&cfg, stored)?;
        cfg.peers = nf.peers.clone();
        cfg.cluster = nf.cluster.clone();

        cfg.join = nf.joined;
        let mut log = RaftLog::open(&cfg.data_dir.join("raft"))?;
        if !log.is_initialized() && !cfg.join {
            let mut cs = ConfState::default();
            cs.voters = cfg.peers.keys().copied().collect();
            log.bootstrap(cs)?;
        }
        if !cfg.join && log.last_index() == 0 && log.first_index() == 1 {
            // The initial voters are also written as committed configuration entries 1..n
            // (as etcd does), so that a node joining later and replaying the log from index
            // 1 learns the whole configuration, not only the changes made after it.
            let mut entries = Vec::new();
            for (i, id) in log.conf_state().voters.clone().into_iter().enumerate() {
                let mut cc = ConfChange::default();
                cc.set_change_type(raft::eraftpb::ConfChangeType::AddNode);
                cc.node_id = id;
                let mut e = raft::eraftpb::Entry::default();
                e.set_entry_type(EntryType::EntryConfChange);
                e.term = 1;
                e.index = i as u64 + 1;
                e.data = cc
                    .write_to_bytes()
                    .map_err(|x| Error::Internal(x.to_string()))?
                    .into();
                entries.push(e);
            }
            log.append(&entries)?;
            let mut hs = log.hard_state().clone();
            hs.term = hs.term.max(1);
            hs.commit = entries.len() as u64;
            log.set_hard_state(&hs)?;
            log.sync()?;
        }
        // Bring the database files up to the committed log before SQLite reads them.
        state::recover_files(&cfg.data_dir.join("state"), &log)?;
        let snapshots = Arc::new(SnapshotStore::open(
            &cfg.data_dir.join("snapshots"),
            cfg.id,
        )?);
        let (raft_tx, raft_rx) = mpsc::channel::<RaftMsg>();
        let (sm_tx, sm_rx) = mpsc::channel::<SmMsg>();
        let dbs: DbMap = Default::default();
        let progress = Arc::new(Progress::default());
        let (applied_tx, applied_rx) = watch::channel(0u64);
        let to_raft = {
            let tx = Mutex::new(raft_tx.clone());
            Box::new(move |m: ToRaft| {
                let _ = tx.lock().send(RaftMsg::Sm(m));
            }) as Box<dyn Fn(ToRaft) + Send>
        };
        let metrics = crate::metrics::Metrics::new();
        let sm = StateMachine::open(
            cfg.id,
            &cfg.data_dir.join("state"),
            SmSettings {
                checkpoint_frames: cfg.checkpoint_frames,
                max_result_bytes: cfg.max_result_bytes,
                statement_timeout: cfg.statement_timeout,
                metrics: metrics.write.clone(),
            },
            to_raft,
            dbs.clone(),
            progress.clone(),
            snapshots.clone(),
            applied_tx,
        )?;
        let meta = sm.meta().clone();
        // A crash between installing a snapshot into the state directory and rebasing the
        // log leaves the databases ahead of the log: rebase the log now.
        if meta.checkpoint_index <= log.last_index()
            && meta.checkpoint_index > log.hard_state().commit
        {
            // The databases hold entries this node applied, so they were committed; the
            // hard state just had not recorded it yet.
            let mut hs = log.hard_state().clone();
            hs.commit = meta.checkpoint_index;
            log.set_hard_state(&hs)?;
            log.sync()?;
        } else if meta.checkpoint_index > log.last_index() {
            let mut md = SnapshotMetadata::default();
            md.index = meta.checkpoint_index;
            md.term = meta.checkpoint_term;
            let mut cs = ConfState::default();
            cs.voters = meta.voters.clone();
            cs.learners = meta.learners.clone();
            if cs.voters.is_empty() {
                cs = log.conf_state().clone();
            }
            md.set_conf_state(cs);
            log.apply_snapshot(&md)?;
        }
        if meta.checkpoint_index + 1 < log.first_index() {
            return Err(Error::Corrupt(format!(
                "the Raft log starts at {} but the databases are only durable up to {}: entries in between are missing",
                log.first_index(),
                meta.checkpoint_index
            )));
        }
        *snapshots.conf_state.lock() = log.conf_state().clone();
        snapshots
            .log_first_index
            .store(log.first_index(), Ordering::SeqCst);
        snapshots.set_state_machine(sm_tx.clone());
        let storage = LogStorage::new(log, snapshots.clone());

        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied: meta.checkpoint_index,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        raft_cfg.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&raft_cfg, storage.clone(), &logger)?;

        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            raft_tx: Mutex::new(raft_tx.clone()),
            sm_tx: Mutex::new(sm_tx.clone()),
            raft_status: Mutex::new(RaftStatus::default()),
            metrics,
            dbs,
            progress: progress.clone(),
            applied_rx,
            snapshots: snapshots.clone(),
            transport: Mutex::new(None),
            peers: Mutex::new(cfg.peers.clone()),
            receiving_snapshot: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            forward_pool: Mutex::new(HashMap::new()),
            fresh: Mutex::new(None),
            services: parking_lot::RwLock::new(HashMap::new()),
            tls: material,
            keeper: Keeper::default(),
            departed: watch::channel(None).0,
        });
        let handler = Arc::new(NodeHandler {
            shared: Arc::downgrade(&shared),
        });
        // Removed members are refused from the first connection on, not only once the
        // registry is read again.
        let system = shared.dbs.read().get(crate::members::SYSTEM_DB).cloned();
        let revoked = match system {
            Some(h) => h.read(crate::members::read_removed)?,
            None => Default::default(),
        };
        let options = crate::net::transport::TransportOptions {
            max_client_frame: cfg.max_request_bytes,
            tls: peer_tls,
            revoked,
        };
        let (transport, _) = Transport::bind(cfg.id, &cfg.cluster, cfg.listen, options, handler)
            .await
            .map_err(|e| Error::io(PathBuf::from(cfg.listen.to_string()), e))?;
        for (id, addr) in &cfg.peers {
            transport.set_peer(*id, *addr);
        }
        *shared.transport.lock() = Some(transport.clone());

        let mut threads = Vec::new();
        threads.push(
            std::thread::Builder::new()
                .name("raftsql-sm".into())
                .spawn(move || sm.run(sm_rx))
                .expect("spawn state machine thread"),
        );
        let driver = RaftDriver {
            raw,
            storage,
            rx: raft_rx,
            sm_tx,
            transport,
            shared: shared.clone(),
            reads: HashMap::new(),
            waiting_reads: Vec::new(),
            next_read: 1,
            read_nonce: rand::random(),
            compact_log_bytes: cfg.compact_log_bytes,
            last_leader: (false, 0),
        };
        let tick = cfg.tick;
        threads.push(
            std::thread::Builder::new()
                .name("raftsql-raft".into())
                .spawn(move || driver.run(tick))
                .expect("spawn raft thread"),
        );
        tracing::info!(id = cfg.id, listen = %cfg.listen, "node started at checkpoint {}", meta.checkpoint_index);
        let node = Node {
            shared,
            threads: Arc::new(Mutex::new(threads)),
            _lock: Arc::new(lock),
        };
        crate::members::start(&node);
        crate::backup::start(&node);
        Ok(node)
    }

    /// How this node dials its peers (plain TCP, or TLS with its node certificate).
    pub fn dialer(&self) -> Dialer {
        self.shared.dialer()
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.shared.cfg.id
    }

    /// Current status.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// let s = node.status();
    /// assert_eq!(s.raft.leader_id, node.id());
    /// assert!(s.applied >= s.raft.commit.min(s.applied));
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn status(&self) -> Status {
        self.shared.status()
    }

    /// Runs one write statement (atomically, replicated) and says what it changed.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// use raftsql_core::Value;
    /// node.execute("main", "CREATE TABLE kv(k TEXT PRIMARY KEY, v)", vec![]).await?;
    /// let r = node
    ///     .execute("main", "INSERT INTO kv VALUES (?1, ?2)", vec!["a".into(), Value::Integer(1)])
    ///     .await?;
    /// assert_eq!(r.rows_affected, 1);
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn execute(&self, db: &str, sql: &str, params: Vec<Value>) -> Result<ExecResult> {
        let mut r = self
            .execute_batch(db, vec![Statement::with_params(sql, params)])
            .await?;
        Ok(r.pop().unwrap_or_default())
    }

    /// Runs statements atomically as one transaction: all take effect or none.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// use raftsql_core::{Error, Statement};
    /// node.execute("main", "CREATE TABLE kv(k TEXT PRIMARY KEY, v)", vec![]).await?;
    /// let batch = vec![
    ///     Statement::new("INSERT INTO kv VALUES ('a', 1)"),
    ///     Statement::new("INSERT INTO kv VALUES ('a', 2)"), // fails: the batch is rolled back
    /// ];
    /// let e = node.execute_batch("main", batch).await.unwrap_err();
    /// assert!(matches!(e, Error::Constraint { .. }));
    /// let n = node.query("main", "SELECT count(*) FROM kv", vec![]).await?;
    /// assert_eq!(n.rows[0][0], raftsql_core::Value::Integer(0));
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn execute_batch(&self, db: &str, stmts: Vec<Statement>) -> Result<Vec<ExecResult>> {
        self.shared.execute_batch(db, stmts).await
    }

    /// Runs `f` as a write on the leader: inside the group-commit transaction, in its own
    /// SAVEPOINT (if it fails, only its changes are rolled back), on the writer connection.
    /// Returns `f`'s result once the transaction is committed by a quorum and applied here.
    /// `f` must be deterministic only in what it returns: replicas get its pages, not a re-run.
    /// On a follower: [`Error::NotLeader`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// // A read-modify-write in Rust, atomic on the leader.
    /// node.execute("main", "CREATE TABLE c(id INTEGER PRIMARY KEY, n INTEGER)", vec![]).await?;
    /// let n: i64 = node
    ///     .write("main", |c| {
    ///         c.execute("INSERT OR IGNORE INTO c VALUES (1, 0)", [])?;
    ///         c.execute("UPDATE c SET n = n + 1 WHERE id = 1", [])?;
    ///         Ok(c.query_row("SELECT n FROM c WHERE id = 1", [], |r| r.get(0))?)
    ///     })
    ///     .await?;
    /// assert_eq!(n, 1);
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn write<T, F>(&self, db: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<T> + Send + 'static,
    {
        let f: state::WriteFn =
            Box::new(move |c| f(c).map(|t| Box::new(t) as Box<dyn std::any::Any + Send>));
        let out = self.shared.write_fn(db, f).await?;
        out.downcast::<T>()
            .map(|b| *b)
            .map_err(|_| Error::Internal("write result of an unexpected type".into()))
    }

    /// Runs `f` on a read transaction of `db`, as fresh as `consistency` asks: it sees only
    /// committed entries, as of one consistent point. `Ok(None)` if `db` does not exist yet.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// use raftsql_core::Consistency;
    /// node.execute("main", "CREATE TABLE t(x)", vec![]).await?;
    /// let n: Option<i64> = node
    ///     .read("main", Consistency::Linearizable, |c| {
    ///         Ok(c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?)
    ///     })
    ///     .await?;
    /// assert_eq!(n, Some(0));
    /// // A database nobody has written is `None`.
    /// assert!(node.read("nothing", Consistency::Local, |_| Ok(())).await?.is_none());
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn read<T, F>(&self, db: &str, consistency: Consistency, f: F) -> Result<Option<T>>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<T> + Send + 'static,
    {
        state::check_db_name(db)?;
        self.shared.read_barrier(consistency).await?;
        let Some(handle) = self.shared.dbs.read().get(db).cloned() else {
            return Ok(None);
        };
        tokio::task::spawn_blocking(move || handle.read(f).map(Some))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
    }

    /// Registers a service other members can call (see [`ServiceHandler`]); a connection
    /// that did not identify as a member (a client) is refused.
    pub fn register_service(&self, name: &str, handler: Arc<dyn ServiceHandler>) {
        self.shared
            .services
            .write()
            .insert(name.to_string(), (handler, false));
    }

    /// Registers a service that clients may call too.
    pub fn register_client_service(&self, name: &str, handler: Arc<dyn ServiceHandler>) {
        self.shared
            .services
            .write()
            .insert(name.to_string(), (handler, true));
    }

    /// This node's TLS files, if the cluster runs TLS.
    pub(crate) fn tls_material(&self) -> Option<&crate::net::tls::Material> {
        self.shared.tls.as_ref()
    }

    /// Calls `service` on the current leader (which may be this node) and returns its reply.
    /// A call whose answer is lost after it was sent is [`Error::OutcomeUnknown`].
    pub async fn call_leader(&self, service: &str, payload: Bytes) -> Result<Bytes> {
        self.shared.call_leader(service, payload).await
    }

    /// The index of the last entry applied here, and every later change of it.
    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.shared.applied_rx.clone()
    }

    /// Runs a query with a linearizable read (ReadIndex): it sees every write acknowledged
    /// before it started, on any node.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// let rows = node.query("main", "SELECT 1 + ?1", vec![raftsql_core::Value::Integer(41)]).await?;
    /// assert_eq!(rows.rows, vec![vec![raftsql_core::Value::Integer(42)]]);
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn query(&self, db: &str, sql: &str, params: Vec<Value>) -> Result<Rows> {
        self.query_with(db, sql, params, Consistency::Linearizable)
            .await
    }

    /// Runs a query as fresh as `consistency` asks.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// use std::time::Duration;
    /// use raftsql_core::Consistency;
    /// node.execute("main", "CREATE TABLE t(x)", vec![]).await?;
    /// node.execute("main", "INSERT INTO t VALUES (1)", vec![]).await?;
    /// // At most 1 s stale: served without a round trip if this node confirmed its state
    /// // within the last second.
    /// let bounded = Consistency::Bounded(Duration::from_secs(1));
    /// let rows = node.query_with("main", "SELECT x FROM t", vec![], bounded).await?;
    /// assert_eq!(rows.rows, vec![vec![raftsql_core::Value::Integer(1)]]);
    /// // Whatever this node has applied (here: the leader, so everything).
    /// let rows = node.query_with("main", "SELECT x FROM t", vec![], Consistency::Local).await?;
    /// assert_eq!(rows.columns, vec!["x"]);
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn query_with(
        &self,
        db: &str,
        sql: &str,
        params: Vec<Value>,
        consistency: Consistency,
    ) -> Result<Rows> {
        self.shared
            .query(db, Statement::with_params(sql, params), consistency)
            .await
    }

    /// Starts an interactive transaction on `db` (leader only). It holds the writer, so other
    /// writes wait; it is rolled back after `idle` without a statement, or when dropped.
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// # let node = raftsql_core::Node::start(raftsql_core::NodeConfig::new(1, dir.path(), addr)).await?;
    /// # node.wait_ready(std::time::Duration::from_secs(10)).await?;
    /// use std::time::Duration;
    /// node.execute("main", "CREATE TABLE acct(id INTEGER PRIMARY KEY, balance INTEGER)", vec![]).await?;
    /// node.execute("main", "INSERT INTO acct VALUES (1, 100), (2, 0)", vec![]).await?;
    /// let mut tx = node.transaction("main", Duration::from_secs(5)).await?;
    /// let (rows, _) = tx.execute("SELECT balance FROM acct WHERE id = 1", vec![]).await?;
    /// assert_eq!(rows.rows[0][0], raftsql_core::Value::Integer(100));
    /// tx.execute("UPDATE acct SET balance = balance - 30 WHERE id = 1", vec![]).await?;
    /// tx.execute("UPDATE acct SET balance = balance + 30 WHERE id = 2", vec![]).await?;
    /// tx.commit().await?; // returns once a quorum has it
    /// let sum = node.query("main", "SELECT sum(balance) FROM acct", vec![]).await?;
    /// assert_eq!(sum.rows[0][0], raftsql_core::Value::Integer(100));
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn transaction(&self, db: &str, idle: Duration) -> Result<Transaction> {
        let id = self.shared.tx_begin(db, idle).await?;
        Ok(Transaction {
            shared: self.shared.clone(),
            id,
            done: false,
        })
    }

    /// Every member's id and address.
    pub fn peers(&self) -> BTreeMap<u64, SocketAddr> {
        self.shared.peers.lock().clone()
    }

    /// Names of the databases on this node.
    pub fn databases(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shared.dbs.read().keys().cloned().collect();
        v.sort();
        v
    }

    pub(crate) fn downgrade(&self) -> WeakNode {
        WeakNode {
            shared: Arc::downgrade(&self.shared),
            threads: Arc::downgrade(&self.threads),
            lock: Arc::downgrade(&self._lock),
        }
    }

    pub(crate) fn snapshots(&self) -> Arc<SnapshotStore> {
        self.shared.snapshots.clone()
    }

    pub(crate) fn shared_keeper(&self) -> &Keeper {
        &self.shared.keeper
    }

    /// Waits until the cluster can serve this node: a leader is known and has committed an
    /// entry of its term, and this node has applied it (so a linearizable read here, or a
    /// write on the leader, no longer fails for want of a leader). A freshly started
    /// cluster needs an election first (about one election timeout).
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use raftsql_core::{Node, NodeConfig};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// let node = Node::start(NodeConfig::new(1, dir.path(), addr)).await?;
    /// node.wait_ready(Duration::from_secs(10)).await?;
    /// assert!(node.is_leader()); // a cluster of one
    /// # node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.shared.raft_status.lock().clone();
            if status.leader_id != 0 && (status.heard_leader || status.role == "leader") {
                let left = deadline.saturating_duration_since(Instant::now());
                let index = tokio::time::timeout(left, self.shared.read_index()).await;
                if let Ok(Ok(index)) = index {
                    return self.shared.wait_applied(index).await;
                }
            }
            if self.shared.stopped.load(Ordering::SeqCst) {
                return Err(Error::Shutdown);
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "no leader confirmed within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether this node leads the cluster right now.
    pub fn is_leader(&self) -> bool {
        self.shared.raft_status.lock().role == "leader"
    }

    /// The applied Raft configuration: (voters, standbys).
    pub fn conf_roles(&self) -> (Vec<u64>, Vec<u64>) {
        let cs = self.shared.snapshots.conf_state.lock();
        (cs.voters.clone(), cs.learners.clone())
    }

    /// The node's metrics (for a `/metrics` endpoint; see [`crate::Metrics`]).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.shared.metrics
    }

    /// This node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.shared.cfg
    }

    /// Hands leadership to the most up-to-date other voter and waits (up to 3 s) until that
    /// node leads; answers its id.
    pub async fn transfer_leadership(&self) -> Result<u64> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .raft_tx
            .lock()
            .send(RaftMsg::TransferLeader(tx))
            .map_err(|_| Error::Shutdown)?;
        let to = rx.await.map_err(|_| Error::Shutdown)??;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let leader = self.shared.raft_status.lock().leader_id;
            if leader == to {
                return Ok(to);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(Error::Unavailable(format!(
            "node {to} did not take leadership within 3 s"
        )))
    }

    /// Applies one role change through a Raft configuration change and waits (up to 5 s)
    /// until this node has applied it. Leader only.
    pub(crate) async fn change_role(&self, c: Change) -> Result<()> {
        use raft::eraftpb::ConfChangeType;
        let mut cc = ConfChange::default();
        cc.node_id = c.id;
        cc.set_change_type(match c.to {
            Role::Voter => ConfChangeType::AddNode,
            Role::Standby => ConfChangeType::AddLearnerNode,
            Role::Spare => ConfChangeType::RemoveNode,
        });
        let (tx, rx) = oneshot::channel();
        self.shared
            .raft_tx
            .lock()
            .send(RaftMsg::ConfChange(cc, tx))
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)??;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let (voters, learners) = self.conf_roles();
            if Role::of(c.id, &voters, &learners) == c.to {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(Error::Timeout(Duration::from_secs(5)))
    }

    /// Changes once this node has left the cluster or been removed from it: `Some(why)`.
    pub fn departed(&self) -> watch::Receiver<Option<String>> {
        self.shared.departed.subscribe()
    }

    /// Records that this node is no longer a member (its data directory will refuse to
    /// start again) and tells [`Node::departed`] watchers.
    pub(crate) fn mark_departed(&self, why: String) {
        self.shared.mark_departed(why);
    }

    /// Member `by` refused this node's connection (see `Shared::refused`).
    pub(crate) fn refused(&self, by: u64, refusal: pb::Refused) {
        self.shared.refused(by, refusal);
    }

    /// The removed members: the transport refuses their connections.
    pub(crate) fn set_revoked(&self, ids: std::collections::HashSet<u64>) {
        if let Some(t) = self.shared.transport.lock().as_ref() {
            t.set_revoked(ids);
        }
    }

    /// Replaces the addresses of the other members (from the replicated registry).
    pub(crate) fn set_peers(&self, peers: BTreeMap<u64, SocketAddr>) {
        let transport = self.shared.transport.lock().clone();
        let mut cur = self.shared.peers.lock();
        if let Some(t) = &transport {
            for (id, addr) in &peers {
                t.set_peer(*id, *addr);
            }
            for id in cur.keys() {
                if !peers.contains_key(id) {
                    t.remove_peer(*id);
                }
            }
        }
        *cur = peers;
    }

    /// Raft status (leader, term, commit index, role).
    pub(crate) fn raft_status(&self) -> RaftStatus {
        self.shared.raft_status.lock().clone()
    }

    /// Digest of each database's pages (equal on every replica once they applied the same
    /// index).
    pub async fn digests(&self) -> Result<BTreeMap<String, String>> {
        self.shared.digests().await
    }

    /// Stops the node: the Raft and state machine threads finish, files are closed, the data
    /// directory lock is released when the last clone is dropped.
    pub async fn shutdown(&self) {
        if self.shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        // A leader hands over first, so that the cluster has no election gap.
        if self.is_leader() && self.conf_roles().0.len() > 1 {
            match tokio::time::timeout(Duration::from_secs(3), self.transfer_leadership()).await {
                Ok(Ok(to)) => tracing::info!("handed leadership to node {to} before stopping"),
                Ok(Err(e)) => tracing::warn!("could not hand leadership over: {e}"),
                Err(_) => tracing::warn!("leadership transfer timed out"),
            }
        }
        if self.shared.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(t) = self.shared.transport.lock().take() {
            t.close();
        }
        let _ = self.shared.raft_tx.lock().send(RaftMsg::Shutdown);
        let _ = self.shared.sm_tx.lock().send(SmMsg::Shutdown);
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        tracing::info!(id = self.id(), "node stopped");
    }
}

/// An interactive transaction (see [`Node::transaction`]).
pub struct Transaction {
    shared: Arc<Shared>,
    id: u64,
    done: bool,
}

impl Transaction {
    /// Runs a statement inside the transaction; returns its rows (if any) and changes.
    pub async fn execute(&mut self, sql: &str, params: Vec<Value>) -> Result<(Rows, ExecResult)> {
        self.shared
            .tx_exec(self.id, Statement::with_params(sql, params))
            .await
    }

    /// Commits: returns once the transaction is committed by a quorum.
    pub async fn commit(mut self) -> Result<()> {
        self.done = true;
        self.shared.tx_end(self.id, true).await
    }

    /// Rolls back.
    pub fn rollback(mut self) {
        self.done = true;
        let _ = self
            .shared
            .send_sm(SmMsg::Tx(TxOp::Rollback { id: self.id }));
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if !self.done {
            let _ = self
                .shared
                .send_sm(SmMsg::Tx(TxOp::Rollback { id: self.id }));
        }
    }
}

impl Shared {
    fn send_sm(&self, m: SmMsg) -> Result<()> {
        self.sm_tx.lock().send(m).map_err(|_| Error::Shutdown)
    }

    fn status(&self) -> Status {
        let raft = self.raft_status.lock().clone();
        let leader_addr = self.peers.lock().get(&raft.leader_id).copied();
        Status {
            id: self.cfg.id,
            leader_addr,
            applied: self.progress.applied.load(Ordering::SeqCst),
            checkpoint: self.progress.checkpoint.load(Ordering::SeqCst),
            raft,
        }
    }

    fn with_leader_hint(&self, e: Error) -> Error {
        match e {
            Error::NotLeader { .. } => {
                let id = self.raft_status.lock().leader_id;
                let addr = self.peers.lock().get(&id).map(|a| a.to_string());
                Error::NotLeader {
                    leader_id: (id != 0 && id != self.cfg.id).then_some(id),
                    leader_addr: if id != self.cfg.id { addr } else { None },
                }
            }
            other => other,
        }
    }

    async fn execute_batch(&self, db: &str, stmts: Vec<Statement>) -> Result<Vec<ExecResult>> {
        if stmts.is_empty() {
            state::check_db_name(db)?;
            return Ok(Vec::new());
        }
        let (tx, rx) = oneshot::channel();
        self.submit_write(db, state::Work::Statements { stmts, reply: tx }, rx)
            .await
    }

    async fn write_fn(&self, db: &str, f: state::WriteFn) -> Result<Box<dyn std::any::Any + Send>> {
        let (tx, rx) = oneshot::channel();
        self.submit_write(db, state::Work::Func { f, reply: tx }, rx)
            .await
    }

    /// Queues a write for the state machine and waits for its answer.
    async fn submit_write<T>(
        &self,
        db: &str,
        work: state::Work,
        rx: oneshot::Receiver<Result<T>>,
    ) -> Result<T> {
        state::check_db_name(db)?;
        if self.raft_status.lock().role != "leader" {
            return Err(self.with_leader_hint(Error::NotLeader {
                leader_id: None,
                leader_addr: None,
            }));
        }
        let timeout = self.cfg.write_timeout;
        self.send_sm(SmMsg::Write(WriteReq {
            db: db.to_string(),
            work,
            deadline: Instant::now() + timeout,
        }))?;
        match tokio::time::timeout(timeout + Duration::from_secs(1), rx).await {
            Ok(Ok(r)) => r.map_err(|e| match e {
                Error::Timeout(_) => Error::Timeout(timeout),
                e => self.with_leader_hint(e),
            }),
            Ok(Err(_)) => Err(Error::Shutdown),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// Opens an interactive transaction (waits up to the write timeout for the writer).
    async fn tx_begin(&self, db: &str, idle: Duration) -> Result<u64> {
        state::check_db_name(db)?;
        let deadline = Instant::now() + self.cfg.write_timeout;
        loop {
            let (tx, rx) = oneshot::channel();
            self.send_sm(SmMsg::Tx(TxOp::Begin {
                db: db.to_string(),
                idle,
                reply: tx,
            }))?;
            match rx.await.map_err(|_| Error::Shutdown)? {
                Ok(id) => return Ok(id),
                Err(Error::Unavailable(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) => return Err(self.with_leader_hint(e)),
            }
        }
    }

    async fn tx_exec(&self, id: u64, stmt: Statement) -> Result<(Rows, ExecResult)> {
        let (tx, rx) = oneshot::channel();
        self.send_sm(SmMsg::Tx(TxOp::Exec {
            id,
            stmt,
            reply: tx,
        }))?;
        rx.await.map_err(|_| Error::Shutdown)?
    }

    /// Commits (answers once committed by a quorum) or rolls back.
    async fn tx_end(&self, id: u64, commit: bool) -> Result<()> {
        if !commit {
            return self.send_sm(SmMsg::Tx(TxOp::Rollback { id }));
        }
        let (tx, rx) = oneshot::channel();
        self.send_sm(SmMsg::Tx(TxOp::Commit { id, reply: tx }))?;
        match tokio::time::timeout(self.cfg.write_timeout, rx).await {
            Ok(r) => r
                .map_err(|_| Error::Shutdown)?
                .map_err(|e| self.with_leader_hint(e)),
            Err(_) => Err(Error::Timeout(self.cfg.write_timeout)),
        }
    }

    /// How this node dials its peers.
    fn dialer(&self) -> Dialer {
        self.transport
            .lock()
            .as_ref()
            .map(|t| t.dialer().clone())
            .unwrap_or_default()
    }

    /// A pooled connection to the leader, with its address.
    async fn leader_conn(&self) -> Result<(SocketAddr, RpcConn)> {
        let leader = self.raft_status.lock().leader_id;
        let addr = self.peers.lock().get(&leader).copied();
        let Some(addr) = addr.filter(|_| leader != 0) else {
            return Err(Error::Unavailable(
                "no leader is known right now (an election may be in progress)".into(),
            ));
        };
        let pooled = self
            .forward_pool
            .lock()
            .get_mut(&addr)
            .and_then(|v| v.pop());
        if let Some(mut c) = pooled {
            if !c.is_closed() {
                return Ok((addr, c));
            }
        }
        let c = RpcConn::connect(
            &self.dialer(),
            Peer::Node(leader),
            addr,
            self.cfg.id,
            &self.cfg.cluster,
            Some(self.cfg.listen.ip()),
        )
        .await
        .map_err(|e| Error::Unavailable(format!("cannot reach the leader at {addr}: {e}")))?;
        Ok((addr, c))
    }

    async fn call_leader(&self, service: &str, payload: Bytes) -> Result<Bytes> {
        if self.raft_status.lock().role == "leader" {
            let h = self.services.read().get(service).map(|(h, _)| h.clone());
            let h =
                h.ok_or_else(|| Error::Invalid(format!("no service {service:?} on this node")))?;
            return h.call(payload).await;
        }
        let (addr, mut conn) = self.leader_conn().await?;
        let body = pb::request::Body::Service(pb::ServiceCall {
            service: service.to_string(),
            payload,
        });
        match conn.call(body).await {
            Ok(pb::response::Body::Service(r)) => {
                self.forward_pool.lock().entry(addr).or_default().push(conn);
                self.catch_up_to(r.applied).await;
                Ok(r.payload)
            }
            Ok(pb::response::Body::Error(e)) => {
                self.forward_pool.lock().entry(addr).or_default().push(conn);
                Err(crate::client::from_pb(e))
            }
            Ok(_) => Err(Error::Transport("unexpected response".into())),
            Err(_) => Err(Error::OutcomeUnknown),
        }
    }

    /// Sends a write that reached this follower to the leader and relays the answer.
    async fn forward_execute(&self, mut req: pb::ExecuteRequest) -> pb::Response {
        let leader = self.raft_status.lock().leader_id;
        let addr = self.peers.lock().get(&leader).copied();
        let Some(addr) = addr.filter(|_| leader != 0 && leader != self.cfg.id) else {
            return error_response(
                0,
                &Error::Unavailable(
                    "no leader is known right now (an election may be in progress)".into(),
                ),
            );
        };
        req.forwarded = true;
        let pooled = self
            .forward_pool
            .lock()
            .get_mut(&addr)
            .and_then(|v| v.pop());
        let mut conn = match pooled {
            Some(c) => c,
            None => match RpcConn::connect(
                &self.dialer(),
                Peer::Node(leader),
                addr,
                self.cfg.id,
                &self.cfg.cluster,
                Some(self.cfg.listen.ip()),
            )
            .await
            {
                Ok(c) => c,
                Err(e) => {
                    return error_response(
                        0,
                        &Error::Unavailable(format!("cannot reach the leader at {addr}: {e}")),
                    )
                }
            },
        };
        if conn.is_closed() {
            match RpcConn::connect(
                &self.dialer(),
                Peer::Node(leader),
                addr,
                self.cfg.id,
                &self.cfg.cluster,
                Some(self.cfg.listen.ip()),
            )
            .await
            {
                Ok(c) => conn = c,
                Err(e) => {
                    return error_response(
                        0,
                        &Error::Unavailable(format!("cannot reach the leader at {addr}: {e}")),
                    )
                }
            }
        }
        match conn.call(pb::request::Body::Execute(req)).await {
            Ok(body) => {
                self.forward_pool.lock().entry(addr).or_default().push(conn);
                let body = match body {
                    pb::response::Body::Execute(mut r) => {
                        r.leader_addr = addr.to_string();
                        self.catch_up_to(r.applied).await;
                        pb::response::Body::Execute(r)
                    }
                    other => other,
                };
                pb::Response {
                    id: 0,
                    body: Some(body),
                }
            }
            // Sent, but no answer: the leader may or may not have run it.
            Err(_) => error_response(0, &Error::OutcomeUnknown),
        }
    }

    /// A read index: every write committed before this call started is at or below it.
    /// The newest one (by start) is kept for [`Consistency::Bounded`] reads.
    async fn read_index(&self) -> Result<u64> {
        let started = Instant::now();
        self.metrics.read_index.inc();
        let (tx, rx) = oneshot::channel();
        self.raft_tx
            .lock()
            .send(RaftMsg::ReadIndex(tx))
            .map_err(|_| Error::Shutdown)?;
        let index = match tokio::time::timeout(READ_INDEX_TIMEOUT, rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(Error::Shutdown),
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "no leader confirmed a read index within {READ_INDEX_TIMEOUT:?} (no quorum?)"
                )))
            }
        };
        let mut fresh = self.fresh.lock();
        if fresh.is_none_or(|(s, i)| s < started && i <= index) {
            *fresh = Some((started, index));
        }
        Ok(index)
    }

    /// After a forwarded write: waits (boundedly) until this node has applied what the leader
    /// had applied when it answered, so that the caller reads its own write here. The write
    /// is committed either way; if this node is cut off from the leader, the answer goes out
    /// after the wait and only local reads may lag.
    async fn catch_up_to(&self, index: u64) {
        let mut rx = self.applied_rx.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|a| *a >= index)).await;
    }

    async fn wait_applied(&self, index: u64) -> Result<()> {
        let mut rx = self.applied_rx.clone();
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            rx.wait_for(|a| *a >= index).await.map(|_| ())
        })
        .await;
        match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Error::Shutdown),
            Err(_) => Err(Error::Timeout(Duration::from_secs(10))),
        }
    }

    /// Waits until this node's state is as fresh as `c` asks (see [`Consistency`]).
    async fn read_barrier(&self, c: Consistency) -> Result<()> {
        let index = match c {
            Consistency::Local => return Ok(()),
            Consistency::Linearizable => self.read_index().await?,
            Consistency::Bounded(bound) => {
                let fresh = *self.fresh.lock();
                match fresh {
                    Some((started, index)) if started.elapsed() <= bound => index,
                    _ => self.read_index().await?,
                }
            }
        };
        self.wait_applied(index).await
    }

    async fn query(&self, db: &str, stmt: Statement, consistency: Consistency) -> Result<Rows> {
        state::check_db_name(db)?;
        self.read_barrier(consistency).await?;
        let handle = self.dbs.read().get(db).cloned();
        let (max, budget) = (self.cfg.max_result_bytes, self.cfg.statement_timeout);
        // A database nobody has written yet reads as an empty one (SQLite's behaviour on a
        // file that does not exist), so a fresh cluster answers `SELECT 1`.
        tokio::task::spawn_blocking(move || match handle {
            Some(h) => h.query(&stmt, max, budget),
            None => state::query_empty(&stmt, max, budget),
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
    }

    async fn digests(&self) -> Result<BTreeMap<String, String>> {
        let handles: Vec<_> = self.dbs.read().values().cloned().collect();
        tokio::task::spawn_blocking(move || {
            let mut out = BTreeMap::new();
            for h in handles {
                let d = h.digest()?;
                // An empty file (a first write that failed on the leader) holds no data and
                // exists only where it was tried: not part of the replicated state.
                if !d.starts_with("0:") {
                    out.insert(h.name.clone(), d);
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
    }

    async fn status_pb(&self, with_digests: bool) -> pb::Response {
        let s = self.status();
        let db_digests = if with_digests {
            match self.digests().await {
                Ok(d) => d.into_iter().collect(),
                Err(e) => return error_response(0, &e),
            }
        } else {
            Default::default()
        };
        pb::Response {
            id: 0,
            body: Some(pb::response::Body::Status(pb::StatusResponse {
                id: s.id,
                leader_id: s.raft.leader_id,
                leader_addr: s.leader_addr.map(|a| a.to_string()).unwrap_or_default(),
                term: s.raft.term,
                commit_index: s.raft.commit,
                applied_index: s.applied,
                checkpoint_index: s.checkpoint,
                role: s.raft.role.clone(),
                log_first_index: s.raft.log_first,
                log_last_index: s.raft.log_last,
                db_digests,
            })),
        }
    }
}

/// The consistency a query asks for on the wire (an unknown level: linearizable).
fn consistency_of(q: &pb::QueryRequest) -> Consistency {
    match pb::ReadConsistency::try_from(q.consistency) {
        Ok(pb::ReadConsistency::Local) => Consistency::Local,
        Ok(pb::ReadConsistency::Bounded) => {
            Consistency::Bounded(Duration::from_millis(q.max_staleness_ms))
        }
        _ => Consistency::Linearizable,
    }
}

/// Maps an error to its wire form.
pub fn error_response(id: u64, e: &Error) -> pb::Response {
    use pb::error::Code;
    let mut err = pb::Error {
        code: Code::Internal as i32,
        message: e.to_string(),
        ..Default::default()
    };
    match e {
        Error::NotLeader {
            leader_id,
            leader_addr,
        } => {
            err.code = Code::NotLeader as i32;
            err.leader_id = leader_id.unwrap_or(0);
            err.leader_addr = leader_addr.clone().unwrap_or_default();
        }
        Error::Sql { code, message } | Error::Constraint { code, message } => {
            err.code = Code::Sql as i32;
            err.sqlite_code = *code;
            err.message = message.clone();
        }
        Error::OutcomeUnknown => err.code = Code::OutcomeUnknown as i32,
        // The message travels without the variant's prefix, which `from_pb` restores.
        Error::Unavailable(m) => {
            err.code = Code::Unavailable as i32;
            err.message = m.clone();
        }
        Error::Timeout(d) => {
            err.code = Code::Timeout as i32;
            err.timeout_ms = d.as_millis().min(u64::MAX as u128) as u64;
        }
        Error::Invalid(m) => {
            err.code = Code::Invalid as i32;
            err.message = m.clone();
        }
        Error::Shutdown => err.code = Code::Shutdown as i32,
        _ => {}
    }
    pb::Response {
        id,
        body: Some(pb::response::Body::Error(err)),
    }
}

struct NodeHandler {
    shared: std::sync::Weak<Shared>,
}

impl Shared {
    /// Member `by` refused this node's connection: a revocation means this node was removed
    /// (it stops for good); anything else is logged.
    fn refused(&self, by: u64, refusal: pb::Refused) {
        if refusal.revoked && self.departed.borrow().is_none() {
            tracing::error!("node {by} refused this node: {}", refusal.reason);
            self.mark_departed(refusal.reason);
        } else if !refusal.revoked {
            tracing::warn!("node {by} refused this node: {}", refusal.reason);
        }
    }

    /// Records in `node.json` that this node left (it will refuse to start again) and tells
    /// [`Node::departed`] watchers why.
    fn mark_departed(&self, why: String) {
        let dir = &self.cfg.data_dir;
        if let Ok(mut nf) = NodeFile::load(dir) {
            nf.left = true;
            let _ = nf.store(dir);
        }
        self.departed.send_replace(Some(why));
    }
}

impl Handler for NodeHandler {
    fn refused(&self, by: u64, refusal: pb::Refused) {
        if let Some(shared) = self.shared.upgrade() {
            shared.refused(by, refusal);
        }
    }

    fn raft(&self, _from: u64, messages: Vec<Bytes>) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        for b in messages {
            let Ok(m) = Message::parse_from_bytes(&b) else {
                tracing::warn!("dropped an undecodable raft message");
                continue;
            };
            if m.get_msg_type() == MessageType::MsgPropose {
                // Nodes never forward proposals (see the Propose handler): a forwarded
                // batch was executed on another node's state and must not be appended here.
                tracing::warn!("dropped a proposal forwarded by node {}", m.from);
                continue;
            }
            if m.get_msg_type() == MessageType::MsgSnapshot {
                receive_snapshot(shared.clone(), m);
            } else {
                let _ = shared.raft_tx.lock().send(RaftMsg::Step(m));
            }
        }
    }

    fn request(&self, from: u64, req: pb::Request) -> ResponseFuture {
        let shared = self.shared.upgrade();
        Box::pin(async move {
            let Some(shared) = shared else {
                return error_response(req.id, &Error::Shutdown);
            };
            let id = req.id;
            let mut body = req.body;
            if from == 0 {
                // Only a member may say a write was forwarded (and is not to be forwarded
                // again): a client saying so is ignored.
                if let Some(pb::request::Body::Execute(x)) = &mut body {
                    x.forwarded = false;
                }
            }
            let mut resp = match body {
                Some(pb::request::Body::Execute(x))
                    if !x.forwarded && shared.raft_status.lock().role != "leader" =>
                {
                    shared.forward_execute(x).await
                }
                Some(pb::request::Body::Execute(x)) => {
                    let stmts = x.statements.into_iter().map(Statement::from).collect();
                    match shared.execute_batch(&x.db, stmts).await {
                        Ok(rs) => pb::Response {
                            id,
                            body: Some(pb::response::Body::Execute(pb::ExecuteResponse {
                                leader_addr: String::new(),
                                applied: *shared.applied_rx.borrow(),
                                results: rs
                                    .into_iter()
                                    .map(|r| pb::ExecResult {
                                        rows_affected: r.rows_affected,
                                        last_insert_rowid: r.last_insert_rowid,
                                    })
                                    .collect(),
                            })),
                        },
                        Err(e) => error_response(id, &e),
                    }
                }
                Some(pb::request::Body::Query(q)) => {
                    let consistency = consistency_of(&q);
                    let stmt = q
                        .statement
                        .map(Statement::from)
                        .unwrap_or_else(|| Statement::new(""));
                    match shared.query(&q.db, stmt, consistency).await {
                        Ok(rows) => pb::Response {
                            id,
                            body: Some(pb::response::Body::Query(pb::QueryResponse {
                                columns: rows.columns,
                                rows: rows
                                    .rows
                                    .iter()
                                    .map(|r| pb::Row {
                                        values: r.iter().map(pb::Value::from).collect(),
                                    })
                                    .collect(),
                            })),
                        },
                        Err(e) => error_response(id, &e),
                    }
                }
                Some(pb::request::Body::Status(s)) => shared.status_pb(s.with_digests).await,
                Some(pb::request::Body::TxBegin(b))
                    if u128::from(b.idle_ms) > MAX_TX_IDLE.as_millis() =>
                {
                    error_response(
                        id,
                        &Error::Invalid(format!(
                            "an idle timeout of {} ms exceeds the {} s limit (an open \
                             transaction holds the database's writer)",
                            b.idle_ms,
                            MAX_TX_IDLE.as_secs()
                        )),
                    )
                }
                Some(pb::request::Body::TxBegin(b)) => {
                    let idle = Duration::from_millis(if b.idle_ms == 0 {
                        30_000
                    } else {
                        b.idle_ms as u64
                    });
                    match shared.tx_begin(&b.db, idle).await {
                        Ok(tx_id) => pb::Response {
                            id,
                            body: Some(pb::response::Body::TxBegin(pb::TxBeginResponse { tx_id })),
                        },
                        Err(e) => error_response(id, &e),
                    }
                }
                Some(pb::request::Body::TxExec(x)) => {
                    let stmt = x
                        .statement
                        .map(Statement::from)
                        .unwrap_or_else(|| Statement::new(""));
                    match shared.tx_exec(x.tx_id, stmt).await {
                        Ok((rows, r)) => pb::Response {
                            id,
                            body: Some(pb::response::Body::TxExec(pb::TxExecResponse {
                                columns: rows.columns,
                                rows: rows
                                    .rows
                                    .iter()
                                    .map(|r| pb::Row {
                                        values: r.iter().map(pb::Value::from).collect(),
                                    })
                                    .collect(),
                                result: Some(pb::ExecResult {
                                    rows_affected: r.rows_affected,
                                    last_insert_rowid: r.last_insert_rowid,
                                }),
                            })),
                        },
                        Err(e) => error_response(id, &e),
                    }
                }
                Some(pb::request::Body::Service(call)) => {
                    let h = shared.services.read().get(&call.service).cloned();
                    match h {
                        Some((_, false)) if from == 0 => error_response(
                            id,
                            &Error::Invalid(format!(
                                "service {:?} is only for members of the cluster",
                                call.service
                            )),
                        ),
                        Some((h, _)) => match h.call(call.payload).await {
                            Ok(payload) => pb::Response {
                                id,
                                body: Some(pb::response::Body::Service(pb::ServiceReply {
                                    payload,
                                    applied: *shared.applied_rx.borrow(),
                                })),
                            },
                            Err(e) => error_response(id, &e),
                        },
                        None => error_response(
                            id,
                            &Error::Invalid(format!("no service {:?} on this node", call.service)),
                        ),
                    }
                }
                Some(pb::request::Body::TxEnd(x)) => match shared.tx_end(x.tx_id, x.commit).await {
                    Ok(()) => pb::Response {
                        id,
                        body: Some(pb::response::Body::TxEnd(pb::TxEndResponse {})),
                    },
                    Err(e) => error_response(id, &e),
                },
                Some(pb::request::Body::SnapshotChunk(c)) => {
                    let snaps = shared.snapshots.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        snaps.read_chunk(c.index, c.term, &c.file, c.offset)
                    })
                    .await
                    .unwrap_or_else(|e| Err(Error::Internal(e.to_string())));
                    match r {
                        Ok((data, eof)) => pb::Response {
                            id,
                            body: Some(pb::response::Body::SnapshotChunk(
                                pb::SnapshotChunkResponse { data, eof },
                            )),
                        },
                        Err(e) => error_response(id, &e),
                    }
                }
                None => error_response(id, &Error::Invalid("empty request".into())),
            };
            resp.id = id;
            resp
        })
    }
}

/// Pulls the files of an incoming snapshot from its maker, then steps the message into Raft.
fn receive_snapshot(shared: Arc<Shared>, m: Message) {
    if shared.receiving_snapshot.swap(true, Ordering::SeqCst) {
        return; // one at a time; the leader will send it again
    }
    tokio::spawn(async move {
        let r = async {
            let manifest = Manifest::decode(&m.get_snapshot().data)?;
            let addr = shared
                .peers
                .lock()
                .get(&manifest.from)
                .copied()
                .ok_or_else(|| {
                    Error::Invalid(format!("snapshot from unknown node {}", manifest.from))
                })?;
            let started = Instant::now();
            let conn = RpcConn::connect(
                &shared.dialer(),
                Peer::Node(manifest.from),
                addr,
                shared.cfg.id,
                &shared.cfg.cluster,
                Some(shared.cfg.listen.ip()),
            )
            .await
            .map_err(|e| Error::Transport(format!("snapshot source {addr}: {e}")))?;
            let conn = tokio::sync::Mutex::new(conn);
            let (index, term) = (manifest.index, manifest.term);
            shared
                .snapshots
                .receive(&manifest, |file, offset| {
                    let conn = &conn;
                    async move {
                        let body = pb::request::Body::SnapshotChunk(pb::SnapshotChunkRequest {
                            index,
                            term,
                            file,
                            offset,
                        });
                        match conn.lock().await.call(body).await {
                            Ok(pb::response::Body::SnapshotChunk(c)) => Ok((c.data, c.eof)),
                            Ok(pb::response::Body::Error(e)) => Err(Error::Transport(e.message)),
                            Ok(_) => Err(Error::Transport("unexpected response".into())),
                            Err(e) => Err(Error::Transport(e.to_string())),
                        }
                    }
                })
                .await?;
            tracing::info!(
                "received snapshot at index {index} in {:?}",
                started.elapsed()
            );
            Ok::<_, Error>(())
        }
        .await;
        match r {
            Ok(()) => {
                let _ = shared.raft_tx.lock().send(RaftMsg::Step(m));
            }
            Err(e) => tracing::warn!("receiving snapshot failed: {e}"),
        }
        shared.receiving_snapshot.store(false, Ordering::SeqCst);
    });
}

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
    /// (invariant 5a in docs/ARCHITECTURE.md; a deposed leader that does not know it yet
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

struct RaftDriver {
    raw: RawNode<LogStorage>,
    storage: LogStorage,
    rx: Receiver<RaftMsg>,
    sm_tx: Sender<SmMsg>,
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
    last_leader: (bool, u64),
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
    fn run(mut self, tick: Duration) {
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

    fn handle(&mut self, m: RaftMsg) -> bool {
        match m {
            RaftMsg::Step(msg) => {
                let _ = self.raw.step(msg);
            }
            RaftMsg::Sm(ToRaft::Propose { data, seq, base }) => {
                // Only a leader proposes: raft-rs on a follower would forward the entry to
                // the new leader, which would append a batch executed on an old state after
                // its own batches (found by the Jepsen watch test: a leader handover left
                // an index entry without its row). Page images are only right on the state
                // they were computed on: also refuse a batch if the log already holds a data
                // entry after that state.
                if self.raw.raft.state != StateRole::Leader {
                    let _ = self.sm_tx.send(SmMsg::ProposalFailed(seq));
                } else if let Some(index) = self.data_entry_after(base) {
                    tracing::error!(
                        "refused to propose batch {seq}: it was executed on the state at index \
                         {base}, but the log holds data entry {index} after it (last index {})",
                        self.raw.raft.raft_log.last_index()
                    );
                    let _ = self.sm_tx.send(SmMsg::ProposalFailed(seq));
                } else if self.raw.propose(Vec::new(), data.to_vec()).is_err() {
                    let _ = self.sm_tx.send(SmMsg::ProposalFailed(seq));
                }
            }
            RaftMsg::Sm(ToRaft::Checkpointed(c)) => {
                let mut log = self.storage.write();
                if log.disk_bytes() > self.compact_log_bytes && c + 1 > log.first_index() {
                    match log.compact(c + 1) {
                        Ok(()) => {
                            self.shared
                                .snapshots
                                .log_first_index
                                .store(log.first_index(), Ordering::SeqCst);
                            tracing::info!("compacted the raft log up to index {c}");
                        }
                        Err(e) => tracing::warn!("log compaction failed: {e}"),
                    }
                }
            }
            RaftMsg::ReadIndex(reply) => self.waiting_reads.push(ReadWaiter::Index(reply)),
            RaftMsg::Sm(ToRaft::Confirm { base, done }) => {
                self.waiting_reads.push(ReadWaiter::Confirm { base, done })
            }
            RaftMsg::ConfChange(cc, reply) => {
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
            RaftMsg::TransferLeader(reply) => {
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
            RaftMsg::Shutdown => return false,
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
            let keep = !r.waiters.is_empty() && r.started.elapsed() < Duration::from_secs(5);
            if !keep {
                expired.append(&mut r.waiters);
            }
            keep
        });
        for w in expired {
            w.fail(Error::Unavailable(
                "no quorum confirmed this node's leadership within 5 s".into(),
            ));
        }
        for (id, r) in self.reads.iter_mut() {
            if r.issued.elapsed() >= Duration::from_millis(200) {
                r.issued = Instant::now();
                self.raw
                    .read_index(read_ctx(self.raw.raft.id, self.read_nonce, *id));
            }
        }
    }

    fn send(&self, msgs: Vec<Message>) {
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
                *self.shared.snapshots.conf_state.lock() = cs;
            }
        }
        let _ = self.sm_tx.send(SmMsg::Apply(entries));
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
        if ready.ss().is_some() {
            let is_leader = self.raw.raft.state == StateRole::Leader;
            let term = self.raw.raft.term;
            if (is_leader, term) != self.last_leader {
                self.last_leader = (is_leader, term);
                let _ = self.sm_tx.send(SmMsg::Role { is_leader, term });
            }
        }
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            let manifest = Manifest::decode(&snap.data)?;
            let dir = self.shared.snapshots.incoming_dir(&manifest);
            let (done_tx, done_rx) = mpsc::channel();
            let _ = self.sm_tx.send(SmMsg::InstallSnapshot {
                meta: snap.get_metadata().clone(),
                dir,
                done: done_tx,
            });
            done_rx.recv().map_err(|_| Error::Shutdown)??;
            let mut log = self.storage.write();
            log.apply_snapshot(snap.get_metadata())?;
            self.shared
                .snapshots
                .log_first_index
                .store(log.first_index(), Ordering::SeqCst);
            *self.shared.snapshots.conf_state.lock() = snap.get_metadata().get_conf_state().clone();
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
        s.role = match r.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre-candidate",
        }
        .into();
        s.log_first = log.first_index();
        s.log_last = log.last_index();
        s.heard_leader = r.state == StateRole::Leader
            || (r.leader_id != 0 && r.election_elapsed < r.election_timeout());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Only the last clone stops the node (the threads hold their own references).
        if Arc::strong_count(&self.threads) == 1
            && !self.shared.stopped.swap(true, Ordering::SeqCst)
        {
            let _ = self.shared.raft_tx.lock().send(RaftMsg::Shutdown);
            let _ = self.shared.sm_tx.lock().send(SmMsg::Shutdown);
            for t in self.threads.lock().drain(..) {
                let _ = t.join();
            }
        }
    }
}

/// Parses `1=127.0.0.1:7001,2=...` into a peer map.
pub fn parse_peers(s: &str) -> Result<BTreeMap<u64, SocketAddr>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| Error::Invalid(format!("bad peer {part:?}: expected ID=HOST:PORT")))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| Error::Invalid(format!("bad node id {id:?} in {part:?}")))?;
        if id == 0 {
            return Err(Error::Invalid("node ids start at 1".into()));
        }
        let addr: SocketAddr = addr.trim().parse().map_err(|_| {
            Error::Invalid(format!(
                "bad address {addr:?} in {part:?}: expected IP:PORT"
            ))
        })?;
        if out.insert(id, addr).is_some() {
            return Err(Error::Invalid(format!("node {id} listed twice")));
        }
    }
    if out.is_empty() {
        return Err(Error::Invalid("empty peer list".into()));
    }
    Ok(out)
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
