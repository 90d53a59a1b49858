//! Thread-per-core (`--runtime per-core`): the pods' proxies run on N threads ("cores"), each
//! driving a tokio current-thread runtime of its own. A pod is placed on one core at enrollment;
//! its listeners are registered with that core's reactor, so every connection they accept, the
//! tasks it spawns, its timers and the pooled HBONE connections it dials stay on that thread.
//! A multi-thread runtime instead moves work between threads on every wake-up (work stealing,
//! an I/O event seen by one worker for a task queued on another), which costs context switches
//! and cross-CPU wake-ups on each hop of a proxied byte. The control work (xDS, certificates,
//! admin servers, enrollment) stays on the main runtime.

use std::io;
use std::sync::{Arc, Mutex};

use mesh::hbone::pool::Pool;
use tokio::runtime::{Builder, Handle};

/// The cores and how many pods each carries now.
pub struct Cores {
    cores: Vec<Core>,
    /// Pods placed on each core (index as in `cores`).
    load: Mutex<Vec<usize>>,
}

struct Core {
    handle: Handle,
    /// The core's own HBONE client pool: a pooled connection's HTTP/2 driver runs on the
    /// runtime that dialled it, so sharing one across cores would wake another thread on every
    /// frame.
    pool: Pool,
}

impl Cores {
    /// Start `n` core threads (at least one), each blocked on its runtime for the life of the
    /// process.
    pub fn start(n: usize) -> io::Result<Arc<Cores>> {
        let mut cores = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            // The pool's reaper task belongs on the core too.
            let pool = {
                let _core = handle.enter();
                Pool::new()
            };
            std::thread::Builder::new()
                .name(format!("core-{i}"))
                .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
            cores.push(Core { handle, pool });
        }
        let load = Mutex::new(vec![0; cores.len()]);
        Ok(Arc::new(Cores { cores, load }))
    }

    pub fn len(&self) -> usize {
        self.cores.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cores.is_empty()
    }

    /// Place a pod on the core with the fewest pods; the place is given back when the returned
    /// [`Placement`] is dropped (the pod unenrolled, or its enrollment failed).
    pub fn place(self: &Arc<Self>) -> Placement {
        let index = match self.load.lock() {
            Ok(mut load) => {
                let i = fewest(&load);
                load[i] += 1;
                i
            }
            // A poisoned count only skews the balance; any core is correct.
            Err(_) => 0,
        };
        Placement {
            cores: self.clone(),
            index,
        }
    }

    /// Pods placed on each core now.
    pub fn load(&self) -> Vec<usize> {
        self.load.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// The core with the fewest pods; the lowest index among equals, so an idle node fills its
/// cores in order.
pub fn fewest(load: &[usize]) -> usize {
    load.iter()
        .enumerate()
        .min_by_key(|&(i, &n)| (n, i))
        .map_or(0, |(i, _)| i)
}

/// A pod's place on a core, held for as long as the pod is enrolled.
pub struct Placement {
    cores: Arc<Cores>,
    index: usize,
}

impl Placement {
    pub fn index(&self) -> usize {
        self.index
    }

    /// The core's runtime: enter it to create the pod's listeners and spawn their tasks.
    pub fn handle(&self) -> &Handle {
        &self.cores.cores[self.index].handle
    }

    pub fn pool(&self) -> &Pool {
        &self.cores.cores[self.index].pool
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        if let Ok(mut load) = self.cores.load.lock()
            && let Some(n) = load.get_mut(self.index)
        {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fewest_prefers_least_loaded_then_lowest_index() {
        assert_eq!(fewest(&[0, 0, 0]), 0);
        assert_eq!(fewest(&[1, 0, 0]), 1);
        assert_eq!(fewest(&[1, 1, 0]), 2);
        assert_eq!(fewest(&[2, 1, 1]), 1);
        assert_eq!(fewest(&[3]), 0);
        assert_eq!(fewest(&[]), 0);
    }

    #[test]
    fn placements_spread_and_are_given_back() {
        let cores = Cores::start(3).unwrap();
        let a = cores.place();
        let b = cores.place();
        let c = cores.place();
        let d = cores.place();
        assert_eq!([a.index(), b.index(), c.index(), d.index()], [0, 1, 2, 0]);
        assert_eq!(cores.load(), vec![2, 1, 1]);
        drop(b);
        assert_eq!(cores.load(), vec![2, 0, 1]);
        // The freed core is the next one used.
        let e = cores.place();
        assert_eq!(e.index(), 1);
        drop((a, c, d, e));
        assert_eq!(cores.load(), vec![0, 0, 0]);
    }

    #[test]
    fn zero_cores_means_one() {
        let cores = Cores::start(0).unwrap();
        assert_eq!(cores.len(), 1);
        assert_eq!(cores.place().index(), 0);
    }

    /// A listener made with the core's runtime entered is driven by that core's thread, and
    /// what its accept loop spawns runs there too: the property the pods' proxies rely on.
    #[test]
    fn listener_and_spawned_tasks_run_on_the_core() {
        let cores = Cores::start(2).unwrap();
        let _first = cores.place();
        let place = cores.place();
        assert_eq!(place.index(), 1);
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let _core = place.handle().enter();
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            tokio::spawn(async move {
                let (_conn, _) = listener.accept().await.unwrap();
                let accept_thread = std::thread::current().name().map(String::from);
                let task_thread =
                    tokio::spawn(async { std::thread::current().name().map(String::from) })
                        .await
                        .unwrap();
                tx.send((accept_thread, task_thread)).unwrap();
            });
        }
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accept_thread, task_thread) =
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(accept_thread.as_deref(), Some("core-1"));
        assert_eq!(task_thread.as_deref(), Some("core-1"));
    }
}
