//! etcd's MVCC key-value model in SQL tables on a raftsql database (`etcd`): pure functions of
//! a SQLite connection, unit-tested on in-memory databases; `store.rs` runs them on a node.
//!
//! # Schema
//! ```sql
//! kv_rev(rev, sub, key, create_rev, version, value, lease)  -- every revision of every key;
//!                                                            -- version 0 marks a deletion
//! kv_live(key, create_rev, mod_rev, mod_sub, version, lease) -- the current state of each key;
//!                                                            -- its value is in kv_rev's row
//!                                                            -- (mod_rev, mod_sub)
//! kv_now(key, create_rev, mod_rev, version, value, lease)   -- view: kv_live with the values
//! meta(name, value)                                          -- 'rev', 'compact_rev'
//! lease(id, ttl, granted_ttl)                                -- leases (issue 4, Lease API)
//! ```
//! `kv_rev`'s primary key (rev, sub) orders every change as etcd numbers them (one main
//! revision per write transaction, sub-revisions inside it): it is the event log that
//! watches read. The index `kv_rev(key, rev)` answers "the value of key K at revision R" with
//! one seek.
//!
//! # Invariants
//! - `meta.rev` is the store's revision: 1 for an empty store (as etcd), +1 for each write
//!   transaction that changes something (a delete that deletes nothing changes nothing).
//! - `kv_live` holds exactly the non-deleted keys at `meta.rev`, each with the fields of its
//!   newest `kv_rev` row and that row's (rev, sub); reading at the current revision touches
//!   history only for that one row per key (the value is stored once: schema 2, a put wrote
//!   it twice before). Compaction never removes a key's newest row.
//! - Reading at an older revision R walks the distinct keys of the range through the
//!   `(key, rev)` index, one seek per key (never a GROUP BY over the history).
//! - Revisions below `meta.compact_rev` may be gone: reading them is `ErrCompacted`.

//!
//! # Files
//! | file | owns |
//! |---|---|
//! | `schema.rs` | the tables, `meta` (revision, compaction revision) |
//! | `read.rs` | ranges at the current or an older revision, counts |
//! | `write.rs` | one revision per write transaction: put, delete, history pruning |
//! | `txn.rs` | Txn: limits, compares, the chosen branch |

#[cfg(test)]
mod costs;
mod read;
mod schema;
#[cfg(test)]
mod tests;
mod txn;
mod write;

pub(crate) use read::*;
pub(crate) use schema::*;
pub(crate) use txn::*;
pub use txn::{MAX_TXN_DEPTH, MAX_TXN_OPS, MAX_TXN_TOTAL_OPS};
pub(crate) use write::*;
