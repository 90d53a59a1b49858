//! The mesh the waypoint wire tests run pilot on: a namespace with a waypoint Gateway, its pod, a service bound to it and its routing, in a folder pilot watches.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh::control::ControlPlane;
use mesh::proto::ADDRESS_TYPE_URL;
use pilot::server::{Config, Running, Source, start};
use pilot::waypoint::{CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL};

pub const NODE_ID: &str = "router~10.244.1.9~waypoint-1.shop~shop.svc.cluster.local";
pub const HTTP: &str = "inbound-vip|80|http|web.shop.svc.cluster.local";
pub const HTTP_V1: &str = "inbound-vip|80|http/v1|web.shop.svc.cluster.local";
pub const HTTP_V2: &str = "inbound-vip|80|http/v2|web.shop.svc.cluster.local";

pub const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-1
  namespace: shop
  uid: uid-waypoint-1
  labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}
spec: {nodeName: node1, serviceAccountName: waypoint}
status: {podIP: 10.244.1.9}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: uid-web-1, labels: {app: web, version: v1}}
spec: {nodeName: node1, serviceAccountName: web}
status: {podIP: 10.244.1.5}
"#;

pub fn web_service(bound: bool) -> String {
    let labels = if bound {
        "{istio.io/use-waypoint: waypoint}"
    } else {
        "{}"
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop, labels: {labels}}}\nspec: {{clusterIP: 10.96.0.1, selector: {{app: web}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
    )
}

/// The DestinationRule (with `subsets`) and the VirtualService (one rule to `subset` for
/// `prefix`), in one file so that a change to both is one snapshot.
pub fn routing(prefix: &str, subset: &str, subsets: &[&str]) -> String {
    let subsets: Vec<String> = subsets
        .iter()
        .map(|s| format!("{{name: {s}, labels: {{version: {s}}}}}"))
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: shop}}\nspec: {{host: web, subsets: [{}]}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: shop}}\nspec:\n  hosts: [web]\n  http:\n  - name: pinned\n    match: [{{uri: {{prefix: {prefix}}}}}]\n    route: [{{destination: {{host: web, subset: {subset}}}}}]\n",
        subsets.join(", ")
    )
}

pub struct Env {
    pub dir: PathBuf,
    pub pilot: Running,
}

impl Env {
    pub async fn start() -> Env {
        let dir = std::env::temp_dir().join(format!("pilot-wp-{}", fastrand::u64(..)));
        std::fs::create_dir_all(dir.join("config")).unwrap();
        write(&dir, "mesh.yaml", MESH);
        write(&dir, "svc.yaml", &web_service(true));
        write(&dir, "routing.yaml", &routing("/v1", "v1", &["v1", "v2"]));
        let pilot = start(Config {
            source: Source::Folder(dir.join("config")),
            state_dir: dir.join("state"),
            listen: "127.0.0.1:0".parse().unwrap(),
            debug: Some("127.0.0.1:0".parse().unwrap()),
            mesh: Default::default(),
            max_cert_ttl: Duration::from_secs(3600),
            nodes: vec!["node1".into()],
        })
        .await
        .unwrap();
        Env { dir, pilot }
    }

    pub fn control(&self, token_file: PathBuf) -> ControlPlane {
        ControlPlane {
            address: format!("https://{}", self.pilot.addr),
            root_pem: self.pilot.root_pem.clone(),
            root_file: None,
            server_name: "pilot.istio-system.svc".into(),
            token_file,
        }
    }

    pub fn waypoint_token(&self) -> PathBuf {
        self.dir.join("state/tokens/sa/shop.waypoint.token")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn write(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join("config").join(file)).unwrap();
}

pub fn subscriptions() -> Vec<(&'static str, HashMap<String, String>)> {
    [
        CLUSTER_TYPE_URL,
        ENDPOINT_TYPE_URL,
        LISTENER_TYPE_URL,
        ROUTE_TYPE_URL,
        ADDRESS_TYPE_URL,
    ]
    .into_iter()
    .map(|t| (t, HashMap::new()))
    .collect()
}
