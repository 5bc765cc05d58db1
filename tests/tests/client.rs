//! The remote client against real node processes: transactions over several round trips,
//! prepared statements, concurrent writers without "database is locked".

use std::sync::Arc;
use std::time::Duration;

use raftsql_core::{ConstraintKind, Error, Value};
use raftsql_tests::harness::Cluster;

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

/// The TCP connections this process holds to `addrs` (ESTABLISHED sockets among its own file
/// descriptors whose remote end is one of them).
fn connections_to(addrs: &[std::net::SocketAddr]) -> usize {
    let hex = |a: &std::net::SocketAddr| {
        let std::net::IpAddr::V4(ip) = a.ip() else {
            panic!("IPv4 nodes expected")
        };
        format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), a.port())
    };
    let wanted: Vec<String> = addrs.iter().map(hex).collect();
    let tcp = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
    let inodes: std::collections::HashSet<String> = tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (wanted.contains(&f[2].to_string()) && f[3] == "01").then(|| f[9].to_string())
        })
        .collect();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| {
            let l = l.to_string_lossy();
            l.strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .is_some_and(|i| inodes.contains(i))
        })
        .count()
}

/// 64 tasks share one `Client` (clones): at most one connection per node, and a slow call
/// does not hold up the others (the client used to run one call at a time on its single
/// connection, so a 3 s ReadIndex timeout or a long query stalled every caller).
#[test]
fn one_client_shared_by_64_tasks_multiplexes_one_connection_per_node() {
    let c = Cluster::start(3, &[]);
    c.wait_leader(T);
    let client = c.client();
    let addrs: Vec<_> = (1..=3).map(|id| c.addr(id)).collect();
    c.rt.block_on(async {
        client
            .execute("main", "CREATE TABLE m(k TEXT PRIMARY KEY, v)", vec![])
            .await
            .unwrap();
        // A query that runs until the statement timeout (10 s) interrupts it, on the node
        // the client now prefers (the leader), where the writes below go too.
        let slow = {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .query(
                        "main",
                        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n \
                         WHERE i < 10000000000) SELECT count(*) FROM n",
                        vec![],
                    )
                    .await
            })
        };
        let mut tasks = Vec::new();
        for w in 0..64 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..10 {
                    client
                        .execute(
                            "main",
                            "INSERT INTO m VALUES (?1, ?2)",
                            vec![Value::Text(format!("{w}-{i}")), Value::Integer(i)],
                        )
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(
            !slow.is_finished(),
            "640 writes on the shared client should finish while the slow query still runs: {:?}",
            slow.await
        );
        let n = client
            .query("main", "SELECT count(*) FROM m", vec![])
            .await
            .unwrap();
        assert_eq!(n.rows, vec![vec![Value::Integer(640)]]);
        let held = connections_to(&addrs);
        assert!(
            (1..=3).contains(&held),
            "one connection per node at most, shared by 64 tasks: {held}"
        );
        // The slow query ends as the statement timeout says, with an error of its own.
        let e = slow.await.unwrap().unwrap_err();
        assert!(matches!(e, Error::Sql { .. }), "{e:?}");
    });
}
