//! pilot's own serving certificate on 15012: issued by its CA for its service names, renewed at half its lifetime, and handed to every new TLS connection (open ones keep theirs).
//!
//! tonic's built-in TLS takes one fixed identity, so the server runs on our own rustls
//! acceptor (TLS 1.3 and 1.2, ALPN `h2`) with a certificate resolver that can be swapped.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use mesh::ca::DevCa;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::roots::Roots;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

/// A TLS handshake that has not finished by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the gRPC server to take them.
const ACCEPTED_QUEUE: usize = 64;

/// The current serving certificate, read by every handshake.
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
    names: Vec<String>,
    ttl: Duration,
}

impl ServingCert {
    /// A first certificate for `names`, valid for `ttl`.
    pub fn issue(ca: &DevCa, names: &[String], ttl: Duration) -> anyhow::Result<Arc<ServingCert>> {
        Ok(Arc::new(ServingCert {
            current: RwLock::new(certified(ca, names, ttl)?),
            names: names.to_vec(),
            ttl,
        }))
    }

    /// Replace the certificate with a fresh one from `ca`.
    pub fn renew(&self, ca: &DevCa) -> anyhow::Result<()> {
        let fresh = certified(ca, &self.names, self.ttl)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// The DER of the certificate new connections get now.
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .cert[0]
            .clone()
    }

    /// Renew at half the lifetime, forever (a failure is retried a minute later).
    /// Renew at half the lifetime, and at once when another root starts signing (a rotation's
    /// `activate`), so that the serving certificate never outlives the trust in its root.
    pub async fn renew_forever(self: Arc<Self>, mut roots: watch::Receiver<Arc<Roots>>) {
        let mut wait = self.ttl / 2;
        let mut signing = roots.borrow_and_update().signing.root().clone();
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                changed = roots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = roots.borrow_and_update().signing.root().clone();
                    if now == signing {
                        continue;
                    }
                    signing = now;
                }
            }
            let this = self.clone();
            let current = roots.borrow().clone();
            // Key generation and signing: milliseconds of CPU, off the async threads.
            match tokio::task::spawn_blocking(move || this.renew(&current.signing)).await {
                Ok(Ok(())) => {
                    info!(ttl = ?self.ttl, "serving certificate renewed");
                    wait = self.ttl / 2;
                }
                Ok(Err(e)) => {
                    warn!("renewing the serving certificate: {e}");
                    wait = Duration::from_secs(60).min(self.ttl / 4);
                }
                Err(e) => {
                    warn!("renewing the serving certificate panicked: {e}");
                    wait = Duration::from_secs(60).min(self.ttl / 4);
                }
            }
        }
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

fn certified(ca: &DevCa, names: &[String], ttl: Duration) -> anyhow::Result<Arc<CertifiedKey>> {
    let (cert_pem, key_pem) = ca.issue_server_pem(names, ttl)?;
    let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes())?];
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let signing = rustls::crypto::aws_lc_rs::default_provider()
        .key_provider
        .load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// The TLS acceptor serving `cert` (HTTP/2 only, as gRPC). TLS 1.2 as well as 1.3, with
/// aws-lc-rs' default suites: Envoy's client speaks at most TLS 1.2 unless told otherwise
/// (the mesh's own HBONE TLS stays 1.3-only).
pub fn acceptor(cert: Arc<ServingCert>) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accept TCP connections on `listener` and hand them over once their TLS handshake is done;
/// handshakes run concurrently, each bounded by [`HANDSHAKE_TIMEOUT`], so one slow client never
/// holds the others back.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<tokio::net::TcpStream>>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        warn!("accepting on the xDS port: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, "TLS handshake on the xDS port: {e}"),
                    Err(_) => debug!(%peer, "TLS handshake on the xDS port timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_replaces_the_certificate_for_the_same_names() {
        let ca = DevCa::generate("cluster.local").unwrap();
        let names = vec!["pilot.istio-system.svc".to_string()];
        let cert = ServingCert::issue(&ca, &names, Duration::from_secs(60)).unwrap();
        let first = cert.leaf();
        cert.renew(&ca).unwrap();
        let second = cert.leaf();
        assert_ne!(first, second);
        let (_, parsed) = x509_parser::parse_x509_certificate(second.as_ref()).unwrap();
        let san = parsed.subject_alternative_name().unwrap().unwrap();
        assert!(format!("{:?}", san.value).contains("pilot.istio-system.svc"));
        let lifetime =
            parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp();
        assert_eq!(lifetime, 120, "the TTL plus a minute of back-dating");
    }
}
