//! Compiles the wire contract (the server's `proto/`) with protox: pure
//! Rust, no system `protoc`. Client code only.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto");
    let fds = protox::compile(["idemd/v1/idempotency.proto", "idemd/v1/admin.proto"], ["../../proto"])?;
    tonic_prost_build::configure().build_server(false).compile_fds(fds)?;
    Ok(())
}
