//! Landing segments: the property points of one writer batch, all series together, as one
//! row of `property_segments`. Writing a batch is then one insert instead of a row and an
//! index entry per point; the sealer turns segments into per-series chunks within seconds.
//!
//! No I/O: [`encode`] takes points in batch order, [`Segment::parse`] checks the bytes and
//! gives the points back (of every series, or of one) without copying their values.
//!
//! Layout (little-endian): `"ILS1"`, CRC-32 of the rest (u32), point count (u32), then the
//! columns: series ids (i64 each), timestamps (i64 each), the end offset of each value in
//! the text (u32 each), and the values' JSON text, one after the other.

use super::codec::CodecError;

/// What a segment's bytes start with.
const MAGIC: &[u8; 4] = b"ILS1";
/// Bytes before the columns: marker, checksum, count.
const HEADER: usize = 12;
/// Bytes per point outside the text: series id, timestamp, end offset.
const PER_POINT: usize = 20;

/// Encodes points (series id, time ms, value as JSON text). Refuses more than `u32::MAX`
/// points or bytes of text.
pub fn encode<'a>(
    points: impl ExactSizeIterator<Item = (i64, i64, &'a str)> + Clone,
) -> Result<Vec<u8>, CodecError> {
    let n = points.len();
    let text: usize = points.clone().map(|p| p.2.len()).sum();
    let count = u32::try_from(n)
        .ok()
        .filter(|_| u32::try_from(text).is_ok())
        .ok_or_else(|| CodecError::Invalid(format!("{n} points, {text} bytes: too large")))?;
    let mut out = Vec::with_capacity(HEADER + n * PER_POINT + text);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&count.to_le_bytes());
    for (sid, ..) in points.clone() {
        out.extend_from_slice(&sid.to_le_bytes());
    }
    for (_, ts, _) in points.clone() {
        out.extend_from_slice(&ts.to_le_bytes());
    }
    let mut end = 0u32;
    for (.., v) in points.clone() {
        // In range: the total was checked above.
        end = end.saturating_add(u32::try_from(v.len()).unwrap_or(u32::MAX));
        out.extend_from_slice(&end.to_le_bytes());
    }
    for (.., v) in points {
        out.extend_from_slice(v.as_bytes());
    }
    let crc = crc32fast::hash(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// A checked segment, borrowing its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    n: usize,
    sids: &'a [u8],
    ts: &'a [u8],
    ends: &'a [u8],
    text: &'a [u8],
}

fn i64_at(col: &[u8], i: usize) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&col[i * 8..i * 8 + 8]);
    i64::from_le_bytes(b)
}

fn u32_at(col: &[u8], i: usize) -> usize {
    let mut b = [0u8; 4];
    b.copy_from_slice(&col[i * 4..i * 4 + 4]);
    u32::from_le_bytes(b) as usize
}

impl<'a> Segment<'a> {
    /// Checks marker, checksum, lengths, offsets and the UTF-8 of each value.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, CodecError> {
        if bytes.len() < HEADER {
            return Err(CodecError::Truncated(bytes.len()));
        }
        if &bytes[..4] != MAGIC {
            return Err(CodecError::Magic);
        }
        if crc32fast::hash(&bytes[8..]).to_le_bytes() != bytes[4..8] {
            return Err(CodecError::Checksum);
        }
        let n = u32_at(&bytes[8..12], 0);
        let columns = n
            .checked_mul(PER_POINT)
            .and_then(|c| c.checked_add(HEADER))
            .filter(|c| *c <= bytes.len())
            .ok_or(CodecError::Truncated(bytes.len()))?;
        let (sids, rest) = bytes[HEADER..columns].split_at(n * 8);
        let (ts, ends) = rest.split_at(n * 8);
        let text = &bytes[columns..];
        let mut last = 0;
        for i in 0..n {
            let end = u32_at(ends, i);
            if end < last || end > text.len() {
                return Err(CodecError::Invalid(format!(
                    "value {i} ends at {end}, outside {last}..={}",
                    text.len()
                )));
            }
            std::str::from_utf8(&text[last..end])
                .map_err(|e| CodecError::Invalid(format!("value {i}: {e}")))?;
            last = end;
        }
        if last != text.len() {
            return Err(CodecError::Invalid(format!(
                "{} bytes of text after the last value",
                text.len() - last
            )));
        }
        Ok(Self {
            n,
            sids,
            ts,
            ends,
            text,
        })
    }

    /// Points held.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True when the segment holds no point.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The series id of point `i`.
    pub fn series(&self, i: usize) -> i64 {
        i64_at(self.sids, i)
    }

    /// Point `i`: (series id, time, JSON text). `i` < [`Segment::len`].
    pub fn point(&self, i: usize) -> (i64, i64, &'a str) {
        let start = if i == 0 { 0 } else { u32_at(self.ends, i - 1) };
        let end = u32_at(self.ends, i);
        // Checked in `parse`: offsets in order, inside the text, each value UTF-8.
        let value = std::str::from_utf8(&self.text[start..end]).unwrap_or("null");
        (self.series(i), i64_at(self.ts, i), value)
    }

    /// Every point, in batch order.
    pub fn points(&self) -> impl Iterator<Item = (i64, i64, &'a str)> + '_ {
        (0..self.n).map(|i| self.point(i))
    }

    /// The points of one series in `[from, to]`: (time, JSON text), in batch order.
    pub fn of(&self, series: i64, from: i64, to: i64) -> impl Iterator<Item = (i64, &'a str)> + '_ {
        (0..self.n)
            .filter(move |i| self.series(*i) == series)
            .map(|i| self.point(i))
            .filter(move |p| p.1 >= from && p.1 <= to)
            .map(|p| (p.1, p.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<(i64, i64, String)> {
        vec![
            (7, 1_000, "21.5".into()),
            (9, 1_000, "\"grün\"".into()),
            (7, 2_000, "{\"a\":[1,2]}".into()),
            (9, -5, "".into()),
        ]
    }

    fn bytes(p: &[(i64, i64, String)]) -> Vec<u8> {
        encode(p.iter().map(|(s, t, v)| (*s, *t, v.as_str()))).unwrap()
    }

    #[test]
    fn round_trip_of_every_point_and_of_one_series() {
        let p = sample();
        let b = bytes(&p);
        let s = Segment::parse(&b).unwrap();
        assert_eq!(s.len(), 4);
        let back: Vec<_> = s.points().map(|(a, b, c)| (a, b, c.to_owned())).collect();
        assert_eq!(back, p);
        let nine: Vec<_> = s.of(9, i64::MIN, i64::MAX).collect();
        assert_eq!(nine, [(1_000, "\"grün\""), (-5, "")]);
        let seven: Vec<_> = s.of(7, 1_500, 5_000).collect();
        assert_eq!(seven, [(2_000, "{\"a\":[1,2]}")]);
        let empty = encode(std::iter::empty::<(i64, i64, &str)>()).unwrap();
        assert!(Segment::parse(&empty).unwrap().is_empty());
    }

    #[test]
    fn damaged_bytes_are_refused_with_the_reason_never_a_panic() {
        let b = bytes(&sample());
        for cut in 0..b.len() {
            assert!(Segment::parse(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = b.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(Segment::parse(&flipped).unwrap_err(), CodecError::Checksum);
        let mut magic = b.clone();
        magic[0] = b'X';
        assert_eq!(Segment::parse(&magic).unwrap_err(), CodecError::Magic);
        // A consistent checksum over a lying count or offsets.
        let reseal = |mut v: Vec<u8>| {
            let crc = crc32fast::hash(&v[8..]);
            v[4..8].copy_from_slice(&crc.to_le_bytes());
            v
        };
        let mut count = b.clone();
        count[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Segment::parse(&reseal(count)),
            Err(CodecError::Truncated(_))
        ));
        let mut offset = b.clone();
        let ends = HEADER + 4 * 16;
        offset[ends..ends + 4].copy_from_slice(&10_000u32.to_le_bytes());
        assert!(matches!(
            Segment::parse(&reseal(offset)),
            Err(CodecError::Invalid(_))
        ));
        let mut text = b;
        let at = text.len() - 3;
        text[at] = 0xff;
        assert!(matches!(
            Segment::parse(&reseal(text)),
            Err(CodecError::Invalid(_))
        ));
    }
}
