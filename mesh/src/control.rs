//! How a proxy reaches the control plane: TLS with the mesh root, the expected server name, and a bearer token read from a file on every connection (so it can be rotated).

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// `https://<host>:<port>`.
    pub address: String,
    /// PEM root(s) that sign the control plane's serving certificate.
    pub root_pem: String,
    /// The name the serving certificate must carry (no DNS here: we dial an address).
    pub server_name: String,
    pub token_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control plane address {address:?}: {error}")]
    Address {
        address: String,
        error: tonic::transport::Error,
    },
    #[error("reading token {path}: {error}")]
    Token { path: String, error: std::io::Error },
    #[error("token in {0} is not a valid header value")]
    BadToken(String),
}

impl ControlPlane {
    pub fn endpoint(&self) -> Result<Endpoint, ControlError> {
        let bad = |error| ControlError::Address {
            address: self.address.clone(),
            error,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.root_pem))
            .domain_name(&self.server_name);
        Ok(Endpoint::from_shared(self.address.clone())
            .map_err(bad)?
            .tls_config(tls)
            .map_err(bad)?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            // Notice a dead control plane (a cut link, a killed process) within seconds.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true))
    }

    /// `Bearer <token>` for the `authorization` header.
    pub fn bearer(&self) -> Result<MetadataValue<tonic::metadata::Ascii>, ControlError> {
        let token =
            std::fs::read_to_string(&self.token_file).map_err(|error| ControlError::Token {
                path: self.token_file.display().to_string(),
                error,
            })?;
        format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| ControlError::BadToken(self.token_file.display().to_string()))
    }
}
