//! Compiles the protobuf API with protox, a pure-Rust protobuf compiler, so no
//! `protoc` is needed on the build machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/ployz/v1/ployz.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    // Every message serializes to JSON with its protobuf field names: that is
    // what `ployzctl --json` prints, so the field names are a stable contract.
    tonic_prost_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize)]")
        // `machine add` reads the target's `mesh join-prepare --json` back.
        .type_attribute(
            "ployz.v1.MeshJoinPrepareResponse",
            "#[derive(serde::Deserialize)] #[serde(default)]",
        )
        // ... and its `mesh join --json`, for the route certificate.
        .type_attribute(
            "ployz.v1.MeshJoinResponse",
            "#[derive(serde::Deserialize)] #[serde(default)]",
        )
        .compile_fds(descriptors)?;
    Ok(())
}
