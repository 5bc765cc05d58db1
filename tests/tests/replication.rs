//! Replication across real processes: every node applies the same pages.

use std::time::Duration;

use raftsql_core::{Client, Consistency, Error, Statement, Value};
use raftsql_proto::v1 as pb;
use raftsql_tests::harness;
use raftsql_tests::harness::Cluster;

const T: Duration = Duration::from_secs(30);

/// Invariants 3 and 4: writes reach every node; replicas are byte-identical (page digests),
/// even when the SQL is nondeterministic (random(), datetime('now'), randomblob()).
#[test]
fn replicates_to_every_node_byte_identical_even_with_nondeterministic_sql() {
    let c = Cluster::start(3, &[]);
    c.wait_leader(T);
    let client = c.client();
    c.rt.block_on(async {
        client
            .execute("main", "CREATE TABLE t(id INTEGER PRIMARY KEY, r INTEGER, ts TEXT, b BLOB, note TEXT)", vec![])
            .await
            .unwrap();
        for i in 0..200i64 {
            client
                .execute(
                    "main",
                    "INSERT INTO t(id, r, ts, b, note) VALUES (?1, random(), datetime('now'), randomblob(64), ?2)",
                    vec![Value::Integer(i), Value::Text(format!("row {i}"))],
                )
                .await
                .unwrap();
        }
        // A second database on the same cluster.
        client.execute("other", "CREATE TABLE kv(k TEXT PRIMARY KEY, v BLOB)", vec![]).await.unwrap();
        client
            .execute("other", "INSERT INTO kv VALUES (?1, ?2)", vec![Value::Text("k".into()), Value::Blob(vec![0, 1, 2, 255])])
            .await
            .unwrap();
    });
    let digests = c.wait_converged(T);
    // The two user databases, and the system database holding the member registry (all
    // byte-identical on every node: wait_converged compares the digests).
    let mut names: Vec<&String> = digests.keys().collect();
    names.sort();
    assert_eq!(
        names,
        ["_raftsql", "main", "other"],
        "databases: {digests:?}"
    );
    for id in 1..=3 {
        assert_eq!(
            c.local_count(id, "main", "SELECT count(*) FROM t"),
            200,
            "node {id}"
        );
        let rows =
            c.rt.block_on(c.client_of(id).query_with(
                "other",
                "SELECT v FROM kv WHERE k='k'",
                vec![],
                Consistency::Local,
            ))
            .unwrap();
        assert_eq!(rows.rows, vec![vec![Value::Blob(vec![0, 1, 2, 255])]]);
    }
    // The random values are the leader's, everywhere: compare one row across nodes.
    let per_node: Vec<_> = (1..=3)
        .map(|id| {
            c.rt.block_on(c.client_of(id).query_with(
                "main",
                "SELECT r, ts, hex(b) FROM t WHERE id = 7",
                vec![],
                Consistency::Local,
            ))
            .unwrap()
            .rows
        })
        .collect();
    assert_eq!(per_node[0], per_node[1]);
    assert_eq!(per_node[1], per_node[2]);
}

/// A write sent to a follower is forwarded to the leader, and the answer names the leader;
/// a request that was already forwarded once is refused with NotLeader naming the leader's
/// address (no forwarding loops); a linearizable read on a follower sees the latest
/// acknowledged write.
#[test]
fn follower_forwards_writes_and_serves_linearizable_reads() {
    let c = Cluster::start(3, &[]);
    let leader = c.wait_leader(T);
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    c.rt.block_on(async {
        let req = |forwarded: bool, sql: &str| {
            pb::request::Body::Execute(pb::ExecuteRequest {
                forwarded,
                db: "main".into(),
                statements: vec![pb::Statement::from(&Statement::new(sql))],
            })
        };
        match Client::call_node(
            c.addr(follower),
            "raftsql",
            req(false, "CREATE TABLE fw(a)"),
        )
        .await
        .unwrap()
        {
            pb::response::Body::Execute(r) => assert_eq!(r.leader_addr, c.addr(leader).to_string()),
            other => panic!("expected the forwarded write to succeed, got {other:?}"),
        }
        // Only a member may mark a write as already forwarded: a client's mark is ignored
        // (the write is forwarded as usual)...
        match Client::call_node(c.addr(follower), "raftsql", req(true, "CREATE TABLE x1(a)"))
            .await
            .unwrap()
        {
            pb::response::Body::Execute(r) => assert_eq!(r.leader_addr, c.addr(leader).to_string()),
            other => panic!("a client's forwarded mark was not ignored: {other:?}"),
        }
        // ...and a member's forwarded write that reaches a follower is not forwarded again.
        let mut as_member = c.connect_as(leader, follower).await;
        match as_member
            .call(req(true, "CREATE TABLE x2(a)"))
            .await
            .unwrap()
        {
            pb::response::Body::Error(e) => match raftsql_core::fuzzing::from_pb(e) {
                Error::NotLeader {
                    leader_id,
                    leader_addr,
                } => {
                    assert_eq!(leader_id, Some(leader));
                    assert_eq!(leader_addr, Some(c.addr(leader).to_string()));
                }
                other => panic!("expected NotLeader, got {other:?}"),
            },
            other => panic!("expected an error, got {other:?}"),
        }
        // Through a client of every node.
        let all = c.client();
        all.execute("main", "CREATE TABLE x(a)", vec![])
            .await
            .unwrap();
        for i in 0..20 {
            all.execute("main", "INSERT INTO x VALUES (?1)", vec![Value::Integer(i)])
                .await
                .unwrap();
            // Linearizable read on the follower right after the ack: must see it.
            let f = Client::new(vec![c.addr(follower)], "raftsql");
            let rows = f
                .query("main", "SELECT count(*) FROM x", vec![])
                .await
                .unwrap();
            assert_eq!(rows.rows[0][0], Value::Integer(i + 1));
        }
        // A SQL error is typed and nothing is written.
        let e = all
            .execute("main", "INSERT INTO nope VALUES (1)", vec![])
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Sql { .. }), "{e:?}");
    });
}

/// Invariant 2: a transaction whose entry cannot commit is never visible, even on the leader
/// that ran it, and its caller gets an error; after the survivors elect a leader and write,
/// the old leader's entry is overwritten and all replicas agree.
#[test]
fn uncommitted_write_is_never_visible_and_is_discarded() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader(T);
    let others: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let client = c.client();
    c.rt.block_on(client.execute("main", "CREATE TABLE t(k TEXT PRIMARY KEY)", vec![]))
        .unwrap();
    c.wait_converged(T);
    // Cut the leader off: its followers die.
    for id in &others {
        c.kill(*id);
    }
    let only_leader = c.client_of(leader);
    let write = c.rt.spawn(async move {
        only_leader
            .execute("main", "INSERT INTO t VALUES ('lost')", vec![])
            .await
    });
    // While the write is in flight, the leader must not show it.
    let watcher = c.client_of(leader);
    let deadline = std::time::Instant::now() + Duration::from_millis(1500);
    let mut reads = 0;
    while std::time::Instant::now() < deadline {
        if let Ok(r) = c.rt.block_on(watcher.query_with(
            "main",
            "SELECT count(*) FROM t",
            vec![],
            Consistency::Local,
        )) {
            assert_eq!(
                r.rows[0][0],
                Value::Integer(0),
                "uncommitted row visible on the leader"
            );
            reads += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        reads > 10,
        "local reads kept working on the isolated leader ({reads})"
    );
    let outcome = c.rt.block_on(write).unwrap();
    assert!(
        outcome.is_err(),
        "a write without quorum must fail, got {outcome:?}"
    );
    // The old leader dies too; the two others come back, elect a leader, write.
    c.kill(leader);
    for id in &others {
        c.spawn(*id);
    }
    let survivors = Client::new(others.iter().map(|i| c.addr(*i)).collect(), "raftsql");
    c.rt.block_on(survivors.execute("main", "INSERT INTO t VALUES ('kept')", vec![]))
        .unwrap();
    c.spawn(leader);
    c.wait_converged(T);
    for id in 1..=3 {
        assert_eq!(
            c.local_count(id, "main", "SELECT count(*) FROM t WHERE k = 'lost'"),
            0,
            "node {id}"
        );
        assert_eq!(
            c.local_count(id, "main", "SELECT count(*) FROM t WHERE k = 'kept'"),
            1,
            "node {id}"
        );
    }
}

/// Opening a data directory that a running node holds fails with a clear message.
#[test]
fn second_process_on_same_data_dir_is_refused() {
    let c = Cluster::start(1, &[]);
    c.wait_leader(T);
    let out = std::process::Command::new(harness::bin())
        .args([
            "node",
            "--id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--bootstrap-peers",
            &c.peers,
        ])
        .arg("--data-dir")
        .arg(c.data_dir(1))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another raftsql process"),
        "stderr: {err}"
    );
}

/// A transaction too large for one replicated entry is refused with a clear error before it
/// is proposed: nothing of it is visible, the leader keeps its term, and the next write works.
#[test]
fn oversized_transaction_is_refused_clearly() {
    let cl = Cluster::start(3, &[]);
    let leader = cl.wait_leader(T);
    let c = cl.client();
    let term = cl.status(leader, false).unwrap().term;
    let r = cl.rt.block_on(async {
        c.execute(
            "main",
            "CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)",
            vec![],
        )
        .await
        .unwrap();
        c.execute(
            "main",
            "WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < 60000) \
             INSERT INTO t(v) SELECT randomblob(1000) FROM s",
            vec![],
        )
        .await
    });
    match r {
        Err(Error::Invalid(m)) => assert!(m.contains("split it into smaller transactions"), "{m}"),
        other => panic!("expected a clear refusal, got {other:?}"),
    }
    cl.rt
        .block_on(c.execute("main", "INSERT INTO t(v) VALUES ('small')", vec![]))
        .expect("the next write");
    cl.wait_converged(T);
    for id in 1..=3 {
        assert_eq!(cl.local_count(id, "main", "SELECT count(*) FROM t"), 1);
    }
    assert_eq!(
        cl.status(leader, false).unwrap().term,
        term,
        "leadership was disturbed"
    );
}

/// A ~400 MiB write: 100,000 blobs of 4,000 bytes, far more pages than one entry carries.
const HUGE_INSERT: &str = "WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s \
     WHERE x < 100000) INSERT INTO t(v) SELECT randomblob(4000) FROM s";

/// A one-node cluster with `t(k, v)` for the oversized-transaction tests (statements may run
/// for 120 s), its leader, a client, and the leader's peak memory (VmHWM) before the test.
fn oversized_setup() -> (Cluster, u64, Client, u64) {
    let cl = Cluster::start(1, &["--statement-timeout", "120s"]);
    let leader = cl.wait_leader(T);
    let c = cl.client();
    cl.rt
        .block_on(c.execute(
            "main",
            "CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)",
            vec![],
        ))
        .unwrap();
    let before = cl.vm_hwm_kib(leader);
    (cl, leader, c, before)
}

/// `r` is the clear refusal of an oversized transaction.
fn assert_refused_as_too_large<T: std::fmt::Debug>(r: Result<T, Error>) {
    match r {
        Err(Error::Invalid(m)) => assert!(m.contains("split it into smaller transactions"), "{m}"),
        other => panic!("expected a clear refusal, got {other:?}"),
    }
}

/// The leader's peak memory grew by less than 160 MiB from `before` to `after` (KiB).
fn assert_peak_growth_bounded(before: u64, after: u64, what: &str) {
    assert!(
        after < before + 160 * 1024,
        "the leader's peak memory grew by {} MiB{what}",
        (after - before) / 1024
    );
}

/// Refusing an oversized transaction costs the leader no more memory than one entry's worth:
/// its frames are read in chunks and the read stops at the limit (it used to load every frame
/// of the transaction first, so a 400 MiB `INSERT ... SELECT randomblob()` took 400 MiB).
#[test]
fn refusing_an_oversized_transaction_keeps_memory_bounded() {
    let (cl, leader, c, before) = oversized_setup();
    let r = cl.rt.block_on(c.execute("main", HUGE_INSERT, vec![]));
    let after = cl.vm_hwm_kib(leader);
    println!("leader VmHWM {before} KiB before, {after} KiB after refusing a ~400 MiB transaction");
    assert_refused_as_too_large(r);
    assert_peak_growth_bounded(before, after, "");
    cl.rt
        .block_on(c.execute("main", "INSERT INTO t(v) VALUES ('small')", vec![]))
        .expect("the next write");
    // Again and again: each refused transaction leaves its frames past the WAL's committed
    // end until a checkpoint, and the next one may not grow the WAL past that junk.
    for _ in 0..4 {
        let r = cl.rt.block_on(c.execute("main", HUGE_INSERT, vec![]));
        assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
    }
    let again = cl.vm_hwm_kib(leader);
    println!("leader VmHWM {again} KiB after four more");
    assert_peak_growth_bounded(before, again, " after five refusals");
}

/// The same bound for an interactive transaction: it holds the writer across round trips,
/// and each statement's pages reach the WAL (held in memory) as SQLite spills them. A
/// statement that would grow it past one entry's pages is refused while it writes; the
/// transaction ends, nothing of it is kept, and the leader's peak memory grows by about one
/// entry, not by the statement's 400 MiB.
#[test]
fn an_oversized_interactive_transaction_is_refused_with_bounded_memory() {
    let (cl, leader, c, before) = oversized_setup();
    let r = cl.rt.block_on(async {
        let mut tx = c.transaction("main", Duration::from_secs(30)).await?;
        tx.execute("INSERT INTO t(v) VALUES ('first')", vec![])
            .await?;
        tx.execute(HUGE_INSERT, vec![]).await?;
        tx.commit().await
    });
    let after = cl.vm_hwm_kib(leader);
    println!(
        "leader VmHWM {before} KiB before, {after} KiB after an interactive ~400 MiB statement"
    );
    assert_refused_as_too_large(r);
    assert_peak_growth_bounded(before, after, "");
    cl.rt
        .block_on(c.execute("main", "INSERT INTO t(v) VALUES ('small')", vec![]))
        .expect("the next write");
    assert_eq!(
        cl.local_count(leader, "main", "SELECT count(*) FROM t"),
        1,
        "nothing of the refused transaction is kept"
    );
}

/// Read consistency levels on a follower cut off from its cluster (iptables). A
/// `Bounded(d)` read is served from the node's state, without a round trip, while a
/// read-index round started within `d`; past that it fails rather than answer the value the
/// node was cut off with (which a `Local` read answers, as documented). After the heal it
/// sees the write made meanwhile.
#[test]
fn bounded_reads_are_never_staler_than_their_bound() {
    if !harness::net::Partition::usable_or_skip() {
        return;
    }
    let c = Cluster::start(3, &[]);
    let leader = c.wait_leader(T);
    let f = (1..=3).find(|i| *i != leader).unwrap();
    let others: Vec<_> = (1..=3)
        .filter(|i| *i != f)
        .map(|i| c.addr(i).ip())
        .collect();
    let at_leader = c.client_of(leader);
    let at_f = c.client_of(f).with_timeout(Duration::from_secs(5));
    let get = |cl: &Client, consistency| {
        c.rt.block_on(cl.query_with("main", "SELECT v FROM r WHERE k = 1", vec![], consistency))
            .map(|r| r.rows)
    };
    let one = |v: i64| vec![vec![Value::Integer(v)]];
    c.rt.block_on(async {
        at_leader
            .execute("main", "CREATE TABLE r(k INTEGER PRIMARY KEY, v)", vec![])
            .await
            .unwrap();
        at_leader
            .execute("main", "INSERT INTO r VALUES (1, 1)", vec![])
            .await
            .unwrap();
    });
    // A linearizable read on the follower: a read-index round, which bounded reads reuse.
    assert_eq!(get(&at_f, Consistency::Linearizable).unwrap(), one(1));
    let round_done = std::time::Instant::now();
    // A client of every node, answered by the follower first (so it prefers it).
    let mut order = vec![c.addr(f)];
    order.extend((1..=3).filter(|i| *i != f).map(|i| c.addr(i)));
    let everywhere = Client::new(order, "raftsql");
    assert_eq!(get(&everywhere, Consistency::Linearizable).unwrap(), one(1));

    let cut = harness::net::Partition::between(&[c.addr(f).ip()], &others).unwrap();
    // No round can complete now: this one is served from the last round's index.
    let long = Consistency::Bounded(Duration::from_secs(60));
    assert_eq!(get(&at_f, long).unwrap(), one(1));
    c.rt.block_on(at_leader.execute("main", "UPDATE r SET v = 2 WHERE k = 1", vec![]))
        .unwrap();
    let acked = std::time::Instant::now();

    // Once the last round is older than the bound, the follower cannot tell what it missed.
    let bound = Duration::from_millis(300);
    while round_done.elapsed() <= bound || acked.elapsed() <= bound {
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = get(&at_f, Consistency::Bounded(bound));
    assert!(
        r.is_err(),
        "a read bounded to {bound:?} on a node cut off for longer answered {r:?}"
    );
    assert!(get(&at_f, Consistency::Linearizable).is_err());
    // A local read answers what the node has: the value it was cut off with.
    assert_eq!(get(&at_f, Consistency::Local).unwrap(), one(1));
    // A client of every node leaves the follower that cannot serve (Unavailable) for one
    // that can, within its timeout, instead of retrying the follower until it gives up.
    assert_eq!(get(&everywhere, Consistency::Linearizable).unwrap(), one(2));

    drop(cut);
    let deadline = std::time::Instant::now() + T;
    loop {
        match get(&at_f, Consistency::Bounded(bound)) {
            Ok(rows) => {
                assert_eq!(rows, one(2), "after the heal");
                break;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("not yet: {e}");
            }
            Err(e) => panic!("no bounded read after the heal: {e}"),
        }
    }
}

/// What a [`keep_writing`] writer counts.
#[derive(Default)]
struct Writes {
    ok: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

/// Writes `t` (upserts of 300 random bytes over 500 keys from `base`) through `cl` until
/// `stop`, counting the writes that succeed and those that fail.
fn keep_writing(
    c: &Cluster,
    cl: Client,
    base: i64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (std::sync::Arc<Writes>, tokio::task::JoinHandle<()>) {
    use std::sync::atomic::Ordering::SeqCst;
    let writes = std::sync::Arc::new(Writes::default());
    let counts = writes.clone();
    let task = c.rt.spawn(async move {
        let mut i = 0i64;
        while !stop.load(SeqCst) {
            i += 1;
            let r = cl
                .execute(
                    "main",
                    "INSERT INTO t VALUES (?1, randomblob(300)) \
                     ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                    vec![Value::Integer(base + i % 500)],
                )
                .await;
            let n = if r.is_ok() {
                &counts.ok
            } else {
                &counts.failed
            };
            n.fetch_add(1, SeqCst);
        }
    });
    (writes, task)
}

/// A leader cut off in the middle of its writers and of checkpoints every 16 frames: its
/// batches are executed on a speculative state and rewound when they cannot commit, while its
/// passive checkpoint copies run pinned at the applied entry (P1, P2 in
/// docs/notes/checkpoint-copy.md). Once healed, every replica is byte-identical and intact.
#[test]
fn a_leader_cut_off_while_it_checkpoints_leaves_the_replicas_identical() {
    use std::sync::atomic::Ordering::SeqCst;
    if !harness::net::Partition::usable_or_skip() {
        return;
    }
    let c = Cluster::start(3, &["--checkpoint-frames", "16"]);
    let old = c.wait_leader(T);
    let others: Vec<u64> = (1..=3).filter(|i| *i != old).collect();
    c.rt.block_on(c.client_of(old).execute(
        "main",
        "CREATE TABLE t(k INTEGER PRIMARY KEY, v)",
        vec![],
    ))
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let short = Duration::from_secs(2);
    let (at_old, old_task) =
        keep_writing(&c, c.client_of(old).with_timeout(short), 0, stop.clone());
    let (at_other, other_task) = keep_writing(
        &c,
        c.client_of(others[0]).with_timeout(short),
        10_000,
        stop.clone(),
    );
    let checkpoint = |id| c.status(id, false).map_or(0, |s| s.checkpoint_index);
    // Checkpoints are running under the writers on the leader: two of them since now.
    let first = harness::wait_for(T, "a checkpoint on the leader", || {
        Some(checkpoint(old)).filter(|i| *i > 0)
    });
    harness::wait_for(T, "a second checkpoint on the leader", || {
        Some(checkpoint(old)).filter(|i| *i > first)
    });
    let cut = harness::net::Partition::between(
        &[c.addr(old).ip()],
        &others.iter().map(|i| c.addr(*i).ip()).collect::<Vec<_>>(),
    )
    .unwrap();
    // The cut-off leader's writes fail, and the others elect a leader of their own and
    // commit the other writer's rows.
    harness::wait_for(T, "a failed write on the cut-off leader", || {
        Some(()).filter(|_| at_old.failed.load(SeqCst) > 0)
    });
    let applied = |id| c.status(id, false).map_or(0, |s| s.applied_index);
    let at_cut = applied(others[0]);
    harness::wait_for(T, "writes committed by the other side", || {
        c.status(others[0], false)
            .filter(|s| s.leader_id != 0 && s.leader_id != old)
            .filter(|s| s.applied_index > at_cut + 50)
    });
    drop(cut);
    let at_heal = applied(others[0]);
    harness::wait_for(T, "the old leader catching up", || {
        Some(applied(old)).filter(|i| *i >= at_heal)
    });
    let ok_old = at_old.ok.load(SeqCst);
    harness::wait_for(T, "a write through the old leader after the heal", || {
        Some(()).filter(|_| at_old.ok.load(SeqCst) > ok_old)
    });
    stop.store(true, SeqCst);
    c.rt.block_on(old_task).unwrap();
    c.rt.block_on(other_task).unwrap();
    assert!(at_other.ok.load(SeqCst) > 0);
    c.wait_converged(T);
    c.check_integrity("main");
}
