//! Hostile input: garbage on a node's ports while a normal client keeps working, the hard
//! limits and their errors, and secrets kept out of logs and `cluster show`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use raftsql_core::{Client, Statement, Value};
use raftsql_etcd::pb::etcdserverpb::{
    kv_client::KvClient, request_op, watch_client::WatchClient, watch_request, PutRequest,
    RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
};
use raftsql_proto::v1 as pb;
use raftsql_tests::harness;
use raftsql_tests::harness::nemesis::Rng;
use raftsql_tests::harness::Cluster;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(30);

/// A frame as the transport writes it: length, crc32, payload.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(payload.len() + 8);
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fn hello(from_id: u64) -> Vec<u8> {
    frame(
        &pb::Frame {
            kind: Some(pb::frame::Kind::Hello(pb::Hello {
                from_id,
                cluster: "raftsql".into(),
            })),
        }
        .encode_to_vec(),
    )
}

/// One hostile connection to `addr` (the SQL/peer port) or `etcd`, chosen by `kind`.
async fn attack(addr: SocketAddr, etcd: SocketAddr, kind: u64, rng: &mut Rng) {
    let target = if kind % 9 == 8 { etcd } else { addr };
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(target),
    )
    .await
    else {
        return;
    };
    let random: Vec<u8> = (0..(rng.next() % 4096 + 1))
        .map(|_| rng.next() as u8)
        .collect();
    let bytes: Vec<u8> = match kind % 9 {
        // Random bytes.
        0 => random,
        // A huge length prefix, then a little.
        1 => [u32::MAX.to_le_bytes().to_vec(), random].concat(),
        // A client hello, then a frame declaring 60 MiB of which 4 KiB come.
        2 => [
            hello(0),
            (60u32 << 20).to_le_bytes().to_vec(),
            vec![0; 4],
            random,
        ]
        .concat(),
        // A truncated frame.
        3 => {
            let f = hello(0);
            f[..f.len() / 2].to_vec()
        }
        // Silence (held until the node's hello timeout).
        4 => Vec::new(),
        // A client that sends Raft messages.
        5 => [
            hello(0),
            frame(
                &pb::Frame {
                    kind: Some(pb::frame::Kind::Raft(pb::RaftBatch {
                        messages: vec![Bytes::from(random)],
                    })),
                }
                .encode_to_vec(),
            ),
        ]
        .concat(),
        // A peer hello, then Raft "messages" that are random bytes.
        6 => [
            hello(2),
            frame(
                &pb::Frame {
                    kind: Some(pb::frame::Kind::Raft(pb::RaftBatch {
                        messages: vec![Bytes::from(random.clone()), Bytes::from(random)],
                    })),
                }
                .encode_to_vec(),
            ),
        ]
        .concat(),
        // A client hello, then a frame with a bad checksum.
        7 => {
            let mut f = hello(0);
            f[5] ^= 0xff;
            [hello(0), f].concat()
        }
        // Garbage to the etcd (HTTP/2) port.
        _ => random,
    };
    let _ = s.write_all(&bytes).await;
    // Hold the connection a while, as a slow attacker would.
    tokio::time::sleep(Duration::from_millis(rng.next() % 1500)).await;
}

/// Floods node 1's SQL/peer port and etcd port with garbage from 48 connections at a time for
/// 10 s, while a normal client writes and reads through node 1 (SQL and etcd): every one of
/// its operations must succeed, node 1 must stay up with bounded memory, and the replicas must
/// converge. Then a client forges a removal notice to node 2, which must ignore it.
#[test]
fn garbage_flood_leaves_a_normal_client_unaffected() {
    let cl = Cluster::start_with_etcd(3, &[]);
    cl.wait_leader(T);
    cl.seed_rows(1);
    let (addr, etcd) = (cl.addr(1), cl.etcd_addr(1));
    let stop = Arc::new(AtomicBool::new(false));
    let attacks = Arc::new(AtomicU64::new(0));
    let mut floods = Vec::new();
    for i in 0..48u64 {
        let (stop, attacks) = (stop.clone(), attacks.clone());
        floods.push(cl.rt.spawn(async move {
            let mut rng = Rng(0x5eed ^ ((i + 1) * 0x9e37_79b9));
            let mut kind = i;
            while !stop.load(Ordering::SeqCst) {
                attack(addr, etcd, kind, &mut rng).await;
                attacks.fetch_add(1, Ordering::SeqCst);
                kind += 1;
            }
        }));
    }
    // The normal client: SQL insert + linearizable count, etcd put + range, through node 1.
    let c = cl.client_of(1);
    let started = Instant::now();
    let (ok, errors, latencies) = cl.rt.block_on(async {
        let mut kv = KvClient::connect(format!("http://{etcd}")).await.unwrap();
        let (mut ok, mut errors, mut lat) = (0u64, Vec::new(), Vec::new());
        let mut i = 0;
        while started.elapsed() < Duration::from_secs(10) {
            i += 1;
            let t = Instant::now();
            let r: Result<(), String> = async {
                c.execute(
                    "main",
                    "INSERT INTO t(v) VALUES (?1)",
                    vec![format!("n{i}").into()],
                )
                .await
                .map_err(|e| e.to_string())?;
                c.query("main", "SELECT count(*) FROM t", vec![])
                    .await
                    .map_err(|e| e.to_string())?;
                kv.put(PutRequest {
                    key: Bytes::from(format!("/normal/{i}")),
                    value: Bytes::from_static(b"v"),
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
                kv.range(RangeRequest {
                    key: Bytes::from(format!("/normal/{i}")),
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
                Ok(())
            }
            .await;
            lat.push(t.elapsed());
            match r {
                Ok(()) => ok += 1,
                Err(e) => errors.push(e),
            }
        }
        (ok, errors, lat)
    });
    stop.store(true, Ordering::SeqCst);
    for f in floods {
        cl.rt.block_on(f).unwrap();
    }
    let mut lat = latencies.clone();
    lat.sort();
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    let hwm = cl.vm_hwm_kib(1);
    eprintln!(
        "{} hostile connections; the normal client: {ok} rounds ok, {} failed, p50 {:?}, \
         p99 {:?}, max {:?}; node 1's peak RSS {} MiB",
        attacks.load(Ordering::SeqCst),
        errors.len(),
        p(0.5),
        p(0.99),
        lat.last().unwrap(),
        hwm / 1024
    );
    assert!(
        errors.is_empty(),
        "the normal client failed: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(ok >= 20, "too few normal rounds ({ok})");
    assert!(
        attacks.load(Ordering::SeqCst) >= 200,
        "too few hostile connections"
    );
    assert!(
        hwm < 512 * 1024,
        "node 1's memory grew to {} MiB",
        hwm / 1024
    );
    assert!(cl.status(1, false).is_some(), "node 1 stopped answering");
    cl.wait_converged(T);
    // A removal notice from a client (anyone can reach the port) does not stop a member.
    let notice = pb::MembershipRequest {
        req: Some(pb::membership_request::Req::Removed(pb::RemovedNotice {
            id: 2,
        })),
    };
    let call = |service: &str| {
        pb::request::Body::Service(pb::ServiceCall {
            service: service.into(),
            payload: notice.encode_to_vec().into(),
        })
    };
    // A client may not send it at all...
    for (service, expected) in [
        (raftsql_core::members::MEMBERS_SERVICE, "goes to"),
        (raftsql_core::members::NOTICE_SERVICE, "only for members"),
    ] {
        let r = cl
            .rt
            .block_on(Client::call_node(cl.addr(2), "raftsql", call(service)));
        assert!(
            matches!(&r, Ok(pb::response::Body::Error(e)) if e.message.contains(expected)),
            "{service}: {r:?}"
        );
    }
    // ...and one claiming to be node 1 (possible without TLS) is checked with the cluster.
    let r = cl.rt.block_on(async {
        let mut conn = cl.connect_as(1, 2).await;
        conn.call(call(raftsql_core::members::NOTICE_SERVICE)).await
    });
    assert!(
        matches!(&r, Ok(pb::response::Body::Error(e)) if e.message.contains("not confirmed")),
        "{r:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        cl.status(2, false).is_some(),
        "a forged removal notice stopped node 2"
    );
    let log = cl.log_text(1);
    for expected in [
        "bytes exceeds the",
        "that sent Raft messages",
        "frame checksum mismatch",
    ] {
        assert!(log.contains(expected), "node 1's log lacks {expected:?}");
    }
}

/// Each hard limit answers with an error that says which limit and what to do; the
/// connection or stream stays usable where it can.
#[test]
fn limits_answer_with_clear_errors() {
    let cl = Cluster::start_with_etcd(
        1,
        &[
            "--max-request-bytes",
            "65536",
            "--max-result-bytes",
            "100000",
        ],
    );
    cl.wait_leader(T);
    cl.seed_rows(0);
    let c = cl.client();
    cl.rt.block_on(async {
        // A request over --max-request-bytes.
        let e = c
            .execute(
                "main",
                "INSERT INTO t(v) VALUES (?1)",
                vec!["x".repeat(100_000).into()],
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("accepts requests of up to 65536 bytes (--max-request-bytes)"),
            "{e}"
        );
        // 200 rows of 1,000 bytes (in requests under the limit); reading them all is over
        // --max-result-bytes, 50 of them is not.
        for _ in 0..10 {
            let stmts: Vec<Statement> = (0..20)
                .map(|_| {
                    Statement::with_params(
                        "INSERT INTO t(v) VALUES (?1)",
                        vec![Value::Text("y".repeat(1000))],
                    )
                })
                .collect();
            c.execute_batch("main", &stmts).await.unwrap();
        }
        let e = c
            .query("main", "SELECT v FROM t", vec![])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("exceeds the 100000-byte limit") && e.contains("LIMIT"),
            "{e}"
        );
        let rows = c
            .query("main", "SELECT v FROM t LIMIT 50", vec![])
            .await
            .unwrap();
        assert_eq!(rows.rows.len(), 50);
        // An interactive transaction may not ask to hold the writer idle for long.
        let e = match c.transaction("main", Duration::from_secs(120)).await {
            Ok(_) => panic!("a 120 s idle timeout was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("exceeds the 60 s limit"), "{e}");
        let tx = c.transaction("main", Duration::from_secs(5)).await.unwrap();
        tx.rollback().await.unwrap();
    });
    // etcd: more than 128 operations in a Txn (etcd's --max-txn-ops default), compared with
    // the real etcd when it is installed; watches per stream.
    let ours = cl.etcd_addr(1);
    let real = harness::etcd::RealEtcd::start();
    cl.rt.block_on(async {
        let txn = |n: usize| TxnRequest {
            success: (0..n)
                .map(|i| RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: Bytes::from(format!("/txn/{i}")),
                        value: Bytes::from_static(b"v"),
                        ..Default::default()
                    })),
                })
                .collect(),
            ..Default::default()
        };
        let mut targets = vec![("raftsql", ours)];
        if let Some(r) = &real {
            targets.push(("etcd", r.addr));
        }
        for (name, a) in targets {
            let mut kv = harness::etcd::connect(a).await;
            let e = kv.txn(txn(129)).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{name}: {e:?}");
            assert_eq!(
                e.message(),
                "etcdserver: too many operations in txn request",
                "{name}"
            );
            assert!(
                kv.txn(txn(128)).await.unwrap().into_inner().succeeded,
                "{name}"
            );
        }
        let mut w = WatchClient::connect(format!("http://{ours}"))
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut stream = w
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let limit = raftsql_etcd::MAX_WATCHES_PER_STREAM;
        let send = tx.clone();
        tokio::spawn(async move {
            for i in 0..=limit {
                let _ = send
                    .send(WatchRequest {
                        request_union: Some(watch_request::RequestUnion::CreateRequest(
                            WatchCreateRequest {
                                key: Bytes::from(format!("/w/{i}")),
                                ..Default::default()
                            },
                        )),
                    })
                    .await;
            }
        });
        let mut created = 0;
        let refused = loop {
            let r = tokio::time::timeout(T, stream.message())
                .await
                .expect("watch answers")
                .unwrap()
                .unwrap();
            if r.created {
                created += 1;
            } else if r.canceled {
                break r.cancel_reason;
            }
        };
        assert_eq!(created, limit);
        assert!(
            refused.contains("too many watches on one stream"),
            "{refused}"
        );
        drop(tx);
    });
}

/// Join tokens (and the secret part of join strings) appear in no node's log and nowhere in
/// `cluster show`.
#[test]
fn secrets_stay_out_of_logs_and_cluster_show() {
    let mut cl = Cluster::prepare(2, &[], false);
    cl.spawn_first(&[]);
    cl.wait_leader(T);
    let a1 = cl.addr(1).to_string();
    let join = Cluster::join_string(&a1, &[]);
    let token = join.rsplit('/').next().unwrap().to_string();
    assert!(token.len() >= 16, "token {token:?}");
    cl.spawn_join(2, &join, &[]);
    let all = format!("{a1},{}", cl.addr(2));
    let deadline = Instant::now() + T;
    let mut shown = String::new();
    while Instant::now() < deadline {
        let (ok, out, _) = Cluster::run_cli(&["cluster", "show", "--endpoints", &all]);
        let (_, json, _) =
            Cluster::run_cli(&["cluster", "show", "--format", "json", "--endpoints", &all]);
        shown = out + &json;
        if ok && shown.contains(&cl.addr(2).to_string()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        shown.contains(&cl.addr(2).to_string()),
        "node 2 never joined: {shown}"
    );
    for (what, text) in [
        ("cluster show", shown),
        ("node 1's log", cl.log_text(1)),
        ("node 2's log", cl.log_text(2)),
    ] {
        assert!(!text.contains(&token), "{what} shows the join token");
    }
}

/// A Raft proposal that arrives over the network (raft-rs followers forward proposals to the
/// leader) is dropped, not appended: a forwarded batch was executed on another node's state,
/// and its page images would overwrite newer ones. Here the "batch" is garbage, which every
/// state machine would refuse to apply (stopping the node) if it were committed.
#[test]
fn a_forwarded_proposal_is_not_appended() {
    use protobuf::Message as _;
    let cl = Cluster::start(3, &[]);
    let leader = cl.wait_leader(T);
    cl.seed_rows(1);
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let mut entry = raft::eraftpb::Entry::default();
    entry.data = b"not a write batch".to_vec().into();
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgPropose);
    m.from = follower;
    m.to = leader;
    m.entries = vec![entry].into();
    let batch = pb::Frame {
        kind: Some(pb::frame::Kind::Raft(pb::RaftBatch {
            messages: vec![Bytes::from(m.write_to_bytes().unwrap())],
        })),
    };
    cl.rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(cl.addr(leader))
            .await
            .unwrap();
        s.write_all(&[hello(follower), frame(&batch.encode_to_vec())].concat())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    // Every node still applies and answers, and the leader says what it dropped.
    cl.rt.block_on(async {
        cl.client()
            .execute("main", "INSERT INTO t(v) VALUES ('after')", vec![])
            .await
            .unwrap()
    });
    cl.wait_converged(T);
    assert_eq!(cl.local_count(leader, "main", "SELECT count(*) FROM t"), 2);
    assert!(
        cl.log_text(leader)
            .contains(&format!("dropped a proposal forwarded by node {follower}")),
        "{}",
        cl.log_text(leader)
    );
}

/// A Txn nested `depth` levels deep, each level's success branch holding a put and the next
/// level (a few bytes a level).
fn nested_txn(depth: usize) -> TxnRequest {
    let mut t = TxnRequest::default();
    for level in (0..depth).rev() {
        let put = RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: Bytes::from(format!("/nest/{level}")),
                value: Bytes::from_static(b"v"),
                ..Default::default()
            })),
        };
        let mut outer = TxnRequest::default();
        outer.success.push(put);
        if level + 1 < depth {
            outer.success.push(RequestOp {
                request: Some(request_op::Request::RequestTxn(t)),
            });
        }
        t = outer;
    }
    t
}

/// A small deeply nested Txn is refused in milliseconds, a permitted one runs, and other
/// clients keep working meanwhile. (The Txn check was exponential in the depth: 26 levels
/// took 16 s of one core, 40 would take days, and a few such requests stopped every tokio
/// worker, heartbeats included.) The class: request validation whose cost is not linear in
/// the request's size.
#[test]
fn a_deeply_nested_txn_is_refused_in_milliseconds() {
    let cl = Cluster::start_with_etcd(1, &[]);
    cl.wait_leader(T);
    let addr = cl.etcd_addr(1);
    cl.rt.block_on(async {
        // Another client writes throughout.
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let writer = {
            let (stop, done) = (stop.clone(), done.clone());
            tokio::spawn(async move {
                let mut kv = harness::etcd::connect(addr).await;
                while !stop.load(Ordering::Relaxed) {
                    kv.put(PutRequest {
                        key: Bytes::from_static(b"/other"),
                        value: Bytes::from_static(b"x"),
                        ..Default::default()
                    })
                    .await
                    .expect("a put beside the nested txns");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let mut kv = harness::etcd::connect(addr).await;
        let deepest = raftsql_etcd::MAX_TXN_DEPTH;
        let r = kv
            .txn(nested_txn(deepest))
            .await
            .expect("a txn at the depth limit");
        assert!(r.into_inner().succeeded);
        for depth in [deepest + 1, 30, 50, 200] {
            let req = nested_txn(depth);
            let bytes = prost::Message::encoded_len(&req);
            let started = Instant::now();
            let e = tokio::time::timeout(Duration::from_secs(5), kv.txn(req))
                .await
                .unwrap_or_else(|_| panic!("a {depth}-deep txn ({bytes} bytes) took over 5 s"))
                .unwrap_err();
            let took = started.elapsed();
            let msg: String = e.message().chars().take(80).collect();
            println!(
                "depth {depth} ({bytes} bytes): {:?} {msg:?} in {took:?}",
                e.code()
            );
            if depth <= 50 {
                assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
            } // (Deeper than 100, prost's decoder refuses it before the store sees it.)
            assert!(
                took < Duration::from_millis(500),
                "depth {depth} took {took:?}"
            );
        }
        // Many ops spread over levels: the total is bounded too.
        // 8 levels, each failure branch with 128 ranges: 1,039 ops in all, under the
        // per-branch limit everywhere.
        let mut wide = nested_txn(8);
        let mut level = Some(&mut wide);
        while let Some(t) = level {
            t.failure = (0..128)
                .map(|i| RequestOp {
                    request: Some(request_op::Request::RequestRange(RangeRequest {
                        key: Bytes::from(format!("/r/{i}")),
                        ..Default::default()
                    })),
                })
                .collect();
            level = t.success.iter_mut().find_map(|op| match &mut op.request {
                Some(request_op::Request::RequestTxn(n)) => Some(n),
                _ => None,
            });
        }
        let e = kv.txn(wide).await.unwrap_err();
        assert_eq!(
            e.message(),
            "etcdserver: too many operations in txn request"
        );
        let before = done.load(Ordering::Relaxed);
        let deadline = Instant::now() + T;
        while done.load(Ordering::Relaxed) < before + 10 {
            assert!(
                Instant::now() < deadline,
                "the other client stopped making progress"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, Ordering::Relaxed);
        writer.await.unwrap();
    });
}

/// The etcd server announces (and so enforces) its per-connection stream limit, and a
/// client-chosen watch id of i64::MAX neither overflows nor collides with the next automatic
/// id. (The server set the limit to 1,024 and then to u32::MAX; the watch id bumped the
/// next automatic id to `id + 1`, which overflows: a panic in a debug build, a negative id
/// in a release one.)
#[test]
fn etcd_stream_and_watch_id_limits_hold() {
    let cl = Cluster::start_with_etcd(1, &[]);
    cl.wait_leader(T);
    let addr = cl.etcd_addr(1);
    cl.rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (_client, mut conn) = h2::client::handshake(tcp).await.unwrap();
        let deadline = Instant::now() + T;
        let announced = loop {
            // Drive the connection until the server's SETTINGS have arrived.
            let _ = tokio::time::timeout(Duration::from_millis(50), &mut conn).await;
            let n = conn.max_concurrent_send_streams();
            if n != usize::MAX || Instant::now() > deadline {
                break n;
            }
        };
        assert_eq!(announced, raftsql_etcd::MAX_STREAMS_PER_CONNECTION as usize);

        let mut w = WatchClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut stream = w
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let create = |watch_id: i64| WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: Bytes::from_static(b"/w"),
                    watch_id,
                    ..Default::default()
                },
            )),
        };
        let mut ids = Vec::new();
        for id in [i64::MAX, 0, 0] {
            tx.send(create(id)).await.unwrap();
            let r = tokio::time::timeout(T, stream.message())
                .await
                .expect("the watch stream answers")
                .expect("the stream stays up")
                .expect("a response");
            assert!(r.created, "{r:?}");
            ids.push(r.watch_id);
        }
        assert_eq!(ids[0], i64::MAX);
        assert!(ids[1] >= 0 && ids[2] >= 0 && ids[1] != ids[2], "{ids:?}");
        assert!(!ids[1..].contains(&i64::MAX), "{ids:?}");
    });
}
