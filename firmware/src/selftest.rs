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
