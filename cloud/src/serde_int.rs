//! Whole numbers in JSON bodies: `1`, `1.0` and `1e3` alike (JSON Schema's `integer`), out of
//! range refused with the value. Shared by the API's bodies and the domain types it takes.

use serde::de::Error;
use serde::{Deserialize, Deserializer};

fn whole<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i128>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    n.as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e18)
                .map(|f| f as i128)
        })
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("{n} is not a whole number")))
}

/// An optional whole number (absent or null is `None`).
pub fn opt<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<Option<T>, D::Error> {
    whole(d)?
        .map(|v| T::try_from(v).map_err(|_| D::Error::custom(format!("{v} is out of range"))))
        .transpose()
}

/// A whole number (with `#[serde(default)]` for absent ones).
pub fn req<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<T, D::Error> {
    opt(d)?.ok_or_else(|| D::Error::custom("a whole number is required"))
}
