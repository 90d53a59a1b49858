//! Compiles our Istio-compatible protos (workload, authorization, CA) with protox: no protoc needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/istio/workload.proto",
        "proto/istio/authorization.proto",
        "proto/istio/ca.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Ordered maps: encoding is deterministic, so a resource's version (a hash of its
        // bytes) only changes when its content does, also across control plane restarts.
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
