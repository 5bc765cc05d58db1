//! What compaction and a history page cost at 100k and 1M revisions, old way and new
//! (issue 15). Not a test of behaviour (`tests.rs` has those): a measurement, run with
//! `cargo test -p raftsql-etcd --release -- --ignored history_costs --nocapture`.

use std::time::Instant;

use rusqlite::Connection;

use super::*;
use crate::pb::etcdserverpb::PutRequest;

const KEYS: u64 = 10_000;

/// A store on a file with `revisions` puts over `KEYS` keys of 200-byte values.
fn build(path: &std::path::Path, revisions: u64) -> Connection {
    let c = Connection::open(path).unwrap();
    c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF")
        .unwrap();
    ensure_schema(&c).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    c.execute_batch("BEGIN").unwrap();
    for i in 0..revisions {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut t = WriteTxn::begin(&c).unwrap();
        put(
            &c,
            &mut t,
            &PutRequest {
                key: format!("/registry/configmaps/ns/{:05}", x % KEYS)
                    .into_bytes()
                    .into(),
                value: vec![b'v'; 200].into(),
                ..Default::default()
            },
        )
        .unwrap();
        t.finish(&c).unwrap();
        if i % 10_000 == 9_999 {
            c.execute_batch("COMMIT; BEGIN").unwrap();
        }
    }
    c.execute_batch("COMMIT").unwrap();
    c
}

fn compact_from(c: &Connection, from: i64, target: i64) -> std::time::Duration {
    let started = Instant::now();
    let mut lo = from;
    while lo < target {
        let hi = (lo + 1000).min(target);
        c.execute_batch("BEGIN").unwrap();
        prune_history(c, lo, hi, target).unwrap();
        c.execute_batch("COMMIT").unwrap();
        lo = hi;
    }
    started.elapsed()
}

#[test]
#[ignore]
fn history_costs() {
    for revisions in [100_000u64, 1_000_000] {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let c = build(&dir.path().join("a.db"), revisions);
        let built = started.elapsed();
        // A first compaction long ago (kube compacts every 5 minutes), then 5,000 more
        // revisions before the next one.
        let current = meta(&c, "rev", 1).unwrap();
        compact_from(&c, 0, current - 5_000);
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        drop(c);
        std::fs::copy(dir.path().join("a.db"), dir.path().join("b.db")).unwrap();
        let a = Connection::open(dir.path().join("a.db")).unwrap();
        let b = Connection::open(dir.path().join("b.db")).unwrap();
        let target = current - 100;
        let full = compact_from(&a, 0, target);
        let done = meta(&b, "compact_done", 0).unwrap();
        let incremental = compact_from(&b, done, target);
        // A `continue` page of 500 keys from the middle of the range, at a revision a
        // moment ago (100 writes since).
        let iv = Interval::new(
            b"/registry/configmaps/ns/05000",
            b"/registry/configmaps/ns0",
        );
        let rev = current - 100;
        let time = |f: &dyn Fn() -> (Vec<Kv>, i64)| {
            let started = Instant::now();
            let mut out = f();
            for _ in 0..9 {
                out = f();
            }
            (started.elapsed() / 10, out)
        };
        let (by_key, old) = time(&|| range_at_by_key(&b, &iv, rev, 501).unwrap());
        let (recent, new) = time(&|| range_at_recent(&b, &iv, rev, 501).unwrap().unwrap());
        assert_eq!(old, new);
        eprintln!(
            "{revisions} revisions ({KEYS} keys, built in {built:?}): compaction of the \
             last 4,900 revisions: {full:?} in {} writes from revision 0 (before), \
             {incremental:?} in {} writes from the last compaction (after); a 500-key page at a revision 100 writes ago \
             (count {}): {by_key:?} one seek per key (before), {recent:?} live rows plus \
             the writes since (after)",
            (target + 999) / 1000,
            (target - done + 999) / 1000,
            new.1
        );
    }
}
