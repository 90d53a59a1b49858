//! The DNS proxy's codec (`ztunnel::dns`): any datagram parses or is refused with a reason; a
//! parsed query re-encodes to one that parses the same; the answers, SERVFAIL and FORMERR
//! built for it are well-formed responses to it, within the requester's size limit.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ztunnel::dns::{
    self, HEADER_LEN, ParseError, Query, TYPE_A, TYPE_AAAA, answer, format_error, is_response_to,
    parse_query, server_failure, udp_limit,
};

use crate::engine::{Features, Target};

pub const TARGET: Target = Target {
    name: "dns",
    about: "DNS query parsing and the answers built for it (round trip)",
    seeds,
    dictionary: &[
        b"\x00\x01\x00\x01",
        b"\x00\x1c\x00\x01",
        b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00",
        b"\xc0\x0c",
        b"\x07example\x03com\x00",
        b"\x09cluster\x05local\x00",
        b"\x03svc",
        b"\x00\x01\x00\x00\x00\x00\x00\x01",
    ],
    max_len: 1024,
    run,
};

/// A query as a resolver sends it: header, one question, an OPT record when `edns` is set.
pub fn encode_query(
    id: u16,
    flags: u16,
    question: &[u8],
    edns: Option<u16>,
    extra_records: &[u8],
    extra_count: [u16; 3],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    let arcount = extra_count[2] + u16::from(edns.is_some());
    for c in [1, extra_count[0], extra_count[1], arcount] {
        out.extend_from_slice(&c.to_be_bytes());
    }
    out.extend_from_slice(question);
    out.extend_from_slice(extra_records);
    if let Some(size) = edns {
        out.extend_from_slice(&[0, 0, 41]);
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    out
}

fn question(name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

fn seeds() -> Vec<Vec<u8>> {
    vec![
        encode_query(
            0x1234,
            0x0100,
            &question("reviews.default.svc.cluster.local", TYPE_A),
            None,
            &[],
            [0; 3],
        ),
        encode_query(
            7,
            0x0100,
            &question("Productpage.Default", TYPE_AAAA),
            Some(4096),
            &[],
            [0; 3],
        ),
        encode_query(9, 0, &question("example.com", 16), Some(512), &[], [0; 3]),
        // An answer section record with a compressed owner before the OPT.
        encode_query(
            10,
            0x0100,
            &question("a.b", TYPE_A),
            Some(1232),
            &[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 1],
            [1, 0, 0],
        ),
    ]
}

/// Addresses for the answer, as many as the input's length picks (up to 80, so that the
/// truncation path runs too), both families.
fn addresses(n: usize) -> Vec<IpAddr> {
    (0..n % 81)
        .map(|i| {
            if i % 3 == 2 {
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16))
            } else {
                IpAddr::V4(Ipv4Addr::new(10, 96, (i / 256) as u8, i as u8))
            }
        })
        .collect()
}

fn run(data: &[u8], f: &mut Features) {
    let query = match parse_query(data) {
        Ok(q) => q,
        Err(e) => {
            f.add(("error", e.to_string()));
            check_format_error(data, &e);
            return;
        }
    };
    f.add((
        "query",
        query.opcode,
        ztunnel::dns::type_label(query.qtype).starts_with("type"),
        query.qtype == TYPE_A || query.qtype == TYPE_AAAA,
        query.qclass == 1,
        query.name.is_some(),
        query.edns_udp_size.map(|s| s.min(2048) / 256),
        query.question.len() / 32,
    ));
    if let Some(name) = &query.name {
        assert!(
            !name.bytes().any(|b| b.is_ascii_uppercase()),
            "a parsed name is lower case: {name:?}"
        );
        let _ = dns::candidates(name, "default");
    }
    assert_eq!(
        &data[HEADER_LEN..HEADER_LEN + query.question.len()],
        query.question
    );

    // Round trip: the query as we understood it, encoded again, parses the same.
    let flags = (u16::from(query.opcode) << 11) | if query.recursion_desired { 0x0100 } else { 0 };
    let again = encode_query(
        query.id,
        flags,
        query.question,
        query.edns_udp_size,
        &[],
        [0; 3],
    );
    let reparsed = parse_query(&again).expect("a re-encoded query parses");
    assert_eq!(reparsed, query, "decode, encode, decode differ");

    let limit = udp_limit(&query);
    assert!((512..=1232).contains(&limit));
    let addrs = addresses(data.len());
    let reply = answer(&query, &addrs, limit);
    assert!(
        reply.len() <= limit,
        "answer of {} bytes over the limit {limit}",
        reply.len()
    );
    let answered = check_response(&reply, &query, Some(&addrs));
    f.add(("answered", answered == addrs.len(), !addrs.is_empty()));
    check_response(&server_failure(&query), &query, None);
    assert_eq!(
        parse_query(&reply),
        Err(ParseError::NotAQuery),
        "a response is never taken for a query"
    );
}

/// A FORMERR exists exactly for messages with a header that are queries.
fn check_format_error(data: &[u8], e: &ParseError) {
    let reply = format_error(data);
    match e {
        ParseError::NoHeader | ParseError::NotAQuery => assert!(reply.is_none()),
        ParseError::Malformed(_) => {
            let reply = reply.expect("a malformed query gets FORMERR");
            assert_eq!(reply.len(), HEADER_LEN);
            assert!(is_response_to(
                &reply,
                u16::from_be_bytes([data[0], data[1]])
            ));
            assert_eq!(reply[3] & 0x0f, 1, "rcode FORMERR");
        }
    }
}

/// Reads a response to `q` field by field; with `addrs`, its records must be exactly those
/// addresses (or none, with TC set). Returns the number of answer records.
fn check_response(msg: &[u8], q: &Query<'_>, addrs: Option<&[IpAddr]>) -> usize {
    let u16_at = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]);
    assert!(msg.len() >= HEADER_LEN);
    assert!(is_response_to(msg, q.id), "response carries the query's id");
    let flags = u16_at(2);
    assert_eq!((flags >> 11) & 0xf, u16::from(q.opcode));
    assert_eq!(flags & 0x0100 != 0, q.recursion_desired);
    assert_eq!(u16_at(4), 1, "one question");
    let question_end = HEADER_LEN + q.question.len();
    assert_eq!(&msg[HEADER_LEN..question_end], q.question);
    let ancount = usize::from(u16_at(6));
    let mut pos = question_end;
    let Some(addrs) = addrs else {
        assert_eq!(ancount, 0);
        assert_eq!(msg.len(), question_end);
        return 0;
    };
    let truncated = flags & 0x0200 != 0;
    assert!(ancount == addrs.len() || (truncated && ancount == 0));
    for ip in &addrs[..ancount] {
        assert_eq!(
            &msg[pos..pos + 2],
            &[0xc0, 12],
            "owner points at the question"
        );
        let (rtype, data) = match ip {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        assert_eq!(u16_at(pos + 2), rtype);
        assert_eq!(usize::from(u16_at(pos + 10)), data.len());
        assert_eq!(&msg[pos + 12..pos + 12 + data.len()], &data[..]);
        pos += 12 + data.len();
    }
    let opt = if q.edns_udp_size.is_some() { 11 } else { 0 };
    assert_eq!(
        u16_at(10),
        u16::from(opt != 0),
        "OPT record iff the query had one"
    );
    assert_eq!(msg.len(), pos + opt, "nothing after the records");
    ancount
}
