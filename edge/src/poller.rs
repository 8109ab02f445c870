//! Polling one Modbus sub-device: its points coalesced into as few reads as the limits allow
//! (see `ironlink_protocols::modbus::plan_reads`), each read bounded by the device's timeout
//! and retried, values decoded, scaled and filtered by their deadband. A Modbus exception is
//! the device's answer, reported as data about the device, not a transport failure; neither
//! ever panics or stalls other devices.

use crate::config::{Device, Point};
use ironlink_protocols::modbus::{
    decode, decode_str, encode, plan_reads, DataType, Plan, Raw, Read, RegisterKind, WordOrder,
};
use serde_json::{Map, Value as Json};
use tokio_modbus::client::{Context, Reader, Writer};

/// A decoded value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A bit, or a bool register.
    Bool(bool),
    /// A number after scale and offset.
    Number(f64),
    /// A string point.
    Text(String),
}

/// One value of one point at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Thing-model property.
    pub identifier: String,
    /// The value.
    pub value: Value,
    /// When it was read, ms since the Unix epoch.
    pub ts: i64,
}

/// Why a poll did not produce every point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PollError {
    /// The device answered with a Modbus exception.
    #[error("device answered {read_kind:?} {start}+{count} with exception {code}")]
    Exception {
        /// Table.
        read_kind: RegisterKind,
        /// First address.
        start: u16,
        /// Count.
        count: u16,
        /// The exception, e.g. IllegalDataAddress.
        code: String,
    },
    /// No answer within the timeout, after the retries.
    #[error("no answer within {0} ms after retries")]
    Timeout(u64),
    /// The connection failed.
    #[error("transport: {0}")]
    Transport(String),
    /// Fewer registers than asked for.
    #[error("short reply: asked {asked}, got {got}")]
    Short {
        /// Asked.
        asked: u16,
        /// Got.
        got: usize,
    },
}

/// Polls one device.
#[derive(Debug)]
pub struct Poller {
    device: Device,
    plan: Plan,
    /// Last value reported per point (the deadband compares against it).
    last: Vec<Option<Value>>,
    /// Last value read per point.
    current: Vec<Option<Value>>,
}

/// One Modbus write request: FC05/FC15 for coils, FC06/FC16 for holding registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Coils from `start`: one is FC05, more FC15.
    Coils {
        /// First coil.
        start: u16,
        /// Values.
        bits: Vec<bool>,
    },
    /// Holding registers from `start`: one is FC06, more FC16.
    Registers {
        /// First register.
        start: u16,
        /// Values.
        words: Vec<u16>,
    },
}

impl WriteOp {
    /// The Modbus function code this request uses.
    pub fn function(&self) -> u8 {
        match self {
            Self::Coils { bits, .. } if bits.len() == 1 => 5,
            Self::Coils { .. } => 15,
            Self::Registers { words, .. } if words.len() == 1 => 6,
            Self::Registers { .. } => 16,
        }
    }
}

/// Encodes one point's engineering value into registers (bits as 0/1).
fn encode_point(p: &Point, v: &Json) -> Result<Vec<u16>, String> {
    let id = &p.identifier;
    if let DataType::String(n) = p.data_type {
        let Some(text) = v.as_str() else {
            return Err(format!("{id}: expects text"));
        };
        let bytes = text.as_bytes();
        if bytes.len() > usize::from(n) * 2 {
            return Err(format!(
                "{id}: text longer than {} bytes",
                usize::from(n) * 2
            ));
        }
        let at = |i: usize| bytes.get(i).copied().unwrap_or(0);
        return Ok((0..usize::from(n))
            .map(|i| match p.order {
                WordOrder::Abcd | WordOrder::Cdab => u16::from_be_bytes([at(2 * i), at(2 * i + 1)]),
                WordOrder::Badc | WordOrder::Dcba => u16::from_be_bytes([at(2 * i + 1), at(2 * i)]),
            })
            .collect());
    }
    let x = match v {
        Json::Bool(b) => f64::from(u8::from(*b)),
        Json::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        Json::String(t) => t
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("{id}: `{t}` is not a number"))?,
        _ => return Err(format!("{id}: expects a number")),
    };
    if p.data_type == DataType::Bool {
        return match x {
            0.0 => Ok(vec![0]),
            1.0 => Ok(vec![1]),
            _ => Err(format!(
                "{id}: a bool point takes 0, 1, true or false, not {x}"
            )),
        };
    }
    let mut out = [0u16; 4];
    let n = encode(p.data_type, p.order, x, p.scale, p.offset, &mut out).map_err(|_| {
        format!(
            "{id}: {x} does not fit {:?} after scale and offset",
            p.data_type
        )
    })?;
    Ok(out.get(..n).unwrap_or_default().to_vec())
}

/// Reads gaps of up to this many registers rather than sending another request.
const MAX_GAP: u16 = 8;

impl Poller {
    /// Plans the device's reads.
    pub fn new(device: Device) -> Result<Self, ironlink_protocols::modbus::PointError> {
        let points: Vec<(RegisterKind, u16, u16)> = device
            .points
            .iter()
            .map(|p| (p.kind, p.address, p.data_type.registers()))
            .collect();
        let plan = plan_reads(&points, MAX_GAP)?;
        let last = vec![None; device.points.len()];
        let current = last.clone();
        Ok(Self {
            device,
            plan,
            last,
            current,
        })
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The last values read of the named points (every point when `ids` is empty), for a
    /// property get. Unknown names are an error naming them.
    pub fn latest(&self, ids: &[String]) -> Result<Map<String, Json>, String> {
        let mut out = Map::new();
        let unknown: Vec<&str> = ids
            .iter()
            .filter(|i| !self.device.points.iter().any(|p| &p.identifier == *i))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            return Err(format!("no such point: {}", unknown.join(", ")));
        }
        for (p, v) in self.device.points.iter().zip(&self.current) {
            if !ids.is_empty() && !ids.contains(&p.identifier) {
                continue;
            }
            if let Some(v) = v {
                out.insert(p.identifier.clone(), value_json(v));
            }
        }
        Ok(out)
    }

    /// The values a service call writes: the service's constants, then the call's parameters
    /// (each must name a point). An unknown service is an error.
    pub fn service_writes(
        &self,
        identifier: &str,
        params: &Map<String, Json>,
    ) -> Result<Vec<(String, Json)>, String> {
        let Some(s) = self
            .device
            .services
            .iter()
            .find(|s| s.identifier == identifier)
        else {
            return Err(format!(
                "service `{identifier}` is not configured for this device"
            ));
        };
        let mut out = s.set.clone();
        out.extend(params.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(out)
    }

    /// Checks and encodes writes (all of them before any is sent), coalescing adjacent points
    /// of one table into one request.
    pub fn plan_writes(&self, items: &[(String, Json)]) -> Result<Vec<WriteOp>, String> {
        if items.is_empty() {
            return Err("nothing to write".into());
        }
        let mut cells: Vec<(RegisterKind, u16, Vec<u16>)> = Vec::with_capacity(items.len());
        let mut errors = Vec::new();
        for (id, v) in items {
            let Some(p) = self.device.points.iter().find(|p| &p.identifier == id) else {
                errors.push(format!("{id}: no such point"));
                continue;
            };
            if !p.kind.writable() {
                errors.push(format!("{id}: read-only ({:?})", p.kind));
                continue;
            }
            match encode_point(p, v) {
                Ok(words) => cells.push((p.kind, p.address, words)),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        cells.sort_by_key(|c| (c.0 == RegisterKind::HoldingRegister, c.1));
        let mut ops: Vec<WriteOp> = Vec::new();
        let mut end: Option<(RegisterKind, u32)> = None;
        for (kind, addr, words) in cells {
            if end.is_some_and(|(k, e)| k == kind && u32::from(addr) < e) {
                return Err(format!("two values for {kind:?} {addr}"));
            }
            let adjacent = end == Some((kind, u32::from(addr)));
            let n = u32::try_from(words.len()).unwrap_or(u32::MAX);
            match (ops.last_mut(), kind) {
                (Some(WriteOp::Coils { bits, .. }), RegisterKind::Coil)
                    if adjacent && bits.len() < 1968 =>
                {
                    bits.extend(words.iter().map(|w| *w != 0));
                }
                (Some(WriteOp::Registers { words: w, .. }), RegisterKind::HoldingRegister)
                    if adjacent && w.len() + words.len() <= 123 =>
                {
                    w.extend(words);
                }
                (_, RegisterKind::Coil) => ops.push(WriteOp::Coils {
                    start: addr,
                    bits: words.iter().map(|w| *w != 0).collect(),
                }),
                _ => ops.push(WriteOp::Registers { start: addr, words }),
            }
            end = Some((kind, u32::from(addr) + n));
        }
        Ok(ops)
    }

    /// Sends planned writes in order, each bounded by the timeout and retried (the writes
    /// set absolute values, so a retry is harmless). Stops at the first failure.
    pub async fn write(&self, ctx: &mut Context, ops: &[WriteOp]) -> Result<(), PollError> {
        for op in ops {
            let mut attempt = 0;
            loop {
                let fut = async {
                    match op {
                        WriteOp::Coils { start, bits } => match bits.as_slice() {
                            [bit] => ctx.write_single_coil(*start, *bit).await,
                            _ => ctx.write_multiple_coils(*start, bits).await,
                        },
                        WriteOp::Registers { start, words } => match words.as_slice() {
                            [word] => ctx.write_single_register(*start, *word).await,
                            _ => ctx.write_multiple_registers(*start, words).await,
                        },
                    }
                };
                match tokio::time::timeout(self.device.timeout, fut).await {
                    Ok(Ok(Ok(()))) => break,
                    Ok(Ok(Err(code))) => {
                        let (read_kind, start, count) = match op {
                            WriteOp::Coils { start, bits } => {
                                (RegisterKind::Coil, *start, bits.len())
                            }
                            WriteOp::Registers { start, words } => {
                                (RegisterKind::HoldingRegister, *start, words.len())
                            }
                        };
                        return Err(PollError::Exception {
                            read_kind,
                            start,
                            count: u16::try_from(count).unwrap_or(u16::MAX),
                            code: format!("{code:?}"),
                        });
                    }
                    Ok(Err(e)) => return Err(PollError::Transport(e.to_string())),
                    Err(_) if attempt < self.device.retries => attempt += 1,
                    Err(_) => {
                        return Err(PollError::Timeout(
                            u64::try_from(self.device.timeout.as_millis()).unwrap_or(u64::MAX),
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// Requests one poll sends.
    pub fn reads(&self) -> &[Read] {
        &self.plan.reads
    }

    async fn read(&self, ctx: &mut Context, r: &Read) -> Result<Vec<u16>, PollError> {
        let mut attempt = 0;
        loop {
            let fut = async {
                match r.kind {
                    RegisterKind::Coil => ctx
                        .read_coils(r.start, r.count)
                        .await
                        .map(|x| x.map(|bits| bits.into_iter().map(u16::from).collect())),
                    RegisterKind::DiscreteInput => ctx
                        .read_discrete_inputs(r.start, r.count)
                        .await
                        .map(|x| x.map(|bits| bits.into_iter().map(u16::from).collect())),
                    RegisterKind::InputRegister => ctx.read_input_registers(r.start, r.count).await,
                    RegisterKind::HoldingRegister => {
                        ctx.read_holding_registers(r.start, r.count).await
                    }
                }
            };
            match tokio::time::timeout(self.device.timeout, fut).await {
                Ok(Ok(Ok(words))) => {
                    if words.len() < usize::from(r.count) {
                        return Err(PollError::Short {
                            asked: r.count,
                            got: words.len(),
                        });
                    }
                    return Ok(words);
                }
                Ok(Ok(Err(code))) => {
                    return Err(PollError::Exception {
                        read_kind: r.kind,
                        start: r.start,
                        count: r.count,
                        code: format!("{code:?}"),
                    })
                }
                Ok(Err(e)) => return Err(PollError::Transport(e.to_string())),
                Err(_) if attempt < self.device.retries => attempt += 1,
                Err(_) => {
                    return Err(PollError::Timeout(
                        u64::try_from(self.device.timeout.as_millis()).unwrap_or(u64::MAX),
                    ))
                }
            }
        }
    }

    /// One poll: every read, then the points whose value changed beyond their deadband (all
    /// of them on the first poll). Stops at the first failed read.
    pub async fn poll(
        &mut self,
        ctx: &mut Context,
        now_ms: i64,
    ) -> Result<Vec<Reading>, PollError> {
        let mut data = Vec::with_capacity(self.plan.reads.len());
        for r in &self.plan.reads {
            data.push(self.read(ctx, r).await?);
        }
        let mut out = Vec::new();
        // `plan.at` and `last` have one entry per point (built from the same list in `new`).
        for (i, p) in self.device.points.iter().enumerate() {
            let (ri, off) = self.plan.at[i];
            let Some(words) = data.get(ri).and_then(|w| w.get(usize::from(off)..)) else {
                continue;
            };
            let Some(value) = value_of(p, words) else {
                continue;
            };
            self.current[i] = Some(value.clone());
            let changed = match (&self.last[i], &value) {
                (Some(Value::Number(a)), Value::Number(b)) => {
                    (a - b).abs() > p.deadband || p.deadband == 0.0
                }
                (Some(old), new) => old != new || p.deadband == 0.0,
                (None, _) => true,
            };
            if changed {
                self.last[i] = Some(value.clone());
                out.push(Reading {
                    identifier: p.identifier.clone(),
                    value,
                    ts: now_ms,
                });
            }
        }
        Ok(out)
    }
}

/// A value as Alink JSON (bools as 0/1, the thing model's `bool` type; whole numbers as JSON
/// integers, which `int` properties require and `float` ones accept).
pub fn value_json(v: &Value) -> Json {
    match v {
        Value::Bool(b) => Json::from(u8::from(*b)),
        Value::Number(n) if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 => {
            Json::from(*n as i64)
        }
        Value::Number(n) => Json::from(*n),
        Value::Text(s) => Json::from(s.as_str()),
    }
}

fn value_of(p: &Point, words: &[u16]) -> Option<Value> {
    match p.data_type {
        DataType::String(n) => {
            let mut buf = vec![0u8; usize::from(n) * 2];
            decode_str(words.get(..usize::from(n))?, p.order, &mut buf)
                .ok()
                .map(|s| Value::Text(s.to_owned()))
        }
        DataType::Bool => decode(p.data_type, p.order, words)
            .ok()
            .map(|r| Value::Bool(r.as_f64() != 0.0)),
        t => decode(t, p.order, words).ok().map(|r| {
            let x = match (t, r) {
                // An f32 widened to f64 shows digits the device never sent (123.456 becomes
                // 123.45600128173828): take the shortest decimal that is the same f32.
                (DataType::F32, Raw::Float(f)) => shortest_f32(f),
                _ => r.as_f64(),
            };
            if p.scale == 1.0 && p.offset == 0.0 {
                Value::Number(x)
            } else {
                // 2150 * 0.1 - 200 is 15.000000000000028 in binary: keep 12 significant digits.
                Value::Number(significant(x * p.scale + p.offset, 12))
            }
        }),
    }
}

fn shortest_f32(f: f64) -> f64 {
    (f as f32).to_string().parse().unwrap_or(f)
}

fn significant(x: f64, digits: usize) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    format!("{:.*e}", digits.saturating_sub(1), x)
        .parse()
        .unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use serde_json::json;
    use std::future;
    use std::sync::Arc;
    use tokio_modbus::prelude::*;
    use tokio_modbus::server::tcp::{accept_tcp_connection, Server};

    /// A field device: holding 0..1 = 123.456 (f32 CDAB), input 10..11 = 1234567 (u32), coil 0 on.
    struct Field;

    impl tokio_modbus::server::Service for Field {
        type Request = Request<'static>;
        type Response = Response;
        type Exception = ExceptionCode;
        type Future = future::Ready<Result<Response, ExceptionCode>>;

        fn call(&self, req: Request<'static>) -> Self::Future {
            let bits = 123.456f32.to_bits();
            let holding = [(bits & 0xFFFF) as u16, (bits >> 16) as u16];
            let input = [(1_234_567u32 >> 16) as u16, (1_234_567u32 & 0xFFFF) as u16];
            future::ready(match req {
                Request::ReadHoldingRegisters(a, n) if u32::from(a) + u32::from(n) <= 2 => {
                    Ok(Response::ReadHoldingRegisters(
                        holding[usize::from(a)..usize::from(a + n)].to_vec(),
                    ))
                }
                Request::ReadInputRegisters(10, 2) => {
                    Ok(Response::ReadInputRegisters(input.to_vec()))
                }
                Request::ReadCoils(0, n) => {
                    Ok(Response::ReadCoils((0..n).map(|i| i == 0).collect()))
                }
                _ => Err(ExceptionCode::IllegalDataAddress),
            })
        }
    }

    async fn field() -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = Server::new(l);
        tokio::spawn(async move {
            let new_service = |_| Ok(Some(Arc::new(Field)));
            let on_connected =
                |stream, a| async move { accept_tcp_connection(stream, a, new_service) };
            let _ = server.serve(&on_connected, |_| {}).await;
        });
        addr
    }

    fn device(addr: std::net::SocketAddr, extra: &str) -> Device {
        let text = format!(
            r#"
[gateway]
product_key = "g"
device_name = "gw-0001"
device_secret = "s"
[uplink]
host = "127.0.0.1"
[[devices]]
name = "meter-01"
product_key = "p"
device_secret = "x"
transport = "tcp"
address = "{addr}"
timeout = "2s"
[[devices.points]]
identifier = "Voltage"
kind = "holding"
address = "40001"
type = "f32"
order = "CDAB"
[[devices.points]]
identifier = "Energy"
kind = "input"
address = "30011"
type = "u32"
scale = 0.01
deadband = 1.0
[[devices.points]]
identifier = "Relay"
kind = "coil"
address = "0"
type = "bool"
{extra}"#
        );
        Config::parse("t.toml", &text).unwrap().devices.remove(0)
    }

    #[tokio::test]
    async fn points_are_read_decoded_scaled_and_filtered() {
        let addr = field().await;
        let mut p = Poller::new(device(addr, "")).unwrap();
        assert_eq!(p.reads().len(), 3, "one read per table");
        let mut ctx = tcp::connect(addr).await.unwrap();
        let r = p.poll(&mut ctx, 1000).await.unwrap();
        let v: Vec<(&str, &Value)> = r
            .iter()
            .map(|r| (r.identifier.as_str(), &r.value))
            .collect();
        assert_eq!(v.len(), 3);
        match v[0] {
            ("Voltage", Value::Number(x)) => assert_eq!(*x, 123.456, "the f32's shortest decimal"),
            other => panic!("{other:?}"),
        }
        assert_eq!(v[1], ("Energy", &Value::Number(12345.67)));
        assert_eq!(v[2], ("Relay", &Value::Bool(true)));
        // Deadband 0 reports every poll; Energy (deadband 1.0) is unchanged, so it is not sent.
        let again: Vec<String> = p
            .poll(&mut ctx, 2000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.identifier)
            .collect();
        assert_eq!(again, ["Voltage", "Relay"]);
    }

    #[test]
    fn writes_are_checked_then_coalesced_per_table() {
        let extra = r#"
[[devices.points]]
identifier = "Mode"
kind = "holding"
address = "40003"
type = "u16"
[[devices.points]]
identifier = "Label"
kind = "holding"
address = "40010"
type = "string(2)"
order = "BADC"
[[devices.points]]
identifier = "Fan"
kind = "coil"
address = "1"
type = "bool"
"#;
        let addr = "127.0.0.1:1".parse().unwrap();
        let p = Poller::new(device(addr, extra)).unwrap();
        let w = |items: Json| {
            let items: Vec<(String, Json)> = items
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            p.plan_writes(&items)
        };
        // Voltage (f32 CDAB at 0..1) and Mode (u16 at 2) are adjacent: one FC16.
        let ops = w(json!({"Voltage": 1.5, "Mode": 9, "Relay": true, "Fan": false})).unwrap();
        let bits = 1.5f32.to_bits();
        assert_eq!(
            ops,
            [
                WriteOp::Coils {
                    start: 0,
                    bits: vec![true, false]
                },
                WriteOp::Registers {
                    start: 0,
                    words: vec![(bits & 0xFFFF) as u16, (bits >> 16) as u16, 9]
                },
            ]
        );
        assert_eq!(
            ops.iter().map(WriteOp::function).collect::<Vec<_>>(),
            [15, 16]
        );
        let one = w(json!({"Mode": "12"})).unwrap();
        assert_eq!(one[0].function(), 6);
        assert_eq!(w(json!({"Fan": 1})).unwrap()[0].function(), 5);
        // Strings: bytes swapped within each register for BADC, padded with NULs.
        assert_eq!(
            w(json!({"Label": "abc"})).unwrap(),
            [WriteOp::Registers {
                start: 9,
                words: vec![
                    u16::from_be_bytes([b'b', b'a']),
                    u16::from_be_bytes([0, b'c'])
                ]
            }]
        );
        // Every problem is named; nothing is written when any item is wrong.
        let e = w(json!({"Energy": 1, "Nope": 1, "Mode": 70000, "Relay": 2, "Label": "too long"}))
            .unwrap_err();
        for part in [
            "Energy: read-only",
            "Nope: no such point",
            "Mode: 70000 does not fit",
            "Relay: a bool point takes",
            "Label: text longer than 4 bytes",
        ] {
            assert!(e.contains(part), "{part} in {e}");
        }
        assert!(w(json!({})).is_err());
        // Scale is inverted: Energy would be raw * 0.01, but it is read-only; Voltage has
        // scale 1, so a value past f32 is refused.
        assert!(w(json!({"Voltage": 1e300})).is_err());
    }

    #[tokio::test]
    async fn an_exception_is_the_device_s_answer_not_a_crash() {
        let addr = field().await;
        let extra = "[[devices.points]]\nidentifier = \"Missing\"\nkind = \"holding\"\naddress = \"40500\"\ntype = \"u16\"\n";
        let mut p = Poller::new(device(addr, extra)).unwrap();
        let mut ctx = tcp::connect(addr).await.unwrap();
        match p.poll(&mut ctx, 1000).await {
            Err(PollError::Exception { code, start, .. }) => {
                assert_eq!(start, 499);
                assert!(code.contains("IllegalDataAddress"), "{code}");
            }
            other => panic!("{other:?}"),
        }
    }
}
