//! How a proxy reaches the control plane: TLS with the mesh root(s) and a bearer token, both read from their files on every connection (so they can be rotated: kubelet updates a mounted ConfigMap or token in place), and the expected server name. Several replicas may be named; a client that loses one moves to the next.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// `https://<host>:<port>`, or several of them comma-separated: replicas of the control
    /// plane serving the same configuration, tried in turn.
    pub address: String,
    /// PEM root(s) that sign the control plane's serving certificate.
    pub root_pem: String,
    /// Where `root_pem` came from: read again on every connection, so that a root rotation
    /// (the file then holds the old and the new root) reaches a running proxy.
    pub root_file: Option<PathBuf>,
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
    #[error("reading the control plane's root {path}: {error}")]
    Root { path: String, error: std::io::Error },
    #[error("token in {0} is not a valid header value")]
    BadToken(String),
}

impl ControlPlane {
    /// The replicas' addresses, in the order given.
    pub fn addresses(&self) -> Vec<&str> {
        self.address
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect()
    }

    /// The first replica's endpoint.
    pub fn endpoint(&self) -> Result<Endpoint, ControlError> {
        self.endpoint_at(0)
    }

    /// Replica `i`'s endpoint (counting round the list).
    pub fn endpoint_at(&self, i: usize) -> Result<Endpoint, ControlError> {
        let addresses = self.addresses();
        let address = match addresses.len() {
            0 => self.address.as_str(),
            n => addresses[i % n],
        };
        let bad = |error| ControlError::Address {
            address: address.to_string(),
            error,
        };
        let root = match &self.root_file {
            Some(path) => std::fs::read_to_string(path).map_err(|error| ControlError::Root {
                path: path.display().to_string(),
                error,
            })?,
            None => self.root_pem.clone(),
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root))
            .domain_name(&self.server_name);
        Ok(Endpoint::from_shared(address.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_in_turn() {
        let cp = ControlPlane {
            address: "https://10.0.0.1:15012, https://10.0.0.2:15012".into(),
            root_pem: String::new(),
            root_file: None,
            server_name: "pilot".into(),
            token_file: PathBuf::new(),
        };
        assert_eq!(
            cp.addresses(),
            ["https://10.0.0.1:15012", "https://10.0.0.2:15012"]
        );
        let uri = |i| cp.endpoint_at(i).unwrap().uri().to_string();
        assert_eq!(uri(0), "https://10.0.0.1:15012/");
        assert_eq!(uri(1), "https://10.0.0.2:15012/");
        assert_eq!(uri(2), "https://10.0.0.1:15012/");
    }
}
