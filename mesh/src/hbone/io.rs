//! An HBONE stream as a byte stream (`AsyncRead` + `AsyncWrite`), for code that speaks a
//! protocol inside the tunnel (a waypoint's HTTP server and client) rather than copying bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::copy::H2Stream;

/// Reads hand out the peer's DATA frames (returning flow-control window as they are consumed);
/// writes send DATA frames within the window granted; shutdown sends END_STREAM.
pub struct H2Io {
    stream: H2Stream,
    /// The part of the last DATA frame not yet read.
    pending: Bytes,
    read_done: bool,
    write_done: bool,
}

impl H2Io {
    pub fn new(stream: H2Stream) -> Self {
        H2Io {
            stream,
            pending: Bytes::new(),
            read_done: false,
            write_done: false,
        }
    }
}

impl From<H2Stream> for H2Io {
    fn from(stream: H2Stream) -> Self {
        H2Io::new(stream)
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else if e.reason() == Some(h2::Reason::NO_ERROR) {
        // A peer that resets with NO_ERROR has simply finished.
        io::Error::new(io::ErrorKind::UnexpectedEof, e)
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                // Give the window back as the reader consumes, so a slow reader slows the sender.
                let _ = this.stream.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.stream.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => {
                    let e = h2_io(e);
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        this.read_done = true;
                        continue;
                    }
                    return Poll::Ready(Err(e));
                }
                None => this.read_done = true,
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.stream.send;
        loop {
            let available = send.capacity();
            if available > 0 {
                let n = available.min(buf.len());
                send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_io)?;
                return Poll::Ready(Ok(n));
            }
            send.reserve_capacity(buf.len());
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed",
                    )));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 queues frames for the connection task; there is nothing of ours to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_done {
            self.write_done = true;
            // Half-close: the peer sees END_STREAM and may still answer. A stream the peer
            // already closed has nothing left to end.
            let _ = self.stream.send.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An h2 connection over an in-memory pipe: a client stream and the server's end of it.
    async fn pair() -> (H2Io, H2Io) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            H2Io::new(H2Stream::new(send, req.into_body()))
        });
        let (client, conn) = h2::client::handshake(a).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req = http::Request::builder()
            .method("CONNECT")
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (rsp, send) = client.send_request(req, false).unwrap();
        let server = server.await.unwrap();
        let rsp = rsp.await.unwrap();
        (H2Io::new(H2Stream::new(send, rsp.into_body())), server)
    }

    #[tokio::test]
    async fn bytes_both_ways_with_half_close() {
        let (mut client, mut server) = pair().await;
        // More than the default 64 KiB window: the writer must wait for the reader.
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&data).await.unwrap();
            client.shutdown().await.unwrap();
            let mut answer = String::new();
            client.read_to_string(&mut answer).await.unwrap();
            answer
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected);
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), "done");
    }
}
