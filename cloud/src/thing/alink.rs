//! Alink JSON envelopes: requests from devices and the replies to them.

use bytes::Bytes;
use ironlink_shared::tsl::DataType;
use serde_json::{json, Value};

/// An Alink request: `{"id", "version", "params", "sys": {"ack"}, "method"}`.
#[derive(Debug, Clone)]
pub struct Request {
    /// Message id, as the device sent it (a number is turned into its decimal text).
    pub id: String,
    /// `params` (`null` when absent).
    pub params: Value,
    /// False when the device asked for no reply (`"sys": {"ack": 0}`).
    pub ack: bool,
    /// True when a second message with the same id must be dropped (`"sys": {"dedup": 1}`,
    /// an Ironlink extension the edge gateway sends with its at-least-once uplink).
    pub dedup: bool,
}

/// Parses a request; the error says what is wrong.
pub fn parse_request(payload: &[u8]) -> Result<Request, String> {
    let v: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON ({e})"))?;
    let Value::Object(mut o) = v else {
        return Err("not a JSON object".into());
    };
    let id = match o.get("id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 64 => s.clone(),
        Some(Value::Number(n)) if n.is_u64() => n.to_string(),
        Some(_) => return Err("`id` must be a string of digits".into()),
        None => return Err("`id` is missing".into()),
    };
    let sys = o.get("sys");
    let ack = !matches!(sys.and_then(|s| s.get("ack")), Some(v) if v.as_i64() == Some(0));
    let dedup = matches!(sys.and_then(|s| s.get("dedup")), Some(v) if v.as_i64() == Some(1) || v.as_bool() == Some(true));
    Ok(Request {
        id,
        params: o.remove("params").unwrap_or(Value::Null),
        ack,
        dedup,
    })
}

/// A reply: `{"id", "code", "message", "data", "method"?, "version": "1.0"}`.
pub fn reply(id: &str, code: i64, message: &str, data: Value, method: Option<&str>) -> Bytes {
    let mut v = json!({
        "id": id,
        "code": code,
        "message": message,
        "data": data,
        "version": "1.0",
    });
    if let (Some(m), Some(o)) = (method, v.as_object_mut()) {
        o.insert("method".into(), Value::String(m.to_owned()));
    }
    Bytes::from(v.to_string())
}

/// Milliseconds from a JSON number or a string of digits.
pub fn as_ms(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A posted property in either form: `v`, or `{"value": v, "time": ms}`. The second form is
/// recognised by its keys (`value` and at most `time`), except for a struct property whose
/// fields are exactly those.
pub fn value_and_time<'a>(raw: &'a Value, now: i64, ty: Option<&DataType>) -> (&'a Value, i64) {
    if let Value::Object(o) = raw {
        let wrapped = o.contains_key("value") && o.keys().all(|k| k == "value" || k == "time");
        let struct_with_value_field = matches!(ty, Some(DataType::Struct { fields }) if fields.iter().any(|f| f.identifier == "value"));
        if wrapped && !struct_with_value_field {
            let ts = o.get("time").and_then(as_ms).unwrap_or(now);
            if let Some(v) = o.get("value") {
                return (v, ts);
            }
        }
    }
    (raw, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_or_say_why() {
        let r = parse_request(br#"{"id":"7","params":{"a":1},"sys":{"ack":0}}"#).unwrap();
        assert_eq!((r.id.as_str(), r.ack), ("7", false));
        assert_eq!(parse_request(br#"{"id":8}"#).unwrap().id, "8");
        assert!(parse_request(br#"{"id":8}"#).unwrap().ack);
        for (bad, why) in [
            (&b"{"[..], "not JSON"),
            (b"[1]", "not a JSON object"),
            (br#"{"params":{}}"#, "`id` is missing"),
            (br#"{"id":{}}"#, "`id` must be"),
        ] {
            assert!(parse_request(bad).unwrap_err().contains(why), "{why}");
        }
    }

    #[test]
    fn both_property_forms() {
        let plain = json!(21.5);
        assert_eq!(value_and_time(&plain, 5, None), (&plain, 5));
        let wrapped = json!({"value": 3, "time": 1000});
        assert_eq!(value_and_time(&wrapped, 5, None), (&json!(3), 1000));
        let wrapped_str_time = json!({"value": 3, "time": "1001"});
        assert_eq!(value_and_time(&wrapped_str_time, 5, None).1, 1001);
        let other = json!({"value": 3, "unit": "C"});
        assert_eq!(value_and_time(&other, 5, None), (&other, 5));
    }
}
