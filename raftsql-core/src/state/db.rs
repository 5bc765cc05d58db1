//! One database: its file, its read gate, its readers, and the page-level reads the
//! writer and the apply path share.

use std::collections::HashMap;
use std::fs::{self};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use rusqlite::{Connection, OpenFlags};

use crate::committed::Committed;
use crate::error::{Error, Result};
use crate::fsutil::with_suffix;
use crate::guard::{self, Guard, Role};
use crate::value::{Rows, Statement, Value};
use crate::vfs;

/// Page size of every raftsql database.
pub const PAGE_SIZE: u32 = 4096;

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
    /// Threads waiting in `enter` for the gate to open (what tests await).
    waiting: usize,
}

impl Gate {
    /// Waits until the gate is open and registers a reader pinning its snapshot.
    pub fn enter(&self) {
        let mut g = self.state.lock();
        if g.closed {
            g.waiting += 1;
            while g.closed {
                self.cv.wait(&mut g);
            }
            g.waiting -= 1;
        }
        g.pinning += 1;
    }
    /// How many threads wait for the gate to open.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.state.lock().waiting
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
    pub(super) fn close(&self) {
        let mut g = self.state.lock();
        g.closed = true;
        while g.pinning > 0 {
            self.cv.wait(&mut g);
        }
    }
    /// Reopens the gate.
    pub(super) fn open(&self) {
        let mut g = self.state.lock();
        g.closed = false;
        self.cv.notify_all();
    }
}

/// A read transaction held open by [`DbHandle::pin`]; ended, and its connection given back
/// to the pool, when dropped.
pub(super) struct Pinned {
    handle: Arc<DbHandle>,
    conn: Option<(Connection, Guard)>,
}

impl Pinned {
    /// The connection, its read transaction still open, for the caller to end (a snapshot
    /// build reads from it on a thread of its own).
    pub(super) fn into_connection(mut self) -> Connection {
        self.conn
            .take()
            .expect("a pin holds its connection until dropped")
            .0
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some((conn, guard)) = self.conn.take() {
            let _ = exec_cached(&conn, "COMMIT");
            if conn.is_autocommit() {
                self.handle.pool.lock().push((conn, guard));
            }
        }
    }
}

/// The read side of one database, shared by every thread that queries it.
pub struct DbHandle {
    /// Database name.
    pub name: String,
    /// Path of the database file.
    pub path: PathBuf,
    pub(super) key: String,
    pub(super) gate: Gate,
    pool: Mutex<Vec<(Connection, Guard)>>,
}

impl DbHandle {
    pub(super) fn new(name: &str, path: PathBuf) -> Self {
        let key = path.to_string_lossy().into_owned();
        DbHandle {
            name: name.to_string(),
            path,
            key,
            gate: Gate::default(),
            pool: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn reader(&self) -> Result<(Connection, Guard)> {
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
        c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let g = Guard::install(&mut c, Role::Reader)?;
        Ok((c, g))
    }

    /// A read transaction pinned at the committed state of this moment, for another thread
    /// to hold (a passive checkpoint's bound, passive_copy.rs; the state a snapshot is built
    /// from, install.rs). Called on the state machine thread between batches.
    pub(super) fn pin(self: &Arc<Self>) -> Result<Pinned> {
        let (conn, guard) = self.reader()?;
        self.begin_pinned(&conn)?;
        Ok(Pinned {
            handle: self.clone(),
            conn: Some((conn, guard)),
        })
    }

    /// Bytes in this database's WAL (held in memory, vfs.rs).
    pub fn wal_bytes(&self) -> u64 {
        vfs::wal_len(&self.key).unwrap_or(0)
    }

    /// Runs `f` inside a read transaction whose snapshot holds only committed entries.
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        self.read_guarded(|c, _| f(c))
    }

    /// Begins a read transaction on `conn` and pins its snapshot, through the gate (so
    /// never at a leader's speculative COMMIT).
    fn begin_pinned(&self, conn: &Connection) -> rusqlite::Result<()> {
        self.gate.enter();
        let pinned = exec_cached(conn, "BEGIN").and_then(|_| {
            conn.prepare_cached("PRAGMA schema_version")?
                .query_row([], |_| Ok(()))
        });
        self.gate.leave();
        pinned
    }

    fn read_guarded<T>(&self, f: impl FnOnce(&Connection, &Guard) -> Result<T>) -> Result<T> {
        let (conn, guard) = self.reader()?;
        let pinned = self.begin_pinned(&conn);
        let out = pinned.map_err(Error::from).and_then(|_| f(&conn, &guard));
        let _ = exec_cached(&conn, "COMMIT");
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
pub(super) fn query_rows(
    c: &Connection,
    g: &Guard,
    stmt: &Statement,
    max_bytes: usize,
) -> Result<Rows> {
    let mut st = c.prepare_cached(&guard::client_key(&stmt.sql))?;
    guard::check_statement(g, &st)?;
    let columns: Vec<String> = st.column_names().map(String::from).collect();
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

/// Removes the WAL (in memory, see vfs.rs) and the wal-index of database `db`: call it with
/// no connection to it open.
/// Runs a statement that returns no rows through `c`'s statement cache: SQLite parses it
/// once per connection, not on every call (transaction control runs several times per
/// write and per read).
pub(super) fn exec_cached(c: &Connection, sql: &str) -> rusqlite::Result<()> {
    c.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Statements each connection keeps prepared (rusqlite's default is 16, fewer than one
/// etcd write uses with the transaction control around it).
pub(super) const STATEMENT_CACHE: usize = 256;

pub(super) fn remove_wal_files(db: &Path) {
    vfs::forget(&db.to_string_lossy());
    for suffix in ["-wal", "-walspill", "-shm"] {
        let _ = fs::remove_file(with_suffix(db, suffix));
    }
}

/// A read-write connection through the raftsql VFS that never checkpoints on close: the
/// frames of an uncommitted batch must never reach the database file, so SQLite may not
/// checkpoint on its own. `create`: the file may be created.
pub(super) fn open_read_write(path: &Path, create: bool) -> Result<Connection> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let c = Connection::open_with_flags_and_vfs(path, flags, vfs::VFS_NAME)?;
    c.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    Ok(c)
}

pub(super) fn open_writer(path: &Path) -> Result<Connection> {
    let c = open_read_write(path, true)?;
    c.execute_batch(&format!(
        "PRAGMA page_size={PAGE_SIZE}; PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF; \
         PRAGMA wal_autocheckpoint=0; PRAGMA busy_timeout=0; PRAGMA cache_size=-16384;"
    ))?;
    c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Map the wal-index now, so its header can be read before the first write.
    c.query_row("PRAGMA schema_version", [], |_| Ok(()))?;
    Ok(c)
}

pub(super) fn in_transaction<T>(
    w: &Connection,
    f: impl FnOnce(&Connection) -> Result<T>,
) -> Result<T> {
    begin_immediate(w)?;
    let r = f(w);
    match &r {
        Ok(_) => exec_cached(w, "COMMIT")?,
        Err(_) => {
            let _ = w.execute_batch("ROLLBACK");
        }
    }
    reset_cache(w)?;
    r
}

/// How long an apply waits out another connection's lock before failing (which stops the
/// node).
const BUSY_WAIT: Duration = Duration::from_secs(10);
/// The first pause between tries, doubling up to [`BUSY_PAUSE_MAX`].
const BUSY_PAUSE_MIN: Duration = Duration::from_millis(1);
/// The longest pause between tries.
const BUSY_PAUSE_MAX: Duration = Duration::from_millis(50);

/// `BEGIN IMMEDIATE` on the writer, waiting out a transient SQLITE_BUSY (up to [`BUSY_WAIT`]).
///
/// The state machine is the only writer, so the lock can only be held for a moment by a
/// reader that is rebuilding the wal-index (after a restart, or after the rewind that
/// empties the WAL). The writer keeps `busy_timeout=0` so that checkpoints never wait for
/// readers; an apply, which must not fail (it would stop the node), retries here instead.
/// (Found by the long Jepsen profile: a node restarted during local reads stopped with
/// "database is locked".)
fn begin_immediate(w: &Connection) -> Result<()> {
    let deadline = Instant::now() + BUSY_WAIT;
    let mut pause = BUSY_PAUSE_MIN;
    loop {
        match exec_cached(w, "BEGIN IMMEDIATE") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(BUSY_PAUSE_MAX);
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
pub(super) fn reset_cache(w: &Connection) -> Result<()> {
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

/// Page 1's file change counter (offset 24) as committed; 0 for an empty database.
pub(super) fn page1_counter(w: &Connection) -> Result<u32> {
    Ok(read_page(w, 1)?.map_or(0, |d| change_counter(&d)))
}

/// The change counter page 1 holds (its bytes 24..28).
pub(super) fn change_counter(page1: &[u8]) -> u32 {
    u32::from_be_bytes(page1[24..28].try_into().unwrap())
}

/// Page `pgno` as the connection's current transaction (or a new read) sees it; `None` past
/// the end of the database.
pub(super) fn read_page(w: &Connection, pgno: u32) -> Result<Option<Vec<u8>>> {
    let mut st = w.prepare_cached("SELECT data FROM sqlite_dbpage WHERE pgno = ?1")?;
    let mut rows = st.query([pgno])?;
    Ok(match rows.next()? {
        Some(r) => Some(r.get(0)?),
        None => None,
    })
}

/// The committed image of page `pgno`: one the batch read (`recorded`, taken out), else the
/// one `committed` holds, else `None` past the committed size if it is known, else the page
/// read past SQLite (`vfs::read_committed_page`), else the page read on `w` (which must see
/// the committed state).
pub(super) fn committed_base(
    w: &Connection,
    recorded: Option<&mut HashMap<u32, Vec<u8>>>,
    committed: &Committed,
    committed_pages: Option<u32>,
    pgno: u32,
) -> Result<Option<Bytes>> {
    let mut held = match recorded.and_then(|r| r.remove(&pgno)) {
        Some(b) => Some(Bytes::from(b)),
        None => committed.get(pgno).cloned(),
    };
    if held.is_none() {
        match committed_pages {
            Some(n) if pgno > n => return Ok(None),
            // Within the committed size, straight from the WAL or the file (vfs.rs).
            Some(_) => held = vfs::read_committed_page(w, pgno, PAGE_SIZE).map(Bytes::from),
            None => {}
        }
    }
    match held {
        Some(b) => {
            // The test builds check every base not read through SQLite against SQLite's own.
            #[cfg(debug_assertions)]
            {
                let read = read_page(w, pgno)?;
                assert!(
                    read.as_deref() == Some(&b[..]),
                    "the held or directly read base of page {pgno} differs from the committed page"
                );
            }
            Ok(Some(b))
        }
        None => Ok(read_page(w, pgno)?.map(Bytes::from)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new database file `name` in a directory of its own, opened by its writer through
    /// the VFS (the directory lives as long as the returned guard).
    fn new_db(name: &str) -> (tempfile::TempDir, PathBuf, Connection) {
        vfs::register().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        let w = open_writer(&path).unwrap();
        (dir, path, w)
    }

    /// `vfs::read_committed_page` reads every page as SQLite does: from the file while the
    /// WAL has no frame (a new database; after a checkpoint), from the newest frame of it in
    /// the WAL, across wal-index regions (more than 4,062 frames), from the file once a
    /// checkpoint moved the page there and restarted the WAL; never a frame past the
    /// committed end (frames a rewound transaction left in the WAL, as a leader's capture
    /// leaves them).
    #[test]
    fn pages_read_past_sqlite_are_the_committed_pages() {
        let (_dir, path, w) = new_db("p.db");
        let key = path.to_string_lossy().into_owned();
        let check = |w: &Connection, what: &str| {
            let n: u32 = w.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
            for pgno in 1..=n {
                let direct = vfs::read_committed_page(w, pgno, PAGE_SIZE)
                    .unwrap_or_else(|| panic!("{what}: page {pgno} not readable past SQLite"));
                let sqlite = read_page(w, pgno).unwrap().unwrap();
                assert!(direct == sqlite, "{what}: page {pgno} differs");
            }
            n
        };
        // A new database: page 1 only, in the file, and a WAL with no frame yet.
        assert_eq!(check(&w, "a new database"), 1);
        w.execute_batch("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        // One row per transaction, each rewriting a leaf and the table's root: the same
        // pages in many frames, over two wal-index regions.
        for i in 0..5000 {
            w.execute("INSERT INTO t VALUES (?1, zeroblob(300))", [i])
                .unwrap();
        }
        let frames = vfs::read_header(&key).unwrap().max_frame;
        assert!(frames > 4062, "only {frames} frames: one wal-index region");
        let pages = check(&w, "two regions");
        // Frames past the committed end, as a leader's rewind leaves them.
        let saved = vfs::save_header(&key).unwrap();
        w.execute_batch("UPDATE t SET v = zeroblob(301) WHERE k < 100")
            .unwrap();
        assert!(vfs::restore_header(&key, &saved));
        reset_cache(&w).unwrap();
        check(&w, "after a rewind");
        // Into the file, the WAL restarted, some pages again in the new WAL.
        w.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        check(&w, "an empty WAL after a checkpoint");
        w.execute_batch("UPDATE t SET v = zeroblob(302) WHERE k = 7")
            .unwrap();
        assert!(check(&w, "after a checkpoint") >= pages);
    }

    /// The WAL is held in memory (vfs.rs): no `-wal` file reaches the disk, `wal_len`
    /// reports its bytes, a checkpoint empties it, and `remove_wal_files` (what a restart
    /// does) forgets the frames a checkpoint did not carry into the file.
    #[test]
    fn the_wal_is_held_in_memory_until_a_checkpoint_or_a_restart() {
        let (dir, path, w) = new_db("m.db");
        let key = path.to_string_lossy().into_owned();
        let wal_of = vfs::wal_len;
        w.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
        assert!(!dir.path().join("m.db-wal").exists(), "a WAL file on disk");
        assert!(wal_of(&key).unwrap() > 4096, "{:?}", wal_of(&key));
        w.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        assert_eq!(wal_of(&key), Some(0));
        w.execute_batch("INSERT INTO t VALUES (2)").unwrap();
        drop(w);
        remove_wal_files(&path);
        assert_eq!(wal_of(&key), None);
        let w = open_writer(&path).unwrap();
        let n: i64 = w
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1, "only the checkpointed row survives a restart");
    }

    /// A WAL longer than memory holds (a checkpoint held back while writes go on) spills to
    /// `<db>-walspill` and reads back whole, through SQLite; the checkpoint that empties the
    /// WAL deletes the spill file.
    #[test]
    fn a_wal_longer_than_memory_holds_spills_to_a_file_and_back() {
        let (dir, path, w) = new_db("s.db");
        let spill = dir.path().join("s.db-walspill");
        w.execute_batch(
            "CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB);
             WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < 18000)
             INSERT INTO t(v) SELECT zeroblob(4000) FROM s;",
        )
        .unwrap();
        let wal = vfs::wal_len(&path.to_string_lossy()).unwrap();
        assert!(wal > crate::memwal::MEM_BYTES as u64, "{wal}");
        assert!(spill.exists(), "no spill file for a {wal}-byte WAL");
        let (n, bytes): (i64, i64) = w
            .query_row("SELECT count(*), sum(length(v)) FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((n, bytes), (18000, 18000 * 4000));
        w.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        assert!(!spill.exists(), "the spill file outlived the checkpoint");
        let ok: String = w
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }

    /// I5: the writer's `BEGIN IMMEDIATE` (an apply's) waits out another connection's write
    /// lock instead of failing with SQLITE_BUSY (the writer keeps `busy_timeout=0`).
    #[test]
    fn begin_immediate_waits_out_a_held_lock() {
        let (_dir, path, w) = new_db("t.db");
        w.execute_batch("CREATE TABLE t(x)").unwrap();
        // Another connection of the node (through the VFS: the WAL is in its memory).
        let other = Connection::open_with_flags_and_vfs(&path, OpenFlags::default(), vfs::VFS_NAME)
            .unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        // Without waiting, the writer is refused at once.
        let e = w.execute_batch("BEGIN IMMEDIATE").unwrap_err();
        assert_eq!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy)
        );
        let (locked, release) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            release.recv().unwrap();
            other.execute_batch("COMMIT").unwrap();
        });
        let waiter = std::thread::spawn(move || {
            let r = begin_immediate(&w);
            (r, w)
        });
        // The lock is released while begin_immediate is retrying.
        std::thread::sleep(Duration::from_millis(100));
        locked.send(()).unwrap();
        holder.join().unwrap();
        let (r, w) = waiter.join().unwrap();
        r.unwrap();
        w.execute_batch("INSERT INTO t VALUES (1); COMMIT").unwrap();
    }
}
