//! `raftsql dev`: a local cluster of child processes for trying raftsql out, until Ctrl-C.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use raftsql_core::tls::Dialer;
use raftsql_core::Client;

use crate::launch::LocalCluster;
use crate::{CliResult, DevArgs};

pub(crate) fn run_dev(a: DevArgs) -> CliResult {
    if a.nodes == 0 {
        return Err("--nodes must be at least 1".into());
    }
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let dir = a
        .dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let addrs: Vec<String> = (0..a.nodes)
        .map(|i| format!("{}:{}", a.host, a.base_port + i as u16))
        .collect();
    let peers: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, ad)| format!("{}={ad}", i + 1))
        .collect();
    let peers = peers.join(",");
    // With --tls: one CA for the cluster, and a client certificate for the user.
    let (ca_dir, client_crt, client_key) = (
        dir.join("ca"),
        dir.join("client.crt"),
        dir.join("client.key"),
    );
    let mut tls_args: Vec<String> = Vec::new();
    let mut dialer = Dialer::Plain;
    if a.tls {
        use raftsql_core::tls::ClusterCa;
        let ca = if ca_dir.join("ca.key").exists() {
            ClusterCa::load(&ca_dir)
        } else {
            ClusterCa::generate("raftsql").and_then(|ca| ca.save(&ca_dir).map(|_| ca))
        }
        .map_err(|e| e.to_string())?;
        if !client_crt.exists() {
            ca.issue_client("raftsql dev user", &client_crt, &client_key)
                .map_err(|e| e.to_string())?;
        }
        tls_args = vec![
            "--peer-ca-dir".into(),
            ca_dir.display().to_string(),
            "--client-cert-auth".into(),
        ];
        dialer = Dialer::client(&ca_dir.join("ca.crt"), Some((&client_crt, &client_key)))
            .map_err(|e| e.to_string())?;
    }
    let args: Vec<Vec<String>> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let id = i + 1;
            let mut v: Vec<String> = vec![
                "node".into(),
                "--id".into(),
                id.to_string(),
                "--listen".into(),
                addr.clone(),
                "--bootstrap-peers".into(),
                peers.clone(),
                "--etcd-listen".into(),
                format!("{}:{}", a.host, etcd_port(id)),
            ];
            v.extend(tls_args.iter().cloned());
            v.push("--data-dir".into());
            v.push(dir.join(format!("node{id}")).display().to_string());
            v
        })
        .collect();
    let mut nodes = LocalCluster::new(dir.clone(), LocalCluster::this_exe()?, args);
    nodes.start_all()?;
    let endpoints = addrs.join(",");
    println!(
        "raftsql dev cluster: {} nodes, data and logs under {}",
        a.nodes,
        dir.display()
    );
    for (i, addr) in addrs.iter().enumerate() {
        println!(
            "  node {}: {addr}  etcd {}:{}  (log: {})",
            i + 1,
            a.host,
            etcd_port(i + 1),
            dir.join(format!("node{}.log", i + 1)).display()
        );
    }
    // Wait for a leader so the printed commands work right away.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sockaddrs: Vec<SocketAddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
    let started = Instant::now();
    let leader = rt.block_on(async {
        while started.elapsed() < Duration::from_secs(20) {
            for a in &sockaddrs {
                if let Ok(s) = Client::status_of_with(&dialer, *a, "raftsql", false).await {
                    if s.leader_id != 0 {
                        return Some(s.leader_id);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    });
    match leader {
        Some(l) => println!(
            "leader: node {l} (elected in {:.1}s)",
            started.elapsed().as_secs_f64()
        ),
        None => println!("no leader yet: see the node logs"),
    }
    let (flags, etcd_flags, scheme) = if a.tls {
        let files = format!(
            "--cacert {} --cert {} --key {}",
            ca_dir.join("ca.crt").display(),
            client_crt.display(),
            client_key.display()
        );
        (format!(" {files}"), format!(" {files}"), "https://")
    } else {
        (String::new(), String::new(), "")
    };
    println!("\nTry:\n  raftsql sql --endpoints {endpoints}{flags} -e \"CREATE TABLE t(k TEXT PRIMARY KEY, v TEXT)\"");
    println!("  raftsql sql --endpoints {endpoints}{flags} -e \"INSERT INTO t VALUES('hello', 'world')\"");
    println!("  raftsql sql --endpoints {endpoints}{flags} -e \"SELECT * FROM t\"");
    println!("  raftsql status --endpoints {endpoints}{flags}");
    let etcd_eps: Vec<String> = (1..=addrs.len())
        .map(|i| format!("{scheme}{}:{}", a.host, etcd_port(i)))
        .collect();
    println!(
        "  etcdctl --endpoints {}{etcd_flags} put foo bar",
        etcd_eps.join(",")
    );
    println!("(through cargo: cargo run -p raftsql-cli -- sql ...). Ctrl-C stops the cluster.");
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs a handler that only stores to an atomic (async-signal-safe); the
        // loop below does the work.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    loop {
        std::thread::sleep(DEV_POLL);
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        for (i, st) in nodes.exited() {
            eprintln!("raftsql dev: node {} exited ({st}); see its log", i + 1);
        }
        if nodes.running() == 0 {
            return Err("every node exited".into());
        }
    }
    println!("\nstopping the cluster...");
    nodes.stop_all();
    println!("stopped; data kept in {}", dir.display());
    Ok(())
}

/// etcd client port of dev node `id`: 2379, 22379, 32379, ... (etcd's own local convention).
pub(crate) fn etcd_port(id: usize) -> u16 {
    match id {
        1 => 2379,
        2..=6 => (id * 10000 + 2379) as u16,
        _ => (2379 + 2 * id) as u16,
    }
}

/// Set by SIGINT or SIGTERM: the dev cluster stops.
static STOP: AtomicBool = AtomicBool::new(false);

/// How often `raftsql dev` looks at its nodes and the stop flag.
const DEV_POLL: Duration = Duration::from_millis(200);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}
