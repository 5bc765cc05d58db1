//! The `raftsql` command line: run a node, a local development cluster, SQL and status.
//!
//! The binary (`main.rs`) only calls [`main`]; integration tests run the same code through
//! their own binary target.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

pub mod backup;
pub mod bench;
pub mod bench_etcd;
pub mod bench_failover;
pub mod bench_soak;
pub mod cluster;
use raftsql_core::tls::Dialer;
use raftsql_core::{Client, Node, NodeConfig, Value};

/// TLS for commands that talk to a cluster (etcdctl's flags): without `--cacert`, plain TCP.
#[derive(Args, Debug, Clone, Default)]
pub struct ClientTls {
    /// Verify the nodes with these CA certificates (PEM), e.g. a node's `tls/ca.crt`; turns
    /// TLS on.
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// Present this client certificate (PEM; for --client-cert-auth nodes).
    #[arg(long, requires = "key", requires = "cacert")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// How to connect: plain TCP, or TLS with these files.
    pub fn dialer(&self) -> Result<Dialer, String> {
        match &self.cacert {
            None => Ok(Dialer::Plain),
            Some(ca) => {
                let ck = match (&self.cert, &self.key) {
                    (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                    _ => None,
                };
                Dialer::client(ca, ck).map_err(|e| e.to_string())
            }
        }
    }
}

/// `raftsql ca`: the cluster CA for peer TLS.
#[derive(Subcommand, Debug)]
enum CaCmd {
    /// Create a cluster CA in DIR (ca.crt, ca.key; owner-only) for `--peer-ca-dir`, and
    /// print its fingerprint.
    Init {
        /// The directory to create.
        dir: PathBuf,
        /// The cluster's name (shown in the CA's name).
        #[arg(long, default_value = "raftsql")]
        cluster: String,
    },
    /// Issue a client certificate signed by the cluster CA in --ca-dir (for clients of
    /// nodes run with --client-cert-auth).
    ClientCert {
        /// The CA directory (`ca init`'s, or a node's `tls/`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// The client's name (the certificate's common name).
        #[arg(long)]
        name: String,
        /// Writes OUT.crt and OUT.key (owner-only).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Replicated SQLite over Raft.
#[derive(Parser, Debug)]
#[command(
    name = "raftsql",
    version,
    about = "Raft-replicated SQLite: run nodes, a local cluster, SQL and status"
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

const NODE_EXAMPLES: &str = "\
Examples:
  a new 3-node cluster (on each machine, its own --id and --listen):
    raftsql node --id 1 --listen 10.0.0.1:7001 --data-dir /var/lib/raftsql \\
      --bootstrap-peers 1=10.0.0.1:7001,2=10.0.0.2:7001,3=10.0.0.3:7001
  restart a node (id, cluster and peers are read from the data directory):
    raftsql node --data-dir /var/lib/raftsql --listen 10.0.0.1:7001
  add a machine: `raftsql add-node` on a member prints ADDR/TOKEN, then on the new one:
    raftsql join ADDR/TOKEN --data-dir /var/lib/raftsql --listen 10.0.0.4:7001
  see the cluster (roles, lag, last leader and role changes): raftsql cluster show
  lost a majority for good: raftsql recover --data-dir ... --dry-run (see the README)";

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one node in the foreground (Ctrl-C or SIGTERM stops it cleanly).
    #[command(after_help = NODE_EXAMPLES)]
    Node(NodeArgs),
    /// Start a local 3-node cluster as child processes and keep it running until Ctrl-C.
    Dev(DevArgs),
    /// Run SQL against a cluster.
    Sql(SqlArgs),
    /// The cluster in short: running, high-availability, voter/standby/spare nodes.
    Status(cluster::StatusArgs),
    /// Each node's Raft status (term, commit, applied, log, optionally database digests).
    RaftStatus(StatusArgs),
    /// Print the command that joins a new node (with a fresh token).
    AddNode(cluster::AddNodeArgs),
    /// Join a cluster with what `add-node` printed, then run this node in the foreground.
    Join(cluster::JoinArgs),
    /// Make a node leave the cluster: it hands over leadership and its role, then stops.
    Leave(cluster::LeaveArgs),
    /// Remove a node that stopped (--force: one that is still running or crashed for good).
    RemoveNode(cluster::RemoveNodeArgs),
    /// Cluster membership.
    Cluster {
        #[command(subcommand)]
        what: ClusterCmd,
    },
    /// Backups: save a consistent copy of the cluster, restore one into a new cluster.
    Snapshot {
        #[command(subcommand)]
        what: backup::SnapshotCmd,
    },
    /// Disaster recovery after losing a quorum for good: make this stopped node the only
    /// voter, keeping its committed state.
    Recover(backup::RecoverArgs),
    /// The cluster CA for TLS between nodes.
    Ca {
        #[command(subcommand)]
        what: CaCmd,
    },
    /// Load generators.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// One row per node: id, address, role, leader, reachable, applied index, lag, domain.
    Show(cluster::ShowArgs),
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// dqlite-benchmark's key/value workloads against a running cluster; prints one JSON line.
    Sql(BenchSqlArgs),
    /// Put / range / kube-style txn load against any etcd v3 endpoint; prints one JSON line.
    Etcd(bench_etcd::BenchEtcdArgs),
    /// Leader failover and standby promotion times over many trials (runs its own cluster).
    Failover(bench_failover::BenchFailoverArgs),
    /// Minutes of mixed SQL and kube-shaped etcd load on a cluster of its own, sampling every
    /// node's memory, WAL and Raft log; writes soak.csv and soak.svg, prints one JSON line.
    Soak(bench_soak::BenchSoakArgs),
}

#[derive(Args, Debug)]
struct BenchSqlArgs {
    /// Nodes to contact: HOST:PORT[,HOST:PORT...].
    #[arg(long, default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003")]
    endpoints: String,
    /// Concurrent workers.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Clients the workers share, round robin (each a multiplexed connection per node;
    /// default: one per worker, as dqlite-benchmark does). `--clients 1`: every worker on one
    /// shared client.
    #[arg(long)]
    clients: Option<usize>,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Key size in bytes.
    #[arg(long, default_value_t = 32)]
    key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 1024)]
    value_size: usize,
    /// kvwrite (all INSERT OR REPLACE) or kvreadwrite (half reads).
    #[arg(long, default_value = "kvwrite")]
    workload: String,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Database.
    #[arg(long, default_value = "bench")]
    db: String,
    /// Cluster name.
    #[arg(long, default_value = "raftsql")]
    cluster: String,
    #[command(flatten)]
    tls: ClientTls,
}

#[derive(Args, Debug)]
struct NodeArgs {
    /// Directory for the Raft log, databases and snapshots.
    #[arg(long)]
    data_dir: PathBuf,
    /// Address for peers and clients, e.g. 127.0.0.1:7001.
    #[arg(long)]
    listen: SocketAddr,
    /// This node's id (1, 2, ...); read from the data directory once it exists.
    #[arg(long)]
    id: Option<u64>,
    /// Every member of a new cluster: 1=HOST:PORT,2=HOST:PORT,... (ignored on restart).
    #[arg(long)]
    bootstrap_peers: Option<String>,
    /// This node's failure domain (e.g. a rack or zone): promotions prefer domains that are
    /// not represented yet.
    #[arg(long, default_value = "", help_heading = "Roles")]
    domain: String,
    /// This node's weight: lower is preferred for promotion.
    #[arg(long, default_value_t = 0, help_heading = "Roles")]
    weight: u32,
    /// Voters the cluster keeps (odd), applied while this node leads.
    #[arg(long, default_value_t = 3, help_heading = "Roles")]
    voters: usize,
    /// Standbys the cluster keeps, applied while this node leads.
    #[arg(long, default_value_t = 3, help_heading = "Roles")]
    standbys: usize,
    /// A member that has not answered the leader for this long counts as offline (and a
    /// voter is then replaced).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration, help_heading = "Roles")]
    offline_after: Duration,
    /// Cluster name; nodes of other clusters are refused (default: the name stored in the
    /// data directory, or "raftsql" for a new cluster).
    #[arg(long)]
    cluster: Option<String>,
    /// Raft tick in milliseconds (election timeout is 10 ticks, heartbeat 2).
    #[arg(long, default_value_t = 50, help_heading = "Storage and Raft")]
    tick_ms: u64,
    /// Checkpoint the WAL into the database files after this many pages.
    #[arg(long, default_value_t = 4000, help_heading = "Storage and Raft")]
    checkpoint_frames: u64,
    /// Compact the Raft log once it exceeds this many bytes.
    #[arg(long, default_value_t = 64 << 20, help_heading = "Storage and Raft")]
    compact_log_bytes: u64,
    /// Largest request a SQL client may send, in bytes (larger ones close its connection).
    #[arg(long, default_value_t = raftsql_core::DEFAULT_MAX_CLIENT_FRAME, help_heading = "Limits")]
    max_request_bytes: usize,
    /// Largest query result answered, in bytes (a larger one is an error asking for LIMIT).
    #[arg(long, default_value_t = raftsql_core::DEFAULT_MAX_RESULT_BYTES, help_heading = "Limits")]
    max_result_bytes: usize,
    /// The longest a client's SQL statement may run (a query, or one write request's
    /// statements, which every other write waits for) before it is interrupted.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, help_heading = "Limits")]
    statement_timeout: Duration,
    /// Serve the etcd v3 API (gRPC) on this address, e.g. 127.0.0.1:2379.
    #[arg(long, help_heading = "etcd API")]
    etcd_listen: Option<SocketAddr>,
    /// The etcd client URLs this node advertises in MemberList, comma-separated (etcd's flag;
    /// default: http(s)://<--etcd-listen>, which is only right if that address is reachable
    /// by clients, e.g. not 0.0.0.0).
    #[arg(long, value_delimiter = ',', help_heading = "etcd API")]
    advertise_client_urls: Vec<String>,
    /// Mutually authenticated TLS between nodes (and TLS for clients). A new single-node
    /// cluster creates its CA in <data-dir>/tls; bootstrap nodes of a larger one need
    /// --peer-ca-dir. A data directory with tls/ always runs TLS.
    #[arg(long, help_heading = "TLS")]
    peer_tls: bool,
    /// The cluster CA made by `raftsql ca init` (implies --peer-tls); the node issues its
    /// own certificate from it. Needed by every bootstrap node of a multi-node TLS cluster.
    #[arg(long, help_heading = "TLS")]
    peer_ca_dir: Option<PathBuf>,
    /// Serve clients over TLS with this certificate chain (PEM); needs --key-file. Applies
    /// to the etcd API, and with peer TLS to SQL clients too (which otherwise get the node
    /// certificate).
    #[arg(long, requires = "key_file", help_heading = "TLS")]
    cert_file: Option<PathBuf>,
    /// The private key (PEM) of --cert-file.
    #[arg(long, requires = "cert_file", help_heading = "TLS")]
    key_file: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates are verified against (with peer TLS,
    /// the cluster CA is trusted too).
    #[arg(long, help_heading = "TLS")]
    trusted_ca_file: Option<PathBuf>,
    /// Refuse clients without a verified certificate (needs --trusted-ca-file or peer TLS).
    #[arg(long, help_heading = "TLS")]
    client_cert_auth: bool,
    /// How long an etcd watch that asked for progress notifications may stay silent before
    /// it gets one (e.g. 10m, 5s, 500ms).
    #[arg(
        long,
        alias = "experimental-watch-progress-notify-interval",
        default_value = "10m",
        value_parser = humantime::parse_duration, help_heading = "etcd API")]
    watch_progress_notify_interval: Duration,
    /// Save a backup of this node's databases into DIR on a schedule (every node given the
    /// flag keeps its own). `raftsql snapshot list DIR` checks them; `raftsql snapshot
    /// restore DIR` restores the newest that checks out.
    #[arg(long, value_name = "DIR", help_heading = "Scheduled backups")]
    backup_dir: Option<PathBuf>,
    /// Time between two scheduled backups (e.g. 12h, 30m, 10s).
    #[arg(long, default_value = "12h", value_parser = humantime::parse_duration, help_heading = "Scheduled backups")]
    backup_every: Duration,
    /// How many scheduled backups of this node to keep (older ones are deleted once a new one
    /// has been checked).
    #[arg(long, default_value_t = 5, help_heading = "Scheduled backups")]
    backup_keep: usize,
}

#[derive(Args, Debug)]
struct DevArgs {
    /// Where the nodes keep their data (default: ./raftsql-dev).
    #[arg(long, default_value = "raftsql-dev")]
    dir: PathBuf,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Port of node 1; node N listens on base-port + N - 1.
    #[arg(long, default_value_t = 7001)]
    base_port: u16,
    /// Host to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Run with TLS everywhere: a cluster CA, mutually authenticated nodes, and clients
    /// (SQL and etcd) that must present the client certificate written next to the data.
    #[arg(long)]
    tls: bool,
}

#[derive(Args, Debug)]
struct SqlArgs {
    /// Nodes to contact: HOST:PORT[,HOST:PORT...].
    #[arg(long, default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003")]
    endpoints: String,
    /// Database name.
    #[arg(long, default_value = "main")]
    db: String,
    /// SQL to run (otherwise statements are read from standard input, one per line).
    #[arg(short = 'e', long)]
    execute: Option<String>,
    /// Print rows as JSON lines.
    #[arg(long)]
    json: bool,
    /// Read from the contacted node's applied state, however old, instead of a linearizable
    /// read (etcd's --consistency=s).
    #[arg(long, conflicts_with = "max_staleness")]
    local: bool,
    /// Accept reads up to this stale (e.g. 500ms, 2s): served without a round trip to the
    /// leader when the node confirmed its state within that long, else linearizable.
    #[arg(long, value_parser = humantime::parse_duration)]
    max_staleness: Option<std::time::Duration>,
    /// Cluster name.
    #[arg(long, default_value = "raftsql")]
    cluster: String,
    #[command(flatten)]
    tls: ClientTls,
}

impl SqlArgs {
    /// The read consistency the flags ask for.
    fn consistency(&self) -> raftsql_core::Consistency {
        match (self.local, self.max_staleness) {
            (true, _) => raftsql_core::Consistency::Local,
            (false, Some(d)) => raftsql_core::Consistency::Bounded(d),
            (false, None) => raftsql_core::Consistency::Linearizable,
        }
    }
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Nodes to ask: HOST:PORT[,HOST:PORT...].
    #[arg(long, default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003")]
    endpoints: String,
    /// Also compute a digest of every database (reads every page).
    #[arg(long)]
    digests: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Cluster name.
    #[arg(long, default_value = "raftsql")]
    cluster: String,
    #[command(flatten)]
    tls: ClientTls,
}

/// Entry point of the `raftsql` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let r = rt.block_on(async move {
        match cli.cmd {
            Cmd::Node(a) => run_node(a).await,
            Cmd::Dev(a) => tokio::task::spawn_blocking(move || run_dev(a))
                .await
                .unwrap(),
            Cmd::Sql(a) => run_sql(a).await,
            Cmd::Status(a) => cluster::status(a).await,
            Cmd::RaftStatus(a) => run_status(a).await,
            Cmd::AddNode(a) => cluster::add_node(a).await,
            Cmd::Join(a) => cluster::join(a).await,
            Cmd::Leave(a) => cluster::leave(a).await,
            Cmd::RemoveNode(a) => cluster::remove_node(a).await,
            Cmd::Cluster {
                what: ClusterCmd::Show(a),
            } => cluster::show(a).await,
            Cmd::Snapshot { what } => backup::snapshot(what).await,
            Cmd::Recover(a) => backup::recover(a),
            Cmd::Ca { what } => run_ca(what),
            Cmd::Bench {
                what: BenchCmd::Sql(a),
            } => run_bench_sql(a).await,
            Cmd::Bench {
                what: BenchCmd::Etcd(a),
            } => bench_etcd::main(a).await,
            Cmd::Bench {
                what: BenchCmd::Failover(a),
            } => bench_failover::main(a).await,
            Cmd::Bench {
                what: BenchCmd::Soak(a),
            } => bench_soak::main(a).await,
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raftsql: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RAFTSQL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

type CliResult = Result<(), String>;

async fn run_node(a: NodeArgs) -> CliResult {
    run_node_with(a, None).await
}

/// Runs a node; `joined` is the answer of a join (`raftsql join`) for a new member.
pub(crate) async fn run_node_with(
    mut a: NodeArgs,
    joined: Option<raftsql_core::members::JoinTicket>,
) -> CliResult {
    if a.voters % 2 == 0 {
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
        )
        .into());
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

fn run_ca(c: CaCmd) -> CliResult {
    use raftsql_core::tls::ClusterCa;
    match c {
        CaCmd::Init { dir, cluster } => {
            if dir.join("ca.key").exists() || dir.join("ca.crt").exists() {
                return Err(format!(
                    "{} already holds a CA: not replacing it",
                    dir.display()
                ));
            }
            let ca = ClusterCa::generate(&cluster).map_err(|e| e.to_string())?;
            ca.save(&dir).map_err(|e| e.to_string())?;
            println!(
                "cluster CA written to {} (ca.crt, ca.key; owner-only)",
                dir.display()
            );
            println!("fingerprint (SHA-256): {}", ca.fingerprint_hex());
            println!(
                "start every bootstrap node with --peer-ca-dir {}; keep ca.key secret (every \
                 member keeps a copy in its data directory's tls/)",
                dir.display()
            );
            Ok(())
        }
        CaCmd::ClientCert { ca_dir, name, out } => {
            let ca = ClusterCa::load(&ca_dir).map_err(|e| e.to_string())?;
            let (c, k) = (out.with_extension("crt"), out.with_extension("key"));
            ca.issue_client(&name, &c, &k).map_err(|e| e.to_string())?;
            println!(
                "client certificate {} and key {} for {name:?}",
                c.display(),
                k.display()
            );
            Ok(())
        }
    }
}

/// A stable 64-bit cluster id for etcd headers, from the cluster name (FNV-1a).
fn cluster_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn run_dev(a: DevArgs) -> CliResult {
    if a.nodes == 0 {
        return Err("--nodes must be at least 1".into());
    }
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let dir = a
        .dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
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
    let mut tls_args: Vec<std::ffi::OsString> = Vec::new();
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
            ca_dir.clone().into(),
            "--client-cert-auth".into(),
        ];
        dialer = Dialer::client(&ca_dir.join("ca.crt"), Some((&client_crt, &client_key)))
            .map_err(|e| e.to_string())?;
    }
    let mut children: Vec<Child> = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let id = i + 1;
        let data = dir.join(format!("node{id}"));
        let log =
            std::fs::File::create(dir.join(format!("node{id}.log"))).map_err(|e| e.to_string())?;
        let child = Command::new(&exe)
            .args([
                "node",
                "--id",
                &id.to_string(),
                "--listen",
                addr,
                "--bootstrap-peers",
                &peers,
            ])
            .args(["--etcd-listen", &format!("{}:{}", a.host, etcd_port(id))])
            .args(&tls_args)
            .arg("--data-dir")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting node {id}: {e}"))?;
        children.push(child);
    }
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
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let s = stop.clone();
        // The handler only sets a flag; the loop below does the work.
        unsafe {
            STOP_FLAG = std::sync::Arc::as_ptr(&s);
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        for (i, c) in children.iter_mut().enumerate() {
            if let Ok(Some(st)) = c.try_wait() {
                eprintln!("raftsql dev: node {} exited ({st}); see its log", i + 1);
            }
        }
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        if children.is_empty() {
            return Err("every node exited".into());
        }
    }
    println!("\nstopping the cluster...");
    for c in &children {
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    for mut c in children {
        let _ = c.wait();
    }
    println!("stopped; data kept in {}", dir.display());
    Ok(())
}

/// etcd client port of dev node `id`: 2379, 22379, 32379, ... (etcd's own local convention).
fn etcd_port(id: usize) -> u16 {
    match id {
        1 => 2379,
        2..=6 => (id * 10000 + 2379) as u16,
        _ => (2379 + 2 * id) as u16,
    }
}

static mut STOP_FLAG: *const std::sync::atomic::AtomicBool = std::ptr::null();
extern "C" fn on_signal(_: libc::c_int) {
    unsafe {
        if !STOP_FLAG.is_null() {
            (*STOP_FLAG).store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

fn parse_endpoints(s: &str) -> Result<Vec<SocketAddr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse()
                .map_err(|_| format!("bad endpoint {p:?}: expected IP:PORT"))
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|v| {
            if v.is_empty() {
                Err("no endpoints given".into())
            } else {
                Ok(v)
            }
        })
}

fn is_query(sql: &str) -> bool {
    let w = sql
        .trim_start()
        .split(|c: char| c.is_whitespace() || c == '(')
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    matches!(w.as_str(), "SELECT" | "WITH" | "VALUES" | "EXPLAIN")
        || (w == "PRAGMA" && !sql.contains('='))
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => i.to_string(),
        Value::Real(f) => f.to_string(),
        Value::Text(s) => s.clone(),
        Value::Blob(b) => format!(
            "x'{}'",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        ),
    }
}

fn json_value(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Integer(i) => (*i).into(),
        Value::Real(f) => (*f).into(),
        Value::Text(s) => s.clone().into(),
        Value::Blob(b) => b
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
            .into(),
    }
}

async fn run_one(client: &Client, a: &SqlArgs, sql: &str) -> Result<(), String> {
    let stmts = raftsql_core::split_sql(sql);
    if stmts.len() > 1 {
        return run_several(client, a, stmts).await;
    }
    // A statement that starts like a query may still write (`WITH ... INSERT`): a read
    // connection refuses it (SQLITE_READONLY) without doing anything, so run it as a write.
    let read = if is_query(sql) {
        match client.query_with(&a.db, sql, vec![], a.consistency()).await {
            Err(raftsql_core::Error::Sql { code: 8, .. }) => None,
            r => Some(r.map_err(|e| e.to_string())?),
        }
    } else {
        None
    };
    if let Some(rows) = read {
        print_rows(a, &rows);
    } else {
        let r = client
            .execute(&a.db, sql, vec![])
            .await
            .map_err(|e| e.to_string())?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({"rows_affected": r.rows_affected, "last_insert_rowid": r.last_insert_rowid})
            );
        } else {
            println!(
                "ok: {} row(s) affected, last insert rowid {}",
                r.rows_affected, r.last_insert_rowid
            );
        }
    }
    Ok(())
}

/// Several statements in one `-e`: queries only, each runs and prints its rows; otherwise
/// they run as one write request, all or nothing (a query among them prints no rows).
async fn run_several(client: &Client, a: &SqlArgs, stmts: Vec<String>) -> Result<(), String> {
    if stmts.iter().all(|s| is_query(s)) {
        for s in &stmts {
            let rows = client
                .query_with(&a.db, s, vec![], a.consistency())
                .await
                .map_err(|e| e.to_string())?;
            print_rows(a, &rows);
        }
        return Ok(());
    }
    let batch: Vec<raftsql_core::Statement> = stmts
        .iter()
        .map(|s| raftsql_core::Statement::with_params(s, vec![]))
        .collect();
    let results = client
        .execute_batch(&a.db, &batch)
        .await
        .map_err(|e| e.to_string())?;
    let affected: u64 = results.iter().map(|r| r.rows_affected).sum();
    let last = results.last().map_or(0, |r| r.last_insert_rowid);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"statements": results.len(), "rows_affected": affected, "last_insert_rowid": last})
        );
    } else {
        println!(
            "ok: {} statements in one transaction, {affected} row(s) affected, last insert rowid {last}",
            results.len()
        );
    }
    Ok(())
}

fn print_rows(a: &SqlArgs, rows: &raftsql_core::Rows) {
    if a.json {
        for r in &rows.rows {
            let obj: serde_json::Map<String, serde_json::Value> = rows
                .columns
                .iter()
                .cloned()
                .zip(r.iter().map(json_value))
                .collect();
            println!("{}", serde_json::Value::Object(obj));
        }
        return;
    }
    let cells: Vec<Vec<String>> = rows
        .rows
        .iter()
        .map(|r| r.iter().map(fmt_value).collect())
        .collect();
    let mut w: Vec<usize> = rows.columns.iter().map(|c| c.len()).collect();
    for r in &cells {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |r: &[String]| {
        r.iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = w[i]))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!("{}", line(&rows.columns));
    println!(
        "{}",
        w.iter()
            .map(|n| "-".repeat(*n))
            .collect::<Vec<_>>()
            .join("-+-")
    );
    for r in &cells {
        println!("{}", line(r));
    }
    println!(
        "({} row{})",
        cells.len(),
        if cells.len() == 1 { "" } else { "s" }
    );
}

/// The interactive shell: statements end with `;` (they may span lines); `BEGIN` ...
/// `COMMIT`/`ROLLBACK` run as one interactive transaction on the leader; `.quit` leaves.
async fn run_sql(a: SqlArgs) -> CliResult {
    use std::io::{IsTerminal, Write};
    let client =
        Client::new(parse_endpoints(&a.endpoints)?, &a.cluster).with_dialer(a.tls.dialer()?);
    if let Some(sql) = &a.execute {
        return run_one(&client, &a, sql).await;
    }
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprintln!("raftsql shell on database {:?}: end statements with ';', BEGIN ... COMMIT for a transaction, .quit to leave", a.db);
    }
    let mut failed = false;
    let mut tx: Option<raftsql_core::RemoteTransaction> = None;
    let stdin = std::io::stdin();
    let mut buf = String::new();
    let mut line = String::new();
    loop {
        if tty {
            eprint!(
                "{}",
                if !buf.is_empty() {
                    "   ...> "
                } else if tx.is_some() {
                    "raftsql(tx)> "
                } else {
                    "raftsql> "
                }
            );
            let _ = std::io::stderr().flush();
        }
        line.clear();
        let eof = stdin.read_line(&mut line).map_err(|e| e.to_string())? == 0;
        let t = line.trim();
        if buf.is_empty() && (t == ".quit" || t == ".exit") {
            break;
        }
        buf.push_str(&line);
        let complete = buf.trim_end().ends_with(';') || (eof && !buf.trim().is_empty());
        if !complete {
            if eof {
                break;
            }
            continue;
        }
        let sql = buf.trim().trim_end_matches(';').trim().to_string();
        buf.clear();
        let word = sql
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let r: Result<(), String> = match (word.as_str(), tx.take()) {
            ("BEGIN", None) => match client.transaction(&a.db, Duration::from_secs(300)).await {
                Ok(t) => {
                    tx = Some(t);
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            },
            ("BEGIN", Some(t)) => {
                tx = Some(t);
                Err("a transaction is already open: COMMIT or ROLLBACK it first".into())
            }
            ("COMMIT" | "END", Some(t)) => t
                .commit()
                .await
                .map(|_| println!("committed"))
                .map_err(|e| e.to_string()),
            ("ROLLBACK", Some(t)) => t
                .rollback()
                .await
                .map(|_| println!("rolled back"))
                .map_err(|e| e.to_string()),
            ("COMMIT" | "END" | "ROLLBACK", None) => Err("no transaction is open".into()),
            (_, Some(mut t)) => {
                let r = t.execute(&sql, vec![]).await;
                tx = Some(t);
                match r {
                    Ok((rows, _)) if !rows.columns.is_empty() => {
                        print_rows(&a, &rows);
                        Ok(())
                    }
                    Ok((_, res)) => {
                        println!(
                            "ok: {} row(s) affected, last insert rowid {}",
                            res.rows_affected, res.last_insert_rowid
                        );
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            (_, None) => run_one(&client, &a, &sql).await,
        };
        if let Err(e) = r {
            eprintln!("error: {e}");
            failed = true;
        }
        if eof {
            break;
        }
    }
    if let Some(t) = tx {
        eprintln!("the open transaction was rolled back");
        let _ = t.rollback().await;
    }
    if failed {
        Err("some statements failed".into())
    } else {
        Ok(())
    }
}

async fn run_bench_sql(a: BenchSqlArgs) -> CliResult {
    let cfg = bench::BenchConfig {
        endpoints: parse_endpoints(&a.endpoints)?,
        cluster: a.cluster,
        db: a.db,
        workers: a.workers,
        clients: a.clients.unwrap_or(a.workers).clamp(1, a.workers.max(1)),
        duration: Duration::from_secs(a.duration.max(1)),
        key_size: a.key_size.max(1),
        value_size: a.value_size,
        workload: a.workload,
        keys: a.keys.max(1),
        dialer: a.tls.dialer()?,
    };
    eprintln!(
        "raftsql bench sql: {} workers on {} clients, {} s, {}",
        cfg.workers,
        cfg.clients,
        cfg.duration.as_secs(),
        cfg.workload
    );
    let out = bench::run(cfg).await?;
    println!("{out}");
    Ok(())
}

async fn run_status(a: StatusArgs) -> CliResult {
    let mut any = false;
    let dialer = a.tls.dialer()?;
    for addr in parse_endpoints(&a.endpoints)? {
        match Client::status_of_with(&dialer, addr, &a.cluster, a.digests).await {
            Ok(s) => {
                any = true;
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "endpoint": addr.to_string(), "id": s.id, "role": s.role, "leader_id": s.leader_id,
                            "leader_addr": s.leader_addr, "term": s.term, "commit_index": s.commit_index,
                            "applied_index": s.applied_index, "checkpoint_index": s.checkpoint_index,
                            "log_first_index": s.log_first_index, "log_last_index": s.log_last_index,
                            "db_digests": s.db_digests,
                        })
                    );
                } else {
                    println!(
                        "{addr}  node {}  {:<9} term {}  leader {}  commit {}  applied {}  checkpoint {}  log {}..{}{}",
                        s.id,
                        s.role,
                        s.term,
                        s.leader_id,
                        s.commit_index,
                        s.applied_index,
                        s.checkpoint_index,
                        s.log_first_index,
                        s.log_last_index,
                        if s.db_digests.is_empty() { String::new() } else { format!("  digests {:?}", s.db_digests) }
                    );
                }
            }
            Err(e) => {
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({"endpoint": addr.to_string(), "error": e.to_string()})
                    );
                } else {
                    println!("{addr}  unreachable: {e}");
                }
            }
        }
    }
    if any {
        Ok(())
    } else {
        Err("no node answered".into())
    }
}
