//! mTLS for HBONE: rustls client and server configurations that authenticate peers by SPIFFE identity.
//!
//! Both sides verify the chain against the workload's roots. The client then requires one of the
//! server leaf's URI SANs to be an expected identity (DNS and IP SANs are ignored, and no SNI is
//! sent); the server requires a client certificate from its own trust domain and leaves the rest
//! to authorization, which sees the peer identity after the handshake.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::identity::Identity;

/// ALPN protocol id for HBONE's HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// TLS 1.3 with the two AES-GCM suites Istio allows; the rest of aws-lc-rs' defaults (key
/// exchange groups, signature algorithms) are kept.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs as backend;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            backend::cipher_suite::TLS13_AES_256_GCM_SHA384,
            backend::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        ..backend::default_provider()
    })
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("building TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("building client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("certificate has no SPIFFE URI SAN")]
    NoIdentity,
    #[error("reading certificate: {0}")]
    Parse(String),
}

/// A workload's certificate, ready to use on either side of a handshake. Immutable: rotation
/// makes a new one, so in-flight handshakes keep a consistent view.
pub struct WorkloadCert {
    pub identity: Identity,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub roots: Vec<CertificateDer<'static>>,
    key: Arc<CertifiedKey>,
    root_store: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    server_config: Arc<ServerConfig>,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    /// Assemble from a chain (leaf first), its private key and the trust roots. The leaf must carry
    /// exactly the identity expected, which is how a caller checks what a CA returned.
    pub fn new(
        expected: &Identity,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::NoIdentity)?;
        let info = LeafInfo::parse(leaf)?;
        if info.identities.len() != 1 || &info.identities[0] != expected {
            return Err(TlsError::Parse(format!(
                "certificate identities {:?} are not exactly {expected}",
                info.identities
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
            )));
        }
        let provider = provider();
        let signing = provider.key_provider.load_private_key(key)?;
        let key = Arc::new(CertifiedKey::new(chain.clone(), signing));
        let mut store = RootCertStore::empty();
        for root in &roots {
            store.add(root.clone())?;
        }
        let root_store = Arc::new(store);
        let server_config = Arc::new(build_server_config(
            &provider,
            key.clone(),
            root_store.clone(),
            expected.trust_domain.clone(),
        )?);
        Ok(WorkloadCert {
            identity: expected.clone(),
            not_before: info.not_before,
            not_after: info.not_after,
            chain,
            roots,
            key,
            root_store,
            provider,
            server_config,
        })
    }

    /// The server side of HBONE: presents this identity, requires a client certificate from the
    /// same trust domain.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config.clone()
    }

    /// The client side of HBONE: presents this identity and accepts a server presenting any of
    /// `expected`.
    pub fn client_config(&self, expected: Vec<Identity>) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier = Arc::new(IdentityVerifier {
            roots: self.root_store.clone(),
            expected,
            algs: self.provider.signature_verification_algorithms,
        });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(FixedKey(self.key.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.enable_sni = false;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// Half of the validity period: when rotation is due.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }
}

fn build_server_config(
    provider: &Arc<CryptoProvider>,
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    trust_domain: String,
) -> Result<ServerConfig, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build()?;
    let verifier = Arc::new(TrustDomainVerifier {
        inner,
        trust_domain,
    });
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FixedKey(key)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // HBONE peers never resume; do not keep session state for them.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// What HBONE needs to know about a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    pub identities: Vec<Identity>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl LeafInfo {
    pub fn parse(der: &CertificateDer<'_>) -> Result<LeafInfo, TlsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| TlsError::Parse(e.to_string()))?;
        let mut identities = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::URI(uri) = name
                    && let Ok(id) = uri.parse::<Identity>()
                {
                    identities.push(id);
                }
            }
        }
        let to_system = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp().max(0) as u64;
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)
        };
        Ok(LeafInfo {
            identities,
            not_before: to_system(cert.validity().not_before),
            not_after: to_system(cert.validity().not_after),
        })
    }
}

/// What Envoy's `x-forwarded-client-cert` header can tell about a client certificate: its
/// SHA-256 (lower-case hex, of the DER), its subject as OpenSSL prints it in RFC 2253 form (the
/// last RDN first, multi-valued RDNs joined by `+`), and its URI and DNS SANs in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertDetails {
    pub sha256_hex: String,
    pub subject: String,
    pub uris: Vec<String>,
    pub dns: Vec<String>,
}

impl ClientCertDetails {
    pub fn parse(der: &[u8]) -> Result<ClientCertDetails, TlsError> {
        use std::fmt::Write as _;
        use x509_parser::extensions::GeneralName;
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Parse(e.to_string()))?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
        let mut sha256_hex = String::with_capacity(64);
        for b in digest.as_ref() {
            let _ = write!(sha256_hex, "{b:02x}");
        }
        // OpenSSL's RFC 2253 printing (Envoy's) walks the attributes from the last to the
        // first, members of a multi-valued RDN included, joining those with `+`.
        let registry = x509_parser::objects::oid_registry();
        let mut attributes = Vec::new();
        for (rdn_index, rdn) in cert.subject().iter().enumerate() {
            for atv in rdn.iter() {
                let name = x509_parser::objects::oid2abbrev(atv.attr_type(), registry)
                    .map(str::to_string)
                    .unwrap_or_else(|_| atv.attr_type().to_id_string());
                let value = match atv.as_str() {
                    Ok(v) => rfc2253_escape(v),
                    // Not a string type: RFC 2253's `#` and the DER of the value in hex.
                    Err(_) => atv.as_slice().iter().fold(String::from("#"), |mut s, b| {
                        let _ = write!(s, "{b:02x}");
                        s
                    }),
                };
                attributes.push((rdn_index, format!("{name}={value}")));
            }
        }
        let mut subject = String::new();
        let mut previous = None;
        for (rdn_index, text) in attributes.into_iter().rev() {
            match previous {
                Some(p) if p == rdn_index => subject.push('+'),
                Some(_) => subject.push(','),
                None => {}
            }
            subject.push_str(&text);
            previous = Some(rdn_index);
        }
        let (mut uris, mut dns) = (Vec::new(), Vec::new());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    GeneralName::DNSName(d) => dns.push(d.to_string()),
                    _ => {}
                }
            }
        }
        Ok(ClientCertDetails {
            sha256_hex,
            subject,
            uris,
            dns,
        })
    }
}

/// An attribute value escaped as RFC 2253 says: `,+"\<>;` behind a backslash, and a leading
/// `#` or space and a trailing space too.
fn rfc2253_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The identity of a TLS peer, from the first SPIFFE URI SAN of its leaf.
pub fn peer_identity(certs: Option<&[CertificateDer<'static>]>) -> Result<Identity, TlsError> {
    let leaf = certs.and_then(|c| c.first()).ok_or(TlsError::NoIdentity)?;
    LeafInfo::parse(leaf)?
        .identities
        .into_iter()
        .next()
        .ok_or(TlsError::NoIdentity)
}

#[derive(Debug)]
struct FixedKey(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedKey {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for FixedKey {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Client-side check: chain to our roots, then an expected SPIFFE identity among the URI SANs.
#[derive(Debug)]
struct IdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let info = LeafInfo::parse(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        if info.identities.iter().any(|id| self.expected.contains(id)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server identity {:?} is not one of the expected {:?}",
                info.identities
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>(),
                self.expected
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server-side check: webpki chain verification, then the client's SPIFFE trust domain must be ours.
#[derive(Debug)]
struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let info = LeafInfo::parse(end_entity)
            .map_err(|e| rustls::Error::General(format!("client certificate: {e}")))?;
        match info.identities.first() {
            Some(id) if id.trust_domain == self.trust_domain => Ok(ClientCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!(
                "client identity {id} is not in trust domain {}",
                self.trust_domain
            ))),
            None => Err(rustls::Error::General(
                "client certificate has no SPIFFE identity".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    /// Certificates made with `openssl` and shown to Envoy 1.40 (a listener requiring client
    /// certificates, `SANITIZE_SET` with subject, URI and DNS): what Envoy wrote in
    /// `x-forwarded-client-cert` is what these details must be.
    #[test]
    fn client_details_as_envoy_reports_them() {
        // Empty subject, one SPIFFE URI (Istio's workload certificates).
        // Envoy: `Hash=dfdc72…;Subject="";URI=spiffe://cluster.local/ns/shop/sa/client`.
        let istio_like = ClientCertDetails::parse(&der(ISTIO_LIKE)).unwrap();
        assert_eq!(
            istio_like,
            ClientCertDetails {
                sha256_hex: "dfdc7251b59e4e2c9aa00d66a40fe6a98a68d609052de4bed3cc1185b1371441"
                    .into(),
                subject: String::new(),
                uris: vec!["spiffe://cluster.local/ns/shop/sa/client".into()],
                dns: vec![],
            }
        );
        // `/CN=c3/O=Acme+OU=Eng/C=US` with two URIs. Envoy: `Hash=86a296…;
        // Subject="C=US,O=Acme+OU=Eng,CN=c3";URI=spiffe://…/sa/c3;URI=https://second.example/x`.
        let multi = ClientCertDetails::parse(&der(MULTI_VALUED)).unwrap();
        assert_eq!(
            multi.sha256_hex,
            "86a2965401f153fb1657d53979cfd8b377d01dec379bec9d2e36543d6fc7cfb4"
        );
        assert_eq!(multi.subject, "C=US,O=Acme+OU=Eng,CN=c3");
        assert_eq!(
            multi.uris,
            [
                "spiffe://cluster.local/ns/shop/sa/c3",
                "https://second.example/x"
            ]
        );
        assert_eq!(rfc2253_escape("Acme, Inc. #1 "), "Acme\\, Inc. #1\\ ");
        assert_eq!(rfc2253_escape("#a+b"), "\\#a\\+b");
    }

    const ISTIO_LIKE: &str = "-----BEGIN CERTIFICATE-----
MIIBsjCCAVigAwIBAgIUbZewwIo5qaCUpWSf8C3OByOrj/AwCgYIKoZIzj0EAwIw
GDEWMBQGA1UECgwNY2x1c3Rlci5sb2NhbDAeFw0yNjExMjYyMTM3MTRaFw0yNjEx
MjgyMTM3MTRaMAAwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAToMcoUXdBui8n0
txA9HqzMsBoRnIrOEqSRZkpYlJYU8yDsrO1RNU/NoQZVkeeCQ7pQXwpjxpGriMuC
P+8vtgPVo4GXMIGUMDMGA1UdEQQsMCqGKHNwaWZmZTovL2NsdXN0ZXIubG9jYWwv
bnMvc2hvcC9zYS9jbGllbnQwHQYDVR0lBBYwFAYIKwYBBQUHAwEGCCsGAQUFBwMC
MB0GA1UdDgQWBBQOCMbOi+MFA1HCB7kMcKPwVNY1WjAfBgNVHSMEGDAWgBRoqDcT
/8xQ65arb93BRcM4OSauOjAKBggqhkjOPQQDAgNIADBFAiBdxCYrYe/vp/ep/lhu
qmNBZWyVCvU3hxKS3GqW5hTDLgIhAP9v/nwsSGyBsiEEkHoE/X/ojKK9VhP0FPGD
C5unOph7
-----END CERTIFICATE-----";

    const MULTI_VALUED: &str = "-----BEGIN CERTIFICATE-----
MIIB9DCCAZmgAwIBAgIUbZewwIo5qaCUpWSf8C3OByOrj/IwCgYIKoZIzj0EAwIw
GDEWMBQGA1UECgwNY2x1c3Rlci5sb2NhbDAeFw0yNjExMjYyMTM4MDdaFw0yNjEx
MjgyMTM4MDdaMDUxCzAJBgNVBAMMAmMzMRkwCgYDVQQLDANFbmcwCwYDVQQKDARB
Y21lMQswCQYDVQQGEwJVUzBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABPppNc/K
T5OUlThnhedNmhL+j1siKjkh4Cz0ssUDumq/9IV4+J4rAFh0gP+mUIYVqvIDKWrw
8X8s2WiTNWRGhZ+jgaMwgaAwSQYDVR0RBEIwQIYkc3BpZmZlOi8vY2x1c3Rlci5s
b2NhbC9ucy9zaG9wL3NhL2MzhhhodHRwczovL3NlY29uZC5leGFtcGxlL3gwEwYD
VR0lBAwwCgYIKwYBBQUHAwIwHQYDVR0OBBYEFBDQO+v12/XCLn0JsBdfHAN0HJCH
MB8GA1UdIwQYMBaAFGioNxP/zFDrlqtv3cFFwzg5Jq46MAoGCCqGSM49BAMCA0kA
MEYCIQDk3A+GKt1Q4F/KuwtCQp4lraCgEei8P4wsUJPcZJZ4mAIhANPk66aeBthA
3PwBcg2bwN1kfDpBV84vY3Za4poGCN9L
-----END CERTIFICATE-----";
}
