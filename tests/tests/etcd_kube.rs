//! kube-apiserver's etcd3 storage layer (k8s.io/apiserver/pkg/storage/etcd3, v1.20: store.go,
//! compact.go and the storagebackend health check), replayed call for call against a real etcd
//! (Debian's `etcd-server`) and a 3-node raftsql cluster: every request is sent to both (reads
//! also to a raftsql follower) and the answers must be identical, headers reduced to their
//! revision as in `etcd_diff.rs`.
//!
//! The requests are exactly the ones clientv3 builds for store.go:
//! - Create: `Txn(If(ModRevision(key) == 0).Then(OpPut(key, data)))` (no Else; the
//!   "else get" variant is checked too).
//! - GuaranteedUpdate: `Txn(If(ModRevision(key) == origState.rev).Then(OpPut).Else(OpGet))`,
//!   retried with the Else branch's object on conflict.
//! - Delete (conditionalDelete): `Txn(If(ModRevision(key) == rev).Then(OpDelete).Else(OpGet))`.
//! - Get: `Get(key)` (linearizable).
//! - List: `Get(key, WithRange(prefixEnd), WithLimit(limit), WithRev(rev))`, the next request
//!   of a page starting at `lastKey + "\x00"` pinned to the first answer's revision; continue
//!   tokens carry (key, revision); `resourceVersion` / `resourceVersionMatch` choose the
//!   revision.
//! - Count: `Get(prefix/, WithRange(prefixEnd), WithCountOnly())`.
//! - compactor: `Txn(If(Version("compact_rev_key") == t).Then(OpPut("compact_rev_key",
//!   rev)).Else(OpGet("compact_rev_key")))`, then `Compact(rev)`.
//! - health check: `Get("/registry/health")`.
//!
//! And what 1.31-1.34 add (k8s.io/apiserver v0.34): the current-revision probe of a
//! consistent list from cache, the cacher's watch with prev_kv and progress notify, a
//! progress request on it, the `etcd-readiness` check (`kube_1_3x_call_shapes_match_real_etcd`).

use std::fmt::Debug;
use std::time::Duration;

use bytes::Bytes;
use harness::etcd::{connect, strip_headers, RealEtcd};
use raftsql_etcd::pb::etcdserverpb::{
    compare, kv_client::KvClient, request_op, response_op, CompactionRequest, CompactionResponse,
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, TxnRequest,
    TxnResponse,
};
use raftsql_etcd::pb::mvccpb::KeyValue;
use raftsql_tests::harness;
use raftsql_tests::harness::Cluster;
use tonic::transport::Channel;
use tonic::{Code, Status};

const T: Duration = Duration::from_secs(30);

const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
const FUTURE: &str = "etcdserver: mvcc: required revision is a future revision";

// ---------------------------------------------------------------------------------------------
// A real etcd: tests/src/harness/etcd.rs.

/// An answer with what may legitimately differ removed.
fn show<M: Debug>(r: &Result<M, Status>) -> String {
    strip_headers(match r {
        Ok(m) => format!("{m:?}"),
        Err(st) => format!("ERROR {:?}: {}", st.code(), st.message()),
    })
}

/// Shortens a long answer for the failure message (values can be 200 KB).
fn clip(s: &str) -> String {
    if s.len() <= 3000 {
        s.to_string()
    } else {
        let mut cut = 1500;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut tail = s.len() - 1500;
        while !s.is_char_boundary(tail) {
            tail += 1;
        }
        format!("{} ...[{} bytes]... {}", &s[..cut], s.len(), &s[tail..])
    }
}

// ---------------------------------------------------------------------------------------------
// Both systems side by side.

/// Sends every request to the real etcd and to raftsql's leader (reads also to a follower),
/// records every differing answer, and hands etcd's answer back to drive the kube logic.
struct Diff {
    etcd: KvClient<Channel>,
    leader: KvClient<Channel>,
    follower: KvClient<Channel>,
    requests: usize,
    compared: usize,
    diffs: Vec<String>,
}

impl Diff {
    fn record(&mut self, step: &str, who: &str, req: &dyn Debug, a: &str, b: &str) {
        self.compared += 1;
        if a != b {
            self.diffs.push(format!(
                "[{step}] {who}: {}\n  etcd:    {}\n  raftsql: {}",
                clip(&format!("{req:?}")),
                clip(a),
                clip(b)
            ));
        }
    }

    async fn range(&mut self, step: &str, req: RangeRequest) -> Result<RangeResponse, Status> {
        self.requests += 1;
        let a = self.etcd.range(req.clone()).await.map(|r| r.into_inner());
        let b = self.leader.range(req.clone()).await.map(|r| r.into_inner());
        let c = self
            .follower
            .range(req.clone())
            .await
            .map(|r| r.into_inner());
        let sa = show(&a);
        self.record(step, "leader", &req, &sa, &show(&b));
        self.record(step, "follower", &req, &sa, &show(&c));
        a
    }

    async fn txn(&mut self, step: &str, req: TxnRequest) -> Result<TxnResponse, Status> {
        self.requests += 1;
        let a = self.etcd.txn(req.clone()).await.map(|r| r.into_inner());
        let b = self.leader.txn(req.clone()).await.map(|r| r.into_inner());
        self.record(step, "leader", &req, &show(&a), &show(&b));
        a
    }

    async fn compact(&mut self, step: &str, rev: i64) -> Result<CompactionResponse, Status> {
        self.requests += 1;
        let req = CompactionRequest {
            revision: rev,
            physical: false,
        };
        let a = self.etcd.compact(req).await.map(|r| r.into_inner());
        let b = self.leader.compact(req).await.map(|r| r.into_inner());
        self.record(step, "leader", &req, &show(&a), &show(&b));
        a
    }

    fn finish(self, test: &str) {
        eprintln!(
            "{test}: {} kube requests, {} answers compared with etcd, {} differ",
            self.requests,
            self.compared,
            self.diffs.len()
        );
        assert!(
            self.diffs.is_empty(),
            "{test}: {} of {} answers differ from etcd:\n{}",
            self.diffs.len(),
            self.compared,
            self.diffs.join("\n")
        );
    }
}

fn start() -> Option<(RealEtcd, Cluster, Diff)> {
    let etcd = RealEtcd::start()?;
    let c = Cluster::start_with_etcd(3, &[]);
    let leader = c.wait_leader(T);
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let (e, l, f) = c.rt.block_on(async {
        (
            connect(etcd.addr).await,
            connect(c.etcd_addr(leader)).await,
            connect(c.etcd_addr(follower)).await,
        )
    });
    Some((
        etcd,
        c,
        Diff {
            etcd: e,
            leader: l,
            follower: f,
            requests: 0,
            compared: 0,
            diffs: Vec::new(),
        },
    ))
}

fn expect_err<M: Debug>(what: &str, r: &Result<M, Status>, code: Code, msg: &str) {
    match r {
        Err(st) => assert!(
            st.code() == code && st.message() == msg,
            "{what}: etcd answered {:?} {:?}, expected {code:?} {msg:?}",
            st.code(),
            st.message()
        ),
        Ok(m) => panic!("{what}: etcd answered {m:?}, expected {code:?} {msg:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Keys and values as kube-apiserver writes them.

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// clientv3.GetPrefixRangeEnd.
fn prefix_end(p: &[u8]) -> Bytes {
    let mut end = p.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            *end.last_mut().unwrap() += 1;
            return Bytes::from(end);
        }
        end.pop();
    }
    Bytes::from_static(b"\0")
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field.
fn ld(field: u64, data: &[u8], out: &mut Vec<u8>) {
    varint((field << 3) | 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// A kube protobuf object as stored: "k8s\0" + runtime.Unknown{TypeMeta, raw}, the raw object
/// with ObjectMeta (name, namespace, a binary uid, generation) and a binary spec of `pad`
/// bytes (every byte value, so the value is not UTF-8).
fn kube_value(kind: &str, ns: &str, name: &str, generation: u64, pad: usize) -> Bytes {
    let mut type_meta = Vec::new();
    ld(1, b"v1", &mut type_meta);
    ld(2, kind.as_bytes(), &mut type_meta);
    let mut meta = Vec::new();
    ld(1, name.as_bytes(), &mut meta);
    ld(3, ns.as_bytes(), &mut meta);
    let uid: Vec<u8> = name
        .bytes()
        .chain(ns.bytes())
        .enumerate()
        .map(|(i, c)| c.wrapping_mul(31).wrapping_add(i as u8) ^ 0xa5)
        .chain([0u8, 0xff, 0x80, 0x00])
        .collect();
    ld(5, &uid, &mut meta);
    varint(7 << 3, &mut meta);
    varint(generation, &mut meta);
    let spec: Vec<u8> = (0..pad)
        .map(|i| (i as u64 * 7 + generation) as u8)
        .collect();
    let mut raw = Vec::new();
    ld(1, &meta, &mut raw);
    ld(2, &spec, &mut raw);
    let mut v = b"k8s\x00".to_vec();
    ld(1, &type_meta, &mut v);
    ld(2, &raw, &mut v);
    ld(3, b"", &mut v);
    ld(4, b"", &mut v);
    Bytes::from(v)
}

fn pod_key(ns: &str, name: &str) -> String {
    format!("/registry/pods/{ns}/{name}")
}

fn pod(ns: &str, name: &str, generation: u64) -> Bytes {
    kube_value("Pod", ns, name, generation, 300)
}

// ---------------------------------------------------------------------------------------------
// The requests of store.go / compact.go, as clientv3 encodes them.

fn cmp_mod(key: &str, rev: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Mod as i32,
        key: b(key),
        range_end: Bytes::new(),
        target_union: Some(compare::TargetUnion::ModRevision(rev)),
    }
}

fn op_put(key: &str, value: Bytes) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: b(key),
            value,
            ..Default::default()
        })),
    }
}

fn op_get(key: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(get(key))),
    }
}

fn op_delete(key: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: b(key),
                ..Default::default()
            },
        )),
    }
}

/// store.Create.
fn create_txn(key: &str, value: Bytes) -> TxnRequest {
    TxnRequest {
        compare: vec![cmp_mod(key, 0)],
        success: vec![op_put(key, value)],
        failure: vec![],
    }
}

/// Create with an Else(OpGet) (the form some storage layers use to learn the existing object).
fn create_or_get_txn(key: &str, value: Bytes) -> TxnRequest {
    TxnRequest {
        failure: vec![op_get(key)],
        ..create_txn(key, value)
    }
}

/// store.GuaranteedUpdate's write.
fn update_txn(key: &str, rev: i64, value: Bytes) -> TxnRequest {
    TxnRequest {
        compare: vec![cmp_mod(key, rev)],
        success: vec![op_put(key, value)],
        failure: vec![op_get(key)],
    }
}

/// store.conditionalDelete's write.
fn delete_txn(key: &str, rev: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![cmp_mod(key, rev)],
        success: vec![op_delete(key)],
        failure: vec![op_get(key)],
    }
}

const COMPACT_REV_KEY: &str = "compact_rev_key";

/// compact.go's compare-and-swap of `compact_rev_key`.
fn compact_txn(t: i64, rev: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Version as i32,
            key: b(COMPACT_REV_KEY),
            range_end: Bytes::new(),
            target_union: Some(compare::TargetUnion::Version(t)),
        }],
        success: vec![op_put(COMPACT_REV_KEY, b(&rev.to_string()))],
        failure: vec![op_get(COMPACT_REV_KEY)],
    }
}

/// store.Get / the health check.
fn get(key: &str) -> RangeRequest {
    RangeRequest {
        key: b(key),
        ..Default::default()
    }
}

/// store.Count: a count-only range over `prefix/`.
fn count_req(prefix: &str) -> RangeRequest {
    let mut p = prefix.to_string();
    if !p.ends_with('/') {
        p.push('/');
    }
    RangeRequest {
        range_end: prefix_end(p.as_bytes()),
        key: b(&p),
        count_only: true,
        ..Default::default()
    }
}

fn range_kv(resp: &TxnResponse, i: usize) -> Option<KeyValue> {
    match &resp.responses.get(i)?.response {
        Some(response_op::Response::ResponseRange(r)) => r.kvs.first().cloned(),
        _ => None,
    }
}

fn rev_of(h: &Option<raftsql_etcd::pb::etcdserverpb::ResponseHeader>) -> i64 {
    h.as_ref().expect("header").revision
}

// ---------------------------------------------------------------------------------------------
// The storage calls, driving both systems.

/// resourceVersionMatch of a list.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Match {
    /// No match given (the legacy behaviour).
    Legacy,
    Exact,
    NotOlderThan,
}

/// What store.List returns.
#[derive(Debug)]
struct ListResult {
    items: Vec<KeyValue>,
    /// The list's resourceVersion.
    rv: i64,
    /// The continue token (next key, revision).
    cont: Option<(Bytes, i64)>,
    remaining: Option<i64>,
}

impl Diff {
    async fn create(&mut self, step: &str, key: &str, value: Bytes) -> TxnResponse {
        self.txn(step, create_txn(key, value)).await.expect(step)
    }

    async fn get_kv(&mut self, step: &str, key: &str) -> Option<KeyValue> {
        let r = self.range(step, get(key)).await.expect(step);
        r.kvs.first().cloned()
    }

    /// store.GuaranteedUpdate: from `cached` (the watch cache's object; None = read it first)
    /// put `next(current)` until the compare holds. Returns the new revision and the number of
    /// Txn attempts.
    async fn guaranteed_update(
        &mut self,
        step: &str,
        key: &str,
        cached: Option<KeyValue>,
        ignore_not_found: bool,
        next: impl Fn(Option<&KeyValue>) -> Bytes,
    ) -> (i64, usize) {
        let mut state = match cached {
            Some(kv) => Some(kv),
            None => self.get_kv(&format!("{step}: get"), key).await,
        };
        assert!(
            state.is_some() || ignore_not_found,
            "{step}: {key} not found"
        );
        for attempt in 1..=5 {
            let rev = state.as_ref().map_or(0, |kv| kv.mod_revision);
            let r = self
                .txn(
                    &format!("{step}: txn #{attempt}"),
                    update_txn(key, rev, next(state.as_ref())),
                )
                .await
                .expect(step);
            if r.succeeded {
                return (rev_of(&r.header), attempt);
            }
            state = range_kv(&r, 0);
            assert!(state.is_some() || ignore_not_found, "{step}: deleted");
        }
        panic!("{step}: no success in 5 attempts");
    }

    /// store.Delete (conditionalDelete) from `cached`; Ok(revision) or Err(()) for NotFound.
    async fn delete(&mut self, step: &str, key: &str, cached: Option<KeyValue>) -> Result<i64, ()> {
        let mut state = match cached {
            Some(kv) => kv,
            None => self.get_kv(&format!("{step}: get"), key).await.ok_or(())?,
        };
        for attempt in 1..=5 {
            let r = self
                .txn(
                    &format!("{step}: txn #{attempt}"),
                    delete_txn(key, state.mod_revision),
                )
                .await
                .expect(step);
            if r.succeeded {
                return Ok(rev_of(&r.header));
            }
            state = range_kv(&r, 0).ok_or(())?;
        }
        panic!("{step}: no success in 5 attempts");
    }

    /// store.List (v1.20) of a recursive key: `limit` (0 = no paging), `rv` and `m` (the
    /// request's resourceVersion and resourceVersionMatch), `cont` (a continue token), `pred`
    /// (the selector; kube filters after reading, so one call may issue several ranges).
    async fn list(
        &mut self,
        step: &str,
        prefix: &str,
        limit: i64,
        rv: Option<i64>,
        m: Match,
        cont: Option<(Bytes, i64)>,
        pred: Option<&dyn Fn(&KeyValue) -> bool>,
    ) -> Result<ListResult, Status> {
        let mut key_prefix = prefix.to_string();
        if !key_prefix.ends_with('/') {
            key_prefix.push('/');
        }
        let range_end = prefix_end(key_prefix.as_bytes());
        let paging = limit > 0;
        let mut key = b(&key_prefix);
        let (mut with_rev, mut returned_rv) = (0i64, 0i64);
        if let Some((k, crv)) = cont {
            key = k;
            if crv > 0 {
                with_rev = crv;
                returned_rv = crv;
            }
        } else if let Some(rv) = rv {
            match m {
                Match::Exact => {
                    with_rev = rv;
                    returned_rv = rv;
                }
                Match::Legacy if paging && rv > 0 => {
                    with_rev = rv;
                    returned_rv = rv;
                }
                _ => {}
            }
        }
        let mut items = Vec::new();
        let mut last_key = Bytes::new();
        let mut has_more;
        let mut n = 0;
        let mut last_count;
        loop {
            n += 1;
            let req = RangeRequest {
                key: key.clone(),
                range_end: range_end.clone(),
                limit: if paging { limit } else { 0 },
                revision: with_rev,
                ..Default::default()
            };
            let resp = self.range(&format!("{step}: range #{n}"), req).await?;
            let header_rev = rev_of(&resp.header);
            if m == Match::NotOlderThan {
                // validateMinimumResourceVersion: "Too large resource version".
                assert!(header_rev >= rv.unwrap_or(0), "{step}: too large rv");
            }
            has_more = resp.more;
            last_count = resp.count;
            assert!(
                !(resp.kvs.is_empty() && resp.more),
                "{step}: no results but more"
            );
            for kv in &resp.kvs {
                if paging && items.len() as i64 >= limit {
                    has_more = true;
                    break;
                }
                last_key = kv.key.clone();
                if pred.is_none_or(|p| p(kv)) {
                    items.push(kv.clone());
                }
            }
            if returned_rv == 0 {
                returned_rv = header_rev;
            }
            if !has_more || !paging || items.len() as i64 >= limit {
                break;
            }
            let mut k = last_key.to_vec();
            k.push(0);
            key = Bytes::from(k);
            if with_rev == 0 {
                with_rev = returned_rv;
            }
        }
        let cont = has_more.then(|| {
            let mut k = last_key.to_vec();
            k.push(0);
            (Bytes::from(k), returned_rv)
        });
        let remaining = (has_more && pred.is_none()).then(|| last_count - limit);
        Ok(ListResult {
            items,
            rv: returned_rv,
            cont,
            remaining,
        })
    }

    /// A client paging through a whole list with continue tokens; between pages `between` is
    /// run (writes that the pinned pages must not see). Returns the items and the list's rv.
    async fn list_all(
        &mut self,
        step: &str,
        prefix: &str,
        limit: i64,
        pred: Option<&dyn Fn(&KeyValue) -> bool>,
        mut between: impl FnMut(usize) -> Vec<TxnRequest>,
    ) -> (Vec<KeyValue>, i64, usize) {
        let mut all = Vec::new();
        let mut cont = None;
        let mut pages = 0;
        let mut rv = 0;
        loop {
            pages += 1;
            let page = self
                .list(
                    &format!("{step}: page {pages}"),
                    prefix,
                    limit,
                    None,
                    Match::Legacy,
                    cont.clone(),
                    pred,
                )
                .await
                .expect(step);
            assert!(page.items.len() as i64 <= limit, "{step}: page too long");
            if pages == 1 {
                rv = page.rv;
            } else {
                assert_eq!(page.rv, rv, "{step}: every page at the first page's rv");
            }
            all.extend(page.items);
            match page.cont {
                Some(c) => {
                    if let Some(rem) = page.remaining {
                        assert!(rem > 0, "{step}: remainingItemCount {rem}");
                    }
                    cont = Some(c)
                }
                None => break,
            }
            for (i, t) in between(pages).into_iter().enumerate() {
                self.txn(&format!("{step}: write {i} after page {pages}"), t)
                    .await
                    .expect(step);
            }
        }
        (all, rv, pages)
    }
}

fn keys(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// Create, Get, GuaranteedUpdate (fresh, cached, stale cache, racing apiservers, create through
/// update), conditional Delete (fresh, stale, already gone), re-create, large and binary
/// values, the health check.
#[test]
fn kube_object_lifecycle_matches_real_etcd() {
    let Some((_etcd, c, mut d)) = start() else {
        return;
    };
    c.rt.block_on(async {
        // The health check on an empty store, then kube's bootstrap objects.
        let h = d
            .range("health (empty store)", get("/registry/health"))
            .await
            .unwrap();
        assert!(h.kvs.is_empty());
        let ns_default = "/registry/namespaces/default";
        d.create(
            "create namespace",
            ns_default,
            kube_value("Namespace", "", "default", 1, 40),
        )
        .await;
        let svc = "/registry/services/specs/default/kubernetes";
        d.create(
            "create service",
            svc,
            kube_value("Service", "default", "kubernetes", 1, 120),
        )
        .await;

        // Create; create again (AlreadyExists); the else-get variant.
        let k0 = pod_key("default", "name-0");
        let r = d
            .create("create name-0", &k0, pod("default", "name-0", 1))
            .await;
        assert!(r.succeeded);
        let r = d
            .create("create name-0 again", &k0, pod("default", "name-0", 9))
            .await;
        assert!(!r.succeeded && r.responses.is_empty());
        let r = d
            .txn(
                "create-or-get name-0",
                create_or_get_txn(&k0, pod("default", "name-0", 9)),
            )
            .await
            .unwrap();
        assert!(!r.succeeded && range_kv(&r, 0).is_some());

        // Get.
        let kv0 = d.get_kv("get name-0", &k0).await.expect("name-0");
        assert_eq!(kv0.version, 1);
        assert!(d
            .get_kv("get missing", &pod_key("default", "nope"))
            .await
            .is_none());

        // GuaranteedUpdate from a fresh read, then from the (current) cached object.
        let (rev, attempts) = d
            .guaranteed_update("update name-0 (fresh get)", &k0, None, false, |_| {
                pod("default", "name-0", 2)
            })
            .await;
        assert_eq!(attempts, 1);
        let kv0 = d.get_kv("get name-0 after update", &k0).await.unwrap();
        assert_eq!((kv0.mod_revision, kv0.version), (rev, 2));
        let (_, attempts) = d
            .guaranteed_update(
                "update name-0 (cached)",
                &k0,
                Some(kv0.clone()),
                false,
                |_| pod("default", "name-0", 3),
            )
            .await;
        assert_eq!(attempts, 1);

        // A stale cache: the first Txn fails, its Else returns the current object, the retry wins.
        let (_, attempts) = d
            .guaranteed_update(
                "update name-0 (stale cache)",
                &k0,
                Some(kv0.clone()),
                false,
                |cur| {
                    pod(
                        "default",
                        "name-0",
                        cur.map_or(0, |kv| kv.version as u64) + 1,
                    )
                },
            )
            .await;
        assert_eq!(attempts, 2);

        // Two apiservers racing on one object (both read the same revision).
        let k1 = pod_key("default", "name-1");
        d.create("create name-1", &k1, pod("default", "name-1", 1))
            .await;
        let a = d.get_kv("apiserver A gets name-1", &k1).await.unwrap();
        let bb = d.get_kv("apiserver B gets name-1", &k1).await.unwrap();
        let (_, n) = d
            .guaranteed_update("A updates name-1", &k1, Some(a), false, |_| {
                pod("default", "name-1", 2)
            })
            .await;
        assert_eq!(n, 1);
        let (_, n) = d
            .guaranteed_update("B updates name-1 (conflict)", &k1, Some(bb), false, |_| {
                pod("default", "name-1", 3)
            })
            .await;
        assert_eq!(n, 2);
        // The conflict answer alone, with a revision that never was the key's.
        let r = d
            .txn(
                "update name-1 at a wrong revision",
                update_txn(&k1, 1, pod("default", "name-1", 4)),
            )
            .await
            .unwrap();
        assert!(!r.succeeded);

        // GuaranteedUpdate with ignoreNotFound on a missing key creates it (compare mod == 0).
        let ep = "/registry/services/endpoints/default/kubernetes";
        let (_, n) = d
            .guaranteed_update(
                "update missing endpoints (ignoreNotFound)",
                ep,
                None,
                true,
                |_| kube_value("Endpoints", "default", "kubernetes", 1, 80),
            )
            .await;
        assert_eq!(n, 1);

        // Many objects, each updated twice.
        for i in 2..22 {
            let k = pod_key("default", &format!("name-{i}"));
            d.create(
                &format!("create name-{i}"),
                &k,
                pod("default", &format!("name-{i}"), 1),
            )
            .await;
        }
        for round in 2..4u64 {
            for i in 2..22 {
                let k = pod_key("default", &format!("name-{i}"));
                let name = format!("name-{i}");
                d.guaranteed_update(
                    &format!("update {name} round {round}"),
                    &k,
                    None,
                    false,
                    |_| pod("default", &name, round),
                )
                .await;
            }
        }

        // Delete from a fresh read; from a stale cache (conflict, retry); already gone.
        let k2 = pod_key("default", "name-2");
        d.delete("delete name-2", &k2, None).await.expect("deleted");
        assert!(d.get_kv("get deleted name-2", &k2).await.is_none());
        let k3 = pod_key("default", "name-3");
        let stale = d.get_kv("get name-3", &k3).await.unwrap();
        d.guaranteed_update("update name-3", &k3, None, false, |_| {
            pod("default", "name-3", 7)
        })
        .await;
        d.delete("delete name-3 (stale cache)", &k3, Some(stale.clone()))
            .await
            .expect("deleted");
        assert!(d
            .delete("delete name-3 again", &k3, Some(stale))
            .await
            .is_err());
        let r = d
            .txn(
                "delete missing name-99",
                delete_txn(&pod_key("default", "name-99"), 5),
            )
            .await
            .unwrap();
        assert!(!r.succeeded && range_kv(&r, 0).is_none());

        // Re-create a deleted object: new create_revision, version 1.
        let r = d
            .create("re-create name-2", &k2, pod("default", "name-2", 1))
            .await;
        assert!(r.succeeded);
        let kv = d.get_kv("get re-created name-2", &k2).await.unwrap();
        assert_eq!(kv.version, 1);
        assert_eq!(kv.create_revision, kv.mod_revision);

        // A 200 KB ConfigMap and a value of every byte value.
        let big = "/registry/configmaps/kube-system/big";
        d.create(
            "create 200 KB configmap",
            big,
            kube_value("ConfigMap", "kube-system", "big", 1, 200_000),
        )
        .await;
        d.get_kv("get 200 KB configmap", big).await.unwrap();
        d.guaranteed_update("update 200 KB configmap", big, None, false, |_| {
            kube_value("ConfigMap", "kube-system", "big", 2, 210_000)
        })
        .await;
        let every: Bytes = (0..=255u8).cycle().take(1024).collect::<Vec<u8>>().into();
        let sec = "/registry/secrets/default/every-byte";
        d.create("create secret with every byte value", sec, every.clone())
            .await;
        assert_eq!(d.get_kv("get secret", sec).await.unwrap().value, every);

        // The health check again (still no such key), and the objects at the end.
        d.range("health", get("/registry/health")).await.unwrap();
        d.range(
            "all pods",
            RangeRequest {
                range_end: prefix_end(b"/registry/pods/"),
                ..get("/registry/pods/")
            },
        )
        .await
        .unwrap();
    });
    d.finish("kube_object_lifecycle");
}

/// Lists: paging with continue tokens pinned to the first page's revision while objects change
/// between pages, selectors (several ranges per List call), namespace lists, resourceVersion
/// exact / not-older-than / legacy, a future resourceVersion, a single-object list, counts.
#[test]
fn kube_list_matches_real_etcd() {
    let Some((_etcd, c, mut d)) = start() else {
        return;
    };
    c.rt.block_on(async {
        for i in 0..30 {
            let name = format!("name-{i}");
            d.create(
                &format!("create {name}"),
                &pod_key("default", &name),
                pod("default", &name, 1),
            )
            .await;
        }
        for i in 0..12 {
            let name = format!("coredns-{i}");
            d.create(
                &format!("create {name}"),
                &pod_key("kube-system", &name),
                pod("kube-system", &name, 1),
            )
            .await;
        }
        for i in 0..5 {
            let k = format!("/registry/configmaps/default/cm-{i}");
            d.create(
                &format!("create cm-{i}"),
                &k,
                kube_value("ConfigMap", "default", &format!("cm-{i}"), 1, 64),
            )
            .await;
        }
        // Some history: updates and deletes.
        for i in [3, 7, 11] {
            let name = format!("name-{i}");
            d.guaranteed_update(
                &format!("update {name}"),
                &pod_key("default", &name),
                None,
                false,
                |_| pod("default", &name, 2),
            )
            .await;
        }
        d.delete("delete name-5", &pod_key("default", "name-5"), None)
            .await
            .unwrap();
        let rv_old = rev_of(
            &d.range("rv after setup", get("/registry/health"))
                .await
                .unwrap()
                .header,
        );

        // Count (object counting) of several resources.
        for p in [
            "/registry/pods",
            "/registry/pods/default",
            "/registry/configmaps",
            "/registry/nothing",
        ] {
            d.range(&format!("count {p}"), count_req(p)).await.unwrap();
        }
        assert_eq!(
            d.range("count pods", count_req("/registry/pods"))
                .await
                .unwrap()
                .count,
            41
        );

        // A full paging run while objects change between pages: every page is read at the first
        // page's revision, so the result is exactly the list at that revision.
        let mut gen = 10;
        let (items, rv, pages) = d
            .list_all(
                "list pods limit 10 with writes between pages",
                "/registry/pods",
                10,
                None,
                |page| {
                    gen += 1;
                    let later = pod_key("kube-system", &format!("coredns-{}", 11 - page));
                    vec![
                        create_txn(
                            &pod_key("default", &format!("late-{page}")),
                            pod("default", "late", gen),
                        ),
                        update_txn(&later, 0, pod("kube-system", "x", gen)), // conflict: answers the object
                        TxnRequest {
                            compare: vec![],
                            success: vec![op_delete(&later)],
                            failure: vec![],
                        },
                    ]
                },
            )
            .await;
        assert_eq!(pages, 5);
        assert_eq!(items.len(), 41);
        let snapshot = d
            .range(
                "list pods at the paging revision (one range)",
                RangeRequest {
                    range_end: prefix_end(b"/registry/pods/"),
                    revision: rv,
                    ..get("/registry/pods/")
                },
            )
            .await
            .unwrap();
        assert_eq!(keys(&items), keys(&snapshot.kvs));
        assert_eq!(items, snapshot.kvs);

        // Paging with a selector: kube keeps reading (key = last + "\0", same revision) until
        // the page is full.
        let even = |kv: &KeyValue| kv.key.last().is_some_and(|c| c % 2 == 0);
        let (items, _, pages) = d
            .list_all(
                "list pods limit 4, selector",
                "/registry/pods",
                4,
                Some(&even),
                |_| vec![],
            )
            .await;
        assert!(pages >= 3 && items.iter().all(even));

        // Namespace lists; limits at and around the number of items.
        for (p, limit) in [
            ("/registry/pods/kube-system", 5),
            ("/registry/pods/kube-system", 1),
            ("/registry/configmaps/default", 5),
            ("/registry/configmaps/default", 4),
            ("/registry/configmaps/default", 6),
            ("/registry/configmaps/kube-system", 5),
            ("/registry/nothing", 500),
        ] {
            d.list_all(
                &format!("list {p} limit {limit}"),
                p,
                limit,
                None,
                |_| vec![],
            )
            .await;
        }

        // resourceVersion: exact (with and without limit), legacy with limit (pinned), legacy
        // without limit and not-older-than (latest), "0".
        for (name, limit, rv, m) in [
            ("list rv exact", 0, Some(rv_old), Match::Exact),
            ("list rv exact limit 7", 7, Some(rv_old), Match::Exact),
            ("list rv legacy limit 7", 7, Some(rv_old), Match::Legacy),
            ("list rv legacy no limit", 0, Some(rv_old), Match::Legacy),
            (
                "list rv not older than",
                0,
                Some(rv_old),
                Match::NotOlderThan,
            ),
            (
                "list rv not older than limit 7",
                7,
                Some(rv_old),
                Match::NotOlderThan,
            ),
            ("list rv 0 limit 7", 7, Some(0), Match::Legacy),
            ("list no rv", 0, None, Match::Legacy),
        ] {
            let l = d
                .list(name, "/registry/pods/default", limit, rv, m, None, None)
                .await
                .expect(name);
            if m == Match::Exact || (m == Match::Legacy && limit > 0 && rv.unwrap_or(0) > 0) {
                assert_eq!(l.rv, rv_old, "{name}");
            }
            if let Some(cont) = l.cont {
                // The next page from the token.
                d.list(
                    &format!("{name}, page 2"),
                    "/registry/pods/default",
                    limit,
                    None,
                    Match::Legacy,
                    Some(cont),
                    None,
                )
                .await
                .expect(name);
            }
        }
        // A single object at a resourceVersion (GetToList) and a future resourceVersion.
        d.range(
            "get name-3 at rv",
            RangeRequest {
                revision: rv_old,
                ..get(&pod_key("default", "name-3"))
            },
        )
        .await
        .unwrap();
        d.range(
            "get name-5 (deleted) at rv",
            RangeRequest {
                revision: rv_old - 2,
                ..get(&pod_key("default", "name-5"))
            },
        )
        .await
        .unwrap();
        let now = rev_of(
            &d.range("current rv", get("/registry/health"))
                .await
                .unwrap()
                .header,
        );
        let r = d
            .list(
                "list at a future rv",
                "/registry/pods",
                0,
                Some(now + 10),
                Match::Exact,
                None,
                None,
            )
            .await;
        expect_err("future rv", &r, Code::OutOfRange, FUTURE);
        let r = d
            .list(
                "page at a future rv",
                "/registry/pods",
                5,
                None,
                Match::Legacy,
                Some((b("/registry/pods/"), now + 1)),
                None,
            )
            .await;
        expect_err("future rv page", &r, Code::OutOfRange, FUTURE);
        // Counts after all of it.
        d.range("count pods at the end", count_req("/registry/pods"))
            .await
            .unwrap();
        d.range(
            "count pods in kube-system at the end",
            count_req("/registry/pods/kube-system"),
        )
        .await
        .unwrap();
    });
    d.finish("kube_list");
}

/// The compactor: the first interval records `compact_rev_key` ("0", no compaction), a second
/// apiserver loses the compare-and-swap and adopts the version, the next interval compacts the
/// revision of the previous one; then reads, lists and continue tokens at compacted revisions
/// fail with etcd's exact error, the compaction boundary itself still reads, and compacting an
/// old or future revision fails as in etcd.
#[test]
fn kube_compactor_matches_real_etcd() {
    let Some((_etcd, c, mut d)) = start() else {
        return;
    };
    c.rt.block_on(async {
        for i in 0..20 {
            let name = format!("name-{i}");
            d.create(
                &format!("create {name}"),
                &pod_key("default", &name),
                pod("default", &name, 1),
            )
            .await;
        }
        // Compactor A, first interval: t = 0, rev = 0.
        let r = d
            .txn("compactor A interval 1", compact_txn(0, 0))
            .await
            .unwrap();
        assert!(r.succeeded);
        let (mut a_t, mut a_rev) = (1, rev_of(&r.header));
        // Compactor B (another apiserver), first interval: the CAS fails, B adopts the version.
        let r = d
            .txn("compactor B interval 1", compact_txn(0, 0))
            .await
            .unwrap();
        assert!(!r.succeeded);
        let kv = range_kv(&r, 0).expect("compact_rev_key");
        assert_eq!((kv.version, &kv.value[..]), (1, &b"0"[..]));
        let (mut b_t, mut b_rev) = (kv.version, rev_of(&r.header));

        // History between intervals.
        for round in 2..5u64 {
            for i in 0..20 {
                let name = format!("name-{i}");
                d.guaranteed_update(
                    &format!("update {name} round {round}"),
                    &pod_key("default", &name),
                    None,
                    false,
                    |_| pod("default", &name, round),
                )
                .await;
            }
        }
        let first_page = d
            .list(
                "list limit 5 before compaction",
                "/registry/pods",
                5,
                None,
                Match::Legacy,
                None,
                None,
            )
            .await
            .unwrap();
        let pinned = first_page.rv;
        let old_kv = d
            .get_kv(
                "get name-0 before compaction",
                &pod_key("default", "name-0"),
            )
            .await
            .unwrap();
        for i in 0..20 {
            let name = format!("name-{i}");
            d.guaranteed_update(
                &format!("update {name} round 5"),
                &pod_key("default", &name),
                None,
                false,
                |_| pod("default", &name, 5),
            )
            .await;
        }

        // Compactor A, interval 2: CAS t = 1 → put rev, then Compact(rev of interval 1).
        let r = d
            .txn("compactor A interval 2", compact_txn(a_t, a_rev))
            .await
            .unwrap();
        assert!(r.succeeded);
        let compacted = a_rev;
        d.compact("compact (A interval 2)", compacted)
            .await
            .unwrap();
        a_t += 1;
        a_rev = rev_of(&r.header);
        // Compactor B, interval 2: loses (version is 2 now).
        let r = d
            .txn("compactor B interval 2", compact_txn(b_t, b_rev))
            .await
            .unwrap();
        assert!(!r.succeeded);
        let kv = range_kv(&r, 0).unwrap();
        assert_eq!(kv.value, b(&compacted.to_string()));
        b_t = kv.version;
        b_rev = rev_of(&r.header);
        assert_eq!(b_t, a_t);

        // Reads below the compaction revision fail; at it they work.
        let r = d
            .range(
                "get below the compaction",
                RangeRequest {
                    revision: compacted - 1,
                    ..get(&pod_key("default", "name-0"))
                },
            )
            .await;
        expect_err("get below the compaction", &r, Code::OutOfRange, COMPACTED);
        d.range(
            "get at the compaction revision",
            RangeRequest {
                revision: compacted,
                ..get(&pod_key("default", "name-0"))
            },
        )
        .await
        .unwrap();
        let r = d
            .list(
                "list rv exact below the compaction",
                "/registry/pods",
                0,
                Some(2),
                Match::Exact,
                None,
                None,
            )
            .await;
        expect_err("list below the compaction", &r, Code::OutOfRange, COMPACTED);
        let r = d
            .range(
                "count-only below the compaction",
                RangeRequest {
                    revision: compacted - 1,
                    ..count_req("/registry/pods")
                },
            )
            .await;
        expect_err(
            "count below the compaction",
            &r,
            Code::OutOfRange,
            COMPACTED,
        );
        d.list(
            "list rv exact at the compaction",
            "/registry/pods",
            7,
            Some(compacted),
            Match::Exact,
            None,
            None,
        )
        .await
        .unwrap();
        // A kube GuaranteedUpdate with the watch cache's object from before the compaction:
        // the Txn compares mod revisions only, so it conflicts and retries as usual.
        d.guaranteed_update(
            "update name-0 from a pre-compaction cache",
            &pod_key("default", "name-0"),
            Some(old_kv),
            false,
            |_| pod("default", "name-0", 6),
        )
        .await;

        // Compactor A, interval 3, compacts past the pinned revision of the open list: the
        // continue token now fails (kube: 410 Gone, "continue parameter is too old").
        for i in 0..5 {
            let name = format!("new-{i}");
            d.create(
                &format!("create {name}"),
                &pod_key("default", &name),
                pod("default", &name, 1),
            )
            .await;
        }
        assert!(pinned <= a_rev);
        let r = d
            .txn("compactor A interval 3", compact_txn(a_t, a_rev))
            .await
            .unwrap();
        assert!(r.succeeded);
        d.compact("compact (A interval 3)", a_rev).await.unwrap();
        let cont = first_page.cont.clone().expect("more pages");
        if pinned < a_rev {
            let r = d
                .list(
                    "next page after compaction",
                    "/registry/pods",
                    5,
                    None,
                    Match::Legacy,
                    Some(cont),
                    None,
                )
                .await;
            expect_err("continue after compaction", &r, Code::OutOfRange, COMPACTED);
        }
        // Compacting again, lower, or in the future.
        let r = d.compact("compact the same revision again", a_rev).await;
        expect_err("compact again", &r, Code::OutOfRange, COMPACTED);
        let r = d.compact("compact a lower revision", compacted).await;
        expect_err("compact lower", &r, Code::OutOfRange, COMPACTED);
        let now = rev_of(
            &d.range("current rv", get("/registry/health"))
                .await
                .unwrap()
                .header,
        );
        let r = d.compact("compact a future revision", now + 100).await;
        expect_err("compact future", &r, Code::OutOfRange, FUTURE);
        // Compacting at the current revision is allowed, and the store keeps working.
        d.compact("compact at the current revision", now)
            .await
            .unwrap();
        d.range("get compact_rev_key", get(COMPACT_REV_KEY))
            .await
            .unwrap();
        d.list_all(
            "list all after compaction",
            "/registry/pods",
            6,
            None,
            |_| vec![],
        )
        .await;
        d.range("count after compaction", count_req("/registry/pods"))
            .await
            .unwrap();
        let r = d
            .txn("compactor B interval 3 (stale t)", compact_txn(b_t, b_rev))
            .await
            .unwrap();
        assert!(!r.succeeded);
        d.range("health after compaction", get("/registry/health"))
            .await
            .unwrap();
    });
    d.finish("kube_compactor");
}

/// The watch a 1.3x cacher opens (k8s.io/apiserver v0.34 storage/etcd3/watcher.go:380):
/// `Watch(prefix, WithRev(initialRev + 1), WithPrevKV(), WithProgressNotify())`, then
/// `RequestProgress` on it (watcher.go:264); returns the events (type, key, mod revision,
/// prev value) up to the progress notification and that notification's revision.
async fn cacher_watch(
    endpoint: String,
    prefix: &str,
    start: i64,
    writes: impl std::future::Future<Output = ()>,
) -> (Vec<String>, i64) {
    use raftsql_etcd::pb::etcdserverpb::{
        watch_client::WatchClient, watch_request, WatchCreateRequest, WatchProgressRequest,
        WatchRequest,
    };
    let mut w = WatchClient::connect(endpoint).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: b(prefix),
                range_end: prefix_end(prefix.as_bytes()),
                start_revision: start,
                prev_kv: true,
                progress_notify: true,
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut s = w
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let created = s.message().await.unwrap().unwrap();
    assert!(created.created, "{created:?}");
    writes.await;
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::ProgressRequest(
            WatchProgressRequest {},
        )),
    })
    .await
    .unwrap();
    let mut events = Vec::new();
    loop {
        let r = tokio::time::timeout(T, s.message())
            .await
            .expect("no progress notification")
            .unwrap()
            .unwrap();
        if r.events.is_empty() && !r.created {
            // The progress notification: every event at or below it came before it.
            let rev = r.header.unwrap().revision;
            return (events, rev);
        }
        for e in r.events {
            let kv = e.kv.unwrap_or_default();
            events.push(format!(
                "{} {} @{} prev={:?}",
                e.r#type,
                String::from_utf8_lossy(&kv.key),
                kv.mod_revision,
                e.prev_kv.map(|p| p.mod_revision)
            ));
        }
    }
}

/// The calls a 1.31-1.34 kube-apiserver adds to 1.20's (k8s.io/apiserver v0.34): the
/// current-revision probe of a consistent list from cache (`GetCurrentResourceVersion`,
/// store.go:690: a list of the resource prefix with limit 1), the cacher's watch with
/// prev_kv and progress notify from a revision, a progress request on it (what a consistent
/// list and WatchList's bookmark wait for), and the `etcd-readiness` check (etcd3.go:264:
/// `Get("/registry/health")`). Sent to both systems; with Debian's etcd 3.4 (before the
/// progress fix, etcd issue 15220) the notification is only checked on raftsql.
#[test]
fn kube_1_3x_call_shapes_match_real_etcd() {
    let Some((etcd, c, mut d)) = start() else {
        return;
    };
    let leader = c.wait_leader(T);
    c.rt.block_on(async {
        for i in 0..20 {
            let key = pod_key("ns", &format!("p{i}"));
            d.txn("create", create_txn(&key, pod("ns", &format!("p{i}"), 1)))
                .await
                .unwrap();
        }
        let probe = RangeRequest {
            key: b("/registry/pods/"),
            range_end: prefix_end(b"/registry/pods/"),
            limit: 1,
            ..Default::default()
        };
        let r = d
            .range("GetCurrentResourceVersion", probe.clone())
            .await
            .unwrap();
        let rv = rev_of(&r.header);
        assert!(r.more && r.kvs.len() == 1, "{r:?}");
        d.range("etcd-readiness", get("/registry/health"))
            .await
            .unwrap();
        // The cacher's watch from rv + 1, with writes while it runs, then a progress request.
        let mut results = Vec::new();
        for (who, ep) in [
            ("etcd", format!("http://{}", etcd.addr)),
            ("raftsql", format!("http://{}", c.etcd_addr(leader))),
        ] {
            let mut kv = if who == "etcd" {
                d.etcd.clone()
            } else {
                d.leader.clone()
            };
            let writes = async move {
                for i in 0..5 {
                    let key = pod_key("ns", &format!("p{i}"));
                    let cur = kv.range(get(&key)).await.unwrap().into_inner();
                    let rev = cur.kvs[0].mod_revision;
                    kv.txn(update_txn(&key, rev, pod("ns", &format!("p{i}"), 2)))
                        .await
                        .unwrap();
                }
            };
            let (events, progress) = cacher_watch(ep, "/registry/pods/", rv + 1, writes).await;
            results.push((who, events, progress));
        }
        let (_, etcd_events, _) = &results[0];
        let (_, raftsql_events, raftsql_progress) = &results[1];
        // Each system saw its own writes (same sequence, same revisions: both started from
        // the same history).
        assert_eq!(etcd_events.len(), 5, "{etcd_events:?}");
        assert_eq!(
            etcd_events, raftsql_events,
            "the cacher's watch differs from etcd's"
        );
        let last = rev_of(&d.range("after", probe).await.unwrap().header);
        assert_eq!(
            *raftsql_progress, last,
            "raftsql's progress notification is at the current revision"
        );
        eprintln!(
            "cacher watch from {}: {} events then progress at {raftsql_progress}",
            rv + 1,
            raftsql_events.len()
        );
    });
    d.finish("kube_1_3x_call_shapes_match_real_etcd");
}
