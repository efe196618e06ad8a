//! Compiles the control protocol. protoc comes from the protoc-bin-vendored crate so a build
//! needs nothing installed beyond the Rust toolchain.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/cairn.proto");
    tonic_prost_build::configure().compile_protos(&["proto/cairn.proto"], &["proto"])?;
    Ok(())
}
