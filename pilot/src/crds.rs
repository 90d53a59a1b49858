//! Our own `CustomResource` types for the Istio and Gateway API kinds pilot watches; their content stays JSON for `k8s.rs` to validate.
//!
//! Why untyped: the watcher decodes a whole list page at once, so one object that does not fit a
//! strict Rust type would fail the list for every object of its kind (and keep pilot from ever
//! syncing). Kept as JSON, every object arrives, and `k8s.rs` reports a bad one as a `Problem`
//! naming its field, exactly as for the folder source.

use kube::CustomResource;
use serde::{Deserialize, Serialize};

// Each body is everything besides `apiVersion`, `kind` and `metadata`: `no_spec` puts its
// fields at the object's root, so `spec` may be absent (an AuthorizationPolicy without `spec`
// is valid: it denies everything its scope covers).

/// `security.istio.io/v1` AuthorizationPolicy.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    namespaced,
    no_spec,
    schema = "disabled"
)]
pub struct AuthorizationPolicyBody {
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub spec: serde_json::Value,
}

/// `networking.istio.io/v1` VirtualService.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "VirtualService",
    plural = "virtualservices",
    namespaced,
    no_spec,
    schema = "disabled"
)]
pub struct VirtualServiceBody {
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub spec: serde_json::Value,
}

/// `networking.istio.io/v1` DestinationRule.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "DestinationRule",
    plural = "destinationrules",
    namespaced,
    no_spec,
    schema = "disabled"
)]
pub struct DestinationRuleBody {
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub spec: serde_json::Value,
}

/// `gateway.networking.k8s.io/v1` Gateway.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "Gateway",
    plural = "gateways",
    namespaced,
    no_spec,
    schema = "disabled"
)]
pub struct GatewayBody {
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub spec: serde_json::Value,
}

/// A status kept as JSON (pilot keeps other controllers' parts of a route's status).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(transparent)]
pub struct RawStatus(pub serde_json::Value);

/// `gateway.networking.k8s.io/v1` HTTPRoute (with its `status`: pilot writes its own part).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    plural = "httproutes",
    status = "RawStatus",
    namespaced,
    no_spec,
    schema = "disabled"
)]
pub struct HttpRouteBody {
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub spec: serde_json::Value,
}

/// `gateway.networking.k8s.io/v1` GRPCRoute.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "GRPCRoute",
    plural = "grpcroutes",
    status = "RawStatus",
    namespaced,
    no_spec,
    schema = "disabled"
)]
pub struct GrpcRouteBody {
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub spec: serde_json::Value,
}

/// `gateway.networking.k8s.io/v1beta1` ReferenceGrant.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1beta1",
    kind = "ReferenceGrant",
    plural = "referencegrants",
    namespaced,
    no_spec,
    schema = "disabled"
)]
pub struct ReferenceGrantBody {
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub spec: serde_json::Value,
}

/// `networking.istio.io/v1` ServiceEntry.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "ServiceEntry",
    plural = "serviceentries",
    namespaced,
    no_spec,
    schema = "disabled"
)]
pub struct ServiceEntryBody {
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub spec: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    #[test]
    fn paths_and_round_trip() {
        assert_eq!(
            AuthorizationPolicy::url_path(&(), Some("shop")),
            "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies"
        );
        assert_eq!(
            Gateway::url_path(&(), None),
            "/apis/gateway.networking.k8s.io/v1/gateways"
        );
        // No spec at all, and a spec of the wrong shape: both decode, for k8s.rs to judge.
        let none: AuthorizationPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-all", "namespace": "shop"}
        }))
        .unwrap();
        assert!(none.spec.spec.is_null());
        let odd: VirtualService = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "r"}, "spec": {"hosts": "not-a-list"}
        }))
        .unwrap();
        let back = serde_json::to_value(&odd).unwrap();
        assert_eq!(back["apiVersion"], "networking.istio.io/v1");
        assert_eq!(back["kind"], "VirtualService");
        assert_eq!(back["spec"]["hosts"], "not-a-list");
    }
}
