//! Reads: ranges at the current revision (from `kv_live`, each value from its `kv_rev` row:
//! the view `kv_now`) or an older one (from `kv_rev`, one index seek per key), counts, and the
//! revision checks etcd makes.

use std::collections::BTreeMap;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};

use super::*;
use crate::error::{EtcdError, R};
use crate::pb::etcdserverpb::{range_request, RangeRequest, RangeResponse, ResponseHeader};
use crate::pb::mvccpb::KeyValue;

/// One key's state at some revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Kv {
    pub(crate) key: Vec<u8>,
    pub(crate) create_rev: i64,
    pub(crate) mod_rev: i64,
    pub(crate) version: i64,
    pub(crate) value: Vec<u8>,
    pub(crate) lease: i64,
}

impl Kv {
    pub(crate) fn to_pb(&self, keys_only: bool) -> KeyValue {
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
    /// Whether the interval holds one key at most (`[k, k\0)`, e.g. a get or a compare).
    pub(crate) fn is_single_key(&self) -> bool {
        self.end.as_deref().is_some_and(|e| {
            e.len() == self.start.len() + 1 && e.ends_with(&[0]) && e.starts_with(&self.start)
        })
    }
    pub(crate) fn contains(&self, k: &[u8]) -> bool {
        k >= &self.start[..] && self.end.as_ref().is_none_or(|e| k < &e[..])
    }
}

pub(crate) fn row_to_kv(r: &rusqlite::Row<'_>) -> rusqlite::Result<Kv> {
    Ok(Kv {
        key: r.get(0)?,
        create_rev: r.get(1)?,
        mod_rev: r.get(2)?,
        version: r.get(3)?,
        value: r.get(4)?,
        lease: r.get(5)?,
    })
}

/// The live keys of `iv`, with their values or with empty ones, in key order (`?1` the
/// start, `?2` the end if `iv` has one). Static text: a read neither formats nor allocates it.
fn live_range_sql(
    c: &Connection,
    iv: &Interval,
    with_values: bool,
) -> rusqlite::Result<&'static str> {
    macro_rules! rows {
        ($value:literal, $from:literal) => {
            (
                concat!(
                    "SELECT key, create_rev, mod_rev, version, ",
                    $value,
                    ", lease FROM ",
                    $from,
                    " WHERE key >= ?1 AND key < ?2 ORDER BY key"
                ),
                concat!(
                    "SELECT key, create_rev, mod_rev, version, ",
                    $value,
                    ", lease FROM ",
                    $from,
                    " WHERE key >= ?1 ORDER BY key"
                ),
            )
        };
    }
    let (bounded, open) = if !with_values {
        rows!("x''", "kv_live")
    } else if values_in_kv_live(c)? {
        rows!("value", "kv_live")
    } else {
        rows!("value", "kv_now")
    };
    Ok(if iv.end.is_some() { bounded } else { open })
}

/// How many keys `iv` holds now.
pub(crate) fn live_count(c: &Connection, iv: &Interval) -> R<i64> {
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

/// Keys of `iv` at revision `rev` (`rev` = current: from `kv_live`), in key order. At the
/// current revision the values are read only `with_values` (each is one more seek, into
/// `kv_rev`); without, they are empty.
pub(crate) fn range_keys(
    c: &Connection,
    iv: &Interval,
    rev: i64,
    current: i64,
    limit: usize,
    with_values: bool,
) -> R<(Vec<Kv>, i64)> {
    let mut out = Vec::new();
    if rev >= current {
        // One key: its row is its count (a get and a Txn compare run one statement, not two).
        let count = if iv.is_single_key() {
            None
        } else {
            Some(live_count(c, iv)?)
        };
        if limit != 0 || count != Some(0) {
            let mut st = c.prepare_cached(live_range_sql(c, iv, with_values)?)?;
            st.raw_bind_parameter(1, &iv.start)?;
            if let Some(end) = &iv.end {
                st.raw_bind_parameter(2, end)?;
            }
            let mut rows = st.raw_query();
            while let Some(r) = rows.next()? {
                out.push(row_to_kv(r)?);
                if limit != 0 && out.len() >= limit {
                    break;
                }
            }
        }
        let count = count.unwrap_or(out.len() as i64);
        return Ok((out, count));
    }
    if let Some(found) = range_at_recent(c, iv, rev, limit)? {
        return Ok(found);
    }
    range_at_by_key(c, iv, rev, limit)
}

/// Most history rows (writes after the revision read) [`range_at_recent`] scans before it
/// leaves an old revision to [`range_at_by_key`].
pub(crate) const RECENT_ROWS: usize = 100_000;

/// Keys of `iv` at a past revision `rev`, from the live table plus the keys changed since
/// `rev`: a key whose live row has `mod_rev <= rev` is unchanged since, so that row is its
/// version at `rev`; every other key that existed at `rev` was written after it, so it is
/// among the history rows with `rev' > rev`, and one seek finds its version at `rev`.
///
/// A page therefore costs the rows it returns plus the writes since `rev` (a kube
/// `continue` page reads at the revision of its first page, moments ago), and the count
/// costs one index count of the range as a read at the current revision does. `None` when
/// more than [`RECENT_ROWS`] history rows follow `rev`.
pub(crate) fn range_at_recent(
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
    let mut st = c.prepare_cached(live_range_sql(c, iv, true)?)?;
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
pub(crate) fn range_at_by_key(
    c: &Connection,
    iv: &Interval,
    rev: i64,
    limit: usize,
) -> R<(Vec<Kv>, i64)> {
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

/// Revision and compaction checks for a read at `rev` (0 = current).
pub(crate) fn check_rev(c: &Connection, rev: i64) -> R<(i64, i64)> {
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
pub(crate) fn range(c: &Connection, req: &RangeRequest, header_rev: i64) -> R<RangeResponse> {
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
        let (_, n) = range_keys(c, &iv, rev, current, 1, false)?;
        (Vec::new(), n)
    } else {
        // A keys-only answer still sorts by value when asked to.
        let with_values = !req.keys_only || target == SortTarget::Value;
        range_keys(c, &iv, rev, current, limit, with_values)?
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
