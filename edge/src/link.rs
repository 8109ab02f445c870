//! One southbound link: a Modbus TCP connection to one device, or a serial line (RTU) shared by
//! every device on that bus. The link's task owns the connection, polls each device when it is
//! due (devices on one bus take turns, as the bus allows one request at a time), and carries
//! out the cloud's writes and reads between polls. Readings and fault events go to the queue;
//! a device that fails is reported and retried, never stalls devices on other links.

use crate::config::{Device, Transport};
use crate::now_ms;
use crate::poller::{PollError, Poller};
use crate::queue::Queue;
use crate::status::Status;
use serde_json::{json, Map, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_modbus::client::Context;
use tokio_modbus::slave::{Slave, SlaveContext};

/// What the cloud asks of a sub-device.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Property set: identifier -> value.
    Set(Map<String, Value>),
    /// Property get: these identifiers (all when empty).
    Get(Vec<String>),
    /// Service call: identifier and input parameters.
    Service(String, Map<String, Value>),
    /// A firmware upgrade, the image checked and on the gateway's disk: the link answers 200
    /// when it takes charge of delivering it in its protocol (it then reports the progress
    /// itself), or why it cannot.
    Upgrade(Arc<crate::sub_ota::Offer>),
}

/// The answer to one [`Command`], in Alink terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// 200 on success; 460 bad parameters; 503 device unreachable or not answering; 500 the
    /// device refused (Modbus exception).
    pub code: u32,
    /// Reply data.
    pub data: Value,
    /// Why, when not 200.
    pub message: String,
}

impl Outcome {
    fn ok(data: Value) -> Self {
        Self {
            code: 200,
            data,
            message: String::new(),
        }
    }

    fn err(code: u32, message: impl Into<String>) -> Self {
        Self {
            code,
            data: json!({}),
            message: message.into(),
        }
    }
}

/// Where a link takes its commands: boxed, so that a link's channel, allocated when the link
/// starts with room for 32 of them, costs 256 bytes rather than 4 KiB (a JT/T 808 server has
/// one per connected terminal).
pub type Inbox = mpsc::Sender<Box<Command>>;
/// A link's side of its [`Inbox`].
pub type Mailbox = mpsc::Receiver<Box<Command>>;

/// A link's channel for `capacity` commands.
pub fn inbox(capacity: usize) -> (Inbox, Mailbox) {
    mpsc::channel(capacity)
}

/// A request for one sub-device; the outcome goes back on `reply` with `tag`.
#[derive(Debug)]
pub struct Command {
    /// Device name.
    pub device: String,
    /// What to do.
    pub op: Op,
    /// Handed back with the outcome (the uplink puts the reply topic and id here).
    pub tag: (String, String),
    /// Where the outcome goes.
    pub reply: mpsc::UnboundedSender<((String, String), Outcome)>,
}

impl Command {
    fn answer(self, o: Outcome) {
        let _ = self.reply.send((self.tag, o));
    }
}

/// Where a link's readings and events go, and where it reports.
#[derive(Debug, Clone)]
pub struct Sink {
    /// The queue.
    pub queue: Arc<Mutex<Queue>>,
    /// Notified after each append.
    pub wake: Arc<Notify>,
    /// Per-device status.
    pub status: Arc<Status>,
}

impl Sink {
    /// Queues a record; true once it is in the queue's file (it then survives a kill of the
    /// process), false when the queue refused it (full, or a disk error).
    pub fn push(&self, now: i64, payload: &Value) -> bool {
        let bytes = payload.to_string();
        let ok = self
            .queue
            .lock()
            .map(|mut q| q.append(now, bytes.as_bytes()).is_ok())
            .unwrap_or(false);
        if ok {
            self.wake.notify_one();
        }
        ok
    }

    fn append(&self, device: &str, now: i64, payload: &Value) {
        let bytes = payload.to_string();
        let appended = self.queue.lock().map_err(|_| ()).and_then(|mut q| {
            q.append(now, bytes.as_bytes()).map(|_| ()).map_err(|e| {
                tracing::warn!(device, error = %e, "reading not queued");
            })
        });
        if appended.is_ok() {
            self.wake.notify_one();
        }
    }
}

/// One device on a link.
struct Member {
    poller: Poller,
    due: Instant,
    /// The kind of the current failure, if failing.
    fault: Option<&'static str>,
}

impl Member {
    fn name(&self) -> &str {
        &self.poller.device().name
    }

    /// Records a poll outcome: status, and a fault event when the kind of failure changes.
    fn report(&mut self, sink: &Sink, now: i64, fault: Option<(&'static str, String)>) {
        let name = self.name().to_owned();
        let kind = fault.as_ref().map(|f| f.0);
        sink.status.update(&name, |s| match &fault {
            None => {
                s.state = "ok".into();
                s.last_ok_ms = Some(now);
            }
            Some((k, msg)) => {
                s.state = if *k == "unreachable" {
                    "unreachable"
                } else {
                    "error"
                }
                .into();
                s.last_error = Some(msg.clone());
                *s.errors.entry(k).or_default() += 1;
            }
        });
        if kind == self.fault {
            return;
        }
        let was = std::mem::replace(&mut self.fault, kind);
        let event = &self.poller.device().fault_event;
        // A device that has never failed does not announce it is fine.
        if event.is_empty() || (was.is_none() && kind.is_none()) {
            return;
        }
        let (k, message) = fault.unwrap_or(("recovered", String::new()));
        sink.append(
            &name,
            now,
            &json!({"dn": name, "event": event, "time": now,
                    "params": {"kind": k, "message": message}}),
        );
    }
}

fn kind_of(e: &PollError) -> &'static str {
    match e {
        PollError::Exception { .. } => "exception",
        PollError::Timeout(_) => "timeout",
        PollError::Transport(_) => "transport",
        PollError::Short { .. } => "short",
    }
}

async fn connect(device: &Device) -> Result<Context, String> {
    let slave = Slave(device.unit_id);
    match &device.transport {
        Transport::Tcp(addr) => {
            let sa = tokio::net::lookup_host(addr.as_str())
                .await
                .map_err(|e| format!("{addr}: {e}"))?
                .next()
                .ok_or_else(|| format!("{addr}: no address"))?;
            tokio::time::timeout(
                device.timeout.max(Duration::from_secs(1)),
                tokio_modbus::client::tcp::connect_slave(sa, slave),
            )
            .await
            .map_err(|_| format!("{addr}: connect timed out"))?
            .map_err(|e| format!("{addr}: {e}"))
        }
        Transport::Rtu(line) => {
            use tokio_serial::{DataBits, Parity, StopBits};
            let builder = tokio_serial::new(&line.path, line.baud)
                .data_bits(if line.data_bits == 7 {
                    DataBits::Seven
                } else {
                    DataBits::Eight
                })
                .parity(match line.parity {
                    'E' => Parity::Even,
                    'O' => Parity::Odd,
                    _ => Parity::None,
                })
                .stop_bits(if line.stop_bits == 2 {
                    StopBits::Two
                } else {
                    StopBits::One
                });
            let port = tokio_serial::SerialStream::open(&builder)
                .map_err(|e| format!("{}: {e}", line.path))?;
            Ok(tokio_modbus::client::rtu::attach_slave(port, slave))
        }
    }
}

/// Groups devices into links: each TCP device alone, RTU devices by serial port.
pub fn links(devices: &[Device]) -> Vec<Vec<Device>> {
    let mut out: Vec<Vec<Device>> = Vec::new();
    for d in devices {
        if let Transport::Rtu(line) = &d.transport {
            if let Some(bus) = out.iter_mut().find(
                |l| matches!(l.first().map(|f| &f.transport), Some(Transport::Rtu(o)) if o.path == line.path),
            ) {
                bus.push(d.clone());
                continue;
            }
        }
        out.push(vec![d.clone()]);
    }
    out
}

/// Runs one link until `stop`. Its first polls start `phase` into their interval (a
/// fraction, 0..1), so that many links spread their polls over the interval instead of all
/// polling, and all posting, at the same instant.
pub async fn run(
    devices: Vec<Device>,
    phase: f64,
    sink: Sink,
    mut commands: Mailbox,
    mut stop: watch::Receiver<bool>,
) {
    let mut members: Vec<Member> = Vec::with_capacity(devices.len());
    for d in devices {
        let name = d.name.clone();
        let first = Instant::now() + d.poll_interval.mul_f64(phase.clamp(0.0, 1.0));
        match Poller::new(d) {
            Ok(poller) => members.push(Member {
                poller,
                due: first,
                fault: None,
            }),
            Err(e) => {
                tracing::error!(device = %name, error = %e, "point table refused");
                sink.status.update(&name, |s| {
                    s.state = "misconfigured".into();
                    s.last_error = Some(e.to_string());
                });
            }
        }
    }
    let Some(first) = members.first() else { return };
    let first = first.poller.device().clone();
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut ctx = match connect(&first).await {
            Ok(c) => {
                backoff = Duration::from_millis(200);
                c
            }
            Err(e) => {
                tracing::warn!(link = %first.name, error = %e, "cannot reach the device");
                let now = now_ms();
                for m in &mut members {
                    m.report(&sink, now, Some(("unreachable", e.clone())));
                }
                let until = Instant::now() + backoff;
                // Commands meanwhile are answered at once: the device cannot be reached.
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        c = commands.recv() => match c {
                            Some(c) => (*c).answer(Outcome::err(503, format!("device unreachable: {e}"))),
                            None => return,
                        },
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        // Poll and serve commands until the connection fails.
        loop {
            let Some(next) = members
                .iter()
                .enumerate()
                .min_by_key(|(_, m)| m.due)
                .map(|(i, _)| i)
            else {
                return;
            };
            let due = members.get(next).map_or_else(Instant::now, |m| m.due);
            let command = tokio::select! {
                _ = tokio::time::sleep_until(due) => None,
                c = commands.recv() => match c {
                    Some(c) => Some(*c),
                    None => return,
                },
                _ = stop.wait_for(|s| *s) => return,
            };
            let failed = match command {
                None => poll_one(&mut members, next, &mut ctx, &sink).await,
                Some(c) => serve(&mut members, &mut ctx, &sink, c).await,
            };
            if let Some(e) = failed {
                tracing::warn!(link = %first.name, error = %e, "connection to the device lost");
                break;
            }
        }
    }
}

/// Polls member `i`; returns the error when the connection is lost.
async fn poll_one(
    members: &mut [Member],
    i: usize,
    ctx: &mut Context,
    sink: &Sink,
) -> Option<String> {
    let m = members.get_mut(i)?;
    let interval = m.poller.device().poll_interval;
    let now_i = Instant::now();
    m.due += interval;
    if m.due < now_i {
        // Late (slow device or bus): skip missed polls rather than burst.
        m.due = now_i + interval;
    }
    ctx.set_slave(Slave(m.poller.device().unit_id));
    let now = now_ms();
    let started = std::time::Instant::now();
    let result = m.poller.poll(ctx, now).await;
    sink.status.poll_latency.since(started);
    let name = m.name().to_owned();
    match result {
        Ok(readings) => {
            let n = readings.len() as u64;
            sink.status.update(&name, |s| s.points += n);
            m.report(sink, now, None);
            if !readings.is_empty() {
                let params: Map<String, Value> = readings
                    .iter()
                    .map(|r| {
                        (
                            r.identifier.clone(),
                            json!({"value": crate::poller::value_json(&r.value), "time": r.ts}),
                        )
                    })
                    .collect();
                sink.append(&name, now, &json!({"dn": name, "params": params}));
            }
            None
        }
        Err(e) => {
            tracing::debug!(device = %name, error = %e, "poll failed");
            m.report(sink, now, Some((kind_of(&e), e.to_string())));
            lost(&e, m.poller.device())
        }
    }
}

/// Whether a failed request means the link must be reopened: a broken transport, or a
/// timeout on a serial line, where a late answer would otherwise be read as the answer to
/// the next request (RTU frames carry no transaction id; reopening the port drops it).
fn lost(e: &PollError, d: &Device) -> Option<String> {
    match (e, &d.transport) {
        (PollError::Transport(t), _) => Some(t.clone()),
        (PollError::Timeout(_), Transport::Rtu(_)) => Some(e.to_string()),
        _ => None,
    }
}

/// Carries out one command; returns the error when the connection is lost.
async fn serve(
    members: &mut [Member],
    ctx: &mut Context,
    sink: &Sink,
    c: Command,
) -> Option<String> {
    let Some(m) = members.iter_mut().find(|m| m.name() == c.device) else {
        c.answer(Outcome::err(
            404,
            "no such sub-device on this gateway's links",
        ));
        return None;
    };
    let items: Result<Vec<(String, Value)>, String> = match &c.op {
        Op::Get(ids) => {
            let o = match m.poller.latest(ids) {
                Ok(v) => Outcome::ok(Value::Object(v)),
                Err(e) => Outcome::err(460, e),
            };
            c.answer(o);
            return None;
        }
        Op::Set(params) => Ok(params.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
        Op::Service(id, params) => m.poller.service_writes(id, params),
        Op::Upgrade(_) => {
            c.answer(Outcome::err(
                460,
                "Modbus has no firmware transfer: a Modbus device cannot be upgraded through the gateway",
            ));
            return None;
        }
    };
    let ops = match items.and_then(|items| m.poller.plan_writes(&items)) {
        Ok(ops) => ops,
        Err(e) => {
            c.answer(Outcome::err(460, e));
            return None;
        }
    };
    ctx.set_slave(Slave(m.poller.device().unit_id));
    let result = m.poller.write(ctx, &ops).await;
    let name = m.name().to_owned();
    sink.status.update(&name, |s| {
        if result.is_ok() {
            s.writes_ok += 1;
        } else {
            s.writes_failed += 1;
        }
    });
    match result {
        Ok(()) => {
            c.answer(Outcome::ok(json!({})));
            // Read back at once so the cloud sees the new values.
            m.due = Instant::now();
            None
        }
        Err(e) => {
            let code = match e {
                PollError::Exception { .. } => 500,
                _ => 503,
            };
            c.answer(Outcome::err(code, e.to_string()));
            lost(&e, m.poller.device())
        }
    }
}
