//! `raftsql-grow`: resident memory while a database grows.
//!
//! Starts `--nodes` raftsql nodes in this process, writes ~1 MiB transactions through the
//! leader (one `INSERT ... SELECT` of 64 rows of `randomblob(16384)` each) until the
//! leader's `main` database (`<data>/state/*/main.db` plus its `-wal`) reaches `--gib` GiB,
//! and every 128 MiB prints the database size, the process's VmRSS / VmHWM (and the
//! RssAnon / RssFile / RssShmem split) from /proc/self/status, elapsed time and throughput.
//! RSS is for the whole process, i.e. all nodes together. Ends with a `GROW {...}` JSON line.
//!
//! ```text
//! raftsql-grow [--gib 2] [--nodes 3] [--dir PATH] [--keep]
//! ```
//! The data lives in a fresh temporary directory (under /tmp, or inside `--dir PATH`) that
//! is deleted at the end, also on Ctrl-C, unless `--keep` is given.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftsql_benches::{proc_status_kib, shutdown_all, start_cluster, wait_leader};
use raftsql_core::Error;

const MIB: u64 = 1 << 20;
const REPORT_EVERY: u64 = 128 * MIB;
const ROWS_PER_TX: u64 = 64;
const BLOB: u64 = 16384;

struct Args {
    gib: f64,
    nodes: u64,
    dir: Option<PathBuf>,
    keep: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        gib: 2.0,
        nodes: 3,
        dir: None,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    let usage = "usage: raftsql-grow [--gib N] [--nodes N] [--dir PATH] [--keep]";
    while let Some(arg) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .unwrap_or_else(|| panic!("{name} needs a value\n{usage}"))
        };
        match arg.as_str() {
            "--gib" => a.gib = val("--gib").parse().expect("--gib: a number"),
            "--nodes" => a.nodes = val("--nodes").parse().expect("--nodes: an integer"),
            "--dir" => a.dir = Some(PathBuf::from(val("--dir"))),
            "--keep" => a.keep = true,
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}\n{usage}"),
        }
    }
    assert!(a.gib > 0.0 && a.nodes >= 1, "{usage}");
    a
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Size of `<node>/state/*/main.db` plus `main.db-wal`.
fn db_bytes(node_dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(node_dir.join("state")) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| file_len(&e.path().join("main.db")) + file_len(&e.path().join("main.db-wal")))
        .sum()
}

/// Bytes of all regular files under `p`.
fn du(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => du(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

fn mem_line() -> (String, std::collections::BTreeMap<String, u64>) {
    let m = proc_status_kib();
    let g = |k: &str| m.get(k).copied().unwrap_or(0) as f64 / 1024.0;
    (
        format!(
            "VmRSS {:>7.1} MiB  VmHWM {:>7.1} MiB  (RssAnon {:>7.1}  RssFile {:>6.1}  RssShmem {:>6.1} MiB)",
            g("VmRSS"),
            g("VmHWM"),
            g("RssAnon"),
            g("RssFile"),
            g("RssShmem")
        ),
        m,
    )
}

fn main() {
    let args = parse_args();
    let target = (args.gib * (1u64 << 30) as f64) as u64;
    let tmp = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).expect("create --dir");
            tempfile::Builder::new()
                .prefix("raftsql-grow")
                .tempdir_in(d)
        }
        None => tempfile::Builder::new()
            .prefix("raftsql-grow")
            .tempdir_in("/tmp"),
    }
    .expect("create the data directory");
    let base = tmp.path().to_path_buf();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        rt.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: stopping and cleaning up");
                stop.store(true, Ordering::SeqCst);
            }
        });
    }

    let (m0, _) = mem_line();
    println!(
        "raftsql-grow: target {:.2} GiB in db 'main', {} nodes in ONE process, data under {}",
        args.gib,
        args.nodes,
        base.display()
    );
    println!(
        "RSS figures are for the whole process (all {} nodes together). Before start: {m0}",
        args.nodes
    );
    println!(
        "each transaction: INSERT of {ROWS_PER_TX} rows of randomblob({BLOB}) = {} KiB payload",
        ROWS_PER_TX * BLOB / 1024
    );

    let summary = rt.block_on(async {
        let nodes = start_cluster(args.nodes, &base).await;
        let mut li = wait_leader(&nodes, Duration::from_secs(10)).await;
        let (m1, _) = mem_line();
        println!("cluster up, leader node {}: {m1}", nodes[li].id());
        nodes[li].execute("main", "CREATE TABLE blobs(id INTEGER PRIMARY KEY, v BLOB)", vec![]).await.expect("create table");
        let sql = format!(
            "INSERT INTO blobs(v) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {ROWS_PER_TX}) \
             SELECT randomblob({BLOB}) FROM c"
        );
        let start = Instant::now();
        let (mut txns, mut retries, mut payload) = (0u64, 0u64, 0u64);
        let mut next_report = REPORT_EVERY;
        let (mut last_t, mut last_b) = (0.0f64, 0u64);
        let mut tx_lat_max = Duration::ZERO;
        let mut size = 0u64;
        println!(
            "{:>9} {:>8}  {:<95} {:>8} {:>10} {:>10}",
            "db MiB", "elapsed", "memory (whole process)", "txns", "MiB/s avg", "MiB/s last"
        );
        while size < target && !stop.load(Ordering::SeqCst) {
            let t = Instant::now();
            match nodes[li].execute("main", &sql, vec![]).await {
                Ok(_) => {
                    txns += 1;
                    payload += ROWS_PER_TX * BLOB;
                    tx_lat_max = tx_lat_max.max(t.elapsed());
                }
                Err(e @ (Error::NotLeader { .. } | Error::OutcomeUnknown | Error::Unavailable(_) | Error::Timeout(_))) => {
                    retries += 1;
                    eprintln!("write failed ({e}); waiting for a leader");
                    li = wait_leader(&nodes, Duration::from_secs(30)).await;
                    continue;
                }
                Err(e) => panic!("write failed: {e}"),
            }
            let leader_dir = base.join(format!("n{}", nodes[li].id()));
            size = db_bytes(&leader_dir);
            if size >= next_report || size >= target {
                let el = start.elapsed().as_secs_f64();
                let (m, _) = mem_line();
                println!(
                    "{:>9.1} {:>7.1}s  {:<95} {:>8} {:>10.1} {:>10.1}",
                    mib(size),
                    el,
                    m,
                    txns,
                    mib(size) / el,
                    mib(size.saturating_sub(last_b)) / (el - last_t)
                );
                (last_t, last_b) = (el, size);
                while next_report <= size {
                    next_report += REPORT_EVERY;
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let leader = nodes[li].clone();
        let st = leader.status();
        let (mlast, mem) = mem_line();
        let disk_all = du(&base);
        let per_node: Vec<u64> = nodes.iter().map(|n| db_bytes(&base.join(format!("n{}", n.id())))).collect();
        shutdown_all(&nodes).await;
        drop(leader);
        drop(nodes);
        let (mafter, mem_after) = mem_line();
        println!("end (nodes running): {mlast}");
        println!("after shutdown:      {mafter}");
        serde_json::json!({
            "target_gib": args.gib,
            "nodes": args.nodes,
            "rss_scope": format!("whole process, {} nodes in-process", args.nodes),
            "interrupted": stop.load(Ordering::SeqCst),
            "leader_db_bytes": size,
            "db_bytes_per_node": per_node,
            "disk_bytes_all_nodes": disk_all,
            "payload_bytes": payload,
            "txns": txns,
            "retries": retries,
            "max_tx_latency_ms": (tx_lat_max.as_secs_f64() * 1e4).round() / 10.0,
            "elapsed_s": (elapsed * 10.0).round() / 10.0,
            "db_mib_per_s": (mib(size) / elapsed * 10.0).round() / 10.0,
            "raft_commit": st.raft.commit,
            "raft_log_first": st.raft.log_first,
            "raft_log_last": st.raft.log_last,
            "checkpoint": st.checkpoint,
            "vm_rss_kib": mem.get("VmRSS"),
            "vm_hwm_kib": mem.get("VmHWM"),
            "rss_anon_kib": mem.get("RssAnon"),
            "rss_file_kib": mem.get("RssFile"),
            "rss_shmem_kib": mem.get("RssShmem"),
            "vm_rss_after_shutdown_kib": mem_after.get("VmRSS"),
        })
    });
    drop(rt);
    println!("GROW {summary}");
    if args.keep {
        let p = tmp.keep();
        println!("data kept in {}", p.display());
    } else {
        let p = base.clone();
        tmp.close().expect("delete the data directory");
        println!("deleted {} (exists now: {})", p.display(), p.exists());
    }
}
