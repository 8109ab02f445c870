//! Requests from the cloud answered on the device: property set and get and service calls
//! (also over RRPC) checked against the device's thing model, then handed to the
//! application's [`Handler`]; shadow news, NTP time and replies to the device's own posts
//! passed on. Every request gets an Alink reply, also a malformed or oversized one (460), an
//! unknown service (6300) or a value the thing model refuses (460, naming the property).
//!
//! The thing model is a `static` table of [`ironlink_shared::spec`] types, the same rules the
//! cloud's thing model checks values with.

use crate::alink::{self, classify, json_str_body, Cursor, Downlink, Value};
use crate::json::{Json, JsonStr, Kind};
use core::fmt::Write;
use ironlink_shared::alink::code;
use ironlink_shared::spec::{Field, Misfit, Spec};

/// A property of the device's thing model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Property<'a> {
    /// Identifier.
    pub identifier: &'a str,
    /// Type and specs.
    pub spec: Spec<'a>,
    /// Whether the cloud may set it (`rw`); read-only properties are refused in a set.
    pub writable: bool,
}

/// A service of the device's thing model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Service<'a> {
    /// Identifier (the last topic level of `thing/service/{identifier}`).
    pub identifier: &'a str,
    /// Input parameters.
    pub inputs: &'a [Field<'a>],
}

/// The device's thing model: what it accepts from the cloud.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Model<'a> {
    /// Properties.
    pub properties: &'a [Property<'a>],
    /// Services.
    pub services: &'a [Service<'a>],
}

/// A handler's refusal: the Alink code and a short reason sent back in the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// Alink code (see [`ironlink_shared::alink::code`]).
    pub code: i64,
    /// Reason.
    pub message: &'static str,
}

const REPLY_TOO_BIG: Refusal = Refusal {
    code: code::INTERNAL,
    message: "the reply is larger than the device's buffer",
};

/// What the application does with the cloud's requests. Values reach it checked against
/// the thing model.
pub trait Handler {
    /// Sets properties: `params` is an object whose every member is a writable property with
    /// a value its data type accepts.
    fn set(&mut self, params: Json<'_>) -> Result<(), Refusal>;

    /// A property's current value for `thing.service.property.get` (`None`: left out).
    fn get(&mut self, _property: &str) -> Option<Value<'_>> {
        None
    }

    /// Runs a service: `input` is an object of its declared inputs with fitting values;
    /// output parameters go to `output`.
    fn call(
        &mut self,
        service: &str,
        input: Json<'_>,
        output: &mut Output<'_, '_>,
    ) -> Result<(), Refusal>;

    /// The shadow's version and the cloud's `desired` state (pushed as `control`, or in the
    /// reply to a shadow get).
    fn shadow(&mut self, _version: i64, _desired: Json<'_>) {}

    /// The UTC time in ms, from an NTP response.
    fn time(&mut self, _utc_ms: u64) {}

    /// The cloud's reply to something the device sent (`topic` without `_reply`, e.g.
    /// `thing/event/property/post`): its request id and code.
    fn replied(&mut self, _topic: &str, _id: &str, _code: i64) {}

    /// An upgrade notice: pushed on `/ota/device/upgrade/{pk}/{dn}`, or the successful answer
    /// to `thing.ota.firmware.get` (read it with `ota::Notice::parse` under the `ota`
    /// feature).
    fn ota_notice(&mut self, _payload: &[u8]) {}
}

/// Output parameters of a service, written straight into the reply.
pub struct Output<'w, 'o> {
    w: &'w mut Cursor<'o>,
    n: usize,
}

impl core::fmt::Debug for Output<'_, '_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Output")
            .field("params", &self.n)
            .finish_non_exhaustive()
    }
}

impl Output<'_, '_> {
    /// Adds an output parameter. Fails when the reply buffer is full (pass the refusal on
    /// with `?`: the cloud then gets code 500).
    pub fn put(&mut self, key: &str, v: Value<'_>) -> Result<(), Refusal> {
        let sep = if self.n > 0 { "," } else { "" };
        self.n += 1;
        (|| -> Option<()> {
            self.w.write_str(sep).ok()?;
            self.w.write_char('"').ok()?;
            json_str_body(self.w, key).ok()?;
            self.w.write_str("\":").ok()?;
            alink::value(self.w, v).ok()
        })()
        .ok_or(REPLY_TOO_BIG)
    }
}

/// A reply to publish: topic and payload, in the caller's buffers.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer<'o> {
    /// Topic.
    pub topic: &'o str,
    /// Payload (JSON).
    pub payload: &'o [u8],
}

/// A device: its identity and thing model.
#[derive(Debug, Clone, Copy)]
pub struct Device<'m> {
    /// Product key.
    pub product_key: &'m str,
    /// Device name.
    pub device_name: &'m str,
    /// Thing model.
    pub model: &'m Model<'m>,
}

/// Whether a JSON value fits a data type: the same rules as the cloud's thing model.
pub fn check(spec: &Spec<'_>, v: Json<'_>) -> Result<(), Misfit> {
    match v.kind() {
        Kind::Number => match v.as_i64() {
            Some(n) => spec.check_i64(n),
            None => spec.check_f64(v.as_f64().ok_or(Misfit::OutOfRange)?),
        },
        Kind::String => {
            let s = v.as_str().ok_or(Misfit::WrongKind)?;
            let len = s.unescaped_len().ok_or(Misfit::WrongKind)?;
            spec.check_text(len, s.plain())
        }
        Kind::Bool => spec.check_bool(),
        Kind::Null => Err(Misfit::WrongKind),
        Kind::Object => {
            if !matches!(spec, Spec::Struct { .. }) {
                return Err(Misfit::WrongKind);
            }
            for (k, fv) in v.members() {
                let f = field_of(spec, k)?;
                check(&f.spec, fv)?;
            }
            Ok(())
        }
        Kind::Array => {
            let Spec::Array { size, item } = spec else {
                return Err(Misfit::WrongKind);
            };
            ironlink_shared::spec::check_items(v.items().count(), *size)?;
            v.items().try_for_each(|x| check(item, x))
        }
    }
}

fn field_of<'s>(spec: &'s Spec<'s>, k: JsonStr<'_>) -> Result<&'s Field<'s>, Misfit> {
    match spec {
        Spec::Struct { fields } => fields
            .iter()
            .find(|f| k.eq_str(f.identifier))
            .ok_or(Misfit::UnknownField),
        _ => Err(Misfit::WrongKind),
    }
}

/// A refusal naming what it is about: `"{about}: {reason}"`, `about` as raw JSON string
/// content (escapes kept, as read from the request).
struct Why<'a> {
    code: i64,
    about: &'a str,
    reason: &'static str,
}

impl<'a> Why<'a> {
    fn of(r: Refusal) -> Self {
        Why {
            code: r.code,
            about: "",
            reason: r.message,
        }
    }

    fn params(about: &'a str, reason: &'static str) -> Self {
        Why {
            code: code::INVALID_PARAMS,
            about,
            reason,
        }
    }
}

/// A request id safe to write back: raw JSON string content without escapes or quotes.
fn safe_id(id: &str) -> &str {
    if id.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        id
    } else {
        ""
    }
}

impl<'m> Device<'m> {
    /// Topic filters the device subscribes to after connecting (Ironlink's cloud and
    /// Alibaba's also subscribe them on its behalf): index 0, 1, ... until `None`.
    pub fn filter<'o>(&self, i: usize, out: &'o mut [u8]) -> Option<&'o str> {
        let (pk, dn) = (self.product_key, self.device_name);
        let mut w = Cursor::new(out);
        match i {
            0 => write!(w, "/sys/{pk}/{dn}/thing/service/#"),
            1 => write!(w, "/sys/{pk}/{dn}/rrpc/request/+"),
            2 => write!(w, "/sys/{pk}/{dn}/thing/event/+/post_reply"),
            3 => write!(w, "/shadow/get/{pk}/{dn}"),
            4 => write!(w, "/ext/ntp/{pk}/{dn}/response"),
            5 => write!(w, "/ota/device/upgrade/{pk}/{dn}"),
            _ => return None,
        }
        .ok()?;
        let n = w.at;
        core::str::from_utf8(&out[..n]).ok()
    }

    /// Handles one message the device received (at `now_ms` on its clock). Returns the reply
    /// to publish (QoS 0), written into `topic_out` and `out`, when the message is a request.
    pub fn handle<'o, H: Handler>(
        &self,
        h: &mut H,
        now_ms: u64,
        topic: &str,
        payload: &[u8],
        topic_out: &'o mut [u8],
        out: &'o mut [u8],
    ) -> Option<Answer<'o>> {
        let kind = classify(topic, self.product_key, self.device_name)?;
        match kind {
            Downlink::PropertySet
            | Downlink::PropertyGet
            | Downlink::Service(_)
            | Downlink::Rrpc(_) => {}
            Downlink::Reply(suffix) => {
                if let Ok(j) = Json::parse_bytes(payload) {
                    let id = j.get("id").map_or("", id_text);
                    let c = j.get("code").and_then(|c| c.as_i64()).unwrap_or(0);
                    h.replied(suffix, id, c);
                    let offered = j.get("data").is_some_and(|d| d.members().next().is_some());
                    if suffix == "thing/ota/firmware/get" && c == code::OK && offered {
                        h.ota_notice(payload);
                    }
                }
                return None;
            }
            Downlink::OtaNotice => {
                h.ota_notice(payload);
                return None;
            }
            Downlink::Shadow => {
                let j = Json::parse_bytes(payload).ok()?;
                let version = j.get("version").and_then(|v| v.as_i64())?;
                let desired = j.get("payload")?.get("state")?.get("desired")?;
                if desired.kind() == Kind::Object {
                    h.shadow(version, desired);
                }
                return None;
            }
            Downlink::NtpResponse => {
                if let Some(t) = alink::ntp_time(payload, now_ms) {
                    h.time(t);
                }
                return None;
            }
            Downlink::Other => return None,
        }
        let topic = self.reply_topic(kind, topic_out)?;
        let doc = Json::parse_bytes(payload)
            .ok()
            .filter(|j| j.kind() == Kind::Object);
        let id = match doc {
            Some(j) => j.get("id").map_or("", id_text),
            None => safe_id(alink::request_id(payload).unwrap_or("")),
        };
        let n = match doc {
            None => write_refusal(
                out,
                id,
                &Why::params("", "the request is not a JSON object"),
            ),
            Some(j) => self.request(h, kind, j, id, out),
        }?;
        Some(Answer {
            topic,
            payload: &out[..n],
        })
    }

    /// Answers a request too large for the device's receive buffer ([`crate::mqtt::Event::Oversized`])
    /// with code 460; `head` is the start of its payload, where its id usually is.
    pub fn oversized<'o>(
        &self,
        topic: &str,
        head: &[u8],
        topic_out: &'o mut [u8],
        out: &'o mut [u8],
    ) -> Option<Answer<'o>> {
        let kind = classify(topic, self.product_key, self.device_name)?;
        if !matches!(
            kind,
            Downlink::PropertySet
                | Downlink::PropertyGet
                | Downlink::Service(_)
                | Downlink::Rrpc(_)
        ) {
            return None;
        }
        let topic = self.reply_topic(kind, topic_out)?;
        let valid = match core::str::from_utf8(head) {
            Ok(_) => head,
            Err(e) => &head[..e.valid_up_to()],
        };
        let id = safe_id(alink::request_id(valid).unwrap_or(""));
        let n = write_refusal(
            out,
            id,
            &Why::params("", "the request is larger than the device accepts"),
        )?;
        Some(Answer {
            topic,
            payload: &out[..n],
        })
    }

    fn reply_topic<'o>(&self, kind: Downlink<'_>, out: &'o mut [u8]) -> Option<&'o str> {
        let (pk, dn) = (self.product_key, self.device_name);
        let mut w = Cursor::new(out);
        match kind {
            Downlink::PropertySet => write!(w, "/sys/{pk}/{dn}/thing/service/property/set_reply"),
            Downlink::PropertyGet => write!(w, "/sys/{pk}/{dn}/thing/service/property/get_reply"),
            Downlink::Service(s) => write!(w, "/sys/{pk}/{dn}/thing/service/{s}_reply"),
            Downlink::Rrpc(m) => write!(w, "/sys/{pk}/{dn}/rrpc/response/{m}"),
            _ => return None,
        }
        .ok()?;
        let n = w.at;
        core::str::from_utf8(&out[..n]).ok()
    }

    fn request<H: Handler>(
        &self,
        h: &mut H,
        kind: Downlink<'_>,
        j: Json<'_>,
        id: &str,
        out: &mut [u8],
    ) -> Option<usize> {
        let params = j.get("params");
        let service = match kind {
            Downlink::PropertySet => {
                let r = self
                    .check_set(params)
                    .and_then(|p| h.set(p).map_err(Why::of));
                return match r {
                    Ok(()) => write_ok(out, id, |_| Ok(())),
                    Err(w) => write_refusal(out, id, &w),
                };
            }
            Downlink::PropertyGet => return self.get(h, params, id, out),
            Downlink::Service(s) => s,
            Downlink::Rrpc(_) => {
                let m = j
                    .get("method")
                    .and_then(|m| m.as_str())
                    .and_then(|m| m.plain());
                match m.and_then(|m| m.strip_prefix("thing.service.")) {
                    Some(s) => s,
                    None => {
                        let w = Why {
                            code: code::NO_METHOD,
                            about: "",
                            reason: "RRPC carries no thing.service method",
                        };
                        return write_refusal(out, id, &w);
                    }
                }
            }
            _ => return None,
        };
        let Some(svc) = self.model.services.iter().find(|x| x.identifier == service) else {
            let w = Why {
                code: code::NO_METHOD,
                about: "",
                reason: "no such service on this device",
            };
            return write_refusal(out, id, &w);
        };
        let input = match check_inputs(svc, params) {
            Ok(i) => i,
            Err(w) => return write_refusal(out, id, &w),
        };
        let mut refused = None;
        let n = write_ok(out, id, |w| {
            let mut o = Output { w, n: 0 };
            h.call(service, input, &mut o)
                .map_err(|r| refused = Some(r))
        });
        match (refused, n) {
            (None, Some(n)) => Some(n),
            (Some(r), _) => write_refusal(out, id, &Why::of(r)),
            (None, None) => write_refusal(out, id, &Why::of(REPLY_TOO_BIG)),
        }
    }

    fn check_set<'j>(&self, params: Option<Json<'j>>) -> Result<Json<'j>, Why<'j>> {
        let p = params
            .filter(|p| p.kind() == Kind::Object)
            .ok_or(Why::params("", "params must be an object"))?;
        for (k, v) in p.members() {
            let Some(prop) = self
                .model
                .properties
                .iter()
                .find(|x| k.eq_str(x.identifier))
            else {
                return Err(Why::params(k.raw(), "not a property of this device"));
            };
            if !prop.writable {
                return Err(Why::params(k.raw(), "read-only"));
            }
            check(&prop.spec, v).map_err(|m| Why::params(k.raw(), m.reason()))?;
        }
        Ok(p)
    }

    fn get<H: Handler>(
        &self,
        h: &mut H,
        params: Option<Json<'_>>,
        id: &str,
        out: &mut [u8],
    ) -> Option<usize> {
        let Some(list) = params.filter(|p| p.kind() == Kind::Array) else {
            return write_refusal(
                out,
                id,
                &Why::params("", "params must be a list of identifiers"),
            );
        };
        for item in list.items() {
            let known = item
                .as_str()
                .is_some_and(|s| self.model.properties.iter().any(|x| s.eq_str(x.identifier)));
            if !known {
                return write_refusal(
                    out,
                    id,
                    &Why::params(item_raw(item), "not a property of this device"),
                );
            }
        }
        let n = write_ok(out, id, |w| {
            let mut o = Output { w, n: 0 };
            for prop in self.model.properties {
                let asked = list
                    .items()
                    .any(|i| i.as_str().is_some_and(|s| s.eq_str(prop.identifier)));
                if asked {
                    if let Some(v) = h.get(prop.identifier) {
                        o.put(prop.identifier, v).map_err(|_| ())?;
                    }
                }
            }
            Ok(())
        });
        n.or_else(|| write_refusal(out, id, &Why::of(REPLY_TOO_BIG)))
    }
}

fn item_raw(item: Json<'_>) -> &str {
    item.as_str().map_or("", |s| s.raw())
}

/// A request id as text: a string's raw content or a number's digits.
fn id_text(v: Json<'_>) -> &str {
    match v.as_str() {
        Some(s) => s.raw(),
        None if v.as_i64().is_some() => v.raw(),
        None => "",
    }
}

fn check_inputs<'j>(svc: &Service<'_>, params: Option<Json<'j>>) -> Result<Json<'j>, Why<'j>> {
    let p = match params {
        None => return Ok(Json::EMPTY_OBJECT),
        Some(p) if p.kind() == Kind::Object => p,
        Some(_) => return Err(Why::params("", "params must be an object")),
    };
    for (k, v) in p.members() {
        let Some(f) = svc.inputs.iter().find(|f| k.eq_str(f.identifier)) else {
            return Err(Why::params(k.raw(), "not an input of this service"));
        };
        check(&f.spec, v).map_err(|m| Why::params(k.raw(), m.reason()))?;
    }
    Ok(p)
}

/// `{"id":"..","code":200,"data":{..}}` with `data`'s members written by `body`.
fn write_ok(
    out: &mut [u8],
    id: &str,
    body: impl FnOnce(&mut Cursor<'_>) -> Result<(), ()>,
) -> Option<usize> {
    let mut w = Cursor::new(out);
    write!(w, "{{\"id\":\"{id}\",\"code\":200,\"data\":{{").ok()?;
    body(&mut w).ok()?;
    w.write_str("}}").ok()?;
    Some(w.at)
}

/// `{"id":"..","code":C,"data":{},"message":".."}`, without the message when the buffer is
/// too small for it.
fn write_refusal(out: &mut [u8], id: &str, why: &Why<'_>) -> Option<usize> {
    log_debug!(
        "ironlink: request {} refused, {} {}",
        id,
        why.code,
        why.reason
    );
    write_refusal_with_message(out, id, why).or_else(|| {
        let mut w = Cursor::new(out);
        write!(w, "{{\"id\":\"{id}\",\"code\":{},\"data\":{{}}}}", why.code).ok()?;
        Some(w.at)
    })
}

fn write_refusal_with_message(out: &mut [u8], id: &str, why: &Why<'_>) -> Option<usize> {
    let mut w = Cursor::new(out);
    write!(
        w,
        "{{\"id\":\"{id}\",\"code\":{},\"data\":{{}},\"message\":\"",
        why.code
    )
    .ok()?;
    if !why.about.is_empty() {
        // `about` is JSON string content as the request had it: already escaped.
        write!(w, "{}: ", why.about).ok()?;
    }
    json_str_body(&mut w, why.reason).ok()?;
    w.write_str("\"}").ok()?;
    Some(w.at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value as J};

    static MODES: [i64; 3] = [0, 1, 2];
    static POINT: [Field<'static>; 2] = [
        Field {
            identifier: "x",
            spec: Spec::Real {
                min: -90.0,
                max: 90.0,
                step: None,
            },
        },
        Field {
            identifier: "y",
            spec: Spec::Int {
                min: 0,
                max: 10,
                step: None,
            },
        },
    ];
    static PROPS: [Property<'static>; 5] = [
        Property {
            identifier: "Temperature",
            spec: Spec::Real {
                min: -40.0,
                max: 125.0,
                step: Some(0.1),
            },
            writable: false,
        },
        Property {
            identifier: "Switch",
            spec: Spec::Bool,
            writable: true,
        },
        Property {
            identifier: "Mode",
            spec: Spec::Enum { codes: &MODES },
            writable: true,
        },
        Property {
            identifier: "Label",
            spec: Spec::Text { length: 8 },
            writable: true,
        },
        Property {
            identifier: "Target",
            spec: Spec::Struct { fields: &POINT },
            writable: true,
        },
    ];
    static BLINK_IN: [Field<'static>; 1] = [Field {
        identifier: "Times",
        spec: Spec::Int {
            min: 1,
            max: 10,
            step: None,
        },
    }];
    static SERVICES: [Service<'static>; 1] = [Service {
        identifier: "Blink",
        inputs: &BLINK_IN,
    }];
    static MODEL: Model<'static> = Model {
        properties: &PROPS,
        services: &SERVICES,
    };
    const DEV: Device<'static> = Device {
        product_key: "a1pk",
        device_name: "lamp-01",
        model: &MODEL,
    };

    #[derive(Default)]
    struct Lamp {
        switch: bool,
        mode: i64,
        blinks: i64,
        time: Option<u64>,
        shadow: Option<(i64, String)>,
        replied: Option<(String, String, i64)>,
        notices: Vec<String>,
    }

    impl Handler for Lamp {
        fn set(&mut self, params: Json<'_>) -> Result<(), Refusal> {
            for (k, v) in params.members() {
                if k.eq_str("Switch") {
                    self.switch = v.as_i64() == Some(1) || v.as_bool() == Some(true);
                } else if k.eq_str("Mode") {
                    self.mode = v.as_i64().unwrap_or(0);
                }
            }
            Ok(())
        }

        fn get(&mut self, property: &str) -> Option<Value<'_>> {
            match property {
                "Switch" => Some(Value::Bool(self.switch)),
                "Temperature" => Some(Value::Float(21.5)),
                _ => None,
            }
        }

        fn call(
            &mut self,
            service: &str,
            input: Json<'_>,
            output: &mut Output<'_, '_>,
        ) -> Result<(), Refusal> {
            assert_eq!(service, "Blink");
            let n = input.get("Times").and_then(|t| t.as_i64()).unwrap_or(1);
            if n == 7 {
                return Err(Refusal {
                    code: 9201,
                    message: "the lamp is busy",
                });
            }
            self.blinks += n;
            output.put("Done", Value::Int(n))?;
            output.put("Note", Value::Text("ok \"fine\""))
        }

        fn shadow(&mut self, version: i64, desired: Json<'_>) {
            self.shadow = Some((version, desired.raw().to_string()));
        }

        fn time(&mut self, utc_ms: u64) {
            self.time = Some(utc_ms);
        }

        fn replied(&mut self, topic: &str, id: &str, code: i64) {
            self.replied = Some((topic.into(), id.into(), code));
        }

        fn ota_notice(&mut self, payload: &[u8]) {
            self.notices
                .push(String::from_utf8_lossy(payload).into_owned());
        }
    }

    /// Handles one message; the reply's topic and parsed JSON.
    fn ask(lamp: &mut Lamp, topic: &str, payload: &str) -> Option<(String, J)> {
        let (mut t, mut o) = ([0u8; 128], [0u8; 512]);
        let a = DEV.handle(lamp, 5_000, topic, payload.as_bytes(), &mut t, &mut o)?;
        let v = serde_json::from_slice(a.payload).expect("replies are JSON");
        Some((a.topic.to_string(), v))
    }

    const SET: &str = "/sys/a1pk/lamp-01/thing/service/property/set";

    #[test]
    fn property_sets_are_checked_against_the_thing_model_before_the_handler_sees_them() {
        let mut lamp = Lamp::default();
        let (topic, v) = ask(
            &mut lamp,
            SET,
            r#"{"id":"11","version":"1.0","params":{"Switch":1,"Mode":2,"Target":{"x":1.5,"y":3}},"method":"thing.service.property.set"}"#,
        )
        .unwrap();
        assert_eq!(topic, "/sys/a1pk/lamp-01/thing/service/property/set_reply");
        assert_eq!(v, json!({"id":"11","code":200,"data":{}}));
        assert!(lamp.switch);
        assert_eq!(lamp.mode, 2);
        // One bad value refuses the whole set: nothing is applied.
        for (params, message) in [
            (r#"{"Switch":0,"Mode":5}"#, "Mode: unknown enum code"),
            (r#"{"Temperature":20}"#, "Temperature: read-only"),
            (r#"{"Colour":1}"#, "Colour: not a property of this device"),
            (r#"{"Label":"123456789"}"#, "Label: text too long"),
            (r#"{"Switch":"on"}"#, "Switch: wrong type"),
            (
                r#"{"Target":{"x":1,"z":2}}"#,
                "Target: unknown struct field",
            ),
            (r#"{"Target":{"x":91}}"#, "Target: out of range"),
            (r#"[1]"#, "params must be an object"),
        ] {
            let req = format!(r#"{{"id":"12","params":{params}}}"#);
            let (_, v) = ask(&mut lamp, SET, &req).unwrap();
            assert_eq!(v["code"], 460, "{params}");
            assert_eq!(v["message"], message, "{params}");
            assert_eq!(v["id"], "12");
        }
        assert!(lamp.switch);
        assert_eq!(lamp.mode, 2);
    }

    #[test]
    fn services_and_rrpc_reach_the_handler_with_checked_inputs() {
        let mut lamp = Lamp::default();
        let svc = "/sys/a1pk/lamp-01/thing/service/Blink";
        let (topic, v) = ask(
            &mut lamp,
            svc,
            r#"{"id":21,"params":{"Times":3},"method":"thing.service.Blink"}"#,
        )
        .unwrap();
        assert_eq!(topic, "/sys/a1pk/lamp-01/thing/service/Blink_reply");
        assert_eq!(
            v,
            json!({"id":"21","code":200,"data":{"Done":3,"Note":"ok \"fine\""}})
        );
        let (_, v) = ask(&mut lamp, svc, r#"{"id":"22","params":{"Times":11}}"#).unwrap();
        assert_eq!(
            (v["code"].clone(), v["message"].clone()),
            (json!(460), json!("Times: out of range"))
        );
        let (_, v) = ask(&mut lamp, svc, r#"{"id":"23","params":{"Times":7}}"#).unwrap();
        assert_eq!(
            v,
            json!({"id":"23","code":9201,"data":{},"message":"the lamp is busy"})
        );
        let (_, v) = ask(
            &mut lamp,
            "/sys/a1pk/lamp-01/thing/service/Explode",
            r#"{"id":"24","params":{}}"#,
        )
        .unwrap();
        assert_eq!(v["code"], 6300);
        let (topic, v) = ask(
            &mut lamp,
            "/sys/a1pk/lamp-01/rrpc/request/1234567",
            r#"{"id":"25","params":{"Times":2},"method":"thing.service.Blink"}"#,
        )
        .unwrap();
        assert_eq!(topic, "/sys/a1pk/lamp-01/rrpc/response/1234567");
        assert_eq!(v["data"]["Done"], 2);
        assert_eq!(lamp.blinks, 5);
        let (_, v) = ask(&mut lamp, "/sys/a1pk/lamp-01/rrpc/request/9", r#"{"x":1}"#).unwrap();
        assert_eq!(v["code"], 6300);
        // A reply that does not fit the buffer is refused with 500, not cut.
        let (mut t, mut o) = ([0u8; 128], [0u8; 50]);
        let a = DEV
            .handle(
                &mut lamp,
                0,
                svc,
                br#"{"id":"26","params":{"Times":1}}"#,
                &mut t,
                &mut o,
            )
            .unwrap();
        let v: J = serde_json::from_slice(a.payload).unwrap();
        assert_eq!(v, json!({"id":"26","code":500,"data":{}}));
    }

    #[test]
    fn property_get_shadow_ntp_and_replies() {
        let mut lamp = Lamp::default();
        let (topic, v) = ask(
            &mut lamp,
            "/sys/a1pk/lamp-01/thing/service/property/get",
            r#"{"id":"31","params":["Temperature","Switch","Mode"]}"#,
        )
        .unwrap();
        assert_eq!(topic, "/sys/a1pk/lamp-01/thing/service/property/get_reply");
        assert_eq!(v["data"], json!({"Temperature":21.5,"Switch":0}));
        let (_, v) = ask(
            &mut lamp,
            "/sys/a1pk/lamp-01/thing/service/property/get",
            r#"{"id":"32","params":["Nope"]}"#,
        )
        .unwrap();
        assert_eq!(v["message"], "Nope: not a property of this device");
        assert_eq!(
            ask(
                &mut lamp,
                "/shadow/get/a1pk/lamp-01",
                r#"{"method":"control","payload":{"status":"success","state":{"desired":{"Mode":1}}},"version":4,"timestamp":1}"#,
            ),
            None
        );
        assert_eq!(lamp.shadow, Some((4, r#"{"Mode":1}"#.to_string())));
        let _ = ask(
            &mut lamp,
            "/ext/ntp/a1pk/lamp-01/response",
            r#"{"deviceSendTime":"1000","serverRecvTime":"1700000000000","serverSendTime":"1700000000002"}"#,
        );
        // (recv + send + deviceRecv 5000 - deviceSend 1000) / 2
        assert_eq!(lamp.time, Some(1_700_000_002_001));
        let _ = ask(
            &mut lamp,
            "/sys/a1pk/lamp-01/thing/event/property/post_reply",
            r#"{"id":"7","code":200,"data":{}}"#,
        );
        assert_eq!(
            lamp.replied,
            Some(("thing/event/property/post".into(), "7".into(), 200))
        );
        assert_eq!(
            ask(
                &mut lamp,
                "/sys/a1pk/other/thing/service/property/set",
                "{}"
            ),
            None
        );
    }

    #[test]
    fn malformed_and_oversized_requests_are_answered_with_460() {
        let mut lamp = Lamp::default();
        let (_, v) = ask(&mut lamp, SET, r#"{"id":"41","params":{"Switch":1"#).unwrap();
        assert_eq!(v["id"], "41");
        assert_eq!(v["code"], 460);
        assert_eq!(v["message"], "the request is not a JSON object");
        let (_, v) = ask(&mut lamp, SET, r#"{"id":"4\"2","params":"#).unwrap();
        assert_eq!(v["id"], "");
        let (mut t, mut o) = ([0u8; 128], [0u8; 256]);
        let a = DEV
            .oversized(
                SET,
                br#"{"id":"43","version":"1.0","params":{"Label":"xxxxxxxx"#,
                &mut t,
                &mut o,
            )
            .unwrap();
        assert_eq!(
            a.topic,
            "/sys/a1pk/lamp-01/thing/service/property/set_reply"
        );
        let v: J = serde_json::from_slice(a.payload).unwrap();
        assert_eq!(v["id"], "43");
        assert_eq!(v["code"], 460);
        let mut buf = [0u8; 64];
        let f: heapless::Vec<&str, 8> = (0..)
            .map_while(|i| DEV.filter(i, &mut buf).map(|_| ""))
            .collect();
        assert_eq!(f.len(), 6);
        assert_eq!(DEV.filter(3, &mut buf), Some("/shadow/get/a1pk/lamp-01"));
    }

    /// 20,000 seeded mutations of downlinks (payload and topic): never a panic, and every
    /// answer is JSON with a code.
    #[test]
    fn mutated_downlinks_are_answered_never_panic() {
        let bases: [(&str, &str); 4] = [
            (
                SET,
                r#"{"id":"1","version":"1.0","params":{"Switch":1,"Label":"a\"b","Target":{"x":-1.5e1,"y":2}},"method":"thing.service.property.set"}"#,
            ),
            (
                "/sys/a1pk/lamp-01/thing/service/Blink",
                r#"{"id":2,"params":{"Times":3},"method":"thing.service.Blink"}"#,
            ),
            (
                "/sys/a1pk/lamp-01/rrpc/request/77",
                r#"{"id":"3","params":{"Times":1},"method":"thing.service.Blink"}"#,
            ),
            (
                "/shadow/get/a1pk/lamp-01",
                r#"{"method":"control","payload":{"state":{"desired":{"Mode":1}}},"version":4}"#,
            ),
        ];
        let mut seed = 0x853c_49e6_748f_ea9bu64;
        let mut answered = 0;
        for round in 0..20_000 {
            let (topic, payload) = bases[round % bases.len()];
            let (mut t, mut p) = (topic.as_bytes().to_vec(), payload.as_bytes().to_vec());
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let target = if seed.is_multiple_of(8) {
                    &mut t
                } else {
                    &mut p
                };
                let i = (seed >> 8) as usize % target.len();
                target[i] = b"{}[]\":,\\0-.eu a1/+\xff"[(seed >> 40) as usize % 19];
            }
            let Ok(topic) = core::str::from_utf8(&t) else {
                continue;
            };
            let mut lamp = Lamp::default();
            let (mut tb, mut ob) = ([0u8; 128], [0u8; 512]);
            if let Some(a) = DEV.handle(&mut lamp, 0, topic, &p, &mut tb, &mut ob) {
                let v: J = serde_json::from_slice(a.payload).expect("an answer is JSON");
                assert!(v["code"].is_i64());
                answered += 1;
            }
        }
        assert!(answered > 10_000, "{answered}");
    }
}
