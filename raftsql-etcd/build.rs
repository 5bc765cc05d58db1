//! Compiles etcd's v3 API protos (../proto/etcd) with protox (pure Rust: no system protoc is
//! needed) and generates prost messages plus tonic server and client code with
//! tonic-prost-build. The output is `etcdserverpb.rs`, `mvccpb.rs` and `authpb.rs` in OUT_DIR,
//! included by src/pb.rs.
const ROOT: &str = "../proto/etcd";
const FILES: [&str; 3] = [
    "etcdserverpb/rpc.proto",
    "mvccpb/kv.proto",
    "authpb/auth.proto",
];
/// raftsql's own messages between the etcd facades of two nodes (forwarded writes).
const OWN: &str = "forward.proto";

fn main() {
    for file in FILES {
        println!("cargo:rerun-if-changed={ROOT}/{file}");
    }
    println!("cargo:rerun-if-changed=proto/{OWN}");
    let fds = protox::compile(FILES.iter().copied().chain([OWN]), [ROOT, "proto"])
        .expect("compile the etcd protos with protox");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // `bytes` fields (keys, values, snapshot blobs) as `bytes::Bytes`: decoded as slices
        // of the received buffer, cheap to clone, like raftsql-proto.
        .bytes(".")
        .compile_fds(fds)
        .expect("generate Rust for the etcd protos");
}
