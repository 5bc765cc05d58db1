//! Fuzzes the Raft entry decoder (bytes read from the log on disk and from peers).
//! Decoding must never panic; whatever decodes must re-encode to the same bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use raftsql_core::entry::Frames;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frames::decode(Bytes::copy_from_slice(data)) {
        assert_eq!(&f.encode()[..], data, "decode/encode is not a round trip");
    }
});
