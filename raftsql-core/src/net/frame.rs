//! Frames: how every byte between nodes and clients is cut and checked.
//!
//! ```text
//! frame = len: u32 LE | crc32(payload): u32 LE | payload (protobuf Frame, len bytes)
//! ```
//! A declared length over the reader's limit is refused when its 8-byte prefix arrives,
//! before any payload is buffered; a checksum or protobuf error closes the connection.

use std::io;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use raftsql_proto::v1 as pb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The read half of a connection (plain TCP or TLS).
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// The write half of a connection (plain TCP or TLS).
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Both halves of a connection.
pub type Halves = (Reader, Writer);

/// Writes one encoded frame and flushes it.
pub(crate) async fn write_frame(w: &mut Writer, b: &[u8]) -> io::Result<()> {
    w.write_all(b).await?;
    w.flush().await
}

/// Bytes a connection's writer buffers before it writes them (see [`write_queued`]).
pub(crate) const WRITE_BUFFER: usize = 64 << 10;

/// Writes the encoded frames `rx` yields to `w`, as few system calls as it can: the frames
/// already queued when one is written go into the same buffer, and before each flush the
/// task yields once, so that the tasks woken by the same event queue theirs first (the
/// answers of one applied batch finish on as many tasks, one after the other). Returns when
/// `rx` ends, with the buffer written, or at the first write error.
pub(crate) async fn write_queued<W: AsyncWrite + Unpin>(
    w: W,
    rx: &mut tokio::sync::mpsc::Receiver<Bytes>,
) -> io::Result<tokio::io::BufWriter<W>> {
    let mut w = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, w);
    while let Some(b) = rx.recv().await {
        w.write_all(&b).await?;
        while let Ok(b) = rx.try_recv() {
            w.write_all(&b).await?;
        }
        tokio::task::yield_now().await;
        while let Ok(b) = rx.try_recv() {
            w.write_all(&b).await?;
        }
        w.flush().await?;
    }
    Ok(w)
}

/// Largest frame accepted from a peer (a Raft batch, a snapshot chunk, a forwarded write).
pub const MAX_FRAME: usize = 64 << 20;

/// Largest frame a client may send unless the node says otherwise
/// ([`crate::NodeConfig::max_request_bytes`]).
pub const DEFAULT_MAX_CLIENT_FRAME: usize = 16 << 20;

/// Largest frame before a connection has said hello, and on a joiner's connection.
pub const MAX_HELLO_FRAME: usize = 64 << 10;

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

/// The encoded `Hello` that opens every connection: the sender's id (0 for a client) and
/// its cluster's name.
pub fn hello(from_id: u64, cluster: &str) -> Bytes {
    encode_frame(&pb::Frame {
        kind: Some(pb::frame::Kind::Hello(pb::Hello {
            from_id,
            cluster: cluster.to_string(),
        })),
    })
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
