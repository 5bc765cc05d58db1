//! TCP between nodes and from clients: length-prefixed, checksummed frames of
//! [`raftsql_proto::v1::Frame`].
//!
//! ```text
//! frame = len: u32 LE | crc32(payload): u32 LE | payload (protobuf Frame, len bytes)
//! ```
//! Every connection starts with a `Hello` (sender id, cluster name). Raft traffic flows one
//! way per connection: each node dials every peer and sends `RaftBatch` frames, batching
//! whatever queued while the previous write was in progress. Lost connections are redialled
//! with exponential backoff (50 ms to 2 s); messages queued meanwhile are dropped when the
//! queue is full, which Raft tolerates (it retransmits). Requests (client calls, snapshot
//! chunk pulls) get their `Response` on the connection they came on.
//!
//! Outgoing peer sockets bind the node's own listen address as their source, so per-address
//! firewall rules (used by the fault tests on 127.0.0.x) see the real sender.
//!
//! With [`PeerTls`] every connection is TLS: a peer must present the cluster CA's
//! certificate for the id it names in its hello, or it is sent a `Refused` frame and closed
//! (see `tls.rs`). Every write of a frame is followed by a flush: a TLS stream may keep
//! records buffered after `write_all` returns.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::RwLock;
use prost::Message;
use raftsql_proto::v1 as pb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

use crate::tls::{Dialer, Peer, PeerTls};

/// The read half of a connection (plain TCP or TLS).
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connection (plain TCP or TLS).
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;
/// Both halves of a connection.
pub type Halves = (Reader, Writer);

/// Writes one encoded frame and flushes it.
async fn write_frame(w: &mut Writer, b: &[u8]) -> io::Result<()> {
    w.write_all(b).await?;
    w.flush().await
}

/// Largest frame accepted from a peer (a Raft batch, a snapshot chunk, a forwarded write).
pub const MAX_FRAME: usize = 64 << 20;
/// Largest frame a client may send unless the node says otherwise
/// ([`crate::NodeConfig::max_request_bytes`]).
pub const DEFAULT_MAX_CLIENT_FRAME: usize = 16 << 20;
/// Largest frame before a connection has said hello, and on a joiner's connection.
pub const MAX_HELLO_FRAME: usize = 64 << 10;
/// A connection must say hello within this long.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once by one node; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 1024;
/// Requests of one connection in progress at once; the connection is not read further
/// until one of them completes (backpressure, not an error).
pub const MAX_IN_FLIGHT: usize = 128;
const PEER_QUEUE: usize = 8192;
const BATCH_BYTES: usize = 4 << 20;

/// Why bytes from the network are not a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix exceeds the connection's limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Checksum mismatch.
    #[error("frame checksum mismatch")]
    Checksum,
    /// Not a valid protobuf Frame.
    #[error("undecodable frame: {0}")]
    Decode(String),
}

/// Encodes a frame with its length and checksum.
pub fn encode_frame(f: &pb::Frame) -> Bytes {
    let len = f.encoded_len();
    let mut b = BytesMut::with_capacity(8 + len);
    b.put_u32_le(len as u32);
    b.put_u32_le(0);
    f.encode(&mut b).expect("BytesMut grows");
    let crc = crc32fast::hash(&b[8..]);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b.freeze()
}

/// Decodes one frame from the front of `buf`: `Ok(None)` if more bytes are needed, else the
/// frame and how many bytes it used. Frames up to [`MAX_FRAME`].
pub fn decode_frame(buf: &[u8]) -> Result<Option<(pb::Frame, usize)>, FrameError> {
    decode_frame_max(buf, MAX_FRAME)
}

/// [`decode_frame`] with a limit of `max` bytes: a longer declared length is refused as
/// soon as the prefix arrives, before any of the payload is buffered.
pub fn decode_frame_max(buf: &[u8], max: usize) -> Result<Option<(pb::Frame, usize)>, FrameError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if buf.len() < 8 + len {
        return Ok(None);
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().unwrap());
    let payload = &buf[8..8 + len];
    if crc32fast::hash(payload) != crc {
        return Err(FrameError::Checksum);
    }
    let f = pb::Frame::decode(payload).map_err(|e| FrameError::Decode(e.to_string()))?;
    Ok(Some((f, 8 + len)))
}

/// Reads frames from a socket.
pub struct FrameReader<R> {
    r: R,
    buf: BytesMut,
    max: usize,
}

impl<R: tokio::io::AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a reader; frames up to [`MAX_FRAME`].
    pub fn new(r: R) -> Self {
        Self::with_max(r, MAX_FRAME)
    }
    /// Wraps a reader; frames up to `max` bytes.
    pub fn with_max(r: R, max: usize) -> Self {
        FrameReader {
            r,
            buf: BytesMut::with_capacity(8 << 10),
            max,
        }
    }
    /// Changes the largest frame accepted from now on.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }
    /// Reads and discards up to `limit` bytes for at most `within` (so that a peer still
    /// sending a refused frame reads the answer instead of a connection reset).
    pub async fn discard(&mut self, limit: usize, within: Duration) {
        self.buf.clear();
        let mut left = limit;
        let _ = tokio::time::timeout(within, async {
            let mut scratch = [0u8; 16 << 10];
            while left > 0 {
                match self.r.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }
    /// Next frame, or `None` at a clean end of stream.
    pub async fn next(&mut self) -> io::Result<Option<pb::Frame>> {
        loop {
            match decode_frame_max(&self.buf, self.max) {
                Ok(Some((f, used))) => {
                    self.buf.advance(used);
                    return Ok(Some(f));
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            if self.r.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else if matches!(self.buf[..], [0x15 | 0x16, 0x03, ..]) {
                    // A TLS record (an alert or a handshake): the other end speaks TLS.
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the node speaks TLS: connect with TLS (--cacert)",
                    ))
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed mid-frame",
                    ))
                };
            }
        }
    }
}

impl<R: tokio::io::AsyncRead + Unpin> FrameReader<R> {
    /// True if the peer has closed the connection (checked without blocking); bytes that
    /// happen to be waiting are kept for [`FrameReader::next`].
    pub fn peer_closed(&mut self) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut scratch = [0u8; 8 << 10];
        // Late bytes (say, the answer to a call that was abandoned) may come before the end
        // of the stream: read on until nothing more is ready, within the frame limit.
        while self.buf.len() <= self.max {
            let mut rb = tokio::io::ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.r).poll_read(&mut cx, &mut rb) {
                std::task::Poll::Pending => return false,
                std::task::Poll::Ready(Ok(())) if rb.filled().is_empty() => return true,
                std::task::Poll::Ready(Ok(())) => self.buf.extend_from_slice(rb.filled()),
                std::task::Poll::Ready(Err(_)) => return true,
            }
        }
        false
    }
}

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

/// What every connection task of a listener shares.
struct Listening {
    cluster: String,
    max_client_frame: usize,
    revoked: Arc<RwLock<std::collections::HashSet<u64>>>,
    tls: Option<Arc<PeerTls>>,
    handler: Arc<dyn Handler>,
    /// Failed TLS handshakes so far (logged at powers of two).
    failed_handshakes: std::sync::atomic::AtomicU64,
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
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let task = tokio::spawn(async move {
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
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
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
    let mut backoff = Duration::from_millis(50);
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
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let hello = pb::Frame {
            kind: Some(pb::frame::Kind::Hello(pb::Hello {
                from_id: me,
                cluster: cluster.clone(),
            })),
        };
        if write_frame(&mut stream, &encode_frame(&hello))
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

/// Dials `addr`, binding the source address to `local` when given (port chosen by the OS).
pub async fn dial(addr: SocketAddr, local: Option<IpAddr>) -> io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = local {
        if ip.is_ipv4() == addr.is_ipv4() && !ip.is_unspecified() {
            sock.bind(SocketAddr::new(ip, 0))?;
        }
    }
    let s = tokio::time::timeout(Duration::from_secs(2), sock.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// The node service a connection that has not named the cluster may call (see
/// `members::JOIN_SERVICE`).
pub const JOIN_SERVICE: &str = "raftsql.join";

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

/// Why removed node `id` is refused (with TLS: its certificate is what is refused).
pub(crate) fn removed_reason(id: u64, tls: bool) -> String {
    if tls {
        format!("node {id} was removed from the cluster; its certificate is revoked")
    } else {
        format!("node {id} was removed from the cluster")
    }
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
        while let Some(b) = out.recv().await {
            if w.write_all(&b).await.is_err() {
                return;
            }
            // Responses that queued meanwhile go out in the same flush.
            let mut failed = false;
            while let Ok(b) = out.try_recv() {
                if w.write_all(&b).await.is_err() {
                    failed = true;
                    break;
                }
            }
            if failed || w.flush().await.is_err() {
                return;
            }
        }
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
                    reader.discard(len, Duration::from_secs(2)).await;
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

/// A request/response connection to one node (one call at a time).
pub struct RpcConn {
    reader: FrameReader<Reader>,
    writer: Writer,
    next_id: u64,
    /// The server answered with a connection-level error (id 0) and is closing.
    refused: bool,
    /// Responses received so far.
    answered: u64,
    /// The server's refusal, if it refused this connection.
    refusal: Option<pb::Refused>,
}

impl RpcConn {
    /// Connects with `dialer` to `to` at `addr` (source address `local` when given) and
    /// says hello as `from_id` (0 for clients).
    pub async fn connect(
        dialer: &Dialer,
        to: Peer,
        addr: SocketAddr,
        from_id: u64,
        cluster: &str,
        local: Option<IpAddr>,
    ) -> io::Result<RpcConn> {
        let (r, mut w) = dialer.open(addr, local, to).await?;
        let hello = pb::Frame {
            kind: Some(pb::frame::Kind::Hello(pb::Hello {
                from_id,
                cluster: cluster.to_string(),
            })),
        };
        write_frame(&mut w, &encode_frame(&hello)).await?;
        Ok(RpcConn {
            reader: FrameReader::new(r),
            writer: w,
            next_id: 1,
            refused: false,
            answered: 0,
            refusal: None,
        })
    }

    /// The server's refusal of this connection, once one arrived.
    pub fn refusal(&self) -> Option<&pb::Refused> {
        self.refusal.as_ref()
    }

    /// How many responses this connection has received.
    pub fn answered(&self) -> u64 {
        self.answered
    }

    /// True if the server has closed this connection: a request sent on it would be lost.
    pub fn is_closed(&mut self) -> bool {
        self.refused || self.reader.peer_closed()
    }

    /// Sends a request body and waits for its response.
    pub async fn call(&mut self, body: pb::request::Body) -> io::Result<pb::response::Body> {
        let id = self.next_id;
        self.next_id += 1;
        let f = pb::Frame {
            kind: Some(pb::frame::Kind::Request(pb::Request {
                id,
                body: Some(body),
            })),
        };
        write_frame(&mut self.writer, &encode_frame(&f)).await?;
        loop {
            match self.reader.next().await? {
                Some(pb::Frame {
                    kind: Some(pb::frame::Kind::Response(r)),
                }) if r.id == id || r.id == 0 => {
                    self.refused |= r.id == 0;
                    self.answered += 1;
                    return r.body.ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "empty response")
                    });
                }
                Some(pb::Frame {
                    kind: Some(pb::frame::Kind::Refused(r)),
                }) => {
                    self.refused = true;
                    let e = io::Error::new(io::ErrorKind::PermissionDenied, r.reason.clone());
                    self.refusal = Some(r);
                    return Err(e);
                }
                Some(_) => continue,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed",
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn frames_round_trip(msgs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let f = pb::Frame { kind: Some(pb::frame::Kind::Raft(pb::RaftBatch { messages: msgs.into_iter().map(Bytes::from).collect() })) };
            let b = encode_frame(&f);
            for cut in 0..b.len() {
                prop_assert_eq!(decode_frame(&b[..cut]).unwrap(), None);
            }
            let (g, used) = decode_frame(&b).unwrap().unwrap();
            prop_assert_eq!(used, b.len());
            prop_assert_eq!(g, f);
        }

        #[test]
        fn damaged_frames_are_rejected(at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let f = pb::Frame { kind: Some(pb::frame::Kind::Hello(pb::Hello { from_id: 7, cluster: "c".into() })) };
            let mut b = encode_frame(&f).to_vec();
            let i = 4 + at.index(b.len() - 4);
            b[i] ^= 1 << bit;
            prop_assert!(decode_frame(&b).is_err());
        }
    }
}
