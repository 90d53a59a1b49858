//! The in-pod DNS proxy's sockets: UDP and TCP on 15053 inside each enrolled pod, answers for
//! mesh hostnames from the current state, and everything else relayed unchanged to the upstream
//! resolvers over sockets made inside the pod with ztunnel's mark (so capture skips them).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use mesh::drain;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::{
    Decision, NameTable, ParseError, TCP_MAX, answer, decide, format_error, is_response_to,
    parse_query, server_failure, type_label, udp_limit,
};
use crate::metrics::{DnsLabels, or_unknown};
use crate::node::Pod;
use mesh::state::State;

/// The proxy's port in every enrolled pod.
pub const DNS_PORT: u16 = 15053;
/// How long one upstream gets to answer a UDP query before the next is tried (stub resolvers
/// give up after 5 s, glibc's default).
const UDP_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one upstream gets to answer over TCP, connection included.
const TCP_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle client TCP connection is closed after this long (RFC 7766 suggests seconds).
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Queries in flight on the node at once; UDP queries beyond it are dropped (the client
/// retries), TCP ones wait.
const MAX_IN_FLIGHT: usize = 1024;

/// How a query reached the proxy; also the `request_protocol` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Shared by the DNS proxies of all pods on the node: where to forward, and the name table of
/// the current state snapshot (rebuilt when the snapshot changes, on the first query after).
pub struct DnsProxy {
    upstreams: Vec<SocketAddr>,
    table: Mutex<(Weak<State>, Arc<NameTable>)>,
    in_flight: Arc<Semaphore>,
}

impl DnsProxy {
    /// `upstreams` are tried in order; none means every forwarded query gets SERVFAIL.
    pub fn new(upstreams: Vec<SocketAddr>) -> DnsProxy {
        DnsProxy {
            upstreams,
            table: Mutex::new((Weak::new(), Arc::new(NameTable::default()))),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// The name table for `state`, built once per snapshot.
    fn table(&self, state: &Arc<State>) -> Arc<NameTable> {
        let Ok(mut cached) = self.table.lock() else {
            return Arc::new(NameTable::from_state(state));
        };
        if !Weak::ptr_eq(&cached.0, &Arc::downgrade(state)) {
            let table = Arc::new(NameTable::from_state(state));
            debug!(target: "dns", names = table.len(), "DNS name table rebuilt");
            *cached = (Arc::downgrade(state), table);
        }
        cached.1.clone()
    }
}

/// Open the pod's DNS listeners (UDP and TCP on `ip`:15053) through its socket factory.
pub fn listen(
    pod_sockets: &mesh::socket::SocketFactory,
    ip: IpAddr,
) -> Result<(UdpSocket, TcpListener), String> {
    let addr = SocketAddr::new(ip, DNS_PORT);
    let udp = pod_sockets
        .udp_bind(addr)
        .map_err(|e| format!("DNS proxy: UDP {addr} in the pod: {e}"))?;
    let tcp = pod_sockets
        .listen(addr)
        .map_err(|e| format!("DNS proxy: TCP {addr} in the pod: {e}"))?;
    Ok((udp, tcp))
}

/// Answer the queries arriving on the pod's UDP socket until the pod drains, then those
/// already queued on it ([`hand_over`]).
pub async fn serve_udp(socket: UdpSocket, pod: Arc<Pod>, dns: Arc<DnsProxy>, drain: drain::Watch) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; TCP_MAX];
    loop {
        let (n, client) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    // E.g. ICMP errors from an earlier reply to a client that went away.
                    debug!(target: "dns", "UDP receive: {e}");
                    continue;
                }
            },
            _ = drain.signaled() => break,
        };
        answer_udp(&socket, &pod, &dns, &drain, &buf[..n], client);
    }
    hand_over(&socket, &mut buf, |query, client| {
        answer_udp(&socket, &pod, &dns, &drain, query, client)
    })
    .await;
}

/// Answer one UDP query in a task of its own.
fn answer_udp(
    socket: &Arc<UdpSocket>,
    pod: &Arc<Pod>,
    dns: &Arc<DnsProxy>,
    drain: &drain::Watch,
    query: &[u8],
    client: SocketAddr,
) {
    let Ok(permit) = dns.in_flight.clone().try_acquire_owned() else {
        warn!(target: "dns", %client, "too many DNS queries in flight; dropping one");
        return;
    };
    let query = query.to_vec();
    let (socket, pod, dns, drain) = (socket.clone(), pod.clone(), dns.clone(), drain.clone());
    tokio::spawn(async move {
        if let Some(resp) = handle(&pod, &dns, &query, Transport::Udp).await
            && let Err(e) = socket.send_to(&resp, client).await
        {
            debug!(target: "dns", %client, "UDP reply: {e}");
        }
        drop((permit, drain));
    });
}

/// How long a draining UDP socket keeps reading what the kernel queued on it.
const HAND_OVER_GRACE: Duration = Duration::from_millis(50);

/// Stop taking new queries on a draining UDP socket without losing those already sent to it.
/// UDP has no equivalent of TCP's `tcp_migrate_req`: closing the socket would drop what is
/// queued on it, and leaving it open while not reading would drop what the kernel keeps
/// choosing it for. Connected (to its own address, from which no query comes), it is no longer
/// chosen among the sockets sharing the address (SO_REUSEPORT skips connected members), so new
/// queries go to a successor ztunnel's socket; what was queued before is read and answered
/// (`answer`), including datagrams the kernel chose it for just before, for a short grace.
async fn hand_over(socket: &UdpSocket, buf: &mut [u8], mut answer: impl FnMut(&[u8], SocketAddr)) {
    match socket.local_addr() {
        Ok(own) => {
            if let Err(e) = socket.connect(own).await {
                debug!(target: "dns", "detaching the draining UDP socket: {e}");
            }
        }
        Err(e) => debug!(target: "dns", "detaching the draining UDP socket: {e}"),
    }
    let until = Instant::now() + HAND_OVER_GRACE;
    loop {
        match socket.try_recv_from(buf) {
            Ok((n, client)) => answer(&buf[..n], client),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= until {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => debug!(target: "dns", "UDP receive while draining: {e}"),
        }
    }
}

/// Accept DNS-over-TCP connections on the pod's listener until the pod drains.
pub async fn serve_tcp(
    listener: TcpListener,
    pod: Arc<Pod>,
    dns: Arc<DnsProxy>,
    drain: drain::Watch,
) {
    while let Some((stream, client)) = drain::accept(&listener, &drain).await {
        let (pod, dns, drain) = (pod.clone(), dns.clone(), drain.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_tcp_connection(stream, &pod, &dns, &drain).await {
                debug!(target: "dns", %client, "DNS over TCP: {e}");
            }
        });
    }
}

/// One client connection: length-prefixed queries answered in order (RFC 7766), closed when
/// the client is idle, sends something that is not a query, or the pod drains.
async fn serve_tcp_connection(
    mut stream: TcpStream,
    pod: &Pod,
    dns: &DnsProxy,
    drain: &drain::Watch,
) -> std::io::Result<()> {
    loop {
        let len = tokio::select! {
            r = tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_u16()) => match r {
                Ok(Ok(len)) => usize::from(len),
                // Idle, or closed by the client: both end the connection normally.
                Ok(Err(_)) | Err(_) => return Ok(()),
            },
            _ = drain.signaled() => return Ok(()),
        };
        let mut query = vec![0u8; len];
        tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut query))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "query cut short"))??;
        let permit = dns.in_flight.acquire().await;
        let resp = handle(pod, dns, &query, Transport::Tcp).await;
        drop(permit);
        let Some(resp) = resp else {
            return Ok(());
        };
        let mut framed = Vec::with_capacity(resp.len() + 2);
        framed.extend_from_slice(&(resp.len() as u16).to_be_bytes());
        framed.extend_from_slice(&resp);
        stream.write_all(&framed).await?;
    }
}

/// The response to one query: local answer, upstream's response, SERVFAIL, FORMERR; `None`
/// when there is nothing to answer (no header, or a response).
pub async fn handle(
    pod: &Pod,
    dns: &DnsProxy,
    msg: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let q = match parse_query(msg) {
        Ok(q) => q,
        Err(e @ ParseError::Malformed(_)) => {
            debug!(target: "dns", pod = %pod.uid, "{e}: FORMERR");
            return format_error(msg);
        }
        Err(e) => {
            debug!(target: "dns", pod = %pod.uid, "ignoring a message: {e}");
            return None;
        }
    };
    let state = pod.node.state.borrow().clone();
    let workload = state.workload_by_uid(&pod.uid).cloned();
    let labels = DnsLabels {
        request_query_type: type_label(q.qtype),
        request_protocol: transport.label().into(),
        source_canonical_service: or_unknown(workload.as_ref().map_or("", |w| &w.canonical_name)),
        source_canonical_revision: or_unknown(
            workload.as_ref().map_or("", |w| &w.canonical_revision),
        ),
    };
    let metrics = &pod.node.metrics.dns;
    metrics.requests.get_or_create(&labels).inc();
    let namespace = workload.as_ref().map_or("", |w| w.namespace.as_str());
    let name = q.name.as_deref().unwrap_or("?");
    match decide(&q, &dns.table(&state), namespace) {
        Decision::Answer(addrs) => {
            debug!(target: "dns", pod = %pod.uid, query = name, qtype = %labels.request_query_type, ?addrs, "answered from the mesh");
            let limit = match transport {
                Transport::Udp => udp_limit(&q),
                Transport::Tcp => TCP_MAX,
            };
            Some(answer(&q, &addrs, limit))
        }
        Decision::Forward => {
            metrics.upstream_requests.get_or_create(&labels).inc();
            let start = Instant::now();
            match forward(pod, dns, msg, q.id, transport).await {
                Ok((resp, upstream)) => {
                    metrics
                        .upstream_duration
                        .get_or_create(&labels)
                        .observe(start.elapsed().as_secs_f64());
                    debug!(target: "dns", pod = %pod.uid, query = name, qtype = %labels.request_query_type, %upstream, "forwarded");
                    Some(resp)
                }
                Err(e) => {
                    metrics.upstream_failures.get_or_create(&labels).inc();
                    warn!(target: "dns", pod = %pod.uid, query = name, qtype = %labels.request_query_type, "no upstream answered, SERVFAIL: {e}");
                    Some(server_failure(&q))
                }
            }
        }
    }
}

/// Relay `msg` to the upstreams in turn, from inside the pod, until one answers; its response
/// comes back unchanged.
async fn forward(
    pod: &Pod,
    dns: &DnsProxy,
    msg: &[u8],
    id: u16,
    transport: Transport,
) -> Result<(Vec<u8>, SocketAddr), String> {
    if dns.upstreams.is_empty() {
        return Err("no upstream resolver configured".into());
    }
    let mut errors = vec![];
    for &upstream in &dns.upstreams {
        let result = match transport {
            Transport::Udp => forward_udp(pod, upstream, msg, id).await,
            Transport::Tcp => forward_tcp(pod, upstream, msg, id).await,
        };
        match result {
            Ok(resp) => return Ok((resp, upstream)),
            Err(e) => errors.push(format!("{upstream}: {e}")),
        }
    }
    Err(errors.join("; "))
}

/// One query over UDP from a fresh socket (its own random port; no ID clashes between
/// clients), connected so only the upstream's datagrams arrive.
async fn forward_udp(
    pod: &Pod,
    upstream: SocketAddr,
    msg: &[u8],
    id: u16,
) -> Result<Vec<u8>, String> {
    let any = if upstream.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    let socket = pod
        .sockets
        .udp_bind(SocketAddr::new(any, 0))
        .map_err(|e| format!("UDP socket in the pod: {e}"))?;
    socket.connect(upstream).await.map_err(|e| e.to_string())?;
    socket.send(msg).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; TCP_MAX];
    let exchange = async {
        loop {
            let n = socket.recv(&mut buf).await.map_err(|e| e.to_string())?;
            // A stray datagram (a late answer to someone else) is skipped, not relayed.
            if is_response_to(&buf[..n], id) {
                return Ok::<_, String>(buf[..n].to_vec());
            }
        }
    };
    tokio::time::timeout(UDP_UPSTREAM_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {UDP_UPSTREAM_TIMEOUT:?}"))?
}

/// One query over a fresh TCP connection (RFC 1035 4.2.2 framing).
async fn forward_tcp(
    pod: &Pod,
    upstream: SocketAddr,
    msg: &[u8],
    id: u16,
) -> Result<Vec<u8>, String> {
    let exchange = async {
        let mut stream = pod
            .sockets
            .connect(upstream)
            .await
            .map_err(|e| e.to_string())?;
        let mut framed = Vec::with_capacity(msg.len() + 2);
        framed.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        framed.extend_from_slice(msg);
        stream.write_all(&framed).await.map_err(|e| e.to_string())?;
        let len = stream.read_u16().await.map_err(|e| e.to_string())?;
        let mut resp = vec![0u8; usize::from(len)];
        stream
            .read_exact(&mut resp)
            .await
            .map_err(|e| e.to_string())?;
        if !is_response_to(&resp, id) {
            return Err("the upstream's answer is not a response to this query".to_string());
        }
        Ok(resp)
    };
    tokio::time::timeout(TCP_UPSTREAM_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {TCP_UPSTREAM_TIMEOUT:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reuseport_udp(addr: SocketAddr) -> UdpSocket {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_reuse_port(true).unwrap();
        s.set_nonblocking(true).unwrap();
        s.bind(&addr.into()).unwrap();
        UdpSocket::from_std(s.into()).unwrap()
    }

    /// Datagrams from `n` clients (a socket, so a source port, each) to `to`.
    async fn send_from_many(to: SocketAddr, n: usize, tag: u8) {
        for i in 0..n {
            let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            c.send_to(&[tag, i as u8], to).await.unwrap();
        }
    }

    /// Against the kernel: with two sockets sharing an address, the draining one answers what
    /// was queued on it, and every datagram sent after it is detached reaches the other.
    #[tokio::test]
    async fn a_draining_udp_socket_hands_new_datagrams_to_its_sibling() {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let old = reuseport_udp(addr);
        let new = reuseport_udp(addr);
        const N: usize = 100;
        send_from_many(addr, N, 1).await;
        let mut buf = [0u8; 16];
        let mut answered = vec![];
        hand_over(&old, &mut buf, |d, _| answered.push(d.to_vec())).await;
        send_from_many(addr, N, 2).await;
        let mut at_new = vec![];
        while let Ok((n, _)) = new.try_recv_from(&mut buf) {
            at_new.push(buf[..n].to_vec());
        }
        assert!(
            !answered.is_empty(),
            "some of the first datagrams were queued on the old one"
        );
        assert!(answered.iter().all(|d| d[0] == 1));
        let first_at_new = at_new.iter().filter(|d| d[0] == 1).count();
        let second_at_new = at_new.iter().filter(|d| d[0] == 2).count();
        assert_eq!(answered.len() + first_at_new, N, "none of the first lost");
        assert_eq!(second_at_new, N, "every later one went to the sibling");
        let mut rest = [0u8; 16];
        assert!(
            old.try_recv_from(&mut rest).is_err(),
            "nothing more for the old one"
        );
    }
}
