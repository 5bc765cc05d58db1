//! Crashes at any instant: kill -9 during writes, restarts, checkpoints, corruption.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use raftsql_core::{Consistency, Error, Statement, Value};
use raftsql_tests::harness::Cluster;

const T: Duration = Duration::from_secs(40);

/// Writers insert keys in two tables atomically while the leader is killed (-9) twice.
/// Every acknowledged write survives; writes with an unknown outcome are all-or-nothing;
/// replicas end byte-identical.
#[test]
fn kill_leader_during_writes_loses_no_acknowledged_write() {
    let mut c = Cluster::start(3, &["--checkpoint-frames", "64"]);
    c.wait_leader(T);
    let client = Arc::new(c.client());
    c.rt.block_on(client.execute_batch(
        "main",
        &[
            Statement::new("CREATE TABLE a(k INTEGER PRIMARY KEY)"),
            Statement::new("CREATE TABLE b(k INTEGER PRIMARY KEY)"),
        ],
    ))
    .unwrap();
    let acked = Arc::new(parking_lot::Mutex::new(BTreeSet::new()));
    let unknown = Arc::new(parking_lot::Mutex::new(BTreeSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..4i64 {
        let client = c.client();
        let (acked, unknown, stop) = (acked.clone(), unknown.clone(), stop.clone());
        tasks.push(c.rt.spawn(async move {
            let mut i = 0i64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let k = w * 1_000_000 + i;
                i += 1;
                let r = client
                    .execute_batch(
                        "main",
                        &[
                            Statement::with_params(
                                "INSERT INTO a VALUES (?1)",
                                vec![Value::Integer(k)],
                            ),
                            Statement::with_params(
                                "INSERT INTO b VALUES (?1)",
                                vec![Value::Integer(k)],
                            ),
                        ],
                    )
                    .await;
                match r {
                    Ok(_) => {
                        acked.lock().insert(k);
                    }
                    Err(Error::Sql { .. }) => panic!("unexpected SQL error"),
                    Err(_) => {
                        unknown.lock().insert(k);
                    }
                }
            }
        }));
    }
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(1500));
        let leader = c.wait_leader(T);
        c.kill(leader);
        std::thread::sleep(Duration::from_millis(1500));
        c.spawn(leader);
    }
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in tasks {
        c.rt.block_on(t).unwrap();
    }
    c.wait_converged(T);
    let acked = acked.lock().clone();
    let unknown = unknown.lock().clone();
    assert!(
        acked.len() > 50,
        "too few writes succeeded: {}",
        acked.len()
    );
    for id in 1..=3 {
        let q = |sql: &str| {
            c.rt.block_on(
                c.client_of(id)
                    .query_with("main", sql, vec![], Consistency::Local),
            )
            .unwrap()
            .rows
            .into_iter()
            .map(|r| match r[0] {
                Value::Integer(k) => k,
                _ => panic!(),
            })
            .collect::<BTreeSet<i64>>()
        };
        let a = q("SELECT k FROM a");
        let b = q("SELECT k FROM b");
        assert_eq!(a, b, "node {id}: a transaction is half visible");
        for k in &acked {
            assert!(a.contains(k), "node {id}: acknowledged write {k} lost");
        }
        for k in &a {
            assert!(
                acked.contains(k) || unknown.contains(k),
                "node {id}: key {k} was never written"
            );
        }
    }
    eprintln!(
        "acked {} writes, {} with unknown outcome",
        acked.len(),
        unknown.len()
    );
}

/// Kill every node at once, restart them all: the committed state comes back exactly.
#[test]
fn kill_all_and_restart_restores_committed_state() {
    let mut c = Cluster::start(3, &["--checkpoint-frames", "16"]);
    c.wait_leader(T);
    let client = c.client();
    c.rt.block_on(async {
        client
            .execute(
                "main",
                "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)",
                vec![],
            )
            .await
            .unwrap();
        for i in 0..300 {
            client
                .execute(
                    "main",
                    "INSERT INTO t VALUES (?1, hex(randomblob(100)))",
                    vec![Value::Integer(i)],
                )
                .await
                .unwrap();
        }
    });
    let before = c.wait_converged(T);
    let events = |c: &Cluster, filter: &str| {
        c.local_count(
            1,
            "_raftsql",
            &format!("SELECT count(*) FROM events {filter}"),
        )
    };
    let last_seq = c.local_count(1, "_raftsql", "SELECT coalesce(max(seq), 0) FROM events");
    let events_before = events(&c, "");
    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.spawn(id);
    }
    c.wait_leader(T);
    let after = c.wait_converged(T);
    // The restarted cluster's leader records its election in the system database
    // (members/history.rs), whenever its keeper gets to it: that is the one change the
    // restart may make. Every earlier event is still there, nothing else was added, and
    // without the new record the state is byte-identical.
    let new = format!("WHERE seq > {last_seq}");
    assert_eq!(events(&c, &format!("{new} AND kind != 'leader'")), 0);
    assert_eq!(
        events(&c, &format!("WHERE seq <= {last_seq}")),
        events_before
    );
    assert_eq!(before["main"], after["main"], "main after restart differs");
    if events(&c, &new) == 0 {
        assert_eq!(before, after, "state after restart differs");
    }
    assert_eq!(c.local_count(1, "main", "SELECT count(*) FROM t"), 300);
    // And the cluster takes writes again.
    c.rt.block_on(
        c.client()
            .execute("main", "INSERT INTO t VALUES (1000, 'x')", vec![]),
    )
    .unwrap();
}

/// A crash in the middle of a checkpoint (after SQLite copied WAL pages into the database
/// file, before the checkpoint index was recorded) recovers exactly.
#[test]
fn crash_in_the_middle_of_a_checkpoint_recovers_exactly() {
    crash_in_a_checkpoint_recovers_exactly("checkpoint-before-meta");
}

/// A crash between a checkpoint's two phases (the passive copy has written pages of the
/// pinned state into the files, some pages not, the WAL not emptied) recovers exactly.
#[test]
fn a_crash_after_the_passive_copy_recovers_exactly() {
    crash_in_a_checkpoint_recovers_exactly("checkpoint-after-copy");
}

/// A crash in the middle of the passive copy (the database file holds two of the copy's
/// pages and not the rest, the target recorded before the copy) recovers exactly.
#[test]
fn a_crash_in_the_middle_of_the_passive_copy_recovers_exactly() {
    crash_in_a_checkpoint_recovers_exactly("checkpoint-mid-copy");
}

fn crash_in_a_checkpoint_recovers_exactly(failpoint: &str) {
    let mut c = Cluster::start(3, &["--checkpoint-frames", "32"]);
    c.wait_leader(T);
    let client = c.client();
    c.rt.block_on(async {
        client
            .execute(
                "main",
                "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)",
                vec![],
            )
            .await
            .unwrap();
        for i in 0..50 {
            client
                .execute(
                    "main",
                    "INSERT INTO t VALUES (?1, hex(randomblob(200)))",
                    vec![Value::Integer(i)],
                )
                .await
                .unwrap();
        }
    });
    c.wait_converged(T);
    // A follower restarts armed: its next checkpoint crashes between the copy and the record.
    let leader = c.wait_leader(T);
    let f = (1..=3).find(|i| *i != leader).unwrap();
    c.kill(f);
    std::env::set_var("RAFTSQL_CRASH_AT", failpoint);
    c.spawn(f);
    std::env::remove_var("RAFTSQL_CRASH_AT");
    c.rt.block_on(async {
        for i in 50..400 {
            client
                .execute(
                    "main",
                    "UPDATE t SET v = hex(randomblob(300)) WHERE k = ?1 % 50",
                    vec![Value::Integer(i)],
                )
                .await
                .unwrap();
            client
                .execute(
                    "main",
                    "INSERT INTO t VALUES (?1, 'x')",
                    vec![Value::Integer(i)],
                )
                .await
                .unwrap();
        }
    });
    let st = c
        .wait_exit(f, T)
        .expect("the armed node should have crashed at the failpoint");
    assert!(!st.success());
    assert!(
        c.log_text(f).contains(&format!("failpoint {failpoint}")),
        "{}",
        c.log_text(f)
    );
    c.spawn(f);
    c.wait_converged(T);
    assert!(
        c.log_text(f)
            .contains("replayed the log into the database files"),
        "{}",
        c.log_text(f)
    );
    assert_eq!(c.local_count(f, "main", "SELECT count(*) FROM t"), 400);
}

/// What a crash can leave of a database file that was being created (SQLite writes its page 1
/// outside the log, through a rollback journal, when `open_writer` first opens the file).
#[derive(Clone, Copy, Debug)]
enum TornCreation {
    /// The node logged the database's first entries and crashed before it opened the file.
    NoFile,
    /// SQLite had created the file and the journal's header, not yet page 1 (what the CI run
    /// of the checkpoint crash test left: a 0-byte file beside a 512-byte journal).
    EmptyFileBesideJournal,
    /// SQLite had written page 1 and not yet deleted its journal, which is hot: opening the
    /// file would roll it back to the journal's original size, 0 pages.
    PageOneBesideHotJournal,
}

/// A database's first entry is diffed against the page 1 SQLite writes when it creates the
/// file, which no entry carries. A node that crashed before or while creating a database's
/// file, with the database's entries in its log after its checkpoint index, restarts into
/// exactly the committed state: recovery makes that page again and drops the journal first.
#[test]
fn a_database_whose_file_a_crash_left_torn_recovers_exactly() {
    let mut c = Cluster::start(3, &["--checkpoint-frames", "1000000"]);
    let leader = c.wait_leader(T);
    let f = (1..=3).find(|i| *i != leader).unwrap();
    let client = c.client();
    for (n, torn) in [
        TornCreation::NoFile,
        TornCreation::EmptyFileBesideJournal,
        TornCreation::PageOneBesideHotJournal,
    ]
    .into_iter()
    .enumerate()
    {
        let db = format!("fresh{n}");
        c.rt.block_on(async {
            client
                .execute(&db, "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)", vec![])
                .await
                .unwrap();
            for i in 0..20 {
                client
                    .execute(
                        &db,
                        "INSERT INTO t VALUES (?1, hex(randomblob(100)))",
                        vec![Value::Integer(i)],
                    )
                    .await
                    .unwrap();
            }
        });
        c.wait_converged(T);
        c.kill(f);
        let gen = c.data_dir(f).join("state").join("gen-0");
        let file = gen.join(format!("{db}.db"));
        let journal = gen.join(format!("{db}.db-journal"));
        assert!(file.exists(), "{torn:?}: {} missing", file.display());
        match torn {
            TornCreation::NoFile => std::fs::remove_file(&file).unwrap(),
            TornCreation::EmptyFileBesideJournal => {
                std::fs::write(&file, b"").unwrap();
                // The header SQLite's pager writes first: magic and record count still zero
                // until the journal is synced.
                let mut hdr = vec![0u8; 512];
                hdr[12..16].copy_from_slice(&0xa2e9_b2fdu32.to_be_bytes());
                hdr[20..24].copy_from_slice(&512u32.to_be_bytes());
                hdr[24..28].copy_from_slice(&4096u32.to_be_bytes());
                std::fs::write(&journal, hdr).unwrap();
            }
            TornCreation::PageOneBesideHotJournal => {
                let page1 = std::fs::read(&file).unwrap()[..4096].to_vec();
                std::fs::write(&file, page1).unwrap();
                // The synced header: magic, 0 records, the database's original size 0 pages.
                let mut hdr = vec![0u8; 512];
                hdr[..8].copy_from_slice(&[0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7]);
                hdr[12..16].copy_from_slice(&0xa2e9_b2fdu32.to_be_bytes());
                hdr[20..24].copy_from_slice(&512u32.to_be_bytes());
                hdr[24..28].copy_from_slice(&4096u32.to_be_bytes());
                std::fs::write(&journal, hdr).unwrap();
            }
        }
        c.spawn(f);
        c.wait_converged(T);
        assert!(
            c.log_text(f)
                .contains("replayed the log into the database files"),
            "{torn:?}: {}",
            c.log_text(f)
        );
        assert_eq!(
            c.local_count(f, &db, "SELECT count(*) FROM t"),
            20,
            "{torn:?}"
        );
    }
    c.check_integrity("fresh2");
}

/// A damaged byte inside the committed part of the Raft log is detected at start-up and
/// reported; the node refuses to serve.
#[test]
fn corrupted_log_byte_is_detected() {
    let mut c = Cluster::start(3, &[]);
    c.wait_leader(T);
    let client = c.client();
    c.rt.block_on(async {
        client
            .execute(
                "main",
                "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)",
                vec![],
            )
            .await
            .unwrap();
        for i in 0..100 {
            client
                .execute(
                    "main",
                    "INSERT INTO t VALUES (?1, 'some text to make entries bigger')",
                    vec![Value::Integer(i)],
                )
                .await
                .unwrap();
        }
    });
    c.wait_converged(T);
    c.stop(2);
    let seg = std::fs::read_dir(c.data_dir(2).join("raft"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .min()
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(&seg, bytes).unwrap();
    c.spawn(2);
    let st = c
        .wait_exit(2, T)
        .expect("node 2 must refuse to start on a corrupted log");
    assert!(!st.success());
    let log = c.log_text(2);
    assert!(log.to_lowercase().contains("corrupt"), "log: {log}");
}

/// A follower that missed more than the log keeps catches up from a snapshot streamed in
/// chunks, and ends byte-identical.
#[test]
fn lagging_follower_catches_up_by_snapshot() {
    let mut c = Cluster::start(
        3,
        &["--checkpoint-frames", "50", "--compact-log-bytes", "200000"],
    );
    c.wait_leader(T);
    let client = c.client();
    c.rt.block_on(client.execute(
        "main",
        "CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)",
        vec![],
    ))
    .unwrap();
    c.wait_converged(T);
    let leader = c.wait_leader(T);
    let lagging = (1..=3).find(|i| *i != leader).unwrap();
    c.stop(lagging);
    c.rt.block_on(async {
        for i in 0..600 {
            client
                .execute(
                    "main",
                    "INSERT INTO t VALUES (?1, randomblob(3000))",
                    vec![Value::Integer(i)],
                )
                .await
                .unwrap();
        }
    });
    let leader = c.wait_leader(T);
    let st = c.status(leader, false).unwrap();
    assert!(
        st.log_first_index > 10,
        "the leader should have compacted its log: {st:?}"
    );
    c.spawn(lagging);
    c.wait_converged(Duration::from_secs(60));
    assert_eq!(
        c.local_count(lagging, "main", "SELECT count(*) FROM t"),
        600
    );
    assert!(
        c.log_text(lagging).contains("installed snapshot"),
        "the lagging node should have installed a snapshot"
    );
}
