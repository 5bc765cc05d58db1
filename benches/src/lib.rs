//! Helpers shared by the raftsql benchmarks: an in-process cluster, latency statistics and
//! process memory figures.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use raftsql_core::{Node, NodeConfig};

/// A loopback address with a port that was free a moment ago (bound, then released).
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr")
}

/// Starts `n` nodes in this process (must run inside a tokio runtime), each on its own
/// loopback port and data directory `<base>/n<id>`, all listing each other as peers, with
/// the default tick and other defaults of [`NodeConfig::new`].
pub async fn start_cluster(n: u64, base: &Path) -> Vec<Node> {
    let peers: BTreeMap<u64, SocketAddr> = (1..=n).map(|id| (id, free_addr())).collect();
    let mut nodes = Vec::new();
    for (&id, &addr) in &peers {
        let mut cfg = NodeConfig::new(id, base.join(format!("n{id}")), addr);
        cfg.peers = peers.clone();
        nodes.push(
            Node::start(cfg)
                .await
                .unwrap_or_else(|e| panic!("start node {id}: {e}")),
        );
    }
    nodes
}

/// Waits (up to `timeout`) until one node reports the leader role; returns its index.
pub async fn wait_leader(nodes: &[Node], timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(i) = nodes.iter().position(|n| n.status().raft.role == "leader") {
            return i;
        }
        assert!(
            Instant::now() < deadline,
            "no leader elected within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Stops every node.
pub async fn shutdown_all(nodes: &[Node]) {
    for n in nodes {
        n.shutdown().await;
    }
}

/// Percentile (nearest rank) of sorted samples, `p` in 0..=100.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The `BENCH {...}` line for `samples` (one latency per operation).
pub fn bench_line(name: &str, samples: &[Duration]) -> String {
    let mut s = samples.to_vec();
    s.sort();
    let us = |d: Duration| (d.as_secs_f64() * 1e6 * 10.0).round() / 10.0;
    let mean = if s.is_empty() {
        Duration::ZERO
    } else {
        s.iter().sum::<Duration>() / s.len() as u32
    };
    let v = serde_json::json!({
        "name": name,
        "n": s.len(),
        "p50_us": us(percentile(&s, 50.0)),
        "p99_us": us(percentile(&s, 99.0)),
        "mean_us": us(mean),
    });
    format!("BENCH {v}")
}

/// Fields of `/proc/self/status` in KiB (VmRSS, VmHWM, RssAnon, RssFile, RssShmem).
pub fn proc_status_kib() -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if matches!(k, "VmRSS" | "VmHWM" | "RssAnon" | "RssFile" | "RssShmem") {
            if let Some(n) = v.split_whitespace().next().and_then(|x| x.parse().ok()) {
                out.insert(k.to_string(), n);
            }
        }
    }
    out
}
