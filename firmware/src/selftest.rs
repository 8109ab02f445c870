//! The SDK's state machines exercised without a network or a host library, so that the same
//! checks run in `cargo test` and as a Cortex-M binary on `qemu-system-arm` (the
//! `ironlink-firmware-qemu` crate): the MQTT client against scripted broker bytes and a
//! simulated clock, the Alink device handling, and 20,000 mutated downlinks.
//!
//! Enabled by the `selftest` feature.

use crate::alink::{self, Value};
use crate::device::{Device, Handler, Model, Output, Property, Refusal, Service};
use crate::json::Json;
use crate::mqtt::{Backoff, Client, ConnectOptions, Error, Event, QoS};
use ironlink_protocols::mqtt::{encode_publish, PublishOut};
use ironlink_shared::spec::{Field, Spec};

/// A failed check: the scenario and what did not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// Scenario name.
    pub scenario: &'static str,
    /// The check that failed.
    pub check: &'static str,
}

type Outcome = Result<u32, &'static str>;

/// A scenario: its number of checks, or the check that failed.
pub type Scenario = fn() -> Result<u32, &'static str>;

/// Counts checks; the first failing one ends its scenario.
struct Checks(u32);

impl Checks {
    fn that(&mut self, ok: bool, what: &'static str) -> Result<(), &'static str> {
        self.0 += 1;
        if ok {
            Ok(())
        } else {
            Err(what)
        }
    }
}

/// The scenarios, in order.
#[cfg(not(feature = "ota"))]
pub const SCENARIOS: [(&str, Scenario); 5] = [
    (
        "mqtt: connect, subscribe, QoS 1 with retransmission",
        mqtt_session,
    ),
    (
        "mqtt: keepalive, lost connection, oversized packets",
        mqtt_faults,
    ),
    ("alink: posts and replies", alink_writers),
    (
        "alink: requests checked against the thing model",
        device_requests,
    ),
    ("alink: 20,000 mutated downlinks", mutated_downlinks),
];

/// The scenarios, in order (with the OTA one when the `ota` feature is on).
#[cfg(feature = "ota")]
pub const SCENARIOS: [(&str, Scenario); 6] = [
    (
        "mqtt: connect, subscribe, QoS 1 with retransmission",
        mqtt_session,
    ),
    (
        "mqtt: keepalive, lost connection, oversized packets",
        mqtt_faults,
    ),
    ("alink: posts and replies", alink_writers),
    (
        "alink: requests checked against the thing model",
        device_requests,
    ),
    ("alink: 20,000 mutated downlinks", mutated_downlinks),
    (
        "ota: signed image, resumable download, swap cut at every flash write",
        ota_update,
    ),
];

/// Runs every scenario; `report` hears each one's name and its number of checks (or the
/// failed check). Returns the first failure.
pub fn run(report: &mut dyn FnMut(&'static str, Outcome)) -> Result<u32, Failure> {
    let mut total = 0;
    let mut first = None;
    for (name, f) in SCENARIOS {
        let r = f();
        report(name, r);
        match r {
            Ok(n) => total += n,
            Err(check) => {
                first.get_or_insert(Failure {
                    scenario: name,
                    check,
                });
            }
        }
    }
    first.map_or(Ok(total), Err)
}

const OPTS: ConnectOptions<'static> = ConnectOptions {
    client_id: "a1pk.lamp-01|securemode=3,signmethod=hmacsha256|",
    username: Some("lamp-01&a1pk"),
    password: Some("00ff"),
    keepalive_s: 60,
    clean_session: true,
    will: None,
};

fn publish_frame<'o>(out: &'o mut [u8], topic: &str, payload: &[u8], packet_id: u16) -> &'o [u8] {
    let p = PublishOut {
        topic,
        payload,
        qos: u8::from(packet_id != 0),
        packet_id,
        retain: false,
        dup: false,
        v5: false,
    };
    let mut n = 0;
    let _ = encode_publish(&p, |b| {
        if let Some(dst) = out.get_mut(n..n + b.len()) {
            dst.copy_from_slice(b);
        }
        n += b.len();
    });
    &out[..n.min(out.len())]
}

fn mqtt_session() -> Outcome {
    let mut c = Checks(0);
    let mut cl = Client::<256>::new();
    let mut out = [0u8; 256];
    let n = cl.connect(&OPTS, 0, &mut out).map_err(|_| "connect")?;
    c.that(out[0] == 0x10 && n > 60, "CONNECT written")?;
    c.that(
        cl.publish("/t", b"x", QoS::AtMostOnce, false, 0, &mut out) == Err(Error::NotConnected),
        "no publish before CONNACK",
    )?;
    let r = cl
        .receive(&[0x20, 0x02, 0x00, 0x00], 10, &mut out)
        .map_err(|_| "CONNACK")?;
    c.that(
        r.event
            == Some(Event::Connected {
                session_present: false,
            }),
        "connected",
    )?;
    let (n, sid) = cl
        .subscribe(
            "/sys/a1pk/lamp-01/thing/service/#",
            QoS::AtLeastOnce,
            &mut out,
        )
        .map_err(|_| "subscribe")?;
    c.that(
        out[0] == 0x82 && n == 7 + "/sys/a1pk/lamp-01/thing/service/#".len(),
        "SUBSCRIBE written",
    )?;
    let suback = [0x90, 0x03, (sid >> 8) as u8, sid as u8, 0x01];
    let r = cl.receive(&suback, 20, &mut out).map_err(|_| "SUBACK")?;
    c.that(r.event == Some(Event::Subscribed(sid, 1)), "subscribed")?;
    let (n, id) = cl
        .publish(
            "/sys/a1pk/lamp-01/thing/event/property/post",
            b"{}",
            QoS::AtLeastOnce,
            false,
            30,
            &mut out,
        )
        .map_err(|_| "publish")?;
    let id = id.ok_or("packet id")?;
    c.that(out[0] == 0x32 && n > 40, "PUBLISH QoS 1 written")?;
    c.that(
        cl.publish("/t", b"x", QoS::AtLeastOnce, false, 31, &mut out) == Err(Error::Busy),
        "one QoS 1 in flight",
    )?;
    c.that(
        cl.poll(5_000, &mut out) == Ok(0),
        "nothing due before the retry time",
    )?;
    let n = cl.poll(10_030, &mut out).map_err(|_| "poll")?;
    c.that(n > 40 && out[0] == 0x3a, "resent with DUP after 10 s")?;
    let puback = [0x40, 0x02, (id >> 8) as u8, id as u8];
    let r = cl
        .receive(&puback, 10_040, &mut out)
        .map_err(|_| "PUBACK")?;
    c.that(
        r.event == Some(Event::Published(id)) && !cl.is_busy(),
        "acknowledged",
    )?;
    // A QoS 1 message from the broker is acknowledged with its packet id.
    let mut f = [0u8; 128];
    let frame = publish_frame(
        &mut f,
        "/sys/a1pk/lamp-01/thing/service/property/set",
        b"{\"id\":\"1\"}",
        0x1234,
    );
    c.that(
        cl.receive(&frame[..6], 10_050, &mut out)
            .map(|r| r.consumed)
            == Ok(0),
        "a partial packet waits",
    )?;
    let r = cl
        .receive(frame, 10_050, &mut out)
        .map_err(|_| "PUBLISH in")?;
    c.that(r.consumed == frame.len(), "whole packet used")?;
    c.that(matches!(r.event, Some(Event::Message { topic, payload, qos: QoS::AtLeastOnce }) if topic.ends_with("property/set") && payload == b"{\"id\":\"1\"}"), "message")?;
    c.that(out[..r.reply] == [0x40, 0x02, 0x12, 0x34], "PUBACK written")?;
    Ok(c.0)
}

fn mqtt_faults() -> Outcome {
    let mut c = Checks(0);
    let mut cl = Client::<256>::new();
    let mut out = [0u8; 256];
    cl.connect(&OPTS, 0, &mut out).map_err(|_| "connect")?;
    cl.receive(&[0x20, 0x02, 0x00, 0x00], 0, &mut out)
        .map_err(|_| "CONNACK")?;
    c.that(
        cl.poll(59_999, &mut out) == Ok(0),
        "no ping before the keepalive",
    )?;
    c.that(
        cl.poll(60_000, &mut out) == Ok(2) && out[..2] == [0xc0, 0],
        "PINGREQ",
    )?;
    let pingresp = [0xd0, 0x00];
    let r = cl
        .receive(&pingresp, 60_100, &mut out)
        .map_err(|_| "PINGRESP")?;
    c.that(r.event == Some(Event::Pong), "pong")?;
    c.that(cl.poll(120_100, &mut out) == Ok(2), "second PINGREQ")?;
    c.that(
        cl.poll(180_100, &mut out) == Err(Error::KeepaliveTimeout),
        "unanswered ping times out",
    )?;
    c.that(!cl.is_connected(), "disconnected after the timeout")?;
    // A QoS 1 publish interrupted by a lost connection goes out again after the next CONNACK.
    cl.connect(&OPTS, 200_000, &mut out)
        .map_err(|_| "reconnect")?;
    cl.receive(&[0x20, 0x02, 0x00, 0x00], 200_000, &mut out)
        .map_err(|_| "CONNACK 2")?;
    let (_, id) = cl
        .publish("/t", b"kept", QoS::AtLeastOnce, false, 200_001, &mut out)
        .map_err(|_| "publish")?;
    cl.connection_lost();
    c.that(
        cl.poll(200_002, &mut out) == Ok(0),
        "nothing sent while disconnected",
    )?;
    cl.connect(&OPTS, 201_000, &mut out)
        .map_err(|_| "reconnect 2")?;
    cl.receive(&[0x20, 0x02, 0x01, 0x00], 201_000, &mut out)
        .map_err(|_| "CONNACK 3")?;
    let n = cl.poll(201_001, &mut out).map_err(|_| "poll")?;
    c.that(
        n > 0 && out[0] == 0x3a && out[n - 4..n] == *b"kept",
        "resent with DUP after reconnect",
    )?;
    let id = id.ok_or("id")?;
    cl.receive(&[0x40, 0x02, (id >> 8) as u8, id as u8], 201_002, &mut out)
        .map_err(|_| "PUBACK")?;
    c.that(!cl.is_busy(), "acknowledged after reconnect")?;
    // An oversized PUBLISH is skipped in pieces and acknowledged; the next packet is read.
    cl.set_max_packet(64);
    let mut f = [0u8; 400];
    let big = [b'x'; 300];
    let n = publish_frame(
        &mut f,
        "/sys/a1pk/lamp-01/thing/service/property/set",
        &big,
        9,
    )
    .len();
    f[n] = 0xd0;
    f[n + 1] = 0x00;
    let r = cl
        .receive(&f[..64], 201_003, &mut out)
        .map_err(|_| "oversized")?;
    c.that(
        matches!(r.event, Some(Event::Oversized { size, .. }) if size == n),
        "oversized reported",
    )?;
    c.that(
        out[..r.reply] == [0x40, 0x02, 0x00, 0x09],
        "oversized acknowledged",
    )?;
    let mut at = r.consumed;
    while at < n {
        let r = cl
            .receive(&f[at..(at + 64).min(n + 2)], 201_004, &mut out)
            .map_err(|_| "skip")?;
        c.that(r.consumed > 0, "skipping advances")?;
        at += r.consumed;
    }
    let r = cl
        .receive(&f[at..n + 2], 201_005, &mut out)
        .map_err(|_| "after skip")?;
    c.that(
        r.event == Some(Event::Pong),
        "packet after the oversized one read",
    )?;
    c.that(
        cl.receive(&[0x90, 0x7f, 0, 1], 0, &mut out) == Err(Error::Protocol),
        "other oversized packets are errors",
    )?;
    c.that(
        cl.receive(&[0x00, 0x00], 0, &mut out) == Err(Error::Protocol),
        "reserved type is an error",
    )?;
    // Backoff: exponential cap, full jitter.
    let mut b = Backoff::new(1_000, 60_000);
    let d: [u32; 4] = [
        b.next_delay(u32::MAX),
        b.next_delay(u32::MAX),
        b.next_delay(7),
        b.next_delay(0),
    ];
    c.that(
        d[0] <= 1_000 && d[1] <= 2_000 && d[2] <= 4_000 && d[3] == 0,
        "backoff bounded",
    )?;
    Ok(c.0)
}

fn alink_writers() -> Outcome {
    let mut c = Checks(0);
    let mut out = [0u8; 256];
    let n = alink::property_post(
        &mut out,
        7,
        &[
            ("Temperature", Value::Float(21.5)),
            ("On", Value::Bool(true)),
            ("Note", Value::Text("a\"b")),
        ],
    )
    .map_err(|_| "property post")?;
    let j = Json::parse_bytes(&out[..n]).map_err(|_| "post is JSON")?;
    c.that(
        j.get("id")
            .and_then(|i| i.as_str())
            .is_some_and(|s| s.eq_str("7")),
        "id",
    )?;
    let p = j.get("params").ok_or("params")?;
    c.that(
        p.get("Temperature").and_then(|t| t.as_f64()) == Some(21.5),
        "float",
    )?;
    c.that(p.get("On").and_then(|t| t.as_i64()) == Some(1), "bool as 1")?;
    c.that(
        p.get("Note")
            .and_then(|t| t.as_str())
            .is_some_and(|s| s.eq_str("a\"b")),
        "escaped text",
    )?;
    let n = alink::event_post(
        &mut out,
        8,
        "Alarm",
        &[("Level", Value::Int(2))],
        Some(1_700_000_000_000),
    )
    .map_err(|_| "event")?;
    let j = Json::parse_bytes(&out[..n]).map_err(|_| "event is JSON")?;
    c.that(
        j.get("method")
            .and_then(|m| m.as_str())
            .is_some_and(|m| m.eq_str("thing.event.Alarm.post")),
        "event method",
    )?;
    let n = alink::tags_update(&mut out, 9, &[("site", "hall 2")]).map_err(|_| "tags")?;
    c.that(Json::parse_bytes(&out[..n]).is_ok(), "tags JSON")?;
    let n = alink::shadow_update(&mut out, 3, &[("Mode", Value::Int(1))]).map_err(|_| "shadow")?;
    let j = Json::parse_bytes(&out[..n]).map_err(|_| "shadow JSON")?;
    c.that(
        j.get("version").and_then(|v| v.as_i64()) == Some(3),
        "shadow version",
    )?;
    let n = alink::ntp_request(&mut out, 1234).map_err(|_| "ntp")?;
    c.that(out[..n] == *b"{\"deviceSendTime\":\"1234\"}", "ntp request")?;
    c.that(
        alink::ntp_time(
            br#"{"deviceSendTime":"1000","serverRecvTime":"5000","serverSendTime":"5002"}"#,
            1_100,
        ) == Some(5_051),
        "ntp time",
    )?;
    c.that(
        alink::property_post(&mut out[..16], 1, &[]) == Err(alink::Error::BufferTooSmall),
        "small buffer refused",
    )?;
    Ok(c.0)
}

static MODES: [i64; 3] = [0, 1, 2];
static PROPS: [Property<'static>; 3] = [
    Property {
        identifier: "Temperature",
        spec: Spec::Real {
            min: -40.0,
            max: 125.0,
            step: None,
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
];
static BLINK: [Field<'static>; 1] = [Field {
    identifier: "Times",
    spec: Spec::Int {
        min: 1,
        max: 10,
        step: None,
    },
}];
static SERVICES: [Service<'static>; 1] = [Service {
    identifier: "Blink",
    inputs: &BLINK,
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
    blinks: i64,
}

impl Handler for Lamp {
    fn set(&mut self, params: Json<'_>) -> Result<(), Refusal> {
        if let Some(v) = params.get("Switch") {
            self.switch = v.as_i64() == Some(1) || v.as_bool() == Some(true);
        }
        Ok(())
    }

    fn call(
        &mut self,
        _service: &str,
        input: Json<'_>,
        output: &mut Output<'_, '_>,
    ) -> Result<(), Refusal> {
        let n = input.get("Times").and_then(|t| t.as_i64()).unwrap_or(1);
        self.blinks += n;
        output.put("Done", Value::Int(n))
    }
}

/// The reply's code and its topic's last level, from our own JSON reader.
fn answer_code(lamp: &mut Lamp, topic: &str, payload: &[u8]) -> Option<(i64, bool)> {
    let (mut t, mut o) = ([0u8; 96], [0u8; 256]);
    let a = DEV.handle(lamp, 0, topic, payload, &mut t, &mut o)?;
    let j = Json::parse_bytes(a.payload).ok()?;
    Some((
        j.get("code")?.as_i64()?,
        a.topic.ends_with("_reply") || a.topic.contains("/rrpc/response/"),
    ))
}

const SET: &str = "/sys/a1pk/lamp-01/thing/service/property/set";

fn device_requests() -> Outcome {
    let mut c = Checks(0);
    let mut lamp = Lamp::default();
    c.that(
        answer_code(
            &mut lamp,
            SET,
            br#"{"id":"1","params":{"Switch":1,"Mode":2}}"#,
        ) == Some((200, true)),
        "set accepted",
    )?;
    c.that(lamp.switch, "set applied")?;
    c.that(
        answer_code(
            &mut lamp,
            SET,
            br#"{"id":"2","params":{"Switch":0,"Mode":3}}"#,
        ) == Some((460, true)),
        "bad enum refused",
    )?;
    c.that(lamp.switch, "refused set not applied")?;
    c.that(
        answer_code(&mut lamp, SET, br#"{"id":"3","params":{"Temperature":1}}"#)
            == Some((460, true)),
        "read-only refused",
    )?;
    c.that(
        answer_code(&mut lamp, SET, br#"{"id":"4","params":"#) == Some((460, true)),
        "malformed answered",
    )?;
    let svc = "/sys/a1pk/lamp-01/thing/service/Blink";
    c.that(
        answer_code(&mut lamp, svc, br#"{"id":"5","params":{"Times":3}}"#) == Some((200, true)),
        "service",
    )?;
    c.that(lamp.blinks == 3, "service ran")?;
    c.that(
        answer_code(&mut lamp, svc, br#"{"id":"6","params":{"Times":0}}"#) == Some((460, true)),
        "bad input refused",
    )?;
    c.that(
        answer_code(
            &mut lamp,
            "/sys/a1pk/lamp-01/thing/service/Nope",
            br#"{"id":"7"}"#,
        ) == Some((6300, true)),
        "unknown service",
    )?;
    c.that(
        answer_code(
            &mut lamp,
            "/sys/a1pk/lamp-01/rrpc/request/42",
            br#"{"id":"8","params":{"Times":1},"method":"thing.service.Blink"}"#,
        ) == Some((200, true)),
        "rrpc",
    )?;
    c.that(
        answer_code(&mut lamp, "/sys/a1pk/other/thing/service/Blink", b"{}").is_none(),
        "other device ignored",
    )?;
    let (mut t, mut o) = ([0u8; 96], [0u8; 128]);
    let a = DEV
        .oversized(SET, br#"{"id":"99","params":{"Switch":"#, &mut t, &mut o)
        .ok_or("oversized answer")?;
    let j = Json::parse_bytes(a.payload).map_err(|_| "oversized JSON")?;
    c.that(
        j.get("id")
            .and_then(|i| i.as_str())
            .is_some_and(|s| s.eq_str("99")),
        "oversized id",
    )?;
    Ok(c.0)
}

fn mutated_downlinks() -> Outcome {
    let mut c = Checks(0);
    let bases: [(&str, &[u8]); 3] = [
        (SET, br#"{"id":"1","version":"1.0","params":{"Switch":1,"Mode":2},"method":"thing.service.property.set"}"#),
        ("/sys/a1pk/lamp-01/thing/service/Blink", br#"{"id":2,"params":{"Times":3},"method":"thing.service.Blink"}"#),
        ("/sys/a1pk/lamp-01/rrpc/request/77", br#"{"id":"3","params":{"Times":1},"method":"thing.service.Blink"}"#),
    ];
    let mut seed = 0x853c_49e6_748f_ea9bu64;
    let mut answered = 0u32;
    for round in 0..20_000usize {
        let (topic, payload) = bases[round % bases.len()];
        let mut p = [0u8; 128];
        let p = &mut p[..payload.len()];
        p.copy_from_slice(payload);
        for _ in 0..3 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let i = (seed >> 8) as usize % p.len();
            p[i] = b"{}[]\":,\\0-.eu a1\xff"[(seed >> 40) as usize % 17];
        }
        let mut lamp = Lamp::default();
        let (mut t, mut o) = ([0u8; 96], [0u8; 256]);
        if let Some(a) = DEV.handle(&mut lamp, 0, topic, p, &mut t, &mut o) {
            let code = Json::parse_bytes(a.payload)
                .ok()
                .and_then(|j| j.get("code"))
                .and_then(|c| c.as_i64());
            c.that(code.is_some(), "every answer is JSON with a code")?;
            answered += 1;
        }
    }
    c.that(answered == 20_000, "every request answered")?;
    Ok(c.0)
}

/// The OTA scenario's image: 5,197 bytes of a pattern, signed with the test key below.
#[cfg(feature = "ota")]
fn ota_image_byte(i: usize) -> u8 {
    (i as u8).wrapping_mul(31) ^ 5
}

#[cfg(feature = "ota")]
const OTA_LEN: usize = 5 * 1024 + 77;
#[cfg(feature = "ota")]
const OTA_SHA256: &str = "042c6fac3977e4197ef61f76cc8dcf5673e8312249fdff1d74b37adfcf372b28";
/// ed25519 over the image's SHA-512, by the key whose seed is 32 bytes of 7.
#[cfg(feature = "ota")]
const OTA_ED25519: &str = "9f5b09442aa5c781b4d9a96912cf7692c5467221339c98f11cec3ceb079f0954899b35b599a13cc90c3b8ea903c3277809f091ed30cac8a52467f04e7e1ae40a";
#[cfg(feature = "ota")]
const OTA_PUBLIC_KEY: [u8; 32] = [
    0xea, 0x4a, 0x6c, 0x63, 0xe2, 0x9c, 0x52, 0x0a, 0xbe, 0xf5, 0x50, 0x7b, 0x13, 0x2e, 0xc5, 0xf9,
    0x95, 0x47, 0x76, 0xae, 0xbe, 0xbe, 0x7b, 0x92, 0x42, 0x1e, 0xea, 0x69, 0x14, 0x46, 0xd2, 0x2c,
];

/// The flash of a small board for the OTA scenario: 8 KiB active slot, 9 KiB update slot,
/// state and journal sectors. A caller may keep it outside the stack (the Cortex-M run keeps it
/// in a static, so that the peak stack it reports is the SDK's own).
#[cfg(feature = "ota")]
#[derive(Debug)]
pub struct OtaMemory {
    active: [u8; 8192],
    dfu: [u8; 9216],
    state: [u8; 1024],
    journal: [u8; 256],
}

#[cfg(feature = "ota")]
impl OtaMemory {
    /// Zeroed memory (the scenario erases and fills it).
    pub const fn new() -> Self {
        OtaMemory {
            active: [0; 8192],
            dfu: [0; 9216],
            state: [0; 1024],
            journal: [0; 256],
        }
    }
}

#[cfg(feature = "ota")]
impl Default for OtaMemory {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "ota")]
type Part<'p, 'm, const N: usize, const E: usize> =
    crate::ota::sim::SimFlash<'p, &'m mut [u8; N], E, 4>;

#[cfg(feature = "ota")]
struct OtaBoard<'p, 'm> {
    active: Part<'p, 'm, 8192, 1024>,
    dfu: Part<'p, 'm, 9216, 1024>,
    state: Part<'p, 'm, 1024, 1024>,
    journal: Part<'p, 'm, 256, 256>,
}

#[cfg(feature = "ota")]
impl<'p, 'm> OtaBoard<'p, 'm> {
    fn new(power: &'p crate::ota::sim::Power, mem: &'m mut OtaMemory) -> Self {
        use crate::ota::sim::SimFlash;
        let mut b = OtaBoard {
            active: SimFlash::with(&mut mem.active, power),
            dfu: SimFlash::with(&mut mem.dfu, power),
            state: SimFlash::with(&mut mem.state, power),
            journal: SimFlash::with(&mut mem.journal, power),
        };
        b.reset();
        b
    }

    /// A board fresh from the factory: the old image running, the rest erased.
    fn reset(&mut self) {
        for (i, m) in self.active.mem.iter_mut().enumerate() {
            *m = (i as u8) ^ 0xa5;
        }
        self.dfu.mem.fill(0xff);
        self.state.mem.fill(0xff);
        self.journal.mem.fill(0xff);
    }

    /// Downloads the image (from where the journal says) in 300-byte pieces.
    fn download(&mut self, notice: &[u8]) -> Result<u32, crate::ota::OtaError> {
        use crate::ota::{Journal, Notice, Writer};
        use embassy_boot::{BlockingFirmwareUpdater, FirmwareUpdaterConfig};
        let n = Notice::parse(notice)?;
        let mut aligned = [0u8; 4];
        let mut up = BlockingFirmwareUpdater::new(
            FirmwareUpdaterConfig {
                dfu: &mut self.dfu,
                state: &mut self.state,
            },
            &mut aligned,
        );
        let mut journal = Journal::new(&mut self.journal);
        let mut w = Writer::start(&mut up, &mut journal, n, "1.0.0", 8192)?;
        let from = w.offset();
        let mut piece = [0u8; 300];
        let mut at = from as usize;
        while at < OTA_LEN {
            let len = piece.len().min(OTA_LEN - at);
            for (k, b) in piece[..len].iter_mut().enumerate() {
                *b = ota_image_byte(at + k);
            }
            w.push(&piece[..len])?;
            at += len;
        }
        w.finish(&OTA_PUBLIC_KEY)?;
        Ok(from)
    }

    fn boot(&mut self) -> Result<embassy_boot::State, embassy_boot::BootError> {
        use embassy_boot::{BootLoader, BootLoaderConfig};
        let mut aligned = [0u8; 1024];
        BootLoader::new(BootLoaderConfig {
            active: &mut self.active,
            dfu: &mut self.dfu,
            state: &mut self.state,
        })
        .prepare_boot(&mut aligned)
    }

    fn runs_new(&self) -> bool {
        (0..OTA_LEN).all(|i| self.active.mem[i] == ota_image_byte(i))
    }

    fn runs_old(&self) -> bool {
        self.active
            .mem
            .iter()
            .enumerate()
            .all(|(i, &m)| m == (i as u8) ^ 0xa5)
    }
}

#[cfg(feature = "ota")]
fn ota_notice<'o>(out: &'o mut [u8], version: &str, sha: &str) -> &'o [u8] {
    use core::fmt::Write;
    let mut w = crate::alink::Cursor::new(out);
    let _ = write!(
        w,
        "{{\"code\":\"1000\",\"data\":{{\"size\":{OTA_LEN},\"sign\":\"{sha}\",\"version\":\"{version}\",\"url\":\"http://192.168.69.1/fw.bin\",\"signMethod\":\"SHA256\",\"ed25519\":\"{OTA_ED25519}\"}},\"id\":1}}"
    );
    let n = w.at;
    &out[..n]
}

#[cfg(feature = "ota")]
fn ota_update() -> Outcome {
    let mut mem = OtaMemory::new();
    ota_update_in(&mut mem)
}

/// The OTA scenario over flash memory the caller provides.
#[cfg(feature = "ota")]
pub fn ota_update_in(mem: &mut OtaMemory) -> Result<u32, &'static str> {
    use crate::ota::sim::Power;
    use crate::ota::OtaError;
    use embassy_boot::State;
    let mut c = Checks(0);
    let mut buf = [0u8; 400];
    let power = Power::on();
    let mut b = OtaBoard::new(&power, mem);
    let bad = ota_notice(
        &mut buf,
        "1.1.0",
        "00000000000000000000000000000000000000000000000000000000000000ff",
    );
    c.that(
        b.download(bad) == Err(OtaError::DigestMismatch),
        "wrong digest refused",
    )?;
    let mut buf = [0u8; 400];
    let old = ota_notice(&mut buf, "0.9.0", OTA_SHA256);
    c.that(
        b.download(old) == Err(OtaError::NotNewer),
        "downgrade refused",
    )?;
    c.that(
        matches!(b.boot(), Ok(State::Boot)) && b.runs_old(),
        "nothing refused is swapped in",
    )?;
    let mut buf = [0u8; 400];
    let good = ota_notice(&mut buf, "1.1.0", OTA_SHA256);
    // A download cut by a power loss at every flash operation resumes and completes.
    // (One board, reset between tries: 18 KiB of simulated flash fit a 64 KiB RAM once.)
    let mut k = 0;
    loop {
        b.reset();
        power.cut_after(k);
        if b.download(good).is_ok() {
            break;
        }
        power.restore();
        let from = b.download(good).map_err(|_| "resumed download verified")?;
        c.that(from % 1024 == 0, "resumed at a sector boundary")?;
        k += 1;
    }
    c.that(k > 10, "every download cut point tried")?;
    // The swap cut at every flash write still boots a whole image.
    let mut k = 0;
    loop {
        b.reset();
        power.restore();
        b.download(good).map_err(|_| "download")?;
        power.cut_after(k);
        if b.boot().is_ok() {
            c.that(b.runs_new(), "new image after an uncut swap")?;
            break;
        }
        power.restore();
        b.boot().map_err(|_| "boot after a cut")?;
        c.that(
            b.runs_new() || b.runs_old(),
            "a whole image after every cut",
        )?;
        k += 1;
    }
    c.that(k > 20, "every swap cut point tried")?;
    // An image that never confirms is rolled back.
    b.reset();
    power.restore();
    b.download(good).map_err(|_| "download")?;
    c.that(
        matches!(b.boot(), Ok(State::Swap)) && b.runs_new(),
        "swapped",
    )?;
    c.that(
        matches!(b.boot(), Ok(State::Swap)) && b.runs_old(),
        "rolled back without confirmation",
    )?;
    Ok(c.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_scenario_passes_on_the_host() {
        let mut names = 0;
        let r = super::run(&mut |name, outcome| {
            names += 1;
            assert!(outcome.is_ok(), "{name}: {outcome:?}");
        });
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(names, super::SCENARIOS.len());
    }
}
