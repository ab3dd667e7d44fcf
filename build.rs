//! Compiles `proto/` with the pure-Rust protox compiler, so building needs no system `protoc`,
//! and writes the descriptor set that gRPC reflection serves. The generated code uses
//! lagprobe's own codec (`src/grpc/codec.rs`), so a request that does not decode is the
//! caller's INVALID_ARGUMENT rather than tonic's INTERNAL.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/lagprobe/v1/probe.proto"];
    println!("cargo:rerun-if-changed=proto");

    let descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("lagprobe_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::grpc::codec::ProbeCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
