//! Applying committed entries: the leader publishes its own frames when they are exactly the
//! entry, every other case rebuilds each page on its committed image, checks its crc32 and
//! writes it through `sqlite_dbpage` (step 5 of the data path in ARCHITECTURE.md).

use std::time::Instant;

use bytes::Bytes;
use raft::eraftpb::{Entry, EntryType};
use rusqlite::Connection;

use super::db::{committed_base, in_transaction, read_page, PAGE_SIZE};
use super::{Kept, StateMachine};
use crate::committed::Committed;
use crate::entry::{Change, Frames, Page};
use crate::error::{Error, Result};
use crate::guard::{self};
use crate::vfs;

impl StateMachine {
    pub(super) fn apply_entry(&mut self, e: Entry) -> Result<()> {
        let index = e.index;
        if index <= self.applied() {
            return Ok(());
        }
        if e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty() {
            let frames = Frames::decode(e.data.clone())
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

    /// Writes an entry's page images through SQLite (I3).
    fn apply_frames(&mut self, f: &Frames, images: Option<&[Page]>) -> Result<()> {
        if f.page_size != PAGE_SIZE {
            return Err(Error::Corrupt(format!(
                "entry for {} has page size {}",
                f.db, f.page_size
            )));
        }
        self.frames_since_checkpoint += f.pages.len() as u64;
        let db = self.db(&f.db)?;
        // An apply is never bounded (a leader transaction's bound is lifted when it ends).
        super::batch::limit_tx_growth(&db.handle.key, false);
        apply_pages(&db.writer, f, images, &mut db.committed)
    }
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
    // The one place that writes sqlite_dbpage: DEFENSIVE must be off. It stays off after:
    // the writer runs client SQL only after turning it on again (`batch::run_request`, an
    // interactive transaction's statement). Toggling it expires every statement the
    // connection has prepared, so a follower that turned it back on after each apply
    // re-prepared its statements on every entry (4% of a follower under 64 etcd clients).
    guard::set_defensive(w, false)?;
    write_pages(w, f, images, committed)
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
        let old_pages: u32 = w
            .prepare_cached("PRAGMA page_count")?
            .query_row([], |r| r.get(0))?;
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
