//! Compiles `proto/` with protox (pure Rust), so no system `protoc` is
//! needed, and keeps the descriptor set for gRPC server reflection.

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "demi/plugin/v1/plugin.proto",
        "demi/plugin/v1/host.proto",
        "demi/conductor/v1/conductor.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("demi_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(descriptors)?;

    // The Android bridge's contract is served by the bridge, not the
    // conductor: its own descriptor set, for the bridge's reflection.
    let android = "demi/android/v1/bridge.proto";
    println!("cargo:rerun-if-changed={android}");
    let descriptors = protox::compile([android], ["."])?;
    std::fs::write(
        out.join("android_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    // The rpc is `Connect`, which would clash with the generated client's
    // `connect(endpoint)` constructor: clients are made with `new(channel)`.
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
