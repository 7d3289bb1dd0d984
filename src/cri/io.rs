//! The unix-socket stream under the proxy's HTTP/2 connections (the CRI client's and the
//! runtime's), tuned for small request/response exchanges on a machine where every wake-up and
//! every system call is expensive (see `benches/image_status.rs` and docs/benchmarks.md):
//!
//! - The socket is registered with the reactor for readability only. A tokio `UnixStream` is
//!   registered for both, and with edge-triggered epoll the peer *reading* what we wrote makes
//!   the socket writable again, which wakes the proxy thread for nothing once per call and per
//!   side. Writes go straight to the socket; only a write that would block registers a second
//!   handle on the socket (a `dup`) for writability, until a write goes through again.
//! - Optionally ([`ProxyStream::defer_control_frames`]), a write that holds nothing but an
//!   HTTP/2 PING acknowledgement is put off until the runtime has run every other ready task.
//!   grpc-go servers (containerd) send a PING with the answer to nearly every call; acking it
//!   first would put one more system call, which also wakes the runtime, between the runtime's
//!   answer and its forwarding to the client.

use std::future::Future;
use std::io::{self, IoSlice, Read, Write};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Wake, Waker};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Bytes of the read buffer made ready (zeroed) for one read, at most.
const MAX_READ: usize = 64 << 10;
/// An HTTP/2 frame header: length (3), type, flags, stream id (4).
const FRAME_HEADER: usize = 9;
const FRAME_PING: u8 = 0x6;
const FLAG_ACK: u8 = 0x1;
const PING_PAYLOAD: usize = 8;

/// A connected unix stream for one HTTP/2 connection (see the module docs).
pub struct ProxyStream {
    /// The socket, registered for readability.
    socket: AsyncFd<UnixStream>,
    /// A duplicate of the socket registered for writability, while a write would block.
    writable: Option<AsyncFd<UnixStream>>,
    defer_control: bool,
    /// The put-off control write waits for this (see [`ProxyStream::put_off`]).
    deferred: Option<Arc<Deferred>>,
}

/// Whether the scheduler has run a deferred wake-up yet, and the task to wake then.
struct Deferred {
    fired: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Deferred {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        if let Ok(mut task) = self.task.lock() {
            if let Some(waker) = task.take() {
                waker.wake();
            }
        }
    }
}

impl ProxyStream {
    /// Takes over `stream` (from an accept or a connect); must run inside a tokio runtime.
    pub fn new(stream: tokio::net::UnixStream) -> io::Result<Self> {
        let stream = stream.into_std()?;
        stream.set_nonblocking(true)?;
        Ok(Self {
            socket: register(stream, Interest::READABLE)?,
            writable: None,
            defer_control: false,
            deferred: None,
        })
    }

    /// Puts off writes that hold only a PING acknowledgement (see the module docs).
    pub fn defer_control_frames(mut self) -> Self {
        self.defer_control = true;
        self
    }

    /// Whether a write of `bufs` should wait for the other ready tasks first: the first attempt
    /// to write exactly one PING ACK frame.
    fn put_off(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> bool {
        if !self.defer_control {
            return false;
        }
        if let Some(deferred) = &self.deferred {
            // Polled again before the scheduler got round to the deferred wake-up (another
            // task woke this one): keep waiting for it.
            if !deferred.fired.load(Ordering::Acquire) {
                if let Ok(mut task) = deferred.task.lock() {
                    *task = Some(cx.waker().clone());
                }
                return true;
            }
            self.deferred = None;
            return false;
        }
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        let Some(first) = bufs.iter().find(|b| !b.is_empty()) else {
            return false;
        };
        let is_ping_ack = len == FRAME_HEADER + PING_PAYLOAD
            && first.len() >= 5
            && first[3] == FRAME_PING
            && first[4] & FLAG_ACK != 0;
        if !is_ping_ack {
            return false;
        }
        // `yield_now` wakes the task only after the scheduler has run the other ready tasks
        // (it defers the wake-up until the scheduler would otherwise wait for events). Its
        // waker records that it fired, since this task may be woken earlier by another.
        let deferred = Arc::new(Deferred {
            fired: AtomicBool::new(false),
            task: Mutex::new(Some(cx.waker().clone())),
        });
        let waker = Waker::from(deferred.clone());
        let mut yielded = std::pin::pin!(tokio::task::yield_now());
        if yielded
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready()
        {
            return false;
        }
        self.deferred = Some(deferred);
        true
    }

    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&UnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match write(self.socket.get_ref()) {
                Ok(n) => {
                    // Written without waiting: stop watching for writability.
                    self.writable = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            let writable = match &mut self.writable {
                Some(w) => w,
                None => self.writable.insert(register(
                    self.socket.get_ref().try_clone()?,
                    Interest::WRITABLE,
                )?),
            };
            let mut guard = ready!(writable.poll_write_ready(cx))?;
            match guard.try_io(|fd| write(fd.get_ref())) {
                Ok(result) => return Poll::Ready(result),
                // Not writable after all: readiness cleared, poll again (registers the waker).
                Err(_would_block) => continue,
            }
        }
    }
}

/// `socket` registered with the reactor for `interest` only.
///
/// tokio 1.54 deprecates the safe constructor because a generic `AsRawFd` type could report a
/// different descriptor later, or close it, while registered; its replacement is `unsafe` and
/// this crate forbids unsafe code. A `std` `UnixStream` owns its descriptor and always reports
/// that one, so the safe constructor is sound here.
#[allow(deprecated)]
fn register(socket: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    AsyncFd::with_interest(socket, interest)
}

impl AsyncRead for ProxyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.socket.poll_read_ready(cx))?;
            let want = buf.remaining().min(MAX_READ);
            let unfilled = buf.initialize_unfilled_to(want);
            match guard.try_io(|fd| {
                let mut socket = fd.get_ref();
                socket.read(unfilled)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    // A short read emptied the socket: the next read waits for the reactor
                    // instead of trying (and failing) first, as tokio's own streams do.
                    if n > 0 && n < want {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for ProxyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.put_off(cx, &[IoSlice::new(buf)]) {
            return Poll::Pending;
        }
        this.poll_write_with(cx, |mut socket| socket.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.put_off(cx, bufs) {
            return Poll::Pending;
        }
        this.poll_write_with(cx, |mut socket| socket.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.socket.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_writes_and_waits_for_a_full_socket() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let mut a = ProxyStream::new(a).unwrap();
        let mut b = ProxyStream::new(b).unwrap();
        // Far more than a socket buffer holds: the writer must wait for the reader.
        let sent: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.shutdown().await.unwrap();
            a
        });
        let mut received = Vec::new();
        b.read_to_end(&mut received).await.unwrap();
        assert!(received == expected);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_ping_ack_waits_for_other_tasks_once() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let mut a = ProxyStream::new(a).unwrap().defer_control_frames();
        let mut b = ProxyStream::new(b).unwrap();
        let ack = [
            0, 0, 8, FRAME_PING, FLAG_ACK, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8,
        ];
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let other = {
            let order = order.clone();
            tokio::spawn(async move { order.lock().unwrap().push("other task") })
        };
        a.write_all(&ack).await.unwrap();
        order.lock().unwrap().push("ack written");
        other.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["other task", "ack written"]);
        let mut got = [0u8; 17];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, ack);
        // Anything else goes straight out.
        a.write_all(b"data").await.unwrap();
        let mut got = [0u8; 4];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"data");
    }
}
