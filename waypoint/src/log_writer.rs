//! The process's log output: lines gathered in memory and written to stdout by a thread of
//! their own, at most `FLUSH_INTERVAL` after they were logged (sooner past `FLUSH_BYTES`), as
//! Envoy buffers its access log. A request then does not pay a write(2) for its access-log line
//! on the proxy's thread, and a burst of lines costs one write.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in memory before it is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Buffered bytes that start a write before the interval is over.
const FLUSH_BYTES: usize = 64 * 1024;
/// Past this much unwritten output (stdout stuck), new lines are dropped and counted, so a
/// blocked log consumer cannot grow the proxy's memory without bound.
const MAX_BUFFERED: usize = 8 * 1024 * 1024;

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    dropped: u64,
    /// Set when the writer thread must write now (buffer full, or a flush was asked for).
    urgent: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

/// Buffers log output for a writer thread; clones share the buffer. `make_writer` for
/// `tracing_subscriber::fmt`.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

impl LogWriter {
    /// A writer whose lines go to `out` from a thread started here.
    pub fn start(out: impl Write + Send + 'static) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
        });
        let for_thread = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_loop(&for_thread, out))?;
        Ok(LogWriter { shared })
    }

    /// Write out what is buffered before returning (at exit).
    pub fn flush(&self) {
        let Ok(mut p) = self.shared.pending.lock() else {
            return;
        };
        p.urgent = true;
        self.shared.wake.notify_all();
        // The writer thread empties the buffer; give it a bounded time to (stdout may be stuck).
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !p.bytes.is_empty() || p.urgent {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match self.shared.wake.wait_timeout(p, left.min(FLUSH_INTERVAL)) {
                Ok((guard, _)) => p = guard,
                Err(_) => return,
            }
        }
    }

    fn append(&self, line: &[u8]) {
        self.append_with(line.len(), |bytes| {
            bytes.extend_from_slice(line);
            true
        });
    }

    /// Add to the buffer with `write` (which returns false, having written nothing usable, on
    /// failure), unless about `len` more bytes would pass the cap; wakes the writer thread.
    fn append_with(&self, len: usize, write: impl FnOnce(&mut Vec<u8>) -> bool) {
        let Ok(mut p) = self.shared.pending.lock() else {
            return;
        };
        if p.bytes.len() + len > MAX_BUFFERED {
            p.dropped += 1;
            return;
        }
        let was_empty = p.bytes.is_empty();
        let before = p.bytes.len();
        if !write(&mut p.bytes) {
            p.bytes.truncate(before);
            return;
        }
        let full = p.bytes.len() >= FLUSH_BYTES;
        if full {
            p.urgent = true;
        }
        // The writer thread sleeps on an empty buffer: wake it for the first line (it then
        // waits out the interval) or when the buffer is full.
        if was_empty || full {
            self.shared.wake.notify_all();
        }
    }
}

/// Where access-log lines go when the binary installed a writer (see [`access_line`]).
static ACCESS: OnceLock<LogWriter> = OnceLock::new();

impl LogWriter {
    /// Send access-log lines straight to this writer's buffer (the `waypoint` binary does).
    pub fn install_for_access_log(&self) {
        let _ = ACCESS.set(self.clone());
    }

    /// Serialize one line into the buffer, under its lock (no intermediate string).
    fn append_json(&self, line: &impl serde::Serialize) {
        self.append_with(0, |bytes| {
            let ok = serde_json::to_writer(&mut *bytes, line).is_ok();
            bytes.push(b'\n');
            ok
        });
    }
}

/// Log one access-log line, a JSON object, if target `access` is enabled at INFO. With a writer
/// installed the object is the whole line, as Envoy writes a JSON access log, serialized
/// straight into the log buffer: going through `tracing`'s formatter cost a timestamp, a
/// formatted prefix and a character-by-character escape pass over ~600 bytes per request
/// (~5% of the waypoint's CPU in a profile). Without one (tests, embedding) it is a `tracing`
/// event of target `access`.
pub fn access_line(line: &impl serde::Serialize) {
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    match ACCESS.get() {
        Some(w) => w.append_json(line),
        None => {
            let text = serde_json::to_string(line).unwrap_or_default();
            tracing::info!(target: "access", "{text}");
        }
    }
}

fn write_loop(shared: &Shared, mut out: impl Write) {
    let mut spare = Vec::new();
    loop {
        {
            let Ok(mut p) = shared.pending.lock() else {
                return;
            };
            while p.bytes.is_empty() && !p.urgent {
                p = match shared.wake.wait(p) {
                    Ok(p) => p,
                    Err(_) => return,
                };
            }
            // Let more lines gather, unless asked to write now.
            if !p.urgent {
                p = match shared.wake.wait_timeout(p, FLUSH_INTERVAL) {
                    Ok((p, _)) => p,
                    Err(_) => return,
                };
            }
            std::mem::swap(&mut p.bytes, &mut spare);
            if p.dropped > 0 {
                let note = format!(
                    "{} log lines dropped: log output was not being read\n",
                    p.dropped
                );
                spare.extend_from_slice(note.as_bytes());
                p.dropped = 0;
            }
        }
        let _ = out.write_all(&spare);
        let _ = out.flush();
        spare.clear();
        // Keep the spare buffer's memory only while it is of a usual size.
        if spare.capacity() > 4 * FLUSH_BYTES {
            spare.shrink_to(FLUSH_BYTES);
        }
        if let Ok(mut p) = shared.pending.lock()
            && p.urgent
            && p.bytes.is_empty()
        {
            p.urgent = false;
            // A `flush` caller waits for this.
            shared.wake.notify_all();
        }
    }
}

/// One formatted event: tracing's fmt layer writes each event whole, then drops this.
pub struct Line<'a> {
    writer: &'a LogWriter,
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer.append(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;
    fn make_writer(&'a self) -> Line<'a> {
        Line { writer: self }
    }
}

/// Writes out what is buffered when dropped (the end of `main`, or unwinding from a panic).
pub struct FlushOnDrop(pub LogWriter);

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.0.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` whose bytes the test can read.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_in_order_after_the_interval_or_a_flush() {
        let sink = Sink::default();
        let w = LogWriter::start(sink.clone()).unwrap();
        w.make_writer().write_all(b"one\n").unwrap();
        w.make_writer().write_all(b"two\n").unwrap();
        // Written by the thread within the interval, without a flush.
        let start = std::time::Instant::now();
        while sink.0.lock().unwrap().is_empty() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"one\ntwo\n");
        w.make_writer().write_all(b"three\n").unwrap();
        w.flush();
        assert_eq!(&*sink.0.lock().unwrap(), b"one\ntwo\nthree\n");
        // An empty flush returns at once.
        w.flush();
    }

    #[test]
    fn access_lines_are_whole_json_objects() {
        let sink = Sink::default();
        let w = LogWriter::start(sink.clone()).unwrap();
        w.append_json(&serde_json::json!({"a": "x\"y", "b": 2}));
        w.append_json(&serde_json::json!({"c": null}));
        w.flush();
        assert_eq!(
            &*sink.0.lock().unwrap(),
            b"{\"a\":\"x\\\"y\",\"b\":2}\n{\"c\":null}\n"
        );
    }

    #[test]
    fn a_full_buffer_is_written_before_the_interval() {
        let sink = Sink::default();
        let w = LogWriter::start(sink.clone()).unwrap();
        let line = vec![b'x'; FLUSH_BYTES];
        w.make_writer().write_all(&line).unwrap();
        let start = std::time::Instant::now();
        while sink.0.lock().unwrap().is_empty() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sink.0.lock().unwrap().len(), FLUSH_BYTES);
    }

    #[test]
    fn a_stuck_consumer_costs_bounded_memory_and_the_loss_is_reported() {
        /// Blocks until the test lets it go.
        struct Stuck(Arc<Mutex<()>>, Sink);
        impl Write for Stuck {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let _g = self.0.lock().unwrap();
                self.1.write(buf)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new(Mutex::new(()));
        let sink = Sink::default();
        let held = gate.lock().unwrap();
        let w = LogWriter::start(Stuck(gate.clone(), sink.clone())).unwrap();
        let chunk = vec![b'y'; 1024 * 1024];
        // The first chunk goes to the (stuck) writer thread; the next fill the buffer up to its cap.
        for _ in 0..20 {
            w.make_writer().write_all(&chunk).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(w.shared.pending.lock().unwrap().bytes.len() <= MAX_BUFFERED);
        drop(held);
        w.flush();
        w.flush();
        let out = String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned();
        assert!(out.contains("log lines dropped"), "{}", out.len());
    }
}
