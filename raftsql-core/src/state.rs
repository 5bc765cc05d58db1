//! The replicated state machine: the SQLite databases of one node, and the thread that owns
//! their writer connections.
//!
//! # Layout on disk
//! ```text
//! <data>/state/CURRENT              name of the current generation directory
//! <data>/state/gen-<index>-<n>/     one generation: <db>.db files + meta.json
//! ```
//! `meta.json` holds the **checkpoint index C**: every database file in the generation holds
//! exactly the effects of the Raft entries up to C. A new generation is made only by a
//! snapshot install; checkpoints advance C inside the current one.
//!
//! # Invariants (each is checked by a test named in docs/ARCHITECTURE.md)
//! 1. *Committed-only visibility.* A reader sees the effects of entry i only after entry i is
//!    committed by Raft. On the leader a batch's frames are written to the WAL by COMMIT
//!    before its entry commits, so the read gate ([`Gate`]) is closed from just before COMMIT
//!    until the entry applies or is abandoned; readers pin their snapshot only with the gate
//!    open. Readers that pinned earlier keep their older snapshot (SQLite MVCC).
//! 2. *Abandoned frames vanish.* If leadership is lost with a batch in flight, the wal-index
//!    header saved before the batch is put back (or, if the batch restarted the WAL, the
//!    WAL is emptied and the index rebuilt), so the frames are unreachable before the gate
//!    reopens. If the entry does commit later, it is applied like any other node's entry.
//! 3. *Same pages everywhere.* Followers (and a leader applying another node's entry) write
//!    the entry's page images through `sqlite_dbpage` in one transaction and truncate to the
//!    entry's database size; SQL is never re-executed, so `random()` or `now()` cannot make
//!    replicas diverge.
//! 4. *Checkpoints never outrun durability.* C advances only after a TRUNCATE checkpoint of
//!    every database has completed AND each database file has been fsynced; the node never
//!    compacts the Raft log past C, and on restart deletes `-wal`/`-shm` and replays entries
//!    after C. A crash mid-checkpoint is therefore harmless: the replay rewrites every page
//!    the checkpoint may have torn.
//! 5. *Leader writes start from the committed state.* A batch executes only when this node
//!    leads and has applied an entry of its own term (so every earlier entry is applied),
//!    and only one batch is in flight, so frames are always computed against exactly the
//!    state that precedes them in the log.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use raft::eraftpb::{Entry, EntryType, SnapshotMetadata};
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::committed::Committed;
use crate::entry::{Change, Frames, Page, PageChange};
use crate::error::{Error, Result};
use crate::guard::{self, Guard, Role};
use crate::value::{ExecResult, Rows, Statement, Value};
use crate::vfs;

/// Page size of every raftsql database.
pub const PAGE_SIZE: u32 = 4096;
/// Most requests group-committed into one batch.
const MAX_BATCH: usize = 512;

/// Closes the door on new read snapshots while a leader batch's frames are uncommitted.
///
/// Readers call [`Gate::enter`] / [`Gate::leave`] only around pinning their snapshot (a few
/// microseconds), not around the whole query.
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    pinning: usize,
    closed: bool,
}

impl Gate {
    /// Waits until the gate is open and registers a reader pinning its snapshot.
    pub fn enter(&self) {
        let mut g = self.state.lock();
        while g.closed {
            self.cv.wait(&mut g);
        }
        g.pinning += 1;
    }
    /// The reader has pinned its snapshot.
    pub fn leave(&self) {
        let mut g = self.state.lock();
        g.pinning -= 1;
        if g.pinning == 0 {
            self.cv.notify_all();
        }
    }
    /// Closes the gate and waits for readers that are pinning to finish.
    fn close(&self) {
        let mut g = self.state.lock();
        g.closed = true;
        while g.pinning > 0 {
            self.cv.wait(&mut g);
        }
    }
    /// Reopens the gate.
    fn open(&self) {
        let mut g = self.state.lock();
        g.closed = false;
        self.cv.notify_all();
    }
}

/// The read side of one database, shared by every thread that queries it.
pub struct DbHandle {
    /// Database name.
    pub name: String,
    /// Path of the database file.
    pub path: PathBuf,
    key: String,
    gate: Gate,
    pool: Mutex<Vec<(Connection, Guard)>>,
}

impl DbHandle {
    fn new(name: &str, path: PathBuf) -> Self {
        let key = path.to_string_lossy().into_owned();
        DbHandle {
            name: name.to_string(),
            path,
            key,
            gate: Gate::default(),
            pool: Mutex::new(Vec::new()),
        }
    }

    fn reader(&self) -> Result<(Connection, Guard)> {
        if let Some(c) = self.pool.lock().pop() {
            return Ok(c);
        }
        // Read-only at the file level: whatever a statement on it says, it cannot write.
        let mut c = Connection::open_with_flags_and_vfs(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
            vfs::VFS_NAME,
        )?;
        c.execute_batch("PRAGMA query_only=1; PRAGMA busy_timeout=5000;")?;
        let g = Guard::install(&mut c, Role::Reader)?;
        Ok((c, g))
    }

    /// Runs `f` inside a read transaction whose snapshot holds only committed entries.
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        self.read_guarded(|c, _| f(c))
    }

    fn read_guarded<T>(&self, f: impl FnOnce(&Connection, &Guard) -> Result<T>) -> Result<T> {
        let (conn, guard) = self.reader()?;
        self.gate.enter();
        let pinned = conn
            .execute_batch("BEGIN")
            .and_then(|_| conn.query_row("PRAGMA schema_version", [], |_| Ok(())));
        self.gate.leave();
        let out = pinned.map_err(Error::from).and_then(|_| f(&conn, &guard));
        let _ = conn.execute_batch("COMMIT");
        if conn.is_autocommit() {
            self.pool.lock().push((conn, guard));
        }
        out
    }

    /// Runs one client statement (checked by the reader's [`Guard`], and interrupted after
    /// `budget`) and returns its rows (at most `max_bytes` of values).
    pub fn query(&self, stmt: &Statement, max_bytes: usize, budget: Duration) -> Result<Rows> {
        self.read_guarded(|c, g| g.client(budget, || query_rows(c, g, stmt, max_bytes)))
    }

    /// crc32 of every page in page order, with the page count: equal digests mean
    /// byte-identical databases.
    pub fn digest(&self) -> Result<String> {
        self.read(|c| {
            let mut h = crc32fast::Hasher::new();
            let mut n = 0u64;
            let mut st = c.prepare("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno")?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let pgno: u32 = r.get(0)?;
                h.update(&pgno.to_le_bytes());
                h.update(
                    r.get_ref(1)?
                        .as_blob()
                        .map_err(|e| Error::Internal(e.to_string()))?,
                );
                n += 1;
            }
            Ok(format!("{n}:{:08x}", h.finalize()))
        })
    }
}

/// Runs one client statement on an empty database: what a read of a database that nobody
/// has written yet sees, as SQLite itself answers on a file that does not exist (`SELECT 1`
/// answers 1; a table it names does not exist). Guarded and bounded like [`DbHandle::query`].
pub fn query_empty(stmt: &Statement, max_bytes: usize, budget: Duration) -> Result<Rows> {
    let mut c = Connection::open_in_memory_with_flags(
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    c.execute_batch("PRAGMA query_only=1;")?;
    let g = Guard::install(&mut c, Role::Reader)?;
    g.client(budget, || query_rows(&c, &g, stmt, max_bytes))
}

/// Runs a client statement on `c` (guarded by `g`; call inside [`Guard::client`]) and
/// collects its rows; fails once the values collected exceed `max_bytes` (counting 8 bytes
/// per number or NULL and the length of texts and blobs), so that a query cannot make a
/// node hold, or try to send, an unbounded answer.
fn query_rows(c: &Connection, g: &Guard, stmt: &Statement, max_bytes: usize) -> Result<Rows> {
    let mut st = c.prepare_cached(&guard::client_key(&stmt.sql))?;
    guard::check_statement(g, &st)?;
    let columns: Vec<String> = st.column_names().into_iter().map(String::from).collect();
    let n = columns.len();
    let mut rows = st.query(rusqlite::params_from_iter(stmt.params.iter()))?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(r) = rows.next()? {
        let mut row = Vec::with_capacity(n);
        for i in 0..n {
            let v = r.get_ref(i)?;
            bytes += match v {
                rusqlite::types::ValueRef::Text(b) | rusqlite::types::ValueRef::Blob(b) => b.len(),
                _ => 8,
            };
            row.push(Value::from(v));
        }
        out.push(row);
        if bytes > max_bytes {
            return Err(Error::Invalid(format!(
                "the query's result exceeds the {max_bytes}-byte limit after {} rows \
                 (--max-result-bytes): select fewer rows or columns (LIMIT/OFFSET)",
                out.len()
            )));
        }
    }
    Ok(Rows { columns, rows: out })
}

/// Databases by name, as the readers see them.
pub type DbMap = Arc<RwLock<HashMap<String, Arc<DbHandle>>>>;

/// Checks a database name: 1-64 of `[A-Za-z0-9_-]`.
pub fn check_db_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(Error::Invalid(format!(
            "bad database name {name:?}: use 1 to 64 letters, digits, '_' or '-'"
        )));
    }
    Ok(())
}

/// The most page bytes one write batch may change: its entry must fit in one transport
/// frame ([`crate::MAX_FRAME`], 64 MiB) with room for the message around it.
pub const MAX_ENTRY_PAGE_BYTES: usize = 48 << 20;

/// What `meta.json` records about a generation.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    /// Every database file holds exactly the entries up to this index.
    pub checkpoint_index: u64,
    /// Term of that entry.
    pub checkpoint_term: u64,
    /// Voters at that index.
    pub voters: Vec<u64>,
    /// Learners at that index.
    pub learners: Vec<u64>,
    /// A checkpoint to this index was started: the database files may hold pages of entries
    /// up to it (recovery replays at least that far before SQLite opens them).
    #[serde(default)]
    pub checkpoint_target: u64,
}

/// A write written in Rust: runs on the leader's writer connection inside the batch
/// transaction, in its own SAVEPOINT (an error rolls back only its own changes). What it
/// returns reaches the caller once the batch's entry is committed and applied.
pub type WriteFn = Box<dyn FnOnce(&Connection) -> Result<Box<dyn std::any::Any + Send>> + Send>;

/// Called with the outcome of the batch a request was part of.
type Waiter = Box<dyn FnOnce(Result<()>) + Send>;

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

    fn is_sql(&self) -> bool {
        matches!(self.work, Work::Statements { .. })
    }

    /// Answers a SQL request now if `r` failed, or returns what answers it once the batch
    /// commits.
    fn settle(self, r: Result<Vec<ExecResult>>) -> Option<Waiter> {
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

/// Progress published by the state machine.
#[derive(Default)]
pub struct Progress {
    /// Index of the last applied entry.
    pub applied: AtomicU64,
    /// Durable checkpoint index C.
    pub checkpoint: AtomicU64,
}

struct Db {
    handle: Arc<DbHandle>,
    writer: Connection,
    /// What client SQL may do on the writer.
    guard: Guard,
    wal: Option<File>,
    /// Committed page images, the bases of page changes (committed.rs).
    committed: Committed,
}

struct InFlight {
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
struct Kept {
    /// The header SQLite wrote at the speculative COMMIT.
    exposed: vfs::SavedHeader,
    /// The header the rewind put back.
    rewound: vfs::SavedHeader,
    /// [`vfs::wal_writes`] right after the rewind.
    wal_writes: u64,
}

struct OpenTx {
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
    /// A checkpoint whose files are being fsynced off this thread.
    syncing: Option<Syncing>,
    settings: SmSettings,
    to_raft: Box<dyn Fn(ToRaft) + Send>,
    snapshots: Arc<crate::snapshot::SnapshotStore>,
    snapshot_wanted: bool,
    applied_tx: tokio::sync::watch::Sender<u64>,
    /// When the batch being executed started.
    batch_started: Instant,
}

/// Syncs a directory, so that the names created, renamed or removed in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// A checkpoint whose copy is done, waiting for the fsyncs of its files.
struct Syncing {
    /// Its index and term: the checkpoint index and term once the files are durable.
    applied: u64,
    term: u64,
    started: Instant,
    done: Receiver<Result<()>>,
}

/// fsyncs each database file, then their directory.
fn sync_files(files: &[PathBuf], dir: &Path) -> Result<()> {
    for f in files {
        File::open(f)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(f, e))?;
    }
    fsync_dir(dir)
}

/// Writes `data` to `path` atomically and durably (temp file, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    fsync_dir(path.parent().unwrap())
}

fn read_meta(gen: &Path) -> Result<Meta> {
    let p = gen.join("meta.json");
    let mut s = String::new();
    File::open(&p)
        .and_then(|mut f| f.read_to_string(&mut s))
        .map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&s).map_err(|e| Error::Corrupt(format!("{}: {e}", p.display())))
}

fn remove_wal_files(db: &Path) {
    for suffix in ["-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = fs::remove_file(PathBuf::from(p));
    }
}

fn open_writer(path: &Path) -> Result<Connection> {
    let c = Connection::open_with_flags_and_vfs(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        vfs::VFS_NAME,
    )?;
    // The frames of an uncommitted batch must never reach the database file, so SQLite may
    // not checkpoint on its own, not even on close.
    c.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    c.execute_batch(&format!(
        "PRAGMA page_size={PAGE_SIZE}; PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF; \
         PRAGMA wal_autocheckpoint=0; PRAGMA busy_timeout=0; PRAGMA cache_size=-16384;"
    ))?;
    // Map the wal-index now, so its header can be read before the first write.
    c.query_row("PRAGMA schema_version", [], |_| Ok(()))?;
    Ok(c)
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
        to_raft: Box<dyn Fn(ToRaft) + Send>,
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
            syncing: None,
            batch_started: Instant::now(),
            settings,
            to_raft,
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

    fn open_all(&mut self) -> Result<()> {
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
            wal: None,
            committed: Committed::default(),
        })
    }

    fn db(&mut self, name: &str) -> Result<&mut Db> {
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

    fn set_applied(&mut self, index: u64, term: u64) {
        self.applied_term = term;
        self.progress.applied.store(index, Ordering::SeqCst);
        let _ = self.applied_tx.send(index);
    }

    fn applied(&self) -> u64 {
        self.progress.applied.load(Ordering::SeqCst)
    }

    /// The thread body: handles messages until Shutdown or the channel closes.
    pub fn run(mut self, rx: Receiver<SmMsg>) {
        loop {
            let msg = match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if let Some(msg) = msg {
                if matches!(msg, SmMsg::Shutdown) {
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

    fn handle(&mut self, msg: SmMsg) -> Result<()> {
        match msg {
            SmMsg::Apply(entries) => {
                for e in entries {
                    self.apply_entry(e)?;
                }
            }
            SmMsg::Role { is_leader, term } => {
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
            SmMsg::ProposalFailed(seq) => {
                if self.in_flight.as_ref().map(|f| f.seq) == Some(seq) {
                    self.abort_in_flight(Error::NotLeader {
                        leader_id: None,
                        leader_addr: None,
                    });
                }
            }
            SmMsg::Write(req) => {
                if !self.is_leader {
                    req.fail(Error::NotLeader {
                        leader_id: None,
                        leader_addr: None,
                    });
                } else {
                    self.queue.push_back(req);
                }
            }
            SmMsg::Tx(op) => self.handle_tx(op),
            SmMsg::InstallSnapshot { meta, dir, done } => {
                let r = self.install_snapshot(&meta, &dir);
                let failed = r.as_ref().err().map(|e| e.to_string());
                let _ = done.send(r);
                if let Some(e) = failed {
                    return Err(Error::Internal(format!("snapshot install failed: {e}")));
                }
            }
            SmMsg::MakeSnapshot => self.snapshot_wanted = true,
            SmMsg::Shutdown => {}
        }
        Ok(())
    }

    /// Ready to execute a leader batch (invariant 5).
    fn can_write(&self) -> bool {
        self.is_leader
            && self.applied_term == self.term
            && self.in_flight.is_none()
            && self.open_tx.is_none()
    }

    fn expire(&mut self) {
        let now = Instant::now();
        while self.queue.front().is_some_and(|r| r.deadline <= now) {
            let r = self.queue.pop_front().unwrap();
            r.fail(Error::Timeout(Duration::ZERO));
        }
        if let Some(tx) = &self.open_tx {
            if tx.last_used.elapsed() > tx.idle {
                tracing::info!(
                    "interactive transaction {} idle for {:?}: rolled back",
                    tx.id,
                    tx.idle
                );
                self.rollback_tx();
            }
        }
    }

    fn maybe_start_batch(&mut self) {
        if !self.can_write() || self.queue.is_empty() {
            return;
        }
        let db_name = self.queue[0].db.clone();
        let mut batch = Vec::new();
        let mut rest = VecDeque::new();
        while let Some(r) = self.queue.pop_front() {
            if r.db == db_name && batch.len() < MAX_BATCH {
                batch.push(r);
            } else {
                rest.push_back(r);
            }
        }
        self.queue = rest;
        if let Err(e) = self.run_batch(&db_name, batch) {
            tracing::warn!("write batch on {db_name} failed: {e}");
        }
    }

    /// Executes a group of write requests as one SQLite transaction, one SAVEPOINT each, then
    /// proposes the transaction's pages as one entry.
    fn run_batch(&mut self, db_name: &str, batch: Vec<WriteReq>) -> Result<()> {
        self.batch_started = Instant::now();
        self.settings
            .metrics
            .batch_requests
            .observe(batch.len() as f64);
        let budget = self.settings.statement_timeout;
        let db = match self.db(db_name) {
            Ok(db) => db,
            Err(e) => {
                let msg = e.to_string();
                for r in batch {
                    r.fail(Error::Invalid(msg.clone()));
                }
                return Ok(());
            }
        };
        // The pages the batch reads of the committed state are the bases its entry is
        // diffed against (vfs.rs, "Recording reads").
        vfs::record_reads(&db.handle.key, PAGE_SIZE);
        let executed = execute_batch(&db.writer, &db.guard, budget, batch);
        if !matches!(executed, Executed::Open(_)) {
            vfs::stop_recording();
        }
        match executed {
            Executed::Open(waiters) => self.commit_and_propose(db_name, waiters),
            Executed::Requeue(reqs) => {
                for r in reqs.into_iter().rev() {
                    self.queue.push_front(r);
                }
                Ok(())
            }
            Executed::NotStarted => Ok(()),
        }
    }

    /// COMMITs the writer's transaction, captures the pages it appended to the WAL, rewinds
    /// the WAL so they vanish again, and proposes them as one entry.
    ///
    /// The read gate is closed only from COMMIT to the rewind (microseconds): the frames are
    /// visible to no reader. When the entry commits, this node publishes the frames still in
    /// its WAL if they are exactly the entry ([`Kept`], `expose_kept`), else applies it like
    /// every other node does ([`apply_pages`]).
    fn commit_and_propose(&mut self, db_name: &str, waiters: Vec<Waiter>) -> Result<()> {
        let me = self.me;
        self.seq += 1;
        let seq = self.seq;
        let db = self.dbs.get_mut(db_name).unwrap();
        let key = db.handle.key.clone();
        let fail = |waiters: Vec<Waiter>, e: Error| {
            tracing::error!("write batch on {db_name} failed: {e}");
            for w in waiters {
                w(Err(clone_err(&e)));
            }
        };
        let (Some(saved), Some(before)) = (vfs::save_header(&key), vfs::read_header(&key)) else {
            vfs::stop_recording();
            let _ = db.writer.execute_batch("ROLLBACK");
            fail(
                waiters,
                Error::Internal(format!("the wal-index of {key} is not readable")),
            );
            return Ok(());
        };
        let bases = vfs::take_reads(&key, before.max_frame);
        db.handle.gate.close();
        if let Err(e) = db.writer.execute_batch("COMMIT") {
            let _ = db.writer.execute_batch("ROLLBACK");
            db.handle.gate.open();
            fail(waiters, e.into());
            return Ok(());
        }
        let captured = capture_and_rewind(db, &key, &saved, &before);
        db.handle.gate.open();
        let wal_writes = vfs::wal_writes();
        let (pages, after, exposed) = match captured {
            Ok(Some(x)) => x,
            Ok(None) => {
                // No page changed (only reads, or writes that changed nothing): nothing to
                // replicate, but the answers were computed on this node's state, so they go
                // out only once a quorum confirms it still leads (a deposed leader that has
                // not heard of its successor would answer a failed CAS from an old state).
                if waiters.is_empty() {
                    return Ok(());
                }
                let base = self.applied();
                (self.to_raft)(ToRaft::Confirm {
                    base,
                    done: Box::new(move |r: Result<()>| {
                        for w in waiters {
                            w(r.as_ref().map(|_| ()).map_err(clone_err));
                        }
                    }),
                });
                return Ok(());
            }
            Err(e) => {
                fail(waiters, e);
                return Ok(());
            }
        };
        let bytes: usize = pages.iter().map(|p| p.data.len()).sum();
        if bytes > MAX_ENTRY_PAGE_BYTES {
            // The WAL is already rewound: failing here leaves nothing behind.
            fail(
                waiters,
                Error::Invalid(format!(
                    "the transaction changed {:.1} MiB of pages, more than the {} MiB one \
                     replicated entry may carry: split it into smaller transactions",
                    bytes as f64 / (1 << 20) as f64,
                    MAX_ENTRY_PAGE_BYTES >> 20
                )),
            );
            return Ok(());
        }
        let mut pages = pages;
        // The frames can stand as this node's apply only if they are the entry's pages.
        let mut kept = exposed.map(|exposed| Kept {
            exposed,
            rewound: saved,
            wal_writes,
        });
        if let Some(p1) = pages.first_mut().filter(|p| p.pgno == 1) {
            // Stamp page 1 with the change counter every node's apply will write: the
            // committed counter (the WAL is rewound, so the writer reads it) plus one.
            // (From page 1's committed image if held: diff_pages checks it in test builds.)
            let held = bases
                .get(&1)
                .map(|b| &b[..])
                .or(db.committed.get(1).map(|b| &b[..]));
            let counter = match held {
                Some(b) => Ok(change_counter(b)),
                None => page1_counter(&db.writer),
            };
            match counter {
                Ok(c) => {
                    let stamped = stamp_change_counter(&p1.data, c.wrapping_add(1));
                    if stamped != p1.data {
                        kept = None;
                    }
                    p1.data = stamped;
                }
                Err(e) => {
                    fail(waiters, e);
                    return Ok(());
                }
            }
        }
        // Each page travels as the bytes that differ from the committed page (invariant 3:
        // every node applies the entry to that same page), or whole if that is smaller.
        let committed_pages = (before.max_frame > 0).then_some(before.n_page);
        let changes = match diff_pages(&db.writer, &pages, bases, &db.committed, committed_pages) {
            Ok(c) => c,
            Err(e) => {
                fail(waiters, e);
                return Ok(());
            }
        };
        let frames = Frames {
            proposer: me,
            sequence: seq,
            db: db_name.to_string(),
            page_size: after.page_size,
            db_pages: after.n_page,
            pages: changes,
        };
        tracing::debug!(
            "batch {seq} on {db_name}: proposing {} pages at term {} (applied {} of term {})",
            frames.pages.len(),
            self.term,
            self.applied(),
            self.applied_term
        );
        self.settings
            .metrics
            .execute
            .observe(self.batch_started.elapsed().as_secs_f64());
        self.in_flight = Some(InFlight {
            db: db_name.to_string(),
            seq,
            waiters,
            proposed: Instant::now(),
            pages,
            kept,
        });
        let base = self.applied();
        (self.to_raft)(ToRaft::Propose {
            data: frames.encode(),
            seq,
            base,
        });
        Ok(())
    }

    /// Fails the callers of the in-flight batch. Its frames were rewound at capture, so
    /// nothing is visible; if its entry commits anyway, it is applied like any other.
    fn abort_in_flight(&mut self, why: Error) {
        let Some(f) = self.in_flight.take() else {
            return;
        };
        tracing::warn!(
            "write batch {} on {} not known to be committed: {why}",
            f.seq,
            f.db
        );
        for w in f.waiters {
            w(Err(clone_err(&why)));
        }
    }

    fn apply_entry(&mut self, e: Entry) -> Result<()> {
        let index = e.index;
        if index <= self.applied() {
            return Ok(());
        }
        if e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty() {
            let frames = Frames::decode(Bytes::from(e.data.clone()))
                .map_err(|err| Error::Corrupt(format!("entry {index}: {err}")))?;
            let own = self
                .in_flight
                .as_ref()
                .is_some_and(|f| frames.proposer == self.me && f.seq == frames.sequence);
            tracing::debug!(
                "applying entry {index} (term {}): batch {} of node {} on {}{}",
                e.term,
                frames.sequence,
                frames.proposer,
                frames.db,
                if own { " (own, in flight)" } else { "" }
            );
            if !own {
                // Another node's entry: whatever this node had in flight lost its place.
                self.abort_in_flight(Error::OutcomeUnknown);
                self.rollback_tx();
            } else if let Some(f) = &self.in_flight {
                let waited = f.proposed.elapsed().as_secs_f64();
                self.settings.metrics.commit.observe(waited);
            }
            let started = Instant::now();
            let (images, kept) = match self.in_flight.as_mut().filter(|_| own) {
                Some(f) => (Some(std::mem::take(&mut f.pages)), f.kept.take()),
                None => (None, None),
            };
            let exposed = match (kept, &images) {
                (Some(k), Some(i)) => self.expose_kept(&frames, k, i),
                _ => false,
            };
            if !exposed {
                self.apply_frames(&frames, images.as_deref())?;
            }
            self.settings
                .metrics
                .apply
                .observe(started.elapsed().as_secs_f64());
            if own {
                // The applied index is published before the writers are answered, so that
                // an answered writer that reads `applied` sees its own entry included.
                self.set_applied(index, e.term);
                let f = self.in_flight.take().unwrap();
                for w in f.waiters {
                    w(Ok(()));
                }
                return Ok(());
            }
        }
        self.set_applied(index, e.term);
        Ok(())
    }

    /// Applies the leader's own entry by putting back the wal-index header of its speculative
    /// COMMIT, if the frames it wrote are still there: no WAL was written since the rewind
    /// (so they were not overwritten, checkpointed over or truncated) and the header is still
    /// the rewound one. Readers see the entry at once, as after any SQLite commit; the next
    /// transaction of every connection sees the changed header and drops its page cache.
    /// Returns false (nothing done) otherwise; the caller then writes the pages.
    fn expose_kept(&mut self, f: &Frames, kept: Kept, images: &[Page]) -> bool {
        let Some(db) = self.dbs.get_mut(&f.db) else {
            return false;
        };
        let key = &db.handle.key;
        if vfs::wal_writes() != kept.wal_writes || vfs::save_header(key) != Some(kept.rewound) {
            return false;
        }
        if !vfs::restore_header(key, &kept.exposed) {
            return false;
        }
        // The test builds check that this node now holds exactly the entry's pages.
        #[cfg(debug_assertions)]
        for c in &f.pages {
            let page = read_page(&db.writer, c.pgno).unwrap().unwrap();
            assert_eq!(
                crc32fast::hash(&page),
                c.crc,
                "page {} of the exposed frames differs from the entry",
                c.pgno
            );
        }
        db.committed
            .applied(images.iter().map(|p| (p.pgno, p.data.clone())), f.db_pages);
        self.frames_since_checkpoint += f.pages.len() as u64;
        true
    }

    /// Writes an entry's page images through SQLite (invariant 3).
    fn apply_frames(&mut self, f: &Frames, images: Option<&[Page]>) -> Result<()> {
        if f.page_size != PAGE_SIZE {
            return Err(Error::Corrupt(format!(
                "entry for {} has page size {}",
                f.db, f.page_size
            )));
        }
        self.frames_since_checkpoint += f.pages.len() as u64;
        let db = self.db(&f.db)?;
        apply_pages(&db.writer, f, images, &mut db.committed)
    }

    fn handle_tx(&mut self, op: TxOp) {
        match op {
            TxOp::Begin { db, idle, reply } => {
                if !self.is_leader {
                    let _ = reply.send(Err(Error::NotLeader {
                        leader_id: None,
                        leader_addr: None,
                    }));
                    return;
                }
                // Wait for the writer: retried by the caller if busy.
                if !self.can_write() {
                    let _ = reply.send(Err(Error::Unavailable("the writer is busy; retry".into())));
                    return;
                }
                let r = self.db(&db).and_then(|d| {
                    reset_cache(&d.writer)?;
                    d.writer
                        .execute_batch("BEGIN IMMEDIATE")
                        .map_err(Error::from)
                });
                match r {
                    Ok(()) => {
                        self.seq += 1;
                        let id = self.seq;
                        self.open_tx = Some(OpenTx {
                            id,
                            db,
                            idle,
                            last_used: Instant::now(),
                        });
                        let _ = reply.send(Ok(id));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            TxOp::Exec { id, stmt, reply } => {
                let Some(tx) = self.open_tx.as_mut().filter(|t| t.id == id) else {
                    let _ = reply.send(Err(Error::Invalid(
                        "no such open transaction (rolled back?)".into(),
                    )));
                    return;
                };
                tx.last_used = Instant::now();
                let db = &self.dbs[&tx.db];
                let (w, g) = (&db.writer, &db.guard);
                let r = g
                    .client(self.settings.statement_timeout, || {
                        query_rows(w, g, &stmt, self.settings.max_result_bytes)
                    })
                    .map(|rows| {
                        (
                            rows,
                            ExecResult {
                                rows_affected: w.changes(),
                                last_insert_rowid: w.last_insert_rowid(),
                            },
                        )
                    });
                if w.is_autocommit() {
                    // SQLite rolled the whole transaction back (OR ROLLBACK, RAISE(ROLLBACK),
                    // an interrupted write): it is over, and nothing may run outside one.
                    self.open_tx = None;
                    let why = match r {
                        Err(e) => e.to_string(),
                        Ok(_) => "SQLite ended it".into(),
                    };
                    let _ = reply.send(Err(Error::Invalid(format!(
                        "the statement rolled back the whole transaction ({why}); nothing \
                         of it was kept: begin a new one"
                    ))));
                    return;
                }
                let _ = reply.send(r);
            }
            TxOp::Commit { id, reply } => {
                let Some(tx) = self.open_tx.take_if(|t| t.id == id) else {
                    let _ = reply.send(Err(Error::Invalid(
                        "no such open transaction (rolled back?)".into(),
                    )));
                    return;
                };
                let waiter: Waiter = Box::new(move |r: Result<()>| {
                    let _ = reply.send(r);
                });
                if let Err(e) = self.commit_and_propose(&tx.db, vec![waiter]) {
                    tracing::warn!("commit of transaction {id} failed: {e}");
                }
            }
            TxOp::Rollback { id } => {
                if self.open_tx.as_ref().is_some_and(|t| t.id == id) {
                    self.rollback_tx();
                }
            }
        }
    }

    fn rollback_tx(&mut self) {
        if let Some(tx) = self.open_tx.take() {
            let _ = self.dbs[&tx.db].writer.execute_batch("ROLLBACK");
        }
    }

    /// Checkpoints every database into its file and advances C (invariant 4).
    fn maybe_checkpoint(&mut self) -> Result<()> {
        if self.syncing.is_some()
            || self.frames_since_checkpoint < self.settings.checkpoint_frames
            || Instant::now() < self.next_checkpoint
        {
            return Ok(());
        }
        self.checkpoint()
    }

    /// Starts a checkpoint of every database: records its target, has SQLite copy the WAL
    /// into each database file, and leaves the fsyncs of the files to a thread of their own
    /// ([`StateMachine::finish_checkpoint`] records the checkpoint index once they are done).
    /// The copy is a third of a checkpoint's time and the fsyncs more than half (at 64 etcd
    /// clients: 15 and 23 ms of 42); writes and applies go on during the fsyncs. Nothing
    /// else writes the database files meanwhile: the next checkpoint waits for this one.
    fn checkpoint(&mut self) -> Result<()> {
        let applied = self.applied();
        if applied <= self.meta.checkpoint_index || self.syncing.is_some() {
            return Ok(());
        }
        let started = Instant::now();
        // Record the target first: once SQLite starts copying, the files hold pages of
        // entries up to `applied`, and recovery must replay at least that far.
        if self.meta.checkpoint_target != applied {
            self.meta.checkpoint_target = applied;
            write_atomic(
                &self.gen_dir.join("meta.json"),
                &serde_json::to_vec(&self.meta).unwrap(),
            )?;
        }
        for db in self.dbs.values() {
            let (busy, log, done): (i64, i64, i64) =
                db.writer
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?;
            // Complete once every frame is in the database file, even if readers kept
            // SQLite from resetting the WAL (`busy`): C only needs the file to hold it all.
            let _ = busy;
            if log > 0 && done < log {
                // A reader still needs older frames; try again later.
                self.next_checkpoint = Instant::now() + Duration::from_millis(100);
                return Ok(());
            }
        }
        self.frames_since_checkpoint = 0;
        let files: Vec<PathBuf> = self.dbs.values().map(|d| d.handle.path.clone()).collect();
        let dir = self.gen_dir.clone();
        let (tx, done) = mpsc::channel();
        let sync = move || {
            let r = sync_files(&files, &dir);
            if r.is_ok() {
                failpoint("checkpoint-before-meta");
            }
            let _ = tx.send(r);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("raftsql-ckpt".into())
            .spawn(sync)
        {
            // No thread to be had: the next checkpoint starts at once and fsyncs it all.
            self.frames_since_checkpoint = self.settings.checkpoint_frames;
            return Err(Error::Internal(format!(
                "no thread for the checkpoint's fsyncs: {e}"
            )));
        }
        self.syncing = Some(Syncing {
            applied,
            term: self.applied_term,
            started,
            done,
        });
        Ok(())
    }

    /// Records the checkpoint index of a checkpoint whose fsyncs are done (`wait`: waits for
    /// them), and lets the Raft log be compacted up to it. If they failed, the next
    /// checkpoint starts at once and fsyncs everything again.
    fn finish_checkpoint(&mut self, wait: bool) -> Result<()> {
        let Some(s) = &self.syncing else {
            return Ok(());
        };
        let r = if wait {
            s.done.recv().map_err(|_| TryRecvError::Disconnected)
        } else {
            s.done.try_recv()
        };
        let r = match r {
            Err(TryRecvError::Empty) => return Ok(()),
            Err(TryRecvError::Disconnected) => Err(Error::Internal(
                "the checkpoint's fsync thread ended without an answer".into(),
            )),
            Ok(r) => r,
        };
        let s = self.syncing.take().unwrap();
        if let Err(e) = r {
            self.frames_since_checkpoint = self.settings.checkpoint_frames;
            return Err(e);
        }
        let applied = s.applied;
        self.meta.checkpoint_index = applied;
        self.meta.checkpoint_term = s.term;
        write_atomic(
            &self.gen_dir.join("meta.json"),
            &serde_json::to_vec(&self.meta).unwrap(),
        )?;
        self.settings
            .metrics
            .checkpoint
            .observe(s.started.elapsed().as_secs_f64());
        self.progress.checkpoint.store(applied, Ordering::SeqCst);
        (self.to_raft)(ToRaft::Checkpointed(applied));
        tracing::debug!("checkpoint at index {applied}");
        Ok(())
    }

    /// Pins every database at the applied index and hands them to the snapshot writer. If
    /// any database cannot be pinned the snapshot fails as a whole (a snapshot lacking a
    /// database would make a follower or a backup silently lack it).
    fn make_snapshot(&mut self) {
        let index = self.applied();
        let term = self.applied_term;
        let mut pinned = Vec::new();
        for (name, db) in &self.dbs {
            let r = db.handle.reader().and_then(|(c, _)| {
                failpoint_err("snapshot-pin", name)?;
                c.execute_batch("BEGIN")?;
                c.query_row("PRAGMA schema_version", [], |_| Ok(()))?;
                Ok(c)
            });
            match r {
                Ok(c) => pinned.push((name.clone(), c)),
                Err(e) => {
                    let why = format!("database {name} could not be pinned at index {index}: {e}");
                    tracing::error!("snapshot not built: {why}");
                    self.snapshots.build_failed(why);
                    return;
                }
            }
        }
        self.snapshots.build_in_background(index, term, pinned);
    }

    /// Replaces all databases with a received snapshot, atomically and durably.
    fn install_snapshot(&mut self, meta: &SnapshotMetadata, dir: &Path) -> Result<()> {
        // A checkpoint still fsyncing the old generation's files finishes first: its
        // meta.json write must not land after the new generation's.
        if let Err(e) = self.finish_checkpoint(true) {
            tracing::warn!("checkpoint failed before a snapshot install: {e}");
        }
        self.abort_in_flight(Error::OutcomeUnknown);
        self.rollback_tx();
        let gen_name = format!("gen-{}-{}", meta.index, rand::random::<u32>());
        let gen = self.root.join(&gen_name);
        fs::create_dir_all(&gen).map_err(|e| Error::io(&gen, e))?;
        for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) == Some("db") {
                let to = gen.join(p.file_name().unwrap());
                fs::rename(&p, &to).map_err(|e| Error::io(&p, e))?;
                File::open(&to)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io(&to, e))?;
            }
        }
        let cs = meta.get_conf_state();
        let new_meta = Meta {
            checkpoint_index: meta.index,
            checkpoint_term: meta.term,
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            checkpoint_target: 0,
        };
        write_atomic(
            &gen.join("meta.json"),
            &serde_json::to_vec(&new_meta).unwrap(),
        )?;
        fsync_dir(&gen)?;
        write_atomic(&self.root.join("CURRENT"), gen_name.as_bytes())?;
        // Switch: drop the old writers; readers holding old handles finish on the old files.
        let old = std::mem::replace(&mut self.gen_dir, gen);
        for (_, db) in self.dbs.drain() {
            vfs::forget(&db.handle.key);
        }
        self.meta = new_meta;
        self.open_all()?;
        let _ = fs::remove_dir_all(&old);
        let _ = fs::remove_dir_all(dir);
        self.frames_since_checkpoint = 0;
        self.set_applied(meta.index, meta.term);
        self.progress.checkpoint.store(meta.index, Ordering::SeqCst);
        tracing::info!(
            "installed snapshot at index {} term {}",
            meta.index,
            meta.term
        );
        Ok(())
    }
}

/// Crash-test hook: aborts the process at the named point when the environment variable
/// `RAFTSQL_CRASH_AT` names it (used by the crash tests; costs one env lookup).
fn failpoint(name: &str) {
    if std::env::var("RAFTSQL_CRASH_AT").is_ok_and(|v| v == name) {
        eprintln!("raftsql: failpoint {name} reached: aborting");
        std::process::abort();
    }
}

/// Test hook: fails with an error at the named point for `what` when `RAFTSQL_FAIL_AT` is
/// `name:what` (used by the snapshot tests; costs one env lookup).
fn failpoint_err(name: &str, what: &str) -> Result<()> {
    match std::env::var("RAFTSQL_FAIL_AT") {
        Ok(v) if v == format!("{name}:{what}") => Err(Error::Internal(format!(
            "failpoint {name}:{what} (RAFTSQL_FAIL_AT)"
        ))),
        _ => Ok(()),
    }
}

fn clone_err(e: &Error) -> Error {
    match e {
        Error::OutcomeUnknown => Error::OutcomeUnknown,
        Error::Shutdown => Error::Shutdown,
        Error::NotLeader {
            leader_id,
            leader_addr,
        } => Error::NotLeader {
            leader_id: *leader_id,
            leader_addr: leader_addr.clone(),
        },
        Error::Sql { code, message } => Error::Sql {
            code: *code,
            message: message.clone(),
        },
        Error::Constraint { code, message } => Error::Constraint {
            code: *code,
            message: message.clone(),
        },
        Error::Invalid(m) => Error::Invalid(m.clone()),
        Error::Unavailable(m) => Error::Unavailable(m.clone()),
        Error::Timeout(d) => Error::Timeout(*d),
        other => Error::Internal(other.to_string()),
    }
}

/// Runs `f` inside a SAVEPOINT on `w`, rolling back to it if `f` fails.
fn in_savepoint(w: &Connection, f: WriteFn) -> Result<Box<dyn std::any::Any + Send>> {
    w.execute_batch(&format!("SAVEPOINT {}", guard::INTERNAL_SAVEPOINT))?;
    let r = f(w);
    end_savepoint(w, r)
}

/// Releases the request's savepoint, first rolling back to it if `r` failed.
fn end_savepoint<T>(w: &Connection, r: Result<T>) -> Result<T> {
    if w.is_autocommit() {
        // SQLite ended the whole transaction; the caller sees it (see [`execute_batch`]).
        return r;
    }
    if r.is_err() {
        w.execute_batch(&format!("ROLLBACK TO {}", guard::INTERNAL_SAVEPOINT))?;
    }
    w.execute_batch(&format!("RELEASE {}", guard::INTERNAL_SAVEPOINT))?;
    r
}

/// What [`execute_batch`] left on the writer.
enum Executed {
    /// The batch transaction is open holding the requests that succeeded; these answer them
    /// once it commits. (Failed requests were answered already.)
    Open(Vec<Waiter>),
    /// A Rust write ended the transaction: these requests did not run and go back to the
    /// queue (the closures before it were failed).
    Requeue(Vec<WriteReq>),
    /// The transaction could not start; every request was answered with the error.
    NotStarted,
}

/// Runs a batch's requests in one transaction on the writer: SQL requests first, each in a
/// SAVEPOINT and guarded as client SQL, then Rust writes.
///
/// SQLite rolls back a whole transaction on its own in a few cases (a statement's `OR
/// ROLLBACK` conflict clause, `RAISE(ROLLBACK)` in a trigger, an interrupted or failing
/// write: SQLITE_INTERRUPT/FULL/NOMEM/IOERR). The writer must never go on in autocommit mode
/// (each statement would commit to the WAL at once, visible on this node only, outside
/// Raft), so after every request it checks the batch transaction is still open. If a SQL
/// request ended it, that request is answered with its error and the others, which are data
/// and can be re-run, run again in a new transaction. If a Rust write ended it, that write
/// gets its error, the Rust writes before it fail with Unavailable (retry), and the rest
/// go back to the queue.
fn execute_batch(w: &Connection, g: &Guard, budget: Duration, batch: Vec<WriteReq>) -> Executed {
    let (mut sql, funcs): (Vec<WriteReq>, Vec<WriteReq>) =
        batch.into_iter().partition(WriteReq::is_sql);
    let begin =
        || reset_cache(w).and_then(|_| w.execute_batch("BEGIN IMMEDIATE").map_err(Error::from));
    let results = 'again: loop {
        if let Err(e) = begin() {
            let msg = e.to_string();
            for r in sql.into_iter().chain(funcs) {
                r.fail(Error::Internal(msg.clone()));
            }
            return Executed::NotStarted;
        }
        let mut results = Vec::with_capacity(sql.len());
        for i in 0..sql.len() {
            let Work::Statements { stmts, .. } = &sql[i].work else {
                unreachable!("partitioned")
            };
            let r = run_request(w, g, stmts, budget);
            if w.is_autocommit() {
                let req = sql.remove(i);
                tracing::info!(
                    "a write request made SQLite roll back its batch; running the batch's {} \
                     other SQL request(s) again",
                    sql.len()
                );
                req.fail(ended_transaction(r.err()));
                continue 'again;
            }
            results.push(r);
        }
        break results;
    };
    let mut pending: Vec<Box<dyn FnOnce(Result<()>) + Send>> = Vec::new();
    let mut funcs = VecDeque::from(funcs);
    while let Some(req) = funcs.pop_front() {
        let Work::Func { f, reply } = req.work else {
            unreachable!("partitioned")
        };
        let r = in_savepoint(w, f);
        if w.is_autocommit() {
            let _ = reply.send(Err(ended_transaction(r.err())));
            for p in pending {
                p(Err(Error::Unavailable(
                    "another write in the same batch made SQLite roll the batch back; retry".into(),
                )));
            }
            return Executed::Requeue(sql.into_iter().chain(funcs).collect());
        }
        match r {
            Ok(out) => pending.push(Box::new(move |c: Result<()>| {
                let _ = reply.send(c.map(|_| out));
            })),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }
    let mut waiters: Vec<Waiter> = sql
        .into_iter()
        .zip(results)
        .filter_map(|(req, r)| req.settle(r))
        .collect();
    waiters.extend(pending);
    Executed::Open(waiters)
}

/// The error of a request that made SQLite end the batch transaction.
fn ended_transaction(e: Option<Error>) -> Error {
    let why = e.map_or_else(|| "SQLite ended it".to_string(), |e| e.to_string());
    Error::Invalid(format!(
        "the request rolled back the whole transaction ({why}); nothing of it was kept"
    ))
}

/// Writes an entry's page images into the database of `w`.
///
/// Pages are written through `sqlite_dbpage` in one transaction, page 1 last (it holds the
/// schema cookie; nothing may make SQLite re-read the schema while the b-tree's view of the
/// pages is stale). If the database shrank, a second transaction truncates it; between the
/// two, readers already see the new database, whose header gives its new size, so the extra
/// pages are unreachable. After each, the connection's page cache is purged: sqlite_dbpage
/// copies bytes into cached pages but leaves the b-tree's parsed view of them stale.
///
/// `images`, given by the leader for its own entry, are the entry's pages whole (as it
/// captured them, one per change, in order); each must have the change's crc32.
///
/// `committed` holds committed images of some pages (the bases it has are used instead of
/// reading them) and gets the pages written.
pub(crate) fn apply_pages(
    w: &Connection,
    f: &Frames,
    images: Option<&[Page]>,
    committed: &mut Committed,
) -> Result<()> {
    // The one place that writes sqlite_dbpage: lift DEFENSIVE (on while client SQL runs on
    // the writer, see guard.rs) for the apply only.
    guard::set_defensive(w, false)?;
    let r = write_pages(w, f, images, committed);
    guard::set_defensive(w, true)?;
    r
}

fn write_pages(
    w: &Connection,
    f: &Frames,
    images: Option<&[Page]>,
    committed: &mut Committed,
) -> Result<()> {
    let size = f.page_size as usize;
    let images = images.filter(|i| {
        i.len() == f.pages.len()
            && i.iter()
                .zip(&f.pages)
                .all(|(p, c)| p.pgno == c.pgno && crc32fast::hash(&p.data) == c.crc)
    });
    let grown = in_transaction(w, |w| {
        let old_pages: u32 = w.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        // Every base is read before anything is written: once the database grows inside
        // this transaction, a page between its old and new end would read as whatever an
        // old WAL frame or the file's tail holds there, not as the zeros the leader diffed
        // against.
        let mut pages = Vec::with_capacity(f.pages.len());
        for (i, c) in f.pages.iter().enumerate() {
            if let Some(images) = images {
                pages.push((c.pgno, images[i].data.to_vec()));
                continue;
            }
            let base = match c.change {
                Change::Image(_) => None,
                Change::Ranges(_) => committed_base(w, None, committed, Some(old_pages), c.pgno)?,
            };
            let page = c
                .apply_to(base.as_deref(), size)
                .map_err(|e| Error::Corrupt(format!("applying an entry to {}: {e}", f.db)))?;
            pages.push((c.pgno, page));
        }
        let mut st = w.prepare_cached("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, ?2)")?;
        let (first, rest): (Vec<_>, Vec<_>) = pages.iter().partition(|(pgno, _)| *pgno == 1);
        for (pgno, data) in rest.into_iter().chain(first.iter().copied()) {
            st.execute(rusqlite::params![pgno, &data[..]])?;
        }
        Ok((
            f.pages.last().map_or(old_pages, |p| p.pgno.max(old_pages)),
            pages,
        ))
    })?;
    let (grown, written) = grown;
    if let Some((_, p1)) = written.iter().find(|(pgno, _)| *pgno == 1) {
        // Replicas must be byte-identical: check the one page SQLite rewrites on its own.
        let now = read_page(w, 1)?.unwrap_or_default();
        if now[..] != p1[..] {
            let diff: Vec<usize> = (0..now.len())
                .filter(|i| now[*i] != p1[*i])
                .take(8)
                .collect();
            return Err(Error::Corrupt(format!(
                "applied page 1 differs from the entry's at offsets {diff:?}"
            )));
        }
    }
    if f.db_pages >= 1 && f.db_pages < grown {
        in_transaction(w, |w| {
            w.prepare_cached("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, NULL)")?
                .execute([f.db_pages + 1])?;
            Ok(())
        })?;
    }
    committed.applied(
        written.into_iter().map(|(p, d)| (p, Bytes::from(d))),
        f.db_pages,
    );
    Ok(())
}

fn in_transaction<T>(w: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    begin_immediate(w)?;
    let r = f(w);
    match &r {
        Ok(_) => w.execute_batch("COMMIT")?,
        Err(_) => {
            let _ = w.execute_batch("ROLLBACK");
        }
    }
    reset_cache(w)?;
    r
}

/// `BEGIN IMMEDIATE` on the writer, waiting out a transient SQLITE_BUSY (up to 10 s).
///
/// The state machine is the only writer, so the lock can only be held for a moment by a
/// reader that is rebuilding the wal-index (after a restart, or after the rewind that
/// empties the WAL). The writer keeps `busy_timeout=0` so that checkpoints never wait for
/// readers; an apply, which must not fail (it would stop the node), retries here instead.
/// (Found by the long Jepsen profile: a node restarted during local reads stopped with
/// "database is locked".)
fn begin_immediate(w: &Connection) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pause = Duration::from_millis(1);
    loop {
        match w.execute_batch("BEGIN IMMEDIATE") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            r => return r.map_err(Error::from),
        }
    }
}

/// Purges the page cache of `w` (outside a transaction).
///
/// Two reasons. sqlite_dbpage copies bytes into cached pages but leaves the b-tree's parsed
/// view of them stale. And in WAL mode SQLite stamps page 1's change counter as "the
/// counter it last *read* from disk, plus one": a warm cache would make the leader repeat a
/// stale value while followers count on, and replicas would differ in those bytes. With the
/// cache purged before every leader batch and after every apply, every node writes
/// "previous counter + 1" and the pages stay byte-identical.
fn reset_cache(w: &Connection) -> Result<()> {
    // SAFETY: a valid open connection; this file control takes no argument.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_file_control(
            w.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_RESET_CACHE,
            std::ptr::null_mut(),
        )
    };
    if rc != rusqlite::ffi::SQLITE_OK {
        return Err(Error::Internal(format!(
            "resetting the page cache failed: {rc}"
        )));
    }
    Ok(())
}

/// Runs one request's client statements inside a SAVEPOINT, guarded by `g` with a time
/// budget of `budget`; on error rolls back to the savepoint.
fn run_request(
    w: &Connection,
    g: &Guard,
    stmts: &[Statement],
    budget: Duration,
) -> Result<Vec<ExecResult>> {
    w.execute_batch(&format!("SAVEPOINT {}", guard::INTERNAL_SAVEPOINT))?;
    let r = g.client(budget, || {
        let mut out = Vec::with_capacity(stmts.len());
        for s in stmts {
            let mut st = w.prepare_cached(&guard::client_key(&s.sql))?;
            guard::check_statement(g, &st)?;
            let mut rows = st.query(rusqlite::params_from_iter(s.params.iter()))?;
            while rows.next()?.is_some() {}
            out.push(ExecResult {
                rows_affected: w.changes(),
                last_insert_rowid: w.last_insert_rowid(),
            });
        }
        Ok(out)
    });
    end_savepoint(w, r)
}

/// Page 1's file change counter (offset 24) as committed; 0 for an empty database.
fn page1_counter(w: &Connection) -> Result<u32> {
    Ok(read_page(w, 1)?.map_or(0, |d| change_counter(&d)))
}

/// The change counter page 1 holds (its bytes 24..28).
fn change_counter(page1: &[u8]) -> u32 {
    u32::from_be_bytes(page1[24..28].try_into().unwrap())
}

/// Page `pgno` as the connection's current transaction (or a new read) sees it; `None` past
/// the end of the database.
fn read_page(w: &Connection, pgno: u32) -> Result<Option<Vec<u8>>> {
    let mut st = w.prepare_cached("SELECT data FROM sqlite_dbpage WHERE pgno = ?1")?;
    let mut rows = st.query([pgno])?;
    Ok(match rows.next()? {
        Some(r) => Some(r.get(0)?),
        None => None,
    })
}

/// The changes that turn the committed pages into `pages`. The committed page is the one the
/// batch read (`bases`, recorded by the VFS), else it is read on the rewound writer (a page
/// SQLite reused from the freelist without reading it, or one past the end).
///
/// `committed_pages` is the committed database's size when the wal-index knows it: a page
/// past it has no base.
fn diff_pages(
    w: &Connection,
    pages: &[Page],
    mut bases: HashMap<u32, Vec<u8>>,
    committed: &Committed,
    committed_pages: Option<u32>,
) -> Result<Vec<PageChange>> {
    pages
        .iter()
        .map(|p| {
            let base = committed_base(w, Some(&mut bases), committed, committed_pages, p.pgno)?;
            Ok(PageChange::diff(p, base.as_deref()))
        })
        .collect()
}

/// The committed image of page `pgno`: one the batch read (`recorded`, taken out), else the
/// one `committed` holds, else `None` past the committed size if it is known, else the page
/// read on `w` (which must see the committed state).
fn committed_base(
    w: &Connection,
    recorded: Option<&mut HashMap<u32, Vec<u8>>>,
    committed: &Committed,
    committed_pages: Option<u32>,
    pgno: u32,
) -> Result<Option<Bytes>> {
    let held = match recorded.and_then(|r| r.remove(&pgno)) {
        Some(b) => Some(Bytes::from(b)),
        None => committed.get(pgno).cloned(),
    };
    match held {
        Some(b) => {
            // The test builds check every recorded or cached base against SQLite's own.
            #[cfg(debug_assertions)]
            {
                let read = read_page(w, pgno)?;
                assert!(
                    read.as_deref() == Some(&b[..]),
                    "the held base of page {pgno} differs from the committed page"
                );
            }
            Ok(Some(b))
        }
        None if committed_pages.is_some_and(|n| pgno > n) => Ok(None),
        None => Ok(read_page(w, pgno)?.map(Bytes::from)),
    }
}

/// Page 1 with its change counter and "version valid for" set to `counter` and the SQLite
/// version number set, as SQLite's pager writes them when it commits page 1 in WAL mode.
fn stamp_change_counter(page: &Bytes, counter: u32) -> Bytes {
    let mut p = page.to_vec();
    p[24..28].copy_from_slice(&counter.to_be_bytes());
    p[92..96].copy_from_slice(&counter.to_be_bytes());
    p[96..100].copy_from_slice(&(rusqlite::ffi::SQLITE_VERSION_NUMBER as u32).to_be_bytes());
    Bytes::from(p)
}

/// The directory of the current generation of databases under `root`, if there is one.
pub fn current_generation(root: &Path) -> Result<Option<PathBuf>> {
    let current = root.join("CURRENT");
    match fs::read_to_string(&current) {
        Ok(name) => Ok(Some(root.join(name.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&current, e)),
    }
}

/// Records `voters` and `learners` as the configuration at the current generation's
/// checkpoint (for disaster recovery, with the node stopped). Returns the new `meta.json`.
pub fn rewrite_checkpoint_conf(root: &Path, voters: Vec<u64>, learners: Vec<u64>) -> Result<Meta> {
    let gen = current_generation(root)?
        .ok_or_else(|| Error::Corrupt(format!("{}: no CURRENT generation", root.display())))?;
    let mut meta = read_meta(&gen)?;
    meta.voters = voters;
    meta.learners = learners;
    meta.checkpoint_target = 0;
    write_atomic(&gen.join("meta.json"), &serde_json::to_vec(&meta).unwrap())?;
    Ok(meta)
}

/// Brings the database files of the current generation up to the last committed entry the
/// log holds, by writing the entries' pages straight into the files, before SQLite opens
/// them (invariant 4).
///
/// After a crash in the middle of a checkpoint the files mix pages of several states; SQLite
/// must not read them until they are whole again, so this replay does not go through it.
/// Writing every page of every entry from the checkpoint index on, in log order, and
/// truncating each file to its entry's size rebuilds exactly the state of the last entry.
/// Returns the index the files now hold.
pub fn recover_files(root: &Path, log: &crate::log::RaftLog) -> Result<u64> {
    let Some(gen) = current_generation(root)? else {
        return Ok(0);
    };
    let mut meta = read_meta(&gen)?;
    let upto = log
        .hard_state()
        .commit
        .max(meta.checkpoint_target)
        .min(log.last_index());
    if upto <= meta.checkpoint_index {
        return Ok(meta.checkpoint_index);
    }
    let started = Instant::now();
    let mut files: HashMap<String, File> = HashMap::new();
    let mut last_term = meta.checkpoint_term;
    let mut next = meta.checkpoint_index + 1;
    while next <= upto {
        let entries = log
            .entries(next, upto + 1, Some(8 << 20))
            .map_err(|e| Error::Corrupt(format!("replaying the log from {next}: {e}")))?;
        for e in entries {
            next = e.index + 1;
            last_term = e.term;
            if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
                continue;
            }
            let f = Frames::decode(Bytes::from(e.data.clone()))
                .map_err(|err| Error::Corrupt(format!("entry {}: {err}", e.index)))?;
            check_db_name(&f.db)?;
            let path = gen.join(format!("{}.db", f.db));
            if !files.contains_key(&f.db) {
                remove_wal_files(&path);
                let file = fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| Error::io(&path, e))?;
                files.insert(f.db.clone(), file);
            }
            let file = &files[&f.db];
            // Entries up to an interrupted checkpoint's target may find pages the checkpoint
            // already carried further: their ranges are written as they are (entry.rs: a
            // replay over mixed versions ends at the last one). From there on every page is
            // exactly its entry's base, and each one is checked against the entry's crc32.
            let mixed = e.index <= meta.checkpoint_target;
            let size = f.page_size as usize;
            for c in &f.pages {
                let at = (c.pgno as u64 - 1) * f.page_size as u64;
                let io = |e| Error::io(&path, e);
                match &c.change {
                    Change::Ranges(rs) if mixed => {
                        for r in rs {
                            file.write_all_at(&r.data, at + r.offset as u64)
                                .map_err(io)?;
                        }
                    }
                    change => {
                        let base = match change {
                            Change::Image(_) => None,
                            Change::Ranges(_) => read_file_page(file, at, size).map_err(io)?,
                        };
                        let page = c.apply_to(base.as_deref(), size).map_err(|x| {
                            Error::Corrupt(format!(
                                "replaying entry {} into {}: {x}",
                                e.index, f.db
                            ))
                        })?;
                        file.write_all_at(&page, at).map_err(io)?;
                    }
                }
            }
            file.set_len(f.db_pages as u64 * f.page_size as u64)
                .map_err(|e| Error::io(&path, e))?;
        }
    }
    for (name, f) in &files {
        f.sync_all()
            .map_err(|e| Error::io(gen.join(format!("{name}.db")), e))?;
    }
    fsync_dir(&gen)?;
    meta.checkpoint_index = upto;
    meta.checkpoint_term = last_term;
    meta.checkpoint_target = 0;
    write_atomic(&gen.join("meta.json"), &serde_json::to_vec(&meta).unwrap())?;
    tracing::info!(
        "replayed the log into the database files up to index {upto} in {:?}",
        started.elapsed()
    );
    Ok(upto)
}

/// The page of `size` bytes at `at` in a database file: `None` past its end, zeros past the
/// end of a page the file holds only in part.
fn read_file_page(file: &File, at: u64, size: usize) -> std::io::Result<Option<Vec<u8>>> {
    let len = file.metadata()?.len();
    if at >= len {
        return Ok(None);
    }
    let mut page = vec![0u8; size];
    let have = ((len - at) as usize).min(size);
    file.read_exact_at(&mut page[..have], at)?;
    Ok(Some(page))
}

/// What a speculative COMMIT appended: its pages (newest image of each), the wal-index
/// header after it, and that header raw if the frames can later be published as they are
/// (not if the COMMIT restarted the WAL).
type Captured = (Vec<Page>, vfs::WalHeader, Option<vfs::SavedHeader>);

/// After a speculative COMMIT: reads the frames it appended and rewinds the WAL to `saved`.
///
/// Returns `None` if the transaction appended nothing. The rewind puts back the wal-index
/// header saved before the COMMIT (the frames stay in the WAL file past the last valid
/// frame, where SQLite ignores them and the next write overwrites them). If the COMMIT
/// restarted the WAL from its beginning (SQLite does so once every frame is checkpointed),
/// the old header would point at overwritten frames, so instead the WAL is emptied and the
/// header invalidated: the database file alone holds the committed state, and SQLite
/// rebuilds the index from the (empty) WAL.
fn capture_and_rewind(
    db: &mut Db,
    key: &str,
    saved: &vfs::SavedHeader,
    before: &vfs::WalHeader,
) -> Result<Option<Captured>> {
    let after = vfs::read_header(key);
    let exposed = vfs::save_header(key);
    let restarted = after.is_none_or(|a| a.salt != before.salt);
    let captured = match after {
        Some(a) if !restarted && a.max_frame == before.max_frame => Ok(None),
        Some(a) => {
            let first = if restarted { 1 } else { before.max_frame + 1 };
            read_frames(db, first, a.max_frame, a.page_size)
                .map(|p| Some((p, a, exposed.filter(|_| !restarted))))
        }
        None => Err(Error::Internal(
            "wal-index header unreadable after commit".into(),
        )),
    };
    if restarted {
        let mut wal = db.handle.path.as_os_str().to_owned();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        fs::OpenOptions::new()
            .write(true)
            .open(&wal)
            .and_then(|f| f.set_len(0))
            .map_err(|e| Error::io(&wal, e))?;
        vfs::invalidate_header(key);
    } else {
        vfs::restore_header(key, saved);
    }
    captured
}

/// Reads WAL frames `first..=last`, keeping the newest image of each page, sorted by page.
///
/// Memory stays within the entry limit: the frames are read in chunks of at most
/// [`READ_CHUNK_FRAMES`], and the read stops with an error as soon as the distinct pages
/// exceed [`MAX_ENTRY_PAGE_BYTES`] (a transaction of GiBs is refused after reading 48 MiB,
/// not after loading it all).
fn read_frames(db: &mut Db, first: u32, last: u32, page_size: u32) -> Result<Vec<Page>> {
    let mut wal_path = db.handle.path.as_os_str().to_owned();
    wal_path.push("-wal");
    let wal_path = PathBuf::from(wal_path);
    if db.wal.is_none() {
        db.wal = Some(File::open(&wal_path).map_err(|e| Error::io(&wal_path, e))?);
    }
    let wal = db.wal.as_ref().unwrap();
    let frame = 24 + page_size as usize;
    let mut pages: BTreeMap<u32, Bytes> = BTreeMap::new();
    let mut buf = Vec::new();
    let mut next = first;
    while next <= last {
        let n = (last + 1 - next).min(READ_CHUNK_FRAMES);
        buf.resize(n as usize * frame, 0);
        wal.read_exact_at(&mut buf, 32 + (next as u64 - 1) * frame as u64)
            .map_err(|e| Error::io(&wal_path, e))?;
        for f in buf.chunks_exact(frame) {
            let pgno = u32::from_be_bytes(f[..4].try_into().unwrap());
            pages.insert(pgno, Bytes::copy_from_slice(&f[24..]));
        }
        if pages.len() * page_size as usize > MAX_ENTRY_PAGE_BYTES {
            return Err(too_large(
                pages.len() * page_size as usize,
                last + 1 - first,
            ));
        }
        next += n;
    }
    Ok(pages
        .into_iter()
        .map(|(pgno, data)| Page { pgno, data })
        .collect())
}

/// Frames read from the WAL at a time when capturing a batch (4 MiB at 4 KiB pages).
const READ_CHUNK_FRAMES: u32 = 1024;

/// The error for a transaction whose pages do not fit in one entry.
fn too_large(bytes_so_far: usize, frames: u32) -> Error {
    Error::Invalid(format!(
        "the transaction changed more than {} MiB of pages ({:.1} MiB in the first pages read \
         of its {frames} WAL frames), more than one replicated entry may carry: split it into \
         smaller transactions",
        MAX_ENTRY_PAGE_BYTES >> 20,
        bytes_so_far as f64 / (1 << 20) as f64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages_of(c: &Connection) -> BTreeMap<u32, Vec<u8>> {
        let mut st = c
            .prepare("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno")
            .unwrap();
        let rows = st
            .query_map([], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, Vec<u8>>(1)?)))
            .unwrap();
        rows.map(|r| r.unwrap()).collect()
    }

    /// Runs `sql` the way the leader does (cache purged first) and returns the entry a
    /// leader would ship: the pages that changed and the new size.
    #[allow(clippy::type_complexity)]
    fn leader_write(a: &Connection, sql: &str) -> (Vec<Page>, BTreeMap<u32, Vec<u8>>, u32) {
        reset_cache(a).unwrap();
        let before = pages_of(a);
        a.execute_batch(sql).unwrap();
        let after = pages_of(a);
        let pages = after
            .iter()
            .filter(|(n, d)| before.get(n) != Some(d))
            .map(|(n, d)| Page {
                pgno: *n,
                data: Bytes::from(d.clone()),
            })
            .collect();
        (pages, before, after.len() as u32)
    }

    /// The entry a leader ships for `pages`: page 1 stamped with the counter the replicas
    /// will write (`counter`), each page diffed against `before`.
    fn entry(
        mut pages: Vec<Page>,
        before: &BTreeMap<u32, Vec<u8>>,
        db_pages: u32,
        counter: u32,
    ) -> Frames {
        if let Some(p1) = pages.first_mut().filter(|p| p.pgno == 1) {
            p1.data = stamp_change_counter(&p1.data, counter);
        }
        Frames {
            proposer: 1,
            sequence: 1,
            db: "main".into(),
            page_size: PAGE_SIZE,
            db_pages,
            pages: pages
                .iter()
                .map(|p| {
                    let base = before
                        .get(&p.pgno)
                        .filter(|_| p.pgno <= before.len() as u32);
                    PageChange::diff(p, base.map(|b| &b[..]))
                })
                .collect(),
        }
    }

    fn digest(c: &Connection) -> (usize, u32) {
        let pages = pages_of(c);
        let mut h = crc32fast::Hasher::new();
        for (n, d) in &pages {
            h.update(&n.to_le_bytes());
            h.update(d);
        }
        (pages.len(), h.finalize())
    }

    /// Two replicas applying the same entries through sqlite_dbpage end byte-identical
    /// (page 1's change counter included), whether one restarted first or not; they truncate
    /// when the source shrank; and each applier's connection sees schema changes at once.
    #[test]
    fn replicas_applying_the_same_entries_are_identical() {
        vfs::register().unwrap();
        let dir = tempfile::tempdir().unwrap();
        // The source of entries (what a leader's speculative transactions produce).
        let a = open_writer(&dir.path().join("a.db")).unwrap();
        // B restarts before applying (as after kill -9): its file holds only page 1.
        let b = open_writer(&dir.path().join("b.db")).unwrap();
        drop(b);
        remove_wal_files(&dir.path().join("b.db"));
        let b = open_writer(&dir.path().join("b.db")).unwrap();
        let c = open_writer(&dir.path().join("c.db")).unwrap();
        // b reads every base from SQLite, c from its cache of the pages it applied.
        let mut cache = Committed::default();
        let mut step = |sql: &str| {
            let (pages, before, n) = leader_write(&a, sql);
            // As the leader does: page 1 carries the counter the replicas will write.
            let f = entry(pages, &before, n, page1_counter(&b).unwrap() + 1);
            apply_pages(&b, &f, None, &mut Committed::default()).unwrap();
            apply_pages(&c, &f, None, &mut cache).unwrap();
            assert_eq!(digest(&b), digest(&c), "after {sql}");
        };
        step("CREATE TABLE t(k TEXT PRIMARY KEY)");
        // B sees the new table at once (preparing against a stale schema would fail).
        b.prepare("INSERT INTO t VALUES ('x')").unwrap();
        for i in 0..50 {
            step(&format!("INSERT INTO t VALUES ('k{i}')"));
        }
        step("CREATE TABLE big(v); WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i < 2000) INSERT INTO big SELECT randomblob(500) FROM c;");
        step("DROP TABLE big");
        step("VACUUM");
        for conn in [&b, &c] {
            let n: i64 = conn
                .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 50);
            let pages: i64 = conn
                .query_row("PRAGMA page_count", [], |r| r.get(0))
                .unwrap();
            assert!(pages < 10, "not truncated: {pages} pages");
        }
    }
}
