//! Writes: one write transaction is one revision ([`WriteTxn`]); puts, deletes, and the
//! pruning of history a compaction makes unreachable.

use rusqlite::{params, Connection, OptionalExtension};

use super::*;
use crate::error::{EtcdError, R};
use crate::pb::etcdserverpb::{DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse};

/// A write transaction in progress: the revision it will write at and its sub-revisions.
pub(crate) struct WriteTxn {
    pub(crate) rev: i64,
    pub(crate) sub: i64,
}

impl WriteTxn {
    pub(crate) fn begin(c: &Connection) -> R<WriteTxn> {
        Ok(WriteTxn {
            rev: meta(c, "rev", 1)?,
            sub: 0,
        })
    }
    pub(crate) fn changed(&self) -> bool {
        self.sub > 0
    }
    /// The revision reads inside the transaction see (etcd: its own writes included).
    pub(crate) fn read_rev(&self) -> i64 {
        self.rev + if self.changed() { 1 } else { 0 }
    }
    pub(crate) fn finish(self, c: &Connection) -> R<i64> {
        if self.changed() {
            set_meta(c, "rev", self.rev + 1)?;
            Ok(self.rev + 1)
        } else {
            Ok(self.rev)
        }
    }
}

/// The live state of `key` (on a database at the current schema: writes run after
/// [`ensure_schema`]); its value only if `with_value` (it is in `kv_rev`: one more seek), else
/// empty.
pub(crate) fn live(c: &Connection, key: &[u8], with_value: bool) -> R<Option<Kv>> {
    let sql = if with_value {
        "SELECT key, create_rev, mod_rev, version, value, lease FROM kv_now WHERE key = ?1"
    } else {
        "SELECT key, create_rev, mod_rev, version, x'', lease FROM kv_live WHERE key = ?1"
    };
    Ok(c.prepare_cached(sql)?
        .query_row([key], row_to_kv)
        .optional()?)
}

pub(crate) fn lease_exists(c: &Connection, id: i64) -> R<bool> {
    Ok(c.prepare_cached("SELECT 1 FROM lease WHERE id = ?1")?
        .query_row([id], |_| Ok(()))
        .optional()?
        .is_some())
}

pub(crate) fn put(c: &Connection, t: &mut WriteTxn, req: &PutRequest) -> R<PutResponse> {
    if req.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    let prev = live(c, &req.key, req.ignore_value || req.prev_kv)?;
    let value = if req.ignore_value {
        prev.as_ref().ok_or(EtcdError::KeyNotFound)?.value.clone()
    } else {
        req.value.to_vec()
    };
    let lease = if req.ignore_lease {
        prev.as_ref().ok_or(EtcdError::KeyNotFound)?.lease
    } else {
        req.lease
    };
    if lease != 0 && !lease_exists(c, lease)? {
        return Err(EtcdError::LeaseNotFound);
    }
    let rev = t.rev + 1;
    let (create_rev, version) = match &prev {
        Some(p) => (p.create_rev, p.version + 1),
        None => (rev, 1),
    };
    c.prepare_cached("INSERT INTO kv_rev(rev, sub, key, create_rev, version, value, lease) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?
        .execute(params![rev, t.sub, &req.key[..], create_rev, version, value, lease])?;
    c.prepare_cached(
        "INSERT INTO kv_live(key, create_rev, mod_rev, mod_sub, version, lease) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(key) DO UPDATE SET create_rev = excluded.create_rev, mod_rev = excluded.mod_rev,
           mod_sub = excluded.mod_sub, version = excluded.version, lease = excluded.lease",
    )?
    .execute(params![&req.key[..], create_rev, rev, t.sub, version, lease])?;
    t.sub += 1;
    Ok(PutResponse {
        header: None,
        prev_kv: if req.prev_kv {
            prev.map(|p| p.to_pb(false))
        } else {
            None
        },
    })
}

pub(crate) fn delete_range(
    c: &Connection,
    t: &mut WriteTxn,
    req: &DeleteRangeRequest,
) -> R<DeleteRangeResponse> {
    let iv = Interval::new(&req.key, &req.range_end);
    let (kvs, _) = range_keys(c, &iv, i64::MAX, 0, 0, req.prev_kv)?;
    let rev = t.rev + 1;
    for kv in &kvs {
        c.prepare_cached("INSERT INTO kv_rev(rev, sub, key, create_rev, version, value, lease) VALUES (?1, ?2, ?3, 0, 0, x'', 0)")?
            .execute(params![rev, t.sub, kv.key])?;
        c.prepare_cached("DELETE FROM kv_live WHERE key = ?1")?
            .execute([&kv.key])?;
        t.sub += 1;
    }
    Ok(DeleteRangeResponse {
        header: None,
        deleted: kvs.len() as i64,
        prev_kvs: if req.prev_kv {
            kvs.iter().map(|k| k.to_pb(false)).collect()
        } else {
            Vec::new()
        },
    })
}

/// One step of a compaction to `target`: removes the rows of revisions `[lo, hi)` that a
/// newer row at or below `target` supersedes and the deletions among them, and the last
/// surviving row below `lo` of every key written in `[lo, hi)` (superseded by that write),
/// then records `compact_done` = `hi`.
///
/// Invariant: below `compact_done`, each key has at most one row, and it is not a deletion
/// (checked by the unit test `compaction_from_the_last_one_leaves_what_a_full_one_does`).
pub(crate) fn prune_history(c: &Connection, lo: i64, hi: i64, target: i64) -> R<()> {
    // The survivors first: the rows of `[lo, hi)` name the keys.
    // (One seek per row of the window: the window by the primary key, each survivor by
    // the key index.)
    c.prepare_cached(
        "DELETE FROM kv_rev WHERE (rev, sub) IN (
           SELECT o.rev, o.sub FROM kv_rev AS n, kv_rev AS o INDEXED BY kv_rev_key
           WHERE n.rev >= ?1 AND n.rev < ?2 AND n.rev <= ?3 AND o.key = n.key AND o.rev < ?1)",
    )?
    .execute(params![lo, hi, target])?;
    c.prepare_cached(
        "DELETE FROM kv_rev WHERE rev >= ?1 AND rev < ?2 AND (version = 0 OR EXISTS (
           SELECT 1 FROM kv_rev n WHERE n.key = kv_rev.key AND n.rev > kv_rev.rev AND n.rev <= ?3))",
    )?
    .execute(params![lo, hi, target])?;
    if hi > meta(c, "compact_done", 0)? {
        set_meta(c, "compact_done", hi)?;
    }
    Ok(())
}
