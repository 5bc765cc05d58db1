//! The embedded `Node` API, with three nodes in one process.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use raftsql_core::{Consistency, ConstraintKind, Error, Node, NodeConfig, Statement, Value};

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Three {
    nodes: Vec<Node>,
    cfgs: Vec<NodeConfig>,
    _dir: tempfile::TempDir,
}

async fn start_three() -> Three {
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let peers: BTreeMap<u64, SocketAddr> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| (i as u64 + 1, *a))
        .collect();
    let mut nodes = Vec::new();
    let mut cfgs = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let mut cfg = NodeConfig::new(i as u64 + 1, dir.path().join(format!("n{}", i + 1)), *a);
        cfg.peers = peers.clone();
        nodes.push(Node::start(cfg.clone()).await.unwrap());
        cfgs.push(cfg);
    }
    Three {
        nodes,
        cfgs,
        _dir: dir,
    }
}

async fn leader(nodes: &[Node]) -> Node {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(n) = nodes.iter().find(|n| n.status().raft.role == "leader") {
            // Leadership is usable once the node applied an entry of its term.
            if n.execute("_probe", "CREATE TABLE IF NOT EXISTS p(x)", vec![])
                .await
                .is_ok()
            {
                return n.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_values_batches_and_transactions() {
    let t = start_three().await;
    let l = leader(&t.nodes).await;
    l.execute(
        "main",
        "CREATE TABLE v(id INTEGER PRIMARY KEY, a, b, c, d, e)",
        vec![],
    )
    .await
    .unwrap();
    let vals = vec![
        Value::Integer(1),
        Value::Null,
        Value::Integer(-42),
        Value::Real(2.5),
        Value::Text("héllo".into()),
        Value::Blob(vec![0, 255, 7]),
    ];
    let r = l
        .execute(
            "main",
            "INSERT INTO v VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            vals.clone(),
        )
        .await
        .unwrap();
    assert_eq!((r.rows_affected, r.last_insert_rowid), (1, 1));
    let rows = l.query("main", "SELECT * FROM v", vec![]).await.unwrap();
    assert_eq!(rows.columns, vec!["id", "a", "b", "c", "d", "e"]);
    assert_eq!(rows.rows, vec![vals]);

    // An atomic batch: the failing second statement undoes the first.
    let e = l
        .execute_batch(
            "main",
            vec![
                Statement::with_params("INSERT INTO v(id) VALUES (?1)", vec![Value::Integer(2)]),
                Statement::with_params("INSERT INTO v(id) VALUES (?1)", vec![Value::Integer(1)]),
            ],
        )
        .await
        .unwrap_err();
    // A typed constraint error with SQLite's extended code (1555:
    // SQLITE_CONSTRAINT_PRIMARYKEY), the same as a remote Client gets (tests/tests/client.rs).
    assert!(
        matches!(e, Error::Constraint { code: 1555, .. }),
        "constraint error expected, got {e:?}"
    );
    assert_eq!(e.constraint(), Some(ConstraintKind::PrimaryKey));
    let n = l
        .query("main", "SELECT count(*) FROM v", vec![])
        .await
        .unwrap();
    assert_eq!(n.rows[0][0], Value::Integer(1));

    // Group commit: concurrent requests, one of them failing, each answered on its own.
    let mut tasks = Vec::new();
    for i in 10..40i64 {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            let id = if i == 20 { 1 } else { i }; // 1 exists: this one fails alone
            l.execute(
                "main",
                "INSERT INTO v(id) VALUES (?1)",
                vec![Value::Integer(id)],
            )
            .await
        }));
    }
    let mut failed = 0;
    for t in tasks {
        if t.await.unwrap().is_err() {
            failed += 1;
        }
    }
    assert_eq!(failed, 1);
    let n = l
        .query("main", "SELECT count(*) FROM v", vec![])
        .await
        .unwrap();
    assert_eq!(n.rows[0][0], Value::Integer(30));

    // Interactive transaction: reads its own writes, commits atomically.
    let mut tx = l.transaction("main", Duration::from_secs(5)).await.unwrap();
    tx.execute("INSERT INTO v(id, a) VALUES (100, 'tx')", vec![])
        .await
        .unwrap();
    let (rows, _) = tx
        .execute("SELECT a FROM v WHERE id = 100", vec![])
        .await
        .unwrap();
    assert_eq!(rows.rows, vec![vec![Value::Text("tx".into())]]);
    // Not visible to others before commit.
    let n = l
        .query_with(
            "main",
            "SELECT count(*) FROM v WHERE id = 100",
            vec![],
            Consistency::Local,
        )
        .await
        .unwrap();
    assert_eq!(n.rows[0][0], Value::Integer(0));
    tx.commit().await.unwrap();
    let n = l
        .query("main", "SELECT count(*) FROM v WHERE id = 100", vec![])
        .await
        .unwrap();
    assert_eq!(n.rows[0][0], Value::Integer(1));

    // Rolled back explicitly, and by idle timeout.
    let mut tx = l.transaction("main", Duration::from_secs(5)).await.unwrap();
    tx.execute("INSERT INTO v(id) VALUES (101)", vec![])
        .await
        .unwrap();
    tx.rollback();
    let mut tx = l
        .transaction("main", Duration::from_millis(200))
        .await
        .unwrap();
    tx.execute("INSERT INTO v(id) VALUES (102)", vec![])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        tx.commit().await.is_err(),
        "an idle transaction must have been rolled back"
    );
    let n = l
        .query(
            "main",
            "SELECT count(*) FROM v WHERE id IN (101, 102)",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(n.rows[0][0], Value::Integer(0));

    // A follower refuses writes with the leader's address, and its local reads catch up.
    let f = t.nodes.iter().find(|n| n.id() != l.id()).unwrap();
    match f
        .execute("main", "INSERT INTO v(id) VALUES (200)", vec![])
        .await
    {
        Err(Error::NotLeader {
            leader_id,
            leader_addr,
        }) => {
            assert_eq!(leader_id, Some(l.id()));
            assert_eq!(
                leader_addr,
                Some(t.cfgs[(l.id() - 1) as usize].listen.to_string())
            );
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }
    let rows = f
        .query("main", "SELECT count(*) FROM v", vec![])
        .await
        .unwrap();
    assert_eq!(rows.rows[0][0], Value::Integer(31));
    // Bad input is refused clearly.
    assert!(matches!(
        l.execute("../etc", "SELECT 1", vec![]).await,
        Err(Error::Invalid(_))
    ));
    for n in &t.nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_is_exclusive_and_restart_resumes() {
    let mut t = start_three().await;
    let l = leader(&t.nodes).await;
    l.execute("main", "CREATE TABLE k(x)", vec![])
        .await
        .unwrap();
    l.execute("main", "INSERT INTO k VALUES (7)", vec![])
        .await
        .unwrap();
    // A second node on the same data directory is refused while the first runs.
    let mut cfg = t.cfgs[0].clone();
    cfg.listen = free_addr();
    match Node::start(cfg).await {
        Err(Error::DataDirInUse { .. }) => {}
        Err(e) => panic!("expected DataDirInUse, got {e}"),
        Ok(_) => panic!("a second node opened the same data directory"),
    }
    // Clean shutdown of every node, then restart: the data is there.
    for n in t.nodes.drain(..) {
        n.shutdown().await;
    }
    drop(l);
    for cfg in &t.cfgs {
        t.nodes.push(Node::start(cfg.clone()).await.unwrap());
    }
    let l = leader(&t.nodes).await;
    let rows = l.query("main", "SELECT x FROM k", vec![]).await.unwrap();
    assert_eq!(rows.rows, vec![vec![Value::Integer(7)]]);
    for n in &t.nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_closures_as_writes_and_reads() {
    let t = start_three().await;
    let l = leader(&t.nodes).await;
    l.execute("main", "CREATE TABLE c(n INTEGER)", vec![])
        .await
        .unwrap();
    l.execute("main", "INSERT INTO c VALUES (0)", vec![])
        .await
        .unwrap();
    // Read-modify-write in Rust, atomically, many at once (group-committed): no lost update.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            l.write("main", |c| {
                let n: i64 = c.query_row("SELECT n FROM c", [], |r| r.get(0))?;
                c.execute("UPDATE c SET n = ?1", [n + 1])?;
                Ok(n + 1)
            })
            .await
        }));
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap().unwrap());
    }
    seen.sort();
    assert_eq!(seen, (1..=20).collect::<Vec<i64>>());
    // A failing closure rolls back only its own changes.
    let e = l
        .write("main", |c| {
            c.execute("UPDATE c SET n = 1000", [])?;
            Err::<(), _>(Error::Invalid("no".into()))
        })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)));
    let n = l
        .read("main", Consistency::Linearizable, |c| {
            Ok(c.query_row("SELECT n FROM c", [], |r| r.get::<_, i64>(0))?)
        })
        .await
        .unwrap();
    assert_eq!(n, Some(20));
    assert_eq!(
        l.read("nothing-here", Consistency::Local, |_| Ok(()))
            .await
            .unwrap(),
        None
    );
    for n in &t.nodes {
        n.shutdown().await;
    }
}
