//! The test bed's address plan: underlay, per-node pod subnets and pod addresses, in IPv4 and
//! in IPv6 (unique local addresses, `fd00::/8`), so every node and pod is dual-stack.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Pods on a node are numbered from this host address up.
const FIRST_POD_HOST: u8 = 10;

/// Most nodes a test bed can have: node numbers are one octet of the pod subnet.
pub(crate) const MAX_NODES: usize = 250;

/// Most pods one node can hold in its /24.
pub(crate) const MAX_PODS_PER_NODE: usize = 254 - FIRST_POD_HOST as usize;

/// Prefix length of both the underlay and the pod subnets.
pub(crate) const PREFIX_LEN: u8 = 24;

/// Prefix length of both the IPv6 underlay and the IPv6 pod subnets.
pub(crate) const PREFIX_LEN6: u8 = 64;

/// Address of node `number` (1-based) on the underlay.
pub(crate) fn underlay_ip(number: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 0, octet(number))
}

/// Address of node `number`'s pod bridge, the pods' default gateway.
pub(crate) fn pod_gateway(number: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, octet(number), 1)
}

/// The /24 holding node `number`'s pods, in `ip route` syntax.
pub(crate) fn pod_subnet(number: usize) -> String {
    format!("10.244.{}.0/{PREFIX_LEN}", octet(number))
}

/// Address of the `k`-th (0-based) pod placed on node `number`.
pub(crate) fn pod_ip(number: usize, k: usize) -> Ipv4Addr {
    assert!(k < MAX_PODS_PER_NODE, "pod index {k} out of range");
    Ipv4Addr::new(10, 244, octet(number), FIRST_POD_HOST + k as u8)
}

/// IPv6 address of node `number` on the underlay: `fd00:172:30::<number>`.
pub(crate) fn underlay_ip6(number: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x172, 0x30, 0, 0, 0, 0, u16::from(octet(number)))
}

/// IPv6 address of node `number`'s pod bridge: `fd00:10:244:<number>::1`.
pub(crate) fn pod_gateway6(number: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(octet(number)), 0, 0, 0, 1)
}

/// The /64 holding node `number`'s pods' IPv6 addresses, in `ip route` syntax.
pub(crate) fn pod_subnet6(number: usize) -> String {
    format!("{}/{PREFIX_LEN6}", pod_gateway6(number) & prefix_mask6())
}

/// IPv6 address of the `k`-th (0-based) pod on node `number`: the same host number as its IPv4
/// address, in the node's /64 (`fd00:10:244:<number>::<10+k>`, the last group in hex).
pub(crate) fn pod_ip6(number: usize, k: usize) -> Ipv6Addr {
    let v4 = pod_ip(number, k);
    Ipv6Addr::new(
        0xfd00,
        0x10,
        0x244,
        u16::from(octet(number)),
        0,
        0,
        0,
        u16::from(v4.octets()[3]),
    )
}

fn prefix_mask6() -> Ipv6Addr {
    Ipv6Addr::from(u128::MAX << (128 - u32::from(PREFIX_LEN6)))
}

fn octet(number: usize) -> u8 {
    assert!(
        (1..=MAX_NODES).contains(&number),
        "node number {number} out of range"
    );
    number as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan() {
        assert_eq!(underlay_ip(1), Ipv4Addr::new(172, 30, 0, 1));
        assert_eq!(underlay_ip(2), Ipv4Addr::new(172, 30, 0, 2));
        assert_eq!(pod_gateway(2), Ipv4Addr::new(10, 244, 2, 1));
        assert_eq!(pod_subnet(3), "10.244.3.0/24");
        assert_eq!(pod_ip(1, 0), Ipv4Addr::new(10, 244, 1, 10));
        assert_eq!(pod_ip(2, 1), Ipv4Addr::new(10, 244, 2, 11));
        assert_eq!(
            pod_ip(1, MAX_PODS_PER_NODE - 1),
            Ipv4Addr::new(10, 244, 1, 253)
        );
    }

    #[test]
    fn plan6() {
        assert_eq!(underlay_ip6(2).to_string(), "fd00:172:30::2");
        assert_eq!(pod_gateway6(2).to_string(), "fd00:10:244:2::1");
        assert_eq!(pod_subnet6(3), "fd00:10:244:3::/64");
        assert_eq!(pod_ip6(1, 0).to_string(), "fd00:10:244:1::a");
        assert_eq!(pod_ip6(2, 1).to_string(), "fd00:10:244:2::b");
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn node_zero_is_invalid() {
        underlay_ip(0);
    }
}
