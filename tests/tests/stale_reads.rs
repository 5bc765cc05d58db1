//! A node that believes it still leads after it was replaced must not answer from its old
//! state (issue 14's class: a stale answer after a paused node resumes).
//!
//! The leader is paused (SIGSTOP) and cut off from the others (iptables) while they elect a
//! new leader and write a newer value; it is then resumed, still cut off, so for an election
//! timeout it still believes it leads. Requests sent to it while it was stopped (on connections opened
//! before) are served in that window: a linearizable Range, a read-only etcd Txn (a CAS whose
//! compare fails, or one with only reads), and a read-only SQL interactive transaction. Each
//! must fail or see the newer value. (A batch that changed no page used to be answered at
//! once from the leader's state: a deposed leader answered a failed CAS with the old value.)

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use raftsql_core::Value;
use raftsql_etcd::pb::etcdserverpb::{
    compare, request_op, response_op, Compare, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use raftsql_tests::harness;
use raftsql_tests::harness::net::Partition;
use raftsql_tests::harness::Cluster;

const T: Duration = Duration::from_secs(30);
/// Requests of each kind queued at the stopped leader.
const COPIES: usize = 4;

fn get(key: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: Bytes::from(key.to_string()),
            ..Default::default()
        })),
    }
}

#[test]
fn a_deposed_leader_does_not_answer_from_its_old_state() {
    let mut cl = Cluster::start_with_etcd(3, &[]);
    let old = cl.wait_leader(T);
    let others: Vec<u64> = (1..=3).filter(|i| *i != old).collect();
    let sql = cl.client_of(old);
    let sqls: Vec<_> = (0..COPIES).map(|_| cl.client_of(old)).collect();
    let (mut kv_old, mut kv_new) = cl.rt.block_on(async {
        let mut kv = harness::etcd::connect(cl.etcd_addr(old)).await;
        kv.put(PutRequest {
            key: Bytes::from_static(b"/k"),
            value: Bytes::from_static(b"v1"),
            ..Default::default()
        })
        .await
        .unwrap();
        sql.execute(
            "main",
            "CREATE TABLE r(k INTEGER PRIMARY KEY, v TEXT)",
            vec![],
        )
        .await
        .unwrap();
        sql.execute("main", "INSERT INTO r VALUES (1, 'v1')", vec![])
            .await
            .unwrap();
        for c in &sqls {
            // Connected now: the requests below then wait in the stopped node's buffers.
            c.query("main", "SELECT 1", vec![]).await.unwrap();
        }
        let other = harness::etcd::connect(cl.etcd_addr(others[0])).await;
        (kv, other)
    });
    cl.wait_converged(T);

    cl.pause(old);
    // Cut at once, so that nothing the others send from now on (votes, the new leader's
    // heartbeats) waits in its buffers to tell it on resuming.
    let ip = |id: u64| -> IpAddr { cl.addr(id).ip() };
    let cut = Partition::between(
        &[ip(old)],
        &others.iter().map(|i| ip(*i)).collect::<Vec<_>>(),
    )
    .expect("iptables partition");
    // The others elect a leader and write newer values.
    let new = harness::wait_for(T, "a new leader", || {
        others
            .iter()
            .copied()
            .find(|i| cl.status(*i, false).is_some_and(|s| s.role == "leader"))
    });
    cl.rt.block_on(async {
        kv_new
            .put(PutRequest {
                key: Bytes::from_static(b"/k"),
                value: Bytes::from_static(b"v2"),
                ..Default::default()
            })
            .await
            .unwrap();
        cl.client_of(new)
            .execute("main", "UPDATE r SET v = 'v2' WHERE k = 1", vec![])
            .await
            .unwrap();
    });

    // Requests to the stopped leader wait in its socket buffers.
    let failed_cas = TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Value as i32,
            key: Bytes::from_static(b"/k"),
            range_end: Bytes::new(),
            target_union: Some(compare::TargetUnion::Value(Bytes::from_static(b"v1"))),
        }],
        success: vec![get("/k")],
        failure: vec![get("/k")],
    };
    let (txns, ranges, txs) = cl.rt.block_on(async {
        let mut txns = Vec::new();
        let mut ranges = Vec::new();
        let mut txs = Vec::new();
        for sql in sqls {
            let mut kv = kv_old.clone();
            let req = failed_cas.clone();
            txns.push(tokio::spawn(async move { kv.txn(req).await }));
            let mut kv = kv_old.clone();
            ranges.push(tokio::spawn(async move {
                kv.range(RangeRequest {
                    key: Bytes::from_static(b"/k"),
                    ..Default::default()
                })
                .await
            }));
            txs.push(tokio::spawn(async move {
                let mut tx = sql.transaction("main", Duration::from_secs(5)).await?;
                let (rows, _) = tx.execute("SELECT v FROM r WHERE k = 1", vec![]).await?;
                tx.commit().await?;
                Ok::<_, raftsql_core::Error>(rows)
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        (txns, ranges, txs)
    });
    cl.resume(old);
    let mut answers = Vec::new();
    let mut stale = Vec::new();
    let wait = Duration::from_secs(20);
    cl.rt.block_on(async {
        for t in txns {
            match tokio::time::timeout(wait, t)
                .await
                .expect("the txn answers")
                .unwrap()
            {
                Ok(r) => {
                    let r = r.into_inner();
                    let seen = match r.responses.first().and_then(|x| x.response.as_ref()) {
                        Some(response_op::Response::ResponseRange(rr)) => {
                            rr.kvs.first().map(|kv| kv.value.clone())
                        }
                        _ => None,
                    };
                    let a = format!("txn: succeeded {} saw {seen:?}", r.succeeded);
                    if r.succeeded || seen.as_deref() != Some(&b"v2"[..]) {
                        stale.push(a.clone());
                    }
                    answers.push(a);
                }
                Err(e) => answers.push(format!("txn: {}", e.message())),
            }
        }
        for t in ranges {
            match tokio::time::timeout(wait, t)
                .await
                .expect("the range answers")
                .unwrap()
            {
                Ok(r) => {
                    let v = r.into_inner().kvs.first().map(|kv| kv.value.clone());
                    let a = format!("range: {v:?}");
                    if v.as_deref() != Some(&b"v2"[..]) {
                        stale.push(a.clone());
                    }
                    answers.push(a);
                }
                Err(e) => answers.push(format!("range: {}", e.message())),
            }
        }
        for t in txs {
            match tokio::time::timeout(wait, t)
                .await
                .expect("the tx answers")
                .unwrap()
            {
                Ok(rows) => {
                    let a = format!("sql tx: committed, saw {:?}", rows.rows);
                    if rows.rows != vec![vec![Value::Text("v2".into())]] {
                        stale.push(a.clone());
                    }
                    answers.push(a);
                }
                Err(e) => answers.push(format!("sql tx: {e}")),
            }
        }
    });
    println!("the deposed leader answered: {answers:#?}");
    assert!(
        stale.is_empty(),
        "stale answers from a deposed leader: {stale:#?}"
    );
    drop(cut);
    cl.wait_converged(T);
    let _ = &mut cl;
    let _ = &mut kv_old;
}
