//! Serving connections: the accept loop, the hello (and with TLS, who the peer is), then
//! Raft batches to the node and requests answered on the connection they came on.
//!
//! Every connection starts with a `Hello` (sender id, cluster name) within
//! [`HELLO_TIMEOUT`]; a joiner (no cluster name) may only call [`JOIN_SERVICE`]. With
//! [`PeerTls`] a peer must present the cluster CA's certificate for the id it names, or it is
//! sent a `Refused` frame and closed (see `tls.rs`). Clients (node 0) may send requests only,
//! up to [`MAX_IN_FLIGHT`] at a time per connection, answered in any order.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;
use raftsql_proto::v1 as pb;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::frame::{
    encode_frame, write_frame, FrameError, FrameReader, Halves, Reader, Writer, MAX_FRAME,
    MAX_HELLO_FRAME,
};
use super::tls::{removed_reason, PeerTls};

/// The pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// How long a refused client's rest of a too-large request is read, so it reads the reason.
const REFUSED_DRAIN: Duration = Duration::from_secs(2);

/// A connection must say hello within this long.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once by one node; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 1024;

/// Requests of one connection in progress at once; the connection is not read further
/// until one of them completes (backpressure, not an error).
pub const MAX_IN_FLIGHT: usize = 128;

/// A boxed future of a response.
pub type ResponseFuture = Pin<Box<dyn Future<Output = pb::Response> + Send>>;

/// What a node does with what arrives.
pub trait Handler: Send + Sync + 'static {
    /// Raft messages (encoded eraftpb::Message) from peer `from`.
    fn raft(&self, from: u64, messages: Vec<Bytes>);
    /// A request from node `from` (0: a client); the response goes back on the same
    /// connection. With TLS, `from` is authenticated by the connection's certificate.
    fn request(&self, from: u64, req: pb::Request) -> ResponseFuture;
    /// Peer `by` refused this node's connection (e.g. because this node was removed).
    fn refused(&self, by: u64, refusal: pb::Refused) {
        let _ = (by, refusal);
    }
}

/// What every connection task of a listener shares.
pub(super) struct Listening {
    pub(super) cluster: String,
    pub(super) max_client_frame: usize,
    pub(super) revoked: Arc<RwLock<std::collections::HashSet<u64>>>,
    pub(super) tls: Option<Arc<PeerTls>>,
    pub(super) handler: Arc<dyn Handler>,
    /// Failed TLS handshakes so far (logged at powers of two).
    pub(super) failed_handshakes: std::sync::atomic::AtomicU64,
}

/// The node service a connection that has not named the cluster may call (see
/// `members::JOIN_SERVICE`).
pub const JOIN_SERVICE: &str = "raftsql.join";

/// Accepts connections on `listener` until aborted, at most [`MAX_CONNECTIONS`] served at
/// once (more are closed as they arrive, logged at powers of two).
pub(super) fn spawn_accept(
    listener: TcpListener,
    shared: Arc<Listening>,
) -> tokio::task::JoinHandle<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        let mut refused = 0u64;
        loop {
            match listener.accept().await {
                Ok((s, from)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        refused += 1;
                        if refused.is_power_of_two() {
                            tracing::warn!(
                                "refused a connection from {from}: {MAX_CONNECTIONS} connections \
                                 already served ({refused} refused so far)"
                            );
                        }
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        accept_conn(s, from, shared).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    })
}

/// Serves a joiner's connection: `ServiceCall`s to [`JOIN_SERVICE`] only, one at a time;
/// anything else closes the connection.
async fn serve_joiner(mut reader: FrameReader<Reader>, mut w: Writer, handler: Arc<dyn Handler>) {
    while let Ok(Some(pb::Frame {
        kind: Some(pb::frame::Kind::Request(req)),
    })) = reader.next().await
    {
        let ok =
            matches!(&req.body, Some(pb::request::Body::Service(c)) if c.service == JOIN_SERVICE);
        if !ok {
            tracing::warn!("refused a request from a connection that did not name the cluster");
            return;
        }
        let resp = handler.request(0, req).await;
        let f = pb::Frame {
            kind: Some(pb::frame::Kind::Response(resp)),
        };
        if write_frame(&mut w, &encode_frame(&f)).await.is_err() {
            return;
        }
    }
}

/// Runs the TLS handshake (if any), then serves the connection.
async fn accept_conn(tcp: TcpStream, addr: SocketAddr, l: Arc<Listening>) {
    let Some(tls) = l.tls.clone() else {
        let (r, w) = tcp.into_split();
        serve_conn((Box::new(r), Box::new(w)), addr, None, &l).await;
        return;
    };
    let accepted = tokio::time::timeout(HELLO_TIMEOUT, tls.acceptor.accept(tcp)).await;
    let s = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let n = 1 + l
                .failed_handshakes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    "refused a connection from {addr}: TLS handshake failed: {e} \
                     ({n} failed handshakes so far)"
                );
            }
            return;
        }
        Err(_) => {
            tracing::debug!(
                "closed a connection from {addr}: no TLS handshake within {HELLO_TIMEOUT:?}"
            );
            return;
        }
    };
    let certs = s.get_ref().1.peer_certificates().map(<[_]>::to_vec);
    let (r, w) = tokio::io::split(s);
    serve_conn((Box::new(r), Box::new(w)), addr, certs, &l).await;
}

/// A `Refused` frame.
fn refusal(reason: String, revoked: bool) -> Bytes {
    encode_frame(&pb::Frame {
        kind: Some(pb::frame::Kind::Refused(pb::Refused { reason, revoked })),
    })
}

/// Sends a refusal and logs it.
async fn refuse(w: &mut Writer, who: &str, addr: SocketAddr, reason: String, revoked: bool) {
    tracing::warn!("refused {who} at {addr}: {reason}");
    let _ = write_frame(w, &refusal(reason, revoked)).await;
}

async fn serve_conn(
    (r, mut w): Halves,
    addr: SocketAddr,
    certs: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
    l: &Listening,
) {
    let (cluster, revoked, handler) = (&l.cluster, &l.revoked, l.handler.clone());
    let mut reader = FrameReader::with_max(r, MAX_HELLO_FRAME);
    let from = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
        Ok(Ok(Some(pb::Frame {
            kind: Some(pb::frame::Kind::Hello(h)),
        }))) => {
            if h.cluster.is_empty() && h.from_id == 0 {
                // A joiner, who does not know the cluster's name yet: it may only join.
                serve_joiner(reader, w, handler).await;
                return;
            }
            if &h.cluster != cluster {
                // Say why, so that the other side can print the fix (a client given the
                // wrong --cluster otherwise saw only "connection closed").
                let who = match h.from_id {
                    0 => "a client".to_string(),
                    id => format!("node {id}"),
                };
                let reason = format!(
                    "this node belongs to cluster {cluster:?}, not {:?}: give --cluster {cluster} \
                     (or the endpoint of a node of cluster {:?})",
                    h.cluster, h.cluster
                );
                refuse(
                    &mut w,
                    &format!("{who} of cluster {:?}", h.cluster),
                    addr,
                    reason,
                    false,
                )
                .await;
                return;
            }
            h.from_id
        }
        Err(_) => {
            tracing::debug!(
                "closed a connection from {addr} that did not say hello within {HELLO_TIMEOUT:?}"
            );
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!("closed a connection from {addr}: {e}");
            return;
        }
        Ok(_) => {
            tracing::debug!("closed a connection from {addr} that did not start with hello");
            return;
        }
    };
    let who = if from == 0 {
        "a client".to_string()
    } else {
        format!("node {from}")
    };
    if from != 0 && revoked.read().contains(&from) {
        refuse(
            &mut w,
            &who,
            addr,
            removed_reason(from, l.tls.is_some()),
            true,
        )
        .await;
        return;
    }
    if let Some(tls) = &l.tls {
        let checked = tls.check(from, certs.as_deref(), &revoked.read());
        if let Err((reason, rev)) = checked {
            refuse(&mut w, &who, addr, reason, rev).await;
            return;
        }
    }
    let max_client_frame = l.max_client_frame;
    // Peers send Raft batches and snapshot chunks; clients only requests.
    reader.set_max(if from == 0 {
        max_client_frame
    } else {
        MAX_FRAME
    });
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let (tx, mut out) = mpsc::channel::<Bytes>(1024);
    tokio::spawn(async move {
        // The responses queued together leave in one write (on plain TCP each frame would
        // otherwise be a system call and a packet of its own).
        let _ = super::frame::write_queued(w, &mut out).await;
    });
    loop {
        match reader.next().await {
            Ok(Some(pb::Frame {
                kind: Some(pb::frame::Kind::Raft(_)),
            })) if from == 0 => {
                tracing::warn!("closed a client connection from {addr} that sent Raft messages");
                return;
            }
            Ok(Some(pb::Frame {
                kind: Some(pb::frame::Kind::Raft(_) | pb::frame::Kind::Request(_)),
            })) if from != 0 && revoked.read().contains(&from) => {
                // Removed while connected: nothing more from it (no Raft messages, no
                // forwarded writes), and it is told why.
                let reason = removed_reason(from, l.tls.is_some());
                let _ = tx.send(refusal(reason.clone(), true)).await;
                tracing::warn!("closed the connection of node {from} at {addr}: {reason}");
                return;
            }
            Ok(Some(pb::Frame {
                kind: Some(pb::frame::Kind::Raft(b)),
            })) => handler.raft(from, b.messages),
            Ok(Some(pb::Frame {
                kind: Some(pb::frame::Kind::Request(req)),
            })) => {
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    return;
                };
                let fut = handler.request(from, req);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let resp = fut.await;
                    drop(permit);
                    let f = pb::Frame {
                        kind: Some(pb::frame::Kind::Response(resp)),
                    };
                    let _ = tx.send(encode_frame(&f)).await;
                });
            }
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                tracing::warn!(
                    "closed the connection of {} at {addr}: {e}",
                    if from == 0 {
                        "a client".to_string()
                    } else {
                        format!("node {from}")
                    }
                );
                let too_large = e
                    .get_ref()
                    .and_then(|x| x.downcast_ref::<FrameError>())
                    .and_then(|f| match f {
                        FrameError::TooLarge { len, max } => Some((*len, *max)),
                        _ => None,
                    });
                if let (0, Some((len, max))) = (from, too_large) {
                    // Tell the client why (a response with id 0 answers whatever it is
                    // waiting for), and read what it is still sending so it gets to read it.
                    let msg = format!(
                        "request of {len} bytes refused: this node accepts requests of up to \
                         {max} bytes (--max-request-bytes)"
                    );
                    let f = pb::Frame {
                        kind: Some(pb::frame::Kind::Response(pb::Response {
                            id: 0,
                            body: Some(pb::response::Body::Error(pb::Error {
                                code: pb::error::Code::Invalid as i32,
                                message: msg,
                                ..Default::default()
                            })),
                        })),
                    };
                    let _ = tx.send(encode_frame(&f)).await;
                    reader.discard(len, REFUSED_DRAIN).await;
                }
                return;
            }
            Err(e) => {
                tracing::debug!("connection from {from} closed: {e}");
                return;
            }
        }
    }
}
