//! What an operator does on day 1 and day 2 (issue 18), on real processes: the first query
//! on a fresh cluster, and scheduled backups (kept, pruned, checked, restored) under
//! continuous writes and across a leader change.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use raftsql_core::{backup_schedule, Client, Value};
use raftsql_tests::harness::{self, bin, Cluster};

const T: Duration = Duration::from_secs(30);

fn cli(args: &[&str]) -> (bool, String, String) {
    Cluster::run_cli(args)
}

/// A fresh cluster answers `SELECT 1` as SQLite does; a database nobody wrote reads as empty
/// (its tables do not exist) and is not created by the read; a bad name is still an error.
#[test]
fn a_fresh_cluster_answers_a_first_query() {
    let cl = Cluster::start(3, &[]);
    let leader = cl.wait_leader(T);
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let eps = (1..=3)
        .map(|i| cl.addr(i).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let (ok, out, err) = cli(&["sql", "--endpoints", &eps, "-e", "SELECT 1"]);
    assert!(ok, "SELECT 1 on a fresh cluster: {out} {err}");
    assert_eq!(
        out.lines().next().map(str::trim),
        Some("1"),
        "column name: {out}"
    );
    let (ok, out, err) = cli(&["sql", "--endpoints", &eps, "--json", "-e", "SELECT 1"]);
    assert_eq!((ok, out.trim()), (true, r#"{"1":1}"#), "{err}");
    // Linearizable and local reads on a follower, and through the library.
    let f = cl.addr(follower).to_string();
    for local in [false, true] {
        let mut args = vec![
            "sql",
            "--endpoints",
            &f,
            "--json",
            "-e",
            "SELECT 1 + 1 AS two",
        ];
        if local {
            args.push("--local");
        }
        let (ok, out, err) = cli(&args);
        assert!(
            ok && out.contains("\"two\":2"),
            "local={local}: {out} {err}"
        );
    }
    let rows = cl
        .rt
        .block_on(cl.client().query("nobody", "SELECT 41 + 1", vec![]))
        .unwrap();
    assert_eq!(rows.rows, vec![vec![Value::Integer(42)]]);
    // Its tables do not exist, as in an empty SQLite file.
    let (ok, _, err) = cli(&["sql", "--endpoints", &eps, "-e", "SELECT * FROM t"]);
    assert!(!ok && err.contains("no such table: t"), "{err}");
    // The read is as guarded as any: it cannot load an extension.
    let (ok, _, err) = cli(&[
        "sql",
        "--endpoints",
        &eps,
        "--db",
        "nobody",
        "-e",
        "SELECT load_extension('/nonexistent')",
    ]);
    assert!(!ok, "load_extension on an empty database: {err}");
    let (ok, _, err) = cli(&[
        "sql",
        "--endpoints",
        &eps,
        "--db",
        "bad/name",
        "-e",
        "SELECT 1",
    ]);
    assert!(!ok && err.contains("bad database name"), "{err}");
    // Reading created nothing: no node holds a database "nobody" or "main".
    for id in 1..=3 {
        let s = cl.status(id, true).unwrap();
        assert!(
            !s.db_digests.contains_key("nobody") && !s.db_digests.contains_key("main"),
            "node {id}: {:?}",
            s.db_digests
        );
    }
    // The first write creates it, and reads see it.
    let (ok, out, err) = cli(&[
        "sql",
        "--endpoints",
        &eps,
        "-e",
        "CREATE TABLE t(x); INSERT INTO t VALUES (7)",
    ]);
    assert!(
        ok && out.contains("2 statements in one transaction"),
        "{out} {err}"
    );
    let (ok, out, err) = cli(&[
        "sql",
        "--endpoints",
        &eps,
        "--json",
        "-e",
        "SELECT x FROM t",
    ]);
    assert_eq!((ok, out.trim()), (true, r#"{"x":7}"#), "{err}");
    cl.wait_converged(T);
}

/// The UTC time a scheduled backup's name records (when its save started).
fn stamp_of(path: &Path) -> SystemTime {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let s = name
        .rsplit('-')
        .next()
        .unwrap()
        .trim_end_matches(".rsqlbak");
    // 20261203T125000.123Z -> 2026-12-03T12:50:00.123Z
    let r = format!(
        "{}-{}-{}T{}:{}:{}",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..]
    );
    humantime::parse_rfc3339(&r).unwrap_or_else(|e| panic!("{name}: {r}: {e}"))
}

fn backups(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "rsqlbak"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The values acknowledged before `t`.
fn acked_before(acks: &[(SystemTime, i64)], t: SystemTime) -> Vec<i64> {
    acks.iter()
        .filter(|(at, _)| *at < t)
        .map(|(_, v)| *v)
        .collect()
}

fn values_in(c: &Client, rt: &tokio::runtime::Runtime) -> HashSet<i64> {
    let rows = rt
        .block_on(c.query("main", "SELECT v FROM t", vec![]))
        .unwrap();
    rows.rows
        .iter()
        .map(|r| match r[0] {
            Value::Integer(v) => v,
            ref x => panic!("{x:?}"),
        })
        .collect()
}

/// Every node with `--backup-dir` and a 2 s schedule keeps exactly `--backup-keep` verified
/// files under continuous writes and across a kill -9 of the leader; each holds every write
/// acknowledged before its save started; a corrupted newest backup is reported by
/// `snapshot list` and skipped by `snapshot restore DIR`, which restores the next one.
#[test]
fn scheduled_backups_keep_n_verified_files() {
    const KEEP: usize = 3;
    let mut cl = Cluster::prepare(3, &[], false);
    let dir_of = |cl: &Cluster, id: u64| cl.dir.path().join(format!("backups-{id}"));
    let pattern = cl.dir.path().join("backups-{id}").display().to_string();
    let keep = KEEP.to_string();
    cl.args.extend(
        [
            "--backup-dir",
            &pattern,
            "--backup-every",
            "2s",
            "--backup-keep",
            &keep,
        ]
        .map(String::from),
    );
    for id in 1..=3 {
        cl.spawn(id);
    }
    let leader = cl.wait_leader(T);
    let watched = (1..=3).find(|i| *i != leader).unwrap();
    let c = cl.client();
    cl.rt
        .block_on(c.execute("main", "CREATE TABLE t(v INTEGER PRIMARY KEY)", vec![]))
        .unwrap();
    // Continuous writes; every acknowledged value with the time of its acknowledgement.
    let acks: Arc<Mutex<Vec<(SystemTime, i64)>>> = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (c, acks, stop) = (cl.client(), acks.clone(), stop.clone());
        cl.rt.spawn(async move {
            let mut v = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                v += 1;
                let sql = "INSERT INTO t(v) VALUES (?)";
                if c.execute("main", sql, vec![Value::Integer(v)])
                    .await
                    .is_ok()
                {
                    acks.lock().push((SystemTime::now(), v));
                }
            }
        })
    };
    // Samples of the watched node's directory: once it holds KEEP, it never holds fewer, and
    // never more than KEEP + 1 (the instant between a new file's rename and the pruning).
    let mut full = false;
    let mut sample = |cl: &Cluster, what: &str| {
        let n = backups(&dir_of(cl, watched)).len();
        if full {
            assert!(
                (KEEP..=KEEP + 1).contains(&n),
                "{what}: node {watched} holds {n} backups, {KEEP} expected"
            );
        }
        full |= n >= KEEP;
        n
    };
    harness::try_wait_for(T, || (sample(&cl, "filling") >= KEEP).then_some(()))
        .unwrap_or_else(|| panic!("no {KEEP} backups\n{}", cl.logs()));
    let before_kill: HashSet<PathBuf> = backups(&dir_of(&cl, watched)).into_iter().collect();
    let old_term = cl.status(watched, false).unwrap().term;
    cl.kill(leader);
    eprintln!("killed leader {leader}; watching node {watched}");
    // Two backups made under the new leader (a later term) replace older ones.
    harness::try_wait_for(T, || {
        sample(&cl, "after the kill");
        let newer = backups(&dir_of(&cl, watched))
            .into_iter()
            .filter(|p| !before_kill.contains(p))
            .filter_map(|p| raftsql_core::backup::verify(&p).ok())
            .filter(|h| h.term > old_term)
            .count();
        (newer >= 2).then_some(())
    })
    .unwrap_or_else(|| panic!("no backups after the leader change\n{}", cl.logs()));
    // The killed node restarts, drops what it was writing, and goes on with its schedule.
    // What the kill left unfinished; the restart removes it (and may start a new one).
    let unfinished = |cl: &Cluster| -> Vec<String> {
        std::fs::read_dir(dir_of(cl, leader))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".rsqlbak"))
            .collect()
    };
    let at_kill = unfinished(&cl);
    let had = backups(&dir_of(&cl, leader));
    cl.spawn(leader);
    harness::wait_for(T, "a backup after the restart", || {
        sample(&cl, "after the restart");
        let fresh = backups(&dir_of(&cl, leader))
            .iter()
            .any(|p| !had.contains(p));
        fresh.then_some(())
    });
    let left: Vec<String> = unfinished(&cl)
        .into_iter()
        .filter(|n| at_kill.contains(n))
        .collect();
    assert!(
        left.is_empty(),
        "node {leader} left {left:?} from before its kill"
    );
    eprintln!(
        "node {leader}: {} unfinished backup file(s) at the kill ({at_kill:?}), none after its restart",
        at_kill.len()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    cl.rt.block_on(writer).unwrap();
    let acks = acks.lock().clone();
    assert!(acks.len() > 100, "only {} writes acknowledged", acks.len());

    // Every file of every node checks out, by the library and by `snapshot list`.
    let w = dir_of(&cl, watched);
    harness::wait_for(T, "exactly the kept backups", || {
        (backups(&w).len() == KEEP).then_some(())
    });
    // A copy, so that the schedule does not prune what the rest of the test looks at.
    let copy = cl.dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for p in backups(&w) {
        std::fs::copy(&p, copy.join(p.file_name().unwrap())).unwrap();
    }
    let files = backups(&copy);
    assert_eq!(files.len(), KEEP, "{files:?}");
    let listed = backup_schedule::list(&copy).unwrap();
    let mut last_index = u64::MAX;
    for l in &listed {
        let h = l
            .verdict
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", l.path.display()));
        assert!(h.index < last_index, "newest first, each at a later index");
        last_index = h.index;
    }
    let (ok, out, err) = cli(&["snapshot", "list", &copy.display().to_string()]);
    assert!(ok, "{out} {err}");
    assert_eq!(
        out.lines().filter(|l| l.ends_with("  ok")).count(),
        KEEP,
        "{out}"
    );
    eprintln!("{out}");

    // Each backup holds every write acknowledged before its save started: restore the
    // newest and look.
    let newest = files.last().unwrap().clone();
    let second = files[files.len() - 2].clone();
    let check_restored = |data: &Path, from: &Path, port_octet: u8| {
        let addr = format!("127.0.{}.{port_octet}:7000", std::process::id() % 250);
        let mut child = Command::new(bin())
            .args([
                "node",
                "--data-dir",
                &data.display().to_string(),
                "--listen",
                &addr,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(data.with_extension("log")).unwrap())
            .spawn()
            .unwrap();
        let c = Client::new(vec![addr.parse().unwrap()], "raftsql");
        let deadline = Instant::now() + T;
        let have = loop {
            match cl.rt.block_on(c.query("main", "SELECT v FROM t", vec![])) {
                Ok(_) => break values_in(&c, &cl.rt),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("restored node: {e}"),
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        let must = acked_before(&acks, stamp_of(from));
        let missing: Vec<_> = must.iter().filter(|v| !have.contains(v)).collect();
        assert!(
            missing.is_empty(),
            "{}: {} of {} writes acknowledged before it started are missing: {:?}",
            from.display(),
            missing.len(),
            must.len(),
            &missing[..missing.len().min(10)]
        );
        eprintln!(
            "{}: holds all {} writes acknowledged before it started ({} rows)",
            from.display(),
            must.len(),
            have.len()
        );
    };

    let restored = cl.dir.path().join("restored");
    let (ok, out, err) = cli(&[
        "snapshot",
        "restore",
        &copy.display().to_string(),
        "--data-dir",
        &restored.display().to_string(),
    ]);
    assert!(ok && !err.contains("skipping"), "{out} {err}");
    assert!(err.contains(&*newest.display().to_string()), "{err}");
    check_restored(&restored, &newest, 9);

    // Corrupt the newest: `list` names it, `restore DIR` skips it and restores the next.
    let mut bytes = std::fs::read(&newest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&newest, bytes).unwrap();
    let (ok, out, err) = cli(&["snapshot", "list", &copy.display().to_string()]);
    assert!(!ok && err.contains("1 of 3 backups"), "{out} {err}");
    let first = out.lines().nth(1).unwrap();
    let newest_name = newest.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        first.starts_with(&newest_name) && first.contains("CORRUPT"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.ends_with("  ok")).count(),
        KEEP - 1,
        "{out}"
    );
    eprintln!("{out}");
    let restored2 = cl.dir.path().join("restored2");
    let (ok, out, err) = cli(&[
        "snapshot",
        "restore",
        &copy.display().to_string(),
        "--data-dir",
        &restored2.display().to_string(),
    ]);
    assert!(ok, "{out} {err}");
    assert!(
        err.contains(&format!("skipping {}", newest.display()))
            && err.contains(&*second.display().to_string()),
        "{err}"
    );
    check_restored(&restored2, &second, 10);
}

/// The mistakes a person makes at 3 a.m., each answered by an error that names the fix:
/// the wrong cluster name, the data directory of another cluster or node, a node that left,
/// the wrong CA, a client certificate of another CA.
#[test]
fn errors_name_the_fix() {
    let mut cl = Cluster::prepare_tls(3, &[], false);
    for id in 1..=3 {
        cl.spawn(id);
    }
    cl.wait_leader(T);
    let ep = cl.addr(1).to_string();
    let tls = cl.tls_flags();
    let run = |extra: &[&str], with_tls: bool| {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if with_tls {
            args.extend(tls.iter().cloned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, err) = cli(&args);
        assert!(!ok, "{args:?} succeeded: {out}");
        eprintln!("{}", err.trim());
        err
    };
    // The wrong --cluster, from a client (before: "connection closed").
    let err = run(
        &[
            "sql",
            "--endpoints",
            &ep,
            "--cluster",
            "prod",
            "-e",
            "SELECT 1",
        ],
        true,
    );
    assert!(
        err.contains("not \"prod\": give --cluster raftsql"),
        "{err}"
    );
    let err = run(
        &["cluster", "show", "--endpoints", &ep, "--cluster", "prod"],
        true,
    );
    assert!(err.contains("give --cluster raftsql"), "{err}");
    // The wrong CA: the node's certificate is not signed by what --cacert holds.
    let other = cl.dir.path().join("other-ca");
    let (ok, _, err) = cli(&["ca", "init", &other.display().to_string()]);
    assert!(ok, "{err}");
    let other_crt = other.join("ca.crt").display().to_string();
    let mut wrong_ca = tls.clone();
    let i = wrong_ca.iter().position(|a| a == "--cacert").unwrap();
    wrong_ca[i + 1] = other_crt.clone();
    let mut args = vec!["sql", "--endpoints", &ep, "-e", "SELECT 1"];
    args.extend(wrong_ca.iter().map(String::as_str));
    let err = run(&args, false);
    assert!(
        err.contains("not signed by the CA given to --cacert"),
        "{err}"
    );
    // A client certificate from another CA.
    let stranger = cl.dir.path().join("stranger");
    let (ok, _, err) = cli(&[
        "ca",
        "client-cert",
        "--ca-dir",
        &other.display().to_string(),
        "--name",
        "stranger",
        "--out",
        &stranger.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let (crt, key) = (
        stranger.with_extension("crt").display().to_string(),
        stranger.with_extension("key").display().to_string(),
    );
    let cacert = cl.dir.path().join("ca/ca.crt").display().to_string();
    let err = run(
        &[
            "sql",
            "--endpoints",
            &ep,
            "--cacert",
            &cacert,
            "--cert",
            &crt,
            "--key",
            &key,
            "-e",
            "SELECT 1",
        ],
        false,
    );
    assert!(err.contains("refused this client's certificate"), "{err}");

    // Restarting a node with the wrong --cluster or --id.
    cl.stop(3);
    let data3 = cl.data_dir(3).display().to_string();
    let a3 = cl.addr(3).to_string();
    let err = run(
        &[
            "node",
            "--data-dir",
            &data3,
            "--listen",
            &a3,
            "--cluster",
            "prod",
        ],
        false,
    );
    assert!(err.contains("drop --cluster"), "{err}");
    let err = run(
        &["node", "--data-dir", &data3, "--listen", &a3, "--id", "7"],
        false,
    );
    assert!(
        err.contains("belongs to node 3, not node 7: drop --id"),
        "{err}"
    );
    // A node that left cannot start again, and is told how to come back.
    cl.spawn(3);
    cl.wait_converged(T);
    let mut args = vec!["leave", "--endpoint", &a3];
    args.extend(tls.iter().map(String::as_str));
    let (ok, out, err) = cli(&args);
    assert!(ok, "{out} {err}");
    cl.wait_exit(3, T).expect("node 3 stops after leaving");
    let err = run(&["node", "--data-dir", &data3, "--listen", &a3], false);
    assert!(
        err.contains("left the cluster or was removed") && err.contains("raftsql join"),
        "{err}"
    );
}
