//! CoAP (RFC 7252) messages, sans IO, with the block-wise transfer options of RFC 7959: parse
//! and encode the 4-byte header, token, options (delta and length with their 8- and 16-bit
//! extensions) and payload; every malformed message is a clean error saying what is wrong.
//! Also: option helpers (Uri-Path, Uri-Query, Content-Format, Block1/Block2) and a bounded
//! de-duplication cache keyed by peer and message id (RFC 7252 §4.5).

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Confirmable.
    Con,
    /// Non-confirmable.
    Non,
    /// Acknowledgement.
    Ack,
    /// Reset.
    Rst,
}

/// Option numbers used here.
pub mod opt {
    /// If-Match.
    pub const IF_MATCH: u16 = 1;
    /// Uri-Host.
    pub const URI_HOST: u16 = 3;
    /// ETag.
    pub const ETAG: u16 = 4;
    /// Observe (RFC 7641).
    pub const OBSERVE: u16 = 6;
    /// Uri-Port.
    pub const URI_PORT: u16 = 7;
    /// Uri-Path.
    pub const URI_PATH: u16 = 11;
    /// Content-Format.
    pub const CONTENT_FORMAT: u16 = 12;
    /// Max-Age.
    pub const MAX_AGE: u16 = 14;
    /// Uri-Query.
    pub const URI_QUERY: u16 = 15;
    /// Accept.
    pub const ACCEPT: u16 = 17;
    /// Block2 (RFC 7959).
    pub const BLOCK2: u16 = 23;
    /// Block1 (RFC 7959).
    pub const BLOCK1: u16 = 27;
    /// Size2.
    pub const SIZE2: u16 = 28;
    /// Size1.
    pub const SIZE1: u16 = 60;

    /// Options this implementation understands; an unknown critical (odd) option in a request
    /// is answered 4.02 Bad Option.
    pub fn known(n: u16) -> bool {
        matches!(
            n,
            IF_MATCH
                | URI_HOST
                | ETAG
                | OBSERVE
                | URI_PORT
                | URI_PATH
                | CONTENT_FORMAT
                | MAX_AGE
                | URI_QUERY
                | ACCEPT
                | BLOCK2
                | BLOCK1
                | SIZE2
                | SIZE1
        )
    }
}

/// A code `class.detail` (e.g. 0.01 GET, 2.05 Content).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Code(pub u8);

impl Code {
    /// Empty message.
    pub const EMPTY: Code = Code(0x00);
    /// GET.
    pub const GET: Code = Code(0x01);
    /// POST.
    pub const POST: Code = Code(0x02);
    /// PUT.
    pub const PUT: Code = Code(0x03);
    /// DELETE.
    pub const DELETE: Code = Code(0x04);
    /// 2.01 Created.
    pub const CREATED: Code = Code(0x41);
    /// 2.04 Changed.
    pub const CHANGED: Code = Code(0x44);
    /// 2.05 Content.
    pub const CONTENT: Code = Code(0x45);
    /// 2.31 Continue (RFC 7959).
    pub const CONTINUE: Code = Code(0x5F);
    /// 4.00 Bad Request.
    pub const BAD_REQUEST: Code = Code(0x80);
    /// 4.01 Unauthorized.
    pub const UNAUTHORIZED: Code = Code(0x81);
    /// 4.02 Bad Option.
    pub const BAD_OPTION: Code = Code(0x82);
    /// 4.03 Forbidden.
    pub const FORBIDDEN: Code = Code(0x83);
    /// 4.04 Not Found.
    pub const NOT_FOUND: Code = Code(0x84);
    /// 4.05 Method Not Allowed.
    pub const METHOD_NOT_ALLOWED: Code = Code(0x85);
    /// 4.08 Request Entity Incomplete (RFC 7959).
    pub const INCOMPLETE: Code = Code(0x88);
    /// 4.13 Request Entity Too Large.
    pub const TOO_LARGE: Code = Code(0x8D);
    /// 5.00 Internal Server Error.
    pub const INTERNAL: Code = Code(0xA0);
    /// 5.03 Service Unavailable.
    pub const UNAVAILABLE: Code = Code(0xA3);

    /// The class (0 request, 2 success, 4 client error, 5 server error).
    pub fn class(self) -> u8 {
        self.0 >> 5
    }

    /// The detail.
    pub fn detail(self) -> u8 {
        self.0 & 0x1F
    }

    /// A request (class 0, not empty).
    pub fn is_request(self) -> bool {
        self.class() == 0 && self.0 != 0
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.class(), self.detail())
    }
}

/// Why a datagram is not a CoAP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Fewer than 4 bytes, or fewer than the token, an option or its extension needs.
    Truncated,
    /// Version other than 1.
    Version(u8),
    /// Token length 9-15 (reserved).
    TokenLength(u8),
    /// Option delta or length nibble 15 outside the payload marker.
    ReservedNibble,
    /// A payload marker followed by nothing.
    EmptyPayload,
    /// An option number above 65535.
    OptionNumber,
    /// An empty message (code 0.00) carrying a token, options or payload.
    NotEmpty,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => write!(f, "truncated message"),
            Self::Version(v) => write!(f, "version {v} (only 1 exists)"),
            Self::TokenLength(n) => write!(f, "token length {n} (at most 8)"),
            Self::ReservedNibble => write!(f, "reserved option delta or length 15"),
            Self::EmptyPayload => write!(f, "payload marker without a payload"),
            Self::OptionNumber => write!(f, "option number above 65535"),
            Self::NotEmpty => write!(
                f,
                "an empty message (0.00) with a token, options or payload"
            ),
        }
    }
}

/// A CoAP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Type.
    pub kind: Kind,
    /// Code.
    pub code: Code,
    /// Message id.
    pub message_id: u16,
    /// Token (0-8 bytes).
    pub token: Vec<u8>,
    /// Options, in number order (equal numbers in their order of appearance).
    pub options: Vec<(u16, Vec<u8>)>,
    /// Payload.
    pub payload: Vec<u8>,
}

impl Message {
    /// A message without options or payload.
    pub fn new(kind: Kind, code: Code, message_id: u16, token: &[u8]) -> Self {
        Self {
            kind,
            code,
            message_id,
            token: token.to_vec(),
            options: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// The piggybacked answer to `req` (ACK for CON, NON for NON; same token).
    pub fn response_to(req: &Message, code: Code, message_id_for_non: u16) -> Self {
        let (kind, mid) = match req.kind {
            Kind::Con => (Kind::Ack, req.message_id),
            _ => (Kind::Non, message_id_for_non),
        };
        Self::new(kind, code, mid, &req.token)
    }

    /// Adds an option (kept in number order).
    pub fn add(&mut self, number: u16, value: &[u8]) {
        let at = self
            .options
            .iter()
            .position(|(n, _)| *n > number)
            .unwrap_or(self.options.len());
        self.options.insert(at, (number, value.to_vec()));
    }

    /// Adds an unsigned integer option (minimal length).
    pub fn add_uint(&mut self, number: u16, v: u32) {
        let b = v.to_be_bytes();
        let skip = b.iter().take_while(|x| **x == 0).count();
        self.add(number, &b[skip..]);
    }

    /// Values of option `number`.
    pub fn option(&self, number: u16) -> impl Iterator<Item = &[u8]> {
        self.options
            .iter()
            .filter(move |(n, _)| *n == number)
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of an unsigned integer option.
    pub fn uint(&self, number: u16) -> Option<u32> {
        self.option(number).next().and_then(uint)
    }

    /// The Uri-Path as `/a/b` (segments UTF-8, lossily).
    pub fn path(&self) -> String {
        let mut s = String::new();
        for seg in self.option(opt::URI_PATH) {
            s.push('/');
            s.push_str(&String::from_utf8_lossy(seg));
        }
        if s.is_empty() {
            s.push('/');
        }
        s
    }

    /// Sets the Uri-Path from `/a/b`.
    pub fn set_path(&mut self, path: &str) {
        self.options.retain(|(n, _)| *n != opt::URI_PATH);
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            self.add(opt::URI_PATH, seg.as_bytes());
        }
    }

    /// Uri-Query values.
    pub fn queries(&self) -> Vec<String> {
        self.option(opt::URI_QUERY)
            .map(|q| String::from_utf8_lossy(q).into_owned())
            .collect()
    }

    /// The first unknown critical option, if any (requests carrying one get 4.02).
    pub fn unknown_critical(&self) -> Option<u16> {
        self.options
            .iter()
            .map(|(n, _)| *n)
            .find(|n| n % 2 == 1 && !opt::known(*n))
    }
}

/// An unsigned integer option value (0-4 bytes, big-endian); None when longer.
pub fn uint(v: &[u8]) -> Option<u32> {
    if v.len() > 4 {
        return None;
    }
    Some(v.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b)))
}

fn kind_of(t: u8) -> Kind {
    match t {
        0 => Kind::Con,
        1 => Kind::Non,
        2 => Kind::Ack,
        _ => Kind::Rst,
    }
}

fn kind_bits(k: Kind) -> u8 {
    match k {
        Kind::Con => 0,
        Kind::Non => 1,
        Kind::Ack => 2,
        Kind::Rst => 3,
    }
}

/// Parses one datagram.
pub fn parse(b: &[u8]) -> Result<Message, Error> {
    let h = b.get(..4).ok_or(Error::Truncated)?;
    let version = h[0] >> 6;
    if version != 1 {
        return Err(Error::Version(version));
    }
    let tkl = h[0] & 0x0F;
    if tkl > 8 {
        return Err(Error::TokenLength(tkl));
    }
    let kind = kind_of((h[0] >> 4) & 0x03);
    let code = Code(h[1]);
    let message_id = u16::from_be_bytes([h[2], h[3]]);
    let mut at = 4usize;
    let token = b
        .get(at..at + usize::from(tkl))
        .ok_or(Error::Truncated)?
        .to_vec();
    at += usize::from(tkl);
    let mut options = Vec::new();
    let mut number: u32 = 0;
    let mut payload = Vec::new();
    while let Some(&byte) = b.get(at) {
        if byte == 0xFF {
            let rest = &b[at + 1..];
            if rest.is_empty() {
                return Err(Error::EmptyPayload);
            }
            payload = rest.to_vec();
            break;
        }
        at += 1;
        let mut ext = |nibble: u8| -> Result<u32, Error> {
            match nibble {
                0..=12 => Ok(u32::from(nibble)),
                13 => {
                    let v = *b.get(at).ok_or(Error::Truncated)?;
                    at += 1;
                    Ok(u32::from(v) + 13)
                }
                14 => {
                    let v = b.get(at..at + 2).ok_or(Error::Truncated)?;
                    at += 2;
                    Ok(u32::from(u16::from_be_bytes([v[0], v[1]])) + 269)
                }
                _ => Err(Error::ReservedNibble),
            }
        };
        let delta = ext(byte >> 4)?;
        let len = ext(byte & 0x0F)? as usize;
        number += delta;
        let n = u16::try_from(number).map_err(|_| Error::OptionNumber)?;
        let v = b.get(at..at + len).ok_or(Error::Truncated)?;
        at += len;
        options.push((n, v.to_vec()));
    }
    if code == Code::EMPTY && (tkl != 0 || !options.is_empty() || !payload.is_empty()) {
        return Err(Error::NotEmpty);
    }
    Ok(Message {
        kind,
        code,
        message_id,
        token,
        options,
        payload,
    })
}

fn nibble(v: u32, out: &mut Vec<u8>) -> u8 {
    match v {
        0..=12 => v as u8,
        13..=268 => {
            out.push((v - 13) as u8);
            13
        }
        _ => {
            out.extend_from_slice(&((v - 269) as u16).to_be_bytes());
            14
        }
    }
}

/// Encodes a message (options sorted by number; token cut to 8 bytes).
pub fn encode(m: &Message) -> Vec<u8> {
    let tkl = m.token.len().min(8);
    let mut out = Vec::with_capacity(4 + tkl + m.payload.len() + 16);
    out.push(0x40 | (kind_bits(m.kind) << 4) | tkl as u8);
    out.push(m.code.0);
    out.extend_from_slice(&m.message_id.to_be_bytes());
    out.extend_from_slice(&m.token[..tkl]);
    let mut opts: Vec<&(u16, Vec<u8>)> = m.options.iter().collect();
    opts.sort_by_key(|(n, _)| *n);
    let mut last = 0u32;
    for (n, v) in opts {
        let delta = u32::from(*n) - last;
        last = u32::from(*n);
        let len = v.len().min(65_535 + 269) as u32;
        let mut ext = Vec::new();
        let d = nibble(delta, &mut ext);
        let l = nibble(len, &mut ext);
        out.push((d << 4) | l);
        out.extend_from_slice(&ext);
        out.extend_from_slice(&v[..len as usize]);
    }
    if !m.payload.is_empty() {
        out.push(0xFF);
        out.extend_from_slice(&m.payload);
    }
    out
}

/// A Block1/Block2 option value (RFC 7959 §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Block number.
    pub num: u32,
    /// More blocks follow.
    pub more: bool,
    /// Size exponent: the block size is 2^(szx + 4), 16 to 1024 bytes.
    pub szx: u8,
}

impl Block {
    /// Decodes an option value; None for SZX 7 (reserved) or a value over 3 bytes.
    pub fn decode(v: &[u8]) -> Option<Self> {
        if v.len() > 3 {
            return None;
        }
        let n = uint(v)?;
        let szx = (n & 0x07) as u8;
        if szx == 7 {
            return None;
        }
        Some(Self {
            num: n >> 4,
            more: n & 0x08 != 0,
            szx,
        })
    }

    /// Encodes (minimal length).
    pub fn encode(&self) -> Vec<u8> {
        let n = (self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx & 0x07);
        let b = n.to_be_bytes();
        let skip = b.iter().take_while(|x| **x == 0).count().min(4);
        b[skip..].to_vec()
    }

    /// Block size in bytes.
    pub fn size(&self) -> usize {
        1usize << (usize::from(self.szx) + 4)
    }

    /// Byte offset of this block.
    pub fn offset(&self) -> usize {
        self.num as usize * self.size()
    }
}

/// When a message was first seen (ms) and the answer given to it, if any.
type Seen = (i64, Option<Vec<u8>>);

/// Remembers recent (peer, message id) pairs and the answer given, so that a retransmitted
/// confirmable request is answered the same way without being processed twice. Bounded in
/// entries and in time (RFC 7252's EXCHANGE_LIFETIME is 247 s).
#[derive(Debug)]
pub struct Dedup<K: Ord + Clone> {
    seen: BTreeMap<(K, u16), Seen>,
    order: VecDeque<(i64, (K, u16))>,
    max: usize,
    lifetime_ms: i64,
}

impl<K: Ord + Clone> Dedup<K> {
    /// At most `max` entries, each kept `lifetime_ms`.
    pub fn new(max: usize, lifetime_ms: i64) -> Self {
        Self {
            seen: BTreeMap::new(),
            order: VecDeque::new(),
            max,
            lifetime_ms,
        }
    }

    fn expire(&mut self, now: i64) {
        while let Some((t, _)) = self.order.front() {
            if now - *t < self.lifetime_ms && self.order.len() <= self.max {
                break;
            }
            if let Some((t, k)) = self.order.pop_front() {
                if self.seen.get(&k).is_some_and(|(st, _)| *st == t) {
                    self.seen.remove(&k);
                }
            }
        }
    }

    /// `None` for a new message (now remembered, answer unknown yet); `Some(answer)` for a
    /// duplicate: the answer given to the first copy, or `None` inside if not answered yet.
    pub fn check(&mut self, peer: &K, mid: u16, now: i64) -> Option<Option<Vec<u8>>> {
        self.expire(now);
        let key = (peer.clone(), mid);
        if let Some((_, answer)) = self.seen.get(&key) {
            return Some(answer.clone());
        }
        self.seen.insert(key.clone(), (now, None));
        self.order.push_back((now, key));
        None
    }

    /// Records the answer given to (peer, mid).
    pub fn answered(&mut self, peer: &K, mid: u16, answer: Vec<u8>) {
        if let Some(e) = self.seen.get_mut(&(peer.clone(), mid)) {
            e.1 = Some(answer);
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}
