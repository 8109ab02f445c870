//! The GB/T 32960 vehicle server: vehicle login by VIN against the cloud's registry (the VIN
//! is the device name), real-time and re-issued data mapped onto the "GB/T 32960 vehicle"
//! thing model (`docs/tsl-templates/gb32960-vehicle.json`) at their own collection times, values the
//! standard marks abnormal or invalid left out (counted), alarms as events, heartbeats, time
//! sync, logout, and the cloud's calls: `Query` (0x80), `Setup` (0x81), `Control` (0x82), each
//! waiting for the vehicle's answer.
//!
//! Data is acknowledged to the vehicle (response flag 0x01) only once it is in the edge's
//! queue; otherwise the vehicle is told 0x02 and re-issues it later.

use crate::link::{Command, Op, Outcome};
use crate::vehicle::{self, answer, at, round, Ctx, Unknown, Waiting};
use ironlink_protocols::gb32960::{
    self as g, cmd, resp, Deframer, Frame, Info, Message, Param, Reading, Report, Time,
};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The thing-model properties of a report, at its collection time; the second value counts
/// readings left out as abnormal or invalid, the third the manufacturer blocks passed over.
pub fn report_params(r: &Report) -> (Map<String, Value>, u64, u64) {
    let t = r.time.unix_ms();
    let mut p = Map::new();
    let mut skipped = 0u64;
    let mut custom = 0u64;
    macro_rules! put {
        ($k:expr, $v:expr, $digits:expr) => {
            match $v {
                Reading::Value(x) => {
                    p.insert($k.into(), at(round(x, $digits), t));
                }
                _ => skipped += 1,
            }
        };
    }
    let b = |v: u8| Reading::byte(v, 1.0, 0.0);
    let temp = |v: u8| Reading::byte(v, 1.0, -40.0);
    for item in &r.items {
        match item {
            Info::Vehicle(v) => {
                put!("vehicleState", b(v.state), 0);
                put!("chargingState", b(v.charging), 0);
                put!("runningMode", b(v.mode), 0);
                put!("speed", Reading::word(v.speed, 0.1, 0.0), 1);
                put!("mileage", Reading::dword(v.mileage, 0.1, 0.0), 1);
                put!("totalVoltage", Reading::word(v.voltage, 0.1, 0.0), 1);
                put!("totalCurrent", Reading::word(v.current, 0.1, -1000.0), 1);
                put!("soc", b(v.soc), 0);
                put!("dcdcState", b(v.dcdc), 0);
                put!("gear", Reading::Value(f64::from(v.gear)), 0);
                put!("insulation", Reading::word(v.insulation, 1.0, 0.0), 0);
                put!("acceleratorPedal", b(v.accelerator), 0);
                put!("brakePedal", b(v.brake), 0);
            }
            Info::Motors(ms) => {
                put!("motorCount", Reading::Value(ms.len() as f64), 0);
                if let Some(m) = ms.first() {
                    put!("motorState", b(m.state), 0);
                    put!("motorControllerTemperature", temp(m.controller_temp), 0);
                    put!("motorSpeed", Reading::word(m.speed, 1.0, -20000.0), 0);
                    put!("motorTorque", Reading::word(m.torque, 0.1, -2000.0), 1);
                    put!("motorTemperature", temp(m.temp), 0);
                    put!("motorVoltage", Reading::word(m.voltage, 0.1, 0.0), 1);
                    put!("motorCurrent", Reading::word(m.current, 0.1, -1000.0), 1);
                }
            }
            Info::FuelCell(f) => {
                put!("fuelCellVoltage", Reading::word(f.voltage, 0.1, 0.0), 1);
                put!("fuelCellCurrent", Reading::word(f.current, 0.1, 0.0), 1);
                put!(
                    "hydrogenConsumption",
                    Reading::word(f.consumption, 0.01, 0.0),
                    2
                );
                put!(
                    "hydrogenMaxTemperature",
                    Reading::word(f.h2_max_temp, 0.1, -40.0),
                    1
                );
                put!(
                    "hydrogenMaxConcentration",
                    Reading::word(f.h2_max_concentration, 1.0, 0.0),
                    0
                );
                put!(
                    "hydrogenMaxPressure",
                    Reading::word(f.h2_max_pressure, 0.1, 0.0),
                    1
                );
            }
            Info::Engine(e) => {
                put!("engineState", b(e.state), 0);
                put!("engineSpeed", Reading::word(e.speed, 1.0, 0.0), 0);
                put!(
                    "fuelConsumption",
                    Reading::word(e.consumption, 0.01, 0.0),
                    2
                );
            }
            Info::Position(pos) => {
                put!(
                    "locationValid",
                    Reading::Value(f64::from(u8::from(pos.status & 1 == 0))),
                    0
                );
                if let (Some(lat), Some(lon)) = (pos.latitude(), pos.longitude()) {
                    put!("latitude", Reading::Value(lat), 6);
                    put!("longitude", Reading::Value(lon), 6);
                }
            }
            Info::Extremes(e) => {
                put!("maxCellVoltage", Reading::word(e.max_v, 0.001, 0.0), 3);
                put!("maxCellVoltageSystem", b(e.max_v_system), 0);
                put!("maxCellVoltageCell", b(e.max_v_cell), 0);
                put!("minCellVoltage", Reading::word(e.min_v, 0.001, 0.0), 3);
                put!("minCellVoltageSystem", b(e.min_v_system), 0);
                put!("minCellVoltageCell", b(e.min_v_cell), 0);
                put!("maxTemperature", temp(e.max_t), 0);
                put!("maxTemperatureProbe", b(e.max_t_probe), 0);
                put!("minTemperature", temp(e.min_t), 0);
                put!("minTemperatureProbe", b(e.min_t_probe), 0);
            }
            Info::Alarms(a) => {
                put!("alarmLevel", b(a.level), 0);
                put!("generalAlarm", Reading::dword(a.general, 1.0, 0.0), 0);
                let n = a.storage.len() + a.motor.len() + a.engine.len() + a.other.len();
                put!("faultCount", Reading::Value(n as f64), 0);
            }
            Info::Voltages(vs) => {
                let obj: Map<String, Value> = vs
                    .iter()
                    .map(|v| {
                        (
                            v.system.to_string(),
                            json!({"first": v.first, "cells": v.cells, "mV": v.voltages}),
                        )
                    })
                    .collect();
                p.insert(
                    "cellVoltages".into(),
                    at(json!(Value::Object(obj).to_string()), t),
                );
            }
            Info::Temperatures(ts) => {
                let obj: Map<String, Value> = ts
                    .iter()
                    .map(|x| {
                        (
                            x.system.to_string(),
                            json!(x
                                .temps
                                .iter()
                                .map(|v| i16::from(*v) - 40)
                                .collect::<Vec<_>>()),
                        )
                    })
                    .collect();
                p.insert(
                    "probeTemperatures".into(),
                    at(json!(Value::Object(obj).to_string()), t),
                );
            }
            // Manufacturer blocks (0x80 and up) have no standard layout: passed over, and
            // counted as such, not as bad values.
            Info::Custom { .. } => custom += 1,
        }
    }
    (p, skipped, custom)
}

fn params_json(ps: &[Param]) -> Value {
    let obj: Map<String, Value> = ps
        .iter()
        .map(|p| {
            let v = match p {
                Param::Word(_, v) => json!(v),
                Param::Byte(_, v) => json!(v),
                Param::Text(_, t) => json!(t),
            };
            (format!("0x{:02X}", p.id()), v)
        })
        .collect();
    json!({"params": Value::Object(obj).to_string()})
}

/// Setup parameters from a call: `{"params": {"0x01": 30000, "0x05": "host"}}` (or that as
/// JSON text). Domain names bring their length parameter with them.
pub fn setup_from(call: &Map<String, Value>) -> Result<Vec<Param>, String> {
    let obj = match call.get("params") {
        Some(Value::Object(o)) => o.clone(),
        Some(Value::String(s)) => serde_json::from_str::<Map<String, Value>>(s)
            .map_err(|e| format!("params: not a JSON object: {e}"))?,
        _ => return Err("params: an object of parameter id -> value".into()),
    };
    let mut out = Vec::new();
    for (k, v) in obj {
        let id = match k.strip_prefix("0x").or_else(|| k.strip_prefix("0X")) {
            Some(h) => u8::from_str_radix(h, 16),
            None => k.parse(),
        }
        .map_err(|_| format!("params.{k}: not a parameter id"))?;
        let num = || v.as_u64().ok_or(format!("params.{k}: a number"));
        match id {
            0x01..=0x03 | 0x06 | 0x0A | 0x0B | 0x0F => {
                let n = num()?;
                out.push(Param::Word(
                    id,
                    u16::try_from(n).map_err(|_| format!("params.{k}: {n} is over 65535"))?,
                ));
            }
            0x09 | 0x0C | 0x10 => {
                let n = num()?;
                out.push(Param::Byte(
                    id,
                    u8::try_from(n).map_err(|_| format!("params.{k}: {n} is over 255"))?,
                ));
            }
            0x05 | 0x0E => {
                let t = v.as_str().ok_or(format!("params.{k}: a text"))?;
                if t.len() > 255 {
                    return Err(format!("params.{k}: longer than 255"));
                }
                out.push(Param::Byte(
                    if id == 0x05 { 0x04 } else { 0x0D },
                    t.len() as u8,
                ));
                out.push(Param::Text(id, t.to_owned()));
            }
            _ => return Err(format!("params.{k}: not a parameter that can be set")),
        }
    }
    if out.is_empty() {
        return Err("params: at least one".into());
    }
    Ok(out)
}

struct Conn {
    ctx: Arc<Ctx>,
    vin: Option<String>,
    waiting: HashMap<u8, Waiting>,
    out: Vec<u8>,
    alarm: (u8, u32),
    latest: Map<String, Value>,
}

impl Conn {
    fn respond(&mut self, f: &Frame, result: u8) {
        if let Ok(b) = g::response(f, result, Time::from_unix_ms(crate::now_ms())) {
            self.out.extend_from_slice(&b);
        }
    }

    fn report(&mut self, vin: &str, r: &Report) -> bool {
        let (params, skipped, custom) = report_params(r);
        for _ in 0..skipped {
            self.ctx.counters.refuse("abnormal or invalid value");
        }
        for _ in 0..custom {
            self.ctx.counters.skip("custom information block");
        }
        for (k, v) in &params {
            self.latest.insert(k.clone(), v["value"].clone());
        }
        if !vehicle::post(&self.ctx, vin, params) {
            return false;
        }
        for item in &r.items {
            if let Info::Alarms(a) = item {
                if (a.level, a.general) != self.alarm {
                    self.alarm = (a.level, a.general);
                    if a.level != 0 || a.general != 0 {
                        let _ = vehicle::event(
                            &self.ctx,
                            vin,
                            "Alarm",
                            r.time.unix_ms(),
                            json!({"level": a.level, "general": a.general,
                                   "faults": json!({"storage": a.storage, "motor": a.motor, "engine": a.engine, "other": a.other}).to_string()}),
                        );
                    }
                }
            }
        }
        if let Some(e) = &r.rest_error {
            tracing::info!(vehicle = vin, error = %e, "GB/T 32960 data partly read");
            self.ctx.counters.refuse("information type unreadable");
        }
        true
    }

    async fn frame(&mut self, f: Frame) {
        self.ctx.counters.frames.fetch_add(1, Ordering::Relaxed);
        // An answer to one of our commands.
        if f.response != resp::COMMAND {
            if matches!(f.command, cmd::QUERY | cmd::SETUP | cmd::CONTROL) {
                if let Some(w) = self.waiting.remove(&f.command) {
                    let o = if f.response != resp::OK {
                        Outcome {
                            code: 500,
                            data: json!({}),
                            message: format!("the vehicle answered 0x{:02X}", f.response),
                        }
                    } else if f.command == cmd::QUERY {
                        match g::decode(&f) {
                            Ok(Message::Query { params, .. }) => Outcome {
                                code: 200,
                                data: params_json(&params),
                                message: String::new(),
                            },
                            _ => Outcome {
                                code: 500,
                                data: json!({}),
                                message: "the vehicle's answer could not be read".into(),
                            },
                        }
                    } else {
                        Outcome {
                            code: 200,
                            data: json!({}),
                            message: String::new(),
                        }
                    };
                    w.answer(o);
                }
            }
            return;
        }
        let m = match g::decode(&f) {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(vin = %f.vin, error = %e, "GB/T 32960 data refused");
                self.ctx.counters.refuse("malformed data");
                self.respond(&f, resp::ERROR);
                return;
            }
        };
        match m {
            Message::Login(l) => match vehicle::identity(&self.ctx, &f.vin).await {
                Ok(_) => {
                    if self.vin.as_deref().is_some_and(|v| v != f.vin) {
                        self.respond(&f, resp::ERROR);
                        return;
                    }
                    self.vin = Some(f.vin.clone());
                    let info: Map<String, Value> = [
                        ("iccid", json!(l.iccid)),
                        ("storageSystems", json!(l.systems.join(","))),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), at(v, l.time.unix_ms())))
                    .collect();
                    let ok = vehicle::post(&self.ctx, &f.vin, info);
                    self.respond(&f, if ok { resp::OK } else { resp::ERROR });
                }
                Err(Unknown::Refused(why)) => {
                    tracing::info!(vin = %f.vin, %why, "GB/T 32960 login refused");
                    self.ctx.counters.refuse("login refused");
                    self.respond(&f, resp::ERROR);
                }
                Err(Unknown::Unavailable(why)) => {
                    tracing::warn!(vin = %f.vin, %why, "GB/T 32960 login not answered");
                }
            },
            Message::Heartbeat => self.respond(&f, resp::OK),
            Message::TimeSync(_) => self.respond(&f, resp::OK),
            _ if self.vin.as_deref() != Some(f.vin.as_str()) => {
                self.ctx.counters.refuse("not logged in");
                self.respond(&f, resp::ERROR);
            }
            Message::Realtime(r) | Message::Reissue(r) => {
                let vin = f.vin.clone();
                let ok = self.report(&vin, &r);
                self.respond(&f, if ok { resp::OK } else { resp::ERROR });
            }
            Message::Logout { .. } => {
                self.respond(&f, resp::OK);
                if let Some(vin) = self.vin.take() {
                    vehicle::logout(&self.ctx, &vin);
                }
            }
            _ => {
                self.ctx.counters.refuse("unsupported command");
                self.respond(&f, resp::ERROR);
            }
        }
    }

    fn call(&mut self, c: Command) {
        let Some(vin) = self.vin.clone() else {
            answer(c, 503, json!({}), "the vehicle is not logged in");
            return;
        };
        let now = Time::from_unix_ms(crate::now_ms());
        let (command, m) = match &c.op {
            Op::Get(ids) => {
                let data: Map<String, Value> = self
                    .latest
                    .iter()
                    .filter(|(k, _)| ids.is_empty() || ids.contains(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                answer(c, 200, Value::Object(data), "");
                return;
            }
            Op::Set(_) => {
                answer(
                    c,
                    460,
                    json!({}),
                    "a GB/T 32960 vehicle's properties are read-only: use Setup or Control",
                );
                return;
            }
            Op::Upgrade(_) => {
                answer(
                    c,
                    460,
                    json!({}),
                    "GB/T 32960 remote upgrades (0x82 command 1: the vehicle fetches the image by URL) are not supported by this gateway",
                );
                return;
            }
            Op::Service(name, p) => match name.as_str() {
                "Query" => {
                    let ids: Vec<u8> = match p.get("ids") {
                        Some(Value::Array(a)) => a
                            .iter()
                            .filter_map(|v| v.as_u64().and_then(|n| u8::try_from(n).ok()))
                            .collect(),
                        _ => (1..=0x10).collect(),
                    };
                    (
                        cmd::QUERY,
                        Message::Query {
                            time: now,
                            ids,
                            params: Vec::new(),
                        },
                    )
                }
                "Setup" => match setup_from(p) {
                    Ok(params) => (cmd::SETUP, Message::Setup { time: now, params }),
                    Err(e) => {
                        answer(c, 460, json!({}), &e);
                        return;
                    }
                },
                "Control" => {
                    let Some(command) = p
                        .get("command")
                        .and_then(Value::as_u64)
                        .and_then(|n| u8::try_from(n).ok())
                        .filter(|n| (1..=0x7F).contains(n))
                    else {
                        answer(
                            c,
                            460,
                            json!({}),
                            "command: 1 (upgrade) to 7 (sampling check), or 0x08-0x7F",
                        );
                        return;
                    };
                    let params = match p.get("params").and_then(Value::as_str) {
                        None => Vec::new(),
                        Some(h) => match (0..h.len())
                            .step_by(2)
                            .map(|i| h.get(i..i + 2).and_then(|x| u8::from_str_radix(x, 16).ok()))
                            .collect::<Option<Vec<u8>>>()
                        {
                            Some(b) => b,
                            None => {
                                answer(c, 460, json!({}), "params: hex bytes");
                                return;
                            }
                        },
                    };
                    (
                        cmd::CONTROL,
                        Message::Control {
                            time: now,
                            command,
                            params,
                        },
                    )
                }
                other => {
                    let msg = format!("no service `{other}` on a GB/T 32960 vehicle");
                    answer(c, 404, json!({}), &msg);
                    return;
                }
            },
        };
        if self.waiting.contains_key(&command) {
            answer(
                c,
                503,
                json!({}),
                "a call of this kind is already waiting for the vehicle",
            );
            return;
        }
        match g::encode_frame(command, resp::COMMAND, &vin, &g::encode(&m)) {
            Ok(b) => self.out.extend_from_slice(&b),
            Err(e) => {
                answer(c, 460, json!({}), &e.to_string());
                return;
            }
        }
        let deadline = Instant::now() + self.ctx.cfg.answer_timeout;
        self.waiting.insert(command, Waiting { cmd: c, deadline });
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<u8> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in late {
            if let Some(w) = self.waiting.remove(&k) {
                w.answer(Outcome {
                    code: 503,
                    data: json!({}),
                    message: "the vehicle did not answer in time".into(),
                });
            }
        }
    }
}

/// Serves one vehicle connection until it closes, idles out, or the gateway stops.
pub async fn connection(stream: TcpStream, ctx: Arc<Ctx>) {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut calls) = crate::link::inbox(16);
    let mut c = Conn {
        ctx: ctx.clone(),
        vin: None,
        waiting: HashMap::new(),
        out: Vec::new(),
        alarm: (0, 0),
        latest: Map::new(),
    };
    let mut deframer = Deframer::new();
    let mut buf = vec![0u8; 1024];
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
                    match f {
                        Ok(f) => c.frame(f).await,
                        Err(e) => {
                            tracing::info!(error = %e, "GB/T 32960 frame skipped");
                            ctx.counters.refuse(match e {
                                g::Error::Bcc { .. } => "bad BCC",
                                g::Error::Encrypted(_) => "encrypted",
                                _ => "malformed frame",
                            });
                        }
                    }
                }
                if routed.as_deref() != c.vin.as_deref() {
                    if let Some(old) = routed.take() {
                        ctx.subs.unroute(&old, &tx);
                    }
                    if let Some(vin) = &c.vin {
                        ctx.subs.route(vin, tx.clone());
                        routed = Some(vin.clone());
                    }
                }
            }
            Some(cmd) = calls.recv() => c.call(*cmd),
            _ = tick.tick() => {
                c.expire();
                if Instant::now() >= idle_until {
                    tracing::info!(vehicle = ?c.vin, "GB/T 32960 vehicle idle: closing");
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
    if let Some(vin) = &routed {
        ctx.subs.unroute(vin, &tx);
    }
    for (_, w) in c.waiting.drain() {
        w.answer(Outcome {
            code: 503,
            data: json!({}),
            message: "the vehicle disconnected".into(),
        });
    }
    if let Some(vin) = c.vin.take() {
        vehicle::logout(&ctx, &vin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_parameters_bring_their_lengths() {
        let call = json!({"params": {"0x01": 30000, "0x05": "iot.example.com", "9": 30}});
        let ps = setup_from(call.as_object().unwrap()).unwrap();
        assert!(ps.contains(&Param::Word(1, 30000)));
        assert!(ps.contains(&Param::Byte(4, 15)));
        assert!(ps.contains(&Param::Text(5, "iot.example.com".into())));
        assert!(ps.contains(&Param::Byte(9, 30)));
        for bad in [
            json!({"params": {"0x01": 70000}}),
            json!({"params": {"0x07": "x"}}),
            json!({"params": {}}),
            json!({}),
        ] {
            assert!(setup_from(bad.as_object().unwrap()).is_err(), "{bad}");
        }
    }
}
