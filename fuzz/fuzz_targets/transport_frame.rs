//! Fuzzes what a node decodes from a TCP peer or client: the length-prefixed, checksummed
//! frame, and inside a Raft batch each eraftpb::Message. Must never panic.
//!
//! The first byte chooses whether to fix up the frame's length and checksum so that the
//! fuzzer reaches the protobuf decoders behind them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protobuf::Message as _;
use raftsql_core::fuzzing::decode_frame;
use raftsql_proto::v1 as pb;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let buf = if mode & 1 == 1 {
        let mut b = Vec::with_capacity(rest.len() + 8);
        b.extend_from_slice(&(rest.len() as u32).to_le_bytes());
        b.extend_from_slice(&crc32fast::hash(rest).to_le_bytes());
        b.extend_from_slice(rest);
        b
    } else {
        rest.to_vec()
    };
    if let Ok(Some((frame, used))) = decode_frame(&buf) {
        assert!(used <= buf.len());
        if let Some(pb::frame::Kind::Raft(batch)) = frame.kind {
            for m in batch.messages {
                let _ = raft::eraftpb::Message::parse_from_bytes(&m);
            }
        }
    }
});
