//! Jepsen-style list-append test (short profile): clients append unique values to six
//! lists in SQL (one `UPDATE ... SET v = v || value`, an atomic batch or an interactive
//! transaction appending one value to two lists), and read all lists in one query, through
//! the leader (linearizable) or locally on one node, while the nemesis (`harness::nemesis`,
//! every kind of fault) works on a 3-node cluster. The checker (`raftsql_tests::append`)
//! finds lost, duplicated, reordered, torn and stale appends against the final lists. The
//! run's report goes to `target/tmp/jepsen/append3-*` (or `$RAFTSQL_REPORT_DIR`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::nemesis::{self, Kind, Rng, Settings};
use raftsql_core::{Client, Consistency, Statement, Value};
use raftsql_tests::append::{check, Action, Op};
use raftsql_tests::harness;
use raftsql_tests::harness::Cluster;

const KEYS: u64 = 6;
const OP_TIMEOUT: Duration = Duration::from_secs(2);
const APPEND: &str = "UPDATE lists SET v = v || ?2 || ' ' WHERE k = ?1";

fn lists(rows: &raftsql_core::Rows) -> BTreeMap<u64, Vec<u64>> {
    rows.rows
        .iter()
        .map(|r| match (&r[0], &r[1]) {
            (Value::Integer(k), Value::Text(v)) => (
                *k as u64,
                v.split_whitespace().map(|x| x.parse().unwrap()).collect(),
            ),
            r => panic!("unexpected row {r:?}"),
        })
        .collect()
}

/// Appends `value` to `keys`: one statement for one key; for two, an atomic batch or (if
/// `interactive`) an interactive transaction.
async fn append(
    c: &Client,
    keys: &[u64],
    value: u64,
    interactive: bool,
) -> raftsql_core::Result<()> {
    let params = |k: u64| vec![Value::Integer(k as i64), Value::Text(value.to_string())];
    match keys {
        [k] => c.execute("append", APPEND, params(*k)).await.map(|_| ()),
        _ if interactive => {
            let mut tx = c.transaction("append", Duration::from_secs(5)).await?;
            for k in keys {
                tx.execute(APPEND, params(*k)).await?;
            }
            tx.commit().await
        }
        _ => {
            let stmts: Vec<Statement> = keys
                .iter()
                .map(|k| Statement::with_params(APPEND, params(*k)))
                .collect();
            c.execute_batch("append", &stmts).await.map(|_| ())
        }
    }
}

#[test]
fn appends_are_never_lost_duplicated_reordered_or_torn() {
    let settings = Settings::from_env(24, 99);
    let mut cl = Cluster::start(3, &[]);
    cl.wait_leader(Duration::from_secs(30));
    let rows: Vec<String> = (0..KEYS).map(|k| format!("({k}, '')")).collect();
    cl.rt
        .block_on(cl.client().execute_batch(
            "append",
            &[
                Statement::new("CREATE TABLE lists(k INTEGER PRIMARY KEY, v TEXT NOT NULL)"),
                Statement::new(format!("INSERT INTO lists VALUES {}", rows.join(", "))),
            ],
        ))
        .unwrap();
    let all: Vec<_> = (1..=3).map(|i| cl.addr(i)).collect();
    let t0 = Instant::now();
    let us = move || t0.elapsed().as_micros() as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let history: Arc<parking_lot::Mutex<Vec<Op>>> = Default::default();
    let mut tasks = Vec::new();
    for client in 0..5u64 {
        let (stop, history) = (stop.clone(), history.clone());
        let c = Client::new(all.clone(), "raftsql").with_dialer(cl.client_tls.clone());
        let home = Client::new(vec![all[client as usize % all.len()]], "raftsql")
            .with_dialer(cl.client_tls.clone());
        tasks.push(cl.rt.spawn(async move {
            let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ ((client + 1) * 0x9e37_79b9));
            let mut seq = 0;
            while !stop.load(Ordering::SeqCst) {
                let r = rng.next();
                let invoked = us();
                let (action, linearizable, ok) = match r % 10 {
                    0..=5 => {
                        seq += 1;
                        let value = (client + 1) * 1_000_000 + seq;
                        let k = (r >> 8) % KEYS;
                        let keys = if r % 10 < 4 {
                            vec![k]
                        } else {
                            vec![k, (k + 1 + (r >> 16) % (KEYS - 1)) % KEYS]
                        };
                        let f = append(&c, &keys, value, r % 10 == 5);
                        let ok = matches!(tokio::time::timeout(OP_TIMEOUT, f).await, Ok(Ok(())));
                        (Action::Append { keys, value }, true, ok)
                    }
                    n => {
                        let local = n == 9;
                        let q = (if local { &home } else { &c }).query_with(
                            "append",
                            "SELECT k, v FROM lists ORDER BY k",
                            vec![],
                            if local {
                                Consistency::Local
                            } else {
                                Consistency::Linearizable
                            },
                        );
                        match tokio::time::timeout(OP_TIMEOUT, q).await {
                            Ok(Ok(rows)) => (Action::Read(lists(&rows)), !local, true),
                            _ => (Action::Read(BTreeMap::new()), !local, false),
                        }
                    }
                };
                let completed = us();
                history.lock().push(Op {
                    client,
                    action,
                    invoked,
                    completed,
                    ok,
                    linearizable,
                });
                if !ok {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    let faults = nemesis::run(&mut cl, t0, settings.run, &Kind::all(3), settings.seed);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        cl.rt.block_on(t).unwrap();
    }
    cl.wait_converged(Duration::from_secs(60));
    cl.check_integrity("append");
    let finals = lists(
        &cl.rt
            .block_on(
                cl.client()
                    .query("append", "SELECT k, v FROM lists ORDER BY k", vec![]),
            )
            .unwrap(),
    );
    let history = history.lock().clone();
    let started = Instant::now();
    let verdict = check(&history, &finals);
    let text = match &verdict {
        Ok(s) => format!(
            "ok: {} operations; {} appends acknowledged, {} of {} with unknown outcome took \
             effect, {} reads consistent; longest list {}\n",
            history.len(),
            s.appends_ok,
            s.unknown_applied,
            s.unknown,
            s.reads,
            s.longest
        ),
        Err(bad) => format!("{} anomalies:\n{}\n", bad.len(), bad.join("\n")),
    };
    eprintln!(
        "{}checked in {:?}; faults: {:?}",
        text,
        started.elapsed(),
        faults.iter().map(|f| &f.what).collect::<Vec<_>>()
    );
    nemesis::report("append3", &history, &faults, &text);
    let summary = match verdict {
        Ok(s) => s,
        Err(_) => panic!("{text}\n{}", cl.logs()),
    };
    assert!(summary.appends_ok >= 100, "too few appends acknowledged");
    assert!(summary.reads >= 100, "too few reads");
}
