//! Cayenne LPP (Low Power Payload) decoding into thing-model properties named
//! `{type}_{channel}` (`temperature_1`, `humidity_2`, `gps_3` as a `{lat, lon, alt}` object):
//! every data type of the published specification; an unknown type stops the decoding with an
//! error naming it (the bytes after it cannot be delimited).

use serde_json::{json, Map, Value};

/// Decodes a payload; values are JSON numbers (or objects for multi-axis sensors and GPS).
pub fn decode(b: &[u8]) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    let mut at = 0usize;
    let i16_at = |b: &[u8], i: usize| f64::from(i16::from_be_bytes([b[i], b[i + 1]]));
    let u16_at = |b: &[u8], i: usize| f64::from(u16::from_be_bytes([b[i], b[i + 1]]));
    let i24_at = |b: &[u8], i: usize| {
        let v = (i32::from(b[i]) << 16) | (i32::from(b[i + 1]) << 8) | i32::from(b[i + 2]);
        f64::from((v << 8) >> 8)
    };
    let round = |v: f64, d: i32| {
        let m = 10f64.powi(d);
        json!((v * m).round() / m)
    };
    while at < b.len() {
        let (Some(&ch), Some(&ty)) = (b.get(at), b.get(at + 1)) else {
            return Err(format!("byte {at}: a channel without a type"));
        };
        let (name, len) = match ty {
            0 => ("digital_in", 1),
            1 => ("digital_out", 1),
            2 => ("analog_in", 2),
            3 => ("analog_out", 2),
            101 => ("illuminance", 2),
            102 => ("presence", 1),
            103 => ("temperature", 2),
            104 => ("humidity", 1),
            113 => ("accelerometer", 6),
            115 => ("barometer", 2),
            134 => ("gyrometer", 6),
            136 => ("gps", 9),
            other => return Err(format!("byte {}: unknown LPP type {other}", at + 1)),
        };
        let d = b
            .get(at + 2..at + 2 + len)
            .ok_or_else(|| format!("byte {at}: {name} needs {len} bytes"))?;
        let v = match ty {
            0 | 1 | 102 => json!(d[0]),
            2 | 3 => round(i16_at(d, 0) / 100.0, 2),
            101 => json!(u16_at(d, 0) as u32),
            103 => round(i16_at(d, 0) / 10.0, 1),
            104 => round(f64::from(d[0]) / 2.0, 1),
            113 => {
                json!({"x": round(i16_at(d, 0) / 1000.0, 3), "y": round(i16_at(d, 2) / 1000.0, 3), "z": round(i16_at(d, 4) / 1000.0, 3)})
            }
            115 => round(u16_at(d, 0) / 10.0, 1),
            134 => {
                json!({"x": round(i16_at(d, 0) / 100.0, 2), "y": round(i16_at(d, 2) / 100.0, 2), "z": round(i16_at(d, 4) / 100.0, 2)})
            }
            _ => {
                json!({"lat": round(i24_at(d, 0) / 10_000.0, 4), "lon": round(i24_at(d, 3) / 10_000.0, 4), "alt": round(i24_at(d, 6) / 100.0, 2)})
            }
        };
        out.insert(format!("{name}_{ch}"), v);
        at += 2 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Examples from the Cayenne LPP documentation.
    #[test]
    fn documented_examples() {
        // Device with 2 temperature sensors: 03 67 01 10 05 67 00 FF
        let v = decode(&[0x03, 0x67, 0x01, 0x10, 0x05, 0x67, 0x00, 0xFF]).unwrap();
        assert_eq!(v["temperature_3"], json!(27.2));
        assert_eq!(v["temperature_5"], json!(25.5));
        // Accelerometer: 06 71 04 D2 FB 2E 00 00
        let v = decode(&[0x06, 0x71, 0x04, 0xD2, 0xFB, 0x2E, 0x00, 0x00]).unwrap();
        assert_eq!(
            v["accelerometer_6"],
            json!({"x": 1.234, "y": -1.234, "z": 0.0})
        );
        // GPS: 01 88 06 76 5F F2 96 0A 00 03 E8
        let v = decode(&[
            0x01, 0x88, 0x06, 0x76, 0x5F, 0xF2, 0x96, 0x0A, 0x00, 0x03, 0xE8,
        ])
        .unwrap();
        assert_eq!(
            v["gps_1"],
            json!({"lat": 42.3519, "lon": -87.9094, "alt": 10.0})
        );
        // Humidity and negative temperature.
        let v = decode(&[0x02, 0x68, 0x5A, 0x01, 0x67, 0xFF, 0xD7]).unwrap();
        assert_eq!(v["humidity_2"], json!(45.0));
        assert_eq!(v["temperature_1"], json!(-4.1));
    }

    #[test]
    fn bad_payloads_name_the_byte() {
        assert!(decode(&[0x01]).unwrap_err().contains("byte 0"));
        assert!(decode(&[0x01, 0x99, 0])
            .unwrap_err()
            .contains("unknown LPP type 153"));
        assert!(decode(&[0x01, 0x67, 0x01])
            .unwrap_err()
            .contains("needs 2 bytes"));
        assert!(decode(&[]).unwrap().is_empty());
    }
}
