//! The etcd facade over TLS with etcd's flags (`--cert-file`, `--key-file`,
//! `--trusted-ca-file`, `--client-cert-auth`), checked with the real etcdctl: a client with a
//! certificate from the trusted CA is served (through a follower, so the forwarded path is
//! covered too); a client without a certificate, with one from a foreign CA, or speaking
//! plaintext is refused; a client that does not trust the server's CA refuses the server; a
//! bad certificate path stops the node at start-up with a message naming the flag and file.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use raftsql_tests::harness;
use raftsql_tests::harness::etcdctl;
use raftsql_tests::harness::tls::Ca;
use raftsql_tests::harness::Cluster;
use rcgen::ExtendedKeyUsagePurpose;

const T: Duration = Duration::from_secs(30);

#[test]
fn etcd_api_over_tls_with_client_certificates() {
    if !harness::etcdctl_available() {
        assert!(
            std::env::var("CI").is_err(),
            "etcdctl (Debian etcd-client) is required in CI"
        );
        eprintln!("etcdctl not installed; skipping");
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let mut cl = Cluster::prepare(3, &[], true);
    let ips: Vec<IpAddr> = (1..=3).map(|id| cl.addr(id).ip()).collect();
    let ca = Ca::new(certs.path(), "ca");
    let (server_cert, server_key) = ca.issue("server", &ips, ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = ca.issue(
        "client",
        &["127.0.0.1".parse().unwrap()],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let foreign = Ca::new(certs.path(), "foreign-ca");
    let (foreign_cert, foreign_key) = foreign.issue(
        "intruder",
        &["127.0.0.1".parse().unwrap()],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let ca_file = ca.cert_path("ca").display().to_string();
    cl.args = [
        "--cert-file",
        &server_cert,
        "--key-file",
        &server_key,
        "--trusted-ca-file",
        &ca_file,
        "--client-cert-auth",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for id in 1..=3 {
        cl.spawn(id);
    }
    let leader = cl.wait_leader(T);
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let https = format!("https://{}", cl.etcd_addr(follower));
    // etcd's HTTP endpoints over the same TLS port (HTTP/1.1, as load balancers and kubeadm's
    // probes speak it), with the client certificate; refused without one.
    let get = |path: &str, with_cert: bool| -> String {
        let mut cmd = Command::new("openssl");
        cmd.args(["s_client", "-quiet", "-connect"])
            .arg(cl.etcd_addr(follower).to_string())
            .args(["-CAfile", &ca_file]);
        if with_cert {
            cmd.args(["-cert", &client_cert, "-key", &client_key]);
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl");
        use std::io::Write;
        write!(
            child.stdin.take().unwrap(),
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned()
    };
    if Command::new("openssl").arg("version").output().is_ok() {
        let health = get("/health", true);
        assert!(
            health.starts_with("HTTP/1.1 200")
                && health.contains(r#"{"health":"true","reason":""}"#),
            "{health}"
        );
        let metrics = get("/metrics", true);
        assert!(metrics.contains("etcd_server_has_leader 1"), "{metrics}");
        assert!(get("/readyz", true).contains("ok"));
        let refused = get("/health", false);
        assert!(
            !refused.contains("HTTP/1.1 200"),
            "without a client certificate: {refused}"
        );
    } else {
        eprintln!("openssl not installed: HTTPS endpoints not checked");
    }
    let trusted = [
        "--cacert",
        ca_file.as_str(),
        "--cert",
        client_cert.as_str(),
        "--key",
        client_key.as_str(),
    ];

    // A client with a certificate from the trusted CA is served, through a follower.
    let mut ok = false;
    let mut last = String::new();
    for _ in 0..50 {
        let (success, out) = etcdctl(&https, &[&trusted[..], &["put", "/tls/k", "v1"]].concat());
        if success {
            ok = true;
            break;
        }
        last = out;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ok, "put with a trusted client certificate failed: {last}");
    let (success, out) = etcdctl(&https, &[&trusted[..], &["get", "/tls/k"]].concat());
    assert!(success, "{out}");
    assert_eq!(out, "/tls/k\nv1\n");
    let (success, out) = etcdctl(
        &https,
        &[&trusted[..], &["endpoint", "status", "-w", "json"]].concat(),
    );
    assert!(success && out.contains("\"leader\""), "{out}");

    // Refused: no client certificate, a foreign CA's certificate, plaintext.
    let (success, out) = etcdctl(&https, &["--cacert", &ca_file, "get", "/tls/k"]);
    assert!(!success, "served a client without a certificate: {out}");
    let (success, out) = etcdctl(
        &https,
        &[
            "--cacert",
            &ca_file,
            "--cert",
            &foreign_cert,
            "--key",
            &foreign_key,
            "get",
            "/tls/k",
        ],
    );
    assert!(
        !success,
        "served a client with a foreign CA's certificate: {out}"
    );
    let http = format!("http://{}", cl.etcd_addr(follower));
    let (success, out) = etcdctl(&http, &["get", "/tls/k"]);
    assert!(!success, "served plaintext: {out}");
    // A client that trusts another CA refuses the server.
    let foreign_ca = foreign.cert_path("foreign-ca").display().to_string();
    let (success, out) = etcdctl(
        &https,
        &[
            "--cacert",
            &foreign_ca,
            "--cert",
            &client_cert,
            "--key",
            &client_key,
            "get",
            "/tls/k",
        ],
    );
    assert!(
        !success,
        "client accepted a server its CA did not sign: {out}"
    );

    // The refused handshakes did not disturb the cluster.
    let (success, out) = etcdctl(&https, &[&trusted[..], &["get", "/tls/k"]].concat());
    assert!(success && out == "/tls/k\nv1\n", "{out}");

    // A bad path is reported at start-up, naming the flag and the file.
    let missing = certs.path().join("missing.pem");
    let out = Command::new(harness::bin())
        .args(["node", "--id", "1", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(certs.path().join("bad-node"))
        .args(["--bootstrap-peers", "1=127.0.0.1:1"])
        .args(["--etcd-listen", "127.0.0.1:0", "--cert-file"])
        .arg(&missing)
        .args(["--key-file", &server_key])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("--cert-file {}", missing.display())),
        "{stderr}"
    );
}
