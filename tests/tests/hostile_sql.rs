//! Hostile SQL: statements that try to change a replica outside Raft, to undo the settings the
//! replication depends on, or to tie up a node. Each is sent through every path a client has
//! (linearizable query, local query, execute, interactive transaction) on every node; then
//! the replicas must be byte-identical, intact, and still serving.
//!
//! The class of bug: a statement that a path lets through and that writes (or changes the
//! connection) where Raft does not see it. Found by review: `PRAGMA query_only(0)` then a
//! CTE-wrapped DELETE sent as a query deleted a row on one replica only.

use std::time::{Duration, Instant};

use raftsql_core::{Consistency, Error, Value};
use raftsql_tests::harness::Cluster;

const T: Duration = Duration::from_secs(30);

/// Statements tried, with what must happen to them: `Refused` on every path; `Query` on the
/// read paths are refused if they write (the write paths may run them, replicated);
/// `Read` must succeed everywhere.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Must {
    /// Refused on every path.
    Refused,
    /// Refused by the read paths (they write); the write paths may run them.
    WritesOnly,
    /// Allowed everywhere (reads).
    Read,
    /// No claim beyond convergence (e.g. refused or bounded by a limit).
    Any,
}

const STATEMENTS: &[(&str, Must)] = &[
    // The review's two statements, in the order that made node 1 diverge.
    ("PRAGMA query_only(0)", Must::Refused),
    ("WITH x AS (SELECT 1) DELETE FROM t WHERE k = 1", Must::WritesOnly),
    ("PRAGMA query_only=0", Must::Refused),
    ("PRAGMA query_only", Must::Read),
    ("WITH x AS (SELECT 1) INSERT INTO t(v) SELECT 'cte' FROM x", Must::WritesOnly),
    ("WITH x AS (SELECT 2) UPDATE t SET v = 'cte' WHERE k IN (SELECT * FROM x)", Must::WritesOnly),
    ("INSERT INTO t(v) VALUES ('plain')", Must::WritesOnly),
    ("DELETE FROM t WHERE k = 3", Must::WritesOnly),
    ("REPLACE INTO t(k, v) VALUES (4, 'replaced')", Must::WritesOnly),
    ("INSERT INTO t(v) VALUES ('returning') RETURNING k", Must::WritesOnly),
    // Settings the writer's replication depends on.
    ("PRAGMA wal_autocheckpoint=1", Must::Refused),
    ("PRAGMA wal_autocheckpoint(1)", Must::Refused),
    ("PRAGMA journal_mode=DELETE", Must::Refused),
    ("PRAGMA main.journal_mode=TRUNCATE", Must::Refused),
    ("PRAGMA journal_mode=OFF", Must::Refused),
    ("PRAGMA journal_mode=MEMORY", Must::Refused),
    ("PRAGMA locking_mode=EXCLUSIVE", Must::Refused),
    ("PRAGMA synchronous=FULL", Must::Refused),
    ("PRAGMA wal_checkpoint(TRUNCATE)", Must::Refused),
    ("PRAGMA wal_checkpoint", Must::Refused),
    ("PRAGMA journal_size_limit=0", Must::Refused),
    ("PRAGMA page_size=512", Must::Refused),
    ("PRAGMA auto_vacuum=FULL", Must::Refused),
    ("PRAGMA incremental_vacuum", Must::Refused),
    ("PRAGMA cache_size=1", Must::Refused),
    ("PRAGMA mmap_size=1048576", Must::Refused),
    ("PRAGMA busy_timeout=60000", Must::Refused),
    ("PRAGMA max_page_count=1", Must::Refused),
    ("PRAGMA encoding='UTF-16'", Must::Refused),
    // The schema and the raw pages.
    ("PRAGMA writable_schema=ON", Must::Refused),
    ("PRAGMA writable_schema=1", Must::Refused),
    ("UPDATE sqlite_master SET sql = 'CREATE TABLE t(x)' WHERE name = 't'", Must::Refused),
    ("PRAGMA schema_version=1000", Must::Refused),
    ("INSERT INTO sqlite_dbpage(pgno, data) VALUES (1, zeroblob(4096))", Must::Refused),
    ("DELETE FROM sqlite_dbpage WHERE pgno = 2", Must::Refused),
    ("CREATE VIRTUAL TABLE temp.pages USING sqlite_dbpage", Must::Refused),
    ("CREATE VIRTUAL TABLE stats USING dbstat", Must::Refused),
    ("PRAGMA cell_size_check=ON", Must::Refused),
    ("PRAGMA trusted_schema=ON", Must::Refused),
    ("PRAGMA legacy_alter_table=ON", Must::Refused),
    // Connection state shared by every client of the writer (or of a pooled reader).
    ("PRAGMA foreign_keys=ON", Must::Refused),
    ("PRAGMA recursive_triggers=ON", Must::Refused),
    ("PRAGMA secure_delete=ON", Must::Refused),
    ("PRAGMA temp_store=MEMORY", Must::Refused),
    ("PRAGMA case_sensitive_like=ON", Must::Refused),
    ("PRAGMA defer_foreign_keys=ON", Must::Refused),
    ("PRAGMA ignore_check_constraints=ON", Must::Refused),
    ("PRAGMA reverse_unordered_selects=ON", Must::Refused),
    ("PRAGMA soft_heap_limit=1", Must::Refused),
    ("PRAGMA hard_heap_limit=1", Must::Refused),
    ("PRAGMA threads=4", Must::Refused),
    ("PRAGMA shrink_memory", Must::Refused),
    // Other files: attach, vacuum into, extensions.
    ("ATTACH DATABASE '/tmp/raftsql-hostile-attach.db' AS x", Must::Refused),
    ("ATTACH ':memory:' AS m", Must::Refused),
    ("DETACH DATABASE x", Must::Refused),
    ("VACUUM", Must::Refused),
    ("VACUUM INTO '/tmp/raftsql-hostile-vacuum.db'", Must::Refused),
    ("SELECT load_extension('/lib/x86_64-linux-gnu/libc.so.6')", Must::Refused),
    ("SELECT fts3_tokenizer('simple')", Must::Refused),
    // Temp objects live on one connection of one node.
    ("CREATE TEMP TABLE tt(x)", Must::Refused),
    ("CREATE TEMP TRIGGER tg AFTER INSERT ON main.t BEGIN DELETE FROM main.t; END", Must::Refused),
    ("CREATE TEMP VIEW tv AS SELECT 1", Must::Refused),
    ("CREATE TABLE temp.tt2(x)", Must::Refused),
    // Transaction control inside the writer's batch transaction or a reader's snapshot.
    ("BEGIN", Must::Refused),
    ("BEGIN IMMEDIATE", Must::Refused),
    ("BEGIN EXCLUSIVE", Must::Refused),
    ("COMMIT", Must::Refused),
    ("END", Must::Refused),
    ("ROLLBACK", Must::Refused),
    ("RELEASE req", Must::Refused),
    ("ROLLBACK TO req", Must::Refused),
    ("RELEASE raftsql_req", Must::Refused),
    ("SAVEPOINT raftsql_req", Must::Refused),
    // Statements that make SQLite roll back the whole transaction (the batch's, shared with
    // other requests): the writer must never go on in autocommit mode.
    ("INSERT OR ROLLBACK INTO t(k, v) VALUES (2, 'dup')", Must::Any),
    ("CREATE TRIGGER rb BEFORE DELETE ON t WHEN old.k = 5 BEGIN SELECT RAISE(ROLLBACK, 'no'); END", Must::WritesOnly),
    ("DELETE FROM t WHERE k = 5", Must::Any),
    ("INSERT INTO t(v) VALUES ('after the rollbacks')", Must::WritesOnly),
    // Legitimate writes, replicated.
    ("PRAGMA user_version=7", Must::WritesOnly),
    ("CREATE TABLE IF NOT EXISTS t2(x)", Must::WritesOnly),
    ("CREATE INDEX IF NOT EXISTS t_v ON t(v)", Must::WritesOnly),
    ("CREATE TRIGGER IF NOT EXISTS up AFTER INSERT ON t BEGIN UPDATE t SET v = upper(v) WHERE k = new.k; END", Must::WritesOnly),
    ("ANALYZE", Must::WritesOnly),
    // (With no index to rebuild yet, REINDEX on a reader compiles to nothing.)
    ("REINDEX", Must::Any),
    ("SAVEPOINT mine", Must::Any),
    // Reads that must keep working.
    ("SELECT count(*) FROM t", Must::Read),
    ("PRAGMA integrity_check", Must::Read),
    ("PRAGMA table_info(t)", Must::Read),
    ("SELECT name FROM pragma_table_info('t')", Must::Read),
    // SQLite counts even the read form as a write (it may switch modes): execute answers it.
    ("PRAGMA journal_mode", Must::WritesOnly),
    ("PRAGMA user_version", Must::Read),
    ("SELECT count(*) FROM sqlite_master", Must::Read),
    ("EXPLAIN SELECT * FROM t", Must::Read),
    // Bounded: more memory or time than a request may take.
    ("SELECT length(randomblob(200000000))", Must::Refused),
    ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c", Must::Refused),
    ("SELECT 1; DELETE FROM t", Must::Refused),
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Query,
    Local,
    Execute,
    Tx,
}

fn short(r: &Result<String, Error>) -> String {
    match r {
        Ok(s) => format!("ok {s}"),
        Err(e) => {
            let s = e.to_string();
            s.chars().take(110).collect()
        }
    }
}

#[test]
fn hostile_sql_cannot_desynchronise_replicas() {
    let _ = std::fs::remove_file("/tmp/raftsql-hostile-attach.db");
    let _ = std::fs::remove_file("/tmp/raftsql-hostile-vacuum.db");
    let cl = Cluster::start(3, &["--statement-timeout", "1s"]);
    cl.wait_leader(T);
    cl.seed_rows(8);
    let before = cl.wait_converged(T);
    let mut report = Vec::new();
    let mut failures = Vec::new();

    // The read paths first, on every node: none may change any replica.
    for id in 1..=3u64 {
        let c = cl.client_of(id);
        for &(sql, must) in STATEMENTS {
            for path in [Path::Query, Path::Local] {
                let started = Instant::now();
                let r = cl
                    .rt
                    .block_on(c.query_with(
                        "main",
                        sql,
                        vec![],
                        if path == Path::Local {
                            Consistency::Local
                        } else {
                            Consistency::Linearizable
                        },
                    ))
                    .map(|rows| format!("{} rows", rows.rows.len()));
                let took = started.elapsed();
                report.push(format!(
                    "node {id} {path:?} {sql:?}: {} ({took:.0?})",
                    short(&r)
                ));
                let wrong = match must {
                    Must::Refused | Must::WritesOnly => r.is_ok(),
                    Must::Read => r.is_err(),
                    Must::Any => false,
                };
                if wrong {
                    failures.push(format!(
                        "node {id} {path:?} {sql:?} must be {must:?}: {}",
                        short(&r)
                    ));
                }
                if took > Duration::from_secs(5) {
                    failures.push(format!("node {id} {path:?} {sql:?} took {took:?}"));
                }
            }
        }
    }
    let after_reads = cl.wait_converged(T);
    // (Only `main`: the node's own system database is written by the cluster meanwhile.)
    assert_eq!(
        before.get("main"),
        after_reads.get("main"),
        "queries changed a replica\n{}",
        failures.join("\n")
    );

    // Then the write paths, through every node (followers forward to the leader).
    for id in 1..=3u64 {
        let c = cl.client_of(id);
        for &(sql, must) in STATEMENTS {
            for path in [Path::Execute, Path::Tx] {
                let started = Instant::now();
                let r = cl.rt.block_on(async {
                    match path {
                        Path::Execute => c
                            .execute("main", sql, vec![])
                            .await
                            .map(|e| format!("{} changed", e.rows_affected)),
                        _ => {
                            let mut tx = c.transaction("main", Duration::from_secs(5)).await?;
                            match tx.execute(sql, vec![]).await {
                                Ok((rows, _)) => {
                                    tx.commit().await?;
                                    Ok(format!("{} rows, committed", rows.rows.len()))
                                }
                                Err(e) => {
                                    let _ = tx.rollback().await;
                                    Err(e)
                                }
                            }
                        }
                    }
                });
                let took = started.elapsed();
                report.push(format!(
                    "node {id} {path:?} {sql:?}: {} ({took:.0?})",
                    short(&r)
                ));
                if must == Must::Refused && r.is_ok() {
                    failures.push(format!(
                        "node {id} {path:?} {sql:?} must be refused: {}",
                        short(&r)
                    ));
                }
                if must == Must::Read && r.is_err() {
                    failures.push(format!(
                        "node {id} {path:?} {sql:?} must work: {}",
                        short(&r)
                    ));
                }
                if took > Duration::from_secs(5) {
                    failures.push(format!("node {id} {path:?} {sql:?} took {took:?}"));
                }
            }
        }
    }
    // The cluster still writes, and every replica holds the same bytes.
    let c = cl.client();
    cl.rt
        .block_on(c.execute("main", "INSERT INTO t(v) VALUES ('still writing')", vec![]))
        .expect("a normal write after the hostile ones");
    assert_eq!(cl.running().len(), 3, "a node stopped\n{}", cl.logs());
    let digests = cl.wait_converged(T);
    cl.check_integrity("main");
    let counts: Vec<i64> = (1..=3)
        .map(|id| cl.local_count(id, "main", "SELECT count(*) FROM t"))
        .collect();
    assert!(
        counts.iter().all(|n| *n == counts[0]),
        "row counts differ: {counts:?}"
    );
    for f in [
        "/tmp/raftsql-hostile-attach.db",
        "/tmp/raftsql-hostile-vacuum.db",
    ] {
        if std::path::Path::new(f).exists() {
            failures.push(format!("{f} was created"));
        }
    }
    println!("{}", report.join("\n"));
    println!("digests after: {digests:?}, rows: {counts:?}");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let _ = Value::Null;
}

/// Requests that make SQLite roll back the whole batch transaction (`OR ROLLBACK`,
/// `RAISE(ROLLBACK)` in a trigger), sent concurrently with ordinary writes so that they share
/// batches: each costs only itself. Every acknowledged ordinary write is on every replica
/// exactly once, no refused one is, and the replicas are identical. (Before, the batch went on
/// in autocommit mode after such a request: the statements after it committed to the
/// leader's WAL at once, outside Raft.)
#[test]
fn a_request_that_rolls_back_its_batch_costs_only_itself() {
    let cl = Cluster::start(3, &[]);
    cl.wait_leader(T);
    let c = cl.client();
    cl.rt.block_on(async {
        c.execute(
            "main",
            "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT UNIQUE)",
            vec![],
        )
        .await
        .unwrap();
        c.execute("main", "INSERT INTO t(k, v) VALUES (1, 'taken')", vec![])
            .await
            .unwrap();
        c.execute(
            "main",
            "CREATE TRIGGER rb BEFORE DELETE ON t WHEN old.k = 1 \
             BEGIN SELECT RAISE(ROLLBACK, 'no'); END",
            vec![],
        )
        .await
        .unwrap();
    });
    let acked = cl.rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let c = cl.client_of(1 + w % 3);
            tasks.push(tokio::spawn(async move {
                let mut ok = Vec::new();
                for i in 0..40 {
                    let v = format!("w{w}-{i}");
                    if c.execute(
                        "main",
                        "INSERT INTO t(v) VALUES (?1)",
                        vec![v.clone().into()],
                    )
                    .await
                    .is_ok()
                    {
                        ok.push(v);
                    }
                }
                ok
            }));
        }
        for h in 0..4u64 {
            let c = cl.client_of(1 + h % 3);
            tasks.push(tokio::spawn(async move {
                for i in 0..40 {
                    let sql = if i % 2 == 0 {
                        "INSERT OR ROLLBACK INTO t(v) VALUES ('taken')"
                    } else {
                        "DELETE FROM t WHERE k = 1"
                    };
                    let e = c
                        .execute("main", sql, vec![])
                        .await
                        .unwrap_err()
                        .to_string();
                    assert!(e.contains("rolled back the whole transaction"), "{e}");
                }
                Vec::new()
            }));
        }
        let mut acked = Vec::new();
        for t in tasks {
            acked.extend(t.await.unwrap());
        }
        acked
    });
    assert_eq!(acked.len(), 8 * 40, "ordinary writes failed");
    // The hostile requests did share batches with ordinary ones (the leader says so).
    let shared = (1..=3)
        .flat_map(|id| {
            cl.log_text(id)
                .lines()
                .filter(|l| l.contains("roll back its batch") && !l.contains("batch's 0 other"))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .count();
    println!("{shared} batches were run again without a request that rolled them back");
    assert!(
        shared > 0,
        "no hostile request shared a batch: the test proves nothing"
    );
    cl.wait_converged(T);
    cl.check_integrity("main");
    for id in 1..=3 {
        let n = cl.local_count(id, "main", "SELECT count(*) FROM t WHERE v LIKE 'w%'");
        assert_eq!(n as usize, acked.len(), "node {id}");
        assert_eq!(
            cl.local_count(id, "main", "SELECT count(*) FROM t WHERE k = 1"),
            1
        );
    }
}
