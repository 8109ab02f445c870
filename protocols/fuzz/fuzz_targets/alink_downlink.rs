//! The firmware SDK's downlink path: bytes from the broker through the MQTT client, then each
//! message through the device's request handling (thing model checks, replies), and any bytes
//! through the JSON reader. No panic; every answer is JSON with a code; a document the reader
//! accepts can be walked to its end.
#![no_main]

use ironlink_firmware::device::{Device, Handler, Model, Output, Property, Refusal, Service};
use ironlink_firmware::json::{Json, Kind};
use ironlink_firmware::mqtt::{Client, ConnectOptions, Event};
use ironlink_shared::spec::{Field, Spec};
use libfuzzer_sys::fuzz_target;

static CODES: [i64; 3] = [0, 1, 2];
static POINT: [Field<'static>; 1] = [Field { identifier: "x", spec: Spec::Int { min: 0, max: 9, step: None } }];
static PROPS: [Property<'static>; 4] = [
    Property { identifier: "T", spec: Spec::Real { min: -40.0, max: 125.0, step: Some(0.5) }, writable: true },
    Property { identifier: "M", spec: Spec::Enum { codes: &CODES }, writable: true },
    Property { identifier: "S", spec: Spec::Struct { fields: &POINT }, writable: true },
    Property { identifier: "L", spec: Spec::Array { size: 4, item: &Spec::Text { length: 8 } }, writable: true },
];
static SERVICES: [Service<'static>; 1] = [Service { identifier: "Go", inputs: &POINT }];
static MODEL: Model<'static> = Model { properties: &PROPS, services: &SERVICES };

struct Sink;

impl Handler for Sink {
    fn set(&mut self, params: Json<'_>) -> Result<(), Refusal> {
        walk(params, 0);
        Ok(())
    }

    fn call(&mut self, _s: &str, input: Json<'_>, out: &mut Output<'_, '_>) -> Result<(), Refusal> {
        walk(input, 0);
        out.put("ok", ironlink_firmware::alink::Value::Int(1))
    }
}

fn walk(j: Json<'_>, depth: usize) {
    assert!(depth <= ironlink_firmware::json::MAX_DEPTH);
    let mut buf = [0u8; 64];
    match j.kind() {
        Kind::Object => j.members().for_each(|(k, v)| {
            let _ = k.unescape(&mut buf);
            walk(v, depth + 1)
        }),
        Kind::Array => j.items().for_each(|v| walk(v, depth + 1)),
        Kind::String => {
            let _ = j.as_str().map(|s| s.unescape(&mut buf));
        }
        _ => {
            let _ = (j.as_i64(), j.as_f64(), j.as_bool());
        }
    }
}

fn answer(dev: &Device<'_>, topic: &str, payload: &[u8]) {
    let (mut t, mut o) = ([0u8; 128], [0u8; 512]);
    if let Some(a) = dev.handle(&mut Sink, 0, topic, payload, &mut t, &mut o) {
        let j = Json::parse_bytes(a.payload).expect("an answer is JSON");
        assert!(j.get("code").and_then(|c| c.as_i64()).is_some());
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(j) = Json::parse_bytes(data) {
        walk(j, 0);
    }
    let dev = Device { product_key: "pk", device_name: "dn", model: &MODEL };
    for topic in ["/sys/pk/dn/thing/service/property/set", "/sys/pk/dn/thing/service/Go", "/sys/pk/dn/rrpc/request/1"] {
        answer(&dev, topic, data);
    }
    let mut c = Client::<256>::new();
    c.set_max_packet(300);
    let mut out = [0u8; 512];
    let o = ConnectOptions { client_id: "c", username: None, password: None, keepalive_s: 30, clean_session: true, will: None };
    let _ = c.connect(&o, 0, &mut out);
    let _ = c.receive(&[0x20, 0x02, 0, 0], 0, &mut out);
    let mut at = 0;
    while at < data.len() {
        match c.receive(&data[at..], 1, &mut out) {
            Ok(r) if r.consumed > 0 => {
                if let Some(Event::Message { topic, payload, .. }) = r.event {
                    answer(&dev, topic, payload);
                }
                at += r.consumed;
            }
            _ => break,
        }
    }
});
