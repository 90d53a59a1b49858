//! Generated types of our Istio-compatible protos, shared by the control plane and the proxies.
#![allow(clippy::all, missing_docs)]

pub mod workload {
    tonic::include_proto!("istio.workload");
}

pub mod security {
    tonic::include_proto!("istio.security");
}

pub mod ca {
    tonic::include_proto!("istio.v1.auth");
}

/// Type URL of `Address` resources (workloads and services).
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of `Authorization` resources.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
