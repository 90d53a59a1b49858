//! Recording the TCP packets that cross a node's underlay link, and checks on what was recorded.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::packet::{TcpPacket, decode_frame};

/// Payload bytes kept per packet; enough to recognise protocols and find test markers.
pub const PAYLOAD_CAP: usize = 256;

/// How long the reader blocks before looking at the stop flag again.
const POLL: Duration = Duration::from_millis(20);

/// Upper bound on draining after a stop request, in case traffic never pauses.
const DRAIN_LIMIT: Duration = Duration::from_millis(500);

/// Large enough for GSO/GRO super-packets on veth (up to 64 KiB of IP plus headers).
const FRAME_BUF: usize = 65_536 + 256;

/// A packet capture running on a background thread; [`Capture::stop`] ends it.
pub struct Capture {
    interface: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<TcpPacket>>>,
}

impl Capture {
    /// Starts capturing on `interface` inside network namespace `netns`.
    ///
    /// The socket is bound before this returns, so every packet sent afterwards is seen.
    pub(crate) fn start(netns: &str, interface: &str) -> anyhow::Result<Capture> {
        let fd = crate::netns::run_in(netns, || open_packet_socket(interface))?
            .with_context(|| format!("cannot capture on {interface} in {netns}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let label = format!("{netns}/{interface}");
        let thread = std::thread::Builder::new()
            .name(format!("capture-{interface}"))
            .spawn(move || read_loop(&fd, &flag, &label))
            .context("cannot start the capture thread")?;
        Ok(Capture {
            interface: format!("{netns}/{interface}"),
            stop,
            thread: Some(thread),
        })
    }

    /// Stops capturing and returns what was seen.
    ///
    /// Packets already queued on the socket are still read, until it has been idle briefly.
    pub fn stop(mut self) -> CaptureReport {
        CaptureReport::from_packets(self.finish())
    }

    fn finish(&mut self) -> Vec<TcpPacket> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(packets)) => packets,
            Some(Err(_)) => {
                eprintln!("testbed: capture thread on {} panicked", self.interface);
                Vec::new()
            }
            None => Vec::new(),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.finish();
    }
}

/// An AF_PACKET socket bound to `interface` in the calling thread's network namespace.
fn open_packet_socket(interface: &str) -> io::Result<OwnedFd> {
    let name = std::ffi::CString::new(interface)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: `name` is NUL-terminated.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    // Protocol 0 receives nothing until bind, so no packet from another interface slips in.
    // SAFETY: plain socket(2) call.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    // A big buffer so bursts are not dropped while the reader is descheduled (2 cores).
    let rcvbuf: libc::c_int = 4 << 20;
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &rcvbuf)?;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: POLL.as_micros() as libc::suseconds_t,
    };
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;

    // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a valid sockaddr_ll and the length matches it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T and the length is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn read_loop(fd: &OwnedFd, stop: &AtomicBool, label: &str) -> Vec<TcpPacket> {
    let mut buf = vec![0u8; FRAME_BUF];
    let mut packets = Vec::new();
    let mut drain_deadline = None;
    loop {
        if stop.load(Ordering::Acquire) {
            let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN_LIMIT);
            if Instant::now() >= deadline {
                break;
            }
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // MSG_TRUNC makes the return value the frame's real length even when `buf` is shorter.
        // SAFETY: `buf` and `from` are valid for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
                (&raw mut from).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    // Idle after a stop request: everything queued has been read.
                    if drain_deadline.is_some() {
                        break;
                    }
                }
                io::ErrorKind::Interrupted => {}
                _ => {
                    eprintln!("testbed: capture on {label} failed: {err}");
                    break;
                }
            }
            continue;
        }
        let wire_len = n as usize;
        let frame = &buf[..wire_len.min(buf.len())];
        if let Some(mut packet) = decode_frame(frame, wire_len, PAYLOAD_CAP) {
            packet.outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
            packets.push(packet);
        }
    }
    packets
}

/// The TCP packets a [`Capture`] saw, in order.
#[derive(Clone, Debug, Default)]
pub struct CaptureReport {
    packets: Vec<TcpPacket>,
}

impl CaptureReport {
    /// A report over already-decoded packets (mostly for testing checks).
    pub fn from_packets(packets: Vec<TcpPacket>) -> CaptureReport {
        CaptureReport { packets }
    }

    /// Every TCP packet seen (IPv4 and IPv6), in capture order.
    pub fn packets(&self) -> &[TcpPacket] {
        &self.packets
    }

    /// The distinct `(source port, destination port)` pairs seen.
    pub fn tcp_ports(&self) -> BTreeSet<(u16, u16)> {
        self.packets
            .iter()
            .map(|p| (p.src.port(), p.dst.port()))
            .collect()
    }

    /// Ports that connections were opened to: destinations of SYNs without ACK.
    pub fn server_ports(&self) -> BTreeSet<u16> {
        self.packets
            .iter()
            .filter(|p| p.flags.syn() && !p.flags.ack())
            .map(|p| p.dst.port())
            .collect()
    }

    /// Whether `needle` occurs within the kept payload of some packet.
    ///
    /// Only the first [`PAYLOAD_CAP`] bytes of each packet are kept and packets are not
    /// reassembled, so keep needles short and near the start of a write.
    pub fn contains(&self, needle: &[u8]) -> bool {
        needle.is_empty()
            || self
                .packets
                .iter()
                .any(|p| p.payload.windows(needle.len()).any(|w| w == needle))
    }

    /// Checks that all TCP traffic is on `port` (as source or destination) and that each
    /// stream starts with a TLS record.
    ///
    /// A segment may start in the middle of a record, so only the first payload of each
    /// direction of each connection is checked: the segment right after the SYN (or the SYN
    /// itself if it carries data). Connections whose SYN was not captured are only checked for
    /// their port. The error lists the offending packets.
    pub fn tls_only_on(&self, port: u16) -> Result<(), String> {
        self.tls_only_on_ports(&[port])
    }

    /// As `tls_only_on`, allowing several ports (HBONE and the control plane's 15012).
    pub fn tls_only_on_ports(&self, ports: &[u16]) -> Result<(), String> {
        let mut problems = Vec::new();
        let wanted = match ports {
            [one] => one.to_string(),
            many => format!("one of {many:?}"),
        };
        for p in &self.packets {
            if !ports.contains(&p.src.port()) && !ports.contains(&p.dst.port()) {
                problems.push(format!("{p}: neither port is {wanted}"));
            }
        }

        type Direction = (SocketAddr, SocketAddr);
        let mut initial_seq: HashMap<Direction, u32> = HashMap::new();
        for p in self.packets.iter().filter(|p| p.flags.syn()) {
            initial_seq.entry((p.src, p.dst)).or_insert(p.seq);
        }
        let mut checked: HashSet<Direction> = HashSet::new();
        for p in self.packets.iter().filter(|p| p.payload_len > 0) {
            let dir = (p.src, p.dst);
            let Some(&isn) = initial_seq.get(&dir) else {
                continue;
            };
            let starts_stream = if p.flags.syn() {
                p.seq == isn
            } else {
                p.seq == isn.wrapping_add(1)
            };
            if !starts_stream || !checked.insert(dir) {
                continue;
            }
            if !looks_like_tls_record(&p.payload) {
                problems.push(format!(
                    "{p}: stream {} > {} does not start with a TLS record (first bytes {})",
                    p.src,
                    p.dst,
                    hex_prefix(&p.payload, 8)
                ));
            }
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} problem(s) with TLS-only traffic on port {wanted}:\n  {}",
                problems.len(),
                problems.join("\n  ")
            ))
        }
    }
}

/// A TLS record header: content type change_cipher_spec(20)..=application_data(23), then a
/// version whose major byte is 3 (SSL 3.0 up to TLS 1.3's legacy version).
fn looks_like_tls_record(payload: &[u8]) -> bool {
    match payload {
        [] => false,
        [content_type] => (0x14..=0x17).contains(content_type),
        [content_type, major, ..] => (0x14..=0x17).contains(content_type) && *major == 0x03,
    }
}

fn hex_prefix(bytes: &[u8], n: usize) -> String {
    bytes
        .iter()
        .take(n)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::TcpFlags;

    fn pkt(src: &str, dst: &str, seq: u32, flags: u8, payload: &[u8]) -> TcpPacket {
        TcpPacket {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            seq,
            ack: 0,
            flags: TcpFlags(flags),
            payload: payload.to_vec(),
            payload_len: payload.len(),
            outgoing: false,
        }
    }

    const C: &str = "10.244.1.10:40000";
    const S: &str = "10.244.2.10:15008";
    const CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x00, 0x10, 0x01];
    const SERVER_HELLO: &[u8] = &[0x16, 0x03, 0x03, 0x00, 0x40, 0x02];

    /// A handshake and a first payload in each direction, as a TLS connection looks.
    fn tls_flow() -> Vec<TcpPacket> {
        let (syn, ack) = (TcpFlags::SYN, TcpFlags::ACK);
        vec![
            pkt(C, S, 100, syn, b""),
            pkt(S, C, 500, syn | ack, b""),
            pkt(C, S, 101, ack, b""),
            pkt(C, S, 101, ack | TcpFlags::PSH, CLIENT_HELLO),
            pkt(S, C, 501, ack | TcpFlags::PSH, SERVER_HELLO),
            // Mid-record continuation: must not be checked.
            pkt(S, C, 507, ack, b"\x99\x98 random ciphertext"),
            pkt(C, S, 107, ack | TcpFlags::FIN, b""),
        ]
    }

    #[test]
    fn tls_flow_passes() {
        let report = CaptureReport::from_packets(tls_flow());
        assert_eq!(report.tls_only_on(15008), Ok(()));
        assert_eq!(report.server_ports(), BTreeSet::from([15008]));
        assert!(report.tcp_ports().contains(&(40000, 15008)));
        assert!(report.tcp_ports().contains(&(15008, 40000)));
    }

    #[test]
    fn plaintext_first_segment_fails() {
        let mut packets = tls_flow();
        packets[3] = pkt(C, S, 101, TcpFlags::ACK, b"GET / HTTP/1.1\r\n");
        let err = CaptureReport::from_packets(packets)
            .tls_only_on(15008)
            .unwrap_err();
        assert!(err.contains("does not start with a TLS record"), "{err}");
        assert!(err.contains("47 45 54"), "{err}");
        assert!(err.starts_with("1 problem"), "{err}");
    }

    #[test]
    fn other_port_fails() {
        let mut packets = tls_flow();
        packets.push(pkt(
            "10.244.1.10:40001",
            "10.244.2.10:8080",
            1,
            TcpFlags::SYN,
            b"",
        ));
        let err = CaptureReport::from_packets(packets)
            .tls_only_on(15008)
            .unwrap_err();
        assert!(err.contains("10.244.2.10:8080"), "{err}");
        assert!(err.contains("neither port is 15008"), "{err}");
    }

    #[test]
    fn flow_without_syn_only_checks_ports() {
        // Capture started mid-connection: the first payload seen may be mid-record.
        let packets = vec![pkt(C, S, 9999, TcpFlags::ACK, b"ciphertext tail")];
        assert_eq!(
            CaptureReport::from_packets(packets).tls_only_on(15008),
            Ok(())
        );
    }

    #[test]
    fn retransmitted_first_segment_reported_once() {
        let mut packets = tls_flow();
        packets[3] = pkt(C, S, 101, TcpFlags::ACK, b"plain");
        packets.insert(4, packets[3].clone());
        let err = CaptureReport::from_packets(packets)
            .tls_only_on(15008)
            .unwrap_err();
        assert!(err.starts_with("1 problem"), "{err}");
    }

    #[test]
    fn data_on_syn_is_checked() {
        let packets = vec![pkt(C, S, 100, TcpFlags::SYN, b"plain in SYN")];
        assert!(
            CaptureReport::from_packets(packets)
                .tls_only_on(15008)
                .is_err()
        );
    }

    #[test]
    fn sequence_wraps() {
        let packets = vec![
            pkt(C, S, u32::MAX, TcpFlags::SYN, b""),
            pkt(C, S, 0, TcpFlags::ACK, b"plain"),
        ];
        assert!(
            CaptureReport::from_packets(packets)
                .tls_only_on(15008)
                .is_err()
        );
    }

    #[test]
    fn record_shapes() {
        assert!(looks_like_tls_record(&[0x17, 0x03, 0x03]));
        assert!(looks_like_tls_record(&[0x14, 0x03]));
        assert!(looks_like_tls_record(&[0x15]));
        assert!(!looks_like_tls_record(&[]));
        assert!(!looks_like_tls_record(&[0x18, 0x03]));
        assert!(!looks_like_tls_record(&[0x16, 0x02]));
        assert!(!looks_like_tls_record(b"GET"));
    }

    #[test]
    fn contains_searches_payloads() {
        let report = CaptureReport::from_packets(tls_flow());
        assert!(report.contains(b"random"));
        assert!(report.contains(&[0x03, 0x00, 0x40]));
        assert!(report.contains(b""));
        assert!(!report.contains(b"absent"));
    }

    #[test]
    fn decoded_frames_feed_the_report() {
        let f = crate::packet::tests::frame(
            C.parse().unwrap(),
            S.parse().unwrap(),
            1,
            TcpFlags::ACK,
            b"needle",
            0,
        );
        let p = decode_frame(&f, f.len(), PAYLOAD_CAP).unwrap();
        assert!(CaptureReport::from_packets(vec![p]).contains(b"needle"));
    }
}
