//! `raftsql bench etcd`: a load generator for any etcd v3 endpoint (raftsql's facade or a real
//! etcd), in the spirit of etcd's own `benchmark put` / `benchmark range`.
//!
//! `--clients N` workers, each with its own gRPC channel (its own HTTP/2 connection), assigned
//! to the endpoints round-robin, loop until the deadline running one operation at a time:
//! - `put`: a Put of a random key (`--keys` distinct keys of `--key-size` bytes) with a random
//!   `--value-size` value;
//! - `range`: a linearizable (`serializable: false`) Range of one random key;
//! - `txn`: kube-apiserver's create-or-update, `Txn(If(ModRevision(key) == R).Then(Put(key,
//!   value)).Else(Get(key)))`, R being the key's mod revision in a cache shared by the workers
//!   (kube's watch cache: filled by a keys-only list before the run, updated by every answer;
//!   0 for a key not in the store, i.e. a create). A failed compare (another worker won the
//!   race) is a conflict, not an error; the Else answer updates the cache.
//!
//! - `watch`: `--watchers` watch streams on the bench prefix (spread over the endpoints like
//!   the clients) while the clients put keys under it, each value stamped with its send time;
//!   the figure is the event latency, from the Put's send to each watcher's receipt
//!   (`--rate` caps the total puts per second, so the latency is not only queueing).
//!
//! `--preload` first writes every key once (Txns of 64 puts), so that ranges find values.
//! Progress is printed every second on stderr; the result is one JSON line on stdout (ops,
//! ops/s, errors, p50/p99/max latency of the successful operations, and for `txn` the
//! conflicts).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use raftsql_etcd::pb::etcdserverpb::{
    compare, kv_client::KvClient, request_op, response_op, Compare, PutRequest, RangeRequest,
    RequestOp, TxnRequest,
};

use crate::bench::percentile;

/// `raftsql bench etcd` arguments.
#[derive(Args, Debug)]
pub struct BenchEtcdArgs {
    /// etcd endpoints: HOST:PORT[,HOST:PORT...] (or http://HOST:PORT); clients are spread over
    /// them round-robin. Writes must go to a node that accepts them.
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Concurrent clients, each with its own gRPC channel.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// put, range or txn (kube-style create-or-update).
    #[arg(long, default_value = "put")]
    op: String,
    /// Key size in bytes.
    #[arg(long, default_value_t = 32)]
    key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Write every key once before the timed run.
    #[arg(long)]
    preload: bool,
    /// With --op watch: the number of watch streams.
    #[arg(long, default_value_t = 16)]
    watchers: usize,
    /// With --op watch: total puts per second (0: as fast as the clients go).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// A label copied into the JSON line (e.g. "raftsql" or "etcd").
    #[arg(long, default_value = "")]
    label: String,
}

/// The key of number `n`: `key_size` hex characters.
fn key(n: u64, size: usize) -> Vec<u8> {
    let mut s = format!("{n:016x}");
    while s.len() < size {
        s.push_str(&format!("{:016x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    }
    s.truncate(size);
    s.into_bytes()
}

fn value(r: u64, size: usize) -> Vec<u8> {
    (0..size).map(|i| (r >> (i % 56)) as u8).collect()
}

fn endpoint_urls(s: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            if p.contains("://") {
                p.to_string()
            } else {
                format!("http://{p}")
            }
        })
        .collect();
    if urls.is_empty() {
        return Err("--endpoints: no endpoint given".into());
    }
    Ok(urls)
}

fn put_op(k: Vec<u8>, v: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        })),
    }
}

/// The kube-apiserver create-or-update Txn.
pub(crate) fn kube_txn(k: Vec<u8>, mod_rev: i64, v: Vec<u8>) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Mod as i32,
            key: k.clone().into(),
            range_end: Default::default(),
            target_union: Some(compare::TargetUnion::ModRevision(mod_rev)),
        }],
        success: vec![put_op(k.clone(), v)],
        failure: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: k.into(),
                ..Default::default()
            })),
        }],
    }
}

/// xorshift64, seeded per worker.
struct Rng(u64);

impl Rng {
    fn new(worker: usize) -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(((worker as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d) ^ t) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What one worker measured.
struct WorkerResult {
    latencies_us: Vec<u32>,
    conflicts: u64,
    first_error: Option<String>,
}

/// Runs `raftsql bench etcd` and prints its JSON line.
pub async fn main(a: BenchEtcdArgs) -> Result<(), String> {
    if !matches!(a.op.as_str(), "put" | "range" | "txn" | "watch") {
        return Err(format!(
            "unknown --op {:?}: use put, range, txn or watch",
            a.op
        ));
    }
    if a.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    let urls = endpoint_urls(&a.endpoints)?;
    if a.op == "watch" {
        return watch_bench(&a, &urls).await;
    }
    let (keys, key_size, value_size) = (a.keys.max(1), a.key_size.max(1), a.value_size);
    let duration = Duration::from_secs(a.duration.max(1));
    eprintln!(
        "raftsql bench etcd: {} {} clients over {}, {} s, {} keys of {} B, values of {} B",
        a.op,
        a.clients,
        urls.join(","),
        duration.as_secs(),
        keys,
        key_size,
        value_size
    );
    let mut clients = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        let url = urls[i % urls.len()].clone();
        let c = KvClient::connect(url.clone())
            .await
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        clients.push(c);
    }

    if a.preload {
        let started = Instant::now();
        let loaders = clients.len().min(16) as u64;
        let mut tasks = Vec::new();
        for (w, c) in clients.iter().take(loaders as usize).enumerate() {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                let mut batch = Vec::new();
                let mut n = w as u64;
                while n < keys {
                    batch.push(put_op(key(n, key_size), value(n, value_size)));
                    n += loaders;
                    if batch.len() == 64 || n >= keys {
                        let req = TxnRequest {
                            success: std::mem::take(&mut batch),
                            ..Default::default()
                        };
                        c.txn(req)
                            .await
                            .map_err(|e| format!("preload: {:?}: {}", e.code(), e.message()))?;
                    }
                }
                Ok::<(), String>(())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        eprintln!(
            "  preloaded {keys} keys in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    // The txn workload's revision cache, filled like kube's watch cache by a list.
    let cache: Arc<Mutex<HashMap<Vec<u8>, i64>>> = Arc::new(Mutex::new(HashMap::new()));
    if a.op == "txn" {
        let t = Instant::now();
        let mut c = clients[0].clone();
        let mut from: Vec<u8> = vec![0];
        loop {
            let r = c
                .range(RangeRequest {
                    key: from.clone().into(),
                    range_end: vec![0u8].into(),
                    limit: 10_000,
                    keys_only: true,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("listing the keys: {:?}: {}", e.code(), e.message()))?
                .into_inner();
            let mut m = cache.lock().unwrap();
            for kv in &r.kvs {
                m.insert(kv.key.to_vec(), kv.mod_revision);
            }
            match (r.more, r.kvs.last()) {
                (true, Some(last)) => {
                    from = last.key.to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        eprintln!(
            "  cached the revisions of {} keys in {:.1} s",
            cache.lock().unwrap().len(),
            t.elapsed().as_secs_f64()
        );
    }
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for (w, mut c) in clients.into_iter().enumerate() {
        let (ops, errors, op, cache) = (ops.clone(), errors.clone(), a.op.clone(), cache.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(w);
            let mut res = WorkerResult {
                latencies_us: Vec::new(),
                conflicts: 0,
                first_error: None,
            };
            while Instant::now() < deadline {
                let r = rng.next();
                let n = r % keys;
                let t = Instant::now();
                let out = match op.as_str() {
                    "put" => c
                        .put(PutRequest {
                            key: key(n, key_size).into(),
                            value: value(r, value_size).into(),
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                    "range" => c
                        .range(RangeRequest {
                            key: key(n, key_size).into(),
                            serializable: false,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                    _ => {
                        let k = key(n, key_size);
                        let rev = cache.lock().unwrap().get(&k).copied().unwrap_or(0);
                        c.txn(kube_txn(k.clone(), rev, value(r, value_size)))
                            .await
                            .map(|resp| {
                                let resp = resp.into_inner();
                                if resp.succeeded {
                                    let rev = resp.header.as_ref().map_or(0, |h| h.revision);
                                    cache.lock().unwrap().insert(k, rev);
                                } else {
                                    res.conflicts += 1;
                                    let cur = match resp
                                        .responses
                                        .first()
                                        .and_then(|o| o.response.as_ref())
                                    {
                                        Some(response_op::Response::ResponseRange(rr)) => {
                                            rr.kvs.first().map_or(0, |kv| kv.mod_revision)
                                        }
                                        _ => 0,
                                    };
                                    cache.lock().unwrap().insert(k, cur);
                                }
                            })
                    }
                };
                let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
                match out {
                    Ok(()) => {
                        res.latencies_us.push(us);
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        res.first_error
                            .get_or_insert_with(|| format!("{:?}: {}", e.code(), e.message()));
                        // Do not spin on an endpoint that refuses everything.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            res
        }));
    }
    let progress = {
        let (ops, errors) = (ops.clone(), errors.clone());
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = ops.load(Ordering::Relaxed);
                eprintln!(
                    "  {:>4.0}s  ops {n:>9}  ({:>7}/s)  errors {}",
                    started.elapsed().as_secs_f64(),
                    n - last,
                    errors.load(Ordering::Relaxed)
                );
                last = n;
            }
        })
    };
    let mut all: Vec<u32> = Vec::new();
    let mut conflicts = 0;
    let mut first_error = None;
    for t in tasks {
        let r = t.await.map_err(|e| e.to_string())?;
        all.extend(r.latencies_us);
        conflicts += r.conflicts;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    progress.abort();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let mut out = serde_json::json!({
        "bench": "etcd",
        "label": a.label,
        "op": a.op,
        "clients": a.clients,
        "endpoints": urls,
        "duration_s": (elapsed * 10.0).round() / 10.0,
        "ops": all.len(),
        "ops_per_s": (all.len() as f64 / elapsed).round(),
        "errors": errors.load(Ordering::Relaxed),
        "p50_ms": percentile(&all, 0.50),
        "p99_ms": percentile(&all, 0.99),
        "max_ms": percentile(&all, 1.0),
    });
    if a.op == "txn" {
        out["txn_conflicts"] = conflicts.into();
    }
    if let Some(e) = first_error {
        out["first_error"] = e.into();
    }
    println!("{out}");
    Ok(())
}

/// `--op watch`: event latency from Put to watchers.
async fn watch_bench(a: &BenchEtcdArgs, urls: &[String]) -> Result<(), String> {
    use raftsql_etcd::pb::etcdserverpb::{
        watch_client::WatchClient, watch_request, WatchCreateRequest, WatchRequest,
    };
    const PREFIX: &[u8] = b"/raftsql-bench-watch/";
    let mut prefix_end = PREFIX.to_vec();
    *prefix_end.last_mut().unwrap() += 1;
    let duration = Duration::from_secs(a.duration.max(1));
    let watchers = a.watchers.max(1);
    eprintln!(
        "raftsql bench etcd: watch, {watchers} watchers, {} writers at {} puts/s over {}, {} s",
        a.clients,
        if a.rate == 0 {
            "max".to_string()
        } else {
            a.rate.to_string()
        },
        urls.join(","),
        duration.as_secs()
    );
    let base = Instant::now();
    let stamp = move || base.elapsed().as_nanos() as u64;
    // Open every watch and wait for its `created` before writing.
    let mut streams = Vec::new();
    for i in 0..watchers {
        let url = urls[i % urls.len()].clone();
        let mut w = WatchClient::connect(url.clone())
            .await
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: PREFIX.to_vec().into(),
                    range_end: prefix_end.clone().into(),
                    ..Default::default()
                },
            )),
        })
        .await
        .map_err(|e| e.to_string())?;
        let mut stream = w
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("watch on {url}: {:?}: {}", e.code(), e.message()))?
            .into_inner();
        let created = stream
            .message()
            .await
            .map_err(|e| format!("watch on {url}: {e}"))?;
        if !created.is_some_and(|r| r.created) {
            return Err(format!("watch on {url}: no `created` answer"));
        }
        streams.push((tx, stream));
    }
    // A watch channel, not a Notify: `notify_waiters` wakes only the tasks waiting at that
    // instant, and a watcher busy with an event then waited forever for one more (the
    // benchmark hung, against etcd and raftsql alike). A watch receiver sees the change
    // whenever it next looks.
    let (writes_done, done_rx) = tokio::sync::watch::channel(false);
    let mut watch_tasks = Vec::new();
    for (tx, mut stream) in streams {
        let mut done = done_rx.clone();
        watch_tasks.push(tokio::spawn(async move {
            let _keep_open = tx;
            let mut lat: Vec<u32> = Vec::new();
            let mut grace = None;
            loop {
                let next = async {
                    match grace {
                        Some(t) => tokio::time::timeout_at(t, stream.message()).await.ok(),
                        None => Some(stream.message().await),
                    }
                };
                tokio::select! {
                    m = next => match m {
                        Some(Ok(Some(r))) => {
                            let now = stamp();
                            for ev in r.events {
                                if let Some(kv) = ev.kv {
                                    if kv.value.len() >= 8 {
                                        let sent = u64::from_le_bytes(kv.value[..8].try_into().unwrap());
                                        lat.push((now.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
                                    }
                                }
                            }
                        }
                        _ => break,
                    },
                    _ = done.changed(), if grace.is_none() => {
                        // Writers stopped: give in-flight events 2 s to arrive.
                        grace = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                    }
                }
            }
            lat
        }));
    }
    let puts = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let per_writer = if a.rate == 0 {
        None
    } else {
        Some(Duration::from_secs_f64(a.clients as f64 / a.rate as f64))
    };
    let mut writers = Vec::new();
    for w in 0..a.clients {
        let url = urls[w % urls.len()].clone();
        let mut c = KvClient::connect(url.clone())
            .await
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        let (puts, errors, value_size) = (puts.clone(), errors.clone(), a.value_size.max(8));
        writers.push(tokio::spawn(async move {
            let mut tick = per_writer.map(|p| {
                let mut i = tokio::time::interval(p);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            });
            let mut n = 0u64;
            // Each acknowledged put's latency in us: what an event's latency is made of,
            // beside its way to the watchers.
            let mut acked: Vec<u32> = Vec::new();
            while Instant::now() < deadline {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let mut k = PREFIX.to_vec();
                k.extend_from_slice(format!("{w}/{}", n % 1000).as_bytes());
                n += 1;
                let mut v = vec![0u8; value_size];
                let sent = stamp();
                v[..8].copy_from_slice(&sent.to_le_bytes());
                let r = c
                    .put(PutRequest {
                        key: k.into(),
                        value: v.into(),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(_) => {
                        acked.push((stamp().saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
                        puts.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
            acked
        }));
    }
    let mut put_lat: Vec<u32> = Vec::new();
    for t in writers {
        put_lat.extend(t.await.map_err(|e| e.to_string())?);
    }
    put_lat.sort_unstable();
    let elapsed = started.elapsed().as_secs_f64();
    let _ = writes_done.send(true);
    let mut all: Vec<u32> = Vec::new();
    let mut per_watcher = Vec::new();
    for t in watch_tasks {
        let l = t.await.map_err(|e| e.to_string())?;
        per_watcher.push(l.len());
        all.extend(l);
    }
    all.sort_unstable();
    let puts = puts.load(Ordering::Relaxed);
    let out = serde_json::json!({
        "bench": "etcd",
        "label": a.label,
        "op": "watch",
        "clients": a.clients,
        "watchers": watchers,
        "endpoints": urls,
        "duration_s": (elapsed * 10.0).round() / 10.0,
        "puts": puts,
        "puts_per_s": (puts as f64 / elapsed).round(),
        "errors": errors.load(Ordering::Relaxed),
        "events": all.len(),
        "events_expected": puts * watchers as u64,
        "min_events_per_watcher": per_watcher.iter().min(),
        "p50_ms": percentile(&all, 0.50),
        "p99_ms": percentile(&all, 0.99),
        "max_ms": percentile(&all, 1.0),
        "put_p50_ms": percentile(&put_lat, 0.50),
        "put_p99_ms": percentile(&put_lat, 0.99),
    });
    println!("{out}");
    Ok(())
}
