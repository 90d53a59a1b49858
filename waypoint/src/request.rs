//! The HTTP request path inside one HBONE tunnel: hyper serves HTTP/1.1 or HTTP/2 on the
//! tunnel, and each request goes through `handle`, top to bottom: route lookup, the route's
//! action, the upstream exchange, header operations, then metrics and the access log when the
//! response body ends.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mesh::drain;
use mesh::hbone::io::H2Io;
use mesh::identity::Identity;
use mesh::state::{Service, Workload};
use tracing::{debug, info};

use crate::Waypoint;
use crate::config::{Cluster, Config, Listener, ListenerKind, Routes, UpstreamProtocol};
use crate::metrics::Peers;
use crate::route::{self, Action};
use crate::upstream::{Protocol, UpstreamBody};
use crate::{cors, fault, mirror, retry};

/// Who is on the other end of a tunnel, worked out once when it was accepted.
#[derive(Debug)]
pub struct Tunnel {
    pub listener: Arc<Listener>,
    /// The CONNECT authority: the service VIP and port the client dialled.
    pub authority: SocketAddr,
    /// The original client (`forwarded: for=`, else the HBONE peer).
    pub client: SocketAddr,
    pub peer: Identity,
    pub source_workload: Option<Arc<Workload>>,
    pub service: Option<Arc<Service>>,
    /// `istio.source` for route matching.
    pub source: route::Source,
    /// The peer's SPIFFE identity as text, for authorization (RBAC) matchers.
    pub peer_principal: String,
    /// This client's `x-forwarded-client-cert` element, when the listener adds one.
    pub xfcc_element: Option<http::HeaderValue>,
}

/// Serve HTTP on an accepted tunnel until the client closes it or the drain ends it.
pub async fn serve(waypoint: Arc<Waypoint>, tunnel: Arc<Tunnel>, io: H2Io, drain: drain::Watch) {
    let service = service_fn(move |req| {
        let waypoint = waypoint.clone();
        let tunnel = tunnel.clone();
        async move { Ok::<_, Infallible>(handle(&waypoint, &tunnel, req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client may half-close after its request (the tunnel carries its FIN as the end of
    // the stream): it still gets its answer, as from Envoy or the app itself.
    builder.http1().half_close(true);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { debug!("HTTP in tunnel: {e}") },
        _ = drain.signaled() => {
            // Finish the request in flight, refuse new ones (Connection: close / GOAWAY).
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                debug!("HTTP in tunnel while draining: {e}");
            }
        }
    }
}

/// One request, from route lookup to the response handed back to hyper.
pub async fn handle(
    w: &Arc<Waypoint>,
    tunnel: &Tunnel,
    mut req: Request<Incoming>,
) -> Response<ResponseBody> {
    let start = Instant::now();
    let config: Arc<Config> = w.config.borrow().clone();
    let protocol = if req.version() == Version::HTTP_2 {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    if let ListenerKind::Http { xfcc, .. } = &tunnel.listener.kind {
        xfcc.apply(req.headers_mut(), tunnel.xfcc_element.as_ref());
    }
    let authority = request_authority(&req);
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let scheme = request_scheme(&req).to_string();
    let mut log = Log {
        start,
        started: SystemTime::now(),
        method: req.method().to_string(),
        authority: authority.clone(),
        path: path.clone(),
        protocol,
        client: tunnel.client,
        peer: tunnel.peer.to_string(),
        listener: tunnel.listener.name.clone(),
        route: String::new(),
        cluster: String::new(),
        upstream: None,
        upstream_workload: None,
        status: 0,
        flags: "-",
        request_bytes: Arc::new(AtomicU64::new(0)),
        traceparent: header_text(req.headers(), "traceparent"),
        request_id: header_text(req.headers(), "x-request-id"),
        cors: None,
        attempts: 0,
        details: None,
    };

    let table = match &tunnel.listener.kind {
        ListenerKind::Http {
            routes: Routes::Rds(name),
            ..
        } => config.routes.get(name).cloned(),
        ListenerKind::Http {
            routes: Routes::Inline(t),
            ..
        } => Some(t.clone()),
        ListenerKind::Tcp { .. } => None,
    };
    let view = route::Request {
        method: req.method().as_str(),
        scheme: &scheme,
        authority: &authority,
        path: &path,
        headers: req.headers(),
        source: &tunnel.source,
    };
    // The route is chosen when the request arrives (Envoy caches it before the filters run),
    // then the RBAC filters decide, before the router acts on the route.
    let found = table.as_ref().and_then(|t| Some((t, t.find(&view)?)));
    if let ListenerKind::Http { filters, .. } = &tunnel.listener.kind
        && !filters.rbac.is_empty()
    {
        let subject = crate::rbac::Subject {
            request: &view,
            peer: &tunnel.peer_principal,
            client: tunnel.client.ip(),
            destination: tunnel.authority,
        };
        let denied = crate::rbac::check(&filters.rbac, &subject, |v, shadow| {
            w.metrics.rbac(v, shadow);
            if shadow && !v.allowed {
                debug!(policy = ?v.policy, "shadow (dry-run) rules would deny the request");
            }
        });
        if let Some(v) = denied {
            // Envoy sets no response flag for this; its response code details name the policy.
            log.details = Some(format!(
                "rbac_access_denied_matched_policy[{}]",
                v.policy.as_deref().map_or("none", |p| p.as_str())
            ));
            log.flags = "-";
            log.status = StatusCode::FORBIDDEN.as_u16();
            let mut rsp = Response::new(ResponseBody::bytes(Bytes::from_static(
                crate::rbac::DENIED_BODY.as_bytes(),
            )));
            *rsp.status_mut() = StatusCode::FORBIDDEN;
            rsp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            // As Envoy's local replies on a chosen route: its response header operations apply.
            if let Some((table, (vhost, route))) = &found {
                log.route = route.name.clone();
                for ops in [
                    &route.response_headers,
                    &vhost.response_headers,
                    &table.response_headers,
                ] {
                    ops.apply(rsp.headers_mut());
                }
            }
            return finish(w, tunnel, log, rsp);
        }
    }
    let Some((table, (vhost, route))) = found else {
        return local_reply(
            w,
            tunnel,
            log,
            StatusCode::NOT_FOUND,
            "NR",
            "no route matched\n",
        );
    };
    log.route = route.name.clone();
    let response_ops = [
        &route.response_headers,
        &vhost.response_headers,
        &table.response_headers,
    ];
    // The HTTP filters before the router, in Istio's order: CORS, then fault injection.
    if let ListenerKind::Http { filters, .. } = &tunnel.listener.kind {
        if filters.cors {
            let policies =
                cors::Policies([route.filters.cors.as_deref(), vhost.filters.cors.as_deref()]);
            match cors::check(
                &policies,
                req.method().as_str(),
                req.headers(),
                fastrand::u32(..1_000_000),
            ) {
                cors::Outcome::Pass => {}
                cors::Outcome::Preflight(headers) => {
                    let mut rsp = Response::new(ResponseBody::bytes(Bytes::new()));
                    *rsp.headers_mut() = headers;
                    return finish(w, tunnel, log, rsp);
                }
                cors::Outcome::Request(headers) => {
                    if !headers.is_empty() {
                        log.cors = Some(headers);
                    }
                }
            }
        }
        if let Some(filter_fault) = &filters.fault {
            // The most specific config wins: route, virtual host, the filter's own.
            let fault = route
                .filters
                .fault
                .as_ref()
                .or(vhost.filters.fault.as_ref())
                .unwrap_or(filter_fault);
            if let Some(fault) = fault {
                let d = fault.decide(fastrand::u32(..1_000_000), fastrand::u32(..1_000_000));
                if let Some(delay) = d.delay {
                    log.flags = "DI";
                    tokio::time::sleep(delay).await;
                }
                if let Some(abort) = d.abort {
                    let grpc = is_grpc(req.headers());
                    let mut rsp = fault_reply(w, tunnel, log, abort, grpc, d.delay.is_some());
                    for o in response_ops {
                        o.apply(rsp.headers_mut());
                    }
                    return rsp;
                }
            }
        }
    }

    let forward = match &route.action {
        Action::Direct { status, body } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            let mut rsp = Response::new(ResponseBody::bytes(body.clone()));
            *rsp.status_mut() = status;
            // As Envoy's local replies: a body is plain text unless the route says otherwise.
            if !body.is_empty() {
                rsp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
            for ops in response_ops {
                ops.apply(rsp.headers_mut());
            }
            return finish(w, tunnel, log, rsp);
        }
        Action::Redirect(r) => {
            let location = route.redirect_location(r, &view);
            let mut rsp = Response::new(ResponseBody::bytes(Bytes::new()));
            *rsp.status_mut() =
                StatusCode::from_u16(r.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
            if let Ok(v) = HeaderValue::from_str(&location) {
                rsp.headers_mut().insert(header::LOCATION, v);
            }
            for ops in response_ops {
                ops.apply(rsp.headers_mut());
            }
            return finish(w, tunnel, log, rsp);
        }
        Action::Forward(f) => f,
    };

    let target = forward.targets.pick(fastrand::u64(..));
    log.cluster = target.cluster.clone();
    let Some(cluster) = config.clusters.get(&target.cluster) else {
        return route_reply(
            w,
            tunnel,
            log,
            StatusCode::from_u16(forward.cluster_not_found)
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "NC",
            "no cluster\n",
            response_ops,
        );
    };

    // The request's hash, for consistent-hash clusters (and the cookie Envoy would set when a
    // cookie policy with a TTL found none).
    let (hash, set_cookie) = if forward.hash_policy.is_empty() {
        (None, None)
    } else {
        crate::balancer::request_hash(
            &forward.hash_policy,
            req.headers(),
            req.uri().query(),
            tunnel.client,
            tunnel.authority,
        )
    };

    // The upstream request: hop-by-hop headers dropped, header operations from the most
    // specific level out, rewrites, then the URI in the form the upstream protocol wants.
    let client_upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let new_path = route.rewritten_path(forward, &path);
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, client_upgrade.is_some());
    for ops in [
        &target.request_headers,
        &route.request_headers,
        &vhost.request_headers,
        &table.request_headers,
    ] {
        ops.apply(&mut parts.headers);
    }
    let host_rewrite = target
        .host_rewrite
        .as_ref()
        .or(forward.host_rewrite.as_ref())
        .and_then(|h| h.to_str().ok());
    // Envoy's request headers: the scheme and a request id when the client sent none, and the
    // original host and path when the route rewrote them (apps behind Istio see these).
    if !parts.headers.contains_key(X_FORWARDED_PROTO)
        && let Ok(v) = HeaderValue::from_str(&scheme)
    {
        parts.headers.insert(X_FORWARDED_PROTO, v);
    }
    if !parts.headers.contains_key(X_REQUEST_ID) {
        let id = request_id();
        log.request_id = id.to_str().ok().map(str::to_string);
        parts.headers.insert(X_REQUEST_ID, id);
    }
    // Envoy records the original host for the route's host rewrite only, not for a weighted
    // cluster's own.
    if forward.host_rewrite.is_some()
        && let Ok(v) = HeaderValue::from_str(&authority)
    {
        parts.headers.insert(X_ENVOY_ORIGINAL_HOST, v);
    }
    if new_path.is_some()
        && let Ok(v) = HeaderValue::from_str(&path)
    {
        parts.headers.insert(X_ENVOY_ORIGINAL_PATH, v);
    }
    // The retry policy (none for an upgrade: the connection then belongs to the two ends).
    let retry = forward.retry.as_ref().filter(|_| client_upgrade.is_none());
    // Envoy tells the upstream how long the proxy waits: the per-try timeout when it is the
    // shorter, else the route timeout.
    let per_try = retry.and_then(|p| p.per_try_timeout);
    let expected = match (per_try, forward.timeout) {
        (Some(p), Some(g)) if p < g => Some(p),
        (Some(p), None) => Some(p),
        (_, g) => g,
    };
    if let Some(t) = expected {
        parts.headers.insert(
            X_ENVOY_EXPECTED_RQ_TIMEOUT_MS,
            HeaderValue::from(t.as_millis() as u64),
        );
    }
    let host = host_rewrite.unwrap_or(&authority).to_string();
    let path = new_path.as_deref().unwrap_or(&path);
    // The cluster decides the version spoken upstream, as Envoy's protocol options do.
    let upstream_protocol = upstream_protocol_of(cluster, protocol);
    let Ok(uri) = upstream_uri(&mut parts.headers, upstream_protocol, &scheme, &host, path) else {
        return route_reply(
            w,
            tunnel,
            log,
            StatusCode::BAD_REQUEST,
            "DPE",
            "bad request path\n",
            response_ops,
        );
    };
    parts.uri = uri;
    parts.version = match upstream_protocol {
        Protocol::Http1 => Version::HTTP_11,
        Protocol::Http2 => Version::HTTP_2,
    };

    // Circuit breaking: over the cluster's limits the request is answered 503 `UO` at once;
    // waiting for a connection (HTTP/1.1) counts against the route timeout.
    let admitted = tokio::time::timeout(
        forward.timeout.unwrap_or(std::time::Duration::MAX),
        cluster.breaker.admit(
            &cluster.policy.limits,
            upstream_protocol == Protocol::Http1 || client_upgrade.is_some(),
        ),
    )
    .await;
    let permit = match admitted {
        Ok(Ok(p)) => p,
        Ok(Err(overflow)) => {
            cluster.stats.rq_pending_overflow.inc();
            if overflow == crate::breaker::Overflow::Pending {
                cluster.stats.cx_overflow.inc();
            }
            let mut rsp = route_reply(
                w,
                tunnel,
                log,
                StatusCode::SERVICE_UNAVAILABLE,
                "UO",
                OVERFLOW_BODY,
                response_ops,
            );
            rsp.headers_mut()
                .insert(X_ENVOY_OVERLOADED, HeaderValue::from_static("true"));
            return rsp;
        }
        Err(_) => {
            return route_reply(
                w,
                tunnel,
                log,
                StatusCode::GATEWAY_TIMEOUT,
                "UT",
                "upstream request timeout",
                response_ops,
            );
        }
    };

    // Mirrors: copies with the same headers (host `-shadow`) and body, sent on their own.
    let body_empty = body.is_end_stream();
    let mut tee = mirror::MirrorTee::default();
    if client_upgrade.is_none() {
        for m in &forward.mirrors {
            if m.drawn(fastrand::u32(..1_000_000)) {
                send_mirror(
                    w,
                    &config,
                    m,
                    &parts,
                    &scheme,
                    &host,
                    path,
                    body_empty,
                    &mut tee,
                    forward.timeout,
                );
            }
        }
    }
    // The body: streamed as is when it is sent once; else read through a `BodySource` that
    // keeps it for retries (up to the limit) and feeds the mirrors.
    let retries_possible = retry.is_some_and(|p| p.num_retries > 0);
    let mut upload = if body_empty {
        Upload::Empty
    } else if retries_possible || !tee.is_empty() {
        let (limit, abandoned) = if retries_possible {
            (
                w.retry_buffer_bytes,
                w.metrics.retry_or_shadow_abandoned(&target.cluster),
            )
        } else {
            (0, prometheus_client::metrics::counter::Counter::default())
        };
        Upload::Shared(retry::BodySource::new(
            body,
            limit,
            log.request_bytes.clone(),
            abandoned,
            tee,
        ))
    } else {
        Upload::Stream(Some(body))
    };

    // Envoy's route timeout runs from here until the response has been received in full,
    // across every attempt.
    let deadline = forward.timeout.map(|t| tokio::time::Instant::now() + t);
    let connect_timeout = cluster.connect_timeout;
    let state = config.state.clone();
    let max_attempts = retry.map_or(1, |p| p.num_retries.saturating_add(1));
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut parts = Some(parts);
    let mut attempt: u32 = 1;
    // Retries in flight count against the cluster's `max_retries` (Envoy's retry circuit
    // breaker); one permit is held while a retry runs.
    let mut retry_permit: Option<crate::breaker::RetryPermit> = None;
    let take_retry = |permit: &mut Option<crate::breaker::RetryPermit>| match cluster
        .breaker
        .retry(&cluster.policy.limits)
    {
        Ok(p) => {
            *permit = Some(p);
            true
        }
        Err(_) => {
            cluster.stats.rq_retry_overflow.inc();
            false
        }
    };
    let (mut upstream_rsp, endpoint) = loop {
        let pick = crate::balancer::PickContext {
            hash,
            // Envoy's previous-hosts predicate: avoid the hosts tried, while others remain.
            tried: if retry.is_some_and(|p| p.previous_hosts) {
                &tried
            } else {
                &[]
            },
            original_dst: Some(tunnel.authority),
        };
        let Some(endpoint) = cluster.pick(&pick) else {
            return route_reply(
                w,
                tunnel,
                log,
                StatusCode::SERVICE_UNAVAILABLE,
                "UH",
                "no healthy upstream\n",
                response_ops,
            );
        };
        tried.push(endpoint.address);
        log.attempts = attempt;
        log.upstream = Some(endpoint.address);
        log.upstream_workload = config.state.workload_by_ip(endpoint.address.ip()).cloned();
        // The last possible attempt takes the request; earlier ones send a copy.
        let mut attempt_parts = if attempt >= max_attempts {
            parts.take()
        } else {
            parts.as_ref().map(copy_parts)
        };
        let Some(mut p) = attempt_parts.take() else {
            return route_reply(
                w,
                tunnel,
                log,
                StatusCode::INTERNAL_SERVER_ERROR,
                "-",
                "no request left to send\n",
                response_ops,
            );
        };
        if vhost.include_attempt_count {
            p.headers
                .insert(X_ENVOY_ATTEMPT_COUNT, HeaderValue::from(attempt));
        }
        let body = match &mut upload {
            Upload::Empty => RequestBody::empty(log.request_bytes.clone()),
            Upload::Stream(b) => match b.take() {
                Some(b) => RequestBody::new(b, log.request_bytes.clone()),
                None => RequestBody::empty(log.request_bytes.clone()),
            },
            Upload::Shared(s) => RequestBody::replay(retry::BodySource::attempt(s)),
        };
        let upstream_req = Request::from_parts(p, body);
        let remaining = deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
        let limit = match (per_try, remaining) {
            (Some(p), Some(r)) => Some(p.min(r)),
            (p, r) => p.or(r),
        };
        let per_try_is_shorter = per_try.is_some_and(|p| remaining.is_none_or(|r| p < r));
        let exchange = async {
            if let Some(tls) = &cluster.policy.tls
                && client_upgrade.is_some()
            {
                crate::origination::send(
                    &w.upstream,
                    &state,
                    endpoint.address,
                    Protocol::Http1,
                    connect_timeout,
                    &cluster.policy.pool,
                    tls,
                    Some(tunnel.client),
                    upstream_req,
                )
                .await
            } else if client_upgrade.is_some() {
                w.upstream
                    .send_upgrade(
                        &state,
                        endpoint.address,
                        tunnel.client,
                        connect_timeout,
                        cluster.policy.pool.keepalive,
                        upstream_req,
                    )
                    .await
            } else {
                w.upstream
                    .send(
                        &state,
                        endpoint.address,
                        upstream_protocol,
                        connect_timeout,
                        &cluster.policy.pool,
                        cluster.policy.tls.as_ref(),
                        upstream_req,
                    )
                    .await
            }
        };
        let result = match limit {
            Some(l) => tokio::time::timeout(l, exchange).await.ok(),
            None => Some(exchange.await),
        };
        // Whether another attempt may go: attempts left, the body replayable, time left.
        let may_retry = attempt < max_attempts
            && match &upload {
                Upload::Shared(s) => s.lock().is_ok_and(|s| s.replayable()),
                _ => true,
            }
            && deadline.is_none_or(|d| tokio::time::Instant::now() < d);
        // Every attempt's outcome feeds outlier detection.
        cluster.report(
            &endpoint,
            match &result {
                Some(Ok(rsp)) => crate::outlier::Outcome::Status(rsp.status().as_u16()),
                Some(Err(_)) => crate::outlier::Outcome::LocalFailure { timeout: false },
                None => crate::outlier::Outcome::LocalFailure { timeout: true },
            },
        );
        let failure = match result {
            Some(Ok(rsp)) => {
                let retriable =
                    retry.is_some_and(|p| p.retries_response(rsp.status(), rsp.headers()));
                if !retriable {
                    if attempt > 1 {
                        w.metrics.retry_success(&target.cluster);
                    }
                    break (rsp, endpoint);
                }
                if !(may_retry && take_retry(&mut retry_permit)) {
                    if attempt >= max_attempts {
                        // Envoy's "retry limit exceeded": the answer passes, flagged.
                        log.flags = "URX";
                        w.metrics.retry_limit_exceeded(&target.cluster);
                    }
                    break (rsp, endpoint);
                }
                debug!(cluster = %target.cluster, endpoint = %endpoint.address, status = %rsp.status(), attempt, "retrying");
                None
            }
            Some(Err(e)) => {
                info!(cluster = %target.cluster, endpoint = %endpoint.address, attempt, "upstream failed: {e}");
                Some(failure_of(&e))
            }
            None => Some(retry::Failure::PerTryTimeout),
        };
        if let Some(f) = failure {
            let retriable = retry.is_some_and(|p| p.retries_failure(f));
            let timed_out = f == retry::Failure::PerTryTimeout;
            if timed_out && !per_try_is_shorter {
                // The route timeout: over for every attempt.
                return route_reply(
                    w,
                    tunnel,
                    log,
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    "upstream request timeout",
                    response_ops,
                );
            }
            if !(retriable && may_retry && take_retry(&mut retry_permit)) {
                let exceeded = retriable && attempt >= max_attempts;
                if exceeded {
                    w.metrics.retry_limit_exceeded(&target.cluster);
                }
                let (status, flags, body) = match (timed_out, exceeded) {
                    (true, false) => (
                        StatusCode::GATEWAY_TIMEOUT,
                        "UT",
                        "upstream request timeout",
                    ),
                    (true, true) => (
                        StatusCode::GATEWAY_TIMEOUT,
                        "UT,URX",
                        "upstream request timeout",
                    ),
                    (false, false) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UF",
                        "upstream connect error\n",
                    ),
                    (false, true) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UF,URX",
                        "upstream connect error\n",
                    ),
                };
                return route_reply(w, tunnel, log, status, flags, body, response_ops);
            }
        }
        // Another attempt, after the back-off (within the route timeout).
        w.metrics.retry(&target.cluster);
        if let Some(p) = retry {
            let wait = p.backoff(attempt, fastrand::u64(..));
            let wait = match deadline {
                Some(d) => wait.min(d.saturating_duration_since(tokio::time::Instant::now())),
                None => wait,
            };
            tokio::time::sleep(wait).await;
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return route_reply(
                w,
                tunnel,
                log,
                StatusCode::GATEWAY_TIMEOUT,
                "UT",
                "upstream request timeout",
                response_ops,
            );
        }
        attempt += 1;
    };

    if upstream_rsp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let server_upgrade = hyper::upgrade::on(&mut upstream_rsp);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, server_upgrade) {
                Ok((client, server)) => {
                    let mut client = TokioIo::new(client);
                    let mut server = TokioIo::new(server);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
                        debug!("upgraded connection: {e}");
                    }
                }
                Err(e) => debug!("upgrade failed: {e}"),
            }
        });
    }
    let (mut parts, body) = upstream_rsp.into_parts();
    let upgraded = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(&mut parts.headers, upgraded);
    for ops in [
        &target.response_headers,
        &route.response_headers,
        &vhost.response_headers,
        &table.response_headers,
    ] {
        ops.apply(&mut parts.headers);
    }
    parts.version = match protocol {
        Protocol::Http1 => Version::HTTP_11,
        Protocol::Http2 => Version::HTTP_2,
    };
    if let Some(c) = set_cookie
        && let Ok(v) = HeaderValue::from_str(&c.0)
    {
        parts.headers.append(header::SET_COOKIE, v);
    }
    drop(retry_permit);
    // The endpoint's active request and the breaker's slots are held until the body is done;
    // an upgraded connection is not bounded by the route timeout (as in Envoy).
    let mut body = ResponseBody::upstream(body, deadline.filter(|_| !upgraded));
    body.held = Some((endpoint, permit));
    finish(w, tunnel, log, Response::from_parts(parts, body))
}

/// Envoy's mark on a response the circuit breaker made.
const X_ENVOY_OVERLOADED: header::HeaderName =
    header::HeaderName::from_static("x-envoy-overloaded");
/// Envoy's body for a request refused by circuit breaking.
const OVERFLOW_BODY: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";

/// A response the waypoint makes itself once a route is chosen: as Envoy's router, the
/// route's (virtual host's, table's) response header operations apply to it.
#[allow(clippy::too_many_arguments)]
fn route_reply(
    w: &Waypoint,
    tunnel: &Tunnel,
    log: Log,
    status: StatusCode,
    flags: &'static str,
    body: &'static str,
    ops: [&crate::route::HeaderOps; 3],
) -> Response<ResponseBody> {
    let mut rsp = local_reply(w, tunnel, log, status, flags, body);
    for o in ops {
        o.apply(rsp.headers_mut());
    }
    rsp
}

/// A response the waypoint makes itself, with Envoy's response flag for the access log.
fn local_reply(
    w: &Waypoint,
    tunnel: &Tunnel,
    mut log: Log,
    status: StatusCode,
    flags: &'static str,
    body: &'static str,
) -> Response<ResponseBody> {
    log.flags = flags;
    let mut rsp = Response::new(ResponseBody::bytes(Bytes::from_static(body.as_bytes())));
    *rsp.status_mut() = status;
    rsp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    finish(w, tunnel, log, rsp)
}

/// Attach the record that is written when the response body ends.
fn finish(
    w: &Waypoint,
    tunnel: &Tunnel,
    mut log: Log,
    mut rsp: Response<ResponseBody>,
) -> Response<ResponseBody> {
    log.status = rsp.status().as_u16();
    if let Some(c) = log.cors.take() {
        cors::apply(rsp.headers_mut(), &c);
    }
    // A response to HEAD has no body; HTTP/2 would send ours as DATA (a stream error for the
    // client). Upstream answers to HEAD come without one already.
    if log.method == "HEAD"
        && let Inner::Bytes(b) = &mut rsp.body_mut().inner
    {
        *b = None;
    }
    let peers = Peers {
        source: tunnel.source_workload.as_deref(),
        source_identity: Some(&tunnel.peer),
        service: tunnel.service.as_deref(),
        destination: log.upstream_workload.as_deref(),
    };
    let protocol = match log.protocol {
        Protocol::Http1 => "http",
        Protocol::Http2 if is_grpc(rsp.headers()) => "grpc",
        Protocol::Http2 => "http",
    };
    let mut labels = peers.http(protocol, log.status, log.flags);
    if protocol == "grpc"
        && let Some(status) = grpc_status(rsp.headers())
    {
        // A trailers-only answer (an error without a message) carries it in the headers.
        labels.grpc_response_status = status;
    }
    rsp.body_mut().done = Some(Done {
        metrics: w.metrics.clone(),
        labels,
        log,
    });
    rsp
}

/// The `grpc-status` of a gRPC answer's headers or trailers.
fn grpc_status(h: &HeaderMap) -> Option<String> {
    header_text(h, "grpc-status")
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// `:authority` for HTTP/2 (in the URI), `Host` for HTTP/1.1.
const X_FORWARDED_PROTO: header::HeaderName = header::HeaderName::from_static("x-forwarded-proto");
const X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");
const X_ENVOY_ORIGINAL_HOST: header::HeaderName =
    header::HeaderName::from_static("x-envoy-original-host");
const X_ENVOY_ORIGINAL_PATH: header::HeaderName =
    header::HeaderName::from_static("x-envoy-original-path");
const X_ENVOY_ATTEMPT_COUNT: header::HeaderName =
    header::HeaderName::from_static("x-envoy-attempt-count");
const X_ENVOY_EXPECTED_RQ_TIMEOUT_MS: header::HeaderName =
    header::HeaderName::from_static("x-envoy-expected-rq-timeout-ms");

/// How the request body goes to the attempts.
enum Upload {
    /// None to send (every attempt sends an empty body).
    Empty,
    /// Streamed to the one attempt there is.
    Stream(Option<Incoming>),
    /// Kept for replay and fed to mirrors.
    Shared(retry::SharedBody),
}

/// A copy of the request head for one attempt.
fn copy_parts(p: &http::request::Parts) -> http::request::Parts {
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = p.method.clone();
    parts.uri = p.uri.clone();
    parts.version = p.version;
    parts.headers = p.headers.clone();
    parts
}

/// What kind of failure an upstream error is, for the retry conditions.
fn failure_of(e: &crate::upstream::UpstreamError) -> retry::Failure {
    use crate::upstream::UpstreamError;
    match e {
        UpstreamError::Http { source, .. } => {
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source);
            while let Some(c) = cur {
                if let Some(h2e) = c.downcast_ref::<h2::Error>()
                    && h2e.reason() == Some(h2::Reason::REFUSED_STREAM)
                {
                    return retry::Failure::RefusedStream;
                }
                cur = c.source();
            }
            retry::Failure::Reset
        }
        _ => retry::Failure::ConnectFailure,
    }
}

/// The HTTP version spoken to a cluster's endpoints for a client speaking `downstream`.
fn upstream_protocol_of(cluster: &Cluster, downstream: Protocol) -> Protocol {
    match cluster.protocol {
        UpstreamProtocol::Http1 => Protocol::Http1,
        UpstreamProtocol::Http2 => Protocol::Http2,
        UpstreamProtocol::Downstream { http2: true } => downstream,
        UpstreamProtocol::Downstream { http2: false } => Protocol::Http1,
    }
}

/// The upstream URI (origin form for HTTP/1.1 with `Host`, absolute for HTTP/2 without it).
fn upstream_uri(
    headers: &mut HeaderMap,
    protocol: Protocol,
    scheme: &str,
    host: &str,
    path: &str,
) -> Result<Uri, http::uri::InvalidUri> {
    match protocol {
        Protocol::Http1 => {
            if let Ok(v) = HeaderValue::from_str(host) {
                headers.insert(header::HOST, v);
            }
            Uri::try_from(path)
        }
        Protocol::Http2 => {
            headers.remove(header::HOST);
            Uri::try_from(format!("{scheme}://{host}{path}"))
        }
    }
}

/// Start one mirror copy of the request (its answer is dropped; see `mirror`).
#[allow(clippy::too_many_arguments)]
fn send_mirror(
    w: &Arc<Waypoint>,
    config: &Arc<Config>,
    m: &mirror::MirrorPolicy,
    parts: &http::request::Parts,
    scheme: &str,
    host: &str,
    path: &str,
    body_empty: bool,
    tee: &mut mirror::MirrorTee,
    route_timeout: Option<std::time::Duration>,
) {
    let outcome = w.metrics.mirror_outcome(&m.cluster);
    let Some(cluster) = config.clusters.get(&m.cluster) else {
        outcome.failed.inc();
        return;
    };
    let pick = crate::balancer::PickContext {
        hash: None,
        tried: &[],
        original_dst: None,
    };
    let Some(endpoint) = cluster.pick(&pick) else {
        outcome.failed.inc();
        return;
    };
    let protocol = upstream_protocol_of(
        cluster,
        match parts.version {
            Version::HTTP_2 => Protocol::Http2,
            _ => Protocol::Http1,
        },
    );
    let (mut headers, shadow) = mirror::shadow_headers(&parts.headers, host, m.shadow_suffix);
    let Ok(uri) = upstream_uri(&mut headers, protocol, scheme, &shadow, path) else {
        outcome.failed.inc();
        return;
    };
    let mut copy = copy_parts(parts);
    copy.headers = headers;
    copy.uri = uri;
    copy.version = match protocol {
        Protocol::Http1 => Version::HTTP_11,
        Protocol::Http2 => Version::HTTP_2,
    };
    let counted = Arc::new(AtomicU64::new(0));
    let body = if body_empty {
        RequestBody::empty(counted)
    } else {
        RequestBody::mirror(tee.add(outcome.dropped.clone()))
    };
    let req = Request::from_parts(copy, body);
    let (w, state, address, connect_timeout, limits, tls) = (
        w.clone(),
        config.state.clone(),
        endpoint.address,
        cluster.connect_timeout,
        cluster.policy.pool,
        cluster.policy.tls.clone(),
    );
    let send = async move {
        w.upstream
            .send(
                &state,
                address,
                protocol,
                connect_timeout,
                &limits,
                tls.as_ref(),
                req,
            )
            .await
    };
    mirror::spawn(
        send,
        address,
        route_timeout.unwrap_or(mirror::DEFAULT_TIMEOUT),
        outcome,
    );
}

/// An injected abort, as Envoy's fault filter answers it: the HTTP status with `fault filter
/// abort`, or for a gRPC request a trailers-only gRPC answer (the status mapped from HTTP
/// when the abort is an HTTP one).
fn fault_reply(
    w: &Waypoint,
    tunnel: &Tunnel,
    log: Log,
    abort: fault::Abort,
    grpc_request: bool,
    delayed: bool,
) -> Response<ResponseBody> {
    let flags = if delayed { "DI,FI" } else { "FI" };
    if grpc_request {
        let code = match abort {
            fault::Abort::Grpc(c) => c,
            fault::Abort::Http(s) => fault::grpc_status_of(s),
        };
        let mut rsp = Response::new(ResponseBody::bytes(Bytes::new()));
        let h = rsp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(code));
        h.insert(
            "grpc-message",
            HeaderValue::from_static("fault%20filter%20abort"),
        );
        let mut log = log;
        log.flags = flags;
        return finish(w, tunnel, log, rsp);
    }
    let status = match abort {
        fault::Abort::Http(s) => StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        fault::Abort::Grpc(_) => StatusCode::OK,
    };
    local_reply(w, tunnel, log, status, flags, fault::ABORT_BODY)
}

/// The request's scheme as Envoy's HTTP connection manager sees it (not using the remote
/// address, Envoy's default): HTTP/2's `:scheme`; for HTTP/1.1 the client's
/// `x-forwarded-proto` when it is `http` or `https`, else `http` (the tunnel carries plain text).
fn request_scheme<B>(req: &Request<B>) -> &'static str {
    let named = |s: &str| {
        if s.eq_ignore_ascii_case("https") {
            Some("https")
        } else if s.eq_ignore_ascii_case("http") {
            Some("http")
        } else {
            None
        }
    };
    if let Some(s) = req.uri().scheme_str() {
        return named(s).unwrap_or("http");
    }
    req.headers()
        .get(X_FORWARDED_PROTO)
        .and_then(|v| v.to_str().ok())
        .and_then(named)
        .unwrap_or("http")
}

/// A random (version 4) UUID, the form of Envoy's generated `x-request-id`.
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = [0u8; 36];
    let mut j = 0;
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[j] = b'-';
            j += 1;
        }
        out[j] = HEX[usize::from(x >> 4)];
        out[j + 1] = HEX[usize::from(x & 0x0f)];
        j += 2;
    }
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("0"))
}

fn request_authority<B>(req: &Request<B>) -> String {
    if let Some(a) = req.uri().authority() {
        return a.as_str().to_string();
    }
    header_text(req.headers(), "host").unwrap_or_default()
}

fn header_text(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(h: &HeaderMap, token: &str) -> bool {
    h.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Headers that belong to one hop (RFC 9110 §7.6.1). An upgrade keeps `Connection: upgrade`
/// and `Upgrade`; `te: trailers` passes (gRPC needs it).
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !(t.is_empty() || upgrade && t == "upgrade"))
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        h.remove(n);
    }
    if !upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    } else {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

/// The request body on its way upstream: the client's, streamed (counting bytes for
/// metrics), one attempt's replay of it, a mirror's copy, or none.
pub struct RequestBody {
    inner: RequestInner,
    bytes: Arc<AtomicU64>,
}

enum RequestInner {
    Stream(Incoming),
    Replay(retry::AttemptBody),
    Mirror(mirror::MirrorBody),
    Empty,
}

impl RequestBody {
    pub fn new(inner: Incoming, bytes: Arc<AtomicU64>) -> Self {
        RequestBody {
            inner: RequestInner::Stream(inner),
            bytes,
        }
    }

    pub fn empty(bytes: Arc<AtomicU64>) -> Self {
        RequestBody {
            inner: RequestInner::Empty,
            bytes,
        }
    }

    /// An attempt's reader of the kept body (it counts bytes itself).
    pub fn replay(body: retry::AttemptBody) -> Self {
        RequestBody {
            inner: RequestInner::Replay(body),
            bytes: Arc::default(),
        }
    }

    pub fn mirror(body: mirror::MirrorBody) -> Self {
        RequestBody {
            inner: RequestInner::Mirror(body),
            bytes: Arc::default(),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.inner {
            RequestInner::Stream(b) => {
                let r = Pin::new(b).poll_frame(cx);
                if let Poll::Ready(Some(Ok(f))) = &r
                    && let Some(d) = f.data_ref()
                {
                    this.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                r.map(|o| o.map(|r| r.map_err(BoxError::from)))
            }
            RequestInner::Replay(b) => b.poll_frame(cx),
            RequestInner::Mirror(b) => b.poll_frame(cx),
            RequestInner::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            RequestInner::Stream(b) => b.is_end_stream(),
            RequestInner::Replay(b) => b.is_end_stream(),
            RequestInner::Mirror(_) => false,
            RequestInner::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            RequestInner::Stream(b) => b.size_hint(),
            RequestInner::Empty => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// The response body: the upstream's, or one the waypoint made. When it is dropped (sent in
/// full, or abandoned) the request is counted and logged.
pub struct ResponseBody {
    inner: Inner,
    bytes: u64,
    done: Option<Done>,
    timed_out: bool,
    /// The chosen endpoint (one active request) and the circuit-breaker slots, freed when the
    /// body is done.
    held: Option<(crate::config::Picked, crate::breaker::Permit)>,
}

enum Inner {
    /// The upstream's body, and when the route timeout ends it.
    Upstream(UpstreamBody, Option<Pin<Box<tokio::time::Sleep>>>),
    Bytes(Option<Bytes>),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Done {
    metrics: crate::metrics::Metrics,
    labels: crate::metrics::HttpLabels,
    log: Log,
}

impl ResponseBody {
    fn bytes(b: Bytes) -> Self {
        ResponseBody {
            inner: Inner::Bytes((!b.is_empty()).then_some(b)),
            bytes: 0,
            done: None,
            timed_out: false,
            held: None,
        }
    }
    fn upstream(b: UpstreamBody, deadline: Option<tokio::time::Instant>) -> Self {
        ResponseBody {
            inner: Inner::Upstream(b, deadline.map(|d| Box::pin(tokio::time::sleep_until(d)))),
            bytes: 0,
            done: None,
            timed_out: false,
            held: None,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = match &mut self.inner {
            Inner::Upstream(b, deadline) => match Pin::new(b).poll_frame(cx) {
                Poll::Pending => {
                    let expired = deadline
                        .as_mut()
                        .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                    if expired {
                        self.timed_out = true;
                        // The client sees its stream reset (headers are already out).
                        return Poll::Ready(Some(Err("upstream response timeout".into())));
                    }
                    Poll::Pending
                }
                Poll::Ready(r) => Poll::Ready(r.map(|r| r.map_err(BoxError::from))),
            },
            Inner::Bytes(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        };
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.bytes += d.len() as u64;
            } else if let Some(status) = f.trailers_ref().and_then(grpc_status)
                && let Some(done) = self.done.as_mut()
            {
                // gRPC's status comes last, in the trailers (Istio's grpc_response_status).
                done.labels.grpc_response_status = status;
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b, _) => b.is_end_stream(),
            Inner::Bytes(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b, _) => b.size_hint(),
            Inner::Bytes(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(mut done) = self.done.take() {
            if self.timed_out {
                done.log.flags = "UT";
                done.labels.peers.response_flags = "UT".into();
            }
            let request_bytes = done.log.request_bytes.load(Ordering::Relaxed);
            let millis = done.log.start.elapsed().as_secs_f64() * 1000.0;
            done.metrics
                .request(&done.labels, millis, request_bytes, self.bytes);
            done.log.write(millis, request_bytes, self.bytes);
        }
    }
}

/// What the access log line says about one request.
struct Log {
    start: Instant,
    started: SystemTime,
    method: String,
    authority: String,
    path: String,
    protocol: Protocol,
    client: SocketAddr,
    peer: String,
    listener: String,
    route: String,
    cluster: String,
    upstream: Option<SocketAddr>,
    upstream_workload: Option<Arc<Workload>>,
    status: u16,
    flags: &'static str,
    request_bytes: Arc<AtomicU64>,
    traceparent: Option<String>,
    request_id: Option<String>,
    /// CORS headers for the answer (a CORS request from an allowed origin).
    cors: Option<HeaderMap>,
    /// Upstream attempts made (Envoy's `%UPSTREAM_REQUEST_ATTEMPT_COUNT%`).
    attempts: u32,
    /// Envoy's response code details, where the waypoint answered itself for a reason worth
    /// naming (the RBAC policy that denied).
    details: Option<String>,
}

impl Log {
    fn write(&self, millis: f64, received: u64, sent: u64) {
        self.with_line(millis, received, sent, |l| {
            crate::log_writer::access_line(l)
        });
    }

    /// The JSON access-log line (keys in alphabetical order).
    #[cfg(test)]
    fn line(&self, millis: f64, received: u64, sent: u64) -> String {
        self.with_line(millis, received, sent, |l| {
            serde_json::to_string(l).unwrap_or_default()
        })
    }

    /// Calls `f` with the access-log line, borrowed from this log.
    fn with_line<T>(
        &self,
        millis: f64,
        received: u64,
        sent: u64,
        f: impl FnOnce(&AccessLine<'_>) -> T,
    ) -> T {
        let start = self
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let line = AccessLine {
            authority: &self.authority,
            bytes_received: received,
            bytes_sent: sent,
            downstream_peer_principal: &self.peer,
            downstream_remote_address: self.client,
            duration_ms: (millis * 1000.0).round() / 1000.0,
            listener: &self.listener,
            method: &self.method,
            path: &self.path,
            protocol: match self.protocol {
                Protocol::Http1 => "HTTP/1.1",
                Protocol::Http2 => "HTTP/2",
            },
            response_code: self.status,
            response_code_details: self.details.as_deref(),
            response_flags: self.flags,
            route_name: &self.route,
            start_time_ms: start,
            traceparent: self.traceparent.as_deref(),
            upstream_cluster: &self.cluster,
            upstream_host: self.upstream,
            upstream_request_attempt_count: self.attempts,
            upstream_workload: self.upstream_workload.as_deref().map(WorkloadName),
            x_request_id: self.request_id.as_deref(),
        };
        f(&line)
    }
}

/// One access-log line, serialized straight from borrowed fields (no JSON tree per request).
#[derive(serde::Serialize)]
struct AccessLine<'a> {
    authority: &'a str,
    bytes_received: u64,
    bytes_sent: u64,
    downstream_peer_principal: &'a str,
    downstream_remote_address: SocketAddr,
    duration_ms: f64,
    listener: &'a str,
    method: &'a str,
    path: &'a str,
    protocol: &'static str,
    response_code: u16,
    response_code_details: Option<&'a str>,
    response_flags: &'a str,
    route_name: &'a str,
    start_time_ms: u64,
    traceparent: Option<&'a str>,
    upstream_cluster: &'a str,
    upstream_host: Option<SocketAddr>,
    upstream_request_attempt_count: u32,
    upstream_workload: Option<WorkloadName<'a>>,
    x_request_id: Option<&'a str>,
}

/// `<namespace>/<name>` of a workload.
struct WorkloadName<'a>(&'a Workload);

impl serde::Serialize for WorkloadName<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}/{}", self.0.namespace, self.0.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, xfp: Option<&str>) -> Request<()> {
        let mut b = Request::get(uri);
        if let Some(v) = xfp {
            b = b.header("x-forwarded-proto", v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn scheme_as_envoy_sees_it() {
        assert_eq!(request_scheme(&req("/a", None)), "http");
        assert_eq!(request_scheme(&req("/a", Some("https"))), "https");
        assert_eq!(request_scheme(&req("/a", Some("HTTP"))), "http");
        assert_eq!(request_scheme(&req("/a", Some("ftp"))), "http");
        // HTTP/2's :scheme is the request's own.
        assert_eq!(request_scheme(&req("https://h/a", Some("http"))), "https");
    }

    #[test]
    fn access_line_is_envoy_style_json_with_sorted_keys() {
        let workload = Workload {
            name: "web-1".into(),
            namespace: "demo".into(),
            ..Default::default()
        };
        let mut log = Log {
            start: Instant::now(),
            started: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
            method: "GET".into(),
            authority: "web:80".into(),
            path: "/a?b=\"c\"".into(),
            protocol: Protocol::Http2,
            client: "10.0.0.1:4000".parse().unwrap(),
            peer: "spiffe://cluster.local/ns/demo/sa/client".into(),
            listener: "main_internal".into(),
            route: "r1".into(),
            cluster: "inbound-vip|80|http|web.demo.svc.cluster.local".into(),
            upstream: Some("10.0.1.2:8080".parse().unwrap()),
            upstream_workload: Some(Arc::new(workload)),
            status: 200,
            flags: "-",
            request_bytes: Arc::default(),
            traceparent: None,
            request_id: Some("id-1".into()),
            details: Some("rbac_access_denied".into()),
            attempts: 2,
            cors: None,
        };
        let expected = serde_json::json!({
            "start_time_ms": 1_700_000_000_123u64,
            "method": "GET",
            "authority": "web:80",
            "path": "/a?b=\"c\"",
            "protocol": "HTTP/2",
            "response_code": 200,
            "response_flags": "-",
            "bytes_received": 5,
            "bytes_sent": 1024,
            "duration_ms": 1.235,
            "downstream_remote_address": "10.0.0.1:4000",
            "downstream_peer_principal": "spiffe://cluster.local/ns/demo/sa/client",
            "listener": "main_internal",
            "route_name": "r1",
            "upstream_cluster": "inbound-vip|80|http|web.demo.svc.cluster.local",
            "upstream_host": "10.0.1.2:8080",
            "upstream_workload": "demo/web-1",
            "traceparent": null,
            "x_request_id": "id-1",
            "response_code_details": "rbac_access_denied",
            "upstream_request_attempt_count": 2,
        });
        // serde_json's map keeps keys sorted: the same text, byte for byte.
        assert_eq!(log.line(1.2345, 5, 1024), expected.to_string());
        log.upstream = None;
        log.upstream_workload = None;
        let v: serde_json::Value = serde_json::from_str(&log.line(0.0, 0, 0)).unwrap();
        assert!(v["upstream_host"].is_null() && v["upstream_workload"].is_null());
    }

    #[test]
    fn request_ids_are_v4_uuids() {
        let a = request_id();
        let a = a.to_str().unwrap();
        assert_eq!(a.len(), 36);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
        assert!(matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'));
        assert!(a.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()));
        assert_ne!(request_id(), request_id());
    }
}
