//! The replicated state machine: the SQLite databases of one node, and the thread that owns
//! their writer connections.
//!
//! # Layout on disk
//! ```text
//! <data>/state/CURRENT              name of the current generation directory
//! <data>/state/gen-<index>-<n>/     one generation: <db>.db files + meta.json
//!                                     + checkpoint-target (target.rs)
//! ```
//! `meta.json` holds the **checkpoint index C**: every database file in the generation holds
//! exactly the effects of the Raft entries up to C. A new generation is made only by a
//! snapshot install; checkpoints advance C inside the current one.
//!
//! # Invariants
//! Stated once, with their tests, in docs/ARCHITECTURE.md; this thread keeps:
//! - **I2** (uncommitted frames are never visible): the read gate ([`Gate`]) is closed from
//!   just before a batch's speculative COMMIT until its frames are rewound; readers pin their
//!   snapshot only with the gate open. If the entry commits later, it is applied like any
//!   other node's.
//! - **I3** (replicas byte-identical): entries carry pages, never SQL; every page is rebuilt
//!   on its committed image and checked against the leader's crc32 (`apply.rs`).
//! - **I4** (a batch runs on the state of every entry before it): a batch executes only when
//!   this node leads, has applied an entry of its own term and has nothing in flight
//!   (`batch.rs`).
//! - **I9** (checkpoints never outrun durability): C advances only after every database file
//!   is checkpointed and fsynced (`checkpoint.rs`); on restart the entries after C are
//!   replayed into the files before SQLite opens them (`recovery.rs`).
//!
//! # Files
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the [`StateMachine`]: its databases, its thread's loop, the messages' dispatch |
//! | `msg.rs` | [`ToStateMachine`] (to this thread), [`SmToRaft`] (from it), write requests |
//! | `db.rs` | one database: file, read gate, readers, page reads |
//! | `batch.rs` | leader batches: execute, speculative COMMIT, capture, diff, propose |
//! | `apply.rs` | applying committed entries (publish own frames, or write pages) |
//! | `tx.rs` | interactive transactions |
//! | `checkpoint.rs` | checkpoints and the checkpoint index |
//! | `passive_copy.rs` | a checkpoint's first phase: the copy on a thread of its own |
//! | `target.rs` | the checkpoint target's record |
//! | `install.rs` | making and installing snapshots |
//! | `recovery.rs` | start-up recovery of the database files |

mod apply;
mod batch;
mod checkpoint;
mod db;
mod install;
mod msg;
mod passive_copy;
mod recovery;
mod target;
#[cfg(test)]
mod tests;
mod tx;

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpoint::{read_meta, Copying, Syncing};
use db::{open_writer, remove_wal_files};
use msg::Waiter;
use rusqlite::Connection;

use crate::committed::Committed;
use crate::entry::Page;
use crate::error::{Error, Result};
use crate::fsutil::{fsync_dir, write_atomic};
use crate::guard::{Guard, Role};
use crate::vfs;

pub use crate::fsutil::check_db_name;
pub use checkpoint::Meta;
pub use db::{query_empty, DbHandle, DbMap};
pub(crate) use msg::TypedWrite;
pub use msg::{RaftSink, SmToRaft, ToStateMachine, TxOp, Work, WriteFn, WriteReq};
pub use recovery::{current_generation, recover_files, rewrite_checkpoint_conf};

/// With no message, the thread still wakes this often (deadlines, checkpoints, idle
/// transactions).
const IDLE_TICK: Duration = Duration::from_millis(20);

/// Progress published by the state machine.
#[derive(Default)]
pub struct Progress {
    /// Index of the last applied entry.
    pub applied: AtomicU64,
    /// Durable checkpoint index C.
    pub checkpoint: AtomicU64,
}

pub(super) struct Db {
    handle: Arc<DbHandle>,
    writer: Connection,
    /// What client SQL may do on the writer.
    guard: Guard,
    /// Committed page images, the bases of page changes (committed.rs).
    committed: Committed,
}

pub(super) struct InFlight {
    db: String,
    seq: u64,
    waiters: Vec<Waiter>,
    /// When it was proposed (for `raftsql_write_batch_commit_seconds`).
    proposed: Instant,
    /// The whole pages of its entry, as captured (page 1 stamped): applying its own entry,
    /// the leader writes these instead of rebuilding them from their bases.
    pages: Vec<Page>,
    /// Its frames, still in the WAL past the rewound header, if they are exactly the entry.
    kept: Option<Kept>,
}

/// A batch's frames left in the WAL past the rewound wal-index header. When the batch's
/// entry commits and no WAL has been written since, putting `exposed` back makes those
/// frames the committed state: the leader applies its own entry without writing a page.
pub(super) struct Kept {
    /// The header SQLite wrote at the speculative COMMIT.
    exposed: vfs::SavedHeader,
    /// The header the rewind put back.
    rewound: vfs::SavedHeader,
    /// [`vfs::wal_writes`] right after the rewind.
    wal_writes: u64,
}

pub(super) struct OpenTx {
    id: u64,
    db: String,
    idle: Duration,
    last_used: Instant,
}

/// Tunables of the state machine.
#[derive(Clone, Debug)]
pub struct SmSettings {
    /// Checkpoint once this many WAL frames have accumulated over all databases.
    pub checkpoint_frames: u64,
    /// The largest query result inside an interactive transaction.
    pub max_result_bytes: usize,
    /// The longest one client request's statements may run on the writer.
    pub statement_timeout: Duration,
    /// Where the write path's stage durations go.
    pub metrics: crate::metrics::WriteMetrics,
}

/// The state machine. Lives on its own thread (see [`StateMachine::run`]).
pub struct StateMachine {
    me: u64,
    root: PathBuf,
    gen_dir: PathBuf,
    meta: Meta,
    dbs: HashMap<String, Db>,
    shared: DbMap,
    progress: Arc<Progress>,
    applied_term: u64,
    is_leader: bool,
    term: u64,
    queue: VecDeque<WriteReq>,
    in_flight: Option<InFlight>,
    open_tx: Option<OpenTx>,
    seq: u64,
    frames_since_checkpoint: u64,
    next_checkpoint: Instant,
    /// The checkpoint target last recorded in this generation (target.rs).
    target: u64,
    /// The thread of the checkpoints' passive copies, once the first one started.
    copier: Option<passive_copy::CopyThread>,
    /// A checkpoint whose first phase (the passive copy) runs off this thread.
    copying: Option<Copying>,
    /// A checkpoint whose phase 2 found readers on older frames (its start): phase 2 is
    /// tried again at `next_checkpoint`.
    truncate_again: Option<Instant>,
    /// A checkpoint whose files are being fsynced off this thread.
    syncing: Option<Syncing>,
    settings: SmSettings,
    raft: Box<dyn RaftSink>,
    snapshots: Arc<crate::snapshot::SnapshotStore>,
    snapshot_wanted: bool,
    applied_tx: tokio::sync::watch::Sender<u64>,
    /// When the batch being executed started.
    batch_started: Instant,
}

impl StateMachine {
    /// Opens the current generation under `root` (creating an empty one), dropping any WAL.
    /// Returns the machine positioned at its checkpoint index; Raft then re-delivers the
    /// committed entries after it.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        me: u64,
        root: &Path,
        settings: SmSettings,
        raft: Box<dyn RaftSink>,
        shared: DbMap,
        progress: Arc<Progress>,
        snapshots: Arc<crate::snapshot::SnapshotStore>,
        applied_tx: tokio::sync::watch::Sender<u64>,
    ) -> Result<StateMachine> {
        vfs::register().map_err(Error::Internal)?;
        fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let current = root.join("CURRENT");
        let gen_dir = match fs::read_to_string(&current) {
            Ok(name) => root.join(name.trim()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let g = root.join("gen-0");
                fs::create_dir_all(&g).map_err(|e| Error::io(&g, e))?;
                write_atomic(
                    &g.join("meta.json"),
                    &serde_json::to_vec(&Meta::default()).unwrap(),
                )?;
                write_atomic(&current, b"gen-0")?;
                g
            }
            Err(e) => return Err(Error::io(&current, e)),
        };
        let meta = read_meta(&gen_dir)?;
        // Remove generations left behind by an interrupted snapshot install.
        if let Ok(rd) = fs::read_dir(root) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() && p != gen_dir {
                    let _ = fs::remove_dir_all(&p);
                }
            }
        }
        let mut sm = StateMachine {
            me,
            root: root.to_path_buf(),
            gen_dir,
            meta: meta.clone(),
            dbs: HashMap::new(),
            shared,
            progress,
            applied_term: meta.checkpoint_term,
            is_leader: false,
            term: 0,
            queue: VecDeque::new(),
            in_flight: None,
            open_tx: None,
            seq: 0,
            frames_since_checkpoint: 0,
            next_checkpoint: Instant::now(),
            target: 0,
            copier: None,
            copying: None,
            truncate_again: None,
            syncing: None,
            batch_started: Instant::now(),
            settings,
            raft,
            snapshots,
            snapshot_wanted: false,
            applied_tx,
        };
        sm.open_all()?;
        sm.set_applied(meta.checkpoint_index, meta.checkpoint_term);
        sm.progress
            .checkpoint
            .store(meta.checkpoint_index, Ordering::SeqCst);
        Ok(sm)
    }

    /// The durable checkpoint (what the database files hold).
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    pub(super) fn open_all(&mut self) -> Result<()> {
        let rd = fs::read_dir(&self.gen_dir).map_err(|e| Error::io(&self.gen_dir, e))?;
        let mut names = Vec::new();
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) == Some("db") {
                names.push(p.file_stem().unwrap().to_string_lossy().into_owned());
            }
        }
        let mut shared = HashMap::new();
        for name in names {
            let path = self.gen_dir.join(format!("{name}.db"));
            remove_wal_files(&path);
            let db = self.open_db_at(&name, path)?;
            shared.insert(name.clone(), db.handle.clone());
            self.dbs.insert(name, db);
        }
        *self.shared.write() = shared;
        Ok(())
    }

    fn open_db_at(&self, name: &str, path: PathBuf) -> Result<Db> {
        let mut writer = open_writer(&path)?;
        let guard = Guard::install(&mut writer, Role::Writer)?;
        Ok(Db {
            handle: Arc::new(DbHandle::new(name, path)),
            writer,
            guard,
            committed: Committed::default(),
        })
    }

    pub(super) fn db(&mut self, name: &str) -> Result<&mut Db> {
        if !self.dbs.contains_key(name) {
            check_db_name(name)?;
            let path = self.gen_dir.join(format!("{name}.db"));
            remove_wal_files(&path);
            let db = self.open_db_at(name, path)?;
            // The new (empty) file must survive a crash, or replay would find no file.
            fsync_dir(&self.gen_dir)?;
            self.shared
                .write()
                .insert(name.to_string(), db.handle.clone());
            self.dbs.insert(name.to_string(), db);
        }
        Ok(self.dbs.get_mut(name).unwrap())
    }

    pub(super) fn set_applied(&mut self, index: u64, term: u64) {
        self.applied_term = term;
        self.progress.applied.store(index, Ordering::SeqCst);
        let _ = self.applied_tx.send(index);
    }

    pub(super) fn applied(&self) -> u64 {
        self.progress.applied.load(Ordering::SeqCst)
    }

    /// The thread body: handles messages until Shutdown or the channel closes.
    pub fn run(mut self, rx: Receiver<ToStateMachine>) {
        loop {
            let msg = match rx.recv_timeout(IDLE_TICK) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if let Some(msg) = msg {
                if matches!(msg, ToStateMachine::Shutdown) {
                    break;
                }
                if let Err(e) = self.handle(msg) {
                    // Failing to apply a committed entry leaves this replica unable to go on
                    // without diverging: stop the process with the reason.
                    tracing::error!("state machine failed, stopping the node: {e}");
                    eprintln!("raftsql: fatal: state machine failed: {e}");
                    std::process::exit(70);
                }
            }
            self.expire();
            self.maybe_start_batch();
            // A batch in flight does not hold anything a checkpoint or a snapshot would see:
            // its frames were rewound from the WAL at capture and come back only as a
            // committed entry. Waiting for a moment without one starved both under
            // concurrent load (issue 15: the leader's WAL grew to 206 MB and its Raft log
            // was never compacted), so they run while the entry is being replicated.
            // An interactive transaction does hold the writer's lock: they wait for it.
            if let Err(e) = self.finish_checkpoint(false) {
                tracing::warn!("checkpoint failed (will retry): {e}");
            }
            if self.open_tx.is_none() {
                if let Err(e) = self.maybe_checkpoint() {
                    tracing::warn!("checkpoint failed (will retry): {e}");
                }
                if self.snapshot_wanted {
                    self.snapshot_wanted = false;
                    self.make_snapshot();
                }
            }
        }
        self.abort_in_flight(Error::Shutdown);
        for r in self.queue.drain(..) {
            r.fail(Error::Shutdown);
        }
        if let Err(e) = self.finish_checkpoint(true) {
            tracing::warn!("checkpoint failed at shutdown: {e}");
        }
    }

    pub(super) fn handle(&mut self, msg: ToStateMachine) -> Result<()> {
        match msg {
            ToStateMachine::Apply(entries) => {
                for e in entries {
                    self.apply_entry(e)?;
                }
            }
            ToStateMachine::Role { is_leader, term } => {
                let changed = is_leader != self.is_leader || term != self.term;
                tracing::debug!(
                    "role: leader {is_leader} term {term} (applied {} of term {})",
                    self.applied(),
                    self.applied_term
                );
                self.is_leader = is_leader;
                self.term = term;
                if changed {
                    self.abort_in_flight(Error::OutcomeUnknown);
                    self.rollback_tx();
                    if !is_leader {
                        for r in self.queue.drain(..) {
                            r.fail(Error::NotLeader {
                                leader_id: None,
                                leader_addr: None,
                            });
                        }
                    }
                }
            }
            ToStateMachine::ProposalFailed(seq) => {
                if self.in_flight.as_ref().map(|f| f.seq) == Some(seq) {
                    self.abort_in_flight(Error::NotLeader {
                        leader_id: None,
                        leader_addr: None,
                    });
                }
            }
            ToStateMachine::Write(req) => {
                if !self.is_leader {
                    req.fail(Error::NotLeader {
                        leader_id: None,
                        leader_addr: None,
                    });
                } else {
                    self.queue.push_back(req);
                }
            }
            ToStateMachine::Tx(op) => self.handle_tx(op),
            ToStateMachine::InstallSnapshot { meta, dir, done } => {
                let r = self.install_snapshot(&meta, &dir);
                let failed = r.as_ref().err().map(|e| e.to_string());
                let _ = done.send(r);
                if let Some(e) = failed {
                    return Err(Error::Internal(format!("snapshot install failed: {e}")));
                }
            }
            ToStateMachine::MakeSnapshot => self.snapshot_wanted = true,
            ToStateMachine::Shutdown => {}
        }
        Ok(())
    }
}
