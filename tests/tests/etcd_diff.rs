//! Differential tests: the same etcd v3 operations against a real etcd (Debian's
//! `etcd-server`) and against a 3-node raftsql cluster must give the same answers:
//! revisions, key-values (create/mod revision, version, lease), counts, `more`, and errors
//! (gRPC code and message). Headers are compared by revision only (cluster and member ids and
//! raft terms differ by nature).

use std::time::Duration;

use bytes::Bytes;
use harness::etcd::{connect, normalize, strip_headers, RealEtcd};
use proptest::prelude::*;
use raftsql_etcd::pb::etcdserverpb::{
    compare, kv_client::KvClient, range_request, request_op, CompactionRequest, Compare,
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use raftsql_tests::harness;
use raftsql_tests::harness::Cluster;
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(30);

/// One operation of a test sequence.
#[derive(Clone, Debug)]
enum Op {
    Range(RangeRequest),
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(i64),
}

async fn run(c: &mut KvClient<Channel>, op: &Op) -> String {
    let r = match op.clone() {
        Op::Range(r) => c.range(r).await.map(|x| format!("{:?}", x.into_inner())),
        Op::Put(r) => c.put(r).await.map(|x| format!("{:?}", x.into_inner())),
        Op::Delete(r) => c
            .delete_range(r)
            .await
            .map(|x| format!("{:?}", x.into_inner())),
        Op::Txn(r) => c.txn(r).await.map(|x| format!("{:?}", x.into_inner())),
        Op::Compact(rev) => c
            .compact(CompactionRequest {
                revision: rev,
                physical: false,
            })
            .await
            .map(|x| format!("{:?}", x.into_inner())),
    };
    strip_headers(normalize(r))
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}
fn get(k: &str) -> RangeRequest {
    RangeRequest {
        key: b(k),
        ..Default::default()
    }
}
fn prefix(k: &str) -> RangeRequest {
    if k.is_empty() {
        return RangeRequest {
            key: b("\0"),
            range_end: b("\0"),
            ..Default::default()
        };
    }
    let mut end = k.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    RangeRequest {
        key: b(k),
        range_end: Bytes::from(end),
        ..Default::default()
    }
}
fn put(k: &str, v: &str) -> PutRequest {
    PutRequest {
        key: b(k),
        value: b(v),
        ..Default::default()
    }
}
fn cmp(
    k: &str,
    target: compare::CompareTarget,
    result: compare::CompareResult,
    u: compare::TargetUnion,
) -> Compare {
    Compare {
        key: b(k),
        target: target as i32,
        result: result as i32,
        target_union: Some(u),
        range_end: Bytes::new(),
    }
}
fn op_put(k: &str, v: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(put(k, v))),
    }
}
fn op_get(r: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(r)),
    }
}
fn op_del(k: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: b(k),
                ..Default::default()
            },
        )),
    }
}

/// The hand-written cases: each etcd rule we rely on, in one sequence.
fn hand_written() -> Vec<Op> {
    use compare::{CompareResult as R, CompareTarget as Tg, TargetUnion as U};
    use range_request::{SortOrder, SortTarget};
    let mut v = vec![
        Op::Range(get("a")),
        Op::Put(put("a", "1")),
        Op::Put(PutRequest {
            prev_kv: true,
            ..put("a", "2")
        }),
        Op::Put(put("b", "x")),
        Op::Put(put("c/1", "one")),
        Op::Put(put("c/2", "two")),
        Op::Put(put("c/3", "three")),
        Op::Range(get("a")),
        Op::Range(prefix("c/")),
        Op::Range(RangeRequest {
            limit: 2,
            ..prefix("c/")
        }),
        Op::Range(RangeRequest {
            count_only: true,
            ..prefix("c/")
        }),
        Op::Range(RangeRequest {
            keys_only: true,
            ..prefix("c/")
        }),
        Op::Range(RangeRequest {
            key: b("\0"),
            range_end: b("\0"),
            ..Default::default()
        }),
        Op::Range(RangeRequest {
            key: b("b"),
            range_end: b("\0"),
            ..Default::default()
        }),
        Op::Range(RangeRequest {
            revision: 3,
            ..prefix("")
        }),
        Op::Range(RangeRequest {
            revision: 2,
            ..get("a")
        }),
        Op::Range(RangeRequest {
            revision: 100,
            ..get("a")
        }),
        Op::Range(RangeRequest {
            sort_order: SortOrder::Descend as i32,
            ..prefix("c/")
        }),
        Op::Range(RangeRequest {
            sort_order: SortOrder::Descend as i32,
            sort_target: SortTarget::Value as i32,
            ..prefix("c/")
        }),
        Op::Range(RangeRequest {
            // Keys only, sorted by the values it does not return.
            keys_only: true,
            sort_order: SortOrder::Descend as i32,
            sort_target: SortTarget::Value as i32,
            ..prefix("c/")
        }),
        Op::Range(RangeRequest {
            sort_target: SortTarget::Mod as i32,
            limit: 1,
            ..prefix("c/")
        }),
        Op::Range(RangeRequest {
            min_mod_revision: 6,
            ..prefix("c/")
        }),
        Op::Range(RangeRequest {
            max_create_revision: 5,
            ..prefix("")
        }),
        // Put rules and errors.
        Op::Put(PutRequest {
            ignore_value: true,
            ..put("a", "")
        }),
        Op::Put(PutRequest {
            ignore_value: true,
            ..put("missing", "")
        }),
        Op::Put(PutRequest {
            lease: 12345,
            ..put("l", "v")
        }),
        Op::Put(put("", "v")),
        Op::Put(PutRequest {
            key: b("big"),
            value: Bytes::from(vec![7u8; 1_600_000]),
            ..Default::default()
        }),
        // Deletes.
        Op::Delete(DeleteRangeRequest {
            key: b("nothing"),
            ..Default::default()
        }),
        Op::Range(get("a")),
        Op::Delete(DeleteRangeRequest {
            key: b("c/1"),
            range_end: b("c/3"),
            prev_kv: true,
        }),
        Op::Range(prefix("c/")),
        Op::Put(put("c/1", "again")),
        Op::Range(prefix("c/")),
        // Txns: kube-apiserver's create (version == 0), update (mod_revision ==), delete.
        Op::Txn(TxnRequest {
            compare: vec![cmp("reg/x", Tg::Mod, R::Equal, U::ModRevision(0))],
            success: vec![op_put("reg/x", "v1")],
            failure: vec![op_get(get("reg/x"))],
        }),
        Op::Txn(TxnRequest {
            compare: vec![cmp("reg/x", Tg::Mod, R::Equal, U::ModRevision(0))],
            success: vec![op_put("reg/x", "v1")],
            failure: vec![op_get(get("reg/x"))],
        }),
        Op::Txn(TxnRequest {
            compare: vec![cmp("reg/x", Tg::Version, R::Equal, U::Version(1))],
            success: vec![op_put("reg/x", "v2"), op_get(get("reg/x"))],
            failure: vec![],
        }),
        Op::Txn(TxnRequest {
            compare: vec![
                cmp("reg/x", Tg::Value, R::Equal, U::Value(b("v2"))),
                cmp("nope", Tg::Create, R::Equal, U::CreateRevision(0)),
            ],
            success: vec![op_del("reg/x"), op_get(prefix("reg/"))],
            failure: vec![op_put("reg/y", "no")],
        }),
        Op::Txn(TxnRequest {
            compare: vec![cmp("nope", Tg::Value, R::NotEqual, U::Value(b("z")))],
            success: vec![op_put("s", "1")],
            failure: vec![op_put("f", "1")],
        }),
        Op::Txn(TxnRequest {
            compare: vec![
                cmp("b", Tg::Version, R::Greater, U::Version(0)),
                cmp("b", Tg::Value, R::Less, U::Value(b("y"))),
            ],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest {
                    compare: vec![cmp("a", Tg::Version, R::Less, U::Version(2))],
                    success: vec![op_put("n1", "x")],
                    failure: vec![op_put("n2", "y"), op_get(prefix("n"))],
                })),
            }],
            failure: vec![],
        }),
        Op::Txn(TxnRequest {
            compare: vec![],
            success: vec![op_get(get("a"))],
            failure: vec![],
        }),
        Op::Txn(TxnRequest {
            compare: vec![],
            success: vec![op_put("d", "1"), op_put("d", "2")],
            failure: vec![],
        }),
        Op::Txn(TxnRequest {
            compare: vec![],
            success: (0..129).map(|i| op_put(&format!("m{i}"), "x")).collect(),
            failure: vec![],
        }),
        // Compaction.
        Op::Compact(1000),
        Op::Compact(4),
        Op::Compact(4),
        Op::Compact(3),
        Op::Range(RangeRequest {
            revision: 3,
            ..get("a")
        }),
        Op::Range(RangeRequest {
            revision: 4,
            ..prefix("")
        }),
        Op::Range(prefix("")),
    ];
    v.push(Op::Range(RangeRequest {
        revision: 5,
        ..prefix("c/")
    }));
    v
}

fn start_both() -> Option<(RealEtcd, Cluster)> {
    let etcd = RealEtcd::start()?;
    let c = Cluster::start_with_etcd(3, &[]);
    Some((etcd, c))
}

fn clients(etcd: &RealEtcd, c: &Cluster) -> (KvClient<Channel>, KvClient<Channel>) {
    let leader = c.wait_leader(T);
    c.rt.block_on(async { (connect(etcd.addr).await, connect(c.etcd_addr(leader)).await) })
}

#[test]
fn hand_written_cases_match_real_etcd() {
    let Some((etcd, c)) = start_both() else {
        return;
    };
    let (mut e, mut r) = clients(&etcd, &c);
    c.rt.block_on(async {
        let mut diffs = Vec::new();
        for (i, op) in hand_written().iter().enumerate() {
            let (a, b) = (run(&mut e, op).await, run(&mut r, op).await);
            if a != b {
                diffs.push(format!("#{i} {op:?}\n  etcd:    {a}\n  raftsql: {b}"));
            }
        }
        assert!(
            diffs.is_empty(),
            "{} of {} answers differ:\n{}",
            diffs.len(),
            hand_written().len(),
            diffs.join("\n")
        );
    });
}

fn arb_key() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["k1", "k2", "k3", "k/a", "k/b", "k/c", "z"]).prop_map(String::from)
}

fn arb_op() -> impl Strategy<Value = Op> {
    use compare::{CompareResult as R, CompareTarget as Tg, TargetUnion as U};
    prop_oneof![
        (arb_key(), "[a-c]{0,3}", any::<bool>()).prop_map(|(k, v, p)| Op::Put(PutRequest {
            prev_kv: p,
            ..put(&k, &v)
        })),
        (arb_key(), any::<bool>(), 0i64..3, 0i64..4).prop_map(|(k, pfx, limit, back)| {
            let r = if pfx { prefix(&k[..1]) } else { get(&k) };
            Op::Range(RangeRequest {
                limit,
                revision: -back,
                ..r
            })
        }),
        (arb_key(), any::<bool>(), any::<bool>()).prop_map(|(k, pfx, p)| {
            let r = if pfx { prefix(&k[..1]) } else { get(&k) };
            Op::Delete(DeleteRangeRequest {
                key: r.key,
                range_end: r.range_end,
                prev_kv: p,
            })
        }),
        (arb_key(), 0i64..4, arb_key(), "[a-c]{0,2}", arb_key()).prop_map(
            |(ck, ver, pk, v, gk)| Op::Txn(TxnRequest {
                compare: vec![cmp(&ck, Tg::Version, R::Equal, U::Version(ver))],
                success: vec![op_put(&pk, &v), op_get(get(&gk))],
                failure: vec![op_get(prefix(&gk[..1]))],
            })
        ),
    ]
}

/// Random sequences (proptest) over a small key space, sent to both; revisions advance in
/// lockstep, so a relative `revision: -n` (n back from the current one) reads the same past
/// on both sides.
#[test]
fn random_sequences_match_real_etcd() {
    let Some((etcd, c)) = start_both() else {
        return;
    };
    let (e0, r0) = clients(&etcd, &c);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 32,
        ..ProptestConfig::default()
    });
    let ops_run = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&prop::collection::vec(arb_op(), 1..40), |ops| {
        let (mut e, mut r) = (e0.clone(), r0.clone());
        c.rt.block_on(async {
            for op in &ops {
                let mut op = op.clone();
                if let Op::Range(rr) = &mut op {
                    if rr.revision < 0 {
                        let now = e
                            .range(get("z"))
                            .await
                            .unwrap()
                            .into_inner()
                            .header
                            .unwrap()
                            .revision;
                        rr.revision = (now + rr.revision).max(0);
                    }
                }
                let (a, b) = (run(&mut e, &op).await, run(&mut r, &op).await);
                ops_run.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                prop_assert_eq!(a, b, "op {:?}", op);
            }
            Ok(())
        })
    });
    eprintln!(
        "random sequences: {} operations compared",
        ops_run.load(std::sync::atomic::Ordering::SeqCst)
    );
    result.unwrap();
}
