//! A pool of HBONE connections, so that many proxied TCP connections between the same pair of
//! identities share one mTLS + HTTP/2 connection (up to `CLIENT_MAX_STREAMS` streams each).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::client::{Connection, HboneError};
use super::copy::H2Stream;
use super::{CLIENT_MAX_STREAMS, ConnectRequest, POOL_IDLE_TIMEOUT};
use crate::identity::Identity;

/// What makes two tunnels shareable: same source identity and address, same destination
/// identities and address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub src_identity: Identity,
    /// Sorted, so the same set always gives the same key.
    pub dst_identities: Vec<Identity>,
    pub dst: SocketAddr,
    pub src_ip: IpAddr,
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    conns: Mutex<HashMap<Key, Vec<Arc<Entry>>>>,
    /// One dial at a time per key, so a burst of new streams shares the first new connection
    /// instead of each opening its own.
    dialing: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    /// The last failed dial per key, with when it ended: callers that were waiting behind it
    /// get its error at once.
    failures: Mutex<HashMap<Key, (Instant, String)>>,
}

struct Entry {
    conn: Connection,
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
}

/// Held by a stream for as long as it uses a pooled connection.
pub struct Lease(Arc<Entry>);

impl Drop for Lease {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1
            && let Ok(mut t) = self.0.idle_since.lock()
        {
            *t = Instant::now();
        }
    }
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

impl Pool {
    /// Must be called inside a tokio runtime: it starts the task that closes idle connections.
    pub fn new() -> Self {
        let inner = Arc::new(Inner::default());
        tokio::spawn(reap(Arc::downgrade(&inner), POOL_IDLE_TIMEOUT));
        Pool { inner }
    }

    /// Open a CONNECT stream to `key.dst`, reusing a pooled connection or dialing with `dial`.
    pub async fn connect<F, Fut>(
        &self,
        key: Key,
        req: &ConnectRequest,
        dial: F,
    ) -> Result<H2Stream, HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Connection, HboneError>>,
    {
        let (conn, lease) = match self.checkout(&key) {
            Some(c) => c,
            None => return self.dial_and_connect(&key, req, dial).await,
        };
        // A failed `open` has already released its slot.
        match open(&conn, req, lease).await {
            Ok(stream) => Ok(stream),
            // The pooled connection died between checkout and use (peer restarted, GOAWAY):
            // that is not the caller's failure, so try once on a fresh connection.
            Err(HboneError::H2 { .. }) if conn.is_closed() => {
                self.dial_and_connect(&key, req, dial).await
            }
            Err(e) => Err(e),
        }
    }

    async fn dial_and_connect<F, Fut>(
        &self,
        key: &Key,
        req: &ConnectRequest,
        dial: F,
    ) -> Result<H2Stream, HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Connection, HboneError>>,
    {
        let (conn, lease) = {
            let waiting_since = Instant::now();
            let gate = self.gate(key);
            let _dialing = gate.lock().await;
            match self.checkout(key) {
                Some(c) => c,
                None => {
                    if let Some(reason) = self.failed_since(key, waiting_since) {
                        return Err(HboneError::DialFailed {
                            addr: key.dst,
                            reason,
                        });
                    }
                    match dial().await {
                        Ok(conn) => self.insert(key.clone(), conn),
                        Err(e) => {
                            if let Ok(mut f) = self.inner.failures.lock() {
                                f.insert(key.clone(), (Instant::now(), e.to_string()));
                            }
                            return Err(e);
                        }
                    }
                }
            }
        };
        open(&conn, req, lease).await
    }

    /// The error of a dial for `key` that ended after `since`, if one failed.
    fn failed_since(&self, key: &Key, since: Instant) -> Option<String> {
        let failures = self.inner.failures.lock().ok()?;
        let (at, reason) = failures.get(key)?;
        (*at >= since).then(|| reason.clone())
    }

    /// Open connections, for metrics and tests.
    pub fn connections(&self) -> usize {
        self.inner
            .conns
            .lock()
            .map(|m| {
                m.values()
                    .map(|v| v.iter().filter(|e| !e.conn.is_closed()).count())
                    .sum()
            })
            .unwrap_or(0)
    }

    fn checkout(&self, key: &Key) -> Option<(Connection, Lease)> {
        let mut conns = self.inner.conns.lock().ok()?;
        let list = conns.get_mut(key)?;
        list.retain(|e| !e.conn.is_closed());
        for entry in list.iter() {
            // Reserve a slot only if one is free; losing the race just means trying the next.
            let reserved = entry
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < CLIENT_MAX_STREAMS).then_some(n + 1)
                })
                .is_ok();
            if reserved {
                return Some((entry.conn.clone(), Lease(entry.clone())));
            }
        }
        None
    }

    fn insert(&self, key: Key, conn: Connection) -> (Connection, Lease) {
        let entry = Arc::new(Entry {
            conn: conn.clone(),
            active: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
        });
        if let Ok(mut conns) = self.inner.conns.lock() {
            conns.entry(key).or_default().push(entry.clone());
        }
        (conn, Lease(entry))
    }

    fn gate(&self, key: &Key) -> Arc<tokio::sync::Mutex<()>> {
        match self.inner.dialing.lock() {
            Ok(mut gates) => gates.entry(key.clone()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }
}

/// Open a stream on a pooled connection; the stream holds the lease until it is dropped.
async fn open(
    conn: &Connection,
    req: &ConnectRequest,
    lease: Lease,
) -> Result<H2Stream, HboneError> {
    let mut stream = conn.connect(req).await?;
    stream._lease = Some(lease);
    Ok(stream)
}

/// Close connections that have carried no stream for `idle`.
async fn reap(inner: Weak<Inner>, idle: Duration) {
    let period = (idle / 10).max(Duration::from_secs(1));
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        if let Ok(mut conns) = inner.conns.lock() {
            conns.retain(|_, list| {
                list.retain(|e| {
                    let idle_for = e.idle_since.lock().map(|t| now - *t).unwrap_or_default();
                    !e.conn.is_closed() && (e.active.load(Ordering::Acquire) > 0 || idle_for < idle)
                });
                !list.is_empty()
            });
            if let Ok(mut gates) = inner.dialing.lock() {
                gates.retain(|k, g| conns.contains_key(k) || Arc::strong_count(g) > 1);
            }
            if let Ok(mut failures) = inner.failures.lock() {
                failures.retain(|_, (at, _)| now.saturating_duration_since(*at) < period);
            }
        }
    }
}
