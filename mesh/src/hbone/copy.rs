//! Moving bytes between a TCP connection and an HBONE stream (or another TCP connection), each
//! direction half-closing on its own, with read buffers that grow for bulk transfers.

use std::future::{Future, poll_fn};
use std::io;
use std::task::Poll;

use bytes::{BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

/// First read size: enough for request/response traffic without holding much per connection.
const INITIAL_BUFFER: usize = 16 * 1024;
/// Largest read size: bulk transfers reach it after a full read. Kept below glibc's mmap
/// threshold (128 KiB): larger chunks come from fresh zeroed pages each time, and the page
/// faults cost more than the extra reads (measured: ~11% of ztunnel CPU at 256 KiB).
const MAX_BUFFER: usize = 64 * 1024;

/// One proxied stream inside an HBONE connection. Dropping it before both ends finished resets
/// the stream. `_lease` keeps the pooled connection's stream count until the stream is gone.
pub struct H2Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub(crate) _lease: Option<super::pool::Lease>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            _lease: None,
        }
    }
}

/// Bytes moved by one proxied connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// From the TCP side into the other side.
    pub tcp_to_peer: u64,
    /// From the other side out to the TCP side.
    pub peer_to_tcp: u64,
}

/// Counters a copy adds to as bytes move, so metrics follow a long connection while it runs
/// (one atomic add per chunk). Cloned from a metric family; `Progress::default()` counts into
/// counters nobody reads.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub tcp_to_peer: Counter,
    pub peer_to_tcp: Counter,
}

/// A reader that can wait for data without a buffer: an idle connection then holds none
/// (16 KiB per direction per idle connection was most of ztunnel's RSS under many open
/// connections, and glibc kept it after they closed).
pub(crate) trait WaitReadable: AsyncRead + Unpin {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
}

impl WaitReadable for OwnedReadHalf {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        OwnedReadHalf::readable(self)
    }
}

/// Read sizes that start small and grow while reads keep filling the buffer; the buffer is
/// given back whenever the reader has nothing to read.
struct AdaptiveBuffer {
    buf: BytesMut,
    size: usize,
}

impl AdaptiveBuffer {
    fn new() -> Self {
        AdaptiveBuffer {
            buf: BytesMut::new(),
            size: INITIAL_BUFFER,
        }
    }

    /// Read once; `None` at end of stream.
    async fn read<R: WaitReadable>(&mut self, r: &mut R) -> io::Result<Option<Bytes>> {
        {
            let mut ready = std::pin::pin!(r.readable());
            // Data already waiting (a bulk transfer): keep the buffer. Otherwise the
            // connection is idle for now: free the buffer (and its growth) while it waits.
            match poll_fn(|cx| Poll::Ready(ready.as_mut().poll(cx))).await {
                Poll::Ready(result) => result?,
                Poll::Pending => {
                    self.buf = BytesMut::new();
                    self.size = INITIAL_BUFFER;
                    ready.await?;
                }
            }
        }
        // Reuses the allocation once the previous chunk has been written out and dropped.
        self.buf.reserve(self.size);
        // The allocation may be larger than asked for; read no more than the current size so
        // chunks stay within what the peer's frames and our growth policy expect.
        let n = r.read_buf(&mut (&mut self.buf).limit(self.size)).await?;
        if n == 0 {
            return Ok(None);
        }
        if n >= self.size && self.size < MAX_BUFFER {
            self.size *= 4;
        }
        Ok(Some(self.buf.split().freeze()))
    }
}

/// Proxy between a TCP connection and an HBONE stream until both directions are finished.
pub async fn tcp_h2(
    tcp: TcpStream,
    stream: H2Stream,
    progress: &Progress,
) -> io::Result<Transferred> {
    let H2Stream {
        send,
        recv,
        _lease: lease,
    } = stream;
    let (mut r, mut w) = tcp.into_split();
    let (up, down) = tokio::try_join!(
        tcp_to_h2(&mut r, send, &progress.tcp_to_peer),
        h2_to_tcp(recv, &mut w, &progress.peer_to_tcp)
    )?;
    drop(lease);
    Ok(Transferred {
        tcp_to_peer: up,
        peer_to_tcp: down,
    })
}

/// Ends without error when the peer stops taking data (it answered and closed or reset its
/// stream, as an HTTP proxy does after a `Connection: close` answer): the client's late bytes or
/// FIN have nowhere to go, and failing here would cut the other direction off before the
/// peer's answer is delivered. A broken connection still shows in that other direction.
async fn tcp_to_h2<R: WaitReadable>(
    r: &mut R,
    mut send: SendStream<Bytes>,
    counter: &Counter,
) -> io::Result<u64> {
    let mut buf = AdaptiveBuffer::new();
    let mut total = 0u64;
    while let Some(mut data) = buf.read(r).await? {
        total += data.len() as u64;
        counter.inc_by(data.len() as u64);
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(_)) | None => return Ok(total),
            };
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            if send.send_data(chunk, false).is_err() {
                return Ok(total);
            }
        }
    }
    // Half-close: the peer sees END_STREAM and may still answer. A peer that already ended
    // its stream needs no FIN.
    let _ = send.send_data(Bytes::new(), true);
    Ok(total)
}

async fn h2_to_tcp<W: AsyncWrite + Unpin>(
    mut recv: RecvStream,
    w: &mut W,
    counter: &Counter,
) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        let n = chunk.len();
        // Counted when received, before the write: whoever reads the bytes at the other end
        // then finds them counted.
        counter.inc_by(n as u64);
        w.write_all(&chunk).await?;
        total += n as u64;
        // Give the window back only once written, so a slow reader slows the sender.
        recv.flow_control().release_capacity(n).map_err(h2_io)?;
    }
    w.shutdown().await?;
    Ok(total)
}

/// Proxy between two TCP connections (plaintext passthrough); `a` is the "TCP" side of
/// `progress`, `b` the peer.
pub async fn tcp_tcp(a: TcpStream, b: TcpStream, progress: &Progress) -> io::Result<Transferred> {
    let (mut ar, mut aw) = a.into_split();
    let (mut br, mut bw) = b.into_split();
    let (up, down) = tokio::try_join!(
        tcp_to_tcp(&mut ar, &mut bw, &progress.tcp_to_peer),
        tcp_to_tcp(&mut br, &mut aw, &progress.peer_to_tcp)
    )?;
    Ok(Transferred {
        tcp_to_peer: up,
        peer_to_tcp: down,
    })
}

/// One direction of [`tcp_tcp`], half-closing the writer at the end.
async fn tcp_to_tcp<R: WaitReadable, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    counter: &Counter,
) -> io::Result<u64> {
    let mut buf = AdaptiveBuffer::new();
    let mut total = 0u64;
    while let Some(data) = buf.read(r).await? {
        counter.inc_by(data.len() as u64);
        w.write_all(&data).await?;
        total += data.len() as u64;
    }
    w.shutdown().await?;
    Ok(total)
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// The peer answers, ends its stream and resets ours (as an HTTP proxy does after a
    /// `Connection: close` answer) before the client's FIN: the copy still ends well, with
    /// the answer delivered, instead of failing on the FIN it can no longer send.
    #[tokio::test]
    async fn a_peer_that_answers_and_resets_first_still_delivers() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            // Keeps the connection going (a detached task).
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            // The tunnel's 200 first, as HBONE's CONNECT answer.
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            let mut body = req.into_body();
            let first = body.data().await.unwrap().unwrap();
            assert_eq!(&first[..], b"request");
            send.send_data(Bytes::from_static(b"answer"), true).unwrap();
            // Dropping the unfinished request body resets the stream (CANCEL).
            drop(body);
        });
        let (mut h2_client, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let (rsp, send) = h2_client
            .send_request(http::Request::new(()), false)
            .unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        app.write_all(b"request").await.unwrap();
        let copy = tokio::spawn(async move {
            let recv = rsp.await.unwrap().into_body();
            tcp_h2(tcp, H2Stream::new(send, recv), &Progress::default()).await
        });
        let mut answer = Vec::new();
        // The whole answer, then the end of it, before the app half-closes.
        let mut buf = [0u8; 64];
        while answer.len() < 6 {
            let n = app.read(&mut buf).await.unwrap();
            assert!(n > 0);
            answer.extend_from_slice(&buf[..n]);
        }
        assert_eq!(answer, b"answer");
        server.await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        app.shutdown().await.unwrap();
        assert_eq!(app.read(&mut buf).await.unwrap(), 0);
        let done = copy.await.unwrap().unwrap();
        assert_eq!((done.tcp_to_peer, done.peer_to_tcp), (7, 6));
    }

    /// In-memory readers always have their data (or their end) ready.
    impl WaitReadable for &[u8] {
        async fn readable(&self) -> io::Result<()> {
            Ok(())
        }
    }

    /// An idle connection holds no read buffer; one with data waiting keeps it.
    #[tokio::test]
    async fn idle_reader_holds_no_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let (mut r, _w) = tcp.into_split();
        let mut buf = AdaptiveBuffer::new();
        app.write_all(b"one").await.unwrap();
        assert_eq!(&buf.read(&mut r).await.unwrap().unwrap()[..], b"one");
        assert!(buf.buf.capacity() > 0, "kept until the reader is seen idle");
        // Nothing to read: the read waits, and has given the buffer back meanwhile.
        assert!(buf.read(&mut r).now_or_never().is_none());
        assert_eq!(buf.buf.capacity(), 0);
        assert_eq!(buf.size, INITIAL_BUFFER);
        app.write_all(b"two").await.unwrap();
        assert_eq!(&buf.read(&mut r).await.unwrap().unwrap()[..], b"two");
    }

    #[tokio::test]
    async fn buffer_grows_on_full_reads_only() {
        let data = vec![7u8; 2 * 1024 * 1024];
        let mut reader = &data[..];
        let mut buf = AdaptiveBuffer::new();
        let first = buf.read(&mut reader).await.unwrap().unwrap();
        assert_eq!(first.len(), INITIAL_BUFFER);
        assert_eq!(buf.size, INITIAL_BUFFER * 4);
        let mut sizes = vec![];
        while let Some(b) = buf.read(&mut reader).await.unwrap() {
            sizes.push(b.len());
        }
        assert!(sizes.iter().all(|&s| s <= MAX_BUFFER));
        assert_eq!(buf.size, MAX_BUFFER);

        let mut small = &b"hello"[..];
        let mut buf = AdaptiveBuffer::new();
        assert_eq!(&buf.read(&mut small).await.unwrap().unwrap()[..], b"hello");
        assert_eq!(buf.size, INITIAL_BUFFER);
        assert!(buf.read(&mut small).await.unwrap().is_none());
    }
}
