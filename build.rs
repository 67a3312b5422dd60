//! Compiles `proto/api.proto` with protox, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["api.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Its Debug is written by hand (src/lib.rs): no credential in it.
        .skip_debug(["runtime.v1.AuthConfig"])
        .compile_fds(fds)?;
    Ok(())
}
