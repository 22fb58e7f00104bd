//! Generates the Open Inference Protocol's gRPC client from the service's
//! own interface (`../src/grpc/inference.proto`) with a vendored protoc, for
//! the protocols scenario's gRPC driver.

fn main() {
    let proto = "../src/grpc/inference.proto";
    println!("cargo:rerun-if-changed={proto}");
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("the vendored protoc for this platform");
    // prost-build runs the protoc that PROTOC names.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&[proto], &["../src/grpc"])
        .expect("inference.proto compiles");
}
