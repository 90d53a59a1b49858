//! eBPF programs that send enrolled pods' TCP traffic to ztunnel's in-pod listeners, without iptables.
//!
//! - `ztunnel_connect4/6` (cgroup, on the pods' parent cgroup): outbound connects from an
//!   enrolled netns go to the pod's own 15001 (`127.0.0.1`, `[::1]`, or `[::ffff:127.0.0.1]` for
//!   an IPv6 socket dialing an IPv4 address); the original destination is kept under the socket
//!   cookie.
//! - `ztunnel_sock_ops` (same cgroup): once the client port is known, the original destination is
//!   copied under {netns cookie, client port}, which is what ztunnel can see after `accept()`.
//! - `ztunnel_getpeername4/6`: the application sees the original destination as its peer.
//! - `ztunnel_bind4/6`: in an enrolled netns only ztunnel's marked sockets may bind its ports.
//! - DNS (while `CONFIG_DNS_CAPTURE` is 1): `connect4/6` send TCP and connected UDP to port 53 to
//!   the pod's DNS proxy on 15053, `ztunnel_sendmsg4/6` do the same for each unconnected UDP
//!   datagram, and `ztunnel_recvmsg4/6` show the proxy's replies as coming from the resolver the
//!   application asked (kept under the socket cookie, as `getpeername4/6` shows it).
//! - `ztunnel_sk_lookup` (one link per enrolled pod netns): inbound TCP from outside the pod is
//!   assigned to the pod's 15006 listener, except HBONE on 15008; no listener → dropped.
#![no_std]
#![no_main]

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::{
    BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    sk_action,
};
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie};
use aya_ebpf::macros::{cgroup_sock_addr, map, sk_lookup, sock_ops};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, SockHash};
use aya_ebpf::programs::{SkLookupContext, SockAddrContext, SockOpsContext};
use aya_log_ebpf::{debug, warn};
use redirect_common::{
    AF_INET, AF_INET6, CONFIG_DNS_CAPTURE, CONFIG_LEN, CONFIG_LOG_LEVEL, DNS_PORT, HBONE_PORT,
    INBOUND_PLAINTEXT_PORT, IpKey, KUBELET_PROBE_IP4, KUBELET_PROBE_IP6, LogLevel, OUTBOUND_PORT,
    OrigDst, PROXY_MARK, PodInfo, PortKey, RESOLVER_PORT,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
/// The loopback interface is always ifindex 1 in a network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

/// Enrolled pods by netns cookie.
#[map]
static ENROLLED: HashMap<u64, PodInfo> = HashMap::pinned(4096, 0);

/// Original destinations by socket cookie, from connect until the socket closes.
#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);

/// Original destinations by {netns cookie, client port}; ztunnel removes what it reads.
#[map]
static ORIG_BY_PORT: LruHashMap<PortKey, OrigDst> = LruHashMap::pinned(65536, 0);

/// The resolver a captured DNS socket (TCP or UDP) was talking to, by socket cookie: shown to
/// the application by `getpeername` and as the source of replies by `recvmsg`. Kept apart from
/// `ORIG_BY_COOKIE` so UDP sockets, which have no close callback, only age out of their own LRU.
#[map]
static DNS_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(16384, 0);

/// Each enrolled pod's 15006 listener(s), keyed by the pod's IP: `sk_lookup` cannot read the
/// netns cookie. A listener that closes leaves the map by itself.
#[map]
static INBOUND: SockHash<IpKey> = SockHash::pinned(4096, 0);

/// Settings written by ztunnel at run time (see `redirect_common::CONFIG_*`).
#[map]
static CONFIG: Array<u32> = Array::pinned(CONFIG_LEN, 0);

#[inline(always)]
fn log_enabled(level: LogLevel) -> bool {
    match CONFIG.get(CONFIG_LOG_LEVEL) {
        Some(l) => *l >= level as u32,
        None => false,
    }
}

#[inline(always)]
fn dns_capture() -> bool {
    matches!(CONFIG.get(CONFIG_DNS_CAPTURE), Some(v) if *v == 1)
}

#[inline(always)]
fn is_proxy_port(port: u16) -> bool {
    port == OUTBOUND_PORT
        || port == INBOUND_PLAINTEXT_PORT
        || port == HBONE_PORT
        || port == DNS_PORT
}

/// The enrolled pod whose netns made this socket, if any.
#[inline(always)]
fn enrolled_pod(ctx: &SockAddrContext) -> Option<(u64, PodInfo)> {
    // SAFETY: a helper taking the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before any map update.
    let pod = unsafe { ENROLLED.get(netns) }.copied()?;
    Some((netns, pod))
}

/// The socket's SO_MARK.
#[inline(always)]
fn socket_mark(ctx: &SockAddrContext) -> u32 {
    // SAFETY: in cgroup sock_addr programs `ctx->sk` is always a valid socket.
    unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).mark }
}

#[inline(always)]
fn is_tcp(ctx: &SockAddrContext) -> bool {
    // SAFETY: reading the context the kernel passed us.
    unsafe { (*ctx.sock_addr).type_ == SOCK_STREAM && (*ctx.sock_addr).protocol == IPPROTO_TCP }
}

#[inline(always)]
fn is_udp(ctx: &SockAddrContext) -> bool {
    // SAFETY: reading the context the kernel passed us.
    unsafe { (*ctx.sock_addr).type_ == SOCK_DGRAM && (*ctx.sock_addr).protocol == IPPROTO_UDP }
}

#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: reading the context; the port is big-endian in the low 16 bits.
    u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16)
}

#[inline(always)]
fn save_original(
    ctx: &SockAddrContext,
    map: &LruHashMap<u64, OrigDst>,
    netns: u64,
    addr: [u8; 16],
    port: u16,
    family: u16,
) {
    let orig = OrigDst {
        netns_cookie: netns,
        addr,
        port,
        family,
        _pad: 0,
    };
    // SAFETY: a helper taking the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if map.insert(cookie, orig, 0).is_err() && log_enabled(LogLevel::Warn) {
        warn!(ctx, "cannot save the original destination");
    }
}

/// Where an enrolled pod's application sends IPv4 DNS: the resolver it named is kept under the
/// socket cookie and the address becomes the pod's DNS proxy. For connect4 (TCP, connected UDP)
/// and sendmsg4 (unconnected UDP).
#[inline(always)]
fn redirect_dns4(ctx: &SockAddrContext, netns: u64, ip: [u8; 4]) {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip);
    save_original(ctx, &DNS_ORIG, netns, addr, RESOLVER_PORT, AF_INET);
    // SAFETY: writing the fields the kernel lets connect4/sendmsg4 rewrite.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        (*ctx.sock_addr).user_port = u32::from(DNS_PORT.to_be());
    }
    if log_enabled(LogLevel::Debug) {
        debug!(
            ctx,
            "dns {:i}:53 -> 127.0.0.1:15053",
            u32::from_be_bytes(ip)
        );
    }
}

/// The IPv4 destination of a socket address hook, if it is one to capture: not loopback, not
/// the pod's own address, not 0.0.0.0 (this host).
#[inline(always)]
fn capturable_ip4(ctx: &SockAddrContext, pod: &PodInfo) -> Option<[u8; 4]> {
    // SAFETY: reading the context; the address is in network byte order.
    let ip = unsafe { (*ctx.sock_addr).user_ip4 }.to_ne_bytes();
    if ip[0] == 127 || ip == pod.ip4 || ip == [0, 0, 0, 0] {
        return None;
    }
    Some(ip)
}

#[cgroup_sock_addr(connect4)]
pub fn ztunnel_connect4(ctx: SockAddrContext) -> i32 {
    let Some((netns, pod)) = enrolled_pod(&ctx) else {
        return ALLOW;
    };
    let tcp = is_tcp(&ctx);
    if !(tcp || is_udp(&ctx)) || socket_mark(&ctx) == PROXY_MARK {
        return ALLOW;
    }
    // Loopback and the pod's own address stay inside the pod; 0.0.0.0 means this host.
    let Some(ip) = capturable_ip4(&ctx, &pod) else {
        return ALLOW;
    };
    let port = user_port(&ctx);
    // TCP and connected UDP (glibc's resolver connects its socket) to a resolver.
    if port == RESOLVER_PORT && dns_capture() {
        redirect_dns4(&ctx, netns, ip);
        return ALLOW;
    }
    if !tcp {
        return ALLOW;
    }
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip);
    save_original(&ctx, &ORIG_BY_COOKIE, netns, addr, port, AF_INET);
    // SAFETY: writing the fields the kernel lets connect4 rewrite.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        (*ctx.sock_addr).user_port = u32::from(OUTBOUND_PORT.to_be());
    }
    if log_enabled(LogLevel::Debug) {
        debug!(
            &ctx,
            "connect4 {:i}:{} -> 127.0.0.1:15001",
            u32::from_be_bytes(ip),
            port
        );
    }
    ALLOW
}

/// The third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), as stored.
const MAPPED4_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[cgroup_sock_addr(connect6)]
pub fn ztunnel_connect6(ctx: SockAddrContext) -> i32 {
    let Some((netns, pod)) = enrolled_pod(&ctx) else {
        return ALLOW;
    };
    let tcp = is_tcp(&ctx);
    if !(tcp || is_udp(&ctx)) || socket_mark(&ctx) == PROXY_MARK {
        return ALLOW;
    }
    let Some(ip) = capturable_ip6(&ctx, &pod) else {
        return ALLOW;
    };
    let port = user_port(&ctx);
    if port == RESOLVER_PORT && dns_capture() {
        redirect_dns6(&ctx, &pod, netns, ip);
        return ALLOW;
    }
    if !tcp {
        return ALLOW;
    }
    if is_v4_mapped(&ip) {
        // An IPv6 socket dialing an IPv4 address (`::ffff:a.b.c.d`, what dual-stack runtimes
        // do): the connection is IPv4, so it goes to the IPv4 listener and is recorded as
        // IPv4, which is how ztunnel's 15001 sees it.
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&ip[12..]);
        save_original(&ctx, &ORIG_BY_COOKIE, netns, addr, port, AF_INET);
        // SAFETY: writing the fields the kernel lets connect6 rewrite.
        unsafe {
            (*ctx.sock_addr).user_ip6 = [0, 0, MAPPED4_WORD, u32::from_ne_bytes([127, 0, 0, 1])];
            (*ctx.sock_addr).user_port = u32::from(OUTBOUND_PORT.to_be());
        }
        if log_enabled(LogLevel::Debug) {
            debug!(
                &ctx,
                "connect6 ::ffff:{:i}:{} -> [::ffff:127.0.0.1]:15001",
                u32::from_be_bytes([ip[12], ip[13], ip[14], ip[15]]),
                port
            );
        }
        return ALLOW;
    }
    save_original(&ctx, &ORIG_BY_COOKIE, netns, ip, port, AF_INET6);
    // SAFETY: writing the fields the kernel lets connect6 rewrite.
    unsafe {
        (*ctx.sock_addr).user_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        (*ctx.sock_addr).user_port = u32::from(OUTBOUND_PORT.to_be());
    }
    if log_enabled(LogLevel::Debug) {
        debug!(&ctx, "connect6 port {} -> [::1]:15001", port);
    }
    ALLOW
}

/// The IPv6 destination of a socket address hook, if it is one to capture (see
/// [`capturable_ip4`]); v4-mapped loopback counts as loopback.
#[inline(always)]
fn capturable_ip6(ctx: &SockAddrContext, pod: &PodInfo) -> Option<[u8; 16]> {
    // SAFETY: reading the context; each word is in network byte order.
    let words = unsafe { (*ctx.sock_addr).user_ip6 };
    let ip = ip6_bytes(words);
    let loopback = words[0] == 0
        && words[1] == 0
        && words[2] == 0
        && words[3] == u32::from_ne_bytes([0, 0, 0, 1]);
    let unspecified = words == [0, 0, 0, 0];
    if loopback || unspecified || ip == pod.ip6 {
        return None;
    }
    // A v4-mapped destination is IPv4 underneath: the IPv4 rules apply.
    let v4 = [ip[12], ip[13], ip[14], ip[15]];
    if is_v4_mapped(&ip) && (v4[0] == 127 || v4 == pod.ip4 || v4 == [0, 0, 0, 0]) {
        return None;
    }
    Some(ip)
}

/// Whether an IPv6 address is v4-mapped (`::ffff:a.b.c.d`, a dual-stack socket talking IPv4).
#[inline(always)]
fn is_v4_mapped(ip: &[u8; 16]) -> bool {
    ip[..10] == [0u8; 10] && ip[10] == 0xff && ip[11] == 0xff
}

/// [`redirect_dns4`] for IPv6 sockets: a v4-mapped resolver goes to the proxy's IPv4 socket
/// (`::ffff:127.0.0.1`), an IPv6 one to `[::1]:15053`, which exists only when the pod has an
/// IPv6 address (otherwise the query is left alone rather than sent nowhere).
#[inline(always)]
fn redirect_dns6(ctx: &SockAddrContext, pod: &PodInfo, netns: u64, ip: [u8; 16]) {
    let mapped = is_v4_mapped(&ip);
    if !mapped && pod.ip6 == [0u8; 16] {
        return;
    }
    save_original(ctx, &DNS_ORIG, netns, ip, RESOLVER_PORT, AF_INET6);
    let target = if mapped {
        [
            0,
            0,
            u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            u32::from_ne_bytes([127, 0, 0, 1]),
        ]
    } else {
        [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
    };
    // SAFETY: writing the fields the kernel lets connect6/sendmsg6 rewrite.
    unsafe {
        (*ctx.sock_addr).user_ip6 = target;
        (*ctx.sock_addr).user_port = u32::from(DNS_PORT.to_be());
    }
    if log_enabled(LogLevel::Debug) {
        debug!(ctx, "dns6 port 53 -> 15053");
    }
}

/// Unconnected UDP: each datagram to port 53 from an enrolled pod goes to its DNS proxy.
#[cgroup_sock_addr(sendmsg4)]
pub fn ztunnel_sendmsg4(ctx: SockAddrContext) -> i32 {
    if user_port(&ctx) != RESOLVER_PORT || !dns_capture() {
        return ALLOW;
    }
    let Some((netns, pod)) = enrolled_pod(&ctx) else {
        return ALLOW;
    };
    if !is_udp(&ctx) || socket_mark(&ctx) == PROXY_MARK {
        return ALLOW;
    }
    if let Some(ip) = capturable_ip4(&ctx, &pod) {
        redirect_dns4(&ctx, netns, ip);
    }
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn ztunnel_sendmsg6(ctx: SockAddrContext) -> i32 {
    if user_port(&ctx) != RESOLVER_PORT || !dns_capture() {
        return ALLOW;
    }
    let Some((netns, pod)) = enrolled_pod(&ctx) else {
        return ALLOW;
    };
    if !is_udp(&ctx) || socket_mark(&ctx) == PROXY_MARK {
        return ALLOW;
    }
    if let Some(ip) = capturable_ip6(&ctx, &pod) {
        redirect_dns6(&ctx, &pod, netns, ip);
    }
    ALLOW
}

/// The resolver a DNS socket was redirected from, when its peer (or a datagram's source) is
/// the proxy's port.
#[inline(always)]
fn dns_original(ctx: &SockAddrContext) -> Option<OrigDst> {
    if user_port(ctx) != DNS_PORT {
        return None;
    }
    // SAFETY: a helper taking the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    unsafe { DNS_ORIG.get(cookie) }.copied()
}

#[inline(always)]
fn show_peer4(ctx: &SockAddrContext, orig: &OrigDst) {
    let ip = [orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]];
    // SAFETY: writing the fields getpeername4/recvmsg4 may rewrite.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(ip);
        (*ctx.sock_addr).user_port = u32::from(orig.port.to_be());
    }
}

#[inline(always)]
fn show_peer6(ctx: &SockAddrContext, orig: &OrigDst) {
    let a = orig.addr;
    // An IPv4 destination dialed from an IPv6 socket shows as the IPv4-mapped address it used.
    let words = if orig.family == AF_INET6 {
        [
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        ]
    } else {
        [
            0,
            0,
            MAPPED4_WORD,
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        ]
    };
    // SAFETY: writing the fields getpeername6/recvmsg6 may rewrite.
    unsafe {
        (*ctx.sock_addr).user_ip6 = words;
        (*ctx.sock_addr).user_port = u32::from(orig.port.to_be());
    }
}

/// A reply from the DNS proxy is shown as coming from the resolver the application asked
/// (glibc and musl drop replies from any other address).
#[cgroup_sock_addr(recvmsg4)]
pub fn ztunnel_recvmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: reading the context; the address is in network byte order.
    let from_lo = unsafe { (*ctx.sock_addr).user_ip4 }.to_ne_bytes() == [127, 0, 0, 1];
    if from_lo
        && let Some(orig) = dns_original(&ctx)
        && orig.family == AF_INET
    {
        show_peer4(&ctx, &orig);
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn ztunnel_recvmsg6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = dns_original(&ctx)
        && orig.family == AF_INET6
    {
        show_peer6(&ctx, &orig);
    }
    ALLOW
}

#[inline(always)]
fn ip6_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&words[0].to_ne_bytes());
    b[4..8].copy_from_slice(&words[1].to_ne_bytes());
    b[8..12].copy_from_slice(&words[2].to_ne_bytes());
    b[12..].copy_from_slice(&words[3].to_ne_bytes());
    b
}

#[sock_ops]
pub fn ztunnel_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB {
        return 1;
    }
    // SAFETY: a helper taking the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if op == BPF_SOCK_OPS_STATE_CB {
        // arg 1 is the new state: forget the socket once it is closed.
        if ctx.arg(1) == BPF_TCP_CLOSE {
            let _ = ORIG_BY_COOKIE.remove(cookie);
            let _ = DNS_ORIG.remove(cookie);
        }
        return 1;
    }
    // SAFETY: the value is copied out before any map update.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }).copied() else {
        // TCP to the DNS proxy: nothing for ztunnel to read, but forget it on close.
        // SAFETY: only checking presence.
        if unsafe { DNS_ORIG.get(cookie) }.is_some() {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        return 1;
    };
    let key = PortKey {
        netns_cookie: orig.netns_cookie,
        port: ctx.local_port() as u16,
        family: orig.family,
        _pad: 0,
    };
    if ORIG_BY_PORT.insert(key, orig, 0).is_err() && log_enabled(LogLevel::Warn) {
        warn!(&ctx, "sock_ops: cannot save the original destination");
    }
    // Ask for state changes so the cookie entry goes away with the socket.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    1
}

/// The connection was captured: show the application where it was going, not 15001 (or the
/// DNS proxy's 15053).
#[inline(always)]
fn original_peer(ctx: &SockAddrContext) -> Option<OrigDst> {
    if user_port(ctx) != OUTBOUND_PORT {
        return dns_original(ctx);
    }
    // SAFETY: a helper taking the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    unsafe { ORIG_BY_COOKIE.get(cookie) }.copied()
}

#[cgroup_sock_addr(getpeername4)]
pub fn ztunnel_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original_peer(&ctx)
        && orig.family == AF_INET
    {
        show_peer4(&ctx, &orig);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn ztunnel_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original_peer(&ctx) {
        show_peer6(&ctx, &orig);
    }
    ALLOW
}

/// Only ztunnel's marked sockets may bind its ports in an enrolled pod, so an application cannot
/// take 15001/15006/15008/15053 and receive captured traffic.
#[inline(always)]
fn bind_guard(ctx: &SockAddrContext) -> i32 {
    if enrolled_pod(ctx).is_none() || !is_proxy_port(user_port(ctx)) {
        return ALLOW;
    }
    if socket_mark(ctx) == PROXY_MARK {
        return ALLOW;
    }
    if log_enabled(LogLevel::Warn) {
        warn!(
            ctx,
            "bind to proxy port {} refused in an enrolled pod",
            user_port(ctx)
        );
    }
    DENY
}

#[cgroup_sock_addr(bind4)]
pub fn ztunnel_bind4(ctx: SockAddrContext) -> i32 {
    bind_guard(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn ztunnel_bind6(ctx: SockAddrContext) -> i32 {
    bind_guard(&ctx)
}

#[sk_lookup]
pub fn ztunnel_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: reading the context the kernel passed us.
    let l = unsafe { &*ctx.lookup };
    // Loopback includes ztunnel delivering from a client's address (source preservation): its
    // socket is bound to `lo`, which is what makes the SYN show up here with lo's index.
    if l.protocol != IPPROTO_TCP || l.ingress_ifindex == LOOPBACK_IFINDEX {
        return sk_action::SK_PASS;
    }
    let port = l.local_port as u16;
    if port == OUTBOUND_PORT || port == INBOUND_PLAINTEXT_PORT || port == HBONE_PORT {
        return sk_action::SK_PASS;
    }
    // Traffic from the pod to its own address (the app calling itself, ztunnel delivering to
    // the app) is routed over loopback, but reported with the pod interface's index: tell it
    // by its source, the pod's own address.
    let key = if l.family == u32::from(AF_INET) {
        let remote = l.remote_ip4.to_ne_bytes();
        if remote == KUBELET_PROBE_IP4 || l.remote_ip4 == l.local_ip4 || remote[0] == 127 {
            return sk_action::SK_PASS;
        }
        IpKey::v4(l.local_ip4.to_ne_bytes())
    } else {
        let remote = ip6_bytes(l.remote_ip6);
        if l.remote_ip6 == l.local_ip6 || remote == KUBELET_PROBE_IP6 {
            return sk_action::SK_PASS;
        }
        IpKey::v6(ip6_bytes(l.local_ip6))
    };
    match INBOUND.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => sk_action::SK_PASS,
        Err(_) => {
            // Fail closed: no listener means ztunnel is not serving this pod right now.
            if log_enabled(LogLevel::Debug) {
                debug!(&ctx, "sk_lookup: no listener for port {}, dropping", port);
            }
            sk_action::SK_DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// Program license: GPL-only helpers (the ring buffer for logs) need it.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
