//! The payload of a raftsql Raft log entry: one committed SQLite write transaction.
//!
//! ```text
//! offset size
//! 0      2    magic "RQ"
//! 2      1    format version (2; version 1 is still read)
//! 3      1    kind: 1 = Frames
//! 4      4    crc32 (little endian) of every byte from offset 8 to the end
//! 8      ..   body
//!
//! Frames body (integers little endian):
//!   proposer u64, sequence u64     who proposed it (answers the caller when it applies)
//!   db name: u16 length + UTF-8    which database
//!   page_size u32                  bytes per page
//!   db_pages u32                   database size in pages after the transaction
//!   count u32, then count times one page change:
//!     version 2: pgno u32, crc32 u32 of the page as it must be after the change, then
//!                kind u8 0 = image: page_size bytes
//!                kind u8 1 = ranges: n u16, then n times offset u16 + length u16 + bytes
//!     version 1: pgno u32 + image (page_size bytes)
//! ```
//!
//! A range change lists the bytes that differ from the page *as the entry's base state holds
//! it* (the state after the previous entry; a page past the end of the database is all
//! zeros). The leader sends ranges when they are smaller than the image: a put into a b-tree
//! leaf changes a few hundred of its 4,096 bytes, so entries shrink about tenfold.
//!
//! Invariants:
//! - page numbers are unique within an entry, non-zero and sorted; an image is exactly
//!   `page_size` bytes; `page_size` is a power of two in 512..=65536;
//! - ranges are non-empty, sorted, do not overlap or touch, and end within the page;
//! - applying a change to its base yields a page whose crc32 is the stored one: every node
//!   checks it on every page it applies ([`PageChange::apply_to`]), so a replica whose pages
//!   drifted from the leader's stops with an error instead of diverging silently;
//! - replaying ranges is idempotent over mixed states (the recovery after a kill -9 during a
//!   checkpoint relies on it): if each byte of a page holds its value of *some* state between
//!   the base of entry `k` and entry `n`, writing the ranges of entries `k..=n` in order leaves
//!   exactly the page of entry `n`. A byte that no range covers never changed in between, and
//!   a covered byte ends with the value of the last range covering it
//!   (`replaying_ranges_over_mixed_versions_gives_the_last` checks it).
//!
//! Decoding checks all of the format's invariants and the checksum, so a damaged entry is
//! rejected, never applied.

use bytes::{Buf, BufMut, Bytes, BytesMut};

const MAGIC: &[u8; 2] = b"RQ";
const VERSION: u8 = 2;
const VERSION_1: u8 = 1;
const KIND_FRAMES: u8 = 1;
const HEADER: usize = 8;
const CHANGE_IMAGE: u8 = 0;
const CHANGE_RANGES: u8 = 1;
/// Bytes a range costs besides its data (offset u16 + length u16).
const RANGE_OVERHEAD: usize = 4;

/// Why an entry could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    /// Too short, bad magic, or a length that runs past the end.
    #[error("malformed entry: {0}")]
    Malformed(&'static str),
    /// Written by a newer raftsql.
    #[error("unsupported entry version {0}")]
    Version(u8),
    /// Unknown kind byte.
    #[error("unknown entry kind {0}")]
    Kind(u8),
    /// The checksum does not match: the bytes were damaged.
    #[error("entry checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Checksum stored in the entry.
        stored: u32,
        /// Checksum of the bytes as read.
        computed: u32,
    },
}

/// A page came out of [`PageChange::apply_to`] other than the leader's: this replica's base
/// page differs from the leader's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "page {pgno} came out with crc32 {got:#010x} where the leader's was {want:#010x}: this \
     replica's pages differ from the leader's"
)]
pub struct PageMismatch {
    /// The page.
    pub pgno: u32,
    /// The crc32 the entry carries.
    pub want: u32,
    /// The crc32 of the page as applied here.
    pub got: u32,
}

/// One whole page image (as captured from the leader's WAL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// 1-based page number.
    pub pgno: u32,
    /// The page image, `page_size` bytes.
    pub data: Bytes,
}

/// Bytes `offset..offset + data.len()` of a page take `data`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    /// First byte within the page.
    pub offset: u16,
    /// The new bytes (at least one).
    pub data: Bytes,
}

/// How an entry changes one page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The whole page.
    Image(Bytes),
    /// Only the bytes that differ from the base page.
    Ranges(Vec<Range>),
}

/// One page an entry changes, with the crc32 the page must have afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageChange {
    /// 1-based page number.
    pub pgno: u32,
    /// crc32 of the whole page once changed.
    pub crc: u32,
    /// The change.
    pub change: Change,
}

impl PageChange {
    /// The change that turns `base` (`None`: the page is past the end of the database, all
    /// zeros) into `page`: its differing bytes, or the image if that is smaller.
    pub fn diff(page: &Page, base: Option<&[u8]>) -> PageChange {
        let new = &page.data[..];
        let crc = crc32fast::hash(new);
        let image = || PageChange {
            pgno: page.pgno,
            crc,
            change: Change::Image(page.data.clone()),
        };
        let zeros;
        let base = match base {
            Some(b) if b.len() == new.len() => b,
            Some(_) => return image(),
            None => {
                zeros = vec![0u8; new.len()];
                &zeros[..]
            }
        };
        if new.len() > usize::from(u16::MAX) + 1 {
            return image();
        }
        let mut ranges = Vec::new();
        let mut cost = 3; // kind + count
        for (start, end) in differing_runs(base, new) {
            cost += RANGE_OVERHEAD + (end - start);
            if cost > new.len() {
                return image();
            }
            ranges.push(Range {
                offset: start as u16,
                data: page.data.slice(start..end),
            });
        }
        PageChange {
            pgno: page.pgno,
            crc,
            change: Change::Ranges(ranges),
        }
    }

    /// Writes the change into `page` (the image, or each range at its offset).
    pub fn write_into(&self, page: &mut [u8]) {
        match &self.change {
            Change::Image(d) => page.copy_from_slice(d),
            Change::Ranges(rs) => {
                for r in rs {
                    let at = r.offset as usize;
                    page[at..at + r.data.len()].copy_from_slice(&r.data);
                }
            }
        }
    }

    /// The page this change makes of `base` (`None`: all zeros), checked against the crc32
    /// the leader computed.
    pub fn apply_to(&self, base: Option<&[u8]>, page_size: usize) -> Result<Vec<u8>, PageMismatch> {
        let mut page = match (&self.change, base) {
            (Change::Image(d), _) => d.to_vec(),
            (Change::Ranges(_), Some(b)) if b.len() == page_size => b.to_vec(),
            (Change::Ranges(_), _) => vec![0u8; page_size],
        };
        if let Change::Ranges(_) = self.change {
            self.write_into(&mut page);
        }
        let got = crc32fast::hash(&page);
        if got != self.crc {
            return Err(PageMismatch {
                pgno: self.pgno,
                want: self.crc,
                got,
            });
        }
        Ok(page)
    }

    /// Bytes this change takes in an encoded entry.
    fn encoded_len(&self) -> usize {
        9 + match &self.change {
            Change::Image(d) => d.len(),
            Change::Ranges(rs) => {
                2 + rs
                    .iter()
                    .map(|r| RANGE_OVERHEAD + r.data.len())
                    .sum::<usize>()
            }
        }
    }
}

/// The runs `start..end` where `a` and `b` differ, merged across equal gaps of at most
/// [`RANGE_OVERHEAD`] bytes (a separate range would cost more than the gap).
///
/// Eight bytes at a time: the leader diffs every page of every batch (a byte loop with a
/// slice comparison per word was 9% of its state machine under 64 etcd writers).
fn differing_runs(a: &[u8], b: &[u8]) -> Vec<(usize, usize)> {
    assert_eq!(
        a.len(),
        b.len(),
        "a page diffed against a base of another size"
    );
    let n = a.len();
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < n {
        i = next_run(a, b, i, false);
        if i == n {
            break;
        }
        let start = i;
        // Byte `start` differs: the run is at least that byte long.
        i = next_run(a, b, start + 1, true);
        match out.last_mut() {
            Some(last) if start - last.1 <= RANGE_OVERHEAD => last.1 = i,
            _ => out.push((start, i)),
        }
    }
    out
}

/// The first offset at or after `i` where `a` and `b` are equal (`differing`: we are in a
/// run of differing bytes) or differ (we are in an equal gap); `a.len()` if there is none.
fn next_run(a: &[u8], b: &[u8], mut i: usize, differing: bool) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let n = a.len();
    while i + 8 <= n {
        let word = |s: &[u8]| u64::from_le_bytes(s[i..i + 8].try_into().expect("8 bytes"));
        // A byte of x is zero where the pages are equal.
        let x = word(a) ^ word(b);
        // The lowest set high bit marks the first byte that ends the run: a nonzero byte
        // in a gap; in a run, a zero byte (the classic has-zero-byte test, exact for the
        // lowest zero byte: a borrow only reaches the bytes above it).
        let ends = if differing {
            x.wrapping_sub(ONES) & !x & HIGHS
        } else {
            x
        };
        if ends != 0 {
            return i + (ends.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && (a[i] != b[i]) == differing {
        i += 1;
    }
    i
}

/// The pages a write transaction changed, as replicated through Raft.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frames {
    /// Node that proposed the entry.
    pub proposer: u64,
    /// Proposer-local sequence number, to match the entry with its waiting caller.
    pub sequence: u64,
    /// Database name.
    pub db: String,
    /// Page size in bytes.
    pub page_size: u32,
    /// Database size in pages once the transaction is applied (pages past it are truncated).
    pub db_pages: u32,
    /// Changed pages, sorted by page number.
    pub pages: Vec<PageChange>,
}

impl Frames {
    /// Encodes the entry (always in the current version).
    pub fn encode(&self) -> Bytes {
        let len = HEADER
            + 16
            + 2
            + self.db.len()
            + 12
            + self
                .pages
                .iter()
                .map(PageChange::encoded_len)
                .sum::<usize>();
        let mut b = BytesMut::with_capacity(len);
        b.put_slice(MAGIC);
        b.put_u8(VERSION);
        b.put_u8(KIND_FRAMES);
        b.put_u32_le(0);
        b.put_u64_le(self.proposer);
        b.put_u64_le(self.sequence);
        b.put_u16_le(self.db.len() as u16);
        b.put_slice(self.db.as_bytes());
        b.put_u32_le(self.page_size);
        b.put_u32_le(self.db_pages);
        b.put_u32_le(self.pages.len() as u32);
        for p in &self.pages {
            b.put_u32_le(p.pgno);
            b.put_u32_le(p.crc);
            match &p.change {
                Change::Image(d) => {
                    b.put_u8(CHANGE_IMAGE);
                    b.put_slice(d);
                }
                Change::Ranges(rs) => {
                    b.put_u8(CHANGE_RANGES);
                    b.put_u16_le(rs.len() as u16);
                    for r in rs {
                        b.put_u16_le(r.offset);
                        b.put_u16_le(r.data.len() as u16);
                        b.put_slice(&r.data);
                    }
                }
            }
        }
        let crc = crc32fast::hash(&b[HEADER..]);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b.freeze()
    }

    /// Decodes an entry (version 2 or 1); page bytes are slices of `data` (no copy).
    pub fn decode(data: Bytes) -> Result<Frames, EntryError> {
        if data.len() < HEADER {
            return Err(EntryError::Malformed("shorter than the header"));
        }
        if &data[0..2] != MAGIC {
            return Err(EntryError::Malformed("bad magic"));
        }
        let version = data[2];
        if version != VERSION && version != VERSION_1 {
            return Err(EntryError::Version(version));
        }
        if data[3] != KIND_FRAMES {
            return Err(EntryError::Kind(data[3]));
        }
        let stored = u32::from_le_bytes(data[4..8].try_into().unwrap());
        let computed = crc32fast::hash(&data[HEADER..]);
        if stored != computed {
            return Err(EntryError::Checksum { stored, computed });
        }
        let mut body = data.slice(HEADER..);
        let need = |b: &Bytes, n: usize| {
            if b.remaining() < n {
                Err(EntryError::Malformed("truncated body"))
            } else {
                Ok(())
            }
        };
        need(&body, 18)?;
        let proposer = body.get_u64_le();
        let sequence = body.get_u64_le();
        let name_len = body.get_u16_le() as usize;
        need(&body, name_len)?;
        let db = std::str::from_utf8(&body[..name_len])
            .map_err(|_| EntryError::Malformed("database name is not UTF-8"))?
            .to_string();
        body.advance(name_len);
        need(&body, 12)?;
        let page_size = body.get_u32_le();
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(EntryError::Malformed("bad page size"));
        }
        let size = page_size as usize;
        let db_pages = body.get_u32_le();
        let count = body.get_u32_le() as usize;
        // Every page change takes at least 4 bytes: a count that cannot fit is refused before
        // anything is allocated for it.
        if count > body.remaining() / 4 {
            return Err(EntryError::Malformed("page count does not match length"));
        }
        let mut pages = Vec::with_capacity(count);
        let mut last = 0u32;
        for _ in 0..count {
            need(&body, 4)?;
            let pgno = body.get_u32_le();
            if pgno <= last {
                return Err(EntryError::Malformed("page numbers not increasing"));
            }
            last = pgno;
            if version == VERSION_1 {
                need(&body, size)?;
                let d = body.split_to(size);
                pages.push(PageChange {
                    pgno,
                    crc: crc32fast::hash(&d),
                    change: Change::Image(d),
                });
                continue;
            }
            need(&body, 5)?;
            let crc = body.get_u32_le();
            let change = match body.get_u8() {
                CHANGE_IMAGE => {
                    need(&body, size)?;
                    Change::Image(body.split_to(size))
                }
                CHANGE_RANGES => {
                    need(&body, 2)?;
                    let n = body.get_u16_le() as usize;
                    let mut rs = Vec::with_capacity(n.min(body.remaining() / 5));
                    let mut end = 0usize;
                    for i in 0..n {
                        need(&body, 4)?;
                        let offset = body.get_u16_le();
                        let len = body.get_u16_le() as usize;
                        if len == 0 {
                            return Err(EntryError::Malformed("empty range"));
                        }
                        if i > 0 && (offset as usize) <= end {
                            return Err(EntryError::Malformed("ranges overlap or touch"));
                        }
                        end = offset as usize + len;
                        if end > size {
                            return Err(EntryError::Malformed("range past the end of the page"));
                        }
                        need(&body, len)?;
                        rs.push(Range {
                            offset,
                            data: body.split_to(len),
                        });
                    }
                    Change::Ranges(rs)
                }
                _ => return Err(EntryError::Malformed("unknown page change kind")),
            };
            pages.push(PageChange { pgno, crc, change });
        }
        if body.has_remaining() {
            return Err(EntryError::Malformed("bytes after the last page"));
        }
        Ok(Frames {
            proposer,
            sequence,
            db,
            page_size,
            db_pages,
            pages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A page of `size` bytes and a version of it with `edits` (offset, bytes) written over it.
    fn edited(base: &[u8], edits: &[(usize, Vec<u8>)]) -> Vec<u8> {
        let mut p = base.to_vec();
        for (at, bytes) in edits {
            let at = at % p.len();
            let n = bytes.len().min(p.len() - at);
            p[at..at + n].copy_from_slice(&bytes[..n]);
        }
        p
    }

    fn edits() -> impl Strategy<Value = Vec<(usize, Vec<u8>)>> {
        prop::collection::vec(
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..300)),
            0..6,
        )
    }

    fn frames_strategy() -> impl Strategy<Value = Frames> {
        (
            any::<u64>(),
            any::<u64>(),
            "[a-z]{1,12}",
            prop::sample::select(vec![512u32, 1024, 4096]),
            any::<u32>(),
            prop::collection::btree_map(1u32..10_000, (any::<u8>(), edits(), any::<bool>()), 0..6),
        )
            .prop_map(
                |(proposer, sequence, db, page_size, db_pages, pgs)| Frames {
                    proposer,
                    sequence,
                    db,
                    page_size,
                    db_pages,
                    pages: pgs
                        .into_iter()
                        .map(|(pgno, (fill, e, absent))| {
                            let base = vec![fill; page_size as usize];
                            let page = Page {
                                pgno,
                                data: Bytes::from(edited(&base, &e)),
                            };
                            PageChange::diff(&page, (!absent).then_some(&base[..]))
                        })
                        .collect(),
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn round_trip(f in frames_strategy()) {
            let bytes = f.encode();
            let back = Frames::decode(bytes.clone()).unwrap();
            prop_assert_eq!(&back, &f);
            prop_assert_eq!(back.encode(), bytes);
        }

        #[test]
        fn any_damage_is_rejected(f in frames_strategy(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = f.encode().to_vec();
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(Frames::decode(Bytes::from(bytes)).is_err());
        }

        #[test]
        fn truncation_is_rejected(f in frames_strategy(), at in any::<prop::sample::Index>()) {
            let bytes = f.encode();
            let cut = at.index(bytes.len());
            prop_assert!(Frames::decode(bytes.slice(..cut)).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = Frames::decode(Bytes::from(bytes));
        }

        /// The change made from a base turns that base into the page, and is never larger
        /// than the image.
        #[test]
        fn a_diff_applied_to_its_base_gives_the_page(fill in any::<u8>(), e in edits(), absent in any::<bool>()) {
            let base = vec![fill; 4096];
            let page = Page { pgno: 7, data: Bytes::from(edited(&base, &e)) };
            let base = (!absent).then_some(&base[..]);
            let c = PageChange::diff(&page, base);
            prop_assert!(c.encoded_len() <= 9 + 4096);
            prop_assert_eq!(c.apply_to(base, 4096).unwrap(), page.data.to_vec());
        }

        /// The module's idempotence invariant: over a page whose every byte holds its value of
        /// some version v0..=vn, replaying the changes v0->v1, ..., v(n-1)->vn gives vn.
        #[test]
        fn replaying_ranges_over_mixed_versions_gives_the_last(
            steps in prop::collection::vec(edits(), 1..8),
            picks in prop::collection::vec(any::<prop::sample::Index>(), 1024),
        ) {
            let mut versions = vec![vec![0u8; 1024]];
            for e in &steps {
                let next = edited(versions.last().unwrap(), e);
                versions.push(next);
            }
            let changes: Vec<PageChange> = versions
                .windows(2)
                .map(|w| PageChange::diff(&Page { pgno: 1, data: Bytes::from(w[1].clone()) }, Some(&w[0])))
                .collect();
            let mut page: Vec<u8> = (0..1024).map(|b| versions[picks[b].index(versions.len())][b]).collect();
            for c in &changes {
                c.write_into(&mut page);
            }
            prop_assert_eq!(&page, versions.last().unwrap());
        }
    }

    /// The runs as a byte loop finds them: what `differing_runs` must return.
    fn differing_runs_bytewise(a: &[u8], b: &[u8]) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < a.len() {
            if a[i] == b[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < a.len() && a[i] != b[i] {
                i += 1;
            }
            match out.last_mut() {
                Some(last) if start - last.1 <= RANGE_OVERHEAD => last.1 = i,
                _ => out.push((start, i)),
            }
        }
        out
    }

    proptest! {
        /// Word-at-a-time run finding agrees with the byte loop: on pages of any length
        /// (not only multiples of 8), with changes of any pattern, including bytes whose
        /// xor is 0x01 or 0x80 (the edges of the has-zero-byte test) beside equal ones.
        #[test]
        fn differing_runs_are_the_bytewise_runs(
            len in 0usize..80,
            base in prop::collection::vec(any::<u8>(), 80),
            flips in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(vec![0x01u8, 0x80, 0xff, 0x7f, 0x10])), 0..24),
        ) {
            let a = &base[..len];
            let mut b = a.to_vec();
            if len > 0 {
                for (at, x) in flips {
                    b[at.index(len)] ^= x;
                }
            }
            prop_assert_eq!(differing_runs(a, &b), differing_runs_bytewise(a, &b));
        }
    }

    #[test]
    fn a_change_applied_to_another_base_is_caught() {
        let base = vec![1u8; 4096];
        let mut page = base.clone();
        page[100] = 2;
        let c = PageChange::diff(
            &Page {
                pgno: 3,
                data: Bytes::from(page),
            },
            Some(&base),
        );
        assert!(matches!(&c.change, Change::Ranges(r) if r.len() == 1 && r[0].data.len() == 1));
        let mut other = base.clone();
        other[4000] = 9;
        let e = c.apply_to(Some(&other), 4096).unwrap_err();
        assert_eq!(e.pgno, 3);
        assert_eq!(c.apply_to(None, 4096).unwrap_err().pgno, 3);
    }

    #[test]
    fn version_1_entries_still_decode() {
        let mut b = BytesMut::new();
        b.put_slice(MAGIC);
        b.put_u8(VERSION_1);
        b.put_u8(KIND_FRAMES);
        b.put_u32_le(0);
        b.put_u64_le(2);
        b.put_u64_le(9);
        b.put_u16_le(4);
        b.put_slice(b"main");
        b.put_u32_le(512);
        b.put_u32_le(3);
        b.put_u32_le(2);
        for (pgno, fill) in [(1u32, 7u8), (3, 8)] {
            b.put_u32_le(pgno);
            b.put_slice(&[fill; 512]);
        }
        let crc = crc32fast::hash(&b[HEADER..]);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        let f = Frames::decode(b.freeze()).unwrap();
        assert_eq!(
            (f.proposer, f.sequence, &f.db[..], f.db_pages),
            (2, 9, "main", 3)
        );
        assert_eq!(f.pages.len(), 2);
        assert_eq!(f.pages[1].apply_to(None, 512).unwrap(), vec![8u8; 512]);
        assert_eq!(Frames::decode(f.encode()).unwrap(), f);
    }
}
