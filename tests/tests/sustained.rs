//! Sustained concurrent writes (issue 15): 16 writers replace 1 KiB rows of 100,000 keys for
//! about a minute (`RAFTSQL_SUSTAINED_SECS`, default 60) on a 3-node cluster, and every node
//! is sampled each second: its checkpoint index, first Raft log index, WAL size and resident
//! memory.
//!
//! Checked (not timed): on the leader, the checkpoint and the first log index keep
//! advancing while the writers run (a checkpoint that waits for a gap between batches never
//! comes under concurrent load), and its WAL stays within twice `--checkpoint-frames` plus
//! one batch. The samples are printed as a table, so the figures are in the log.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftsql_core::Value;
use raftsql_tests::harness::Cluster;

const WRITERS: usize = 16;
const KEYS: i64 = 100_000;
const CHECKPOINT_FRAMES: u64 = 500;

struct Sample {
    at: Duration,
    leader: u64,
    writes: u64,
    /// Per node: (checkpoint index, first log index, WAL bytes, RSS KiB).
    nodes: Vec<(u64, u64, u64, u64)>,
}

#[test]
fn concurrent_writers_keep_the_leaders_checkpoint_and_log_moving() {
    let secs: u64 = std::env::var("RAFTSQL_SUSTAINED_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let frames = CHECKPOINT_FRAMES.to_string();
    let cl = Cluster::start(
        3,
        &[
            "--checkpoint-frames",
            &frames,
            "--compact-log-bytes",
            "4194304",
        ],
    );
    cl.wait_leader(Duration::from_secs(30));
    cl.rt
        .block_on(cl.client().execute(
            "main",
            "CREATE TABLE kv(k INTEGER PRIMARY KEY, v BLOB NOT NULL)",
            vec![],
        ))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS as u64)
        .map(|w| {
            let (stop, writes, client) = (stop.clone(), writes.clone(), cl.client());
            cl.rt.spawn(async move {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w + 1).wrapping_mul(0x1234_5678_9abc);
                while !stop.load(Ordering::SeqCst) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let r = client
                        .execute(
                            "main",
                            "INSERT INTO kv(k, v) VALUES (?1, ?2) \
                             ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                            vec![
                                Value::Integer((x % KEYS as u64) as i64),
                                Value::Blob(vec![(x >> 32) as u8; 1024]),
                            ],
                        )
                        .await;
                    r.expect("a write on a healthy cluster");
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    let mut samples = Vec::new();
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        let mut leader = 0;
        let mut nodes = Vec::new();
        for id in 1..=3 {
            let st = cl.status(id, false).expect("status of a running node");
            if st.role == "leader" {
                leader = id;
            }
            nodes.push((
                st.checkpoint_index,
                st.log_first_index,
                cl.wal_bytes(id, "main"),
                cl.vm_rss_kib(id),
            ));
        }
        samples.push(Sample {
            at: t0.elapsed(),
            leader,
            writes: writes.load(Ordering::Relaxed),
            nodes,
        });
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        cl.rt.block_on(w).unwrap();
    }
    eprintln!("  s  leader  writes/s | per node: checkpoint, first log index, WAL MB, RSS MB");
    let mut last_writes = 0;
    for s in &samples {
        let cols: Vec<String> = s
            .nodes
            .iter()
            .map(|(c, f, w, r)| format!("{c:>7} {f:>7} {:>6.1} {:>5}", *w as f64 / 1e6, r / 1024))
            .collect();
        eprintln!(
            "{:>3} {:>7} {:>9} | {}",
            s.at.as_secs(),
            s.leader,
            s.writes - last_writes,
            cols.join(" | ")
        );
        last_writes = s.writes;
    }
    // The leader's own column, over the samples in which it led.
    let led: Vec<&(u64, u64, u64, u64)> = samples
        .iter()
        .filter(|s| s.leader != 0)
        .map(|s| &s.nodes[(s.leader - 1) as usize])
        .collect();
    let steps =
        |f: fn(&(u64, u64, u64, u64)) -> u64| led.windows(2).filter(|w| f(w[1]) > f(w[0])).count();
    let checkpoints = steps(|n| n.0);
    let compactions = steps(|n| n.1);
    let max_wal = led.iter().map(|n| n.2).max().unwrap_or(0);
    let total = samples.last().map(|s| s.writes).unwrap_or(0);
    eprintln!(
        "{total} writes in {secs} s by {WRITERS} writers; the leader's checkpoint advanced in \
         {checkpoints} of {} samples, its first log index in {compactions}; its WAL peaked at \
         {:.1} MB",
        led.len(),
        max_wal as f64 / 1e6
    );
    assert!(total > 1000, "too few writes ({total}) to mean anything");
    // A sample every second; under this load a checkpoint is due every second or two.
    assert!(
        checkpoints * 2 >= led.len(),
        "the leader's checkpoint advanced in only {checkpoints} of {} samples",
        led.len()
    );
    assert!(
        compactions * 2 >= led.len(),
        "the leader's Raft log was compacted in only {compactions} of {} samples",
        led.len()
    );
    // 2x the checkpoint setting, in frames of a 4 KiB page plus their 24-byte headers, and
    // room for the batch applied while the checkpoint was due.
    let bound = 2 * CHECKPOINT_FRAMES * (4096 + 24) + (4 << 20);
    assert!(
        max_wal <= bound,
        "the leader's WAL reached {max_wal} bytes (bound {bound})"
    );
}
