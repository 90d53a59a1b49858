//! The `baggage` header a pod's proxies send about it (on its outbound CONNECTs and in its
//! inbound answers), encoded once per version of its workload record rather than per
//! connection.

use std::sync::{Arc, Mutex};

use mesh::hbone::Baggage;
use mesh::state::Workload;

/// Our workload's attributes for the peer's telemetry.
pub fn of(w: &Workload) -> Baggage {
    Baggage {
        cluster: w.cluster_id.clone(),
        namespace: w.namespace.clone(),
        workload_kind: if w.workload_type.is_empty() {
            "pod".into()
        } else {
            w.workload_type.clone()
        },
        workload_name: if w.workload_name.is_empty() {
            w.name.clone()
        } else {
            w.workload_name.clone()
        },
        service: w.canonical_name.clone(),
        version: w.canonical_revision.clone(),
    }
}

/// One pod's encoded baggage, for the workload record it was made from. The state replaces a
/// changed record with a new `Arc`, so holding the record and comparing addresses is enough
/// to notice a change.
#[derive(Default)]
pub struct Cached {
    last: Mutex<Option<(Arc<Workload>, Arc<str>)>>,
}

impl Cached {
    /// The header value for `w` (empty when there is nothing to say).
    pub fn get(&self, w: &Arc<Workload>) -> Arc<str> {
        let Ok(mut last) = self.last.lock() else {
            return of(w).encode().into();
        };
        match &*last {
            Some((made_from, value)) if Arc::ptr_eq(made_from, w) => value.clone(),
            _ => {
                let value: Arc<str> = of(w).encode().into();
                *last = Some((w.clone(), value.clone()));
                value
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_once_per_record() {
        let cached = Cached::default();
        let w = Arc::new(Workload {
            name: "web-1".into(),
            namespace: "shop".into(),
            workload_name: "web".into(),
            workload_type: "deployment".into(),
            cluster_id: "Kubernetes".into(),
            canonical_name: "web".into(),
            ..Default::default()
        });
        let first = cached.get(&w);
        assert_eq!(
            &*first,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=web,service.name=web"
        );
        assert!(Arc::ptr_eq(&first, &cached.get(&w)), "made once");
        // A new record (the workload changed) is encoded again.
        let changed = Arc::new(Workload {
            canonical_revision: "v2".into(),
            ..(*w).clone()
        });
        assert!(cached.get(&changed).ends_with(",service.version=v2"));
        // A pod without attributes still names its cluster (Istio's default), kind and name.
        let bare = Arc::new(Workload {
            name: "p".into(),
            ..Default::default()
        });
        assert_eq!(
            &*cached.get(&bare),
            "k8s.cluster.name=Kubernetes,k8s.pod.name=p"
        );
    }
}
