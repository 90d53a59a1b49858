//! HBONE's CONNECT parsing (`mesh::hbone`): a request built from arbitrary method, authority
//! and headers is accepted or refused with 400 by the server's checks; an accepted one
//! re-encodes to a request that parses the same, never points at the proxy's own ports on
//! this pod, and its baggage parses to a fixed point.

use std::net::SocketAddr;

use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use mesh::hbone::server::{Options, validate};
use mesh::hbone::{Baggage, ConnectRequest, PROXY_PORTS};

use crate::engine::{Features, Target};

pub const TARGET: Target = Target {
    name: "hbone",
    about: "HBONE CONNECT requests: authority, forwarded, baggage, traceparent",
    seeds,
    dictionary: &[
        b"CONNECT",
        b"\x00forwarded\x00",
        b"\x00baggage\x00",
        b"\x00traceparent\x00",
        b"for=\"",
        b";host=",
        b"k8s.namespace.name=",
        b"k8s.deployment.name=",
        b"k8s..name=",
        b"service.name=",
        b"service.version=",
        b"k8s.cluster.name=",
        b"[::1]:",
        b"10.244.1.10:",
        b":15008",
        b":15001",
        b"%eth0",
    ],
    max_len: 2048,
    run,
};

/// Input layout: fields separated by NUL: method, authority, then header name/value pairs.
fn encode(method: &str, authority: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!("{method}\0{authority}");
    for (k, v) in headers {
        out.push('\0');
        out.push_str(k);
        out.push('\0');
        out.push_str(v);
    }
    out.into_bytes()
}

fn seeds() -> Vec<Vec<u8>> {
    vec![
        encode("CONNECT", "10.244.1.10:8080", &[]),
        encode(
            "CONNECT",
            "10.244.1.10:9080",
            &[
                (
                    "forwarded",
                    "for=\"10.244.2.7:41234\";host=reviews.default.svc.cluster.local",
                ),
                (
                    "baggage",
                    "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=reviews-v1,service.name=reviews,service.version=v1",
                ),
                (
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
            ],
        ),
        encode(
            "CONNECT",
            "[fd00::10]:80",
            &[("forwarded", "for=\"[fd00::7]:5000\"")],
        ),
        encode("GET", "10.244.1.10:80", &[]),
        encode("CONNECT", "10.244.1.10:15001", &[]),
    ]
}

/// The reasons `validate` gives, as features (the reason text also quotes the input).
const REFUSALS: [&str; 5] = [
    "expects CONNECT",
    "without :authority",
    "is not an ip:port",
    "is not this pod's address",
    "one of the proxy's own ports",
];

/// The pod this request arrives at.
const LOCAL: &str = "10.244.1.10:15008";

fn request(data: &[u8], f: &mut Features) -> Option<Request<()>> {
    let mut fields = data.split(|&b| b == 0);
    let method = Method::from_bytes(fields.next()?).ok()?;
    let authority = Uri::try_from(fields.next()?).ok()?;
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = authority;
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            f.add("invalid header");
            continue;
        };
        f.add(("header", name.as_str().len().min(16)));
        req.headers_mut().append(name, value);
    }
    Some(req)
}

fn run(data: &[u8], f: &mut Features) {
    let Some(req) = request(data, f) else {
        f.add("not a request");
        return;
    };
    let local: SocketAddr = LOCAL.parse().expect("constant");
    for strict in [true, false] {
        let options = Options {
            require_local_authority: strict,
        };
        match validate(&req, local, options) {
            Err(refusal) => {
                assert_eq!(refusal.status, StatusCode::BAD_REQUEST);
                assert!(!refusal.reason.is_empty());
                let why = REFUSALS.iter().position(|r| refusal.reason.contains(r));
                f.add(("refused", strict, why));
            }
            Ok(parsed) => {
                f.add((
                    "accepted",
                    strict,
                    parsed.authority.is_ipv4(),
                    parsed.forwarded_for.is_some(),
                    parsed.host.is_some(),
                    parsed.baggage.is_some(),
                ));
                check_accepted(&parsed, local, strict);
            }
        }
    }
}

fn check_accepted(parsed: &ConnectRequest, local: SocketAddr, strict: bool) {
    let local_ip = local.ip().to_canonical();
    let target = parsed.authority.ip().to_canonical();
    if strict {
        assert_eq!(target, local_ip, "strict mode only accepts this pod");
    }
    if target == local_ip {
        assert!(
            !PROXY_PORTS.contains(&parsed.authority.port()),
            "a CONNECT to the proxy's own port {} was accepted",
            parsed.authority.port()
        );
    }
    // What we forward (a waypoint re-sends it) must mean the same to the next hop.
    let again = ConnectRequest::from_http(&parsed.to_http()).expect("re-encoded request parses");
    assert_eq!(&again, parsed, "decode, encode, decode differ");
    if let Some(b) = &parsed.baggage {
        let once = Baggage::parse(b);
        assert_eq!(
            Baggage::parse(&once.encode()),
            once,
            "baggage parse, encode, parse differ"
        );
    }
}
