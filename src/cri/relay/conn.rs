//! One client connection and its runtime connection (see the parent module for what the relay
//! does). All of it runs in one task: read what a side has, handle its frames (which queues
//! frames for the other side), write, repeat; decisions that wait (a pull, a registry check)
//! run as tasks of their own and report back.
//!
//! Flow-control bookkeeping, per connection and per stream, in bytes of DATA payload:
//! - `client_window` / `Stream::client_win`: how much the client can still receive (its real
//!   receive window); `UpConn::belief`: what the runtime thinks that is.
//! - `UpConn::window` / `Stream::up_win`: how much the runtime can still receive;
//!   `client_belief` / `Stream::belief`: what the client thinks that is.
//! - data waiting inside the relay (held requests, frames waiting for window) counts as sent.
//!
//! A window update from one side is passed on only as far as it brings the other side's view
//! up to the real window; the rest is swallowed. So data the relay makes up (its answers) or
//! consumes (requests it answers) never lets a peer send more than the other side can take,
//! and frames that still would are queued until the window opens.

use super::frame::{self, Head};
use super::hpack::{self, Decoder};
use crate::cri::io::ProxyStream;
use crate::cri::proxy::{
    grpc_status, http_status_code, Call, CriProxy, Verdict, CREATE_CONTAINER, IMAGE_STATUS,
    MAX_CRI_MESSAGE_BYTES, PULL_IMAGE, REMOVE_IMAGE,
};
use crate::cri::upstream::{RelayCall, RelayCalls, UpstreamError};
use bytes::{Buf, Bytes, BytesMut};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;

/// A map keyed by HTTP/2 stream id, looked up several times per frame. Ids are distinct
/// integers that each peer must raise with every new stream, so a multiplicative hash spreads
/// them; SipHash's protection against chosen keys buys nothing here and cost about 5 % of the
/// relay's instructions per call.
type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u32(u32::from(b) ^ (self.0 as u32).rotate_left(8));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Bytes read from a socket at once.
const READ_CHUNK: usize = 64 << 10;
/// Largest header block (compressed) and header list (decoded) accepted from either side.
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// A held request that reaches this many bytes before its end is credited by the relay, so
/// that the client never waits for window the runtime cannot give (it has not seen the
/// request yet). Smaller requests, nearly all, pass without extra frames.
const HELD_UNCREDITED_MAX: i64 = 16 << 10;
/// Uncredited held bytes on one connection past which every held request is credited.
const HELD_UNCREDITED_TOTAL_MAX: i64 = 32 << 10;
/// Bytes a connection may hold inside the relay (requests held, frames waiting for window).
const MAX_BUFFERED: i64 = 64 << 20;
/// Runtime stream ids kept after their stream ended on the client side, for late frames.
const MAX_RETIRED_IDS: usize = 1024;

/// Runs the relay for one accepted CRI connection until either side closes it.
pub(super) async fn run(client: UnixStream, proxy: Arc<CriProxy>, drain: CancellationToken) {
    let client = match ProxyStream::new(client) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register a CRI connection");
            return;
        }
    };
    let mut relay = Relay::new(client, proxy, drain);
    relay.connect();
    std::future::poll_fn(|cx| relay.poll(cx)).await;
}

/// A connection-level error: the relay tells the client (GOAWAY) and closes.
#[derive(Debug)]
struct ConnError {
    code: u32,
    reason: String,
}

fn conn_error(code: u32, reason: impl Into<String>) -> ConnError {
    ConnError {
        code,
        reason: reason.into(),
    }
}

/// A request's outcome from [`CriProxy::decide`], with an answer collected.
enum Outcome {
    Forward,
    Answer(Answer),
}

/// An answer the relay sends itself.
struct Answer {
    /// The response header fields, `:status` first.
    headers: Vec<(Bytes, Bytes)>,
    data: Bytes,
    trailers: Option<Vec<(Bytes, Bytes)>>,
    code: tonic::Code,
}

impl Answer {
    /// A trailers-only gRPC answer carrying `status`.
    fn status(status: &Status) -> Self {
        let mut headers = vec![
            (Bytes::from_static(b":status"), Bytes::from_static(b"200")),
            (
                Bytes::from_static(b"content-type"),
                Bytes::from_static(b"application/grpc"),
            ),
        ];
        headers.extend(status_fields(status));
        Answer {
            headers,
            data: Bytes::new(),
            trailers: None,
            code: status.code(),
        }
    }
}

type Fields = Vec<(Bytes, Bytes)>;

/// A header block being received (HEADERS, then CONTINUATION frames).
struct Block {
    stream: u32,
    end_stream: bool,
    /// The block's content (HPACK bytes).
    bytes: BytesMut,
}

/// Why a frame cannot start or continue a header block.
#[derive(Debug, thiserror::Error)]
enum BlockError {
    #[error("bad HEADERS padding")]
    Padding,
    #[error("unexpected CONTINUATION")]
    Unexpected,
    #[error("CONTINUATION on another stream")]
    OtherStream,
    #[error("header block too large")]
    TooLarge,
}

/// Feeds a HEADERS or CONTINUATION frame `f` to the block being received, `pending`; returns
/// the block once it is complete.
fn assemble(
    pending: &mut Option<Block>,
    head: &Head,
    f: &[u8],
) -> Result<Option<Block>, BlockError> {
    let payload = &f[frame::HEADER_LEN..];
    let block = if head.kind == frame::HEADERS {
        let range = frame::content(head, payload).ok_or(BlockError::Padding)?;
        Block {
            stream: head.stream,
            end_stream: head.has(frame::END_STREAM),
            bytes: BytesMut::from(&payload[range]),
        }
    } else {
        let mut block = pending.take().ok_or(BlockError::Unexpected)?;
        if block.stream != head.stream {
            return Err(BlockError::OtherStream);
        }
        block.bytes.extend_from_slice(payload);
        if block.bytes.len() > MAX_HEADER_BLOCK {
            return Err(BlockError::TooLarge);
        }
        block
    };
    if head.has(frame::END_HEADERS) {
        Ok(Some(block))
    } else {
        *pending = Some(block);
        Ok(None)
    }
}

/// Frames for one side: bytes ready to write, then frames waiting for flow-control window.
#[derive(Default)]
struct Outbox {
    buf: BytesMut,
    queue: VecDeque<Queued>,
    /// DATA bytes in `queue`.
    queued: i64,
}

struct Queued {
    frame: Bytes,
    /// For DATA: the client stream id (key in `streams`) and flow-controlled length.
    data: Option<(u32, i64)>,
}

/// The runtime side of a live connection.
struct UpConn {
    io: ProxyStream,
    input: BytesMut,
    out: Outbox,
    /// The runtime's real receive window (connection).
    window: i64,
    /// The runtime's view of the client's receive window (connection).
    belief: i64,
    /// Runtime stream id to client stream id, for every stream opened on this connection
    /// whose runtime side has not ended.
    by_id: IdMap<u32>,
    next_id: u32,
    /// SETTINGS ACKs from the runtime that answer the relay's own SETTINGS.
    acks_to_swallow: u32,
    /// Set by the runtime's GOAWAY: its last processed stream.
    goaway: Option<u32>,
    block: Option<Block>,
    /// Runtime stream ids the client has left (see [`UpConn::retire`]).
    retired: VecDeque<u32>,
    /// Calls the relay made itself, by runtime stream id (see [`RelayCall`]).
    internal: IdMap<Internal>,
}

/// A call the relay makes on its runtime connection for a decision, while its answer comes.
struct Internal {
    reply: tokio::sync::oneshot::Sender<Option<Result<Bytes, Status>>>,
    path: &'static str,
    http_status: Option<u16>,
    /// `grpc-status`, `grpc-message` and `grpc-status-details-bin`, from headers or trailers.
    grpc: http::HeaderMap,
    data: BytesMut,
}

enum Up {
    Down,
    Connecting(Pin<Box<dyn Future<Output = Result<UnixStream, UpstreamError>> + Send>>),
    Live(Box<UpConn>),
}

enum State {
    /// Collected (one of the four methods) or waiting for the runtime connection.
    Held(Held),
    Forwarded {
        up: u32,
    },
    /// Answered by the relay.
    Local,
}

#[derive(Default)]
struct Held {
    /// The request's header block, re-encoded as literals (see [`reencode`]).
    headers: Bytes,
    frames: Vec<Bytes>,
    /// Flow-controlled bytes in `frames`.
    flow: i64,
    body: BytesMut,
    ended: bool,
    trailers: Option<Bytes>,
    /// The relay has given the client window for this request.
    credited: bool,
    deciding: bool,
    /// Decided (or not one of the four): forward once the runtime connection is up.
    forward: bool,
}

struct Stream {
    state: State,
    call: Call,
    /// The client ended its side (END_STREAM or RST_STREAM).
    client_done: bool,
    /// The response ended (END_STREAM or RST_STREAM sent to the client).
    answered: bool,
    /// Response headers went to the client.
    headers_sent: bool,
    client_win: i64,
    belief: i64,
    up_win: i64,
    /// DATA bytes of this stream held or queued for the runtime.
    queued_up: i64,
    /// DATA bytes of this stream queued for the client.
    queued_client: i64,
}

struct Relay {
    proxy: Arc<CriProxy>,
    client: ProxyStream,
    input: BytesMut,
    scratch: Vec<u8>,
    preface_seen: bool,
    /// The first SETTINGS went to the client (the runtime's, or the relay's own).
    server_preface_sent: bool,
    /// SETTINGS ACKs owed to the client before the server preface could go.
    deferred_acks: u32,
    out: Outbox,
    up: Up,
    client_dec: Decoder,
    /// Encodes every header block sent to the client, in the order they are queued.
    client_enc: frame::Encoder,
    up_dec: Decoder,
    block: Option<Block>,
    client_settings: BTreeMap<u16, u32>,
    client_initial_window: i64,
    client_max_frame: usize,
    /// The largest header table size the client has allowed (its decoder's bound on ours).
    client_table_size: usize,
    up_initial_window: i64,
    up_max_frame: usize,
    client_acks_to_swallow: u32,
    client_window: i64,
    client_belief: i64,
    /// DATA bytes held or queued for the runtime, all streams.
    queued_up: i64,
    streams: IdMap<Stream>,
    last_client_stream: u32,
    /// Streams waiting for the runtime connection, in order.
    waiting: Vec<u32>,
    verdict_tx: mpsc::UnboundedSender<(u32, Outcome)>,
    verdicts: mpsc::UnboundedReceiver<(u32, Outcome)>,
    calls_tx: mpsc::UnboundedSender<RelayCall>,
    calls: mpsc::UnboundedReceiver<RelayCall>,
    drain: Pin<Box<WaitForCancellationFutureOwned>>,
    draining: bool,
    /// Closing: write what is queued, then end.
    closing: bool,
    client_eof: bool,
}

impl Relay {
    fn new(client: ProxyStream, proxy: Arc<CriProxy>, drain: CancellationToken) -> Self {
        let (verdict_tx, verdicts) = mpsc::unbounded_channel();
        let (calls_tx, calls) = mpsc::unbounded_channel();
        let up_dec = Decoder::new(frame::DEFAULT_HEADER_TABLE as usize);
        let client_dec = Decoder::new(frame::DEFAULT_HEADER_TABLE as usize);
        Self {
            proxy,
            client,
            input: BytesMut::with_capacity(READ_CHUNK),
            scratch: vec![0; READ_CHUNK],
            preface_seen: false,
            server_preface_sent: false,
            deferred_acks: 0,
            out: Outbox::default(),
            up: Up::Down,
            client_dec,
            client_enc: frame::Encoder::new(frame::DEFAULT_HEADER_TABLE as usize),
            up_dec,
            block: None,
            client_settings: BTreeMap::new(),
            client_initial_window: frame::DEFAULT_WINDOW,
            client_max_frame: frame::DEFAULT_MAX_FRAME as usize,
            client_table_size: frame::DEFAULT_HEADER_TABLE as usize,
            up_initial_window: frame::DEFAULT_WINDOW,
            up_max_frame: frame::DEFAULT_MAX_FRAME as usize,
            client_acks_to_swallow: 0,
            client_window: frame::DEFAULT_WINDOW,
            client_belief: frame::DEFAULT_WINDOW,
            queued_up: 0,
            streams: IdMap::default(),
            last_client_stream: 0,
            waiting: Vec::new(),
            verdict_tx,
            verdicts,
            calls_tx,
            calls,
            drain: Box::pin(drain.cancelled_owned()),
            draining: false,
            closing: false,
            client_eof: false,
        }
    }

    // ----- the loop -----

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;
            if !self.draining && self.drain.as_mut().poll(cx).is_ready() {
                self.start_drain();
                progress = true;
            }
            if let Up::Connecting(connecting) = &mut self.up {
                if let Poll::Ready(result) = connecting.as_mut().poll(cx) {
                    self.connected(result);
                    progress = true;
                }
            }
            while let Poll::Ready(Some((id, outcome))) = self.verdicts.poll_recv(cx) {
                self.on_outcome(id, outcome);
                progress = true;
            }
            while let Poll::Ready(Some(call)) = self.calls.poll_recv(cx) {
                self.start_internal(call);
                progress = true;
            }
            if !self.closing && !self.client_eof {
                match self.read_client(cx) {
                    Ok(true) => progress = true,
                    Ok(false) => {}
                    Err(e) => self.fail_connection(e),
                }
            }
            if matches!(self.up, Up::Live(_)) {
                match self.read_upstream(cx) {
                    Ok(true) => progress = true,
                    Ok(false) => {}
                    Err(e) => {
                        self.upstream_lost(e);
                        progress = true;
                    }
                }
            }
            match self.flush_client(cx) {
                Ok(()) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "CRI client connection ended");
                    return Poll::Ready(());
                }
            }
            if let Err(e) = self.flush_upstream(cx) {
                self.upstream_lost(UpstreamError::Connect(e));
                progress = true;
            }
            if self.finished() {
                let _ = Pin::new(&mut self.client).poll_shutdown(cx);
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Whether the relay is done: the client went away, or it is closing (or draining with
    /// no calls left) and everything queued was written.
    fn finished(&self) -> bool {
        if self.client_eof {
            return true;
        }
        let flushed = self.out.buf.is_empty() && self.out.queue.is_empty();
        (self.closing || (self.draining && self.streams.is_empty())) && flushed
    }

    fn read_client(&mut self, cx: &mut Context<'_>) -> Result<bool, ConnError> {
        let mut buf = ReadBuf::new(&mut self.scratch);
        match Pin::new(&mut self.client).poll_read(cx, &mut buf) {
            Poll::Pending => return Ok(false),
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "CRI client read failed");
                self.client_eof = true;
                return Ok(true);
            }
            Poll::Ready(Ok(())) => {}
        }
        let n = buf.filled().len();
        if n == 0 {
            self.client_eof = true;
            return Ok(true);
        }
        self.input.extend_from_slice(&self.scratch[..n]);
        if !self.preface_seen {
            let len = frame::PREFACE.len().min(self.input.len());
            if self.input[..len] != frame::PREFACE[..len] {
                return Err(conn_error(
                    frame::PROTOCOL_ERROR,
                    "not an HTTP/2 connection preface",
                ));
            }
            if self.input.len() < frame::PREFACE.len() {
                return Ok(true);
            }
            let _ = self.input.split_to(frame::PREFACE.len());
            self.preface_seen = true;
        }
        while let Some(head) = Head::parse(&self.input) {
            if head.len > self.up_max_frame {
                return Err(conn_error(
                    frame::FRAME_SIZE_ERROR,
                    format!("frame of {} bytes", head.len),
                ));
            }
            if self.input.len() < frame::HEADER_LEN + head.len {
                break;
            }
            let f = self.input.split_to(frame::HEADER_LEN + head.len).freeze();
            self.on_client_frame(head, f)?;
            if self.closing {
                break;
            }
        }
        Ok(true)
    }

    fn read_upstream(&mut self, cx: &mut Context<'_>) -> Result<bool, UpstreamError> {
        let Up::Live(up) = &mut self.up else {
            return Ok(false);
        };
        let mut buf = ReadBuf::new(&mut self.scratch);
        match Pin::new(&mut up.io).poll_read(cx, &mut buf) {
            Poll::Pending => return Ok(false),
            Poll::Ready(Err(e)) => return Err(UpstreamError::Connect(e)),
            Poll::Ready(Ok(())) => {}
        }
        let n = buf.filled().len();
        if n == 0 {
            return Err(UpstreamError::Connect(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the runtime closed the connection",
            )));
        }
        up.input.extend_from_slice(&self.scratch[..n]);
        while let Up::Live(up) = &mut self.up {
            let Some(head) = Head::parse(&up.input) else {
                break;
            };
            if head.len > self.client_max_frame.max(frame::DEFAULT_MAX_FRAME as usize) {
                return Err(protocol(format!(
                    "the runtime sent a frame of {} bytes",
                    head.len
                )));
            }
            if up.input.len() < frame::HEADER_LEN + head.len {
                break;
            }
            let f = up.input.split_to(frame::HEADER_LEN + head.len).freeze();
            self.on_upstream_frame(head, f)?;
        }
        Ok(true)
    }

    fn flush_client(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        while !self.out.buf.is_empty() {
            match Pin::new(&mut self.client).poll_write(cx, &self.out.buf) {
                Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => self.out.buf.advance(n),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        Ok(())
    }

    fn flush_upstream(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        let Up::Live(up) = &mut self.up else {
            return Ok(());
        };
        while !up.out.buf.is_empty() {
            match Pin::new(&mut up.io).poll_write(cx, &up.out.buf) {
                Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => up.out.buf.advance(n),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        Ok(())
    }

    /// A connection error: GOAWAY to the client, then close.
    fn fail_connection(&mut self, e: ConnError) {
        tracing::debug!(code = e.code, reason = %e.reason, "closing a CRI connection");
        self.send_server_preface();
        frame::put_goaway(
            &mut self.out.buf,
            self.last_client_stream,
            e.code,
            &e.reason,
        );
        self.closing = true;
        self.up = Up::Down;
    }

    fn start_drain(&mut self) {
        self.draining = true;
        self.send_server_preface();
        let last = self.last_client_stream;
        self.client_frame(None, |b| frame::put_goaway(b, last, frame::NO_ERROR, ""));
    }

    // ----- the runtime connection -----

    fn connect(&mut self) {
        let path = self.proxy.upstream().socket_path().to_path_buf();
        self.up = Up::Connecting(Box::pin(async move {
            let timeout = crate::config::RUNTIME_CONNECT_TIMEOUT;
            match tokio::time::timeout(timeout, UnixStream::connect(&path)).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(UpstreamError::Connect(e)),
                Err(_) => Err(UpstreamError::ConnectTimeout(timeout)),
            }
        }));
    }

    fn connected(&mut self, result: Result<UnixStream, UpstreamError>) {
        let io = result.and_then(|s| ProxyStream::new(s).map_err(UpstreamError::Connect));
        let io = match io {
            Ok(io) => io,
            Err(e) => {
                tracing::debug!(error = %e, "cannot connect to the runtime");
                self.up = Up::Down;
                self.send_server_preface();
                let status = self.proxy.upstream().unavailable(&e);
                for id in std::mem::take(&mut self.waiting) {
                    self.fail_stream(id, &status);
                }
                return;
            }
        };
        let mut out = Outbox::default();
        out.buf.extend_from_slice(frame::PREFACE);
        let settings: Vec<_> = self.client_settings.iter().map(|(&k, &v)| (k, v)).collect();
        frame::put_settings(&mut out.buf, &settings);
        let mut up = UpConn {
            io,
            input: BytesMut::with_capacity(READ_CHUNK),
            out,
            window: frame::DEFAULT_WINDOW,
            belief: frame::DEFAULT_WINDOW,
            by_id: IdMap::default(),
            next_id: 1,
            acks_to_swallow: 1,
            goaway: None,
            block: None,
            retired: VecDeque::new(),
            internal: IdMap::default(),
        };
        // Bring each side's view of the other up to the real window (a new connection starts
        // at the default; the client may have more, or less, from the last one).
        let client_room = self.client_window - self.out.queued;
        if client_room > up.belief {
            frame::put_window_update(&mut up.out.buf, 0, (client_room - up.belief) as u32);
            up.belief = client_room;
        }
        let up_room = up.window - self.queued_up;
        self.up = Up::Live(Box::new(up));
        if up_room > self.client_belief && self.server_preface_sent {
            self.credit_client(0, up_room - self.client_belief);
        }
        for id in std::mem::take(&mut self.waiting) {
            self.open(id);
        }
    }

    /// The runtime connection broke: its calls fail `Unavailable`, held ones wait for the next.
    fn upstream_lost(&mut self, e: UpstreamError) {
        let Up::Live(up) = std::mem::replace(&mut self.up, Up::Down) else {
            return;
        };
        tracing::debug!(error = %e, "runtime connection lost");
        // The relay's own calls are made again by the proxy's client (their replies drop).
        drop(up.internal);
        self.up_dec = Decoder::new(self.client_table_size);
        let status = self.proxy.upstream().unavailable(&e);
        let mut ids: Vec<u32> = up.by_id.values().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if matches!(
                self.streams.get(&id).map(|s| &s.state),
                Some(State::Forwarded { .. })
            ) {
                self.fail_stream(id, &status);
            }
        }
        // Frames queued for that connection are gone with it; held requests stay held.
        self.queued_up = self
            .streams
            .values()
            .map(|s| match &s.state {
                State::Held(h) => h.flow,
                _ => 0,
            })
            .sum();
        for s in self.streams.values_mut() {
            if let State::Held(h) = &s.state {
                s.queued_up = h.flow;
            }
        }
        if !self.waiting.is_empty() {
            self.connect();
        }
    }

    // ----- frames from the client -----

    fn on_client_frame(&mut self, head: Head, f: Bytes) -> Result<(), ConnError> {
        if self.block.is_some() && head.kind != frame::CONTINUATION {
            return Err(conn_error(frame::PROTOCOL_ERROR, "expected CONTINUATION"));
        }
        let payload = &f[frame::HEADER_LEN..];
        match head.kind {
            frame::DATA => self.client_data(head, f),
            frame::HEADERS | frame::CONTINUATION => match assemble(&mut self.block, &head, &f) {
                Ok(Some(block)) => self.client_headers(block),
                Ok(None) => Ok(()),
                Err(e) => Err(match e {
                    BlockError::TooLarge => {
                        conn_error(frame::ENHANCE_YOUR_CALM, "header block too large")
                    }
                    e => conn_error(frame::PROTOCOL_ERROR, e.to_string()),
                }),
            },
            frame::RST_STREAM => {
                self.client_reset(head.stream);
                Ok(())
            }
            frame::SETTINGS => self.client_settings_frame(head, payload),
            frame::PING => {
                if head.stream != 0 || payload.len() != 8 {
                    return Err(conn_error(frame::PROTOCOL_ERROR, "bad PING"));
                }
                if !head.has(frame::ACK) {
                    let payload: [u8; 8] = payload.try_into().unwrap_or([0; 8]);
                    self.client_frame(None, |b| frame::put_ping_ack(b, &payload));
                }
                Ok(())
            }
            frame::GOAWAY => {
                // The client will open no more streams; it closes when it is done.
                Ok(())
            }
            frame::WINDOW_UPDATE => {
                let inc = window_increment(payload)
                    .ok_or_else(|| conn_error(frame::PROTOCOL_ERROR, "bad WINDOW_UPDATE"))?;
                self.client_window_update(head.stream, inc);
                Ok(())
            }
            frame::PUSH_PROMISE => Err(conn_error(
                frame::PROTOCOL_ERROR,
                "PUSH_PROMISE from a client",
            )),
            // PRIORITY and unknown frame types are ignored.
            _ => Ok(()),
        }
    }

    fn client_settings_frame(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.has(frame::ACK) {
            if self.client_acks_to_swallow > 0 {
                self.client_acks_to_swallow -= 1;
            } else if let Up::Live(up) = &mut self.up {
                frame::put_settings_ack(&mut up.out.buf);
            }
            return Ok(());
        }
        let params = frame::parse_settings(payload)
            .ok_or_else(|| conn_error(frame::FRAME_SIZE_ERROR, "bad SETTINGS length"))?;
        for &(id, value) in &params {
            match id {
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    if i64::from(value) > frame::MAX_WINDOW {
                        return Err(conn_error(frame::FLOW_CONTROL_ERROR, "initial window"));
                    }
                    let delta = i64::from(value) - self.client_initial_window;
                    self.client_initial_window = i64::from(value);
                    for s in self.streams.values_mut() {
                        s.client_win += delta;
                    }
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(frame::DEFAULT_MAX_FRAME..=frame::MAX_MAX_FRAME).contains(&value) {
                        return Err(conn_error(frame::PROTOCOL_ERROR, "max frame size"));
                    }
                    self.client_max_frame = value as usize;
                }
                frame::SETTINGS_HEADER_TABLE_SIZE => {
                    self.client_enc.set_limit(value as usize);
                    self.client_table_size = self.client_table_size.max(value as usize);
                    self.up_dec.set_allowed(self.client_table_size);
                }
                _ => {}
            }
            self.client_settings.insert(id, value);
        }
        match &mut self.up {
            Up::Live(up) => up.out.buf.extend_from_slice(&payload_frame(head, payload)),
            // No runtime to answer: acknowledge here (its settings are sent on connect).
            _ if self.server_preface_sent => {
                self.client_frame(None, frame::put_settings_ack);
            }
            _ => self.deferred_acks += 1,
        }
        Ok(())
    }

    fn client_window_update(&mut self, stream: u32, inc: i64) {
        if stream == 0 {
            self.client_window += inc;
            if let Up::Live(up) = &mut self.up {
                let room = self.client_window - self.out.queued;
                let pass = (room - up.belief).clamp(0, inc);
                if pass > 0 {
                    up.belief += pass;
                    frame::put_window_update(&mut up.out.buf, 0, pass as u32);
                }
            }
        } else if let Some(s) = self.streams.get_mut(&stream) {
            s.client_win += inc;
            if let (State::Forwarded { up: id }, Up::Live(up)) = (&s.state, &mut self.up) {
                frame::put_window_update(&mut up.out.buf, *id, inc as u32);
            }
        }
        self.pump_client();
    }

    fn client_headers(&mut self, block: Block) -> Result<(), ConnError> {
        let (literal, path) = reencode(&mut self.client_dec, &block.bytes)?;
        let id = block.stream;
        if let Some(s) = self.streams.get_mut(&id) {
            // Trailers.
            s.client_done = true;
            match &mut s.state {
                State::Forwarded { up: up_id } => {
                    let up_id = *up_id;
                    let max_frame = self.up_max_frame;
                    self.upstream_frame(None, |b| {
                        frame::put_header_block(b, up_id, &literal, true, max_frame)
                    });
                }
                State::Held(h) => {
                    h.trailers = Some(literal);
                    h.ended = true;
                    self.held_progress(id);
                }
                State::Local => self.maybe_remove(id),
            }
            return Ok(());
        }
        if id % 2 == 0 || id <= self.last_client_stream {
            // A closed stream's trailers, or a stream the client may not open.
            if id % 2 == 0 || id > self.last_client_stream {
                return Err(conn_error(frame::PROTOCOL_ERROR, "bad stream id"));
            }
            return Ok(());
        }
        self.last_client_stream = id;
        if self.draining {
            self.client_frame(None, |b| frame::put_rst(b, id, frame::REFUSED_STREAM));
            return Ok(());
        }
        let path = path.unwrap_or_default();
        let inspect = matches!(
            path.as_str(),
            PULL_IMAGE | IMAGE_STATUS | REMOVE_IMAGE | CREATE_CONTAINER
        );
        let stream = Stream {
            state: State::Held(Held {
                headers: literal,
                ended: block.end_stream,
                forward: !inspect,
                ..Held::default()
            }),
            call: Call::start(&path),
            client_done: block.end_stream,
            answered: false,
            headers_sent: false,
            client_win: self.client_initial_window,
            belief: self.up_initial_window,
            up_win: 0,
            queued_up: 0,
            queued_client: 0,
        };
        self.streams.insert(id, stream);
        self.held_progress(id);
        Ok(())
    }

    fn client_data(&mut self, head: Head, f: Bytes) -> Result<(), ConnError> {
        let flow = head.len as i64;
        self.client_belief -= flow;
        let end = head.has(frame::END_STREAM);
        let id = head.stream;
        let Some(s) = self.streams.get_mut(&id) else {
            if id == 0 || id > self.last_client_stream {
                return Err(conn_error(frame::PROTOCOL_ERROR, "DATA on an idle stream"));
            }
            // A stream that has ended here: nobody takes the data; give the window back.
            self.credit_client(0, flow);
            return Ok(());
        };
        s.belief -= flow;
        if end {
            s.client_done = true;
        }
        match &mut s.state {
            State::Forwarded { up } => {
                let up = *up;
                s.queued_up += flow;
                self.queued_up += flow;
                self.upstream_frame(Some((id, flow)), |b| frame::put_renumbered(b, &f, up));
            }
            State::Held(h) => {
                let range = frame::content(&head, &f[frame::HEADER_LEN..])
                    .ok_or_else(|| conn_error(frame::PROTOCOL_ERROR, "bad DATA padding"))?;
                if !h.forward {
                    h.body
                        .extend_from_slice(&f[frame::HEADER_LEN..][range.clone()]);
                }
                h.frames.push(f);
                h.flow += flow;
                h.ended |= end;
                let (credited, too_large) = (h.credited, h.body.len() > MAX_CRI_MESSAGE_BYTES + 5);
                s.queued_up += flow;
                self.queued_up += flow;
                if credited {
                    self.credit_client(id, flow);
                }
                if too_large {
                    let status = crate::audit::status(
                        tonic::Code::ResourceExhausted,
                        format!("request larger than {MAX_CRI_MESSAGE_BYTES} bytes not forwarded"),
                    );
                    self.fail_stream(id, &status);
                    return Ok(());
                }
                self.credit_held();
                self.held_progress(id);
            }
            State::Local => {
                self.credit_client(0, flow);
                self.maybe_remove(id);
            }
        }
        if self.queued_up + self.out.queued > MAX_BUFFERED {
            return Err(conn_error(
                frame::ENHANCE_YOUR_CALM,
                "too much buffered data",
            ));
        }
        Ok(())
    }

    /// Gives the client window for held requests that could otherwise wait for window the
    /// runtime cannot give (see [`HELD_UNCREDITED_MAX`]).
    fn credit_held(&mut self) {
        let uncredited: i64 = self
            .streams
            .values()
            .filter_map(|s| match &s.state {
                State::Held(h) if !h.credited && !h.ended => Some(h.flow),
                _ => None,
            })
            .sum();
        let credit: Vec<(u32, i64)> = self
            .streams
            .iter_mut()
            .filter_map(|(&id, s)| match &mut s.state {
                State::Held(h)
                    if !h.credited
                        && !h.ended
                        && (h.flow >= HELD_UNCREDITED_MAX
                            || uncredited >= HELD_UNCREDITED_TOTAL_MAX) =>
                {
                    h.credited = true;
                    Some((id, h.flow))
                }
                _ => None,
            })
            .collect();
        for (id, flow) in credit {
            self.credit_client(id, flow);
        }
    }

    /// Window updates to the client for `flow` bytes: on the connection, and on `stream` if
    /// not 0.
    fn credit_client(&mut self, stream: u32, flow: i64) {
        if flow <= 0 {
            return;
        }
        self.client_belief += flow;
        if stream != 0 {
            if let Some(s) = self.streams.get_mut(&stream) {
                s.belief += flow;
            }
        }
        self.client_frame(None, |b| {
            frame::put_window_update(b, 0, flow as u32);
            if stream != 0 {
                frame::put_window_update(b, stream, flow as u32);
            }
        });
    }

    fn client_reset(&mut self, id: u32) {
        let Some(mut s) = self.streams.remove(&id) else {
            return;
        };
        s.call.finish(tonic::Code::Cancelled);
        self.waiting.retain(|&w| w != id);
        let dropped_for_client = self.out.drop_stream(id);
        self.out.queued -= dropped_for_client;
        match &s.state {
            State::Forwarded { up: up_id } => {
                self.queued_up -= s.queued_up;
                let mut uncredited = 0;
                if let Up::Live(up) = &mut self.up {
                    // Frames of this stream still queued for the runtime are dropped, and
                    // data the runtime sent that the client will not get is given back.
                    uncredited = up.out.drop_stream(id);
                    frame::put_rst(&mut up.out.buf, *up_id, frame::CANCEL);
                    if dropped_for_client > 0 {
                        up.belief += dropped_for_client;
                        frame::put_window_update(&mut up.out.buf, 0, dropped_for_client as u32);
                    }
                    up.retire(*up_id);
                }
                self.credit_client(0, uncredited);
            }
            State::Held(h) => {
                self.queued_up -= h.flow;
                if !h.credited {
                    self.credit_client(0, h.flow);
                }
            }
            State::Local => {}
        }
    }

    // ----- held requests -----

    /// Moves a held request on: decide it once complete, forward it once decided.
    fn held_progress(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let State::Held(h) = &mut s.state else {
            return;
        };
        if h.forward {
            if !self.waiting.contains(&id) {
                self.open(id);
            }
            return;
        }
        if !h.ended || h.deciding {
            return;
        }
        h.deciding = true;
        let parts = match request_parts(&h.headers) {
            Ok(p) => p,
            Err(message) => {
                let status = crate::audit::status(tonic::Code::InvalidArgument, message);
                self.fail_stream(id, &status);
                return;
            }
        };
        let body = std::mem::take(&mut h.body).freeze();
        let proxy = self.proxy.clone();
        // Only a PullImage decision makes runtime calls.
        let via = (parts.uri.path() == PULL_IMAGE).then(|| RelayCalls::new(self.calls_tx.clone()));
        // Boxed on every call, so kept small: what waits is boxed inside (see `decide`).
        let mut decision = Box::pin(async move {
            match proxy.decide(parts, body, via).await {
                Verdict::Forward => Outcome::Forward,
                Verdict::Respond(resp) => Outcome::Answer(Box::pin(collect_answer(resp)).await),
            }
        });
        // Most decisions need no waiting: take them at once, without a task.
        let waker = std::task::Waker::noop();
        match decision.as_mut().poll(&mut Context::from_waker(waker)) {
            Poll::Ready(outcome) => self.on_outcome(id, outcome),
            Poll::Pending => {
                let tx = self.verdict_tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send((id, decision.await));
                });
            }
        }
    }

    fn on_outcome(&mut self, id: u32, outcome: Outcome) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        match outcome {
            Outcome::Forward => {
                if let State::Held(h) = &mut s.state {
                    h.forward = true;
                }
                self.held_progress(id);
            }
            Outcome::Answer(a) => self.answer(id, a),
        }
    }

    /// Opens the held request `id` on the runtime connection (or waits for one).
    fn open(&mut self, id: u32) {
        match &self.up {
            Up::Live(up) if up.goaway.is_some() => {
                let status = crate::audit::status(
                    tonic::Code::Unavailable,
                    format!(
                        "runtime endpoint {} is unavailable: it is shutting down",
                        self.proxy.upstream().endpoint()
                    ),
                );
                self.fail_stream(id, &status);
                return;
            }
            Up::Live(_) => {}
            Up::Down => {
                self.waiting.push(id);
                self.connect();
                return;
            }
            Up::Connecting(_) => {
                self.waiting.push(id);
                return;
            }
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let State::Held(h) = std::mem::replace(&mut s.state, State::Local) else {
            return;
        };
        let Up::Live(up) = &mut self.up else {
            return;
        };
        let up_id = up.next_id;
        up.next_id += 2;
        up.by_id.insert(up_id, id);
        s.state = State::Forwarded { up: up_id };
        s.up_win = self.up_initial_window;
        let end_on_headers = h.ended && h.frames.is_empty() && h.trailers.is_none();
        let max_frame = self.up_max_frame;
        self.upstream_frame(None, |b| {
            frame::put_header_block(b, up_id, &h.headers, end_on_headers, max_frame)
        });
        for data in h.frames {
            let flow = Head::parse(&data).map_or(0, |d| d.len as i64);
            self.upstream_frame(Some((id, flow)), |b| frame::put_renumbered(b, &data, up_id));
        }
        if let Some(trailers) = h.trailers {
            let max_frame = self.up_max_frame;
            self.upstream_frame(None, |b| {
                frame::put_header_block(b, up_id, &trailers, true, max_frame)
            });
        }
    }

    /// Makes `call` on the runtime connection, or replies `None` when it cannot now (no live
    /// connection, or frames for the runtime waiting for window, which a new stream must not
    /// overtake): the proxy then makes it on its own connection.
    fn start_internal(&mut self, call: RelayCall) {
        let Up::Live(up) = &mut self.up else {
            let _ = call.reply.send(None);
            return;
        };
        let len = call.message.len();
        let fits = (len as i64) <= up.window.min(self.up_initial_window);
        if up.goaway.is_some() || !up.out.queue.is_empty() || !fits {
            let _ = call.reply.send(None);
            return;
        }
        let up_id = up.next_id;
        up.next_id += 2;
        let mut headers = BytesMut::with_capacity(128);
        for (n, v) in [
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", call.path.as_bytes()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"user-agent", b"imagestream"),
        ] {
            frame::put_field(&mut headers, n, v);
        }
        frame::put_header_block(&mut up.out.buf, up_id, &headers, false, self.up_max_frame);
        for f in frame::data_frames(up_id, &call.message, true, self.up_max_frame) {
            up.out.buf.extend_from_slice(&f);
        }
        up.window -= len as i64;
        up.internal.insert(
            up_id,
            Internal {
                reply: call.reply,
                path: call.path,
                http_status: None,
                grpc: http::HeaderMap::new(),
                data: BytesMut::new(),
            },
        );
    }

    /// DATA of one of the relay's own calls: kept, and the window it took given back.
    fn internal_data(&mut self, head: Head, f: &[u8]) -> Result<(), UpstreamError> {
        let Up::Live(up) = &mut self.up else {
            return Ok(());
        };
        let flow = head.len as i64;
        if flow > 0 {
            up.belief += flow;
            frame::put_window_update(&mut up.out.buf, 0, flow as u32);
            if !head.has(frame::END_STREAM) {
                frame::put_window_update(&mut up.out.buf, head.stream, flow as u32);
            }
        }
        let payload = &f[frame::HEADER_LEN..];
        let range = frame::content(&head, payload)
            .ok_or_else(|| protocol("bad DATA padding from the runtime"))?;
        let Some(call) = up.internal.get_mut(&head.stream) else {
            return Ok(());
        };
        if call.data.len() + range.len() > MAX_CRI_MESSAGE_BYTES + 5 {
            if let Some(call) = up.internal.remove(&head.stream) {
                let status = Status::resource_exhausted(format!(
                    "the runtime's answer to {} is larger than {MAX_CRI_MESSAGE_BYTES} bytes",
                    call.path
                ));
                let _ = call.reply.send(Some(Err(status)));
            }
            if !head.has(frame::END_STREAM) {
                frame::put_rst(&mut up.out.buf, head.stream, frame::CANCEL);
            }
            return Ok(());
        }
        call.data.extend_from_slice(&payload[range]);
        if head.has(frame::END_STREAM) {
            if let Some(call) = up.internal.remove(&head.stream) {
                call.finish();
            }
        }
        Ok(())
    }

    /// Answers stream `id` with `a` (the request is not forwarded, or no longer).
    fn answer(&mut self, id: u32, a: Answer) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let previous = std::mem::replace(&mut s.state, State::Local);
        s.call.finish(a.code);
        let client_done = s.client_done;
        let headers_sent = s.headers_sent;
        s.answered = true;
        match previous {
            State::Held(h) => {
                s.queued_up -= h.flow;
                self.queued_up -= h.flow;
                self.waiting.retain(|&w| w != id);
                if !h.credited {
                    self.credit_client(0, h.flow);
                }
            }
            State::Forwarded { up: up_id } => {
                if let Up::Live(up) = &mut self.up {
                    frame::put_rst(&mut up.out.buf, up_id, frame::CANCEL);
                }
            }
            State::Local => {}
        }
        if headers_sent {
            // Mid-response: the client can only be told by a reset.
            self.client_frame(None, |b| frame::put_rst(b, id, frame::INTERNAL_ERROR));
        } else {
            let end_on_headers = a.data.is_empty() && a.trailers.is_none();
            self.client_block(id, &a.headers, end_on_headers);
            if !a.data.is_empty() {
                let frames =
                    frame::data_frames(id, &a.data, a.trailers.is_none(), self.client_max_frame);
                for f in frames {
                    let flow = (f.len() - frame::HEADER_LEN) as i64;
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.queued_client += flow;
                    }
                    self.queue_client(f, Some((id, flow)));
                }
            }
            if let Some(trailers) = &a.trailers {
                self.client_block(id, trailers, true);
            }
            if !client_done {
                // A complete answer before the whole request: no need to send the rest.
                self.client_frame(None, |b| frame::put_rst(b, id, frame::NO_ERROR));
            }
        }
        if let Some(s) = self.streams.get_mut(&id) {
            s.client_done = true;
        }
        self.maybe_remove(id);
    }

    /// A header block made here, for the client.
    fn client_block(&mut self, id: u32, fields: &Fields, end_stream: bool) {
        let mut hb = BytesMut::new();
        self.client_enc.begin(&mut hb);
        for (n, v) in fields {
            self.client_enc.field(&mut hb, n, v);
        }
        let max_frame = self.client_max_frame;
        self.client_frame(None, |b| {
            frame::put_header_block(b, id, &hb, end_stream, max_frame)
        });
    }

    /// Fails stream `id` with `status` (as a trailers-only answer, or a reset mid-response).
    fn fail_stream(&mut self, id: u32, status: &Status) {
        self.answer(id, Answer::status(status));
    }

    fn maybe_remove(&mut self, id: u32) {
        let done = self
            .streams
            .get(&id)
            .is_some_and(|s| s.client_done && s.answered && s.queued_client == 0);
        if done {
            self.streams.remove(&id);
        }
    }

    // ----- frames from the runtime -----

    fn on_upstream_frame(&mut self, head: Head, f: Bytes) -> Result<(), UpstreamError> {
        let Up::Live(up) = &mut self.up else {
            return Ok(());
        };
        if up.block.is_some() && head.kind != frame::CONTINUATION {
            return Err(protocol("the runtime sent a frame inside a header block"));
        }
        let payload = &f[frame::HEADER_LEN..];
        match head.kind {
            frame::DATA => {
                let flow = head.len as i64;
                up.belief -= flow;
                if up.internal.contains_key(&head.stream) {
                    return self.internal_data(head, &f);
                }
                let Some(&id) = up.by_id.get(&head.stream) else {
                    // A stream the client has left: give the runtime its window back.
                    up.belief += flow;
                    frame::put_window_update(&mut up.out.buf, 0, flow as u32);
                    return Ok(());
                };
                if head.has(frame::END_STREAM) {
                    up.by_id.remove(&head.stream);
                }
                let Some(s) = self.streams.get_mut(&id) else {
                    // Reset by the client: the data goes nowhere.
                    if let Up::Live(up) = &mut self.up {
                        up.belief += flow;
                        frame::put_window_update(&mut up.out.buf, 0, flow as u32);
                    }
                    return Ok(());
                };
                s.queued_client += flow;
                self.client_frame(Some((id, flow)), |b| frame::put_renumbered(b, &f, id));
                if head.has(frame::END_STREAM) {
                    self.response_ended(id, None);
                }
                Ok(())
            }
            frame::HEADERS | frame::CONTINUATION => match assemble(&mut up.block, &head, &f) {
                Ok(Some(block)) => self.upstream_headers(block),
                Ok(None) => Ok(()),
                Err(e) => Err(protocol(format!("{e} from the runtime"))),
            },
            frame::RST_STREAM => {
                let code = window_increment(payload).unwrap_or(0) as u32;
                if let Some(call) = up.internal.remove(&head.stream) {
                    // Refused (say, over the runtime's stream limit, which the client's
                    // streams may fill): made again by the proxy's client.
                    let answer = (code != frame::REFUSED_STREAM).then(|| {
                        Err(Status::new(
                            reset_code(code),
                            format!("the runtime reset the proxy's {} call", call.path),
                        ))
                    });
                    let _ = call.reply.send(answer);
                }
                if let Some(id) = up.by_id.remove(&head.stream) {
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.client_done = true;
                        self.client_frame(None, |b| frame::put_rst(b, id, code));
                        self.response_ended(id, Some(reset_code(code)));
                    }
                }
                Ok(())
            }
            frame::SETTINGS => {
                if head.has(frame::ACK) {
                    if up.acks_to_swallow > 0 {
                        up.acks_to_swallow -= 1;
                    } else {
                        self.client_frame(None, frame::put_settings_ack);
                    }
                    return Ok(());
                }
                let params = frame::parse_settings(payload)
                    .ok_or_else(|| protocol("bad SETTINGS from the runtime"))?;
                for &(id, value) in &params {
                    match id {
                        frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                            let delta = i64::from(value) - self.up_initial_window;
                            self.up_initial_window = i64::from(value);
                            for s in self.streams.values_mut() {
                                s.belief += delta;
                                if matches!(s.state, State::Forwarded { .. }) {
                                    s.up_win += delta;
                                }
                            }
                        }
                        frame::SETTINGS_MAX_FRAME_SIZE => {
                            self.up_max_frame = (value as usize).clamp(
                                frame::DEFAULT_MAX_FRAME as usize,
                                frame::MAX_MAX_FRAME as usize,
                            );
                        }
                        frame::SETTINGS_HEADER_TABLE_SIZE => {
                            self.client_dec.set_allowed(
                                (value as usize).max(frame::DEFAULT_HEADER_TABLE as usize),
                            );
                        }
                        _ => {}
                    }
                }
                let first = !self.server_preface_sent;
                self.server_preface_sent = true;
                self.queue_client(payload_frame(head, payload), None);
                if first {
                    self.flush_deferred_acks();
                }
                Ok(())
            }
            frame::PING => {
                if !head.has(frame::ACK) {
                    frame::put_ping_ack(&mut up.out.buf, payload.try_into().unwrap_or(&[0; 8]));
                }
                Ok(())
            }
            frame::GOAWAY => {
                let last = window_increment(payload).unwrap_or(0) as u32;
                up.goaway = Some(last);
                let status = crate::audit::status(
                    tonic::Code::Unavailable,
                    format!(
                        "runtime endpoint {} is unavailable: it is shutting down",
                        self.proxy.upstream().endpoint()
                    ),
                );
                let mut refused: Vec<u32> = up
                    .by_id
                    .iter()
                    .filter(|(&u, _)| u > last)
                    .map(|(_, &c)| c)
                    .collect();
                refused.sort_unstable();
                // The relay's own calls it will not answer: made again by the proxy's client.
                up.internal.retain(|&u, _| u <= last);
                for id in refused {
                    self.fail_stream(id, &status);
                }
                Ok(())
            }
            frame::WINDOW_UPDATE => {
                let inc = window_increment(payload)
                    .ok_or_else(|| protocol("bad WINDOW_UPDATE from the runtime"))?;
                if head.stream == 0 {
                    up.window += inc;
                    let room = up.window - self.queued_up;
                    let pass = (room - self.client_belief).clamp(0, inc);
                    if pass > 0 {
                        self.client_belief += pass;
                        self.client_frame(None, |b| frame::put_window_update(b, 0, pass as u32));
                    }
                } else if let Some(&id) = up.by_id.get(&head.stream) {
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.up_win += inc;
                        let room = s.up_win - s.queued_up;
                        let pass = (room - s.belief).clamp(0, inc);
                        if pass > 0 && !s.client_done {
                            s.belief += pass;
                            self.client_frame(None, |b| {
                                frame::put_window_update(b, id, pass as u32)
                            });
                        }
                    }
                }
                self.pump_upstream();
                Ok(())
            }
            frame::PUSH_PROMISE => Err(protocol("PUSH_PROMISE from the runtime")),
            _ => Ok(()),
        }
    }

    fn upstream_headers(&mut self, block: Block) -> Result<(), UpstreamError> {
        let mut size = 0usize;
        // The decoded fields, in one buffer: (start, end of name, end of value).
        let mut arena = BytesMut::with_capacity(block.bytes.len() * 2 + 64);
        let mut spans: Vec<(usize, usize, usize)> = Vec::with_capacity(8);
        let decoded = self.up_dec.decode(&block.bytes, |n, v| {
            size += n.len() + v.len() + hpack::ENTRY_OVERHEAD;
            if size > MAX_HEADER_BLOCK {
                return;
            }
            let start = arena.len();
            arena.extend_from_slice(n);
            let mid = arena.len();
            arena.extend_from_slice(v);
            spans.push((start, mid, arena.len()));
        });
        if let Err(e) = decoded {
            return Err(protocol(format!("bad header block from the runtime: {e}")));
        }
        if size > MAX_HEADER_BLOCK {
            return Err(protocol("header list too large from the runtime"));
        }
        let arena = arena.freeze();
        let field =
            |&(start, mid, end): &(usize, usize, usize)| (&arena[start..mid], &arena[mid..end]);
        let mut status: Option<tonic::Code> = None;
        let mut http_status: Option<u16> = None;
        for (n, v) in spans.iter().map(field) {
            if n == b"grpc-status" {
                status = Some(tonic::Code::from_bytes(v));
            } else if n == b":status" {
                http_status = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
            }
        }
        let Up::Live(up) = &mut self.up else {
            return Ok(());
        };
        if let Some(call) = up.internal.get_mut(&block.stream) {
            call.http_status = call.http_status.or(http_status);
            for &(start, mid, end) in &spans {
                if !arena[start..mid].starts_with(b"grpc-") {
                    continue;
                }
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(&arena[start..mid]),
                    http::HeaderValue::from_maybe_shared(arena.slice(mid..end)),
                ) {
                    call.grpc.insert(n, v);
                }
            }
            if block.end_stream {
                if let Some(call) = up.internal.remove(&block.stream) {
                    call.finish();
                }
            }
            return Ok(());
        }
        let Some(&id) = up.by_id.get(&block.stream) else {
            return Err(protocol(format!(
                "the runtime answered on stream {} it never opened",
                block.stream
            )));
        };
        if block.end_stream {
            up.by_id.remove(&block.stream);
        }
        // Encoded again for the client (the relay's own table, see `client_enc`): a new
        // runtime connection, or a block the client does not get, never leaves the client's
        // table out of step.
        if self.streams.contains_key(&id) {
            let mut hb = BytesMut::with_capacity(arena.len() + 16);
            self.client_enc.begin(&mut hb);
            for (n, v) in spans.iter().map(field) {
                self.client_enc.field(&mut hb, n, v);
            }
            let max_frame = self.client_max_frame;
            self.client_frame(None, |b| {
                frame::put_header_block(b, id, &hb, block.end_stream, max_frame)
            });
            let Some(s) = self.streams.get_mut(&id) else {
                return Ok(());
            };
            let first = !s.headers_sent;
            s.headers_sent = true;
            if let Some(code) = status {
                s.call.finish(code);
            } else if first {
                if let Some(code) = http_status.filter(|&c| c != 200) {
                    let code = http::StatusCode::from_u16(code)
                        .map(http_status_code)
                        .unwrap_or(tonic::Code::Unknown);
                    s.call.finish(code);
                }
            }
            if block.end_stream {
                self.response_ended(id, None);
            }
        }
        Ok(())
    }

    /// The runtime ended its side of stream `id`.
    fn response_ended(&mut self, id: u32, reset: Option<tonic::Code>) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.call.finish(reset.unwrap_or(tonic::Code::Unknown));
            s.answered = true;
            // A reset closes the client's side too; after END_STREAM the client may still
            // send (the runtime then resets or ignores it).
            s.client_done |= reset.is_some();
        }
        self.maybe_remove(id);
    }

    // ----- output -----

    fn send_server_preface(&mut self) {
        if !self.server_preface_sent {
            self.server_preface_sent = true;
            frame::put_settings(&mut self.out.buf, &[]);
            self.client_acks_to_swallow += 1;
            self.flush_deferred_acks();
        }
    }

    fn flush_deferred_acks(&mut self) {
        for _ in 0..std::mem::take(&mut self.deferred_acks) {
            self.client_frame(None, frame::put_settings_ack);
        }
    }

    /// A frame for the client, written by `put`: straight into the output buffer when nothing
    /// waits ahead of it and (for DATA, `data` = stream and length) the window allows, which is
    /// what [`Self::queue_client`] would do at once, without a frame of its own to allocate.
    fn client_frame(&mut self, data: Option<(u32, i64)>, put: impl FnOnce(&mut BytesMut)) {
        if self.out.queue.is_empty() {
            match data {
                None => return put(&mut self.out.buf),
                Some((id, flow)) => {
                    if let Some(s) = self.streams.get_mut(&id) {
                        if flow <= self.client_window && flow <= s.client_win {
                            self.client_window -= flow;
                            s.client_win -= flow;
                            s.queued_client -= flow;
                            put(&mut self.out.buf);
                            self.maybe_remove(id);
                            return;
                        }
                    }
                }
            }
        }
        let mut f = BytesMut::new();
        put(&mut f);
        self.queue_client(f.freeze(), data);
    }

    /// [`Self::client_frame`] for the runtime (see [`Self::queue_upstream`]).
    fn upstream_frame(&mut self, data: Option<(u32, i64)>, put: impl FnOnce(&mut BytesMut)) {
        let Up::Live(up) = &mut self.up else {
            return;
        };
        if up.out.queue.is_empty() {
            match data {
                None => return put(&mut up.out.buf),
                Some((id, flow)) => {
                    if let Some(s) = self.streams.get_mut(&id) {
                        if flow <= up.window && flow <= s.up_win {
                            self.queued_up -= flow;
                            up.window -= flow;
                            s.up_win -= flow;
                            s.queued_up -= flow;
                            return put(&mut up.out.buf);
                        }
                    }
                }
            }
        }
        let mut f = BytesMut::new();
        put(&mut f);
        self.queue_upstream(f.freeze(), data);
    }

    /// Queues a frame for the client; DATA (`data` = stream and length) waits for window.
    fn queue_client(&mut self, f: Bytes, data: Option<(u32, i64)>) {
        if let Some((_, flow)) = data {
            self.out.queued += flow;
        }
        self.out.queue.push_back(Queued { frame: f, data });
        self.pump_client();
    }

    fn pump_client(&mut self) {
        while let Some(front) = self.out.queue.front() {
            if let Some((id, flow)) = front.data {
                let Some(s) = self.streams.get_mut(&id) else {
                    // The stream is gone (reset): its data is dropped.
                    self.out.queued -= flow;
                    self.out.queue.pop_front();
                    continue;
                };
                if flow > self.client_window || flow > s.client_win {
                    break;
                }
                self.client_window -= flow;
                s.client_win -= flow;
                s.queued_client -= flow;
                self.out.queued -= flow;
            }
            if let Some(q) = self.out.queue.pop_front() {
                self.out.buf.extend_from_slice(&q.frame);
                if let Some((id, _)) = q.data {
                    self.maybe_remove(id);
                }
            }
        }
    }

    /// Queues a frame for the runtime; DATA (`data` = client stream and length) waits for
    /// window. Requires a live runtime connection (else the frame is dropped).
    fn queue_upstream(&mut self, f: Bytes, data: Option<(u32, i64)>) {
        let Up::Live(up) = &mut self.up else {
            return;
        };
        up.out.queue.push_back(Queued { frame: f, data });
        self.pump_upstream();
    }

    fn pump_upstream(&mut self) {
        let Up::Live(up) = &mut self.up else {
            return;
        };
        let mut orphaned = 0;
        while let Some(front) = up.out.queue.front() {
            if let Some((id, flow)) = front.data {
                self.queued_up -= flow;
                let Some(s) = self.streams.get_mut(&id) else {
                    // The stream has ended here: the runtime will not get this data.
                    orphaned += flow;
                    up.out.queue.pop_front();
                    continue;
                };
                if flow > up.window || flow > s.up_win {
                    self.queued_up += flow;
                    break;
                }
                up.window -= flow;
                s.up_win -= flow;
                s.queued_up -= flow;
            }
            if let Some(q) = up.out.queue.pop_front() {
                up.out.buf.extend_from_slice(&q.frame);
            }
        }
        self.credit_client(0, orphaned);
    }
}

impl Outbox {
    /// Drops the DATA frames queued for client stream `id`; returns their length.
    fn drop_stream(&mut self, id: u32) -> i64 {
        let mut dropped = 0;
        self.queue.retain(|q| match q.data {
            Some((s, flow)) if s == id => {
                dropped += flow;
                false
            }
            _ => true,
        });
        dropped
    }
}

impl Internal {
    /// The runtime's answer is complete: the message, or the status it carried.
    fn finish(self) {
        let answer = match Status::from_header_map(&self.grpc) {
            Some(status) if status.code() != tonic::Code::Ok => Err(status),
            _ if self.http_status != Some(200) => Err(Status::unknown(format!(
                "runtime answered {} with HTTP status {}",
                self.path,
                self.http_status.map_or("none".into(), |c| c.to_string())
            ))),
            _ => Ok(self.data.freeze()),
        };
        let _ = self.reply.send(Some(answer));
    }
}

impl UpConn {
    /// Keeps the mapping of a runtime stream the client has left, for frames still on their
    /// way, up to [`MAX_RETIRED_IDS`] of them.
    fn retire(&mut self, up_id: u32) {
        self.retired.push_back(up_id);
        while self.retired.len() > MAX_RETIRED_IDS {
            if let Some(old) = self.retired.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }
}

fn protocol(reason: impl Into<String>) -> UpstreamError {
    UpstreamError::Protocol(reason.into())
}

/// The 31-bit value at the front of a WINDOW_UPDATE (or the 32-bit code of a RST_STREAM or the
/// last stream of a GOAWAY, masked), if the payload has one.
fn window_increment(payload: &[u8]) -> Option<i64> {
    let b: [u8; 4] = payload.get(..4)?.try_into().ok()?;
    Some(i64::from(u32::from_be_bytes(b) & 0x7fff_ffff))
}

/// The frame `head` + `payload` as received.
fn payload_frame(head: Head, payload: &[u8]) -> Bytes {
    let mut f = BytesMut::with_capacity(frame::HEADER_LEN + payload.len());
    frame::put_head(&mut f, payload.len(), head.kind, head.flags, head.stream);
    f.extend_from_slice(payload);
    f.freeze()
}

fn reset_code(code: u32) -> tonic::Code {
    match code {
        frame::CANCEL => tonic::Code::Cancelled,
        frame::REFUSED_STREAM => tonic::Code::Unavailable,
        frame::ENHANCE_YOUR_CALM => tonic::Code::ResourceExhausted,
        _ => tonic::Code::Internal,
    }
}

/// A client's header block re-encoded as literals (see [`frame::put_field`]), which need no
/// table to read, and its `:path`.
fn reencode(dec: &mut Decoder, block: &[u8]) -> Result<(Bytes, Option<String>), ConnError> {
    let mut literal = BytesMut::with_capacity(block.len() * 2 + 64);
    let mut path = None;
    let mut size = 0usize;
    dec.decode(block, |n, v| {
        size += n.len() + v.len() + hpack::ENTRY_OVERHEAD;
        if size <= MAX_HEADER_BLOCK {
            frame::put_field(&mut literal, n, v);
            if n == b":path" {
                path = Some(String::from_utf8_lossy(v).into_owned());
            }
        }
    })
    .map_err(|e| conn_error(frame::COMPRESSION_ERROR, e.to_string()))?;
    if size > MAX_HEADER_BLOCK {
        return Err(conn_error(
            frame::ENHANCE_YOUR_CALM,
            "header list too large",
        ));
    }
    Ok((literal.freeze(), path))
}

/// A request's method, path and headers, for [`CriProxy::decide`], from its header block as
/// re-encoded by [`reencode`].
fn request_parts(literal: &[u8]) -> Result<http::request::Parts, String> {
    let mut req = http::Request::new(());
    *req.method_mut() = http::Method::POST;
    *req.version_mut() = http::Version::HTTP_2;
    let mut error = None;
    Decoder::new(0)
        .decode(literal, |n, v| {
            if error.is_some() {
                return;
            }
            if n.first() == Some(&b':') {
                if n == b":path" {
                    match http::Uri::try_from(v) {
                        Ok(uri) => *req.uri_mut() = uri,
                        Err(e) => {
                            error = Some(format!("bad :path {:?}: {e}", String::from_utf8_lossy(v)))
                        }
                    }
                }
                return;
            }
            match (
                http::HeaderName::from_bytes(n),
                http::HeaderValue::from_bytes(v),
            ) {
                (Ok(name), Ok(value)) => {
                    req.headers_mut().append(name, value);
                }
                _ => error = Some(format!("bad header {:?}", String::from_utf8_lossy(n))),
            }
        })
        .map_err(|e| e.to_string())?;
    match error {
        Some(e) => Err(e),
        None => Ok(req.into_parts().0),
    }
}

/// The gRPC status header fields (`grpc-status`, `grpc-message`, ...) of `status`.
fn status_fields(status: &Status) -> Vec<(Bytes, Bytes)> {
    let resp = status.clone().into_http::<tonic::body::Body>();
    fields_of(resp.headers())
        .filter(|(n, _)| n.starts_with(b"grpc-"))
        .collect()
}

fn fields_of(map: &http::HeaderMap) -> impl Iterator<Item = (Bytes, Bytes)> + '_ {
    map.iter().map(|(n, v)| {
        (
            Bytes::copy_from_slice(n.as_str().as_bytes()),
            Bytes::copy_from_slice(v.as_bytes()),
        )
    })
}

/// An answer from [`CriProxy::decide`], read whole (a unary answer, at most one CRI message).
async fn collect_answer(resp: http::Response<tonic::body::Body>) -> Answer {
    use http_body_util::BodyExt;
    let (parts, body) = resp.into_parts();
    let mut headers = vec![(
        Bytes::from_static(b":status"),
        Bytes::copy_from_slice(parts.status.as_str().as_bytes()),
    )];
    headers.extend(fields_of(&parts.headers));
    let mut code = grpc_status(&parts.headers);
    if code.is_some() {
        // Trailers-only.
        return Answer {
            headers,
            data: Bytes::new(),
            trailers: None,
            code: code.unwrap_or(tonic::Code::Unknown),
        };
    }
    let limited = http_body_util::Limited::new(body, MAX_CRI_MESSAGE_BYTES + 5);
    match limited.collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            code = trailers.as_ref().and_then(grpc_status);
            if code.is_none() && parts.status != http::StatusCode::OK {
                code = Some(http_status_code(parts.status));
            }
            Answer {
                headers,
                data: collected.to_bytes(),
                trailers: trailers.map(|t| fields_of(&t).collect()),
                code: code.unwrap_or(tonic::Code::Unknown),
            }
        }
        Err(e) => {
            let status = crate::audit::status(
                tonic::Code::Unavailable,
                format!("the runtime's answer failed: {e}"),
            );
            Answer::status(&status)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a relay call replies once the runtime's answer (`http_status`, the `grpc-*`
    /// fields, the body) is complete.
    fn answer(
        http_status: Option<u16>,
        grpc: &[(&'static str, &'static str)],
        data: &[u8],
    ) -> Result<Bytes, Status> {
        let (reply, mut rx) = tokio::sync::oneshot::channel();
        let mut map = http::HeaderMap::new();
        for (n, v) in grpc {
            map.insert(*n, http::HeaderValue::from_static(v));
        }
        let call = Internal {
            reply,
            path: IMAGE_STATUS,
            http_status,
            grpc: map,
            data: BytesMut::from(data),
        };
        call.finish();
        rx.try_recv().expect("replied").expect("made")
    }

    #[test]
    fn the_relays_own_calls_map_the_runtimes_answer() {
        let ok = answer(Some(200), &[("grpc-status", "0")], b"\0\0\0\0\0");
        assert_eq!(ok.expect("ok").as_ref(), b"\0\0\0\0\0");

        let grpc = [("grpc-status", "5"), ("grpc-message", "image%20gone")];
        let status = answer(Some(200), &grpc, b"").expect_err("status");
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "image gone");

        let status = answer(Some(503), &[], b"").expect_err("status");
        assert_eq!(status.code(), tonic::Code::Unknown);
        assert!(status.message().contains("HTTP status 503"), "{status:?}");
    }
}
