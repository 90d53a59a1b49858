//! The policy routing of source preservation ([`crate::source`]) over NETLINK_ROUTE, in place of
//! `nsenter ip rule/route` processes: one fwmark rule and one `local` default route per address
//! family, added, replaced and deleted with one request each.
//!
//! Messages come from `netlink-packet-route` (the rust-netlink project's packet types, which
//! `rtnetlink` is built on); the socket is `netlink-sys`'s blocking one. The async `rtnetlink`
//! crate is not used: its connection must run as a task, and a netlink socket belongs to the
//! namespace it was opened in, so opening it means a `setns` of the opening thread. Here the
//! socket is opened by a brief switch of the current (blocking, never a runtime worker) thread
//! into the pod's namespace, and the few request/acknowledgement exchanges then run on that
//! thread: no task, no runtime, no process.

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleHeader, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// IPv4 or IPv6: each has its own rules and routing tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn address_family(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }

    /// The kernel option the family's policy routing needs, for error messages.
    fn policy_routing_option(self) -> &'static str {
        match self {
            Family::V4 => "CONFIG_IP_MULTIPLE_TABLES",
            Family::V6 => "CONFIG_IPV6_MULTIPLE_TABLES",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// `fwmark <mark> lookup <table> pref <priority>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FwmarkRule {
    pub family: Family,
    pub mark: u32,
    pub table: u32,
    pub priority: u32,
}

/// The table field of a header holds 8 bits; larger ids go in the table attribute alone.
fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
}

/// RTM_NEWRULE (fails with EEXIST when the rule is there) or RTM_DELRULE for `rule`.
pub fn rule_message(rule: &FwmarkRule, add: bool) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut msg = RuleMessage::default();
    msg.header = RuleHeader {
        family: rule.family.address_family(),
        table: header_table(rule.table),
        action: RuleAction::ToTable,
        ..Default::default()
    };
    msg.attributes = vec![
        RuleAttribute::FwMark(rule.mark),
        RuleAttribute::Table(rule.table),
        RuleAttribute::Priority(rule.priority),
    ];
    if add {
        request(RouteNetlinkMessage::NewRule(msg), NLM_F_CREATE | NLM_F_EXCL)
    } else {
        request(RouteNetlinkMessage::DelRule(msg), 0)
    }
}

/// `local default dev <oif> table <table>` added or replaced, as `ip route replace` does.
pub fn local_default_route(
    family: Family,
    oif: u32,
    table: u32,
) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut msg = RouteMessage::default();
    msg.header = RouteHeader {
        address_family: family.address_family(),
        table: header_table(table),
        protocol: RouteProtocol::Boot,
        scope: RouteScope::Host,
        kind: RouteType::Local,
        ..Default::default()
    };
    msg.attributes = vec![RouteAttribute::Table(table), RouteAttribute::Oif(oif)];
    request(
        RouteNetlinkMessage::NewRoute(msg),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
}

/// Deletes one default route (of any type, scope and device) from `table`.
pub fn delete_default_route(family: Family, table: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut msg = RouteMessage::default();
    msg.header = RouteHeader {
        address_family: family.address_family(),
        table: header_table(table),
        // "Any scope" for a deletion.
        scope: RouteScope::NoWhere,
        ..Default::default()
    };
    msg.attributes = vec![RouteAttribute::Table(table)];
    request(RouteNetlinkMessage::DelRoute(msg), 0)
}

fn request(inner: RouteNetlinkMessage, flags: u16) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(inner));
    msg.finalize();
    msg
}

/// A NETLINK_ROUTE socket in the namespace of the thread that opened it.
pub struct Route {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Route {
    /// Open a socket in the current thread's network namespace; it stays there afterwards.
    pub fn open() -> io::Result<Route> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("opening a NETLINK_ROUTE socket (kernel without CONFIG_NETLINK / rtnetlink?): {e}"),
            )
        })?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Route {
            socket,
            seq: 0,
            buf: Vec::with_capacity(8192),
        })
    }

    /// Send `msg` and wait for the kernel's acknowledgement; a refusal is its errno.
    pub fn exchange(&mut self, mut msg: NetlinkMessage<RouteNetlinkMessage>) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        msg.header.sequence_number = self.seq;
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);
        self.socket.send(&out, 0)?;
        loop {
            self.buf.clear();
            let n = self.socket.recv(&mut self.buf, 0)?;
            let mut at = 0;
            while at < n {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[at..n])
                    .map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("netlink reply: {e}"))
                    })?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number == self.seq
                    && let NetlinkPayload::Error(e) = &reply.payload
                {
                    return match e.code {
                        None => Ok(()),
                        Some(_) => Err(e.to_io()),
                    };
                }
                if len == 0 {
                    break;
                }
                at += len;
            }
        }
    }

    /// Add `rule` unless it is there already. Never deleted first: a ztunnel still serving the
    /// pod (the predecessor during an upgrade, or connections of a previous run) relies on it
    /// at every moment, and a reply that missed it would leave the pod and have the client's
    /// host reset the application's connection. Copies left by older versions (which added
    /// without `NLM_F_EXCL`) are identical, so harmless; [`Self::delete_rule`] removes them all.
    pub fn ensure_rule(&mut self, rule: &FwmarkRule) -> Result<(), String> {
        match self.exchange(rule_message(rule, true)) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(explain(
                e,
                rule.family,
                &format!("adding the {} rule {}", rule.family, describe(rule)),
            )),
        }
    }

    /// Delete every copy of `rule`; none there is no error.
    pub fn delete_rule(&mut self, rule: &FwmarkRule) -> Result<(), String> {
        for _ in 0..16 {
            match self.exchange(rule_message(rule, false)) {
                Ok(()) => continue,
                Err(e) if gone(&e) => return Ok(()),
                Err(e) => {
                    return Err(explain(
                        e,
                        rule.family,
                        &format!("deleting the {} rule {}", rule.family, describe(rule)),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `ip route replace local default dev <oif> table <table>`.
    pub fn replace_local_default(
        &mut self,
        family: Family,
        oif: u32,
        table: u32,
    ) -> Result<(), String> {
        self.exchange(local_default_route(family, oif, table))
            .map_err(|e| {
                explain(
                    e,
                    family,
                    &format!("adding the {family} route local default dev lo table {table}"),
                )
            })
    }

    /// Delete every default route in `table` (the only routes it holds).
    pub fn flush_defaults(&mut self, family: Family, table: u32) -> Result<(), String> {
        for _ in 0..16 {
            match self.exchange(delete_default_route(family, table)) {
                Ok(()) => continue,
                Err(e) if gone(&e) => return Ok(()),
                Err(e) => {
                    return Err(explain(
                        e,
                        family,
                        &format!("deleting the {family} routes of table {table}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn describe(rule: &FwmarkRule) -> String {
    format!(
        "fwmark {:#x} lookup {} pref {}",
        rule.mark, rule.table, rule.priority
    )
}

/// What a deletion of something absent answers.
fn gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}

/// Name what is missing when the kernel refuses: a capability or a kernel feature.
fn explain(e: io::Error, family: Family, what: &str) -> String {
    let hint = match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => {
            " (needs CAP_NET_ADMIN over the pod's network namespace)".to_string()
        }
        Some(libc::EAFNOSUPPORT | libc::EOPNOTSUPP) => format!(
            " (kernel without {family} policy routing: {}{})",
            family.policy_routing_option(),
            if family == Family::V6 {
                ", or IPv6 disabled"
            } else {
                ""
            }
        ),
        Some(libc::ENETDOWN) => " (`lo` is down in the pod)".to_string(),
        _ => String::new(),
    };
    format!("{what} over netlink: {e}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(msg: &NetlinkMessage<RouteNetlinkMessage>) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        assert_eq!(buf.len(), msg.header.length as usize, "finalized length");
        NetlinkMessage::deserialize(&buf).unwrap()
    }

    const RULE: FwmarkRule = FwmarkRule {
        family: Family::V6,
        mark: 0x111,
        table: 273,
        priority: 32764,
    };

    #[test]
    fn rule_add_is_exclusive_and_names_mark_table_priority() {
        let msg = roundtrip(&rule_message(&RULE, true));
        assert_eq!(
            msg.header.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRule(rule)) = msg.payload else {
            panic!("not RTM_NEWRULE: {msg:?}");
        };
        assert_eq!(rule.header.family, AddressFamily::Inet6);
        assert_eq!(rule.header.action, RuleAction::ToTable);
        // 273 does not fit the 8-bit header field: only the attribute carries it.
        assert_eq!(rule.header.table, 0);
        for a in [
            RuleAttribute::FwMark(0x111),
            RuleAttribute::Table(273),
            RuleAttribute::Priority(32764),
        ] {
            assert!(
                rule.attributes.contains(&a),
                "{a:?} in {:?}",
                rule.attributes
            );
        }
        assert!(
            !rule
                .attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::FwMask(_))),
            "the kernel's default mask (all bits), as `ip rule` sends it"
        );
    }

    #[test]
    fn rule_delete_matches_the_same_rule() {
        let v4 = FwmarkRule {
            family: Family::V4,
            ..RULE
        };
        let msg = roundtrip(&rule_message(&v4, false));
        assert_eq!(msg.header.flags, NLM_F_REQUEST | NLM_F_ACK);
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRule(rule)) = msg.payload else {
            panic!("not RTM_DELRULE: {msg:?}");
        };
        assert_eq!(rule.header.family, AddressFamily::Inet);
        assert!(rule.attributes.contains(&RuleAttribute::FwMark(0x111)));
        assert!(rule.attributes.contains(&RuleAttribute::Priority(32764)));
    }

    #[test]
    fn local_default_route_is_host_scoped_and_replaces() {
        let msg = roundtrip(&local_default_route(Family::V4, 1, 273));
        assert_eq!(
            msg.header.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) = msg.payload else {
            panic!("not RTM_NEWROUTE: {msg:?}");
        };
        assert_eq!(route.header.kind, RouteType::Local);
        assert_eq!(route.header.scope, RouteScope::Host);
        assert_eq!(route.header.destination_prefix_length, 0, "default");
        assert!(route.attributes.contains(&RouteAttribute::Table(273)));
        assert!(route.attributes.contains(&RouteAttribute::Oif(1)));
        // A table that fits the header goes there too.
        let small = roundtrip(&local_default_route(Family::V6, 1, 100));
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) = small.payload
        else {
            panic!();
        };
        assert_eq!(route.header.table, 100);
        assert_eq!(route.header.address_family, AddressFamily::Inet6);
    }

    #[test]
    fn route_delete_matches_any_default_in_the_table() {
        let msg = roundtrip(&delete_default_route(Family::V4, 273));
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(route)) = msg.payload else {
            panic!("not RTM_DELROUTE: {msg:?}");
        };
        assert_eq!(route.header.scope, RouteScope::NoWhere);
        assert_eq!(route.header.kind, RouteType::Unspec);
        assert_eq!(route.attributes, vec![RouteAttribute::Table(273)]);
    }

    /// Against the kernel, in a network namespace of the test's own (needs root).
    #[test]
    fn rules_and_routes_in_a_fresh_namespace() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root for a network namespace");
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare affects this thread only (CLONE_NEWNET), which ends with the test.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            set_loopback_up();
            let mut route = Route::open().unwrap();
            for family in [Family::V4, Family::V6] {
                let rule = FwmarkRule { family, ..RULE };
                // Added once; ensuring again keeps it (never deleted in between).
                route.ensure_rule(&rule).unwrap();
                route.ensure_rule(&rule).unwrap();
                let again = route.exchange(rule_message(&rule, true)).unwrap_err();
                assert_eq!(again.raw_os_error(), Some(libc::EEXIST), "{again}");
                route.exchange(rule_message(&rule, false)).unwrap();
                let gone_now = route.exchange(rule_message(&rule, false)).unwrap_err();
                assert!(gone(&gone_now), "one copy after ensuring twice: {gone_now}");
                // Two copies, as an older version could leave: deleting removes both.
                route.exchange(rule_message(&rule, true)).unwrap();
                let mut dup = rule_message(&rule, true);
                dup.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE;
                route.exchange(dup).unwrap();
                route.ensure_rule(&rule).unwrap();
                route.delete_rule(&rule).unwrap();
                let none = route.exchange(rule_message(&rule, false)).unwrap_err();
                assert!(gone(&none), "{none}");

                route.replace_local_default(family, 1, 273).unwrap();
                route.replace_local_default(family, 1, 273).unwrap();
                route.flush_defaults(family, 273).unwrap();
                let none = route
                    .exchange(delete_default_route(family, 273))
                    .unwrap_err();
                assert!(gone(&none), "{none}");
            }
            // An unknown device: the kernel's refusal is passed on, naming the request.
            let e = route
                .replace_local_default(Family::V4, 9999, 273)
                .unwrap_err();
            assert!(e.contains("local default dev lo table 273"), "{e}");
        })
        .join()
        .unwrap();
    }

    /// `ip link set lo up` in this thread's namespace (IPv6 routes need the device up).
    fn set_loopback_up() {
        // SAFETY: a plain socket for the ioctl, closed below; `ifreq` is zeroed and its name
        // NUL-terminated.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(fd >= 0);
            let mut req: libc::ifreq = std::mem::zeroed();
            req.ifr_name[..2].copy_from_slice(&[b'l' as libc::c_char, b'o' as libc::c_char]);
            assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req), 0);
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &req), 0);
            libc::close(fd);
        }
    }

    #[test]
    fn refusals_name_what_is_missing() {
        let e = explain(
            io::Error::from_raw_os_error(libc::EPERM),
            Family::V4,
            "adding x",
        );
        assert!(e.contains("CAP_NET_ADMIN"), "{e}");
        let e = explain(
            io::Error::from_raw_os_error(libc::EAFNOSUPPORT),
            Family::V6,
            "adding x",
        );
        assert!(e.contains("CONFIG_IPV6_MULTIPLE_TABLES"), "{e}");
        assert!(gone(&io::Error::from_raw_os_error(libc::ENOENT)));
        assert!(!gone(&io::Error::from_raw_os_error(libc::EPERM)));
    }
}
