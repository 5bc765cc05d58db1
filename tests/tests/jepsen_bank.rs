//! Jepsen-style bank test (short profile): 5 accounts of 100 in a SQL table; clients move
//! random amounts between random accounts in interactive transactions (read the balance,
//! then two UPDATEs, then COMMIT, over several round trips), while readers sum the balances,
//! linearizably through the leader and locally on every node, and the nemesis
//! (`harness::nemesis`, every kind of fault) works on the cluster. Invariants: every read sees all 5 accounts, no negative balance, and
//! a total of exactly 500; after the faults all replicas are byte-identical with a total of
//! 500.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::nemesis::{self, Kind, Rng, Settings};
use raftsql_core::{Client, Consistency, Statement, Value};
use raftsql_tests::harness;
use raftsql_tests::harness::Cluster;
use raftsql_tests::report::Plain;

const ACCOUNTS: i64 = 5;
const TOTAL: i64 = 500;
const OP_TIMEOUT: Duration = Duration::from_secs(2);

fn int(v: &Value) -> i64 {
    match v {
        Value::Integer(i) => *i,
        v => panic!("not an integer: {v:?}"),
    }
}

/// One transfer in an interactive transaction; `Ok(true)` if it committed.
async fn transfer(c: &Client, from: i64, to: i64, amount: i64) -> raftsql_core::Result<bool> {
    let mut tx = c.transaction("bank", Duration::from_secs(5)).await?;
    let (rows, _) = tx
        .execute(
            "SELECT balance FROM accounts WHERE id = ?1",
            vec![from.into()],
        )
        .await?;
    if int(&rows.rows[0][0]) < amount {
        tx.rollback().await?;
        return Ok(false);
    }
    tx.execute(
        "UPDATE accounts SET balance = balance - ?1 WHERE id = ?2",
        vec![amount.into(), from.into()],
    )
    .await?;
    tx.execute(
        "UPDATE accounts SET balance = balance + ?1 WHERE id = ?2",
        vec![amount.into(), to.into()],
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

#[test]
fn bank_total_is_invariant_under_kills_pauses_and_partitions() {
    let settings = Settings::from_env(24, 7);
    let mut cl = Cluster::start(3, &[]);
    cl.wait_leader(Duration::from_secs(30));
    let setup = cl.client();
    // One atomic batch: every committed state (which a lagging node may serve to local
    // readers, e.g. while it replays after a restart) has all the accounts.
    let values: Vec<String> = (0..ACCOUNTS)
        .map(|id| format!("({id}, {})", TOTAL / ACCOUNTS))
        .collect();
    cl.rt
        .block_on(setup.execute_batch(
            "bank",
            &[
                Statement::new(
                    "CREATE TABLE accounts(id INTEGER PRIMARY KEY, \
                     balance INTEGER NOT NULL CHECK (balance >= 0))",
                ),
                Statement::new(format!("INSERT INTO accounts VALUES {}", values.join(", "))),
            ],
        ))
        .unwrap();
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let bad: Arc<parking_lot::Mutex<Vec<String>>> = Default::default();
    let history: Arc<parking_lot::Mutex<Vec<Plain>>> = Default::default();
    let us = move || t0.elapsed().as_micros() as u64;
    let mut tasks = Vec::new();
    let all: Vec<_> = (1..=3).map(|i| cl.addr(i)).collect();
    for w in 0..4u64 {
        let (stop, committed, failed) = (stop.clone(), committed.clone(), failed.clone());
        let history = history.clone();
        let c = Client::new(all.clone(), "raftsql").with_dialer(cl.client_tls.clone());
        tasks.push(cl.rt.spawn(async move {
            let mut rng = Rng(0x51_7cc1_b727_220a ^ ((w + 1) * 0x9e37_79b9));
            while !stop.load(Ordering::SeqCst) {
                let from = (rng.next() % ACCOUNTS as u64) as i64;
                let to = (from + 1 + (rng.next() % (ACCOUNTS as u64 - 1)) as i64) % ACCOUNTS;
                let amount = (rng.next() % 20) as i64 + 1;
                let invoked = us();
                let r = tokio::time::timeout(OP_TIMEOUT, transfer(&c, from, to, amount)).await;
                let what = match r {
                    Ok(Ok(true)) => {
                        committed.fetch_add(1, Ordering::SeqCst);
                        "committed"
                    }
                    Ok(Ok(false)) => "refused (balance too low)",
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        "failed or unknown"
                    }
                };
                history.lock().push(Plain {
                    client: w,
                    what: format!("transfer {amount} from {from} to {to}: {what}"),
                    invoked,
                    completed: us(),
                    ok: matches!(r, Ok(Ok(_))),
                });
                if !matches!(r, Ok(Ok(_))) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    // Readers: linearizable through any node, and local on each node.
    for r in 0..4usize {
        let (stop, reads, bad) = (stop.clone(), reads.clone(), bad.clone());
        let history = history.clone();
        let (c, local) = if r == 0 {
            (cl.client(), false)
        } else {
            (cl.client_of(r as u64), true)
        };
        tasks.push(cl.rt.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let q = c.query_with(
                    "bank",
                    "SELECT count(*), sum(balance), min(balance) FROM accounts",
                    vec![],
                    if local {
                        Consistency::Local
                    } else {
                        Consistency::Linearizable
                    },
                );
                let invoked = us();
                let what = match tokio::time::timeout(OP_TIMEOUT, q).await {
                    Ok(Ok(rows)) => {
                        reads.fetch_add(1, Ordering::SeqCst);
                        let row = &rows.rows[0];
                        let (n, sum, min) = (int(&row[0]), int(&row[1]), int(&row[2]));
                        let what = format!("{n} accounts, total {sum}, min {min}");
                        if n != ACCOUNTS || sum != TOTAL || min < 0 {
                            bad.lock()
                                .push(format!("reader {r} (local: {local}): {what}"));
                        }
                        Some(what)
                    }
                    _ => None,
                };
                history.lock().push(Plain {
                    client: 100 + r as u64,
                    what: format!(
                        "{} read: {}",
                        if local { "local" } else { "linearizable" },
                        what.as_deref().unwrap_or("no answer")
                    ),
                    invoked,
                    completed: us(),
                    ok: what.is_some(),
                });
                if what.is_none() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let faults = nemesis::run(&mut cl, t0, settings.run, &Kind::all(3), settings.seed);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        cl.rt.block_on(t).unwrap();
    }
    let digests = cl.wait_converged(Duration::from_secs(30));
    cl.check_integrity("bank");
    assert!(digests.contains_key("bank"));
    for id in 1..=3 {
        assert_eq!(
            cl.local_count(id, "bank", "SELECT sum(balance) FROM accounts"),
            TOTAL,
            "node {id}'s final total"
        );
    }
    let (committed, failed, reads) = (
        committed.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
        reads.load(Ordering::SeqCst),
    );
    eprintln!(
        "{committed} transfers committed, {failed} failed or unknown, {reads} reads; faults: {:?}",
        faults.iter().map(|f| &f.what).collect::<Vec<_>>()
    );
    let bad = bad.lock();
    let verdict = if bad.is_empty() {
        format!(
            "ok: {committed} transfers committed, {failed} failed or unknown, {reads} reads \
             all with {ACCOUNTS} accounts, total {TOTAL}, no negative balance\n"
        )
    } else {
        format!("{} inconsistent reads:\n{}\n", bad.len(), bad.join("\n"))
    };
    nemesis::report("bank3", &history.lock(), &faults, &verdict);
    assert!(
        bad.is_empty(),
        "inconsistent reads: {:?}",
        &bad[..bad.len().min(10)]
    );
    assert!(committed >= 50, "too few transfers committed ({committed})");
    assert!(reads >= 200, "too few reads ({reads})");
}
