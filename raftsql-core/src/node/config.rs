//! How to run a node ([`NodeConfig`]), what its data directory records about it
//! (`node.json`), and the data directory lock.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fs2::FileExt;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::roles::Targets;

/// The default [`NodeConfig::tick`].
pub const DEFAULT_TICK: Duration = Duration::from_millis(50);
/// The default [`NodeConfig::write_timeout`].
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The default [`NodeConfig::offline_after`].
pub const DEFAULT_OFFLINE_AFTER: Duration = Duration::from_secs(3);

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
            tick: DEFAULT_TICK,
            election_ticks: 10,
            heartbeat_ticks: 2,
            checkpoint_frames: 4000,
            compact_log_bytes: 64 << 20,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            join: false,
            targets: Targets::default(),
            offline_after: DEFAULT_OFFLINE_AFTER,
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
pub(super) fn refuse_stored(cfg: &NodeConfig, nf: &NodeFile) -> Result<()> {
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
pub(super) fn load_or_create_node_file(
    cfg: &NodeConfig,
    stored: Option<NodeFile>,
) -> Result<NodeFile> {
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
