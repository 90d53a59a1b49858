//! A small HTTP/1.1 server for the admin, metrics and readiness ports.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

/// What a route answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
    pub fn json(value: &impl serde::Serialize) -> Self {
        match serde_json::to_string_pretty(value) {
            Ok(body) => Reply {
                status: StatusCode::OK,
                content_type: "application/json",
                body,
            },
            Err(e) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
    pub fn not_found() -> Self {
        Reply::text(StatusCode::NOT_FOUND, "not found\n")
    }
}

/// A request as routes see it.
#[derive(Debug)]
pub struct AdminRequest<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: &'a str,
}

pub type Router = Arc<dyn Fn(AdminRequest<'_>) -> Reply + Send + Sync>;

/// Serve `router` on `listener` until `drain` signals.
pub async fn serve(listener: TcpListener, router: Router, drain: crate::drain::Watch) {
    while let Some((tcp, peer)) = crate::drain::accept(&listener, &drain).await {
        let router = router.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let reply = router(AdminRequest {
                    method: req.method(),
                    path: req.uri().path(),
                    query: req.uri().query().unwrap_or(""),
                });
                let rsp = Response::builder()
                    .status(reply.status)
                    .header("content-type", reply.content_type)
                    .body(Full::new(Bytes::from(reply.body)))
                    .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
                async move { Ok::<_, Infallible>(rsp) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await
            {
                debug!(%peer, "admin connection: {e}");
            }
        });
    }
}
