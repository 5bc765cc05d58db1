//! Single-writer commit latency: plain SQLite (WAL, synchronous=FULL) versus a 3-node
//! raftsql cluster in this process.
//!
//! Each benchmark uses `iter_custom` and records every operation's latency itself; after it
//! finishes it prints `BENCH {"name", "n", "p50_us", "p99_us", "mean_us"}` to stderr, from
//! the measurement samples only (criterion calls the routine once per sample after warm-up,
//! so the last `SAMPLE_SIZE` calls are the measurement).
//!
//! `cargo bench -p raftsql-benches --bench commit`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use raftsql_benches::{bench_line, shutdown_all, start_cluster, wait_leader};
use raftsql_core::Value;

const SAMPLE_SIZE: usize = 20;
const KEYS: u64 = 10_000;
const VALUE_LEN: usize = 100;

/// A cheap generator of value bytes, so consecutive values differ.
struct Bytes(u64);
impl Bytes {
    fn next(&mut self) -> Vec<u8> {
        let mut v = Vec::with_capacity(VALUE_LEN);
        while v.len() < VALUE_LEN {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            v.extend_from_slice(&self.0.to_le_bytes());
        }
        v.truncate(VALUE_LEN);
        v
    }
}

/// Keeps the per-call latency batches and reports the measurement ones.
#[derive(Default)]
struct Recorder(Vec<Vec<Duration>>);
impl Recorder {
    fn report(&self, name: &str) {
        let start = self.0.len().saturating_sub(SAMPLE_SIZE);
        let samples: Vec<Duration> = self.0[start..].iter().flatten().copied().collect();
        if !samples.is_empty() {
            eprintln!("{}", bench_line(name, &samples));
        }
    }
}

fn rusqlite_wal_full(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("raftsql-bench-sqlite")
        .tempdir_in("/tmp")
        .unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("bench.db")).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    conn.execute_batch("PRAGMA synchronous=FULL; CREATE TABLE kv(k INTEGER PRIMARY KEY, v BLOB);")
        .unwrap();
    let mut stmt = conn
        .prepare("INSERT OR REPLACE INTO kv VALUES (?1, ?2)")
        .unwrap();
    let mut gen = Bytes(0x9E37_79B9_7F4A_7C15);
    let mut key = 0u64;
    let mut rec = Recorder::default();
    c.bench_function("rusqlite_wal_full", |b| {
        b.iter_custom(|iters| {
            let mut lat = Vec::with_capacity(iters as usize);
            let start = Instant::now();
            for _ in 0..iters {
                let v = gen.next();
                let t = Instant::now();
                stmt.execute(rusqlite::params![(key % KEYS) as i64, v])
                    .unwrap();
                lat.push(t.elapsed());
                key += 1;
            }
            let total = start.elapsed();
            rec.0.push(lat);
            total
        })
    });
    rec.report("rusqlite_wal_full");
}

fn raftsql_3_nodes(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("raftsql-bench-raft")
        .tempdir_in("/tmp")
        .unwrap();
    let nodes = rt.block_on(start_cluster(3, dir.path()));
    let li = rt.block_on(wait_leader(&nodes, Duration::from_secs(10)));
    let leader = nodes[li].clone();
    rt.block_on(leader.execute(
        "main",
        "CREATE TABLE kv(k INTEGER PRIMARY KEY, v BLOB)",
        vec![],
    ))
    .unwrap();
    let mut gen = Bytes(0x2545_F491_4F6C_DD1D);
    let mut key = 0u64;
    let mut rec = Recorder::default();
    c.bench_function("raftsql_3_nodes", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut lat = Vec::with_capacity(iters as usize);
                let start = Instant::now();
                for _ in 0..iters {
                    let params = vec![Value::Integer((key % KEYS) as i64), Value::Blob(gen.next())];
                    let t = Instant::now();
                    leader
                        .execute("main", "INSERT OR REPLACE INTO kv VALUES (?1, ?2)", params)
                        .await
                        .unwrap();
                    lat.push(t.elapsed());
                    key += 1;
                }
                let total = start.elapsed();
                rec.0.push(lat);
                total
            })
        })
    });
    rec.report("raftsql_3_nodes");
    if leader.status().raft.role != "leader" {
        eprintln!(
            "note: node {} lost leadership during the benchmark",
            leader.id()
        );
    }
    rt.block_on(shutdown_all(&nodes));
    drop(nodes);
    drop(leader);
    drop(rt);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = rusqlite_wal_full, raftsql_3_nodes
}
criterion_main!(benches);
