//! The `x-forwarded-client-cert` header (XFCC) as Envoy's connection manager handles it
//! (`forward_client_cert_details`, `set_current_client_cert_details`): whether a client's XFCC
//! reaches the app, and what the waypoint adds about the client's certificate, the HBONE peer's
//! (the client workload's own certificate, which its ztunnel presents).
//!
//! The default is Envoy's: `SANITIZE`, a client's XFCC is removed, so an app behind the
//! waypoint can trust the header it gets. pilot asks for `SANITIZE_SET` with the subject, URI
//! and DNS names when the waypoint Gateway carries Istio's annotation
//! `ambient.istio.io/xfcc-include-client-identity: "true"`. The element's shape is what Envoy
//! 1.40 writes: `By=<the waypoint's URI SAN>;Hash=<SHA-256 of the client's certificate>;
//! Subject="<RFC 2253>";URI=<each URI SAN>;DNS=<each DNS SAN>`, appended after a `,`.

use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use http::{HeaderMap, HeaderName, HeaderValue};
use mesh::tls::ClientCertDetails;

pub const HEADER: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// `forward_client_cert_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Remove the client's XFCC (Envoy's default).
    #[default]
    Sanitize,
    /// Pass the client's XFCC on unchanged (HBONE is always mutual TLS).
    ForwardOnly,
    /// Pass it on with this client's element appended.
    AppendForward,
    /// Replace it with this client's element.
    SanitizeSet,
    /// Pass it on unchanged, mutual TLS or not.
    AlwaysForwardOnly,
}

/// How a listener's requests treat XFCC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Xfcc {
    pub mode: Mode,
    pub subject: bool,
    pub uri: bool,
    pub dns: bool,
}

impl Xfcc {
    /// From a connection manager; the parts the waypoint cannot honour (the certificate or
    /// chain in PEM, the issuer, the JSON format, a per-request matcher) are refused, so the
    /// listener is NACKed rather than served differently from what was asked.
    pub fn from_hcm(h: &hcm::HttpConnectionManager) -> Result<Xfcc, String> {
        use hcm::http_connection_manager::ForwardClientCertDetails as F;
        let mode = match F::try_from(h.forward_client_cert_details) {
            Ok(F::Sanitize) => Mode::Sanitize,
            Ok(F::ForwardOnly) => Mode::ForwardOnly,
            Ok(F::AppendForward) => Mode::AppendForward,
            Ok(F::SanitizeSet) => Mode::SanitizeSet,
            Ok(F::AlwaysForwardOnly) => Mode::AlwaysForwardOnly,
            Err(_) => {
                return Err(format!(
                    "forward_client_cert_details: unknown value {}",
                    h.forward_client_cert_details
                ));
            }
        };
        if h.forward_client_cert_matcher.is_some() {
            return Err("forward_client_cert_matcher is not supported".into());
        }
        let mut x = Xfcc {
            mode,
            ..Default::default()
        };
        if let Some(d) = &h.set_current_client_cert_details {
            let unsupported = [
                (d.cert, "cert"),
                (d.chain, "chain"),
                (d.issuer, "issuer"),
                (d.format != 0, "format (only TEXT)"),
            ];
            if let Some((_, field)) = unsupported.iter().find(|(set, _)| *set) {
                return Err(format!(
                    "set_current_client_cert_details.{field} is not supported"
                ));
            }
            x.subject = d.subject.as_ref().is_some_and(|b| b.value);
            x.uri = d.uri;
            x.dns = d.dns;
        }
        Ok(x)
    }

    /// Whether requests need this client's element (built once per tunnel).
    pub fn needs_element(&self) -> bool {
        matches!(self.mode, Mode::AppendForward | Mode::SanitizeSet)
    }

    /// This client's element: `By` (the waypoint's own URI SAN) and `Hash` always, the rest
    /// as `set_current_client_cert_details` asks.
    pub fn element(&self, by: &str, client: &ClientCertDetails) -> Option<HeaderValue> {
        let mut e = format!("By={by};Hash={}", client.sha256_hex);
        if self.subject {
            e.push_str(";Subject=\"");
            for c in client.subject.chars() {
                // A quoted value escapes its own quotes (Envoy's XFCC rules).
                if c == '"' {
                    e.push('\\');
                }
                e.push(c);
            }
            e.push('"');
        }
        if self.uri {
            for u in &client.uris {
                e.push_str(";URI=");
                e.push_str(u);
            }
        }
        if self.dns {
            for d in &client.dns {
                e.push_str(";DNS=");
                e.push_str(d);
            }
        }
        HeaderValue::from_str(&e).ok()
    }

    /// Apply to a request's headers, before routing (route matches see the result, as in
    /// Envoy). `element` is this client's, when [`Xfcc::needs_element`].
    pub fn apply(&self, headers: &mut HeaderMap, element: Option<&HeaderValue>) {
        match self.mode {
            Mode::ForwardOnly | Mode::AlwaysForwardOnly => {}
            Mode::Sanitize => {
                headers.remove(HEADER);
            }
            Mode::SanitizeSet => match element {
                Some(e) => {
                    headers.insert(HEADER, e.clone());
                }
                None => {
                    headers.remove(HEADER);
                }
            },
            Mode::AppendForward => {
                let Some(e) = element else {
                    headers.remove(HEADER);
                    return;
                };
                let mut joined: Vec<u8> = Vec::new();
                for v in headers.get_all(HEADER) {
                    joined.extend_from_slice(v.as_bytes());
                    joined.push(b',');
                }
                joined.extend_from_slice(e.as_bytes());
                if let Ok(v) = HeaderValue::from_bytes(&joined) {
                    headers.insert(HEADER, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Envoy 1.40 wrote for a client certificate with an empty subject and one SPIFFE
    /// URI (curl with that certificate to an Envoy listener requiring it, SANITIZE_SET with
    /// subject, URI and DNS; the echo app's view).
    const ENVOY_SET: &str = "By=spiffe://cluster.local/ns/shop/sa/waypoint;Hash=dfdc7251b59e4e2c9aa00d66a40fe6a98a68d609052de4bed3cc1185b1371441;Subject=\"\";URI=spiffe://cluster.local/ns/shop/sa/client";

    fn client() -> ClientCertDetails {
        ClientCertDetails {
            sha256_hex: "dfdc7251b59e4e2c9aa00d66a40fe6a98a68d609052de4bed3cc1185b1371441".into(),
            subject: String::new(),
            uris: vec!["spiffe://cluster.local/ns/shop/sa/client".into()],
            dns: vec![],
        }
    }

    fn hcm_with(mode: i32, subject: bool, uri: bool, dns: bool) -> hcm::HttpConnectionManager {
        hcm::HttpConnectionManager {
            forward_client_cert_details: mode,
            set_current_client_cert_details: Some(
                hcm::http_connection_manager::SetCurrentClientCertDetails {
                    subject: Some(envoy_types::pb::google::protobuf::BoolValue { value: subject }),
                    uri,
                    dns,
                    ..Default::default()
                },
            ),
            ..Default::default()
        }
    }

    fn headers(xfcc: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = xfcc {
            h.insert(HEADER, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn each_mode_as_envoy_applies_it() {
        let spoofed = "By=spiffe://x;URI=spiffe://evil";
        let run = |mode: i32| {
            let x = Xfcc::from_hcm(&hcm_with(mode, true, true, true)).unwrap();
            let e = x
                .needs_element()
                .then(|| x.element("spiffe://cluster.local/ns/shop/sa/waypoint", &client()))
                .flatten();
            let mut h = headers(Some(spoofed));
            x.apply(&mut h, e.as_ref());
            h.get(HEADER).map(|v| v.to_str().unwrap().to_string())
        };
        // Observed with Envoy 1.40, the client sending `spoofed`.
        assert_eq!(run(0), None, "SANITIZE");
        assert_eq!(run(1).as_deref(), Some(spoofed), "FORWARD_ONLY");
        assert_eq!(
            run(2),
            Some(format!("{spoofed},{ENVOY_SET}")),
            "APPEND_FORWARD"
        );
        assert_eq!(run(3).as_deref(), Some(ENVOY_SET), "SANITIZE_SET");
        assert_eq!(run(4).as_deref(), Some(spoofed), "ALWAYS_FORWARD_ONLY");
        // Unset is SANITIZE.
        let x = Xfcc::from_hcm(&hcm::HttpConnectionManager::default()).unwrap();
        assert_eq!(x.mode, Mode::Sanitize);
    }

    #[test]
    fn the_element_lists_what_was_asked_in_envoys_order() {
        let c = ClientCertDetails {
            sha256_hex: "ab".into(),
            subject: "C=US,O=Acme+OU=Eng,CN=c3 \"q\"".into(),
            uris: vec![
                "spiffe://td/ns/a/sa/b".into(),
                "https://second.example/x".into(),
            ],
            dns: vec!["c2.shop.svc".into(), "other.example".into()],
        };
        let all = Xfcc::from_hcm(&hcm_with(3, true, true, true)).unwrap();
        assert_eq!(
            all.element("spiffe://td/ns/w/sa/w", &c).unwrap(),
            "By=spiffe://td/ns/w/sa/w;Hash=ab;Subject=\"C=US,O=Acme+OU=Eng,CN=c3 \\\"q\\\"\";URI=spiffe://td/ns/a/sa/b;URI=https://second.example/x;DNS=c2.shop.svc;DNS=other.example"
        );
        let bare = Xfcc::from_hcm(&hcm_with(3, false, false, false)).unwrap();
        assert_eq!(
            bare.element("spiffe://td/ns/w/sa/w", &c).unwrap(),
            "By=spiffe://td/ns/w/sa/w;Hash=ab"
        );
    }

    #[test]
    fn what_the_waypoint_cannot_honour_is_refused() {
        let mut h = hcm_with(3, true, true, false);
        h.set_current_client_cert_details.as_mut().unwrap().cert = true;
        assert_eq!(
            Xfcc::from_hcm(&h).unwrap_err(),
            "set_current_client_cert_details.cert is not supported"
        );
        let h = hcm_with(9, false, false, false);
        assert!(Xfcc::from_hcm(&h).unwrap_err().contains("unknown value 9"));
    }
}
