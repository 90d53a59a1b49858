//! Request mirroring (Envoy's `request_mirror_policies`): for a drawn share of requests, a copy
//! with the same headers (the host given Envoy's `-shadow` suffix) and the same body goes to
//! another cluster, and its answer is thrown away. The copy never holds up or fails the main
//! request: its body is fed from the main one through a bounded queue, and a mirror that
//! falls behind, or takes longer than its time limit, is dropped and counted.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as pb;
use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
use http::{HeaderMap, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tracing::debug;

use crate::retry::BoxError;

/// Body frames a mirror may be behind the main request before it is dropped.
const QUEUE: usize = 64;
/// How long a mirror may take when the route has no timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// One compiled `RequestMirrorPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorPolicy {
    pub cluster: String,
    /// Share of requests mirrored, in parts per million.
    pub per_million: u32,
    /// `-shadow` is appended to the host (unless `disable_shadow_host_suffix_append`).
    pub shadow_suffix: bool,
}

/// A `FractionalPercent` as parts per million.
pub fn fraction_per_million(numerator: u32, denominator: i32) -> u32 {
    let scale: u64 = match DenominatorType::try_from(denominator) {
        Ok(DenominatorType::Hundred) => 10_000,
        Ok(DenominatorType::TenThousand) => 100,
        _ => 1,
    };
    (u64::from(numerator) * scale).min(1_000_000) as u32
}

/// A `RuntimeFractionalPercent` (its default; no runtime here) in parts per million; absent
/// means all requests.
pub fn runtime_per_million(f: Option<&core::RuntimeFractionalPercent>) -> u32 {
    match f.and_then(|f| f.default_value.as_ref()) {
        Some(v) => fraction_per_million(v.numerator, v.denominator),
        None if f.is_some() => 0,
        None => 1_000_000,
    }
}

impl MirrorPolicy {
    pub fn compile(p: &pb::route_action::RequestMirrorPolicy) -> Result<MirrorPolicy, String> {
        if p.cluster.is_empty() {
            return Err("cluster: required (cluster_header is not supported)".into());
        }
        Ok(MirrorPolicy {
            cluster: p.cluster.clone(),
            per_million: runtime_per_million(p.runtime_fraction.as_ref()),
            shadow_suffix: !p.disable_shadow_host_suffix_append,
        })
    }

    /// Whether this request is mirrored, for a random draw `r` in [0, 1 000 000).
    pub fn drawn(&self, r: u32) -> bool {
        r < self.per_million
    }
}

/// `host[:port]` with `-shadow` after the host name, as Envoy writes it.
pub fn shadow_host(authority: &str) -> String {
    if authority.starts_with('[')
        && let Some(end) = authority.find(']')
    {
        let (h, rest) = authority.split_at(end + 1);
        return format!("{h}-shadow{rest}");
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{h}-shadow:{p}")
        }
        _ => format!("{authority}-shadow"),
    }
}

/// What a mirror's body queue carries.
enum Item {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
}

/// The main request's side of the mirrors' body queues.
#[derive(Default)]
pub struct MirrorTee {
    queues: Vec<(mpsc::Sender<Item>, Counter)>,
}

impl MirrorTee {
    /// A queue for one more mirror; `dropped` counts it if it falls behind.
    pub fn add(&mut self, dropped: Counter) -> MirrorBody {
        let (tx, rx) = mpsc::channel(QUEUE);
        self.queues.push((tx, dropped));
        MirrorBody { rx, ended: false }
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    fn send(&mut self, item: impl Fn() -> Item) {
        self.queues
            .retain(|(tx, dropped)| match tx.try_send(item()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Behind by a whole queue: let it go rather than slow the main request.
                    dropped.inc();
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }

    pub fn data(&mut self, b: &Bytes) {
        if !self.queues.is_empty() {
            self.send(|| Item::Data(b.clone()));
        }
    }

    pub fn trailers(&mut self, t: &HeaderMap) {
        if !self.queues.is_empty() {
            self.send(|| Item::Trailers(t.clone()));
        }
    }

    /// The main body ended: so do the copies.
    pub fn end(&mut self) {
        self.send(|| Item::End);
        self.queues.clear();
    }

    /// The main body failed: the copies fail too (their queues close without an end).
    pub fn abandon(&mut self) {
        self.queues.clear();
    }
}

/// A mirror's request body: the main request's frames, as they are read.
pub struct MirrorBody {
    rx: mpsc::Receiver<Item>,
    ended: bool,
}

impl MirrorBody {
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Item::Data(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Item::Trailers(t))) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Poll::Ready(Some(Item::End)) => {
                self.ended = true;
                Poll::Ready(None)
            }
            // Closed without an end: dropped, or the main request went away.
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Some(Err("mirror dropped".into())))
            }
        }
    }
}

impl Body for MirrorBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        MirrorBody::poll_frame(self.get_mut(), cx)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Send one mirror copy (in its own task, so the main request never waits for it) and count
/// how it went.
pub fn spawn<F, E>(send: F, endpoint: SocketAddr, timeout: Duration, outcome: Outcome)
where
    F: std::future::Future<Output = Result<http::Response<crate::upstream::UpstreamBody>, E>>
        + Send
        + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        let answered = async {
            let rsp = send.await.map_err(|e| e.to_string())?;
            // Read the answer to the end so the connection can be used again.
            let mut body = rsp.into_body();
            while let Some(f) = http_body_util::BodyExt::frame(&mut body).await {
                f.map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        };
        match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(())) => outcome.sent.inc(),
            Ok(Err(e)) => {
                debug!(%endpoint, "mirror failed: {e}");
                outcome.failed.inc()
            }
            Err(_) => {
                debug!(%endpoint, ?timeout, "mirror took too long: dropped");
                outcome.dropped.inc()
            }
        };
    });
}

/// The counters of one mirror cluster's outcomes.
#[derive(Clone)]
pub struct Outcome {
    pub sent: Counter,
    pub failed: Counter,
    pub dropped: Counter,
}

/// Headers for the copy: the upstream request's, the authority with `-shadow`.
pub fn shadow_headers(headers: &HeaderMap, authority: &str, suffix: bool) -> (HeaderMap, String) {
    let host = if suffix {
        shadow_host(authority)
    } else {
        authority.to_string()
    };
    let mut h = headers.clone();
    if let Ok(v) = HeaderValue::from_str(&host)
        && h.contains_key(http::header::HOST)
    {
        h.insert(http::header::HOST, v);
    }
    (h, host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::r#type::v3::FractionalPercent;

    #[test]
    fn shares_and_hosts() {
        assert_eq!(
            fraction_per_million(25, DenominatorType::Hundred as i32),
            250_000
        );
        assert_eq!(
            fraction_per_million(5, DenominatorType::TenThousand as i32),
            500
        );
        assert_eq!(fraction_per_million(7, DenominatorType::Million as i32), 7);
        assert_eq!(runtime_per_million(None), 1_000_000);
        let p = MirrorPolicy::compile(&pb::route_action::RequestMirrorPolicy {
            cluster: "c".into(),
            runtime_fraction: Some(core::RuntimeFractionalPercent {
                default_value: Some(FractionalPercent {
                    numerator: 300_000,
                    denominator: DenominatorType::Million as i32,
                }),
                runtime_key: String::new(),
            }),
            ..Default::default()
        })
        .unwrap();
        assert!(p.drawn(299_999) && !p.drawn(300_000));
        assert!(p.shadow_suffix);
        assert_eq!(shadow_host("web"), "web-shadow");
        assert_eq!(shadow_host("web.demo:80"), "web.demo-shadow:80");
        assert_eq!(shadow_host("[fd00::1]:80"), "[fd00::1]-shadow:80");
        assert_eq!(shadow_host("fd00::1"), "fd00::1-shadow");
    }

    #[tokio::test]
    async fn a_slow_mirror_is_dropped_not_waited_for() {
        let dropped = Counter::default();
        let mut tee = MirrorTee::default();
        let mut body = tee.add(dropped.clone());
        for _ in 0..QUEUE {
            tee.data(&Bytes::from_static(b"x"));
        }
        assert_eq!(dropped.get(), 0);
        tee.data(&Bytes::from_static(b"x"));
        assert_eq!(dropped.get(), 1, "the queue was full: dropped");
        assert!(tee.is_empty());
        let mut n = 0;
        loop {
            match std::future::poll_fn(|cx| body.poll_frame(cx)).await {
                Some(Ok(_)) => n += 1,
                Some(Err(e)) => {
                    assert_eq!(e.to_string(), "mirror dropped");
                    break;
                }
                None => panic!("a dropped mirror must not look complete"),
            }
        }
        assert_eq!(n, QUEUE);

        let mut tee = MirrorTee::default();
        let mut body = tee.add(Counter::default());
        tee.data(&Bytes::from_static(b"ab"));
        tee.end();
        let f = std::future::poll_fn(|cx| body.poll_frame(cx)).await;
        assert_eq!(f.unwrap().unwrap().into_data().unwrap(), "ab");
        assert!(
            std::future::poll_fn(|cx| body.poll_frame(cx))
                .await
                .is_none()
        );
    }
}
