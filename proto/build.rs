//! Generates the gRPC code from `proto/**.proto` with a vendored `protoc`, so building needs
//! no hand-installed protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/redpacket/v1/redpacket.proto",
        "proto/redpacket/raft/v1/raft.proto",
        "proto/redpacket/payment/v1/payment.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("redpacket_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
