//! Source-address preservation: ztunnel delivers an inbound connection to the application from
//! the client's address, not the pod's own, as Istio does. The delivering socket is
//! `IP_TRANSPARENT` + `IP_FREEBIND`, bound to the client's IP, marked
//! [`DELIVERY_MARK`](mesh::socket::DELIVERY_MARK) and bound to the device `lo`
//! ([`mesh::socket::SocketFactory::transparent_socket`]). Inside the pod's network namespace,
//! set up at enrollment:
//!
//! - `net.ipv4.tcp_fwmark_accept=1`: the application's accepted socket takes the mark of the
//!   SYN, so everything it sends on that connection carries it (IPv4 and IPv6);
//! - the rule `fwmark 0x111 lookup 273 pref 32764` and the route `local default dev lo table 273`
//!   (for IPv6 too when the pod has an IPv6 address), made over netlink ([`crate::netlink`]):
//!   the application's replies to the client's address are delivered locally, to ztunnel's
//!   transparent socket, instead of being routed out to the client.
//!
//! Setting up and removing are blocking (netlink, /proc/sys, brief `setns` of the calling
//! thread): the node agent calls them on blocking threads, never on the runtime's workers.
//!
//! Capture must leave this traffic alone. eBPF: `connect4` passes connects to the pod's own IP;
//! `sk_lookup` passes SYNs that arrive on loopback, which the device binding makes the delivery
//! SYN do (without it the kernel reports the pod's `eth0`); the replies find ztunnel's socket
//! in the established table, where `sk_lookup` is not consulted. nftables: the output chain
//! returns on the mark, and replies belong to a conntrack entry. When the setup fails, the pod
//! is enrolled all the same and the application sees the pod's address.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use mesh::socket::{DELIVERY_MARK, SocketFactory};
use tokio::net::TcpStream;
use tracing::warn;

use crate::netlink::{Family, FwmarkRule, Route};

/// The pod-local routing table for the replies (0x111, as the mark).
pub const ROUTE_TABLE: u32 = 273;
/// Before the main table (32766), after the local one (0).
pub const RULE_PRIORITY: u32 = 32764;

const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
/// Replies the kernel makes itself (a reset for a closed port, ICMP errors) take the mark of
/// the packet they answer, so a delivery to a port nobody listens on is refused over `lo` at
/// once instead of the reset leaving by the pod's default route and the client waiting 10 s.
const FWMARK_REFLECT: [&str; 2] = [
    "/proc/sys/net/ipv4/fwmark_reflect",
    "/proc/sys/net/ipv6/fwmark_reflect",
];

/// The routing set up in one pod for delivery from the client's address.
#[derive(Debug)]
pub struct PodRouting {
    netns: PathBuf,
    ipv6: bool,
    /// `tcp_fwmark_accept` before we set it, when it was not already 1: restored on removal.
    fwmark_accept_before: Option<String>,
    /// The `fwmark_reflect` sysctls we changed (path, value before), restored on removal.
    reflect_before: Vec<(&'static str, String)>,
}

impl PodRouting {
    /// Set up the pod at `netns` (with its IPv6 rule and route too when `ipv6`). Idempotent, so
    /// a restarted ztunnel can run it again over what the previous one left.
    pub fn setup(netns: &Path, sockets: &SocketFactory, ipv6: bool) -> Result<PodRouting, String> {
        // The delivering socket's options need CAP_NET_ADMIN: find out once, here, rather than
        // on every connection. Bound but never connected, so it takes no port.
        let probe_src = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let probe_dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9);
        sockets
            .transparent_socket(probe_src, &probe_dst, DELIVERY_MARK, 0)
            .map_err(|e| format!("making a transparent socket in the pod: {e}"))?;
        let before = sockets
            .run_in(|| std::fs::read_to_string(FWMARK_ACCEPT))
            .map_err(|e| format!("reading {FWMARK_ACCEPT} in the pod: {e}"))?;
        let before = before.trim().to_string();
        if before != "1" {
            sockets
                .run_in(|| std::fs::write(FWMARK_ACCEPT, "1"))
                .map_err(|e| format!("setting {FWMARK_ACCEPT} in the pod: {e}"))?;
        }
        let mut routing = PodRouting {
            netns: netns.to_path_buf(),
            ipv6,
            fwmark_accept_before: (before != "1").then_some(before),
            reflect_before: vec![],
        };
        for path in FWMARK_REFLECT.iter().take(if ipv6 { 2 } else { 1 }) {
            let set = sockets.run_in(|| {
                let before = std::fs::read_to_string(path)?.trim().to_string();
                if before != "1" {
                    std::fs::write(path, "1")?;
                }
                Ok(before)
            });
            match set {
                Ok(before) if before != "1" => routing.reflect_before.push((path, before)),
                Ok(_) => {}
                Err(e) => {
                    let _ = routing.remove();
                    return Err(format!("setting {path} in the pod: {e}"));
                }
            }
        }
        let result = sockets
            .run_in(|| Ok(Route::open()))
            .map_err(|e| format!("entering the pod's network namespace: {e}"))
            .and_then(|r| r.map_err(|e| format!("in the pod: {e}")))
            .and_then(|mut route| {
                let lo = sockets
                    .run_in(loopback_index)
                    .map_err(|e| format!("finding `lo` in the pod: {e}"))?;
                routing.families().try_for_each(|family| {
                    route.ensure_rule(&rule(family))?;
                    route.replace_local_default(family, lo, ROUTE_TABLE)
                })
            });
        if let Err(e) = result {
            let _ = routing.remove();
            return Err(e);
        }
        Ok(routing)
    }

    /// Whether a connection from `client` to `target` can be delivered from `client`.
    pub fn covers(&self, client: IpAddr, target: &SocketAddr) -> bool {
        let usable = !client.is_loopback() && !client.is_unspecified() && !client.is_multicast();
        usable && client.is_ipv4() == target.is_ipv4() && (client.is_ipv4() || self.ipv6)
    }

    /// Undo [`Self::setup`]. Errors are reported, not fatal: the pod may be gone already.
    /// Blocking (netlink and /proc/sys in the pod): call it off the async threads.
    pub fn remove(&self) -> Result<(), String> {
        let mut errors = vec![];
        match SocketFactory::open_netns(&self.netns, None) {
            Err(e) => errors.push(format!("opening the pod's network namespace: {e}")),
            Ok(sockets) => {
                match sockets.run_in(|| Ok(Route::open())) {
                    Err(e) => errors.push(format!("entering the pod's network namespace: {e}")),
                    Ok(Err(e)) => errors.push(format!("in the pod: {e}")),
                    Ok(Ok(mut route)) => {
                        for family in self.families() {
                            if let Err(e) = route.delete_rule(&rule(family)) {
                                errors.push(e);
                            }
                            if let Err(e) = route.flush_defaults(family, ROUTE_TABLE) {
                                errors.push(e);
                            }
                        }
                    }
                }
                let sysctls = self
                    .fwmark_accept_before
                    .iter()
                    .map(|before| (FWMARK_ACCEPT, before))
                    .chain(
                        self.reflect_before
                            .iter()
                            .map(|(path, before)| (*path, before)),
                    );
                for (path, before) in sysctls {
                    if let Err(e) = sockets.run_in(|| std::fs::write(path, before)) {
                        errors.push(format!("restoring {path}: {e}"));
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn families(&self) -> impl Iterator<Item = Family> {
        [Family::V4, Family::V6]
            .into_iter()
            .take(if self.ipv6 { 2 } else { 1 })
    }
}

/// Our rule for `family`: the delivery mark looks up the reply table.
fn rule(family: Family) -> FwmarkRule {
    FwmarkRule {
        family,
        mark: DELIVERY_MARK,
        table: ROUTE_TABLE,
        priority: RULE_PRIORITY,
    }
}

/// The index of `lo` in the current thread's network namespace.
fn loopback_index() -> io::Result<u32> {
    // SAFETY: a NUL-terminated name; if_nametoindex only reads it.
    match unsafe { libc::if_nametoindex(c"lo".as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

/// The plaintext clients connected to a pod right now, by address and port. They reach the
/// application's port from their own address, so a delivery from that address must not use one
/// of their ports: its packets would be taken for theirs (the kernel, picking a port for the
/// delivery, cannot see that clash, as the client's connection is the other way round).
#[derive(Debug, Default)]
pub struct LiveClients(Mutex<HashSet<SocketAddr>>);

/// Held while a plaintext client is connected; removes it when dropped.
pub struct LiveClient {
    set: Arc<LiveClients>,
    client: SocketAddr,
}

impl LiveClients {
    pub fn enter(self: &Arc<Self>, client: SocketAddr) -> LiveClient {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(client);
        LiveClient {
            set: self.clone(),
            client,
        }
    }

    fn taken(&self, client: IpAddr, port: u16) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&SocketAddr::new(client, port))
    }
}

impl Drop for LiveClient {
    fn drop(&mut self) {
        self.set
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.client);
    }
}

/// Ports tried for a delivery from a plaintext client's address (Linux's default ephemeral
/// range), and how many draws before leaving the choice to the kernel.
const DELIVERY_PORTS: std::ops::Range<u16> = 32768..61000;
const DELIVERY_PORT_DRAWS: usize = 16;

/// A port from `draw` that `taken` does not hold, within a few draws.
fn pick_port(taken: impl Fn(u16) -> bool, mut draw: impl FnMut() -> u16) -> Option<u16> {
    (0..DELIVERY_PORT_DRAWS)
        .map(|_| draw())
        .find(|p| !taken(*p))
}

/// Connect to the application at `target` from `client` when `routing` covers it, else (or
/// when the transparent socket cannot be made) from the pod's own address. With `live` (a
/// plaintext client), the delivery's port is one no live client of that address holds.
pub async fn connect_app(
    sockets: &SocketFactory,
    routing: Option<&PodRouting>,
    client: IpAddr,
    target: SocketAddr,
    live: Option<&LiveClients>,
) -> io::Result<TcpStream> {
    if let Some(routing) = routing.filter(|r| r.covers(client, &target)) {
        let mut socket = Err(io::Error::other("no port"));
        if let Some(live) = live {
            for _ in 0..DELIVERY_PORT_DRAWS {
                let Some(port) =
                    pick_port(|p| live.taken(client, p), || fastrand::u16(DELIVERY_PORTS))
                else {
                    break;
                };
                // In use by another delivery from the same client: draw again.
                socket = sockets.transparent_socket(client, &target, DELIVERY_MARK, port);
                if !matches!(&socket, Err(e) if e.kind() == io::ErrorKind::AddrInUse) {
                    break;
                }
            }
        }
        if socket.is_err() {
            socket = sockets.transparent_socket(client, &target, DELIVERY_MARK, 0);
        }
        match socket {
            Ok(socket) => return mesh::socket::connect_socket(socket, target).await,
            Err(e) => warn!(
                %client,
                %target,
                netns = %routing.netns.display(),
                "cannot deliver from the client's address, using the pod's: {e}"
            ),
        }
    }
    sockets.connect(target).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ports_avoid_live_clients() {
        let live = Arc::new(LiveClients::default());
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let guard = live.enter(SocketAddr::new(client, 40000));
        let mut draws = [40000u16, 40000, 40001].into_iter();
        let port = pick_port(|p| live.taken(client, p), || draws.next().unwrap_or(0));
        assert_eq!(port, Some(40001));
        // Another address's client does not hold the port; a departed client neither.
        assert!(!live.taken("192.0.2.8".parse().unwrap(), 40000));
        drop(guard);
        assert!(!live.taken(client, 40000));
        assert_eq!(pick_port(|_| true, || 40000), None);
    }

    /// Against the kernel (needs root): in a namespace of the test's own whose `lo` is down,
    /// the IPv6 route is refused; the error says why and nothing is left half set up.
    #[test]
    fn a_failed_setup_names_the_cause_and_undoes_itself() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root for a network namespace");
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare affects this thread only (CLONE_NEWNET), which ends with the test.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let netns = Path::new("/proc/thread-self/ns/net");
            let sockets = SocketFactory::open_netns(netns, None).unwrap();
            let e = PodRouting::setup(netns, &sockets, true).unwrap_err();
            assert!(
                e.contains("IPv6 route") && e.contains("`lo` is down"),
                "{e}"
            );
            for path in [FWMARK_ACCEPT, FWMARK_REFLECT[0], FWMARK_REFLECT[1]] {
                let value = std::fs::read_to_string(path).unwrap();
                assert_eq!(value.trim(), "0", "{path} put back");
            }
            let mut route = Route::open().unwrap();
            for family in [Family::V4, Family::V6] {
                let left = route.exchange(crate::netlink::rule_message(&rule(family), false));
                assert!(left.is_err(), "{family} rule removed");
            }
            let left = route.exchange(crate::netlink::delete_default_route(
                Family::V4,
                ROUTE_TABLE,
            ));
            assert!(left.is_err(), "IPv4 route removed");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn covers_same_family_real_clients_only() {
        let r = PodRouting {
            netns: PathBuf::from("/nonexistent"),
            ipv6: false,
            fwmark_accept_before: None,
            reflect_before: vec![],
        };
        let v4: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let v6: SocketAddr = "[fd00::2]:8080".parse().unwrap();
        assert!(r.covers("10.0.1.5".parse().unwrap(), &v4));
        assert!(!r.covers("127.0.0.1".parse().unwrap(), &v4));
        assert!(!r.covers("0.0.0.0".parse().unwrap(), &v4));
        assert!(!r.covers("fd00::5".parse().unwrap(), &v4));
        assert!(
            !r.covers("fd00::5".parse().unwrap(), &v6),
            "no IPv6 routing"
        );
        let r6 = PodRouting { ipv6: true, ..r };
        assert!(r6.covers("fd00::5".parse().unwrap(), &v6));
    }
}
