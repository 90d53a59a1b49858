//! The upstream HTTP connection pool's per-cluster limits and the decisions drawn from them,
//! as Envoy applies a cluster's `common_http_protocol_options` (`idle_timeout`,
//! `max_requests_per_connection`, `max_connection_duration`), its HTTP/2
//! `max_concurrent_streams` and its `upstream_connection_options.tcp_keepalive` (pilot fills
//! them from a DestinationRule's `connectionPool`).
//!
//! In ambient mode one upstream HTTP connection is one HBONE CONNECT stream to the endpoint, so
//! the HTTP limits apply to those connections: a connection that has served
//! `max_requests_per_connection` requests, or is older than `max_connection_duration`, takes no
//! new request and closes once its requests are done (dropping our handle does that in hyper);
//! one without an active request for `idle_timeout` is closed (unset: the waypoint's own idle
//! timeout; zero: never, as Envoy); an HTTP/2 connection carries at most
//! `max_concurrent_streams` requests at once and a request finding every connection full opens
//! another one, as Envoy's pool does below `max_connections`.
//!
//! TCP keepalive belongs to the socket the waypoint really dials: the HBONE (mTLS + HTTP/2)
//! connection to the endpoint's `:15008`. Envoy keeps a pool per cluster, so its keepalive is
//! per cluster; the waypoint shares HBONE connections between clusters, which would leave a
//! shared socket's keepalive to whichever cluster dialed first. So HBONE connections are pooled
//! per keepalive setting instead ([`Keepalive`] is part of the HBONE pool choice): a cluster
//! with its own keepalive gets sockets with exactly it, clusters that agree (most: none given)
//! still share. The HTTP connections are keyed by endpoint, protocol and [`Limits`] for the
//! same reason: requests of clusters with different limits never share a connection, while
//! clusters with the same limits (a service and its subsets, usually) do. Keepalive fields a
//! cluster leaves unset keep the waypoint's socket defaults (`mesh::socket::tune`: 180 s idle,
//! 180 s interval, 9 probes) rather than the OS's, since every HBONE socket starts with those.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as http_options;
use prost::Message;

use crate::config::{CommonHttpOptions, HTTP_PROTOCOL_OPTIONS};

/// TCP keepalive of the upstream socket (`upstream_connection_options.tcp_keepalive`): each
/// field unset keeps the waypoint's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Keepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

/// What a cluster says about its upstream connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Limits {
    /// `None`: the waypoint's own idle timeout; zero: never closed for idleness.
    pub idle_timeout: Option<Duration>,
    /// `None` (or 0 on the wire): unlimited.
    pub max_requests_per_connection: Option<u32>,
    pub max_connection_duration: Option<Duration>,
    /// HTTP/2 only; `None` (or 0 on the wire): the peer's SETTINGS decide.
    pub max_concurrent_streams: Option<u32>,
    pub keepalive: Option<Keepalive>,
}

impl Limits {
    /// The idle timeout in force (`None`: never).
    pub fn idle(&self, default: Duration) -> Option<Duration> {
        match self.idle_timeout {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => Some(default),
        }
    }

    /// How often the pool must look at connections under these limits so none outlives its
    /// idle timeout or lifetime by more than a quarter of it.
    pub fn check_period(&self, default_idle: Duration) -> Duration {
        let shortest = [self.idle(default_idle), self.max_connection_duration]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(default_idle);
        (shortest / 4).max(Duration::from_millis(10))
    }
}

/// The pool limits of a Cluster resource; `http` is its already parsed
/// `common_http_protocol_options`.
pub fn limits(c: &cluster_pb::Cluster, http: &CommonHttpOptions) -> Result<Limits, String> {
    use http_options::http_protocol_options::UpstreamProtocolOptions as U;
    use http_options::http_protocol_options::explicit_http_config::ProtocolConfig as P;
    let mut streams = None;
    if let Some(any) = c
        .typed_extension_protocol_options
        .get(HTTP_PROTOCOL_OPTIONS)
    {
        let o = http_options::HttpProtocolOptions::decode(&any.value[..])
            .map_err(|e| format!("undecodable HttpProtocolOptions: {e}"))?;
        let h2 = match o.upstream_protocol_options {
            Some(U::ExplicitHttpConfig(e)) => match e.protocol_config {
                Some(P::Http2ProtocolOptions(h2)) => Some(h2),
                _ => None,
            },
            Some(U::UseDownstreamProtocolConfig(d)) => d.http2_protocol_options,
            _ => None,
        };
        streams = h2
            .and_then(|h2| h2.max_concurrent_streams)
            .map(|v| v.value)
            .filter(|v| *v > 0);
    }
    let keepalive = c
        .upstream_connection_options
        .as_ref()
        .and_then(|o| o.tcp_keepalive.as_ref())
        .map(|k| {
            let secs = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>| {
                v.as_ref().map(|v| Duration::from_secs(u64::from(v.value)))
            };
            Keepalive {
                probes: k.keepalive_probes.as_ref().map(|v| v.value),
                time: secs(&k.keepalive_time),
                interval: secs(&k.keepalive_interval),
            }
        });
    if let Some(k) = &keepalive {
        for (field, v) in [
            ("keepalive_time", k.time),
            ("keepalive_interval", k.interval),
        ] {
            if v.is_some_and(|v| v.is_zero()) {
                return Err(format!(
                    "upstream_connection_options.tcp_keepalive.{field}: must be at least 1 second"
                ));
            }
        }
    }
    Ok(Limits {
        idle_timeout: http.idle_timeout,
        max_requests_per_connection: http.max_requests_per_connection.filter(|n| *n > 0),
        max_connection_duration: http.max_connection_duration.filter(|d| !d.is_zero()),
        max_concurrent_streams: streams,
        keepalive,
    })
}

/// One upstream HTTP connection's use so far, shared by its pool entry and the leases of the
/// requests on it.
#[derive(Debug)]
pub struct Usage {
    created: Instant,
    /// Requests sent on it, ever.
    requests: AtomicU32,
    /// Requests whose response has not ended.
    active: AtomicU32,
    /// When the last active request ended, as nanoseconds after `created`.
    idle_since: AtomicU64,
}

/// What the pool does with a connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It may take one more request.
    Usable,
    /// It is busy to its limit (HTTP/2 streams; an HTTP/1.1 exchange in flight): later.
    Full,
    /// Past its request count or lifetime: no new request; it closes once its requests end.
    Retired,
    /// Idle past its idle timeout: close it.
    Expired,
}

impl Usage {
    pub fn new(now: Instant) -> Arc<Usage> {
        Arc::new(Usage {
            created: now,
            requests: AtomicU32::new(0),
            active: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
        })
    }

    /// The verdict on this connection at `now`; `streams`: how many requests it may carry at
    /// once (1 for HTTP/1.1).
    pub fn verdict(
        &self,
        limits: &Limits,
        default_idle: Duration,
        streams: u32,
        now: Instant,
    ) -> Verdict {
        let requests = self.requests.load(Ordering::Acquire);
        let active = self.active.load(Ordering::Acquire);
        let age = now.saturating_duration_since(self.created);
        if limits
            .max_requests_per_connection
            .is_some_and(|m| requests >= m)
            || limits.max_connection_duration.is_some_and(|d| age >= d)
        {
            return Verdict::Retired;
        }
        if active == 0 {
            let idle_since =
                self.created + Duration::from_nanos(self.idle_since.load(Ordering::Acquire));
            if limits
                .idle(default_idle)
                .is_some_and(|t| now.saturating_duration_since(idle_since) >= t)
            {
                return Verdict::Expired;
            }
        }
        if active >= streams {
            return Verdict::Full;
        }
        Verdict::Usable
    }

    /// Count one request on this connection; it is active until the lease is dropped.
    pub fn lease(self: &Arc<Self>) -> Lease {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.active.fetch_add(1, Ordering::AcqRel);
        Lease(self.clone())
    }

    /// Requests sent on this connection.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Acquire)
    }

    /// Requests whose response has not ended.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }
}

/// One request's hold on its connection: the request is active until this is dropped (when
/// its response body ends).
#[derive(Debug)]
pub struct Lease(Arc<Usage>);

impl Lease {
    pub fn usage(&self) -> &Arc<Usage> {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let u = &self.0;
        let since = u.created.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        u.idle_since.fetch_max(since, Ordering::AcqRel);
        u.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A pooled connection's handle, as the pool needs to see it.
pub trait Sender {
    fn is_closed(&self) -> bool;
    /// Whether it can take a request now (an HTTP/1.1 connection: no exchange in flight).
    fn is_ready(&self) -> bool;
    /// Another handle to the same connection when it carries requests at once (HTTP/2);
    /// `None`: the handle itself is handed out (HTTP/1.1) and comes back with [`Conns::put`].
    fn share(&self) -> Option<Self>
    where
        Self: Sized;
    /// Requests it may carry at once.
    fn streams(limits: &Limits) -> u32;
}

/// The connections to one endpoint under one set of limits.
pub struct Conns<T> {
    list: Vec<(T, Arc<Usage>)>,
}

impl<T> Default for Conns<T> {
    fn default() -> Self {
        Conns { list: Vec::new() }
    }
}

impl<T: Sender> Conns<T> {
    /// A connection that takes one more request now, with that request's lease. Closed,
    /// retired and expired connections are dropped on the way.
    pub fn checkout(
        &mut self,
        limits: &Limits,
        default_idle: Duration,
        now: Instant,
    ) -> Option<(T, Lease)> {
        self.reap(limits, default_idle, now);
        let streams = T::streams(limits);
        let i = self.list.iter().position(|(s, u)| {
            s.is_ready() && u.verdict(limits, default_idle, streams, now) == Verdict::Usable
        })?;
        let lease = self.list[i].1.lease();
        let sender = match self.list[i].0.share() {
            Some(s) => s,
            None => self.list.swap_remove(i).0,
        };
        Some((sender, lease))
    }

    /// Keep `sender` (a new connection, or an HTTP/1.1 one handed back after its request went
    /// out) unless it is retired or the list holds `max` already; dropped, it closes once its
    /// requests end.
    pub fn put(
        &mut self,
        sender: T,
        usage: Arc<Usage>,
        limits: &Limits,
        default_idle: Duration,
        max: usize,
        now: Instant,
    ) {
        let keep = !sender.is_closed()
            && usage.verdict(limits, default_idle, u32::MAX, now) != Verdict::Retired
            && self.list.len() < max;
        if keep {
            self.list.push((sender, usage));
        }
    }

    /// Drop closed, retired and expired connections; whether any is left.
    pub fn reap(&mut self, limits: &Limits, default_idle: Duration, now: Instant) -> bool {
        self.list.retain(|(s, u)| {
            !s.is_closed()
                && !matches!(
                    u.verdict(limits, default_idle, u32::MAX, now),
                    Verdict::Retired | Verdict::Expired
                )
        });
        !self.list.is_empty()
    }

    /// Open connections kept.
    pub fn open(&self) -> usize {
        self.list.iter().filter(|(s, _)| !s.is_closed()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3 as envoy_core;
    use envoy_types::pb::google::protobuf::{Any, UInt32Value};
    use std::sync::atomic::AtomicBool;

    /// A handle whose state the test sets.
    #[derive(Clone, Default)]
    struct Fake {
        closed: Arc<AtomicBool>,
        busy: Arc<AtomicBool>,
        shared: bool,
    }

    impl Sender for Fake {
        fn is_closed(&self) -> bool {
            self.closed.load(Ordering::Relaxed)
        }
        fn is_ready(&self) -> bool {
            !self.busy.load(Ordering::Relaxed)
        }
        fn share(&self) -> Option<Self> {
            self.shared.then(|| self.clone())
        }
        fn streams(limits: &Limits) -> u32 {
            limits.max_concurrent_streams.unwrap_or(u32::MAX)
        }
    }

    const IDLE: Duration = Duration::from_secs(30);

    #[test]
    fn limits_from_a_cluster() {
        use http_options::http_protocol_options::explicit_http_config::ProtocolConfig as P;
        use http_options::http_protocol_options::{ExplicitHttpConfig, UpstreamProtocolOptions};
        let options = http_options::HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(P::Http2ProtocolOptions(
                        envoy_core::Http2ProtocolOptions {
                            max_concurrent_streams: Some(UInt32Value { value: 7 }),
                            ..Default::default()
                        },
                    )),
                },
            )),
            ..Default::default()
        };
        let mut c = cluster_pb::Cluster {
            upstream_connection_options: Some(cluster_pb::UpstreamConnectionOptions {
                tcp_keepalive: Some(envoy_core::TcpKeepalive {
                    keepalive_probes: Some(UInt32Value { value: 3 }),
                    keepalive_time: Some(UInt32Value { value: 20 }),
                    keepalive_interval: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        c.typed_extension_protocol_options.insert(
            HTTP_PROTOCOL_OPTIONS.into(),
            Any {
                type_url: String::new(),
                value: options.encode_to_vec(),
            },
        );
        let http = CommonHttpOptions {
            idle_timeout: Some(Duration::from_secs(5)),
            max_requests_per_connection: Some(0),
            max_connection_duration: Some(Duration::from_secs(60)),
        };
        let l = limits(&c, &http).unwrap();
        assert_eq!(
            l,
            Limits {
                idle_timeout: Some(Duration::from_secs(5)),
                max_requests_per_connection: None,
                max_connection_duration: Some(Duration::from_secs(60)),
                max_concurrent_streams: Some(7),
                keepalive: Some(Keepalive {
                    probes: Some(3),
                    time: Some(Duration::from_secs(20)),
                    interval: None,
                }),
            }
        );
        assert_eq!(
            limits(&cluster_pb::Cluster::default(), &Default::default()).unwrap(),
            Limits::default()
        );
        c.upstream_connection_options
            .as_mut()
            .and_then(|o| o.tcp_keepalive.as_mut())
            .unwrap()
            .keepalive_interval = Some(UInt32Value { value: 0 });
        let e = limits(&c, &http).unwrap_err();
        assert!(e.contains("tcp_keepalive.keepalive_interval"), "{e}");
    }

    #[test]
    fn idle_timeout_default_zero_and_check_period() {
        let l = Limits::default();
        assert_eq!(l.idle(IDLE), Some(IDLE));
        assert_eq!(l.check_period(IDLE), IDLE / 4);
        let l = Limits {
            idle_timeout: Some(Duration::ZERO),
            ..Default::default()
        };
        assert_eq!(l.idle(IDLE), None, "zero turns the idle timeout off");
        let l = Limits {
            idle_timeout: Some(Duration::from_secs(1)),
            max_connection_duration: Some(Duration::from_millis(400)),
            ..Default::default()
        };
        assert_eq!(l.check_period(IDLE), Duration::from_millis(100));
    }

    #[test]
    fn retired_after_max_requests_or_lifetime() {
        let t0 = Instant::now();
        let l = Limits {
            max_requests_per_connection: Some(2),
            ..Default::default()
        };
        let u = Usage::new(t0);
        assert_eq!(u.verdict(&l, IDLE, 1, t0), Verdict::Usable);
        let a = u.lease();
        assert_eq!(u.verdict(&l, IDLE, 1, t0), Verdict::Full, "HTTP/1.1 busy");
        assert_eq!(u.verdict(&l, IDLE, 2, t0), Verdict::Usable);
        let b = u.lease();
        assert_eq!(u.verdict(&l, IDLE, 9, t0), Verdict::Retired);
        drop((a, b));
        assert_eq!(u.verdict(&l, IDLE, 9, t0), Verdict::Retired);
        assert_eq!(u.requests(), 2);
        assert_eq!(u.active(), 0);

        let l = Limits {
            max_connection_duration: Some(Duration::from_secs(10)),
            ..Default::default()
        };
        let u = Usage::new(t0);
        let _busy = u.lease();
        assert_eq!(
            u.verdict(&l, IDLE, 9, t0 + Duration::from_secs(9)),
            Verdict::Usable
        );
        assert_eq!(
            u.verdict(&l, IDLE, 9, t0 + Duration::from_secs(10)),
            Verdict::Retired,
            "too old for new requests even while busy"
        );
    }

    #[test]
    fn expires_only_when_idle_for_the_timeout() {
        let t0 = Instant::now();
        let l = Limits {
            idle_timeout: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        let u = Usage::new(t0);
        let lease = u.lease();
        let later = t0 + Duration::from_secs(5);
        assert_eq!(
            u.verdict(&l, IDLE, 1, later),
            Verdict::Full,
            "busy: not idle"
        );
        drop(lease);
        let ended = Instant::now();
        assert_eq!(u.verdict(&l, IDLE, 1, ended), Verdict::Usable);
        assert_eq!(
            u.verdict(&l, IDLE, 1, ended + Duration::from_secs(2)),
            Verdict::Expired
        );
        let off = Limits {
            idle_timeout: Some(Duration::ZERO),
            ..Default::default()
        };
        assert_eq!(
            u.verdict(&off, IDLE, 1, ended + Duration::from_secs(3600)),
            Verdict::Usable
        );
    }

    #[test]
    fn http1_connections_are_handed_out_and_retired() {
        let t0 = Instant::now();
        let l = Limits {
            max_requests_per_connection: Some(2),
            ..Default::default()
        };
        let mut conns = Conns::<Fake>::default();
        assert!(conns.checkout(&l, IDLE, t0).is_none());
        // A new connection, its first request sent: back into the pool.
        let u = Usage::new(t0);
        let first = u.lease();
        conns.put(Fake::default(), u.clone(), &l, IDLE, 32, t0);
        assert_eq!(conns.open(), 1);
        drop(first);
        // The second request takes it out; handed back, it is retired (2 requests) and gone.
        let (s, second) = conns.checkout(&l, IDLE, t0).unwrap();
        assert_eq!(conns.open(), 0, "an HTTP/1.1 handle is lent, not shared");
        conns.put(s, second.usage().clone(), &l, IDLE, 32, t0);
        assert_eq!(conns.open(), 0, "retired after max_requests_per_connection");
        assert!(conns.checkout(&l, IDLE, t0).is_none());
        // A busy or closed one is not handed out.
        let busy = Fake::default();
        busy.busy.store(true, Ordering::Relaxed);
        conns.put(busy.clone(), Usage::new(t0), &l, IDLE, 32, t0);
        assert!(conns.checkout(&l, IDLE, t0).is_none());
        busy.busy.store(false, Ordering::Relaxed);
        busy.closed.store(true, Ordering::Relaxed);
        assert!(conns.checkout(&l, IDLE, t0).is_none());
        assert!(!conns.reap(&l, IDLE, t0), "the closed one is forgotten");
        // At most `max` kept.
        for _ in 0..3 {
            conns.put(Fake::default(), Usage::new(t0), &l, IDLE, 2, t0);
        }
        assert_eq!(conns.open(), 2);
    }

    #[test]
    fn http2_streams_limit_opens_another_connection() {
        let t0 = Instant::now();
        let l = Limits {
            max_concurrent_streams: Some(2),
            ..Default::default()
        };
        let mut conns = Conns::<Fake>::default();
        let shared = Fake {
            shared: true,
            ..Default::default()
        };
        let u = Usage::new(t0);
        let a = u.lease();
        conns.put(shared, u.clone(), &l, IDLE, usize::MAX, t0);
        let (_, b) = conns.checkout(&l, IDLE, t0).unwrap();
        assert_eq!(conns.open(), 1, "an HTTP/2 handle is shared");
        assert!(
            conns.checkout(&l, IDLE, t0).is_none(),
            "two streams active: a third request needs another connection"
        );
        drop(a);
        let (_, c) = conns.checkout(&l, IDLE, t0).unwrap();
        assert_eq!(u.requests(), 3);
        drop((b, c));
        // Idle past the waypoint's default: reaped.
        assert!(!conns.reap(&l, IDLE, Instant::now() + IDLE));
    }
}
