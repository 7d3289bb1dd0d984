//! HTTP/2 frames as the relay sees them (RFC 9113 §4 and §6): a frame header parsed from the
//! front of a read buffer, frames written into an output buffer, SETTINGS parameters, and the
//! HPACK output the relay produces itself. Header blocks the relay re-encodes or makes up are
//! literals without indexing (RFC 7541 §6.2.2, plain strings), so they never touch a peer's
//! dynamic table; reading them needs no state.

use super::hpack::ENTRY_OVERHEAD;
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::VecDeque;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes of a frame header: length (3), type, flags, stream id (4).
pub const HEADER_LEN: usize = 9;
/// The initial flow-control window of a connection and, by default, of a stream.
pub const DEFAULT_WINDOW: i64 = 65_535;
/// The largest frame payload every peer accepts (`SETTINGS_MAX_FRAME_SIZE` default).
pub const DEFAULT_MAX_FRAME: u32 = 16_384;
/// The largest `SETTINGS_MAX_FRAME_SIZE` allowed.
pub const MAX_MAX_FRAME: u32 = (1 << 24) - 1;
/// The largest flow-control window allowed.
pub const MAX_WINDOW: i64 = (1 << 31) - 1;
/// The default `SETTINGS_HEADER_TABLE_SIZE`.
pub const DEFAULT_HEADER_TABLE: u32 = 4_096;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// Error codes (RFC 9113 §7).
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const INTERNAL_ERROR: u32 = 0x2;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// A frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    /// The header at the front of `buf`, if it holds one.
    pub fn parse(buf: &[u8]) -> Option<Head> {
        let h: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Head {
            len: (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]),
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        })
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Writes a frame header.
pub fn put_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.reserve(HEADER_LEN + len);
    // Lengths are bounded by MAX_MAX_FRAME (24 bits) by every caller.
    out.put_uint(len as u64 & 0xff_ffff, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream & 0x7fff_ffff);
}

/// A whole frame (`frame` is its header and payload as received) with its stream id replaced.
pub fn put_renumbered(out: &mut BytesMut, frame: &[u8], stream: u32) {
    out.reserve(frame.len());
    out.extend_from_slice(&frame[..5]);
    out.put_u32(stream & 0x7fff_ffff);
    out.extend_from_slice(&frame[HEADER_LEN..]);
}

pub fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put_head(out, 4, WINDOW_UPDATE, 0, stream);
    out.put_u32(increment & 0x7fff_ffff);
}

pub fn put_rst(out: &mut BytesMut, stream: u32, code: u32) {
    put_head(out, 4, RST_STREAM, 0, stream);
    out.put_u32(code);
}

pub fn put_goaway(out: &mut BytesMut, last_stream: u32, code: u32, debug: &str) {
    put_head(out, 8 + debug.len(), GOAWAY, 0, 0);
    out.put_u32(last_stream & 0x7fff_ffff);
    out.put_u32(code);
    out.extend_from_slice(debug.as_bytes());
}

pub fn put_settings(out: &mut BytesMut, params: &[(u16, u32)]) {
    put_head(out, params.len() * 6, SETTINGS, 0, 0);
    for &(id, value) in params {
        out.put_u16(id);
        out.put_u32(value);
    }
}

pub fn put_settings_ack(out: &mut BytesMut) {
    put_head(out, 0, SETTINGS, ACK, 0);
}

pub fn put_ping_ack(out: &mut BytesMut, payload: &[u8; 8]) {
    put_head(out, 8, PING, ACK, 0);
    out.extend_from_slice(payload);
}

/// A header block as HEADERS and, past `max_frame`, CONTINUATION frames.
pub fn put_header_block(
    out: &mut BytesMut,
    stream: u32,
    block: &[u8],
    end_stream: bool,
    max_frame: usize,
) {
    let mut chunks = block.chunks(max_frame.max(1)).peekable();
    let mut kind = HEADERS;
    let mut flags = if end_stream { END_STREAM } else { 0 };
    if chunks.peek().is_none() {
        put_head(out, 0, kind, flags | END_HEADERS, stream);
        return;
    }
    while let Some(chunk) = chunks.next() {
        if chunks.peek().is_none() {
            flags |= END_HEADERS;
        }
        put_head(out, chunk.len(), kind, flags, stream);
        out.extend_from_slice(chunk);
        kind = CONTINUATION;
        flags = 0;
    }
}

/// `data` as DATA frames of at most `max_frame` bytes; the last one ends the stream if
/// `end_stream`. Returns the frames, each with its flow-controlled length.
pub fn data_frames(stream: u32, data: &[u8], end_stream: bool, max_frame: usize) -> Vec<Bytes> {
    let mut frames = Vec::new();
    let mut chunks = data.chunks(max_frame.max(1)).peekable();
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let mut f = BytesMut::with_capacity(HEADER_LEN + chunk.len());
        put_head(
            &mut f,
            chunk.len(),
            DATA,
            if last && end_stream { END_STREAM } else { 0 },
            stream,
        );
        f.extend_from_slice(chunk);
        frames.push(f.freeze());
    }
    frames
}

/// The SETTINGS parameters in a SETTINGS payload, or `None` if its length is not a multiple
/// of 6.
pub fn parse_settings(payload: &[u8]) -> Option<Vec<(u16, u32)>> {
    if payload.len() % 6 != 0 {
        return None;
    }
    Some(
        payload
            .chunks_exact(6)
            .map(|p| {
                (
                    u16::from_be_bytes([p[0], p[1]]),
                    u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
                )
            })
            .collect(),
    )
}

/// The part of a HEADERS or DATA payload that carries content: without the pad length,
/// padding and (HEADERS) priority fields. `None` if the padding does not fit.
pub fn content(head: &Head, payload: &[u8]) -> Option<std::ops::Range<usize>> {
    let mut start = 0;
    let mut end = payload.len();
    if head.has(PADDED) {
        let pad = usize::from(*payload.first()?);
        start = 1;
        end = end.checked_sub(pad)?;
    }
    if head.kind == HEADERS && head.has(PRIORITY_FLAG) {
        start += 5;
    }
    (start <= end).then_some(start..end)
}

/// An HPACK integer with an `n`-bit prefix, the prefix's other bits set to `first`.
pub fn put_hpack_int(out: &mut BytesMut, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.put_u8(first | value as u8);
        return;
    }
    out.put_u8(first | max as u8);
    value -= max;
    while value >= 128 {
        out.put_u8((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.put_u8(value as u8);
}

fn put_hpack_string(out: &mut BytesMut, s: &[u8]) {
    put_hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// Static-table entries (RFC 7541 Appendix A) that the relay's header blocks use: fields sent
/// as one index byte, and names sent by index.
const STATIC_FIELDS: &[(&[u8], &[u8], usize)] = &[
    (b":method", b"POST", 3),
    (b":scheme", b"http", 6),
    (b":scheme", b"https", 7),
    (b":status", b"200", 8),
];
const STATIC_NAMES: &[(&[u8], usize)] = &[
    (b":authority", 1),
    (b":method", 2),
    (b":path", 4),
    (b":scheme", 6),
    (b":status", 8),
    (b"content-type", 31),
    (b"user-agent", 58),
];

/// Appends one header field to an HPACK block: an indexed static field where there is one,
/// else a literal without indexing (`authorization` and `cookie` never indexed).
pub fn put_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    if let Some(index) = static_field(name, value) {
        put_hpack_int(out, 0x80, 7, index);
        return;
    }
    let first = if never_indexed(name) { 0x10 } else { 0x00 };
    put_literal(out, first, 4, name, value);
}

/// The static-table index of the field `name: value`, if it has one.
fn static_field(name: &[u8], value: &[u8]) -> Option<usize> {
    STATIC_FIELDS
        .iter()
        .find(|(n, v, _)| *n == name && *v == value)
        .map(|&(_, _, index)| index)
}

/// Fields that are never put in a table: credentials.
fn never_indexed(name: &[u8]) -> bool {
    name == b"authorization" || name == b"cookie"
}

/// A literal field whose representation starts with the bits `first` and a `bits`-bit name
/// index (RFC 7541 §6.2): the name by static index where there is one, else as a string.
fn put_literal(out: &mut BytesMut, first: u8, bits: u32, name: &[u8], value: &[u8]) {
    match STATIC_NAMES.iter().find(|(n, _)| *n == name) {
        Some(&(_, index)) => put_hpack_int(out, first, bits, index),
        None => {
            out.put_u8(first);
            put_hpack_string(out, name);
        }
    }
    put_hpack_string(out, value);
}

/// An HPACK encoder with a dynamic table (RFC 7541 §2.3), for the header blocks the relay
/// sends the client: a field seen before goes as one index, so that the answers of a busy
/// connection stay as small as the runtime's own. Blocks must reach the peer in the order they
/// are encoded, and every block encoded must be sent.
pub struct Encoder {
    /// Newest first.
    table: VecDeque<(Bytes, Bytes)>,
    size: usize,
    max: usize,
    /// A size update owed at the start of the next block (the peer lowered its limit).
    update: Option<usize>,
}

impl Encoder {
    pub fn new(max: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max,
            update: None,
        }
    }

    /// The peer's SETTINGS_HEADER_TABLE_SIZE: the table never grows past it (nor past the
    /// size it started with).
    pub fn set_limit(&mut self, limit: usize) {
        if limit < self.max {
            self.max = limit;
            self.evict(0);
            self.update = Some(limit);
        }
    }

    /// Starts a block: the size update the peer is owed, if any.
    pub fn begin(&mut self, out: &mut BytesMut) {
        if let Some(size) = self.update.take() {
            put_table_size_update(out, size);
        }
    }

    /// Appends one field: indexed when the static or dynamic table has it, else a literal
    /// added to the dynamic table (`authorization` and `cookie` never indexed).
    pub fn field(&mut self, out: &mut BytesMut, name: &[u8], value: &[u8]) {
        if let Some(index) = static_field(name, value) {
            put_hpack_int(out, 0x80, 7, index);
            return;
        }
        if let Some(i) = self
            .table
            .iter()
            .position(|(n, v)| n.as_ref() == name && v.as_ref() == value)
        {
            put_hpack_int(out, 0x80, 7, STATIC_TABLE_LEN + 1 + i);
            return;
        }
        let entry = name.len() + value.len() + ENTRY_OVERHEAD;
        if never_indexed(name) || entry > self.max {
            put_field(out, name, value);
            return;
        }
        put_literal(out, 0x40, 6, name, value);
        self.evict(entry);
        self.table
            .push_front((Bytes::copy_from_slice(name), Bytes::copy_from_slice(value)));
        self.size += entry;
    }

    /// Drops the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some((n, v)) = self.table.pop_back() else {
                break;
            };
            self.size -= n.len() + v.len() + ENTRY_OVERHEAD;
        }
    }
}

/// Entries in the HPACK static table (RFC 7541 Appendix A).
const STATIC_TABLE_LEN: usize = 61;

/// A dynamic table size update (RFC 7541 §6.3).
pub fn put_table_size_update(out: &mut BytesMut, size: usize) {
    put_hpack_int(out, 0x20, 5, size);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        loona_hpack::Decoder::new().decode(block).unwrap()
    }

    #[test]
    fn the_encoder_indexes_repeated_fields_and_stays_in_step_with_a_decoder() {
        let mut enc = Encoder::new(256);
        let mut dec = loona_hpack::Decoder::new();
        dec.set_max_table_size(256);
        let answers: Vec<Vec<(&[u8], Vec<u8>)>> = (0..40)
            .map(|i| {
                vec![
                    (&b":status"[..], b"200".to_vec()),
                    (b"content-type", b"application/grpc".to_vec()),
                    (b"grpc-status", b"0".to_vec()),
                    // Values that change, to make the table evict.
                    (b"grpc-message", format!("call {}", i % 7).into_bytes()),
                    (b"x-long", vec![b'x'; 100 + i % 3]),
                    (b"authorization", b"secret".to_vec()),
                ]
            })
            .collect();
        let mut sizes = Vec::new();
        for (i, fields) in answers.iter().enumerate() {
            if i == 20 {
                enc.set_limit(128);
            }
            let mut block = BytesMut::new();
            enc.begin(&mut block);
            for (n, v) in fields {
                enc.field(&mut block, n, v);
            }
            sizes.push(block.len());
            let got = dec.decode(&block).expect("decodes");
            let want: Vec<(Vec<u8>, Vec<u8>)> = fields
                .iter()
                .map(|(n, v)| (n.to_vec(), v.clone()))
                .collect();
            assert_eq!(got, want, "block {i}");
        }
        assert!(enc.size <= 128, "table {} over the lowered limit", enc.size);
        // The fixed fields are indexed from the second block on.
        let mut first = BytesMut::new();
        let mut again = BytesMut::new();
        let mut e = Encoder::new(4096);
        e.field(&mut first, b"content-type", b"application/grpc");
        e.field(&mut again, b"content-type", b"application/grpc");
        assert!(first.len() > 1);
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn header_blocks_decode_to_what_was_put() {
        let fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/runtime.v1.ImageService/ImageStatus"),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"authorization", b"Bearer x"),
            (b"x-long", &[b'a'; 300]),
        ];
        let mut block = BytesMut::new();
        for (n, v) in &fields {
            put_field(&mut block, n, v);
        }
        let got = decode(&block);
        let want: Vec<_> = fields
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(got, want);
        // A table reset before the fields decodes the same.
        let mut reset = BytesMut::new();
        put_table_size_update(&mut reset, 0);
        put_table_size_update(&mut reset, 4096);
        reset.extend_from_slice(&block);
        assert_eq!(decode(&reset), want);
    }

    #[test]
    fn frames_round_trip() {
        let mut out = BytesMut::new();
        put_header_block(&mut out, 7, &[1u8; 40_000], true, 16_384);
        let mut heads = Vec::new();
        let mut rest = &out[..];
        while let Some(h) = Head::parse(rest) {
            heads.push(h);
            rest = &rest[HEADER_LEN + h.len..];
        }
        assert_eq!(
            heads
                .iter()
                .map(|h| (h.kind, h.flags, h.len))
                .collect::<Vec<_>>(),
            vec![
                (HEADERS, END_STREAM, 16_384),
                (CONTINUATION, 0, 16_384),
                (CONTINUATION, END_HEADERS, 40_000 - 2 * 16_384)
            ]
        );
        assert!(heads.iter().all(|h| h.stream == 7));
        let frames = data_frames(3, &[0u8; 20_000], true, 16_384);
        assert_eq!(frames.len(), 2);
        let last = Head::parse(&frames[1]).unwrap();
        assert_eq!((last.kind, last.flags, last.len), (DATA, END_STREAM, 3_616));
        let mut renumbered = BytesMut::new();
        put_renumbered(&mut renumbered, &frames[1], 9);
        assert_eq!(Head::parse(&renumbered).unwrap().stream, 9);
    }

    #[test]
    fn padding_and_priority_are_skipped() {
        let head = Head {
            len: 10,
            kind: HEADERS,
            flags: PADDED | PRIORITY_FLAG,
            stream: 1,
        };
        let payload = [2u8, 0, 0, 0, 0, 0, b'a', b'b', 0, 0];
        assert_eq!(content(&head, &payload), Some(6..8));
        let bad = [20u8, 0, 0];
        let head = Head {
            len: 3,
            kind: DATA,
            flags: PADDED,
            stream: 1,
        };
        assert_eq!(content(&head, &bad), None);
    }
}
