//! HPACK decoding (RFC 7541), just enough for the relay: it follows a
//! peer's header blocks, dynamic table included, and hands out each field.
//! The relay never encodes with the dynamic table, so there is no encoder
//! here beyond the literal helpers in `relay`.

use std::collections::VecDeque;
use std::sync::OnceLock;

/// Why a header block does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HpackError {
    /// The block ends inside a field.
    #[error("header block ends inside a field")]
    Truncated,
    /// An integer does not fit.
    #[error("integer overflow in header block")]
    Overflow,
    /// An index points at no table entry.
    #[error("header index {0} is not in the table")]
    BadIndex(usize),
    /// A Huffman-coded string is malformed.
    #[error("malformed Huffman string")]
    Huffman,
    /// A dynamic table size update above the allowed maximum.
    #[error("dynamic table size update to {0} is above the limit")]
    TableSize(usize),
}

/// Entry overhead counted by the table size (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;
/// Initial dynamic table size (SETTINGS_HEADER_TABLE_SIZE default).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// A dynamic table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// A decoder following one peer's encoder.
pub struct Decoder {
    table: VecDeque<Entry>,
    size: usize,
    max_size: usize,
}

/// The largest dynamic table a peer may ask for. HTTP/2 peers use 4096;
/// the bound keeps a hostile peer from making the relay hold megabytes.
pub const MAX_TABLE_SIZE: usize = 1024 * 1024;

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder with the default table size.
    pub fn new() -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: DEFAULT_TABLE_SIZE,
        }
    }

    /// Decodes one whole header block, calling `field` for each field.
    pub fn decode(
        &mut self,
        mut block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let mut scratch = Vec::new();
        let mut scratch2 = Vec::new();
        while let Some(&first) = block.first() {
            if first & 0x80 != 0 {
                let (index, rest) = integer(block, 7)?;
                block = rest;
                let (n, v) = self.entry(index)?;
                field(n, v);
            } else if first & 0xe0 == 0x20 {
                let (size, rest) = integer(block, 5)?;
                block = rest;
                if size > MAX_TABLE_SIZE {
                    return Err(HpackError::TableSize(size));
                }
                self.max_size = size;
                self.evict(0);
            } else {
                let (prefix, index_new) = if first & 0x40 != 0 {
                    (6, true)
                } else {
                    (4, false)
                };
                let (index, rest) = integer(block, prefix)?;
                block = rest;
                let name: &[u8] = if index == 0 {
                    let (plain, rest) = string(block, &mut scratch)?;
                    block = rest;
                    plain.unwrap_or(&scratch)
                } else {
                    let (n, _) = self.entry(index)?;
                    scratch.clear();
                    scratch.extend_from_slice(n);
                    &scratch
                };
                let (plain, rest) = string(block, &mut scratch2)?;
                block = rest;
                let value = plain.unwrap_or(&scratch2);
                field(name, value);
                if index_new {
                    let (name, value) = (Box::from(name), Box::from(value));
                    self.insert(name, value);
                }
            }
        }
        Ok(())
    }

    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => Ok(STATIC_TABLE[index - 1]),
            _ => self
                .table
                .get(index - 62)
                .map(|(n, v)| (&n[..], &v[..]))
                .ok_or(HpackError::BadIndex(index)),
        }
    }

    fn insert(&mut self, name: Box<[u8]>, value: Box<[u8]>) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        self.evict(size);
        if size <= self.max_size {
            self.size += size;
            self.table.push_front((name, value));
        }
    }

    /// Evicts until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            let Some((n, v)) = self.table.pop_back() else {
                break;
            };
            self.size -= n.len() + v.len() + ENTRY_OVERHEAD;
        }
    }
}

fn integer(block: &[u8], prefix: u8) -> Result<(usize, &[u8]), HpackError> {
    let max = (1usize << prefix) - 1;
    let (&first, mut rest) = block.split_first().ok_or(HpackError::Truncated)?;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok((value, rest));
    }
    let mut shift = 0u32;
    loop {
        let (&b, r) = rest.split_first().ok_or(HpackError::Truncated)?;
        rest = r;
        if shift > 28 {
            return Err(HpackError::Overflow);
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok((value, rest));
        }
    }
}

/// A string literal: returned when plain, decoded into `scratch` (and
/// `None` returned) when Huffman-coded. Also returns the rest of the block.
fn string<'a>(
    block: &'a [u8],
    scratch: &mut Vec<u8>,
) -> Result<(Option<&'a [u8]>, &'a [u8]), HpackError> {
    let huffman = block.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let (len, rest) = integer(block, 7)?;
    if rest.len() < len {
        return Err(HpackError::Truncated);
    }
    let (s, rest) = rest.split_at(len);
    if !huffman {
        return Ok((Some(s), rest));
    }
    scratch.clear();
    huffman_decode(s, scratch)?;
    Ok((None, rest))
}

/// The Huffman code as a binary tree: node `i` has children
/// `tree[i][bit]`; a value of `LEAF | symbol` is a leaf.
const LEAF: u16 = 0x8000;

fn tree() -> Vec<[u16; 2]> {
    let mut tree = vec![[0u16; 2]];
    for (symbol, &(code, len)) in HUFFMAN_CODES.iter().enumerate() {
        let mut node = 0usize;
        for i in (0..len).rev() {
            let bit = ((code >> i) & 1) as usize;
            if i == 0 {
                tree[node][bit] = LEAF | symbol as u16;
            } else {
                if tree[node][bit] == 0 {
                    tree.push([0, 0]);
                    tree[node][bit] = (tree.len() - 1) as u16;
                }
                node = tree[node][bit] as usize;
            }
        }
    }
    tree
}

/// One step of the decoder: four bits from a node of the tree.
#[derive(Clone, Copy, Default)]
struct Step {
    /// The node the four bits lead to (0, the root, after a symbol).
    next: u16,
    /// The symbol they complete, if any (codes are at least five bits
    /// long, so four bits complete at most one).
    symbol: Option<u8>,
    /// They run into EOS, which must not appear in a string.
    eos: bool,
}

/// The decoder's tables, built once from the tree: for each internal node
/// the step each of the sixteen nibbles takes (walking the tree a bit at a
/// time cost 12 % of the relay's instructions), and whether a string may
/// end there (RFC 7541 §5.2: padding is at most seven bits, all ones).
struct Huffman {
    steps: Vec<[Step; 16]>,
    may_end: Vec<bool>,
}

fn huffman() -> &'static Huffman {
    static TABLES: OnceLock<Huffman> = OnceLock::new();
    TABLES.get_or_init(|| {
        let tree = tree();
        let steps = (0..tree.len())
            .map(|start| {
                let mut row = [Step::default(); 16];
                for (nibble, step) in row.iter_mut().enumerate() {
                    let mut node = start;
                    for i in (0..4).rev() {
                        let next = tree[node][(nibble >> i) & 1];
                        if next & LEAF == 0 {
                            node = next as usize;
                        } else if next & !LEAF == 256 {
                            step.eos = true;
                            node = 0;
                        } else {
                            step.symbol = Some((next & !LEAF) as u8);
                            node = 0;
                        }
                    }
                    step.next = node as u16;
                }
                row
            })
            .collect();
        // The root, and the first seven nodes down the all-ones path.
        let mut may_end = vec![false; tree.len()];
        let mut node = 0usize;
        for _ in 0..8 {
            may_end[node] = true;
            node = tree[node][1] as usize;
        }
        Huffman { steps, may_end }
    })
}

fn huffman_decode(s: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let tables = huffman();
    let mut node = 0usize;
    for &byte in s {
        for nibble in [byte >> 4, byte & 0xf] {
            let step = tables.steps[node][usize::from(nibble)];
            if step.eos {
                return Err(HpackError::Huffman);
            }
            if let Some(symbol) = step.symbol {
                out.push(symbol);
            }
            node = usize::from(step.next);
        }
    }
    if !tables.may_end[node] {
        return Err(HpackError::Huffman);
    }
    Ok(())
}

/// RFC 7541 Appendix A.
static STATIC_TABLE: [(&[u8], &[u8]); 61] = [
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

/// RFC 7541 Appendix B: (code, length in bits) per symbol, EOS last.
static HUFFMAN_CODES: [(u32, u8); 257] = [
    (0x1ff8, 13),
    (0x7fffd8, 23),
    (0xfffffe2, 28),
    (0xfffffe3, 28),
    (0xfffffe4, 28),
    (0xfffffe5, 28),
    (0xfffffe6, 28),
    (0xfffffe7, 28),
    (0xfffffe8, 28),
    (0xffffea, 24),
    (0x3ffffffc, 30),
    (0xfffffe9, 28),
    (0xfffffea, 28),
    (0x3ffffffd, 30),
    (0xfffffeb, 28),
    (0xfffffec, 28),
    (0xfffffed, 28),
    (0xfffffee, 28),
    (0xfffffef, 28),
    (0xffffff0, 28),
    (0xffffff1, 28),
    (0xffffff2, 28),
    (0x3ffffffe, 30),
    (0xffffff3, 28),
    (0xffffff4, 28),
    (0xffffff5, 28),
    (0xffffff6, 28),
    (0xffffff7, 28),
    (0xffffff8, 28),
    (0xffffff9, 28),
    (0xffffffa, 28),
    (0xffffffb, 28),
    (0x14, 6),
    (0x3f8, 10),
    (0x3f9, 10),
    (0xffa, 12),
    (0x1ff9, 13),
    (0x15, 6),
    (0xf8, 8),
    (0x7fa, 11),
    (0x3fa, 10),
    (0x3fb, 10),
    (0xf9, 8),
    (0x7fb, 11),
    (0xfa, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6),
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6),
    (0x1a, 6),
    (0x1b, 6),
    (0x1c, 6),
    (0x1d, 6),
    (0x1e, 6),
    (0x1f, 6),
    (0x5c, 7),
    (0xfb, 8),
    (0x7ffc, 15),
    (0x20, 6),
    (0xffb, 12),
    (0x3fc, 10),
    (0x1ffa, 13),
    (0x21, 6),
    (0x5d, 7),
    (0x5e, 7),
    (0x5f, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7),
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7),
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6a, 7),
    (0x6b, 7),
    (0x6c, 7),
    (0x6d, 7),
    (0x6e, 7),
    (0x6f, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7),
    (0xfc, 8),
    (0x73, 7),
    (0xfd, 8),
    (0x1ffb, 13),
    (0x7fff0, 19),
    (0x1ffc, 13),
    (0x3ffc, 14),
    (0x22, 6),
    (0x7ffd, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5),
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6),
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7),
    (0x28, 6),
    (0x29, 6),
    (0x2a, 6),
    (0x7, 5),
    (0x2b, 6),
    (0x76, 7),
    (0x2c, 6),
    (0x8, 5),
    (0x9, 5),
    (0x2d, 6),
    (0x77, 7),
    (0x78, 7),
    (0x79, 7),
    (0x7a, 7),
    (0x7b, 7),
    (0x7ffe, 15),
    (0x7fc, 11),
    (0x3ffd, 14),
    (0x1ffd, 13),
    (0xffffffc, 28),
    (0xfffe6, 20),
    (0x3fffd2, 22),
    (0xfffe7, 20),
    (0xfffe8, 20),
    (0x3fffd3, 22),
    (0x3fffd4, 22),
    (0x3fffd5, 22),
    (0x7fffd9, 23),
    (0x3fffd6, 22),
    (0x7fffda, 23),
    (0x7fffdb, 23),
    (0x7fffdc, 23),
    (0x7fffdd, 23),
    (0x7fffde, 23),
    (0xffffeb, 24),
    (0x7fffdf, 23),
    (0xffffec, 24),
    (0xffffed, 24),
    (0x3fffd7, 22),
    (0x7fffe0, 23),
    (0xffffee, 24),
    (0x7fffe1, 23),
    (0x7fffe2, 23),
    (0x7fffe3, 23),
    (0x7fffe4, 23),
    (0x1fffdc, 21),
    (0x3fffd8, 22),
    (0x7fffe5, 23),
    (0x3fffd9, 22),
    (0x7fffe6, 23),
    (0x7fffe7, 23),
    (0xffffef, 24),
    (0x3fffda, 22),
    (0x1fffdd, 21),
    (0xfffe9, 20),
    (0x3fffdb, 22),
    (0x3fffdc, 22),
    (0x7fffe8, 23),
    (0x7fffe9, 23),
    (0x1fffde, 21),
    (0x7fffea, 23),
    (0x3fffdd, 22),
    (0x3fffde, 22),
    (0xfffff0, 24),
    (0x1fffdf, 21),
    (0x3fffdf, 22),
    (0x7fffeb, 23),
    (0x7fffec, 23),
    (0x1fffe0, 21),
    (0x1fffe1, 21),
    (0x3fffe0, 22),
    (0x1fffe2, 21),
    (0x7fffed, 23),
    (0x3fffe1, 22),
    (0x7fffee, 23),
    (0x7fffef, 23),
    (0xfffea, 20),
    (0x3fffe2, 22),
    (0x3fffe3, 22),
    (0x3fffe4, 22),
    (0x7ffff0, 23),
    (0x3fffe5, 22),
    (0x3fffe6, 22),
    (0x7ffff1, 23),
    (0x3ffffe0, 26),
    (0x3ffffe1, 26),
    (0xfffeb, 20),
    (0x7fff1, 19),
    (0x3fffe7, 22),
    (0x7ffff2, 23),
    (0x3fffe8, 22),
    (0x1ffffec, 25),
    (0x3ffffe2, 26),
    (0x3ffffe3, 26),
    (0x3ffffe4, 26),
    (0x7ffffde, 27),
    (0x7ffffdf, 27),
    (0x3ffffe5, 26),
    (0xfffff1, 24),
    (0x1ffffed, 25),
    (0x7fff2, 19),
    (0x1fffe3, 21),
    (0x3ffffe6, 26),
    (0x7ffffe0, 27),
    (0x7ffffe1, 27),
    (0x3ffffe7, 26),
    (0x7ffffe2, 27),
    (0xfffff2, 24),
    (0x1fffe4, 21),
    (0x1fffe5, 21),
    (0x3ffffe8, 26),
    (0x3ffffe9, 26),
    (0xffffffd, 28),
    (0x7ffffe3, 27),
    (0x7ffffe4, 27),
    (0x7ffffe5, 27),
    (0xfffec, 20),
    (0xfffff3, 24),
    (0xfffed, 20),
    (0x1fffe6, 21),
    (0x3fffe9, 22),
    (0x1fffe7, 21),
    (0x1fffe8, 21),
    (0x7ffff3, 23),
    (0x3fffea, 22),
    (0x3fffeb, 22),
    (0x1ffffee, 25),
    (0x1ffffef, 25),
    (0xfffff4, 24),
    (0xfffff5, 24),
    (0x3ffffea, 26),
    (0x7ffff4, 23),
    (0x3ffffeb, 26),
    (0x7ffffe6, 27),
    (0x3ffffec, 26),
    (0x3ffffed, 26),
    (0x7ffffe7, 27),
    (0x7ffffe8, 27),
    (0x7ffffe9, 27),
    (0x7ffffea, 27),
    (0x7ffffeb, 27),
    (0xffffffe, 28),
    (0x7ffffec, 27),
    (0x7ffffed, 27),
    (0x7ffffee, 27),
    (0x7ffffef, 27),
    (0x7fffff0, 27),
    (0x3ffffee, 26),
    (0x3fffffff, 30),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        d.decode(block, |n, v| {
            out.push((
                String::from_utf8(n.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            ))
        })
        .unwrap();
        out
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 7541 C.4: three requests with Huffman coding, sharing the
    /// dynamic table.
    #[test]
    fn rfc_7541_c4_requests_with_huffman() {
        let mut d = Decoder::new();
        assert_eq!(
            decode_all(&mut d, &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(
            decode_all(&mut d, &hex("8286 84be 5886 a8eb 1064 9cbf")),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ])
        );
        assert_eq!(
            decode_all(
                &mut d,
                &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf")
            ),
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(d.table.len(), 3);
        assert_eq!(d.size, 164);
    }

    /// RFC 7541 C.5: responses with a 256-byte table, so entries are
    /// evicted.
    #[test]
    fn rfc_7541_c5_eviction() {
        let mut d = Decoder::new();
        d.max_size = 256;
        decode_all(
            &mut d,
            &hex("4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"),
        );
        let second = decode_all(&mut d, &hex("4803 3330 37c1 c0bf"));
        assert_eq!(second[0], (":status".to_string(), "307".to_string()));
        assert_eq!(second[3].0, "location");
        assert_eq!(d.size, 222);
    }

    /// Huffman-codes `s` from the code table, padded with `pad` (RFC 7541
    /// §5.2: the most significant bits of EOS, all ones).
    fn huffman_encode(s: &[u8], pad: bool) -> Vec<u8> {
        let (mut bits, mut n, mut out) = (0u64, 0u32, Vec::new());
        for &c in s {
            let (code, len) = HUFFMAN_CODES[usize::from(c)];
            bits = (bits << len) | u64::from(code);
            n += u32::from(len);
            while n >= 8 {
                n -= 8;
                out.push((bits >> n) as u8);
            }
        }
        if n > 0 {
            let fill = if pad { (1u64 << (8 - n)) - 1 } else { 0 };
            out.push(((bits << (8 - n)) | fill) as u8);
        }
        out
    }

    #[test]
    fn every_byte_value_survives_huffman_coding() {
        let all: Vec<u8> = (0..=255).collect();
        let mut long = Vec::new();
        for i in 0..4096u32 {
            long.push((i.wrapping_mul(2_654_435_761) >> 13) as u8);
        }
        for s in [
            &b""[..],
            b"a",
            b"/runtime.v1.ImageService/ImageStatus",
            &all,
            &long,
        ] {
            let mut out = Vec::new();
            huffman_decode(&huffman_encode(s, true), &mut out).unwrap();
            assert_eq!(out, s);
        }
    }

    #[test]
    fn huffman_padding_must_be_short_and_all_ones() {
        let mut out = Vec::new();
        // "a" is 00011: three bits of padding.
        assert!(huffman_decode(&huffman_encode(b"a", false), &mut out).is_err());
        // A whole byte of ones after a complete code is eight bits of padding.
        let mut long_pad = huffman_encode(b"0", true);
        assert_eq!(long_pad, [0x07]);
        long_pad.push(0xff);
        assert!(huffman_decode(&long_pad, &mut out).is_err());
        // EOS itself (30 ones) in a string.
        assert!(huffman_decode(&[0xff, 0xff, 0xff, 0xff], &mut out).is_err());
        // Exactly seven bits of ones is fine: five 5-bit codes fill three
        // bytes and one bit.
        out.clear();
        let seven = huffman_encode(b"00000", true);
        assert_eq!(seven, [0, 0, 0, 0x7f]);
        huffman_decode(&seven, &mut out).unwrap();
        assert_eq!(out, b"00000");
    }

    #[test]
    fn malformed_blocks_are_errors_not_panics() {
        let mut d = Decoder::new();
        for bad in [
            &[0xbe][..],
            &[0x41, 0x85, 0xff],
            &[0x7f],
            &[0x40, 0x01],
            &[0x3f, 0xff, 0xff, 0xff, 0xff, 0x7f],
        ] {
            assert!(d.decode(bad, |_, _| {}).is_err(), "{bad:?}");
        }
    }
}
