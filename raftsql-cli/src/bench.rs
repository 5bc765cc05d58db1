//! `raftsql bench sql`: dqlite-benchmark's key/value workloads against a running cluster.
//!
//! Each worker loops until the deadline, on its own client (its own connections) or, with
//! `--clients N`, on one of N clients the workers share (calls multiplexed):
//! `kvwrite` runs `INSERT OR REPLACE INTO model(key, value) VALUES (?, ?)` with random keys;
//! `kvreadwrite` does the same for half of its operations and `SELECT value FROM model WHERE
//! key = ?` (linearizable) for the other half. Progress is printed every second on stderr;
//! the result is one JSON line on stdout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftsql_core::{Client, Value};

use crate::{parse_endpoints, BenchSqlArgs, CliResult};

/// What to run.
pub struct BenchConfig {
    /// Nodes to contact.
    pub endpoints: Vec<SocketAddr>,
    /// Cluster name.
    pub cluster: String,
    /// Database.
    pub db: String,
    /// Concurrent workers.
    pub workers: usize,
    /// Clients the workers share, round robin (1..=workers).
    pub clients: usize,
    /// How long to run.
    pub duration: Duration,
    /// Key length in bytes (hex characters).
    pub key_size: usize,
    /// Value length in bytes.
    pub value_size: usize,
    /// `kvwrite` or `kvreadwrite`.
    pub workload: String,
    /// Distinct keys (random keys are drawn from this many).
    pub keys: u64,
    /// How to connect (plain TCP or TLS).
    pub dialer: raftsql_core::tls::Dialer,
}

fn key(n: u64, size: usize) -> String {
    let mut s = format!("{n:016x}");
    while s.len() < size {
        s.push_str(&format!("{:016x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    }
    s.truncate(size);
    s
}

/// The `p` quantile (0..=1) of latencies in microseconds, sorted ascending, in milliseconds
/// (0 for none).
pub(crate) fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Runs the benchmark and returns the JSON summary.
pub async fn run(cfg: BenchConfig) -> Result<serde_json::Value, String> {
    if !matches!(cfg.workload.as_str(), "kvwrite" | "kvreadwrite") {
        return Err(format!(
            "unknown workload {:?}: use kvwrite or kvreadwrite",
            cfg.workload
        ));
    }
    if cfg.workers == 0 {
        return Err("--workers must be at least 1".into());
    }
    let setup = Client::new(cfg.endpoints.clone(), &cfg.cluster).with_dialer(cfg.dialer.clone());
    setup
        .execute(
            &cfg.db,
            "CREATE TABLE IF NOT EXISTS model(key TEXT PRIMARY KEY, value BLOB)",
            vec![],
        )
        .await
        .map_err(|e| format!("creating the table: {e}"))?;
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + cfg.duration;
    let clients: Vec<Client> = (0..cfg.clients.max(1))
        .map(|_| Client::new(cfg.endpoints.clone(), &cfg.cluster).with_dialer(cfg.dialer.clone()))
        .collect();
    let mut tasks = Vec::new();
    for w in 0..cfg.workers {
        let client = clients[w % clients.len()].clone();
        let (ops, errors) = (ops.clone(), errors.clone());
        let (db, workload, key_size, value_size, keys) = (
            cfg.db.clone(),
            cfg.workload.clone(),
            cfg.key_size,
            cfg.value_size,
            cfg.keys,
        );
        tasks.push(tokio::spawn(async move {
            let mut lat_w: Vec<u32> = Vec::new();
            let mut lat_r: Vec<u32> = Vec::new();
            let mut seed = (w as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let mut first_error: Option<String> = None;
            while Instant::now() < deadline {
                let r = next();
                let k = key(r % keys, key_size);
                let t = Instant::now();
                let read = workload == "kvreadwrite" && r & (1 << 40) != 0;
                let res = if read {
                    client
                        .query(
                            &db,
                            "SELECT value FROM model WHERE key = ?1",
                            vec![Value::Text(k)],
                        )
                        .await
                        .map(|_| ())
                } else {
                    let v: Vec<u8> = (0..value_size).map(|i| (r >> (i % 56)) as u8).collect();
                    client
                        .execute(
                            &db,
                            "INSERT OR REPLACE INTO model(key, value) VALUES (?1, ?2)",
                            vec![Value::Text(k), Value::Blob(v)],
                        )
                        .await
                        .map(|_| ())
                };
                let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
                match res {
                    Ok(()) => {
                        if read {
                            lat_r.push(us)
                        } else {
                            lat_w.push(us)
                        }
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert(e.to_string());
                    }
                }
            }
            (lat_w, lat_r, first_error)
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
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    let mut first_error = None;
    for t in tasks {
        let (w, r, e) = t.await.map_err(|e| e.to_string())?;
        writes.extend(w);
        reads.extend(r);
        if first_error.is_none() {
            first_error = e;
        }
    }
    progress.abort();
    let elapsed = started.elapsed().as_secs_f64();
    writes.sort_unstable();
    reads.sort_unstable();
    let mut all: Vec<u32> = writes.iter().chain(reads.iter()).copied().collect();
    all.sort_unstable();
    let n = all.len() as f64;
    let mut out = serde_json::json!({
        "system": "raftsql",
        "workload": cfg.workload,
        "workers": cfg.workers,
        "clients": cfg.clients,
        "duration_s": (elapsed * 10.0).round() / 10.0,
        "ops": all.len(),
        "ops_per_s": (n / elapsed).round(),
        "errors": errors.load(Ordering::Relaxed),
        "p50_ms": percentile(&all, 0.50),
        "p99_ms": percentile(&all, 0.99),
        "max_ms": percentile(&all, 1.0),
        "writes_per_s": (writes.len() as f64 / elapsed).round(),
        "write_p50_ms": percentile(&writes, 0.50),
        "write_p99_ms": percentile(&writes, 0.99),
    });
    if !reads.is_empty() {
        out["reads_per_s"] = ((reads.len() as f64 / elapsed).round()).into();
        out["read_p50_ms"] = percentile(&reads, 0.50).into();
        out["read_p99_ms"] = percentile(&reads, 0.99).into();
    }
    if let Some(e) = first_error {
        out["first_error"] = e.into();
    }
    Ok(out)
}

pub(crate) async fn run_bench_sql(a: BenchSqlArgs) -> CliResult {
    let cfg = BenchConfig {
        endpoints: parse_endpoints(&a.endpoints)?,
        cluster: a.cluster,
        db: a.db,
        workers: a.workers,
        clients: a.clients.unwrap_or(a.workers).clamp(1, a.workers.max(1)),
        duration: Duration::from_secs(a.duration.max(1)),
        key_size: a.key_size.max(1),
        value_size: a.value_size,
        workload: a.workload,
        keys: a.keys.max(1),
        dialer: a.tls.dialer()?,
    };
    eprintln!(
        "raftsql bench sql: {} workers on {} clients, {} s, {}",
        cfg.workers,
        cfg.clients,
        cfg.duration.as_secs(),
        cfg.workload
    );
    let out = run(cfg).await?;
    println!("{out}");
    Ok(())
}
