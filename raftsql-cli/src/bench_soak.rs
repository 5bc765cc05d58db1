//! `raftsql bench soak`: sustained mixed load on a cluster of its own, and what every node's
//! resources do over time (issue 15).
//!
//! Starts 3 `raftsql node` processes on loopback with the etcd facade, then for
//! `--duration` seconds runs, all at once:
//! - `--sql-writers` SQL clients replacing 1 KiB rows of 100,000 keys (`soak` table);
//! - `--etcd-clients` etcd clients doing kube-apiserver's create-or-update Txn on 10,000
//!   keys under `/registry/configmaps/` (1 KiB values), a tenth of them deletes;
//! - a lister: every second, a paginated list of `/registry/configmaps/` (500 keys a page,
//!   every page after the first at the first page's revision, as kube's `continue` does);
//! - `--watches` watches over 10 sub-prefixes of it, on 4 streams spread over the nodes;
//! - a compactor: every `--compact-every` seconds, a Compact to the revision it saw the
//!   time before (kube-apiserver compacts every 5 minutes the same way).
//!
//! Every second it samples each node: resident memory, WAL bytes, Raft log bytes on disk,
//! checkpoint index and first log index, and the store's compact revision; a progress line
//! goes to stderr every 10 s. At the end: `soak.csv` (every sample), `soak.svg` (the curves)
//! in `--out`, and one JSON line on stdout (start and end of each curve, ops/s, list page and
//! Compact latencies).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use raftsql_core::{Client, Value};
use raftsql_etcd::pb::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request, CompactionRequest,
    DeleteRangeRequest, RangeRequest, WatchCreateRequest, WatchRequest,
};

use crate::bench::percentile;
use crate::bench_etcd::kube_txn;
use crate::bench_failover::{work_dir, Procs};
use crate::CliResult;

/// `raftsql bench soak`.
#[derive(Args, Debug)]
pub struct BenchSoakArgs {
    /// Seconds of load.
    #[arg(long, default_value_t = 600)]
    duration: u64,
    /// SQL writers.
    #[arg(long, default_value_t = 8)]
    sql_writers: usize,
    /// etcd clients (kube-style create-or-update and delete).
    #[arg(long, default_value_t = 8)]
    etcd_clients: usize,
    /// etcd watches.
    #[arg(long, default_value_t = 100)]
    watches: usize,
    /// Seconds between Compacts.
    #[arg(long, default_value_t = 30)]
    compact_every: u64,
    /// Address of node 1; nodes 2 and 3 listen on the next ports, their etcd facades 100
    /// ports above.
    #[arg(long, default_value = "127.0.0.1:7501")]
    listen: SocketAddr,
    /// Where the nodes keep data and logs (a new temporary directory by default).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where soak.csv and soak.svg go (default: the current directory).
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Extra arguments for every node, space-separated (e.g. "--checkpoint-frames 2000").
    #[arg(long, default_value = "")]
    node_args: String,
    /// The `raftsql` binary the nodes run (default: this one), e.g. an older build to
    /// compare against under the same load.
    #[arg(long)]
    node_bin: Option<PathBuf>,
}

/// One node at one moment.
#[derive(Clone, Copy, Default)]
struct NodeSample {
    leader: bool,
    rss: u64,
    wal: u64,
    /// Bytes of the Raft log's segment files (the last one's length counts the zeros written
    /// ahead of the appends, up to a segment; the spare segment is not counted).
    raft_log: u64,
    checkpoint: u64,
    log_first: u64,
}

/// The cluster at one moment.
struct Sample {
    at: f64,
    nodes: Vec<NodeSample>,
    compact_rev: i64,
    sql_ops: u64,
    etcd_ops: u64,
    events: u64,
}

/// The first etcd errors are printed (an error count alone does not say what failed).
const ERRORS_SHOWN: u64 = 10;

/// Prints the first [`ERRORS_SHOWN`] etcd errors of the run.
fn note_error(c: &Counters, e: &impl std::fmt::Display) {
    if c.etcd_errors.load(Ordering::Relaxed) < ERRORS_SHOWN {
        eprintln!("etcd error: {e}");
    }
}

/// Counters the load tasks bump.
#[derive(Default)]
struct Counters {
    sql: AtomicU64,
    sql_errors: AtomicU64,
    etcd: AtomicU64,
    etcd_errors: AtomicU64,
    events: AtomicU64,
    /// Watch events that went backwards in revision (must stay 0).
    disorder: AtomicU64,
}

fn dir_bytes(dir: &Path, suffix: &str) -> u64 {
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            total += dir_bytes(&p, suffix);
        } else if p.to_string_lossy().ends_with(suffix) {
            total += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    total
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Runs the soak and prints its JSON line.
pub async fn main(a: BenchSoakArgs) -> CliResult {
    let cluster = "raftsql-soak";
    let (dir, _tmp) = work_dir(a.dir.as_ref(), "raftsql-soak")?;
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let addrs: Vec<SocketAddr> = (0..3u16)
        .map(|i| SocketAddr::new(a.listen.ip(), a.listen.port() + i))
        .collect();
    let etcd: Vec<SocketAddr> = addrs
        .iter()
        .map(|s| SocketAddr::new(s.ip(), s.port() + 100))
        .collect();
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let extra: Vec<String> = a.node_args.split_whitespace().map(String::from).collect();
    let args = (0..3)
        .map(|i| {
            let mut v: Vec<String> = vec![
                "node".into(),
                "--id".into(),
                (i + 1).to_string(),
                "--listen".into(),
                addrs[i].to_string(),
                "--bootstrap-peers".into(),
                peers.clone(),
                "--data-dir".into(),
                dir.join(format!("node{}", i + 1)).display().to_string(),
                "--cluster".into(),
                cluster.into(),
                "--etcd-listen".into(),
                etcd[i].to_string(),
            ];
            v.extend(extra.iter().cloned());
            v
        })
        .collect();
    let mut p = Procs::new(dir.clone(), addrs.clone(), args, a.node_bin.clone())?;
    for i in 0..3 {
        p.start(i)?;
    }
    let sql = Arc::new(Client::new(addrs.clone(), cluster));
    let t0 = Instant::now();
    loop {
        let r = sql
            .execute(
                "main",
                "CREATE TABLE IF NOT EXISTS soak(k INTEGER PRIMARY KEY, v BLOB NOT NULL)",
                vec![],
            )
            .await;
        match r {
            Ok(_) => break,
            Err(e) if t0.elapsed() > Duration::from_secs(60) => {
                return Err(format!(
                    "the cluster did not start: {e}; logs in {}",
                    dir.display()
                ))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let urls: Vec<String> = etcd.iter().map(|a| format!("http://{a}")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let page_ms: Arc<Mutex<Vec<u32>>> = Default::default();
    let compact_ms: Arc<Mutex<Vec<(f64, u32)>>> = Default::default();
    let mut tasks = Vec::new();
    eprintln!(
        "raftsql bench soak: {} s, {} SQL writers, {} etcd clients, {} watches, a Compact every {} s; nodes in {}",
        a.duration,
        a.sql_writers,
        a.etcd_clients,
        a.watches,
        a.compact_every,
        dir.display()
    );
    // SQL writers, each with its own client (connection).
    for w in 0..a.sql_writers as u64 {
        let (stop, c, addrs) = (stop.clone(), counters.clone(), addrs.clone());
        tasks.push(tokio::spawn(async move {
            let client = Client::new(addrs, cluster);
            let mut x = 0x9e37_79b9_7f4a_7c15 ^ (w + 1).wrapping_mul(0xabcd_ef01);
            while !stop.load(Ordering::Relaxed) {
                let k = xorshift(&mut x) % 100_000;
                let r = client
                    .execute(
                        "main",
                        "INSERT INTO soak(k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                        vec![Value::Integer(k as i64), Value::Blob(vec![x as u8; 1024])],
                    )
                    .await;
                match r {
                    Ok(_) => c.sql.fetch_add(1, Ordering::Relaxed),
                    Err(_) => c.sql_errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    // etcd clients: kube's create-or-update with a shared cache of mod revisions.
    let cache: Arc<Mutex<HashMap<Vec<u8>, i64>>> = Default::default();
    for w in 0..a.etcd_clients as u64 {
        let (stop, c, url, cache) = (
            stop.clone(),
            counters.clone(),
            urls[w as usize % 3].clone(),
            cache.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut x = 0x2545_f491_4f6c_dd1d ^ (w + 1).wrapping_mul(0x1234_5678);
            let Ok(mut kv) = KvClient::connect(url).await else {
                c.etcd_errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            while !stop.load(Ordering::Relaxed) {
                let n = xorshift(&mut x) % 10_000;
                let key = format!("/registry/configmaps/soak-{}/cm-{n:05}", n % 10).into_bytes();
                let ok = if x % 10 == 0 {
                    let r = kv
                        .delete_range(DeleteRangeRequest {
                            key: key.clone().into(),
                            ..Default::default()
                        })
                        .await;
                    match &r {
                        Ok(_) => {
                            cache.lock().unwrap().insert(key, 0);
                        }
                        Err(e) => note_error(&c, e),
                    }
                    r.is_ok()
                } else {
                    let rev = cache.lock().unwrap().get(&key).copied().unwrap_or(0);
                    let value = vec![(x >> 8) as u8; 1024];
                    match kv.txn(kube_txn(key.clone(), rev, value)).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            let now = if r.succeeded {
                                r.header.map(|h| h.revision)
                            } else {
                                // The Else branch read the key: its current mod revision.
                                r.responses.first().and_then(|op| match &op.response {
                                    Some(raftsql_etcd::pb::etcdserverpb::response_op::Response::ResponseRange(rr)) => {
                                        Some(rr.kvs.first().map_or(0, |kv| kv.mod_revision))
                                    }
                                    _ => None,
                                })
                            };
                            if let Some(now) = now {
                                cache.lock().unwrap().insert(key, now);
                            }
                            true
                        }
                        Err(e) => {
                            note_error(&c, &e);
                            false
                        }
                    }
                };
                if ok {
                    c.etcd.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.etcd_errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    // The lister: a paginated list at the first page's revision, every second.
    {
        let (stop, url, page_ms) = (stop.clone(), urls[1].clone(), page_ms.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(mut kv) = KvClient::connect(url).await else {
                return;
            };
            while !stop.load(Ordering::Relaxed) {
                let mut key = b"/registry/configmaps/".to_vec();
                let end = b"/registry/configmaps0".to_vec();
                let mut rev = 0;
                loop {
                    let started = Instant::now();
                    let r = kv
                        .range(RangeRequest {
                            key: key.clone().into(),
                            range_end: end.clone().into(),
                            limit: 500,
                            revision: rev,
                            ..Default::default()
                        })
                        .await;
                    let Ok(r) = r else { break };
                    page_ms
                        .lock()
                        .unwrap()
                        .push((started.elapsed().as_micros() as u32).max(1));
                    let r = r.into_inner();
                    if rev == 0 {
                        rev = r.header.map_or(0, |h| h.revision);
                    }
                    match (r.more, r.kvs.last()) {
                        (true, Some(last)) => {
                            key = last.key.to_vec();
                            key.push(0);
                        }
                        _ => break,
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }
    // Watches: `--watches` over 10 sub-prefixes, on 4 streams.
    for s in 0..4usize {
        let (stop, c, url) = (stop.clone(), counters.clone(), urls[s % 3].clone());
        let mine: Vec<i64> = (0..a.watches as i64)
            .filter(|w| *w as usize % 4 == s)
            .collect();
        tasks.push(tokio::spawn(async move {
            let Ok(mut w) = WatchClient::connect(url).await else {
                return;
            };
            let (tx, rx) = tokio::sync::mpsc::channel(mine.len().max(1));
            for id in &mine {
                let prefix = format!("/registry/configmaps/soak-{}/", id % 10);
                let mut end = prefix.clone().into_bytes();
                *end.last_mut().unwrap() += 1;
                let _ = tx
                    .send(WatchRequest {
                        request_union: Some(watch_request::RequestUnion::CreateRequest(
                            WatchCreateRequest {
                                key: Bytes::from(prefix),
                                range_end: Bytes::from(end),
                                watch_id: *id,
                                ..Default::default()
                            },
                        )),
                    })
                    .await;
            }
            let Ok(resp) = w
                .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            else {
                return;
            };
            let mut stream = resp.into_inner();
            let mut last: HashMap<i64, i64> = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                let Ok(Ok(Some(r))) =
                    tokio::time::timeout(Duration::from_secs(1), stream.message()).await
                else {
                    continue;
                };
                for e in &r.events {
                    let rev = e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                    let prev = last.insert(r.watch_id, rev).unwrap_or(0);
                    if rev < prev {
                        c.disorder.fetch_add(1, Ordering::Relaxed);
                    }
                }
                c.events.fetch_add(r.events.len() as u64, Ordering::Relaxed);
            }
            drop(tx);
        }));
    }
    // The compactor: to the revision it saw last time.
    {
        let (stop, url, compact_ms) = (stop.clone(), urls[0].clone(), compact_ms.clone());
        let every = Duration::from_secs(a.compact_every.max(1));
        tasks.push(tokio::spawn(async move {
            let Ok(mut kv) = KvClient::connect(url).await else {
                return;
            };
            let mut seen = 0i64;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(every).await;
                let now = kv
                    .range(RangeRequest {
                        key: b"/registry/".to_vec().into(),
                        count_only: true,
                        ..Default::default()
                    })
                    .await
                    .ok()
                    .and_then(|r| r.into_inner().header.map(|h| h.revision))
                    .unwrap_or(0);
                if seen > 0 {
                    let started = Instant::now();
                    let r = kv
                        .compact(CompactionRequest {
                            revision: seen,
                            physical: false,
                        })
                        .await;
                    if r.is_ok() {
                        compact_ms.lock().unwrap().push((
                            t0.elapsed().as_secs_f64(),
                            started.elapsed().as_micros() as u32,
                        ));
                    }
                }
                seen = now;
            }
        }));
    }
    // The sampler.
    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut last_progress = Instant::now();
    while started.elapsed() < Duration::from_secs(a.duration) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut nodes = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let mut n = NodeSample {
                rss: p.pid(i).map_or(0, rss_bytes),
                raft_log: dir_bytes(&dir.join(format!("node{}", i + 1)).join("raft"), ".seg"),
                ..Default::default()
            };
            if let Ok(Ok(s)) = tokio::time::timeout(
                Duration::from_millis(500),
                Client::status_of(*addr, cluster, false),
            )
            .await
            {
                n.leader = s.role == "leader";
                n.checkpoint = s.checkpoint_index;
                n.log_first = s.log_first_index;
                // The WAL is held in memory: its size comes from the node.
                n.wal = s.wal_bytes.values().sum();
            }
            nodes.push(n);
        }
        let compact_rev = sql
            .query(
                raftsql_etcd::DB,
                "SELECT value FROM meta WHERE name = 'compact_rev'",
                vec![],
            )
            .await
            .ok()
            .and_then(|r| match r.rows.first().map(|r| &r[0]) {
                Some(Value::Integer(v)) => Some(*v),
                _ => None,
            })
            .unwrap_or(0);
        let s = Sample {
            at: started.elapsed().as_secs_f64(),
            nodes,
            compact_rev,
            sql_ops: counters.sql.load(Ordering::Relaxed),
            etcd_ops: counters.etcd.load(Ordering::Relaxed),
            events: counters.events.load(Ordering::Relaxed),
        };
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            let prev = samples
                .iter()
                .rev()
                .find(|p| s.at - p.at >= 9.5)
                .or(samples.first())
                .unwrap_or(&s);
            let dt = (s.at - prev.at).max(1e-9);
            let mb = |b: u64| b as f64 / 1e6;
            let per_node: Vec<String> = s
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    format!(
                        "n{}{} rss {:.0} wal {:.0} log {:.0} MB",
                        i + 1,
                        if n.leader { "*" } else { "" },
                        mb(n.rss),
                        mb(n.wal),
                        mb(n.raft_log)
                    )
                })
                .collect();
            eprintln!(
                "{:>4.0} s: sql {:.0}/s, etcd {:.0}/s, events {:.0}/s, compact rev {} | {}",
                s.at,
                (s.sql_ops - prev.sql_ops) as f64 / dt,
                (s.etcd_ops - prev.etcd_ops) as f64 / dt,
                (s.events - prev.events) as f64 / dt,
                s.compact_rev,
                per_node.join(" | ")
            );
        }
        samples.push(s);
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    drop(p);
    write_csv(&a.out.join("soak.csv"), &samples)?;
    std::fs::write(
        a.out.join("soak.svg"),
        svg(&samples, &compact_ms.lock().unwrap()),
    )
    .map_err(|e| format!("{}: {e}", a.out.display()))?;
    let pages = page_ms.lock().unwrap().clone();
    let compacts: Vec<u32> = compact_ms.lock().unwrap().iter().map(|c| c.1).collect();
    println!("{}", summary(&a, &samples, &counters, pages, compacts));
    Ok(())
}

fn write_csv(path: &Path, samples: &[Sample]) -> CliResult {
    let mut out = String::from("t_s,compact_rev,sql_ops,etcd_ops,watch_events");
    for i in 1..=3 {
        out.push_str(&format!(
            ",n{i}_leader,n{i}_rss,n{i}_wal,n{i}_raft_log,n{i}_checkpoint,n{i}_log_first"
        ));
    }
    out.push('\n');
    for s in samples {
        out.push_str(&format!(
            "{:.1},{},{},{},{}",
            s.at, s.compact_rev, s.sql_ops, s.etcd_ops, s.events
        ));
        for n in &s.nodes {
            out.push_str(&format!(
                ",{},{},{},{},{},{}",
                u8::from(n.leader),
                n.rss,
                n.wal,
                n.raft_log,
                n.checkpoint,
                n.log_first
            ));
        }
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

/// The JSON line: each curve at the start (first 10% of samples) and at the end (last 10%).
fn summary(
    a: &BenchSoakArgs,
    samples: &[Sample],
    c: &Counters,
    pages: Vec<u32>,
    compacts: Vec<u32>,
) -> serde_json::Value {
    let n = samples.len().max(1);
    let tenth = (n / 10).max(1);
    let head = &samples[..tenth.min(samples.len())];
    let tail = &samples[samples.len().saturating_sub(tenth)..];
    let mean = |part: &[Sample], f: &dyn Fn(&NodeSample) -> u64, leader: bool| -> f64 {
        let v: Vec<u64> = part
            .iter()
            .flat_map(|s| s.nodes.iter().filter(|n| n.leader == leader).map(f))
            .collect();
        v.iter().sum::<u64>() as f64 / v.len().max(1) as f64 / 1e6
    };
    let curve = |f: &dyn Fn(&NodeSample) -> u64| {
        serde_json::json!({
            "leader_start_mb": (mean(head, f, true) * 10.0).round() / 10.0,
            "leader_end_mb": (mean(tail, f, true) * 10.0).round() / 10.0,
            "followers_start_mb": (mean(head, f, false) * 10.0).round() / 10.0,
            "followers_end_mb": (mean(tail, f, false) * 10.0).round() / 10.0,
        })
    };
    let rate = |part: &[Sample], f: &dyn Fn(&Sample) -> u64| -> f64 {
        match (part.first(), part.last()) {
            (Some(a), Some(b)) if b.at > a.at => (f(b) - f(a)) as f64 / (b.at - a.at),
            _ => 0.0,
        }
    };
    // Microseconds in, milliseconds out (`percentile` divides by 1,000).
    let ms = |mut v: Vec<u32>| {
        v.sort_unstable();
        if v.is_empty() {
            return serde_json::json!({"n": 0});
        }
        let r = |x: f64| (x * 10.0).round() / 10.0;
        serde_json::json!({"n": v.len(), "p50": r(percentile(&v, 0.5)), "p99": r(percentile(&v, 0.99)), "max": r(percentile(&v, 1.0))})
    };
    let advanced = |f: &dyn Fn(&NodeSample) -> u64| {
        samples
            .windows(2)
            .filter(|w| {
                let l = w[1].nodes.iter().position(|n| n.leader);
                l.is_some_and(|l| f(&w[1].nodes[l]) > f(&w[0].nodes[l]))
            })
            .count()
    };
    serde_json::json!({
        "duration_s": a.duration,
        "sql_writers": a.sql_writers,
        "etcd_clients": a.etcd_clients,
        "watches": a.watches,
        "samples": samples.len(),
        "rss": curve(&|n| n.rss),
        "wal": curve(&|n| n.wal),
        "raft_log": curve(&|n| n.raft_log),
        "sql_ops_per_s": {"start": rate(head, &|s| s.sql_ops).round(), "end": rate(tail, &|s| s.sql_ops).round()},
        "etcd_ops_per_s": {"start": rate(head, &|s| s.etcd_ops).round(), "end": rate(tail, &|s| s.etcd_ops).round()},
        "watch_events_per_s": {"start": rate(head, &|s| s.events).round(), "end": rate(tail, &|s| s.events).round()},
        "leader_checkpoint_advanced_in_samples": advanced(&|n| n.checkpoint),
        "leader_log_compacted_in_samples": advanced(&|n| n.log_first),
        "compact_rev_end": samples.last().map_or(0, |s| s.compact_rev),
        "list_page_ms": ms(pages),
        "compact_ms": ms(compacts),
        "errors": {"sql": c.sql_errors.load(Ordering::Relaxed), "etcd": c.etcd_errors.load(Ordering::Relaxed)},
        "watch_events_out_of_order": c.disorder.load(Ordering::Relaxed),
    })
}

/// One curve of a panel: colour, points (time, value), stroke width.
type Line = (String, Vec<(f64, f64)>, f64);

/// Five panels over time: RSS, WAL and Raft log per node (the leader's line drawn thick), ops
/// per second, and Compact latency.
fn svg(samples: &[Sample], compacts_us: &[(f64, u32)]) -> String {
    const W: f64 = 900.0;
    const PH: f64 = 150.0;
    const L: f64 = 60.0;
    let colors = ["#1f77b4", "#d62728", "#2ca02c"];
    let t_max = samples.last().map_or(1.0, |s| s.at).max(1.0);
    let x = |t: f64| L + (W - L - 20.0) * t / t_max;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{}" font-family="sans-serif" font-size="11">"#,
        PH * 5.0 + 60.0
    );
    out.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
    let mut panel = |row: usize, title: &str, unit: &str, lines: Vec<Line>| {
        let top = 20.0 + row as f64 * (PH + 10.0);
        let ymax = lines
            .iter()
            .flat_map(|l| l.1.iter().map(|p| p.1))
            .fold(0.0f64, f64::max)
            .max(1e-9);
        out.push_str(&format!(
            r#"<text x="{L}" y="{}" font-weight="bold">{title} (max {ymax:.1} {unit})</text>"#,
            top + 10.0
        ));
        out.push_str(&format!(
            r##"<rect x="{L}" y="{}" width="{}" height="{}" fill="none" stroke="#999"/>"##,
            top + 15.0,
            W - L - 20.0,
            PH - 25.0
        ));
        out.push_str(&format!(
            r#"<text x="5" y="{}">{ymax:.0}</text><text x="5" y="{}">0</text>"#,
            top + 25.0,
            top + PH - 10.0
        ));
        for (color, pts, width) in lines {
            let path: Vec<String> = pts
                .iter()
                .map(|(t, v)| {
                    format!(
                        "{:.1},{:.1}",
                        x(*t),
                        top + PH - 10.0 - (PH - 25.0) * v / ymax
                    )
                })
                .collect();
            out.push_str(&format!(
                r#"<polyline fill="none" stroke="{color}" stroke-width="{width}" points="{}"/>"#,
                path.join(" ")
            ));
        }
    };
    let per_node = |f: &dyn Fn(&NodeSample) -> f64| -> Vec<Line> {
        (0..3)
            .map(|i| {
                let pts = samples.iter().map(|s| (s.at, f(&s.nodes[i]))).collect();
                let led = samples.iter().filter(|s| s.nodes[i].leader).count() * 2 > samples.len();
                (colors[i].to_string(), pts, if led { 2.5 } else { 1.0 })
            })
            .collect()
    };
    panel(
        0,
        "RSS per node (node 1 blue, 2 red, 3 green; the leader thick)",
        "MB",
        per_node(&|n| n.rss as f64 / 1e6),
    );
    panel(1, "WAL per node", "MB", per_node(&|n| n.wal as f64 / 1e6));
    panel(
        2,
        "Raft log on disk per node",
        "MB",
        per_node(&|n| n.raft_log as f64 / 1e6),
    );
    let rate = |f: &dyn Fn(&Sample) -> u64| -> Vec<(f64, f64)> {
        samples
            .windows(2)
            .map(|w| {
                (
                    w[1].at,
                    (f(&w[1]) - f(&w[0])) as f64 / (w[1].at - w[0].at).max(1e-9),
                )
            })
            .collect()
    };
    panel(
        3,
        "ops/s: SQL writes blue, etcd writes red, watch events / 10 green",
        "/s",
        vec![
            (colors[0].into(), rate(&|s| s.sql_ops), 1.0),
            (colors[1].into(), rate(&|s| s.etcd_ops), 1.0),
            (colors[2].into(), rate(&|s| s.events / 10), 1.0),
        ],
    );
    panel(
        4,
        "Compact latency",
        "ms",
        vec![(
            colors[1].into(),
            compacts_us
                .iter()
                .map(|(t, us)| (*t, *us as f64 / 1e3))
                .collect(),
            1.5,
        )],
    );
    out.push_str(&format!(
        r#"<text x="{L}" y="{}">time (s), 0 to {t_max:.0}</text></svg>"#,
        PH * 5.0 + 55.0
    ));
    out
}
