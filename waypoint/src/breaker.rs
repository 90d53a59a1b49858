//! Circuit breaking (Envoy's `circuit_breakers` thresholds, default priority) per cluster:
//! `max_requests` requests in flight; for HTTP/1.1 upstreams each request in flight holds one
//! of `max_connections` connections, and requests waiting for one are the pending requests,
//! at most `max_pending_requests`; `max_retries` retries in flight. Past a limit the request
//! overflows: the waypoint answers 503 with flag `UO`, as Envoy.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl Default for Limits {
    /// Envoy's defaults when a cluster gives none (pilot always gives Istio's, unlimited).
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

/// The DEFAULT-priority thresholds of the cluster (HIGH priority is not used by routes here).
pub fn limits(c: &cluster_pb::Cluster) -> Result<Limits, String> {
    let mut l = Limits::default();
    let Some(cb) = &c.circuit_breakers else {
        return Ok(l);
    };
    for (i, t) in cb.thresholds.iter().enumerate() {
        if t.priority != 0 {
            continue;
        }
        if t.retry_budget.is_some() {
            return Err(format!(
                "circuit_breakers.thresholds[{i}].retry_budget: not supported"
            ));
        }
        let v = |x: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u32| {
            x.as_ref().map_or(d, |x| x.value)
        };
        l = Limits {
            max_connections: v(&t.max_connections, l.max_connections),
            max_pending_requests: v(&t.max_pending_requests, l.max_pending_requests),
            max_requests: v(&t.max_requests, l.max_requests),
            max_retries: v(&t.max_retries, l.max_retries),
        };
    }
    Ok(l)
}

/// Which limit a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    Requests,
    Pending,
    Retries,
}

/// The counters of one cluster; they outlive config pushes (carried to the rebuilt cluster).
#[derive(Debug, Default)]
pub struct Breaker {
    requests: AtomicU32,
    connections: AtomicU32,
    pending: AtomicU32,
    retries: AtomicU32,
    freed: Notify,
}

/// Held while a request is in flight; dropping it frees its slots.
#[derive(Debug)]
pub struct Permit {
    breaker: Arc<Breaker>,
    connection: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.breaker.requests.fetch_sub(1, Ordering::AcqRel);
        if self.connection {
            self.breaker.connections.fetch_sub(1, Ordering::AcqRel);
            self.breaker.freed.notify_one();
        }
    }
}

/// Held while a retry is in flight.
#[derive(Debug)]
pub struct RetryPermit(Arc<Breaker>);

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Take one unit of `counter` if it stays within `max`.
fn take(counter: &AtomicU32, max: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl Breaker {
    /// Admit one request. `per_connection`: each request in flight needs a connection of its
    /// own (HTTP/1.1); when none is free it waits as a pending request.
    pub async fn admit(
        self: &Arc<Self>,
        limits: &Limits,
        per_connection: bool,
    ) -> Result<Permit, Overflow> {
        if !take(&self.requests, limits.max_requests) {
            return Err(Overflow::Requests);
        }
        let mut permit = Permit {
            breaker: self.clone(),
            connection: false,
        };
        if !per_connection {
            return Ok(permit);
        }
        if take(&self.connections, limits.max_connections) {
            permit.connection = true;
            return Ok(permit);
        }
        if !take(&self.pending, limits.max_pending_requests) {
            return Err(Overflow::Pending);
        }
        // Waiting for a connection to be freed (the request's own timeout bounds the wait).
        struct Pending<'a>(&'a AtomicU32);
        impl Drop for Pending<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _pending = Pending(&self.pending);
        loop {
            let freed = self.freed.notified();
            if take(&self.connections, limits.max_connections) {
                permit.connection = true;
                return Ok(permit);
            }
            freed.await;
        }
    }

    /// Admit one retry (for the retry loop: past `max_retries` in flight, no retry).
    pub fn retry(self: &Arc<Self>, limits: &Limits) -> Result<RetryPermit, Overflow> {
        if take(&self.retries, limits.max_retries) {
            Ok(RetryPermit(self.clone()))
        } else {
            Err(Overflow::Retries)
        }
    }

    /// (requests, connections, pending, retries) in flight, for the admin page.
    pub fn in_flight(&self) -> (u32, u32, u32, u32) {
        (
            self.requests.load(Ordering::Acquire),
            self.connections.load(Ordering::Acquire),
            self.pending.load(Ordering::Acquire),
            self.retries.load(Ordering::Acquire),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(c: u32, p: u32, r: u32) -> Limits {
        Limits {
            max_connections: c,
            max_pending_requests: p,
            max_requests: r,
            max_retries: 1,
        }
    }

    #[tokio::test]
    async fn requests_limit_overflows_at_once() {
        let b = Arc::new(Breaker::default());
        let l = limits(10, 10, 2);
        let a = b.admit(&l, false).await.unwrap();
        let _c = b.admit(&l, false).await.unwrap();
        assert_eq!(b.admit(&l, false).await.unwrap_err(), Overflow::Requests);
        drop(a);
        let _d = b.admit(&l, false).await.unwrap();
        assert_eq!(b.in_flight().0, 2);
    }

    #[tokio::test]
    async fn connections_then_pending_then_overflow() {
        let b = Arc::new(Breaker::default());
        // Istio's circuit-breaking example: one connection, one pending request.
        let l = limits(1, 1, 100);
        let first = b.admit(&l, true).await.unwrap();
        let waiting = {
            let b = b.clone();
            tokio::spawn(async move { b.admit(&l, true).await.map(|_| ()) })
        };
        // Let the second one queue.
        while b.in_flight().2 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(b.admit(&l, true).await.unwrap_err(), Overflow::Pending);
        drop(first);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert_eq!(b.in_flight(), (0, 0, 0, 0), "everything given back");
    }

    #[tokio::test]
    async fn retries_limit() {
        let b = Arc::new(Breaker::default());
        let l = limits(1, 1, 1);
        let r = b.retry(&l).unwrap();
        assert_eq!(b.retry(&l).unwrap_err(), Overflow::Retries);
        drop(r);
        assert!(b.retry(&l).is_ok());
    }

    #[test]
    fn limits_from_clusters() {
        use envoy_types::pb::google::protobuf::UInt32Value;
        let mut c = cluster_pb::Cluster::default();
        assert_eq!(super::limits(&c).unwrap(), Limits::default());
        c.circuit_breakers = Some(cluster_pb::CircuitBreakers {
            thresholds: vec![cluster_pb::circuit_breakers::Thresholds {
                max_connections: Some(UInt32Value { value: 1 }),
                max_pending_requests: Some(UInt32Value { value: 2 }),
                ..Default::default()
            }],
            ..Default::default()
        });
        let l = super::limits(&c).unwrap();
        assert_eq!(
            (l.max_connections, l.max_pending_requests, l.max_requests),
            (1, 2, 1024)
        );
    }
}
