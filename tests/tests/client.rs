//! The remote client against real node processes: transactions over several round trips,
//! prepared statements, concurrent writers without "database is locked".
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Cluster;
use raftsql_core::{ConstraintKind, Error, Value};

const T: Duration = Duration::from_secs(30);

#[test]
fn interactive_transactions_over_the_wire() {
    let c = Cluster::start(3, &[]);
    c.wait_leader(T);
    let client = c.client();
    c.rt.block_on(async {
        client
            .execute(
                "main",
                "CREATE TABLE acct(id INTEGER PRIMARY KEY, balance INTEGER)",
                vec![],
            )
            .await
            .unwrap();
        client
            .execute("main", "INSERT INTO acct VALUES (1, 100), (2, 0)", vec![])
            .await
            .unwrap();

        // BEGIN ... COMMIT over several round trips, reading its own writes.
        let mut tx = client
            .transaction("main", Duration::from_secs(10))
            .await
            .unwrap();
        let (rows, _) = tx
            .execute("SELECT balance FROM acct WHERE id = 1", vec![])
            .await
            .unwrap();
        assert_eq!(rows.rows, vec![vec![Value::Integer(100)]]);
        tx.execute(
            "UPDATE acct SET balance = balance - 30 WHERE id = 1",
            vec![],
        )
        .await
        .unwrap();
        let (_, r) = tx
            .execute(
                "UPDATE acct SET balance = balance + 30 WHERE id = 2",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(r.rows_affected, 1);
        let (rows, _) = tx
            .execute("SELECT sum(balance) FROM acct", vec![])
            .await
            .unwrap();
        assert_eq!(rows.rows, vec![vec![Value::Integer(100)]]);
        // Others do not see it yet.
        let seen = client
            .query("main", "SELECT balance FROM acct WHERE id = 2", vec![])
            .await
            .unwrap();
        assert_eq!(seen.rows, vec![vec![Value::Integer(0)]]);
        tx.commit().await.unwrap();
        let seen = client
            .query("main", "SELECT balance FROM acct ORDER BY id", vec![])
            .await
            .unwrap();
        assert_eq!(
            seen.rows,
            vec![vec![Value::Integer(70)], vec![Value::Integer(30)]]
        );

        // Rolled back explicitly.
        let mut tx = client
            .transaction("main", Duration::from_secs(10))
            .await
            .unwrap();
        tx.execute("DELETE FROM acct", vec![]).await.unwrap();
        tx.rollback().await.unwrap();
        // Abandoned: the leader rolls it back after the idle timeout, and writes go on.
        let mut tx = client
            .transaction("main", Duration::from_millis(300))
            .await
            .unwrap();
        tx.execute("DELETE FROM acct", vec![]).await.unwrap();
        std::mem::forget(tx);
        tokio::time::sleep(Duration::from_millis(800)).await;
        client
            .execute("main", "INSERT INTO acct VALUES (3, 5)", vec![])
            .await
            .unwrap();
        let n = client
            .query("main", "SELECT count(*) FROM acct", vec![])
            .await
            .unwrap();
        assert_eq!(n.rows, vec![vec![Value::Integer(3)]]);

        // A SQL error inside a transaction is typed and leaves it usable.
        let mut tx = client
            .transaction("main", Duration::from_secs(10))
            .await
            .unwrap();
        let e = tx
            .execute("INSERT INTO acct VALUES (1, 1)", vec![])
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Constraint { code: 1555, .. }), "{e:?}");
        assert_eq!(e.constraint(), Some(ConstraintKind::PrimaryKey));
        tx.execute("INSERT INTO acct VALUES (4, 1)", vec![])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let n = client
            .query("main", "SELECT count(*) FROM acct", vec![])
            .await
            .unwrap();
        assert_eq!(n.rows, vec![vec![Value::Integer(4)]]);

        // Prepared statements.
        let ins = client.prepare("main", "INSERT INTO acct VALUES (?1, ?2)");
        for i in 10..20 {
            ins.execute(vec![Value::Integer(i), Value::Integer(i * 10)])
                .await
                .unwrap();
        }
        let sel = client.prepare("main", "SELECT balance FROM acct WHERE id = ?1");
        assert_eq!(
            sel.query(vec![Value::Integer(15)]).await.unwrap().rows,
            vec![vec![Value::Integer(150)]]
        );
    });
    c.wait_converged(T);
}

/// 16 clients write concurrently: no "database is locked", no error at all; every row lands.
#[test]
fn concurrent_writers_never_see_database_is_locked() {
    let c = Cluster::start(3, &[]);
    c.wait_leader(T);
    c.rt.block_on(c.client().execute(
        "main",
        "CREATE TABLE kv(k TEXT PRIMARY KEY, v BLOB)",
        vec![],
    ))
    .unwrap();
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..16 {
        let client = c.client();
        let errors = errors.clone();
        tasks.push(c.rt.spawn(async move {
            for i in 0..100 {
                let r = client
                    .execute(
                        "main",
                        "INSERT OR REPLACE INTO kv VALUES (?1, randomblob(256))",
                        vec![Value::Text(format!("w{w}-{i}"))],
                    )
                    .await;
                if let Err(e) = r {
                    eprintln!("write failed: {e}");
                    errors.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        c.rt.block_on(t).unwrap();
    }
    assert_eq!(errors.load(std::sync::atomic::Ordering::SeqCst), 0);
    c.wait_converged(T);
    for id in 1..=3 {
        assert_eq!(
            c.local_count(id, "main", "SELECT count(*) FROM kv"),
            1600,
            "node {id}"
        );
    }
}
