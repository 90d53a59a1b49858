//! Map keys and values shared by the redirect eBPF programs and ztunnel, laid out `#[repr(C)]`.
#![no_std]

/// `AF_INET`, as stored in [`OrigDst::family`] and [`IpKey::family`].
pub const AF_INET: u16 = 2;
/// `AF_INET6`.
pub const AF_INET6: u16 = 10;

/// The mark on every socket ztunnel makes inside a pod: capture skips them, the bind guard lets
/// only them bind the proxy ports.
pub const PROXY_MARK: u32 = 0x539;
/// ztunnel's in-pod ports.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;
pub const DNS_PORT: u16 = 15053;
/// The port DNS clients send to; captured to [`DNS_PORT`] when DNS capture is on.
pub const RESOLVER_PORT: u16 = 53;
/// The kubelet's probe source address (169.254.7.127), exempt from capture as in Istio.
pub const KUBELET_PROBE_IP4: [u8; 4] = [169, 254, 7, 127];
/// Its IPv6 counterpart, `fd16:9254:7127:1337:ffff:ffff:ffff:ffff` (Istio's choice too).
pub const KUBELET_PROBE_IP6: [u8; 16] = [
    0xfd, 0x16, 0x92, 0x54, 0x71, 0x27, 0x13, 0x37, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
];

/// Where a captured connection was going, saved by `connect4/6` under the socket cookie and
/// copied by `sock_ops` under [`PortKey`] once the client port is known.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Network namespace cookie of the pod that connected.
    pub netns_cookie: u64,
    /// The address in network byte order: IPv4 in the first 4 bytes, the rest zero.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// A captured connection as ztunnel's 15001 listener sees it: the pod's netns and the client's
/// source port (host byte order). Family apart, the port is unique among connections to 15001.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub netns_cookie: u64,
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// An IP address as a map key (destination IP for `sk_lookup`, which cannot read the netns cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpKey {
    pub family: u16,
    pub _pad: u16,
    /// Network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
}

impl IpKey {
    pub const fn v4(octets: [u8; 4]) -> IpKey {
        let mut addr = [0u8; 16];
        addr[0] = octets[0];
        addr[1] = octets[1];
        addr[2] = octets[2];
        addr[3] = octets[3];
        IpKey {
            family: AF_INET,
            _pad: 0,
            addr,
        }
    }

    pub const fn v6(octets: [u8; 16]) -> IpKey {
        IpKey {
            family: AF_INET6,
            _pad: 0,
            addr: octets,
        }
    }
}

/// An enrolled pod, keyed by its netns cookie: its own addresses are not captured (an app
/// calling its own pod IP stays inside the pod).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// Network byte order; all zero when the pod has no IPv4 address.
    pub ip4: [u8; 4],
    pub flags: u32,
    /// All zero when the pod has no IPv6 address.
    pub ip6: [u8; 16],
    /// [`uid_hash`] of the pod's UID: lets a restarted ztunnel tell whose entry this is.
    pub uid_hash: u64,
}

/// FNV-1a of a pod UID, stored in [`PodInfo::uid_hash`].
pub fn uid_hash(uid: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Index of the log level in the `CONFIG` array; values are [`LogLevel`] as u32.
pub const CONFIG_LOG_LEVEL: u32 = 0;
/// Index of the DNS capture switch in the `CONFIG` array: 1 sends UDP and TCP to port 53 to the
/// pod's DNS proxy on [`DNS_PORT`], 0 leaves UDP 53 alone and treats TCP 53 as any TCP.
pub const CONFIG_DNS_CAPTURE: u32 = 1;
/// Number of entries in the `CONFIG` array.
pub const CONFIG_LEN: u32 = 4;

/// Log levels for the eBPF side, checked before anything is written to the ring buffer.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, #[repr(C)], explicit padding fields, no pointers.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IpKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodInfo {}
}
