//! The socket under an HBONE connection's TLS. rustls asks for at most 4 KiB per read, which
//! would cost four syscalls per full TLS record, so reads go through a 64 KiB buffer; the
//! buffer is taken only once the socket has data and given back whenever it has been read out
//! and the socket has nothing more, so a connection between bursts, or one still waiting for
//! its TLS handshake on 15008, holds none. Writes pass straight through (vectored).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes read from the socket at once.
pub const READ_BUFFER: usize = 64 * 1024;

pub struct TlsSocket {
    tcp: TcpStream,
    /// Read but not yet handed out: `buf[pos..]`. Empty (no allocation) while idle.
    buf: Vec<u8>,
    pos: usize,
}

impl TlsSocket {
    pub fn new(tcp: TcpStream) -> Self {
        TlsSocket {
            tcp,
            buf: Vec::new(),
            pos: 0,
        }
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
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = ready!(Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx));
        Poll::Ready(r)
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
}
