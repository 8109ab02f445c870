//! A declarative byte layout for LoRa payloads: each field an identifier, a byte offset, a
//! type, an endianness and a scale, decoded into thing-model properties; and the same layout
//! encodes a property set into a downlink payload (fields absent from the set are zero).

use serde::Deserialize;
use serde_json::{json, Map, Value};

/// One field.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// Thing-model property identifier.
    pub identifier: String,
    /// Byte offset in the payload.
    pub offset: usize,
    /// `u8`, `i8`, `u16`, `i16`, `u32`, `i32`, `f32` or `bool` (one byte, non-zero is true).
    #[serde(rename = "type")]
    pub kind: String,
    /// `big` (default) or `little`.
    #[serde(default)]
    pub endian: Option<String>,
    /// Engineering value = raw * scale.
    #[serde(default = "one")]
    pub scale: f64,
}

fn one() -> f64 {
    1.0
}

impl Field {
    fn width(&self) -> Option<usize> {
        Some(match self.kind.as_str() {
            "u8" | "i8" | "bool" => 1,
            "u16" | "i16" => 2,
            "u32" | "i32" | "f32" => 4,
            _ => return None,
        })
    }

    fn little(&self) -> bool {
        self.endian.as_deref() == Some("little")
    }

    /// Checks the field; the message names it.
    pub fn check(&self) -> Result<(), String> {
        if self.width().is_none() {
            return Err(format!(
                "layout `{}`: type `{}` is not u8, i8, u16, i16, u32, i32, f32 or bool",
                self.identifier, self.kind
            ));
        }
        if !matches!(self.endian.as_deref(), None | Some("big") | Some("little")) {
            return Err(format!(
                "layout `{}`: endian is big or little",
                self.identifier
            ));
        }
        if self.scale == 0.0 || !self.scale.is_finite() {
            return Err(format!(
                "layout `{}`: scale must be a non-zero number",
                self.identifier
            ));
        }
        Ok(())
    }
}

/// Decodes a payload; a field past its end is an error naming it.
pub fn decode(fields: &[Field], b: &[u8]) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for f in fields {
        let w = f
            .width()
            .ok_or_else(|| format!("layout `{}`: bad type", f.identifier))?;
        let raw = b.get(f.offset..f.offset + w).ok_or_else(|| {
            format!(
                "layout `{}`: bytes {}..{} past the payload's {}",
                f.identifier,
                f.offset,
                f.offset + w,
                b.len()
            )
        })?;
        let mut bytes = [0u8; 4];
        bytes[..w].copy_from_slice(raw);
        if f.little() {
            bytes[..w].reverse();
        }
        let be = &bytes[..w];
        let v: f64 = match f.kind.as_str() {
            "bool" => {
                out.insert(f.identifier.clone(), json!(u8::from(be[0] != 0)));
                continue;
            }
            "u8" => f64::from(be[0]),
            "i8" => f64::from(be[0] as i8),
            "u16" => f64::from(u16::from_be_bytes([be[0], be[1]])),
            "i16" => f64::from(i16::from_be_bytes([be[0], be[1]])),
            "u32" => f64::from(u32::from_be_bytes([be[0], be[1], be[2], be[3]])),
            "i32" => f64::from(i32::from_be_bytes([be[0], be[1], be[2], be[3]])),
            _ => f64::from(f32::from_be_bytes([be[0], be[1], be[2], be[3]])),
        };
        let scaled = v * f.scale;
        out.insert(
            f.identifier.clone(),
            if scaled.fract() == 0.0 && scaled.abs() < 9e15 {
                json!(scaled as i64)
            } else {
                json!((scaled * 1e9).round() / 1e9)
            },
        );
    }
    Ok(out)
}

/// Encodes a property set with the layout: every named property must be a field and fit its
/// type after scaling; the payload is as long as the layout's last byte.
pub fn encode(fields: &[Field], set: &Map<String, Value>) -> Result<Vec<u8>, String> {
    let len = fields
        .iter()
        .filter_map(|f| f.width().map(|w| f.offset + w))
        .max()
        .unwrap_or(0);
    let mut out = vec![0u8; len];
    for (k, v) in set {
        let f = fields
            .iter()
            .find(|f| &f.identifier == k)
            .ok_or_else(|| format!("{k}: not in the downlink layout"))?;
        let x = match v {
            Value::Bool(b) => f64::from(u8::from(*b)),
            v => v.as_f64().ok_or_else(|| format!("{k}: a number"))?,
        } / f.scale;
        let w = f.width().unwrap_or(1);
        let fits = |lo: f64, hi: f64| {
            if (lo..=hi).contains(&x.round()) {
                Ok(x.round())
            } else {
                Err(format!("{k}: {v} does not fit {}", f.kind))
            }
        };
        let mut bytes: Vec<u8> = match f.kind.as_str() {
            "u8" | "bool" => vec![fits(0.0, 255.0)? as u8],
            "i8" => vec![fits(-128.0, 127.0)? as i8 as u8],
            "u16" => (fits(0.0, 65_535.0)? as u16).to_be_bytes().to_vec(),
            "i16" => (fits(-32_768.0, 32_767.0)? as i16).to_be_bytes().to_vec(),
            "u32" => (fits(0.0, 4_294_967_295.0)? as u32).to_be_bytes().to_vec(),
            "i32" => (fits(-2_147_483_648.0, 2_147_483_647.0)? as i32)
                .to_be_bytes()
                .to_vec(),
            _ => (x as f32).to_be_bytes().to_vec(),
        };
        if f.little() {
            bytes.reverse();
        }
        out[f.offset..f.offset + w].copy_from_slice(&bytes);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Vec<Field> {
        let f = |id: &str, offset, kind: &str, endian: Option<&str>, scale| Field {
            identifier: id.into(),
            offset,
            kind: kind.into(),
            endian: endian.map(str::to_owned),
            scale,
        };
        vec![
            f("temperature", 0, "i16", None, 0.01),
            f("battery", 2, "u8", None, 0.1),
            f("count", 3, "u32", Some("little"), 1.0),
            f("valve", 7, "bool", None, 1.0),
        ]
    }

    #[test]
    fn decode_and_encode_are_inverse() {
        let b = [0xF8, 0x30, 0x24, 0x10, 0x27, 0, 0, 1];
        let v = decode(&fields(), &b).unwrap();
        assert_eq!(
            v["temperature"],
            json!(-20),
            "whole values are JSON integers"
        );
        assert_eq!(v["battery"], json!(3.6));
        assert_eq!(v["count"], json!(10_000));
        assert_eq!(v["valve"], json!(1));
        assert_eq!(encode(&fields(), &v).unwrap(), b);
        let set: Map<String, Value> = serde_json::from_value(json!({"valve": true})).unwrap();
        assert_eq!(encode(&fields(), &set).unwrap(), [0, 0, 0, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn errors_name_the_field() {
        assert!(decode(&fields(), &[0; 4]).unwrap_err().contains("count"));
        let set: Map<String, Value> = serde_json::from_value(json!({"battery": 99.0})).unwrap();
        assert!(encode(&fields(), &set)
            .unwrap_err()
            .contains("does not fit u8"));
        let set: Map<String, Value> = serde_json::from_value(json!({"nope": 1})).unwrap();
        assert!(encode(&fields(), &set)
            .unwrap_err()
            .contains("not in the downlink layout"));
        let mut bad = fields();
        bad[0].kind = "u64".into();
        assert!(bad[0].check().is_err());
    }
}
