//! CORS as Envoy's `envoy.filters.http.cors` does it from the per-filter `CorsPolicy` of the
//! route (then of the virtual host, field by field): a preflight (`OPTIONS` with `origin` and
//! `access-control-request-method`) is answered `200` by the proxy with the allowed methods,
//! headers and max age (forwarded to the app instead when the origin is not allowed and
//! `forward_not_matching_preflights`); any other request from an allowed origin gets
//! `access-control-allow-origin` (and credentials, exposed headers) on its answer.

use envoy_types::pb::envoy::extensions::filters::http::cors::v3 as pb;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use prost::Message;

use crate::mirror::fraction_per_million;
use crate::route::{StringMatch, string_match};

pub const TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy";
/// The connection manager's filter (no settings of its own).
pub const FILTER_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors";

const ALLOW_ORIGIN: HeaderName = HeaderName::from_static("access-control-allow-origin");
const ALLOW_CREDENTIALS: HeaderName = HeaderName::from_static("access-control-allow-credentials");
const ALLOW_METHODS: HeaderName = HeaderName::from_static("access-control-allow-methods");
const ALLOW_HEADERS: HeaderName = HeaderName::from_static("access-control-allow-headers");
const MAX_AGE: HeaderName = HeaderName::from_static("access-control-max-age");
const EXPOSE_HEADERS: HeaderName = HeaderName::from_static("access-control-expose-headers");
const REQUEST_METHOD: &str = "access-control-request-method";
const REQUEST_HEADERS: &str = "access-control-request-headers";
const REQUEST_PRIVATE_NETWORK: &str = "access-control-request-private-network";
const ALLOW_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-allow-private-network");

#[derive(Debug)]
pub struct CorsPolicy {
    allow_origins: Vec<StringMatch>,
    allow_methods: String,
    allow_headers: String,
    expose_headers: String,
    max_age: String,
    allow_credentials: Option<bool>,
    allow_private_network: Option<bool>,
    forward_not_matching: Option<bool>,
    /// Share of requests the filter acts on (`filter_enabled`, default all).
    enabled_per_million: u32,
}

impl CorsPolicy {
    pub fn decode(body: &[u8]) -> Result<CorsPolicy, String> {
        let p = pb::CorsPolicy::decode(body).map_err(|e| format!("undecodable CorsPolicy: {e}"))?;
        let mut allow_origins = Vec::with_capacity(p.allow_origin_string_match.len());
        for (i, m) in p.allow_origin_string_match.iter().enumerate() {
            allow_origins
                .push(string_match(m).map_err(|e| format!("allow_origin_string_match[{i}]: {e}"))?);
        }
        let enabled_per_million = match p.filter_enabled.as_ref() {
            None => 1_000_000,
            Some(f) => f
                .default_value
                .as_ref()
                .map_or(0, |v| fraction_per_million(v.numerator, v.denominator)),
        };
        for (name, v) in [
            ("allow_methods", &p.allow_methods),
            ("allow_headers", &p.allow_headers),
            ("expose_headers", &p.expose_headers),
            ("max_age", &p.max_age),
        ] {
            if HeaderValue::from_str(v).is_err() {
                return Err(format!("{name}: {v:?} is not a valid header value"));
            }
        }
        Ok(CorsPolicy {
            allow_origins,
            allow_methods: p.allow_methods,
            allow_headers: p.allow_headers,
            expose_headers: p.expose_headers,
            max_age: p.max_age,
            allow_credentials: p.allow_credentials.map(|b| b.value),
            allow_private_network: p.allow_private_network_access.map(|b| b.value),
            forward_not_matching: p.forward_not_matching_preflights.map(|b| b.value),
            enabled_per_million,
        })
    }
}

/// The policies that apply to a request, most specific first (route, virtual host); each
/// setting comes from the first that has it, as Envoy reads them.
pub struct Policies<'a>(pub [Option<&'a CorsPolicy>; 2]);

impl Policies<'_> {
    fn each(&self) -> impl Iterator<Item = &CorsPolicy> {
        self.0.iter().flatten().copied()
    }

    fn text(&self, f: impl Fn(&CorsPolicy) -> &str) -> &str {
        self.each().map(f).find(|s| !s.is_empty()).unwrap_or("")
    }

    fn origins(&self) -> &[StringMatch] {
        self.each()
            .map(|p| p.allow_origins.as_slice())
            .find(|o| !o.is_empty())
            .unwrap_or(&[])
    }

    fn flag(&self, f: impl Fn(&CorsPolicy) -> Option<bool>, default: bool) -> bool {
        self.each().find_map(f).unwrap_or(default)
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        self.origins()
            .iter()
            .any(|m| m.matches("*") || m.matches(origin))
    }
}

/// What the filter does with a request.
#[derive(Debug)]
pub enum Outcome {
    /// Not a CORS request (or no policy): nothing.
    Pass,
    /// A preflight answered here: `200` with these headers.
    Preflight(HeaderMap),
    /// Goes on; these headers go on its answer (empty when the origin is not allowed).
    Request(HeaderMap),
}

/// The filter's decision for a request (`draw` in [0, 1 000 000) for `filter_enabled`).
pub fn check(p: &Policies<'_>, method: &str, headers: &HeaderMap, draw: u32) -> Outcome {
    let Some(first) = p.0.iter().flatten().next() else {
        return Outcome::Pass;
    };
    if draw >= first.enabled_per_million {
        return Outcome::Pass;
    }
    let Some(origin) = headers.get(http::header::ORIGIN).filter(|o| !o.is_empty()) else {
        return Outcome::Pass;
    };
    let allowed = p.origin_allowed(&String::from_utf8_lossy(origin.as_bytes()));
    let credentials = p.flag(|c| c.allow_credentials, false);
    let request_method = headers.get(REQUEST_METHOD).filter(|m| !m.is_empty());
    let preflight = method == "OPTIONS" && request_method.is_some();
    if !preflight {
        let mut out = HeaderMap::new();
        if allowed {
            out.insert(ALLOW_ORIGIN, origin.clone());
            if credentials {
                out.insert(ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
            }
            let expose = p.text(|c| &c.expose_headers);
            if let Ok(v) = HeaderValue::from_str(expose)
                && !expose.is_empty()
            {
                out.insert(EXPOSE_HEADERS, v);
            }
        }
        return Outcome::Request(out);
    }
    if !allowed && p.flag(|c| c.forward_not_matching, true) {
        return Outcome::Request(HeaderMap::new());
    }
    let mut out = HeaderMap::new();
    if allowed {
        out.insert(ALLOW_ORIGIN, origin.clone());
        // Envoy's filter then treats its own answer as a CORS response: exposed headers too.
        let expose = p.text(|c| &c.expose_headers);
        if let Ok(v) = HeaderValue::from_str(expose)
            && !expose.is_empty()
        {
            out.insert(EXPOSE_HEADERS, v);
        }
    }
    if credentials {
        out.insert(ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
    let echo = |name: &str| {
        headers
            .get(name)
            .cloned()
            .unwrap_or(HeaderValue::from_static(""))
    };
    let methods = p.text(|c| &c.allow_methods);
    if !methods.is_empty() {
        let v = if methods == "*" {
            echo(REQUEST_METHOD)
        } else {
            HeaderValue::from_str(methods).unwrap_or(HeaderValue::from_static(""))
        };
        out.insert(ALLOW_METHODS, v);
    }
    let allow_headers = p.text(|c| &c.allow_headers);
    if !allow_headers.is_empty() {
        let v = if allow_headers == "*" {
            echo(REQUEST_HEADERS)
        } else {
            HeaderValue::from_str(allow_headers).unwrap_or(HeaderValue::from_static(""))
        };
        out.insert(ALLOW_HEADERS, v);
    }
    let max_age = p.text(|c| &c.max_age);
    if let Ok(v) = HeaderValue::from_str(max_age)
        && !max_age.is_empty()
    {
        out.insert(MAX_AGE, v);
    }
    if p.flag(|c| c.allow_private_network, false)
        && headers
            .get(REQUEST_PRIVATE_NETWORK)
            .is_some_and(|v| v == "true")
    {
        out.insert(ALLOW_PRIVATE_NETWORK, HeaderValue::from_static("true"));
    }
    Outcome::Preflight(out)
}

/// Put a CORS request's response headers on an answer (they replace the app's own).
pub fn apply(response: &mut HeaderMap, cors: &HeaderMap) {
    for (k, v) in cors {
        response.insert(k.clone(), v.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
    use envoy_types::pb::google::protobuf::BoolValue;

    fn policy(origins: &[&str], forward: Option<bool>) -> CorsPolicy {
        let p = pb::CorsPolicy {
            allow_origin_string_match: origins
                .iter()
                .map(|o| matcher::StringMatcher {
                    ignore_case: false,
                    match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(
                        o.to_string(),
                    )),
                })
                .collect(),
            allow_methods: "GET,POST".into(),
            allow_headers: "x-a".into(),
            expose_headers: "x-b".into(),
            max_age: "60".into(),
            allow_credentials: Some(BoolValue { value: true }),
            forward_not_matching_preflights: forward.map(|value| BoolValue { value }),
            ..Default::default()
        };
        CorsPolicy::decode(&p.encode_to_vec()).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn preflights_and_requests() {
        let p = policy(&["https://a.example"], Some(false));
        let ps = Policies([Some(&p), None]);
        let pre = headers(&[
            ("origin", "https://a.example"),
            ("access-control-request-method", "POST"),
        ]);
        let Outcome::Preflight(h) = check(&ps, "OPTIONS", &pre, 0) else {
            panic!()
        };
        assert_eq!(h["access-control-allow-origin"], "https://a.example");
        assert_eq!(h["access-control-allow-methods"], "GET,POST");
        assert_eq!(h["access-control-allow-headers"], "x-a");
        assert_eq!(h["access-control-max-age"], "60");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(
            h["access-control-expose-headers"], "x-b",
            "as Envoy's own answer gets"
        );
        // Not allowed and not forwarded: answered here without an allowed origin.
        let other = headers(&[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ]);
        let Outcome::Preflight(h) = check(&ps, "OPTIONS", &other, 0) else {
            panic!()
        };
        assert!(!h.contains_key("access-control-allow-origin"));
        // Forwarded (the default) when not allowed.
        let fwd = policy(&["https://a.example"], None);
        assert!(matches!(
            check(&Policies([Some(&fwd), None]), "OPTIONS", &other, 0),
            Outcome::Request(h) if h.is_empty()
        ));
        // A simple request from an allowed origin.
        let simple = headers(&[("origin", "https://a.example")]);
        let Outcome::Request(h) = check(&ps, "GET", &simple, 0) else {
            panic!()
        };
        assert_eq!(h["access-control-allow-origin"], "https://a.example");
        assert_eq!(h["access-control-expose-headers"], "x-b");
        assert!(matches!(
            check(&ps, "GET", &HeaderMap::new(), 0),
            Outcome::Pass
        ));
        assert!(matches!(
            check(&Policies([None, None]), "GET", &simple, 0),
            Outcome::Pass
        ));
        // `*` allows every origin.
        let any = policy(&["*"], None);
        assert!(matches!(
            check(&Policies([Some(&any), None]), "GET", &simple, 0),
            Outcome::Request(h) if h.contains_key("access-control-allow-origin")
        ));
    }
}
