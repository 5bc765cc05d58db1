//! Watch guarantees under concurrent writes and a leader kill: ordered, unique, reliable,
//! resumable. Writers put unique values under /w/ through every node (followers forward);
//! a watcher streams from revision 1 and, whenever its node dies, reconnects to another node
//! with start_revision = last seen + 1. In the end every acknowledged put is seen exactly
//! once, at its revision, with its value, and revisions never go backwards.
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Cluster;
use raftsql_etcd::pb::etcdserverpb::{kv_client::KvClient, PutRequest};

const T: Duration = Duration::from_secs(40);

#[test]
fn watch_is_ordered_unique_reliable_and_resumable_across_a_leader_kill() {
    let mut c = Cluster::start_with_etcd(3, &["--checkpoint-frames", "64"]);
    let leader = c.wait_leader(T);
    let endpoints: Vec<String> = (1..=3)
        .map(|i| format!("http://{}", c.etcd_addr(i)))
        .collect();
    let acked: Arc<parking_lot::Mutex<BTreeMap<i64, String>>> = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Writers: each through its own node, retrying on errors (an unknown outcome is fine:
    // only acknowledged puts are checked).
    let mut writers = Vec::new();
    for w in 0..3usize {
        let (acked, stop, eps) = (acked.clone(), stop.clone(), endpoints.clone());
        writers.push(c.rt.spawn(async move {
            let mut i = 0;
            let mut n = w;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let ep = eps[n % eps.len()].clone();
                let Ok(mut kv) = KvClient::connect(ep).await else {
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let value = format!("w{w}-{i}");
                    let key = format!("/w/{}", i % 7);
                    let r = kv
                        .put(PutRequest {
                            key: Bytes::from(key),
                            value: Bytes::from(value.clone()),
                            ..Default::default()
                        })
                        .await;
                    match r {
                        Ok(resp) => {
                            let rev = resp.into_inner().header.unwrap().revision;
                            assert!(
                                acked.lock().insert(rev, value).is_none(),
                                "two puts acknowledged at revision {rev}"
                            );
                            i += 1;
                        }
                        Err(_) => {
                            n += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            break;
                        }
                    }
                }
            }
        }));
    }
    // The watcher: on a follower first; resumes on another node when its stream breaks.
    let seen: Arc<parking_lot::Mutex<Vec<(i64, String)>>> = Default::default();
    let first = (1..=3).find(|i| *i != leader).unwrap() as usize - 1;
    let watcher = {
        let (seen, stop, eps) = (seen.clone(), stop.clone(), endpoints.clone());
        c.rt.spawn(async move {
            let mut node = first;
            let mut next = 1i64;
            let mut reconnects = 0;
            loop {
                let done = stop.load(std::sync::atomic::Ordering::SeqCst);
                let Some((tx, mut stream)) = common::etcd::watch_from(
                    &eps[node % 3],
                    b"/w/",
                    b"/w0",
                    next,
                    Duration::from_secs(3),
                )
                .await
                else {
                    node += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                loop {
                    let m = tokio::time::timeout(
                        Duration::from_secs(if done { 2 } else { 5 }),
                        stream.message(),
                    )
                    .await;
                    match m {
                        Ok(Ok(Some(r))) => {
                            assert!(!r.canceled, "watch canceled: {r:?}");
                            let mut s = seen.lock();
                            for e in r.events {
                                let kv = e.kv.unwrap();
                                assert!(
                                    kv.mod_revision >= next,
                                    "revision went backwards: {} after {}",
                                    kv.mod_revision,
                                    next - 1
                                );
                                s.push((
                                    kv.mod_revision,
                                    String::from_utf8_lossy(&kv.value).into_owned(),
                                ));
                                next = kv.mod_revision + 1;
                            }
                        }
                        Ok(Ok(None)) | Ok(Err(_)) => {
                            reconnects += 1;
                            node += 1;
                            break;
                        }
                        Err(_) if done => return reconnects,
                        Err(_) => {
                            reconnects += 1;
                            node += 1;
                            break;
                        }
                    }
                }
                drop(tx);
            }
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    c.kill(leader);
    std::thread::sleep(Duration::from_secs(3));
    c.spawn(leader);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in writers {
        c.rt.block_on(w).unwrap();
    }
    let deadline = Instant::now() + T;
    let reconnects = c.rt.block_on(watcher).unwrap();
    assert!(Instant::now() < deadline);
    let acked = acked.lock().clone();
    let seen = seen.lock().clone();
    assert!(acked.len() > 100, "too few writes: {}", acked.len());
    // Unique and ordered.
    for w in seen.windows(2) {
        assert!(
            w[0].0 < w[1].0,
            "not strictly increasing: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
    // Reliable: every acknowledged put seen, with its value.
    let seen_map: BTreeMap<i64, String> = seen.into_iter().collect();
    for (rev, v) in &acked {
        assert_eq!(
            seen_map.get(rev),
            Some(v),
            "acknowledged put at revision {rev} missing or wrong in the watch stream"
        );
    }
    eprintln!(
        "watch saw {} events, {} acknowledged puts, {} reconnects",
        seen_map.len(),
        acked.len(),
        reconnects
    );
}
