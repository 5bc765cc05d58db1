//! The nemesis of the fault tests: one fault at a time, in turn kill -9 + restart of a node,
//! pause (SIGSTOP/SIGCONT), isolation of a node (the leader half of the time) with iptables,
//! and kill -9 + restart of every node at once.

use std::time::{Duration, Instant};

use super::net::Partition;
use super::Cluster;

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
}

/// Injects faults into the nodes of `cl` until `run` has passed since `t0`, with `gap`
/// between faults; returns them. Every fault is healed before the next one starts.
pub fn run(cl: &mut Cluster, t0: Instant, run: Duration, seed: u64) -> Vec<Fault> {
    let us = || t0.elapsed().as_micros() as u64;
    let n = cl.nodes.len() as u64;
    let mut faults = Vec::new();
    let mut rng = Rng(seed);
    while t0.elapsed() < run {
        std::thread::sleep(Duration::from_millis(1500));
        let mut id = rng.next() % n + 1;
        let from_us = us();
        let what = match faults.len() % 4 {
            3 => {
                // Every node at once: kill -9 all, then start all again.
                for i in 1..=n {
                    cl.kill(i);
                }
                std::thread::sleep(Duration::from_millis(500));
                for i in 1..=n {
                    cl.spawn(i);
                }
                "kill -9 all nodes, restart".to_string()
            }
            0 => {
                cl.kill(id);
                std::thread::sleep(Duration::from_millis(1500));
                cl.spawn(id);
                format!("kill -9 node {id}")
            }
            1 => {
                cl.pause(id);
                std::thread::sleep(Duration::from_millis(1500));
                cl.resume(id);
                format!("pause node {id}")
            }
            _ => {
                if rng.next().is_multiple_of(2) {
                    if let Some(l) =
                        (1..=n).find(|i| cl.status(*i, false).is_some_and(|s| s.role == "leader"))
                    {
                        id = l;
                    }
                }
                let me = [cl.addr(id).ip()];
                let others: Vec<_> = (1..=n)
                    .filter(|i| *i != id)
                    .map(|i| cl.addr(i).ip())
                    .collect();
                let cut = Partition::between(&me, &others).expect("iptables partition");
                std::thread::sleep(Duration::from_millis(2500));
                drop(cut);
                format!("isolate node {id}")
            }
        };
        faults.push(Fault {
            what,
            from_us,
            to_us: us(),
        });
    }
    faults
}
