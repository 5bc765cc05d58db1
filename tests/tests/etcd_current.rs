//! The etcd semantics a current kube-apiserver (1.31-1.34) relies on, on real processes
//! (issue 16): progress requests that wait for the watches' events, require-leader streams
//! canceled on a node cut off from the quorum, etcd's HTTP endpoints on the client port, and
//! MemberList with learners and client URLs.
//!
//! Debian's etcd 3.4.23 predates the progress fix (etcd issue 15220, in 3.4.31/3.5.13), so
//! these tests assert the fixed semantics directly instead of comparing with it.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use raftsql_etcd::pb::etcdserverpb::{
    cluster_client::ClusterClient, kv_client::KvClient, watch_client::WatchClient, watch_request,
    MemberListRequest, PutRequest, RangeRequest, WatchCreateRequest, WatchProgressRequest,
    WatchRequest, WatchResponse,
};
use raftsql_tests::harness;
use raftsql_tests::harness::net::Partition;
use raftsql_tests::harness::Cluster;
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(30);

fn create(prefix: &str, start: i64) -> WatchRequest {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: Bytes::copy_from_slice(prefix.as_bytes()),
                range_end: Bytes::from(end),
                start_revision: start,
                ..Default::default()
            },
        )),
    }
}

fn progress() -> WatchRequest {
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::ProgressRequest(
            WatchProgressRequest {},
        )),
    }
}

/// Opens a watch stream on `addr`, with clientv3's `WithRequireLeader` metadata if asked.
async fn open(
    addr: SocketAddr,
    require_leader: bool,
) -> (
    mpsc::Sender<WatchRequest>,
    tokio::task::JoinHandle<Result<tonic::Streaming<WatchResponse>, tonic::Status>>,
) {
    let mut w = WatchClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(64);
    let call = tokio::spawn(async move {
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if require_leader {
            req.metadata_mut()
                .insert("hasleader", "true".parse().unwrap());
        }
        w.watch(req).await.map(|r| r.into_inner())
    });
    (tx, call)
}

async fn put(kv: &mut KvClient<tonic::transport::Channel>, key: String, value: Vec<u8>) -> i64 {
    kv.put(PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .header
    .unwrap()
    .revision
}

/// kube-apiserver's consistent list from its watch cache trusts a progress notification at
/// revision R to mean "every event at or below R has reached you": the notification must
/// not overtake events a watch is still sending. Here a watch replays 3,000 events of 2 KiB
/// from revision 1 to a client that reads nothing for a while (its send queue and the HTTP/2
/// window fill), and a progress request is sent right behind the create. Before the fix the
/// notification came right after `created`, ahead of every event.
#[test]
fn a_progress_request_never_overtakes_a_watchs_events() {
    let c = Cluster::start_with_etcd(1, &[]);
    c.wait_leader(T);
    c.rt.block_on(async {
        let kv = harness::etcd::connect(c.etcd_addr(1)).await;
        const N: usize = 3000;
        let mut writers = Vec::new();
        for w in 0..16 {
            let mut kv = kv.clone();
            writers.push(tokio::spawn(async move {
                let mut last = 0;
                for i in (w..N).step_by(16) {
                    last = last.max(put(&mut kv, format!("/p/{i:05}"), vec![b'x'; 2048]).await);
                }
                last
            }));
        }
        let mut last_put = 0;
        for w in writers {
            last_put = last_put.max(w.await.unwrap());
        }
        let (tx, call) = open(c.etcd_addr(1), false).await;
        tx.send(create("/p/", 1)).await.unwrap();
        tx.send(progress()).await.unwrap();
        // The client lags: nothing is read for a second.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut rx = call.await.unwrap().unwrap();
        let mut events_before = 0usize;
        let progress_rev = loop {
            let r = tokio::time::timeout(T, rx.message())
                .await
                .expect("no progress notification")
                .unwrap()
                .expect("stream ended");
            if r.watch_id == -1 && !r.created && r.events.is_empty() {
                break r.header.unwrap().revision;
            }
            events_before += r.events.len();
        };
        assert!(
            progress_rev >= last_put,
            "progress at {progress_rev}, last put {last_put}"
        );
        assert_eq!(
            events_before, N,
            "the progress notification at revision {progress_rev} came after {events_before} \
             of the {N} events at or below it"
        );
        // With every watch caught up, a progress request is answered at the current revision.
        tx.send(progress()).await.unwrap();
        let r = tokio::time::timeout(T, rx.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((r.watch_id, r.header.unwrap().revision), (-1, last_put));
    });
}

/// The status a watch stream ends with, within `T`; any message before it is a failure.
async fn canceled(rx: &mut tonic::Streaming<WatchResponse>, what: &str) -> tonic::Status {
    match tokio::time::timeout(T, rx.message())
        .await
        .unwrap_or_else(|_| panic!("{what} was not canceled"))
    {
        Ok(Some(r)) => panic!("unexpected response while cut off: {r:?}"),
        Ok(None) => panic!("the stream ended without a status"),
        Err(s) => s,
    }
}

/// kube-apiserver opens its watches with `WithRequireLeader`: a member that loses its leader
/// must cancel them ("etcdserver: no leader") so the apiserver reconnects to one that has one,
/// instead of holding a silent watch on a partitioned follower. A watch without the metadata
/// stays open (etcd's behaviour); new require-leader calls are refused at once.
#[test]
fn a_require_leader_watch_is_canceled_on_a_node_cut_off() {
    if !Partition::usable_or_skip() {
        return;
    }
    let c = Cluster::start_with_etcd(3, &[]);
    let leader = c.wait_leader(T);
    let f = (1..=3).find(|i| *i != leader).unwrap();
    let others: Vec<IpAddr> = (1..=3)
        .filter(|i| *i != f)
        .map(|i| c.addr(i).ip())
        .collect();
    c.rt.block_on(async {
        let mut kv = harness::etcd::connect(c.etcd_addr(f)).await;
        let (tx, call) = open(c.etcd_addr(f), true).await;
        tx.send(create("/r/", 0)).await.unwrap();
        let (tx_plain, call_plain) = open(c.etcd_addr(f), false).await;
        tx_plain.send(create("/r/", 0)).await.unwrap();
        let mut rx = call
            .await
            .unwrap()
            .expect("a require-leader watch with a leader");
        let mut rx_plain = call_plain.await.unwrap().unwrap();
        assert!(rx.message().await.unwrap().unwrap().created);
        assert!(rx_plain.message().await.unwrap().unwrap().created);
        put(&mut kv, "/r/1".into(), b"v".to_vec()).await;
        assert_eq!(rx.message().await.unwrap().unwrap().events.len(), 1);
        assert_eq!(rx_plain.message().await.unwrap().unwrap().events.len(), 1);

        let cut = Partition::between(&[c.addr(f).ip()], &others).expect("iptables partition");
        let started = Instant::now();
        let status = canceled(&mut rx, "the require-leader watch").await;
        eprintln!(
            "require-leader watch canceled {:?} after the cut",
            started.elapsed()
        );
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "etcdserver: no leader");
        // The watch without the metadata is still open: a progress request is answered.
        tx_plain.send(progress()).await.unwrap();
        let r = tokio::time::timeout(T, rx_plain.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(r.watch_id, -1);
        // New require-leader calls are refused while there is no leader.
        let (tx2, call2) = open(c.etcd_addr(f), true).await;
        tx2.send(create("/r/", 0)).await.unwrap();
        let refused = call2.await.unwrap().expect_err("refused without a leader");
        assert_eq!(refused.message(), "etcdserver: no leader");
        let mut req = tonic::Request::new(RangeRequest {
            key: Bytes::from_static(b"/r/1"),
            serializable: true,
            ..Default::default()
        });
        req.metadata_mut()
            .insert("hasleader", "true".parse().unwrap());
        let refused = kv
            .range(req)
            .await
            .expect_err("unary refused without a leader");
        assert_eq!(refused.code(), tonic::Code::Unavailable);

        drop(cut);
        // Healed: a require-leader watch on the node works again.
        let deadline = Instant::now() + T;
        loop {
            let (tx3, call3) = open(c.etcd_addr(f), true).await;
            tx3.send(create("/r/", 0)).await.unwrap();
            if let Ok(Ok(mut rx3)) = call3.await {
                if rx3
                    .message()
                    .await
                    .is_ok_and(|r| r.is_some_and(|r| r.created))
                {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no require-leader watch after healing"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// `GET path` over HTTP/1.1: status and body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (status, body)
}

/// etcd's HTTP endpoints on the client port, as load balancers, kubeadm probes and
/// Prometheus use them; `/readyz` and `/health` fail on a node cut off from the quorum while
/// `/livez` (the process serves) stays up.
#[test]
fn the_http_endpoints_answer_and_readyz_fails_without_quorum() {
    let c = Cluster::start_with_etcd(3, &[]);
    let leader = c.wait_leader(T);
    let f = (1..=3).find(|i| *i != leader).unwrap();
    c.rt.block_on(async {
        let mut kv = harness::etcd::connect(c.etcd_addr(f)).await;
        put(&mut kv, "/h".into(), b"v".to_vec()).await;
        // A server stream that ends: counted with the code of its trailers.
        let mut s = kv
            .range_stream(RangeRequest {
                key: Bytes::from_static(b"/h"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        while s.message().await.unwrap().is_some() {}
    });
    let addr = c.etcd_addr(f);
    assert_eq!(
        http_get(addr, "/health"),
        (200, r#"{"health":"true","reason":""}"#.into())
    );
    assert_eq!(http_get(addr, "/livez"), (200, "ok\n".into()));
    assert_eq!(http_get(addr, "/readyz"), (200, "ok\n".into()));
    let (code, body) = http_get(addr, "/readyz?verbose");
    assert_eq!(code, 200);
    assert!(body.contains("[+]linearizable_read ok\n"), "{body}");
    let (code, body) = http_get(addr, "/version");
    assert_eq!(code, 200);
    assert!(body.starts_with(r#"{"etcdserver":"3.6."#), "{body}");
    assert_eq!(http_get(addr, "/nothing-here").0, 404);
    let (code, metrics) = http_get(addr, "/metrics");
    assert_eq!(code, 200);
    for line in [
        "etcd_server_has_leader 1",
        "etcd_server_is_leader 0",
        "etcd_server_leader_changes_seen_total 1",
        "raftsql_raft_role{role=\"follower\"} 1",
        r#"grpc_server_handled_total{grpc_code="OK",grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"} 1"#,
        r#"grpc_server_started_total{grpc_method="RangeStream",grpc_service="etcdserverpb.KV",grpc_type="server_stream"} 1"#,
        r#"grpc_server_handled_total{grpc_code="OK",grpc_method="RangeStream",grpc_service="etcdserverpb.KV",grpc_type="server_stream"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    for name in [
        "etcd_disk_wal_fsync_duration_seconds_bucket",
        "etcd_mvcc_db_total_size_in_bytes",
        "raftsql_apply_lag_entries",
        "raftsql_checkpoint_seconds_count",
    ] {
        assert!(metrics.contains(name), "no {name} in\n{metrics}");
    }
    let (_, leader_metrics) = http_get(c.etcd_addr(leader), "/metrics");
    assert!(leader_metrics
        .lines()
        .any(|l| l == "etcd_server_is_leader 1"));

    if !Partition::usable_or_skip() {
        return;
    }
    let others: Vec<IpAddr> = (1..=3)
        .filter(|i| *i != f)
        .map(|i| c.addr(i).ip())
        .collect();
    let _cut = Partition::between(&[c.addr(f).ip()], &others).expect("iptables partition");
    let deadline = Instant::now() + T;
    let body = loop {
        let (code, body) = http_get(addr, "/readyz");
        if code == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "/readyz still {code} {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(body.ends_with("readyz check failed\n"), "{body}");
    assert!(body.contains("[-]"), "{body}");
    let (code, body) = http_get(addr, "/health");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with(r#"{"health":"false","reason":""#),
        "{body}"
    );
    assert_eq!(http_get(addr, "/livez"), (200, "ok\n".into()));
    let (_, metrics) = http_get(addr, "/metrics");
    assert!(
        metrics.lines().any(|l| l == "etcd_server_has_leader 0"),
        "{metrics}"
    );
}

/// MemberList as clients that sync their endpoints from it need: every member's client URL,
/// and the standby reported as a learner.
#[test]
fn member_list_reports_learners_and_client_urls() {
    let c = Cluster::start_with_etcd(4, &[]);
    c.wait_leader(T);
    c.rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut cc = ClusterClient::connect(format!("http://{}", c.etcd_addr(1)))
                .await
                .unwrap();
            let m = cc
                .member_list(MemberListRequest::default())
                .await
                .unwrap()
                .into_inner();
            let learners = m.members.iter().filter(|m| m.is_learner).count();
            let urls_ok = m.members.iter().all(|m| {
                m.client_ur_ls == vec![format!("http://{}", c.etcd_addr(m.id))]
                    && m.peer_ur_ls == vec![format!("http://{}", c.addr(m.id))]
            });
            if m.members.len() == 4 && learners == 1 && urls_ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "MemberList never showed 3 voters, 1 learner and every client URL: {m:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// Concatenates a RangeStream's chunks into one RangeResponse (as etcd's clients merge them);
/// also returns how many chunks came, and checks that header/more/count come only last.
async fn range_stream(
    kv: &mut KvClient<tonic::transport::Channel>,
    req: RangeRequest,
) -> (raftsql_etcd::pb::etcdserverpb::RangeResponse, usize) {
    let mut s = kv.range_stream(req).await.unwrap().into_inner();
    let mut all = raftsql_etcd::pb::etcdserverpb::RangeResponse::default();
    let mut chunks = 0;
    let mut ended = false;
    while let Some(m) = s.message().await.unwrap() {
        assert!(!ended, "a chunk after the one with the header");
        let r = m.range_response.unwrap();
        chunks += 1;
        if r.header.is_some() {
            ended = true;
            all.header = r.header;
            all.more = r.more;
            all.count = r.count;
        } else {
            assert!(!r.more && r.count == 0, "more/count before the final chunk");
        }
        all.kvs.extend(r.kvs);
    }
    assert!(ended, "no final chunk with the header");
    (all, chunks)
}

/// KV.RangeStream (etcd 3.7) over 10,000 keys answers, in many chunks, exactly what Range
/// answers: the whole prefix, with a limit, at a past revision, serializable on a follower,
/// sorted (one chunk), count-only and a single key.
#[test]
fn a_range_stream_of_10k_keys_equals_the_range() {
    let c = Cluster::start_with_etcd(3, &[]);
    c.wait_leader(T);
    const N: usize = 10_000;
    let past = c.rt.block_on(async {
        let mut kv = harness::etcd::connect(c.etcd_addr(1)).await;
        let mut writers = Vec::new();
        for w in 0..16 {
            let mut kv = kv.clone();
            writers.push(tokio::spawn(async move {
                for i in (w..N).step_by(16) {
                    put(&mut kv, format!("/r/{i:05}"), format!("v{i}").into_bytes()).await;
                }
            }));
        }
        for w in writers {
            w.await.unwrap();
        }
        let past = put(&mut kv, "/r/00000".into(), b"changed".to_vec()).await - 1;
        put(&mut kv, "/s/after".into(), b"x".to_vec()).await;
        past
    });
    // Followers have applied everything (their serializable reads compare equal).
    c.wait_converged(T);
    c.rt.block_on(async {
        let prefix = |extra: fn(&mut RangeRequest)| {
            let mut r = RangeRequest {
                key: Bytes::from_static(b"/r/"),
                range_end: Bytes::from_static(b"/r0"),
                ..Default::default()
            };
            extra(&mut r);
            r
        };
        use raftsql_etcd::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
        let cases: Vec<(&str, RangeRequest)> = vec![
            ("whole prefix", prefix(|_| {})),
            ("limit 1234", prefix(|r| r.limit = 1234)),
            ("limit 500", prefix(|r| r.limit = 500)),
            ("at a past revision", prefix(|r| r.revision = 0)),
            ("keys only", prefix(|r| r.keys_only = true)),
            (
                "sorted by mod revision, descending",
                prefix(|r| {
                    r.sort_order = SortOrder::Descend as i32;
                    r.sort_target = SortTarget::Mod as i32;
                }),
            ),
            ("count only", prefix(|r| r.count_only = true)),
            (
                "one key",
                RangeRequest {
                    key: Bytes::from_static(b"/r/00042"),
                    ..Default::default()
                },
            ),
        ];
        for (what, mut req) in cases {
            if what == "at a past revision" {
                req.revision = past;
            }
            for node in [1u64, 2] {
                let mut kv = harness::etcd::connect(c.etcd_addr(node)).await;
                let mut req = req.clone();
                req.serializable = node == 2;
                let want = kv.range(req.clone()).await.unwrap().into_inner();
                let (got, chunks) = range_stream(&mut kv, req).await;
                assert_eq!(got.kvs.len(), want.kvs.len(), "{what} on node {node}");
                assert!(got.kvs == want.kvs, "{what} on node {node}: kvs differ");
                assert_eq!(
                    (got.more, got.count, got.header.as_ref().unwrap().revision),
                    (
                        want.more,
                        want.count,
                        want.header.as_ref().unwrap().revision
                    ),
                    "{what} on node {node}"
                );
                eprintln!(
                    "{what} on node {node}: {} kvs (count {}, more {}) in {chunks} chunks",
                    got.kvs.len(),
                    got.count,
                    got.more
                );
                if what == "whole prefix" {
                    assert_eq!(got.kvs.len(), N);
                    assert!(chunks >= N / 500, "{chunks} chunks");
                }
                if what == "at a past revision" {
                    assert_eq!(&got.kvs[0].value[..], b"v0");
                }
            }
        }
    });
}

/// The same on a standby (a Raft learner): cut off, it never campaigns and keeps its
/// leader's id, so "has a leader" must mean "heard from it within an election timeout".
/// Before, its require-leader watch stayed open for as long as the cut lasted.
#[test]
fn a_require_leader_watch_is_canceled_on_a_standby_cut_off() {
    if !Partition::usable_or_skip() {
        return;
    }
    let c = Cluster::start_with_etcd(4, &[]);
    c.wait_leader(T);
    // Four bootstrap voters: the keeper makes one of them a standby (3 voters are enough).
    let eps: String = (1..=4)
        .map(|i| c.addr(i).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let deadline = Instant::now() + T;
    let standby = loop {
        let (ok, out, _) =
            Cluster::run_cli(&["cluster", "show", "--format", "json", "--endpoints", &eps]);
        if ok {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let s: Vec<u64> = v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["role"] == "standby")
                .map(|n| n["id"].as_u64().unwrap())
                .collect();
            if s.len() == 1 {
                break s[0];
            }
        }
        assert!(
            Instant::now() < deadline,
            "no standby: {out}",
            out = out_or(&eps)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let others: Vec<IpAddr> = (1..=4)
        .filter(|i| *i != standby)
        .map(|i| c.addr(i).ip())
        .collect();
    c.rt.block_on(async {
        let (tx, call) = open(c.etcd_addr(standby), true).await;
        tx.send(create("/s/", 0)).await.unwrap();
        let mut rx = call
            .await
            .unwrap()
            .expect("a require-leader watch on the standby");
        assert!(rx.message().await.unwrap().unwrap().created);
        let cut = Partition::between(&[c.addr(standby).ip()], &others).expect("iptables partition");
        let started = Instant::now();
        let status = canceled(&mut rx, "the standby's require-leader watch").await;
        eprintln!(
            "standby {standby}: require-leader watch canceled {:?} after the cut",
            started.elapsed()
        );
        assert_eq!(status.message(), "etcdserver: no leader");
        drop(cut);
    });
}

fn out_or(eps: &str) -> String {
    Cluster::run_cli(&["cluster", "show", "--endpoints", eps]).1
}
