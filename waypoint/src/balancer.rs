//! Endpoint choice (Envoy's load balancers, as the Cluster's `lb_policy` says): round robin,
//! least request (power of two choices), random, ring hash and Maglev (consistent hashing on
//! the route's `hash_policy`), original destination; slow start (warm-up) weights, the panic
//! threshold, and the request hash itself (header, cookie with Envoy's generated cookie,
//! source IP, query parameter).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use envoy_types::pb::envoy::config::route::v3 as route_pb;
use http::HeaderMap;
use http::header::HeaderName;

/// Envoy's `lb_policy` (the ones the waypoint implements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    RoundRobin,
    /// Power of `choice_count` choices (Envoy's default 2), fewest active requests wins.
    LeastRequest {
        choice_count: u32,
    },
    Random,
    RingHash {
        minimum_ring_size: u64,
        maximum_ring_size: u64,
    },
    Maglev {
        table_size: u64,
    },
    /// ORIGINAL_DST / CLUSTER_PROVIDED: the address the client dialled.
    OriginalDst,
}

impl Policy {
    pub fn name(&self) -> &'static str {
        match self {
            Policy::RoundRobin => "ROUND_ROBIN",
            Policy::LeastRequest { .. } => "LEAST_REQUEST",
            Policy::Random => "RANDOM",
            Policy::RingHash { .. } => "RING_HASH",
            Policy::Maglev { .. } => "MAGLEV",
            Policy::OriginalDst => "CLUSTER_PROVIDED",
        }
    }
}

/// Envoy's slow start: a host added after the cluster was created gets
/// `max(min_weight, (age / window)^(1/aggression))` of its weight during `window`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    pub window: Duration,
    pub aggression: f64,
    /// 0–1.
    pub min_weight: f64,
}

impl SlowStart {
    /// The weight factor (0–1] of a host added at `added`.
    pub fn factor(&self, added: Instant, now: Instant) -> f64 {
        let age = now.saturating_duration_since(added);
        if age >= self.window || self.window.is_zero() {
            return 1.0;
        }
        let t = age.as_secs_f64() / self.window.as_secs_f64();
        t.powf(1.0 / self.aggression).max(self.min_weight)
    }
}

/// How a cluster balances, from its Cluster resource.
#[derive(Debug, Clone, PartialEq)]
pub struct LbConfig {
    pub policy: Policy,
    pub slow_start: Option<SlowStart>,
    /// `common_lb_config.healthy_panic_threshold` (percent) when given: below that share of
    /// usable hosts, every host is used. Absent: never (Envoy's default would be 50%).
    pub panic_threshold: Option<f64>,
}

impl Default for LbConfig {
    fn default() -> Self {
        LbConfig {
            policy: Policy::RoundRobin,
            slow_start: None,
            panic_threshold: None,
        }
    }
}

/// Envoy's maximum Maglev table size and default.
const MAGLEV_DEFAULT: u64 = 65537;
const MAGLEV_MAX: u64 = 5_000_011;
const RING_MIN_DEFAULT: u64 = 1024;
const RING_MAX_DEFAULT: u64 = 8 * 1024 * 1024;

fn slow_start(
    s: &Option<cluster_pb::cluster::SlowStartConfig>,
) -> Result<Option<SlowStart>, String> {
    let Some(s) = s else { return Ok(None) };
    let window = match &s.slow_start_window {
        Some(d) => crate::config::proto_duration(d)
            .map_err(|_| "slow_start_config.slow_start_window: negative")?,
        None => return Ok(None),
    };
    let aggression = s.aggression.as_ref().map_or(1.0, |a| a.default_value);
    if aggression.is_nan() || aggression <= 0.0 {
        return Err(format!(
            "slow_start_config.aggression: {aggression} must be above 0"
        ));
    }
    let min_weight = s.min_weight_percent.as_ref().map_or(10.0, |p| p.value);
    if !(0.0..=100.0).contains(&min_weight) {
        return Err(format!(
            "slow_start_config.min_weight_percent: {min_weight} is not a percentage"
        ));
    }
    Ok(Some(SlowStart {
        window,
        aggression,
        min_weight: min_weight / 100.0,
    }))
}

/// The balancing a Cluster resource asks for; other policies are refused.
pub fn lb_config(c: &cluster_pb::Cluster) -> Result<LbConfig, String> {
    use cluster_pb::cluster::{LbConfig as L, LbPolicy};
    let mut slow = None;
    let policy = match LbPolicy::try_from(c.lb_policy) {
        Ok(LbPolicy::RoundRobin) => {
            if let Some(L::RoundRobinLbConfig(r)) = &c.lb_config {
                slow = slow_start(&r.slow_start_config)?;
            }
            Policy::RoundRobin
        }
        Ok(LbPolicy::LeastRequest) => {
            let mut choice_count = 2;
            if let Some(L::LeastRequestLbConfig(l)) = &c.lb_config {
                slow = slow_start(&l.slow_start_config)?;
                if let Some(n) = &l.choice_count {
                    if n.value < 2 {
                        return Err("least_request_lb_config.choice_count: at least 2".into());
                    }
                    choice_count = n.value;
                }
            }
            Policy::LeastRequest { choice_count }
        }
        Ok(LbPolicy::Random) => Policy::Random,
        Ok(LbPolicy::RingHash) => {
            let (mut min, mut max) = (RING_MIN_DEFAULT, RING_MAX_DEFAULT);
            if let Some(L::RingHashLbConfig(r)) = &c.lb_config {
                if let Some(v) = &r.minimum_ring_size {
                    min = v.value;
                }
                if let Some(v) = &r.maximum_ring_size {
                    max = v.value;
                }
            }
            if min == 0 || min > max || max > RING_MAX_DEFAULT {
                return Err(format!(
                    "ring_hash_lb_config: ring sizes {min}..{max} are out of range (1..8388608)"
                ));
            }
            Policy::RingHash {
                minimum_ring_size: min,
                maximum_ring_size: max,
            }
        }
        Ok(LbPolicy::Maglev) => {
            let mut table_size = MAGLEV_DEFAULT;
            if let Some(L::MaglevLbConfig(m)) = &c.lb_config
                && let Some(v) = &m.table_size
            {
                table_size = v.value;
            }
            if table_size > MAGLEV_MAX || !is_prime(table_size) {
                return Err(format!(
                    "maglev_lb_config.table_size: {table_size} is not a prime up to {MAGLEV_MAX}"
                ));
            }
            Policy::Maglev { table_size }
        }
        Ok(LbPolicy::ClusterProvided) => Policy::OriginalDst,
        _ => return Err(format!("lb_policy: {} is not supported", c.lb_policy)),
    };
    let panic_threshold = c
        .common_lb_config
        .as_ref()
        .and_then(|l| l.healthy_panic_threshold.as_ref())
        .map(|p| p.value);
    if let Some(p) = panic_threshold
        && !(0.0..=100.0).contains(&p)
    {
        return Err(format!(
            "common_lb_config.healthy_panic_threshold: {p} is not a percentage"
        ));
    }
    Ok(LbConfig {
        policy,
        slow_start: slow,
        panic_threshold,
    })
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// A consistent-hash table, built once per endpoint set (sorted by address, so the same
/// endpoints give the same table whatever order EDS lists them in).
#[derive(Debug, Default)]
pub enum Table {
    #[default]
    None,
    /// (hash, endpoint index), sorted by hash.
    Ring(Vec<(u64, u32)>),
    /// Endpoint index per slot.
    Maglev(Vec<u32>),
}

/// Build the table for `addresses` (endpoint order; indexes refer to it).
pub fn table(policy: Policy, addresses: &[SocketAddr]) -> Table {
    if addresses.is_empty() {
        return Table::None;
    }
    let mut order: Vec<(String, u32)> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| (a.to_string(), i as u32))
        .collect();
    order.sort();
    match policy {
        Policy::RingHash {
            minimum_ring_size,
            maximum_ring_size,
        } => {
            // Envoy's sizing with equal weights: every host gets ceil(min / n) entries, the
            // ring capped at the maximum.
            let n = order.len() as u64;
            let per_host = minimum_ring_size
                .div_ceil(n)
                .min((maximum_ring_size / n).max(1));
            let mut ring = Vec::with_capacity((per_host * n) as usize);
            for (addr, i) in &order {
                for k in 0..per_host {
                    let key = format!("{addr}_{k}");
                    ring.push((xxhash64(key.as_bytes(), 0), *i));
                }
            }
            ring.sort_unstable();
            Table::Ring(ring)
        }
        Policy::Maglev { table_size } => {
            let m = table_size as usize;
            let prefs: Vec<(u64, u64)> = order
                .iter()
                .map(|(addr, _)| {
                    let offset = xxhash64(addr.as_bytes(), 0) % table_size;
                    let skip = xxhash64(addr.as_bytes(), 1) % (table_size - 1) + 1;
                    (offset, skip)
                })
                .collect();
            let mut next = vec![0u64; order.len()];
            let mut slots = vec![u32::MAX; m];
            let mut filled = 0;
            'fill: loop {
                for (h, (offset, skip)) in prefs.iter().enumerate() {
                    let mut c = ((offset + next[h] * skip) % table_size) as usize;
                    while slots[c] != u32::MAX {
                        next[h] += 1;
                        c = ((offset + next[h] * skip) % table_size) as usize;
                    }
                    slots[c] = order[h].1;
                    next[h] += 1;
                    filled += 1;
                    if filled == m {
                        break 'fill;
                    }
                }
            }
            Table::Maglev(slots)
        }
        _ => Table::None,
    }
}

impl Table {
    /// The endpoint indexes for `hash`, in preference order: the first is the owner, the
    /// following ones are where the key goes when the owner cannot be used (ejected,
    /// unhealthy, already tried), walking the ring / table forward.
    pub fn candidates(&self, hash: u64) -> impl Iterator<Item = u32> + '_ {
        let (len, start) = match self {
            Table::None => (0, 0),
            Table::Ring(r) => {
                let i = r.partition_point(|(h, _)| *h < hash);
                (r.len(), if i == r.len() { 0 } else { i })
            }
            Table::Maglev(t) => (t.len(), (hash % t.len() as u64) as usize),
        };
        (0..len).map(move |k| {
            let i = (start + k) % len;
            match self {
                Table::Ring(r) => r[i].1,
                Table::Maglev(t) => t[i],
                Table::None => 0,
            }
        })
    }
}

/// One item of the route's `hash_policy`.
#[derive(Debug, Clone, PartialEq)]
pub enum HashPolicy {
    Header(HeaderName, bool),
    Cookie {
        name: String,
        path: String,
        ttl: Option<Duration>,
        attributes: Vec<(String, String)>,
        terminal: bool,
    },
    SourceIp(bool),
    QueryParameter(String, bool),
}

impl HashPolicy {
    fn terminal(&self) -> bool {
        match self {
            HashPolicy::Header(_, t)
            | HashPolicy::SourceIp(t)
            | HashPolicy::QueryParameter(_, t) => *t,
            HashPolicy::Cookie { terminal, .. } => *terminal,
        }
    }
}

/// The route's `hash_policy` list; kinds the waypoint does not implement are refused.
pub fn hash_policies(
    list: &[route_pb::route_action::HashPolicy],
) -> Result<Vec<HashPolicy>, String> {
    use route_pb::route_action::hash_policy::PolicySpecifier as P;
    list.iter()
        .enumerate()
        .map(|(i, h)| {
            let at = format!("hash_policy[{i}]");
            Ok(match &h.policy_specifier {
                Some(P::Header(x)) => {
                    if x.regex_rewrite.is_some() {
                        return Err(format!("{at}.header.regex_rewrite: not supported"));
                    }
                    HashPolicy::Header(
                        HeaderName::from_bytes(x.header_name.to_ascii_lowercase().as_bytes())
                            .map_err(|_| format!("{at}.header.header_name: {:?} is not a header name", x.header_name))?,
                        h.terminal,
                    )
                }
                Some(P::Cookie(c)) => {
                    if c.name.is_empty() {
                        return Err(format!("{at}.cookie.name: required"));
                    }
                    let ttl = c
                        .ttl
                        .as_ref()
                        .map(crate::config::proto_duration)
                        .transpose()
                        .map_err(|_| format!("{at}.cookie.ttl: negative"))?;
                    HashPolicy::Cookie {
                        name: c.name.clone(),
                        path: c.path.clone(),
                        ttl,
                        attributes: c
                            .attributes
                            .iter()
                            .map(|a| (a.name.clone(), a.value.clone()))
                            .collect(),
                        terminal: h.terminal,
                    }
                }
                Some(P::ConnectionProperties(p)) if p.source_ip => HashPolicy::SourceIp(h.terminal),
                Some(P::QueryParameter(q)) if !q.name.is_empty() => {
                    HashPolicy::QueryParameter(q.name.clone(), h.terminal)
                }
                _ => return Err(format!("{at}: only header, cookie, connection_properties.source_ip and query_parameter are supported")),
            })
        })
        .collect()
}

/// A cookie Envoy would set on the response (a hash cookie the request did not carry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetCookie(pub String);

/// What the request hashes to (Envoy's combination: each value's xxHash64 folded in with a
/// one-bit rotation; a terminal policy that produced a value ends the list), and the cookie to
/// set when a cookie policy with a TTL found none. `connection` is the client and the local
/// address (Envoy hashes both to make the generated cookie's value).
pub fn request_hash(
    policies: &[HashPolicy],
    headers: &HeaderMap,
    query: Option<&str>,
    client: SocketAddr,
    local: SocketAddr,
) -> (Option<u64>, Option<SetCookie>) {
    let mut hash: Option<u64> = None;
    let mut set_cookie = None;
    for p in policies {
        let value: Option<u64> = match p {
            HashPolicy::Header(name, _) => {
                let values: Vec<&[u8]> =
                    headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
                match values.as_slice() {
                    [] => None,
                    [one] => Some(xxhash64(one, 0)),
                    // Envoy hashes several values of one header as one, sorted.
                    many => {
                        let mut sorted = many.to_vec();
                        sorted.sort();
                        Some(xxhash64(&sorted.concat(), 0))
                    }
                }
            }
            HashPolicy::Cookie {
                name,
                path,
                ttl,
                attributes,
                ..
            } => match cookie(headers, name) {
                Some(v) => Some(xxhash64(v.as_bytes(), 0)),
                None => ttl.map(|ttl| {
                    let seed = format!("{client}{local}");
                    let value = format!("{:016x}", xxhash64(seed.as_bytes(), 0));
                    set_cookie = Some(SetCookie(set_cookie_value(
                        name, &value, path, ttl, attributes,
                    )));
                    xxhash64(value.as_bytes(), 0)
                }),
            },
            HashPolicy::SourceIp(_) => Some(xxhash64(client.ip().to_string().as_bytes(), 0)),
            HashPolicy::QueryParameter(name, _) => query.and_then(|q| {
                q.split('&')
                    .find_map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (k == name).then_some(v)
                    })
                    .map(|v| xxhash64(v.as_bytes(), 0))
            }),
        };
        if let Some(v) = value {
            hash = Some(match hash {
                Some(h) => h.rotate_left(1) ^ v,
                None => v,
            });
            if p.terminal() {
                break;
            }
        }
    }
    (hash, set_cookie)
}

/// The value of cookie `name` in the request's `Cookie` headers (quotes removed, as Envoy).
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
}

/// Envoy's generated cookie: `name="value"`, `Max-Age` unless the TTL is 0 (a session
/// cookie), `Path` when given, the attributes, `HttpOnly`.
fn set_cookie_value(
    name: &str,
    value: &str,
    path: &str,
    ttl: Duration,
    attributes: &[(String, String)],
) -> String {
    let mut s = format!("{name}=\"{value}\"");
    if !ttl.is_zero() {
        s.push_str(&format!("; Max-Age={}", ttl.as_secs()));
    }
    if !path.is_empty() {
        s.push_str(&format!("; Path={path}"));
    }
    for (k, v) in attributes {
        if v.is_empty() {
            s.push_str(&format!("; {k}"));
        } else {
            s.push_str(&format!("; {k}={v}"));
        }
    }
    s.push_str("; HttpOnly");
    s
}

/// What a request brings to the choice of an endpoint. The retry loop passes the hosts it
/// already tried (Envoy's `previous_hosts` predicate); they are avoided while others remain.
#[derive(Debug, Default, Clone, Copy)]
pub struct PickContext<'a> {
    /// The request's hash (consistent-hash clusters only).
    pub hash: Option<u64>,
    pub tried: &'a [SocketAddr],
    /// The address the client dialled (ORIGINAL_DST clusters).
    pub original_dst: Option<SocketAddr>,
}

/// XXH64 (the hash Envoy uses for ring hash, Maglev and hash policies).
pub fn xxhash64(input: &[u8], seed: u64) -> u64 {
    const P1: u64 = 0x9E37_79B1_85EB_CA87;
    const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const P3: u64 = 0x1656_67B1_9E37_79F9;
    const P4: u64 = 0x85EB_CA77_C2B2_AE63;
    const P5: u64 = 0x27D4_EB2F_1656_67C5;
    fn round(acc: u64, input: u64) -> u64 {
        acc.wrapping_add(input.wrapping_mul(P2))
            .rotate_left(31)
            .wrapping_mul(P1)
    }
    fn merge(acc: u64, v: u64) -> u64 {
        (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4)
    }
    let read64 = |b: &[u8]| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let read32 = |b: &[u8]| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let len = input.len();
    let mut rest = input;
    let mut h = if len >= 32 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        while rest.len() >= 32 {
            for (i, v) in v.iter_mut().enumerate() {
                *v = round(*v, read64(&rest[i * 8..]));
            }
            rest = &rest[32..];
        }
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for x in v {
            h = merge(h, x);
        }
        h
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(len as u64);
    while rest.len() >= 8 {
        h = (h ^ round(0, read64(rest)))
            .rotate_left(27)
            .wrapping_mul(P1)
            .wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        h = (h ^ read32(rest).wrapping_mul(P1))
            .rotate_left(23)
            .wrapping_mul(P2)
            .wrapping_add(P3);
        rest = &rest[4..];
    }
    for b in rest {
        h = (h ^ u64::from(*b).wrapping_mul(P5))
            .rotate_left(11)
            .wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| format!("10.0.0.{}:8080", i + 1).parse().unwrap())
            .collect()
    }

    #[test]
    fn xxhash64_known_values() {
        assert_eq!(xxhash64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxhash64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxhash64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
        // Long input (the 32-byte stripes) is deterministic and seed-dependent.
        let long = [7u8; 100];
        assert_eq!(xxhash64(&long, 0), xxhash64(&long, 0));
        assert_ne!(xxhash64(&long, 0), xxhash64(&long, 1));
    }

    #[test]
    fn ring_is_stable_and_independent_of_endpoint_order() {
        let p = Policy::RingHash {
            minimum_ring_size: 1024,
            maximum_ring_size: RING_MAX_DEFAULT,
        };
        let a = addrs(3);
        let mut b = a.clone();
        b.reverse();
        let (ta, tb) = (table(p, &a), table(p, &b));
        let Table::Ring(r) = &ta else { panic!() };
        assert_eq!(r.len(), 3 * 342, "ceil(1024 / 3) entries per host");
        for key in 0..200u64 {
            let h = xxhash64(&key.to_le_bytes(), 0);
            let x = a[ta.candidates(h).next().unwrap() as usize];
            let y = b[tb.candidates(h).next().unwrap() as usize];
            assert_eq!(x, y, "same endpoints, same owner");
        }
        // Removing one host moves only the keys it owned.
        let fewer = table(p, &a[..2]);
        // (The ring is resized for two hosts, as Envoy's, so a few other keys move too.)
        let (mut moved, mut others_moved) = (0, 0);
        for key in 0..1000u64 {
            let h = xxhash64(&key.to_le_bytes(), 0);
            let before = a[ta.candidates(h).next().unwrap() as usize];
            let after = a[fewer.candidates(h).next().unwrap() as usize];
            if before == a[2] {
                moved += 1;
            } else if before != after {
                others_moved += 1;
            }
        }
        assert!(moved > 200 && moved < 450, "about a third moved: {moved}");
        assert!(
            others_moved < 100,
            "most keys of the other hosts stay: {others_moved}"
        );
    }

    #[test]
    fn maglev_fills_evenly_and_is_stable() {
        let p = Policy::Maglev { table_size: 65537 };
        let a = addrs(4);
        let Table::Maglev(t) = table(p, &a) else {
            panic!()
        };
        let mut counts = [0usize; 4];
        for i in &t {
            counts[*i as usize] += 1;
        }
        for c in counts {
            assert!((16000..=16800).contains(&c), "{counts:?}");
        }
        let mut b = a.clone();
        b.swap(0, 3);
        let tb = table(p, &b);
        let ta = table(p, &a);
        for key in 0..100u64 {
            let h = xxhash64(&key.to_le_bytes(), 0);
            assert_eq!(
                a[ta.candidates(h).next().unwrap() as usize],
                b[tb.candidates(h).next().unwrap() as usize]
            );
        }
        // A small prime table too.
        let Table::Maglev(small) = table(Policy::Maglev { table_size: 7 }, &a) else {
            panic!()
        };
        assert_eq!(small.len(), 7);
        assert!(small.iter().all(|i| *i < 4));
    }

    #[test]
    fn hash_of_headers_cookies_source_and_query() {
        let client: SocketAddr = "10.1.0.5:40000".parse().unwrap();
        let local: SocketAddr = "10.96.0.1:80".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-user", "alice".parse().unwrap());
        let by_header = [HashPolicy::Header(HeaderName::from_static("x-user"), false)];
        let (a, c) = request_hash(&by_header, &h, None, client, local);
        assert_eq!(a, Some(xxhash64(b"alice", 0)));
        assert!(c.is_none());
        assert_eq!(
            request_hash(&by_header, &HeaderMap::new(), None, client, local).0,
            None
        );

        let by_query = [HashPolicy::QueryParameter("u".into(), false)];
        assert_eq!(
            request_hash(&by_query, &h, Some("a=1&u=bob"), client, local).0,
            Some(xxhash64(b"bob", 0))
        );
        let by_ip = [HashPolicy::SourceIp(false)];
        let other: SocketAddr = "10.1.0.5:40001".parse().unwrap();
        assert_eq!(
            request_hash(&by_ip, &h, None, client, local).0,
            request_hash(&by_ip, &h, None, other, local).0,
            "the port does not matter"
        );

        let by_cookie = |ttl| {
            [HashPolicy::Cookie {
                name: "session".into(),
                path: "/".into(),
                ttl,
                attributes: vec![],
                terminal: false,
            }]
        };
        // No cookie, no TTL: no hash, no cookie.
        assert_eq!(
            request_hash(&by_cookie(None), &h, None, client, local),
            (None, None)
        );
        // No cookie, a TTL: Envoy's generated cookie, and the hash is the one the cookie gives
        // on the next request.
        let (first, set) = request_hash(
            &by_cookie(Some(Duration::from_secs(60))),
            &h,
            None,
            client,
            local,
        );
        let set = set.unwrap().0;
        assert!(set.starts_with("session=\""), "{set}");
        assert!(set.ends_with("\"; Max-Age=60; Path=/; HttpOnly"), "{set}");
        let value = set.split('"').nth(1).unwrap();
        assert_eq!(value.len(), 16);
        let mut next = HeaderMap::new();
        next.insert(
            "cookie",
            format!("a=b; session=\"{value}\"").parse().unwrap(),
        );
        let (again, none) = request_hash(
            &by_cookie(Some(Duration::from_secs(60))),
            &next,
            None,
            client,
            local,
        );
        assert_eq!(again, first);
        assert!(none.is_none());
        // A TTL of 0: a session cookie.
        let (_, s) = request_hash(&by_cookie(Some(Duration::ZERO)), &h, None, client, local);
        assert!(!s.unwrap().0.contains("Max-Age"));

        // Two policies fold; a terminal one that produced a value stops.
        let both = [
            HashPolicy::Header(HeaderName::from_static("x-user"), false),
            HashPolicy::SourceIp(false),
        ];
        let ip = xxhash64(b"10.1.0.5", 0);
        assert_eq!(
            request_hash(&both, &h, None, client, local).0,
            Some(xxhash64(b"alice", 0).rotate_left(1) ^ ip)
        );
        let terminal = [
            HashPolicy::Header(HeaderName::from_static("x-user"), true),
            HashPolicy::SourceIp(false),
        ];
        assert_eq!(
            request_hash(&terminal, &h, None, client, local).0,
            Some(xxhash64(b"alice", 0))
        );
    }

    #[test]
    fn slow_start_weights() {
        let s = SlowStart {
            window: Duration::from_secs(10),
            aggression: 1.0,
            min_weight: 0.1,
        };
        let t0 = Instant::now();
        assert_eq!(s.factor(t0, t0), 0.1, "the minimum at first");
        assert!((s.factor(t0, t0 + Duration::from_secs(5)) - 0.5).abs() < 1e-9);
        assert_eq!(s.factor(t0, t0 + Duration::from_secs(10)), 1.0);
        let aggressive = SlowStart {
            aggression: 2.0,
            ..s
        };
        assert!((aggressive.factor(t0, t0 + Duration::from_secs(5)) - 0.5f64.sqrt()).abs() < 1e-9);
    }

    #[test]
    fn lb_config_from_clusters() {
        use cluster_pb::cluster::{LbConfig as L, LbPolicy};
        let mut c = cluster_pb::Cluster::default();
        assert_eq!(lb_config(&c).unwrap(), LbConfig::default());
        c.lb_policy = LbPolicy::Maglev as i32;
        c.lb_config = Some(L::MaglevLbConfig(cluster_pb::cluster::MaglevLbConfig {
            table_size: Some(envoy_types::pb::google::protobuf::UInt64Value { value: 100 }),
        }));
        assert!(lb_config(&c).unwrap_err().contains("prime"));
        c.lb_policy = LbPolicy::LeastRequest as i32;
        c.lb_config = None;
        assert_eq!(
            lb_config(&c).unwrap().policy,
            Policy::LeastRequest { choice_count: 2 }
        );
        c.lb_policy = LbPolicy::ClusterProvided as i32;
        assert_eq!(lb_config(&c).unwrap().policy, Policy::OriginalDst);
        c.lb_policy = LbPolicy::LoadBalancingPolicyConfig as i32;
        assert!(lb_config(&c).is_err());
    }
}
