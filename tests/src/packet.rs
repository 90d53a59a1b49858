//! Decoding captured Ethernet frames down to IPv4 and IPv6 TCP segments; pure functions, no I/O.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Length of the fixed IPv6 header.
const IPV6_HEADER_LEN: usize = 40;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;

/// TCP header flags (the low byte of the flags field).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    /// Sender has finished sending.
    pub const FIN: u8 = 0x01;
    /// Opens a connection.
    pub const SYN: u8 = 0x02;
    /// Resets the connection.
    pub const RST: u8 = 0x04;
    /// Push buffered data to the application.
    pub const PSH: u8 = 0x08;
    /// The acknowledgment number is valid.
    pub const ACK: u8 = 0x10;
    /// The urgent pointer is valid.
    pub const URG: u8 = 0x20;

    /// Whether every bit of `mask` is set.
    pub fn has(self, mask: u8) -> bool {
        self.0 & mask == mask
    }

    /// Whether SYN is set.
    pub fn syn(self) -> bool {
        self.has(Self::SYN)
    }

    /// Whether ACK is set.
    pub fn ack(self) -> bool {
        self.has(Self::ACK)
    }

    /// Whether FIN is set.
    pub fn fin(self) -> bool {
        self.has(Self::FIN)
    }

    /// Whether RST is set.
    pub fn rst(self) -> bool {
        self.has(Self::RST)
    }
}

/// tcpdump's notation: `S` SYN, `F` FIN, `R` RST, `P` PSH, `U` URG, `.` ACK.
impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (bit, c) in [
            (Self::SYN, 'S'),
            (Self::FIN, 'F'),
            (Self::RST, 'R'),
            (Self::PSH, 'P'),
            (Self::URG, 'U'),
            (Self::ACK, '.'),
        ] {
            if self.has(bit) {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{self}]")
    }
}

/// One IPv4 or IPv6 TCP segment as seen on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpPacket {
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (meaningful when [`TcpFlags::ACK`] is set).
    pub ack: u32,
    /// Header flags.
    pub flags: TcpFlags,
    /// The first bytes of the payload (at most the cap given when decoding).
    pub payload: Vec<u8>,
    /// Full payload length, including what was not kept.
    pub payload_len: usize,
    /// Sent by the capturing host (rather than received by it).
    pub outgoing: bool,
}

impl fmt::Display for TcpPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} > {} [{}] seq {} ack {} len {}",
            self.src, self.dst, self.flags, self.seq, self.ack, self.payload_len
        )?;
        if !self.payload.is_empty() {
            let shown = &self.payload[..self.payload.len().min(16)];
            write!(f, " {:?}", String::from_utf8_lossy(shown))?;
        }
        Ok(())
    }
}

/// An Ethernet frame's EtherType (after at most one 802.1Q tag) and payload.
pub fn ethernet(frame: &[u8]) -> Option<(u16, &[u8])> {
    let mut ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let mut rest = frame.get(14..)?;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = u16::from_be_bytes(rest.get(2..4)?.try_into().ok()?);
        rest = rest.get(4..)?;
    }
    Some((ethertype, rest))
}

/// The fields of an IPv4 or IPv6 header the capture needs.
#[derive(Debug, PartialEq, Eq)]
pub struct IpHeader<'a> {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Transport protocol number (6 for TCP); for IPv6 the fixed header's next header.
    pub protocol: u8,
    /// Length of the IP header.
    pub header_len: usize,
    /// Length the header claims for the whole datagram; 0 for oversized GSO packets.
    pub total_len: usize,
    /// What follows the header, bounded by `total_len` (so Ethernet padding is dropped) and by
    /// what was captured.
    pub payload: &'a [u8],
}

/// Decodes an IPv4 header. Non-first fragments are rejected: they carry no transport header.
pub fn ipv4(packet: &[u8]) -> Option<IpHeader<'_>> {
    let first = *packet.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(first & 0x0f) * 4;
    if header_len < 20 || packet.len() < header_len {
        return None;
    }
    let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
    if fragment_offset != 0 {
        return None;
    }
    // A zero length is how GSO packets larger than 64 KiB appear; use what was captured.
    let end = if total_len == 0 {
        packet.len()
    } else if total_len < header_len {
        return None;
    } else {
        total_len.min(packet.len())
    };
    Some(IpHeader {
        src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]).into(),
        dst: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]).into(),
        protocol: packet[9],
        header_len,
        total_len,
        payload: &packet[header_len..end],
    })
}

/// Decodes the fixed IPv6 header. Extension headers are not followed: a packet whose next
/// header is not the transport is reported with that next header as its protocol.
pub fn ipv6(packet: &[u8]) -> Option<IpHeader<'_>> {
    if packet.len() < IPV6_HEADER_LEN || packet[0] >> 4 != 6 {
        return None;
    }
    let payload_len = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
    let address = |at: usize| -> Option<Ipv6Addr> {
        let octets: [u8; 16] = packet.get(at..at + 16)?.try_into().ok()?;
        Some(Ipv6Addr::from(octets))
    };
    // A zero payload length is how GSO packets larger than 64 KiB (and jumbograms) appear.
    let (total_len, end) = if payload_len == 0 {
        (0, packet.len())
    } else {
        let total = IPV6_HEADER_LEN + payload_len;
        (total, total.min(packet.len()))
    };
    Some(IpHeader {
        src: address(8)?.into(),
        dst: address(24)?.into(),
        protocol: packet[6],
        header_len: IPV6_HEADER_LEN,
        total_len,
        payload: &packet[IPV6_HEADER_LEN..end],
    })
}

/// The fields of a TCP header the capture needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Tcp<'a> {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Header flags.
    pub flags: TcpFlags,
    /// Length of the header including options.
    pub header_len: usize,
    /// What follows the header, as far as captured.
    pub payload: &'a [u8],
}

/// Decodes a TCP header and splits off its payload.
pub fn tcp(segment: &[u8]) -> Option<Tcp<'_>> {
    if segment.len() < 20 {
        return None;
    }
    let header_len = usize::from(segment[12] >> 4) * 4;
    if header_len < 20 || segment.len() < header_len {
        return None;
    }
    let be32 = |at: usize| {
        u32::from_be_bytes([
            segment[at],
            segment[at + 1],
            segment[at + 2],
            segment[at + 3],
        ])
    };
    Some(Tcp {
        src_port: u16::from_be_bytes([segment[0], segment[1]]),
        dst_port: u16::from_be_bytes([segment[2], segment[3]]),
        seq: be32(4),
        ack: be32(8),
        flags: TcpFlags(segment[13]),
        header_len,
        payload: &segment[header_len..],
    })
}

/// Decodes an Ethernet frame carrying IPv4 or IPv6 TCP, keeping at most `payload_cap` payload bytes.
///
/// `wire_len` is the frame's length on the wire, which is more than `frame.len()` when the
/// capture buffer truncated it; the full payload length is derived from the IP header when it
/// can be, else from `wire_len`.
pub fn decode_frame(frame: &[u8], wire_len: usize, payload_cap: usize) -> Option<TcpPacket> {
    let (ethertype, l3) = ethernet(frame)?;
    let ip = match ethertype {
        ETHERTYPE_IPV4 => ipv4(l3)?,
        ETHERTYPE_IPV6 => ipv6(l3)?,
        _ => return None,
    };
    if ip.protocol != IPPROTO_TCP {
        return None;
    }
    let seg = tcp(ip.payload)?;
    let ip_header_len = ip.header_len;
    let payload_len = if ip.total_len != 0 {
        ip.total_len.saturating_sub(ip_header_len + seg.header_len)
    } else {
        let l3_wire = wire_len.saturating_sub(frame.len() - l3.len());
        l3_wire.saturating_sub(ip_header_len + seg.header_len)
    };
    let kept = &seg.payload[..seg.payload.len().min(payload_cap)];
    Some(TcpPacket {
        src: SocketAddr::new(ip.src, seg.src_port),
        dst: SocketAddr::new(ip.dst, seg.dst_port),
        seq: seg.seq,
        ack: seg.ack,
        flags: seg.flags,
        payload: kept.to_vec(),
        payload_len,
        outgoing: false,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds an Ethernet + IP + TCP frame (IPv4 or IPv6 as the addresses are); `pad` appends
    /// Ethernet padding after the datagram.
    pub(crate) fn frame(
        src: SocketAddr,
        dst: SocketAddr,
        seq: u32,
        flags: u8,
        payload: &[u8],
        pad: usize,
    ) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2]); // dst mac
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]); // src mac
        match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
                let total = (20 + 20 + payload.len()) as u16;
                f.extend_from_slice(&[0x45, 0]);
                f.extend_from_slice(&total.to_be_bytes());
                f.extend_from_slice(&[0, 1, 0x40, 0]); // id 1, DF
                f.extend_from_slice(&[64, IPPROTO_TCP, 0, 0]); // ttl, proto, checksum
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
                f.extend_from_slice(&[0x60, 0, 0, 0]); // version, class, flow
                f.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
                f.extend_from_slice(&[IPPROTO_TCP, 64]); // next header, hop limit
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            _ => panic!("mixed address families"),
        }
        f.extend_from_slice(&src.port().to_be_bytes());
        f.extend_from_slice(&dst.port().to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&7u32.to_be_bytes()); // ack
        f.extend_from_slice(&[5 << 4, flags]);
        f.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent
        f.extend_from_slice(payload);
        f.extend(std::iter::repeat_n(0u8, pad));
        f
    }

    fn a() -> SocketAddr {
        "10.244.1.10:40000".parse().unwrap()
    }

    fn b() -> SocketAddr {
        "10.244.2.10:8080".parse().unwrap()
    }

    #[test]
    fn decodes_ipv6_tcp() {
        let (c, s): (SocketAddr, SocketAddr) = (
            "[fd00:10:244:1::a]:40000".parse().unwrap(),
            "[fd00:10:244:2::a]:15008".parse().unwrap(),
        );
        let f = frame(c, s, 9, TcpFlags::SYN, b"v6", 0);
        let p = decode_frame(&f, f.len(), 256).unwrap();
        assert_eq!((p.src, p.dst, p.seq), (c, s, 9));
        assert_eq!(p.payload, b"v6");
        assert_eq!(p.payload_len, 2);

        // Truncated by the capture buffer: counted from the payload length field.
        let big = frame(c, s, 9, TcpFlags::ACK, &[7; 500], 0);
        let p = decode_frame(&big[..120], big.len(), 256).unwrap();
        assert_eq!(p.payload_len, 500);
        assert_eq!(p.payload.len(), 120 - 74);

        // An extension header (hop-by-hop, 0) first: not followed, not TCP.
        let mut hop = f.clone();
        hop[14 + 6] = 0;
        assert_eq!(decode_frame(&hop, hop.len(), 256), None);
    }

    #[test]
    fn decodes_tcp_with_payload() {
        let f = frame(a(), b(), 1000, TcpFlags::PSH | TcpFlags::ACK, b"hello", 0);
        let p = decode_frame(&f, f.len(), 256).unwrap();
        assert_eq!(p.src, a());
        assert_eq!(p.dst, b());
        assert_eq!(p.seq, 1000);
        assert_eq!(p.ack, 7);
        assert!(p.flags.ack() && p.flags.has(TcpFlags::PSH) && !p.flags.syn());
        assert_eq!(p.payload, b"hello");
        assert_eq!(p.payload_len, 5);
        assert_eq!(p.flags.to_string(), "P.");
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        let f = frame(a(), b(), 1, TcpFlags::SYN, b"", 6);
        assert_eq!(f.len(), 60);
        let p = decode_frame(&f, f.len(), 256).unwrap();
        assert!(p.payload.is_empty());
        assert_eq!(p.payload_len, 0);
        assert_eq!(p.flags.to_string(), "S");
    }

    #[test]
    fn payload_is_capped_but_counted() {
        let data = vec![b'x'; 1000];
        let f = frame(a(), b(), 1, TcpFlags::ACK, &data, 0);
        let p = decode_frame(&f, f.len(), 256).unwrap();
        assert_eq!(p.payload.len(), 256);
        assert_eq!(p.payload_len, 1000);

        // Truncated by the capture buffer: still counted from the IP header.
        let p = decode_frame(&f[..100], f.len(), 256).unwrap();
        assert_eq!(p.payload.len(), 100 - 54);
        assert_eq!(p.payload_len, 1000);
    }

    #[test]
    fn gso_packet_without_total_length_uses_wire_length() {
        let mut f = frame(a(), b(), 1, TcpFlags::ACK, &[1; 100], 0);
        f[16] = 0;
        f[17] = 0;
        let p = decode_frame(&f[..80], 70_000, 256).unwrap();
        assert_eq!(p.payload_len, 70_000 - 54);
        assert_eq!(p.payload.len(), 80 - 54);
    }

    #[test]
    fn vlan_tag_is_skipped() {
        let f = frame(a(), b(), 1, TcpFlags::ACK, b"v", 0);
        let mut tagged = f[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        tagged.extend_from_slice(&f[12..]);
        let p = decode_frame(&tagged, tagged.len(), 256).unwrap();
        assert_eq!(p.payload, b"v");
    }

    #[test]
    fn rejects_other_traffic() {
        let f = frame(a(), b(), 1, TcpFlags::ACK, b"x", 0);

        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(decode_frame(&arp, arp.len(), 256), None);

        let mut udp = f.clone();
        udp[14 + 9] = 17;
        assert_eq!(decode_frame(&udp, udp.len(), 256), None);

        // An IPv4 header in a frame that says IPv6, and the other way round.
        let mut v6 = f.clone();
        v6[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        assert_eq!(decode_frame(&v6, v6.len(), 256), None);
        let mut v4 = f.clone();
        v4[14] = 0x60;
        assert_eq!(decode_frame(&v4, v4.len(), 256), None);

        let mut fragment = f.clone();
        fragment[14 + 7] = 0x10; // offset 16 * 8 bytes
        assert_eq!(decode_frame(&fragment, fragment.len(), 256), None);

        let mut bad_doff = f.clone();
        bad_doff[14 + 20 + 12] = 4 << 4;
        assert_eq!(decode_frame(&bad_doff, bad_doff.len(), 256), None);

        for len in [0, 13, 14, 33, 34 + 19] {
            assert_eq!(decode_frame(&f[..len], f.len(), 256), None, "len {len}");
        }
    }

    #[test]
    fn tcp_options_are_skipped() {
        let mut seg = vec![0u8; 24];
        seg[0..2].copy_from_slice(&1u16.to_be_bytes());
        seg[2..4].copy_from_slice(&2u16.to_be_bytes());
        seg[12] = 6 << 4;
        seg[13] = TcpFlags::SYN | TcpFlags::ACK;
        seg[20..24].copy_from_slice(&[2, 4, 5, 0xb4]); // MSS option
        seg.extend_from_slice(b"data");
        let t = tcp(&seg).unwrap();
        assert_eq!((t.src_port, t.dst_port, t.header_len), (1, 2, 24));
        assert_eq!(t.payload, b"data");
        assert_eq!(t.flags.to_string(), "S.");
    }
}
