//! The JT/T 808 terminal server (2011/2013/2019 frames): registration against the cloud's
//! registry (the answer carries an authentication code derived from the terminal's device
//! secret, so nothing else need be stored), authentication, heartbeats, location reports
//! (single, batch and blind-area re-issue, each with its own time) mapped onto the
//! "JT/T 808 terminal" thing model (`docs/tsl-templates/jt808-terminal.json`), multimedia events, and the
//! cloud's calls: `SendText` (0x8300), `QueryLocation` (0x8201), `SetParams` (0x8103),
//! `QueryParams` (0x8104), each waiting for the terminal's answer.
//!
//! Firmware upgrades (docs/ota.md): the image the gateway holds goes to the terminal as a
//! 0x8108 message in sub-packages of 1,023 bytes, 16 unacknowledged at most, each resent up
//! to three times when its 0x0001 does not come; the terminal's 0x0108 result then ends it (a
//! success is followed by 0x8107, whose firmware version is informed to the cloud).
//!
//! A reading is acknowledged to the terminal (0x8001) only once it is in the edge's queue.
//! Frames that cannot be read are counted and skipped; a message whose body is malformed is
//! answered "message error" (0x8001 result 2); the connection goes on.

use crate::link::{Command, Op, Outcome};
use crate::sub_ota::{self, Offer};
use crate::vehicle::{self, answer, at, round, Ctx, Unknown, Waiting};
use ironlink_protocols::jt808::{
    self as j, Deframer, Extra, GeneralResponse, Header, Location, Message, Param, ParamValue,
    Reassembler, RegisterResponse,
};
use ironlink_shared::sign::{sign_register, SignMethod};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Device name of a terminal: its phone number without leading zeros.
pub fn device_name(h: &Header) -> String {
    h.phone_number().to_owned()
}

/// The authentication code of a terminal: the first 16 hex digits of an HMAC-SHA256 over its
/// identity, keyed with its device secret.
pub fn auth_code(pk: &str, dn: &str, secret: &str) -> String {
    let s = sign_register(SignMethod::HmacSha256, secret, dn, pk, "jt808-auth");
    s.as_str().chars().take(16).collect()
}

/// The thing-model properties of a location, each at the location's time.
pub fn location_params(l: &Location) -> Map<String, Value> {
    let t = l.time.unix_ms();
    let mut p = Map::new();
    let mut put = |k: &str, v: Value| {
        p.insert(k.into(), at(v, t));
    };
    put("latitude", round(l.latitude(), 6));
    put("longitude", round(l.longitude(), 6));
    put("altitude", json!(l.altitude));
    put("speed", round(f64::from(l.speed) / 10.0, 1));
    put("direction", json!(l.direction));
    put("alarm", json!(l.alarm));
    put("status", json!(l.status));
    put("located", json!(u8::from(l.status & 0x02 != 0)));
    for e in &l.extras {
        match e {
            Extra::Mileage(v) => put("mileage", round(f64::from(*v) / 10.0, 1)),
            Extra::Fuel(v) => put("fuel", round(f64::from(*v) / 10.0, 1)),
            Extra::RecorderSpeed(v) => put("recorderSpeed", round(f64::from(*v) / 10.0, 1)),
            Extra::CarriageTemp(v) => put("carriageTemperature", json!(v)),
            Extra::VehicleSignals(v) => put("vehicleSignals", json!(v)),
            Extra::IoStatus(v) => put("ioStatus", json!(v)),
            Extra::Analog(v) => {
                put("analog0", json!(v & 0xFFFF));
                put("analog1", json!(v >> 16));
            }
            Extra::SignalStrength(v) => put("signalStrength", json!(v)),
            Extra::Satellites(v) => put("satellites", json!(v)),
            _ => {}
        }
    }
    p
}

fn param_json(p: &Param) -> (String, Value) {
    let v = match &p.value {
        ParamValue::U8(v) => json!(v),
        ParamValue::U16(v) => json!(v),
        ParamValue::U32(v) => json!(v),
        ParamValue::Text(t) => json!(t),
        ParamValue::Bytes(b) => json!(b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
    };
    (format!("0x{:04X}", p.id), v)
}

/// Parameters from a call: `{"params": {"0x0001": 30, "0x0013": "host"}}` (the object, or the
/// same as JSON text). Numbers are sent as DWORDs unless the id is a BYTE or WORD one.
pub fn params_from(call: &Map<String, Value>) -> Result<Vec<Param>, String> {
    let obj = match call.get("params") {
        Some(Value::Object(o)) => o.clone(),
        Some(Value::String(s)) => serde_json::from_str::<Map<String, Value>>(s)
            .map_err(|e| format!("params: not a JSON object: {e}"))?,
        _ => return Err("params: an object of parameter id -> value".into()),
    };
    let mut out = Vec::new();
    for (k, v) in obj {
        let id = if let Some(h) = k.strip_prefix("0x").or_else(|| k.strip_prefix("0X")) {
            u32::from_str_radix(h, 16)
        } else {
            k.parse()
        }
        .map_err(|_| format!("params.{k}: not a parameter id (0x0001 or 1)"))?;
        let value = match &v {
            Value::String(s) => ParamValue::Text(s.clone()),
            Value::Number(n) => {
                let n = n
                    .as_u64()
                    .filter(|n| *n <= u64::from(u32::MAX))
                    .ok_or(format!("params.{k}: {v} is not an unsigned 32-bit number"))?;
                match id {
                    0x0084 | 0x0090..=0x0092 | 0x0094 => ParamValue::U8(n as u8),
                    0x0031 | 0x005B..=0x005E | 0x0081 | 0x0082 | 0x0101 | 0x0103 => {
                        ParamValue::U16(n as u16)
                    }
                    _ => ParamValue::U32(n as u32),
                }
            }
            _ => return Err(format!("params.{k}: a number or a text")),
        };
        out.push(Param { id, value });
    }
    if out.is_empty() || out.len() > 255 {
        return Err("params: between 1 and 255 parameters".into());
    }
    Ok(out)
}

/// What a waiting call expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// 0x0001 for this message id.
    General(u16),
    /// 0x0201.
    Location,
    /// 0x0104.
    Params,
}

struct Conn {
    ctx: Arc<Ctx>,
    /// The authenticated terminal's device name.
    dn: Option<String>,
    /// Header of the last frame (edition and phone for our messages).
    last: Option<Header>,
    serial: u16,
    waiting: HashMap<u16, (Expect, Waiting)>,
    out: Vec<u8>,
    last_alarm: u32,
    /// The newest location (property gets answer from it; kept as the frame's fields, far
    /// smaller than its JSON).
    newest: Option<Location>,
    /// Maker id from this connection's registration (0x8108 carries it).
    maker: String,
    /// The upgrade package being sent.
    transfer: Option<Transfer>,
    /// After a successful 0x0108: the upgrade type, until the 0x0107 answer.
    attributes_for: Option<(u8, Instant)>,
}

/// Sub-packages of a 0x8108 without their 0x0001 at most.
const UPGRADE_WINDOW: usize = 16;
/// Sends of one sub-package at most.
const UPGRADE_TRIES: u8 = 3;
/// Body bytes per sub-package.
const PACKAGE: u64 = 1023;

/// A 0x8108 on its way: its body is `head` then the image, cut in sub-packages.
struct Transfer {
    offer: Arc<Offer>,
    file: std::fs::File,
    head: Vec<u8>,
    len: u64,
    total: u16,
    /// Serial of sub-package 1 (the others follow it).
    base: u16,
    /// Next sub-package index to send for the first time.
    next: u16,
    acked: Vec<bool>,
    done: u16,
    /// Index -> (sent at, sends).
    sent: HashMap<u16, (Instant, u8)>,
    reported: i64,
}

impl Transfer {
    /// The body bytes of sub-package `idx`.
    fn chunk(&self, idx: u16) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let start = u64::from(idx) * PACKAGE;
        let end = (start + PACKAGE).min(self.len);
        let mut out = Vec::with_capacity((end - start) as usize);
        let head = self.head.len() as u64;
        if start < head {
            out.extend_from_slice(&self.head[start as usize..end.min(head) as usize]);
        }
        if end > head {
            let from = start.max(head);
            let mut buf = vec![0u8; (end - from) as usize];
            self.file.read_exact_at(&mut buf, from - head)?;
            out.extend_from_slice(&buf);
        }
        Ok(out)
    }

    /// Frames sub-package `idx` into `out`.
    fn send(&mut self, idx: u16, last: &Header, out: &mut Vec<u8>) -> Result<(), String> {
        let body = self
            .chunk(idx)
            .map_err(|e| format!("reading the image: {e}"))?;
        let mut h = Header::reply(last, 0x8108, self.base.wrapping_add(idx));
        // A body within one frame is not cut in sub-packages.
        h.package = (self.total > 1).then_some((self.total, idx + 1));
        let frame = j::encode_frame(&h, &body).map_err(|e| e.to_string())?;
        out.extend_from_slice(&frame);
        let tries = self.sent.get(&idx).map_or(0, |s| s.1);
        self.sent.insert(idx, (Instant::now(), tries + 1));
        Ok(())
    }
}

impl Conn {
    fn send(&mut self, msg_id: u16, m: &Message) {
        let Some(h) = &self.last else { return };
        let hh = Header::reply(h, msg_id, self.serial);
        self.serial = self.serial.wrapping_add(1);
        if let Ok(frames) = j::encode_message(&hh, m) {
            for f in frames {
                self.out.extend_from_slice(&f);
            }
        }
    }

    fn general(&mut self, to: &Header, result: u8) {
        let m = Message::PlatformResponse(GeneralResponse {
            serial: to.serial,
            msg_id: to.msg_id,
            result,
        });
        self.send(0x8001, &m);
    }

    /// Queues a location; true once queued.
    fn location(&mut self, dn: &str, l: &Location) -> bool {
        let params = location_params(l);
        if self
            .newest
            .as_ref()
            .is_none_or(|n| l.time.unix_ms() >= n.time.unix_ms())
        {
            self.newest = Some(l.clone());
        }
        if !vehicle::post(&self.ctx, dn, params) {
            return false;
        }
        if l.alarm != self.last_alarm {
            self.last_alarm = l.alarm;
            if l.alarm != 0 {
                let _ = vehicle::event(
                    &self.ctx,
                    dn,
                    "Alarm",
                    l.time.unix_ms(),
                    json!({"bits": l.alarm, "latitude": round(l.latitude(), 6), "longitude": round(l.longitude(), 6)}),
                );
            }
        }
        true
    }

    async fn frame(&mut self, f: j::Frame, body: Vec<u8>) {
        let h = f.header;
        self.last = Some(h.clone());
        let m = match j::decode(h.msg_id, h.is_2019(), &body) {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(phone = %h.phone_number(), error = %e, "JT/T 808 message refused");
                self.ctx.counters.refuse("malformed message");
                self.general(&h, 2);
                return;
            }
        };
        self.ctx.counters.frames.fetch_add(1, Ordering::Relaxed);
        let dn = device_name(&h);
        match m {
            Message::Register(r) => match vehicle::identity(&self.ctx, &dn).await {
                Ok(id) => {
                    self.maker = r.maker.clone();
                    let code = auth_code(&id.product_key, &dn, &id.device_secret);
                    let now = crate::now_ms();
                    let info: Map<String, Value> = [
                        ("plate", json!(r.plate)),
                        ("plateColor", json!(r.plate_color)),
                        ("maker", json!(r.maker)),
                        ("terminalModel", json!(r.model)),
                        ("terminalId", json!(r.terminal_id)),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), at(v, now)))
                    .collect();
                    let _ = vehicle::post(&self.ctx, &dn, info);
                    self.send(
                        0x8100,
                        &Message::RegisterResponse(RegisterResponse {
                            serial: h.serial,
                            result: 0,
                            auth_code: code,
                        }),
                    );
                }
                Err(Unknown::Refused(why)) => {
                    tracing::info!(terminal = %dn, %why, "JT/T 808 registration refused");
                    self.ctx.counters.refuse("registration refused");
                    self.send(
                        0x8100,
                        &Message::RegisterResponse(RegisterResponse {
                            serial: h.serial,
                            result: 4,
                            auth_code: String::new(),
                        }),
                    );
                }
                // No answer: the terminal asks again.
                Err(Unknown::Unavailable(why)) => {
                    tracing::warn!(terminal = %dn, %why, "JT/T 808 registration not answered")
                }
            },
            Message::Auth(a) => match vehicle::identity(&self.ctx, &dn).await {
                Ok(id) if a.code == auth_code(&id.product_key, &dn, &id.device_secret) => {
                    self.dn = Some(dn);
                    self.general(&h, 0);
                }
                Ok(_) | Err(Unknown::Refused(_)) => {
                    self.ctx.counters.refuse("authentication failed");
                    self.general(&h, 1);
                }
                Err(Unknown::Unavailable(why)) => {
                    tracing::warn!(terminal = %dn, %why, "JT/T 808 authentication not answered")
                }
            },
            Message::Heartbeat => self.general(&h, 0),
            _ if self.dn.as_deref() != Some(dn.as_str()) => {
                // Not authenticated (or another phone number on this connection).
                self.ctx.counters.refuse("not authenticated");
                self.general(&h, 1);
            }
            Message::Logout => {
                self.general(&h, 0);
                if let Some(dn) = self.dn.take() {
                    vehicle::logout(&self.ctx, &dn);
                }
            }
            Message::Location(l) => {
                let ok = self.location(&dn, &l);
                self.general(&h, if ok { 0 } else { 1 });
            }
            Message::Batch { locations, .. } => {
                let ok = locations.iter().all(|l| self.location(&dn, l));
                self.general(&h, if ok { 0 } else { 1 });
            }
            Message::LocationReply { serial, location } => {
                let ok = self.location(&dn, &location);
                if let Some((Expect::Location, w)) = self.waiting.remove(&serial) {
                    let data = Value::Object(
                        location_params(&location)
                            .into_iter()
                            .map(|(k, v)| (k, v["value"].clone()))
                            .collect(),
                    );
                    w.answer(Outcome {
                        code: 200,
                        data,
                        message: String::new(),
                    });
                }
                self.general(&h, if ok { 0 } else { 1 });
            }
            Message::ParamsReply { serial, params } => {
                if let Some((Expect::Params, w)) = self.waiting.remove(&serial) {
                    let obj: Map<String, Value> = params.iter().map(param_json).collect();
                    w.answer(Outcome {
                        code: 200,
                        data: json!({"params": Value::Object(obj).to_string()}),
                        message: String::new(),
                    });
                }
            }
            Message::TerminalResponse(g) if g.msg_id == 0x8108 => self.upgrade_ack(g),
            Message::UpgradeResult { kind, result } => {
                self.general(&h, 0);
                self.upgrade_result(&dn, kind, result);
            }
            Message::Attributes(a) => {
                if let Some((kind, _)) = self.attributes_for.take() {
                    let version = if kind == 0 {
                        a.firmware.clone()
                    } else {
                        // 0x0107 has the terminal's firmware only: the module's new version
                        // is the one offered.
                        let module = sub_ota::jt808_module(kind);
                        match self
                            .ctx
                            .offers
                            .get(&dn)
                            .filter(|o| o.notice.module == module)
                        {
                            Some(o) => o.notice.version.clone(),
                            None => return,
                        }
                    };
                    self.inform(&dn, sub_ota::jt808_module(kind), &version);
                }
            }
            Message::TerminalResponse(g) => {
                if let Some((Expect::General(id), w)) = self.waiting.remove(&g.serial) {
                    if id == g.msg_id {
                        let (code, message) = match g.result {
                            0 => (200, String::new()),
                            3 => (460, "the terminal does not support this message".to_owned()),
                            r => (500, format!("the terminal answered result {r}")),
                        };
                        w.answer(Outcome {
                            code,
                            data: json!({}),
                            message,
                        });
                    }
                }
            }
            Message::MediaEvent(me) => {
                let ok = vehicle::event(
                    &self.ctx,
                    &dn,
                    "Media",
                    crate::now_ms(),
                    json!({"mediaId": me.id, "type": me.kind, "format": me.format, "event": me.event, "channel": me.channel}),
                );
                self.general(&h, if ok { 0 } else { 1 });
            }
            Message::MediaUpload {
                media,
                location,
                data,
            } => {
                // The picture itself is not stored (no object storage yet): its facts are.
                let ok = vehicle::event(
                    &self.ctx,
                    &dn,
                    "Media",
                    location.time.unix_ms(),
                    json!({"mediaId": media.id, "type": media.kind, "format": media.format, "event": media.event, "channel": media.channel, "bytes": data.len()}),
                );
                // 0x8800: upload answer, nothing to re-send.
                let mut body = media.id.to_be_bytes().to_vec();
                body.push(0);
                self.send(
                    0x8800,
                    &Message::Other {
                        msg_id: 0x8800,
                        body,
                    },
                );
                if !ok {
                    self.ctx.counters.refuse("queue refused");
                }
            }
            _ => {
                self.ctx.counters.refuse("unsupported message");
                self.general(&h, 3);
            }
        }
    }

    /// Informs the cloud of the terminal's `version` of `module` (ends a standing offer).
    fn inform(&self, dn: &str, module: &str, version: &str) {
        let _ = sub_ota::report(
            &self.ctx.sink,
            dn,
            "inform",
            json!({"version": version, "module": module}),
        );
        self.ctx.offers.reported(dn, module, version);
    }

    /// Starts sending `offer` as 0x8108; the call is answered at once (200: the transfer
    /// reports its progress from now on).
    fn start_upgrade(&mut self, cmd: Command, offer: Arc<Offer>) {
        let Some(last) = self.last.clone() else {
            answer(cmd, 503, json!({}), "the terminal is not connected");
            return;
        };
        if let Some(t) = &self.transfer {
            if t.offer == offer {
                // The same offer again: the transfer under way carries it.
                answer(cmd, 200, json!({}), "");
            } else {
                answer(
                    cmd,
                    503,
                    json!({}),
                    "another upgrade package is being sent to this terminal",
                );
            }
            return;
        }
        let size = offer.notice.size;
        let Ok(size32) = u32::try_from(size) else {
            answer(cmd, 460, json!({}), "the image is over 4 GiB");
            return;
        };
        let head = j::upgrade_head(
            sub_ota::jt808_kind(&offer.notice.module),
            &self.maker,
            &offer.notice.version,
            size32,
        );
        let len = head.len() as u64 + size;
        let Ok(total) = u16::try_from(len.div_ceil(PACKAGE)) else {
            answer(
                cmd,
                460,
                json!({}),
                "the image is too large for JT/T 808 (65,535 sub-packages of 1,023 bytes)",
            );
            return;
        };
        let file = match std::fs::File::open(&offer.image) {
            Ok(f) => f,
            Err(e) => {
                answer(cmd, 500, json!({}), &format!("opening the image: {e}"));
                return;
            }
        };
        let base = self.serial;
        self.serial = self.serial.wrapping_add(total);
        let _ = offer.progress(1, "sending the package to the terminal (JT/T 808 0x8108)");
        self.transfer = Some(Transfer {
            offer,
            file,
            head,
            len,
            total,
            base,
            next: 0,
            acked: vec![false; usize::from(total)],
            done: 0,
            sent: HashMap::new(),
            reported: 1,
        });
        answer(cmd, 200, json!({}), "");
        self.pump(&last);
    }

    /// Sends sub-packages while the window has room.
    fn pump(&mut self, last: &Header) {
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        let mut failed = None;
        while t.sent.len() < UPGRADE_WINDOW && t.next < t.total {
            let idx = t.next;
            t.next += 1;
            if let Err(e) = t.send(idx, last, &mut self.out) {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            self.end_transfer(-1, &e);
        }
    }

    fn end_transfer(&mut self, step: i64, why: &str) {
        if let Some(t) = self.transfer.take() {
            tracing::warn!(device = %t.offer.dn, step, why, "JT/T 808 upgrade stopped");
            let _ = t.offer.progress(step, why);
        }
    }

    /// A 0x0001 for a sub-package of the 0x8108.
    fn upgrade_ack(&mut self, g: GeneralResponse) {
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        let idx = g.serial.wrapping_sub(t.base);
        if idx >= t.total {
            return;
        }
        if g.result != 0 {
            let why = format!(
                "the terminal refused sub-package {} of {} (result {})",
                idx + 1,
                t.total,
                g.result
            );
            self.end_transfer(-2, &why);
            return;
        }
        t.sent.remove(&idx);
        if !std::mem::replace(&mut t.acked[usize::from(idx)], true) {
            t.done += 1;
        }
        if t.done == t.total {
            let _ = t
                .offer
                .progress(95, "the terminal has the whole package; flashing");
            self.transfer = None;
            return;
        }
        let pct = i64::from(t.done) * 90 / i64::from(t.total) / 10 * 10;
        if pct > t.reported {
            t.reported = pct;
            let _ = t
                .offer
                .progress(pct, "sending the package to the terminal (JT/T 808 0x8108)");
        }
        if let Some(last) = self.last.clone() {
            self.pump(&last);
        }
    }

    /// The terminal's 0x0108.
    fn upgrade_result(&mut self, dn: &str, kind: u8, result: u8) {
        let module = sub_ota::jt808_module(kind);
        let fail = |step: i64, why: &str| {
            let _ = sub_ota::report(
                &self.ctx.sink,
                dn,
                "progress",
                json!({"step": step.to_string(), "desc": why, "module": module}),
            );
        };
        match result {
            0 => {
                // The version it now runs: 0x0107 (answered in `frame`, or by the offer's
                // version when the terminal does not answer).
                self.attributes_for = Some((kind, Instant::now() + self.ctx.cfg.answer_timeout));
                self.send(0x8107, &Message::QueryAttributes);
            }
            1 => fail(
                -4,
                "the terminal reports the upgrade failed (0x0108 result 1)",
            ),
            2 => fail(-1, "the terminal cancelled the upgrade (0x0108 result 2)"),
            r => fail(-1, &format!("the terminal reports upgrade result {r}")),
        }
    }

    fn call(&mut self, cmd: Command) {
        let wait = self.ctx.cfg.answer_timeout;
        let (msg_id, m, expect) = match &cmd.op {
            Op::Upgrade(offer) => {
                let offer = offer.clone();
                self.start_upgrade(cmd, offer);
                return;
            }
            Op::Get(ids) => {
                let data: Map<String, Value> = self
                    .newest
                    .as_ref()
                    .map(location_params)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(k, _)| ids.is_empty() || ids.contains(k))
                    .map(|(k, v)| (k, v["value"].clone()))
                    .collect();
                answer(cmd, 200, Value::Object(data), "");
                return;
            }
            Op::Set(_) => {
                answer(
                    cmd,
                    460,
                    json!({}),
                    "a JT/T 808 terminal's properties are read-only: use its services",
                );
                return;
            }
            Op::Service(name, p) => match name.as_str() {
                "SendText" => {
                    let Some(text) = p.get("text").and_then(Value::as_str) else {
                        answer(cmd, 460, json!({}), "text: required");
                        return;
                    };
                    let flags = p.get("flags").and_then(Value::as_u64).unwrap_or(0x0C) as u8;
                    let is_2019 = self.last.as_ref().is_some_and(Header::is_2019);
                    (
                        0x8300,
                        Message::Text {
                            flags,
                            kind: is_2019.then_some(1),
                            text: text.to_owned(),
                        },
                        Expect::General(0x8300),
                    )
                }
                "QueryLocation" => (0x8201, Message::QueryLocation, Expect::Location),
                "QueryParams" => (0x8104, Message::QueryParams, Expect::Params),
                "SetParams" => match params_from(p) {
                    Ok(ps) => (0x8103, Message::SetParams(ps), Expect::General(0x8103)),
                    Err(e) => {
                        answer(cmd, 460, json!({}), &e);
                        return;
                    }
                },
                other => {
                    let msg = format!("no service `{other}` on a JT/T 808 terminal");
                    answer(cmd, 404, json!({}), &msg);
                    return;
                }
            },
        };
        let serial = self.serial;
        self.send(msg_id, &m);
        self.waiting.insert(
            serial,
            (
                expect,
                Waiting {
                    cmd,
                    deadline: Instant::now() + wait,
                },
            ),
        );
    }

    fn expire(&mut self) {
        let now = Instant::now();
        if let (Some(t), Some(last)) = (self.transfer.as_mut(), self.last.clone()) {
            let wait = self.ctx.cfg.answer_timeout;
            let late: Vec<(u16, u8)> = t
                .sent
                .iter()
                .filter(|(_, (at, _))| now.duration_since(*at) >= wait)
                .map(|(i, (_, n))| (*i, *n))
                .collect();
            let mut failed = None;
            for (idx, sends) in late {
                if sends >= UPGRADE_TRIES {
                    failed = Some(format!(
                        "the terminal stopped acknowledging sub-packages ({} of {} acknowledged)",
                        t.done, t.total
                    ));
                    break;
                }
                if let Err(e) = t.send(idx, &last, &mut self.out) {
                    failed = Some(e);
                    break;
                }
            }
            if let Some(why) = failed {
                self.end_transfer(-2, &why);
            }
        }
        if let Some((kind, deadline)) = self.attributes_for {
            if now >= deadline {
                self.attributes_for = None;
                let module = sub_ota::jt808_module(kind);
                if let Some(dn) = self.dn.clone() {
                    if let Some(o) = self
                        .ctx
                        .offers
                        .get(&dn)
                        .filter(|o| o.notice.module == module)
                    {
                        tracing::info!(terminal = %dn, "no 0x0107: the offered version is informed");
                        let v = o.notice.version.clone();
                        self.inform(&dn, module, &v);
                    }
                }
            }
        }
        let late: Vec<u16> = self
            .waiting
            .iter()
            .filter(|(_, (_, w))| w.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in late {
            if let Some((_, w)) = self.waiting.remove(&k) {
                w.answer(Outcome {
                    code: 503,
                    data: json!({}),
                    message: "the terminal did not answer in time".into(),
                });
            }
        }
    }
}

/// Serves one terminal connection until it closes, idles out, or the gateway stops.
pub async fn connection(stream: TcpStream, ctx: Arc<Ctx>) {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut calls) = crate::link::inbox(16);
    let mut c = Conn {
        ctx: ctx.clone(),
        dn: None,
        last: None,
        serial: 1,
        waiting: HashMap::new(),
        out: Vec::new(),
        last_alarm: 0,
        newest: None,
        maker: String::new(),
        transfer: None,
        attributes_for: None,
    };
    let mut deframer = Deframer::new();
    let mut packages = Reassembler::new(1 << 20, 60_000);
    // Reports are a few hundred bytes; larger frames take more reads (the deframer holds
    // them), and 10,000 connected terminals do not hold 40 MB of read buffers.
    let mut buf = vec![0u8; 512];
    let mut routed: Option<String> = None;
    let mut stop = ctx.stop.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut idle_until = Instant::now() + ctx.cfg.idle_timeout;
    loop {
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            n = rd.read(&mut buf) => {
                let n = match n { Ok(0) | Err(_) => break, Ok(n) => n };
                idle_until = Instant::now() + ctx.cfg.idle_timeout;
                let mut frames = Vec::new();
                deframer.feed(&buf[..n], &mut frames);
                for f in frames {
                    let f = match f.and_then(|f| j::parse_frame(&f)) {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::info!(error = %e, "JT/T 808 frame skipped");
                            ctx.counters.refuse(match e {
                                j::Error::Checksum { .. } => "bad check code",
                                j::Error::Encrypted { .. } => "encrypted",
                                j::Error::Oversized => "oversized frame",
                                _ => "malformed frame",
                            });
                            continue;
                        }
                    };
                    let body = match packages.push(&f.header, &f.body, crate::now_ms()) {
                        Ok(Some(b)) => b,
                        Ok(None) => continue,
                        Err(e) => {
                            tracing::info!(error = %e, "JT/T 808 sub-package refused");
                            ctx.counters.refuse("sub-package refused");
                            continue;
                        }
                    };
                    c.frame(f, body).await;
                }
                // Route the cloud's calls once authenticated.
                if routed.is_none() {
                    if let Some(dn) = &c.dn {
                        ctx.subs.route(dn, tx.clone());
                        routed = Some(dn.clone());
                    }
                }
            }
            Some(cmd) = calls.recv() => c.call(*cmd),
            _ = tick.tick() => {
                c.expire();
                for (id, missing) in packages.expire(crate::now_ms()) {
                    tracing::info!(msg_id = id, ?missing, "JT/T 808 sub-packages timed out");
                    ctx.counters.refuse("sub-packages timed out");
                }
                if Instant::now() >= idle_until {
                    tracing::info!(terminal = ?c.dn, "JT/T 808 terminal idle: closing");
                    break;
                }
            }
            _ = stop.changed() => break,
        }
        if !c.out.is_empty() {
            let out = std::mem::take(&mut c.out);
            match tokio::time::timeout(Duration::from_secs(10), wr.write_all(&out)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
    }
    if let Some(dn) = &routed {
        ctx.subs.unroute(dn, &tx);
    }
    if let Some(t) = &c.transfer {
        let why = format!(
            "the terminal disconnected during the transfer ({} of {} sub-packages acknowledged)",
            t.done, t.total
        );
        c.end_transfer(-2, &why);
    }
    for (_, (_, w)) in c.waiting.drain() {
        w.answer(Outcome {
            code: 503,
            data: json!({}),
            message: "the terminal disconnected".into(),
        });
    }
    if let Some(dn) = c.dn.take() {
        vehicle::logout(&ctx, &dn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_from_a_call() {
        let call = json!({"params": {"0x0001": 30, "19": "iot.example.com", "0x0084": 1}});
        let ps = params_from(call.as_object().unwrap()).unwrap();
        assert!(ps.contains(&Param {
            id: 1,
            value: ParamValue::U32(30)
        }));
        assert!(ps.contains(&Param {
            id: 0x13,
            value: ParamValue::Text("iot.example.com".into())
        }));
        assert!(ps.contains(&Param {
            id: 0x84,
            value: ParamValue::U8(1)
        }));
        let text = json!({"params": "{\"0x0001\": 10}"});
        assert_eq!(params_from(text.as_object().unwrap()).unwrap().len(), 1);
        for bad in [
            json!({}),
            json!({"params": {"zz": 1}}),
            json!({"params": {"1": -1}}),
            json!({"params": {}}),
        ] {
            assert!(params_from(bad.as_object().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn auth_codes_depend_on_the_secret() {
        let a = auth_code("pk", "13912345678", "s1");
        assert_eq!(a.len(), 16);
        assert_eq!(a, auth_code("pk", "13912345678", "s1"));
        assert_ne!(a, auth_code("pk", "13912345678", "s2"));
    }
}
