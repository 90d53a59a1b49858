//! The admin (15000), metrics (15020) and readiness (15021) endpoints.

use std::sync::Arc;

use http::{Method, StatusCode};
use mesh::admin::{AdminRequest, Reply, Router};
use tokio::sync::mpsc;

use crate::node::Node;

/// Changes the log filter at run time (`/logging?level=debug`).
pub type SetLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// `/config_dump`, `/logging`, `/quitquitquit`.
pub fn admin(node: Arc<Node>, quit: mpsc::Sender<()>, set_level: SetLevel) -> Router {
    Arc::new(move |req: AdminRequest<'_>| match req.path {
        "/config_dump" => {
            let state = node.state.borrow().clone();
            Reply::json(&serde_json::json!({
                "node": node.name,
                "capture": node.redirect_name(),
                "workloads": state.workloads().map(|w| &**w).collect::<Vec<_>>(),
                "services": state.services().map(|s| &**s).collect::<Vec<_>>(),
                "policies": state.policies().map(|p| &**p).collect::<Vec<_>>(),
                "certificates": node.certs.dump(),
                "enrolledPods": node.pod_dump(),
                "pendingPods": node.pending_dump(),
            }))
        }
        "/quitquitquit" if req.method == Method::POST => {
            let _ = quit.try_send(());
            Reply::text(StatusCode::OK, "draining\n")
        }
        "/logging" => {
            let level = req
                .query
                .split('&')
                .find_map(|kv| kv.strip_prefix("level="));
            match level {
                Some(level) => match set_level(level) {
                    Ok(()) => Reply::text(StatusCode::OK, format!("log level: {level}\n")),
                    Err(e) => Reply::text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                },
                None => Reply::text(StatusCode::BAD_REQUEST, "usage: /logging?level=<filter>\n"),
            }
        }
        "/" => Reply::text(
            StatusCode::OK,
            "/config_dump\n/logging?level=<filter>\n/quitquitquit (POST)\n",
        ),
        _ => Reply::not_found(),
    })
}

/// `/metrics` and `/stats/prometheus`.
pub fn metrics(node: Arc<Node>) -> Router {
    Arc::new(move |req: AdminRequest<'_>| match req.path {
        "/metrics" | "/stats/prometheus" => Reply {
            status: StatusCode::OK,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: mesh::metrics::encode(&node.metrics.registry),
        },
        _ => Reply::not_found(),
    })
}

/// `/healthz/ready`: every local mesh pod enrolled and holding a certificate.
pub fn readiness(node: Arc<Node>) -> Router {
    Arc::new(move |req: AdminRequest<'_>| match req.path {
        "/healthz/ready" if node.ready() => Reply::text(StatusCode::OK, "ready\n"),
        "/healthz/ready" => Reply::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => Reply::not_found(),
    })
}
