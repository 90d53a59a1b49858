//! The control plane: Kubernetes objects (a folder of YAML, or a cluster's API server) → one model → Istio's workload API over delta xDS, plus the CA.
#![deny(rust_2018_idioms)]

pub mod auth;
pub mod ca;
pub mod cluster;
pub mod cluster_policy;
pub mod crds;
pub mod folder;
pub mod gateway_api;
pub mod k8s;
pub mod model;
pub mod provision;
pub mod rbac;
pub mod reference_grant;
pub mod root_configmap;
pub mod roots;
pub mod route_policy;
pub mod route_status;
pub mod routing;
pub mod server;
pub mod serving;
pub mod token_review;
pub mod translate;
pub mod waypoint;
pub mod xds;
