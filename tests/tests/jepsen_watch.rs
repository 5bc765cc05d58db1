//! Jepsen-style watch test (short profile): writers put unique values under `/w/` through
//! every node's etcd API while six watchers (two starting on each node) stream `/w/` from
//! revision 1, and the nemesis (`harness::nemesis`, every kind of fault) works on a 3-node
//! cluster. A watcher whose stream breaks or stalls for 3 s resumes on the next node with
//! `start_revision` = the last revision it saw + 1. Three more watchers are bound to one node
//! each: they keep their stream open through a pause of that node (up to 20 s of silence) and
//! resume only there, so a stream that resumes with a stale or skipped event after its node
//! was paused is caught (issue 14).
//!
//! The only writes are those puts, so every revision from 2 (an empty store is at revision
//! 1, as in etcd) to the final one is a put under `/w/`. Checked: every watcher sees every revision exactly once and in order (no gap
//! across its reconnects), all watchers agree on each revision's key and value, and every
//! acknowledged put is there at the revision its answer named, with its value.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use harness::nemesis::{self, Kind, Settings};
use raftsql_etcd::pb::etcdserverpb::{kv_client::KvClient, PutRequest, RangeRequest};
use raftsql_tests::harness;
use raftsql_tests::harness::Cluster;
use raftsql_tests::report::Plain;

const OP_TIMEOUT: Duration = Duration::from_secs(1);
const STALL: Duration = Duration::from_secs(3);
/// How long a bound watcher waits on a silent stream before it opens a new one on the same
/// node: longer than the longest pause, so its stream stays open across the pause.
const BOUND_STALL: Duration = Duration::from_secs(20);

/// An event as a watcher saw it: (revision, key, value).
type Event = (i64, String, String);

/// What one watcher saw, and how often it had to resume.
struct Watched {
    events: Vec<Event>,
    resumes: u32,
}

/// Streams `/w/` from revision 1, resuming on the next endpoint when the stream breaks or
/// stalls, until it has seen revision `until` (once that is set, i.e. non-zero). A `bound`
/// watcher stays on its first node: it resumes there, and waits out a paused node with its
/// stream open.
async fn watcher(eps: Vec<String>, first: usize, until: Arc<AtomicI64>, bound: bool) -> Watched {
    let stall = if bound { BOUND_STALL } else { STALL };
    let step = usize::from(!bound);
    let mut out = Watched {
        events: Vec::new(),
        resumes: 0,
    };
    let mut node = first;
    let mut next = 1i64;
    let give_up = Instant::now() + Duration::from_secs(600);
    loop {
        let target = until.load(Ordering::SeqCst);
        if target != 0 && next > target {
            return out;
        }
        assert!(Instant::now() < give_up, "watcher never caught up");
        let ep = eps[node % eps.len()].clone();
        let Some((_tx, mut stream)) =
            harness::etcd::watch_from(&ep, b"/w/", b"/w0", next, stall).await
        else {
            node += step;
            out.resumes += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        loop {
            let target = until.load(Ordering::SeqCst);
            if target != 0 && next > target {
                return out;
            }
            match tokio::time::timeout(stall, stream.message()).await {
                Ok(Ok(Some(r))) if !r.canceled => {
                    for e in r.events {
                        let kv = e.kv.unwrap();
                        out.events.push((
                            kv.mod_revision,
                            String::from_utf8_lossy(&kv.key).into_owned(),
                            String::from_utf8_lossy(&kv.value).into_owned(),
                        ));
                        next = next.max(kv.mod_revision + 1);
                    }
                }
                _ => {
                    node += step;
                    out.resumes += 1;
                    break;
                }
            }
        }
    }
}

#[test]
fn watchers_see_every_revision_once_in_order_across_faults() {
    let settings = Settings::from_env(24, 1234);
    let mut cl = Cluster::start_with_etcd(3, &[]);
    cl.wait_leader(Duration::from_secs(30));
    let eps: Vec<String> = (1..=3)
        .map(|i| format!("http://{}", cl.etcd_addr(i)))
        .collect();
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let until = Arc::new(AtomicI64::new(0));
    let acked: Arc<parking_lot::Mutex<Vec<Event>>> = Default::default();
    let history: Arc<parking_lot::Mutex<Vec<Plain>>> = Default::default();
    let us = move || t0.elapsed().as_micros() as u64;
    let mut writers = Vec::new();
    for w in 0..3usize {
        let (acked, stop, eps) = (acked.clone(), stop.clone(), eps.clone());
        let history = history.clone();
        writers.push(cl.rt.spawn(async move {
            let mut i = 0;
            let mut n = w;
            while !stop.load(Ordering::SeqCst) {
                let conn = tokio::time::timeout(OP_TIMEOUT, KvClient::connect(eps[n % 3].clone()));
                let Ok(Ok(mut kv)) = conn.await else {
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                while !stop.load(Ordering::SeqCst) {
                    let (key, value) = (format!("/w/{}", i % 7), format!("w{w}-{i}"));
                    i += 1;
                    let put = kv.put(PutRequest {
                        key: Bytes::from(key.clone()),
                        value: Bytes::from(value.clone()),
                        ..Default::default()
                    });
                    let invoked = us();
                    let r = tokio::time::timeout(OP_TIMEOUT, put).await;
                    let rev = match r {
                        Ok(Ok(r)) => Some(r.into_inner().header.unwrap().revision),
                        _ => None,
                    };
                    history.lock().push(Plain {
                        client: w as u64,
                        what: format!("put {key} = {value}: revision {rev:?}"),
                        invoked,
                        completed: us(),
                        ok: rev.is_some(),
                    });
                    match rev {
                        Some(rev) => acked.lock().push((rev, key, value)),
                        None => {
                            n += 1;
                            break;
                        }
                    }
                }
            }
        }));
    }
    // Three watchers that move on when their node stalls, and three bound to one node each.
    let watchers: Vec<_> = (0..6)
        .map(|i| {
            cl.rt
                .spawn(watcher(eps.clone(), i % 3, until.clone(), i >= 3))
        })
        .collect();
    let faults = nemesis::run(&mut cl, t0, settings.run, &Kind::all(3), settings.seed);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        cl.rt.block_on(w).unwrap();
    }
    // The final revision, once every node has applied everything.
    cl.wait_converged(Duration::from_secs(60));
    cl.check_integrity("etcd");
    let final_rev = cl.rt.block_on(async {
        let mut kv = KvClient::connect(eps[0].clone()).await.unwrap();
        let r = kv
            .range(RangeRequest {
                key: Bytes::from_static(b"/w/"),
                range_end: Bytes::from_static(b"/w0"),
                count_only: true,
                ..Default::default()
            })
            .await
            .unwrap();
        r.into_inner().header.unwrap().revision
    });
    until.store(final_rev, Ordering::SeqCst);
    let watched: Vec<Watched> = watchers
        .into_iter()
        .map(|w| cl.rt.block_on(w).unwrap())
        .collect();
    let acked = acked.lock().clone();
    let summary = format!(
        "{} puts acknowledged, final revision {final_rev}; watchers saw {:?} events with {:?} resumes",
        acked.len(),
        watched.iter().map(|w| w.events.len()).collect::<Vec<_>>(),
        watched.iter().map(|w| w.resumes).collect::<Vec<_>>(),
    );
    let verdict = match verify(&watched, &acked, final_rev) {
        Ok(()) => format!("ok: {summary}\n"),
        Err(e) => format!("{e}\n{summary}\n"),
    };
    eprintln!(
        "{verdict}faults: {:?}",
        faults.iter().map(|f| &f.what).collect::<Vec<_>>()
    );
    nemesis::report("watch3", &history.lock(), &faults, &verdict);
    assert!(verdict.starts_with("ok"), "{verdict}");
    assert!(acked.len() >= 200, "too few puts acknowledged");
}

/// The watch guarantees: every watcher sees revisions 2..=`final_rev` once each, in order;
/// all agree; every acknowledged put is there as answered.
fn verify(watched: &[Watched], acked: &[Event], final_rev: i64) -> Result<(), String> {
    for (i, w) in watched.iter().enumerate() {
        for (j, e) in w.events.iter().enumerate() {
            let expected = j as i64 + 2;
            if e.0 != expected {
                return Err(format!(
                    "watcher {i}: event {j} is at revision {} (expected {expected}): {} (after {:?})",
                    e.0,
                    if e.0 < expected { "duplicate or out of order" } else { "revisions skipped" },
                    j.checked_sub(1).map(|p| &w.events[p])
                ));
            }
        }
        if w.events.len() as i64 + 1 != final_rev {
            return Err(format!(
                "watcher {i} stopped short of the final revision {final_rev}: {:?}",
                w.events.last()
            ));
        }
    }
    for (i, w) in watched.iter().enumerate().skip(1) {
        if let Some((a, b)) = w
            .events
            .iter()
            .zip(&watched[0].events)
            .find(|(a, b)| a != b)
        {
            return Err(format!("watchers 0 and {i} disagree: {b:?} vs {a:?}"));
        }
    }
    let by_rev: BTreeMap<i64, &Event> = watched[0].events.iter().map(|e| (e.0, e)).collect();
    for a in acked {
        if by_rev.get(&a.0).copied() != Some(a) {
            return Err(format!(
                "the acknowledged put {a:?} is not in the watch streams as answered: {:?}",
                by_rev.get(&a.0)
            ));
        }
    }
    Ok(())
}
