//! Modbus point tables, sans IO: register addresses in both notations, data types over one to
//! four registers in the four word orders, scale and offset both ways, the RTU CRC, and (with
//! `alloc`) the plan that coalesces a device's points into as few reads as the limits allow.
//!
//! Word orders, for the registers `r0 r1 ...` as read (each register big-endian on the wire):
//! `ABCD` big-endian (`r0 r1 ...`), `CDAB` registers in reverse order, `BADC` bytes swapped
//! inside each register, `DCBA` fully reversed (little-endian).

/// The four Modbus tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RegisterKind {
    /// Read/write bits (FC01 read, FC05/15 write).
    Coil,
    /// Read-only bits (FC02).
    DiscreteInput,
    /// Read-only registers (FC04).
    InputRegister,
    /// Read/write registers (FC03 read, FC06/16 write).
    HoldingRegister,
}

impl RegisterKind {
    /// True for the bit tables.
    pub fn is_bit(self) -> bool {
        matches!(self, Self::Coil | Self::DiscreteInput)
    }

    /// Most items one read request may ask for (2000 bits, 125 registers).
    pub fn max_read(self) -> u16 {
        if self.is_bit() {
            2000
        } else {
            125
        }
    }

    /// The read function code.
    pub fn read_function(self) -> u8 {
        match self {
            Self::Coil => 0x01,
            Self::DiscreteInput => 0x02,
            Self::HoldingRegister => 0x03,
            Self::InputRegister => 0x04,
        }
    }

    /// True when the table can be written.
    pub fn writable(self) -> bool {
        matches!(self, Self::Coil | Self::HoldingRegister)
    }
}

/// A point-table error; `Display` says what to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointError {
    /// The address is neither a 0-based number nor a 5/6-digit `0x`/`1x`/`3x`/`4x` reference.
    BadAddress,
    /// The address's table contradicts the configured register kind.
    KindMismatch,
    /// Fewer registers (or bits) than the type needs.
    ShortRead,
    /// A bit table holds only `bool`.
    TypeNotBit,
    /// The value does not fit the type after inverse scaling.
    OutOfRange,
    /// A string's bytes are not UTF-8.
    NotUtf8,
    /// The point runs past address 65535.
    PastEnd,
}

impl core::fmt::Display for PointError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::BadAddress => "address must be 0-based (0..65535) or a reference like 40001 / 400001 (0x coils, 1x discrete inputs, 3x input registers, 4x holding registers)",
            Self::KindMismatch => "the address's reference table (0x/1x/3x/4x) is not the configured register kind",
            Self::ShortRead => "fewer registers than the data type needs",
            Self::TypeNotBit => "coils and discrete inputs hold only bool",
            Self::OutOfRange => "value out of range for the data type after scale and offset",
            Self::NotUtf8 => "string registers are not UTF-8",
            Self::PastEnd => "point runs past address 65535",
        })
    }
}

/// Parses an address: a 0-based number for `kind`, or a reference whose first digit names the
/// table (`40001` = holding register 0, `400001` likewise in the 6-digit form, `30001`,
/// `10001`, `00001`). Returns the table and the 0-based address.
pub fn parse_address(
    kind: Option<RegisterKind>,
    text: &str,
) -> Result<(RegisterKind, u16), PointError> {
    let t = text.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PointError::BadAddress);
    }
    let reference = match t.len() {
        5 | 6 => {
            let table = match t.as_bytes().first() {
                Some(b'0') => Some(RegisterKind::Coil),
                Some(b'1') => Some(RegisterKind::DiscreteInput),
                Some(b'3') => Some(RegisterKind::InputRegister),
                Some(b'4') => Some(RegisterKind::HoldingRegister),
                _ => None,
            };
            // A plain number with a configured kind wins over the reference reading when the
            // kind does not match its first digit (e.g. holding register 10000).
            match (table, kind) {
                (Some(tb), Some(k)) if tb != k => None,
                (tb, _) => tb,
            }
        }
        _ => None,
    };
    match reference {
        Some(table) => {
            let n: u32 = t
                .get(1..)
                .and_then(|r| r.parse().ok())
                .ok_or(PointError::BadAddress)?;
            if n == 0 || n > 65536 {
                return Err(PointError::BadAddress);
            }
            let addr = u16::try_from(n - 1).map_err(|_| PointError::BadAddress)?;
            Ok((table, addr))
        }
        None => {
            let k = kind.ok_or(PointError::BadAddress)?;
            let n: u16 = t.parse().map_err(|_| PointError::BadAddress)?;
            Ok((k, n))
        }
    }
}

/// Data types of a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// One bit, or one register (non-zero is true).
    Bool,
    /// One register.
    U16,
    /// One register, two's complement.
    I16,
    /// Two registers.
    U32,
    /// Two registers.
    I32,
    /// Two registers, IEEE 754.
    F32,
    /// Four registers.
    U64,
    /// Four registers.
    I64,
    /// Four registers, IEEE 754.
    F64,
    /// `n` registers of two bytes each; trailing NULs and spaces dropped.
    String(u16),
}

impl DataType {
    /// Registers (or bits) the type occupies.
    pub fn registers(self) -> u16 {
        match self {
            Self::Bool | Self::U16 | Self::I16 => 1,
            Self::U32 | Self::I32 | Self::F32 => 2,
            Self::U64 | Self::I64 | Self::F64 => 4,
            Self::String(n) => n.max(1),
        }
    }
}

/// Byte and word order of multi-register values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WordOrder {
    /// Big-endian.
    #[default]
    Abcd,
    /// Registers reversed.
    Cdab,
    /// Bytes swapped in each register.
    Badc,
    /// Little-endian.
    Dcba,
}

/// A decoded raw value, before scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Raw {
    /// A bit.
    Bool(bool),
    /// Signed integers.
    Int(i64),
    /// Unsigned integers.
    UInt(u64),
    /// Floats.
    Float(f64),
}

impl Raw {
    /// As f64 (booleans are 0 and 1).
    pub fn as_f64(self) -> f64 {
        match self {
            Raw::Bool(b) => f64::from(u8::from(b)),
            Raw::Int(i) => i as f64,
            Raw::UInt(u) => u as f64,
            Raw::Float(f) => f,
        }
    }
}

/// The big-endian bytes of `regs` in `order` (at most 8).
fn ordered(regs: &[u16], order: WordOrder, out: &mut [u8; 8]) -> usize {
    // Indexing is in bounds: i < n <= regs.len() and 2 * i + 1 < 2 * n <= 8.
    let n = regs.len().min(4);
    for i in 0..n {
        let r = match order {
            WordOrder::Abcd | WordOrder::Badc => regs[i],
            WordOrder::Cdab | WordOrder::Dcba => regs[n - 1 - i],
        };
        let [hi, lo] = r.to_be_bytes();
        let (a, b) = match order {
            WordOrder::Abcd | WordOrder::Cdab => (hi, lo),
            WordOrder::Badc | WordOrder::Dcba => (lo, hi),
        };
        out[2 * i] = a;
        out[2 * i + 1] = b;
    }
    2 * n
}

/// Decodes a numeric or bool point from its registers (for bit tables: one register per bit,
/// 0 or 1).
pub fn decode(ty: DataType, order: WordOrder, regs: &[u16]) -> Result<Raw, PointError> {
    let need = usize::from(ty.registers());
    let regs = regs.get(..need).ok_or(PointError::ShortRead)?;
    let mut b = [0u8; 8];
    ordered(regs, order, &mut b);
    Ok(match ty {
        // `regs` holds `need` >= 1 registers (checked above).
        DataType::Bool => Raw::Bool(regs[0] != 0),
        DataType::U16 => Raw::UInt(u64::from(u16::from_be_bytes([b[0], b[1]]))),
        DataType::I16 => Raw::Int(i64::from(i16::from_be_bytes([b[0], b[1]]))),
        DataType::U32 => Raw::UInt(u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::I32 => Raw::Int(i64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::F32 => Raw::Float(f64::from(f32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::U64 => Raw::UInt(u64::from_be_bytes(b)),
        DataType::I64 => Raw::Int(i64::from_be_bytes(b)),
        DataType::F64 => Raw::Float(f64::from_be_bytes(b)),
        DataType::String(_) => return Err(PointError::TypeNotBit),
    })
}

/// Decodes a string point into `out`; returns the text without trailing NULs and spaces.
pub fn decode_str<'a>(
    regs: &[u16],
    order: WordOrder,
    out: &'a mut [u8],
) -> Result<&'a str, PointError> {
    let mut n = 0;
    for r in regs {
        let [hi, lo] = r.to_be_bytes();
        let (a, b) = match order {
            WordOrder::Abcd | WordOrder::Cdab => (hi, lo),
            WordOrder::Badc | WordOrder::Dcba => (lo, hi),
        };
        for byte in [a, b] {
            let slot = out.get_mut(n).ok_or(PointError::ShortRead)?;
            *slot = byte;
            n += 1;
        }
    }
    let text = out.get(..n).ok_or(PointError::ShortRead)?;
    let end = text
        .iter()
        .rposition(|c| *c != 0 && *c != b' ')
        .map_or(0, |p| p + 1);
    core::str::from_utf8(text.get(..end).ok_or(PointError::ShortRead)?)
        .map_err(|_| PointError::NotUtf8)
}

/// `raw * scale + offset`.
pub fn scale(raw: Raw, scale: f64, offset: f64) -> f64 {
    raw.as_f64() * scale + offset
}

fn round(x: f64) -> f64 {
    // `f64::round` is not in `core`.
    let t = x as i64 as f64;
    if (x - t).abs() >= 0.5 {
        t + x.signum()
    } else {
        t
    }
}

/// Encodes an engineering value for a write: `(value - offset) / scale`, rounded for integer
/// types and range-checked, into registers in `order`. Returns the registers used.
pub fn encode(
    ty: DataType,
    order: WordOrder,
    value: f64,
    scale: f64,
    offset: f64,
    out: &mut [u16; 4],
) -> Result<usize, PointError> {
    if scale == 0.0 || !value.is_finite() {
        return Err(PointError::OutOfRange);
    }
    let raw = (value - offset) / scale;
    let int = |lo: f64, hi: f64| -> Result<f64, PointError> {
        let r = round(raw);
        if r < lo || r > hi {
            Err(PointError::OutOfRange)
        } else {
            Ok(r)
        }
    };
    let mut be = [0u8; 8];
    let n = match ty {
        DataType::Bool => {
            out[0] = u16::from(raw != 0.0);
            return Ok(1);
        }
        DataType::U16 => {
            be[..2].copy_from_slice(&(int(0.0, 65535.0)? as u16).to_be_bytes());
            2
        }
        DataType::I16 => {
            be[..2].copy_from_slice(&(int(-32768.0, 32767.0)? as i16).to_be_bytes());
            2
        }
        DataType::U32 => {
            be[..4].copy_from_slice(&(int(0.0, 4_294_967_295.0)? as u32).to_be_bytes());
            4
        }
        DataType::I32 => {
            be[..4]
                .copy_from_slice(&(int(-2_147_483_648.0, 2_147_483_647.0)? as i32).to_be_bytes());
            4
        }
        DataType::F32 => {
            if raw.abs() > f64::from(f32::MAX) {
                return Err(PointError::OutOfRange);
            }
            be[..4].copy_from_slice(&(raw as f32).to_be_bytes());
            4
        }
        DataType::U64 => {
            be.copy_from_slice(&(int(0.0, 18_446_744_073_709_551_615.0)? as u64).to_be_bytes());
            8
        }
        DataType::I64 => {
            be.copy_from_slice(
                &(int(-9_223_372_036_854_775_808.0, 9_223_372_036_854_775_807.0)? as i64)
                    .to_be_bytes(),
            );
            8
        }
        DataType::F64 => {
            be.copy_from_slice(&raw.to_be_bytes());
            8
        }
        DataType::String(_) => return Err(PointError::OutOfRange),
    };
    let regs = n / 2;
    // In bounds: n <= 8, so 2 * i + 1 < n and `at` < regs <= 4.
    // Inverse of `ordered`: place big-endian bytes back into wire registers.
    for i in 0..regs {
        let (a, b) = (be[2 * i], be[2 * i + 1]);
        let word = match order {
            WordOrder::Abcd | WordOrder::Cdab => u16::from_be_bytes([a, b]),
            WordOrder::Badc | WordOrder::Dcba => u16::from_be_bytes([b, a]),
        };
        let at = match order {
            WordOrder::Abcd | WordOrder::Badc => i,
            WordOrder::Cdab | WordOrder::Dcba => regs - 1 - i,
        };
        out[at] = word;
    }
    Ok(regs)
}

/// Modbus RTU CRC-16 (polynomial 0xA001, initial 0xFFFF); sent low byte first.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for b in bytes {
        crc ^= u16::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// One read request of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    /// Table.
    pub kind: RegisterKind,
    /// First address.
    pub start: u16,
    /// Registers (or bits).
    pub count: u16,
}

/// The reads of a device's points, and where each point lands in them.
#[cfg(feature = "alloc")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Read requests.
    pub reads: alloc::vec::Vec<Read>,
    /// For each point in input order: (index in `reads`, offset in that read).
    pub at: alloc::vec::Vec<(usize, u16)>,
}

/// Coalesces points `(kind, address, registers)` into reads: per table, sorted by address,
/// merging neighbours while the read stays within the table's limit and the hole between them
/// is at most `max_gap` (reading a small hole is cheaper than another round trip).
#[cfg(feature = "alloc")]
pub fn plan_reads(points: &[(RegisterKind, u16, u16)], max_gap: u16) -> Result<Plan, PointError> {
    use alloc::vec::Vec;
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by_key(|&i| (points[i].0, points[i].1));
    let mut reads: Vec<Read> = Vec::new();
    let mut at = alloc::vec![(0usize, 0u16); points.len()];
    for i in order {
        let (kind, start, n) = points[i];
        let end = u32::from(start) + u32::from(n.max(1));
        if end > 65536 {
            return Err(PointError::PastEnd);
        }
        let merged = match reads.last_mut() {
            Some(r) if r.kind == kind => {
                let r_end = u32::from(r.start) + u32::from(r.count);
                let new_end = end.max(r_end);
                let fits = new_end - u32::from(r.start) <= u32::from(kind.max_read());
                let near = u32::from(start) <= r_end + u32::from(max_gap);
                if fits && near {
                    r.count = u16::try_from(new_end - u32::from(r.start))
                        .map_err(|_| PointError::PastEnd)?;
                    true
                } else {
                    false
                }
            }
            _ => false,
        };
        if !merged {
            reads.push(Read {
                kind,
                start,
                count: n.max(1),
            });
        }
        let idx = reads.len() - 1;
        at[i] = (idx, start - reads[idx].start);
    }
    Ok(Plan { reads, at })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    #[test]
    fn crc_matches_the_published_frames() {
        // ../shared/vectors/modbus.toml [[rtu]]: the CRC is the last two bytes, low first.
        for frame in [
            "11 03 00 6B 00 03 76 87",
            "0A 01 04 A1 00 01 AC 63",
            "01 04 04 00 00 08 E6 7D CE",
        ] {
            let b = hex(frame);
            let (body, crc) = b.split_at(b.len() - 2);
            assert_eq!(crc16(body), u16::from_le_bytes([crc[0], crc[1]]), "{frame}");
        }
    }

    #[test]
    fn float32_vector_in_abcd_and_cdab() {
        // [[float32]] 123.456 = 0x42F6E979: ABCD registers 42F6 E979, CDAB E979 42F6.
        for (order, regs) in [
            (WordOrder::Abcd, [0x42F6, 0xE979]),
            (WordOrder::Cdab, [0xE979, 0x42F6]),
        ] {
            let Raw::Float(v) = decode(DataType::F32, order, &regs).unwrap() else {
                panic!()
            };
            assert!((v - 123.456).abs() < 1e-4, "{order:?} {v}");
            let mut out = [0u16; 4];
            assert_eq!(
                encode(DataType::F32, order, 123.456, 1.0, 0.0, &mut out).unwrap(),
                2
            );
            assert_eq!(&out[..2], &regs, "{order:?}");
        }
        // The published FC03 replies carry those registers.
        let reply = hex("01 03 04 42 F6 E9 79 80 0B");
        assert_eq!(crc16(&reply[..7]), u16::from_le_bytes([reply[7], reply[8]]));
    }

    #[test]
    fn every_type_round_trips_in_every_order() {
        let cases: &[(DataType, f64)] = &[
            (DataType::U16, 65535.0),
            (DataType::I16, -12345.0),
            (DataType::U32, 4_000_000_000.0),
            (DataType::I32, -2_000_000_000.0),
            (DataType::F32, -1.5),
            (DataType::U64, 1_234_567_890_123.0),
            (DataType::I64, -987_654_321_012.0),
            (DataType::F64, 6.02214076e23),
            (DataType::Bool, 1.0),
        ];
        for order in [
            WordOrder::Abcd,
            WordOrder::Cdab,
            WordOrder::Badc,
            WordOrder::Dcba,
        ] {
            for (ty, v) in cases {
                let mut regs = [0u16; 4];
                let n = encode(*ty, order, *v, 1.0, 0.0, &mut regs).unwrap();
                assert_eq!(n, usize::from(ty.registers()), "{ty:?}");
                let back = decode(*ty, order, &regs[..n]).unwrap().as_f64();
                assert!(
                    (back - v).abs() <= v.abs() * 1e-6,
                    "{ty:?} {order:?}: {back} != {v}"
                );
            }
        }
    }

    #[test]
    fn known_layouts_of_a_u32() {
        // 0x11223344 as wire registers in each order.
        let v = f64::from(0x1122_3344u32);
        for (order, regs) in [
            (WordOrder::Abcd, [0x1122, 0x3344]),
            (WordOrder::Cdab, [0x3344, 0x1122]),
            (WordOrder::Badc, [0x2211, 0x4433]),
            (WordOrder::Dcba, [0x4433, 0x2211]),
        ] {
            assert_eq!(
                decode(DataType::U32, order, &regs).unwrap(),
                Raw::UInt(0x1122_3344),
                "{order:?}"
            );
            let mut out = [0u16; 4];
            encode(DataType::U32, order, v, 1.0, 0.0, &mut out).unwrap();
            assert_eq!(&out[..2], &regs, "{order:?}");
        }
    }

    #[test]
    fn scale_offset_and_inverse_with_range_checks() {
        // A temperature sent as tenths of a degree with a -40 offset.
        let raw = decode(DataType::I16, WordOrder::Abcd, &[615]).unwrap();
        assert!((scale(raw, 0.1, -40.0) - 21.5).abs() < 1e-9);
        let mut out = [0u16; 4];
        encode(DataType::I16, WordOrder::Abcd, 21.5, 0.1, -40.0, &mut out).unwrap();
        assert_eq!(out[0], 615);
        assert_eq!(
            encode(DataType::U16, WordOrder::Abcd, -1.0, 1.0, 0.0, &mut out),
            Err(PointError::OutOfRange)
        );
        assert_eq!(
            encode(DataType::I16, WordOrder::Abcd, 1.0, 0.0, 0.0, &mut out),
            Err(PointError::OutOfRange)
        );
        assert_eq!(
            decode(DataType::U32, WordOrder::Abcd, &[1]),
            Err(PointError::ShortRead)
        );
    }

    #[test]
    fn strings_drop_padding_and_refuse_bad_utf8() {
        let regs = [
            u16::from_be_bytes(*b"AB"),
            u16::from_be_bytes(*b"C\0"),
            0x2020,
        ];
        let mut buf = [0u8; 16];
        assert_eq!(decode_str(&regs, WordOrder::Abcd, &mut buf).unwrap(), "ABC");
        assert_eq!(
            decode_str(&regs[..1], WordOrder::Badc, &mut buf).unwrap(),
            "BA"
        );
        assert_eq!(
            decode_str(&[0xFFFE], WordOrder::Abcd, &mut buf),
            Err(PointError::NotUtf8)
        );
        assert_eq!(
            decode_str(&regs, WordOrder::Abcd, &mut [0u8; 2]),
            Err(PointError::ShortRead)
        );
    }

    #[test]
    fn addresses_in_both_notations() {
        use RegisterKind::*;
        let h = Some(HoldingRegister);
        assert_eq!(parse_address(None, "40001"), Ok((HoldingRegister, 0)));
        assert_eq!(parse_address(None, "40108"), Ok((HoldingRegister, 107)));
        assert_eq!(parse_address(None, "400108"), Ok((HoldingRegister, 107)));
        assert_eq!(parse_address(None, "30001"), Ok((InputRegister, 0)));
        assert_eq!(parse_address(None, "10010"), Ok((DiscreteInput, 9)));
        assert_eq!(parse_address(None, "00005"), Ok((Coil, 4)));
        assert_eq!(parse_address(h, "107"), Ok((HoldingRegister, 107)));
        // A plain number of a configured kind whose first digit names another table.
        assert_eq!(parse_address(h, "10000"), Ok((HoldingRegister, 10000)));
        for bad in ["", "x1", "40000", "70001", "-1"] {
            assert_eq!(
                parse_address(None, bad),
                Err(PointError::BadAddress),
                "{bad}"
            );
        }
        assert_eq!(parse_address(h, "65536"), Err(PointError::BadAddress));
    }

    #[cfg(feature = "alloc")]
    #[test]
    fn reads_coalesce_within_limits_and_gaps() {
        use RegisterKind::*;
        let points = [
            (HoldingRegister, 10, 2),
            (HoldingRegister, 0, 1),
            (HoldingRegister, 12, 4),
            (Coil, 5, 1),
            (HoldingRegister, 200, 2),
            (Coil, 6, 1),
            (HoldingRegister, 1, 1),
        ];
        let Plan { reads, at } = plan_reads(&points, 10).unwrap();
        assert_eq!(
            reads,
            vec![
                Read {
                    kind: Coil,
                    start: 5,
                    count: 2
                },
                Read {
                    kind: HoldingRegister,
                    start: 0,
                    count: 16
                },
                Read {
                    kind: HoldingRegister,
                    start: 200,
                    count: 2
                },
            ]
        );
        assert_eq!(
            at,
            vec![(1, 10), (1, 0), (1, 12), (0, 0), (2, 0), (0, 1), (1, 1)]
        );
        // 125-register limit splits a long run.
        let many: Vec<_> = (0..130u16).map(|a| (HoldingRegister, a, 1)).collect();
        let reads = plan_reads(&many, 0).unwrap().reads;
        assert_eq!(
            reads.iter().map(|r| r.count).collect::<Vec<_>>(),
            vec![125, 5]
        );
        assert_eq!(
            plan_reads(&[(HoldingRegister, 65535, 2)], 0),
            Err(PointError::PastEnd)
        );
    }
}
