//! Fuzzes the Raft entry decoder (bytes read from the log on disk and from peers).
//! Decoding must never panic; whatever decodes in the current version must re-encode to the
//! same bytes (an older version re-encodes to an entry that decodes to the same value).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use raftsql_core::fuzzing::Frames;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frames::decode(Bytes::copy_from_slice(data)) {
        let again = f.encode();
        if data[2] == 2 {
            assert_eq!(&again[..], data, "decode/encode is not a round trip");
        }
        assert_eq!(Frames::decode(again).unwrap(), f, "re-encoding changed the entry");
        for p in &f.pages {
            // Applying a decoded change to any base never panics.
            let _ = p.apply_to(None, f.page_size as usize);
            let _ = p.apply_to(Some(&vec![1u8; f.page_size as usize]), f.page_size as usize);
        }
    }
});
