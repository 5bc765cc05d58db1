//! Mutually authenticated TLS between nodes, and TLS for SQL clients, with real processes:
//! a cluster formed from `raftsql ca init` serves through followers; its files are
//! owner-only; plaintext clients, clients without a certificate under --client-cert-auth,
//! a client claiming to be a node and a node of another CA are refused and logged; clients
//! cannot call the members-only services. Joins pin the CA's fingerprint (a wrong one sends
//! nothing and spends nothing), expired and reused tokens are refused, and a removed node
//! cannot come back, with its old certificate neither as a node nor as a client. With
//! `--cert-file`, SQL clients get that certificate while peers keep their node certificates.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use raftsql_core::tls::Dialer;
use raftsql_core::{Client, Value};
use raftsql_proto::v1 as pb;
use raftsql_tests::harness;
use raftsql_tests::harness::{etcdctl, Cluster};

const T: Duration = Duration::from_secs(30);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn cli(args: &[String]) -> (bool, String, String) {
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    Cluster::run_cli(&a)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Runs `raftsql join JOIN` for node `id`'s directory and address, to completion (a join
/// that is refused returns at once): (succeeded, stdout, stderr).
fn try_join(cl: &Cluster, id: u64, join: &str) -> (bool, String, String) {
    let (d, a) = (
        cl.data_dir(id).display().to_string(),
        cl.addr(id).to_string(),
    );
    cli(&strings(&["join", join, "--data-dir", &d, "--listen", &a]))
}

/// Waits until `cond` holds for node `id`'s log.
fn wait_log(cl: &Cluster, id: u64, what: &str) -> String {
    harness::try_wait_for(T, || Some(cl.log_text(id)).filter(|log| log.contains(what)))
        .unwrap_or_else(|| panic!("node {id}'s log never said {what:?}:\n{}", cl.log_text(id)))
}

#[test]
fn tls_cluster_serves_members_and_refuses_everyone_else() {
    let mut cl = Cluster::prepare_tls(3, &["--client-cert-auth"], true);
    for id in 1..=3 {
        cl.spawn(id);
    }
    let leader = cl.wait_leader(T);
    let follower = (1..=3).find(|&i| i != leader).unwrap();

    // Files: owner-only.
    let tls = cl.data_dir(1).join("tls");
    assert_eq!(mode(&tls), 0o700);
    for f in ["ca.crt", "ca.key", "node.crt", "node.key"] {
        assert_eq!(mode(&tls.join(f)), 0o600, "{f}");
    }

    // A certified client writes through a follower (forwarded over mTLS) and reads back.
    let c = cl.client_of(follower);
    cl.seed_rows_with(&c, 20);
    let rows = cl
        .rt
        .block_on(c.query("main", "SELECT count(*) FROM t", vec![]))
        .unwrap();
    assert_eq!(rows.rows[0][0], Value::Integer(20));
    cl.wait_converged(T);
    eprintln!("20 writes through follower {follower} over TLS");

    // The CLI with the client certificate works; without it, or in plaintext, it is refused.
    let ep = cl.addr(follower).to_string();
    let mut args = strings(&["sql", "--endpoints", &ep, "-e", "SELECT count(*) FROM t"]);
    args.extend(cl.tls_flags());
    let (ok, out, err) = cli(&args);
    assert!(ok && out.contains("20"), "{out} {err}");
    let (ok, _, err) = cli(&strings(&["sql", "--endpoints", &ep, "-e", "SELECT 1"]));
    assert!(!ok && err.contains("speaks TLS"), "plaintext client: {err}");
    let ca_only = strings(&[
        "sql",
        "--endpoints",
        &ep,
        "--cacert",
        &cl.dir.path().join("ca/ca.crt").display().to_string(),
        "-e",
        "SELECT 1",
    ]);
    let (ok, _, err) = cli(&ca_only);
    assert!(
        !ok && err.contains("requires a client certificate"),
        "client without certificate: {err}"
    );
    wait_log(&cl, follower, "refused a client");
    wait_log(&cl, follower, "TLS handshake failed");

    // The etcd API serves the node certificate and wants the client certificate too.
    let etcd = format!("https://{}", cl.etcd_addr(follower));
    let flags = cl.tls_flags();
    let mut args: Vec<&str> = flags.iter().map(|s| s.as_str()).collect();
    args.extend(["put", "/tls", "yes"]);
    let (ok, out) = etcdctl(&etcd, &args);
    assert!(ok && out.contains("OK"), "etcdctl put over TLS: {out}");
    let (ok, out) = etcdctl(&etcd, &[&flags[0], &flags[1], "get", "/tls"]);
    assert!(!ok, "etcdctl without a client certificate: {out}");

    // A client with a good client certificate claiming to be node 2 is refused: only node
    // 2's certificate may say so. Its Raft frames never reach Raft.
    let term_before = cl.status(leader, false).unwrap().term;
    let r = cl.rt.block_on(async {
        let mut conn = cl.connect_as(2, 1).await;
        conn.call(pb::request::Body::Status(pb::StatusRequest {
            with_digests: false,
        }))
        .await
    });
    let e = r.unwrap_err();
    assert!(
        e.to_string()
            .contains("not the cluster's certificate for node 2")
            || e.to_string().contains("not the cluster's for node 2"),
        "{e}"
    );
    wait_log(&cl, 1, "refused node 2");

    // Members-only services refuse a (certified) client.
    for service in ["raftsql.members.leader", "raftsql.members.notice", "etcd"] {
        let r = cl.rt.block_on(Client::call_node_with(
            &cl.client_tls,
            cl.addr(leader),
            "raftsql",
            pb::request::Body::Service(pb::ServiceCall {
                service: service.into(),
                payload: Default::default(),
            }),
        ));
        match r {
            Ok(pb::response::Body::Error(e)) => {
                assert!(
                    e.message.contains("only for members") || e.message.contains("no service"),
                    "{service}: {}",
                    e.message
                )
            }
            other => panic!("{service}: {other:?}"),
        }
    }

    // A node of another CA, configured with this cluster's peers: every handshake fails,
    // and the cluster is unaffected.
    let other_ca = cl.dir.path().join("other-ca");
    let (ok, _, err) = Cluster::run_cli(&["ca", "init", other_ca.to_str().unwrap()]);
    assert!(ok, "{err}");
    let impostor_dir = cl.dir.path().join("impostor");
    let impostor_addr = format!("{}:7000", {
        let ip = cl.addr(3).ip().to_string();
        let mut parts: Vec<&str> = ip.split('.').collect();
        parts[3] = "9";
        parts.join(".")
    });
    let impostor_log = cl.dir.path().join("impostor.log");
    let mut impostor = std::process::Command::new(harness::bin())
        .args([
            "node",
            "--id",
            "9",
            "--listen",
            &impostor_addr,
            "--bootstrap-peers",
            &format!("{},9={impostor_addr}", cl.peers),
            "--peer-ca-dir",
            other_ca.to_str().unwrap(),
            "--data-dir",
            impostor_dir.to_str().unwrap(),
        ])
        .stdout(std::fs::File::create(&impostor_log).unwrap())
        .stderr(std::fs::File::create(impostor_log.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let impostor_ip = impostor_addr.split(':').next().unwrap().to_string();
    let refused = format!("refused a connection from {impostor_ip}");
    let log = wait_log(&cl, leader, &refused);
    let line = log.lines().find(|l| l.contains(&refused)).unwrap();
    assert!(line.contains("TLS handshake failed"), "{line}");
    eprintln!("the leader on the impostor: {line}");
    let impostor_err =
        std::fs::read_to_string(impostor_log.with_extension("err")).unwrap_or_default();
    eprintln!(
        "the impostor: {}",
        impostor_err
            .lines()
            .find(|l| l.contains("cannot connect"))
            .unwrap_or("(no dial error logged)")
    );
    std::thread::sleep(Duration::from_secs(3));
    let _ = impostor.kill();
    let _ = impostor.wait();
    let after = cl.status(leader, false).unwrap();
    assert_eq!(after.term, term_before, "the impostor disturbed the term");
    assert_eq!(after.role, "leader");
    cl.rt.block_on(async {
        cl.client()
            .execute("main", "INSERT INTO t VALUES(100, 'after')", vec![])
            .await
            .unwrap();
    });
    cl.wait_converged(T);
    cl.check_integrity("main");
}

#[test]
fn joins_pin_the_ca_and_removed_nodes_stay_out() {
    let mut cl = Cluster::prepare(3, &[], false);
    cl.spawn_first(&strings(&["--peer-tls"]));
    let tls1 = cl.data_dir(1).join("tls");
    harness::wait_for(T, "node 1's CA", || {
        tls1.join("node.key").exists().then_some(())
    });
    let fp = raftsql_core::tls::ClusterCa::load(&tls1)
        .unwrap()
        .fingerprint_hex();
    let cacert = tls1.join("ca.crt").display().to_string();
    cl.client_tls = Dialer::client(&tls1.join("ca.crt"), None).unwrap();
    cl.wait_leader(T);
    cl.rt.block_on(async {
        cl.client()
            .execute("main", "CREATE TABLE t(k INTEGER PRIMARY KEY)", vec![])
            .await
            .unwrap();
        cl.client()
            .execute("main", "INSERT INTO t VALUES(1)", vec![])
            .await
            .unwrap();
    });
    let ep = cl.addr(1).to_string();
    let join = Cluster::join_string(&ep, &["--cacert", &cacert]);
    let parts: Vec<&str> = join.split('/').collect();
    assert_eq!(parts.len(), 3, "{join}");
    assert_eq!(parts[2], fp, "the join string pins the CA's SHA-256");

    // A wrong fingerprint: the join fails in the handshake, before the token is used.
    let mut wrong = join.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    let (ok, _, err) = try_join(&cl, 2, &wrong);
    assert!(!ok && err.contains("fingerprint"), "{err}");
    assert!(!cl.data_dir(2).join("tls").exists());
    eprintln!("wrong fingerprint: {}", err.trim());

    // The same single-use token still works, once.
    cl.spawn_join(2, &join, &[]);
    wait_log(&cl, 2, "joined cluster");
    let tls2 = cl.data_dir(2).join("tls");
    // "joined cluster" is printed once the node has stored its key (it was printed when the
    // ticket arrived, before the key was written, and reading the key at once failed).
    assert!(
        tls2.join("node.key").exists(),
        "\"joined cluster\" was printed before the node stored its key"
    );
    assert_eq!(mode(&tls2.join("node.key")), 0o600);
    assert_eq!(
        raftsql_core::tls::ClusterCa::load(&tls2)
            .unwrap()
            .fingerprint_hex(),
        fp
    );
    cl.wait_converged(T);
    assert_eq!(cl.local_count(2, "main", "SELECT count(*) FROM t"), 1);
    let d3 = cl.data_dir(3).display().to_string();
    let a3 = cl.addr(3).to_string();
    let (ok, _, err) = try_join(&cl, 3, &join);
    assert!(!ok && err.contains("already used"), "reused token: {err}");
    // An expired token.
    let short = Cluster::join_string(&ep, &["--cacert", &cacert, "--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    let (ok, _, err) = try_join(&cl, 3, &short);
    assert!(!ok && err.contains("expired"), "expired token: {err}");
    assert!(!cl.data_dir(3).join("tls").exists());

    // Remove node 2 while it is down: restarted, it is refused and stops for good, and its
    // certificate does not work as a client certificate either.
    cl.kill(2);
    let (ok, out, err) = cli(&strings(&[
        "remove-node",
        "2",
        "--force",
        "--endpoints",
        &ep,
        "--cacert",
        &cacert,
    ]));
    assert!(ok, "remove-node: {out} {err}");
    cl.spawn_stored(2);
    let st = cl.wait_exit(2, T).expect("the removed node kept running");
    let log2 = cl.log_text(2);
    assert!(log2.contains("revoked"), "{log2}");
    eprintln!("removed node 2 restarted and stopped ({st})");
    wait_log(&cl, 1, "refused node 2");
    let old = Dialer::client(
        &tls1.join("ca.crt"),
        Some((&tls2.join("node.crt"), &tls2.join("node.key"))),
    )
    .unwrap();
    let r = cl
        .rt
        .block_on(Client::status_of_with(&old, cl.addr(1), "raftsql", false));
    let e = r.unwrap_err().to_string();
    assert!(e.contains("revoked"), "{e}");
    // No private key (the CA's travelled in the join answer) in any log.
    let key = std::fs::read_to_string(tls1.join("ca.key")).unwrap();
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    for id in 1..=2 {
        let log = cl.log_text(id);
        assert!(
            !log.contains("PRIVATE KEY") && !log.contains(&body[..40]),
            "node {id}'s log shows a key"
        );
    }
    // The cluster goes on.
    cl.rt.block_on(async {
        cl.client()
            .execute("main", "INSERT INTO t VALUES(2)", vec![])
            .await
            .unwrap();
    });
    assert_eq!(cl.local_count(1, "main", "SELECT count(*) FROM t"), 2);

    // A backup saved over TLS restores into a new TLS cluster (its own CA).
    let file = cl.dir.path().join("backup.raftsql").display().to_string();
    let (ok, out, err) = cli(&strings(&[
        "snapshot",
        "save",
        &file,
        "--endpoints",
        &ep,
        "--cacert",
        &cacert,
    ]));
    assert!(ok, "snapshot save over TLS: {out} {err}");
    let _ = std::fs::remove_dir_all(cl.data_dir(3));
    let (ok, out, err) = cli(&strings(&[
        "snapshot",
        "restore",
        &file,
        "--data-dir",
        &d3,
        "--id",
        "1",
        "--listen",
        &a3,
        "--peer-tls",
    ]));
    assert!(
        ok && out.contains("peer TLS on"),
        "snapshot restore --peer-tls: {out} {err}"
    );
    cl.spawn_stored(3);
    let tls3 = cl.data_dir(3).join("tls");
    let new_cluster = Dialer::client(&tls3.join("ca.crt"), None).unwrap();
    let c = Client::new(vec![cl.addr(3)], "raftsql").with_dialer(new_cluster);
    let rows = cl
        .rt
        .block_on(c.query("main", "SELECT count(*) FROM t", vec![]))
        .unwrap();
    assert_eq!(rows.rows[0][0], Value::Integer(2));
    assert_ne!(
        raftsql_core::tls::ClusterCa::load(&tls3)
            .unwrap()
            .fingerprint_hex(),
        fp,
        "the restored cluster has its own CA"
    );
}

/// `--cert-file/--key-file` with peer TLS: SQL clients get that certificate (here from a
/// "public" CA the cluster CA knows nothing of), while peers, which dial `node-<id>.raftsql`,
/// still get their node certificates and form the cluster.
#[test]
fn sql_clients_get_the_client_facing_certificate() {
    let mut cl = Cluster::prepare_tls(3, &[], false);
    let public = harness::tls::Ca::new(cl.dir.path(), "public-ca");
    for id in 1..=3 {
        let (cert, key) = public.issue(
            &format!("server{id}"),
            &[cl.addr(id).ip()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let mut args = cl.args.clone();
        args.extend(strings(&["--cert-file", &cert, "--key-file", &key]));
        let a = cl.addr(id).to_string();
        let mut full = strings(&[
            "node",
            "--id",
            &id.to_string(),
            "--listen",
            &a,
            "--bootstrap-peers",
            &cl.peers,
            "--data-dir",
            &cl.data_dir(id).display().to_string(),
        ]);
        full.extend(args);
        cl.spawn_args(id, &full);
    }
    // The harness's clients trust only the cluster CA: switch to the public one.
    cl.client_tls = Dialer::client(&public.cert_path("public-ca"), None).unwrap();
    let leader = cl.wait_leader(T);
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    cl.rt.block_on(async {
        let c = cl.client_of(follower);
        c.execute("main", "CREATE TABLE t(k)", vec![])
            .await
            .unwrap();
        c.execute("main", "INSERT INTO t VALUES(1)", vec![])
            .await
            .unwrap();
    });
    cl.wait_converged(T);
    // A client that trusts only the cluster CA does not accept the client-facing
    // certificate.
    let ep = cl.addr(follower).to_string();
    let cacert = cl.dir.path().join("ca/ca.crt").display().to_string();
    let (ok, _, err) = cli(&strings(&[
        "sql",
        "--endpoints",
        &ep,
        "--cacert",
        &cacert,
        "-e",
        "SELECT 1",
    ]));
    assert!(!ok && err.contains("certificate"), "{err}");
    eprintln!("cluster-CA-only client: {}", err.trim());
}
