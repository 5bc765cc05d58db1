//! The command line's shape: every command and its flags (clap), and the TLS flags every
//! client command shares.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use raftsql_core::tls::Dialer;

use crate::{backup, bench_etcd, bench_failover, bench_soak, cluster};

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
pub(crate) enum CaCmd {
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
    pub(crate) cmd: Cmd,
}

pub(crate) const NODE_EXAMPLES: &str = "\
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
pub(crate) enum Cmd {
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
pub(crate) enum ClusterCmd {
    /// One row per node: id, address, role, leader, reachable, applied index, lag, domain.
    Show(cluster::ShowArgs),
}

#[derive(Subcommand, Debug)]
pub(crate) enum BenchCmd {
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
pub(crate) struct BenchSqlArgs {
    /// Nodes to contact: HOST:PORT[,HOST:PORT...].
    #[arg(long, default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003")]
    pub(crate) endpoints: String,
    /// Concurrent workers.
    #[arg(long, default_value_t = 1)]
    pub(crate) workers: usize,
    /// Clients the workers share, round robin (each a multiplexed connection per node;
    /// default: one per worker, as dqlite-benchmark does). `--clients 1`: every worker on one
    /// shared client.
    #[arg(long)]
    pub(crate) clients: Option<usize>,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    pub(crate) duration: u64,
    /// Key size in bytes.
    #[arg(long, default_value_t = 32)]
    pub(crate) key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub(crate) value_size: usize,
    /// kvwrite (all INSERT OR REPLACE) or kvreadwrite (half reads).
    #[arg(long, default_value = "kvwrite")]
    pub(crate) workload: String,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) keys: u64,
    /// Database.
    #[arg(long, default_value = "bench")]
    pub(crate) db: String,
    /// Cluster name.
    #[arg(long, default_value = "raftsql")]
    pub(crate) cluster: String,
    #[command(flatten)]
    pub(crate) tls: ClientTls,
}

#[derive(Args, Debug)]
pub(crate) struct NodeArgs {
    /// Directory for the Raft log, databases and snapshots.
    #[arg(long)]
    pub(crate) data_dir: PathBuf,
    /// Address for peers and clients, e.g. 127.0.0.1:7001.
    #[arg(long)]
    pub(crate) listen: SocketAddr,
    /// This node's id (1, 2, ...); read from the data directory once it exists.
    #[arg(long)]
    pub(crate) id: Option<u64>,
    /// Every member of a new cluster: 1=HOST:PORT,2=HOST:PORT,... (ignored on restart).
    #[arg(long)]
    pub(crate) bootstrap_peers: Option<String>,
    /// This node's failure domain (e.g. a rack or zone): promotions prefer domains that are
    /// not represented yet.
    #[arg(long, default_value = "", help_heading = "Roles")]
    pub(crate) domain: String,
    /// This node's weight: lower is preferred for promotion.
    #[arg(long, default_value_t = 0, help_heading = "Roles")]
    pub(crate) weight: u32,
    /// Voters the cluster keeps (odd), applied while this node leads.
    #[arg(long, default_value_t = 3, help_heading = "Roles")]
    pub(crate) voters: usize,
    /// Standbys the cluster keeps, applied while this node leads.
    #[arg(long, default_value_t = 3, help_heading = "Roles")]
    pub(crate) standbys: usize,
    /// A member that has not answered the leader for this long counts as offline (and a
    /// voter is then replaced).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration, help_heading = "Roles")]
    pub(crate) offline_after: Duration,
    /// Cluster name; nodes of other clusters are refused (default: the name stored in the
    /// data directory, or "raftsql" for a new cluster).
    #[arg(long)]
    pub(crate) cluster: Option<String>,
    /// Raft tick in milliseconds (election timeout is 10 ticks, heartbeat 2).
    #[arg(long, default_value_t = 50, help_heading = "Storage and Raft")]
    pub(crate) tick_ms: u64,
    /// Checkpoint the WAL into the database files after this many pages.
    #[arg(long, default_value_t = 4000, help_heading = "Storage and Raft")]
    pub(crate) checkpoint_frames: u64,
    /// Compact the Raft log once it exceeds this many bytes.
    #[arg(long, default_value_t = 64 << 20, help_heading = "Storage and Raft")]
    pub(crate) compact_log_bytes: u64,
    /// Largest request a SQL client may send, in bytes (larger ones close its connection).
    #[arg(long, default_value_t = raftsql_core::DEFAULT_MAX_CLIENT_FRAME, help_heading = "Limits")]
    pub(crate) max_request_bytes: usize,
    /// Largest query result answered, in bytes (a larger one is an error asking for LIMIT).
    #[arg(long, default_value_t = raftsql_core::DEFAULT_MAX_RESULT_BYTES, help_heading = "Limits")]
    pub(crate) max_result_bytes: usize,
    /// The longest a client's SQL statement may run (a query, or one write request's
    /// statements, which every other write waits for) before it is interrupted.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, help_heading = "Limits")]
    pub(crate) statement_timeout: Duration,
    /// Serve the etcd v3 API (gRPC) on this address, e.g. 127.0.0.1:2379.
    #[arg(long, help_heading = "etcd API")]
    pub(crate) etcd_listen: Option<SocketAddr>,
    /// The etcd client URLs this node advertises in MemberList, comma-separated (etcd's flag;
    /// default: http(s)://<--etcd-listen>, which is only right if that address is reachable
    /// by clients, e.g. not 0.0.0.0).
    #[arg(long, value_delimiter = ',', help_heading = "etcd API")]
    pub(crate) advertise_client_urls: Vec<String>,
    /// Mutually authenticated TLS between nodes (and TLS for clients). A new single-node
    /// cluster creates its CA in <data-dir>/tls; bootstrap nodes of a larger one need
    /// --peer-ca-dir. A data directory with tls/ always runs TLS.
    #[arg(long, help_heading = "TLS")]
    pub(crate) peer_tls: bool,
    /// The cluster CA made by `raftsql ca init` (implies --peer-tls); the node issues its
    /// own certificate from it. Needed by every bootstrap node of a multi-node TLS cluster.
    #[arg(long, help_heading = "TLS")]
    pub(crate) peer_ca_dir: Option<PathBuf>,
    /// Serve clients over TLS with this certificate chain (PEM); needs --key-file. Applies
    /// to the etcd API, and with peer TLS to SQL clients too (which otherwise get the node
    /// certificate).
    #[arg(long, requires = "key_file", help_heading = "TLS")]
    pub(crate) cert_file: Option<PathBuf>,
    /// The private key (PEM) of --cert-file.
    #[arg(long, requires = "cert_file", help_heading = "TLS")]
    pub(crate) key_file: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates are verified against (with peer TLS,
    /// the cluster CA is trusted too).
    #[arg(long, help_heading = "TLS")]
    pub(crate) trusted_ca_file: Option<PathBuf>,
    /// Refuse clients without a verified certificate (needs --trusted-ca-file or peer TLS).
    #[arg(long, help_heading = "TLS")]
    pub(crate) client_cert_auth: bool,
    /// How long an etcd watch that asked for progress notifications may stay silent before
    /// it gets one (e.g. 10m, 5s, 500ms).
    #[arg(
        long,
        alias = "experimental-watch-progress-notify-interval",
        default_value = "10m",
        value_parser = humantime::parse_duration, help_heading = "etcd API")]
    pub(crate) watch_progress_notify_interval: Duration,
    /// Save a backup of this node's databases into DIR on a schedule (every node given the
    /// flag keeps its own). `raftsql snapshot list DIR` checks them; `raftsql snapshot
    /// restore DIR` restores the newest that checks out.
    #[arg(long, value_name = "DIR", help_heading = "Scheduled backups")]
    pub(crate) backup_dir: Option<PathBuf>,
    /// Time between two scheduled backups (e.g. 12h, 30m, 10s).
    #[arg(long, default_value = "12h", value_parser = humantime::parse_duration, help_heading = "Scheduled backups")]
    pub(crate) backup_every: Duration,
    /// How many scheduled backups of this node to keep (older ones are deleted once a new one
    /// has been checked).
    #[arg(long, default_value_t = 5, help_heading = "Scheduled backups")]
    pub(crate) backup_keep: usize,
}

#[derive(Args, Debug)]
pub(crate) struct DevArgs {
    /// Where the nodes keep their data (default: ./raftsql-dev).
    #[arg(long, default_value = "raftsql-dev")]
    pub(crate) dir: PathBuf,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub(crate) nodes: u64,
    /// Port of node 1; node N listens on base-port + N - 1.
    #[arg(long, default_value_t = 7001)]
    pub(crate) base_port: u16,
    /// Host to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: String,
    /// Run with TLS everywhere: a cluster CA, mutually authenticated nodes, and clients
    /// (SQL and etcd) that must present the client certificate written next to the data.
    #[arg(long)]
    pub(crate) tls: bool,
}

#[derive(Args, Debug)]
pub(crate) struct SqlArgs {
    /// Nodes to contact: HOST:PORT[,HOST:PORT...].
    #[arg(long, default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003")]
    pub(crate) endpoints: String,
    /// Database name.
    #[arg(long, default_value = "main")]
    pub(crate) db: String,
    /// SQL to run (otherwise statements are read from standard input, one per line).
    #[arg(short = 'e', long)]
    pub(crate) execute: Option<String>,
    /// Print rows as JSON lines.
    #[arg(long)]
    pub(crate) json: bool,
    /// Read from the contacted node's applied state, however old, instead of a linearizable
    /// read (etcd's --consistency=s).
    #[arg(long, conflicts_with = "max_staleness")]
    pub(crate) local: bool,
    /// Accept reads up to this stale (e.g. 500ms, 2s): served without a round trip to the
    /// leader when the node confirmed its state within that long, else linearizable.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) max_staleness: Option<std::time::Duration>,
    /// Cluster name.
    #[arg(long, default_value = "raftsql")]
    pub(crate) cluster: String,
    #[command(flatten)]
    pub(crate) tls: ClientTls,
}

impl SqlArgs {
    /// The read consistency the flags ask for.
    pub(crate) fn consistency(&self) -> raftsql_core::Consistency {
        match (self.local, self.max_staleness) {
            (true, _) => raftsql_core::Consistency::Local,
            (false, Some(d)) => raftsql_core::Consistency::Bounded(d),
            (false, None) => raftsql_core::Consistency::Linearizable,
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// Nodes to ask: HOST:PORT[,HOST:PORT...].
    #[arg(long, default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003")]
    pub(crate) endpoints: String,
    /// Also compute a digest of every database (reads every page).
    #[arg(long)]
    pub(crate) digests: bool,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Cluster name.
    #[arg(long, default_value = "raftsql")]
    pub(crate) cluster: String,
    #[command(flatten)]
    pub(crate) tls: ClientTls,
}
