//! Fuzzes etcd request handling with arbitrary protobuf, against a real one-node raftsql
//! with the etcd store (started once per fuzzing process, its data in /dev/shm when there).
//!
//! The first byte chooses the path:
//! - even: the bytes as a peer forwards a write to the leader's store (a `Forwarded`
//!   protobuf, `raftsql-etcd/proto/forward.proto`, through the "etcd" node service), decoded
//!   and run exactly as a follower's forward would be;
//! - odd: the rest decoded as a client's Range, Put, DeleteRange, Txn or Compaction
//!   request (chosen by the second byte) and run through the store's public methods, as the
//!   gRPC server does after tonic has decoded it.
//!
//! Must never panic, hang or corrupt the store: every 64 inputs a canary key is written and
//! read back.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use raftsql_core::{Node, NodeConfig};
use raftsql_etcd::pb::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, PutRequest, RangeRequest, TxnRequest,
};
use raftsql_etcd::EtcdStore;

struct Env {
    rt: tokio::runtime::Runtime,
    node: Node,
    store: Arc<EtcdStore>,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            tempfile::tempdir_in("/dev/shm").unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}").parse().unwrap();
        let node = rt
            .block_on(Node::start(NodeConfig::new(1, dir.path().join("n1"), listen)))
            .unwrap();
        while !node.is_leader() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let store = rt.block_on(async { EtcdStore::new(node.clone(), 1) });
        Env {
            rt,
            node,
            store,
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let env = env();
    let Some((&mode, rest)) = data.split_first() else { return };
    env.rt.block_on(async {
        let work = async {
            if mode & 1 == 0 {
                let _ = env.node.call_leader("etcd", Bytes::copy_from_slice(rest)).await;
                return;
            }
            let Some((&kind, body)) = rest.split_first() else { return };
            let s = &env.store;
            match kind % 5 {
                0 => {
                    if let Ok(r) = RangeRequest::decode(body) {
                        let _ = s.range(r).await;
                    }
                }
                1 => {
                    if let Ok(r) = PutRequest::decode(body) {
                        let _ = s.put(r).await;
                    }
                }
                2 => {
                    if let Ok(r) = DeleteRangeRequest::decode(body) {
                        let _ = s.delete_range(r).await;
                    }
                }
                3 => {
                    if let Ok(r) = TxnRequest::decode(body) {
                        let _ = s.txn(r).await;
                    }
                }
                _ => {
                    if let Ok(r) = CompactionRequest::decode(body) {
                        let _ = s.compact(r).await;
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), work)
            .await
            .expect("an etcd request hung for 20 s");
        if RUNS.fetch_add(1, Ordering::Relaxed) % 64 == 0 {
            let n = RUNS.load(Ordering::Relaxed).to_string();
            env.store
                .put(PutRequest {
                    key: Bytes::from_static(b"\xff/canary"),
                    value: Bytes::from(n.clone()),
                    ..Default::default()
                })
                .await
                .expect("the store no longer takes a put");
            let r = env
                .store
                .range(RangeRequest {
                    key: Bytes::from_static(b"\xff/canary"),
                    ..Default::default()
                })
                .await
                .expect("the store no longer answers a range");
            assert_eq!(r.kvs.first().map(|kv| kv.value.clone()), Some(Bytes::from(n)));
        }
    });
});
