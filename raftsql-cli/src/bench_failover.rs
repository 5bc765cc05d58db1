//! `raftsql bench failover`: how long the cluster takes to replace a crashed leader and to
//! promote a standby after a voter crashes, and how long a graceful leader stop takes, over
//! many trials.
//!
//! Starts its own cluster of `--nodes` (default 4) `raftsql node` processes on loopback and
//! waits for the role keeper to settle it (3 voters and the rest standbys). Then, in turn:
//!
//! - **leader trial**: SIGKILL the leader; measure the time until a surviving node is leader
//!   in a newer term (`new_leader_ms`), and until the configuration has 3 voters again, none
//!   of them the dead node (`voters_restored_ms`, which includes the keeper's `--offline-after`
//!   grace);
//! - **voter trial**: SIGKILL a follower voter; measure the time until 3 other nodes are voters
//!   (`promotion_ms`);
//! - **graceful trial**: SIGTERM the leader, which hands leadership over before it stops;
//!   measure the time until another node leads (`leader_sigterm.new_leader_ms`).
//!
//! After each trial the killed node restarts with its data and the bench waits for the
//! cluster to settle again. Progress goes to stderr; the result is one JSON line on stdout
//! with min/p50/p99/max per measure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use raftsql_core::members;
use raftsql_core::Client;
use raftsql_proto::v1 as pb;

use crate::bench::percentile;
use crate::launch::LocalCluster;
use crate::CliResult;

/// `raftsql bench failover`.
#[derive(Args, Debug)]
pub struct BenchFailoverArgs {
    /// Trials of each kind (leader kill, voter kill, leader SIGTERM).
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Nodes in the cluster (at least 4: 3 voters and a standby to promote).
    #[arg(long, default_value_t = 4)]
    nodes: u64,
    /// Address of node 1; node i listens on the next ports.
    #[arg(long, default_value = "127.0.0.1:7401")]
    listen: SocketAddr,
    /// Where the nodes keep data and logs (a new temporary directory by default).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Passed to every node: how long a member may be silent before the keeper replaces it.
    #[arg(long, default_value = "3s")]
    offline_after: String,
    /// Passed to every node: the Raft tick (the election timeout is 10-20 ticks).
    #[arg(long, default_value_t = 50)]
    tick_ms: u64,
}

/// A bench's own cluster (also `bench soak`'s): its processes, their addresses and
/// directory; every node is killed when dropped.
pub(crate) struct Procs {
    dir: PathBuf,
    addrs: Vec<SocketAddr>,
    nodes: LocalCluster,
}

impl Procs {
    /// Node `i` runs `raftsql` (`exe`, else this binary) with `args[i]`; its log goes to
    /// `dir/node<i+1>.log`.
    pub(crate) fn new(
        dir: PathBuf,
        addrs: Vec<SocketAddr>,
        args: Vec<Vec<String>>,
        exe: Option<PathBuf>,
    ) -> Result<Procs, String> {
        let exe = match exe {
            Some(e) => e,
            None => LocalCluster::this_exe()?,
        };
        Ok(Procs {
            nodes: LocalCluster::new(dir.clone(), exe, args),
            dir,
            addrs,
        })
    }

    /// The process id of node `i`, if it runs.
    pub(crate) fn pid(&self, i: usize) -> Option<u32> {
        self.nodes.pid(i)
    }

    pub(crate) fn start(&mut self, i: usize) -> Result<(), String> {
        self.nodes.start(i)
    }

    fn kill(&mut self, i: usize) {
        self.nodes.kill(i);
    }

    /// SIGTERM: the node stops cleanly (a leader hands leadership over first); it counts as
    /// gone at once.
    fn terminate(&mut self, i: usize) {
        self.nodes.terminate(i);
    }
}

/// What the bench sees of the cluster at one moment.
struct View {
    /// (node index, term) of a node that says it leads.
    leader: Option<(usize, u64)>,
    /// Node ids that are voters in the leader's configuration, and standbys.
    voters: Vec<u64>,
    standbys: Vec<u64>,
}

async fn look(p: &Procs, cluster: &str) -> View {
    let mut leader = None;
    let mut alive = Vec::new();
    for (i, a) in p.addrs.iter().enumerate() {
        if p.pid(i).is_none() {
            continue;
        }
        alive.push(*a);
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(300),
            Client::status_of(*a, cluster, false),
        )
        .await
        {
            if s.role == "leader" && leader.is_none_or(|(_, t)| s.term > t) {
                leader = Some((i, s.term));
            }
        }
    }
    let mut voters = Vec::new();
    let mut standbys = Vec::new();
    if let Some((i, _)) = leader {
        let req = pb::membership_request::Req::Cluster(pb::ClusterRequest {});
        if let Ok(Ok(pb::membership_response::Resp::Cluster(c))) = tokio::time::timeout(
            Duration::from_millis(500),
            members::request(&Default::default(), &[p.addrs[i]], cluster, req),
        )
        .await
        {
            for n in c.nodes {
                let id = n.member.map(|m| m.id).unwrap_or(0);
                match n.role.as_str() {
                    "voter" => voters.push(id),
                    "standby" => standbys.push(id),
                    _ => {}
                }
            }
        }
    }
    View {
        leader,
        voters,
        standbys,
    }
}

/// Polls every 20 ms until `cond` holds; returns the time since `t0`.
async fn until(
    p: &Procs,
    cluster: &str,
    t0: Instant,
    limit: Duration,
    what: &str,
    cond: impl Fn(&View) -> bool,
) -> Result<Duration, String> {
    loop {
        let v = look(p, cluster).await;
        if cond(&v) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            return Err(format!(
                "{what}: not reached in {limit:?} (leader {:?}, voters {:?}, standbys {:?}); logs in {}",
                v.leader,
                v.voters,
                v.standbys,
                p.dir.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// min/p50/p99/max in milliseconds (to 0.1 ms) of times in microseconds.
fn stats(mut v: Vec<u32>) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::json!({"n": 0});
    }
    v.sort_unstable();
    let r = |x: f64| (x * 10.0).round() / 10.0;
    let at = |q: f64| percentile(&v, q);
    serde_json::json!({
        "n": v.len(), "min": r(at(0.0)), "p50": r(at(0.5)), "p99": r(at(0.99)), "max": r(at(1.0)),
    })
}

/// Runs the bench and prints its JSON line.
pub async fn main(a: BenchFailoverArgs) -> CliResult {
    if a.nodes < 4 {
        return Err("--nodes must be at least 4 (3 voters and a standby)".into());
    }
    let cluster = "raftsql-failover-bench";
    let (dir, _tmp) = work_dir(a.dir.as_ref(), "raftsql-failover")?;
    let addrs: Vec<SocketAddr> = (0..a.nodes)
        .map(|i| SocketAddr::new(a.listen.ip(), a.listen.port() + i as u16))
        .collect();
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let args = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            vec![
                "node".into(),
                "--id".into(),
                (i + 1).to_string(),
                "--listen".into(),
                addr.to_string(),
                "--bootstrap-peers".into(),
                peers.clone(),
                "--data-dir".into(),
                dir.join(format!("node{}", i + 1)).display().to_string(),
                "--cluster".into(),
                cluster.into(),
                "--offline-after".into(),
                a.offline_after.clone(),
                "--tick-ms".into(),
                a.tick_ms.to_string(),
            ]
        })
        .collect();
    let mut p = Procs::new(dir.clone(), addrs, args, None)?;
    for i in 0..a.nodes as usize {
        p.start(i)?;
    }
    let n = a.nodes as usize;
    let settled = |v: &View| {
        v.leader.is_some() && v.voters.len() == 3 && v.voters.len() + v.standbys.len() == n
    };
    let limit = Duration::from_secs(60);
    let t = until(&p, cluster, Instant::now(), limit, "initial roles", settled).await?;
    eprintln!(
        "cluster of {n} settled in {t:.2?} (3 voters, {} standbys); logs in {}",
        n - 3,
        dir.display()
    );

    let (mut new_leader, mut restored, mut promotion) = (Vec::new(), Vec::new(), Vec::new());
    let mut handover = Vec::new();
    for trial in 0..a.trials * 3 {
        let v = look(&p, cluster).await;
        let (li, term) = v.leader.ok_or("no leader between trials")?;
        if trial % 3 == 2 {
            let t0 = Instant::now();
            p.terminate(li);
            let e = until(&p, cluster, t0, limit, "new leader after SIGTERM", |v| {
                v.leader.is_some_and(|(i, t)| i != li && t > term)
            })
            .await?;
            eprintln!(
                "trial {:>2}: stopped leader {} (SIGTERM): new leader after {:>7.1} ms",
                trial + 1,
                li + 1,
                e.as_secs_f64() * 1e3
            );
            handover.push(e.as_micros() as u32);
            // Let the old process finish exiting before its data directory is reused.
            tokio::time::sleep(Duration::from_millis(500)).await;
            p.start(li)?;
        } else if trial % 3 == 0 {
            let dead = li as u64 + 1;
            let t0 = Instant::now();
            p.kill(li);
            let e = until(&p, cluster, t0, limit, "new leader", |v| {
                v.leader.is_some_and(|(i, t)| i != li && t > term)
            })
            .await?;
            let r = until(&p, cluster, t0, limit, "3 voters again", |v| {
                v.voters.len() == 3 && !v.voters.contains(&dead)
            })
            .await?;
            eprintln!(
                "trial {:>2}: killed leader {dead}: new leader after {:>7.1} ms, 3 voters after {:>7.1} ms",
                trial + 1,
                e.as_secs_f64() * 1e3,
                r.as_secs_f64() * 1e3
            );
            new_leader.push(e.as_micros() as u32);
            restored.push(r.as_micros() as u32);
            p.start(li)?;
        } else {
            let victim = v
                .voters
                .iter()
                .map(|id| (*id - 1) as usize)
                .find(|i| *i != li)
                .ok_or("no follower voter")?;
            let dead = victim as u64 + 1;
            let t0 = Instant::now();
            p.kill(victim);
            let r = until(&p, cluster, t0, limit, "standby promoted", |v| {
                v.voters.len() == 3 && !v.voters.contains(&dead)
            })
            .await?;
            eprintln!(
                "trial {:>2}: killed voter {dead}: a standby promoted after {:>7.1} ms",
                trial + 1,
                r.as_secs_f64() * 1e3
            );
            promotion.push(r.as_micros() as u32);
            p.start(victim)?;
        }
        until(
            &p,
            cluster,
            Instant::now(),
            limit,
            "settled after restart",
            settled,
        )
        .await?;
    }
    let out = serde_json::json!({
        "nodes": n,
        "trials_per_kind": a.trials,
        "offline_after": a.offline_after,
        "tick_ms": a.tick_ms,
        "leader_kill": {"new_leader_ms": stats(new_leader), "voters_restored_ms": stats(restored)},
        "voter_kill": {"promotion_ms": stats(promotion)},
        "leader_sigterm": {"new_leader_ms": stats(handover)},
    });
    println!("{out}");
    Ok(())
}

/// Removes a bench's temporary directory when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

/// A bench's data directory: `given`, or a new temporary one (removed when the returned
/// guard drops) named `<prefix>-<pid>`; created either way.
pub(crate) fn work_dir(
    given: Option<&PathBuf>,
    prefix: &str,
) -> Result<(PathBuf, Option<TempDir>), String> {
    let (dir, tmp) = match given {
        Some(d) => (d.clone(), None),
        None => {
            let t = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
            (t.clone(), Some(TempDir(t)))
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok((dir, tmp))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
