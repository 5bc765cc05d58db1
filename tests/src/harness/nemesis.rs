//! The nemesis of the fault tests: one fault at a time, each healed before the next.
//!
//! The kinds ([`Kind`]): kill -9 and restart of a node; pause (SIGSTOP/SIGCONT); isolation
//! of one node (the leader half of the time); a majority/minority split; a bridge (5
//! nodes: two pairs that cannot see each other, both seeing the fifth); kill -9 and restart
//! of every node at once; a leader handover (SIGTERM to the leader, which hands leadership
//! to another voter before it stops, then a restart); and a membership change (a node
//! `leave`s, its data is wiped, and it joins again with a fresh token, as a new member).
//!
//! A schedule first takes every kind it was given once, in order, then picks kinds and
//! victims at random from its seed, so that a short run covers every kind and long runs
//! with different seeds explore different orders.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::report::{self, Record, Window};

use super::cluster::Cluster;
use super::net::Partition;

/// A fault that happened, with its window in microseconds since the run's start.
#[derive(Clone, Debug)]
pub struct Fault {
    /// What was done, e.g. "kill -9 node 2".
    pub what: String,
    /// When it began.
    pub from_us: u64,
    /// When it was healed.
    pub to_us: u64,
}

/// The kinds of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// kill -9 one node, restart it 1.5 s later.
    Kill,
    /// SIGSTOP one node for 1.5 s.
    Pause,
    /// Cut one node (the leader half of the time) from all others for 2.5 s.
    Isolate,
    /// Cut a random minority from the majority for 2.5 s.
    Split,
    /// Cut two groups apart that both still see one bridge node, for 2.5 s (5+ nodes).
    Bridge,
    /// kill -9 every node, restart them all 0.5 s later.
    RestartAll,
    /// SIGTERM the leader (a clean stop hands leadership over), restart it 1 s later.
    Handover,
    /// A node leaves the cluster, is wiped and joins again with a fresh token.
    Rejoin,
    /// SIGSTOP one node for 4-7 s (longer than an election, and than a client's timeout),
    /// then 5 s of quiet.
    LongPause,
    /// [`Kind::LongPause`] of a follower: its clients' requests wait in its socket buffers
    /// while the others write on.
    PauseFollower,
}

impl Kind {
    /// Every kind that makes sense for `n` nodes, or those `RAFTSQL_JEPSEN_FAULTS` names
    /// (comma-separated: kill, pause, isolate, split, bridge, restart-all, handover, rejoin,
    /// pause-long, pause-follower).
    pub fn all(n: usize) -> Vec<Kind> {
        use Kind::*;
        if let Ok(names) = std::env::var("RAFTSQL_JEPSEN_FAULTS") {
            return names
                .split(',')
                .map(|k| match k.trim() {
                    "kill" => Kill,
                    "pause" => Pause,
                    "isolate" => Isolate,
                    "split" => Split,
                    "bridge" => Bridge,
                    "restart-all" => RestartAll,
                    "handover" => Handover,
                    "rejoin" => Rejoin,
                    "pause-long" => LongPause,
                    "pause-follower" => PauseFollower,
                    k => panic!("RAFTSQL_JEPSEN_FAULTS: unknown fault {k:?}"),
                })
                .collect();
        }
        let mut v = vec![Kill, Pause, Isolate, Split, RestartAll, Handover, Rejoin];
        if n >= 5 {
            v.insert(4, Bridge);
        }
        v
    }
}

/// A tiny deterministic generator.
pub struct Rng(pub u64);

impl Rng {
    /// The next pseudo-random number.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// `v` shuffled.
    pub fn shuffle<T>(&mut self, mut v: Vec<T>) -> Vec<T> {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
        v
    }
}

/// The settings of a Jepsen-style run, from the environment so that the long profile
/// (`tests/jepsen-long`) can vary them: `RAFTSQL_JEPSEN_SECS` (the run's length) and
/// `RAFTSQL_JEPSEN_SEED` (the schedule's seed, mixed with each test's own).
pub struct Settings {
    /// How long faults are injected.
    pub run: Duration,
    /// The nemesis schedule's seed.
    pub seed: u64,
}

impl Settings {
    /// The settings, `secs` and `seed` unless the environment says otherwise.
    pub fn from_env(secs: u64, seed: u64) -> Settings {
        let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        Settings {
            run: Duration::from_secs(env("RAFTSQL_JEPSEN_SECS").unwrap_or(secs)),
            seed: env("RAFTSQL_JEPSEN_SEED").map_or(seed, |s| s.wrapping_mul(0x9e37_79b9) ^ seed),
        }
    }
}

fn ips(cl: &Cluster, ids: &[u64]) -> Vec<IpAddr> {
    ids.iter().map(|i| cl.addr(*i).ip()).collect()
}

fn leader(cl: &Cluster) -> Option<u64> {
    cl.running()
        .into_iter()
        .find(|i| cl.status(*i, false).is_some_and(|s| s.role == "leader"))
}

fn cut(a: &[IpAddr], b: &[IpAddr], hold: Duration) {
    let p = Partition::between(a, b).expect("iptables partition");
    std::thread::sleep(hold);
    drop(p);
}

/// Injects faults of `kinds` into the nodes of `cl` until `run` has passed since `t0`,
/// 1.5 s apart; returns them. Every fault is healed before the next one starts.
pub fn run(cl: &mut Cluster, t0: Instant, run: Duration, kinds: &[Kind], seed: u64) -> Vec<Fault> {
    let us = || t0.elapsed().as_micros() as u64;
    let n = cl.nodes.len() as u64;
    let ids: Vec<u64> = (1..=n).collect();
    let mut faults = Vec::new();
    let mut rng = Rng(seed | 1);
    while t0.elapsed() < run {
        std::thread::sleep(Duration::from_millis(1500));
        let kind = if faults.len() < kinds.len() {
            kinds[faults.len()]
        } else {
            kinds[(rng.next() % kinds.len() as u64) as usize]
        };
        let mut id = rng.next() % n + 1;
        let from_us = us();
        let what = match kind {
            Kind::Kill => {
                cl.kill(id);
                std::thread::sleep(Duration::from_millis(1500));
                cl.spawn(id);
                format!("kill -9 node {id}")
            }
            Kind::Pause => {
                cl.pause(id);
                std::thread::sleep(Duration::from_millis(1500));
                cl.resume(id);
                format!("pause node {id}")
            }
            Kind::LongPause | Kind::PauseFollower => {
                if kind == Kind::PauseFollower {
                    let l = leader(cl);
                    let followers: Vec<u64> =
                        ids.iter().copied().filter(|i| Some(*i) != l).collect();
                    id = followers[(rng.next() % followers.len() as u64) as usize];
                }
                let hold = Duration::from_millis(4000 + rng.next() % 3000);
                cl.pause(id);
                std::thread::sleep(hold);
                cl.resume(id);
                let what = format!("pause node {id} for {hold:.1?}");
                faults.push(Fault {
                    what,
                    from_us,
                    to_us: us(),
                });
                std::thread::sleep(Duration::from_secs(5));
                continue;
            }
            Kind::Isolate => {
                if rng.next().is_multiple_of(2) {
                    id = leader(cl).unwrap_or(id);
                }
                let others: Vec<u64> = ids.iter().copied().filter(|i| *i != id).collect();
                cut(
                    &ips(cl, &[id]),
                    &ips(cl, &others),
                    Duration::from_millis(2500),
                );
                format!("isolate node {id}")
            }
            Kind::Split => {
                let order = rng.shuffle(ids.clone());
                let (minority, majority) = order.split_at((n as usize - 1) / 2);
                cut(
                    &ips(cl, minority),
                    &ips(cl, majority),
                    Duration::from_millis(2500),
                );
                format!("split {minority:?} | {majority:?}")
            }
            Kind::Bridge => {
                let order = rng.shuffle(ids.clone());
                let half = (order.len() - 1) / 2;
                let (a, rest) = order.split_at(half);
                let (bridge, b) = rest.split_first().unwrap();
                cut(&ips(cl, a), &ips(cl, b), Duration::from_millis(2500));
                format!("bridge {a:?} - {bridge} - {b:?}")
            }
            Kind::RestartAll => {
                for i in 1..=n {
                    cl.kill(i);
                }
                std::thread::sleep(Duration::from_millis(500));
                for i in 1..=n {
                    cl.spawn(i);
                }
                "kill -9 all nodes, restart".to_string()
            }
            Kind::Handover => {
                let l = leader(cl).unwrap_or(id);
                cl.stop(l);
                std::thread::sleep(Duration::from_millis(1000));
                cl.spawn(l);
                format!("SIGTERM leader {l} (handover), restart")
            }
            Kind::Rejoin => rejoin(cl, id),
        };
        faults.push(Fault {
            what,
            from_us,
            to_us: us(),
        });
    }
    faults
}

/// Node `slot` leaves the cluster; its data is wiped and it joins again with a fresh token.
fn rejoin(cl: &mut Cluster, slot: u64) -> String {
    let old = cl.status(slot, false).map(|s| s.id);
    let flags = cl.tls_flags();
    let mut leave = vec![
        "leave".to_string(),
        "--endpoint".into(),
        cl.addr(slot).to_string(),
    ];
    leave.extend(flags.iter().cloned());
    let leave: Vec<&str> = leave.iter().map(|s| s.as_str()).collect();
    let (ok, _, err) = Cluster::run_cli(&leave);
    if cl.wait_exit(slot, Duration::from_secs(10)).is_none() {
        cl.kill(slot);
    }
    let left = if ok {
        String::new()
    } else {
        format!(" (leave failed: {})", err.trim())
    };
    let _ = std::fs::remove_dir_all(cl.data_dir(slot));
    let others = cl
        .running()
        .into_iter()
        .map(|i| cl.addr(i).to_string())
        .collect::<Vec<_>>()
        .join(",");
    // The token may take a few tries while leadership settles after the leave.
    let deadline = Instant::now() + Duration::from_secs(20);
    let join = loop {
        let mut add = vec!["add-node", "--endpoints", &others];
        add.extend(flags.iter().map(|s| s.as_str()));
        let (ok, out, err) = Cluster::run_cli(&add);
        if let Some(j) = out
            .split_whitespace()
            .find(|w| w.contains('/') && w.contains(':'))
            .filter(|_| ok)
        {
            break j.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "add-node kept failing after node {slot} left{left}: {err}\n{}",
            cl.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    cl.rejoin(slot, &join);
    // It comes back as a new member with an id never used before, and stays.
    let deadline = Instant::now() + Duration::from_secs(20);
    let new = loop {
        if let Some(s) = cl.status(slot, false) {
            break s.id;
        }
        assert!(
            Instant::now() < deadline,
            "node {slot} did not come back after rejoining{left}\n{}",
            cl.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        old.is_none_or(|o| new > o),
        "node {slot} rejoined with id {new}, not above its old id {old:?}"
    );
    format!("node {slot} leaves{left}, rejoins as node {new}")
}

/// Writes a run's report (history, faults, verdict, pictures) under `$RAFTSQL_REPORT_DIR`,
/// else `target/tmp/jepsen`, as `<name>-<unix time>/`; prints and returns where.
pub fn report<R: Record>(
    name: &str,
    history: &[R],
    faults: &[Fault],
    verdict: &str,
) -> std::path::PathBuf {
    let windows: Vec<Window> = faults
        .iter()
        .map(|f| Window {
            what: f.what.clone(),
            from_us: f.from_us,
            to_us: f.to_us,
        })
        .collect();
    let root = std::env::var_os("RAFTSQL_REPORT_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| target_tmp().join("jepsen"));
    let dir = report::write(&root, name, history, &windows, verdict).expect("write the report");
    eprintln!("report: {}", dir.display());
    dir
}

/// `target/tmp` (Cargo's CARGO_TARGET_TMPDIR for integration tests): the test executable
/// runs from `target/<profile>/deps/`.
fn target_tmp() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.ancestors()
        .nth(3)
        .expect("target/<profile>/deps/<test>")
        .join("tmp")
}
