//! Leases, differentially against a real etcd: grant, duplicate grant, keys attached,
//! time-to-live with keys, the lease list, keep-alive, revoke (keys deleted at one revision),
//! unknown leases, and expiry (keys deleted by the leader). Remaining TTLs depend on timing
//! and are compared within a second; everything else exactly.

use std::time::Duration;

use bytes::Bytes;
use harness::etcd::{connect, strip_headers, RealEtcd};
use raftsql_etcd::pb::etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseLeasesRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest,
};
use raftsql_tests::harness;
use raftsql_tests::harness::Cluster;
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(30);

struct Side {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
}

async fn side(addr: std::net::SocketAddr) -> Side {
    let kv = connect(addr).await;
    let lease = LeaseClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Side { kv, lease }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn text<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> String {
    match r {
        Ok(x) => strip_headers(format!("{:?}", x.into_inner())),
        Err(s) => format!("ERROR {:?}: {}", s.code(), s.message()),
    }
}

/// Runs the scenario on one side; returns its transcript and the remaining TTLs seen.
async fn scenario(s: &mut Side) -> (Vec<String>, Vec<i64>) {
    let mut t = Vec::new();
    let mut ttls = Vec::new();
    t.push(text(
        s.lease
            .lease_grant(LeaseGrantRequest { ttl: 60, id: 1001 })
            .await,
    ));
    t.push(text(
        s.lease
            .lease_grant(LeaseGrantRequest { ttl: 60, id: 1001 })
            .await,
    ));
    t.push(text(
        s.lease
            .lease_grant(LeaseGrantRequest { ttl: 1, id: 1002 })
            .await,
    )); // below the minimum
    t.push(text(
        s.kv.put(PutRequest {
            key: b("/l/a"),
            value: b("1"),
            lease: 1001,
            ..Default::default()
        })
        .await,
    ));
    t.push(text(
        s.kv.put(PutRequest {
            key: b("/l/b"),
            value: b("2"),
            lease: 1001,
            ..Default::default()
        })
        .await,
    ));
    t.push(text(
        s.kv.put(PutRequest {
            key: b("/l/c"),
            value: b("3"),
            lease: 1002,
            ..Default::default()
        })
        .await,
    ));
    t.push(text(
        s.kv.put(PutRequest {
            key: b("/l/x"),
            value: b("x"),
            lease: 4242,
            ..Default::default()
        })
        .await,
    ));
    let ttl = s
        .lease
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: 1001,
            keys: true,
        })
        .await
        .unwrap()
        .into_inner();
    ttls.push(ttl.ttl);
    // etcd keeps a lease's keys in a Go map, so its order is unspecified: compare as sets.
    let mut keys = ttl.keys.clone();
    keys.sort();
    t.push(format!("ttl granted {} keys {:?}", ttl.granted_ttl, keys));
    t.push(text(
        s.lease
            .lease_time_to_live(LeaseTimeToLiveRequest {
                id: 7777,
                keys: false,
            })
            .await,
    ));
    let mut ids: Vec<i64> = s
        .lease
        .lease_leases(LeaseLeasesRequest {})
        .await
        .unwrap()
        .into_inner()
        .leases
        .iter()
        .map(|l| l.id)
        .collect();
    ids.sort();
    t.push(format!("leases {ids:?}"));
    // Keep-alive stream: one answer per request; an unknown lease answers TTL 0.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(LeaseKeepAliveRequest { id: 1001 }).await.unwrap();
    tx.send(LeaseKeepAliveRequest { id: 9999 }).await.unwrap();
    let mut ka = s
        .lease
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let r = ka.message().await.unwrap().unwrap();
        t.push(format!("keepalive id {} ttl {}", r.id, r.ttl));
    }
    drop(tx);
    t.push(text(
        s.lease.lease_revoke(LeaseRevokeRequest { id: 1001 }).await,
    ));
    t.push(text(
        s.lease.lease_revoke(LeaseRevokeRequest { id: 1001 }).await,
    ));
    t.push(text(
        s.kv.range(RangeRequest {
            key: b("/l/"),
            range_end: b("/l0"),
            ..Default::default()
        })
        .await,
    ));
    // Lease 1002 (TTL raised to the 2 s minimum) expires: its key goes.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    t.push(text(
        s.kv.range(RangeRequest {
            key: b("/l/"),
            range_end: b("/l0"),
            ..Default::default()
        })
        .await,
    ));
    (t, ttls)
}

#[test]
fn leases_match_real_etcd() {
    let Some(etcd) = RealEtcd::start() else {
        return;
    };
    let c = Cluster::start_with_etcd(3, &[]);
    let leader = c.wait_leader(T);
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    c.rt.block_on(async {
        let mut e = side(etcd.addr).await;
        // Through a follower: lease calls are forwarded to the leader.
        let mut r = side(c.etcd_addr(follower)).await;
        let ((te, ttl_e), (tr, ttl_r)) = tokio::join!(scenario(&mut e), scenario(&mut r));
        let mut diffs = String::new();
        for (i, (a, b)) in te.iter().zip(tr.iter()).enumerate() {
            if a != b {
                diffs += &format!("#{i}\n  etcd:    {a}\n  raftsql: {b}\n");
            }
        }
        assert!(diffs.is_empty(), "lease answers differ:\n{diffs}");
        for (a, b) in ttl_e.iter().zip(ttl_r.iter()) {
            assert!(
                (a - b).abs() <= 1,
                "remaining TTLs differ: etcd {a}, raftsql {b}"
            );
        }
    });
    c.wait_converged(T);
}
