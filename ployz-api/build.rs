//! Compiles the protobuf API with protox, a pure-Rust protobuf compiler, so no
//! `protoc` is needed on the build machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/ployz/v1/ployz.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
