//! Leader batches: group commit of queued writes in one SQLite transaction (a savepoint per
//! request), the speculative COMMIT, the capture and rewind of its frames, the diff against
//! the committed pages, and the proposal (steps 2-4 of the data path in ARCHITECTURE.md).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::Connection;

use super::db::{
    change_counter, committed_base, exec_cached, page1_counter, reset_cache, PAGE_SIZE,
};
use super::msg::{Fail, SmToRaft, Waiter, Work, WriteFn, WriteReq};
use super::{Db, InFlight, Kept, StateMachine};
use crate::committed::Committed;
use crate::entry::{Frames, Page, PageChange};
use crate::error::{Error, Result};
use crate::guard::{self, Guard};
use crate::value::{ExecResult, Statement};
use crate::vfs;

/// Most requests group-committed into one batch.
const MAX_BATCH: usize = 512;

/// The most page bytes one write batch may change: its entry must fit in one transport
/// frame ([`crate::MAX_FRAME`], 64 MiB) with room for the message around it.
pub const MAX_ENTRY_PAGE_BYTES: usize = 48 << 20;

/// How far a leader transaction may grow its WAL (vfs.rs keeps it in memory): every page an
/// entry may carry, with its frame header, and a spare MiB. A transaction writing more is
/// refused as it writes ([`wal_full_is_too_large`]).
const MAX_TX_WAL_GROWTH: usize = MAX_ENTRY_PAGE_BYTES + MAX_ENTRY_PAGE_BYTES / 64 + (1 << 20);

/// The error of a write that failed because the transaction outgrew [`MAX_TX_WAL_GROWTH`]
/// (SQLite saw `SQLITE_FULL`), else `e`.
pub(super) fn wal_full_is_too_large(e: Error) -> Error {
    if vfs::take_limit_hit() {
        Error::Invalid(format!(
            "the transaction changed more than the {} MiB of pages one replicated entry may \
             carry: split it into smaller transactions",
            MAX_ENTRY_PAGE_BYTES >> 20
        ))
    } else {
        e
    }
}

/// Puts a leader transaction on `key` under [`MAX_TX_WAL_GROWTH`] (or lifts it: `false`).
pub(super) fn limit_tx_growth(key: &str, on: bool) {
    vfs::limit_wal_growth(key, on.then_some(MAX_TX_WAL_GROWTH));
}

impl StateMachine {
    /// Ready to execute a leader batch (I4).
    pub(super) fn can_write(&self) -> bool {
        self.is_leader
            && self.applied_term == self.term
            && self.in_flight.is_none()
            && self.open_tx.is_none()
    }

    pub(super) fn expire(&mut self) {
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

    pub(super) fn maybe_start_batch(&mut self) {
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
        limit_tx_growth(&db.handle.key, true);
        let executed = execute_batch(&db.writer, &db.guard, budget, batch);
        if !matches!(executed, Executed::Open(_)) {
            vfs::stop_recording();
            limit_tx_growth(&db.handle.key, false);
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
    pub(super) fn commit_and_propose(&mut self, db_name: &str, waiters: Vec<Waiter>) -> Result<()> {
        let me = self.me;
        self.seq += 1;
        let seq = self.seq;
        let db = self.dbs.get_mut(db_name).unwrap();
        let key = db.handle.key.clone();
        let fail = |waiters: Vec<Waiter>, e: Error| {
            tracing::error!("write batch on {db_name} failed: {e}");
            for w in waiters {
                w(Err(e.clone()));
            }
        };
        let (Some(saved), Some(before)) = (vfs::save_header(&key), vfs::read_header(&key)) else {
            vfs::stop_recording();
            limit_tx_growth(&key, false);
            let _ = db.writer.execute_batch("ROLLBACK");
            fail(
                waiters,
                Error::Internal(format!("the wal-index of {key} is not readable")),
            );
            return Ok(());
        };
        let bases = vfs::take_reads(&key, before.max_frame);
        db.handle.gate.close();
        let committed = exec_cached(&db.writer, "COMMIT");
        limit_tx_growth(&key, false);
        if let Err(e) = committed {
            let _ = db.writer.execute_batch("ROLLBACK");
            db.handle.gate.open();
            fail(waiters, wal_full_is_too_large(e.into()));
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
                self.raft.send(SmToRaft::Confirm {
                    base,
                    done: Box::new(move |r: Result<()>| {
                        for w in waiters {
                            w(r.as_ref().map(|_| ()).map_err(Error::clone));
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
        // Each page travels as the bytes that differ from the committed page (I3:
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
        self.raft.send(SmToRaft::Propose {
            data: frames.encode(),
            seq,
            base,
        });
        Ok(())
    }

    /// Fails the callers of the in-flight batch. Its frames were rewound at capture, so
    /// nothing is visible; if its entry commits anyway, it is applied like any other.
    pub(super) fn abort_in_flight(&mut self, why: Error) {
        let Some(f) = self.in_flight.take() else {
            return;
        };
        tracing::warn!(
            "write batch {} on {} not known to be committed: {why}",
            f.seq,
            f.db
        );
        for w in f.waiters {
            w(Err(why.clone()));
        }
    }
}

/// Runs `f` inside a SAVEPOINT on `w`, rolling back to it if `f` fails.
fn in_savepoint(w: &Connection, f: Box<dyn WriteFn>) -> std::result::Result<Waiter, (Error, Fail)> {
    if let Err(e) = exec_cached(w, guard::INTERNAL_SAVEPOINT_SQL) {
        return Err((e.into(), Box::new(move |e| f.fail(e))));
    }
    match f.run(w) {
        Ok(waiter) => match end_savepoint(w, Ok(())) {
            Ok(()) => Ok(waiter),
            Err(e) => Err((e, Box::new(move |e| waiter(Err(e))))),
        },
        Err((e, fail)) => match end_savepoint(w, Err::<(), _>(e)) {
            Err(e) => Err((e, fail)),
            Ok(()) => unreachable!("end_savepoint keeps an error"),
        },
    }
}

#[cfg(test)]
thread_local! {
    /// Test hook: the next RELEASE of a request's savepoint on this thread fails.
    pub(super) static FAIL_NEXT_RELEASE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// RELEASE of a request's savepoint.
fn release(w: &Connection) -> Result<()> {
    #[cfg(test)]
    if FAIL_NEXT_RELEASE.with(|f| f.take()) {
        return Err(Error::Internal("RELEASE refused (test hook)".into()));
    }
    exec_cached(w, guard::INTERNAL_RELEASE_SQL)?;
    Ok(())
}

/// Releases the request's savepoint, first rolling back to it if `r` failed.
///
/// A request that ends with an error must leave none of its changes in the batch (they would
/// commit with it while its caller hears of a failure). So if the savepoint cannot be
/// released, the request's changes are rolled back and it fails; and if SQLite will not roll
/// back to the savepoint either, the whole batch transaction is rolled back, which the
/// caller sees as SQLite ending it (autocommit, see [`execute_batch`]).
fn end_savepoint<T>(w: &Connection, r: Result<T>) -> Result<T> {
    if w.is_autocommit() {
        // SQLite ended the whole transaction; the caller sees it (see [`execute_batch`]).
        return r;
    }
    let failed = match r {
        Ok(t) => match release(w) {
            Ok(()) => return Ok(t),
            Err(e) => e,
        },
        Err(e) => e,
    };
    let undone = w
        .execute_batch(&format!(
            "ROLLBACK TO {sp}; RELEASE {sp}",
            sp = guard::INTERNAL_SAVEPOINT
        ))
        .map_err(Error::from);
    if let Err(e) = undone {
        tracing::warn!(
            "could not roll back a failed request's savepoint ({e}): rolling back its batch"
        );
        let _ = w.execute_batch("ROLLBACK");
    }
    Err(failed)
}

/// What [`execute_batch`] left on the writer.
pub(super) enum Executed {
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
pub(super) fn execute_batch(
    w: &Connection,
    g: &Guard,
    budget: Duration,
    batch: Vec<WriteReq>,
) -> Executed {
    let (mut sql, funcs): (Vec<WriteReq>, Vec<WriteReq>) =
        batch.into_iter().partition(WriteReq::is_sql);
    let begin =
        || reset_cache(w).and_then(|_| exec_cached(w, "BEGIN IMMEDIATE").map_err(Error::from));
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
            let r = run_request(w, g, stmts, budget).map_err(wal_full_is_too_large);
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
        let Work::Func(f) = req.work else {
            unreachable!("partitioned")
        };
        let r = in_savepoint(w, f).map_err(|(e, fail)| (wal_full_is_too_large(e), fail));
        if w.is_autocommit() {
            let (e, fail): (Option<Error>, Fail) = match r {
                Ok(waiter) => (None, Box::new(move |e| waiter(Err(e)))),
                Err((e, fail)) => (Some(e), fail),
            };
            fail(ended_transaction(e));
            for p in pending {
                p(Err(Error::Unavailable(
                    "another write in the same batch made SQLite roll the batch back; retry".into(),
                )));
            }
            return Executed::Requeue(sql.into_iter().chain(funcs).collect());
        }
        match r {
            Ok(waiter) => pending.push(waiter),
            Err((e, fail)) => fail(e),
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

/// Runs client SQL `f` on the writer `w` as [`Guard::client`] does, with DEFENSIVE on (I14):
/// an apply leaves it off (apply.rs), so every client statement on the writer starts here,
/// turning it on (a no-op when it is on; only a change expires the connection's statements).
pub(super) fn client_on_writer<T>(
    w: &Connection,
    g: &Guard,
    budget: Duration,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    guard::set_defensive(w, true)?;
    g.client(budget, f)
}

/// The error of a request that made SQLite end the batch transaction.
fn ended_transaction(e: Option<Error>) -> Error {
    let why = e.map_or_else(|| "SQLite ended it".to_string(), |e| e.to_string());
    Error::Invalid(format!(
        "the request rolled back the whole transaction ({why}); nothing of it was kept"
    ))
}

/// Runs one request's client statements inside a SAVEPOINT, guarded by `g` with a time
/// budget of `budget`; on error rolls back to the savepoint.
fn run_request(
    w: &Connection,
    g: &Guard,
    stmts: &[Statement],
    budget: Duration,
) -> Result<Vec<ExecResult>> {
    exec_cached(w, guard::INTERNAL_SAVEPOINT_SQL)?;
    let r = client_on_writer(w, g, budget, || {
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

/// Page 1 with its change counter and "version valid for" set to `counter` and the SQLite
/// version number set, as SQLite's pager writes them when it commits page 1 in WAL mode.
pub(super) fn stamp_change_counter(page: &Bytes, counter: u32) -> Bytes {
    let mut p = page.to_vec();
    p[24..28].copy_from_slice(&counter.to_be_bytes());
    p[92..96].copy_from_slice(&counter.to_be_bytes());
    p[96..100].copy_from_slice(&(rusqlite::ffi::SQLITE_VERSION_NUMBER as u32).to_be_bytes());
    Bytes::from(p)
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
        vfs::truncate_wal(key);
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
fn read_frames(db: &Db, first: u32, last: u32, page_size: u32) -> Result<Vec<Page>> {
    let header = vfs::FRAME_HEADER as usize;
    let frame = header + page_size as usize;
    let mut pages: BTreeMap<u32, Bytes> = BTreeMap::new();
    let mut buf = Vec::new();
    let mut next = first;
    while next <= last {
        let n = (last + 1 - next).min(READ_CHUNK_FRAMES);
        buf.resize(n as usize * frame, 0);
        if !vfs::read_wal(&db.handle.key, vfs::frame_start(next, page_size), &mut buf) {
            return Err(Error::Internal(format!(
                "the WAL of {} ends before frame {} of the commit it holds",
                db.handle.key,
                next + n - 1
            )));
        }
        for f in buf.chunks_exact(frame) {
            let pgno = u32::from_be_bytes(f[..4].try_into().unwrap());
            pages.insert(pgno, Bytes::copy_from_slice(&f[header..]));
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
