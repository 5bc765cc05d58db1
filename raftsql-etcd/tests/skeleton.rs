//! The gRPC skeleton end to end: `serve` over a toy in-memory `Backend`, called with the
//! generated tonic clients and, when installed, with the real `etcdctl` (wire compatibility).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use raftsql_etcd::pb::etcdserverpb::kv_client::KvClient;
use raftsql_etcd::pb::etcdserverpb::lease_client::LeaseClient;
use raftsql_etcd::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use raftsql_etcd::pb::etcdserverpb::{
    LeaseGrantRequest, PutRequest, PutResponse, RangeRequest, RangeResponse, ResponseHeader,
    StatusRequest,
};
use raftsql_etcd::pb::mvccpb::KeyValue;
use raftsql_etcd::{serve_listener, Backend, MAX_REQUEST_BYTES, NOT_IMPLEMENTED};
use tokio::sync::oneshot;
use tonic::{Code, Status};

/// Put and Range over a map; every other RPC keeps the trait's UNIMPLEMENTED default.
#[derive(Default)]
struct MapBackend {
    state: Mutex<(i64, BTreeMap<Bytes, KeyValue>)>,
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        cluster_id: 1,
        member_id: 1,
        revision,
        raft_term: 1,
    })
}

#[tonic::async_trait]
impl Backend for MapBackend {
    async fn put(&self, req: PutRequest) -> Result<PutResponse, Status> {
        let mut state = self.state.lock().unwrap();
        state.0 += 1;
        let rev = state.0;
        let prev = state.1.get(&req.key).cloned();
        let kv = KeyValue {
            key: req.key.clone(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            value: req.value,
            lease: req.lease,
        };
        state.1.insert(req.key, kv);
        Ok(PutResponse {
            header: header(rev),
            prev_kv: if req.prev_kv { prev } else { None },
        })
    }

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Status> {
        let state = self.state.lock().unwrap();
        let kvs: Vec<KeyValue> = if req.range_end.is_empty() {
            state.1.get(&req.key).cloned().into_iter().collect()
        } else {
            state
                .1
                .range(req.key.clone()..)
                .take_while(|(k, _)| req.range_end.as_ref() == b"\0" || *k < &req.range_end)
                .map(|(_, kv)| kv.clone())
                .collect()
        };
        let count = kvs.len() as i64;
        Ok(RangeResponse {
            header: header(state.0),
            kvs,
            more: false,
            count,
        })
    }
}

/// Serves a fresh `MapBackend` on 127.0.0.1:<free port>; dropping the sender stops it.
async fn start() -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        serve_listener(listener, Arc::new(MapBackend::default()), shutdown)
            .await
            .unwrap();
    });
    (addr, stop, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_range_and_unimplemented_with_the_generated_clients() {
    let (addr, stop, server) = start().await;
    let url = format!("http://{addr}");
    let mut kv = KvClient::connect(url.clone()).await.unwrap();

    let put = kv
        .put(PutRequest {
            key: "foo".into(),
            value: "bar".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.header.unwrap().revision, 1);

    let got = kv
        .range(RangeRequest {
            key: "foo".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = got.into_inner();
    assert_eq!(got.count, 1);
    assert_eq!(got.kvs.len(), 1);
    assert_eq!(got.kvs[0].key, Bytes::from("foo"));
    assert_eq!(got.kvs[0].value, Bytes::from("bar"));
    assert_eq!(
        (
            got.kvs[0].create_revision,
            got.kvs[0].mod_revision,
            got.kvs[0].version
        ),
        (1, 1, 1)
    );

    // A missing key: no kvs, not an error.
    let none = kv
        .range(RangeRequest {
            key: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.into_inner().kvs.is_empty());

    // A service that is served but not implemented yet.
    let mut lease = LeaseClient::connect(url.clone()).await.unwrap();
    let err = lease
        .lease_grant(LeaseGrantRequest { ttl: 10, id: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(err.message(), NOT_IMPLEMENTED);

    // A delegated RPC that this backend leaves to the trait's default.
    let mut maintenance = MaintenanceClient::connect(url.clone()).await.unwrap();
    let err = maintenance.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);

    // etcd's request size limit: a 1.5 MiB value is decoded, a 3 MiB one is refused by the
    // transport before reaching the backend.
    let big = vec![b'x'; MAX_REQUEST_BYTES - 1024];
    kv.put(PutRequest {
        key: "big".into(),
        value: big.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let huge = vec![b'x'; 3 << 20];
    let err = kv
        .put(PutRequest {
            key: "huge".into(),
            value: huge.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    // tonic answers OUT_OF_RANGE "decoded message length too large" (grpc-go: RESOURCE_EXHAUSTED).
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    let huge = kv
        .range(RangeRequest {
            key: "huge".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(huge.into_inner().kvs.is_empty());

    drop(stop);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
}

/// Runs etcdctl (v3 API) against `addr`; None if etcdctl is not installed.
fn etcdctl(addr: SocketAddr, args: &[&str]) -> Option<std::process::Output> {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={addr}"))
        .args(["--dial-timeout=5s", "--command-timeout=10s"])
        .args(args)
        .output();
    match out {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("running etcdctl: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_put_and_get() {
    let (addr, stop, server) = start().await;
    let run = move |args: &'static [&'static str]| {
        tokio::task::spawn_blocking(move || etcdctl(addr, args))
    };
    let Some(put) = run(&["put", "foo", "bar"]).await.unwrap() else {
        println!("NOTE: etcdctl is not installed; skipping the etcdctl wire-compatibility check");
        return;
    };
    let text = |out: &std::process::Output| {
        format!(
            "status {}, stdout {:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    assert!(put.status.success(), "etcdctl put: {}", text(&put));
    assert_eq!(
        String::from_utf8_lossy(&put.stdout),
        "OK\n",
        "etcdctl put: {}",
        text(&put)
    );

    let get = run(&["get", "foo"]).await.unwrap().unwrap();
    assert!(get.status.success(), "etcdctl get: {}", text(&get));
    assert_eq!(
        String::from_utf8_lossy(&get.stdout),
        "foo\nbar\n",
        "etcdctl get: {}",
        text(&get)
    );

    // A prefix get (range_end = prefix + 1) and the JSON output, which prints the header.
    run(&["put", "foo2", "baz"]).await.unwrap().unwrap();
    let prefix = run(&["get", "--prefix", "fo"]).await.unwrap().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&prefix.stdout),
        "foo\nbar\nfoo2\nbaz\n",
        "{}",
        text(&prefix)
    );
    let json = run(&["get", "foo", "-w", "json"]).await.unwrap().unwrap();
    let json_text = String::from_utf8_lossy(&json.stdout);
    assert!(
        json_text.contains("\"revision\":2"),
        "etcdctl get -w json: {}",
        text(&json)
    );
    assert!(
        json_text.contains("\"count\":1"),
        "etcdctl get -w json: {}",
        text(&json)
    );

    // An RPC the server does not implement: etcdctl fails with the Unimplemented status.
    let grant = run(&["lease", "grant", "10"]).await.unwrap().unwrap();
    assert!(
        !grant.status.success(),
        "etcdctl lease grant: {}",
        text(&grant)
    );
    assert!(
        String::from_utf8_lossy(&grant.stderr).contains(NOT_IMPLEMENTED),
        "{}",
        text(&grant)
    );

    drop(stop);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
}
