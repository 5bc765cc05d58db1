//! Clusters of real `raftsql` processes on loopback, each node its own address.
//!
//! Each cluster gets its own 127.x.y.0/24 addresses (x from the process id, y from a
//! per-process counter), so tests can run in parallel and every node has its own address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use raftsql_cli::launch::NodeProcess;
use raftsql_core::{Client, Consistency, Value};

use super::poll::try_wait_for;

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(1);

/// The binary under test: the real CLI code, built as this package's binary, or the copy
/// `RAFTSQL_TEST_BIN` names (`tests/jepsen-long` freezes one, since any later `cargo test`
/// build replaces the binary in target/).
/// (Next to the test executables: `target/<profile>/raftsql-under-test`, beside `deps/`.)
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("RAFTSQL_TEST_BIN").unwrap_or_else(|_| {
            let test = std::env::current_exe().expect("the test executable's path");
            let dir = test
                .parent()
                .and_then(|d| d.parent())
                .expect("target/<profile>/deps");
            dir.join("raftsql-under-test").display().to_string()
        })
    })
}

pub struct NodeProc {
    pub id: u64,
    pub addr: SocketAddr,
    pub data: PathBuf,
    pub log: PathBuf,
    proc: Option<NodeProcess>,
    /// The node joined with a token (after [`Cluster::rejoin`]): it restarts from what its
    /// data directory stores, not from the bootstrap peers.
    joined: bool,
}

pub struct Cluster {
    /// Serve the etcd API on each node's address, port 2379.
    pub etcd: bool,
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeProc>,
    pub peers: String,
    pub args: Vec<String>,
    pub rt: tokio::runtime::Runtime,
    /// How the harness's clients connect (TLS after [`Cluster::prepare_tls`]).
    pub client_tls: raftsql_core::tls::Dialer,
}

impl Cluster {
    /// Starts `n` nodes with extra `raftsql node` arguments.
    pub fn start(n: usize, args: &[&str]) -> Cluster {
        Self::start_opts(n, args, false)
    }

    /// Starts `n` nodes that also serve the etcd API (on port 2379 of their address).
    pub fn start_with_etcd(n: usize, args: &[&str]) -> Cluster {
        Self::start_opts(n, args, true)
    }

    /// The etcd endpoint of a node (with `start_with_etcd`).
    pub fn etcd_addr(&self, id: u64) -> SocketAddr {
        SocketAddr::new(self.addr(id).ip(), 2379)
    }

    fn start_opts(n: usize, args: &[&str], etcd: bool) -> Cluster {
        let mut cl = Self::prepare(n, args, etcd);
        for id in 1..=n as u64 {
            cl.spawn(id);
        }
        cl
    }

    /// A cluster of `n` nodes with addresses and directories chosen but no process started
    /// (so that a test can derive arguments from the addresses, e.g. certificates, then
    /// [`Cluster::spawn`] each node).
    pub fn prepare(n: usize, args: &[&str], etcd: bool) -> Cluster {
        let c = NEXT_CLUSTER.fetch_add(1, Ordering::SeqCst);
        let x = (std::process::id() % 200) + 20;
        let dir = tempfile::Builder::new()
            .prefix("raftsql-test-")
            .tempdir()
            .unwrap();
        let nodes: Vec<NodeProc> = (1..=n as u64)
            .map(|id| NodeProc {
                id,
                addr: format!("127.{x}.{c}.{id}:7000").parse().unwrap(),
                data: dir.path().join(format!("node{id}")),
                log: dir.path().join(format!("node{id}.log")),
                proc: None,
                joined: false,
            })
            .collect();
        let peers = nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.addr))
            .collect::<Vec<_>>()
            .join(",");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut cl = Cluster {
            etcd,
            dir,
            nodes,
            peers,
            args: args
                .iter()
                .map(|s| s.to_string())
                .chain(extra_node_args())
                .collect(),
            rt,
            client_tls: Default::default(),
        };
        if std::env::var("RAFTSQL_TEST_TLS").is_ok_and(|v| v == "1") {
            cl.enable_tls();
        }
        cl
    }

    /// [`Cluster::prepare`] for a TLS cluster: `raftsql ca init <dir>/ca`, every node gets
    /// `--peer-ca-dir`, and a client certificate `<dir>/client.{crt,key}` from that CA
    /// is what the harness's clients present ([`Cluster::tls_flags`] for the CLI).
    pub fn prepare_tls(n: usize, args: &[&str], etcd: bool) -> Cluster {
        let mut cl = Self::prepare(n, args, etcd);
        cl.enable_tls();
        cl
    }

    /// Makes this (not yet started) cluster a TLS cluster; see [`Cluster::prepare_tls`].
    /// `RAFTSQL_TEST_TLS=1` does it for every cluster of tests that reach the nodes only
    /// through the harness (the Jepsen register and append workloads, for example).
    pub fn enable_tls(&mut self) {
        if self.client_tls.is_tls() {
            return;
        }
        let cl = self;
        let ca = cl.dir.path().join("ca");
        let (ok, out, err) = Self::run_cli(&["ca", "init", ca.to_str().unwrap()]);
        assert!(ok, "ca init failed: {err}");
        assert!(out.contains("fingerprint"), "{out}");
        let client = cl.dir.path().join("client");
        let (ok, _, err) = Self::run_cli(&[
            "ca",
            "client-cert",
            "--ca-dir",
            ca.to_str().unwrap(),
            "--name",
            "tester",
            "--out",
            client.to_str().unwrap(),
        ]);
        assert!(ok, "ca client-cert failed: {err}");
        cl.args
            .extend(["--peer-ca-dir".to_string(), ca.display().to_string()]);
        cl.client_tls = raftsql_core::tls::Dialer::client(
            &ca.join("ca.crt"),
            Some((&client.with_extension("crt"), &client.with_extension("key"))),
        )
        .unwrap();
    }

    /// The gRPC endpoint of node `id`'s etcd API: `http://`, or with TLS `https://` with the
    /// cluster CA and the harness's client certificate.
    pub fn etcd_endpoint(&self, id: u64) -> tonic::transport::Endpoint {
        let addr = self.etcd_addr(id);
        if !self.client_tls.is_tls() {
            return tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        }
        let d = self.dir.path();
        let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read("ca/ca.crt")))
            .identity(tonic::transport::Identity::from_pem(
                read("client.crt"),
                read("client.key"),
            ));
        tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
    }

    /// The CLI's TLS flags for this cluster's client certificate (none without TLS).
    pub fn tls_flags(&self) -> Vec<String> {
        if !self.client_tls.is_tls() {
            return Vec::new();
        }
        let d = self.dir.path();
        [
            "--cacert",
            &d.join("ca/ca.crt").display().to_string(),
            "--cert",
            &d.join("client.crt").display().to_string(),
            "--key",
            &d.join("client.key").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn node(&self, id: u64) -> &NodeProc {
        &self.nodes[(id - 1) as usize]
    }

    pub fn spawn(&mut self, id: u64) {
        let n = &self.nodes[(id - 1) as usize];
        if n.joined {
            let mut args = vec![
                "node".to_string(),
                "--data-dir".into(),
                n.data.display().to_string(),
                "--listen".into(),
                n.addr.to_string(),
            ];
            args.extend(self.node_args(id));
            return self.spawn_args(id, &args);
        }
        let mut args: Vec<String> = vec![
            "node".into(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            n.addr.to_string(),
            "--bootstrap-peers".into(),
            self.peers.clone(),
            "--data-dir".into(),
            n.data.display().to_string(),
        ];
        args.extend(self.node_args(id));
        self.spawn_args(id, &args);
    }

    /// The cluster's extra `raftsql node` arguments for node `id` (with `--etcd-listen`);
    /// `{id}` in an argument becomes the node's id (e.g. a directory per node).
    fn node_args(&self, id: u64) -> Vec<String> {
        let mut args: Vec<String> = self
            .args
            .iter()
            .map(|a| a.replace("{id}", &id.to_string()))
            .collect();
        if self.etcd {
            args.push("--etcd-listen".into());
            args.push(self.etcd_addr(id).to_string());
        }
        args
    }

    /// Starts node `id` (whose data directory must be empty) as a new member that joins
    /// with `join` (HOST:PORT/TOKEN), with the cluster's arguments; later restarts of it
    /// start from its data directory.
    pub fn rejoin(&mut self, id: u64, join: &str) {
        let extra = self.node_args(id);
        self.spawn_join(id, join, &extra);
        self.nodes[(id - 1) as usize].joined = true;
    }

    /// Starts node `id`'s process as `raftsql ARGS` (e.g. `join ...` or `node` without
    /// bootstrap peers), logging to its log file.
    pub fn spawn_args(&mut self, id: u64, args: &[String]) {
        let n = &mut self.nodes[(id - 1) as usize];
        assert!(n.proc.is_none(), "node {id} already running");
        n.proc = Some(NodeProcess::spawn(Path::new(bin()), args, &n.log).unwrap());
    }

    /// Runs `raftsql ARGS` to completion: (succeeded, stdout, stderr).
    pub fn run_cli(args: &[&str]) -> (bool, String, String) {
        let out = Command::new(bin()).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `raftsql add-node --endpoints EPS EXTRA...` and returns the HOST:PORT/TOKEN it
    /// printed.
    pub fn join_string(eps: &str, extra: &[&str]) -> String {
        let mut args = vec!["add-node", "--endpoints", eps];
        args.extend_from_slice(extra);
        let (ok, out, err) = Self::run_cli(&args);
        assert!(ok, "add-node failed: {err}");
        out.split_whitespace()
            .find(|w| w.contains('/') && w.contains(':'))
            .unwrap_or_else(|| panic!("no join string in {out:?}"))
            .to_string()
    }

    /// Starts node 1 as the only member of a new cluster (`--bootstrap-peers 1=ITSELF`),
    /// with extra `raftsql node` arguments; others join it with tokens.
    pub fn spawn_first(&mut self, extra: &[String]) {
        let a1 = self.addr(1).to_string();
        let mut args = vec![
            "node".to_string(),
            "--id".into(),
            "1".into(),
            "--listen".into(),
            a1.clone(),
            "--bootstrap-peers".into(),
            format!("1={a1}"),
            "--data-dir".into(),
            self.data_dir(1).display().to_string(),
        ];
        args.extend(extra.iter().cloned());
        self.spawn_args(1, &args);
    }

    /// Starts node `id` as `raftsql join JOIN --data-dir ITS_DIR --listen ITS_ADDR EXTRA...`.
    pub fn spawn_join(&mut self, id: u64, join: &str, extra: &[String]) {
        let mut args = vec![
            "join".to_string(),
            join.to_string(),
            "--data-dir".into(),
            self.data_dir(id).display().to_string(),
            "--listen".into(),
            self.addr(id).to_string(),
        ];
        args.extend(extra.iter().cloned());
        self.spawn_args(id, &args);
    }

    /// Starts node `id` from what its data directory stores (`raftsql node --data-dir DIR
    /// --listen ADDR`, no id or peers): after a join, a recovery or a restore.
    pub fn spawn_stored(&mut self, id: u64) {
        let args = vec![
            "node".to_string(),
            "--data-dir".into(),
            self.data_dir(id).display().to_string(),
            "--listen".into(),
            self.addr(id).to_string(),
        ];
        self.spawn_args(id, &args);
    }

    /// kill -9.
    pub fn kill(&mut self, id: u64) {
        let n = &mut self.nodes[(id - 1) as usize];
        if let Some(p) = n.proc.take() {
            p.kill();
        }
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self, id: u64) -> std::process::ExitStatus {
        let n = &mut self.nodes[(id - 1) as usize];
        n.proc.take().expect("node not running").stop().unwrap()
    }

    pub fn pause(&self, id: u64) {
        self.node(id).proc.as_ref().expect("node running").pause();
    }

    pub fn resume(&self, id: u64) {
        self.node(id).proc.as_ref().expect("node running").resume();
    }

    pub fn restart(&mut self, id: u64) {
        self.kill(id);
        self.spawn(id);
    }

    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.proc.is_some())
            .map(|n| n.id)
            .collect()
    }

    /// Waits for a node process to exit on its own; returns its status.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<std::process::ExitStatus> {
        let n = &mut self.nodes[(id - 1) as usize];
        let st = n.proc.as_mut().expect("node running").wait_exit(timeout);
        if st.is_some() {
            n.proc = None;
        }
        st
    }

    /// The process id of running node `id`.
    pub fn pid(&self, id: u64) -> u32 {
        self.node(id).proc.as_ref().expect("node running").pid()
    }

    /// The peak resident memory (VmHWM, KiB) of node `id`'s process.
    pub fn vm_hwm_kib(&self, id: u64) -> u64 {
        self.proc_status_kib(id, "VmHWM:")
    }

    /// The resident memory now (VmRSS, KiB) of node `id`'s process.
    pub fn vm_rss_kib(&self, id: u64) -> u64 {
        self.proc_status_kib(id, "VmRSS:")
    }

    fn proc_status_kib(&self, id: u64, field: &str) -> u64 {
        let pid = self.node(id).proc.as_ref().expect("node running").pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
    }

    /// The size of database `db`'s WAL on node `id`, as its status reports it (the WAL is
    /// held in memory; 0 if the node does not answer or has none).
    pub fn wal_bytes(&self, id: u64, db: &str) -> u64 {
        self.status(id, false)
            .and_then(|s| s.wal_bytes.get(db).copied())
            .unwrap_or(0)
    }

    pub fn log_text(&self, id: u64) -> String {
        std::fs::read_to_string(&self.node(id).log).unwrap_or_default()
    }

    pub fn data_dir(&self, id: u64) -> &Path {
        &self.node(id).data
    }

    pub fn addr(&self, id: u64) -> SocketAddr {
        self.node(id).addr
    }

    /// A client of every node.
    pub fn client(&self) -> Client {
        Client::new(self.nodes.iter().map(|n| n.addr).collect(), "raftsql")
            .with_dialer(self.client_tls.clone())
    }

    /// A client of one node only.
    pub fn client_of(&self, id: u64) -> Client {
        Client::new(vec![self.addr(id)], "raftsql").with_dialer(self.client_tls.clone())
    }

    pub fn status(&self, id: u64, digests: bool) -> Option<raftsql_proto::v1::StatusResponse> {
        self.rt
            .block_on(Client::status_of_with(
                &self.client_tls,
                self.addr(id),
                "raftsql",
                digests,
            ))
            .ok()
    }

    /// Waits until a running node reports itself leader; returns its id.
    pub fn wait_leader(&self, timeout: Duration) -> u64 {
        try_wait_for(timeout, || {
            self.running()
                .into_iter()
                .find(|id| self.status(*id, false).is_some_and(|s| s.role == "leader"))
        })
        .unwrap_or_else(|| panic!("no leader within {timeout:?}\n{}", self.logs()))
    }

    /// Waits until every running node has applied the same index and (if `digests`) has
    /// byte-identical databases; returns the digests.
    pub fn wait_converged(&self, timeout: Duration) -> std::collections::HashMap<String, String> {
        let mut last = String::new();
        let converged = try_wait_for(timeout, || {
            let st: Vec<_> = self
                .running()
                .into_iter()
                .map(|id| self.status(id, true))
                .collect();
            if st.iter().all(|s| s.is_some()) {
                let st: Vec<_> = st.into_iter().map(|s| s.unwrap()).collect();
                let applied_same = st.iter().all(|s| {
                    s.applied_index == st[0].applied_index && s.commit_index == s.applied_index
                });
                let digests_same = st.iter().all(|s| s.db_digests == st[0].db_digests);
                if applied_same && digests_same {
                    return Some(st[0].db_digests.clone());
                }
                last = format!(
                    "{:?}",
                    st.iter()
                        .map(|s| (s.id, s.applied_index, s.commit_index, s.db_digests.clone()))
                        .collect::<Vec<_>>()
                );
            }
            None
        });
        converged.unwrap_or_else(|| {
            panic!(
                "nodes did not converge within {timeout:?}: {last}\n{}",
                self.logs()
            )
        })
    }

    /// Runs `PRAGMA integrity_check` on database `db` of every running node (on what it has
    /// applied); panics with the first problem found.
    pub fn check_integrity(&self, db: &str) {
        for id in self.running() {
            let rows = self
                .rt
                .block_on(self.client_of(id).query_with(
                    db,
                    "PRAGMA integrity_check",
                    vec![],
                    Consistency::Local,
                ))
                .unwrap_or_else(|e| panic!("integrity check of {db} on node {id}: {e}"));
            let first = format!("{:?}", rows.rows.first().and_then(|r| r.first()));
            assert!(
                first.contains("\"ok\""),
                "database {db} on node {id} is damaged: {:?}",
                rows.rows
            );
        }
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            let t = self.log_text(n.id);
            let tail: Vec<&str> = t.lines().rev().take(30).collect();
            s += &format!("--- node {} log (last 30 lines) ---\n", n.id);
            for l in tail.into_iter().rev() {
                s += l;
                s += "\n";
            }
        }
        s
    }

    /// Creates table `t(k INTEGER PRIMARY KEY, v TEXT)` in `main` and writes `rows` rows
    /// ("row 0", "row 1", ...), one acknowledged transaction each.
    pub fn seed_rows(&self, rows: usize) {
        self.seed_rows_with(&self.client(), rows);
    }

    /// [`Cluster::seed_rows`] through client `c` (e.g. a follower's).
    pub fn seed_rows_with(&self, c: &Client, rows: usize) {
        self.rt.block_on(async {
            c.execute(
                "main",
                "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)",
                vec![],
            )
            .await
            .unwrap();
            for i in 0..rows {
                c.execute(
                    "main",
                    "INSERT INTO t(v) VALUES (?1)",
                    vec![format!("row {i}").into()],
                )
                .await
                .unwrap();
            }
        });
    }

    /// A connection to node `to` whose hello says it comes from node `from` (what a member
    /// sends; without TLS nothing proves it), with the harness's client TLS.
    pub async fn connect_as(&self, from: u64, to: u64) -> raftsql_core::fuzzing::RpcConn {
        raftsql_core::fuzzing::RpcConn::connect(
            &self.client_tls,
            raftsql_core::tls::Peer::Endpoint,
            self.addr(to),
            from,
            "raftsql",
            None,
        )
        .await
        .unwrap()
    }

    /// Count of rows from `sql` on one node's applied state.
    pub fn local_count(&self, id: u64, db: &str, sql: &str) -> i64 {
        let c = self.client_of(id);
        let rows = self
            .rt
            .block_on(c.query_with(db, sql, vec![], Consistency::Local))
            .expect("local query");
        match rows.rows[0][0] {
            Value::Integer(i) => i,
            ref v => panic!("not a count: {v:?}"),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(p) = n.proc.take() {
                // A paused node is killed too (SIGKILL ends a stopped process).
                p.kill();
            }
        }
        if std::thread::panicking() || std::env::var_os("RAFTSQL_KEEP_TEST_DATA").is_some() {
            // Keep the data and logs of a failed test (or of any, on request) for inspection.
            let p = self.dir.path().to_path_buf();
            eprintln!("test data kept in {}", p.display());
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().unwrap(),
            ));
        }
    }
}

/// `RAFTSQL_TEST_NODE_ARGS`: more arguments for every node of every cluster, space-separated,
/// after the test's own (a flag the test gives too is refused by the node as given twice),
/// e.g. `--checkpoint-frames 32` to run a workload with a checkpoint every few writes.
fn extra_node_args() -> Vec<String> {
    std::env::var("RAFTSQL_TEST_NODE_ARGS")
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}
