//! The payload of a raftsql Raft log entry: one committed SQLite write transaction.
//!
//! ```text
//! offset size
//! 0      2    magic "RQ"
//! 2      1    format version (1)
//! 3      1    kind: 1 = Frames
//! 4      4    crc32 (little endian) of every byte from offset 8 to the end
//! 8      ..   body
//!
//! Frames body (integers little endian):
//!   proposer u64, sequence u64     who proposed it (answers the caller when it applies)
//!   db name: u16 length + UTF-8    which database
//!   page_size u32                  bytes per page image
//!   db_pages u32                   database size in pages after the transaction
//!   count u32, then count times: page number u32 + page image (page_size bytes)
//! ```
//!
//! Invariants: page numbers are unique within an entry, non-zero and sorted; every image is
//! exactly `page_size` bytes; `page_size` is a power of two in 512..=65536. Decoding checks
//! all of them and the checksum, so a damaged entry is rejected, never applied.

use bytes::{Buf, BufMut, Bytes, BytesMut};

const MAGIC: &[u8; 2] = b"RQ";
const VERSION: u8 = 1;
const KIND_FRAMES: u8 = 1;
const HEADER: usize = 8;

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

/// One page image of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// 1-based page number.
    pub pgno: u32,
    /// The page image, `page_size` bytes.
    pub data: Bytes,
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
    pub pages: Vec<Page>,
}

impl Frames {
    /// Encodes the entry.
    pub fn encode(&self) -> Bytes {
        let len =
            HEADER + 16 + 2 + self.db.len() + 12 + self.pages.len() * (4 + self.page_size as usize);
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
            b.put_slice(&p.data);
        }
        let crc = crc32fast::hash(&b[HEADER..]);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b.freeze()
    }

    /// Decodes an entry; page images are slices of `data` (no copy).
    pub fn decode(data: Bytes) -> Result<Frames, EntryError> {
        if data.len() < HEADER {
            return Err(EntryError::Malformed("shorter than the header"));
        }
        if &data[0..2] != MAGIC {
            return Err(EntryError::Malformed("bad magic"));
        }
        if data[2] != VERSION {
            return Err(EntryError::Version(data[2]));
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
        let db_pages = body.get_u32_le();
        let count = body.get_u32_le() as usize;
        let each = 4 + page_size as usize;
        if body.remaining()
            != count
                .checked_mul(each)
                .ok_or(EntryError::Malformed("page count overflows"))?
        {
            return Err(EntryError::Malformed("page count does not match length"));
        }
        let mut pages = Vec::with_capacity(count);
        let mut last = 0u32;
        for _ in 0..count {
            let pgno = body.get_u32_le();
            if pgno <= last {
                return Err(EntryError::Malformed("page numbers not increasing"));
            }
            last = pgno;
            let data = body.split_to(page_size as usize);
            pages.push(Page { pgno, data });
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

    fn frames_strategy() -> impl Strategy<Value = Frames> {
        (
            any::<u64>(),
            any::<u64>(),
            "[a-z]{1,12}",
            prop::sample::select(vec![512u32, 1024, 4096]),
            any::<u32>(),
            prop::collection::btree_set(1u32..10_000, 0..6),
            any::<u8>(),
        )
            .prop_map(
                |(proposer, sequence, db, page_size, db_pages, pgnos, fill)| Frames {
                    proposer,
                    sequence,
                    db,
                    page_size,
                    db_pages,
                    pages: pgnos
                        .into_iter()
                        .map(|pgno| Page {
                            pgno,
                            data: Bytes::from(vec![fill ^ pgno as u8; page_size as usize]),
                        })
                        .collect(),
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn round_trip(f in frames_strategy()) {
            prop_assert_eq!(Frames::decode(f.encode()).unwrap(), f);
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
    }
}
