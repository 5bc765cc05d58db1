//! Txn: the size and nesting limits checked in one pass, compares, and the chosen branch
//! run as one revision.

use std::collections::BTreeSet;

use rusqlite::Connection;

use super::*;
use crate::error::{EtcdError, R};
use crate::pb::etcdserverpb::{
    compare, request_op, response_op, Compare, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};

/// Most compares, and most operations per branch, at each level of a Txn (etcd's
/// `--max-txn-ops` default).
pub const MAX_TXN_OPS: usize = 128;

/// Most levels of nested Txns (raftsql's own bound; etcd has none, kube-apiserver uses 1).
pub const MAX_TXN_DEPTH: usize = 16;

/// Most compares and operations in one Txn over all its levels and branches (raftsql's own
/// bound on what one request may cost).
pub const MAX_TXN_TOTAL_OPS: usize = 1024;

pub(crate) fn compare_one(c: &Connection, t: &WriteTxn, cmp: &Compare) -> R<bool> {
    use compare::{CompareResult, CompareTarget, TargetUnion};
    let iv = Interval::new(&cmp.key, &cmp.range_end);
    let target = CompareTarget::try_from(cmp.target).unwrap_or(CompareTarget::Version);
    let with_values = target == CompareTarget::Value;
    let (kvs, _) = range_keys(c, &iv, t.read_rev(), t.read_rev(), 0, with_values)?;
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
pub(crate) fn check_txn(req: &TxnRequest) -> R<()> {
    let mut total = 0;
    check_txn_size(req, 1, &mut total)?;
    // Depth is bounded now, so the recursion below is too.
    branch_writes(&req.success)?;
    branch_writes(&req.failure)?;
    Ok(())
}

/// The size limits, walking every nested Txn once.
pub(crate) fn check_txn_size(t: &TxnRequest, depth: usize, total: &mut usize) -> R<()> {
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
pub(crate) fn branch_writes(ops: &[RequestOp]) -> R<(BTreeSet<Vec<u8>>, Vec<Interval>)> {
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

pub(crate) fn txn(c: &Connection, t: &mut WriteTxn, req: &TxnRequest) -> R<TxnResponse> {
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
pub(crate) fn range_in_txn(c: &Connection, t: &WriteTxn, req: &RangeRequest) -> R<RangeResponse> {
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
pub(crate) fn set_headers(resp: &mut TxnResponse, top: &ResponseHeader) {
    resp.header = Some(*top);
    fill_ops(resp, top.revision);
}

pub(crate) fn fill_ops(resp: &mut TxnResponse, revision: i64) {
    let h = ResponseHeader {
        revision,
        ..Default::default()
    };
    for r in &mut resp.responses {
        match &mut r.response {
            Some(response_op::Response::ResponseRange(x)) => x.header = Some(h),
            Some(response_op::Response::ResponsePut(x)) => x.header = Some(h),
            Some(response_op::Response::ResponseDeleteRange(x)) => x.header = Some(h),
            Some(response_op::Response::ResponseTxn(x)) => {
                x.header = Some(ResponseHeader::default());
                fill_ops(x, revision);
            }
            None => {}
        }
    }
}

/// etcd refuses requests larger than its `--max-request-bytes` (1.5 MiB by default).
pub(crate) fn check_size(req: &impl prost::Message) -> R<()> {
    if req.encoded_len() > crate::server::MAX_REQUEST_BYTES {
        return Err(EtcdError::RequestTooLarge);
    }
    Ok(())
}
