//! DNS for the in-pod DNS proxy, without sockets: reading a query, the table of mesh service
//! hostnames (with the short forms a pod's search path produces), deciding whether to answer
//! locally or forward, and encoding answers and errors. The sockets are in [`proxy`].
//!
//! A small codec of our own rather than `hickory-proto`: the proxy only reads one question and
//! the EDNS payload size, writes A/AAAA answers, and relays everything else upstream as opaque
//! bytes (ID included), so a full message model would bring a large dependency tree (and binary
//! size, against the idle-memory target) for what is a few hundred lines of RFC 1035 parsing,
//! bounds-checked everywhere and covered by the unit tests below.

pub mod proxy;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use mesh::state::State;

/// A DNS header is 12 bytes (RFC 1035 4.1.1).
pub const HEADER_LEN: usize = 12;
pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
const OPCODE_QUERY: u8 = 0;
/// Largest UDP response to a requester without EDNS (RFC 1035 4.2.1).
pub const PLAIN_UDP_MAX: usize = 512;
/// The UDP payload size we advertise and use at most: the 2020 DNS flag day value, which keeps
/// responses below common MTUs (no IP fragmentation).
pub const EDNS_UDP_MAX: u16 = 1232;
/// Largest DNS message over TCP (2-byte length prefix).
pub const TCP_MAX: usize = 65535;
/// TTL of local answers: short, so a changed VIP reaches clients soon (Istio uses 30 s too).
pub const ANSWER_TTL: u32 = 30;
/// The cluster's DNS domain, which Kubernetes service hostnames end with.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Longest name on the wire (RFC 1035 2.3.4).
const MAX_NAME_WIRE: usize = 255;

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;

/// Response codes the proxy sends itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
}

/// A query as the proxy needs it; `question` borrows from the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query<'a> {
    pub id: u16,
    pub opcode: u8,
    pub recursion_desired: bool,
    /// The name in lower case without the final dot; `None` when a label holds a byte no
    /// hostname has (a dot, a space, non-ASCII), so it cannot be a mesh name.
    pub name: Option<String>,
    pub qtype: u16,
    pub qclass: u16,
    /// The question as sent (name, type, class): copied into answers, so the requester's
    /// letter case survives (resolvers that randomise it check it).
    pub question: &'a [u8],
    /// The requester's EDNS UDP payload size, when it sent an OPT record.
    pub edns_udp_size: Option<u16>,
}

/// Why a message is not a query the proxy can work with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than a header: there is no ID to reply to, so it is dropped.
    NoHeader,
    /// The QR bit is set: a response, which is never answered (that could loop).
    NotAQuery,
    /// A header, but the rest is not a valid query: answered with FORMERR.
    Malformed(&'static str),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::NoHeader => write!(f, "shorter than a DNS header"),
            ParseError::NotAQuery => write!(f, "a response, not a query"),
            ParseError::Malformed(why) => write!(f, "malformed query: {why}"),
        }
    }
}

fn u16_at(msg: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]))
}

/// Read the name at `pos`. In the question no compression pointer is allowed (there is nothing
/// before it to point to); elsewhere a pointer ends the name and is not followed (the proxy
/// only skips those records). Returns the end of the name and its text, if it is plain.
fn read_name(
    msg: &[u8],
    mut pos: usize,
    pointers: bool,
) -> Result<(usize, Option<String>), ParseError> {
    let start = pos;
    let mut text = String::new();
    let mut plain = true;
    loop {
        let len = *msg
            .get(pos)
            .ok_or(ParseError::Malformed("name runs past the end"))? as usize;
        if len == 0 {
            pos += 1;
            break;
        }
        match len & 0xc0 {
            0xc0 if pointers => {
                if pos + 2 > msg.len() {
                    return Err(ParseError::Malformed("name runs past the end"));
                }
                return Ok((pos + 2, None));
            }
            0x00 => {}
            0xc0 => return Err(ParseError::Malformed("compression pointer in the question")),
            _ => return Err(ParseError::Malformed("unknown label type")),
        }
        let label = msg
            .get(pos + 1..pos + 1 + len)
            .ok_or(ParseError::Malformed("label runs past the end"))?;
        if !text.is_empty() {
            text.push('.');
        }
        for &b in label {
            if b == b'.' || !b.is_ascii_graphic() {
                plain = false;
            }
            text.push(char::from(b.to_ascii_lowercase()));
        }
        pos += 1 + len;
        if pos - start > MAX_NAME_WIRE {
            return Err(ParseError::Malformed("name longer than 255 bytes"));
        }
    }
    Ok((pos, plain.then_some(text)))
}

/// Parse a query: the header, exactly one question, and any records after it (only to find an
/// EDNS OPT record). Bytes after the last record are ignored.
pub fn parse_query(msg: &[u8]) -> Result<Query<'_>, ParseError> {
    if msg.len() < HEADER_LEN {
        return Err(ParseError::NoHeader);
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    if flags & FLAG_QR != 0 {
        return Err(ParseError::NotAQuery);
    }
    let count = |i: usize| u16::from_be_bytes([msg[4 + 2 * i], msg[5 + 2 * i]]);
    let (qdcount, ancount, nscount, arcount) = (count(0), count(1), count(2), count(3));
    if qdcount != 1 {
        return Err(ParseError::Malformed("not exactly one question"));
    }
    let (name_end, name) = read_name(msg, HEADER_LEN, false)?;
    let qtype = u16_at(msg, name_end).ok_or(ParseError::Malformed("question cut short"))?;
    let qclass = u16_at(msg, name_end + 2).ok_or(ParseError::Malformed("question cut short"))?;
    let question = &msg[HEADER_LEN..name_end + 4];
    let mut pos = name_end + 4;
    let mut edns_udp_size = None;
    let records = u32::from(ancount) + u32::from(nscount) + u32::from(arcount);
    for i in 0..records {
        let (end, _) = read_name(msg, pos, true)?;
        let rtype = u16_at(msg, end).ok_or(ParseError::Malformed("record cut short"))?;
        let rclass = u16_at(msg, end + 2).ok_or(ParseError::Malformed("record cut short"))?;
        let rdlen = u16_at(msg, end + 8).ok_or(ParseError::Malformed("record cut short"))? as usize;
        let next = end + 10 + rdlen;
        if next > msg.len() {
            return Err(ParseError::Malformed("record data runs past the end"));
        }
        let additional = i >= u32::from(ancount) + u32::from(nscount);
        if rtype == TYPE_OPT {
            // RFC 6891 6.1.1: one OPT, owned by the root, in the additional section.
            if !additional || end != pos + 1 || edns_udp_size.is_some() {
                return Err(ParseError::Malformed("misplaced or repeated OPT record"));
            }
            edns_udp_size = Some(rclass);
        }
        pos = next;
    }
    Ok(Query {
        id,
        opcode: ((flags >> 11) & 0xf) as u8,
        recursion_desired: flags & FLAG_RD != 0,
        name,
        qtype,
        qclass,
        question,
        edns_udp_size,
    })
}

/// The largest UDP response this requester takes: 512 bytes, or its EDNS size up to ours.
pub fn udp_limit(q: &Query<'_>) -> usize {
    match q.edns_udp_size {
        Some(n) => usize::from(n.clamp(PLAIN_UDP_MAX as u16, EDNS_UDP_MAX)),
        None => PLAIN_UDP_MAX,
    }
}

/// The mesh's service hostnames and their VIPs, built from one state snapshot.
#[derive(Debug, Default)]
pub struct NameTable {
    hosts: HashMap<String, Vec<IpAddr>>,
}

/// A hostname as the table keys it: lower case, no final dot.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl NameTable {
    /// Every service with at least one VIP; headless services (no VIP) are left to the
    /// cluster's DNS, which knows their endpoints. Services sharing a hostname (in different
    /// namespaces) pool their VIPs.
    pub fn from_state(state: &State) -> NameTable {
        let mut hosts: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for s in state.services() {
            if s.addresses.is_empty() || s.hostname.is_empty() {
                continue;
            }
            let vips = hosts.entry(normalize(&s.hostname)).or_default();
            for ip in &s.addresses {
                let ip = ip.to_canonical();
                if !vips.contains(&ip) {
                    vips.push(ip);
                }
            }
        }
        NameTable { hosts }
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The VIPs of `name` (lower case, no final dot) as a pod in `pod_namespace` means it:
    /// the full hostname, or a short form its search path would complete.
    pub fn lookup(&self, name: &str, pod_namespace: &str) -> Option<&[IpAddr]> {
        candidates(name, pod_namespace)
            .into_iter()
            .find_map(|n| self.hosts.get(&n))
            .map(Vec::as_slice)
    }
}

/// The hostnames `name` can stand for, most literal first, as Kubernetes' search path
/// (`<ns>.svc.cluster.local svc.cluster.local cluster.local`) completes them:
/// `reviews` → `reviews.<pod ns>.svc.cluster.local`, `reviews.bookinfo` and
/// `reviews.bookinfo.svc` → `reviews.bookinfo.svc.cluster.local`.
pub fn candidates(name: &str, pod_namespace: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    let labels: Vec<&str> = name.split('.').collect();
    if labels.iter().any(|l| l.is_empty()) {
        return out;
    }
    match labels.as_slice() {
        [_] if !pod_namespace.is_empty() => {
            out.push(format!("{name}.{pod_namespace}.svc.{CLUSTER_DOMAIN}"));
        }
        [_, _] => out.push(format!("{name}.svc.{CLUSTER_DOMAIN}")),
        [_, _, "svc"] => out.push(format!("{name}.{CLUSTER_DOMAIN}")),
        _ => {}
    }
    out
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A mesh name: answer here with these addresses (empty: the name exists, but has no
    /// address of the asked family).
    Answer(Vec<IpAddr>),
    /// Not ours: relay the query unchanged to the upstream resolvers.
    Forward,
}

/// A/AAAA (class IN, standard query) for a mesh hostname is answered with the service's VIPs
/// of that family; everything else goes upstream.
pub fn decide(q: &Query<'_>, table: &NameTable, pod_namespace: &str) -> Decision {
    if q.opcode != OPCODE_QUERY || q.qclass != CLASS_IN || !matches!(q.qtype, TYPE_A | TYPE_AAAA) {
        return Decision::Forward;
    }
    let Some(name) = &q.name else {
        return Decision::Forward;
    };
    match table.lookup(name, pod_namespace) {
        Some(vips) => Decision::Answer(
            vips.iter()
                .copied()
                .filter(|ip| ip.is_ipv4() == (q.qtype == TYPE_A))
                .collect(),
        ),
        None => Decision::Forward,
    }
}

fn header(id: u16, flags: u16, counts: [u16; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    for c in counts {
        out.extend_from_slice(&c.to_be_bytes());
    }
    out
}

/// Our OPT record: root owner, our UDP payload size, no extended flags or options.
fn opt_record() -> [u8; 11] {
    let size = EDNS_UDP_MAX.to_be_bytes();
    [0, 0, 41, size[0], size[1], 0, 0, 0, 0, 0, 0]
}

fn response_flags(q: &Query<'_>, rcode: Rcode) -> u16 {
    let mut flags = FLAG_QR | FLAG_RA | (u16::from(q.opcode) << 11) | rcode as u16;
    if q.recursion_desired {
        flags |= FLAG_RD;
    }
    flags
}

/// An authoritative answer with `addrs`, at most `limit` bytes: when the records do not fit
/// (UDP), they are left out and TC is set, so the client asks again over TCP.
pub fn answer(q: &Query<'_>, addrs: &[IpAddr], limit: usize) -> Vec<u8> {
    let edns = q.edns_udp_size.is_some();
    let opt_len = if edns { 11 } else { 0 };
    let record_len = |ip: &IpAddr| 12 + if ip.is_ipv4() { 4 } else { 16 };
    let full =
        HEADER_LEN + q.question.len() + addrs.iter().map(record_len).sum::<usize>() + opt_len;
    let fits = full <= limit;
    let mut flags = response_flags(q, Rcode::NoError) | FLAG_AA;
    if !fits {
        flags |= FLAG_TC;
    }
    let ancount = if fits { addrs.len() as u16 } else { 0 };
    let mut out = header(q.id, flags, [1, ancount, 0, u16::from(edns)]);
    out.extend_from_slice(q.question);
    if fits {
        for ip in addrs {
            // The owner is a pointer to the question's name, right after the header.
            out.extend_from_slice(&[0xc0, HEADER_LEN as u8]);
            let (rtype, data): (u16, Vec<u8>) = match ip {
                IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
                IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
            };
            out.extend_from_slice(&rtype.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&ANSWER_TTL.to_be_bytes());
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(&data);
        }
    }
    if edns {
        out.extend_from_slice(&opt_record());
    }
    out
}

/// SERVFAIL for a query that could not be forwarded, with its question.
pub fn server_failure(q: &Query<'_>) -> Vec<u8> {
    let mut out = header(q.id, response_flags(q, Rcode::ServFail), [1, 0, 0, 0]);
    out.extend_from_slice(q.question);
    out
}

/// FORMERR for a message with a header but no valid query: the header alone, with the ID,
/// opcode and RD of the request.
pub fn format_error(msg: &[u8]) -> Option<Vec<u8>> {
    let id = u16_at(msg, 0)?;
    let flags = u16_at(msg, 2)?;
    if msg.len() < HEADER_LEN || flags & FLAG_QR != 0 {
        return None;
    }
    let keep = flags & (0x7800 | FLAG_RD);
    Some(header(
        id,
        FLAG_QR | FLAG_RA | keep | Rcode::FormErr as u16,
        [0; 4],
    ))
}

/// The ID of a DNS message, if it has a header.
pub fn message_id(msg: &[u8]) -> Option<u16> {
    (msg.len() >= HEADER_LEN).then(|| u16::from_be_bytes([msg[0], msg[1]]))
}

/// Whether `msg` is a response (QR set) to the query with `id`.
pub fn is_response_to(msg: &[u8], id: u16) -> bool {
    message_id(msg) == Some(id) && msg[2] & 0x80 != 0
}

/// The query type as Istio's `request_query_type` label spells it.
pub fn type_label(qtype: u16) -> String {
    match qtype {
        1 => "a".into(),
        2 => "ns".into(),
        5 => "cname".into(),
        6 => "soa".into(),
        12 => "ptr".into(),
        15 => "mx".into(),
        16 => "txt".into(),
        28 => "aaaa".into(),
        33 => "srv".into(),
        64 => "svcb".into(),
        65 => "https".into(),
        255 => "any".into(),
        n => format!("type{n}"),
    }
}

/// The nameservers of a resolv.conf (`nameserver <ip>` lines), on port 53; IPv6 zone suffixes
/// (`%eth0`) are not supported and such lines are skipped.
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh::state::Service;

    /// A query as a stub resolver builds it: ID, RD, one question, optionally EDNS.
    fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut m = header(id, FLAG_RD, [1, 0, 0, u16::from(edns.is_some())]);
        for label in name.split('.').filter(|l| !l.is_empty()) {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        if let Some(size) = edns {
            m.extend_from_slice(&[0, 0, 41]);
            m.extend_from_slice(&size.to_be_bytes());
            m.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        m
    }

    fn service(ns: &str, name: &str, vips: &[&str]) -> Service {
        Service {
            name: name.into(),
            namespace: ns.into(),
            hostname: format!("{name}.{ns}.svc.cluster.local"),
            addresses: vips.iter().map(|v| v.parse().unwrap()).collect(),
            ..Service::default()
        }
    }

    fn table() -> NameTable {
        let state = State::new(
            vec![],
            vec![
                service("bookinfo", "reviews", &["10.96.0.20", "fd00:96::20"]),
                service("bookinfo", "ratings", &["10.96.0.21"]),
                service("other", "reviews", &["10.96.1.20"]),
                service("bookinfo", "headless", &[]),
            ],
            vec![],
        )
        .unwrap();
        NameTable::from_state(&state)
    }

    /// The records of an answer: (type, TTL, data), after checking the header and question.
    fn answers(resp: &[u8], q: &[u8]) -> Vec<(u16, u32, Vec<u8>)> {
        assert_eq!(resp[..2], q[..2], "ID preserved");
        assert!(resp[2] & 0x80 != 0, "QR set");
        let question_end = read_name(q, HEADER_LEN, false).unwrap().0 + 4;
        assert_eq!(
            resp[HEADER_LEN..question_end],
            q[HEADER_LEN..question_end],
            "question copied"
        );
        let ancount = u16_at(resp, 6).unwrap();
        let mut pos = question_end;
        let mut out = vec![];
        for _ in 0..ancount {
            assert_eq!(
                resp[pos..pos + 2],
                [0xc0, 12],
                "owner points at the question"
            );
            let rtype = u16_at(resp, pos + 2).unwrap();
            let ttl = u32::from_be_bytes(resp[pos + 6..pos + 10].try_into().unwrap());
            let len = u16_at(resp, pos + 10).unwrap() as usize;
            out.push((rtype, ttl, resp[pos + 12..pos + 12 + len].to_vec()));
            pos += 12 + len;
        }
        out
    }

    #[test]
    fn parses_a_stub_query() {
        let m = query(0xbeef, "Reviews.Bookinfo.svc.cluster.local", TYPE_A, None);
        let q = parse_query(&m).unwrap();
        assert_eq!(q.id, 0xbeef);
        assert_eq!(q.opcode, 0);
        assert!(q.recursion_desired);
        assert_eq!(
            q.name.as_deref(),
            Some("reviews.bookinfo.svc.cluster.local")
        );
        assert_eq!((q.qtype, q.qclass), (TYPE_A, CLASS_IN));
        assert_eq!(q.edns_udp_size, None);
        assert_eq!(udp_limit(&q), 512);
        let m = query(1, "x", TYPE_AAAA, Some(4096));
        let q = parse_query(&m).unwrap();
        assert_eq!(q.edns_udp_size, Some(4096));
        assert_eq!(udp_limit(&q), usize::from(EDNS_UDP_MAX));
        let m = query(1, "", 2, None);
        let root = parse_query(&m).unwrap();
        assert_eq!(root.name.as_deref(), Some(""));
    }

    #[test]
    fn full_names_and_search_path_short_forms_resolve() {
        let t = table();
        let v4 = |s: &str| -> IpAddr { s.parse().unwrap() };
        for name in [
            "reviews.bookinfo.svc.cluster.local",
            "reviews.bookinfo.svc",
            "reviews.bookinfo",
        ] {
            let got = t.lookup(name, "default").unwrap();
            assert!(got.contains(&v4("10.96.0.20")), "{name}: {got:?}");
        }
        // A bare name is completed with the pod's own namespace.
        assert_eq!(
            t.lookup("reviews", "bookinfo").unwrap()[0],
            v4("10.96.0.20")
        );
        assert_eq!(t.lookup("reviews", "other").unwrap(), [v4("10.96.1.20")]);
        assert!(t.lookup("reviews", "default").is_none());
        assert!(
            t.lookup("ratings.bookinfo.svc.cluster", "bookinfo")
                .is_none()
        );
        assert!(t.lookup("example.com", "bookinfo").is_none());
        // No VIP: the cluster's DNS answers for headless services.
        assert!(t.lookup("headless.bookinfo", "bookinfo").is_none());
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn a_and_aaaa_answers_carry_the_vips_of_that_family() {
        let t = table();
        let m = query(7, "REVIEWS.bookinfo", TYPE_A, None);
        let q = parse_query(&m).unwrap();
        let Decision::Answer(vips) = decide(&q, &t, "bookinfo") else {
            panic!("a mesh name is answered locally");
        };
        assert_eq!(vips, vec!["10.96.0.20".parse::<IpAddr>().unwrap()]);
        let resp = answer(&q, &vips, udp_limit(&q));
        assert_eq!(resp[3] & 0x0f, 0, "NOERROR");
        assert!(resp[2] & 0x04 != 0, "authoritative");
        assert!(resp[2] & 0x01 != 0, "RD copied");
        assert_eq!(
            answers(&resp, &m),
            vec![(TYPE_A, ANSWER_TTL, vec![10, 96, 0, 20])]
        );

        let m = query(
            8,
            "reviews.bookinfo.svc.cluster.local",
            TYPE_AAAA,
            Some(1232),
        );
        let q = parse_query(&m).unwrap();
        let Decision::Answer(vips) = decide(&q, &t, "default") else {
            panic!("AAAA of a mesh name is answered locally");
        };
        let resp = answer(&q, &vips, udp_limit(&q));
        let recs = answers(&resp, &m);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].0, TYPE_AAAA);
        assert_eq!(
            recs[0].2,
            "fd00:96::20"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(
            u16_at(&resp, 10),
            Some(1),
            "OPT record in the answer to an EDNS query"
        );
        assert_eq!(resp[resp.len() - 11..][..3], [0, 0, 41]);

        // AAAA of a name with only IPv4 VIPs: the name exists, no data (not NXDOMAIN, and not
        // forwarded, where the cluster's DNS might say NXDOMAIN and fail the A lookup too).
        let m = query(9, "ratings.bookinfo", TYPE_AAAA, None);
        let q = parse_query(&m).unwrap();
        assert_eq!(decide(&q, &t, "x"), Decision::Answer(vec![]));
        let resp = answer(&q, &[], udp_limit(&q));
        assert_eq!(resp[3] & 0x0f, 0);
        assert!(answers(&resp, &m).is_empty());
    }

    #[test]
    fn unknown_names_and_other_types_are_forwarded() {
        let t = table();
        for (name, qtype) in [
            ("example.com", TYPE_A),
            ("reviews.default", TYPE_A),
            ("reviews.bookinfo.svc.cluster.local", 16),
            ("_http._tcp.reviews.bookinfo.svc.cluster.local", 33),
            ("headless.bookinfo.svc.cluster.local", TYPE_A),
        ] {
            let m = query(1, name, qtype, None);
            let q = parse_query(&m).unwrap();
            assert_eq!(decide(&q, &t, "default"), Decision::Forward, "{name}");
        }
        // Class CH (e.g. version.bind) and non-QUERY opcodes are not ours either.
        let mut m = query(1, "reviews.bookinfo", TYPE_A, None);
        let class_at = m.len() - 2;
        m[class_at..].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(
            decide(&parse_query(&m).unwrap(), &t, "x"),
            Decision::Forward
        );
        let mut m = query(1, "reviews.bookinfo", TYPE_A, None);
        m[2] |= 4 << 3; // NOTIFY
        assert_eq!(
            decide(&parse_query(&m).unwrap(), &t, "x"),
            Decision::Forward
        );
        // A label with a dot in it is not a hostname.
        let mut m = header(1, 0, [1, 0, 0, 0]);
        m.extend_from_slice(b"\x10reviews.bookinfo\x00\x00\x01\x00\x01");
        let q = parse_query(&m).unwrap();
        assert_eq!(q.name, None);
        assert_eq!(decide(&q, &t, "x"), Decision::Forward);
    }

    #[test]
    fn too_many_addresses_for_udp_set_the_truncation_bit() {
        let vips: Vec<IpAddr> = (1..=40u8).map(|i| IpAddr::from([10, 96, 1, i])).collect();
        let m = query(3, "many.demo.svc.cluster.local", TYPE_A, None);
        let q = parse_query(&m).unwrap();
        // 40 records of 16 bytes do not fit in 512: header and question only, TC set.
        let udp = answer(&q, &vips, udp_limit(&q));
        assert!(udp.len() <= PLAIN_UDP_MAX);
        assert!(udp[2] & 0x02 != 0, "TC set");
        assert_eq!(u16_at(&udp, 6), Some(0));
        // Over TCP the same answer is whole.
        let tcp = answer(&q, &vips, TCP_MAX);
        assert!(tcp[2] & 0x02 == 0);
        assert_eq!(answers(&tcp, &m).len(), 40);
        // With EDNS 1232 they fit in UDP.
        let m = query(3, "many.demo.svc.cluster.local", TYPE_A, Some(1232));
        let q = parse_query(&m).unwrap();
        let udp = answer(&q, &vips, udp_limit(&q));
        assert!(udp[2] & 0x02 == 0 && udp.len() <= 1232);
        assert_eq!(answers(&udp, &m).len(), 40);
    }

    #[test]
    fn malformed_queries_get_formerr_not_a_panic() {
        let good = query(0x1234, "reviews.bookinfo", TYPE_A, Some(1232));
        // Every truncation of a valid query, and every single-byte corruption, parses or fails
        // cleanly; a failure with a header is answered FORMERR with the ID.
        for cut in 0..good.len() {
            match parse_query(&good[..cut]) {
                Ok(_) => panic!("cut at {cut} parsed"),
                Err(ParseError::NoHeader) => assert!(cut < HEADER_LEN),
                Err(ParseError::Malformed(_)) => {
                    let resp = format_error(&good[..cut]).unwrap();
                    assert_eq!(resp.len(), HEADER_LEN);
                    assert_eq!(resp[..2], [0x12, 0x34]);
                    assert_eq!(resp[3] & 0x0f, Rcode::FormErr as u8);
                    assert!(resp[2] & 0x80 != 0);
                }
                Err(ParseError::NotAQuery) => panic!("cut at {cut}: not a query?"),
            }
        }
        for i in 0..good.len() {
            for b in [0x00, 0x3f, 0x40, 0x80, 0xc0, 0xff] {
                let mut m = good.clone();
                m[i] = b;
                let _ = parse_query(&m);
            }
        }
        let cases: [(&str, Vec<u8>); 5] = [
            ("no question", header(1, 0, [0, 0, 0, 0])),
            ("two questions", {
                let mut m = query(1, "a", TYPE_A, None);
                m[5] = 2;
                m
            }),
            ("pointer in question", {
                let mut m = header(1, 0, [1, 0, 0, 0]);
                m.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
                m
            }),
            ("name too long", {
                let mut m = header(1, 0, [1, 0, 0, 0]);
                for _ in 0..5 {
                    m.push(63);
                    m.extend_from_slice(&[b'a'; 63]);
                }
                m.extend_from_slice(&[0, 0, 1, 0, 1]);
                m
            }),
            ("record count beyond the data", {
                let mut m = query(1, "a", TYPE_A, None);
                m[11] = 3;
                m
            }),
        ];
        for (what, m) in cases {
            assert!(
                matches!(parse_query(&m), Err(ParseError::Malformed(_))),
                "{what}: {:?}",
                parse_query(&m)
            );
            assert_eq!(format_error(&m).unwrap()[3] & 0x0f, 1, "{what}");
        }
        // A response is never answered; a runt has no ID to answer.
        let mut resp = good.clone();
        resp[2] |= 0x80;
        assert_eq!(parse_query(&resp), Err(ParseError::NotAQuery));
        assert_eq!(format_error(&resp), None);
        assert_eq!(format_error(&good[..5]), None);
    }

    #[test]
    fn servfail_keeps_id_and_question() {
        let m = query(42, "example.com", TYPE_A, None);
        let q = parse_query(&m).unwrap();
        let resp = server_failure(&q);
        assert_eq!(resp[3] & 0x0f, Rcode::ServFail as u8);
        assert!(answers(&resp, &m).is_empty());
        assert!(is_response_to(&resp, 42));
        assert!(!is_response_to(&m, 42), "a query is not a response");
    }

    #[test]
    fn reads_nameservers_from_resolv_conf() {
        let text = "# generated\nsearch demo.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver  fd00::a \noptions ndots:5\nnameserver fe80::1%eth0\nnameserver bogus\n";
        assert_eq!(
            resolv_conf_nameservers(text),
            vec![
                "10.96.0.10:53".parse::<SocketAddr>().unwrap(),
                "[fd00::a]:53".parse().unwrap()
            ]
        );
        assert_eq!(type_label(TYPE_AAAA), "aaaa");
        assert_eq!(type_label(999), "type999");
    }
}
