use std::collections::BTreeSet;

use rusqlite::Connection;

use super::*;
use crate::error::{EtcdError, R};
use crate::pb::etcdserverpb::*;

fn db() -> Connection {
    let c = Connection::open_in_memory().unwrap();
    ensure_schema(&c).unwrap();
    c
}

/// A random history of puts and deletes over 40 keys, one revision each.
fn history(c: &Connection, revisions: usize, seed: u64) {
    let mut x = seed;
    for _ in 0..revisions {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let key = format!("/k/{:02}", x % 40).into_bytes();
        let mut t = WriteTxn::begin(c).unwrap();
        if (x >> 8).is_multiple_of(5) {
            let mut end = key.clone();
            end.push(b'~');
            delete_range(
                c,
                &mut t,
                &DeleteRangeRequest {
                    key: key.into(),
                    range_end: end.into(),
                    ..Default::default()
                },
            )
            .unwrap();
        } else {
            put(
                c,
                &mut t,
                &PutRequest {
                    key: key.into(),
                    value: format!("v{x}").into_bytes().into(),
                    ..Default::default()
                },
            )
            .unwrap();
        }
        // A delete of nothing leaves the revision as it was, as in etcd.
        t.finish(c).unwrap();
    }
}

fn ranges() -> Vec<Interval> {
    vec![
        Interval::new(b"/k/", b"/k0"),
        Interval::new(b"/k/1", b"/k/3"),
        Interval::new(b"/k/07", b""),
        Interval::new(b"\0", b"\0"),
    ]
}

#[test]
fn a_read_at_a_past_revision_from_recent_writes_matches_one_seek_per_key() {
    let c = db();
    history(&c, 3000, 0x2545_f491_4f6c_dd1d);
    let current = meta(&c, "rev", 1).unwrap();
    assert!(current > 2000, "{current}");
    for rev in [1, 2, 17, 500, current - 700, current - 50, current - 1] {
        for iv in ranges() {
            for limit in [0, 1, 5, 1000] {
                let recent = range_at_recent(&c, &iv, rev, limit).unwrap().unwrap();
                let by_key = range_at_by_key(&c, &iv, rev, limit).unwrap();
                assert_eq!(recent, by_key, "rev {rev}, {iv:?}, limit {limit}");
            }
        }
    }
}

/// A single-key range takes its count from its row (one statement); a range that holds the
/// same keys but is not a single key counts them first. Both must answer alike.
#[test]
fn a_single_key_range_counts_as_a_wider_one() {
    let c = db();
    history(&c, 300, 11);
    let current = meta(&c, "rev", 1).unwrap();
    let mut seen = [0usize; 2];
    for k in (0..42).map(|i| format!("/k/{i:02}").into_bytes()) {
        let mut end = k.clone();
        end.push(0);
        let single = Interval::new(&k, &end);
        assert!(single.is_single_key());
        end.push(0);
        let wider = Interval::new(&k, &end);
        assert!(!wider.is_single_key());
        for (limit, with_values) in [(0, true), (0, false), (1, true), (2, false)] {
            let one = range_keys(&c, &single, current, current, limit, with_values).unwrap();
            let two = range_keys(&c, &wider, current, current, limit, with_values).unwrap();
            assert_eq!(one, two, "key {k:?}, limit {limit}, values {with_values}");
            assert_eq!(one.1, one.0.len() as i64);
        }
        seen[range_keys(&c, &single, current, current, 0, false)
            .unwrap()
            .1 as usize] += 1;
    }
    // Both kinds of key were read: live ones and absent ones (deleted or never written).
    assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
}

/// Every row of `kv_rev`, in primary key order.
fn rows(c: &Connection) -> Vec<(i64, i64, Vec<u8>, i64)> {
    c.prepare("SELECT rev, sub, key, version FROM kv_rev ORDER BY rev, sub")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

fn compact(c: &Connection, target: i64) {
    set_meta(c, "compact_rev", target).unwrap();
    let mut lo = meta(c, "compact_done", 0).unwrap();
    while lo < target {
        let hi = (lo + 1000).min(target);
        prune_history(c, lo, hi, target).unwrap();
        lo = hi;
    }
}

#[test]
fn compaction_from_the_last_one_leaves_what_a_full_one_does() {
    let (a, b) = (db(), db());
    history(&a, 2500, 7);
    history(&b, 2500, 7);
    // `a` compacts three times, each from where the last ended; `b` once, from 0.
    for target in [700, 1500, 2100] {
        compact(&a, target);
    }
    compact(&b, 2100);
    assert_eq!(rows(&a), rows(&b));
    // Below the compaction revision: at most one row per key, and no deletion.
    let mut seen = BTreeSet::new();
    for (rev, _, key, version) in rows(&a).into_iter().filter(|r| r.0 < 2100) {
        assert!(version > 0, "a deletion at {rev} survived");
        assert!(seen.insert(key.clone()), "two rows of {key:?} below 2100");
    }
    // Reads at and after the compaction revision answer as before it.
    let full = db();
    history(&full, 2500, 7);
    let current = meta(&full, "rev", 1).unwrap();
    for rev in [2100, 2200, current - 1] {
        for iv in ranges() {
            assert_eq!(
                range_at_by_key(&a, &iv, rev, 0).unwrap(),
                range_at_by_key(&full, &iv, rev, 0).unwrap(),
                "rev {rev}, {iv:?}"
            );
        }
    }
}

fn put_kv(c: &Connection, key: &str, value: &str) -> i64 {
    let mut t = WriteTxn::begin(c).unwrap();
    put(
        c,
        &mut t,
        &PutRequest {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
            ..Default::default()
        },
    )
    .unwrap();
    t.finish(c).unwrap()
}

fn get(c: &Connection, key: &str, revision: i64) -> R<Vec<(String, i64, i64, i64)>> {
    let rev = meta(c, "rev", 1)?;
    let r = range(
        c,
        &RangeRequest {
            key: key.as_bytes().to_vec().into(),
            revision,
            ..Default::default()
        },
        rev,
    )?;
    Ok(r.kvs
        .into_iter()
        .map(|kv| {
            (
                String::from_utf8(kv.value.to_vec()).unwrap(),
                kv.create_revision,
                kv.mod_revision,
                kv.version,
            )
        })
        .collect())
}

/// One revision per write transaction; versions count a key's puts since its creation; a
/// delete of nothing is no revision; a past revision reads as it was.
#[test]
fn revisions_and_versions_follow_etcd() {
    let c = db();
    assert_eq!(meta(&c, "rev", 1).unwrap(), 1);
    assert_eq!(put_kv(&c, "a", "1"), 2);
    assert_eq!(put_kv(&c, "a", "2"), 3);
    assert_eq!(get(&c, "a", 0).unwrap(), vec![("2".into(), 2, 3, 2)]);
    let delete = |key: &str| {
        let mut t = WriteTxn::begin(&c).unwrap();
        let r = delete_range(
            &c,
            &mut t,
            &DeleteRangeRequest {
                key: key.as_bytes().to_vec().into(),
                ..Default::default()
            },
        )
        .unwrap();
        (r.deleted, t.finish(&c).unwrap())
    };
    assert_eq!(delete("nothing"), (0, 3));
    assert_eq!(delete("a"), (1, 4));
    assert_eq!(get(&c, "a", 0).unwrap(), vec![]);
    assert_eq!(get(&c, "a", 3).unwrap(), vec![("2".into(), 2, 3, 2)]);
    assert_eq!(get(&c, "a", 2).unwrap(), vec![("1".into(), 2, 2, 1)]);
    // Re-created: a new life, version 1 again.
    assert_eq!(put_kv(&c, "a", "3"), 5);
    assert_eq!(get(&c, "a", 0).unwrap(), vec![("3".into(), 5, 5, 1)]);
}

/// Reads above the current revision or below the compaction revision fail as etcd's do.
#[test]
fn future_and_compacted_revisions_are_refused() {
    let c = db();
    for i in 0..5 {
        put_kv(&c, "k", &i.to_string());
    }
    assert!(matches!(get(&c, "k", 7), Err(EtcdError::FutureRev)));
    set_meta(&c, "compact_rev", 4).unwrap();
    assert!(matches!(get(&c, "k", 3), Err(EtcdError::Compacted)));
    assert_eq!(get(&c, "k", 4).unwrap()[0].0, "2");
}

/// A Txn runs the branch its compares choose, all its writes at one revision, and reads
/// inside it see its own writes.
#[test]
fn a_txn_runs_one_branch_at_one_revision() {
    let c = db();
    put_kv(&c, "a", "1");
    let put_op = |k: &str, v: &str| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: k.as_bytes().to_vec().into(),
            value: v.as_bytes().to_vec().into(),
            ..Default::default()
        })),
    };
    let get_op = |k: &str| RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: k.as_bytes().to_vec().into(),
            ..Default::default()
        })),
    };
    let cas = |expect: &str| TxnRequest {
        compare: vec![Compare {
            key: b"a".to_vec().into(),
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Value as i32,
            target_union: Some(compare::TargetUnion::Value(
                expect.as_bytes().to_vec().into(),
            )),
            ..Default::default()
        }],
        success: vec![put_op("b", "x"), put_op("c", "y"), get_op("b")],
        failure: vec![get_op("a")],
    };
    let run = |req: &TxnRequest| {
        check_txn(req).unwrap();
        let mut t = WriteTxn::begin(&c).unwrap();
        let r = txn(&c, &mut t, req).unwrap();
        (r, t.finish(&c).unwrap())
    };
    let (r, rev) = run(&cas("1"));
    assert!(r.succeeded);
    assert_eq!(rev, 3, "two puts, one revision");
    assert_eq!(get(&c, "b", 0).unwrap()[0].2, 3);
    assert_eq!(get(&c, "c", 0).unwrap()[0].2, 3);
    let Some(response_op::Response::ResponseRange(seen)) = &r.responses[2].response else {
        panic!("{:?}", r.responses[2])
    };
    assert_eq!(
        &seen.kvs[0].value[..],
        b"x",
        "a read in the txn sees its own write"
    );
    let (r, rev) = run(&cas("2"));
    assert!(!r.succeeded);
    assert_eq!(rev, 3, "the failure branch only read");
}

/// etcd's limits are checked before anything runs, in one pass.
#[test]
fn txn_limits_are_refused_before_running() {
    let put_op = |k: &str| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: k.as_bytes().to_vec().into(),
            ..Default::default()
        })),
    };
    let dup = TxnRequest {
        success: vec![put_op("a"), put_op("a")],
        ..Default::default()
    };
    assert!(matches!(check_txn(&dup), Err(EtcdError::DuplicateKey)));
    let many = TxnRequest {
        success: (0..=MAX_TXN_OPS).map(|i| put_op(&i.to_string())).collect(),
        ..Default::default()
    };
    assert!(matches!(check_txn(&many), Err(EtcdError::TooManyOps)));
    let mut deep = TxnRequest::default();
    for _ in 0..=MAX_TXN_DEPTH {
        deep = TxnRequest {
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestTxn(deep)),
            }],
            ..Default::default()
        };
    }
    assert!(matches!(check_txn(&deep), Err(EtcdError::TxnTooDeep)));
}

/// What etcd refuses in a put: an empty key, ignore_value on a missing key, a lease that
/// does not exist.
#[test]
fn puts_etcd_refuses_are_refused() {
    let c = db();
    let try_put = |req: PutRequest| {
        let mut t = WriteTxn::begin(&c).unwrap();
        put(&c, &mut t, &req).map(|_| ())
    };
    assert!(matches!(
        try_put(PutRequest::default()),
        Err(EtcdError::EmptyKey)
    ));
    assert!(matches!(
        try_put(PutRequest {
            key: b"k".to_vec().into(),
            ignore_value: true,
            ..Default::default()
        }),
        Err(EtcdError::KeyNotFound)
    ));
    assert!(matches!(
        try_put(PutRequest {
            key: b"k".to_vec().into(),
            lease: 42,
            ..Default::default()
        }),
        Err(EtcdError::LeaseNotFound)
    ));
}

/// Every live key with its value through the range read, and a read at a past revision.
fn snapshot_reads(c: &Connection, past: i64) -> Vec<(Vec<Kv>, i64)> {
    let current = meta(c, "rev", 1).unwrap();
    let mut out = Vec::new();
    for iv in ranges() {
        out.push(range_keys(c, &iv, current, current, 0, true).unwrap());
        out.push(range_keys(c, &iv, past, current, 3, true).unwrap());
    }
    out
}

/// A store written at schema 1 (values in `kv_live` too) reads the same before and after
/// the first write migrates it, and keeps taking writes: `mod_sub` names the right `kv_rev`
/// row also for a key written at sub-revision > 0 and after a compaction.
#[test]
fn a_schema_1_store_reads_the_same_before_and_after_its_migration() {
    let c = db();
    history(&c, 600, 0x9e37_79b9_7f4a_7c15);
    // Two keys in one revision: the second at sub-revision 1.
    let mut t = WriteTxn::begin(&c).unwrap();
    for (k, v) in [("/k/03", "a"), ("/k/31", "b")] {
        put(
            &c,
            &mut t,
            &PutRequest {
                key: k.as_bytes().to_vec().into(),
                value: v.as_bytes().to_vec().into(),
                ..Default::default()
            },
        )
        .unwrap();
    }
    t.finish(&c).unwrap();
    let current = meta(&c, "rev", 1).unwrap();
    compact(&c, current - 100);
    let past = current - 40;
    let before = snapshot_reads(&c, past);
    assert!(before[0].1 > 20, "{:?}", before[0].1);
    // The same store as raftsql wrote it at schema 1.
    c.execute_batch(
        "CREATE TABLE kv_live_1 (
           key BLOB PRIMARY KEY, create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL,
           version INTEGER NOT NULL, value BLOB NOT NULL, lease INTEGER NOT NULL) WITHOUT ROWID;
         INSERT INTO kv_live_1 SELECT key, create_rev, mod_rev, version, value, lease FROM kv_now;
         DROP VIEW kv_now; DROP TABLE kv_live; ALTER TABLE kv_live_1 RENAME TO kv_live;
         CREATE INDEX kv_live_lease ON kv_live(lease) WHERE lease != 0;
         PRAGMA user_version = 1;",
    )
    .unwrap();
    assert_eq!(snapshot_reads(&c, past), before, "read at schema 1");
    ensure_schema(&c).unwrap();
    let columns: Vec<String> = c
        .prepare("SELECT name FROM pragma_table_info('kv_live')")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "key",
            "create_rev",
            "mod_rev",
            "mod_sub",
            "version",
            "lease"
        ]
    );
    assert_eq!(snapshot_reads(&c, past), before, "read after the migration");
    let live = |k: &str| live(&c, k.as_bytes(), true).unwrap().unwrap().value;
    assert_eq!(
        (live("/k/03"), live("/k/31")),
        (b"a".to_vec(), b"b".to_vec())
    );
    history(&c, 50, 7);
    let now = meta(&c, "rev", 1).unwrap();
    assert!(now > current + 30, "{now}");
    for iv in ranges() {
        let recent = range_at_recent(&c, &iv, current, 0).unwrap().unwrap();
        assert_eq!(recent, range_at_by_key(&c, &iv, current, 0).unwrap());
    }
}
