//! `raftsql node`: run one node (and its etcd facade) until SIGTERM or Ctrl-C.

use std::time::Duration;

use raftsql_core::{Node, NodeConfig};

use crate::{CliResult, NodeArgs};

pub(crate) async fn run_node(a: NodeArgs) -> CliResult {
    run_node_with(a, None).await
}

/// Runs a node; `joined` is the answer of a join (`raftsql join`) for a new member.
pub(crate) async fn run_node_with(
    mut a: NodeArgs,
    joined: Option<raftsql_core::members::JoinTicket>,
) -> CliResult {
    if a.voters.is_multiple_of(2) {
        return Err(format!("--voters {}: must be odd", a.voters));
    }
    let stored_node = raftsql_core::stored_node(&a.data_dir).map_err(|e| e.to_string())?;
    if let Some(s) = &stored_node {
        // A node that left, or another node's id: refused by `Node::start` (before TLS).
        if let Some(c) = a.cluster.as_ref().filter(|c| **c != s.cluster) {
            return Err(format!(
                "data directory {} belongs to node {} of cluster {:?}, not {c:?}: drop --cluster \
                 (it is read from the directory), or give the data directory of a node of {c:?}",
                a.data_dir.display(),
                s.id,
                s.cluster
            ));
        }
        if let Some(known) = s
            .addr
            .filter(|k| *k != a.listen && !a.listen.ip().is_unspecified())
        {
            eprintln!(
                "raftsql: warning: node {} is known to its peers at {known}, but --listen is {}: \
                 they will not reach it unless that address leads here (to move a node, \
                 `raftsql remove-node {}` and join it again at the new address)",
                s.id, a.listen, s.id
            );
        }
    }
    let stored = stored_node.as_ref().map(|s| s.id);
    let id = match (a.id, stored, &joined) {
        (_, _, Some(t)) => t.id,
        (Some(id), _, None) => id,
        (None, Some(id), None) => id,
        (None, None, None) => {
            return Err(format!(
                "{} holds no node yet: give --id and --bootstrap-peers to form a new cluster, \
                 or use `raftsql join` to join one",
                a.data_dir.display()
            ))
        }
    };
    a.id = Some(id);
    let mut cfg = NodeConfig::new(id, a.data_dir.clone(), a.listen);
    if let Some(t) = &joined {
        cfg.peers = t.peers.clone();
        cfg.cluster = t.cluster.clone();
        cfg.join = true;
    } else {
        if let Some(p) = &a.bootstrap_peers {
            cfg.peers =
                raftsql_core::parse_peers(p).map_err(|e| format!("--bootstrap-peers: {e}"))?;
        }
        cfg.cluster = match (&a.cluster, &stored_node) {
            (Some(c), _) => c.clone(),
            (None, Some(s)) => s.cluster.clone(),
            (None, None) => "raftsql".into(),
        };
    }
    cfg.domain = a.domain.clone();
    cfg.weight = a.weight;
    cfg.targets = raftsql_core::Targets {
        voters: a.voters,
        standbys: a.standbys,
    };
    cfg.offline_after = a.offline_after;
    cfg.tick = Duration::from_millis(a.tick_ms.max(1));
    cfg.checkpoint_frames = a.checkpoint_frames.max(1);
    cfg.compact_log_bytes = a.compact_log_bytes;
    if a.max_request_bytes < 1024 || a.max_request_bytes > raftsql_core::MAX_FRAME {
        return Err(format!(
            "--max-request-bytes must be between 1024 and {}",
            raftsql_core::MAX_FRAME
        ));
    }
    cfg.max_request_bytes = a.max_request_bytes;
    cfg.max_result_bytes = a.max_result_bytes;
    if a.statement_timeout.is_zero() {
        return Err("--statement-timeout must be more than 0".into());
    }
    cfg.statement_timeout = a.statement_timeout;
    let tls_dir = a.data_dir.join("tls");
    let peer_tls = a.peer_tls
        || a.peer_ca_dir.is_some()
        || joined.as_ref().is_some_and(|t| t.tls.is_some())
        || tls_dir.exists();
    if a.client_cert_auth && a.trusted_ca_file.is_none() && !peer_tls {
        return Err(
            "--client-cert-auth needs --trusted-ca-file (or peer TLS, whose CA is trusted)".into(),
        );
    }
    cfg.tls = raftsql_core::tls::TlsSettings {
        peer_tls: a.peer_tls,
        ca_dir: a.peer_ca_dir.clone(),
        joined: joined.as_ref().and_then(|t| t.tls.clone()),
        client: raftsql_core::tls::ClientFacing {
            cert_file: a.cert_file.clone(),
            key_file: a.key_file.clone(),
            trusted_ca_file: a.trusted_ca_file.clone(),
            client_cert_auth: a.client_cert_auth,
        },
    };
    if a.cert_file.is_some() && !peer_tls {
        eprintln!(
            "raftsql: note: --cert-file serves the etcd API; SQL clients on --listen get TLS \
             only with peer TLS (--peer-tls or --peer-ca-dir)"
        );
    }
    let cluster_id = cluster_id(&cfg.cluster);
    let backups = a
        .backup_dir
        .as_ref()
        .map(|dir| raftsql_core::backup_schedule::BackupSchedule {
            dir: dir.clone(),
            every: a.backup_every,
            keep: a.backup_keep,
        });
    if let Some(s) = &backups {
        s.check()
            .map_err(|e| format!("--backup-dir {}: {e}", s.dir.display()))?;
    }
    let node = Node::start(cfg).await.map_err(|e| e.to_string())?;
    if let Some(t) = &joined {
        // Only now: the node has stored its id and, with peer TLS, its key and certificates,
        // so a data directory that saw this line restarts as this member.
        eprintln!(
            "raftsql: joined cluster {:?} as node {} (a spare; the leader assigns its role)",
            t.cluster, t.id
        );
    }
    if let Some(schedule) = backups {
        let dir = schedule.dir.clone();
        raftsql_core::backup_schedule::spawn(&node, schedule)
            .map_err(|e| format!("--backup-dir {}: {e}", dir.display()))?;
        eprintln!(
            "raftsql: node {id} saves a backup into {} every {} (keeping {})",
            dir.display(),
            humantime::format_duration(a.backup_every),
            a.backup_keep
        );
    }
    // The etcd API: --cert-file if given; with peer TLS, the node certificate otherwise
    // (clients verify it with the cluster CA, tls/ca.crt).
    let etcd_tls = match (&a.cert_file, &a.key_file) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone(), a.trusted_ca_file.clone())),
        _ if peer_tls => Some((
            tls_dir.join("node.crt"),
            tls_dir.join("node.key"),
            Some(
                a.trusted_ca_file
                    .clone()
                    .unwrap_or_else(|| tls_dir.join("ca.crt")),
            ),
        )),
        _ => None,
    };
    let tls = match etcd_tls {
        Some((cert_file, key_file, trusted_ca_file)) => Some(
            raftsql_etcd::TlsFiles {
                cert_file,
                key_file,
                trusted_ca_file,
                client_cert_auth: a.client_cert_auth,
            }
            .load()
            .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    eprintln!(
        "raftsql: node {} listening on {}{} (data in {})",
        id,
        a.listen,
        if peer_tls {
            " with TLS (peers mutually authenticated)"
        } else {
            ""
        },
        a.data_dir.display()
    );
    let (stop_etcd, etcd_stopped) = tokio::sync::oneshot::channel::<()>();
    let etcd = if let Some(addr) = a.etcd_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--etcd-listen {addr}: {e}"))?;
        eprintln!(
            "raftsql: node {} serves the etcd v3 API on {}://{addr}{}",
            id,
            if tls.is_some() { "https" } else { "http" },
            if a.client_cert_auth {
                " (client certificates required)"
            } else {
                ""
            }
        );
        let advertise_client_urls = if a.advertise_client_urls.is_empty() {
            vec![format!(
                "{}://{addr}",
                if tls.is_some() { "https" } else { "http" }
            )]
        } else {
            a.advertise_client_urls.clone()
        };
        let options = raftsql_etcd::EtcdOptions {
            progress_notify_interval: a.watch_progress_notify_interval,
            advertise_client_urls,
        };
        let store = raftsql_etcd::EtcdStore::with_options(node.clone(), cluster_id, options);
        Some(tokio::spawn(raftsql_etcd::serve_listener_tls(
            listener,
            store,
            tls,
            async move {
                let _ = etcd_stopped.await;
            },
        )))
    } else {
        None
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    let mut departed = node.departed();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => eprintln!("raftsql: stopping node {id}"),
        _ = term.recv() => eprintln!("raftsql: stopping node {id}"),
        d = departed.wait_for(|d| d.is_some()) => {
            let why = d.map(|d| d.clone().unwrap_or_default()).unwrap_or_default();
            eprintln!("raftsql: {why}; stopping (this data directory will not start again)");
            // The answer to the `leave` that got us here is still on its way out (the
            // connection's writer task, a TLS flush): let it go before the process ends, or
            // the CLI sees the connection drop and reports a leave that succeeded as failed.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let _ = stop_etcd.send(());
    if let Some(t) = etcd {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    node.shutdown().await;
    Ok(())
}

/// A stable 64-bit cluster id for etcd headers, from the cluster name (FNV-1a).
pub(crate) fn cluster_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}
