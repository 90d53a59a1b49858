//! Workload certificates on a node: fetched on first use from a `CertSource` (the development CA
//! now, the control plane's CA later), shared, rotated at half-life with backoff on failure, and
//! dropped when the last workload using an identity goes away.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::identity::Identity;
use crate::tls::WorkloadCert;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where certificates come from.
pub trait CertSource: Send + Sync + 'static {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, String>>;
}

/// The development CA signs locally.
pub struct DevCaSource {
    pub ca: crate::ca::DevCa,
    pub ttl: Duration,
}

impl CertSource for DevCaSource {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, String>> {
        Box::pin(async move { self.ca.issue(id, self.ttl).map_err(|e| e.to_string()) })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no certificate for {identity} yet: {reason}")]
    Unavailable { identity: Identity, reason: String },
}

/// The certificates of the identities on this node.
#[derive(Clone)]
pub struct CertCache {
    source: Arc<dyn CertSource>,
    entries: Arc<Mutex<HashMap<Identity, Entry>>>,
}

type Slot = Result<Arc<WorkloadCert>, String>;

struct Entry {
    current: watch::Receiver<Option<Slot>>,
    users: usize,
    rotation: tokio::task::AbortHandle,
}

/// A row of the admin dump.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertInfo {
    pub identity: String,
    pub state: String,
    pub not_before: Option<u64>,
    pub not_after: Option<u64>,
    pub refresh_at: Option<u64>,
    pub users: usize,
    /// The leaf's issuer (which root signed it, while two are trusted during a rotation).
    pub issuer: Option<String>,
    /// The subject of every root this certificate's holder trusts.
    pub roots: Vec<String>,
}

fn issuer(der: &rustls_pki_types::CertificateDer<'_>) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(c.issuer().to_string())
}

fn subject(der: &rustls_pki_types::CertificateDer<'_>) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(c.subject().to_string())
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long `get` waits for a first certificate before failing the connection that wants it.
const FETCH_WAIT: Duration = Duration::from_secs(10);

impl CertCache {
    pub fn new(source: Arc<dyn CertSource>) -> Self {
        CertCache {
            source,
            entries: Arc::default(),
        }
    }

    /// A workload with this identity appeared: start fetching and rotating its certificate.
    pub fn track(&self, id: &Identity) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if let Some(e) = entries.get_mut(id) {
            e.users += 1;
            return;
        }
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(rotate(self.source.clone(), id.clone(), tx));
        entries.insert(
            id.clone(),
            Entry {
                current: rx,
                users: 1,
                rotation: task.abort_handle(),
            },
        );
    }

    /// A workload with this identity went away; the last one drops the certificate.
    pub fn untrack(&self, id: &Identity) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if let Some(e) = entries.get_mut(id) {
            e.users -= 1;
            if e.users == 0 {
                e.rotation.abort();
                entries.remove(id);
                info!(identity = %id, "certificate dropped: no workload uses it");
            }
        }
    }

    /// The current certificate, waiting for the first fetch if needed. The identity must be tracked.
    pub async fn get(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let unavailable = |reason: String| CertError::Unavailable {
            identity: id.clone(),
            reason,
        };
        let mut rx = {
            let entries = self
                .entries
                .lock()
                .map_err(|e| unavailable(e.to_string()))?;
            match entries.get(id) {
                Some(e) => e.current.clone(),
                None => return Err(unavailable("no local workload has this identity".into())),
            }
        };
        let waited = {
            let wait = rx.wait_for(|c| matches!(c, Some(Ok(_))));
            match tokio::time::timeout(FETCH_WAIT, wait).await {
                Ok(Ok(slot)) => match slot.as_ref() {
                    Some(Ok(cert)) => Some(Ok(cert.clone())),
                    _ => Some(Err("no certificate".to_string())),
                },
                Ok(Err(_)) => Some(Err("identity no longer tracked".to_string())),
                Err(_) => None,
            }
        };
        match waited {
            Some(Ok(cert)) => Ok(cert),
            Some(Err(reason)) => Err(unavailable(reason)),
            None => {
                let reason = match rx.borrow().as_ref() {
                    Some(Err(e)) => e.clone(),
                    _ => "timed out waiting for the CA".into(),
                };
                Err(unavailable(reason))
            }
        }
    }

    /// True when every tracked identity has a certificate (for readiness).
    pub fn all_ready(&self) -> bool {
        self.entries
            .lock()
            .map(|e| {
                e.values()
                    .all(|e| matches!(e.current.borrow().as_ref(), Some(Ok(_))))
            })
            .unwrap_or(false)
    }

    pub fn dump(&self) -> Vec<CertInfo> {
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        };
        let Ok(entries) = self.entries.lock() else {
            return vec![];
        };
        let mut rows: Vec<CertInfo> = entries
            .iter()
            .map(|(id, e)| {
                let current = e.current.borrow();
                let (state, cert) = match current.as_ref() {
                    Some(Ok(c)) => ("available".to_string(), Some(c.clone())),
                    Some(Err(err)) => (format!("failed: {err}"), None),
                    None => ("initializing".to_string(), None),
                };
                CertInfo {
                    identity: id.to_string(),
                    state,
                    not_before: cert.as_ref().and_then(|c| secs(c.not_before)),
                    not_after: cert.as_ref().and_then(|c| secs(c.not_after)),
                    refresh_at: cert.as_ref().and_then(|c| secs(c.refresh_at())),
                    users: e.users,
                    issuer: cert.as_ref().and_then(|c| c.chain.first()).and_then(issuer),
                    roots: cert
                        .as_ref()
                        .map(|c| c.roots.iter().filter_map(subject).collect())
                        .unwrap_or_default(),
                }
            })
            .collect();
        rows.sort_by(|a, b| a.identity.cmp(&b.identity));
        rows
    }
}

/// Fetch, publish, sleep until half-life, repeat; back off exponentially on failure while the
/// previous certificate (if any) stays in use.
async fn rotate(source: Arc<dyn CertSource>, id: Identity, tx: watch::Sender<Option<Slot>>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        match source.fetch(&id).await {
            Ok(cert) => {
                backoff = FIRST_BACKOFF;
                let refresh = cert
                    .refresh_at()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                info!(identity = %id, refresh_in = ?refresh, "certificate issued");
                tx.send_replace(Some(Ok(Arc::new(cert))));
                tokio::time::sleep(refresh.max(Duration::from_secs(1))).await;
            }
            Err(e) => {
                warn!(identity = %id, retry_in = ?backoff, "certificate fetch failed: {e}");
                tx.send_if_modified(|slot| match slot {
                    Some(Ok(_)) => false,
                    other => {
                        *other = Some(Err(e.clone()));
                        true
                    }
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Flaky {
        ca: crate::ca::DevCa,
        calls: AtomicUsize,
        fail_first: usize,
        ttl: Duration,
    }

    impl CertSource for Flaky {
        fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, String>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                if n < self.fail_first {
                    return Err("CA unreachable".into());
                }
                self.ca.issue(id, self.ttl).map_err(|e| e.to_string())
            })
        }
    }

    #[tokio::test]
    async fn retries_then_rotates_and_drops() {
        let source = Arc::new(Flaky {
            ca: crate::ca::DevCa::generate("cluster.local").unwrap(),
            calls: AtomicUsize::new(0),
            fail_first: 2,
            // Back-dated 60 s: half-life is already past, so rotation comes at the 1 s floor.
            ttl: Duration::from_secs(2),
        });
        let cache = CertCache::new(source.clone());
        let id = Identity::new("cluster.local", "ns", "sa");
        assert!(cache.get(&id).await.is_err(), "untracked identity");
        cache.track(&id);
        cache.track(&id);
        let first = cache.get(&id).await.unwrap();
        assert_eq!(first.identity, id);
        assert_eq!(source.calls.load(Ordering::SeqCst), 3);
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let second = cache.get(&id).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "rotated");
        assert!(cache.all_ready());
        assert_eq!(cache.dump()[0].users, 2);
        cache.untrack(&id);
        assert_eq!(cache.dump().len(), 1);
        cache.untrack(&id);
        assert!(cache.dump().is_empty());
    }
}
