//! The CA: `istio.v1.auth.IstioCertificateService/CreateCertificate`, with the CSR's shape checked and impersonation limited to node agents for pods on their node.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mesh::ca::DevCa;
use mesh::identity::Identity;
use mesh::proto::ca::istio_certificate_service_server::IstioCertificateService;
use mesh::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::auth::{Authenticator, Caller};
use crate::roots::{Roots, Stored};
use crate::server::Published;

/// Metadata key with which a node agent asks for a pod's identity.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The service account node agents run as, in the root namespace (when pilot is not told).
pub const NODE_AGENT_SERVICE_ACCOUNT: &str = "ztunnel";

/// Load the root from `dir` (`root-cert.pem`, `root-key.pem`), or generate and persist one.
pub fn load_or_create_root(dir: &Path, trust_domain: &str) -> anyhow::Result<DevCa> {
    let cert = dir.join("root-cert.pem");
    let key = dir.join("root-key.pem");
    if cert.exists() && key.exists() {
        info!(path = %cert.display(), "CA root loaded");
        return Ok(DevCa::load(&cert, &key)?);
    }
    std::fs::create_dir_all(dir)?;
    let ca = DevCa::generate(trust_domain)?;
    ca.save(&cert, &key)?;
    info!(path = %cert.display(), "CA root generated");
    Ok(ca)
}

/// The Secret holding the root in Kubernetes mode (in pilot's namespace), with istiod's
/// self-signed CA keys.
pub const ROOT_SECRET: &str = "istio-ca-secret";
const SECRET_CERT: &str = "ca-cert.pem";
const SECRET_KEY: &str = "ca-key.pem";

/// What [`root_from_secret`] does to Secrets: `(group, resource, verb)`, for the RBAC check.
pub fn secret_access() -> [(&'static str, &'static str, &'static str); 2] {
    [("", "secrets", "get"), ("", "secrets", "create")]
}

/// Kubernetes mode: the root from the Secret `istio-ca-secret` in `namespace`, or generated and
/// stored there on the first start. Replicas starting together agree: creating an existing
/// Secret fails, and the loser reads the winner's root.
pub async fn root_from_secret(
    client: kube::Client,
    namespace: &str,
    trust_domain: &str,
) -> anyhow::Result<DevCa> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, PostParams};

    let api: Api<Secret> = Api::namespaced(client, namespace);
    let origin = format!("Secret {namespace}/{ROOT_SECRET}");
    let from_secret = |s: Secret| -> anyhow::Result<DevCa> {
        let data = s.data.unwrap_or_default();
        let text = |key: &str| -> anyhow::Result<String> {
            let v = data
                .get(key)
                .ok_or_else(|| anyhow::anyhow!("{origin}: no key {key:?}"))?;
            String::from_utf8(v.0.clone())
                .map_err(|_| anyhow::anyhow!("{origin}: key {key:?} is not UTF-8 PEM"))
        };
        Ok(DevCa::from_pem(
            text(SECRET_CERT)?,
            &text(SECRET_KEY)?,
            &format!("{origin} key {SECRET_CERT}"),
            &format!("{origin} key {SECRET_KEY}"),
        )?)
    };
    if let Some(s) = api.get_opt(ROOT_SECRET).await? {
        info!(secret = %origin, "CA root loaded");
        return from_secret(s);
    }
    let ca = DevCa::generate(trust_domain)?;
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(ROOT_SECRET.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        type_: Some("istio.io/ca-root".into()),
        data: Some(
            [
                (
                    SECRET_CERT.to_string(),
                    ByteString(ca.root_pem().as_bytes().to_vec()),
                ),
                (
                    SECRET_KEY.to_string(),
                    ByteString(ca.key_pem().into_bytes()),
                ),
            ]
            .into(),
        ),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(secret = %origin, "CA root generated and stored");
            Ok(ca)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            // Another replica stored its root first: use that one.
            let s = api.get(ROOT_SECRET).await?;
            info!(secret = %origin, "CA root loaded (created by another replica)");
            from_secret(s)
        }
        Err(e) => Err(anyhow::anyhow!("storing the CA root in {origin}: {e}")),
    }
}

/// The data of the Secret `istio-ca-secret` in `namespace`, as text by key (for the roots and
/// their rotation).
pub async fn secret_stored(client: kube::Client, namespace: &str) -> anyhow::Result<Stored> {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::Api;
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let s = api.get(ROOT_SECRET).await?;
    let mut stored = Stored::new();
    for (k, v) in s.data.unwrap_or_default() {
        if let Ok(text) = String::from_utf8(v.0) {
            stored.insert(k, text);
        }
    }
    Ok(stored)
}

/// `pilot --source kubernetes rotate-root <step>`: the step applied to the Secret in one
/// update (refused if the Secret changed meanwhile).
pub async fn rotate_secret(
    client: kube::Client,
    namespace: &str,
    trust_domain: &str,
    step: crate::roots::Step,
) -> anyhow::Result<String> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, PostParams};
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let mut secret = api.get(ROOT_SECRET).await?;
    let data = secret.data.get_or_insert_with(Default::default);
    let stored: Stored = data
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.0.clone()).ok()?)))
        .collect();
    let names = crate::roots::SECRET;
    let writes = crate::roots::plan(step, &stored, &names, || Ok(DevCa::generate(trust_domain)?))?;
    for w in writes {
        match w {
            crate::roots::Write::Put(k, text) => {
                data.insert(k.to_string(), ByteString(text.into_bytes()));
            }
            crate::roots::Write::Remove(k) => {
                data.remove(k);
            }
        }
    }
    // The resourceVersion read above makes the update fail if another writer came between.
    api.replace(ROOT_SECRET, &PostParams::default(), &secret)
        .await?;
    let after = secret_stored(api.into_client(), namespace).await?;
    let roots = crate::roots::load(&after, &names, &format!("Secret {namespace}/{ROOT_SECRET}"))?;
    Ok(format!(
        "{step:?} done: {} root(s) trusted in Secret {namespace}/{ROOT_SECRET}; wait at least one certificate lifetime before the next step",
        roots.count()
    ))
}

pub struct CaService {
    pub roots: watch::Receiver<Arc<Roots>>,
    pub auth: Authenticator,
    pub published: watch::Receiver<Arc<Published>>,
    pub trust_domain: String,
    /// What a node agent gets for itself (without impersonating).
    pub node_agent: Identity,
    pub max_ttl: Duration,
}

impl CaService {
    /// Which identity `caller` may get a certificate for, given the request's metadata.
    fn allowed_identity(
        &self,
        caller: &Caller,
        req: &IstioCertificateRequest,
    ) -> Result<Identity, Status> {
        let impersonated = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        match (caller, impersonated) {
            (Caller::NodeAgent { node }, Some(id)) => {
                let id: Identity = id.parse().map_err(|e| {
                    Status::invalid_argument(format!("{IMPERSONATED_IDENTITY}: {e}"))
                })?;
                let published = self.published.borrow().clone();
                let on_node = published.snapshot.pods.values().any(|p| {
                    &p.node_name == node
                        && p.meta.namespace == id.namespace
                        && p.service_account == id.service_account
                });
                if id.trust_domain != self.trust_domain || !on_node {
                    return Err(Status::permission_denied(format!(
                        "node {node} has no pod running as {id}"
                    )));
                }
                Ok(id)
            }
            (Caller::NodeAgent { .. }, None) => Ok(self.node_agent.clone()),
            (Caller::Workload { identity }, None) => Ok(identity.clone()),
            (Caller::Workload { identity }, Some(_)) => Err(Status::permission_denied(format!(
                "{identity} is not a node agent: it may not impersonate"
            ))),
        }
    }
}

/// The shape Istio's CSRs have: ECDSA P-256 with SHA-256, a valid signature, and exactly one
/// SAN, a URI with a workload SPIFFE id. Returns the parsed request and that id.
pub fn check_csr(pem: &str) -> Result<(rcgen::CertificateSigningRequestParams, Identity), String> {
    use x509_parser::prelude::FromDer;
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("csr is not PEM: {e}"))?;
    if block.label != "CERTIFICATE REQUEST" {
        return Err(format!(
            "csr is a PEM {:?} block, not a CERTIFICATE REQUEST",
            block.label
        ));
    }
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&block.contents)
            .map_err(|e| format!("csr is not a PKCS#10 request: {e}"))?;
    let ecdsa_sha256 = x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256;
    if csr.signature_algorithm.algorithm != ecdsa_sha256 {
        return Err(format!(
            "csr is signed with {}, expected ECDSA with SHA-256",
            csr.signature_algorithm.algorithm
        ));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let p256 = x509_parser::oid_registry::OID_EC_P256;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if curve.as_ref() != Some(&p256) {
        return Err("csr key is not ECDSA P-256".into());
    }
    let params = rcgen::CertificateSigningRequestParams::from_der(&block.contents.clone().into())
        .map_err(|e| format!("csr rejected: {e}"))?;
    let mut ids = Vec::new();
    for san in &params.params.subject_alt_names {
        match san {
            rcgen::SanType::URI(uri) => ids.push(uri.as_str().to_string()),
            other => return Err(format!("csr has a SAN other than a SPIFFE URI: {other:?}")),
        }
    }
    let [id] = ids.as_slice() else {
        return Err(format!(
            "csr must have exactly one URI SAN, has {}",
            ids.len()
        ));
    };
    let id: Identity = id.parse().map_err(|e| format!("csr SAN: {e}"))?;
    Ok((params, id))
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let req = request.into_inner();
        let allowed = self.allowed_identity(&caller, &req)?;
        let (csr, requested) = check_csr(&req.csr).map_err(Status::invalid_argument)?;
        if requested != allowed {
            warn!(?caller, %requested, %allowed, "certificate refused");
            return Err(Status::permission_denied(format!(
                "the CSR asks for {requested}, but this caller may only get {allowed}"
            )));
        }
        let ttl = match req.validity_duration {
            d if d <= 0 => Duration::from_secs(24 * 3600),
            d => Duration::from_secs(d as u64),
        }
        .min(self.max_ttl);
        let roots = self.roots.borrow().clone();
        let leaf = roots
            .signing
            .sign_csr(&csr, &requested, ttl)
            .map_err(|e| Status::internal(e.to_string()))?;
        info!(identity = %requested, ?ttl, ?caller, "certificate issued");
        // The leaf, then every trusted root in one element (during a rotation the old and the
        // new one), as istiod answers.
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![leaf, roots.bundle_pem().to_string()],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(sans: Vec<rcgen::SanType>) -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn csr_shapes() {
        let uri = |s: &str| rcgen::SanType::URI(s.try_into().unwrap());
        let (_, id) = check_csr(&csr_for(vec![uri("spiffe://cluster.local/ns/a/sa/b")])).unwrap();
        assert_eq!(id, Identity::new("cluster.local", "a", "b"));
        let err = |pem: &str| check_csr(pem).unwrap_err();
        assert!(err("garbage").contains("not PEM"), "{}", err("garbage"));
        assert!(err(&csr_for(vec![])).contains("exactly one URI SAN"));
        assert!(
            err(&csr_for(vec![rcgen::SanType::DnsName(
                "x".try_into().unwrap()
            )]))
            .contains("other than a SPIFFE URI")
        );
        assert!(err(&csr_for(vec![uri("spiffe://cluster.local/x")])).contains("SAN"));
        let ca = DevCa::generate("cluster.local").unwrap();
        assert!(err(ca.root_pem()).contains("not a CERTIFICATE REQUEST"));
    }
}
