//! Certificates from the control plane's CA: a CSR per identity (`ImpersonatedIdentity` for the pods of this node, or the caller's own identity for a waypoint), checked on return.

use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::certs::{BoxFuture, CertSource};
use crate::control::ControlPlane;
use crate::identity::Identity;
use crate::proto::ca::IstioCertificateRequest;
use crate::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::tls::WorkloadCert;

pub struct CaClient {
    pub control: ControlPlane,
    pub ttl: Duration,
}

/// A CSR of Istio's shape (P-256, empty subject, one SPIFFE URI SAN) and its key.
pub fn csr(identity: &Identity) -> Result<(String, KeyPair), String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        identity
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| e.to_string())?,
    )];
    let pem = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| e.to_string())?;
    Ok((pem, key))
}

/// The response's chain: leaf and intermediates, then the roots (the last element, which may
/// hold several PEM blocks).
pub fn parse_chain(
    chain: &[String],
) -> Result<(Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>), String> {
    let (roots, certs) = chain.split_last().ok_or("the CA returned an empty chain")?;
    let parse = |pem: &str| -> Result<Vec<CertificateDer<'static>>, String> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the CA returned a bad certificate: {e}"))
    };
    let mut leaf_chain = Vec::new();
    for c in certs {
        leaf_chain.extend(parse(c)?);
    }
    Ok((leaf_chain, parse(roots)?))
}

/// A CA client for the caller's own identity (a waypoint): the CSR is sent without
/// `ImpersonatedIdentity`, so the CA issues the identity its token authenticates.
pub struct OwnIdentityCaClient(pub CaClient);

impl CertSource for OwnIdentityCaClient {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, String>> {
        Box::pin(self.0.request(id, false))
    }
}

impl CaClient {
    /// A connection to the first replica of the CA that answers.
    async fn connect(&self) -> Result<tonic::transport::Channel, String> {
        let mut errors = Vec::new();
        for i in 0..self.control.addresses().len().max(1) {
            match self.control.endpoint_at(i) {
                Ok(e) => match e.connect().await {
                    Ok(c) => return Ok(c),
                    Err(e) => errors.push(e.to_string()),
                },
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(format!(
            "connecting to the CA at {}: {}",
            self.control.address,
            errors.join("; ")
        ))
    }

    async fn request(&self, id: &Identity, impersonate: bool) -> Result<WorkloadCert, String> {
        let (csr, key) = csr(id)?;
        let channel = self.connect().await?;
        let metadata = impersonate.then(|| {
            let mut metadata = prost_types::Struct::default();
            metadata.fields.insert(
                "ImpersonatedIdentity".into(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
                },
            );
            metadata
        });
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: self.ttl.as_secs() as i64,
            metadata,
        });
        request.metadata_mut().insert(
            "authorization",
            self.control.bearer().map_err(|e| e.to_string())?,
        );
        let response = IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
            .map_err(|s| format!("CA refused: {}", s.message()))?
            .into_inner();
        let (chain, roots) = parse_chain(&response.cert_chain)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        // `WorkloadCert::new` checks the leaf carries exactly the identity asked for.
        WorkloadCert::new(id, chain, key, roots).map_err(|e| e.to_string())
    }
}

impl CertSource for CaClient {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, String>> {
        Box::pin(self.request(id, true))
    }
}
