//! A development certificate authority: signs workload certificates of Istio's shape locally
//! (P-256, empty subject, one SPIFFE URI SAN, serverAuth + clientAuth) from a root given on the
//! command line. The control plane's CA replaces it in production.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::Identity;
use crate::tls::WorkloadCert;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("assembling workload certificate: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// A root key and certificate that sign workload certificates.
pub struct DevCa {
    root_pem: String,
    root_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl DevCa {
    /// A fresh self-signed root, for demos and tests.
    pub fn generate(trust_domain: &str) -> Result<DevCa, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        // A name of its own, so that a leaf's issuer says which root signed it while two are
        // trusted during a rotation.
        let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
        dn.push(
            DnType::CommonName,
            format!("mesh root {stamp}-{:04x}", fastrand::u16(..)),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
        let cert = params.self_signed(&key)?;
        let root_pem = cert.pem();
        let root_der = cert.der().clone();
        Ok(DevCa {
            root_pem,
            root_der,
            issuer: Issuer::new(params, key),
        })
    }

    /// Load a root certificate and its PKCS#8 key from PEM files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<DevCa, CaError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let root_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        DevCa::from_pem(
            root_pem,
            &key_pem,
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        )
    }

    /// A root from its certificate and PKCS#8 key in PEM; `cert_origin` and `key_origin` name
    /// where they came from in errors (a file, a Secret's key).
    pub fn from_pem(
        root_pem: String,
        key_pem: &str,
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<DevCa, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Pem {
            path: key_origin.to_string(),
            reason: e.to_string(),
        })?;
        let root_der =
            CertificateDer::from_pem_slice(root_pem.as_bytes()).map_err(|e| CaError::Pem {
                path: cert_origin.to_string(),
                reason: e.to_string(),
            })?;
        // A key that is not the certificate's would sign leaves nobody can verify.
        let (_, parsed) =
            x509_parser::parse_x509_certificate(root_der.as_ref()).map_err(|e| CaError::Pem {
                path: cert_origin.to_string(),
                reason: e.to_string(),
            })?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::Pem {
                path: key_origin.to_string(),
                reason: format!("this key is not the key of the certificate in {cert_origin}"),
            });
        }
        let issuer = Issuer::from_ca_cert_pem(&root_pem, key).map_err(|e| CaError::Pem {
            path: cert_origin.to_string(),
            reason: e.to_string(),
        })?;
        Ok(DevCa {
            root_pem,
            root_der,
            issuer,
        })
    }

    /// The root's private key, PKCS#8 PEM (to keep it where the next start finds it).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Write the root certificate and key as PEM files (key readable by the owner only).
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::write(cert_path, &self.root_pem)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(key_path)?;
        std::io::Write::write_all(&mut f, self.key_pem().as_bytes())
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// Issue a certificate for `identity`, valid for `ttl` (back-dated a minute for clock skew).
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCert, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let cert = self
            .sign(identity, &key, now - Duration::from_secs(60), now + ttl)?
            .der()
            .clone();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(WorkloadCert::new(
            identity,
            vec![cert],
            key_der,
            vec![self.root_der.clone()],
        )?)
    }

    /// Issue a leaf and return PEM texts (cert, key): for peers outside our code, such as the
    /// interoperability tests.
    pub fn issue_pem(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let cert = self.sign(identity, &key, now - Duration::from_secs(60), now + ttl)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Sign a certificate request for `identity`: only the CSR's public key is used; the leaf
    /// gets Istio's shape whatever else the request asked for. Returns the leaf as PEM.
    pub fn sign_csr(
        &self,
        csr: &rcgen::CertificateSigningRequestParams,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<String, CaError> {
        let now = SystemTime::now();
        let params = leaf_params(identity, now - Duration::from_secs(60), now + ttl)?;
        let request = rcgen::CertificateSigningRequestParams {
            params,
            public_key: csr.public_key.clone(),
        };
        Ok(request.signed_by(&self.issuer)?.pem())
    }

    /// A TLS server certificate for the control plane itself (DNS SANs, serverAuth), as PEM
    /// (cert, key).
    pub fn issue_server_pem(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + ttl).into();
        Ok((
            params.signed_by(&key, &self.issuer)?.pem(),
            key.serialize_pem(),
        ))
    }

    fn sign(
        &self,
        identity: &Identity,
        key: &KeyPair,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<rcgen::Certificate, CaError> {
        let params = leaf_params(identity, not_before, not_after)?;
        Ok(params.signed_by(key, &self.issuer)?)
    }
}

/// Istio's workload certificate shape.
fn leaf_params(
    identity: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    {
        let mut params = CertificateParams::default();
        // Istio's workload certificates carry an empty subject; the identity is the URI SAN.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let mut serial = [0u8; 16];
        fastrand::fill(&mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        Ok(params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::LeafInfo;

    #[test]
    fn issues_istio_shaped_leaf() {
        let ca = DevCa::generate("cluster.local").unwrap();
        let id = Identity::new("cluster.local", "default", "reviews");
        let cert = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        let info = LeafInfo::parse(&cert.chain[0]).unwrap();
        assert_eq!(info.identities, vec![id.clone()]);
        let (_, x509) = x509_parser::parse_x509_certificate(cert.chain[0].as_ref()).unwrap();
        assert_eq!(x509.subject().iter().count(), 0, "subject must be empty");
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
        assert_eq!(lifetime, Duration::from_secs(3660));
    }

    #[test]
    fn a_key_that_is_not_the_roots_is_refused() {
        let (a, b) = (
            DevCa::generate("cluster.local").unwrap(),
            DevCa::generate("cluster.local").unwrap(),
        );
        assert_ne!(a.root(), b.root(), "each root has a name of its own");
        let err = DevCa::from_pem(a.root_pem().into(), &b.key_pem(), "a.pem", "b-key.pem")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("b-key.pem") && err.contains("a.pem"), "{err}");
        assert!(DevCa::from_pem(a.root_pem().into(), &a.key_pem(), "a", "k").is_ok());
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = std::env::temp_dir().join(format!("mesh-ca-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = DevCa::generate("cluster.local").unwrap();
        ca.save(&dir.join("root.pem"), &dir.join("key.pem"))
            .unwrap();
        let loaded = DevCa::load(&dir.join("root.pem"), &dir.join("key.pem")).unwrap();
        assert_eq!(loaded.root(), ca.root());
        let id = Identity::new("cluster.local", "a", "b");
        let (cert_pem, key_pem) = loaded.issue_pem(&id, Duration::from_secs(60)).unwrap();
        assert!(cert_pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(key_pem.contains("PRIVATE KEY"));
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        assert_eq!(LeafInfo::parse(&der).unwrap().identities, vec![id]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
