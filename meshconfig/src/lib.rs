//! The mesh's configuration: Kubernetes YAML (Pods, Services, Namespaces, Istio objects such as
//! AuthorizationPolicy and ServiceEntry, Gateway API objects) → one validated model (`k8s`,
//! `model`) → the xDS resources the proxies are served (`translate`: Istio's workload API for
//! ztunnel; `waypoint`: Envoy types for waypoints).
//!
//! pilot serves this translation over xDS; a standalone ztunnel runs the same reading,
//! validation and translation in-process on a folder of the same YAML, so there is one format
//! and one conversion. That is why this crate has no Kubernetes client (no kube, no
//! k8s-openapi) and no server parts: it reads objects as YAML values, names the file, object
//! and field of every problem, and leaves watching a cluster and serving to pilot.
#![deny(rust_2018_idioms)]

pub mod cluster_policy;
pub mod folder;
pub mod gateway_api;
pub mod k8s;
pub mod model;
pub mod rbac;
pub mod reference_grant;
pub mod route_policy;
pub mod routing;
pub mod service_entry;
pub mod translate;
pub mod waypoint;
