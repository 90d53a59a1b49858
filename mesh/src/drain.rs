//! Graceful shutdown: a signal that tells listeners to stop, and a count of the connections still
//! open so the process can wait for them up to a deadline.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Held by the process; starts the drain and waits for it.
pub struct Trigger {
    signal: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
}

/// Held by every listener and connection; cloned freely. While any clone lives, the drain waits.
#[derive(Clone)]
pub struct Watch {
    signal: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
}

pub fn channel() -> (Trigger, Watch) {
    let (signal, rx) = watch::channel(false);
    let (alive, done) = mpsc::channel(1);
    (
        Trigger { signal, done },
        Watch {
            signal: rx,
            _alive: alive,
        },
    )
}

impl Watch {
    /// Resolves once draining has started.
    pub async fn signaled(&self) {
        let mut rx = self.signal.clone();
        // An error means the trigger is gone, which also means shutting down.
        let _ = rx.wait_for(|d| *d).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

/// Accept the next connection on `listener`, or `None` once draining starts. Accept errors
/// (e.g. EMFILE, a peer resetting before accept) are logged and skipped, not fatal.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    drain: &Watch,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            // Once draining, nothing more is accepted: what is still queued goes to a successor
            // listening on the same address (SO_REUSEPORT with `tcp_migrate_req`) when there is one.
            biased;
            _ = drain.signaled() => return None,
            r = listener.accept() => match r {
                Ok(c) => return Some(c),
                Err(e) => {
                    tracing::warn!("accept on {:?}: {e}", listener.local_addr().ok());
                    // Back off briefly so a persistent error (EMFILE) does not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

impl Trigger {
    /// Signal every watcher, then wait until all of them are dropped or `deadline` passes.
    /// Returns whether everything finished in time.
    pub async fn drain(mut self, deadline: Duration) -> bool {
        let _ = self.signal.send(true);
        tokio::time::timeout(deadline, self.done.recv())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_watchers() {
        let (trigger, watch) = channel();
        let w2 = watch.clone();
        let task = tokio::spawn(async move {
            w2.signaled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        drop(watch);
        assert!(trigger.drain(Duration::from_secs(5)).await);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn deadline_passes() {
        let (trigger, watch) = channel();
        assert!(!trigger.drain(Duration::from_millis(20)).await);
        drop(watch);
    }
}
