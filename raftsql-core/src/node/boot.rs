//! Starting a node: the data directory, the Raft log and state machine, TLS, the transport,
//! and the two threads (state machine, Raft).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self};
use std::sync::Arc;

use parking_lot::Mutex;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfState, EntryType, SnapshotMetadata};
use raft::RawNode;
use tokio::sync::watch;

use super::config::{load_or_create_node_file, lock_data_dir, refuse_stored, NodeConfig, NodeFile};
use super::handle::{Leadership, RaftHandle};
use super::handler::NodeHandler;
use super::raft_loop::RaftDriver;
use super::{Node, RaftStatus, Shared, ToRaftThread};
use crate::error::{Error, Result};
use crate::log::{LogStorage, RaftLog};
use crate::net::transport::Transport;
use crate::snapshot::SnapshotStore;
use crate::state::{self, DbMap, Progress, SmSettings, StateMachine, ToStateMachine};

/// Where a node finds the members removed from its cluster at boot.
pub(crate) struct Removed {
    /// The database holding them.
    pub(crate) db: &'static str,
    /// Reads their ids from it.
    pub(crate) read: fn(&rusqlite::Connection) -> Result<std::collections::HashSet<u64>>,
}

impl Node {
    /// Starts the core of a node: recovers its state from `data_dir` (or bootstraps a new
    /// cluster from `peers`), binds `listen`, and starts the state machine and Raft threads.
    /// The services above the core (membership, backups) are the caller's to attach
    /// ([`Node::start`] does). `removed` reads the removed members from their database, so
    /// the transport refuses them from its first connection on.
    pub(crate) async fn boot(mut cfg: NodeConfig, removed: Removed) -> Result<Node> {
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
        // Segments of files written with zeros ahead of time: faster fsyncs (log.rs, L7).
        log.keep_spare(cfg.compact_log_bytes)?;
        if !log.is_initialized() && !cfg.join {
            log.bootstrap(ConfState {
                voters: cfg.peers.keys().copied().collect(),
                ..Default::default()
            })?;
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
        let (raft_tx, raft_rx) = mpsc::channel::<ToRaftThread>();
        let (sm_tx, sm_rx) = mpsc::channel::<ToStateMachine>();
        let dbs: DbMap = Default::default();
        let progress = Arc::new(Progress::default());
        let (applied_tx, applied_rx) = watch::channel(0u64);
        let raft_handle = RaftHandle::new(raft_tx);
        let (leadership_tx, leadership) = watch::channel(Leadership::default());
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
            Box::new(raft_handle.clone()),
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
            let mut md = SnapshotMetadata {
                index: meta.checkpoint_index,
                term: meta.checkpoint_term,
                ..Default::default()
            };
            let mut cs = ConfState {
                voters: meta.voters.clone(),
                learners: meta.learners.clone(),
                ..Default::default()
            };
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
        snapshots.log_changed(Some(log.first_index()), Some(log.conf_state().clone()));
        let to_sm = sm_tx.clone();
        snapshots.set_builder(move || to_sm.send(ToStateMachine::MakeSnapshot).is_ok());
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
            raft: raft_handle,
            sm_tx: sm_tx.clone(),
            leadership,
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
            leader_conns: Default::default(),
            fresh: Mutex::new(None),
            services: parking_lot::RwLock::new(HashMap::new()),
            tls: material,
            departed: watch::channel(None).0,
        });
        let handler = Arc::new(NodeHandler::new(Arc::downgrade(&shared)));
        // Removed members are refused from the first connection on, not only once the
        // registry is read again.
        let system = shared.dbs.read().get(removed.db).cloned();
        let revoked = match system {
            Some(h) => h.read(removed.read)?,
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
        let driver = RaftDriver::new(
            raw,
            storage,
            raft_rx,
            sm_tx,
            transport,
            shared.clone(),
            cfg.compact_log_bytes,
            leadership_tx,
        );
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
        Ok(node)
    }
}
