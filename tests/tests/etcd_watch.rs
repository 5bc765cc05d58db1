//! Watch, differentially: the same watches and writes against a real etcd and a 3-node
//! raftsql cluster give the same responses (created, events with kv and prev_kv, cancel,
//! compaction, progress), compared with headers reduced to their revision.

use std::time::Duration;

use bytes::Bytes;
use harness::etcd::{connect, strip_headers, RealEtcd};
use raftsql_etcd::pb::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_create_request::FilterType,
    watch_request, CompactionRequest, DeleteRangeRequest, PutRequest, WatchCancelRequest,
    WatchCreateRequest, WatchProgressRequest, WatchRequest,
};
use raftsql_tests::harness;
use raftsql_tests::harness::Cluster;
use tokio::sync::mpsc;
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(30);

/// One side: a KV client and a watch stream.
type Stream = tonic::Streaming<raftsql_etcd::pb::etcdserverpb::WatchResponse>;

struct Side {
    kv: KvClient<Channel>,
    tx: mpsc::Sender<WatchRequest>,
    /// The call resolves once the server sends its first response (grpc-go sends headers
    /// with it), so it runs in a task and the stream is taken on first use.
    call: Option<tokio::task::JoinHandle<Result<tonic::Response<Stream>, tonic::Status>>>,
    rx: Option<Stream>,
}

async fn side(addr: std::net::SocketAddr) -> Side {
    let kv = connect(addr).await;
    let mut w = WatchClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(64);
    let call = tokio::spawn(async move {
        w.watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    Side {
        kv,
        tx,
        call: Some(call),
        rx: None,
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn create(key: &str, end: &str, start: i64, prev_kv: bool, filters: Vec<i32>) -> WatchRequest {
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: b(key),
                range_end: b(end),
                start_revision: start,
                prev_kv,
                filters,
                ..Default::default()
            },
        )),
    }
}

/// Reads `n` responses from the stream (each normalized to text), failing after a timeout.
async fn take(s: &mut Side, n: usize) -> Vec<String> {
    if s.rx.is_none() {
        let call = s.call.take().unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("watch call stalled");
        s.rx = Some(resp.unwrap().unwrap().into_inner());
    }
    let rx = s.rx.as_mut().unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), rx.message()).await {
            Ok(Ok(Some(r))) => out.push(strip_headers(format!("{r:?}"))),
            other => panic!(
                "watch stream ended or stalled after {} of {n} responses: {other:?}",
                out.len()
            ),
        }
    }
    out
}

async fn put(s: &mut Side, k: &str, v: &str) {
    s.kv.put(PutRequest {
        key: b(k),
        value: b(v),
        ..Default::default()
    })
    .await
    .unwrap();
}

#[test]
fn watch_streams_match_real_etcd() {
    let Some(etcd) = RealEtcd::start() else {
        return;
    };
    let c = Cluster::start_with_etcd(3, &[]);
    let leader = c.wait_leader(T);
    // Watch through a follower: events come from what that node applied.
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    c.rt.block_on(async {
        let mut sides = [side(etcd.addr).await, side(c.etcd_addr(follower)).await];
        let mut got: Vec<Vec<String>> = vec![Vec::new(), Vec::new()];
        for (i, s) in sides.iter_mut().enumerate() {
            // Some history first.
            put(s, "/a/1", "v1").await;
            put(s, "/a/2", "v2").await;
            put(s, "/a/1", "v1b").await;
            // 1. A prefix watch from now, with prev_kv; 2. one replaying history from rev 2;
            // 3. a NOPUT watch (deletes only).
            if s.tx
                .send(create("/a/", "/a0", 0, true, vec![]))
                .await
                .is_err()
            {
                let r = s.call.take().unwrap().await;
                panic!("side {i}: the watch call ended: {r:?}");
            }
            s.tx.send(create("/a/", "/a0", 2, false, vec![]))
                .await
                .unwrap();
            s.tx.send(create(
                "/a/",
                "/a0",
                0,
                false,
                vec![FilterType::Noput as i32],
            ))
            .await
            .unwrap();
            got[i].extend(take(s, 4).await); // 3 created + the replay
            put(s, "/a/3", "v3").await;
            put(s, "/b/x", "ignored").await;
            s.kv.delete_range(DeleteRangeRequest {
                key: b("/a/"),
                range_end: b("/a0"),
                prev_kv: false,
            })
            .await
            .unwrap();
            got[i].extend(take(s, 4).await); // put to watchers 0 and 1, delete (2 keys... 3 keys) to all
            got[i].extend(take(s, 1).await);
            // Cancel watch 1, progress request, then one more write.
            s.tx.send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::CancelRequest(
                    WatchCancelRequest { watch_id: 1 },
                )),
            })
            .await
            .unwrap();
            got[i].extend(take(s, 1).await);
            s.tx.send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::ProgressRequest(
                    WatchProgressRequest {},
                )),
            })
            .await
            .unwrap();
            got[i].extend(take(s, 1).await);
            put(s, "/a/9", "last").await;
            got[i].extend(take(s, 1).await);
            // A watch below the compaction revision is created, then canceled with it.
            s.kv.compact(CompactionRequest {
                revision: 5,
                physical: false,
            })
            .await
            .unwrap();
            s.tx.send(create("/a/", "/a0", 3, false, vec![]))
                .await
                .unwrap();
            got[i].extend(take(s, 2).await);
        }
        // Responses to one request may interleave across watches: compare as sorted lists
        // within each step, and exactly for everything else.
        let (e, r) = (&got[0], &got[1]);
        let mut es = e.clone();
        let mut rs = r.clone();
        es.sort();
        rs.sort();
        if es != rs {
            let mut msg = String::new();
            for (i, (a, b)) in e.iter().zip(r.iter()).enumerate() {
                if a != b {
                    msg += &format!("#{i}\n  etcd:    {a}\n  raftsql: {b}\n");
                }
            }
            panic!("watch responses differ:\n{msg}");
        }
    });
}

/// progress_notify: a watch that asked for it, left idle, is sent a progress notification
/// (its own watch id, no events, the store revision in the header) by both etcd and raftsql,
/// here with the interval cut to 1 s on both.
#[test]
fn progress_notify_matches_real_etcd() {
    let Some(etcd) = RealEtcd::start_with(&["--experimental-watch-progress-notify-interval=1s"])
    else {
        return;
    };
    let c = Cluster::start_with_etcd(3, &["--watch-progress-notify-interval", "1s"]);
    let leader = c.wait_leader(T);
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    c.rt.block_on(async {
        let mut got = Vec::new();
        for addr in [etcd.addr, c.etcd_addr(follower)] {
            let mut s = side(addr).await;
            put(&mut s, "/p/a", "1").await;
            let mut req = create("/p/", "/p0", 0, false, vec![]);
            if let Some(watch_request::RequestUnion::CreateRequest(c)) = &mut req.request_union {
                c.progress_notify = true;
            }
            s.tx.send(req).await.unwrap();
            let mut seen = take(&mut s, 1).await; // created
            put(&mut s, "/p/b", "2").await;
            seen.extend(take(&mut s, 1).await); // the event
                                                // Then, with no more writes: a progress notification (take waits up to 10 s).
            let started = std::time::Instant::now();
            seen.extend(take(&mut s, 1).await);
            let waited = started.elapsed();
            assert!(
                waited < Duration::from_secs(5),
                "{addr}: progress notification after {waited:?}"
            );
            got.push(seen);
        }
        assert_eq!(got[0], got[1], "etcd (left) and raftsql (right) differ");
        assert!(got[1][2].contains("watch_id: 0") && got[1][2].contains("events: []"));
    });
}
