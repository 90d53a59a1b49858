//! The socket factory: every socket a proxy makes goes through here, so the proxy code does not
//! care which network namespace it serves. A socket stays in the namespace it was created in,
//! so creating one inside a pod is a brief `setns` of the current thread and back.

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The mark on every socket a proxy makes inside a pod; capture rules skip it.
pub const PROXY_MARK: u32 = 0x539;

/// The mark on the sockets that deliver inbound connections to the application from the
/// client's address ([`SocketFactory::connect_from`]). With `net.ipv4.tcp_fwmark_accept=1` the
/// application's accepted socket inherits it, and the pod's policy routing (`fwmark` →
/// `local default dev lo`) brings its replies back to the proxy instead of out to the client.
/// Distinct from [`PROXY_MARK`], which the proxy's outbound sockets carry and which must keep
/// the normal routes.
pub const DELIVERY_MARK: u32 = 0x111;

/// Makes sockets in one network namespace, optionally marked.
#[derive(Clone, Debug)]
pub struct SocketFactory {
    netns: Option<Arc<OwnedFd>>,
    mark: Option<u32>,
}

impl SocketFactory {
    /// Sockets in the process's own namespace, unmarked.
    pub fn host() -> Self {
        SocketFactory {
            netns: None,
            mark: None,
        }
    }

    /// Sockets inside the namespace `netns` (an open `/proc/<pid>/ns/net` or `/run/netns/<name>`).
    pub fn in_netns(netns: OwnedFd, mark: Option<u32>) -> Self {
        SocketFactory {
            netns: Some(Arc::new(netns)),
            mark,
        }
    }

    pub fn open_netns(path: &Path, mark: Option<u32>) -> io::Result<Self> {
        let file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
        Ok(Self::in_netns(file.into(), mark))
    }

    /// Inode of the namespace, which identifies it (e.g. to tell two pods apart).
    pub fn netns_inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        match &self.netns {
            Some(fd) => Ok(File::from(fd.try_clone()?).metadata()?.ino()),
            None => Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino()),
        }
    }

    /// Run `f` with the current thread in this factory's namespace, then switch back.
    pub fn run_in<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        match &self.netns {
            None => f(),
            Some(target) => with_netns(target.as_fd().as_raw_fd(), f),
        }
    }

    fn socket(&self, addr: &SocketAddr) -> io::Result<Socket> {
        self.new_socket(addr, Type::STREAM, Protocol::TCP)
    }

    /// A non-blocking socket of `ty` made in this factory's namespace, carrying its mark.
    fn new_socket(&self, addr: &SocketAddr, ty: Type, protocol: Protocol) -> io::Result<Socket> {
        self.run_in(|| {
            let socket = Socket::new(Domain::for_address(*addr), ty.nonblocking(), Some(protocol))?;
            if let Some(mark) = self.mark {
                socket.set_mark(mark)?;
            }
            Ok(socket)
        })
    }

    /// A listener with SO_REUSEPORT, so a new proxy can take over the address during an upgrade.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = self.socket(&addr)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket
            .bind(&addr.into())
            .map_err(|e| io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    }

    /// A UDP socket bound to `addr`: a proxy's in-pod UDP listener (SO_REUSEPORT, as
    /// [`SocketFactory::listen`]), or with port 0 an ephemeral socket for one upstream exchange.
    pub fn udp_bind(&self, addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
        let socket = self.new_socket(&addr, Type::DGRAM, Protocol::UDP)?;
        if addr.port() != 0 {
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
        }
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket
            .bind(&addr.into())
            .map_err(|e| io::Error::new(e.kind(), format!("binding UDP {addr}: {e}")))?;
        tokio::net::UdpSocket::from_std(socket.into())
    }

    /// An unconnected TCP socket for callers that need to bind first (e.g. a source address).
    pub fn tcp_socket(&self, dst: &SocketAddr) -> io::Result<TcpSocket> {
        let socket = self.socket(dst)?;
        Ok(TcpSocket::from_std_stream(socket.into()))
    }

    /// Connect with the mesh's socket options and a 10 s timeout.
    pub async fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let socket = self.tcp_socket(&dst)?;
        connect_socket(socket, dst).await
    }

    /// A socket bound to `src`, an address that need not be this namespace's
    /// (`IP_TRANSPARENT` + `IP_FREEBIND`), marked `mark` instead of the factory's mark, so
    /// that policy routing can bring the replies back to it, and bound to the loopback device.
    /// Needs CAP_NET_ADMIN.
    ///
    /// The device matters as much as the mark: a connection to an address of this namespace
    /// routed without an output device takes the `local` table's route of the interface that
    /// holds the address (a pod's `eth0`), and the receiving side then reports that interface
    /// as the one the SYN came in on (`inet_iif`, `sk_lookup`'s `ingress_ifindex`), as if it came
    /// from outside; an `sk_lookup` capture program would send it to the pod's inbound
    /// listener, whose answer leaves the pod: the delivery times out. With `SO_BINDTODEVICE lo`
    /// that route does not match (its device is not `lo`), the `fwmark` rule's
    /// `local default dev lo` does, and the SYN is reported as arriving on loopback.
    pub fn transparent_socket(
        &self,
        src: IpAddr,
        dst: &SocketAddr,
        mark: u32,
        port: u16,
    ) -> io::Result<TcpSocket> {
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("source {src} and destination {dst} are of different families"),
            ));
        }
        let socket = self.socket(dst)?;
        let option = |name: &str, r: io::Result<()>| {
            r.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("setting {name} (needs CAP_NET_ADMIN): {e}"),
                )
            })
        };
        option("SO_MARK", socket.set_mark(mark))?;
        match src {
            IpAddr::V4(_) => {
                option("IP_TRANSPARENT", socket.set_ip_transparent_v4(true))?;
                option("IP_FREEBIND", socket.set_freebind_v4(true))?;
            }
            IpAddr::V6(_) => {
                option("IPV6_TRANSPARENT", socket.set_ip_transparent_v6(true))?;
                option("IPV6_FREEBIND", socket.set_freebind_v6(true))?;
            }
        }
        option("SO_BINDTODEVICE lo", socket.bind_device(Some(b"lo")))?;
        // Port 0: picked at connect time, unique per 4-tuple rather than per address, so many
        // connections from one client do not run out of ports. A given port binds now.
        if port == 0 {
            bind_address_no_port(&socket)?;
        }
        socket
            .bind(&SocketAddr::new(src, port).into())
            .map_err(|e| io::Error::new(e.kind(), format!("binding {src} (transparent): {e}")))?;
        Ok(TcpSocket::from_std_stream(socket.into()))
    }

    /// Connect to `dst` from the address `src` of another host (see [`Self::transparent_socket`]),
    /// with the mesh's socket options and a 10 s timeout.
    pub async fn connect_from(
        &self,
        src: IpAddr,
        dst: SocketAddr,
        mark: u32,
    ) -> io::Result<TcpStream> {
        let socket = self.transparent_socket(src, &dst, mark, 0)?;
        connect_socket(socket, dst).await
    }
}

/// Connect `socket` to `dst` with a 10 s timeout, then [`tune`] it.
pub async fn connect_socket(socket: TcpSocket, dst: SocketAddr) -> io::Result<TcpStream> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {dst} timed out after {CONNECT_TIMEOUT:?}"),
            ));
        }
    };
    tune(&stream)?;
    Ok(stream)
}

/// `IP_BIND_ADDRESS_NO_PORT` (IPv4 and IPv6), which socket2 does not wrap.
fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid fd, and a pointer to a c_int with its length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

const CONNECT_TIMEOUT: Duration = crate::hbone::CONNECT_TIMEOUT;

/// TCP_NODELAY and keepalive (180 s idle, 180 s interval, 9 probes) on an accepted or connected socket.
pub fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    set_keepalive(stream, None, None, None)
}

/// [`tune`]'s options set once on a listener: Linux copies them (TCP_NODELAY, SO_KEEPALIVE and
/// the keepalive timings) to every connection it accepts, which then needs no `tune` of its own
/// (five `setsockopt`s per accepted connection).
pub fn tune_listener(listener: &TcpListener) -> io::Result<()> {
    let sock = SockRef::from(listener);
    sock.set_tcp_nodelay(true)?;
    sock.set_tcp_keepalive(&keepalive(None, None, None))
}

fn keepalive(
    time: Option<Duration>,
    interval: Option<Duration>,
    probes: Option<u32>,
) -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(time.unwrap_or(KEEPALIVE_TIME))
        .with_interval(interval.unwrap_or(KEEPALIVE_INTERVAL))
        .with_retries(probes.unwrap_or(KEEPALIVE_PROBES))
}

const KEEPALIVE_TIME: Duration = Duration::from_secs(180);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(180);
const KEEPALIVE_PROBES: u32 = 9;

/// SO_KEEPALIVE with these settings (idle time before the first probe, interval between
/// probes, probes before the connection is dropped), each `None` taking `tune`'s.
pub fn set_keepalive(
    stream: &TcpStream,
    time: Option<Duration>,
    interval: Option<Duration>,
    probes: Option<u32>,
) -> io::Result<()> {
    SockRef::from(stream).set_tcp_keepalive(&keepalive(time, interval, probes))
}

/// The destination a connection had before netfilter redirected it (`SO_ORIGINAL_DST`).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_ORIGINAL_DST returned no address",
        )
    })
}

thread_local! {
    /// The namespace this thread started in, to return to after each switch.
    static HOME_NETNS: io::Result<OwnedFd> = File::open("/proc/thread-self/ns/net").map(OwnedFd::from);
}

fn with_netns<T>(target: i32, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    HOME_NETNS.with(|home| {
        let home = home
            .as_ref()
            .map_err(|e| io::Error::new(e.kind(), format!("opening own netns: {e}")))?;
        setns(target)?;
        let result = f();
        if let Err(e) = setns(home.as_raw_fd()) {
            // A runtime thread left in a pod's namespace would make every later socket there:
            // nothing sane can continue.
            eprintln!("fatal: cannot return to own network namespace: {e}");
            std::process::abort();
        }
        result
    })
}

fn setns(fd: i32) -> io::Result<()> {
    // SAFETY: setns only reads the fd; CLONE_NEWNET affects just the calling thread.
    let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_settings_reach_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        tune(&stream).unwrap();
        let sock = SockRef::from(&stream);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_TIME);
        set_keepalive(&stream, Some(Duration::from_secs(20)), None, Some(3)).unwrap();
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(20));
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 3);
    }

    /// What `tune_listener` relies on: accepted connections inherit the listener's options.
    #[tokio::test]
    async fn accepted_connections_inherit_a_tuned_listeners_options() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        tune_listener(&listener).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let sock = SockRef::from(&accepted);
        assert!(accepted.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_TIME);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
    }
}
