//! Compiles the .proto files with protox (pure Rust), so no system protoc is needed.
fn main() {
    println!("cargo:rerun-if-changed=raftsql.proto");
    let fds = protox::compile(["raftsql.proto"], ["."]).expect("compile raftsql.proto");
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(fds)
        .expect("generate Rust for raftsql.proto");
}
