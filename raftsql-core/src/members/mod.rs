//! The member registry, join tokens, and the leader's role keeper.
//!
//! **Registry.** Who the members are (id, address, failure domain, weight) is a table of the
//! replicated system database [`SYSTEM_DB`], written on the leader like any other write, so
//! every node knows every member's address. A member's *role* is not in the table: it is its
//! place in the Raft configuration (voter, learner = standby, absent = spare), so there is one
//! source of truth for who votes. The first leader seeds the table from the bootstrap peers.
//! Every node follows the table (the sync task) to keep its transport's addresses current.
//!
//! **Joining.** `add-node` asks the leader for a token: 128 random bits, shown once. The leader
//! stores only keys derived from it (an id to find it and an HMAC key), with an expiry and a
//! single-use flag. The joiner proves it holds the token with an HMAC over a fresh nonce and
//! its address (the token never crosses the wire); the leader checks the token, marks it used
//! and registers the joiner as a spare in one write transaction (so a token cannot be used
//! twice), and answers with its own HMAC over the nonce and the cluster's name: only a member
//! of the cluster that issued the token can produce it, so a joiner cannot be lured into
//! joining an impostor.
//!
//! **Keeping roles.** While a node leads, its keeper probes every member every
//! `PROBE_EVERY` (300 ms) and applies at most one change planned by `roles::plan` per round,
//! waiting until it is applied.
//!
//! The services: [`MEMBERS_SERVICE`] answers on every node (clients send membership requests
//! there; they are forwarded to the leader), [`JOIN_SERVICE`] is the only call a connection
//! that has not named the cluster may make.
//!
//! # Files
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the service names, `start`: services registered and tasks spawned on a node |
//! | `registry.rs` | the registry tables |
//! | `token.rs` | join tokens and their HMACs |
//! | `keeper.rs` | the role keeper and the registry-following tasks |
//! | `service.rs` | the service handlers |
//! | `ops.rs` | the leader's side of each request |
//! | `client.rs` | joining, and sending membership requests |
//! | `history.rs` | the leader and role changes recorded for `cluster show` |

mod client;
mod history;
mod keeper;
mod ops;
mod registry;
mod service;
mod token;

use std::sync::Arc;

use keeper::{check_in, keeper_task, sync_task, Keeper};
use service::{Entry, Leader, Notice};

use crate::node::Node;

pub use crate::net::server::JOIN_SERVICE;
pub use client::{join, request, JoinTicket};
pub(crate) use registry::read_removed;
pub use registry::{read_registry_file, rewrite_registry_file};
pub use token::DEFAULT_TOKEN_TTL;

/// The replicated database holding the registry and the join tokens.
pub const SYSTEM_DB: &str = "_raftsql";

/// Membership requests (`MembershipRequest` of `proto/raftsql.proto`), answered on any node.
pub const MEMBERS_SERVICE: &str = "raftsql.members";

/// The same requests, run on the leader.
pub(super) const LEADER_SERVICE: &str = "raftsql.members.leader";

/// Members only: the leader tells a node it removed (see `Notice`).
pub const NOTICE_SERVICE: &str = "raftsql.members.notice";

/// Registers the services and starts the sync and keeper tasks (called by `Node::start`).
pub(crate) fn start(node: &Node) {
    let weak = node.downgrade();
    node.register_client_service(
        MEMBERS_SERVICE,
        Arc::new(Entry {
            node: weak.clone(),
            join_only: false,
        }),
    );
    node.register_client_service(
        JOIN_SERVICE,
        Arc::new(Entry {
            node: weak.clone(),
            join_only: true,
        }),
    );
    let keeper = Arc::new(Keeper::default());
    node.register_service(
        LEADER_SERVICE,
        Arc::new(Leader(weak.clone(), keeper.clone())),
    );
    node.register_service(NOTICE_SERVICE, Arc::new(Notice(weak.clone())));
    tokio::spawn(check_in(weak.clone()));
    tokio::spawn(sync_task(weak.clone(), node.subscribe_applied()));
    tokio::spawn(keeper_task(weak, keeper));
}
