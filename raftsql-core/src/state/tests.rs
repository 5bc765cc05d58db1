//! Replicas applying the same entries end byte-identical (I3).

use std::collections::BTreeMap;

use bytes::Bytes;

use super::apply::apply_pages;
use super::batch::stamp_change_counter;
use super::db::{open_writer, page1_counter, remove_wal_files, reset_cache, PAGE_SIZE};
use super::*;
use crate::entry::{Frames, PageChange};

fn pages_of(c: &Connection) -> BTreeMap<u32, Vec<u8>> {
    let mut st = c
        .prepare("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno")
        .unwrap();
    let rows = st
        .query_map([], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, Vec<u8>>(1)?)))
        .unwrap();
    rows.map(|r| r.unwrap()).collect()
}

/// Runs `sql` the way the leader does (cache purged first) and returns the entry a
/// leader would ship: the pages that changed and the new size.
#[allow(clippy::type_complexity)]
fn leader_write(a: &Connection, sql: &str) -> (Vec<Page>, BTreeMap<u32, Vec<u8>>, u32) {
    reset_cache(a).unwrap();
    let before = pages_of(a);
    a.execute_batch(sql).unwrap();
    let after = pages_of(a);
    let pages = after
        .iter()
        .filter(|(n, d)| before.get(n) != Some(d))
        .map(|(n, d)| Page {
            pgno: *n,
            data: Bytes::from(d.clone()),
        })
        .collect();
    (pages, before, after.len() as u32)
}

/// The entry a leader ships for `pages`: page 1 stamped with the counter the replicas
/// will write (`counter`), each page diffed against `before`.
pub(super) fn entry(
    mut pages: Vec<Page>,
    before: &BTreeMap<u32, Vec<u8>>,
    db_pages: u32,
    counter: u32,
) -> Frames {
    if let Some(p1) = pages.first_mut().filter(|p| p.pgno == 1) {
        p1.data = stamp_change_counter(&p1.data, counter);
    }
    Frames {
        proposer: 1,
        sequence: 1,
        db: "main".into(),
        page_size: PAGE_SIZE,
        db_pages,
        pages: pages
            .iter()
            .map(|p| {
                let base = before
                    .get(&p.pgno)
                    .filter(|_| p.pgno <= before.len() as u32);
                PageChange::diff(p, base.map(|b| &b[..]))
            })
            .collect(),
    }
}

pub(super) fn digest(c: &Connection) -> (usize, u32) {
    let pages = pages_of(c);
    let mut h = crc32fast::Hasher::new();
    for (n, d) in &pages {
        h.update(&n.to_le_bytes());
        h.update(d);
    }
    (pages.len(), h.finalize())
}

/// Two replicas applying the same entries through sqlite_dbpage end byte-identical
/// (page 1's change counter included), whether one restarted first or not; they truncate
/// when the source shrank; and each applier's connection sees schema changes at once.
#[test]
fn replicas_applying_the_same_entries_are_identical() {
    vfs::register().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The source of entries (what a leader's speculative transactions produce).
    let a = open_writer(&dir.path().join("a.db")).unwrap();
    // B restarts before applying (as after kill -9): its file holds only page 1.
    let b = open_writer(&dir.path().join("b.db")).unwrap();
    drop(b);
    remove_wal_files(&dir.path().join("b.db"));
    let b = open_writer(&dir.path().join("b.db")).unwrap();
    let c = open_writer(&dir.path().join("c.db")).unwrap();
    // b reads every base from SQLite, c from its cache of the pages it applied.
    let mut cache = Committed::default();
    let mut step = |sql: &str| {
        let (pages, before, n) = leader_write(&a, sql);
        // As the leader does: page 1 carries the counter the replicas will write.
        let f = entry(pages, &before, n, page1_counter(&b).unwrap() + 1);
        apply_pages(&b, &f, None, &mut Committed::default()).unwrap();
        apply_pages(&c, &f, None, &mut cache).unwrap();
        assert_eq!(digest(&b), digest(&c), "after {sql}");
    };
    step("CREATE TABLE t(k TEXT PRIMARY KEY)");
    // B sees the new table at once (preparing against a stale schema would fail).
    b.prepare("INSERT INTO t VALUES ('x')").unwrap();
    for i in 0..50 {
        step(&format!("INSERT INTO t VALUES ('k{i}')"));
    }
    step("CREATE TABLE big(v); WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i < 2000) INSERT INTO big SELECT randomblob(500) FROM c;");
    step("DROP TABLE big");
    step("VACUUM");
    for conn in [&b, &c] {
        let n: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 50);
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        assert!(pages < 10, "not truncated: {pages} pages");
    }
}

/// A request whose savepoint SQLite will not release fails, and none of its changes stay in
/// the batch (they would commit with it while its caller hears of an error); the requests
/// beside it are answered as usual.
#[test]
fn a_request_whose_savepoint_cannot_be_released_leaves_nothing_behind() {
    use super::batch::{execute_batch, Executed, FAIL_NEXT_RELEASE};
    use super::msg::{Work, WriteReq};
    vfs::register().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let mut w = open_writer(&path).unwrap();
    let g = crate::guard::Guard::install(&mut w, crate::guard::Role::Writer).unwrap();
    w.execute_batch("CREATE TABLE t(x)").unwrap();
    let req = |x: i64| {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let r = WriteReq {
            db: "t".into(),
            work: Work::Statements {
                stmts: vec![crate::value::Statement::with_params(
                    "INSERT INTO t VALUES (?1)",
                    vec![crate::value::Value::Integer(x)],
                )],
                reply,
            },
            deadline: std::time::Instant::now() + std::time::Duration::from_secs(10),
        };
        (r, rx)
    };
    let (first, mut first_rx) = req(1);
    let (second, mut second_rx) = req(2);
    FAIL_NEXT_RELEASE.with(|f| f.set(true));
    let budget = std::time::Duration::from_secs(5);
    let waiters = match execute_batch(&w, &g, budget, vec![first, second]) {
        Executed::Open(waiters) => waiters,
        Executed::Requeue(reqs) => {
            // The batch was rolled back and the second request comes back: run it again.
            assert_eq!(reqs.len(), 1);
            match execute_batch(&w, &g, budget, reqs) {
                Executed::Open(waiters) => waiters,
                _ => panic!("the second request did not run again"),
            }
        }
        Executed::NotStarted => panic!("the batch did not start"),
    };
    w.execute_batch("COMMIT").unwrap();
    for waiter in waiters {
        waiter(Ok(()));
    }
    assert!(
        matches!(first_rx.try_recv(), Ok(Err(_))),
        "the request whose RELEASE failed must fail"
    );
    assert!(matches!(second_rx.try_recv(), Ok(Ok(_))));
    let xs: Vec<i64> = w
        .prepare("SELECT x FROM t ORDER BY x")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(xs, vec![2], "the failed request's row was committed");
}

/// I14's third layer: client SQL on the writer runs with DEFENSIVE on, also right after an
/// apply, which lifts it to write `sqlite_dbpage` and leaves it off. (Turning it back on
/// after every apply expired every statement the writer had prepared: SQLite expires them
/// on any change of a connection's flags, and a follower re-prepared on every entry.)
#[test]
fn client_sql_on_the_writer_runs_defensive_even_right_after_an_apply() {
    use super::batch::client_on_writer;
    use rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE;
    use rusqlite::StatementStatus::RePrepare;
    vfs::register().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = open_writer(&dir.path().join("a.db")).unwrap();
    let mut b = open_writer(&dir.path().join("b.db")).unwrap();
    let g = crate::guard::Guard::install(&mut b, crate::guard::Role::Writer).unwrap();
    let mut cache = Committed::default();
    let mut apply = |sql: &str| {
        let (pages, before, n) = leader_write(&a, sql);
        let f = entry(pages, &before, n, page1_counter(&b).unwrap() + 1);
        apply_pages(&b, &f, None, &mut cache).unwrap();
    };
    apply("CREATE TABLE t(x)");
    let count = |b: &Connection| -> (i64, i32) {
        let mut st = b.prepare_cached("SELECT count(*) FROM t").unwrap();
        let n = st.query_row([], |r| r.get(0)).unwrap();
        (n, st.get_status(RePrepare))
    };
    assert_eq!(count(&b), (0, 0));
    apply("INSERT INTO t VALUES (1)");
    apply("INSERT INTO t VALUES (2)");
    assert_eq!(
        count(&b),
        (2, 0),
        "an apply made the writer re-prepare its statements"
    );
    let budget = std::time::Duration::from_secs(5);
    let on = client_on_writer(&b, &g, budget, || {
        Ok(b.db_config(SQLITE_DBCONFIG_DEFENSIVE)?)
    })
    .unwrap();
    assert!(on, "client SQL ran on the writer without DEFENSIVE");
    // What DEFENSIVE stops even if the authorizer had a hole: a write of sqlite_dbpage.
    let e = b
        .execute(
            "INSERT INTO sqlite_dbpage(pgno, data) VALUES (2, zeroblob(4096))",
            [],
        )
        .unwrap_err();
    assert_eq!(e.to_string(), "read-only");
}
