//! Refusing connections aimed at ztunnel's own listeners. A captured connection whose original
//! destination is one of the proxy's ports would otherwise be forwarded to that port, captured
//! again, and forwarded again: one application connection to `127.0.0.1:15001` used to open
//! thousands of sockets in a second. Such a connection is refused before any socket is made.

use std::net::{IpAddr, SocketAddr};

use mesh::hbone::PROXY_PORTS;

/// Where a captured connection was accepted and where it says it was going.
#[derive(Debug, Clone, Copy)]
pub struct Accepted<'a> {
    /// The original destination the capture reported.
    pub dst: SocketAddr,
    /// The local address of the accepted socket (the proxy's listener).
    pub listener: SocketAddr,
    /// The pod's own addresses.
    pub pod_addresses: &'a [IpAddr],
}

/// Why the connection must be refused, or `None` when it may go on. `node_local` says whether
/// an address belongs to ztunnel's own network namespace (where its admin ports listen), and
/// `admin` lists those listeners.
pub fn refusal(
    a: Accepted<'_>,
    admin: &[SocketAddr],
    node_local: impl Fn(IpAddr) -> bool,
) -> Option<String> {
    let dst = canonical(a.dst);
    if dst == canonical(a.listener) {
        return Some(format!(
            "{dst} is the proxy's own listener (the connection was not redirected)"
        ));
    }
    let ip = dst.ip();
    let in_pod = ip.is_loopback() || ip.is_unspecified() || a.pod_addresses.contains(&ip);
    if in_pod && PROXY_PORTS.contains(&dst.port()) {
        return Some(format!("{dst} is one of the proxy's ports in this pod"));
    }
    if admin.iter().any(|l| l.port() == dst.port())
        && (admin.iter().any(|l| canonical(*l).ip() == ip) || node_local(ip))
    {
        return Some(format!("{dst} is the node proxy's admin listener"));
    }
    None
}

/// Whether `ip` is an address of the calling thread's network namespace: binding to it only
/// succeeds there. A single non-blocking syscall, done only for the admin ports.
pub fn is_local_address(ip: IpAddr) -> bool {
    if ip.is_unspecified() {
        return false;
    }
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(dst: &str, listener: &str) -> Option<String> {
        let pod: [IpAddr; 2] = ["10.0.1.5".parse().unwrap(), "fd00::1:5".parse().unwrap()];
        let admin: [SocketAddr; 2] = [
            "127.0.0.1:15000".parse().unwrap(),
            "0.0.0.0:15020".parse().unwrap(),
        ];
        refusal(
            Accepted {
                dst: dst.parse().unwrap(),
                listener: listener.parse().unwrap(),
                pod_addresses: &pod,
            },
            &admin,
            |ip| ip == "10.0.0.1".parse::<IpAddr>().unwrap(),
        )
    }

    #[test]
    fn own_listeners_are_refused() {
        let l = "127.0.0.1:15001";
        assert!(check("127.0.0.1:15001", l).is_some());
        assert!(check("127.0.0.1:15006", l).is_some());
        assert!(check("10.0.1.5:15006", l).is_some());
        assert!(check("10.0.1.5:15008", l).is_some());
        assert!(check("10.0.1.5:15053", l).is_some());
        assert!(check("[fd00::1:5]:15001", "[::1]:15001").is_some());
        assert!(check("[::ffff:127.0.0.1]:15001", l).is_some());
        // Not redirected at all: the destination is the listener itself, whatever the port.
        assert!(check("10.0.1.5:15006", "10.0.1.5:15006").is_some());
        // The node's admin listeners, on an address of ztunnel's namespace.
        assert!(check("10.0.0.1:15020", l).is_some());
        assert!(check("127.0.0.1:15000", l).is_some());
    }

    #[test]
    fn other_destinations_pass() {
        let l = "127.0.0.1:15001";
        assert!(check("10.0.1.6:8080", l).is_none());
        // Another pod's 15008 is its HBONE port: the tunnel there refuses its own ports.
        assert!(check("10.0.2.9:15008", l).is_none());
        // An admin port on an address that is not the node's.
        assert!(check("192.0.2.1:15020", l).is_none());
        assert!(check("10.0.1.5:8080", l).is_none());
    }
}
