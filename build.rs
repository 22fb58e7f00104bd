//! Embeds an rpath to libtorch's shared libraries, so the binaries, tests and
//! benches run without `LD_LIBRARY_PATH`; generates the gRPC service of the
//! Open Inference Protocol from `src/grpc/inference.proto` with a vendored
//! protoc (no system package needed).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(root) = std::env::var("LIBTORCH") {
        let lib = Path::new(&root).join("lib");
        let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    generate_grpc();
}

fn generate_grpc() {
    let proto = "src/grpc/inference.proto";
    println!("cargo:rerun-if-changed={proto}");
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("the vendored protoc for this platform");
    // prost-build runs the protoc that PROTOC names.
    std::env::set_var("PROTOC", protoc);
    // The client is for the load tool, which measures gRPC against HTTP.
    tonic_prost_build::configure().compile_protos(&[proto], &["src/grpc"]).expect("src/grpc/inference.proto compiles");
}
