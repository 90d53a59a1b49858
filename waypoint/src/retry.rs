//! Envoy's route retry policy: which answers and failures are retried (`retry_on`, status
//! codes, gRPC statuses), how many times, the per-try timeout, the jittered exponential
//! back-off, and the previous-hosts predicate; plus the request body kept for replay
//! ([`BodySource`]): streamed to the current attempt while a copy is kept up to a cap, so a
//! retry can send it again; past the cap the request is no longer retried.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::envoy::config::route::v3 as pb;
use http::{HeaderMap, StatusCode};
use hyper::body::{Body, Frame, Incoming};
use prometheus_client::metrics::counter::Counter;

use crate::mirror::MirrorTee;

/// The request body a retry may replay, by default (the waypoint's `--retry-buffer-bytes`);
/// Envoy's default per-connection buffer limit is the same 1 MiB.
pub const DEFAULT_BUFFER_LIMIT: usize = 1024 * 1024;
const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
const PREVIOUS_HOSTS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";
const PREVIOUS_PRIORITIES: &str = "envoy.retry_priorities.previous_priorities";
/// Envoy's back-off base when the policy names none.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// `retry_on` conditions, as bits.
mod on {
    pub const FIVE_XX: u32 = 1;
    pub const GATEWAY_ERROR: u32 = 1 << 1;
    pub const RESET: u32 = 1 << 2;
    pub const CONNECT_FAILURE: u32 = 1 << 3;
    pub const RETRIABLE_4XX: u32 = 1 << 4;
    pub const REFUSED_STREAM: u32 = 1 << 5;
    pub const STATUS_CODES: u32 = 1 << 6;
    pub const RATE_LIMITED: u32 = 1 << 7;
    pub const RESET_BEFORE_REQUEST: u32 = 1 << 8;
    pub const GRPC_CANCELLED: u32 = 1 << 9;
    pub const GRPC_DEADLINE_EXCEEDED: u32 = 1 << 10;
    pub const GRPC_INTERNAL: u32 = 1 << 11;
    pub const GRPC_RESOURCE_EXHAUSTED: u32 = 1 << 12;
    pub const GRPC_UNAVAILABLE: u32 = 1 << 13;
}

/// A compiled `RetryPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub num_retries: u32,
    on: u32,
    status_codes: Vec<u16>,
    pub per_try_timeout: Option<Duration>,
    pub previous_hosts: bool,
    /// Picks to find a host the predicate accepts (Envoy: 1 unless set).
    pub host_selection_attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
}

/// Why an attempt failed without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection (HBONE or TCP) to the endpoint.
    ConnectFailure,
    /// HTTP/2 `REFUSED_STREAM`: the upstream did not process the request.
    RefusedStream,
    /// The connection or stream broke after the request went out.
    Reset,
    /// The per-try timeout passed before the answer's headers.
    PerTryTimeout,
}

impl RetryPolicy {
    /// Compile Envoy's `RetryPolicy`; an error names the field (the route is NACKed).
    pub fn compile(p: &pb::RetryPolicy) -> Result<RetryPolicy, String> {
        let mut on_bits = 0;
        for c in p
            .retry_on
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
        {
            on_bits |= match c {
                "5xx" => on::FIVE_XX,
                "gateway-error" => on::GATEWAY_ERROR,
                "reset" => on::RESET,
                "reset-before-request" => on::RESET_BEFORE_REQUEST,
                "connect-failure" => on::CONNECT_FAILURE,
                "retriable-4xx" => on::RETRIABLE_4XX,
                "refused-stream" => on::REFUSED_STREAM,
                "retriable-status-codes" => on::STATUS_CODES,
                "envoy-ratelimited" => on::RATE_LIMITED,
                "cancelled" => on::GRPC_CANCELLED,
                "deadline-exceeded" => on::GRPC_DEADLINE_EXCEEDED,
                "internal" => on::GRPC_INTERNAL,
                "resource-exhausted" => on::GRPC_RESOURCE_EXHAUSTED,
                "unavailable" => on::GRPC_UNAVAILABLE,
                // No HTTP/3 upstream here: never applies. `retriable-headers` with no
                // `retriable_headers` (checked below) matches nothing either.
                "http3-post-connect-failure" | "retriable-headers" => 0,
                other => return Err(format!("retry_on: unknown condition {other:?}")),
            };
        }
        let unsupported = [
            (!p.retriable_headers.is_empty(), "retriable_headers"),
            (
                !p.retriable_request_headers.is_empty(),
                "retriable_request_headers",
            ),
            (
                !p.retry_options_predicates.is_empty(),
                "retry_options_predicates",
            ),
            (
                p.rate_limited_retry_back_off.is_some(),
                "rate_limited_retry_back_off",
            ),
            (p.per_try_idle_timeout.is_some(), "per_try_idle_timeout"),
        ];
        if let Some((_, f)) = unsupported.iter().find(|(set, _)| *set) {
            return Err(format!("{f}: not supported"));
        }
        let mut previous_hosts = false;
        for (i, h) in p.retry_host_predicate.iter().enumerate() {
            use pb::retry_policy::retry_host_predicate::ConfigType;
            let typed = match &h.config_type {
                Some(ConfigType::TypedConfig(a)) => a.type_url.as_str(),
                None => "",
            };
            if h.name == PREVIOUS_HOSTS || typed == PREVIOUS_HOSTS_TYPE {
                previous_hosts = true;
            } else {
                return Err(format!(
                    "retry_host_predicate[{i}]: {:?} is not supported",
                    h.name
                ));
            }
        }
        if let Some(pr) = &p.retry_priority
            && pr.name != PREVIOUS_PRIORITIES
        {
            return Err(format!("retry_priority: {:?} is not supported", pr.name));
        }
        let mut status_codes = Vec::with_capacity(p.retriable_status_codes.len());
        for c in &p.retriable_status_codes {
            status_codes.push(
                u16::try_from(*c)
                    .ok()
                    .filter(|c| (100..=599).contains(c))
                    .ok_or_else(|| format!("retriable_status_codes: {c} is not an HTTP status"))?,
            );
        }
        let (backoff_base, backoff_max) = match &p.retry_back_off {
            None => (DEFAULT_BACKOFF, DEFAULT_BACKOFF * 10),
            Some(b) => {
                let base = b
                    .base_interval
                    .as_ref()
                    .map(crate::config::proto_duration)
                    .transpose()
                    .map_err(|e| format!("retry_back_off.base_interval: {e}"))?
                    .filter(|d| !d.is_zero())
                    .ok_or("retry_back_off.base_interval: required, above 0")?;
                let max = b
                    .max_interval
                    .as_ref()
                    .map(crate::config::proto_duration)
                    .transpose()
                    .map_err(|e| format!("retry_back_off.max_interval: {e}"))?
                    .unwrap_or(base * 10);
                if max < base {
                    return Err("retry_back_off.max_interval: below base_interval".into());
                }
                (base, max)
            }
        };
        Ok(RetryPolicy {
            // Envoy: 1 when unset.
            num_retries: p.num_retries.as_ref().map_or(1, |n| n.value),
            on: on_bits,
            status_codes,
            per_try_timeout: p
                .per_try_timeout
                .as_ref()
                .map(crate::config::proto_duration)
                .transpose()
                .map_err(|e| format!("per_try_timeout: {e}"))?
                .filter(|d| !d.is_zero()),
            previous_hosts,
            host_selection_attempts: u32::try_from(p.host_selection_retry_max_attempts.max(1))
                .unwrap_or(u32::MAX),
            backoff_base,
            backoff_max,
        })
    }

    fn has(&self, bit: u32) -> bool {
        self.on & bit != 0
    }

    /// Whether an answer with this status and headers is retried (Envoy's conditions on
    /// response headers; gRPC statuses from a trailers-only answer's `grpc-status`).
    pub fn retries_response(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let code = status.as_u16();
        if self.has(on::FIVE_XX) && code >= 500 {
            return true;
        }
        if self.has(on::GATEWAY_ERROR) && matches!(code, 502..=504) {
            return true;
        }
        if self.has(on::RETRIABLE_4XX) && code == 409 {
            return true;
        }
        if self.has(on::STATUS_CODES) && self.status_codes.contains(&code) {
            return true;
        }
        if self.has(on::RATE_LIMITED) && headers.contains_key("x-envoy-ratelimited") {
            return true;
        }
        let grpc = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        match grpc {
            Some(1) => self.has(on::GRPC_CANCELLED),
            Some(4) => self.has(on::GRPC_DEADLINE_EXCEEDED),
            Some(8) => self.has(on::GRPC_RESOURCE_EXHAUSTED),
            Some(13) => self.has(on::GRPC_INTERNAL),
            Some(14) => self.has(on::GRPC_UNAVAILABLE),
            _ => false,
        }
    }

    /// Whether a failed attempt is retried (Envoy's conditions on resets and timeouts).
    pub fn retries_failure(&self, f: Failure) -> bool {
        let any_reset = self.has(on::FIVE_XX) || self.has(on::GATEWAY_ERROR) || self.has(on::RESET);
        match f {
            Failure::ConnectFailure => {
                any_reset || self.has(on::CONNECT_FAILURE) || self.has(on::RESET_BEFORE_REQUEST)
            }
            Failure::RefusedStream => {
                any_reset || self.has(on::REFUSED_STREAM) || self.has(on::RESET_BEFORE_REQUEST)
            }
            Failure::Reset | Failure::PerTryTimeout => any_reset,
        }
    }

    /// The wait before retry `n` (1 = the first retry): Envoy's fully jittered exponential
    /// back-off, a random time up to `base × (2^n − 1)`, at most `max`. `r` is a random draw.
    pub fn backoff(&self, n: u32, r: u64) -> Duration {
        let factor = (1u64 << n.min(30)) - 1;
        let ceiling = self
            .backoff_base
            .saturating_mul(u32::try_from(factor).unwrap_or(u32::MAX))
            .min(self.backoff_max);
        let ms = ceiling.as_millis() as u64;
        if ms == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(r % (ms + 1))
    }
}

// ---- the replayable request body ---------------------------------------------------------

/// The downstream request body, read once, shared by the attempts: each gets a
/// [`BodySource::attempt`] reader that replays what was kept and then reads on. Only the newest
/// attempt may read (an abandoned one still held by a connection gets an error).
pub struct BodySource<B = Incoming> {
    incoming: B,
    /// The data frames received, while they fit in `limit`.
    kept: Vec<Bytes>,
    kept_len: usize,
    limit: usize,
    /// Past the limit: nothing kept any more, no retry possible.
    overflowed: bool,
    trailers: Option<HeaderMap>,
    done: bool,
    generation: u64,
    /// Request bytes received (metrics).
    received: Arc<AtomicU64>,
    /// Counted when the body outgrows the limit (Envoy's `retry_or_shadow_abandoned`).
    abandoned: Counter,
    mirrors: MirrorTee,
}

pub type SharedBody<B = Incoming> = Arc<Mutex<BodySource<B>>>;

impl<B> BodySource<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(
        incoming: B,
        limit: usize,
        received: Arc<AtomicU64>,
        abandoned: Counter,
        mirrors: MirrorTee,
    ) -> SharedBody<B> {
        Arc::new(Mutex::new(BodySource {
            incoming,
            kept: Vec::new(),
            kept_len: 0,
            limit,
            overflowed: false,
            trailers: None,
            done: false,
            generation: 0,
            received,
            abandoned,
            mirrors,
        }))
    }

    /// Whether a new attempt can send the whole body again.
    pub fn replayable(&self) -> bool {
        !self.overflowed
    }

    /// A reader for a new attempt; earlier readers stop working.
    pub fn attempt(shared: &SharedBody<B>) -> AttemptBody<B> {
        let generation = match shared.lock() {
            Ok(mut s) => {
                s.generation += 1;
                s.generation
            }
            Err(_) => 0,
        };
        AttemptBody {
            shared: shared.clone(),
            generation,
            pos: 0,
            trailers_sent: false,
        }
    }
}

/// One attempt's view of the shared body.
pub struct AttemptBody<B = Incoming> {
    shared: SharedBody<B>,
    generation: u64,
    /// The next kept frame to replay.
    pos: usize,
    trailers_sent: bool,
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> AttemptBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Ok(mut s) = self.shared.lock() else {
            return Poll::Ready(Some(Err("request body state poisoned".into())));
        };
        if s.generation != self.generation {
            return Poll::Ready(Some(Err("superseded by a retry".into())));
        }
        if !s.overflowed && self.pos < s.kept.len() {
            let b = s.kept[self.pos].clone();
            self.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if s.done {
            if !self.trailers_sent
                && let Some(t) = &s.trailers
            {
                self.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
            return Poll::Ready(None);
        }
        let s = &mut *s;
        match std::pin::Pin::new(&mut s.incoming).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.done = true;
                s.mirrors.end();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.mirrors.abandon();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    s.received.fetch_add(d.len() as u64, Ordering::Relaxed);
                    s.mirrors.data(d);
                    if !s.overflowed {
                        if s.kept_len + d.len() <= s.limit {
                            s.kept_len += d.len();
                            s.kept.push(d.clone());
                            self.pos = s.kept.len();
                        } else {
                            s.overflowed = true;
                            s.kept = Vec::new();
                            s.kept_len = 0;
                            s.abandoned.inc();
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.mirrors.trailers(t);
                    s.trailers = Some(t.clone());
                    self.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    pub fn is_end_stream(&self) -> bool {
        self.shared.lock().is_ok_and(|s| {
            s.done
                && (s.overflowed || self.pos >= s.kept.len())
                && (self.trailers_sent || s.trailers.is_none())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::{Any, UInt32Value};

    fn policy(on: &str, codes: &[u32]) -> RetryPolicy {
        RetryPolicy::compile(&pb::RetryPolicy {
            retry_on: on.into(),
            num_retries: Some(UInt32Value { value: 2 }),
            retriable_status_codes: codes.to_vec(),
            ..Default::default()
        })
        .unwrap()
    }

    fn grpc(code: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", code.parse().unwrap());
        h
    }

    #[test]
    fn istio_default_conditions() {
        let p = policy(
            "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
            &[503],
        );
        let none = HeaderMap::new();
        assert!(p.retries_response(StatusCode::SERVICE_UNAVAILABLE, &none));
        assert!(!p.retries_response(StatusCode::INTERNAL_SERVER_ERROR, &none));
        assert!(!p.retries_response(StatusCode::BAD_GATEWAY, &none));
        assert!(p.retries_response(StatusCode::OK, &grpc("14")));
        assert!(p.retries_response(StatusCode::OK, &grpc("1")));
        assert!(!p.retries_response(StatusCode::OK, &grpc("13")));
        assert!(p.retries_failure(Failure::ConnectFailure));
        assert!(p.retries_failure(Failure::RefusedStream));
        assert!(!p.retries_failure(Failure::Reset));
        assert!(!p.retries_failure(Failure::PerTryTimeout));
    }

    #[test]
    fn other_conditions() {
        let none = HeaderMap::new();
        let p = policy("5xx", &[]);
        assert!(p.retries_response(StatusCode::INTERNAL_SERVER_ERROR, &none));
        assert!(p.retries_response(StatusCode::GATEWAY_TIMEOUT, &none));
        assert!(!p.retries_response(StatusCode::CONFLICT, &none));
        assert!(p.retries_failure(Failure::Reset) && p.retries_failure(Failure::PerTryTimeout));
        let p = policy("gateway-error,retriable-4xx", &[]);
        assert!(!p.retries_response(StatusCode::INTERNAL_SERVER_ERROR, &none));
        assert!(p.retries_response(StatusCode::BAD_GATEWAY, &none));
        assert!(p.retries_response(StatusCode::CONFLICT, &none));
        let p = policy("retriable-status-codes", &[418]);
        assert!(p.retries_response(StatusCode::IM_A_TEAPOT, &none));
        let p = policy("reset", &[]);
        assert!(!p.retries_response(StatusCode::SERVICE_UNAVAILABLE, &none));
        assert!(p.retries_failure(Failure::ConnectFailure));
        let p = policy("internal,deadline-exceeded,resource-exhausted", &[]);
        for c in ["13", "4", "8"] {
            assert!(p.retries_response(StatusCode::OK, &grpc(c)), "{c}");
        }
        assert!(!p.retries_response(StatusCode::OK, &grpc("14")));
        assert!(
            RetryPolicy::compile(&pb::RetryPolicy {
                retry_on: "sometimes".into(),
                ..Default::default()
            })
            .unwrap_err()
            .contains("sometimes")
        );
    }

    type TestBody = http_body_util::StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>,
    >;

    fn source(chunks: &[&'static str], limit: usize) -> (SharedBody<TestBody>, Counter) {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        let abandoned = Counter::default();
        let s = BodySource::new(
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)),
            limit,
            Arc::default(),
            abandoned.clone(),
            MirrorTee::default(),
        );
        (s, abandoned)
    }

    async fn next(b: &mut AttemptBody<TestBody>) -> Option<Result<String, String>> {
        std::future::poll_fn(|cx| b.poll_frame(cx)).await.map(|r| {
            r.map(|f| String::from_utf8_lossy(&f.into_data().unwrap()).into_owned())
                .map_err(|e| e.to_string())
        })
    }

    #[tokio::test]
    async fn a_retry_replays_the_body_then_reads_on() {
        let (s, abandoned) = source(&["ab", "cd", "ef"], 100);
        let mut first = BodySource::attempt(&s);
        assert_eq!(next(&mut first).await, Some(Ok("ab".into())));
        assert_eq!(next(&mut first).await, Some(Ok("cd".into())));
        let mut second = BodySource::attempt(&s);
        assert_eq!(
            next(&mut first).await,
            Some(Err("superseded by a retry".into())),
            "only the newest attempt reads"
        );
        let mut got = Vec::new();
        while let Some(f) = next(&mut second).await {
            got.push(f.unwrap());
        }
        assert_eq!(got, ["ab", "cd", "ef"]);
        assert!(second.is_end_stream());
        let mut third = BodySource::attempt(&s);
        let mut got = Vec::new();
        while let Some(f) = next(&mut third).await {
            got.push(f.unwrap());
        }
        assert_eq!(got, ["ab", "cd", "ef"], "replayed in full once read");
        assert!(s.lock().unwrap().replayable());
        assert_eq!(abandoned.get(), 0);
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_sent_but_not_kept() {
        let (s, abandoned) = source(&["abc", "de", "f"], 4);
        let mut a = BodySource::attempt(&s);
        let mut got = Vec::new();
        while let Some(f) = next(&mut a).await {
            got.push(f.unwrap());
        }
        assert_eq!(got, ["abc", "de", "f"], "the attempt still gets all of it");
        assert!(!s.lock().unwrap().replayable());
        assert_eq!(abandoned.get(), 1);
    }

    #[test]
    fn predicates_backoff_and_defaults() {
        let p = RetryPolicy::compile(&pb::RetryPolicy {
            retry_on: "5xx".into(),
            retry_host_predicate: vec![pb::retry_policy::RetryHostPredicate {
                name: PREVIOUS_HOSTS.into(),
                config_type: Some(
                    pb::retry_policy::retry_host_predicate::ConfigType::TypedConfig(Any {
                        type_url: PREVIOUS_HOSTS_TYPE.into(),
                        value: vec![],
                    }),
                ),
            }],
            host_selection_retry_max_attempts: 5,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.num_retries, 1, "Envoy's default");
        assert!(p.previous_hosts);
        assert_eq!(p.host_selection_attempts, 5);
        // 25 ms base: retry 1 waits up to 25 ms, retry 2 up to 75 ms, capped at 250 ms.
        assert_eq!(p.backoff(1, 25), Duration::from_millis(25));
        assert_eq!(p.backoff(1, 26), Duration::ZERO);
        assert!(p.backoff(2, u64::MAX) <= Duration::from_millis(75));
        assert_eq!(p.backoff(10, 250), Duration::from_millis(250));
        assert!(p.backoff(10, u64::MAX) <= Duration::from_millis(250));
        let bad = RetryPolicy::compile(&pb::RetryPolicy {
            retry_host_predicate: vec![pb::retry_policy::RetryHostPredicate {
                name: "envoy.retry_host_predicates.omit_canary_hosts".into(),
                config_type: None,
            }],
            ..Default::default()
        });
        assert!(bad.unwrap_err().contains("omit_canary_hosts"));
    }
}
