//! The `raftsql` command line: run a node, a local development cluster, SQL and status.
//!
//! The binary (`main.rs`) only calls [`main`]; integration tests run the same code through
//! their own binary target.
//!
//! | file | command |
//! |---|---|
//! | `args.rs` | every command's flags (clap) |
//! | `node_cmd.rs` | `raftsql node` |
//! | `dev.rs` | `raftsql dev` |
//! | `sql.rs` | `raftsql sql` |
//! | `status.rs` | `raftsql raft-status` |
//! | `ca.rs` | `raftsql ca` |
//! | `cluster.rs` | `status`, `add-node`, `join`, `leave`, `remove-node`, `cluster show` |
//! | `backup.rs` | `snapshot save/restore/list`, `recover` |
//! | `bench*.rs` | `raftsql bench sql/etcd/failover/soak` |
//! | `launch.rs` | local clusters of node processes (dev, benches, the test harness) |

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

mod args;
pub mod backup;
pub mod bench;
pub mod bench_etcd;
pub mod bench_failover;
pub mod bench_soak;
mod ca;
pub mod cluster;
mod dev;
pub mod launch;
mod node_cmd;
mod sql;
mod status;

pub use args::*;
use bench::run_bench_sql;
use ca::run_ca;
use dev::run_dev;
use node_cmd::run_node;
pub(crate) use node_cmd::run_node_with;
use sql::run_sql;
use status::run_status;

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
