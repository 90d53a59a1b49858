//! A delta ADS client for proxies: the protocol state (versions held, ACK/NACK) kept apart from the reconnecting tonic stream, with backoff from 10 ms to 15 s.
//!
//! A NACK names the resources it rejects, so that the control plane knows the rest of the
//! response was applied (a partial NACK). The names are at the start of
//! `error_detail.message`, one per line as `rejected: <name>`, and the list ends with an empty
//! line, followed by the human-readable reasons:
//!
//! ```text
//! rejected: shop/web.shop.svc.cluster.local
//! rejected: uid-1234
//!
//! uid-1234: workload has no address
//! ```
//!
//! A message that does not start that way (Envoy's, or one whose names cannot be written
//! because a name is empty or holds a line break) means the whole response was rejected.
//! `nack_message` writes this form and `rejected_names` reads it (pilot uses the latter).

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::control::ControlPlane;

pub const FIRST_BACKOFF: Duration = Duration::from_millis(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// gRPC's INVALID_ARGUMENT, the code a NACK carries.
const INVALID_ARGUMENT: i32 = 3;

/// One resource as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub name: String,
    pub version: String,
    pub body: Vec<u8>,
}

/// What one response asks the proxy to change, for one type.
#[derive(Debug, Clone)]
pub struct Update {
    pub type_url: String,
    pub updated: Vec<Received>,
    pub removed: Vec<String>,
}

/// Resources a handler refused; the rest of the update was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Every resource of the update not applied: updated ones (the previous version stays)
    /// and removed ones (still held). Empty: nothing of the update was applied.
    pub names: Vec<String>,
    pub message: String,
}

/// Starts each line of a NACK's list of rejected resources (see the module's documentation).
pub const REJECTED_PREFIX: &str = "rejected: ";

/// The `error_detail.message` of a NACK rejecting `names` for `reasons`: the names one per
/// line as `rejected: <name>`, an empty line, then the reasons. When the names cannot be
/// written unambiguously (none, an empty one, or one with a line break) only the reasons are
/// sent, which the control plane reads as "the whole response was rejected".
pub fn nack_message(names: &[String], reasons: &str) -> String {
    let writable = !names.is_empty()
        && names
            .iter()
            .all(|n| !n.is_empty() && !n.contains(['\n', '\r']));
    if !writable {
        // Reasons that happen to look like a list must not be read as one.
        return if reasons.starts_with(REJECTED_PREFIX) {
            format!("\n{reasons}")
        } else {
            reasons.to_string()
        };
    }
    let mut out = String::with_capacity(
        names
            .iter()
            .map(|n| n.len() + REJECTED_PREFIX.len() + 1)
            .sum::<usize>()
            + 1
            + reasons.len(),
    );
    for n in names {
        out.push_str(REJECTED_PREFIX);
        out.push_str(n);
        out.push('\n');
    }
    out.push('\n');
    out.push_str(reasons);
    out
}

/// The resources a NACK's message names as rejected, or `None` when it names none in the
/// form `nack_message` writes: then the whole response counts as rejected.
pub fn rejected_names(message: &str) -> Option<Vec<&str>> {
    let mut names = Vec::new();
    for line in message.split('\n') {
        if line.is_empty() {
            // The list ends with an empty line; an empty list is no list.
            return (!names.is_empty()).then_some(names);
        }
        match line.strip_prefix(REJECTED_PREFIX) {
            Some(name) if !name.is_empty() => names.push(name),
            _ => return None,
        }
    }
    // No empty line after the names: not this form.
    None
}

/// The proxy side: applies updates to its state.
pub trait Handler: Send + 'static {
    /// Apply what is valid; name what is not (an updated resource keeps its previous version,
    /// a removed one stays), which is NACKed. Naming nothing means nothing was applied.
    fn apply(&mut self, update: Update) -> Result<(), Rejected>;
    /// The stream to the control plane went up (`true`) or down.
    fn connection(&mut self, _up: bool) {}
}

/// The protocol state of the client: what it holds, by type and name.
#[derive(Debug)]
pub struct ClientState {
    node: Node,
    types: Vec<String>,
    held: HashMap<String, HashMap<String, String>>,
}

impl ClientState {
    pub fn new(node_id: String, types: Vec<String>) -> Self {
        ClientState {
            node: Node {
                id: node_id,
                ..Default::default()
            },
            types,
            held: HashMap::new(),
        }
    }

    /// The subscriptions that open a stream: wildcard, with what we already hold so that a
    /// reconnect does not resend everything.
    pub fn initial_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        self.types
            .iter()
            .enumerate()
            .map(|(i, t)| DeltaDiscoveryRequest {
                node: (i == 0).then(|| self.node.clone()),
                type_url: t.clone(),
                initial_resource_versions: self
                    .held
                    .get(t)
                    .map(|h| h.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .unwrap_or_default(),
                ..Default::default()
            })
            .collect()
    }

    /// Apply a response through `handler` and return the ACK or NACK to send.
    pub fn on_response(
        &mut self,
        resp: DeltaDiscoveryResponse,
        handler: &mut dyn Handler,
    ) -> DeltaDiscoveryRequest {
        let update = Update {
            type_url: resp.type_url.clone(),
            updated: resp
                .resources
                .into_iter()
                .map(|r| Received {
                    name: r.name,
                    version: r.version,
                    body: r.resource.map(|a| a.value).unwrap_or_default(),
                })
                .collect(),
            removed: resp.removed_resources,
        };
        let versions: Vec<(String, String)> = update
            .updated
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        let removed = update.removed.clone();
        let result = handler.apply(update);
        let held = self.held.entry(resp.type_url.clone()).or_default();
        let rejected: std::collections::HashSet<&str> = match &result {
            Ok(()) => Default::default(),
            Err(r) => r.names.iter().map(String::as_str).collect(),
        };
        // A rejection naming nothing rejected all of it: nothing changed.
        let applied_any = !matches!(&result, Err(r) if r.names.is_empty());
        if applied_any {
            for (name, version) in versions {
                if !rejected.contains(name.as_str()) {
                    held.insert(name, version);
                }
            }
            for name in removed {
                if !rejected.contains(name.as_str()) {
                    held.remove(&name);
                }
            }
        }
        DeltaDiscoveryRequest {
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            error_detail: result.err().map(|r| Status {
                code: INVALID_ARGUMENT,
                message: nack_message(&r.names, &r.message),
                details: vec![],
            }),
            ..Default::default()
        }
    }

    pub fn held(&self, type_url: &str) -> usize {
        self.held.get(type_url).map(|h| h.len()).unwrap_or(0)
    }
}

/// Follow the control plane forever: connect, subscribe, apply, ACK/NACK; on any failure
/// reconnect after a backoff that starts at 10 ms and doubles up to 15 s (reset once a
/// response has been received), to the next replica when several are named. The reconnect
/// carries the versions held, so a replica serving the same configuration resends nothing.
pub async fn run(cp: ControlPlane, mut state: ClientState, mut handler: Box<dyn Handler>) {
    let mut backoff = FIRST_BACKOFF;
    let mut replica = 0;
    loop {
        let mut received = false;
        let result = stream_once(&cp, replica, &mut state, handler.as_mut(), &mut received).await;
        handler.connection(false);
        if received {
            backoff = FIRST_BACKOFF;
        }
        let addresses = cp.addresses();
        let address = addresses
            .get(replica % addresses.len().max(1))
            .copied()
            .unwrap_or(cp.address.as_str());
        match result {
            Ok(()) => info!(retry_in = ?backoff, %address, "control plane closed the xDS stream"),
            Err(e) => warn!(retry_in = ?backoff, "xDS stream to {address}: {e}"),
        }
        replica = replica.wrapping_add(1);
        // Jitter, so that a restarted control plane is not hit by every proxy at once.
        let jitter = backoff.mul_f64(fastrand::f64() * 0.2);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn stream_once(
    cp: &ControlPlane,
    replica: usize,
    state: &mut ClientState,
    handler: &mut dyn Handler,
    received: &mut bool,
) -> anyhow::Result<()> {
    let channel = cp.endpoint_at(replica)?.connect().await?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(16);
    for r in state.initial_requests() {
        tx.send(r).await?;
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert("authorization", cp.bearer()?);
    let mut responses = client
        .delta_aggregated_resources(request)
        .await?
        .into_inner();
    handler.connection(true);
    while let Some(resp) = responses.message().await? {
        *received = true;
        let reply = state.on_response(resp, handler);
        if let Some(e) = &reply.error_detail {
            warn!(type_url = %reply.type_url, "rejecting (NACK): {}", e.message);
        }
        tx.send(reply).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::Resource;

    struct Rejecting;

    impl Handler for Rejecting {
        fn apply(&mut self, update: Update) -> Result<(), Rejected> {
            let bad: Vec<String> = update
                .updated
                .iter()
                .filter(|r| r.body == b"bad")
                .map(|r| r.name.clone())
                .collect();
            if bad.is_empty() {
                Ok(())
            } else {
                Err(Rejected {
                    names: bad,
                    message: "bad resource".into(),
                })
            }
        }
    }

    fn resp(
        nonce: &str,
        items: &[(&str, &str, &[u8])],
        removed: &[&str],
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: "t".into(),
            nonce: nonce.into(),
            resources: items
                .iter()
                .map(|(n, v, b)| Resource {
                    name: n.to_string(),
                    version: v.to_string(),
                    resource: Some(envoy_types::pb::google::protobuf::Any {
                        type_url: "t".into(),
                        value: b.to_vec(),
                    }),
                    ..Default::default()
                })
                .collect(),
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn ack_nack_and_initial_versions() {
        let mut s = ClientState::new(
            "ztunnel~1.2.3.4~a.b~b.svc.cluster.local".into(),
            vec!["t".into()],
        );
        let first = s.initial_requests();
        assert_eq!(
            first[0].node.as_ref().unwrap().id,
            "ztunnel~1.2.3.4~a.b~b.svc.cluster.local"
        );
        assert!(first[0].initial_resource_versions.is_empty());
        let ack = s.on_response(
            resp("1", &[("a", "1", b"ok"), ("b", "1", b"ok")], &[]),
            &mut Rejecting,
        );
        assert_eq!(ack.response_nonce, "1");
        assert!(ack.error_detail.is_none());
        let nack = s.on_response(
            resp("2", &[("a", "2", b"bad"), ("c", "1", b"ok")], &["b"]),
            &mut Rejecting,
        );
        assert_eq!(
            nack.error_detail.unwrap().message,
            "rejected: a\n\nbad resource"
        );
        let again = s.initial_requests();
        let v = &again[0].initial_resource_versions;
        assert_eq!(
            v.get("a").map(String::as_str),
            Some("1"),
            "the rejected version is not held"
        );
        assert_eq!(v.get("c").map(String::as_str), Some("1"));
        assert!(!v.contains_key("b"));
    }

    /// Rejects everything, removals included, naming them (as ztunnel does when an update
    /// conflicts with what it holds), or naming nothing.
    struct RejectingAll {
        name_them: bool,
    }

    impl Handler for RejectingAll {
        fn apply(&mut self, update: Update) -> Result<(), Rejected> {
            let names = if self.name_them {
                update
                    .updated
                    .iter()
                    .map(|r| r.name.clone())
                    .chain(update.removed.iter().cloned())
                    .collect()
            } else {
                vec![]
            };
            Err(Rejected {
                names,
                message: "conflict".into(),
            })
        }
    }

    #[test]
    fn rejected_removals_and_unnamed_rejections_keep_what_is_held() {
        for name_them in [true, false] {
            let mut s = ClientState::new("n".into(), vec!["t".into()]);
            s.on_response(resp("1", &[("a", "1", b"ok")], &[]), &mut Rejecting);
            let nack = s.on_response(
                resp("2", &[("b", "1", b"ok")], &["a"]),
                &mut RejectingAll { name_them },
            );
            let message = nack.error_detail.unwrap().message;
            if name_them {
                assert_eq!(message, "rejected: b\nrejected: a\n\nconflict");
            } else {
                assert_eq!(message, "conflict");
                assert_eq!(rejected_names(&message), None);
            }
            let v = &s.initial_requests()[0].initial_resource_versions;
            assert_eq!(v.len(), 1, "{v:?}");
            assert_eq!(v["a"], "1", "the refused removal leaves it held");
        }
    }

    #[test]
    fn nack_message_round_trips_and_other_messages_name_nothing() {
        let names = vec![
            "shop/web.shop.svc.cluster.local".to_string(),
            "uid-1".into(),
        ];
        let m = nack_message(&names, "uid-1: no address\nsecond line");
        assert_eq!(
            m,
            "rejected: shop/web.shop.svc.cluster.local\nrejected: uid-1\n\nuid-1: no address\nsecond line"
        );
        assert_eq!(
            rejected_names(&m),
            Some(vec!["shop/web.shop.svc.cluster.local", "uid-1"])
        );
        // No reasons: still a list.
        assert_eq!(
            rejected_names(&nack_message(&names[..1], "")),
            Some(vec!["shop/web.shop.svc.cluster.local"])
        );
        // Envoy's messages, and lists not ended by an empty line or holding other lines.
        for other in [
            "",
            "Proto constraint validation failed (ClusterValidationError.Name: value length must be at least 1 characters)",
            "rejected: a",
            "rejected: a\nsomething else\n\nwhy",
            "rejected: \n\nwhy",
            "\nrejected: a\n\nwhy",
        ] {
            assert_eq!(rejected_names(other), None, "{other:?}");
        }
        // Names that cannot be written: only the reasons, read as "all rejected".
        for bad in [vec![], vec!["a\nb".to_string()], vec![String::new()]] {
            assert_eq!(rejected_names(&nack_message(&bad, "why")), None);
        }
        assert_eq!(
            rejected_names(&nack_message(&[], "rejected: x\n\nlooks like a list")),
            None
        );
    }
}
