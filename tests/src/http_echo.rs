//! The pods' HTTP application: HTTP/1.1 and HTTP/2 (prior knowledge, h2c) on one port, answering
//! every request with JSON naming the pod and describing the request it received, so tests can
//! tell which pod a request reached and what a proxy on the way changed.
//!
//! Answers: `200` with `{"pod", "method", "path", "authority", "version", "peer", "headers",
//! "body"}` (`headers` maps each name to its values in order). Query parameters steer the answer
//! for fault and retry tests: `status=<code>` answers that status (same JSON), `delay_ms=<n>`
//! waits first; with `status_pod=<pod>` both apply on that pod only (others answer 200 at once);
//! with `fail_every=<n>`, `status` applies to every n-th such request of the pod (the 1st, the
//! n+1-th, …: `fail_every=2` fails half). `GET /_seen` answers the JSON list of the last 100
//! requests the pod received (oldest first; `/_seen` itself not included), so a test can see
//! what reached a pod whose answers nobody reads (a mirror target). `GET /_open` answers the
//! JSON list of the peers of the pod's open connections (the asking one left out), so a test
//! can see a proxy's upstream connections come and go. A request with `Upgrade` (HTTP/1.1) is answered `101` with the same `Upgrade`
//! value, and the connection then echoes bytes until the client half-closes. A gRPC request
//! (`content-type: application/grpc…`, any method path) is answered as a unary call: `200`, one
//! length-prefixed message holding the same JSON, and trailers `grpc-status` (0, or the
//! `grpc-status` query parameter) and `grpc-message`.

use std::collections::BTreeMap;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpStream;

/// What the app saw, as it reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Echo {
    pub pod: String,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The URI's authority (HTTP/2 `:authority`, absolute-form HTTP/1) else the `Host` header.
    pub authority: String,
    /// `HTTP/1.1`, `HTTP/2.0`, …
    pub version: String,
    /// The TCP peer the app's socket saw.
    pub peer: String,
    pub headers: BTreeMap<String, Vec<String>>,
    /// The request body, as UTF-8 (lossy).
    pub body: String,
}

/// Serve one accepted connection until the client closes it.
pub async fn serve(tcp: TcpStream, pod: Arc<str>, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    /// Takes the connection off the pod's open list however serving ends.
    struct Open(Arc<str>, SocketAddr);
    impl Drop for Open {
        fn drop(&mut self) {
            pod_log(&self.0, |log| log.open.remove(&self.1));
        }
    }
    pod_log(&pod, |log| log.open.insert(peer));
    let _open = Open(pod.clone(), peer);
    let service = hyper::service::service_fn(move |req| {
        let pod = pod.clone();
        async move { Ok::<_, Infallible>(answer(req, &pod, peer).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Clients that half-close after their request (as `Cluster::exchange` does) still get the
    // answer.
    builder.http1().half_close(true);
    let _ = builder
        .serve_connection_with_upgrades(TokioIo::new(tcp), service)
        .await;
}

type Body = BoxBody<Bytes, Infallible>;

/// How many requests each pod remembers for `/_seen`.
const SEEN: usize = 100;

/// What one pod has received, for `/_seen` and `fail_every`.
#[derive(Default)]
struct PodLog {
    seen: VecDeque<Echo>,
    counted: u64,
    /// Peers of the connections open now.
    open: std::collections::BTreeSet<SocketAddr>,
}

/// Every pod's log; the pods of a test bed are served by one process.
static PODS: Mutex<Option<HashMap<String, PodLog>>> = Mutex::new(None);

fn pod_log<T>(pod: &str, f: impl FnOnce(&mut PodLog) -> T) -> T {
    let mut pods = PODS.lock().unwrap_or_else(|e| e.into_inner());
    f(pods
        .get_or_insert_with(HashMap::new)
        .entry(pod.to_string())
        .or_default())
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

async fn answer(mut req: Request<Incoming>, pod: &str, peer: SocketAddr) -> Response<Body> {
    if let Some(upgrade) = req.headers().get(header::UPGRADE).cloned() {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let (mut r, mut w) = tokio::io::split(&mut io);
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                }
            }
        });
        let mut rsp = Response::new(full(Bytes::new()));
        *rsp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        rsp.headers_mut().insert(header::UPGRADE, upgrade);
        rsp.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
        return rsp;
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let query = parts.uri.query().unwrap_or_default();
    let echo = describe(pod, &parts, peer, &body);
    if parts.uri.path() == "/_open" {
        let open: Vec<String> = pod_log(pod, |log| {
            log.open
                .iter()
                .filter(|p| **p != peer)
                .map(|p| p.to_string())
                .collect()
        });
        let mut rsp = Response::new(full(serde_json::to_vec(&open).unwrap_or_default()));
        rsp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        return rsp;
    }
    if parts.uri.path() == "/_seen" {
        let seen = pod_log(pod, |log| serde_json::to_vec(&log.seen).unwrap_or_default());
        let mut rsp = Response::new(full(seen));
        rsp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        return rsp;
    }
    let this_pod = query_param(query, "status_pod").is_none_or(|p| p == pod);
    let count = pod_log(pod, |log| {
        log.seen.push_back(echo.clone());
        if log.seen.len() > SEEN {
            log.seen.pop_front();
        }
        if this_pod && query.contains("fail_every=") {
            log.counted += 1;
        }
        log.counted
    });
    let fails = this_pod
        && query_param(query, "fail_every")
            .and_then(|n| n.parse::<u64>().ok())
            .is_none_or(|n| n > 0 && (count - 1) % n == 0);
    if let Some(ms) = query_param(query, "delay_ms").and_then(|v| v.parse().ok())
        && this_pod
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = query_param(query, "status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .filter(|_| fails)
        .unwrap_or(StatusCode::OK);
    let json = serde_json::to_vec(&echo).unwrap_or_default();
    let grpc = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        let code = query_param(query, "grpc-status").unwrap_or("0").to_string();
        return grpc_answer(&json, code);
    }
    let mut rsp = Response::new(full(json));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    rsp
}

/// A unary gRPC answer: one uncompressed length-prefixed message, then the status trailers.
fn grpc_answer(message: &[u8], code: String) -> Response<Body> {
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    let mut trailers = HeaderMap::new();
    if let Ok(v) = header::HeaderValue::from_str(&code) {
        trailers.insert("grpc-status", v);
    }
    trailers.insert("grpc-message", header::HeaderValue::from_static("echo"));
    let body = Full::new(Bytes::from(framed))
        .with_trailers(async move { Some(Ok(trailers)) })
        .boxed();
    let mut rsp = Response::new(body);
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/grpc"),
    );
    rsp
}

/// The report for one request.
pub fn describe(pod: &str, parts: &http::request::Parts, peer: SocketAddr, body: &[u8]) -> Echo {
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    Echo {
        pod: pod.to_string(),
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "/".into()),
        authority,
        version: format!("{:?}", parts.version),
        peer: peer.to_string(),
        headers: headers(&parts.headers),
        body: String::from_utf8_lossy(body).into_owned(),
    }
}

fn headers(map: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in map {
        out.entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    out
}

/// The first value of `name` in a query string (no percent-decoding: values are numbers).
fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn describes_the_request() {
        let req = Request::builder()
            .method("POST")
            .uri("/a/b?x=1")
            .header("host", "echo.demo:80")
            .header("x-multi", "1")
            .header("x-multi", "2")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let e = describe("p1", &parts, "10.0.0.1:5000".parse().unwrap(), b"hi");
        assert_eq!(e.pod, "p1");
        assert_eq!(e.method, "POST");
        assert_eq!(e.path, "/a/b?x=1");
        assert_eq!(e.authority, "echo.demo:80");
        assert_eq!(e.version, "HTTP/1.1");
        assert_eq!(e.headers["x-multi"], ["1", "2"]);
        assert_eq!(e.body, "hi");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["peer"], "10.0.0.1:5000");

        // HTTP/2 carries the authority in the URI.
        let req = Request::builder()
            .uri("http://10.96.0.10:80/")
            .version(http::Version::HTTP_2)
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let e = describe("p1", &parts, "10.0.0.1:5000".parse().unwrap(), b"");
        assert_eq!(e.authority, "10.96.0.10:80");
        assert_eq!(e.version, "HTTP/2.0");
    }

    #[test]
    fn query_parameters() {
        assert_eq!(query_param("status=503&delay_ms=5", "status"), Some("503"));
        assert_eq!(query_param("status=503&delay_ms=5", "delay_ms"), Some("5"));
        assert_eq!(query_param("x", "status"), None);
    }

    #[tokio::test]
    async fn answers_http1_http2_and_upgrades_on_one_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, peer)) = listener.accept().await {
                tokio::spawn(serve(s, Arc::from("pod-x"), peer));
            }
        });

        // HTTP/1.1, with a status override; the client half-closes after its request.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /hello?status=503 HTTP/1.1\r\nHost: svc:80\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 503"), "{out}");
        let body: serde_json::Value =
            serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["pod"], "pod-x");
        assert_eq!(body["path"], "/hello?status=503");
        assert_eq!(body["authority"], "svc:80");

        // HTTP/2 with prior knowledge.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method("PUT")
            .uri("http://svc2:8080/x")
            .body(())
            .unwrap();
        let (rsp, mut send) = client.send_request(req, false).unwrap();
        send.send_data(Bytes::from_static(b"payload"), true)
            .unwrap();
        let rsp = rsp.await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        let mut body = rsp.into_body();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["version"], "HTTP/2.0");
        assert_eq!(body["authority"], "svc2:8080");
        assert_eq!(body["method"], "PUT");
        assert_eq!(body["body"], "payload");

        // gRPC: one framed message with the JSON, then status trailers.
        let req = Request::builder()
            .method("POST")
            .uri("http://svc2:8080/echo.Echo/Say?grpc-status=14")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let (rsp, mut send) = client.send_request(req, false).unwrap();
        send.send_data(Bytes::from_static(b"\0\0\0\0\0"), true)
            .unwrap();
        let rsp = rsp.await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.headers()["content-type"], "application/grpc");
        let mut body = rsp.into_body();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.unwrap().unwrap();
        assert_eq!(trailers["grpc-status"], "14");
        assert_eq!(bytes[0], 0, "uncompressed");
        let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 5);
        let msg: serde_json::Value = serde_json::from_slice(&bytes[5..]).unwrap();
        assert_eq!(msg["path"], "/echo.Echo/Say?grpc-status=14");
        assert_eq!(msg["pod"], "pod-x");

        // Upgrade, then raw bytes echoed.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("upgrade: websocket"),
            "{head}"
        );
        s.write_all(b"raw bytes").await.unwrap();
        s.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        s.read_to_end(&mut echoed).await.unwrap();
        assert_eq!(echoed, b"raw bytes");
    }

    /// One HTTP/1.1 GET to `addr`: the status and the body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        (
            status,
            out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
        )
    }

    #[tokio::test]
    async fn failures_by_pod_and_the_log_of_what_a_pod_saw() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, peer)) = listener.accept().await {
                tokio::spawn(serve(s, Arc::from("pod-flaky"), peer));
            }
        });
        // Another pod named: this one answers 200.
        assert_eq!(get(addr, "/a?status=500&status_pod=other").await.0, 200);
        // Every second request of this pod fails: the 1st and the 3rd.
        let statuses: Vec<u16> =
            futures_statuses(addr, "/b?status=500&fail_every=2&status_pod=pod-flaky", 4).await;
        assert_eq!(statuses, [500, 200, 500, 200]);
        let (status, seen) = get(addr, "/_seen").await;
        assert_eq!(status, 200);
        let seen: Vec<serde_json::Value> = serde_json::from_str(&seen).unwrap();
        assert_eq!(seen.len(), 5, "{seen:?}");
        assert_eq!(seen[0]["path"], "/a?status=500&status_pod=other");
        assert!(seen.iter().all(|e| e["pod"] == "pod-flaky"));
    }

    #[tokio::test]
    async fn open_connections_are_listed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, peer)) = listener.accept().await {
                tokio::spawn(serve(s, Arc::from("pod-open"), peer));
            }
        });
        let held = TcpStream::connect(addr).await.unwrap();
        let held_peer = held.local_addr().unwrap().to_string();
        let open = |body: String| serde_json::from_str::<Vec<String>>(&body).unwrap();
        let mut listed = Vec::new();
        for _ in 0..50 {
            listed = open(get(addr, "/_open").await.1);
            if !listed.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(listed, [held_peer], "the asking connection left out");
        drop(held);
        for _ in 0..50 {
            listed = open(get(addr, "/_open").await.1);
            if listed.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(listed.is_empty(), "{listed:?}");
    }

    async fn futures_statuses(addr: SocketAddr, path: &str, n: usize) -> Vec<u16> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(get(addr, path).await.0);
        }
        out
    }
}
