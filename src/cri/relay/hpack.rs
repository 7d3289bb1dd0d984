//! HPACK decoding (RFC 7541) for the relay: the static and dynamic tables, integers, and
//! Huffman-coded strings, with every field handed to a callback as byte slices.
//!
//! Why not a crate: the relay decodes two or three header blocks per call on the CRI hot
//! path. `h2` keeps its decoder private; `loona-hpack` rebuilds a hash map of the Huffman code
//! for every string it decodes and walks it a bit at a time with hash lookups (measured: 10 %
//! of the relay's CPU, half a relayed call's processing); `httlib-hpack` copies every field
//! and shifts its input buffer after each one. This decoder walks a flat binary trie built
//! once, and allocates only for entries it adds to the dynamic table. It is checked against
//! `loona-hpack` and the RFC's examples in the tests.

use super::huffman_codes::CODES;
use std::collections::VecDeque;
use std::sync::OnceLock;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HpackError {
    #[error("header block truncated")]
    Truncated,
    #[error("integer too large")]
    Integer,
    #[error("table index {0} out of range")]
    Index(usize),
    #[error("invalid Huffman code")]
    Huffman,
    #[error("dynamic table size update to {0} above the allowed {1}")]
    TableSize(usize, usize),
    #[error("dynamic table size update after a field")]
    LateSizeUpdate,
}

/// The static table (RFC 7541 Appendix A), from index 1.
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// Bytes an entry counts for in the table's size (RFC 7541 §4.1).
pub const ENTRY_OVERHEAD: usize = 32;

/// A dynamic table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// One direction's decoder: the dynamic table as the peer's encoder built it.
pub struct Decoder {
    table: VecDeque<Entry>,
    size: usize,
    max_size: usize,
    /// The largest size a size update may set (our SETTINGS_HEADER_TABLE_SIZE).
    allowed: usize,
    name: Vec<u8>,
    value: Vec<u8>,
}

impl Decoder {
    pub fn new(allowed: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: allowed,
            allowed,
            name: Vec::new(),
            value: Vec::new(),
        }
    }

    /// Sets the largest table size the peer may choose.
    pub fn set_allowed(&mut self, allowed: usize) {
        self.allowed = allowed;
    }

    /// Decodes a whole header block, calling `field` with each name and value in order.
    pub fn decode(
        &mut self,
        mut block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let mut first = true;
        while let Some(&b) = block.first() {
            if b & 0x80 != 0 {
                let index = int(&mut block, 7)?;
                let (n, v) = self.entry(index)?;
                field(n, v);
            } else if b & 0xe0 == 0x20 {
                if !first {
                    return Err(HpackError::LateSizeUpdate);
                }
                let size = int(&mut block, 5)?;
                if size > self.allowed {
                    return Err(HpackError::TableSize(size, self.allowed));
                }
                self.max_size = size;
                self.evict(0);
                continue;
            } else {
                // Literal: with incremental indexing (01), never indexed (0001) or without
                // indexing (0000).
                let (prefix, index_it) = if b & 0x40 != 0 { (6, true) } else { (4, false) };
                let name_index = int(&mut block, prefix)?;
                let mut name = std::mem::take(&mut self.name);
                let mut value = std::mem::take(&mut self.value);
                name.clear();
                if name_index == 0 {
                    string(&mut block, &mut name)?;
                } else {
                    name.extend_from_slice(self.entry(name_index)?.0);
                }
                string(&mut block, &mut value)?;
                field(&name, &value);
                if index_it {
                    self.insert(&name, &value);
                }
                self.name = name;
                self.value = value;
            }
            first = false;
        }
        Ok(())
    }

    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        if index == 0 {
            return Err(HpackError::Index(0));
        }
        if let Some(&(n, v)) = STATIC.get(index - 1) {
            return Ok((n, v));
        }
        self.table
            .get(index - STATIC.len() - 1)
            .map(|(n, v)| (&n[..], &v[..]))
            .ok_or(HpackError::Index(index))
    }

    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        self.evict(size);
        if size <= self.max_size {
            self.table.push_front((name.into(), value.into()));
            self.size += size;
        }
    }

    /// Evicts the oldest entries until `room` more bytes fit (or the table is empty).
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + ENTRY_OVERHEAD,
                None => break,
            }
        }
    }
}

/// An integer with an `n`-bit prefix (RFC 7541 §5.1), consumed from the front of `buf`.
fn int(buf: &mut &[u8], n: u32) -> Result<usize, HpackError> {
    let (&first, mut rest) = buf.split_first().ok_or(HpackError::Truncated)?;
    let max = (1usize << n) - 1;
    let mut value = usize::from(first) & max;
    if value == max {
        let mut shift = 0;
        loop {
            let (&b, r) = rest.split_first().ok_or(HpackError::Truncated)?;
            rest = r;
            if shift > 21 {
                return Err(HpackError::Integer);
            }
            value += usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    *buf = rest;
    Ok(value)
}

/// A string literal (RFC 7541 §5.2), consumed from the front of `buf`, into `out`.
fn string(buf: &mut &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let huffman = buf.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = int(buf, 7)?;
    if buf.len() < len {
        return Err(HpackError::Truncated);
    }
    let (s, rest) = buf.split_at(len);
    *buf = rest;
    out.clear();
    if huffman {
        decode_huffman(s, out)
    } else {
        out.extend_from_slice(s);
        Ok(())
    }
}

/// A node of the Huffman trie: children for bit 0 and 1; a child at or above `LEAF` is the
/// leaf of symbol `child - LEAF`; `EMPTY` means no code goes that way.
type Node = [u16; 2];
const LEAF: u16 = 0x8000;
const EMPTY: u16 = 0;

fn trie() -> &'static [Node] {
    static TRIE: OnceLock<Vec<Node>> = OnceLock::new();
    TRIE.get_or_init(|| {
        let mut nodes: Vec<Node> = vec![[EMPTY; 2]];
        for (symbol, &(code, len)) in CODES.iter().enumerate() {
            let mut node = 0usize;
            for i in (0..len).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    nodes[node][bit] = LEAF + symbol as u16;
                } else {
                    if nodes[node][bit] == EMPTY {
                        nodes.push([EMPTY; 2]);
                        nodes[node][bit] = (nodes.len() - 1) as u16;
                    }
                    node = usize::from(nodes[node][bit]);
                }
            }
        }
        nodes
    })
}

/// Decodes a Huffman-coded string: EOS inside it, or padding longer than 7 bits or not all
/// ones, is an error (RFC 7541 §5.2).
fn decode_huffman(s: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let trie = trie();
    let mut node = 0usize;
    // Bits since the last symbol, and whether they were all ones (valid padding so far).
    let mut pending = 0u32;
    let mut ones = true;
    for &byte in s {
        for i in (0..8).rev() {
            let bit = usize::from((byte >> i) & 1);
            let next = trie[node][bit];
            pending += 1;
            ones &= bit == 1;
            if next >= LEAF {
                let symbol = next - LEAF;
                if symbol == 256 {
                    return Err(HpackError::Huffman);
                }
                out.push(symbol as u8);
                node = 0;
                pending = 0;
                ones = true;
            } else if next == EMPTY {
                return Err(HpackError::Huffman);
            } else {
                node = usize::from(next);
            }
        }
    }
    if pending > 7 || !ones {
        return Err(HpackError::Huffman);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut got = Vec::new();
        d.decode(block, |n, v| got.push((n.to_vec(), v.to_vec())))
            .unwrap();
        got
    }

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    #[test]
    fn rfc_examples_with_huffman() {
        // RFC 7541 C.4: requests with Huffman coding, one decoder across them.
        let mut d = Decoder::new(4096);
        let got = decode_all(&mut d, &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"));
        assert_eq!(
            got[3],
            (b":authority".to_vec(), b"www.example.com".to_vec())
        );
        let got = decode_all(&mut d, &hex("8286 84be 5886 a8eb 1064 9cbf"));
        assert_eq!(
            got[3],
            (b":authority".to_vec(), b"www.example.com".to_vec())
        );
        assert_eq!(got[4], (b"cache-control".to_vec(), b"no-cache".to_vec()));
        let got = decode_all(
            &mut d,
            &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
        );
        assert_eq!(got[2], (b":path".to_vec(), b"/index.html".to_vec()));
        assert_eq!(got[4], (b"custom-key".to_vec(), b"custom-value".to_vec()));
        assert_eq!(d.size, 164);
    }

    #[test]
    fn matches_loona_on_indexed_and_evicting_blocks() {
        let mut enc = loona_hpack::Encoder::new();
        let mut ours = Decoder::new(4096);
        let mut theirs = loona_hpack::Decoder::new();
        for round in 0..200u32 {
            let value = format!("value-{}-{}", round, "x".repeat((round % 90) as usize));
            let fields: Vec<(Vec<u8>, Vec<u8>)> = vec![
                (b":method".to_vec(), b"POST".to_vec()),
                (
                    b":path".to_vec(),
                    format!("/svc/M{}", round % 7).into_bytes(),
                ),
                (
                    format!("x-h{}", round % 13).into_bytes(),
                    value.into_bytes(),
                ),
                (b"content-type".to_vec(), b"application/grpc".to_vec()),
            ];
            let block = enc.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
            assert_eq!(
                decode_all(&mut ours, &block),
                theirs.decode(&block).unwrap()
            );
        }
    }

    #[test]
    fn bad_blocks_are_errors() {
        let mut d = Decoder::new(4096);
        assert_eq!(d.decode(&[0xbe], |_, _| {}), Err(HpackError::Index(62)));
        assert_eq!(d.decode(&[0x80], |_, _| {}), Err(HpackError::Index(0)));
        assert_eq!(
            d.decode(&[0x41, 0x85, 0xff], |_, _| {}),
            Err(HpackError::Truncated)
        );
        assert_eq!(
            d.decode(&[0x3f, 0xe1, 0x3f], |_, _| {}),
            Err(HpackError::TableSize(8192, 4096))
        );
        assert_eq!(
            d.decode(&[0x82, 0x20], |_, _| {}),
            Err(HpackError::LateSizeUpdate)
        );
        // Huffman padding of 8 ones, and padding that is not all ones.
        assert_eq!(
            d.decode(&[0x00, 0x81, 0xff, 0x00], |_, _| {}),
            Err(HpackError::Huffman)
        );
        assert_eq!(
            d.decode(&[0x00, 0x81, 0x00, 0x00], |_, _| {}),
            Err(HpackError::Huffman)
        );
        assert_eq!(
            d.decode(&[0x0f, 0xff, 0xff, 0xff, 0xff, 0xff], |_, _| {}),
            Err(HpackError::Integer)
        );
    }
}
