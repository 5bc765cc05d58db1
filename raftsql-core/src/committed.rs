//! The committed pages a node last applied, kept in memory as the bases of page changes.
//!
//! An entry carries each page as the bytes that differ from the committed page (entry.rs).
//! The leader diffs against that page and every node applies the change to it, so both need
//! the committed image of every page an entry touches. Reading it back through SQLite costs a
//! `sqlite_dbpage` lookup and a `pread` per page (a third of a follower's apply), and on the
//! leader it would start a read on the writer between the rewind and the apply, which drops
//! the writer's page cache. The pages of the last entries are what the next ones touch (the
//! b-tree's inner pages, the tail of the revision table, hot keys' leaves), so this cache of
//! applied images answers most lookups.
//!
//! Invariant: every image held for page `p` is byte-equal to page `p` of the committed
//! database. It holds because the cache is filled only where the committed state changes
//! (each applied entry, with the pages it wrote) and lives in the `Db` it describes, which is
//! dropped whenever its file changes in any other way (snapshot install, reopen). Test builds
//! check every image they use against SQLite's page (state.rs, `committed_base`), so the
//! cluster and Jepsen suites check it on every apply; a wrong base is also caught by the
//! crc32 of the page the change must produce.

use std::collections::HashMap;

use bytes::Bytes;

/// At most this many pages are held per database (8 MiB at 4 KiB pages).
const MAX_PAGES: usize = 2048;

/// Images of committed pages by page number.
#[derive(Default)]
pub(crate) struct Committed {
    pages: HashMap<u32, Bytes>,
    /// The database's size after the last applied entry (pages past it are never held).
    db_pages: u32,
}

impl Committed {
    /// The committed image of page `pgno`, if held.
    pub(crate) fn get(&self, pgno: u32) -> Option<&Bytes> {
        self.pages.get(&pgno)
    }

    /// Records the pages an applied entry wrote; `db_pages` is the database's size after it
    /// (pages past it no longer exist).
    pub(crate) fn applied(&mut self, pages: impl IntoIterator<Item = (u32, Bytes)>, db_pages: u32) {
        if db_pages < self.db_pages {
            self.pages.retain(|p, _| *p <= db_pages);
        }
        self.db_pages = db_pages;
        for (pgno, data) in pages {
            self.pages.insert(pgno, data);
        }
        if self.pages.len() > MAX_PAGES {
            // Drop an arbitrary quarter: which ones does not matter for correctness, and the
            // pages of the next entries come back with them.
            let mut drop = self.pages.len() - MAX_PAGES * 3 / 4;
            self.pages.retain(|_, _| {
                if drop > 0 {
                    drop -= 1;
                    false
                } else {
                    true
                }
            });
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.pages.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_past_the_end_are_forgotten_and_the_size_is_bounded() {
        let mut c = Committed::default();
        c.applied((1..=10).map(|p| (p, Bytes::from(vec![p as u8; 8]))), 10);
        assert_eq!(c.get(7).map(|b| b[0]), Some(7));
        c.applied([(2, Bytes::from(vec![9u8; 8]))], 5);
        assert_eq!(c.get(2).map(|b| b[0]), Some(9));
        assert!(c.get(7).is_none(), "page 7 is past the new end");
        assert_eq!(c.len(), 5);
        let n = MAX_PAGES as u32 + 100;
        c.applied((1..=n).map(|p| (p, Bytes::new())), n);
        assert!(c.len() <= MAX_PAGES, "{} pages held", c.len());
    }
}
