//! Integration tests of raftsql with real processes: see `tests/*.rs`. The binary
//! `raftsql-under-test` is the `raftsql` CLI (same code), built so that tests can find it
//! with `CARGO_BIN_EXE_raftsql-under-test`.
