//! etcd's MVCC key-value model in SQL tables on a raftsql database (`etcd`).
//!
//! # Schema
//! ```sql
//! kv_rev(rev, sub, key, create_rev, version, value, lease)  -- every revision of every key;
//!                                                            -- version 0 marks a deletion
//! kv_live(key, create_rev, mod_rev, version, value, lease)  -- the current value of each key
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
//!   newest `kv_rev` row; reading at the current revision never touches history.
//! - Reading at an older revision R walks the distinct keys of the range through the
//!   `(key, rev)` index, one seek per key (never a GROUP BY over the history).
//! - Revisions below `meta.compact_rev` may be gone: reading them is `ErrCompacted`.
//!
//! Every write runs as a [`raftsql_core::Node::write`] closure on the leader: inside the
//! group-commit transaction, so concurrent requests share one Raft entry and still each get
//! their own revision, exactly as if run one after another.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use raftsql_core::{Consistency, Error as CoreError, Node};
use rusqlite::{params, Connection, OptionalExtension};

use crate::forward::{expect_reply, Reply, Request};
use crate::pb::etcdserverpb::{
    compare, range_request, request_op, response_op, CompactionRequest, Compare,
    DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse,
    RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use crate::pb::mvccpb::KeyValue;

/// The raftsql database holding the etcd data.
pub const DB: &str = "etcd";
/// Most compares, and most operations per branch, at each level of a Txn (etcd's
/// `--max-txn-ops` default).
pub const MAX_TXN_OPS: usize = 128;
/// Most levels of nested Txns (raftsql's own bound; etcd has none, kube-apiserver uses 1).
pub const MAX_TXN_DEPTH: usize = 16;
/// Most compares and operations in one Txn over all its levels and branches (raftsql's own
/// bound on what one request may cost).
pub const MAX_TXN_TOTAL_OPS: usize = 1024;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv_rev (
  rev INTEGER NOT NULL, sub INTEGER NOT NULL, key BLOB NOT NULL,
  create_rev INTEGER NOT NULL, version INTEGER NOT NULL, value BLOB NOT NULL, lease INTEGER NOT NULL,
  PRIMARY KEY (rev, sub)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_rev_key ON kv_rev(key, rev);
CREATE TABLE IF NOT EXISTS kv_live (
  key BLOB PRIMARY KEY, create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL,
  version INTEGER NOT NULL, value BLOB NOT NULL, lease INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_live_lease ON kv_live(lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lease (id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL, granted_ttl INTEGER NOT NULL);
";

/// The schema's version, kept in the database's `user_version`: the DDL above runs when a
/// database is behind it (once), not on every write.
const SCHEMA_VERSION: i64 = 1;

fn ensure_schema(c: &Connection) -> rusqlite::Result<()> {
    let v: i64 = c
        .prepare_cached("PRAGMA user_version")?
        .query_row([], |r| r.get(0))?;
    if v < SCHEMA_VERSION {
        c.execute_batch(SCHEMA)?;
        c.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
    }
    Ok(())
}

/// etcd's errors, with the exact gRPC codes and messages its clients match on.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A request over etcd's 1.5 MiB limit.
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// Granting a lease id that exists.
    #[error("etcdserver: lease already exists")]
    LeaseExist,
    /// A TTL over etcd's maximum.
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// The requested revision was compacted away.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    /// The requested revision is not written yet.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    /// ignore_value / ignore_lease on a missing key.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// Empty key.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// A lease that does not exist.
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// Two writes to one key in one txn branch.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// More than [`MAX_TXN_OPS`] operations in a branch, or [`MAX_TXN_TOTAL_OPS`] in all.
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// Txns nested more than [`MAX_TXN_DEPTH`] deep.
    #[error("raftsql: txn request nested more than {MAX_TXN_DEPTH} levels deep")]
    TxnTooDeep,
    /// No leader (elections, no quorum).
    #[error("etcdserver: no leader")]
    NoLeader,
    /// Timed out waiting for the cluster.
    #[error("etcdserver: request timed out")]
    Timeout,
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl From<CoreError> for EtcdError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::NotLeader { .. } | CoreError::Unavailable(_) => EtcdError::NoLeader,
            CoreError::Timeout(_) | CoreError::OutcomeUnknown => EtcdError::Timeout,
            other => EtcdError::Internal(other.to_string()),
        }
    }
}

impl From<rusqlite::Error> for EtcdError {
    fn from(e: rusqlite::Error) -> Self {
        EtcdError::Internal(e.to_string())
    }
}

impl From<EtcdError> for tonic::Status {
    fn from(e: EtcdError) -> Self {
        use tonic::Code;
        let code = match e {
            EtcdError::Compacted | EtcdError::FutureRev => Code::OutOfRange,
            EtcdError::KeyNotFound
            | EtcdError::EmptyKey
            | EtcdError::DuplicateKey
            | EtcdError::TooManyOps
            | EtcdError::TxnTooDeep => Code::InvalidArgument,
            EtcdError::LeaseNotFound => Code::NotFound,
            EtcdError::LeaseExist => Code::FailedPrecondition,
            EtcdError::RequestTooLarge => Code::InvalidArgument,

            EtcdError::LeaseTtlTooLarge => Code::OutOfRange,
            EtcdError::NoLeader => Code::Unavailable,
            EtcdError::Timeout => Code::Unavailable,
            EtcdError::Internal(_) => Code::Unknown,
        };
        tonic::Status::new(code, e.to_string())
    }
}

impl EtcdError {
    /// The code this error travels under as a core application error
    /// ([`CoreError::Application`]): through [`raftsql_core::Node::write`] and reads, and in a
    /// forwarded call's answer. `None` for errors that map to core's own variants.
    fn app_code(&self) -> Option<u32> {
        Some(match self {
            EtcdError::Compacted => 1,
            EtcdError::FutureRev => 2,
            EtcdError::KeyNotFound => 3,
            EtcdError::EmptyKey => 4,
            EtcdError::LeaseNotFound => 5,
            EtcdError::DuplicateKey => 6,
            EtcdError::TooManyOps => 7,
            EtcdError::LeaseExist => 8,
            EtcdError::LeaseTtlTooLarge => 9,
            EtcdError::RequestTooLarge => 10,
            EtcdError::TxnTooDeep => 11,
            EtcdError::NoLeader | EtcdError::Timeout | EtcdError::Internal(_) => return None,
        })
    }

    /// The error an application code names (see [`EtcdError::app_code`]).
    fn from_app_code(code: u32) -> Option<EtcdError> {
        Some(match code {
            1 => EtcdError::Compacted,
            2 => EtcdError::FutureRev,
            3 => EtcdError::KeyNotFound,
            4 => EtcdError::EmptyKey,
            5 => EtcdError::LeaseNotFound,
            6 => EtcdError::DuplicateKey,
            7 => EtcdError::TooManyOps,
            8 => EtcdError::LeaseExist,
            9 => EtcdError::LeaseTtlTooLarge,
            10 => EtcdError::RequestTooLarge,
            11 => EtcdError::TxnTooDeep,
            _ => return None,
        })
    }
}

pub(crate) type R<T> = Result<T, EtcdError>;

/// One key's state at some revision.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Kv {
    key: Vec<u8>,
    create_rev: i64,
    mod_rev: i64,
    version: i64,
    value: Vec<u8>,
    lease: i64,
}

impl Kv {
    fn to_pb(&self, keys_only: bool) -> KeyValue {
        KeyValue {
            key: Bytes::copy_from_slice(&self.key),
            create_revision: self.create_rev,
            mod_revision: self.mod_rev,
            version: self.version,
            value: if keys_only {
                Bytes::new()
            } else {
                Bytes::copy_from_slice(&self.value)
            },
            lease: self.lease,
        }
    }
}

/// The key interval of a request: `[start, end)`, `end = None` meaning "to the last key".
#[derive(Clone, Debug)]
pub(crate) struct Interval {
    pub(crate) start: Vec<u8>,
    pub(crate) end: Option<Vec<u8>>,
}

impl Interval {
    /// etcd's rules: empty `range_end` = the key alone; `range_end` = "\0" = every key from
    /// `key` on (and `key` = "\0" too = every key).
    pub(crate) fn new(key: &[u8], range_end: &[u8]) -> Interval {
        if range_end.is_empty() {
            let mut end = key.to_vec();
            end.push(0);
            Interval {
                start: key.to_vec(),
                end: Some(end),
            }
        } else if range_end == [0] {
            Interval {
                start: key.to_vec(),
                end: None,
            }
        } else {
            Interval {
                start: key.to_vec(),
                end: Some(range_end.to_vec()),
            }
        }
    }
    pub(crate) fn contains(&self, k: &[u8]) -> bool {
        k >= &self.start[..] && self.end.as_ref().is_none_or(|e| k < &e[..])
    }
}

fn meta(c: &Connection, name: &str, default: i64) -> R<i64> {
    Ok(c.prepare_cached("SELECT value FROM meta WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?
        .unwrap_or(default))
}

fn set_meta(c: &Connection, name: &str, v: i64) -> R<()> {
    c.prepare_cached("INSERT INTO meta(name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = excluded.value")?
        .execute(params![name, v])?;
    Ok(())
}

fn row_to_kv(r: &rusqlite::Row<'_>) -> rusqlite::Result<Kv> {
    Ok(Kv {
        key: r.get(0)?,
        create_rev: r.get(1)?,
        mod_rev: r.get(2)?,
        version: r.get(3)?,
        value: r.get(4)?,
        lease: r.get(5)?,
    })
}

/// How many keys `iv` holds now.
fn live_count(c: &Connection, iv: &Interval) -> R<i64> {
    let mut st = match &iv.end {
        Some(end) => {
            let mut st =
                c.prepare_cached("SELECT count(*) FROM kv_live WHERE key >= ?1 AND key < ?2")?;
            st.raw_bind_parameter(2, end)?;
            st
        }
        None => c.prepare_cached("SELECT count(*) FROM kv_live WHERE key >= ?1")?,
    };
    st.raw_bind_parameter(1, &iv.start)?;
    let n = st.raw_query().next()?.map(|r| r.get(0)).transpose()?;
    Ok(n.unwrap_or(0))
}

/// Keys of `iv` at revision `rev` (`rev` = current: from `kv_live`), in key order.
fn range_keys(
    c: &Connection,
    iv: &Interval,
    rev: i64,
    current: i64,
    limit: usize,
) -> R<(Vec<Kv>, i64)> {
    let mut out = Vec::new();
    if rev >= current {
        let (sql_rows, sql_count) = match iv.end {
            Some(_) => (
                "SELECT key, create_rev, mod_rev, version, value, lease FROM kv_live WHERE key >= ?1 AND key < ?2 ORDER BY key",
                "SELECT count(*) FROM kv_live WHERE key >= ?1 AND key < ?2",
            ),
            None => (
                "SELECT key, create_rev, mod_rev, version, value, lease FROM kv_live WHERE key >= ?1 ORDER BY key",
                "SELECT count(*) FROM kv_live WHERE key >= ?1",
            ),
        };
        let end = iv.end.clone().unwrap_or_default();
        let bind = |st: &mut rusqlite::CachedStatement<'_>| -> rusqlite::Result<()> {
            st.raw_bind_parameter(1, &iv.start)?;
            if iv.end.is_some() {
                st.raw_bind_parameter(2, &end)?;
            }
            Ok(())
        };
        let mut st = c.prepare_cached(sql_count)?;
        bind(&mut st)?;
        let count: i64 = st
            .raw_query()
            .next()?
            .map(|r| r.get(0))
            .transpose()?
            .unwrap_or(0);
        if limit != 0 || count > 0 {
            let mut st = c.prepare_cached(sql_rows)?;
            bind(&mut st)?;
            let mut rows = st.raw_query();
            while let Some(r) = rows.next()? {
                out.push(row_to_kv(r)?);
                if limit != 0 && out.len() >= limit {
                    break;
                }
            }
        }
        return Ok((out, count));
    }
    if let Some(found) = range_at_recent(c, iv, rev, limit)? {
        return Ok(found);
    }
    range_at_by_key(c, iv, rev, limit)
}

/// Most history rows (writes after the revision read) [`range_at_recent`] scans before it
/// leaves an old revision to [`range_at_by_key`].
const RECENT_ROWS: usize = 100_000;

/// Keys of `iv` at a past revision `rev`, from the live table plus the keys changed since
/// `rev`: a key whose live row has `mod_rev <= rev` is unchanged since, so that row is its
/// version at `rev`; every other key that existed at `rev` was written after it, so it is
/// among the history rows with `rev' > rev`, and one seek finds its version at `rev`.
///
/// A page therefore costs the rows it returns plus the writes since `rev` (a kube
/// `continue` page reads at the revision of its first page, moments ago), and the count
/// costs one index count of the range as a read at the current revision does. `None` when
/// more than [`RECENT_ROWS`] history rows follow `rev`.
fn range_at_recent(
    c: &Connection,
    iv: &Interval,
    rev: i64,
    limit: usize,
) -> R<Option<(Vec<Kv>, i64)>> {
    // Every write after `rev`, in the primary key's (rev, sub) order; those of other keys
    // are skipped here.
    let mut since = c.prepare_cached("SELECT key FROM kv_rev WHERE rev > ?1")?;
    let mut scanned = 0usize;
    let mut changed: BTreeMap<Vec<u8>, Option<Kv>> = BTreeMap::new();
    {
        let mut rows = since.query([rev])?;
        while let Some(r) = rows.next()? {
            scanned += 1;
            if scanned > RECENT_ROWS {
                return Ok(None);
            }
            let k = r.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?;
            if iv.contains(k) && !changed.contains_key(k) {
                changed.insert(k.to_vec(), None);
            }
        }
    }
    let mut at = c.prepare_cached(
        "SELECT key, create_rev, rev, version, value, lease FROM kv_rev INDEXED BY kv_rev_key WHERE key = ?1 AND rev <= ?2 ORDER BY rev DESC LIMIT 1",
    )?;
    let mut live_changed = 0i64;
    let mut is_live = c.prepare_cached("SELECT 1 FROM kv_live WHERE key = ?1")?;
    for (k, v) in changed.iter_mut() {
        *v = at
            .query_row(params![k, rev], row_to_kv)
            .optional()?
            .filter(|kv| kv.version > 0);
        if is_live.exists([k])? {
            live_changed += 1;
        }
    }
    let at_rev = changed.values().filter(|v| v.is_some()).count() as i64;
    let count = live_count(c, iv)? - live_changed + at_rev;
    // Merge the unchanged live rows with the changed keys' versions at `rev`, in key order.
    let mut out = Vec::new();
    let full = |out: &Vec<Kv>| limit != 0 && out.len() >= limit;
    let mut old = changed.into_values().flatten().peekable();
    let sql = match iv.end {
        Some(_) => "SELECT key, create_rev, mod_rev, version, value, lease FROM kv_live WHERE key >= ?1 AND key < ?2 ORDER BY key",
        None => "SELECT key, create_rev, mod_rev, version, value, lease FROM kv_live WHERE key >= ?1 ORDER BY key",
    };
    let mut st = c.prepare_cached(sql)?;
    st.raw_bind_parameter(1, &iv.start)?;
    if let Some(end) = &iv.end {
        st.raw_bind_parameter(2, end)?;
    }
    let mut rows = st.raw_query();
    while !full(&out) {
        let Some(r) = rows.next()? else { break };
        let kv = row_to_kv(r)?;
        if kv.mod_rev > rev {
            continue; // changed since: its version at `rev` is in `old`
        }
        while !full(&out) && old.peek().is_some_and(|o| o.key < kv.key) {
            out.push(old.next().unwrap());
        }
        if !full(&out) {
            out.push(kv);
        }
    }
    while !full(&out) {
        let Some(o) = old.next() else { break };
        out.push(o);
    }
    Ok(Some((out, count)))
}

/// Keys of `iv` at a past revision `rev`, one seek per distinct key the range ever held
/// (for revisions older than [`RECENT_ROWS`] history rows).
fn range_at_by_key(c: &Connection, iv: &Interval, rev: i64, limit: usize) -> R<(Vec<Kv>, i64)> {
    let mut out = Vec::new();
    let mut next_key = c.prepare_cached(
        "SELECT key FROM kv_rev INDEXED BY kv_rev_key WHERE key >= ?1 AND (?2 IS NULL OR key < ?2) ORDER BY key LIMIT 1",
    )?;
    let mut at = c.prepare_cached(
        "SELECT key, create_rev, rev, version, value, lease FROM kv_rev INDEXED BY kv_rev_key WHERE key = ?1 AND rev <= ?2 ORDER BY rev DESC LIMIT 1",
    )?;
    let mut cur = iv.start.clone();
    let mut count = 0i64;
    loop {
        let k: Option<Vec<u8>> = next_key
            .query_row(params![cur, iv.end], |r| r.get(0))
            .optional()?;
        let Some(k) = k else { break };
        if let Some(kv) = at.query_row(params![k, rev], row_to_kv).optional()? {
            if kv.version > 0 {
                count += 1;
                if limit == 0 || out.len() < limit {
                    out.push(kv);
                }
            }
        }
        cur = k;
        cur.push(0);
    }
    Ok((out, count))
}

/// One step of a compaction to `target`: removes the rows of revisions `[lo, hi)` that a
/// newer row at or below `target` supersedes and the deletions among them, and the last
/// surviving row below `lo` of every key written in `[lo, hi)` (superseded by that write),
/// then records `compact_done` = `hi`.
///
/// Invariant: below `compact_done`, each key has at most one row, and it is not a deletion
/// (checked by the unit test `compaction_from_the_last_one_leaves_what_a_full_one_does`).
fn prune_history(c: &Connection, lo: i64, hi: i64, target: i64) -> R<()> {
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

/// Revision and compaction checks for a read at `rev` (0 = current).
fn check_rev(c: &Connection, rev: i64) -> R<(i64, i64)> {
    let current = meta(c, "rev", 1)?;
    if rev > current {
        return Err(EtcdError::FutureRev);
    }
    if rev > 0 && rev < meta(c, "compact_rev", 0)? {
        return Err(EtcdError::Compacted);
    }
    Ok((if rev <= 0 { current } else { rev }, current))
}

/// Answers a Range as etcd does (see etcd's `v3_server` apply of RangeRequest).
fn range(c: &Connection, req: &RangeRequest, header_rev: i64) -> R<RangeResponse> {
    use range_request::{SortOrder, SortTarget};
    let (rev, current) = check_rev(c, req.revision)?;
    let iv = Interval::new(&req.key, &req.range_end);
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    let mut order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
    let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    let fetch_all = order != SortOrder::None || filtered;
    let limit = if req.count_only {
        0
    } else if req.limit > 0 && !fetch_all {
        req.limit as usize + 1
    } else {
        0
    };
    let (mut kvs, count) = if req.count_only {
        let (_, n) = range_keys(c, &iv, rev, current, 1)?;
        (Vec::new(), n)
    } else {
        range_keys(c, &iv, rev, current, limit)?
    };
    if filtered {
        kvs.retain(|kv| {
            (req.min_mod_revision == 0 || kv.mod_rev >= req.min_mod_revision)
                && (req.max_mod_revision == 0 || kv.mod_rev <= req.max_mod_revision)
                && (req.min_create_revision == 0 || kv.create_rev >= req.min_create_revision)
                && (req.max_create_revision == 0 || kv.create_rev <= req.max_create_revision)
        });
    }
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    }
    if order != SortOrder::None {
        // Stable sorts: ties keep key order, as etcd's sort of a key-ordered slice does for
        // the small slices it sorts with insertion sort.
        let cmp = |a: &Kv, b: &Kv| match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_rev.cmp(&b.create_rev),
            SortTarget::Mod => a.mod_rev.cmp(&b.mod_rev),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        if order == SortOrder::Descend {
            kvs.sort_by(|a, b| cmp(b, a));
        } else {
            kvs.sort_by(cmp);
        }
    }
    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    Ok(RangeResponse {
        header: Some(ResponseHeader {
            revision: header_rev,
            ..Default::default()
        }),
        kvs: kvs.iter().map(|k| k.to_pb(req.keys_only)).collect(),
        more,
        count,
    })
}

/// A write transaction in progress: the revision it will write at and its sub-revisions.
pub(crate) struct WriteTxn {
    rev: i64,
    sub: i64,
}

impl WriteTxn {
    fn begin(c: &Connection) -> R<WriteTxn> {
        Ok(WriteTxn {
            rev: meta(c, "rev", 1)?,
            sub: 0,
        })
    }
    fn changed(&self) -> bool {
        self.sub > 0
    }
    /// The revision reads inside the transaction see (etcd: its own writes included).
    fn read_rev(&self) -> i64 {
        self.rev + if self.changed() { 1 } else { 0 }
    }
    fn finish(self, c: &Connection) -> R<i64> {
        if self.changed() {
            set_meta(c, "rev", self.rev + 1)?;
            Ok(self.rev + 1)
        } else {
            Ok(self.rev)
        }
    }
}

fn live(c: &Connection, key: &[u8]) -> R<Option<Kv>> {
    Ok(c.prepare_cached(
        "SELECT key, create_rev, mod_rev, version, value, lease FROM kv_live WHERE key = ?1",
    )?
    .query_row([key], row_to_kv)
    .optional()?)
}

fn lease_exists(c: &Connection, id: i64) -> R<bool> {
    Ok(c.prepare_cached("SELECT 1 FROM lease WHERE id = ?1")?
        .query_row([id], |_| Ok(()))
        .optional()?
        .is_some())
}

fn put(c: &Connection, t: &mut WriteTxn, req: &PutRequest) -> R<PutResponse> {
    if req.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    let prev = live(c, &req.key)?;
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
        "INSERT INTO kv_live(key, create_rev, mod_rev, version, value, lease) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(key) DO UPDATE SET create_rev = excluded.create_rev, mod_rev = excluded.mod_rev,
           version = excluded.version, value = excluded.value, lease = excluded.lease",
    )?
    .execute(params![&req.key[..], create_rev, rev, version, value, lease])?;
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
    let (kvs, _) = range_keys(c, &iv, i64::MAX, 0, 0)?;
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

fn compare_one(c: &Connection, t: &WriteTxn, cmp: &Compare) -> R<bool> {
    use compare::{CompareResult, CompareTarget, TargetUnion};
    let iv = Interval::new(&cmp.key, &cmp.range_end);
    let (kvs, _) = range_keys(c, &iv, t.read_rev(), t.read_rev(), 0)?;
    let target = CompareTarget::try_from(cmp.target).unwrap_or(CompareTarget::Version);
    let result = CompareResult::try_from(cmp.result).unwrap_or(CompareResult::Equal);
    let test = |kv: &Kv| -> bool {
        let ord = if target == CompareTarget::Value {
            let want: &[u8] = match &cmp.target_union {
                Some(TargetUnion::Value(v)) => &v[..],
                _ => &[],
            };
            kv.value.as_slice().cmp(want)
        } else {
            let have = match target {
                CompareTarget::Version => kv.version,
                CompareTarget::Create => kv.create_rev,
                CompareTarget::Mod => kv.mod_rev,
                CompareTarget::Lease => kv.lease,
                CompareTarget::Value => 0,
            };
            let want = match &cmp.target_union {
                Some(TargetUnion::Version(v))
                | Some(TargetUnion::CreateRevision(v))
                | Some(TargetUnion::ModRevision(v))
                | Some(TargetUnion::Lease(v)) => *v,
                _ => 0,
            };
            have.cmp(&want)
        };
        match result {
            CompareResult::Equal => ord.is_eq(),
            CompareResult::NotEqual => !ord.is_eq(),
            CompareResult::Greater => ord.is_gt(),
            CompareResult::Less => ord.is_lt(),
        }
    };
    if kvs.is_empty() {
        // etcd: comparing a value of a missing key always fails; other targets compare
        // against a zero KeyValue.
        if target == CompareTarget::Value {
            return Ok(false);
        }
        return Ok(test(&Kv {
            key: cmp.key.to_vec(),
            create_rev: 0,
            mod_rev: 0,
            version: 0,
            value: Vec::new(),
            lease: 0,
        }));
    }
    Ok(kvs.iter().all(test))
}

/// A Txn's validation, in time linear in its size: etcd's rules (at most [`MAX_TXN_OPS`]
/// compares and ops per branch at every level; within what can run together, no key put
/// twice, nor put and deleted), plus two of raftsql's own, which bound what one request of a
/// few hundred bytes may cost: at most [`MAX_TXN_DEPTH`] levels of nested Txns and
/// [`MAX_TXN_TOTAL_OPS`] compares and ops over all levels and branches.
///
/// (The previous check walked each nested success branch twice per level, so a Txn nested
/// N deep took 2^N steps: depth 26 took 16 s and pinned a core.)
fn check_txn(req: &TxnRequest) -> R<()> {
    let mut total = 0;
    check_txn_size(req, 1, &mut total)?;
    // Depth is bounded now, so the recursion below is too.
    branch_writes(&req.success)?;
    branch_writes(&req.failure)?;
    Ok(())
}

/// The size limits, walking every nested Txn once.
fn check_txn_size(t: &TxnRequest, depth: usize, total: &mut usize) -> R<()> {
    if depth > MAX_TXN_DEPTH {
        return Err(EtcdError::TxnTooDeep);
    }
    if t.compare.len() > MAX_TXN_OPS
        || t.success.len() > MAX_TXN_OPS
        || t.failure.len() > MAX_TXN_OPS
    {
        return Err(EtcdError::TooManyOps);
    }
    *total += t.compare.len() + t.success.len() + t.failure.len();
    if *total > MAX_TXN_TOTAL_OPS {
        return Err(EtcdError::TooManyOps);
    }
    for op in t.success.iter().chain(&t.failure) {
        if let Some(request_op::Request::RequestTxn(n)) = &op.request {
            check_txn_size(n, depth + 1, total)?;
        }
    }
    Ok(())
}

/// etcd's `checkIntervals`, bottom-up: the keys a branch puts and the ranges it deletes
/// (nested Txns included, each computed once), failing on a key put twice or put and deleted
/// by operations that can run together. A nested Txn's two branches never both run, so a key
/// both of them put is fine.
fn branch_writes(ops: &[RequestOp]) -> R<(BTreeSet<Vec<u8>>, Vec<Interval>)> {
    let mut dels: Vec<Interval> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(request_op::Request::RequestDeleteRange(d)) => {
                Some(Interval::new(&d.key, &d.range_end))
            }
            _ => None,
        })
        .collect();
    let deleted = |dels: &[Interval], k: &[u8]| dels.iter().any(|d| d.contains(k));
    let mut puts = BTreeSet::new();
    for op in ops {
        let Some(request_op::Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = branch_writes(&t.success)?;
        let (puts_else, dels_else) = branch_writes(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || deleted(&dels, k) {
                return Err(EtcdError::DuplicateKey);
            }
        }
        puts.extend(puts_then.iter().cloned());
        for k in puts_else {
            if (puts.contains(&k) && !puts_then.contains(&k)) || deleted(&dels, &k) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(k);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        if let Some(request_op::Request::RequestPut(p)) = &op.request {
            if puts.contains(&p.key[..]) || deleted(&dels, &p.key) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(p.key.to_vec());
        }
    }
    Ok((puts, dels))
}

fn txn(c: &Connection, t: &mut WriteTxn, req: &TxnRequest) -> R<TxnResponse> {
    let mut ok = true;
    for cmp in &req.compare {
        if !compare_one(c, t, cmp)? {
            ok = false;
            break;
        }
    }
    let ops = if ok { &req.success } else { &req.failure };
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let r = match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                let mut r = r.clone();
                r.revision = if r.revision == 0 {
                    t.read_rev()
                } else {
                    r.revision
                };
                response_op::Response::ResponseRange(range_in_txn(c, t, &r)?)
            }
            Some(request_op::Request::RequestPut(p)) => {
                response_op::Response::ResponsePut(put(c, t, p)?)
            }
            Some(request_op::Request::RequestDeleteRange(d)) => {
                response_op::Response::ResponseDeleteRange(delete_range(c, t, d)?)
            }
            Some(request_op::Request::RequestTxn(n)) => {
                response_op::Response::ResponseTxn(txn(c, t, n)?)
            }
            None => continue,
        };
        responses.push(ResponseOp { response: Some(r) });
    }
    Ok(TxnResponse {
        header: None,
        succeeded: ok,
        responses,
    })
}

/// A Range inside a write txn: at the txn's own view (which may be one past `meta.rev`).
fn range_in_txn(c: &Connection, t: &WriteTxn, req: &RangeRequest) -> R<RangeResponse> {
    if req.revision > t.read_rev() {
        return Err(EtcdError::FutureRev);
    }
    if req.revision < meta(c, "compact_rev", 0)? {
        return Err(EtcdError::Compacted);
    }
    let mut r = req.clone();
    // range() treats revision >= current as "current", served from kv_live (which already
    // holds this txn's writes).
    if r.revision >= t.rev {
        r.revision = 0;
    }
    range(c, &r, 0)
}

/// Fills the headers of a txn response tree as etcd does: the top-level header is complete,
/// a nested txn's header is empty, and each operation's header carries only the revision.
fn set_headers(resp: &mut TxnResponse, top: &ResponseHeader) {
    resp.header = Some(top.clone());
    fill_ops(resp, top.revision);
}

fn fill_ops(resp: &mut TxnResponse, revision: i64) {
    let h = ResponseHeader {
        revision,
        ..Default::default()
    };
    for r in &mut resp.responses {
        match &mut r.response {
            Some(response_op::Response::ResponseRange(x)) => x.header = Some(h.clone()),
            Some(response_op::Response::ResponsePut(x)) => x.header = Some(h.clone()),
            Some(response_op::Response::ResponseDeleteRange(x)) => x.header = Some(h.clone()),
            Some(response_op::Response::ResponseTxn(x)) => {
                x.header = Some(ResponseHeader::default());
                fill_ops(x, revision);
            }
            None => {}
        }
    }
}

/// etcd refuses requests larger than its `--max-request-bytes` (1.5 MiB by default).
fn check_size(req: &impl prost::Message) -> R<()> {
    if req.encoded_len() > crate::server::MAX_REQUEST_BYTES {
        return Err(EtcdError::RequestTooLarge);
    }
    Ok(())
}

/// etcd's KV service on a raftsql node.
#[derive(Clone)]
pub struct EtcdStore {
    node: Node,
    /// Reported in response headers.
    pub cluster_id: u64,
    /// Lease deadlines, kept by the leader only (see `lease.rs`).
    pub(crate) clock: std::sync::Arc<parking_lot::Mutex<crate::lease::LeaseClock>>,
    /// Tunables.
    pub(crate) options: EtcdOptions,
    /// The watch fan-out, started by the first watch (`hub.rs`).
    hub: std::sync::OnceLock<std::sync::Arc<crate::hub::Hub>>,
}

/// Tunables of the etcd facade, with etcd's defaults.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// How long a watch that asked for progress notifications may stay silent before it is
    /// sent one (etcd's `--experimental-watch-progress-notify-interval`, default 10 minutes).
    pub progress_notify_interval: std::time::Duration,
    /// The client URLs this member advertises in MemberList (etcd's
    /// `--advertise-client-urls`), e.g. `https://10.0.0.1:2379`. Clients that sync their
    /// endpoints from MemberList (etcdctl `--endpoints` auto-sync, clientv3 `AutoSyncInterval`)
    /// use them; every member records its own in the replicated `etcd` database.
    pub advertise_client_urls: Vec<String>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            progress_notify_interval: std::time::Duration::from_secs(600),
            advertise_client_urls: Vec::new(),
        }
    }
}
/// The header etcd puts on every response.
pub fn header(cluster_id: u64, node: &Node, revision: i64) -> ResponseHeader {
    let st = node.status();
    ResponseHeader {
        cluster_id,
        member_id: st.id,
        revision,
        raft_term: st.raft.term,
    }
}

/// True if the table `name` exists (the schema is created by the first write).
/// The store's revision on `c`, or `None` before the first write made the schema.
pub(crate) fn current_rev_in(c: &Connection) -> raftsql_core::Result<Option<i64>> {
    if !has_table(c, "meta")? {
        return Ok(None);
    }
    Ok(Some(meta(c, "rev", 1).map_err(encode_err)?))
}

pub(crate) fn has_table(c: &Connection, name: &str) -> rusqlite::Result<bool> {
    Ok(
        c.prepare_cached("SELECT 1 FROM sqlite_schema WHERE name = ?1")?
            .query_row([name], |_| Ok(()))
            .optional()?
            .is_some(),
    )
}

/// An etcd error back from core's (see [`EtcdError::app_code`]).
pub(crate) fn decode_err(e: CoreError) -> EtcdError {
    match e {
        CoreError::Application { code, message } => {
            EtcdError::from_app_code(code).unwrap_or(EtcdError::Internal(message))
        }
        e => e.into(),
    }
}

/// An etcd error as core's: etcd's own as [`CoreError::Application`] with its code.
pub(crate) fn encode_err(e: EtcdError) -> CoreError {
    match (e.app_code(), e) {
        (Some(code), e) => CoreError::Application {
            code,
            message: e.to_string(),
        },
        (None, EtcdError::Internal(m)) => CoreError::Internal(m),
        (None, EtcdError::NoLeader) => CoreError::Unavailable("no leader".into()),
        (None, _) => CoreError::Timeout(std::time::Duration::ZERO),
    }
}

impl EtcdStore {
    /// A store on `node` (creates the schema on first write), registered with the node so
    /// that followers can forward writes to it when this node leads.
    pub fn new(node: Node, cluster_id: u64) -> std::sync::Arc<EtcdStore> {
        Self::with_options(node, cluster_id, EtcdOptions::default())
    }

    /// [`EtcdStore::new`] with non-default tunables.
    pub fn with_options(
        node: Node,
        cluster_id: u64,
        options: EtcdOptions,
    ) -> std::sync::Arc<EtcdStore> {
        let store = std::sync::Arc::new(EtcdStore {
            node,
            cluster_id,
            clock: Default::default(),
            options,
            hub: Default::default(),
        });
        store.node.register_service(
            crate::forward::SERVICE,
            std::sync::Arc::new(crate::forward::Service(std::sync::Arc::downgrade(&store))),
        );
        crate::lease::spawn_expiry(std::sync::Arc::downgrade(&store));
        crate::members::spawn_record(
            std::sync::Arc::downgrade(&store),
            store.options.advertise_client_urls.clone(),
        );
        store
    }

    /// The watch fan-out (started on first use, inside the runtime serving the watches).
    pub(crate) fn hub(&self) -> &std::sync::Arc<crate::hub::Hub> {
        self.hub
            .get_or_init(|| crate::hub::Hub::start(self.node.clone()))
    }

    pub(crate) fn leads(&self) -> bool {
        self.node.is_leader()
    }

    /// The node under the store.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The store's revision as this node has applied it (1 while the store is empty).
    pub async fn current_rev(&self) -> i64 {
        self.node
            .read(DB, Consistency::Local, |c| {
                if !has_table(c, "meta")? {
                    return Ok(1);
                }
                Ok(meta(c, "rev", 1).map_err(encode_err)?)
            })
            .await
            .ok()
            .flatten()
            .unwrap_or(1)
    }

    /// The response header for `revision` (this node as member, its current term).
    pub fn header_now(&self, revision: i64) -> ResponseHeader {
        self.header(revision)
    }

    fn header(&self, revision: i64) -> ResponseHeader {
        header(self.cluster_id, &self.node, revision)
    }

    /// Runs `f` as one write transaction of the store (schema ensured first).
    pub(crate) async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &mut WriteTxn) -> R<T> + Send + 'static,
    ) -> R<(T, i64)> {
        self.node
            .write(DB, move |c| {
                ensure_schema(c)?;
                let mut t = WriteTxn::begin(c).map_err(encode_err)?;
                let out = f(c, &mut t).map_err(encode_err)?;
                let rev = t.finish(c).map_err(encode_err)?;
                Ok((out, rev))
            })
            .await
            .map_err(decode_err)
    }

    /// Range.
    pub async fn range(&self, req: RangeRequest) -> R<RangeResponse> {
        let local = req.serializable;
        let r = self
            .node
            .read(
                DB,
                if local {
                    Consistency::Local
                } else {
                    Consistency::Linearizable
                },
                move |c| {
                    let has_schema: bool = crate::store::has_table(c, "meta")?;
                    if !has_schema {
                        if req.revision > 1 {
                            return Err(encode_err(EtcdError::FutureRev));
                        }
                        return Ok(RangeResponse {
                            header: None,
                            kvs: Vec::new(),
                            more: false,
                            count: 0,
                        });
                    }
                    let current = meta(c, "rev", 1).map_err(encode_err)?;
                    let mut resp = range(c, &req, current).map_err(encode_err)?;
                    resp.header = Some(ResponseHeader {
                        revision: current,
                        ..Default::default()
                    });
                    Ok(resp)
                },
            )
            .await
            .map_err(decode_err)?;
        let mut resp = match r {
            Some(r) => r,
            None => RangeResponse {
                header: None,
                kvs: Vec::new(),
                more: false,
                count: 0,
            },
        };
        let rev = resp.header.as_ref().map_or(1, |h| h.revision.max(1));
        resp.header = Some(self.header(rev));
        Ok(resp)
    }

    /// Put (forwarded to the leader from a follower).
    pub async fn put(&self, req: PutRequest) -> R<PutResponse> {
        check_size(&req)?;
        if !self.leads() {
            return expect_reply!(self.forward(Request::Put(req)).await?, Reply::Put);
        }
        self.put_local(req).await
    }

    pub(crate) async fn put_local(&self, req: PutRequest) -> R<PutResponse> {
        let (mut resp, rev) = self.write(move |c, t| put(c, t, &req)).await?;
        resp.header = Some(self.header(rev));
        Ok(resp)
    }

    /// DeleteRange (forwarded to the leader from a follower).
    pub async fn delete_range(&self, req: DeleteRangeRequest) -> R<DeleteRangeResponse> {
        if !self.leads() {
            return expect_reply!(
                self.forward(Request::DeleteRange(req)).await?,
                Reply::DeleteRange
            );
        }
        self.delete_local(req).await
    }

    pub(crate) async fn delete_local(&self, req: DeleteRangeRequest) -> R<DeleteRangeResponse> {
        let (mut resp, rev) = self.write(move |c, t| delete_range(c, t, &req)).await?;
        resp.header = Some(self.header(rev));
        Ok(resp)
    }

    /// Txn (forwarded to the leader from a follower).
    pub async fn txn(&self, req: TxnRequest) -> R<TxnResponse> {
        check_size(&req)?;
        if !self.leads() {
            check_txn(&req)?;
            return expect_reply!(self.forward(Request::Txn(req)).await?, Reply::Txn);
        }
        self.txn_local(req).await
    }

    pub(crate) async fn txn_local(&self, req: TxnRequest) -> R<TxnResponse> {
        check_txn(&req)?;
        let (mut resp, rev) = self.write(move |c, t| txn(c, t, &req)).await?;
        set_headers(&mut resp, &self.header(rev));
        Ok(resp)
    }

    /// Compact: records the compaction revision (reads below it fail from now on), then
    /// removes the history it makes unreachable, in small batches so writes keep flowing.
    pub async fn compact(&self, req: CompactionRequest) -> R<i64> {
        if !self.leads() {
            return expect_reply!(self.forward(Request::Compact(req)).await?, Reply::Compacted);
        }
        self.compact_local(req).await
    }

    pub(crate) async fn compact_local(&self, req: CompactionRequest) -> R<i64> {
        let target = req.revision;
        let (done, rev) = self
            .write(move |c, _t| {
                let current = meta(c, "rev", 1)?;
                if target > current {
                    return Err(EtcdError::FutureRev);
                }
                if target <= meta(c, "compact_rev", 0)? {
                    return Err(EtcdError::Compacted);
                }
                set_meta(c, "compact_rev", target)?;
                meta(c, "compact_done", 0)
            })
            .await?;
        // Remove, below the target, every row that a newer row at or below the target
        // supersedes, and the deletions that end a key's history; 1,000 revisions a write.
        // The work starts where the last compaction's ended (`compact_done`): below it every
        // key has at most one row left (invariant below), so only the rows since, and those
        // survivors of the keys written since, can have become unreachable. A compaction's
        // cost is the history written since the previous one, not the cluster's age.
        let mut lo = done;
        while lo < target {
            let hi = (lo + 1000).min(target);
            self.write(move |c, _t| {
                prune_history(c, lo, hi, target)?;
                Ok(())
            })
            .await?;
            lo = hi;
        }
        Ok(rev)
    }
}

#[tonic::async_trait]
impl crate::server::Backend for EtcdStore {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, tonic::Status> {
        Ok(EtcdStore::range(self, req).await?)
    }
    async fn range_stream(
        &self,
        req: RangeRequest,
    ) -> Result<
        crate::server::ResponseStream<crate::pb::etcdserverpb::RangeStreamResponse>,
        tonic::Status,
    > {
        let chunks = EtcdStore::range_stream(self, req).await?;
        let stream = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(chunks),
            |c| c.map_err(tonic::Status::from),
        );
        Ok(Box::pin(stream))
    }
    async fn put(&self, req: PutRequest) -> Result<PutResponse, tonic::Status> {
        Ok(EtcdStore::put(self, req).await?)
    }
    async fn delete_range(
        &self,
        req: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, tonic::Status> {
        Ok(EtcdStore::delete_range(self, req).await?)
    }
    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, tonic::Status> {
        Ok(EtcdStore::txn(self, req).await?)
    }
    async fn compact(
        &self,
        req: crate::pb::etcdserverpb::CompactionRequest,
    ) -> Result<crate::pb::etcdserverpb::CompactionResponse, tonic::Status> {
        let rev = EtcdStore::compact(self, req).await?;
        Ok(crate::pb::etcdserverpb::CompactionResponse {
            header: Some(self.header(rev)),
        })
    }
    async fn status(
        &self,
        req: crate::pb::etcdserverpb::StatusRequest,
    ) -> Result<crate::pb::etcdserverpb::StatusResponse, tonic::Status> {
        let _ = req;
        Ok(EtcdStore::status(self).await?)
    }
    async fn member_list(
        &self,
        req: crate::pb::etcdserverpb::MemberListRequest,
    ) -> Result<crate::pb::etcdserverpb::MemberListResponse, tonic::Status> {
        let _ = req;
        Ok(EtcdStore::member_list(self).await?)
    }
    async fn snapshot(
        &self,
        req: crate::pb::etcdserverpb::SnapshotRequest,
    ) -> Result<
        crate::server::ResponseStream<crate::pb::etcdserverpb::SnapshotResponse>,
        tonic::Status,
    > {
        let _ = req;
        let (total, chunks) = self.snapshot_stream().await?;
        let header = self.header_now(self.current_rev().await);
        let mut sent = 0u64;
        let stream = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(chunks),
            move |c| {
                let c = c?;
                sent += c.len() as u64;
                Ok(crate::pb::etcdserverpb::SnapshotResponse {
                    header: Some(header.clone()),
                    remaining_bytes: total.saturating_sub(sent),
                    blob: Bytes::from(c),
                    ..Default::default()
                })
            },
        );
        Ok(Box::pin(stream))
    }
    async fn alarm(
        &self,
        req: crate::pb::etcdserverpb::AlarmRequest,
    ) -> Result<crate::pb::etcdserverpb::AlarmResponse, tonic::Status> {
        let _ = req;
        Ok(EtcdStore::alarm(self).await?)
    }
    async fn defragment(
        &self,
        req: crate::pb::etcdserverpb::DefragmentRequest,
    ) -> Result<crate::pb::etcdserverpb::DefragmentResponse, tonic::Status> {
        let _ = req;
        Ok(EtcdStore::defragment(self).await?)
    }
    async fn hash_kv(
        &self,
        req: crate::pb::etcdserverpb::HashKvRequest,
    ) -> Result<crate::pb::etcdserverpb::HashKvResponse, tonic::Status> {
        Ok(EtcdStore::hash_kv(self, req.revision).await?)
    }
    async fn hash(
        &self,
        req: crate::pb::etcdserverpb::HashRequest,
    ) -> Result<crate::pb::etcdserverpb::HashResponse, tonic::Status> {
        let _ = req;
        Ok(EtcdStore::hash(self).await?)
    }
    async fn lease_grant(
        &self,
        req: crate::pb::etcdserverpb::LeaseGrantRequest,
    ) -> Result<crate::pb::etcdserverpb::LeaseGrantResponse, tonic::Status> {
        Ok(EtcdStore::lease_grant(self, req).await?)
    }
    async fn lease_revoke(
        &self,
        req: crate::pb::etcdserverpb::LeaseRevokeRequest,
    ) -> Result<crate::pb::etcdserverpb::LeaseRevokeResponse, tonic::Status> {
        Ok(EtcdStore::lease_revoke(self, req).await?)
    }
    async fn lease_time_to_live(
        &self,
        req: crate::pb::etcdserverpb::LeaseTimeToLiveRequest,
    ) -> Result<crate::pb::etcdserverpb::LeaseTimeToLiveResponse, tonic::Status> {
        Ok(EtcdStore::lease_time_to_live(self, req).await?)
    }
    async fn lease_leases(
        &self,
        req: crate::pb::etcdserverpb::LeaseLeasesRequest,
    ) -> Result<crate::pb::etcdserverpb::LeaseLeasesResponse, tonic::Status> {
        let _ = req;
        Ok(EtcdStore::lease_leases(self).await?)
    }
    async fn lease_keep_alive(
        &self,
        reqs: tonic::Streaming<crate::pb::etcdserverpb::LeaseKeepAliveRequest>,
    ) -> Result<
        crate::server::ResponseStream<crate::pb::etcdserverpb::LeaseKeepAliveResponse>,
        tonic::Status,
    > {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(crate::lease::serve_keep_alive(
            std::sync::Arc::new(self.clone()),
            reqs,
            tx,
        ));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
    fn has_leader(&self) -> bool {
        self.has_leader_now()
    }
    fn election_timeout(&self) -> std::time::Duration {
        let cfg = self.node.config();
        cfg.tick * cfg.election_ticks as u32
    }
    async fn http_get(&self, path: &str, query: &str) -> Option<crate::http::HttpAnswer> {
        self.http_answer(path, query).await
    }
    async fn watch(
        &self,
        reqs: tonic::Streaming<crate::pb::etcdserverpb::WatchRequest>,
    ) -> Result<crate::server::ResponseStream<crate::pb::etcdserverpb::WatchResponse>, tonic::Status>
    {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(crate::watch::serve_stream(
            std::sync::Arc::new(self.clone()),
            reqs,
            tx,
        ));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every etcd error crosses core (a write's closure, a forwarded call, the wire between
    /// nodes) and comes back as itself, with etcd's message.
    #[test]
    fn etcd_errors_survive_the_trip_through_core_and_the_wire() {
        let all = [
            EtcdError::Compacted,
            EtcdError::FutureRev,
            EtcdError::KeyNotFound,
            EtcdError::EmptyKey,
            EtcdError::LeaseNotFound,
            EtcdError::DuplicateKey,
            EtcdError::TooManyOps,
            EtcdError::LeaseExist,
            EtcdError::LeaseTtlTooLarge,
            EtcdError::RequestTooLarge,
            EtcdError::TxnTooDeep,
            EtcdError::NoLeader,
            EtcdError::Timeout,
            EtcdError::Internal("disk on fire".into()),
        ];
        for e in all {
            let want = e.to_string();
            let core = encode_err(e);
            let wire = raftsql_core::fuzzing::error_response(7, &core);
            let Some(raftsql_proto::v1::response::Body::Error(pe)) = wire.body else {
                panic!("not an error response")
            };
            let over_the_wire = decode_err(raftsql_core::fuzzing::from_pb(pe)).to_string();
            let local = decode_err(core).to_string();
            assert_eq!(over_the_wire, local);
            assert!(local.ends_with(&want), "{local:?} is not {want:?}");
        }
    }

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        ensure_schema(&c).unwrap();
        c
    }

    /// A random history of puts and deletes over 40 keys, one revision each.
    fn history(c: &Connection, revisions: usize, seed: u64) {
        let mut x = seed;
        for _ in 0..revisions {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = format!("/k/{:02}", x % 40).into_bytes();
            let mut t = WriteTxn::begin(c).unwrap();
            if (x >> 8) % 5 == 0 {
                let mut end = key.clone();
                end.push(b'~');
                delete_range(
                    c,
                    &mut t,
                    &DeleteRangeRequest {
                        key: key.into(),
                        range_end: end.into(),
                        ..Default::default()
                    },
                )
                .unwrap();
            } else {
                put(
                    c,
                    &mut t,
                    &PutRequest {
                        key: key.into(),
                        value: format!("v{x}").into_bytes().into(),
                        ..Default::default()
                    },
                )
                .unwrap();
            }
            // A delete of nothing leaves the revision as it was, as in etcd.
            t.finish(c).unwrap();
        }
    }

    fn ranges() -> Vec<Interval> {
        vec![
            Interval::new(b"/k/", b"/k0"),
            Interval::new(b"/k/1", b"/k/3"),
            Interval::new(b"/k/07", b""),
            Interval::new(b"\0", b"\0"),
        ]
    }

    #[test]
    fn a_read_at_a_past_revision_from_recent_writes_matches_one_seek_per_key() {
        let c = db();
        history(&c, 3000, 0x2545_f491_4f6c_dd1d);
        let current = meta(&c, "rev", 1).unwrap();
        assert!(current > 2000, "{current}");
        for rev in [1, 2, 17, 500, current - 700, current - 50, current - 1] {
            for iv in ranges() {
                for limit in [0, 1, 5, 1000] {
                    let recent = range_at_recent(&c, &iv, rev, limit).unwrap().unwrap();
                    let by_key = range_at_by_key(&c, &iv, rev, limit).unwrap();
                    assert_eq!(recent, by_key, "rev {rev}, {iv:?}, limit {limit}");
                }
            }
        }
    }

    /// Every row of `kv_rev`, in primary key order.
    fn rows(c: &Connection) -> Vec<(i64, i64, Vec<u8>, i64)> {
        c.prepare("SELECT rev, sub, key, version FROM kv_rev ORDER BY rev, sub")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }

    fn compact(c: &Connection, target: i64) {
        set_meta(c, "compact_rev", target).unwrap();
        let mut lo = meta(c, "compact_done", 0).unwrap();
        while lo < target {
            let hi = (lo + 1000).min(target);
            prune_history(c, lo, hi, target).unwrap();
            lo = hi;
        }
    }

    #[test]
    fn compaction_from_the_last_one_leaves_what_a_full_one_does() {
        let (a, b) = (db(), db());
        history(&a, 2500, 7);
        history(&b, 2500, 7);
        // `a` compacts three times, each from where the last ended; `b` once, from 0.
        for target in [700, 1500, 2100] {
            compact(&a, target);
        }
        compact(&b, 2100);
        assert_eq!(rows(&a), rows(&b));
        // Below the compaction revision: at most one row per key, and no deletion.
        let mut seen = BTreeSet::new();
        for (rev, _, key, version) in rows(&a).into_iter().filter(|r| r.0 < 2100) {
            assert!(version > 0, "a deletion at {rev} survived");
            assert!(seen.insert(key.clone()), "two rows of {key:?} below 2100");
        }
        // Reads at and after the compaction revision answer as before it.
        let full = db();
        history(&full, 2500, 7);
        let current = meta(&full, "rev", 1).unwrap();
        for rev in [2100, 2200, current - 1] {
            for iv in ranges() {
                assert_eq!(
                    range_at_by_key(&a, &iv, rev, 0).unwrap(),
                    range_at_by_key(&full, &iv, rev, 0).unwrap(),
                    "rev {rev}, {iv:?}"
                );
            }
        }
    }
}

/// What compaction and a history page cost at 100k and 1M revisions, old way and new
/// (issue 15). Not a test of behaviour (the two tests above are): a measurement, run with
/// `cargo test -p raftsql-etcd --release -- --ignored history_costs --nocapture`.
#[cfg(test)]
mod costs {
    use super::*;
    use std::time::Instant;

    const KEYS: u64 = 10_000;

    /// A store on a file with `revisions` puts over `KEYS` keys of 200-byte values.
    fn build(path: &std::path::Path, revisions: u64) -> Connection {
        let c = Connection::open(path).unwrap();
        c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF")
            .unwrap();
        ensure_schema(&c).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        c.execute_batch("BEGIN").unwrap();
        for i in 0..revisions {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut t = WriteTxn::begin(&c).unwrap();
            put(
                &c,
                &mut t,
                &PutRequest {
                    key: format!("/registry/configmaps/ns/{:05}", x % KEYS)
                        .into_bytes()
                        .into(),
                    value: vec![b'v'; 200].into(),
                    ..Default::default()
                },
            )
            .unwrap();
            t.finish(&c).unwrap();
            if i % 10_000 == 9_999 {
                c.execute_batch("COMMIT; BEGIN").unwrap();
            }
        }
        c.execute_batch("COMMIT").unwrap();
        c
    }

    fn compact_from(c: &Connection, from: i64, target: i64) -> std::time::Duration {
        let started = Instant::now();
        let mut lo = from;
        while lo < target {
            let hi = (lo + 1000).min(target);
            c.execute_batch("BEGIN").unwrap();
            prune_history(c, lo, hi, target).unwrap();
            c.execute_batch("COMMIT").unwrap();
            lo = hi;
        }
        started.elapsed()
    }

    #[test]
    #[ignore]
    fn history_costs() {
        for revisions in [100_000u64, 1_000_000] {
            let dir = tempfile::tempdir().unwrap();
            let started = Instant::now();
            let c = build(&dir.path().join("a.db"), revisions);
            let built = started.elapsed();
            // A first compaction long ago (kube compacts every 5 minutes), then 5,000 more
            // revisions before the next one.
            let current = meta(&c, "rev", 1).unwrap();
            compact_from(&c, 0, current - 5_000);
            c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
            drop(c);
            std::fs::copy(dir.path().join("a.db"), dir.path().join("b.db")).unwrap();
            let a = Connection::open(dir.path().join("a.db")).unwrap();
            let b = Connection::open(dir.path().join("b.db")).unwrap();
            let target = current - 100;
            let full = compact_from(&a, 0, target);
            let done = meta(&b, "compact_done", 0).unwrap();
            let incremental = compact_from(&b, done, target);
            // A `continue` page of 500 keys from the middle of the range, at a revision a
            // moment ago (100 writes since).
            let iv = Interval::new(
                b"/registry/configmaps/ns/05000",
                b"/registry/configmaps/ns0",
            );
            let rev = current - 100;
            let time = |f: &dyn Fn() -> (Vec<Kv>, i64)| {
                let started = Instant::now();
                let mut out = f();
                for _ in 0..9 {
                    out = f();
                }
                (started.elapsed() / 10, out)
            };
            let (by_key, old) = time(&|| range_at_by_key(&b, &iv, rev, 501).unwrap());
            let (recent, new) = time(&|| range_at_recent(&b, &iv, rev, 501).unwrap().unwrap());
            assert_eq!(old, new);
            eprintln!(
                "{revisions} revisions ({KEYS} keys, built in {built:?}): compaction of the \
                 last 4,900 revisions: {full:?} in {} writes from revision 0 (before), \
                 {incremental:?} in {} writes from the last compaction (after); a 500-key page at a revision 100 writes ago \
                 (count {}): {by_key:?} one seek per key (before), {recent:?} live rows plus \
                 the writes since (after)",
                (target + 999) / 1000,
                (target - done + 999) / 1000,
                new.1
            );
        }
    }
}
