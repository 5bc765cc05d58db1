//! Fuzzes the snapshot manifest carried in a Raft snapshot message from a peer.
//! Must never panic; an accepted manifest only names valid database files.
#![no_main]

use libfuzzer_sys::fuzz_target;
use raftsql_core::fuzzing::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        for f in &m.files {
            assert!(f.name.ends_with(".db") && !f.name.contains('/'), "bad file name accepted: {:?}", f.name);
        }
    }
});
