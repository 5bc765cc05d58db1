//! etcdctl (Debian's etcd-client, the real client) end to end against a 3-node raftsql
//! cluster, through a follower's endpoint (writes are forwarded to the leader).

use std::time::Duration;

use raftsql_tests::harness::{self, Cluster, Etcdctl};

const T: Duration = Duration::from_secs(30);

/// etcdctl through the harness's wrapper: (succeeded, stdout, stderr).
fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut e = Etcdctl::new(endpoint).args(args);
    if let Some(s) = stdin {
        e = e.stdin(s);
    }
    let out = e.run();
    (out.ok, out.stdout, out.stderr)
}

#[test]
fn etcdctl_through_a_follower() {
    if !harness::etcdctl_available() {
        assert!(
            std::env::var("CI").is_err(),
            "etcdctl (Debian etcd-client) is required in CI"
        );
        eprintln!("SKIPPED: etcdctl is not installed");
        return;
    }
    let c = Cluster::start_with_etcd(3, &[]);
    let leader = c.wait_leader(T);
    let followers: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let f = c.etcd_addr(followers[0]).to_string();
    let other = c.etcd_addr(followers[1]).to_string();
    let run = |args: &[&str]| {
        let (ok, out, err) = etcdctl(&f, args, None);
        assert!(ok, "etcdctl {args:?} failed: {err}");
        out
    };
    assert_eq!(run(&["put", "/app/a", "1"]), "OK\n");
    assert_eq!(run(&["put", "/app/b", "2"]), "OK\n");
    assert_eq!(run(&["put", "/other", "x"]), "OK\n");
    assert_eq!(run(&["get", "/app/a"]), "/app/a\n1\n");
    assert_eq!(run(&["get", "--prefix", "/app/"]), "/app/a\n1\n/app/b\n2\n");
    assert_eq!(
        run(&["get", "--prefix", "/app/", "--keys-only"]),
        "/app/a\n\n/app/b\n\n"
    );
    // A linearizable read through the other follower sees every acknowledged write.
    let (ok, out, _) = etcdctl(&other, &["get", "/other"], None);
    assert!(ok);
    assert_eq!(out, "/other\nx\n");
    // JSON output carries revisions as etcd numbers them.
    let j: serde_json::Value =
        serde_json::from_str(&run(&["get", "/app/b", "-w", "json"])).unwrap();
    assert_eq!(j["header"]["revision"], 4);
    assert_eq!(j["kvs"][0]["create_revision"], 3);
    assert_eq!(j["kvs"][0]["version"], 1);
    // Transactions (interactive input format: compares, blank line, success, blank, failure).
    let (ok, out, err) = etcdctl(
        &f,
        &["txn"],
        Some("value(\"/app/a\") = \"1\"\n\nput /app/a 10\nget /app/b\n\nput /app/a fail\n\n"),
    );
    assert!(ok, "{err}");
    assert_eq!(out, "SUCCESS\n\nOK\n\n/app/b\n2\n");
    assert_eq!(run(&["get", "/app/a", "--print-value-only"]), "10\n");
    // Delete, then read the past.
    assert_eq!(run(&["del", "--prefix", "/app/"]), "2\n");
    assert_eq!(run(&["get", "--prefix", "/app/"]), "");
    assert_eq!(run(&["get", "/app/a", "--rev", "2"]), "/app/a\n1\n");
    // Compaction, and etcd's error for a compacted revision.
    assert_eq!(run(&["compaction", "5"]), "compacted revision 5\n");
    let (ok, _, err) = etcdctl(&f, &["get", "/app/a", "--rev", "2"], None);
    assert!(!ok);
    assert!(
        err.contains("required revision has been compacted"),
        "{err}"
    );
    // Endpoint status and member list.
    let j: serde_json::Value =
        serde_json::from_str(&run(&["endpoint", "status", "-w", "json"])).unwrap();
    let st = &j[0]["Status"];
    // 3.6.0: the level whose watch progress semantics raftsql implements (etcd_current.rs).
    assert_eq!(st["version"], raftsql_etcd::ETCD_VERSION);
    assert_eq!(st["version"], "3.6.0");
    assert_eq!(st["leader"], leader);
    assert!(st["dbSize"].as_i64().unwrap() > 0, "{st}");
    let members = run(&["member", "list"]);
    assert_eq!(members.lines().count(), 3, "{members}");
    assert!(
        members.contains("raftsql-1") && members.contains("started"),
        "{members}"
    );
    // Leases: a key attached to a lease goes with it.
    let granted = run(&["lease", "grant", "100"]);
    let id = granted.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(run(&["put", "/leased", "v", "--lease", &id]), "OK\n");
    assert!(run(&["lease", "timetolive", &id, "--keys"]).contains("/leased"));
    assert!(run(&["lease", "revoke", &id]).contains("revoked"));
    assert_eq!(run(&["get", "/leased"]), "");
    c.wait_converged(T);
    // A snapshot streams (with etcd's trailing sha256, which etcdctl checks).
    let snap = c.dir.path().join("snap.db");
    let out = run(&["snapshot", "save", snap.to_str().unwrap()]);
    assert!(out.contains("Snapshot saved"), "{out}");
    assert!(std::fs::metadata(&snap).unwrap().len() > 4096);
    // Every member hashes its key history the same.
    let hashes: Vec<String> = (1..=3)
        .map(|i| {
            let (ok, out, err) = etcdctl(
                &c.etcd_addr(i).to_string(),
                &["endpoint", "hashkv", "-w", "json"],
                None,
            );
            assert!(ok, "{err}");
            let j: serde_json::Value = serde_json::from_str(&out).unwrap();
            j[0]["HashKV"]["hash"].to_string()
        })
        .collect();
    assert!(
        hashes.iter().all(|h| h == &hashes[0] && h != "0"),
        "{hashes:?}"
    );
}

/// etcdctl's `snapshot save` of a 64 MiB etcd database: the stream is read from one read
/// transaction in 1 MiB chunks, so the node's peak memory grows by a few of them and its
/// page cache, not by the database (issue 15: the whole database was built in memory).
#[test]
fn a_large_snapshot_streams_in_bounded_memory() {
    use bytes::Bytes;
    use raftsql_etcd::pb::etcdserverpb::{kv_client::KvClient, PutRequest};
    if !harness::etcdctl_available() {
        assert!(std::env::var("CI").is_err(), "etcdctl is required in CI");
        eprintln!("SKIPPED: etcdctl is not installed");
        return;
    }
    let c = Cluster::start_with_etcd(3, &[]);
    let leader = c.wait_leader(T);
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    c.rt.block_on(async {
        let mut kv = KvClient::connect(format!("http://{}", c.etcd_addr(leader)))
            .await
            .unwrap();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        // 128 values of 512 KiB: each is stored once (etcd schema 2), so the database
        // holds 64 MiB of them.
        for i in 0..128 {
            let value: Vec<u8> = (0..512 * 1024)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            kv.put(PutRequest {
                key: Bytes::from(format!("/big/{i}")),
                value: Bytes::from(value),
                ..Default::default()
            })
            .await
            .unwrap();
        }
    });
    c.wait_converged(T);
    // Resident memory sampled every 10 ms while etcdctl runs.
    let before = c.vm_rss_kib(follower);
    let snap = c.dir.path().join("big.db");
    let endpoint = c.etcd_addr(follower).to_string();
    let path = snap.to_str().unwrap().to_string();
    let saver = std::thread::spawn(move || etcdctl(&endpoint, &["snapshot", "save", &path], None));
    let mut peak = before;
    while !saver.is_finished() {
        peak = peak.max(c.vm_rss_kib(follower));
        std::thread::sleep(Duration::from_millis(10));
    }
    let (ok, out, err) = saver.join().unwrap();
    assert!(ok && out.contains("Snapshot saved"), "{out}{err}");
    let size = std::fs::metadata(&snap).unwrap().len();
    let grew = peak.saturating_sub(before);
    eprintln!(
        "snapshot of {:.1} MiB saved; the follower's peak memory grew by {:.1} MiB (from {:.1} MiB)",
        size as f64 / 1048576.0,
        grew as f64 / 1024.0,
        before as f64 / 1024.0
    );
    assert!(
        size > 64 << 20,
        "the snapshot holds the database: {size} bytes"
    );
    // A 16 MiB page cache of the reader plus a few 1 MiB chunks in flight; building the
    // database in memory costs at least its 64 MiB.
    assert!(
        grew < 40 << 10,
        "the follower's peak memory grew by {grew} KiB for a {size}-byte snapshot"
    );
}
