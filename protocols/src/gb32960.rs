//! GB/T 32960.3-2016 (electric vehicle remote service and management), sans IO: the frame
//! (`##`, command, response flag, VIN, encryption, length, data, BCC), a deframer for byte
//! streams that resynchronises on garbage, vehicle login and logout, real-time and re-issued
//! data with every information type 0x01-0x09 (custom types 0x80-0xFE kept as bytes), heartbeat,
//! time sync, platform login and logout, parameter query and setup, terminal control, and the
//! platform's responses.
//!
//! Raw values keep the standard's encoding (offsets, scales and the "abnormal" / "invalid"
//! sentinels); [`Reading`] turns one into a number or says which sentinel it is.
//!
//! Encrypted data (RSA, AES-128) is refused with [`Error::Encrypted`]: no keys are configured.
//! Frames starting `$$` (the 2025 edition's start) are read with the 2016 layout and reported
//! as such in [`Frame::dollar`]; the 2025 edition's other changes are not implemented.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Bytes before the data: start (2), command, response, VIN (17), encryption, length (2).
pub const HEADER: usize = 24;
/// Largest data length accepted (the standard allows 0-65531).
pub const MAX_DATA: usize = 65_531;

/// Commands.
pub mod cmd {
    /// Vehicle login.
    pub const LOGIN: u8 = 0x01;
    /// Real-time data.
    pub const REALTIME: u8 = 0x02;
    /// Re-issued data.
    pub const REISSUE: u8 = 0x03;
    /// Vehicle logout.
    pub const LOGOUT: u8 = 0x04;
    /// Platform login.
    pub const PLATFORM_LOGIN: u8 = 0x05;
    /// Platform logout.
    pub const PLATFORM_LOGOUT: u8 = 0x06;
    /// Heartbeat.
    pub const HEARTBEAT: u8 = 0x07;
    /// Terminal time sync.
    pub const TIME_SYNC: u8 = 0x08;
    /// Parameter query.
    pub const QUERY: u8 = 0x80;
    /// Parameter setup.
    pub const SETUP: u8 = 0x81;
    /// Terminal control.
    pub const CONTROL: u8 = 0x82;
}

/// Response flags.
pub mod resp {
    /// Success.
    pub const OK: u8 = 0x01;
    /// Error.
    pub const ERROR: u8 = 0x02;
    /// VIN already logged in.
    pub const VIN_DUPLICATE: u8 = 0x03;
    /// A command (not a response).
    pub const COMMAND: u8 = 0xFE;
}

/// Why a frame or message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Fewer bytes than a header, or than the length says.
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// Not `##` (or `$$`).
    Start,
    /// The BCC does not match.
    Bcc {
        /// XOR of the bytes.
        computed: u8,
        /// The frame's BCC.
        carried: u8,
    },
    /// Data longer than the standard allows.
    Oversized(usize),
    /// The VIN is not 17 printable ASCII characters.
    Vin,
    /// Encrypted data (0x02 RSA, 0x03 AES-128) without a key.
    Encrypted(u8),
    /// A time that is not a date.
    Time,
    /// Malformed data.
    Data {
        /// Command.
        command: u8,
        /// What is wrong.
        reason: &'static str,
    },
    /// An information type with no known layout (0x0A-0x7F): what follows cannot be read.
    UnknownInfo(u8),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { need, have } => write!(f, "truncated: {have} of {need} bytes"),
            Self::Start => write!(f, "frame does not start with ##"),
            Self::Bcc { computed, carried } => write!(
                f,
                "BCC 0x{carried:02X} does not match the bytes (0x{computed:02X})"
            ),
            Self::Oversized(n) => write!(f, "data length {n} over {MAX_DATA}"),
            Self::Vin => write!(f, "VIN is not 17 printable characters"),
            Self::Encrypted(m) => write!(
                f,
                "encrypted data (0x{m:02X}: {}) refused: no key is configured",
                match m {
                    0x02 => "RSA",
                    0x03 => "AES-128",
                    _ => "unknown method",
                }
            ),
            Self::Time => write!(f, "bad time"),
            Self::Data { command, reason } => write!(f, "command 0x{command:02X}: {reason}"),
            Self::UnknownInfo(t) => write!(
                f,
                "information type 0x{t:02X} has no known layout; the rest of the message is skipped"
            ),
        }
    }
}

/// XOR of every byte.
pub fn bcc(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |a, b| a ^ b)
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Command.
    pub command: u8,
    /// Response flag.
    pub response: u8,
    /// VIN (the device name in Ironlink).
    pub vin: String,
    /// 0x01 none, 0x02 RSA, 0x03 AES-128, 0xFE abnormal, 0xFF invalid.
    pub encryption: u8,
    /// Data unit.
    pub data: Vec<u8>,
    /// Started with `$$` rather than `##`.
    pub dollar: bool,
}

/// Parses one whole frame (as the deframer cuts it).
pub fn parse_frame(b: &[u8]) -> Result<Frame, Error> {
    if b.len() < HEADER + 1 {
        return Err(Error::Truncated {
            need: HEADER + 1,
            have: b.len(),
        });
    }
    let dollar = match (b[0], b[1]) {
        (b'#', b'#') => false,
        (b'$', b'$') => true,
        _ => return Err(Error::Start),
    };
    let len = usize::from(u16::from_be_bytes([b[22], b[23]]));
    if len > MAX_DATA {
        return Err(Error::Oversized(len));
    }
    let total = HEADER + len + 1;
    if b.len() < total {
        return Err(Error::Truncated {
            need: total,
            have: b.len(),
        });
    }
    let computed = bcc(&b[2..HEADER + len]);
    let carried = b[HEADER + len];
    if computed != carried {
        return Err(Error::Bcc { computed, carried });
    }
    let vin = &b[4..21];
    if !vin.iter().all(|c| c.is_ascii_graphic()) {
        return Err(Error::Vin);
    }
    let encryption = b[21];
    if matches!(encryption, 0x02 | 0x03) || (0x04..=0xFD).contains(&encryption) {
        return Err(Error::Encrypted(encryption));
    }
    Ok(Frame {
        command: b[2],
        response: b[3],
        vin: String::from_utf8_lossy(vin).into_owned(),
        encryption,
        data: b[HEADER..HEADER + len].to_vec(),
        dollar,
    })
}

/// Encodes a frame (unencrypted).
pub fn encode_frame(command: u8, response: u8, vin: &str, data: &[u8]) -> Result<Vec<u8>, Error> {
    if vin.len() != 17 || !vin.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(Error::Vin);
    }
    if data.len() > MAX_DATA {
        return Err(Error::Oversized(data.len()));
    }
    let mut out = Vec::with_capacity(HEADER + data.len() + 1);
    out.extend_from_slice(b"##");
    out.push(command);
    out.push(response);
    out.extend_from_slice(vin.as_bytes());
    out.push(0x01);
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
    out.push(bcc(&out[2..]));
    Ok(out)
}

/// Cuts a byte stream into frames: skips bytes until a start, waits for the whole length, and
/// on a bad frame skips its start and looks for the next one. Memory is bounded by one frame.
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
    /// Bytes skipped looking for a frame start.
    pub skipped: u64,
}

impl Deframer {
    /// A deframer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; frames (or why one was dropped) go to `out`, in order.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Result<Frame, Error>>) {
        self.buf.extend_from_slice(data);
        loop {
            // Find a start.
            let start = self.buf.windows(2).position(|w| w == b"##" || w == b"$$");
            match start {
                Some(0) => {}
                Some(n) => {
                    self.skipped += n as u64;
                    self.buf.drain(..n);
                }
                None => {
                    // Keep a last byte that may begin a start.
                    let keep = usize::from(matches!(self.buf.last(), Some(b'#' | b'$')));
                    let drop = self.buf.len() - keep;
                    self.skipped += drop as u64;
                    self.buf.drain(..drop);
                    return;
                }
            }
            if !plausible(&self.buf) {
                // Not a header after all (garbage holding `##`): look further.
                self.skipped += 1;
                self.buf.drain(..1);
                continue;
            }
            if self.buf.len() < HEADER {
                return;
            }
            let len = usize::from(u16::from_be_bytes([self.buf[22], self.buf[23]]));
            if len > MAX_DATA {
                out.push(Err(Error::Oversized(len)));
                self.buf.drain(..1);
                continue;
            }
            let total = HEADER + len + 1;
            if self.buf.len() < total {
                return;
            }
            match parse_frame(&self.buf[..total]) {
                Ok(f) => {
                    out.push(Ok(f));
                    self.buf.drain(..total);
                }
                Err(e) => {
                    // Resynchronise: the start may have been garbage.
                    out.push(Err(e));
                    self.buf.drain(..1);
                }
            }
        }
    }

    /// Bytes held waiting for the rest of a frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Whether the header bytes present so far can be a frame's: a known command, a response flag,
/// a printable VIN and an encryption byte. Saves waiting for the length of a false start.
fn plausible(b: &[u8]) -> bool {
    let command_ok = |c: u8| matches!(c, 0x01..=0x08 | 0x80..=0x82 | 0xC0..=0xFE);
    b.get(2).is_none_or(|c| command_ok(*c))
        && b.get(3).is_none_or(|r| matches!(r, 0x01..=0x07 | 0xFE))
        && b.get(4..b.len().min(21))
            .is_none_or(|v| v.iter().all(u8::is_ascii_graphic))
        && b.get(21)
            .is_none_or(|e| matches!(e, 0x01..=0x03 | 0xFE | 0xFF))
}

/// A time (`YY MM DD hh mm ss`, binary, GMT+8).
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
        let t = Time {
            year: 2000 + u16::from(b[0]),
            month: b[1],
            day: b[2],
            hour: b[3],
            minute: b[4],
            second: b[5],
        };
        if b[0] > 99
            || !(1..=12).contains(&t.month)
            || !(1..=31).contains(&t.day)
            || t.hour > 23
            || t.minute > 59
            || t.second > 59
        {
            return Err(Error::Time);
        }
        Ok(t)
    }

    /// The six bytes.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[
            (self.year % 100) as u8,
            self.month,
            self.day,
            self.hour,
            self.minute,
            self.second,
        ]);
    }

    /// Milliseconds since the Unix epoch (the time read as GMT+8).
    pub fn unix_ms(&self) -> i64 {
        crate::jt808::civil_to_unix_ms(
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
        let (y, month, day, hour, minute, second) =
            crate::jt808::unix_ms_to_civil(ms + 8 * 3_600_000);
        Self {
            year: y.clamp(2000, 2099) as u16,
            month,
            day,
            hour,
            minute,
            second,
        }
    }
}

struct Rd<'a> {
    b: &'a [u8],
    at: usize,
    command: u8,
}

impl<'a> Rd<'a> {
    fn new(b: &'a [u8], command: u8) -> Self {
        Self { b, at: 0, command }
    }

    fn err(&self, reason: &'static str) -> Error {
        Error::Data {
            command: self.command,
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

    fn left(&self) -> usize {
        self.b.len().saturating_sub(self.at)
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = self.b.get(self.at..).unwrap_or(&[]);
        self.at = self.b.len();
        s
    }
}

fn ascii(b: &[u8]) -> String {
    let end = b.iter().rposition(|c| *c != 0).map_or(0, |i| i + 1);
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A raw value read against the standard's sentinels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reading {
    /// A value, scaled and offset.
    Value(f64),
    /// 0xFE / 0xFFFE / 0xFFFFFFFE: abnormal.
    Abnormal,
    /// 0xFF / 0xFFFF / 0xFFFFFFFF: invalid.
    Invalid,
}

impl Reading {
    /// A BYTE: `raw * scale + offset` unless a sentinel.
    pub fn byte(raw: u8, scale: f64, offset: f64) -> Self {
        match raw {
            0xFE => Self::Abnormal,
            0xFF => Self::Invalid,
            v => Self::Value(f64::from(v) * scale + offset),
        }
    }

    /// A WORD.
    pub fn word(raw: u16, scale: f64, offset: f64) -> Self {
        match raw {
            0xFFFE => Self::Abnormal,
            0xFFFF => Self::Invalid,
            v => Self::Value(f64::from(v) * scale + offset),
        }
    }

    /// A DWORD.
    pub fn dword(raw: u32, scale: f64, offset: f64) -> Self {
        match raw {
            0xFFFF_FFFE => Self::Abnormal,
            0xFFFF_FFFF => Self::Invalid,
            v => Self::Value(f64::from(v) * scale + offset),
        }
    }

    /// The value, if there is one.
    pub fn value(self) -> Option<f64> {
        match self {
            Self::Value(v) => Some(v),
            _ => None,
        }
    }
}

/// 0x01 whole-vehicle data (raw).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vehicle {
    /// 1 started, 2 off, 3 other.
    pub state: u8,
    /// 1 parked charging, 2 driving charging, 3 not charging, 4 charged.
    pub charging: u8,
    /// 1 electric, 2 hybrid, 3 fuel.
    pub mode: u8,
    /// 0.1 km/h.
    pub speed: u16,
    /// 0.1 km.
    pub mileage: u32,
    /// 0.1 V.
    pub voltage: u16,
    /// 0.1 A, offset -1000 A.
    pub current: u16,
    /// %.
    pub soc: u8,
    /// 1 working, 2 off.
    pub dcdc: u8,
    /// Gear bits.
    pub gear: u8,
    /// kΩ.
    pub insulation: u16,
    /// Accelerator pedal, %.
    pub accelerator: u8,
    /// Brake pedal, % (0x65: brake on without travel).
    pub brake: u8,
}

/// One drive motor of 0x02.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Motor {
    /// Motor sequence number.
    pub seq: u8,
    /// 1 consuming, 2 generating, 3 off, 4 ready.
    pub state: u8,
    /// Controller temperature, °C offset -40.
    pub controller_temp: u8,
    /// r/min offset -20000.
    pub speed: u16,
    /// 0.1 N·m offset -2000.
    pub torque: u16,
    /// Motor temperature, °C offset -40.
    pub temp: u8,
    /// Controller input voltage, 0.1 V.
    pub voltage: u16,
    /// Controller DC current, 0.1 A offset -1000.
    pub current: u16,
}

/// 0x03 fuel cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuelCell {
    /// 0.1 V.
    pub voltage: u16,
    /// 0.1 A.
    pub current: u16,
    /// 0.01 kg/100 km.
    pub consumption: u16,
    /// Probe temperatures, °C offset -40.
    pub temps: Vec<u8>,
    /// Highest hydrogen temperature, 0.1 °C offset -40.
    pub h2_max_temp: u16,
    /// Its probe.
    pub h2_max_temp_probe: u8,
    /// Highest hydrogen concentration, ppm.
    pub h2_max_concentration: u16,
    /// Its sensor.
    pub h2_max_concentration_sensor: u8,
    /// Highest hydrogen pressure, 0.1 MPa.
    pub h2_max_pressure: u16,
    /// Its sensor.
    pub h2_max_pressure_sensor: u8,
    /// High-voltage DC/DC: 1 working, 2 off.
    pub dcdc: u8,
}

/// 0x04 engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Engine {
    /// 1 on, 2 off.
    pub state: u8,
    /// Crankshaft r/min.
    pub speed: u16,
    /// 0.01 L/100 km.
    pub consumption: u16,
}

/// 0x05 vehicle location.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Bit 0: 1 invalid fix; bit 1: south; bit 2: west.
    pub status: u8,
    /// 1e-6 degree.
    pub lon: u32,
    /// 1e-6 degree.
    pub lat: u32,
}

impl Position {
    /// Degrees (negative south), or None without a valid fix.
    pub fn latitude(&self) -> Option<f64> {
        (self.status & 1 == 0).then(|| {
            let v = f64::from(self.lat) / 1e6;
            if self.status & 2 != 0 {
                -v
            } else {
                v
            }
        })
    }

    /// Degrees (negative west), or None without a valid fix.
    pub fn longitude(&self) -> Option<f64> {
        (self.status & 1 == 0).then(|| {
            let v = f64::from(self.lon) / 1e6;
            if self.status & 4 != 0 {
                -v
            } else {
                v
            }
        })
    }
}

/// 0x06 extremes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extremes {
    /// Subsystem of the highest cell voltage.
    pub max_v_system: u8,
    /// Its cell.
    pub max_v_cell: u8,
    /// Highest cell voltage, 0.001 V.
    pub max_v: u16,
    /// Subsystem of the lowest cell voltage.
    pub min_v_system: u8,
    /// Its cell.
    pub min_v_cell: u8,
    /// Lowest cell voltage, 0.001 V.
    pub min_v: u16,
    /// Subsystem of the highest temperature.
    pub max_t_system: u8,
    /// Its probe.
    pub max_t_probe: u8,
    /// Highest temperature, °C offset -40.
    pub max_t: u8,
    /// Subsystem of the lowest temperature.
    pub min_t_system: u8,
    /// Its probe.
    pub min_t_probe: u8,
    /// Lowest temperature, °C offset -40.
    pub min_t: u8,
}

/// 0x07 alarms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alarms {
    /// Highest level (0-3).
    pub level: u8,
    /// General alarm bits.
    pub general: u32,
    /// Energy storage fault codes.
    pub storage: Vec<u32>,
    /// Drive motor fault codes.
    pub motor: Vec<u32>,
    /// Engine fault codes.
    pub engine: Vec<u32>,
    /// Other fault codes.
    pub other: Vec<u32>,
}

/// One subsystem of 0x08.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellVoltages {
    /// Subsystem number.
    pub system: u8,
    /// 0.1 V.
    pub voltage: u16,
    /// 0.1 A offset -1000.
    pub current: u16,
    /// Cells in the subsystem.
    pub cells: u16,
    /// Index (from 1) of the first cell in this frame.
    pub first: u16,
    /// Voltages of this frame's cells, 0.001 V.
    pub voltages: Vec<u16>,
}

/// One subsystem of 0x09.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTemps {
    /// Subsystem number.
    pub system: u8,
    /// Temperatures, °C offset -40.
    pub temps: Vec<u8>,
}

/// An information item of real-time or re-issued data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// 0x01.
    Vehicle(Vehicle),
    /// 0x02.
    Motors(Vec<Motor>),
    /// 0x03.
    FuelCell(FuelCell),
    /// 0x04.
    Engine(Engine),
    /// 0x05.
    Position(Position),
    /// 0x06.
    Extremes(Extremes),
    /// 0x07.
    Alarms(Alarms),
    /// 0x08.
    Voltages(Vec<CellVoltages>),
    /// 0x09.
    Temperatures(Vec<ProbeTemps>),
    /// 0x80-0xFE: custom, a WORD length then the bytes.
    Custom {
        /// Type.
        kind: u8,
        /// Bytes.
        data: Vec<u8>,
    },
}

/// Real-time or re-issued data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Collection time.
    pub time: Time,
    /// Items, in order.
    pub items: Vec<Info>,
    /// Set when an item could not be read: the items before it are kept.
    pub rest_error: Option<Error>,
}

fn codes(r: &mut Rd<'_>) -> Result<Vec<u32>, Error> {
    let n = r.u8("fault count")?;
    if n == 0xFE || n == 0xFF {
        return Ok(Vec::new());
    }
    (0..n).map(|_| r.u32("fault code")).collect()
}

fn info(kind: u8, r: &mut Rd<'_>) -> Result<Info, Error> {
    Ok(match kind {
        0x01 => Info::Vehicle(Vehicle {
            state: r.u8("vehicle")?,
            charging: r.u8("vehicle")?,
            mode: r.u8("vehicle")?,
            speed: r.u16("vehicle")?,
            mileage: r.u32("vehicle")?,
            voltage: r.u16("vehicle")?,
            current: r.u16("vehicle")?,
            soc: r.u8("vehicle")?,
            dcdc: r.u8("vehicle")?,
            gear: r.u8("vehicle")?,
            insulation: r.u16("vehicle")?,
            accelerator: r.u8("vehicle")?,
            brake: r.u8("vehicle")?,
        }),
        0x02 => {
            let n = r.u8("motor count")?;
            let mut v = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                v.push(Motor {
                    seq: r.u8("motor")?,
                    state: r.u8("motor")?,
                    controller_temp: r.u8("motor")?,
                    speed: r.u16("motor")?,
                    torque: r.u16("motor")?,
                    temp: r.u8("motor")?,
                    voltage: r.u16("motor")?,
                    current: r.u16("motor")?,
                });
            }
            Info::Motors(v)
        }
        0x03 => {
            let voltage = r.u16("fuel cell")?;
            let current = r.u16("fuel cell")?;
            let consumption = r.u16("fuel cell")?;
            let probes = r.u16("fuel cell probes")?;
            let temps = if probes == 0xFFFE || probes == 0xFFFF {
                Vec::new()
            } else {
                r.take(usize::from(probes), "fuel cell temperatures")?
                    .to_vec()
            };
            Info::FuelCell(FuelCell {
                voltage,
                current,
                consumption,
                temps,
                h2_max_temp: r.u16("fuel cell")?,
                h2_max_temp_probe: r.u8("fuel cell")?,
                h2_max_concentration: r.u16("fuel cell")?,
                h2_max_concentration_sensor: r.u8("fuel cell")?,
                h2_max_pressure: r.u16("fuel cell")?,
                h2_max_pressure_sensor: r.u8("fuel cell")?,
                dcdc: r.u8("fuel cell")?,
            })
        }
        0x04 => Info::Engine(Engine {
            state: r.u8("engine")?,
            speed: r.u16("engine")?,
            consumption: r.u16("engine")?,
        }),
        0x05 => Info::Position(Position {
            status: r.u8("location")?,
            lon: r.u32("location")?,
            lat: r.u32("location")?,
        }),
        0x06 => Info::Extremes(Extremes {
            max_v_system: r.u8("extremes")?,
            max_v_cell: r.u8("extremes")?,
            max_v: r.u16("extremes")?,
            min_v_system: r.u8("extremes")?,
            min_v_cell: r.u8("extremes")?,
            min_v: r.u16("extremes")?,
            max_t_system: r.u8("extremes")?,
            max_t_probe: r.u8("extremes")?,
            max_t: r.u8("extremes")?,
            min_t_system: r.u8("extremes")?,
            min_t_probe: r.u8("extremes")?,
            min_t: r.u8("extremes")?,
        }),
        0x07 => Info::Alarms(Alarms {
            level: r.u8("alarm level")?,
            general: r.u32("alarm bits")?,
            storage: codes(r)?,
            motor: codes(r)?,
            engine: codes(r)?,
            other: codes(r)?,
        }),
        0x08 => {
            let n = r.u8("subsystem count")?;
            let mut v = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                let system = r.u8("cell voltages")?;
                let voltage = r.u16("cell voltages")?;
                let current = r.u16("cell voltages")?;
                let cells = r.u16("cell voltages")?;
                let first = r.u16("cell voltages")?;
                let m = r.u8("cells in frame")?;
                let voltages = (0..m)
                    .map(|_| r.u16("cell voltage"))
                    .collect::<Result<_, _>>()?;
                v.push(CellVoltages {
                    system,
                    voltage,
                    current,
                    cells,
                    first,
                    voltages,
                });
            }
            Info::Voltages(v)
        }
        0x09 => {
            let n = r.u8("subsystem count")?;
            let mut v = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                let system = r.u8("temperatures")?;
                let probes = r.u16("probe count")?;
                v.push(ProbeTemps {
                    system,
                    temps: r.take(usize::from(probes), "probe temperatures")?.to_vec(),
                });
            }
            Info::Temperatures(v)
        }
        0x80..=0xFE => {
            let len = usize::from(r.u16("custom length")?);
            Info::Custom {
                kind,
                data: r.take(len, "custom data")?.to_vec(),
            }
        }
        other => return Err(Error::UnknownInfo(other)),
    })
}

fn write_info(i: &Info, out: &mut Vec<u8>) {
    let w16 = |out: &mut Vec<u8>, v: u16| out.extend_from_slice(&v.to_be_bytes());
    let w32 = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_be_bytes());
    match i {
        Info::Vehicle(v) => {
            out.extend_from_slice(&[0x01, v.state, v.charging, v.mode]);
            w16(out, v.speed);
            w32(out, v.mileage);
            w16(out, v.voltage);
            w16(out, v.current);
            out.extend_from_slice(&[v.soc, v.dcdc, v.gear]);
            w16(out, v.insulation);
            out.extend_from_slice(&[v.accelerator, v.brake]);
        }
        Info::Motors(ms) => {
            out.extend_from_slice(&[0x02, ms.len().min(255) as u8]);
            for m in ms.iter().take(255) {
                out.extend_from_slice(&[m.seq, m.state, m.controller_temp]);
                w16(out, m.speed);
                w16(out, m.torque);
                out.push(m.temp);
                w16(out, m.voltage);
                w16(out, m.current);
            }
        }
        Info::FuelCell(f) => {
            out.push(0x03);
            w16(out, f.voltage);
            w16(out, f.current);
            w16(out, f.consumption);
            w16(out, f.temps.len().min(0xFFFD) as u16);
            out.extend_from_slice(&f.temps[..f.temps.len().min(0xFFFD)]);
            w16(out, f.h2_max_temp);
            out.push(f.h2_max_temp_probe);
            w16(out, f.h2_max_concentration);
            out.push(f.h2_max_concentration_sensor);
            w16(out, f.h2_max_pressure);
            out.extend_from_slice(&[f.h2_max_pressure_sensor, f.dcdc]);
        }
        Info::Engine(e) => {
            out.extend_from_slice(&[0x04, e.state]);
            w16(out, e.speed);
            w16(out, e.consumption);
        }
        Info::Position(p) => {
            out.extend_from_slice(&[0x05, p.status]);
            w32(out, p.lon);
            w32(out, p.lat);
        }
        Info::Extremes(e) => {
            out.extend_from_slice(&[0x06, e.max_v_system, e.max_v_cell]);
            w16(out, e.max_v);
            out.extend_from_slice(&[e.min_v_system, e.min_v_cell]);
            w16(out, e.min_v);
            out.extend_from_slice(&[
                e.max_t_system,
                e.max_t_probe,
                e.max_t,
                e.min_t_system,
                e.min_t_probe,
                e.min_t,
            ]);
        }
        Info::Alarms(a) => {
            out.extend_from_slice(&[0x07, a.level]);
            w32(out, a.general);
            for list in [&a.storage, &a.motor, &a.engine, &a.other] {
                out.push(list.len().min(253) as u8);
                for c in list.iter().take(253) {
                    w32(out, *c);
                }
            }
        }
        Info::Voltages(vs) => {
            out.extend_from_slice(&[0x08, vs.len().min(255) as u8]);
            for v in vs.iter().take(255) {
                out.push(v.system);
                w16(out, v.voltage);
                w16(out, v.current);
                w16(out, v.cells);
                w16(out, v.first);
                out.push(v.voltages.len().min(255) as u8);
                for c in v.voltages.iter().take(255) {
                    w16(out, *c);
                }
            }
        }
        Info::Temperatures(ts) => {
            out.extend_from_slice(&[0x09, ts.len().min(255) as u8]);
            for t in ts.iter().take(255) {
                out.push(t.system);
                w16(out, t.temps.len().min(0xFFFF) as u16);
                out.extend_from_slice(&t.temps);
            }
        }
        Info::Custom { kind, data } => {
            out.push(*kind);
            w16(out, data.len().min(0xFFFF) as u16);
            out.extend_from_slice(&data[..data.len().min(0xFFFF)]);
        }
    }
}

/// Vehicle login data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// Time.
    pub time: Time,
    /// Login serial (1-65531, daily).
    pub serial: u16,
    /// SIM ICCID.
    pub iccid: String,
    /// Rechargeable energy storage subsystem codes.
    pub systems: Vec<String>,
}

/// A platform's login to another platform (0x05).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformLogin {
    /// Time.
    pub time: Time,
    /// Serial.
    pub serial: u16,
    /// User name (12).
    pub user: String,
    /// Password (20).
    pub password: String,
    /// Encryption rule.
    pub encryption: u8,
}

/// A terminal parameter (0x80 query answers, 0x81 setup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    /// A WORD parameter (0x01-0x03, 0x06, 0x0A, 0x0B, 0x0F).
    Word(u8, u16),
    /// A BYTE parameter (0x09, 0x0C, 0x10; 0x04/0x0D are lengths, implied by 0x05/0x0E).
    Byte(u8, u8),
    /// A text parameter (0x05 and 0x0E domain names, 0x07 and 0x08 versions).
    Text(u8, String),
}

impl Param {
    /// The parameter id.
    pub fn id(&self) -> u8 {
        match self {
            Self::Word(id, _) | Self::Byte(id, _) | Self::Text(id, _) => *id,
        }
    }
}

fn read_params(r: &mut Rd<'_>) -> Result<Vec<Param>, Error> {
    let n = r.u8("parameter count")?;
    let mut out = Vec::new();
    let (mut domain_len, mut public_len) = (0usize, 0usize);
    for _ in 0..n {
        let id = r.u8("parameter id")?;
        out.push(match id {
            0x01..=0x03 | 0x06 | 0x0A | 0x0B | 0x0F => Param::Word(id, r.u16("parameter")?),
            0x04 => {
                let v = r.u8("parameter")?;
                domain_len = usize::from(v);
                Param::Byte(id, v)
            }
            0x0D => {
                let v = r.u8("parameter")?;
                public_len = usize::from(v);
                Param::Byte(id, v)
            }
            0x09 | 0x0C | 0x10 => Param::Byte(id, r.u8("parameter")?),
            0x05 => Param::Text(id, ascii(r.take(domain_len, "domain name")?)),
            0x0E => Param::Text(id, ascii(r.take(public_len, "public domain name")?)),
            0x07 | 0x08 => Param::Text(id, ascii(r.take(5, "version")?)),
            _ => return Err(r.err("unknown parameter id")),
        });
    }
    Ok(out)
}

fn write_params(ps: &[Param], out: &mut Vec<u8>) {
    out.push(ps.len().min(255) as u8);
    for p in ps.iter().take(255) {
        match p {
            Param::Word(id, v) => {
                out.push(*id);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Param::Byte(id, v) => out.extend_from_slice(&[*id, *v]),
            Param::Text(id, t) => {
                out.push(*id);
                let b = t.as_bytes();
                if matches!(id, 0x07 | 0x08) {
                    let n = b.len().min(5);
                    out.extend_from_slice(&b[..n]);
                    out.extend(core::iter::repeat_n(0u8, 5 - n));
                } else {
                    out.extend_from_slice(&b[..b.len().min(255)]);
                }
            }
        }
    }
}

/// The data of a frame, decoded by command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// 0x01.
    Login(Login),
    /// 0x02.
    Realtime(Report),
    /// 0x03.
    Reissue(Report),
    /// 0x04.
    Logout {
        /// Time.
        time: Time,
        /// The login serial.
        serial: u16,
    },
    /// 0x05.
    PlatformLogin(PlatformLogin),
    /// 0x06.
    PlatformLogout {
        /// Time.
        time: Time,
        /// Serial.
        serial: u16,
    },
    /// 0x07.
    Heartbeat,
    /// 0x08 (a request: no data; an answer: the time).
    TimeSync(Option<Time>),
    /// 0x80 query: the ids (a command), or the values (an answer).
    Query {
        /// Time.
        time: Time,
        /// Ids asked.
        ids: Vec<u8>,
        /// Values answered.
        params: Vec<Param>,
    },
    /// 0x81 setup.
    Setup {
        /// Time.
        time: Time,
        /// Values.
        params: Vec<Param>,
    },
    /// 0x82 control.
    Control {
        /// Time.
        time: Time,
        /// 0x01 upgrade, 0x02 shut down, 0x03 reset, 0x04 factory reset, 0x05 disconnect,
        /// 0x06 alarm, 0x07 sampling check.
        command: u8,
        /// Its parameters, raw.
        params: Vec<u8>,
    },
    /// A platform response: the data (usually the time of what is answered).
    Response(Vec<u8>),
    /// Anything else.
    Other(Vec<u8>),
}

/// Decodes a frame's data. Responses from the platform (flag not 0xFE) are
/// [`Message::Response`] except for query answers.
pub fn decode(f: &Frame) -> Result<Message, Error> {
    let mut r = Rd::new(&f.data, f.command);
    if f.response != resp::COMMAND && f.command != cmd::QUERY {
        return Ok(Message::Response(f.data.clone()));
    }
    Ok(match f.command {
        cmd::LOGIN => {
            let time = Time::read(&mut r)?;
            let serial = r.u16("login serial")?;
            let iccid = ascii(r.take(20, "ICCID")?);
            let n = r.u8("subsystem count")?;
            let len = usize::from(r.u8("subsystem code length")?);
            let mut systems = Vec::new();
            for _ in 0..n {
                systems.push(ascii(r.take(len, "subsystem codes")?));
            }
            Message::Login(Login {
                time,
                serial,
                iccid,
                systems,
            })
        }
        cmd::REALTIME | cmd::REISSUE => {
            let time = Time::read(&mut r)?;
            let mut items = Vec::new();
            let mut rest_error = None;
            while r.left() > 0 {
                let kind = r.u8("information type")?;
                match info(kind, &mut r) {
                    Ok(i) => items.push(i),
                    Err(e) => {
                        rest_error = Some(e);
                        break;
                    }
                }
            }
            let rep = Report {
                time,
                items,
                rest_error,
            };
            if f.command == cmd::REALTIME {
                Message::Realtime(rep)
            } else {
                Message::Reissue(rep)
            }
        }
        cmd::LOGOUT => Message::Logout {
            time: Time::read(&mut r)?,
            serial: r.u16("logout serial")?,
        },
        cmd::PLATFORM_LOGIN => Message::PlatformLogin(PlatformLogin {
            time: Time::read(&mut r)?,
            serial: r.u16("serial")?,
            user: ascii(r.take(12, "user name")?),
            password: ascii(r.take(20, "password")?),
            encryption: r.u8("encryption rule")?,
        }),
        cmd::PLATFORM_LOGOUT => Message::PlatformLogout {
            time: Time::read(&mut r)?,
            serial: r.u16("serial")?,
        },
        cmd::HEARTBEAT => Message::Heartbeat,
        cmd::TIME_SYNC => Message::TimeSync(if r.left() >= 6 {
            Some(Time::read(&mut r)?)
        } else {
            None
        }),
        cmd::QUERY => {
            let time = Time::read(&mut r)?;
            if f.response == resp::COMMAND {
                let n = r.u8("parameter count")?;
                let ids = r.take(usize::from(n), "parameter ids")?.to_vec();
                Message::Query {
                    time,
                    ids,
                    params: Vec::new(),
                }
            } else {
                Message::Query {
                    time,
                    ids: Vec::new(),
                    params: read_params(&mut r)?,
                }
            }
        }
        cmd::SETUP => Message::Setup {
            time: Time::read(&mut r)?,
            params: read_params(&mut r)?,
        },
        cmd::CONTROL => Message::Control {
            time: Time::read(&mut r)?,
            command: r.u8("control command")?,
            params: r.rest().to_vec(),
        },
        _ => Message::Other(f.data.clone()),
    })
}

/// Encodes a message's data.
pub fn encode(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    match m {
        Message::Login(l) => {
            l.time.write(&mut out);
            out.extend_from_slice(&l.serial.to_be_bytes());
            let mut iccid = l.iccid.as_bytes().to_vec();
            iccid.resize(20, 0);
            out.extend_from_slice(&iccid);
            out.push(l.systems.len().min(250) as u8);
            let len = l.systems.iter().map(String::len).max().unwrap_or(0).min(50);
            out.push(len as u8);
            for s in l.systems.iter().take(250) {
                let mut b = s.as_bytes().to_vec();
                b.resize(len, 0);
                out.extend_from_slice(&b);
            }
        }
        Message::Realtime(rep) | Message::Reissue(rep) => {
            rep.time.write(&mut out);
            for i in &rep.items {
                write_info(i, &mut out);
            }
        }
        Message::Logout { time, serial } | Message::PlatformLogout { time, serial } => {
            time.write(&mut out);
            out.extend_from_slice(&serial.to_be_bytes());
        }
        Message::PlatformLogin(p) => {
            p.time.write(&mut out);
            out.extend_from_slice(&p.serial.to_be_bytes());
            for (t, n) in [(&p.user, 12), (&p.password, 20)] {
                let mut b = t.as_bytes().to_vec();
                b.resize(n, 0);
                out.extend_from_slice(&b);
            }
            out.push(p.encryption);
        }
        Message::Heartbeat => {}
        Message::TimeSync(t) => {
            if let Some(t) = t {
                t.write(&mut out);
            }
        }
        Message::Query { time, ids, params } => {
            time.write(&mut out);
            if params.is_empty() {
                out.push(ids.len().min(255) as u8);
                out.extend_from_slice(&ids[..ids.len().min(255)]);
            } else {
                write_params(params, &mut out);
            }
        }
        Message::Setup { time, params } => {
            time.write(&mut out);
            write_params(params, &mut out);
        }
        Message::Control {
            time,
            command,
            params,
        } => {
            time.write(&mut out);
            out.push(*command);
            out.extend_from_slice(params);
        }
        Message::Response(d) | Message::Other(d) => out.extend_from_slice(d),
    }
    out
}

/// The platform's answer to a frame from a vehicle: the same command and VIN, flag `result`,
/// and a time: the time of what is answered (its first six data bytes), or `now` for what
/// carries none (heartbeat, time sync), as platforms and rtm-con expect every answer to.
pub fn response(to: &Frame, result: u8, now: Time) -> Result<Vec<u8>, Error> {
    let mut data = Vec::new();
    match to.command {
        cmd::HEARTBEAT | cmd::TIME_SYNC => now.write(&mut data),
        _ if to.data.len() < 6 => now.write(&mut data),
        _ => data.extend_from_slice(&to.data[..6]),
    }
    encode_frame(to.command, result, &to.vin, &data)
}
