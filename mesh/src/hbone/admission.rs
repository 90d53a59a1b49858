//! Admission of not-yet-authenticated connections on an HBONE port: a cap on handshakes in
//! progress, overall and per source address. A flood of idle or half-open connections (a
//! ClientHello and then nothing) then costs the proxy a bounded number of sockets and buffers,
//! and one noisy source cannot take all the slots; past a cap a connection is closed at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Handshakes (TCP accepted → TLS → HTTP/2 preface) allowed at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub total: usize,
    pub per_source: usize,
}

impl Default for Limits {
    /// A node's legitimate peers open a handful of pooled connections each; these leave room
    /// for bursts of thousands of new pods while bounding a flood to about 64 MiB of buffers.
    fn default() -> Self {
        Limits {
            total: 1024,
            per_source: 64,
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every handshake slot is taken.
    Total,
    /// This source address holds its share already.
    PerSource,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::Total => "total",
            Refused::PerSource => "per_source",
        }
    }
}

/// Shared by every listener of one proxy.
#[derive(Clone)]
pub struct Admitter(Arc<Shared>);

struct Shared {
    limits: Limits,
    slots: Arc<Semaphore>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
}

/// A handshake's slot; released when dropped (the server drops it once HTTP/2 is up).
pub struct Admission {
    shared: Arc<Shared>,
    source: IpAddr,
    _slot: OwnedSemaphorePermit,
}

impl Admitter {
    pub fn new(limits: Limits) -> Self {
        Admitter(Arc::new(Shared {
            limits,
            slots: Arc::new(Semaphore::new(limits.total)),
            per_source: Mutex::default(),
        }))
    }

    /// A slot for a handshake from `source`, or why there is none.
    pub fn admit(&self, source: IpAddr) -> Result<Admission, Refused> {
        let source = source.to_canonical();
        let slot = self
            .0
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Total)?;
        let mut per_source = self
            .0
            .per_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let held = per_source.entry(source).or_insert(0);
        if *held >= self.0.limits.per_source {
            return Err(Refused::PerSource);
        }
        *held += 1;
        Ok(Admission {
            shared: self.0.clone(),
            source,
            _slot: slot,
        })
    }

    /// Handshakes in progress.
    pub fn in_progress(&self) -> usize {
        self.0.limits.total - self.0.slots.available_permits()
    }
}

impl Default for Admitter {
    fn default() -> Self {
        Admitter::new(Limits::default())
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut per_source = self
            .shared
            .per_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = per_source.get_mut(&self.source) {
            *held -= 1;
            if *held == 0 {
                per_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_overall_and_per_source_and_releases_on_drop() {
        let a = Admitter::new(Limits {
            total: 3,
            per_source: 2,
        });
        let x: IpAddr = "10.0.0.1".parse().unwrap();
        let y: IpAddr = "10.0.0.2".parse().unwrap();
        let x1 = a.admit(x).unwrap();
        let _x2 = a.admit(x).unwrap();
        assert_eq!(a.admit(x).err(), Some(Refused::PerSource));
        // The refused attempt did not keep a slot.
        let _y1 = a.admit(y).unwrap();
        assert_eq!(a.in_progress(), 3);
        assert_eq!(a.admit(y).err(), Some(Refused::Total));
        drop(x1);
        assert_eq!(a.in_progress(), 2);
        let _x3 = a.admit(x).unwrap();
        // An IPv4-mapped address is the same source.
        assert_eq!(
            a.admit("::ffff:10.0.0.1".parse().unwrap()).err(),
            Some(Refused::Total)
        );
    }
}
