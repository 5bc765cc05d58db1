//! Membership with real processes and the real CLI: a 5-node cluster formed with join
//! tokens from one bootstrapped node settles at 3 voters + 2 standbys; wrong and reused
//! tokens are refused and change nothing; a killed voter is replaced by a standby; a killed
//! leader is replaced and the roles settle again; a dead node comes back as a spare and is
//! promoted to standby; remove-node refuses a running node and removes a stopped one;
//! `leave` hands over and stops the node for good; `remove-node --force` cuts a running
//! node off; data written before the joins is on the joiners.

use std::time::{Duration, Instant};

use raftsql_tests::harness::{self, Cluster};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

fn s(v: &str) -> String {
    v.to_string()
}

/// `cluster show --format json` through any of `eps`.
fn show(eps: &str) -> Option<Value> {
    let (ok, out, _) =
        Cluster::run_cli(&["cluster", "show", "--format", "json", "--endpoints", eps]);
    ok.then(|| serde_json::from_str(&out).ok()).flatten()
}

/// (id, role) of every member, sorted by id.
fn roles(v: &Value) -> Vec<(u64, String)> {
    let mut r: Vec<(u64, String)> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_u64().unwrap(),
                n["role"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    r.sort();
    r
}

fn count(v: &Value, role: &str) -> usize {
    roles(v).iter().filter(|(_, r)| r == role).count()
}

/// Waits until `cond` holds for `cluster show`; returns it and how long that took.
fn wait_show(eps: &str, what: &str, cond: impl Fn(&Value) -> bool) -> (Value, Duration) {
    let started = Instant::now();
    let mut last = None;
    let reached = harness::try_wait_for(T, || {
        let v = show(eps)?;
        if cond(&v) {
            return Some(v);
        }
        last = Some(v);
        None
    });
    match reached {
        Some(v) => (v, started.elapsed()),
        None => panic!("{what}: not reached in {T:?}; last: {last:?}"),
    }
}

#[test]
fn form_fail_over_leave_and_remove() {
    let mut cl = Cluster::prepare(5, &[], false);
    let addr = |i: u64, cl: &Cluster| cl.addr(i).to_string();
    let dir = |i: u64, cl: &Cluster| cl.data_dir(i).display().to_string();
    let a1 = addr(1, &cl);
    cl.spawn_first(&[]);
    cl.wait_leader(T);
    cl.seed_rows(50);
    let v = show(&a1).expect("cluster show on a 1-node cluster");
    assert_eq!(roles(&v), vec![(1, s("voter"))]);
    assert_eq!(v["ha"], false);

    // A token this cluster never issued is refused, and nothing is created.
    let bogus = format!("{a1}/{}", "0123456789abcdef0123456789abcdef");
    let (ok, _, err) = Cluster::run_cli(&[
        "join",
        &bogus,
        "--data-dir",
        &dir(2, &cl),
        "--listen",
        &addr(2, &cl),
    ]);
    assert!(!ok && err.contains("did not issue it"), "{err}");
    let (ok, _, err) = Cluster::run_cli(&[
        "join",
        &format!("{a1}/nothex"),
        "--data-dir",
        &dir(2, &cl),
        "--listen",
        &addr(2, &cl),
    ]);
    assert!(!ok && err.contains("malformed join token"), "{err}");
    assert!(!cl.data_dir(2).join("node.json").exists());

    // Join 2..5 one at a time (ids are given in join order): a single-use token for node 2,
    // then a reusable one.
    let single = Cluster::join_string(&a1, &[]);
    cl.spawn_join(2, &single, &[]);
    wait_show(&a1, "node 2 joined", |v| roles(v).len() == 2);
    let (ok, _, err) = Cluster::run_cli(&[
        "join",
        &single,
        "--data-dir",
        &dir(3, &cl),
        "--listen",
        &addr(3, &cl),
    ]);
    assert!(!ok && err.contains("already used"), "reused token: {err}");
    let reusable = Cluster::join_string(&addr(2, &cl), &["--ttl", "5m"]);
    for i in 3..=5u64 {
        cl.spawn_join(i, &reusable, &[]);
        wait_show(&a1, "joined", |v| roles(v).len() == i as usize);
    }
    let all = (1..=5).map(|i| addr(i, &cl)).collect::<Vec<_>>().join(",");
    let (v, took) = wait_show(&all, "3 voters + 2 standbys", |v| {
        count(v, "voter") == 3 && count(v, "standby") == 2 && v["ha"] == true
    });
    eprintln!(
        "settled at 3 voters + 2 standbys {took:?} after the last join: {:?}",
        roles(&v)
    );
    let (ok, out, _) = Cluster::run_cli(&["status", "--endpoints", &all]);
    assert!(
        ok && out.contains("high-availability: yes") && out.contains("standby nodes: 127."),
        "{out}"
    );
    // The joiners have the data written before they joined.
    cl.wait_converged(T);
    for i in 2..=5 {
        assert_eq!(cl.local_count(i, "main", "SELECT count(*) FROM t"), 50);
    }

    // kill -9 a voter that does not lead: a standby takes its place.
    let leader = cl.wait_leader(T);
    let voters: Vec<u64> = roles(&v)
        .into_iter()
        .filter(|(_, r)| r == "voter")
        .map(|(i, _)| i)
        .collect();
    let victim = *voters.iter().find(|i| **i != leader).unwrap();
    cl.kill(victim);
    let (v, took) = wait_show(&all, "a standby replaced the killed voter", |v| {
        count(v, "voter") == 3 && roles(v).contains(&(victim, s("spare"))) && v["ha"] == true
    });
    eprintln!(
        "voter {victim} killed: replaced after {took:?}: {:?}",
        roles(&v)
    );

    // kill -9 the leader: a new one is elected, and roles settle again (3 voters).
    cl.kill(leader);
    let (v, took) = wait_show(&all, "new leader, 3 voters", |v| {
        v["leader_id"].as_u64() != Some(leader)
            && count(v, "voter") == 3
            && roles(v).contains(&(leader, s("spare")))
    });
    eprintln!(
        "leader {leader} killed: new leader {} and 3 voters after {took:?}",
        v["leader_id"]
    );
    let c = cl.client();
    cl.rt.block_on(async {
        c.execute("main", "INSERT INTO t(v) VALUES ('after failover')", vec![])
            .await
            .unwrap();
    });

    // remove-node: refused for a running node, done for a stopped one (by address).
    let running = roles(&v)
        .into_iter()
        .find(|(i, r)| r == "voter" && *i != v["leader_id"].as_u64().unwrap())
        .unwrap()
        .0;
    let (ok, _, err) =
        Cluster::run_cli(&["remove-node", &running.to_string(), "--endpoints", &all]);
    assert!(!ok && err.contains("is running"), "{err}");
    let (ok, out, err) =
        Cluster::run_cli(&["remove-node", &addr(leader, &cl), "--endpoints", &all]);
    assert!(ok, "remove-node of the dead old leader: {err}");
    assert!(out.contains(&format!("removed node {leader}")), "{out}");
    let v = show(&all).unwrap();
    assert!(!roles(&v).iter().any(|(i, _)| *i == leader));
    // The removed node comes back from its data directory: the members refuse it as
    // removed, and it stops for good by itself.
    cl.spawn_stored(leader);
    let st = cl.wait_exit(leader, T);
    assert!(st.is_some(), "the removed node {leader} kept running");
    let log = cl.log_text(leader);
    assert!(
        log.contains(&format!("node {leader} was removed from the cluster")),
        "{log}"
    );
    let (ok, _, err) = Cluster::run_cli(&[
        "node",
        "--data-dir",
        &dir(leader, &cl),
        "--listen",
        &addr(leader, &cl),
    ]);
    assert!(!ok && err.contains("left the cluster"), "{err}");

    // The killed voter comes back: as a spare, then promoted to standby.
    cl.spawn_stored(victim);
    let (_, took) = wait_show(&all, "returning node becomes a standby", |v| {
        roles(v).contains(&(victim, s("standby")))
    });
    eprintln!("node {victim} restarted: standby after {took:?}");

    // leave: a voter hands over and stops; its data directory refuses to start again.
    let v = show(&all).unwrap();
    let leaver = roles(&v)
        .into_iter()
        .find(|(i, r)| r == "voter" && *i != v["leader_id"].as_u64().unwrap())
        .unwrap()
        .0;
    let (ok, out, err) = Cluster::run_cli(&["leave", "--endpoint", &addr(leaver, &cl)]);
    assert!(ok, "leave: {err}");
    assert!(out.contains(&format!("removed node {leaver}")), "{out}");
    assert!(
        cl.wait_exit(leaver, T).is_some(),
        "node {leaver} kept running after leaving"
    );
    let (v, _) = wait_show(&all, "voters refilled after leave", |v| {
        count(v, "voter") == 3 && !roles(v).iter().any(|(i, _)| *i == leaver)
    });
    let (ok, _, err) = Cluster::run_cli(&[
        "node",
        "--data-dir",
        &dir(leaver, &cl),
        "--listen",
        &addr(leaver, &cl),
    ]);
    assert!(!ok && err.contains("left the cluster"), "{err}");

    // remove-node --force on a running node (the highest id but the leader's): it is cut
    // off and stops.
    let forced = roles(&v)
        .into_iter()
        .map(|(i, _)| i)
        .filter(|i| Some(*i) != v["leader_id"].as_u64())
        .max();
    if let Some(forced) = forced {
        let (ok, _, err) = Cluster::run_cli(&[
            "remove-node",
            &forced.to_string(),
            "--force",
            "--endpoints",
            &all,
        ]);
        assert!(ok, "remove-node --force: {err}");
        assert!(
            cl.wait_exit(forced, T).is_some(),
            "node {forced} kept running after its removal"
        );
    }
    // Ids are never reused: a node that joins after removals gets id 6, not a removed one's
    // (whose removal it would otherwise take for its own), and keeps running.
    if let Some(forced) = forced {
        std::fs::remove_dir_all(cl.data_dir(forced)).unwrap();
        let token = Cluster::join_string(&all, &[]);
        cl.spawn_join(forced, &token, &[]);
        let (v, _) = wait_show(&all, "a new member (id 6)", |v| {
            roles(v).iter().any(|(i, _)| *i == 6)
        });
        assert!(
            !roles(&v).iter().any(|(i, _)| *i == forced || *i == leaver),
            "a removed id came back: {:?}",
            roles(&v)
        );
        assert!(
            cl.wait_exit(forced, Duration::from_secs(3)).is_none(),
            "the new member stopped:\n{}",
            cl.log_text(forced)
        );
    }
    let c = cl.client();
    let rows = cl.rt.block_on(async {
        c.query("main", "SELECT count(*) FROM t", vec![])
            .await
            .unwrap()
    });
    assert_eq!(format!("{:?}", rows.rows[0][0]), "Integer(51)");
}

/// Failure domains steer promotions: when a voter dies, the standby from the domain that
/// lost its voter is promoted, ahead of one with a lower id and a lower weight.
#[test]
fn failure_domains_guide_promotion() {
    let mut cl = Cluster::prepare(5, &[], false);
    let addr = |i: u64, cl: &Cluster| cl.addr(i).to_string();
    let a1 = addr(1, &cl);
    cl.spawn_first(&[s("--domain"), s("zone-a")]);
    cl.wait_leader(T);
    let token = Cluster::join_string(&a1, &["--ttl", "5m"]);
    // (node, domain, weight): nodes 2 and 3 become voters, 4 and 5 standbys.
    let plan = [
        (2, "zone-b", 0),
        (3, "zone-c", 0),
        (4, "zone-b", 0),
        (5, "zone-c", 9),
    ];
    for (i, domain, weight) in plan {
        cl.spawn_join(
            i,
            &token,
            &[s("--domain"), s(domain), s("--weight"), weight.to_string()],
        );
        wait_show(&a1, "joined", |v| roles(v).len() == i as usize);
        if i == 3 {
            wait_show(&a1, "3 voters", |v| count(v, "voter") == 3);
        }
    }
    let all = (1..=5).map(|i| addr(i, &cl)).collect::<Vec<_>>().join(",");
    let (v, _) = wait_show(&all, "3 voters + 2 standbys", |v| {
        count(v, "voter") == 3 && count(v, "standby") == 2
    });
    assert_eq!(
        roles(&v),
        vec![
            (1, s("voter")),
            (2, s("voter")),
            (3, s("voter")),
            (4, s("standby")),
            (5, s("standby"))
        ]
    );
    let domains: Vec<String> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["domain"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(domains, ["zone-a", "zone-b", "zone-c", "zone-b", "zone-c"]);

    // Kill the voter of a domain that has a standby; its domain-mate is promoted even though
    // the other standby has a lower id (and, for zone-c, a lower weight).
    let leader = cl.wait_leader(T);
    let victim = if leader == 3 { 2 } else { 3 };
    let expected = victim + 2;
    cl.kill(victim);
    let (v, took) = wait_show(&all, "the domain-mate promoted", |v| {
        count(v, "voter") == 3 && !roles(v).contains(&(victim, s("voter")))
    });
    eprintln!("voter {victim} killed: {:?} after {took:?}", roles(&v));
    assert!(
        roles(&v).contains(&(expected, s("voter"))),
        "expected node {expected} (same domain as {victim}) promoted: {:?}",
        roles(&v)
    );
}

/// The change a node's `last_role_change` records: (from, to, reason).
fn last_change(v: &Value, id: u64) -> Option<(String, String, String)> {
    let n = v["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["id"].as_u64() == Some(id))?;
    let e = &n["last_role_change"];
    Some((
        e["from"].as_str()?.to_string(),
        e["to"].as_str()?.to_string(),
        e["reason"].as_str()?.to_string(),
    ))
}

/// `cluster show` says when the leader last changed and why each node has its role, from
/// the history the leaders record in the system database: joins, promotions (with the
/// failure domain that decided them), the demotion of a dead voter, and elections after a
/// kill -9 of the leader.
#[test]
fn cluster_show_tells_when_and_why_roles_and_leaders_changed() {
    let mut cl = Cluster::prepare(4, &[], false);
    let addr = |i: u64, cl: &Cluster| cl.addr(i).to_string();
    let a1 = addr(1, &cl);
    cl.spawn_first(&[s("--domain"), s("zone-a")]);
    cl.wait_leader(T);
    let token = Cluster::join_string(&a1, &["--ttl", "5m"]);
    for (i, domain) in [(2, "zone-b"), (3, "zone-c"), (4, "zone-c")] {
        cl.spawn_join(i, &token, &[s("--domain"), s(domain)]);
        wait_show(&a1, "joined", |v| roles(v).len() == i as usize);
        if i == 3 {
            wait_show(&a1, "3 voters", |v| count(v, "voter") == 3);
        }
    }
    let all = (1..=4).map(|i| addr(i, &cl)).collect::<Vec<_>>().join(",");
    // The keeper records a role change in the history just after the configuration change
    // is applied: wait for both.
    let (v, _) = wait_show(&all, "3 voters + 1 standby, recorded", |v| {
        count(v, "voter") == 3
            && count(v, "standby") == 1
            && last_change(v, 4).is_some_and(|(_, to, _)| to == "standby")
    });
    eprintln!("{v:#}");
    assert_eq!(v["last_leader_change"]["node"].as_u64(), Some(1), "{v}");
    assert!(
        v["last_leader_change"]["reason"]
            .as_str()
            .unwrap()
            .contains("first leader"),
        "{v}"
    );
    let (from, to, why) = last_change(&v, 4).unwrap();
    assert_eq!((from.as_str(), to.as_str()), ("spare", "standby"), "{why}");
    assert!(why.contains("too few standbys online"), "{why}");
    // Node 3 became a voter for the voters' count and brought zone-c in.
    let (_, to, why) = last_change(&v, 3).unwrap();
    assert_eq!(to, "voter");
    assert!(
        why.contains("too few voters online") && why.contains("zone-c"),
        "{why}"
    );

    // Kill voter 3 (zone-c); standby 4 (zone-c) replaces it, then 3 is demoted.
    let leader = cl.wait_leader(T);
    assert_eq!(leader, 1);
    cl.kill(3);
    let (v, _) = wait_show(&all, "3 demoted", |v| {
        last_change(v, 3).is_some_and(|(_, to, _)| to == "spare")
            && last_change(v, 4).is_some_and(|(_, to, _)| to == "voter")
    });
    let (from, _, why) = last_change(&v, 3).unwrap();
    assert_eq!(
        (from.as_str(), why.as_str()),
        ("voter", "voter offline, replaced")
    );
    let (_, _, why) = last_change(&v, 4).unwrap();
    assert!(
        why.contains("too few voters online") && why.contains("zone-c"),
        "{why}"
    );

    // kill -9 the leader: the next one records its election and names node 1.
    let before = v["last_leader_change"]["term"].as_u64().unwrap();
    cl.kill(1);
    let survivors = [2, 4].map(|i| addr(i, &cl)).join(",");
    let (v, took) = wait_show(&survivors, "a new leader recorded", |v| {
        v["last_leader_change"]["term"].as_u64() > Some(before)
    });
    let new = v["last_leader_change"]["node"].as_u64().unwrap();
    let why = v["last_leader_change"]["reason"].as_str().unwrap();
    assert!([2, 4].contains(&new) && why.contains("node 1"), "{v}");
    eprintln!("after killing leader 1 ({took:?}): node {new}: {why}");
    let events = v["recent_events"].as_array().unwrap();
    assert!(!events.is_empty() && events.len() <= 10, "{v}");
    let times: Vec<u64> = events
        .iter()
        .map(|e| e["at_ms"].as_u64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "leader" && e["node"] == new),
        "{v}"
    );
    // The table says the same.
    let (ok, out, err) = Cluster::run_cli(&["cluster", "show", "--endpoints", &survivors]);
    assert!(ok, "{err}");
    assert!(
        out.contains("LAST ROLE CHANGE")
            && out.contains("last leader change: ")
            && out.contains(&format!("node {new} leads"))
            && out.contains("voter offline, replaced"),
        "{out}"
    );
    eprintln!("{out}");
}
