//! Compiles the plugin protocol with protox (pure Rust), so a build needs
//! no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/leasehold/plugin/v1/provider.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
