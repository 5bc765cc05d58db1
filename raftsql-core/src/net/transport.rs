//! The node's network endpoint: a listener (`server.rs`) and one sender per peer.
//!
//! Raft traffic flows one way per connection: each node dials every peer and sends
//! `RaftBatch` frames, batching whatever queued while the previous write was in progress.
//! Lost connections are redialled with exponential backoff (50 ms to 2 s); messages queued
//! meanwhile are dropped when the queue is full, which Raft tolerates (it retransmits).
//!
//! Outgoing peer sockets bind the node's own listen address as their source, so per-address
//! firewall rules (used by the fault tests on 127.0.0.x) see the real sender. Every write of
//! a frame is followed by a flush: a TLS stream may keep records buffered after `write_all`.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;
use raftsql_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::dial::{Dialer, Peer};
use super::frame::{
    encode_frame, hello, write_frame, FrameReader, DEFAULT_MAX_CLIENT_FRAME, MAX_HELLO_FRAME,
};
use super::server::{spawn_accept, Handler, Listening};
use super::tls::PeerTls;

/// A lost peer connection is redialled after this, doubling up to [`REDIAL_MAX`].
const REDIAL_MIN: Duration = Duration::from_millis(50);
/// The longest pause between redials of a peer.
const REDIAL_MAX: Duration = Duration::from_secs(2);

const PEER_QUEUE: usize = 8192;

const BATCH_BYTES: usize = 4 << 20;

/// The node's network endpoint.
pub struct Transport {
    me: u64,
    cluster: String,
    local_ip: IpAddr,
    peers: RwLock<HashMap<u64, mpsc::Sender<Bytes>>>,
    addrs: RwLock<HashMap<u64, SocketAddr>>,
    rt: tokio::runtime::Handle,
    accept: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Removed members: their connections are refused after hello.
    revoked: Arc<RwLock<std::collections::HashSet<u64>>>,
    handler: Arc<dyn Handler>,
    dialer: Dialer,
}

/// How a [`Transport`] serves.
#[derive(Clone, Debug)]
pub struct TransportOptions {
    /// Largest frame a client may send.
    pub max_client_frame: usize,
    /// Mutually authenticated TLS for every connection (`None`: plain TCP).
    pub tls: Option<Arc<PeerTls>>,
    /// Removed members, refused from the first connection on.
    pub revoked: std::collections::HashSet<u64>,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            max_client_frame: DEFAULT_MAX_CLIENT_FRAME,
            tls: None,
            revoked: Default::default(),
        }
    }
}

impl Transport {
    /// Binds `listen` and starts accepting; frames go to `handler`.
    pub async fn bind(
        me: u64,
        cluster: &str,
        listen: SocketAddr,
        opts: TransportOptions,
        handler: Arc<dyn Handler>,
    ) -> io::Result<(Arc<Transport>, SocketAddr)> {
        let listener = TcpListener::bind(listen).await?;
        let local = listener.local_addr()?;
        let revoked = Arc::new(RwLock::new(opts.revoked));
        let t = Arc::new(Transport {
            me,
            cluster: cluster.to_string(),
            local_ip: local.ip(),
            peers: RwLock::new(HashMap::new()),
            addrs: RwLock::new(HashMap::new()),
            rt: tokio::runtime::Handle::current(),
            accept: parking_lot::Mutex::new(None),
            revoked: revoked.clone(),
            handler: handler.clone(),
            dialer: opts
                .tls
                .as_ref()
                .map_or(Dialer::Plain, |t| t.dialer.clone()),
        });
        let shared = Arc::new(Listening {
            cluster: cluster.to_string(),
            max_client_frame: opts.max_client_frame,
            revoked,
            tls: opts.tls,
            handler,
            failed_handshakes: Default::default(),
        });
        let task = spawn_accept(listener, shared);
        *t.accept.lock() = Some(task);
        Ok((t, local))
    }

    /// Stops listening (the port is freed) and stops the peer senders.
    pub fn close(&self) {
        if let Some(t) = self.accept.lock().take() {
            t.abort();
        }
        self.addrs.write().clear();
        self.peers.write().clear();
    }

    /// Sets the address of a peer (starts its sender on first use).
    pub fn set_peer(&self, id: u64, addr: SocketAddr) {
        if id == self.me {
            return;
        }
        let old = self.addrs.write().insert(id, addr);
        if old != Some(addr) {
            self.peers.write().remove(&id);
        }
    }

    /// How this node dials its peers (plain, or TLS with its node certificate).
    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    /// Sets the removed members, whose connections are refused from now on.
    pub fn set_revoked(&self, ids: std::collections::HashSet<u64>) {
        *self.revoked.write() = ids;
    }

    /// Forgets a peer (a removed member): its queue and connection are dropped.
    pub fn remove_peer(&self, id: u64) {
        self.addrs.write().remove(&id);
        self.peers.write().remove(&id);
    }

    /// Address of a peer, if known.
    pub fn peer_addr(&self, id: u64) -> Option<SocketAddr> {
        self.addrs.read().get(&id).copied()
    }

    /// Queues an encoded Raft message for `to`; never blocks (drops when the queue is full).
    pub fn send(&self, to: u64, msg: Bytes) {
        let tx = self.peers.read().get(&to).cloned();
        let tx = match tx {
            Some(tx) => tx,
            None => {
                let Some(addr) = self.peer_addr(to) else {
                    return;
                };
                let (tx, rx) = mpsc::channel(PEER_QUEUE);
                self.peers.write().insert(to, tx.clone());
                self.rt.spawn(peer_sender(
                    (self.me, to),
                    self.cluster.clone(),
                    (self.dialer.clone(), self.local_ip, addr),
                    rx,
                    self.handler.clone(),
                ));
                tx
            }
        };
        let _ = tx.try_send(msg);
    }
}

async fn peer_sender(
    (me, to): (u64, u64),
    cluster: String,
    (dialer, local_ip, addr): (Dialer, IpAddr, SocketAddr),
    mut rx: mpsc::Receiver<Bytes>,
    handler: Arc<dyn Handler>,
) {
    let mut backoff = REDIAL_MIN;
    let mut failures = 0u64;
    loop {
        let (r, mut stream) = match dialer.open(addr, Some(local_ip), Peer::Node(to)).await {
            Ok(s) => s,
            Err(e) => {
                failures += 1;
                if e.kind() != io::ErrorKind::ConnectionRefused && failures.is_power_of_two() {
                    tracing::warn!("cannot connect to node {to} at {addr}: {e}");
                }
                // Drop what queued while the peer is down; Raft resends what matters.
                while rx.try_recv().is_ok() {}
                if rx.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(REDIAL_MAX);
                continue;
            }
        };
        backoff = REDIAL_MIN;
        if write_frame(&mut stream, &hello(me, &cluster))
            .await
            .is_err()
        {
            continue;
        }
        // The peer only ever answers a refusal on this connection.
        let handler = handler.clone();
        let listen = tokio::spawn(async move {
            let mut reader = FrameReader::with_max(r, MAX_HELLO_FRAME);
            if let Ok(Some(pb::Frame {
                kind: Some(pb::frame::Kind::Refused(refusal)),
            })) = reader.next().await
            {
                handler.refused(to, refusal);
            }
        });
        let _stop_listening = AbortOnDrop(listen);
        loop {
            let Some(first) = rx.recv().await else { return };
            let mut size = first.len();
            let mut messages = vec![first];
            while size < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(m) => {
                        size += m.len();
                        messages.push(m);
                    }
                    Err(_) => break,
                }
            }
            let f = pb::Frame {
                kind: Some(pb::frame::Kind::Raft(pb::RaftBatch { messages })),
            };
            if write_frame(&mut stream, &encode_frame(&f)).await.is_err() {
                break;
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
