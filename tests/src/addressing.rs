//! The test bed's address plan: underlay, per-node pod subnets and pod addresses.

use std::net::Ipv4Addr;

/// Pods on a node are numbered from this host address up.
const FIRST_POD_HOST: u8 = 10;

/// Most nodes a test bed can have: node numbers are one octet of the pod subnet.
pub(crate) const MAX_NODES: usize = 250;

/// Most pods one node can hold in its /24.
pub(crate) const MAX_PODS_PER_NODE: usize = 254 - FIRST_POD_HOST as usize;

/// Prefix length of both the underlay and the pod subnets.
pub(crate) const PREFIX_LEN: u8 = 24;

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
    #[should_panic(expected = "out of range")]
    fn node_zero_is_invalid() {
        underlay_ip(0);
    }
}
