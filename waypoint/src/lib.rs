//! The waypoint: a per-namespace L7 proxy. It terminates HBONE for the services bound to it,
//! routes HTTP as Envoy's RouteConfiguration says (or proxies TCP), and originates HBONE to the
//! chosen pod. Its configuration comes from pilot over delta ADS with Envoy's v3 types.
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod balancer;
pub mod breaker;
pub mod config;
pub mod cors;
pub mod fault;
pub mod inbound;
pub mod log_writer;
pub mod metrics;
pub mod mirror;
pub mod origination;
pub mod outlier;
pub mod pool;
pub mod rbac;
pub mod request;
pub mod retry;
pub mod route;
pub mod tcp;
pub mod upstream;
pub mod xds;
pub mod xfcc;

use std::sync::Arc;

use tokio::sync::watch;

/// What every tunnel and request of the waypoint shares.
pub struct Waypoint {
    /// The current configuration; each tunnel and request takes the `Arc` it starts with.
    pub config: watch::Receiver<Arc<config::Config>>,
    pub upstream: upstream::Upstream,
    pub metrics: metrics::Metrics,
    /// Request bodies kept for retries up to this many bytes (a longer one is not retried).
    pub retry_buffer_bytes: usize,
}
