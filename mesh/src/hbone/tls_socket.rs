//! The socket under an HBONE connection's TLS. rustls asks for at most 4 KiB per read, which
//! would cost four syscalls per full TLS record, so reads go through a 64 KiB buffer; the
//! buffer is taken only once the socket has data and given back whenever it has been read out
//! and the socket has nothing more, so a connection between bursts, or one still waiting for
//! its TLS handshake on 15008, holds none.
//!
//! Small writes are gathered until a flush, and a flush lets the tasks already woken run
//! once before it writes: h2 flushes after each batch of frames, and the frames of one request
//! often come from different tasks in the same turn of the runtime (hyper sends a response's
//! HEADERS from the connection task and its DATA from the body task). Writing each batch at
//! once cost a waypoint three `writev`s per HTTP/2 request where two carry the same bytes
//! (measured with `perf trace`). Large writes (bulk data) go straight to the socket, uncopied.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes read from the socket at once.
pub const READ_BUFFER: usize = 64 * 1024;
/// Writes at least this large, with nothing gathered before them, go straight to the socket.
const GATHER_BELOW: usize = 4 * 1024;
/// Gathered bytes past which a write sends what is gathered first.
const GATHER_MAX: usize = 64 * 1024;

pub struct TlsSocket {
    tcp: TcpStream,
    /// Read but not yet handed out: `buf[pos..]`. Empty (no allocation) while idle.
    buf: Vec<u8>,
    pos: usize,
    /// Written but not yet sent: `out[out_pos..]`. Its memory is given back once sent.
    out: Vec<u8>,
    out_pos: usize,
    /// The pending flush already let the other woken tasks run once.
    deferred: bool,
}

impl TlsSocket {
    pub fn new(tcp: TcpStream) -> Self {
        TlsSocket {
            tcp,
            buf: Vec::new(),
            pos: 0,
            out: Vec::new(),
            out_pos: 0,
            deferred: false,
        }
    }

    /// Send what is gathered; `Ready(Ok)` once all of it is on the socket.
    fn poll_send_gathered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        // Sent: hold no memory while idle.
        self.out = Vec::new();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    /// Bytes of buffer held now (0 while idle).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

impl AsyncRead for TlsSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.pos >= this.buf.len() {
            if out.remaining() >= READ_BUFFER {
                // A read as large as ours needs no copy through it.
                this.buf = Vec::new();
                this.pos = 0;
                return Pin::new(&mut this.tcp).poll_read(cx, out);
            }
            if this.tcp.poll_read_ready(cx).is_pending() {
                // Nothing to read: hold no buffer while waiting.
                this.buf = Vec::new();
                this.pos = 0;
                return Poll::Pending;
            }
            this.buf.clear();
            this.pos = 0;
            this.buf.reserve_exact(READ_BUFFER);
            // Into spare capacity: no zeroing of 64 KiB per refill. `poll_read` (unlike
            // `try_read`) also notes a short read as "socket drained", saving the next
            // refill an empty read.
            let mut spare = ReadBuf::uninit(this.buf.spare_capacity_mut());
            match Pin::new(&mut this.tcp).poll_read(cx, &mut spare) {
                // Readiness was stale; the waker is registered for the next data.
                Poll::Pending => {
                    this.buf = Vec::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = spare.filled().len();
                    if n == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    // SAFETY: `poll_read` initialized the first `n` bytes of the spare capacity.
                    unsafe { this.buf.set_len(n) };
                }
            }
        }
        let n = out.remaining().min(this.buf.len() - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TlsSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        let gathered = this.out.len() - this.out_pos;
        if gathered + len > GATHER_MAX {
            ready!(this.poll_send_gathered(cx))?;
        }
        if this.out.is_empty() && len >= GATHER_BELOW {
            return Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.out.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.out.is_empty() {
            this.deferred = false;
            return Pin::new(&mut this.tcp).poll_flush(cx);
        }
        if !this.deferred {
            // Let the tasks woken before this one run first: what they write joins this
            // write. The flush resumes when the runtime polls this task again.
            this.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_send_gathered(cx))?;
        this.deferred = false;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_gathered(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TlsSocket, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        (TlsSocket::new(tcp), peer)
    }

    /// Small reads are served from one socket read; the buffer exists only while it holds
    /// bytes or the socket has more.
    #[tokio::test]
    async fn buffers_only_while_data_is_there() {
        let (mut s, mut peer) = pair().await;
        let mut small = [0u8; 5];
        assert!(
            s.read(&mut small).now_or_never().is_none(),
            "nothing sent yet"
        );
        assert_eq!(s.buffer_capacity(), 0, "no buffer before any data");
        peer.write_all(b"hello world").await.unwrap();
        s.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"hello");
        assert!(
            s.buffer_capacity() >= READ_BUFFER,
            "the rest waits in the buffer"
        );
        let mut rest = [0u8; 6];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b" world");
        assert!(s.read(&mut small).now_or_never().is_none());
        assert_eq!(s.buffer_capacity(), 0, "given back once read out");

        // Large transfers arrive whole, in order, whatever the read sizes.
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            peer.write_all(&sent).await.unwrap();
            peer.shutdown().await.unwrap();
            peer
        });
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        let _peer = writer.await.unwrap();
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (mut s, mut peer) = pair().await;
        s.write_all(b"ping").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
    }

    /// Small writes wait for the flush, which lets other woken tasks run once (returning
    /// `Pending` with itself woken) and then sends them all in order; large ones go at once.
    #[tokio::test]
    async fn small_writes_are_gathered_until_the_flush() {
        let (mut s, peer) = pair().await;
        s.write_all(b"head").await.unwrap();
        s.write_all(b"-body").await.unwrap();
        let mut probe = [0u8; 64];
        tokio::task::yield_now().await;
        assert!(
            matches!(peer.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "nothing sent before the flush"
        );
        // The first poll of the flush defers, and wakes the task for the second.
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut s).poll_flush(&mut cx).is_pending());
        assert!(Pin::new(&mut s).poll_flush(&mut cx).is_ready());
        peer.readable().await.unwrap();
        let n = peer.try_read(&mut probe).unwrap();
        assert_eq!(&probe[..n], b"head-body");
        assert_eq!(s.out.capacity(), 0, "no memory held once sent");

        // A large write with nothing gathered is sent without a flush.
        let big = vec![7u8; GATHER_BELOW];
        s.write_all(&big).await.unwrap();
        let mut got = vec![0u8; big.len()];
        let mut peer = peer;
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, big);

        // Gathered bytes go before a large write that follows them, and shutdown sends them.
        s.write_all(b"x").await.unwrap();
        s.write_all(&big).await.unwrap();
        s.write_all(b"y").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest.len(), big.len() + 2);
        assert_eq!((rest[0], rest[rest.len() - 1]), (b'x', b'y'));
    }
}
