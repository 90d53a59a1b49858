//! HBONE end to end over loopback: real mTLS 1.3 + HTTP/2 CONNECT between `hbone::client` (and the
//! pool) and `hbone::server`, with certificates from the development CA.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use http::StatusCode;
use mesh::hbone::client::{self, Connection, HboneError};
use mesh::hbone::pool::{Key, Pool};
use mesh::hbone::{ConnectRequest, Refusal};
use mesh::identity::Identity;
use mesh::socket::SocketFactory;
use mesh::tls::WorkloadCert;

/// Dial `addr` as ztunnel does: mesh socket options, then the TLS and HTTP/2 handshakes.
async fn dial(
    addr: SocketAddr,
    cert: &WorkloadCert,
    expected: Vec<Identity>,
) -> Result<Connection, HboneError> {
    let tcp = SocketFactory::host()
        .connect(addr)
        .await
        .map_err(|source| HboneError::Connect { addr, source })?;
    client::handshake(tcp, cert.client_config(expected)?, addr).await
}

/// One CONNECT on a fresh connection; the error is whatever stopped it first.
async fn connect_once(
    addr: SocketAddr,
    cert: &WorkloadCert,
    req: &ConnectRequest,
) -> Result<mesh::hbone::copy::H2Stream, HboneError> {
    dial(addr, cert, vec![server_id()])
        .await?
        .connect(req)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_echoes_payload_and_carries_identity_and_headers() {
    within(20, async {
        let server = start_server(&new_ca(), Behavior::Forward).await;
        let client_cert = server.client_cert.clone();
        let req = ConnectRequest {
            authority: echo_app().await,
            forwarded_for: Some("127.0.0.1:41234".parse().unwrap()),
            host: Some("echo.server-ns.svc.cluster.local".into()),
            baggage: Some("k8s.cluster.name=test,k8s.namespace.name=client-ns".into()),
            traceparent: Some(mesh::hbone::traceparent()),
        };
        let stream = connect_once(server.addr, &client_cert, &req).await.unwrap();

        // Larger than the 64 KiB HTTP/2 default windows and several max-size frames, so flow
        // control has to work in both directions.
        let mut payload = vec![0u8; 1024 * 1024];
        fastrand::fill(&mut payload);
        let echoed = exchange(stream, &payload).await;
        assert_eq!(echoed.len(), payload.len());
        assert!(echoed == payload, "echoed bytes differ from those sent");

        let seen = server.handler.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].peer, client_id());
        // forwarded (for + host), baggage and traceparent all arrive as sent.
        assert_eq!(seen[0].request, req);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_still_gets_whole_response() {
    within(20, async {
        let server = start_server(&new_ca(), Behavior::Forward).await;
        let client_cert = server.client_cert.clone();
        let req = ConnectRequest::new(reply_after_eof_app().await);
        let mut stream = connect_once(server.addr, &client_cert, &req).await.unwrap();

        // Send and end our side before reading anything: the app answers only at EOF, so the
        // reply proves END_STREAM became a TCP half-close and the way back stayed open.
        let request = vec![b'x'; 100_000];
        send_all(&mut stream.send, &request).await.unwrap();
        let reply = recv_all(&mut stream.recv).await.unwrap();
        let header = b"got 100000 bytes\n";
        assert_eq!(&reply[..header.len()], header);
        assert_eq!(&reply[header.len()..], &request[..]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rejects_unexpected_server_identity() {
    within(20, async {
        let server = start_server(&new_ca(), Behavior::Forward).await;
        let client_cert = server.client_cert.clone();
        let other = Identity::new("cluster.local", "server-ns", "someone-else");
        let err = match dial(server.addr, &client_cert, vec![other]).await {
            Ok(_) => panic!("handshake with an unexpected server identity succeeded"),
            Err(e) => e,
        };
        assert!(matches!(err, HboneError::Tls { .. }), "{err}");
        assert!(
            err.to_string().contains("not one of the expected"),
            "unexpected error text: {err}"
        );
        assert!(server.handler.seen().is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_rejects_client_from_other_trust_domain() {
    within(20, async {
        let ca = new_ca();
        let server = start_server(&ca, Behavior::Forward).await;
        // Same CA, so the chain verifies: only the trust-domain check can refuse it.
        let evil = ca
            .issue(&Identity::new("evil.local", "client-ns", "client-sa"), TTL)
            .unwrap();
        let req = ConnectRequest::new(echo_app().await);
        // In TLS 1.3 the client finishes its handshake before the server has judged the client
        // certificate, so the refusal may surface on the handshake or on the first stream.
        match connect_once(server.addr, &evil, &req).await {
            Ok(_) => panic!("a client from another trust domain got a stream"),
            Err(e @ HboneError::Status { .. }) => panic!("refused too late, by HTTP: {e}"),
            Err(_) => {}
        }
        assert!(server.handler.seen().is_empty());
    })
    .await
}

/// Opens a CONNECT to `authority` and returns the status the server refused it with.
async fn refused_status(server: &TestServer, authority: SocketAddr) -> StatusCode {
    let req = ConnectRequest::new(authority);
    match connect_once(server.addr, &server.client_cert, &req).await {
        Ok(_) => panic!("CONNECT to {authority} was accepted"),
        Err(e) => e
            .status()
            .unwrap_or_else(|| panic!("CONNECT to {authority} failed without a status: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authority_not_local_is_400() {
    within(20, async {
        let server = start_server(&new_ca(), Behavior::Forward).await;
        // The server listens on 127.0.0.1; another loopback address is not "this pod".
        let status = refused_status(&server, "127.0.0.2:8080".parse().unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            server.handler.seen().is_empty(),
            "handler saw a bad request"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authority_to_proxy_port_is_400() {
    within(20, async {
        let server = start_server(&new_ca(), Behavior::Forward).await;
        let status = refused_status(&server, "127.0.0.1:15001".parse().unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            server.handler.seen().is_empty(),
            "handler saw a bad request"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_refusals_surface_as_status() {
    within(20, async {
        let denied = start_server(
            &new_ca(),
            Behavior::Refuse(Refusal::unauthorized("policy says no")),
        )
        .await;
        let status = refused_status(&denied, echo_app().await).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(denied.handler.seen().len(), 1);

        // Nothing listens at the authority: the handler's upstream connect fails.
        let unreachable = start_server(&new_ca(), Behavior::Forward).await;
        let status = refused_status(&unreachable, closed_port().await).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(unreachable.handler.seen().len(), 1);
    })
    .await
}

/// A pool key for the test client talking to `server`.
fn key(server: &TestServer) -> Key {
    Key {
        src_identity: client_id(),
        dst_identities: vec![server_id()],
        dst: server.addr,
        src_ip: "127.0.0.1".parse().unwrap(),
    }
}

/// Open a stream through `pool`, counting the dials it needed.
async fn pooled(
    pool: &Pool,
    server_addr: SocketAddr,
    key: Key,
    cert: Arc<WorkloadCert>,
    authority: SocketAddr,
    dials: Arc<AtomicUsize>,
) -> mesh::hbone::copy::H2Stream {
    pool.connect(key, &ConnectRequest::new(authority), || async move {
        dials.fetch_add(1, Ordering::SeqCst);
        dial(server_addr, &cert, vec![server_id()]).await
    })
    .await
    .expect("pooled CONNECT")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_opens_second_connection_past_100_streams() {
    within(30, async {
        let server = start_server(&new_ca(), Behavior::Forward).await;
        let cert = server.client_cert.clone();
        let app = echo_app().await;
        let pool = Pool::new();
        let dials = Arc::new(AtomicUsize::new(0));

        // All 150 streams are open at once (none is finished or dropped before the count).
        let mut opening = tokio::task::JoinSet::new();
        for _ in 0..150 {
            let (pool, key, cert, dials) =
                (pool.clone(), key(&server), cert.clone(), dials.clone());
            let addr = server.addr;
            opening.spawn(async move { pooled(&pool, addr, key, cert, app, dials).await });
        }
        let streams = opening.join_all().await;
        assert_eq!(streams.len(), 150);
        assert_eq!(dials.load(Ordering::SeqCst), 2, "dials for 150 streams");
        assert_eq!(pool.connections(), 2);
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);

        // Every stream works, on either connection.
        let mut using = tokio::task::JoinSet::new();
        for (i, stream) in streams.into_iter().enumerate() {
            using.spawn(async move {
                let msg = format!("stream {i}");
                assert_eq!(exchange(stream, msg.as_bytes()).await, msg.as_bytes());
            });
        }
        using.join_all().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_reuses_connection_for_sequential_streams() {
    within(20, async {
        let server = start_server(&new_ca(), Behavior::Forward).await;
        let cert = server.client_cert.clone();
        let app = echo_app().await;
        let pool = Pool::new();
        let dials = Arc::new(AtomicUsize::new(0));
        for i in 0..5 {
            let stream = pooled(
                &pool,
                server.addr,
                key(&server),
                cert.clone(),
                app,
                dials.clone(),
            )
            .await;
            let msg = format!("round {i}");
            assert_eq!(exchange(stream, msg.as_bytes()).await, msg.as_bytes());
        }
        assert_eq!(dials.load(Ordering::SeqCst), 1);
        assert_eq!(pool.connections(), 1);
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(server.handler.seen().len(), 5);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_dials_afresh_after_goaway() {
    within(20, async {
        let server = start_server(&new_ca(), Behavior::Forward).await;
        let cert = server.client_cert.clone();
        let app = echo_app().await;
        let pool = Pool::new();
        let dials = Arc::new(AtomicUsize::new(0));
        let open = || {
            pooled(
                &pool,
                server.addr,
                key(&server),
                cert.clone(),
                app,
                dials.clone(),
            )
        };
        // A long-lived stream on the first connection, which then gets GOAWAY.
        let long = open().await;
        server.goaway_open_connections();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // The pooled connection still has free slots, but takes no new stream: the next
        // requests go to a new connection, and none fails.
        for i in 0..3 {
            let msg = format!("after goaway {i}");
            let stream = open().await;
            assert_eq!(exchange(stream, msg.as_bytes()).await, msg.as_bytes());
        }
        assert_eq!(
            dials.load(Ordering::SeqCst),
            2,
            "one fresh dial after GOAWAY"
        );
        // The stream opened before the GOAWAY runs to completion.
        assert_eq!(exchange(long, b"still open").await, b"still open");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dial_is_reported_to_every_waiter_at_once() {
    within(20, async {
        let pool = Pool::new();
        let dials = Arc::new(AtomicUsize::new(0));
        let key = Key {
            src_identity: client_id(),
            dst_identities: vec![server_id()],
            dst: "127.0.0.1:9".parse().unwrap(),
            src_ip: "127.0.0.1".parse().unwrap(),
        };
        // Ten callers at once; the dial they queue behind takes 300 ms and fails.
        let mut waiting = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let (pool, key, dials) = (pool.clone(), key.clone(), dials.clone());
            waiting.spawn(async move {
                pool.connect(
                    key.clone(),
                    &ConnectRequest::new("127.0.0.1:80".parse().unwrap()),
                    || async move {
                        dials.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        Err(HboneError::TlsTimeout { addr: key.dst })
                    },
                )
                .await
                .err()
                .expect("the dial fails")
            });
        }
        let started = std::time::Instant::now();
        let errors = waiting.join_all().await;
        assert_eq!(dials.load(Ordering::SeqCst), 1, "one dial for ten waiters");
        assert!(errors.iter().all(|e| e.to_string().contains("timed out")));
        println!("ten waiters failed after {:?}", started.elapsed());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_slots_bound_idle_connections() {
    use mesh::hbone::admission::{Admitter, Limits};
    use mesh::hbone::server::{self, Options};
    use tokio::io::AsyncReadExt;
    within(20, async {
        let ca = new_ca();
        let cert = ca.issue(&server_id(), TTL).unwrap();
        let client_cert = ca.issue(&client_id(), TTL).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admitter = Admitter::new(Limits {
            total: 2,
            per_source: 2,
        });
        let refused = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(TestHandler {
            behavior: Behavior::Forward,
            seen: Default::default(),
        });
        let (_trigger, watch) = mesh::drain::channel();
        let (a, r, tls) = (admitter.clone(), refused.clone(), cert.server_config());
        tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                match a.admit(peer.ip()) {
                    Ok(admission) => {
                        let options = Options {
                            require_local_authority: true,
                        };
                        let (tls, h, w) = (tls.clone(), handler.clone(), watch.clone());
                        tokio::spawn(server::serve_admitted(tcp, tls, options, h, w, admission));
                    }
                    Err(_) => {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        // Two connections that never start TLS hold both slots.
        let idle1 = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _idle2 = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(admitter.in_progress(), 2);
        // A third is closed at once, not held until the TLS timeout.
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(std::time::Duration::from_secs(2), third.read(&mut buf))
            .await
            .expect("closed at once");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        assert_eq!(refused.load(Ordering::SeqCst), 1);
        // One idle client gives up: its slot comes back and a real client gets through.
        drop(idle1);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let app = echo_app().await;
        let stream = connect_once(addr, &client_cert, &ConnectRequest::new(app))
            .await
            .expect("a real client is admitted");
        assert_eq!(exchange(stream, b"admitted").await, b"admitted");
        // Authenticated and on HTTP/2: it no longer holds a handshake slot.
        assert_eq!(admitter.in_progress(), 1);
    })
    .await
}
