//! Wire helpers shared by the tests against a running pilot: a hand-driven delta ADS stream and a CA call, both real tonic clients over TLS.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status;
use mesh::control::ControlPlane;
use mesh::proto::ca::IstioCertificateRequest;
use mesh::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// A hand-driven delta ADS stream: the test decides what to ACK or NACK.
pub struct Stream {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl Stream {
    pub async fn open(
        cp: &ControlPlane,
        initial: &[(&str, HashMap<String, String>)],
    ) -> Result<Stream, tonic::Status> {
        Stream::open_as(cp, "", initial).await
    }

    /// As `open`, the first request naming the node `node_id` (when not empty).
    pub async fn open_as(
        cp: &ControlPlane,
        node_id: &str,
        initial: &[(&str, HashMap<String, String>)],
    ) -> Result<Stream, tonic::Status> {
        let channel = cp.endpoint().unwrap().connect().await.unwrap();
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(16);
        for (i, (type_url, versions)) in initial.iter().enumerate() {
            tx.send(DeltaDiscoveryRequest {
                type_url: type_url.to_string(),
                initial_resource_versions: versions.clone(),
                node: (i == 0 && !node_id.is_empty()).then(|| Node {
                    id: node_id.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("authorization", cp.bearer().unwrap());
        let rx = client.delta_aggregated_resources(req).await?.into_inner();
        Ok(Stream { tx, rx })
    }

    pub async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a response within 5 s")
            .unwrap()
            .unwrap()
    }

    pub async fn nothing_for(&mut self, d: Duration) {
        if let Ok(r) = tokio::time::timeout(d, self.rx.message()).await {
            panic!("unexpected response: {r:?}");
        }
    }

    /// Send `req` as it is (subscriptions by name, on-demand lookups).
    pub async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    pub async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.reply(r, None).await
    }

    pub async fn reply(&self, r: &DeltaDiscoveryResponse, error: Option<&str>) {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                error_detail: error.map(|e| Status {
                    code: 3,
                    message: e.into(),
                    details: vec![],
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

pub fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

pub fn versions(r: &DeltaDiscoveryResponse) -> HashMap<String, String> {
    r.resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}

/// `CreateCertificate` for `csr`, impersonating `impersonate` when given.
pub async fn create(
    cp: &ControlPlane,
    csr: String,
    impersonate: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let channel = cp.endpoint().unwrap().connect().await.unwrap();
    let mut metadata = prost_types::Struct::default();
    if let Some(id) = impersonate {
        metadata.fields.insert(
            "ImpersonatedIdentity".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.into())),
            },
        );
    }
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 7 * 24 * 3600,
        metadata: Some(metadata),
    });
    req.metadata_mut()
        .insert("authorization", cp.bearer().unwrap());
    Ok(IstioCertificateServiceClient::new(channel)
        .create_certificate(req)
        .await?
        .into_inner()
        .cert_chain)
}

/// The response to a plain HTTP/1.1 GET, headers and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: pilot\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}
