//! Alink on a microcontroller, without allocation: the device's topics, property and event
//! posts and replies written as JSON into caller buffers, and the downlinks the cloud sends
//! told apart by topic, with their request id found without a JSON library.

use core::fmt::Write;

/// Why a message could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The buffer is too small.
    BufferTooSmall,
    /// A float that JSON cannot carry (NaN or infinite).
    NotFinite,
}

/// A `core::fmt::Write` over a byte slice.
pub(crate) struct Cursor<'o> {
    pub(crate) buf: &'o mut [u8],
    pub(crate) at: usize,
}

impl<'o> Cursor<'o> {
    pub(crate) fn new(buf: &'o mut [u8]) -> Self {
        Cursor { buf, at: 0 }
    }
}

impl Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let dst = self
            .buf
            .get_mut(self.at..self.at + s.len())
            .ok_or(core::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.at += s.len();
        Ok(())
    }
}

pub(crate) fn json_str(w: &mut Cursor<'_>, s: &str) -> core::fmt::Result {
    w.write_char('"')?;
    json_str_body(w, s)?;
    w.write_char('"')
}

/// `s` escaped for a JSON string, without the quotes.
pub(crate) fn json_str_body(w: &mut Cursor<'_>, s: &str) -> core::fmt::Result {
    for c in s.chars() {
        match c {
            '"' => w.write_str("\\\"")?,
            '\\' => w.write_str("\\\\")?,
            '\n' => w.write_str("\\n")?,
            '\r' => w.write_str("\\r")?,
            '\t' => w.write_str("\\t")?,
            c if (c as u32) < 0x20 => write!(w, "\\u{:04x}", c as u32)?,
            c => w.write_char(c)?,
        }
    }
    Ok(())
}

/// A topic of this device written into `out`: `/sys/{pk}/{dn}/{suffix}`.
pub fn sys_topic<'o>(
    out: &'o mut [u8],
    product_key: &str,
    device_name: &str,
    suffix: &str,
) -> Result<&'o str, Error> {
    let mut w = Cursor { buf: out, at: 0 };
    write!(w, "/sys/{product_key}/{device_name}/{suffix}").map_err(|_| Error::BufferTooSmall)?;
    let n = w.at;
    core::str::from_utf8(&out[..n]).map_err(|_| Error::BufferTooSmall)
}

/// A property or event value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// `int`, `enum`, `date` (ms).
    Int(i64),
    /// `float`, `double`.
    Float(f64),
    /// `bool` (Alink carries 0/1).
    Bool(bool),
    /// `text`.
    Text(&'a str),
}

pub(crate) fn value(w: &mut Cursor<'_>, v: Value<'_>) -> Result<(), Error> {
    let r = match v {
        Value::Int(i) => write!(w, "{i}"),
        Value::Float(f) if !f.is_finite() => return Err(Error::NotFinite),
        Value::Float(f) => write!(w, "{f}"),
        Value::Bool(b) => write!(w, "{}", u8::from(b)),
        Value::Text(s) => json_str(w, s),
    };
    r.map_err(|_| Error::BufferTooSmall)
}

/// Writes a property post (several properties in one message):
/// `{"id":"7","version":"1.0","params":{"k":v,...},"method":"thing.event.property.post"}`.
pub fn property_post(out: &mut [u8], id: u32, props: &[(&str, Value<'_>)]) -> Result<usize, Error> {
    post(out, id, props, "thing.event.property.post", None)
}

/// Writes an event post: `params` holds the event's output and its `time` (ms), when given.
pub fn event_post(
    out: &mut [u8],
    id: u32,
    event: &str,
    output: &[(&str, Value<'_>)],
    time_ms: Option<u64>,
) -> Result<usize, Error> {
    let mut method = [0u8; 96];
    let mut m = Cursor {
        buf: &mut method,
        at: 0,
    };
    write!(m, "thing.event.{event}.post").map_err(|_| Error::BufferTooSmall)?;
    let n = m.at;
    let method = core::str::from_utf8(&method[..n]).map_err(|_| Error::BufferTooSmall)?;
    post(out, id, output, method, Some(time_ms))
}

fn post(
    out: &mut [u8],
    id: u32,
    items: &[(&str, Value<'_>)],
    method: &str,
    event_time: Option<Option<u64>>,
) -> Result<usize, Error> {
    let mut w = Cursor { buf: out, at: 0 };
    let e = |_| Error::BufferTooSmall;
    write!(w, "{{\"id\":\"{id}\",\"version\":\"1.0\",\"params\":{{").map_err(e)?;
    if event_time.is_some() {
        w.write_str("\"value\":{").map_err(e)?;
    }
    for (i, (k, v)) in items.iter().enumerate() {
        if i > 0 {
            w.write_char(',').map_err(e)?;
        }
        json_str(&mut w, k).map_err(e)?;
        w.write_char(':').map_err(e)?;
        value(&mut w, *v)?;
    }
    match event_time {
        Some(Some(t)) => write!(w, "}},\"time\":{t}").map_err(e)?,
        Some(None) => w.write_char('}').map_err(e)?,
        None => {}
    }
    w.write_str("},\"method\":").map_err(e)?;
    json_str(&mut w, method).map_err(e)?;
    w.write_char('}').map_err(e)?;
    Ok(w.at)
}

/// Writes the reply to a request: `{"id":"..","code":200,"data":{..}}`; `data` is JSON the
/// caller wrote (an object), or `{}`.
pub fn reply(out: &mut [u8], id: &str, code: u16, data: Option<&str>) -> Result<usize, Error> {
    let mut w = Cursor { buf: out, at: 0 };
    let e = |_| Error::BufferTooSmall;
    w.write_str("{\"id\":").map_err(e)?;
    json_str(&mut w, id).map_err(e)?;
    write!(w, ",\"code\":{code},\"data\":{}}}", data.unwrap_or("{}")).map_err(e)?;
    Ok(w.at)
}

/// What the cloud sends a device, told apart by topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Downlink<'a> {
    /// `thing/service/property/set`: answer on the `_reply` topic.
    PropertySet,
    /// `thing/service/property/get`.
    PropertyGet,
    /// `thing/service/{identifier}`: a service call.
    Service(&'a str),
    /// `rrpc/request/{messageId}`: a synchronous call, answered on `rrpc/response/{messageId}`.
    Rrpc(&'a str),
    /// A `_reply` to something the device posted (its `code` says how it went).
    Reply(&'a str),
    /// `/shadow/get/{pk}/{dn}`: a shadow reply or the cloud's desired state (`control`).
    Shadow,
    /// `/ext/ntp/{pk}/{dn}/response`: the answer to [`ntp_request`].
    NtpResponse,
    /// `/ota/device/upgrade/{pk}/{dn}`: an upgrade notice.
    OtaNotice,
    /// Another topic of this device.
    Other,
}

/// Tells a downlink of device `pk`/`dn` apart; `None` for another device's topic.
pub fn classify<'a>(topic: &'a str, pk: &str, dn: &str) -> Option<Downlink<'a>> {
    let own = |prefix: &str, suffix: &str| {
        topic
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix(pk))
            .and_then(|r| r.strip_prefix('/'))
            .and_then(|r| r.strip_prefix(dn))
            .is_some_and(|r| r == suffix)
    };
    if own("/shadow/get/", "") {
        return Some(Downlink::Shadow);
    }
    if own("/ext/ntp/", "/response") {
        return Some(Downlink::NtpResponse);
    }
    if own("/ota/device/upgrade/", "") {
        return Some(Downlink::OtaNotice);
    }
    let rest = topic.strip_prefix("/sys/")?;
    let rest = rest.strip_prefix(pk)?.strip_prefix('/')?;
    let rest = rest.strip_prefix(dn)?.strip_prefix('/')?;
    if let Some(r) = rest.strip_suffix("_reply") {
        return Some(Downlink::Reply(r));
    }
    Some(match rest {
        "thing/service/property/set" => Downlink::PropertySet,
        "thing/service/property/get" => Downlink::PropertyGet,
        r => match (
            r.strip_prefix("thing/service/"),
            r.strip_prefix("rrpc/request/"),
        ) {
            (Some(id), _) if !id.is_empty() && !id.contains('/') => Downlink::Service(id),
            (_, Some(m)) if !m.is_empty() && !m.contains('/') => Downlink::Rrpc(m),
            _ => Downlink::Other,
        },
    })
}

/// Writes a tags (device information) update, `thing.deviceinfo.update` on
/// `thing/deviceinfo/update`: `params` is a list of `{"attrKey","attrValue"}`.
pub fn tags_update(out: &mut [u8], id: u32, tags: &[(&str, &str)]) -> Result<usize, Error> {
    let mut w = Cursor::new(out);
    let e = |_| Error::BufferTooSmall;
    write!(w, "{{\"id\":\"{id}\",\"version\":\"1.0\",\"params\":[").map_err(e)?;
    for (i, (k, v)) in tags.iter().enumerate() {
        if i > 0 {
            w.write_char(',').map_err(e)?;
        }
        w.write_str("{\"attrKey\":").map_err(e)?;
        json_str(&mut w, k).map_err(e)?;
        w.write_str(",\"attrValue\":").map_err(e)?;
        json_str(&mut w, v).map_err(e)?;
        w.write_char('}').map_err(e)?;
    }
    w.write_str("],\"method\":\"thing.deviceinfo.update\"}")
        .map_err(e)?;
    Ok(w.at)
}

/// Writes a shadow update for `/shadow/update/{pk}/{dn}`: the device's `reported` state
/// under a version above the stored one (or -1 to clear the shadow).
pub fn shadow_update(
    out: &mut [u8],
    version: i64,
    reported: &[(&str, Value<'_>)],
) -> Result<usize, Error> {
    let mut w = Cursor::new(out);
    let e = |_| Error::BufferTooSmall;
    w.write_str("{\"method\":\"update\",\"state\":{\"reported\":{")
        .map_err(e)?;
    for (i, (k, v)) in reported.iter().enumerate() {
        if i > 0 {
            w.write_char(',').map_err(e)?;
        }
        json_str(&mut w, k).map_err(e)?;
        w.write_char(':').map_err(e)?;
        value(&mut w, *v)?;
    }
    write!(w, "}}}},\"version\":{version}}}").map_err(e)?;
    Ok(w.at)
}

/// The shadow request that asks for the stored shadow (answered on `/shadow/get/{pk}/{dn}`).
pub const SHADOW_GET: &str = "{\"method\":\"get\"}";

/// Writes an NTP request for `/ext/ntp/{pk}/{dn}/request`, stamped with the device's clock.
pub fn ntp_request(out: &mut [u8], device_ms: u64) -> Result<usize, Error> {
    let mut w = Cursor::new(out);
    write!(w, "{{\"deviceSendTime\":\"{device_ms}\"}}").map_err(|_| Error::BufferTooSmall)?;
    Ok(w.at)
}

/// The current UTC time in ms from an NTP response that arrived at `device_ms` on the device's
/// clock: `(serverRecv + serverSend + deviceRecv - deviceSend) / 2`, as Alibaba's SDK does.
/// `None` when the response lacks a time or the device's clock went backwards.
pub fn ntp_time(payload: &[u8], device_ms: u64) -> Option<u64> {
    let j = crate::json::Json::parse_bytes(payload).ok()?;
    let num = |k: &str| -> Option<u64> {
        let v = j.get(k)?;
        match v.as_str() {
            Some(s) => s.plain()?.parse().ok(),
            None => u64::try_from(v.as_i64()?).ok(),
        }
    };
    let sent = num("deviceSendTime")?;
    let (recv, send) = (num("serverRecvTime")?, num("serverSendTime")?);
    let rtt_part = device_ms.checked_sub(sent)?;
    Some((recv.checked_add(send)?.checked_add(rtt_part)?) / 2)
}

/// The top-level `"id"` of an Alink request (a string, or a number as the cloud may send),
/// found by scanning, without a JSON parser; `None` when the payload has none or is not an
/// object. Nested objects and strings are skipped, so a `"id"` inside `params` is not taken.
pub fn request_id(payload: &[u8]) -> Option<&str> {
    let s = core::str::from_utf8(payload).ok()?;
    let b = s.as_bytes();
    let mut i = b.iter().position(|c| !c.is_ascii_whitespace())?;
    if b[i] != b'{' {
        return None;
    }
    i += 1;
    let mut depth = 1usize;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let start = i + 1;
                let end = string_end(b, start)?;
                let key = &s[start..end];
                i = end + 1;
                if depth != 1 {
                    continue;
                }
                // A key is followed by `:`; a string value is not.
                let mut j = i;
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                if b.get(j) != Some(&b':') {
                    continue;
                }
                i = j + 1;
                if key != "id" {
                    continue;
                }
                while i < b.len() && b[i].is_ascii_whitespace() {
                    i += 1;
                }
                return match b.get(i)? {
                    b'"' => {
                        let end = string_end(b, i + 1)?;
                        Some(&s[i + 1..end])
                    }
                    c if c.is_ascii_digit() => {
                        let end = b[i..]
                            .iter()
                            .position(|c| !c.is_ascii_digit())
                            .map_or(b.len(), |n| i + n);
                        Some(&s[i..end])
                    }
                    _ => None,
                };
            }
            b'{' | b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                i += 1;
                if depth == 0 {
                    return None;
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// Index of the closing quote of a JSON string starting at `start` (after its opening quote).
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value as J};

    #[test]
    fn posts_and_replies_are_the_json_the_cloud_reads() {
        let mut out = [0u8; 256];
        let n = property_post(
            &mut out,
            7,
            &[
                ("Temperature", Value::Float(21.5)),
                ("Count", Value::Int(-3)),
                ("On", Value::Bool(true)),
                ("Note", Value::Text("a \"quoted\"\nline")),
            ],
        )
        .unwrap();
        let v: J = serde_json::from_slice(&out[..n]).unwrap();
        assert_eq!(
            v,
            json!({"id":"7","version":"1.0","method":"thing.event.property.post",
                   "params":{"Temperature":21.5,"Count":-3,"On":1,"Note":"a \"quoted\"\nline"}})
        );
        let n = event_post(
            &mut out,
            8,
            "Alarm",
            &[("Level", Value::Int(2))],
            Some(1_700_000_000_000),
        )
        .unwrap();
        let v: J = serde_json::from_slice(&out[..n]).unwrap();
        assert_eq!(v["method"], "thing.event.Alarm.post");
        assert_eq!(
            v["params"],
            json!({"value":{"Level":2},"time":1_700_000_000_000u64})
        );
        let n = reply(&mut out, "42", 200, Some("{\"Result\":1}")).unwrap();
        let v: J = serde_json::from_slice(&out[..n]).unwrap();
        assert_eq!(v, json!({"id":"42","code":200,"data":{"Result":1}}));
        assert_eq!(
            property_post(&mut out[..20], 1, &[]),
            Err(Error::BufferTooSmall)
        );
        assert_eq!(
            property_post(&mut out, 1, &[("x", Value::Float(f64::NAN))]),
            Err(Error::NotFinite)
        );
        let t = sys_topic(&mut out, "a1pk", "dev-01", "thing/event/property/post").unwrap();
        assert_eq!(t, "/sys/a1pk/dev-01/thing/event/property/post");
    }

    #[test]
    fn downlinks_are_told_apart() {
        let c = |t| classify(t, "pk", "dn");
        assert_eq!(
            c("/sys/pk/dn/thing/service/property/set"),
            Some(Downlink::PropertySet)
        );
        assert_eq!(
            c("/sys/pk/dn/thing/service/Reboot"),
            Some(Downlink::Service("Reboot"))
        );
        assert_eq!(
            c("/sys/pk/dn/rrpc/request/123"),
            Some(Downlink::Rrpc("123"))
        );
        assert_eq!(
            c("/sys/pk/dn/thing/event/property/post_reply"),
            Some(Downlink::Reply("thing/event/property/post"))
        );
        assert_eq!(c("/sys/pk/other/thing/service/property/set"), None);
        assert_eq!(c("/sys/pk/dn/thing/service/"), Some(Downlink::Other));
    }

    #[test]
    fn request_ids_are_found_at_the_top_level_only() {
        assert_eq!(request_id(br#"{"id":"123","params":{}}"#), Some("123"));
        assert_eq!(
            request_id(br#" { "params": {"id":"inner"}, "id" : 77 }"#),
            Some("77")
        );
        assert_eq!(request_id(br#"{"params":{"id":"inner"}}"#), None);
        assert_eq!(
            request_id(br#"{"note":"\"id\":\"fake\"","id":"9"}"#),
            Some("9")
        );
        assert_eq!(request_id(br#"["id","x"]"#), None);
        assert_eq!(request_id(b"{\"id\":"), None);
        assert_eq!(request_id(b"\xff"), None);
    }

    /// Seeded mutations of a request: an answer or `None`, never a panic.
    #[test]
    fn mutated_requests_never_panic() {
        let base = br#"{"id":"123","version":"1.0","params":{"a":[1,{"b":"c\"d"}]},"method":"thing.service.property.set"}"#;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut f = base.to_vec();
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % f.len();
                f[i] = (seed >> 32) as u8;
            }
            let _ = request_id(&f);
        }
    }
}
