//! The etcd v3 facade over raftsql-core. Not built yet: see issue 4.
