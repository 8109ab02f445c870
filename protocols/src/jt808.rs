//! JT/T 808 (2011, 2013 and 2019 editions), sans IO: 0x7E framing with 0x7D escaping, the XOR
//! check over the unescaped bytes, the header (version flag, 6- or 10-byte BCD phone numbers,
//! 10-bit body length, encryption bits, sub-packages), a deframer for byte streams (many frames
//! per read, frames split across reads, garbage between frames, a bound on frame size), a
//! reassembler for sub-packages (timeout and memory bound), and the messages a terminal
//! platform needs, both ways.
//!
//! Text (plates, text messages) is GBK on the wire, as the standard requires.
//!
//! Encrypted bodies (RSA) are refused with [`Error::Encrypted`]: Ironlink holds no terminal RSA
//! keys.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Frame delimiter.
pub const FLAG: u8 = 0x7E;
/// Escape byte.
pub const ESCAPE: u8 = 0x7D;
/// Most bytes accepted between two flags (escaped): a full 1023-byte body with a 2019 header,
/// every byte escaped, fits.
pub const MAX_FRAME: usize = 2 * (1023 + 2 + 2 + 1 + 10 + 2 + 4 + 1);

/// Why a frame or message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// `0x7D` followed by something other than `0x01` or `0x02`.
    Escape {
        /// Offset in the escaped frame.
        at: usize,
    },
    /// Fewer bytes than a header and a check code.
    TooShort {
        /// Unescaped length.
        len: usize,
    },
    /// The check code does not match.
    Checksum {
        /// XOR of the bytes.
        computed: u8,
        /// The frame's check code.
        carried: u8,
    },
    /// The body length in the header disagrees with the frame.
    Length {
        /// Header's body length.
        declared: usize,
        /// Bytes present.
        actual: usize,
    },
    /// More than [`MAX_FRAME`] bytes without a closing flag.
    Oversized,
    /// The body is encrypted (RSA, or an unknown method) and cannot be read.
    Encrypted {
        /// The header's three encryption bits.
        method: u8,
    },
    /// A phone number or time is not BCD, or a time is not a date.
    Bcd,
    /// A message body is malformed.
    Body {
        /// Message id.
        msg_id: u16,
        /// What is wrong.
        reason: &'static str,
    },
    /// A sub-package was refused.
    Package(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Escape { at } => write!(f, "bad escape sequence at byte {at}"),
            Self::TooShort { len } => write!(f, "frame of {len} bytes is shorter than a header"),
            Self::Checksum { computed, carried } => write!(
                f,
                "check code 0x{carried:02X} does not match the bytes (0x{computed:02X})"
            ),
            Self::Length { declared, actual } => write!(
                f,
                "header says {declared} body bytes, the frame carries {actual}"
            ),
            Self::Oversized => write!(f, "frame longer than {MAX_FRAME} bytes"),
            Self::Encrypted { method } => write!(
                f,
                "encrypted body (method {method}) refused: no terminal RSA key is configured"
            ),
            Self::Bcd => write!(f, "bad BCD (phone number or time)"),
            Self::Body { msg_id, reason } => write!(f, "message 0x{msg_id:04X}: {reason}"),
            Self::Package(why) => write!(f, "sub-package refused: {why}"),
        }
    }
}

/// Unescapes the bytes between two flags.
pub fn unescape(escaped: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(escaped.len());
    let mut i = 0;
    while let Some(&b) = escaped.get(i) {
        if b == ESCAPE {
            match escaped.get(i + 1) {
                Some(0x01) => out.push(ESCAPE),
                Some(0x02) => out.push(FLAG),
                _ => return Err(Error::Escape { at: i }),
            }
            i += 2;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Ok(out)
}

/// Escapes `raw` onto `out`.
pub fn escape_into(raw: &[u8], out: &mut Vec<u8>) {
    for &b in raw {
        match b {
            FLAG => out.extend_from_slice(&[ESCAPE, 0x02]),
            ESCAPE => out.extend_from_slice(&[ESCAPE, 0x01]),
            b => out.push(b),
        }
    }
}

/// XOR of every byte.
pub fn xor(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |a, b| a ^ b)
}

/// Splits a byte stream into frames (the escaped bytes between flags). Bytes before the first
/// flag are skipped and counted; a frame longer than [`MAX_FRAME`] yields [`Error::Oversized`]
/// at its closing flag, and the stream goes on.
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
    started: bool,
    overflow: bool,
    /// Bytes skipped outside any frame.
    pub skipped: u64,
}

impl Deframer {
    /// A deframer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; complete frames (or their errors) go to `out`, in order.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Result<Vec<u8>, Error>>) {
        for &b in data {
            if b == FLAG {
                if self.overflow {
                    out.push(Err(Error::Oversized));
                } else if !self.buf.is_empty() {
                    out.push(Ok(core::mem::take(&mut self.buf)));
                }
                self.buf.clear();
                self.overflow = false;
                self.started = true;
            } else if !self.started {
                self.skipped += 1;
            } else if self.buf.len() >= MAX_FRAME {
                self.overflow = true;
            } else {
                self.buf.push(b);
            }
        }
    }

    /// Bytes held for a frame not yet closed.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// A message header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Message id.
    pub msg_id: u16,
    /// Protocol version (2019 edition: `Some`, usually 1); `None` for 2011/2013.
    pub version: Option<u8>,
    /// The terminal's phone number, every BCD digit (12 for 2013, 20 for 2019).
    pub phone: String,
    /// Message serial number.
    pub serial: u16,
    /// Encryption bits (0: none, 1: RSA).
    pub encryption: u8,
    /// Sub-package: (total packages, this package's index from 1).
    pub package: Option<(u16, u16)>,
}

impl Header {
    /// A 2013 header (6-byte phone) for `phone` (digits; left-padded with zeros).
    pub fn new_2013(msg_id: u16, phone: &str, serial: u16) -> Self {
        Self {
            msg_id,
            version: None,
            phone: pad_phone(phone, 12),
            serial,
            encryption: 0,
            package: None,
        }
    }

    /// A header answering `to` (same edition, same phone), for message `msg_id`.
    pub fn reply(to: &Header, msg_id: u16, serial: u16) -> Self {
        Self {
            msg_id,
            version: to.version,
            phone: to.phone.clone(),
            serial,
            encryption: 0,
            package: None,
        }
    }

    /// The phone number without its leading zeros (as terminals are usually known).
    pub fn phone_number(&self) -> &str {
        let t = self.phone.trim_start_matches('0');
        if t.is_empty() {
            "0"
        } else {
            t
        }
    }

    /// 2019 edition.
    pub fn is_2019(&self) -> bool {
        self.version.is_some()
    }
}

fn pad_phone(phone: &str, digits: usize) -> String {
    let mut s = String::new();
    for _ in phone.len()..digits {
        s.push('0');
    }
    s.push_str(phone);
    s
}

/// One frame: header and (still encoded) body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Header.
    pub header: Header,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// A reader over a body with errors naming the message.
struct Rd<'a> {
    b: &'a [u8],
    at: usize,
    msg_id: u16,
}

impl<'a> Rd<'a> {
    fn new(b: &'a [u8], msg_id: u16) -> Self {
        Self { b, at: 0, msg_id }
    }

    fn err(&self, reason: &'static str) -> Error {
        Error::Body {
            msg_id: self.msg_id,
            reason,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Error> {
        let end = self.at.checked_add(n).ok_or(self.err(what))?;
        let s = self.b.get(self.at..end).ok_or(self.err(what))?;
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Error> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, Error> {
        let s = self.take(2, what)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, Error> {
        let s = self.take(4, what)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = self.b.get(self.at..).unwrap_or(&[]);
        self.at = self.b.len();
        s
    }

    fn left(&self) -> usize {
        self.b.len().saturating_sub(self.at)
    }
}

fn bcd_digits(bytes: &[u8]) -> Result<String, Error> {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        for d in [b >> 4, b & 0x0F] {
            if d > 9 {
                return Err(Error::Bcd);
            }
            s.push(char::from(b'0' + d));
        }
    }
    Ok(s)
}

fn push_bcd(digits: &str, out: &mut Vec<u8>) {
    let d: Vec<u8> = digits
        .bytes()
        .map(|c| c.wrapping_sub(b'0') & 0x0F)
        .collect();
    for pair in d.chunks(2) {
        let hi = pair.first().copied().unwrap_or(0);
        let lo = pair.get(1).copied().unwrap_or(0);
        out.push((hi << 4) | lo);
    }
}

/// Parses the escaped bytes between two flags into a frame; checks the check code, the body
/// length and the encryption bits.
pub fn parse_frame(escaped: &[u8]) -> Result<Frame, Error> {
    let raw = unescape(escaped)?;
    let (check, data) = raw.split_last().ok_or(Error::TooShort { len: 0 })?;
    if data.len() < 12 {
        return Err(Error::TooShort { len: raw.len() });
    }
    let computed = xor(data);
    if computed != *check {
        return Err(Error::Checksum {
            computed,
            carried: *check,
        });
    }
    let msg_id = u16::from_be_bytes([data[0], data[1]]);
    let props = u16::from_be_bytes([data[2], data[3]]);
    let body_len = usize::from(props & 0x03FF);
    let encryption = ((props >> 10) & 0x07) as u8;
    let split = props & 0x2000 != 0;
    let v2019 = props & 0x4000 != 0;
    let mut r = Rd::new(data, msg_id);
    r.at = 4;
    let version = if v2019 {
        Some(r.u8("protocol version")?)
    } else {
        None
    };
    let phone = bcd_digits(r.take(if v2019 { 10 } else { 6 }, "phone number")?)?;
    let serial = r.u16("serial number")?;
    let package = if split {
        let total = r.u16("package count")?;
        let index = r.u16("package index")?;
        Some((total, index))
    } else {
        None
    };
    let body = r.rest();
    if body.len() != body_len {
        return Err(Error::Length {
            declared: body_len,
            actual: body.len(),
        });
    }
    if encryption != 0 {
        return Err(Error::Encrypted { method: encryption });
    }
    Ok(Frame {
        header: Header {
            msg_id,
            version,
            phone,
            serial,
            encryption,
            package,
        },
        body: body.to_vec(),
    })
}

/// Encodes a frame, flags included. A body over 1023 bytes is the caller's to split into
/// sub-packages; here it is refused.
pub fn encode_frame(h: &Header, body: &[u8]) -> Result<Vec<u8>, Error> {
    if body.len() > 0x03FF {
        return Err(Error::Body {
            msg_id: h.msg_id,
            reason: "body over 1023 bytes",
        });
    }
    let mut raw = Vec::with_capacity(body.len() + 24);
    raw.extend_from_slice(&h.msg_id.to_be_bytes());
    let mut props = body.len() as u16 | (u16::from(h.encryption & 0x07) << 10);
    if h.package.is_some() {
        props |= 0x2000;
    }
    if h.version.is_some() {
        props |= 0x4000;
    }
    raw.extend_from_slice(&props.to_be_bytes());
    let digits = if let Some(v) = h.version {
        raw.push(v);
        20
    } else {
        12
    };
    let phone = if h.phone.len() >= digits {
        String::from(&h.phone[h.phone.len() - digits..])
    } else {
        pad_phone(&h.phone, digits)
    };
    if !phone.bytes().all(|c| c.is_ascii_digit()) {
        return Err(Error::Bcd);
    }
    push_bcd(&phone, &mut raw);
    raw.extend_from_slice(&h.serial.to_be_bytes());
    if let Some((total, index)) = h.package {
        raw.extend_from_slice(&total.to_be_bytes());
        raw.extend_from_slice(&index.to_be_bytes());
    }
    raw.extend_from_slice(body);
    raw.push(xor(&raw));
    let mut out = Vec::with_capacity(raw.len() + 8);
    out.push(FLAG);
    escape_into(&raw, &mut out);
    out.push(FLAG);
    Ok(out)
}

/// A BCD time `YYMMDDhhmmss` (GMT+8, as the standard says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time {
    /// Full year (2000 + YY).
    pub year: u16,
    /// 1-12.
    pub month: u8,
    /// 1-31.
    pub day: u8,
    /// 0-23.
    pub hour: u8,
    /// 0-59.
    pub minute: u8,
    /// 0-59.
    pub second: u8,
}

impl Time {
    fn read(r: &mut Rd<'_>) -> Result<Self, Error> {
        let b = r.take(6, "time")?;
        let d = bcd_digits(b)?;
        let n = |i: usize| -> u8 {
            let s = d.as_bytes();
            (s[i] - b'0') * 10 + (s[i + 1] - b'0')
        };
        let t = Time {
            year: 2000 + u16::from(n(0)),
            month: n(2),
            day: n(4),
            hour: n(6),
            minute: n(8),
            second: n(10),
        };
        if !(1..=12).contains(&t.month)
            || !(1..=31).contains(&t.day)
            || t.hour > 23
            || t.minute > 59
            || t.second > 59
        {
            return Err(Error::Bcd);
        }
        Ok(t)
    }

    fn write(&self, out: &mut Vec<u8>) {
        for v in [
            (self.year % 100) as u8,
            self.month,
            self.day,
            self.hour,
            self.minute,
            self.second,
        ] {
            out.push(((v / 10) << 4) | (v % 10));
        }
    }

    /// Milliseconds since the Unix epoch, reading the time as GMT+8.
    pub fn unix_ms(&self) -> i64 {
        civil_to_unix_ms(
            i64::from(self.year),
            self.month,
            self.day,
            self.hour,
            self.minute,
            self.second,
        ) - 8 * 3_600_000
    }

    /// The GMT+8 time of a Unix time in ms.
    pub fn from_unix_ms(ms: i64) -> Self {
        let (year, month, day, hour, minute, second) = unix_ms_to_civil(ms + 8 * 3_600_000);
        Self {
            year: year.clamp(2000, 2099) as u16,
            month,
            day,
            hour,
            minute,
            second,
        }
    }
}

/// Days from 1970-01-01 of a civil date (proleptic Gregorian), in ms with the time of day.
pub(crate) fn civil_to_unix_ms(y: i64, m: u8, d: u8, hh: u8, mm: u8, ss: u8) -> i64 {
    let days = ironlink_shared::time::days_from_civil(y, m, d);
    ((days * 24 + i64::from(hh)) * 60 + i64::from(mm)) * 60_000 + i64::from(ss) * 1000
}

/// The civil date and time of a Unix time in ms.
pub(crate) fn unix_ms_to_civil(ms: i64) -> (i64, u8, u8, u8, u8, u8) {
    let secs = ms.div_euclid(1000);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = ironlink_shared::time::civil_from_days(secs.div_euclid(86_400));
    (
        y,
        m,
        d,
        (sod / 3600) as u8,
        ((sod % 3600) / 60) as u8,
        (sod % 60) as u8,
    )
}

/// Decodes GBK text (invalid sequences become U+FFFD); trailing NULs and spaces are dropped.
pub fn gbk_decode(bytes: &[u8]) -> String {
    let end = bytes
        .iter()
        .rposition(|b| *b != 0 && *b != b' ')
        .map_or(0, |i| i + 1);
    let (text, _, _) = encoding_rs::GBK.decode(&bytes[..end]);
    String::from(text)
}

/// Encodes text as GBK (characters GBK lacks become `?`).
pub fn gbk_encode(text: &str) -> Vec<u8> {
    let (bytes, _, _) = encoding_rs::GBK.encode(text);
    bytes.into_owned()
}

fn fixed_text(bytes: &[u8]) -> String {
    gbk_decode(bytes)
}

fn push_fixed(text: &str, n: usize, out: &mut Vec<u8>) {
    let b = gbk_encode(text);
    let take = b.len().min(n);
    out.extend_from_slice(&b[..take]);
    out.extend(core::iter::repeat_n(0u8, n - take));
}

/// 0x0001 / 0x8001: a general response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneralResponse {
    /// Serial number answered.
    pub serial: u16,
    /// Message id answered.
    pub msg_id: u16,
    /// 0 success, 1 failure, 2 malformed, 3 unsupported, 4 alarm confirmed (platform).
    pub result: u8,
}

/// 0x8108: an upgrade package for the terminal (sent in sub-packages when over 1023 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// What is upgraded: 0 the terminal, 12 the IC card reader, 52 the GNSS module.
    pub kind: u8,
    /// Maker id (5 bytes).
    pub maker: String,
    /// Version of the package.
    pub version: String,
    /// The package.
    pub package: Vec<u8>,
}

/// The body of a 0x8108 up to its package (`package_len` bytes follow it).
pub fn upgrade_head(kind: u8, maker: &str, version: &str, package_len: u32) -> Vec<u8> {
    let mut out = alloc::vec![kind];
    push_fixed(maker, 5, &mut out);
    let v = gbk_encode(version);
    let v = &v[..v.len().min(255)];
    out.push(v.len() as u8);
    out.extend_from_slice(v);
    out.extend_from_slice(&package_len.to_be_bytes());
    out
}

/// 0x0107: the terminal's attributes, answering 0x8107.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    /// Terminal type bits.
    pub terminal_type: u16,
    /// Maker id.
    pub maker: String,
    /// Model.
    pub model: String,
    /// Terminal id.
    pub terminal_id: String,
    /// SIM ICCID (BCD, 10 bytes).
    pub iccid: [u8; 10],
    /// Hardware version.
    pub hardware: String,
    /// Firmware version.
    pub firmware: String,
    /// GNSS module attributes.
    pub gnss: u8,
    /// Communication module attributes.
    pub comm: u8,
}

/// 0x0100: terminal registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    /// Province id.
    pub province: u16,
    /// City or county id.
    pub city: u16,
    /// Manufacturer id.
    pub maker: String,
    /// Terminal model.
    pub model: String,
    /// Terminal id.
    pub terminal_id: String,
    /// Plate colour (0: not plated; then the plate is the VIN).
    pub plate_color: u8,
    /// Plate number or VIN.
    pub plate: String,
}

/// 0x8100: registration response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterResponse {
    /// Serial of the 0x0100 answered.
    pub serial: u16,
    /// 0 success, 1 vehicle registered, 2 vehicle unknown, 3 terminal registered, 4 terminal
    /// unknown.
    pub result: u8,
    /// Authentication code (success only).
    pub auth_code: String,
}

/// 0x0102: terminal authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// Authentication code.
    pub code: String,
    /// IMEI (2019).
    pub imei: Option<String>,
    /// Software version (2019).
    pub software: Option<String>,
}

/// One extra item of a location report (0x0200 and friends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extra {
    /// 0x01 mileage, 0.1 km.
    Mileage(u32),
    /// 0x02 fuel, 0.1 L.
    Fuel(u16),
    /// 0x03 speed from the tachograph, 0.1 km/h.
    RecorderSpeed(u16),
    /// 0x04 id of an alarm event needing manual confirmation.
    AlarmEventId(u16),
    /// 0x05 tyre pressure (2019), Pa per tyre, raw.
    TirePressure(Vec<u8>),
    /// 0x06 carriage temperature (2019), °C.
    CarriageTemp(i16),
    /// 0x11 overspeed alarm: position type, area or route id (absent for type 0).
    Overspeed {
        /// 0 none, 1 circle, 2 rectangle, 3 polygon, 4 route.
        kind: u8,
        /// Area or route id.
        area: Option<u32>,
    },
    /// 0x12 entering or leaving an area or route.
    Area {
        /// Position type.
        kind: u8,
        /// Area or route id.
        id: u32,
        /// 0 in, 1 out.
        direction: u8,
    },
    /// 0x13 route segment driving time too short or too long.
    RouteTime {
        /// Segment id.
        id: u32,
        /// Seconds.
        seconds: u16,
        /// 0 too short, 1 too long.
        result: u8,
    },
    /// 0x25 extended vehicle signal bits.
    VehicleSignals(u32),
    /// 0x2A IO status bits.
    IoStatus(u16),
    /// 0x2B analog: AD0 (low 16 bits), AD1 (high 16 bits).
    Analog(u32),
    /// 0x30 wireless signal strength.
    SignalStrength(u8),
    /// 0x31 GNSS satellites in view.
    Satellites(u8),
    /// Any other item, kept as bytes (skipped by its length).
    Unknown {
        /// Item id.
        id: u8,
        /// Its bytes.
        data: Vec<u8>,
    },
}

/// A location report (0x0200 body; also inside 0x0201, 0x0704, 0x0801).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Alarm bits.
    pub alarm: u32,
    /// Status bits (bit 1 located, bit 2 south, bit 3 west, ...).
    pub status: u32,
    /// Latitude, 1e-6 degree, unsigned (the sign is in `status`).
    pub lat: u32,
    /// Longitude, 1e-6 degree, unsigned.
    pub lon: u32,
    /// Altitude, m.
    pub altitude: u16,
    /// Speed, 0.1 km/h.
    pub speed: u16,
    /// Direction, 0-359 degrees from north.
    pub direction: u16,
    /// GMT+8 time.
    pub time: Time,
    /// Extra items, in order.
    pub extras: Vec<Extra>,
}

impl Location {
    /// Latitude in degrees, negative south.
    pub fn latitude(&self) -> f64 {
        let v = f64::from(self.lat) / 1e6;
        if self.status & 0x04 != 0 {
            -v
        } else {
            v
        }
    }

    /// Longitude in degrees, negative west.
    pub fn longitude(&self) -> f64 {
        let v = f64::from(self.lon) / 1e6;
        if self.status & 0x08 != 0 {
            -v
        } else {
            v
        }
    }

    fn read(r: &mut Rd<'_>, extras: bool) -> Result<Self, Error> {
        let mut l = Location {
            alarm: r.u32("alarm")?,
            status: r.u32("status")?,
            lat: r.u32("latitude")?,
            lon: r.u32("longitude")?,
            altitude: r.u16("altitude")?,
            speed: r.u16("speed")?,
            direction: r.u16("direction")?,
            time: Time::read(r)?,
            extras: Vec::new(),
        };
        while extras && r.left() > 0 {
            let id = r.u8("extra item id")?;
            let len = usize::from(r.u8("extra item length")?);
            let d = r.take(len, "extra item shorter than its length")?;
            let mut x = Rd::new(d, r.msg_id);
            let fixed = |want: usize| len == want;
            l.extras.push(match id {
                0x01 if fixed(4) => Extra::Mileage(x.u32("mileage")?),
                0x02 if fixed(2) => Extra::Fuel(x.u16("fuel")?),
                0x03 if fixed(2) => Extra::RecorderSpeed(x.u16("speed")?),
                0x04 if fixed(2) => Extra::AlarmEventId(x.u16("alarm event")?),
                0x05 => Extra::TirePressure(d.to_vec()),
                0x06 if fixed(2) => Extra::CarriageTemp(x.u16("temperature")? as i16),
                0x11 if fixed(1) => Extra::Overspeed {
                    kind: x.u8("overspeed")?,
                    area: None,
                },
                0x11 if fixed(5) => Extra::Overspeed {
                    kind: x.u8("overspeed")?,
                    area: Some(x.u32("area")?),
                },
                0x12 if fixed(6) => Extra::Area {
                    kind: x.u8("area kind")?,
                    id: x.u32("area id")?,
                    direction: x.u8("direction")?,
                },
                0x13 if fixed(7) => Extra::RouteTime {
                    id: x.u32("route")?,
                    seconds: x.u16("route time")?,
                    result: x.u8("route result")?,
                },
                0x25 if fixed(4) => Extra::VehicleSignals(x.u32("signals")?),
                0x2A if fixed(2) => Extra::IoStatus(x.u16("io")?),
                0x2B if fixed(4) => Extra::Analog(x.u32("analog")?),
                0x30 if fixed(1) => Extra::SignalStrength(x.u8("signal")?),
                0x31 if fixed(1) => Extra::Satellites(x.u8("satellites")?),
                id => Extra::Unknown {
                    id,
                    data: d.to_vec(),
                },
            });
        }
        Ok(l)
    }

    fn write(&self, out: &mut Vec<u8>, extras: bool) {
        for v in [self.alarm, self.status, self.lat, self.lon] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        for v in [self.altitude, self.speed, self.direction] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        self.time.write(out);
        if !extras {
            return;
        }
        for e in &self.extras {
            let mut d = Vec::new();
            let id = match e {
                Extra::Mileage(v) => {
                    d.extend_from_slice(&v.to_be_bytes());
                    0x01
                }
                Extra::Fuel(v) => {
                    d.extend_from_slice(&v.to_be_bytes());
                    0x02
                }
                Extra::RecorderSpeed(v) => {
                    d.extend_from_slice(&v.to_be_bytes());
                    0x03
                }
                Extra::AlarmEventId(v) => {
                    d.extend_from_slice(&v.to_be_bytes());
                    0x04
                }
                Extra::TirePressure(v) => {
                    d.extend_from_slice(v);
                    0x05
                }
                Extra::CarriageTemp(v) => {
                    d.extend_from_slice(&v.to_be_bytes());
                    0x06
                }
                Extra::Overspeed { kind, area } => {
                    d.push(*kind);
                    if let Some(a) = area {
                        d.extend_from_slice(&a.to_be_bytes());
                    }
                    0x11
                }
                Extra::Area {
                    kind,
                    id,
                    direction,
                } => {
                    d.push(*kind);
                    d.extend_from_slice(&id.to_be_bytes());
                    d.push(*direction);
                    0x12
                }
                Extra::RouteTime {
                    id,
                    seconds,
                    result,
                } => {
                    d.extend_from_slice(&id.to_be_bytes());
                    d.extend_from_slice(&seconds.to_be_bytes());
                    d.push(*result);
                    0x13
                }
                Extra::VehicleSignals(v) => {
                    d.extend_from_slice(&v.to_be_bytes());
                    0x25
                }
                Extra::IoStatus(v) => {
                    d.extend_from_slice(&v.to_be_bytes());
                    0x2A
                }
                Extra::Analog(v) => {
                    d.extend_from_slice(&v.to_be_bytes());
                    0x2B
                }
                Extra::SignalStrength(v) => {
                    d.push(*v);
                    0x30
                }
                Extra::Satellites(v) => {
                    d.push(*v);
                    0x31
                }
                Extra::Unknown { id, data } => {
                    d.extend_from_slice(data);
                    *id
                }
            };
            let len = d.len().min(255);
            out.push(id);
            out.push(len as u8);
            out.extend_from_slice(&d[..len]);
        }
    }
}

/// A terminal parameter (0x8103, 0x0104).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// Parameter id.
    pub id: u32,
    /// Its value.
    pub value: ParamValue,
}

/// A parameter's value, by the type the standard gives its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamValue {
    /// BYTE.
    U8(u8),
    /// WORD.
    U16(u16),
    /// DWORD.
    U32(u32),
    /// STRING (GBK).
    Text(String),
    /// Anything else.
    Bytes(Vec<u8>),
}

/// Parameter ids whose values are strings in JT/T 808-2013 and -2019.
fn param_is_text(id: u32) -> bool {
    matches!(
        id,
        0x0010..=0x0017 | 0x001A | 0x001D | 0x0023..=0x0026 | 0x0040..=0x0044 | 0x0048 | 0x0049 | 0x0083
    )
}

impl ParamValue {
    fn read(id: u32, d: &[u8]) -> Self {
        if param_is_text(id) {
            return Self::Text(gbk_decode(d));
        }
        match *d {
            [a] => Self::U8(a),
            [a, b] => Self::U16(u16::from_be_bytes([a, b])),
            [a, b, c, e] => Self::U32(u32::from_be_bytes([a, b, c, e])),
            _ => Self::Bytes(d.to_vec()),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            Self::U8(v) => alloc::vec![*v],
            Self::U16(v) => v.to_be_bytes().to_vec(),
            Self::U32(v) => v.to_be_bytes().to_vec(),
            Self::Text(t) => gbk_encode(t),
            Self::Bytes(b) => b.clone(),
        }
    }
}

fn read_params(r: &mut Rd<'_>) -> Result<Vec<Param>, Error> {
    let n = r.u8("parameter count")?;
    let mut out = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let id = r.u32("parameter id")?;
        let len = usize::from(r.u8("parameter length")?);
        let d = r.take(len, "parameter shorter than its length")?;
        out.push(Param {
            id,
            value: ParamValue::read(id, d),
        });
    }
    Ok(out)
}

fn write_params(ps: &[Param], out: &mut Vec<u8>) {
    out.push(ps.len().min(255) as u8);
    for p in ps.iter().take(255) {
        let b = p.value.bytes();
        let len = b.len().min(255);
        out.extend_from_slice(&p.id.to_be_bytes());
        out.push(len as u8);
        out.extend_from_slice(&b[..len]);
    }
}

/// 0x0800 multimedia event, or the head of a 0x0801 upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Media {
    /// Multimedia id.
    pub id: u32,
    /// 0 image, 1 audio, 2 video.
    pub kind: u8,
    /// 0 JPEG, 1 TIF, 2 MP3, 3 WAV, 4 WMV.
    pub format: u8,
    /// Event code.
    pub event: u8,
    /// Channel.
    pub channel: u8,
}

impl Media {
    fn read(r: &mut Rd<'_>) -> Result<Self, Error> {
        Ok(Self {
            id: r.u32("media id")?,
            kind: r.u8("media type")?,
            format: r.u8("media format")?,
            event: r.u8("media event")?,
            channel: r.u8("channel")?,
        })
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&[self.kind, self.format, self.event, self.channel]);
    }
}

/// A message, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// 0x0001 terminal general response.
    TerminalResponse(GeneralResponse),
    /// 0x0002 heartbeat.
    Heartbeat,
    /// 0x0003 terminal logout.
    Logout,
    /// 0x0100 registration.
    Register(Register),
    /// 0x0102 authentication.
    Auth(Auth),
    /// 0x0104 parameters, answering a query.
    ParamsReply {
        /// Serial of the query.
        serial: u16,
        /// The parameters.
        params: Vec<Param>,
    },
    /// 0x0200 location report.
    Location(Location),
    /// 0x0201 location, answering a query.
    LocationReply {
        /// Serial of the query.
        serial: u16,
        /// The location.
        location: Location,
    },
    /// 0x0704 batch of locations.
    Batch {
        /// 0 normal batch, 1 re-issued from the blind area.
        reissued: bool,
        /// The locations.
        locations: Vec<Location>,
    },
    /// 0x0800 multimedia event.
    MediaEvent(Media),
    /// 0x0801 multimedia data upload.
    MediaUpload {
        /// Head.
        media: Media,
        /// Location when it was taken (no extra items).
        location: Location,
        /// The data.
        data: Vec<u8>,
    },
    /// 0x8001 platform general response.
    PlatformResponse(GeneralResponse),
    /// 0x8100 registration response.
    RegisterResponse(RegisterResponse),
    /// 0x8103 set parameters.
    SetParams(Vec<Param>),
    /// 0x8104 query every parameter.
    QueryParams,
    /// 0x8201 query the location.
    QueryLocation,
    /// 0x8300 text message.
    Text {
        /// Flag bits (bit 0 emergency, bit 2 display, bit 3 TTS, ...).
        flags: u8,
        /// 2019: 1 notice, 2 service.
        kind: Option<u8>,
        /// The text.
        text: String,
    },
    /// 0x8107 query the terminal's attributes.
    QueryAttributes,
    /// 0x0107 the terminal's attributes.
    Attributes(Attributes),
    /// 0x8108 upgrade package.
    Upgrade(Upgrade),
    /// 0x0108 upgrade result: `kind` as in [`Upgrade`]; result 0 success, 1 failure,
    /// 2 cancelled.
    UpgradeResult {
        /// What was upgraded.
        kind: u8,
        /// 0 success, 1 failure, 2 cancelled.
        result: u8,
    },
    /// Any other message, kept as its body.
    Other {
        /// Message id.
        msg_id: u16,
        /// Body.
        body: Vec<u8>,
    },
}

impl Message {
    /// This message's id.
    pub fn msg_id(&self) -> u16 {
        match self {
            Self::TerminalResponse(_) => 0x0001,
            Self::Heartbeat => 0x0002,
            Self::Logout => 0x0003,
            Self::Register(_) => 0x0100,
            Self::Auth(_) => 0x0102,
            Self::ParamsReply { .. } => 0x0104,
            Self::Location(_) => 0x0200,
            Self::LocationReply { .. } => 0x0201,
            Self::Batch { .. } => 0x0704,
            Self::MediaEvent(_) => 0x0800,
            Self::MediaUpload { .. } => 0x0801,
            Self::PlatformResponse(_) => 0x8001,
            Self::RegisterResponse(_) => 0x8100,
            Self::SetParams(_) => 0x8103,
            Self::QueryParams => 0x8104,
            Self::QueryLocation => 0x8201,
            Self::Text { .. } => 0x8300,
            Self::QueryAttributes => 0x8107,
            Self::Attributes(_) => 0x0107,
            Self::Upgrade(_) => 0x8108,
            Self::UpgradeResult { .. } => 0x0108,
            Self::Other { msg_id, .. } => *msg_id,
        }
    }
}

fn general(r: &mut Rd<'_>) -> Result<GeneralResponse, Error> {
    Ok(GeneralResponse {
        serial: r.u16("serial answered")?,
        msg_id: r.u16("message answered")?,
        result: r.u8("result")?,
    })
}

/// Decodes a body (`v2019`: the header's version flag).
pub fn decode(msg_id: u16, v2019: bool, body: &[u8]) -> Result<Message, Error> {
    let mut r = Rd::new(body, msg_id);
    Ok(match msg_id {
        0x0001 => Message::TerminalResponse(general(&mut r)?),
        0x8001 => Message::PlatformResponse(general(&mut r)?),
        0x0002 => Message::Heartbeat,
        0x0003 => Message::Logout,
        0x0100 => {
            let province = r.u16("province")?;
            let city = r.u16("city")?;
            // 2019: 11/30/30; 2013: 5/20/7; 2011: 5/8/7 (told apart by length).
            let (m, mo, id) = if v2019 {
                (11, 30, 30)
            } else if body.len() > 4 + 5 + 20 + 7 {
                (5, 20, 7)
            } else {
                (5, 8, 7)
            };
            Message::Register(Register {
                province,
                city,
                maker: fixed_text(r.take(m, "maker id")?),
                model: fixed_text(r.take(mo, "terminal model")?),
                terminal_id: fixed_text(r.take(id, "terminal id")?),
                plate_color: r.u8("plate colour")?,
                plate: gbk_decode(r.rest()),
            })
        }
        0x8100 => {
            let serial = r.u16("serial answered")?;
            let result = r.u8("result")?;
            Message::RegisterResponse(RegisterResponse {
                serial,
                result,
                auth_code: gbk_decode(r.rest()),
            })
        }
        0x0102 => {
            if v2019 {
                let n = usize::from(r.u8("code length")?);
                let code = gbk_decode(r.take(n, "authentication code")?);
                let imei = fixed_text(r.take(15, "IMEI")?);
                let software = fixed_text(r.take(20, "software version")?);
                Message::Auth(Auth {
                    code,
                    imei: Some(imei),
                    software: Some(software),
                })
            } else {
                Message::Auth(Auth {
                    code: gbk_decode(r.rest()),
                    imei: None,
                    software: None,
                })
            }
        }
        0x0104 => {
            let serial = r.u16("serial answered")?;
            Message::ParamsReply {
                serial,
                params: read_params(&mut r)?,
            }
        }
        0x8103 => Message::SetParams(read_params(&mut r)?),
        0x8104 => Message::QueryParams,
        0x8201 => Message::QueryLocation,
        0x0200 => Message::Location(Location::read(&mut r, true)?),
        0x0201 => {
            let serial = r.u16("serial answered")?;
            Message::LocationReply {
                serial,
                location: Location::read(&mut r, true)?,
            }
        }
        0x0704 => {
            let n = r.u16("location count")?;
            let reissued = r.u8("batch type")? == 1;
            let mut locations = Vec::new();
            for _ in 0..n {
                let len = usize::from(r.u16("location length")?);
                let d = r.take(len, "location shorter than its length")?;
                locations.push(Location::read(&mut Rd::new(d, msg_id), true)?);
            }
            if r.left() > 0 {
                return Err(r.err("bytes after the last location"));
            }
            Message::Batch {
                reissued,
                locations,
            }
        }
        0x0800 => Message::MediaEvent(Media::read(&mut r)?),
        0x0801 => {
            let media = Media::read(&mut r)?;
            let location = Location::read(&mut Rd::new(r.take(28, "location")?, msg_id), false)?;
            Message::MediaUpload {
                media,
                location,
                data: r.rest().to_vec(),
            }
        }
        0x8300 => {
            let flags = r.u8("flags")?;
            let kind = if v2019 {
                Some(r.u8("text type")?)
            } else {
                None
            };
            Message::Text {
                flags,
                kind,
                text: gbk_decode(r.rest()),
            }
        }
        0x8107 => Message::QueryAttributes,
        0x0107 => {
            let terminal_type = r.u16("terminal type")?;
            let (mo, id) = if v2019 { (30, 30) } else { (20, 7) };
            let maker = fixed_text(r.take(5, "maker id")?);
            let model = fixed_text(r.take(mo, "terminal model")?);
            let terminal_id = fixed_text(r.take(id, "terminal id")?);
            let mut iccid = [0u8; 10];
            iccid.copy_from_slice(r.take(10, "ICCID")?);
            let n = usize::from(r.u8("hardware version length")?);
            let hardware = gbk_decode(r.take(n, "hardware version")?);
            let n = usize::from(r.u8("firmware version length")?);
            let firmware = gbk_decode(r.take(n, "firmware version")?);
            Message::Attributes(Attributes {
                terminal_type,
                maker,
                model,
                terminal_id,
                iccid,
                hardware,
                firmware,
                gnss: r.u8("GNSS attributes")?,
                comm: r.u8("communication attributes")?,
            })
        }
        0x8108 => {
            let kind = r.u8("upgrade type")?;
            let maker = fixed_text(r.take(5, "maker id")?);
            let n = usize::from(r.u8("version length")?);
            let version = gbk_decode(r.take(n, "version")?);
            let len = r.u32("package length")? as usize;
            let package = r.take(len, "package shorter than its length")?.to_vec();
            if r.left() > 0 {
                return Err(r.err("bytes after the package"));
            }
            Message::Upgrade(Upgrade {
                kind,
                maker,
                version,
                package,
            })
        }
        0x0108 => Message::UpgradeResult {
            kind: r.u8("upgrade type")?,
            result: r.u8("upgrade result")?,
        },
        _ => Message::Other {
            msg_id,
            body: body.to_vec(),
        },
    })
}

/// Encodes a message body (`v2019`: the 2019 layout where it differs).
pub fn encode(m: &Message, v2019: bool) -> Vec<u8> {
    let mut out = Vec::new();
    match m {
        Message::TerminalResponse(g) | Message::PlatformResponse(g) => {
            out.extend_from_slice(&g.serial.to_be_bytes());
            out.extend_from_slice(&g.msg_id.to_be_bytes());
            out.push(g.result);
        }
        Message::Heartbeat
        | Message::Logout
        | Message::QueryParams
        | Message::QueryLocation
        | Message::QueryAttributes => {}
        Message::Attributes(a) => {
            out.extend_from_slice(&a.terminal_type.to_be_bytes());
            let (mo, id) = if v2019 { (30, 30) } else { (20, 7) };
            push_fixed(&a.maker, 5, &mut out);
            push_fixed(&a.model, mo, &mut out);
            push_fixed(&a.terminal_id, id, &mut out);
            out.extend_from_slice(&a.iccid);
            for v in [&a.hardware, &a.firmware] {
                let b = gbk_encode(v);
                let b = &b[..b.len().min(255)];
                out.push(b.len() as u8);
                out.extend_from_slice(b);
            }
            out.push(a.gnss);
            out.push(a.comm);
        }
        Message::Upgrade(u) => {
            let len = u32::try_from(u.package.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&upgrade_head(u.kind, &u.maker, &u.version, len));
            out.extend_from_slice(&u.package[..len as usize]);
        }
        Message::UpgradeResult { kind, result } => {
            out.push(*kind);
            out.push(*result);
        }
        Message::Register(r) => {
            out.extend_from_slice(&r.province.to_be_bytes());
            out.extend_from_slice(&r.city.to_be_bytes());
            let (m, mo, id) = if v2019 { (11, 30, 30) } else { (5, 20, 7) };
            push_fixed(&r.maker, m, &mut out);
            push_fixed(&r.model, mo, &mut out);
            push_fixed(&r.terminal_id, id, &mut out);
            out.push(r.plate_color);
            out.extend_from_slice(&gbk_encode(&r.plate));
        }
        Message::RegisterResponse(r) => {
            out.extend_from_slice(&r.serial.to_be_bytes());
            out.push(r.result);
            if r.result == 0 {
                out.extend_from_slice(&gbk_encode(&r.auth_code));
            }
        }
        Message::Auth(a) => {
            let code = gbk_encode(&a.code);
            if v2019 {
                out.push(code.len().min(255) as u8);
                out.extend_from_slice(&code[..code.len().min(255)]);
                push_fixed(a.imei.as_deref().unwrap_or(""), 15, &mut out);
                push_fixed(a.software.as_deref().unwrap_or(""), 20, &mut out);
            } else {
                out.extend_from_slice(&code);
            }
        }
        Message::ParamsReply { serial, params } => {
            out.extend_from_slice(&serial.to_be_bytes());
            write_params(params, &mut out);
        }
        Message::SetParams(params) => write_params(params, &mut out),
        Message::Location(l) => l.write(&mut out, true),
        Message::LocationReply { serial, location } => {
            out.extend_from_slice(&serial.to_be_bytes());
            location.write(&mut out, true);
        }
        Message::Batch {
            reissued,
            locations,
        } => {
            out.extend_from_slice(&(locations.len().min(0xFFFF) as u16).to_be_bytes());
            out.push(u8::from(*reissued));
            for l in locations {
                let mut b = Vec::new();
                l.write(&mut b, true);
                out.extend_from_slice(&(b.len() as u16).to_be_bytes());
                out.extend_from_slice(&b);
            }
        }
        Message::MediaEvent(m) => m.write(&mut out),
        Message::MediaUpload {
            media,
            location,
            data,
        } => {
            media.write(&mut out);
            location.write(&mut out, false);
            out.extend_from_slice(data);
        }
        Message::Text { flags, kind, text } => {
            out.push(*flags);
            if v2019 {
                out.push(kind.unwrap_or(1));
            }
            out.extend_from_slice(&gbk_encode(text));
        }
        Message::Other { body, .. } => out.extend_from_slice(body),
    }
    out
}

/// Encodes a message with its header as one frame, or as sub-packages when the body is over
/// 1023 bytes (serials `serial`, `serial + 1`, ...). Returns the frames.
pub fn encode_message(h: &Header, m: &Message) -> Result<Vec<Vec<u8>>, Error> {
    let body = encode(m, h.is_2019());
    if body.len() <= 0x03FF {
        return Ok(alloc::vec![encode_frame(h, &body)?]);
    }
    let chunks: Vec<&[u8]> = body.chunks(1023).collect();
    let total = u16::try_from(chunks.len()).map_err(|_| Error::Package("body too large"))?;
    let mut out = Vec::with_capacity(chunks.len());
    for (i, c) in chunks.iter().enumerate() {
        let mut hh = h.clone();
        hh.serial = h.serial.wrapping_add(i as u16);
        hh.package = Some((total, i as u16 + 1));
        out.push(encode_frame(&hh, c)?);
    }
    Ok(out)
}

/// Packages of one set by index, and when its first one came (ms).
type PackageSet = (BTreeMap<u16, Vec<u8>>, i64);

/// Reassembles sub-packaged messages of one terminal, bounded in memory and time.
#[derive(Debug)]
pub struct Reassembler {
    /// (msg_id, total, serial of package 1) -> its packages.
    sets: BTreeMap<(u16, u16, u16), PackageSet>,
    bytes: usize,
    max_bytes: usize,
    timeout_ms: i64,
}

impl Reassembler {
    /// At most `max_bytes` held; a set not complete `timeout_ms` after its first package is
    /// dropped by [`Reassembler::expire`].
    pub fn new(max_bytes: usize, timeout_ms: i64) -> Self {
        Self {
            sets: BTreeMap::new(),
            bytes: 0,
            max_bytes,
            timeout_ms,
        }
    }

    /// Takes one sub-package; returns the whole body once every package of its set is in.
    pub fn push(&mut self, h: &Header, body: &[u8], now_ms: i64) -> Result<Option<Vec<u8>>, Error> {
        let Some((total, index)) = h.package else {
            return Ok(Some(body.to_vec()));
        };
        if total == 0 || index == 0 || index > total {
            return Err(Error::Package("index outside 1..=total"));
        }
        if total == 1 {
            return Ok(Some(body.to_vec()));
        }
        if self.bytes + body.len() > self.max_bytes {
            return Err(Error::Package("reassembly memory bound reached"));
        }
        let first = h.serial.wrapping_sub(index - 1);
        let key = (h.msg_id, total, first);
        let (set, _) = self
            .sets
            .entry(key)
            .or_insert_with(|| (BTreeMap::new(), now_ms));
        if let Some(old) = set.insert(index, body.to_vec()) {
            self.bytes -= old.len();
        }
        self.bytes += body.len();
        if set.len() < usize::from(total) {
            return Ok(None);
        }
        let (set, _) = self.sets.remove(&key).unwrap_or_default();
        let mut whole = Vec::new();
        for (_, part) in set {
            self.bytes -= part.len();
            whole.extend_from_slice(&part);
        }
        Ok(Some(whole))
    }

    /// Drops sets older than the timeout; returns (msg_id, missing package indexes) of each.
    pub fn expire(&mut self, now_ms: i64) -> Vec<(u16, Vec<u16>)> {
        let old: Vec<(u16, u16, u16)> = self
            .sets
            .iter()
            .filter(|(_, (_, t))| now_ms - *t >= self.timeout_ms)
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::new();
        for k in old {
            if let Some((set, _)) = self.sets.remove(&k) {
                for p in set.values() {
                    self.bytes -= p.len();
                }
                let missing = (1..=k.1).filter(|i| !set.contains_key(i)).collect();
                out.push((k.0, missing));
            }
        }
        out
    }

    /// Bytes held.
    pub fn held(&self) -> usize {
        self.bytes
    }
}
