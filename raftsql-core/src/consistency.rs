//! How fresh a read must be: [`Consistency`], taken by every read of [`crate::Node`] and
//! [`crate::Client`].

use std::time::Duration;

/// What a read is guaranteed to see. The default is [`Consistency::Linearizable`].
///
/// | level | sees | costs |
/// |---|---|---|
/// | `Linearizable` | every write acknowledged before the read started | a ReadIndex round (one heartbeat to a quorum, shared by concurrent reads) |
/// | `Bounded(d)` | every write acknowledged more than `d` before the read started | a round only when this node has not completed one in the last `d` |
/// | `Local` | whatever this node has applied (may be arbitrarily old on a node cut off) | nothing |
///
/// These are rqlite's `strong` / `none` with freshness / `none` levels, and etcd's
/// linearizable and serializable reads. `Bounded` keeps no clock assumptions: it reuses the
/// index of a ReadIndex round *started* on this node within the bound (that index covers
/// every write committed before the round started), so a node cut off from the leader fails
/// the read ([`crate::Error::Unavailable`]) once its last round is older than the bound,
/// instead of answering from old state.
///
/// ```
/// use std::time::Duration;
/// use raftsql_core::Consistency;
///
/// assert_eq!(Consistency::default(), Consistency::Linearizable);
/// // Accept up to 500 ms of staleness to save a round trip per read.
/// let relaxed = Consistency::Bounded(Duration::from_millis(500));
/// assert!(relaxed != Consistency::Local);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Consistency {
    /// Sees every write acknowledged before the read started, on any node (Raft ReadIndex).
    #[default]
    Linearizable,
    /// Sees every write acknowledged earlier than the bound before the read started; served
    /// from this node's state without a round trip when it can prove that.
    Bounded(Duration),
    /// Sees what this node has applied, however old (etcd's serializable read). Never waits
    /// for the network: the read for a node cut off from its cluster.
    Local,
}
