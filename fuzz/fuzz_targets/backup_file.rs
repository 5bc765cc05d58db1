//! Fuzzes the backup file reader (`raftsql snapshot restore` / `snapshot status` read files
//! a user hands them). Must never panic or allocate without bound; a file it accepts names
//! only valid database files whose lengths add up to the file's size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use raftsql_core::backup;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.rsql");
    std::fs::write(&p, data).unwrap();
    if let Ok(h) = backup::verify(&p) {
        for f in &h.files {
            assert!(f.name.ends_with(".db") && !f.name.contains('/'), "bad file name accepted: {:?}", f.name);
        }
        assert!(h.data_bytes() <= data.len() as u64);
    }
});
