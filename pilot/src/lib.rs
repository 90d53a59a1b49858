//! The control plane: Kubernetes objects (a folder of YAML, or a cluster's API server) → one model → Istio's workload API over delta xDS, plus the CA.
#![deny(rust_2018_idioms)]

// Reading, validating and translating the configuration live in `meshconfig` (no Kubernetes
// client, shared with standalone ztunnel); re-exported under their old paths.
pub use meshconfig::{
    cluster_policy, folder, gateway_api, k8s, model, rbac, reference_grant, route_policy, routing,
    translate, waypoint,
};

pub mod auth;
pub mod ca;
pub mod cluster;
pub mod crds;
pub mod provision;
pub mod root_configmap;
pub mod roots;
pub mod route_status;
pub mod server;
pub mod serving;
pub mod token_review;
pub mod xds;
