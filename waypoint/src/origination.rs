//! TLS origination to the endpoints inside the HBONE stream (DestinationRule `tls` SIMPLE /
//! MUTUAL, sent by pilot as Envoy's `envoy.transport_sockets.tls` UpstreamTlsContext with the
//! PEM inlined): the client config is built once per Cluster resource. Requests on such a
//! cluster use kept-alive connections of the upstream pool (`upstream`, keyed by endpoint, these
//! TLS settings and the cluster's limits); a request that switches protocols (WebSocket) opens
//! its own CONNECT stream, TLS session and HTTP connection here.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use envoy_types::pb::envoy::config::core::v3 as envoy_core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls_pb;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh::hbone::io::H2Io;
use mesh::state::State;
use prost::Message;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tracing::debug;

use crate::pool::Limits;
use crate::request::RequestBody;
use crate::upstream::{Protocol, Upstream, UpstreamBody, UpstreamError};

const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
const UPSTREAM_TLS_CONTEXT: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// A cluster's client TLS.
#[derive(Clone)]
pub struct UpstreamTls {
    pub config: Arc<ClientConfig>,
    /// SNI and the name the certificate must carry (`sni`, else the first subject alt name);
    /// `None`: no SNI, the endpoint's IP is checked (when verifying).
    pub server_name: Option<ServerName<'static>>,
    pub verified: bool,
    /// Of the resource's bytes, to compare two versions.
    digest: u64,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .field("verified", &self.verified)
            .finish()
    }
}

impl UpstreamTls {
    /// Identifies the settings (two clusters with the same TLS resource share connections).
    pub fn digest(&self) -> u64 {
        self.digest
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

fn data(d: &Option<envoy_core::DataSource>, field: &str) -> Result<Option<Vec<u8>>, String> {
    use envoy_core::data_source::Specifier;
    match d.as_ref().and_then(|d| d.specifier.as_ref()) {
        None => Ok(None),
        Some(Specifier::InlineString(s)) => Ok(Some(s.clone().into_bytes())),
        Some(Specifier::InlineBytes(b)) => Ok(Some(b.clone())),
        Some(_) => Err(format!(
            "{field}: only inline_string / inline_bytes are supported"
        )),
    }
}

/// The cluster's `transport_socket`, when it is Envoy's TLS.
pub fn upstream_tls(c: &cluster_pb::Cluster) -> Result<Option<UpstreamTls>, String> {
    use envoy_core::transport_socket::ConfigType;
    let Some(socket) = &c.transport_socket else {
        return Ok(None);
    };
    let at = "transport_socket";
    let any = match &socket.config_type {
        Some(ConfigType::TypedConfig(a)) if a.type_url == UPSTREAM_TLS_CONTEXT => a,
        _ => {
            return Err(format!(
                "{at}: only {TLS_SOCKET} with an UpstreamTlsContext is supported"
            ));
        }
    };
    let ctx = tls_pb::UpstreamTlsContext::decode(&any.value[..])
        .map_err(|e| format!("{at}: undecodable UpstreamTlsContext: {e}"))?;
    let common = ctx.common_tls_context.unwrap_or_default();
    let provider = mesh::tls::provider();

    let mut roots = None;
    let mut san = None;
    if let Some(v) = &common.validation_context_type {
        use tls_pb::common_tls_context::ValidationContextType as V;
        let V::ValidationContext(v) = v else {
            return Err(format!(
                "{at}.common_tls_context: only an inline validation_context is supported"
            ));
        };
        if let Some(pem) = data(
            &v.trusted_ca,
            &format!("{at}.validation_context.trusted_ca"),
        )? {
            let mut store = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("{at}.validation_context.trusted_ca: {e}"))?;
                store
                    .add(cert)
                    .map_err(|e| format!("{at}.validation_context.trusted_ca: {e}"))?;
            }
            if store.is_empty() {
                return Err(format!(
                    "{at}.validation_context.trusted_ca: no certificate"
                ));
            }
            roots = Some(store);
        }
        san = v
            .match_typed_subject_alt_names
            .iter()
            .filter_map(|m| m.matcher.as_ref())
            .find_map(|m| match &m.match_pattern {
                Some(envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern::Exact(s)) => Some(s.clone()),
                _ => None,
            });
    }
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{at}: {e}"))?;
    let verified = roots.is_some();
    let builder = match roots {
        Some(roots) => builder.with_root_certificates(roots),
        // Envoy without a validation context does not verify the server.
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider.clone()))),
    };
    let config = match common.tls_certificates.as_slice() {
        [] => builder.with_no_client_auth(),
        [cert, ..] => {
            let field = format!("{at}.common_tls_context.tls_certificates[0]");
            let chain_pem = data(
                &cert.certificate_chain,
                &format!("{field}.certificate_chain"),
            )?
            .ok_or_else(|| format!("{field}.certificate_chain: required"))?;
            let key_pem = data(&cert.private_key, &format!("{field}.private_key"))?
                .ok_or_else(|| format!("{field}.private_key: required"))?;
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{field}.certificate_chain: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| format!("{field}.private_key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{field}: {e}"))?
        }
    };
    let name = if ctx.sni.is_empty() {
        san
    } else {
        Some(ctx.sni.clone())
    };
    let server_name = name
        .map(|n| {
            ServerName::try_from(n.clone())
                .map_err(|_| format!("{at}.sni: {n:?} is not a server name"))
        })
        .transpose()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    any.value.hash(&mut h);
    Ok(Some(UpstreamTls {
        config: Arc::new(config),
        server_name,
        verified,
        digest: h.finish(),
    }))
}

/// Accepts any server certificate (Envoy's behaviour without a validation context); the
/// handshake signatures are still checked.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS over `io` to `endpoint` as the cluster says.
pub async fn handshake<IO>(
    tls: &UpstreamTls,
    io: IO,
    endpoint: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let name = tls
        .server_name
        .clone()
        .unwrap_or_else(|| ServerName::IpAddress(endpoint.ip().into()));
    tokio_rustls::TlsConnector::from(tls.config.clone())
        .connect(name, io)
        .await
}

/// One request to `endpoint` over a CONNECT stream of its own, through TLS (`upgrade`: the
/// client, for `forwarded`, when the request asks to switch protocols): for upgrades, whose
/// connection then belongs to the two ends. The arguments are those of `Upstream::send`.
#[allow(clippy::too_many_arguments)]
pub async fn send(
    upstream: &Upstream,
    state: &State,
    endpoint: SocketAddr,
    protocol: Protocol,
    timeout: Duration,
    limits: &Limits,
    tls: &UpstreamTls,
    upgrade: Option<SocketAddr>,
    req: http::Request<RequestBody>,
) -> Result<http::Response<UpstreamBody>, UpstreamError> {
    let http_err = |source| UpstreamError::Http { endpoint, source };
    let stream = upstream
        .connect(state, endpoint, upgrade, timeout, limits.keepalive)
        .await?;
    let tls_stream = tokio::time::timeout(timeout, handshake(tls, H2Io::new(stream), endpoint))
        .await
        .map_err(|_| UpstreamError::Timeout(endpoint))?
        .map_err(|e| UpstreamError::Tls {
            endpoint,
            reason: e.to_string(),
        })?;
    let io = TokioIo::new(tls_stream);
    match protocol {
        Protocol::Http1 => {
            let (mut sender, conn) = http1::handshake(io).await.map_err(http_err)?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(%endpoint, "upstream TLS HTTP/1.1 connection: {e}");
                }
            });
            let rsp = sender.send_request(req).await.map_err(http_err)?;
            Ok(rsp.map(UpstreamBody::unpooled))
        }
        Protocol::Http2 => {
            let (mut sender, conn) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(http_err)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(%endpoint, "upstream TLS HTTP/2 connection: {e}");
                }
            });
            let rsp = sender.send_request(req).await.map_err(http_err)?;
            Ok(rsp.map(UpstreamBody::unpooled))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Any;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn inline(s: &str) -> Option<envoy_core::DataSource> {
        Some(envoy_core::DataSource {
            specifier: Some(envoy_core::data_source::Specifier::InlineString(s.into())),
            ..Default::default()
        })
    }

    fn cluster_with(ctx: tls_pb::UpstreamTlsContext) -> cluster_pb::Cluster {
        cluster_pb::Cluster {
            transport_socket: Some(envoy_core::TransportSocket {
                name: TLS_SOCKET.into(),
                config_type: Some(envoy_core::transport_socket::ConfigType::TypedConfig(Any {
                    type_url: UPSTREAM_TLS_CONTEXT.into(),
                    value: ctx.encode_to_vec(),
                })),
            }),
            ..Default::default()
        }
    }

    /// A TLS server on one end of a duplex pipe answering "pong" to "ping"; `client_ca`: it
    /// requires a client certificate from that CA.
    async fn serve(
        io: tokio::io::DuplexStream,
        cert: &str,
        key: &str,
        client_ca: Option<&str>,
    ) -> Result<Option<Vec<u8>>, String> {
        let provider = mesh::tls::provider();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                    roots.add(c.unwrap()).unwrap();
                }
                builder.with_client_cert_verifier(
                    rustls::server::WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider,
                    )
                    .build()
                    .unwrap(),
                )
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key).unwrap();
        let mut s = tokio_rustls::TlsAcceptor::from(Arc::new(config))
            .accept(io)
            .await
            .map_err(|e| e.to_string())?;
        let sni = s.get_ref().1.server_name().map(|n| n.as_bytes().to_vec());
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        s.write_all(b"pong").await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        Ok(sni)
    }

    async fn ping(tls: &UpstreamTls, io: tokio::io::DuplexStream) -> Result<(), String> {
        let mut c = handshake(tls, io, "10.0.0.1:443".parse().unwrap())
            .await
            .map_err(|e| e.to_string())?;
        c.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"pong");
        Ok(())
    }

    #[tokio::test]
    async fn simple_and_mutual_against_a_real_server() {
        let ca = mesh::ca::DevCa::generate("cluster.local").unwrap();
        let (cert, key) = ca
            .issue_server_pem(&["web.example".into()], Duration::from_secs(3600))
            .unwrap();
        // SIMPLE with the CA and the SNI: verified, SNI sent.
        let simple = tls_pb::UpstreamTlsContext {
            sni: "web.example".into(),
            common_tls_context: Some(tls_pb::CommonTlsContext {
                validation_context_type: Some(
                    tls_pb::common_tls_context::ValidationContextType::ValidationContext(
                        tls_pb::CertificateValidationContext {
                            trusted_ca: inline(ca.root_pem()),
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let tls = upstream_tls(&cluster_with(simple.clone()))
            .unwrap()
            .unwrap();
        assert!(tls.verified);
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (client, server) = tokio::join!(ping(&tls, a), serve(b, &cert, &key, None));
        client.unwrap();
        assert_eq!(server.unwrap().as_deref(), Some(&b"web.example"[..]));

        // The wrong name: refused.
        let wrong = tls_pb::UpstreamTlsContext {
            sni: "other.example".into(),
            ..simple.clone()
        };
        let tls = upstream_tls(&cluster_with(wrong)).unwrap().unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (client, _) = tokio::join!(ping(&tls, a), serve(b, &cert, &key, None));
        assert!(client.is_err());

        // MUTUAL: the server asks for a client certificate and gets ours.
        let (ccert, ckey) = ca
            .issue_pem(
                &mesh::identity::Identity::new("cluster.local", "demo", "client"),
                Duration::from_secs(3600),
            )
            .unwrap();
        let mut mutual = simple.clone();
        mutual.common_tls_context.as_mut().unwrap().tls_certificates =
            vec![tls_pb::TlsCertificate {
                certificate_chain: inline(&ccert),
                private_key: inline(&ckey),
                ..Default::default()
            }];
        let tls = upstream_tls(&cluster_with(mutual)).unwrap().unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (client, server) =
            tokio::join!(ping(&tls, a), serve(b, &cert, &key, Some(ca.root_pem())));
        client.unwrap();
        server.unwrap();
        // Without one, the same server refuses.
        let tls = upstream_tls(&cluster_with(simple)).unwrap().unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (_, server) = tokio::join!(ping(&tls, a), serve(b, &cert, &key, Some(ca.root_pem())));
        assert!(server.is_err());

        // No validation context: not verified (Envoy's behaviour), still encrypted.
        let tls = upstream_tls(&cluster_with(tls_pb::UpstreamTlsContext::default()))
            .unwrap()
            .unwrap();
        assert!(!tls.verified);
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (client, _) = tokio::join!(ping(&tls, a), serve(b, &cert, &key, None));
        client.unwrap();
    }

    #[test]
    fn bad_contexts_are_refused() {
        let mut c = cluster_with(tls_pb::UpstreamTlsContext {
            common_tls_context: Some(tls_pb::CommonTlsContext {
                validation_context_type: Some(
                    tls_pb::common_tls_context::ValidationContextType::ValidationContext(
                        tls_pb::CertificateValidationContext {
                            trusted_ca: Some(envoy_core::DataSource {
                                specifier: Some(envoy_core::data_source::Specifier::Filename(
                                    "/etc/ca.pem".into(),
                                )),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            }),
            ..Default::default()
        });
        let e = upstream_tls(&c).unwrap_err();
        assert!(e.contains("trusted_ca") && e.contains("inline"), "{e}");
        c.transport_socket.as_mut().unwrap().config_type = None;
        assert!(
            upstream_tls(&c)
                .unwrap_err()
                .contains("only envoy.transport_sockets.tls")
        );
        assert!(
            upstream_tls(&cluster_pb::Cluster::default())
                .unwrap()
                .is_none()
        );
    }
}
