//! The chunk codec: the points of one series (device, property) as compressed columns.
//!
//! No I/O and no clock: [`encode`] takes points sorted by time and returns the bytes and the
//! chunk's statistics; [`decode`] takes bytes and returns the points, or says what is wrong.
//!
//! Layout (all integers little-endian, `v` = LEB128 varint):
//! `"ILT1"`, CRC-32 of the rest (u32), `v` point count, `v` length + pco of the timestamps
//! (i64, pco picks delta orders itself), then the value column:
//! - `1` integers: `v` length + pco (i64) — TSL int, enum, and bool sent as 0/1;
//! - `2` floats: `v` length + pco (f64) — TSL float and double (an integer among floats
//!   comes back as a float: `25` as `25.0`);
//! - `3` JSON booleans: one bit each;
//! - `4` text: `v` length + zstd of (`v` length + UTF-8) per value — TSL text and date;
//! - `5` JSON text of each value, zstd like text: whatever the typed columns cannot hold
//!   exactly (nulls, empty objects or arrays, one member with values of several kinds);
//! - `6` struct or array: `v` column count, then per column its path (`v` segments, each
//!   `0` + `v` length + key or `1` + `v` index), presence (`0` every point, `1` + one bit per
//!   point) and the column (kinds 1–5) over the points that have it.

use serde_json::{Map, Number, Value};
use std::collections::BTreeMap;

/// What a chunk's bytes start with.
const MAGIC: &[u8; 4] = b"ILT1";
/// zstd level for text columns: fast to write, most of the gain of higher levels.
const ZSTD_LEVEL: i32 = 3;
/// Points in one chunk at most (a decoder refuses a count above it before allocating).
pub const MAX_POINTS: usize = 1 << 20;

/// Why a chunk could not be decoded (or, rarely, encoded).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The bytes do not start with the chunk marker.
    #[error("not a chunk (bad marker)")]
    Magic,
    /// The checksum does not match: the bytes were damaged.
    #[error("checksum mismatch: the chunk is damaged")]
    Checksum,
    /// The bytes end before a field.
    #[error("truncated at byte {0}")]
    Truncated(usize),
    /// A field holds a value the format does not allow.
    #[error("invalid chunk: {0}")]
    Invalid(String),
    /// pco or zstd refused the data.
    #[error("compression: {0}")]
    Compression(String),
}

/// Statistics kept beside a chunk so that aggregates over whole chunks need no decoding.
/// Numeric figures are present when every value is a number or a boolean (true = 1).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Stats {
    /// Points.
    pub count: usize,
    /// First and last timestamps, ms.
    pub start: i64,
    /// Last timestamp, ms.
    pub end: i64,
    /// Smallest value.
    pub min: Option<f64>,
    /// Largest value.
    pub max: Option<f64>,
    /// Sum of the values.
    pub sum: Option<f64>,
    /// Value of the first point.
    pub first: Option<f64>,
    /// Value of the last point.
    pub last: Option<f64>,
}

/// One segment of a member's path inside a struct or array value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Seg {
    Key(String),
    Index(usize),
}

/// The typed values of one column.
#[derive(Debug, Clone, PartialEq)]
enum Column {
    Int(Vec<i64>),
    Float(Vec<f64>),
    Bool(Vec<bool>),
    Text(Vec<String>),
    Json(Vec<String>),
}

/// A stored value's JSON text as a value; text that is not JSON (written by hand, or by an
/// older version) stands as a string rather than failing the read.
pub fn stored_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// The value as a number where it is one (booleans count as 0/1).
pub fn numeric(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
}

/// Encodes points sorted by time (ties in any order) into a chunk.
pub fn encode(points: &[(i64, Value)]) -> Result<(Vec<u8>, Stats), CodecError> {
    if points.is_empty() || points.len() > MAX_POINTS {
        return Err(CodecError::Invalid(format!(
            "a chunk holds 1 to {MAX_POINTS} points, not {}",
            points.len()
        )));
    }
    let ts: Vec<i64> = points.iter().map(|p| p.0).collect();
    let values: Vec<&Value> = points.iter().map(|p| &p.1).collect();
    let mut body = Vec::new();
    put_varint(&mut body, points.len() as u64);
    put_blob(&mut body, &pco_ints(&ts)?);
    match scalar_column(&values).or_else(|| flatten(&values)) {
        Some(Shape::Scalar(col)) => put_column(&mut body, &col)?,
        Some(Shape::Struct(cols)) => {
            body.push(6);
            put_varint(&mut body, cols.len() as u64);
            for (path, present, col) in &cols {
                put_varint(&mut body, path.len() as u64);
                for seg in path {
                    match seg {
                        Seg::Key(k) => {
                            body.push(0);
                            put_blob(&mut body, k.as_bytes());
                        }
                        Seg::Index(i) => {
                            body.push(1);
                            put_varint(&mut body, *i as u64);
                        }
                    }
                }
                match present {
                    None => body.push(0),
                    Some(bits) => {
                        body.push(1);
                        body.extend_from_slice(&pack_bits(bits));
                    }
                }
                put_column(&mut body, col)?;
            }
        }
        None => put_column(
            &mut body,
            &Column::Json(values.iter().map(|v| v.to_string()).collect()),
        )?,
    }
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok((out, stats(points)))
}

/// Statistics of points sorted by time.
pub fn stats(points: &[(i64, Value)]) -> Stats {
    let mut s = Stats {
        count: points.len(),
        start: points.first().map_or(0, |p| p.0),
        end: points.last().map_or(0, |p| p.0),
        ..Stats::default()
    };
    let nums: Option<Vec<f64>> = points.iter().map(|p| numeric(&p.1)).collect();
    if let Some(nums) = nums.filter(|n| !n.is_empty()) {
        s.min = nums.iter().copied().reduce(f64::min);
        s.max = nums.iter().copied().reduce(f64::max);
        s.sum = Some(nums.iter().sum());
        s.first = nums.first().copied();
        s.last = nums.last().copied();
    }
    s
}

/// Checks the marker and checksum, reads the count and the timestamps.
fn open(bytes: &[u8]) -> Result<(Reader<'_>, usize, Vec<i64>), CodecError> {
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(CodecError::Magic);
    }
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let body = &bytes[8..];
    if crc32fast::hash(body) != crc {
        return Err(CodecError::Checksum);
    }
    let mut r = Reader { buf: body, pos: 0 };
    let n = r.count(MAX_POINTS)?;
    let ts: Vec<i64> = unpco(r.blob()?)?;
    if ts.len() != n {
        return Err(CodecError::Invalid(format!(
            "{} timestamps for {n} points",
            ts.len()
        )));
    }
    Ok((r, n, ts))
}

/// Timestamps (ms) and values of a chunk of numbers.
pub type Numbers = (Vec<i64>, Vec<f64>);

/// Timestamps and values of a chunk of numbers or booleans (true = 1) without building JSON
/// values, for aggregates; `None` for chunks of other values.
pub fn decode_numbers(bytes: &[u8]) -> Result<Option<Numbers>, CodecError> {
    let (mut r, n, ts) = open(bytes)?;
    let kind = r.byte()?;
    let values: Vec<f64> = match kind {
        1..=3 => match read_column(&mut r, kind, n)? {
            Column::Int(v) => v.into_iter().map(|i| i as f64).collect(),
            Column::Float(v) => v,
            Column::Bool(v) => v.into_iter().map(|b| f64::from(u8::from(b))).collect(),
            _ => return Ok(None),
        },
        _ => return Ok(None),
    };
    Ok(Some((ts, values)))
}

/// Decodes a chunk into its points, in time order.
pub fn decode(bytes: &[u8]) -> Result<Vec<(i64, Value)>, CodecError> {
    let (mut r, n, ts) = open(bytes)?;
    let values = match r.byte()? {
        6 => {
            let ncols = r.count(n.saturating_mul(64).max(1))?;
            let mut rows: Vec<Option<Value>> = vec![None; n];
            for _ in 0..ncols {
                let nseg = r.count(64)?;
                let mut path = Vec::with_capacity(nseg);
                for _ in 0..nseg {
                    path.push(match r.byte()? {
                        0 => Seg::Key(r.text()?),
                        1 => Seg::Index(r.count(MAX_POINTS)?),
                        t => return Err(CodecError::Invalid(format!("path segment kind {t}"))),
                    });
                }
                let present: Vec<bool> = match r.byte()? {
                    0 => vec![true; n],
                    1 => unpack_bits(r.take(n.div_ceil(8))?, n),
                    t => return Err(CodecError::Invalid(format!("presence kind {t}"))),
                };
                let have = present.iter().filter(|p| **p).count();
                let kind = r.byte()?;
                let col = read_column(&mut r, kind, have)?;
                let mut vals = column_values(col).into_iter();
                for (row, _) in rows.iter_mut().zip(&present).filter(|(_, p)| **p) {
                    let v = vals.next().ok_or_else(|| {
                        CodecError::Invalid("column shorter than presence".into())
                    })?;
                    let slot = row.get_or_insert_with(|| container(&path));
                    set_path(slot, &path, v)?;
                }
            }
            rows.into_iter()
                .map(|r| r.ok_or_else(|| CodecError::Invalid("a point has no member".into())))
                .collect::<Result<Vec<_>, _>>()?
        }
        kind => column_values(read_column(&mut r, kind, n)?),
    };
    if values.len() != n {
        return Err(CodecError::Invalid(format!(
            "{} values for {n} points",
            values.len()
        )));
    }
    if r.pos != r.buf.len() {
        return Err(CodecError::Invalid(format!(
            "{} bytes after the last column",
            r.buf.len() - r.pos
        )));
    }
    Ok(ts.into_iter().zip(values).collect())
}

enum Shape {
    Scalar(Column),
    Struct(Vec<(Vec<Seg>, Option<Vec<bool>>, Column)>),
}

/// Kind of a scalar leaf: 0 integer, 1 float, 2 boolean, 3 text.
fn leaf_kind(v: &Value) -> Option<u8> {
    match v {
        Value::Number(n) if n.is_i64() => Some(0),
        // u64 above i64::MAX has no exact typed home.
        Value::Number(n) if n.is_f64() => Some(1),
        Value::Bool(_) => Some(2),
        Value::String(_) => Some(3),
        _ => None,
    }
}

/// One typed column for values that are all scalars of compatible kinds.
fn typed(values: &[&Value]) -> Option<Column> {
    let mut kinds = [false; 4];
    for v in values {
        kinds[usize::from(leaf_kind(v)?)] = true;
    }
    Some(match kinds {
        [true, false, false, false] => {
            Column::Int(values.iter().filter_map(|v| v.as_i64()).collect())
        }
        [_, true, false, false] => {
            Column::Float(values.iter().filter_map(|v| v.as_f64()).collect())
        }
        [false, false, true, false] => {
            Column::Bool(values.iter().filter_map(|v| v.as_bool()).collect())
        }
        [false, false, false, true] => Column::Text(
            values
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
        ),
        _ => return None,
    })
}

fn scalar_column(values: &[&Value]) -> Option<Shape> {
    typed(values).map(Shape::Scalar)
}

/// Struct and array values as one typed column per member path; `None` when a value cannot be
/// rebuilt from its leaves (null, an empty container, a scalar among containers, mixed kinds).
fn flatten(values: &[&Value]) -> Option<Shape> {
    let n = values.len();
    let mut cols: BTreeMap<Vec<Seg>, (Vec<bool>, Vec<&Value>)> = BTreeMap::new();
    let top_is_object = values.first().map(|v| v.is_object())?;
    for (i, v) in values.iter().enumerate() {
        match v {
            Value::Object(_) if top_is_object => {}
            Value::Array(_) if !top_is_object => {}
            _ => return None,
        }
        let mut path = Vec::new();
        if !leaves(v, &mut path, &mut |p, leaf| {
            let e = cols
                .entry(p.to_vec())
                .or_insert_with(|| (vec![false; n], Vec::new()));
            e.0[i] = true;
            e.1.push(leaf);
        }) {
            return None;
        }
    }
    let mut out = Vec::with_capacity(cols.len());
    for (path, (present, vals)) in cols {
        let col = typed(&vals)?;
        let present = (!present.iter().all(|p| *p)).then_some(present);
        out.push((path, present, col));
    }
    Some(Shape::Struct(out))
}

/// Calls `f` for each scalar leaf; false on a null or an empty container.
fn leaves<'a>(v: &'a Value, path: &mut Vec<Seg>, f: &mut impl FnMut(&[Seg], &'a Value)) -> bool {
    match v {
        Value::Object(m) if !m.is_empty() => m.iter().all(|(k, x)| {
            path.push(Seg::Key(k.clone()));
            let ok = leaves(x, path, f);
            path.pop();
            ok
        }),
        Value::Array(a) if !a.is_empty() => a.iter().enumerate().all(|(i, x)| {
            path.push(Seg::Index(i));
            let ok = leaves(x, path, f);
            path.pop();
            ok
        }),
        Value::Null | Value::Object(_) | Value::Array(_) => false,
        _ => {
            f(path, v);
            true
        }
    }
}

fn container(path: &[Seg]) -> Value {
    match path.first() {
        Some(Seg::Index(_)) => Value::Array(Vec::new()),
        _ => Value::Object(Map::new()),
    }
}

/// Puts `leaf` at `path` inside `slot`, creating containers on the way. Array members arrive
/// in index order (paths are sorted), so an index is always the next element or an existing one.
fn set_path(slot: &mut Value, path: &[Seg], leaf: Value) -> Result<(), CodecError> {
    let Some((seg, rest)) = path.split_first() else {
        *slot = leaf;
        return Ok(());
    };
    let next = || match rest.first() {
        None => Value::Null,
        Some(Seg::Index(_)) => Value::Array(Vec::new()),
        Some(Seg::Key(_)) => Value::Object(Map::new()),
    };
    let child = match (seg, slot) {
        (Seg::Key(k), Value::Object(m)) => m.entry(k.clone()).or_insert_with(next),
        (Seg::Index(i), Value::Array(a)) => {
            if *i == a.len() {
                a.push(next());
            }
            a.get_mut(*i)
                .ok_or_else(|| CodecError::Invalid(format!("array member {i} out of order")))?
        }
        _ => return Err(CodecError::Invalid("a path crosses a scalar".into())),
    };
    set_path(child, rest, leaf)
}

fn column_values(col: Column) -> Vec<Value> {
    match col {
        Column::Int(v) => v.into_iter().map(Value::from).collect(),
        Column::Float(v) => v
            .into_iter()
            .map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number))
            .collect(),
        Column::Bool(v) => v.into_iter().map(Value::Bool).collect(),
        Column::Text(v) => v.into_iter().map(Value::String).collect(),
        Column::Json(v) => v.into_iter().map(|t| stored_value(&t)).collect(),
    }
}

fn put_column(out: &mut Vec<u8>, col: &Column) -> Result<(), CodecError> {
    match col {
        Column::Int(v) => {
            out.push(1);
            put_blob(out, &pco_ints(v)?);
        }
        Column::Float(v) => {
            out.push(2);
            let bytes = pco::standalone::simple_compress(v, &pco::ChunkConfig::default())
                .map_err(|e| CodecError::Compression(e.to_string()))?;
            put_blob(out, &bytes);
        }
        Column::Bool(v) => {
            out.push(3);
            out.extend_from_slice(&pack_bits(v));
        }
        Column::Text(v) | Column::Json(v) => {
            out.push(if matches!(col, Column::Text(_)) { 4 } else { 5 });
            let mut raw = Vec::new();
            for s in v {
                put_blob(&mut raw, s.as_bytes());
            }
            let z = zstd::bulk::compress(&raw, ZSTD_LEVEL)
                .map_err(|e| CodecError::Compression(e.to_string()))?;
            put_varint(out, raw.len() as u64);
            put_blob(out, &z);
        }
    }
    Ok(())
}

fn read_column(r: &mut Reader<'_>, kind: u8, n: usize) -> Result<Column, CodecError> {
    let col = match kind {
        1 => Column::Int(unpco(r.blob()?)?),
        2 => Column::Float(unpco(r.blob()?)?),
        3 => Column::Bool(unpack_bits(r.take(n.div_ceil(8))?, n)),
        4 | 5 => {
            // Bounded before inflating: a point's text is at most what one message can carry.
            let raw_len = r.count(n.saturating_mul(1 << 20).max(1))?;
            let raw = zstd::bulk::decompress(r.blob()?, raw_len)
                .map_err(|e| CodecError::Compression(e.to_string()))?;
            let mut t = Reader { buf: &raw, pos: 0 };
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(t.text()?);
            }
            if kind == 4 {
                Column::Text(v)
            } else {
                Column::Json(v)
            }
        }
        k => return Err(CodecError::Invalid(format!("column kind {k}"))),
    };
    let len = match &col {
        Column::Int(v) => v.len(),
        Column::Float(v) => v.len(),
        Column::Bool(v) => v.len(),
        Column::Text(v) | Column::Json(v) => v.len(),
    };
    if len != n {
        return Err(CodecError::Invalid(format!(
            "column of {len} values where {n} are present"
        )));
    }
    Ok(col)
}

fn pco_ints(v: &[i64]) -> Result<Vec<u8>, CodecError> {
    pco::standalone::simple_compress(v, &pco::ChunkConfig::default())
        .map_err(|e| CodecError::Compression(e.to_string()))
}

fn unpco<T: pco::data_types::Number>(bytes: &[u8]) -> Result<Vec<T>, CodecError> {
    pco::standalone::simple_decompress(bytes).map_err(|e| CodecError::Compression(e.to_string()))
}

fn pack_bits(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, b) in bits.iter().enumerate() {
        if *b {
            if let Some(byte) = out.get_mut(i / 8) {
                *byte |= 1 << (i % 8);
            }
        }
    }
    out
}

fn unpack_bits(bytes: &[u8], n: usize) -> Vec<bool> {
    (0..n)
        .map(|i| bytes.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
        .collect()
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_blob(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Reads fields with a length check before each.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, CodecError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(CodecError::Truncated(self.pos))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, CodecError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CodecError::Invalid("varint longer than 64 bits".into()))
    }

    /// A count or length no larger than `max`.
    fn count(&mut self, max: usize) -> Result<usize, CodecError> {
        let at = self.pos;
        let v = self.varint()?;
        usize::try_from(v)
            .ok()
            .filter(|v| *v <= max)
            .ok_or_else(|| CodecError::Invalid(format!("count {v} at byte {at} above {max}")))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], CodecError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|e| *e <= self.buf.len())
            .ok_or(CodecError::Truncated(self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn blob(&mut self) -> Result<&'a [u8], CodecError> {
        let len = self.count(self.buf.len())?;
        self.take(len)
    }

    fn text(&mut self) -> Result<String, CodecError> {
        let at = self.pos;
        String::from_utf8(self.blob()?.to_vec())
            .map_err(|_| CodecError::Invalid(format!("text at byte {at} is not UTF-8")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn points(values: Vec<Value>) -> Vec<(i64, Value)> {
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| (1_700_000_000_000 + i as i64 * 1000, v))
            .collect()
    }

    fn round_trip(values: Vec<Value>) -> Vec<(i64, Value)> {
        let p = points(values);
        let (bytes, s) = encode(&p).unwrap();
        assert_eq!(s.count, p.len());
        let back = decode(&bytes).unwrap();
        assert_eq!(back.len(), p.len());
        for (a, b) in p.iter().zip(&back) {
            assert_eq!(a.0, b.0);
        }
        back
    }

    #[test]
    fn every_tsl_type_comes_back() {
        // int, enum, bool (Alink sends 0/1), float, double, text, date, struct, array, and
        // JSON booleans.
        let cases: Vec<Vec<Value>> = vec![
            (0..500).map(|i| json!(i * 3 - 700)).collect(),
            (0..500).map(|i| json!(i % 4)).collect(),
            (0..500).map(|i| json!(i % 2)).collect(),
            (0..500).map(|i| json!(20.0 + f64::from(i) * 0.01)).collect(),
            (0..500).map(|i| json!(f64::from(i).sin() * 1e-3)).collect(),
            (0..500).map(|i| json!(format!("state-{}", i % 7))).collect(),
            (0..500).map(|i| json!(format!("{}", 1_700_000_000_000i64 + i))).collect(),
            (0..500)
                .map(|i| json!({"lat": 30.0 + f64::from(i) * 1e-5, "lon": 120.5, "fix": i % 3, "name": "gps"}))
                .collect(),
            (0..500).map(|i| json!([i, i + 1, i + 2])).collect(),
            (0..500).map(|i| json!(i % 3 == 0)).collect(),
            (0..500)
                .map(|i| json!({"a": {"b": [1.5, i], "c": "x"}, "d": [{"e": true}]}))
                .collect(),
        ];
        for values in cases {
            let back = round_trip(values.clone());
            for (want, (_, got)) in values.iter().zip(&back) {
                assert_eq!(want, got, "{want} came back as {got}");
            }
        }
    }

    #[test]
    fn integers_among_floats_come_back_as_equal_floats() {
        let p = points(vec![json!(25), json!(25.5), json!(-3)]);
        let (ts, nums) = decode_numbers(&encode(&p).unwrap().0).unwrap().unwrap();
        assert_eq!((ts.len(), nums), (3, vec![25.0, 25.5, -3.0]));
        let back = round_trip(vec![json!(25), json!(25.5), json!(-3)]);
        let got: Vec<f64> = back.iter().filter_map(|p| p.1.as_f64()).collect();
        assert_eq!(got, vec![25.0, 25.5, -3.0]);
    }

    #[test]
    fn values_the_columns_cannot_hold_are_kept_as_json() {
        let values = vec![
            json!(null),
            json!({}),
            json!([]),
            json!(1),
            json!("x"),
            json!({"a": null}),
            json!(u64::MAX),
        ];
        assert_eq!(
            round_trip(values.clone())
                .into_iter()
                .map(|p| p.1)
                .collect::<Vec<_>>(),
            values
        );
        // A member with values of two kinds.
        let values = vec![json!({"a": 1}), json!({"a": "one"}), json!({"b": true})];
        assert_eq!(
            round_trip(values.clone())
                .into_iter()
                .map(|p| p.1)
                .collect::<Vec<_>>(),
            values
        );
    }

    #[test]
    fn members_missing_from_some_points_stay_missing() {
        let values = vec![
            json!({"a": 1, "b": 2}),
            json!({"a": 3}),
            json!({"b": 4, "c": [1, 2]}),
            json!({"c": [3]}),
        ];
        let back: Vec<Value> = round_trip(values.clone())
            .into_iter()
            .map(|p| p.1)
            .collect();
        assert_eq!(back, values);
    }

    #[test]
    fn stats_summarise_numbers_and_booleans_only() {
        let p = points(vec![json!(3), json!(1.5), json!(true), json!(-2)]);
        let s = stats(&p);
        assert_eq!(
            (s.count, s.min, s.max, s.sum, s.first, s.last),
            (4, Some(-2.0), Some(3.0), Some(3.5), Some(3.0), Some(-2.0))
        );
        assert_eq!(s.start, p[0].0);
        assert_eq!(s.end, p[3].0);
        let s = stats(&points(vec![json!(1), json!("x")]));
        assert_eq!((s.count, s.min, s.sum), (2, None, None));
    }

    #[test]
    fn regular_timestamps_and_smooth_values_are_small() {
        let p: Vec<(i64, Value)> = (0..4096)
            .map(|i| {
                (
                    1_700_000_000_000 + i * 1000,
                    json!(
                        (f64::from(i as i32) / 300.0)
                            .sin()
                            .mul_add(10.0, 20.0)
                            .round()
                            / 1.0
                    ),
                )
            })
            .collect();
        let (bytes, _) = encode(&p).unwrap();
        assert!(bytes.len() < 4096, "{} bytes for 4096 points", bytes.len());
    }

    #[test]
    fn damaged_chunks_are_refused_without_panic() {
        let p = points((0..300).map(|i| json!({"x": i, "t": "a"})).collect());
        let (bytes, _) = encode(&p).unwrap();
        assert_eq!(decode(b"nope"), Err(CodecError::Magic));
        for cut in [8, 9, 20, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x40;
        assert_eq!(decode(&flipped), Err(CodecError::Checksum));
        // A body that passes the checksum but lies about its counts.
        for body in [
            vec![0xff, 0xff, 0xff, 0xff, 0x0f],
            vec![2, 1, 0],
            vec![1, 0, 9],
        ] {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
            b.extend_from_slice(&body);
            assert!(decode(&b).is_err());
        }
        assert!(encode(&[]).is_err());
        assert!(decode_numbers(&flipped).is_err());
    }
}
