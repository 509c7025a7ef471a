//! Compiles the wire contract. `protoc` comes from the `protoc-bin-vendored` crate so a fresh machine
//! needs nothing but crates.io; a `PROTOC` set in the environment still wins.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("qnode_v1_descriptor.bin"))
        // Malformed request bodies are INVALID_ARGUMENT, not tonic's INTERNAL.
        .codec_path("crate::grpc::codec::Codec")
        .compile_protos(
            &[
                "proto/qnode/v1/inference.proto",
                "proto/qnode/v1/admin.proto",
                "proto/grpc/health/v1/health.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
