//! Handing a pod over from a running ztunnel to its successor without resetting a connection
//! (a DaemonSet rolling update with `maxSurge: 1`: the new ztunnel starts beside the old one).
//!
//! Both instances bind the pod's listeners (15001, 15006, 15008, 15053) with `SO_REUSEPORT`
//! ([`mesh::socket::SocketFactory::listen`]), so they form one reuseport group in the pod and
//! share new connections while both run. On SIGTERM the old one closes its listeners at once
//! and serves what it has accepted until it ends or `--drain-timeout` passes. What was still
//! queued on a closing listener (handshake done, not yet accepted, or `SYN_RECV`) would be
//! reset by the kernel; with `net.ipv4.tcp_migrate_req=1` in the pod's namespace (a per-netns
//! sysctl since Linux 5.14) it moves to the other listener of the group instead, the
//! successor's. That sysctl is set here at enrollment.
//!
//! With eBPF capture, only the newest instance (the owner of the pinned state, see
//! [`crate::redirect::ebpf`]) sweeps capture state of pods it does not know and replaces
//! entries of the inbound sockmap (an older one adds its 15006 listener only where there is
//! no entry): an old instance whose view of the mesh lags must not remove what its successor
//! set up, nor leave in the sockmap, in place of the successor's, a listener it is about to
//! close.
//! Neither instance re-asserts entries: each writes a pod's capture once, at enrollment. The
//! fwmark rule of source preservation is added if missing, never deleted to be re-added (the old
//! instance's deliveries need it at every moment). A reconcile pass sweeps nothing before the
//! first complete view of the mesh (with pilot, an empty one at first).

use mesh::socket::SocketFactory;

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// `tcp_migrate_req` in one pod, as enrollment found it.
#[derive(Debug)]
pub struct ListenerMigration {
    /// The value before we set it, when it was not 1: put back when the pod leaves the mesh.
    before: Option<String>,
}

impl ListenerMigration {
    /// Set `net.ipv4.tcp_migrate_req=1` in the namespace of `sockets`. Blocking (`/proc/sys` from
    /// a thread inside the pod's namespace). An error (a kernel before 5.14, a read-only
    /// `/proc/sys`) is for the caller to log: the pod is served all the same, and an upgrade
    /// then resets the connections queued on the old instance's listeners.
    pub fn enable(sockets: &SocketFactory) -> Result<ListenerMigration, String> {
        let before = sockets
            .run_in(|| std::fs::read_to_string(MIGRATE_REQ))
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    format!("{MIGRATE_REQ} does not exist (per network namespace since Linux 5.14)")
                } else {
                    format!("reading {MIGRATE_REQ} in the pod: {e}")
                }
            })?;
        let before = before.trim().to_string();
        if before == "1" {
            return Ok(ListenerMigration { before: None });
        }
        sockets
            .run_in(|| std::fs::write(MIGRATE_REQ, "1"))
            .map_err(|e| format!("setting {MIGRATE_REQ} in the pod: {e}"))?;
        Ok(ListenerMigration {
            before: Some(before),
        })
    }

    /// Put the value found at enrollment back (once the pod's listeners are closed). Blocking.
    pub fn restore(&self, sockets: &SocketFactory) -> Result<(), String> {
        match &self.before {
            None => Ok(()),
            Some(before) => sockets
                .run_in(|| std::fs::write(MIGRATE_REQ, before))
                .map_err(|e| format!("restoring {MIGRATE_REQ} in the pod: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::path::Path;

    /// Two SO_REUSEPORT listeners on one address, in this thread's namespace.
    fn group(addr: SocketAddr) -> (TcpListener, TcpListener) {
        let one = || {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&addr.into()).unwrap();
            s.listen(128).unwrap();
            TcpListener::from(s)
        };
        (one(), one())
    }

    /// Connect `n` clients, close the first listener without accepting anything, then accept
    /// on the second: how many clients can still talk (the others were reset).
    fn survivors_of_a_closed_listener(addr: SocketAddr, n: usize) -> usize {
        let (old, new) = group(addr);
        // Distinct source ports hash over both listeners: some land on `old`.
        let clients: Vec<TcpStream> = (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect();
        drop(old);
        new.set_nonblocking(true).unwrap();
        let mut accepted = vec![];
        while let Ok((s, _)) = new.accept() {
            accepted.push(s);
        }
        for s in &accepted {
            s.set_nonblocking(false).unwrap();
            let mut s = s;
            let _ = s.write_all(b"x");
        }
        clients
            .into_iter()
            .filter(|c| {
                c.set_read_timeout(Some(std::time::Duration::from_millis(500)))
                    .unwrap();
                let mut buf = [0u8; 1];
                matches!((&*c).read(&mut buf), Ok(1))
            })
            .count()
    }

    /// Against the kernel (needs root): with the sysctl, connections queued on a closed
    /// listener of a reuseport group are accepted by its sibling; without it some are reset,
    /// which is the case the upgrade avoids.
    #[test]
    fn queued_connections_move_to_the_sibling_listener() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root for a network namespace");
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare affects this thread only (CLONE_NEWNET), which ends with the test.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let lo = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap();
            assert!(lo.success(), "ip link set lo up");
            let netns = Path::new("/proc/thread-self/ns/net");
            let sockets = SocketFactory::open_netns(netns, None).unwrap();
            const N: usize = 64;
            let read = || std::fs::read_to_string(MIGRATE_REQ).unwrap();
            assert_eq!(read().trim(), "0", "a fresh namespace starts without it");
            let reset = N - survivors_of_a_closed_listener("127.0.0.1:15001".parse().unwrap(), N);
            assert!(
                reset > 0,
                "without the sysctl some queued clients are reset"
            );

            let migration = ListenerMigration::enable(&sockets).unwrap();
            assert_eq!(read().trim(), "1");
            let kept = survivors_of_a_closed_listener("127.0.0.1:15002".parse().unwrap(), N);
            assert_eq!(kept, N, "every queued client moved to the sibling listener");
            // Enabling again (a successor) records nothing to put back; the first restores.
            let again = ListenerMigration::enable(&sockets).unwrap();
            again.restore(&sockets).unwrap();
            assert_eq!(read().trim(), "1");
            migration.restore(&sockets).unwrap();
            assert_eq!(read().trim(), "0");
            eprintln!("{reset} of {N} queued clients reset without the sysctl, none with it");
        })
        .join()
        .unwrap();
    }
}
