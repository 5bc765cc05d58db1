//! The `raftsql` SQLite VFS: the unix VFS, with each WAL kept in memory and a window onto each
//! database's wal-index.
//!
//! Every raftsql database is opened through this VFS. The database file and the wal-index
//! `-shm` are the unix VFS's own, so the database lives on disk and SQLite keeps only its page
//! cache in memory. The **WAL lives in memory** (see below). What the wrapper adds is access to the **wal-index header**
//! (the first 96 bytes of shm region 0: two copies of SQLite's `WalIndexHdr`). The state
//! machine reads it to find the WAL frames a write transaction appended (frame range, page
//! size, database size, salts), and writes it to make those frames disappear again when the
//! transaction's Raft entry does not commit.
//!
//! # Invariants
//! - The WAL and the wal-index are never trusted across a process restart: the node deletes
//!   `-wal` and `-shm` before opening a database and rebuilds the WAL by replaying Raft entries
//!   after the last durable checkpoint (see `state.rs`). That is why the WAL is written with
//!   `synchronous=OFF`: the Raft log, not the WAL, is the durable record.
//! - Only the state machine's writer connection writes the WAL; the header is only rewritten
//!   by this module while the state machine holds the read gate closed, so no reader can
//!   start a snapshot from a header that is being rewritten.
//!
//! The header layout used here is SQLite's documented wal-index format
//! (<https://www.sqlite.org/walformat.html>): native-endian u32 fields, `szPage` u16 at 14,
//! `mxFrame` at 16, `nPage` at 20, salts at 32..40. After the header (136 bytes with the
//! checkpoint info) each 32 KiB region starts with the page number of each of its frames
//! (4,062 in region 0, 4,096 in the others), which [`take_reads`] uses.
//!
//! # The WAL in memory
//! A WAL file (`SQLITE_OPEN_WAL`) is a buffer in this process ([`MemWal`], one per WAL path,
//! shared by every connection that opens it), not a file: SQLite's frame writes and reads,
//! the capture of a batch's frames and a checkpoint's copy are memory copies instead of two
//! system calls per frame. Nothing durable is lost: the Raft log is the durable record and
//! the node never trusted a WAL across a restart (above). It holds at most what the
//! checkpoint threshold lets accumulate (`--checkpoint-frames`, 16 MiB by default), plus one
//! batch; past 64 MiB (a checkpoint held back by a long read) the rest goes to a spill file
//! (memwal.rs), so memory stays bounded. `xAccess` and `xDelete` answer for it; [`forget`]
//! drops it when the node removes a database's WAL, as it removed the file before. Its size
//! is [`wal_len`].
//!
//! # Recording reads
//! While the state machine runs a leader batch it records, on its own thread, every page
//! image the writer reads of the committed state ([`record_reads`], [`take_reads`]): the
//! writer's cache is purged before each batch, so every existing page the batch changes was
//! read once, and that first read is the base the batch's entry is diffed against (entry.rs).
//! Only reads of committed frames (at most the header's `mxFrame`) are kept, never frames a
//! cache spill of the batch itself wrote.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString, OsString};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use crate::memwal::MemWal;
use rusqlite::ffi;

/// Name under which the VFS is registered with SQLite.
pub const VFS_NAME: &str = "raftsql";

/// Bytes of the two wal-index header copies at the start of shm region 0.
pub const WAL_INDEX_HDR_BYTES: usize = 96;

/// Addresses of the mapped regions of the wal-index of each open database (index = region),
/// keyed by the database path SQLite opened. Stored as `usize` so the map is `Send`.
static SHM_REGIONS: OnceLock<Mutex<HashMap<String, Vec<usize>>>> = OnceLock::new();
/// Writes and truncations of any WAL file through this VFS, ever (see [`wal_writes`]).
static WAL_WRITES: AtomicU64 = AtomicU64::new(0);
static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
/// The unix VFS we delegate to.
static mut UNIX_VFS: *mut ffi::sqlite3_vfs = std::ptr::null_mut();
static IO_METHODS: OnceLock<ffi::sqlite3_io_methods> = OnceLock::new();
/// The in-memory WALs, by WAL path (as SQLite names the file: the database's path + `-wal`).
static MEM_WALS: OnceLock<Mutex<HashMap<Vec<u8>, Arc<MemWal>>>> = OnceLock::new();

fn mem_wals() -> &'static Mutex<HashMap<Vec<u8>, Arc<MemWal>>> {
    MEM_WALS.get_or_init(|| Mutex::new(HashMap::new()))
}

thread_local! {
    /// Set when a write on this thread was refused by a WAL's limit ([`take_limit_hit`]).
    static LIMIT_HIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Crash-test hook ([`abort_after_writes`]): the database-file writes this thread may
    /// still make, and the failpoint's name.
    static WRITES_BEFORE_ABORT: std::cell::Cell<Option<(u32, &'static str)>> =
        const { std::cell::Cell::new(None) };
}

/// Crash-test hook: from now on this thread may make `n` more writes to database files (not
/// WALs); the next one aborts the process, printing `failpoint NAME reached` as the other
/// failpoints do. `None` lifts it. Lets a crash test stop SQLite in the middle of a copy.
pub(crate) fn abort_after_writes(limit: Option<(u32, &'static str)>) {
    WRITES_BEFORE_ABORT.with(|c| c.set(limit));
}

fn shm_regions() -> &'static Mutex<HashMap<String, Vec<usize>>> {
    SHM_REGIONS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Our file object: SQLite's base struct first (so SQLite can use it as a `sqlite3_file`),
/// then the unix VFS's file object, allocated in the same block right after ours.
#[repr(C)]
struct File {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    /// Path of a main database file (used as the key of its wal-index), else null.
    main_db_path: *mut c_char,
    /// For a WAL file, the path of its database, else null.
    wal_db_path: *mut c_char,
    /// For a WAL file, its buffer (from `Arc::into_raw`, released on close); else null.
    mem: *const MemWal,
}

/// Page reads being recorded on this thread.
struct Recorder {
    db: CString,
    page_size: usize,
    /// First image read of each page from the database file.
    file_pages: HashMap<u32, Vec<u8>>,
    /// First image read of each WAL frame.
    frames: HashMap<u32, Vec<u8>>,
}

thread_local! {
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

/// Starts recording, on this thread, the page images read of database `db_path`.
pub fn record_reads(db_path: &str, page_size: u32) {
    let Ok(db) = CString::new(db_path) else {
        return;
    };
    RECORDER.with(|r| {
        *r.borrow_mut() = Some(Recorder {
            db,
            page_size: page_size as usize,
            file_pages: HashMap::new(),
            frames: HashMap::new(),
        })
    });
}

/// Stops recording and returns the committed page images read since [`record_reads`]:
/// frames after `max_frame` (written by this transaction) are dropped, the others mapped to
/// their page through the wal-index. Call it while the transaction is still open (before
/// COMMIT may restart the WAL and reuse frame numbers). A page seen twice with different
/// bytes is left out.
pub fn take_reads(db_path: &str, max_frame: u32) -> HashMap<u32, Vec<u8>> {
    let Some(rec) = RECORDER.with(|r| r.borrow_mut().take()) else {
        return HashMap::new();
    };
    if rec.db.as_bytes() != db_path.as_bytes() {
        return HashMap::new();
    }
    let regions = shm_regions()
        .lock()
        .get(db_path)
        .cloned()
        .unwrap_or_default();
    let mut out = rec.file_pages;
    let mut conflicts = Vec::new();
    for (frame, data) in rec.frames {
        if frame == 0 || frame > max_frame {
            continue;
        }
        let Some(pgno) = frame_pgno(&regions, frame) else {
            continue;
        };
        match out.get(&pgno) {
            Some(d) if *d != data => conflicts.push(pgno),
            Some(_) => {}
            None => {
                out.insert(pgno, data);
            }
        }
    }
    for p in conflicts {
        out.remove(&p);
    }
    out
}

/// Stops recording on this thread, dropping what was recorded.
pub fn stop_recording() {
    RECORDER.with(|r| r.borrow_mut().take());
}

/// Frames per wal-index region, and in region 0 (whose first 136 bytes are the header).
const FRAMES_PER_REGION: u32 = 4096;
const FRAMES_IN_REGION_0: u32 = FRAMES_PER_REGION - (WAL_INDEX_HEADER_AREA / 4) as u32;
/// The two header copies and the checkpoint info at the start of region 0.
const WAL_INDEX_HEADER_AREA: usize = 136;

/// The wal-index region that indexes WAL frame `frame` (1-based; SQLite's `walFramePage`).
fn region_of(frame: u32) -> usize {
    ((frame + FRAMES_PER_REGION - FRAMES_IN_REGION_0 - 1) / FRAMES_PER_REGION) as usize
}

/// Region `k`'s page-number array (mapped at `base`) and the frame number before its first
/// entry (SQLite's `walHashGet`: `aPgno`, `iZero`).
fn region_pgnos(base: *const u32, k: usize) -> (*const u32, u32) {
    if k == 0 {
        // SAFETY: inside the mapped 32 KiB region (the header area is 136 bytes).
        (unsafe { base.add(WAL_INDEX_HEADER_AREA / 4) }, 0)
    } else {
        (
            base,
            FRAMES_IN_REGION_0 + (k as u32 - 1) * FRAMES_PER_REGION,
        )
    }
}

/// Bytes of a WAL frame's header, before its page image.
pub const FRAME_HEADER: u64 = 24;

/// The byte offset in a WAL of frame `frame` (1-based): the WAL's 32-byte header, then
/// frames of a [`FRAME_HEADER`] and a page each.
pub fn frame_start(frame: u32, page_size: u32) -> u64 {
    32 + (frame as u64 - 1) * (FRAME_HEADER + page_size as u64)
}

/// The page number of WAL frame `frame` (1-based), from the wal-index (SQLite's
/// `walFramePgno`).
fn frame_pgno(regions: &[usize], frame: u32) -> Option<u32> {
    let k = region_of(frame);
    let (pgnos, zero) = region_pgnos(*regions.get(k).filter(|p| **p != 0)? as *const u32, k);
    // SAFETY: a mapped region is 32 KiB and stays mapped while a connection to the database
    // is open (the caller's writer is); the index is below the region's 4,096 frames. The
    // writer's transaction is open, so no other connection appends frames.
    let pgno = unsafe { std::ptr::read_volatile(pgnos.add((frame - zero - 1) as usize)) };
    (pgno != 0).then_some(pgno)
}

/// Slots of a wal-index region's hash table (u16 each, after its 4,096 page numbers), and
/// SQLite's hash multiplier (`walHash`).
const HASH_SLOTS: usize = 8192;
const HASH_MULTIPLIER: u64 = 383;

/// The newest frame at or below `last` that holds page `pgno`, found through the wal-index's
/// hash tables as SQLite's `walFindFrame` finds it: `Some(None)` if no such frame, `None` if
/// the index cannot tell (a region not mapped, a hash chain longer than its table).
fn find_frame(regions: &[usize], pgno: u32, last: u32) -> Option<Option<u32>> {
    if last == 0 {
        return Some(None);
    }
    for k in (0..=region_of(last)).rev() {
        let base = *regions.get(k).filter(|p| **p != 0)? as *const u32;
        let (pgnos, zero) = region_pgnos(base, k);
        // SAFETY: the hash table is the region's second 16 KiB, after 4,096 u32s.
        let hash = unsafe { base.add(FRAMES_PER_REGION as usize) } as *const u16;
        let mut slot = (pgno as u64 * HASH_MULTIPLIER) as usize & (HASH_SLOTS - 1);
        let mut found = None;
        let mut ended = false;
        for _ in 0..HASH_SLOTS {
            // SAFETY: `slot` < 8,192 u16s, inside the region; the caller is the database's
            // only writer (see `read_committed_page`), so nothing rewrites the index meanwhile.
            let h = unsafe { std::ptr::read_volatile(hash.add(slot)) } as u32;
            if h == 0 {
                ended = true;
                break;
            }
            let frame = zero + h;
            // SAFETY: a slot holds a 1-based index into the region's page numbers
            // (at most 4,096, so inside the region).
            let p = unsafe { std::ptr::read_volatile(pgnos.add(h as usize - 1)) };
            if frame <= last && p == pgno {
                found = found.max(Some(frame));
            }
            slot = (slot + 1) & (HASH_SLOTS - 1);
        }
        if !ended {
            return None;
        }
        if found.is_some() {
            return Some(found);
        }
    }
    Some(None)
}

/// The committed image of page `pgno` of the database `w` has open as `main`, read straight
/// from the WAL (the newest frame of the page at or below the wal-index header's last frame)
/// or else from the database file, past SQLite's pager: the bytes `SELECT data FROM
/// sqlite_dbpage WHERE pgno = ?` gives on a connection that sees the committed state, for a
/// page within the committed size (zeros where the file ends first, as SQLite reads them).
/// It costs one copy, against a statement, a page-cache fill and three copies through
/// SQLite (a follower's apply spent a fifth of its time reading its bases that way).
/// `None` if it cannot tell (`w` is not on this VFS, the wal-index header is not valid, a
/// region is not mapped): ask SQLite then.
///
/// Call it only on the database's one writing thread (the state machine's), and not inside
/// a transaction that has written: the header and the frames at or below it must stay as
/// they are while it reads, and the committed state is what the header says.
///
/// `page_size` is the database's: a wal-index header has none until the WAL's first frame
/// (a new database, or a checkpoint that emptied the WAL), and `None` if the header's differs.
pub fn read_committed_page(w: &rusqlite::Connection, pgno: u32, page_size: u32) -> Option<Vec<u8>> {
    let mut fp: *mut ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: a valid open connection; FILE_POINTER writes the main file's pointer into `fp`.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            w.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_FILE_POINTER,
            &mut fp as *mut *mut ffi::sqlite3_file as *mut c_void,
        )
    };
    let ours = IO_METHODS.get()? as *const ffi::sqlite3_io_methods;
    // SAFETY: a non-null file pointer SQLite handed out is an open file of `w`.
    if rc != ffi::SQLITE_OK || fp.is_null() || unsafe { (*fp).pMethods } != ours {
        return None;
    }
    let f = fp as *mut File;
    // SAFETY: a file with our main-file methods is our `File` (`x_open`); its path and its
    // unix file live until the connection closes it, and `w` is open.
    let (path, real) = unsafe { ((*f).main_db_path, (*f).real) };
    if path.is_null() || real.is_null() {
        return None;
    }
    // SAFETY: as above: a NUL-terminated path owned by the open file.
    let key = unsafe { CStr::from_ptr(path) }.to_str().ok()?;
    let regions = shm_regions().lock().get(key).cloned()?;
    let hdr = header_at(*regions.first().filter(|p| **p != 0)? as *const u8)?;
    if hdr.page_size != 0 && hdr.page_size != page_size {
        return None;
    }
    let size = page_size as usize;
    let mut page = vec![0u8; size];
    if let Some(frame) = find_frame(&regions, pgno, hdr.max_frame)? {
        return read_wal(key, frame_start(frame, page_size) + FRAME_HEADER, &mut page)
            .then_some(page);
    }
    // SAFETY: `real` is the open unix file under ours; its xRead fills `page` (zeros past
    // the end of the file, with SQLITE_IOERR_SHORT_READ, as SQLite's pager takes them).
    let rc = unsafe {
        let read = (*(*real).pMethods).xRead?;
        read(
            real,
            page.as_mut_ptr() as *mut c_void,
            size as c_int,
            (pgno as i64 - 1) * size as i64,
        )
    };
    (rc == ffi::SQLITE_OK || rc == ffi::SQLITE_IOERR_SHORT_READ).then_some(page)
}

/// Records a completed read of `file` if this thread records reads of its database.
///
/// # Safety
/// `file` is one of our files and `buf` holds `n` bytes just read at `off`.
unsafe fn record(file: *mut ffi::sqlite3_file, buf: *const c_void, n: c_int, off: i64) {
    RECORDER.with(|r| {
        let mut r = r.borrow_mut();
        let Some(rec) = r.as_mut() else {
            return;
        };
        let size = rec.page_size;
        if n as usize != size || off < 0 {
            return;
        }
        let f = file as *mut File;
        let matches = |p: *mut c_char| !p.is_null() && CStr::from_ptr(p) == rec.db.as_c_str();
        let off = off as u64;
        let data = || std::slice::from_raw_parts(buf as *const u8, size).to_vec();
        if matches((*f).main_db_path) {
            if off.is_multiple_of(size as u64) {
                let pgno = (off / size as u64 + 1) as u32;
                rec.file_pages.entry(pgno).or_insert_with(data);
            }
        } else if matches((*f).wal_db_path) {
            // A frame's page image: 32-byte WAL header, then frames of 24 + size bytes.
            let frame = 24 + size as u64;
            if off >= 56 && (off - 56).is_multiple_of(frame) {
                let n = ((off - 56) / frame + 1) as u32;
                rec.frames.entry(n).or_insert_with(data);
            }
        }
    });
}

/// Registers the `raftsql` VFS with SQLite (idempotent). It is not made the default VFS.
pub fn register() -> Result<(), String> {
    REGISTERED
        // SAFETY: called once (OnceLock), before any connection uses the VFS.
        .get_or_init(|| unsafe { register_inner() })
        .clone()
}

/// Builds the VFS from the unix VFS (its methods, with `xOpen` ours) and registers it.
///
/// # Safety
/// Called once (see [`register`]), before any connection uses the VFS: it writes
/// `UNIX_VFS`, which the callbacks read afterwards.
unsafe fn register_inner() -> Result<(), String> {
    let unix = ffi::sqlite3_vfs_find(c"unix".as_ptr());
    if unix.is_null() {
        return Err("SQLite has no unix VFS".into());
    }
    UNIX_VFS = unix;
    let mut vfs: ffi::sqlite3_vfs = *unix;
    vfs.szOsFile = (std::mem::size_of::<File>() as c_int) + (*unix).szOsFile;
    vfs.zName = CString::new(VFS_NAME).unwrap().into_raw();
    vfs.pNext = std::ptr::null_mut();
    vfs.xOpen = Some(x_open);
    vfs.xDelete = Some(x_delete);
    vfs.xAccess = Some(x_access);
    let vfs = Box::into_raw(Box::new(vfs));
    let rc = ffi::sqlite3_vfs_register(vfs, 0);
    if rc != ffi::SQLITE_OK {
        return Err(format!("sqlite3_vfs_register failed: {rc}"));
    }
    Ok(())
}

/// SQLite's `xOpen`: opens the file with the unix VFS inside our [`File`], which remembers
/// the database (and WAL) paths the other callbacks need.
///
/// # Safety
/// Called by SQLite with `file` pointing at `szOsFile` bytes for us to initialize, and
/// `name` null or a filename SQLite owns, per SQLite's VFS contract.
unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let f = file as *mut File;
    let real = (file as *mut u8).add(std::mem::size_of::<File>()) as *mut ffi::sqlite3_file;
    (*f).real = real;
    (*f).main_db_path = std::ptr::null_mut();
    (*f).wal_db_path = std::ptr::null_mut();
    (*f).mem = std::ptr::null();
    (*f).base.pMethods = std::ptr::null();
    (*real).pMethods = std::ptr::null();
    if flags & ffi::SQLITE_OPEN_WAL != 0 && !name.is_null() {
        return open_mem_wal(f, CStr::from_ptr(name), flags, out_flags);
    }
    let rc = ((*UNIX_VFS).xOpen.unwrap())(UNIX_VFS, name, real, flags, out_flags);
    if rc != ffi::SQLITE_OK || (*real).pMethods.is_null() {
        return rc;
    }
    if flags & ffi::SQLITE_OPEN_MAIN_DB != 0 && !name.is_null() {
        (*f).main_db_path = CString::from(CStr::from_ptr(name)).into_raw();
    }
    let methods = IO_METHODS.get_or_init(|| io_methods((*(*real).pMethods).iVersion));
    (*f).base.pMethods = methods as *const _;
    rc
}

/// Opens WAL `name` as its in-memory buffer (created empty on first open).
///
/// # Safety
/// `f` is the file object `x_open` is initializing; `out_flags` is null or writable.
unsafe fn open_mem_wal(f: *mut File, name: &CStr, flags: c_int, out_flags: *mut c_int) -> c_int {
    let wal = mem_wal(name.to_bytes());
    (*f).mem = Arc::into_raw(wal);
    if let Some(db) = name.to_bytes().strip_suffix(b"-wal") {
        if let Ok(db) = CString::new(db) {
            (*f).wal_db_path = db.into_raw();
        }
    }
    if !out_flags.is_null() {
        *out_flags = flags;
    }
    (*f).base.pMethods = MEM_IO_METHODS.get_or_init(mem_io_methods) as *const _;
    ffi::SQLITE_OK
}

fn io_methods(version: c_int) -> ffi::sqlite3_io_methods {
    ffi::sqlite3_io_methods {
        // Version 2 keeps the shm methods and drops xFetch/xUnfetch (no memory-mapped I/O).
        iVersion: version.min(2),
        xClose: Some(x_close),
        xRead: Some(x_read),
        xWrite: Some(x_write),
        xTruncate: Some(x_truncate),
        xSync: Some(x_sync),
        xFileSize: Some(x_file_size),
        xLock: Some(x_lock),
        xUnlock: Some(x_unlock),
        xCheckReservedLock: Some(x_check_reserved_lock),
        xFileControl: Some(x_file_control),
        xSectorSize: Some(x_sector_size),
        xDeviceCharacteristics: Some(x_device_characteristics),
        xShmMap: Some(x_shm_map),
        xShmLock: Some(x_shm_lock),
        xShmBarrier: Some(x_shm_barrier),
        xShmUnmap: Some(x_shm_unmap),
        xFetch: None,
        xUnfetch: None,
    }
}

/// The unix VFS's file inside ours, and its methods.
///
/// # Safety
/// `file` is a file this VFS's `x_open` initialized; the returned methods live as long
/// as the unix VFS (the whole process).
unsafe fn real(
    file: *mut ffi::sqlite3_file,
) -> (*mut ffi::sqlite3_file, &'static ffi::sqlite3_io_methods) {
    let real = (*(file as *mut File)).real;
    (real, &*(*real).pMethods)
}

/// SQLite's `xClose` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    let f = file as *mut File;
    let (r, m) = real(file);
    let rc = m.xClose.unwrap()(r);
    free_paths(f);
    rc
}

/// Frees the paths `x_open` or [`open_mem_wal`] stored in `f`.
///
/// # Safety
/// `f` is one of our files, being closed; its paths came from `CString::into_raw`.
unsafe fn free_paths(f: *mut File) {
    for p in [&mut (*f).main_db_path, &mut (*f).wal_db_path] {
        if !p.is_null() {
            drop(CString::from_raw(*p));
            *p = std::ptr::null_mut();
        }
    }
}
/// SQLite's `xRead` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    n: c_int,
    off: i64,
) -> c_int {
    let (r, m) = real(file);
    let rc = m.xRead.unwrap()(r, buf, n, off);
    if rc == ffi::SQLITE_OK {
        record(file, buf, n, off);
    }
    rc
}
/// SQLite's `xWrite` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    n: c_int,
    off: i64,
) -> c_int {
    count_wal_write(file);
    if let Some((left, name)) = WRITES_BEFORE_ABORT.with(|c| c.get()) {
        if left == 0 {
            eprintln!("raftsql: failpoint {name} reached: aborting");
            std::process::abort();
        }
        WRITES_BEFORE_ABORT.with(|c| c.set(Some((left - 1, name))));
    }
    let (r, m) = real(file);
    m.xWrite.unwrap()(r, buf, n, off)
}
/// SQLite's `xTruncate` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    count_wal_write(file);
    let (r, m) = real(file);
    m.xTruncate.unwrap()(r, size)
}
/// Counts a write to a WAL file (before it is made, so that no reader of the count can miss
/// one that has begun).
///
/// # Safety
/// `file` is a file this VFS's `x_open` initialized.
unsafe fn count_wal_write(file: *mut ffi::sqlite3_file) {
    // SAFETY: SQLite passes back the file object x_open initialized as our File.
    if !(*(file as *mut File)).wal_db_path.is_null() {
        WAL_WRITES.fetch_add(1, Ordering::SeqCst);
    }
}
/// SQLite's `xSync` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    let (r, m) = real(file);
    m.xSync.unwrap()(r, flags)
}
/// SQLite's `xFileSize` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_file_size(file: *mut ffi::sqlite3_file, out: *mut i64) -> c_int {
    let (r, m) = real(file);
    m.xFileSize.unwrap()(r, out)
}
/// SQLite's `xLock` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_lock(file: *mut ffi::sqlite3_file, lock: c_int) -> c_int {
    let (r, m) = real(file);
    m.xLock.unwrap()(r, lock)
}
/// SQLite's `xUnlock` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_unlock(file: *mut ffi::sqlite3_file, lock: c_int) -> c_int {
    let (r, m) = real(file);
    m.xUnlock.unwrap()(r, lock)
}
/// SQLite's `xCheckReservedLock` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    let (r, m) = real(file);
    m.xCheckReservedLock.unwrap()(r, out)
}
/// SQLite's `xFileControl` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    let (r, m) = real(file);
    if op == ffi::SQLITE_FCNTL_VFSNAME {
        // Report our name (SQLite frees the string with sqlite3_free).
        let s = ffi::sqlite3_mprintf(c"%s".as_ptr(), c"raftsql".as_ptr());
        *(arg as *mut *mut c_char) = s;
        return ffi::SQLITE_OK;
    }
    m.xFileControl.unwrap()(r, op, arg)
}
/// SQLite's `xSectorSize` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    let (r, m) = real(file);
    m.xSectorSize.unwrap()(r)
}
/// SQLite's `xDeviceCharacteristics` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    let (r, m) = real(file);
    m.xDeviceCharacteristics.unwrap()(r)
}
/// SQLite's `xShmMap` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_shm_map(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    let f = file as *mut File;
    let (r, m) = real(file);
    let rc = m.xShmMap.unwrap()(r, region, size, extend, out);
    if rc == ffi::SQLITE_OK && region >= 0 && !(*out).is_null() && !(*f).main_db_path.is_null() {
        let path = CStr::from_ptr((*f).main_db_path)
            .to_string_lossy()
            .into_owned();
        let mut map = shm_regions().lock();
        let regions = map.entry(path).or_default();
        let k = region as usize;
        if regions.len() <= k {
            regions.resize(k + 1, 0);
        }
        regions[k] = *out as usize;
    }
    rc
}
/// SQLite's `xShmLock` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_shm_lock(
    file: *mut ffi::sqlite3_file,
    off: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    let (r, m) = real(file);
    let pinned = HEADER_PIN
        .try_with(|p| p.borrow().is_some())
        .unwrap_or(false);
    if !pinned {
        return m.xShmLock.unwrap()(r, off, n, flags);
    }
    // A checkpoint running under `with_header_pin`: the pin is let go before the first
    // lock of a read slot, or the checkpoint lock's release (SQLite has read its header by
    // then; a torn header is read again under the write lock first, pin held), ...
    if off >= WAL_READ_LOCK0 || (off == WAL_CKPT_LOCK && flags & ffi::SQLITE_SHM_UNLOCK != 0) {
        HEADER_PIN.with(|p| {
            if let Some(pin) = p.borrow_mut().as_mut() {
                if pin.held {
                    pin.held = false;
                    (pin.hook)(false);
                }
            }
        });
    }
    let rc = m.xShmLock.unwrap()(r, off, n, flags);
    // ... and taken as soon as the checkpoint lock is, before SQLite reads the header.
    if rc == ffi::SQLITE_OK
        && off == WAL_CKPT_LOCK
        && n == 1
        && flags == ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_EXCLUSIVE
    {
        HEADER_PIN.with(|p| {
            if let Some(pin) = p.borrow_mut().as_mut() {
                if !pin.used {
                    pin.used = true;
                    pin.held = true;
                    (pin.hook)(true);
                }
            }
        });
    }
    rc
}

/// SQLite's wal-index lock slots (walformat.html): the checkpointer's (`WAL_CKPT_LOCK`) and
/// the first read slot (`WAL_READ_LOCK(0)`; the read slots follow it).
const WAL_CKPT_LOCK: c_int = 1;
const WAL_READ_LOCK0: c_int = 3;

/// The hook of [`with_header_pin`] on this thread.
struct HeaderPin {
    /// Called with `true` to take the pin, `false` to let it go.
    hook: Box<dyn FnMut(bool)>,
    /// Taken and not yet let go.
    held: bool,
    /// Taken once already (it is taken once per call).
    used: bool,
}

thread_local! {
    static HEADER_PIN: RefCell<Option<HeaderPin>> = const { RefCell::new(None) };
}

/// Runs `f`, a checkpoint on a connection of this thread, with `hook(true)` called right
/// after SQLite takes the checkpoint lock and `hook(false)` right before it locks a read
/// slot or releases the checkpoint lock.
///
/// In between, SQLite reads the wal-index header that bounds the checkpoint (its `mxPage`
/// and its end; `sqlite3WalCheckpoint` reads the header, then locks read marks and read
/// slot 0 before it copies a frame; a torn header it reads again under the write lock).
/// A hook that enters a database's read gate thus makes the checkpoint work from a header
/// that holds only committed frames, never a leader's speculative COMMIT (the gate is
/// closed from COMMIT to the rewind), without holding the gate for the whole copy, which
/// would stop the state machine's next COMMIT.
pub fn with_header_pin<R>(hook: impl FnMut(bool) + 'static, f: impl FnOnce() -> R) -> R {
    /// Lets a pin still held go and removes the hook, even if `f` panics (a pin never let
    /// go would keep the gate's next close waiting forever).
    struct Unpin;
    impl Drop for Unpin {
        fn drop(&mut self) {
            if let Ok(Some(mut pin)) = HEADER_PIN.try_with(|p| p.borrow_mut().take()) {
                if pin.held {
                    (pin.hook)(false);
                }
            }
        }
    }
    HEADER_PIN.with(|p| {
        *p.borrow_mut() = Some(HeaderPin {
            hook: Box::new(hook),
            held: false,
            used: false,
        })
    });
    let _unpin = Unpin;
    f()
}
/// SQLite's `xShmBarrier` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_shm_barrier(file: *mut ffi::sqlite3_file) {
    let (r, m) = real(file);
    m.xShmBarrier.unwrap()(r)
}
/// SQLite's `xShmUnmap` for this VFS's files: the unix VFS's, plus what this VFS records.
///
/// # Safety
/// Called by SQLite with a file this VFS's `x_open` initialized (a [`File`] around the
/// unix VFS's file) and arguments valid by SQLite's VFS contract.
unsafe extern "C" fn x_shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    let (r, m) = real(file);
    m.xShmUnmap.unwrap()(r, delete)
}

static MEM_IO_METHODS: OnceLock<ffi::sqlite3_io_methods> = OnceLock::new();

/// The methods of an in-memory WAL: version 1 (a WAL has no shm and no mapping).
fn mem_io_methods() -> ffi::sqlite3_io_methods {
    ffi::sqlite3_io_methods {
        iVersion: 1,
        xClose: Some(mem_close),
        xRead: Some(mem_read),
        xWrite: Some(mem_write),
        xTruncate: Some(mem_truncate),
        xSync: Some(mem_sync),
        xFileSize: Some(mem_file_size),
        xLock: Some(mem_lock),
        xUnlock: Some(mem_lock),
        xCheckReservedLock: Some(mem_check_reserved_lock),
        xFileControl: Some(mem_file_control),
        xSectorSize: Some(mem_sector_size),
        xDeviceCharacteristics: Some(mem_device_characteristics),
        xShmMap: None,
        xShmLock: None,
        xShmBarrier: None,
        xShmUnmap: None,
        xFetch: None,
        xUnfetch: None,
    }
}

/// The buffer of an in-memory WAL file.
///
/// # Safety
/// `file` was opened by [`open_mem_wal`] and is not closed yet.
unsafe fn mem<'a>(file: *mut ffi::sqlite3_file) -> &'a MemWal {
    &*(*(file as *mut File)).mem
}

/// `xClose` of an in-memory WAL: releases this handle's share of the buffer (the buffer
/// stays for the next connection until [`forget`] or `xDelete`).
///
/// # Safety
/// Called by SQLite, once, with a file [`open_mem_wal`] opened.
unsafe extern "C" fn mem_close(file: *mut ffi::sqlite3_file) -> c_int {
    let f = file as *mut File;
    if !(*f).mem.is_null() {
        drop(Arc::from_raw((*f).mem));
        (*f).mem = std::ptr::null();
    }
    free_paths(f);
    ffi::SQLITE_OK
}

/// `xRead` of an in-memory WAL: past the end, zeros and `SQLITE_IOERR_SHORT_READ`, as a
/// file answers.
///
/// # Safety
/// Called by SQLite with a file [`open_mem_wal`] opened and `buf` writable for `n` bytes.
unsafe extern "C" fn mem_read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    n: c_int,
    off: i64,
) -> c_int {
    let (n, off) = (n.max(0) as usize, off.max(0) as usize);
    let out = std::slice::from_raw_parts_mut(buf as *mut u8, n);
    let got = match mem(file).data.read().read_at(off, out) {
        Ok(got) => got,
        Err(e) => {
            tracing::error!("reading a WAL: {e}");
            return ffi::SQLITE_IOERR_READ;
        }
    };
    if got < n {
        out[got..].fill(0);
        return ffi::SQLITE_IOERR_SHORT_READ;
    }
    record(file, buf, n as c_int, off as i64);
    ffi::SQLITE_OK
}

/// `xWrite` of an in-memory WAL (a write past the end zero-fills the gap, as a file does).
///
/// # Safety
/// Called by SQLite with a file [`open_mem_wal`] opened and `buf` readable for `n` bytes.
unsafe extern "C" fn mem_write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    n: c_int,
    off: i64,
) -> c_int {
    count_wal_write(file);
    let (n, off) = (n.max(0) as usize, off.max(0) as usize);
    let src = std::slice::from_raw_parts(buf as *const u8, n);
    let wal = mem(file);
    if off + n > wal.limit.load(Ordering::Relaxed) {
        LIMIT_HIT.with(|h| h.set(true));
        return ffi::SQLITE_FULL;
    }
    match wal.data.write().write_at(off, src) {
        Ok(()) => ffi::SQLITE_OK,
        Err(e) => {
            tracing::error!("writing a WAL: {e}");
            ffi::SQLITE_IOERR_WRITE
        }
    }
}

/// `xTruncate` of an in-memory WAL.
///
/// # Safety
/// Called by SQLite with a file [`open_mem_wal`] opened.
unsafe extern "C" fn mem_truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    count_wal_write(file);
    match mem(file).data.write().set_len(size.max(0) as usize) {
        Ok(()) => ffi::SQLITE_OK,
        Err(e) => {
            tracing::error!("truncating a WAL: {e}");
            ffi::SQLITE_IOERR_TRUNCATE
        }
    }
}

/// `xSync` of an in-memory WAL: nothing to do (the Raft log is the durable record).
///
/// # Safety
/// Called by SQLite; touches nothing.
unsafe extern "C" fn mem_sync(_file: *mut ffi::sqlite3_file, _flags: c_int) -> c_int {
    ffi::SQLITE_OK
}

/// `xFileSize` of an in-memory WAL.
///
/// # Safety
/// Called by SQLite with a file [`open_mem_wal`] opened and `out` writable.
unsafe extern "C" fn mem_file_size(file: *mut ffi::sqlite3_file, out: *mut i64) -> c_int {
    *out = mem(file).data.read().len() as i64;
    ffi::SQLITE_OK
}

/// `xLock`/`xUnlock` of an in-memory WAL: SQLite never locks a WAL file (its locks are in
/// the wal-index), so there is nothing to hold.
///
/// # Safety
/// Called by SQLite; touches nothing.
unsafe extern "C" fn mem_lock(_file: *mut ffi::sqlite3_file, _lock: c_int) -> c_int {
    ffi::SQLITE_OK
}

/// `xCheckReservedLock` of an in-memory WAL: never reserved.
///
/// # Safety
/// Called by SQLite with `out` writable.
unsafe extern "C" fn mem_check_reserved_lock(
    _file: *mut ffi::sqlite3_file,
    out: *mut c_int,
) -> c_int {
    *out = 0;
    ffi::SQLITE_OK
}

/// `xFileControl` of an in-memory WAL: our VFS name; nothing else is known.
///
/// # Safety
/// Called by SQLite with `arg` as the op defines it.
unsafe extern "C" fn mem_file_control(
    _file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    if op == ffi::SQLITE_FCNTL_VFSNAME {
        *(arg as *mut *mut c_char) = ffi::sqlite3_mprintf(c"%s".as_ptr(), c"raftsql".as_ptr());
        return ffi::SQLITE_OK;
    }
    ffi::SQLITE_NOTFOUND
}

/// `xSectorSize` of an in-memory WAL (SQLite's default).
///
/// # Safety
/// Called by SQLite; touches nothing.
unsafe extern "C" fn mem_sector_size(_file: *mut ffi::sqlite3_file) -> c_int {
    4096
}

/// `xDeviceCharacteristics` of an in-memory WAL: what the unix VFS reports for a file.
///
/// # Safety
/// Called by SQLite; touches nothing.
unsafe extern "C" fn mem_device_characteristics(_file: *mut ffi::sqlite3_file) -> c_int {
    ffi::SQLITE_IOCAP_POWERSAFE_OVERWRITE
}

/// True for the name of a WAL file.
fn is_wal_name(path: &CStr) -> bool {
    path.to_bytes().ends_with(b"-wal")
}

/// The VFS's `xDelete`: a WAL is forgotten (and any file of that name left by an older
/// version removed); other files are the unix VFS's.
///
/// # Safety
/// Called by SQLite with a valid path, per SQLite's VFS contract.
unsafe extern "C" fn x_delete(
    _vfs: *mut ffi::sqlite3_vfs,
    path: *const c_char,
    sync_dir: c_int,
) -> c_int {
    let rc = ((*UNIX_VFS).xDelete.unwrap())(UNIX_VFS, path, sync_dir);
    if !path.is_null() && is_wal_name(CStr::from_ptr(path)) {
        forget_wal(CStr::from_ptr(path).to_bytes());
        return ffi::SQLITE_OK;
    }
    rc
}

/// The VFS's `xAccess`: a WAL exists when its buffer holds bytes (a file exists for SQLite
/// when it is not empty); other files are the unix VFS's.
///
/// # Safety
/// Called by SQLite with a valid path and `out` writable, per SQLite's VFS contract.
unsafe extern "C" fn x_access(
    _vfs: *mut ffi::sqlite3_vfs,
    path: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    if !path.is_null() && is_wal_name(CStr::from_ptr(path)) {
        let map = mem_wals().lock();
        let len = map
            .get(CStr::from_ptr(path).to_bytes())
            .map_or(0, |w| w.data.read().len());
        *out = (len > 0) as c_int;
        return ffi::SQLITE_OK;
    }
    ((*UNIX_VFS).xAccess.unwrap())(UNIX_VFS, path, flags, out)
}

fn wal_key(db_path: &str) -> Vec<u8> {
    let mut k = db_path.as_bytes().to_vec();
    k.extend_from_slice(b"-wal");
    k
}

/// Copies `buf.len()` bytes of `db_path`'s WAL from offset `off`; false if the WAL is
/// shorter (or there is none).
pub fn read_wal(db_path: &str, off: u64, buf: &mut [u8]) -> bool {
    let Some(wal) = wal_of(db_path) else {
        return false;
    };
    let n = buf.len();
    let got = wal.data.read().read_at(off as usize, buf);
    matches!(got, Ok(got) if got == n)
}

/// Empties `db_path`'s WAL (counted as a WAL write, see [`wal_writes`]).
pub fn truncate_wal(db_path: &str) {
    WAL_WRITES.fetch_add(1, Ordering::SeqCst);
    if let Some(wal) = wal_of(db_path) {
        if let Err(e) = wal.data.write().set_len(0) {
            tracing::warn!("emptying the WAL of {db_path}: {e}");
        }
    }
}

/// Bounds the WAL of `db_path` to its committed frames (as the wal-index header counts
/// them) plus `growth` bytes (`None`: lifts the bound). A leader transaction runs under it,
/// so that one whose pages could never fit in an entry is refused while it writes instead
/// of growing the WAL (this process's memory) by its whole size. The bound counts from the
/// committed end, not from the buffer's length: a refused transaction leaves its frames
/// past that end until the next checkpoint, and the next one must not stack on them.
/// Writes past the bound fail with `SQLITE_FULL` and mark this thread ([`take_limit_hit`];
/// setting a bound clears the mark, lifting it does not). Applies never run under a bound.
pub fn limit_wal_growth(db_path: &str, growth: Option<usize>) {
    let wal = mem_wal(&wal_key(db_path));
    // The end of the last committed frame: where the frame after it would start.
    let committed_end = || match read_header(db_path) {
        Some(h) => frame_start(h.max_frame + 1, h.page_size) as usize,
        None => wal.data.read().len(),
    };
    let limit = growth.map_or(usize::MAX, |g| committed_end().saturating_add(g));
    wal.limit.store(limit, Ordering::Relaxed);
    if growth.is_some() {
        LIMIT_HIT.with(|h| h.set(false));
    }
}

/// Whether a WAL write on this thread was refused by [`limit_wal_growth`]'s bound since the
/// last call (the mark is cleared).
pub fn take_limit_hit() -> bool {
    LIMIT_HIT.with(|h| h.replace(false))
}

/// The WAL named `key` (the WAL file's path), created empty if there is none.
fn mem_wal(key: &[u8]) -> Arc<MemWal> {
    mem_wals()
        .lock()
        .entry(key.to_vec())
        .or_insert_with(|| {
            let mut spill = key.to_vec();
            spill.extend_from_slice(b"spill");
            Arc::new(MemWal::new(PathBuf::from(OsString::from_vec(spill))))
        })
        .clone()
}

/// Forgets the WAL named `key`, deleting its spill file if it has one.
fn forget_wal(key: &[u8]) {
    if let Some(wal) = mem_wals().lock().remove(key) {
        wal.data.write().remove_spill();
    }
}

/// The WAL of database `db_path`, if it has one.
fn wal_of(db_path: &str) -> Option<Arc<MemWal>> {
    mem_wals().lock().get(&wal_key(db_path)).cloned()
}

/// The size in bytes of database `db_path`'s WAL (`None`: it has none).
pub fn wal_len(db_path: &str) -> Option<u64> {
    wal_of(db_path).map(|w| w.data.read().len() as u64)
}

/// Forgets what this VFS holds of database `db_path`: its wal-index mapping and its WAL, as
/// deleting the WAL file did (the next connection finds none; counted as a WAL write, see
/// [`wal_writes`]). Call it with no connection to the database open.
pub fn forget(db_path: &str) {
    shm_regions().lock().remove(db_path);
    WAL_WRITES.fetch_add(1, Ordering::SeqCst);
    forget_wal(&wal_key(db_path));
}

/// The fields of a wal-index header this crate uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalHeader {
    /// Database page size in bytes.
    pub page_size: u32,
    /// Number of valid frames in the WAL (the last commit frame).
    pub max_frame: u32,
    /// Size of the database in pages after the last commit.
    pub n_page: u32,
    /// The WAL's salts; they change when the WAL is restarted from its beginning.
    pub salt: [u32; 2],
}

/// A raw copy of both wal-index header copies, to be put back by [`restore_header`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SavedHeader(pub [u8; WAL_INDEX_HDR_BYTES]);

fn region0(db_path: &str) -> Option<*mut u8> {
    shm_regions()
        .lock()
        .get(db_path)
        .and_then(|r| r.first().copied())
        .filter(|p| *p != 0)
        .map(|p| p as *mut u8)
}

/// Reads the wal-index header of `db_path`, if its wal-index is mapped.
///
/// Call it only while the caller's connection holds a transaction or the read gate is closed,
/// so that the header is not being rewritten concurrently (SQLite writes copy 2 then copy 1;
/// we read copy 1 and check it equals copy 2).
pub fn read_header(db_path: &str) -> Option<WalHeader> {
    header_at(region0(db_path)?)
}

/// The wal-index header in region 0 mapped at `p` (see [`read_header`]).
fn header_at(p: *const u8) -> Option<WalHeader> {
    let saved = header_copy(p);
    let h = &saved.0;
    if h[..48] != h[48..96] || h[12] == 0 {
        return None;
    }
    let u32_at = |o: usize| u32::from_ne_bytes(h[o..o + 4].try_into().unwrap());
    let sz = u16::from_ne_bytes([h[14], h[15]]) as u32;
    Some(WalHeader {
        page_size: if sz == 1 { 65536 } else { sz },
        max_frame: u32_at(16),
        n_page: u32_at(20),
        salt: [u32_at(32), u32_at(36)],
    })
}

/// Copies both header copies of `db_path`'s wal-index.
pub fn save_header(db_path: &str) -> Option<SavedHeader> {
    Some(header_copy(region0(db_path)?))
}

/// Both header copies of the wal-index whose region 0 is mapped at `p`.
fn header_copy(p: *const u8) -> SavedHeader {
    let mut out = [0u8; WAL_INDEX_HDR_BYTES];
    // SAFETY: region 0 is at least 32 KiB and stays mapped while any connection is open.
    unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), WAL_INDEX_HDR_BYTES) };
    SavedHeader(out)
}

/// Puts back a header saved by [`save_header`], the way SQLite writes it: the second copy,
/// a barrier, then the first copy (readers compare both).
pub fn restore_header(db_path: &str, saved: &SavedHeader) -> bool {
    let Some(p) = region0(db_path) else {
        return false;
    };
    // SAFETY: region 0 is at least 32 KiB and stays mapped while any connection is open;
    // the 96 bytes written are the two header copies, as SQLite writes them.
    unsafe {
        std::ptr::copy_nonoverlapping(saved.0.as_ptr().add(48), p.add(48), 48);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        std::ptr::copy_nonoverlapping(saved.0.as_ptr(), p, 48);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
    true
}

/// How many times any WAL file has been written or truncated through this VFS. Equal counts
/// at two moments mean no WAL changed in between: frames past a rewound header are still
/// the ones that were there.
pub fn wal_writes() -> u64 {
    WAL_WRITES.load(Ordering::SeqCst)
}

/// Marks the wal-index header invalid, so the next connection to read rebuilds the index
/// from the WAL file (SQLite's recovery).
pub fn invalidate_header(db_path: &str) -> bool {
    let Some(p) = region0(db_path) else {
        return false;
    };
    // SAFETY: as in restore_header; zeroed header copies make SQLite rebuild the index.
    unsafe {
        std::ptr::write_bytes(p, 0, WAL_INDEX_HDR_BYTES);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
    true
}
