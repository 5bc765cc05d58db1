//! Starting a whole node: the core (`node/`: storage, Raft, the API) with the services one
//! layer above it attached: membership (`members/`: the registry, joins, the role keeper)
//! and backups (`backup/`). The core knows nothing of them; they use it.

use crate::error::Result;
use crate::node::{Node, NodeConfig, Removed};
use crate::{backup, members};

impl Node {
    /// Starts a node: recovers its state from `data_dir` (or bootstraps a new cluster from
    /// `peers`), binds `listen`, and joins the cluster. Must run inside a tokio runtime.
    ///
    /// A cluster of one in a temporary directory (`NodeConfig::peers` names every member
    /// of a larger one: start each with its own id, the same peers):
    ///
    /// ```
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use raftsql_core::{Node, NodeConfig};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// let node = Node::start(NodeConfig::new(1, dir.path(), addr)).await?;
    /// node.wait_ready(Duration::from_secs(10)).await?;
    /// node.execute("main", "CREATE TABLE t(x)", vec![]).await?;
    /// node.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn start(cfg: NodeConfig) -> Result<Node> {
        let removed = Removed {
            db: members::SYSTEM_DB,
            read: members::read_removed,
        };
        let node = Node::boot(cfg, removed).await?;
        members::start(&node);
        backup::start(&node);
        Ok(node)
    }
}
